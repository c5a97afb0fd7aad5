"""How gradients flow through a solve: one ``adjoint=`` argument, several methods."""

from ._backsolve import BacksolveAdjoint
from ._base import AbstractAdjoint, DirectAdjoint
from ._checkpoint import CheckpointAdjoint
from ._reversible import AbstractReversibleSolver, ReversibleAdjoint, ReversibleHeun

__all__ = [
    "AbstractAdjoint",
    "DirectAdjoint",
    "CheckpointAdjoint",
    "BacksolveAdjoint",
    "ReversibleAdjoint",
    "ReversibleHeun",
    "AbstractReversibleSolver",
]
