"""Schrödinger bridges between Gaussians: cross-covariance error against training steps.

Usage::

    python benchmarks/bridges.py            # full run (a few minutes on one thread of an idle 2-core
                                            # machine); writes bridges.md next to this file
    python benchmarks/bridges.py --quick    # smoke run (d = 5 only, few steps; temporary directory)
    python benchmarks/bridges.py --out DIR

The problem of issue 13: :math:`\\pi_0 = N(-a\\mathbf 1, I_d)`, :math:`\\pi_1 = N(a\\mathbf 1, I_d)`,
``a = 0.1``, reference :math:`\\sigma W` with ``sigma = 1``, for ``d`` in 5, 20, 50. The Schrödinger
bridge's endpoint cross-covariance is :math:`(\\sqrt5 - 1)/2 \\approx 0.618` times the identity
(:class:`torchnde.generative.oracles.GaussianSchrodingerBridge`). Three learners, each a drift
network simulated through :func:`torchnde.generative.bridges.sample_bridge` (Euler–Maruyama, 50
steps, i.e. :func:`torchnde.solve`):

* DSBM / IMF (:class:`torchnde.generative.bridges.DSBM`): forward and backward networks, rounds of
  ``STEPS // ROUNDS`` Adam steps, evaluated after every forward round (the x axis counts the steps of
  both networks);
* SB-CFM with minibatch Sinkhorn pairs at regularisation 2σ² (``sbcfm_loss(coupling="sinkhorn",
  target="sde")``);
* SB-CFM with exact minibatch OT pairs (``coupling="ot"``: torchcfm's default, biased for σ > 0).

Error metric: the learned SDE is simulated from 10,000 source samples, and so is the oracle's own SDE
from the same samples on the same Brownian path; the reported error is the difference of the two
simulations' cross-covariances Cov(x0, x1), as ``|mean of the diagonal difference|`` (the issue's
"per-dimension mean") and as a relative Frobenius norm ``‖Ĉ − Ĉ_oracle‖_F / ‖C‖_F``, and the largest
error of the endpoint means. Pairing with the oracle cancels most of the sampling noise. The
coupling rows give the cross-covariance of the minibatch couplings themselves (batch 256, before any
training): the value SB-CFM can at best learn.

Everything is seeded; reruns give the same numbers up to timings on the same machine and versions.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _common import machine_info

from torchnde.generative.bridges import DSBM, ExactOTBiasWarning, sample_bridge, sbcfm_loss, sbcfm_pairs
from torchnde.generative.flow_matching import MLP
from torchnde.generative.oracles import GaussianSchrodingerBridge

GOLDEN = (math.sqrt(5) - 1) / 2
A, SIGMA, BATCH, NFE, N_EVAL = 0.1, 1.0, 256, 50, 10_000


def _cross_cov(x0, x1):
    return (x0 - x0.mean(0)).T @ (x1 - x1.mean(0)) / (x0.shape[0] - 1)


def _net(d):
    return MLP(d, hidden=64 if d <= 5 else 128, depth=2, time_features=2)


class Evaluator:
    def __init__(self, d):
        eye = torch.eye(d, dtype=torch.float64)
        self.d = d
        self.sb = GaussianSchrodingerBridge(-A * torch.ones(d), eye, A * torch.ones(d), eye, SIGMA)
        self.x0 = torch.randn(N_EVAL, d, generator=torch.Generator().manual_seed(123)) - A
        ref = sample_bridge(self.sb.drift, self.x0.double(), bridge=SIGMA, nfe=NFE, seed=5)
        self.c_ref = _cross_cov(self.x0.double(), ref)
        self.ref = ref

    def __call__(self, model):
        with torch.no_grad():
            x1 = sample_bridge(model, self.x0, bridge=SIGMA, nfe=NFE, seed=5).double()
        dc = _cross_cov(self.x0.double(), x1) - self.c_ref
        return {
            "diag": abs(dc.diagonal().mean().item()),
            "fro": (dc.norm() / (GOLDEN * math.sqrt(self.d))).item(),
            "mean": (x1 - self.ref).mean(0).abs().max().item(),
        }


def coupling_cross_cov(d, coupling, reps=16):
    g = torch.Generator().manual_seed(7)
    x0s, x1s = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExactOTBiasWarning)
        for _ in range(reps):
            x0 = torch.randn(BATCH, d, generator=g, dtype=torch.float64) - A
            x1 = torch.randn(BATCH, d, generator=g, dtype=torch.float64) + A
            p0, p1 = sbcfm_pairs(x0, x1, sigma=SIGMA, coupling=coupling, generator=g)
            x0s.append(p0)
            x1s.append(p1)
    return _cross_cov(torch.cat(x0s), torch.cat(x1s)).diagonal().mean().item()


def run_sbcfm(d, coupling, checkpoints, evaluate):
    torch.manual_seed(0)
    model = _net(d)
    gen = torch.Generator().manual_seed(0)
    steps = checkpoints[-1]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    rows, t0, train_time = [], time.perf_counter(), 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExactOTBiasWarning)
        for step in range(1, steps + 1):
            x0 = torch.randn(BATCH, d, generator=gen) - A
            x1 = torch.randn(BATCH, d, generator=gen) + A
            loss = sbcfm_loss(model, x0, x1, sigma=SIGMA, coupling=coupling, target="sde", generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step in checkpoints:
                train_time += time.perf_counter() - t0
                rows.append({"steps": step, "train_s": train_time, **evaluate(model)})
                t0 = time.perf_counter()
    return rows


def run_dsbm(d, rounds, steps_per_round, evaluate):
    torch.manual_seed(0)
    dsbm = DSBM(_net(d), _net(d), bridge=SIGMA)
    rows = []
    state = {"t0": time.perf_counter(), "train": 0.0}

    def callback(k, direction, model):
        if direction != "forward":
            return
        state["train"] += time.perf_counter() - state["t0"]
        rows.append({"steps": (k + 1) * steps_per_round, "train_s": state["train"], **evaluate(model.forward)})
        state["t0"] = time.perf_counter()

    def source(n, g):
        return torch.randn(n, d, generator=g) - A

    def target(n, g):
        return torch.randn(n, d, generator=g) + A

    dsbm.fit(
        source,
        target,
        iterations=rounds,
        steps=steps_per_round,
        batch_size=BATCH,
        num_pairs=16384,
        nfe=NFE,
        seed=0,
        callback=callback,
    )
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else Path(__file__).resolve().parent)
    dims = [5] if args.quick else [5, 20, 50]
    steps = 200 if args.quick else 2000
    rounds = 4 if args.quick else 8
    checkpoints = [steps // 8, steps // 4, steps // 2, steps]
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    results = {}
    for d in dims:
        evaluate = Evaluator(d)
        res = {
            "coupling": {c: coupling_cross_cov(d, c) for c in ("sinkhorn", "ot")},
            "DSBM": run_dsbm(d, rounds, steps // rounds, evaluate),
            "SB-CFM Sinkhorn": run_sbcfm(d, "sinkhorn", checkpoints, evaluate),
            "SB-CFM exact OT": run_sbcfm(d, "ot", checkpoints, evaluate),
        }
        results[d] = res
        print(f"d={d} done at {time.perf_counter() - start:.0f}s", flush=True)
    wall = time.perf_counter() - start
    load_end = os.getloadavg()[0]
    lines = [
        "# Schrödinger bridges between Gaussians: cross-covariance error against training steps",
        "",
        "Written by `benchmarks/bridges.py`" + (" (--quick)" if args.quick else "") + ".",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in machine_info().items()],
        f"- run: {wall:.0f} s wall; load average {load_start:.2f} at start, {load_end:.2f} at end (2 cores)",
        "",
        "## Problem",
        "",
        f"N(-{A}·1, I) → N({A}·1, I) in d dimensions, reference σW with σ = {SIGMA}: the Schrödinger bridge's",
        f"cross-covariance is (√5 − 1)/2 ≈ {GOLDEN:.4f} times I. Each learned drift (2-layer MLP, width 64 for",
        f"d = 5 and 128 above, Adam 1e-3 with cosine decay, batch {BATCH}) is simulated by Euler–Maruyama",
        f"({NFE} steps, through `torchnde.solve`) from {N_EVAL:,} source samples, and so is the oracle's",
        "SDE from the same samples on the same Brownian path. Errors are of the learned coupling against",
        "the oracle's: `diag` = |mean of diag(Ĉ − Ĉ_oracle)| (the issue's per-dimension mean), `fro` =",
        "‖Ĉ − Ĉ_oracle‖_F / ‖C‖_F, `mean` = the largest error of the endpoint means. DSBM's steps count",
        f"both networks ({rounds} rounds of {steps // rounds} steps, 16,384 simulated pairs per round).",
        "",
        "## Minibatch couplings (batch 256, no training)",
        "",
        "| d | Sinkhorn at 2σ² | exact OT | Schrödinger bridge |",
        "|---|---:|---:|---:|",
    ]
    for d, res in results.items():
        c = res["coupling"]
        lines.append(f"| {d} | {c['sinkhorn']:.3f} | {c['ot']:.3f} | {GOLDEN:.3f} |")
    lines += ["", "## Error against training steps", ""]
    for d, res in results.items():
        lines += [
            f"### d = {d}",
            "",
            "| method | steps | diag | fro | mean | train s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for method in ("DSBM", "SB-CFM Sinkhorn", "SB-CFM exact OT"):
            for row in res[method]:
                lines.append(
                    f"| {method} | {row['steps']} | {row['diag']:.3f} | {row['fro']:.3f} | {row['mean']:.3f} |"
                    f" {row['train_s']:.1f} |"
                )
        lines.append("")
    summary = ["## Summary", ""]
    for d, res in results.items():
        best = {m: res[m][-1] for m in ("DSBM", "SB-CFM Sinkhorn", "SB-CFM exact OT")}
        summary.append(
            f"- d = {d}: at {steps} steps, diag error DSBM {best['DSBM']['diag']:.3f}, SB-CFM Sinkhorn "
            f"{best['SB-CFM Sinkhorn']['diag']:.3f}, SB-CFM exact OT {best['SB-CFM exact OT']['diag']:.3f} "
            f"(minibatch couplings: Sinkhorn {res['coupling']['sinkhorn']:.3f}, exact OT "
            f"{res['coupling']['ot']:.3f}, target {GOLDEN:.3f})."
        )
    summary += [
        "",
        "Reading the numbers: the learned SDE's coupling is not its training pairs' coupling. Bridge",
        "matching is a Markovian projection: it keeps the pairs' marginals and contracts their coupling",
        "towards the Schrödinger bridge's (for these Gaussians one exact projection maps a",
        "cross-covariance of 1.0 to 0.650 and 0.869 to 0.640, against 0.618). So exact OT's bias, large",
        "in its pairs, shrinks to about 0.02 in the learned SDE at d = 5, and DSBM's repeated",
        "projections converge to the bridge. In 20 and 50 dimensions a batch of 256 is far too small",
        "for either minibatch coupling to be near its population plan (the coupling rows), and both",
        "SB-CFM variants end near the bridge for the same reason.",
    ]
    lines[lines.index("## Minibatch couplings (batch 256, no training)") : 0] = [*summary, ""]
    (out / "bridges.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'bridges.md'} in {wall:.0f}s")


if __name__ == "__main__":
    main()
