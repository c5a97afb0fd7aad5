"""torchnde.nn.NeuralSDE and the latent SDE of Li et al. (2020)."""

import copy
import io
import math

import pytest
import torch
from torch import nn

import torchnde as tn
from torchnde.nn._latent_sde import LatentSDE
from torchnde.nn._neural_sde import NeuralSDE, brownian_shape
from torchnde.paths._brownian import BrownianGrid, VirtualBrownianTree


class Drift(nn.Module):
    def __init__(self, d=2, width=8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, d))

    def forward(self, t, y):
        return self.net(y) * (1 + 0.1 * t)


class Diffusion(nn.Module):
    """Diagonal/scalar noise: y-dependent; general noise: (..., d, m)."""

    def __init__(self, d=2, m=None):
        super().__init__()
        self.m = m
        self.lin = nn.Linear(d, d if m is None else d * m)

    def forward(self, t, y):
        g = 0.3 * torch.sigmoid(self.lin(y))
        return g if self.m is None else g.view(*y.shape, self.m)


@pytest.mark.parametrize(
    "noise,m,solver",
    [("diagonal", None, tn.Euler()), ("scalar", None, tn.Heun()), ("general", 3, tn.Euler())],
)
def test_shapes_and_first_row(noise, m, solver):
    model = NeuralSDE(Drift(), Diffusion(m=m), noise=noise, brownian_size=m, solver=solver, dt0=0.1)
    y0 = torch.randn(5, 2)
    ts = torch.linspace(0, 1, 4)
    ys = model(y0, ts)
    assert ys.shape == (4, 5, 2)
    assert torch.equal(ys[0], y0)
    assert torch.isfinite(ys).all()
    assert brownian_shape(noise, y0.shape, m) == {"diagonal": (5, 2), "scalar": (5, 1), "general": (5, 3)}[noise]


def test_steps_land_on_save_times_and_grid():
    model = NeuralSDE(Drift(), Diffusion(), dt0=0.1)
    ts = torch.tensor([0.0, 0.25, 1.0])
    sol = model.solution(torch.zeros(3, 2), ts)
    # 10 equal steps of 0.1 plus the save time 0.25 splitting one of them
    assert sol.stats["num_steps"] == 11
    assert torch.allclose(sol.ts, ts)


