r"""Rosenbrock (linearly implicit) steps: one Jacobian, one LU, no Newton iterations.

A Rosenbrock method (Hairer & Wanner, *Solving ODEs II*, IV.7, in the transformed form (7.25))
computes stages :math:`K_1, \dots, K_s` from linear systems that share one matrix:

.. math::
    (I - h\gamma J)\,K_i = \gamma\Big(f\big(t_0 + c_i h,\; y_0 + h\textstyle\sum_{j<i} a_{ij} K_j\big)
        + \textstyle\sum_{j<i} C_{ij} K_j + d_i\, h\, \partial_t f\Big),

    y_1 = y_0 + h \textstyle\sum_i m_i K_i, \qquad
    \text{error} = h \textstyle\sum_i (m_i - \hat m_i) K_i,

with :math:`J = \partial f/\partial y` and :math:`\partial_t f` at :math:`(t_0, y_0)` (the stages
:math:`K_i` are the :math:`U_i / h` of Hairer & Wanner, so no :math:`1/h` appears and finished
samples of a per-sample solve, :math:`h = 0`, are harmless).

Per step:

* **Derivatives**: one call of ``torch.func.jacfwd`` over the ``n + 1`` directions of
  :math:`(t, y)` gives :math:`J`, :math:`\partial_t f` and :math:`f(t_0, y_0)` together (per
  sample: each row's ``(n, n)`` block, one forward pass for all rows since rows are independent).
  ``jacobian="rev"`` uses ``jacrev`` for :math:`J` and a separate ``jvp`` in ``t``. Terms that
  take time as a Python float (``ODETerm(..., time_as_float=True)``), and
  ``time_derivative="fd"``, get :math:`\partial_t f` by a forward difference instead (one more
  evaluation). The time derivative by AD needs the vector field to use ``t`` through torch
  operations: Python arithmetic on it (``math.cos(t)``) silently drops it and costs the method
  its order on non-autonomous problems; pass ``time_derivative="fd"`` then.
* **One LU** of :math:`I - h\gamma J` (``torch.linalg.lu_factor_ex``, ``(B, n, n)`` per sample,
  ``(1, N, N)`` in shared mode), used by every stage. No reuse across steps: the method's
  order needs the exact Jacobian at :math:`y_0` (Rosenbrock23 is a W-method and would tolerate
  a stale one; it is not reused either, for simplicity).
* **Failures**: a singular factorisation (``info != 0``) or a NaN/inf stage, solution or error
  estimate is a rejected step, never a crash: the affected rows return ``y1 = y0`` and an error
  estimate ``1e4 (1 + |y0|)`` (large and finite, so the controller shrinks the step), and the
  step's fifth return value is the reason per sample (the ESDIRK solvers' codes:
  ``NEWTON_SINGULAR`` for a singular matrix, ``NEWTON_DIVERGED`` for NaN/inf).

Gradients. Unlike a Newton solve, the Rosenbrock solution depends on :math:`J` itself, so the
Jacobian, the time derivative and the LU are computed inside autograd's graph when something
requires grad (``torch.func`` transforms compose with autograd; ``lu_factor_ex``/``lu_solve``
are differentiable): DirectAdjoint then gives the exact derivative of the discrete solution, at
the price of second derivatives of the vector field in the backward pass.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ._base import AbstractAdaptiveSolver, _lincomb, _node
from ._implicit import NEWTON_DIVERGED, NEWTON_OK, NEWTON_SINGULAR, NewtonStats, user_jacobian

__all__ = ["AbstractRosenbrock", "RosenbrockTableau", "derivatives"]

_FAIL_ERROR = 1e4  # error estimate of a failed step, times (1 + |y0|) (as the ESDIRK solvers)


@dataclass(frozen=True, eq=False)
class RosenbrockTableau:
    """A Rosenbrock method in Hairer & Wanner's transformed form (see the module docstring).

    ``a[i]`` and ``C[i]`` hold the ``i`` coefficients of stage ``i`` on the stages before it,
    ``c`` the nodes, ``d`` the coefficients of :math:`h \\partial_t f` (Hairer & Wanner's
    :math:`\\gamma_i`), ``m`` the weights of the solution, ``m_hat`` those of the embedded one,
    ``H`` the rows of the dense output (see :meth:`AbstractRosenbrock.dense_coeffs`).
    """

    gamma: float
    a: tuple
    C: tuple
    c: tuple
    d: tuple
    m: tuple
    m_hat: tuple
    H: tuple = ()
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_stages(self) -> int:
        return len(self.a)

    def tensors(self, dtype, device) -> dict:
        key = (dtype, device)
        out = self._cache.get(key)
        if out is None:

            def t(row):
                return torch.tensor([float(x) for x in row], dtype=dtype, device=device)

            err = [float(m) - float(mh) for m, mh in zip(self.m, self.m_hat)]
            out = {
                "a": [t(row) if row else None for row in self.a],
                "a_f": [tuple(float(x) for x in row) for row in self.a],
                "C": [t(row) if row else None for row in self.C],
                "C_f": [tuple(float(x) for x in row) for row in self.C],
                "m": t(self.m),
                "m_f": tuple(float(x) for x in self.m),
                "err": t(err),
                "err_f": tuple(err),
                "H": t([x for row in self.H for x in row]).view(len(self.H), -1) if self.H else None,
            }
            self._cache[key] = out
        return out


def derivatives(term, t, yb: torch.Tensor, batched: bool, mode: str = "rev", time: str = "ad", graph: bool = False):
    r"""``(f, f_t, J)`` of the flat vector field at ``(t, yb)``: ``yb`` is ``(B, n)`` (``B = 1``
    in shared mode, where ``t`` is a float), ``f`` and ``f_t`` are ``(B, n)``, ``J`` is
    ``(B, n, n)``.

    ``graph``: build them inside autograd's graph (so gradients flow through ``J`` and ``f_t``
    to ``yb`` and to the vector field's parameters); otherwise they are detached.
    ``mode="rev"``: one evaluation and ``n`` vector-Jacobian products batched into one backward
    pass (``is_grads_batched``), giving the rows of :math:`[\partial_t f \mid J]` (per sample: row
    ``i`` of every sample at once). ``mode="fwd"``: ``torch.func.jacfwd`` over the ``n + 1``
    directions of ``(t, y)``.
    """
    n = yb.shape[-1]
    kw = dict(dtype=yb.dtype, device=yb.device)

    def F(tt, z):
        return term.vf(tt, z) if batched else term.vf(tt, z[0]).unsqueeze(0)

    if not batched and getattr(getattr(term, "term", None), "time_as_float", False):
        time = "fd"  # the vector field wants a float: no derivative can flow through it
    tt = t if batched else torch.full((), float(t), **kw)
    if mode == "fwd":
        ctx = contextlib.nullcontext() if graph else torch.no_grad()
        with ctx:
            yd = yb if graph else yb.detach()
            if time == "ad":

                def fn(s, v):
                    out = F(tt + s, yd + v)
                    return out, out

                (ft, J), f0 = torch.func.jacfwd(fn, argnums=(0, 1), has_aux=True)(
                    torch.zeros((), **kw), torch.zeros(n, **kw)
                )
                return f0, ft, J

            def fy(v):
                out = F(t, yd + v)
                return out, out

            J, f0 = torch.func.jacfwd(fy, has_aux=True)(torch.zeros(n, **kw))
    else:
        with torch.enable_grad():
            yin = yb if (graph and yb.requires_grad) else yb.detach().requires_grad_()
            if time != "ad":
                tin = t
            elif graph and tt.requires_grad:  # e.g. a differentiable event time
                tin = tt
            else:
                tin = tt.detach().requires_grad_()
            out = F(tin, yin)
            inputs = (tin, yin) if time == "ad" else (yin,)
            B = yb.shape[0]
            E = torch.eye(n, **kw).unsqueeze(1).expand(n, B, n)
            if out.requires_grad:
                grads = torch.autograd.grad(
                    out, inputs, E, is_grads_batched=True, create_graph=graph, allow_unused=True
                )
            else:  # a constant vector field
                grads = (None,) * len(inputs)
        f0 = out if graph else out.detach()
        gy = grads[-1]
        J = torch.zeros(B, n, n, **kw) if gy is None else gy.permute(1, 0, 2)  # (n, B, n) -> (B, n, n)
        if time == "ad":
            gt = grads[0]
            if gt is None:
                return f0, torch.zeros_like(f0), J
            return f0, (gt.t() if batched else gt.view(1, n)), J
    # forward difference in t, step sqrt(eps) relative to |t| (at least sqrt(eps))
    ctx = contextlib.nullcontext() if graph else torch.no_grad()
    with ctx:
        delta = math.sqrt(torch.finfo(yb.dtype).eps) * tt.detach().abs().clamp(min=1.0)
        t2 = (tt + delta).detach()
        delta = t2 - tt.detach()  # the representable step
        f2 = F(t2 if batched else float(t2), yb if graph else yb.detach())
        ft = (f2 - f0) / (delta.unsqueeze(-1) if batched else delta)
    return f0, ft, J


def user_derivatives(fn, term, t, yb: torch.Tensor, batched: bool, time: str = "ad", graph: bool = False):
    r"""``(f, f_t, J)`` as :func:`derivatives`, with ``J`` from the user's ``jac`` (see
    :func:`~torchnde.solvers._implicit.user_jacobian`) and ``f``, ``f_t`` from one evaluation:
    ``time="ad"`` runs it with a forward-mode dual number in ``t``
    (``torch.autograd.forward_ad``, no ``torch.func`` transform and no backward pass), ``"fd"`` by
    a forward difference (one more evaluation), as does a field whose time is a Python float or
    whose operations have no forward-mode derivative."""
    from torch.autograd import forward_ad as fwad

    kw = dict(dtype=yb.dtype, device=yb.device)

    def F(tt, z):
        return term.vf(tt, z) if batched else term.vf(tt, z[0]).unsqueeze(0)

    J = user_jacobian(fn, term, t, yb if batched else yb[0], batched, graph)
    if not batched and getattr(getattr(term, "term", None), "time_as_float", False):
        time = "fd"
    tt = t if batched else torch.full((), float(t), **kw)
    ctx = contextlib.nullcontext() if graph else torch.no_grad()
    yd = yb if graph else yb.detach()
    if time == "ad":
        try:
            with ctx, fwad.dual_level():
                out = F(fwad.make_dual(tt.detach(), torch.ones_like(tt)), yd)
                f0, ft = fwad.unpack_dual(out)
            return f0, (torch.zeros_like(f0) if ft is None else ft), J
        except (RuntimeError, NotImplementedError):  # no forward-mode formula for an operation
            pass
    with ctx:
        f0 = F(t, yd)
        delta = math.sqrt(torch.finfo(yb.dtype).eps) * tt.detach().abs().clamp(min=1.0)
        t2 = (tt + delta).detach()
        delta = t2 - tt.detach()
        f2 = F(t2 if batched else float(t2), yd)
        ft = (f2 - f0) / (delta.unsqueeze(-1) if batched else delta)
    return f0, ft, J


def _where(mask, a, b):
    """Row selection: ``mask`` is ``(B,)``; ``a`` and ``b`` have the batch first."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


