"""Gradient cost of a stiff neural ODE per adjoint, with Kvaerno5 and Rodas5P.

The model is examples/stiff_kinetics.py's: Robertson's stoichiometry (A -> B, 2B -> B + C,
B + C -> A + C) with learned log rate constants and an MLP correction of the rate law,
``r_j(y) = exp(log k_j + g_j(y)) m_j(y)`` (m the mass-action monomials, g a 3-16-3 tanh MLP; here
its last layer starts small and random, not zero, so that every parameter gets a gradient). The
loss is the scaled squared misfit to the true kinetics at 30 log-spaced times in [1e-5, 1e2];
rtol = 1e-5, atol = 1e-10 (as the example trains), float64, one thread.

For each solver and adjoint: forward+backward wall time (best of ``--reps``), forward alone, the
forward's steps and evaluations, and the relative difference ||g - g_ref|| / ||g_ref|| of the
gradient (all 3 + 115 parameters) from DirectAdjoint's with the same solver (and between the two
solvers' DirectAdjoint gradients: they differ by the discretisation, about the tolerance).

    python benchmarks/stiff_gradients.py            # writes benchmarks/stiff_gradients.md
    python benchmarks/stiff_gradients.py --quick    # one repeat, no BacksolveAdjoint; prints only
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
from _common import machine_info

import torchnde as tn

F64 = torch.float64
K_TRUE = (0.04, 3e7, 1e4)
T1 = 1e2
TS = torch.logspace(-5, 2, 30, dtype=F64)
Y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
SCALE = torch.tensor([1.0, 1e4, 1.0], dtype=F64)
STOICH = torch.tensor([[-1.0, 0.0, 1.0], [1.0, -1.0, -1.0], [0.0, 1.0, 0.0]], dtype=F64)
RTOL, ATOL = 1e-5, 1e-10


NOTES = (
    "**BacksolveAdjoint** reconstructs y(t) by integrating the ODE backwards from y(T), and backwards in "
    "time the fast, strongly damped modes of a stiff system grow: at t = 100 Robertson's Jacobian has the "
    "eigenvalue -4.2e3 (true rates), so a perturbation off the slow manifold grows like exp(4.2e3 (100 - t)) "
    "and no solver can follow the forward trajectory back. Where it fails above, it fails within 3e-3 of the "
    "start of the backward solve (Kvaerno5: nonlinear_divergence, Rodas5P: dt_min_reached). That is the "
    "backsolve method's limit on stiff problems (torchdiffeq's odeint_adjoint has the same), not the implicit "
    "solvers': use DirectAdjoint or CheckpointAdjoint (BacksolveAdjoint does work with Kvaerno5 on stiff "
    "*linear* relaxations whose backward solve stays on the solution, tests/test_stiff.py). Before this "
    "benchmark Kvaerno5 + BacksolveAdjoint stopped even earlier here: `jacobian='auto'` chose "
    "`torch.func.jacfwd` for the 124-state adjoint system, which cannot transform the adjoint field (it calls "
    "autograd); it now falls back to `'loop'`. **CheckpointAdjoint** with Kvaerno5 differs from DirectAdjoint by "
    "about 1e-6 relative: its replayed steps solve the stages to the Newton tolerance (0.03 rtol) again, not "
    "along the same iterations; with `Kvaerno5(newton_rtol=1e-12, newton_atol=1e-16)` the two gradients agree "
    "to 6e-11 (measured separately)."
)


def monomials(y):
    A, B, C = y[..., 0], y[..., 1], y[..., 2]
    return torch.stack([A, B * B, B * C], -1)


class ReactionNetwork(torch.nn.Module):
    def __init__(self, log_k0, width=16):
        super().__init__()
        self.log_k = torch.nn.Parameter(torch.tensor(log_k0, dtype=F64))
        self.g = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Tanh(), torch.nn.Linear(width, 3)).to(F64)
        with torch.no_grad():
            self.g[-1].weight.mul_(0.1)
            self.g[-1].bias.zero_()

    def forward(self, t, y, args=None):
        rates = torch.exp(self.log_k + self.g(y * SCALE)) * monomials(y)
        return rates @ STOICH.T


def truth(t, y, args):
    return (torch.tensor(K_TRUE, dtype=F64) * monomials(y)) @ STOICH.T


def solve(f, solver, adjoint=None, rtol=RTOL, atol=ATOL):
    kw = {} if adjoint is None else {"adjoint": adjoint}
    return tn.solve(
        tn.ODETerm(f), solver, 0.0, T1, Y0, saveat=tn.SaveAt(ts=TS),
        controller=tn.PIDController(rtol=rtol, atol=atol), max_steps=2000, **kw,
    )  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reps = 1 if args.quick else args.reps
    started = time.perf_counter()
    with torch.no_grad():
        data = solve(truth, tn.Kvaerno5(newton_rtol=1e-10, newton_atol=1e-14), rtol=1e-8, atol=1e-12).ys
    model = ReactionNetwork([math.log(k * s) for k, s in zip(K_TRUE, (2.5, 0.4, 3.0))])
    params = list(model.parameters())
    n_params = sum(x.numel() for x in params)

    adjoints = [("DirectAdjoint", tn.DirectAdjoint()), ("CheckpointAdjoint", tn.CheckpointAdjoint())]
    if not args.quick:
        adjoints.append(("BacksolveAdjoint", tn.BacksolveAdjoint()))
    rows, refs = [], {}
    for sname, solver in (("Kvaerno5", tn.Kvaerno5()), ("Rodas5P", tn.Rodas5P())):
        with torch.no_grad():
            fwd_best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                sol = solve(model, solver)
                fwd_best = min(fwd_best, time.perf_counter() - t0)
        steps, nfe = sol.stats["num_steps"], sol.stats["nfe"]
        for aname, adjoint in adjoints:
            best, grad, note = float("inf"), None, ""
            for _ in range(reps):
                t0 = time.perf_counter()
                try:
                    ys = solve(model, solver, adjoint).ys
                    loss = ((ys - data) * SCALE).pow(2).mean()
                    g = torch.autograd.grad(loss, params)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    note = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    break
                best = min(best, time.perf_counter() - t0)
                grad = torch.cat([x.reshape(-1) for x in g])
                if best > 60:
                    break
            if grad is None:
                rows.append((sname, aname, None, fwd_best, steps, nfe, None, note))
                print(sname, aname, note, flush=True)
                continue
            if aname == "DirectAdjoint":
                refs[sname] = grad
            rel = float((grad - refs[sname]).norm() / refs[sname].norm())
            rows.append((sname, aname, best, fwd_best, steps, nfe, rel, note))
            print(f"{sname} {aname}: fwd+bwd {best:.2f} s, fwd {fwd_best:.2f} s, rel diff {rel:.1e}", flush=True)
    cross = float((refs["Rodas5P"] - refs["Kvaerno5"]).norm() / refs["Kvaerno5"].norm())
    print(f"Rodas5P vs Kvaerno5 (DirectAdjoint): {cross:.1e}")
    took = time.perf_counter() - started
    lines = [
        "# Gradient cost of a stiff neural ODE",
        "",
        f"Generated by `python benchmarks/stiff_gradients.py` in {took:.0f} s; float64, one thread. "
        f"Load average (1 min) at the end: {os.getloadavg()[0]:.2f} (the machine is shared: wall times "
        "vary with it; compare within a run).",
        "",
        "examples/stiff_kinetics.py's reaction network (learned rate constants and a 3-16-3 MLP correction of "
        f"the rate law, {n_params} parameters) on [0, 1e2], loss at 30 log-spaced times, rtol = {RTOL:g}, "
        f"atol = {ATOL:g}. Wall times are the best of {reps}. `rel. diff` is ||g - g_Direct|| / ||g_Direct|| "
        "with the same solver.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in machine_info().items()],
        "",
        "## Results",
        "",
        "| solver | adjoint | forward + backward | forward alone | backward / forward | steps / nfe (forward) | rel. diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for sname, aname, best, fwd, steps, nfe, rel, note in rows:
        if best is None:
            lines.append(f"| {sname} | {aname} | fails: {note} | {fwd * 1e3:.0f} ms | | {steps} / {nfe} | |")
        else:
            ratio = (best - fwd) / fwd
            lines.append(
                f"| {sname} | {aname} | {best * 1e3:.0f} ms | {fwd * 1e3:.0f} ms | {ratio:.1f} | {steps} / {nfe} "
                f"| {rel:.1e} |"
            )
    lines += ["", f"Rodas5P's DirectAdjoint gradient against Kvaerno5's: rel. diff {cross:.1e}.", ""]
    lines += ["## Notes", "", NOTES, ""]
    print("\n".join(lines[-(len(rows) + 4) :]))
    if not args.quick:
        Path(__file__).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
