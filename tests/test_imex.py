"""IMEX (additive Runge--Kutta) solvers KenCarp3/4/5: tableaus (every bicoloured order
condition), convergence orders of the split, the explicit/implicit plumbing, a stiff
reaction--diffusion problem, per-sample solves and gradients."""

import functools
import math

import numpy as np
import pytest
import torch

import torchnde as tn
from torchnde.solvers import IMEX_SOLVERS
from torchnde.solvers._implicit import NEWTON_OK

pytestmark = pytest.mark.usefixtures("one_thread")

TIGHT = dict(newton_rtol=1e-13, newton_atol=1e-15)
F64 = dict(dtype=torch.float64)

# --- tableaus: additive order conditions on bicoloured trees ------------------------------


@functools.cache
def _forests(n):
    """Multisets of coloured subtrees of total size ``n``: sorted tuples of ``(colour, tree)``."""
    cands = [(col, t) for k in range(1, n + 1) for t in _trees_of_size(k) for col in "EI"]
    out = []

    def rec(rem, lo, acc):
        if rem == 0:
            out.append(tuple(acc))
            return
        for i in range(lo, len(cands)):
            sz = _size(cands[i][1])
            if sz <= rem:
                rec(rem - sz, i, [*acc, cands[i]])

    rec(n, 0, [])
    return out


def _trees_of_size(n):
    """Rooted trees of ``n`` nodes whose non-root nodes are coloured E or I: a tree is the
    sorted tuple of its ``(colour, subtree)`` children."""
    return sorted({tuple(sorted(f)) for f in _forests(n - 1)}) if n > 1 else [()]


def _size(t):
    return 1 + sum(_size(c) for _, c in t)


def _density(t):
    return _size(t) * math.prod(_density(c) for _, c in t)


def _phi(AE, AI, t):
    out = np.ones(len(AE))
    for col, c in t:
        out = out * ((AE if col == "E" else AI) @ _phi(AE, AI, c))
    return out


def _residual(AE, AI, b, order):
    """The largest residual of the additive order conditions ``b . Phi(t) = 1 / gamma(t)`` over
    bicoloured trees of up to ``order`` nodes (the weights are shared by both parts, so the root
    has no colour)."""
    b = np.asarray(b, float)
    return max(abs(b @ _phi(AE, AI, t) - 1 / _density(t)) for n in range(1, order + 1) for t in _trees_of_size(n))


def test_bicoloured_tree_count():
    assert [len(_trees_of_size(n)) for n in range(1, 6)] == [1, 2, 7, 26, 107]


def _matrices(solver):
    ark = solver.ark
    return np.array(ark.explicit_matrix()), np.array(ark.implicit.full_matrix())


@pytest.mark.parametrize("solver", IMEX_SOLVERS, ids=lambda s: s.__name__)
def test_order_conditions(solver):
    """Both tableaus share the nodes; the pair satisfies every coupled order condition up to
    ``order`` (and not the next), the embedded weights up to ``error_order``; the implicit part
    is stiffly accurate with ``gamma`` on the diagonal and the explicit part strictly lower
    triangular."""
    AE, AI = _matrices(solver)
    tab = solver.tableau
    c = np.array(tab.c)
    np.testing.assert_allclose(AE.sum(1), c, atol=1e-14)
    np.testing.assert_allclose(AI.sum(1), c, atol=1e-14)
    assert np.all(np.triu(AE) == 0)
    assert np.allclose(np.diag(AI)[1:], tab.gamma) and AI[0, 0] == 0
    b, b_hat = np.array(tab.b, float), np.array(tab.b_hat, float)
    np.testing.assert_allclose(AI[-1], b, atol=0)
    assert _residual(AE, AI, b, solver.order) < 1e-13
    assert _residual(AE, AI, b, solver.order + 1) > 1e-4
    assert _residual(AE, AI, b_hat, solver.error_order) < 1e-13
    assert _residual(AE, AI, b_hat, solver.error_order + 1) > 1e-4


