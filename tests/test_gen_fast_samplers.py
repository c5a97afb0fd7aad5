"""DPM-Solver / DPM-Solver++, EDM Heun and the adaptive SDE sampler against the analytic oracles
(exact scores of Gaussian and Gaussian-mixture data)."""

import math

import pytest
import torch

import torchnde as tn
from gen_oracles import GAUSS, MC_TOL, MIX, PROCS, N
from gen_oracles import gauss_error as _gauss_error
from gen_oracles import start as _start
from torchnde.generative.fast_samplers import (
    DPM_SAMPLERS,
    FAST_SAMPLERS,
    LOWER_ORDER_FINAL_STEPS,
    DPMSolver,
    EDMHeun,
    dpm_orders,
    dpm_steps,
    edm_heun_steps,
    logsnr,
    logsnr_times,
    multistep_orders,
    singlestep_orders,
)
from torchnde.generative.metrics import wasserstein2 as _w2
from torchnde.generative.parameterisation import KINDS
from torchnde.generative.processes import EDM, VE, VP, MeanReverting, SubVP
from torchnde.generative.samplers import ALL_SAMPLERS, sample
from torchnde.paths import VirtualBrownianTree

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


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


def _dpm(p, sampler, xT, nfe=None, *, orders=None, steps=None, model=None, **kw):
    """A DPM preset as ``sample`` runs it (grid uniform in log-SNR, Karras's on EDM; the model's
    eps, converted by the solver), without ``sample``'s choice of steps: the budget's schedule
    (``dpm_orders``) by default, else ``orders`` or ``steps`` steps of the preset's order.
    Returns (final state, number of evaluations, solution)."""
    order, multistep, prediction = DPM_SAMPLERS[sampler]
    if nfe is not None:
        orders = dpm_orders(sampler, nfe, **kw)
        kw = {}
    n = len(orders) if orders is not None else steps
    grid = p.times(n) if isinstance(p, EDM) else logsnr_times(p, n)
    f = model or MIX.model(p, "eps")
    calls = [0]

    def vf(t, x, args=None):
        calls[0] += 1
        return f(t, x)

    solver = DPMSolver(p, order, multistep=multistep, prediction=prediction, term_kind="eps", orders=orders, **kw)
    sol = tn.solve(
        tn.ODETerm(vf),
        solver,
        p.t1,
        p.t0,
        xT,
        dt0=p.t0 - p.t1,
        controller=tn.StepTo(grid),
        saveat=tn.SaveAt(steps=True),
    )
    return sol.ys[-1], calls[0], sol


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
    for sampler, (order, multistep, _) in DPM_SAMPLERS.items():
        if order == 1:
            continue
        # the solver's order: every step of the preset's order (the budget schedules of
        # ``sample`` end singlestep grids with a step of order 1 or 2)
        e = [
            float((_dpm(p, sampler, xT, steps=nfe if multistep else nfe // order)[0] - ref).norm(dim=-1).mean())
            for nfe in (20, 40, 80)
        ]
        # singlestep order 3 has only 6 steps at 20 NFE: on VP it loses there (0.058 vs 0.044)
        # and wins from 40 NFE on (0.0047 vs 0.017)
        k = 1 if sampler.endswith("3s") and name == "vp" else 0
        assert e[k] < euler[k], (sampler, e, euler)
        assert math.log2(e[1] / e[2]) > order - 0.6, (sampler, e)
        assert e[2] < euler[2] / 3
    assert math.log2(euler[1] / euler[2]) < 1.3


def test_budget_schedules():
    """Lu et al. 2022a's singlestep schedule ("DPM-Solver-fast") and the multistep orders."""
    assert singlestep_orders(3, 5) == (3, 2) and singlestep_orders(3, 6) == (3, 2, 1)
    assert singlestep_orders(3, 7) == (3, 3, 1) and singlestep_orders(3, 1) == (1,)
    assert singlestep_orders(3, 2) == (2,) and singlestep_orders(3, 3) == (2, 1)
    assert singlestep_orders(2, 5) == (2, 2, 1) and singlestep_orders(2, 6) == (2, 2, 2)
    assert multistep_orders(3, 6) == (1, 2, 3, 3, 2, 1) and multistep_orders(2, 3) == (1, 2, 1)
    assert multistep_orders(3, 6, lower_order_final=False) == (1, 2, 3, 3, 3, 3)
    n = LOWER_ORDER_FINAL_STEPS
    assert multistep_orders(3, n) == multistep_orders(3, n, lower_order_final=False) == (1, 2) + (3,) * (n - 2)
    for sampler, (order, multistep, _) in DPM_SAMPLERS.items():
        for nfe in range(1, 41):
            orders = dpm_orders(sampler, nfe)
            assert sum(orders) == nfe if not multistep else len(orders) == nfe
            assert len(orders) == dpm_steps(sampler, nfe) and max(orders) <= order
        assert dpm_steps(sampler, 0) == 0
    with pytest.raises(ValueError, match="unknown DPM-Solver preset"):
        dpm_steps("dpm_4s", 10)


@pytest.mark.parametrize("name", ["vp", "edm"])
def test_every_dpm_preset_spends_its_budget(name):
    """NFE = budget for every preset at 5 ... 20, on the grid of ``dpm_steps`` steps."""
    p = PROCS[name]()
    xT = _start(MIX, p, 16)
    for sampler in DPM_SAMPLERS:
        for nfe in range(5, 21):
            x, calls, sol = _dpm(p, sampler, xT, nfe)
            assert calls == nfe == sol.stats["nfe"], (sampler, nfe, calls)
            assert sol.stats["num_steps"] == dpm_steps(sampler, nfe) and torch.isfinite(x).all()


def test_sample_spends_the_whole_dpm_budget():
    """Through ``sample`` (which takes its steps from ``dpm_steps`` and the solver's orders from
    ``dpm_orders``): the same results as the solver on its own, NFE = budget."""
    p = VP()
    xT = _start(MIX, p, 16)
    for sampler in DPM_SAMPLERS:
        for nfe in range(5, 21):
            out = sample(MIX.score_fn(p), p, xT.shape, nfe=nfe, sampler=sampler, x_init=xT)
            assert out.nfe == nfe and out.num_steps == dpm_steps(sampler, nfe), (sampler, nfe, out.nfe)
            torch.testing.assert_close(out.x, _dpm(p, sampler, xT, nfe)[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["vp", "edm"])
def test_dpm_presets_at_small_budgets(name):
    """RMS distance to the exact flow map (mixture, n = 300) at 5 and 10 NFE. Measured, VP / EDM:
    at 5 NFE dpm_1 0.636 / 0.619, the worst preset 1.055 (dpm_2s) / 0.842 (dpmpp_3s); at 10 NFE
    dpm_1 0.292 / 0.311, the worst 0.316 (dpm_2s) / 0.518 (dpm_3s): no preset is worse than
    first order by more than a factor 1.7 (was: dpm_3s at 5 NFE made one third-order step, 3
    NFE, error 52 / 28). Lower orders in the last steps (Lu et al. 2022b) at 5 NFE: dpmpp_2m
    0.477 -> 0.250 / 1.737 -> 0.704, dpmpp_3m 0.839 -> 0.513 / 3.571 -> 0.836 (on the
    noise-prediction dpm_2m/3m it is neutral: 0.322 -> 0.319, 0.168 -> 0.230 / 0.344 -> 0.361,
    0.387 -> 0.314)."""
    p = PROCS[name]()
    xT = _start(MIX, p, 300)
    ref = _mixture_reference(p, xT)

    def rms(x):
        return float((x - ref).pow(2).sum(-1).mean().sqrt())

    for nfe in (5, 10):
        first = rms(_dpm(p, "dpm_1", xT, nfe)[0])
        for sampler in DPM_SAMPLERS:
            x, calls, _ = _dpm(p, sampler, xT, nfe)
            assert calls == nfe and torch.isfinite(x).all()
            assert rms(x) < 2 * first, (sampler, nfe, rms(x), first)
    assert rms(_dpm(p, "dpm_3s", xT, orders=[3])[0]) > 10  # the old schedule at budget 5
    for sampler in ("dpmpp_2m", "dpmpp_3m"):
        off = rms(_dpm(p, sampler, xT, 5, lower_order_final=False)[0])
        assert rms(_dpm(p, sampler, xT, 5)[0]) < 0.7 * off, sampler


def test_lower_order_final_changes_only_the_last_steps():
    p = VP()
    xT = _start(MIX, p, 32)
    for sampler in ("dpm_2m", "dpm_3m", "dpmpp_2m", "dpmpp_3m"):
        order = DPM_SAMPLERS[sampler][0]
        for n in (5, 12):
            on = _dpm(p, sampler, xT, n)[2].ys
            off = _dpm(p, sampler, xT, n, lower_order_final=False)[2].ys
            k = n - (order - 1)  # the steps before the lowered ones
            torch.testing.assert_close(on[:k], off[:k], rtol=0, atol=0)
            assert not any(torch.allclose(on[i], off[i], rtol=1e-9, atol=1e-9) for i in range(k, n)), sampler
        n = LOWER_ORDER_FINAL_STEPS
        on, off = _dpm(p, sampler, xT, n)[2].ys, _dpm(p, sampler, xT, n, lower_order_final=False)[2].ys
        torch.testing.assert_close(on, off, rtol=0, atol=0)
    # num_steps on the solver gives the default orders; without it (or turned off) no lowering
    term = tn.ODETerm(lambda t, x, args=None: MIX.model(p, "eps")(t, x))

    def run(solver, n=6):
        return tn.solve(term, solver, p.t1, p.t0, xT, dt0=p.t0 - p.t1, controller=tn.StepTo(logsnr_times(p, n))).ys[-1]

    torch.testing.assert_close(run(DPMSolver(p, 3, term_kind="eps", num_steps=6)), _dpm(p, "dpmpp_3m", xT, 6)[0])
    plain = run(DPMSolver(p, 3, term_kind="eps"))
    torch.testing.assert_close(run(DPMSolver(p, 3, term_kind="eps", num_steps=6, lower_order_final=False)), plain)
    torch.testing.assert_close(_dpm(p, "dpmpp_3m", xT, 6, lower_order_final=False)[0], plain)
    with pytest.raises(ValueError, match="set up for 6 steps"):
        run(DPMSolver(p, 3, term_kind="eps", num_steps=6), n=7)
    with pytest.raises(ValueError, match="orders must be"):
        DPMSolver(p, 2, orders=[3, 2])
    with pytest.raises(ValueError, match="num_steps=4 but 2 orders"):
        DPMSolver(p, 2, orders=[2, 2], num_steps=4)


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
    # (without the final Euler step), and the final Euler step changes only the last step
    term = p.probability_flow(GAUSS.score_fn(p))
    grid = p.times(20)

    def run(solver):
        kw = dict(dt0=p.t0 - p.t1, controller=tn.StepTo(grid), saveat=tn.SaveAt(steps=True))
        return tn.solve(term, solver, p.t1, p.t0, xT, **kw)

    heun = run(tn.Heun())
    torch.testing.assert_close(run(EDMHeun(p)).ys, heun.ys, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run(EDMHeun(p, num_steps=20, final_euler=False)).ys, heun.ys, rtol=1e-12, atol=1e-12)
    last = run(EDMHeun(p, num_steps=20))  # final_euler is on by default on EDM
    assert last.stats["nfe"] == 39
    torch.testing.assert_close(last.ys[:-1], heun.ys[:-1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(last.ys[-1], heun.ys[-1], rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="set up for 20 steps"):
        tn.solve(term, EDMHeun(p, num_steps=20), p.t1, p.t0, xT, dt0=p.t0 - p.t1, controller=tn.StepTo(p.times(21)))


def test_edm_heun_final_euler_step_at_small_budgets():
    """On EDM the Heun correction of the last step, evaluated at sigma_min after a few large
    steps, ruins small budgets; Karras et al.'s final Euler step much less. RMS distance to the
    exact flow map (mixture, n = 300), measured without / with the final Euler step: 2 steps
    8.7 / 0.81, 3 steps 5.7 / 3.8, 4 steps 1.68 / 1.55, 10 steps 0.1935 / 0.1933 (no loss at
    larger budgets). The step counts of a budget: ``edm_heun_steps``."""
    p = EDM()
    xT = _start(MIX, p, 300)
    ref = _mixture_reference(p, xT)
    term = p.probability_flow(MIX.score_fn(p))
    errs = {}
    for n in (2, 3, 10):
        for final in (False, True):
            solver = EDMHeun(p, num_steps=n, final_euler=final)
            sol = tn.solve(term, solver, p.t1, p.t0, xT, dt0=p.t0 - p.t1, controller=tn.StepTo(p.times(n)))
            assert sol.stats["nfe"] == 2 * n - final
            errs[n, final] = float((sol.ys[-1] - ref).pow(2).sum(-1).mean().sqrt())
    assert errs[2, True] < errs[2, False] / 5 and errs[3, True] < 0.8 * errs[3, False], errs
    assert errs[10, True] < 1.05 * errs[10, False], errs
    assert [edm_heun_steps(p, k) for k in (0, 1, 4, 5, 6)] == [0, 1, 2, 3, 3]
    assert [edm_heun_steps(VP(), k) for k in (1, 4, 5)] == [0, 2, 2]
    assert edm_heun_steps(VP(), 5, final_euler=True) == 3
    assert not EDMHeun(VP(), num_steps=3).final_euler and not EDMHeun(p).final_euler
    with pytest.raises(ValueError, match="needs num_steps"):
        EDMHeun(p, final_euler=True)


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
    n = LOWER_ORDER_FINAL_STEPS  # no lower-order final steps: the same with and without num_steps
    grid = p.times(n) if name == "edm" else logsnr_times(p, n)
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
                controller=tn.StepTo(grid),
            )
            torch.testing.assert_close(sol.ys[-1], ref, rtol=1e-8, atol=1e-8)
            assert sol.stats["nfe"] == (n if multistep else 2 * n)


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
        sample(GAUSS.score_fn(VP()), VP(), (4, 2), nfe=1, sampler="edm_heun")
    with pytest.raises(NotImplementedError, match="per_sample"):
        sample(GAUSS.score_fn(VP()), VP(), (4, 2), nfe=4, sampler="dpm_2m", per_sample=True)
