"""SRID2: Rößler's stochastic Runge--Kutta method of strong order 1.5 for diagonal noise."""

from __future__ import annotations

import math

import torch

from .._tree import tree_map, tree_zip
from ._base import AbstractSolver, _dt_column, linear_coeffs
from .sra1 import _levy, _node

__all__ = ["SRID2"]

# The coefficients of SRID2 (Rößler 2010; the tableau torchsde's "srk" uses) for the four-stage method for
# diagonal noise. Stage s uses f at t_n + C0[s] h and g at t_n + C1[s] h.
_C0 = (0.0, 1.0, 0.5, 0.0)
_C1 = (0.0, 0.25, 1.0, 0.25)
_A0 = ((), (1.0,), (0.25, 0.25), (0.0, 0.0, 0.0))
_A1 = ((), (0.25,), (1.0, 0.0), (0.0, 0.0, 0.25))
_B0 = ((), (0.0,), (1.0, 0.5), (0.0, 0.0, 0.0))
_B1 = ((), (-0.5,), (1.0, 0.0), (2.0, -1.0, 0.5))
_ALPHA = (1 / 6, 1 / 6, 2 / 3, 0.0)
_BETA1 = (-1.0, 4 / 3, 2 / 3, 0.0)
_BETA2 = (1.0, -4 / 3, 1 / 3, 0.0)
_BETA3 = (2.0, -4 / 3, -2 / 3, 0.0)
_BETA4 = (-2.0, 5 / 3, -2 / 3, 1.0)


def _weight(w, hh, h, sqrt_h, s: int):
    """Stage ``s``'s weight of ``g``: ``b1 I1 + b2 I11 / sqrt(h) + b3 I10 / h + b4 I111 / h`` with
    ``I1 = W``, ``I11 = (W^2 - h)/2``, ``I10 / h = W/2 + H``, ``I111 = (W^3 - 3 h W)/6``."""
    i11 = 0.5 * (w * w - h)
    i10_h = 0.5 * w + hh
    i111_h = (w * w - 3.0 * h) * w / (6.0 * h)
    return _BETA1[s] * w + (_BETA2[s] * i11) / sqrt_h + _BETA3[s] * i10_h + _BETA4[s] * i111_h


class SRID2(AbstractSolver):
    r"""SRID2 of Rößler (2010), "Runge--Kutta methods for the strong approximation of solutions of
    stochastic differential equations", SIAM J. Numer. Anal. 48(3), 922--952: a four-stage
    stochastic Runge--Kutta method for Itô SDEs with **diagonal or scalar noise**, strong order
    1.5 (torchsde's ``method="srk"`` on such noise).

    With :math:`I_1 = \Delta W`, :math:`I_{(1,1)} = (\Delta W^2 - h)/2`,
    :math:`I_{(1,1,1)} = (\Delta W^3 - 3h\Delta W)/6` and
    :math:`I_{(1,0)} = \int_{t_n}^{t_{n+1}} (W_s - W_{t_n})\,ds = h(\Delta W/2 + H)` (elementwise
    per Brownian motion; :math:`H` the space-time Lévy area), the stages are

    .. math::
        H^{(0)}_s = y_n + \sum_{j<s} A^{(0)}_{sj} f_j h + B^{(0)}_{sj} g_j \tfrac{I_{(1,0)}}{h},\qquad
        H^{(1)}_s = y_n + \sum_{j<s} A^{(1)}_{sj} f_j h + B^{(1)}_{sj} g_j \sqrt h,

    with :math:`f_j = f(t_n + c^{(0)}_j h, H^{(0)}_j)`, :math:`g_j = g(t_n + c^{(1)}_j h, H^{(1)}_j)`,
    and :math:`y_{n+1} = y_n + \sum_s \alpha_s f_s h + g_s\big(\beta^{(1)}_s I_1 +
    \beta^{(2)}_s \tfrac{I_{(1,1)}}{\sqrt h} + \beta^{(3)}_s \tfrac{I_{(1,0)}}{h} +
    \beta^{(4)}_s \tfrac{I_{(1,1,1)}}{h}\big)`.

    Three drift and four diffusion evaluations per step; needs a Brownian path with
    ``levy_area="space-time"``; constant steps (``dt0``), linear dense output. Only for
    ``ControlTerm(..., noise="diagonal")`` or ``noise="scalar"`` (a general-noise term, even one
    declared commutative, is a ``TypeError``: the method's iterated integrals are those of one
    Brownian motion per component).
    """

    order = None
    dense_order = 1
    calculus = "ito"
    levy_area = "space-time"
    # diagonal and scalar noise only (checked in init: the noise classes do not separate them
    # from general commutative noise)
    strong_order = {"commutative": 1.5}

    def init(self, term, t0, y0):
        if getattr(term, "custom", False):
            raise NotImplementedError(
                "SRID2 needs the diffusion itself, which the stochastic adjoint of BacksolveAdjoint does not "
                "provide; use BacksolveAdjoint(solver=EulerHeun()) (or Heun(), SPaRK()), or adjoint=DirectAdjoint() "
                "/ CheckpointAdjoint()"
            )
        if term.noise_type not in ("diagonal", "scalar"):
            raise TypeError(
                f"SRID2 needs diagonal or scalar noise (ControlTerm(..., noise='diagonal' or 'scalar')), but the "
                f"term has noise={term.noise_type!r}; use ItoMilstein (commutative noise) or Euler (general noise)"
            )
        return None

    def step(self, term, t0, t1, y0, state):
        w, hh = _levy(term, t0, t1, "SRID2")
        h = _dt_column(t0, t1)
        sqrt_h = math.sqrt(h) if isinstance(h, float) else h.sqrt()
        # the stochastic weights of the four stages, per Brownian motion (leafwise on trees)
        weights = [tree_zip(w, hh, lambda a, b, s=s: _weight(a, b, h, sqrt_h, s)) for s in range(4)]
        i10_h = tree_zip(w, hh, lambda a, b: 0.5 * a + b)  # I_(1,0) / h
        ones = tree_map(torch.ones_like, w)
        fs, gs, g_sqrt, g_i10 = [], [], [], []  # f_j (flat), g_j (user's shape), g_j sqrt(h), g_j I10/h
        y1 = y0
        for s in range(4):
            z0 = z1 = y0
            for j in range(s):
                if _A0[s][j]:
                    z0 = z0 + fs[j] * (h * _A0[s][j])
                if _B0[s][j]:
                    z0 = z0 + g_i10[j] * _B0[s][j]
                if _A1[s][j]:
                    z1 = z1 + fs[j] * (h * _A1[s][j])
                if _B1[s][j]:
                    z1 = z1 + g_sqrt[j] * _B1[s][j]
            if s < 3:  # f_3 has no weight (alpha_3 = 0) and no later stage
                fs.append(term.vf(_node(t0, t1, _C0[s]), z0))
            g = term.diffusion(_node(t0, t1, _C1[s]), z1)
            gs.append(g)
            if s < 3:
                g_sqrt.append(term.gprod(g, ones) * sqrt_h)
                g_i10.append(term.gprod(g, i10_h))
            y1 = y1 + term.gprod(g, weights[s])
            if _ALPHA[s]:
                y1 = y1 + fs[s] * (h * _ALPHA[s])
        return y1, None, (y0, y1), None, None

    def dense_coeffs(self, term, dense_info):
        return linear_coeffs(*dense_info)
