"""``solve``: the one integration loop behind every problem."""

from __future__ import annotations

import cmath
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from ._flat import flat_term
from ._ops import BatchOps, ScalarOps
from ._progress import make_progress
from ._results import Result, SolveError
from ._saveat import SaveAt
from ._solution import DenseInterpolation, Solution
from ._terms import AbstractTerm, ODETerm, SDETerm, normalize_terms
from ._tree import Flattener, tree_map, tree_zip
from .adjoints import AbstractAdjoint, DirectAdjoint
from .controllers import AbstractController, ConstantStepSize, PIDController
from .controllers._base import with_step_ts
from .solvers import AbstractAdaptiveSolver, AbstractSolver
from .solvers._base import LazyDerivative

__all__ = ["solve"]

_DEFAULT_SAVEAT = SaveAt(t1=True)
_DEFAULT_ADJOINT = DirectAdjoint()

_KEYWORDS = ("dt0", "args", "saveat", "controller", "adjoint", "max_steps", "throw", "progress", "per_sample")
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
    record: bool = False  # internal: keep the accepted step ends and the final solver state


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
    timed = [x for x in (t0, t1, saveat.ts) if isinstance(x, torch.Tensor) and x.requires_grad]
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
    problem = _Problem(terms, solver, controller, t0, t1, y0, dt0, args, saveat, max_steps, throw, progress, per_sample)
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


def _where_state(ops, accept, a, b):
    if not ops.batched:
        return a if accept else b
    if a is None:
        return None

    def pick(x, y):
        return torch.where(accept.view(-1, *([1] * (x.dim() - 1))), x, y)

    if isinstance(a, torch.Tensor):
        return pick(a, b)
    if not isinstance(a, (tuple, list)):
        return a  # a Python value that does not change between steps
    return type(a)(pick(x, y) if isinstance(x, torch.Tensor) else x for x, y in zip(a, b))


def _compact(rows: list, masks: list, pad_value=math.nan):
    """Per-sample compaction: rows (S, B, ...) with masks (S, B) -> (B, S', ...) with the selected
    rows of each sample first (in order) and ``pad_value`` after."""
    R = torch.stack(rows)  # (S, B, ...)
    M = torch.stack(masks)  # (S, B)
    order = torch.argsort((~M).to(torch.int8), dim=0, stable=True)
    idx = order.view(*order.shape, *([1] * (R.dim() - 2))).expand_as(R)
    R = torch.gather(R, 0, idx)
    Ms = torch.gather(M, 0, order)
    count = int(M.sum(0).max()) if M.numel() else 0
    R = R[:count]
    Ms = Ms[:count]
    fill = Ms.view(*Ms.shape, *([1] * (R.dim() - 2)))
    R = torch.where(fill, R, torch.full_like(R, pad_value))
    return R.movedim(0, 1), Ms.movedim(0, 1)


# --------------------------------------------------------------------------------------------
# the loop

#: An adaptive solve ends with ``Result.nonfinite`` after this many rejected steps with a NaN/inf
#: state or error estimate that it could not get past (see :class:`_NonfiniteWall`).
NONFINITE_REJECTIONS = 20


