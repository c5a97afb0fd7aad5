"""``solve(..., compile=True)``: the solver's step, with the vector field, through ``torch.compile``."""

from __future__ import annotations

__all__ = ["compiled_step"]


def compiled_step(solver, term, problem):
    """The step function the loop calls (``solver.step``'s signature), compiled."""
    raise NotImplementedError("solve(..., compile=True) is not implemented yet")
