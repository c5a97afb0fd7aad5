r"""The global solver-heuristic regulariser (Pal, Ma, Shah & Rackauckas, "Opening the Blackbox:
Accelerating Neural Differential Equations by Regularizing Internal Solver Heuristics", ICML 2021):
the local error estimates (and stiffness estimates) of the accepted steps, summed over the solve,
differentiable.

Done without touching the integration loop: the state carries two accumulators ``(R_E, R_S)``
with zero time derivative, and a solver wrapper adds each step's estimates into them at the end
of its ``step``. The loop keeps a step's end state only when it accepts the step (per sample in
per-sample mode), so the accumulators sum exactly the accepted steps; under ``DirectAdjoint`` (and
``CheckpointAdjoint``, which replays the same steps) autograd differentiates them like the state.
Adjoints that do not differentiate the steps themselves (``BacksolveAdjoint`` solves an adjoint
ODE in which the accumulators are constants; ``ReversibleAdjoint`` rebuilds the steps backwards)
would see a zero gradient and are refused: use :func:`solve_with_local_regulariser` with them.

With ``DirectAdjoint`` and one step size for the batch (the default), the state is not augmented:
a recording wrapper keeps each attempted step's estimates, and the accepted ones are those after
which the next step starts where the step ended. The solve is then exactly the plain one (no
accumulators to carry through every stage, the solve's own first step), which costs about a
tenth of an iteration instead of a third (benchmarks/regularisation.md). Per-sample solves and
``CheckpointAdjoint`` (whose backward replays the steps) use the accumulators.
"""

from __future__ import annotations

import math

import torch

from .._saveat import SaveAt
from .._solution import Solution
from .._terms import ODETerm
from .._tree import Flattener
from ..adjoints import CheckpointAdjoint, DirectAdjoint
from ..controllers import PIDController
from ..solvers import AbstractAdaptiveSolver
from ._local import (
    _as_time,
    _check_ode_term,
    _check_solver,
    _rms,
    _stiffness,
    _stiffness_pair_for,
    starting_step,
)

__all__ = ["GlobalEstimate", "solve_with_global_regulariser"]

_N_ACC = 2  # (error, stiffness) accumulators, the last two entries of the flat state


class GlobalEstimate:
    """What :func:`solve_with_global_regulariser` returns beside the solution.

    Attributes:
        error: :math:`\\sum_j |h_j| E_j` over the accepted steps (0-d; ``(batch,)`` per sample).
        stiffness: :math:`\\sum_j |h_j| \\rho_j`, or ``None`` if not asked for.
    """

    __slots__ = ("error", "stiffness")

    def __init__(self, error, stiffness):
        self.error = error
        self.stiffness = stiffness

    def __repr__(self):
        return f"GlobalEstimate(error={self.error!r}, stiffness={self.stiffness!r})"


