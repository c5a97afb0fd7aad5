"""torchnde.compat.torchdiffeq: torchdiffeq's odeint/odeint_adjoint computed by torchnde.

The first half runs without torchdiffeq (closed-form solutions, hand-written steps, errors); the
second half compares with torchdiffeq itself where it is installed.
"""

import math

import pytest
import torch
from torch import nn

import torchnde as tn
from torchnde.compat.torchdiffeq import odeint, odeint_adjoint

ADAPTIVE = ["dopri5", "dopri8", "bosh3", "adaptive_heun", "tsit5"]
FIXED = ["euler", "midpoint", "rk4", "heun2", "heun3"]
F64 = torch.float64

A = torch.tensor([[-0.3, 1.0], [-1.0, -0.3]], dtype=F64)


def linear(t, y):
    return y @ A.T


def linear_exact(y0, t):
    return torch.stack([torch.linalg.matrix_exp(A * (s - t[0])) @ y0 for s in t])


def within(a, b, rtol, atol, factor=10.0):
    """|a - b| <= factor * (atol + rtol * |b|) elementwise."""
    bound = factor * (atol + rtol * b.abs())
    assert ((a - b).abs() <= bound).all(), f"max excess {((a - b).abs() - bound).max().item():.3g}"


# --------------------------------------------------------------------------------------------
# without torchdiffeq


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("direction", [1, -1], ids=["increasing", "decreasing"])
def test_adaptive_methods_match_the_closed_form(method, direction):
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.linspace(0.0, 3.0, 7, dtype=F64) * direction
    rtol, atol = (1e-5, 1e-7) if method == "adaptive_heun" else (1e-7, 1e-9)  # (2nd order: many steps)
    ys = odeint(linear, y0, t, method=method, rtol=rtol, atol=atol)
    assert ys.shape == (7, 2) and ys.dtype == F64
    assert torch.equal(ys[0], y0)
    within(ys, linear_exact(y0, t), rtol, atol, factor=100.0)


@pytest.mark.parametrize("method", FIXED)
def test_fixed_methods_converge_at_their_order(method):
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    exact = linear_exact(y0, t)[-1]
    errs = [(odeint(linear, y0, t, method=method, options=dict(step_size=h))[-1] - exact).norm() for h in (0.1, 0.05)]
    order = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}[method]
    assert abs(math.log2(errs[0] / errs[1]) - order) < 0.3


def test_rk4_is_the_three_eighths_rule_and_heun3_is_heuns_third_order_method():
    # one step each, written out by hand (torchdiffeq's tableaus)
    f = lambda t, y: torch.stack([y[1] * t, -torch.sin(y[0])]) + 0.1
    y0 = torch.tensor([0.3, -0.2], dtype=F64)
    h = 0.2
    t = torch.tensor([0.1, 0.1 + h], dtype=F64)
    t0 = t[0]
    k1 = f(t0, y0)
    k2 = f(t0 + h / 3, y0 + h * k1 / 3)
    k3 = f(t0 + 2 * h / 3, y0 + h * (k2 - k1 / 3))
    k4 = f(t0 + h, y0 + h * (k1 - k2 + k3))
    torch.testing.assert_close(odeint(f, y0, t, method="rk4")[-1], y0 + h * (k1 + 3 * k2 + 3 * k3 + k4) / 8)
    k2 = f(t0 + h / 3, y0 + h * k1 / 3)
    k3 = f(t0 + 2 * h / 3, y0 + h * 2 * k2 / 3)
    torch.testing.assert_close(odeint(f, y0, t, method="heun3")[-1], y0 + h * (k1 + 3 * k3) / 4)


