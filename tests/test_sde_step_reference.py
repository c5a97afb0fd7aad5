"""Every SDE solver's step against a straightforward implementation of its published formula.

The solvers' steps are written for speed (fused ops, shared products, the diffusion of additive
noise carried between steps, one vector-field evaluation per step in the reversible adjoint);
these tests write each method out plainly on the same Brownian increments and require the
solutions, and the gradients with respect to the initial state and to parameters of both the
drift and the diffusion, to agree to round-off. Float64, 8 constant steps of 1/8 (exact times, so
both sides query the same grid cells).
"""

from __future__ import annotations

import pytest
import torch

import torchnde as tn
from torchnde.paths import BrownianGrid
from torchnde.solvers.euler_heun import EulerHeun
from torchnde.solvers.milstein import ItoMilstein, StratonovichMilstein
from torchnde.solvers.shark import ShARK
from torchnde.solvers.sra1 import SRA1

F64 = torch.float64
B, D, N, H = 4, 3, 8, 0.125
TOL = dict(rtol=1e-12, atol=1e-12)


def _params():
    gen = torch.Generator().manual_seed(5)
    a = (0.3 + 0.5 * torch.rand(D, generator=gen, dtype=F64)).requires_grad_()
    s = (0.4 + 0.4 * torch.rand(D, generator=gen, dtype=F64)).requires_grad_()
    return a, s


def _y0():
    return torch.linspace(-0.6, 0.8, B * D, dtype=F64).reshape(B, D).requires_grad_()


def _fields(a, s, additive):
    """Drift and diffusion (both time-dependent); derivative of the diagonal diffusion in ``y``."""

    def f(t, y):
        return -a * y + torch.sin(y) * torch.cos(torch.as_tensor(t, dtype=F64))

    if additive:

        def g(t, y):
            return (s * (1 + 0.5 * torch.sin(torch.as_tensor(t, dtype=F64)))).expand(y.shape)

        dg = None
    else:

        def g(t, y):
            return s * torch.sqrt(1 + y * y) * (1 + 0.1 * t)

        def dg(t, y):
            return s * y / torch.sqrt(1 + y * y) * (1 + 0.1 * t)

    return f, g, dg


def _path(levy=None, seed=11):
    return BrownianGrid.uniform(0.0, 1.0, N, (B, D), seed=seed, dtype=F64, levy_area=levy)


def _solve(solver, additive=False, adjoint=None, saveat=None, levy=None):
    a, s = _params()
    y0 = _y0()
    f, g, _ = _fields(a, s, additive)
    path = _path(levy)
    term = tn.MultiTerm(
        tn.ODETerm(lambda t, y, args: f(t, y)),
        tn.ControlTerm(lambda t, y, args: g(t, y), path, noise="diagonal", additive=additive),
    )
    kw = {} if adjoint is None else {"adjoint": adjoint}
    sol = tn.solve(term, solver, 0.0, 1.0, y0, dt0=H, saveat=saveat or tn.SaveAt(t1=True), **kw)
    return sol, (y0, a, s), path


def _reference(name, y0, a, s, path, save=(N,)):
    """The method written out step by step (float times ``n h``)."""
    f, g, dg = _fields(a, s, name in ("SRA1", "ShARK"))
    y, out = y0, []
    z = y0  # reversible Heun's second state
    for n in range(N):
        t, h = n * H, H
        inc = path.increment(t, t + h)
        w, hh = inc.W, inc.H

        def K(tt, yy, h=h, w=w):
            return f(tt, yy) * h + g(tt, yy) * w

        if name == "Euler":
            y = y + K(t, y)
        elif name == "Heun":
            k1 = K(t, y)
            k2 = K(t + h, y + k1)
            y = y + 0.5 * (k1 + k2)
        elif name == "Midpoint":
            k1 = K(t, y)
            y = y + K(t + h / 2, y + 0.5 * k1)
        elif name == "EulerHeun":
            ybar = y + g(t, y) * w
            y = y + f(t, y) * h + 0.5 * (g(t, y) + g(t, ybar)) * w
        elif name in ("ItoMilstein", "StratonovichMilstein"):
            corr = w * w - h if name == "ItoMilstein" else w * w
            y = y + f(t, y) * h + g(t, y) * w + 0.5 * g(t, y) * dg(t, y) * corr
        elif name == "SRA1":  # Rößler (2010), Table 5.1, with I_(1,0) = h (W/2 + H)
            noise = g(t, y) * (w / 2 + hh) + g(t + h, y) * (w / 2 - hh)
            z2 = y + 0.75 * h * f(t, y) + 1.5 * g(t, y) * (w / 2 + hh)
            y = y + h * (f(t, y) / 3 + 2 * f(t + 0.75 * h, z2) / 3) + noise
        elif name == "ShARK":  # Foster, dos Reis & Strange (2024), (6.1)
            noise = g(t, y) * (w / 2 + hh) + g(t + h, y) * (w / 2 - hh)
            z1 = y + g(t, y) * hh
            z2 = z1 + 5 / 6 * h * f(t, z1) + 5 / 6 * g(t, y) * w
            y = y + h * (0.4 * f(t, z1) + 0.6 * f(t + 5 / 6 * h, z2)) + noise
        elif name == "ReversibleHeun":  # Kidger, Foster, Li & Lyons (2021)
            z1 = 2 * y - z + K(t, z)
            y = y + 0.5 * (K(t, z) + K(t + h, z1))
            z = z1
        if n + 1 in save:
            out.append(y)
    return torch.stack(out)


