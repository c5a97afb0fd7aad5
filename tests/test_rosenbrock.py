"""Rosenbrock solvers (Rosenbrock23, Rodas5P): order conditions, convergence, error-estimate and
dense-output orders, stiff reference problems, per-sample solves, failures as rejected steps,
non-autonomous problems, float32 and gradients."""

import math

import numpy as np
import pytest
import torch

import torchnde as tn
from _trees import density as _density
from _trees import rooted_trees as _trees
from problems import rober
from problems import rober_reference as _rober_ref
from torchnde._flat import _FlatTerm
from torchnde._tree import Flattener
from torchnde.solvers import ROSENBROCK_SOLVERS
from torchnde.solvers._implicit import NEWTON_DIVERGED, NEWTON_OK, NEWTON_SINGULAR
from torchnde.solvers.rodas5p import RODAS5P_TABLEAU
from torchnde.solvers.rosenbrock23 import _D

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
IDS = dict(ids=lambda s: s.__name__)


# --- order conditions ---------------------------------------------------------------------


def _row_method(tab):
    """Hairer & Wanner's (alpha, Gamma, b) of a tableau in the transformed form:
    Gamma^-1 = I / gamma - C, alpha = A Gamma, b = m Gamma (IV.7 (7.24)-(7.25))."""
    s = tab.num_stages
    A, C = np.zeros((s, s)), np.zeros((s, s))
    for i in range(s):
        A[i, :i], C[i, :i] = tab.a[i], tab.C[i]
    G = np.linalg.inv(np.eye(s) / tab.gamma - C)
    return A @ G, G, np.array(tab.m) @ G, np.array(tab.m_hat) @ G


def _residual(alpha, G, b, order):
    """Largest residual of the Rosenbrock order conditions up to ``order``: elementary weights
    with alpha + Gamma on the edges below a vertex with one child (the Jacobian terms) and alpha
    below a vertex with several (Hairer & Wanner IV.7, Table 7.1)."""
    beta = alpha + G

    def phi(t):
        if not t:
            return np.ones(len(b))
        if len(t) == 1:
            return beta @ phi(t[0])
        return math.prod(alpha @ phi(c) for c in t)

    return max(abs(b @ phi(t) - 1 / _density(t)) for ts in _trees(order).values() for t in ts)


def test_rodas5p_order_conditions():
    """Steinebach's coefficients: order 5 (not 6), the embedded solution order 4 (not 5), nodes
    and time coefficients consistent with Gamma, stiffly accurate, L-stable."""
    tab = RODAS5P_TABLEAU
    alpha, G, b, bh = _row_method(tab)
    np.testing.assert_allclose(alpha.sum(1), tab.c, atol=1e-13)
    np.testing.assert_allclose(G.sum(1), tab.d, atol=1e-13)  # d_i = gamma_i = sum_j gamma_ij
    assert _residual(alpha, G, b, 5) < 1e-12
    assert _residual(alpha, G, b, 6) > 1e-4
    assert _residual(alpha, G, bh, 4) < 1e-12
    assert _residual(alpha, G, bh, 5) > 1e-4
    # on linear problems (only the tall trees beta^k 1 matter) the order is 6: R(z) = e^z + O(z^7)
    beta = alpha + G
    tall = [b @ np.linalg.matrix_power(beta, k - 1) @ np.ones(len(b)) - 1 / math.factorial(k) for k in (6, 7)]
    assert abs(tall[0]) < 1e-13 and abs(tall[1]) > 1e-6
    # stiffly accurate: the solution is the argument of the last stage plus the last stage
    assert tab.m[:-1] == tab.a[-1] and tab.m[-1] == 1.0
    # R(z) = 1 + z b (I - z B)^-1 1 -> 0 as z -> -inf
    one = np.ones(len(b))
    for z in (-1e6, -1e9):  # R(z) = O(1/z)
        assert abs(1 + z * b @ np.linalg.solve(np.eye(len(b)) - z * beta, one)) < 100 / abs(z)


