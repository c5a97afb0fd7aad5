"""torchdiffeq's ``odeint``, ``odeint_adjoint`` and ``odeint_dense``, computed by torchnde.

Switching an existing code base is one import line::

    # from torchdiffeq import odeint, odeint_adjoint
    from torchnde.compat.torchdiffeq import odeint, odeint_adjoint

The signatures, defaults (``rtol=1e-7, atol=1e-9, method="dopri5"``), method names and option
names are torchdiffeq's (0.2.x). ``func(t, y)`` receives ``t`` as a 0-d tensor, as in
torchdiffeq: of ``y0``'s (real) dtype, on ``y0``'s device (torchnde steps in float64 time and
rounds it for ``func`` without moving it across a ``jump_t`` or, with ``perturb``, onto a
step's ends).

What is computed the same way: the methods' tableaus (``"rk4"`` is torchdiffeq's 3/8-rule RK4),
the fixed grids (``t`` itself, ``step_size``, or ``grid_constructor``, also for the adjoint
pass), error norms (RMS; the max of per-tensor RMS for a tuple state), the adaptive-step
options, ``perturb``, the step callbacks (``func.callback_step``, ``callback_accept_step``,
``callback_reject_step`` and their ``_adjoint`` versions) and the adjoint's tolerances and
norms. What differs (values agree to within the tolerances, not bit for bit):

* Step-size control is torchnde's :class:`~torchnde.PIDController` (integral control, like
  torchdiffeq, but after an accepted step the step may also shrink, and the initial step is
  chosen by the same Hairer--Nørsett--Wanner rule with torchnde's constants), so the adaptive
  methods take somewhat different steps.
* Output times between steps come from each method's dense output (cubic Hermite for the
  fixed-grid methods, i.e. torchdiffeq's ``interp="cubic"``; torchdiffeq's default for them is
  linear interpolation, ``interp="linear"``, which is not available). For ``"dopri8"`` this is
  its 7th-order interpolant where torchdiffeq uses a 4th-order one, so at tight tolerances the
  two differ by torchdiffeq's interpolation error (e.g. 3e-7 at ``rtol=1e-11``).
* Gradients with respect to ``t`` (when ``t`` requires grad) are those of the exact flow,
  ``dy(t_i)/dt_i = func(t_i, y(t_i))`` and the matching term for ``t[0]`` (one extra evaluation
  per output time), not the derivative of the discretisation; for the adaptive methods the two
  agree to the tolerance, and torchdiffeq's ``odeint_adjoint`` computes the same thing.
* Step callbacks are called after each step (torchdiffeq: before), the adjoint ones with the
  augmented backward state as one flat tensor (torchdiffeq: a tuple).
* ``max_num_steps`` bounds the steps of the whole solve, ``max_num_steps * (len(t) - 1)``
  (torchdiffeq counts per output interval). The ``dtype`` option (torchdiffeq's precision of
  times) is accepted; torchnde always steps in float64 time.
* A failed solve raises :class:`SolveError`, which is both torchnde's
  :class:`~torchnde.SolveError` and an ``AssertionError`` (what torchdiffeq raises), and a state
  that becomes NaN/inf is a failure for the fixed-grid methods too (torchdiffeq returns the
  non-finite values).
* ``odeint_adjoint`` uses :class:`~torchnde.BacksolveAdjoint`: see :func:`odeint_adjoint` for
  how ``adjoint_params`` is used.

``method="scipy_solver"`` (``options=dict(solver=...)``) calls ``scipy.integrate.solve_ivp``, in
:func:`odeint` only: as in torchdiffeq its result has no gradient.

The fixed-grid Adams methods (``"explicit_adams"``, ``"implicit_adams"``, ``"fixed_adams"``,
options ``max_order``/``max_iters``) are torchdiffeq's: equal-step coefficients on the history of
the steps taken (``max_order - 1`` derivatives), started by two RK4 steps, with the weighted sums
in double precision.

Events: :func:`odeint_event`, and ``odeint(..., event_fn=...)`` / ``odeint_adjoint(...,
event_fn=...)`` with ``t = [t0, t_any]``, return torchdiffeq's ``(event_t, solution)``; the
whole state stops at the first zero crossing of any element of ``event_fn(t, y)`` (torchnde's
terminal :class:`~torchnde.Event` in the shared mode). Unlike torchdiffeq, the ``event_t`` and
``solution[-1]`` of ``odeint``/``odeint_adjoint`` themselves already carry the event time's
gradient (torchdiffeq links it up only in ``odeint_event``), parameters used directly by
``event_fn`` get gradients too, and the event is located to about ``10 eps |t|`` on the method's
dense output (torchdiffeq: bisection to ``atol``; with the fixed-grid methods on its default
linear interpolant).

The fixed-grid implicit Runge--Kutta methods of torchdiffeq's current sources
(``"implicit_euler"``, ``"implicit_midpoint"``, ``"trapezoid"``, ``"radauIIA3"``, ``"gl4"``,
``"radauIIA5"``, ``"gl6"``, ``"sdirk2"``, ``"trbdf2"``; option ``max_iters``, default 100) have
the same Butcher tableaus (``gl4`` with its published nodes, see
:mod:`torchnde.compat._torchdiffeq_implicit`); their stages are solved together by simplified
Newton iterations with the Jacobian at the step start and one LU per step (torchdiffeq: Broyden
iterations), to about ``1e-12`` relative (float64; ``100 eps`` in lower precision). A Newton
iteration that does not converge raises :class:`SolveError` (``nonlinear_divergence`` or
``singular_jacobian``) where torchdiffeq warns and continues with the last iterate. Like
torchdiffeq's, they do not use ``rtol``/``atol`` and have no error control; a complex state is
refused (pass its real and imaginary parts).

Not supported (each raises an error saying so): per-element or per-tensor tolerances, ``scipy_solver`` in
``odeint_adjoint``, the option ``interp="linear"`` (with intermediate output times) and a callable
``adjoint_options["norm"]``.
"""

from __future__ import annotations

import bisect
import copy
import math
import numbers
import warnings
from collections.abc import Callable
from fractions import Fraction as F

import torch
from torch import nn

from .._events import Event
from .._results import SolveError as _SolveError
from .._saveat import SaveAt
from .._solve import solve
from .._terms import ODETerm
from .._tree import Flattener
from ..adjoints import BacksolveAdjoint, DirectAdjoint
from ..controllers import AbstractController, ConstantStepSize, PIDController, rms_norm
from ..controllers._grid import StepEnds
from ..solvers import (
    AbstractAdaptiveERK,
    AbstractERK,
    AbstractSolver,
    Bosh3,
    ButcherTableau,
    Dopri5,
    Dopri8,
    Euler,
    Heun,
    Midpoint,
    Tsit5,
)
from ..solvers._base import hermite_coeffs
from ._torchdiffeq_implicit import IRK_METHODS

__all__ = ["odeint", "odeint_adjoint", "odeint_dense", "odeint_event", "SolveError"]


# --------------------------------------------------------------------------------------------
# torchdiffeq's fixed-grid methods that torchnde has no class for


class _RK4ThreeEighths(AbstractERK):
    """Kutta's 3/8-rule RK4: torchdiffeq's ``method="rk4"``."""

    tableau = ButcherTableau(
        c=(F(0), F(1, 3), F(2, 3), F(1)),
        a=((), (F(1, 3),), (F(-1, 3), F(1)), (F(1), F(-1), F(1))),
        b=(F(1, 8), F(3, 8), F(3, 8), F(1, 8)),
    )
    order = 4
    dense_order = 3


class _Heun3(AbstractERK):
    """Heun's third-order method: torchdiffeq's ``method="heun3"``."""

    tableau = ButcherTableau(
        c=(F(0), F(1, 3), F(2, 3)),
        a=((), (F(1, 3),), (F(0), F(2, 3))),
        b=(F(1, 4), F(0), F(3, 4)),
    )
    order = 3
    dense_order = 3


