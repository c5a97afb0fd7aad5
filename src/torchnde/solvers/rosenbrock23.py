r"""Shampine & Reichelt's Rosenbrock 2(3) W-method (MATLAB's ``ode23s``).

L. F. Shampine and M. W. Reichelt, "The MATLAB ODE suite", SIAM J. Sci. Comput. 18(1), 1--22
(1997), section 3.1. With :math:`d = 1/(2 + \sqrt2)`, :math:`e_{32} = 6 + \sqrt2`,
:math:`W = I - h d J` and :math:`T = \partial_t f(t_0, y_0)`:

.. math::
    F_0 &= f(t_0, y_0), & W k_1 &= F_0 + h d T, \\
    F_1 &= f(t_0 + h/2, y_0 + h k_1 / 2), & W (k_2 - k_1) &= F_1 - k_1, \\
    y_1 &= y_0 + h k_2, \quad F_2 = f(t_1, y_1), &
    W k_3 &= F_2 - e_{32}(k_2 - F_1) - 2(k_1 - F_0) + h d T,

with the error estimate :math:`h (k_1 - 2 k_2 + k_3) / 6` (the difference to a third-order
solution) and the dense output
:math:`y_0 + h\big(\theta(1-\theta) k_1 + \theta(\theta - 2d) k_2\big)/(1 - 2d)`.
"""

from __future__ import annotations

import math

import torch

from ._rosenbrock import AbstractRosenbrock

__all__ = ["Rosenbrock23"]

_D = 1.0 / (2.0 + math.sqrt(2.0))
_E32 = 6.0 + math.sqrt(2.0)


class Rosenbrock23(AbstractRosenbrock):
    """Shampine & Reichelt's Rosenbrock 2(3) method (MATLAB's ``ode23s``; SciML's
    ``Rosenbrock23``): linearly implicit, L-stable, order 2 with a third-order error estimate
    and its own second-order dense output.

    A W-method: second order whatever the matrix :math:`J` (so it tolerates a poor Jacobian).
    One Jacobian, one LU of :math:`I - h d J` and three evaluations a step (the first comes with
    the Jacobian); cheap per step, so the method of choice at loose tolerances (``rtol`` of
    1e-2 to 1e-4) and for problems whose Jacobian is only approximate. See
    :mod:`torchnde.solvers._rosenbrock` for the options, failures and gradients.
    """

    gamma = _D
    order = 2
    error_order = 2
    dense_order = 2

    def _stages(self, F, solve, t0, h, dt, yb, F0, T):
        hdT = (dt * _D) * T
        k1 = solve(F0 + hdT)
        half = 0.5 * h
        F1 = F(t0 + half, torch.add(yb, k1, alpha=0.5 * dt) if isinstance(dt, float) else yb + (0.5 * dt) * k1)
        k2 = solve(F1 - k1) + k1
        y1 = torch.add(yb, k2, alpha=dt) if isinstance(dt, float) else torch.addcmul(yb, dt, k2)
        F2 = F(t0 + h, y1)
        k3 = solve(F2 - _E32 * (k2 - F1) - 2.0 * (k1 - F0) + hdT)
        y_err = (dt / 6.0) * (k1 - 2.0 * k2 + k3)
        return y1, y_err, (k1, k2)

    def dense_coeffs(self, term, dense_info):
        t0, t1, y0, y1, (k1, k2) = dense_info
        h = t1 - t0
        dt = h if isinstance(h, float) else h.to(y0.dtype).unsqueeze(-1)
        s = dt / (1.0 - 2.0 * _D)
        # theta (1 - theta) k1 + theta (theta - 2d) k2 = theta (k1 - 2d k2) + theta^2 (k2 - k1)
        return torch.stack([s * (k1 - 2.0 * _D * k2), s * (k2 - k1)], -2)
