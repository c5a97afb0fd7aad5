"""Constant step sizes."""

from __future__ import annotations

from ._base import AbstractController

__all__ = ["ConstantStepSize", "StepTo"]


class ConstantStepSize(AbstractController):
    """Take steps of size ``dt0`` (the ``solve`` argument); every step is accepted.

    The last step is shortened to land on ``t1`` exactly. This is the default controller for
    solvers without an error estimate.
    """

    fixed_grid = True

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


class StepTo(ConstantStepSize):
    """Steps from each time of ``ts`` to the next: a fixed, possibly non-uniform grid.

    ``ts`` is a 1-D sequence of strictly monotone times (in the direction of the solve); the solve
    steps to every one of them that lies inside ``(t0, t1)``, and from the last one to ``t1``.
    ``dt0`` may be omitted (every step then ends on a grid time); if given, it caps the steps in
    between. Typical use: a diffusion sampler's time grid, e.g.
    ``solve(term, DPMSolver(...), t1, t0, x, controller=StepTo(logsnr_times(process, 10)))``.
    """

    def __init__(self, ts):
        import torch

        ts = torch.as_tensor(ts, dtype=torch.float64).detach().cpu().flatten()
        if ts.numel() < 1 or not torch.isfinite(ts).all():
            raise ValueError("StepTo needs at least one finite time")
        d = ts[1:] - ts[:-1]
        if ts.numel() > 1 and not ((d > 0).all() or (d < 0).all()):
            raise ValueError("StepTo's times must be strictly increasing or strictly decreasing")
        self.step_ts = ts

    def init(self, term, solver, t0, t1, y0, f0, dt0, ops):
        if dt0 is None:
            dt0 = t1 - t0  # the whole interval: the grid's stop times cut it into the steps
        return super().init(term, solver, t0, t1, y0, f0, dt0, ops)

    def __repr__(self):
        return f"StepTo({self.step_ts.numel()} times)"
