r"""Continuous normalizing flows trained by maximum likelihood, with RNODE regularisation.

A CNF (Chen et al. 2018; Grathwohl et al. 2019, FFJORD) is a neural vector field :math:`f_\theta(t, x)`
whose flow carries data at ``t0`` to a simple prior at ``t1``. Its log-density is the instantaneous
change of variables of :mod:`torchnde.generative.likelihood`; samples come from solving the same ODE
backwards from prior draws. Both are one :func:`torchnde.solve` each, with any solver, controller
and adjoint.

Training minimises the negative log-likelihood, optionally plus the RNODE regularisers of Finlay,
Jacobsen, Nurbekyan & Oberman (2020, "How to train your neural ODE: the world of Jacobian and
kinetic regularization"): the kinetic energy :math:`\int_{t_0}^{t_1}\|f\|^2 dt` and the Jacobian
Frobenius norm :math:`\int_{t_0}^{t_1}\|\partial_x f\|_F^2 dt` (estimated with the same Hutchinson
probe as the trace), integrated as extra components of the augmented state. They favour straight,
smooth flows that need fewer solver steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._solve import solve
from .._terms import ODETerm
from ..adjoints import AbstractAdjoint, DirectAdjoint
from ..controllers import AbstractController
from ..solvers import AbstractSolver, Tsit5
from ._shapes import batch_hint
from .likelihood import (
    _check_trace,
    _default_controller,
    _prior_fn,
    _resolve_per_sample,
    integrate_augmented,
    standard_normal_log_prob,
    trace_noise,
)

__all__ = ["CNF", "REGULARISERS"]

#: the keys of ``CNF(regularisation={...})``
REGULARISERS = ("kinetic", "jacobian_frobenius")


class _TimeAsTensor:
    """Calls ``module(t, x)`` with ``t`` as a ``(batch,)`` tensor of ``x``'s dtype and device,
    whatever ``solve`` passes (a float, or a per-sample tensor)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, t, x):
        if isinstance(t, torch.Tensor):
            t = t.to(dtype=x.dtype, device=x.device)
            tt = t.expand(x.shape[0]) if t.dim() == 0 else t
        else:
            tt = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        return self.module(tt, x)


class _Prior:
    """One interface over the accepted priors."""

    def __init__(self, prior, event_shape):
        self.prior = prior
        self.event_shape = None if event_shape is None else tuple(event_shape)
        if prior is None:
            self.log_prob = standard_normal_log_prob
        elif hasattr(prior, "prior_log_prob") and hasattr(prior, "prior_sample"):
            self.log_prob = prior.prior_log_prob  # a forward process of torchnde.generative
        else:
            self.log_prob = _prior_fn(prior)
            if not isinstance(prior, torch.distributions.Distribution):
                raise TypeError(
                    "prior must be None (standard normal), a torch.distributions.Distribution, or an object "
                    f"with prior_sample(shape, ...) and prior_log_prob(x); got {type(prior).__name__}"
                )

    def sample(self, n, *, generator, dtype, device):
        prior = self.prior
        if isinstance(prior, torch.distributions.Distribution):
            if generator is not None:
                raise ValueError("a torch.distributions prior samples from the global RNG; pass seed=None")
            return prior.sample((n,))
        if self.event_shape is None:
            raise ValueError("sampling needs the data's shape: build the CNF with event_shape=(d,) (or (C, H, W))")
        shape = (n, *self.event_shape)
        if prior is None:
            return torch.randn(shape, generator=generator, dtype=dtype, device=device)
        return prior.prior_sample(shape, generator=generator, dtype=dtype, device=device)


