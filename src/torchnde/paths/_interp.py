r"""Interpolations of (irregular, partially observed) time series as smooth paths.

A neural controlled differential equation (Kidger, Morrill, Foster & Lyons 2020, *Neural
Controlled Differential Equations for Irregular Time Series*) is driven by a continuous path
:math:`X` built from discrete observations :math:`(t_i, x_i)`. The classes here build that path:

=============================  ==========  ==================================================
class                          smoothness  property
=============================  ==========  ==================================================
:class:`LinearInterpolation`   C0          local, cheap; derivative jumps at every knot
:class:`RectilinearInterpolation` C0       time then values move in turn (causal, online)
:class:`HermiteCubic`          C1          cubic Hermite with backward differences (causal)
:class:`CubicSpline`           C2          natural cubic spline (smoothest; not causal)
=============================  ==========  ==================================================

Rectilinear interpolation and Hermite cubics with backward differences are those of Morrill,
Kidger, Yang & Lyons 2021 (*Neural Controlled Differential Equations for Online Prediction
Tasks*): on the interval :math:`[t_i, t_{i+1}]` the path depends only on observations up to
:math:`t_{i+1}`, so a model can be run online as data arrive.

**Shapes.** ``xs`` has shape ``(..., T, C)`` (batch dimensions, time, channels) and ``ts`` shape
``(T,)``, strictly increasing; one grid for the whole batch (see :func:`pad_sequences` for series
of different lengths or with their own times). Values and derivatives have shape ``(..., C)``.

**Missing data.** ``NaN`` in ``xs`` marks a missing value; each channel of each series is filled
from its own observations, by the interpolation's rule:

* :class:`LinearInterpolation` and :class:`HermiteCubic`: linearly in time between the
  neighbouring observations (the filled values then serve as knots);
* :class:`RectilinearInterpolation`: the last observation is carried forward (causal);
* :class:`CubicSpline`: the natural cubic spline through the observed values only (missing knots
  are not knots of the spline).

In all cases values before a channel's first observation are set to that observation, and values
after its last observation to the last one (before the first observation this is *not* causal).
A channel without any observation raises ``ValueError`` naming it: fill it first (e.g. with 0 or
the channel's mean over the data set). Observed values are always interpolated exactly and
gradients flow to them (missing entries get zero gradient).

**Times.** ``evaluate``/``derivative`` accept a Python float, a 0-d tensor, or a ``(B,)`` tensor
holding one time per sample (``B`` the leading batch dimension, as in ``solve(..., per_sample=True)``);
outside ``[t0, t1]`` the first/last piece is extended (no warning: checking would cost a device
synchronisation per query; a cubic piece grows like ``t^3`` there, so clamp the time if the path
should stay constant). At a knot the piece to its right is used; ``derivative(t, left=True)``
gives the left limit instead. Observation times ``ts`` that require grad receive gradients.

All coefficients are computed once, at construction, from ``xs`` by differentiable tensor
operations (on ``xs``'s device, in its dtype); a query is one knot search, one gather and a
Horner evaluation.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Sequence

import torch

from ._base import AbstractPath

__all__ = ["LinearInterpolation", "RectilinearInterpolation", "HermiteCubic", "CubicSpline", "pad_sequences"]


# --------------------------------------------------------------------------------------------
# input checks and missing-value filling


def _check_data(ts, xs, name: str):
    """``(ts, xs)`` checked and ``ts`` as a tensor in ``xs``'s dtype and device."""
    if not isinstance(xs, torch.Tensor):
        raise ValueError(f"{name}: xs must be a tensor of shape (..., T, C), got {type(xs).__name__}")
    if not xs.is_floating_point():
        raise ValueError(f"{name}: xs must be a real floating-point tensor (float32/float64), got dtype {xs.dtype}")
    if xs.dim() < 2:
        raise ValueError(f"{name}: xs must have shape (..., T, C) (time, then channels), got {tuple(xs.shape)}")
    if isinstance(ts, torch.Tensor):
        if not ts.is_floating_point():
            raise ValueError(f"{name}: ts must be a floating-point tensor, got dtype {ts.dtype}")
        if ts.device != xs.device:
            raise ValueError(f"{name}: ts is on {ts.device} but xs is on {xs.device}; put them on one device")
        ts = ts.to(xs.dtype)
    else:
        try:
            ts = torch.as_tensor(ts, dtype=xs.dtype, device=xs.device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{name}: ts must be a 1-D sequence of times ({e})") from None
    if ts.dim() != 1:
        raise ValueError(f"{name}: ts must be 1-D of shape (T,), got shape {tuple(ts.shape)}")
    T = ts.shape[0]
    if T < 2:
        raise ValueError(f"{name}: needs at least 2 observation times, got T = {T}")
    if xs.shape[-2] != T:
        raise ValueError(
            f"{name}: xs has shape {tuple(xs.shape)}, i.e. {xs.shape[-2]} times along dimension -2, but ts has "
            f"{T} times; xs must have shape (..., T, C)"
        )
    td = ts.detach()
    if not torch.isfinite(td).all():
        raise ValueError(f"{name}: ts must be finite, got {td.tolist()}")
    bad = (td[1:] <= td[:-1]).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"{name}: ts must be strictly increasing (in {xs.dtype}); ts[{i}] = {td[i].item()} >= ts[{i + 1}] = "
            f"{td[i + 1].item()}"
        )
    if torch.isinf(xs.detach()).any():
        raise ValueError(f"{name}: xs holds infinite values; only NaN (missing) is allowed besides finite values")
    return ts, xs


