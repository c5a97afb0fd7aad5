r"""Bridges between two distributions: bridge processes, bridge matching, SB-CFM and DSBM/IMF.

A *bridge* of a reference diffusion :math:`dX = f(t)X\,dt + g(t)\,dW` on :math:`[0, 1]` is the
reference conditioned on both ends, :math:`X_0 = x_0` and :math:`X_1 = x_1`. For the linear
references here it is Gaussian at every :math:`t` (:meth:`Bridge.bridge_marginal`). Mixing bridges
over a coupling :math:`\pi(x_0, x_1)` of a source and a target distribution, and projecting the
mixture onto a Markovian SDE :math:`dX = b(t, X)\,dt + g(t)\,dW` with the same marginals,
gives a generative model between *two data sets* (the *Markovian projection*; Peluchetti 2023,
"Diffusion bridge mixture transports, Schrödinger bridge problems and generative modeling";
Shi et al. 2023, "Diffusion Schrödinger bridge matching"; Liu et al. 2023, "I²SB: image-to-image
Schrödinger bridge"; Zhou et al. 2024, "Denoising diffusion bridge models"). Its drift is the
regression :math:`b(t, x) = \mathbb E[\,h(t, x_t; x_1) \mid x_t = x]` of the bridge's own drift
:math:`h` (for the Brownian bridge :math:`h = (x_1 - x_t)/(1-t)`), learned by
:func:`bridge_matching_loss` and sampled by :func:`sample_bridge` through :func:`torchnde.solve`.

* :class:`BrownianBridge` (reference :math:`\sigma W`), :class:`OUBridge` (Ornstein–Uhlenbeck
  :math:`dX = -\theta X\,dt + \sigma\,dW`) and :class:`VPBridge` (the VP SDE of
  :class:`~torchnde.generative.processes.VP`, the DDBM bridge).
* :func:`sinkhorn_coupling`: minibatch entropic optimal transport (log-domain Sinkhorn) at
  regularisation :math:`2\sigma^2`, whose population plan is the Schrödinger bridge's endpoint
  coupling for the reference :math:`\sigma W` (see
  :class:`~torchnde.generative.oracles.GaussianSchrodingerBridge`).
* :func:`sbcfm_loss`: SB-CFM (Tong et al. 2024, "Improving and generalizing flow-based generative
  models with minibatch optimal transport"): Brownian-bridge paths between Sinkhorn pairs, with
  either the probability-flow velocity target (an ODE model) or the bridge-drift target (an SDE
  model: bridge matching on the entropic-OT coupling).
* :class:`DSBM`: Diffusion Schrödinger Bridge Matching / Iterative Markovian Fitting (Shi et al.
  2023): forward and backward drift networks trained in turn by bridge matching on couplings
  refreshed by simulating the other network; converges to the Schrödinger bridge.
* :class:`MultiMarginalBridge`: bridges through snapshots at several times, with a parametric
  reference drift (e.g. :class:`LotkaVolterra`) refined from the data.

Model convention: ``model(t, x)`` with ``x`` of shape ``(batch, ...)`` and ``t`` a ``(batch,)``
tensor of ``x``'s dtype; it returns a drift shaped like ``x`` (the :class:`~torchnde.generative.
flow_matching.MLP` fits). A *forward* model is the drift of :math:`X_t` in :math:`t`; a
*backward* model, evaluated at the same forward time :math:`t`, is the drift of the reversed
process :math:`Y_s = X_{1-s}` in :math:`s = 1 - t`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .. import _solve
from .._terms import ControlTerm, MultiTerm, ODETerm
from ..paths import BrownianGrid
from ..solvers import Euler
from .flow_matching import _bcast, _check_pair, _final, _sde_setup, _times, fit, ot_coupling
from .processes import VP

__all__ = [
    "Bridge",
    "BrownianBridge",
    "OUBridge",
    "VPBridge",
    "bridge_matching_loss",
    "sample_bridge",
    "sinkhorn_plan",
    "sinkhorn_coupling",
    "sbcfm_loss",
    "sbcfm_pairs",
    "DSBM",
    "ExactOTBiasWarning",
    "LotkaVolterra",
    "MultiMarginalBridge",
]


class ExactOTBiasWarning(UserWarning):
    """Exact (unregularised) minibatch OT used where a Schrödinger bridge (σ > 0) is meant."""


_OT_BIAS_MESSAGE = (
    "exact OT coupling with sigma={sigma} > 0: exact optimal transport is the sigma -> 0 limit of the "
    "Schrödinger bridge, so its population plan is biased for sigma > 0 (between N(m0, I) and N(m1, I) it "
    "is a translation, cross-covariance 1.0, where the Schrödinger bridge at sigma = 1 has (sqrt(5) - 1)/2 "
    "~ 0.618). Use coupling='sinkhorn' (entropic OT at regularisation 2 * sigma**2) for a Schrödinger bridge, "
    "or sigma=0 for OT-CFM."
)


def _check_sigma(sigma) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a finite number > 0; got {sigma!r}")
    return float(sigma)


def _check_times(t: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> None:
    if ((t < lo) | (t > hi)).any():
        bad = t[(t < lo) | (t > hi)][0]
        raise ValueError(f"t must lie in [{lo}, {hi}]; got {float(bad)}")


# ---------------------------------------------------------------------------------------- bridges
class Bridge:
    r"""The bridge of a linear reference SDE :math:`dX = a(t)X\,dt + g(t)\,dW` on :math:`[0, 1]`.

    The reference's transition from 0 is :math:`X_t \mid x_0 \sim N(\alpha_t x_0, v_t I)`;
    conditioned also on :math:`X_1 = x_1` it is Gaussian with (writing
    :math:`\alpha_{1|t} = \alpha_1/\alpha_t`, :math:`v_{1|t} = v_1 - \alpha_{1|t}^2 v_t` for the
    transition from :math:`t` to 1)

    .. math:: \mathbb E[x_t] = \alpha_t x_0 + \frac{\alpha_{1|t} v_t}{v_1}(x_1 - \alpha_1 x_0),
              \qquad \operatorname{Var}[x_t] = \frac{v_t\,v_{1|t}}{v_1}

    (Zhou et al. 2024 write it with signal-to-noise ratios). The bridge is the reference plus Doob's
    h-transform drift, :math:`dX = [a X + g^2 \nabla_x\log p(x_1\mid X_t)]\,dt + g\,dW`, i.e.
    the forward drift :math:`h(t, x; x_1) = a x + g^2\alpha_{1|t}(x_1 - \alpha_{1|t} x)/v_{1|t}`
    (:meth:`forward_target`); reversed in time it runs from :math:`x_1` to :math:`x_0` with drift
    :math:`-a x - g^2 (x - \alpha_t x_0)/v_t` in :math:`s = 1-t` (:meth:`backward_target`).

    Subclasses give ``_ref(t) -> (alpha_t, v_t)``, ``_a(t)`` and ``_g2(t)`` for a ``(B,)``
    tensor ``t``.
    """

    def _ref(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _a(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _g2(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # -- public ------------------------------------------------------------------------------
    def _one(self, like: torch.Tensor) -> torch.Tensor:
        return torch.ones(1, dtype=like.dtype, device=like.device)

    def bridge_marginal(self, x0: torch.Tensor, x1: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (shape of ``x0``) and standard deviation (broadcastable, ``(B, 1, ...)``) of the
        bridge from ``x0`` to ``x1`` at time(s) ``t`` (a float or a ``(B,)`` tensor in ``[0, 1]``)."""
        _check_pair(x0, x1)
        t = _times(t, x0)
        _check_times(t)
        a_t, v_t = self._ref(t)
        a_1, v_1 = self._ref(self._one(x0))
        a_1t = a_1 / a_t
        k = a_1t * v_t / v_1
        var = (v_t * (v_1 - a_1t**2 * v_t) / v_1).clamp_min(0)
        a_t, k, var, a_1 = (_bcast(c.expand_as(t), x0) for c in (a_t, k, var, a_1.expand_as(t)))
        return a_t * x0 + k * (x1 - a_1 * x0), var.sqrt()

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw of :math:`x_t` of the bridge for every pair (``t`` a float or ``(B,)``)."""
        mean, std = self.bridge_marginal(x0, x1, t)
        return mean + std * torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)

    def forward_target(self, t: torch.Tensor, xt: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        r"""The bridge's forward drift :math:`h(t, x_t; x_1)` (for ``t < 1``); ``t`` is ``(B,)``."""
        a_t, v_t = self._ref(t)
        a_1, v_1 = self._ref(self._one(xt))
        a_1t = a_1 / a_t
        v_1t = v_1 - a_1t**2 * v_t
        a, g2, a_1t, v_1t = (_bcast(c.expand_as(t), xt) for c in (self._a(t), self._g2(t), a_1t, v_1t))
        return a * xt + g2 * a_1t * (x1 - a_1t * xt) / v_1t

    def backward_target(self, t: torch.Tensor, xt: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        r"""The reversed bridge's drift in :math:`s = 1-t`: :math:`-a x_t - g^2(x_t - \alpha_t x_0)/v_t` (``t > 0``)."""
        a_t, v_t = self._ref(t)
        a, g2, a_t, v_t = (_bcast(c.expand_as(t), xt) for c in (self._a(t), self._g2(t), a_t, v_t))
        return -a * xt - g2 * (xt - a_t * x0) / v_t

    def remaining_variance(self, t: torch.Tensor) -> torch.Tensor:
        r"""The share :math:`1 - \rho_t/\rho_1` of the reference's variance still to come after
        :math:`t`, in the rescaled coordinates :math:`x/\alpha_t` (:math:`\rho_t = v_t/\alpha_t^2`):
        from 1 at :math:`t = 0` to 0 at :math:`t = 1` (:math:`1 - t` for the Brownian bridge)."""
        a_t, v_t = self._ref(t)
        a_1, v_1 = self._ref(torch.ones_like(t))
        return 1 - (v_t / a_t**2) / (v_1 / a_1**2)

    def reference_drift(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The reference's drift :math:`a(t)x`."""
        return _bcast(self._a(t).expand(x.shape[0]), x) * x

    def diffusion(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The reference's :math:`g(t)`, broadcast to ``x``."""
        return _bcast(self._g2(t).expand(x.shape[0]).sqrt(), x).expand_as(x)


class BrownianBridge(Bridge):
    r"""Bridges of :math:`\sigma W`: :math:`x_t = (1-t)x_0 + t x_1 + \sigma\sqrt{t(1-t)}\,z`, forward
    drift :math:`(x_1 - x_t)/(1 - t)` (Shi et al. 2023; Tong et al. 2024)."""

    def __init__(self, sigma: float = 1.0):
        self.sigma = _check_sigma(sigma)

    def _ref(self, t):
        return torch.ones_like(t), self.sigma**2 * t

    def _a(self, t):
        return torch.zeros_like(t)

    def _g2(self, t):
        return torch.full_like(t, self.sigma**2)

    def __repr__(self):
        return f"BrownianBridge(sigma={self.sigma})"


class OUBridge(Bridge):
    r"""Bridges of the Ornstein–Uhlenbeck process :math:`dX = -\theta X\,dt + \sigma\,dW`:
    :math:`\alpha_t = e^{-\theta t}`, :math:`v_t = \sigma^2(1 - e^{-2\theta t})/(2\theta)`
    (``theta = 0`` is :class:`BrownianBridge`)."""

    def __init__(self, theta: float = 1.0, sigma: float = 1.0):
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta):
            raise ValueError(f"theta must be a finite number; got {theta!r}")
        self.theta, self.sigma = float(theta), _check_sigma(sigma)

    def _ref(self, t):
        th = self.theta
        v = self.sigma**2 * t if th == 0 else self.sigma**2 * -torch.expm1(-2 * th * t) / (2 * th)
        return torch.exp(-th * t), v

    def _a(self, t):
        return torch.full_like(t, -self.theta)

    def _g2(self, t):
        return torch.full_like(t, self.sigma**2)

    def __repr__(self):
        return f"OUBridge(theta={self.theta}, sigma={self.sigma})"


class VPBridge(Bridge):
    r"""Bridges of the VP SDE :math:`dX = -\tfrac12\beta(t)X\,dt + \sqrt{\beta(t)}\,dW` on
    :math:`[0, 1]` (Zhou et al. 2024's VP bridge): :math:`\alpha_t = e^{-\frac12\int_0^t\beta}`,
    :math:`v_t = 1 - \alpha_t^2`. ``process`` is a :class:`~torchnde.generative.processes.VP`
    (its ``beta_min``/``beta_max``; default ``VP(0.1, 2.0)``, a mild schedule, since a bridge needs
    no prior to be reached)."""

    def __init__(self, process: VP | None = None):
        process = VP(0.1, 2.0) if process is None else process
        if not isinstance(process, VP) or type(process).__name__ != "VP":
            raise TypeError(f"VPBridge needs a VP process; got {process!r}")
        self.process = process

    def _int_beta(self, t):
        return self.process._int_beta(t)

    def _ref(self, t):
        ib = self._int_beta(t)
        return torch.exp(-0.5 * ib), -torch.expm1(-ib)

    def _a(self, t):
        return -0.5 * self.process._beta(t)

    def _g2(self, t):
        return self.process._beta(t) + 0 * t

    def __repr__(self):
        return f"VPBridge({self.process!r})"


def _as_bridge(bridge) -> Bridge:
    if isinstance(bridge, Bridge):
        return bridge
    if isinstance(bridge, (int, float)) and not isinstance(bridge, bool):
        return BrownianBridge(bridge)
    raise TypeError(f"bridge must be a Bridge (e.g. BrownianBridge(sigma)) or a sigma > 0; got {bridge!r}")


# ---------------------------------------------------------------------------------------- matching
_DIRECTIONS = ("forward", "backward")
_WEIGHTINGS = ("none", "variance")


def bridge_matching_loss(
    model: Callable,
    x0: torch.Tensor,
    x1: torch.Tensor,
    *,
    bridge: Bridge | float = 1.0,
    direction: str = "forward",
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    eps: float = 1e-3,
    weighting: str = "none",
) -> torch.Tensor:
    r"""The bridge-matching loss: regress the bridge's drift on :math:`x_t` (a Markovian projection).

    For pairs :math:`(x_0, x_1)` of a coupling, :math:`t \sim U[0, 1-\epsilon]` (forward) or
    :math:`U[\epsilon, 1]` (backward) and :math:`x_t` drawn from the bridge,

    .. math:: \mathbb E\,\lVert \text{model}(t, x_t) - h(t, x_t; x_1)\rVert^2

    whose minimiser is the Markovian projection's drift :math:`\mathbb E[h \mid x_t]` (Shi et al.
    2023; Peluchetti 2023); with ``direction="backward"`` the target is the
    reversed bridge's drift (:meth:`Bridge.backward_target`). The target's variance grows like
    :math:`1/(1-t)` near the pinned end, so the last ``eps`` of the interval is left out.

    Args:
        model: ``model(t, x)`` returning the drift.
        x0, x1: paired minibatches of the same shape ``(batch, ...)``.
        bridge: a :class:`Bridge`, or ``sigma`` for :class:`BrownianBridge` ``(sigma)``.
        direction: ``"forward"`` or ``"backward"``.
        generator: the source of ``t`` and the bridge noise.
        t: optional ``(batch,)`` times instead of uniform draws.
        eps: the excluded end of the time interval, in ``[0, 0.5)``.
        weighting: ``"none"`` or ``"variance"``: weigh each squared error by the share of the
            reference's variance still to come, :meth:`Bridge.remaining_variance` (``1 - t``
            forward, ``t`` backward, for the Brownian bridge). The minimiser is the same and the
            gradient noise from the pinned end smaller, but in our Gaussian tests the unweighted
            loss gave the more accurate endpoint means.

    Returns:
        The loss (mean over the batch and coordinates), a 0-d tensor.
    """
    _check_pair(x0, x1)
    bridge = _as_bridge(bridge)
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}; got {direction!r}")
    if not 0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5); got {eps}")
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"weighting must be one of {_WEIGHTINGS}; got {weighting!r}")
    if t is None:
        u = torch.rand(x1.shape[0], generator=generator, dtype=x1.dtype, device=x1.device)
        t = u * (1 - eps) if direction == "forward" else eps + u * (1 - eps)
    else:
        t = _times(t, x1)
        _check_times(t)
    xt = bridge.sample(x0, x1, t, generator=generator)
    if direction == "forward":
        target = bridge.forward_target(t, xt, x1)
    else:
        target = bridge.backward_target(t, xt, x0)
    sq = (model(t, xt) - target).square()
    if weighting == "none":
        return sq.mean()
    # the share of the reference's variance between t and the pinned end: 1 - t (forward) or t
    # (backward) for the Brownian bridge; it tames the target's 1/(1-t) noise, minimiser unchanged
    w = bridge.remaining_variance(t) if direction == "forward" else 1 - bridge.remaining_variance(t)
    return (_bcast(w, sq) * sq).mean()


