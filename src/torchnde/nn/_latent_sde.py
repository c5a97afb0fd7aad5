r"""A latent SDE trained by variational inference (Li, Wong, Chen & Duvenaud 2020).

The generative model is an SDE in a latent space, observed through a decoder:

.. math::
    z_0 \sim p_\theta(z_0),\qquad dz = h_\theta(t, z)\,dt + \sigma_\theta(t, z)\,dW,\qquad
    x_{t_i} \sim p_\theta(x \mid z_{t_i}).

The approximate posterior is an SDE with the same diffusion and a drift that sees a context
computed from the data by an encoder (a GRU run backwards in time, so the context at
:math:`t_i` summarises the observations at :math:`t_i, \dots, t_N`):

.. math::
    z_0 \sim q_\phi(z_0 \mid x),\qquad dz = f_\phi(t, z, c(t))\,dt + \sigma_\theta(t, z)\,dW.

Because both SDEs share :math:`\sigma`, Girsanov's theorem gives the KL divergence between
their path measures as :math:`\mathbb E_q \int \tfrac12 |u|^2 dt` with
:math:`u = (f_\phi - h_\theta) / \sigma_\theta` (Li et al. 2020, section 5). It is integrated
alongside :math:`z` as one more coordinate of the state, whose diffusion is zero. The ELBO is

.. math::
    \mathbb E_q\Big[\sum_i \log p(x_{t_i} \mid z_{t_i})\Big]
    - \mathrm{KL}\big(q(z_0)\,\|\,p(z_0)\big) - \mathbb E_q \int_{t_0}^{t_N} \tfrac12 |u|^2 dt.

The diffusion is diagonal, each :math:`\sigma_i` a small MLP of :math:`z_i` alone (as in the
paper), so the noise is diagonal and the Itô and Stratonovich forms of the two SDEs differ by the
same drift correction: :math:`f_\phi - h_\theta`, and so the KL term, is the same in either
calculus.
"""

from __future__ import annotations

import bisect
import math
from typing import NamedTuple

import torch
from torch import nn

from .._saveat import SaveAt
from .._solve import solve
from .._terms import ControlTerm, MultiTerm, ODETerm
from ..adjoints import AbstractAdjoint, DirectAdjoint
from ..controllers import ConstantStepSize
from ..solvers import AbstractSolver, Euler
from ._neural_sde import _seed_from_global_rng, constant_step_grid, default_brownian

__all__ = ["LatentSDE", "LatentSDEOutput", "DiagonalDiffusion"]


class LatentSDEOutput(NamedTuple):
    """What :meth:`LatentSDE.forward` returns; every term is averaged over the batch.

    ``log_likelihood``: :math:`\\sum_i \\log p(x_{t_i} \\mid z_{t_i})` (summed over times and data
    dimensions); ``kl_z0``: :math:`\\mathrm{KL}(q(z_0) \\| p(z_0))`; ``kl_path``: the path-space KL
    :math:`\\int \\tfrac12 |u|^2 dt`; ``zs``: the posterior latent samples ``(T, batch, latent_dim)``.
    """

    log_likelihood: torch.Tensor
    kl_z0: torch.Tensor
    kl_path: torch.Tensor
    zs: torch.Tensor

    @property
    def elbo(self) -> torch.Tensor:
        """``log_likelihood - kl_z0 - kl_path`` (maximise it; the loss is ``-elbo``)."""
        return self.log_likelihood - self.kl_z0 - self.kl_path


class DiagonalDiffusion(nn.Module):
    r"""Diagonal diffusion :math:`\sigma_i(z_i) = \mathrm{sigmoid}(\mathrm{MLP}_i(z_i))`: one small
    MLP (1 → ``hidden`` → 1, softplus) per latent dimension, evaluated for all dimensions at once.
    Bounded in (0, 1), so :math:`u = (f - h)/\sigma` stays finite where :math:`\sigma` is not tiny.
    """

    def __init__(self, dim: int, hidden: int = 16):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(dim, hidden))
        self.w2 = nn.Parameter(torch.randn(dim, hidden) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(dim))

    def forward(self, t, z):
        hid = nn.functional.softplus(z.unsqueeze(-1) * self.w1 + self.b1)  # (..., dim, hidden)
        return torch.sigmoid((hid * self.w2).sum(-1) + self.b2)


