"""The explicit midpoint method."""

from fractions import Fraction as F

from ._base import AbstractERK
from ._tableau import ButcherTableau

__all__ = ["Midpoint"]


class Midpoint(AbstractERK):
    """Explicit midpoint rule, order 2, fixed steps, cubic Hermite dense output.

    On an SDE: the stochastic midpoint method, Stratonovich, strong order 0.5 for general noise and
    1 for commutative noise.
    """

    tableau = ButcherTableau(c=(F(0), F(1, 2)), a=((), (F(1, 2),)), b=(F(0), F(1)))
    order = 2
    calculus = "stratonovich"
    strong_order = {"general": 0.5, "commutative": 1.0}
    dense_order = 2
