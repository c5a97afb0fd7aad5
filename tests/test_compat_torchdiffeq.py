"""torchnde.compat.torchdiffeq: torchdiffeq's odeint/odeint_adjoint computed by torchnde.

The first half runs without torchdiffeq (closed-form solutions, hand-written steps, errors); the
second half compares with torchdiffeq itself where it is installed.
"""

import math
import warnings

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
    with pytest.raises(ValueError, match=r"Invalid method 'radauIIA7'.*'radauIIA5'.*'trbdf2'"):
        odeint(f, y0, t, method="radauIIA7")
    with pytest.raises(TypeError, match=r"unknown options.*'max_order'"):
        odeint(f, y0, t, method="gl4", options=dict(max_order=3))
    with pytest.raises(ValueError, match=r"max_iters.*int >= 1"):
        odeint(f, y0, t, method="gl4", options=dict(max_iters=0))
    with pytest.raises(TypeError, match=r"unknown options.*'step_size'.*fixed-grid.*first_step"):
        odeint(f, y0, t, options=dict(step_size=0.1))
    with pytest.raises(TypeError, match=r"unknown options.*'rtol'.*Valid options are: first_step"):
        odeint(f, y0, t, options=dict(rtol=1e-3))
    with pytest.raises(TypeError, match=r"unknown options.*'first_step'.*Valid options are: step_size"):
        odeint(f, y0, t, method="rk4", options=dict(first_step=0.1))
    with pytest.raises(ValueError, match=r"event_fn.*length 2.*len\(t\) = 3"):
        odeint(f, y0, torch.tensor([0.0, 1.0, 2.0]), event_fn=lambda t, y: y[0])
    with pytest.raises(ValueError, match=r"'rk4' needs options\['step_size'\]"):
        odeint(f, y0, t, method="rk4", event_fn=lambda t, y: y[0])
    with pytest.raises(NotImplementedError, match="per-element"):
        odeint(f, y0, t, rtol=torch.tensor([1e-3, 1e-4]))
    with pytest.raises(NotImplementedError, match="interp='linear'"):
        odeint(f, y0, t, method="euler", options=dict(step_size=0.1, interp="linear"))
    with pytest.raises(ValueError, match="strictly increasing or decreasing"):
        odeint(f, y0, torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(TypeError, match="tuple"):
        odeint(f, [y0], t)
    with pytest.raises(TypeError, match="floating point"):
        odeint(f, y0, torch.tensor([0, 1]))
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


# --------------------------------------------------------------------------------------------
# drop-in parity (issue 16): names, times that require grad, callbacks, perturb, jumps, failures


def test_odeint_dense_evaluates_anywhere():
    from torchnde.compat.torchdiffeq import odeint_dense

    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    dense = odeint_dense(linear, y0, torch.tensor(0.0, dtype=F64), torch.tensor(2.0, dtype=F64))
    s = torch.tensor([0.0, 0.3, 1.7, 2.0], dtype=F64)
    within(dense(s), linear_exact(y0.detach(), s), 1e-7, 1e-9, factor=100.0)
    dense(torch.tensor(1.0, dtype=F64)).sum().backward()  # differentiable with respect to y0
    assert y0.grad is not None and torch.isfinite(y0.grad).all()


@pytest.mark.parametrize("fn", ["odeint", "odeint_adjoint"])
def test_times_that_require_grad_get_the_flows_gradient(fn):
    # y' = -y: dy(t_i)/dt_i = -y(t_i), dy(t_i)/dt_0 = +y(t_i)
    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=True)
    solver = odeint if fn == "odeint" else lambda *a, **k: odeint_adjoint(*a, adjoint_params=(), **k)
    ys = solver(lambda t, y: -y, y0, t)
    (g,) = torch.autograd.grad(ys.sum(), t)
    sums = ys.detach().sum(-1)
    expected = torch.stack([sums[1:].sum(), -sums[1], -sums[2]])
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-8)
    # a t that requires grad is fine without any gradient taken, and under no_grad
    with torch.no_grad():
        torch.testing.assert_close(solver(lambda t, y: -y, y0, t), ys.detach())


