"""Terms: what is integrated.

A term supplies a vector field ``vf(t, y, args)``, a control increment ``contr(t0, t1)`` and
their product ``prod(vf, control)``. An ODE is one :class:`ODETerm`; stochastic and controlled
equations add control terms driven by a path (Brownian motion, interpolated data) in the same
loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._tree import tree_zip

__all__ = ["AbstractTerm", "ODETerm", "ControlTerm", "MultiTerm", "SDETerm", "NOISE_TYPES"]


class AbstractTerm:
    """Something integrated over time: ``dy = vf(t, y, args) d(control)``."""

    def vf(self, t, y, args):  # pragma: no cover - interface
        raise NotImplementedError

    def contr(self, t0, t1):  # pragma: no cover - interface
        raise NotImplementedError

    def prod(self, vf, control):  # pragma: no cover - interface
        raise NotImplementedError

    def vf_prod(self, t, y, args, control):
        return self.prod(self.vf(t, y, args), control)


class ODETerm(AbstractTerm):
    r"""The term :math:`f(t, y, \text{args})\,dt` of an ODE :math:`\dot y = f(t, y, \text{args})`.

    Args:
        vector_field: ``f(t, y, args)`` returning a value with the structure, shapes, dtype and
            device of ``y``. ``t`` is a Python float, or in per-sample mode a tensor of shape
            ``(batch,)`` holding each sample's time. An ``nn.Module`` works (its parameters
            receive gradients).
    """

    def __init__(self, vector_field: Callable[[Any, Any, Any], Any]):
        if not callable(vector_field):
            raise TypeError(f"ODETerm needs a callable vector field f(t, y, args); got {type(vector_field).__name__}")
        self.vector_field = vector_field

    def vf(self, t, y, args):
        return self.vector_field(t, y, args)

    def contr(self, t0, t1):
        return t1 - t0

    def prod(self, vf, control):
        return vf * control

    def __repr__(self):
        return f"ODETerm({getattr(self.vector_field, '__name__', type(self.vector_field).__name__)})"


NOISE_TYPES = ("diagonal", "scalar", "general")


def _leaf_prod(noise: str):
    if noise == "general":
        return lambda g, x: (g @ x.unsqueeze(-1)).squeeze(-1)
    return lambda g, x: g * x


class ControlTerm(AbstractTerm):
    r"""The term :math:`g(t, y, \text{args})\,dX(t)`: a vector field times the increment of a path.

    With :class:`~torchnde.VirtualBrownianTree` (or another Brownian path) as ``X`` this is the
    diffusion of an SDE, combined with the drift by :class:`MultiTerm`; with an interpolation of
    data it is a controlled differential equation (solved by every ODE solver as
    :math:`\dot y = g(t, y)\,\dot X(t)`).

    The noise structure is declared, so that solvers can check that they apply and use it:

    ============  ==========================================  ================================
    ``noise``     shape of ``g(t, y, args)``                  shape of the path ``X``
    ============  ==========================================  ================================
    "diagonal"    ``y.shape``; ``dy_i = g_i dX_i``             ``y.shape``
    "scalar"      ``y.shape``; one path for every component   ``(*y.shape[:-1], 1)``
    "general"     ``(*y.shape, m)``; ``dy = g @ dX``          ``(*y.shape[:-1], m)``
    ============  ==========================================  ================================

    For a tree-structured ``y``, ``g`` and ``X`` are trees of the same structure and each leaf
    follows the table.

    Args:
        vector_field: ``g(t, y, args)`` (an ``nn.Module`` works).
        path: an :class:`~torchnde.paths.AbstractPath`: Brownian motion or interpolated data.
        noise: ``"diagonal"``, ``"scalar"`` or ``"general"`` (the default, also what a neural CDE
            uses).
        additive: declare that ``g`` does not depend on ``y`` (additive noise). Solvers such as
            :class:`~torchnde.SRA1` and :class:`~torchnde.ShARK` need it; others reach a higher
            strong order with it.
        commutative: declare that general noise is commutative
            (:math:`L^j g^k = L^k g^j`), as Milstein's method needs. Diagonal and scalar noise
            are commutative anyway.
        calculus: optionally declare the SDE's calculus, ``"ito"`` or ``"stratonovich"``; solve()
            then refuses a solver of the other calculus (unless the noise is additive, where both
            agree). ``None`` (default): the solver's calculus is the SDE's.
    """

    def __init__(
        self,
        vector_field: Callable[[Any, Any, Any], Any],
        path,
        *,
        noise: str = "general",
        additive: bool = False,
        commutative: bool = False,
        calculus: str | None = None,
    ):
        from .paths import AbstractPath

        if not callable(vector_field):
            raise TypeError(
                f"ControlTerm needs a callable vector field g(t, y, args); got {type(vector_field).__name__}"
            )
        if not isinstance(path, AbstractPath):
            raise TypeError(
                "ControlTerm needs a path (e.g. VirtualBrownianTree(...) or an interpolation such as "
                f"CubicSpline(ts, xs)); got {type(path).__name__}"
            )
        if noise not in NOISE_TYPES:
            raise ValueError(f"ControlTerm(noise=...) must be one of {NOISE_TYPES}, got {noise!r}")
        if calculus not in (None, "ito", "stratonovich"):
            raise ValueError(f"ControlTerm(calculus=...) must be None, 'ito' or 'stratonovich', got {calculus!r}")
        self.vector_field = vector_field
        self.path = path
        self.noise = noise
        self.additive = bool(additive)
        self.commutative = bool(commutative) or noise in ("diagonal", "scalar")
        self.calculus = calculus
        self._leaf_prod = _leaf_prod(noise)

    @property
    def noise_class(self) -> str:
        """The most specific class of the noise: ``"additive"``, ``"commutative"`` or ``"general"``."""
        if self.additive:
            return "additive"
        return "commutative" if self.commutative else "general"

    def vf(self, t, y, args):
        return self.vector_field(t, y, args)

    def contr(self, t0, t1):
        return self.path.evaluate(t0, t1)

    def prod(self, vf, control):
        if isinstance(vf, torch.Tensor):
            return self._leaf_prod(vf, control)
        return tree_zip(vf, control, self._leaf_prod)

    def to_ode(self, left: bool = False) -> ODETerm:
        """The ODE ``dy/dt = g(t, y, args) dX/dt`` of a control term on a smooth path. ``left=True``
        takes one-sided derivatives from the left at the path's knots (for solving backwards in time,
        where a step leaves a knot to the left)."""
        if not self.path.smooth:
            raise TypeError(f"{type(self.path).__name__} has no derivative; a ControlTerm on it is an SDE")
        return _ControlledODE(self, left)

    def __repr__(self):
        name = getattr(self.vector_field, "__name__", type(self.vector_field).__name__)
        return f"ControlTerm({name}, {type(self.path).__name__}, noise={self.noise!r})"


class _ControlledODE(ODETerm):
    """``g(t, y) dX/dt`` as an ODE term (CDEs on interpolated data)."""

    def __init__(self, control: ControlTerm, left: bool = False):
        self.control = control
        self.left = left
        self.vector_field = self._vf

    def _vf(self, t, y, args):
        c = self.control
        dx = c.path.derivative(t, left=True) if self.left else c.path.derivative(t)
        return c.prod(c.vector_field(t, y, args), dx)

    def reversed(self) -> _ControlledODE:
        return _ControlledODE(self.control, not self.left)

    def __repr__(self):
        return repr(self.control)


class MultiTerm(AbstractTerm):
    """A sum of terms, e.g. ``MultiTerm(ODETerm(drift), ControlTerm(diffusion, brownian))`` for the SDE
    :math:`dy = f\\,dt + g\\,dW`. ``vf``/``contr`` give tuples, ``prod`` sums the products."""

    def __init__(self, *terms: AbstractTerm):
        if not terms:
            raise ValueError("MultiTerm needs at least one term")
        for term in terms:
            if not isinstance(term, AbstractTerm):
                raise TypeError(f"MultiTerm takes terms such as ODETerm(f) or ControlTerm(g, path); got {term!r}")
        self.terms = tuple(terms)

    def vf(self, t, y, args):
        return tuple(term.vf(t, y, args) for term in self.terms)

    def contr(self, t0, t1):
        return tuple(term.contr(t0, t1) for term in self.terms)

    def prod(self, vf, control):
        out = None
        for term, v, c in zip(self.terms, vf, control):
            p = term.prod(v, c)
            out = p if out is None else tree_zip(out, p, torch.add)
        return out

    def __repr__(self):
        return f"MultiTerm({', '.join(map(repr, self.terms))})"


class SDETerm(AbstractTerm):
    """What ``solve()`` makes of terms driven by Brownian motion: the drift (all ODE terms and
    control terms on smooth paths, summed; ``None`` if there is none) and the one control term on
    a rough path. ``vf`` returns ``(drift, diffusion)``."""

    def __init__(self, drift: ODETerm | None, control: ControlTerm):
        self.drift = drift
        self.control = control

    def vf(self, t, y, args):
        f = None if self.drift is None else self.drift.vf(t, y, args)
        return (f, self.control.vf(t, y, args))

    def contr(self, t0, t1):
        return (t1 - t0, self.control.contr(t0, t1))

    def prod(self, vf, control):
        g = self.control.prod(vf[1], control[1])
        if vf[0] is None:
            return g
        return tree_zip(g, ODETerm.prod(None, vf[0], control[0]), torch.add)

    def vf_prod(self, t, y, args, control):
        """``f dt + g dW`` for ``control = (dt, dW)``; a subclass may compute it directly."""
        return self.prod(self.vf(t, y, args), control)

    def __repr__(self):
        return f"SDETerm(drift={self.drift!r}, {self.control!r})"


def _sum_odes(terms: list) -> ODETerm | None:
    if not terms:
        return None
    if len(terms) == 1:
        return terms[0]
    return _SumODE(terms)


class _SumODE(ODETerm):
    def __init__(self, terms):
        self.terms = terms
        self.vector_field = self._vf

    def _vf(self, t, y, args):
        out = None
        for term in self.terms:
            v = term.vf(t, y, args)
            out = v if out is None else tree_zip(out, v, torch.add)
        return out

    def __repr__(self):
        return " + ".join(map(repr, self.terms))


def reverse_terms(terms):
    """Normalised terms for solving in the other direction: control terms on smooth paths switch
    between right and left derivatives at the path's knots (everything else is unchanged)."""
    if isinstance(terms, _ControlledODE):
        return terms.reversed()
    if isinstance(terms, _SumODE):
        return _SumODE([reverse_terms(t) for t in terms.terms])
    if isinstance(terms, SDETerm):
        return SDETerm(None if terms.drift is None else reverse_terms(terms.drift), terms.control)
    return terms


