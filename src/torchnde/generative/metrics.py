"""Sample-quality and likelihood metrics for generative models.

* :func:`wasserstein2`: the exact 2-Wasserstein distance between two equal-size point clouds
  (uniform weights), i.e. the square root of the mean squared distance under the optimal
  assignment, solved by ``scipy.optimize.linear_sum_assignment`` (Jonker–Volgenant) on the matrix
  of squared distances. Cost: O(n³) time and O(n²) memory; ~1 s for n = 2000 on one core.
* :func:`sliced_wasserstein`: the sliced 2-Wasserstein distance (Rabin et al. 2011; Bonneel et al.
  2015), ``sqrt(E_θ W2²(θ·x, θ·y))`` over random unit directions θ drawn from a seed; in 1-D W2
  is the distance between sorted samples. Since projections are 1-Lipschitz,
  ``sliced_wasserstein <= wasserstein2``.
* :func:`mmd2`: squared maximum mean discrepancy (Gretton et al. 2012) with a sum of RBF kernels
  of several bandwidths (so no single bandwidth has to be tuned).
* :func:`nll` and :func:`bits_per_dim`: negative log-likelihood in nats and its conversion to
  bits per dimension, including the change of units of dequantized discrete data.
* :func:`precision_recall`: the fraction of samples near the data (precision) and of data near a
  sample (recall), with a fixed radius or the k-NN radii of Kynkäänniemi et al. 2019. It sees
  what W2 averages away: a thin band of samples between two modes costs W2 little but
  precision a lot; a dropped mode costs recall.
* :func:`toy_log_prob`: the exact log-density of a built-in toy data set (moons, 8gaussians), by
  quadrature over the generator, so a model's held-out NLL can be set against the data's own.

All functions take tensors of shape ``(n, *event_shape)`` (flattened to ``(n, d)``) on any device;
the results are Python floats (computed in float64).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "wasserstein2",
    "sliced_wasserstein",
    "mmd2",
    "nll",
    "bits_per_dim",
    "precision_recall",
    "toy_log_prob",
]


def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (n, ...); got {tuple(x.shape)}")
    return x.detach().reshape(x.shape[0], -1).to(torch.float64)


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # direct differences (not the |a|^2 + |b|^2 - 2ab expansion): exact zeros for equal points
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").square_()


def _pair(x, y, equal: bool):
    x, y = _flat(x, "x"), _flat(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension; got {tuple(x.shape)} and {tuple(y.shape)}")
    if equal and x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of points; got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("x and y must not be empty")
    return x, y.to(x.device)


def wasserstein2(x: torch.Tensor, y: torch.Tensor) -> float:
    r"""Exact :math:`W_2` between the empirical measures of ``x`` and ``y`` (same number of points).

    :math:`W_2 = \big(\min_\pi \frac1n \sum_i \lVert x_i - y_{\pi(i)} \rVert^2\big)^{1/2}` over
    permutations :math:`\pi` (for equal uniform weights an optimal coupling is a permutation).
    """
    from scipy.optimize import linear_sum_assignment

    x, y = _pair(x, y, equal=True)
    cost = _sqdist(x, y).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    return math.sqrt(max(float(cost[rows, cols].mean()), 0.0))


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, *, num_projections: int = 256, seed: int = 0) -> float:
    r"""Sliced :math:`W_2`: :math:`\big(\frac1L\sum_{l=1}^L W_2^2(\theta_l^\top x, \theta_l^\top y)\big)^{1/2}`.

    The ``num_projections`` directions are uniform on the unit sphere, drawn from a CPU generator
    seeded with ``seed`` (the same directions on every device). ``x`` and ``y`` must have the same
    number of points (1-D :math:`W_2` is then the distance between the sorted projections).
    """
    x, y = _pair(x, y, equal=True)
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1; got {num_projections}")
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], num_projections, generator=gen, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    return math.sqrt(float((px - py).square().mean()))


def mmd2(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    bandwidths=(0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
    unbiased: bool = False,
) -> float:
    r"""Squared MMD with the kernel :math:`k(a, b) = \sum_h \exp(-\lVert a-b\rVert^2 / (2h^2))`.

    ``unbiased=False`` (default) is the V-statistic, which is >= 0 and exactly 0 for identical sets;
    ``unbiased=True`` drops the diagonal terms (an unbiased estimate of MMD², can be negative).
    ``x`` and ``y`` may have different sizes. The bandwidths are in the data's units (the toy
    densities of :mod:`torchnde.generative.data` are standardised, so the defaults span them).
    """
    x, y = _pair(x, y, equal=False)
    hs = torch.as_tensor(list(bandwidths), dtype=torch.float64, device=x.device)
    if hs.numel() == 0 or bool((hs <= 0).any()):
        raise ValueError(f"bandwidths must be positive; got {tuple(bandwidths)}")

    def k(a, b):
        d2 = _sqdist(a, b)
        return torch.exp(-d2[..., None] / (2 * hs**2)).sum(-1)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    if unbiased:
        n, m = x.shape[0], y.shape[0]
        if n < 2 or m < 2:
            raise ValueError("the unbiased estimate needs at least two points in each set")
        sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        return float(sxx + syy - 2 * kxy.mean())
    return max(float(kxx.mean() + kyy.mean() - 2 * kxy.mean()), 0.0)


def nll(log_prob: torch.Tensor) -> float:
    """The negative log-likelihood in nats: ``-mean(log_prob)`` over the samples."""
    log_prob = torch.as_tensor(log_prob)
    return -float(log_prob.detach().to(torch.float64).mean())


def bits_per_dim(nll_nats, num_dims: int, *, scale: float = 1.0) -> float:
    r"""Bits per dimension of a negative log-likelihood in nats, as a float (the mean if
    ``nll_nats`` is a tensor): :func:`torchnde.generative.likelihood.bits_per_dim` (which explains
    the ``scale`` correction for dequantized, rescaled data) reduced to one number."""
    from .likelihood import bits_per_dim as _bpd

    value = float(nll_nats) if not isinstance(nll_nats, torch.Tensor) else float(nll_nats.detach().mean())
    return float(_bpd(value, num_dims, scale=scale))


def _min_dist(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """For each row of ``a``, the distance to its nearest row of ``b`` (chunked: O(chunk · |b|) memory)."""
    return torch.cat([torch.cdist(a[i : i + chunk], b).amin(1) for i in range(0, a.shape[0], chunk)])


def _knn_radius(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """For each row of ``x``, the distance to its ``k``-th nearest other row of ``x``."""
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must be in [1, {x.shape[0] - 1}] for {x.shape[0]} points; got {k}")
    return torch.cat(
        [torch.cdist(x[i : i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, x.shape[0], chunk)]
    )


def _covered(a: torch.Tensor, b: torch.Tensor, radius_b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """For each row of ``a``: is it within ``radius_b[j]`` of some row ``b[j]``?"""
    return torch.cat([(torch.cdist(a[i : i + chunk], b) <= radius_b).any(1) for i in range(0, a.shape[0], chunk)])


def precision_recall(samples: torch.Tensor, data: torch.Tensor, *, radius: float | None = 0.1, k: int | None = None):
    r"""``(precision, recall)`` of ``samples`` against ``data``, two floats in [0, 1].

    * **Fixed radius** (default, ``radius=r``): precision is the fraction of samples with a data
      point within distance ``r``; recall is the fraction of data points with a sample within
      ``r``. On the standardised toy densities of :mod:`torchnde.generative.data` the default
      ``r = 0.1`` is about one noise standard deviation of ``moons`` across its arcs: a sample
      farther than that from every data point lies off the data.
    * **k-NN radii** (``k=k``, ``radius=None``): the "improved precision and recall" of
      Kynkäänniemi et al. (2019): the data manifold is the union of balls around each data point
      with the distance to its ``k``-th nearest data point as radius (and likewise the sample
      manifold); precision is the fraction of samples inside the data manifold, recall the
      fraction of data inside the sample manifold. No length scale to choose; the paper uses
      ``k = 3``.

    Both estimates depend on the set sizes: more reference points cover more. Compare models
    with equal sizes, and read them next to the same pair computed for two fresh data sets of
    those sizes (what a perfect model scores). Cost: O(n m) distances, chunked.
    """
    x, y = _pair(samples, data, equal=False)
    if (radius is None) == (k is None):
        raise ValueError(f"give exactly one of radius and k; got radius={radius!r}, k={k!r}")
    if radius is not None:
        if not radius > 0:
            raise ValueError(f"radius must be > 0; got {radius!r}")
        precision = (_min_dist(x, y) <= radius).double().mean()
        recall = (_min_dist(y, x) <= radius).double().mean()
    else:
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"k must be a positive int; got {k!r}")
        precision = _covered(x, y, _knn_radius(y, k)).double().mean()
        recall = _covered(y, x, _knn_radius(x, k)).double().mean()
    return float(precision), float(recall)


# quadrature nodes per generator curve: spacing pi / 4096 ~ 8e-4 in arc length, 60x finer than
# the moons' noise (0.05); the midpoint rule's error is O(spacing^2), measured at most 1e-4 nats
# (near the arcs' ends), far below the sampling error of any NLL estimate
_QUADRATURE = 4096


def _moons_raw_log_prob(raw: torch.Tensor) -> torch.Tensor:
    # the generator (torchnde.generative.data._moons): an arc with probability 1/2, an angle
    # theta ~ U[0, pi], a point on the arc plus N(0, 0.05^2 I). Its density is
    # p(x) = sum_arcs 1/2 * 1/pi * int_0^pi N(x; c(theta), s^2 I) dtheta, by the midpoint rule.
    s = 0.05
    m = _QUADRATURE
    theta = (torch.arange(m, dtype=raw.dtype, device=raw.device) + 0.5) * (math.pi / m)
    c, sn = torch.cos(theta), torch.sin(theta)
    centres = torch.cat([torch.stack([c, sn], 1), torch.stack([1.0 - c, 0.5 - sn], 1)])  # (2m, 2)
    out = []
    for i in range(0, raw.shape[0], 1024):
        d2 = torch.cdist(raw[i : i + 1024], centres).square()
        # log of the mean over the 2m nodes of N(x; centre, s^2 I) (mean = the 1/2 * 1/pi * dtheta weights)
        out.append(torch.logsumexp(-d2 / (2 * s * s), dim=1) - math.log(2 * m) - math.log(2 * math.pi * s * s))
    return torch.cat(out)


def _eight_gaussians_raw_log_prob(raw: torch.Tensor) -> torch.Tensor:
    s = 0.25
    angle = torch.arange(8, dtype=raw.dtype, device=raw.device) * (math.pi / 4)
    centres = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    d2 = torch.cdist(raw, centres).square()
    return torch.logsumexp(-d2 / (2 * s * s), dim=1) - math.log(8) - math.log(2 * math.pi * s * s)


_TOY_LOG_PROB = {"moons": _moons_raw_log_prob, "8gaussians": _eight_gaussians_raw_log_prob}


def toy_log_prob(name: str, x: torch.Tensor) -> torch.Tensor:
    r"""The log-density (nats) of the standardised toy density ``name`` at the points ``x`` (shape
    ``(n, 2)``), as a float64 tensor of shape ``(n,)`` on ``x``'s device.

    Known for ``"moons"`` (the generator's mixture of two noisy half circles, integrated over the
    angle by a 4096-node midpoint rule: within about 1e-4 nats) and ``"8gaussians"``
    (closed form). The standardisation ``x = (raw - mean) / std`` of
    :func:`torchnde.generative.data.sample` adds :math:`\sum_i \log \mathrm{std}_i`. The mean of
    ``-toy_log_prob(name, data)`` over held-out data is the data's own NLL, the floor of a model's
    (its entropy; about 1.10 nats for ``moons``).
    """
    from .data import _STANDARDISE, TOY_DENSITIES

    if name not in _TOY_LOG_PROB:
        known = ", ".join(_TOY_LOG_PROB)
        if name in TOY_DENSITIES:
            raise ValueError(f"the exact density of {name!r} is not implemented; known: {known}")
        raise ValueError(f"unknown data set {name!r}; with an exact density: {known}")
    x = _flat(x, "x")
    if x.shape[1] != 2:
        raise ValueError(f"x must have shape (n, 2); got {tuple(x.shape)}")
    mean, std = (torch.tensor(v, dtype=torch.float64, device=x.device) for v in _STANDARDISE[name])
    return _TOY_LOG_PROB[name](x * std + mean) + torch.log(std).sum()
