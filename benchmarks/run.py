"""Benchmarks: torchnde against torchdiffeq and torchode, same problems, same process, one thread.

Usage::

    python benchmarks/run.py               # full run (~5-10 minutes on 2 cores), writes results.md + PNG
    python benchmarks/run.py --quick       # smoke mode (seconds), used by the test suite
    python benchmarks/run.py --out DIR     # write results.md and work_precision.png into DIR
    python benchmarks/run.py --profile     # also print a cProfile of torchnde on the (16, 2, 32) problem
    python benchmarks/run.py --only-time   # only part 4 (t as a tensor); updates its section of results.md

Part 1 times neural-ODE forward solves (MLP vector fields, float32, Dopri5, rtol = atol = 1e-6);
part 2 measures work-precision on Lorenz (1000 initial conditions, batched) and on the Arenstorf
orbit; part 3 compares NFE at equal achieved error; part 4 measures what passing ``t`` to the vector
field as a 0-d tensor costs (``--only-time`` runs just that part). See README.md in this directory.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import math
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

torch.set_num_threads(1)
with contextlib.suppress(RuntimeError):  # only settable before any inter-op work
    torch.set_num_interop_threads(1)

import scipy  # noqa: E402
import scipy.integrate  # noqa: E402
import torchdiffeq  # noqa: E402
import torchdiffeq._impl.rk_common as _tdq_rk  # noqa: E402
import torchode as to  # noqa: E402
from _common import machine_info  # noqa: E402  (this folder, on sys.path)

import torchnde as tn  # noqa: E402

MAX_STEPS = 200_000


# ---------------------------------------------------------------------------------------------
# the vector-field wrapper shared by all libraries


class Counted:
    """``f(t, y, *extra) -> fn(t, y)``, counting calls. The same object is given to every library.

    torchnde calls it as ``f(t, y, args)``, torchdiffeq and torchode as ``f(t, y)``.
    """

    __slots__ = ("fn", "calls")

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0

    def __call__(self, t, y, *extra):
        self.calls += 1
        return self.fn(t, y)


@contextlib.contextmanager
def count_torchdiffeq_steps():
    """Count torchdiffeq's adaptive RK steps (accepted + rejected); used only in untimed runs."""
    original = _tdq_rk._runge_kutta_step
    box = {"steps": 0}

    def counting(*a, **k):
        box["steps"] += 1
        return original(*a, **k)

    _tdq_rk._runge_kutta_step = counting
    try:
        yield box
    finally:
        _tdq_rk._runge_kutta_step = original


# ---------------------------------------------------------------------------------------------
# solver runners: each returns a zero-argument callable giving (final state, step count or None)


@dataclass
class Runner:
    label: str  # row label, e.g. "torchnde Dopri5"
    lib: str  # "torchnde" | "torchdiffeq" | "torchode"
    method: str
    f: Counted
    run: callable  # () -> final state (same shape as y0)
    steps: callable  # () -> step count of the last run (torchdiffeq: None, counted separately)
    extra: dict = field(default_factory=dict)


TN_SOLVERS = {"dopri5": tn.Dopri5, "tsit5": tn.Tsit5, "dopri8": tn.Dopri8}
TO_SOLVERS = {"dopri5": to.Dopri5, "tsit5": to.Tsit5}


def torchnde_runner(fn, y0, t0, t1, rtol, atol, method="dopri5", per_sample=False):
    f = Counted(fn)
    term = tn.ODETerm(f)
    solver = TN_SOLVERS[method]()
    controller = tn.PIDController(rtol=rtol, atol=atol)
    last = {}

    def run():
        sol = tn.solve(term, solver, t0, t1, y0, controller=controller, per_sample=per_sample, max_steps=MAX_STEPS)
        last["sol"] = sol
        return sol.ys[:, -1] if per_sample else sol.ys[-1]

    def steps():
        s = last["sol"].stats["num_steps"]
        return int(s.max()) if isinstance(s, torch.Tensor) else int(s)

    name = {"dopri5": "Dopri5", "tsit5": "Tsit5", "dopri8": "Dopri8"}[method]
    label = f"torchnde {name}" + (" per_sample" if per_sample else "")
    return Runner(label, "torchnde", method, f, run, steps)


def torchdiffeq_runner(fn, y0, t0, t1, rtol, atol, method="dopri5"):
    f = Counted(fn)
    ts = torch.tensor([t0, t1], dtype=y0.dtype)

    def run():
        return torchdiffeq.odeint(f, y0, ts, rtol=rtol, atol=atol, method=method)[-1]

    return Runner(f"torchdiffeq {method}", "torchdiffeq", method, f, run, lambda: None)


