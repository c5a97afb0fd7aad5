r"""Exact scores and log-densities of diffusion marginals for Gaussian and Gaussian-mixture data.

If the data are :math:`N(\mu, \Sigma)`, the marginal of any process of
:mod:`torchnde.generative.processes` is :math:`p_t = N(\alpha\mu + m, \alpha^2\Sigma +
\sigma^2 I)`; for a mixture :math:`\sum_k w_k N(\mu_k, \operatorname{diag} s_k^2)` it is the
mixture of the components' marginals, with score
:math:`\nabla\log p_t = \sum_k r_k(x)\,\nabla\log p_{t,k}(x)` (responsibilities :math:`r_k`).
These closed forms are the analytic oracles that the samplers' and likelihoods' tests compare
against: with the exact score, every sampler must reproduce :math:`p_{t_0}` as its step count
grows.

Everything follows the dtype and device of the query ``x``; the data parameters are converted on
use. Times may be floats or ``(B,)`` tensors.
"""

from __future__ import annotations

import math

import torch

from .parameterisation import Parameterisation
from .processes import DiffusionProcess, expand_time

__all__ = ["GaussianData", "GaussianMixtureData"]


def _as(x, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x).to(dtype=like.dtype, device=like.device)


class _Oracle:
    """Shared helpers: models of every parameterisation from the exact score."""

    dim: int

    def score(self, process: DiffusionProcess, t, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def log_prob(self, process: DiffusionProcess, t, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def score_fn(self, process: DiffusionProcess):
        """``score(t, x)`` of the marginals of ``process`` (declaring ``event_shape = (dim,)``)."""

        def score(t, x):
            return self.score(process, t, x)

        score.event_shape = (self.dim,)
        return score

    def model(self, process: DiffusionProcess, kind: str = "score"):
        """An exact "trained model" ``model(t, x)`` predicting ``kind`` (``"eps"``, ``"x0"``,
        ``"v"``, ``"score"`` or ``"velocity"``) under ``process`` (declaring ``event_shape = (dim,)``)."""
        param = Parameterisation("score", process)

        def model(t, x):
            return param.convert(kind, t, x, self.score(process, t, x))

        model.event_shape = (self.dim,)
        return model

    def marginal_sample(self, process: DiffusionProcess, t, n: int, generator=None, dtype=torch.float64, device=None):
        """``n`` exact draws of :math:`x_t` (data pushed through the forward marginal)."""
        x0 = self.sample(n, generator=generator, dtype=dtype, device=device)
        eps = torch.randn(x0.shape, generator=generator, dtype=dtype, device=device)
        return process.marginal_sample(t, x0, eps)


class GaussianData(_Oracle):
    r"""Data :math:`N(\mu, \Sigma)` in ``d`` dimensions (full covariance).

    Args:
        mean: ``(d,)``.
        cov: ``(d, d)`` symmetric positive semi-definite.
    """

    def __init__(self, mean, cov):
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.cov = torch.as_tensor(cov, dtype=torch.float64)
        d = self.mean.shape[-1]
        if self.mean.shape != (d,) or self.cov.shape != (d, d):
            raise ValueError(f"need mean (d,) and cov (d, d); got {tuple(self.mean.shape)}, {tuple(self.cov.shape)}")
        if not torch.allclose(self.cov, self.cov.T):
            raise ValueError("cov must be symmetric")
        lam, U = torch.linalg.eigh(self.cov)
        if (lam < -1e-12 * lam.abs().max()).any():
            raise ValueError(f"cov must be positive semi-definite; eigenvalues {lam.tolist()}")
        self.eigvals, self.eigvecs = lam.clamp(min=0), U
        self.dim = d

    def _moments(self, process, t, x):
        """Mean (broadcast to x) and the marginal covariance's eigenvalues (broadcast ``(B|1, d)``)."""
        a, s = process.marginal(t)
        a, s = expand_time(a, x), expand_time(s, x)
        mean = a * _as(self.mean, x) + process.mean_offset(t, x)
        lam = a * a * _as(self.eigvals, x) + s * s
        return mean, lam

    def score(self, process, t, x):
        """:math:`-(\\alpha^2\\Sigma + \\sigma^2 I)^{-1}(x - \\text{mean})`, shape of ``x`` ``(B, d)``."""
        mean, lam = self._moments(process, t, x)
        U = _as(self.eigvecs, x)
        z = (x - mean) @ U
        return -(z / lam) @ U.T

    def log_prob(self, process, t, x):
        """Exact :math:`\\log p_t(x)`, shape ``(B,)``."""
        mean, lam = self._moments(process, t, x)
        z = (x - mean) @ _as(self.eigvecs, x)
        lam = lam.expand_as(z)
        return -0.5 * ((z * z) / lam + torch.log(lam)).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)

    def marginal_moments(self, process, t):
        """Mean ``(d,)`` and covariance ``(d, d)`` of :math:`p_t` (float64; ``t`` a float, and for
        :class:`~torchnde.generative.processes.MeanReverting` a scalar mean)."""
        a, s = process.marginal(float(t))
        probe = torch.zeros(1, self.dim, dtype=torch.float64)
        mean = a * self.mean + torch.as_tensor(process.mean_offset(float(t), probe), dtype=torch.float64).reshape(-1)
        return mean, a * a * self.cov + s * s * torch.eye(self.dim, dtype=torch.float64)

    def sample(self, n: int, generator=None, dtype=torch.float64, device=None) -> torch.Tensor:
        """``n`` draws of the data."""
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=device)
        root = self.eigvecs.to(device) * self.eigvals.to(device).sqrt()
        return (self.mean.to(device) + z @ root.T).to(dtype)