class _NonfiniteWall:
    """Ends a solve that keeps failing in front of the same NaN/inf.

    Each rejected step whose state or error estimate is NaN/inf is a *strike*; the earliest end
    of such a step is the *wall*. An accepted step that reaches the wall clears the strikes (the
    failed step was merely too long), and :data:`NONFINITE_REJECTIONS` strikes in front of one wall
    end the solve. Without this rule a vector field that is NaN beyond some time (or state) makes
    an adaptive solve creep towards it, each step shorter than the last, for all of ``max_steps``.
    The wall is cleared lazily, at the next strike: times only increase, so a solve that is past
    the wall then was past it at some accepted step before. Works on Python numbers (one step size)
    or ``(batch,)`` tensors (per-sample mode, where ``bad`` masks the samples that struck).
    """

    def __init__(self, ops):
        self.batched = ops.batched
        self.wall = ops.full(math.inf)
        self.strikes = ops.full(0).long() if ops.batched else 0
        self.total = ops.full(0).long() if ops.batched else 0  # for Solution.stats

    def strike(self, bad, t, t_next):
        """Record the non-finite rejected steps ``t -> t_next`` where ``bad``; returns where the
        solve must stop."""
        passed = t >= self.wall  # got past the previous wall: these strikes start a new count
        if self.batched:
            self.strikes = torch.where(bad, torch.where(passed, 1, self.strikes + 1), self.strikes)
            nearest = torch.where(passed, t_next, torch.minimum(self.wall, t_next))
            self.wall = torch.where(bad, nearest, self.wall)
            self.total = self.total + bad
        else:
            self.strikes = 1 if passed else self.strikes + 1
            self.wall = t_next if passed else min(self.wall, t_next)
            self.total += 1
        return self.strikes >= NONFINITE_REJECTIONS


