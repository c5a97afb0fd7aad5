"""Gradients: every adjoint against DirectAdjoint and against central finite differences."""

import pytest
import torch

import torchnde as tn

F64 = torch.float64
# gradients of the computed solution
EXACT = [tn.DirectAdjoint, tn.CheckpointAdjoint, tn.ReversibleAdjoint]
ALL = [tn.DirectAdjoint, tn.CheckpointAdjoint, tn.BacksolveAdjoint, tn.ReversibleAdjoint]
SAVEATS = {
    "t1": lambda: tn.SaveAt(t1=True),
    "ts": lambda: tn.SaveAt(ts=[0.3, 0.7, 1.0]),
    "t0-ts-t1": lambda: tn.SaveAt(t0=True, ts=[0.25, 0.5], t1=True),
    "steps": lambda: tn.SaveAt(steps=True),
}


def _problem():
    torch.manual_seed(0)
    W = torch.randn(3, 3, dtype=F64) * 0.6
    b = torch.randn(3, dtype=F64) * 0.1
    y0 = torch.randn(2, 3, dtype=F64)
    return W, b, y0


def _loss(adjoint, solver, saveat, y0, W, b, **kw):
    f = lambda t, y, a: torch.tanh(y @ a["W"]) + a["b"] * t
    sol = tn.solve(tn.ODETerm(f), solver, 0.0, 1.0, y0, args={"W": W, "b": b}, saveat=saveat, adjoint=adjoint, **kw)
    return (sol.ys**2).sum() + sol.ys.sum()


def _grads(adjoint, solver, saveat, **kw):
    W, b, y0 = _problem()
    W.requires_grad_()
    b.requires_grad_()
    y0.requires_grad_()
    loss = _loss(adjoint, solver, saveat, y0, W, b, **kw)
    return torch.autograd.grad(loss, (y0, W, b))


def _supported(adjoint, saveat_name):
    return not (adjoint in (tn.BacksolveAdjoint, tn.ReversibleAdjoint) and saveat_name == "steps")


@pytest.mark.parametrize("saveat", list(SAVEATS), ids=str)
@pytest.mark.parametrize(
    "solver", [tn.Euler, tn.RK4, tn.Bosh3, tn.Dopri5, tn.Tsit5, tn.Dopri8, tn.ReversibleHeun], ids=lambda s: s.__name__
)
@pytest.mark.parametrize("adjoint", ALL, ids=lambda a: a.__name__)
def test_constant_steps_match_finite_differences(adjoint, solver, saveat):
    if not _supported(adjoint, saveat):
        pytest.skip("unsupported combination (tested to raise below)")
    kw = dict(dt0=0.05)
    got = _grads(adjoint(), solver(), SAVEATS[saveat](), **kw)
    W, b, y0 = _problem()
    eps = 1e-6
    for idx, x in enumerate((y0, W, b)):
        fd = torch.zeros_like(x)
        for j in range(x.numel()):
            xp, xm = x.clone(), x.clone()
            xp.view(-1)[j] += eps
            xm.view(-1)[j] -= eps
            inputs_p = [y0, W, b]
            inputs_m = [y0, W, b]
            inputs_p[idx], inputs_m[idx] = xp, xm
            # the same discretisation as the adjoint's forward pass (reversible: its own scheme)
            with torch.no_grad():
                lp = _loss(adjoint(), solver(), SAVEATS[saveat](), *inputs_p, **kw)
                lm = _loss(adjoint(), solver(), SAVEATS[saveat](), *inputs_m, **kw)
            fd.view(-1)[j] = (lp - lm) / (2 * eps)
        # backsolve differentiates the exact ODE: its error is the discretisation error of the
        # backward solve (constant steps of 0.05, solver order >= 1)
        rel = 1e-5 if adjoint in EXACT else {1: 0.1, 2: 1e-2, 3: 1e-3, 4: 1e-4, 5: 1e-5, 8: 1e-5}[solver.order]
        torch.testing.assert_close(got[idx], fd, rtol=rel, atol=rel * fd.abs().max().item())


@pytest.mark.parametrize("saveat", ["t1", "ts", "t0-ts-t1"], ids=str)
@pytest.mark.parametrize(
    "adjoint", [tn.CheckpointAdjoint, tn.BacksolveAdjoint, tn.ReversibleAdjoint], ids=lambda a: a.__name__
)
def test_adaptive_matches_direct(adjoint, saveat):
    ctrl = tn.PIDController(rtol=1e-9, atol=1e-9)
    ref = _grads(tn.DirectAdjoint(), tn.Tsit5(), SAVEATS[saveat](), controller=ctrl)
    got = _grads(adjoint(), tn.Tsit5(), SAVEATS[saveat](), controller=ctrl)
    # checkpointing replays the same steps; backsolve and the reversible scheme differ from the
    # direct solution's gradient by about the tolerance
    tol = 1e-12 if adjoint is tn.CheckpointAdjoint else 1e-6
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * r.abs().max().item())


