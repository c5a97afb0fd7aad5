"""Denoising score matching: weightings, training-time laws and the likelihood bound."""

import math

import pytest
import torch
from scipy import stats

from torchnde.generative import EDM, VE, VP, GaussianData, MeanReverting, SubVP
from torchnde.generative.objectives import TIME_SAMPLINGS, WEIGHTINGS, dsm_loss, nll_bound, training_times
from torchnde.generative.parameterisation import KINDS

D = torch.float64
GAUSS = GaussianData([0.5, -1.0], [[1.0, 0.3], [0.3, 0.5]])
PROCS = {"vp": VP, "subvp": SubVP, "ve": VE, "edm": EDM, "mean_reverting": lambda: MeanReverting(mean=0.3)}


def _batch(p, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = GAUSS.sample(n, generator=g)
    t = training_times(p, n, generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=D)
    return x0, t, eps


@pytest.mark.parametrize("name", sorted(PROCS))
def test_native_loss_is_the_mse_of_the_model_output(name):
    p = PROCS[name]()
    x0, t, eps = _batch(p)
    x_t = p.marginal_sample(t, x0, eps)
    for kind in KINDS:
        model = GAUSS.model(p, kind)
        loss = dsm_loss(model, p, x0, parameterisation=kind, t=t, eps=eps, reduction="none")
        if kind == "eps":
            want = (model(t, x_t) - eps).square().mean(-1)
        elif kind == "x0":
            want = (model(t, x_t) - x0).square().mean(-1)
        elif kind == "score":
            _, s = p.marginal(t)
            want = (model(t, x_t) + eps / s[:, None]).square().mean(-1)
        else:
            continue  # v and velocity: through the same conversion, checked below
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(PROCS))
def test_every_parameterisation_gives_the_same_weighted_loss(name):
    """Non-native weightings act on the noise error, so the exact model's loss is the same
    whatever it predicts."""
    p = PROCS[name]()
    x0, t, eps = _batch(p)
    for weighting in ("eps", "score", "edm", lambda t: 1 + t):
        losses = [
            dsm_loss(GAUSS.model(p, k), p, x0, parameterisation=k, weighting=weighting, t=t, eps=eps, reduction="none")
            for k in KINDS
        ]
        for other in losses[1:]:
            torch.testing.assert_close(other, losses[0], rtol=1e-8, atol=1e-10)
    # "eps" weighting == the native loss of an eps model; "score" == the native loss of a score model
    eps_model, score_model = GAUSS.model(p, "eps"), GAUSS.model(p, "score")
    torch.testing.assert_close(
        dsm_loss(eps_model, p, x0, weighting="eps", t=t, eps=eps), dsm_loss(eps_model, p, x0, t=t, eps=eps)
    )
    torch.testing.assert_close(
        dsm_loss(score_model, p, x0, parameterisation="score", weighting="score", t=t, eps=eps),
        dsm_loss(score_model, p, x0, parameterisation="score", t=t, eps=eps),
    )


def test_the_exact_score_minimises_the_loss():
    p = VP()
    x0, t, eps = _batch(p, n=4000)
    exact = GAUSS.model(p, "eps")
    best = dsm_loss(exact, p, x0, t=t, eps=eps)
    for scale in (0.9, 1.1):
        assert dsm_loss(lambda t, x, s=scale: s * exact(t, x), p, x0, t=t, eps=eps) > best
    shifted = dsm_loss(lambda t, x: exact(t, x) + 0.1, p, x0, t=t, eps=eps)
    assert shifted > best


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_likelihood_weighting_is_the_same_integral_under_both_time_laws(name):
    """Uniform times with weight (t1 - t0) g^2 / sigma^2 and log-SNR-uniform times with a constant
    weight estimate the same integral (z-test of the difference of two independent means)."""
    p = PROCS[name]()
    model = lambda t, x: 0.8 * GAUSS.model(p, "eps")(t, x)  # noqa: E731  (a non-exact model)
    g = torch.Generator().manual_seed(1)
    x0 = GAUSS.sample(20000, generator=g)
    a = dsm_loss(model, p, x0, weighting="likelihood", time_sampling="uniform", generator=g, reduction="none")
    b = dsm_loss(model, p, x0, weighting="likelihood", time_sampling="logsnr", generator=g, reduction="none")
    se = math.sqrt(a.var() / a.numel() + b.var() / b.numel())
    assert abs(float(a.mean() - b.mean())) < 4 * se, (float(a.mean()), float(b.mean()), se)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_nll_bound_is_tight_for_the_exact_score(name):
    """Song et al. 2021b: with the exact score the bound equals the negative log-likelihood
    (in expectation); measured 2.39/2.33 (VP), 2.26/2.35 (sub-VP), 2.37/2.39 (VE) nats against
    an exact 2.395 with 4000 points x 4 times."""
    p = PROCS[name]()
    g = torch.Generator().manual_seed(2)
    x0 = GAUSS.sample(4000, generator=g)
    exact = float(-GAUSS.log_prob(p, p.t0, x0).mean())
    bound = nll_bound(GAUSS.model(p, "eps"), p, x0, n_times=4, generator=g)
    se = float(bound.std()) / math.sqrt(bound.numel())
    assert abs(float(bound.mean()) - exact) < 4 * se, (float(bound.mean()), exact, se)
    # a wrong model: the bound exceeds the true NLL by far more than its noise
    wrong = nll_bound(lambda t, x: 0.5 * GAUSS.model(p, "eps")(t, x), p, x0, n_times=4, generator=g)
    assert float(wrong.mean()) > exact + 4 * se


