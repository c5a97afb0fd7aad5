"""torchcde's ``cdeint`` and interpolations, computed by torchnde.

Switching an existing code base is an import change::

    # import torchcde
    import torchnde.compat.torchcde as torchcde

Names and signatures are torchcde's (0.2.x): ``cdeint(X, func, z0, t, adjoint=True,
backend="torchdiffeq", **kwargs)``; the coefficient functions ``linear_interpolation_coeffs``,
``natural_cubic_coeffs`` (and the older ``natural_cubic_spline_coeffs``),
``hermite_cubic_coefficients_with_backward_differences`` and (not in torchcde, a shorthand for
``linear_interpolation_coeffs(x, t, rectilinear=...)``) ``rectilinear_interpolation_coeffs``; the
classes ``LinearInterpolation(coeffs, t=None)`` and ``CubicSpline(coeffs, t=None)`` with
``evaluate``, ``derivative``, ``interval`` and ``grid_points``; ``TupleControl``;
``misc.forward_fill`` (and ``misc.tridiagonal_solve``, ``misc.cheap_stack``); and the log-ODE method's
``logsig_windows`` (and the deprecated ``logsignature_windows``), at any depth.

The coefficient tensors have torchcde's layouts (values at the knots for the linear
interpolation; ``(..., T - 1, 4 C)`` holding ``a, b, 2c, 3d`` for the cubics), so coefficients
saved with torchcde load here and the other way round. The interpolants are the same functions:
values and derivatives agree with torchcde's to rounding (~1e-15 in float64), missing values
(NaN) included: linear filling for the linear and Hermite interpolations, forward filling for
the rectilinear one, the natural spline through each channel's observations for
``natural_cubic_coeffs``, and zeros for a channel with no observation at all. The native classes
:class:`torchnde.paths.LinearInterpolation` etc. differ there: they raise for such a channel.
``evaluate(t)``/``derivative(t)`` take, as in torchcde, a scalar time (result ``(..., C)``) or a
tensor of times of any shape ``S`` (result ``(..., *S, C)``), whereas the native classes read a
``(B,)`` tensor as one time per sample. Outside ``interval`` the first/last polynomial piece is
extended (as torchcde): a cubic grows like ``t^3``.

``cdeint`` solves the CDE as the ODE ``dz/dt = func(t, z) dX/dt``. With
``backend="torchdiffeq"`` (the default) through :func:`torchnde.compat.torchdiffeq.odeint`
(``adjoint=False``) or ``odeint_adjoint`` (``adjoint=True``, :class:`~torchnde.BacksolveAdjoint`),
so ``method``, ``rtol``, ``atol``, ``options`` and the ``adjoint_*`` keyword arguments mean what
they mean in torchdiffeq, with torchcde's defaults ``rtol=1e-4, atol=1e-6``; results agree with
torchcde to the solver's tolerance (the step-size control differs slightly; see
:mod:`torchnde.compat.torchdiffeq`). With ``backend="torchsde"`` (torchcde then calls
torchsde's ``sdeint`` on the CDE as an SDE without noise) by the drift part of the torchsde
method (``"euler"``, ``"milstein"``, ``"euler_heun"``: Euler; ``"midpoint"``, ``"heun"``,
``"srk"`` (additive noise: SRA1's drift), ``"reversible_heun"``) with constant steps ``dt``
(default 1e-3, as torchsde); ``adjoint_method="adjoint_reversible_heun"`` (the default with
``"reversible_heun"``) is :class:`~torchnde.ReversibleAdjoint`, exact gradients of the computed
solution. Between steps, output times are read from the method's dense output (torchsde
interpolates linearly), so results agree exactly when the output times are on the step grid.

**Gradients.** With either ``adjoint`` and either backend, gradients reach ``z0``, the output
times ``t``, the observation times passed to the coefficient functions and the classes (when they
require grad: through the coefficients and the offsets ``s - t_i`` of the pieces), the parameters of ``func`` (with ``adjoint=True`` those in ``adjoint_params``; the
default, as torchcde, is the parameters of ``func`` and ``X``) and the coefficients of the
interpolation, also when they are computed inside the graph (from parameters, or from another
solve, as in torchsde's SDE-GAN example): the adjoint differentiates with respect to detached
stand-ins of the coefficients and passes that gradient on into the graph that computed them.
torchcde warns when ``adjoint=True`` and the coefficients require grad but are not in
``adjoint_params``, and gives them no gradient; here they receive it anyway.

Tuple states work as in torchcde: ``z0`` a tuple of tensors, ``X = TupleControl(X1, X2, ...)``
and ``func`` returning a tuple of matrices (``backend="torchdiffeq"`` only, as torchsde has no
tuple states). Not supported: torchsde's
``names``, ``logqp``, ``extra`` and ``extra_solver_state`` (``NotImplementedError``), adaptive
steps with ``backend="torchsde"`` except for ``"heun"``, and unknown keyword arguments
(``TypeError``). ``cdeint`` warns when ``t`` leaves the interval of a torchnde interpolation.
"""

from __future__ import annotations

import bisect
import math
import warnings
from fractions import Fraction

import torch
from torch import nn

from ..paths._interp import (
    CubicSpline as _NativeSpline,
)
from ..paths._interp import (
    HermiteCubic as _NativeHermite,
)
from ..paths._interp import (
    _check_data,
    _fill_forward,
    _fill_linear,
    _PiecewisePolynomial,
)
from ..solvers import AbstractAdaptiveSolver, AbstractERK, ButcherTableau, Euler, Heun, Midpoint, ReversibleHeun
from . import _torchcde_misc as misc  # noqa: F401 (torchcde.misc.forward_fill etc.)
from . import torchdiffeq as _td

