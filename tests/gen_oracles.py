"""Shared set-up of the sampler tests (test_gen_samplers.py, test_gen_fast_samplers.py): the
processes, the Gaussian and Gaussian-mixture data with exact scores, and two measurements."""

import torch

from torchnde.generative.oracles import GaussianData, GaussianMixtureData
from torchnde.generative.processes import EDM, VE, VP, SubVP

PROCS = {"vp": VP, "ve": VE, "subvp": SubVP, "edm": EDM}
GAUSS = GaussianData([1.0, -0.5], [[1.0, 0.3], [0.3, 0.5]])
MIX = GaussianMixtureData([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [[0.5, 0.3], [0.4, 0.6]])
N = 4000
# with N = 4000 the Monte-Carlo error of the relative mean + covariance error is about 0.03
MC_TOL = 0.08


def start(oracle, p, n, seed=1):
    """Exact draws of p_{t1} (so only the sampler's discretisation error remains)."""
    return oracle.marginal_sample(p, p.t1, n, generator=torch.Generator().manual_seed(seed))


def gauss_error(x, p):
    """Relative error of the sample mean and covariance against the exact moments of p_{t0}."""
    mean, cov = GAUSS.marginal_moments(p, p.t0)
    return float(((x.mean(0) - mean).norm() + (torch.cov(x.T) - cov).norm()) / cov.norm())
