"""The demo's metrics that see what W2 misses (issue 13, item 6): precision/recall of samples
against data, and the exact log-density of the toy data (the floor of a model's NLL)."""

import math

import pytest
import torch

from torchnde.generative import data, metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def _moons(n, seed):
    return data.sample("moons", n, seed=seed, dtype=torch.float64)


def test_precision_recall_of_data_against_data_is_near_one():
    a, b = _moons(1000, 1), _moons(1000, 2)
    p, r = metrics.precision_recall(a, b)  # radius 0.1
    assert p > 0.97 and r > 0.97, (p, r)  # measured 0.994, 0.993
    p, r = metrics.precision_recall(a, b, radius=None, k=3)
    assert p > 0.9 and r > 0.9, (p, r)  # measured 0.955, 0.952
    assert metrics.precision_recall(a, a) == (1.0, 1.0)


def test_a_gaussian_blob_has_low_precision_and_a_dropped_mode_low_recall():
    ref = _moons(1000, 2)
    blob = torch.randn(1000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p, r = metrics.precision_recall(blob, ref)
    assert p < 0.5 and r > 0.8, (p, r)  # off the moons mostly, but covering them: measured 0.35, 0.94
    p_knn, _ = metrics.precision_recall(blob, ref, radius=None, k=3)
    assert p_knn < 0.5, p_knn
    # one moon only (the raw upper arc has y > 0.25 - 0.05 * 5 after undoing the standardisation
    # in most of its mass; split by the sign of the first principal direction is enough here)
    upper = _moons(3000, 3)
    raw_y = upper[:, 1] * 0.49668 + 0.25
    raw_x = upper[:, 0] * 0.86747 + 0.5
    one = upper[(raw_x - 0.0).square() + raw_y.square() < (raw_x - 1.0).square() + (raw_y - 0.5).square()][:1000]
    p, r = metrics.precision_recall(one, ref)
    assert p > 0.97 and 0.4 < r < 0.6, (p, r)  # a perfect half: recall ~ 1/2


def test_precision_recall_checks_its_arguments():
    x = _moons(10, 0)
    with pytest.raises(ValueError, match="exactly one of radius and k"):
        metrics.precision_recall(x, x, radius=0.1, k=3)
    with pytest.raises(ValueError, match="radius must be > 0"):
        metrics.precision_recall(x, x, radius=0.0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 9\]"):
        metrics.precision_recall(x, x, radius=None, k=10)
    with pytest.raises(ValueError, match="same dimension"):
        metrics.precision_recall(x, torch.zeros(5, 3))


def test_moons_log_density_is_normalised_and_gives_the_entropy():
    # the density integrates to one on a grid covering the standardised moons
    n = 70
    g = torch.linspace(-2.7, 2.7, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    # a grid of spacing 0.08 over the support: a Riemann sum of Gaussians of std 0.1 (the noise
    # across the arcs) is accurate to far below 1e-4 at that spacing
    mass = metrics.toy_log_prob("moons", pts).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(float(mass) - 1.0) < 1e-4, float(mass)  # measured 1 - 2e-6
    # the data's own NLL (the entropy): about 1.12 nats; log(arc length 2 pi) + the entropy of the
    # noise across the arcs + the standardisation's log-Jacobian gives 1.10 to first order
    x = _moons(1000, 4)
    lp = metrics.toy_log_prob("moons", x)
    assert lp.dtype == torch.float64 and lp.shape == (1000,)
    nll, se = -float(lp.mean()), float(lp.std()) / math.sqrt(1000)
    assert abs(nll - 1.12) < 4 * se + 0.01, (nll, se)


def test_eight_gaussians_log_density_is_exact_and_names_are_checked():
    x = data.sample("8gaussians", 5, seed=0, dtype=torch.float64)
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in data._STANDARDISE["8gaussians"])
    raw = x * std + mean
    angle = torch.arange(8, dtype=torch.float64) * math.pi / 4
    c = 2 * torch.stack([angle.cos(), angle.sin()], 1)
    dens = (torch.exp(-(raw[:, None] - c).square().sum(-1) / (2 * 0.0625)) / (2 * math.pi * 0.0625)).mean(1)
    assert torch.allclose(metrics.toy_log_prob("8gaussians", x), dens.log() + std.log().sum(), atol=1e-12)
    with pytest.raises(ValueError, match="not implemented.*moons"):
        metrics.toy_log_prob("rings", x)
    with pytest.raises(ValueError, match="unknown data set 'moon'"):
        metrics.toy_log_prob("moon", x)
