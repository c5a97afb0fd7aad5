"""The seed papers' samplers against the analytic oracles: MRS on the mean-reverting SDE, BDIA's
exact inversion and the Time-Shift Sampler."""

import pytest
import torch

from gen_oracles import GAUSS, MC_TOL, gauss_error
from torchnde.generative.bdia import BDIASolver, bdia_invert, bdia_sample
from torchnde.generative.metrics import wasserstein2
from torchnde.generative.mrs import MRS_SAMPLERS, MRSolver, mrs_steps
from torchnde.generative.oracles import GaussianMixtureData
from torchnde.generative.processes import VP, MeanReverting
from torchnde.generative.samplers import ALL_SAMPLERS, sample
from torchnde.generative.time_shift import TimeShift, TimeShiftModel

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")

# overlapping components: W2 on 1500 points is then not dominated by the draw's mode weights
MIX = GaussianMixtureData([0.4, 0.6], [[-0.6, 0.2], [0.5, -0.3]], [[0.3, 0.2], [0.2, 0.35]])
MU = torch.tensor([0.5, -0.5], dtype=D)


def _mr():
    return MeanReverting(theta=4.0, mean=MU, sigma=1.0)


# ------------------------------------------------------------------------------------------ MRS
def test_mrs_at_10_nfe_matches_euler_maruyama_at_200():
    p, n = _mr(), 1500
    ref = MIX.marginal_sample(p, p.t0, n, generator=torch.Generator().manual_seed(100))
    xT = MIX.marginal_sample(p, p.t1, n, generator=torch.Generator().manual_seed(0))
    model = MIX.model(p, "eps")

    def w2(sampler, nfe):
        out = sample(model, p, (n, 2), nfe=nfe, sampler=sampler, parameterisation="eps", x_init=xT, seed=50)
        assert out.nfe == nfe
        return wasserstein2(out.x, ref)

    em200, em10, mrs10 = w2("euler_maruyama", 200), w2("euler_maruyama", 10), w2("mrs_ode_2", 10)
    # measured: 0.066 / 0.189 / 0.076 (an exact draw's floor: 0.057); W2's own noise is ~0.01
    assert mrs10 <= em200 + 0.015
    assert em10 > 2 * em200  # the comparison can see a poor sampler


@pytest.mark.parametrize("prediction", ["", "eps_"])
def test_mrs_ode_orders(prediction):
    p, n = _mr(), 100
    xT = MIX.marginal_sample(p, p.t1, n, generator=torch.Generator().manual_seed(0))
    model = MIX.model(p, "eps")
    ref = sample(model, p, (n, 2), nfe=800, sampler="mrs_ode_2", parameterisation="eps", x_init=xT).x

    def err(order, nfe):
        x = sample(
            model, p, (n, 2), nfe=nfe, sampler=f"mrs_ode_{prediction}{order}", parameterisation="eps", x_init=xT
        ).x
        return float((x - ref).pow(2).sum(-1).mean().sqrt())

    e1, e2 = [err(1, m) for m in (16, 32)], [err(2, m) for m in (16, 32)]
    # measured: order 1 halves (ratio 1.97), order 2 quarters (4.2 data, 3.6 noise prediction)
    assert 1.7 < e1[0] / e1[1] < 2.3
    assert 3.2 < e2[0] / e2[1] < 4.8
    assert e2[1] < e1[1] / 5


# measured errors at 10 / 40 / 160 NFE: sde_1 0.44 / 0.15 / 0.078 (as Euler-Maruyama: 0.36 / 0.14 /
# 0.076), sde_2 0.29 / 0.053 / 0.043, sde_eps_1 0.10 / 0.041 / 0.043, sde_eps_2 0.052 / 0.037 / 0.044
@pytest.mark.parametrize(
    ("sampler", "nfe"), [("mrs_sde_1", 320), ("mrs_sde_2", 40), ("mrs_sde_eps_1", 40), ("mrs_sde_eps_2", 40)]
)
def test_mrs_sde_converges_on_gaussian_data(sampler, nfe):
    p, n = MeanReverting(theta=4.0, mean=MU, sigma=1.0), 4000
    xT = GAUSS.marginal_sample(p, p.t1, n, generator=torch.Generator().manual_seed(1))
    x = sample(GAUSS.model(p, "x0"), p, (n, 2), nfe=nfe, sampler=sampler, parameterisation="x0", x_init=xT, seed=3).x
    mean, cov = GAUSS.marginal_moments(p, p.t0)
    err = float(((x.mean(0) - mean).norm() + (torch.cov(x.T) - cov).norm()) / cov.norm())
    assert err < MC_TOL


