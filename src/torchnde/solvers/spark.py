"""SPaRK: the Splitting Path Runge--Kutta method, an adaptive SDE solver."""

from __future__ import annotations

import math

import torch

from ._base import AbstractAdaptiveSolver, _dt_column, linear_coeffs
from .sra1 import _axpy, _levy

__all__ = ["SPaRK"]

_X1 = (3.0 - math.sqrt(3.0)) / 6.0
_X2 = math.sqrt(3.0) / 3.0
_SQRT3 = math.sqrt(3.0)


class SPaRK(AbstractAdaptiveSolver):
    r"""The Splitting Path Runge--Kutta method of Foster (2023), "On the convergence of adaptive
    approximations for stochastic differential equations" (arXiv:2311.14201, Definition 1.6):
    three stages with an embedded error estimate, for Stratonovich SDEs
    :math:`dy = f\,dt + g \circ dW`. With :math:`K(z) = f(t, z)\,h + g(t, z)\,\Delta W`, the
    space-time Lévy area :math:`H` and :math:`x_1 = \frac{3 - \sqrt3}{6}`,
    :math:`x_2 = \frac{\sqrt3}{3}`:

    .. math::
        z_1 &= y_n, \qquad
        z_2 = y_n + \tfrac12 K_1 + \sqrt3\, g_1 H, \qquad
        z_3 = y_n + K_2,\\
        y_{n+1} &= y_n + x_1 K_1 + x_2 K_2 + x_1 K_3 + (g_1 - g_3) H,

    at the times :math:`t_n, t_n + h/2, t_{n+1}`. The error estimate is the difference to the
    embedded :math:`y_n + \tfrac12(K_1 + K_3)`. Strong order 0.5 for general noise, 1 for
    commutative noise, 1.5 for additive noise; order 2 on ODEs (where the estimate is of order
    2 as well).

    Unlike fixed-step SDE methods it can be used with ``PIDController(rtol, atol)``: a rejected
    step re-queries a sub-interval of the same Brownian path (which must therefore be
    queryable at arbitrary times, like :class:`~torchnde.VirtualBrownianTree`), so the solution
    converges to the solution of the SDE on that path (Foster 2023 shows that adaptive steps
    must be based on the path's Lévy area, not just its increments, for this). Needs a Brownian
    path with ``levy_area="space-time"``. Three drift and three diffusion evaluations per step,
    linear dense output.

    ``error_order``: the controller takes the local error estimate to scale as
    :math:`h^{\text{error\_order}+1}`. For commutative noise it scales as :math:`h^{1.5}`
    (measured), hence ``error_order = 0.5``.
    """

    order = 2
    error_order = 0.5
    dense_order = 1
    calculus = "stratonovich"
    levy_area = "space-time"
    strong_order = {"general": 0.5, "commutative": 1.0, "additive": 1.5}

    def init(self, term, t0, y0):
        return None

    def step(self, term, t0, t1, y0, state):
        dt = _dt_column(t0, t1)
        h = t1 - t0
        t_mid = t0 + 0.5 * h
        if not term.rough:  # an ODE: the same method without noise
            k1 = term.vf(t0, y0) * dt
            k2 = term.vf(t_mid, y0 + 0.5 * k1) * dt
            k3 = term.vf(t1, y0 + k2) * dt
            y1 = y0 + (_X1 * (k1 + k3) + _X2 * k2)
            err = (_X1 - 0.5) * (k1 + k3) + _X2 * k2
            return y1, err, (y0, y1), None, None
        w, hh = _levy(term, t0, t1, "SPaRK")
        if getattr(term, "custom", False):
            # a term that only forms K = f dt + g dW itself (the stochastic adjoint of
            # BacksolveAdjoint): K is linear in (dt, dW), so g H is K with control (0, H)
            def stage(t, z, levy):
                k = term.vf_prod(t, z, (dt, w))
                return k, (term.vf_prod(t, z, (0.0, hh)) if levy else None)
        else:
            has_drift = term.sde.drift is not None

            def stage(t, z, levy):
                g = term.diffusion(t, z)
                k = term.gprod(g, w)
                if has_drift:
                    k = _axpy(k, term.vf(t, z), dt)
                return k, (term.gprod(g, hh) if levy else None)

        k1, gh1 = stage(t0, y0, True)
        k2, _ = stage(t_mid, torch.add(y0 + 0.5 * k1, gh1, alpha=_SQRT3), False)
        k3, gh3 = stage(t1, y0 + k2, True)
        dh = gh1 - gh3
        k13 = k1 + k3
        y1 = y0 + (_X1 * k13 + _X2 * k2 + dh)
        err = (_X1 - 0.5) * k13 + _X2 * k2 + dh
        return y1, err, (y0, y1), None, None

    def dense_coeffs(self, term, dense_info):
        return linear_coeffs(*dense_info)
