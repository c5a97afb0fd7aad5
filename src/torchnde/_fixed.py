"""The fused fixed-step loop: fixed-step solves at the cost of a hand-written loop.

With a controller that accepts every step and whose step times do not depend on the state
(``ConstantStepSize``, ``StepTo``, the replays' ``StepEnds``: ``fixed_grid = True``), every step
time is known before the first step. :class:`FixedLoop` then

1. *plans* the steps: the same ``propose`` / ``adapt`` / ``commit`` time arithmetic as
   :class:`~torchnde._loop.SharedLoop`, on Python floats, so the planned times are the loop's
   times bit for bit;
2. *prefetches* the Brownian increments of an SDE over the planned steps with one vectorised
   query (``path.increments``), in bounded chunks, so each step's query is a dictionary lookup
   (:class:`Prefetched`; an interval the plan does not contain goes to the path itself);
3. runs the steps in a tight loop: no ``Step`` records, no per-step accept/reject decision and no
   host synchronisation. After the last step a single check covers the finiteness of the states
   (the last one for torchnde's solvers, whose steps carry a NaN/inf start state into their end;
   every step's sum for other solvers) and every implicit step's Newton code.

If that check fails (a NaN/inf state, a failed Newton solve), or the plan cannot be made (more
steps than ``max_steps``, a step that does not move ``t``), the solve is run again by the general
loop, which reports the failure with its time, code and message exactly as before: the fused path
changes the cost of successful solves, never a result. Events, progress bars and per-sample
solves always use the general loop.
"""

from __future__ import annotations

import torch

from ._loop import SharedLoop, Step
from ._ops import ScalarOps
from ._terms import prefill_times, time_dtype
from ._tree import tree_map
from .paths._base import BrownianIncrement

__all__ = ["FixedLoop", "Prefetched", "fusable"]

#: Prefetched Brownian values per chunk (elements, all steps of the chunk together).
CHUNK_ELEMENTS = 1 << 22
#: Steps planned at a time (a window's plan, prefetch table and time tensors are then let go).
WINDOW = 1 << 14


def fusable(p) -> bool:
    """Whether the solve ``p`` can run in :class:`FixedLoop`."""
    return bool(getattr(p.controller, "fixed_grid", False) and not p.per_sample and not p.events and p.progress is None)


class FixedLoop(SharedLoop):
    """:class:`~torchnde._loop.SharedLoop` with a fused run for fixed step times (see the module
    docstring). :meth:`run` returns ``None`` when the solve has to be repeated by the general loop."""

    def run(self):
        window = self._plan((self.t, self.dt, self.cstate, self.stops.ptr, 0))
        if window is None:  # not planable: the general loop (nothing has been changed yet)
            return super().run()
        term, solver = self.term, self.solver
        path = getattr(term, "path", None) if term.rough else None
        if term.rough:  # every step is accepted: SDE steps need not form their error estimates
            term.need_error = False
        saveat = self.p.saveat
        save = self.saver.save if (saveat.ts is not None or saveat.steps or saveat.dense) else None
        y, sstate, n = self.y, self.sstate, 0
        sums, codes = [], []
        # torchnde's own solvers all add the step's start state into its end (y1 = a y0 + ..., a != 0),
        # so a NaN/inf state stays non-finite to the last step and checking that one suffices;
        # a solver from elsewhere has each step's state checked (one reduction per step)
        each = not type(solver).__module__.startswith("torchnde.")
        try:
            while True:
                plan, state = window
                y, sstate = self._steps(plan, y, sstate, path, save, sums if each else None, codes)
                n += len(plan)
                if state is None:  # the last window
                    break
                window = self._plan(state)
                if window is None:  # over max_steps (or stuck) later on: the general loop reports it
                    return None
        finally:
            if path is not None:
                term.path = path
        # the one host synchronisation of the solve: every step finite, every Newton solve converged
        sums.append(y.detach().sum())
        ok = torch.isfinite(torch.stack(sums)).all()
        if codes:
            ok = ok & (torch.stack([torch.as_tensor(c) for c in codes]) == 0).all()
        if not bool(ok):
            return None
        self.y, self.sstate, self.t = y, sstate, self.tau1
        self.n_steps = self.n_acc = self.iteration = n
        self.running = False
        return self.finish()

    def _steps(self, plan, y, sstate, path, save, sums, codes):
        """Take the planned steps from ``(y, sstate)``; returns the state after them."""
        term, solver, step_fn, sign = self.term, self.solver, self.solver_step, self.sign
        if path is not None and len(plan) > 1 and hasattr(path, "increments"):
            term.path = Prefetched(path, [term._times(a[0], a[1]) for a in plan])
        flat = self.flat
        if len(plan) > 1 and not torch.compiler.is_compiling():  # the step starts' time tensors, made at once
            prefill_times([a[0] * sign for a in plan], time_dtype(flat.dtype), flat.device)
        record, recorded, coeffs = self.record, self.recorded, self._coeffs
        for t, t_next, land, land_jump, nxt in plan:
            y1, _, dinfo, sstate1, code = step_fn(term, t, t_next, y, sstate)
            if sums is not None:
                sums.append(y1.detach().sum())
            if code is not None:
                codes.append(code)
            if save is not None:
                s = Step(t, y, coeffs, t_next, land, land_jump, nxt)
                s.y1, s.dinfo = y1, dinfo
                save(s)
            if record:
                recorded.append(t_next)
            y, sstate = y1, sstate1
            if land_jump:  # a jump: the solver restarts after it
                sstate = solver.init(term, nxt, y)
        return y, sstate

    def _plan(self, state):
        """The next steps ``(t, t_next, land, land_jump, nxt)`` the general loop would take from
        ``state = (t, dt, controller state, stop pointer, steps so far)`` if every step is accepted,
        at most ``WINDOW`` of them (so memory does not grow with the solve), with the state after
        them (``None`` after the last step); or ``None`` (not running, over ``max_steps``, or a
        step that would not move ``t``)."""
        if not self.running:
            return None
        stops, controller, tau1, max_steps = self.stops, self.controller, self.tau1, self.p.max_steps
        t, dt, cstate, ptr, done = state
        ptr0, stops.ptr = stops.ptr, ptr
        plan = []
        try:
            while t < tau1:
                if len(plan) >= WINDOW:
                    return plan, (t, dt, cstate, stops.ptr, done + len(plan))
                if max_steps is not None and done + len(plan) >= max_steps:
                    return None
                t_next, land, land_jump, nxt = stops.propose(t, dt, tau1)
                if not t_next > t:
                    return None
                _, dt, cstate, _ = controller.adapt(t, t_next, None, None, None, None, cstate, ScalarOps)
                plan.append((t, t_next, land, land_jump, nxt))
                t = t_next
                if land and nxt < tau1:
                    stops.ptr += 1
                    if land_jump:
                        t = nxt
        finally:
            stops.ptr = ptr0
        return plan, None