def test_rosenbrock23_conditions():
    """ode23s as a two-stage W-method (k2's equation is (I - hdJ) k2 = F1 - hdJ k1): order 2 for
    the exact Jacobian and (b alpha 1 = 1/2, b Gamma = b diag) for any matrix; L-stable."""
    alpha = np.array([[0.0, 0.0], [0.5, 0.0]])
    G = np.array([[_D, 0.0], [-_D, _D]])
    b = np.array([0.0, 1.0])
    assert _residual(alpha, G, b, 2) < 1e-15
    assert _residual(alpha, G, b, 3) > 1e-3
    # W-method: the J and W parts of b beta 1 = 1/2 separately (b alpha 1 = 1/2, b Gamma 1 = 0)
    assert abs(b @ alpha.sum(1) - 0.5) < 1e-15 and abs(b @ G.sum(1)) < 1e-15
    for z in (-1e6, -1e9):
        assert abs(1 + z * b @ np.linalg.solve(np.eye(2) - z * (alpha + G), np.ones(2))) < 1e-5


# --- convergence on non-stiff problems with closed forms ----------------------------------

A_LIN = torch.tensor([[-0.3, 1.2, 0.1], [-1.0, -0.2, 0.4], [0.2, -0.5, -0.4]], dtype=F64)


def _problems():
    y0 = torch.tensor([1.0, -0.5, 0.25], dtype=F64)
    return {
        "linear": (lambda t, y, a: A_LIN @ y, y0, lambda t: torch.linalg.matrix_exp(A_LIN * t) @ y0, 2.0),
        # non-autonomous: the d_i h df/dt terms
        "time": (
            lambda t, y, a: torch.cos(t) * y,
            torch.tensor([1.0], dtype=F64),
            lambda t: torch.tensor([math.exp(math.sin(t))], dtype=F64),
            3.0,
        ),
        "logistic": (
            lambda t, y, a: y * (1 - y),
            torch.tensor([0.1], dtype=F64),
            lambda t: torch.tensor([1 / (1 + 9 * math.exp(-t))], dtype=F64),
            3.0,
        ),
    }


@pytest.mark.parametrize("problem", ["linear", "time", "logistic"])
@pytest.mark.parametrize("solver", ROSENBROCK_SOLVERS, **IDS)
def test_global_order(solver, problem):
    """Constant steps, float64: the slope of log error vs log h within 0.3 of the order (Rodas5P
    on the linear problem: 6, see test_rodas5p_order_conditions)."""
    f, y0, exact, T = _problems()[problem]
    ns = [10, 20, 40, 80] if solver.order == 2 else [8, 12, 16, 24]
    hs, errs = [], []
    for n in ns:
        sol = tn.solve(tn.ODETerm(f), solver(), 0.0, T, y0, dt0=T / n)
        assert sol.stats["num_steps"] == n
        hs.append(T / n)
        errs.append((sol.ys[-1] - exact(T)).abs().max().item())
    assert min(errs) > 1e-13, errs
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    order = 6 if (solver is tn.Rodas5P and problem == "linear") else solver.order
    assert abs(slope - order) <= 0.3, (slope, errs)


def _one_step(solver, f, y0, t0, h, **kw):
    s = solver(**kw)
    ft = _FlatTerm(tn.ODETerm(f), Flattener(y0, batch=False), None, 1.0, False)
    y1, y_err, dinfo, _, code = s.step(ft, t0, t0 + h, y0, s.init(ft, t0, y0))
    assert int(code) == NEWTON_OK
    return y1, y_err, s.dense_coeffs(ft, dinfo)


