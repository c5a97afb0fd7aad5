"""Neural-network building blocks on top of :func:`torchnde.solve`."""

from ._hippo import hippo_fout, hippo_lagt, hippo_legs, hippo_legt
from ._latent_sde import LatentSDE, LatentSDEOutput
from ._liquid import LTC, CfC
from ._neural_cde import NeuralCDE
from ._neural_ode import NeuralODE
from ._neural_sde import NeuralSDE
from ._odernn import ODERNN, GRUODEField
from ._ssm import S4D, S5, diagonal_scan, discretise_diagonal

__all__ = [
    "NeuralODE",
    "NeuralSDE",
    "NeuralCDE",
    "LatentSDE",
    "LatentSDEOutput",
    "S4D",
    "CfC",
    "LTC",
    "ODERNN",
    "GRUODEField",
    "S5",
    "diagonal_scan",
    "discretise_diagonal",
    "hippo_legs",
    "hippo_legt",
    "hippo_lagt",
    "hippo_fout",
]