@pytest.mark.parametrize("checkpoints", [1, 2, 5, None])
def test_checkpoint_counts_give_identical_gradients(checkpoints):
    ctrl = tn.PIDController(rtol=1e-6, atol=1e-6)
    ref = _grads(tn.DirectAdjoint(), tn.Dopri5(), SAVEATS["ts"](), controller=ctrl)
    got = _grads(tn.CheckpointAdjoint(checkpoints), tn.Dopri5(), SAVEATS["ts"](), controller=ctrl)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("adjoint", ALL, ids=lambda a: a.__name__)
def test_module_parameters_found_without_listing_them(adjoint):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    y0 = torch.randn(4, 2, dtype=F64)
    grads = []
    for adj in (tn.DirectAdjoint(), adjoint()):
        net.zero_grad()
        sol = tn.solve(
            tn.ODETerm(lambda t, y, a: net(y)),
            tn.Tsit5(),
            0.0,
            1.0,
            y0,
            controller=tn.PIDController(rtol=1e-9, atol=1e-9),
            adjoint=adj,
        )
        sol.ys.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for r, g in zip(*grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("adjoint", ALL, ids=lambda a: a.__name__)
def test_tree_state_gradients(adjoint):
    y0 = {
        "x": torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True),
        "v": torch.tensor([0.0], dtype=F64, requires_grad=True),
    }
    k = torch.tensor(2.0, dtype=F64, requires_grad=True)
    f = lambda t, y, a: {"x": y["v"].expand(2) * 1.0 - 0.1 * y["x"], "v": -a * y["x"][:1]}
    sol = tn.solve(
        tn.ODETerm(f),
        tn.Dopri5(),
        0.0,
        1.0,
        y0,
        args=k,
        controller=tn.PIDController(rtol=1e-10, atol=1e-10),
        adjoint=adjoint(),
    )
    loss = sol.ys["x"].sum() + sol.ys["v"].sum()
    got = torch.autograd.grad(loss, (y0["x"], y0["v"], k))
    sol = tn.solve(
        tn.ODETerm(f), tn.Dopri5(), 0.0, 1.0, y0, args=k, controller=tn.PIDController(rtol=1e-10, atol=1e-10)
    )
    ref = torch.autograd.grad(sol.ys["x"].sum() + sol.ys["v"].sum(), (y0["x"], y0["v"], k))
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("adjoint", ALL, ids=lambda a: a.__name__)
def test_backwards_in_time(adjoint):
    W, b, y0 = _problem()
    y0.requires_grad_()
    f = lambda t, y, a: torch.tanh(y @ W)
    ctrl = tn.PIDController(rtol=1e-10, atol=1e-10)
    out = []
    for adj in (tn.DirectAdjoint(), adjoint()):
        sol = tn.solve(
            tn.ODETerm(f), tn.Tsit5(), 1.0, 0.0, y0, controller=ctrl, saveat=tn.SaveAt(ts=[0.5, 0.0]), adjoint=adj
        )
        out.append(torch.autograd.grad(sol.ys.sum(), y0)[0])
    torch.testing.assert_close(out[1], out[0], rtol=1e-6, atol=1e-9)


def test_unsupported_combinations_name_an_alternative():
    y0 = torch.ones(2, 1, dtype=F64, requires_grad=True)
    term = tn.ODETerm(lambda t, y, a: -y)
    ctrl = tn.PIDController(rtol=1e-6, atol=1e-6)
    with pytest.raises(NotImplementedError, match="DirectAdjoint"):
        tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, controller=ctrl, per_sample=True, adjoint=tn.BacksolveAdjoint())
    with pytest.raises(NotImplementedError, match="DirectAdjoint"):
        tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, controller=ctrl, per_sample=True, adjoint=tn.CheckpointAdjoint())
    with pytest.raises(NotImplementedError, match="CheckpointAdjoint"):
        tn.solve(
            term, tn.Tsit5(), 0.0, 1.0, y0, controller=ctrl, saveat=tn.SaveAt(steps=True), adjoint=tn.BacksolveAdjoint()
        )
    with pytest.raises(NotImplementedError, match="DirectAdjoint"):
        tn.solve(
            term,
            tn.Tsit5(),
            0.0,
            1.0,
            y0,
            controller=ctrl,
            saveat=tn.SaveAt(dense=True),
            adjoint=tn.CheckpointAdjoint(),
        )