def test_tuple_state_gradients_including_t_pass_gradcheck():
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64, requires_grad=True)
    f = lambda t, y: (-y[0] * (1 + t), y[0] - y[1])
    for i in range(2):
        assert torch.autograd.gradcheck(
            lambda y0, t, i=i: odeint(f, (y0, 2 * y0), t, rtol=1e-10, atol=1e-12)[i], (y0, t)
        )


def test_adjoint_of_a_field_of_t_alone_and_of_unused_parameters():
    # func depends on neither y nor a parameter: y(t1) = y0 + const, so dL/dy0 = number of outputs
    y0 = torch.tensor([1.0], dtype=F64, requires_grad=True)
    t = torch.linspace(1.0, 8.0, 10, dtype=F64)
    ys = odeint_adjoint(lambda t, y: -0.1 * torch.exp(-0.1 * t) * torch.ones_like(y), y0, t, adjoint_params=())
    ys.sum().backward()
    torch.testing.assert_close(y0.grad, torch.tensor([10.0], dtype=F64))
    # listed parameters that func does not use get zero gradients, even if y0 needs none
    w = torch.randn(3, requires_grad=True)
    ys = odeint_adjoint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), adjoint_params=(w,))
    assert ys.grad_fn is not None
    ys.sum().backward()
    assert torch.equal(w.grad, torch.zeros(3))


def test_solve_failures_are_assertion_errors_too():
    from torchnde.compat.torchdiffeq import SolveError

    def blow_up(t, y):
        return y**2

    for catch in (AssertionError, tn.SolveError, SolveError):
        with pytest.raises(catch, match="t ="):
            odeint(blow_up, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64))


class _Jump:
    def __init__(self):
        self.nfe = 0

    def __call__(self, t, x):
        self.nfe += 1
        return -0.5 * x if t < 0.5 else x**2


def test_jump_t_in_float32_never_rounds_a_time_across_the_jump():
    t = torch.tensor([0.0, 1.0])
    jump = dict(jump_t=torch.tensor([0.5]))
    out = {}
    for dtype in (torch.float32, F64):
        f = _Jump()
        ys = odeint(f, torch.tensor([1.0, 2.0], dtype=dtype), t, rtol=1e-6, atol=1e-6, options=jump)
        out[dtype] = (f.nfe, ys[-1].double())
    # the exact solution: exp(-1/4) x0 at t = 0.5, then x / (1 - x (t - 0.5))
    x_half = math.exp(-0.25) * torch.tensor([1.0, 2.0], dtype=F64)
    exact = x_half / (1 - 0.5 * x_half)
    assert out[torch.float32][0] <= out[F64][0] + 12  # 333 evaluations before the fix, 117 in float64
    assert (out[torch.float32][1] - exact).abs().max() < 3e-5  # 7e-5 before
    assert (out[F64][1] - exact).abs().max() < 3e-5


def test_step_callbacks_are_called_forwards_and_backwards():
    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.calls = {}

        def forward(self, t, y):
            return torch.tanh(self.lin(y))

    for name in ["callback_step", "callback_accept_step", "callback_reject_step"] + [
        "callback_step_adjoint",
        "callback_accept_step_adjoint",
        "callback_reject_step_adjoint",
    ]:

        def cb(t0, y0, dt, name=name):
            assert t0.dim() == 0 and dt.dim() == 0
            F.counts[name] = F.counts.get(name, 0) + 1

        setattr(F, name, staticmethod(cb))
    x0, t = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    for method, kw in [("rk4", dict(options=dict(step_size=0.1))), ("dopri5", {})]:
        F.counts = {}
        f = F()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (rk4: the accept/reject callbacks are never called)
            odeint_adjoint(f, x0, t, method=method, **kw).sum().backward()
        c = F.counts
        if method == "rk4":
            assert c == {"callback_step": 10, "callback_step_adjoint": 10}
        else:
            assert c["callback_step"] == c["callback_accept_step"] + c.get("callback_reject_step", 0) > 0
            assert c["callback_step_adjoint"] == c["callback_accept_step_adjoint"] + c.get(
                "callback_reject_step_adjoint", 0
            )
    # the fixed-grid methods never accept or reject: say so
    g = F()
    F.counts = {}
    with pytest.warns(UserWarning, match="never calls"):
        odeint(g, x0, t, method="euler")


