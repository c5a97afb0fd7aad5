"""Kennedy & Carpenter's ARK4(3)6L[2]SA additive Runge--Kutta (IMEX) pair.

C. A. Kennedy and M. H. Carpenter, "Additive Runge--Kutta schemes for convection--diffusion--
reaction equations", Applied Numerical Mathematics 44(1--2), 139--181 (2003): the published
rational coefficients of the explicit and the ESDIRK tableau (shared nodes and weights) and the
third-order dense-output weights.
"""

from fractions import Fraction as F

from ._imex import AbstractKenCarp, ARKTableau
from ._implicit import DIRKTableau

__all__ = ["KenCarp4"]

_G = F(1, 4)
_B = (F(82889, 524892), 0, F(15625, 83664), F(69875, 102672), F(-2260, 8211))

KENCARP4_TABLEAU = ARKTableau(
    explicit=(
        (),
        (F(1, 2),),
        (F(13861, 62500), F(6889, 62500)),
        (F(-116923316275, 2393684061468), F(-2731218467317, 15368042101831), F(9408046702089, 11113171139209)),
        (
            F(-451086348788, 2902428689909),
            F(-2682348792572, 7519795681897),
            F(12662868775082, 11960479115383),
            F(3355817975965, 11060851509271),
        ),
        (
            F(647845179188, 3216320057751),
            F(73281519250, 8382639484533),
            F(552539513391, 3454668386233),
            F(3354512671639, 8306763924573),
            F(4040, 17871),
        ),
    ),
    implicit=DIRKTableau(
        a=(
            (),
            (_G,),
            (F(8611, 62500), F(-1743, 31250)),
            (F(5012029, 34652500), F(-654441, 2922500), F(174375, 388108)),
            (F(15267082809, 155376265600), F(-71443401, 120774400), F(730878875, 902184768), F(2285395, 8070912)),
            _B,
        ),
        gamma=float(_G),
        b_hat=(
            F(4586570599, 29645900160),
            0,
            F(178811875, 945068544),
            F(814220225, 1159782912),
            F(-3700637, 11593932),
            F(61727, 225920),
        ),
    ),
    # b_j(theta) = sum_p dense[j][p] theta^(p + 1)
    dense=(
        (F(6943876665148, 7220017795957), F(-54480133, 30881146), F(6818779379841, 7100303317025)),
        (0, 0, 0),
        (F(7640104374378, 9702883013639), F(-11436875, 14766696), F(2173542590792, 12501825683035)),
        (F(-20649996744609, 7521556579894), F(174696575, 18121608), F(-31592104683404, 5083833661969)),
        (F(8854892464581, 2390941311638), F(-12120380, 966161), F(61146701046299, 7138195549469)),
        (F(-11397109935349, 6675773540249), F(3843, 706), F(-17219254887155, 4939391667607)),
    ),
)


class KenCarp4(AbstractKenCarp):
    """Kennedy & Carpenter's ARK4(3)6L[2]SA IMEX pair (2003).

    For ``MultiTerm(ODETerm(f_explicit), ODETerm(f_implicit))``: six stages, explicit for the
    first term and ESDIRK (L-stable, stiffly accurate, ``gamma = 1/4``) for the second; order 4
    with an embedded order-3 solution; the published third-order dense output. A plain
    ``ODETerm`` is integrated as entirely implicit.
    """

    ark = KENCARP4_TABLEAU
    tableau = KENCARP4_TABLEAU.implicit
    order = 4
    error_order = 3
    dense_order = 3
