"""Ralston's second-order method (minimum local error bound among 2-stage methods)."""

from fractions import Fraction as F

from ._base import AbstractERK
from ._tableau import ButcherTableau

__all__ = ["Ralston"]


class Ralston(AbstractERK):
    """Ralston (1962), order 2, fixed steps, cubic Hermite dense output."""

    tableau = ButcherTableau(c=(F(0), F(2, 3)), a=((), (F(2, 3),)), b=(F(1, 4), F(3, 4)))
    order = 2
    dense_order = 2