class _Fehlberg2(AbstractAdaptiveERK):
    """Fehlberg's RK1(2) pair (E. Fehlberg, NASA TR R-315, 1969) as torchdiffeq's
    ``method="fehlberg2"`` uses it: the order-2 solution is propagated and the difference to the
    order-1 one is the error estimate.

    Not in ``torchnde.solvers``: that estimate measures the order-1 solution, whose error
    constant Fehlberg made tiny, so it understates the error of the propagated solution (about
    300x the tolerance on a linear test problem), which the generic solver tests reject.
    """

    tableau = ButcherTableau(
        c=(F(0), F(1, 2), F(1)),
        a=((), (F(1, 2),), (F(1, 256), F(255, 256))),
        b=(F(1, 512), F(255, 256), F(1, 512)),
        b_error=(F(1, 512) - F(1, 256), F(0), F(1, 512)),
    )
    order = 2
    error_order = 1
    dense_order = 2


def _adams_gammas(n: int, implicit: bool) -> list:
    """The coefficients gamma_m of the Adams methods in backward-difference form (Hairer, Nørsett
    & Wanner, Solving ODEs I, III.1): sum_i gamma_{m-i} / (i + 1) = 1 (explicit) or 0 (implicit,
    m >= 1), gamma_0 = 1."""
    g = [F(1)]
    for m in range(1, n):
        g.append((F(0) if implicit else F(1)) - sum(g[m - i] / (i + 1) for i in range(1, m + 1)))
    return g


def _adams_weights(k: int, implicit: bool) -> list:
    """Weights on f_n, f_{n-1}, ... (explicit, ``k`` of them) or on f_{n+1}, f_n, ... (implicit,
    ``k + 1``) of the equal-step Adams--Bashforth / Adams--Moulton formula of order ``k``
    (implicit: ``k + 1``)."""
    n = k + 1 if implicit else k
    g = _adams_gammas(n, implicit)
    return [(-1) ** j * sum(g[i] * math.comb(i, j) for i in range(j, n)) for j in range(n)]


class _Adams(AbstractSolver):
    """torchdiffeq's fixed-grid Adams methods: ``"explicit_adams"`` (Adams--Bashforth) and
    ``"implicit_adams"``/``"fixed_adams"`` (an Adams--Bashforth predictor with up to
    ``max_iters`` Adams--Moulton corrections) on the history of the steps taken, with the
    equal-step coefficients. As in torchdiffeq the history holds ``max_order - 1`` derivatives
    (so the predictor's order is at most ``max_order - 1``: Adams--Bashforth of order 12 is
    unstable at any practical step, order 11 is not) and the first two steps are RK4 (3/8 rule),
    until three derivatives are known. Cubic Hermite dense output."""

    order = 4
    dense_order = 3
    _MAX_ORDER = 12

    def __init__(self, implicit: bool, max_order: int = 4, max_iters: int = 4, rtol: float = 1e-3, atol: float = 1e-4):
        if not 1 <= int(max_order) <= self._MAX_ORDER:
            raise ValueError(f"max_order must be in 1..{self._MAX_ORDER}, got {max_order}")
        self.implicit, self.max_order, self.max_iters = implicit, int(max_order), int(max_iters)
        self.rtol, self.atol = rtol, atol
        self.rk4 = _RK4ThreeEighths()
        self.ab = {k: [float(w) for w in _adams_weights(k, False)] for k in range(1, self.max_order + 1)}
        self.am = {k: [float(w) for w in _adams_weights(k, True)] for k in range(1, self.max_order + 1)}

    def init(self, term, t0, y0):
        return ()  # the derivatives of the previous steps, newest first

    def step(self, term, t0, t1, y0, hist):
        h = t1 - t0
        f0 = term.vf(t0, y0)
        keep = max(self.max_order - 1, 1)
        hist = (f0, *hist)[:keep]
        if len(hist) < 3:
            y1 = self.rk4.step(term, t0, t1, y0, f0)[0]
        else:
            k = len(hist)
            # the weighted sums in double precision, as torchdiffeq (its coefficients are float64):
            # the high-order weights cancel strongly, which single precision cannot resolve
            wide = torch.complex128 if y0.is_complex() else torch.float64
            y1 = y0 + (h * sum(w * f.to(wide) for w, f in zip(self.ab[k], hist))).to(y0.dtype)
            if self.implicit:
                w = self.am[k]
                rest = y0 + (h * sum(wi * f.to(wide) for wi, f in zip(w[1:], hist))).to(y0.dtype)
                for _ in range(self.max_iters):
                    y_old = y1
                    y1 = rest + ((h * w[0]) * term.vf(t1, y1).to(wide)).to(y0.dtype)
                    scale = self.atol + self.rtol * torch.maximum(y_old.abs(), y1.abs())
                    if bool(((y1 - y_old).abs() <= scale).all()):
                        break
        return y1, None, (t0, t1, y0, y1, f0), hist[: keep - 1], None

    def dense_coeffs(self, term, dense_info):
        t0, t1, y0, y1, f0 = dense_info
        return hermite_coeffs(y0, y1, f0, term.vf(t1, y1), t1 - t0)


_ADAPTIVE = {
    "dopri5": Dopri5,
    "dopri8": Dopri8,
    "bosh3": Bosh3,
    "fehlberg2": _Fehlberg2,
    "adaptive_heun": Heun,
    "tsit5": Tsit5,
}
_ADAMS = {"explicit_adams": False, "implicit_adams": True, "fixed_adams": True}
_FIXED = {
    "euler": Euler,
    "midpoint": Midpoint,
    "rk4": _RK4ThreeEighths,
    "heun2": Heun,
    "heun3": _Heun3,
    **dict.fromkeys(_ADAMS, _Adams),
    **IRK_METHODS,
}
_UNSUPPORTED = {
    "scipy_solver": "it is available in odeint only (SciPy's solvers give no gradients, so there is no adjoint "
    "pass); use 'dopri5'/'dopri8'",
}
_VALID_METHODS = (*_ADAPTIVE, *_FIXED)

_ADAPTIVE_OPTIONS = (
    "first_step",
    "min_step",
    "max_step",
    "step_t",
    "jump_t",
    "safety",
    "ifactor",
    "dfactor",
    "max_num_steps",
    "dtype",
    "norm",
)
# "norm" is accepted and ignored by torchdiffeq's fixed-grid methods too (there is no error to measure)
_FIXED_OPTIONS = ("step_size", "grid_constructor", "interp", "perturb", "norm")


def _method_class(method, what="method"):
    if method is None:
        method = "dopri5"
    if method in _UNSUPPORTED:
        raise NotImplementedError(f"{what}={method!r} is not supported by torchnde: {_UNSUPPORTED[method]}")
    if not isinstance(method, str) or method not in _ADAPTIVE and method not in _FIXED:
        raise ValueError(
            f"Invalid {what} {method!r}. Must be one of {{{', '.join(repr(m) for m in _VALID_METHODS)}}} "
            f"(torchdiffeq's {', '.join(repr(m) for m in _UNSUPPORTED)} are not supported)"
        )
    return method, _ADAPTIVE.get(method) or _FIXED[method]


def _scalar_tol(tol, name):
    """torchdiffeq accepts a float, a tensor or (for tuple states) one value per tensor; torchnde
    controls one relative and one absolute tolerance."""
    if isinstance(tol, numbers.Real):
        return float(tol)
    if isinstance(tol, torch.Tensor):
        if tol.numel() == 1:
            return float(tol)
        vals = tol.detach().flatten()
    elif isinstance(tol, (tuple, list)):
        vals = [float(v) if not isinstance(v, torch.Tensor) or v.numel() == 1 else math.nan for v in tol]
        vals = torch.tensor(vals, dtype=torch.float64)
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(tol).__name__}")
    if vals.numel() and (vals == vals[0]).all():
        return float(vals[0])
    raise NotImplementedError(
        f"per-element or per-tensor {name} is not supported by torchnde (one {name} for the whole state); got {tol!r}"
    )


def _rms(x):
    return torch.linalg.vector_norm(x, dim=-1) / math.sqrt(max(x.shape[-1], 1))


