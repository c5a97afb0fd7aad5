"""Built-in data (toy densities, digits) and metrics (W2, sliced W2, MMD, NLL/bits per dim)."""

import itertools
import math

import pytest
import torch

from torchnde.generative import data, metrics


# ----------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("name", data.TOY_DENSITIES)
def test_toy_density_shape_determinism_dtype(name):
    x = data.sample(name, 500, seed=3, dtype=torch.float64)
    assert x.shape == (500, 2) and x.dtype == torch.float64 and torch.isfinite(x).all()
    assert torch.equal(x, data.sample(name, 500, seed=3, dtype=torch.float64))
    assert not torch.equal(x, data.sample(name, 500, seed=4, dtype=torch.float64))
    x32 = data.sample(name, 500, seed=3, dtype=torch.float32)
    assert x32.dtype == torch.float32 and torch.allclose(x32.double(), x, atol=1e-6)


@pytest.mark.parametrize("name", data.TOY_DENSITIES)
def test_toy_density_is_standardised(name):
    # n = 2e5: the standard error of a mean is 2.2e-3 and of a standard deviation below 3e-3
    x = data.sample(name, 200_000, seed=11, dtype=torch.float64)
    assert x.mean(0).abs().max() < 0.012, x.mean(0)
    assert (x.std(0) - 1).abs().max() < 0.012, x.std(0)


def test_toy_density_geometry():
    # undo the standardisation and check the raw construction
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in data._STANDARDISE["moons"])
    raw = data.sample("moons", 4000, seed=0, dtype=torch.float64) * std + mean
    d_upper = (raw - torch.tensor([0.0, 0.0], dtype=torch.float64)).norm(dim=1)
    d_lower = (raw - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1)
    # every point is within 5 noise stds (0.05) of one of the two unit half circles
    assert (torch.minimum((d_upper - 1).abs(), (d_lower - 1).abs()) < 0.25).all()
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in data._STANDARDISE["checkerboard"])
    raw = data.sample("checkerboard", 4000, seed=0, dtype=torch.float64) * std + mean
    cells = torch.floor(raw + 2).long()
    assert ((cells.sum(1) % 2) == 0).all() and raw.abs().max() <= 2
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in data._STANDARDISE["rings"])
    r = (data.sample("rings", 4000, seed=0, dtype=torch.float64) * std + mean).norm(dim=1)
    assert ((r - r.round()).abs() < 0.5).all()
    counts = torch.bincount(r.round().long().clamp(1, 4), minlength=5)[1:]
    assert (counts - 1000).abs().max() < 4 * math.sqrt(1000 * 0.75 * 0.25) * 2  # multinomial, 8 sd


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="moons.*8gaussians.*2spirals"):
        data.sample("moon", 10)
    with pytest.raises(ValueError, match="n must be"):
        data.sample("moons", -1)


def test_digits_split():
    train, test = data.digits("train", seed=0), data.digits("test", seed=0)
    xtr, ytr = train.tensors
    xte, yte = test.tensors
    assert xtr.shape[1] == 64 and len(train) + len(test) == 1797
    assert len(test) == pytest.approx(0.2 * 1797, abs=1)
    assert xtr.min() >= 0 and xtr.max() <= data.DIGITS_LEVELS - 1 and torch.equal(xtr, xtr.round())
    assert ytr.dtype == torch.int64 and set(ytr.tolist()) == set(range(10))
    # disjoint: no test image appears in the training split with the same label
    rows = {tuple(r) + (int(y),) for r, y in zip(xtr.tolist(), ytr.tolist())}
    assert (
        sum(tuple(r) + (int(y),) in rows for r, y in zip(xte.tolist(), yte.tolist())) <= 5
    )  # exact duplicates exist in the data
    # stratified: class proportions agree
    assert (torch.bincount(ytr) / len(ytr) - torch.bincount(yte) / len(yte)).abs().max() < 0.01
    img = data.digits("test", flatten=False, dtype=torch.float64)
    assert img.tensors[0].shape[1:] == (1, 8, 8) and img.tensors[0].dtype == torch.float64
    with pytest.raises(ValueError, match="split"):
        data.digits("val")


# ----------------------------------------------------------------------------------------- W2
def test_w2_of_a_set_with_itself_is_zero():
    x = data.sample("8gaussians", 500, seed=0, dtype=torch.float64)
    assert metrics.wasserstein2(x, x) == 0.0
    perm = torch.randperm(500)
    assert metrics.wasserstein2(x, x[perm]) == pytest.approx(0.0, abs=1e-12)


def test_w2_of_a_shifted_set_is_the_shift():
    x = data.sample("moons", 400, seed=1, dtype=torch.float64)
    shift = torch.tensor([0.3, -0.4], dtype=torch.float64)
    assert metrics.wasserstein2(x, x + shift) == pytest.approx(0.5, rel=1e-10)


