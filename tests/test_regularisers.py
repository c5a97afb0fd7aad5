"""torchnde.regularisers: local error/stiffness estimates, their stochastic-time sampling, the
augmented-state comparators (kinetic, Jacobian Frobenius, TayNODE K=2) and STEER end times."""

import math

import pytest
import torch

import torchnde as tn
from torchnde import regularisers as R

pytestmark = pytest.mark.usefixtures("one_thread")

f64 = torch.float64


def _mlp_field(t, y, args):
    W, b = args
    s = torch.sin(t).unsqueeze(-1) if t.dim() else torch.sin(t)  # per sample: t is (batch,)
    return torch.tanh(y @ W.T + b) * (1 + 0.5 * s) - 0.3 * y


def _params(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=f64)
    b = torch.randn(n, generator=g, dtype=f64)
    return W, b


def _mlp_problem():
    """The test problem most tests here solve: the term of ``_mlp_field``, its ``(W, b)`` and a
    3-vector ``y0``."""
    W, b = _params()
    return tn.ODETerm(_mlp_field), W, b, torch.tensor([0.3, -0.5, 0.8], dtype=f64)


# ----------------------------------------------------------------------------------------------
# local_error


@pytest.mark.parametrize("solver", [tn.Dopri5(), tn.Tsit5()])
def test_local_error_gradient_matches_finite_differences(solver):
    term = tn.ODETerm(_mlp_field)
    W, b = _params()
    y = torch.tensor([0.3, -0.5, 0.8], dtype=f64)

    def err(y, W, b):
        return R.local_error(term, solver, 0.2, y, 0.15, (W, b)).error

    def rho(y, W, b):  # a quotient of stage differences: finite differences lose more digits
        return R.local_error(term, solver, 0.2, y, 0.15, (W, b), stiffness=True).stiffness

    inputs = tuple(x.clone().requires_grad_() for x in (y, W, b))
    assert torch.autograd.gradcheck(err, inputs, eps=1e-6, atol=1e-8, rtol=1e-5)
    assert torch.autograd.gradcheck(rho, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_local_error_gradient_per_sample_and_scaled():
    term = tn.ODETerm(_mlp_field)
    W, b = _params()
    y = torch.tensor([[0.3, -0.5, 0.8], [1.0, 0.2, -0.4]], dtype=f64)
    t = torch.tensor([0.1, 0.6], dtype=f64)
    h = torch.tensor([0.2, 0.05], dtype=f64)

    def err(y, W):
        # (the controller's scale is held fixed; with atol dominating it is a constant)
        return R.local_error(term, tn.Bosh3(), t, y, h, (W, b), per_sample=True, rtol=1e-12, atol=1e-3).error

    assert torch.autograd.gradcheck(err, (y.clone().requires_grad_(), W.clone().requires_grad_()), eps=1e-6, atol=1e-7)


def test_local_error_is_the_embedded_estimate():
    """Dopri5's estimate is the difference of its 5th- and 4th-order solutions: O(h^5)."""
    term = tn.ODETerm(_mlp_field)
    W, b = _params()
    y = torch.tensor([0.3, -0.5, 0.8], dtype=f64)
    e1 = R.local_error(term, tn.Dopri5(), 0.2, y, 0.04, (W, b)).error
    e2 = R.local_error(term, tn.Dopri5(), 0.2, y, 0.02, (W, b)).error
    assert 25 < float(e1 / e2) < 40  # 2^5 = 32
    # backwards in time: the estimate of a step of -h
    eb = R.local_error(term, tn.Dopri5(), 0.2, y, -0.04, (W, b)).error
    assert torch.isfinite(eb) and eb > 0


@pytest.mark.parametrize("solver", [tn.Dopri5(), tn.Tsit5()])
def test_stiffness_estimate_is_exact_on_linear_problems(solver):
    lam = torch.tensor([-3.0, -50.0, 7.0], dtype=f64)
    term = tn.ODETerm(lambda t, y, a: y * a.unsqueeze(-1))
    y = torch.tensor([[1.0], [2.0], [-0.5]], dtype=f64)
    est = R.local_error(term, solver, 0.0, y, 0.01, lam, per_sample=True, stiffness=True)
    torch.testing.assert_close(est.stiffness, lam.abs())
    assert est.error.shape == (3,)
    assert R.stiffness_pair(tn.Dopri5()) == (5, 6)
    assert R.stiffness_pair(tn.Bosh3()) is None


def test_local_error_other_solvers_and_trees():
    term = tn.ODETerm(lambda t, y, a: {"u": -y["v"], "v": y["u"] - 0.1 * y["v"]})
    y = {"u": torch.tensor([1.0], dtype=f64), "v": torch.tensor([0.5], dtype=f64)}
    for solver in (tn.Kvaerno5(), tn.Rodas5P(), tn.Heun()):
        est = R.local_error(term, solver, 0.0, y, 0.1)
        assert est.error.dim() == 0 and torch.isfinite(est.error) and est.error > 0


# ----------------------------------------------------------------------------------------------
# the local regulariser is an unbiased estimate of the integral of the per-time quantity


@pytest.mark.parametrize("h", [0.1, None])
def test_local_regulariser_expectation_equals_integral(h):
    term = tn.ODETerm(_mlp_field)
    W, b = _params()
    B = 400
    y0 = torch.tensor([0.3, -0.5, 0.8], dtype=f64).expand(B, 3).clone()
    ctrl = tn.PIDController(rtol=1e-5, atol=1e-7)
    sol = tn.solve(term, tn.Dopri5(), 0.0, 2.0, y0, args=(W, b), controller=ctrl, saveat=tn.SaveAt(dense=True),
                   per_sample=True)  # fmt: skip
    est = R.sample_local_regulariser(sol, term, tn.Dopri5(), args=(W, b), h=h, seed=1, stiffness=True)
    assert est.error.shape == (B,) and est.t.shape == (B, 1)
    # the per-time quantity on a fine grid (the same rule for h), integrated by the trapezoid rule
    grid = torch.linspace(0.0, 2.0, B, dtype=f64)
    yg = sol.evaluate(grid)
    hg = (
        torch.full_like(grid, h)
        if h is not None
        else R._local._accepted_step(sol.interpolation, grid.unsqueeze(-1))[:, 0]
    )
    q = R.local_error(term, tn.Dopri5(), grid, yg, hg, (W, b), per_sample=True, stiffness=True)
    for got, qq in ((est.error, q.error), (est.stiffness, q.stiffness)):
        integral = torch.trapezoid(qq, grid)
        mean, se = got.mean(), got.std() / math.sqrt(B)
        assert abs(float(mean - integral)) < 4 * float(se) + 1e-3 * float(integral), (mean, integral, se)


def test_local_regulariser_shared_mode_and_gradient():
    term, W, b, y0 = _mlp_problem()
    W = W.requires_grad_()
    sol = tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, args=(W, b), controller=tn.PIDController(rtol=1e-4, atol=1e-6),
                   saveat=tn.SaveAt(dense=True))  # fmt: skip
    est = R.sample_local_regulariser(sol, term, tn.Tsit5(), args=(W, b), num_times=3, seed=0)
    assert est.error.dim() == 0 and est.t.shape == (3,)
    again = R.sample_local_regulariser(sol, term, tn.Tsit5(), args=(W, b), num_times=3, seed=0)
    torch.testing.assert_close(est.error, again.error)
    (g,) = torch.autograd.grad(est.error, W)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize(
    "adjoint", [tn.DirectAdjoint(), tn.BacksolveAdjoint(), tn.CheckpointAdjoint(), tn.ReversibleAdjoint()]
)
def test_split_solve_works_with_every_adjoint(adjoint):
    term, W, b, y0 = _mlp_problem()
    ctrl = tn.PIDController(rtol=1e-8, atol=1e-10)
    Wd = W.clone().requires_grad_()
    sol, est = R.solve_with_local_regulariser(
        term, tn.Dopri5(), 0.0, 1.0, y0, args=(Wd, b), controller=ctrl, adjoint=adjoint, seed=3, stiffness=True
    )
    plain = tn.solve(term, tn.Dopri5(), 0.0, 1.0, y0, args=(W, b), controller=ctrl)
    torch.testing.assert_close(sol.ys, plain.ys, rtol=1e-6, atol=1e-7)
    assert 0.0 < est.t < 1.0 and est.h > 0 and est.stiffness is not None
    loss = sol.ys.sum() + est.error
    (g,) = torch.autograd.grad(loss, Wd)
    # against the same split solved with DirectAdjoint
    Wr = W.clone().requires_grad_()
    ref, ref_est = R.solve_with_local_regulariser(
        term, tn.Dopri5(), 0.0, 1.0, y0, args=(Wr, b), controller=ctrl, seed=3
    )
    (gr,) = torch.autograd.grad(ref.ys.sum() + ref_est.error, Wr)
    torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("t1", [1.0, -1.0])
