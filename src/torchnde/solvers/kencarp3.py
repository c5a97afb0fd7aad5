"""Kennedy & Carpenter's ARK3(2)4L[2]SA additive Runge--Kutta (IMEX) pair.

C. A. Kennedy and M. H. Carpenter, "Additive Runge--Kutta schemes for convection--diffusion--
reaction equations", Applied Numerical Mathematics 44(1--2), 139--181 (2003): the published
rational coefficients of the explicit and the ESDIRK tableau (shared nodes and weights).
"""

from fractions import Fraction as F

from ._imex import AbstractKenCarp, ARKTableau
from ._implicit import DIRKTableau

__all__ = ["KenCarp3"]

_G = F(1767732205903, 4055673282236)
_B = (F(1471266399579, 7840856788654), F(-4482444167858, 7529755066697), F(11266239266428, 11593286722821))

KENCARP3_TABLEAU = ARKTableau(
    explicit=(
        (),
        (2 * _G,),
        (F(5535828885825, 10492691773637), F(788022342437, 10882634858940)),
        (F(6485989280629, 16251701735622), F(-4246266847089, 9704473918619), F(10755448449292, 10357097424841)),
    ),
    implicit=DIRKTableau(
        a=((), (_G,), (F(2746238789719, 10658868560708), F(-640167445237, 6845629431997)), _B),
        gamma=float(_G),
        b_hat=(
            F(2756255671327, 12835298489170),
            F(-10771552573575, 22201958757719),
            F(9247589265047, 10645013368117),
            F(2193209047091, 5459859503100),
        ),
    ),
    dense=None,  # the published interpolant is second order; cubic Hermite is third
)


class KenCarp3(AbstractKenCarp):
    """Kennedy & Carpenter's ARK3(2)4L[2]SA IMEX pair (2003).

    For ``MultiTerm(ODETerm(f_explicit), ODETerm(f_implicit))``: four stages, explicit for the
    first term and ESDIRK (L-stable, stiffly accurate, ``gamma ~ 0.436``) for the second; order 3
    with an embedded order-2 solution; cubic Hermite dense output. A plain ``ODETerm`` is
    integrated as entirely implicit.
    """

    ark = KENCARP3_TABLEAU
    tableau = KENCARP3_TABLEAU.implicit
    order = 3
    error_order = 2
    dense_order = 3
