"""Inpainting (replacement method) and classifier-free guidance with exact scores."""

import math

import pytest
import torch

import torchnde as tn
from torchnde.generative.conditional import ClassifierFreeGuidance, Inpaint, inpaint
from torchnde.generative.oracles import GaussianData, GaussianMixtureData
from torchnde.generative.parameterisation import Parameterisation
from torchnde.generative.processes import EDM, VP
from torchnde.generative.samplers import sample

D = torch.float64
G = GaussianData([1.0, -0.5], [[1.0, 0.6], [0.6, 0.5]])
Y_KNOWN = 0.5  # the observed second coordinate


pytestmark = pytest.mark.usefixtures("one_thread")


def _limit_law(p, sde: bool):
    """Mean and variance of the unknown coordinate under the replacement method as the steps
    shrink: the fresh noise of the known coordinate averages out, leaving a linear equation for
    x_u with the known coordinate at alpha * y; its moments solve linear ODEs (solved here
    from t1 down to t0, starting from p_{t1}'s marginal)."""
    S, mu = G.cov, G.mean
    c = 1.0 if sde else 0.5  # reverse SDE: f - g^2 s; probability flow: f - g^2 s / 2

    def f(t, z, args):
        t = float(t)
        a, s = p.marginal(t)
        g2 = p.diffusion2(t)
        k = float(p.drift(t, torch.ones(1, dtype=D)))  # the drift's linear coefficient
        A, B, C = a * a * S[0, 0] + s * s, a * a * S[0, 1], a * a * S[1, 1] + s * s
        puu, puk = C / (A * C - B * B), -B / (A * C - B * B)
        m, V = z[0], z[1]
        dm = k * m + c * g2 * (puu * (m - a * mu[0]) + puk * a * (Y_KNOWN - mu[1]))
        dV = 2 * (k + c * g2 * puu) * V - (g2 if sde else 0.0)
        return torch.stack([dm, dV])

    a1, s1 = p.marginal(p.t1)
    z1 = torch.tensor([a1 * mu[0], a1 * a1 * S[0, 0] + s1 * s1], dtype=D)
    pid = tn.PIDController(rtol=1e-10, atol=1e-10)
    return tn.solve(tn.ODETerm(f), tn.Tsit5(), p.t1, p.t0, z1, controller=pid).ys[-1].tolist()


def _exact_conditional(p):
    S, mu = G.cov, G.mean
    a, s = p.marginal(p.t0)
    mean = mu[0] + S[0, 1] / S[1, 1] * (Y_KNOWN - mu[1])
    var = S[0, 0] - S[0, 1] ** 2 / S[1, 1]
    return float(a * mean), float(a * a * var + s * s)


@pytest.mark.parametrize("name", ["vp", "edm"])
def test_inpainting_converges_to_the_replacement_limit_law_and_its_bias(name):
    """Measured (VP; EDM alike): the replacement method is biased. Exact conditional law of the
    missing coordinate: mean 2.20, var 0.280; its limit law: reverse SDE mean 1.630, var 0.493,
    probability flow mean 1.41, var 0.63. The samplers converge to these limits (within
    Monte-Carlo error, n = 4000), far from the exact conditional."""
    p = {"vp": VP, "edm": EDM}[name]()
    n = 4000
    obs = torch.zeros(n, 2, dtype=D)
    obs[:, 1] = Y_KNOWN
    mask = torch.tensor([False, True])
    exact_mean, exact_var = _exact_conditional(p)
    for sampler, nfe, sde in (("euler_maruyama", 400, True), ("dpmpp_2m", 50, False), ("pf_heun", 101, False)):
        m, V = _limit_law(p, sde)
        out = inpaint(G.score_fn(p), p, obs, mask, nfe=nfe, sampler=sampler, seed=0)
        assert torch.equal(out.x[:, 1], obs[:, 1])
        x = out.x[:, 0]
        se_m, se_v = math.sqrt(V / n), V * math.sqrt(2 / n)
        assert abs(float(x.mean()) - m) < 5 * se_m, (sampler, float(x.mean()), m)
        assert abs(float(x.var()) - V) < 5 * se_v, (sampler, float(x.var()), V)
        # the documented bias: far outside the Monte-Carlo error
        assert abs(m - exact_mean) > 0.5 and abs(V - exact_var) > 0.15


