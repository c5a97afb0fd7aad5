"""Implicit (ESDIRK) solvers for stiff ODEs: tableaus, orders, stiff reference problems,
per-sample Newton/LU, failed Newton solves as rejected steps, and gradients."""

import math

import numpy as np
import pytest
import torch

import torchnde as tn
from _trees import density as _density
from _trees import rooted_trees as _trees
from problems import rober
from problems import rober_reference as _rober_ref
from torchnde.solvers import IMPLICIT_SOLVERS
from torchnde.solvers._implicit import NEWTON_DIVERGED, NEWTON_OK, NEWTON_SINGULAR

pytestmark = pytest.mark.usefixtures("one_thread")

KVAERNO = [tn.Kvaerno3, tn.Kvaerno4, tn.Kvaerno5]
TIGHT = dict(newton_rtol=1e-13, newton_atol=1e-15)


# --- tableaus -----------------------------------------------------------------------------


def _phi(A, t):
    out = np.ones(len(A))
    for c in t:
        out = out * (A @ _phi(A, c))
    return out


def _max_residual(A, b, order):
    return max(abs(b @ _phi(A, t) - 1.0 / _density(t)) for n, ts in _trees(order).items() for t in ts)


def test_tree_count():
    assert [len(v) for v in _trees(5).values()] == [1, 1, 2, 4, 9]


@pytest.mark.parametrize("solver", IMPLICIT_SOLVERS, ids=lambda s: s.__name__)
def test_order_conditions(solver):
    """The propagated solution satisfies every order condition up to ``order``, the embedded one
    to its order (and not the next), the rows sum to c, the method is stiffly accurate."""
    tab = solver.tableau
    A, b, bh = np.array(tab.full_matrix()), np.array(tab.b, float), np.array(tab.b_hat, float)
    np.testing.assert_allclose(A.sum(1), tab.c, atol=1e-15)
    np.testing.assert_allclose(A[-1], b, atol=0)  # stiffly accurate: y1 is the last stage
    assert tab.c[-1] == pytest.approx(1.0, abs=1e-14)
    assert _max_residual(A, b, solver.order) < 1e-12
    assert _max_residual(A, b, solver.order + 1) > 1e-6
    # the embedded solution: one order lower (Kvaerno), or the trapezoidal rule (implicit Euler)
    emb = solver.error_order if solver.error_order < solver.order else solver.order + 1
    assert _max_residual(A, bh, emb) < 1e-12
    assert _max_residual(A, bh, emb + 1) > 1e-6
    assert np.allclose(np.diag(A)[1:], tab.gamma) and A[0, 0] == 0


@pytest.mark.parametrize("solver", IMPLICIT_SOLVERS, ids=lambda s: s.__name__)
def test_l_stable(solver):
    """R(z) = 1 + z b^T (I - z A)^-1 1 tends to 0 as z -> -inf (stiff decay is damped)."""
    tab = solver.tableau
    A, b = np.array(tab.full_matrix()), np.array(tab.b, float)
    one = np.ones(len(b))
    for z in (-1e6, -1e9):
        R = 1 + z * b @ np.linalg.solve(np.eye(len(b)) - z * A, one)
        assert abs(R) < 1e-5


# --- convergence order on non-stiff problems ----------------------------------------------

A_LIN = torch.tensor([[-0.3, 1.2, 0.1], [-1.0, -0.2, 0.4], [0.2, -0.5, -0.4]], dtype=torch.float64)


def _problems():
    y0 = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    return {
        "linear": (lambda t, y, a: A_LIN @ y, y0, torch.linalg.matrix_exp(A_LIN * 2.0) @ y0, 2.0),
        "time": (
            lambda t, y, a: math.cos(t) * y,
            torch.tensor([1.0], dtype=torch.float64),
            torch.tensor([math.exp(math.sin(3.0))], dtype=torch.float64),
            3.0,
        ),
        "logistic": (
            lambda t, y, a: y * (1 - y),
            torch.tensor([0.1], dtype=torch.float64),
            torch.tensor([1 / (1 + 9 * math.exp(-3.0))], dtype=torch.float64),
            3.0,
        ),
    }


@pytest.mark.parametrize("problem", ["linear", "time", "logistic"])
@pytest.mark.parametrize("solver", IMPLICIT_SOLVERS, ids=lambda s: s.__name__)
def test_global_order(solver, problem):
    """Constant steps, float64, tight Newton tolerances: log-error vs log-h slope within 0.3 of
    the declared order."""
    f, y0, exact, T = _problems()[problem]
    ns = [16, 24, 36, 54] if solver.order < 5 else [8, 12, 16, 24]
    if solver.order == 1:
        ns = [20, 40, 80, 160]
    hs, errs = [], []
    for n in ns:
        sol = tn.solve(tn.ODETerm(f), solver(**TIGHT), 0.0, T, y0, dt0=T / n)
        assert sol.stats["num_steps"] == n
        hs.append(T / n)
        errs.append((sol.ys[-1] - exact).abs().max().item())
    assert min(errs) > 1e-13, errs  # above round-off
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - solver.order) <= 0.3, (slope, errs)


@pytest.mark.parametrize("solver", IMPLICIT_SOLVERS, ids=lambda s: s.__name__)
def test_error_estimate_order(solver):
    """One step from the same point: the embedded estimate shrinks like h^(error_order + 1)."""
    f, y0, _, _ = _problems()["logistic"]
    hs = [0.2 * 2.0**-k for k in range(4)]
    errs = []
    from torchnde._flat import _FlatTerm
    from torchnde._tree import Flattener

    for h in hs:
        s = solver(**TIGHT)
        ft = _FlatTerm(tn.ODETerm(f), Flattener(y0, batch=False), None, 1.0, False)
        _, y_err, _, _, code = s.step(ft, 0.0, h, y0, s.init(ft, 0.0, y0))
        assert int(code) == NEWTON_OK
        errs.append(y_err.abs().max().item())
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - (solver.error_order + 1)) <= 0.35, errs


