"""Numerical methods. ``SOLVERS`` lists every solver; the generic tests iterate over it."""

from ._base import AbstractAdaptiveERK, AbstractAdaptiveSolver, AbstractERK, AbstractSolver
from ._imex import AbstractKenCarp
from ._implicit import AbstractESDIRK
from ._rosenbrock import AbstractRosenbrock
from ._tableau import ButcherTableau
from .auto_switch import AutoSwitch
from .bosh3 import Bosh3
from .dopri5 import Dopri5
from .dopri8 import Dopri8
from .euler import Euler
from .euler_heun import EulerHeun
from .heun import Heun
from .implicit_euler import ImplicitEuler
from .kencarp3 import KenCarp3
from .kencarp4 import KenCarp4
from .kencarp5 import KenCarp5
from .kvaerno3 import Kvaerno3
from .kvaerno4 import Kvaerno4
from .kvaerno5 import Kvaerno5
from .midpoint import Midpoint
from .milstein import ItoMilstein, StratonovichMilstein
from .ralston import Ralston
from .reversible_heun import AbstractReversibleSolver, ReversibleHeun
from .rk4 import RK4
from .rodas5p import Rodas5P
from .rosenbrock23 import Rosenbrock23
from .shark import ShARK
from .spark import SPaRK
from .sra1 import SRA1
from .srid2 import SRID2
from .tsit5 import Tsit5

SOLVERS = (Euler, Heun, Midpoint, Ralston, RK4, Bosh3, Dopri5, Tsit5, Dopri8)
#: implicit (ESDIRK) solvers for stiff ODEs: simplified Newton with Jacobian and LU reuse
IMPLICIT_SOLVERS = (ImplicitEuler, Kvaerno3, Kvaerno4, Kvaerno5)
#: additive (IMEX) Runge--Kutta pairs: MultiTerm(ODETerm(f_explicit), ODETerm(f_implicit)), explicit
#: for the first term and ESDIRK for the second (a plain ODETerm is integrated as all implicit)
IMEX_SOLVERS = (KenCarp3, KenCarp4, KenCarp5)
#: Rosenbrock (linearly implicit) solvers for stiff ODEs: one Jacobian and one LU a step, no
#: Newton iterations
ROSENBROCK_SOLVERS = (Rosenbrock23, Rodas5P)
#: every solver of SDEs (each declares ``strong_order``, ``calculus`` and ``levy_area``)
SDE_SOLVERS = (
    Euler,
    Heun,
    Midpoint,
    ReversibleHeun,
    EulerHeun,
    ItoMilstein,
    StratonovichMilstein,
    SRA1,
    ShARK,
    SPaRK,
)

__all__ = [
    "AbstractSolver",
    "AbstractAdaptiveSolver",
    "AbstractERK",
    "AbstractAdaptiveERK",
    "ButcherTableau",
    "Euler",
    "Heun",
    "Midpoint",
    "Ralston",
    "RK4",
    "Bosh3",
    "Dopri5",
    "Tsit5",
    "Dopri8",
    "SOLVERS",
    "SDE_SOLVERS",
    "IMPLICIT_SOLVERS",
    "IMEX_SOLVERS",
    "ROSENBROCK_SOLVERS",
    "AutoSwitch",
    "AbstractRosenbrock",
    "Rosenbrock23",
    "Rodas5P",
    "AbstractESDIRK",
    "ImplicitEuler",
    "Kvaerno3",
    "Kvaerno4",
    "Kvaerno5",
    "AbstractKenCarp",
    "KenCarp3",
    "KenCarp4",
    "KenCarp5",
    "AbstractReversibleSolver",
    "ReversibleHeun",
    "EulerHeun",
    "ItoMilstein",
    "StratonovichMilstein",
    "SRA1",
    "SRID2",
    "ShARK",
    "SPaRK",
]