def _state_norm(flat: Flattener, user_norm) -> Callable:
    """torchdiffeq's error norm on torchnde's flat state ``(N,)``: the user's ``norm`` applied to
    the state's structure, or RMS (tensor state) / the max of the per-tensor RMS (tuple state)."""
    if user_norm is not None:
        if not callable(user_norm):
            raise TypeError(f"options['norm'] must be callable, got {type(user_norm).__name__}")

        def norm(x):
            return torch.as_tensor(user_norm(flat.unflatten(x)), dtype=x.dtype, device=x.device)

        return norm
    if flat.single:
        return rms_norm
    sizes = flat.sizes

    def mixed_norm(x):
        return torch.stack([_rms(c) for c in x.split(sizes, dim=-1)], -1).amax(-1)

    return mixed_norm


class _OneStep(AbstractController):
    """One step over the whole interval (the adjoint of a fixed-grid solve on the output times)."""

    fixed_grid = True

    def init(self, term, solver, t0, t1, y0, f0, dt0, ops):
        return t1 - t0, None

    def adapt(self, t0, t1, y0, y1, y_error, error_order, cstate, ops):
        return True, t1 - t0, cstate, None


class _StepSize(AbstractController):
    """Constant steps of a given size, whatever ``dt0`` the solve passes (the adjoint's own
    ``step_size``)."""

    fixed_grid = True

    def __init__(self, h: float):
        self.h = h

    def init(self, term, solver, t0, t1, y0, f0, dt0, ops):
        return self.h, self.h

    def adapt(self, t0, t1, y0, y1, y_error, error_order, cstate, ops):
        return True, cstate, cstate, None


class _Plan:
    """The torchnde equivalent of one torchdiffeq call."""

    solver = controller = dt0 = max_steps = max_num_steps = None
    first_step = step_size = grid_constructor = None
    perturb = False
    jumps: tuple = ()


def _check_options(method, adaptive, options, what):
    valid = _ADAPTIVE_OPTIONS if adaptive else _FIXED_OPTIONS
    unknown = [k for k in options if k not in valid]
    if unknown:
        other = _FIXED_OPTIONS if adaptive else _ADAPTIVE_OPTIONS
        hint = ""
        misplaced = [k for k in unknown if k in other]
        if misplaced:
            kind = "fixed-grid" if adaptive else "adaptive"
            hint = f" ({', '.join(map(repr, misplaced))} belong(s) to the {kind} methods)"
        raise TypeError(
            f"unknown {what} for method={method!r}: {', '.join(map(repr, unknown))}{hint}. "
            f"Valid {what} are: {', '.join(valid)}"
        )


def _plan_method(method, options, rtol, atol, flat, ts, sign, what):
    """Solver, controller and dt0 for ``method`` with ``options`` (times in user time, ``ts`` the
    output times as floats, ``sign`` the direction)."""
    options = dict(options or {})
    name, cls = _method_class(method, "method" if what == "options" else "adjoint_method")
    adaptive = name in _ADAPTIVE
    # the Adams methods' own options
    adams = {k: options.pop(k) for k in ("max_order", "max_iters") if k in options} if name in _ADAMS else {}
    # the implicit Runge-Kutta methods' own option (their root solve's iterations)
    irk = {k: options.pop(k) for k in ("max_iters",) if k in options} if name in IRK_METHODS else {}
    _check_options(name, adaptive, options, what)
    p = _Plan()
    p.name, p.adaptive = name, adaptive
    if name in _ADAMS:
        p.solver = _Adams(
            _ADAMS[name],
            max_order=adams.get("max_order", _Adams._MAX_ORDER),
            max_iters=adams.get("max_iters", 4),
            rtol=_scalar_tol(rtol, "rtol"),
            atol=_scalar_tol(atol, "atol"),
        )
    elif name in IRK_METHODS:
        max_iters = irk.get("max_iters", 100)
        if isinstance(max_iters, bool) or not isinstance(max_iters, numbers.Integral) or max_iters < 1:
            raise ValueError(f"{what}['max_iters'] must be an int >= 1, got {max_iters!r}")
        p.solver = cls(max_iters=int(max_iters))
    else:
        p.solver = cls()
    p.max_num_steps = options.get("max_num_steps")
    if adaptive:
        first_step = options.get("first_step")
        if first_step is not None:
            first_step = float(first_step)
            if not first_step > 0:
                raise ValueError(f"{what}['first_step'] must be > 0, got {first_step}")
            p.dt0 = sign * first_step
            p.first_step = first_step
        min_step = float(options.get("min_step", 0.0))
        max_step = float(options.get("max_step", math.inf))
        p.controller = PIDController(
            rtol=_scalar_tol(rtol, "rtol"),
            atol=_scalar_tol(atol, "atol"),
            safety=float(options.get("safety", 0.9)),
            factormin=float(options.get("dfactor", 0.2)),
            factormax=float(options.get("ifactor", 10.0)),
            # torchdiffeq accepts every step of size min_step
            dtmin=min_step if min_step > 0 else None,
            force_dtmin=min_step > 0,
            dtmax=None if math.isinf(max_step) else max_step,
            step_ts=options.get("step_t"),
            jump_ts=options.get("jump_t"),
            norm=_state_norm(flat, options.get("norm")),
        )
        # torchdiffeq's dtype of its internal times; torchnde keeps times in float64 whatever it is
        dtype = options.get("dtype", torch.float64)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{what}['dtype'] must be a floating-point torch.dtype, got {dtype!r}")
        jump_t = options.get("jump_t")
        if jump_t is not None:
            p.jumps = tuple(torch.as_tensor(jump_t).detach().cpu().to(torch.float64).reshape(-1).tolist())
        return p
    # torchdiffeq's perturb: func sees the start of each step nudged into the step and its end too
    p.perturb = bool(options.get("perturb", False))
    step_size = options.get("step_size")
    grid_constructor = options.get("grid_constructor")
    if step_size is not None and grid_constructor is not None:
        raise ValueError("step_size and grid_constructor are mutually exclusive arguments.")
    interp = options.get("interp", "cubic")
    if interp not in ("linear", "cubic"):
        raise ValueError(f"Unknown interpolation method {interp}")
    if interp == "linear" and (step_size is not None or grid_constructor is not None):
        raise NotImplementedError(
            "interp='linear' is not supported by torchnde: output times between steps come from the method's "
            "cubic Hermite interpolant (torchdiffeq's interp='cubic'); drop the option or pass interp='cubic'"
        )
    if step_size is not None:
        step_size = float(step_size)
        if not step_size > 0:
            raise ValueError(f"{what}['step_size'] must be > 0, got {step_size}")
        p.step_size = step_size
        p.dt0 = sign * step_size
        p.controller = ConstantStepSize()
    elif grid_constructor is not None:
        p.grid_constructor = grid_constructor
    else:
        p.controller = StepEnds([sign * v for v in ts][1:]) if ts is not None else _OneStep()
    p.step_size = step_size
    p.grid_constructor = grid_constructor
    return p


class SolveError(_SolveError, AssertionError):
    """A failed solve: torchnde's :class:`~torchnde.SolveError` that is also an ``AssertionError``,
    the exception torchdiffeq raises (e.g. ``underflow in dt``), so that code written against
    torchdiffeq catches it either way."""