class _PosteriorDrift(nn.Module):
    def __init__(self, latent_dim, context_dim, hidden_dim):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim + context_dim + 2, hidden_dim),
            nn.Softplus(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.Softplus(),
            nn.Linear(hidden_dim, latent_dim),
        )

    def forward(self, t, z, context):
        tt = torch.full_like(z[..., :1], t)
        return self.net(torch.cat([torch.sin(tt), torch.cos(tt), z, context], -1))


class _PriorDrift(nn.Module):
    def __init__(self, latent_dim, hidden_dim):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim + 2, hidden_dim),
            nn.Softplus(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.Softplus(),
            nn.Linear(hidden_dim, latent_dim),
        )

    def forward(self, t, z):
        tt = torch.full_like(z[..., :1], t)
        return self.net(torch.cat([torch.sin(tt), torch.cos(tt), z], -1))


class _Encoder(nn.Module):
    """GRU over the observations, backwards in time: context ``(T, batch, context_dim)``."""

    def __init__(self, data_dim, hidden_dim, context_dim):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.gru = nn.GRUCell(data_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, context_dim)

    def forward(self, xs):
        # a loop of GRU cells: on CPU much faster than nn.GRU for short, narrow sequences
        h = xs.new_zeros(xs.shape[1], self.hidden_dim)
        hs = []
        for x in xs.flip(0):
            h = self.gru(x, h)
            hs.append(h)
        return self.out(torch.stack(hs[::-1]))


def _normal_kl(m_q, logs_q, m_p, logs_p):
    """KL(N(m_q, e^{2 logs_q}) || N(m_p, e^{2 logs_p})), elementwise."""
    return logs_p - logs_q + 0.5 * (torch.exp(2 * (logs_q - logs_p)) + ((m_q - m_p) / logs_p.exp()) ** 2) - 0.5


