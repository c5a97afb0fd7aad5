"""NeuralCDE: shapes, training, gradients, adjoints."""

import pytest
import torch
from torch import nn

import torchnde as tn
from torchnde.nn._neural_cde import NeuralCDE
from torchnde.paths._interp import CubicSpline, HermiteCubic, LinearInterpolation

F64 = torch.float64


class Field(nn.Module):
    def __init__(self, hidden, channels, width=16):
        super().__init__()
        self.channels = channels
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.Tanh(), nn.Linear(width, hidden * channels), nn.Tanh())

    def forward(self, t, z):
        return self.net(z).view(*z.shape, self.channels)


class FieldArgs(Field):
    def forward(self, t, z, args):
        return args * super().forward(t, z)


def _data(batch=4, T=8, C=3, dtype=torch.float32):
    ts = torch.linspace(0, 1, T, dtype=dtype)
    xs = torch.randn(batch, T, C, dtype=dtype).cumsum(-2) * 0.3
    return ts, xs


def test_shapes_and_saveat():
    ts, xs = _data()
    model = NeuralCDE(Field(5, 3), nn.Linear(3, 5), nn.Linear(5, 2))
    X = HermiteCubic(ts, xs)
    assert model(X).shape == (4, 2)
    assert model(X, saveat=tn.SaveAt(ts=ts)).shape == (8, 4, 2)
    sol = model.solve(X)
    assert sol.ys.shape == (1, 4, 5)
    # no readout: the hidden state
    assert NeuralCDE(Field(5, 3), nn.Linear(3, 5))(X).shape == (4, 5)
    # (t, z, args) convention
    m = NeuralCDE(FieldArgs(5, 3), nn.Linear(3, 5))
    torch.testing.assert_close(m(X, args=0.0), m.initial(X.evaluate(0.0)))
    with pytest.raises(TypeError, match="args"):
        model(X, args=1.0)


def test_matches_hand_written_ode():
    """z' = f(z) dX/dt, solved directly, agrees with NeuralCDE."""
    ts, xs = _data(dtype=F64)
    f, init = Field(5, 3).double(), nn.Linear(3, 5).double()
    X = CubicSpline(ts, xs)
    ctrl = tn.PIDController(rtol=1e-9, atol=1e-9)
    model = NeuralCDE(f, init, controller=ctrl)

    def ode(t, z, args):
        return (f(t, z) @ X.derivative(t).unsqueeze(-1)).squeeze(-1)

    ref = tn.solve(tn.ODETerm(ode), tn.Tsit5(), 0.0, 1.0, init(xs[:, 0]), controller=ctrl).ys[-1]
    torch.testing.assert_close(model(X), ref, rtol=1e-7, atol=1e-7)


def test_training_reduces_loss():
    torch.manual_seed(0)
    # classify whether a noisy path goes up or down overall
    n, T = 64, 10
    ts = torch.linspace(0, 1, T)
    sign = (torch.rand(n) < 0.5).float() * 2 - 1
    xs = torch.cat([ts.expand(n, T).unsqueeze(-1), (sign.view(n, 1) * ts + 0.3 * torch.randn(n, T)).unsqueeze(-1)], -1)
    y = (sign > 0).long()
    X = LinearInterpolation(ts, xs)
    model = NeuralCDE(Field(4, 2), nn.Linear(2, 4), nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert (model(X).argmax(-1) == y).float().mean() > 0.9


def _model(adjoint, ts, dtype=F64):
    torch.manual_seed(1)
    model = NeuralCDE(
        Field(3, 2, width=4),
        nn.Linear(2, 3),
        nn.Linear(3, 1),
        controller=tn.PIDController(rtol=1e-10, atol=1e-10, jump_ts=ts),
        adjoint=adjoint,
    )
    return model.to(dtype)


def test_gradient_matches_finite_differences():
    ts, xs = _data(batch=2, T=5, C=2, dtype=F64)
    model = _model(tn.DirectAdjoint(), ts)
    xs = xs.requires_grad_()
    params = list(model.parameters())

    # gradients w.r.t. the data, and w.r.t. two parameters by central differences
    g_x, *g_p = torch.autograd.grad(model(HermiteCubic(ts, xs)).sum(), [xs, *params])
    eps = 1e-6
    with torch.no_grad():
        for idx in [(0, 1, 0), (1, 3, 1)]:
            e = torch.zeros_like(xs)
            e[idx] = eps
            fd = (model(HermiteCubic(ts, xs + e)).sum() - model(HermiteCubic(ts, xs - e)).sum()) / (2 * eps)
            torch.testing.assert_close(g_x[idx], fd, rtol=1e-5, atol=1e-7)
        w = params[0]
        for idx in [(0, 0), (2, 1)]:
            old = w[idx].item()
            w[idx] = old + eps
            up = model(HermiteCubic(ts, xs)).sum()
            w[idx] = old - eps
            down = model(HermiteCubic(ts, xs)).sum()
            w[idx] = old
            torch.testing.assert_close(g_p[0][idx], (up - down) / (2 * eps), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("adjoint", [tn.CheckpointAdjoint(), tn.BacksolveAdjoint()], ids=["checkpoint", "backsolve"])
def test_adjoints_agree_with_direct(adjoint):
    ts, xs = _data(batch=3, T=6, C=2, dtype=F64)
    grads = []
    for adj in (tn.DirectAdjoint(), adjoint):
        model = _model(adj, ts)
        x = xs.clone().requires_grad_()
        out = model(HermiteCubic(ts, x)).square().sum()
        grads.append(torch.autograd.grad(out, [x, *model.parameters()]))
    # CheckpointAdjoint is exact; BacksolveAdjoint is accurate to the solver's tolerance
    tol = dict(rtol=1e-6, atol=1e-8) if isinstance(adjoint, tn.CheckpointAdjoint) else dict(rtol=1e-4, atol=1e-7)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol)


def test_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        NeuralCDE(lambda t, z: z, nn.Linear(2, 2))
    with pytest.raises(TypeError, match="initial"):
        NeuralCDE(Field(2, 2), lambda x: x)
    with pytest.raises(ValueError, match="dt0"):
        NeuralCDE(Field(2, 2), nn.Linear(2, 2), solver=tn.RK4())
    with pytest.raises(TypeError, match="interpolation"):
        NeuralCDE(Field(2, 2), nn.Linear(2, 2))(torch.zeros(3, 2))
    # constant steps work
    ts, xs = _data(C=2)
    assert NeuralCDE(Field(2, 2), nn.Linear(2, 2), solver=tn.RK4(), dt0=0.1)(LinearInterpolation(ts, xs)).shape == (
        4,
        2,
    )