def test_local_regulariser_h_first_reuses_the_second_solves_first_step(t1):
    """h='first': under DirectAdjoint the local step is the second solve's first step (recorded, no
    extra evaluations); it equals local_error at (t_r, y(t_r)) with that step, which
    CheckpointAdjoint computes separately -- value, step, stiffness and gradient."""
    term, W, b, y0 = _mlp_problem()
    ctrl = tn.PIDController(rtol=1e-6, atol=1e-8)
    out = []
    for adjoint in (tn.DirectAdjoint(), tn.CheckpointAdjoint()):
        Wg = W.clone().requires_grad_()
        sol, est = R.solve_with_local_regulariser(term, tn.Dopri5(), 0.0, t1, y0, args=(Wg, b), controller=ctrl,
                                                  adjoint=adjoint, seed=1, h="first", stiffness=True, rtol=1e-6,
                                                  atol=1e-8)  # fmt: skip
        assert est.h * t1 > 0 and est.error > 0
        (g,) = torch.autograd.grad(sol.ys.sum() + est.error + est.stiffness, Wg)
        out.append((est.error, est.stiffness, torch.as_tensor(est.h, dtype=f64), g, sol.ys))
    for x, y in zip(*out):
        torch.testing.assert_close(x, y)


# ----------------------------------------------------------------------------------------------
# the comparators, against closed forms on y' = A y


