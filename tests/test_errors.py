"""Failure is a result: every result code, and every input check with its message."""

import math

import pytest
import torch

import torchnde as tn

F64 = torch.float64
y0 = torch.ones(2, dtype=F64)
term = tn.ODETerm(lambda t, y, a: -y)
ctrl = tn.PIDController(rtol=1e-6, atol=1e-6)


# --- result codes ----------------------------------------------------------------------------


def test_successful():
    sol = tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, controller=ctrl)
    assert sol.result == tn.Result.successful and sol.successful


def test_max_steps_reached():
    sol = tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, controller=ctrl, max_steps=3, throw=False)
    assert sol.result == tn.Result.max_steps_reached and not sol.successful
    assert sol.stats["num_steps"] == 3
    assert sol.ts[-1] < 1.0  # the partial solution: where it stopped
    with pytest.raises(tn.SolveError, match=r"max_steps_reached\) at t = .*increasing max_steps") as e:
        tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, controller=ctrl, max_steps=3)
    assert e.value.result == tn.Result.max_steps_reached
    assert e.value.solution is not None


def test_dt_min_reached():
    stiff = tn.ODETerm(lambda t, y, a: -1e4 * y)
    sol = tn.solve(
        stiff, tn.Tsit5(), 0.0, 1.0, y0, controller=tn.PIDController(rtol=1e-8, atol=1e-8, dtmin=0.01), throw=False
    )
    assert sol.result == tn.Result.dt_min_reached
    with pytest.raises(tn.SolveError, match="dtmin"):
        tn.solve(stiff, tn.Tsit5(), 0.0, 1.0, y0, controller=tn.PIDController(rtol=1e-8, atol=1e-8, dtmin=0.01))


def test_step_size_underflow_is_a_result_not_an_assert():
    # y' = y^2 from 1 blows up at t = 1: the steps shrink until t + dt == t
    blow = tn.ODETerm(lambda t, y, a: y**2)
    sol = tn.solve(blow, tn.Dopri5(), 0.0, 2.0, y0, controller=ctrl, throw=False, max_steps=100000)
    assert sol.result in (tn.Result.dt_min_reached, tn.Result.nonfinite)
    assert abs(sol.ts[-1].item() - 1.0) < 1e-3


@pytest.mark.parametrize("solver,kw", [(tn.RK4(), dict(dt0=0.1)), (tn.Tsit5(), dict(controller=ctrl))])
def test_nonfinite(solver, kw):
    # adaptive solvers shrink their steps towards t = 0.5 (each step ending past it fails); the
    # solve ends when max_steps runs out or the step size underflows, reported as non-finite
    nan_after = tn.ODETerm(lambda t, y, a: -y if t < 0.5 else y * math.nan)
    kw["max_steps"] = 500
    sol = tn.solve(nan_after, solver, 0.0, 1.0, y0, throw=False, **kw)
    assert sol.result == tn.Result.nonfinite
    assert 0.3 < sol.ts[-1].item() <= 0.5 + 1e-9
    assert torch.isfinite(sol.ys).all()  # the last good state is returned
    with pytest.raises(tn.SolveError, match="nonfinite.*NaN or infinite"):
        tn.solve(nan_after, solver, 0.0, 1.0, y0, **kw)


def test_nonfinite_initial_state():
    sol = tn.solve(term, tn.Tsit5(), 0.0, 1.0, torch.tensor([1.0, math.nan], dtype=F64), controller=ctrl, throw=False)
    assert sol.result == tn.Result.nonfinite and sol.stats["num_steps"] == 0


def test_result_messages_say_what_to_try():
    for r in tn.Result:
        assert len(r.message) > 15


# --- input checks ----------------------------------------------------------------------------


def test_vector_field_shape_mismatch():
    bad = tn.ODETerm(lambda t, y, a: y[:1])
    with pytest.raises(ValueError, match=r"returned Tensor\(1,\).*state y0 is Tensor\(2,\)"):
        tn.solve(bad, tn.Euler(), 0.0, 1.0, y0, dt0=0.1)


def test_vector_field_dtype_mismatch():
    bad = tn.ODETerm(lambda t, y, a: y.float())
    with pytest.raises(TypeError, match="dtype torch.float32.*torch.float64"):
        tn.solve(bad, tn.Euler(), 0.0, 1.0, y0, dt0=0.1)


def test_t0_equals_t1():
    with pytest.raises(ValueError, match="t0 == t1"):
        tn.solve(term, tn.Euler(), 1.0, 1.0, y0, dt0=0.1)


