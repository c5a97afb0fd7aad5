"""SaveAt: what the solve keeps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SaveAt"]


@dataclass(frozen=True)
class SaveAt:
    """Which values a solve returns.

    Saved times are returned in time order: ``t0`` (if asked), then ``ts``, then ``t1`` (if
    asked); with ``steps=True`` the end of every accepted step is saved instead of ``ts``.

    Args:
        t0: save the initial value.
        t1: save the final value (the default when nothing else is asked for).
        ts: times to save at, monotone in the direction of integration and inside ``[t0, t1]``.
            A 1-D sequence/tensor, or in per-sample mode a ``(batch, T)`` tensor (one row of save
            times per sample). Values between steps come from the solver's dense output.
        steps: save after every accepted step (``Solution.ts`` then has one entry per step; in
            per-sample mode rows are padded with NaN past each sample's last step).
        dense: keep the dense output of every step so ``Solution.evaluate(t)`` and
            ``Solution.derivative(t)`` work anywhere in ``[t0, t1]``.
    """

    t0: bool = False
    t1: bool = False
    ts: Sequence[float] | Any | None = None
    steps: bool = False
    dense: bool = False

    def __post_init__(self):
        if self.steps and self.ts is not None:
            raise ValueError("SaveAt(steps=True) and SaveAt(ts=...) cannot be combined; choose one")
        if not (self.t0 or self.t1 or self.ts is not None or self.steps or self.dense):
            object.__setattr__(self, "t1", True)
