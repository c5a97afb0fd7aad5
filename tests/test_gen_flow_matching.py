"""The flow-matching family: CFM, OT-CFM, rectified flow with reflow, stochastic interpolants.

The quality tests train small MLPs on the standardised moons (fixed seeds, one thread) and measure
the exact W2 between generated and held-out data samples; for reference, two independent samples
of the data are 0.07-0.11 apart with 2000 points each and 0.15-0.19 with 1000.
"""

import itertools
import math
import time

import pytest
import torch

import torchnde as tn
from torchnde.generative import data, metrics
from torchnde.generative.flow_matching import (
    MLP,
    StochasticInterpolant,
    cfm_loss,
    fit,
    ot_coupling,
    rectified_flow_loss,
    reflow,
    reflow_pairs,
    sample_ode,
)

TIMES = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # small MLPs: one thread is fastest


@pytest.fixture(scope="module", autouse=True)
def _report_times():
    yield
    if TIMES:
        print("\n" + ", ".join(f"{k}: {v:.1f}s" for k, v in TIMES.items()))


@pytest.fixture(scope="module")
def moons():
    pool = data.sample("moons", 20_000, seed=3)

    def pairs(n, gen):
        idx = torch.randint(0, pool.shape[0], (n,), generator=gen)
        return torch.randn(n, 2, generator=gen), pool[idx]

    reference = data.sample("moons", 2000, seed=1)
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
    return pairs, reference, x0


def _train(pairs, name, *, out_dim=None, **kwargs):
    torch.manual_seed(0)
    model = MLP(2, out_dim=out_dim, hidden=128, depth=3)
    start = time.perf_counter()
    fit(model, pairs, batch_size=256, lr=3e-3, seed=0, **kwargs)
    TIMES[name] = time.perf_counter() - start
    return model


@pytest.fixture(scope="module")
def cfm(moons):
    # independent coupling, sigma = 0: also the first rectified flow
    return _train(moons[0], "train CFM", steps=2000)


# one-step samples of the independent coupling collapse towards the data mean, a degenerate
# assignment problem that takes ~7 s at n = 2000; the one-step comparisons use the first 1000 points
ONE_STEP_N = 1000


def _w2(model, moons, nfe, n=2000, **kw):
    with torch.no_grad():
        return metrics.wasserstein2(sample_ode(model, moons[2][:n], nfe=nfe, **kw), moons[1][:n])


@pytest.fixture(scope="module")
def cfm_one_step_w2(cfm, moons):
    return _w2(cfm, moons, 1, ONE_STEP_N)


def test_cfm_100_euler_steps_w2(cfm, moons):
    w2 = _w2(cfm, moons, 100)
    w2_10 = _w2(cfm, moons, 10)
    print(f"CFM W2: 10 Euler steps {w2_10:.3f}, 100 Euler steps {w2:.3f}")
    assert w2 <= 0.25
    assert w2 <= w2_10


def test_ot_cfm_one_step_is_a_fifth_of_independent(cfm_one_step_w2, moons):
    ot = _train(moons[0], "train OT-CFM", steps=2500, coupling="ot")
    w2_ot = _w2(ot, moons, 1, ONE_STEP_N)
    print(f"1-step W2: independent CFM {cfm_one_step_w2:.3f}, OT-CFM {w2_ot:.3f}, ratio {w2_ot / cfm_one_step_w2:.3f}")
    assert w2_ot <= cfm_one_step_w2 / 5


def test_reflow_straightens(cfm, cfm_one_step_w2, moons):
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(11))
    before = {k: v.clone() for k, v in cfm.state_dict().items()}
    start = time.perf_counter()
    rf2 = reflow(cfm, x0, nfe=100, steps=1000, batch_size=256, lr=1e-3, seed=1)
    TIMES["reflow"] = time.perf_counter() - start
    w2_after = _w2(rf2, moons, 1, ONE_STEP_N)
    w2_after_100 = _w2(rf2, moons, 100)
    print(
        f"1-step W2: rectified flow {cfm_one_step_w2:.4f}, after one reflow {w2_after:.4f} "
        f"(100 steps after reflow: {w2_after_100:.4f})"
    )
    assert w2_after < 0.5 * cfm_one_step_w2
    # the original model is untouched (reflow trains a copy)
    assert all(torch.equal(v, before[k]) for k, v in cfm.state_dict().items())


