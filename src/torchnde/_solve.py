"""``solve``: the one integration loop behind every problem."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from ._event_segments import solve_by_segments
from ._events import as_events
from ._failure import NONFINITE_REJECTIONS as NONFINITE_REJECTIONS
from ._fixed import FixedLoop, fusable
from ._flat import flat_term
from ._loop import BatchLoop, SharedLoop
from ._loop import _where_state as _where_state
from ._ops import BatchOps, ScalarOps
from ._saveat import SaveAt
from ._saver import _compact as _compact
from ._solution import Solution
from ._terms import AbstractTerm, ODETerm, SDETerm, normalize_terms
from ._tree import Flattener, tree_map, tree_zip
from .adjoints import AbstractAdjoint, DirectAdjoint
from .controllers import AbstractController, ConstantStepSize, PIDController
from .controllers._base import with_step_ts
from .solvers import AbstractAdaptiveSolver, AbstractSolver

__all__ = ["solve"]

# The step loop is in _loop.py (its phases), _stops.py (step_ts / jump_ts), _saver.py (SaveAt and the
# assembled ts / ys) and _failure.py (the NaN wall, failure messages); NONFINITE_REJECTIONS,
# _compact and _where_state, which used to live here, are re-exported ("x as x" above).

_DEFAULT_SAVEAT = SaveAt(t1=True)
_DEFAULT_ADJOINT = DirectAdjoint()

_KEYWORDS = (
    "dt0", "args", "saveat", "controller", "adjoint", "max_steps", "throw", "progress", "per_sample", "event",
    "max_events", "compile",
)  # fmt: skip
_HINTS = {
    "rtol": "tolerances belong to the controller: controller=PIDController(rtol=..., atol=...)",
    "atol": "tolerances belong to the controller: controller=PIDController(rtol=..., atol=...)",
    "method": "pass a solver object as the second argument, e.g. solve(term, Tsit5(), ...)",
    "options": "options are arguments of the solver/controller objects, e.g. PIDController(dtmax=...)",
    "t": "pass t0 and t1 positionally and save times as saveat=SaveAt(ts=...)",
    "ts": "save times go in saveat=SaveAt(ts=...)",
    "step_size": "use dt0=... (constant steps) or PIDController(...) (adaptive)",
    "dt": "the initial step size is dt0=...",
    "batch": "per-sample stepping is per_sample=True",
}


@dataclass
class _Problem:
    terms: Any
    solver: AbstractSolver
    controller: AbstractController
    t0: Any
    t1: Any
    y0: Any
    dt0: Any
    args: Any
    saveat: SaveAt
    max_steps: int | None
    throw: bool
    progress: Any
    per_sample: bool
    events: list | None = None  # Event objects (checked), or None
    max_events: int | None = None
    record: bool = False  # internal: keep the accepted step ends and the final solver state
    compile: bool = False  # solve(..., compile=True): the step runs compiled (see _compile.py)


def solve(
    terms: AbstractTerm,
    solver: AbstractSolver,
    t0,
    t1,
    y0,
    *,
    dt0=None,
    args=None,
    saveat: SaveAt = _DEFAULT_SAVEAT,
    controller: AbstractController | None = None,
    adjoint: AbstractAdjoint = _DEFAULT_ADJOINT,
    max_steps: int | None = 4096,
    throw: bool = True,
    progress=None,
    per_sample: bool = False,
    event=None,
    max_events: int | None = None,
    compile: bool = False,
    **unknown,
) -> Solution:
    r"""Solve a differential equation from ``t0`` to ``t1``.

    Args:
        terms: what is integrated, e.g. ``ODETerm(f)`` for :math:`\dot y = f(t, y, \text{args})`.
        solver: the numerical method, e.g. ``Tsit5()``.
        t0, t1: start and end times (numbers or 0-d tensors; a tensor that requires grad gets
            its gradient, as do save times); ``t1 < t0`` integrates backwards. In per-sample mode
            also ``(batch,)`` tensors (one interval per sample, all in the same direction).
        y0: the initial state: a tensor of any shape, or a dict/tuple/list of tensors (one dtype
            and device: float32, float64 or complex). Every tensor the solve creates follows it.
        dt0: the initial (for ``ConstantStepSize``: every) step size, signed like ``t1 - t0``.
            ``None`` with an adaptive controller picks it automatically.
        args: passed unchanged to the vector field as its third argument.
        saveat: what to return (default: the value at ``t1``).
        controller: ``ConstantStepSize()`` or ``PIDController(rtol, atol, ...)``. ``None`` means
            ``ConstantStepSize()`` and needs ``dt0``.
        adjoint: how gradients are computed: ``DirectAdjoint()`` (autograd through the steps),
            ``CheckpointAdjoint()``, ``BacksolveAdjoint()`` or ``ReversibleAdjoint()``.
        max_steps: the most steps (accepted + rejected) to take; ``None`` for no limit.
        throw: raise :class:`SolveError` if the solve fails; with ``False`` the failure is in
            ``Solution.result`` and the solution holds what was computed before it.
        progress: ``True`` for a progress bar (tqdm if installed), or an object with
            ``start(t0, t1)``, ``update(t)``, ``close()``.
        per_sample: treat the leading dimension of ``y0`` as independent problems, each with its
            own step sizes, accept/reject decisions, status and statistics (and optionally its own
            ``t0``, ``t1`` and save times). The vector field then receives ``t`` as a
            ``(batch,)`` tensor.
        event: an :class:`Event` or a list of them: conditions located after every accepted step
            that end the solve (``terminal``) or reset the state and continue; recorded in
            ``Solution.events`` with differentiable event times (see docs/events.md).
        max_events: with ``event``: the ``max_events``-th event of a solve (per sample) ends it
            as if terminal; ``None`` for no limit.
        compile: run the solver's step (with the vector field) through ``torch.compile``; the
            compiled code is reused by later solves of the same shapes (see docs/performance.md).

    Returns:
        A :class:`Solution`.

    Raises:
        TypeError, ValueError: on invalid input, before any step is taken.
        SolveError: when ``throw=True`` and the solve fails (see :class:`Result`).
    """
    if unknown:
        lines = []
        for k in unknown:
            hint = _HINTS.get(k)
            lines.append(f"  {k!r}" + (f": {hint}" if hint else ""))
        raise TypeError(
            "solve() got unexpected keyword argument(s):\n"
            + "\n".join(lines)
            + f"\nvalid keyword arguments are: {', '.join(_KEYWORDS)}"
        )
    if isinstance(terms, AbstractTerm) and not isinstance(terms, (ODETerm, SDETerm)):
        terms = normalize_terms(terms, backward=_is_backward(t0, t1))
    controller = _check_policies(terms, solver, saveat, adjoint, controller, dt0, max_steps)
    _check_not_meta(y0)
    events = as_events(event)
    if max_events is not None and (
        isinstance(max_events, bool) or not isinstance(max_events, numbers.Integral) or max_events < 1
    ):
        raise ValueError(f"max_events must be a positive int or None, got {max_events!r}")
    timed = [x for x in (t0, t1, saveat.ts) if isinstance(x, torch.Tensor) and x.requires_grad]
    if timed and events:
        raise NotImplementedError(
            "gradients with respect to t0, t1 or save times are not supported together with events; "
            "pass the times detached (event times themselves are differentiable: Solution.events.t)"
        )
    if timed and isinstance(terms, SDETerm):
        raise NotImplementedError(
            "gradients with respect to t0, t1 or save times are not defined for SDEs (the Brownian path "
            "is not differentiable in time); pass the times detached"
        )
    if timed and per_sample:
        raise NotImplementedError(
            "gradients with respect to t0, t1 or save times are not supported with per_sample=True yet; "
            "pass the times detached, or solve without per_sample"
        )
    if timed and _requires_grad(t0):
        # y(t; t0, y0) depends on t0 through y0 - (t0 - t0') f(t0, y0) at t0' = t0 (value unchanged)
        y0 = _shift_in_time(terms, t0, y0, args, -1.0)
    if isinstance(terms, SDETerm) and saveat.ts is not None and not per_sample:
        # between steps an SDE's solution is not smooth: land on the save times instead of interpolating
        controller = with_step_ts(controller, saveat.ts)
    problem = _Problem(
        terms, solver, controller, t0, t1, y0, dt0, args, saveat, max_steps, throw, progress, per_sample, events,
        max_events, compile=bool(compile),
    )  # fmt: skip
    if events and not isinstance(adjoint, DirectAdjoint) and torch.is_grad_enabled():
        # adjoints that do not differentiate the loop itself: solve between the events
        sol = solve_by_segments(problem, adjoint, _integrate)
    else:
        sol = adjoint.loop(problem, _integrate)
    if timed and (_requires_grad(t1) or _requires_grad(saveat.ts)):
        sol = _time_gradients(sol, terms, args, t1, saveat)
    return sol


def _check_policies(terms, solver, saveat, adjoint, controller, dt0, max_steps):
    """Type checks of solve's policy arguments, with messages that say what to pass; returns the
    controller to use (``ConstantStepSize()`` when none is given with a ``dt0``)."""
    if not isinstance(terms, AbstractTerm):
        if callable(terms):
            raise TypeError(
                f"solve() expects a term as its first argument, got the callable {terms!r}; "
                "wrap a vector field f(t, y, args) as ODETerm(f)"
            )
        raise TypeError(f"solve() expects a term such as ODETerm(f) as its first argument, got {type(terms).__name__}")
    if isinstance(solver, type) and issubclass(solver, AbstractSolver):
        raise TypeError(f"solve() expects a solver instance, got the class {solver.__name__}; use {solver.__name__}()")
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"solve() expects a solver such as Tsit5() as its second argument, got {type(solver).__name__}")
    if isinstance(terms, SDETerm):
        _check_sde_solver(terms, solver)
    elif solver.strong_order and not solver.order:
        raise TypeError(
            f"{type(solver).__name__} is an SDE solver; this problem has no control term on Brownian motion "
            "(for an ODE use e.g. Tsit5())"
        )
    if not isinstance(saveat, SaveAt):
        raise TypeError(f"saveat must be a SaveAt(...), got {type(saveat).__name__}")
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(f"adjoint must be an adjoint object such as DirectAdjoint(), got {type(adjoint).__name__}")
    if controller is None:
        if dt0 is None:
            raise ValueError(
                "solve() needs either dt0=... (constant steps) or an adaptive controller, e.g. "
                "controller=PIDController(rtol=1e-6, atol=1e-6) with an adaptive solver such as Tsit5()"
            )
        controller = ConstantStepSize()
    if isinstance(controller, type):
        raise TypeError(
            f"controller must be an instance, got the class {controller.__name__}; use {controller.__name__}(...)"
        )
    if not isinstance(controller, AbstractController):
        raise TypeError(f"controller must be ConstantStepSize() or PIDController(...), got {type(controller).__name__}")
    if isinstance(controller, PIDController) and not isinstance(solver, AbstractAdaptiveSolver):
        from .solvers import SOLVERS

        adaptive = [s.__name__ for s in SOLVERS if issubclass(s, AbstractAdaptiveSolver)]
        raise TypeError(
            f"{type(solver).__name__} has no error estimate, so it cannot be used with an adaptive "
            f"controller (PIDController). Use an adaptive solver ({', '.join(adaptive)}) or "
            f"ConstantStepSize() with dt0=..."
        )
    if max_steps is not None and (not isinstance(max_steps, numbers.Integral) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
    return controller


def _check_not_meta(y0) -> None:
    """The loop needs real values (finiteness checks, step-size control, save times): refuse
    tensors without data (the ``meta`` device) before any step, instead of failing in ``.item()``."""
    if isinstance(y0, (dict, tuple, list)):
        for leaf in y0.values() if isinstance(y0, dict) else y0:
            _check_not_meta(leaf)
    elif isinstance(y0, torch.Tensor) and y0.is_meta:
        raise ValueError(
            "solve() cannot run on the meta device: y0 has no values, and the solve needs them to check "
            "for NaN/inf and to choose step sizes. Put y0 on a real device (e.g. y0.to('cpu') or 'cuda'); "
            "to trace shapes only, call the vector field itself on meta tensors"
        )


def _check_sde_solver(sde: SDETerm, solver) -> None:
    """The solver must solve SDEs, fit the noise, have its Lévy area and match a declared calculus."""
    from .solvers import SDE_SOLVERS

    name = type(solver).__name__
    control = sde.control
    cls = control.noise_class
    fits = [s.__name__ for s in SDE_SOLVERS if s.strong_order_for(cls) is not None]
    if not solver.strong_order:
        raise TypeError(
            f"{name} is an ODE solver; this problem is an SDE (a ControlTerm on {type(control.path).__name__}). "
            f"Use an SDE solver: {', '.join(fits)}"
        )
    if solver.strong_order_for(cls) is None:
        needs = " or ".join(sorted(solver.strong_order))
        raise TypeError(
            f"{name} needs {needs} noise, but {control!r} declares {cls} noise "
            f"(declare additive=True / commutative=True on the ControlTerm if it holds). Solvers for "
            f"{cls} noise: {', '.join(fits)}"
        )
    if solver.levy_area is not None:
        have = getattr(control.path, "levy_area", None)
        if have is None or (solver.levy_area == "space-time-time" and have != "space-time-time"):
            raise ValueError(
                f"{name} needs the {solver.levy_area} Lévy area of the Brownian path; build it with "
                f"levy_area={solver.levy_area!r}"
            )
    if control.calculus is not None and cls != "additive" and solver.calculus != control.calculus:
        other = [s.__name__ for s in SDE_SOLVERS if s.calculus == control.calculus and s.strong_order_for(cls)]
        raise TypeError(
            f"{name} solves {solver.calculus} SDEs but {control!r} declares calculus={control.calculus!r}; "
            f"use one of: {', '.join(other)}"
        )


def _is_backward(t0, t1) -> bool:
    """Whether the solve runs backwards in time (bad times are reported later, with context)."""
    if type(t0) in (float, int) and type(t1) in (float, int):
        return t1 < t0
    try:
        d = torch.as_tensor(t1).detach().reshape(-1)[:1] - torch.as_tensor(t0).detach().reshape(-1)[:1]
        return bool((d < 0).all()) if d.numel() else False
    except (TypeError, ValueError, RuntimeError):
        return False


def _requires_grad(x) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def _time_kick(terms, t, y, args, sign: float):
    """``sign (t - t') f(t, y)`` at ``t' = t``: zero, with derivative ``sign f(t, y)`` in ``t``."""
    f = terms.vf(float(t.detach()), tree_map(torch.Tensor.detach, y), args)
    dt = (t - t.detach()) * sign
    return tree_map(lambda fi: dt.to(fi.real.dtype) * fi.detach(), f)


def _shift_in_time(terms, t, y, args, sign: float):
    return tree_zip(y, _time_kick(terms, t, y, args, sign), torch.add)


def _time_gradients(sol, terms, args, t1, saveat):
    """Give saved values their derivative with respect to their save time, d y(s)/ds = f(s, y(s))."""
    picks = []  # (row of sol.ys, time tensor)
    if _requires_grad(saveat.ts):
        first = int(saveat.t0)
        picks += [(first + j, s) for j, s in enumerate(saveat.ts.reshape(-1))]
    if saveat.t1 and _requires_grad(t1) and sol.successful:
        picks.append((sol.ts.shape[0] - 1, t1))
    if not picks:
        return sol
    kicks = [_time_kick(terms, s, tree_map(lambda leaf, i=i: leaf[i], sol.ys), args, 1.0) for i, s in picks]
    rows = torch.tensor([i for i, _ in picks], device=sol.ts.device)
    stacked = tree_map(lambda x: x[None], kicks[0])
    for kick in kicks[1:]:
        stacked = tree_zip(stacked, kick, lambda a, b: torch.cat([a, b[None]]))
    ys = tree_zip(sol.ys, stacked, lambda leaf, k: leaf.index_add(0, rows, k.to(leaf.dtype)))
    return dataclasses.replace(sol, ys=ys)


# --------------------------------------------------------------------------------------------
# input normalisation


def _time_value(x, name, flat: Flattener, per_sample: bool, time_dtype):
    """Python float (shared mode) or (B,) tensor (per-sample mode), checked."""
    if isinstance(x, torch.Tensor):
        if x.device != flat.device:
            raise ValueError(f"{name} is on {x.device} but y0 is on {flat.device}; put them on one device")
        if x.dtype.is_complex:
            raise TypeError(f"{name} must be real, got dtype {x.dtype}")
        if x.dim() == 0:
            x = x.item() if not per_sample else x
        elif not per_sample:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; a time must be a scalar. For one interval per "
                "sample pass per_sample=True with y0's leading dimension as the batch"
            )
        elif x.shape != (flat.batch_size,):
            raise ValueError(
                f"{name} must be a scalar or have shape ({flat.batch_size},) (the batch), got {tuple(x.shape)}"
            )
    elif not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number or tensor, got {type(x).__name__}")
    if per_sample:
        v = torch.as_tensor(x, dtype=time_dtype, device=flat.device).detach()
        v = v.expand(flat.batch_size).clone() if v.dim() == 0 else v.clone()
        if not torch.isfinite(v).all():
            raise ValueError(f"{name} must be finite, got {v.tolist()}")
        return v
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _save_times(ts, t0, t1, sign, flat, per_sample, time_dtype):
    """Internal (forward) save times: list of floats, or (B, T) tensor."""
    if isinstance(ts, torch.Tensor) and ts.device != flat.device:
        raise ValueError(f"SaveAt(ts=...) is on {ts.device} but y0 is on {flat.device}; put them on one device")
    tt = torch.as_tensor(ts, dtype=time_dtype if per_sample else torch.float64).detach()
    if not per_sample:
        tt = tt.cpu()
    else:
        tt = tt.to(flat.device)
    if tt.dim() == 0 or (tt.dim() != 1 and not (per_sample and tt.dim() == 2)):
        want = "a 1-D sequence (or, per sample, a (batch, T) tensor)" if per_sample else "a 1-D sequence of times"
        raise ValueError(f"SaveAt(ts=...) must be {want}; got shape {tuple(tt.shape)}")
    if tt.shape[-1] == 0:
        raise ValueError("SaveAt(ts=...) is empty; omit it or give at least one time")
    if not torch.isfinite(tt).all():
        raise ValueError(f"SaveAt(ts=...) must be finite, got {tt.tolist()}")
    tau = tt * sign
    if tau.shape[-1] > 1:
        d = tau[..., 1:] - tau[..., :-1]
        if not (d > 0).all():
            where = "increasing" if sign > 0 else "decreasing (t1 < t0)"
            raise ValueError(f"SaveAt(ts=...) must be strictly {where}, got {tt.tolist()}")
    if per_sample:
        tau = tau.expand(flat.batch_size, -1) if tau.dim() == 1 else tau
        if tau.shape[0] != flat.batch_size:
            raise ValueError(f"SaveAt(ts=...) has {tau.shape[0]} rows but the batch has {flat.batch_size} samples")
        lo, hi = t0.unsqueeze(-1), t1.unsqueeze(-1)
        tol = 1e-12 if time_dtype == torch.float64 else 1e-6
        slack = tol * torch.maximum(hi.abs(), lo.abs()).clamp(min=1)
        bad = ((tau < lo - slack) | (tau > hi + slack)).any(-1)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"SaveAt(ts=...) for sample {i} lies outside its interval [t0, t1] = "
                f"[{sign * lo[i].item()}, {sign * hi[i].item()}]: {(tau[i] * sign).tolist()}"
            )
        return torch.minimum(torch.maximum(tau, lo), hi).contiguous()
    vals = tau.tolist()
    slack = 1e-12 * max(abs(t0), abs(t1), 1.0)
    if vals[0] < t0 - slack or vals[-1] > t1 + slack:
        raise ValueError(
            f"SaveAt(ts=...) must lie inside [t0, t1] = [{sign * t0}, {sign * t1}]; got times from "
            f"{sign * vals[0]} to {sign * vals[-1]}"
        )
    return [min(max(v, t0), t1) for v in vals]


# --------------------------------------------------------------------------------------------
# the loop


def _integrate(p: _Problem) -> Solution:
    """Check and normalise the times of ``p`` (internal time runs forward: ``tau = sign * t``),
    then run the step loop of the batch mode (:mod:`torchnde._loop`)."""
    per_sample = p.per_sample
    flat = Flattener(p.y0, batch=per_sample)
    real_dtype = flat.dtype.to_real() if flat.dtype.is_complex else flat.dtype
    time_dtype = real_dtype
    t0 = _time_value(p.t0, "t0", flat, per_sample, time_dtype)
    t1 = _time_value(p.t1, "t1", flat, per_sample, time_dtype)
    if per_sample:
        same = t0 == t1
        if same.any():
            raise ValueError(
                f"t0 == t1 for samples {same.nonzero().flatten().tolist()[:10]}; every interval must be non-empty"
            )
        fwd = t1 > t0
        if not (fwd.all() or (~fwd).all()):
            raise ValueError("per-sample intervals must all run in the same direction (all t1 > t0 or all t1 < t0)")
        sign = -1.0 if _is_backward(p.t0, p.t1) else 1.0  # (an empty batch keeps the direction asked for)
        ops = BatchOps(flat.batch_size, time_dtype, flat.device)
    else:
        if t0 == t1:
            raise ValueError(f"t0 == t1 == {t0}; the interval of integration must be non-empty")
        sign = 1.0 if t1 > t0 else -1.0
        ops = ScalarOps
    tau0, tau1 = t0 * sign, t1 * sign

    dt0 = p.dt0
    if dt0 is not None:
        if isinstance(dt0, torch.Tensor) and dt0.dim() > 0 and not per_sample:
            raise ValueError(f"dt0 must be a scalar, got shape {tuple(dt0.shape)}")
        d = dt0 if isinstance(dt0, torch.Tensor) else torch.tensor(float(dt0))
        d = d.detach().to(torch.float64).cpu()
        if not torch.isfinite(d).all() or (d == 0).any() or (d * sign < 0).any():
            raise ValueError(
                f"dt0 must be finite, non-zero and have the sign of t1 - t0 "
                f"({'positive' if sign > 0 else 'negative'}); got {d.tolist()}"
            )
        dt0 = (dt0 * sign) if not isinstance(dt0, torch.Tensor) else (dt0.detach().to(flat.device, time_dtype) * sign)
        if not per_sample:
            dt0 = float(dt0)

    ts_save = None if p.saveat.ts is None else _save_times(p.saveat.ts, tau0, tau1, sign, flat, per_sample, time_dtype)

    def loop(cls):
        term = flat_term(p.terms, flat, p.args, sign, per_sample)
        kw = dict(flat=flat, term=term, ops=ops, tau0=tau0, tau1=tau1, sign=sign, dt0=dt0, ts_save=ts_save)
        return cls(p, time_dtype=time_dtype, **kw)

    if per_sample:
        return loop(BatchLoop).run()
    if fusable(p):  # fixed step times: the fused loop; a failed solve is repeated by the general one
        sol = loop(FixedLoop).run()
        if sol is not None:
            return sol
    return loop(SharedLoop).run()
