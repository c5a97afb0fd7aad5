"""Continuous normalizing flows (torchnde.generative.cnf)."""

import math
import time

import pytest
import torch

import torchnde as tn
from torchnde.generative.cnf import CNF
from torchnde.generative.likelihood import integrate_augmented, standard_normal_log_prob, trace_noise

F64 = torch.float64
TIGHT = tn.PIDController(rtol=1e-10, atol=1e-10)


pytestmark = pytest.mark.usefixtures("one_thread")


class Field(torch.nn.Module):
    """f(t, x) with t a (batch,) tensor, as CNF passes it."""

    def __init__(self, d, hidden=16, dtype=F64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d + 1, hidden, dtype=dtype), torch.nn.Tanh(), torch.nn.Linear(hidden, d, dtype=dtype)
        )
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) / math.sqrt(p.shape[-1]))

    def forward(self, t, x):
        assert t.shape == (x.shape[0],)
        return self.net(torch.cat([x, t[:, None]], -1))


class Linear(torch.nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = torch.nn.Parameter(A.clone())

    def forward(self, t, x):
        return x @ self.A.T


@pytest.mark.parametrize("d", [2, 3])
def test_log_density_matches_slogdet_of_the_flow_jacobian(d):
    field = Field(d, seed=d)
    cnf = CNF(field, event_shape=(d,), trace="exact", controller=TIGHT)
    x = torch.randn(4, d, dtype=F64)

    def flow(xi):  # the flow map data -> prior of one point, by the same solver
        sol = tn.solve(tn.ODETerm(lambda t, y, a: field(t.expand(1), y)), tn.Tsit5(), 0.0, 1.0, xi[None],
                       controller=TIGHT, per_sample=True)  # fmt: skip
        return sol.ys[0, -1]

    expected = []
    for xi in x:
        J = torch.autograd.functional.jacobian(flow, xi)
        z = flow(xi)
        expected.append(standard_normal_log_prob(z[None])[0] + torch.linalg.slogdet(J).logabsdet)
    with torch.no_grad():
        lp = cnf.log_prob(x)
    err = (lp - torch.stack(expected)).abs().max().item()
    assert err < 1e-5, err


def test_sampling_inverts_the_flow_and_carries_the_log_density():
    cnf = CNF(Field(2, seed=7), event_shape=(2,), trace="exact", controller=TIGHT)
    with torch.no_grad():
        x, lp = cnf.sample(16, seed=0, return_log_prob=True)
        x2 = cnf.sample(16, seed=0)
        lp_fwd = cnf.log_prob(x)
    assert x.shape == (16, 2) and x.dtype == F64
    torch.testing.assert_close(x, x2, rtol=0, atol=1e-8)
    torch.testing.assert_close(lp, lp_fwd, rtol=0, atol=1e-7)


def test_linear_flow_log_density_and_regularisers_are_analytic():
    # x' = A x on [0, T]: log p = log N(e^{AT} x) + T tr A; int |f|^2 = int |A e^{At} x|^2 dt;
    # int ||df/dx||_F^2 = T ||A||_F^2 (exactly, with the exact trace)
    A = torch.tensor([[-0.4, 0.9], [-0.7, 0.1]], dtype=F64)
    T = 1.3
    cnf = CNF(Linear(A), event_shape=(2,), t1=T, trace="exact", controller=TIGHT,
              regularisation={"kinetic": 1.0, "jacobian_frobenius": 1.0})  # fmt: skip
    x = torch.randn(5, 2, dtype=F64)
    with torch.no_grad():
        lp = cnf.log_prob(x)
        total, parts = cnf.loss(x, return_parts=True)
    exact_lp = standard_normal_log_prob(x @ torch.linalg.matrix_exp(A * T).T) + T * torch.trace(A)
    torch.testing.assert_close(lp, exact_lp, rtol=0, atol=1e-8)
    ts = torch.linspace(0, T, 4001, dtype=F64)
    speeds = torch.stack([(x @ (A @ torch.linalg.matrix_exp(A * s)).T).pow(2).sum(-1) for s in ts])
    kinetic = torch.trapezoid(speeds, ts, dim=0).mean()
    assert abs(parts["kinetic"].item() - kinetic.item()) < 1e-6
    assert abs(parts["jacobian_frobenius"].item() - T * A.pow(2).sum().item()) < 1e-8
    assert abs(total.item() - (-exact_lp.mean() + kinetic + T * A.pow(2).sum()).item()) < 1e-6


@pytest.mark.parametrize("trace", ["hutchinson-gaussian", "hutchinson-rademacher"])
def test_hutchinson_frobenius_regulariser_is_unbiased(trace):
    # |eps^T J|^2 is unbiased for ||J||_F^2 when E[eps eps^T] = I (Finlay et al. 2020)
    field = Field(3, seed=11)
    f = lambda t, x: field(torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]), x)
    x = torch.randn(3, 3, dtype=F64).repeat_interleave(300, 0)
    ctrl = tn.PIDController(rtol=1e-7, atol=1e-7)
    with torch.no_grad():
        _, exact, _ = integrate_augmented(
            f, x[::300], 0.0, 1.0, trace="exact", jacobian_frobenius=True, controller=ctrl
        )
        noise = trace_noise(x, trace, seed=3)
        _, est, _ = integrate_augmented(f, x, 0.0, 1.0, trace=trace, noise=noise, jacobian_frobenius=True,
                                        controller=ctrl)  # fmt: skip
    e = est["jacobian_frobenius"].view(3, 300)
    z = (e.mean(1) - exact["jacobian_frobenius"]) / (e.std(1) / math.sqrt(300))
    assert (e.std(1) > 1e-3).all() and (z.abs() < 4).all(), z


