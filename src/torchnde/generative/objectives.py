r"""Training objectives of diffusion models: denoising score matching with its standard weightings.

With the marginal :math:`x_t = \alpha(t) x_0 + m(t) + \sigma(t)\varepsilon` of a forward process,
denoising score matching (Vincent 2011; Song et al. 2021, "Score-based generative modeling
through stochastic differential equations", ICLR, Eq. (7)) minimises

.. math::
    E_{t, x_0, \varepsilon}\, \lambda(t)\, \|s_\theta(t, x_t) - \nabla\log p(x_t \mid x_0)\|^2,
    \qquad \nabla\log p(x_t \mid x_0) = -\varepsilon/\sigma(t).

Every parameterisation (:mod:`~torchnde.generative.parameterisation`) is an affine function of
the predicted noise :math:`\hat\varepsilon`, so the loss is written once, in noise space:
:math:`\|s_\theta - \nabla\log p(x_t\mid x_0)\|^2 = \|\hat\varepsilon - \varepsilon\|^2/\sigma^2`,
and a weighting is a factor :math:`w(t)` on :math:`\|\hat\varepsilon - \varepsilon\|^2`:

==================  ===========================================================  ===================
``weighting``       :math:`\lambda(t)` and what it means                         :math:`w(t)`
==================  ===========================================================  ===================
``"native"``        the mean squared error of the model's own output (Ho et al.  the model kind's
                    2020's "simple" loss for ``eps``; x0-, v-, score- or         Jacobian, exact
                    velocity-MSE for the others)
``"eps"``           :math:`\sigma^2` (Song et al. 2021's default)                 1
``"score"``         1                                                            :math:`1/\sigma^2`
``"likelihood"``    :math:`g^2` (Song et al. 2021b, "Maximum likelihood          :math:`g^2/\sigma^2`
                    training of score-based diffusion models": the loss bounds    / density of t
                    the negative log-likelihood)
``"edm"``           Karras et al. 2022's :math:`(\tilde\sigma^2 +                  :math:`(\tilde\sigma^2
                    \sigma_d^2)/(\tilde\sigma\sigma_d)^2` on the x0 error,        + \sigma_d^2)/\sigma_d^2`
                    :math:`\tilde\sigma = \sigma/\alpha`
callable            ``weighting(t)`` is :math:`\lambda(t)` (a ``(B,)`` tensor)    :math:`\lambda/\sigma^2`
==================  ===========================================================  ===================

Training times (:func:`training_times`): ``"uniform"`` on ``[t0, t1]``; ``"lognormal"`` (Karras
et al.'s :math:`\ln\tilde\sigma \sim N(-1.2, 1.2^2)`, the default for :class:`EDM`); ``"logsnr"``:
log-SNR uniform, i.e. :math:`t` drawn with density proportional to :math:`g^2/\sigma^2 =
-\tfrac{d}{dt}\log\mathrm{SNR}(t)` (true of every linear SDE: :math:`d(\sigma^2/\alpha^2)/dt =
g^2/\alpha^2`), Song et al. 2021b's importance sampling for the likelihood weighting, which
turns its weight into the constant :math:`\log\mathrm{SNR}(t_0) - \log\mathrm{SNR}(t_1)`.

For the likelihood weighting the loss is scaled so that ``D / 2 * loss`` (``D`` the data
dimension) is an unbiased estimate of the score-matching term of the bound, in nats:
:math:`\tfrac12\int_{t_0}^{t_1} g^2 E\|s_\theta - \nabla\log p(x_t\mid x_0)\|^2 dt`; see
:func:`nll_bound`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .parameterisation import KINDS, Parameterisation
from .processes import EDM, DiffusionProcess

__all__ = ["dsm_loss", "training_times", "nll_bound", "WEIGHTINGS", "TIME_SAMPLINGS"]

#: the named weightings of :func:`dsm_loss`
WEIGHTINGS = ("native", "eps", "score", "likelihood", "edm")
#: the ways :func:`training_times` draws times
TIME_SAMPLINGS = ("auto", "uniform", "lognormal", "logsnr")

# Karras et al. 2022, Table 1 (training): ln(sigma) ~ N(P_mean, P_std^2), sigma_data = 0.5
_P_MEAN, _P_STD = -1.2, 1.2


def _logsnr(process: DiffusionProcess, t: torch.Tensor) -> torch.Tensor:
    a, s = process.marginal(t)
    return 2 * (torch.log(a) - torch.log(s))


def _t_of_logsnr(process: DiffusionProcess, lam: torch.Tensor) -> torch.Tensor:
    """Times with the given log-SNRs (bisection in float64: log-SNR decreases in ``t``)."""
    lo = torch.full_like(lam, process.t0)
    hi = torch.full_like(lam, process.t1)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        above = _logsnr(process, mid) > lam  # still too early
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def _check_sampling(process: DiffusionProcess, time_sampling: str) -> str:
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"unknown time_sampling {time_sampling!r}; choose one of {TIME_SAMPLINGS}")
    if time_sampling == "auto":
        return "lognormal" if isinstance(process, EDM) else "uniform"
    return time_sampling


def training_times(
    process: DiffusionProcess,
    n: int,
    *,
    time_sampling: str = "auto",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> torch.Tensor:
    """``n`` training times in ``[process.t0, process.t1]`` (a ``(n,)`` tensor).

    Args:
        time_sampling: ``"uniform"``, ``"lognormal"`` (Karras et al. 2022; for :class:`EDM`,
            whose time is the noise level), ``"logsnr"`` (log-SNR uniform: the importance
            sampling of the likelihood weighting) or ``"auto"`` (lognormal for :class:`EDM`,
            uniform otherwise).
        generator, dtype, device: of the draw (drawn in float64 on ``generator``'s device, then
            converted).
    """
    if not isinstance(process, DiffusionProcess):
        raise TypeError(f"process must be a DiffusionProcess such as VP(), got {type(process).__name__}")
    method = _check_sampling(process, time_sampling)
    gdev = generator.device if generator is not None else device
    u = torch.rand(int(n), generator=generator, dtype=torch.float64, device=gdev)
    if method == "uniform":
        t = process.t0 + (process.t1 - process.t0) * u
    elif method == "lognormal":
        if not isinstance(process, EDM):
            raise ValueError("time_sampling='lognormal' is Karras et al.'s noise-level sampling: use it with EDM()")
        # the normal's quantile at u, truncated to [sigma_min, sigma_max] by inverse-CDF sampling
        normal = torch.distributions.Normal(_P_MEAN, _P_STD)
        lo, hi = (normal.cdf(torch.tensor(math.log(v), dtype=torch.float64)) for v in (process.t0, process.t1))
        t = torch.exp(normal.icdf(lo + (hi - lo) * u))
    else:
        ends = _logsnr(process, torch.tensor([process.t0, process.t1], dtype=torch.float64, device=u.device))
        t = _t_of_logsnr(process, ends[1] + (ends[0] - ends[1]) * u)
    return t.clamp(process.t0, process.t1).to(dtype=dtype, device=device if device is not None else u.device)


def _weight(process, weighting, method, t, sigma_data):
    """w(t) of the noise-space squared error, a float64 ``(B,)`` tensor."""
    a, s = process.marginal(t)
    if callable(weighting):
        lam = torch.as_tensor(weighting(t), dtype=t.dtype, device=t.device)
        return lam.expand_as(t) / (s * s)
    if weighting == "eps":
        return torch.ones_like(t)
    if weighting == "score":
        return 1 / (s * s)
    if weighting == "edm":
        st2 = (s / a) ** 2
        return (st2 + sigma_data**2) / sigma_data**2
    # likelihood: g^2 / sigma^2 divided by the density of t
    if method == "uniform":
        return (process.t1 - process.t0) * process.diffusion2(t) / (s * s)
    if method == "logsnr":
        ends = _logsnr(process, torch.tensor([process.t0, process.t1], dtype=t.dtype, device=t.device))
        return (ends[0] - ends[1]).expand_as(t)
    raise ValueError("weighting='likelihood' needs time_sampling='uniform' or 'logsnr' (its density is known)")


def dsm_loss(
    model: Callable,
    process: DiffusionProcess,
    x0: torch.Tensor,
    *,
    parameterisation: str = "eps",
    weighting: str | Callable = "native",
    time_sampling: str = "auto",
    t: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sigma_data: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Denoising score-matching loss of ``model`` on a batch of data ``x0`` (shape ``(B, ...)``).

    Args:
        model: ``model(t, x_t)`` with ``t`` a ``(B,)`` tensor in ``x0``'s dtype, predicting
            ``parameterisation`` (``"eps"``, ``"x0"``, ``"v"``, ``"score"`` or ``"velocity"``).
        process: the forward process.
        x0: the data batch.
        weighting: one of :data:`WEIGHTINGS` or a callable ``lambda(t)`` (see the module
            docstring).
        time_sampling: how the times are drawn when ``t`` is not given (:func:`training_times`);
            the likelihood weighting divides by the density of this choice.
        t: ``(B,)`` training times (drawn by ``time_sampling``'s law, which the likelihood
            weighting assumes); drawn if omitted.
        eps: standard normal noise of ``x0``'s shape; drawn if omitted.
        generator: for the draws of ``t`` and ``eps``.
        sigma_data: the data's standard deviation of the ``"edm"`` weighting.
        reduction: ``"mean"`` (over the batch of per-sample means over the data dimensions) or
            ``"none"`` (the ``(B,)`` per-sample losses).
    """
    if parameterisation not in KINDS:
        raise ValueError(f"unknown parameterisation {parameterisation!r}; choose one of {KINDS}")
    if not callable(weighting) and weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS} or pass a callable lambda(t)")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if not isinstance(x0, torch.Tensor) or x0.dim() < 1 or x0.shape[0] == 0:
        raise ValueError("x0 must be a non-empty tensor of shape (batch, ...)")
    method = _check_sampling(process, time_sampling)
    b = x0.shape[0]
    if t is None:
        t = training_times(process, b, time_sampling=method, generator=generator, device=x0.device)
    t = torch.as_tensor(t, device=x0.device)
    if t.shape != (b,):
        raise ValueError(f"t must have shape ({b},) (one time per sample), got {tuple(t.shape)}")
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    elif eps.shape != x0.shape:
        raise ValueError(f"eps must have x0's shape {tuple(x0.shape)}, got {tuple(eps.shape)}")
    x_t = process.marginal_sample(t, x0, eps)
    out = model(t.to(x0.dtype), x_t)
    if tuple(out.shape) != tuple(x0.shape):
        raise ValueError(f"the model returned shape {tuple(out.shape)}, expected the data's {tuple(x0.shape)}")
    param = Parameterisation(parameterisation, process)
    if weighting == "native":
        target = Parameterisation("eps", process).convert(parameterisation, t, x_t, eps)
        err = out - target
        w = None
    else:
        err = param.to_eps(t, x_t, out) - eps
        w = _weight(process, weighting, method, t.to(torch.float64), sigma_data).to(x0.dtype)
    per_sample = err.square().reshape(b, -1).mean(-1)
    if w is not None:
        per_sample = w * per_sample
    return per_sample.mean() if reduction == "mean" else per_sample


