"""Per-sample mode: every sample is an independent problem."""

import math

import pytest
import torch

import torchnde as tn

F64 = torch.float64


def pid(tol=1e-7, **kw):
    return tn.PIDController(rtol=tol, atol=tol, **kw)


def vdp(t, y, mu):
    # Van der Pol with a per-sample stiffness parameter mu of shape (B,)
    x, v = y[..., 0], y[..., 1]
    return torch.stack([v, mu * (1 - x**2) * v - x], -1)


@pytest.mark.parametrize("solver", [tn.Bosh3, tn.Dopri5, tn.Tsit5, tn.Dopri8])
def test_sample_answer_does_not_depend_on_batch(solver):
    torch.manual_seed(1)
    B = 6
    y0 = torch.randn(B, 2, dtype=F64)
    mu = torch.linspace(0.1, 3.0, B, dtype=F64)
    ts = torch.linspace(0, 4, 9, dtype=F64)
    sol = tn.solve(
        tn.ODETerm(vdp), solver(), 0.0, 4.0, y0, args=mu, controller=pid(), per_sample=True, saveat=tn.SaveAt(ts=ts)
    )
    steps = sol.stats["num_steps"]
    assert len(set(steps.tolist())) > 1, "samples should need different numbers of steps"
    for i in range(B):
        alone = tn.solve(
            tn.ODETerm(vdp),
            solver(),
            0.0,
            4.0,
            y0[i : i + 1],
            args=mu[i : i + 1],
            controller=pid(),
            per_sample=True,
            saveat=tn.SaveAt(ts=ts),
        )
        assert alone.stats["num_steps"].item() == steps[i].item()
        assert alone.stats["num_rejected"].item() == sol.stats["num_rejected"][i].item()
        torch.testing.assert_close(alone.ys[0], sol.ys[i], rtol=1e-12, atol=1e-12)


def test_per_sample_intervals_and_save_times():
    B = 3
    y0 = torch.ones(B, 1, dtype=F64)
    t0 = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    t1 = torch.tensor([1.0, 2.0, 1.5], dtype=F64)
    ts = torch.stack([torch.linspace(float(a), float(b), 5, dtype=F64) for a, b in zip(t0, t1)])
    sol = tn.solve(
        tn.ODETerm(lambda t, y, a: -y),
        tn.Tsit5(),
        t0,
        t1,
        y0,
        controller=pid(),
        per_sample=True,
        saveat=tn.SaveAt(ts=ts, dense=True),
    )
    torch.testing.assert_close(sol.ts, ts)
    torch.testing.assert_close(sol.ys[..., 0], torch.exp(-(ts - t0[:, None])), rtol=1e-6, atol=0)
    # dense output, one query time per sample and several per sample
    q = torch.tensor([0.3, 1.7, 1.2], dtype=F64)
    torch.testing.assert_close(sol.evaluate(q)[:, 0], torch.exp(-(q - t0)), rtol=1e-6, atol=0)
    q2 = torch.stack([q, (t0 + t1) / 2], 1)
    torch.testing.assert_close(sol.evaluate(q2)[..., 0], torch.exp(-(q2 - t0[:, None])), rtol=1e-6, atol=0)
    torch.testing.assert_close(sol.derivative(q)[:, 0], -torch.exp(-(q - t0)), rtol=1e-5, atol=0)


def test_per_sample_time_is_a_tensor_and_backwards():
    seen = []

    def f(t, y, a):
        seen.append(t)
        return torch.ones_like(y) * t[:, None]

    y0 = torch.zeros(2, 1, dtype=F64)
    sol = tn.solve(tn.ODETerm(f), tn.RK4(), torch.tensor([1.0, 2.0], dtype=F64), 0.0, y0, dt0=-0.25, per_sample=True)
    assert isinstance(seen[0], torch.Tensor) and seen[0].shape == (2,)
    # y' = t from t0 back to 0: y = (0 - t0^2) / 2
    torch.testing.assert_close(sol.ys[:, -1, 0], torch.tensor([-0.5, -2.0], dtype=F64))
    assert sol.stats["num_steps"].tolist() == [4, 8]