@pytest.mark.parametrize("sampler", ["mrs_ode_2", "mrs_sde_2", "mrs_ode_eps_2"])
def test_mrs_with_every_parameterisation(sampler):
    p, n = _mr(), 64
    xT = MIX.marginal_sample(p, p.t1, n, generator=torch.Generator().manual_seed(0))
    ref = sample(MIX.model(p, "eps"), p, (n, 2), nfe=8, sampler=sampler, parameterisation="eps", x_init=xT, seed=1).x
    for kind in ("x0", "v", "score", "velocity"):
        x = sample(MIX.model(p, kind), p, (n, 2), nfe=8, sampler=sampler, parameterisation=kind, x_init=xT, seed=1).x
        torch.testing.assert_close(x, ref, rtol=1e-9, atol=1e-9)


def test_mrs_presets_and_errors():
    assert set(MRS_SAMPLERS).isdisjoint(ALL_SAMPLERS)  # ALL_SAMPLERS: those of every process
    assert mrs_steps("mrs_ode_2", 7) == 7
    with pytest.raises(ValueError, match="unknown MRS preset"):
        mrs_steps("mrs_3", 7)
    with pytest.raises(TypeError, match="MeanReverting"):
        sample(GAUSS.model(VP(), "eps"), VP(), (4, 2), nfe=5, sampler="mrs_ode_2", parameterisation="eps")
    with pytest.raises(TypeError, match="MeanReverting"):
        MRSolver(VP())
    with pytest.raises(ValueError, match="orders 1 and 2"):
        MRSolver(_mr(), 3)
    with pytest.raises(ValueError, match="needs noise"):
        MRSolver(_mr(), sde=True)
    # float32 state, float time grid: the samples follow the state's dtype
    out = sample(GAUSS.model(_mr(), "eps"), _mr(), (64, 2), nfe=6, sampler="mrs_sde_2", parameterisation="eps", seed=0)
    assert out.x.dtype == torch.float32 and torch.isfinite(out.x).all() and out.nfe == 6


# ----------------------------------------------------------------------------------------- BDIA
def _plain_inversion(p, model, grid, x0, base):
    """DDIM / PF-Euler run up the grid with the evaluation at each step's start (the usual
    approximate inversion)."""
    import torchnde as tn
    from torchnde.controllers import StepTo
    from torchnde.generative.fast_samplers import DPMSolver

    if base == "ddim":
        term = tn.ODETerm(lambda t, x, args=None: model(torch.full((x.shape[0],), t, dtype=x.dtype), x))
        solver = DPMSolver(p, 1, term_kind="eps", prediction="eps")
    else:
        term, solver = p.probability_flow(MIX_VP.score_fn(p)), tn.Euler()
    up = grid.flip(0)
    return tn.solve(term, solver, float(up[0]), float(up[-1]), x0, controller=StepTo(up)).ys[-1]


