"""Neural-network building blocks on top of :func:`torchnde.solve`."""

from ._neural_cde import NeuralCDE
from ._neural_ode import NeuralODE

__all__ = ["NeuralODE", "NeuralCDE"]
