"""The Euler--Heun method for Stratonovich SDEs."""

from __future__ import annotations

import torch

from ._base import AbstractSolver, _dt_column, linear_coeffs

__all__ = ["EulerHeun"]


def _add_drift(inc, term, t, y, dt):
    """``inc + f(t, y) dt`` (``inc`` alone if the SDE has no drift)."""
    if term.sde.drift is None:
        return inc
    f = term.vf(t, y)
    return torch.add(inc, f, alpha=dt) if isinstance(dt, float) else torch.addcmul(inc, f, dt)


class EulerHeun(AbstractSolver):
    r"""The Euler--Heun method for Stratonovich SDEs :math:`dy = f\,dt + g \circ dW`:

    .. math::
        \bar y = y_n + g(t_n, y_n)\,\Delta W,\qquad
        y_{n+1} = y_n + f(t_n, y_n)\,h + \tfrac12\big(g(t_n, y_n) + g(t_n, \bar y)\big)\,\Delta W.

    The drift is taken at the start of the step only (an Euler step); the diffusion is averaged
    between the start and a predictor (Heun's trapezoidal rule), which reproduces the
    Stratonovich double integrals :math:`\tfrac12 \sum_{j,k} L^j g^k \Delta W_j \Delta W_k` of
    Milstein's method. Hence strong order 0.5 for general noise and 1 for commutative noise
    (which includes diagonal, scalar and additive noise; Kloeden & Platen 1992, *Numerical
    Solution of SDEs*, §11.1; Burrage, Burrage & Tian 2004, "Numerical methods for strong
    solutions of stochastic differential equations: an overview"). One drift and two diffusion
    evaluations per step, no Lévy area, constant steps (``dt0``), linear dense output.

    Compared to :class:`~torchnde.Heun` on an SDE (which evaluates the drift twice too) it saves
    one drift evaluation per step at the same strong order.
    """

    order = None
    dense_order = 1
    calculus = "stratonovich"
    strong_order = {"general": 0.5, "commutative": 1.0}

    def init(self, term, t0, y0):
        return None

    def step(self, term, t0, t1, y0, state):
        dt = _dt_column(t0, t1)
        w = term.noise(t0, t1)
        if getattr(term, "custom", False):
            # a term that only forms K = f dt + g dW itself (the stochastic adjoint of
            # BacksolveAdjoint): the same method through K, which is linear in (dt, dW)
            k = term.vf_prod(t0, y0, (dt, w))
            gw0 = term.vf_prod(t0, y0, (0.0, w))
            gw1 = term.vf_prod(t0, y0 + gw0, (0.0, w))
            y1 = y0 + k + 0.5 * (gw1 - gw0)
            return y1, None, (y0, y1), None, None
        # a single-tensor state with a shared step: in the user's shape (one view, one flatten)
        single = term.flat.single and isinstance(dt, float)
        x0 = term.tree(y0) if single else y0
        diffusion = term.diffusion_tree if single else term.diffusion
        gprod = term.gprod_tree if single else term.gprod
        gw0 = gprod(diffusion(t0, x0), w)
        gw1 = gprod(diffusion(t0, x0 + gw0), w)
        inc = gw0 + gw1
        if term.sde.drift is not None:
            # y0 + (gw / 2 + f dt) as y0 + (gw + 2 f dt) / 2: the increment summed before the state, in
            # two ops (the factors 2 and 1/2 are exact)
            f = term.vf_tree(t0, x0) if single else term.vf(t0, y0)
            inc = torch.add(inc, f, alpha=2.0 * dt) if isinstance(dt, float) else torch.addcmul(inc, f, dt, value=2.0)
        y1 = torch.add(y0, term.state(inc) if single else inc, alpha=0.5)
        return y1, None, (y0, y1), None, None

    def dense_coeffs(self, term, dense_info):
        return linear_coeffs(*dense_info)