@pytest.mark.parametrize("solver", IMEX_SOLVERS, ids=lambda s: s.__name__)
def test_l_stable(solver):
    """The implicit part's stability function vanishes at infinity."""
    tab = solver.tableau
    A, b = np.array(tab.full_matrix()), np.array(tab.b, float)
    for z in (-1e6, -1e9):
        R = 1 + z * b @ np.linalg.solve(np.eye(len(b)) - z * A, np.ones(len(b)))
        assert abs(R) < 1e-5


@pytest.mark.parametrize("solver", [s for s in IMEX_SOLVERS if s.ark.dense is not None], ids=lambda s: s.__name__)
def test_dense_weights(solver):
    """The published dense weights give ``b`` at theta = 1 and satisfy the continuous order
    conditions ``sum_j b_j(theta) Phi_j(t) = theta^|t| / gamma(t)`` up to ``dense_order`` (not
    beyond)."""
    AE, AI = _matrices(solver)
    D = np.array([[float(x) for x in row] for row in solver.ark.dense])
    np.testing.assert_allclose(D.sum(1), np.array(solver.tableau.b, float), atol=1e-14)

    def worst(order, theta):
        bt = D @ theta ** np.arange(1, D.shape[1] + 1)
        return max(
            abs(bt @ _phi(AE, AI, t) - theta ** _size(t) / _density(t))
            for n in range(1, order + 1)
            for t in _trees_of_size(n)
        )

    for theta in (0.3, 0.7):
        assert worst(solver.dense_order, theta) < 1e-13
        assert worst(solver.dense_order + 1, theta) > 1e-5


# --- convergence order of the split -----------------------------------------------------

A_E = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], **F64)  # a rotation (explicit)
A_I = torch.tensor([[-2.0, 0.5], [0.3, -1.0]], **F64)  # a decay that does not commute with it


def _phi_exact(t):
    return torch.stack([torch.sin(t) + 1.0, torch.cos(2 * t)], -1)


def _dphi(t):
    return torch.stack([torch.cos(t), -2 * torch.sin(2 * t)], -1)


def _manufactured():
    """A nonlinear split with the exact solution ``phi(t)``: ``f_E`` couples the components
    nonlinearly and carries the forcing, ``f_I`` is a nonlinear relaxation towards ``phi``."""

    def f_e(t, y, a):
        p = _phi_exact(t)
        g = torch.stack([y[..., 1] ** 2, torch.sin(y[..., 0])], -1)
        gp = torch.stack([p[..., 1] ** 2, torch.sin(p[..., 0])], -1)
        return g - gp + _dphi(t)

    def f_i(t, y, a):
        d = y - _phi_exact(t)
        return d @ A_I.T - 0.5 * d**3

    return f_e, f_i


def _split_problems():
    y0 = torch.tensor([1.0, 0.5], **F64)
    lin = (lambda t, y, a: y @ A_E.T, lambda t, y, a: y @ A_I.T, y0, torch.linalg.matrix_exp((A_E + A_I) * 2.0) @ y0)
    f_e, f_i = _manufactured()
    z0 = _phi_exact(torch.tensor(0.0, **F64))
    nonlin = (f_e, f_i, z0, _phi_exact(torch.tensor(2.0, **F64)))
    return {"linear": lin, "nonlinear": nonlin}


@pytest.mark.parametrize("problem", ["linear", "nonlinear"])
@pytest.mark.parametrize("solver", IMEX_SOLVERS, ids=lambda s: s.__name__)
def test_global_order(solver, problem):
    """Constant steps, float64, tight Newton tolerances, the explicit part non-trivial: the slope
    of log error against log h is within 0.3 of the declared order."""
    f_e, f_i, y0, exact = _split_problems()[problem]
    term = tn.MultiTerm(tn.ODETerm(f_e), tn.ODETerm(f_i))
    ns = [10, 14, 20, 28] if solver.order < 5 else [8, 11, 16, 22]
    hs, errs = [], []
    for n in ns:
        sol = tn.solve(term, solver(**TIGHT), 0.0, 2.0, y0, dt0=2.0 / n)
        assert sol.stats["num_steps"] == n
        hs.append(2.0 / n)
        errs.append((sol.ys[-1] - exact).abs().max().item())
    assert min(errs) > 1e-13, errs
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - solver.order) <= 0.3, (slope, errs)


