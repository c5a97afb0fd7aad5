r"""Discrete DDPM schedules as continuous processes, and models that take integer timesteps.

Diffusion libraries store a noise schedule as ``N`` numbers, the ``betas`` :math:`\beta_i` or the
``alphas_cumprod`` :math:`\bar\alpha_i = \prod_{j \le i}(1 - \beta_j)`, ``i = 0 .. N-1``, with
the noisy state :math:`x_i = \sqrt{\bar\alpha_i}\,x_0 + \sqrt{1 - \bar\alpha_i}\,\varepsilon`
(Ho et al. 2020), and their networks take the integer ``i``. :class:`DiscreteVP` is the
variance-preserving process whose marginals pass through those at the times

.. math:: t_i = (i + 1) / N, \qquad i = 0, \dots, N-1,

by interpolating :math:`\log\bar\alpha` linearly in :math:`t` between them, with
:math:`\log\bar\alpha(0) = 0` (the data) at :math:`t = 0`. So :math:`\alpha(t) =
\bar\alpha(t)^{1/2}`, :math:`\sigma(t) = (1 - \bar\alpha(t))^{1/2}` match the discrete
``alphas_cumprod`` exactly at the grid, and the process is the VP SDE :math:`dx = -\tfrac12
\beta(t) x\,dt + \sqrt{\beta(t)}\,dW` with the piecewise-constant rate

.. math:: \beta(t) = -\frac{d\log\bar\alpha}{dt} = -N \log(1 - \beta_i), \qquad t \in (t_{i-1},
          t_i]

(:math:`\approx N\beta_i`: the continuous-time limit that Song et al. 2021 take, without the
approximation). This is the convention of Lu et al.'s DPM-Solver (2022) ``NoiseScheduleVP
('discrete')``, which interpolates :math:`\log\alpha` piecewise linearly on the same grid, here
extended to :math:`t = 0`. :class:`DiscreteTimeModel` wraps a network ``net(timesteps, x)`` so that
every sampler of :func:`~torchnde.generative.samplers.sample` can call it at continuous times::

    process = DiscreteVP(betas=scheduler_betas)          # or alphas_cumprod=...
    model = DiscreteTimeModel(unet, process, x_first=True)   # unet(x, timesteps)
    out = sample(model, process, (16, 3, 32, 32), nfe=20, sampler="dpmpp_2m", parameterisation="eps")

The process samples from ``t1 = 1`` (timestep ``N - 1``) down to ``t0 = 1 / N`` (timestep 0, the
least noise the network saw).
"""

from __future__ import annotations

import bisect
import math

import torch

from ._shapes import event_shape_of
from .processes import DiffusionProcess, _check_n

__all__ = ["DiscreteVP", "DiscreteTimeModel", "TIMESTEP_MODES"]

#: how :class:`DiscreteTimeModel` maps a continuous time to the network's timestep
TIMESTEP_MODES = ("fractional", "round")