def normalize_terms(terms: AbstractTerm, backward: bool = False) -> AbstractTerm:
    """An :class:`ODETerm` (ODEs, and CDEs on smooth paths) or an :class:`SDETerm` (exactly one
    control term on Brownian motion). ``backward``: the solve runs backwards in time (smooth paths
    then use left derivatives at their knots)."""
    if isinstance(terms, (ODETerm, SDETerm)):
        return terms
    parts = list(terms.terms) if isinstance(terms, MultiTerm) else [terms]
    odes, rough = [], []
    for term in parts:
        if isinstance(term, MultiTerm):
            raise TypeError("nested MultiTerm: pass the terms to one MultiTerm(...)")
        if isinstance(term, ODETerm):
            odes.append(term)
        elif isinstance(term, ControlTerm):
            (odes if term.path.smooth else rough).append(term.to_ode(backward) if term.path.smooth else term)
        else:
            raise TypeError(
                f"solve() does not know how to integrate {type(term).__name__}; use ODETerm, ControlTerm or MultiTerm"
            )
    if len(rough) > 1:
        raise NotImplementedError(
            "more than one control term driven by Brownian motion; use one Brownian path with the "
            "noise dimensions concatenated (noise='general')"
        )
    drift = _sum_odes(odes)
    if not rough:
        return drift
    return SDETerm(drift, rough[0])