MIX_VP = GaussianMixtureData([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [[0.5, 0.3], [0.4, 0.6]])


@pytest.mark.parametrize("base", ["ddim", "pf_euler"])
def test_bdia_inverts_exactly(base):
    p, n = VP(), 256
    xT = p.prior_sample((n, 2), generator=torch.Generator().manual_seed(0), dtype=D)
    model = MIX_VP.model(p, "eps")
    out = bdia_sample(model, p, (n, 2), nfe=50, parameterisation="eps", base=base, x_init=xT)
    assert out.nfe == 50 and out.times.numel() == 51
    inv = bdia_invert(model, p, out.x, out.x_prev, out.times, parameterisation="eps", base=base)
    assert inv.nfe == 49
    err = float((inv.x - xT).abs().max())
    assert err <= 1e-5  # measured: 2e-15 (ddim), 4e-15 (pf_euler)
    # the usual inversion from the sample alone: measured max errors 0.33 (ddim), 0.13 (pf_euler)
    plain = float((_plain_inversion(p, model, out.times, out.x, base) - xT).abs().max())
    assert plain >= 1e-2


def test_bdia_samples_and_gamma():
    p, n = VP(), 4000
    xT = GAUSS.marginal_sample(p, p.t1, n, generator=torch.Generator().manual_seed(1))
    model = GAUSS.model(p, "x0")
    for gamma in (1.0, 0.5):
        x = bdia_sample(model, p, (n, 2), nfe=50, parameterisation="x0", gamma=gamma, x_init=xT).x
        mean, cov = GAUSS.marginal_moments(p, p.t0)
        err = float(((x.mean(0) - mean).norm() + (torch.cov(x.T) - cov).norm()) / cov.norm())
        assert err < MC_TOL
    # gamma < 1 inverts exactly too, but round-off grows like gamma^-N (measured 7e-13 at N = 10)
    small = xT[:64]
    out = bdia_sample(model, p, (64, 2), nfe=10, parameterisation="x0", gamma=0.5, x_init=small)
    inv = bdia_invert(model, p, out.x, out.x_prev, out.times, parameterisation="x0", gamma=0.5)
    assert float((inv.x - small).abs().max()) < 1e-9
    # the mean-reverting process (offset m(t)) and the shortest grid
    q = _mr()
    z = q.prior_sample((8, 2), generator=torch.Generator().manual_seed(2), dtype=D)
    out = bdia_sample(GAUSS.model(q, "eps"), q, (8, 2), nfe=2, parameterisation="eps", x_init=z)
    inv = bdia_invert(GAUSS.model(q, "eps"), q, out.x, out.x_prev, out.times, parameterisation="eps")
    assert float((inv.x - z).abs().max()) < 1e-12


def test_bdia_errors():
    p, model = VP(), GAUSS.model(VP(), "eps")
    with pytest.raises(ValueError, match="base sampler"):
        bdia_sample(model, p, (4, 2), nfe=5, base="heun")
    with pytest.raises(ValueError, match="gamma"):
        bdia_sample(model, p, (4, 2), nfe=5, gamma=1.5)
    with pytest.raises(ValueError, match="no exact inverse"):
        BDIASolver(p, gamma=0.0, invert=True, start=(None, 0.0))
    with pytest.raises(ValueError, match="nfe"):
        bdia_sample(model, p, (4, 2), nfe=1)
    with pytest.raises(ValueError, match="decreasing"):
        bdia_sample(model, p, (4, 2), times=[0.5, 0.7, 0.9])
    with pytest.raises(ValueError, match="same shape"):
        bdia_invert(model, p, torch.zeros(4, 2), torch.zeros(3, 2), p.times(4))
    with pytest.raises(ValueError, match="event_shape|shape"):
        bdia_sample(model, p, (4, 3), nfe=5)


# ----------------------------------------------------------------------------------- time shift
def _with_variance(v, n, d, seed=0):
    """``n`` points in ``d`` dimensions whose variance over the batch is exactly ``v`` per coordinate."""
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=D)
    z = (z - z.mean(0)) / z.std(0)
    return z * v**0.5


def test_time_shift_picks_the_matching_time():
    p = VP()
    ts = TimeShiftModel(GAUSS.model(p, "eps"), p, TimeShift(0.1, data_var=0.5, estimate="batch", candidates=11))
    t = 0.4
    for k in (-5, -2, 0, 3, 5):  # the candidates are t + k * 0.01
        tau = t + 0.01 * k
        a, s = p.marginal(tau)
        x = _with_variance(s * s + 0.5 * a * a, 500, 3)
        got = ts.shifted_time(t, x)
        assert got.shape == (500,)
        torch.testing.assert_close(got, torch.full((500,), tau, dtype=D))
    # beyond the window: its edge; per-sample estimates: one time per sample
    a, s = p.marginal(0.9)
    assert float(ts.shifted_time(t, _with_variance(s * s + 0.5 * a * a, 50, 3))[0]) == pytest.approx(0.45)
    per = TimeShiftModel(GAUSS.model(p, "eps"), p, TimeShift(0.1, candidates=11))
    rows = []
    for tau in (0.36, 0.4, 0.43):
        v = p.marginal(tau)[1] ** 2
        r = torch.tensor([-1.0, 1.0] * 50, dtype=D) * v**0.5 * (99 / 100) ** 0.5  # unbiased variance v
        rows.append(r)
    torch.testing.assert_close(per.shifted_time(t, torch.stack(rows)), torch.tensor([0.36, 0.4, 0.43], dtype=D))
    # at or below the cutoff: no shift
    cut = TimeShiftModel(GAUSS.model(p, "eps"), p, TimeShift(0.1, cutoff=0.5, estimate="batch"))
    torch.testing.assert_close(cut.shifted_time(t, x), torch.full((500,), t, dtype=D))