def test_inpainting_without_correlation_is_exact_and_repeatable():
    """With independent coordinates the replacement method is exact: the missing coordinate has
    its marginal law whatever is observed."""
    g = GaussianData([1.0, -0.5], [[1.0, 0.0], [0.0, 0.5]])
    p = VP()
    n = 4000
    obs = torch.zeros(n, 2, dtype=D)
    obs[:, 1] = 2.0
    out = inpaint(g.score_fn(p), p, obs, torch.tensor([False, True]), nfe=100, sampler="euler_maruyama", seed=1)
    a, s = p.marginal(p.t0)
    x = out.x[:, 0]
    assert abs(float(x.mean()) - a * 1.0) < 5 * math.sqrt(1 / n)
    assert abs(float(x.var()) - (a * a + s * s)) < 5 * math.sqrt(2 / n)
    again = inpaint(g.score_fn(p), p, obs, torch.tensor([False, True]), nfe=100, sampler="euler_maruyama", seed=1)
    torch.testing.assert_close(again.x, out.x, rtol=0, atol=0)


def test_inpaint_wrapper_errors_and_repr():
    with pytest.raises(TypeError, match="solver"):
        Inpaint(lambda: 0, VP(), torch.zeros(2, 2), torch.ones(2, 2))
    w = Inpaint(tn.Euler(), VP(), torch.zeros(3, 2), torch.tensor([True, False]))
    assert "Inpaint" in repr(w) and w.strong_order == tn.Euler.strong_order


# ---------------------------------------------------------------------- classifier-free guidance
CLASSES = [GaussianMixtureData([1.0], [[-1.0, 0.0]], 0.7), GaussianMixtureData([1.0], [[1.0, 0.5]], 0.7)]
UNCOND = GaussianMixtureData([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.5]], 0.7)


def _class_model(p, kind="score"):
    param = Parameterisation("score", p)

    def model(t, x, c):
        if c is None:
            s = UNCOND.score(p, t, x)
        else:
            s0, s1 = CLASSES[0].score(p, t, x), CLASSES[1].score(p, t, x)
            s = torch.where((c == 1).unsqueeze(-1), s1, s0)
        return param.convert(kind, t, x, s)

    return model


def test_cfg_weight_zero_is_the_conditional_sampler():
    p = VP()
    n = 2000
    labels = torch.arange(n) % 2
    model = _class_model(p)
    cond = sample(lambda t, x: model(t, x, labels), p, (n, 2), nfe=50, sampler="dpmpp_2m", seed=0, dtype=D)
    cfg = sample(ClassifierFreeGuidance(model, labels, 0.0), p, (n, 2), nfe=50, sampler="dpmpp_2m", seed=0, dtype=D)
    torch.testing.assert_close(cfg.x, cond.x, rtol=0, atol=0)
    # and it samples the class-conditional laws (means within Monte-Carlo error)
    for k in (0, 1):
        xk = cond.x[labels == k]
        mean = CLASSES[k].means[0] * p.marginal(p.t0)[0]
        assert (xk.mean(0) - mean).abs().max() < 5 * 0.7 / math.sqrt(n / 2)


@pytest.mark.parametrize("sampler", ["euler_maruyama", "dpmpp_2m", "edm_heun"])
def test_cfg_moves_samples_towards_the_class(sampler):
    """The posterior p(c | x) of the samples' own class (under the unconditional mixture) rises
    with the weight: measured mean p(c|x) at w = 0, 1, 3: dpmpp_2m and edm_heun 0.900, 0.991, 0.999;
    euler_maruyama 0.889, 0.968, 0.988."""
    p = VP()
    n = 2000
    labels = torch.arange(n) % 2
    model = _class_model(p)
    post = []
    for w in (0.0, 1.0, 3.0):
        x = sample(ClassifierFreeGuidance(model, labels, w), p, (n, 2), nfe=60, sampler=sampler, seed=1, dtype=D).x
        l0 = CLASSES[0].log_prob(p, p.t0, x)
        l1 = CLASSES[1].log_prob(p, p.t0, x)
        pc = torch.sigmoid(torch.where(labels == 1, l1 - l0, l0 - l1))
        post.append(pc)
    means = [float(q.mean()) for q in post]
    se = [float(q.std()) / math.sqrt(n) for q in post]
    assert means[1] > means[0] + 5 * max(se[:2]) and means[2] > means[1] + 3 * max(se[1:]), means


def test_cfg_is_the_same_for_every_parameterisation():
    p = VP()
    labels = torch.arange(64) % 2
    ref = sample(
        ClassifierFreeGuidance(_class_model(p), labels, 2.0), p, (64, 2), nfe=12, sampler="pf_heun", seed=0, dtype=D
    )
    for kind in ("eps", "x0", "v", "velocity"):
        guided = ClassifierFreeGuidance(_class_model(p, kind), labels, 2.0)
        out = sample(guided, p, (64, 2), nfe=12, sampler="pf_heun", seed=0, dtype=D, parameterisation=kind)
        torch.testing.assert_close(out.x, ref.x, rtol=1e-9, atol=1e-9)
        assert guided.calls == out.nfe
    with pytest.raises(ValueError, match=">= -1"):
        ClassifierFreeGuidance(_class_model(p), labels, -2.0)
