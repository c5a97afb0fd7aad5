r"""Forward noising processes of score-based diffusion models.

Every process is a linear SDE :math:`dx = f(t, x)\,dt + g(t)\,dW` whose marginal given the data
:math:`x_0` is Gaussian,

.. math:: x_t = \alpha(t)\,x_0 + m(t) + \sigma(t)\,\varepsilon, \qquad \varepsilon \sim N(0, I),

with :math:`m(t) = 0` except for :class:`MeanReverting` (:math:`m(t) = (1 - \alpha(t))\,\mu`).
From the score :math:`\nabla_x \log p_t(x)` of the marginals, a process builds the two samplers'
equations as terms for :func:`torchnde.solve` (Song et al. 2021, "Score-based generative modeling
through stochastic differential equations", ICLR; Anderson 1982, "Reverse-time diffusion equation
models"):

* the reverse-time SDE :math:`dx = [f - g^2 \nabla\log p_t]\,dt + g\,d\bar W`, solved from ``t1``
  down to ``t0`` (:meth:`DiffusionProcess.reverse_sde`);
* the probability-flow ODE :math:`\dot x = f - \tfrac12 g^2 \nabla\log p_t`, whose solutions have
  the same marginals (:meth:`DiffusionProcess.probability_flow`).

Times are Python floats (one time for the batch) or ``(B,)`` tensors (per-sample mode, e.g.
``solve(..., per_sample=True)``); coefficients come back in the same form (floats, or tensors of
the time's dtype) and are broadcast against the batch dimension of ``x`` where they meet it.
Float times take a fast path: the built-in processes compute their coefficients with
:mod:`math` in float64 (``_coeffs_f`` / ``_drift_coeff_f`` / ``_g2_f``), with no tensor made per
call, since a sampler asks for them at every model evaluation.
"""

from __future__ import annotations

import math
import numbers

import torch

from .._terms import ControlTerm, MultiTerm, ODETerm
from ..paths import VirtualBrownianTree

__all__ = [
    "DiffusionProcess",
    "VP",
    "VE",
    "SubVP",
    "EDM",
    "MeanReverting",
    "PROCESSES",
    "expand_time",
]


# ----------------------------------------------------------------------------------- time helpers
def _float_time(t) -> float | None:
    """``t`` as a Python float if it is a number (not a tensor), else ``None``."""
    if isinstance(t, float):
        return t
    if isinstance(t, torch.Tensor):
        return None
    if isinstance(t, numbers.Real):
        return float(t)
    raise TypeError(f"a time must be a Python float or a tensor, got {type(t).__name__}")


def expand_time(c, x: torch.Tensor):
    """A coefficient (float, 0-d or ``(B,)`` tensor) broadcastable against ``x`` of shape
    ``(B, ...)``, in ``x``'s dtype and on its device."""
    if not isinstance(c, torch.Tensor):
        return c
    c = c.to(dtype=x.dtype, device=x.device)
    if c.dim() == 0:
        return c
    if c.dim() != 1 or (x.dim() > 0 and c.shape[0] != x.shape[0]):
        raise ValueError(
            f"a per-sample time must have shape ({x.shape[0] if x.dim() else 1},) (the batch), got {tuple(c.shape)}"
        )
    return c.view(-1, *([1] * (x.dim() - 1)))


def _batch_time(t, x: torch.Tensor) -> torch.Tensor:
    """``t`` as a ``(B,)`` tensor in ``x``'s dtype (what models receive)."""
    if isinstance(t, torch.Tensor):
        t = t.to(dtype=x.dtype, device=x.device)
        return t.expand(x.shape[0]) if t.dim() == 0 else t
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def _plus(v: torch.Tensor, offset):
    """``v + offset``, skipping the no-op addition of the float ``0.0``."""
    if isinstance(offset, float) and offset == 0.0:
        return v
    return v + offset


