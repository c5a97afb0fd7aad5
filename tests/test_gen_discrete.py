"""Discrete DDPM schedules as continuous processes (DiscreteVP) and integer-timestep models
(DiscreteTimeModel) with every sampler."""

import math

import pytest
import torch

from gen_oracles import GAUSS, MC_TOL, gauss_error
from torchnde.generative.discrete import DiscreteTimeModel, DiscreteVP
from torchnde.generative.fast_samplers import logsnr, logsnr_times
from torchnde.generative.processes import VP
from torchnde.generative.samplers import sample

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _schedule(n=1000, lo=1e-4, hi=0.02):
    betas = torch.linspace(lo, hi, n, dtype=D)
    return betas, torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("given", ["betas", "alphas_cumprod"])
def test_matches_the_discrete_alphas_at_the_grid(given):
    betas, abar = _schedule()
    p = DiscreteVP(betas) if given == "betas" else DiscreteVP(alphas_cumprod=abar)
    ti = (torch.arange(1000, dtype=D) + 1) / 1000
    a, s = p.marginal(ti)
    torch.testing.assert_close(a * a, abar, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s * s, 1 - abar, rtol=1e-12, atol=1e-14)
    for i in (0, 1, 499, 998, 999):  # the float path too
        af, sf = p.marginal(float(ti[i]))
        assert af * af == pytest.approx(float(abar[i]), rel=1e-12) and sf * sf == pytest.approx(1 - float(abar[i]))
    assert (p.t0, p.t1, p.num_timesteps) == (1e-3, 1.0, 1000)
    torch.testing.assert_close(p.alphas_cumprod, abar)
    # the continuous-time limit of the same schedule (Song et al.'s VP(0.1, 20)) is close
    for t in (0.01, 0.3, 0.7, 1.0):
        assert p.marginal(t)[0] == pytest.approx(VP().marginal(t)[0], rel=0.04)


def test_the_sde_is_consistent():
    """beta(t) = -d log abar / dt (left-continuous), g^2 = d sigma^2/dt - 2 f sigma^2, and the
    log-SNR inverse is exact."""
    betas, _ = _schedule(50, 1e-3, 0.2)
    p = DiscreteVP(betas)
    for i in (0, 7, 49):
        t = (i + 1) / 50
        assert p.diffusion2(t) == pytest.approx(-50 * math.log1p(-float(betas[i])), rel=1e-12)
        assert p.diffusion2(torch.tensor([t], dtype=D)).item() == pytest.approx(p.diffusion2(t), rel=1e-12)
        tm = t - 0.3 / 50  # inside the segment
        h = 1e-6
        s2 = lambda u: p.marginal(u)[1] ** 2  # noqa: E731
        ds2 = (s2(tm + h) - s2(tm - h)) / (2 * h)
        assert p.diffusion2(tm) == pytest.approx(ds2 - 2 * p.drift(tm, torch.ones(1))[0].item() * s2(tm), rel=1e-6)
    ts = logsnr_times(p, 7)
    lam = torch.tensor([logsnr(p, float(t)) for t in ts], dtype=D)
    torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(7), rtol=1e-9, atol=1e-9)
    st = p.step_times(7)
    assert st[0] == 1.0 and st[-1] == pytest.approx(1 / 50) and ((st * 50).round() - st * 50).abs().max() < 1e-12


def _exact_discrete_eps(p):
    """The exact noise prediction of the Gaussian data as a network of integer timesteps."""
    exact = GAUSS.model(p, "eps")

    def net(i, x):
        assert i.dtype == torch.int64
        return exact(p.time_of(i.to(x.dtype)), x)

    net.event_shape = (2,)
    return net


@pytest.mark.parametrize(
    ("sampler", "nfe"), [("euler_maruyama", 200), ("pf_heun", 100), ("dpmpp_2m", 40), ("dpm_3s", 21), ("edm_heun", 40)]
)
def test_every_sampler_with_an_integer_timestep_model(sampler, nfe):
    p = DiscreteVP(*_schedule()[:1])
    model = DiscreteTimeModel(_exact_discrete_eps(p), p, timesteps="round")
    xT = GAUSS.marginal_sample(p, p.t1, 4000, generator=torch.Generator().manual_seed(1))
    out = sample(model, p, (4000, 2), nfe=nfe, sampler=sampler, parameterisation="eps", x_init=xT, seed=2)
    assert gauss_error(out.x, p) < MC_TOL