class GaussianMixtureData(_Oracle):
    r"""Data :math:`\sum_k w_k N(\mu_k, \operatorname{diag}(s_k^2))`.

    Args:
        weights: ``(K,)`` positive (normalised on construction).
        means: ``(K, d)``.
        stds: a float, ``(K,)`` (isotropic per component) or ``(K, d)`` (diagonal).
    """

    def __init__(self, weights, means, stds):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(self.means.shape)}")
        K, d = self.means.shape
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if w.shape != (K,) or not (w > 0).all():
            raise ValueError(f"weights must be {K} positive numbers, got {w.tolist()}")
        self.weights = w / w.sum()
        s = torch.as_tensor(stds, dtype=torch.float64)
        if s.dim() == 0:
            s = s.expand(K)
        if s.dim() == 1:
            if s.shape != (K,):
                raise ValueError(f"stds must be a float, (K,) or (K, d); got {tuple(s.shape)}")
            s = s[:, None].expand(K, d)
        if s.shape != (K, d) or (s < 0).any():
            raise ValueError(f"stds must be non-negative with shape (K,) or (K, d); got {tuple(s.shape)}")
        self.stds = s.clone()
        self.dim = d
        self.num_components = K

    def _components(self, process, t, x):
        """``x - mean_k`` (B, K, d) and variances (B|1, K, d) of the components' marginals."""
        a, s = process.marginal(t)
        a, s = expand_time(a, x), expand_time(s, x)  # (B|1, 1)
        off = process.mean_offset(t, x)
        off = off.unsqueeze(1) if isinstance(off, torch.Tensor) and off.dim() == x.dim() else off
        mean = a.unsqueeze(-1) * _as(self.means, x) if isinstance(a, torch.Tensor) else a * _as(self.means, x)
        diff = x.unsqueeze(1) - mean - off
        s2 = s * s
        a2 = a * a
        var = (a2.unsqueeze(-1) if isinstance(a2, torch.Tensor) else a2) * _as(self.stds, x) ** 2 + (
            s2.unsqueeze(-1) if isinstance(s2, torch.Tensor) else s2
        )
        return diff, var

    def _log_joint(self, diff, var, x):
        lw = torch.log(_as(self.weights, x))
        return lw - 0.5 * ((diff * diff) / var + torch.log(var)).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)

    def log_prob(self, process, t, x):
        """Exact :math:`\\log p_t(x)`, shape ``(B,)``."""
        diff, var = self._components(process, t, x)
        return torch.logsumexp(self._log_joint(diff, var, x), dim=-1)

    def score(self, process, t, x):
        """Exact score, shape of ``x``."""
        diff, var = self._components(process, t, x)
        r = torch.softmax(self._log_joint(diff, var, x), dim=-1)  # (B, K)
        return -(r.unsqueeze(-1) * diff / var).sum(1)

    def sample(self, n: int, generator=None, dtype=torch.float64, device=None) -> torch.Tensor:
        """``n`` draws of the data."""
        k = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=device)
        return (self.means.to(device)[k] + self.stds.to(device)[k] * z).to(dtype)
