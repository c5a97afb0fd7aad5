"""Steps along a given grid (internal use: replays and fixed grids)."""

from __future__ import annotations

from ._base import AbstractController

__all__ = ["StepEnds"]


class StepEnds(AbstractController):
    """Steps that end at the given times (internal, increasing), every step accepted.

    Used to replay a recorded discretisation (``CheckpointAdjoint``) and for fixed grids given as
    times (``torchnde.compat.torchdiffeq``). The last step also lands on ``t1``.
    """

    fixed_grid = True

    def __init__(self, ends: list):
        self.ends = ends

    def init(self, term, solver, t0, t1, y0, f0, dt0, ops):
        return self.ends[0] - t0, 0

    def adapt(self, t0, t1, y0, y1, y_error, error_order, i, ops):
        i += 1
        nxt = self.ends[i] - t1 if i < len(self.ends) else t1 - t0
        return True, nxt, i, None

    def __repr__(self):
        return f"StepEnds({len(self.ends)} steps)"
