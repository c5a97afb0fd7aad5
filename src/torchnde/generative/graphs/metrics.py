r"""Graph-generation metrics: descriptor MMDs, 4-node orbit counts, and the data-vs-data floor.

A generated set of graphs is compared with a reference set through the maximum mean discrepancy
(Gretton et al. 2012) between per-graph *descriptors*, as introduced for graphs by GraphRNN (You et
al. 2018):

=========  ========================================================================================
metric     descriptor of one graph
=========  ========================================================================================
degree     the degree histogram (``nx.degree_histogram``), normalised to a pmf
clustering the histogram of local clustering coefficients on 100 bins over [0, 1], normalised
orbit      the 15 node-orbit counts of graphlets with up to 4 nodes (:func:`orbit_counts`),
           averaged over the graph's nodes
spectral   the histogram of the normalised-Laplacian eigenvalues on 200 bins over [-1e-5, 2],
           normalised (GRAN, Liao et al. 2019)
=========  ========================================================================================

Two conventions (``convention=``):

* ``"gdss"`` — the numbers of the GDSS paper (Jo, Lee & Hwang 2022), whose evaluation code follows
  GraphRNN / EDP-GNN: the biased V-statistic
  :math:`\frac1{m^2}\sum k(x_i,x_j) + \frac1{n^2}\sum k(y_i,y_j) - \frac2{mn}\sum k(x_i,y_j)`
  with the *Gaussian EMD* kernel :math:`k = \exp(-\mathrm{EMD}^2/(2\sigma^2))` for degree
  (:math:`\sigma = 1`, EMD in degrees) and clustering (:math:`\sigma = 0.1`, EMD in clustering
  units), and a Gaussian kernel on the Euclidean distance between mean orbit-count vectors for
  orbits (:math:`\sigma = 30`). The 1-D EMD between pmfs on a common grid is computed exactly as
  the bin width times the L1 distance between the CDFs. GDSS's tables have no spectral column; its
  code would use the Gaussian EMD kernel with the EMD measured in *bins* (width 0.01) and
  :math:`\sigma = 1`, a kernel so narrow that the MMD is :math:`\approx 1/m + 1/n` whatever the
  graphs, so spectral MMD here follows GRAN (Liao et al. 2019) and SPECTRE (Martinkus et al. 2022):
  the Gaussian *total-variation* kernel :math:`\exp(-\mathrm{TV}^2/(2\sigma^2))`, :math:`\sigma = 1`.
* ``"unbiased"`` — the unbiased U-statistic (diagonal terms dropped; can be slightly negative) with
  a positive-definite kernel: the Laplacian EMD kernel :math:`\exp(-\mathrm{EMD}/\sigma)` for the
  histograms (positive definite because a 1-D EMD is an L1 distance between CDFs, and
  :math:`e^{-\lambda|u-v|}` is a positive-definite kernel on each coordinate) and the same
  Gaussian kernel for orbits (:math:`\sigma = 30`). The Gaussian EMD / TV kernels of the first
  convention are not positive definite in general, so their "MMD" is not a metric between
  distributions (O'Bray et al. 2022, "Evaluation metrics for graph generative models: problems,
  pitfalls, and practical solutions").

**The floor.** With 20 test graphs the MMD between two *independent draws of the same generator*
is not small: :func:`mmd_floor` reports it (mean ± sd over seeds) and every comparison should
print it beside the model's number (docs/graphs.md has the measured floors).

Orbit counts are computed here (no ORCA binary): :func:`orbit_counts` derives, per node, the
non-induced counts of every orbit by closed-form matrix expressions (paths, stars, triangles,
4-cycles, paws, diamonds, 4-cliques), then converts them to induced (graphlet) counts by solving
the unitriangular system whose coefficients — how many non-induced copies of each orbit a given
graphlet orbit contains — are themselves computed by enumerating all labelled graphs on 3 and 4
nodes. The orbit numbering is ORCA's (Hočevar & Demšar 2014) / Pržulj's (2007).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import networkx as nx
import numpy as np

__all__ = [
    "ORBITS",
    "orbit_counts",
    "degree_histogram",
    "clustering_histogram",
    "spectral_histogram",
    "mean_orbit_counts",
    "descriptors",
    "mmd",
    "graph_mmd",
    "mmd_floor",
    "METRICS",
    "CONVENTIONS",
]

#: The 15 node orbits of graphlets with 2–4 nodes, in ORCA's order.
ORBITS = (
    "edge",  # 0: degree
    "path3-end",  # 1
    "path3-centre",  # 2
    "triangle",  # 3
    "path4-end",  # 4
    "path4-inner",  # 5
    "star-leaf",  # 6
    "star-centre",  # 7
    "cycle4",  # 8
    "paw-tail",  # 9: the degree-1 node of a triangle with a pendant edge
    "paw-side",  # 10: its two degree-2 triangle nodes
    "paw-centre",  # 11: its degree-3 node
    "diamond-side",  # 12: the two degree-2 nodes of K4 minus an edge
    "diamond-centre",  # 13: its two degree-3 nodes
    "clique4",  # 14
)

METRICS = ("degree", "clustering", "orbit", "spectral")
CONVENTIONS = ("gdss", "unbiased")


# ------------------------------------------------------------------------------------------------
# orbit counts


def _orbit_of(adj: np.ndarray, v: int) -> int | None:
    """The orbit of node ``v`` in the connected graph ``adj`` on 3 or 4 nodes (None if disconnected)."""
    k = adj.shape[0]
    g = nx.from_numpy_array(adj)
    if not nx.is_connected(g):
        return None
    deg = adj.sum(1).astype(int)
    e = int(deg.sum()) // 2
    d = int(deg[v])
    if k == 3:
        return 3 if e == 3 else (1 if d == 1 else 2)
    if e == 3:
        if deg.max() == 3:  # star
            return 7 if d == 3 else 6
        return 4 if d == 1 else 5  # path
    if e == 4:
        if deg.max() == 2:
            return 8
        return {1: 9, 2: 10, 3: 11}[d]  # paw
    if e == 5:
        return 13 if d == 3 else 12
    return 14


def _conversion() -> np.ndarray:
    """``M[o, o']``: non-induced copies of orbit ``o`` (with the node fixed) inside graphlet orbit ``o'``.

    For a node ``v``: non-induced count ``N_o(v) = sum_o' M[o, o'] * I_o'(v)`` over the induced counts.
    """
    M = np.zeros((15, 15), dtype=np.int64)
    M[0, 0] = 1
    for k in (3, 4):
        pairs = list(itertools.combinations(range(k), 2))
        seen = set()
        for bits in range(1 << len(pairs)):
            edges = [p for i, p in enumerate(pairs) if bits >> i & 1]
            a = np.zeros((k, k))
            for i, j in edges:
                a[i, j] = a[j, i] = 1
            o2 = _orbit_of(a, 0)
            if o2 is None or o2 in seen:
                continue
            seen.add(o2)
            for sub in range(1 << len(edges)):
                b = np.zeros((k, k))
                for i, (p, q) in enumerate(edges):
                    if sub >> i & 1:
                        b[p, q] = b[q, p] = 1
                o = _orbit_of(b, 0)
                if o is not None:
                    M[o, o2] += 1
    return M


_M = _conversion()
_MINV = np.rint(np.linalg.inv(_M.astype(np.float64))).astype(np.int64)


def _adjacency(g) -> np.ndarray:
    if isinstance(g, nx.Graph):
        a = nx.to_numpy_array(g, dtype=np.float64, weight=None)
    else:
        a = np.asarray(g, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"expected a networkx graph or a square adjacency; got shape {a.shape}")
    a = (a != 0).astype(np.float64)
    np.fill_diagonal(a, 0.0)
    if not np.array_equal(a, a.T):
        raise ValueError("the adjacency must be symmetric (an undirected graph)")
    return a


def orbit_counts(g) -> np.ndarray:
    r"""Per-node counts of the 15 orbits of graphlets on 2–4 nodes (ORCA's ``node 4`` output).

    Counts are *induced*: a 4-node set contributes to the orbit of its induced subgraph only.

    Args:
        g: a networkx graph, or a symmetric 0/1 adjacency (array-like ``(n, n)``).

    Returns:
        An ``(n, 15)`` int64 array; column ``o`` is orbit ``o`` of :data:`ORBITS`.
    """
    A = _adjacency(g)
    n = A.shape[0]
    if n == 0:
        return np.zeros((0, 15), dtype=np.int64)
    d = A.sum(1)
    A2 = A @ A  # common-neighbour counts
    t = (A2 * A).sum(1) / 2  # triangles at each node
    Ad1 = A @ (d - 1)
    N = np.zeros((n, 15))
    N[:, 0] = d
    N[:, 1] = Ad1  # v-u-w paths with v at an end
    N[:, 2] = d * (d - 1) / 2
    N[:, 3] = t
    N[:, 4] = A @ Ad1 - d * (d - 1) - 2 * t
    N[:, 5] = (d - 1) * Ad1 - 2 * t
    N[:, 6] = A @ ((d - 1) * (d - 2) / 2)
    N[:, 7] = d * (d - 1) * (d - 2) / 6
    C = A2 * (A2 - 1) / 2
    np.fill_diagonal(C, 0.0)
    N[:, 8] = C.sum(1)
    N[:, 9] = A @ t - 2 * t
    N[:, 10] = (A * A2) @ (d - 2)
    N[:, 11] = t * (d - 2)
    N[:, 12] = ((A @ (A * (A2 - 1))) * A).sum(1) / 2
    N[:, 13] = (A * A2 * (A2 - 1) / 2).sum(1)
    k4 = np.zeros(n)
    for v in range(n):
        if t[v] < 3:  # a 4-clique at v brings three triangles at v
            continue
        nb = np.flatnonzero(A[v])
        if nb.size >= 3:
            S = A[np.ix_(nb, nb)]
            k4[v] = np.trace(S @ S @ S) / 6
    N[:, 14] = k4
    N = np.rint(N).astype(np.int64)
    return N @ _MINV.T


# ------------------------------------------------------------------------------------------------
# descriptors


def degree_histogram(g: nx.Graph) -> np.ndarray:
    """Counts of nodes of degree 0, 1, 2, … (``nx.degree_histogram``)."""
    return np.asarray(nx.degree_histogram(g), dtype=np.float64)


def clustering_histogram(g: nx.Graph, bins: int = 100) -> np.ndarray:
    """Histogram of the local clustering coefficients on ``bins`` equal bins over [0, 1]."""
    c = list(nx.clustering(g).values())
    return np.histogram(c, bins=bins, range=(0.0, 1.0))[0].astype(np.float64)


def spectral_histogram(g: nx.Graph, bins: int = 200) -> np.ndarray:
    """Histogram of the normalised-Laplacian eigenvalues on ``bins`` bins over [-1e-5, 2]."""
    A = _adjacency(g)
    d = A.sum(1)
    s = np.where(d > 0, 1.0 / np.sqrt(np.maximum(d, 1e-300)), 0.0)
    L = s[:, None] * (np.diag(d) - A) * s[None, :]  # networkx's convention: isolated nodes give 0
    eig = np.linalg.eigvalsh(L) if L.size else np.zeros(0)
    return np.histogram(eig, bins=bins, range=(-1e-5, 2.0))[0].astype(np.float64)


def mean_orbit_counts(g: nx.Graph) -> np.ndarray:
    """The 15 orbit counts averaged over the graph's nodes (GraphRNN's orbit descriptor)."""
    c = orbit_counts(g)
    return c.sum(0) / max(c.shape[0], 1)


_DESCRIPTOR: dict[str, Callable] = {
    "degree": degree_histogram,
    "clustering": clustering_histogram,
    "orbit": mean_orbit_counts,
    "spectral": spectral_histogram,
}
# the bin width of each histogram descriptor in the unit its EMD is measured in (GDSS's convention)
_BIN_WIDTH_GDSS = {"degree": 1.0, "clustering": 0.01}
_BIN_WIDTH_UNBIASED = {"degree": 1.0, "clustering": 0.01, "spectral": 0.01}
_SIGMA = {
    "gdss": {"degree": 1.0, "clustering": 0.1, "orbit": 30.0, "spectral": 1.0},
    "unbiased": {"degree": 1.0, "clustering": 0.1, "orbit": 30.0, "spectral": 0.1},
}


def descriptors(graphs: Sequence[nx.Graph], metric: str) -> np.ndarray:
    """The ``(len(graphs), D)`` descriptor matrix of ``metric`` (histograms padded and normalised to pmfs)."""
    if metric not in _DESCRIPTOR:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    rows = [_DESCRIPTOR[metric](g) for g in graphs]
    width = max((r.size for r in rows), default=0)
    X = np.zeros((len(rows), width))
    for i, r in enumerate(rows):
        X[i, : r.size] = r
    if metric != "orbit":
        s = X.sum(1, keepdims=True)
        X = np.divide(X, s, out=np.zeros_like(X), where=s > 0)
    return X


# ------------------------------------------------------------------------------------------------
# kernels and MMD


def _pad(X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = max(X.shape[1], Y.shape[1])
    return np.pad(X, ((0, 0), (0, w - X.shape[1]))), np.pad(Y, ((0, 0), (0, w - Y.shape[1])))


def _pairwise_l1(X: np.ndarray, Y: np.ndarray, chunk: int = 64) -> np.ndarray:
    out = np.empty((X.shape[0], Y.shape[0]))
    for i in range(0, X.shape[0], chunk):  # bounds memory at chunk * |Y| * D
        out[i : i + chunk] = np.abs(X[i : i + chunk, None, :] - Y[None, :, :]).sum(-1)
    return out


def _kernel_matrix(X: np.ndarray, Y: np.ndarray, kernel: str, sigma: float, bin_width: float) -> np.ndarray:
    if kernel in ("gaussian_emd", "laplacian_emd"):
        D = bin_width * _pairwise_l1(np.cumsum(X, 1), np.cumsum(Y, 1))
        return np.exp(-(D**2) / (2 * sigma**2)) if kernel == "gaussian_emd" else np.exp(-D / sigma)
    if kernel == "gaussian_tv":
        D = 0.5 * _pairwise_l1(X, Y)
        return np.exp(-(D**2) / (2 * sigma**2))
    if kernel == "gaussian":
        D2 = ((X[:, None, :] - Y[None, :, :]) ** 2).sum(-1)
        return np.exp(-D2 / (2 * sigma**2))
    raise ValueError(f"unknown kernel {kernel!r}; choose 'gaussian_emd', 'laplacian_emd', 'gaussian_tv' or 'gaussian'")


def mmd(
    X: np.ndarray,
    Y: np.ndarray,
    *,
    kernel: str = "gaussian_emd",
    sigma: float = 1.0,
    bin_width: float = 1.0,
    unbiased: bool = False,
) -> float:
    r"""Squared MMD between two descriptor sets ``X`` ``(m, D)`` and ``Y`` ``(n, D)`` (zero-padded to a common ``D``).

    Args:
        kernel: ``"gaussian_emd"`` :math:`e^{-\mathrm{EMD}^2/2\sigma^2}`, ``"laplacian_emd"``
            :math:`e^{-\mathrm{EMD}/\sigma}` (positive definite), ``"gaussian_tv"``
            :math:`e^{-\mathrm{TV}^2/2\sigma^2}`, or ``"gaussian"`` :math:`e^{-\|x-y\|^2/2\sigma^2}`.
            The EMD kernels read rows as pmfs on a grid of spacing ``bin_width``.
        unbiased: the U-statistic (diagonals dropped; needs two rows in each set) instead of the
            biased V-statistic.
    """
    X, Y = _pad(np.atleast_2d(np.asarray(X, np.float64)), np.atleast_2d(np.asarray(Y, np.float64)))
    m, n = X.shape[0], Y.shape[0]
    if m == 0 or n == 0:
        raise ValueError(f"mmd needs non-empty sets; got {m} and {n} rows")
    Kxx = _kernel_matrix(X, X, kernel, sigma, bin_width)
    Kyy = _kernel_matrix(Y, Y, kernel, sigma, bin_width)
    Kxy = _kernel_matrix(X, Y, kernel, sigma, bin_width)
    if unbiased:
        if m < 2 or n < 2:
            raise ValueError("the unbiased MMD needs at least two graphs in each set")
        sxx = (Kxx.sum() - np.trace(Kxx)) / (m * (m - 1))
        syy = (Kyy.sum() - np.trace(Kyy)) / (n * (n - 1))
        return float(sxx + syy - 2 * Kxy.mean())
    return float(Kxx.mean() + Kyy.mean() - 2 * Kxy.mean())


def _metric_mmd(Dx: np.ndarray, Dy: np.ndarray, metric: str, convention: str) -> float:
    sigma = _SIGMA[convention][metric]
    if metric == "orbit":
        return mmd(Dx, Dy, kernel="gaussian", sigma=sigma, unbiased=convention == "unbiased")
    if convention == "gdss":
        if metric == "spectral":
            return mmd(Dx, Dy, kernel="gaussian_tv", sigma=sigma)
        return mmd(Dx, Dy, kernel="gaussian_emd", sigma=sigma, bin_width=_BIN_WIDTH_GDSS[metric])
    return mmd(Dx, Dy, kernel="laplacian_emd", sigma=sigma, bin_width=_BIN_WIDTH_UNBIASED[metric], unbiased=True)


def _check(metrics, convention):
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; choose from {METRICS}")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; choose one of {CONVENTIONS}")
    return metrics


def graph_mmd(
    reference: Sequence[nx.Graph],
    generated: Sequence[nx.Graph],
    metrics: Sequence[str] = ("degree", "clustering", "orbit"),
    *,
    convention: str = "gdss",
) -> dict[str, float]:
    """MMD² between a reference and a generated set of graphs for each of ``metrics``.

    Empty generated graphs (no nodes) are dropped first, as in GDSS's evaluation.

    Args:
        reference, generated: lists of networkx graphs.
        metrics: any of :data:`METRICS`.
        convention: ``"gdss"`` (the paper's kernels and biased estimate) or ``"unbiased"``
            (positive-definite kernels, unbiased estimate); see the module docstring.

    Returns:
        ``{metric: value}``.
    """
    metrics = _check(metrics, convention)
    ref = [g for g in reference if g.number_of_nodes() > 0]
    gen = [g for g in generated if g.number_of_nodes() > 0]
    if not ref or not gen:
        raise ValueError(f"need non-empty graphs on both sides; got {len(ref)} reference and {len(gen)} generated")
    return {m: _metric_mmd(descriptors(ref, m), descriptors(gen, m), m, convention) for m in metrics}


def mmd_floor(
    generator: str | Callable[[int, int], list[nx.Graph]],
    n_graphs: int,
    seeds: Sequence[int] = tuple(range(10)),
    metrics: Sequence[str] = ("degree", "clustering", "orbit"),
    *,
    n_generated: int | None = None,
    convention: str = "gdss",
    **kwargs,
) -> dict[str, tuple[float, float]]:
    """The data-vs-data floor: MMD² between two independent draws of the same generator.

    For each seed ``s`` two sets are drawn (``n_graphs`` reference graphs with seed ``2 s`` and
    ``n_generated`` graphs, default ``n_graphs``, with seed ``2 s + 1``) and compared with
    :func:`graph_mmd`.

    Args:
        generator: a data-set name of :data:`~torchnde.generative.graphs.data.DATASETS`, or a callable
            ``generator(n, seed) -> list of graphs``.
        n_graphs: the reference (test) set size, e.g. 20 for GDSS's community-small protocol.
        seeds: one pair of draws per seed.
        kwargs: passed to the generator.

    Returns:
        ``{metric: (mean, sample standard deviation over seeds)}``.
    """
    from .data import load

    metrics = _check(metrics, convention)
    draw = (lambda n, s: load(generator, n, s, **kwargs)) if isinstance(generator, str) else generator
    n_gen = n_graphs if n_generated is None else n_generated
    vals = {m: [] for m in metrics}
    for s in seeds:
        out = graph_mmd(draw(n_graphs, 2 * s), draw(n_gen, 2 * s + 1), metrics, convention=convention)
        for m in metrics:
            vals[m].append(out[m])
    res = {}
    for m, v in vals.items():
        a = np.asarray(v)
        res[m] = (float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan)
    return res