def _observed(xs, name: str):
    """The mask of observed entries, or None if all are; raises for a channel with no observation."""
    mask = ~torch.isnan(xs.detach())
    if bool(mask.all()):
        return None
    count = mask.sum(-2)  # (..., C)
    empty = (count == 0).nonzero()
    if empty.numel():
        where = tuple(empty[0].tolist())
        sample, channel = where[:-1], where[-1]
        at = f" of sample {sample if len(sample) > 1 else sample[0]}" if sample else ""
        raise ValueError(
            f"{name}: channel {channel}{at} has no observation (all NaN); fill it before interpolating, e.g. "
            "with 0 or the channel's mean over the data set"
        )
    return mask


def _neighbours(mask):
    """Indices (along dim -2) of the previous and the next observation of every entry, each
    replaced by the other where it does not exist (before the first / after the last one)."""
    T = mask.shape[-2]
    idx = torch.arange(T, device=mask.device).view(T, 1).expand(mask.shape)
    prev = torch.where(mask, idx, -1).cummax(-2).values
    nxt = torch.where(mask, idx, T).flip(-2).cummin(-2).values.flip(-2)
    prev_ = torch.where(prev < 0, nxt, prev)
    nxt_ = torch.where(nxt >= T, prev_, nxt)
    return prev_, nxt_


def _fill_linear(ts, xs, mask):
    """NaNs replaced by linear interpolation in time between observations (constant outside)."""
    if mask is None:
        return xs
    prev, nxt = _neighbours(mask)
    clean = torch.where(mask, xs, torch.zeros_like(xs))
    xp, xn = clean.gather(-2, prev), clean.gather(-2, nxt)
    tp, tn = ts[prev], ts[nxt]
    same = prev == nxt
    w = torch.where(same, torch.zeros_like(tp), (ts.view(-1, 1) - tp) / torch.where(same, torch.ones_like(tp), tn - tp))
    return torch.where(mask, xs, xp + w * (xn - xp))


def _fill_forward(xs, mask):
    """NaNs replaced by the last observation (the first one before it)."""
    if mask is None:
        return xs
    prev, _ = _neighbours(mask)
    clean = torch.where(mask, xs, torch.zeros_like(xs))
    return torch.where(mask, xs, clean.gather(-2, prev))


# --------------------------------------------------------------------------------------------
# cubic pieces from knot values and knot slopes


def _hermite(h, x0, x1, k0, k1):
    """Coefficients ``(a, b, c, d)`` of ``a + b s + c s^2 + d s^3`` (``s`` the time since the
    left knot) of the cubic with values ``x0, x1`` and slopes ``k0, k1`` at the ends of an interval
    of length ``h``."""
    slope = (x1 - x0) / h
    c = (3 * slope - 2 * k0 - k1) / h
    d = (k0 + k1 - 2 * slope) / (h * h)
    return x0, k0, c, d


