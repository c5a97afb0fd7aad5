"""Multi-component diffusion (torchnde.generative.multi): a system of SDEs over a tree of leaves,
its samplers (Euler–Maruyama, predictor–corrector, S4, probability flow), hooks and loss, checked
against an analytic oracle (Gaussian data with exact partial scores)."""

import math

import pytest
import torch

from torchnde.generative.multi import (
    JointGaussian,
    MultiProcess,
    S4Solver,
    multi_dsm_loss,
    multi_sample,
    symmetric_noise,
)
from torchnde.generative.processes import VE, VP

F64 = torch.float64
N, F = 3, 2  # items, features per item
NX = N * F
D = NX + N * (N - 1) // 2


def _system(adj=None, **kw):
    adj = VE(sigma_min=0.01, sigma_max=20.0, t0=1e-3) if adj is None else adj
    return MultiProcess({"x": VP(), "adj": adj}, noise_transform={"adj": symmetric_noise}, **kw)


def _coupled_oracle():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(D, D, dtype=F64, generator=g) * 0.4
    cov = a @ a.T + 0.1 * torch.eye(D, dtype=F64)
    mean = torch.linspace(-1, 1, D, dtype=F64)
    return JointGaussian({"x": (N, F), "adj": (N, N)}, mean, cov, symmetric=["adj"])


def _errors(orc, mp, x):
    """max |mean error|, relative Frobenius covariance error, relative cross-block error."""
    mu0, c0 = orc.marginal(mp, mp.t0)
    u = orc.coords(x)
    c = torch.cov(u.T)
    cross = (c[:NX, NX:] - c0[:NX, NX:]).norm() / c0[:NX, NX:].norm()
    return float((u.mean(0) - mu0).abs().max()), float((c - c0).norm() / c0.norm()), float(cross)


# ------------------------------------------------------------------------------------ oracle
@pytest.mark.parametrize("sampler,nfe", [("euler_maruyama", 64), ("pc", 64), ("s4", 32), ("pf_heun", 64)])
def test_joint_sampler_reproduces_marginals_and_coupling(sampler, nfe):
    # x under VP, a symmetric zero-diagonal adj under VE, correlated with x through the data
    mp, orc = _system(), _coupled_oracle()
    b = 2500
    r = multi_sample(orc.model(mp), mp, {"x": (b, N, F), "adj": (b, N, N)}, nfe=nfe, sampler=sampler, seed=7, dtype=F64)
    assert r.nfe == nfe
    mean_err, cov_err, cross_err = _errors(orc, mp, r.x)
    # at b = 2500 over seeds: about 0.03-0.07 (mean), 0.04-0.08 (cov), 0.04-0.11 (cross block)
    assert mean_err < 0.1 and cov_err < 0.1 and cross_err < 0.14, (mean_err, cov_err, cross_err)
    a = r.x["adj"]
    assert torch.equal(a, a.transpose(-1, -2)) and not a.diagonal(dim1=-2, dim2=-1).any()


def test_oracle_test_has_power():
    # the same check fails for a model that drops the coupling between the leaves
    mp, orc = _system(), _coupled_oracle()
    cov = orc.cov.clone()
    cov[:NX, NX:] = 0
    cov[NX:, :NX] = 0
    uncoupled = JointGaussian(orc.event_shapes, orc.mean, cov, symmetric=["adj"])
    b = 2500
    r = multi_sample(
        uncoupled.model(mp), mp, {"x": (b, N, F), "adj": (b, N, N)}, nfe=32, sampler="s4", seed=7, dtype=F64
    )
    assert _errors(orc, mp, r.x)[2] > 0.8


def test_s4_converges_as_steps_grow():
    # error of the sample covariance against the exact one; statistical floor about 0.04 at b = 2500
    mp, orc = _system(), _coupled_oracle()
    b = 2500
    shapes = {"x": (b, N, F), "adj": (b, N, N)}
    errs = {}
    for nfe in (12, 24, 96):
        for nc in (0, 1):
            r = multi_sample(orc.model(mp), mp, shapes, nfe=nfe, sampler="s4", n_corrector=nc, seed=0, dtype=F64)
            assert r.nfe == nfe  # one evaluation per step, the corrector's included
            errs[nfe, nc] = _errors(orc, mp, r.x)[1]
    for nc in (0, 1):
        assert errs[12, nc] > errs[24, nc] > errs[96, nc], errs
    assert errs[96, 0] < 0.12 and errs[96, 1] < 0.07, errs


