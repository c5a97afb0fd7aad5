"""Kværnø's ESDIRK 3(2) method.

A. Kværnø, "Singly diagonally implicit Runge--Kutta methods with an explicit first stage",
BIT Numerical Mathematics 44(3), 489--502 (2004). The coefficients are the paper's closed forms in
``gamma``, the root of the L-stability condition (the paper's 10-digit value).
"""

from ._implicit import AbstractESDIRK, DIRKTableau

__all__ = ["Kvaerno3"]

_G = 0.4358665215
_A31 = (-4 * _G**2 + 6 * _G - 1) / (4 * _G)
_A32 = (-2 * _G + 1) / (4 * _G)
_A41 = (6 * _G - 1) / (12 * _G)
_A42 = -1 / ((24 * _G - 12) * _G)
_A43 = (-6 * _G**2 + 6 * _G - 1) / (6 * _G - 3)

KVAERNO3_TABLEAU = DIRKTableau(
    a=((), (_G,), (_A31, _A32), (_A41, _A42, _A43)),
    gamma=_G,
    b_hat=(_A31, _A32, _G, 0.0),  # the third stage: order 2 at c = 1
)


class Kvaerno3(AbstractESDIRK):
    """Kværnø's 3(2) ESDIRK method (Kværnø 2004): L-stable and stiffly accurate.

    Four stages (the first explicit and reused from the previous step, three implicit with
    diagonal ``gamma ~ 0.436``); order 3 with an embedded order-2 solution (the third stage);
    cubic Hermite dense output. For stiff problems at loose to moderate tolerances.
    """

    tableau = KVAERNO3_TABLEAU
    order = 3
    error_order = 2
    dense_order = 3
