"""Samplers of torchnde.generative against the analytic oracles (exact scores of Gaussian and
Gaussian-mixture data): the samples converge to the marginal p_{t0} as the NFE grows."""

import math

import pytest
import torch

from gen_oracles import GAUSS, MC_TOL, MIX, PROCS, N
from gen_oracles import gauss_error as _gauss_error
from gen_oracles import start as _start
from torchnde.generative.metrics import wasserstein2 as _w2
from torchnde.generative.parameterisation import KINDS
from torchnde.generative.processes import EDM, VP, MeanReverting
from torchnde.generative.samplers import SAMPLERS, sample

D = torch.float64


@pytest.mark.parametrize("sampler", ["euler_maruyama", "pf_euler", "pf_heun"])
@pytest.mark.parametrize("name", PROCS)
def test_fixed_step_samplers_converge_on_gaussian_data(name, sampler):
    p = PROCS[name]()
    xT = _start(GAUSS, p, N)
    errs = []
    # Euler on VE's probability flow converges slowly on the uniform-t grid (sigma is geometric in t)
    for nfe in (6, 800 if (name, sampler) == ("ve", "pf_euler") else 200):
        out = sample(GAUSS.score_fn(p), p, xT.shape, nfe=nfe, sampler=sampler, seed=0, x_init=xT)
        assert out.nfe <= nfe
        errs.append(_gauss_error(out.x, p))
    assert errs[1] < errs[0]
    assert errs[1] < MC_TOL, errs


@pytest.mark.parametrize("name", PROCS)
def test_adaptive_probability_flow(name):
    p = PROCS[name]()
    xT = _start(GAUSS, p, N)
    out = sample(GAUSS.score_fn(p), p, xT.shape, sampler="pf_adaptive", rtol=1e-5, atol=1e-5, x_init=xT)
    assert _gauss_error(out.x, p) < MC_TOL
    # NFE as counted on the model equals the solver's count (Tsit5: 6 per step + the first)
    assert out.nfe == out.solution.stats["nfe"] > 6
    # the probability-flow map is deterministic: the same start gives the same samples
    again = sample(GAUSS.score_fn(p), p, xT.shape, sampler="pf_adaptive", rtol=1e-5, atol=1e-5, x_init=xT)
    torch.testing.assert_close(again.x, out.x, rtol=0, atol=0)


