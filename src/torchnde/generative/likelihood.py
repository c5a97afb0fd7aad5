r"""Exact log-densities of ODE flows: the instantaneous change of variables.

A flow :math:`\dot x = f(t, x)` that carries data at time ``t0`` to a prior at time ``t1``
(a continuous normalizing flow, or the probability-flow ODE of a diffusion) changes the
log-density of its state along a trajectory by (Chen et al. 2018, "Neural Ordinary Differential
Equations", Thm. 1)

.. math:: \frac{d}{dt}\log p_t(x(t)) = -\operatorname{tr}\frac{\partial f}{\partial x}(t, x(t)),

so :math:`\log p_{t_0}(x) = \log p_{t_1}(x(t_1)) + \int_{t_0}^{t_1}\operatorname{tr}\,\partial_x f\,dt`.
:func:`log_prob` integrates the state and this integral together, as one augmented ODE, with
:func:`torchnde.solve`. The trace is exact (one vector-Jacobian product per dimension, for small
dimensions) or the unbiased estimate :math:`\varepsilon^\top (\partial_x f)\,\varepsilon` of
Skilling (1989) and Hutchinson (1990) with one noise vector per sample held fixed for the whole
solve, as in FFJORD (Grathwohl et al. 2019, "FFJORD: Free-form Continuous Dynamics for Scalable
Reversible Generative Models"): one vector-Jacobian product per evaluation.

Discrete data (images with 256 levels) get a density through uniform dequantization
(Uria et al. 2013; Theis et al. 2016): :func:`dequantize` and :func:`bits_per_dim`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._solve import solve
from .._terms import AbstractTerm, ODETerm
from ..adjoints import AbstractAdjoint, DirectAdjoint
from ..controllers import AbstractController, ConstantStepSize, PIDController
from ..solvers import AbstractSolver, Tsit5
from ._shapes import batch_hint, event_mismatch, event_shape_of, reraise_if_shape_error

__all__ = [
    "TRACES",
    "log_prob",
    "augmented_field",
    "integrate_augmented",
    "trace_noise",
    "standard_normal_log_prob",
    "dequantize",
    "bits_per_dim",
]

#: the trace estimators accepted by :func:`log_prob` and :class:`~torchnde.generative.cnf.CNF`
TRACES = ("exact", "hutchinson-gaussian", "hutchinson-rademacher")


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """Log-density of the standard normal prior, summed over every dimension but the first
    (the batch): ``(B, *event) -> (B,)``."""
    flat = _rows(z)
    return -0.5 * flat.pow(2).sum(-1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def _rows(v: torch.Tensor) -> torch.Tensor:
    """``v`` as ``(batch, features)`` (an empty batch too, where ``reshape(0, -1)`` is ambiguous)."""
    return v.reshape(v.shape[0], math.prod(v.shape[1:]))


def _check_trace(trace: str) -> str:
    if trace not in TRACES:
        raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
    return trace


def trace_noise(
    x: torch.Tensor, trace: str, *, seed: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor | None:
    """The fixed probe vectors of a Hutchinson estimator: one per sample, shaped like ``x``,
    with ``E[eps eps^T] = I`` (standard normal, or Rademacher ±1). ``None`` for the exact trace.

    ``seed`` (or a ``generator`` on ``x``'s device) makes the draw reproducible; otherwise the
    global random number generator is used.
    """
    _check_trace(trace)
    if trace == "exact":
        return None
    if generator is None and seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(int(seed))
    if trace == "hutchinson-gaussian":
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    bits = torch.randint(0, 2, x.shape, generator=generator, device=x.device)
    return (2 * bits - 1).to(x.dtype)


def _as_field(vector_field) -> Callable[[Any, torch.Tensor, Any], torch.Tensor]:
    """``f(t, x, args)`` from an ``ODETerm`` or a callable ``f(t, x)``."""
    if isinstance(vector_field, ODETerm):
        return vector_field.vf
    if isinstance(vector_field, AbstractTerm):
        raise TypeError(
            f"log_prob needs an ODE vector field; got {vector_field!r}. A reverse-time SDE has no "
            "log-density by the change of variables: pass its probability-flow ODE instead"
        )
    if not callable(vector_field):
        raise TypeError(f"vector_field must be a callable f(t, x) or an ODETerm, got {type(vector_field).__name__}")
    return lambda t, x, args: vector_field(t, x)


def _declared_event_shape(vector_field) -> tuple[int, ...] | None:
    """The example shape a vector field (or the function inside an ``ODETerm``) declares."""
    return event_shape_of(vector_field.vector_field if isinstance(vector_field, ODETerm) else vector_field)


def augmented_field(
    vector_field,
    trace: str = "exact",
    noise: torch.Tensor | None = None,
    *,
    kinetic: bool = False,
    jacobian_frobenius: bool = False,
    sign: float = 1.0,
) -> Callable:
    r"""The vector field of the augmented state ``(x, delta[, kinetic][, frobenius])``.

    ``delta`` integrates the divergence :math:`\operatorname{tr}\partial_x f` (exact or estimated
    with the fixed probe ``noise``); with ``kinetic=True`` a component integrates
    :math:`\|f\|^2` and with ``jacobian_frobenius=True`` one integrates :math:`\|\partial_x f\|_F^2`
    (exact with the exact trace; :math:`\|\varepsilon^\top\partial_x f\|^2`, unbiased, with a
    Hutchinson probe) — the regularisers of RNODE (Finlay et al. 2020, "How to train your neural
    ODE"). ``sign`` multiplies the regularisers' integrands (``-1`` when solving backwards keeps
    them positive). Every extra component has shape ``(B,)``.

    The derivatives are taken with :func:`torch.autograd.grad`; with gradients enabled they keep
    their graph (``create_graph=True``), so the result is differentiable with respect to the
    state and the vector field's parameters (as every adjoint needs). The vector field must treat
    the samples of the batch independently (no batch normalisation across samples).
    """
    field = _as_field(vector_field)
    expected = _declared_event_shape(vector_field)
    _check_trace(trace)
    if trace != "exact" and noise is None:
        raise ValueError(f"trace={trace!r} needs its probe vectors: pass noise=trace_noise(x, trace, seed=...)")

    def aug(t, state, args):
        x = state[0]
        outer = torch.is_grad_enabled()
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_()
            try:
                f = field(t, x, args)
            except (RuntimeError, IndexError) as e:
                reraise_if_shape_error(e, "the vector field", x, expected)
                raise
            if not isinstance(f, torch.Tensor) or f.shape != x.shape:
                got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ValueError(f"the vector field must return a tensor shaped like x {tuple(x.shape)}, got {got}")
            B = x.shape[0]
            zero = torch.zeros(B, dtype=x.dtype, device=x.device)
            frob = zero
            if not f.requires_grad:  # f does not depend on x (nor on anything differentiable)
                div = zero
            elif trace == "exact":
                rows = _rows(f)
                div = zero
                for i in range(rows.shape[1]):
                    (g,) = torch.autograd.grad(
                        rows[:, i].sum(), x, create_graph=outer, retain_graph=True, materialize_grads=True
                    )
                    g = _rows(g)
                    div = div + g[:, i]
                    if jacobian_frobenius:
                        frob = frob + g.pow(2).sum(-1)
            else:
                if noise.shape != x.shape:
                    raise ValueError(
                        f"the Hutchinson probe has shape {tuple(noise.shape)} but the state has shape "
                        f"{tuple(x.shape)}; draw one probe per sample with trace_noise(x, ...)"
                    )
                (g,) = torch.autograd.grad(
                    f, x, grad_outputs=noise, create_graph=outer, retain_graph=True, materialize_grads=True
                )
                div = _rows(g * noise).sum(-1)
                if jacobian_frobenius:
                    frob = _rows(g).pow(2).sum(-1)
        out = [f, div]
        if kinetic:
            out.append(sign * _rows(f).pow(2).sum(-1))
        if jacobian_frobenius:
            out.append(sign * frob)
        if not outer:
            out = [o.detach() for o in out]
        return tuple(out)

    return aug


def _default_controller(controller, dt0, rtol=1e-5, atol=1e-5):
    if controller is not None:
        if not isinstance(controller, AbstractController):
            raise TypeError(f"controller must be PIDController(...) or ConstantStepSize(), got {controller!r}")
        return controller
    return ConstantStepSize() if dt0 is not None else PIDController(rtol=rtol, atol=atol)


def _direction(t_start, t_end) -> float:
    first = lambda v: float(torch.as_tensor(v).detach().reshape(-1)[0])
    return 1.0 if first(t_end) >= first(t_start) else -1.0


def _resolve_per_sample(per_sample, adjoint) -> bool:
    if per_sample is None:
        return isinstance(adjoint, DirectAdjoint)
    return bool(per_sample)


def _prior_fn(prior_log_prob) -> Callable[[torch.Tensor], torch.Tensor]:
    if prior_log_prob is None:
        return standard_normal_log_prob
    if isinstance(prior_log_prob, torch.distributions.Distribution):
        dist = prior_log_prob

        def fn(z):
            lp = dist.log_prob(z)
            return _rows(lp).sum(-1)

        return fn
    if not callable(prior_log_prob):
        raise TypeError(
            "prior_log_prob must be a callable z -> (B,) log-densities, a torch.distributions.Distribution "
            f"or None (standard normal); got {type(prior_log_prob).__name__}"
        )
    return prior_log_prob


def integrate_augmented(
    vector_field,
    x: torch.Tensor,
    t_start,
    t_end,
    *,
    trace: str = "exact",
    noise: torch.Tensor | None = None,
    kinetic: bool = False,
    jacobian_frobenius: bool = False,
    solver: AbstractSolver | None = None,
    controller: AbstractController | None = None,
    adjoint: AbstractAdjoint | None = None,
    per_sample: bool | None = None,
    dt0=None,
    args=None,
    max_steps: int | None = 4096,
):
    """Solve the augmented ODE of :func:`augmented_field` from ``t_start`` to ``t_end`` starting at
    ``(x, 0, ...)``. Returns ``(x_end, parts, solution)`` with ``parts`` the dict of the integrated
    extra components: ``"divergence"`` (:math:`\\int_{t_{start}}^{t_{end}} \\mathrm{tr}\\,\\partial_x
    f\\,dt`), and when asked ``"kinetic"`` and ``"jacobian_frobenius"`` (integrated over
    ``|dt|``). This is the one place the likelihood code calls :func:`torchnde.solve`."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape (batch, *event_shape)")
    adjoint = DirectAdjoint() if adjoint is None else adjoint
    per_sample = _resolve_per_sample(per_sample, adjoint)
    solver = Tsit5() if solver is None else solver
    controller = _default_controller(controller, dt0)
    sign = _direction(t_start, t_end)
    if dt0 is not None and not isinstance(dt0, torch.Tensor):
        dt0 = math.copysign(abs(float(dt0)), sign)
    aug = augmented_field(vector_field, trace, noise, kinetic=kinetic, jacobian_frobenius=jacobian_frobenius, sign=sign)
    B = x.shape[0]
    n_extra = 1 + int(kinetic) + int(jacobian_frobenius)
    y0 = (x, *(torch.zeros(B, dtype=x.dtype, device=x.device) for _ in range(n_extra)))
    sol = solve(
        ODETerm(aug, time_as_float=True),
        solver,
        t_start,
        t_end,
        y0,
        dt0=dt0,
        args=args,
        controller=controller,
        adjoint=adjoint,
        per_sample=per_sample,
        max_steps=max_steps,
    )
    last = [leaf[:, -1] if per_sample else leaf[-1] for leaf in sol.ys]
    names = ["divergence"] + (["kinetic"] if kinetic else []) + (["jacobian_frobenius"] if jacobian_frobenius else [])
    return last[0], dict(zip(names, last[1:])), sol