def _tridiagonal_solve(lower, diag, upper, rhs):
    """Solve the tridiagonal systems along the last dimension (Thomas algorithm; the matrices
    here are diagonally dominant). ``lower[i]`` multiplies unknown ``i - 1`` in row ``i``,
    ``upper[i]`` unknown ``i + 1``; the diagonals broadcast against ``rhs``."""
    n = rhs.shape[-1]
    cs, ds = [], []
    c_prev = d_prev = None
    for i in range(n):
        if i == 0:
            denom = diag[..., 0]
            d_i = rhs[..., 0] / denom
        else:
            denom = diag[..., i] - lower[..., i] * c_prev
            d_i = (rhs[..., i] - lower[..., i] * d_prev) / denom
        c_i = upper[..., i] / denom
        cs.append(c_i)
        ds.append(d_i)
        c_prev, d_prev = c_i, d_i
    out = [ds[-1]]
    for i in range(n - 2, -1, -1):
        out.append(ds[i] - cs[i] * out[-1])
    return torch.stack(out[::-1], -1)


def _spline_slopes(ts, xs, count=None):
    """Knot slopes of the natural cubic splines through ``(ts, xs)`` along the last dimension.

    ``ts``: ``(N,)`` or, per series, ``(..., N)``; ``xs``: ``(..., N)``. With ``count`` (per
    series, ``(...)``), only the first ``count`` knots of a series are used; the slopes after
    them are zero.
    """
    N = xs.shape[-1]
    h = ts[..., 1:] - ts[..., :-1]
    if count is None:
        inv_h = 1 / h
    else:
        valid = torch.arange(N - 1, device=xs.device) < (count.unsqueeze(-1) - 1)
        inv_h = torch.where(valid, 1 / torch.where(valid, h, torch.ones_like(h)), torch.zeros_like(h))
    slope_term = (xs[..., 1:] - xs[..., :-1]) * inv_h * inv_h  # 0 on unused intervals
    pad = torch.zeros_like(inv_h[..., :1])
    lower = torch.cat([pad, inv_h], -1)
    upper = torch.cat([inv_h, pad], -1)
    diag = 2 * (lower + upper)
    if count is not None:
        unused = torch.arange(N, device=xs.device) >= count.unsqueeze(-1)
        diag = torch.where(unused, torch.ones_like(diag), diag)
    spad = torch.zeros_like(slope_term[..., :1])
    rhs = 3 * (torch.cat([spad, slope_term], -1) + torch.cat([slope_term, spad], -1))
    return _tridiagonal_solve(lower, diag, upper, rhs)


# --------------------------------------------------------------------------------------------
# time handling


def _scalar_time(t):
    """``t`` as a Python float if it can be one without losing a gradient, else None."""
    if isinstance(t, numbers.Real) and not isinstance(t, bool):
        return float(t)
    if isinstance(t, torch.Tensor) and t.dim() == 0 and not t.requires_grad:
        return float(t)
    return None


