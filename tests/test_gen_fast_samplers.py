"""DPM-Solver / DPM-Solver++, EDM Heun and the adaptive SDE sampler against the analytic oracles
(exact scores of Gaussian and Gaussian-mixture data)."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import torchnde as tn
from torchnde.generative.fast_samplers import DPM_SAMPLERS, FAST_SAMPLERS, DPMSolver, EDMHeun, logsnr, logsnr_times
from torchnde.generative.oracles import GaussianData, GaussianMixtureData
from torchnde.generative.parameterisation import KINDS
from torchnde.generative.processes import EDM, VE, VP, MeanReverting, SubVP
from torchnde.generative.samplers import ALL_SAMPLERS, _fixed_grid, sample
from torchnde.paths import VirtualBrownianTree

D = torch.float64
PROCS = {"vp": VP, "ve": VE, "subvp": SubVP, "edm": EDM}
GAUSS = GaussianData([1.0, -0.5], [[1.0, 0.3], [0.3, 0.5]])
MIX = GaussianMixtureData([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [[0.5, 0.3], [0.4, 0.6]])
N = 4000
MC_TOL = 0.08  # as in test_gen_samplers: the Monte-Carlo error of the relative error is ~0.03


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _start(oracle, p, n, seed=1):
    return oracle.marginal_sample(p, p.t1, n, generator=torch.Generator().manual_seed(seed))


def _gauss_error(x, p):
    mean, cov = GAUSS.marginal_moments(p, p.t0)
    return float(((x.mean(0) - mean).norm() + (torch.cov(x.T) - cov).norm()) / cov.norm())


def _w2(a, b):
    c = torch.cdist(a, b).pow(2).numpy()
    r, k = linear_sum_assignment(c)
    return float(np.sqrt(c[r, k].mean()))


def _exact_flow(p, xT):
    """The exact probability-flow map p_{t1} -> p_{t0} for Gaussian data: in the covariance's
    eigenbasis every coordinate keeps its z-score."""
    m1, _ = GAUSS.marginal_moments(p, p.t1)
    m0, _ = GAUSS.marginal_moments(p, p.t0)
    (a1, s1), (a0, s0) = p.marginal(p.t1), p.marginal(p.t0)
    lam1, lam0 = a1 * a1 * GAUSS.eigvals + s1 * s1, a0 * a0 * GAUSS.eigvals + s0 * s0
    U = GAUSS.eigvecs
    return (((xT - m1) @ U) * (lam0 / lam1).sqrt()) @ U.T + m0


NEW = [s for s in FAST_SAMPLERS if s != "sde_adaptive"]


@pytest.mark.parametrize("name", PROCS)
def test_every_new_sampler_converges_on_gaussian_data(name):
    p = PROCS[name]()
    xT = _start(GAUSS, p, N)
    for sampler in NEW:
        errs = []
        for nfe in (6, 200):
            out = sample(GAUSS.score_fn(p), p, xT.shape, nfe=nfe, sampler=sampler, seed=0, x_init=xT)
            assert out.nfe <= nfe
            errs.append(_gauss_error(out.x, p))
        assert errs[1] < MC_TOL and errs[1] <= errs[0] + 0.01, (sampler, errs)


def _mixture_reference(p, xT):
    return sample(MIX.score_fn(p), p, xT.shape, sampler="pf_adaptive", rtol=1e-10, atol=1e-10, x_init=xT).x


def _path_error(p, xT, ref, sampler, nfe):
    x = sample(MIX.score_fn(p), p, xT.shape, nfe=nfe, sampler=sampler, x_init=xT).x
    return float((x - ref).norm(dim=-1).mean())


@pytest.mark.parametrize("name", ["vp", "edm"])
def test_dpm_solver_orders_on_a_gaussian_mixture(name):
    """Distance to the exact probability-flow map (a 1e-10 adaptive solve): every DPM-Solver of
    order 2/3 beats PF-Euler at 20 NFE (but one, see below), and its error falls at its order from 40 to 80 NFE
    (measured on VP: 1.8-2.0 for order 2, 2.6-3.9 for order 3; PF-Euler 1.0)."""
    p = PROCS[name]()
    xT = _start(MIX, p, 300)
    ref = _mixture_reference(p, xT)
    euler = [_path_error(p, xT, ref, "pf_euler", nfe) for nfe in (20, 40, 80)]
    for sampler, (order, _, _) in DPM_SAMPLERS.items():
        if order == 1:
            continue
        e = [_path_error(p, xT, ref, sampler, nfe) for nfe in (20, 40, 80)]
        # singlestep order 3 has only 6 steps at 20 NFE: on VP it loses there (0.058 vs 0.044)
        # and wins from 40 NFE on (0.0047 vs 0.017)
        k = 1 if sampler.endswith("3s") and name == "vp" else 0
        assert e[k] < euler[k], (sampler, e, euler)
        assert math.log2(e[1] / e[2]) > order - 0.6, (sampler, e)
        assert e[2] < euler[2] / 3
    assert math.log2(euler[1] / euler[2]) < 1.3


def test_dpm_solver_at_20_nfe_vs_euler_maruyama_at_1000():
    """The issue's "DPM-Solver at 20 NFE within 10% of the W2 of Euler-Maruyama at 1000 steps".

    Measured W2 (n = 2000 against an exact draw of p_{t0}, VP, 5 seeds) is dominated by the
    Monte-Carlo error of the estimator: the ratio DPM-Solver++(2M)@20 / EM@1000 ranged over
    0.6-2.1 (and PF-Euler@20's over 0.5-1.9), so "within 10%" of one W2 draw is not a robust
    assertion. What is robust: the W2 between DPM-Solver's law and p_{t0} is at most the RMS
    distance of its samples to the exact probability-flow map of the same starts; measured
    0.036 (dpm_3m), 0.045 (dpmpp_2m), 0.055 (dpmpp_3m), 0.10 (dpm_2m) against PF-Euler's 0.136
    and a W2 Monte-Carlo floor of 0.29 (two exact draws of 1500 points): the discretisation
    stays well inside the floor, and the measured W2s of DPM@20 and EM@1000 agree within it."""
    p = VP()
    n = 1500
    xT = _start(MIX, p, n)
    ref = MIX.marginal_sample(p, p.t0, n, generator=torch.Generator().manual_seed(7))
    floor = _w2(ref, MIX.marginal_sample(p, p.t0, n, generator=torch.Generator().manual_seed(8)))
    exact = _mixture_reference(p, xT)
    em = _w2(sample(MIX.score_fn(p), p, xT.shape, nfe=1000, seed=0, x_init=xT).x, ref)
    for sampler in ("dpm_2m", "dpm_3m", "dpmpp_2m", "dpmpp_3m"):
        x = sample(MIX.score_fn(p), p, xT.shape, nfe=20, sampler=sampler, x_init=xT).x
        bound = float((x - exact).pow(2).sum(-1).mean().sqrt())  # >= W2(law of x, p_{t0})
        assert bound < 0.4 * floor, (sampler, bound, floor)
        assert abs(_w2(x, ref) - em) < floor, (sampler, em)


def test_edm_heun_is_second_order_on_gaussian_data():
    p = EDM()
    xT = _start(GAUSS, p, 200)
    ref = _exact_flow(p, xT)
    errs = []
    for nfe in (40, 80, 160):
        x = sample(GAUSS.score_fn(p), p, xT.shape, nfe=nfe, sampler="edm_heun", x_init=xT).x
        errs.append(float((x - ref).norm(dim=-1).mean()))
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(1.8 < o < 2.4 for o in orders), (errs, orders)
    # Karras et al.'s deterministic sampler is Heun on the PF ODE: the same as pf_heun's steps
    sol = tn.solve(
        p.probability_flow(GAUSS.score_fn(p)),
        tn.Heun(),
        p.t1,
        p.t0,
        xT,
        dt0=p.t0 - p.t1,
        controller=_fixed_grid(p.times(20)),
    )
    x = sample(GAUSS.score_fn(p), p, xT.shape, nfe=40, sampler="edm_heun", x_init=xT).x
    torch.testing.assert_close(x, sol.ys[-1], rtol=1e-12, atol=1e-12)


def test_edm_heun_stochastic_converges_on_a_mixture():
    """Algorithm 2 (churn) with the exact score: W2 to p_{t0} falls to the Monte-Carlo floor,
    mode weights pass a binomial test; the churn noise is seeded."""
    p = EDM()
    n = 1500
    xT = _start(MIX, p, n)
    ref = MIX.marginal_sample(p, p.t0, n, generator=torch.Generator().manual_seed(7))
    floor = _w2(ref, MIX.marginal_sample(p, p.t0, n, generator=torch.Generator().manual_seed(8)))
    kw = dict(sampler="edm_heun_sde", x_init=xT, s_churn=20.0, s_tmin=0.01, s_tmax=50.0)
    w2s = [_w2(sample(MIX.score_fn(p), p, xT.shape, nfe=nfe, seed=2, **kw).x, ref) for nfe in (8, 200)]
    assert w2s[1] < w2s[0] and w2s[1] < 1.5 * floor, (w2s, floor)
    x = sample(MIX.score_fn(p), p, xT.shape, nfe=200, seed=2, **kw).x
    frac = float((x[:, 0] > 0).double().mean())
    assert abs(frac - 0.7) < 5 * math.sqrt(0.21 / n)
    again = sample(MIX.score_fn(p), p, xT.shape, nfe=40, seed=2, **kw).x
    other = sample(MIX.score_fn(p), p, xT.shape, nfe=40, seed=3, **kw).x
    torch.testing.assert_close(again, sample(MIX.score_fn(p), p, xT.shape, nfe=40, seed=2, **kw).x, rtol=0, atol=0)
    assert not torch.equal(again, other)
    det = sample(MIX.score_fn(p), p, xT.shape, nfe=40, sampler="edm_heun", x_init=xT).x
    assert not torch.equal(again, det)


def test_adaptive_sde_sampler_converges_pathwise():
    """SPaRK + PIDController on a VirtualBrownianTree: rejected steps re-query the same path, so
    the samples converge to the SDE's solution on that path (here an SRA1 solve with 2000 fixed
    steps on the same tree) as the tolerance tightens. Measured (VP, mixture, n = 100):
    tolerance 1e-1/1e-2/1e-3 -> NFE ~45/170/780, error ~0.07/0.02/0.01."""
    p = VP()
    xT = _start(MIX, p, 100)
    path = VirtualBrownianTree(p.t0, p.t1, xT.shape, seed=3, levy_area="space-time", dtype=D)
    terms = p.reverse_sde(MIX.score_fn(p), xT.shape, path=path)
    ref = tn.solve(terms, tn.SRA1(), p.t1, p.t0, xT, dt0=-(p.t1 - p.t0) / 2000, max_steps=2100).ys[-1]
    errs, nfes, rejected = [], [], 0
    for tol in (1e-1, 1e-2, 1e-3):
        out = sample(MIX.score_fn(p), p, xT.shape, sampler="sde_adaptive", rtol=tol, atol=tol, seed=3, x_init=xT)
        errs.append(float((out.x - ref).norm(dim=-1).mean()))
        nfes.append(out.nfe)
        rejected += int(out.solution.stats["num_rejected"])
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.03, errs
    assert nfes[0] < nfes[1] < nfes[2] and rejected > 0
    # and the law: exact mixture log-density of the samples vs of exact draws
    out = sample(MIX.score_fn(p), p, (1500, 2), sampler="sde_adaptive", rtol=1e-2, atol=1e-2, seed=4, dtype=D)
    ref = MIX.marginal_sample(p, p.t0, 1500, generator=torch.Generator().manual_seed(7))
    lp, lp_ref = MIX.log_prob(p, p.t0, out.x), MIX.log_prob(p, p.t0, ref)
    assert abs(lp.mean() - lp_ref.mean()) < 5 * math.sqrt((lp.var() + lp_ref.var()) / 1500)


@pytest.mark.parametrize("kind", KINDS)
def test_dpm_solver_with_every_parameterisation(kind):
    p = VP()
    xT = _start(MIX, p, 128)
    for sampler in ("dpm_2s", "dpmpp_3m"):
        ref = sample(MIX.score_fn(p), p, xT.shape, nfe=12, sampler=sampler, x_init=xT).x
        out = sample(MIX.model(p, kind), p, xT.shape, nfe=12, sampler=sampler, x_init=xT, parameterisation=kind).x
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", PROCS)
def test_dpm_solver_on_the_probability_flow_term(name):
    """The solver is a drop-in for Euler on the PF-ODE term (it converts the velocity)."""
    p = PROCS[name]()
    xT = _start(MIX, p, 64)
    grid = p.times(10) if name == "edm" else logsnr_times(p, 10)
    for order, multistep in ((2, False), (3, True)):
        for prediction in ("x0", "eps"):
            ref = sample(
                MIX.score_fn(p),
                p,
                xT.shape,
                times=grid,
                x_init=xT,
                sampler=f"dpm{'pp' if prediction == 'x0' else ''}_{order}{'m' if multistep else 's'}",
            ).x
            solver = DPMSolver(p, order, multistep=multistep, prediction=prediction)
            sol = tn.solve(
                p.probability_flow(MIX.score_fn(p)),
                solver,
                p.t1,
                p.t0,
                xT,
                dt0=p.t0 - p.t1,
                controller=_fixed_grid(grid),
            )
            torch.testing.assert_close(sol.ys[-1], ref, rtol=1e-8, atol=1e-8)
            assert sol.stats["nfe"] == (10 if multistep else 20)


def test_mean_reverting_and_float32():
    mu = torch.tensor([[3.0, -2.0]], dtype=D).expand(N, 2)
    p = MeanReverting(theta=4.0, mean=mu, sigma=1.0)
    xT = _start(GAUSS, p, N)
    a, s = p.marginal(p.t0)
    mean = a * GAUSS.mean + (1 - a) * mu[0]
    cov = a * a * GAUSS.cov + s * s * torch.eye(2, dtype=D)
    for sampler in ("dpmpp_2m", "dpm_3s"):
        x = sample(GAUSS.score_fn(p), p, xT.shape, nfe=60, sampler=sampler, x_init=xT).x
        err = float(((x.mean(0) - mean).norm() + (torch.cov(x.T) - cov).norm()) / cov.norm())
        assert err < MC_TOL
    q = VP()
    x = sample(GAUSS.score_fn(q), q, (N, 2), nfe=20, sampler="dpmpp_2m", seed=5)
    assert x.x.dtype == torch.float32 and _gauss_error(x.x.double(), q) < MC_TOL


def test_logsnr_grid_and_errors():
    for p in (VP(), SubVP(), VE(), EDM(), MeanReverting()):
        ts = logsnr_times(p, 8)
        lam = torch.tensor([logsnr(p, float(t)) for t in ts], dtype=D)
        torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(8), rtol=1e-6, atol=1e-6)
    assert set(FAST_SAMPLERS) <= set(ALL_SAMPLERS)
    with pytest.raises(ValueError, match="order must be"):
        DPMSolver(VP(), 4)
    with pytest.raises(ValueError, match="prediction must be"):
        DPMSolver(VP(), prediction="v")
    with pytest.raises(ValueError, match="needs num_steps"):
        EDMHeun(EDM(), s_churn=1.0)
    with pytest.raises(ValueError, match="too small"):
        sample(GAUSS.score_fn(VP()), VP(), (4, 2), nfe=2, sampler="dpm_3s")
    with pytest.raises(NotImplementedError, match="per_sample"):
        sample(GAUSS.score_fn(VP()), VP(), (4, 2), nfe=4, sampler="dpm_2m", per_sample=True)