@pytest.mark.parametrize("problem", ["time", "logistic"])
@pytest.mark.parametrize("solver", ROSENBROCK_SOLVERS, **IDS)
def test_error_estimate_and_dense_order(solver, problem):
    """One step from the exact solution at t0 = 0.3: the embedded estimate shrinks like
    h^(error_order + 1) and the dense output's error inside the step like h^(dense_order + 1)."""
    f, _, exact, _ = _problems()[problem]
    t0, theta = 0.3, 0.37
    hs = [0.2 * 2.0**-k for k in range(4)]
    est, dense = [], []
    for h in hs:
        y0 = exact(t0)
        _, y_err, C = _one_step(solver, f, y0, t0, h)
        est.append(y_err.abs().max().item())
        y_mid = y0 + sum(C[p] * theta ** (p + 1) for p in range(C.shape[0]))
        dense.append((y_mid - exact(t0 + theta * h)).abs().max().item())
    s_est = np.polyfit(np.log(hs), np.log(est), 1)[0]
    s_dense = np.polyfit(np.log(hs), np.log(dense), 1)[0]
    assert abs(s_est - (solver.error_order + 1)) <= 0.3, est
    assert abs(s_dense - (solver.dense_order + 1)) <= 0.3, dense


@pytest.mark.parametrize("solver", ROSENBROCK_SOLVERS, **IDS)
def test_dense_output_adaptive(solver):
    """Dense output of an adaptive solve matches the solution inside the steps."""
    f, y0, exact, T = _problems()["linear"]
    sol = tn.solve(
        tn.ODETerm(f),
        solver(),
        0.0,
        T,
        y0,
        controller=tn.PIDController(rtol=1e-7, atol=1e-9),
        saveat=tn.SaveAt(dense=True),
    )
    tol = 1e-4 if solver.order == 2 else 1e-6
    for t in (0.37, 1.111, 1.9):
        torch.testing.assert_close(sol.evaluate(t), exact(t), atol=tol, rtol=0)


# --- non-autonomous: df/dt by AD and by finite differences ---------------------------------


def _prothero(t, y, k):
    """y' = -k (y - cos t) - sin t: y = cos t from y(0) = 1 for every k (stiff for large k)."""
    return -k * (y - torch.cos(t)) - torch.sin(t)


@pytest.mark.parametrize("solver", ROSENBROCK_SOLVERS, **IDS)
def test_non_autonomous_stiff(solver):
    """The Prothero--Robinson problem (k = 1e4; rtol 1e-6, Rosenbrock23 1e-4): stays on y = cos t;
    the time derivative by AD,
    by finite differences, and for a term that takes time as a float (finite differences)."""
    y0 = torch.tensor([1.0], dtype=F64)
    loose = solver.order == 2  # a method for loose tolerances
    ctrl = tn.PIDController(rtol=1e-4, atol=1e-6) if loose else tn.PIDController(rtol=1e-6, atol=1e-8)
    outs = []
    for kw, term in (
        ({}, tn.ODETerm(_prothero)),
        ({"time_derivative": "fd"}, tn.ODETerm(_prothero)),
        ({}, tn.ODETerm(lambda t, y, k: -k * (y - math.cos(t)) - math.sin(t), time_as_float=True)),
    ):
        sol = tn.solve(term, solver(**kw), 0.0, 2.0, y0, args=1e4, controller=ctrl)
        assert abs(sol.ys[-1].item() - math.cos(2.0)) < (1e-4 if loose else 1e-5)
        outs.append(sol.stats["num_steps"])
    assert max(outs) < 200, outs


def test_time_derivative_matters():
    """Without the df/dt term (a vector field hiding t from AD) Rodas5P loses its order on the
    non-autonomous problem: the AD time derivative is really used."""
    f, y0, exact, T = _problems()["time"]
    errs = {}
    for name, term in (
        ("ad", tn.ODETerm(f)),
        ("hidden", tn.ODETerm(lambda t, y, a: math.cos(float(t)) * y)),
        ("fd", tn.ODETerm(lambda t, y, a: math.cos(float(t)) * y)),
    ):
        kw = {"time_derivative": "fd"} if name == "fd" else {}
        sol = tn.solve(term, tn.Rodas5P(**kw), 0.0, T, y0, dt0=T / 16)
        errs[name] = (sol.ys[-1] - exact(T)).abs().item()
    assert errs["hidden"] > 20 * errs["ad"], errs
    assert errs["fd"] < 2 * errs["ad"], errs


# --- stiff reference problems -------------------------------------------------------------