class _TimeAsTensor:
    """``f(t, y, args)`` for torchnde from torchdiffeq's ``func(t, y)``: ``t`` becomes a 0-d tensor
    of y0's real dtype (as in torchdiffeq).

    Rounding the exact (float64) time to a lower precision must not move it across a
    discontinuity: with ``jump_t`` the rounded time stays on the side of each jump the exact time
    is on (a step that ends just before a jump is evaluated before it), and with ``perturb`` the
    start and end of each step are nudged into the step by one unit in the last place.
    """

    def __init__(self, func, dtype, device):
        self.func, self.dtype, self.device = func, dtype, device
        self.__name__ = getattr(func, "__name__", type(func).__name__)
        # our own wrappers (torchnde.compat.torchcde) take the exact float time: rounding it to a
        # float32 tensor would move a step that ends just before a knot onto the knot
        self.exact = getattr(func, "takes_float_time", False)
        self.jumps: tuple = ()  # user times, float64
        self.perturb = False
        self.step = None  # (internal t0, internal t1, sign) of the step being taken (perturb)

    def time(self, t) -> torch.Tensor:
        perturb = self.perturb and self.step is not None
        if not perturb and not (self.jumps and self.dtype != torch.float64):
            if isinstance(t, torch.Tensor):
                return t.to(dtype=self.dtype, device=self.device)
            return torch.tensor(t, dtype=self.dtype, device=self.device)
        t = float(t)
        bounds = []  # (b, d): the time passed must satisfy (time - b) * d > 0
        for j in self.jumps:
            if t != j:
                bounds.append((j, 1.0 if t > j else -1.0))
        if perturb:
            t0, t1, sign = self.step
            tol = 1e-12 * abs(t1 - t0)
            if abs(t * sign - t0) <= tol:
                bounds.append((t0 * sign, sign))
            elif abs(t * sign - t1) <= tol:
                bounds.append((t1 * sign, -sign))
        r = torch.tensor(t, dtype=self.dtype)  # on the CPU: the checks below need no device sync
        for b, d in bounds:
            for _ in range(4):
                if (float(r) - b) * d > 0:
                    break
                r = torch.nextafter(r, torch.tensor(d * math.inf, dtype=self.dtype))
        return r.to(self.device)

    def __call__(self, t, y, args):
        if self.exact:  # (a time tensor that requires grad must reach it as it is)
            return self.func(t, y)
        return self.func(self.time(t), y)


def _term(vf: _TimeAsTensor) -> ODETerm:
    """The ODETerm of ``vf``: the loop's exact float time where ``vf`` must round it itself (jumps,
    perturb) or its function takes floats; else torchnde's cached time tensors."""
    exact = vf.exact or vf.perturb or bool(vf.jumps and vf.dtype != torch.float64)
    try:
        return ODETerm(vf, time_as_float=exact)
    except TypeError:  # an ODETerm that always passes the float time
        return ODETerm(vf)


def _tracking_solver(solver, vf: _TimeAsTensor, sign: float):
    """``solver`` that tells ``vf`` which step it is taking (for ``perturb``)."""
    cls = type(solver)

    def init(self, term, t0, y0):
        vf.step = (t0, t0, sign)  # a first-stage evaluation here is the start of the first step
        return cls.init(self, term, t0, y0)

    def step(self, term, t0, t1, y0, state):
        vf.step = (t0, t1, sign)
        return cls.step(self, term, t0, t1, y0, state)

    tracked = copy.copy(solver)
    tracked.__class__ = type(cls.__name__, (cls,), {"init": init, "step": step, "__module__": cls.__module__})
    return tracked


_FORWARD_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")
_ADJOINT_CALLBACKS = ("callback_step_adjoint", "callback_accept_step_adjoint", "callback_reject_step_adjoint")


def _callbacks(func, names, adaptive: bool):
    """torchdiffeq's step callbacks of ``func``; the fixed-grid methods call only the first."""
    out = [getattr(func, n, None) for n in (names if adaptive else names[:1])]
    return [c if callable(c) else None for c in out] + [None] * (3 - len(out))


def _with_callbacks(controller, callbacks, sign: float, unflatten, dtype, device):
    """``controller`` that calls torchdiffeq's ``callback_step(t0, y0, dt)`` after each step
    (torchdiffeq: before it) and then ``callback_accept_step`` or ``callback_reject_step``."""
    on_step, on_accept, on_reject = callbacks
    if on_step is None and on_accept is None and on_reject is None:
        return controller
    adapt0 = controller.adapt

    def adapt(t0, t1, y0, y1, y_error, error_order, cstate, ops):
        out = adapt0(t0, t1, y0, y1, y_error, error_order, cstate, ops)
        tt = torch.tensor(t0 * sign, dtype=dtype, device=device)
        dt = torch.tensor((t1 - t0) * sign, dtype=dtype, device=device)
        y = unflatten(y0)
        if on_step is not None:
            on_step(tt, y, dt)
        done = on_accept if bool(out[0]) else on_reject
        if done is not None:
            done(tt, y, dt)
        return out

    wrapped = copy.copy(controller)
    wrapped.adapt = adapt
    wrapped.fixed_grid = False  # the callbacks see each step's state: the general loop calls them
    return wrapped


class _GridEnds(AbstractController):
    """Steps ending at the given (internal, increasing) grid times, from wherever the solve starts:
    the backward solve of ``odeint_adjoint`` with ``grid_constructor`` (one solve per interval)."""

    fixed_grid = True

    def __init__(self, ends: list):
        self.ends = ends

    def _next(self, t):
        i = bisect.bisect_right(self.ends, t + 1e-12 * max(1.0, abs(t)))
        return self.ends[i] - t if i < len(self.ends) else math.inf

    def init(self, term, solver, t0, t1, y0, f0, dt0, ops):
        return min(self._next(t0), t1 - t0), None

    def adapt(self, t0, t1, y0, y1, y_error, error_order, cstate, ops):
        return True, self._next(t1), cstate, None


def _check_t(t, fname):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fname}: t must be a torch.Tensor, got {type(t).__name__}")
    if not torch.is_floating_point(t):
        raise TypeError(f"`t` must be a floating point Tensor but is a {t.type()}")
    if t.dim() != 1:
        raise ValueError(f"t must be one dimensional, got shape {tuple(t.shape)}")
    if len(t) == 0:
        raise ValueError("t must hold at least one time")
    ts = t.detach().cpu().to(torch.float64).tolist()
    if len(ts) > 1:
        d = [b - a for a, b in zip(ts[:-1], ts[1:])]
        if not (all(x > 0 for x in d) or all(x < 0 for x in d)):
            raise ValueError(f"t must be strictly increasing or decreasing, got {ts}")
    return ts


def _grid(grid_constructor, func, y0, t, sign, what):
    """The grid of ``grid_constructor(func, y0, t)`` as internal times (``sign * t``)."""
    ts = t.detach().cpu().to(torch.float64).tolist()
    grid = grid_constructor(func, y0, t)
    grid = torch.as_tensor(grid).detach().cpu().to(torch.float64).flatten().tolist()
    if len(grid) < 2 or grid[0] != ts[0] or grid[-1] != ts[-1]:
        raise ValueError(
            f"{what}grid_constructor must return a grid from t[0] = {ts[0]} to t[-1] = {ts[-1]}; got "
            f"{grid[:3]} ... {grid[-3:]}"
        )
    g = [sign * v for v in grid]
    if not all(b > a for a, b in zip(g[:-1], g[1:])):
        raise ValueError(f"{what}grid_constructor must return a strictly monotone grid in the direction of t")
    return g


def _prepare(func, y0, t, rtol, atol, method, options, event_fn, fname):
    if event_fn is not None:
        if not callable(event_fn):
            raise TypeError(f"{fname}: event_fn must be callable as event_fn(t, y), got {type(event_fn).__name__}")
        if isinstance(t, torch.Tensor) and t.dim() == 1 and len(t) != 2:
            raise ValueError(
                f"{fname}(..., event_fn=...) needs t = [t0, t_any] of length 2 (only t[0] and the direction of "
                f"t[1] are used; the solve runs until the event), got len(t) = {len(t)}"
            )
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")
    if isinstance(y0, torch.Tensor):
        pass
    elif isinstance(y0, tuple) and y0 and all(isinstance(x, torch.Tensor) for x in y0):
        pass
    else:
        raise TypeError(f"y0 must be either a torch.Tensor or a tuple of tensors, got {type(y0).__name__}")
    ts = _check_t(t, fname)
    sign = 1.0 if len(ts) < 2 or ts[1] > ts[0] else -1.0
    flat = Flattener(y0, batch=False)
    plan = _plan_method(method, options, rtol, atol, flat, ts, sign, "options")
    if event_fn is not None and not plan.adaptive and plan.step_size is None:
        raise ValueError(
            f"{fname}(..., event_fn=...) with the fixed-grid method {plan.name!r} needs options['step_size'] (as "
            "in torchdiffeq: the event is searched for step by step, without an end time); got "
            f"options={options!r}"
        )
    if not plan.adaptive and plan.grid_constructor is not None and len(ts) > 1:
        plan.controller = StepEnds(_grid(plan.grid_constructor, func, y0, t, sign, "")[1:])
    # torchdiffeq casts the time it passes to func to y0's real dtype
    plan.vf = _TimeAsTensor(func, flat.dtype.to_real() if flat.dtype.is_complex else flat.dtype, flat.device)
    plan.vf.jumps = plan.jumps
    if plan.perturb:
        plan.vf.perturb = True
        plan.vf.step = (ts[0] * sign, ts[0] * sign, sign)  # (an evaluation before the first step)
        plan.solver = _tracking_solver(plan.solver, plan.vf, sign)
    if not plan.adaptive:
        odd = [n for n in ("callback_accept_step", "callback_reject_step") if callable(getattr(func, n, None))]
        if odd:
            warnings.warn(
                f"func defines {', '.join(odd)}, which the fixed-grid method {plan.name!r} never calls (it "
                "accepts every step); only callback_step is called",
                stacklevel=3,
            )
    plan.controller = _with_callbacks(
        plan.controller,
        _callbacks(func, _FORWARD_CALLBACKS, plan.adaptive),
        sign,
        flat.unflatten,
        plan.vf.dtype,
        flat.device,
    )
    plan.ts = ts
    plan.t = t
    plan.sign = sign
    plan.flat = flat
    if plan.max_num_steps is not None:
        plan.max_steps = int(plan.max_num_steps) * max(len(ts) - 1, 1)
    return plan


