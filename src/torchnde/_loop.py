"""The step loop behind ``solve``.

Each iteration builds one :class:`Step` record and passes it through the phases of
:meth:`_Loop.run`::

    propose  -> where the step ends (t1, step_ts, just before a jump_ts)         [mode-specific]
    attempt  -> solver.step (in run)                                            [shared code]
    decide   -> accept/reject, controller, result codes                         [shared code]
    events   -> event location on the accepted steps (_events.py); may shorten
                them to the event time                                          [shared code]
    save     -> saver.save(step) inside the accepted step: ts, steps, dense     (_saver.py)
    commit   -> advance t/y/solver state, stop pointers, jumps; on rejection the
                cause, step-size underflow and the NaN wall; the running mask   [mode-specific]

Stop times are in _stops.py, saving and the assembled ts/ys in _saver.py, the NaN wall and the
failure message in _failure.py; :meth:`_Loop.finish` builds the :class:`Solution`.

:class:`SharedLoop` has one step size for the whole state (Python-float times, ``ScalarOps``);
:class:`BatchLoop` steps each sample on its own (``(batch,)`` tensors, ``BatchOps``). Both share
``attempt``/``decide``/``events``, written against the ops namespace.
"""

from __future__ import annotations

import cmath

import torch

from ._compile import compiled_step
from ._events import _Events
from ._failure import NONFINITE_REJECTIONS, NonfiniteWall, failure_message
from ._ops import ScalarOps
from ._progress import make_progress
from ._results import Result, SolveError
from ._saver import BatchSaver, SharedSaver
from ._solution import Solution
from ._stops import BatchStops, SharedStops
from .controllers import PIDController
from .solvers._base import AbstractERK, LazyDerivative

__all__ = ["NONFINITE_REJECTIONS", "Step", "SharedLoop", "BatchLoop"]


class Step:
    """One iteration of the loop, passed from phase to phase.

    ``t -> t_next`` from state ``y`` (internal time; floats or ``(batch,)`` tensors); the solver's
    ``y1``, ``y_err``, ``dinfo`` (what its dense output needs) and ``sstate1`` (its state after
    the step); ``accept`` (bool or mask) and ``dt_new`` from :meth:`_Loop.decide`; ``land``
    (the step ends on the stop time ``nxt``, which is ``t1`` or a ``step_ts``/``jump_ts``) and
    ``land_jump`` (``nxt`` is a jump: ``t_next`` is one float before it). ``C`` is the step's
    dense-output polynomial, computed on first use (at most once per step) and assignable.
    ``fired`` is what an event did in the step (:class:`~torchnde._events.Fired`) or ``None``;
    ``code`` the solver's own failure reason (implicit solvers: 0 converged, 1 Newton diverged, 2
    singular matrix; ``None`` for solvers without one) and ``newton`` it as a result code.
    """

    __slots__ = ("t", "t_next", "y", "y1", "y_err", "dinfo", "sstate1", "accept", "land", "land_jump", "nxt")
    __slots__ += ("finite", "y1_sum", "dt_new", "_C", "_coeffs", "fired", "code", "newton")

    def __init__(self, t, y, coeffs, t_next, land, land_jump, nxt):
        self.t, self.y, self._coeffs, self._C, self.fired = t, y, coeffs, None, None
        self.t_next, self.land, self.land_jump, self.nxt = t_next, land, land_jump, nxt

    @property
    def C(self):
        if self._C is None:
            self._C = self._coeffs(self.dinfo)
        return self._C

    @C.setter
    def C(self, value):
        self._C = value