@pytest.mark.parametrize(
    "solver, max_steps",
    [(tn.Rodas5P, 100), pytest.param(tn.Rosenbrock23, 800, marks=pytest.mark.slow)],
    ids=["Rodas5P", "Rosenbrock23"],
)
def test_robertson(solver, max_steps):
    """Robertson's kinetics to t = 1e3, rtol = 1e-6, atol = 1e-10, float64, against SciPy Radau at
    rtol = 1e-10 (each component within 1e-4 relative).

    Measured here: Rodas5P 62 steps / 498 evaluations (5 rejected), Rosenbrock23 529 / 1589,
    Kvaerno5 43 / 716; Tsit5 stops at max_steps (test_stiff.py)."""
    pytest.importorskip("scipy")
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    sol = tn.solve(tn.ODETerm(rober), solver(), 0.0, 1e3, y0, controller=tn.PIDController(rtol=1e-6, atol=1e-10))
    ref = _rober_ref(1e3)
    rel = np.abs(sol.ys[-1].numpy() - ref) / np.abs(ref)
    assert rel.max() < 1e-4, rel
    assert sol.stats["num_steps"] < max_steps


def vdp(t, y, mu):
    y1, y2 = y[..., 0], y[..., 1]
    return torch.stack([y2, mu * ((1 - y1**2) * y2 - y1)], -1)


@pytest.mark.slow
def test_van_der_pol_stiff():
    """Van der Pol, mu = 1000 (x' = y, y' = mu ((1 - x^2) y - x): period about 1.67, two jumps of
    width ~1/mu per period) over [0, 2], rtol = 1e-6: Rodas5P against SciPy Radau at rtol = 1e-12.
    Measured: Rodas5P 354 accepted steps (25 rejected), Kvaerno5 223 (59), Rosenbrock23 2338;
    SciPy Radau at rtol = 1e-6 529 steps, 4305 evaluations."""
    pytest.importorskip("scipy")
    from scipy.integrate import solve_ivp

    mu, T = 1000.0, 2.0
    ref = solve_ivp(
        lambda t, y: [y[1], mu * ((1 - y[0] ** 2) * y[1] - y[0])],
        (0, T),
        [2.0, 0.0],
        method="Radau",
        rtol=1e-12,
        atol=1e-12,
    ).y[:, -1]
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    sol = tn.solve(
        tn.ODETerm(vdp), tn.Rodas5P(), 0.0, T, y0, args=mu, controller=tn.PIDController(rtol=1e-6, atol=1e-6)
    )
    np.testing.assert_allclose(sol.ys[-1].numpy(), ref, rtol=1e-4, atol=1e-5)
    assert sol.stats["num_accepted"] < 500


# --- per-sample ---------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ROSENBROCK_SOLVERS, **IDS)
def test_per_sample_matches_alone(solver):
    """Van der Pol with mu = 1, 30, 1000 per sample: each sample equals its own solve (its own
    Jacobian, LU and steps)."""
    mu = torch.tensor([1.0, 30.0, 1000.0], dtype=F64)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [2.0, -0.6]], dtype=F64)
    kw = dict(controller=tn.PIDController(rtol=1e-3, atol=1e-5), saveat=tn.SaveAt(ts=[0.25, 0.5]), per_sample=True)
    both = tn.solve(tn.ODETerm(vdp), solver(), 0.0, 0.5, y0, args=mu, **kw)
    assert (both.result == 0).all()
    for i in range(3):
        alone = tn.solve(tn.ODETerm(vdp), solver(), 0.0, 0.5, y0[i : i + 1], args=mu[i : i + 1], **kw)
        torch.testing.assert_close(both.ys[i], alone.ys[0], atol=1e-12, rtol=0)
        assert both.stats["num_steps"][i] == alone.stats["num_steps"][0]
    assert both.stats["num_steps"][2] > both.stats["num_steps"][0]