class CNF(nn.Module):
    r"""A continuous normalizing flow: data at ``t0`` flows to the prior at ``t1``.

    Args:
        vector_field: an ``nn.Module`` called as ``vector_field(t, x)`` with ``t`` a ``(batch,)``
            tensor (of ``x``'s dtype) and ``x`` of shape ``(batch, *event_shape)``; returns a
            tensor shaped like ``x``. It must treat samples independently.
        prior: ``None`` (standard normal), a ``torch.distributions.Distribution`` over one
            example, or an object with ``prior_sample(shape, generator=, dtype=, device=)`` and
            ``prior_log_prob(x)`` (such as a forward process).
        event_shape: the shape of one example (needed by :meth:`sample` with the default prior).
        t0, t1: data and prior times.
        trace: ``"exact"``, ``"hutchinson-gaussian"`` (default, as FFJORD) or
            ``"hutchinson-rademacher"``; a fresh probe per sample and call, fixed during a solve.
        solver: default ``Tsit5()``.
        controller: default ``PIDController(rtol=1e-5, atol=1e-5)`` (``ConstantStepSize()`` with
            ``dt0``).
        adjoint: ``DirectAdjoint()`` (default), ``BacksolveAdjoint()``, ``CheckpointAdjoint()``...
        regularisation: ``None`` or a dict of weights, e.g. ``{"kinetic": 0.01,
            "jacobian_frobenius": 0.01}`` (RNODE; Finlay et al. 2020), used by :meth:`loss`.
        per_sample: per-sample adaptive steps; default ``None`` means ``True`` with
            ``DirectAdjoint`` (the only adjoint supporting it) and ``False`` otherwise.
        dt0, max_steps: passed to :func:`torchnde.solve`.

    ``cnf(x)`` is ``cnf.log_prob(x)``. Evaluate under ``torch.no_grad()`` when no gradient is
    needed: with gradients enabled the trace keeps its double-backward graph.
    """

    def __init__(
        self,
        vector_field: nn.Module,
        prior=None,
        *,
        event_shape=None,
        t0: float = 0.0,
        t1: float = 1.0,
        trace: str = "hutchinson-gaussian",
        solver: AbstractSolver | None = None,
        controller: AbstractController | None = None,
        adjoint: AbstractAdjoint | None = None,
        regularisation: dict | None = None,
        per_sample: bool | None = None,
        dt0=None,
        max_steps: int | None = 4096,
    ):
        super().__init__()
        if not callable(vector_field):
            raise TypeError(f"vector_field must be a module called as f(t, x); got {type(vector_field).__name__}")
        if float(t0) == float(t1):
            raise ValueError("t0 and t1 must differ")
        self.vector_field = vector_field
        self._prior = _Prior(prior, event_shape)
        self.event_shape = None if event_shape is None else tuple(event_shape)
        self.t0, self.t1 = float(t0), float(t1)
        self.trace = _check_trace(trace)
        self.solver = Tsit5() if solver is None else solver
        self.controller = _default_controller(controller, dt0)
        self.adjoint = DirectAdjoint() if adjoint is None else adjoint
        if not isinstance(self.adjoint, AbstractAdjoint):
            raise TypeError(f"adjoint must be an adjoint object such as DirectAdjoint(), got {adjoint!r}")
        self.per_sample = _resolve_per_sample(per_sample, self.adjoint)
        self.dt0, self.max_steps = dt0, max_steps
        reg = {} if regularisation is None else dict(regularisation)
        unknown = sorted(set(reg) - set(REGULARISERS))
        if unknown:
            raise ValueError(f"unknown regulariser(s) {unknown}; valid keys are {list(REGULARISERS)}")
        for k, w in reg.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"regularisation weight {k!r} must be a finite number >= 0, got {w!r}")
        self.regularisation = reg
        self._field = _TimeAsTensor(vector_field)

    # ------------------------------------------------------------------ internals

    def _solve_kwargs(self):
        return dict(
            solver=self.solver,
            controller=self.controller,
            adjoint=self.adjoint,
            per_sample=self.per_sample,
            dt0=self.dt0,
            max_steps=self.max_steps,
        )

    def _generator(self, seed, device):
        return None if seed is None else torch.Generator(device=device).manual_seed(int(seed))

    def _augmented(self, x, t_start, t_end, trace, seed, kinetic=False, jacobian_frobenius=False):
        trace = self.trace if trace is None else _check_trace(trace)
        noise = trace_noise(x, trace, generator=self._generator(seed, x.device))
        return integrate_augmented(
            self._field,
            x,
            t_start,
            t_end,
            trace=trace,
            noise=noise,
            kinetic=kinetic,
            jacobian_frobenius=jacobian_frobenius,
            **self._solve_kwargs(),
        )

    def _check_x(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError("x must be a tensor of shape (batch, *event_shape)")
        if self.event_shape is not None and tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(
                f"x has shape {tuple(x.shape)}, i.e. example shape {tuple(x.shape[1:])}; the CNF was built for "
                f"example shape {self.event_shape}: pass x of shape {batch_hint(self.event_shape)}"
            )

    # ------------------------------------------------------------------ public API

    def log_prob(self, x: torch.Tensor, *, trace: str | None = None, seed: int | None = None) -> torch.Tensor:
        """``(batch,)`` log-densities of ``x`` (``trace`` overrides the CNF's estimator for this
        call, e.g. ``"exact"`` for evaluation; ``seed`` fixes the Hutchinson probes). One
        unbatched example of shape ``event_shape`` (when the CNF was given one) gives a 0-d
        result."""
        unbatched = isinstance(x, torch.Tensor) and self.event_shape is not None and tuple(x.shape) == self.event_shape
        if unbatched:
            x = x.unsqueeze(0)
        self._check_x(x)
        z, parts, _ = self._augmented(x, self.t0, self.t1, trace, seed)
        lp = self._prior.log_prob(z) + parts["divergence"]
        return lp[0] if unbatched else lp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    def loss(self, x: torch.Tensor, *, seed: int | None = None, return_parts: bool = False):
        r"""The training objective: mean negative log-likelihood (nats per example) plus the
        weighted RNODE regularisers (each the batch mean of its time integral). With
        ``return_parts=True`` also a dict of the detached parts (``"nll"``, ``"kinetic"``,
        ``"jacobian_frobenius"`` when used)."""
        self._check_x(x)
        reg = self.regularisation
        kin, frob = "kinetic" in reg, "jacobian_frobenius" in reg
        z, parts, _ = self._augmented(x, self.t0, self.t1, None, seed, kinetic=kin, jacobian_frobenius=frob)
        nll = -(self._prior.log_prob(z) + parts["divergence"]).mean()
        total = nll
        out = {"nll": nll.detach()}
        for name in REGULARISERS:
            if name in reg:
                value = parts[name].mean()
                total = total + reg[name] * value
                out[name] = value.detach()
        return (total, out) if return_parts else total

    def sample(
        self,
        n: int,
        *,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device=None,
        return_log_prob: bool = False,
        trace: str | None = None,
    ):
        """``n`` samples: prior draws solved backwards from ``t1`` to ``t0``. With
        ``return_log_prob=True`` also their log-densities, integrated along the same solve
        (``log p(x) = log p_prior(z) - int_{t1}^{t0} tr(df/dx) dt``)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        p = next(iter(self.vector_field.parameters()), None) if isinstance(self.vector_field, nn.Module) else None
        dtype = dtype if dtype is not None else (p.dtype if p is not None else torch.get_default_dtype())
        device = device if device is not None else (p.device if p is not None else torch.device("cpu"))
        z = self._prior.sample(n, generator=self._generator(seed, device), dtype=dtype, device=device)
        if return_log_prob:
            x, parts, _ = self._augmented(z, self.t1, self.t0, trace, None if seed is None else seed + 1)
            return x, self._prior.log_prob(z) - parts["divergence"]
        field = self._field
        sol = solve(
            ODETerm(lambda t, y, args: field(t, y), time_as_float=True),
            self.solver,
            self.t1,
            self.t0,
            z,
            dt0=None if self.dt0 is None else -abs(self.dt0),
            controller=self.controller,
            adjoint=self.adjoint,
            per_sample=self.per_sample,
            max_steps=self.max_steps,
        )
        return sol.ys[:, -1] if self.per_sample else sol.ys[-1]