def _solve(plan, y0, adjoint):
    if len(plan.ts) == 1:  # torchdiffeq returns y0 alone
        if isinstance(y0, torch.Tensor):
            return y0.unsqueeze(0).clone()
        return tuple(x.unsqueeze(0).clone() for x in y0)
    t = plan.t
    if t.requires_grad and torch.is_grad_enabled():
        # gradients with respect to the times: torchnde's d y(s)/ds = f(s, y(s)) (and the t0 shift)
        t0, t1, ts = t[0], t[-1], t.to(plan.flat.device)
        t0, t1 = t0.to(plan.flat.device), t1.to(plan.flat.device)
    else:
        t0, t1, ts = plan.ts[0], plan.ts[-1], plan.ts
    try:
        sol = solve(
            _term(plan.vf),
            plan.solver,
            t0,
            t1,
            y0,
            dt0=plan.dt0,
            saveat=SaveAt(ts=ts),
            controller=plan.controller,
            adjoint=adjoint,
            max_steps=plan.max_steps,
        )
    except _SolveError as e:
        if isinstance(e, SolveError):
            raise
        raise SolveError(str(e), e.result, e.solution) from None
    return sol.ys


# --------------------------------------------------------------------------------------------
# events: torchdiffeq's event mode of odeint / odeint_adjoint, and odeint_event

#: an adaptive event search has no end time in torchdiffeq; torchnde's solve needs one
_EVENT_HORIZON = 1e300
#: torchdiffeq's fixed-grid event search stops after this many steps
_FIXED_EVENT_STEPS = 20000


class _EventCond:
    """torchdiffeq's ``event_fn(t, y)`` as a torchnde event condition ``cond(t, y, args)``: ``t``
    reaches it as a 0-d tensor of y0's real dtype (as ``func`` gets it), keeping its graph (the
    event's total time derivative needs ``∂event_fn/∂t``)."""

    def __init__(self, event_fn, dtype, device):
        self.event_fn, self.dtype, self.device = event_fn, dtype, device

    def time(self, t) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            return t.to(dtype=self.dtype, device=self.device)
        return torch.tensor(t, dtype=self.dtype, device=self.device)

    def __call__(self, t, y, args=None):
        out = self.event_fn(self.time(t), y)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out, device=self.device)
        if out.is_complex():
            raise TypeError(
                f"event_fn(t, y) must return a real tensor (an event is where an element crosses zero), got "
                f"{out.dtype}; return e.g. its .real part"
            )
        return out


def _first(tree):
    """The first row of every leaf of ``tree`` (a tensor or a tuple of tensors)."""
    return tuple(x[0] for x in tree) if isinstance(tree, tuple) else tree[0]


def _with_y0(y0, y_event):
    """torchdiffeq's event-mode solution: ``y0`` and the state at the event, stacked."""
    if isinstance(y0, torch.Tensor):
        return torch.stack([y0, y_event.to(y0.dtype)])
    return tuple(torch.stack([a, b.to(a.dtype)]) for a, b in zip(y0, y_event))


def _event_time_graph(func, cond: _EventCond, tau: torch.Tensor, y, k):
    """The event time ``tau`` (located, detached) and the state ``y`` there (with the graph of a
    solve that ended at ``tau``), given the derivatives of a moving event time by the implicit
    function theorem: with ``g`` the ``k``-th element of the condition and
    ``ġ = ∂g/∂t + ∂g/∂y · f`` at the event,

        t = tau - (g - sg[g]) / sg[ġ],    y_event = y + sg[f] (t - tau),

    which are ``tau`` and ``y`` in value, with ``dt/dθ = -(∂g/∂θ + ∂g/∂y dy/dθ) / ġ`` and the
    state's total derivative ``dy/dθ + f dt/dθ`` (``sg``: stop-gradient). ``k`` is a long 0-d
    tensor indexing the flattened condition."""
    leaves = list(y) if isinstance(y, tuple) else [y]
    with torch.enable_grad():
        tl = tau.detach().clone().requires_grad_(True)
        yl = [x.detach().clone().requires_grad_(True) for x in leaves]
        yt = tuple(yl) if isinstance(y, tuple) else yl[0]
        gk = cond(tl, yt).reshape(-1)[k]
        f = func(cond.time(tl.detach()), yt)
        f = list(f) if isinstance(f, tuple) else [f]
        if gk.requires_grad:
            grads = torch.autograd.grad(gk, [tl, *yl], allow_unused=True)
        else:
            grads = [None] * (1 + len(yl))
    gdot = torch.zeros((), dtype=tau.dtype, device=tau.device) if grads[0] is None else grads[0].detach()
    for gy, fi in zip(grads[1:], f):
        if gy is not None:
            gdot = gdot + (gy.detach() * fi.detach()).real.sum().to(gdot.dtype)
    g = cond(tau, y).reshape(-1)[k]
    if not g.requires_grad or not bool(torch.isfinite(gdot)) or bool(gdot == 0):
        return tau, y  # (nothing to differentiate, or a tangential crossing: no derivative)
    delta = -(g - g.detach()).to(gdot.dtype) / gdot
    event_y = [x + fi.detach().to(x.dtype) * delta.to(x.real.dtype) for x, fi in zip(leaves, f)]
    return tau + delta, tuple(event_y) if isinstance(y, tuple) else event_y[0]