def _integrate(p: _Problem) -> Solution:
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

    saveat = p.saveat
    ts_save = None if saveat.ts is None else _save_times(saveat.ts, tau0, tau1, sign, flat, per_sample, time_dtype)

    y = flat.flatten(p.y0)
    term = flat_term(p.terms, flat, p.args, sign, per_sample)
    solver, controller = p.solver, p.controller

    sstate = solver.init(term, tau0, y)
    adaptive = isinstance(controller, PIDController)
    if adaptive and dt0 is None and isinstance(sstate, LazyDerivative):
        sstate.get()  # the automatic initial step needs f(t0, y0); the first step then reuses it
    dt, cstate = controller.init(term, solver, tau0, tau1, y, solver.initial_derivative(sstate), dt0, ops)
    error_order = getattr(solver, "error_order", None) if adaptive else None

    # stop times (step_ts / jump_ts) in internal time, strictly inside (t0, t1)
    stops, jumps = _stop_times(controller, sign)
    if per_sample:
        stops_t = torch.tensor(stops + [math.inf], dtype=time_dtype, device=flat.device)
        is_jump_t = torch.tensor([s in jumps for s in stops] + [False], device=flat.device)
        stop_ptr = torch.searchsorted(stops_t, tau0, right=True)
    else:
        stop_ptr = 0
        while stop_ptr < len(stops) and stops[stop_ptr] <= tau0:
            stop_ptr += 1

    B = flat.batch_size
    dev = flat.device
    if per_sample:
        result = torch.zeros(B, dtype=torch.long, device=dev)
        running_hist: list = []  # per-iteration masks; the per-sample counts are summed at the end
        accept_hist: list = []
        running = torch.ones(B, dtype=torch.bool, device=dev)
    else:
        result = Result.successful
        n_steps = n_acc = n_rej = 0
        running = True

    # initial state must be finite
    f0 = solver.initial_derivative(sstate)
    check0 = y if f0 is None else y + f0  # one reduction covers both
    if per_sample:
        bad0 = ~torch.isfinite(check0.sum(-1))
        result = torch.where(bad0, Result.nonfinite, result)
        running = running & ~bad0
    elif not cmath.isfinite(check0.sum().item()):
        result = Result.nonfinite
        running = False

    # saving
    save_t0, save_t1 = saveat.t0, saveat.t1
    saved_y, saved_t = [], []  # shared mode lists of (N,) and floats
    if ts_save is not None:
        if per_sample:
            T = ts_save.shape[1]
            ts_out = torch.full((B, T, flat.size), math.nan, dtype=flat.dtype, device=dev)
            ts_vals: list = []  # (bidx, pidx, values) batches, assembled at the end
            ts_ptr = (ts_save <= tau0.unsqueeze(-1)).sum(-1)
            at0 = ts_ptr > 0  # save points at exactly t0
        else:
            T = len(ts_save)
            ts_ptr = 0
            while ts_ptr < T and ts_save[ts_ptr] <= tau0:
                saved_y.append(y)
                ts_ptr += 1
    step_rows: list = []
    step_masks: list = []
    dense_rows: list = []

    if ts_save is not None and per_sample and at0.any():
        bi = at0.nonzero().flatten()
        ts_vals.append((bi, torch.zeros_like(bi), y[bi]))
        # more than one save time equal to t0 cannot happen (ts strictly monotone)

    meter = make_progress(p.progress, tau0, tau1, sign)
    eps_land = 1e-9
    last_nonfinite = ops.false()
    wall = _NonfiniteWall(ops)
    iteration = 0
    recorded: list = []
    t = tau0
    y_t0 = y

    try:
        while ops.any(running):
            if p.max_steps is not None and iteration >= p.max_steps:
                # said as it is, even when the last rejection was NaN/inf (the message adds that)
                result = ops.where(running, Result.max_steps_reached, result)
                break
            # --- propose the end of the step, landing on t1 and on step/jump times
            if per_sample and not stops:
                # samples that have finished sit at t1 and take empty steps (h = 0)
                land = torch.add(t, dt, alpha=1 + eps_land) >= tau1
                t_next = torch.where(land, tau1, t + dt)
            elif per_sample:
                nxt = torch.minimum(stops_t[stop_ptr], tau1)
                t_try = t + dt
                land = t_try >= nxt - eps_land * dt
                t_next = torch.where(land, nxt, t_try)
                land_jump = land & is_jump_t[stop_ptr] & (nxt < tau1)
                t_next = torch.where(land_jump, torch.nextafter(nxt, torch.full_like(nxt, -math.inf)), t_next)
                t_next = torch.where(running, t_next, t)
            else:
                nxt = stops[stop_ptr] if stop_ptr < len(stops) else tau1
                nxt = min(nxt, tau1)
                t_try = t + dt
                land = t_try >= nxt - eps_land * dt
                t_next = nxt if land else t_try
                land_jump = land and nxt < tau1 and nxt in jumps
                if land_jump:
                    t_next = math.nextafter(nxt, -math.inf)

            y1, y_err, dinfo, sstate1, _ = solver.step(term, t, t_next, y, sstate)

            # --- accept / reject
            # one reduction: the sum is NaN/inf iff some entry is (or the sum overflows)
            y1_sum = y1.sum(-1) if per_sample else y1.sum()
            finite = torch.isfinite(y1_sum) if per_sample else cmath.isfinite(y1_sum.item())
            if adaptive:
                accept, dt_new, cstate, cres = controller.adapt(t, t_next, y, y1, y_err, error_order, cstate, ops)
                accept = ops.and_(accept, finite)
                # a non-finite state shrinks the step even if the error estimate was finite
                dt_new = ops.where(finite, dt_new, (t_next - t) * controller.factormin)
                if cres is not None:
                    mask, code = cres
                    fail = ops.and_(mask, running)
                    result = ops.where(fail, code, result) if per_sample else (code if fail else result)
                    running = ops.and_(running, ops.not_(fail))
                    accept = ops.and_(accept, ops.not_(fail))
            else:
                accept, dt_new, cstate, _ = controller.adapt(t, t_next, y, y1, y_err, None, cstate, ops)
                accept = finite
                notfin = ops.and_(running, ops.not_(finite))
                if per_sample:
                    result = torch.where(notfin, Result.nonfinite, result)
                elif notfin:
                    result = Result.nonfinite
                running = ops.and_(running, finite)
            accept = ops.and_(accept, running)
            iteration += 1

            # --- save inside the accepted step
            if ops.any(accept):
                C = None
                if ts_save is not None:
                    if per_sample:
                        C = _save_ts_batch(solver, term, dinfo, t, t_next, y, y1, accept, ts_save, ts_ptr, ts_vals, ops)
                        ts_ptr = C[1]
                        C = C[0]
                    else:
                        h = t_next - t
                        while ts_ptr < T and ts_save[ts_ptr] <= t_next + eps_land * h:
                            tau_s = ts_save[ts_ptr]
                            if tau_s >= t_next:
                                saved_y.append(y1)
                            else:
                                if C is None:
                                    C = solver.dense_coeffs(term, dinfo)
                                theta = (tau_s - t) / h
                                saved_y.append(_poly(y, C, theta))
                            ts_ptr += 1
                if saveat.steps:
                    if per_sample:
                        step_rows.append(torch.cat([t_next.to(flat.dtype).unsqueeze(-1), y1], -1))
                        step_masks.append(accept)
                    else:
                        saved_t.append(t_next)
                        saved_y.append(y1)
                if saveat.dense:
                    if C is None:
                        C = solver.dense_coeffs(term, dinfo)
                    dense_rows.append((t, t_next, y, C, accept))

            # --- commit
            # the cause of the last rejection is remembered: a solve that keeps producing NaN/inf
            # near one time (and so exhausts max_steps or the step size) reports it as non-finite
            if per_sample:
                running_hist.append(running)
                accept_hist.append(accept)
                t = torch.where(accept, t_next, t)
                y = torch.where(accept.unsqueeze(-1), y1, y)
                sstate = _where_state(ops, accept, sstate1, sstate)
                if len(stops):
                    landed = accept & land
                    jumped = landed & land_jump
                    t = torch.where(jumped, nxt, t)
                    stop_ptr = stop_ptr + (landed & (nxt < tau1))
                    if jumped.any():
                        sstate = _where_state(ops, jumped, solver.init(term, t, y), sstate)
                dt = dt_new
                rejected = running & ~accept
                if rejected.any():
                    # a NaN/inf state or error estimate (the sum is NaN/inf iff one of them is)
                    bad = rejected & ~torch.isfinite(y1_sum if y_err is None else y1_sum + y_err.sum(-1))
                    last_nonfinite = torch.where(rejected, bad, last_nonfinite)
                    # step-size underflow: the next try would not be shorter than the rejected one,
                    # or would not move t at all
                    h_next = (t + dt) - t
                    stuck = rejected & ((h_next >= t_next - t) | (h_next <= 0))
                    if bad.any():
                        stuck = stuck | wall.strike(bad, t, t_next)
                    if stuck.any():
                        code = torch.where(last_nonfinite, Result.nonfinite, Result.dt_min_reached)
                        result = torch.where(stuck, code, result)
                        running = running & ~stuck
                running = running & (t < tau1)
                if meter is not None:
                    meter.update(float(t[running].min()) if running.any() else float(tau1.min()))
            else:
                n_steps += 1
                if accept:
                    n_acc += 1
                    if p.record:
                        recorded.append(t_next)
                    t, y, sstate = t_next, y1, sstate1
                    if land and nxt < tau1:
                        stop_ptr += 1
                        if land_jump:
                            t = nxt
                            sstate = solver.init(term, t, y)
                else:
                    n_rej += 1
                    last_nonfinite = not finite or (y_err is not None and not cmath.isfinite(y_err.sum().item()))
                    # step-size underflow: the next try would not be shorter than the rejected one,
                    # or would not move t at all
                    h_next = (t + dt_new) - t
                    stuck = h_next >= t_next - t or h_next <= 0
                    if last_nonfinite:
                        stuck = wall.strike(True, t, t_next) or stuck
                dt = dt_new
                if running and not accept and stuck:
                    result = Result.nonfinite if last_nonfinite else Result.dt_min_reached
                    running = False
                running = running and t < tau1
                if meter is not None:
                    meter.update(t)
    finally:
        if meter is not None:
            meter.close()

    # --- assemble the solution
    interp = None
    if saveat.dense and (dense_rows or B == 0):  # (an empty batch: an interpolation of nothing)
        interp = _build_dense(dense_rows, per_sample, sign, flat, time_dtype)
    ts_list = []
    ys_parts = []
    if per_sample:
        parts_t, parts_y = [], []
        if save_t0:
            parts_t.append((tau0 * sign).unsqueeze(-1))
            parts_y.append(y_t0.unsqueeze(1))
        if ts_save is not None:
            if ts_vals:  # one scatter of everything saved (differentiable, no in-place writes)
                bi, pi, vals = (torch.cat(parts) for parts in zip(*ts_vals))
                ts_out = ts_out.index_put((bi, pi), vals)
            parts_t.append(ts_save * sign)
            parts_y.append(ts_out)
        if saveat.steps:
            # (no step taken, e.g. an empty batch: no rows)
            R = _compact(step_rows, step_masks)[0] if step_rows else y.new_zeros(B, 0, flat.size + 1)
            parts_t.append(R[..., 0].real.to(time_dtype) * sign)
            parts_y.append(R[..., 1:])
        t_final = torch.where(result == Result.successful, tau1, t) * sign
        if save_t1:
            parts_t.append(t_final.unsqueeze(-1))
            parts_y.append(y.unsqueeze(1))
        ts_all = torch.cat(parts_t, 1) if parts_t else None
        ys_all = torch.cat(parts_y, 1) if parts_y else None
        ys = None
        if ys_all is not None:
            ys = tree_map(lambda x: x.movedim(0, 1), flat.unflatten(ys_all.movedim(1, 0)))
        if running_hist:
            n_steps = torch.stack(running_hist).sum(0)
            n_acc = torch.stack(accept_hist).sum(0)
        else:
            n_steps = n_acc = torch.zeros(B, dtype=torch.long, device=dev)
        stats = {"num_steps": n_steps, "num_accepted": n_acc, "num_rejected": n_steps - n_acc}
    else:
        if save_t0:
            ts_list.append(tau0)
            ys_parts.append(y_t0)
        if ts_save is not None:
            n_saved = len(saved_y)
            ts_list.extend(ts_save[:n_saved])
            ys_parts.extend(saved_y)
            if n_saved < T:  # failed before the last save times: pad with NaN
                ts_list.extend(ts_save[n_saved:])
                ys_parts.extend([torch.full_like(y, math.nan)] * (T - n_saved))
        if saveat.steps:
            ts_list.extend(saved_t)
            ys_parts.extend(saved_y)
        t_end = tau1 if result == Result.successful else t  # internal time
        t_final = t_end * sign
        if save_t1:
            ts_list.append(t_end)
            ys_parts.append(y)
        ts_all = torch.tensor([v * sign for v in ts_list], dtype=time_dtype, device=dev) if ts_list else None
        ys = flat.unflatten(torch.stack(ys_parts)) if ys_parts else None
        stats = {"num_steps": n_steps, "num_accepted": n_acc, "num_rejected": n_rej}
        result = Result(result)
    stats["num_rejected_nonfinite"] = wall.total
    stats["nfe"] = term.nfe

    if term.rough:
        stats["nfe_diffusion"] = term.nfe_diffusion
    sol = Solution(
        ts=ts_all, ys=ys, stats=stats, result=result, t0=p.t0, t1=p.t1, interpolation=interp, t_final=t_final
    )
    if p.record:
        sol.internal = {"step_ends": recorded, "t0": tau0, "sign": sign, "y": y, "solver_state": sstate}
    if p.throw and not sol.successful:
        raise SolveError(_failure_message(result, t_final, last_nonfinite, stats), result=result, solution=sol)
    return sol


