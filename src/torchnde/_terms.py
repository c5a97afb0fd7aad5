"""Terms: what is integrated.

A term supplies a vector field ``vf(t, y, args)``, a control increment ``contr(t0, t1)`` and
their product ``prod(vf, control)``. An ODE is one :class:`ODETerm`; stochastic and controlled
equations add control terms driven by a path (Brownian motion, interpolated data) in the same
loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["AbstractTerm", "ODETerm"]


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