class _Accumulating(AbstractAdaptiveSolver):
    """Wraps an adaptive solver: after each step, adds ``|h| E`` (and ``|h| rho``) into the last two
    entries of the flat state. The error estimate it hands the controller is the wrapped solver's,
    rescaled so that the controller's default RMS norm over ``N + 2`` entries equals the RMS over
    the ``N`` entries of the user's state (the step sizes are those of the plain solve)."""

    def __init__(self, inner, pair, weight: bool, rtol, atol, norm):
        self.inner = inner
        self.pair = pair
        self.weight = weight
        self.rtol, self.atol, self.norm = rtol, atol, norm
        self.order = inner.order
        self.error_order = inner.error_order
        self.dense_order = inner.dense_order

    def __repr__(self):
        return f"_Accumulating({self.inner!r})"

    def __eq__(self, other):
        return isinstance(other, _Accumulating) and other.inner == self.inner and other.pair == self.pair

    def __hash__(self):
        return hash((_Accumulating, self.inner, self.pair))

    def with_tolerances(self, rtol, atol):
        if not hasattr(self.inner, "with_tolerances"):
            return self
        return _Accumulating(self.inner.with_tolerances(rtol, atol), self.pair, self.weight, self.rtol, self.atol,
                             self.norm)  # fmt: skip

    def init(self, term, t0, y0):
        return self.inner.init(term, t0, y0)

    def solution_stats(self, state) -> dict:
        """The wrapped solver's own statistics (implicit solvers: Newton iterations, Jacobians)."""
        stats = getattr(self.inner, "solution_stats", None)
        return {} if stats is None else stats(state)

    def initial_derivative(self, state):
        return self.inner.initial_derivative(state)

    def dense_coeffs(self, term, dense_info):
        return self.inner.dense_coeffs(term, dense_info)

    def _estimates(self, t0, t1, y0, y1, y_err, dense_info, n):
        """``|h| E`` and ``|h| rho`` (or ``None``) of a step, from the first ``n`` entries of the
        flat state (``|h|`` is 1 with ``weight=False``)."""
        e = y_err[..., :n]
        if self.rtol is not None:
            scale = torch.maximum(y0[..., :n].detach().abs(), y1[..., :n].detach().abs()) * self.rtol + self.atol
            e = e / scale
        err = (self.norm or _rms)(e)
        rho = None
        if self.pair is not None:
            ks = dense_info[-1] if n == y0.shape[-1] else [k[..., :n] for k in dense_info[-1]]
            rho = _stiffness(self.inner, self.pair, (*dense_info[:-1], ks), y0[..., :n], t0, t1)
        h = t1 - t0
        if self.weight:
            w = abs(h) if isinstance(h, float) else h.abs().to(err.dtype)
        else:
            w = 1.0
        return err * w, (rho * w) if rho is not None else None

    def step(self, term, t0, t1, y0, state):
        y1, y_err, dense_info, state, result = self.inner.step(term, t0, t1, y0, state)
        n = y0.shape[-1] - _N_ACC
        err, rho = self._estimates(t0, t1, y0, y1, y_err, dense_info, n)
        acc = y0[..., n:]
        add = torch.stack([err, rho if rho is not None else torch.zeros_like(err)], -1).to(acc.dtype)
        y1 = torch.cat([y1[..., :n], acc + add], -1)
        # the accumulators' error is zero; scale the rest so the RMS over N + 2 entries is that over N
        fix = math.sqrt((n + _N_ACC) / n) if n else 1.0
        y_err = torch.cat([y_err[..., :n] * fix, torch.zeros_like(y_err[..., n:])], -1)
        return y1, y_err, dense_info, state, result


class _Recording(_Accumulating):
    """Wraps an adaptive solver without changing the state: records ``(t0, t1, |h| E, |h| rho)``
    of every attempted step in ``log`` (shared with the copies ``with_tolerances`` makes). For a
    one-step-size solve differentiated by autograd through its steps (``DirectAdjoint``): the
    solve is the plain one (same state, same ERK stage combinations, the solve's own first step),
    and the accepted steps are picked afterwards (see :func:`_accepted`)."""

    def __init__(self, inner, pair, weight: bool, rtol, atol, norm, log: list | None = None, first_only=False):
        super().__init__(inner, pair, weight, rtol, atol, norm)
        self.log = [] if log is None else log
        self.first_only = first_only  # record the first step only (the local regulariser's)

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self):
        return f"_Recording({self.inner!r})"

    def with_tolerances(self, rtol, atol):
        if not hasattr(self.inner, "with_tolerances"):
            return self
        return _Recording(self.inner.with_tolerances(rtol, atol), self.pair, self.weight, self.rtol, self.atol,
                          self.norm, self.log, self.first_only)  # fmt: skip

    def step(self, term, t0, t1, y0, state):
        y1, y_err, dense_info, state, result = self.inner.step(term, t0, t1, y0, state)
        if self.first_only and self.log:
            return y1, y_err, dense_info, state, result
        err, rho = self._estimates(t0, t1, y0, y1, y_err, dense_info, y0.shape[-1])
        self.log.append((t0, t1, err, rho))
        return y1, y_err, dense_info, state, result


def _as_float(t) -> float:
    return t if isinstance(t, float) else float(t)


def _accepted(log: list, sol: Solution, sign: float) -> list:
    """The entries of a one-step-size solve's step log that the loop accepted: after an accepted
    step the next one starts where it ended, after a rejected one it starts again where it started
    (a shorter step); the last step was accepted if the solve ended where it ended."""
    keep = [log[i] for i in range(len(log) - 1) if _as_float(log[i + 1][0]) == _as_float(log[i][1])]
    if log:
        last = log[-1]
        if sol.result == 0 or _as_float(sol.t_final) * sign == _as_float(last[1]):
            keep.append(last)
    return keep


