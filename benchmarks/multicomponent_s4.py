"""S4 against predictor–corrector, Euler–Maruyama and the probability flow at equal NFE on a
two-leaf Gaussian system with exact partial scores (``generative.multi.JointGaussian``).

Usage::

    python benchmarks/multicomponent_s4.py           # full run (~5 minutes on a shared 2-core machine), writes multicomponent_s4.md
    python benchmarks/multicomponent_s4.py --quick   # smoke mode (seconds; writes to a temporary directory)
    python benchmarks/multicomponent_s4.py --out DIR

System: leaf ``x`` of shape (3, 2) under ``VP()``; leaf ``adj``, a symmetric 3 x 3 matrix with zero
diagonal (``symmetric_noise``), under ``VE(0.01, 20)`` or ``VP()``. Data: Gaussian on the 9 free
coordinates with a random dense covariance (x and adj correlated). Every sampler gets the exact
partial scores; errors of the samples' coordinates at ``t0`` against the exact law: max |mean
error|, relative Frobenius error of the covariance, and of its x–adj cross block (the coupling).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch

from torchnde.generative.multi import JointGaussian, MultiProcess, multi_sample, symmetric_noise
from torchnde.generative.processes import VE, VP

HERE = Path(__file__).resolve().parent
torch.set_num_threads(1)
with contextlib.suppress(RuntimeError):
    torch.set_num_interop_threads(1)

N, F = 3, 2
NX = N * F
D = NX + N * (N - 1) // 2
SAMPLERS = [
    ("Euler–Maruyama", "euler_maruyama", {}),
    ("PC (snr 0.16)", "pc", {}),
    ("S4 (snr 0.16)", "s4", {}),
    ("S4, no corrector", "s4", {"n_corrector": 0}),
    ("PF Heun", "pf_heun", {}),
]


def oracle() -> JointGaussian:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(D, D, dtype=torch.float64, generator=g) * 0.4
    cov = a @ a.T + 0.1 * torch.eye(D, dtype=torch.float64)
    return JointGaussian(
        {"x": (N, F), "adj": (N, N)}, torch.linspace(-1, 1, D, dtype=torch.float64), cov, symmetric=["adj"]
    )


def errors(orc, mp, x):
    mu0, c0 = orc.marginal(mp, mp.t0)
    u = orc.coords(x)
    c = torch.cov(u.T)
    cross = (c[:NX, NX:] - c0[:NX, NX:]).norm() / c0[:NX, NX:].norm()
    return float((u.mean(0) - mu0).abs().max()), float((c - c0).norm() / c0.norm()), float(cross)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else HERE)
    b = 500 if args.quick else 20000
    nfes = [8, 16] if args.quick else [8, 16, 32, 64, 128]
    orc = oracle()
    lines = [
        "# S4 vs predictor–corrector at equal NFE (exact partial scores)",
        "",
        f"Written by `benchmarks/multicomponent_s4.py`; {b} samples, seed 7, float64. Each cell: max |mean error| /",
        "relative covariance error / relative x–adj cross-covariance error, against the exact law at t0",
        "(statistical floor of the covariance error at this size: about 0.015).",
        "",
    ]
    for name, adj in (("VE(0.01, 20)", VE(sigma_min=0.01, sigma_max=20.0, t0=1e-3)), ("VP()", VP())):
        mp = MultiProcess({"x": VP(), "adj": adj}, noise_transform={"adj": symmetric_noise})
        lines += [f"## x: VP(), adj: {name}", "", "| NFE | " + " | ".join(s[0] for s in SAMPLERS) + " |"]
        lines.append("|---" * (len(SAMPLERS) + 1) + "|")
        for nfe in nfes:
            row = [str(nfe)]
            for _, sampler, kw in SAMPLERS:
                t = time.perf_counter()
                r = multi_sample(
                    orc.model(mp), mp, {"x": (b, N, F), "adj": (b, N, N)}, nfe=nfe, sampler=sampler, seed=7,
                    dtype=torch.float64, **kw,
                )  # fmt: skip
                e = errors(orc, mp, r.x)
                row.append(f"{e[0]:.3f} / {e[1]:.3f} / {e[2]:.3f}")
                print(name, nfe, sampler, kw, e, f"{time.perf_counter() - t:.2f}s", flush=True)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    (out / "multicomponent_s4.md").write_text("\n".join(lines))
    print("wrote", out / "multicomponent_s4.md")


if __name__ == "__main__":
    main()