class _PiecewisePolynomial(AbstractPath):
    """A path that is a polynomial on each interval between consecutive knots.

    ``coeffs`` has shape ``(*batch, N - 1, K, C)``: on ``[knots[i], knots[i + 1]]`` the path is
    ``sum_k coeffs[..., i, k, :] (t - knots[i])**k``.
    """

    smooth = True

    @classmethod
    def _from_coefficients(cls, knots: torch.Tensor, coeffs: torch.Tensor):
        """A path from ready-made coefficients (``(*batch, N - 1, K, C)``, see above)."""
        self = cls.__new__(cls)
        self._setup(knots, coeffs)
        return self

    def _setup(self, knots: torch.Tensor, coeffs: torch.Tensor):
        # knots that require grad (torchcde's differentiable observation times) also enter the
        # offsets t - knot, so that the gradient reaches them; the search uses the detached copy
        self._knots_grad = knots if knots.requires_grad else None
        self._knots = knots.detach()
        self._knot_list = self._knots.tolist()
        self._coeffs = coeffs
        K = coeffs.shape[-2]
        powers = torch.arange(1, K, dtype=coeffs.dtype, device=coeffs.device).view(K - 1, 1)
        self._dcoeffs = coeffs[..., 1:, :] * powers
        self.batch_shape = coeffs.shape[:-3]
        self.channels = coeffs.shape[-1]
        self.t0 = self._knot_list[0]
        self.t1 = self._knot_list[-1]

    @property
    def ts(self) -> torch.Tensor:
        """The knots: the times where the path's pieces meet (``(N,)``, the data's dtype/device)."""
        return self._knots

    @property
    def dtype(self):
        return self._coeffs.dtype

    @property
    def device(self):
        return self._coeffs.device

    def __repr__(self):
        return (
            f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, knots={len(self._knot_list)}, "
            f"channels={self.channels}, t0={self.t0}, t1={self.t1}, dtype={self.dtype})"
        )

    # -- the knot search and the Horner evaluation -------------------------------------------

    def _poly(self, coeffs, t, left: bool, knots=None):
        """The polynomial pieces ``coeffs`` at ``t``; ``knots``: the knots to measure the offset
        from (default: this path's; a tensor requiring grad gets its gradient)."""
        n = len(self._knot_list) - 2  # index of the last piece
        if knots is None:
            knots = self._knots_grad
        if knots is not None and not torch.is_grad_enabled():
            knots = None
        ft = _scalar_time(t)
        if ft is not None:
            if left:
                i = bisect.bisect_left(self._knot_list, ft) - 1
            else:
                i = bisect.bisect_right(self._knot_list, ft) - 1
            i = min(max(i, 0), n)
            c = coeffs[..., i, :, :]
            out = c[..., -1, :]
            if knots is not None:
                ht = (ft - knots[i]).to(coeffs.dtype)
                for k in range(c.shape[-2] - 2, -1, -1):
                    out = c[..., k, :] + out * ht
                return out
            h = ft - self._knot_list[i]
            for k in range(c.shape[-2] - 2, -1, -1):
                out = torch.add(c[..., k, :], out, alpha=h)
            return out
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"a time must be a float or a tensor, got {type(t).__name__}")
        if t.dim() > 1 or (t.dim() == 1 and self.batch_shape and t.shape[0] != self.batch_shape[0]):
            want = f"({self.batch_shape[0]},) (one time per sample)" if self.batch_shape else "(B,)"
            raise ValueError(
                f"{type(self).__name__}: a time must be a scalar or have shape {want}, got {tuple(t.shape)}"
            )
        if t.device != self._knots.device:
            raise ValueError(
                f"{type(self).__name__}: the time is on {t.device} but the path is on {self._knots.device}"
            )
        td = t.detach().to(self._knots.dtype)
        idx = (torch.searchsorted(self._knots, td, right=not left) - 1).clamp(0, n)
        h = (t - (self._knots if knots is None else knots)[idx]).to(coeffs.dtype)
        if t.dim() == 0:
            c = coeffs.index_select(-3, idx.reshape(1)).squeeze(-3)
        elif not self.batch_shape:
            c = coeffs.index_select(0, idx)  # (B, K, C)
            h = h.view(-1, 1)
        else:
            # one flat gather: row (b, m, idx[b]) of coeffs viewed as (B * M * pieces, K, C)
            B, pieces = t.shape[0], coeffs.shape[-3]
            M = coeffs[..., 0, 0, 0].numel() // B
            rows = (torch.arange(B * M, device=idx.device).view(B, M) * pieces + idx.view(B, 1)).view(-1)
            c = coeffs.reshape(-1, *coeffs.shape[-2:]).index_select(0, rows)
            c = c.view(*self.batch_shape, *coeffs.shape[-2:])
            h = h.view(B, *([1] * (len(self.batch_shape))))
        out = c[..., -1, :]
        for k in range(c.shape[-2] - 2, -1, -1):
            out = torch.addcmul(c[..., k, :], out, h)
        return out

    def evaluate(self, s, t=None):
        """``X(s)``, or with ``t`` the increment ``X(t) - X(s)``; shape ``(*batch, C)`` (with
        ``(B,)`` times and no batch dimensions: ``(B, C)``)."""
        if t is None:
            return self._poly(self._coeffs, s, False)
        return self._poly(self._coeffs, t, False) - self._poly(self._coeffs, s, False)

    def derivative(self, t, left: bool = False):
        """``dX/dt`` at ``t``; at a knot the right derivative (``left=True``: the left one)."""
        return self._poly(self._dcoeffs, t, left)


# --------------------------------------------------------------------------------------------
# the interpolations