class Prefetched:
    """A Brownian path whose increments over known intervals (user times ``(s, t)``) are computed
    ahead, ``chunk`` intervals at a time by one ``path.increments`` call; other queries and
    attributes go to ``path``. The values are the path's own (``increments`` equals step-by-step
    ``increment`` bit for bit), so prefetching changes no result."""

    def __init__(self, path, intervals: list):
        self._path = path
        self._intervals = intervals
        pos: dict = {}
        for i, key in enumerate(intervals):
            pos.setdefault(key, i)
        self._pos = pos
        shape = getattr(path, "shape", None)
        numel = 0 if shape is not None else 1 << 12  # (a path without a shape: a guess)
        for leaf in _shape_leaves(shape) if shape is not None else ():
            n = 1
            for d in leaf:
                n *= int(d)
            numel += n
        per_step = numel * {None: 1, "space-time": 2, "space-time-time": 3}.get(getattr(path, "levy_area", None), 3)
        self._chunk = max(1, CHUNK_ELEMENTS // per_step)
        self._lo = self._hi = 0
        self._rows: list = []
        self._broken = False

    def __getattr__(self, name):
        return getattr(self._path, name)

    def __repr__(self):
        return f"Prefetched({self._path!r}, {len(self._intervals)} intervals)"

    def _load(self, i: int) -> None:
        lo, hi = i, min(i + self._chunk, len(self._intervals))
        ivs = self._intervals[lo:hi]
        try:
            inc = self._path.increments([a for a, _ in ivs], [b for _, b in ivs])
        except NotImplementedError:  # e.g. per-sample seeds: query step by step
            self._broken = True
            return
        parts = [None if v is None else _unbind(v, hi - lo) for v in (inc.W, inc.H, inc.K)]
        W, H, K = ([None] * (hi - lo) if p is None else p for p in parts)
        self._rows = [BrownianIncrement(b - a, w, h, k) for (a, b), w, h, k in zip(ivs, W, H, K)]
        self._lo, self._hi = lo, hi

    def _lookup(self, s, t):
        i = self._pos.get((s, t))
        if i is None or self._broken:
            return None
        if not self._lo <= i < self._hi:
            self._load(i)
            if self._broken:
                return None
        return self._rows[i - self._lo]

    def increment(self, s, t) -> BrownianIncrement:
        row = self._lookup(s, t) if type(s) is float and type(t) is float else None
        return self._path.increment(s, t) if row is None else row

    def evaluate(self, s, t=None):
        if t is None or type(s) is not float or type(t) is not float:
            return self._path.evaluate(s, t)
        row = self._lookup(s, t)
        return self._path.evaluate(s, t) if row is None else row.W


def _shape_leaves(shape) -> list:
    if isinstance(shape, (torch.Size, tuple)) and all(isinstance(d, int) for d in shape):
        return [tuple(shape)]
    if isinstance(shape, dict):
        return [leaf for v in shape.values() for leaf in _shape_leaves(v)]
    if isinstance(shape, (tuple, list)):
        return [leaf for v in shape for leaf in _shape_leaves(v)]
    return [tuple(shape)]


def _unbind(tree, n: int) -> list:
    """A tree whose leaves have a leading dimension ``n`` as ``n`` trees of its rows."""
    if isinstance(tree, torch.Tensor):
        return list(tree.unbind(0))
    rows = [[] for _ in range(n)]
    leaves: list = []
    tree_map(lambda x: leaves.append(x.unbind(0)) or x, tree)
    for j in range(n):
        it = iter([lv[j] for lv in leaves])
        rows[j] = tree_map(lambda _x, it=it: next(it), tree)
    return rows