def torchode_runner(fn, y0, t0, t1, rtol, atol, method="dopri5"):
    """torchode needs a 2-D (batch, features) state; a 1-D y0 is solved as a batch of one."""
    f = Counted(fn)
    squeeze = y0.dim() == 1
    y0b = y0.unsqueeze(0) if squeeze else y0
    term = to.ODETerm(f)
    step = TO_SOLVERS[method](term=term)
    controller = to.IntegralController(atol=atol, rtol=rtol, term=term)
    adjoint = to.AutoDiffAdjoint(step, controller, max_steps=MAX_STEPS)
    t_start = torch.full((y0b.shape[0],), float(t0), dtype=y0.dtype)
    t_end = torch.full((y0b.shape[0],), float(t1), dtype=y0.dtype)
    last = {}

    def run():
        sol = adjoint.solve(to.InitialValueProblem(y0b, t_start, t_end))
        last["sol"] = sol
        y = sol.ys[:, -1]
        return y[0] if squeeze else y

    def steps():
        return int(last["sol"].stats["n_steps"].max())

    return Runner(f"torchode {method}", "torchode", method, f, run, steps)


# ---------------------------------------------------------------------------------------------
# measurement helpers


def calls_per_block(fn, args, min_block):
    """How many calls of ``fn(*args)`` make a block of at least ``min_block`` seconds (after warm-up)."""
    for _ in range(3):
        fn(*args)
    n = 1
    while n < 1 << 16:
        t = time.perf_counter()
        for _ in range(n):
            fn(*args)
        if time.perf_counter() - t >= min_block:
            break
        n *= 2
    return n


def timed(fn, *args, n=1):
    """(wall, thread CPU) seconds of ``n`` calls of ``fn(*args)``, divided by ``n``."""
    w, c = time.perf_counter(), time.thread_time()
    for _ in range(n):
        fn(*args)
    return (time.perf_counter() - w) / n, (time.thread_time() - c) / n


def vf_in_solve(r: Runner, reps):
    """(mean time of one vector-field call inside the solve, share of the solve's wall time in the vector field),
    from ``reps`` extra runs with a timer around the vector field (median run)."""
    fn = r.f.fn
    box = [0.0]

    def clocked(t, y):
        s = time.perf_counter()
        out = fn(t, y)
        box[0] += time.perf_counter() - s
        return out

    r.f.fn = clocked
    res = []
    try:
        for _ in range(reps):
            box[0], r.f.calls = 0.0, 0
            s = time.perf_counter()
            r.run()
            wall = time.perf_counter() - s
            res.append((box[0] / r.f.calls, box[0] / wall))
    finally:
        r.f.fn = fn
    res.sort(key=lambda x: x[1])
    return res[len(res) // 2]


def stats_run(r: Runner):
    """One untimed run: final state, NFE, steps."""
    r.f.calls = 0
    with count_torchdiffeq_steps() as box:
        y = r.run()
    nfe = r.f.calls
    steps = r.steps()
    if steps is None:
        steps = box["steps"]
    return y, nfe, steps


def time_round_robin(runners, vf, vf_args, min_rounds, max_rounds, budget):
    """Interleaved timing. Each round runs every runner once and then one block of vector-field calls
    (``vf(*vf_args)``), so slow drifts of the machine hit all of them alike. Returns
    ``{label: (median wall, median thread CPU, rounds)}`` with the key ``"vf"`` for one vector-field call."""
    for r in runners:  # warm-up
        r.run()
    n_vf = calls_per_block(vf, vf_args, min_block=5e-3)
    samples = {r.label: [] for r in runners}
    samples["vf"] = []
    start = time.perf_counter()
    for k in range(max_rounds):
        for r in runners:
            samples[r.label].append(timed(r.run))
        samples["vf"].append(timed(vf, *vf_args, n=n_vf))
        if k + 1 >= min_rounds and time.perf_counter() - start > budget:
            break
    return {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v), len(v)) for k, v in samples.items()
    }


def scipy_reference(fn64, y0, t0, t1, rtol=1e-12, atol=1e-12):
    """Final state of dy/dt = fn64(t, y) (float64 torch function) by SciPy DOP853."""
    shape = y0.shape

    def rhs(t, y):
        yt = torch.from_numpy(y).view(shape)
        return fn64(t, yt).reshape(-1).numpy()

    sol = scipy.integrate.solve_ivp(
        rhs, (t0, t1), y0.double().reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol
    )
    assert sol.success, sol.message
    return torch.from_numpy(sol.y[:, -1]).view(shape)


# ---------------------------------------------------------------------------------------------
# part 1: neural-ODE forward solves

MLP_SEED = 0
Y0_SEED = 1
HIDDEN_GAIN = 4.0  # hidden-layer weights x4: tanh layers far from linear
OUT_SCALE = 10.0  # output layer x10: Dopri5 takes 25-31 steps over [0, 1] at rtol = atol = 1e-6


def make_mlp(dim, width):
    torch.manual_seed(MLP_SEED)
    m = torch.nn.Sequential(
        torch.nn.Linear(dim, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, dim),
    )
    with torch.no_grad():
        m[0].weight.mul_(HIDDEN_GAIN)
        m[2].weight.mul_(HIDDEN_GAIN)
        m[4].weight.mul_(OUT_SCALE)
        m[4].bias.mul_(OUT_SCALE)
    m.requires_grad_(False)
    return m


