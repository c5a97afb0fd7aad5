"""torchnde.compat.torchcde against the real torchcde."""

import math

import pytest
import torch
from torch import nn

import torchnde.compat.torchcde as tcde
from torchnde.paths import _interp

F64 = torch.float64
NAN = math.nan

try:
    import torchcde
except ImportError:  # pragma: no cover - torchcde is a dev dependency
    torchcde = None

needs_torchcde = pytest.mark.skipif(torchcde is None, reason="torchcde is not installed")


def _data(missing: bool, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.cumsum(0.3 + torch.rand(T, generator=g, dtype=F64), 0)
    x = torch.randn(2, 3, T, 3, generator=g, dtype=F64)
    if missing:
        x[0, 0, 0, 0] = NAN
        x[0, 1, 3:6, 1] = NAN
        x[1, 2, -2:, 2] = NAN
        x[1, 0, 4, 0] = NAN
        x[1, 1, :, 1] = NAN  # a channel without observations: zeros, as in torchcde
    return t, x


PAIRS = [
    ("linear_interpolation_coeffs", "LinearInterpolation"),
    ("natural_cubic_coeffs", "CubicSpline"),
    ("natural_cubic_spline_coeffs", "CubicSpline"),
    ("hermite_cubic_coefficients_with_backward_differences", "CubicSpline"),
]


@needs_torchcde
@pytest.mark.parametrize("missing", [False, True], ids=["observed", "missing"])
@pytest.mark.parametrize("coeff_fn, cls", PAIRS)
@pytest.mark.parametrize("with_t", [True, False], ids=["t", "index_time"])
def test_interpolations_match_torchcde(coeff_fn, cls, missing, with_t):
    if coeff_fn == "natural_cubic_spline_coeffs" and missing:
        pytest.skip("torchcde's deprecated spline fills leading/trailing NaN differently (documented)")
    t, x = _data(missing)
    tt = t if with_t else None
    mine = getattr(tcde, coeff_fn)(x, tt)
    ref = getattr(torchcde, coeff_fn)(x, tt)
    assert mine.shape == ref.shape
    torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-9)
    X, R = getattr(tcde, cls)(mine, tt), getattr(torchcde, cls)(ref, tt)
    torch.testing.assert_close(X.interval, R.interval)
    torch.testing.assert_close(X.grid_points, R.grid_points)
    lo, hi = R.interval.tolist()
    for s in torch.linspace(lo, hi, 37, dtype=F64):
        torch.testing.assert_close(X.evaluate(s), R.evaluate(s), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(X.derivative(s), R.derivative(s), rtol=1e-9, atol=1e-9)
    # torchcde's coefficients work with these classes and the other way round
    torch.testing.assert_close(getattr(tcde, cls)(ref, tt).evaluate(lo + 0.3), X.evaluate(lo + 0.3))


@needs_torchcde
def test_rectilinear_matches_torchcde():
    t, x = _data(True)
    x[..., 0] = t.view(-1).expand(2, 3, -1)  # channel 0 is time
    mine = tcde.linear_interpolation_coeffs(x, rectilinear=0)
    with pytest.warns(UserWarning):  # torchcde warns about missing values at the start
        ref = torchcde.linear_interpolation_coeffs(x, rectilinear=0)
    torch.testing.assert_close(mine, ref)
    torch.testing.assert_close(tcde.rectilinear_interpolation_coeffs(x, 0), ref)
    X, R = tcde.LinearInterpolation(mine), torchcde.LinearInterpolation(ref)
    for s in torch.linspace(0, 2 * x.shape[-2] - 2, 23, dtype=F64):
        torch.testing.assert_close(X.derivative(s), R.derivative(s))


def test_native_rectilinear_is_the_same_path_reparametrised():
    t, x = _data(False)
    coeffs = tcde.linear_interpolation_coeffs(torch.cat([t.view(-1, 1).expand(2, 3, -1, 1), x], -1), rectilinear=0)
    compat = tcde.LinearInterpolation(coeffs)
    native = _interp.RectilinearInterpolation(t, x)
    # knot k of the native path (times: data times and midpoints) is index time k of torchcde's
    for k, s in enumerate(native.ts.tolist()):
        torch.testing.assert_close(native.evaluate(s), compat.evaluate(float(k)))


class Func(nn.Module):
    def __init__(self, hidden, channels):
        super().__init__()
        self.channels = channels
        self.lin = nn.Linear(hidden, hidden * channels)

    def forward(self, t, z):
        return torch.tanh(self.lin(z)).view(*z.shape, self.channels)


@needs_torchcde
@pytest.mark.parametrize("adjoint", [False, True], ids=["direct", "adjoint"])
@pytest.mark.parametrize("spline", ["cubic", "hermite", "linear"])
def test_cdeint_matches_torchcde(adjoint, spline):
    torch.manual_seed(0)
    t, x = _data(False)
    x = x[0]
    if spline == "linear":
        coeffs, mk, rk = tcde.linear_interpolation_coeffs(x, t), tcde.LinearInterpolation, torchcde.LinearInterpolation
    elif spline == "cubic":
        coeffs, mk, rk = tcde.natural_cubic_coeffs(x, t), tcde.CubicSpline, torchcde.CubicSpline
    else:
        coeffs = tcde.hermite_cubic_coefficients_with_backward_differences(x, t)
        mk, rk = tcde.CubicSpline, torchcde.CubicSpline
    X, R = mk(coeffs, t), rk(coeffs, t)
    func = Func(4, 3).double()
    z0 = torch.randn(3, 4, dtype=F64, requires_grad=True)
    kw = dict(rtol=1e-8, atol=1e-9, options=dict(jump_t=t))
    outs, grads = [], []
    for lib, path in ((tcde, X), (torchcde, R)):
        out = lib.cdeint(path, func, z0, t[[0, 4, -1]], adjoint=adjoint, **kw)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), [z0, *func.parameters()]))
    assert outs[0].shape == outs[1].shape == (3, 3, 4)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-7)
    # the continuous adjoint's backward solve steps left from each knot but is given the
    # derivative of the piece to its right, where a linear path's derivative jumps: accurate to
    # ~1e-4 there (torchcde, which uses the left piece, is more accurate on this backward solve)
    tol = dict(rtol=1e-4, atol=1e-4) if (adjoint and spline == "linear") else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol)


