r"""Conditional generation: inpainting / imputation with a known mask, and classifier-free guidance.

**Inpainting** (Song et al. 2021, "Score-based generative modeling through stochastic differential
equations", App. I.2; the plain replacement step of Lugmayr et al. 2022, RePaint, without its
resampling): at every step of any sampler the known coordinates of the state are replaced by a
fresh forward-noised copy of the observation, :math:`x_k \leftarrow \alpha(t) y_k + m(t) +
\sigma(t)\varepsilon`, and the sampler moves the unknown ones with the unconditional model.
:class:`Inpaint` does this as a *solver wrapper* (it wraps whatever solver a sampler uses, so it
composes with every sampler of :func:`~torchnde.generative.samplers.sample` through
``wrap_solver``); :func:`inpaint` is the one-call version.

The method is approximate: the unknown coordinates see the score at a noisy copy of the
observation drawn independently of their own past, not the conditional score. For Gaussian data
its limit law (as the steps shrink) is Gaussian with moments that solve linear ODEs, and it is
*not* the exact conditional law (see ``docs/diffusion.md`` for the measured bias).

**Classifier-free guidance** (Ho & Salimans 2022, "Classifier-free diffusion guidance"):
:class:`ClassifierFreeGuidance` turns a class-conditional model ``model(t, x, c)`` (``c = None``
for the unconditional model, or a chosen null label) into ``model(t, x)`` returning
:math:`(1 + w)\,\text{model}(t, x, c) - w\,\text{model}(t, x, \varnothing)`. All
parameterisations are affine in the model's output at fixed ``(t, x)``, so guiding the eps, x0, v,
velocity or score output is the same as guiding the score: the wrapper works with every sampler
and every parameterisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..paths import VirtualBrownianTree
from ..solvers._base import AbstractERK, AbstractSolver, linear_coeffs
from .processes import DiffusionProcess

__all__ = ["Inpaint", "inpaint", "ClassifierFreeGuidance"]

_VARIANTS: dict = {}


def _variant(inner_cls):
    """A subclass of :class:`Inpaint` carrying the inner solver's class attributes (``solve``
    reads ``strong_order``, ``calculus``, ... from the class)."""
    if inner_cls not in _VARIANTS:
        attrs = {
            k: getattr(inner_cls, k)
            for k in ("order", "strong_order", "calculus", "levy_area", "error_order", "dense_order")
            if hasattr(inner_cls, k)
        }
        _VARIANTS[inner_cls] = type(f"Inpaint[{inner_cls.__name__}]", (Inpaint,), attrs)
    return _VARIANTS[inner_cls]


class Inpaint(AbstractSolver):
    r"""Wrap a sampler's solver so that the known coordinates follow the forward-noised
    observation (Song et al. 2021; see the module docstring).

    Before each step from ``s`` (and after it, at ``t``) the coordinates where ``mask`` is True
    are set to :math:`\alpha y + m + \sigma\varepsilon` at that time, with :math:`\varepsilon`
    standard normal, fresh at every step (the normalised increments over the step of a seeded
    :class:`~torchnde.VirtualBrownianTree`, so runs repeat and adaptive samplers re-draw the same
    noise on a rejected step). The state after the last step has the known coordinates at the
    end time's noise level (:func:`inpaint` then sets them to the observation).

    Solvers that carry the derivative at the end of a step (explicit Runge--Kutta methods on the
    probability-flow ODE, e.g. ``pf_euler``) re-evaluate it after the replacement: one more model
    evaluation per step.

    Args:
        solver: the solver to wrap.
        process: the forward process.
        observation: a tensor of the state's shape (its values where ``mask`` is False are
            ignored).
        mask: bool tensor broadcastable to the state, True where the coordinate is known.
        seed: of the replacement noise.
        interval: ``(lo, hi)`` the times sampled over (default ``(process.t0, process.t1)``).
    """

    def __init__(self, solver: AbstractSolver, process: DiffusionProcess, observation, mask, *, seed=0, interval=None):
        if not isinstance(solver, AbstractSolver):
            raise TypeError(f"solver must be a solver such as Euler(), got {type(solver).__name__}")
        if not isinstance(process, DiffusionProcess):
            raise TypeError(f"process must be a DiffusionProcess such as VP(), got {type(process).__name__}")
        observation = torch.as_tensor(observation)
        mask = torch.as_tensor(mask, dtype=torch.bool, device=observation.device).expand(observation.shape)
        self.__class__ = _variant(type(solver))
        self.inner, self.process, self.observation, self.mask = solver, process, observation, mask
        lo, hi = (process.t0, process.t1) if interval is None else (float(interval[0]), float(interval[1]))
        self.noise = VirtualBrownianTree(
            min(lo, hi),
            max(lo, hi),
            (2, *observation.shape),
            seed=seed,
            dtype=observation.dtype,
            device=observation.device,
        )
        self._refresh = isinstance(solver, AbstractERK)

    def __repr__(self):
        return f"Inpaint({self.inner!r}, known={int(self.mask.sum())}/{self.mask.numel()})"

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def _replace(self, t: float, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        known = self.process.marginal_sample(t, self.observation.to(x.dtype), eps.to(x.dtype))
        return torch.where(self.mask, known, x)

    def init(self, term, t0, y0):
        return self.inner.init(term, t0, y0)

    def initial_derivative(self, state):
        return None  # the state is modified before the first step

    def step(self, term, t0, t1, y0, state):
        if not isinstance(t0, float):
            raise NotImplementedError("Inpaint does not support per_sample=True")
        sg = term.sign
        s, t = sg * t0, sg * t1
        lo, hi = min(s, t), max(s, t)
        eps = self.noise.evaluate(lo, hi) / math.sqrt(hi - lo)
        x = self._replace(s, term.flat.state_to_tree(y0), eps[0])
        y = term.flat.tree_to_state(x)
        if self._refresh and not term.rough:
            state = self.inner.init(term, t0, y)
        y1, y_err, _, state1, res = self.inner.step(term, t0, t1, y, state)
        x1 = self._replace(t, term.flat.state_to_tree(y1), eps[1])
        y1 = term.flat.tree_to_state(x1)
        return y1, y_err, (y0, y1), state1, res

    def dense_coeffs(self, term, dense_info):
        return linear_coeffs(*dense_info)


def inpaint(model: Callable, process: DiffusionProcess, observation: torch.Tensor, mask, *, seed: int = 0, **kwargs):
    """Impute the unknown coordinates of ``observation`` (``mask`` True where known) with any
    sampler: :func:`~torchnde.generative.samplers.sample` with :class:`Inpaint` wrapped around its
    solver. ``kwargs`` go to ``sample`` (``nfe``, ``sampler``, ``parameterisation``, ...). The
    returned :class:`~torchnde.generative.samplers.SampleResult` has the known coordinates set to
    the observation."""
    from .samplers import sample

    observation = torch.as_tensor(observation)
    mask_t = torch.as_tensor(mask, dtype=torch.bool, device=observation.device).expand(observation.shape)
    lo = kwargs.get("t_end") or process.t0
    hi = kwargs.get("t_start") or process.t1
    kwargs.setdefault("dtype", observation.dtype)
    kwargs.setdefault("device", observation.device)

    def wrap(solver):
        return Inpaint(solver, process, observation, mask_t, seed=seed + 7919, interval=(lo, hi))

    out = sample(model, process, tuple(observation.shape), seed=seed, wrap_solver=wrap, **kwargs)
    out.x = torch.where(mask_t, observation.to(out.x.dtype), out.x)
    return out


class ClassifierFreeGuidance:
    r"""``model(t, x, c)`` guided towards the classes ``labels`` with weight ``w`` (Ho & Salimans
    2022): :math:`(1 + w)\,\text{model}(t, x, c) - w\,\text{model}(t, x, \text{null})`.

    A model ``f(t, x)`` for :func:`~torchnde.generative.samplers.sample` (any sampler, any
    parameterisation). ``w = 0`` is the conditional model (its unconditional half is skipped);
    ``w = -1`` the unconditional one. Each call costs two model evaluations (one for ``w = 0``);
    ``calls`` counts the wrapper's calls.

    Args:
        model: ``model(t, x, c)`` with ``c`` the labels (``(B,)``) or ``null``.
        labels: the classes to sample, e.g. a ``(B,)`` long tensor.
        w: the guidance weight (>= -1).
        null: what the model takes as "no class" (default ``None``).
    """

    def __init__(self, model: Callable, labels, w: float, *, null=None):
        if not callable(model):
            raise TypeError(f"model must be callable as model(t, x, c), got {type(model).__name__}")
        if not w >= -1:
            raise ValueError(f"the guidance weight must be >= -1, got {w}")
        self.model, self.labels, self.w, self.null = model, labels, float(w), null
        self.calls = 0

    def __call__(self, t, x):
        self.calls += 1
        cond = self.model(t, x, self.labels)
        if self.w == 0:
            return cond
        uncond = self.model(t, x, self.null)
        return (1 + self.w) * cond - self.w * uncond

    def __repr__(self):
        return f"ClassifierFreeGuidance(w={self.w})"
