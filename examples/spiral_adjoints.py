"""Train the spiral neural ODE with each gradient method and compare time, memory and the fit.

Every adjoint is one argument of `solve` (or of `torchnde.nn.NeuralODE`): the training loop is
the same for all of them. See docs/adjoints.md for which to choose.

    python examples/spiral_adjoints.py            # ~1 minute on a CPU
    python examples/spiral_adjoints.py --iters 50
"""

import argparse
import resource
import time

import torch
from torch import nn

import torchnde as tn
from torchnde.nn import NeuralODE

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--iters", type=int, default=500)
cli = parser.parse_args()

torch.set_num_threads(1)
y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
ts = torch.linspace(0.0, 10.0, 200, dtype=y0.dtype)
A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=y0.dtype)
truth = tn.solve(
    tn.ODETerm(lambda t, y, A: (y**3) @ A),
    tn.Dopri8(),
    0.0,
    10.0,
    y0,
    args=A,
    saveat=tn.SaveAt(ts=ts),
    controller=tn.PIDController(rtol=1e-10, atol=1e-10),
    max_steps=None,
).ys


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.1)
                nn.init.zeros_(m.bias)

    def forward(self, t, y):
        return self.net(y**3)


def train(adjoint, iters, window=6, batch=32):
    torch.manual_seed(0)
    model = NeuralODE(
        Field().double(), solver=tn.Tsit5(), controller=tn.PIDController(rtol=1e-6, atol=1e-8), adjoint=adjoint
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for _ in range(iters):
        # random short windows, solved as one batch with a shared step size
        i = torch.randint(0, len(ts) - window, (batch,))
        rel = ts[:window] - ts[0]
        target = torch.stack([truth[j : j + window] for j in i.tolist()], 1)  # (window, batch, 2)
        sol = model(truth[i], t0=0.0, t1=float(rel[-1]), saveat=tn.SaveAt(ts=rel))
        loss = (sol.ys - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        fit = model(y0, t0=0.0, t1=10.0, saveat=tn.SaveAt(ts=ts)).ys
    return elapsed, (fit - truth).abs().mean().item()


print(f"{'adjoint':<22} {'time [s]':>9} {'mean |error|':>13} {'max RSS [MB]':>13}")
for adjoint in (tn.DirectAdjoint(), tn.CheckpointAdjoint(), tn.BacksolveAdjoint(), tn.ReversibleAdjoint()):
    elapsed, err = train(adjoint, cli.iters)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark
    print(f"{type(adjoint).__name__:<22} {elapsed:9.1f} {err:13.3e} {rss:13.0f}")