def _poly(y0, C, theta):
    from ._solution import _horner

    return y0 + _horner(C, theta)


def _save_ts_batch(solver, term, dinfo, t, t_next, y, y1, accept, ts_save, ts_ptr, ts_vals, ops):
    """Per-sample: save every requested time that falls inside each sample's accepted step."""
    T = ts_save.shape[1]
    C = None
    h = t_next - t
    h_safe = torch.where(h > 0, h, torch.ones_like(h))
    while True:
        inb = ts_ptr < T
        cand = torch.gather(ts_save, 1, ts_ptr.clamp(max=T - 1).unsqueeze(-1)).squeeze(-1)
        m = accept & inb & (cand <= t_next + 1e-9 * h)
        if not m.any():
            return C, ts_ptr
        if C is None:
            C = solver.dense_coeffs(term, dinfo)
        theta = ((cand - t) / h_safe).clamp(0, 1).to(y.real.dtype if y.is_complex() else y.dtype).unsqueeze(-1)
        vals = _poly(y, C, theta)
        vals = torch.where((cand >= t_next).unsqueeze(-1), y1, vals)
        bi = m.nonzero().flatten()
        ts_vals.append((bi, ts_ptr[bi], vals[bi]))
        ts_ptr = ts_ptr + m


def _stop_times(controller, sign):
    step_ts = getattr(controller, "step_ts", None)
    jump_ts = getattr(controller, "jump_ts", None)
    stops, jumps = set(), set()
    for ts, is_jump in ((step_ts, False), (jump_ts, True)):
        if ts is None:
            continue
        for v in ts.tolist():
            stops.add(v * sign)
            if is_jump:
                jumps.add(v * sign)
    return sorted(stops), jumps


