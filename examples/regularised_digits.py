"""A neural ODE classifier on scikit-learn's digits, trained with and without a regulariser that
makes it cheaper to solve; prints test accuracy and the test-time number of vector-field
evaluations (NFE) of adaptive Dopri5.

Model: a linear encoder (64 pixels -> ``--hidden``), ``dz/dt = MLP(z)`` on ``[0, 1]`` solved with
Dopri5 and ``PIDController(rtol, atol)``, a linear read-out to the 10 classes. Digits (1797 8x8
images, no download) is split 80/20 with a fixed seed.

Regularisers (``--methods``, comma-separated):

- ``none``: the task loss alone;
- ``local``: + ``lam * R_E`` from :func:`torchnde.regularisers.solve_with_local_regulariser`
  (Pal, Edelman & Rackauckas 2023: the error estimate of one step at a random time, every
  adjoint);
- ``global``: + ``lam * R_E`` summed over the accepted steps
  (:func:`~torchnde.regularisers.solve_with_global_regulariser`, Pal et al. 2021);
- ``taynode``: + ``lam_t * int ||d^2z/dt^2||^2`` (:class:`~torchnde.regularisers.RegularisedTerm`,
  Kelly et al. 2020);
- ``steer``: random end times ``t1 ~ U[0.5, 1.5]`` (Ghosh et al. 2020).

Run::

    python examples/regularised_digits.py --methods none,local,global,taynode,steer

Measured (defaults: 20 epochs of batches of 128, hidden 32, width 64, t1 = 5, Dopri5 at
rtol 1e-5 / atol 1e-7, float32, one CPU thread; test NFE for the 360 test images as one batch;
``lam = 1`` on the controller-scaled error), seeds 0 / 1 / 2:

=========  =====================  =============  ===========================
method     test accuracy          test NFE       train NFE / iteration
=========  =====================  =============  ===========================
none       0.939 / 0.942 / 0.931  68 / 74 / 68   67.5 / 69.1 / 67.9
local      0.967 / 0.950 / 0.928  32 / 32 / 32   52.1 / 52.3 / 52.0
global     0.925 / 0.944 / 0.911  26 / 26 / 26   26.6 / 27.3 / 26.5
taynode    0.944 (seed 0)         56             66.8
steer      0.897 (seed 0)         62             61.5
=========  =====================  =============  ===========================

The local regulariser halves the test NFE (0.46x) at no accuracy loss here (mean 0.948 against
0.937); the global one cuts it to 0.37x for about one point of accuracy. TayNODE (``lam_t =
0.01``) cut the NFE less and cost ~4x the training time per iteration (two evaluations and a
Jacobian-vector product per evaluation); STEER did not help at this setting. Single short runs on a
shared machine: differences of a point or two in accuracy are within seed noise, and the wall times
the script prints vary with the machine's load (TayNODE's ~4x is from one seed-0 run;
benchmarks/regularisation.md measures 5.8x per iteration over 3 seeds, and the other ratios there).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import torchnde as tn
from torchnde import regularisers as R


def load(seed: int):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.as_tensor(X, dtype=torch.float32) / 16.0
    y = torch.as_tensor(y, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(X.shape[0], generator=g)
    n_train = int(0.8 * X.shape[0])
    tr, te = perm[:n_train], perm[n_train:]
    return X[tr], y[tr], X[te], y[te]


class Field(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.Tanh(), nn.Linear(width, hidden))

    def forward(self, t, z, args):
        return self.net(z)


class Classifier(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.encode = nn.Linear(64, hidden)
        self.field = Field(hidden, width)
        self.readout = nn.Linear(hidden, 10)


def train(method: str, args, data):
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(args.seed)
    model = Classifier(args.hidden, args.width)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    term = tn.ODETerm(model.field)
    solver = tn.Dopri5()
    ctrl = tn.PIDController(rtol=args.rtol, atol=args.atol)
    n = Xtr.shape[0]
    it = 0
    train_nfe = 0
    t_start = time.perf_counter()
    for _epoch in range(args.epochs):
        perm = torch.randperm(n)
        for i in range(0, n, args.batch):
            idx = perm[i : i + args.batch]
            z0 = model.encode(Xtr[idx])
            reg = torch.zeros(())
            if method == "local":
                sol, est = R.solve_with_local_regulariser(
                    term, solver, 0.0, args.t1, z0, controller=ctrl, seed=it, rtol=args.rtol, atol=args.atol
                )
                z1 = sol.ys[-1]
                reg = args.lam * est.error
            elif method == "global":
                sol, est = R.solve_with_global_regulariser(
                    term, solver, 0.0, args.t1, z0, controller=ctrl, rtol=args.rtol, atol=args.atol
                )
                z1 = sol.ys[-1]
                reg = args.lam * est.error
            elif method == "taynode":
                aug = R.RegularisedTerm(term, taylor2=True)
                sol = tn.solve(aug.term, solver, 0.0, args.t1, aug.init(z0), controller=ctrl)
                zs, r = aug.split(sol.ys)
                z1 = zs[-1]
                reg = args.lam_taynode * r["taylor2"][-1] / z0.shape[0]
            elif method == "steer":
                t1 = R.steer_end_time(0.0, args.t1, 0.5 * args.t1, seed=it)
                sol = tn.solve(term, solver, 0.0, t1, z0, controller=ctrl)
                z1 = sol.ys[-1]
            else:
                sol = tn.solve(term, solver, 0.0, args.t1, z0, controller=ctrl)
                z1 = sol.ys[-1]
            loss = nn.functional.cross_entropy(model.readout(z1), ytr[idx]) + reg
            opt.zero_grad()
            loss.backward()
            opt.step()
            train_nfe += sol.stats["nfe"]
            it += 1
    train_time = time.perf_counter() - t_start
    with torch.no_grad():
        z0 = model.encode(Xte)
        sol = tn.solve(term, solver, 0.0, args.t1, z0, controller=ctrl)
        acc = (model.readout(sol.ys[-1]).argmax(-1) == yte).float().mean().item()
        # per-sample: each test image's own steps (the batch's shared step size is set by the hardest one)
        ps = tn.solve(term, solver, 0.0, args.t1, z0, controller=ctrl, per_sample=True)
        steps_ps = ps.stats["num_steps"].float().mean().item()
    return dict(
        acc=acc,
        nfe=sol.stats["nfe"],
        steps=sol.stats["num_steps"],
        steps_ps=steps_ps,
        time=train_time,
        iters=it,
        train_nfe=train_nfe / it,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="none,local")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--lam", type=float, default=1.0, help="weight of the local / global error regulariser")
    p.add_argument("--lam-taynode", type=float, default=0.01)
    p.add_argument("--t1", type=float, default=5.0)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load(args.seed)
    print(f"digits: {data[0].shape[0]} train, {data[2].shape[0]} test; Dopri5 rtol={args.rtol} atol={args.atol}")
    for method in args.methods.split(","):
        r = train(method.strip(), args, data)
        print(
            f"{method:8s} test accuracy {r['acc']:.4f}  test NFE {r['nfe']} ({r['steps']} steps; per sample "
            f"{r['steps_ps']:.1f} steps)  "
            f"train NFE/iter {r['train_nfe']:.1f}  train time {r['time']:.1f} s ({1000 * r['time'] / r['iters']:.1f} "
            "ms/iter)"
        )


if __name__ == "__main__":
    main()