def test_double_backward():
    y0 = torch.tensor([0.5], dtype=F64, requires_grad=True)
    term = tn.ODETerm(lambda t, y, a: -(y**2))
    sol = tn.solve(term, tn.RK4(), 0.0, 1.0, y0, dt0=0.01)
    (g,) = torch.autograd.grad(sol.ys.sum(), y0, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), y0)
    # y(1) = y0 / (1 + y0): dy/dy0 = 1/(1+y0)^2, d2y/dy0^2 = -2/(1+y0)^3
    torch.testing.assert_close(g, 1 / (1 + y0.detach()) ** 2, rtol=1e-8, atol=0)
    torch.testing.assert_close(h, -2 / (1 + y0.detach()) ** 3, rtol=1e-8, atol=0)
    sol = tn.solve(term, tn.RK4(), 0.0, 1.0, y0, dt0=0.01, adjoint=tn.BacksolveAdjoint())
    (g,) = torch.autograd.grad(sol.ys.sum(), y0, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), y0)


def test_no_grad_skips_adjoint_machinery():
    y0 = torch.ones(2, dtype=F64)
    with torch.no_grad():
        for adj in ALL:
            sol = tn.solve(
                tn.ODETerm(lambda t, y, a: -y),
                tn.Tsit5(),
                0.0,
                1.0,
                y0,
                controller=tn.PIDController(rtol=1e-8, atol=1e-8),
                adjoint=adj(),
            )
            assert abs(sol.ys[-1, 0].item() - 0.36787944117) < 1e-7


def _reversible_direct(solver, saveat, controller=None, dt0=None, lam=0.999):
    """DirectAdjoint on the reversible discretisation, as the reference for ReversibleAdjoint."""
    import copy

    from torchnde.adjoints._reversible import _AdaptiveReversible, _Reversible

    wrapped = (_AdaptiveReversible if isinstance(solver, tn.AbstractAdaptiveSolver) else _Reversible)(solver, lam)
    ctrl = copy.copy(controller or tn.ConstantStepSize())
    if saveat.ts is not None:
        ctrl.step_ts = torch.as_tensor(saveat.ts, dtype=F64)
    return _grads(tn.DirectAdjoint(), wrapped, saveat, controller=ctrl, dt0=dt0)


@pytest.mark.parametrize("saveat", ["t1", "ts", "t0-ts-t1"], ids=str)
@pytest.mark.parametrize("solver", [tn.Midpoint, tn.RK4, tn.Bosh3, tn.Tsit5, tn.Dopri8], ids=lambda s: s.__name__)
def test_reversible_equals_direct_on_same_discretisation(solver, saveat):
    adaptive = issubclass(solver, tn.AbstractAdaptiveSolver)
    kw = dict(controller=tn.PIDController(rtol=1e-6, atol=1e-6)) if adaptive else dict(dt0=0.05)
    ref = _reversible_direct(solver(), SAVEATS[saveat](), **kw)
    got = _grads(tn.ReversibleAdjoint(), solver(), SAVEATS[saveat](), **kw)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", [tn.RK4, tn.Tsit5], ids=lambda s: s.__name__)
