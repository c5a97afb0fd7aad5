"""Milstein's method for SDEs with commutative noise (Itô and Stratonovich)."""

from __future__ import annotations

import warnings

import torch

from .._tree import tree_leaves, tree_map
from ._base import AbstractSolver, _dt_column, linear_coeffs
from .euler_heun import _add_drift

__all__ = ["ItoMilstein", "StratonovichMilstein"]


_JVP_LOADED = False


def _jvp(fn, y, v):
    """``(fn(y), d fn(y)[v])`` by forward-mode AD. Differentiable by ordinary autograd (with
    respect to ``y``, ``v`` and anything ``fn`` closes over), which is what
    :class:`~torchnde.DirectAdjoint` needs."""
    global _JVP_LOADED
    if _JVP_LOADED:
        return torch.func.jvp(fn, (y,), (v,))
    # torch's first forward-mode call loads its jvp decompositions through the deprecated
    # torch.jit.script: a DeprecationWarning about torch internals that users cannot act on
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        out = torch.func.jvp(fn, (y,), (v,))
    _JVP_LOADED = True
    return out


def _diagonal_derivative(term, t0, y0, params_grad: bool):
    """``g(t0, y0)`` and ``(∂g/∂y)^T g`` (flat) for diagonal noise, by one vector-Jacobian product.
    Keeps a graph (for gradients through the step) exactly when autograd records and something
    needs it: ``y0`` or, ``params_grad``, the diffusion's own parameters."""
    flat = term.flat
    record = torch.is_grad_enabled() and (y0.requires_grad or params_grad)
    with torch.enable_grad():
        y = y0 if (record and y0.requires_grad) else y0.detach().requires_grad_()
        g = term.diffusion(t0, y)
        gflat = flat.tree_to_state(g)
        d = None
        if gflat.requires_grad:  # else g has no graph at all: a constant or time-only diffusion
            (d,) = torch.autograd.grad(gflat, y, grad_outputs=gflat, create_graph=record, allow_unused=True)
    if d is None:  # g does not depend on y: the correction vanishes
        d = torch.zeros_like(y0)
    if not record:
        g, d = tree_map(torch.Tensor.detach, g), d.detach()
    return g, d


def _one_hot(w, j: int):
    """The tree of ``w``'s shapes with ones in column ``j`` of the last (noise) dimension."""

    def leaf(x):
        e = torch.zeros_like(x)
        if j < x.shape[-1]:
            e[..., j] = 1
        return e

    return tree_map(leaf, w)


def _diagonal_step(term, t0, h, y0, w, ito: bool, params_grad: bool):
    """The whole step for diagonal or scalar noise on a single-tensor state with a shared step
    size, in the user's shape (one view of the state in, one flattened increment out): the same
    formula as :func:`_milstein_increment` plus the drift, with fewer reshapes and ops."""
    yt = term.tree(y0)
    record = torch.is_grad_enabled() and (y0.requires_grad or params_grad)
    with torch.enable_grad():
        x = yt if (record and y0.requires_grad) else yt.detach().requires_grad_()
        g = term.diffusion_tree(t0, x)
        d = None
        if g.requires_grad:  # else a constant or time-only diffusion: no correction
            (d,) = torch.autograd.grad(g, x, grad_outputs=g, create_graph=record, allow_unused=True)
    if not record and torch.is_grad_enabled():
        g = g.detach()
        d = None if d is None else d.detach()
    inc = g * w
    if d is not None:
        # (∂g/∂y) g = (∂g/∂y)^T g for diagonal noise (and per row for scalar noise)
        inc = torch.add(inc, d * w.square(), alpha=0.5)
        if ito:
            inc = torch.add(inc, d, alpha=-0.5 * h)
    f = term.drift_tree(t0, yt)
    if f is not None:
        inc = torch.add(inc, f, alpha=h if term.sign > 0 else -h)
    return y0 + term.state(inc)


