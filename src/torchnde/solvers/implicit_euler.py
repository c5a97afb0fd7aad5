"""Implicit (backward) Euler with an embedded trapezoidal error estimate."""

from ._implicit import AbstractESDIRK, DIRKTableau

__all__ = ["ImplicitEuler"]

IMPLICIT_EULER_TABLEAU = DIRKTableau(
    a=((), (0.0,)),
    gamma=1.0,
    b_hat=(0.5, 0.5),  # the trapezoidal rule on the same two stages
)


class ImplicitEuler(AbstractESDIRK):
    r"""Implicit Euler: :math:`y_1 = y_0 + h f(t_1, y_1)`. L-stable, order 1.

    Error estimate: the difference to the trapezoidal rule on the same stages,
    :math:`\tfrac h2 (f(t_1, y_1) - f(t_0, y_0))` (local error :math:`O(h^2)`, so
    ``error_order = 1``), filtered by :math:`(I - hJ)^{-1}` (Shampine's filter, Hairer & Wanner
    IV.8) so that stiff components, which implicit Euler damps correctly, do not dominate it. No
    extra evaluations: :math:`f(t_0, y_0)` is carried from the previous step. Dense output is cubic
    Hermite (order 1, limited by the step).
    """

    tableau = IMPLICIT_EULER_TABLEAU
    filter_error = True
    order = 1
    error_order = 1
    dense_order = 1