@pytest.mark.parametrize("adjoint", [tn.BacksolveAdjoint(), tn.CheckpointAdjoint()])
def test_training_gradients_agree_across_adjoints(adjoint):
    x = torch.randn(6, 2, dtype=F64)
    grads = []
    for adj in (tn.DirectAdjoint(), adjoint):
        field = Field(2, seed=5)
        cnf = CNF(field, event_shape=(2,), adjoint=adj, per_sample=False, controller=TIGHT,
                  regularisation={"kinetic": 0.1, "jacobian_frobenius": 0.1})  # fmt: skip
        cnf.loss(x, seed=0).backward()
        grads.append([p.grad for p in field.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_bad_configuration_is_reported():
    with pytest.raises(ValueError, match="jacobian_frobenius"):
        CNF(Field(2), regularisation={"frobenius": 1.0})
    with pytest.raises(ValueError, match="hutchinson-gaussian"):
        CNF(Field(2), trace="hutch")
    with pytest.raises(ValueError, match="event_shape"):
        CNF(Field(2)).sample(3)
    with pytest.raises(ValueError, match="example shape"):
        CNF(Field(2), event_shape=(2,)).log_prob(torch.randn(3, 3, dtype=F64))


def test_distribution_prior():
    prior = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=F64), 2.0 * torch.eye(2, dtype=F64))
    cnf = CNF(Linear(torch.zeros(2, 2, dtype=F64)), prior, trace="exact")
    x = cnf.sample(5)
    with torch.no_grad():
        torch.testing.assert_close(cnf.log_prob(x), prior.log_prob(x))


class MLP(torch.nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, hidden), torch.nn.Softplus(), torch.nn.Linear(hidden, hidden),
            torch.nn.Softplus(), torch.nn.Linear(hidden, 2),
        )  # fmt: skip

    def forward(self, t, x):
        return self.net(torch.cat([x, t[:, None]], -1))


@pytest.mark.slow
def test_maximum_likelihood_training_reaches_the_issue_target_on_scaled_moons(one_thread):
    # issue 5: a maximum-likelihood CNF reaches test NLL <= 1.95 nats on scaled (standardised) moons
    from torchnde.generative.data import sample

    torch.manual_seed(0)
    cnf = CNF(MLP(64), event_shape=(2,), trace="exact", controller=tn.PIDController(rtol=1e-3, atol=1e-5),
              regularisation={"kinetic": 0.01, "jacobian_frobenius": 0.01})  # fmt: skip
    train, test = sample("moons", 8192, seed=0), sample("moons", 1000, seed=1)
    with torch.no_grad():
        before = -cnf.log_prob(test)
    opt = torch.optim.Adam(cnf.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(300):
        batch = train[torch.randint(0, len(train), (256,), generator=g)]
        loss = cnf.loss(batch, seed=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = -cnf.log_prob(test)
    gain = before - after  # paired per test point
    se = gain.std() / math.sqrt(len(gain))
    print(f"test NLL {before.mean():.3f} -> {after.mean():.3f} nats in {time.perf_counter() - start:.1f}s")
    assert gain.mean() > 10 * se  # the improvement is far outside the test set's sampling noise
    assert after.mean() <= 1.95
