"""Log-densities by the instantaneous change of variables (torchnde.generative.likelihood)."""

import math

import pytest
import torch

import torchnde as tn
from torchnde.generative.likelihood import (
    bits_per_dim,
    dequantize,
    log_prob,
    standard_normal_log_prob,
    trace_noise,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


TIGHT = dict(controller=tn.PIDController(rtol=1e-10, atol=1e-10))


class MLP(torch.nn.Module):
    """A small time-dependent vector field f(t, x) (t a float or a (batch,) tensor)."""

    def __init__(self, d, hidden=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(d + 1, hidden, generator=g, dtype=F64) / math.sqrt(d + 1))
        self.b1 = torch.nn.Parameter(0.1 * torch.randn(hidden, generator=g, dtype=F64))
        self.w2 = torch.nn.Parameter(torch.randn(hidden, d, generator=g, dtype=F64) / math.sqrt(hidden))

    def forward(self, t, x):
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return torch.tanh(torch.cat([x, tt[:, None]], -1) @ self.w1 + self.b1) @ self.w2


# ----------------------------------------------------------------------------------- analytic


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("backwards", [False, True])
def test_linear_field_is_analytic(per_sample, backwards):
    # x' = A x: x(T) = expm(A T) x, log p(x) = log N(expm(A T) x) + T tr A
    A = torch.tensor([[-0.3, 0.8, 0.1], [-0.5, 0.2, 0.0], [0.3, -0.2, -0.6]], dtype=F64)
    x = torch.randn(6, 3, dtype=F64)
    t0, t1 = (0.5, -1.0) if backwards else (0.0, 1.5)
    T = t1 - t0
    lp = log_prob(lambda t, y: y @ A.T, x, t0, t1, trace="exact", per_sample=per_sample, **TIGHT)
    exact = standard_normal_log_prob(x @ torch.linalg.matrix_exp(A * T).T) + T * torch.trace(A)
    torch.testing.assert_close(lp, exact, rtol=0, atol=1e-8)


def test_vp_probability_flow_matches_gaussian_data_density():
    # Song et al. 2021: VP SDE dx = -beta/2 x dt + sqrt(beta) dW, beta(t) = 0.1 + 19.9 t.
    # For data N(mu, S) the marginal is N(a mu, a^2 S + (1 - a^2) I), a = exp(-int beta / 2), and the
    # probability-flow ODE is dx/dt = f - g^2/2 score = -beta/2 (x + score_t(x)).
    mu = torch.tensor([1.0, -0.5], dtype=F64)
    L = torch.tensor([[0.8, 0.0], [0.5, 0.3]], dtype=F64)
    S = L @ L.T
    eye = torch.eye(2, dtype=F64)

    def beta(t):
        return 0.1 + 19.9 * t

    def alpha(t):
        return torch.exp(-0.5 * (0.1 * t + 9.95 * t * t))

    def marginal(t):
        a = alpha(torch.as_tensor(t, dtype=F64))
        return a * mu, a * a * S + (1 - a * a) * eye

    def pf_drift(t, x, args):
        # t: (batch,) per sample
        a = alpha(t)[:, None, None]
        cov = a * a * S + (1 - a * a) * eye  # (B, 2, 2)
        score = -torch.linalg.solve(cov, (x - a[:, :, 0] * mu)[..., None])[..., 0]
        return -0.5 * beta(t)[:, None] * (x + score)

    def prior(z):
        m, c = marginal(1.0)
        return torch.distributions.MultivariateNormal(m, c).log_prob(z)

    x = torch.distributions.MultivariateNormal(mu, S).sample((16,)) * 1.5  # also tails
    lp, sol = log_prob(
        tn.ODETerm(pf_drift),
        x,
        0.0,
        1.0,
        prior,
        trace="exact",
        controller=tn.PIDController(rtol=1e-9, atol=1e-9),
        return_solution=True,
    )
    exact = torch.distributions.MultivariateNormal(mu, S).log_prob(x)
    err = (lp - exact).abs().max().item()
    assert err < 1e-3, err
    assert err < 1e-6  # measured ~1e-8: the 1e-3 target holds with a wide margin
    assert sol.stats["num_steps"].shape == (16,)  # each sample its own steps


def test_probability_flow_of_the_processes_with_oracle_scores():
    # the same check through torchnde.generative.processes / oracles: VP's probability-flow ODE with
    # the exact score of Gaussian and Gaussian-mixture data, from the process's t0 to t1
    from torchnde.generative.oracles import GaussianData, GaussianMixtureData
    from torchnde.generative.processes import VP

    vp = VP()
    datas = [
        GaussianData(torch.tensor([1.0, -0.5], dtype=F64), torch.tensor([[0.64, 0.4], [0.4, 0.34]], dtype=F64)),
        GaussianMixtureData(
            torch.tensor([0.3, 0.7], dtype=F64),
            torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=F64),
            torch.tensor([0.3, 0.5], dtype=F64),
        ),
    ]
    for data in datas:
        x = data.sample(16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            lp = log_prob(
                vp.probability_flow(data.score_fn(vp)),
                x,
                vp.t0,
                vp.t1,
                lambda z, data=data: data.log_prob(vp, vp.t1, z),
                trace="exact",
                controller=tn.PIDController(rtol=1e-9, atol=1e-9),
            )
        err = (lp - data.log_prob(vp, vp.t0, x)).abs().max().item()
        assert err < 1e-3, (type(data).__name__, err)  # measured ~1e-8


# ------------------------------------------------------------------------------- traces


@pytest.mark.parametrize("trace", ["hutchinson-gaussian", "hutchinson-rademacher"])
def test_hutchinson_agrees_with_exact_in_expectation(trace):
    # delta = eps^T (int J dt) eps is unbiased for the exact integral of the trace: over R probe draws
    # per point the mean lies within a few standard errors of the exact log-density.
    f = MLP(3, seed=1)
    x = torch.randn(4, 3, dtype=F64) * 1.5
    R = 400
    ctrl = tn.PIDController(rtol=1e-7, atol=1e-7)
    with torch.no_grad():
        exact = log_prob(f, x, 0.0, 1.0, trace="exact", controller=ctrl)
        xr = x.repeat_interleave(R, 0)
        est = log_prob(f, xr, 0.0, 1.0, trace=trace, controller=ctrl, seed=123).view(4, R)
    mean, se = est.mean(1), est.std(1) / math.sqrt(R)
    z = (mean - exact) / se
    assert (se > 1e-3).all()  # the estimator is random, so the test has power
    assert (z.abs() < 4).all(), z
    # probes fixed per solve: the same seed reproduces, another seed differs
    with torch.no_grad():
        one = log_prob(f, xr[:8], 0.0, 1.0, trace=trace, controller=ctrl, seed=7)
        again = log_prob(f, xr[:8], 0.0, 1.0, trace=trace, controller=ctrl, seed=7)
        other = log_prob(f, xr[:8], 0.0, 1.0, trace=trace, controller=ctrl, seed=8)
    torch.testing.assert_close(again, one, rtol=0, atol=0)
    assert not torch.allclose(again, other)


def test_trace_noise_moments():
    x = torch.zeros(20000, 3, dtype=F64)
    for trace in ("hutchinson-gaussian", "hutchinson-rademacher"):
        eps = trace_noise(x, trace, seed=0)
        cov = eps.T @ eps / eps.shape[0]
        # E[eps eps^T] = I; sample covariance entries have standard error <= sqrt(3 / n)
        assert (cov - torch.eye(3, dtype=F64)).abs().max() < 5 * math.sqrt(3 / x.shape[0])
    assert set(trace_noise(x, "hutchinson-rademacher", seed=0).unique().tolist()) == {-1.0, 1.0}
    assert trace_noise(x, "exact") is None


def test_per_sample_answer_does_not_depend_on_the_batch():
    f = MLP(2, seed=2)
    x = torch.randn(5, 2, dtype=F64)
    with torch.no_grad():
        batch = log_prob(f, x, 0.0, 1.0, trace="exact")
        alone = torch.cat([log_prob(f, x[i : i + 1], 0.0, 1.0, trace="exact") for i in range(5)])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-12)


