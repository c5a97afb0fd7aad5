"""Neural-network building blocks on top of :func:`torchnde.solve`."""

from ._neural_ode import NeuralODE

__all__ = ["NeuralODE"]