@pytest.mark.parametrize("solver", IMPLICIT_SOLVERS, ids=lambda s: s.__name__)
def test_dense_output(solver):
    """Dense output (cubic Hermite) matches the solution inside the steps."""
    f, y0, _, T = _problems()["linear"]
    rtol, tol = (1e-2, 0.2) if solver.order == 1 else (1e-6, 1e-4)
    ctrl = tn.PIDController(rtol=rtol, atol=rtol)
    sol = tn.solve(tn.ODETerm(f), solver(), 0.0, T, y0, controller=ctrl, saveat=tn.SaveAt(dense=True))
    for t in (0.37, 1.111, 1.9):
        exact = torch.linalg.matrix_exp(A_LIN * t) @ y0
        torch.testing.assert_close(sol.evaluate(t), exact, atol=tol, rtol=0)


# --- stiff reference problems -------------------------------------------------------------


@pytest.mark.parametrize(
    "solver",
    [pytest.param(tn.Kvaerno3, marks=pytest.mark.slow), pytest.param(tn.Kvaerno4, marks=pytest.mark.slow), tn.Kvaerno5],
    ids=lambda s: s.__name__,
)
def test_robertson(solver):
    """Robertson's chemical kinetics to t = 1e3 at rtol = 1e-6, atol = 1e-10, float64.

    Measured (this machine, steps / vector-field evaluations incl. Jacobians): Kvaerno3 352 / 1674,
    Kvaerno4 157 / 1168, Kvaerno5 43 / 716; SciPy Radau at the same tolerances 115 steps / 945
    evaluations (+ 31 Jacobians). Each component within 1e-5 (relative) of SciPy Radau at
    rtol = 1e-12. Tsit5 stops at max_steps (test_robertson_explicit_hits_max_steps).
    """
    pytest.importorskip("scipy")
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    sol = tn.solve(tn.ODETerm(rober), solver(), 0.0, 1e3, y0, controller=tn.PIDController(rtol=1e-6, atol=1e-10))
    ref = _rober_ref(1e3)
    rel = np.abs(sol.ys[-1].numpy() - ref) / np.abs(ref)
    assert rel.max() < 1e-5, rel
    assert sol.stats["num_steps"] < {tn.Kvaerno3: 500, tn.Kvaerno4: 250, tn.Kvaerno5: 100}[solver]


def test_robertson_explicit_hits_max_steps():
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    sol = tn.solve(
        tn.ODETerm(rober),
        tn.Tsit5(),
        0.0,
        1e3,
        y0,
        controller=tn.PIDController(rtol=1e-6, atol=1e-10),
        max_steps=1000,
        throw=False,
    )
    assert sol.result == tn.Result.max_steps_reached


def vdp(t, y, mu):
    y1, y2 = y[..., 0], y[..., 1]
    return torch.stack([y2, mu * ((1 - y1**2) * y2 - y1)], -1)


def vdp_scaled(t, y, eps):
    """Van der Pol in Hairer's scaling: t -> t / mu, eps = 1 / mu^2 (mu = 1000 for eps = 1e-6)."""
    y1, y2 = y[..., 0], y[..., 1]
    return torch.stack([y2, ((1 - y1**2) * y2 - y1) / eps], -1)


# SciPy Radau at rtol = atol = 1e-13 from y0 = (2, -0.66), eps = 1e-6
VDP_REF = {0.5: [1.596768611023468, -1.0303916904405994], 1.0: [-1.8636460061388793, 0.7535432683993559]}


@pytest.mark.parametrize("T", [0.5, pytest.param(1.0, marks=pytest.mark.slow)])
def test_van_der_pol_stiff(T):
    """Van der Pol with mu = 1000 (eps = 1e-6 in Hairer's scaling), rtol = atol = 1e-6, Kvaerno5.

    T = 0.5: the slow branch of the first half-period; T = 1.0 also crosses the fast jump
    (slow tier). Measured at T = 1.0 (this machine): Kvaerno5 264 steps / 4433 evaluations,
    Kvaerno4 713 / 6026, Kvaerno3 1702 / 8779; SciPy Radau 437 steps / 3682 evaluations
    (+ 102 Jacobians); Tsit5 stops at 20000 steps near t = 0.
    """
    y0 = torch.tensor([2.0, -0.66], dtype=torch.float64)
    sol = tn.solve(
        tn.ODETerm(vdp_scaled), tn.Kvaerno5(), 0.0, T, y0, args=1e-6, controller=tn.PIDController(rtol=1e-6, atol=1e-6)
    )
    np.testing.assert_allclose(sol.ys[-1].numpy(), VDP_REF[T], rtol=1e-5, atol=1e-5)
    assert sol.stats["num_steps"] < (60 if T == 0.5 else 400)


# --- per-sample ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver", [pytest.param(tn.Kvaerno3, marks=pytest.mark.slow), tn.Kvaerno5], ids=lambda s: s.__name__
)
def test_per_sample_matches_alone(solver):
    """Van der Pol (Hairer's scaling) with eps = 1, 1e-3, 1e-6 per sample (non-stiff to stiff):
    each sample equals its own solve, with its own Newton convergence, Jacobian, LU and steps."""
    eps = torch.tensor([1.0, 1e-3, 1e-6], dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [2.0, -0.66]], dtype=torch.float64)
    ctrl = tn.PIDController(rtol=1e-4, atol=1e-4)
    kw = dict(controller=ctrl, saveat=tn.SaveAt(ts=[0.1, 0.2, 0.3]), per_sample=True)
    both = tn.solve(tn.ODETerm(vdp_scaled), solver(), 0.0, 0.3, y0, args=eps, **kw)
    assert (both.result == 0).all()
    for i in range(3):
        alone = tn.solve(tn.ODETerm(vdp_scaled), solver(), 0.0, 0.3, y0[i : i + 1], args=eps[i : i + 1], **kw)
        torch.testing.assert_close(both.ys[i], alone.ys[0], atol=1e-10, rtol=0)
        assert both.stats["num_steps"][i] == alone.stats["num_steps"][0]
    steps = both.stats["num_steps"]
    assert steps[0] < steps[2]  # the stiff sample takes more steps; the others do not follow it