def _milstein_increment(term, t0, t1, y0, ito: bool, params_grad: bool):
    r"""``g dW + ½ Σ_jk L^j g^k (ΔW_j ΔW_k - [Itô] δ_jk h)``, flat, with ``L^j = g^j · ∇_y``."""
    h = _dt_column(t0, t1)
    w = term.noise(t0, t1)
    flat = term.flat
    g0 = None if term.noise_type == "diagonal" else term.diffusion(t0, y0)
    if term.noise_type in ("diagonal", "scalar"):
        # commutativity means g_i depends on y only through the components driven by the same
        # Brownian motion, so d = (∂g/∂y) g gives every L^j g^j; the double integrals are then
        # elementwise: ½ d ΔW² (Stratonovich) or ½ d (ΔW² - h) (Itô)
        if term.noise_type == "diagonal":
            # ∂g/∂y is diagonal, so (∂g/∂y) g = (∂g/∂y)^T g: one reverse-mode product, several
            # times cheaper than forward mode (and g comes with it)
            g0, d = _diagonal_derivative(term, t0, y0, params_grad)
        else:
            gflat = flat.tree_to_state(g0)
            _, d = _jvp(lambda y: flat.tree_to_state(term.diffusion(t0, y)), y0, gflat)
        extra = term.gprod(flat.state_to_tree(d), tree_map(torch.square, w))
        inc = torch.add(term.gprod(g0, w), extra, alpha=0.5)
        if ito:  # gprod(d, 1) = d for diagonal and scalar noise
            inc = torch.add(inc, d, alpha=-0.5 * h) if isinstance(h, float) else inc - 0.5 * d * h
        return inc
    # general commutative noise: the derivative of y -> g(y) ΔW along g(y) ΔW is
    # Σ_jk ΔW_j ΔW_k L^j g^k
    gw = term.gprod(g0, w)
    _, d = _jvp(lambda y: term.gprod(term.diffusion(t0, y), w), y0, gw)
    inc = gw + 0.5 * d
    if ito:
        # -½ h Σ_j L^j g^j: one jvp per noise dimension j, the same j in every row/leaf at once
        # (cross terms between different Brownian motions vanish for commutative noise)
        m = max(x.shape[-1] for x in tree_leaves(w))
        corr = None
        for j in range(m):
            e = _one_hot(w, j)
            _, dj = _jvp(lambda y, e=e: term.gprod(term.diffusion(t0, y), e), y0, term.gprod(g0, e))
            corr = dj if corr is None else corr + dj
        inc = inc - 0.5 * corr * h
    return inc


def _no_custom(term, name):
    if getattr(term, "custom", False):
        raise NotImplementedError(
            f"{name} needs the diffusion itself, which the stochastic adjoint of BacksolveAdjoint does not "
            "provide; use BacksolveAdjoint(solver=EulerHeun()) (or Heun(), SPaRK()) for the backward solve, or "
            "adjoint=DirectAdjoint() / CheckpointAdjoint()"
        )


class _Milstein(AbstractSolver):
    order = None
    dense_order = 1
    strong_order = {"commutative": 1.0}
    _ito: bool

    def init(self, term, t0, y0):
        # the state records whether the diffusion has parameters that require grad (checked once,
        # on a detached y0), so that steps build a graph for the derivative term only when needed
        if not torch.is_grad_enabled() or not term.rough or term.noise_type != "diagonal":
            return False
        g = term.diffusion(t0, y0.detach())
        return any(x.requires_grad for x in tree_leaves(g))

    def step(self, term, t0, t1, y0, state):
        _no_custom(term, type(self).__name__)
        h = t1 - t0
        if type(h) is float and term.flat.single and term.noise_type in ("diagonal", "scalar"):
            y1 = _diagonal_step(term, t0, h, y0, term.noise(t0, t1), self._ito, bool(state))
            return y1, None, (y0, y1), state, None
        inc = _milstein_increment(term, t0, t1, y0, self._ito, bool(state))
        y1 = y0 + _add_drift(inc, term, t0, y0, _dt_column(t0, t1))
        return y1, None, (y0, y1), state, None

    def dense_coeffs(self, term, dense_info):
        return linear_coeffs(*dense_info)


class ItoMilstein(_Milstein):
    r"""Milstein's method for Itô SDEs :math:`dy = f\,dt + g\,dW` with commutative noise
    (Milstein 1974; Kloeden & Platen 1992, *Numerical Solution of SDEs*, §10.3):

    .. math::
        y_{n+1} = y_n + f h + g \Delta W + \tfrac12 \sum_{j,k} L^j g^k\,(\Delta W_j \Delta W_k - \delta_{jk} h),
        \qquad L^j = g^j \cdot \nabla_y,

    everything evaluated at :math:`(t_n, y_n)`. Strong order 1 for commutative noise: diagonal
    and scalar noise (where ``g_i`` may depend on ``y`` only through the components driven by the
    same Brownian motion), and general noise declared ``commutative=True``
    (:math:`L^j g^k = L^k g^j`); additive noise is a special case. No Lévy area is needed.

    The derivative terms come from automatic differentiation of the diffusion, so it must be
    differentiable in ``y``: diagonal noise costs one vector-Jacobian product per step (its
    Jacobian is diagonal), scalar noise one forward-mode :func:`torch.func.jvp`, general noise
    ``1 + m`` jvps for ``m`` Brownian dimensions. Gradients of the solution
    flow through the jvps (``DirectAdjoint``, ``CheckpointAdjoint``). Constant steps (``dt0``),
    linear dense output; not an ODE solver.
    """

    calculus = "ito"
    _ito = True


class StratonovichMilstein(_Milstein):
    r"""Milstein's method for Stratonovich SDEs :math:`dy = f\,dt + g \circ dW` with commutative
    noise (Kloeden & Platen 1992, §10.3):

    .. math::
        y_{n+1} = y_n + f h + g \Delta W + \tfrac12 \sum_{j,k} L^j g^k\,\Delta W_j \Delta W_k,

    the derivative of :math:`y \mapsto g(y)\Delta W` in the direction :math:`g(y)\Delta W`
    (one :func:`torch.func.jvp`). Strong order 1 for commutative noise; see
    :class:`ItoMilstein` for the noise classes, costs and gradients.
    """

    calculus = "stratonovich"
    _ito = False
