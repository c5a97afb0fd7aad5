"""The adaptive solvers against reference solutions of the DETEST problems (Hull, Enright,
Fellen & Sedgwick 1972) and of the Lorenz, Arenstorf and Pleiades problems: accuracy at the end
of the interval, tolerance proportionality and dense output at saved times.

Errors are measured per component relative to the tolerance the solve asked for,
``|y - y_ref| / (atol + rtol |y_ref|)``, with ``rtol = atol = tol``; the references come from
SciPy's DOP853 at ``rtol=1e-13`` (see ``problems.py``). Every solve is run once and shared by the
tests through a cache.

The controller bounds the *local* error of each step, so the *global* error at ``t1`` may exceed
the tolerance: by how much depends on the method and on the problem's conditioning. The bounds
below were calibrated on this suite. On these problems Bosh3 and Dopri5 take the same number of
evaluations as SciPy's ``RK23`` and ``RK45`` to within 8% and reach errors of the same size
(median ratio 1), so the large ratios below belong to the methods and problems, not to a defect.
Dopri8 controls with DOP853's fifth-order estimate alone: it takes 1.3-2x the evaluations of
SciPy's ``DOP853`` and is correspondingly more accurate.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import torchnde as tn
from problems import DETEST, PROBLEMS, reference

SOLVERS = (tn.Bosh3, tn.Dopri5, tn.Tsit5, tn.Dopri8)
NAMES = tuple(PROBLEMS)

# Tolerances (rtol = atol) of the accuracy test at t1.
ACCURACY_TOLS = {"Bosh3": (1e-6,), "Dopri5": (1e-6, 1e-8), "Tsit5": (1e-6, 1e-8), "Dopri8": (1e-6, 1e-8)}

# Largest error / tolerance accepted on well-conditioned problems. Observed maxima at the
# tolerances above: Bosh3 189 (B1; SciPy's RK23 gives the same 189, and the ratio stays at 189
# for every tolerance from 1e-5 to 1e-8), Dopri5 53 (C5), Tsit5 25 (B1), Dopri8 2.6 (C2).
BOUND = {"Bosh3": 500.0, "Dopri5": 200.0, "Tsit5": 200.0, "Dopri8": 20.0}

# Problems whose conditioning amplifies the global error, with the factor applied to BOUND:
# - D1..D5 (Kepler orbits over ~3 revolutions): a step error changes the energy and hence the
#   period, so the phase error grows linearly in time. Observed up to 700 (Dopri5, D1 at 1e-6;
#   SciPy's RK45: 702), 517 (Bosh3, D2), 258 (Tsit5, D5), 4.4 (Dopri8, D5).
# - lorenz: chaotic (Lyapunov exponent ~0.9). Observed 1031 (Bosh3), 124 (Dopri5), 79 (Tsit5).
# - pleiades: close encounters of the stars. Observed 895 (Dopri5; RK45: 871), 731 (Bosh3).
# - arenstorf: one period of the orbit, which passes close to the Moon; errors in the close
#   approach grow by orders of magnitude. Observed 49555 (Bosh3; RK23: 49689), 14739 (Dopri5 at
#   1e-8; RK45: 14753), 9357 (Tsit5), 451 (Dopri8; SciPy's DOP853 reaches 8434 at 1e-8).
AMPLIFICATION = {"D1": 10, "D2": 10, "D3": 10, "D4": 10, "D5": 10, "lorenz": 10, "pleiades": 10, "arenstorf": 300}

# Tolerance proportionality: (loose tol, tight tol, smallest accepted error reduction).
# - Bosh3: with error per step control the global error is ~proportional to the tolerance, so a
#   1000x drop should give ~1000x; the smallest observed reduction is 57x (C3, whose error at
#   1e-4 is fortuitously small) and 113x (arenstorf, whose error at 1e-4 is not yet asymptotic).
# - fifth and eighth order: expected ~1e4 for a 1e4 drop; the smallest observed is ~1500x.
PROPORTIONALITY = {
    "Bosh3": (1e-4, 1e-7, 20.0),
    "Dopri5": (1e-5, 1e-9, 100.0),
    "Tsit5": (1e-5, 1e-9, 100.0),
    "Dopri8": (1e-5, 1e-9, 100.0),
}
# Errors below this (relative to 1 + |y|) are at the level of the reference and of roundoff.
ERROR_FLOOR = 1e-12

# Problems checked at saved times (dense output), with the tolerance used.
DENSE_PROBLEMS = ("B5", "D3", "E2", "lorenz")
DENSE_TOL = 1e-6
DENSE_POINTS = 40


@dataclass(frozen=True)
class Run:
    y1: np.ndarray
    nfe: int
    num_steps: int
    num_rejected: int


def _solve(solver, problem, tol, **kwargs):
    return tn.solve(
        tn.ODETerm(problem.vector_field),
        solver(),
        problem.t0,
        problem.t1,
        problem.y0,
        controller=tn.PIDController(rtol=tol, atol=tol),
        max_steps=100_000,
        **kwargs,
    )


@functools.cache
def _run(solver_name: str, problem_name: str, tol: float) -> Run:
    sol = _solve(getattr(tn, solver_name), PROBLEMS[problem_name], tol)
    assert sol.result == tn.Result.successful
    stats = sol.stats
    return Run(
        y1=sol.ys[-1].detach().numpy().copy(),
        nfe=int(stats["nfe"]),
        num_steps=int(stats["num_steps"]),
        num_rejected=int(stats["num_rejected"]),
    )


def _scaled_error(y, ref, tol):
    """Max over components (and times) of |y - ref| / (tol + tol |ref|)."""
    return float(np.max(np.abs(y - ref) / (tol + tol * np.abs(ref))))


def _bound(solver_name, problem_name):
    return BOUND[solver_name] * AMPLIFICATION.get(problem_name, 1)


def _id(x):
    if isinstance(x, type):
        return x.__name__
    if isinstance(x, float):
        return f"{x:.0e}"
    return str(x)


# --------------------------------------------------------------------------------------------
# the problems and references themselves


def test_problem_set():
    assert DETEST == tuple(f"{c}{i}" for c in "ABCDE" for i in range(1, 6))
    for name in DETEST:
        p = PROBLEMS[name]
        assert (p.t0, p.t1) == (0.0, 20.0)
    dims = {"C1": 10, "C2": 10, "C3": 10, "C4": 51, "C5": 30, "pleiades": 28, "arenstorf": 4, "lorenz": 3}
    for name, dim in dims.items():
        assert PROBLEMS[name].dim == dim


@pytest.mark.parametrize("name", NAMES)
def test_vector_field_dtype_and_batch_agnostic(name):
    p = PROBLEMS[name]
    y = p.y0 + 0.01 * torch.arange(p.dim, dtype=torch.float64)
    f64 = p.vector_field(0.5, y, None)
    assert f64.shape == y.shape and f64.dtype == torch.float64
    np.testing.assert_allclose(p.numpy_rhs(0.5, y.numpy()), f64.numpy(), rtol=0, atol=0)
    # float32, batched state with per-sample times
    yb = torch.stack([y, y]).float()
    fb = p.vector_field(torch.tensor([0.5, 0.5]), yb, None)
    assert fb.shape == yb.shape and fb.dtype == torch.float32
    np.testing.assert_allclose(fb.double().numpy(), torch.stack([f64, f64]).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in NAMES if PROBLEMS[n].exact is not None])
def test_reference_matches_exact_solution(name):
    p = PROBLEMS[name]
    exact = p.exact(p.t1)
    ref = reference(p)
    assert np.max(np.abs(ref - exact) / (1.0 + np.abs(exact))) < 1e-10
    ts = np.linspace(p.t0, p.t1, 5)[1:]
    refs = reference(p, ts)
    assert refs.shape == (4, p.dim)
    # integrated in segments, the end value agrees with the single-interval reference
    assert np.max(np.abs(refs[-1] - ref) / (1.0 + np.abs(ref))) < 1e-10
    for t, r in zip(ts, refs, strict=True):
        e = p.exact(t)
        assert np.max(np.abs(r - e) / (1.0 + np.abs(e))) < 1e-10


def test_arenstorf_reference_is_periodic():
    p = PROBLEMS["arenstorf"]
    np.testing.assert_allclose(reference(p), p.y0.numpy(), rtol=0, atol=1e-8)


# --------------------------------------------------------------------------------------------
# accuracy at t1


def _accuracy_cases():
    for solver in SOLVERS:
        for tol in ACCURACY_TOLS[solver.__name__]:
            for name in NAMES:
                yield pytest.param(solver, name, tol, id=f"{solver.__name__}-{name}-{_id(tol)}")


@pytest.mark.parametrize("solver, name, tol", list(_accuracy_cases()))
def test_accuracy_at_t1(solver, name, tol):
    run = _run(solver.__name__, name, tol)
    err = _scaled_error(run.y1, reference(PROBLEMS[name]), tol)
    bound = _bound(solver.__name__, name)
    assert err <= bound, (
        f"{solver.__name__} on {name} at tol {tol:g}: error/tol = {err:.3g} > {bound:g} (nfe {run.nfe})"
    )


# --------------------------------------------------------------------------------------------
# tolerance proportionality


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("solver", SOLVERS, ids=_id)
def test_tolerance_proportionality(solver, name):
    loose_tol, tight_tol, factor = PROPORTIONALITY[solver.__name__]
    ref = reference(PROBLEMS[name])
    loose, tight = _run(solver.__name__, name, loose_tol), _run(solver.__name__, name, tight_tol)

    def weighted(y):  # = tol * error/tol, since atol = rtol = tol
        return float(np.max(np.abs(y - ref) / (1.0 + np.abs(ref))))

    e_loose, e_tight = weighted(loose.y1), weighted(tight.y1)
    assert e_tight <= max(e_loose / factor, ERROR_FLOOR), (
        f"{solver.__name__} on {name}: error {e_loose:.3g} at tol {loose_tol:g} but {e_tight:.3g} at "
        f"{tight_tol:g} (reduction {e_loose / e_tight:.3g}x < {factor:g}x)"
    )
    # the work grows, at most about as fast as the step-size rule h ~ tol^(1/(q+1)) predicts for
    # an error estimate of order q (factor 2 of slack)
    assert tight.nfe > loose.nfe
    predicted = (loose_tol / tight_tol) ** (1.0 / (solver.error_order + 1))
    assert tight.nfe <= 2.0 * predicted * loose.nfe, (
        f"{solver.__name__} on {name}: nfe {loose.nfe} -> {tight.nfe}, more than 2x the predicted growth {predicted:.3g}x"
    )


# --------------------------------------------------------------------------------------------
# dense output at saved times


@pytest.mark.parametrize("name", DENSE_PROBLEMS)
@pytest.mark.parametrize("solver", SOLVERS, ids=_id)
def test_saved_times_against_reference(solver, name):
    p = PROBLEMS[name]
    ts = np.linspace(p.t0, p.t1, DENSE_POINTS + 1)[1:]
    ref = reference(p, ts)
    sol = _solve(solver, p, DENSE_TOL, saveat=tn.SaveAt(ts=torch.from_numpy(ts), dense=True))
    assert sol.result == tn.Result.successful
    ys = sol.ys.detach().numpy()
    assert ys.shape == (len(ts), p.dim)
    np.testing.assert_allclose(sol.ts.detach().numpy(), ts, rtol=0, atol=1e-12)
    err = _scaled_error(ys, ref, DENSE_TOL)
    bound = _bound(solver.__name__, name)
    assert err <= bound, f"{solver.__name__} on {name} at saved times: error/tol = {err:.3g} > {bound:g}"
    # saving does not change the steps: the end value is the same as without saving
    np.testing.assert_allclose(ys[-1], _run(solver.__name__, name, DENSE_TOL).y1, rtol=1e-13, atol=1e-13)
    # the dense interpolant evaluated afterwards gives the saved values
    dense = sol.evaluate(torch.from_numpy(ts)).detach().numpy()
    np.testing.assert_allclose(dense, ys, rtol=1e-12, atol=1e-12)
    # and between the saved times it stays as accurate (midpoints, a fresh set of times)
    mid = 0.5 * (np.concatenate([[p.t0], ts[:-1]]) + ts)
    err_mid = _scaled_error(sol.evaluate(torch.from_numpy(mid)).detach().numpy(), reference(p, mid), DENSE_TOL)
    assert err_mid <= bound, f"{solver.__name__} on {name} between saved times: error/tol = {err_mid:.3g} > {bound:g}"
    assert math.isfinite(err_mid)