class LinearInterpolation(_PiecewisePolynomial):
    r"""The piecewise-linear path through ``(ts[i], xs[..., i, :])``.

    Continuous, with a derivative that jumps at every knot: pass ``jump_ts=path.ts`` to an
    adaptive controller so that steps land on the knots.

    Args:
        ts: ``(T,)`` strictly increasing observation times (tensor or sequence), ``T >= 2``.
        xs: ``(..., T, C)`` observations (float32/float64); ``NaN`` marks a missing value, filled
            linearly in time between the channel's observations (constant before the first and
            after the last one).

    Example:
        >>> import torch
        >>> from torchnde.paths._interp import LinearInterpolation
        >>> X = LinearInterpolation(torch.tensor([0.0, 1.0, 3.0]), torch.tensor([[0.0], [2.0], [float("nan")]]))
        >>> X.evaluate(0.5), X.derivative(0.5), X.evaluate(2.0)
        (tensor([1.]), tensor([2.]), tensor([2.]))
    """

    def __init__(self, ts, xs):
        ts, xs = _check_data(ts, xs, "LinearInterpolation")
        xs = _fill_linear(ts, xs, _observed(xs, "LinearInterpolation"))
        h = (ts[1:] - ts[:-1]).unsqueeze(-1)
        slope = (xs[..., 1:, :] - xs[..., :-1, :]) / h
        self._setup(ts, torch.stack([xs[..., :-1, :], slope], -2))


class RectilinearInterpolation(_PiecewisePolynomial):
    r"""Rectilinear interpolation (Morrill et al. 2021): time moves first, then the values.

    The path has ``C + 1`` channels: **channel 0 is time** (the observation times ``ts``) and
    channels ``1..C`` are the data. Each data interval ``[ts[i], ts[i+1]]`` is split at its
    midpoint ``m_i``: on ``[ts[i], m_i]`` the time channel moves linearly from ``ts[i]`` to
    ``ts[i+1]`` while the values stay at ``xs[i]``; on ``[m_i, ts[i+1]]`` the values move linearly
    from ``xs[i]`` to ``xs[i+1]`` while the time channel stays at ``ts[i+1]``. So the path is
    piecewise linear with ``2T - 1`` knots (``path.ts``: the data times and the midpoints), and at
    each data time ``ts[i]`` it equals ``(ts[i], xs[i])``. Up to the data time ``ts[i]`` the path
    depends only on observations up to ``ts[i]``: the solution of a CDE driven by it can be read
    off online.

    Args:
        ts: ``(T,)`` strictly increasing observation times, ``T >= 2``.
        xs: ``(..., T, C)`` observations, without a time channel. ``NaN`` (missing) is filled by
            carrying the last observation forward (the first observation backward before it,
            which is not causal).
    """

    def __init__(self, ts, xs):
        ts, xs = _check_data(ts, xs, "RectilinearInterpolation")
        xs = _fill_forward(xs, _observed(xs, "RectilinearInterpolation"))
        mid = (ts[:-1] + ts[1:]) / 2
        knots = torch.stack([ts[:-1], mid], -1).reshape(-1)
        knots = torch.cat([knots, ts[-1:]])
        if not bool((knots[1:] > knots[:-1]).all()):
            raise ValueError(
                "RectilinearInterpolation: ts are too close together to split their intervals in this dtype"
            )
        batch = xs.shape[:-2]
        T = ts.shape[0]
        tcol = ts.view(T, 1).expand(*batch, T, 1)
        data = torch.cat([tcol, xs], -1)  # (..., T, C + 1)
        # values at the 2T - 1 knots: (t_i, x_i), (t_{i+1}, x_i), (t_{i+1}, x_{i+1}), ...
        at_mid = torch.cat([data[..., 1:, :1], data[..., :-1, 1:]], -1)
        vals = torch.stack([data[..., :-1, :], at_mid], -2).reshape(*batch, 2 * (T - 1), -1)
        vals = torch.cat([vals, data[..., -1:, :]], -2)
        h = (knots[1:] - knots[:-1]).unsqueeze(-1)
        slope = (vals[..., 1:, :] - vals[..., :-1, :]) / h
        self._setup(knots, torch.stack([vals[..., :-1, :], slope], -2))