def test_s4_solver_checks():
    mp = _system()
    with pytest.raises(ValueError, match="at most one corrector"):
        S4Solver(mp, mp.score(lambda t, x: x), None, n_corrector=2)
    with pytest.raises(ValueError, match="snr"):
        S4Solver(mp, mp.score(lambda t, x: x), None, n_corrector=0, snr={"x": 0.1})


# ------------------------------------------------------------------------------------- hooks
def test_symmetric_noise():
    z = symmetric_noise(torch.randn(4000, 5, 5, generator=torch.Generator().manual_seed(0), dtype=F64))
    assert torch.equal(z, z.transpose(-1, -2)) and not z.diagonal(dim1=-2, dim2=-1).any()
    i, j = torch.triu_indices(5, 5, 1)
    off = z[:, i, j]
    assert abs(float(off.var()) - 1) < 0.03 and abs(float(off.mean())) < 0.02
    assert symmetric_noise(torch.randn(2, 3, 4, 4)).shape == (2, 3, 4, 4)  # extra leading dims
    with pytest.raises(ValueError, match="square"):
        symmetric_noise(torch.randn(2, 3, 4))


def _product_model(mp, m_x=0.5, s_x=0.7, m_a=-0.3, s_a=0.4, seen=None):
    """Exact scores of independent N(m, s^2) entries (x) / coordinates (adj), any mask."""

    def model(t, x, mask=None):
        if seen is not None:
            seen.append(mask)
        out = {}
        for k, m, s in (("x", m_x, s_x), ("adj", m_a, s_a)):
            a, sig = mp.processes[k].marginal(t)
            a = torch.as_tensor(a, dtype=F64).reshape(-1, *([1] * (x[k].dim() - 1)))
            sig = torch.as_tensor(sig, dtype=F64).reshape(-1, *([1] * (x[k].dim() - 1)))
            out[k] = -(x[k] - a * m) / (a * a * s * s + sig * sig)
        adj = out["adj"]
        out["adj"] = adj - torch.diag_embed(adj.diagonal(dim1=-2, dim2=-1))
        return out

    return model