@dataclass
class Row1:
    shape: tuple
    label: str
    time: float  # median wall time of a solve
    cpu: float  # median thread CPU time of a solve
    reps: int
    nfe: int
    steps: int
    error: float
    call: float  # median wall time of one vector-field call
    call_cpu: float  # ... and its thread CPU time
    vf_in: float = math.nan  # mean time of one vector-field call inside a solve (separate, untimed-for-wall runs)
    vf_share: float = math.nan  # share of those solves' wall time spent inside the vector field

    @property
    def overhead(self):
        return self.time / (self.nfe * self.call)

    @property
    def overhead_cpu(self):
        return self.cpu / (self.nfe * self.call_cpu)

    @property
    def per_step(self):
        """Wall time not spent in the vector field, per step."""
        return (self.time - self.nfe * self.call) / self.steps


def neural_ode_runners(mlp, y0, rtol, atol):
    fn = lambda t, y: mlp(y)
    return [
        torchnde_runner(fn, y0, 0.0, 1.0, rtol, atol),
        torchnde_runner(fn, y0, 0.0, 1.0, rtol, atol, per_sample=True),
        torchdiffeq_runner(fn, y0, 0.0, 1.0, rtol, atol),
        torchode_runner(fn, y0, 0.0, 1.0, rtol, atol),
    ]


def part1(shapes, rtol, atol, min_rounds, max_rounds, budget, log):
    rows = []
    for batch, dim, width in shapes:
        mlp = make_mlp(dim, width)
        torch.manual_seed(Y0_SEED)
        y0 = torch.randn(batch, dim)
        mlp64 = make_mlp(dim, width).double()
        ref = scipy_reference(lambda t, y, m=mlp64: m(y), y0, 0.0, 1.0)
        runners = neural_ode_runners(mlp, y0, rtol, atol)
        info = {}
        for r in runners:
            y, nfe, steps = stats_run(r)
            err = float((y.double() - ref).abs().max())
            info[r.label] = (nfe, steps, err)
        tm = time_round_robin(runners, runners[0].f, (0.0, y0), min_rounds, max_rounds, budget)
        call, call_cpu, _ = tm["vf"]
        for r in runners:
            nfe, steps, err = info[r.label]
            wall, cpu, reps = tm[r.label]
            row = Row1((batch, dim, width), r.label, wall, cpu, reps, nfe, steps, err, call, call_cpu)
            row.vf_in, row.vf_share = vf_in_solve(r, 3 if batch < 1024 else 2)
            rows.append(row)
            log(
                f"  {str(row.shape):15s} {r.label:28s} {row.time * 1e3:9.2f} ms  NFE {nfe:4d}  steps {steps:3d}  "
                f"err {err:.1e}  call {call * 1e6:7.1f} us  overhead {row.overhead:5.2f} (CPU {row.overhead_cpu:5.2f})  "
                f"non-VF/step {row.per_step * 1e6:6.0f} us  VF in solve {row.vf_in * 1e6:7.1f} us "
                f"(share {row.vf_share:.2f})  (n={row.reps})"
            )
    return rows


# ---------------------------------------------------------------------------------------------
# part 2: work-precision on Lorenz (batched) and Arenstorf


@dataclass
class Point:
    problem: str
    label: str
    tol: float
    time: float
    cpu: float
    reps: int
    nfe: int
    steps: int
    error: float


WP_METHODS = [
    ("torchnde", "dopri5", False),
    ("torchnde", "tsit5", False),
    ("torchnde", "dopri8", False),
    ("torchnde", "dopri5", True),
    ("torchdiffeq", "dopri5", False),
    ("torchdiffeq", "dopri8", False),
    ("torchode", "dopri5", False),
    ("torchode", "tsit5", False),
]


def make_runner(lib, method, per_sample, fn, y0, t0, t1, tol):
    if lib == "torchnde":
        return torchnde_runner(fn, y0, t0, t1, tol, tol, method, per_sample=per_sample)
    if lib == "torchdiffeq":
        return torchdiffeq_runner(fn, y0, t0, t1, tol, tol, method)
    return torchode_runner(fn, y0, t0, t1, tol, tol, method)


LORENZ_SEED = 2


def wp_problems(n_lorenz, log):
    """[(name, fn(t, y), y0, t0, t1, reference final state, methods)] and a note on the references."""
    sys.path.insert(0, str(ROOT / "tests"))
    from problems import PROBLEMS, REFERENCE_ATOL, REFERENCE_RTOL, reference

    lor, are = PROBLEMS["lorenz"], PROBLEMS["arenstorf"]
    # Lorenz: sample 0 is the problem's own initial value, the rest uniform in a box around the attractor
    g = torch.Generator().manual_seed(LORENZ_SEED)
    lo = torch.tensor([-15.0, -15.0, 5.0], dtype=torch.float64)
    hi = torch.tensor([15.0, 15.0, 45.0], dtype=torch.float64)
    y0_l = lo + (hi - lo) * torch.rand(n_lorenz, 3, generator=g, dtype=torch.float64)
    y0_l[0] = lor.y0
    fn_l = lambda t, y: lor.vector_field(t, y, None)
    t = time.perf_counter()
    ref_l = scipy_reference(fn_l, y0_l, lor.t0, lor.t1, rtol=REFERENCE_RTOL, atol=REFERENCE_ATOL)
    t = time.perf_counter() - t
    # the batched reference (one DOP853 solve of the (n, 3) system) against the per-problem one
    check = float((ref_l[0] - torch.from_numpy(np.array(reference(lor)))).abs().max() / ref_l[0].abs().max())
    note = (
        f"Lorenz reference: one SciPy DOP853 solve of the flattened ({n_lorenz}, 3) system at "
        f"rtol={REFERENCE_RTOL:g}, atol={REFERENCE_ATOL:g} ({t:.1f} s); its sample 0 agrees with "
        f"`reference(PROBLEMS['lorenz'])` to {check:.1e} (relative). Arenstorf reference: "
        f"`reference(PROBLEMS['arenstorf'])` (DOP853, rtol={REFERENCE_RTOL:g})."
    )
    log("  " + note)
    fn_a = lambda t, y: are.vector_field(t, y, None)
    ref_a = torch.from_numpy(np.array(reference(are)))
    methods_l = WP_METHODS
    methods_a = [m for m in WP_METHODS if not m[2]]  # one orbit: per-sample mode is moot
    return [
        (f"Lorenz ({n_lorenz} ICs)", fn_l, y0_l, lor.t0, lor.t1, ref_l, methods_l),
        ("Arenstorf", fn_a, are.y0.clone(), are.t0, are.t1, ref_a, methods_a),
    ], note


