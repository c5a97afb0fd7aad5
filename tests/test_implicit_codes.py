"""The loop's side of implicit solvers: a failed Newton solve is a rejected step (adaptive), or
ends the solve with its own result code (fixed steps, which cannot be shrunk)."""

import torch

import torchnde as tn
from torchnde import Result

F64 = torch.float64


def blowup(t, y, args):
    return y**2


def test_fixed_step_newton_failures_end_with_their_code():
    # implicit Euler on y' = y^2, y0 = 1: I - h J = 1 - 2h is singular at h = 0.5, and
    # z = 1 + h z^2 has no real root for h = 0.45
    sol = tn.solve(tn.ODETerm(blowup), tn.ImplicitEuler(), 0.0, 0.9, torch.ones(2, dtype=F64), dt0=0.5, throw=False)
    assert sol.result == Result.singular_jacobian and sol.stats["num_accepted"] == 0
    y0 = torch.tensor([[1.0], [0.1]], dtype=F64)
    sol = tn.solve(tn.ODETerm(blowup), tn.ImplicitEuler(), 0.0, 0.9, y0, dt0=0.45, per_sample=True, throw=False)
    assert sol.result.tolist() == [Result.nonlinear_divergence, Result.successful]
    assert torch.equal(sol.ys[0, -1], y0[0])  # not a silent wrong answer: the state where it stopped
    try:
        tn.solve(tn.ODETerm(blowup), tn.ImplicitEuler(), 0.0, 0.9, torch.ones(2, dtype=F64), dt0=0.5)
    except tn.SolveError as e:
        assert "singular" in str(e) and e.result == Result.singular_jacobian
    else:  # pragma: no cover
        raise AssertionError("no SolveError")


def test_adaptive_newton_failures_are_rejected_steps():
    """The first step of an adaptive implicit solve fails its Newton solve; the step shrinks and the
    solve reaches y(0.9) = 10 (y' = y^2, y0 = 1)."""
    sol = tn.solve(
        tn.ODETerm(blowup),
        tn.Kvaerno3(),
        0.0,
        0.9,
        torch.ones(1, dtype=F64),
        dt0=0.6,
        controller=tn.PIDController(rtol=1e-8, atol=1e-8),
    )
    assert sol.stats["num_rejected"] >= 1 and abs(float(sol.ys[-1, 0]) - 10.0) < 1e-3


def test_newton_counters_reach_the_solution_stats():
    sol = tn.solve(
        tn.ODETerm(lambda t, y, a: -50 * y),
        tn.Kvaerno3(),
        0.0,
        1.0,
        torch.ones(2, dtype=F64),
        controller=tn.PIDController(rtol=1e-6, atol=1e-6),
    )
    s = sol.stats
    assert isinstance(s["newton_iterations"], int) and s["newton_iterations"] > 0 and s["num_lu"] >= 1
    sol = tn.solve(
        tn.ODETerm(lambda t, y, a: -50 * y),
        tn.Kvaerno3(),
        0.0,
        1.0,
        torch.ones(3, 1, dtype=F64),
        controller=tn.PIDController(rtol=1e-6, atol=1e-6),
        per_sample=True,
    )
    assert sol.stats["newton_iterations"].shape == (3,) and (sol.stats["newton_failures"] == 0).all()


def test_explicit_solver_on_a_stiff_problem_suggests_an_implicit_one():
    try:
        tn.solve(
            tn.ODETerm(lambda t, y, a: -1e5 * (y - torch.cos(t))),
            tn.Tsit5(),
            0.0,
            1.0,
            torch.zeros(1, dtype=F64),
            controller=tn.PIDController(rtol=1e-6, atol=1e-6),
            max_steps=200,
        )
    except tn.SolveError as e:
        assert e.result == Result.max_steps_reached and "Kvaerno5()" in str(e) and "stiff" in str(e)
    else:  # pragma: no cover
        raise AssertionError("no SolveError")
