"""Fit a bouncing ball's coefficient of restitution and gravity by gradient descent through its bounces.

A ball dropped from h0 = 5 m bounces: at each impact (height crossing 0 downwards) its velocity
v becomes -e v. We observe its height at 60 fixed times through four bounces (generated with
e = 0.8, g = 9.81 and small noise, fixed seed) and recover e and g by gradient descent through
`solve(..., event=Event(height, direction=-1, terminal=False, reset=bounce))` with DirectAdjoint.
The gradient flows through every located impact time (implicit function theorem) and every
reset (saltation): see docs/events.md. The full run recovers e = 0.8016 and g = 9.85 from a
start at e = 0.6, g = 8.0 (loss 1.14 -> 0.00074; 0.00045 at the true values).

    python examples/bouncing_ball.py            # about 5 s on a CPU
    python examples/bouncing_ball.py --iters 10 # a short run (the tests)
"""

import argparse
import time

import torch

import torchnde as tn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--iters", type=int, default=100, help="optimisation steps")
parser.add_argument("--threads", type=int, default=1)
cli = parser.parse_args()
torch.set_num_threads(cli.threads)

F64 = torch.float64
E_TRUE, G_TRUE, H0, T1 = 0.8, 9.81, 5.0, 5.0


def fall(t, y, args):
    """Free fall; y = (height, velocity), args = (g, e)."""
    g, _ = args
    return torch.stack([y[1], -g * torch.ones_like(y[1])])


def height(t, y, args):
    return y[0]


def bounce(t, y, args, which):
    _, e = args
    return torch.stack([y[0], -e * y[1]])


impact = tn.Event(height, direction=-1, terminal=False, reset=bounce)
ts = torch.linspace(0.05, T1, 60, dtype=F64)
y0 = torch.tensor([H0, 0.0], dtype=F64)


def heights(g, e):
    sol = tn.solve(
        tn.ODETerm(fall),
        tn.Tsit5(),
        0.0,
        T1,
        y0,
        args=(g, e),
        saveat=tn.SaveAt(ts=ts),
        controller=tn.PIDController(rtol=1e-8, atol=1e-8),
        adjoint=tn.DirectAdjoint(),
        event=impact,
        max_events=50,  # a guard against a Zeno cascade if e ever wanders near 1
    )
    return sol.ys[:, 0], sol.events


# the observations
torch.manual_seed(0)
with torch.no_grad():
    clean, events = heights(torch.tensor(G_TRUE, dtype=F64), torch.tensor(E_TRUE, dtype=F64))
    observed = clean + 0.02 * torch.randn_like(clean)
print(f"data: {len(ts)} heights, {events.count} bounces in [0, {T1}] s (e = {E_TRUE}, g = {G_TRUE}, noise 0.02 m)")

# the fit: e through a sigmoid (stays in (0, 1)), g through its log (stays positive)
e_raw = torch.tensor(0.6, dtype=F64).logit().requires_grad_()  # e = 0.6 to start
g_log = torch.tensor(8.0, dtype=F64).log().requires_grad_()  # g = 8.0 to start
opt = torch.optim.Adam([e_raw, g_log], lr=0.08)
sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.96)


def loss_fn():
    h, _ = heights(g_log.exp(), e_raw.sigmoid())
    return ((h - observed) ** 2).mean()


start = time.perf_counter()
first = None
for it in range(cli.iters + 1):
    opt.zero_grad()
    loss = loss_fn()
    if it == cli.iters:
        break
    loss.backward()
    opt.step()
    sched.step()
    first = float(loss.detach()) if first is None else first
    if it % 10 == 0:
        print(
            f"iter {it:3d}  loss {float(loss.detach()):.6f}  e {float(e_raw.detach().sigmoid()):.4f}  g {float(g_log.detach().exp()):.4f}"
        )
elapsed = time.perf_counter() - start
e_fit, g_fit = float(e_raw.detach().sigmoid()), float(g_log.detach().exp())
print(f"initial loss {first:.6f}")
print(f"final loss {float(loss.detach()):.6f}  (at the true e and g: {float(((clean - observed) ** 2).mean()):.6f})")
print(f"recovered e {e_fit:.4f} (truth {E_TRUE}), g {g_fit:.4f} (truth {G_TRUE})")
print(f"{cli.iters} steps in {elapsed:.1f} s ({1e3 * elapsed / max(cli.iters, 1):.0f} ms per step)")