def _as_vector(name, v) -> torch.Tensor:
    try:
        v = torch.as_tensor(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be a 1-d sequence of numbers, got {type(v).__name__}") from e
    if v.dim() != 1 or v.numel() < 2:
        raise ValueError(f"{name} must be 1-d with at least two entries (one per timestep), got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} must be finite")
    return v


class DiscreteVP(DiffusionProcess):
    r"""The VP process of a discrete DDPM schedule (see the module docstring).

    Give exactly one of ``betas`` (each in ``(0, 1)``) or ``alphas_cumprod`` (strictly
    decreasing, in ``(0, 1]``), of length ``N`` (the number of training timesteps), as stored by
    diffusion libraries.

    Args:
        betas: :math:`\beta_i`, ``i = 0 .. N-1``.
        alphas_cumprod: :math:`\bar\alpha_i`.
        t0: the time sampling ends at (default ``1 / N``, timestep 0).
        t1: the time sampling starts at (default 1, timestep ``N - 1``).

    Attributes:
        num_timesteps: ``N``.
        alphas_cumprod: :math:`\bar\alpha_i` (float64).
    """

    def __init__(self, betas=None, *, alphas_cumprod=None, t0: float | None = None, t1: float = 1.0):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("give exactly one of betas=... or alphas_cumprod=... (the discrete schedule)")
        if betas is not None:
            b = _as_vector("betas", betas)
            if not ((b > 0) & (b < 1)).all():
                raise ValueError(
                    f"betas must lie in (0, 1); got min {float(b.min())}, max {float(b.max())} "
                    "(a beta of 1 means zero terminal SNR: clip it below 1, e.g. to 0.999)"
                )
            log_ab = torch.cumsum(torch.log1p(-b), 0)
        else:
            ab = _as_vector("alphas_cumprod", alphas_cumprod)
            if not ((ab > 0) & (ab <= 1)).all():
                raise ValueError(
                    f"alphas_cumprod must lie in (0, 1]; got min {float(ab.min())}, max {float(ab.max())} "
                    "(0 is zero terminal SNR, which has no log-SNR: clip it, e.g. to 1e-8)"
                )
            if not (ab[1:] < ab[:-1]).all():
                raise ValueError("alphas_cumprod must be strictly decreasing (more noise at every timestep)")
            log_ab = torch.log(ab)
        if not (log_ab[0] < 0):
            raise ValueError("the first timestep must add noise (alphas_cumprod[0] < 1)")
        n = log_ab.numel()
        self.num_timesteps = n
        self.alphas_cumprod = torch.exp(log_ab)
        self._table = torch.cat([torch.zeros(1, dtype=torch.float64), log_ab])  # log abar at k / N, k = 0..N
        self._list = self._table.tolist()
        self._neg = [-v for v in self._list]  # increasing, for bisect
        self._tables: dict = {}  # the table per (dtype, device), made once
        t0 = 1.0 / n if t0 is None else float(t0)
        if not 0.0 <= t0 < float(t1) <= 1.0:
            raise ValueError(f"need 0 <= t0 < t1 <= 1, got t0={t0}, t1={t1}")
        self.t0, self.t1 = t0, float(t1)

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, **kw) -> DiscreteVP:
        """DDPM's linear schedule (Ho et al. 2020: 1000 steps from 1e-4 to 0.02)."""
        _check_n(num_timesteps)
        return cls(torch.linspace(beta_start, beta_end, int(num_timesteps), dtype=torch.float64), **kw)

    def __repr__(self):
        return f"DiscreteVP(num_timesteps={self.num_timesteps}, t0={self.t0}, t1={self.t1})"

    # -- the table ---------------------------------------------------------------------------
    def _segment_f(self, t: float):
        u = t * self.num_timesteps
        k = min(max(int(math.floor(u)), 0), self.num_timesteps - 1)
        return k, u - k

    def _rate_segment_f(self, t: float) -> int:
        # the rate is left-continuous: beta_i on (i / N, (i + 1) / N]
        return min(max(math.ceil(t * self.num_timesteps) - 1, 0), self.num_timesteps - 1)

    def _rate_f(self, t: float) -> float:
        k = self._rate_segment_f(t)
        return -self.num_timesteps * (self._list[k + 1] - self._list[k])

    def _log_abar_f(self, t: float) -> float:
        k, f = self._segment_f(t)
        lo, hi = self._list[k], self._list[k + 1]
        return lo + f * (hi - lo)

    def _tab(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.dtype, t.device)
        tab = self._tables.get(key)
        if tab is None:
            tab = self._tables[key] = self._table.to(dtype=t.dtype, device=t.device)
        return tab

    def _segment(self, t: torch.Tensor):
        tab = self._tab(t)
        u = t * self.num_timesteps
        k = u.floor().clamp(0, self.num_timesteps - 1)
        ki = k.long()
        return tab[ki], tab[ki + 1], u - k

    def _coeffs(self, t):
        lo, hi, f = self._segment(t)
        la = lo + f * (hi - lo)
        return torch.exp(0.5 * la), torch.sqrt(-torch.expm1(la))

    def _rate(self, t):
        tab = self._tab(t)
        k = (torch.ceil(t * self.num_timesteps) - 1).clamp(0, self.num_timesteps - 1).long()
        return -self.num_timesteps * (tab[k + 1] - tab[k])

    def _drift_coeff(self, t):
        return -0.5 * self._rate(t)

    def _g2(self, t):
        return self._rate(t)

    def _coeffs_f(self, t):
        la = self._log_abar_f(t)
        return math.exp(0.5 * la), math.sqrt(-math.expm1(la))

    def _drift_coeff_f(self, t):
        return -0.5 * self._rate_f(t)

    def _g2_f(self, t):
        return self._rate_f(t)

    def _t_of_logsnr_f(self, lam: float) -> float:
        """The time with log-SNR ``lam`` (exact inverse of the interpolation; used by the log-SNR
        grids of the DPM-Solver presets)."""
        z = -2.0 * lam  # -log abar = softplus(-2 lam)
        neg = z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))
        j = bisect.bisect_left(self._neg, neg)
        if j <= 0:
            return 0.0
        if j > self.num_timesteps:
            return 1.0
        lo, hi = self._neg[j - 1], self._neg[j]
        return (j - 1 + (neg - lo) / (hi - lo)) / self.num_timesteps

    def prior_std(self):
        return 1.0

    # -- timesteps ---------------------------------------------------------------------------
    def timestep(self, t):
        """The (fractional) timestep index of time ``t``: :math:`tN - 1`."""
        return t * self.num_timesteps - 1

    def time_of(self, timestep):
        """The time of a timestep index: :math:`(i + 1)/N`."""
        return (timestep + 1) / self.num_timesteps

    def step_times(self, n: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
        """``n + 1`` decreasing times on the training grid, from timestep ``N - 1`` to 0 and
        evenly spaced in the index (DDIM's "uniform" skip), for samplers whose every evaluation
        should fall on a trained timestep (pass them as ``times=``). Needs ``n < N``."""
        _check_n(n)
        if n >= self.num_timesteps:
            raise ValueError(f"step_times needs n < num_timesteps={self.num_timesteps}, got {n}")
        idx = torch.linspace(self.num_timesteps - 1, 0, n + 1, dtype=torch.float64).round()
        return ((idx + 1) / self.num_timesteps).to(dtype=dtype, device=device)


class DiscreteTimeModel:
    """A network trained on integer timesteps as a model ``model(t, x)`` of continuous time for
    the samplers of :mod:`torchnde.generative` (with ``process`` a :class:`DiscreteVP` of the
    training schedule).

    The time ``t`` (a ``(B,)`` tensor or a float) becomes the timestep :math:`i = tN - 1`, clamped
    to ``[0, N - 1]``: passed as is (``timesteps="fractional"``, a float tensor; what networks with
    sinusoidal embeddings accept, and exact between grid points in the sense of the interpolated
    schedule), or rounded to the nearest integer (``"round"``, an int64 tensor; the noise level
    the network assumes is then that of the nearest trained step: sample on
    :meth:`DiscreteVP.step_times` to make every evaluation exact).

    Args:
        model: ``model(timesteps, x)``, or ``model(x, timesteps)`` with ``x_first=True`` (the
            order of diffusers' UNets).
        process: the :class:`DiscreteVP` of the training schedule.
        timesteps: ``"fractional"`` or ``"round"``.
        x_first: the network takes ``(x, timesteps)``.
        scale: multiplies the index before the call (e.g. ``1000 / N`` for a network trained on
            indices of a 1000-step grid but sampled with a subsampled one; default 1).
    """

    def __init__(self, model, process: DiscreteVP, *, timesteps: str = "fractional", x_first: bool = False, scale=1.0):
        if not callable(model):
            raise TypeError(f"the model must be callable, got {type(model).__name__}")
        if not isinstance(process, DiscreteVP):
            raise TypeError(
                f"process must be the DiscreteVP of the training schedule (it knows the number of timesteps), "
                f"got {type(process).__name__}"
            )
        if timesteps not in TIMESTEP_MODES:
            raise ValueError(f"timesteps must be one of {TIMESTEP_MODES}, got {timesteps!r}")
        self.model, self.process, self.mode, self.x_first, self.scale = model, process, timesteps, bool(x_first), scale
        self.event_shape = event_shape_of(model)

    def __repr__(self):
        return f"DiscreteTimeModel({type(self.model).__name__}, {self.process!r}, timesteps={self.mode!r})"

    def timesteps(self, t, x: torch.Tensor) -> torch.Tensor:
        """The network's timesteps ``(B,)`` for time ``t`` and batch ``x``."""
        if not isinstance(t, torch.Tensor):
            t = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        elif t.dim() == 0:
            t = t.expand(x.shape[0])
        idx = self.process.timestep(t.to(x.dtype if x.is_floating_point() else torch.float64))
        idx = idx.clamp(0, self.process.num_timesteps - 1)
        if self.mode == "round":
            idx = idx.round().long()
        return idx if self.scale == 1.0 else idx * self.scale

    def __call__(self, t, x):
        i = self.timesteps(t, x)
        return self.model(x, i) if self.x_first else self.model(i, x)