def log_prob(
    vector_field,
    x: torch.Tensor,
    t0,
    t1,
    prior_log_prob=None,
    *,
    trace: str = "exact",
    solver: AbstractSolver | None = None,
    controller: AbstractController | None = None,
    per_sample: bool | None = None,
    adjoint: AbstractAdjoint | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    dt0=None,
    args=None,
    max_steps: int | None = 4096,
    return_solution: bool = False,
    event_shape=None,
):
    r"""Log-density of data ``x`` under the flow :math:`\dot x = f(t, x)` that maps data at ``t0``
    to the prior at ``t1``:

    .. math:: \log p_{t_0}(x) = \log p_{t_1}(x(t_1)) + \int_{t_0}^{t_1}\operatorname{tr}
              \frac{\partial f}{\partial x}(t, x(t))\,dt

    (Chen et al. 2018; Grathwohl et al. 2019), solved as one augmented ODE by
    :func:`torchnde.solve`.

    Args:
        vector_field: ``f(t, x)`` returning a tensor shaped like ``x`` (an ``nn.Module`` works), or
            an :class:`~torchnde.ODETerm` ``f(t, x, args)`` such as a process's probability-flow
            ODE. ``t`` is a Python float, or with ``per_sample=True`` a ``(batch,)`` tensor.
        x: data, ``(batch, *event_shape)``, or one example of shape ``event_shape`` when the
            event shape is known (then the result is 0-d, as ``torch.distributions`` does).
        t0, t1: data time and prior time (``t1 < t0`` is allowed).
        prior_log_prob: ``z -> (batch,)`` log-density at ``t1``, a
            ``torch.distributions.Distribution``, or ``None`` for the standard normal.
        trace: ``"exact"`` (one vector-Jacobian product per dimension: small dimensions),
            ``"hutchinson-gaussian"`` or ``"hutchinson-rademacher"`` (unbiased; one product).
        solver: default ``Tsit5()``.
        controller: default ``PIDController(rtol=1e-5, atol=1e-5)`` (``ConstantStepSize()`` when
            ``dt0`` is given).
        per_sample: each sample gets its own adaptive steps, so its log-density does not depend
            on the rest of the batch. Default ``None``: ``True`` with ``DirectAdjoint`` (the only
            adjoint that supports it), ``False`` otherwise.
        adjoint: how gradients flow (default ``DirectAdjoint()``); any adjoint works without
            per-sample stepping.
        seed, generator: reproducible Hutchinson probes (one per sample, fixed for the solve).
        noise: explicit probes shaped like ``x`` (overrides ``seed``).
        dt0, args, max_steps: passed to :func:`torchnde.solve` (``args`` reaches an ``ODETerm``).
        return_solution: also return the :class:`~torchnde.Solution` (for ``stats``).
        event_shape: the shape of one example, e.g. ``(2,)``. Default: what the vector field
            declares as ``event_shape`` (torchnde's ``MLP`` and ``CNF``, the exact oracles'
            ``score_fn``/``model``, and a process's probability flow of such a model do), else
            unknown. With it known, ``x`` is checked against it up front. With it unknown, ``x``
            must have at least two dimensions: a 1-D ``x`` is refused as ambiguous (one
            example, or a batch of scalars?) — pass ``x[None]``, ``event_shape=(d,)`` or, for
            scalar data, ``event_shape=()``.

    Returns:
        ``(batch,)`` log-densities in nats (0-d for one unbatched example), and the solution if
        asked.

    Raises:
        ValueError: ``x`` does not fit the event shape, or is 1-D with no event shape known; a
            :class:`~torchnde.generative.ModelShapeError` (also a ``RuntimeError``) when
            the vector field fails on ``x``'s shape.
    """
    _check_trace(trace)
    prior = _prior_fn(prior_log_prob)
    x, noise, unbatched = _batch_of(x, noise, vector_field, event_shape)
    if noise is None:
        noise = trace_noise(x, trace, seed=seed, generator=generator)
    z, parts, sol = integrate_augmented(
        vector_field,
        x,
        t0,
        t1,
        trace=trace,
        noise=noise,
        solver=solver,
        controller=controller,
        adjoint=adjoint,
        per_sample=per_sample,
        dt0=dt0,
        args=args,
        max_steps=max_steps,
    )
    lp = prior(z) + parts["divergence"]
    if unbatched:
        lp = lp[0]
    return (lp, sol) if return_solution else lp