def _build_dense(rows, per_sample, sign, flat, time_dtype):
    if per_sample and not rows:  # an empty batch
        TS = torch.zeros(flat.batch_size, 0, dtype=time_dtype, device=flat.device)
        Y = torch.zeros(flat.batch_size, 0, flat.size, dtype=flat.dtype, device=flat.device)
        return DenseInterpolation(TS, TS, Y, Y.unsqueeze(-2), sign, flat, True)
    if per_sample:
        t_s = [r[0] for r in rows]
        t_e = [r[1] for r in rows]
        masks = [r[4] for r in rows]
        TS, _ = _compact(t_s, masks)
        TE, M = _compact(t_e, masks, pad_value=math.inf)
        Y, _ = _compact([r[2] for r in rows], masks)
        C, _ = _compact([r[3] for r in rows], masks)
        TS = torch.where(M, TS, TE)
        return DenseInterpolation(TS, TE, Y, C, sign, flat, True)
    dev = flat.device
    TS = torch.tensor([r[0] for r in rows], dtype=torch.float64, device=dev)
    TE = torch.tensor([r[1] for r in rows], dtype=torch.float64, device=dev)
    Y = torch.stack([r[2] for r in rows])
    C = torch.stack([r[3] for r in rows])
    return DenseInterpolation(TS, TE, Y, C, sign, flat, False)