def test_training_time_laws():
    g = torch.Generator().manual_seed(3)
    vp = VP()
    u = training_times(vp, 4000, time_sampling="uniform", generator=g)
    assert u.dtype == D and float(u.min()) >= vp.t0 and float(u.max()) <= vp.t1
    assert stats.kstest(((u - vp.t0) / (vp.t1 - vp.t0)).numpy(), "uniform").pvalue > 1e-3
    # log-SNR uniform
    t = training_times(vp, 4000, time_sampling="logsnr", generator=g)
    a, s = vp.marginal(t)
    lam = 2 * torch.log(a / s)
    lo, hi = (2 * math.log(a_ / s_) for a_, s_ in (vp.marginal(vp.t1), vp.marginal(vp.t0)))
    assert stats.kstest(((lam - lo) / (hi - lo)).numpy(), "uniform").pvalue > 1e-3
    # EDM: log-normal noise levels (Karras et al. 2022), truncated to [sigma_min, sigma_max]
    edm = EDM()
    sig = training_times(edm, 4000, generator=g, dtype=torch.float32)
    assert sig.dtype == torch.float32
    trunc = stats.truncnorm((math.log(edm.t0) + 1.2) / 1.2, (math.log(edm.t1) + 1.2) / 1.2, loc=-1.2, scale=1.2)
    assert stats.kstest(torch.log(sig.double()).numpy(), trunc.cdf).pvalue > 1e-3


def test_errors():
    p = VP()
    x0 = torch.zeros(4, 2, dtype=D)
    model = GAUSS.model(p, "eps")
    with pytest.raises(ValueError, match="unknown weighting"):
        dsm_loss(model, p, x0, weighting="snr")
    with pytest.raises(ValueError, match="unknown parameterisation"):
        dsm_loss(model, p, x0, parameterisation="noise")
    with pytest.raises(ValueError, match="unknown time_sampling"):
        dsm_loss(model, p, x0, time_sampling="beta")
    with pytest.raises(ValueError, match="lognormal"):
        training_times(p, 4, time_sampling="lognormal")
    with pytest.raises(ValueError, match="likelihood"):
        dsm_loss(model, EDM(), x0, weighting="likelihood")
    with pytest.raises(ValueError, match=r"t must have shape \(4,\)"):
        dsm_loss(model, p, x0, t=torch.zeros(3, dtype=D) + 0.5)
    with pytest.raises(ValueError, match="eps must have"):
        dsm_loss(model, p, x0, eps=torch.zeros(4, 3, dtype=D))
    with pytest.raises(ValueError, match="model returned shape"):
        dsm_loss(lambda t, x: x[:, :1], p, x0)
    with pytest.raises(ValueError, match="reduction"):
        dsm_loss(model, p, x0, reduction="sum")
    with pytest.raises(TypeError, match="DiffusionProcess"):
        training_times("vp", 4)
    assert "native" in WEIGHTINGS and "auto" in TIME_SAMPLINGS


def test_gradients_flow_and_float32():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def model(t, x):
        return net(torch.cat([x, t[:, None]], -1))

    x0 = GAUSS.sample(64, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    for weighting in WEIGHTINGS:
        net.zero_grad()
        loss = dsm_loss(model, VP(), x0, weighting=weighting, generator=torch.Generator().manual_seed(1))
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert all(torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0 for q in net.parameters())