class _Loop:
    """What both modes share: the set-up, the phases written against ``ops``, and the result."""

    batched = False

    def __init__(self, p, *, flat, term, ops, tau0, tau1, sign, dt0, ts_save, time_dtype):
        self.p, self.flat, self.term, self.ops = p, flat, term, ops
        self.tau0, self.tau1, self.sign = tau0, tau1, sign
        solver, controller = p.solver, p.controller
        if isinstance(controller, PIDController) and hasattr(solver, "with_tolerances"):
            solver = solver.with_tolerances(controller.rtol, controller.atol)  # e.g. Newton tolerances
        self.solver, self.controller = solver, controller
        self.solver_step = compiled_step(solver, term, p) if p.compile else solver.step
        saveat = p.saveat
        if not (saveat.ts is not None or saveat.steps or saveat.dense or p.events or p.record):
            if isinstance(solver, AbstractERK) and hasattr(term, "need_dense"):
                term.need_dense = False  # the loop is the only reader of the steps' results
        self.y = y = flat.flatten(p.y0)
        self.sstate = solver.init(term, tau0, y)
        self.adaptive = adaptive = isinstance(controller, PIDController)
        if adaptive and dt0 is None and isinstance(self.sstate, LazyDerivative):
            self.sstate.get()  # the automatic initial step needs f(t0, y0); the first step then reuses it
        f0 = solver.initial_derivative(self.sstate)
        self.dt, self.cstate = controller.init(term, solver, tau0, tau1, y, f0, dt0, ops)
        self.error_order = getattr(solver, "error_order", None) if adaptive else None
        self._coeffs = lambda dinfo: solver.dense_coeffs(term, dinfo)
        self._setup(p, flat, time_dtype)
        # the initial state must be finite (one reduction covers y0 and f(t0, y0))
        f0 = solver.initial_derivative(self.sstate)
        bad0 = ops.not_(_finite_sum(y if f0 is None else y + f0, self.batched)[1])
        self.result = ops.where(bad0, Result.nonfinite, self.result)
        self.running = ops.and_(self.running, ops.not_(bad0))
        saver = BatchSaver if self.batched else SharedSaver
        self.saver = saver(p.saveat, ts_save, flat, tau0, y, sign, time_dtype)
        self.last_nonfinite = ops.false()
        self.last_newton = ops.full(0).long() if self.batched else 0  # result code of the last Newton failure
        self.wall = NonfiniteWall(ops)
        self.iteration = 0
        self.record = p.record
        self.recorded: list = []  # accepted step ends (shared mode), for p.record
        self.t = tau0
        self.meter = None
        self.evs = None
        if p.events:
            self.evs = _Events(p.events, term, flat, p.args, sign, self.batched, p.max_events, time_dtype)
            self.evs.init(tau0, y)

    def run(self) -> Solution:
        ops, max_steps = self.ops, self.p.max_steps
        self.meter = make_progress(self.p.progress, self.tau0, self.tau1, self.sign)
        propose, decide, commit = self.propose, self.decide, self.commit
        events = self.events if self.evs is not None else None
        solver_step, term = self.solver_step, self.term
        saveat = self.p.saveat
        save = self.saver.save if (saveat.ts is not None or saveat.steps or saveat.dense) else None
        try:
            while ops.any(self.running):
                if max_steps is not None and self.iteration >= max_steps:
                    # said as it is, even when the last rejection was NaN/inf (the message adds that)
                    self.result = ops.where(self.running, Result.max_steps_reached, self.result)
                    break
                step = propose()
                # attempt (inline: one call less per step)
                step.y1, step.y_err, step.dinfo, step.sstate1, step.code = solver_step(
                    term, step.t, step.t_next, step.y, self.sstate
                )
                decide(step)
                self.iteration += 1
                if events is not None:
                    events(step)
                if save is not None and ops.any(step.accept):
                    save(step)
                commit(step)
        finally:
            if self.meter is not None:
                self.meter.close()
        return self.finish()

    def decide(self, s: Step) -> None:
        """Accept or reject the step (per sample in per-sample mode); a step with a NaN/inf state
        is rejected (adaptive: and shrunk) or ends the solve (fixed steps); the controller may end
        it with a code of its own (e.g. ``dt_min_reached``)."""
        ops, controller, running, result = self.ops, self.controller, self.running, self.result
        # one reduction: the sum is NaN/inf iff some entry is (or the sum overflows)
        if self.batched:  # (inline, not _finite_sum: one call less per step)
            s.y1_sum = s.y1.sum(-1)
            s.finite = finite = torch.isfinite(s.y1_sum)
        else:
            s.y1_sum = s.y1.sum()
            s.finite = finite = cmath.isfinite(s.y1_sum.item())
        if self.adaptive:
            accept, dt_new, self.cstate, cres = controller.adapt(
                s.t, s.t_next, s.y, s.y1, s.y_err, self.error_order, self.cstate, ops
            )
            accept = ops.and_(accept, finite)
            # a non-finite state shrinks the step even if the error estimate was finite
            dt_new = ops.where(finite, dt_new, (s.t_next - s.t) * controller.factormin)
            if cres is not None:
                mask, code = cres
                fail = ops.and_(mask, running)
                result = ops.where(fail, code, result)
                running = ops.and_(running, ops.not_(fail))
                accept = ops.and_(accept, ops.not_(fail))
        else:
            _, dt_new, self.cstate, _ = controller.adapt(s.t, s.t_next, s.y, s.y1, s.y_err, None, self.cstate, ops)
            accept = finite
            result = ops.where(ops.and_(running, ops.not_(finite)), Result.nonfinite, result)
            running = ops.and_(running, finite)
        s.newton = 0
        if s.code is not None:  # an implicit solver: a failed Newton solve is a rejected step
            code = s.code
            newton = torch.where(code == 2, Result.singular_jacobian, Result.nonlinear_divergence)
            s.newton = newton = torch.where(code != 0, newton, 0)
            if not self.batched:
                s.newton = newton = int(newton)
            if not self.adaptive:  # fixed steps cannot be shrunk: the solve (that sample) ends here
                fail = ops.and_(newton != 0, running)
                result = ops.where(fail, newton, result)
                running = ops.and_(running, ops.not_(fail))
                accept = ops.and_(accept, ops.not_(fail))
        s.dt_new = dt_new
        s.accept = ops.and_(accept, running)
        self.running, self.result = running, result

    def events(self, s: Step) -> None:
        """Event location on the accepted steps' dense output (``s.C``), between the decision and
        saving. An event shortens its accepted step to the event time (``s.t_next``, ``s.y1`` and
        ``s.C`` for those samples; ``s.land`` cleared, so no stop pointer advances); ``commit``
        then continues from the post-event state with a fresh solver state, or stops the sample.
        With fixed steps the step after the event ends where the interrupted one would have, so
        the grid does not move with the event time (and neither do an SDE's Brownian increments
        after it)."""
        if not self.ops.any(s.accept):
            return
        fired = s.fired = self.evs.check(s.t, s.t_next, s.y, s.y1, lambda: s.C, s.accept)
        if fired is None:
            return
        C = s.C
        end = s.t_next  # where the interrupted step would have ended
        rdt = C.real.dtype
        powers = torch.arange(1, C.shape[-2] + 1, device=C.device, dtype=rdt)  # C[p] multiplies theta^(p+1)
        if self.batched:
            m = fired.mask
            scale = fired.theta.to(rdt).view(-1, 1, 1) ** powers.view(1, -1, 1)
            s.C = torch.where(m.view(-1, 1, 1), C * scale, C)
            s.t_next = torch.where(m, fired.tau, s.t_next)
            s.y1 = torch.where(m.unsqueeze(-1), fired.y_minus, s.y1)
            s.land = s.land & ~m
            if isinstance(s.land_jump, torch.Tensor):
                s.land_jump = s.land_jump & ~m
            if not self.adaptive:  # fixed steps: the next step ends where this one would have
                rest = end - fired.tau
                s.dt_new = torch.where(m & ~fired.stop & (rest > 0), rest, s.dt_new)
        elif bool(fired.mask):
            s.C = C * (fired.theta.to(rdt) ** powers).view(-1, 1)
            s.t_next = float(fired.tau)
            s.y1 = fired.y_minus
            s.land = s.land_jump = False
            if not self.adaptive and end > s.t_next:  # fixed steps: the grid is kept (see above)
                s.dt_new = end - s.t_next
        else:
            s.fired = None

    def finish(self) -> Solution:
        """The Solution: saved values, statistics, result code; raises if asked and failed."""
        p, term = self.p, self.term
        release = getattr(term, "release", None)
        if release is not None:
            release()  # the solver's scratch buffers, for the next solve of this state
        t_end = self._t_end()
        t_final = t_end * self.sign
        ts, ys, interp = self.saver.assemble(t_end, self.y)
        stats, result = self._stats(), self._result()
        stats["num_rejected_nonfinite"] = self.wall.total
        stats["nfe"] = term.nfe
        solver_stats = getattr(self.solver, "solution_stats", None)
        if solver_stats is not None:  # a solver's own counters (e.g. Newton iterations, stiffness)
            stats.update(solver_stats(self.sstate))
        if term.rough:
            stats["nfe_diffusion"] = term.nfe_diffusion
        sol = Solution(
            ts=ts, ys=ys, stats=stats, result=result, t0=p.t0, t1=p.t1, interpolation=interp, t_final=t_final
        )
        if self.evs is not None:
            sol.events = self.evs.record()
        if p.record:
            sol.internal = {
                "step_ends": self.recorded,
                "t0": self.tau0,
                "sign": self.sign,
                "y": self.y,
                "solver_state": self.sstate,
            }
        if p.throw and not sol.successful:
            msg = failure_message(result, t_final, self.last_nonfinite, stats)
            raise SolveError(msg, result=result, solution=sol)
        return sol