@pytest.mark.parametrize("adjoint", [False, True])
def test_perturb_keeps_func_off_the_grid_points(adjoint):
    for method in FIXED:
        results = []
        for perturb in (True, False):
            seen = []

            def f(t, x, seen=seen):
                seen.append(t.item())
                return -x

            x0 = torch.tensor([1.0, 2.0], requires_grad=True)
            kw = dict(adjoint_params=()) if adjoint else {}
            run = odeint_adjoint if adjoint else odeint
            xs = run(f, x0, torch.tensor([0.0, 1.0]), method=method, options=dict(step_size=0.5, perturb=perturb), **kw)
            assert (0.0 in seen, 0.5 in seen) == (not perturb, not perturb), (method, seen)
            if adjoint:
                seen.clear()
                xs.sum().backward()
                assert (1.0 in seen, 0.5 in seen) == (not perturb, not perturb), (method, seen)
            results.append(xs.detach())
        torch.testing.assert_close(results[0], results[1])  # one ulp of time changes nothing here


def test_grid_constructor_is_asked_again_for_the_adjoint_pass():
    asked = []

    def grid(f, y0, t):
        asked.append(t.tolist())
        return torch.linspace(float(t[0]), float(t[1]), 11)

    x0 = torch.tensor(1.0, requires_grad=True)
    xs = odeint_adjoint(
        lambda t, x: x,
        x0,
        torch.tensor([0.0, 1.0]),
        method="euler",
        adjoint_params=(),
        options=dict(grid_constructor=grid),
    )
    torch.testing.assert_close(xs[1], x0.detach() * 1.1**10)
    xs[1].backward()
    assert asked == [[0.0, 1.0], [1.0, 0.0]]
    torch.testing.assert_close(x0.grad, torch.tensor(1.1**10))


def test_fehlberg2_and_min_max_step():
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.linspace(0.0, 3.0, 4, dtype=F64)
    # (its error estimate is that of the order-1 solution: the propagated one is ~100x less accurate)
    within(odeint(linear, y0, t, method="fehlberg2", rtol=1e-8, atol=1e-10), linear_exact(y0, t), 1e-8, 1e-10, 1e4)
    nfe = {}
    for min_step in (0.0, 1.0):
        f = _Jump()
        odeint(lambda t, y, f=f: f(t * 0, y) + linear(t, y), y0, t, options=dict(min_step=min_step, max_step=5.0))
        nfe[min_step] = f.nfe
    assert nfe[1.0] < 40 < nfe[0.0]


def test_fehlberg2_agrees_with_torchdiffeq(td):
    y0 = torch.tensor([[2.0, 0.0], [0.5, -1.0]], dtype=F64)
    t = torch.linspace(0.0, 3.0, 7, dtype=F64)
    ours = odeint(pendulum, y0, t, method="fehlberg2", rtol=1e-6, atol=1e-8)
    theirs = td.odeint(pendulum, y0, t, method="fehlberg2", rtol=1e-6, atol=1e-8)
    exact = pendulum_reference(y0, t)
    # the same pair, so the same (large, see _Fehlberg2) error relative to the tolerance
    assert (ours - exact).abs().max() <= 3 * (theirs - exact).abs().max() + 1e-7