def test_one_failing_sample_does_not_stop_the_others():
    # sample 1 blows up in finite time (y' = y^2 from y0 = 2 explodes at t = 0.5)
    y0 = torch.tensor([[0.5], [2.0], [-1.0]], dtype=F64)
    sol = tn.solve(
        tn.ODETerm(lambda t, y, a: y**2),
        tn.Tsit5(),
        0.0,
        1.0,
        y0,
        controller=pid(1e-8),
        per_sample=True,
        throw=False,
        max_steps=2000,
    )
    res = sol.result.tolist()
    assert res[0] == tn.Result.successful and res[2] == tn.Result.successful
    assert res[1] != tn.Result.successful
    torch.testing.assert_close(
        sol.ys[[0, 2], -1, 0], torch.tensor([0.5 / (1 - 0.5), -1.0 / (1 + 1.0)], dtype=F64), rtol=1e-6, atol=0
    )
    with pytest.raises(tn.SolveError, match=r"samples \[1\]"):
        tn.solve(
            tn.ODETerm(lambda t, y, a: y**2),
            tn.Tsit5(),
            0.0,
            1.0,
            y0,
            controller=pid(1e-8),
            per_sample=True,
            max_steps=2000,
        )


def test_nan_in_one_sample_is_isolated():
    def f(t, y, a):
        out = -y
        return torch.where((t > 0.5)[:, None] & (torch.arange(3)[:, None] == 1), torch.nan, out)

    y0 = torch.ones(3, 1, dtype=F64)
    sol = tn.solve(tn.ODETerm(f), tn.RK4(), 0.0, 1.0, y0, dt0=0.1, per_sample=True, throw=False)
    assert sol.result.tolist() == [0, int(tn.Result.nonfinite), 0]
    torch.testing.assert_close(sol.ys[[0, 2], -1, 0], torch.full((2,), math.exp(-1), dtype=F64), rtol=1e-5, atol=0)


def test_per_sample_steps_are_padded():
    y0 = torch.ones(2, 1, dtype=F64)
    mu = torch.tensor([1.0, 20.0], dtype=F64)
    sol = tn.solve(
        tn.ODETerm(lambda t, y, a: -a[:, None] * y),
        tn.Tsit5(),
        0.0,
        1.0,
        y0,
        args=mu,
        controller=pid(1e-6),
        per_sample=True,
        saveat=tn.SaveAt(steps=True),
    )
    n = sol.stats["num_accepted"]
    assert n[0] < n[1]
    assert sol.ts.shape == (2, int(n.max()))
    assert torch.isnan(sol.ts[0, int(n[0]) :]).all() and not torch.isnan(sol.ts[0, : int(n[0])]).any()
    assert sol.ts[0, int(n[0]) - 1].item() == 1.0


def test_per_sample_stats_and_constant_steps():
    y0 = torch.ones(2, 3)
    t1 = torch.tensor([1.0, 2.0])
    sol = tn.solve(tn.ODETerm(lambda t, y, a: -y), tn.Euler(), 0.0, t1, y0, dt0=0.1, per_sample=True)
    assert sol.stats["num_steps"].tolist() == [10, 20]
    assert sol.ys.dtype == torch.float32


def test_gradients_through_per_sample_mode():
    torch.manual_seed(0)
    W = (torch.randn(2, 2, dtype=F64) * 0.5).requires_grad_()
    y0 = torch.randn(3, 2, dtype=F64, requires_grad=True)

    def run(y0, W):
        f = lambda t, y, a: torch.tanh(y @ a.T)
        return tn.solve(
            tn.ODETerm(f),
            tn.RK4(),
            0.0,
            torch.tensor([0.5, 1.0, 0.75], dtype=F64),
            y0,
            args=W,
            dt0=0.05,
            per_sample=True,
        ).ys

    assert torch.autograd.gradcheck(run, (y0, W))