@pytest.mark.parametrize("solver", IMEX_SOLVERS, ids=lambda s: s.__name__)
def test_error_estimate_order(solver):
    """One step from the same point: the embedded estimate shrinks like h^(error_order + 1)."""
    from torchnde._flat import _FlatTerm
    from torchnde._tree import Flattener

    f_e, f_i, y0, _ = _split_problems()["nonlinear"]
    term = tn.MultiTerm(tn.ODETerm(f_e), tn.ODETerm(f_i))
    hs = [0.2 * 2.0**-k for k in range(4)]
    errs = []
    for h in hs:
        s = solver(**TIGHT)
        ft = _FlatTerm(tn._terms.normalize_terms(term), Flattener(y0, batch=False), None, 1.0, False)
        _, y_err, _, _, code = s.step(ft, 0.0, h, y0, s.init(ft, 0.0, y0))
        assert int(code) == NEWTON_OK
        errs.append(y_err.abs().max().item())
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - (solver.error_order + 1)) <= 0.35, errs


@pytest.mark.parametrize("solver", IMEX_SOLVERS, ids=lambda s: s.__name__)
def test_dense_output_order(solver):
    """Dense output between the step ends, fixed steps: the largest error inside the steps
    shrinks at least like h^(dense_order + 1) per step (global slope >= dense_order)."""
    f_e, f_i, y0, _ = _split_problems()["linear"]
    term = tn.MultiTerm(tn.ODETerm(f_e), tn.ODETerm(f_i))
    ts = torch.linspace(0.013, 1.987, 41, **F64)
    exact = torch.stack([torch.linalg.matrix_exp((A_E + A_I) * t) @ y0 for t in ts])
    ns, errs = [8, 16, 32], []
    for n in ns:
        sol = tn.solve(term, solver(**TIGHT), 0.0, 2.0, y0, dt0=2.0 / n, saveat=tn.SaveAt(dense=True))
        errs.append((torch.stack([sol.evaluate(t) for t in ts]) - exact).abs().max().item())
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert slope >= solver.dense_order - 0.3, (slope, errs)


# --- the term plumbing --------------------------------------------------------------------


def test_plain_odeterm_is_all_implicit():
    """A plain ODETerm is integrated as entirely implicit: the same as an explicit part of zero,
    and the ESDIRK of the implicit tableau (the loop is the same: one Jacobian, no explicit
    evaluations)."""
    f_e, f_i, y0, _ = _split_problems()["linear"]
    zero = tn.ODETerm(lambda t, y, a: torch.zeros_like(y))
    a = tn.solve(tn.ODETerm(f_i), tn.KenCarp4(), 0.0, 1.0, y0, dt0=0.1)
    b = tn.solve(tn.MultiTerm(zero, tn.ODETerm(f_i)), tn.KenCarp4(), 0.0, 1.0, y0, dt0=0.1)
    torch.testing.assert_close(a.ys, b.ys, atol=1e-14, rtol=0)
    exact = torch.linalg.matrix_exp(A_I) @ y0
    assert (a.ys[-1] - exact).abs().max() < 1e-5


def test_explicit_part_is_never_differentiated():
    """Only the implicit part's Jacobian is formed: the explicit part never runs inside a
    torch.func transform or on a state that autograd differentiates, the implicit part does."""
    from torch._C._functorch import is_functorch_wrapped_tensor

    seen = {"E": False, "I": False}

    def differentiated(y):
        return is_functorch_wrapped_tensor(y) or y.requires_grad

    def f_e(t, y, a):
        seen["E"] |= differentiated(y)
        return y @ A_E.T

    def f_i(t, y, a):
        seen["I"] |= differentiated(y)
        return y @ A_I.T

    y0 = torch.tensor([1.0, 0.5], **F64)
    sol = tn.solve(tn.MultiTerm(tn.ODETerm(f_e), tn.ODETerm(f_i)), tn.KenCarp3(), 0.0, 1.0, y0, controller=_ctrl(1e-6))
    assert sol.result == tn.Result.successful
    assert seen == {"E": False, "I": True}