def _batch_of(x, noise, vector_field, event_shape):
    """``(x, noise, unbatched)``: ``x`` (and explicit probes) with a batch dimension, after
    checking ``x`` against the event shape (given, or declared by the vector field)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor of shape (batch, *event_shape), got {type(x).__name__}")
    if event_shape is None:
        expected = _declared_event_shape(vector_field)
    else:
        if isinstance(event_shape, int) or not all(isinstance(s, int) and s >= 1 for s in tuple(event_shape)):
            raise ValueError(f"event_shape must be a tuple of positive ints such as (2,), got {event_shape!r}")
        expected = tuple(event_shape)
    shape = tuple(x.shape)
    if expected is None:
        if x.dim() < 2:
            raise ValueError(
                f"x has shape {shape}, and the vector field declares no event shape, so log_prob cannot tell "
                f"one example from a batch of scalars: pass x[None] (shape {(1, *shape)}) for one example, "
                "event_shape=(d,) to say what one example is, or event_shape=() for a batch of scalar data"
            )
        return x, noise, False
    if shape == expected:  # one unbatched example
        if noise is not None and tuple(noise.shape) == expected:
            noise = noise.unsqueeze(0)
        return x.unsqueeze(0), noise, True
    if shape[1:] != expected or x.dim() == 0:
        raise event_mismatch(
            f"x of shape {shape}", expected, f"x of shape {batch_hint(expected)}, or one example of shape {expected}"
        )
    return x, noise, False


# --------------------------------------------------------------------------------------------
# discrete data


def dequantize(
    x: torch.Tensor,
    num_levels: int = 256,
    *,
    low: float = 0.0,
    high: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Uniform dequantization of integer data in ``{0, ..., num_levels - 1}``:
    :math:`y = \mathrm{low} + (\mathrm{high}-\mathrm{low})\,(x + u)/K`, :math:`u\sim U[0,1)^D`.

    A continuous density :math:`p_y` then bounds the discrete likelihood from below
    (Theis, van den Oord & Bethge 2016):
    :math:`-\log P(x) \le \mathbb{E}_u[-\log p_y(y)] - D\log s` with the scale
    :math:`s = (\mathrm{high}-\mathrm{low})/K`; :func:`bits_per_dim` applies that correction when
    given ``scale=s``. For ``[0, 1)`` and ``K = 256``: ``scale=1/256``, i.e. ``+8`` bits/dim.

    ``dtype`` defaults to the default floating-point dtype (the result is on ``x``'s device).
    """
    if x.dtype.is_floating_point and not torch.equal(x, x.round()):
        raise ValueError("dequantize expects integer-valued data (levels 0 .. num_levels - 1)")
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    if (x < 0).any() or (x > num_levels - 1).any():
        raise ValueError(f"data must lie in 0 .. {num_levels - 1}")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    u = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
    return low + (high - low) * (x.to(dtype) + u) / num_levels


