"""Result codes: failure is a result, not a crash."""

from __future__ import annotations

import enum

__all__ = ["Result", "SolveError"]


class Result(enum.IntEnum):
    """Outcome of a solve, one per sample in per-sample mode (``Solution.result``)."""

    successful = 0
    max_steps_reached = 1
    dt_min_reached = 2
    nonfinite = 3

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Result.successful: "the solve reached t1",
    Result.max_steps_reached: (
        "the maximum number of steps was reached before t1. Try increasing max_steps=..., loosening "
        "rtol/atol, or check whether the problem is stiff (an explicit solver then needs tiny steps)."
    ),
    Result.dt_min_reached: (
        "the step size fell below dtmin (or below the resolution of t) while errors stayed too large. "
        "The solution may blow up or have a discontinuity here: pass its time in "
        "PIDController(jump_ts=...), loosen rtol/atol, lower dtmin, or use force_dtmin=True."
    ),
    Result.nonfinite: (
        "the state or the vector field became NaN or infinite and shrinking the step did not help. "
        "Check the vector field for overflow, division by zero or log of negative numbers, and the "
        "initial condition for NaNs."
    ),
}


class SolveError(RuntimeError):
    """Raised by ``solve(..., throw=True)`` when a solve does not succeed.

    Attributes:
        result: the result code(s) (an int tensor, one per sample in per-sample mode).
        solution: the partial :class:`~torchnde.Solution` (what was computed before the failure).
    """

    def __init__(self, message: str, result=None, solution=None):
        super().__init__(message)
        self.result = result
        self.solution = solution