def test_no_grad_and_dtype_follow_the_data():
    f = MLP(2).float()
    x = torch.randn(3, 2)
    with torch.no_grad():
        lp = log_prob(f, x, 0.0, 1.0, trace="hutchinson-rademacher", seed=0)
    assert lp.dtype == torch.float32 and lp.shape == (3,) and not lp.requires_grad


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("trace", ["exact", "hutchinson-gaussian"])
def test_parameter_gradients_match_finite_differences(trace):
    # fixed RK4 steps: DirectAdjoint differentiates the computed solution exactly
    f = MLP(2, hidden=8, seed=3)
    x = torch.randn(3, 2, dtype=F64)
    noise = trace_noise(x, trace, seed=5)

    def objective():
        return log_prob(f, x, 0.0, 1.0, trace=trace, noise=noise, solver=tn.RK4(), dt0=0.1).sum()

    objective().backward()
    h = 1e-6
    for p in f.parameters():
        flat = p.detach().view(-1)
        for k in range(0, flat.numel(), max(1, flat.numel() // 4)):
            old = flat[k].item()
            with torch.no_grad():
                flat[k] = old + h
                up = objective().item()
                flat[k] = old - h
                down = objective().item()
                flat[k] = old
            fd = (up - down) / (2 * h)
            assert abs(fd - p.grad.view(-1)[k].item()) < 1e-7 * max(1.0, abs(fd))


def test_backsolve_gradients_match_direct():
    f = MLP(2, hidden=8, seed=4)
    x = torch.randn(4, 2, dtype=F64)
    grads = {}
    for adjoint in (tn.DirectAdjoint(), tn.BacksolveAdjoint()):
        f.zero_grad()
        lp = log_prob(f, x, 0.0, 1.0, trace="hutchinson-gaussian", seed=0, adjoint=adjoint, per_sample=False, **TIGHT)
        lp.sum().backward()
        grads[type(adjoint).__name__] = [p.grad.clone() for p in f.parameters()]
    for a, b in zip(grads["DirectAdjoint"], grads["BacksolveAdjoint"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


# -------------------------------------------------------------------------------- errors


def test_errors_name_the_valid_choices():
    f = MLP(2)
    x = torch.randn(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="hutchinson-rademacher"):
        log_prob(f, x, 0.0, 1.0, trace="hutchinson")
    bm = tn.VirtualBrownianTree(0.0, 1.0, shape=(2, 2), seed=0, dtype=F64)
    sde = tn.MultiTerm(tn.ODETerm(lambda t, y, a: -y), tn.ControlTerm(lambda t, y, a: y, bm, noise="diagonal"))
    with pytest.raises(TypeError, match="probability-flow"):
        log_prob(sde, x, 0.0, 1.0)
    with pytest.raises(ValueError, match="shaped like x"):
        log_prob(lambda t, y: y.sum(-1), x, 0.0, 1.0)


# -------------------------------------------------------------------------- discrete data


def test_dequantize_range_and_mean():
    x = torch.randint(0, 256, (20000, 3))
    g = torch.Generator().manual_seed(0)
    y = dequantize(x, 256, generator=g, dtype=F64)
    assert y.dtype == F64 and (y >= 0).all() and (y < 1).all()
    assert ((y * 256).floor() == x).all()  # each value stays in its own bin
    u = y * 256 - x  # U[0, 1): mean 1/2, standard error sqrt(1/12 / n)
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    y2 = dequantize(x, 256, low=-1.0, high=1.0, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(y2, 2 * y - 1)
    with pytest.raises(ValueError):
        dequantize(torch.tensor([256]), 256)


def test_bits_per_dim_correction_is_exact_for_a_binned_density():
    # a continuous density on [0,1)^D constant on each bin, p_y(y) = K^D P(x): the dequantized NLL
    # corrected by -D log(1/K) is exactly -log P(x), whatever u is
    K, D = 4, 2
    P1 = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    x = torch.tensor([[0, 3], [2, 1], [3, 3]])
    y = dequantize(x, K, generator=torch.Generator().manual_seed(1), dtype=F64)
    bins = (y * K).floor().long()
    nll_y = -(torch.log(K * P1[bins])).sum(-1)
    nll_x = -torch.log(P1[x]).sum(-1)
    torch.testing.assert_close(bits_per_dim(nll_y, D, num_levels=K), nll_x / (D * math.log(2)))
    torch.testing.assert_close(bits_per_dim(nll_y, D, scale=1 / K), nll_x / (D * math.log(2)))
    # the uniform density on [0,1)^D is 8 bits/dim for 256 levels; on [-1, 1) (scale 2/256) too
    assert bits_per_dim(0.0, 10, num_levels=256) == pytest.approx(8.0)
    assert bits_per_dim(10 * math.log(2.0), 10, scale=2 / 256) == pytest.approx(8.0)