def test_fresh_path_per_call_reproducible_under_manual_seed():
    model = NeuralSDE(Drift(), Diffusion(), dt0=0.05)
    y0, ts = torch.zeros(4, 2), torch.linspace(0, 1, 5)
    torch.manual_seed(1)
    a = model(y0, ts)
    b = model(y0, ts)
    torch.manual_seed(1)
    c = model(y0, ts)
    assert not torch.equal(a, b)  # a fresh path each call
    assert torch.equal(a, c)  # reproducible under torch.manual_seed
    assert torch.equal(model(y0, ts, seed=7), model(y0, ts, seed=7))
    # a given path: the seeded default is a BrownianGrid on the step grid
    grid = [k * 0.05 for k in range(21)]
    bm = BrownianGrid(grid, (4, 2), seed=7)
    assert torch.allclose(model(y0, ts, bm=bm), model(y0, ts, seed=7), atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        model(y0, ts, seed=1, bm=bm)


def test_adaptive_uses_a_virtual_tree_and_is_deterministic():
    model = NeuralSDE(Drift(), Diffusion(), solver=tn.Heun(), controller=tn.PIDController(rtol=1e-2, atol=1e-3))
    y0, ts = torch.zeros(4, 2), torch.linspace(0, 1, 3)
    assert torch.equal(model(y0, ts, seed=3), model(y0, ts, seed=3))
    bm = VirtualBrownianTree(0.0, 1.0, (4, 2), seed=3)
    assert torch.equal(model(y0, ts, bm=bm), model(y0, ts, seed=3))


class Lin(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, t, y):
        return torch.tanh(y @ self.w) - 0.5 * y


class Sig(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = nn.Parameter(s)

    def forward(self, t, y):
        return self.s * torch.cos(y) + 0.2


@pytest.mark.parametrize("solver", [tn.Euler(), tn.Heun()])
def test_gradients_match_finite_differences_float64(solver):
    w0 = torch.tensor([[0.4, -0.3], [0.2, 0.5]], dtype=torch.float64)
    s0 = torch.tensor([0.3, -0.2], dtype=torch.float64)
    model = NeuralSDE(Lin(w0), Sig(s0), solver=solver, dt0=0.1).double()
    ts = torch.linspace(0, 1, 3, dtype=torch.float64)
    bm = BrownianGrid.uniform(0.0, 1.0, 10, (2, 2), seed=5, dtype=torch.float64)

    def fn(y0, w, s):
        return torch.func.functional_call(model, {"drift.w": w, "diffusion.s": s}, (y0, ts), {"bm": bm})

    y0 = torch.tensor([[0.3, -0.1], [0.5, 0.2]], dtype=torch.float64)
    assert torch.autograd.gradcheck(fn, (y0.requires_grad_(), w0.clone().requires_grad_(), s0.clone().requires_grad_()))


def test_reversible_adjoint_matches_direct_through_reversible_heun():
    torch.manual_seed(2)
    drift, diff = Drift(), Diffusion()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    ts = torch.linspace(0, 1, 4, dtype=torch.float64)
    grads = []
    for adjoint in (tn.DirectAdjoint(), tn.ReversibleAdjoint()):
        model = NeuralSDE(
            copy.deepcopy(drift), copy.deepcopy(diff), solver=tn.ReversibleHeun(), dt0=0.02, adjoint=adjoint
        ).double()
        x = y0.clone().requires_grad_()
        loss = model(x, ts, seed=11).square().sum()
        grads.append(torch.autograd.grad(loss, [x, *model.parameters()]))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


def test_training_fits_ou_moments():
    """Fit a linear drift and constant noise to the mean and variance of an OU process."""
    theta, sigma, x0 = 1.0, 0.5, 1.5
    ts = torch.linspace(0, 1, 5)
    mean = x0 * torch.exp(-theta * ts[1:])
    var = sigma**2 / (2 * theta) * (1 - torch.exp(-2 * theta * ts[1:]))

    class Noise(nn.Module):
        def __init__(self):
            super().__init__()
            self.log_s = nn.Parameter(torch.tensor(math.log(0.1)))

        def forward(self, t, y):
            return self.log_s.exp().expand_as(y)

    class LinearDrift(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 1)

        def forward(self, t, y):
            return self.lin(y)

    model = NeuralSDE(LinearDrift(), Noise(), dt0=0.05)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    y0 = torch.full((512, 1), x0)

    def loss_fn():
        ys = model(y0, ts)[1:, :, 0]
        return (ys.mean(1) - mean).square().sum() + (ys.var(1) - var).square().sum() * 10

    first = loss_fn().item()
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = sum(loss_fn().item() for _ in range(3)) / 3
    assert last < 0.05 * first
    assert abs(model.diffusion.log_s.exp().item() - sigma) < 0.15


def test_module_plumbing_state_dict_to_and_errors():
    model = NeuralSDE(Drift(), Diffusion(), dt0=0.1)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = NeuralSDE(Drift(), Diffusion(), dt0=0.1)
    other.load_state_dict(torch.load(buf))
    y0, ts = torch.zeros(2, 2), torch.linspace(0, 1, 3)
    assert torch.equal(model(y0, ts, seed=1), other(y0, ts, seed=1))
    assert set(model.state_dict()) == {"drift.net.0.weight", "drift.net.0.bias", "drift.net.2.weight",
                                       "drift.net.2.bias", "diffusion.lin.weight", "diffusion.lin.bias"}  # fmt: skip
    model.double()
    assert model(y0.double(), ts, seed=1).dtype == torch.float64
    with pytest.raises(ValueError, match="dt0"):
        NeuralSDE(Drift(), Diffusion())
    with pytest.raises(TypeError, match="nn.Module"):
        NeuralSDE(lambda t, y: y, Diffusion(), dt0=0.1)
    with pytest.raises(TypeError, match="SDE solver"):
        NeuralSDE(Drift(), Diffusion(), solver=tn.Tsit5(), dt0=0.1)
    with pytest.raises(ValueError, match="brownian_size"):
        NeuralSDE(Drift(), Diffusion(), noise="general", dt0=0.1)
    with pytest.raises(TypeError, match="stratonovich"):
        NeuralSDE(Drift(), Diffusion(), calculus="stratonovich", dt0=0.1)(y0.double(), ts)


# ---------------------------------------------------------------------------------------------
# latent SDE


def _toy_data(T=12, B=6, D=2):
    ts = torch.linspace(0, 1.5, T)
    xs = torch.stack([torch.sin(3 * ts), torch.cos(2 * ts)], -1)[:, None, :D] + 0.05 * torch.randn(T, B, D)
    return ts, xs


def test_latent_sde_elbo_is_finite_and_kl_nonnegative():
    model = LatentSDE(2, 3, 4, 16)
    ts, xs = _toy_data()
    out = model(ts, xs)
    assert out.zs.shape == (12, 6, 3)
    for v in (out.elbo, out.log_likelihood, out.kl_z0, out.kl_path):
        assert v.dim() == 0 and torch.isfinite(v)
    assert out.kl_path >= 0 and out.kl_z0 >= 0
    out.elbo.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.sample(ts, 5).shape == (12, 5, 2)
    xs_, zs_ = model.sample(ts, 5, latent=True)
    assert zs_.shape == (12, 5, 3)


class _Const(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.register_buffer("value", torch.tensor(value))

    def forward(self, t, z, *context):
        return self.value.expand_as(z)


def test_latent_sde_path_kl_matches_closed_form():
    """Constant drifts f, h and noise s: the path KL is 1/2 |(f - h)/s|^2 (t1 - t0), for any path."""
    model = LatentSDE(2, 3, 4, 16)
    f, h, s = [0.5, -1.0, 2.0], [0.0, 0.5, 1.0], [0.5, 1.0, 2.0]
    model.posterior_drift, model.prior_drift, model.diffusion = _Const(f), _Const(h), _Const(s)
    ts, xs = _toy_data()
    out = model(ts, xs)
    expected = 0.5 * sum(((a - b) / c) ** 2 for a, b, c in zip(f, h, s)) * 1.5
    assert out.kl_path.item() == pytest.approx(expected, rel=1e-5)


def test_latent_sde_training_increases_the_elbo():
    torch.manual_seed(0)
    model = LatentSDE(2, 3, 4, 16)
    ts, xs = _toy_data(B=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def elbo():
        torch.manual_seed(123)  # same z0 noise and Brownian path before and after
        return model(ts, xs, seed=9).elbo

    with torch.no_grad():
        before = elbo().item()
    for _ in range(25):
        opt.zero_grad()
        (-model(ts, xs).elbo).backward()
        opt.step()
    with torch.no_grad():
        after = elbo().item()
    assert after > before + 0.2 * abs(before)