def _reduce(v: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first (the batch)."""
    return v.reshape(v.shape[0], math.prod(v.shape[1:])).sum(-1) if v.dim() > 1 else v


# ----------------------------------------------------------------------------------------- base
class DiffusionProcess:
    r"""A linear forward SDE with Gaussian marginals.

    Subclasses define ``_coeffs(t) -> (alpha, sigma)``, ``_drift_coeff(t)`` (the ``a`` of the
    drift :math:`f = a(t) x + b(t)`), ``_g2(t)`` (:math:`g(t)^2`), the prior and the time range.

    Attributes:
        t0: the (small) time the reverse processes end at: samples are drawn from
            :math:`p_{t_0}`, the data blurred by noise of std ``sigma(t0)``.
        t1: the time the forward process is stopped at, where :math:`p_{t_1}` is close to the
            prior.
    """

    t0: float
    t1: float

    # -- to implement ------------------------------------------------------------------------
    def _coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _drift_coeff(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _g2(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def prior_std(self) -> float:  # pragma: no cover
        """Standard deviation of the (isotropic Gaussian) prior at ``t1``."""
        raise NotImplementedError

    # float fast paths: the tensor versions on a float64 0-d tensor unless a subclass does better
    def _coeffs_f(self, t: float) -> tuple[float, float]:
        a, s = self._coeffs(torch.tensor(t, dtype=torch.float64))
        return float(a), float(s)

    def _drift_coeff_f(self, t: float) -> float:
        return float(self._drift_coeff(torch.tensor(t, dtype=torch.float64)))

    def _g2_f(self, t: float) -> float:
        return float(self._g2(torch.tensor(t, dtype=torch.float64)))

    def prior_mean(self, x_like: torch.Tensor):
        """Mean of the prior (zero, or the chosen mean of :class:`MeanReverting`)."""
        return 0.0

    # -- public ------------------------------------------------------------------------------
    def marginal(self, t):
        r"""``(alpha(t), sigma(t))`` with :math:`x_t = \alpha x_0 + m(t) + \sigma \varepsilon`."""
        tf = _float_time(t)
        if tf is not None:
            return self._coeffs_f(tf)
        return self._coeffs(t)

    def mean_offset(self, t, x: torch.Tensor):
        """:math:`m(t)`, the part of the marginal mean not proportional to the data (0 except
        for :class:`MeanReverting`), broadcastable against ``x``."""
        return 0.0

    def marginal_mean(self, t, x0: torch.Tensor) -> torch.Tensor:
        """:math:`E[x_t \\mid x_0] = \\alpha(t) x_0 + m(t)`."""
        a, _ = self.marginal(t)
        return expand_time(a, x0) * x0 + self.mean_offset(t, x0)

    def marginal_sample(self, t, x0: torch.Tensor, eps: torch.Tensor | None = None, generator=None):
        """A draw of :math:`x_t` given ``x0`` (``eps`` standard normal noise, drawn if omitted)."""
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        _, s = self.marginal(t)
        return self.marginal_mean(t, x0) + expand_time(s, x0) * eps

    def drift(self, t, x: torch.Tensor) -> torch.Tensor:
        """The forward drift :math:`f(t, x)`."""
        tf = _float_time(t)
        a = self._drift_coeff_f(tf) if tf is not None else expand_time(self._drift_coeff(t), x)
        return _plus(x * a, self._drift_offset(t, x))

    def _drift_offset(self, t, x):
        return 0.0

    def diffusion(self, t):
        """The scalar diffusion coefficient :math:`g(t)`."""
        tf = _float_time(t)
        return math.sqrt(self._g2_f(tf)) if tf is not None else torch.sqrt(self._g2(t))

    def diffusion2(self, t):
        """:math:`g(t)^2`."""
        tf = _float_time(t)
        return self._g2_f(tf) if tf is not None else self._g2(t)

    def times(self, n: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
        """``n + 1`` decreasing times from ``t1`` to ``t0``: the default grid of an ``n``-step
        sampler (uniform in ``t``; :class:`EDM` overrides it with Karras et al.'s schedule)."""
        _check_n(n)
        return torch.linspace(self.t1, self.t0, n + 1, dtype=dtype, device=device)

    def prior_sample(self, shape, generator=None, dtype=torch.float32, device=None, *, mean=None):
        """A draw from the prior :math:`N(\\text{prior mean}, \\text{prior\\_std}^2 I)`."""
        z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
        return z * self.prior_std() + self.prior_mean(z)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density of the prior at ``x`` of shape ``(B, ...)``, summed over all but the
        batch dimension (shape ``(B,)``)."""
        s = self.prior_std()
        z = (x - self.prior_mean(x)) / s
        d = math.prod(x.shape[1:])
        return -0.5 * _reduce(z * z) - d * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def reverse_drift(self, score_fn, t, x: torch.Tensor) -> torch.Tensor:
        r""":math:`f(t, x) - g(t)^2 \nabla\log p_t(x)`."""
        return self._drift_minus(score_fn, t, x, 1.0)

    def pf_drift(self, score_fn, t, x: torch.Tensor) -> torch.Tensor:
        r"""The probability-flow velocity :math:`f(t, x) - \tfrac12 g(t)^2 \nabla\log p_t(x)`."""
        return self._drift_minus(score_fn, t, x, 0.5)

    def _drift_minus(self, score_fn, t, x, c: float) -> torch.Tensor:
        r""":math:`f(t, x) - c\,g(t)^2 \nabla\log p_t(x)` (float times: one fused multiply-add)."""
        tf = _float_time(t)
        if tf is None:
            return self.drift(t, x) - c * expand_time(self.diffusion2(t), x) * score_fn(t, x)
        scaled = getattr(score_fn, "scaled_score", None)
        pair = scaled(tf, x) if scaled is not None else None
        if pair is None:
            pair = (score_fn(tf, x), 1.0)
        out, k = pair  # the score is k * out
        return torch.add(self.drift(tf, x), out, alpha=-c * self._g2_f(tf) * k)

    def probability_flow(self, score_fn) -> ODETerm:
        """The probability-flow ODE as an :class:`~torchnde.ODETerm` (solve it from ``t1`` to ``t0``
        to sample, or from ``t0`` to ``t1`` to encode). ``score_fn(t, x)`` is the score of the
        marginal :math:`p_t` (see :class:`~torchnde.generative.parameterisation.Parameterisation`
        for models that predict something else)."""
        return ODETerm(_pf_field(_PFDrift(self, score_fn)), time_as_float=True)

    def reverse_sde(
        self,
        score_fn,
        shape,
        *,
        seed: int | torch.Tensor = 0,
        dtype=torch.float32,
        device=None,
        path=None,
        t0: float | None = None,
        t1: float | None = None,
        tol: float | None = None,
    ) -> MultiTerm:
        r"""The reverse-time SDE :math:`dx = [f - g^2 \nabla\log p_t]\,dt + g\,d\bar W` as a
        :class:`~torchnde.MultiTerm` (drift + diagonal additive noise on a Brownian path).

        Solve it from ``t1`` down to ``t0`` with a negative ``dt0`` and an Itô SDE solver (e.g.
        ``Euler()``, i.e. Euler–Maruyama), or ``SRA1()``/``ShARK()`` with a path built with
        ``levy_area="space-time"``.

        Args:
            score_fn: ``score_fn(t, x)``.
            shape: the shape of the state (batch first).
            seed: the Brownian path's seed (an int, or per-sample ``(B,)`` int64 seeds).
            dtype, device: of the Brownian increments (those of the state).
            path: a Brownian path to use instead of building a
                :class:`~torchnde.VirtualBrownianTree` on ``[t0, t1]``.
            t0, t1: the interval of the path (default: the process's).
            tol: the tree's time resolution (default: its own).
        """
        if path is None:
            lo = self.t0 if t0 is None else float(t0)
            hi = self.t1 if t1 is None else float(t1)
            path = VirtualBrownianTree(
                min(lo, hi), max(lo, hi), tuple(shape), seed=seed, dtype=dtype, device=device, tol=tol
            )
        drift = ODETerm(_reverse_field(_ReverseDrift(self, score_fn)), time_as_float=True)
        noise = ControlTerm(
            _diffusion_field(_Diffusion(self)),
            path,
            noise="diagonal",
            additive=True,
            calculus="ito",
            time_as_float=True,
        )
        return MultiTerm(drift, noise)


# The terms' vector fields are plain functions (closures over the objects below, which they
# carry as ``.impl``): a term reads a plain function's signature once per code object, where it
# would inspect a callable object at every term built, i.e. at every sampling call.
def _pf_field(impl: _PFDrift):
    ev = impl._eval

    def probability_flow(t, x, args=None):
        return ev(t, x)

    probability_flow.impl, probability_flow.event_shape = impl, impl.event_shape
    return probability_flow


def _reverse_field(impl: _ReverseDrift):
    ev = impl._eval

    def reverse_drift(t, x, args=None):
        return ev(t, x)

    reverse_drift.impl, reverse_drift.event_shape = impl, impl.event_shape
    return reverse_drift


def _diffusion_field(impl: _Diffusion):
    def diffusion(t, x, args=None):
        return impl(t, x)

    diffusion.impl = impl
    return diffusion


def _check_n(n):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"the number of steps must be an int >= 1, got {n!r}")


#: float times whose drift coefficients a ``_PFDrift`` keeps (a fixed grid's; adaptive solves
#: start over once this many are cached)
_COEFF_CACHE = 4096


class _PFDrift:
    r""":math:`f - c\,g^2\nabla\log p_t` (``c = 1/2``). At a float time, when the score is a
    scaled model output (an ``"eps"``/``"score"`` model, :meth:`_Converted.score_scale`) and the
    drift is linear (no offset), the drift's two scalars are computed once per time and cached
    (a sampler's grid), so an evaluation is the model call and two ops (one without a drift): the
    same values as :meth:`DiffusionProcess._drift_minus`."""

    __name__ = "probability_flow"
    _c = 0.5

    def __init__(self, process, score_fn):
        self.process, self.score_fn = process, score_fn
        self._cache: dict = {}
        scale = getattr(score_fn, "score_scale", None)
        cls, base = type(process), DiffusionProcess
        linear = all(getattr(cls, m) is getattr(base, m) for m in ("_drift_offset", "drift", "_drift_minus"))
        self._fast = scale if linear and scale is not None and scale(process.t1) is not None else None

    def _coeffs(self, t: float):
        """``(a, alpha)``: the drift ``a * x`` and the model output's weight, at float time ``t``."""
        p = self.process
        return p._drift_coeff_f(t), -self._c * p._g2_f(t) * self._fast(t)

    def _eval(self, t, x):
        if self._fast is not None and type(t) is float:
            c = self._cache.get(t)
            if c is None:
                if len(self._cache) >= _COEFF_CACHE:
                    self._cache.clear()
                c = self._cache[t] = self._coeffs(t)
            if c[0] == 0.0:  # no drift (VE, EDM): 0 * x + k out is k out, one op fewer
                return self.score_fn._model(t, x) * c[1]
            return torch.add(x * c[0], self.score_fn._model(t, x), alpha=c[1])
        return self.process._drift_minus(self.score_fn, t, x, self._c)

    @property
    def event_shape(self):
        """The example shape the score function declares (``None`` if none)."""
        from ._shapes import event_shape_of

        return event_shape_of(self.score_fn)

    def __call__(self, t, x, args=None):
        return self._eval(t, x)


class _ReverseDrift(_PFDrift):
    __name__ = "reverse_drift"
    _c = 1.0


class _Diffusion:
    __name__ = "diffusion"

    def __init__(self, process):
        self.process = process

    def __call__(self, t, x, args=None):
        g = self.process.diffusion(t)
        if not isinstance(g, torch.Tensor):
            return torch.full_like(x, g)
        return torch.ones_like(x) * expand_time(g, x)


# ---------------------------------------------------------------------------------- processes
class VP(DiffusionProcess):
    r"""Variance-preserving SDE :math:`dx = -\tfrac12\beta(t) x\,dt + \sqrt{\beta(t)}\,dW` with
    :math:`\beta(t) = \beta_{min} + t(\beta_{max} - \beta_{min})` (Song et al. 2021; the
    continuous limit of DDPM, Ho et al. 2020): :math:`\alpha = e^{-\frac12\int_0^t\beta}`,
    :math:`\sigma^2 = 1 - \alpha^2`. Prior :math:`N(0, I)`.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, *, t0: float = 1e-3, t1: float = 1.0):
        if not 0 <= beta_min <= beta_max or beta_max <= 0:
            raise ValueError(f"need 0 <= beta_min <= beta_max, beta_max > 0; got {beta_min}, {beta_max}")
        _check_range(t0, t1, 0.0)
        self.beta_min, self.beta_max, self.t0, self.t1 = float(beta_min), float(beta_max), float(t0), float(t1)

    def _int_beta(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def _beta(self, t):
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def _coeffs(self, t):
        ib = self._int_beta(t)
        return torch.exp(-0.5 * ib), torch.sqrt(-torch.expm1(-ib))

    def _drift_coeff(self, t):
        return -0.5 * self._beta(t)

    def _g2(self, t):
        return self._beta(t) + 0 * t

    def _coeffs_f(self, t):
        ib = self._int_beta(t)
        return math.exp(-0.5 * ib), math.sqrt(-math.expm1(-ib))

    def _drift_coeff_f(self, t):
        return -0.5 * self._beta(t)

    def _g2_f(self, t):
        return self._beta(t)

    def prior_std(self):
        return 1.0

    def __repr__(self):
        return f"VP(beta_min={self.beta_min}, beta_max={self.beta_max}, t0={self.t0}, t1={self.t1})"


class SubVP(VP):
    r"""Sub-VP SDE (Song et al. 2021): the drift of :class:`VP` with
    :math:`g^2 = \beta(t)(1 - e^{-2\int_0^t\beta})`, so :math:`\sigma = 1 - \alpha^2` (below the
    VP's std at every time). Prior :math:`N(0, I)`."""

    def _coeffs(self, t):
        ib = self._int_beta(t)
        return torch.exp(-0.5 * ib), -torch.expm1(-ib)

    def _g2(self, t):
        return self._beta(t) * -torch.expm1(-2 * self._int_beta(t))

    def _coeffs_f(self, t):
        ib = self._int_beta(t)
        return math.exp(-0.5 * ib), -math.expm1(-ib)

    def _g2_f(self, t):
        return self._beta(t) * -math.expm1(-2 * self._int_beta(t))

    def __repr__(self):
        return f"SubVP(beta_min={self.beta_min}, beta_max={self.beta_max}, t0={self.t0}, t1={self.t1})"


class VE(DiffusionProcess):
    r"""Variance-exploding SDE :math:`dx = \sqrt{d\sigma^2/dt}\,dW` with
    :math:`\sigma(t) = \sigma_{min}(\sigma_{max}/\sigma_{min})^t` (Song et al. 2021; the
    continuous limit of SMLD/NCSN, Song & Ermon 2019): :math:`\alpha = 1`. The process is read as
    started from data already blurred by :math:`\sigma_{min}`, so :math:`x_t = x_0 + \sigma(t)
    \varepsilon` holds exactly for the SDE. Prior :math:`N(0, \sigma_{max}^2 I)`.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, *, t0: float = 0.0, t1: float = 1.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
        _check_range(t0, t1, 0.0)
        self.sigma_min, self.sigma_max, self.t0, self.t1 = float(sigma_min), float(sigma_max), float(t0), float(t1)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def _coeffs(self, t):
        return torch.ones_like(t), self.sigma_min * torch.exp(self._log_ratio * t)

    def _drift_coeff(self, t):
        return torch.zeros_like(t)

    def _g2(self, t):
        return 2 * self._log_ratio * (self.sigma_min * torch.exp(self._log_ratio * t)) ** 2

    def _coeffs_f(self, t):
        return 1.0, self.sigma_min * math.exp(self._log_ratio * t)

    def _drift_coeff_f(self, t):
        return 0.0

    def _g2_f(self, t):
        return 2 * self._log_ratio * (self.sigma_min * math.exp(self._log_ratio * t)) ** 2

    def prior_std(self):
        return float(self._coeffs(torch.tensor(self.t1, dtype=torch.float64))[1])

    def __repr__(self):
        return f"VE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, t0={self.t0}, t1={self.t1})"


class EDM(DiffusionProcess):
    r"""The noise scaling of Karras et al. 2022 ("Elucidating the design space of diffusion-based
    generative models", NeurIPS): :math:`x_t = x_0 + t\,\varepsilon`, i.e. time *is* the noise
    level, :math:`dx = \sqrt{2t}\,dW`, on :math:`[\sigma_{min}, \sigma_{max}]`. Prior
    :math:`N(0, \sigma_{max}^2 I)`. :meth:`times` is their schedule
    :math:`t_i = (\sigma_{max}^{1/\rho} + \tfrac{i}{n}(\sigma_{min}^{1/\rho} -
    \sigma_{max}^{1/\rho}))^\rho`, ``rho = 7`` by default.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.t0, self.t1 = self.sigma_min, self.sigma_max

    def _coeffs(self, t):
        return torch.ones_like(t), t + 0.0

    def _drift_coeff(self, t):
        return torch.zeros_like(t)

    def _g2(self, t):
        return 2 * t

    def _coeffs_f(self, t):
        return 1.0, t + 0.0

    def _drift_coeff_f(self, t):
        return 0.0

    def _g2_f(self, t):
        return 2 * t

    def prior_std(self):
        return self.sigma_max

    def times(self, n: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
        _check_n(n)
        i = torch.arange(n + 1, dtype=dtype, device=device) / n
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        ts = (hi + i * (lo - hi)) ** self.rho
        ts[0], ts[-1] = self.t1, self.t0  # exact end points
        return ts

    def __repr__(self):
        return f"EDM(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, rho={self.rho})"


class MeanReverting(DiffusionProcess):
    r"""Ornstein–Uhlenbeck process towards a chosen mean, :math:`dx = \theta(\mu - x)\,dt +
    s\,dW` (the mean-reverting SDE of image restoration, Luo et al. 2023, "Image restoration with
    mean-reverting stochastic differential equations", ICML, with constant coefficients):
    :math:`\alpha = e^{-\theta t}`, :math:`m(t) = (1 - \alpha)\mu`,
    :math:`\sigma^2 = \frac{s^2}{2\theta}(1 - e^{-2\theta t})`. Prior :math:`N(\mu,
    \sigma(t_1)^2 I)` (the marginal at ``t1`` without the vanishing :math:`\alpha(t_1) (x_0 -
    \mu)`). For restoration ``mean`` is the degraded input, a tensor of the state's shape (one
    per sample); a float or a tensor broadcastable against the state also works.
    """

    def __init__(self, theta: float = 4.0, mean=0.0, sigma: float = 1.0, *, t0: float = 1e-3, t1: float = 1.0):
        if not theta > 0 or not sigma > 0:
            raise ValueError(f"need theta > 0 and sigma > 0; got {theta}, {sigma}")
        _check_range(t0, t1, 0.0)
        self.theta, self.mean, self.sigma, self.t0, self.t1 = float(theta), mean, float(sigma), float(t0), float(t1)

    def _mu(self, x):
        m = self.mean
        return m.to(dtype=x.dtype, device=x.device) if isinstance(m, torch.Tensor) else m

    def _coeffs(self, t):
        a = torch.exp(-self.theta * t)
        return a, self.sigma * torch.sqrt(-torch.expm1(-2 * self.theta * t) / (2 * self.theta))

    def _drift_coeff(self, t):
        return torch.full_like(t, -self.theta)

    def _drift_offset(self, t, x):
        return self.theta * self._mu(x)

    def _g2(self, t):
        return torch.full_like(t, self.sigma**2)

    def _coeffs_f(self, t):
        a = math.exp(-self.theta * t)
        return a, self.sigma * math.sqrt(-math.expm1(-2 * self.theta * t) / (2 * self.theta))

    def _drift_coeff_f(self, t):
        return -self.theta

    def _g2_f(self, t):
        return self.sigma**2

    def mean_offset(self, t, x):
        a, _ = self.marginal(t)
        return (1 - expand_time(a, x)) * self._mu(x)

    def prior_mean(self, x_like):
        return self._mu(x_like)

    def prior_std(self):
        return float(self._coeffs(torch.tensor(self.t1, dtype=torch.float64))[1])

    def __repr__(self):
        mean = f"tensor{tuple(self.mean.shape)}" if isinstance(self.mean, torch.Tensor) else self.mean
        return f"MeanReverting(theta={self.theta}, mean={mean}, sigma={self.sigma}, t0={self.t0}, t1={self.t1})"


def _check_range(t0, t1, lo):
    if not lo <= float(t0) < float(t1):
        raise ValueError(f"need {lo} <= t0 < t1; got t0={t0}, t1={t1}")


#: the processes by name
PROCESSES = {"vp": VP, "ve": VE, "subvp": SubVP, "edm": EDM, "mean_reverting": MeanReverting}