def test_explicit_solver_integrates_the_sum():
    f_e, f_i, y0, exact = _split_problems()["linear"]
    term = tn.MultiTerm(tn.ODETerm(f_e), tn.ODETerm(f_i))
    sol = tn.solve(term, tn.Tsit5(), 0.0, 2.0, y0, controller=_ctrl(1e-9))
    torch.testing.assert_close(sol.ys[-1], exact, atol=1e-7, rtol=0)


def test_misuse_raises_type_errors():
    y0 = torch.tensor([1.0, 0.5], **F64)
    f = tn.ODETerm(lambda t, y, a: -y)
    with pytest.raises(TypeError, match=r"MultiTerm of 3 ODE terms"):
        tn.solve(tn.MultiTerm(f, f, f), tn.KenCarp4(), 0.0, 1.0, y0, dt0=0.1)
    bm = tn.VirtualBrownianTree(0.0, 1.0, shape=(2,), tol=1e-3, dtype=torch.float64, seed=0)
    sde = tn.MultiTerm(f, tn.ControlTerm(lambda t, y, a: 0.1 * y, bm, noise="diagonal"))
    with pytest.raises(TypeError, match="KenCarp4 is an ODE solver"):
        tn.solve(sde, tn.KenCarp4(), 0.0, 1.0, y0, dt0=0.1)
    from torchnde._flat import _FlatTerm
    from torchnde._tree import Flattener

    ft = _FlatTerm(f, Flattener(y0, batch=False), None, 1.0, False)
    with pytest.raises(TypeError, match="MultiTerm of two ODE terms"):
        ft.vf_explicit(0.0, y0)


def test_backward_in_time():
    """From the exact value at t = 2 back to t = 0 (the manufactured solution holds both ways;
    backwards the relaxation amplifies errors, so Dopri5 and Kvaerno4 miss by ~2e-5 too)."""
    f_e, f_i, y0, y2 = _split_problems()["nonlinear"]
    term = tn.MultiTerm(tn.ODETerm(f_e), tn.ODETerm(f_i))
    back = tn.solve(term, tn.KenCarp4(), 2.0, 0.0, y2, controller=_ctrl(1e-7))
    assert back.result == tn.Result.successful
    torch.testing.assert_close(back.ys[-1], y0, atol=1e-4, rtol=0)


def test_solver_policy_objects():
    assert tn.KenCarp4() == tn.KenCarp4() and tn.KenCarp4() != tn.KenCarp5()
    assert hash(tn.KenCarp3(max_iters=5)) == hash(tn.KenCarp3(max_iters=5))
    assert repr(tn.KenCarp5(jacobian="rev")) == "KenCarp5(jacobian='rev')"


# --- a stiff reaction--diffusion problem --------------------------------------------------


def _ctrl(rtol, atol=None):
    return tn.PIDController(rtol=rtol, atol=rtol * 1e-2 if atol is None else atol)


def _fisher(n=32, D=1.0, k=5.0):
    """Fisher--KPP ``u_t = D u_xx + k u (1 - u)`` on [0, 1] with no-flux ends, by the method of
    lines on ``n`` cells: the diffusion (stiffness ~ 4 D n^2 ~ 4e3) implicit, the reaction
    explicit."""
    dx = 1.0 / n
    x = (torch.arange(n, **F64) + 0.5) * dx

    def diffusion(t, u, a):
        up = torch.cat([u[..., :1], u, u[..., -1:]], -1)
        return D * (up[..., 2:] - 2 * u + up[..., :-2]) / dx**2

    def reaction(t, u, a):
        rate = k if a is None else a.unsqueeze(-1)
        return rate * u * (1 - u)

    u0 = 0.05 + 0.4 * torch.exp(-(((x - 0.3) / 0.1) ** 2))
    return reaction, diffusion, u0