def test_reversible_reconstruction_is_exact_to_round_off(solver):
    """Step forward with the reversible scheme, then invert: the states come back."""
    from torchnde._flat import _FlatTerm
    from torchnde._tree import Flattener
    from torchnde.adjoints._reversible import _Reversible

    W, b, y0 = _problem()
    f = lambda t, y, a: torch.tanh(y @ W) + b * t
    flat = Flattener(y0, batch=False)
    term = _FlatTerm(tn.ODETerm(f), flat, None, 1.0, False)
    rev = _Reversible(solver(), 0.999)
    y = flat.flatten(y0)
    state = rev.init(term, 0.0, y)
    history = [(y, state[0])]
    ts = [0.1 * i for i in range(21)]
    for t0, t1 in zip(ts[:-1], ts[1:]):
        y, _, _, state, _ = rev.step(term, t0, t1, y, state)
        history.append((y, state[0]))
    z = state[0]
    base = rev.base
    for n in range(len(ts) - 1, 0, -1):
        t0, t1 = ts[n - 1], ts[n]
        back, _ = base.increment(term, t1, t0, y, term.vf(t1, y))
        z = z + back
        inc, _ = base.increment(term, t0, t1, z, term.vf(t0, z))
        y = (y - (1 - 0.999) * z - inc) / 0.999
        torch.testing.assert_close(y, history[n - 1][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(z, history[n - 1][1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", [tn.Midpoint, tn.RK4, tn.Tsit5], ids=lambda s: s.__name__)
def test_reversible_scheme_keeps_the_order(solver):
    import numpy as np

    A = torch.tensor([[-0.3, 1.2, 0.1], [-1.0, -0.2, 0.4], [0.2, -0.5, -0.4]], dtype=F64)
    y0 = torch.tensor([1.0, -0.5, 0.25], dtype=F64)
    exact = torch.linalg.matrix_exp(A * 4.0) @ y0
    grid = (10, 20, 40, 80) if solver.order >= 5 else (40, 80, 160, 320)
    errs, hs = [], []
    for n in grid:
        with torch.no_grad():
            sol = tn.solve(
                tn.ODETerm(lambda t, y, a: A @ y), solver(), 0.0, 4.0, y0, dt0=4.0 / n, adjoint=tn.ReversibleAdjoint()
            )
        errs.append((sol.ys[-1] - exact).abs().max().item())
        hs.append(4.0 / n)
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - solver.order) <= 0.3, (slope, errs)


def test_reversible_rejects_unsupported():
    y0 = torch.ones(2, dtype=F64, requires_grad=True)
    term = tn.ODETerm(lambda t, y, a: -y)
    with pytest.raises(NotImplementedError, match="CheckpointAdjoint"):
        tn.solve(
            term,
            tn.Tsit5(),
            0.0,
            1.0,
            y0,
            controller=tn.PIDController(rtol=1e-6, atol=1e-6, jump_ts=[0.5]),
            adjoint=tn.ReversibleAdjoint(),
        )
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        tn.ReversibleAdjoint(l=0.0)


@pytest.mark.parametrize("adjoint", ALL, ids=lambda a: a.__name__)
def test_gradients_with_respect_to_times(adjoint):
    import math

    f = lambda t, y, a: -y * (1 + 0.5 * math.sin(t))
    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    ctrl = tn.PIDController(rtol=1e-12, atol=1e-12)

    def loss(t0, t1, ts):
        sol = tn.solve(
            tn.ODETerm(f), tn.Dopri5(), t0, t1, y0, controller=ctrl, saveat=tn.SaveAt(ts=ts, t1=True), adjoint=adjoint()
        )
        return (sol.ys**2).sum()

    t0 = torch.tensor(0.2, dtype=F64, requires_grad=True)
    t1 = torch.tensor(1.5, dtype=F64, requires_grad=True)
    ts = torch.tensor([0.5, 1.0], dtype=F64, requires_grad=True)
    g0, g1, gs = torch.autograd.grad(loss(t0, t1, ts), (t0, t1, ts))
    eps = 1e-6
    with torch.no_grad():
        fd0 = (loss(0.2 + eps, 1.5, ts.detach()) - loss(0.2 - eps, 1.5, ts.detach())) / (2 * eps)
        fd1 = (loss(0.2, 1.5 + eps, ts.detach()) - loss(0.2, 1.5 - eps, ts.detach())) / (2 * eps)
        e = torch.eye(2, dtype=F64) * eps
        fds = torch.stack(
            [(loss(0.2, 1.5, ts.detach() + e[j]) - loss(0.2, 1.5, ts.detach() - e[j])) / (2 * eps) for j in range(2)]
        )
    torch.testing.assert_close(g0, fd0, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g1, fd1, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gs, fds, rtol=1e-6, atol=1e-8)


def test_reversible_heun_exact_gradients_and_order():
    import numpy as np

    # order 2 on a linear problem
    A = torch.tensor([[-0.3, 1.2], [-1.0, -0.2]], dtype=F64)
    y0 = torch.tensor([1.0, -0.5], dtype=F64)
    exact = torch.linalg.matrix_exp(A * 2.0) @ y0
    errs, hs = [], []
    for n in (40, 80, 160, 320):
        sol = tn.solve(tn.ODETerm(lambda t, y, a: A @ y), tn.ReversibleHeun(), 0.0, 2.0, y0, dt0=2.0 / n)
        errs.append((sol.ys[-1] - exact).abs().max().item())
        hs.append(2.0 / n)
    assert abs(np.polyfit(np.log(hs), np.log(errs), 1)[0] - 2) <= 0.3, errs
    # ReversibleAdjoint through it equals DirectAdjoint through it, and finite differences
    for saveat in ("t1", "ts", "t0-ts-t1"):
        ref = _grads(
            tn.DirectAdjoint(), tn.ReversibleHeun(), SAVEATS[saveat](), controller=_landing(SAVEATS[saveat]()), dt0=0.05
        )
        got = _grads(tn.ReversibleAdjoint(), tn.ReversibleHeun(), SAVEATS[saveat](), dt0=0.05)
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def _landing(saveat):
    """ConstantStepSize landing on the save times, as ReversibleAdjoint arranges."""
    import copy

    c = copy.copy(tn.ConstantStepSize())
    if saveat.ts is not None:
        c.step_ts = torch.as_tensor(saveat.ts, dtype=F64)
    return c
