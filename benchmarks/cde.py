"""Neural-CDE benchmarks: torchnde against torchcde, forward + backward at equal accuracy, same
process, one thread.

Usage::

    python benchmarks/cde.py               # full run (~5 minutes on 2 cores), writes cde.md here
    python benchmarks/cde.py --quick       # smoke mode (seconds; writes to a temporary directory)
    python benchmarks/cde.py --out DIR     # write cde.md into DIR
    python benchmarks/cde.py --profile     # also print cProfiles of torchnde and torchcde on one case

Model (Kidger, Morrill, Foster & Lyons 2020, "Neural controlled differential equations for
irregular time series"): z(t0) = Linear(C, H)(X(t0)), dz = f(z) dX with
f = Linear(H, W)-tanh-Linear(W, H C)-tanh reshaped to (H, C), loss = sum of squares of z(T),
gradients for all parameters. X interpolates a batch of time series (natural cubic spline,
Hermite cubic with backward differences, or linear interpolation). Both libraries solve the same
CDE as the ODE dz/dt = f(z) dX/dt, with adaptive Dopri5 at the same rtol/atol or with classical
RK4 at the same fixed step, by backpropagation through the solver or by the continuous adjoint.
The achieved error of z(T) and of the gradient is measured against a float64 reference solved at
a tight tolerance. See README.md in this directory ("SDEs and CDEs").
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

torch.set_num_threads(1)
with contextlib.suppress(RuntimeError):  # only settable before any inter-op work
    torch.set_num_interop_threads(1)

import adjoints  # noqa: E402,F401  (registers torchdiffeq method "rk4_classic": classical RK4, like torchnde's RK4)
import torchcde  # noqa: E402
import torchdiffeq  # noqa: E402
from _common import log_profile, machine_info  # noqa: E402  (this folder, on sys.path)

import torchnde as tn  # noqa: E402
import torchnde.compat.torchcde as tn_cde  # noqa: E402
from torchnde.paths._interp import CubicSpline, HermiteCubic, LinearInterpolation  # noqa: E402

MODEL_SEED, DATA_SEED = 0, 1
MAX_STEPS = 100_000

# ---------------------------------------------------------------------------------------------
# the model and the data


class VF(torch.nn.Module):
    """``f(z)``: Linear(H, W)-tanh-Linear(W, H C)-tanh, reshaped to ``(..., H, C)``; counts calls.
    One object is shared by all libraries (torchcde calls ``f(t, z)``, torchnde ``f(t, z, args)``)."""

    def __init__(self, hidden, channels, width):
        super().__init__()
        self.hidden, self.channels = hidden, channels
        self.l1 = torch.nn.Linear(hidden, width)
        self.l2 = torch.nn.Linear(width, hidden * channels)
        self.calls = 0

    def forward(self, t, z, *args):
        self.calls += 1
        out = torch.tanh(self.l2(torch.tanh(self.l1(z))))
        return out.view(*z.shape[:-1], self.hidden, self.channels)


@dataclass
class Setup:
    batch: int
    length: int
    channels: int
    hidden: int
    width: int


def make_data(s: Setup, dtype=torch.float32):
    """``(ts, xs)``: times 0, 1, ..., T-1 (torchcde's default) and ``(B, T, C)`` series: channel 0 is
    time / (T - 1), the others sinusoids of random frequency and phase plus a little noise."""
    g = torch.Generator().manual_seed(DATA_SEED)
    ts = torch.arange(s.length, dtype=torch.float64)
    B, C = s.batch, s.channels
    freq = 0.05 + 0.25 * torch.rand(B, 1, C - 1, generator=g, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(B, 1, C - 1, generator=g, dtype=torch.float64)
    waves = torch.sin(freq * ts.view(1, -1, 1) + phase)
    waves = waves + 0.05 * torch.randn(B, s.length, C - 1, generator=g, dtype=torch.float64)
    tcol = (ts / (s.length - 1)).view(1, -1, 1).expand(B, -1, 1)
    xs = torch.cat([tcol, waves], -1)
    return ts.to(dtype), xs.to(dtype)


@dataclass
class Model:
    vf: VF
    init: torch.nn.Linear
    params: list


def make_model(s: Setup, dtype=torch.float32):
    torch.manual_seed(MODEL_SEED)
    vf = VF(s.hidden, s.channels, s.width).to(dtype)
    init = torch.nn.Linear(s.channels, s.hidden).to(dtype)
    return Model(vf, init, list(vf.parameters()) + list(init.parameters()))


INTERPS = {
    # name: (torchnde class, torchcde coefficient function, torchcde class, compat class, needs jumps)
    "cubic spline": (CubicSpline, "natural_cubic_coeffs", "CubicSpline", True),
    "Hermite cubic": (HermiteCubic, "hermite_cubic_coefficients_with_backward_differences", "CubicSpline", True),
    "linear": (LinearInterpolation, "linear_interpolation_coeffs", "LinearInterpolation", False),
}


@dataclass(frozen=True)
class Case:
    interp: str
    solver: str  # "dopri5" | "rk4"
    mode: str  # "direct" (backprop through the solver) | "adjoint" (continuous adjoint)
    tol: float = 0.0  # dopri5: rtol; atol = tol / 100
    step: float = 0.0  # rk4: the step

    @property
    def label(self):
        s = f"Dopri5 rtol {self.tol:g} atol {self.tol / 100:g}" if self.solver == "dopri5" else f"RK4 h = {self.step:g}"
        return f"{self.interp}, {s}, {self.mode}"


# ---------------------------------------------------------------------------------------------
# runners: make(model, data, case) -> forward() returning z(T)


def paths(interp, ts, xs):
    """The interpolation for each library, built once (as in preprocessing a data set)."""
    native_cls, coeff_fn, cde_cls, _smooth = INTERPS[interp]
    coeffs = getattr(torchcde, coeff_fn)(xs, t=ts)
    X_cde = getattr(torchcde, cde_cls)(coeffs, t=ts)
    X_compat = getattr(tn_cde, cde_cls)(coeffs, t=ts)
    return native_cls(ts, xs), X_cde, X_compat


def torchnde_make(model: Model, path, ts, xs, case: Case):
    vf = model.vf
    term = tn.ControlTerm(lambda t, z, args: vf(t, z), path)
    t0, t1 = float(ts[0]), float(ts[-1])
    x0 = xs[:, 0]
    adjoint = tn.DirectAdjoint() if case.mode == "direct" else tn.BacksolveAdjoint()
    if case.solver == "dopri5":
        jumps = None if INTERPS[case.interp][3] else ts
        solver = tn.Dopri5()
        kw = dict(controller=tn.PIDController(rtol=case.tol, atol=case.tol / 100, jump_ts=jumps))
    else:
        solver, kw = tn.RK4(), dict(dt0=case.step)
    info = {}

    def forward():
        z0 = model.init(x0)
        sol = tn.solve(term, solver, t0, t1, z0, adjoint=adjoint, max_steps=MAX_STEPS, **kw)
        info["steps"] = int(sol.stats["num_steps"])
        return sol.ys[-1]

    return forward, info


def torchcde_make(model: Model, X, ts, xs, case: Case, cdeint=torchcde.cdeint):
    vf = model.vf
    x0 = xs[:, 0]
    tt = X.interval
    if case.solver == "dopri5":
        kw = dict(method="dopri5", rtol=case.tol, atol=case.tol / 100)
        if not INTERPS[case.interp][3]:
            kw["options"] = dict(jump_t=X.grid_points)
    else:
        kw = dict(method="rk4_classic", options=dict(step_size=case.step))
    if case.mode == "adjoint":
        kw["adjoint_params"] = tuple(vf.parameters())
        if case.solver == "rk4":
            kw["adjoint_options"] = dict(step_size=case.step)

    def forward():
        z0 = model.init(x0)
        return cdeint(X=X, func=vf, z0=z0, t=tt, adjoint=case.mode == "adjoint", **kw)[:, -1]

    return forward, {}


# ---------------------------------------------------------------------------------------------
# reference and running


def reference(s: Setup, interp, tol, log):
    """z(T) and the parameter gradient in float64: torchnde Dopri8, DirectAdjoint, rtol = tol,
    atol = tol / 100 (steps land on the knots); cross-checked against torchcde + torchdiffeq's dopri8
    at the same tolerance (z(T) only)."""
    ts, xs = make_data(s, torch.float64)
    m = make_model(s, torch.float64)
    path, X_cde, _ = paths(interp, ts, xs)
    term = tn.ControlTerm(lambda t, z, args: m.vf(t, z), path)
    ctrl = tn.PIDController(rtol=tol, atol=tol / 100, jump_ts=ts)
    z0 = m.init(xs[:, 0])
    sol = tn.solve(term, tn.Dopri8(), float(ts[0]), float(ts[-1]), z0, controller=ctrl, max_steps=MAX_STEPS)
    zT = sol.ys[-1]
    zT.pow(2).sum().backward()
    grad = torch.cat([p.grad.reshape(-1) for p in m.params]).clone()
    with torch.no_grad():
        z0 = m.init(xs[:, 0])
        zb = torchcde.cdeint(
            X=X_cde, func=m.vf, z0=z0, t=X_cde.interval, adjoint=False, method="dopri8", rtol=tol, atol=tol / 100,
            options=dict(jump_t=X_cde.grid_points),
        )[:, -1]  # fmt: skip
    diff = float((zb - zT.detach()).norm() / zT.detach().norm())
    note = f"{int(sol.stats['num_steps'])} Dopri8 steps; torchcde dopri8 at the same tolerance agrees to {diff:.1e}"
    log(f"  reference ({interp}): {note}")
    return zT.detach(), grad, note


@dataclass
class Row:
    case: Case
    lib: str
    label: str
    wall: float = math.nan
    wall_f: float = math.nan
    cpu: float = math.nan
    reps: int = 0
    nfe: int = 0  # forward + backward vector-field calls
    nfe_f: int = 0
    steps: int | None = None
    z_err: float = math.nan
    g_err: float = math.nan
    z_diff: float = math.nan  # relative difference of z(T) to torchcde's
    failure: str = ""


def one_run(model: Model, forward):
    for p in model.params:
        p.grad = None
    model.vf.calls = 0
    w0, c0 = time.perf_counter(), time.thread_time()
    zT = forward()
    loss = zT.pow(2).sum()
    w1 = time.perf_counter()
    nf = model.vf.calls
    loss.backward()
    w2, c2 = time.perf_counter(), time.thread_time()
    return (w2 - w0, w1 - w0, c2 - c0), nf, model.vf.calls, zT.detach()


LIBS = ("torchcde", "torchnde", "torchnde.compat.torchcde")


def run_case(s: Setup, case: Case, ref, timing, log):
    ts, xs = make_data(s)
    model = make_model(s)
    path, X_cde, X_compat = paths(case.interp, ts, xs)
    makers = {
        "torchcde": lambda: torchcde_make(model, X_cde, ts, xs, case),
        "torchnde": lambda: torchnde_make(model, path, ts, xs, case),
        "torchnde.compat.torchcde": lambda: torchcde_make(model, X_compat, ts, xs, case, cdeint=tn_cde.cdeint),
    }
    labels = {
        "torchcde": f"torchcde cdeint (adjoint={case.mode == 'adjoint'})",
        "torchnde": f"torchnde solve + {'DirectAdjoint' if case.mode == 'direct' else 'BacksolveAdjoint'}",
        "torchnde.compat.torchcde": f"torchnde.compat.torchcde cdeint (adjoint={case.mode == 'adjoint'})",
    }
    ref_z, ref_g = ref
    rows, fwds, zs = [], {}, {}
    for lib in LIBS:
        row = Row(case, lib, labels[lib])
        rows.append(row)
        if lib == "torchnde.compat.torchcde" and case.solver == "rk4":
            # the compat layer maps method="rk4" to torchdiffeq's 3/8 rule and knows no "rk4_classic"
            row.failure = "skipped: no classical RK4 by name in the compat layer ('rk4' is the 3/8 rule)"
            continue
        try:
            forward, info = makers[lib]()
            one_run(model, forward)  # warm-up
            _, nf, nt, zT = one_run(model, forward)
        except Exception as e:  # reported, not fatal
            row.failure = f"{type(e).__name__}: {str(e).splitlines()[0][:140]}"
            log(f"  {case.label:52s} {lib:26s} FAILED {row.failure}")
            continue
        row.nfe_f, row.nfe, row.steps = nf, nt, info.get("steps")
        g = torch.cat([p.grad.reshape(-1) for p in model.params]).double()
        row.z_err = float((zT.double() - ref_z).norm() / ref_z.norm())
        row.g_err = float((g - ref_g).norm() / ref_g.norm())
        zs[lib] = zT
        fwds[lib] = forward
    if "torchcde" in zs:
        for row in rows:
            if row.lib in zs:
                row.z_diff = float((zs[row.lib] - zs["torchcde"]).norm() / zs["torchcde"].norm())
    samples = {k: [] for k in fwds}
    start = time.perf_counter()
    for k in range(timing["max_rounds"]):
        for lib, forward in fwds.items():
            gc.collect()
            samples[lib].append(one_run(model, forward)[0])
        if k + 1 >= timing["min_rounds"] and time.perf_counter() - start > timing["budget"]:
            break
    for row in rows:
        if row.lib in samples:
            sm = samples[row.lib]
            row.wall = statistics.median(x[0] for x in sm)
            row.wall_f = statistics.median(x[1] for x in sm)
            row.cpu = statistics.median(x[2] for x in sm)
            row.reps = len(sm)
            log(
                f"  {case.label:52s} {row.label:50s} {row.wall * 1e3:8.1f} ms (CPU {row.cpu * 1e3:8.1f})  "
                f"NFE {row.nfe_f}+{row.nfe - row.nfe_f}  z err {row.z_err:.1e}  grad err {row.g_err:.1e}  "
                f"vs torchcde {row.z_diff:.1e}  (n={row.reps})"
            )
    return rows


# ---------------------------------------------------------------------------------------------
# report


def fmt_ms(s):
    if not math.isfinite(s):
        return "–"
    return f"{s * 1e3:.2f}" if s < 0.1 else f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def get(rows, case, lib):
    return next((r for r in rows if r.case == case and r.lib == lib and not r.failure), None)


def targets(rows, cases):
    """torchnde (native solve) >= 2x faster than torchcde fwd + bwd (CPU time), at equal accuracy:
    torchnde's z(T) error at most 1.5x torchcde's (or below 1e-6, float32 rounding level)."""
    out = []
    for c in cases:
        a, b = get(rows, c, "torchnde"), get(rows, c, "torchcde")
        if a is None or b is None:
            out.append((c.label, "not run", None))
            continue
        r = b.cpu / a.cpu
        acc = a.z_err <= max(1.5 * b.z_err, 1e-6)
        out.append(
            (c.label, f"{r:.2f}x; z(T) error {a.z_err:.1e} vs {b.z_err:.1e}{'' if acc else ' (less accurate)'}",
             r >= 2 and acc)
        )  # fmt: skip
    return out


def write_md(path, args, info, s: Setup, rows, cases, ref_notes, tgts, timing, elapsed):
    L = []
    L.append("# torchnde neural-CDE benchmark results")
    L.append("")
    L.append(
        f"Generated by `python benchmarks/cde.py{' --quick' if args.quick else ''}` in {elapsed[0]:.0f} s wall, "
        f"{elapsed[1]:.0f} s CPU of this process; 1-minute load average {elapsed[2]:.2f} at the start and "
        f"{elapsed[3]:.2f} at the end."
    )
    if args.quick:
        L.append("")
        L.append("**Quick (smoke-test) mode: small problem, few repeats. These numbers mean little.**")
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append("| | |")
    L.append("|---|---|")
    for k, v in info.items():
        L.append(f"| {k} | {v} |")
    L.append("")
    L.append("## Setup")
    L.append("")
    L.append(
        f"Batch {s.batch}, series length {s.length} (times 0, 1, ..., {s.length - 1}), {s.channels} channels "
        f"(time / {s.length - 1} and {s.channels - 1} noisy sinusoids of random frequency and phase), hidden size "
        f"{s.hidden}, float32. z(0) = Linear({s.channels}, {s.hidden})(x_0); dz = f(z) dX with f = "
        f"Linear({s.hidden}, {s.width})-tanh-Linear({s.width}, {s.hidden * s.channels})-tanh reshaped to "
        f"({s.hidden}, {s.channels}); loss = sum(z(T)^2); gradients for all parameters (f and the initial "
        "linear map). One shared, call-counting vector-field module; one process, one thread."
    )
    L.append("")
    L.append(
        "- torchcde: coefficients from `natural_cubic_coeffs`, `hermite_cubic_coefficients_with_backward_differences` "
        "or `linear_interpolation_coeffs`, then `CubicSpline` / `LinearInterpolation`; `cdeint(X, f, z0, "
        "X.interval, adjoint=..., method=...)` (torchdiffeq underneath). Dopri5: `rtol`, `atol`, and for the "
        "linear interpolation `options=dict(jump_t=X.grid_points)`. RK4: torchdiffeq's own `rk4` is the 3/8 rule, "
        "so the script registers classical RK4 (`rk4_classic`, from torchdiffeq's `rk4_step_func`; see "
        "`adjoints.py`) with `options=dict(step_size=h)` (and `adjoint_options` the same for the adjoint). "
        "Adjoint mode: `adjoint=True` with `adjoint_params` = the vector field's parameters.\n"
        "- torchnde: `solve(ControlTerm(lambda t, z, args: f(z), path), solver, t0, t1, z0, ...)` with `path` "
        "`torchnde.paths._interp.CubicSpline` / `HermiteCubic` / `LinearInterpolation(ts, xs)`; Dopri5 with "
        "`PIDController(rtol, atol)` (`jump_ts=ts` for the linear interpolation), or `RK4()` with `dt0=h`; "
        "`DirectAdjoint` (direct mode) or `BacksolveAdjoint` (adjoint mode).\n"
        "- torchnde.compat.torchcde: torchcde's code with the import changed (`cdeint` and the interpolation "
        "classes of `torchnde.compat.torchcde`, on torchcde's coefficients).\n"
        "- The interpolations are built once, outside the timed region (as when a data set is preprocessed); "
        "the timed region is z0, the solve, the loss and the backward pass."
    )
    L.append("")
    L.append(
        f"Time: median over n interleaved rounds (at least {timing['min_rounds']}) after a warm-up; the ratio "
        "'torchcde / this' divides thread CPU times (`time.thread_time`: other processes on a shared machine "
        "disturb it much less than wall time). NFE: vector-field calls forward + backward (one call evaluates "
        "the whole batch). Errors: relative L2 error of z(T) and of the parameter gradient against a float64 "
        "reference (torchnde Dopri8, DirectAdjoint, steps on the knots, at the tolerance below; cross-checked "
        "with torchcde + torchdiffeq dopri8). 'z(T) vs torchcde': relative difference between this row's z(T) "
        "and torchcde's."
    )
    L.append("")
    for interp, note in ref_notes.items():
        L.append(f"- reference, {interp}: {note}")
    L.append("")
    L.append("## Forward + backward")
    L.append("")
    L.append(
        "| case | method | fwd+bwd [ms] | of which fwd [ms] | CPU [ms] | n | NFE fwd + bwd | steps | z(T) error "
        "| grad error | z(T) vs torchcde | torchcde / this |"
    )
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in cases:
        base = get(rows, c, "torchcde")
        for r in (r for r in rows if r.case == c):
            if r.failure:
                L.append(f"| {c.label} | {r.label} | failed: {r.failure} | | | | | | | | | |")
                continue
            ratio = f"{base.cpu / r.cpu:.2f}x" if base and r.lib != "torchcde" else ""
            L.append(
                f"| {c.label} | {r.label} | {fmt_ms(r.wall)} | {fmt_ms(r.wall_f)} | {fmt_ms(r.cpu)} | {r.reps} | "
                f"{r.nfe_f} + {r.nfe - r.nfe_f} | {'' if r.steps is None else r.steps} | {r.z_err:.1e} | "
                f"{r.g_err:.1e} | {r.z_diff:.1e} | {ratio} |"
            )
    L.append("")
    L.append("## Target: torchnde >= 2x faster than torchcde (forward + backward) at equal accuracy")
    L.append("")
    L.append(
        "Equal accuracy: torchnde's z(T) error is at most 1.5x torchcde's (or below 1e-6, float32 rounding). "
        "Ratio of CPU times, torchnde's native `solve` against torchcde's `cdeint`."
    )
    L.append("")
    L.append("| case | torchcde / torchnde | met? |")
    L.append("|---|---|---|")
    for name, val, ok in tgts:
        L.append(f"| {name} | {val} | {'n/a' if ok is None else 'yes' if ok else '**no**'} |")
    L.append("")
    path.write_text("\n".join(L))


def profile_case(s: Setup, case: Case, log, reps=10):
    ts, xs = make_data(s)
    model = make_model(s)
    path, X_cde, _ = paths(case.interp, ts, xs)
    for lib, (forward, _) in (
        ("torchnde", torchnde_make(model, path, ts, xs, case)),
        ("torchcde", torchcde_make(model, X_cde, ts, xs, case)),
    ):
        title = f"cProfile of {reps} forward + backward runs, {lib}, {case.label}"
        log_profile(lambda i, forward=forward: one_run(model, forward), reps, title, log)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke mode: small problem, a few seconds")
    ap.add_argument("--out", type=Path, default=None, help="directory for cde.md")
    ap.add_argument("--profile", action="store_true", help="print cProfiles of one case")
    args = ap.parse_args(argv)
    if args.out is None:  # a smoke run must never overwrite the committed results
        args.out = Path(tempfile.mkdtemp(prefix="torchnde-cde-")) if args.quick else HERE
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    start, start_cpu, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    if args.quick:
        s = Setup(batch=16, length=20, channels=4, hidden=16, width=32)
        timing = dict(min_rounds=2, max_rounds=2, budget=0.0)
        tol, step, ref_tol = 1e-3, 1.0, 1e-8
    else:
        s = Setup(batch=128, length=64, channels=4, hidden=32, width=64)
        timing = dict(min_rounds=7, max_rounds=30, budget=3.0)
        tol, step, ref_tol = 1e-4, 0.5, 1e-10
    cases = []
    for interp in INTERPS:
        for mode in ("direct", "adjoint"):
            cases.append(Case(interp, "dopri5", mode, tol=tol))
            cases.append(Case(interp, "rk4", mode, step=step))
    info = machine_info(
        **{"torchcde / torchdiffeq": f"{getattr(torchcde, '__version__', '?')} / {torchdiffeq.__version__}"}
    )
    rows, ref_notes = [], {}
    for interp in INTERPS:
        z, g, note = reference(s, interp, ref_tol, log)
        ref_notes[interp] = note
        for c in (c for c in cases if c.interp == interp):
            rows += run_case(s, c, (z, g), timing, log)
    if args.profile:
        profile_case(s, Case("cubic spline", "dopri5", "direct", tol=tol), log)
    tgts = targets(rows, cases)
    elapsed = (time.perf_counter() - start, time.process_time() - start_cpu, load0, os.getloadavg()[0])
    write_md(args.out / "cde.md", args, info, s, rows, cases, ref_notes, tgts, timing, elapsed)
    log("targets (torchnde >= 2x faster than torchcde, fwd + bwd, at equal accuracy):")
    for name, val, ok in tgts:
        log(f"  [{'n/a' if ok is None else 'ok' if ok else 'MISS'}] {name}: {val}")
    log(f"wrote {args.out / 'cde.md'} ({elapsed[0]:.0f} s wall, {elapsed[1]:.0f} s CPU)")


if __name__ == "__main__":
    main()
