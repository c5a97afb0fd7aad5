"""Continuous-time generative models on the solver core.

Score-based diffusion processes, parameterisations, analytic oracles and samplers; likelihoods
through the instantaneous change of variables and continuous normalizing flows; the
flow-matching family; built-in data and metrics. Each model is a term plus a solver for
:func:`torchnde.solve` (no integration loop of its own). ``data``, ``metrics`` and
``flow_matching`` are used as modules (``torchnde.generative.data.sample("moons", n)``).
"""

from . import conditional, data, fast_samplers, flow_matching, metrics, objectives
from ._shapes import ModelShapeError
from .cnf import CNF, REGULARISERS
from .conditional import ClassifierFreeGuidance, Inpaint, inpaint
from .fast_samplers import FAST_SAMPLERS, DPMSolver, EDMHeun, logsnr_times
from .likelihood import TRACES, bits_per_dim, dequantize, log_prob
from .objectives import dsm_loss, nll_bound, training_times
from .oracles import GaussianData, GaussianMixtureData
from .parameterisation import KINDS, Parameterisation
from .processes import EDM, PROCESSES, VE, VP, DiffusionProcess, MeanReverting, SubVP
from .samplers import ALL_SAMPLERS, SAMPLERS, LangevinCorrector, SampleResult, sample

__all__ = [
    "data",
    "metrics",
    "flow_matching",
    "log_prob",
    "TRACES",
    "dequantize",
    "bits_per_dim",
    "CNF",
    "REGULARISERS",
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
    "ALL_SAMPLERS",
    "DPMSolver",
    "EDMHeun",
    "logsnr_times",
    "FAST_SAMPLERS",
    "Inpaint",
    "inpaint",
    "ClassifierFreeGuidance",
    "conditional",
    "fast_samplers",
    "objectives",
    "dsm_loss",
    "nll_bound",
    "training_times",
    "ModelShapeError",
]
