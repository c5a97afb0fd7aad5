"""Neural-network building blocks on top of :func:`torchnde.solve`."""

from ._latent_sde import LatentSDE, LatentSDEOutput
from ._neural_cde import NeuralCDE
from ._neural_ode import NeuralODE
from ._neural_sde import NeuralSDE

__all__ = ["NeuralODE", "NeuralSDE", "NeuralCDE", "LatentSDE", "LatentSDEOutput"]