class HermiteCubic(_PiecewisePolynomial):
    r"""Cubic Hermite interpolation with backward differences (Morrill et al. 2021).

    On each interval the path is the cubic with the data's values at both ends and, as slopes,
    the *backward* differences: at knot ``i`` the slope of the data over ``[ts[i-1], ts[i]]``
    (at the first knot that over the first interval). The path is C1 and on ``[ts[i], ts[i+1]]``
    depends only on observations up to ``ts[i+1]`` (causal), unlike a natural cubic spline. Its
    derivative is continuous, so adaptive solvers need no ``jump_ts`` (passing them still helps).

    Args:
        ts: ``(T,)`` strictly increasing observation times, ``T >= 2``.
        xs: ``(..., T, C)`` observations; ``NaN`` is filled linearly in time between the channel's
            observations (constant outside them) and the filled values serve as knots.
    """

    def __init__(self, ts, xs):
        ts, xs = _check_data(ts, xs, "HermiteCubic")
        xs = _fill_linear(ts, xs, _observed(xs, "HermiteCubic"))
        h = (ts[1:] - ts[:-1]).unsqueeze(-1)
        slope = (xs[..., 1:, :] - xs[..., :-1, :]) / h
        k0 = torch.cat([slope[..., :1, :], slope[..., :-1, :]], -2)
        a, b, c, d = _hermite(h, xs[..., :-1, :], xs[..., 1:, :], k0, slope)
        self._setup(ts, torch.stack([a, b, c, d], -2))


class CubicSpline(_PiecewisePolynomial):
    r"""The natural cubic spline through the data (Kidger et al. 2020).

    The C2 piecewise cubic through every knot with zero second derivative at both ends. Smoothest
    of the interpolations, but not causal: the path anywhere depends on all the data.

    Args:
        ts: ``(T,)`` strictly increasing observation times, ``T >= 2`` (``T = 2``: a line).
        xs: ``(..., T, C)`` observations. ``NaN`` (missing): each channel's spline passes through
            its observed values only; values before the first / after the last observation are
            set to that observation and become knots (so the spline stays close to constant
            there), as in torchcde's ``natural_cubic_coeffs``.
    """

    def __init__(self, ts, xs):
        ts, xs = _check_data(ts, xs, "CubicSpline")
        mask = _observed(xs, "CubicSpline")
        if mask is None:
            x = xs.transpose(-1, -2)  # (..., C, T)
            k = _spline_slopes(ts, x)
            h = ts[1:] - ts[:-1]
            coeffs = _hermite(h, x[..., :-1], x[..., 1:], k[..., :-1], k[..., 1:])
            coeffs = torch.stack(coeffs, -2).permute(*range(x.dim() - 2), -1, -2, -3)  # (..., T-1, 4, C)
        else:
            coeffs = self._with_missing(ts, xs, mask)
        self._setup(ts, coeffs)

    @staticmethod
    def _with_missing(ts, xs, mask):
        T = ts.shape[0]
        # observations carried to the ends become knots
        idx = torch.arange(T, device=xs.device).view(T, 1)
        first = torch.where(mask, idx.expand(mask.shape), T).amin(-2, keepdim=True)
        last = torch.where(mask, idx.expand(mask.shape), -1).amax(-2, keepdim=True)
        lead = idx < first
        trail = idx > last
        clean = torch.where(mask, xs, torch.zeros_like(xs))
        x = torch.where(lead, clean.gather(-2, first.expand(mask.shape)), clean)
        x = torch.where(trail, clean.gather(-2, last.expand(mask.shape)), x)
        knot = mask | lead | trail  # (..., T, C)
        # one series per (sample, channel), its knots moved to the front
        batch, C = xs.shape[:-2], xs.shape[-1]
        knot_s = knot.transpose(-1, -2).reshape(-1, T)
        x_s = x.transpose(-1, -2).reshape(-1, T)
        order = torch.argsort((~knot_s).to(torch.int8), dim=-1, stable=True)
        count = knot_s.sum(-1)
        tk = ts[order]
        xk = x_s.gather(-1, order)
        used = torch.arange(T, device=xs.device) < count.unsqueeze(-1)
        tk = torch.where(used, tk, torch.full_like(tk, math.inf))
        slopes = _spline_slopes(torch.where(used, tk, torch.zeros_like(tk)), torch.where(used, xk, 0.0), count)
        # the piece of each series that covers each interval [ts[i], ts[i+1]]
        j = torch.searchsorted(tk, ts[:-1].expand(tk.shape[0], T - 1).contiguous(), right=True) - 1
        j = torch.minimum(j.clamp(min=0), (count - 2).unsqueeze(-1))
        t_left, t_right = tk.gather(-1, j), tk.gather(-1, j + 1)
        a, b, c, d = _hermite(
            t_right - t_left, xk.gather(-1, j), xk.gather(-1, j + 1), slopes.gather(-1, j), slopes.gather(-1, j + 1)
        )
        # re-expand each piece about the interval's own left end
        s = ts[:-1] - t_left
        a, b, c = a + s * (b + s * (c + s * d)), b + s * (2 * c + 3 * s * d), c + 3 * s * d
        coeffs = torch.stack([a, b, c, d], -1)  # (S, T-1, 4)
        return coeffs.reshape(*batch, C, T - 1, 4).permute(*range(len(batch)), -2, -1, -3)