def solve_with_global_regulariser(
    terms,
    solver,
    t0,
    t1,
    y0,
    *,
    stiffness: bool = False,
    weight: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    norm=None,
    **solve_kwargs,
) -> tuple[Solution, GlobalEstimate]:
    r"""Solve, and sum the solver's error (and stiffness) estimates over the accepted steps --
    the global regulariser of Pal, Ma, Shah & Rackauckas (ICML 2021).

    .. math:: R_E = \sum_j |h_j|\,E_j, \qquad R_S = \sum_j |h_j|\,\rho_j

    over the accepted steps :math:`j` of size :math:`h_j`, with :math:`E_j` the norm of the step's
    embedded error estimate and :math:`\rho_j` the stiffness estimate from its stages (both as
    :func:`local_error` computes them). With ``weight=True`` (default) these are Riemann sums of
    :math:`\int E\,dt` and :math:`\int \rho\,dt`, the quantities whose unbiased one-point estimates
    :func:`sample_local_regulariser` and :func:`solve_with_local_regulariser` return; with
    ``weight=False`` the plain sums :math:`\sum_j E_j`, :math:`\sum_j \rho_j`.

    The steps are those of the plain solve (the accumulators ride along in the state with zero
    derivative and zero error; with the default RMS norm of ``PIDController`` the controller sees
    exactly the plain solve's error, and the automatic first step is chosen from the user's state
    alone, at the cost of one evaluation not counted in ``stats``). Per sample with
    ``per_sample=True``.

    Args:
        terms, solver, t0, t1, y0: as :func:`~torchnde.solve` (an ODE, an adaptive solver).
        stiffness: also accumulate :math:`\rho` (Dopri5, Tsit5: solvers with two stages at one time).
        weight: weight each step's estimates by :math:`|h_j|`.
        rtol, atol, norm: as :func:`local_error`: scale the error as the controller does (pass the
            controller's tolerances), and the norm reducing the flat state.
        **solve_kwargs: passed to :func:`~torchnde.solve` (``controller``, ``adjoint``, ``args``,
            ``saveat``, ``per_sample``, ...). ``adjoint`` must be ``DirectAdjoint()`` (default) or
            ``CheckpointAdjoint()``.

    Returns:
        ``(solution, estimate)``: the :class:`~torchnde.Solution` of the user's state (``ys`` and
        dense output without the accumulators) and a :class:`GlobalEstimate`.

    Raises:
        NotImplementedError: another adjoint (use :func:`solve_with_local_regulariser`, which works
            with every adjoint), or ``compile=True``.
        TypeError: as :func:`local_error`.
    """
    from .._solve import solve

    _check_ode_term(terms, "solve_with_global_regulariser")
    _check_solver(solver, "solve_with_global_regulariser")
    if not isinstance(terms, ODETerm):
        raise TypeError(
            f"solve_with_global_regulariser needs a single ODETerm(f), got {terms!r} (sum the parts in one vector field)"
        )
    adjoint = solve_kwargs.get("adjoint", DirectAdjoint())
    if not isinstance(adjoint, (DirectAdjoint, CheckpointAdjoint)):
        raise NotImplementedError(
            f"the global regulariser is accumulated inside the steps, which {type(adjoint).__name__} does not "
            "differentiate (its gradient would be zero); use adjoint=DirectAdjoint() or CheckpointAdjoint(), or "
            "solve_with_local_regulariser, which works with every adjoint"
        )
    if solve_kwargs.get("compile"):
        raise NotImplementedError("solve_with_global_regulariser does not support compile=True yet")
    if solve_kwargs.get("event") is not None:
        raise NotImplementedError("solve_with_global_regulariser does not support events yet")
    if (rtol is None) != (atol is None):
        raise ValueError(f"pass both rtol and atol, or neither; got rtol={rtol!r}, atol={atol!r}")
    pair = _stiffness_pair_for(solver, stiffness)
    saveat = solve_kwargs.get("saveat")
    if saveat is not None and isinstance(saveat, SaveAt) and not (saveat.t1 or saveat.steps):
        raise ValueError(
            f"solve_with_global_regulariser reads the sums at t1: save t1 too, e.g. SaveAt(ts=..., t1=True); got {saveat!r}"
        )
    per_sample = bool(solve_kwargs.get("per_sample", False))
    if not per_sample and isinstance(adjoint, DirectAdjoint):
        return _solve_recorded(terms, solver, t0, t1, y0, pair, weight, rtol, atol, norm, solve_kwargs)
    flat = Flattener(y0, batch=per_sample)
    acc0 = torch.zeros((flat.batch_size, _N_ACC) if per_sample else (_N_ACC,), dtype=flat.dtype, device=flat.device)
    field = terms.vector_field

    def aug_field(t, state, args):
        y, acc = state
        return (field(t, y, args), torch.zeros_like(acc))

    controller = solve_kwargs.get("controller")
    if isinstance(controller, PIDController) and solve_kwargs.get("dt0") is None:
        # the automatic first step as the plain solve chooses it (the loop's would see the accumulators)
        solve_kwargs["dt0"] = _first_step(terms, solver, t0, t1, y0, controller, solve_kwargs.get("args"), per_sample)
    aug = ODETerm(aug_field, time_as_float=terms.time_as_float)
    wrapped = _Accumulating(solver, pair, bool(weight), rtol, atol, norm)
    sol = solve(aug, wrapped, t0, t1, (y0, acc0), **solve_kwargs)
    ys = None if sol.ys is None else sol.ys[0]
    acc = None if sol.ys is None else sol.ys[1]
    if acc is None:
        raise ValueError("solve_with_global_regulariser needs saved values: save at least t1 (the default)")
    # the accumulators at t1: the last saved time (per sample with SaveAt(steps=True): the last
    # row of each sample, which has its own number of steps; later rows are NaN padding)
    if per_sample and saveat is not None and saveat.steps:
        rows = (~torch.isnan(sol.ts)).sum(-1) - 1
        last = acc[torch.arange(acc.shape[0], device=acc.device), rows.clamp(min=0)]
    else:
        last = acc[:, -1] if per_sample else acc[-1]
    err = last[..., 0].real if last.is_complex() else last[..., 0]
    rho = (last[..., 1].real if last.is_complex() else last[..., 1]) if pair is not None else None
    interp = sol.interpolation
    if interp is not None:
        interp = _UserInterpolation(interp)
    out = Solution(
        ts=sol.ts, ys=ys, stats=sol.stats, result=sol.result, t0=sol.t0, t1=sol.t1, interpolation=interp,
        internal=None, t_final=sol.t_final, events=sol.events,
    )  # fmt: skip
    return out, GlobalEstimate(err, rho)


