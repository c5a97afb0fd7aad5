"""ShARK: the shifted additive-noise Runge--Kutta method."""

from __future__ import annotations

import torch

from .sra1 import _AdditiveSRK, _axpy, _node

__all__ = ["ShARK"]


class ShARK(_AdditiveSRK):
    r"""Shifted Additive-noise Runge--Kutta (ShARK) of Foster, dos Reis & Strange (2024), "High
    order splitting methods for SDEs satisfying a commutativity condition", SIAM J. Numer. Anal.
    62(1) (arXiv:2210.17543, equation (6.1)):

    .. math::
        z_1 = y_n + g H,\qquad z_2 = z_1 + \tfrac56 h f(t_n, z_1) + \tfrac56 g \Delta W,

        y_{n+1} = y_n + h\big(\tfrac25 f(t_n, z_1) + \tfrac35 f(t_n + \tfrac56 h, z_2)\big) + \int g\,dW,

    with the space-time Lévy area :math:`H`. Strong order 1.5 for additive noise
    (``ControlTerm(..., additive=True)``), with a smaller error constant than :class:`SRA1` on
    typical problems; the drift is evaluated at the "shifted" state :math:`y_n + gH`.

    Needs a Brownian path with ``levy_area="space-time"``. Two drift evaluations and one
    diffusion evaluation per step (``g`` at the step's end, kept for the next step's start; two
    on the first step), constant steps (``dt0``), linear dense output. Itô and Stratonovich
    SDEs coincide for additive noise, so either declared calculus is accepted.
    """

    c2 = 5.0 / 6.0
    a21 = 5.0 / 6.0
    b = (0.4, 0.6)
    aw = (0.0, 5.0 / 6.0)
    ah = (1.0, 1.0)

    def _drifts(self, ops, t0, t1, dt, y0, g0, w, hh, ga):
        # z_1 = y_n + g H; z_2 = z_1 + 5/6 (h f_1 + g W)
        vf, gprod = ops
        z1 = y0 + gprod(g0, hh)
        f1 = vf(t0, z1)
        z2 = torch.add(z1, _axpy(gprod(g0, w), f1, dt), alpha=self.a21)
        return f1, vf(_node(t0, t1, self.c2), z2)