@pytest.mark.parametrize("sampler", ["euler_maruyama", "pc", "s4", "pf_euler"])
def test_mask_keeps_padded_entries_zero(sampler):
    mp = _system(adj=VP(), mask_dims={"x": (1,), "adj": (1, 2)})
    b, n = 600, 4
    sizes = torch.tensor([2, 3, 4] * (b // 3))
    mask = (torch.arange(n)[None, :] < sizes[:, None]).to(F64)
    seen = []
    r = multi_sample(
        _product_model(mp, seen=seen), mp, {"x": (b, n, F), "adj": (b, n, n)}, nfe=40, sampler=sampler, mask=mask,
        seed=3, dtype=F64,
    )  # fmt: skip
    assert seen and all(m is mask for m in seen)  # the model receives the mask
    x, a = r.x["x"], r.x["adj"]
    pad = mask == 0
    assert not x[pad].any()
    assert not (a * (1 - mask[:, :, None] * mask[:, None, :])).any()
    assert torch.equal(a, a.transpose(-1, -2)) and not a.diagonal(dim1=-2, dim2=-1).any()
    # the unmasked entries keep their exact marginals (independent entries)
    xv = x[~pad]
    _, sx = VP().marginal(mp.t0)
    assert abs(float(xv.mean()) - 0.5) < 0.05 and abs(float(xv.var()) - (0.49 + sx * sx)) < 0.08


def test_marginal_sample_and_prior_through_hooks():
    mp = _system(adj=VP(), mask_dims={"x": (1,), "adj": (1, 2)})
    b, n = 8, 4
    mask = torch.ones(b, n, dtype=F64)
    mask[:, 3] = 0
    x0 = {"x": torch.zeros(b, n, F, dtype=F64), "adj": torch.zeros(b, n, n, dtype=F64)}
    for y in (
        mp.marginal_sample(0.5, x0, mask=mask, generator=torch.Generator().manual_seed(0)),
        mp.prior_sample({"x": (b, n, F), "adj": (b, n, n)}, mask=mask, dtype=F64),
    ):
        a = y["adj"]
        assert torch.equal(a, a.transpose(-1, -2)) and not a.diagonal(dim1=-2, dim2=-1).any()
        assert not y["x"][:, 3].any() and not a[:, 3].any() and not a[:, :, 3].any()
        assert y["x"][:, :3].abs().min() > 0


def test_tree_of_tuples_and_tree_masks():
    # any tree: a tuple of processes, masks given per leaf
    mp = MultiProcess((VP(), VP()))
    b = 2000
    m0 = torch.ones(b, 3, dtype=F64)
    m0[:, 0] = 0

    def model(t, x, mask=None):
        a, s = VP().marginal(t)  # t: a (B,) tensor
        c = (a * a * 0.25 + s * s)[:, None]
        return tuple(-v / c for v in x)

    for sampler in ("pf_adaptive", "sde_adaptive"):  # adaptive steps on a tree state
        r = multi_sample(model, mp, ((64, 3), (64, 2)), sampler=sampler, seed=0, dtype=F64, rtol=0.1, atol=0.1)
        assert r.nfe > 0 and isinstance(r.x, tuple) and r.x[1].shape == (64, 2)
    r = multi_sample(model, mp, ((b, 3), (b, 2)), nfe=30, mask=(m0, None), seed=0, dtype=F64)
    assert isinstance(r.x, tuple) and not r.x[0][:, 0].any()
    assert abs(float(r.x[1].std()) - math.sqrt(0.25 + VP().marginal(mp.t0)[1] ** 2)) < 0.03
    assert abs(float(r.x[0][:, 1:].std()) - math.sqrt(0.25 + VP().marginal(mp.t0)[1] ** 2)) < 0.03


# -------------------------------------------------------------------------------------- loss
def test_dsm_loss_closed_form_and_zero_gradient_at_exact_score():
    # independent Gaussian entries: at the exact score the per-leaf eps-weighted loss is
    # E(sigma s + eps)^2 = 1 - sigma^2 / (alpha^2 s^2 + sigma^2) per entry; its gradient along a
    # perturbation of the score vanishes in expectation
    mp = _system(adj=VP(), mask_dims={"x": (1,), "adj": (1, 2)})
    b, n = 20000, 3
    g = torch.Generator().manual_seed(0)
    x0 = {
        "x": 0.5 + 0.7 * torch.randn(b, n, F, generator=g, dtype=F64),
        "adj": symmetric_noise(torch.randn(b, n, n, generator=g, dtype=F64)) * 0.4 - 0.3,
    }
    x0["adj"] = x0["adj"] - torch.diag_embed(x0["adj"].diagonal(dim1=-2, dim2=-1))
    t = torch.full((b,), 0.3, dtype=F64)
    exact = _product_model(mp)
    theta = torch.zeros((), dtype=F64, requires_grad=True)

    def model(t, x):
        s = exact(t, x)
        return {"x": s["x"] + theta * torch.cos(x["x"]), "adj": s["adj"] + theta * x["adj"].square()}

    loss, leaves = multi_dsm_loss(model, mp, x0, t=t, generator=g, return_leaves=True)
    a, s = VP().marginal(0.3)
    want_x = 1 - s * s / (a * a * 0.49 + s * s)
    # adj: off-diagonal entries as for x (variance 0.16), the diagonal exactly 0 (both zero)
    want_a = (1 - s * s / (a * a * 0.16 + s * s)) * (n * n - n) / (n * n)
    assert abs(float(leaves["x"].detach()) - want_x) < 0.02 and abs(float(leaves["adj"].detach()) - want_a) < 0.02
    assert abs(float(loss.detach()) - want_x - want_a) < 0.03
    (grad,) = torch.autograd.grad(loss, theta)
    assert abs(float(grad)) < 0.02
    # weights and a mask: padded entries do not count
    mask = torch.ones(b, n, dtype=F64)
    mask[:, -1] = 0
    masked = {k: v * (mask[:, :, None] if k == "x" else mask[:, :, None] * mask[:, None, :]) for k, v in x0.items()}
    _, lv = multi_dsm_loss(
        lambda t, x, m: exact(t, x), mp, masked, t=t, generator=g, mask=mask, weights={"x": 2.0}, return_leaves=True
    )
    assert abs(float(lv["x"]) - want_x) < 0.02
    assert (
        abs(float(lv["adj"]) - (1 - s * s / (a * a * 0.16 + s * s)) * 2 / 4) < 0.02
    )  # 2 of 4 valid entries off-diagonal


# ------------------------------------------------------------------------------------ errors
def test_clear_errors():
    mp = _system(mask_dims={"x": (1,), "adj": (1, 2)})
    b = 4
    shapes = {"x": (b, N, F), "adj": (b, N, N)}
    orc = _coupled_oracle()
    with pytest.raises(ValueError, match="keys"):
        multi_sample(orc.model(mp), mp, {"x": (b, N, F)}, nfe=2)
    with pytest.raises(ValueError, match=r"output\['adj'\] must have the state leaf's shape"):
        multi_sample(lambda t, x: {"x": x["x"], "adj": x["adj"][:, :2]}, mp, shapes, nfe=2)
    with pytest.raises(ValueError, match="keys"):
        multi_sample(lambda t, x: {"x": x["x"]}, mp, shapes, nfe=2)
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, N\)"):
        multi_sample(orc.model(mp), mp, shapes, nfe=2, mask=torch.ones(b + 1, N))
    with pytest.raises(ValueError, match="dimension 1 of the leaf"):
        multi_sample(orc.model(mp), mp, shapes, nfe=2, mask=torch.ones(b, N + 1))
    with pytest.raises(ValueError, match="same batch size"):
        multi_sample(orc.model(mp), mp, {"x": (b, N, F), "adj": (b + 1, N, N)}, nfe=2)
    with pytest.raises(ValueError, match="unknown sampler"):
        multi_sample(orc.model(mp), mp, shapes, nfe=2, sampler="ddim")
    with pytest.raises(ValueError, match="different times t1"):
        MultiProcess({"x": VP(t1=1.0), "adj": VP(t1=0.5)})
    with pytest.raises(TypeError, match="DiffusionProcess"):
        MultiProcess({"x": VP(), "adj": "VE"})
    with pytest.raises(ValueError, match="not leaves"):
        MultiProcess({"x": VP()}, noise_transform={"adj": symmetric_noise})
    with pytest.raises(ValueError, match="mask_dims"):
        MultiProcess({"x": VP()}, mask_dims={"x": (0,)})
    with pytest.raises(ValueError, match="mask_dims"):
        _system().leaf_masks(torch.ones(b, N), [torch.zeros(b, N, F), torch.zeros(b, N, N)])
    x0 = {"x": torch.zeros(b, N, F), "adj": torch.zeros(b, N, N)}
    with pytest.raises(ValueError, match=r"model's output\['x'\]"):
        multi_dsm_loss(lambda t, x: {"x": x["x"][:, :1], "adj": x["adj"]}, mp, x0)
    with pytest.raises(ValueError, match="does not broadcast"):
        multi_dsm_loss(lambda t, x, m: x, mp, x0, mask={"x": torch.ones(b, N + 1, 1)})
    with pytest.raises(ValueError, match="parameterisation"):
        multi_dsm_loss(lambda t, x: x, mp, x0, parameterisation="v")


def test_eps_parameterisation_matches_score():
    # a noise-predicting model -sigma_k(t) * score gives the same samples and loss
    mp, orc = _system(), _coupled_oracle()
    score = orc.model(mp)

    def eps_model(t, x):
        s = score(t, x)
        return {k: -v * mp.processes[k].marginal(t)[1][:, None, None] for k, v in s.items()}

    shapes = {"x": (64, N, F), "adj": (64, N, N)}
    for sampler in ("s4", "pc", "pf_euler"):
        a = multi_sample(score, mp, shapes, nfe=8, sampler=sampler, seed=1, dtype=F64).x
        b = multi_sample(eps_model, mp, shapes, nfe=8, sampler=sampler, parameterisation="eps", seed=1, dtype=F64).x
        assert all(torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-9) for k in a)
    x0 = orc.sample(64, generator=torch.Generator().manual_seed(0))
    la = multi_dsm_loss(score, mp, x0, generator=torch.Generator().manual_seed(1))
    lb = multi_dsm_loss(eps_model, mp, x0, parameterisation="eps", generator=torch.Generator().manual_seed(1))
    assert torch.allclose(la, lb, rtol=1e-9)


def test_denoise_is_the_posterior_mean():
    # stop at t = 0.3 and denoise: the samples are E[u0 | u_t], Gaussian with covariance
    # Sigma A C_t^{-1} A Sigma (A = diag alpha) and mean mu
    mp, orc = _system(adj=VP()), _coupled_oracle()
    b = 3000
    times = torch.linspace(1.0, 0.3, 41, dtype=F64)
    r = multi_sample(
        orc.model(mp), mp, {"x": (b, N, F), "adj": (b, N, N)}, times=times, sampler="euler_maruyama", seed=2,
        dtype=F64, denoise=True,
    )  # fmt: skip
    assert r.nfe == 41
    a, _ = orc._coeffs(mp, 0.3)
    _, ct = orc.marginal(mp, 0.3)
    want = orc.cov * a[None] @ torch.linalg.solve(ct, a[:, None] * orc.cov)
    u = orc.coords(r.x)
    assert float((u.mean(0) - orc.mean).abs().max()) < 0.08
    assert float((torch.cov(u.T) - want).norm() / want.norm()) < 0.1
    adj = r.x["adj"]
    assert torch.equal(adj, adj.transpose(-1, -2)) and not adj.diagonal(dim1=-2, dim2=-1).any()