def part2(problems, tols, min_reps, max_reps, budget, log):
    points = []
    for name, fn, y0, t0, t1, ref, methods in problems:
        for lib, method, per_sample in methods:
            for tol in tols:
                r = make_runner(lib, method, per_sample, fn, y0, t0, t1, tol)
                y, nfe, steps = stats_run(r)  # also the warm-up
                err = error_of(y, ref)
                wall, cpu, reps = time_one(r, min_reps, max_reps, budget)
                p = Point(name, r.label, tol, wall, cpu, reps, nfe, steps, err)
                points.append(p)
                log(
                    f"  {name:18s} {r.label:28s} tol {tol:.0e}  {wall * 1e3:9.2f} ms  NFE {nfe:6d}  "
                    f"steps {steps:5d}  err {err:.2e}  (n={reps})"
                )
    return points


def time_one(r: Runner, min_reps, max_reps, budget):
    """Median wall and thread CPU time of one runner (already warmed up by its stats run)."""
    res = []
    start = time.perf_counter()
    for k in range(max_reps):
        res.append(timed(r.run))
        if k + 1 >= min_reps and time.perf_counter() - start > budget:
            break
    return statistics.median(w for w, _ in res), statistics.median(c for _, c in res), len(res)


def error_of(y, ref):
    """Relative max-norm error ``max|y - ref| / max|ref|``, per sample, worst sample."""
    y = y.double().reshape(ref.shape)
    if ref.dim() == 1:
        return float((y - ref).abs().max() / ref.abs().max())
    return float(((y - ref).abs().amax(-1) / ref.abs().amax(-1)).max())


# ---------------------------------------------------------------------------------------------
# part 3: cost at equal achieved error


def at_error(points, target, attr):
    """log-log interpolation of ``attr`` (nfe or time) at achieved error ``target``; None outside the data."""
    pts = sorted((math.log(p.error), math.log(getattr(p, attr))) for p in points if p.error > 0)
    if len(pts) < 2:
        return None
    xs, ys = [a for a, _ in pts], [b for _, b in pts]
    x = math.log(target)
    if not xs[0] <= x <= xs[-1]:
        return None
    return math.exp(float(np.interp(x, xs, ys)))


BASE = "torchdiffeq dopri5"


def equal_error_tables(points, targets):
    """{problem: [(target, {label: (nfe, time)})]}."""
    out = {}
    for prob in dict.fromkeys(p.problem for p in points):
        labels = list(dict.fromkeys(p.label for p in points if p.problem == prob))
        rows = []
        for target in targets:
            cells = {}
            for lab in labels:
                pts = [p for p in points if p.problem == prob and p.label == lab]
                cells[lab] = (at_error(pts, target, "nfe"), at_error(pts, target, "time"))
            if cells.get(BASE, (None,))[0] is not None:
                rows.append((target, cells))
        out[prob] = (labels, rows)
    return out


# ---------------------------------------------------------------------------------------------
# part 4: the cost of passing t to the vector field as a tensor


@dataclass
class Row4:
    shape: tuple
    label: str
    time: float
    cpu: float
    reps: int
    nfe: int
    cpu_min: float  # the least disturbed run's thread CPU time


TIME_VARIANTS = {
    # label: (ODETerm keyword, clear the time cache before every solve)
    "t as Python float (time_as_float=True)": (True, False),
    "t as 0-d tensor (default), cache warm": (False, False),
    "t as 0-d tensor (default), cache cleared every solve": (False, True),
}


