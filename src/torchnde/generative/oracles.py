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

__all__ = ["GaussianData", "GaussianMixtureData", "GaussianSchrodingerBridge"]


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


# ---------------------------------------------------------------------------------------- bridges
def _psd_sqrt(S: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The symmetric square root (or inverse square root) of a symmetric positive-definite matrix."""
    lam, U = torch.linalg.eigh(S)
    r = lam.clamp_min(0).sqrt()
    return (U * (1 / r if inverse else r)) @ U.T


def _spd(name: str, S, d: int) -> torch.Tensor:
    S = torch.as_tensor(S, dtype=torch.float64)
    if S.shape != (d, d):
        raise ValueError(
            f"{name} must be a ({d}, {d}) covariance matrix (d from the means); got shape {tuple(S.shape)}"
        )
    if not torch.allclose(S, S.T, atol=1e-12, rtol=1e-10):
        raise ValueError(f"{name} must be symmetric")
    lam = torch.linalg.eigvalsh(S)
    if not (lam > 0).all():
        raise ValueError(f"{name} must be positive definite; its smallest eigenvalue is {float(lam.min()):.3g}")
    return 0.5 * (S + S.T)


class GaussianSchrodingerBridge:
    r"""The Schrödinger bridge between :math:`N(m_0, \Sigma_0)` and :math:`N(m_1, \Sigma_1)`, in closed form.

    The reference process is :math:`\sigma W` on :math:`[0, 1]` (:math:`dX = \sigma\,dW`). The
    Schrödinger bridge (SB) is the path measure closest in KL to the reference with the two
    given marginals; its endpoint coupling :math:`\pi` minimises
    :math:`\mathbb E_\pi \lVert x_0 - x_1\rVert^2 - 2\sigma^2 H(\pi)`, i.e. it is the entropic
    optimal transport plan for the squared Euclidean cost at **regularisation**
    :math:`\varepsilon = 2\sigma^2` (the reference's transition density is
    :math:`\propto e^{-\lVert x_1 - x_0\rVert^2 / 2\sigma^2}`), and the SB is the mixture of
    Brownian bridges :math:`x_t = (1-t)x_0 + t x_1 + \sigma\sqrt{t(1-t)}\,z` over :math:`\pi`.

    For Gaussians the plan is Gaussian with cross-covariance (Janati et al. 2020; Mallasto et
    al. 2022, "Entropy-regularized 2-Wasserstein distance between Gaussian measures"; Bunne et
    al. 2023, "The Schrödinger bridge between Gaussian measures has a closed form")

    .. math:: C_\sigma = \operatorname{Cov}(x_0, x_1) = \tfrac12\,\Sigma_0^{1/2} D_\sigma \Sigma_0^{-1/2}
              - \tfrac{\sigma^2}{2} I, \qquad D_\sigma = \bigl(4\,\Sigma_0^{1/2}\Sigma_1\Sigma_0^{1/2}
              + \sigma^4 I\bigr)^{1/2}.

    (For :math:`\Sigma_0 = \Sigma_1 = I`, :math:`\sigma = 1`: :math:`C = (\sqrt5 - 1)/2 \approx
    0.618\,I`, whatever the means.) Its marginals are :math:`N(m_t, \Sigma_t)`,
    :math:`m_t = (1-t)m_0 + t m_1`, :math:`\Sigma_t = (1-t)^2\Sigma_0 + t^2\Sigma_1 +
    t(1-t)(C + C^\top + \sigma^2 I)`, and it is the law of the Markovian SDE
    :math:`dX = b(t, X)\,dt + \sigma\,dW`, :math:`X_0 \sim N(m_0, \Sigma_0)`, with the drift
    :math:`b(t, x) = \mathbb E[(x_1 - x_t)/(1-t) \mid x_t = x]`:

    .. math:: b(t, x) = m_1 - m_0 + P_t \Sigma_t^{-1}(x - m_t), \qquad
              P_t = t\,(\Sigma_1 - C - \sigma^2 I) - (1-t)(\Sigma_0 - C^\top),

    bounded on the closed interval :math:`[0, 1]`.

    Args:
        m0, m1: the means, shape ``(d,)``.
        S0, S1: the covariances, ``(d, d)`` symmetric positive definite.
        sigma: the reference's noise level :math:`\sigma > 0`.

    Everything is computed in float64 and returned in the dtype/device of the query (``x``) or,
    for :meth:`marginal` and :meth:`cross_covariance`, in float64.
    """

    def __init__(self, m0, S0, m1, S1, sigma: float = 1.0):
        self.m0 = torch.as_tensor(m0, dtype=torch.float64).reshape(-1).clone()
        self.m1 = torch.as_tensor(m1, dtype=torch.float64).reshape(-1).clone()
        d = self.m0.shape[0]
        if torch.as_tensor(m0).dim() != 1 or self.m1.shape != (d,) or torch.as_tensor(m1).dim() != 1:
            raise ValueError(
                f"m0 and m1 must be vectors of the same length d; got shapes {tuple(torch.as_tensor(m0).shape)} "
                f"and {tuple(torch.as_tensor(m1).shape)}"
            )
        if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool)) or not sigma > 0:
            raise ValueError(f"sigma must be a number > 0 (the reference sigma*W); got {sigma!r}")
        self.S0, self.S1 = _spd("S0", S0, d), _spd("S1", S1, d)
        self.sigma = float(sigma)
        self.dim = d
        r0 = _psd_sqrt(self.S0)
        r0i = _psd_sqrt(self.S0, inverse=True)
        eye = torch.eye(d, dtype=torch.float64)
        D = _psd_sqrt(4 * r0 @ self.S1 @ r0 + self.sigma**4 * eye)
        self.C = 0.5 * r0 @ D @ r0i - 0.5 * self.sigma**2 * eye

    def __repr__(self):
        return f"GaussianSchrodingerBridge(dim={self.dim}, sigma={self.sigma})"

    def cross_covariance(self) -> torch.Tensor:
        r""":math:`C_\sigma = \operatorname{Cov}(x_0, x_1)` of the SB's endpoint coupling, ``(d, d)`` float64."""
        return self.C.clone()

    def coupling_covariance(self) -> torch.Tensor:
        """The joint covariance of ``(x0, x1)``, ``(2d, 2d)`` float64."""
        return torch.cat([torch.cat([self.S0, self.C], 1), torch.cat([self.C.T, self.S1], 1)], 0)

    @staticmethod
    def _check_t(t) -> float:
        t = float(t)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must be in [0, 1]; got {t}")
        return t

    def marginal(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(d,)`` and covariance ``(d, d)`` (float64) of the SB at time ``t`` in ``[0, 1]``."""
        t = self._check_t(t)
        mean = (1 - t) * self.m0 + t * self.m1
        eye = torch.eye(self.dim, dtype=torch.float64)
        cov = (1 - t) ** 2 * self.S0 + t**2 * self.S1 + t * (1 - t) * (self.C + self.C.T + self.sigma**2 * eye)
        return mean, 0.5 * (cov + cov.T)

    def _gain(self, t: float) -> torch.Tensor:
        """:math:`P_t\\Sigma_t^{-1}`, ``(d, d)`` float64."""
        _, cov = self.marginal(t)
        eye = torch.eye(self.dim, dtype=torch.float64)
        P = t * (self.S1 - self.C - self.sigma**2 * eye) - (1 - t) * (self.S0 - self.C.T)
        return torch.linalg.solve(cov, P.T).T

    def drift(self, t, x: torch.Tensor) -> torch.Tensor:
        r"""The SB's drift :math:`b(t, x)` for ``x`` of shape ``(B, d)``; ``t`` a float or a 0-d or
        ``(B,)`` tensor in ``[0, 1]`` (as for :meth:`score`, :meth:`backward_drift` and
        :meth:`velocity`). Returns ``(B, d)`` in ``x``'s dtype and device."""
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}); got {tuple(x.shape)}")
        t = self._uniform_time(t, x)
        if isinstance(t, torch.Tensor):
            ts = t.detach().to("cpu", torch.float64)
            G = torch.stack([self._gain(float(s)) for s in ts])  # (B, d, d)
            mt = (1 - ts)[:, None] * self.m0 + ts[:, None] * self.m1
            G, mt = _as(G, x), _as(mt, x)
            return _as(self.m1 - self.m0, x) + torch.einsum("bij,bj->bi", G, x - mt)
        mt = (1 - t) * self.m0 + t * self.m1
        return _as(self.m1 - self.m0, x) + (x - _as(mt, x)) @ _as(self._gain(t), x).T

    def score(self, t, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla\log p_t(x) = -\Sigma_t^{-1}(x - m_t)` for ``x`` ``(B, d)``."""
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}); got {tuple(x.shape)}")
        t = self._uniform_time(t, x)
        if isinstance(t, torch.Tensor):
            ts = t.detach().to("cpu", torch.float64)
            P = torch.stack([torch.linalg.inv(self.marginal(float(s))[1]) for s in ts])
            mt = (1 - ts)[:, None] * self.m0 + ts[:, None] * self.m1
            return -torch.einsum("bij,bj->bi", _as(P, x), x - _as(mt, x))
        mean, cov = self.marginal(t)
        return -(x - _as(mean, x)) @ _as(torch.linalg.inv(cov), x)

    def _uniform_time(self, t, x):
        """``t`` as a float when it is one time for the batch; else a checked ``(B,)`` tensor."""
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.numel() > 0 and bool((t == t[0]).all()):
            t = t[0]  # one time for the batch (what a fixed-step solve passes)
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            if t.shape != (x.shape[0],):
                raise ValueError(f"a per-sample t must have shape ({x.shape[0]},); got {tuple(t.shape)}")
            if ((t < 0) | (t > 1)).any():
                raise ValueError("t must be in [0, 1]")
            return t
        return self._check_t(t)

    def backward_drift(self, t, x: torch.Tensor) -> torch.Tensor:
        r"""The drift of the time-reversed SB :math:`Y_s = X_{1-s}` in :math:`s`, evaluated at
        the forward time ``t``: :math:`-b(t, x) + \sigma^2\nabla\log p_t(x)`."""
        return -self.drift(t, x) + self.sigma**2 * self.score(t, x)

    def velocity(self, t, x: torch.Tensor) -> torch.Tensor:
        r"""The probability-flow velocity :math:`b(t, x) - \tfrac{\sigma^2}{2}\nabla\log p_t(x)`:
        :math:`\dot x = v` has the SB's marginals."""
        return self.drift(t, x) - 0.5 * self.sigma**2 * self.score(t, x)

    def sample_coupling(
        self, n: int, generator: torch.Generator | None = None, dtype=torch.float64, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` exact draws ``(x0, x1)`` of the SB's endpoint coupling, each ``(n, d)``."""
        L = torch.linalg.cholesky(self.coupling_covariance())
        z = torch.randn(n, 2 * self.dim, generator=generator, dtype=torch.float64, device=device)
        xy = torch.cat([self.m0, self.m1]).to(device) + z @ L.T.to(device)
        return xy[:, : self.dim].to(dtype), xy[:, self.dim :].to(dtype)

    def sample_marginal(self, t, n: int, generator=None, dtype=torch.float64, device=None) -> torch.Tensor:
        """``n`` exact draws of :math:`x_t`, ``(n, d)``."""
        mean, cov = self.marginal(t)
        L = torch.linalg.cholesky(cov)  # positive definite on [0, 1]: both ends are
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=device)
        return (mean.to(device) + z @ L.T.to(device)).to(dtype)
