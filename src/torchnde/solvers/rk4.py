"""The classical fourth-order Runge--Kutta method."""

from fractions import Fraction as F

from ._base import AbstractERK
from ._tableau import ButcherTableau

__all__ = ["RK4"]


class RK4(AbstractERK):
    """Classical RK4 (Kutta 1901), order 4, fixed steps, cubic Hermite dense output (order 3)."""

    tableau = ButcherTableau(
        c=(F(0), F(1, 2), F(1, 2), F(1)),
        a=((), (F(1, 2),), (F(0), F(1, 2)), (F(0), F(0), F(1))),
        b=(F(1, 6), F(1, 3), F(1, 3), F(1, 6)),
    )
    order = 4
    dense_order = 3