def part4(shapes, min_rounds, max_rounds, budget, log):
    """The neural ODEs of part 1, solved with ``t`` reaching the vector field as a Python float and
    as a cached 0-d tensor (the default). The vector field ignores ``t``, so the difference is the
    conversion alone. 'cache warm': repeated identical solves find every stage time in the cache;
    'cache cleared': every distinct stage time costs one ``torch.full`` (a solve whose step sizes
    differ from the last one's, as in training)."""
    from torchnde import _terms

    rows, micro = [], {}
    for batch, dim, width in shapes:
        mlp = make_mlp(dim, width)
        torch.manual_seed(Y0_SEED)
        y0 = torch.randn(batch, dim)
        fn = lambda t, y, args, m=mlp: m(y)  # noqa: E731
        controller = tn.PIDController(rtol=1e-6, atol=1e-6)
        runs = {}
        for label, (as_float, cold) in TIME_VARIANTS.items():
            term = tn.ODETerm(fn, time_as_float=as_float)

            def run(term=term, cold=cold, y0=y0, controller=controller):
                if cold:
                    _terms._TIME_TABLES.clear()
                return tn.solve(term, tn.Dopri5(), 0.0, 1.0, y0, controller=controller, max_steps=MAX_STEPS)

            runs[label] = run
        nfe = {label: run().stats["nfe"] for label, run in runs.items()}
        samples = {label: [] for label in runs}
        order = list(runs)
        shuffle = random.Random(0).shuffle  # a new order every round: no variant always runs first
        start = time.perf_counter()
        for k in range(max_rounds):
            shuffle(order)
            for label in order:
                samples[label].append(timed(runs[label]))
            if k + 1 >= min_rounds and time.perf_counter() - start > budget:
                break
        for label, v in samples.items():
            row = Row4(
                (batch, dim, width),
                label,
                statistics.median(w for w, _ in v),
                statistics.median(c for _, c in v),
                len(v),
                nfe[label],
                min(c for _, c in v),
            )
            rows.append(row)
            log(
                f"  {str(row.shape):15s} {label:55s} {row.time * 1e3:8.3f} ms (CPU {row.cpu * 1e3:8.3f})  NFE {row.nfe}"
            )
    # the conversion alone: a cache hit, and a miss (a new time value)
    y = torch.ones(16, 2)
    n = 20000
    values = [0.5 + k * 1e-9 for k in range(n)]
    table = _terms.time_table(torch.float32, y.device)

    def per_call(fn, args_list):
        t = time.thread_time()
        for a in args_list:
            fn(*a)
        return (time.thread_time() - t) / len(args_list)

    _terms.cached_time(0.25, table, torch.float32, y.device)
    micro["hit"] = per_call(_terms.cached_time, [(0.25, table, torch.float32, y.device)] * n)
    micro["miss"] = per_call(_terms.cached_time, [(v, table, torch.float32, y.device) for v in values])
    micro["user_time"] = per_call(_terms.user_time, [(0.25, y)] * n)
    _terms._TIME_TABLES.clear()
    log(
        f"  time tensor: cache hit {micro['hit'] * 1e6:.2f} us, miss {micro['miss'] * 1e6:.2f} us, "
        f"user_time (hit, dtype and device looked up) {micro['user_time'] * 1e6:.2f} us"
    )
    return rows, micro


def part4_lines(rows4, micro):
    L = ["## 4. Time as a tensor: what it costs", ""]
    L.append(
        "The vector field receives `t` as a 0-d tensor (dtype and device of `y0`) unless the term is built with "
        "`time_as_float=True`. The neural ODEs of section 1 (Dopri5, rtol = atol = 1e-6), with a vector field that "
        "ignores `t`, so that only the conversion differs; median of n interleaved rounds. 'cache warm': repeated "
        "identical solves find every stage time among the cached tensors; 'cache cleared': the cache is emptied "
        "before every solve, so each distinct stage time costs one `torch.full` (solves whose steps differ from the "
        "previous ones, as in training). The variants run in a new random order every round. Extra per evaluation "
        "= (time - time with float t) / NFE, from the median and the minimum thread CPU times (which other processes "
        "disturb less than wall times; the minimum is the least disturbed run). On a loaded machine the differences "
        "between rows are of the order of the run-to-run noise; the conversion's own cost is measured alone below."
    )
    L.append("")
    L.append(
        "| (batch, dim, width) | t | wall [ms] | CPU [ms] | min CPU [ms] | NFE | extra per evaluation, median CPU [us] "
        "| extra per evaluation, min CPU [us] | CPU vs float t | n |"
    )
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in dict.fromkeys(r.shape for r in rows4):
        rs = [r for r in rows4 if r.shape == shape]
        base = rs[0]
        for r in rs:
            extra_cpu = (r.cpu - base.cpu) / r.nfe * 1e6
            extra_min = (r.cpu_min - base.cpu_min) / r.nfe * 1e6
            L.append(
                f"| {shape} | {r.label} | {fmt_ms(r.time)} | {fmt_ms(r.cpu)} | {fmt_ms(r.cpu_min)} | {r.nfe} | "
                f"{extra_cpu:+.2f} | {extra_min:+.2f} | {r.cpu / base.cpu:.3f}x | {r.reps} |"
            )
    L.append("")
    L.append(
        "The conversion alone (float32 on the CPU, thread CPU time per call): as an ODE solve does it "
        f"(`_terms.cached_time`, the table looked up once per solve) {micro['hit'] * 1e6:.2f} us on a cache hit and "
        f"{micro['miss'] * 1e6:.2f} us for a new time value (one `torch.full`); `_terms.user_time`, which SDE and "
        f"CDE terms use (dtype and device read from `y` at every call), {micro['user_time'] * 1e6:.2f} us on a hit."
    )
    L.append("")
    return L