def test_fixed_grid_steps_on_t_or_step_size_or_grid_constructor():
    calls = []

    def f(t, y):
        calls.append(t.item())
        return -y

    y0 = torch.ones(1, dtype=F64)
    t = torch.tensor([0.0, 0.1, 0.3, 0.6], dtype=F64)
    ys = odeint(f, y0, t, method="euler")  # default grid: t itself
    expected = [1.0]
    for a, b in zip(t[:-1].tolist(), t[1:].tolist()):
        expected.append(expected[-1] * (1 - (b - a)))
    torch.testing.assert_close(ys[:, 0], torch.tensor(expected, dtype=F64))
    assert {round(c, 12) for c in calls} <= {0.0, 0.1, 0.3, 0.6}
    ys = odeint(f, y0, t, method="euler", options=dict(step_size=0.1))
    torch.testing.assert_close(ys[-1, 0], torch.tensor(0.9**6, dtype=F64))
    grid = lambda func, y0, t: torch.linspace(t[0], t[-1], 13, dtype=t.dtype)
    ys = odeint(f, y0, t, method="euler", options=dict(grid_constructor=grid))
    torch.testing.assert_close(ys[-1, 0], torch.tensor(0.95**12, dtype=F64))
    with pytest.raises(ValueError, match="mutually exclusive"):
        odeint(f, y0, t, method="euler", options=dict(step_size=0.1, grid_constructor=grid))
    with pytest.raises(ValueError, match="grid_constructor must return"):
        odeint(f, y0, t, method="euler", options=dict(grid_constructor=lambda func, y0, t: t[:-1]))


