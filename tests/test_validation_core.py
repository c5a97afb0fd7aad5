"""Reliability of the core (issue 16): no stalls, tracebacks or hidden failures for inputs a new
user tries. Each section belongs to one area; keep them separate."""

import math

import pytest
import torch

import torchnde as tn
from torchnde._solve import NONFINITE_REJECTIONS

F64 = torch.float64

# ============================================================================================
# the integration loop: NaN walls, step limits, empty batches, the meta device, failure reports


def _nan_after_half(t, y, args):
    """-y before t = 0.5 and NaN from there on (a vector field defined only up to some time)."""
    if isinstance(t, torch.Tensor) and t.dim() > 0:  # per-sample: one time per sample
        return torch.where((t < 0.5).unsqueeze(-1), -y, torch.full_like(y, math.nan))
    return -y if t < 0.5 else torch.full_like(y, math.nan)


def _pid():
    return tn.PIDController(rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("solver", [tn.Tsit5(), tn.Dopri5()])
@pytest.mark.parametrize("per_sample", [False, True])
def test_loop_nan_wall_ends_the_solve_early(solver, per_sample):
    # was: creeping towards t = 0.5 for all of max_steps (4096 steps, 24,578 evaluations)
    term = tn.ODETerm(_nan_after_half)
    y0 = torch.ones(4, 2, dtype=F64)
    sol = tn.solve(term, solver, 0.0, 1.0, y0, controller=_pid(), per_sample=per_sample, throw=False)
    assert sol.stats["nfe"] < 300
    assert (torch.as_tensor(sol.result) == tn.Result.nonfinite).all()
    assert (torch.as_tensor(sol.stats["num_rejected_nonfinite"]) == NONFINITE_REJECTIONS).all()
    t_final = torch.as_tensor(sol.t_final)
    assert ((t_final > 0.49) & (t_final <= 0.5)).all()
    assert torch.isfinite(sol.ys).all()  # the last good state
    last = sol.ys[:, -1] if per_sample else sol.ys[-1]
    torch.testing.assert_close(last, y0 * torch.exp(-t_final.reshape(-1, 1)))


def test_loop_nan_wall_message_says_when_and_what_to_try():
    with pytest.raises(tn.SolveError) as e:
        tn.solve(tn.ODETerm(_nan_after_half), tn.Tsit5(), 0.0, 1.0, torch.ones(2, dtype=F64), controller=_pid())
    msg = str(e.value)
    assert "nonfinite" in msg and "at t = 0.49" in msg
    assert "valid only up to some time" in msg and "throw=False" in msg
    assert 0.49 < e.value.t <= 0.5 and e.value.samples is None


def test_loop_nan_wall_in_one_sample_does_not_hold_the_batch():
    # only sample 1 meets a NaN wall (at t = 0.5); the others solve to t1 = 1 as if alone
    def f(t, y, args):
        wall = (t >= 0.5) & (torch.arange(3) == 1)
        return torch.where(wall.unsqueeze(-1), torch.full_like(y, math.nan), -y)

    y0 = torch.ones(3, 2, dtype=F64)
    sol = tn.solve(tn.ODETerm(f), tn.Tsit5(), 0.0, 1.0, y0, controller=_pid(), per_sample=True, throw=False)
    assert sol.result.tolist() == [0, int(tn.Result.nonfinite), 0]
    assert sol.stats["nfe"] < 300
    assert sol.stats["num_rejected_nonfinite"].tolist() == [0, NONFINITE_REJECTIONS, 0]
    assert 0.49 < sol.t_final[1] <= 0.5 and sol.t_final[[0, 2]].tolist() == [1.0, 1.0]
    torch.testing.assert_close(sol.ys[[0, 2], -1], torch.full((2, 2), math.exp(-1), dtype=F64), rtol=1e-5, atol=0)
    with pytest.raises(tn.SolveError, match=r"failed for 1 of 3 samples:\n  nonfinite for samples \[1\] at t = \[0\.4"):
        tn.solve(tn.ODETerm(f), tn.Tsit5(), 0.0, 1.0, y0, controller=_pid(), per_sample=True)
    try:
        tn.solve(tn.ODETerm(f), tn.Tsit5(), 0.0, 1.0, y0, controller=_pid(), per_sample=True)
    except tn.SolveError as e:
        assert e.samples == [1] and 0.49 < e.t[1] <= 0.5


def test_loop_nan_in_state_space_ends_too():
    # y' = -sqrt(y) reaches y = 0 at t = 2; trial steps past it take sqrt of negative numbers
    term = tn.ODETerm(lambda t, y, a: -torch.sqrt(y))
    for solver in (tn.Tsit5(), tn.Dopri5()):
        sol = tn.solve(term, solver, 0.0, 3.0, torch.ones(2, dtype=F64), controller=_pid(), throw=False)
        assert sol.result == tn.Result.nonfinite
        assert sol.stats["num_steps"] < 500  # was 4096 (max_steps) for Dopri5
        assert abs(sol.t_final - 2.0) < 1e-3


def test_loop_nan_from_a_too_long_step_is_not_a_wall():
    # NaN outside |y| < 10: a first step of 100 leaves that region; smaller steps do not
    term = tn.ODETerm(lambda t, y, a: torch.where(y.abs() < 10, -y, torch.full_like(y, math.nan)))
    for per_sample in (False, True):
        y0 = torch.ones(3, 1, dtype=F64)
        sol = tn.solve(term, tn.Tsit5(), 0.0, 5.0, y0, dt0=100.0, controller=_pid(), per_sample=per_sample)
        assert sol.successful
        assert (torch.as_tensor(sol.stats["num_rejected_nonfinite"]) > 0).all()
        torch.testing.assert_close(sol.ys[:, -1] if per_sample else sol.ys[-1], y0 * math.exp(-5.0))


@pytest.mark.parametrize("per_sample", [False, True])
def test_loop_max_steps_is_said_even_after_nan(per_sample):
    # the step limit is the reason the solve stopped: said so, with the NaN as a hint
    kw = dict(controller=_pid(), max_steps=20, per_sample=per_sample)
    y0 = torch.ones(2, 1, dtype=F64)
    sol = tn.solve(tn.ODETerm(_nan_after_half), tn.Tsit5(), 0.0, 1.0, y0, throw=False, **kw)
    assert (torch.as_tensor(sol.result) == tn.Result.max_steps_reached).all()
    assert (torch.as_tensor(sol.stats["num_rejected_nonfinite"]) > 0).all()
    with pytest.raises(tn.SolveError, match=r"(?s)max_steps_reached.*increasing max_steps.*NaN/inf state"):
        tn.solve(tn.ODETerm(_nan_after_half), tn.Tsit5(), 0.0, 1.0, y0, **kw)


def test_loop_stats_have_the_same_keys_in_every_mode():
    term = tn.ODETerm(lambda t, y, a: -y)
    y0 = torch.ones(2, 1)
    keys = {"num_steps", "num_accepted", "num_rejected", "num_rejected_nonfinite", "nfe"}
    for per_sample in (False, True):
        for kw in (dict(dt0=0.1), dict(controller=_pid())):
            sol = tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, per_sample=per_sample, **kw)
            assert set(sol.stats) == keys
            assert (torch.as_tensor(sol.stats["num_rejected_nonfinite"]) == 0).all()
            assert torch.as_tensor(sol.t_final).eq(1.0).all()