def test_scipy_solver_runs_solve_ivp_forwards_and_backwards_in_time():
    pytest.importorskip("scipy")
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    for t in (torch.linspace(0.0, 2.0, 5, dtype=F64), torch.linspace(2.0, 0.0, 5, dtype=F64)):
        for solver in ("RK45", "LSODA"):
            ys = odeint(linear, y0, t, method="scipy_solver", rtol=1e-9, atol=1e-11, options=dict(solver=solver))
            within(ys, linear_exact(y0, t), 1e-9, 1e-11, factor=1e3)
    t = torch.tensor([0.0, 1.0, 2.0])
    ys = odeint(lambda t, y: (-y[0], -2 * y[1]), (torch.ones(2), torch.ones(1, 3)), t, method="scipy_solver")
    torch.testing.assert_close(ys[1][-1], torch.full((1, 3), math.exp(-4.0)), rtol=1e-4, atol=1e-6)
    with pytest.raises(NotImplementedError, match="odeint only"):
        odeint_adjoint(linear, y0, t, method="scipy_solver", adjoint_params=())


@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams", "fixed_adams"])
def test_adams_methods_converge_at_order_four(method):
    # as in torchdiffeq, the history holds max_order - 1 derivatives: Adams-Bashforth of order
    # max_order - 1, Adams-Moulton of order max_order
    order = 5 if method == "explicit_adams" else 4
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    exact = linear_exact(y0, t)[-1]
    errs = [
        # (tight tolerances: the corrector iterates to them)
        (
            odeint(linear, y0, t, method=method, options=dict(step_size=h, max_order=order), rtol=1e-13, atol=1e-15)[-1]
            - exact
        )
        .abs()
        .max()
        for h in (0.02, 0.01)
    ]
    assert abs(math.log2(errs[0] / errs[1]) - 4) < 0.3
    # torchdiffeq's default max_order=12, and its callbacks and perturb work as for the other methods
    ys = odeint(linear, y0, torch.linspace(0.0, 2.0, 5, dtype=F64), method=method, options=dict(step_size=0.05))
    assert torch.isfinite(ys).all()


def test_implicit_adams_agrees_with_torchdiffeq(td):
    y0 = torch.tensor([1.0, 0.2], dtype=F64)
    t = torch.linspace(0.0, 2.0, 5, dtype=F64)
    ours = odeint(pendulum, y0, t, method="implicit_adams", options=dict(step_size=0.05))
    theirs = td.odeint(pendulum, y0, t, method="implicit_adams", options=dict(step_size=0.05, interp="cubic"))
    exact = pendulum_reference(y0, t)
    assert (ours - exact).abs().max() <= 3 * (theirs - exact).abs().max() + 1e-9
    # the same method: same predictor, corrector and stopping rule (measured 2e-8 at max_order 4,
    # 5e-11 at torchdiffeq's default 12)
    for method in ("implicit_adams", "fixed_adams"):
        for max_order in (4, 12):
            options = dict(step_size=0.05, max_order=max_order)
            ours = odeint(pendulum, y0, t, method=method, options=options)
            theirs = td.odeint(pendulum, y0, t, method=method, options=dict(options, interp="cubic"))
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_explicit_adams_agrees_with_torchdiffeq(td):
    # same history length (max_order - 1), same RK4 start, sums in double precision
    y0 = torch.tensor([1.0, 0.2], dtype=F64)
    t = torch.linspace(0.0, 2.0, 5, dtype=F64)
    for max_order in (4, 12):
        options = dict(step_size=0.05, max_order=max_order)
        ours = odeint(pendulum, y0, t, method="explicit_adams", options=options)
        theirs = td.odeint(pendulum, y0, t, method="explicit_adams", options=dict(options, interp="cubic"))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)  # (a different order: 1e-4)


# --------------------------------------------------------------------------------------------
# torchdiffeq's fixed-grid implicit Runge-Kutta methods (issue 11)

IRK = {
    "implicit_euler": 1,
    "implicit_midpoint": 2,
    "trapezoid": 2,
    "radauIIA3": 3,
    "gl4": 4,
    "radauIIA5": 5,
    "gl6": 6,
    "sdirk2": 2,
    "trbdf2": 2,
}


def forced(t, y):
    """u' = -u + cos t, v' = t v: linear, non-autonomous (the stage times matter)."""
    return torch.stack([-y[0] + torch.cos(t), t * y[1]])


def forced_exact(s):
    return torch.tensor([(math.cos(s) + math.sin(s)) / 2 + 0.5 * math.exp(-s), math.exp(s * s / 2)], dtype=F64)