@pytest.mark.slow
def test_jacobian_modes_agree():
    """Reverse- and forward-mode Jacobians give the same solution."""
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=F64)
    mu = torch.tensor([5.0, 50.0], dtype=F64)
    kw = dict(args=mu, controller=tn.PIDController(rtol=1e-4, atol=1e-6), per_sample=True)
    a = tn.solve(tn.ODETerm(vdp), tn.Rodas5P(), 0.0, 0.2, y0, **kw)
    b = tn.solve(tn.ODETerm(vdp), tn.Rodas5P(jacobian="fwd"), 0.0, 0.2, y0, **kw)
    torch.testing.assert_close(a.ys, b.ys, atol=1e-12, rtol=0)


# --- failures are rejected steps ----------------------------------------------------------


def test_singular_matrix_is_a_rejected_step():
    """Rosenbrock23 on y' = y with h = 1/d: I - h d J = 0. That sample's step reports
    NEWTON_SINGULAR with y1 = y0 and a large finite error; the other sample is unaffected; a solve
    from that step size shrinks it and succeeds."""
    y0 = torch.tensor([[1.0], [1.0]], dtype=F64)
    term = tn.ODETerm(lambda t, y, a: y)
    s = tn.Rosenbrock23()
    ft = _FlatTerm(term, Flattener(y0, batch=True), None, 1.0, True)
    t0 = torch.zeros(2, dtype=F64)
    t1 = torch.tensor([1 / _D, 0.1], dtype=F64)
    y1, y_err, _, _, code = s.step(ft, t0, t1, y0, s.init(ft, t0, y0))
    assert code.tolist() == [NEWTON_SINGULAR, NEWTON_OK]
    assert y1[0].item() == 1.0 and abs(y1[1].item() - math.exp(0.1)) < 1e-3
    assert torch.isfinite(y_err).all() and y_err[0].item() > 1e3 and y_err[1].abs().item() < 1e-3
    sol = tn.solve(
        term, tn.Rosenbrock23(), 0.0, 1 / _D, y0[0], dt0=1 / _D, controller=tn.PIDController(rtol=1e-3, atol=1e-6)
    )
    assert sol.result == tn.Result.successful and sol.stats["num_rejected"] >= 1
    assert abs(sol.ys[-1].item() - math.exp(1 / _D)) < 0.05 * math.exp(1 / _D)


@pytest.mark.parametrize("solver", ROSENBROCK_SOLVERS, **IDS)
def test_nan_stage_is_a_rejected_step(solver):
    """A vector field that is NaN beyond y = 2 (a step far too large evaluates a stage there):
    the step is rejected with NEWTON_DIVERGED (finite error), and the solve shrinks it and
    reaches y(0.5) = e^0.5."""

    def f(t, y, a):
        return torch.where(y < 2, y, torch.nan)

    y0 = torch.tensor([1.0], dtype=F64)
    s = solver()
    ft = _FlatTerm(tn.ODETerm(f), Flattener(y0, batch=False), None, 1.0, False)
    y1, y_err, _, _, code = s.step(ft, 0.0, 3.0, y0, s.init(ft, 0.0, y0))
    assert int(code) == NEWTON_DIVERGED and torch.equal(y1, y0) and torch.isfinite(y_err).all()
    sol = tn.solve(tn.ODETerm(f), solver(), 0.0, 0.5, y0, dt0=3.0, controller=tn.PIDController(rtol=1e-6, atol=1e-9))
    assert sol.result == tn.Result.successful and sol.stats["num_rejected_nonfinite"] == 0
    assert abs(sol.ys[-1].item() - math.exp(0.5)) < 1e-4


# --- float32 ------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ROSENBROCK_SOLVERS, **IDS)
def test_float32_robertson(solver):
    """float32 state (and time): Robertson to t = 40 at rtol = 1e-4, within 1e-3 relative of
    the float64 reference."""
    pytest.importorskip("scipy")
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float32)
    sol = tn.solve(tn.ODETerm(rober), solver(), 0.0, 40.0, y0, controller=tn.PIDController(rtol=1e-4, atol=1e-8))
    assert sol.ys.dtype == torch.float32
    ref = _rober_ref(40.0)
    rel = np.abs(sol.ys[-1].double().numpy() - ref) / np.abs(ref)
    assert rel.max() < 1e-3, rel


