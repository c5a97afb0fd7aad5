"""Stop times of the loop: ``step_ts`` (steps land on them) and ``jump_ts`` (steps land just
before them and the solver restarts after them), taken from the controller.

Times here are internal (forward) times: ``sign * t``. A step lands on the next stop time (or
``t1``) when it would reach it within a relative ``EPS_LAND`` of its length. At a jump the step
ends one float before the jump time, and :meth:`~torchnde._loop.SharedLoop.commit` moves ``t``
onto it and re-initialises the solver state (no FSAL stage is reused across a discontinuity).
"""

from __future__ import annotations

import math

import torch

__all__ = ["EPS_LAND", "SharedStops", "BatchStops", "stop_times"]

#: A step within this fraction of its length of a stop time (or t1) lands on it.
EPS_LAND = 1e-9


def stop_times(controller, sign):
    """The sorted internal stop times and the set of those that are jumps."""
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


class SharedStops:
    """One step size for the batch: a Python list of stop times and a pointer to the next one."""

    def __init__(self, controller, sign, tau0):
        self.stops, self.jumps = stop_times(controller, sign)
        ptr = 0
        while ptr < len(self.stops) and self.stops[ptr] <= tau0:
            ptr += 1
        self.ptr = ptr

    def propose(self, t, dt, tau1):
        """``(t_next, land, land_jump, nxt)`` for a step of ``dt`` from ``t``: ``nxt`` is the next
        stop time (or ``t1``), ``land`` whether the step ends there, ``land_jump`` whether that is
        a jump (then ``t_next`` is one float before it)."""
        stops = self.stops
        nxt = stops[self.ptr] if self.ptr < len(stops) else tau1
        nxt = min(nxt, tau1)
        t_try = t + dt
        land = t_try >= nxt - EPS_LAND * dt
        t_next = nxt if land else t_try
        land_jump = land and nxt < tau1 and nxt in self.jumps
        if land_jump:
            t_next = math.nextafter(nxt, -math.inf)
        return t_next, land, land_jump, nxt


class BatchStops:
    """Per sample: the stop times as one tensor (with ``inf`` after the last) and a ``(batch,)``
    pointer to each sample's next stop."""

    def __init__(self, controller, sign, tau0, time_dtype, device):
        stops, jumps = stop_times(controller, sign)
        self.any = bool(stops)
        self.times = torch.tensor(stops + [math.inf], dtype=time_dtype, device=device)
        self.is_jump = torch.tensor([s in jumps for s in stops] + [False], device=device)
        self.ptr = torch.searchsorted(self.times, tau0, right=True)

    def propose(self, t, dt, tau1, running):
        """As :meth:`SharedStops.propose`, per sample. Samples that have finished sit at ``t1``
        (without stop times) or at their ``t`` and take empty steps (``h = 0``)."""
        if not self.any:
            land = torch.add(t, dt, alpha=1 + EPS_LAND) >= tau1
            return torch.where(land, tau1, t + dt), land, None, None
        nxt = torch.minimum(self.times[self.ptr], tau1)
        t_try = t + dt
        land = t_try >= nxt - EPS_LAND * dt
        t_next = torch.where(land, nxt, t_try)
        land_jump = land & self.is_jump[self.ptr] & (nxt < tau1)
        t_next = torch.where(land_jump, torch.nextafter(nxt, torch.full_like(nxt, -math.inf)), t_next)
        t_next = torch.where(running, t_next, t)
        return t_next, land, land_jump, nxt
