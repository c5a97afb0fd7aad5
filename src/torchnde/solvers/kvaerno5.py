"""Kværnø's ESDIRK 5(4) method.

A. Kværnø, "Singly diagonally implicit Runge--Kutta methods with an explicit first stage",
BIT Numerical Mathematics 44(3), 489--502 (2004): the 5/4 pair with ``gamma = 0.26``, the paper's
decimal coefficients (17 significant digits).
"""

from ._implicit import AbstractESDIRK, DIRKTableau

__all__ = ["Kvaerno5"]

_G = 0.26

KVAERNO5_TABLEAU = DIRKTableau(
    a=(
        (),
        (_G,),
        (0.13, 0.84033320996790809),
        (0.22371961478320505, 0.47675532319799699, -0.06470895363112615),
        (0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998),
        (0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676),
        (
            0.13659751177640291,
            0.0,
            -0.05496908796538376,
            -0.04118626728321046,
            0.62993304899016403,
            0.06962479448202728,
        ),
    ),
    gamma=_G,
    # the sixth stage: order 4 at c = 1
    b_hat=(0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676, _G, 0.0),
)


class Kvaerno5(AbstractESDIRK):
    """Kværnø's 5(4) ESDIRK method (Kværnø 2004): L-stable and stiffly accurate.

    Seven stages (the first explicit, six implicit with diagonal ``gamma = 0.26``); order 5 with
    an embedded order-4 solution (the sixth stage); cubic Hermite dense output. The method of
    choice for stiff problems at tight tolerances. One stage is evaluated at ``t0 + 1.23 h``,
    past the end of the step.
    """

    tableau = KVAERNO5_TABLEAU
    order = 5
    error_order = 4
    dense_order = 3