def test_per_sample_jacobian_blocks():
    """Per-sample Jacobians are the (n, n) blocks of each row, by every AD mode."""
    from torchnde._flat import _FlatTerm
    from torchnde._tree import Flattener
    from torchnde.solvers._implicit import jacobian

    mu = torch.tensor([1.0, 30.0], dtype=torch.float64)
    y = torch.tensor([[2.0, 0.3], [1.0, 0.5]], dtype=torch.float64)
    ft = _FlatTerm(tn.ODETerm(vdp), Flattener(y, batch=True), mu, 1.0, True)
    t = torch.zeros(2, dtype=torch.float64)
    for mode in ("loop", "fwd", "rev"):
        J = jacobian(ft, t, y, True, mode)
        assert J.shape == (2, 2, 2)
        for b in range(2):
            Jb = torch.autograd.functional.jacobian(lambda z, m=mu[b]: vdp(0.0, z, m), y[b])
            torch.testing.assert_close(J[b], Jb)


# --- failed Newton solves are rejected steps ----------------------------------------------


@pytest.mark.parametrize("solver", [tn.Kvaerno3, tn.Kvaerno5], ids=lambda s: s.__name__)
def test_newton_failure_is_a_rejected_step(solver):
    """y' = -1000 y^3 from a far too large first step: the simplified Newton iterations (Jacobian
    at y0, where it is 3x steeper than along the solution) fail, the step is rejected and retried
    smaller, and the solve succeeds with the right answer."""
    s = solver()
    y0 = torch.tensor([1.0], dtype=torch.float64)
    sol = tn.solve(
        tn.ODETerm(lambda t, y, a: -1000 * y**3),
        s,
        0.0,
        10.0,
        y0,
        dt0=5.0,
        controller=tn.PIDController(rtol=1e-6, atol=1e-9),
    )
    assert sol.result == tn.Result.successful
    assert sol.stats["newton_failures"] > 0
    assert sol.stats["num_rejected"] >= sol.stats["newton_failures"]
    assert sol.stats["num_rejected_nonfinite"] == 0
    exact = 1 / math.sqrt(1 + 2000 * 10.0)
    assert abs(sol.ys[-1].item() - exact) < 1e-5 * exact


def test_singular_newton_matrix_is_a_rejected_step():
    """Implicit Euler on y' = y with h = 1: I - h J = 0 exactly. The step reports
    NEWTON_SINGULAR with y1 = y0 and a large finite error; the solve shrinks the step and
    succeeds."""
    from torchnde._flat import _FlatTerm
    from torchnde._tree import Flattener

    y0 = torch.tensor([1.0], dtype=torch.float64)
    term = tn.ODETerm(lambda t, y, a: y)
    s = tn.ImplicitEuler()
    ft = _FlatTerm(term, Flattener(y0, batch=False), None, 1.0, False)
    y1, y_err, _, _, code = s.step(ft, 0.0, 1.0, y0, s.init(ft, 0.0, y0))
    assert int(code) == NEWTON_SINGULAR
    assert torch.equal(y1, y0) and torch.isfinite(y_err).all() and y_err.item() > 1e3
    sol = tn.solve(term, tn.ImplicitEuler(), 0.0, 1.0, y0, dt0=1.0, controller=tn.PIDController(rtol=1e-3, atol=1e-6))
    assert sol.result == tn.Result.successful and sol.stats["num_rejected"] >= 1
    assert abs(sol.ys[-1].item() - math.e) < 0.1  # (first order at rtol = 1e-3)


def test_per_sample_failure_only_rejects_its_sample():
    """Per sample: the sample whose Newton solve fails is rejected alone (the others accept)."""
    from torchnde._flat import _FlatTerm
    from torchnde._tree import Flattener

    y0 = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    k = torch.tensor([1.0, 1.0], dtype=torch.float64)
    term = tn.ODETerm(lambda t, y, k: k.unsqueeze(-1) * y)
    s = tn.ImplicitEuler()
    ft = _FlatTerm(term, Flattener(y0, batch=True), k, 1.0, True)
    t0 = torch.zeros(2, dtype=torch.float64)
    t1 = torch.tensor([1.0, 0.5], dtype=torch.float64)  # h = 1 makes I - h J singular for sample 0
    y1, y_err, _, _, code = s.step(ft, t0, t1, y0, s.init(ft, t0, y0))
    assert code.tolist() == [NEWTON_SINGULAR, NEWTON_OK]
    assert y1[0].item() == 1.0 and y1[1].item() == pytest.approx(2.0)  # 1 / (1 - 0.5)
    assert y_err[0].item() > 1e3 and abs(y_err[1].item()) < 1.0
    assert NEWTON_DIVERGED not in code.tolist()


