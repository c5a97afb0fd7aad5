"""torchnde: neural differential equations in PyTorch.

One :func:`solve` for every problem: terms integrated by a solver, with step-size control,
saving, gradients and failure handling passed in as small policy objects.
"""

from ._events import Event, EventRecord
from ._results import Result, SolveError
from ._saveat import SaveAt
from ._solution import Solution
from ._solve import solve
from ._terms import AbstractTerm, ControlTerm, MultiTerm, ODETerm
from .adjoints import (
    AbstractAdjoint,
    BacksolveAdjoint,
    CheckpointAdjoint,
    DirectAdjoint,
    ReversibleAdjoint,
    ReversibleHeun,
)
from .controllers import AbstractController, ConstantStepSize, PIDController, StepTo
from .paths import (
    AbstractBrownianPath,
    AbstractPath,
    BrownianGrid,
    BrownianIncrement,
    CubicSpline,
    HermiteCubic,
    LinearInterpolation,
    RectilinearInterpolation,
    VirtualBrownianTree,
)
from .solvers import (
    IMPLICIT_SOLVERS,
    RK4,
    SDE_SOLVERS,
    SOLVERS,
    SRA1,
    AbstractAdaptiveSolver,
    AbstractSolver,
    Bosh3,
    ButcherTableau,
    Dopri5,
    Dopri8,
    Euler,
    EulerHeun,
    Heun,
    ImplicitEuler,
    ItoMilstein,
    Kvaerno3,
    Kvaerno4,
    Kvaerno5,
    Midpoint,
    Ralston,
    ShARK,
    SPaRK,
    StratonovichMilstein,
    Tsit5,
)

__version__ = "0.1.0"

__all__ = [
    "solve",
    "Solution",
    "Event",
    "EventRecord",
    "SaveAt",
    "Result",
    "SolveError",
    "AbstractTerm",
    "ODETerm",
    "ControlTerm",
    "MultiTerm",
    "AbstractPath",
    "AbstractBrownianPath",
    "BrownianIncrement",
    "VirtualBrownianTree",
    "BrownianGrid",
    "LinearInterpolation",
    "RectilinearInterpolation",
    "HermiteCubic",
    "CubicSpline",
    "AbstractSolver",
    "AbstractAdaptiveSolver",
    "ButcherTableau",
    "SOLVERS",
    "SDE_SOLVERS",
    "IMPLICIT_SOLVERS",
    "Euler",
    "Heun",
    "Midpoint",
    "Ralston",
    "RK4",
    "Bosh3",
    "Dopri5",
    "Tsit5",
    "Dopri8",
    "ImplicitEuler",
    "Kvaerno3",
    "Kvaerno4",
    "Kvaerno5",
    "EulerHeun",
    "ItoMilstein",
    "StratonovichMilstein",
    "SRA1",
    "ShARK",
    "SPaRK",
    "AbstractController",
    "ConstantStepSize",
    "StepTo",
    "PIDController",
    "AbstractAdjoint",
    "DirectAdjoint",
    "CheckpointAdjoint",
    "BacksolveAdjoint",
    "ReversibleAdjoint",
    "ReversibleHeun",
]