class AbstractRosenbrock(AbstractAdaptiveSolver):
    """A Rosenbrock method: linearly implicit, one Jacobian and one LU per step.

    Subclasses give a :class:`RosenbrockTableau` (the generic stages and dense output here) or
    override :meth:`_stages` and :meth:`dense_coeffs`.

    Args:
        jacobian: ``"rev"`` (default: one evaluation and one batched backward pass of ``n``
            vector-Jacobian products) or ``"fwd"`` (``torch.func.jacfwd``; measured several times
            slower for small systems on CPU with torch 2.13, where forward-mode AD of some ops
            goes through Python decompositions).
        time_derivative: ``"ad"`` (forward mode in ``t``, default) or ``"fd"`` (a forward
            difference, for vector fields that do Python arithmetic on ``t``).
        jac: a user-given Jacobian ``jac(t, y, args)`` in the user's shapes, used instead of
            ``jacobian`` (for a single-tensor state of shape ``(..., n)`` it returns
            ``(..., n, n)``; per sample ``(B, n, n)``; see
            :func:`~torchnde.solvers._implicit.user_jacobian`). ``f`` and ``∂f/∂t`` then come
            from one evaluation with a forward-mode dual number in ``t``. A Rosenbrock step uses
            ``J`` in its formula: an inexact ``jac`` costs accuracy and order (Rosenbrock23, a
            W-method, keeps order 2). With gradients it is called inside autograd's graph, so
            it must be differentiable in ``y`` and in the parameters it uses.
    """

    tableau: ClassVar[RosenbrockTableau]
    #: the diagonal :math:`\gamma` of the matrix :math:`I - h\gamma J`
    gamma: ClassVar[float]

    def __init__(self, jacobian: str = "rev", time_derivative: str = "ad", jac=None):
        if jacobian not in ("fwd", "rev"):
            raise ValueError(f"{type(self).__name__}(jacobian=...) must be 'fwd' or 'rev', got {jacobian!r}")
        if time_derivative not in ("ad", "fd"):
            raise ValueError(
                f"{type(self).__name__}(time_derivative=...) must be 'ad' or 'fd', got {time_derivative!r}"
            )
        if jac is not None and not callable(jac):
            raise TypeError(f"{type(self).__name__}(jac=...) must be a callable jac(t, y, args), got {jac!r}")
        self.jacobian = jacobian
        self.time_derivative = time_derivative
        self.jac = jac

    def _key(self):
        return (type(self), self.jacobian, self.time_derivative, self.jac)

    def __eq__(self, other):
        return isinstance(other, AbstractRosenbrock) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        args = [
            f"{k}={getattr(self, k)!r}"
            for k, default in (("jacobian", "rev"), ("time_derivative", "ad"), ("jac", None))
            if getattr(self, k) != default
        ]
        return f"{type(self).__name__}({', '.join(args)})"

    def init(self, term, t0, y0):
        if term.rough:
            raise TypeError(f"{type(self).__name__} solves ODEs only; SDEs need an SDE solver (see SDE_SOLVERS)")
        if y0.is_complex():
            raise TypeError(f"{type(self).__name__} needs a real state, got dtype {y0.dtype}")
        B = y0.shape[0] if getattr(term, "batched", False) else 1
        # the derivative at the start (for the initial step size) tells whether the vector field
        # carries autograd history (parameters that require grad): then the Jacobians must too
        f0 = term.vf(t0, y0)
        probe = f0.requires_grad if torch.is_grad_enabled() else None
        # NewtonStats as counters only (no Newton iterations; one Jacobian and LU per step tried)
        return (f0, probe, NewtonStats(B, y0.dtype, y0.device))

    def initial_derivative(self, state):
        return state[0]

    def solution_stats(self, state) -> dict:
        """Jacobian and LU counts (one each per step tried), for ``Solution.stats``."""
        stats = state[-1]
        return {"num_jacobians": stats.jacobians, "num_lu": stats.factorizations}

    def step(self, term, t0, t1, y0, state):
        f_init, probe, stats = state
        batched = getattr(term, "batched", False)
        yb = y0 if batched else y0.unsqueeze(0)
        h = t1 - t0
        dt = h.to(yb.dtype).unsqueeze(-1) if batched else float(h)  # (B, 1) or float
        # inside autograd's graph when gradients are wanted: the solution depends on J itself
        graph = False
        if torch.is_grad_enabled():
            if probe is None:  # init ran without grad: probe once here
                probe = bool(term.vf(t0, y0).requires_grad)
                state = (f_init, probe, stats)
            graph = probe or yb.requires_grad
        if self.jac is not None:
            f0, ft, J = user_derivatives(self.jac, term, t0, yb, batched, self.time_derivative, graph)
        else:
            f0, ft, J = derivatives(term, t0, yb, batched, self.jacobian, self.time_derivative, graph)
        stats.jacobians += 1
        hg = dt * self.gamma
        if not batched:
            hg = torch.full((1, 1), hg, dtype=yb.dtype, device=yb.device)
        eye = torch.eye(yb.shape[-1], dtype=yb.dtype, device=yb.device)
        LU, piv, info = torch.linalg.lu_factor_ex(eye - hg.unsqueeze(-1) * J)
        stats.factorizations += 1
        singular = info != 0
        if bool(singular.any()):  # solve with the identity there (finite values, finite gradients)
            LU = _where(singular, eye.expand_as(LU), LU)
            ident = torch.arange(1, yb.shape[-1] + 1, dtype=piv.dtype, device=piv.device).expand_as(piv)
            piv = _where(singular, ident, piv)

        def F(t, z):
            return term.vf(t, z) if batched else term.vf(t, z[0]).unsqueeze(0)

        def solve(rhs):
            return torch.linalg.lu_solve(LU, piv, rhs.unsqueeze(-1)).squeeze(-1)

        y1, y_err, dense = self._stages(F, solve, t0, h, dt, yb, f0, ft)
        with torch.no_grad():
            bad = ~torch.isfinite(y1.sum(-1) + y_err.sum(-1))
        failed = singular | bad
        code = torch.where(singular, NEWTON_SINGULAR, torch.where(bad, NEWTON_DIVERGED, NEWTON_OK))
        if bool(failed.any()):
            stats.failures += failed.long()
            big = torch.finfo(yb.dtype).max / (100.0 * max(yb.shape[-1], 1))
            fail_err = (_FAIL_ERROR * (1 + yb.detach().abs())).clamp(max=big)
            y1 = _where(failed, yb, y1)
            y_err = _where(failed, fail_err, torch.nan_to_num(y_err.detach()))
            dense = tuple(_where(failed, torch.zeros_like(x), x) for x in dense)
        if not batched:
            y1, y_err, code = y1[0], y_err[0], code[0]
            dense = tuple(x[0] for x in dense)
        return y1, y_err, (t0, t1, y0, y1, dense), state, code

    def _stages(self, F, solve, t0, h, dt, yb, f0, ft):
        """The generic stages of :attr:`tableau`. Returns ``(y1, y_err, dense)`` with ``dense``
        the stages ``K`` (what :meth:`dense_coeffs` needs), all batch-first."""
        tab = self.tableau
        coef = tab.tensors(yb.dtype, yb.device)
        g = tab.gamma
        hft = dt * ft
        Ks = []
        for i in range(tab.num_stages):
            if i == 0:
                fi = f0
            else:
                Yi = _lincomb(yb, dt, Ks, coef["a"][i], coef["a_f"][i])
                fi = F(_node(t0, h, float(tab.c[i])), Yi)
            rhs = fi if i == 0 else fi + _lincomb(None, 1.0, Ks, coef["C"][i], coef["C_f"][i])
            if tab.d[i] != 0:
                rhs = torch.add(rhs, hft, alpha=float(tab.d[i]))
            Ks.append(g * solve(rhs))
        y1 = _lincomb(yb, dt, Ks, coef["m"], coef["m_f"])
        y_err = _lincomb(None, dt, Ks, coef["err"], coef["err_f"])
        return y1, y_err, (torch.stack(Ks, -2),)

    def dense_coeffs(self, term, dense_info):
        r"""Hairer & Wanner's Rodas interpolant (IV.7 and Steinebach's coefficients):
        :math:`y(t_0 + \theta h) = (1-\theta) y_0 + \theta\big(y_1 + (1 - \theta)(H_1 + \theta H_2
        + \theta^2 H_3 + \dots)\big)` with :math:`H_r = h \sum_j H_{rj} K_j`."""
        t0, t1, y0, y1, (Ks,) = dense_info
        h = t1 - t0
        dt = h if isinstance(h, float) else h.to(y0.dtype).unsqueeze(-1).unsqueeze(-1)
        Hm = self.tableau.tensors(y0.dtype, y0.device)["H"]  # (R, s)
        Hs = (Hm @ Ks) * dt  # (..., R, N)
        dy = (y1 - y0).unsqueeze(-2)
        # theta (1 - theta) sum_r H_r theta^(r-1) = sum_r H_r (theta^r - theta^(r+1))
        R = Hs.shape[-2]
        zero = torch.zeros_like(dy)
        up = torch.cat([Hs, zero], -2)  # theta^r coefficients, r = 1..R+1
        down = torch.cat([zero, Hs], -2)
        C = up - down
        return torch.cat([C[..., :1, :] + dy, C[..., 1 : R + 1, :]], -2)