def test_stochastic_interpolant_ode_and_sde(moons):
    si = StochasticInterpolant(noise=1.0)
    model = _train(moons[0], "train SI", out_dim=4, steps=2000, loss=si.loss)
    with torch.no_grad():
        w2_ode = metrics.wasserstein2(si.sample_ode(model, moons[2], nfe=100), moons[1])
        w2_sde = metrics.wasserstein2(si.sample_sde(model, moons[2], nfe=100, diffusion=1.0, seed=1), moons[1])
    print(f"stochastic interpolant W2 with 100 steps: ODE {w2_ode:.3f}, SDE (Euler-Maruyama) {w2_sde:.3f}")
    assert w2_ode <= 0.25 and w2_sde <= 0.25
    assert abs(w2_sde - w2_ode) <= 0.05


# ---------------------------------------------------------------------------------------- mechanics
def test_ot_coupling_is_the_optimal_permutation():
    gen = torch.Generator().manual_seed(0)
    x0, x1 = (
        torch.randn(6, 2, generator=gen, dtype=torch.float64),
        torch.randn(6, 2, generator=gen, dtype=torch.float64),
    )
    a, b = ot_coupling(x0, x1)
    assert a is x0 and sorted(b.tolist()) == sorted(x1.tolist())
    best = min(float((x0 - x1[list(p)]).square().sum()) for p in itertools.permutations(range(6)))
    assert float((a - b).square().sum()) == pytest.approx(best, rel=1e-12)


def test_cfm_loss_vanishes_for_the_exact_velocity_and_is_reproducible():
    x1 = torch.randn(64, 3, dtype=torch.float64)
    x0 = x1 - torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)  # every pair differs by the same vector
    exact = lambda t, x: torch.tensor([1.0, 2.0, 3.0], dtype=x.dtype).expand_as(x)
    assert cfm_loss(exact, x0, x1).item() < 1e-28
    assert rectified_flow_loss(exact, x0, x1).item() < 1e-28
    zero = lambda t, x: torch.zeros_like(x)
    # with sigma > 0 the loss is still the squared target (the target does not depend on the noise)
    assert cfm_loss(zero, x0, x1, sigma=0.3).item() == pytest.approx((1 + 4 + 9) / 3)
    m = MLP(3).double()
    l1 = cfm_loss(m, x0, x1, sigma=0.1, generator=torch.Generator().manual_seed(3))
    l2 = cfm_loss(m, x0, x1, sigma=0.1, generator=torch.Generator().manual_seed(3))
    assert l1.item() == l2.item()
    with pytest.raises(ValueError, match="coupling"):
        cfm_loss(m, x0, x1, coupling="sinkhorn")
    with pytest.raises(ValueError, match="same shape"):
        cfm_loss(m, x0[:3], x1)


def test_sample_ode_uses_solve_with_nfe_budget():
    x0 = torch.ones(5, 2, dtype=torch.float64)
    decay = lambda t, x: -x
    assert torch.allclose(sample_ode(decay, x0, nfe=100), x0 * 0.99**100)
    sol = sample_ode(decay, x0, nfe=40, solver=tn.RK4(), return_solution=True)
    assert sol.stats["num_steps"] == 10 and torch.allclose(sol.ys[-1], x0 * math.exp(-1), atol=1e-7)
    sol = sample_ode(
        decay, x0, solver=tn.Tsit5(), controller=tn.PIDController(rtol=1e-8, atol=1e-8), return_solution=True
    )
    assert torch.allclose(sol.ys[-1], x0 * math.exp(-1), atol=1e-7)
    # backwards: from t=1 to t=0 inverts the flow
    assert torch.allclose(sample_ode(decay, x0 * math.exp(-1), nfe=400, solver=tn.RK4(), t0=1.0, t1=0.0), x0)
    # the time the model receives is a (batch,) tensor of the data's dtype
    seen = []
    sample_ode(lambda t, x: seen.append(t) or torch.zeros_like(x), x0, nfe=2)
    assert seen[0].shape == (5,) and seen[0].dtype == torch.float64 and seen[1][0].item() == 0.5
    # per-sample stepping and saving: the samples keep x0's shape; saveat gives the solution
    assert torch.allclose(sample_ode(decay, x0, nfe=100, per_sample=True), x0 * 0.99**100)
    sol = sample_ode(decay, x0, nfe=10, saveat=tn.SaveAt(ts=torch.linspace(0, 1, 3)))
    assert sol.ys.shape == (3, 5, 2)
    with pytest.raises(ValueError, match="nfe"):
        sample_ode(decay, x0, nfe=0)