def sample_bridge(
    model: Callable,
    x_start: torch.Tensor,
    *,
    bridge: Bridge | float = 1.0,
    direction: str = "forward",
    nfe: int = 100,
    solver=None,
    controller=None,
    seed: int = 0,
    path=None,
    return_solution: bool = False,
    **solve_kwargs,
):
    r"""Simulate a learned bridge SDE :math:`dX = \text{model}(t, X)\,dt + g(t)\,dW` through :func:`torchnde.solve`.

    ``direction="forward"`` runs :math:`t` from 0 to 1 from ``x_start`` (source samples);
    ``"backward"`` runs the reversed process :math:`s = 1 - t` from 0 to 1 from ``x_start``
    (target samples), with the backward model evaluated at :math:`t = 1 - s`. Euler–Maruyama by
    default (the noise is additive, so Itô and Stratonovich solvers agree); any SDE solver of the
    core works (the default path carries the Lévy area a solver declares, e.g. for ``SRA1()``), and
    an adaptive ``controller`` (with e.g. ``Heun()`` or ``SPaRK()``) runs on a
    :class:`~torchnde.VirtualBrownianTree`.

    Args:
        model: the drift ``model(t, x)``.
        x_start: the initial samples ``(batch, ...)``.
        bridge: the reference (a :class:`Bridge` or ``sigma``): supplies :math:`g(t)`.
        direction: ``"forward"`` or ``"backward"``.
        nfe: the number of equal steps (ignored with ``controller``).
        solver, controller: as for :func:`torchnde.solve`.
        seed: the Brownian path's seed; ``path`` replaces the path.
        return_solution: return the :class:`~torchnde.Solution` instead of the end samples.
        **solve_kwargs: passed to :func:`torchnde.solve` (``saveat``, ``max_steps``...).

    Returns:
        The samples at the far end (shape of ``x_start``), or the solution.
    """
    bridge = _as_bridge(bridge)
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}; got {direction!r}")
    solver, path = _sde_setup(solver, controller, nfe, path, x_start, seed, solve_kwargs)
    backward = direction == "backward"

    def model_time(s, x):
        s = _times(s, x)
        return 1 - s if backward else s

    def drift(s, x, args):
        return model(model_time(s, x), x)

    def diffusion(s, x, args):
        return bridge.diffusion(model_time(s, x), x)

    terms = MultiTerm(
        ODETerm(drift, time_as_float=True),
        ControlTerm(diffusion, path, noise="diagonal", additive=True, time_as_float=True),
    )
    sol = _solve.solve(terms, solver, 0.0, 1.0, x_start, controller=controller, **solve_kwargs)
    if return_solution or solve_kwargs.get("saveat") is not None:
        return sol
    return _final(sol, solve_kwargs)


