"""Benchmarks: torchnde against torchdiffeq and torchode, same problems, same process, one thread.

Usage::

    python benchmarks/run.py               # full run (~5-10 minutes on 2 cores), writes results.md + PNG
    python benchmarks/run.py --quick       # smoke mode (seconds), used by the test suite
    python benchmarks/run.py --out DIR     # write results.md and work_precision.png into DIR
    python benchmarks/run.py --profile     # also print a cProfile of torchnde on the (16, 2, 32) problem

Part 1 times neural-ODE forward solves (MLP vector fields, float32, Dopri5, rtol = atol = 1e-6);
part 2 measures work-precision on Lorenz (1000 initial conditions, batched) and on the Arenstorf
orbit; part 3 compares NFE at equal achieved error. See README.md in this directory.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import math
import platform
import pstats
import statistics
import sys
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
import torchode as to  # noqa: E402
import torchdiffeq._impl.rk_common as _tdq_rk  # noqa: E402

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


def time_call(fn, *args, min_block=2e-3, blocks=31):
    """Median time of one call of ``fn(*args)``: median over ``blocks`` blocks of repeated calls."""
    for _ in range(3):
        fn(*args)
    n = 1
    while True:  # calls per block so that a block lasts >= min_block
        t = time.perf_counter()
        for _ in range(n):
            fn(*args)
        el = time.perf_counter() - t
        if el >= min_block or n >= 1 << 16:
            break
        n *= 2
    res = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(n):
            fn(*args)
        res.append((time.perf_counter() - t) / n)
    return statistics.median(res)


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


def time_round_robin(runners, min_rounds, max_rounds, budget):
    """Median wall time per runner; runners interleaved round by round (one warm-up run each)."""
    for r in runners:
        r.run()
    times = {r.label: [] for r in runners}
    start = time.perf_counter()
    for k in range(max_rounds):
        for r in runners:
            t = time.perf_counter()
            r.run()
            times[r.label].append(time.perf_counter() - t)
        if k + 1 >= min_rounds and time.perf_counter() - start > budget:
            break
    return {k: statistics.median(v) for k, v in times.items()}, {k: len(v) for k, v in times.items()}


def time_one(r: Runner, min_reps, max_reps, budget):
    """Median wall time of one runner (one warm-up run unless a single run already exceeds the budget)."""
    t = time.perf_counter()
    r.run()
    first = time.perf_counter() - t
    if first > budget:
        return first, 1
    res = []
    start = time.perf_counter()
    for k in range(max_reps):
        t = time.perf_counter()
        r.run()
        res.append(time.perf_counter() - t)
        if k + 1 >= min_reps and time.perf_counter() - start > budget:
            break
    return statistics.median(res), len(res)


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
OUT_SCALE = 20.0  # output layer x20: Dopri5 takes ~35-50 steps over [0, 1] at rtol = atol = 1e-6


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
    time: float
    reps: int
    nfe: int
    steps: int
    error: float
    call: float

    @property
    def overhead(self):
        return self.time / (self.nfe * self.call)


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
        ref = scipy_reference(lambda t, y: mlp64(y), y0, 0.0, 1.0)
        runners = neural_ode_runners(mlp, y0, rtol, atol)
        call = time_call(runners[0].f, 0.0, y0)
        info = {}
        for r in runners:
            y, nfe, steps = stats_run(r)
            err = float((y.double() - ref).abs().max())
            info[r.label] = (nfe, steps, err)
        med, reps = time_round_robin(runners, min_rounds, max_rounds, budget)
        for r in runners:
            nfe, steps, err = info[r.label]
            row = Row1((batch, dim, width), r.label, med[r.label], reps[r.label], nfe, steps, err, call)
            rows.append(row)
            log(
                f"  {str(row.shape):15s} {r.label:28s} {row.time * 1e3:9.2f} ms  NFE {nfe:4d}  steps {steps:3d}  "
                f"err {err:.1e}  call {call * 1e6:7.1f} us  overhead {row.overhead:5.2f}  (n={row.reps})"
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


def wp_problems(n_lorenz):
    """(name, fn(t, y), y0, t0, t1, reference final state, per_sample allowed) for part 2."""
    sys.path.insert(0, str(ROOT / "tests"))
    from problems import PROBLEMS, reference  # written by the test suite; one source of truth

    out = []
    lor = PROBLEMS["lorenz"]
    raise NotImplementedError  # filled in once tests/problems.py exists
    return out, lor, reference


def part2(problems, tols, min_reps, max_reps, budget, log):
    points = []
    for name, fn, y0, t0, t1, ref, methods in problems:
        for lib, method, per_sample in methods:
            for tol in tols:
                r = make_runner(lib, method, per_sample, fn, y0, t0, t1, tol)
                y, nfe, steps = stats_run(r)
                err = error_of(y, ref)
                wall, reps = time_one(r, min_reps, max_reps, budget)
                p = Point(name, r.label, tol, wall, reps, nfe, steps, err)
                points.append(p)
                log(
                    f"  {name:9s} {r.label:28s} tol {tol:.0e}  {wall * 1e3:9.2f} ms  NFE {nfe:6d}  "
                    f"steps {steps:5d}  err {err:.2e}  (n={reps})"
                )
    return points


def error_of(y, ref):
    """Max over samples of the max-norm error relative to the sample's max-norm (scale-free)."""
    y = y.double().reshape(ref.shape)
    if ref.dim() == 1:
        return float((y - ref).abs().max() / ref.abs().max())
    return float(((y - ref).abs().amax(-1) / ref.abs().amax(-1)).max())