def test_reaction_diffusion():
    """Fisher--KPP on 32 cells to t = 0.5 at rtol = 1e-6: KenCarp4 (reaction explicit,
    diffusion implicit) matches Kvaerno5 at rtol = 1e-9 on the whole system to 1e-5 in under
    60 steps, where Tsit5 runs out of 300 steps (its step is bounded by stability, about
    3.3 / 4e3). Measured: KenCarp4 38 steps, error 1.8e-6; Tsit5 630 steps when let run."""
    reaction, diffusion, u0 = _fisher()
    whole = tn.ODETerm(lambda t, u, a: diffusion(t, u, a) + reaction(t, u, a))
    ref = tn.solve(whole, tn.Kvaerno5(newton_rtol=1e-11), 0.0, 0.5, u0, controller=_ctrl(1e-9))
    split = tn.MultiTerm(tn.ODETerm(reaction), tn.ODETerm(diffusion))
    sol = tn.solve(split, tn.KenCarp4(), 0.0, 0.5, u0, controller=_ctrl(1e-6))
    assert (sol.ys[-1] - ref.ys[-1]).abs().max() < 1e-5
    assert sol.stats["num_steps"] < 60, sol.stats
    tsit = tn.solve(whole, tn.Tsit5(), 0.0, 0.5, u0, controller=_ctrl(1e-6), max_steps=300, throw=False)
    assert tsit.result == tn.Result.max_steps_reached


@pytest.mark.slow
@pytest.mark.parametrize("solver", IMEX_SOLVERS, ids=lambda s: s.__name__)
def test_reaction_diffusion_all(solver):
    """Every KenCarp on Fisher--KPP (64 cells, t = 1, rtol = 1e-6) against Kvaerno5 at
    rtol = 1e-10, and with far fewer steps than Tsit5."""
    reaction, diffusion, u0 = _fisher(n=64)
    whole = tn.ODETerm(lambda t, u, a: diffusion(t, u, a) + reaction(t, u, a))
    ref = tn.solve(whole, tn.Kvaerno5(newton_rtol=1e-12), 0.0, 1.0, u0, controller=_ctrl(1e-10))
    split = tn.MultiTerm(tn.ODETerm(reaction), tn.ODETerm(diffusion))
    sol = tn.solve(split, solver(), 0.0, 1.0, u0, controller=_ctrl(1e-6))
    assert (sol.ys[-1] - ref.ys[-1]).abs().max() < 1e-5
    tsit = tn.solve(whole, tn.Tsit5(), 0.0, 1.0, u0, controller=_ctrl(1e-6), max_steps=100_000)
    assert sol.stats["num_steps"] * 10 < tsit.stats["num_steps"], (sol.stats, tsit.stats)


# --- failed Newton solves are rejected steps ----------------------------------------------


def test_newton_failure_is_a_rejected_step():
    """y' = -y - 1000 y^3 (the decay explicit, the cubic implicit) from a far too large first
    step: the simplified Newton iterations (Jacobian at y0, where it is steeper than along the
    solution) fail, the step is rejected and retried smaller, and the solve ends at the exact
    solution y = (1001 e^(2t) - 1000)^(-1/2)."""
    s = tn.KenCarp4()
    seen = {}
    init = s.init

    def spy(term, t0, y0):
        state = init(term, t0, y0)
        seen["stats"] = state[-2]
        return state

    s.init = spy
    y0 = torch.tensor([1.0], **F64)
    term = tn.MultiTerm(tn.ODETerm(lambda t, y, a: -y), tn.ODETerm(lambda t, y, a: -1000 * y**3))
    sol = tn.solve(term, s, 0.0, 2.0, y0, dt0=1.0, controller=_ctrl(1e-6, 1e-9))
    assert sol.result == tn.Result.successful
    assert seen["stats"].failures.sum() > 0
    assert sol.stats["num_rejected"] >= int(seen["stats"].failures.sum())
    assert sol.stats["num_rejected_nonfinite"] == 0
    exact = (1001 * math.exp(4.0) - 1000) ** -0.5
    assert abs(sol.ys[-1].item() - exact) < 1e-4 * exact


# --- per-sample ---------------------------------------------------------------------------


