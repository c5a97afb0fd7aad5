"""Bogacki--Shampine 3(2) pair."""

from fractions import Fraction as F

from ._base import AbstractAdaptiveERK
from ._tableau import ButcherTableau

__all__ = ["Bosh3"]


class Bosh3(AbstractAdaptiveERK):
    """Bogacki & Shampine (1989) 3(2) FSAL pair (MATLAB's ``ode23``).

    Order 3 with an embedded order-2 error estimate; cubic Hermite dense output (order 3).
    """

    tableau = ButcherTableau(
        c=(F(0), F(1, 2), F(3, 4), F(1)),
        a=((), (F(1, 2),), (F(0), F(3, 4)), (F(2, 9), F(1, 3), F(4, 9))),
        b=(F(2, 9), F(1, 3), F(4, 9), F(0)),
        b_error=(F(2, 9) - F(7, 24), F(1, 3) - F(1, 4), F(4, 9) - F(1, 3), F(0) - F(1, 8)),
        fsal=True,
    )
    order = 3
    error_order = 2
    dense_order = 3