def test_cdeint_errors_and_defaults():
    t, x = _data(False)
    X = tcde.CubicSpline(tcde.natural_cubic_coeffs(x[0], t), t)
    func = Func(4, 3).double()
    z0 = torch.zeros(3, 4, dtype=F64)
    with pytest.raises(TypeError, match="unexpected keyword"):
        tcde.cdeint(X, func, z0, t, stepsize=0.1)
    with pytest.raises(TypeError, match="adjoint=True"):
        tcde.cdeint(X, func, z0, t, adjoint=False, adjoint_rtol=1e-3)
    with pytest.raises(ValueError, match="backend"):
        tcde.cdeint(X, func, z0, t, backend="scipy")
    with pytest.raises(TypeError, match="unexpected keyword"):
        tcde.cdeint(X, func, z0, t, backend="torchsde", step_size=0.1)
    with pytest.raises(NotImplementedError, match="logqp"):
        tcde.cdeint(X, func, z0, t, backend="torchsde", logqp=True)
    with pytest.raises(ValueError, match="method"):
        tcde.cdeint(X, func, z0, t, backend="torchsde", method="dopri5")
    with pytest.raises(NotImplementedError, match="adaptive"):
        tcde.cdeint(X, func, z0, t, backend="torchsde", method="midpoint", adaptive=True)
    with pytest.raises(ValueError, match="tuple"):
        tcde.cdeint(X, func, (z0,), t)  # a tuple state needs a TupleControl
    with pytest.raises(ValueError, match="z0 must"):
        tcde.cdeint(X, func, "z0", t)
    with pytest.raises(ValueError, match="hidden_channels"):
        tcde.cdeint(X, Func(4, 2).double(), z0, t)
    with pytest.raises(ValueError, match="batch dimensions"):
        tcde.cdeint(X, func, z0[0], t)
    # fixed-step methods and torchcde's output layout
    out = tcde.cdeint(X, func, z0, t, adjoint=False, method="rk4", options=dict(step_size=0.1))
    assert out.shape == (3, len(t), 4)

    # func.prod is used when present
    class Prod(Func):
        def prod(self, t, z, dXdt):
            return 2 * (self(t, z) @ dXdt.unsqueeze(-1)).squeeze(-1)

    p = Prod(4, 3).double()
    doubled = tcde.cdeint(X, p, z0, t, adjoint=False)
    p.prod = lambda t, z, dXdt: (p(t, z) @ dXdt.unsqueeze(-1)).squeeze(-1) * 0
    assert tcde.cdeint(X, p, z0 + 1, t, adjoint=False).sub(1).abs().max() == 0
    assert doubled.shape == (3, len(t), 4)


