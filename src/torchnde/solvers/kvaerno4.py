"""Kværnø's ESDIRK 4(3) method.

A. Kværnø, "Singly diagonally implicit Runge--Kutta methods with an explicit first stage",
BIT Numerical Mathematics 44(3), 489--502 (2004): the 4/3 pair that advances with the
fourth-order last stage, with the paper's closed forms in ``gamma`` and its value of ``gamma`` for
that variant.
"""

from ._implicit import AbstractESDIRK, DIRKTableau

__all__ = ["Kvaerno4"]

_G = 0.5728160625


def _p(*coeffs):
    """The polynomial with these coefficients (highest power first) at gamma."""
    out = 0.0
    for c in coeffs:
        out = out * _G + c
    return out


_A31 = _p(144, -180, 81, -15, 1) * _G / _p(12, -6, 1) ** 2
_A32 = _p(-36, 39, -15, 2) * _G / _p(12, -6, 1) ** 2
_A41 = _p(-144, 396, -330, 117, -18, 1) / (12 * _G**2 * _p(12, -9, 2))
_A42 = _p(72, -126, 69, -15, 1) / (12 * _G**2 * _p(3, -1))
_A43 = _p(-6, 6, -1) * _p(12, -6, 1) ** 2 / (12 * _G**2 * _p(12, -9, 2) * _p(3, -1))
_A51 = _p(288, -312, 120, -18, 1) / (48 * _G**2 * _p(12, -9, 2))
_A52 = _p(24, -12, 1) / (48 * _G**2 * _p(3, -1))
_A53 = -(_p(12, -6, 1) ** 3) / (48 * _G**2 * _p(3, -1) * _p(12, -9, 2) * _p(6, -6, 1))
_A54 = _p(-24, 36, -12, 1) / _p(24, -24, 4)

KVAERNO4_TABLEAU = DIRKTableau(
    a=((), (_G,), (_A31, _A32), (_A41, _A42, _A43), (_A51, _A52, _A53, _A54)),
    gamma=_G,
    b_hat=(_A41, _A42, _A43, _G, 0.0),  # the fourth stage: order 3 at c = 1
)


class Kvaerno4(AbstractESDIRK):
    """Kværnø's 4(3) ESDIRK method (Kværnø 2004): L-stable and stiffly accurate.

    Five stages (the first explicit, four implicit with diagonal ``gamma ~ 0.573``); order 4 with
    an embedded order-3 solution (the fourth stage); cubic Hermite dense output.
    """

    tableau = KVAERNO4_TABLEAU
    order = 4
    error_order = 3
    dense_order = 3