# --- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ROSENBROCK_SOLVERS, **IDS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_gradient_matches_finite_differences(solver, per_sample):
    """DirectAdjoint through the Rosenbrock steps (the Jacobian and df/dt inside the graph: the
    solution depends on them) of the stiff linear y' = -k (y - cos t), k = 500, h k = 25 (constant
    steps), against central differences in float64."""

    def loss(k):
        y0 = torch.tensor([[0.0], [0.5]] if per_sample else [0.0, 0.5], dtype=F64)
        kk = k.expand(2, 1) if per_sample else k
        sol = tn.solve(
            tn.ODETerm(lambda t, y, k: -k * (y - torch.cos(t).unsqueeze(-1) if per_sample else y - torch.cos(t))),
            solver(),
            0.0,
            1.0,
            y0,
            args=kk,
            dt0=0.05,
            per_sample=per_sample,
        )
        return (sol.ys[..., -1, :] ** 2).sum() if per_sample else (sol.ys[-1] ** 2).sum()

    k = torch.tensor(500.0, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(loss(k), k)
    d = 1e-3
    with torch.no_grad():
        fd = (loss(k + d) - loss(k - d)) / (2 * d)
    assert g.item() == pytest.approx(fd.item(), rel=1e-6)


def test_gradient_wrt_initial_state_and_no_spurious_graph():
    """Gradients reach y0 through the stages and the Jacobian at y0 (Robertson-like nonlinear
    problem, against central differences); a solve with nothing requiring grad returns tensors
    without autograd history."""

    def loss(y0):
        sol = tn.solve(tn.ODETerm(lambda t, y, a: -50 * y**3 + torch.sin(t)), tn.Rodas5P(), 0.0, 0.5, y0, dt0=0.05)
        return sol.ys[-1].sum()

    y0 = torch.tensor([1.0, 0.3], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(loss(y0), y0)
    with torch.no_grad():
        for i in range(2):
            e = torch.zeros(2, dtype=F64)
            e[i] = 1e-5
            fd = (loss(y0 + e) - loss(y0 - e)) / 2e-5
            assert g[i].item() == pytest.approx(fd.item(), rel=1e-6)
    out = tn.solve(
        tn.ODETerm(rober),
        tn.Rodas5P(),
        0.0,
        1.0,
        torch.tensor([1.0, 0.0, 0.0], dtype=F64),
        controller=tn.PIDController(rtol=1e-4, atol=1e-8),
    )
    assert not out.ys.requires_grad


@pytest.mark.parametrize("solver", ROSENBROCK_SOLVERS, **IDS)
def test_checkpoint_adjoint_matches_direct(solver):
    """CheckpointAdjoint recomputes the steps under autograd (the Jacobian then enters the graph
    again) and gives DirectAdjoint's gradient."""

    def grad(adjoint):
        k = torch.tensor(500.0, dtype=F64, requires_grad=True)
        sol = tn.solve(
            tn.ODETerm(lambda t, y, k: -k * (y - torch.cos(t))),
            solver(),
            0.0,
            1.0,
            torch.tensor([0.0, 0.5], dtype=F64),
            args=k,
            dt0=0.05,
            adjoint=adjoint,
        )
        return torch.autograd.grad((sol.ys[-1] ** 2).sum(), k)[0]

    torch.testing.assert_close(grad(tn.CheckpointAdjoint()), grad(tn.DirectAdjoint()), rtol=1e-10, atol=0)


def test_options_validated():
    assert tn.Rodas5P() == tn.Rodas5P() and tn.Rodas5P() != tn.Rodas5P(jacobian="fwd")
    assert repr(tn.Rosenbrock23(time_derivative="fd")) == "Rosenbrock23(time_derivative='fd')"
    with pytest.raises(ValueError, match="jacobian"):
        tn.Rodas5P(jacobian="auto")
    with pytest.raises(ValueError, match="time_derivative"):
        tn.Rosenbrock23(time_derivative="exact")
