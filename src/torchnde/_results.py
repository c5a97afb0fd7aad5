"""Result codes: failure is a result, not a crash."""

from __future__ import annotations

import enum

import torch

__all__ = ["Result", "SolveError"]


class Result(enum.IntEnum):
    """Outcome of a solve, one per sample in per-sample mode (``Solution.result``)."""

    successful = 0
    max_steps_reached = 1
    dt_min_reached = 2
    nonfinite = 3
    nonlinear_divergence = 4
    singular_jacobian = 5

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Result.successful: "the solve reached t1",
    Result.max_steps_reached: (
        "the maximum number of steps was reached before t1. Try increasing max_steps=..., loosening "
        "rtol/atol, or check whether the problem is stiff (an explicit solver then needs tiny steps): "
        "use an implicit solver such as Kvaerno5() or Rodas5P(), or AutoSwitch() (docs/stiff.md)."
    ),
    Result.dt_min_reached: (
        "the step size fell below dtmin (or below the resolution of t) while errors stayed too large. "
        "The solution may blow up or have a discontinuity here: pass its time in "
        "PIDController(jump_ts=...), loosen rtol/atol, lower dtmin, or use force_dtmin=True."
    ),
    Result.nonfinite: (
        "the state or the vector field became NaN or infinite and shrinking the step did not help "
        "(an adaptive solve stops after 20 rejected NaN/inf steps that do not get past the time where "
        "they began). Check the vector field for overflow, division by zero, log or sqrt of negative "
        "numbers, or a formula valid only up to some time (then end the solve before it), and the "
        "initial condition for NaNs."
    ),
    Result.nonlinear_divergence: (
        "the implicit solver's Newton iterations did not converge: with fixed steps at this step size "
        "(which cannot be shrunk), with an adaptive controller at every step size it tried. Try an "
        "adaptive controller or a smaller dt0, a Rosenbrock method, or check the vector field for a "
        "discontinuity or blow-up here."
    ),
    Result.singular_jacobian: (
        "the implicit solver's matrix I - h*gamma*J was singular (its LU factorisation failed): with "
        "fixed steps at this step size, with an adaptive controller at every step size it tried. Try "
        "another step size, check the Jacobian for NaN/inf, or the problem for an algebraic "
        "constraint (a DAE), which an ODE solver cannot handle."
    ),
}


class SolveError(RuntimeError):
    """Raised by ``solve(..., throw=True)`` when a solve does not succeed.

    Attributes:
        result: the result code(s) (an int tensor, one per sample in per-sample mode).
        solution: the partial :class:`~torchnde.Solution` (what was computed before the failure).
        t: where the solve stopped (``solution.t_final``; per-sample mode: one time per sample).
        samples: per-sample mode: the indices of the samples that failed; ``None`` otherwise.
    """

    def __init__(self, message: str, result=None, solution=None):
        super().__init__(message)
        self.result = result
        self.solution = solution

    @property
    def t(self):
        return getattr(self.solution, "t_final", None)

    @property
    def samples(self) -> list[int] | None:
        r = self.result
        if isinstance(r, torch.Tensor) and r.dim() == 1:
            return (r != Result.successful).nonzero().flatten().tolist()
        return None
