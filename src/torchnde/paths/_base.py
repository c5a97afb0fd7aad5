"""Paths: things with increments over time, which drive control terms.

A path ``X`` is queried by ``evaluate(s, t)`` for its increment ``X(t) - X(s)`` (``s > t`` is
allowed and gives the negated increment), or ``evaluate(s)`` for its value ``X(s)`` (Brownian
motion starts at zero at its ``t0``). Times are Python floats or 0-d tensors; in per-sample mode
``(batch,)`` tensors, one time per sample, and the leading dimension of every returned tensor is
the batch.

Two kinds:

* *smooth* paths (interpolations of data) also have ``derivative(t)``; a control term driven by
  one is solved as the ODE ``dy/dt = g(t, y) dX/dt`` by any ODE solver at full order.
* *rough* paths (Brownian motion) have no derivative; a control term driven by one is an SDE and
  needs an SDE solver. Brownian paths also give Lévy areas through ``increment(s, t)``.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

__all__ = ["AbstractPath", "AbstractBrownianPath", "BrownianIncrement"]


class AbstractPath:
    """A path with increments ``evaluate(s, t) = X(t) - X(s)``."""

    #: True if the path has a derivative (interpolated data), False for Brownian motion.
    smooth: ClassVar[bool] = True

    #: the interval the path is defined on (Python floats)
    t0: float
    t1: float

    def evaluate(self, s, t=None) -> Any:  # pragma: no cover - interface
        """``X(t) - X(s)``, or ``X(s)`` when ``t`` is None."""
        raise NotImplementedError

    def derivative(self, t, left: bool = False) -> Any:  # pragma: no cover - interface
        """``dX/dt`` at ``t`` (smooth paths only); at a knot of a piecewise path the derivative of
        the piece to the right, or with ``left=True`` the one to the left."""
        raise NotImplementedError


class BrownianIncrement(NamedTuple):
    """What a Brownian path gives over ``[s, t]`` with ``h = t - s``.

    ``W``: the increment ``W(t) - W(s)``. ``H``: the space-time Lévy area
    ``(1/h) int_s^t (W(u) - W(s) - (u - s)/h W) du`` (or None if the path was built without it);
    ``K``: the space-time-time Lévy area (or None). Each has the path's shape (tree).
    """

    dt: Any
    W: Any
    H: Any = None
    K: Any = None


class AbstractBrownianPath(AbstractPath):
    """Brownian motion as a path: ``evaluate`` gives increments; ``increment`` gives increments
    together with the Lévy areas the path was built with (``levy_area``)."""

    smooth: ClassVar[bool] = False
    levy_area: str | None = None  # None, "space-time" or "space-time-time"
    shape: Any  # torch.Size or a tree of them

    def increment(self, s, t) -> BrownianIncrement:  # pragma: no cover - interface
        raise NotImplementedError

    def derivative(self, t, left: bool = False):
        raise TypeError("Brownian motion has no derivative; solve a ControlTerm on it with an SDE solver")