def test_tuple_state_harmonic_oscillator():
    t = torch.linspace(0.0, 2.0, 5, dtype=F64)
    x0, v0 = torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64)
    f = lambda t, y: (y[1], -y[0])
    for method, kw in [("dopri5", {}), ("rk4", dict(options=dict(step_size=0.01)))]:
        xs, vs = odeint(f, (x0, v0), t, method=method, **kw)
        assert xs.shape == vs.shape == (5, 3)
        torch.testing.assert_close(xs, torch.cos(t)[:, None].expand(5, 3), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(vs, -torch.sin(t)[:, None].expand(5, 3), rtol=1e-6, atol=1e-7)


def test_func_receives_t_as_a_0d_tensor_of_y0s_dtype():
    seen = set()

    def f(t, y):
        assert isinstance(t, torch.Tensor) and t.dim() == 0
        seen.add((t.dtype, t.device))
        return -y * t.item() + 0 * t  # both Python and tensor uses of t keep working

    for dtype in (torch.float32, F64):
        y0 = torch.ones(2, dtype=dtype)
        for method in ("dopri5", "rk4"):
            seen.clear()
            options = dict(step_size=0.05) if method == "rk4" else None
            ys = odeint(f, y0, torch.tensor([0.0, 1.0], dtype=F64), method=method, options=options)
            torch.testing.assert_close(ys[-1], torch.exp(-0.5 * torch.ones(2, dtype=dtype)), rtol=1e-5, atol=1e-6)
            assert seen == {(dtype, y0.device)}


def test_single_time_returns_y0():
    y0 = torch.randn(3, requires_grad=True)
    out = odeint(lambda t, y: -y, y0, torch.tensor([0.5]))
    assert out.shape == (1, 3) and torch.equal(out[0], y0)
    out.sum().backward()
    assert torch.equal(y0.grad, torch.ones(3))


def test_adaptive_options():
    y0 = torch.ones(1, dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    # jump_t: a discontinuous vector field is integrated exactly (piecewise constant slope)
    f = lambda t, y: torch.where(t < 1.0, 1.0, -2.0) * torch.ones_like(y)
    ys = odeint(f, y0, t, options=dict(jump_t=torch.tensor([1.0], dtype=F64)))
    torch.testing.assert_close(ys[-1], torch.zeros(1, dtype=F64), rtol=0, atol=1e-12)
    # step_t / max_step / first_step / safety / ifactor / dfactor are accepted
    ys = odeint(
        linear,
        torch.tensor([1.0, 0.5], dtype=F64),
        t,
        options=dict(
            step_t=[0.5], max_step=0.25, first_step=0.01, safety=0.8, ifactor=5.0, dfactor=0.3, max_num_steps=1000
        ),
    )
    within(ys, linear_exact(torch.tensor([1.0, 0.5], dtype=F64), t), 1e-7, 1e-9, factor=100.0)
    # max_num_steps limits the steps; failures raise torchnde.SolveError
    with pytest.raises(tn.SolveError, match="max_steps"):
        odeint(linear, torch.tensor([1.0, 0.5], dtype=F64), t, options=dict(max_num_steps=3))
    # min_step: every step of that size is accepted, as in torchdiffeq
    ys = odeint(linear, torch.tensor([1.0, 0.5], dtype=F64), t, rtol=1e-12, atol=1e-12, options=dict(min_step=0.5))
    assert torch.isfinite(ys).all()
    # norm: called with the state's structure
    shapes = []

    def norm(x):
        shapes.append(tuple(tuple(v.shape) for v in x))
        return max(v.abs().max() for v in x)

    odeint(
        lambda t, y: (-y[0], -y[1]),
        (torch.ones(2), torch.ones(3, 1)),
        torch.tensor([0.0, 1.0]),
        options=dict(norm=norm),
    )
    assert shapes and set(shapes) == {((2,), (3, 1))}


def test_errors_name_the_valid_choices():
    y0, t = torch.ones(2), torch.tensor([0.0, 1.0])
    f = lambda t, y: -y
    with pytest.raises(ValueError, match=r"Invalid method 'rk45'.*'dopri5'.*'rk4'"):
        odeint(f, y0, t, method="rk45")
    for method in ["fehlberg2", "explicit_adams", "implicit_adams", "fixed_adams", "scipy_solver"]:
        with pytest.raises(NotImplementedError, match="use '"):
            odeint(f, y0, t, method=method)
    with pytest.raises(TypeError, match=r"unknown options.*'step_size'.*fixed-grid.*first_step"):
        odeint(f, y0, t, options=dict(step_size=0.1))
    with pytest.raises(TypeError, match=r"unknown options.*'rtol'.*Valid options are: first_step"):
        odeint(f, y0, t, options=dict(rtol=1e-3))
    with pytest.raises(TypeError, match=r"unknown options.*'first_step'.*Valid options are: step_size"):
        odeint(f, y0, t, method="rk4", options=dict(first_step=0.1))
    with pytest.raises(NotImplementedError, match="events are not supported"):
        odeint(f, y0, t, event_fn=lambda t, y: y[0])
    with pytest.raises(NotImplementedError, match="with respect to t"):
        odeint(f, y0, t.clone().requires_grad_())
    with pytest.raises(NotImplementedError, match="per-element"):
        odeint(f, y0, t, rtol=torch.tensor([1e-3, 1e-4]))
    with pytest.raises(NotImplementedError, match="perturb"):
        odeint(f, y0, t, method="euler", options=dict(perturb=True))
    with pytest.raises(NotImplementedError, match="interp='linear'"):
        odeint(f, y0, t, method="euler", options=dict(step_size=0.1, interp="linear"))
    with pytest.raises(ValueError, match="strictly increasing or decreasing"):
        odeint(f, y0, torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(TypeError, match="tuple"):
        odeint(f, [y0], t)
    with pytest.raises(TypeError, match="floating point"):
        odeint(f, y0, torch.tensor([0, 1]))

    class WithCallback(nn.Module):
        def forward(self, t, y):
            return -y

        def callback_step(self, t0, y0, dt):
            pass

    with pytest.raises(NotImplementedError, match="callback_step"):
        odeint(WithCallback(), y0, t)
    # equal tuple tolerances collapse to one value
    odeint(lambda t, y: (-y[0], -y[1]), (y0, y0), t, rtol=(1e-6, 1e-6), atol=torch.tensor(1e-8))


def test_adjoint_argument_errors():
    y0, t = torch.ones(2), torch.tensor([0.0, 1.0])
    f = lambda t, y: -y
    with pytest.raises(ValueError, match="nn.Module"):
        odeint_adjoint(f, y0, t)
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="adjoint_options"):
        odeint_adjoint(
            lambda t, y: net(y),
            y0,
            t,
            adjoint_params=(),
            method="rk4",
            adjoint_method="dopri5",
            options=dict(step_size=0.1),
        )
    with pytest.raises(NotImplementedError, match="custom adjoint_options"):
        odeint_adjoint(f, y0, t, adjoint_params=(), adjoint_options=dict(norm=lambda x: x.abs().max()))
    with pytest.raises(TypeError, match="unknown adjoint_options"):
        odeint_adjoint(f, y0, t, adjoint_params=(), adjoint_options=dict(stepsize=0.1))


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, t, y):
        return self.net(y) * (1 + 0.1 * t)


def _grads(fn, func, y0, t, params, **kw):
    ys = fn(func, y0, t, **kw)
    ys = ys if isinstance(ys, torch.Tensor) else torch.cat([y.flatten(1) for y in ys], 1)
    leaves = [y0] if isinstance(y0, torch.Tensor) else list(y0)
    gs = torch.autograd.grad(ys.square().sum(), leaves + list(params))
    return ys.detach(), gs


@pytest.mark.parametrize(
    "case", ["dopri5", "decreasing", "tuple", "seminorm", "rk4-step", "euler-then-dopri5", "rk4-grid"]
)
def test_adjoint_gradients_match_backpropagation(case):
    torch.manual_seed(0)
    func = Field().double()
    params = list(func.parameters())
    y0 = torch.randn(4, 2, dtype=F64, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 4, dtype=F64)
    kw = dict(rtol=1e-8, atol=1e-8)
    adj_kw = {}
    tol = dict(rtol=1e-4, atol=1e-6)
    if case == "decreasing":
        t = t.flip(0)
    elif case == "tuple":
        y0 = (y0, torch.randn(3, dtype=F64, requires_grad=True))
        net = func

        def func(t, y):
            return (net(t, y[0]), -y[1] * y[0].sum())

        adj_kw = dict(adjoint_params=params)
    elif case == "seminorm":
        adj_kw = dict(adjoint_options=dict(norm="seminorm"))
    elif case == "rk4-step":
        kw = dict(method="rk4", options=dict(step_size=0.05))
        tol = dict(rtol=1e-3, atol=1e-5)  # the continuous adjoint of a discrete solve: O(h^4) apart
    elif case == "euler-then-dopri5":
        kw = dict(method="euler", options=dict(step_size=0.001))
        adj_kw = dict(adjoint_method="dopri5", adjoint_options={}, adjoint_rtol=1e-8, adjoint_atol=1e-8)
        tol = dict(rtol=1e-2, atol=1e-3)
    elif case == "rk4-grid":
        t = torch.linspace(0.0, 1.0, 41, dtype=F64)
        kw = dict(method="rk4")
        tol = dict(rtol=1e-3, atol=1e-5)
    ys_d, g_d = _grads(odeint, func, y0, t, params, **kw)
    ys_a, g_a = _grads(odeint_adjoint, func, y0, t, params, **kw, **adj_kw)
    torch.testing.assert_close(ys_a, ys_d, rtol=0, atol=0)  # the same forward solve
    for a, d in zip(g_a, g_d):
        torch.testing.assert_close(a, d, **tol)


def test_adjoint_params_select_what_is_differentiated():
    torch.manual_seed(0)
    func = Field()
    y0, t = torch.randn(3, 2, requires_grad=True), torch.linspace(0, 1, 3)
    first = func.net[0].weight
    odeint_adjoint(func, y0, t, adjoint_params=(first,)).sum().backward()
    assert first.grad is not None
    assert all(p.grad is None for p in func.parameters() if p is not first)
    first.grad = None
    odeint_adjoint(func, y0, t, adjoint_params=()).sum().backward()
    assert all(p.grad is None for p in func.parameters())
    # a plain function with its tensors listed explicitly
    w = torch.randn(2, 2, requires_grad=True)
    odeint_adjoint(lambda t, y: y @ w, y0, t, adjoint_params=(w,)).sum().backward()
    assert w.grad is not None


# --------------------------------------------------------------------------------------------
# against torchdiffeq


@pytest.fixture(scope="module")
def td():
    return pytest.importorskip("torchdiffeq")


def pendulum(t, y):
    return torch.stack([y[..., 1], -torch.sin(y[..., 0]) * (1 + 0.2 * t)], -1)


# tolerances at which torchdiffeq's low-order methods still finish quickly
TOLS = {"dopri5": (1e-7, 1e-9), "dopri8": (1e-9, 1e-11), "bosh3": (1e-6, 1e-8), "adaptive_heun": (1e-5, 1e-7)}


def pendulum_reference(y0, t):
    integrate = pytest.importorskip("scipy.integrate")
    import numpy as np

    def f(s, y):
        return pendulum(torch.tensor(s), torch.from_numpy(y).view(y0.shape)).numpy().ravel()

    tt = t.numpy()
    r = integrate.solve_ivp(f, (tt[0], tt[-1]), y0.numpy().ravel(), "DOP853", t_eval=tt, rtol=1e-13, atol=1e-14)
    return torch.from_numpy(np.ascontiguousarray(r.y.T)).view(len(t), *y0.shape)


@pytest.mark.parametrize("method", list(TOLS))
@pytest.mark.parametrize("direction", [1, -1], ids=["increasing", "decreasing"])
def test_adaptive_methods_agree_with_torchdiffeq(td, method, direction):
    y0 = torch.tensor([[2.0, 0.0], [0.5, -1.0]], dtype=F64)
    t = torch.linspace(0.0, 3.0, 7, dtype=F64) * direction
    rtol, atol = TOLS[method]
    ours = odeint(pendulum, y0, t, method=method, rtol=rtol, atol=atol)
    theirs = td.odeint(pendulum, y0, t, method=method, rtol=rtol, atol=atol)
    exact = pendulum_reference(y0, t)
    # global errors of a few tolerances, relative to the solution's scale
    tol = 10 * (atol + rtol * y0.abs().max())
    assert (ours - exact).abs().max() <= tol
    # torchdiffeq's dopri8 interpolates output times with a 4th-order polynomial, so it is off by
    # more than its tolerance (3e-7 at rtol=1e-11 here); ours must agree to that error
    assert (ours - theirs).abs().max() <= tol + (theirs - exact).abs().max()


@pytest.mark.parametrize("method", FIXED)
def test_fixed_grid_methods_agree_with_torchdiffeq_to_rounding(td, method):
    y0 = torch.tensor([1.0, 0.2], dtype=F64)
    t = torch.linspace(0.0, 2.0, 7, dtype=F64)
    for options in [None, dict(step_size=0.1, interp="cubic")]:
        for tt in (t, t.flip(0)):
            ours = odeint(pendulum, y0, tt, method=method, options=options)
            theirs = td.odeint(pendulum, y0, tt, method=method, options=options)
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_tuple_state_agrees_with_torchdiffeq(td):
    f = lambda t, y: (y[1], -torch.sin(y[0]) * (1 + t))
    y0 = (torch.tensor([1.0, 0.3], dtype=F64), torch.tensor([0.0, -0.2], dtype=F64))
    t = torch.linspace(0.0, 2.0, 5, dtype=F64)
    ours = odeint(f, y0, t, rtol=1e-6, atol=1e-8)
    theirs = td.odeint(f, y0, t, rtol=1e-6, atol=1e-8)
    assert isinstance(ours, tuple) and len(ours) == 2
    for a, b in zip(ours, theirs):
        within(a, b, 1e-6, 1e-8)


def test_t_seen_by_func_matches_torchdiffeq(td):
    def make(seen):
        def f(t, y):
            seen.add((type(t), t.dtype, t.dim(), t.device))
            return -y

        return f

    for y0 in (torch.ones(2), torch.ones(2, dtype=F64)):
        for t in (torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0], dtype=F64)):
            for method in ("dopri5", "rk4"):
                ours, theirs = set(), set()
                odeint(make(ours), y0, t, method=method)
                td.odeint(make(theirs), y0, t, method=method)
                assert ours == theirs


@pytest.mark.parametrize("case", ["dopri5", "rk4-step", "seminorm"])
def test_adjoint_gradients_agree_with_torchdiffeq(td, case):
    torch.manual_seed(0)
    func = Field().double()
    params = list(func.parameters())
    y0 = torch.randn(4, 2, dtype=F64, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 4, dtype=F64)
    kw = dict(rtol=1e-7, atol=1e-9)
    tol = dict(rtol=1e-4, atol=1e-6)
    if case == "rk4-step":
        # (interp="cubic": torchdiffeq's default linear interpolation between steps is not available)
        kw = dict(method="rk4", options=dict(step_size=0.05, interp="cubic"))
        tol = dict(rtol=1e-10, atol=1e-10)  # the same steps forwards and backwards
    elif case == "seminorm":
        kw["adjoint_options"] = dict(norm="seminorm")
    _, ours = _grads(odeint_adjoint, func, y0, t, params, **kw)
    _, theirs = _grads(td.odeint_adjoint, func, y0, t, params, **kw)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tol)