def _solve_recorded(terms, solver, t0, t1, y0, pair, weight, rtol, atol, norm, solve_kwargs):
    """The global regulariser of a one-step-size ``DirectAdjoint`` solve: the plain solve with a
    :class:`_Recording` solver, the estimates of its accepted steps summed afterwards."""
    from .._solve import solve

    wrapped = _Recording(solver, pair, bool(weight), rtol, atol, norm)
    sol = solve(terms, wrapped, t0, t1, y0, **solve_kwargs)
    span = _as_float(t1) - _as_float(t0)
    steps = _accepted(wrapped.log, sol, 1.0 if span >= 0 else -1.0)
    flat = Flattener(y0, batch=False)
    real = flat.dtype.to_real() if flat.dtype.is_complex else flat.dtype
    if steps:
        err = torch.stack([s[2] for s in steps]).sum().to(real)
        rho = torch.stack([s[3] for s in steps]).sum().to(real) if pair is not None else None
    else:
        err = torch.zeros((), dtype=real, device=flat.device)
        rho = err.clone() if pair is not None else None
    return sol, GlobalEstimate(err, rho)


def _first_step(terms, solver, t0, t1, y0, controller, args, per_sample):
    """:func:`starting_step` over ``[t0, t1]`` with the controller's tolerances and limits."""
    flat = Flattener(y0, batch=per_sample)
    real = flat.dtype.to_real() if flat.dtype.is_complex else flat.dtype
    a = _as_time(t0, "t0", per_sample, flat.batch_size, real, flat.device)
    b = _as_time(t1, "t1", per_sample, flat.batch_size, real, flat.device)
    span = b - a
    if per_sample:
        direction = 1.0 if flat.batch_size == 0 or bool(span[0] > 0) else -1.0
    else:
        direction = 1.0 if span > 0 else -1.0
    dt = starting_step(terms, solver, a, y0, direction, rtol=controller.rtol, atol=controller.atol, args=args,
                       per_sample=per_sample, span=span)  # fmt: skip
    mag = dt.abs() if per_sample else abs(dt)
    if controller.dtmax is not None:
        mag = mag.clamp(max=controller.dtmax) if per_sample else min(mag, controller.dtmax)
    if controller.dtmin:
        mag = mag.clamp(min=controller.dtmin) if per_sample else max(mag, controller.dtmin)
    return mag * direction


class _UserInterpolation:
    """The dense output of the augmented solve, with the accumulators dropped."""

    def __init__(self, interp):
        self.inner = interp
        self.batched = interp.batched
        self.t_start, self.t_end, self.direction = interp.t_start, interp.t_end, interp.direction

    def evaluate(self, t):
        return self.inner.evaluate(t)[0]

    def derivative(self, t):
        return self.inner.derivative(t)[0]