def test_linear_cdeint_with_jump_t_steps_like_the_native_solve():
    """Regression: the time passed to the control must not be rounded to the state's float32
    dtype, or a step landing just before a knot reads the next piece's derivative and the
    controller keeps rejecting (10x the evaluations)."""
    import torchnde as tn
    from torchnde.compat import torchcde as tc

    torch.manual_seed(0)
    x = torch.randn(8, 32, 3).cumsum(1) * 0.1
    X = tc.LinearInterpolation(tc.linear_interpolation_coeffs(x))
    W = torch.randn(16, 16 * 3) * 0.1
    calls = [0]

    class F(torch.nn.Module):
        def forward(self, t, z):
            calls[0] += 1
            return torch.tanh(z @ W).view(*z.shape, 3)

    z0 = torch.zeros(8, 16)
    tc.cdeint(X, F(), z0, X.interval, adjoint=False, method="dopri5", options=dict(jump_t=X.grid_points))
    path = tn.LinearInterpolation(torch.arange(32.0), x)
    native = tn.solve(
        tn.ControlTerm(lambda t, z, a: torch.tanh(z @ W).view(*z.shape, 3), path),
        tn.Dopri5(),
        0.0,
        31.0,
        z0,
        controller=tn.PIDController(rtol=1e-4, atol=1e-6, jump_ts=path.ts),
    )
    assert calls[0] <= 1.5 * native.stats["nfe"] + 20, (calls[0], native.stats["nfe"])


@needs_torchcde
@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "reversible_heun", "srk"])
def test_backend_torchsde_matches_torchcde(method):
    """backend="torchsde": torchsde's scheme on the CDE as a noise-free SDE, fixed steps dt, and
    adjoint gradients (exact for reversible_heun) as torchcde's."""
    torch.manual_seed(0)
    t, x = _data(False)
    x = x[0]
    ti = torch.arange(len(t), dtype=F64)
    coeffs = tcde.natural_cubic_coeffs(x, ti)
    X, R = tcde.CubicSpline(coeffs, ti), torchcde.CubicSpline(coeffs, ti)
    func = Func(4, 3).double()

    class Typed(nn.Module):  # torchsde validates the method against these
        sde_type = "ito" if method in ("euler", "srk") else "stratonovich"
        noise_type = "additive"

        def __init__(self):
            super().__init__()
            self.f = func

        def forward(self, t, z):
            return self.f(t, z)

    f = Typed()
    z0 = torch.randn(3, 4, dtype=F64, requires_grad=True)
    kw = dict(method=method, dt=0.5)
    if method != "reversible_heun":  # (torchsde refuses srk for the adjoint)
        kw["adjoint_method"] = "euler" if method == "srk" else method
    outs, grads = [], []
    for lib, path in ((tcde, X), (torchcde, R)):
        out = lib.cdeint(path, f, z0, ti[[0, 4, -1]], backend="torchsde", **kw)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), [z0, *func.parameters()]))
    assert outs[0].shape == outs[1].shape == (3, 3, 4)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    # the backward solves differ in details (torchsde evaluates the control at the step's start
    # with the other one-sided derivative); reversible_heun's gradients are exact in both
    tol = dict(rtol=1e-9, atol=1e-9) if method == "reversible_heun" else dict(rtol=5e-2, atol=5e-2)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol)