@pytest.mark.parametrize("solver", [tn.KenCarp3, tn.KenCarp5], ids=lambda s: s.__name__)
def test_per_sample_matches_alone(solver):
    """Three reaction rates per sample (16 cells): each sample equals its own solve, with its
    own Newton convergence, Jacobian, LU and steps."""
    reaction, diffusion, u0 = _fisher(n=16, D=0.5)
    k = torch.tensor([1.0, 5.0, 20.0], **F64)
    y0 = torch.stack([u0, 0.5 * u0, u0.flip(0)])
    split = tn.MultiTerm(tn.ODETerm(reaction), tn.ODETerm(diffusion))
    kw = dict(controller=_ctrl(1e-5), saveat=tn.SaveAt(ts=[0.1, 0.3]), per_sample=True)
    both = tn.solve(split, solver(), 0.0, 0.3, y0, args=k, **kw)
    assert (both.result == 0).all()
    for i in range(3):
        alone = tn.solve(split, solver(), 0.0, 0.3, y0[i : i + 1], args=k[i : i + 1], **kw)
        torch.testing.assert_close(both.ys[i], alone.ys[0], atol=1e-10, rtol=0)
        assert both.stats["num_steps"][i] == alone.stats["num_steps"][0]
    steps = both.stats["num_steps"]
    assert steps[2] > steps[0]  # the fastest reaction takes more steps; the others do not follow


# --- gradients ----------------------------------------------------------------------------


def _fisher_loss(solver, n=8):
    """``p = (k, D) -> sum(u(0.2) x)`` for Fisher--KPP on ``n`` cells, constant steps."""
    dx = 1.0 / n
    x = (torch.arange(n, **F64) + 0.5) * dx
    u0 = 0.1 + 0.3 * torch.exp(-(((x - 0.3) / 0.2) ** 2))

    def loss(p):
        k, D = p[0], p[1]

        def diffusion(t, u, a):
            up = torch.cat([u[..., :1], u, u[..., -1:]], -1)
            return D * (up[..., 2:] - 2 * u + up[..., :-2]) / dx**2

        term = tn.MultiTerm(tn.ODETerm(lambda t, u, a: k * u * (1 - u)), tn.ODETerm(diffusion))
        sol = tn.solve(term, solver(**TIGHT), 0.0, 0.2, u0, dt0=0.02)
        return (sol.ys[-1] * x).sum()

    p = torch.tensor([3.0, 0.5], **F64, requires_grad=True)
    (g,) = torch.autograd.grad(loss(p), p)
    d = 1e-5
    with torch.no_grad():
        fd = torch.stack([(loss(p + d * e) - loss(p - d * e)) / (2 * d) for e in torch.eye(2, **F64)])
    return g, fd


@pytest.mark.parametrize("solver", IMEX_SOLVERS, ids=lambda s: s.__name__)
def test_gradient_matches_finite_differences(solver):
    """DirectAdjoint through the IMEX steps of Fisher--KPP on 8 cells against central
    differences (float64, constant steps): the gradients with respect to the reaction rate (the
    explicit part) and the diffusivity (the implicit part) to 1e-6 relative."""
    g, fd = _fisher_loss(solver)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-9)


def test_checkpoint_adjoint_matches_direct():
    """CheckpointAdjoint (recomputing the steps) gives DirectAdjoint's gradient, adaptive steps."""
    reaction, diffusion, u0 = _fisher(n=8, D=0.5)

    def grad(adjoint):
        k = torch.tensor(3.0, **F64, requires_grad=True)
        term = tn.MultiTerm(tn.ODETerm(lambda t, u, a: a * u * (1 - u)), tn.ODETerm(diffusion))
        sol = tn.solve(term, tn.KenCarp4(), 0.0, 0.3, u0, args=k, controller=_ctrl(1e-5), adjoint=adjoint)
        return torch.autograd.grad(sol.ys[-1].sum(), k)[0]

    torch.testing.assert_close(grad(tn.CheckpointAdjoint()), grad(tn.DirectAdjoint()), rtol=1e-8, atol=0)