@pytest.mark.parametrize("method", list(IRK))
def test_implicit_rk_methods_converge_at_their_order(method):
    from torchnde.compat._torchdiffeq_implicit import IRK_METHODS

    order = IRK[method]
    cls = IRK_METHODS[method]
    assert cls.order == order
    # tableau: row sums are the nodes, and b integrates polynomials of degree < order exactly
    for ci, row in zip(cls.c, cls.a):
        assert abs(sum(row) - ci) < 1e-15
    for k in range(1, order + 1):
        assert abs(sum(bi * ci ** (k - 1) for bi, ci in zip(cls.b, cls.c)) - 1 / k) < 1e-14
    y0 = torch.tensor([1.0, 1.0], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    steps = (8, 16) if order <= 3 else (4, 8)
    errs = [
        (odeint(forced, y0, t, method=method, options=dict(step_size=1 / n))[-1] - forced_exact(1.0)).abs().max()
        for n in steps
    ]
    assert abs(math.log2(errs[0] / errs[1]) - order) < 0.3, errs


@pytest.mark.parametrize("method", ["implicit_euler", "trapezoid", "gl4", "radauIIA5", "trbdf2"])
def test_implicit_rk_step_is_the_tableaus_stability_function(method):
    # on y' = M y one step is y1 = y0 + h (b kron I) (I - h A kron M)^-1 (1 kron M y0): computed
    # here independently from the tableau, with a stiff eigenvalue (-1e3) among the others
    from torchnde.compat._torchdiffeq_implicit import IRK_METHODS

    cls = IRK_METHODS[method]
    M = torch.tensor([[-1000.0, 1.0, 0.0], [0.0, -0.5, 2.0], [0.0, -2.0, -0.5]], dtype=F64)
    y0 = torch.tensor([1.0, -1.0, 0.5], dtype=F64)
    h, s = 0.1, len(cls.c)
    Ab, b = torch.tensor(cls.a, dtype=F64), torch.tensor(cls.b, dtype=F64)
    big = torch.eye(3 * s, dtype=F64) - h * torch.kron(Ab, M)
    K = torch.linalg.solve(big, torch.kron(torch.ones(s, dtype=F64), M @ y0)).view(s, 3)
    y1 = y0 + h * (b @ K)
    ours = odeint(lambda t, y: M @ y, y0, torch.tensor([0.0, h], dtype=F64), method=method)[-1]
    torch.testing.assert_close(ours, y1, rtol=1e-11, atol=1e-12)


def test_implicit_rk_per_sample_gradients_and_newton_failure():
    from torchnde.compat._torchdiffeq_implicit import IRK_METHODS

    # per sample: each row equals its own solve (its own Newton iteration and LU)
    y0 = torch.tensor([[1.0, 0.0], [0.5, -1.0], [2.0, 0.3]], dtype=F64)
    term = tn.ODETerm(lambda t, y, args: torch.stack([y[..., 1], -torch.sin(y[..., 0]) - 5 * y[..., 1]], -1))
    kw = dict(dt0=0.1, controller=tn.ConstantStepSize())
    solver = IRK_METHODS["radauIIA5"]()
    batch = tn.solve(term, solver, 0.0, 1.0, y0, per_sample=True, **kw).ys[:, -1]
    for i in range(3):
        torch.testing.assert_close(
            batch[i], tn.solve(term, solver, 0.0, 1.0, y0[i], **kw).ys[-1], rtol=1e-12, atol=1e-13
        )
    # gradients through the Newton iterations match finite differences
    z0 = torch.tensor([0.7, -0.2], dtype=F64, requires_grad=True)
    k = torch.tensor(1.5, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    fn = lambda z0, k: odeint(lambda t, y: torch.stack([y[1], -k * torch.sin(y[0])]), z0, t, method="gl4")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z0, k))
    # a Newton iteration that cannot converge (y = y0 + h y^2 has no real root for 4 h y0 > 1):
    # a clear error, never a silently wrong answer (torchdiffeq warns and returns the last iterate)
    with pytest.raises(tn.SolveError, match="nonlinear_divergence|Newton"):
        odeint(
            lambda t, y: y**2, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="implicit_euler"
        )
    # ... and only that sample fails in per-sample mode
    sol = tn.solve(
        tn.ODETerm(lambda t, y, args: y**2),
        IRK_METHODS["implicit_euler"](),
        0.0,
        1.0,
        torch.tensor([[1.0], [0.1]], dtype=F64),
        per_sample=True,
        throw=False,
        **kw,
    )
    assert [int(r) for r in sol.result] == [int(tn.Result.nonlinear_divergence), int(tn.Result.successful)]