_EMPTY_SAVEATS = [
    tn.SaveAt(t1=True),
    tn.SaveAt(t0=True, ts=[0.0, 0.5, 1.0]),
    tn.SaveAt(steps=True),
    tn.SaveAt(t1=True, dense=True),
]


@pytest.mark.parametrize("saveat", _EMPTY_SAVEATS, ids=["t1", "ts", "steps", "dense"])
@pytest.mark.parametrize("kw", [dict(dt0=0.1), dict(controller=tn.PIDController())], ids=["fixed", "adaptive"])
def test_loop_empty_batch_is_an_empty_solution(saveat, kw):
    # was: ZeroDivisionError in the PID controller (adaptive) / IndexError (per-sample)
    term = tn.ODETerm(lambda t, y, a: -y)
    y0 = torch.ones(0, 3)
    n_saved = {"t1": 1, "ts": 4, "dense": 1}
    shared = tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, saveat=saveat, **kw)
    assert shared.successful and shared.ys.shape[1:] == (0, 3) and shared.ys.shape[0] == shared.ts.shape[0]
    per = tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, saveat=saveat, per_sample=True, **kw)
    assert per.successful and per.result.shape == (0,) and per.stats["num_steps"].shape == (0,)
    T = n_saved.get("ts" if saveat.ts is not None else "steps" if saveat.steps else "dense" if saveat.dense else "t1")
    if T is not None:
        assert shared.ys.shape == (T, 0, 3) and shared.ts.shape == (T,)
    assert per.ys.shape[0] == 0 and per.ys.shape[2:] == (3,) and per.ts.shape == per.ys.shape[:2]
    if saveat.dense:
        assert shared.evaluate(0.5).shape == (0, 3) and per.evaluate(0.5).shape == (0, 3)


def test_loop_empty_batch_trees_and_backwards():
    term = tn.ODETerm(lambda t, y, a: {k: -v for k, v in y.items()})
    y0 = {"a": torch.ones(0, 3), "b": torch.ones(0, 2, 2)}
    sol = tn.solve(term, tn.Tsit5(), 1.0, 0.0, y0, dt0=-0.1, per_sample=True, saveat=tn.SaveAt(ts=[1.0, 0.5, 0.0]))
    assert sol.ys["a"].shape == (0, 3, 3) and sol.ys["b"].shape == (0, 3, 2, 2) and sol.ts.shape == (0, 3)


@pytest.mark.parametrize("per_sample", [False, True])
def test_loop_meta_device_is_refused_early(per_sample):
    # was: "Tensor.item() cannot be called on meta tensors" from inside the loop
    calls = []
    term = tn.ODETerm(lambda t, y, a: calls.append(t) or -y)
    for y0 in (torch.ones(2, 3, device="meta"), (torch.ones(2, 3, device="meta"),)):
        for kw in (dict(dt0=0.1), dict(controller=_pid())):
            with pytest.raises(ValueError, match="cannot run on the meta device.*real device"):
                tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, per_sample=per_sample, **kw)
    assert not calls  # refused before any evaluation


