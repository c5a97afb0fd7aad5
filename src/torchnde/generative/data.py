"""Built-in data for generative modelling: 2-D toy densities and scikit-learn's 8×8 digits.

Nothing is downloaded. The toy densities are the usual benchmarks of continuous normalizing flows
and flow matching (Grathwohl et al. 2019, "FFJORD"; Tong et al. 2024, "Improving and generalizing
flow-based generative models with minibatch optimal transport"), written here from their
geometric descriptions:

=============  ===============================================================================
name           raw construction (before standardisation)
=============  ===============================================================================
moons          the law of ``sklearn.datasets.make_moons(n, noise=0.05)``: two interleaved half
               circles, here with i.i.d. uniform angles (make_moons puts them on a grid)
8gaussians     eight Gaussians (std 0.25) with centres on the circle of radius 2
checkerboard   uniform on the 8 black squares of a 4×4 chessboard on ``[-2, 2]²``
swissroll      the 2-D swiss roll ``t (cos t, sin t)``, ``t = 1.5π (1 + 2u)``, plus N(0, 1)
pinwheel       five arms: radial std 0.3, tangential std 0.1, twist rate 0.25
rings          four concentric circles of radii 1, 2, 3, 4 (equal mass), radial noise std 0.1
2spirals       two point-symmetric Archimedean spirals of 1.5 turns, isotropic noise std 0.1
=============  ===============================================================================

**Scaling.** Every density is *standardised* by a fixed affine map per coordinate,
``x = (raw - mean) / std``, so each coordinate has mean 0 and variance 1 (to about 1e-3). The
constants, hard-coded in ``_STANDARDISE``, are closed-form where the law allows it and otherwise
measured once on 12 million samples. So "scaled moons" in the tests and in the issue means
``sample("moons", n)``: make_moons' law with noise 0.05, minus ``(0.5, 0.25)``, divided by
``(0.86747, 0.49668)`` (the population standard deviations). A distance of 0.25 in W2 is then a
quarter of a standard deviation.

Samples are a pure function of ``(name, n, seed)`` (numpy's PCG64 generator, then converted), so
they are identical on every device and dtype up to rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["TOY_DENSITIES", "sample", "digits", "DIGITS_LEVELS"]

#: names accepted by :func:`sample`
TOY_DENSITIES = ("moons", "8gaussians", "checkerboard", "swissroll", "pinwheel", "rings", "2spirals")

#: the 8×8 digits take integer intensities 0, ..., 16
DIGITS_LEVELS = 17


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    # the law of sklearn.datasets.make_moons(n, noise=0.05) with independent angles: make_moons
    # places the angles on a regular grid, so its points are not an i.i.d. sample (two draws would
    # be closer to each other than two samples of the law, biasing W2 and MMD baselines)
    theta = math.pi * rng.random(n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(theta), 1.0 - np.cos(theta))
    y = np.where(upper, np.sin(theta), 0.5 - np.sin(theta))
    return np.stack([x, y], 1) + 0.05 * rng.standard_normal((n, 2))


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    k = rng.integers(0, 8, n)
    angle = k * (math.pi / 4)
    centres = 2.0 * np.stack([np.cos(angle), np.sin(angle)], 1)
    return centres + 0.25 * rng.standard_normal((n, 2))


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    # the 8 unit squares (i, j) of [-2, 2]^2 with i + j even
    cells = np.array([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0], dtype=float)
    k = rng.integers(0, len(cells), n)
    return cells[k] - 2.0 + rng.random((n, 2))


def _swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    t = 1.5 * math.pi * (1.0 + 2.0 * rng.random(n))
    return np.stack([t * np.cos(t), t * np.sin(t)], 1) + rng.standard_normal((n, 2))


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    k = rng.integers(0, arms, n)
    feats = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std]) + np.array([1.0, 0.0])
    angle = k * (2 * math.pi / arms) + rate * np.exp(feats[:, 0])
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * feats[:, 0] - s * feats[:, 1], s * feats[:, 0] + c * feats[:, 1]], 1)


def _rings(n: int, rng: np.random.Generator) -> np.ndarray:
    r = rng.integers(1, 5, n).astype(float) + 0.1 * rng.standard_normal(n)
    angle = 2 * math.pi * rng.random(n)
    return np.stack([r * np.cos(angle), r * np.sin(angle)], 1)


def _two_spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    # arc parameter with density growing like the arc length, up to 1.5 turns
    u = np.sqrt(rng.random(n)) * 3 * math.pi
    sign = np.where(rng.random(n) < 0.5, 1.0, -1.0)[:, None]
    x = np.stack([-np.cos(u) * u, np.sin(u) * u], 1) * sign
    return x + 0.1 * rng.standard_normal((n, 2))


_RAW = {
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "swissroll": _swissroll,
    "pinwheel": _pinwheel,
    "rings": _rings,
    "2spirals": _two_spirals,
}

# per-coordinate (mean, std) of each raw density (see the module docstring)
_STANDARDISE = {
    "moons": ((0.5, 0.25), (0.86747, 0.49668)),  # exact: var = (0.75, 0.625 - 1/pi - 1/16) + 0.05^2
    "8gaussians": ((0.0, 0.0), (1.43614, 1.43614)),  # exact: var = 2 + 0.25^2
    "checkerboard": ((0.0, 0.0), (1.15470, 1.15470)),  # exact: U[-2, 2] marginals
    "swissroll": ((2.0016, 0.2085), (6.6979, 7.0228)),  # measured
    "pinwheel": ((0.0, 0.0), (0.74162, 0.74162)),  # exact: var = (1 + 0.3^2 + 0.1^2) / 2
    "rings": ((0.0, 0.0), (1.93778, 1.93778)),  # exact: var = (7.5 + 0.1^2) / 2
    "2spirals": ((0.0, 0.0), (4.7918, 4.6340)),  # mean 0 by symmetry; std measured
}


def _check_name(name: str) -> None:
    if name not in _RAW:
        raise ValueError(f"unknown data set {name!r}; valid names are: {', '.join(TOY_DENSITIES)}")


def _raw(name: str, n: int, seed: int) -> np.ndarray:
    _check_name(name)
    return _RAW[name](n, np.random.default_rng(seed))


def sample(name: str, n: int, *, seed: int = 0, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """``n`` samples of the standardised 2-D toy density ``name``, a tensor of shape ``(n, 2)``.

    Args:
        name: one of :data:`TOY_DENSITIES`.
        n: number of samples.
        seed: the samples are a deterministic function of ``(name, n, seed)``.
        dtype, device: of the returned tensor (defaults: torch's default dtype and device).

    Raises:
        ValueError: for an unknown ``name`` (the message lists the valid names) or ``n < 0``.
    """
    _check_name(name)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int; got {n!r}")
    mean, std = _STANDARDISE[name]
    x = (_raw(name, n, seed) - np.asarray(mean)) / np.asarray(std)
    return torch.as_tensor(x, dtype=torch.float64).to(dtype=dtype or torch.get_default_dtype(), device=device)


def digits(
    split: str = "train",
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    flatten: bool = True,
    dtype: torch.dtype | None = None,
    device=None,
) -> torch.utils.data.TensorDataset:
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, no download) as a dataset.

    Returns a ``TensorDataset(images, labels)``: ``images`` hold the raw integer intensities
    ``0, ..., 16`` (:data:`DIGITS_LEVELS` levels) as floats of ``dtype`` with shape ``(n, 64)``
    (``flatten=True``) or ``(n, 1, 8, 8)``; ``labels`` are int64 classes 0–9. The split is a
    stratified train/test split with ``test_fraction`` of the images in ``"test"``, fixed by
    ``seed`` (the two splits of one seed are disjoint and cover the data set). For a continuous
    model, dequantize (``(x + u) / 17`` with ``u ~ U[0, 1)``) and report bits/dim with
    :func:`torchnde.generative.metrics.bits_per_dim` and ``scale=1/17``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=test_fraction, random_state=seed, stratify=data.target
    )
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    images = torch.as_tensor(x, dtype=torch.float64).to(dtype=dtype or torch.get_default_dtype(), device=device)
    if not flatten:
        images = images.reshape(-1, 1, 8, 8)
    labels = torch.as_tensor(y, dtype=torch.int64, device=device)
    return torch.utils.data.TensorDataset(images, labels)
