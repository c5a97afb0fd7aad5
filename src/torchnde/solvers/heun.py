"""Heun's method (explicit trapezoidal rule) with Euler as the embedded method."""

from fractions import Fraction as F

from ._base import AbstractAdaptiveERK
from ._tableau import ButcherTableau

__all__ = ["Heun"]


class Heun(AbstractAdaptiveERK):
    """Heun's method, order 2, with an embedded Euler (order 1) error estimate.

    Usable with constant steps or adaptively. Cubic Hermite dense output.

    On an SDE it is the stochastic Heun method (every stage uses the step's Brownian increment):
    Stratonovich, strong order 0.5 for general noise and 1 for commutative (diagonal, scalar,
    additive) noise; with :class:`~torchnde.PIDController` it adapts its steps on the embedded
    Euler estimate, rejected steps re-querying the same Brownian path.
    """

    tableau = ButcherTableau(
        c=(F(0), F(1)),
        a=((), (F(1),)),
        b=(F(1, 2), F(1, 2)),
        b_error=(F(-1, 2), F(1, 2)),
    )
    order = 2
    error_order = 1
    calculus = "stratonovich"
    strong_order = {"general": 0.5, "commutative": 1.0}
    dense_order = 2
