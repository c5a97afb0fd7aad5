"""Graph generation (GDSS, Jo, Lee & Hwang 2022): offline data sets, graph metrics, score networks.

A package rather than an example, because the command line and the benchmarks import its data,
networks and metrics. The generic multi-component diffusion (a tree state ``{"x": ..., "adj": ...}``
with one forward process per leaf) lives in :mod:`torchnde.generative`; nothing here integrates.

* :mod:`~torchnde.generative.graphs.data`: community-small, grid, planar and SBM graphs generated
  from a seed (no downloads), the Erdős–Rényi baseline, and the conversion to padded tensors
  ``(x, adj, mask)`` and back.
* :mod:`~torchnde.generative.graphs.metrics`: degree / clustering / orbit / spectral MMD in GDSS's
  convention and an unbiased positive-definite one, 4-node orbit counts, the data-vs-data floor.
* :mod:`~torchnde.generative.graphs.networks`: the GCN node score network and the
  attention-over-adjacency-powers adjacency score network.
* :mod:`~torchnde.generative.graphs.train`: training (multi-component denoising score matching,
  EMA) and sampling glue that returns networkx graphs (what ``torchnde train`` runs for
  ``model.type = "gdss"``).
"""

from . import data, metrics, networks, train
from .data import DATASETS, GraphBatch, erdos_renyi_like, load, to_graphs, to_tensors, train_test_split
from .metrics import graph_mmd, mmd_floor, orbit_counts
from .networks import AdjScoreNet, GraphScoreModel, NodeScoreNet
from .train import EMA, FitResult, build_model, fit, graph_process, sample_graphs

__all__ = [
    "data",
    "metrics",
    "networks",
    "DATASETS",
    "load",
    "train_test_split",
    "erdos_renyi_like",
    "GraphBatch",
    "to_tensors",
    "to_graphs",
    "graph_mmd",
    "mmd_floor",
    "orbit_counts",
    "NodeScoreNet",
    "AdjScoreNet",
    "GraphScoreModel",
    "train",
    "graph_process",
    "build_model",
    "fit",
    "FitResult",
    "sample_graphs",
    "EMA",
]