CASES = [
    (tn.Euler, None),
    (tn.Heun, None),
    (tn.Midpoint, None),
    (EulerHeun, None),
    (ItoMilstein, None),
    (StratonovichMilstein, None),
    (SRA1, "space-time"),
    (ShARK, "space-time"),
    (tn.ReversibleHeun, None),
]


@pytest.mark.parametrize("cls,levy", CASES, ids=[c.__name__ for c, _ in CASES])
def test_solution_and_gradients_match_the_plain_formula(cls, levy):
    name = cls.__name__
    additive = name in ("SRA1", "ShARK")
    sol, leaves, path = _solve(cls(), additive=additive, levy=levy)
    ref = _reference(name, *leaves, path)
    torch.testing.assert_close(sol.ys, ref, **TOL)
    got = torch.autograd.grad(sol.ys.pow(2).sum(), leaves)
    want = torch.autograd.grad(ref.pow(2).sum(), leaves)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("cls", [SRA1, ShARK], ids=lambda c: c.__name__)
def test_additive_solvers_evaluate_the_diffusion_once_per_time(cls):
    sol, _, _ = _solve(cls(), additive=True, levy="space-time")
    assert sol.stats["nfe_diffusion"] == N + 1  # g(t_0), ..., g(t_N): each distinct time once
    assert sol.stats["nfe"] == 2 * N


def test_reversible_adjoint_matches_backpropagation_through_the_plain_formula():
    saveat = tn.SaveAt(ts=[0.5, 1.0])
    sol, leaves, path = _solve(tn.ReversibleHeun(), adjoint=tn.ReversibleAdjoint(), saveat=saveat)
    ref = _reference("ReversibleHeun", *leaves, path, save=(N // 2, N))
    torch.testing.assert_close(sol.ys, ref, **TOL)
    weights = torch.tensor([0.7, 1.3], dtype=F64).view(2, 1, 1)  # distinct gradients at both save times
    got = torch.autograd.grad((weights * sol.ys.pow(2)).sum(), leaves)
    want = torch.autograd.grad((weights * ref.pow(2)).sum(), leaves)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **TOL)


def test_reversible_adjoint_evaluates_once_per_step_backwards():
    calls = {"f": 0, "g": 0}
    a, s = _params()
    f, g, _ = _fields(a, s, False)

    def drift(t, y, args):
        calls["f"] += 1
        return f(t, y)

    def diffusion(t, y, args):
        calls["g"] += 1
        return g(t, y)

    term = tn.MultiTerm(tn.ODETerm(drift), tn.ControlTerm(diffusion, _path(), noise="diagonal"))
    y0 = _y0()
    sol = tn.solve(term, tn.ReversibleHeun(), 0.0, 1.0, y0, dt0=H, adjoint=tn.ReversibleAdjoint())
    forward = dict(calls)
    sol.ys.sum().backward()
    # backward: one evaluation per step and one at t0 (stepping back one step at a time would
    # evaluate twice per step)
    assert calls["f"] - forward["f"] == N + 1 and calls["g"] - forward["g"] == N + 1


def test_reversible_adjoint_on_an_ode_matches_backpropagation():
    a, _ = _params()
    y0 = _y0()

    def f(t, y, args):
        return -a * y + torch.sin(y) * torch.cos(t)

    saveat = tn.SaveAt(ts=[0.25, 1.0])
    sol = tn.solve(tn.ODETerm(f), tn.ReversibleHeun(), 0.0, 1.0, y0, dt0=H, adjoint=tn.ReversibleAdjoint(),
                   saveat=saveat)  # fmt: skip
    ref = tn.solve(tn.ODETerm(f), tn.ReversibleHeun(), 0.0, 1.0, y0, dt0=H, adjoint=tn.DirectAdjoint(),
                   saveat=saveat)  # fmt: skip
    torch.testing.assert_close(sol.ys, ref.ys, **TOL)
    got = torch.autograd.grad(sol.ys.pow(2).sum(), (y0, a))
    want = torch.autograd.grad(ref.ys.pow(2).sum(), (y0, a))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **TOL)


_SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def _count_syncs(fn) -> int:
    """Host synchronisations (``.item()``, ``bool(tensor)``, ...) made by ``fn()``."""
    count = [0]
    saved = {m: getattr(torch.Tensor, m) for m in _SYNC_METHODS}

    def wrap(method):
        def inner(self, *a, **k):
            count[0] += 1
            return method(self, *a, **k)

        return inner

    try:
        for m, method in saved.items():
            setattr(torch.Tensor, m, wrap(method))
        fn()
    finally:
        for m, method in saved.items():
            setattr(torch.Tensor, m, method)
    return count[0]


@pytest.mark.parametrize("cls,levy", CASES, ids=[c.__name__ for c, _ in CASES])
def test_steps_make_no_host_synchronisation(cls, levy):
    """The syncs of a fixed-step solve with its backward pass do not grow with the steps: the
    steps (and the reversible backward pass) make none."""
    name = cls.__name__
    additive = name in ("SRA1", "ShARK")
    adjoint = tn.ReversibleAdjoint() if name == "ReversibleHeun" else None

    def run(n):
        a, s = _params()
        f, g, _ = _fields(a, s, additive)
        path = BrownianGrid.uniform(0.0, 1.0, n, (B, D), seed=3, dtype=F64, levy_area=levy)
        term = tn.MultiTerm(
            tn.ODETerm(lambda t, y, args: f(t, y)),
            tn.ControlTerm(lambda t, y, args: g(t, y), path, noise="diagonal", additive=additive),
        )
        kw = {} if adjoint is None else {"adjoint": adjoint}
        sol = tn.solve(term, cls(), 0.0, 1.0, _y0(), dt0=1.0 / n, **kw)
        sol.ys.sum().backward()

    run(4)  # warm-up (one-time checks)
    assert _count_syncs(lambda: run(4)) == _count_syncs(lambda: run(16))


@pytest.mark.parametrize("backwards", [False, True], ids=["forward", "backward-in-time"])
def test_reversible_adjoint_on_a_brownian_tree_matches_direct(backwards):
    """The backward pass prefetches the tree's increments (last step first): the gradients are
    those of backpropagation through the same steps."""
    from torchnde.paths import VirtualBrownianTree

    a, s = _params()
    f, g, _ = _fields(a, s, False)
    bm = VirtualBrownianTree(0.0, 1.0, (B, D), seed=4, dtype=F64)
    term = tn.MultiTerm(
        tn.ODETerm(lambda t, y, args: f(t, y)), tn.ControlTerm(lambda t, y, args: g(t, y), bm, noise="diagonal")
    )
    t0, t1 = (1.0, 0.0) if backwards else (0.0, 1.0)
    y0 = _y0()
    out = []
    for adjoint in (tn.ReversibleAdjoint(), tn.DirectAdjoint()):
        sol = tn.solve(term, tn.ReversibleHeun(), t0, t1, y0, dt0=(t1 - t0) / 12, adjoint=adjoint,
                       saveat=tn.SaveAt(ts=[0.5, t1]))  # fmt: skip
        out.append((sol.ys, torch.autograd.grad(sol.ys.pow(2).sum(), (y0, a, s))))
    torch.testing.assert_close(out[0][0], out[1][0], **TOL)
    for x, y in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(x, y, **TOL)


def test_sde_runge_kutta_step_skips_the_error_estimate_when_not_needed():
    """``term.need_error = False`` (for loops that accept every step): no estimate, same step."""
    from torchnde._flat import flat_term
    from torchnde._terms import normalize_terms
    from torchnde._tree import Flattener

    a, s = _params()
    f, g, _ = _fields(a, s, False)
    term = tn.MultiTerm(
        tn.ODETerm(lambda t, y, args: f(t, y)), tn.ControlTerm(lambda t, y, args: g(t, y), _path(), noise="diagonal")
    )
    y0 = _y0().detach()
    flat = Flattener(y0, False)
    out = []
    for need in (True, False):
        ft = flat_term(normalize_terms(term), flat, None, 1.0, False)
        ft.need_error = need
        y1, err, *_ = tn.Heun().step(ft, 0.0, H, flat.flatten(y0), None)
        out.append((y1, err))
    assert out[0][1] is not None and out[1][1] is None
    assert torch.equal(out[0][0], out[1][0])