# --- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("solver", [tn.ImplicitEuler, tn.Kvaerno3, tn.Kvaerno5], ids=lambda s: s.__name__)
def test_gradient_matches_finite_differences(solver):
    """DirectAdjoint through the Newton iterations of a stiff linear ODE y' = -k (y - cos t),
    k = 500 and h k = 25 (constant steps), against central differences in float64."""

    def loss(k):
        y0 = torch.tensor([0.0], dtype=torch.float64)
        sol = tn.solve(
            tn.ODETerm(lambda t, y, k: -k * (y - math.cos(t))), solver(**TIGHT), 0.0, 1.0, y0, args=k, dt0=0.05
        )
        return (sol.ys[-1] ** 2).sum()

    k = torch.tensor(500.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(loss(k), k)
    d = 1e-3
    with torch.no_grad():
        fd = (loss(k + d) - loss(k - d)) / (2 * d)
    assert g.item() == pytest.approx(fd.item(), rel=1e-6)


def test_gradient_adaptive_nonlinear():
    """Adaptive Kvaerno5 on a stiff nonlinear problem: gradient w.r.t. the rate of y' = -k y^3
    (k = 100) against central differences (step sizes are constants for autograd, so the two
    agree to about the tolerance)."""

    def loss(k):
        y0 = torch.tensor([1.0], dtype=torch.float64)
        sol = tn.solve(
            tn.ODETerm(lambda t, y, k: -k * y**3),
            tn.Kvaerno5(**TIGHT),
            0.0,
            1.0,
            y0,
            args=k,
            controller=tn.PIDController(rtol=1e-8, atol=1e-10),
        )
        return sol.ys[-1].sum()

    k = torch.tensor(100.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(loss(k), k)
    exact = -0.5 * 2.0 * (1 + 2 * 100.0) ** -1.5  # d/dk (1 + 2 k)^-1/2
    d = 1e-3
    with torch.no_grad():
        fd = (loss(k + d) - loss(k - d)) / (2 * d)
    assert g.item() == pytest.approx(exact, rel=1e-4)
    assert fd.item() == pytest.approx(exact, rel=1e-4)


# --- dtypes, modules, direction -----------------------------------------------------------


def test_float32_module_per_sample():
    """A float32 nn.Module vector field, per sample: the Jacobian goes through torch.func, the
    state stays float32, and the result agrees with Tsit5."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    def f(t, y, a):
        return net(y) - 20.0 * y  # a stiff linear part

    y0 = torch.randn(4, 3)
    kw = dict(controller=tn.PIDController(rtol=1e-4, atol=1e-6), per_sample=True)
    sol = tn.solve(tn.ODETerm(f), tn.Kvaerno3(), 0.0, 1.0, y0, **kw)
    ref = tn.solve(tn.ODETerm(f), tn.Tsit5(), 0.0, 1.0, y0, **kw)
    assert sol.ys.dtype == torch.float32 and (sol.result == 0).all()
    torch.testing.assert_close(sol.ys, ref.ys, atol=1e-3, rtol=0)
    (g,) = torch.autograd.grad(sol.ys.sum(), net[0].weight)  # gradients reach the parameters
    assert torch.isfinite(g).all()


def test_backward_in_time():
    f, y0, _, _ = _problems()["linear"]
    y1 = torch.linalg.matrix_exp(A_LIN * 1.0) @ y0
    sol = tn.solve(tn.ODETerm(f), tn.Kvaerno4(), 1.0, 0.0, y1, controller=tn.PIDController(rtol=1e-8, atol=1e-10))
    torch.testing.assert_close(sol.ys[-1], y0, atol=1e-6, rtol=0)


def test_solver_policy_objects():
    assert tn.Kvaerno5() == tn.Kvaerno5() and tn.Kvaerno5() != tn.Kvaerno4()
    assert tn.Kvaerno5(newton_rtol=1e-9) != tn.Kvaerno5()
    assert hash(tn.Kvaerno5()) == hash(tn.Kvaerno5())
    assert repr(tn.Kvaerno5()) == "Kvaerno5()"
    assert repr(tn.Kvaerno3(jacobian="rev")) == "Kvaerno3(jacobian='rev')"
    assert tn.Kvaerno3(jacobian="fwd") != tn.Kvaerno3()
    with pytest.raises(ValueError, match="jacobian"):
        tn.Kvaerno5(jacobian="numeric")
    with pytest.raises(ValueError, match="max_iters"):
        tn.Kvaerno5(max_iters=0)
    with pytest.raises(TypeError, match="real state"):
        tn.solve(
            tn.ODETerm(lambda t, y, a: -y), tn.Kvaerno3(), 0.0, 1.0, torch.ones(2, dtype=torch.complex128), dt0=0.1
        )


def test_shared_mode_large_state_warns():
    """A large flattened state in shared mode gets one dense Jacobian: say so, and point at
    per_sample=True."""
    from torchnde._flat import _FlatTerm
    from torchnde._tree import Flattener

    y0 = torch.zeros(64, 40)  # 2560 states
    ft = _FlatTerm(tn.ODETerm(lambda t, y, a: -y), Flattener(y0, batch=False), None, 1.0, False)
    with pytest.warns(UserWarning, match="per_sample=True"):
        tn.Kvaerno3().init(ft, 0.0, y0.flatten())


@pytest.mark.parametrize(
    "adjoint",
    [pytest.param(tn.BacksolveAdjoint(), marks=pytest.mark.slow), tn.CheckpointAdjoint()],
    ids=lambda a: type(a).__name__,
)
def test_other_adjoints_agree_with_direct(adjoint):
    """BacksolveAdjoint (the adjoint equation solved backwards by the same implicit solver) and
    CheckpointAdjoint agree with DirectAdjoint on a stiff linear problem. (BacksolveAdjoint takes
    ~10 s here: every adjoint evaluation is a vector-Jacobian product, and its Jacobian for the
    Newton matrix is one more autograd pass over that.)"""

    def grad(adj):
        k = torch.tensor(50.0, dtype=torch.float64, requires_grad=True)
        sol = tn.solve(
            tn.ODETerm(lambda t, y, k: -k * (y - math.cos(t))),
            tn.Kvaerno5(),
            0.0,
            1.0,
            torch.tensor([1.0], dtype=torch.float64),
            args=k,
            controller=tn.PIDController(rtol=1e-8, atol=1e-10),
            adjoint=adj,
        )
        return torch.autograd.grad(sol.ys[-1].sum(), k)[0].item()

    assert grad(adjoint) == pytest.approx(grad(tn.DirectAdjoint()), rel=1e-4)


# --- gradients by the implicit function theorem -------------------------------------------

#: Newton solved to roundoff, so that central differences see the exact stage solutions
TIGHTER = dict(newton_rtol=1e-13, newton_atol=1e-15, max_iters=40)
_P = [2.0, 400.0, 30.0]
_Y0 = [0.5, 0.3, -0.3]


def _stiff3(t, y, p):
    """A small stiff nonlinear system: ``a`` relaxes slowly to ``cos t``, ``b`` fast (rate
    ``p1``) to ``a^2 / 2``, ``c`` to ``b`` with a cubic loss; ``p`` per sample when batched (rows
    of ``y`` and ``p``)."""
    a, b, c = y[..., 0], y[..., 1], y[..., 2]
    tt = torch.as_tensor(t, dtype=y.dtype)
    return torch.stack(
        [-p[..., 0] * (a - torch.cos(tt)) + b * c, -p[..., 1] * (b - a * a / 2), -p[..., 2] * (c - b) - c**3], -1
    )


def _central(loss, x, rel=1e-4):
    """Central differences of the per-row losses ``loss(x)`` (``(B,)``) at ``x`` (``(B, m)``,
    float64; rows independent, so one coordinate of every row is stepped at once), each step
    ``rel`` times the coordinate's size."""
    out = torch.zeros_like(x)
    with torch.no_grad():
        for i in range(x.shape[-1]):
            d = rel * x[:, i].abs().clamp(min=1e-2)
            e = torch.zeros_like(x)
            e[:, i] = d
            out[:, i] = (loss(x + e) - loss(x - e)) / (2 * d)
    return out


def _grad(loss, x):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(loss(x).sum(), x)[0]


def _stiff3_loss(solver, per_sample, **kw):
    """``theta = (p, y0) -> sum(y(t) w)`` over two saved times, one row (loss) per sample."""
    w = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)

    def loss(theta):
        p, y0 = theta[..., :3], theta[..., 3:]
        if not per_sample:
            p, y0 = p[0], y0[0]
        sol = tn.solve(
            tn.ODETerm(_stiff3),
            solver,
            0.0,
            0.5,
            y0,
            args=p,
            saveat=tn.SaveAt(ts=[0.2, 0.5]),
            per_sample=per_sample,
            **kw,
        )
        return (sol.ys * w).sum((-2, -1)).reshape(-1)

    rows = [_P + _Y0, [3.0, 1000.0, 60.0, 0.8, 0.2, 0.1]]
    theta = torch.tensor(rows if per_sample else rows[:1], dtype=torch.float64)
    return loss, theta


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("solver", [tn.Kvaerno3, tn.Kvaerno5], ids=lambda s: s.__name__)
@pytest.mark.parametrize("path", ["dense", "refined"])
def test_ift_gradient_matches_finite_differences(solver, per_sample, path, monkeypatch):
    """Gradients with respect to the rates and y0 of a stiff nonlinear system (fixed steps,
    h * stiffness up to 50), through the implicit-function-theorem stage derivative, against
    central differences to 1e-7 relative: the adjoint stage system solved directly with the exact
    Jacobian at Z (``dense``: the path for up to 8 states) and by refinement preconditioned with
    the forward LU (``refined``: forced here; the path for larger systems)."""
    from torchnde.solvers import _implicit

    if path == "refined":
        monkeypatch.setattr(_implicit, "_ADJ_DENSE", 0)
    loss, theta = _stiff3_loss(solver(**TIGHTER), per_sample, dt0=0.05)
    torch.testing.assert_close(_grad(loss, theta), _central(loss, theta), rtol=1e-7, atol=1e-12)


def test_ift_refinement_with_a_stale_factorisation(monkeypatch):
    """The refinement's answer does not depend on how stale the forward LU is: with Jacobians
    kept across steps (a loose Newton tolerance keeps them longer) it equals the direct solve with
    the exact Jacobian at every stage, as does the dense fallback (no refinement allowed)."""
    from torchnde.solvers import _implicit

    loss, theta = _stiff3_loss(tn.Kvaerno5(newton_rtol=1e-5), False, dt0=0.05)
    dense = _grad(loss, theta)
    monkeypatch.setattr(_implicit, "_ADJ_DENSE", 0)
    refined = _grad(loss, theta)
    monkeypatch.setattr(_implicit, "_ADJ_ITERS", 0)
    fallback = _grad(loss, theta)
    torch.testing.assert_close(refined, dense, rtol=1e-9, atol=0)
    torch.testing.assert_close(fallback, dense, rtol=1e-12, atol=0)


def test_ift_gradient_adaptive():
    """Adaptive Kvaerno5: autograd treats the accepted step sizes as constants, so the gradient
    is that of the solve on the same grid, which central differences on that grid match to
    1e-7 (the forward values under autograd equal those without it, so the grid is the same)."""
    ctrl = tn.PIDController(rtol=1e-6, atol=1e-9)
    loss, theta = _stiff3_loss(tn.Kvaerno5(**TIGHTER), False, controller=ctrl)
    with torch.no_grad():
        steps = tn.solve(
            tn.ODETerm(_stiff3),
            tn.Kvaerno5(**TIGHTER),
            0.0,
            0.5,
            theta[0, 3:],
            args=theta[0, :3],
            controller=ctrl,
            saveat=tn.SaveAt(steps=True),
        ).ts
    grid, _ = _stiff3_loss(tn.Kvaerno5(**TIGHTER), False, controller=tn.StepTo(torch.cat([steps.new_zeros(1), steps])))
    g = _grad(loss, theta)
    torch.testing.assert_close(g, _grad(grid, theta), rtol=1e-10, atol=0)
    torch.testing.assert_close(g, _central(grid, theta), rtol=1e-7, atol=1e-12)


def _fisher_kpp(n):
    """Fisher--KPP ``u_t = D u_xx + k u (1 - u)`` on ``n`` cells (no-flux ends): the reaction
    explicit, the diffusion implicit; ``theta = (k, D, u0 scale)`` per row."""
    dx = 1.0 / n
    x = (torch.arange(n, dtype=torch.float64) + 0.5) * dx
    bump = torch.exp(-(((x - 0.3) / 0.2) ** 2))

    def diffusion(t, u, th):
        up = torch.cat([u[..., :1], u, u[..., -1:]], -1)
        return th[..., 1:2] * (up[..., 2:] - 2 * u + up[..., :-2]) / dx**2

    def reaction(t, u, th):
        return th[..., 0:1] * u * (1 - u)

    term = tn.MultiTerm(tn.ODETerm(reaction), tn.ODETerm(diffusion))
    return term, x, bump


@pytest.mark.parametrize("n", [6, 12], ids=["dense", "refined"])
@pytest.mark.parametrize("steps", ["fixed", "adaptive"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_ift_gradient_kencarp4(n, steps, per_sample):
    """KenCarp4 (reaction explicit, diffusion implicit) on Fisher--KPP with 6 cells (adjoint
    stage solves direct) and 12 (refined with the forward LU): gradients with respect to the
    reaction rate, the diffusivity and the initial amplitude against central differences to 1e-7
    with fixed steps; with adaptive ones equal (1e-10) to the gradient on the same fixed grid, and
    to its central differences (1e-7)."""
    term, x, bump = _fisher_kpp(n)

    def make(controller):
        def loss(th):
            u0 = 0.1 + th[..., 2:3] * bump
            args = th
            if not per_sample:
                u0, args = u0[0], th[0]
            sol = tn.solve(term, tn.KenCarp4(**TIGHTER), 0.0, 0.1, u0, args=args, per_sample=per_sample, **controller)
            return (sol.ys[..., -1, :] * x).sum(-1).reshape(-1)

        return loss

    theta = torch.tensor([[3.0, 0.5, 0.3], [5.0, 0.2, 0.5]][: 2 if per_sample else 1], dtype=torch.float64)
    if steps == "fixed":
        loss = grid = make(dict(dt0=0.01))
    else:
        ctrl = tn.PIDController(rtol=1e-8, atol=1e-10)
        loss = make(dict(controller=ctrl))
        with torch.no_grad():
            th = theta[0]
            ts = tn.solve(
                term,
                tn.KenCarp4(**TIGHTER),
                0.0,
                0.1,
                0.1 + th[2] * bump,
                args=th,
                controller=ctrl,
                saveat=tn.SaveAt(steps=True),
            ).ts
        grid = make(dict(controller=tn.StepTo(torch.cat([ts.new_zeros(1), ts]))))
        if per_sample:  # each row has its own steps: difference the first row on its grid
            theta = theta[:1]
            loss, grid = make(dict(controller=ctrl)), grid
    g = _grad(loss, theta)
    if steps == "fixed":
        torch.testing.assert_close(g, _central(grid, theta), rtol=1e-7, atol=1e-12)
    else:
        torch.testing.assert_close(g, _grad(grid, theta), rtol=1e-10, atol=0)
        # (before the carried Newton rate was floored, one stage on this grid stopped after one
        # iteration with an error 1e8 times its tolerance, and the loss was smooth only to ~5e-9)
        torch.testing.assert_close(g, _central(grid, theta), rtol=1e-7, atol=1e-12)


def test_graph_does_not_grow_with_newton_iterations():
    """The recorded graph holds one evaluation of f per stage, however many Newton iterations the
    stage took: a 1e-13 Newton tolerance takes more iterations than 1e-4 but records the same
    graph (nodes and saved tensors)."""

    def record(newton_rtol):
        s = tn.Kvaerno5(newton_rtol=newton_rtol, newton_atol=1e-15, max_iters=40)
        p = torch.tensor(_P, dtype=torch.float64, requires_grad=True)
        sol = tn.solve(tn.ODETerm(_stiff3), s, 0.0, 0.5, torch.tensor(_Y0, dtype=torch.float64), args=p, dt0=0.05)
        nodes, todo = set(), [sol.ys.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is not None and fn not in nodes:
                nodes.add(fn)
                todo.extend(f for f, _ in fn.next_functions)
        saved = sum(
            isinstance(getattr(fn, a, None), torch.Tensor) for fn in nodes for a in dir(fn) if a.startswith("_saved_")
        )
        return sol.stats["newton_iterations"], len(nodes), saved

    loose, tight = record(1e-4), record(1e-13)
    assert tight[0] > loose[0] * 1.3, (loose, tight)
    assert tight[1:] == loose[1:], (loose, tight)


def test_values_under_autograd_equal_no_grad():
    """The Newton iterations are the same with and without autograd: equal values and steps."""
    p = torch.tensor(_P, dtype=torch.float64)
    y0 = torch.tensor(_Y0, dtype=torch.float64)
    kw = dict(controller=tn.PIDController(rtol=1e-6, atol=1e-9))
    with torch.no_grad():
        ref = tn.solve(tn.ODETerm(_stiff3), tn.Kvaerno5(), 0.0, 1.0, y0, args=p, **kw)
    sol = tn.solve(tn.ODETerm(_stiff3), tn.Kvaerno5(), 0.0, 1.0, y0, args=p.clone().requires_grad_(True), **kw)
    assert sol.ys.requires_grad
    assert torch.equal(sol.ys.detach(), ref.ys)
    assert sol.stats["num_steps"] == ref.stats["num_steps"]


@pytest.mark.parametrize("solver", [tn.Kvaerno5, tn.KenCarp4], ids=lambda s: s.__name__)
def test_ift_checkpoint_equals_direct(solver):
    """CheckpointAdjoint replays the steps and differentiates them the same way: equal to
    DirectAdjoint (adaptive steps; Newton solved to roundoff, since the replay restarts the
    Newton state at each checkpoint and so iterates differently)."""

    def grad(adjoint):
        p = torch.tensor(_P, dtype=torch.float64, requires_grad=True)
        y0 = torch.tensor(_Y0, dtype=torch.float64)
        ctrl = tn.PIDController(rtol=1e-7, atol=1e-10)
        sol = tn.solve(tn.ODETerm(_stiff3), solver(**TIGHTER), 0.0, 1.0, y0, args=p, controller=ctrl, adjoint=adjoint)
        return torch.autograd.grad(sol.ys[-1][1], p)[0]

    torch.testing.assert_close(grad(tn.CheckpointAdjoint(checkpoints=3)), grad(tn.DirectAdjoint()), rtol=1e-10, atol=0)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_ift_gradient_time_dependent_parameters(per_sample):
    """Parameters reached through the stage time: a forcing ``a sin(w t)`` (gradients with
    respect to a and w pass through the recorded evaluation at each stage's time) and a rate
    ``q`` switched on only after t = 0.5 (no gradient is needed at the first stages, so the
    solver finds out from the first Newton evaluation of the stages after the switch)."""

    def f(t, y, th):
        a, w, q = th[..., 0:1], th[..., 1:2], th[..., 2:3]
        tt = torch.as_tensor(t, dtype=y.dtype)
        tt = tt.unsqueeze(-1) if tt.dim() else tt
        on = (tt > 0.5).to(y.dtype)
        return -50.0 * (y - a * torch.sin(w * tt)) - on * q * y**2

    y0 = torch.tensor([[0.2, -0.1]], dtype=torch.float64)

    def loss(th):
        args, y = (th, y0) if per_sample else (th[0], y0[0])
        sol = tn.solve(tn.ODETerm(f), tn.Kvaerno5(**TIGHTER), 0.0, 1.0, y, args=args, dt0=0.05, per_sample=per_sample)
        return (sol.ys[..., -1, :] * torch.tensor([1.0, 3.0], dtype=torch.float64)).sum(-1).reshape(-1)

    th = torch.tensor([[0.7, 3.0, 2.0]], dtype=torch.float64)
    g = _grad(loss, th)
    assert (g.abs() > 1e-4).all()
    torch.testing.assert_close(g, _central(loss, th), rtol=1e-7, atol=1e-12)


def test_ift_gradient_per_sample_with_a_failed_sample():
    """Per sample, a sample whose Newton solves fail (rejected, retried smaller) does not touch
    the other's gradient, and its own gradient is that of its lone solve."""

    def f(t, y, k):
        return -k.unsqueeze(-1) * y**3

    y0 = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    ctrl = tn.PIDController(rtol=1e-8, atol=1e-10)

    def grads(k, rows):
        k = k.clone().requires_grad_(True)
        s = tn.Kvaerno5(**TIGHT)
        sol = tn.solve(tn.ODETerm(f), s, 0.0, 2.0, y0[rows], args=k, dt0=1.0, controller=ctrl, per_sample=True)
        return torch.autograd.grad(sol.ys[:, -1].sum(), k)[0], sol, sol.stats

    k = torch.tensor([1000.0, 1.0], dtype=torch.float64)
    g, sol, stats = grads(k, slice(0, 2))
    assert (sol.result == 0).all() and stats["newton_failures"][0] > stats["newton_failures"][1]
    for i in range(2):
        gi, _, _ = grads(k[i : i + 1], slice(i, i + 1))
        torch.testing.assert_close(g[i : i + 1], gi, rtol=1e-10, atol=0)
        exact = -2.0 * (1 + 4 * k[i].item()) ** -1.5  # y(2) = (1 + 4 k)^-1/2
        assert g[i].item() == pytest.approx(exact, rel=1e-5)


def test_ift_second_derivative_raises():
    """The stage backward is not itself differentiable: create_graph=True raises a clear error
    instead of returning a second derivative that misses terms."""
    k = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(1, dtype=torch.float64)
    sol = tn.solve(tn.ODETerm(lambda t, y, k: -k * y**3), tn.Kvaerno3(), 0.0, 1.0, y0, args=k, dt0=0.1)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(sol.ys.sum(), k, create_graph=True)


# --- a user-given Jacobian (jac=...) ------------------------------------------------------


def rober_jac(t, y, k):
    """The analytic Jacobian of :func:`problems.rober` in the user's shapes, ``(..., 3, 3)``."""
    k1, k2, k3 = (0.04, 3e7, 1e4) if k is None else k
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    z = torch.zeros_like(y1)
    rows = [
        [z - k1, k3 * y3, k3 * y2],
        [z + k1, -k3 * y3 - 2 * k2 * y2, -k3 * y2],
        [z, 2 * k2 * y2, z],
    ]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def _forbid_autodiff_jacobians(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("jac=... given, but a Jacobian was computed by autodiff")

    for name in ("jacfwd", "jacrev", "vjp", "jvp", "vmap"):
        monkeypatch.setattr(torch.func, name, boom)
    monkeypatch.setattr(torch.autograd, "grad", boom)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("solver", [tn.Kvaerno5, tn.Rodas5P, tn.KenCarp4])
def test_user_jac_matches_auto(solver, per_sample, monkeypatch):
    """``jac=fn`` gives the solution of the automatic Jacobian (to rounding: the analytic
    Jacobian is autograd's bit for bit here), computes no Jacobian by autograd or torch.func, and
    saves the one evaluation per Jacobian the ESDIRK/IMEX solvers' ``"auto"`` mode spends (a
    Rosenbrock step still evaluates f once, with a forward-mode dual in t for df/dt). Shared mode
    with a (2, 3) state gets (2, 3, 3) blocks from ``jac``."""
    y0 = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.0, 0.1]], dtype=torch.float64)
    kw = dict(controller=tn.PIDController(rtol=1e-5, atol=1e-9), per_sample=per_sample)
    auto = tn.solve(tn.ODETerm(rober), solver(), 0.0, 10.0, y0, **kw)
    _forbid_autodiff_jacobians(monkeypatch)
    user = tn.solve(tn.ODETerm(rober), solver(jac=rober_jac), 0.0, 10.0, y0, **kw)
    assert torch.allclose(user.ys, auto.ys, rtol=1e-10, atol=1e-16)
    nj = user.stats["num_jacobians"]
    assert nj == auto.stats["num_jacobians"] and nj > 0
    saved = 0 if solver is tn.Rodas5P else nj
    assert torch.equal(torch.as_tensor(user.stats["nfe"]), torch.as_tensor(auto.stats["nfe"]) - saved)


def test_user_jac_backwards_in_time_and_args():
    """Integration from t0 > t1 (the flat field is -f(-t, y): its Jacobian -jac(-t, y)) and
    ``args`` reach ``jac``: a non-autonomous linear problem against its closed form."""

    def f(t, y, a):  # decays backwards in time
        return a * (1 + t) * y

    def jac(t, y, a):
        return (a * (1 + t)) * torch.eye(2, dtype=y.dtype).expand(*y.shape, 2)

    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    exact = y0 * math.exp(-5.0 * 1.5)  # y(0) = y(1) exp(a (t + t^2/2) |_1^0)
    for solver in (tn.Kvaerno5(jac=jac), tn.Rodas5P(jac=jac)):
        sol = tn.solve(
            tn.ODETerm(f), solver, 1.0, 0.0, y0, args=5.0, controller=tn.PIDController(rtol=1e-6, atol=1e-10)
        )
        assert torch.allclose(sol.ys[-1], exact, rtol=1e-4), (solver, sol.ys[-1], exact)


@pytest.mark.parametrize("solver", [tn.Kvaerno5, tn.Rodas5P])
def test_user_jac_gradients(solver):
    """Gradients with ``jac=`` equal the automatic Jacobian's (Kvaerno5: the implicit function
    theorem does not use the Newton Jacobian; Rodas5P: ``jac`` is differentiated, here in ``k``)."""

    def grad(jac):
        k = torch.tensor([0.04, 3e7, 1e4], dtype=torch.float64, requires_grad=True)
        sol = tn.solve(
            tn.ODETerm(rober), solver(jac=jac), 0.0, 1.0, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
            args=k, controller=tn.PIDController(rtol=1e-6, atol=1e-10),
        )  # fmt: skip
        return torch.autograd.grad(sol.ys[-1, 0], k)[0]

    torch.testing.assert_close(grad(rober_jac), grad(None), rtol=1e-8, atol=0)


def test_user_jac_errors():
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    ctrl = tn.PIDController(rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match=r"jac=\.\.\. returned shape \(3, 2\).*must be \(3, 3\)"):
        tn.solve(tn.ODETerm(rober), tn.Kvaerno5(jac=lambda t, y, a: y.new_zeros(3, 2)), 0.0, 1.0, y0, controller=ctrl)
    with pytest.raises(ValueError, match=r"per-sample state of shape \(2, 3\) it must be \(2, 3, 3\)"):
        tn.solve(
            tn.ODETerm(rober), tn.Rodas5P(jac=lambda t, y, a: y.new_zeros(2, 3, 2)), 0.0, 1.0,
            y0.expand(2, 3).clone(), per_sample=True, controller=ctrl,
        )  # fmt: skip
    with pytest.raises(TypeError, match="must be a callable"):
        tn.Kvaerno5(jac="analytic")
    with pytest.raises(TypeError, match="single-tensor state"):
        tn.solve(
            tn.ODETerm(lambda t, y, a: (-y[0], -y[1])), tn.Kvaerno5(jac=lambda t, y, a: None), 0.0, 1.0,
            (y0, y0), controller=ctrl,
        )  # fmt: skip


@pytest.mark.slow
def test_backsolve_adjoint_above_16_states():
    """BacksolveAdjoint with Kvaerno5 when the adjoint system (y, its adjoint and the parameters'
    gradients: 2 + 2 + 16 = 20 states) is above the 16 where ``jacobian="auto"`` switches to
    ``torch.func.jacfwd``, which cannot transform the adjoint field (it calls autograd): the
    solver falls back to ``"loop"`` instead of failing. (A few seconds: Backsolve is slow.)"""

    def f(t, y, w):
        rate = 50 * torch.nn.functional.softplus(w).mean()
        return torch.stack([-rate * (y[..., 0] - y[..., 1]), -y[..., 1]], -1)

    def grad(adjoint):
        w = torch.linspace(-1, 1, 16, dtype=torch.float64, requires_grad=True)
        sol = tn.solve(
            tn.ODETerm(f), tn.Kvaerno5(), 0.0, 0.1, torch.tensor([1.0, 0.5], dtype=torch.float64), args=w,
            controller=tn.PIDController(rtol=1e-6, atol=1e-8), adjoint=adjoint,
        )  # fmt: skip
        return torch.autograd.grad(sol.ys[-1].sum(), w)[0]

    torch.testing.assert_close(grad(tn.BacksolveAdjoint()), grad(tn.DirectAdjoint()), rtol=1e-4, atol=1e-10)