A = torch.tensor([[-1.0, 2.0], [-0.5, -0.3]], dtype=f64)


def _linear(t, y, args):
    return y @ A.T


def test_augmented_integrals_match_closed_forms():
    y0 = torch.tensor([1.0, 2.0], dtype=f64)
    reg = R.RegularisedTerm(tn.ODETerm(_linear), kinetic=True, jacobian_frobenius=True, taylor2=True, probe="exact")
    sol = tn.solve(reg.term, tn.Dopri5(), 0.0, 1.0, reg.init(y0), controller=tn.PIDController(rtol=1e-8, atol=1e-10))
    y, r = reg.split(sol.ys)
    ts = torch.linspace(0.0, 1.0, 4001, dtype=f64)
    Y = torch.linalg.matrix_exp(A * ts[:, None, None]) @ y0
    torch.testing.assert_close(y[-1], Y[-1], rtol=1e-6, atol=1e-8)
    kin = torch.trapezoid(((Y @ A.T) ** 2).sum(-1), ts)
    tay = torch.trapezoid(((Y @ (A @ A).T) ** 2).sum(-1), ts)
    torch.testing.assert_close(r["kinetic"][-1], kin, rtol=1e-6, atol=0)
    torch.testing.assert_close(r["taylor2"][-1], tay, rtol=1e-6, atol=0)
    torch.testing.assert_close(r["jacobian_frobenius"][-1], (A**2).sum(), rtol=1e-9, atol=0)


def test_hutchinson_frobenius_is_unbiased_and_batched():
    B = 4000
    y = torch.randn(B, 2, dtype=f64)
    probe = R.probe_like(y, "rademacher", seed=0)
    reg = R.RegularisedTerm(tn.ODETerm(_linear), jacobian_frobenius=True, probe=probe, batch=True)
    f, regs = reg.term.vector_field(torch.tensor(0.0, dtype=f64), reg.init(y), None)
    q = regs["jacobian_frobenius"]
    assert q.shape == (B,)
    torch.testing.assert_close(q, ((probe @ A) ** 2).sum(-1))
    assert abs(float(q.mean() - (A**2).sum())) < 4 * float(q.std()) / math.sqrt(B)
    g = R.probe_like(y, "gaussian", seed=1)
    assert g.shape == y.shape and abs(float(g.var()) - 1) < 0.1


def test_taylor2_includes_the_time_derivative():
    # y' = sin(t) y  =>  y'' = (cos t + sin^2 t) y
    reg = R.RegularisedTerm(tn.ODETerm(lambda t, y, a: torch.sin(t) * y), taylor2=True, kinetic=True)
    t = torch.tensor(0.7, dtype=f64)
    y = torch.tensor([1.5, -2.0], dtype=f64)
    _, regs = reg.term.vector_field(t, reg.init(y), None)
    ydd = (torch.cos(t) + torch.sin(t) ** 2) * y
    torch.testing.assert_close(regs["taylor2"], (ydd**2).sum())
    torch.testing.assert_close(regs["kinetic"], ((torch.sin(t) * y) ** 2).sum())