@pytest.mark.parametrize(
    "ts,match",
    [
        ([0.5, 0.2], "strictly increasing"),
        ([0.2, 0.2], "strictly increasing"),
        ([0.5, 1.5], r"inside \[t0, t1\]"),
        ([[0.1]], "1-D"),
    ],
)
def test_bad_save_times(ts, match):
    with pytest.raises(ValueError, match=match):
        tn.solve(term, tn.Euler(), 0.0, 1.0, y0, dt0=0.1, saveat=tn.SaveAt(ts=ts))


def test_save_times_backwards_must_decrease():
    with pytest.raises(ValueError, match="decreasing"):
        tn.solve(term, tn.Euler(), 1.0, 0.0, y0, dt0=-0.1, saveat=tn.SaveAt(ts=[0.2, 0.5]))


def test_dt0_sign_and_value():
    with pytest.raises(ValueError, match="sign of t1 - t0"):
        tn.solve(term, tn.Euler(), 0.0, 1.0, y0, dt0=-0.1)
    with pytest.raises(ValueError, match="non-zero"):
        tn.solve(term, tn.Euler(), 0.0, 1.0, y0, dt0=0.0)


def test_unknown_keyword_arguments_name_the_fix():
    with pytest.raises(TypeError, match=r"'rtol': tolerances belong to the controller"):
        tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, rtol=1e-3)
    with pytest.raises(TypeError, match=r"(?s)'method'.*valid keyword arguments are"):
        tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, method="dopri5")


def test_adaptive_controller_needs_error_estimate():
    with pytest.raises(TypeError, match="RK4 has no error estimate.*Tsit5"):
        tn.solve(term, tn.RK4(), 0.0, 1.0, y0, controller=ctrl)


def test_missing_step_size_policy():
    with pytest.raises(ValueError, match="dt0=.*PIDController"):
        tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0)


def test_classes_instead_of_instances():
    with pytest.raises(TypeError, match=r"use Tsit5\(\)"):
        tn.solve(term, tn.Tsit5, 0.0, 1.0, y0, dt0=0.1)
    with pytest.raises(TypeError, match="ODETerm"):
        tn.solve(lambda t, y, a: -y, tn.Tsit5(), 0.0, 1.0, y0, dt0=0.1)


def test_bad_state():
    with pytest.raises(TypeError, match="floating-point or complex"):
        tn.solve(term, tn.Euler(), 0.0, 1.0, torch.ones(2, dtype=torch.long), dt0=0.1)
    with pytest.raises(TypeError, match="share one dtype and device"):
        tn.solve(
            tn.ODETerm(lambda t, y, a: y), tn.Euler(), 0.0, 1.0, (torch.ones(1), torch.ones(1, dtype=F64)), dt0=0.1
        )
    with pytest.raises(TypeError, match="leaf of type"):
        tn.solve(term, tn.Euler(), 0.0, 1.0, [torch.ones(1), 3.0], dt0=0.1)


def test_bad_times():
    with pytest.raises(ValueError, match="finite"):
        tn.solve(term, tn.Euler(), 0.0, math.inf, y0, dt0=0.1)
    with pytest.raises(ValueError, match="per_sample=True"):
        tn.solve(term, tn.Euler(), torch.zeros(2), 1.0, y0, dt0=0.1)
    with pytest.raises(ValueError, match="same direction"):
        tn.solve(
            term,
            tn.Euler(),
            0.0,
            torch.tensor([1.0, -1.0], dtype=F64),
            torch.ones(2, 1, dtype=F64),
            dt0=0.1,
            per_sample=True,
        )


def test_bad_controller_arguments():
    with pytest.raises(ValueError, match="rtol > 0 or atol > 0"):
        tn.PIDController(rtol=0, atol=0)
    with pytest.raises(ValueError, match="factormin"):
        tn.PIDController(factormin=2.0)
    with pytest.raises(ValueError, match="dtmin <= dtmax"):
        tn.PIDController(dtmin=1.0, dtmax=0.1)
    with pytest.raises(ValueError, match="force_dtmin"):
        tn.PIDController(force_dtmin=True)


def test_bad_max_steps_and_progress():
    with pytest.raises(ValueError, match="max_steps"):
        tn.solve(term, tn.Euler(), 0.0, 1.0, y0, dt0=0.1, max_steps=0)
    with pytest.raises(TypeError, match="progress"):
        tn.solve(term, tn.Euler(), 0.0, 1.0, y0, dt0=0.1, progress="yes")


def test_saveat_conflict():
    with pytest.raises(ValueError, match="cannot be combined"):
        tn.SaveAt(steps=True, ts=[0.5])