# --------------------------------------------------------------------------------------------
# variable-length series


def pad_sequences(sequences: Sequence[torch.Tensor], times: Sequence | None = None):
    r"""Put series of different lengths (or with their own times) on one time grid.

    Args:
        sequences: ``N`` tensors of shape ``(T_i, C)`` (one dtype and device; may hold NaN).
        times: optional, ``N`` increasing 1-D sequences of length ``T_i``: the observation times of
            each series. Without it series ``i`` is observed at ``0, 1, ..., T_i - 1``.

    Returns:
        ``(ts, xs)``: the common grid ``ts`` (``(T,)``; without ``times`` ``0..max T_i - 1``,
        with them the sorted union of all times) and ``xs`` of shape ``(N, T, C)``. A series' rows
        after its last observation repeat that observation, so every interpolation here is
        constant there (its derivative is zero after the series ends, from the next knot on for
        :class:`HermiteCubic`) and a CDE's state stops changing: ``z(ts[-1])`` is the state at the
        series' own end. With ``times``, grid times a series was not observed at are NaN
        (missing), filled by the interpolation's rule.

    Example:
        >>> import torch
        >>> from torchnde.paths._interp import pad_sequences, HermiteCubic
        >>> ts, xs = pad_sequences([torch.ones(3, 2), torch.zeros(5, 2)])
        >>> ts.tolist(), xs.shape
        ([0.0, 1.0, 2.0, 3.0, 4.0], torch.Size([2, 5, 2]))
        >>> X = HermiteCubic(ts, xs)
    """
    seqs = list(sequences)
    if not seqs:
        raise ValueError("pad_sequences needs at least one sequence")
    for i, s in enumerate(seqs):
        if not isinstance(s, torch.Tensor) or s.dim() != 2 or not s.is_floating_point():
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(
                f"pad_sequences: sequence {i} must be a floating-point tensor of shape (T_i, C), got {got}"
            )
        if s.shape[-1] != seqs[0].shape[-1] or s.dtype != seqs[0].dtype or s.device != seqs[0].device:
            raise ValueError(
                f"pad_sequences: all sequences need one channel count, dtype and device; sequence {i} has "
                f"{tuple(s.shape)} {s.dtype} {s.device}, sequence 0 has {tuple(seqs[0].shape)} {seqs[0].dtype} {seqs[0].device}"
            )
        if s.shape[0] < 1:
            raise ValueError(f"pad_sequences: sequence {i} is empty")
    ref = seqs[0]
    N, C = len(seqs), ref.shape[-1]
    if times is None:
        T = max(s.shape[0] for s in seqs)
        ts = torch.arange(T, dtype=ref.dtype, device=ref.device)
        rows = [torch.cat([s, s[-1:].expand(T - s.shape[0], C)]) for s in seqs]
        return ts, torch.stack(rows)
    times = list(times)
    if len(times) != N:
        raise ValueError(f"pad_sequences: got {N} sequences but {len(times)} time sequences")
    tt = []
    for i, (s, t) in enumerate(zip(seqs, times)):
        t = torch.as_tensor(t, dtype=ref.dtype, device=ref.device).detach()
        if t.shape != (s.shape[0],):
            raise ValueError(f"pad_sequences: times[{i}] must have shape ({s.shape[0]},), got {tuple(t.shape)}")
        if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
            raise ValueError(f"pad_sequences: times[{i}] must be strictly increasing, got {t.tolist()}")
        tt.append(t)
    ts = torch.unique(torch.cat(tt), sorted=True)
    T = ts.shape[0]
    rows = []
    for s, t in zip(seqs, tt):
        pos = torch.searchsorted(ts, t)
        row = torch.full((T, C), math.nan, dtype=ref.dtype, device=ref.device)
        row = row.index_put((pos,), s)
        after = torch.arange(T, device=ref.device) > pos[-1]
        row = torch.where(after.unsqueeze(-1), s[-1:].expand(T, C), row)
        rows.append(row)
    return ts, torch.stack(rows)