def test_backend_torchsde_equals_torchdiffeq_midpoint():
    """torchcde's own test_backend: midpoint with dt=1 is the same solve in both backends, and a
    plain function is accepted with adjoint=True (torchcde's default adjoint_params: those of
    its vector-field module, i.e. none)."""
    X = tcde.CubicSpline(tcde.natural_cubic_coeffs(torch.randn(1, 10, 2, dtype=F64)))
    z0 = torch.randn(1, 3, dtype=F64)

    def func(t, z):
        return -z.unsqueeze(-1).expand(1, 3, 2)

    a = tcde.cdeint(X, func, z0, X.interval, method="midpoint", options=dict(step_size=1.0))
    b = tcde.cdeint(X, func, z0, X.interval, backend="torchsde", method="midpoint", dt=1.0)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    "backend, kind", [("torchdiffeq", "cubic"), ("torchsde", "cubic"), ("torchsde", "linear")]
)  # (a linear path's kinks make the continuous adjoint converge only at first order in the step)
def test_adjoint_gradients_reach_coefficients_computed_in_the_graph(backend, kind):
    """Regression: coefficients computed from parameters inside the graph made BacksolveAdjoint
    fail ("graph was freed"); now their gradient is the one backpropagation through the solver
    gives, to the solver's tolerance (as in the SDE-GAN discriminator of torchsde's examples)."""
    torch.manual_seed(0)
    w = torch.randn(2, dtype=F64, requires_grad=True)
    x = torch.randn(4, 8, 2, dtype=F64)
    func = Func(3, 2).double()
    coeff_fn, cls = {
        "linear": (tcde.linear_interpolation_coeffs, tcde.LinearInterpolation),
        "cubic": (tcde.natural_cubic_coeffs, tcde.CubicSpline),
    }[kind]
    if backend == "torchdiffeq":  # the continuous adjoint: equal as the steps shrink
        kw, tol = dict(method="rk4", options=dict(step_size=0.05)), dict(rtol=2e-3, atol=2e-3)
    else:  # the reversible Heun method's adjoint: the exact gradient of the computed solution
        kw, tol = dict(method="reversible_heun", dt=0.25), dict(rtol=1e-9, atol=1e-9)
    grads = []
    for adjoint in (False, True):
        coeffs = coeff_fn(x * w)
        X = cls(coeffs)
        z0 = torch.tanh(X.evaluate(X.interval[0]) @ torch.ones(2, 3, dtype=F64) * w.sum())
        extra = dict(adjoint_params=(coeffs, *func.parameters())) if adjoint else {}
        z = tcde.cdeint(X, func, z0, X.interval, adjoint=adjoint, backend=backend, **kw, **extra)
        grads.append(torch.autograd.grad(z[..., -1, :].square().sum(), [w, *func.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol)


@needs_torchcde
@pytest.mark.parametrize("coeff_fn, cls", PAIRS[:2] + PAIRS[3:])
def test_evaluate_at_several_times_as_torchcde(coeff_fn, cls):
    """A tensor of times (e.g. (n,), as sde_gan's plotting passes) gives (..., *t.shape, C), the
    piece to the left of a knot, and extrapolation outside the interval, as torchcde."""
    t, x = _data(False)
    c = getattr(torchcde, coeff_fn)(x, t)
    mine, ref = getattr(tcde, cls)(c, t), getattr(torchcde, cls)(c, t)
    lo, hi = float(t[0]), float(t[-1])
    for q in (torch.tensor([lo, 0.5 * (lo + hi), float(t[3]), hi, hi + 1, lo - 1], dtype=F64), t.view(3, 3)):
        for m in ("evaluate", "derivative"):
            a, b = getattr(mine, m)(q), getattr(ref, m)(q)
            assert a.shape == b.shape == (2, 3, *q.shape, 3)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_native_interpolations_keep_per_sample_times():
    """The compat classes follow torchcde (several times); the native ones keep a (B,) t as one
    time per sample."""
    ts, x = torch.linspace(0, 1, 5, dtype=F64), torch.randn(3, 5, 2, dtype=F64)
    native = _interp.LinearInterpolation(ts, x)
    q = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    assert native.evaluate(q).shape == (3, 2)
    compat = tcde.LinearInterpolation(tcde.linear_interpolation_coeffs(x, ts), ts)
    assert compat.evaluate(q).shape == (3, 3, 2)
    torch.testing.assert_close(compat.evaluate(q)[torch.arange(3), torch.arange(3)], native.evaluate(q))


def test_cdeint_warns_outside_the_interval():
    X = tcde.CubicSpline(tcde.natural_cubic_coeffs(torch.randn(2, 5, 2, dtype=F64)))
    func = Func(3, 2).double()
    with pytest.warns(UserWarning, match="outside the control's interval"):
        tcde.cdeint(X, func, torch.zeros(2, 3, dtype=F64), torch.tensor([0.0, 6.0], dtype=F64), adjoint=False)


@needs_torchcde
def test_gradients_with_respect_to_observation_and_output_times():
    """torchcde's test_grad_paths: observation times that require grad get a gradient (through
    the coefficients and the offsets t - t_i), as do the output times; the adjoint's gradient is
    backpropagation's to the tolerance, and the latter is torchcde's."""

    class Var(nn.Module):
        def __init__(self):
            super().__init__()
            self.v = nn.Parameter(torch.rand(1, 1, 3, dtype=F64, generator=torch.Generator().manual_seed(0)))

        def forward(self, t, z):
            return z.sigmoid().unsqueeze(-1) + self.v

    f = Var()
    x = torch.rand(1, 10, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    z0 = torch.rand(1, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    grads = {}
    for lib, adjoint, h in ((tcde, False, 0.5), (torchcde, False, 0.5), (tcde, False, 0.1), (tcde, True, 0.1)):
        t = torch.linspace(0, 9, 10, dtype=F64, requires_grad=True)
        path = x.clone().requires_grad_()
        coeffs = lib.natural_cubic_coeffs(path, t)
        X = lib.CubicSpline(coeffs, t)
        t_ = torch.tensor([0.0, 9.0], dtype=F64, requires_grad=True)
        kw = dict(adjoint_params=(*f.parameters(), coeffs, t)) if adjoint else {}
        z = lib.cdeint(X=X, func=f, z0=z0, t=t_, adjoint=adjoint, method="rk4", options=dict(step_size=h), **kw)
        grads[lib.__name__, adjoint, h] = torch.autograd.grad(z[:, 1].sum(), [t, path, t_, f.v])
    # the same discretisation: backpropagation agrees with torchcde's to rounding (t_: torchnde
    # differentiates the exact flow, dy/dt = f, torchcde the discrete one); the continuous adjoint
    # agrees with backpropagation to the discretisation error
    mine, ref = grads[tcde.__name__, False, 0.5], grads[torchcde.__name__, False, 0.5]
    for i, (a, c) in enumerate(zip(mine, ref)):
        torch.testing.assert_close(a, c, **(dict(rtol=1e-3, atol=1e-3) if i == 2 else dict(rtol=1e-9, atol=1e-9)))
    for a, b in zip(grads[tcde.__name__, False, 0.1], grads[tcde.__name__, True, 0.1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_misc_helpers_and_interpret_t():
    """torchcde.misc's helpers that user code calls, and the private _interpret_t that
    torchcde's tests use."""
    nan = math.nan
    x = torch.tensor([[nan, 1.0, nan, 3.0, nan], [2.0, nan, nan, nan, 5.0]], dtype=F64)
    want = torch.tensor([[nan, 1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0, 5.0]], dtype=F64)
    torch.testing.assert_close(tcde.misc.forward_fill(x, fill_index=-1), want, equal_nan=True)
    torch.testing.assert_close(tcde.misc.forward_fill(x.T).T, want, equal_nan=True)
    n = 6
    g = torch.Generator().manual_seed(0)
    diag, up, lo, b = (torch.randn(k, dtype=F64, generator=g) for k in (n, n - 1, n - 1, n))
    diag = diag + 4 * torch.sign(diag)  # diagonally dominant
    A = torch.diag(diag) + torch.diag(up, 1) + torch.diag(lo, -1)
    torch.testing.assert_close(A @ tcde.misc.tridiagonal_solve(b, up, diag, lo), b)
    torch.testing.assert_close(tcde.misc.cheap_stack([b, b], 0), torch.stack([b, b]))
    # a NaN time channel: torchcde asserts, torchnde raises an error that is both
    with pytest.raises(AssertionError, match="time channel"):
        tcde.linear_interpolation_coeffs(torch.tensor([[nan, 1.0], [1.0, 2.0]]), rectilinear=0)
    X = tcde.CubicSpline(tcde.natural_cubic_coeffs(torch.randn(4, 1, dtype=F64)))
    frac, idx = X._interpret_t(torch.tensor([0.0, 1.0, 1.5, 3.0, 4.5], dtype=F64))
    assert idx.tolist() == [0, 0, 1, 2, 2]
    torch.testing.assert_close(frac, torch.tensor([0.0, 1.0, 0.5, 1.0, 2.5], dtype=F64))


@pytest.mark.parametrize("adjoint", [False, True])
def test_tuple_states_with_tuple_control(adjoint):
    """torchcde's TupleControl and tuple states: one control per state component; gradients
    (coefficients computed in the graph included) agree between the adjoint and backpropagation."""
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.rand(2, 10, 2, dtype=F64, generator=g), torch.rand(10, 1, dtype=F64, generator=g)
    w = torch.ones(1, dtype=F64, requires_grad=True)

    def func(t, z):
        za, zb = z
        return za.sigmoid().unsqueeze(-1).repeat_interleave(2, dim=-1), zb.tanh().unsqueeze(-1)

    za, zb = torch.rand(2, 3, dtype=F64, generator=g), torch.rand(5, dtype=F64, generator=g)
    grads = []
    for adj in (False, True):
        X = tcde.TupleControl(
            tcde.CubicSpline(tcde.natural_cubic_coeffs(xa * w)), tcde.CubicSpline(tcde.natural_cubic_coeffs(xb * w))
        )
        z0 = (za, zb * w)
        out = tcde.cdeint(X, func, z0, X.interval, adjoint=adj, method="rk4", options=dict(step_size=0.2))
        assert out[0].shape == (2, 2, 3) and out[1].shape == (2, 5)
        grads.append(torch.autograd.grad(out[0].sum() + out[1].square().sum(), w))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)
    # an initial state the loss does not depend on gets zeros (torchcde's test_tuple_input)
    X = tcde.TupleControl(
        tcde.CubicSpline(tcde.natural_cubic_coeffs(xa)), tcde.CubicSpline(tcde.natural_cubic_coeffs(xb))
    )
    z0 = (torch.rand(2, 3, dtype=F64), torch.rand(5, dtype=F64, requires_grad=True))
    extra = dict(adjoint_params=()) if adjoint else {}
    tcde.cdeint(X, func, z0, X.interval, adjoint=adjoint, **extra)[0].sum().backward()
    assert z0[1].grad is not None and (z0[1].grad == 0).all()
    with pytest.raises(ValueError, match="same interval"):
        tcde.TupleControl(X.controls[0], tcde.CubicSpline(tcde.natural_cubic_coeffs(xb[:5])))
