"""SDEs through solve(): terms and their checks, gradients by every adjoint, per-sample mode,
backwards time and trees. (Solver convergence orders are in test_sde_solvers.py, Brownian
statistics in test_brownian.py.)"""

import math

import pytest
import torch

import torchnde as tn
from torchnde.paths import VirtualBrownianTree


@pytest.fixture(autouse=True)
def _float64():
    """float64 in this module only (the default dtype is global state)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


B, D = 4, 3


def _bm(shape=(B, D), seed=0, **kw):
    return VirtualBrownianTree(0.0, 1.0, shape, seed=seed, dtype=torch.float64, **kw)


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.nn.Parameter(0.5 * torch.randn(D, D, generator=g))
    w2 = torch.nn.Parameter(0.3 * torch.randn(D, D, generator=g))
    drift = lambda t, y, a: torch.tanh(y @ w1) - 0.5 * y
    diffusion = lambda t, y, a: 0.4 * torch.sigmoid(y @ w2)
    return drift, diffusion, [w1, w2]


def _terms(bm, noise="diagonal", seed=0):
    drift, diffusion, params = _model(seed)
    return tn.MultiTerm(tn.ODETerm(drift), tn.ControlTerm(diffusion, bm, noise=noise)), params


# ------------------------------------------------------------------------------------------
# terms and their errors


def test_sde_runs_and_reports_diffusion_evaluations():
    terms, _ = _terms(_bm())
    sol = tn.solve(terms, tn.Heun(), 0.0, 1.0, torch.ones(B, D), dt0=0.1)
    assert sol.ys.shape == (1, B, D) and torch.isfinite(sol.ys).all()
    assert sol.stats["nfe"] == 20 and sol.stats["nfe_diffusion"] == 20


def test_pure_diffusion_and_brownian_motion_itself():
    # dy = dW: the solution is the path
    bm = _bm()
    term = tn.ControlTerm(lambda t, y, a: torch.ones_like(y), bm, noise="diagonal")
    sol = tn.solve(term, tn.Euler(), 0.0, 1.0, torch.zeros(B, D), dt0=0.01, saveat=tn.SaveAt(ts=[0.25, 1.0]))
    torch.testing.assert_close(sol.ys[0], bm.evaluate(0.0, 0.25), rtol=0, atol=1e-12)
    torch.testing.assert_close(sol.ys[1], bm.evaluate(0.0, 1.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("noise", ["diagonal", "scalar", "general"])
def test_noise_shapes(noise):
    m = 2
    shape = {"diagonal": (B, D), "scalar": (B, 1), "general": (B, m)}[noise]
    bm = _bm(shape)
    if noise == "general":
        g = lambda t, y, a: torch.ones(B, D, m) * 0.1
    else:
        g = lambda t, y, a: 0.1 * torch.ones_like(y)
    term = tn.ControlTerm(g, bm, noise=noise)
    sol = tn.solve(term, tn.Euler(), 0.0, 1.0, torch.zeros(B, D), dt0=0.5)
    W = bm.evaluate(0.0, 1.0)
    want = 0.1 * (W.sum(-1, keepdim=True).expand(B, D) if noise == "general" else W.expand(B, D))
    torch.testing.assert_close(sol.ys[-1], want)


def test_wrong_diffusion_shape_is_a_clear_error():
    term = tn.ControlTerm(lambda t, y, a: torch.ones(B, D, 2), _bm(), noise="diagonal")
    with pytest.raises(ValueError, match=r"diffusion .* returned shape \(4, 3, 2\); with noise='diagonal'"):
        tn.solve(term, tn.Euler(), 0.0, 1.0, torch.zeros(B, D), dt0=0.1)


def test_wrong_path_shape_is_a_clear_error():
    term = tn.ControlTerm(lambda t, y, a: torch.ones_like(y), _bm((B, 5)), noise="diagonal")
    with pytest.raises(ValueError, match=r"Brownian path has shape \(4, 5\)"):
        tn.solve(term, tn.Euler(), 0.0, 1.0, torch.zeros(B, D), dt0=0.1)


def test_path_dtype_must_follow_y0():
    bm = VirtualBrownianTree(0.0, 1.0, (B, D), dtype=torch.float32)
    term = tn.ControlTerm(lambda t, y, a: torch.ones_like(y), bm, noise="diagonal")
    with pytest.raises(TypeError, match="dtype=y0.dtype"):
        tn.solve(term, tn.Euler(), 0.0, 1.0, torch.zeros(B, D), dt0=0.1)


def test_term_argument_errors():
    bm = _bm()
    with pytest.raises(ValueError, match="noise=.* must be one of"):
        tn.ControlTerm(lambda t, y, a: y, bm, noise="diag")
    with pytest.raises(TypeError, match="needs a path"):
        tn.ControlTerm(lambda t, y, a: y, torch.zeros(3))
    with pytest.raises(TypeError, match="callable"):
        tn.ControlTerm(3, bm)
    with pytest.raises(ValueError, match="calculus"):
        tn.ControlTerm(lambda t, y, a: y, bm, calculus="ito-ish")
    with pytest.raises(TypeError, match="MultiTerm takes terms"):
        tn.MultiTerm(lambda t, y, a: y)
    with pytest.raises(ValueError, match="at least one"):
        tn.MultiTerm()
    c = tn.ControlTerm(lambda t, y, a: y, bm, noise="diagonal")
    with pytest.raises(TypeError, match="nested MultiTerm"):
        tn.solve(tn.MultiTerm(tn.MultiTerm(c)), tn.Euler(), 0.0, 1.0, torch.zeros(B, D), dt0=0.1)
    with pytest.raises(NotImplementedError, match="more than one control term"):
        tn.solve(tn.MultiTerm(c, c), tn.Euler(), 0.0, 1.0, torch.zeros(B, D), dt0=0.1)


def test_ode_solver_on_an_sde_names_the_sde_solvers():
    terms, _ = _terms(_bm())
    with pytest.raises(TypeError, match=r"Tsit5 is an ODE solver.*Use an SDE solver: Euler, Heun"):
        tn.solve(terms, tn.Tsit5(), 0.0, 1.0, torch.zeros(B, D), dt0=0.1)


def test_declared_calculus_is_enforced():
    drift, diffusion, _ = _model()
    terms = tn.MultiTerm(tn.ODETerm(drift), tn.ControlTerm(diffusion, _bm(), noise="diagonal", calculus="ito"))
    with pytest.raises(TypeError, match="Heun solves stratonovich SDEs but .* calculus='ito'; use one of: Euler"):
        tn.solve(terms, tn.Heun(), 0.0, 1.0, torch.zeros(B, D), dt0=0.1)
    tn.solve(terms, tn.Euler(), 0.0, 1.0, torch.zeros(B, D), dt0=0.1)
    # with additive noise both calculi agree: any solver goes
    add = tn.MultiTerm(
        tn.ODETerm(drift),
        tn.ControlTerm(
            lambda t, y, a: 0.3 * torch.ones_like(y), _bm(), noise="diagonal", additive=True, calculus="ito"
        ),
    )
    tn.solve(add, tn.Heun(), 0.0, 1.0, torch.zeros(B, D), dt0=0.1)


def test_time_gradients_are_refused_for_sdes():
    terms, _ = _terms(_bm())
    t1 = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(NotImplementedError, match="not defined for SDEs"):
        tn.solve(terms, tn.Euler(), 0.0, t1, torch.zeros(B, D), dt0=0.1)


def test_unsupported_adjoint_combinations():
    terms, _ = _terms(_bm())
    y0 = torch.zeros(B, D, requires_grad=True)
    with pytest.raises(NotImplementedError, match="needs a Stratonovich solver"):
        tn.solve(terms, tn.Euler(), 0.0, 1.0, y0, dt0=0.1, adjoint=tn.BacksolveAdjoint())
    with pytest.raises(NotImplementedError, match="ReversibleHeun"):
        tn.solve(terms, tn.Heun(), 0.0, 1.0, y0, dt0=0.1, adjoint=tn.ReversibleAdjoint())


# ------------------------------------------------------------------------------------------
# gradients


def _loss_fn(solver, adjoint, n, bm_seed=3):
    bm = _bm(seed=bm_seed)
    terms, params = _terms(bm)

    def loss(y0):
        sol = tn.solve(terms, solver, 0.0, 1.0, y0, dt0=1.0 / n, adjoint=adjoint, saveat=tn.SaveAt(ts=[0.5, 1.0]))
        return (sol.ys**2).sum() + sol.ys.sum()

    return loss, params


def _fd(loss, x, eps=1e-6):
    g = torch.zeros_like(x)
    flat = x.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        up = loss().item()
        flat[i] = old - eps
        down = loss().item()
        flat[i] = old
        g.view(-1)[i] = (up - down) / (2 * eps)
    return g


@pytest.mark.parametrize(
    "solver,adjoint",
    [
        (tn.Euler(), tn.DirectAdjoint()),
        (tn.Heun(), tn.DirectAdjoint()),
        (tn.Heun(), tn.CheckpointAdjoint()),
        (tn.Midpoint(), tn.CheckpointAdjoint(checkpoints=3)),
        (tn.ReversibleHeun(), tn.ReversibleAdjoint()),
    ],
    ids=lambda x: type(x).__name__,
)
def test_discretise_then_optimise_gradients_match_finite_differences(solver, adjoint):
    loss, params = _loss_fn(solver, adjoint, n=20)
    y0 = torch.randn(B, D, generator=torch.Generator().manual_seed(1)).requires_grad_()
    grads = torch.autograd.grad(loss(y0), [y0, *params])
    with torch.no_grad():
        y0d = y0.detach().clone()
        want = [_fd(lambda: loss(y0d), y0d)] + [_fd(lambda: loss(y0d), p.data) for p in params]
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_reversible_adjoint_equals_direct_through_reversible_heun():
    y0 = torch.randn(B, D, generator=torch.Generator().manual_seed(1))
    out = []
    for adjoint in (tn.DirectAdjoint(), tn.ReversibleAdjoint()):
        loss, params = _loss_fn(tn.ReversibleHeun(), adjoint, n=200)
        y = y0.clone().requires_grad_()
        out.append(torch.autograd.grad(loss(y), [y, *params]))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_stochastic_adjoint_converges_to_the_discrete_gradient():
    """Backsolve solves the adjoint SDE backwards on the same Brownian path; its gradients differ
    from the exact gradients of the computed solution by the discretisation error, which must
    shrink with the step (strong order 1 here: diagonal noise, Stratonovich Heun)."""
    y0 = torch.randn(B, D, generator=torch.Generator().manual_seed(1))
    errs = []
    for n in (32, 128, 512):
        gs = []
        for adjoint in (tn.DirectAdjoint(), tn.BacksolveAdjoint()):
            loss, params = _loss_fn(tn.Heun(), adjoint, n)
            y = y0.clone().requires_grad_()
            gs.append(torch.autograd.grad(loss(y), [y, *params]))
        errs.append(max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*gs)))
    assert errs[-1] < 1e-4
    slope = math.log(errs[0] / errs[-1]) / math.log(16)
    assert slope > 0.7, errs


# ------------------------------------------------------------------------------------------
# modes


def test_per_sample_sde_matches_each_sample_alone():
    """Per-sample seeds: sample b of the batched path is the path of seed b; with per-sample
    adaptive steps each sample takes the steps it would take alone."""
    seeds = torch.arange(10, 10 + B)
    bm = VirtualBrownianTree(0.0, 1.0, (B, D), seed=seeds, dtype=torch.float64)
    drift, diffusion, _ = _model()
    terms = tn.MultiTerm(tn.ODETerm(drift), tn.ControlTerm(diffusion, bm, noise="diagonal"))
    y0 = torch.randn(B, D, generator=torch.Generator().manual_seed(2))
    ctrl = tn.PIDController(rtol=1e-3, atol=1e-3)
    sol = tn.solve(terms, tn.Heun(), 0.0, 1.0, y0, dt0=0.05, controller=ctrl, per_sample=True)
    for b in range(B):
        bm_b = VirtualBrownianTree(0.0, 1.0, (1, D), seed=int(seeds[b]), dtype=torch.float64)
        t_b = tn.MultiTerm(tn.ODETerm(drift), tn.ControlTerm(diffusion, bm_b, noise="diagonal"))
        alone = tn.solve(t_b, tn.Heun(), 0.0, 1.0, y0[b : b + 1], dt0=0.05, controller=ctrl)
        torch.testing.assert_close(sol.ys[b, -1], alone.ys[-1, 0], rtol=1e-10, atol=1e-12)
        assert int(sol.stats["num_steps"][b]) == alone.stats["num_steps"]


def test_backwards_in_time_retraces_a_stratonovich_path():
    bm = _bm()
    terms, _ = _terms(bm)
    y0 = torch.randn(B, D, generator=torch.Generator().manual_seed(4))
    fwd = tn.solve(terms, tn.Heun(), 0.0, 1.0, y0, dt0=1e-3)
    back = tn.solve(terms, tn.Heun(), 1.0, 0.0, fwd.ys[-1], dt0=-1e-3)
    torch.testing.assert_close(back.ys[-1], y0, rtol=0, atol=1e-4)


def test_tree_state_with_diagonal_noise():
    bm = VirtualBrownianTree(0.0, 1.0, {"a": (B, D), "b": (B,)}, dtype=torch.float64)
    term = tn.MultiTerm(
        tn.ODETerm(lambda t, y, a: {"a": -y["a"], "b": -y["b"]}),
        tn.ControlTerm(
            lambda t, y, a: {"a": 0.2 * torch.ones_like(y["a"]), "b": torch.ones_like(y["b"])}, bm, noise="diagonal"
        ),
    )
    y0 = {"a": torch.ones(B, D), "b": torch.zeros(B)}
    sol = tn.solve(term, tn.Euler(), 0.0, 1.0, y0, dt0=0.01)
    assert sol.ys["a"].shape == (1, B, D) and sol.ys["b"].shape == (1, B)
    # dy_b = -y_b dt + dW_b from 0 is an OU path: its value is finite and noise-driven
    assert torch.isfinite(sol.ys["b"]).all() and sol.ys["b"].abs().sum() > 0
