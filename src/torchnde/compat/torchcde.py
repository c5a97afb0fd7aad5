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
``evaluate``, ``derivative``, ``interval`` and ``grid_points``.

The coefficient tensors have torchcde's layouts (values at the knots for the linear
interpolation; ``(..., T - 1, 4 C)`` holding ``a, b, 2c, 3d`` for the cubics), so coefficients
saved with torchcde load here and the other way round. The interpolants are the same functions:
values and derivatives agree with torchcde's to rounding (~1e-15 in float64), missing values
(NaN) included: linear filling for the linear and Hermite interpolations, forward filling for
the rectilinear one, the natural spline through each channel's observations for
``natural_cubic_coeffs``, and zeros for a channel with no observation at all. The native classes
:class:`torchnde.paths.LinearInterpolation` etc. differ there: they raise for such a channel.

``cdeint`` solves the CDE as the ODE ``dz/dt = func(t, z) dX/dt`` with
:func:`torchnde.compat.torchdiffeq.odeint` (``adjoint=False``) or ``odeint_adjoint``
(``adjoint=True``, :class:`~torchnde.BacksolveAdjoint`), so ``method``, ``rtol``, ``atol``,
``options`` and the ``adjoint_*`` keyword arguments mean what they mean in torchdiffeq, with
torchcde's defaults ``rtol=1e-4, atol=1e-6``. Results agree with torchcde to the solver's
tolerance (the step-size control differs slightly; see :mod:`torchnde.compat.torchdiffeq`).

