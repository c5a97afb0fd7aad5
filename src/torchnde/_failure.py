"""How a solve fails: the NaN wall that ends an adaptive solve stuck in front of a NaN/inf, and
the message of the :class:`SolveError` raised when a solve fails with ``throw=True``."""

from __future__ import annotations

import math

import torch

from ._results import Result

__all__ = ["NONFINITE_REJECTIONS", "NonfiniteWall", "failure_message"]

#: An adaptive solve ends with ``Result.nonfinite`` after this many rejected steps with a NaN/inf
#: state or error estimate that it could not get past (see :class:`NonfiniteWall`).
NONFINITE_REJECTIONS = 20


class NonfiniteWall:
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


def failure_message(result, t_final, last_nonfinite, stats) -> str:
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
