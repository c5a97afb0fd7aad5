"""Continuous-time generative models on the solver core.

Score-based diffusion processes, parameterisations, analytic oracles and samplers; likelihoods
through the instantaneous change of variables and continuous normalizing flows; the
flow-matching family; built-in data and metrics. Each model is a term plus a solver for
:func:`torchnde.solve` (no integration loop of its own). ``data``, ``metrics`` and
``flow_matching`` are used as modules (``torchnde.generative.data.sample("moons", n)``).
"""

from . import (
    bdia,
    bridges,
    conditional,
    data,
    discrete,
    fast_samplers,
    flow_matching,
    metrics,
    mrs,
    multi,
    objectives,
    time_shift,
)
from ._shapes import ModelShapeError
from .bdia import BDIAResult, BDIASolver, bdia_invert, bdia_sample
from .bridges import (
    DSBM,
    BrownianBridge,
    ExactOTBiasWarning,
    LotkaVolterra,
    MultiMarginalBridge,
    OUBridge,
    VPBridge,
    bridge_matching_loss,
    sample_bridge,
    sbcfm_loss,
    sbcfm_pairs,
    sinkhorn_coupling,
    sinkhorn_plan,
)
from .cnf import CNF, REGULARISERS
from .conditional import ClassifierFreeGuidance, Inpaint, inpaint
from .discrete import DiscreteTimeModel, DiscreteVP
from .fast_samplers import FAST_SAMPLERS, DPMSolver, EDMHeun, logsnr_times
from .likelihood import TRACES, bits_per_dim, dequantize, log_prob
from .mrs import MRS_SAMPLERS, MRSolver
from .multi import (
    MULTI_SAMPLERS,
    JointGaussian,
    JointScore,
    MultiProcess,
    MultiSampleResult,
    S4Solver,
    TreeLangevinCorrector,
    multi_dsm_loss,
    multi_sample,
    symmetric_noise,
)
from .objectives import dsm_loss, nll_bound, training_times
from .oracles import GaussianData, GaussianMixtureData, GaussianSchrodingerBridge
from .parameterisation import KINDS, Parameterisation
from .processes import EDM, PROCESSES, VE, VP, DiffusionProcess, MeanReverting, SubVP
from .samplers import ALL_SAMPLERS, SAMPLERS, LangevinCorrector, SampleResult, sample
from .time_shift import TimeShift

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
    # bridges and Schrödinger bridges
    "bridges",
    "BrownianBridge",
    "OUBridge",
    "VPBridge",
    "bridge_matching_loss",
    "sample_bridge",
    "sinkhorn_plan",
    "sinkhorn_coupling",
    "sbcfm_loss",
    "sbcfm_pairs",
    "ExactOTBiasWarning",
    "DSBM",
    "MultiMarginalBridge",
    "LotkaVolterra",
    "GaussianSchrodingerBridge",
    # the seed papers' samplers and discrete schedules
    "mrs",
    "MRSolver",
    "MRS_SAMPLERS",
    "bdia",
    "BDIASolver",
    "BDIAResult",
    "bdia_sample",
    "bdia_invert",
    "time_shift",
    "TimeShift",
    "discrete",
    "DiscreteVP",
    "DiscreteTimeModel",
    # multi-component diffusion (a system of SDEs over a tree-structured state)
    "multi",
    "MultiProcess",
    "JointScore",
    "symmetric_noise",
    "multi_sample",
    "MultiSampleResult",
    "multi_dsm_loss",
    "S4Solver",
    "TreeLangevinCorrector",
    "JointGaussian",
    "MULTI_SAMPLERS",
]