def test_implicit_rk_stiff_float32():
    # h lambda = -1e5 in float32 with a large initial transient: the L-stable methods damp it, and
    # the Newton iteration of the merely A-stable gl6 (whose transient flips sign every step, so
    # a stage value passes near zero) still converges, to the rounding of the state's size
    def f(t, y):
        return -1e6 * (y - torch.cos(t)) - torch.sin(t)

    y0 = torch.tensor([1.0, 2.0, 1e4])
    t = torch.tensor([0.0, 1.0])
    for method in ("radauIIA5", "trbdf2", "sdirk2", "implicit_euler"):
        y = odeint(f, y0, t, method=method, options=dict(step_size=0.1))
        torch.testing.assert_close(y[-1], torch.full((3,), math.cos(1.0)), rtol=1e-6, atol=1e-6)
    y = odeint(f, y0, t, method="gl6", options=dict(step_size=0.1))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def test_implicit_rk_adjoint_gradients_match_the_closed_form():
    # odeint_adjoint with an implicit method: the augmented backward system (6 + 36 states) is
    # beyond the autograd Jacobian loop, and torch.func cannot transform its vjps, so the solver
    # falls back to a forward-difference Jacobian (only the Newton preconditioner)
    lin = nn.Linear(6, 6, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(0.3 * torch.randn(6, 6, dtype=F64, generator=torch.Generator().manual_seed(0)))
    y0 = torch.linspace(-1.0, 1.0, 6, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ys = odeint_adjoint(
        lambda t, y: lin(y), y0, t, method="gl4", options=dict(step_size=0.1), adjoint_params=tuple(lin.parameters())
    )
    (g,) = torch.autograd.grad(ys[-1].sum(), y0)
    exact = torch.linalg.matrix_exp(lin.weight.detach()).T @ torch.ones(6, dtype=F64)
    torch.testing.assert_close(g, exact, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# events: odeint_event and odeint(..., event_fn=...) (issue 10)

G, H = 9.8, 10.0  # a ball dropped from H hits the ground at sqrt(2 H / G)


def falling(g):
    """Height and velocity of a ball under gravity ``g`` (a tensor state of shape (2,))."""

    def f(t, y):
        return torch.stack([y[1], -g * torch.ones_like(y[1])])

    return f


def height(t, y):
    return y[0]


def test_odeint_event_stops_a_falling_ball_at_the_ground():
    from torchnde.compat.torchdiffeq import odeint_event

    y0 = torch.tensor([H, 0.0], dtype=F64)
    t_hit = math.sqrt(2 * H / G)
    event_t, ys = odeint_event(falling(G), y0, torch.tensor(0.0, dtype=F64), event_fn=height)
    assert event_t.shape == () and event_t.dtype == F64 and ys.shape == (2, 2)  # torchdiffeq's shapes
    assert torch.equal(ys[0], y0)
    assert abs(float(event_t) - t_hit) < 1e-9
    torch.testing.assert_close(ys[1], torch.tensor([0.0, -G * t_hit], dtype=F64), rtol=0, atol=1e-8)
    # a tuple state, a t0 of shape (1,) (torchdiffeq's examples), a float32 t0: event_t follows t0
    state = (torch.tensor([H]), torch.tensor([0.0]))
    event_t, (pos, vel) = odeint_event(
        lambda t, s: (s[1], -G * torch.ones_like(s[1])), state, torch.tensor([1.0]), event_fn=lambda t, s: s[0]
    )
    assert event_t.shape == () and event_t.dtype == torch.float32 and pos.shape == vel.shape == (2, 1)
    assert abs(float(event_t) - 1.0 - t_hit) < 1e-5
    # odeint's event mode: t = [t0, anything later], the same (event_t, solution)
    t2, ys2 = odeint(falling(G), y0, torch.tensor([0.0, 1.0], dtype=F64), event_fn=height)
    assert abs(float(t2) - t_hit) < 1e-9 and ys2.shape == (2, 2)


@pytest.mark.parametrize("fn", ["odeint", "odeint_adjoint", "rk4"])
def test_odeint_event_time_gradients_match_the_closed_form(fn):
    from torchnde.compat.torchdiffeq import odeint_event

    g = torch.tensor(G, dtype=F64, requires_grad=True)
    h = torch.tensor(H, dtype=F64, requires_grad=True)
    ground = torch.tensor(0.5, dtype=F64, requires_grad=True)  # used by event_fn directly
    t0 = torch.tensor([0.25], dtype=F64, requires_grad=True)
    y0 = torch.stack([h, torch.zeros_like(h)])
    kwargs = {"odeint_adjoint": dict(odeint_interface=odeint_adjoint, adjoint_params=(g,))}.get(fn, {})
    if fn == "rk4":  # exact on this quadratic trajectory, cubic Hermite in between
        kwargs = dict(method="rk4", options=dict(step_size=0.1))
    event_t, ys = odeint_event(falling(g), y0, t0, event_fn=lambda t, y: y[0] - ground, **kwargs)
    tau = math.sqrt(2 * (H - 0.5) / G)  # time of fall
    assert abs(float(event_t) - 0.25 - tau) < 1e-9
    dg, dh, dground, dt0 = torch.autograd.grad(event_t, (g, h, ground, t0), retain_graph=True)
    expected = (-tau / (2 * G), 1 / (G * tau), -1 / (G * tau), 1.0)
    for got, want in zip((dg, dh, dground, dt0), expected):
        assert abs(float(got) - want) < 1e-7, (fn, float(got), want)
    # the state at the event has the total derivative: v(event) = -g tau, dv/dh = -g dtau/dh
    (dv_dh,) = torch.autograd.grad(ys[-1][1], h)
    assert abs(float(dv_dh) + G / (G * tau)) < 1e-7


def test_odeint_event_reverse_time():
    from torchnde.compat.torchdiffeq import odeint_event

    g = torch.tensor(G, dtype=F64, requires_grad=True)
    y0 = torch.tensor([H, 0.0], dtype=F64)
    for fn in (odeint, lambda *a, **k: odeint_adjoint(*a, adjoint_params=(g,), **k)):
        event_t, ys = odeint_event(
            falling(g), y0, torch.tensor(1.0, dtype=F64), event_fn=height, reverse_time=True, odeint_interface=fn
        )
        tau = math.sqrt(2 * H / G)
        assert abs(float(event_t) - (1.0 - tau)) < 1e-9
        assert abs(float(ys[-1][1]) - G * tau) < 1e-8  # falling backwards in time: upward velocity
        (dg,) = torch.autograd.grad(event_t, g)
        assert abs(float(dg) - tau / (2 * G)) < 1e-7  # event_t = 1 - tau(g)


def test_odeint_event_edge_cases():
    from torchnde.compat.torchdiffeq import SolveError, odeint_event

    y0 = torch.tensor([H, 0.0], dtype=F64)
    t0 = torch.tensor(0.0, dtype=F64)
    # an element that is zero at t0 is an event at t0 (torchdiffeq)
    event_t, ys = odeint_event(falling(G), y0, t0, event_fn=lambda t, y: y)
    assert float(event_t) == 0.0 and torch.equal(ys[1], y0)
    # the first crossing of any element, in either direction: the velocity passes -5 first
    event_t, ys = odeint_event(falling(G), y0, t0, event_fn=lambda t, y: torch.stack([y[0], y[1] + 5]))
    assert abs(float(event_t) - 5 / G) < 1e-9
    # a condition that jumps to exactly zero (torchdiffeq's learn_physics.py stops at a final time
    # so): the event is the jump, not the end of the (here large) step that first sees the zero
    event_t, _ = odeint_event(
        falling(G), y0, t0, event_fn=lambda t, y: torch.zeros_like(t) if t > 0.5 else y[0] + 1e3
    )  # fmt: skip
    assert abs(float(event_t) - 0.5) < 1e-12
    # no event: the search ends at t0 + 1e300 (here quickly: a constant solution takes growing steps;
    # fixed-grid methods stop after torchdiffeq's 20000 steps)
    with pytest.raises(SolveError, match="no event"):
        odeint_event(lambda t, y: torch.zeros_like(y), torch.ones(1, dtype=F64), t0, event_fn=lambda t, y: y + 1)


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint", "torchdiffeq.odeint"])
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_odeint_event_agrees_with_torchdiffeq(td, interface, method):
    from torchnde.compat.torchdiffeq import odeint_event

    # a damped oscillator released at x = 1: stops where x crosses 0.3 (tuple state)
    k = torch.tensor(4.0, dtype=F64, requires_grad=True)
    x0 = torch.tensor([1.0], dtype=F64, requires_grad=True)

    def f(t, s):
        x, v = s
        return v, -k * x - 0.3 * v + 0.1 * t

    def event_fn(t, s):
        return s[0] - 0.3

    kwargs = dict(rtol=1e-10, atol=1e-12, method=method)
    if method == "rk4":
        kwargs["options"] = dict(step_size=0.01, interp="cubic")
    out = []
    for lib in ("ours", "theirs"):
        fn = odeint_event if lib == "ours" else td.odeint_event
        iface = {"odeint": odeint, "odeint_adjoint": odeint_adjoint, "torchdiffeq.odeint": td.odeint}[interface]
        if lib == "theirs":
            iface = td.odeint_adjoint if interface == "odeint_adjoint" else td.odeint
        kw = dict(kwargs, adjoint_params=(k,)) if interface == "odeint_adjoint" else kwargs
        s0 = (x0, torch.zeros(1, dtype=F64))
        event_t, (x, v) = fn(f, s0, torch.tensor(0.0, dtype=F64), event_fn=event_fn, odeint_interface=iface, **kw)
        grads = torch.autograd.grad(event_t + v[-1].sum(), (k, x0))
        out.append((event_t.detach(), x.detach(), v.detach(), *grads))
    for ours, theirs in zip(*out):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def bouncing(g):
    return lambda t, s: (s[1], -g)


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
def test_chained_bounces_agree_with_torchdiffeq(td, interface):
    # torchdiffeq's bouncing-ball pattern: each impact time is the next solve's t0 (a tensor in
    # the graph), the state is a tuple, the velocity is reversed and damped at each impact
    from torchnde.compat.torchdiffeq import odeint_event

    out = []
    for lib in ("ours", "theirs"):
        g = torch.tensor([G], dtype=F64, requires_grad=True)
        e = torch.tensor([0.8], dtype=F64, requires_grad=True)
        t0 = torch.tensor([0.1], dtype=F64, requires_grad=True)
        f = bouncing(g)
        fn = odeint_event if lib == "ours" else td.odeint_event
        if interface == "odeint":
            iface = odeint if lib == "ours" else td.odeint
            kw = {}
        else:
            iface = odeint_adjoint if lib == "ours" else td.odeint_adjoint
            kw = dict(adjoint_params=(g,))
        state, t = (torch.tensor([H], dtype=F64), torch.tensor([0.0], dtype=F64)), t0
        for _ in range(3):
            t, sol = fn(f, state, t, event_fn=lambda t, s: s[0], odeint_interface=iface, atol=1e-10, rtol=1e-10, **kw)
            state = (sol[0][-1] + 1e-7, -e * sol[1][-1])
        out.append((t.detach(), *torch.autograd.grad(t, (g, e, t0))))
    for ours, theirs in zip(*out):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