def test_adaptive_per_sample_matches_shared():
    p = VP()
    xT = _start(GAUSS, p, 64)
    a = sample(GAUSS.score_fn(p), p, xT.shape, sampler="pf_adaptive", rtol=1e-7, atol=1e-7, x_init=xT)
    b = sample(GAUSS.score_fn(p), p, xT.shape, sampler="pf_adaptive", rtol=1e-7, atol=1e-7, x_init=xT, per_sample=True)
    torch.testing.assert_close(a.x, b.x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_predictor_corrector(name):
    p = PROCS[name]()
    xT = _start(GAUSS, p, N)
    errs = [
        _gauss_error(sample(GAUSS.score_fn(p), p, xT.shape, nfe=nfe, sampler="pc", seed=0, x_init=xT).x, p)
        for nfe in (8, 200)
    ]
    assert errs[1] < errs[0] and errs[1] < MC_TOL, errs


@pytest.mark.parametrize(("name", "sampler"), [("vp", "euler_maruyama"), ("edm", "pf_heun")])
def test_samplers_converge_on_a_gaussian_mixture(name, sampler):
    """Mode weights (binomial test), the mean exact log-density and exact W2 against an
    independent draw of p_{t0}."""
    p = PROCS[name]()
    n = 1500
    xT = _start(MIX, p, n)
    ref = MIX.marginal_sample(p, p.t0, n, generator=torch.Generator().manual_seed(7))
    ref2 = MIX.marginal_sample(p, p.t0, n, generator=torch.Generator().manual_seed(8))
    floor = _w2(ref, ref2)  # W2 between two exact draws: the Monte-Carlo floor
    w2s = []
    for nfe in (5, 101):
        x = sample(MIX.score_fn(p), p, xT.shape, nfe=nfe, sampler=sampler, seed=0, x_init=xT).x
        w2s.append(_w2(x, ref))
    assert w2s[1] < w2s[0] and w2s[1] < 1.5 * floor, (w2s, floor)
    frac = float((x[:, 0] > 0).double().mean())
    assert abs(frac - 0.7) < 5 * math.sqrt(0.7 * 0.3 / n)
    lp, lp_ref = MIX.log_prob(p, p.t0, x), MIX.log_prob(p, p.t0, ref)
    assert abs(lp.mean() - lp_ref.mean()) < 5 * math.sqrt((lp.var() + lp_ref.var()) / n)


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameterisation_gives_the_same_samples(kind):
    p = VP()
    xT = _start(MIX, p, 256)
    ref = sample(MIX.score_fn(p), p, xT.shape, nfe=20, sampler="pf_heun", x_init=xT).x
    out = sample(MIX.model(p, kind), p, xT.shape, nfe=20, sampler="pf_heun", x_init=xT, parameterisation=kind).x
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    sde = sample(MIX.model(p, kind), p, xT.shape, nfe=20, seed=3, x_init=xT, parameterisation=kind).x
    sde_ref = sample(MIX.score_fn(p), p, xT.shape, nfe=20, seed=3, x_init=xT).x
    torch.testing.assert_close(sde, sde_ref, rtol=1e-9, atol=1e-9)


def test_from_the_prior_float32_and_seeds():
    p = VP()
    a = sample(GAUSS.score_fn(p), p, (N, 2), nfe=200, seed=5)
    assert a.x.dtype == torch.float32 and _gauss_error(a.x.double(), p) < MC_TOL
    b = sample(GAUSS.score_fn(p), p, (N, 2), nfe=200, seed=5)
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    c = sample(GAUSS.score_fn(p), p, (8, 2), nfe=10, seed=6)
    assert not torch.equal(a.x[:8], c.x)


def test_mean_reverting_restoration():
    """Per-sample means mu (the "degraded inputs"): the reverse process of the OU towards mu
    recovers the data's marginal at t0, whose mean still carries (1 - alpha(t0)) mu."""
    mu = torch.tensor([[3.0, -2.0]], dtype=D).expand(N, 2)
    p = MeanReverting(theta=4.0, mean=mu, sigma=1.0)
    xT = _start(GAUSS, p, N)
    for sampler in ("euler_maruyama", "pf_heun"):
        out = sample(GAUSS.score_fn(p), p, xT.shape, nfe=200, sampler=sampler, seed=0, x_init=xT)
        a, s = p.marginal(p.t0)
        mean = a * GAUSS.mean + (1 - a) * mu[0]
        cov = a * a * GAUSS.cov + s * s * torch.eye(2, dtype=D)
        err = float(((out.x.mean(0) - mean).norm() + (torch.cov(out.x.T) - cov).norm()) / cov.norm())
        assert err < MC_TOL


def test_callback_and_custom_grid():
    p = EDM()
    xT = _start(GAUSS, p, 16)
    calls = []
    grid = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.002], dtype=D)
    out = sample(
        GAUSS.score_fn(p), p, xT.shape, sampler="pf_euler", times=grid, x_init=xT, callback=lambda *a: calls.append(a)
    )
    assert [i for i, _, _ in calls] == [0, 1, 2, 3]
    assert [t for _, t, _ in calls] == pytest.approx(grid[1:].tolist())
    torch.testing.assert_close(calls[-1][2], out.x)
    assert out.nfe == 4  # Euler: one evaluation per step


def test_errors():
    p = VP()
    f = GAUSS.score_fn(p)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(f, p, (4, 2), nfe=4, sampler="ddim")
    with pytest.raises(ValueError, match="needs nfe"):
        sample(f, p, (4, 2))
    with pytest.raises(ValueError, match="nfe must be"):
        sample(f, p, (4, 2), nfe=0)
    with pytest.raises(ValueError, match="too small"):
        sample(f, p, (4, 2), nfe=1, sampler="pf_heun")
    with pytest.raises(ValueError, match="unknown parameterisation"):
        sample(f, p, (4, 2), nfe=4, parameterisation="noise")
    assert set(SAMPLERS) == {"euler_maruyama", "pc", "pf_euler", "pf_heun", "pf_adaptive"}