def test_fractional_timesteps_and_step_times():
    p = DiscreteVP(*_schedule()[:1])
    exact = GAUSS.model(p, "eps")
    seen = []

    def net(x, i):  # diffusers' argument order, fractional timesteps
        seen.append(i)
        return exact(p.time_of(i), x)

    model = DiscreteTimeModel(net, p, x_first=True)
    xT = GAUSS.marginal_sample(p, p.t1, 4000, generator=torch.Generator().manual_seed(1))
    out = sample(model, p, (4000, 2), nfe=40, sampler="dpmpp_2m", parameterisation="eps", x_init=xT)
    assert gauss_error(out.x, p) < MC_TOL and seen[0].dtype == D
    # fractional timesteps are the continuous model itself
    same = sample(exact, p, (4000, 2), nfe=40, sampler="dpmpp_2m", parameterisation="eps", x_init=xT).x
    torch.testing.assert_close(out.x, same, rtol=1e-12, atol=1e-12)
    steps = torch.stack([i[0] for i in seen])
    assert float(steps[0]) == pytest.approx(999.0) and 0 < float(steps.min()) < 1 and len(set(steps.tolist())) == 40
    # on step_times the rounded timesteps are the grid's own
    ints = []
    rounded = DiscreteTimeModel(lambda i, x: ints.append(i) or exact(p.time_of(i.to(x.dtype)), x), p, timesteps="round")
    sample(rounded, p, (8, 2), sampler="pf_euler", parameterisation="eps", times=p.step_times(10), seed=0)
    assert [int(i[0]) for i in ints] == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]


def _ddpm_ancestral(eps_net, betas, n, generator):
    """DDPM's own sampler (Ho et al. 2020, Alg. 2) on integer timesteps, as a library runs it."""
    abar = torch.cumprod(1 - betas, 0)
    x = torch.randn(n, 1, generator=generator)
    for i in reversed(range(len(betas))):
        e = eps_net(torch.full((n,), i), x)
        x = (x - betas[i] / (1 - abar[i]).sqrt() * e) / (1 - betas[i]).sqrt()
        if i > 0:
            var = betas[i] * (1 - abar[i - 1]) / (1 - abar[i])
            x = x + var.sqrt() * torch.randn(x.shape, generator=generator)
    return x


def test_a_tiny_model_trained_on_the_discrete_loss():
    """A few hundred steps of DDPM's loss (integer timesteps) on 1-D Gaussian data N(1.5, 0.5^2),
    then sampled with torchnde's samplers through DiscreteTimeModel, and with DDPM's own loop."""
    torch.manual_seed(0)
    n_steps, m, sd = 100, 1.5, 0.5
    betas = torch.linspace(1e-3, 0.2, n_steps)  # float32, as a library stores it
    abar = torch.cumprod(1 - betas, 0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(),
                              torch.nn.Linear(64, 1))  # fmt: skip

    def eps_net(i, x):
        return net(torch.cat([x, (i.to(x.dtype) / n_steps)[:, None]], -1))

    steps = 500
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x0 = m + sd * torch.randn(256, 1, generator=g)
        i = torch.randint(0, n_steps, (256,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        ab = abar[i][:, None]
        loss = (eps_net(i, ab.sqrt() * x0 + (1 - ab).sqrt() * eps) - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    p = DiscreteVP(betas)
    model = DiscreteTimeModel(eps_net, p, timesteps="round")
    with torch.no_grad():
        native = _ddpm_ancestral(eps_net, betas, 4000, torch.Generator().manual_seed(5))
        # measured (mean, std) errors, the model's: DDPM's loop (0.002, -0.068); dpmpp_2m (0.015, 0.055),
        # euler_maruyama (-0.012, -0.021), pf_euler (-0.003, 0.073)
        assert abs(float(native.mean()) - m) < 0.1 and abs(float(native.std()) - sd) < 0.12
        for sampler, nfe in (("dpmpp_2m", 20), ("euler_maruyama", 99), ("pf_euler", 50)):
            x = sample(model, p, (4000, 1), nfe=nfe, sampler=sampler, parameterisation="eps", seed=3).x
            assert abs(float(x.mean()) - m) < 0.1 and abs(float(x.std()) - sd) < 0.12, sampler


def test_errors():
    betas, abar = _schedule(10, 0.01, 0.2)
    with pytest.raises(ValueError, match="exactly one"):
        DiscreteVP()
    with pytest.raises(ValueError, match="exactly one"):
        DiscreteVP(betas, alphas_cumprod=abar)
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        DiscreteVP(torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteVP(alphas_cumprod=torch.tensor([0.9, 0.95, 0.5]))
    with pytest.raises(ValueError, match="zero terminal SNR"):
        DiscreteVP(alphas_cumprod=torch.tensor([0.9, 0.5, 0.0]))
    with pytest.raises(ValueError, match="1-d"):
        DiscreteVP(torch.ones(2, 2) * 0.1)
    with pytest.raises(TypeError, match="1-d sequence"):
        DiscreteVP("abc")
    with pytest.raises(ValueError, match="t0"):
        DiscreteVP(betas, t0=1.0)
    with pytest.raises(TypeError, match="DiscreteVP"):
        DiscreteTimeModel(lambda i, x: x, VP())
    with pytest.raises(ValueError, match="timesteps must be"):
        DiscreteTimeModel(lambda i, x: x, DiscreteVP(betas), timesteps="floor")
    with pytest.raises(ValueError, match="step_times needs"):
        DiscreteVP(betas).step_times(10)
