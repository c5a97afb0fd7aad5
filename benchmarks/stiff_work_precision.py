"""Work–precision of torchnde's stiff solvers against SciPy's Radau, BDF and LSODA.

Four problems in float64, each at rtol = 1e-3 ... 1e-8 (atol = rtol * the problem's atol scale),
one process, one thread, under ``torch.no_grad()``:

- Robertson's kinetics (k = 0.04, 3e7, 1e4) to t = 1e5 (atol scale 1e-4: absolute tolerances
  1e-7 ... 1e-12);
- HIRES to t = 321.8122 (Schäfer 1975; atol scale 1e-4);
- Van der Pol with mu = 1e3 to t = 2000 (y2' = mu (1 - y1^2) y2 - y1, y(0) = (2, 0); MATLAB's
  vdp1000, i.e. Hairer & Wanner's scaled VDPOL with eps = 1e-6 on [0, 2]; atol scale 1e-4;
  Rosenbrock23, a loose-tolerance method, only down to rtol 1e-5);
- a method-of-lines Fisher–KPP problem u_t = D u_xx + r u (1 - u) on 32 cells (D = 0.02, r = 5,
  Neumann ends) to t = 1 (atol scale 1e-2); torchnde's KenCarp4 gets it split (reaction explicit,
  diffusion implicit), the others the whole field.

For every solve: the error of the final state in units of the tolerance asked for, max over the
components of |y - ref| / (atol + rtol |ref|) (so 1 is "as asked"), vector-field evaluations
(torchnde: every call, a Jacobian pass counting as one; SciPy: ``nfev`` + n per Jacobian, which it
computes by finite differences here, as a user without an analytic Jacobian would) and the wall
time (best of ``--reps``). References: SciPy Radau at rtol 1e-12 (HIRES and Robertson: values that
agree with the IVP test set's to 1e-10); Van der Pol: SciPy Radau at rtol 1e-13 with the
analytic Jacobian, hard-coded (as in tests/problems.py).

Peers (optional, each in a subprocess):

- torchdiffeq's fixed-step implicit methods (``_stiff_torchdiffeq.py``): the installed version's
  ``implicit_adams`` (Adams–Bashforth–Moulton with fixed-point corrector iterations: the only
  implicit method torchdiffeq 0.2.5 has), and with ``--torchdiffeq-source PATH`` a newer source
  checkout's fixed-grid implicit Runge–Kutta methods ``radauIIA5`` and ``trbdf2`` (Broyden
  iterations on the whole state; they warn and go on when those do not converge). Fixed steps:
  100 and 1000 (log-spaced from 1e-6 for Robertson, uniform otherwise); the error is given in
  units of the rtol = 1e-6 tolerance.
- diffrax's ``Kvaerno5`` (``_stiff_diffrax.py``) with ``--diffrax-python PATH``, a Python that has
  diffrax and jax (jit-compiled; the wall time excludes the compiling run; diffrax reports steps,
  not evaluations).

    python benchmarks/stiff_work_precision.py          # writes benchmarks/stiff_work_precision.md (~3-5 min)
    python benchmarks/stiff_work_precision.py --quick  # two tolerances; smoke mode
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import machine_info
from scipy.integrate import solve_ivp

import torchnde as tn

F64 = torch.float64


def rober(t, y, args):
    y1, y2, y3 = y.unbind(-1)
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2], -1)


def hires(t, y, args):
    y1, y2, y3, y4, y5, y6, y7, y8 = y.unbind(-1)
    return torch.stack(
        [
            -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
            1.71 * y1 - 8.75 * y2,
            -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
            8.32 * y2 + 1.71 * y3 - 1.12 * y4,
            -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
            -280 * y6 * y8 + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
            280 * y6 * y8 - 1.81 * y7,
            -280 * y6 * y8 + 1.81 * y7,
        ],
        -1,
    )


def vdp(t, y, args):
    return torch.stack([y[..., 1], 1e3 * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)


#: y(2000) of vdp from (2, 0): SciPy Radau, analytic Jacobian, rtol 1e-13, atol 1e-16 (tests/problems.py)
VDP_REF = np.array([1.7061677321704618, -0.00089280970102482])

N_CELLS, D_COEF, R_COEF = 32, 0.02, 5.0


def _laplacian(u):
    dx = 1.0 / N_CELLS
    padded = torch.cat([u[..., :1], u, u[..., -1:]], -1)  # Neumann: mirrored ends
    return (padded[..., 2:] - 2 * u + padded[..., :-2]) / dx**2


def reaction(t, u, args):
    return R_COEF * u * (1 - u)


def diffusion(t, u, args):
    return D_COEF * _laplacian(u)


def kpp(t, u, args):
    return reaction(t, u, args) + diffusion(t, u, args)


def _numpy(f):
    def g(t, y):
        with torch.no_grad():
            return f(t, torch.as_tensor(y, dtype=F64), None).numpy()

    return g


def _kpp_y0():
    x = (torch.arange(N_CELLS, dtype=F64) + 0.5) / N_CELLS
    return torch.exp(-100 * (x - 0.2) ** 2)


PROBLEMS = {
    "Robertson to 1e5": (rober, torch.tensor([1.0, 0.0, 0.0], dtype=F64), 1e5, 1e-4),
    "HIRES to 321.8122": (hires, torch.tensor([1, 0, 0, 0, 0, 0, 0, 0.0057], dtype=F64), 321.8122, 1e-4),
    "Van der Pol (mu = 1e3) to 2000": (vdp, torch.tensor([2.0, 0.0], dtype=F64), 2000.0, 1e-4),
    f"Fisher-KPP, {N_CELLS} cells, to 1": (kpp, _kpp_y0(), 1.0, 1e-2),
}


def _best(fn, reps):
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        if best > 2.0:
            break
    return best, out


def _error(y, ref, rtol, atol):
    return float(np.max(np.abs(y - ref) / (atol + rtol * np.abs(ref))))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--torchdiffeq-source", default=None, help="a torchdiffeq checkout with fixed-grid implicit RK")
    p.add_argument("--diffrax-python", default=None, help="a Python interpreter that has diffrax and jax")
    args = p.parse_args()
    torch.set_num_threads(1)
    rtols = [1e-3, 1e-6] if args.quick else [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8]
    reps = 1 if args.quick else args.reps
    started = time.perf_counter()
    lines = []
    refs = {}
    for name, (f, y0, T, scale) in PROBLEMS.items():
        fnp = _numpy(f)
        n = y0.shape[-1]
        if f is vdp:
            ref = VDP_REF
        else:
            ref = solve_ivp(fnp, (0, T), y0.numpy(), method="Radau", rtol=1e-12, atol=1e-12 * scale).y[:, -1]
        refs[name] = ref
        lines += [f"## {name}", "", "| solver | " + " | ".join(f"rtol {r:g}" for r in rtols) + " |"]
        lines.append("|---|" + "---|" * len(rtols))
        torch_solvers = [("Rodas5P", tn.Rodas5P()), ("Kvaerno5", tn.Kvaerno5()), ("Rosenbrock23", tn.Rosenbrock23())]
        if "KPP" in name:
            torch_solvers.append(("KenCarp4 (split)", tn.KenCarp4()))
        for label, solver in torch_solvers:
            cells = []
            for rtol in rtols:
                if f is vdp and label == "Rosenbrock23" and rtol < 1e-5:
                    cells.append("—")
                    continue
                term = tn.MultiTerm(tn.ODETerm(reaction), tn.ODETerm(diffusion)) if "split" in label else tn.ODETerm(f)
                ctrl = tn.PIDController(rtol=rtol, atol=rtol * scale)

                def run(term=term, solver=solver, ctrl=ctrl, T=T, y0=y0):
                    with torch.no_grad():
                        return tn.solve(term, solver, 0.0, T, y0, controller=ctrl, max_steps=100000, throw=False)

                wall, sol = _best(run, reps)
                if not sol.successful:
                    cells.append(f"{sol.result.name}")
                    continue
                err = _error(sol.ys[-1].numpy(), ref, rtol, rtol * scale)
                cells.append(f"{err:.2g} / {sol.stats['nfe']} / {wall * 1e3:.0f} ms")
            lines.append(f"| torchnde {label} | " + " | ".join(cells) + " |")
        for method in ("Radau", "BDF", "LSODA"):
            cells = []
            for rtol in rtols:

                def scipy_run(m=method, rt=rtol, fnp=fnp, T=T, y0=y0, scale=scale):
                    return solve_ivp(fnp, (0, T), y0.numpy(), method=m, rtol=rt, atol=rt * scale)

                wall, r = _best(scipy_run, reps)
                err = _error(r.y[:, -1], ref, rtol, rtol * scale)
                nfe = r.nfev + n * r.njev
                cells.append(f"{err:.2g} / {nfe} / {wall * 1e3:.0f} ms")
            lines.append(f"| SciPy {method} | " + " | ".join(cells) + " |")
        lines.append("")
        print("\n".join(lines[-(len(torch_solvers) + 7) :]), flush=True)
    peers = _peers(args, rtols, refs, reps)
    print("\n".join(peers), flush=True)
    lines += peers
    took = time.perf_counter() - started
    flags = (f" --torchdiffeq-source {args.torchdiffeq_source}" if args.torchdiffeq_source else "") + (
        f" --diffrax-python {args.diffrax_python}" if args.diffrax_python else ""
    )
    head = [
        "# Work–precision of the stiff solvers",
        "",
        f"Generated by `python benchmarks/stiff_work_precision.py{' --quick' if args.quick else ''}{flags}` in "
        f"{took:.0f} s; float64, one thread, one process. Load average (1 min) at the end: {os.getloadavg()[0]:.2f}.",
        "",
        "Each cell: error in units of the tolerance asked for (max over components of "
        "|y - ref| / (atol + rtol |ref|); 1 means as asked) / vector-field evaluations (torchnde: a Jacobian "
        "pass counts as one; SciPy: nfev plus n per finite-difference Jacobian) / wall time (best of "
        f"{reps}). atol = rtol × the problem's scale (Robertson, HIRES and Van der Pol 1e-4, Fisher–KPP 1e-2). "
        "Reference: SciPy Radau at rtol 1e-12. What is measured and why: the script's docstring.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in machine_info().items()],
        "",
    ]
    if not args.quick:
        Path(__file__).with_suffix(".md").write_text("\n".join(head + lines) + "\n")


def _subprocess(cmd, spec, timeout):
    """JSON lines from a helper script; ``(rows, note)`` with a note on failure or timeout."""
    try:
        r = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rows = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        return rows, f"stopped after {timeout} s"
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    note = None if r.returncode == 0 else f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
    return rows, note


def _peers(args, rtols, refs, reps):
    here = Path(__file__).parent
    out = ["## torchdiffeq's fixed-step implicit methods", ""]
    out.append(
        "Fixed steps (log-spaced from 1e-6 for Robertson, uniform otherwise), no error control. Each cell: "
        "error in units of the rtol = 1e-6 tolerance (atol = 1e-6 × the problem's scale) / vector-field "
        "evaluations / wall time (one run) / torchdiffeq's non-convergence warnings; NaN: the solution "
        "became NaN/inf. The installed torchdiffeq 0.2.5 has no implicit Runge–Kutta methods; the source "
        "checkout (a newer torchdiffeq whose `__version__` still reads 0.2.5) adds fixed-grid ones solved by "
        "Broyden iterations."
    )
    out.append("")
    steps = [100] if args.quick else [100, 1000]
    runs = [("installed", None, ["implicit_adams"], steps)]
    if args.torchdiffeq_source:  # 100 steps only: radauIIA5 took ~100 s for 1000 steps of Robertson
        runs.append(("source checkout", args.torchdiffeq_source, ["radauIIA5", "trbdf2"], steps[:1]))
    names = list(PROBLEMS)
    out += ["| method | problem | " + " | ".join(f"{n} steps" for n in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for label, source, methods, run_steps in runs:
        if source:
            rev = subprocess.run(["git", "-C", source, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
            label = f"source checkout {rev.stdout.strip()}" if rev.returncode == 0 else label
        cmd = [sys.executable, str(here / "_stiff_torchdiffeq.py")] + (["--source", source] if source else [])
        rows, note = _subprocess(cmd, {"methods": methods, "steps": run_steps, "problems": names}, 240)
        for m in methods:
            for name in names:
                cells = []
                for n in steps:
                    r = next((x for x in rows if x["method"] == m and x["problem"] == name and x["steps"] == n), None)
                    if n not in run_steps:
                        cells.append("—")
                    elif r is None:
                        cells.append("not run" + (f" ({note})" if note else ""))
                    elif r["error"]:
                        cells.append(r["error"])
                    elif r["y"] is None:
                        cells.append(f"NaN / {r['nfe']} / {r['wall']:.1f} s / {r['warnings']}")
                    else:
                        scale = PROBLEMS[name][3]
                        e = _error(np.array(r["y"]), refs[name], 1e-6, 1e-6 * scale)
                        cells.append(f"{e:.2g} / {r['nfe']} / {r['wall']:.1f} s / {r['warnings']}")
                version = rows[0]["version"] if rows else "?"
                out.append(f"| {m} (torchdiffeq {version}, {label}) | {name} | " + " | ".join(cells) + " |")
    out.append("")
    out += ["## diffrax", ""]
    if not args.diffrax_python:
        out += [
            "Not run (no `--diffrax-python`: diffrax needs jax, which the project's environment does not carry).",
            "",
        ]
        return out
    spec = {
        "rtols": rtols,
        "reps": reps,
        "problems": {k: {"t1": PROBLEMS[k][2], "y0": PROBLEMS[k][1].tolist(), "scale": PROBLEMS[k][3]} for k in names},
    }
    rows, note = _subprocess([args.diffrax_python, str(here / "_stiff_diffrax.py")], spec, 300)
    ver = subprocess.run(
        [args.diffrax_python, "-c", "import diffrax, jax; print(diffrax.__version__, jax.__version__)"],
        capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    out.append(
        f"diffrax {ver[0] if ver else '?'} (jax {ver[1] if len(ver) > 1 else '?'}, CPU, float64, jit-compiled; "
        "the compiling run excluded). Each cell: error in units of the tolerance / steps tried (accepted + "
        "rejected; diffrax does not count evaluations) / wall time (best of the repeats)."
        + (f" Note: {note}." if note else "")
    )
    out += ["", "| solver | problem | " + " | ".join(f"rtol {r:g}" for r in rtols) + " |"]
    out.append("|---|---|" + "---|" * len(rtols))
    for name in names:
        cells = []
        for rtol in rtols:
            r = next((x for x in rows if x["problem"] == name and x["rtol"] == rtol), None)
            if r is None:
                cells.append("not run")
            elif not r["ok"]:
                cells.append("failed")
            else:
                scale = PROBLEMS[name][3]
                e = _error(np.array(r["y"]), refs[name], rtol, rtol * scale)
                cells.append(f"{e:.2g} / {r['steps']} / {r['wall'] * 1e3:.0f} ms")
        out.append(f"| diffrax Kvaerno5 | {name} | " + " | ".join(cells) + " |")
    out.append("")
    return out


if __name__ == "__main__":
    main()