__all__ = [
    "cdeint",
    "linear_interpolation_coeffs",
    "natural_cubic_coeffs",
    "natural_cubic_spline_coeffs",
    "hermite_cubic_coefficients_with_backward_differences",
    "rectilinear_interpolation_coeffs",
    "LinearInterpolation",
    "CubicSpline",
    "InterpolationBase",
    "TupleControl",
    "logsig_windows",
    "logsignature_windows",
]

_SOLVE_KWARGS = ("rtol", "atol", "method", "options")
_ADJOINT_KWARGS = ("adjoint_rtol", "adjoint_atol", "adjoint_method", "adjoint_options", "adjoint_params")


# --------------------------------------------------------------------------------------------
# coefficients


def _prepare(x, t, name):
    """``(t, x)`` checked, ``t`` defaulting to ``0, 1, ..., T - 1``; channels without any
    observation filled with zeros (torchcde's convention)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2 and t is None:
        t = torch.arange(x.shape[-2], dtype=x.dtype, device=x.device)
    t, x = _check_data(t, x, name)
    nan = torch.isnan(x)
    if nan.any():
        empty = nan.all(-2, keepdim=True)
        if empty.any():
            x = torch.where(empty, torch.zeros_like(x), x)
        return t, x, ~torch.isnan(x)
    return t, x, None


class _TimeChannelError(ValueError, AssertionError):
    """A NaN in the rectilinear time channel: a ``ValueError`` and, for code written against
    torchcde (which asserts), an ``AssertionError``."""


def _rectilinear(x, index: int):
    """torchcde's rectilinear layout: ``(..., 2T - 1, C)`` knots at index times, the channel
    ``index`` (time) moving first, then the others."""
    C = x.shape[-1]
    if not isinstance(index, int) or not 0 <= index < C:
        raise ValueError(f"rectilinear must be the index of the time channel, an int in [0, {C - 1}], got {index!r}")
    if torch.isnan(x[..., index]).any():
        raise _TimeChannelError(
            "the time channel (rectilinear=...) must not hold NaN; forward-fill it first (e.g. "
            "torchcde.misc.forward_fill(x[..., i], fill_index=-1))"
        )
    empty = torch.isnan(x).all(-2, keepdim=True)
    if empty.any():  # a channel without observations: zeros, as torchcde
        x = torch.where(empty, torch.zeros_like(x), x)
    mask = ~torch.isnan(x)
    x = _fill_forward(x, None if bool(mask.all()) else mask)
    rep = x.repeat_interleave(2, dim=-2)
    timecol = torch.cat([rep[..., 1:, index], rep[..., -1:, index]], -1)
    rep = torch.cat([rep[..., :index], timecol.unsqueeze(-1), rep[..., index + 1 :]], -1)
    return rep[..., :-1, :]


def linear_interpolation_coeffs(x, t=None, rectilinear=None):
    """Coefficients of the linear interpolation of ``x`` (``(..., T, C)``, NaN = missing): the
    values at the knots, missing ones filled linearly in time (as torchcde). With
    ``rectilinear=i`` (the index of the time channel in ``x``) the rectilinear interpolation's
    ``2T - 1`` knots, to be used with ``LinearInterpolation(coeffs)`` on index time (``t`` must
    then be None, as in torchcde, where it is ignored)."""
    if rectilinear is not None:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"x must be a tensor of shape (..., T, C), got {getattr(x, 'shape', type(x).__name__)}")
        return _rectilinear(x, rectilinear)
    t, x, mask = _prepare(x, t, "linear_interpolation_coeffs")
    return _fill_linear(t, x, mask)


def rectilinear_interpolation_coeffs(x, rectilinear: int):
    """``linear_interpolation_coeffs(x, rectilinear=rectilinear)`` (Morrill et al. 2021)."""
    return linear_interpolation_coeffs(x, rectilinear=rectilinear)


def _cubic_layout(path):
    a, b, c, d = path._coeffs.unbind(-2)
    return torch.cat([a, b, 2 * c, 3 * d], -1)


def natural_cubic_coeffs(x, t=None):
    """Coefficients ``(..., T - 1, 4 C)`` of the natural cubic spline through ``x``; each channel's
    spline passes through its observed (non-NaN) values, with values before the first / after the
    last observation set to it (torchcde's ``natural_cubic_coeffs``)."""
    t, x, _ = _prepare(x, t, "natural_cubic_coeffs")
    return _cubic_layout(_NativeSpline(t, x))


def natural_cubic_spline_coeffs(x, t=None):
    """Alias of :func:`natural_cubic_coeffs`. (torchcde's deprecated function of this name fills
    leading/trailing missing values differently; identical without them.)"""
    return natural_cubic_coeffs(x, t)


def hermite_cubic_coefficients_with_backward_differences(x, t=None):
    """Coefficients ``(..., T - 1, 4 C)`` of the cubic Hermite interpolation with backward
    differences (Morrill et al. 2021), missing values filled linearly first (as torchcde)."""
    t, x, _ = _prepare(x, t, "hermite_cubic_coefficients_with_backward_differences")
    return _cubic_layout(_NativeHermite(t, x))


# --------------------------------------------------------------------------------------------
# the log-ODE method


def _logsig_windows(x, depth, window_length, t, scaled: bool):
    from ..paths._logsig import _check_depth, logsignature, logsignature_channels

    _check_depth(depth)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(
            f"x must be a floating-point tensor of shape (..., length, channels), got {getattr(x, 'shape', x)}"
        )
    if t is None:
        t = torch.arange(x.shape[-2], dtype=x.dtype, device=x.device)
    t, _ = _check_data(t.detach() if isinstance(t, torch.Tensor) else t, x, "logsig_windows")
    window_length = float(window_length)
    if not window_length > 0:
        raise ValueError(f"window_length must be > 0, got {window_length}")
    times = t.tolist()  # preprocessing: one host copy per call
    pieces = max(math.ceil((times[-1] - times[0]) / window_length), 1)
    ends = [min(times[0] + i * window_length, times[-1]) for i in range(pieces + 1)]
    # the window ends join the observation times (values missing there: filled linearly below)
    grid, rows, index = list(times), list(range(len(times))), []
    for e in ends:
        j = bisect.bisect_left(grid, e)
        close = [k for k in (j - 1, j) if 0 <= k < len(grid) and math.isclose(grid[k], e, rel_tol=1e-5, abs_tol=1e-8)]
        if close:
            index.append(close[0])
            continue
        grid.insert(j, e)
        rows.insert(j, -1)
        index = [k + 1 if k >= j else k for k in index]
        index.append(j)
    if len(grid) > len(times):
        nan = torch.full_like(x[..., :1, :], math.nan)
        x = torch.cat([x, nan], -2)[..., torch.tensor(rows, device=x.device), :]
    tg = torch.tensor(grid, dtype=x.dtype, device=x.device)
    x = linear_interpolation_coeffs(x, tg)
    C = x.shape[-1]
    first = torch.cat([x[..., 0, :], x.new_zeros(*x.shape[:-2], logsignature_channels(C, depth) - C)], -1)
    out = [first]
    for i in range(pieces):
        ls = logsignature(x[..., index[i] : index[i + 1] + 1, :], depth)
        out.append(ls * (ends[i + 1] - ends[i]) if scaled else ls)
    out = torch.stack(out, -2).cumsum(-2)
    if scaled:
        return out, torch.tensor(ends, dtype=x.dtype, device=x.device)
    return out


def logsig_windows(x, depth, window_length, t=None):
    """The log-ODE method's transform (Morrill et al. 2021): the log-signatures of the windows
    ``[t0 + i w, t0 + (i + 1) w]`` (``w = window_length``) of the piecewise-linear path through
    ``x`` (``(..., length, channels)``, NaN = missing, filled linearly), accumulated, with the
    first row holding ``x``'s first value: ``(..., windows + 1, logsignature_channels)``, on index
    time ``0, 1, ...``. Interpolate it linearly and solve the CDE driven by it, as torchcde's
    ``logsig_windows``. Any ``depth`` (computed by :mod:`torchnde.paths._logsig`: the
    coefficients of the Lyndon words, by length, then lexicographically)."""
    return _logsig_windows(x, depth, window_length, t, scaled=False)


def logsignature_windows(x, depth, window_length, t=None):
    """torchcde's deprecated form of :func:`logsig_windows`: each window's log-signature is
    multiplied by the window's length and ``(values, window end times)`` is returned."""
    return _logsig_windows(x, depth, window_length, t, scaled=True)


# --------------------------------------------------------------------------------------------
# interpolation classes


class InterpolationBase(nn.Module):
    """torchcde's interpolation interface, backed by a torchnde path (``self.path``)."""

    path: _PiecewisePolynomial

    @property
    def grid_points(self):
        return self._t

    @property
    def interval(self):
        return torch.stack([self._t[0], self._t[-1]])

    def evaluate(self, t):
        """``X(t)``. ``t`` a scalar (float or 0-d tensor): shape ``(..., C)``; a tensor of any
        shape ``S`` (e.g. ``(n,)``, several times): shape ``(..., *S, C)``, as torchcde."""
        t = _as_time(t, self._t)
        if isinstance(t, torch.Tensor) and t.dim():
            return _at_times(self.path, self.path._coeffs, t)
        return self.path.evaluate(t)

    def derivative(self, t):
        """``dX/dt`` at ``t`` (shapes as :meth:`evaluate`). At a knot, the derivative of the piece
        to its left (as torchcde; :func:`cdeint` uses the piece to the right, where a forward
        step goes)."""
        t = _as_time(t, self._t)
        if isinstance(t, torch.Tensor) and t.dim():
            return _at_times(self.path, self.path._dcoeffs, t)
        return self.path.derivative(t, left=True)

    def _interpret_t(self, t):
        """torchcde's ``(fractional_part, index)`` of ``t``: the piece to the left of a knot
        (the first/last outside the knots) and the time since its left knot."""
        t = torch.as_tensor(t, dtype=self._coeffs.dtype, device=self._coeffs.device)
        index = (torch.bucketize(t.detach(), self._t.detach()) - 1).clamp(0, len(self._t) - 2)
        return t - self._t[index], index

    def _apply(self, fn, *args, **kwargs):  # .to(), .double(), ... rebuild the path
        out = super()._apply(fn, *args, **kwargs)
        self._build()
        return out


def _as_time(t, grid):
    """A scalar time as a float (or a 0-d tensor if it requires grad); any other tensor (several
    times, torchcde's convention) as a tensor in the grid's dtype and device."""
    if isinstance(t, torch.Tensor):
        if t.dim() != 0:
            if t.is_complex():
                raise ValueError(f"t must be a real tensor of times, got dtype {t.dtype}")
            return t.to(device=grid.device, dtype=grid.dtype)
        return t.to(grid.dtype) if t.requires_grad else float(t)
    if isinstance(t, (list, tuple)):
        return torch.as_tensor(t, dtype=grid.dtype, device=grid.device)
    return float(t)


def _at_times(path, coeffs, t):
    """The piecewise polynomial with coefficients ``coeffs`` (``(*batch, N - 1, K, C)``) at every
    time of ``t`` (any shape ``S``): ``(*batch, *S, C)``. The piece is the one to the left of a
    knot (torchcde's ``bucketize``); outside the knots the first/last piece is extended."""
    knots = path._knots if path._knots_grad is None else path._knots_grad
    flat = t.reshape(-1)
    idx = (torch.searchsorted(path._knots, flat.detach().contiguous()) - 1).clamp(0, coeffs.shape[-3] - 1)
    c = coeffs.index_select(-3, idx)  # (*batch, M, K, C)
    h = (flat - knots[idx]).to(coeffs.dtype).unsqueeze(-1)  # (M, 1)
    out = c[..., -1, :]
    for k in range(c.shape[-2] - 2, -1, -1):
        out = torch.addcmul(c[..., k, :], out, h)
    return out.reshape(*out.shape[:-2], *t.shape, out.shape[-1])


def _default_t(coeffs, n):
    return torch.arange(n, dtype=coeffs.dtype, device=coeffs.device)


class LinearInterpolation(InterpolationBase):
    """The linear interpolation of ``coeffs`` from :func:`linear_interpolation_coeffs` (``t``: the
    times passed there; default ``0, 1, ...``)."""

    def __init__(self, coeffs, t=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(coeffs, torch.Tensor) or coeffs.dim() < 2:
            raise ValueError("coeffs must be a tensor of shape (..., T, C) from linear_interpolation_coeffs")
        if t is None:
            t = _default_t(coeffs, coeffs.shape[-2])
        self.register_buffer("_t", t)
        self.register_buffer("_coeffs", coeffs)
        self._build()

    def _build(self):
        from ..paths._interp import LinearInterpolation as Native

        self.path = Native(self._t, self._coeffs)


class CubicSpline(InterpolationBase):
    """The piecewise cubic of ``coeffs`` from :func:`natural_cubic_coeffs` or
    :func:`hermite_cubic_coefficients_with_backward_differences` (``t``: the times passed there)."""

    def __init__(self, coeffs, t=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(coeffs, torch.Tensor) or coeffs.dim() < 2 or coeffs.shape[-1] % 4:
            raise ValueError("Passed invalid coeffs.")
        if t is None:
            t = _default_t(coeffs, coeffs.shape[-2] + 1)
        if t.shape != (coeffs.shape[-2] + 1,):
            raise ValueError(f"t must have shape ({coeffs.shape[-2] + 1},) for these coeffs, got {tuple(t.shape)}")
        self.register_buffer("_t", t)
        self.register_buffer("_coeffs", coeffs)
        self._build()

    def _build(self):
        a, b, two_c, three_d = self._coeffs.chunk(4, -1)
        coeffs = torch.stack([a, b, two_c / 2, three_d / 3], -2)
        self.path = _PiecewisePolynomial._from_coefficients(self._t.to(coeffs.dtype), coeffs)


NaturalCubicSpline = CubicSpline


class TupleControl(nn.Module):
    """Several controls over one interval, for a tuple state: ``derivative(t)`` and
    ``evaluate(t)`` return one tensor per control (torchcde's ``TupleControl``); ``cdeint`` then
    takes ``z0`` as a tuple and ``func`` returns a tuple of matrices."""

    def __init__(self, *controls):
        super().__init__()
        if not controls:
            raise ValueError("Expected one or more controls to batch together.")
        self._interval = controls[0].interval
        grid = controls[0].grid_points
        same = True
        for c in controls[1:]:
            if c.interval.shape != self._interval.shape or (c.interval != self._interval).any():
                raise ValueError(
                    f"Can only batch together controls over the same interval: {self._interval.tolist()} and "
                    f"{c.interval.tolist()}"
                )
            if same and (c.grid_points.shape != grid.shape or (c.grid_points != grid).any()):
                same = False
        self._grid_points = grid if same else None
        self.controls = nn.ModuleList(controls)

    @property
    def interval(self):
        return self._interval

    @property
    def grid_points(self):
        if self._grid_points is None:
            raise RuntimeError("Batch of controls have different grid points.")
        return self._grid_points

    def evaluate(self, t):
        return tuple(c.evaluate(t) for c in self.controls)

    def derivative(self, t):
        return tuple(c.derivative(t) for c in self.controls)


# --------------------------------------------------------------------------------------------
# cdeint


def _native_path(X):
    """The torchnde piecewise polynomial behind ``X`` (compat or native interpolation), or None
    for a foreign control (anything else with a ``derivative`` method)."""
    if isinstance(X, InterpolationBase):
        return X.path
    if isinstance(X, _PiecewisePolynomial):
        return X
    return None


def _native_paths(X):
    """The torchnde paths behind ``X`` (one, or one per control of a :class:`TupleControl`), or
    None if any of them is a foreign control."""
    controls = list(X.controls) if isinstance(X, TupleControl) else [X]
    paths = [_native_path(c) for c in controls]
    return None if any(p is None for p in paths) else paths


def _time_tensor(t, z):
    """torchcde's ``func(t, z)`` takes ``t`` as a 0-d tensor (of z's dtype and device; cached
    per time by torchnde, so a fixed grid allocates nothing per evaluation)."""
    from .._terms import user_time

    return user_time(t, z)


def _matvec(m, d):
    return (m @ d.unsqueeze(-1)).squeeze(-1)


class _Product(nn.Module):
    """``func(t, z) @ dX/dt`` (or ``func.prod(t, z, dX/dt)``), componentwise for tuple states;
    a module so that parameters left out of ``adjoint_params`` can be swapped for detached
    copies with ``functional_call``."""

    def __init__(self, func):
        super().__init__()
        self.func = func
        self.is_prod = callable(getattr(func, "prod", None))

    def forward(self, t, z, dX):
        if self.is_prod:
            return self.func.prod(t, z, dX)
        m = self.func(t, z)
        if isinstance(dX, tuple):
            return tuple(_matvec(mi, di) for mi, di in zip(m, dX))
        return _matvec(m, dX)


class _VectorField(nn.Module):
    """``dz/dt = func(t, z) dX/dt``: the CDE as an ODE (torchcde's ``_VectorField``).

    For torchnde interpolations the derivative is read from the coefficients ``coeffs`` (each
    path's derivative coefficients), which the caller passes as the solve's ``args`` (or sets to
    detached stand-ins): adjoints then differentiate with respect to them instead of walking back
    into the graph that computed them (freed after the first backward call).
    """

    takes_float_time = True  # see compat.torchdiffeq._TimeAsTensor: the exact float time reaches us

    def __init__(self, X, func):
        super().__init__()
        self.X = X
        self.product = _Product(func)
        self.is_tuple = isinstance(X, TupleControl)
        self.paths = _native_paths(X)
        self.coeffs = None if self.paths is None else [p._dcoeffs for p in self.paths]
        # knots that require grad (observation times t requiring grad), else None
        self.knots = None if self.paths is None else [p._knots_grad for p in self.paths]
        self.excluded: list = []  # (name, parameter) of func's parameters not in adjoint_params

    def forward(self, t, z, args=None):
        if self.paths is not None:
            coeffs, knots = (self.coeffs, self.knots) if args is None else args
            # the derivative of the piece to the right of t, where a forward step goes
            dX = [p._poly(c, t, False, k) for p, c, k in zip(self.paths, coeffs, knots)]
            dX = tuple(dX) if self.is_tuple else dX[0]
        else:
            dX = self.X.derivative(_time_tensor(t, z))
        tt = _time_tensor(t, z)
        if self.excluded:
            detached = {f"func.{n}": p.detach() for n, p in self.excluded}
            return torch.func.functional_call(self.product, detached, (tt, z, dX), strict=False)
        return self.product(tt, z, dX)


def _check_one(dX, out, z0, what, is_prod):
    if not isinstance(dX, torch.Tensor):
        raise ValueError("X.derivative must return a tensor, or a tuple of tensors for a tuple state")
    if dX.shape[:-1] != z0.shape[:-1]:
        raise ValueError(
            f"X.derivative returned shape {tuple(dX.shape)} (batch dimensions {tuple(dX.shape[:-1])}) but z0{what} has "
            f"shape {tuple(z0.shape)} (batch dimensions {tuple(z0.shape[:-1])}); they must match"
        )
    if is_prod:
        if not isinstance(out, torch.Tensor) or out.shape != z0.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"func.prod returned {got}{what}, expected z0's shape {tuple(z0.shape)}")
        return
    if not isinstance(out, torch.Tensor) or out.shape != (*z0.shape, dX.shape[-1]):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"func(t, z) returned {got}{what}, expected shape (..., hidden_channels, input_channels) = "
            f"{(*z0.shape, dX.shape[-1])}"
        )


def _check_shapes(X, func, z0, t):
    dX = X.derivative(t[0].detach())
    is_prod = callable(getattr(func, "prod", None))
    if isinstance(z0, torch.Tensor):
        out = func.prod(t[0], z0, dX) if is_prod else func(t[0], z0)
        _check_one(dX, out, z0, "", is_prod)
        return

    def check_tuple(name, v):
        if not isinstance(v, (tuple, list)) or len(v) != len(z0):
            raise ValueError(
                f"z0 is a tuple of {len(z0)} tensors, so {name} must return a tuple of {len(z0)} as well (a tuple "
                "state needs a TupleControl)"
            )

    check_tuple("X.derivative", dX)
    out = func.prod(t[0], z0, dX) if is_prod else func(t[0], z0)
    check_tuple("func.prod" if is_prod else "func", out)
    for i, (d, o, z) in enumerate(zip(dX, out, z0)):
        _check_one(d, o, z, f" (element {i})", is_prod)


class _StandIns(torch.autograd.Function):
    """Runs ``run`` on detached stand-ins of the first ``n`` inputs (the initial state, the
    times, the paths' coefficients: tensors that may have been computed from parameters) and
    differentiates it with respect to the stand-ins and the remaining inputs (leaf parameters)
    in the backward pass. This lets ``odeint_adjoint``'s continuous adjoint treat the
    coefficients as leaves, whatever graph computed them, while the gradient still flows on
    into that graph. ``run`` returns a tensor or a tuple of tensors."""

    @staticmethod
    def forward(ctx, run, n, n_state, *inputs):
        stand = [x.detach().requires_grad_(x.requires_grad) for x in inputs[:n]]
        ctx.n_state = n_state
        with torch.enable_grad():
            out = run(*stand)
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        ctx.inner = outs
        ctx.wrt = [*stand, *inputs[n:]]
        return tuple(o.detach() for o in outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad):
        wrt, inner = ctx.wrt, ctx.inner
        del ctx.inner  # the inner graph is used once
        idx = [i for i, w in enumerate(wrt) if w.requires_grad]
        pairs = [(o, g) for o, g in zip(inner, grad) if o.requires_grad]
        grads = [None] * len(wrt)
        if idx and pairs:
            got = torch.autograd.grad(
                [o for o, _ in pairs], [wrt[i] for i in idx], [g for _, g in pairs], allow_unused=True
            )
            for i, g in zip(idx, got):
                # (torchdiffeq gives zeros to an initial state that does not affect the loss)
                grads[i] = torch.zeros_like(wrt[i]) if g is None and i < ctx.n_state else g
        return (None, None, None, *grads)


def _graph_leaves(outs, exclude):
    from ..adjoints._params import _graph_leaves as leaves

    return leaves([o for o in outs if isinstance(o, torch.Tensor)], exclude)


def _cdeint_adjoint_torchdiffeq(vf, z0, t, kwargs):
    """``odeint_adjoint`` on ``vf`` with the paths' coefficients (and ``z0``, ``t``) as detached
    stand-ins, so that coefficients computed from parameters in the graph get their gradient
    (see :class:`_StandIns`)."""
    params = tuple(kwargs["adjoint_params"])
    coeffs = list(vf.coeffs) if vf.coeffs is not None else []
    knots = [k for k in vf.knots if k is not None] if vf.knots is not None else []
    state = [z0] if isinstance(z0, torch.Tensor) else list(z0)
    proxied = [*state, t, *coeffs, *knots]
    # every leaf tensor the field uses (captured tensors too, as torchnde's adjoints find them)
    with torch.enable_grad():
        probe_state = state[0].detach() if isinstance(z0, torch.Tensor) else tuple(z.detach() for z in state)
        probe_args = None
        if coeffs:
            probe_args = ([c.detach() for c in coeffs], [None if k is None else k.detach() for k in vf.knots])
        probe = vf(float(t[0].detach()), probe_state, probe_args)
    seen = {id(p) for p in params}
    found = [p for p in _graph_leaves(probe if isinstance(probe, tuple) else (probe,), set()) if id(p) not in seen]
    # listed tensors that are not leaves (torchcde's examples list the coefficients) reach the
    # field through the stand-ins above; the inner solve differentiates with respect to leaves
    inner_ids = {id(x) for x in proxied}
    leaves = [
        p
        for p in (*params, *found)
        if isinstance(p, torch.Tensor) and p.requires_grad and p.is_leaf and id(p) not in inner_ids
    ]
    kwargs = dict(kwargs, adjoint_params=tuple(p for p in params if isinstance(p, torch.Tensor) and p.is_leaf))
    n_state = len(state)

    def run(*stand):
        z0_ = stand[0] if isinstance(z0, torch.Tensor) else tuple(stand[:n_state])
        t_ = stand[n_state]
        if coeffs:  # the backward pass uses vf too: the stand-ins stay (vf belongs to this call)
            vf.coeffs = list(stand[n_state + 1 : n_state + 1 + len(coeffs)])
            it = iter(stand[n_state + 1 + len(coeffs) :])
            vf.knots = [None if k is None else next(it) for k in vf.knots]
        return _td.odeint_adjoint(vf, z0_, t_, **kwargs)

    if not any(x.requires_grad for x in (*proxied, *leaves)) or not torch.is_grad_enabled():
        return _td.odeint_adjoint(vf, z0, t, **kwargs)
    out = _StandIns.apply(run, len(proxied), n_state, *proxied, *leaves)
    return out[0] if isinstance(z0, torch.Tensor) else out


# torchsde's methods on an SDE without noise (torchcde's backend="torchsde" solves the CDE as an
# SDE whose diffusion is zero): the drift part of each scheme, as a torchnde ODE solver
class _SRA1Drift(AbstractERK):
    """The drift part of Rößler's SRA1 (torchsde's ``srk`` for additive noise):
    ``c = (0, 3/4)``, ``b = (1/3, 2/3)``."""

    tableau = ButcherTableau(
        c=(Fraction(0), Fraction(3, 4)),
        a=((), (Fraction(3, 4),)),
        b=(Fraction(1, 3), Fraction(2, 3)),
    )
    order = 2
    dense_order = 2


_SDE_METHODS = {
    "euler": Euler,
    "milstein": Euler,  # Milstein's correction is a derivative of the (zero) diffusion
    "euler_heun": Euler,  # the Heun correction acts on the diffusion only
    "midpoint": Midpoint,
    "heun": Heun,
    "srk": _SRA1Drift,
    "reversible_heun": ReversibleHeun,
}
_SDE_KWARGS = ("method", "dt", "adaptive", "rtol", "atol", "dt_min", "options", "bm")
_SDE_ADJOINT_KWARGS = (
    "adjoint_method",
    "adjoint_adaptive",
    "adjoint_rtol",
    "adjoint_atol",
    "adjoint_options",
    "adjoint_params",
)
_SDE_REFUSED = ("names", "logqp", "extra", "extra_solver_state")
_SDE_OPTIONS = ("grad_free", "trapezoidal_approx")  # options that change only the noise terms


def _sde_solver(method, what, sde_type, noise_type):
    if not isinstance(method, str) or method not in _SDE_METHODS:
        if method == "log_ode":
            raise NotImplementedError(
                f"{what}='log_ode' (torchsde's log-ODE scheme) is not supported by torchnde; on a CDE it is the "
                "midpoint method: use 'midpoint'"
            )
        raise ValueError(f"Expected {what} in {sorted(_SDE_METHODS)}, but found {method!r}.")
    if method == "srk" and noise_type != "additive":
        raise NotImplementedError(
            f"{what}='srk' for {noise_type} noise (func.noise_type) is not supported by torchnde's backend='torchsde'; "
            "use 'midpoint' or 'heun' (the noise is zero: every method is an ODE method here)"
        )
    return _SDE_METHODS[method]()


def _check_sde_options(options, name):
    options = dict(options or {})
    unknown = [k for k in options if k not in _SDE_OPTIONS]
    if unknown:
        raise TypeError(f"{name} {unknown} are not supported by torchnde's backend='torchsde' (known: {_SDE_OPTIONS})")


def _cdeint_torchsde(vf, z0, t, adjoint, func, kwargs):
    """torchcde's ``backend="torchsde"``: torchsde's ``sdeint`` on the CDE as an SDE with zero
    diffusion, i.e. its method's drift scheme with constant steps ``dt`` (default ``1e-3``)."""
    from .. import solve
    from .._saveat import SaveAt
    from ..adjoints import BacksolveAdjoint, DirectAdjoint, ReversibleAdjoint
    from ..controllers import ConstantStepSize, PIDController

    refused = [k for k in kwargs if k in _SDE_REFUSED]
    if refused:
        raise NotImplementedError(
            f"cdeint(backend='torchsde') with {refused} is not supported by torchnde (they concern the noise or a "
            "KL term, which a CDE does not have)"
        )
    _check_kwargs(kwargs, _SDE_KWARGS, _SDE_ADJOINT_KWARGS, adjoint, "cdeint(backend='torchsde')")
    sde_type = getattr(func, "sde_type", "stratonovich")
    noise_type = getattr(func, "noise_type", "additive")
    default = (
        "midpoint"
        if sde_type == "stratonovich"
        else {"additive": "srk", "general": "euler"}.get(noise_type, "milstein")
    )
    method = kwargs.get("method") or default
    solver = _sde_solver(method, "method", sde_type, noise_type)
    _check_sde_options(kwargs.get("options"), "options")
    dt = float(kwargs.get("dt", 1e-3))
    if not dt > 0:
        raise ValueError(f"dt must be > 0, got {dt}")

    def controller_for(adaptive, rtol, atol, solver, what):
        if not adaptive:
            return ConstantStepSize()
        if not isinstance(solver, AbstractAdaptiveSolver):
            m = "adjoint_method" if what.startswith("adjoint") else "method"
            raise NotImplementedError(
                f"{what}=True needs {m}='heun' with torchnde's backend='torchsde' (the only one of torchsde's methods "
                f"with an error estimate here; torchsde estimates any method's error by step doubling), got the "
                f"{type(solver).__name__} scheme; use {m}='heun', fixed steps, or backend='torchdiffeq' with an "
                "adaptive method such as 'dopri5'"
            )
        return PIDController(rtol=float(rtol), atol=float(atol), dtmin=float(kwargs.get("dt_min", 1e-5)))

    controller = controller_for(kwargs.get("adaptive", False), kwargs["rtol"], kwargs["atol"], solver, "adaptive")
    args = None if vf.coeffs is None else (vf.coeffs, vf.knots)
    if not adjoint:
        adj = DirectAdjoint()
    else:
        if "adjoint_params" in kwargs:
            listed = {id(p) for p in kwargs["adjoint_params"]}
            vf.excluded = (
                [(n, p) for n, p in vf.product.func.named_parameters() if p.requires_grad and id(p) not in listed]
                if isinstance(vf.product.func, nn.Module)
                else []
            )
        if method == "reversible_heun":
            adj_method = kwargs.get("adjoint_method") or "adjoint_reversible_heun"
        else:
            adj_method = kwargs.get("adjoint_method") or (
                "midpoint" if sde_type == "stratonovich" else ("milstein" if noise_type == "diagonal" else "euler")
            )
        if adj_method == "adjoint_reversible_heun":
            if method != "reversible_heun":
                raise ValueError(
                    "adjoint_method='adjoint_reversible_heun' can only be used with method='reversible_heun'."
                )
            if kwargs.get("adaptive") or kwargs.get("adjoint_adaptive"):
                raise NotImplementedError(
                    "method='reversible_heun' with adaptive steps is not supported by torchnde; use fixed steps (dt=...)"
                )
            adj = ReversibleAdjoint()
        else:
            back = _sde_solver(adj_method, "adjoint_method", sde_type, noise_type)
            _check_sde_options(kwargs.get("adjoint_options"), "adjoint_options")
            back_ctrl = controller_for(
                kwargs.get("adjoint_adaptive", False),
                kwargs.get("adjoint_rtol", kwargs["rtol"]),
                kwargs.get("adjoint_atol", kwargs["atol"]),
                back,
                "adjoint_adaptive",
            )
            adj = BacksolveAdjoint(solver=back, controller=back_ctrl)
    if len(t) == 1:
        return z0.unsqueeze(0).clone()
    if t.requires_grad and torch.is_grad_enabled():
        t0, t1, ts = t[0], t[-1], t
    else:
        tl = t.detach().cpu().to(torch.float64).tolist()
        t0, t1, ts = tl[0], tl[-1], tl
        if not all(b > a for a, b in zip(tl[:-1], tl[1:])):
            raise ValueError(f"t must be strictly increasing, got {tl}")
    term = _ode_term(vf)
    sol = solve(
        term, solver, t0, t1, z0, dt0=dt, args=args, saveat=SaveAt(ts=ts), controller=controller, adjoint=adj,
        max_steps=None,
    )  # fmt: skip
    return sol.ys


def _ode_term(vf):
    from .._terms import ODETerm

    return ODETerm(vf, time_as_float=True)  # the exact float time: the knot search needs no sync


def _check_kwargs(kwargs, solve_kwargs, adjoint_kwargs, adjoint, where):
    """A TypeError naming the keyword arguments a backend does not take (and the valid ones)."""
    allowed = solve_kwargs + (adjoint_kwargs if adjoint else ())
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        extra = " (adjoint_* arguments need adjoint=True)" if any(k in adjoint_kwargs for k in unknown) else ""
        raise TypeError(f"{where} got unexpected keyword argument(s) {unknown}{extra}; valid are {', '.join(allowed)}")


def _warn_outside(X, t):
    """A warning if the output times leave the control's interval (the path is extrapolated)."""
    path = _native_path(X.controls[0] if isinstance(X, TupleControl) else X)
    if path is None:
        return
    lo, hi = float(t.detach().min()), float(t.detach().max())
    if lo < path.t0 or hi > path.t1:
        warnings.warn(
            f"cdeint: the output times span [{lo}, {hi}], outside the control's interval [{path.t0}, {path.t1}]; "
            "there the interpolation extends its first/last polynomial piece (a cubic grows like t^3), which is "
            "rarely meant. Pass t within X.interval.",
            stacklevel=3,
        )


def cdeint(X, func, z0, t, adjoint=True, backend="torchdiffeq", **kwargs):
    r"""Solve :math:`z(t) = z(t_0) + \int_{t_0}^t f(s, z(s))\,dX(s)`, as torchcde's ``cdeint``.

    Args:
        X: the control: an object with ``derivative(t)`` returning ``(..., input_channels)``,
            e.g. ``CubicSpline(coeffs)`` from this module (or torchcde's own classes).
        func: ``func(t, z)`` returning ``(..., hidden_channels, input_channels)`` (``t`` a 0-d
            tensor), or with a method ``func.prod(t, z, dXdt)`` returning ``(..., hidden_channels)``.
        z0: ``(..., hidden_channels)``.
        t: 1-D tensor of output times; the solve runs from ``t[0]`` to ``t[-1]``.
        adjoint: gradients by the continuous adjoint (:class:`~torchnde.BacksolveAdjoint`; with
            ``backend="torchsde", method="reversible_heun"`` :class:`~torchnde.ReversibleAdjoint`);
            ``False``: backpropagation through the solver. With either, gradients reach ``z0``,
            ``t``, the parameters of ``func`` (those in ``adjoint_params`` if it is given) and the
            coefficients of ``X`` when they were computed in the graph (from parameters or data
            that require grad), listed in ``adjoint_params`` or not.
        backend: ``"torchdiffeq"`` (default) or ``"torchsde"`` (torchsde's ``sdeint`` on the CDE as
            an SDE without noise: the drift scheme of ``method`` with constant steps ``dt``).
        **kwargs: with ``backend="torchdiffeq"``: ``method``, ``rtol`` (default 1e-4), ``atol``
            (default 1e-6), ``options`` and, with ``adjoint=True``, ``adjoint_method``,
            ``adjoint_rtol``, ``adjoint_atol``, ``adjoint_options``, ``adjoint_params``, as in
            torchdiffeq; e.g. ``options=dict(jump_t=X.grid_points)`` for a linear interpolation.
            With ``backend="torchsde"``: ``method`` (``"euler"``, ``"milstein"``, ``"euler_heun"``,
            ``"midpoint"`` (default), ``"heun"``, ``"srk"``, ``"reversible_heun"``), ``dt``
            (default 1e-3), ``adaptive`` (``"heun"`` only), ``rtol``, ``atol``, ``dt_min``,
            ``options``, ``bm`` (ignored: there is no noise) and with ``adjoint=True``
            ``adjoint_method`` (``"adjoint_reversible_heun"`` with ``"reversible_heun"``: exact
            gradients), ``adjoint_adaptive``, ``adjoint_rtol``, ``adjoint_atol``,
            ``adjoint_options``, ``adjoint_params``. Anything else raises ``TypeError``.

    Returns:
        ``(..., len(t), hidden_channels)``: the solution at the times ``t`` (note: time is the
        second-to-last dimension, as in torchcde).

    Warns:
        UserWarning: if ``t`` leaves the interval of a torchnde interpolation ``X`` (which is
            then extrapolated).
    """
    if backend not in ("torchdiffeq", "torchsde"):
        raise ValueError(f"Unrecognised backend={backend}")
    if backend == "torchdiffeq":
        _check_kwargs(kwargs, _SOLVE_KWARGS, _ADJOINT_KWARGS, adjoint, "cdeint()")
    if not callable(getattr(X, "derivative", None)):
        raise ValueError("X must have a 'derivative' method.")
    if isinstance(z0, list):
        z0 = tuple(z0)
    if not (
        isinstance(z0, torch.Tensor) or (isinstance(z0, tuple) and z0 and all(isinstance(z, torch.Tensor) for z in z0))
    ):
        raise ValueError(f"z0 must either a tensor or a tuple/list of tensors, got {type(z0).__name__}")
    if backend == "torchsde" and not isinstance(z0, torch.Tensor):
        raise NotImplementedError("tuple states are not supported with backend='torchsde' (torchsde has none either)")
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise ValueError(f"t must be a 1-D tensor of times, got {getattr(t, 'shape', type(t).__name__)}")
    kwargs.setdefault("atol", 1e-6)
    kwargs.setdefault("rtol", 1e-4)
    _check_shapes(X, func, z0, t)
    _warn_outside(X, t)
    vf = _VectorField(X, func)
    if adjoint and "adjoint_params" not in kwargs:
        # torchcde: the parameters of its _VectorField module, i.e. of func and X (if modules)
        kwargs["adjoint_params"] = tuple(vf.parameters())
    if backend == "torchsde":
        out = _cdeint_torchsde(vf, z0, t, adjoint, func, kwargs)
    elif adjoint:
        kwargs.setdefault("adjoint_atol", kwargs["atol"])
        kwargs.setdefault("adjoint_rtol", kwargs["rtol"])
        out = _cdeint_adjoint_torchdiffeq(vf, z0, t, kwargs)
    else:
        out = _td.odeint(vf, z0, t, **kwargs)
    if isinstance(out, torch.Tensor):
        return out.movedim(0, -2)
    return tuple(o.movedim(0, -2) for o in out)
