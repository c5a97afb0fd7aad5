"""Gradient cost through implicit steps: forward + backward time and autograd-graph memory.

Two problems, float64, one torch thread, DirectAdjoint:

* Robertson's kinetics (k = 0.04, 3e7, 1e4) to t = 1e3 with ``Kvaerno5``, rtol = 1e-6,
  atol = 1e-10; the loss is ``sum(y(1e3) * w)``, differentiated with respect to the three rates.
* Fisher--KPP ``u_t = D u_xx + k u (1 - u)`` on 64 cells to t = 0.2 with ``KenCarp4`` (reaction
  explicit, diffusion implicit), rtol = 1e-6, atol = 1e-8; gradient with respect to ``(k, D)``.

Reported: the best of ``--reps`` forward+backward wall times, the forward alone, and the memory of
the autograd graph: the bytes of the distinct storages autograd saves for backward (counted by a
``torch.autograd.graph.saved_tensors_hooks`` pack hook, each storage once) and the number of graph
nodes reachable from the loss. (Process RSS on CPU is too coarse to compare these.)

    python benchmarks/implicit_gradients.py [--reps 5] [--baseline torchnde_old]
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch

import torchnde as tn

F64 = torch.float64


def robertson(tn):
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    w = torch.tensor([1.0, 1e4, 1.0], dtype=F64)

    def f(t, y, k):
        a, b, c = y[..., 0], y[..., 1], y[..., 2]
        r1, r2, r3 = k[0] * a, k[1] * b * b, k[2] * b * c
        return torch.stack([-r1 + r3, r1 - r2 - r3, r2], -1)

    def loss(p):
        sol = tn.solve(
            tn.ODETerm(f), tn.Kvaerno5(), 0.0, 1e3, y0, args=p, controller=tn.PIDController(rtol=1e-6, atol=1e-10)
        )
        return (sol.ys[-1] * w).sum(), sol

    return loss, torch.tensor([0.04, 3e7, 1e4], dtype=F64)


def fisher(tn, n=64):
    dx = 1.0 / n
    x = (torch.arange(n, dtype=F64) + 0.5) * dx
    u0 = 0.05 + 0.4 * torch.exp(-(((x - 0.3) / 0.1) ** 2))

    def loss(p):
        k, D = p[0], p[1]

        def diffusion(t, u, a):
            up = torch.cat([u[..., :1], u, u[..., -1:]], -1)
            return D * (up[..., 2:] - 2 * u + up[..., :-2]) / dx**2

        term = tn.MultiTerm(tn.ODETerm(lambda t, u, a: k * u * (1 - u)), tn.ODETerm(diffusion))
        sol = tn.solve(term, tn.KenCarp4(), 0.0, 0.2, u0, controller=tn.PIDController(rtol=1e-6, atol=1e-8))
        return (sol.ys[-1] * x).sum(), sol

    return loss, torch.tensor([5.0, 1.0], dtype=F64)


def graph_nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return len(seen)


def measure(loss, p0, reps):
    p = p0.clone().requires_grad_(True)
    storages = {}

    def pack(x):
        s = x.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        L, sol = loss(p)
    nodes = graph_nodes(L)
    (g,) = torch.autograd.grad(L, p)
    saved = sum(storages.values())
    best_fb = best_f = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        L, _ = loss(p)
        t1 = time.perf_counter()
        torch.autograd.grad(L, p)
        t2 = time.perf_counter()
        best_fb, best_f = min(best_fb, t2 - t0), min(best_f, t1 - t0)
    return dict(
        fwd_bwd_s=best_fb,
        fwd_s=best_f,
        saved_MiB=saved / 2**20,
        nodes=nodes,
        steps=int(sol.stats["num_steps"]),
        grad=g.tolist(),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--baseline",
        default=None,
        help="the importable name of another torchnde copy (e.g. an older commit's package renamed) to time in "
        "the same process, alternating with this one",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    mods = {"torchnde": tn}
    if args.baseline:
        mods = {args.baseline: importlib.import_module(args.baseline), **mods}
    for name, make in (("Robertson Kvaerno5", robertson), ("Fisher-KPP 64 KenCarp4", fisher)):
        best = {}
        for _ in range(args.rounds):  # alternate the versions, keep each one's best
            for label, mod in mods.items():
                r = measure(*make(mod), args.reps)
                if label in best:
                    r["fwd_bwd_s"] = min(r["fwd_bwd_s"], best[label]["fwd_bwd_s"])
                    r["fwd_s"] = min(r["fwd_s"], best[label]["fwd_s"])
                best[label] = r
        for label, r in best.items():
            print(
                f"{name} [{label}]: fwd+bwd {r['fwd_bwd_s'] * 1e3:.0f} ms (fwd {r['fwd_s'] * 1e3:.0f} ms), "
                f"saved {r['saved_MiB']:.3f} MiB, {r['nodes']} graph nodes, {r['steps']} steps, grad {r['grad']}"
            )


if __name__ == "__main__":
    main()
