"""Forward processes, parameterisations and the analytic oracles of torchnde.generative."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

import torchnde as tn
from torchnde.generative.oracles import GaussianData, GaussianMixtureData
from torchnde.generative.parameterisation import KINDS, Parameterisation
from torchnde.generative.processes import EDM, VE, VP, MeanReverting, SubVP

D = torch.float64
PROCS = {
    "vp": lambda: VP(),
    "ve": lambda: VE(),
    "subvp": lambda: SubVP(),
    "edm": lambda: EDM(),
    "mr": lambda: MeanReverting(theta=4.0, mean=torch.tensor([0.5, -1.0], dtype=D), sigma=1.5),
}
GAUSS = GaussianData([1.0, -0.5], [[1.0, 0.3], [0.3, 0.5]])
MIX_DIAG = GaussianMixtureData([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [[0.5, 0.3], [0.4, 0.6]])
MIX_ISO = GaussianMixtureData([1.0, 1.0, 2.0], [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], [0.3, 0.5, 0.4])
ORACLES = {"gauss": GAUSS, "mix_diag": MIX_DIAG, "mix_iso": MIX_ISO}


def _mid_times(p, n=5):
    return torch.linspace(p.t0 + 0.05 * (p.t1 - p.t0), p.t1, n, dtype=D)


@pytest.mark.parametrize("name", PROCS)
def test_marginals_solve_the_moment_equations(name):
    """d alpha/dt = a(t) alpha and d sigma^2/dt = 2 a sigma^2 + g^2 for the drift f = a x + b:
    the SDE's drift and diffusion have exactly the declared Gaussian marginals."""
    p = PROCS[name]()
    t = _mid_times(p)[:-1]
    h = 1e-6 * (p.t1 - p.t0)
    a_p, s_p = p.marginal(t + h)
    a_m, s_m = p.marginal(t - h)
    a, s = p.marginal(t)
    ones, zeros = torch.ones(t.shape[0], 2, dtype=D), torch.zeros(t.shape[0], 2, dtype=D)
    coef = (p.drift(t, ones) - p.drift(t, zeros))[:, 0]  # a(t) of f = a x + b
    torch.testing.assert_close((a_p - a_m) / (2 * h), coef * a, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close((s_p**2 - s_m**2) / (2 * h), 2 * coef * s**2 + p.diffusion2(t), rtol=1e-6, atol=1e-8)
    if name == "mr":  # the mean's offset m(t) = (1 - alpha) mu solves dm/dt = a m + theta mu
        x = torch.zeros(t.shape[0], 2, dtype=D)
        dm = (p.mean_offset(t + h, x) - p.mean_offset(t - h, x)) / (2 * h)
        torch.testing.assert_close(dm, p.drift(t, p.mean_offset(t, x)), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", PROCS)
def test_float_and_per_sample_times_agree(name):
    p = PROCS[name]()
    t = _mid_times(p)
    x = torch.randn(5, 2, dtype=D)
    a, s = p.marginal(t)
    for i in range(5):
        ai, si = p.marginal(float(t[i]))
        assert isinstance(ai, float) and isinstance(si, float)
        assert math.isclose(ai, float(a[i]), rel_tol=1e-12) and math.isclose(si, float(s[i]), rel_tol=1e-12)
        torch.testing.assert_close(p.drift(float(t[i]), x[i : i + 1]), p.drift(t, x)[i : i + 1])
        assert math.isclose(p.diffusion(float(t[i])), float(p.diffusion(t)[i]), rel_tol=1e-12)


@pytest.mark.parametrize("name", PROCS)
def test_prior(name):
    p = PROCS[name]()
    gen = torch.Generator().manual_seed(0)
    x = p.prior_sample((20000, 2), generator=gen, dtype=D)
    mu = p.prior_mean(x)
    mu = torch.zeros(2, dtype=D) if not isinstance(mu, torch.Tensor) else mu
    # sample mean and std within 5 standard errors of the prior's
    se = p.prior_std() / math.sqrt(20000)
    assert ((x.mean(0) - mu).abs() < 5 * se).all()
    assert ((x.std(0) / p.prior_std() - 1).abs() < 5 / math.sqrt(2 * 20000)).all()
    ref = torch.distributions.Normal(mu, torch.tensor(p.prior_std(), dtype=D)).log_prob(x[:10]).sum(-1)
    torch.testing.assert_close(p.prior_log_prob(x[:10]), ref)
    # the prior is close to the exact marginal at t1 for data of unit scale: the data's weight
    # alpha(t1) is small next to the noise sigma(t1), which is the prior's std
    a1, s1 = p.marginal(p.t1)
    assert abs(a1) / s1 < 0.05 and math.isclose(s1, p.prior_std(), rel_tol=1e-2)


def test_edm_times():
    p = EDM()
    ts = p.times(18)
    assert ts.shape == (19,) and ts[0] == 80.0 and ts[-1] == 0.002 and (ts[1:] < ts[:-1]).all()
    # Karras et al.'s schedule: t_i^(1/rho) is linear in i
    r = ts ** (1 / 7)
    torch.testing.assert_close(r[1:] - r[:-1], (r[1] - r[0]).expand(18))
    vp = VP().times(4)
    torch.testing.assert_close(vp, torch.tensor([1.0, 0.75025, 0.5005, 0.25075, 0.001], dtype=D))
    with pytest.raises(ValueError, match="int >= 1"):
        p.times(0)


def test_bad_parameters():
    with pytest.raises(ValueError):
        VP(beta_min=3.0, beta_max=1.0)
    with pytest.raises(ValueError):
        VE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError):
        EDM(rho=0)
    with pytest.raises(ValueError):
        MeanReverting(theta=-1.0)
    with pytest.raises(ValueError, match="unknown parameterisation"):
        Parameterisation("noise", VP())
    with pytest.raises(TypeError):
        VP().marginal("0.5")


# ------------------------------------------------------------------------- parameterisations
@pytest.mark.parametrize("name", PROCS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_parameterisation_round_trips(name, per_sample):
    """Every kind converts to every other and back to 1e-10 (float64)."""
    p = PROCS[name]()
    gen = torch.Generator().manual_seed(1)
    ts = _mid_times(p, 6)
    x = torch.randn(6, 2, generator=gen, dtype=D) * 2
    for kind, other in itertools.product(KINDS, KINDS):
        out = torch.randn(6, 2, generator=gen, dtype=D)
        times = [ts] if per_sample else [float(t) for t in ts]
        for t in times:
            pa = Parameterisation(kind, p)
            converted = pa.convert(other, t, x, out)
            back = Parameterisation(other, p).convert(kind, t, x, converted)
            torch.testing.assert_close(back, out, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", PROCS)
def test_parameterisations_of_the_exact_model_agree(name):
    """The exact model in each parameterisation gives the same score, and eps, x0, v are the
    defining identities of the marginal: x = alpha x0 + m + sigma eps, v = alpha eps - sigma x0."""
    p = PROCS[name]()
    t = _mid_times(p, 4)
    x = torch.randn(4, 2, dtype=D)
    score = MIX_DIAG.score(p, t, x)
    outs = {k: MIX_DIAG.model(p, k)(t, x) for k in KINDS}
    for k in KINDS:
        torch.testing.assert_close(Parameterisation(k, p).to_score(t, x, outs[k]), score, rtol=1e-10, atol=1e-10)
    a, s = (v[:, None] for v in p.marginal(t))
    torch.testing.assert_close(a * outs["x0"] + p.mean_offset(t, x) + s * outs["eps"], x)
    torch.testing.assert_close(outs["v"], a * outs["eps"] - s * outs["x0"])
    torch.testing.assert_close(outs["velocity"], p.pf_drift(MIX_DIAG.score_fn(p), t, x))


def test_as_score_counts_calls_and_passes_batched_time():
    p = VP()
    seen = []

    def model(t, x):
        seen.append(t)
        return torch.zeros_like(x)

    f = Parameterisation("eps", p).as_score(model)
    f(0.5, torch.ones(3, 2))
    f(torch.tensor([0.1, 0.2, 0.3]), torch.ones(3, 2))
    assert f.calls == 2 and seen[0].shape == (3,) and seen[0].dtype == torch.float32


# ------------------------------------------------------------------------------------ oracles
@pytest.mark.parametrize("oname", ORACLES)
@pytest.mark.parametrize("name", PROCS)
def test_oracle_score_is_the_gradient_of_the_log_density(name, oname):
    p, o = PROCS[name](), ORACLES[oname]
    x = (torch.randn(6, 2, dtype=D) * 2).requires_grad_()
    for t in (float(_mid_times(p)[1]), _mid_times(p, 6)):
        (grad,) = torch.autograd.grad(o.log_prob(p, t, x).sum(), x)
        torch.testing.assert_close(o.score(p, t, x), grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["vp", "edm", "mr"])
def test_gaussian_log_density_matches_scipy(name):
    p = PROCS[name]()
    t = 0.4 * p.t1 + 0.6 * p.t0
    mean, cov = GAUSS.marginal_moments(p, t)
    x = torch.randn(8, 2, dtype=D)
    ref = multivariate_normal(mean.numpy(), cov.numpy()).logpdf(x.numpy())
    torch.testing.assert_close(GAUSS.log_prob(p, t, x), torch.as_tensor(ref), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("oname", ORACLES)
@pytest.mark.parametrize("name", ["vp", "ve", "mr"])
def test_oracles_against_monte_carlo(name, oname):
    """Draws of x_t (data through the forward marginal) against the oracle: the density
    integrates to one (importance sampling), E[score] = 0 and E[score x^T] = -I (Stein's
    identity), each within 5 standard errors."""
    p, o = PROCS[name](), ORACLES[oname]
    gen = torch.Generator().manual_seed(3)
    t = 0.3 * p.t1 + 0.7 * p.t0
    n = 100_000
    xt = o.marginal_sample(p, t, n, generator=gen)
    sc = o.score(p, t, xt)
    se = sc.std(0) / math.sqrt(n)
    assert (sc.mean(0).abs() < 5 * se).all()
    stein = sc[:, :, None] * (xt - xt.mean(0))[:, None, :]
    se_s = stein.reshape(n, -1).std(0) / math.sqrt(n)
    assert ((stein.mean(0).reshape(-1) + torch.eye(2, dtype=D).reshape(-1)).abs() < 5 * se_s).all()
    # normalisation: E_q[p / q] = 1 for a broad Gaussian proposal q
    centre, spread = xt.mean(0), 3 * xt.std(0)
    q = torch.distributions.Normal(centre, spread)
    z = centre + spread * torch.randn(n, 2, generator=gen, dtype=D)
    w = torch.exp(o.log_prob(p, t, z) - q.log_prob(z).sum(-1))
    assert abs(w.mean() - 1) < 5 * w.std() / math.sqrt(n)


def test_oracle_validation_and_sampling():
    with pytest.raises(ValueError, match="symmetric"):
        GaussianData([0.0, 0.0], [[1.0, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match="positive"):
        GaussianMixtureData([1.0, -1.0], [[0.0], [1.0]], 1.0)
    gen = torch.Generator().manual_seed(0)
    x = MIX_ISO.sample(40000, generator=gen)
    # mixture mean within 5 standard errors
    m = (MIX_ISO.weights[:, None] * MIX_ISO.means).sum(0)
    assert ((x.mean(0) - m).abs() < 5 * x.std(0) / 200).all()
    y = GAUSS.sample(40000, generator=gen)
    assert (torch.cov(y.T) - GAUSS.cov).abs().max() < 0.04


def test_reverse_sde_and_probability_flow_are_terms():
    p = VP()
    score = GAUSS.score_fn(p)
    x = torch.zeros(4, 2, dtype=D)
    sde = p.reverse_sde(score, x.shape, seed=0, dtype=D)
    assert isinstance(sde, tn.MultiTerm)
    sol = tn.solve(sde, tn.Euler(), p.t1, p.t0, x, dt0=-0.01)
    assert sol.ys.shape == (1, 4, 2) and torch.isfinite(sol.ys).all()
    pf = p.probability_flow(score)
    assert isinstance(pf, tn.ODETerm)
    torch.testing.assert_close(pf.vf(0.5, x, None), p.drift(0.5, x) - 0.5 * p.diffusion2(0.5) * score(0.5, x))


@pytest.mark.parametrize("name", PROCS)
def test_float_fast_paths_match_the_tensor_formulas(name):
    """Float times use math-module formulas (no tensors per call); they agree with the tensor
    formulas at per-sample times to float64 rounding, and so do the samplers' drifts built on
    them (including the folded score scale of eps and score models)."""
    p = PROCS[name]()
    t = _mid_times(p)
    x = torch.randn(5, 2, dtype=D, generator=torch.Generator().manual_seed(0))
    eps_model = MIX_DIAG.model(p, "eps")
    score = Parameterisation("eps", p).as_score(eps_model)
    generic = Parameterisation("x0", p).as_score(MIX_DIAG.model(p, "x0"))  # no folded scale
    for i in range(5):
        ti, xi = float(t[i]), x[i : i + 1]
        assert math.isclose(p.diffusion2(ti), float(p.diffusion2(t)[i]), rel_tol=1e-12)
        for fn in (p.reverse_drift, p.pf_drift):
            want = fn(score, t, x)[i : i + 1]
            torch.testing.assert_close(fn(score, ti, xi), want, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(fn(generic, ti, xi), want, rtol=1e-8, atol=1e-8)
    calls = score.calls
    p.pf_drift(score, 0.5 * (p.t0 + p.t1), x)
    assert score.calls == calls + 1  # the folded path still counts the model's evaluation


def test_float_fallback_for_processes_without_float_formulas():
    class Linear(VP):
        """A process that defines only the tensor formulas (the base class's float hooks)."""

        _coeffs_f = tn.generative.processes.DiffusionProcess._coeffs_f
        _drift_coeff_f = tn.generative.processes.DiffusionProcess._drift_coeff_f
        _g2_f = tn.generative.processes.DiffusionProcess._g2_f

    p, q = Linear(), VP()
    x = torch.randn(3, 2, dtype=D)
    for t in (0.3, 1, np.float32(0.7)):  # float, int, numpy scalar
        a, s = p.marginal(t)
        assert isinstance(a, float) and math.isclose(a, q.marginal(t)[0], rel_tol=1e-14)
        assert math.isclose(s, q.marginal(t)[1], rel_tol=1e-14)
        assert math.isclose(p.diffusion(t), q.diffusion(t), rel_tol=1e-14)
        torch.testing.assert_close(p.drift(t, x), q.drift(t, x), rtol=1e-14, atol=0)
    with pytest.raises(TypeError, match="a time must be"):
        p.marginal("0.5")