def bits_per_dim(nll_nats, num_dims: int, *, scale: float = 1.0, num_levels: int | None = None):
    r"""Convert a negative log-likelihood in nats (per example) to bits per dimension.

    ``nll_nats`` is the NLL of the continuous model on the data as the model saw it:
    :math:`y = s\,(x + u) + b` for dequantized integers :math:`x + u` (see :func:`dequantize`).
    The density of :math:`x+u` is :math:`p_y(y)\,s^D`, so the discrete NLL (in bits per
    dimension, an upper bound through dequantization) is

    .. math:: \mathrm{bpd} = \frac{\mathrm{NLL}_y - D \log s}{D \log 2}.

    Args:
        nll_nats: tensor or number, nats per example.
        num_dims: ``D``, the number of dimensions of one example (e.g. ``3 * 32 * 32``).
        scale: ``s``; ``1.0`` when the model saw the dequantized integers themselves.
        num_levels: shorthand for data scaled to ``[0, 1)``: ``scale = 1 / num_levels``.
    """
    if num_levels is not None:
        if scale != 1.0:
            raise ValueError("pass either scale or num_levels, not both")
        scale = 1.0 / num_levels
    if scale <= 0 or num_dims < 1:
        raise ValueError(f"need scale > 0 and num_dims >= 1, got scale={scale}, num_dims={num_dims}")
    return (nll_nats - num_dims * math.log(scale)) / (num_dims * math.log(2.0))
