"""Fit a neural ODE to a spiral: the first example of Chen et al. (2018), with torchnde.

The same training as `torchnde demo`, as one script to copy and modify. Runs in ~15 s on a CPU.
    python examples/spiral_neural_ode.py          # writes spiral.png if matplotlib is installed
"""

import time

import torch
from torch import nn

import torchnde as tn

# A few hundred tiny tensor operations per iteration: threads only add synchronisation overhead.
torch.set_num_threads(1)
torch.manual_seed(0)

# float64 throughout, so the data can be generated at a tolerance of 1e-10. Every tensor below is
# created from y0's dtype and device: change them here to run in float32 or on a GPU.
y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
ts = torch.linspace(0.0, 25.0, 1000, dtype=y0.dtype, device=y0.device)
A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=y0.dtype, device=y0.device)

# --- the data: one trajectory of the known ODE dy/dt = (y**3) @ A ------------------------------
truth = tn.solve(
    tn.ODETerm(lambda t, y, A: (y**3) @ A),
    tn.Dopri8(),  # high order pays off at tight tolerances
    0.0,
    25.0,
    y0,
    args=A,
    saveat=tn.SaveAt(ts=ts),
    controller=tn.PIDController(rtol=1e-10, atol=1e-10),
    max_steps=None,
)
true_ys = truth.ys  # (1000, 2)


# --- the model: dy/dt = MLP(y**3) ---------------------------------------------------------------
class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))
        for m in self.net:
            if isinstance(m, nn.Linear):
                # |y**3| reaches 8: PyTorch's default init would saturate tanh from the start.
                nn.init.normal_(m.weight, std=0.1)
                nn.init.zeros_(m.bias)

    def forward(self, t, y, args):
        # Cubing the input is the prior of the original example (the true field is linear in y**3).
        return self.net(y**3)


field = Field().to(y0)
controller = tn.PIDController(rtol=1e-6, atol=1e-8)


def predict(y_start, times):
    return tn.solve(
        tn.ODETerm(field),
        tn.Tsit5(),
        float(times[0]),
        float(times[-1]),
        y_start,
        saveat=tn.SaveAt(ts=times),
        controller=controller,
        max_steps=100_000,
    ).ys


# --- training: random short windows of the trajectory ------------------------------------------
# Short windows (6 points, t-length 0.125) train fastest and most reliably here: the gradient
# through a long solve is dominated by phase errors accumulated far from the window's start.
iters, batch_size, batch_time = 3000, 32, 6
window_ts = ts[:batch_time] - ts[0]  # the ODE is autonomous: every window may start at t = 0
offsets = torch.arange(batch_time, device=y0.device)
opt = torch.optim.Adam(field.parameters(), lr=3e-3)
# Decaying the learning rate removes Adam's end-of-training jitter, which long solves amplify.
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=3e-5)

start = time.perf_counter()
for it in range(1, iters + 1):
    starts = torch.randint(0, len(ts) - batch_time + 1, (batch_size,), device=y0.device)
    target = true_ys[starts + offsets[:, None]]  # (batch_time, batch_size, 2)
    # One solve for the whole batch: y0 of shape (batch_size, 2), shared save times.
    loss = (predict(target[0], window_ts) - target).abs().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    if it % 500 == 0:
        print(f"iter {it:5d}  loss {loss.item():.2e}  {time.perf_counter() - start:.1f} s")

# --- evaluate over the whole interval ----------------------------------------------------------
with torch.no_grad():
    sol = tn.solve(
        tn.ODETerm(field),
        tn.Tsit5(),
        0.0,
        25.0,
        y0,
        saveat=tn.SaveAt(ts=ts),
        controller=controller,
        max_steps=100_000,
    )
print("mean |learned - true| over [0, 25]:", f"{(sol.ys - true_ys).abs().mean().item():.3e}")
print("solver statistics of that solve:", sol.stats)

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed: no plot (pip install matplotlib)")
else:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    tr, le = true_ys.cpu().numpy(), sol.ys.cpu().numpy()
    ax1.plot(tr[:, 0], tr[:, 1], lw=4, alpha=0.4, color="tab:green", label="true")
    ax1.plot(le[:, 0], le[:, 1], "--", lw=1.2, color="tab:blue", label="learned")
    ax1.set(xlabel="x", ylabel="y", aspect="equal")
    ax1.legend()
    ax2.plot(ts.cpu(), tr, lw=4, alpha=0.4, color="tab:green")
    ax2.plot(ts.cpu(), le, "--", lw=1.2, color="tab:blue")
    ax2.set(xlabel="t", ylabel="x(t), y(t)")
    fig.savefig("spiral.png", dpi=110)
    print("wrote spiral.png")