class LatentSDE(nn.Module):
    r"""A latent SDE model (Li, Wong, Chen & Duvenaud 2020, "Scalable gradients for stochastic
    differential equations", section 5): see the module docstring for the model and its ELBO.

    Submodules (each replaceable): ``encoder`` (GRU backwards in time + linear, giving the context),
    ``qz0_net`` (context at :math:`t_0` → mean and log-std of :math:`q(z_0)`),
    ``posterior_drift`` (``forward(t, z, context)``), ``prior_drift`` (``forward(t, z)``),
    ``diffusion`` (``forward(t, z)``, diagonal, shared), ``decoder`` (:math:`z` → mean of
    :math:`x`). Parameters ``pz0_mean``, ``pz0_logstd`` (the learned Gaussian prior on :math:`z_0`)
    and ``log_noise_std`` (the decoder's scale, learned unless ``learn_noise_std=False``).

    Args:
        data_dim, latent_dim, context_dim, hidden_dim: sizes.
        noise_std: the decoder's observation noise (initial value if learned).
        learn_noise_std: learn the decoder's scale (default ``True``).
        solver: default ``Euler()`` (Itô; any SDE solver for diagonal noise works).
        dt0: the largest step: each interval between observation times is cut into the fewest
            equal steps of at most ``dt0`` (``None``: a quarter of the smallest interval).
        adjoint: default ``DirectAdjoint()``.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        context_dim: int,
        hidden_dim: int,
        *,
        noise_std: float = 0.1,
        learn_noise_std: bool = True,
        solver: AbstractSolver | None = None,
        dt0: float | None = None,
        adjoint: AbstractAdjoint | None = None,
    ):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = _Encoder(data_dim, hidden_dim, context_dim)
        self.qz0_net = nn.Linear(context_dim, 2 * latent_dim)
        self.posterior_drift = _PosteriorDrift(latent_dim, context_dim, hidden_dim)
        self.prior_drift = _PriorDrift(latent_dim, hidden_dim)
        self.diffusion = DiagonalDiffusion(latent_dim, hidden=16)
        self.decoder = nn.Linear(latent_dim, data_dim)
        self.pz0_mean = nn.Parameter(torch.zeros(latent_dim))
        self.pz0_logstd = nn.Parameter(torch.zeros(latent_dim))
        self.log_noise_std = nn.Parameter(torch.tensor(math.log(noise_std)), requires_grad=learn_noise_std)
        self.solver = Euler() if solver is None else solver
        self.dt0 = dt0
        self.adjoint = DirectAdjoint() if adjoint is None else adjoint

    # -- the augmented posterior SDE: state (z, running KL) -------------------------------------

    def _augmented_drift(self, t, y, args):
        times, context = args
        z = y[..., :-1]
        # context of the latest observation at or before t (piecewise constant in time)
        i = min(max(bisect.bisect_right(times, t + 1e-9 * (times[-1] - times[0])) - 1, 0), len(times) - 1)
        f = self.posterior_drift(t, z, context[i])
        h = self.prior_drift(t, z)
        u = (f - h) / self.diffusion(t, z)
        return torch.cat([f, 0.5 * u.square().sum(-1, keepdim=True)], -1)

    def _augmented_diffusion(self, t, y, args):
        g = self.diffusion(t, y[..., :-1])
        return torch.cat([g, torch.zeros_like(g[..., :1])], -1)

    def _prior_drift(self, t, z, args):
        return self.prior_drift(t, z)

    def _diffusion(self, t, z, args):
        return self.diffusion(t, z)

    def _solve(self, drift, diffusion, y0, ts, args, seed):
        times = ts.detach().to(torch.float64).cpu()
        t0, t1 = float(times[0]), float(times[-1])
        dt = self.dt0 if self.dt0 is not None else float((times[1:] - times[:-1]).min()) / 4
        grid = constant_step_grid(t0, t1, dt, times[1:-1].tolist())
        controller = ConstantStepSize()
        controller.step_ts = torch.tensor(grid[1:-1], dtype=torch.float64)
        bm = default_brownian(
            t0,
            t1,
            y0.shape,
            seed=_seed_from_global_rng() if seed is None else seed,
            dtype=y0.dtype,
            device=y0.device,
            levy_area=self.solver.levy_area,
            grid=grid,
        )
        terms = MultiTerm(
            ODETerm(drift, time_as_float=True), ControlTerm(diffusion, bm, noise="diagonal", time_as_float=True)
        )
        sol = solve(
            terms,
            self.solver,
            t0,
            t1,
            y0,
            dt0=dt,
            args=args,
            saveat=SaveAt(ts=times),
            controller=controller,
            adjoint=self.adjoint,
            max_steps=None,
        )
        return sol.ys

    def forward(self, ts: torch.Tensor, xs: torch.Tensor, *, seed: int | None = None) -> LatentSDEOutput:
        """The ELBO's pieces for observations ``xs`` (``(T, batch, data_dim)``) at times ``ts``
        (``(T,)``, strictly increasing), from one posterior sample per series.

        Returns:
            :class:`LatentSDEOutput` (``.elbo`` = log-likelihood − KL at t0 − path KL, batch means).
        """
        if xs.dim() != 3 or xs.shape[0] != ts.shape[0]:
            raise ValueError(
                f"LatentSDE needs xs of shape (T, batch, data_dim) with T = len(ts) = {ts.shape[0]}, got {tuple(xs.shape)}"
            )
        context = self.encoder(xs)  # (T, batch, context_dim)
        qm, qlogs = self.qz0_net(context[0]).chunk(2, dim=-1)
        z0 = qm + qlogs.exp() * torch.randn_like(qm)
        y0 = torch.cat([z0, torch.zeros_like(z0[..., :1])], -1)
        times = ts.detach().to(torch.float64).cpu().tolist()
        ys = self._solve(self._augmented_drift, self._augmented_diffusion, y0, ts, (times, context), seed)
        zs, kl_path = ys[..., :-1], ys[-1, :, -1]
        scale = self.log_noise_std.exp()
        log_px = torch.distributions.Normal(self.decoder(zs), scale).log_prob(xs).sum((0, 2))
        kl_z0 = _normal_kl(qm, qlogs, self.pz0_mean, self.pz0_logstd).sum(-1)
        return LatentSDEOutput(log_px.mean(), kl_z0.mean(), kl_path.mean(), zs)

    @torch.no_grad()
    def sample(self, ts: torch.Tensor, batch: int, *, seed: int | None = None, latent: bool = False):
        """Sample ``batch`` series from the prior: :math:`z_0 \\sim p(z_0)`, the prior SDE, then the
        decoder's mean. Returns ``(T, batch, data_dim)`` (with ``latent=True`` also the latent
        paths ``(T, batch, latent_dim)``)."""
        m = self.pz0_mean
        z0 = m + self.pz0_logstd.exp() * torch.randn(batch, self.latent_dim, dtype=m.dtype, device=m.device)
        zs = self._solve(self._prior_drift, self._diffusion, z0, ts, None, seed)
        xs = self.decoder(zs)
        return (xs, zs) if latent else xs