def _event_solve(plan, y0, event_fn, adjoint=None):
    """torchdiffeq's event mode: solve from ``t[0]`` in the direction of ``t[1]`` until an element
    of ``event_fn(t, y)`` crosses zero (the whole state stops at the first crossing of any
    element, in either direction); return ``(event_t, solution)``, ``solution`` holding ``y0``
    and the state at the event.

    One solve with torchnde's terminal :class:`~torchnde.Event`, whose event time and state are
    differentiable (implicit function theorem), through the loop (``adjoint=None``, ``odeint``)
    or by ``adjoint`` (``odeint_adjoint``: BacksolveAdjoint, which handles events).
    """
    t, sign, flat = plan.t, plan.sign, plan.flat
    out_dtype = t.dtype
    cond = _EventCond(event_fn, plan.vf.dtype, flat.device)
    # torchdiffeq: an element that is zero at t0 is an event at t0
    with torch.no_grad():
        g0 = cond(plan.ts[0], y0)
    if bool((g0 == 0).any()):
        return t[0].to(device=flat.device, dtype=out_dtype).clone(), _with_y0(y0, y0)
    y_start = y0
    if t.requires_grad and torch.is_grad_enabled():
        # the gradient with respect to t0 (the solve itself starts at the detached time): the flow
        # from (t0, y0) equals the flow from the fixed start with y0 - (t0 - sg[t0]) f(t0, y0)
        shift = (t[0] - t[0].detach()).to(flat.device)
        f0 = plan.vf(plan.ts[0], y0, None)
        if isinstance(y0, tuple):
            y_start = tuple(y - shift.to(y.real.dtype) * f.detach() for y, f in zip(y0, f0))
        else:
            y_start = y0 - shift.to(y0.real.dtype) * f0.detach()
    if plan.adaptive:
        end, max_steps = plan.ts[0] + sign * _EVENT_HORIZON, plan.max_steps
    else:
        end, max_steps = plan.ts[0] + sign * plan.step_size * _FIXED_EVENT_STEPS, None
    try:
        sol = solve(
            _term(plan.vf),
            plan.solver,
            plan.ts[0],
            end,
            y_start,
            dt0=plan.dt0,
            controller=plan.controller,
            adjoint=DirectAdjoint() if adjoint is None else adjoint,
            max_steps=max_steps,
            event=Event(cond, terminal=True, name="event_fn"),
        )
    except _SolveError as e:
        if isinstance(e, SolveError):
            raise
        raise SolveError(str(e), e.result, e.solution) from None
    if not sol.events.count:
        raise SolveError(
            f"no event: no element of event_fn(t, y) crossed zero between t0 = {plan.ts[0]} and t = {end:.6g}"
            + ("" if plan.adaptive else f" ({_FIXED_EVENT_STEPS} steps of step_size, torchdiffeq's limit)"),
            sol.result,
            sol,
        )
    event_t = sol.events.t[0]
    y_event = _first(sol.events.y_minus)
    event_t = event_t.to(device=flat.device, dtype=out_dtype)
    event_t._torchnde_event_time = True  # (odeint_event: its gradient is already linked up)
    return event_t, _with_y0(y0, y_event)


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None):
    """Integrate ``dy/dt = func(t, y)`` from ``y(t[0]) = y0``, returning ``y`` at every time of ``t``.

    torchdiffeq's ``odeint``, computed by :func:`torchnde.solve`. Gradients are by
    backpropagation through the solver's operations (:class:`~torchnde.DirectAdjoint`); a ``t``
    that requires grad gets the gradient of the exact flow (``dy(t_i)/dt_i = func(t_i, y_i)``,
    and the matching term for ``t[0]``), which costs one evaluation of ``func`` per output time.

    Args:
        func: ``func(t, y)`` returning ``dy/dt`` with the structure of ``y``; ``t`` is a 0-d tensor.
            Optional methods ``func.callback_step(t0, y0, dt)`` (and, adaptive methods only,
            ``callback_accept_step`` / ``callback_reject_step``) are called after each step.
        y0: the initial state: a tensor of any shape, or a tuple of tensors.
        t: 1-D tensor of output times, strictly increasing or decreasing; ``t[0]`` is the initial time.
        rtol, atol: relative and absolute tolerance of the adaptive methods (floats; a tensor or
            tuple only if all its values are equal).
        method: ``"dopri5"`` (default), ``"dopri8"``, ``"bosh3"``, ``"fehlberg2"``,
            ``"adaptive_heun"``, ``"tsit5"`` (adaptive); ``"euler"``, ``"midpoint"``, ``"rk4"``
            (3/8 rule), ``"heun2"``, ``"heun3"``, ``"explicit_adams"``, ``"implicit_adams"``,
            ``"fixed_adams"``, and the implicit ``"implicit_euler"``, ``"implicit_midpoint"``,
            ``"trapezoid"``, ``"radauIIA3"``, ``"gl4"``, ``"radauIIA5"``, ``"gl6"``,
            ``"sdirk2"``, ``"trbdf2"`` (fixed grid); ``"scipy_solver"`` (SciPy's
            ``solve_ivp`` with ``options=dict(solver="LSODA", min_step=..., max_step=...)``; not
            differentiable).
        options: adaptive methods: ``first_step``, ``min_step``, ``max_step``, ``step_t``,
            ``jump_t``, ``safety``, ``ifactor``, ``dfactor``, ``max_num_steps``, ``dtype``,
            ``norm``. Fixed-grid methods: ``step_size`` or ``grid_constructor`` (default: step
            from one output time to the next), ``interp="cubic"``, ``perturb`` (Adams methods:
            also ``max_order``, ``max_iters``; implicit Runge--Kutta methods: ``max_iters``). Any other key raises ``TypeError``.
        event_fn: ``event_fn(t, y)`` (a real tensor): solve from ``t[0]`` (``t`` of length 2; only
            the direction of ``t[1]`` is used) until an element of it crosses zero, and return
            ``(event_t, solution)`` as :func:`odeint_event` does (with its gradients).

    Returns:
        A tensor of shape ``(len(t), *y0.shape)``, or for a tuple ``y0`` a tuple of such tensors
        (with ``event_fn``: ``(event_t, solution)``, ``solution`` of length 2).

    Raises:
        ValueError: unknown method, invalid ``t``. TypeError: unknown option.
        NotImplementedError: a torchdiffeq feature torchnde does not have (see the module docstring).
        SolveError: the solve failed (e.g. the step size underflowed); both a
            :class:`torchnde.SolveError` and an ``AssertionError``.

    Example:
        >>> import torch
        >>> from torchnde.compat.torchdiffeq import odeint
        >>> t = torch.linspace(0.0, 1.0, 5)
        >>> ys = odeint(lambda t, y: -y, torch.ones(3), t)
        >>> ys.shape, torch.allclose(ys[-1], torch.exp(-torch.ones(3)), atol=1e-6)
        (torch.Size([5, 3]), True)
    """
    if isinstance(method, str) and method == "scipy_solver" and event_fn is None:
        return _scipy_odeint(func, y0, t, rtol, atol, options)
    plan = _prepare(func, y0, t, rtol, atol, method, options, event_fn, "odeint")
    if event_fn is not None:
        return _event_solve(plan, y0, event_fn)
    return _solve(plan, y0, DirectAdjoint())


_SCIPY_OPTIONS = ("solver", "min_step", "max_step", "norm", "grid_points", "eps")


def _scipy_odeint(func, y0, t, rtol, atol, options):
    """torchdiffeq's ``method="scipy_solver"``: ``scipy.integrate.solve_ivp`` on the flattened
    state (in float64/complex128 NumPy arrays on the CPU), with ``options["solver"]`` (default
    ``"LSODA"``), ``min_step`` (LSODA only) and ``max_step``. As in torchdiffeq the result is
    not differentiable."""
    try:
        from scipy.integrate import solve_ivp
    except ImportError as e:  # pragma: no cover - scipy is installed with the test extras
        raise ImportError("method='scipy_solver' needs SciPy: pip install scipy") from e
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")
    if not (
        isinstance(y0, torch.Tensor) or (isinstance(y0, tuple) and y0 and all(isinstance(x, torch.Tensor) for x in y0))
    ):
        raise TypeError(f"y0 must be either a torch.Tensor or a tuple of tensors, got {type(y0).__name__}")
    ts = _check_t(t, "odeint")
    options = dict(options or {})
    unknown = [k for k in options if k not in _SCIPY_OPTIONS]
    if unknown:
        raise TypeError(
            f"unknown options for method='scipy_solver': {', '.join(map(repr, unknown))}. Valid options are: "
            + ", ".join(_SCIPY_OPTIONS)
        )
    defined = [c for c in (*_FORWARD_CALLBACKS, *_ADJOINT_CALLBACKS) if callable(getattr(func, c, None))]
    if defined:
        warnings.warn(f"func defines {', '.join(defined)}, which method='scipy_solver' never calls", stacklevel=3)
    flat = Flattener(y0, batch=False)
    if len(ts) == 1:  # torchdiffeq returns y0 alone
        return y0.unsqueeze(0).clone() if isinstance(y0, torch.Tensor) else tuple(x.unsqueeze(0).clone() for x in y0)
    real = flat.dtype.to_real() if flat.dtype.is_complex else flat.dtype
    y0_np = flat.flatten(tuple(x.detach() for x in y0) if isinstance(y0, tuple) else y0.detach()).cpu().numpy()
    y0_np = y0_np.astype("complex128" if flat.dtype.is_complex else "float64")

    def f(s, y):
        state = flat.unflatten(torch.from_numpy(y).to(flat.device, flat.dtype))
        with torch.no_grad():
            out = func(torch.tensor(s, dtype=real, device=flat.device), state)
        return flat.flatten(out).cpu().numpy().astype(y0_np.dtype)

    solver = options.get("solver", "LSODA")
    extra = {"max_step": float(options.get("max_step", math.inf))}
    if solver == "LSODA":
        extra["min_step"] = float(options.get("min_step", 0.0))
    sol = solve_ivp(
        f,
        (ts[0], ts[-1]),
        y0_np,
        method=solver,
        t_eval=ts,
        rtol=_scalar_tol(rtol, "rtol"),
        atol=_scalar_tol(atol, "atol"),
        **extra,
    )
    if sol.status < 0 or sol.y.shape[-1] != len(ts):
        raise SolveError(f"method='scipy_solver' ({solver}) failed: {sol.message}")
    return flat.unflatten(torch.from_numpy(sol.y.T.copy()).to(flat.device, flat.dtype))