class SharedLoop(_Loop):
    """One step size for the whole state: times are Python floats, decisions Python bools."""

    def _setup(self, p, flat, time_dtype):
        self.stops = SharedStops(self.controller, self.sign, self.tau0)
        # [y, |y|] of the last step end, for PIDController's error scale (see decide)
        # (only for PIDController.adapt itself: not a subclass's, nor one replaced on the instance)
        own = getattr(self.controller.adapt, "__func__", None) is PIDController.adapt
        self.abs_memo = [None, None] if own else None
        self.result, self.running = Result.successful, True
        self.n_steps = self.n_acc = self.n_rej = 0

    def propose(self) -> Step:
        return Step(self.t, self.y, self._coeffs, *self.stops.propose(self.t, self.dt, self.tau1))

    def run(self) -> Solution:
        """:meth:`_Loop.run` with one step size: the same phases, with the step proposed inline
        and the decisions on Python bools (a few calls less per step)."""
        if type(self).propose is not SharedLoop.propose:  # pragma: no cover - a subclass's own proposals
            return super().run()
        max_steps = self.p.max_steps
        self.meter = make_progress(self.p.progress, self.tau0, self.tau1, self.sign)
        decide, commit, stops_propose = self.decide, self.commit, self.stops.propose
        events = self.events if self.evs is not None else None
        solver_step, term, coeffs, tau1 = self.solver_step, self.term, self._coeffs, self.tau1
        saveat = self.p.saveat
        save = self.saver.save if (saveat.ts is not None or saveat.steps or saveat.dense) else None
        try:
            while self.running:
                if max_steps is not None and self.iteration >= max_steps:
                    # said as it is, even when the last rejection was NaN/inf (the message adds that)
                    self.result = Result.max_steps_reached
                    break
                t, y = self.t, self.y
                step = Step(t, y, coeffs, *stops_propose(t, self.dt, tau1))
                step.y1, step.y_err, step.dinfo, step.sstate1, step.code = solver_step(
                    term, t, step.t_next, y, self.sstate
                )
                decide(step)
                self.iteration += 1
                if events is not None:
                    events(step)
                if save is not None and step.accept:
                    save(step)
                commit(step)
        finally:
            if self.meter is not None:
                self.meter.close()
        return self.finish()

    def decide(self, s: Step) -> None:
        """:meth:`_Loop.decide` with one step size: the same decisions on Python bools and floats,
        written out (this runs every step; the calls into ``ops`` cost as much as the rest)."""
        # one reduction: the sum is NaN/inf iff some entry is (or the sum overflows)
        s.y1_sum = y1_sum = s.y1.sum()
        s.finite = finite = cmath.isfinite(y1_sum.item())
        running, result = self.running, self.result
        if self.adaptive:
            controller = self.controller
            if self.abs_memo is not None:  # PIDController.adapt itself: its scalar form, with |y| kept
                accept, dt_new, self.cstate, cres = controller._adapt_scalar(
                    s.t_next - s.t, s.y, s.y1, s.y_err, self.error_order, self.cstate, self.abs_memo
                )
            else:
                accept, dt_new, self.cstate, cres = controller.adapt(
                    s.t, s.t_next, s.y, s.y1, s.y_err, self.error_order, self.cstate, ScalarOps
                )
            if not finite:  # a non-finite state shrinks the step even if the error estimate was finite
                accept = False
                dt_new = (s.t_next - s.t) * controller.factormin
            if cres is not None:
                mask, code = cres
                if mask and running:
                    result, running, accept = code, False, False
        else:
            _, dt_new, self.cstate, _ = self.controller.adapt(
                s.t, s.t_next, s.y, s.y1, s.y_err, None, self.cstate, ScalarOps
            )
            accept = finite
            if running and not finite:
                result, running = Result.nonfinite, False
        s.newton = 0
        if s.code is not None:  # an implicit solver: a failed Newton solve is a rejected step
            code = s.code
            newton = torch.where(code == 2, Result.singular_jacobian, Result.nonlinear_divergence)
            s.newton = newton = int(torch.where(code != 0, newton, 0))
            if not self.adaptive and newton != 0 and running:  # fixed steps: the solve ends here
                result, running, accept = newton, False, False
        s.dt_new = dt_new
        s.accept = accept and running
        self.running, self.result = running, result

    def commit(self, s: Step) -> None:
        self.n_steps += 1
        t = self.t
        if s.accept:
            self.n_acc += 1
            if self.record:
                self.recorded.append(s.t_next)
            t, self.y, self.sstate = s.t_next, s.y1, s.sstate1
            if s.fired is not None:  # an event ended the step: go on from its post-event state, or stop
                self.y = s.fired.y_next
                if bool(s.fired.stop):
                    self.running = False
                else:
                    self.sstate = self.solver.init(self.term, t, self.y)
            if s.land and s.nxt < self.tau1:
                self.stops.ptr += 1
                if s.land_jump:
                    t = s.nxt
                    self.sstate = self.solver.init(self.term, t, self.y)
        else:
            self.n_rej += 1
            # the cause of the last rejection is remembered: a solve that keeps producing NaN/inf
            # near one time (and so exhausts max_steps or the step size) reports it as non-finite
            y_err = s.y_err
            self.last_nonfinite = not s.finite or (y_err is not None and not cmath.isfinite(y_err.sum().item()))
            # step-size underflow: the next try would not be shorter than the rejected one,
            # or would not move t at all
            h_next = (t + s.dt_new) - t
            stuck = h_next >= s.t_next - t or h_next <= 0
            if self.last_nonfinite:
                stuck = self.wall.strike(True, t, s.t_next) or stuck
            self.last_newton = s.newton
            if self.running and stuck:
                self.result = Result.nonfinite if self.last_nonfinite else (self.last_newton or Result.dt_min_reached)
                self.running = False
        self.dt = s.dt_new
        self.t = t
        self.running = self.running and t < self.tau1
        if self.meter is not None:
            self.meter.update(t)

    def _t_end(self):
        if self.evs is not None and bool(self.evs.terminated[0]):
            return self.t
        return self.tau1 if self.result == Result.successful else self.t

    def _stats(self):
        return {"num_steps": self.n_steps, "num_accepted": self.n_acc, "num_rejected": self.n_rej}

    def _result(self):
        return Result(self.result)