PART4_MARK = "## 4. Time as a tensor"


def write_part4_only(path, rows4, micro):
    """Replace section 4 of an existing results.md (``--only-time``), leaving the rest as it is."""
    text = path.read_text() if path.exists() else "# torchnde benchmark results\n"
    head = text.split(PART4_MARK)[0].rstrip("\n")
    path.write_text(head + "\n\n" + "\n".join(part4_lines(rows4, micro)))


# ---------------------------------------------------------------------------------------------
# report


def fmt_ms(s):
    return f"{s * 1e3:.2f}" if s < 10 else f"{s * 1e3:.0f}"


def write_results(path, args, info, rows1, rtol1, points, note2, eq_tables, elapsed, part4=None):
    L = []
    L.append("# torchnde benchmark results")
    L.append("")
    L.append(
        f"Generated by `python benchmarks/run.py{' --quick' if args.quick else ''}` in {elapsed[0]:.0f} s wall, "
        f"{elapsed[1]:.0f} s CPU of this process; 1-minute load average {elapsed[2]:.2f} at the start and "
        f"{elapsed[3]:.2f} at the end. (Wall well above CPU, or a load above 1, means other processes shared the "
        "cores: then trust the CPU columns and the ratios more than the absolute wall times.)"
    )
    if args.quick:
        L.append("")
        L.append("**Quick (smoke-test) mode: tiny problems, few repeats. These numbers mean nothing.**")
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append("| | |")
    L.append("|---|---|")
    for k, v in info.items():
        L.append(f"| {k} | {v} |")
    L.append("")
    L.append(
        "All libraries run in one process, single-threaded (`torch.set_num_threads(1)`), under "
        "`torch.no_grad()`, on the same vector-field object (a call-counting wrapper), with solver, "
        "controller and term objects built once outside the timed region. torchode: `Dopri5` + "
        "`IntegralController` + `AutoDiffAdjoint`, eager (no `torch.jit.script`/`torch.compile`), "
        "`ODETerm` with its default `with_stats=True`, no `t_eval` (state at `t_end` only). "
        "torchdiffeq: `odeint(f, y0, tensor([t0, t1]), method=...)`. torchnde: `solve(ODETerm(f), "
        "solver, t0, t1, y0, controller=PIDController(rtol, atol))`, `max_steps` raised. "
        "All use rtol = atol = tol, the RMS error norm and an automatic initial step."
    )
    L.append("")

    # part 1
    L.append(f"## 1. Neural-ODE forward solves (float32, Dopri5, rtol = atol = {rtol1:g}, t in [0, 1])")
    L.append("")
    L.append(
        "f(t, y) = MLP(y): Linear(dim, width)-tanh-Linear(width, width)-tanh-Linear(width, dim), "
        f"PyTorch default init with seed {MLP_SEED}, hidden weights x{HIDDEN_GAIN:g}, output layer x{OUT_SCALE:g}; "
        f"y0 ~ N(0, 1) (seed {Y0_SEED}). Wall time: median over n interleaved rounds (after a warm-up), each round "
        "running every solver once and then a block of vector-field calls; CPU: the same for the thread's CPU time "
        "(`time.thread_time`), which other processes on the machine disturb less. "
        "NFE: calls of the vector field (one call evaluates the whole batch). Steps: accepted + rejected "
        "(per-sample solvers: the most steps of any sample; torchdiffeq: counted by wrapping its RK step in "
        "an untimed run). Error: max |y(1) - y_ref(1)| against SciPy DOP853 (rtol = atol = 1e-12) on a "
        "float64 copy of the MLP. One call: time of one vector-field call on y0 (block of calls / calls, median over "
        "the same rounds). Overhead = wall / (NFE x one call) (CPU: the same with CPU times): 1.0 means the solver "
        "costs nothing beyond the vector field. "
        "Non-VF time / step = (wall - NFE x one call) / steps: the solver's own cost per step. VF call in solve / "
        "VF share: from 2-3 extra runs with a timer around the vector field, the mean time of one call inside the "
        "solve (inputs and caches are colder there than in the isolated block, so it can exceed 'one call') and "
        "the fraction of the solve's wall time spent in the vector field."
    )
    L.append("")
    L.append(
        "| (batch, dim, width) | solver | wall [ms] | CPU [ms] | NFE | steps | max abs error | one call [us] "
        "| overhead | overhead (CPU) | non-VF time / step [us] | VF call in solve [us] | VF share | torchdiffeq / this "
        "| torchode / this |"
    )
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in dict.fromkeys(r.shape for r in rows1):
        rs = [r for r in rows1 if r.shape == shape]
        tdq = next(r for r in rs if r.label.startswith("torchdiffeq"))
        tode = next(r for r in rs if r.label.startswith("torchode"))
        for r in rs:
            ratios = (
                f"{tdq.time / r.time:.2f}x | {tode.time / r.time:.2f}x" if r.label.startswith("torchnde") else " | "
            )
            L.append(
                f"| {shape} | {r.label} | {fmt_ms(r.time)} | {fmt_ms(r.cpu)} | {r.nfe} | {r.steps} | {r.error:.1e} | "
                f"{r.call * 1e6:.1f} | {r.overhead:.2f} | {r.overhead_cpu:.2f} | {r.per_step * 1e6:.0f} | "
                f"{r.vf_in * 1e6:.1f} | {r.vf_share:.2f} | {ratios} |"
            )
    L.append("")
    L.append(
        "Ratios > 1 mean torchnde is faster. The per-sample row is the like-for-like comparison with torchode "
        "(both give every sample its own step size); the default row with torchdiffeq (one step size for the batch)."
    )
    L.append("")

    # part 2
    if points:
        L.append("## 2. Work-precision: Lorenz (batched) and Arenstorf (float64)")
        L.append("")
        L.append(
            "Error: relative max-norm error max|y(t1) - y_ref(t1)| / max|y_ref(t1)| (for Lorenz: per initial "
            "condition, worst one). rtol = atol = tol. Wall: median of repeats (n) after a warm-up. "
            "Lorenz is solved as one batched (n, 3) state; in torchnde's default mode and in torchdiffeq one step "
            "size serves the whole batch (error norm over all samples), torchode and torchnde `per_sample` step "
            "each sample separately. Arenstorf: a (4,) state (torchode: (1, 4)). " + note2
        )
        L.append("")
        L.append("![work-precision](work_precision.png)")
        L.append("")
        L.append("| problem | solver | tol | error | NFE | steps | wall [ms] | CPU [ms] | n |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for p in points:
            L.append(
                f"| {p.problem} | {p.label} | {p.tol:.0e} | {p.error:.2e} | {p.nfe} | {p.steps} | "
                f"{fmt_ms(p.time)} | {fmt_ms(p.cpu)} | {p.reps} |"
            )
        L.append("")

        # part 3
        L.append(f"## 3. Cost at equal achieved error (relative to {BASE})")
        L.append("")
        L.append(
            "NFE and wall time each solver needs to reach a given achieved error, by log-log interpolation "
            "between the tolerances of section 2 (blank: the error is outside the solver's measured range). "
            f"Each cell: NFE (ratio to {BASE}'s NFE) / wall time ratio. Ratios < 1 mean cheaper than {BASE}."
        )
        for prob, (labels, rows) in eq_tables.items():
            L.append("")
            L.append(f"### {prob}")
            L.append("")
            others = [lab for lab in labels if lab != BASE]
            L.append(f"| error | {BASE} NFE | " + " | ".join(others) + " |")
            L.append("|---:|---:|" + "---:|" * len(others))
            for target, cells in rows:
                base_nfe, base_t = cells[BASE]
                out = []
                for lab in others:
                    nfe, tm = cells[lab]
                    out.append("" if nfe is None else f"{nfe:.0f} ({nfe / base_nfe:.2f}) / {tm / base_t:.2f}")
                L.append(f"| {target:.0e} | {base_nfe:.0f} | " + " | ".join(out) + " |")
        L.append("")
    if part4 is not None:
        L.extend(part4_lines(*part4))
    path.write_text("\n".join(L))


STYLE = {
    "torchnde": dict(color="tab:blue"),
    "torchdiffeq": dict(color="tab:orange"),
    "torchode": dict(color="tab:green"),
}
MARKERS = {"dopri5": "o", "tsit5": "s", "dopri8": "^"}


def plot(path, points):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    probs = list(dict.fromkeys(p.problem for p in points))
    fig, axes = plt.subplots(len(probs), 2, figsize=(12, 4.6 * len(probs)), squeeze=False)
    for i, prob in enumerate(probs):
        labels = list(dict.fromkeys(p.label for p in points if p.problem == prob))
        for lab in labels:
            pts = sorted((p for p in points if p.problem == prob and p.label == lab), key=lambda p: p.tol)
            lib = lab.split()[0]
            method = lab.split()[1].lower()
            kw = dict(
                STYLE[lib],
                marker=MARKERS[method],
                linestyle="--" if "per_sample" in lab else "-",
                label=lab,
                markersize=5,
            )
            errs = [max(p.error, 1e-17) for p in pts]
            axes[i, 0].loglog([p.time for p in pts], errs, **kw)
            axes[i, 1].loglog([p.nfe for p in pts], errs, **kw)
        for ax in axes[i]:
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes[i, 0].set_xlabel("wall time [s]")
        axes[i, 1].set_xlabel("NFE (vector-field calls)")
        for ax in axes[i]:
            ax.set_ylabel("relative error at t1")
            ax.set_title(prob)
            ax.grid(True, which="both", alpha=0.3)
        axes[i, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# profile of torchnde on the smallest neural ODE


def profile_small(log, n=30):
    mlp = make_mlp(2, 32)
    torch.manual_seed(Y0_SEED)
    y0 = torch.randn(16, 2)
    r = torchnde_runner(lambda t, y: mlp(y), y0, 0.0, 1.0, 1e-6, 1e-6)
    for _ in range(3):
        r.run()
    from torch.profiler import ProfilerActivity, profile

    r.f.calls = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        r.run()
    nfe, steps = r.f.calls, r.steps()
    log(f"torch.profiler of one torchnde Dopri5 solve of the (16, 2, 32) neural ODE ({steps} steps, {nfe} NFE);")
    log("ops with 'aten::linear'/'aten::tanh' are the vector field, the rest is the solver:")
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        r.run()
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("tottime").print_stats(30)
    log(f"cProfile of {n} torchnde Dopri5 solves of the (16, 2, 32) neural ODE, sorted by self time:")
    log(s.getvalue())


# ---------------------------------------------------------------------------------------------


def check_targets(rows1, log):
    """The performance targets torchnde is held to (printed, not written to results.md)."""

    def get(shape, prefix):
        return next(r for r in rows1 if r.shape == shape and r.label.startswith(prefix))

    shapes = list(dict.fromkeys(r.shape for r in rows1))
    checks = []
    limits = {(256, 16, 64): 1.2, (16, 2, 32): 1.6}
    for shape, lim in limits.items():
        if shape in shapes:
            r = get(shape, "torchnde Dopri5")
            checks.append((f"overhead {shape} <= {lim}", r.overhead, r.overhead <= lim))
    if (16, 2, 32) in shapes:
        nde = get((16, 2, 32), "torchnde Dopri5").time
        a = get((16, 2, 32), "torchdiffeq").time / nde
        b = get((16, 2, 32), "torchode").time / nde
        checks.append(("torchdiffeq / torchnde at (16, 2, 32) >= 2", a, a >= 2))
        checks.append(("torchode / torchnde at (16, 2, 32) >= 1.3", b, b >= 1.3))
    for shape in shapes:
        nde = get(shape, "torchnde Dopri5").time
        for other in ("torchdiffeq", "torchode"):
            x = get(shape, other).time / nde
            checks.append((f"{other} / torchnde at {shape} > 1", x, x > 1))
    log("targets (torchnde default mode):")
    for name, val, ok in checks:
        log(f"  [{'ok' if ok else 'MISS'}] {name}: {val:.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke mode: tiny problems, a few seconds")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for results.md and work_precision.png (default: this directory; with --quick a temporary one)",
    )
    ap.add_argument("--profile", action="store_true", help="print a cProfile of torchnde on the (16, 2, 32) problem")
    ap.add_argument("--skip-wp", action="store_true", help="skip parts 2 and 3 (work-precision)")
    ap.add_argument(
        "--only-time",
        action="store_true",
        help="run only part 4 (t as a tensor) and replace its section of an existing results.md",
    )
    args = ap.parse_args(argv)
    if args.out is None:  # a smoke run must never overwrite the committed results
        args.out = Path(tempfile.mkdtemp(prefix="torchnde-bench-")) if args.quick else HERE
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)
    start, start_cpu, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]

    if args.quick:
        shapes = [(16, 2, 32)]
        p1 = dict(min_rounds=2, max_rounds=3, budget=0.1)
        n_lorenz, tols = 8, [1e-3, 1e-4]
        p2 = dict(min_reps=1, max_reps=1, budget=0.0)
    else:
        shapes = [(16, 2, 32), (256, 16, 64), (1024, 32, 128)]
        p1 = dict(min_rounds=7, max_rounds=200, budget=8.0)
        n_lorenz, tols = 1000, [1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10]
        p2 = dict(min_reps=3, max_reps=15, budget=1.0)
    rtol1 = 1e-6
    shapes4 = [(16, 2, 32)] if args.quick else [(16, 2, 32), (256, 16, 64)]
    p4 = dict(min_rounds=2, max_rounds=3, budget=0.1) if args.quick else dict(min_rounds=15, max_rounds=400, budget=6.0)
    if args.only_time:
        with torch.no_grad():
            log("part 4: t as a tensor")
            rows4 = part4(shapes4, log=log, **p4)
        write_part4_only(args.out / "results.md", *rows4)
        log(f"wrote section 4 of {args.out / 'results.md'}")
        return

    info = machine_info(
        torchdiffeq=torchdiffeq.__version__,
        torchode=to.__version__,
        **{"scipy / numpy": f"{scipy.__version__} / {np.__version__}"},
    )
    with torch.no_grad():
        log("part 1: neural-ODE forward solves")
        rows1 = part1(shapes, rtol1, rtol1, log=log, **p1)
        points, note2, eq = [], "", {}
        if not args.skip_wp:
            log("part 2: work-precision")
            problems, note2 = wp_problems(n_lorenz, log)
            points = part2(problems, tols, log=log, **p2)
            eq = equal_error_tables(points, [10.0**-k for k in range(2, 12)])
            plot(args.out / "work_precision.png", points)
        log("part 4: t as a tensor")
        rows4 = part4(shapes4, log=log, **p4)
        if args.profile:
            profile_small(log)
    elapsed = (time.perf_counter() - start, time.process_time() - start_cpu, load0, os.getloadavg()[0])
    write_results(args.out / "results.md", args, info, rows1, rtol1, points, note2, eq, elapsed, rows4)
    check_targets(rows1, log)
    log(f"wrote {args.out / 'results.md'} ({elapsed[0]:.0f} s wall, {elapsed[1]:.0f} s CPU)")


if __name__ == "__main__":
    main()