def nll_bound(
    model: Callable,
    process: DiffusionProcess,
    x0: torch.Tensor,
    *,
    parameterisation: str = "eps",
    n_times: int = 1,
    time_sampling: str = "logsnr",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""An unbiased Monte-Carlo estimate of Song et al. 2021b's upper bound (Theorem 2) on the
    negative log-likelihood (nats, per sample: a ``(B,)`` tensor) of the reverse SDE with the
    model's score:

    .. math::
        -\log p_\theta(x_0) \le E\Big[-\log\pi(x_{t_1}) + \tfrac12\int_{t_0}^{t_1} g^2\big(
        \|s_\theta - \nabla\log p(x_t\mid x_0)\|^2 - \|\nabla\log p(x_t\mid x_0)\|^2\big)
        - 2\,\nabla\!\cdot f\;dt\Big]

    The integral runs over ``[t0, t1]`` (the truncation Song et al. use). With the exact score
    and prior the bound is tight: tested to match the exact :math:`-\log p_{t_0}` of Gaussian
    data within the Monte-Carlo error. ``n_times`` times (and noises) per sample average the
    estimate; ``time_sampling`` is ``"logsnr"`` (Song et al.'s importance sampling; default) or
    ``"uniform"``.
    """
    method = _check_sampling(process, time_sampling)
    if method not in ("uniform", "logsnr"):
        raise ValueError("nll_bound needs time_sampling='uniform' or 'logsnr'")
    b = x0.shape[0]
    d = x0[0].numel()
    total = torch.zeros(b, dtype=torch.float64, device=x0.device)
    for _ in range(int(n_times)):
        t = training_times(process, b, time_sampling=method, generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        sm = dsm_loss(
            model,
            process,
            x0,
            parameterisation=parameterisation,
            weighting="likelihood",
            time_sampling=method,
            t=t,
            eps=eps,
            reduction="none",
        ).to(torch.float64)
        # the subtracted conditional-score norm, with the same weight: |eps|^2 / sigma^2 * g^2
        w = _weight(process, "likelihood", method, t, 0.5)
        cond = w * eps.to(torch.float64).square().reshape(b, -1).mean(-1)
        # divergence of the drift a(t) x: D a(t), integrated: int a dt = log alpha(t1) - log alpha(t0)
        total = total + 0.5 * d * (sm - cond)
    a0, _ = process.marginal(process.t0)
    a1, _ = process.marginal(process.t1)
    div = d * (math.log(a1) - math.log(a0))
    # x_{t1} given x0: a draw of the forward marginal, scored by the prior
    eps1 = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    prior = -process.prior_log_prob(process.marginal_sample(process.t1, x0, eps1)).to(torch.float64)
    return prior + total / int(n_times) - div