def test_augmented_gradients_backsolve_agrees_with_direct():
    W, b = _params(2)
    y0 = torch.tensor([[0.3, -0.5], [0.1, 0.9]], dtype=f64)
    probe = R.probe_like(y0, seed=0)
    grads = []
    for adjoint in (tn.DirectAdjoint(), tn.BacksolveAdjoint()):
        Wg = W.clone().requires_grad_()
        reg = R.RegularisedTerm(tn.ODETerm(_mlp_field), kinetic=True, jacobian_frobenius=True, taylor2=True,
                                probe=probe)  # fmt: skip
        sol = tn.solve(reg.term, tn.Dopri5(), 0.0, 0.3, reg.init(y0), args=(Wg, b), adjoint=adjoint,
                       controller=tn.PIDController(rtol=1e-6, atol=1e-8))  # fmt: skip
        y, r = reg.split(sol.ys)
        loss = y.sum() + r["kinetic"].sum() + r["jacobian_frobenius"].sum() + r["taylor2"].sum()
        grads.append(torch.autograd.grad(loss, Wg)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_augmented_per_sample_solve():
    y0 = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=f64)
    reg = R.RegularisedTerm(tn.ODETerm(_linear), kinetic=True, batch=True)
    sol = tn.solve(reg.term, tn.Tsit5(), 0.0, torch.tensor([1.0, 0.5], dtype=f64), reg.init(y0), per_sample=True,
                   controller=tn.PIDController(rtol=1e-9, atol=1e-11))  # fmt: skip
    _, r = reg.split(sol.ys)
    for i, t1 in enumerate((1.0, 0.5)):
        ts = torch.linspace(0.0, t1, 2001, dtype=f64)
        Y = torch.linalg.matrix_exp(A * ts[:, None, None]) @ y0[i]
        kin = torch.trapezoid(((Y @ A.T) ** 2).sum(-1), ts)
        torch.testing.assert_close(r["kinetic"][i, -1], kin, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# STEER


def test_steer_end_time_distribution():
    n = 20000
    t = R.steer_end_time(0.0, 1.0, 0.25, batch=n, seed=0)
    assert t.shape == (n,) and t.dtype == f64
    assert float(t.min()) >= 0.75 and float(t.max()) <= 1.25
    # Kolmogorov-Smirnov against U[0.75, 1.25]: D below its 1% critical value 1.63 / sqrt(n)
    cdf = (t.sort().values - 0.75) / 0.5
    i = torch.arange(1, n + 1, dtype=f64)
    d = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max()
    assert float(d) < 1.63 / math.sqrt(n)
    one = R.steer_end_time(2.0, 0.0, 0.5, seed=1)  # backwards in time
    assert isinstance(one, float) and -0.5 <= one <= 0.5
    assert R.steer_end_time(0.0, 1.0, 0.25, seed=7) == R.steer_end_time(0.0, 1.0, 0.25, seed=7)


# ----------------------------------------------------------------------------------------------
# errors


def test_clear_errors():
    term = tn.ODETerm(_linear)
    y = torch.tensor([1.0, 2.0], dtype=f64)
    with pytest.raises(TypeError, match="embedded error estimate"):
        R.local_error(term, tn.RK4(), 0.0, y, 0.1)
    with pytest.raises(TypeError, match="solver instance"):
        R.local_error(term, tn.Dopri5, 0.0, y, 0.1)
    with pytest.raises(TypeError, match="two stages at the same time"):
        R.local_error(term, tn.Bosh3(), 0.0, y, 0.1, stiffness=True)
    with pytest.raises(ValueError, match="non-zero"):
        R.local_error(term, tn.Dopri5(), 0.0, y, 0.0)
    with pytest.raises(ValueError, match="both rtol and atol"):
        R.local_error(term, tn.Dopri5(), 0.0, y, 0.1, rtol=1e-3)
    with pytest.raises(ValueError, match="one sign"):
        R.local_error(term, tn.Dopri5(), 0.0, y.expand(2, 2), torch.tensor([0.1, -0.1]), per_sample=True)
    bm = tn.VirtualBrownianTree(0.0, 1.0, shape=(2,), seed=0, dtype=f64)
    sde = tn.MultiTerm(term, tn.ControlTerm(lambda t, y, a: y, bm, noise="diagonal"))
    with pytest.raises(TypeError, match="ODE term"):
        R.local_error(sde, tn.Dopri5(), 0.0, y, 0.1)
    sol = tn.solve(term, tn.Dopri5(), 0.0, 1.0, y, controller=tn.PIDController())
    with pytest.raises(ValueError, match="dense"):
        R.sample_local_regulariser(sol, term, tn.Dopri5())
    with pytest.raises(ValueError, match="SaveAt"):
        R.solve_with_local_regulariser(term, tn.Dopri5(), 0.0, 1.0, y, saveat=tn.SaveAt(ts=[0.5, 1.0]))
    with pytest.raises(ValueError, match="at least one"):
        R.RegularisedTerm(term)
    with pytest.raises(ValueError, match="probe"):
        R.RegularisedTerm(term, jacobian_frobenius=True)
    with pytest.raises(TypeError, match="ODETerm"):
        R.RegularisedTerm(lambda t, y, a: y, kinetic=True)
    with pytest.raises(ValueError, match="time_as_float"):
        R.RegularisedTerm(tn.ODETerm(_linear, time_as_float=True), taylor2=True)
    with pytest.raises(ValueError, match="smaller than"):
        R.steer_end_time(0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        R.steer_end_time(0.0, 1.0, -0.1)


# ----------------------------------------------------------------------------------------------
# the global regulariser (sum over the accepted steps)


def test_global_regulariser_is_the_sum_over_the_accepted_steps():
    term, W, b, y0 = _mlp_problem()
    ctrl = tn.PIDController(rtol=1e-5, atol=1e-7)
    sol, est = R.solve_with_global_regulariser(term, tn.Dopri5(), 0.0, 2.0, y0, args=(W, b), controller=ctrl,
                                               stiffness=True, saveat=tn.SaveAt(steps=True, t0=True))  # fmt: skip
    plain = tn.solve(
        term, tn.Dopri5(), 0.0, 2.0, y0, args=(W, b), controller=ctrl, saveat=tn.SaveAt(steps=True, t0=True)
    )
    # the same steps and values as the plain solve
    torch.testing.assert_close(sol.ts, plain.ts)
    torch.testing.assert_close(sol.ys, plain.ys)
    assert sol.stats["num_rejected"] == plain.stats["num_rejected"]
    # the sum of |h_j| E_j (and |h_j| rho_j) over the accepted steps, each from local_error
    ts, ys = plain.ts, plain.ys
    e = R.local_error(term, tn.Dopri5(), ts[:-1], ys[:-1], ts[1:] - ts[:-1], (W, b), per_sample=True, stiffness=True)
    dt = ts[1:] - ts[:-1]
    torch.testing.assert_close(est.error, (e.error * dt).sum())
    torch.testing.assert_close(est.stiffness, (e.stiffness * dt).sum())
    _, unweighted = R.solve_with_global_regulariser(term, tn.Dopri5(), 0.0, 2.0, y0, args=(W, b), controller=ctrl,
                                                    weight=False)  # fmt: skip
    torch.testing.assert_close(unweighted.error, e.error.sum())


def test_global_regulariser_gradient_with_fixed_steps():
    """Finite differences of the error-estimate sum with the step sequence held fixed (StepTo)."""
    term, W, b, y0 = _mlp_problem()
    steps = tn.solve(term, tn.Dopri5(), 0.0, 1.0, y0, args=(W, b), controller=tn.PIDController(rtol=1e-4, atol=1e-6),
                     saveat=tn.SaveAt(steps=True)).ts  # fmt: skip
    ctrl = tn.StepTo(steps)

    def total(y0, W, b):
        _, est = R.solve_with_global_regulariser(term, tn.Dopri5(), 0.0, 1.0, y0, args=(W, b), controller=ctrl,
                                                 stiffness=True)  # fmt: skip
        return est.error, est.stiffness

    inputs = tuple(x.clone().requires_grad_() for x in (y0, W, b))
    assert torch.autograd.gradcheck(total, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_global_regulariser_per_sample_and_adjoints():
    term = tn.ODETerm(_mlp_field)
    W, b = _params()
    y0 = torch.tensor([[0.3, -0.5, 0.8], [2.0, 1.0, -1.0]], dtype=f64)
    ctrl = tn.PIDController(rtol=1e-5, atol=1e-7)
    _, est = R.solve_with_global_regulariser(term, tn.Tsit5(), 0.0, torch.tensor([1.0, 2.0], dtype=f64), y0,
                                             args=(W, b), controller=ctrl, per_sample=True)  # fmt: skip
    for i, t1 in enumerate((1.0, 2.0)):
        _, one = R.solve_with_global_regulariser(term, tn.Tsit5(), 0.0, t1, y0[i], args=(W, b), controller=ctrl)
        torch.testing.assert_close(est.error[i], one.error, rtol=1e-10, atol=0)
    grads = []
    for adjoint in (tn.DirectAdjoint(), tn.CheckpointAdjoint()):
        Wg = W.clone().requires_grad_()
        sol, e = R.solve_with_global_regulariser(term, tn.Dopri5(), 0.0, 1.0, y0[0], args=(Wg, b), controller=ctrl,
                                                 adjoint=adjoint)  # fmt: skip
        grads.append(torch.autograd.grad(sol.ys.sum() + e.error, Wg)[0])
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(NotImplementedError, match="solve_with_local_regulariser"):
        R.solve_with_global_regulariser(term, tn.Dopri5(), 0.0, 1.0, y0[0], args=(W, b), controller=ctrl,
                                        adjoint=tn.BacksolveAdjoint())  # fmt: skip
    with pytest.raises(ValueError, match="t1"):
        R.solve_with_global_regulariser(term, tn.Dopri5(), 0.0, 1.0, y0[0], args=(W, b), controller=ctrl,
                                        saveat=tn.SaveAt(ts=[0.5]))  # fmt: skip


def test_backwards_in_time():
    term, W, b, y0 = _mlp_problem()
    ctrl = tn.PIDController(rtol=1e-6, atol=1e-8)
    sol = tn.solve(term, tn.Dopri5(), 1.0, -1.0, y0, args=(W, b), controller=ctrl, saveat=tn.SaveAt(dense=True))
    est = R.sample_local_regulariser(sol, term, tn.Dopri5(), args=(W, b), num_times=2, seed=0)
    assert ((est.t > -1) & (est.t < 1)).all() and (est.h < 0).all() and est.error > 0
    split, est = R.solve_with_local_regulariser(term, tn.Dopri5(), 1.0, -1.0, y0, args=(W, b), controller=ctrl, seed=0)
    assert est.h < 0 and est.error > 0
    torch.testing.assert_close(split.ys[-1], sol.evaluate(-1.0), rtol=1e-5, atol=1e-6)
    glob, est = R.solve_with_global_regulariser(term, tn.Dopri5(), 1.0, -1.0, y0, args=(W, b), controller=ctrl,
                                                stiffness=True, saveat=tn.SaveAt(steps=True))  # fmt: skip
    plain = tn.solve(term, tn.Dopri5(), 1.0, -1.0, y0, args=(W, b), controller=ctrl, saveat=tn.SaveAt(steps=True))
    torch.testing.assert_close(glob.ts, plain.ts)
    assert est.error > 0 and est.stiffness > 0


def test_global_regulariser_recorded_path_skips_rejected_steps():
    """DirectAdjoint in one-step-size mode records the steps of the plain solve (no augmented
    state) and sums the accepted ones; it agrees with the augmented-state path that
    CheckpointAdjoint uses, in value and gradient, on a solve with rejected steps."""
    term, W, b, y0 = _mlp_problem()
    ctrl = tn.PIDController(rtol=1e-6, atol=1e-8)
    out = []
    for adjoint in (tn.DirectAdjoint(), tn.CheckpointAdjoint()):
        Wg = W.clone().requires_grad_()
        sol, est = R.solve_with_global_regulariser(term, tn.Dopri5(), 0.0, 2.0, y0, args=(Wg, b), controller=ctrl,
                                                   dt0=1.0, stiffness=True, rtol=1e-6, atol=1e-8,
                                                   adjoint=adjoint)  # fmt: skip
        assert sol.stats["num_rejected"] > 0
        out.append((est.error, est.stiffness, *torch.autograd.grad(est.error + est.stiffness, Wg)))
    for a, c in zip(*out):
        torch.testing.assert_close(a, c)