def _failure_message(result, t_final, last_nonfinite, stats) -> str:
    """What failed, where (time and, per sample, which samples) and what to try."""
    if isinstance(result, torch.Tensor):
        bad = (result != Result.successful).nonzero().flatten()
        codes = sorted({int(result[i]) for i in bad})
        lines = [f"solve failed for {len(bad)} of {result.shape[0]} samples:"]
        for c in codes:
            idx = (result == c).nonzero().flatten()
            shown = idx[:10].tolist()
            times = [round(float(t_final[i]), 10) for i in shown]
            more = f" (and {len(idx) - 10} more)" if len(idx) > 10 else ""
            lines.append(f"  {Result(c).name} for samples {shown}{more} at t = {times}: {Result(c).message}")
            if c == Result.max_steps_reached:
                nan = idx[last_nonfinite[idx]].tolist()
                if nan:
                    lines.append(f"    (the last rejected step of samples {nan[:10]} had a NaN/inf state: {_NAN_HINT})")
        lines.append("Pass throw=False to get the partial solution with per-sample codes in Solution.result.")
        return "\n".join(lines)
    r = Result(result)
    msg = f"solve failed ({r.name}) at t = {t_final!r}: {r.message} "
    if r == Result.max_steps_reached and last_nonfinite:
        msg += (
            f"The last rejected step had a NaN/inf state ({stats['num_rejected_nonfinite']} such steps): {_NAN_HINT}. "
        )
    return msg + "Pass throw=False to get the partial solution and the code in Solution.result."


_NAN_HINT = "the vector field may be undefined just after this time"