def test_w2_in_one_dimension_is_the_sorted_distance():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, generator=gen, dtype=torch.float64)
    y = 2 * torch.rand(300, generator=gen, dtype=torch.float64) + 0.5
    exact = (x.sort().values - y.sort().values).square().mean().sqrt()
    assert metrics.wasserstein2(x[:, None], y[:, None]) == pytest.approx(float(exact), rel=1e-10)
    assert metrics.wasserstein2(x, y) == pytest.approx(float(exact), rel=1e-10)  # 1-d input is (n, 1)


def test_w2_against_brute_force_over_permutations():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(6, 3, generator=gen, dtype=torch.float64)
    best = min(float((x - y[list(p)]).square().sum(1).mean()) for p in itertools.permutations(range(6)))
    assert metrics.wasserstein2(x, y) == pytest.approx(math.sqrt(best), rel=1e-12)


def test_w2_rejects_unequal_sizes():
    with pytest.raises(ValueError, match="same number of points"):
        metrics.wasserstein2(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="same dimension"):
        metrics.wasserstein2(torch.zeros(3, 2), torch.zeros(3, 3))


# ----------------------------------------------------------------------------------------- sliced W2
def test_sliced_w2_is_at_most_w2():
    pairs = [("moons", "8gaussians"), ("moons", "moons"), ("rings", "checkerboard"), ("pinwheel", "2spirals")]
    for i, (a, b) in enumerate(pairs):
        x = data.sample(a, 300, seed=i, dtype=torch.float64)
        y = data.sample(b, 300, seed=100 + i, dtype=torch.float64)
        sw, w2 = metrics.sliced_wasserstein(x, y, seed=i), metrics.wasserstein2(x, y)
        assert 0 < sw <= w2 + 1e-12, (a, b, sw, w2)


def test_sliced_w2_properties():
    x = data.sample("moons", 300, seed=0, dtype=torch.float64)
    assert metrics.sliced_wasserstein(x, x) == 0.0
    # in one dimension every projection is +-1: sliced W2 = W2
    assert metrics.sliced_wasserstein(x[:, :1], x[:, 1:]) == pytest.approx(metrics.wasserstein2(x[:, :1], x[:, 1:]))
    # shifting by c gives sqrt(mean((theta . c)^2)), and E (theta . c)^2 = |c|^2 / d for uniform directions
    c = torch.tensor([3.0, 4.0], dtype=torch.float64)
    sw = metrics.sliced_wasserstein(x, x + c, num_projections=4000, seed=1)
    assert sw == pytest.approx(5 / math.sqrt(2), rel=0.03)
    assert metrics.sliced_wasserstein(x, x + c, seed=7) == metrics.sliced_wasserstein(x, x + c, seed=7)


# ----------------------------------------------------------------------------------------- MMD
def test_mmd_identical_is_zero_and_different_is_positive():
    x = data.sample("moons", 500, seed=0, dtype=torch.float64)
    assert metrics.mmd2(x, x) == pytest.approx(0.0, abs=1e-12)
    same = metrics.mmd2(x, data.sample("moons", 500, seed=1, dtype=torch.float64))
    diff = metrics.mmd2(x, data.sample("8gaussians", 500, seed=1, dtype=torch.float64))
    # the V-statistic of one law is biased upwards by O(1/n) (here ~0.02); another law is far above it
    assert diff > 0 and diff > 5 * same, (same, diff)


def test_unbiased_mmd_of_one_law_is_zero_in_expectation():
    # 30 replications of the unbiased estimate on independent moons samples: mean within 3 standard errors of 0;
    # against 8 gaussians every replication is far above that
    same = torch.tensor(
        [
            metrics.mmd2(
                data.sample("moons", 150, seed=2 * i), data.sample("moons", 150, seed=2 * i + 1), unbiased=True
            )
            for i in range(30)
        ]
    )
    assert same.mean().abs() < 3 * same.std() / math.sqrt(30)
    diff = metrics.mmd2(data.sample("moons", 150, seed=0), data.sample("8gaussians", 150, seed=1), unbiased=True)
    assert diff > same.max() + 5 * same.std()


# ----------------------------------------------------------------------------------------- NLL
def test_nll_and_bits_per_dim():
    d = 5
    x = torch.randn(20_000, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    log_prob = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1)
    # the NLL of the true model estimates the entropy d/2 log(2 pi e) (standard error ~ sqrt(d/2)/sqrt(n))
    assert metrics.nll(log_prob) == pytest.approx(
        d / 2 * math.log(2 * math.pi * math.e), abs=4 * math.sqrt(d / 2 / 20_000)
    )
    assert metrics.bits_per_dim(d * math.log(2.0), d) == pytest.approx(1.0)
    # a uniform model on [0, 1]^d of 8-bit data scaled by 1/256: NLL 0 nats in model space is 8 bits/dim
    assert metrics.bits_per_dim(0.0, 3 * 32 * 32, scale=1 / 256) == pytest.approx(8.0)
    assert metrics.bits_per_dim(torch.tensor([1.0, 3.0]), 2) == pytest.approx(2 / (2 * math.log(2)))
    with pytest.raises(ValueError):
        metrics.bits_per_dim(1.0, 0)