@pytest.mark.parametrize("nfe", [1, 2, 7, 20])
@pytest.mark.parametrize("sampler", ["pf_euler", "pf_heun", "euler_maruyama"])
def test_fixed_step_samplers_spend_exactly_their_budget(sampler, nfe):
    """Euler makes one evaluation a step and Heun two, with none at the start or the end."""
    p = VP()
    if sampler == "pf_heun" and nfe < 2:
        return
    out = sample(GAUSS.score_fn(p), p, (8, 2), nfe=nfe, sampler=sampler, seed=0, dtype=D)
    steps = nfe // 2 if sampler == "pf_heun" else nfe
    assert out.num_steps == steps
    assert out.nfe == out.solution.stats["nfe"] == steps * (2 if sampler == "pf_heun" else 1)
    if sampler == "pf_euler":
        assert sample(GAUSS.score_fn(p), p, (8, 2), nfe=20, sampler="pf_euler", seed=0, dtype=D).nfe == 20
    # with a callback (every step saved) the count is the same
    calls = []
    again = sample(
        GAUSS.score_fn(p), p, (8, 2), nfe=nfe, sampler=sampler, seed=0, dtype=D, callback=lambda *a: calls.append(a)
    )
    assert again.nfe == out.nfe and len(calls) == steps
    torch.testing.assert_close(again.x, out.x, rtol=0, atol=0)


def test_pf_euler_matches_a_hand_written_loop():
    """The float fast paths of the process coefficients and the lazy first stage leave the result
    that of the textbook Euler loop on the probability flow (to float64 rounding)."""
    p = VP()
    score = GAUSS.score_fn(p)
    xT = _start(GAUSS, p, 64)
    out = sample(score, p, xT.shape, nfe=30, sampler="pf_euler", x_init=xT)
    ts = p.times(30).tolist()
    x = xT
    for t, t1 in zip(ts[:-1], ts[1:]):
        beta = p.beta_min + (p.beta_max - p.beta_min) * t
        x = x + (t1 - t) * (-0.5 * beta * x - 0.5 * beta * score(t, x))
    torch.testing.assert_close(out.x, x, rtol=1e-12, atol=1e-12)


def test_a_dpm_solver_passed_to_a_dpm_preset_must_read_the_model_output():
    from torchnde.generative.fast_samplers import DPMSolver

    p = VP()
    with pytest.raises(ValueError, match="term_kind='eps'"):
        sample(GAUSS.model(p, "eps"), p, (8, 2), nfe=10, sampler="dpm_2m", parameterisation="eps",
               solver=DPMSolver(p, 2, multistep=True))  # fmt: skip
    out = sample(GAUSS.model(p, "eps"), p, (8, 2), nfe=10, sampler="dpm_2m", parameterisation="eps",
                 solver=DPMSolver(p, 2, multistep=True, term_kind="eps", num_steps=10))  # fmt: skip
    assert out.nfe == 10 and torch.isfinite(out.x).all()


def test_sampler_fast_paths_equal_the_general_steps(monkeypatch):
    """The presets' direct steps (Euler / Euler-Maruyama on the sampler's own terms, DPMSolver and
    EDMHeun calling the field at real times, cached coefficients and time tensors) give the
    samples of the general steps bit for bit."""
    from torchnde import Euler
    from torchnde.generative import fast_samplers

    p, e = VP(), EDM()
    kw = dict(parameterisation="eps", seed=3, dtype=torch.float32)
    for sampler in ("pf_euler", "euler_maruyama"):
        a = sample(GAUSS.model(p, "eps"), p, (16, 2), nfe=12, sampler=sampler, **kw)
        b = sample(GAUSS.model(p, "eps"), p, (16, 2), nfe=12, sampler=sampler, solver=Euler(), **kw)
        assert a.nfe == b.nfe == 12
        torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    cases = [("dpmpp_2m", p), ("dpm_3s", p), ("edm_heun", e), ("edm_heun_sde", e)]
    fast = [sample(GAUSS.model(q, "eps"), q, (16, 2), nfe=12, sampler=s, **kw) for s, q in cases]
    monkeypatch.setattr(fast_samplers, "_direct_vf", lambda term: None)
    for (s, q), a in zip(cases, fast):
        b = sample(GAUSS.model(q, "eps"), q, (16, 2), nfe=12, sampler=s, **kw)
        assert a.nfe == b.nfe
        torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)


def test_a_model_may_write_into_its_time_tensor():
    """The grid's time tensors are made once per sampling call; a model that writes into one
    (here after reading it) does not change the times later calls receive."""
    p = EDM()
    model = GAUSS.model(p, "eps")
    seen = []

    def writer(t, x):
        seen.append(float(t[0]))
        out = model(t.clone(), x)
        t.zero_()
        return out

    a = sample(model, p, (8, 2), nfe=9, sampler="edm_heun", parameterisation="eps", seed=0)
    b = sample(writer, p, (8, 2), nfe=9, sampler="edm_heun", parameterisation="eps", seed=0)
    assert 0.0 not in seen and len(seen) == 9
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
