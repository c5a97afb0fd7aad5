"""Adjoint benchmarks: forward + backward time, peak memory and gradient error of torchnde's adjoints
against torchdiffeq (``odeint``, ``odeint_adjoint``) and torchode (``AutoDiffAdjoint``,
``BacksolveAdjoint``), in one process, single-threaded.

Usage::

    python benchmarks/adjoints.py               # full run (~6 minutes on 2 cores), writes adjoints.md + adjoints.png
    python benchmarks/adjoints.py --quick       # smoke mode (~15 s; writes to a temporary directory)
    python benchmarks/adjoints.py --out DIR     # write adjoints.md and adjoints.png into DIR
    python benchmarks/adjoints.py --profile     # also print cProfiles of the torchnde adjoints on (16, 2, 32)

Problem: the MLP neural ODE of ``run.py`` (float32), loss = sum of squares of y(1). Fixed steps
(classical RK4 with 10, 100 and 1000 steps over [0, 1]) and one adaptive case (Dopri5,
rtol = atol = 1e-6). Peak memory: the process's resident-set high-water mark (``VmHWM``), reset
before each measurement through ``/proc/self/clear_refs`` after ``malloc_trim``. See README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as fwd  # noqa: E402  (the forward benchmark: one thread, the MLP, step counting)
import torch  # noqa: E402
import torchdiffeq  # noqa: E402
import torchdiffeq._impl.fixed_grid as _tdq_fixed  # noqa: E402
import torchdiffeq._impl.rk_common as _tdq_rk  # noqa: E402
import torchode as to  # noqa: E402
from _common import log_profile, machine_info  # noqa: E402  (this folder, on sys.path)
from torchode.interpolation import ThirdOrderPolynomialInterpolation  # noqa: E402
from torchode.single_step_methods.runge_kutta import ButcherTableau as ToTableau  # noqa: E402
from torchode.single_step_methods.runge_kutta import ExplicitRungeKutta  # noqa: E402

import torchnde as tn  # noqa: E402

MAX_STEPS = 200_000
HAS_REVERSIBLE = hasattr(tn, "ReversibleAdjoint")
MiB = 2.0**20


# ---------------------------------------------------------------------------------------------
# classical RK4 in torchdiffeq and torchode (so all three libraries take exactly the same steps)


class _TdqClassicRK4(_tdq_fixed.RK4):
    """torchdiffeq's ``method="rk4"`` is the 3/8 rule; this is the classical RK4 from its own
    ``rk4_step_func`` (same cost: four evaluations per step)."""

    def _step_func(self, func, t0, dt, t1, y0):
        f0 = func(t0, y0)
        return _tdq_rk.rk4_step_func(func, t0, dt, t1, y0, f0=f0), f0


# (the module, not the function of the same name that torchdiffeq._impl exports)
sys.modules["torchdiffeq._impl.odeint"].SOLVERS["rk4_classic"] = _TdqClassicRK4


class ToRK4(ExplicitRungeKutta):
    """Classical RK4 for torchode (it ships Euler, Heun, Dopri5 and Tsit5), built like its own Heun:
    its ``ExplicitRungeKutta`` with a Butcher tableau (the Euler row only fills the error slot)."""

    TABLEAU = ToTableau.from_lists(
        c=[0.0, 0.5, 0.5, 1.0],
        a=[[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]],
        b=[1 / 6, 1 / 3, 1 / 3, 1 / 6],
        b_low_order=[1.0, 0.0, 0.0, 0.0],
    )

    def __init__(self, term=None):
        super().__init__(term, ToRK4.TABLEAU)

    def convergence_order(self):
        return 4

    def build_interpolation(self, data):
        return ThirdOrderPolynomialInterpolation.from_k(data.t0, data.dt, data.y0, data.y1, data.k)


# ---------------------------------------------------------------------------------------------
# peak memory


def _status_kib(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


class PeakRSS:
    """Peak resident memory of this process inside a block, in bytes above the level at its start.

    ``start()``: ``gc.collect()``, then glibc ``malloc_trim(0)`` (hands freed heap pages back to the
    kernel, so memory freed by earlier runs cannot hide new allocations), then ``5`` is written to
    ``/proc/self/clear_refs``, which resets the kernel's resident-set high-water mark (``VmHWM``) to
    the current resident set (``VmRSS``). ``peak()``: ``VmHWM`` now minus ``VmRSS`` at the start.
    It counts everything the run allocates: tensors, the autograd graph, Python objects, allocator
    slack; at page (4 KiB) granularity.
    """

    def __init__(self):
        self.base = 0
        self.problem = None
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            if _status_kib("VmHWM:") > _status_kib("VmRSS:") + 64:
                self.problem = "writing 5 to /proc/self/clear_refs did not reset VmHWM"
        except OSError as e:  # not Linux/glibc, or /proc not writable
            self.problem = f"{type(e).__name__}: {e}"

    @property
    def ok(self):
        return self.problem is None

    def start(self):
        if not self.ok:
            return
        gc.collect()
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        self.base = _status_kib("VmRSS:")

    def peak(self):
        if not self.ok:
            return math.nan
        return (_status_kib("VmHWM:") - self.base) * 1024.0


def validate_meter(meter: PeakRSS, log, big_mib=64):
    """Known allocations through the meter: (label, expected bytes, measured bytes)."""
    out = []
    # 1. many small tensors (16 KiB each), the size class of the (16, 2, 32) activations
    n = int(big_mib * MiB // (64 * 64 * 4))
    meter.start()
    xs = [torch.empty(64, 64).fill_(1.0) for _ in range(n)]
    del xs
    out.append((f"{n} tensors of 16 KiB, filled and freed", n * 64 * 64 * 4, meter.peak()))
    # 2. after a larger batch of small tensors was allocated and freed (the allocator keeps such
    #    memory unless trimmed): a smaller batch must still show up in full
    junk = [torch.empty(64, 64).fill_(1.0) for _ in range(2 * n)]
    del junk
    meter.start()
    xs = [torch.empty(64, 64).fill_(1.0) for _ in range(n // 2)]
    del xs
    out.append((f"{n // 2} tensors of 16 KiB after {2 * n} were freed", n // 2 * 64 * 64 * 4, meter.peak()))
    # 3. a few large tensors (mmap-sized)
    k = max(1, big_mib // 16)
    meter.start()
    xs = [torch.empty(4 * 2**20).fill_(1.0) for _ in range(k)]
    del xs
    out.append((f"{k} tensors of 16 MiB", k * 16 * MiB, meter.peak()))
    for label, exp, got in out:
        log(f"  meter check: {label}: expected {exp / MiB:.1f} MiB, measured {got / MiB:.1f} MiB ({got / exp:.2f}x)")
    return out


# ---------------------------------------------------------------------------------------------
# the problem


class VF(torch.nn.Module):
    """``f(t, y) = MLP(y)``, counting calls; one object shared by all libraries (torchnde calls it with
    ``args``, torchode's backsolve through ``torch.func.functional_call`` on single samples)."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp
        self.calls = 0

    def forward(self, t, y, *args):
        self.calls += 1
        return self.mlp(y)


@dataclass
class Ctx:
    shape: tuple
    f: VF
    y0: torch.Tensor
    params: list
    ref_grad: torch.Tensor = None  # float64
    ref_y1: torch.Tensor = None
    ref_note: str = ""


def make_ctx(shape, dtype=torch.float32):
    batch, dim, width = shape
    mlp = fwd.make_mlp(dim, width).to(dtype)
    mlp.requires_grad_(True)
    torch.manual_seed(fwd.Y0_SEED)
    y0 = torch.randn(batch, dim).to(dtype)
    f = VF(mlp)
    return Ctx(shape, f, y0, list(f.parameters()))


def flat_grad(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


def reference(ctx: Ctx, tol, log):
    """Parameter gradient and y(1) of the exact solution, in float64: torchnde Dopri8 with
    DirectAdjoint at rtol = atol = tol, cross-checked against torchdiffeq's dopri8 odeint_adjoint
    (an independent implementation and method) at the same tolerance."""
    c = make_ctx(ctx.shape, torch.float64)
    s = time.perf_counter()
    sol = tn.solve(
        tn.ODETerm(c.f),
        tn.Dopri8(),
        0.0,
        1.0,
        c.y0,
        controller=tn.PIDController(rtol=tol, atol=tol),
        adjoint=tn.DirectAdjoint(),
        max_steps=MAX_STEPS,
    )
    y1 = sol.ys[-1]
    y1.pow(2).sum().backward()
    g = flat_grad(c.params).clone()
    t_a = time.perf_counter() - s
    steps = sol.stats["num_steps"]
    for p in c.params:
        p.grad = None
    s = time.perf_counter()
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y1b = torchdiffeq.odeint_adjoint(c.f, c.y0, ts, rtol=tol, atol=tol, method="dopri8")[-1]
    y1b.pow(2).sum().backward()
    gb = flat_grad(c.params)
    t_b = time.perf_counter() - s
    dg = float((g - gb).norm() / g.norm())
    dy = float((y1.detach() - y1b.detach()).norm() / y1.detach().norm())
    ctx.ref_grad, ctx.ref_y1 = g, y1.detach()
    ctx.ref_note = (
        f"torchnde Dopri8 + DirectAdjoint, float64, rtol = atol = {tol:g} ({steps} steps, {t_a:.1f} s); "
        f"torchdiffeq dopri8 odeint_adjoint at the same tolerance ({t_b:.1f} s) agrees to {dg:.1e} "
        f"(gradient) and {dy:.1e} (y(1)), relative L2"
    )
    log(f"  {ctx.shape} reference: {ctx.ref_note}")


# ---------------------------------------------------------------------------------------------
# methods: make(ctx, case) -> forward() returning (y(1), info() -> {"steps_f", "steps_b"})


@dataclass(frozen=True)
class Case:
    kind: str  # "fixed" | "adaptive"
    n: int = 0  # fixed: number of RK4 steps
    tol: float = 0.0  # adaptive: rtol = atol

    @property
    def label(self):
        return f"RK4, {self.n} steps" if self.kind == "fixed" else f"Dopri5, tol {self.tol:g}"


def torchnde_make(adjoint_factory):
    def make(ctx: Ctx, case: Case):
        term = tn.ODETerm(ctx.f)
        adjoint = adjoint_factory()
        if case.kind == "fixed":
            solver, kw = tn.RK4(), dict(dt0=1.0 / case.n)
        else:
            solver, kw = tn.Dopri5(), dict(controller=tn.PIDController(rtol=case.tol, atol=case.tol))
        y0 = ctx.y0

        def forward():
            sol = tn.solve(term, solver, 0.0, 1.0, y0, adjoint=adjoint, max_steps=MAX_STEPS, **kw)
            return sol.ys[-1], lambda: {"steps_f": int(sol.stats["num_steps"]), "steps_b": None}

        return forward

    return make


def torchdiffeq_make(adjoint, seminorm=False):
    def make(ctx: Ctx, case: Case):
        f, y0 = ctx.f, ctx.y0
        ts = torch.tensor([0.0, 1.0], dtype=y0.dtype)
        odeint = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
        if case.kind == "fixed":
            kw = dict(method="rk4_classic", options=dict(step_size=1.0 / case.n))
        else:
            kw = dict(method="dopri5", rtol=case.tol, atol=case.tol)
            if seminorm:
                kw["adjoint_options"] = dict(norm="seminorm")

        def forward():
            y1 = odeint(f, y0, ts, **kw)[-1]
            steps = case.n if case.kind == "fixed" else None  # adaptive: counted in the stats run
            return y1, lambda: {"steps_f": steps, "steps_b": steps if adjoint else None}

        return forward

    return make


def torchode_make(backsolve):
    def make(ctx: Ctx, case: Case):
        y0 = ctx.y0
        B = y0.shape[0]
        term = to.ODETerm(ctx.f)
        if case.kind == "fixed":
            step = ToRK4(term=term)
            ctrl = to.FixedStepController()
            dt0 = torch.full((B,), 1.0 / case.n, dtype=y0.dtype)
        else:
            step = to.Dopri5(term=term)
            ctrl = to.IntegralController(atol=case.tol, rtol=case.tol, term=term)
            dt0 = None
        if backsolve:
            adj = to.BacksolveAdjoint(term, step, ctrl)
        else:
            adj = to.AutoDiffAdjoint(step, ctrl, max_steps=MAX_STEPS)
        t_start = torch.zeros(B, dtype=y0.dtype)
        t_end = torch.ones(B, dtype=y0.dtype)

        def forward():
            sol = adj.solve(to.InitialValueProblem(y0, t_start, t_end), dt0=dt0)

            def info():
                back = sol.stats.get("backsolve")
                return {
                    "steps_f": int(sol.stats["n_steps"].max()),
                    "steps_b": int(back[-1]["n_steps"].max()) if back else None,
                }

            return sol.ys[:, -1], info

        return forward

    return make


@dataclass(frozen=True)
class Method:
    label: str
    lib: str
    make: callable
    adaptive_only: bool = False


def methods():
    ms = [
        Method("torchnde Direct", "torchnde", torchnde_make(tn.DirectAdjoint)),
        Method("torchnde Checkpoint", "torchnde", torchnde_make(tn.CheckpointAdjoint)),
        Method("torchnde Backsolve", "torchnde", torchnde_make(tn.BacksolveAdjoint)),
    ]
    if HAS_REVERSIBLE:
        ms.append(Method("torchnde Reversible", "torchnde", torchnde_make(tn.ReversibleAdjoint)))
    ms += [
        Method("torchdiffeq odeint", "torchdiffeq", torchdiffeq_make(False)),
        Method("torchdiffeq odeint_adjoint", "torchdiffeq", torchdiffeq_make(True)),
        Method("torchdiffeq odeint_adjoint seminorm", "torchdiffeq", torchdiffeq_make(True, True), adaptive_only=True),
        Method("torchode AutoDiff", "torchode", torchode_make(False)),
        Method("torchode Backsolve", "torchode", torchode_make(True)),
    ]
    return ms


BASE = "torchdiffeq odeint_adjoint"
PAGE = 4096.0
FLAT_FLOOR = 0.1 * MiB  # below this, differences in peak memory are page-granularity noise


# ---------------------------------------------------------------------------------------------
# running


@dataclass
class Row:
    shape: tuple
    case: Case
    label: str
    lib: str
    failure: str = ""  # non-empty: the method raised
    wall: float = math.nan  # median forward + backward wall time
    wall_f: float = math.nan  # ... of which the forward (solve + loss)
    cpu: float = math.nan  # median thread CPU time
    reps: int = 0
    nfe_f: int = 0
    nfe_b: int = 0
    steps_f: int | None = None
    steps_b: int | None = None
    peaks: list = field(default_factory=list)  # bytes, one per memory run
    grad_err: float = math.nan  # relative L2 error of the parameter gradient vs the float64 reference
    y_err: float = math.nan  # relative L2 error of y(1)
    grad: torch.Tensor | None = field(default=None, repr=False)
    same_scheme: float = math.nan  # Reversible only: relative difference to DirectAdjoint on the same scheme

    @property
    def peak(self):
        """Median peak memory over the memory runs (bytes)."""
        return statistics.median(self.peaks) if self.peaks else math.nan


def one_run(ctx: Ctx, forward):
    """One forward + backward: (wall, forward wall, thread CPU, NFE forward, NFE backward, y1, info)."""
    for p in ctx.params:
        p.grad = None
    ctx.f.calls = 0
    w0, c0 = time.perf_counter(), time.thread_time()
    y1, info = forward()
    loss = y1.pow(2).sum()
    w1 = time.perf_counter()
    nf = ctx.f.calls
    loss.backward()
    w2, c2 = time.perf_counter(), time.thread_time()
    return w2 - w0, w1 - w0, c2 - c0, nf, ctx.f.calls - nf, y1.detach(), info


def stats_run(ctx: Ctx, row: Row, forward, meter: PeakRSS):
    """Untimed-for-the-table run: peak memory, NFE, steps, gradient and its error."""
    with fwd.count_torchdiffeq_steps() as box:
        meter.start()
        box["steps"] = 0
        wall, wall_f, cpu, nf, nb, y1, info = one_run(ctx, forward)
        row.peaks = [meter.peak()]
    info = info()
    row.nfe_f, row.nfe_b = nf, nb
    row.steps_f, row.steps_b = info["steps_f"], info["steps_b"]
    if row.lib == "torchdiffeq" and row.case.kind == "adaptive":
        # box counts every adaptive RK step of this run; split forward/backward by re-running the forward
        total = box["steps"]
        with fwd.count_torchdiffeq_steps() as box2, torch.no_grad():
            forward()
        row.steps_f = box2["steps"]
        row.steps_b = total - box2["steps"] if row.label != "torchdiffeq odeint" else None
    row.grad = flat_grad(ctx.params).double().clone()
    row.grad_err = float((row.grad - ctx.ref_grad).norm() / ctx.ref_grad.norm())
    row.y_err = float((y1.double() - ctx.ref_y1).norm() / ctx.ref_y1.norm())
    if row.label == "torchnde Reversible":
        g = reversible_direct_grad(ctx, row.case)
        row.same_scheme = float((row.grad - g).norm() / g.norm())
    return wall, wall_f, cpu


def reversible_direct_grad(ctx: Ctx, case: Case):
    """The gradient DirectAdjoint gets by backpropagating through the *same* reversible scheme that
    ReversibleAdjoint runs (torchnde's private wrapper class), i.e. the exact gradient of the computed
    solution that ReversibleAdjoint should reproduce."""
    from torchnde.adjoints._reversible import _AdaptiveReversible, _Reversible

    lam = tn.ReversibleAdjoint().l
    if case.kind == "fixed":
        solver, kw = _Reversible(tn.RK4(), lam), dict(dt0=1.0 / case.n)
    else:
        kw = dict(controller=tn.PIDController(rtol=case.tol, atol=case.tol))
        solver = _AdaptiveReversible(tn.Dopri5(), lam)
    for p in ctx.params:
        p.grad = None
    sol = tn.solve(tn.ODETerm(ctx.f), solver, 0.0, 1.0, ctx.y0, adjoint=tn.DirectAdjoint(), max_steps=MAX_STEPS, **kw)
    sol.ys[-1].pow(2).sum().backward()
    return flat_grad(ctx.params).double().clone()


def run_case(ctx: Ctx, case: Case, ms, timing, log):
    """Stats run of every method, then interleaved timing rounds. Returns rows."""
    meter = timing["meter"]
    rows, fwds = [], {}
    for m in ms:
        row = Row(ctx.shape, case, m.label, m.lib)
        rows.append(row)
        try:
            forward = m.make(ctx, case)
            wall, wall_f, cpu = stats_run(ctx, row, forward, meter)
            if wall < timing["mem_repeat_below"]:  # more memory runs: the peak is the median
                for _ in range(timing["mem_runs"] - 1):
                    meter.start()
                    one_run(ctx, forward)
                    row.peaks.append(meter.peak())
        except Exception as e:  # a method that cannot do this case: reported, not fatal
            row.failure = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            log(f"  {str(ctx.shape):14s} {case.label:20s} {m.label:36s} FAILED {row.failure}")
            continue
        if wall > timing["single_run"]:  # too slow to repeat: the stats run's time is the result
            row.wall, row.wall_f, row.cpu, row.reps = wall, wall_f, cpu, 1
        else:
            fwds[m.label] = forward
    # interleaved rounds
    samples = {k: [] for k in fwds}
    start = time.perf_counter()
    for k in range(timing["max_rounds"]):
        for label, forward in fwds.items():
            gc.collect()
            res = one_run(ctx, forward)
            samples[label].append(res[:3])
            # drop this run's solution (and graph) now, outside the timer: a live graph of one method
            # must not slow down the next one (e.g. through the garbage collector)
            del res
        if k + 1 >= timing["min_rounds"] and time.perf_counter() - start > timing["budget"]:
            break
    for row in rows:
        if row.label in samples:
            s = samples[row.label]
            row.wall = statistics.median(x[0] for x in s)
            row.wall_f = statistics.median(x[1] for x in s)
            row.cpu = statistics.median(x[2] for x in s)
            row.reps = len(s)
        if not row.failure:
            log(
                f"  {str(ctx.shape):14s} {case.label:20s} {row.label:36s} {row.wall * 1e3:9.1f} ms "
                f"(fwd {row.wall_f * 1e3:8.1f})  peak {row.peak / MiB:8.2f} MiB  NFE {row.nfe_f:5d}+{row.nfe_b:5d}  "
                f"steps {row.steps_f}/{row.steps_b}  grad err {row.grad_err:.2e}  y err {row.y_err:.1e}  (n={row.reps})"
            )
    return rows


def warm_up(ctx, case, ms):
    for m in ms:
        with contextlib.suppress(Exception):
            one_run(ctx, m.make(ctx, case))


# ---------------------------------------------------------------------------------------------
# independent check of the memory meter: a fresh process and its ru_maxrss


def child_main(spec):
    """Run in a fresh process: warm up at 10 steps, then one forward + backward of ``spec``; print the
    peak as JSON: the kernel's high-water mark since exec (``VmHWM``, never reset here) after the run
    minus ``VmRSS`` before it. (``ru_maxrss`` would not do: Linux carries it over from the parent's
    image across fork + exec.)"""
    shape, label, n = tuple(spec["shape"]), spec["method"], spec["n"]
    m = next(m for m in methods() if m.label == label)
    ctx = make_ctx(shape)
    warm = m.make(ctx, Case("fixed", 10))
    for _ in range(2):
        one_run(ctx, warm)
    forward = m.make(ctx, Case("fixed", n))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss0, hwm0 = _status_kib("VmRSS:"), _status_kib("VmHWM:")
    one_run(ctx, forward)
    hwm1 = _status_kib("VmHWM:")
    # capped: the warm-up (or import) peak was higher than this run's, so the reading is a lower bound
    print(json.dumps({"peak": (hwm1 - rss0) * 1024.0, "capped": hwm1 == hwm0}))


def child_check(specs, rows, log):
    """[(shape, method, n, child peak, in-process peak)]."""
    out = []
    for shape, label, n in specs:
        spec = json.dumps({"shape": list(shape), "method": label, "n": n})
        res = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", spec], capture_output=True, text=True, check=True
        )
        child = json.loads(res.stdout.strip().splitlines()[-1])
        mine = next(r.peak for r in rows if r.shape == shape and r.label == label and r.case == Case("fixed", n))
        out.append((shape, label, n, child["peak"], mine, child["capped"]))
        log(
            f"  fresh-process check {shape} {label} {n} steps: {child['peak'] / MiB:.1f} MiB vs {mine / MiB:.1f} MiB"
            + (" (capped: lower bound)" if child["capped"] else "")
        )
    return out


# ---------------------------------------------------------------------------------------------
# targets


def _get(rows, shape, label, case):
    return next((r for r in rows if r.shape == shape and r.label == label and r.case == case and not r.failure), None)


def growth(rows, shape, label, n_lo, n_hi):
    lo = _get(rows, shape, label, Case("fixed", n_lo))
    hi = _get(rows, shape, label, Case("fixed", n_hi))
    if lo is None or hi is None:
        return math.nan
    return max(hi.peak, PAGE) / max(lo.peak, PAGE)  # a reading of 0 means "less than one page"


def targets(rows, shapes, ns):
    """[(target, where, value text, ok or None)]."""
    out = []
    n1, n10, n100 = ns[0], ns[1], ns[-1]
    for shape in shapes:
        for label in ("torchnde Reversible", "torchnde Backsolve"):
            if label == "torchnde Reversible" and not HAS_REVERSIBLE:
                out.append(("Reversible peak memory flat (<= 1.2x) for 100x steps", str(shape), "not available", None))
                continue
            g = growth(rows, shape, label, n1, n100)
            lo = _get(rows, shape, label, Case("fixed", n1))
            hi = _get(rows, shape, label, Case("fixed", n100))
            d = (hi.peak - lo.peak) if lo and hi else math.nan
            out.append(
                (
                    f"{label.split()[1]} peak memory flat (<= 1.2x, or <= {FLAT_FLOOR / MiB:g} MiB more) for "
                    f"{n100 // n1}x steps",
                    str(shape),
                    f"{g:.2f}x ({fmt_mib(lo.peak) if lo else '?'} -> {fmt_mib(hi.peak) if hi else '?'} MiB)",
                    g <= 1.2 or d <= FLAT_FLOOR,
                )
            )
        gd = growth(rows, shape, "torchnde Direct", n10, n100)
        gc_ = growth(rows, shape, "torchnde Checkpoint", n10, n100)
        ratio = n100 / n10
        e_c = math.log(gc_) / math.log(ratio) if gc_ > 0 else math.nan
        e_d = math.log(gd) / math.log(ratio) if gd > 0 else math.nan
        out.append(
            (
                f"Checkpoint memory sub-linear ({n10} -> {n100} steps: growth exponent <= 0.75)",
                str(shape),
                f"x{gc_:.1f}, exponent {e_c:.2f} (Direct: x{gd:.1f}, exponent {e_d:.2f})",
                e_c <= 0.75,
            )
        )
    cases = [Case("fixed", n) for n in ns] + [c for c in dict.fromkeys(r.case for r in rows) if c.kind == "adaptive"]
    for shape in shapes:
        for case in cases:
            d = _get(rows, shape, "torchnde Direct", case)
            r = _get(rows, shape, "torchnde Reversible", case) if HAS_REVERSIBLE else None
            if d is None:
                continue
            if r is None:
                out.append(
                    (
                        "Reversible fwd+bwd <= 1.5x Direct, equal gradients",
                        f"{shape} {case.label}",
                        "not available",
                        None,
                    )
                )
                continue
            t = r.wall / d.wall
            same = r.grad_err <= 2 * d.grad_err
            out.append(
                (
                    "Reversible fwd+bwd <= 1.5x Direct, equal gradients",
                    f"{shape} {case.label}",
                    f"{t:.2f}x; grad err {r.grad_err:.1e} vs Direct's {d.grad_err:.1e}; "
                    f"vs DirectAdjoint on the same reversible scheme: {r.same_scheme:.1e}",
                    t <= 1.5 and same,
                )
            )
    labels = ["torchnde Direct", "torchnde Checkpoint", "torchnde Backsolve"] + (
        ["torchnde Reversible"] if HAS_REVERSIBLE else []
    )
    for shape in shapes:
        for case in cases:
            base = _get(rows, shape, BASE, case)
            if base is None:
                continue
            for label in labels:
                r = _get(rows, shape, label, case)
                if r is None:
                    continue
                sp = base.wall / r.wall
                eq = r.grad_err <= 1.25 * base.grad_err
                out.append(
                    (
                        f"{label.split()[1]} >= 2x faster than odeint_adjoint at equal or better gradient error",
                        f"{shape} {case.label}",
                        f"{sp:.2f}x; grad err {r.grad_err:.1e} vs {base.grad_err:.1e}",
                        sp >= 2 and eq,
                    )
                )
    return out


# ---------------------------------------------------------------------------------------------
# report


def fmt_ms(s):
    if not math.isfinite(s):
        return "–"
    return f"{s * 1e3:.2f}" if s < 0.1 else (f"{s * 1e3:.1f}" if s < 1 else f"{s * 1e3:.0f}")


def fmt_mib(b):
    if not math.isfinite(b):
        return "–"
    x = b / MiB
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def fmt_range(r: Row):
    if len(r.peaks) < 2:
        return ""
    return f"{fmt_mib(min(r.peaks))}–{fmt_mib(max(r.peaks))}"


def fmt_steps(r: Row):
    f = "?" if r.steps_f is None else str(r.steps_f)
    return f if r.steps_b is None else f"{f} / {r.steps_b}"


def write_md(path, args, info, rows, shapes, ns, tol, meter_checks, child_checks, ref_notes, tgts, elapsed, skipped):
    L = []
    L.append("# torchnde adjoint benchmark")
    L.append("")
    L.append(
        f"Generated by `python benchmarks/adjoints.py{' --quick' if args.quick else ''}` in {elapsed[0]:.0f} s wall, "
        f"{elapsed[1]:.0f} s CPU of this process; 1-minute load average {elapsed[2]:.2f} at the start and "
        f"{elapsed[3]:.2f} at the end."
    )
    if args.quick:
        L.append("")
        L.append("**Quick (smoke-test) mode: small step counts, one round. These numbers mean nothing.**")
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append("| | |")
    L.append("|---|---|")
    for k, v in info.items():
        L.append(f"| {k} | {v} |")
    L.append(f"| torchnde ReversibleAdjoint | {'yes' if HAS_REVERSIBLE else 'not in this version'} |")
    L.append("")
    L.append("## Setup")
    L.append("")
    L.append(
        "- **Problem.** The MLP neural ODE of `run.py`: f(t, y) = MLP(y), Linear(dim, width)-tanh-Linear(width, "
        f"width)-tanh-Linear(width, dim), seed {fwd.MLP_SEED}, hidden weights x{fwd.HIDDEN_GAIN:g}, output layer "
        f"x{fwd.OUT_SCALE:g}, y0 ~ N(0, 1) (seed {fwd.Y0_SEED}); float32; t in [0, 1]; loss = sum(y(1)^2); "
        "gradients with respect to all MLP parameters. One process, one thread, one call-counting `nn.Module` "
        "shared by all libraries; solver, controller and adjoint objects built once outside the timed region."
    )
    L.append(
        f"- **Fixed steps.** Classical RK4 with {', '.join(map(str, ns))} steps (h = 1/steps) in every library: "
        "torchnde `RK4()` with `dt0` (`ConstantStepSize`); torchdiffeq `odeint`/`odeint_adjoint` with a "
        "registered method that runs its own classical `rk4_step_func` on its fixed grid (its built-in "
        '`"rk4"` is the 3/8 rule; the cost per step is the same), `options=dict(step_size=h)`; torchode '
        "`FixedStepController` with RK4 built from its `ExplicitRungeKutta` and a Butcher tableau (it ships no "
        "RK4), `dt0 = h`. The backward solves of the continuous adjoints use the same fixed step."
    )
    L.append(
        f"- **Adaptive.** Dopri5 at rtol = atol = {tol:g}: torchnde `Dopri5()` + `PIDController` "
        "(BacksolveAdjoint: same controller backwards, seminorm on by default); torchdiffeq "
        '`method="dopri5"` (odeint_adjoint: its default full norm, and a second row with '
        '`adjoint_options=dict(norm="seminorm")`); torchode `Dopri5` + `IntegralController` (per-sample '
        "steps, as always in torchode; `AutoDiffAdjoint` with its default `backprop_through_step_size_control"
        "=True`)."
    )
    L.append(
        "- **torchnde adjoints.** `DirectAdjoint()`, `CheckpointAdjoint()` (sqrt(steps) segments), "
        "`BacksolveAdjoint()`" + (", `ReversibleAdjoint()`" if HAS_REVERSIBLE else "") + ", all with defaults."
    )
    L.append(
        "- **Time.** Forward (solve + loss) + `loss.backward()`, wall clock: median over n interleaved rounds "
        "(each round runs every method once, `gc.collect()` before each run, outside the timer). The first, "
        "untimed run of each method and case (below) also serves as its warm-up; before the first case of a "
        "shape every method runs once at the smallest step count. A method whose first run takes more than "
        "a few seconds is not repeated (n = 1). CPU = thread CPU time."
    )
    L.append(
        "- **NFE.** Calls of the vector field in the forward pass + in the backward pass (one call evaluates "
        "the whole batch; torchode's backsolve calls it once per stage under `vmap`). **Steps**: forward / "
        "backward where the library reports them (torchdiffeq adaptive: counted by wrapping its RK step)."
    )
    L.append(
        "- **Gradient error.** ||g - g_ref|| / ||g_ref|| over all parameter gradients, g_ref from a float64 "
        "copy of the same MLP: " + "; ".join(f"{s}: {n}" for s, n in ref_notes.items()) + ". So the error "
        "includes the discretisation error of the method (at 10 RK4 steps it dominates), float32 rounding and, "
        "for continuous adjoints, the error of solving the adjoint equation. **y(1) error**: the same for the "
        "forward solution."
    )
    L.append("")
    L.append("### How peak memory is measured")
    L.append("")
    L.append(
        "On the CPU, torch allocates tensors with `malloc`, and neither `tracemalloc` (Python objects only) "
        "nor a torch allocator counter (the CPU allocator keeps none; `torch.profiler`'s memory events were "
        "both slow and gave a zero peak in a test) sees the whole picture. So the benchmark measures what the "
        "operating system sees: before each measured run it calls `gc.collect()`, then glibc `malloc_trim(0)` "
        "(memory freed by earlier runs goes back to the kernel, so it cannot silently absorb the next run's "
        "allocations), then writes `5` to `/proc/self/clear_refs`, which resets the kernel's resident-set "
        "high-water mark `VmHWM` to the current resident set. Peak = `VmHWM` after forward + backward "
        "minus `VmRSS` before. This counts everything the run keeps alive at its peak: saved tensors, "
        "autograd nodes, Python objects and allocator slack, at 4 KiB page granularity (so sub-MiB values "
        "carry roughly +-0.1 MiB of noise). The peak is taken from one separate run per method and case "
        "(the same run gives NFE, steps and the gradient)."
    )
    L.append("")
    L.append("Validation:")
    L.append("")
    for label, exp, got in meter_checks:
        L.append(f"- {label}: expected {exp / MiB:.1f} MiB, measured {got / MiB:.1f} MiB ({got / exp:.2f}x).")
    for shape in shapes:
        g1 = growth(rows, shape, "torchnde Direct", ns[1], ns[-1])
        g2 = growth(rows, shape, "torchdiffeq odeint", ns[1], ns[-1])
        L.append(
            f"- Backpropagation through the solver must grow linearly with the steps: from {ns[1]} to {ns[-1]} "
            f"steps ({ns[-1] // ns[1]}x) at {shape}, torchnde Direct grows x{g1:.1f} and torchdiffeq odeint "
            f"x{g2:.1f}."
        )
    for shape, label, n, child, mine, capped in child_checks:
        L.append(
            f"- Independent check in a fresh process (no `clear_refs`: `VmHWM` since exec after the run minus "
            f"`VmRSS` before it, after a warm-up at 10 steps): {label} at {shape}, {n} steps: {child / MiB:.1f} MiB"
            + (" (a lower bound: the warm-up peak was higher)" if capped else "")
            + f", against {mine / MiB:.1f} MiB here ({child / mine:.2f}x)."
        )
    L.append("")

    # main tables
    L.append("## Results")
    L.append("")
    L.append(
        f"Ratios are against **{BASE}** in the same case: time = its time / this time (> 1: faster than it), "
        "memory = this peak / its peak (< 1: less memory)."
    )
    if skipped:
        L.append("")
        for s in skipped:
            L.append(f"- {s}")
    for shape in shapes:
        L.append("")
        L.append(f"### {shape} (batch, dim, width)")
        L.append("")
        L.append(
            "| case | method | fwd+bwd [ms] | of which fwd [ms] | CPU [ms] | n | NFE fwd + bwd | steps fwd / bwd "
            "| peak [MiB] | (min–max) | grad error | y(1) error | time ratio | memory ratio |"
        )
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for case in dict.fromkeys(r.case for r in rows if r.shape == shape):
            base = _get(rows, shape, BASE, case)
            for r in (r for r in rows if r.shape == shape and r.case == case):
                if r.failure:
                    L.append(f"| {case.label} | {r.label} | failed: {r.failure} | | | | | | | | | | | |")
                    continue
                tr = f"{base.wall / r.wall:.2f}x" if base else ""
                mr = f"{r.peak / base.peak:.2f}" if base and base.peak > 0 else ""
                L.append(
                    f"| {case.label} | {r.label} | {fmt_ms(r.wall)} | {fmt_ms(r.wall_f)} | {fmt_ms(r.cpu)} | {r.reps} "
                    f"| {r.nfe_f} + {r.nfe_b} | {fmt_steps(r)} | {fmt_mib(r.peak)} | {fmt_range(r)} | {r.grad_err:.1e} | "
                    f"{r.y_err:.1e} | {tr} | {mr} |"
                )
    # scaling summary
    L.append("")
    L.append(f"## Scaling with the number of steps (RK4, {' -> '.join(map(str, ns))} steps)")
    L.append("")
    L.append("![time and memory against steps](adjoints.png)")
    L.append("")
    hdr_t = " | ".join(f"{n} steps [ms]" for n in ns)
    hdr_m = " | ".join(f"{n} steps [MiB]" for n in ns)
    L.append(f"| shape | method | {hdr_t} | {hdr_m} | memory growth {ns[0]} -> {ns[-1]} |")
    L.append("|---|---|" + "---:|" * (2 * len(ns) + 1))
    labels = list(dict.fromkeys(r.label for r in rows if r.case.kind == "fixed"))
    for shape in shapes:
        for label in labels:
            rs = [_get(rows, shape, label, Case("fixed", n)) for n in ns]
            ts = " | ".join(fmt_ms(r.wall) if r else "–" for r in rs)
            ms_ = " | ".join(fmt_mib(r.peak) if r else "–" for r in rs)
            g = growth(rows, shape, label, ns[0], ns[-1])
            L.append(f"| {shape} | {label} | {ts} | {ms_} | {'–' if not math.isfinite(g) else f'x{g:.1f}'} |")
    L.append("")
    # targets
    L.append("## Targets")
    L.append("")
    L.append(
        "Equal gradients (Reversible vs Direct): Reversible's gradient error (against the float64 reference) at "
        "most 2x Direct's. The last number is the relative difference between ReversibleAdjoint's gradient and "
        "DirectAdjoint's gradient through the same reversible scheme (torchnde's private `_Reversible` solver "
        "wrapper): it measures the reconstruction error alone. Flat: at most 1.2x, or at most "
        f"{FLAT_FLOOR / MiB:g} MiB more (page-granularity noise). Equal or better gradient error (vs odeint_adjoint): at most "
        "1.25x odeint_adjoint's error. Sub-linear: the peak grows as steps^e with e <= 0.75 between "
        f"{ns[1]} and {ns[-1]} steps (Direct: e ~ 1; sqrt(steps) checkpoints: e ~ 0.5)."
    )
    L.append("")
    L.append("| target | where | measured | met? |")
    L.append("|---|---|---|---|")
    for name, where, val, ok in tgts:
        L.append(f"| {name} | {where} | {val} | {'n/a' if ok is None else 'yes' if ok else '**no**'} |")
    L.append("")
    L.append("## Where the time and memory go (computed from the tables above)")
    L.append("")
    L.extend(f"- {x}" for x in facts(rows, shapes, ns))
    L.append("")
    L.append('README.md (section "Adjoints") explains the causes.')
    L.append("")
    path.write_text("\n".join(L))


def facts(rows, shapes, ns):
    """Plain statements derived from the rows (ratios of NFE, times, errors), for the report."""
    out = []
    n = ns[-1]
    fixed = Case("fixed", n)
    for shape in shapes:
        d = _get(rows, shape, "torchnde Direct", fixed)
        base = _get(rows, shape, BASE, fixed)
        bs = _get(rows, shape, "torchnde Backsolve", fixed)
        ck = _get(rows, shape, "torchnde Checkpoint", fixed)
        rv = _get(rows, shape, "torchnde Reversible", fixed)
        tq = _get(rows, shape, "torchdiffeq odeint", fixed)
        if d and tq:
            out.append(
                f"{shape}, {n} steps: Direct takes {d.wall / tq.wall:.2f}x the time of torchdiffeq's odeint "
                f"(backprop through the same RK4 steps) and {d.peak / tq.peak:.2f}x its memory."
            )
        if bs and base:
            bb, qb = bs.wall - bs.wall_f, base.wall - base.wall_f
            out.append(
                f"{shape}, {n} steps: Backsolve and odeint_adjoint make the same vector-field calls "
                f"({bs.nfe_f} + {bs.nfe_b} vs {base.nfe_f} + {base.nfe_b}); Backsolve's forward takes "
                f"{bs.wall_f / base.wall_f:.2f}x and its backward {bb / qb:.2f}x odeint_adjoint's time. The "
                f"backward pass is {bb / bs.wall:.0%} of Backsolve's total."
            )
        if ck and d:
            out.append(
                f"{shape}, {n} steps: Checkpoint makes {ck.nfe_f + ck.nfe_b} vector-field calls against Direct's "
                f"{d.nfe_f + d.nfe_b} ({(ck.nfe_f + ck.nfe_b) / (d.nfe_f + d.nfe_b):.1f}x) and takes "
                f"{ck.wall / d.wall:.2f}x its time, for {ck.peak / d.peak:.2f}x its peak memory."
            )
        if rv and d:
            out.append(
                f"{shape}, {n} steps: Reversible makes {rv.nfe_f} + {rv.nfe_b} vector-field calls against Direct's "
                f"{d.nfe_f} + {d.nfe_b} and takes {rv.wall / d.wall:.2f}x its time."
            )
    if HAS_REVERSIBLE:
        for shape in shapes:
            errs = []
            for c in [Case("fixed", k) for k in ns] + [r.case for r in rows if r.case.kind == "adaptive"][:1]:
                d = _get(rows, shape, "torchnde Direct", c)
                rv = _get(rows, shape, "torchnde Reversible", c)
                if d and rv:
                    errs.append(f"{c.label}: {rv.y_err:.1e} vs {d.y_err:.1e}")
            out.append(f"{shape}: y(1) error of the reversible scheme vs plain RK4/Dopri5 (Direct): " + "; ".join(errs))
    return out


COLORS = {
    "torchnde Direct": "tab:blue",
    "torchnde Checkpoint": "tab:cyan",
    "torchnde Backsolve": "tab:purple",
    "torchnde Reversible": "tab:pink",
    "torchdiffeq odeint": "tab:orange",
    "torchdiffeq odeint_adjoint": "tab:red",
    "torchode AutoDiff": "tab:green",
    "torchode Backsolve": "tab:olive",
}


def plot(path, rows, shapes, ns):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 4.4 * len(shapes)), squeeze=False)
    labels = list(dict.fromkeys(r.label for r in rows if r.case.kind == "fixed"))
    for i, shape in enumerate(shapes):
        for label in labels:
            rs = [(n, _get(rows, shape, label, Case("fixed", n))) for n in ns]
            rs = [(n, r) for n, r in rs if r is not None]
            if not rs:
                continue
            kw = dict(
                color=COLORS.get(label), marker="o", label=label, linestyle="--" if "torchnde" not in label else "-"
            )
            axes[i, 0].loglog([n for n, _ in rs], [r.wall for _, r in rs], **kw)
            axes[i, 1].loglog([n for n, _ in rs], [max(r.peak, 4096) / MiB for _, r in rs], **kw)
        axes[i, 0].set_ylabel("forward + backward wall time [s]")
        axes[i, 1].set_ylabel("peak memory above baseline [MiB]")
        for ax in axes[i]:
            ax.set_xlabel("RK4 steps")
            ax.set_title(f"{shape} (batch, dim, width)")
            ax.grid(True, which="both", alpha=0.3)
        axes[i, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def profile_adjoints(log, n=100):
    ctx = make_ctx((16, 2, 32))
    case = Case("fixed", n)
    for m in methods():
        if m.lib != "torchnde" and m.label != BASE:
            continue
        forward = m.make(ctx, case)
        title = f"cProfile of 5 forward + backward runs, {m.label}, (16, 2, 32), RK4 {n} steps"
        log_profile(lambda i, forward=forward: one_run(ctx, forward), 5, title, log, limit=18)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke mode: small step counts, a few seconds")
    ap.add_argument("--out", type=Path, default=None, help="directory for adjoints.md and adjoints.png")
    ap.add_argument("--profile", action="store_true", help="print cProfiles of the torchnde adjoints")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return
    if args.out is None:  # a smoke run must never overwrite the committed results
        args.out = Path(tempfile.mkdtemp(prefix="torchnde-adjoints-")) if args.quick else HERE
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)
    start, start_cpu, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]

    if args.quick:
        shapes, ns, tol, ref_tol = [(16, 2, 32)], [3, 6, 12], 1e-3, 1e-6
        timing = dict(min_rounds=1, max_rounds=1, budget=0.0, single_run=2.0, mem_runs=1, mem_repeat_below=0.0)
        meter_mib = 8
    else:
        shapes, ns, tol, ref_tol = [(16, 2, 32), (256, 16, 64)], [10, 100, 1000], 1e-6, 1e-12
        timing = dict(min_rounds=3, max_rounds=15, budget=3.0, single_run=6.0, mem_runs=3, mem_repeat_below=6.0)
        meter_mib = 64
    # torchode's backsolve keeps per-sample parameter gradients (batch x parameters per stage) and
    # evaluates them with vmap: at (256, 16, 64) and 1000 steps one run takes ~50 s
    skip = {((256, 16, 64), "torchode Backsolve", 1000)}
    skipped = [
        "torchode Backsolve at (256, 16, 64), 1000 steps: not run (one forward + backward takes about 50 s "
        "here, about 12x its 100-step time)."
    ]

    meter = PeakRSS()
    if not meter.ok:
        log(f"warning: peak memory not measurable ({meter.problem}); memory columns will be NaN")
    timing["meter"] = meter
    info = machine_info(
        torchdiffeq=torchdiffeq.__version__,
        torchode=to.__version__,
        **{"scipy / numpy": f"{fwd.scipy.__version__} / {fwd.np.__version__}"},
    )
    log("memory meter:")
    meter_checks = validate_meter(meter, log, meter_mib) if meter.ok else []
    ms = methods()
    rows, ref_notes = [], {}
    for shape in shapes:
        ctx = make_ctx(shape)
        reference(ctx, ref_tol, log)
        ref_notes[str(shape)] = ctx.ref_note
        cases = [Case("fixed", n) for n in ns] + [Case("adaptive", tol=tol)]
        warm_up(ctx, cases[0], [m for m in ms if not m.adaptive_only])
        for case in cases:
            use = [
                m
                for m in ms
                if (case.kind == "adaptive" or not m.adaptive_only) and (shape, m.label, case.n) not in skip
            ]
            rows += run_case(ctx, case, use, timing, log)
        del ctx
    child_checks = []
    if not args.quick and meter.ok:
        child_checks = child_check(
            [((256, 16, 64), "torchnde Direct", 100), ((256, 16, 64), "torchnde Backsolve", 1000)], rows, log
        )
    if args.profile:
        profile_adjoints(log)
    tgts = targets(rows, shapes, ns)
    elapsed = (time.perf_counter() - start, time.process_time() - start_cpu, load0, os.getloadavg()[0])
    write_md(
        args.out / "adjoints.md", args, info, rows, shapes, ns, tol, meter_checks, child_checks, ref_notes, tgts,
        elapsed, skipped if not args.quick else [],
    )  # fmt: skip
    plot(args.out / "adjoints.png", rows, shapes, ns)
    log("targets:")
    for name, where, val, ok in tgts:
        log(f"  [{'n/a' if ok is None else 'ok' if ok else 'MISS'}] {name} at {where}: {val}")
    log(f"wrote {args.out / 'adjoints.md'} ({elapsed[0]:.0f} s wall, {elapsed[1]:.0f} s CPU)")


if __name__ == "__main__":
    main()
