"""Constant step sizes."""

from __future__ import annotations

from ._base import AbstractController

__all__ = ["ConstantStepSize"]


class ConstantStepSize(AbstractController):
    """Take steps of size ``dt0`` (the ``solve`` argument); every step is accepted.

    The last step is shortened to land on ``t1`` exactly. This is the default controller for
    solvers without an error estimate.
    """

    def init(self, term, solver, t0, t1, y0, f0, dt0, ops):
        if dt0 is None:
            raise ValueError(
                "ConstantStepSize needs a step size: pass dt0=... to solve() (or use an adaptive "
                "solver such as Tsit5() with PIDController(rtol=..., atol=...))"
            )
        dt = ops.full(dt0)
        return dt, dt

    def adapt(self, t0, t1, y0, y1, y_error, error_order, cstate, ops):
        return ops.true(), cstate, cstate, None

    def __repr__(self):
        return "ConstantStepSize()"
