"""MRS against DPM-Solver++ and Euler--Maruyama on the mean-reverting SDE, with the exact score.

Usage::

    python benchmarks/mrs.py            # full run (~5 minutes on a shared 2-core machine), writes mrs.md here
    python benchmarks/mrs.py --quick    # smoke mode (seconds; writes to a temporary directory)
    python benchmarks/mrs.py --out DIR  # write mrs.md into DIR

Process: ``MeanReverting(theta=4, mean=(0.5, -0.5), sigma=1)`` (IR-SDE with constant
coefficients; stationary std 0.354, alpha(t1) = e^-4). Data: Gaussian mixtures whose diffused
marginals, scores and log-densities are exact (``generative.oracles.GaussianMixtureData``):
"overlap" (two overlapping components, the test's) and "four" (four separated components on a
square of side 2, std 0.2). Every sampler starts from the same exact draw of p_t1 (float64) and
gets the exact noise prediction. Metrics against p_t0: the exact W2 (optimal assignment) to an
exact draw of the same size (next to the W2 between two exact draws, the Monte-Carlo floor); the
NLL of 20000 samples under the exact p_t0 minus the entropy (0 for exact samples, up to its
standard error ~0.007; a lower-noise view than W2, which is computed on the first 1000); and, for the deterministic samplers, the
RMS distance to the exact probability-flow map of the same start (Tsit5 at 1e-10).

Samplers: the eight MRS presets (``mrs_{ode,sde}[_eps]_{1,2}``), DPM-Solver++(2M) and (3M)
(``dpmpp_2m``/``dpmpp_3m``, which take the mean offset too), Euler--Maruyama and probability-flow
Euler, at 5 ... 200 evaluations (Euler--Maruyama up to 1000).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

torch.set_num_threads(1)
with contextlib.suppress(RuntimeError):
    torch.set_num_interop_threads(1)

from _common import machine_info  # noqa: E402  (this folder, on sys.path)

from torchnde.generative.metrics import wasserstein2  # noqa: E402
from torchnde.generative.oracles import GaussianMixtureData  # noqa: E402
from torchnde.generative.processes import MeanReverting  # noqa: E402
from torchnde.generative.samplers import sample  # noqa: E402

D = torch.float64
MU = torch.tensor([0.5, -0.5], dtype=D)
MRS = (
    "mrs_ode_1",
    "mrs_ode_2",
    "mrs_sde_1",
    "mrs_sde_2",
    "mrs_ode_eps_1",
    "mrs_ode_eps_2",
    "mrs_sde_eps_1",
    "mrs_sde_eps_2",
)
OTHERS = ("dpmpp_2m", "dpmpp_3m", "euler_maruyama", "pf_euler")
STOCHASTIC = ("euler_maruyama", "mrs_sde_1", "mrs_sde_2", "mrs_sde_eps_1", "mrs_sde_eps_2")


def mixtures():
    side = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]], dtype=D)
    return {
        "overlap": GaussianMixtureData([0.4, 0.6], [[-0.6, 0.2], [0.5, -0.3]], [[0.3, 0.2], [0.2, 0.35]]),
        "four": GaussianMixtureData(torch.ones(4), side, 0.2),
    }


def run(name, mix, budgets, em_budgets, n, n_w2, log):
    p = MeanReverting(theta=4.0, mean=MU, sigma=1.0)
    ref = mix.marginal_sample(p, p.t0, n_w2, generator=torch.Generator().manual_seed(1000))
    floors = [wasserstein2(mix.marginal_sample(p, p.t0, n_w2, generator=torch.Generator().manual_seed(3000 + k)), ref)
              for k in range(3)]  # fmt: skip
    big = mix.marginal_sample(p, p.t0, 200000, generator=torch.Generator().manual_seed(2000))
    lp = mix.log_prob(p, p.t0, big)
    # the NLL gap of n exact draws has standard error std(log p) / sqrt(n)
    entropy, entropy_se = -float(lp.mean()), float(lp.std()) / math.sqrt(n)
    x_init = mix.marginal_sample(p, p.t1, n, generator=torch.Generator().manual_seed(0))
    model = mix.model(p, "eps")
    flow = sample(mix.score_fn(p), p, (n, 2), sampler="pf_adaptive", x_init=x_init, rtol=1e-10, atol=1e-10).x
    rows = []
    for smp in (*MRS, *OTHERS):
        for nfe in em_budgets if smp == "euler_maruyama" else budgets:
            w = time.perf_counter()
            out = sample(model, p, (n, 2), nfe=nfe, sampler=smp, parameterisation="eps", x_init=x_init, seed=7)
            wall = time.perf_counter() - w
            x = out.x
            ok = bool(torch.isfinite(x).all())
            w2 = wasserstein2(x[:n_w2], ref) if ok else math.nan
            nll = -float(mix.log_prob(p, p.t0, x).mean()) - entropy if ok else math.nan
            rms = float((x - flow).square().sum(-1).mean().sqrt()) if ok and smp not in STOCHASTIC else math.nan
            rows.append(dict(data=name, sampler=smp, nfe=out.nfe, w2=w2, nll=nll, rms=rms, wall=wall))
            log(f"  {name:8s} {smp:14s} nfe={out.nfe:5d} W2={w2:.4f} dNLL={nll:+.4f} rms={rms:.2e} ({wall:.2f} s)")
    return rows, dict(floors=floors, entropy=entropy, entropy_se=entropy_se)


def _fmt(v, spec):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def report(results, n, n_w2, budgets, em_budgets, elapsed):
    lines = [
        "# MRS vs DPM-Solver++ vs Euler–Maruyama on the mean-reverting SDE",
        "",
        "Generated by `benchmarks/mrs.py` (see its docstring for the set-up). Exact noise prediction of",
        "Gaussian mixtures under `MeanReverting(theta=4, mean=(0.5, -0.5), sigma=1)`, float64, one",
        f"thread, {n} samples from one exact draw of p_t1 (W2 on the first {n_w2}). Total {elapsed:.0f} s.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine_info().items()) + ".",
        "",
        "Columns per budget: W2 to an exact draw of p_t0 | NLL gap (nats; exact samples: 0) | RMS to the",
        "exact probability-flow map of the same start (deterministic samplers).",
        "",
    ]
    for name, (rows, info) in results.items():
        fl = info["floors"]
        lines += [
            f"## Data: {name}",
            "",
            f"Monte-Carlo floor of W2 (exact vs exact draws of {n_w2}): {min(fl):.4f}–{max(fl):.4f}; standard",
            f"error of the NLL gap of {n} exact draws: {info['entropy_se']:.4f}.",
            "",
            "| sampler | " + " | ".join(str(b) for b in em_budgets) + " |",
            "|---|" + "---|" * len(em_budgets),
        ]
        by = {}
        for r in rows:
            by.setdefault(r["sampler"], {})[r["nfe"]] = r
        for smp, cells in by.items():
            out = []
            for b in em_budgets:
                r = cells.get(b)
                if r is None:
                    out.append("")
                    continue
                cell = f"{_fmt(r['w2'], '.3f')} \\| {_fmt(r['nll'], '+.3f')}"
                if not math.isnan(r["rms"]):
                    cell += f" \\| {_fmt(r['rms'], '.1e')}"
                out.append(cell)
            lines.append(f"| `{smp}` | " + " | ".join(out) + " |")
        lines.append("")
        # the headlines: budgets at which a sampler is as good as Euler-Maruyama at 200 NFE (|NLL gap| no
        # larger, up to twice its standard error; a negative gap: samples too concentrated), and at which a
        # deterministic one is within 1e-2 (RMS) of the exact flow map
        em200 = by.get("euler_maruyama", {}).get(200)
        if em200 is not None:
            tol = abs(em200["nll"]) + 2 * info["entropy_se"]
            lines.append(
                f"Euler–Maruyama at 200 NFE: W2 {em200['w2']:.3f}, NLL gap {em200['nll']:+.3f}. Smallest budget at "
                f"which a sampler's |NLL gap| is within {tol:.3f} (that, plus twice the standard error), and (for "
                "the deterministic ones) at which the RMS to the exact flow map is below 1e-2:"
            )
            lines.append("")
            for smp, cells in by.items():
                hit = [b for b in sorted(cells) if abs(cells[b]["nll"]) <= tol]
                near = [b for b in sorted(cells) if cells[b]["rms"] < 1e-2]
                det = "" if smp in STOCHASTIC else f"; RMS < 1e-2 from {near[0] if near else '>' + str(max(cells))} NFE"
                lines.append(f"- `{smp}`: {hit[0] if hit else '>' + str(max(cells))} NFE{det}")
            lines.append("")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.quick:
        budgets, em_budgets, n, n_w2 = (5, 10), (5, 10, 20), 600, 300
        out_dir = a.out or Path(tempfile.mkdtemp())
    else:
        budgets, em_budgets, n, n_w2 = (5, 10, 20, 50, 100, 200), (5, 10, 20, 50, 100, 200, 500, 1000), 20000, 1000
        out_dir = a.out or HERE
    t = time.perf_counter()
    results = {}
    for name, mix in mixtures().items():
        results[name] = run(name, mix, budgets, em_budgets, n, n_w2, print)
    text = report(results, n, n_w2, budgets, em_budgets, time.perf_counter() - t)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "mrs.md").write_text(text)
    print(f"wrote {out_dir / 'mrs.md'}")


if __name__ == "__main__":
    main()
