"""Continuous-time generative models on the solver core (in progress: issue 5).

Score-based diffusion processes, parameterisations, analytic oracles and samplers, each a term
plus a solver for :func:`torchnde.solve` (no integration loop of its own). Likelihoods, continuous
normalizing flows and the flow-matching family are being added.
"""

from .oracles import GaussianData, GaussianMixtureData
from .parameterisation import KINDS, Parameterisation
from .processes import EDM, PROCESSES, VE, VP, DiffusionProcess, MeanReverting, SubVP
from .samplers import SAMPLERS, LangevinCorrector, SampleResult, sample

__all__ = [
    "DiffusionProcess",
    "VP",
    "VE",
    "SubVP",
    "EDM",
    "MeanReverting",
    "PROCESSES",
    "Parameterisation",
    "KINDS",
    "GaussianData",
    "GaussianMixtureData",
    "sample",
    "SampleResult",
    "SAMPLERS",
    "LangevinCorrector",
]