# ---------------------------------------------------------------------------------------- sinkhorn
def sinkhorn_plan(
    x0: torch.Tensor,
    x1: torch.Tensor,
    reg: float,
    *,
    iters: int = 200,
    tol: float = 1e-6,
    cost: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The entropic optimal transport plan between two uniform empirical measures (log-domain Sinkhorn).

    Minimises :math:`\sum_{ij} P_{ij}\lVert x_{0,i} - x_{1,j}\rVert^2 - \text{reg}\,H(P)` over
    plans with uniform marginals :math:`1/n` and :math:`1/m` (Cuturi 2013; the log-domain
    updates of Peyré & Cuturi 2019, "Computational optimal transport", stay finite for
    small ``reg``). With ``reg = 2 * sigma**2`` its population limit is the endpoint coupling of
    the Schrödinger bridge with reference :math:`\sigma W` on :math:`[0, 1]`.

    Args:
        x0, x1: ``(n, ...)`` and ``(m, ...)`` samples (flattened per sample).
        reg: the entropic regularisation, > 0 (in the units of the squared distance).
        iters: the maximum number of Sinkhorn iterations (each one row and one column update).
            Every 20th is a log-domain update; the others update scalings of the kernel
            stabilised by the current potentials (two matrix-vector products, no exponential).
        tol: stop when the row marginals' largest relative error (after a column update) is below it.
        cost: an ``(n, m)`` cost matrix to use instead of the squared distances (e.g. the
            transition cost of a reference with a drift, :class:`MultiMarginalBridge`).

    Returns:
        The plan ``P``, ``(n, m)``, in float64 on ``x0``'s device (rows sum to exactly ``1/n``).
    """
    if x0.dim() < 1 or x1.dim() < 1 or x0.shape[1:] != x1.shape[1:] or x0.shape[0] == 0 or x1.shape[0] == 0:
        raise ValueError(
            f"x0 and x1 must be non-empty batches of the same event shape; got {tuple(x0.shape)} and {tuple(x1.shape)}"
        )
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not reg > 0:
        raise ValueError(f"reg must be a number > 0 (use ot_coupling for exact OT); got {reg!r}")
    a = x0.detach().reshape(x0.shape[0], -1).to(torch.float64)
    b = x1.detach().reshape(x1.shape[0], -1).to(dtype=torch.float64, device=a.device)
    n, m = a.shape[0], b.shape[0]
    if cost is None:
        cost = torch.cdist(a, b).square()
    elif cost.shape != (n, m):
        raise ValueError(f"cost must have shape ({n}, {m}) (x0's and x1's batches); got {tuple(cost.shape)}")
    K = -cost.detach().to(dtype=torch.float64, device=a.device) / reg  # log kernel
    log_mu, log_nu = -math.log(n), -math.log(m)
    f = torch.zeros(n, dtype=torch.float64, device=a.device)
    g = torch.zeros(m, dtype=torch.float64, device=a.device)
    done = 0
    while done < iters:
        # one log-domain update re-centres the potentials (finite whatever reg)...
        f = log_mu - torch.logsumexp(K + g[None, :], dim=1)
        g = log_nu - torch.logsumexp(K + f[:, None], dim=0)
        done += 1
        # ...then up to _BLOCK - 1 cheap updates of scalings u, v of the stabilised kernel
        # exp(K + f + g), absorbed into the potentials afterwards (Schmitzer 2019): one exp per block
        Kt = torch.exp(K + f[:, None] + g[None, :])
        row_err = (Kt.sum(1) * n - 1).abs().max()
        if float(row_err) < tol:
            break
        inner = min(_BLOCK - 1, iters - done)
        u = torch.ones_like(f)
        v = torch.ones_like(g)
        for _ in range(inner):
            u = (1.0 / n) / (Kt @ v)
            v = (1.0 / m) / (Kt.T @ u)
        if inner and bool(torch.isfinite(u).all() & torch.isfinite(v).all() & (u > 0).all() & (v > 0).all()):
            f = f + u.log()
            g = g + v.log()
            done += inner
        # else the scalings under- or overflowed (tiny reg): the block is dropped, and the
        # log-domain updates above carry on alone
        elif inner:
            for _ in range(inner):
                f = log_mu - torch.logsumexp(K + g[None, :], dim=1)
                g = log_nu - torch.logsumexp(K + f[:, None], dim=0)
            done += inner
    f = log_mu - torch.logsumexp(K + g[None, :], dim=1)
    return torch.exp(K + f[:, None] + g[None, :])


_BLOCK = 20


def sinkhorn_coupling(
    x0: torch.Tensor,
    x1: torch.Tensor,
    reg: float,
    *,
    generator: torch.Generator | None = None,
    iters: int = 200,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-pair a minibatch by sampling from its entropic OT plan (:func:`sinkhorn_plan`).

    Every ``x0[i]`` is kept and paired with ``x1[j]``, ``j`` drawn from the plan's row ``i``
    (the conditional :math:`P_{ij}/P_{i\\cdot}`): the pairs are draws of the plan, so their
    statistics converge to the population entropic plan as the batch grows (Tong et al. 2024's
    SB-CFM; entropic OT has a dimension-free sample complexity, Genevay et al. 2019).

    Returns:
        ``(x0, x1[j])``.
    """
    _check_pair(x0, x1)
    P = sinkhorn_plan(x0, x1, reg, iters=iters, tol=tol)
    gen_device = generator.device if generator is not None else P.device
    j = torch.multinomial(P.to(gen_device), 1, generator=generator).reshape(-1)
    return x0, x1[j.to(x1.device)]


_COUPLINGS = ("sinkhorn", "ot", "independent")


def sbcfm_pairs(
    x0: torch.Tensor,
    x1: torch.Tensor,
    *,
    sigma: float = 1.0,
    coupling: str = "sinkhorn",
    generator: torch.Generator | None = None,
    warn: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Pairs of the SB-CFM coupling: ``"sinkhorn"`` (entropic OT at :math:`2\sigma^2`, the
    Schrödinger bridge's), ``"ot"`` (exact OT: warns with :class:`ExactOTBiasWarning` when
    ``warn`` since ``sigma > 0``) or ``"independent"``."""
    sigma = _check_sigma(sigma)
    if coupling not in _COUPLINGS:
        raise ValueError(f"coupling must be one of {_COUPLINGS}; got {coupling!r}")
    if coupling == "sinkhorn":
        return sinkhorn_coupling(x0, x1, 2 * sigma**2, generator=generator)
    if coupling == "ot":
        if warn:
            warnings.warn(_OT_BIAS_MESSAGE.format(sigma=sigma), ExactOTBiasWarning, stacklevel=3)
        return ot_coupling(x0, x1)
    _check_pair(x0, x1)
    return x0, x1


_TARGETS = ("ode", "sde")


def sbcfm_loss(
    model: Callable,
    x0: torch.Tensor,
    x1: torch.Tensor,
    *,
    sigma: float = 1.0,
    coupling: str = "sinkhorn",
    target: str = "ode",
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    eps: float = 1e-3,
) -> torch.Tensor:
    r"""SB-CFM (Tong et al. 2024): flow matching on Brownian-bridge paths between entropic-OT pairs.

    Pairs from :func:`sbcfm_pairs` (``coupling``), :math:`x_t = (1-t)x_0 + t x_1 +
    \sigma\sqrt{t(1-t)}\,\varepsilon`, and

    * ``target="ode"``: the probability-flow velocity
      :math:`u_t = \frac{1-2t}{2t(1-t)}\bigl(x_t - (1-t)x_0 - t x_1\bigr) + x_1 - x_0`; the learned
      :math:`\dot x = v_\theta(t, x)` has the Schrödinger bridge's marginals (sample it with
      :func:`~torchnde.generative.flow_matching.sample_ode`); its coupling is deterministic;
    * ``target="sde"``: the Brownian bridge's drift :math:`(x_1 - x_t)/(1-t)`
      (:func:`bridge_matching_loss` on the entropic-OT pairs); :func:`sample_bridge` then
      simulates the Schrödinger bridge itself, coupling included.

    ``coupling="ot"`` with ``sigma > 0`` warns (:class:`ExactOTBiasWarning`): exact OT is the
    wrong coupling for a bridge with noise. ``t`` is drawn from :math:`U[\epsilon, 1-\epsilon]`.
    """
    x0, x1 = sbcfm_pairs(x0, x1, sigma=sigma, coupling=coupling, generator=generator)
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}; got {target!r}")
    if target == "sde":
        return bridge_matching_loss(model, x0, x1, bridge=BrownianBridge(sigma), generator=generator, t=t, eps=eps)
    if not 0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5); got {eps}")
    if t is None:
        u = torch.rand(x1.shape[0], generator=generator, dtype=x1.dtype, device=x1.device)
        t = eps + u * (1 - 2 * eps)
    else:
        t = _times(t, x1)
        _check_times(t, eps, 1 - eps) if eps > 0 else _check_times(t)
    tb = _bcast(t, x1)
    mu = (1 - tb) * x0 + tb * x1
    xt = mu + sigma * (tb * (1 - tb)).sqrt() * torch.randn(
        x1.shape, generator=generator, dtype=x1.dtype, device=x1.device
    )
    u_t = (1 - 2 * tb) / (2 * tb * (1 - tb)) * (xt - mu) + (x1 - x0)
    return (model(t, xt) - u_t).square().mean()


# ---------------------------------------------------------------------------------------- DSBM
def _draw(source, n: int, generator: torch.Generator) -> torch.Tensor:
    if callable(source):
        return source(n, generator)
    idx = torch.randint(0, source.shape[0], (n,), generator=generator, device=generator.device)
    return source[idx.to(source.device)]


class DSBM:
    r"""Diffusion Schrödinger Bridge Matching by Iterative Markovian Fitting (Shi et al. 2023).

    Two drift networks, ``forward`` (:math:`x_0 \to x_1`) and ``backward`` (:math:`x_1 \to x_0`,
    in reversed time; see the module's model convention), learn the Schrödinger bridge between
    two distributions for a :class:`Bridge` reference (default :class:`BrownianBridge` (1.0)).
    :meth:`fit` alternates, for ``iterations`` rounds:

    1. the *reciprocal projection*: a coupling is built, first the independent one, then by
       simulating the network trained last (through :func:`sample_bridge`, i.e.
       :func:`torchnde.solve`) from real samples of its start distribution: forward from
       :math:`\pi_0` gives pairs :math:`(x_0, \hat x_1)`, backward from :math:`\pi_1` gives
       :math:`(\hat x_0, x_1)`; mixing the reference's bridges over it is the reciprocal process;
    2. the *Markovian projection*: the other network is trained by :func:`bridge_matching_loss`
       on that coupling (warm-started from its previous round).

    The first round trains the backward network, then they alternate, so an even number of
    rounds ends with the forward network. Each round keeps one end of the pairs real, so the
    marginals do not drift, and the coupling converges to the Schrödinger bridge's (for two
    Gaussians, the IMF iterates' cross-covariance is within 1e-3 of the limit after 4 exact
    projections).

    Args:
        forward, backward: the drift networks ``model(t, x)``.
        bridge: the reference (a :class:`Bridge` or ``sigma``).

    Sampling: :meth:`sample` (the SDE, forward or backward) and :meth:`velocity`, the
    probability-flow velocity :math:`\tfrac12(b_\text{fwd} - b_\text{bwd})` (Nelson's relation; a
    ``model(t, x)`` for :func:`~torchnde.generative.flow_matching.sample_ode` and every ODE solver).
    """

    def __init__(self, forward: nn.Module, backward: nn.Module, *, bridge: Bridge | float = 1.0):
        self.forward = forward
        self.backward = backward
        self.bridge = _as_bridge(bridge)
        self.history: list[dict] = []

    def fit(
        self,
        source,
        target,
        *,
        iterations: int = 4,
        steps: int = 1000,
        batch_size: int = 256,
        lr: float = 1e-3,
        num_pairs: int = 4096,
        nfe: int = 50,
        seed: int = 0,
        eps: float = 1e-3,
        weighting: str = "none",
        callback: Callable | None = None,
    ) -> DSBM:
        r"""Train by ``iterations`` rounds of IMF (see the class).

        Args:
            source, target: samples of :math:`\pi_0` and :math:`\pi_1`: tensors ``(N, ...)`` to
                draw from, or callables ``(n, generator) -> (n, ...)``.
            iterations: the number of rounds (Markovian projections), >= 1.
            steps, batch_size, lr: the Adam optimisation of each round (``flow_matching.fit``,
                cosine-decayed learning rate).
            num_pairs: the size of each round's coupling (simulated once per round, no gradient).
            nfe: Euler–Maruyama steps of the simulations.
            seed: seeds the draws, the Brownian paths and the minibatches.
            eps, weighting: of the training loss (:func:`bridge_matching_loss`).
            callback: ``callback(round, direction, dsbm)`` after every round.

        Returns:
            ``self``, with ``history`` (per round: direction, final loss).
        """
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an int >= 1; got {iterations!r}")
        p0 = next(iter(self.forward.parameters()))
        gen = torch.Generator(device=p0.device).manual_seed(seed)
        for k in range(iterations):
            with torch.no_grad():
                x0 = _draw(source, num_pairs, gen)
                x1 = _draw(target, num_pairs, gen)
                if k == 0:
                    pass  # the independent coupling
                elif k % 2 == 1:  # backward trained last: simulate it from real target samples
                    x0 = self.sample(x1, direction="backward", nfe=nfe, seed=seed + 7919 * k)
                else:
                    x1 = self.sample(x0, direction="forward", nfe=nfe, seed=seed + 7919 * k)
            direction = "backward" if k % 2 == 0 else "forward"
            net = self.backward if direction == "backward" else self.forward
            losses = fit(
                net,
                (x0.detach(), x1.detach()),
                loss=bridge_matching_loss,
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                seed=seed + k,
                bridge=self.bridge,
                direction=direction,
                eps=eps,
                weighting=weighting,
            )
            self.history.append({"round": k, "direction": direction, "loss": sum(losses[-50:]) / len(losses[-50:])})
            if callback is not None:
                callback(k, direction, self)
        return self

    def sample(self, x_start: torch.Tensor, *, direction: str = "forward", nfe: int = 100, seed: int = 0, **kwargs):
        """Simulate the learned SDE from ``x_start`` (:func:`sample_bridge`): ``"forward"`` from
        source samples to the target, ``"backward"`` from target samples to the source."""
        net = self.forward if direction == "forward" else self.backward
        return sample_bridge(net, x_start, bridge=self.bridge, direction=direction, nfe=nfe, seed=seed, **kwargs)

    def velocity(self) -> Callable:
        r"""The probability-flow velocity :math:`\tfrac12(b_\text{fwd}(t, x) - b_\text{bwd}(t, x))`
        as ``model(t, x)``: :math:`\dot x = v` has the bridge's marginals (its coupling is
        deterministic)."""
        fwd, bwd = self.forward, self.backward

        def velocity(t, x):
            return 0.5 * (fwd(t, x) - bwd(t, x))

        return velocity

    def copy(self) -> DSBM:
        """A deep copy (networks included)."""
        return copy.deepcopy(self)


# ---------------------------------------------------------------------------------------- multi-marginal
class LotkaVolterra(nn.Module):
    r"""A parametric Lotka–Volterra drift :math:`f(x, y) = (\alpha x - \beta x y,\; \delta x y - \gamma y)`
    (prey :math:`x`, predators :math:`y`), as ``f(t, z)`` for ``z`` of shape ``(batch, 2)``: a
    refinable reference drift for :class:`MultiMarginalBridge`. The four rates are trainable
    parameters (float64)."""

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, delta: float = 1.0, gamma: float = 1.0):
        super().__init__()
        self.rates = nn.Parameter(torch.tensor([alpha, beta, delta, gamma], dtype=torch.float64))

    def forward(self, t, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] != 2:
            raise ValueError(f"LotkaVolterra takes states (batch, 2) (prey, predators); got {tuple(z.shape)}")
        alpha, beta, delta, gamma = self.rates.to(z.dtype)
        x, y = z[..., 0], z[..., 1]
        return torch.stack([alpha * x - beta * x * y, delta * x * y - gamma * y], -1)

    def __repr__(self):
        a, b, d, g = (float(r) for r in self.rates.detach())
        return f"LotkaVolterra(alpha={a:.4g}, beta={b:.4g}, delta={d:.4g}, gamma={g:.4g})"


class MultiMarginalBridge:
    r"""A Schrödinger bridge through snapshots at several times, with an iteratively refined reference drift.

    Population snapshots :math:`X_{t_k} \sim p_k` at times :math:`t_0 < \dots < t_K` (unpaired
    across times, as in single-cell or ecological data) are joined by a process close to a reference
    :math:`dX = f_\theta(t, X)\,dt + \sigma\,dW` whose drift :math:`f_\theta` is a parametric model
    (e.g. :class:`LotkaVolterra`), refined from the data (after the seed paper "Multi-marginal
    Schrödinger bridges with iterative reference refinement", 2024). Over each interval
    :math:`\Delta_k = t_{k+1} - t_k` the reference is taken in its Euler–Maruyama form (the drift
    frozen at the interval's start), so that

    * the static problem on each interval is entropic OT with the reference's transition cost
      :math:`c(x, y) = \lVert y - x - f_\theta(t_k, x)\Delta_k\rVert^2` at regularisation
      :math:`2\sigma^2\Delta_k` (:meth:`couple`, :func:`sinkhorn_plan` with ``cost``);
    * the reference's bridges are Brownian bridges (a constant drift does not change a Brownian
      bridge), so the Markovian projection is learned by bridge matching over all intervals with one
      time-conditioned drift network (:meth:`fit_drift`) and simulated through :func:`torchnde.solve`
      (:meth:`sample`);
    * **reference refinement** (:meth:`refine_reference`) fits :math:`\theta` by maximum likelihood
      of the Euler transitions on the current couplings,
      :math:`\min_\theta \sum \lVert (y - x)/\Delta_k - f_\theta(t_k, x)\rVert^2`, and
      :meth:`fit_reference` alternates coupling and refinement. When the data come from the
      reference family, its true parameters are a fixed point (up to the Euler approximation and
      the finite samples).

    The Euler form is an approximation that needs intervals short against the reference's time
    scale; it is what keeps every step a closed-form bridge.

    Args:
        times: the snapshot times, increasing (a sequence of floats).
        reference: ``f(t, x)`` returning the reference drift, an ``nn.Module`` whose parameters
            :meth:`refine_reference` trains; ``None`` is the Brownian reference (no drift).
        sigma: the reference's noise level, > 0.
    """

    def __init__(self, times, reference: nn.Module | None = None, *, sigma: float = 1.0):
        times = [float(t) for t in times]
        if len(times) < 2 or any(b <= a for a, b in zip(times, times[1:])):
            raise ValueError(f"times must be at least two increasing numbers; got {times}")
        self.times = times
        self.reference = reference
        self.sigma = _check_sigma(sigma)
        self.history: list[dict] = []

    def _check_snapshots(self, snapshots):
        if len(snapshots) != len(self.times):
            raise ValueError(f"need one snapshot per time ({len(self.times)}); got {len(snapshots)}")
        shape = tuple(snapshots[0].shape[1:])
        for k, x in enumerate(snapshots):
            if x.dim() != 2 or tuple(x.shape[1:]) != shape or x.shape[0] == 0:
                raise ValueError(
                    f"snapshots must be non-empty (n_k, d) tensors of one d; snapshot {k} is {tuple(x.shape)}"
                )

    def _ref_drift(self, t: float, x: torch.Tensor) -> torch.Tensor:
        if self.reference is None:
            return torch.zeros_like(x)
        return self.reference(_times(t, x), x)

    def couple(self, snapshots, *, generator: torch.Generator | None = None, iters: int = 500):
        """Pairs ``(x_k, y_k)`` for every interval: each sample of snapshot ``k`` with a partner
        drawn from the entropic plan to snapshot ``k + 1`` under the reference's transition cost."""
        self._check_snapshots(snapshots)
        pairs = []
        for k in range(len(self.times) - 1):
            x, y = snapshots[k], snapshots[k + 1]
            dt = self.times[k + 1] - self.times[k]
            with torch.no_grad():
                pred = x + self._ref_drift(self.times[k], x) * dt
                cost = torch.cdist(pred.to(torch.float64), y.to(torch.float64)).square()
            P = sinkhorn_plan(x, y, 2 * self.sigma**2 * dt, cost=cost, iters=iters)
            gen_device = generator.device if generator is not None else P.device
            j = torch.multinomial(P.to(gen_device), 1, generator=generator).reshape(-1).to(y.device)
            pairs.append((x, y[j]))
        return pairs

    def refine_reference(self, pairs, *, steps: int = 300, lr: float = 0.05) -> float:
        """Fit the reference's parameters to the pairs' Euler transitions (full-batch Adam);
        returns the final mean squared residual."""
        if self.reference is None:
            raise ValueError("refine_reference needs a parametric reference (an nn.Module), not None")
        params = [p for p in self.reference.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        # all intervals in one batch: per-sample start times, and the Euler velocities (y - x) / dt
        xs = torch.cat([x for x, _ in pairs])
        ts = torch.cat([torch.full((x.shape[0],), self.times[k], dtype=xs.dtype) for k, (x, _) in enumerate(pairs)])
        vs = torch.cat([(y - x) / (self.times[k + 1] - self.times[k]) for k, (x, y) in enumerate(pairs)])
        ts = ts.to(xs.device)
        # every interval weighs the same, whatever its number of pairs
        w = torch.cat([torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=xs.dtype) for x, _ in pairs]).to(xs.device)
        w = w / w.sum()
        value = torch.zeros(())
        for _ in range(steps):
            value = (w[:, None] * (vs - self.reference(ts, xs)).square()).sum() / xs.shape[-1]
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
        return float(value.detach())

    def fit_reference(
        self, snapshots, *, iterations: int = 5, steps: int = 300, lr: float = 0.05, seed: int = 0, callback=None
    ):
        """Alternate :meth:`couple` and :meth:`refine_reference` ``iterations`` times; returns the
        last couplings. ``callback(iteration, self)`` after each refinement."""
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an int >= 1; got {iterations!r}")
        gen = torch.Generator(device=snapshots[0].device).manual_seed(seed)
        pairs = None
        for i in range(iterations):
            pairs = self.couple(snapshots, generator=gen)
            residual = self.refine_reference(pairs, steps=steps, lr=lr)
            self.history.append({"iteration": i, "residual": residual, "reference": repr(self.reference)})
            if callback is not None:
                callback(i, self)
        return self.couple(snapshots, generator=gen)

    def bridge_loss(self, model: Callable, pairs, *, generator: torch.Generator | None = None, eps: float = 1e-3):
        """Bridge matching over all intervals: an interval per sample (in proportion to its pairs),
        a time in it, the Brownian bridge between the pair, the target :math:`(y - x_t)/(t_{k+1} - t)`."""
        xs = torch.cat([x for x, _ in pairs])
        ys = torch.cat([y for _, y in pairs])
        lo = torch.cat([torch.full((x.shape[0],), self.times[k], dtype=xs.dtype) for k, (x, _) in enumerate(pairs)])
        hi = torch.cat([torch.full((x.shape[0],), self.times[k + 1], dtype=xs.dtype) for k, (x, _) in enumerate(pairs)])
        lo, hi = lo.to(xs.device), hi.to(xs.device)
        u = torch.rand(xs.shape[0], generator=generator, dtype=xs.dtype, device=xs.device) * (1 - eps)
        s = u[:, None]
        dt = (hi - lo)[:, None]
        z = torch.randn(xs.shape, generator=generator, dtype=xs.dtype, device=xs.device)
        xt = (1 - s) * xs + s * ys + self.sigma * (dt * s * (1 - s)).sqrt() * z
        target = (ys - xt) / ((1 - s) * dt)
        return (model(lo + u * (hi - lo), xt) - target).square().mean()

    def fit_drift(
        self, model: nn.Module, pairs, *, steps: int = 1000, batch_size: int = 256, lr: float = 1e-3, seed: int = 0
    ) -> list[float]:
        """Train ``model(t, x)`` by :meth:`bridge_loss` on minibatches of the pairs of every interval."""
        xs = [x for x, _ in pairs]
        ys = [y for _, y in pairs]

        def draw(n, generator):
            picked = []
            for k in range(len(xs)):
                size = (max(1, n // len(xs)),)
                idx = torch.randint(0, xs[k].shape[0], size, generator=generator, device=generator.device)
                picked.append((xs[k][idx.to(xs[k].device)], ys[k][idx.to(ys[k].device)]))
            return picked

        def loss(m, picked, _unused, generator=None):
            return self.bridge_loss(m, picked, generator=generator)

        def pairs_fn(n, generator):
            return draw(n, generator), None

        return fit(model, pairs_fn, loss=loss, steps=steps, batch_size=batch_size, lr=lr, seed=seed)

    def sample(self, model: Callable, x0: torch.Tensor, *, nfe_per_interval: int = 20, seed: int = 0, **kwargs):
        """Simulate :math:`dX = \\text{model}(t, X)\\,dt + \\sigma\\,dW` from ``times[0]`` through
        every snapshot time (Euler–Maruyama by default, through :func:`torchnde.solve`); returns the
        states at the snapshot times, ``(K + 1, batch, d)``."""
        from .._saveat import SaveAt
        from ..controllers import StepTo

        t0, t1 = self.times[0], self.times[-1]
        n = nfe_per_interval * (len(self.times) - 1)
        solver = kwargs.pop("solver", None) or Euler()
        grid = _uniform_grid(self.times, nfe_per_interval)
        path = BrownianGrid(grid, tuple(x0.shape), seed=seed, dtype=x0.dtype, device=x0.device)
        sigma = self.sigma

        def drift(t, x, args):
            return model(_times(t, x), x)

        def diffusion(t, x, args):
            return torch.full_like(x, sigma)

        terms = MultiTerm(
            ODETerm(drift, time_as_float=True),
            ControlTerm(diffusion, path, noise="diagonal", additive=True, time_as_float=True),
        )
        sol = _solve.solve(
            terms,
            solver,
            t0,
            t1,
            x0,
            saveat=SaveAt(ts=self.times),
            controller=StepTo(grid),
            max_steps=n + 8 * len(self.times),
            **kwargs,
        )
        return sol.ys


def _uniform_grid(times, per_interval: int) -> list[float]:
    grid = []
    for a, b in zip(times, times[1:]):
        grid += [a + (b - a) * i / per_interval for i in range(per_interval)]
    return grid + [times[-1]]