@pytest.mark.parametrize(("sampler", "nfe"), [("pf_euler", 50), ("dpmpp_2m", 20), ("euler_maruyama", 100)])
def test_time_shift_with_the_exact_score_changes_little(sampler, nfe):
    p, n = VP(), 4000
    xT = GAUSS.marginal_sample(p, p.t1, n, generator=torch.Generator().manual_seed(1))
    model = GAUSS.model(p, "eps")
    kw = dict(nfe=nfe, sampler=sampler, parameterisation="eps", x_init=xT, seed=2)
    plain = sample(model, p, (n, 2), **kw)
    # the data's per-coordinate variance (1 + 0.5) / 2: the expected variance is then exact
    shifted = sample(model, p, (n, 2), time_shift=TimeShift(data_var=0.75, estimate="batch"), **kw)
    assert shifted.nfe == plain.nfe
    # measured: RMS change 0.028-0.039; moment errors 0.052 -> 0.072, 0.10 -> 0.080, 0.056 -> 0.045
    assert float((plain.x - shifted.x).pow(2).sum(-1).mean().sqrt()) < 0.06
    assert abs(gauss_error(shifted.x, p) - gauss_error(plain.x, p)) < 0.03


@pytest.mark.parametrize(("sampler", "nfe", "window"), [("pf_euler", 100, 0.1), ("euler_maruyama", 50, 0.02)])
def test_time_shift_corrects_a_biased_noise_level(sampler, nfe, window):
    """A model whose noise prediction is 3% too small (a crude stand-in for exposure bias: the
    states drift off their nominal noise level); the shift reads the level off the states."""
    p, n = VP(), 4000
    xT = GAUSS.marginal_sample(p, p.t1, n, generator=torch.Generator().manual_seed(1))
    exact = GAUSS.model(p, "eps")

    def model(t, x):
        return 0.97 * exact(t, x)

    kw = dict(nfe=nfe, sampler=sampler, parameterisation="eps", x_init=xT, seed=2)
    plain = gauss_error(sample(model, p, (n, 2), **kw).x, p)
    shifted = gauss_error(
        sample(model, p, (n, 2), time_shift=TimeShift(0.1, data_var=0.75, estimate="batch"), **kw).x, p
    )
    # measured: pf_euler 0.409 -> 0.209; euler_maruyama 0.126 -> 0.119 (window 0.1) / 0.040 (window 0.02)
    assert shifted < plain


def test_time_shift_errors():
    p, model = VP(), GAUSS.model(VP(), "eps")
    with pytest.raises(ValueError, match="fixed-grid"):
        sample(model, p, (4, 2), sampler="pf_adaptive", time_shift=True)
    with pytest.raises(TypeError, match="TimeShift"):
        sample(model, p, (4, 2), nfe=4, sampler="pf_euler", time_shift="yes")
    with pytest.raises(ValueError, match="window"):
        TimeShift(-1.0)
    with pytest.raises(ValueError, match="estimate"):
        TimeShift(estimate="pixels")
    with pytest.raises(ValueError, match="odd"):
        TimeShift(candidates=10)
    with pytest.raises(ValueError, match="at least two coordinates"):
        TimeShiftModel(lambda t, x: x, p).shifted_time(0.5, torch.zeros(4, 1))
    out = sample(model, p, (16, 2), nfe=5, sampler="pf_euler", time_shift=True, seed=0)  # per-sample, defaults
    assert torch.isfinite(out.x).all() and out.nfe == 5