class BatchLoop(_Loop):
    """Per-sample stepping: times, step sizes, decisions and codes are ``(batch,)`` tensors.
    Samples that have finished take empty steps until all have."""

    batched = True

    def _setup(self, p, flat, time_dtype):
        self.stops = BatchStops(self.controller, self.sign, self.tau0, time_dtype, flat.device)
        B, dev = flat.batch_size, flat.device
        self.result = torch.zeros(B, dtype=torch.long, device=dev)
        self.running = torch.ones(B, dtype=torch.bool, device=dev)
        self.running_hist: list = []  # per-iteration masks; the per-sample counts are summed at the end
        self.accept_hist: list = []

    def propose(self) -> Step:
        return Step(self.t, self.y, self._coeffs, *self.stops.propose(self.t, self.dt, self.tau1, self.running))

    def commit(self, s: Step) -> None:
        ops, accept, running, tau1 = self.ops, s.accept, self.running, self.tau1
        self.running_hist.append(running)
        self.accept_hist.append(accept)
        t = torch.where(accept, s.t_next, self.t)
        y = self.y = torch.where(accept.unsqueeze(-1), s.y1, self.y)
        self.sstate = _where_state(ops, accept, s.sstate1, self.sstate)
        if s.fired is not None:  # events: go on from the post-event states, or stop those samples
            fired = s.fired
            y = self.y = torch.where(fired.mask.unsqueeze(-1), fired.y_next, y)
            go_on = fired.mask & ~fired.stop
            if go_on.any():
                self.sstate = _where_state(ops, go_on, self.solver.init(self.term, t, y), self.sstate)
            running = running & ~fired.stop
        if self.stops.any:
            landed = accept & s.land
            jumped = landed & s.land_jump
            t = torch.where(jumped, s.nxt, t)
            self.stops.ptr = self.stops.ptr + (landed & (s.nxt < tau1))
            if jumped.any():
                self.sstate = _where_state(ops, jumped, self.solver.init(self.term, t, y), self.sstate)
        dt = self.dt = s.dt_new
        rejected = running & ~accept
        if rejected.any():
            # the cause of the last rejection is remembered (see SharedLoop.commit): a NaN/inf
            # state or error estimate (the sum is NaN/inf iff one of them is)
            bad = rejected & ~torch.isfinite(s.y1_sum if s.y_err is None else s.y1_sum + s.y_err.sum(-1))
            self.last_nonfinite = torch.where(rejected, bad, self.last_nonfinite)
            self.last_newton = torch.where(rejected, s.newton, self.last_newton)
            # step-size underflow: the next try would not be shorter than the rejected one,
            # or would not move t at all
            h_next = (t + dt) - t
            stuck = rejected & ((h_next >= s.t_next - t) | (h_next <= 0))
            if bad.any():
                stuck = stuck | self.wall.strike(bad, t, s.t_next)
            if stuck.any():
                code = torch.where(self.last_newton != 0, self.last_newton, Result.dt_min_reached)
                code = torch.where(self.last_nonfinite, Result.nonfinite, code)
                self.result = torch.where(stuck, code, self.result)
                running = running & ~stuck
        self.running = running = running & (t < tau1)
        self.t = t
        if self.meter is not None:
            self.meter.update(float(t[running].min()) if running.any() else float(tau1.min()))

    def _t_end(self):
        t_end = torch.where(self.result == Result.successful, self.tau1, self.t)
        return t_end if self.evs is None else torch.where(self.evs.terminated, self.t, t_end)

    def _stats(self):
        if self.running_hist:
            n_steps = torch.stack(self.running_hist).sum(0)
            n_acc = torch.stack(self.accept_hist).sum(0)
        else:
            n_steps = n_acc = torch.zeros(self.flat.batch_size, dtype=torch.long, device=self.flat.device)
        return {"num_steps": n_steps, "num_accepted": n_acc, "num_rejected": n_steps - n_acc}

    def _result(self):
        return self.result


def _finite_sum(x, batched):
    """``(sum, finite)`` of the state ``x`` (per sample when ``batched``): one reduction, NaN/inf
    iff some entry is (or the sum overflows)."""
    if batched:
        x_sum = x.sum(-1)
        return x_sum, torch.isfinite(x_sum)
    x_sum = x.sum()
    return x_sum, cmath.isfinite(x_sum.item())


def _where_state(ops, accept, a, b):
    """The solver state ``a`` where ``accept``, else ``b`` (per sample, leaf by leaf)."""
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
