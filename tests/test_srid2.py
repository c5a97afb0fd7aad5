"""SRID2 (Rößler 2010), torchsde's ``srk`` for diagonal and scalar noise: strong order 1.5 on
problems with a closed-form solution, and its errors. (Not in ``SDE_SOLVERS``: the generic tests
also run every solver on general commutative and additive noise with several Brownian motions,
which SRID2's one-Brownian-motion-per-component iterated integrals do not cover.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchnde as tn
from torchnde.paths._brownian import VirtualBrownianTree
from torchnde.solvers import SRID2

F64 = torch.float64
A = torch.tensor([0.5, 0.8, 1.0], dtype=F64)
BETA = torch.tensor([0.3, -0.2, 0.1], dtype=F64)


def _problem(noise, batch=200, seed=1, levy_area="space-time", t1=1.0):
    """Itô ``dy = (b s + a^2 y / 2) dt + a s dW`` with ``s = sqrt(1 + y^2)``: ``asinh(y)`` is a drifted
    Brownian motion, ``y(t) = sinh(asinh(y0) + b t + a W(t))`` (one W per component, or one for all)."""
    shape = (batch, 3) if noise == "diagonal" else (batch, 1)
    path = VirtualBrownianTree(0.0, t1, shape, levy_area=levy_area, seed=seed, dtype=F64, tol=2**-12)

    def f(t, y, args):
        return BETA * torch.sqrt(1 + y * y) + 0.5 * A**2 * y

    def g(t, y, args):
        return A * torch.sqrt(1 + y * y)

    term = tn.MultiTerm(tn.ODETerm(f), tn.ControlTerm(g, path, noise=noise))
    y0 = torch.linspace(-0.5, 0.5, 3, dtype=F64).expand(batch, 3).clone()
    exact = torch.sinh(torch.asinh(y0) + BETA * t1 + A * path.evaluate(0.0, t1))
    return term, y0, exact


@pytest.mark.parametrize("noise", ["diagonal", "scalar"])
def test_strong_order_1_5(noise):
    term, y0, exact = _problem(noise)
    steps = (8, 16, 32, 64)
    errs = [float((tn.solve(term, SRID2(), 0.0, 1.0, y0, dt0=1 / n).ys[-1] - exact).norm(dim=-1).mean()) for n in steps]
    slope = float(np.polyfit(np.log([1 / n for n in steps]), np.log(errs), 1)[0])
    assert abs(slope - 1.5) <= 0.25, (slope, errs)
    # and an order of magnitude below Milstein at the same step
    milstein = float((tn.solve(term, tn.ItoMilstein(), 0.0, 1.0, y0, dt0=1 / 64).ys[-1] - exact).norm(dim=-1).mean())
    assert errs[-1] < milstein / 10


def test_float32_and_backwards_in_time():
    """float32 follows y0's dtype; t1 < t0 runs on the time-reversed path (an Itô solver is exact in
    law there only for additive noise: check it runs and is finite)."""
    path = VirtualBrownianTree(0.0, 1.0, (8, 3), levy_area="space-time", seed=1, dtype=torch.float32, tol=2**-12)
    term = tn.MultiTerm(
        tn.ODETerm(lambda t, y, a: -y), tn.ControlTerm(lambda t, y, a: 0.3 * torch.cos(y), path, noise="diagonal")
    )
    y32 = tn.solve(term, SRID2(), 0.0, 1.0, torch.ones(8, 3), dt0=1 / 32).ys[-1]
    assert y32.dtype == torch.float32 and torch.isfinite(y32).all()
    yb = tn.solve(term, SRID2(), 1.0, 0.0, torch.ones(8, 3), dt0=-1 / 32).ys[-1]
    assert torch.isfinite(yb).all()


def test_declarations_and_errors():
    assert SRID2.calculus == "ito" and SRID2.levy_area == "space-time" and SRID2.strong_order_for("commutative") == 1.5
    assert SRID2.strong_order_for("general") is None
    # general noise (even declared commutative): a TypeError naming the alternatives
    path = VirtualBrownianTree(0.0, 1.0, (2, 2), levy_area="space-time", seed=0, dtype=F64)
    term = tn.MultiTerm(
        tn.ODETerm(lambda t, y, a: -y),
        tn.ControlTerm(lambda t, y, a: 0.1 * torch.ones(2, 2, 2, dtype=F64), path, noise="general", commutative=True),
    )
    with pytest.raises(TypeError, match="diagonal or scalar"):
        tn.solve(term, SRID2(), 0.0, 1.0, torch.ones(2, 2, dtype=F64), dt0=0.25)
    # no space-time Lévy area
    term, y0, _ = _problem("diagonal", batch=2, levy_area=None)
    with pytest.raises(ValueError, match="space-time"):
        tn.solve(term, SRID2(), 0.0, 1.0, y0, dt0=0.25)
    # the stochastic adjoint offers no diffusion
    term, y0, _ = _problem("diagonal", batch=2)
    with pytest.raises(NotImplementedError, match="BacksolveAdjoint"):
        sol = tn.solve(term, SRID2(), 0.0, 1.0, y0.requires_grad_(), dt0=0.25, adjoint=tn.BacksolveAdjoint())
        torch.autograd.grad(sol.ys[-1].sum(), y0)


def test_gradients_through_the_steps():
    """DirectAdjoint differentiates through SRID2's stages (finite differences in y0)."""
    term, y0, _ = _problem("diagonal", batch=2)
    y0 = y0.requires_grad_()
    (g,) = torch.autograd.grad(tn.solve(term, SRID2(), 0.0, 1.0, y0, dt0=1 / 8).ys[-1].pow(2).sum(), y0)
    eps = 1e-6
    e = torch.zeros_like(y0)
    e[0, 1] = eps
    run = lambda y: float(tn.solve(term, SRID2(), 0.0, 1.0, y, dt0=1 / 8).ys[-1].pow(2).sum())  # noqa: E731
    fd = (run(y0.detach() + e) - run(y0.detach() - e)) / (2 * eps)
    assert abs(float(g[0, 1]) - fd) < 1e-6 * max(1.0, abs(fd))