def odeint_dense(func, y0, t0, t1, *, rtol=1e-7, atol=1e-9, method=None, options=None):
    """Solve from ``t0`` to ``t1`` and return the dense solution: a function ``y(t_eval)``.

    torchdiffeq's ``odeint_dense``: ``t_eval`` is a time or a 1-D tensor of times in
    ``[t0, t1]``; the values come from the method's dense output (torchnde's
    :meth:`Solution.evaluate <torchnde.Solution.evaluate>`), differentiable with respect to
    ``y0`` and the parameters. torchdiffeq only allows ``method="dopri5"`` and a tensor ``y0``;
    here every method of :func:`odeint` and a tuple ``y0`` work.

    Example:
        >>> import torch
        >>> from torchnde.compat.torchdiffeq import odeint_dense
        >>> y = odeint_dense(lambda t, y: -y, torch.ones(2), torch.tensor(0.0), torch.tensor(1.0))
        >>> torch.allclose(y(torch.tensor([0.5, 1.0])), torch.exp(-torch.tensor([[0.5], [1.0]])).expand(2, 2), atol=1e-6)
        True
    """
    times = [torch.as_tensor(x).detach().reshape(()) for x in (t0, t1)]
    if any(not torch.is_floating_point(x) for x in times):
        raise TypeError(f"t0 and t1 must be floating-point times, got {t0!r} and {t1!r}")
    t = torch.stack(times).to(torch.float64)
    plan = _prepare(func, y0, t, rtol, atol, method, options, None, "odeint_dense")
    if plan.ts[0] == plan.ts[-1]:
        raise ValueError(f"odeint_dense needs t0 != t1, got t0 = t1 = {plan.ts[0]}")
    try:
        sol = solve(
            _term(plan.vf),
            plan.solver,
            plan.ts[0],
            plan.ts[-1],
            y0,
            dt0=plan.dt0,
            saveat=SaveAt(t1=True, dense=True),
            controller=plan.controller,
            adjoint=DirectAdjoint(),
            max_steps=plan.max_steps,
        )
    except _SolveError as e:
        raise SolveError(str(e), e.result, e.solution) from None

    def dense_output_fn(t_eval):
        return sol.evaluate(t_eval)

    return dense_output_fn


def odeint_event(func, y0, t0, *, event_fn, reverse_time=False, odeint_interface=odeint, **kwargs):
    """Solve from ``t0`` until ``event_fn(t, y)`` crosses zero; return ``(event_t, solution)``.

    torchdiffeq's ``odeint_event``. The solve runs forwards from ``t0`` (backwards with
    ``reverse_time=True``) until the first time any element of ``event_fn(t, y)`` changes sign (in
    either direction; an element that is zero at ``t0`` is an event at ``t0``): the whole state
    stops there, as in torchdiffeq. ``event_t`` is a 0-d tensor (``t0``'s dtype) and
    ``solution`` holds ``[y0, y(event_t)]`` (shape ``(2, *y0.shape)``, or a tuple of such
    tensors for a tuple ``y0``).

    ``event_t`` is differentiable with respect to ``y0``, ``t0`` and the parameters of ``func``
    by the implicit function theorem, ``dt/dθ = -(∂g/∂θ + ∂g/∂y dy/dθ) / (∂g/∂t + ∂g/∂y · f)``,
    and ``solution[-1]`` has the total derivative of the state at the moving event time, as in
    torchdiffeq. Unlike torchdiffeq, parameters that ``event_fn`` uses directly (not through the
    state) get their gradient too (the ``∂g/∂θ`` term, which torchdiffeq drops).

    The event is located on the method's dense output (torchnde's :class:`~torchnde.Event`: a
    secant/bisection root finder to about ``10 eps |t|``, torchdiffeq: bisection to ``atol``),
    so event times agree with torchdiffeq's to about ``atol`` and the method's accuracy; the
    fixed-grid methods need ``options=dict(step_size=...)`` (as in torchdiffeq) and use the
    cubic Hermite interpolant (torchdiffeq's default for them is ``interp="linear"``).

    Args:
        func, y0: as in :func:`odeint`.
        t0: the initial time, a tensor with one element (a float is accepted too).
        event_fn: ``event_fn(t, y)`` returning a real tensor of any shape.
        reverse_time: solve backwards in time from ``t0``.
        odeint_interface: :func:`odeint` (default) or :func:`odeint_adjoint` (or a function with
            their signature, e.g. a wrapper; if it returns an event time without the implicit
            gradient, as torchdiffeq's ``odeint`` does, the gradient is linked up here).
        **kwargs: passed on to ``odeint_interface`` (``rtol``, ``atol``, ``method``,
            ``options``, ``adjoint_*``).

    Raises:
        SolveError: no event (the search ran to ``t0 ± 1e300``, or 20000 steps of a fixed-grid
            method), or the solve failed.

    Example:
        >>> import torch
        >>> from torchnde.compat.torchdiffeq import odeint_event
        >>> g = torch.tensor(9.8, dtype=torch.float64, requires_grad=True)
        >>> f = lambda t, y: torch.stack([y[1], -g * torch.ones_like(y[1])])  # height, velocity
        >>> y0 = torch.tensor([10.0, 0.0], dtype=torch.float64)
        >>> t, ys = odeint_event(f, y0, torch.tensor(0.0, dtype=torch.float64), event_fn=lambda t, y: y[0])
        >>> round(float(t), 6), ys.shape  # sqrt(2 h / g)
        (1.428571, torch.Size([2, 2]))
        >>> (dt_dg,) = torch.autograd.grad(t, g)
        >>> round(float(dt_dg), 6)  # -t / (2 g)
        -0.072886
    """
    if not isinstance(t0, torch.Tensor):
        t0 = torch.as_tensor(t0, dtype=torch.get_default_dtype())
    if t0.numel() != 1:
        raise ValueError(f"odeint_event: t0 must hold one time, got shape {tuple(t0.shape)}")
    start = t0.reshape(-1)
    t = torch.cat([start, start.detach() + (-1.0 if reverse_time else 1.0)])
    event_t, solution = odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
    if getattr(event_t, "_torchnde_event_time", False):
        return event_t, solution
    # another interface (e.g. torchdiffeq's own odeint): its event time has no gradient, and the
    # state at it has the gradient of a solve to that fixed time; link up the event time's
    dtype = y0.dtype if isinstance(y0, torch.Tensor) else y0[0].dtype
    cond = _EventCond(event_fn, dtype.to_real() if dtype.is_complex else dtype, event_t.device)
    y_end = tuple(x[-1] for x in solution) if isinstance(solution, tuple) else solution[-1]
    with torch.no_grad():  # torchdiffeq's rule: the element that crossed from its sign at t0
        k = (cond(t[0], y0).sign() * cond(event_t, y_end)).reshape(-1).argmin()
    tau = event_t.detach().to(torch.float64)
    new_t, y_event = _event_time_graph(func, cond, tau, y_end, k)
    if isinstance(solution, tuple):
        solution = tuple(torch.cat([s[:-1], e.unsqueeze(0)]) for s, e in zip(solution, y_event))
    else:
        solution = torch.cat([solution[:-1], y_event.unsqueeze(0)])
    return new_t.to(event_t), solution


