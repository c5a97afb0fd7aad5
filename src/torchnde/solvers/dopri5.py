"""Tableau of the Dormand--Prince 5(4) pair ("DOPRI5", RK5(4)7M).

Method: J. R. Dormand and P. J. Prince, "A family of embedded Runge--Kutta formulae",
Journal of Computational and Applied Mathematics 6(1), 19--26 (1980).

Dense output: the fourth-order continuous extension of L. F. Shampine, "Some practical
Runge--Kutta formulas", Mathematics of Computation 46(173), 135--150 (1986), in the form used by
the DOPRI5 code of E. Hairer, S. P. Nørsett and G. Wanner, *Solving Ordinary Differential
Equations I* (2nd ed., Springer, 1993), Section II.6.

Seven stages; the seventh is evaluated at ``(t0 + h, y1)`` (FSAL), and its weight in ``b`` is
zero. The fifth-order solution is propagated; ``b_error = b - b_hat`` with ``b_hat`` the
fourth-order weights. Row ``j`` of ``dense`` holds the monomial coefficients of ``b_j(theta)``
(powers 1..4), obtained by expanding Hairer's nested form exactly; at ``theta = 1`` each row sums
to ``b[j]``.
"""

from fractions import Fraction

from ._base import AbstractAdaptiveERK
from ._tableau import ButcherTableau

DOPRI5_TABLEAU = ButcherTableau(
    c=(0, Fraction(1, 5), Fraction(3, 10), Fraction(4, 5), Fraction(8, 9), 1, 1),
    a=(
        (),
        (Fraction(1, 5),),
        (Fraction(3, 40), Fraction(9, 40)),
        (Fraction(44, 45), Fraction(-56, 15), Fraction(32, 9)),
        (
            Fraction(19372, 6561),
            Fraction(-25360, 2187),
            Fraction(64448, 6561),
            Fraction(-212, 729),
        ),
        (
            Fraction(9017, 3168),
            Fraction(-355, 33),
            Fraction(46732, 5247),
            Fraction(49, 176),
            Fraction(-5103, 18656),
        ),
        (
            Fraction(35, 384),
            0,
            Fraction(500, 1113),
            Fraction(125, 192),
            Fraction(-2187, 6784),
            Fraction(11, 84),
        ),
    ),
    b=(
        Fraction(35, 384),
        0,
        Fraction(500, 1113),
        Fraction(125, 192),
        Fraction(-2187, 6784),
        Fraction(11, 84),
        0,
    ),
    b_error=(
        Fraction(71, 57600),
        0,
        Fraction(-71, 16695),
        Fraction(71, 1920),
        Fraction(-17253, 339200),
        Fraction(22, 525),
        Fraction(-1, 40),
    ),
    fsal=True,
    dense=(
        (
            1,
            Fraction(-8048581381, 2820520608),
            Fraction(8663915743, 2820520608),
            Fraction(-12715105075, 11282082432),
        ),
        (0, 0, 0, 0),
        (
            0,
            Fraction(131558114200, 32700410799),
            Fraction(-68118460800, 10900136933),
            Fraction(87487479700, 32700410799),
        ),
        (
            0,
            Fraction(-1754552775, 470086768),
            Fraction(14199869525, 1410260304),
            Fraction(-10690763975, 1880347072),
        ),
        (
            0,
            Fraction(127303824393, 49829197408),
            Fraction(-318862633887, 49829197408),
            Fraction(701980252875, 199316789632),
        ),
        (
            0,
            Fraction(-282668133, 205662961),
            Fraction(2019193451, 616988883),
            Fraction(-1453857185, 822651844),
        ),
        (
            0,
            Fraction(40617522, 29380423),
            Fraction(-110615467, 29380423),
            Fraction(69997945, 29380423),
        ),
    ),
)


class Dopri5(AbstractAdaptiveERK):
    """Dormand--Prince 5(4) (Dormand & Prince 1980), the default of MATLAB's ``ode45``.

    Order 5 with an embedded order-4 error estimate, FSAL (six evaluations per step), 4th-order
    dense output (Shampine 1986).
    """

    tableau = DOPRI5_TABLEAU
    order = 5
    error_order = 4
    dense_order = 4