def test_reflow_pairs_are_the_flow_map():
    x0 = torch.randn(7, 2)
    a, b = reflow_pairs(lambda t, x: torch.ones_like(x), x0, nfe=3)
    assert a is x0 and torch.allclose(b, x0 + 1)


def _gaussian_interpolant_model(si, m, s):
    """The exact (b, eta) of x_t = (1-t) x0 + t x1 + gamma z, x0 ~ N(0, I), x1 ~ N(m, s^2 I): Gaussian conditioning."""

    def model(t, x):
        t = t[:, None]
        g, dg = si.gamma(t), si.dgamma(t)
        var = (1 - t) ** 2 + t**2 * s**2 + g**2
        centred = x - t * m
        b = m + (t * s**2 - (1 - t) + g * dg) / var * centred
        return b, g / var * centred

    return model


@pytest.mark.parametrize("noise", [0.5, 2.0])
def test_stochastic_interpolant_samplers_with_the_exact_model(noise):
    # with the exact velocity and denoiser, the ODE and the SDE (any diffusion) both carry N(0, I) to N(m, s^2 I)
    si = StochasticInterpolant(noise)
    m, s, n = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5, 20_000
    model = _gaussian_interpolant_model(si, m, s)
    x0 = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outs = {
        "ode": si.sample_ode(model, x0, nfe=200, solver=tn.Heun()),
        "sde": si.sample_sde(model, x0, nfe=200, diffusion=1.0, seed=3),
        "sde3": si.sample_sde(model, x0, nfe=200, diffusion=3.0, seed=4),
    }
    for name, x in outs.items():
        # standard errors: mean s / sqrt(n) = 3.5e-3, std s / sqrt(2n) = 2.5e-3; plus O(1/nfe) discretisation
        assert (x.mean(0) - m).abs().max() < 0.02, (name, x.mean(0))
        assert (x.std(0) - s).abs().max() < 0.02, (name, x.std(0))
    # the SDE really is stochastic: another Brownian path gives other samples with the same law
    assert not torch.allclose(outs["sde"], si.sample_sde(model, x0, nfe=200, diffusion=1.0, seed=5))
    # an adaptive SDE solve (Heun on a virtual Brownian tree) gives the same law
    sol = si.sample_sde(
        model,
        x0[:4000],
        diffusion=1.0,
        solver=tn.Heun(),
        controller=tn.PIDController(rtol=1e-2, atol=1e-2),
        return_solution=True,
    )
    assert (sol.ys[-1].mean(0) - m).abs().max() < 0.03 and (sol.ys[-1].std(0) - s).abs().max() < 0.03
    # zero diffusion is the ODE (Euler)
    assert torch.allclose(si.sample_sde(model, x0[:50], nfe=20, diffusion=0.0), si.sample_ode(model, x0[:50], nfe=20))


def test_stochastic_interpolant_endpoints_and_score():
    si = StochasticInterpolant(1.5)
    x0, x1, z = torch.randn(3, 4, 2).unbind(0)
    for t, expect in ((0.0, x0), (1.0, x1)):
        xt, _ = si.interpolate(torch.full((4,), t), x0, x1, z)
        assert torch.allclose(xt, expect)
    # derivative of the interpolant by finite differences
    t = torch.full((4,), 0.3, dtype=torch.float64)
    x0, x1, z = x0.double(), x1.double(), z.double()
    h = 1e-6
    fd = (si.interpolate(t + h, x0, x1, z)[0] - si.interpolate(t - h, x0, x1, z)[0]) / (2 * h)
    assert torch.allclose(si.interpolate(t, x0, x1, z)[1], fd, atol=1e-8)
    # the score of the Gaussian interpolant is -(x - t m) / var
    m, s = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5
    model = _gaussian_interpolant_model(si, m, s)
    x = torch.randn(4, 2, dtype=torch.float64)
    var = 0.7**2 + 0.3**2 * s**2 + float(si.gamma(torch.tensor(0.3))) ** 2
    assert torch.allclose(si.score(model, 0.3, x), -(x - 0.3 * m) / var)
    with pytest.raises(ValueError, match="twice"):
        si.split(torch.zeros(4, 3), x)
