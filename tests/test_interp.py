"""Interpolations of data as paths: exactness, smoothness, missing data, batching, gradients."""

import math

import numpy as np
import pytest
import scipy.interpolate
import torch

from torchnde.paths._base import AbstractPath
from torchnde.paths._interp import (
    CubicSpline,
    HermiteCubic,
    LinearInterpolation,
    RectilinearInterpolation,
    pad_sequences,
)

ALL = [LinearInterpolation, RectilinearInterpolation, HermiteCubic, CubicSpline]
F64 = torch.float64
NAN = math.nan


def _irregular(T=9, batch=(3,), C=2, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ts = torch.cumsum(0.2 + torch.rand(T, generator=g, dtype=dtype), 0)
    xs = torch.randn(*batch, T, C, generator=g, dtype=dtype)
    return ts, xs


def _query(path, n=97):
    return torch.linspace(path.t0, path.t1, n, dtype=F64).tolist()


def _values(X, times, fn="evaluate"):
    return torch.stack([getattr(X, fn)(t) for t in times], -2)


# ---------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("cls", [LinearInterpolation, HermiteCubic, CubicSpline])
def test_linear_data_reproduced_exactly(cls):
    ts, _ = _irregular()
    xs = torch.stack([2 * ts - 1, -0.5 * ts + 3], -1).expand(3, -1, -1)
    X = cls(ts, xs)
    assert isinstance(X, AbstractPath) and X.smooth
    for t in _query(X):
        want = torch.tensor([2 * t - 1, -0.5 * t + 3], dtype=F64)
        torch.testing.assert_close(X.evaluate(t), want.expand(3, 2), rtol=0, atol=1e-12)
        torch.testing.assert_close(
            X.derivative(t), torch.tensor([2.0, -0.5], dtype=F64).expand(3, 2), rtol=0, atol=1e-10
        )


@pytest.mark.parametrize("cls", ALL)
def test_knots_interpolated(cls):
    ts, xs = _irregular()
    X = cls(ts, xs)
    got = _values(X, ts.tolist())
    if cls is RectilinearInterpolation:
        torch.testing.assert_close(got[..., 0], ts.expand(3, -1), rtol=0, atol=1e-13)  # time channel
        got = got[..., 1:]
    torch.testing.assert_close(got, xs, rtol=0, atol=1e-12)
    assert X.t0 == ts[0].item() and X.t1 == ts[-1].item()


def test_natural_cubic_spline_matches_scipy():
    ts, xs = _irregular(T=11, batch=(2, 3), C=4)
    X = CubicSpline(ts, xs)
    ref = scipy.interpolate.CubicSpline(ts.numpy(), xs.numpy(), axis=-2, bc_type="natural")
    q = np.linspace(X.t0, X.t1, 201)
    for nu, fn in ((0, "evaluate"), (1, "derivative")):
        got = _values(X, q.tolist(), fn).numpy()
        np.testing.assert_allclose(got, ref(q, nu), rtol=0, atol=1e-10)


def test_natural_cubic_spline_c2_and_natural_ends():
    ts, xs = _irregular(T=8)
    X = CubicSpline(ts, xs)
    second = X._coeffs[..., 2, :] * 2  # X'' at the left end of each piece
    d = X._coeffs
    h = (ts[1:] - ts[:-1]).view(-1, 1)
    second_right = 2 * d[..., 2, :] + 6 * d[..., 3, :] * h  # X'' at the right end of each piece
    torch.testing.assert_close(second[..., 1:, :], second_right[..., :-1, :], rtol=0, atol=1e-9)
    torch.testing.assert_close(second[..., 0, :], torch.zeros(3, 2, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(second_right[..., -1, :], torch.zeros(3, 2, dtype=F64), rtol=0, atol=1e-10)


def test_cubic_spline_two_knots_is_a_line():
    X = CubicSpline(torch.tensor([0.0, 2.0], dtype=F64), torch.tensor([[1.0], [5.0]], dtype=F64))
    torch.testing.assert_close(X.evaluate(0.5), torch.tensor([2.0], dtype=F64))
    torch.testing.assert_close(X.derivative(1.7), torch.tensor([2.0], dtype=F64))


def test_hermite_backward_differences_and_causality():
    ts, xs = _irregular(T=7, batch=())
    X = HermiteCubic(ts, xs)
    slopes = (xs[1:] - xs[:-1]) / (ts[1:] - ts[:-1]).unsqueeze(-1)
    for i in range(1, 7):
        # the derivative at knot i is the backward difference, from both sides
        torch.testing.assert_close(X.derivative(ts[i].item()), slopes[i - 1], rtol=0, atol=1e-10)
        torch.testing.assert_close(X.derivative(ts[i].item(), left=True), slopes[i - 1], rtol=0, atol=1e-10)
    torch.testing.assert_close(X.derivative(ts[0].item()), slopes[0], rtol=0, atol=1e-12)
    # causal: changing x after t_{i+1} leaves the path on [t_0, t_{i+1}] unchanged
    xs2 = xs.clone()
    xs2[5:] += 10
    Y = HermiteCubic(ts, xs2)
    for t in torch.linspace(ts[0], ts[4], 23).tolist():
        torch.testing.assert_close(Y.evaluate(t), X.evaluate(t), rtol=0, atol=1e-12)


def test_rectilinear_structure():
    ts = torch.tensor([0.0, 1.0, 3.0], dtype=F64)
    xs = torch.tensor([[1.0, 2.0], [4.0, -2.0], [0.0, 0.0]], dtype=F64)
    X = RectilinearInterpolation(ts, xs)
    torch.testing.assert_close(X.ts, torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0], dtype=F64))
    # first half of an interval: only the time channel moves, at (t1 - t0) / (half the interval)
    torch.testing.assert_close(X.evaluate(0.25), torch.tensor([0.5, 1.0, 2.0], dtype=F64))
    torch.testing.assert_close(X.derivative(0.25), torch.tensor([2.0, 0.0, 0.0], dtype=F64))
    # second half: time held at the next observation time, values move
    torch.testing.assert_close(X.evaluate(0.75), torch.tensor([1.0, 2.5, 0.0], dtype=F64))
    torch.testing.assert_close(X.derivative(0.75), torch.tensor([0.0, 6.0, -8.0], dtype=F64))
    torch.testing.assert_close(X.evaluate(1.5), torch.tensor([2.0, 4.0, -2.0], dtype=F64))
    # piecewise linear: the derivative is constant on each piece
    for a, b in zip(X.ts[:-1].tolist(), X.ts[1:].tolist()):
        d = _values(X, torch.linspace(a, b, 7)[:-1].tolist(), "derivative")
        torch.testing.assert_close(d, d[:1].expand_as(d))


# ---------------------------------------------------------------------------------------------
# continuity and derivatives


@pytest.mark.parametrize("cls", ALL)
def test_continuity_and_derivative_limits_at_knots(cls):
    ts, xs = _irregular()
    X = cls(ts, xs)
    eps = 1e-9
    smooth = cls in (HermiteCubic, CubicSpline)
    for t in X.ts[1:-1].tolist():
        torch.testing.assert_close(X.evaluate(t - eps), X.evaluate(t + eps), rtol=0, atol=1e-5)
        left, right = X.derivative(t, left=True), X.derivative(t)
        torch.testing.assert_close(left, X.derivative(t - eps), rtol=0, atol=1e-5)
        torch.testing.assert_close(right, X.derivative(t + eps), rtol=0, atol=1e-5)
        if smooth:
            torch.testing.assert_close(left, right, rtol=0, atol=1e-10)
    if not smooth:  # linear pieces: the derivative does jump somewhere
        jumps = [(X.derivative(t, left=True) - X.derivative(t)).abs().max() for t in X.ts[1:-1].tolist()]
        assert max(jumps) > 1e-3


@pytest.mark.parametrize("cls", ALL)
def test_derivative_is_finite_difference_of_evaluate(cls):
    ts, xs = _irregular()
    X = cls(ts, xs)
    knots = X.ts.tolist()
    eps = 1e-6
    for t in _query(X, 41)[1:-1]:
        if min(abs(t - k) for k in knots) < 2 * eps:
            continue
        fd = (X.evaluate(t + eps) - X.evaluate(t - eps)) / (2 * eps)
        torch.testing.assert_close(X.derivative(t), fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", ALL)
def test_increment_form(cls):
    ts, xs = _irregular()
    X = cls(ts, xs)
    s, t = X.t0 + 0.3, X.t1 - 0.2
    torch.testing.assert_close(X.evaluate(s, t), X.evaluate(t) - X.evaluate(s))
    torch.testing.assert_close(X.evaluate(t, s), -X.evaluate(s, t))


# ---------------------------------------------------------------------------------------------
# missing data


@pytest.mark.parametrize("cls", ALL)
def test_missing_values_filled(cls):
    ts, xs = _irregular(T=10, batch=(2,), C=3)
    xm = xs.clone()
    xm[0, 0, 0] = NAN  # before the first observation
    xm[0, 3:6, 1] = NAN  # a gap
    xm[1, -3:, 2] = NAN  # after the last observation
    xm[1, 4, 0] = NAN
    X = cls(ts, xm)
    vals = _values(X, _query(X))
    assert torch.isfinite(vals).all() and torch.isfinite(_values(X, _query(X), "derivative")).all()
    at = _values(X, ts.tolist())
    if cls is RectilinearInterpolation:
        at = at[..., 1:]
    obs = ~torch.isnan(xm)
    torch.testing.assert_close(at[obs], xs[obs], rtol=0, atol=1e-12)
    # constant before the first and after the last observation
    assert at[0, 0, 0] == xm[0, 1, 0]
    torch.testing.assert_close(at[1, -3:, 2], xm[1, -4, 2].expand(3), rtol=0, atol=1e-12)
    gap = at[0, 3:6, 1]
    if cls in (LinearInterpolation, HermiteCubic):  # linear in time between observations
        w = (ts[3:6] - ts[2]) / (ts[6] - ts[2])
        torch.testing.assert_close(gap, xm[0, 2, 1] + w * (xm[0, 6, 1] - xm[0, 2, 1]))
    elif cls is RectilinearInterpolation:  # last observation carried forward
        torch.testing.assert_close(gap, xm[0, 2, 1].expand(3))
    else:  # the natural spline through the observed values of that channel only
        keep = obs[0, :, 1].numpy()
        ref = scipy.interpolate.CubicSpline(ts.numpy()[keep], xm[0, :, 1].numpy()[keep], bc_type="natural")
        q = np.linspace(X.t0, X.t1, 57)
        got = torch.stack([X.evaluate(t)[0, 1] for t in q.tolist()]).numpy()
        np.testing.assert_allclose(got, ref(q), rtol=0, atol=1e-10)


def test_missing_linear_fill_is_linear_through_observations():
    ts = torch.tensor([0.0, 1.0, 2.0, 4.0], dtype=F64)
    xs = torch.tensor([[NAN], [1.0], [NAN], [4.0]], dtype=F64)
    X = LinearInterpolation(ts, xs)
    torch.testing.assert_close(X.evaluate(0.5), torch.tensor([1.0], dtype=F64))
    torch.testing.assert_close(X.evaluate(2.0), torch.tensor([2.0], dtype=F64))
    torch.testing.assert_close(X.derivative(3.0), torch.tensor([1.0], dtype=F64))


@pytest.mark.parametrize("cls", ALL)
def test_channel_without_observation_raises(cls):
    ts, xs = _irregular(batch=(2,))
    xs[1, :, 1] = NAN
    with pytest.raises(ValueError, match=r"channel 1 of sample 1 has no observation"):
        cls(ts, xs)


# ---------------------------------------------------------------------------------------------
# batching, times, dtypes


@pytest.mark.parametrize("cls", ALL)
def test_per_sample_times(cls):
    ts, xs = _irregular(batch=(4, 2))
    X = cls(ts, xs)
    tb = torch.tensor([X.t0, 1.1, 2.9, X.t1], dtype=F64)
    tb[1:3] = torch.stack([ts[2], (ts[4] + ts[5]) / 2])
    for fn in ("evaluate", "derivative"):
        got = getattr(X, fn)(tb)
        assert got.shape == X.evaluate(0.0).shape == (4, 2, xs.shape[-1] + (cls is RectilinearInterpolation))
        for b in range(4):
            torch.testing.assert_close(got[b], getattr(X, fn)(tb[b].item())[b], rtol=0, atol=1e-13)
    # increments with per-sample times and a 0-d tensor time
    torch.testing.assert_close(X.evaluate(tb, tb + 0.1), X.evaluate(tb + 0.1) - X.evaluate(tb))
    torch.testing.assert_close(X.evaluate(torch.tensor(1.3, dtype=F64)), X.evaluate(1.3))
    # no batch dimensions: (B,) times give (B, C)
    Y = cls(ts, xs[0, 0])
    assert Y.derivative(tb).shape == (4, xs.shape[-1] + (cls is RectilinearInterpolation))
    with pytest.raises(ValueError, match="one time per sample"):
        X.evaluate(torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("cls", ALL)
def test_float32_follows_data(cls):
    ts, xs = _irregular(dtype=torch.float32)
    X = cls(ts, xs)
    assert X.evaluate(1.0).dtype == torch.float32
    assert X.derivative(torch.full((3,), 1.0, dtype=F64)).dtype == torch.float32


def test_time_gradient():
    ts, xs = _irregular()
    X = CubicSpline(ts, xs)
    t = torch.tensor(1.234, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(X.evaluate(t).sum(), t)
    torch.testing.assert_close(g, X.derivative(1.234).sum())


@pytest.mark.parametrize("cls", ALL)
def test_gradcheck_wrt_data(cls):
    ts, xs = _irregular(T=5, batch=(2,), C=2)
    xs[0, 1, 0] = NAN
    xs[1, -1, 1] = NAN
    mask = torch.isnan(xs)
    base = xs.clone()

    def f(x):
        x = torch.where(mask, base, x)
        X = cls(ts, x)
        tb = torch.tensor([1.3, 2.2], dtype=F64)
        return X.evaluate(ts[1].item() + 0.37), X.derivative(tb), X.evaluate(X.t0, X.t1)

    x = torch.where(mask, torch.zeros_like(xs), xs).requires_grad_()
    assert torch.autograd.gradcheck(f, (x,))


# ---------------------------------------------------------------------------------------------
# errors and variable lengths


@pytest.mark.parametrize("cls", ALL)
def test_errors(cls):
    ts, xs = _irregular()
    with pytest.raises(ValueError, match="strictly increasing"):
        cls(ts.flip(0), xs)
    with pytest.raises(ValueError, match="strictly increasing"):
        cls(torch.cat([ts[:3], ts[2:3], ts[4:]]), xs)
    with pytest.raises(ValueError, match="9 times"):
        cls(ts[:-1], xs)
    with pytest.raises(ValueError, match="at least 2"):
        cls(ts[:1], xs[..., :1, :])
    with pytest.raises(ValueError, match="floating-point"):
        cls(ts, xs.long())
    with pytest.raises(ValueError, match="floating-point"):
        cls(torch.arange(9), xs)
    with pytest.raises(ValueError, match=r"\(\.\.\., T, C\)"):
        cls(ts, xs[0, :, 0])
    with pytest.raises(ValueError, match="finite"):
        cls(torch.full((9,), NAN, dtype=F64), xs)


def test_pad_sequences_index_time():
    a = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    b = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 4.0], [3.0, 9.0]])
    ts, xs = pad_sequences([a, b])
    assert ts.tolist() == [0.0, 1.0, 2.0, 3.0] and xs.shape == (2, 4, 2)
    torch.testing.assert_close(xs[0, 2:], a[-1:].expand(2, 2))
    for cls in (LinearInterpolation, HermiteCubic):
        X = cls(ts, xs)
        # zero derivative after the short series ends (from the next knot on for Hermite)
        start = 1.0 if cls is LinearInterpolation else 2.0
        for t in np.linspace(start, 3.0, 9).tolist():
            assert X.derivative(t)[0].abs().max() == 0
        torch.testing.assert_close(X.evaluate(3.0)[0], a[-1])


def test_pad_sequences_own_times():
    a, b = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0], [2.0]])
    ts, xs = pad_sequences([a, b], [[0.0, 2.0], [0.5, 1.0, 1.5]])
    assert ts.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert torch.isnan(xs[0, 1:4, 0]).all() and torch.isnan(xs[1, 0, 0])
    torch.testing.assert_close(xs[1, -1], b[-1])  # repeated after its last time
    X = LinearInterpolation(ts, xs)
    torch.testing.assert_close(X.evaluate(1.0)[0], torch.tensor([2.0]))
    with pytest.raises(ValueError, match="strictly increasing"):
        pad_sequences([a], [[1.0, 0.0]])


def test_extrapolation_extends_the_end_pieces_as_documented():
    """docs/cde.md: outside [t0, t1] the first/last piece is continued (no warning)."""
    X = CubicSpline(
        torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([[0.0], [5.0], [-3.0]], dtype=torch.float64)
    )
    assert X.evaluate(3.0).item() == pytest.approx(-11.0)
    assert X.evaluate(10.0).item() == pytest.approx(1571.0)
    L = LinearInterpolation(torch.tensor([0.0, 1.0]), torch.tensor([[0.0], [2.0]]))
    assert L.evaluate(3.0).item() == pytest.approx(6.0) and L.evaluate(-1.0).item() == pytest.approx(-2.0)


@pytest.mark.parametrize("cls", [LinearInterpolation, HermiteCubic, CubicSpline])
def test_gradient_with_respect_to_observation_times(cls):
    ts = torch.tensor([0.0, 0.7, 1.5, 2.0], dtype=torch.float64, requires_grad=True)
    xs = torch.randn(2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def f(ts):
        X = cls(ts, xs)
        return torch.cat([X.evaluate(1.1), X.derivative(torch.tensor(1.9, dtype=torch.float64))], -1)

    assert torch.autograd.gradcheck(f, (ts,))
