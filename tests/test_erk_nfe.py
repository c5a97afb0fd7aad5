"""Evaluation counts of the explicit Runge--Kutta solvers: without FSAL the derivative at a step's
start is evaluated lazily (``LazyDerivative``), so constant steps cost exactly ``stages`` each and
dense output or an adaptive start reuse what they evaluate."""

import math

import pytest
import torch

import torchnde as tn

D = torch.float64


def decay(t, y, args):
    c = torch.cos(t).unsqueeze(-1) if isinstance(t, torch.Tensor) else math.cos(t)
    return -y * (1 + c)


Y0 = torch.tensor([1.0, 2.0], dtype=D)


def exact(t):
    return Y0 * math.exp(-(t + math.sin(t)))


@pytest.mark.parametrize(
    "solver, stages", [(tn.Euler(), 1), (tn.Heun(), 2), (tn.Midpoint(), 2), (tn.Ralston(), 2), (tn.RK4(), 4)]
)
@pytest.mark.parametrize("backward", [False, True])
def test_constant_steps_cost_exactly_stages_per_step(solver, stages, backward):
    t0, t1 = (1.0, 0.0) if backward else (0.0, 1.0)
    y0 = exact(t0)
    sol = tn.solve(tn.ODETerm(decay), solver, t0, t1, y0, dt0=(t1 - t0) / 10)
    assert sol.stats["num_steps"] == 10
    assert sol.stats["nfe"] == 10 * stages
    torch.testing.assert_close(sol.ys[-1], exact(t1), rtol={1: 0.2, 2: 2e-2, 4: 1e-4}[solver.order], atol=0)


@pytest.mark.parametrize("solver", [tn.Euler(), tn.Heun(), tn.RK4()])
def test_dense_output_evaluates_each_end_point_once(solver):
    stages = solver.tableau.num_stages
    ts = torch.linspace(0.05, 0.95, 10, dtype=D)  # one save time inside every step
    dense = tn.solve(tn.ODETerm(decay), solver, 0.0, 1.0, Y0, dt0=0.1, saveat=tn.SaveAt(ts=ts, dense=True))
    # each step's end derivative is made once (by the dense output) and reused by the next step
    assert dense.stats["nfe"] == 10 * stages + 1
    steps = tn.solve(tn.ODETerm(decay), solver, 0.0, 1.0, Y0, dt0=0.1, saveat=tn.SaveAt(steps=True))
    assert steps.stats["nfe"] == 10 * stages
    # the step ends agree, and the cubic Hermite interpolant at ts is the one from the end derivatives
    torch.testing.assert_close(dense.evaluate(steps.ts), steps.ys, rtol=1e-12, atol=1e-12)
    y = torch.cat([Y0[None], steps.ys])
    grid = torch.cat([torch.zeros(1, dtype=D), steps.ts])
    for k, s in enumerate(ts.tolist()):
        i = int(s / 0.1)
        h, th = float(grid[i + 1] - grid[i]), (s - float(grid[i])) / float(grid[i + 1] - grid[i])
        f0, f1 = decay(float(grid[i]), y[i], None), decay(float(grid[i + 1]), y[i + 1], None)
        h00, h10, h01, h11 = 2 * th**3 - 3 * th**2 + 1, th**3 - 2 * th**2 + th, -2 * th**3 + 3 * th**2, th**3 - th**2
        want = h00 * y[i] + h10 * h * f0 + h01 * y[i + 1] + h11 * h * f1
        torch.testing.assert_close(dense.ys[k], want, rtol=1e-12, atol=1e-12)


def test_adaptive_heun_evaluates_the_start_once():
    pid = tn.PIDController(rtol=1e-6, atol=1e-6)
    sol = tn.solve(tn.ODETerm(decay), tn.Heun(), 0.0, 1.0, Y0, controller=pid)
    s = sol.stats
    # f(t0) once (shared by the automatic initial step and the first step), the initial-step probe,
    # the second stage of every try, and the first stage of every later accepted step
    assert s["nfe"] == 1 + 1 + s["num_steps"] + (s["num_accepted"] - 1)
    torch.testing.assert_close(sol.ys[-1], exact(1.0), rtol=1e-4, atol=0)


def test_fsal_and_per_sample_are_unchanged():
    sol = tn.solve(tn.ODETerm(decay), tn.Tsit5(), 0.0, 1.0, Y0, dt0=0.1)
    assert sol.stats["nfe"] == 1 + 6 * 10  # FSAL: the first stage once, then 6 a step
    y0 = torch.stack([Y0, 2 * Y0])
    ps = tn.solve(tn.ODETerm(decay), tn.Euler(), 0.0, 1.0, y0, dt0=0.1, per_sample=True)
    shared = tn.solve(tn.ODETerm(decay), tn.Euler(), 0.0, 1.0, y0, dt0=0.1)
    torch.testing.assert_close(ps.ys[:, -1], shared.ys[-1], rtol=1e-12, atol=1e-12)
    assert shared.stats["nfe"] == 10


def test_lazy_derivative_keeps_gradients():
    y0 = Y0.clone().requires_grad_(True)
    sol = tn.solve(tn.ODETerm(decay), tn.Heun(), 0.0, 1.0, y0, dt0=0.05)
    (g,) = torch.autograd.grad(sol.ys[-1].sum(), y0)
    # a linear ODE: y(1) = y0 * c, so the gradient is c in each component
    torch.testing.assert_close(g, (sol.ys[-1] / Y0).detach(), rtol=1e-12, atol=1e-12)
