"""Two-stage stochastic Runge--Kutta methods for additive noise (SRA1; ShARK in shark.py)."""

from __future__ import annotations

import torch

from .._tree import tree_zip
from ._base import AbstractSolver, _dt_column, linear_coeffs

__all__ = ["SRA1"]


def _levy(term, t0, t1, name: str):
    """``(W, H)`` over the step; a clear error if the path has no space-time Lévy area."""
    inc = term.levy(t0, t1)
    if inc.H is None:
        raise ValueError(
            f"{name} needs the space-time Lévy area of the Brownian path; build it with levy_area='space-time'"
        )
    return inc.W, inc.H


def _axpy(y, x, a):
    """``y + a x`` for a float or per-sample column ``a`` (``y`` may be None: ``a x``)."""
    if y is None:
        return x * a
    return torch.add(y, x, alpha=a) if isinstance(a, float) else torch.addcmul(y, x, a)


class _AdditiveSRK(AbstractSolver):
    r"""Two stages on :math:`dy = f(t, y)\,dt + g(t)\,dW` (the tableau of Foster, dos Reis &
    Strange, written with the space-time Lévy area :math:`H`)::

        z_1 = y_n + g(t_n) (aw_1 W + ah_1 H)
        z_2 = y_n + a21 h f(t_n, z_1) + g(t_n) (aw_2 W + ah_2 H)
        y_{n+1} = y_n + h (b_1 f(t_n, z_1) + b_2 f(t_n + c_2 h, z_2)) + int g dW

    with :math:`\int g\,dW \approx g(t_n)(W/2 + H) + g(t_{n+1})(W/2 - H)`, exact for ``g``
    constant and accurate to the order of the method when ``g`` depends on time (since
    :math:`\int (s - t_n)\,dW_s = h(W/2 - H)`).

    ``g`` depends on time only, so each distinct time is evaluated once: the state carries
    ``(t_{n+1}, g(t_{n+1}))`` and the next step starting at :math:`t_{n+1}` reuses it (one
    diffusion evaluation per step, two on the first). Subclasses write their stages in
    :meth:`_drifts`, with the combinations of ``g`` and the Brownian increments shared.
    """

    order = None
    dense_order = 1
    calculus = "ito"  # = Stratonovich: the two calculi agree on additive noise
    levy_area = "space-time"
    strong_order = {"additive": 1.5}

    c2: float
    a21: float
    b: tuple
    aw: tuple
    ah: tuple

    def init(self, term, t0, y0):
        return None

    def step(self, term, t0, t1, y0, state):
        if getattr(term, "custom", False):
            raise NotImplementedError(
                f"{type(self).__name__} needs additive noise, but the stochastic adjoint of BacksolveAdjoint has "
                "state-dependent noise; use BacksolveAdjoint(solver=EulerHeun()) (or Heun(), SPaRK()), or "
                "adjoint=DirectAdjoint() / CheckpointAdjoint()"
            )
        w, hh = _levy(term, t0, t1, type(self).__name__)
        dt = _dt_column(t0, t1)
        # additive: g depends on the time only; g(t_n) is the previous step's g(t_{n+1}) when that
        # step ended here (shared Python-float times; per-sample time tensors are not compared)
        # a single-tensor state with a shared step: in the user's shape (one view, one flatten)
        single = term.flat.single and isinstance(dt, float)
        x0 = term.tree(y0) if single else y0
        diffusion = term.diffusion_tree if single else term.diffusion
        ops = (term.vf_tree, term.gprod_tree) if single else (term.vf, term.gprod)
        if state is not None and state[0] == t0:
            g0 = state[1]
        else:
            g0 = diffusion(t0, x0)
        g1 = diffusion(t1, x0)
        gprod = ops[1]
        a = tree_zip(w, hh, lambda x, y: torch.add(y, x, alpha=0.5))  # W/2 + H
        ga = gprod(g0, a)
        inc = ga + gprod(g1, tree_zip(w, a, torch.sub))  # g0 (W/2 + H) + g1 (W/2 - H)
        if term.sde.drift is not None:
            f1, f2 = self._drifts(ops, t0, t1, dt, x0, g0, w, hh, ga)
            b1, b2 = self.b
            if isinstance(dt, float):
                inc = torch.add(torch.add(inc, f1, alpha=dt * b1), f2, alpha=dt * b2)
            else:
                inc = torch.addcmul(torch.addcmul(inc, f1, dt, value=b1), f2, dt, value=b2)
        y1 = y0 + (term.state(inc) if single else inc)
        return y1, None, (y0, y1), ((t1, g1) if type(t1) is float else None), None

    def _drifts(self, ops, t0, t1, dt, y0, g0, w, hh, ga):  # pragma: no cover - interface
        """``(f(t_n, z_1), f(t_n + c_2 h, z_2))`` with ``ops = (vf, gprod)`` of the term (flat, or
        both in the user's shape with ``y0``); ``ga = g(t_n)(W/2 + H)``."""
        raise NotImplementedError

    def dense_coeffs(self, term, dense_info):
        return linear_coeffs(*dense_info)


def _node(t0, t1, c: float):
    return t0 + c * (t1 - t0)


class SRA1(_AdditiveSRK):
    r"""SRA1 of Rößler (2010), "Runge--Kutta methods for the strong approximation of solutions of
    stochastic differential equations", SIAM J. Numer. Anal. 48(3), 922--952 (the scheme of
    Table 5.1 for additive noise).

    Strong order 1.5 for additive noise (``ControlTerm(..., additive=True)``; ``g`` may depend on
    time but not on ``y``), with any number of Brownian dimensions. Rößler writes it with the
    iterated integral :math:`I_{(1,0)} = \int_{t_n}^{t_{n+1}} (W_s - W_{t_n})\,ds = h(\Delta W/2
    + H)` in terms of the space-time Lévy area :math:`H`:

    .. math::
        z_2 = y_n + \tfrac34 h f(t_n, y_n) + \tfrac32 g \tfrac{I_{(1,0)}}{h},\qquad
        y_{n+1} = y_n + h\big(\tfrac13 f(t_n, y_n) + \tfrac23 f(t_n + \tfrac34 h, z_2)\big) + \int g\,dW.

    Needs a Brownian path with ``levy_area="space-time"``. Two drift evaluations and one
    diffusion evaluation per step (``g`` at the step's end, kept for the next step's start; two
    on the first step), constant steps (``dt0``), linear dense output. Itô and Stratonovich
    SDEs coincide for additive noise, so either declared calculus is accepted.
    """

    c2 = 0.75
    a21 = 0.75
    b = (1.0 / 3.0, 2.0 / 3.0)
    aw = (0.0, 0.75)
    ah = (0.0, 1.5)

    def _drifts(self, ops, t0, t1, dt, y0, g0, w, hh, ga):
        # z_1 = y_n; z_2 = y_n + 3/4 h f_1 + g (3/4 W + 3/2 H) = y_n + 3/4 h f_1 + 3/2 ga
        vf = ops[0]
        f1 = vf(t0, y0)
        z2 = _axpy(torch.add(y0, ga, alpha=1.5), f1, dt * self.a21)
        return f1, vf(_node(t0, t1, self.c2), z2)