Not supported (each raises an error saying so): ``backend="torchsde"``, tuple states (``z0`` a
tuple, ``TupleControl``), ``logsignature_windows``/``logsig_windows`` (log-ODE method),
unknown keyword arguments, and ``t`` that requires grad. torchcde warns when ``adjoint=True`` and
the coefficients require grad but are not in ``adjoint_params``; here such coefficients receive
their gradient anyway (torchnde finds every tensor the vector field uses).
"""

from __future__ import annotations

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
    if isinstance(t, torch.Tensor) and t.requires_grad:
        t = t.detach()
    t, x = _check_data(t, x, name)
    nan = torch.isnan(x)
    if nan.any():
        empty = nan.all(-2, keepdim=True)
        if empty.any():
            x = torch.where(empty, torch.zeros_like(x), x)
        return t, x, ~torch.isnan(x)
    return t, x, None


def _rectilinear(x, index: int):
    """torchcde's rectilinear layout: ``(..., 2T - 1, C)`` knots at index times, the channel
    ``index`` (time) moving first, then the others."""
    C = x.shape[-1]
    if not isinstance(index, int) or not 0 <= index < C:
        raise ValueError(f"rectilinear must be the index of the time channel, an int in [0, {C - 1}], got {index!r}")
    if torch.isnan(x[..., index]).any():
        raise ValueError("the time channel (rectilinear=...) must not hold NaN; forward-fill it first")
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
        """``X(t)``: shape ``(..., C)``."""
        return self.path.evaluate(_as_time(t, self._t))

    def derivative(self, t):
        """``dX/dt`` at ``t``: shape ``(..., C)``. At a knot, the derivative of the piece to its
        left (as torchcde; :func:`cdeint` uses the piece to the right, where a forward step goes)."""
        return self.path.derivative(_as_time(t, self._t), left=True)

    def _apply(self, fn, *args, **kwargs):  # .to(), .double(), ... rebuild the path
        out = super()._apply(fn, *args, **kwargs)
        self._build()
        return out


def _as_time(t, grid):
    if isinstance(t, torch.Tensor):
        if t.dim() != 0:
            raise ValueError(f"t must be a scalar (torchcde's convention), got shape {tuple(t.shape)}")
        return t.to(grid.dtype) if t.requires_grad else float(t)
    return float(t)


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


# --------------------------------------------------------------------------------------------
# cdeint


class _VectorField(nn.Module):
    """``dz/dt = func(t, z) dX/dt`` (or ``func.prod(t, z, dX/dt)``)."""

    def __init__(self, X, func):
        super().__init__()
        self.X = X
        self.func = func
        self.is_prod = callable(getattr(func, "prod", None))

    takes_float_time = True  # see compat.torchdiffeq._TimeAsTensor

    def forward(self, t, z):
        if isinstance(self.X, InterpolationBase):
            dX = self.X.path.derivative(_as_time(t, self.X._t))
        else:
            dX = self.X.derivative(torch.tensor(t, dtype=z.dtype, device=z.device) if isinstance(t, float) else t)
        if isinstance(t, float):
            t = torch.tensor(t, dtype=z.dtype, device=z.device)  # torchcde's func(t, z) takes a tensor
        if self.is_prod:
            return self.func.prod(t, z, dX)
        return (self.func(t, z) @ dX.unsqueeze(-1)).squeeze(-1)


def _check_shapes(X, func, z0, t):
    dX = X.derivative(t[0].detach())
    if not isinstance(dX, torch.Tensor):
        raise ValueError("X.derivative must return a tensor (tuple controls are not supported by torchnde)")
    if dX.shape[:-1] != z0.shape[:-1]:
        raise ValueError(
            f"X.derivative returned shape {tuple(dX.shape)} (batch dimensions {tuple(dX.shape[:-1])}) but z0 has "
            f"shape {tuple(z0.shape)} (batch dimensions {tuple(z0.shape[:-1])}); they must match"
        )
    if callable(getattr(func, "prod", None)):
        out = func.prod(t[0], z0, dX)
        if out.shape != z0.shape:
            raise ValueError(f"func.prod returned shape {tuple(out.shape)}, expected z0's shape {tuple(z0.shape)}")
        return
    out = func(t[0], z0)
    if not isinstance(out, torch.Tensor) or out.shape != (*z0.shape, dX.shape[-1]):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"func(t, z) returned {got}, expected shape (..., hidden_channels, input_channels) = "
            f"{(*z0.shape, dX.shape[-1])}"
        )


def cdeint(X, func, z0, t, adjoint=True, backend="torchdiffeq", **kwargs):
    r"""Solve :math:`z(t) = z(t_0) + \int_{t_0}^t f(s, z(s))\,dX(s)`, as torchcde's ``cdeint``.

    Args:
        X: the control: an object with ``derivative(t)`` returning ``(..., input_channels)``,
            e.g. ``CubicSpline(coeffs)`` from this module (or torchcde's own classes).
        func: ``func(t, z)`` returning ``(..., hidden_channels, input_channels)`` (``t`` a 0-d
            tensor), or with a method ``func.prod(t, z, dXdt)`` returning ``(..., hidden_channels)``.
            With ``adjoint=True`` an ``nn.Module`` (or pass ``adjoint_params``).
        z0: ``(..., hidden_channels)``.
        t: 1-D tensor of output times; the solve runs from ``t[0]`` to ``t[-1]``.
        adjoint: gradients by the continuous adjoint (:class:`~torchnde.BacksolveAdjoint`);
            ``False``: backpropagation through the solver.
        backend: ``"torchdiffeq"`` (``"torchsde"`` is not supported).
        **kwargs: ``method``, ``rtol`` (default 1e-4), ``atol`` (default 1e-6), ``options`` and,
            with ``adjoint=True``, ``adjoint_method``, ``adjoint_rtol``, ``adjoint_atol``,
            ``adjoint_options``, ``adjoint_params``, as in torchdiffeq; e.g.
            ``options=dict(jump_t=X.grid_points)`` for a linear interpolation. Anything else
            raises ``TypeError``.

    Returns:
        ``(..., len(t), hidden_channels)``: the solution at the times ``t`` (note: time is the
        second-to-last dimension, as in torchcde).
    """
    if backend != "torchdiffeq":
        if backend == "torchsde":
            raise NotImplementedError(
                "backend='torchsde' is not supported by torchnde.compat.torchcde; use backend='torchdiffeq' (the "
                "CDE is solved as an ODE either way)"
            )
        raise ValueError(f"Unrecognised backend={backend}")
    allowed = _SOLVE_KWARGS + (_ADJOINT_KWARGS if adjoint else ())
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        extra = " (adjoint_* arguments need adjoint=True)" if any(k in _ADJOINT_KWARGS for k in unknown) else ""
        raise TypeError(f"cdeint() got unexpected keyword argument(s) {unknown}{extra}; valid are {', '.join(allowed)}")
    if not callable(getattr(X, "derivative", None)):
        raise ValueError("X must have a 'derivative' method.")
    if not isinstance(z0, torch.Tensor):
        raise NotImplementedError(
            f"z0 must be a tensor; tuple states are not supported by torchnde.compat.torchcde (got {type(z0).__name__})"
        )
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise ValueError(f"t must be a 1-D tensor of times, got {getattr(t, 'shape', type(t).__name__)}")
    kwargs.setdefault("atol", 1e-6)
    kwargs.setdefault("rtol", 1e-4)
    _check_shapes(X, func, z0, t)
    vf = _VectorField(X, func)
    if adjoint:
        kwargs.setdefault("adjoint_atol", kwargs["atol"])
        kwargs.setdefault("adjoint_rtol", kwargs["rtol"])
        if "adjoint_params" not in kwargs:
            if not isinstance(func, nn.Module):
                raise ValueError(
                    "func must be an nn.Module when adjoint=True (to collect its parameters), or pass "
                    "adjoint_params=... (possibly adjoint_params=())"
                )
            kwargs["adjoint_params"] = tuple(func.parameters())
        out = _td.odeint_adjoint(vf, z0, t, **kwargs)
    else:
        out = _td.odeint(vf, z0, t, **kwargs)
    return out.movedim(0, -2)