class _DetachExcluded(nn.Module):
    """Calls ``func`` with the parameters that are not among ``adjoint_params`` detached, so that,
    as in torchdiffeq, only ``adjoint_params`` receive gradients."""

    def __init__(self, func: nn.Module, excluded: list):
        super().__init__()
        self.func = func
        self.excluded = excluded

    def forward(self, t, y):
        detached = {name: p.detach() for name, p in self.excluded}
        return torch.func.functional_call(self.func, detached, (t, y), strict=False)


class _ZeroGrads(torch.autograd.Function):
    """Identity on ``x`` that gives every listed tensor a zero gradient: as in torchdiffeq, each
    of ``adjoint_params`` gets a gradient (zero if ``func`` does not use it), even when no other
    input of the solve requires grad."""

    @staticmethod
    def forward(ctx, x, *params):
        ctx.meta = [(p.shape, p.dtype, p.device) for p in params]
        return x.clone()  # (a view would forbid in-place changes of the result)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.meta))


def odeint_adjoint(
    func,
    y0,
    t,
    *,
    rtol=1e-7,
    atol=1e-9,
    method=None,
    options=None,
    event_fn=None,
    adjoint_rtol=None,
    adjoint_atol=None,
    adjoint_method=None,
    adjoint_options=None,
    adjoint_params=None,
):
    """:func:`odeint` with gradients from the continuous adjoint (:class:`~torchnde.BacksolveAdjoint`).

    The forward solve keeps no graph; the backward pass solves the adjoint ODE from ``t[-1]`` back
    to ``t[0]``, one output interval at a time, with ``adjoint_method`` (default: ``method``),
    ``adjoint_rtol``/``adjoint_atol`` (default: ``rtol``/``atol``) and ``adjoint_options``
    (default: ``options`` without ``norm``; required when ``adjoint_method != method`` and
    ``options`` is given), as in torchdiffeq. The backward error norm is torchdiffeq's: the max
    of the norms of the state, of the adjoint state and of the parameter gradients (torchdiffeq:
    the max of the RMS of each parameter's gradient; here: the RMS of all of them together), or
    without the last with ``adjoint_options=dict(norm="seminorm")``. A custom callable adjoint
    norm is not supported. ``func.callback_step_adjoint`` (and ``callback_accept_step_adjoint``,
    ``callback_reject_step_adjoint``) are called after each backward step with the augmented
    state as one flat tensor (torchdiffeq: a tuple).

    ``adjoint_params``: as in torchdiffeq, ``func`` must be an ``nn.Module`` unless
    ``adjoint_params`` is given, and the default is ``func.parameters()``. Parameters of ``func``
    (an ``nn.Module``) that are *not* in ``adjoint_params`` are detached and get no gradient,
    and every tensor of ``adjoint_params`` that requires grad gets one (zero if ``func`` does
    not use it), as in torchdiffeq. Other tensors that ``func`` uses and that require gradients
    (tensors a closure captures) receive gradients whether or not they are listed (torchnde
    finds them by walking the autograd graph of one evaluation).

    ``event_fn``: as in :func:`odeint` (the event time and state differentiated by the
    BacksolveAdjoint, which handles events).

    Example:
        >>> import torch
        >>> from torchnde.compat.torchdiffeq import odeint_adjoint
        >>> f = torch.nn.Linear(2, 2)
        >>> ys = odeint_adjoint(lambda t, y: f(y), torch.ones(2), torch.linspace(0, 1, 3), adjoint_params=tuple(f.parameters()))
        >>> ys.sum().backward()
        >>> f.weight.grad.shape
        torch.Size([2, 2])
    """
    if adjoint_params is None and not isinstance(func, nn.Module):
        raise ValueError(
            "func must be an instance of nn.Module to specify the adjoint parameters; alternatively they "
            "can be specified explicitly via the `adjoint_params` argument. If there are no parameters "
            "then it is allowable to set `adjoint_params=()`."
        )
    if adjoint_rtol is None:
        adjoint_rtol = rtol
    if adjoint_atol is None:
        adjoint_atol = atol
    if adjoint_method is None:
        adjoint_method = method
    if adjoint_method != method and options is not None and adjoint_options is None:
        raise ValueError(
            "If `adjoint_method != method` then we cannot infer `adjoint_options` from `options`. So as "
            "`options` has been passed then `adjoint_options` must be passed as well."
        )
    if adjoint_options is None:
        adjoint_options = {k: v for k, v in options.items() if k != "norm"} if options is not None else {}
    else:
        adjoint_options = dict(adjoint_options)
    adjoint_params = tuple(func.parameters() if adjoint_params is None else adjoint_params)
    for p in adjoint_params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"adjoint_params must be tensors, got {type(p).__name__}")
    adjoint_params = tuple(p for p in adjoint_params if p.requires_grad)

    plan = _prepare(func, y0, t, rtol, atol, method, options, event_fn, "odeint_adjoint")
    if isinstance(func, nn.Module):
        listed = {id(p) for p in adjoint_params}
        excluded = [(n, p) for n, p in func.named_parameters() if p.requires_grad and id(p) not in listed]
        if excluded:
            plan.vf.func = _DetachExcluded(func, excluded)

    # the backward solve
    adjoint_norm = adjoint_options.pop("norm", None)
    if adjoint_norm is not None and adjoint_norm != "seminorm":
        raise NotImplementedError(
            "a custom adjoint_options['norm'] is not supported by torchnde; omit it (torchdiffeq's default "
            "norm over state, adjoint and parameter gradients) or pass norm='seminorm'"
        )
    back = _plan_method(
        adjoint_method, adjoint_options, adjoint_rtol, adjoint_atol, plan.flat, None, -plan.sign, "adjoint_options"
    )
    if back.adaptive:
        if back.first_step is not None and back.first_step != plan.first_step:
            raise NotImplementedError(
                "adjoint_options['first_step'] different from options['first_step'] is not supported by torchnde "
                "(the backward solve starts with the forward first step)"
            )
        state_norm = _state_norm(plan.flat, (options or {}).get("norm"))
        back.controller.norm = _adjoint_norm(state_norm, plan.flat.size, seminorm=adjoint_norm == "seminorm")
    elif back.grid_constructor is not None:
        # torchdiffeq asks for the grid of each output interval, from t[i] back to t[i - 1]
        ends = []
        for i in range(len(plan.ts) - 1, 0, -1):
            ends += _grid(back.grid_constructor, func, y0, t[i - 1 : i + 1].flip(0), -plan.sign, "adjoint_options: ")[
                1:
            ]
        back.controller = _GridEnds(sorted(set(ends)))
    elif back.step_size is not None:
        back.controller = _StepSize(back.step_size)
    if back.perturb:
        plan.vf.perturb = True
        back.solver = _tracking_solver(back.solver, plan.vf, -plan.sign)
    back.controller = _with_callbacks(
        back.controller,
        _callbacks(func, _ADJOINT_CALLBACKS, back.adaptive),
        -plan.sign,
        lambda x: x,
        plan.vf.dtype,
        plan.flat.device,
    )
    # the norm (with or without the parameter gradients) is set above, so BacksolveAdjoint keeps it
    adjoint = BacksolveAdjoint(solver=back.solver, controller=back.controller, seminorm=False)
    if event_fn is not None:
        event_t, ys = _event_solve(plan, y0, event_fn, adjoint)
    else:
        ys = _solve(plan, y0, adjoint)
    if adjoint_params and torch.is_grad_enabled():
        if isinstance(ys, torch.Tensor):
            ys = _ZeroGrads.apply(ys, *adjoint_params)
        else:
            ys = (_ZeroGrads.apply(ys[0], *adjoint_params), *ys[1:])
    return ys if event_fn is None else (event_t, ys)


def _adjoint_norm(state_norm, n: int, seminorm: bool):
    """torchdiffeq's adjoint norm on the flat augmented state ``(y, a, *parameter gradients)`` of
    BacksolveAdjoint: the max of the state norm of ``y`` and of ``a`` and (unless ``seminorm``) the
    RMS of the parameter gradients."""

    def norm(x):
        parts = [state_norm(x[..., :n]), state_norm(x[..., n : 2 * n])]
        if not seminorm and x.shape[-1] > 2 * n:
            parts.append(_rms(x[..., 2 * n :]))
        return torch.stack(parts, -1).amax(-1)

    return norm
