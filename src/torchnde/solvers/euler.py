"""Euler's method (explicit, order 1)."""

from fractions import Fraction as F

from ._base import AbstractERK
from ._tableau import ButcherTableau

__all__ = ["Euler"]


class Euler(AbstractERK):
    """Explicit Euler: ``y1 = y0 + h f(t0, y0)``. Order 1, fixed steps, cubic Hermite dense output.

    On an SDE (a :class:`~torchnde.ControlTerm` on Brownian motion) it is Euler--Maruyama,
    ``y1 = y0 + f h + g dW``: Itô, strong order 0.5 (1 with additive noise), any noise.
    """

    tableau = ButcherTableau(c=(F(0),), a=((),), b=(F(1),))
    order = 1
    calculus = "ito"
    strong_order = {"general": 0.5, "additive": 1.0}
    dense_order = 1
