r"""Diagonally implicit Runge--Kutta steps: Jacobians, simplified Newton and LU reuse.

An ESDIRK method (explicit first stage, then implicit stages with one diagonal entry
:math:`\gamma`) solves, at each implicit stage :math:`i`,

.. math::
    Z_i = \psi_i + h\gamma f(t_0 + c_i h, Z_i), \qquad \psi_i = y_0 + h \sum_{j<i} a_{ij} k_j,

and sets :math:`k_i = (Z_i - \psi_i) / (h\gamma)` (this avoids one more evaluation and, for stiff
components, does not amplify the Newton error by the Jacobian). The nonlinear equations are
solved by *simplified Newton* iterations (Hairer & Wanner, *Solving ODEs II*, IV.8):

.. math::
    (I - h\gamma J)\,\Delta^{(m)} = \psi_i + h\gamma f(Z^{(m)}) - Z^{(m)}, \qquad
    Z^{(m+1)} = Z^{(m)} + \Delta^{(m)},

with one Jacobian :math:`J` and one LU factorisation of :math:`I - h\gamma J` shared by every
stage of a step and kept across steps:

* **Jacobian** (autograd: ``n`` backward passes for up to 16 states, ``torch.func.jacfwd``
  above; see :func:`jacobian`) is recomputed at the start of a step when the previous accepted
  step's Newton iterations contracted slowly (rate :math:`\theta > 0.01`), and at the start of
  the retry of a step whose Newton solve failed (the retry reuses it if it is already fresh
  there).
* **LU** is recomputed when the Jacobian changes or when :math:`|h\gamma / (h\gamma)_{LU} - 1| > 0.3`
  (so a step that grows or shrinks by more than 30 %; in between, the stale factor only slows the
  iterations down a little).
* **Convergence** (Hairer & Wanner IV.8): with :math:`\theta_m = \|\Delta^{(m)}\| /
  \|\Delta^{(m-1)}\|` and :math:`\eta_m = \theta_m / (1 - \theta_m)` (for the first iteration
  :math:`\eta` of the previous solve, floored at ``1e-3``, to the power 0.8: a smaller carried rate
  is a round-off artefact of a solve whose corrections reached round-off), the iteration stops when
  :math:`\eta_m \|\Delta^{(m)}\| \le 1`. The norm is the RMS norm scaled by
  ``newton_atol + newton_rtol * |Z|``. It fails when :math:`\theta_m \ge 0.99` (divergence), when
  the error predicted after the remaining iterations, :math:`\eta_m \theta_m^{M-1-m}
  \|\Delta^{(m)}\|`, is still above 1, when a value is NaN/inf, after ``max_iters`` (default 10)
  iterations, or when the LU factorisation is singular (``info != 0``). A failure with a Jacobian
  from an earlier step is retried once within the step with a fresh one.

A failed Newton solve is a **rejected step**, never a crash: the step returns ``y1 = y0`` and an
error estimate ``1e4 (1 + |y0|)`` (large and finite, so an adaptive controller rejects the step
and shrinks it by its ``factormin``, and the solve's NaN/inf wall does not count it), and in
per-sample mode only the failing samples are affected. The step's fifth return value is the
reason per sample (:data:`NEWTON_OK`, :data:`NEWTON_DIVERGED`, :data:`NEWTON_SINGULAR`), and the
counters of Newton iterations, failures, Jacobians and factorisations live in
:class:`NewtonStats` in the solver state.

Shapes. In shared mode the state is one flat ``(N,)`` vector and the Jacobian is ``(N, N)``: a
batch folded into ``y0`` becomes one large coupled system (``(B n)^2`` entries and an
:math:`O((Bn)^3)` factorisation), so batches should be solved with ``per_sample=True``, where each
row gets its own ``(n, n)`` Jacobian (one batched evaluation and ``n`` backward passes serve all
rows, since rows are independent), its own LU (``torch.linalg.lu_factor_ex`` on ``(B, n, n)``),
its own Newton convergence and its own step. Internally shared mode is a batch of one.

Gradients (DirectAdjoint, CheckpointAdjoint). The Newton iterations run without an autograd graph,
whatever the grad mode; when autograd records (grad mode on and ``psi``, ``h gamma``, the stage time
or a tensor the vector field closes over needs a gradient), the converged stage value :math:`Z`
gets its derivative from the implicit function theorem instead. :math:`Z` solves
:math:`R(Z, p) = \psi + h\gamma f(t, Z; p) - Z = 0`, where :math:`p` is everything ``psi``, ``h gamma``,
``t`` and ``f`` depend on, so

.. math::
    \frac{\partial Z}{\partial p} = A^{-1} \frac{\partial r}{\partial p}, \qquad
    A = I - h\gamma J(Z), \qquad r(p) = \psi + h\gamma f(t, Z; p)

with :math:`Z` held fixed in :math:`r`. The stage returns :math:`Z` through one
:class:`torch.autograd.Function` whose input is :math:`r` (one evaluation of ``f`` at :math:`Z`,
recorded, replacing the iterations' graphs) and whose forward returns the converged :math:`Z`
unchanged, bit for bit. Its backward, given :math:`\bar Z`, solves the adjoint system
:math:`A^T \lambda = \bar Z` exactly:

* for more than 8 states, by iterative refinement preconditioned with the forward LU's transposed
  solve (``lu_solve(..., adjoint=True)``):
  :math:`\lambda \leftarrow \lambda + M^{-T}(\bar Z - \lambda + h\gamma J^T\lambda)`, where
  :math:`M = I - (h\gamma)_{LU} J_{LU}` is the possibly stale factorised matrix and
  :math:`J^T\lambda` an exact vector--Jacobian product of ``f`` at :math:`Z` through the recorded
  evaluation. A stale :math:`M` therefore costs corrections, not accuracy: the iteration matrix
  :math:`(I - A M^{-1})^T` has the spectrum of the forward simplified-Newton iteration, which
  converged. It stops when a correction is below ``max(100 eps, min(1e-10, 1e-3 newton_rtol))``
  times :math:`\|\lambda\|` per row (the error left was measured within about 10 times the last
  correction; with a stale factorisation the iteration matrix is far from normal, so a
  contraction-rate estimate as for the forward iterations undershoots it), far below the forward
  solve's own error; rows not converged after 10 corrections (rare) get the direct solve below.
* for up to 8 states, directly: :math:`A` from ``n`` vector--Jacobian products in one vmapped
  backward pass and a dense solve (on Robertson one such pass cost about as much as two
  refinement corrections, and the refinement took four to five, each a separate backward pass
  with its fixed overhead).

The backward returns :math:`\lambda` as the cotangent of :math:`r`, and autograd carries it on
through ``psi``, ``h gamma``, the stage time and the parameters ``f`` uses (one VJP of the recorded
evaluation, so the result is exact: it is the derivative of the exact stage solution at the
computed :math:`Z`). Rows whose Newton solve failed get no gradient (their step is rejected and
discarded). The recorded graph per stage is one evaluation of ``f`` however many iterations the
stage took, and the forward values under autograd equal those without it (the iterations are the
same; earlier versions took one extra iteration under autograd). Limits: the backward is not
itself differentiable (``create_graph=True`` through an implicit stage raises a RuntimeError),
``torch.func`` transforms do not see through it, and whether ``f`` reaches a tensor that needs a
gradient is decided per stage from ``psi``, ``h gamma``, the stage time and the first Newton
evaluation.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ._base import AbstractAdaptiveSolver, _lincomb, _node, hermite_coeffs

__all__ = [
    "AbstractESDIRK",
    "DIRKTableau",
    "NewtonStats",
    "jacobian",
    "user_jacobian",
    "NEWTON_OK",
    "NEWTON_DIVERGED",
    "NEWTON_SINGULAR",
]

#: Per-sample reasons of a failed step (the fifth value a step returns).
NEWTON_OK = 0
NEWTON_DIVERGED = 1  # diverged, too slow, did not converge in max_iters, or NaN/inf
NEWTON_SINGULAR = 2  # I - h gamma J is singular (LU info != 0)

_THETA_JAC = 0.01  # recompute J after an accepted step whose Newton contraction rate exceeded this
_REFACTOR = 0.3  # refactor the LU when |h gamma / (h gamma)_LU - 1| exceeds this
_LOOP_MAX = 16  # jacobian="auto": backward passes for at most this many states, jacfwd above
_DENSE_WARN = 2048  # shared mode: warn above this many states (a dense Jacobian of the whole state)
_FAIL_ERROR = 1e4  # error estimate of a failed step, times (1 + |y0|)
# the previous solve's eta used by a first iteration is floored here: a rate measured when the
# corrections reached round-off is an artefact (seen down to 1e-13), and with it one iteration
# was accepted with a correction 1e10 times the tolerance (KenCarp4 on Fisher--KPP)
_ETA_FLOOR = 1e-3
#: Newton tolerances as a fraction of the step-size controller's (Hairer & Wanner II, IV.8: kappa)
_KAPPA = 0.03
#: Newton tolerances with fixed steps (no controller tolerances to derive them from)
_NEWTON_RTOL, _NEWTON_ATOL = 1e-7, 1e-11


@dataclass(frozen=True, eq=False)
class DIRKTableau:
    """An ESDIRK method: explicit first stage, then implicit stages with diagonal ``gamma``.

    ``a[i]`` holds the ``i`` coefficients of stage ``i`` on the stages before it (``a[0] == ()``);
    the diagonal entry of every stage ``i >= 1`` is ``gamma``. The propagated solution is the last
    stage (stiffly accurate: ``b`` is the last row of the full matrix), ``b_hat`` the weights of the
    embedded solution (for Kværnø's methods the second-to-last stage). The nodes ``c`` are the row
    sums.
    """

    a: tuple
    gamma: float
    b_hat: tuple
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_stages(self) -> int:
        return len(self.a)

    @property
    def c(self) -> tuple[float, ...]:
        return tuple(0.0 if i == 0 else float(sum(row)) + self.gamma for i, row in enumerate(self.a))

    @property
    def b(self) -> tuple[float, ...]:
        return (*self.a[-1], self.gamma)

    def full_matrix(self):
        """The ``(s, s)`` Butcher matrix (for order-condition checks)."""
        s = self.num_stages
        A = [[0.0] * s for _ in range(s)]
        for i, row in enumerate(self.a):
            for j, x in enumerate(row):
                A[i][j] = float(x)
            if i:
                A[i][i] = self.gamma
        return A

    def tensors(self, dtype, device) -> dict:
        key = (dtype, device)
        out = self._cache.get(key)
        if out is None:
            err = [float(b) - float(bh) for b, bh in zip(self.b, self.b_hat)]
            out = {
                "a": [torch.tensor([float(x) for x in row], dtype=dtype, device=device) for row in self.a],
                "a_f": [tuple(float(x) for x in row) for row in self.a],
                "b": torch.tensor([float(x) for x in self.b], dtype=dtype, device=device),
                "b_f": tuple(float(x) for x in self.b),
                "err": torch.tensor(err, dtype=dtype, device=device),
                "err_f": tuple(err),
            }
            self._cache[key] = out
        return out


class NewtonStats:
    """Counters of the nonlinear solves of one solve, shared by every state of it (so they also
    count the work of rejected steps). Per sample in per-sample mode (``(B,)`` tensors), else
    ``(1,)`` tensors.

    Attributes:
        iterations: Newton iterations (each one vector-field evaluation and one LU solve).
        failures: failed Newton solves (each one rejected step).
        jacobians: Jacobian evaluations (Python int; one batched evaluation in per-sample mode).
        factorizations: LU factorisations (Python int).
    """

    __slots__ = (
        "iterations", "failures", "jacobians", "factorizations", "fail_t", "jac_t", "jac", "batched", "jac_mode",
    )  # fmt: skip

    def __init__(self, B: int, time_dtype, device, batched: bool = True):
        self.batched = batched
        self.iterations = torch.zeros(B, dtype=torch.long, device=device)
        self.failures = torch.zeros(B, dtype=torch.long, device=device)
        self.jacobians = 0
        self.factorizations = 0
        # the time of the step start where a Newton solve last failed, and where J was last computed
        self.fail_t = torch.full((B,), math.nan, dtype=time_dtype, device=device)
        self.jac_t = torch.full((B,), math.nan, dtype=time_dtype, device=device)
        self.jac = None
        # jacobian="auto" falls back to "loop" for the rest of the solve when torch.func cannot
        # transform the vector field (e.g. BacksolveAdjoint's adjoint field, which calls autograd)
        self.jac_mode = None

    def as_dict(self) -> dict:
        """The counters for ``Solution.stats`` (per-sample tensors, or ints in the shared mode)."""
        per = (lambda x: x) if self.batched else (lambda x: int(x[0]))
        return {
            "newton_iterations": per(self.iterations),
            "newton_failures": per(self.failures),
            "num_jacobians": self.jacobians,
            "num_lu": self.factorizations,
        }


def jacobian(term, t, y: torch.Tensor, batched: bool, mode: str = "auto") -> torch.Tensor:
    """The Jacobian of the flat vector field ``term.vf(t, .)`` at ``y``, detached.

    Shared mode: ``y`` is ``(N,)`` and the result ``(N, N)``. Per-sample mode: ``y`` is
    ``(B, n)`` (rows independent) and the result ``(B, n, n)``: each output coordinate summed
    over rows is pulled back (reverse modes), or each basis direction ``e_j`` is pushed through all
    rows at once (forward mode, ``jacfwd`` of ``v -> f(t, y + v)``). ``mode``: ``"loop"`` (one
    evaluation and ``n`` ``torch.autograd.grad`` passes; cheapest for small ``n``), ``"fwd"``
    (``torch.func.jacfwd``, ``n`` JVPs in one vmapped call), ``"rev"`` (``torch.func.jacrev``) or
    ``"auto"`` (``"loop"`` up to 16 states, ``"fwd"`` above). The ``torch.func`` modes need a
    vector field that they can transform (no ``.item()``, no in-place updates of captured
    tensors).
    """
    y = y.detach()
    n = y.shape[-1]
    if mode == "auto":
        mode = "loop" if n <= _LOOP_MAX else "fwd"
    if mode == "loop":
        # one evaluation recorded by autograd and n backward passes: for small systems far cheaper
        # than torch.func's transforms (about 0.5 ms against 6 ms for n = 3 on CPU)
        with torch.enable_grad():
            yv = y.requires_grad_(True)
            out = term.vf(t, yv)
            if not out.requires_grad:  # the field does not depend on y
                return torch.zeros(*y.shape, n, dtype=y.dtype, device=y.device)
            rows = []
            for i in range(n):
                (g,) = torch.autograd.grad(out[..., i].sum(), yv, retain_graph=i < n - 1, allow_unused=True)
                rows.append(torch.zeros_like(y) if g is None else g)
        return torch.stack(rows, -2)
    with torch.no_grad():
        if mode == "fwd":
            v0 = torch.zeros(n, dtype=y.dtype, device=y.device)
            return torch.func.jacfwd(lambda v: term.vf(t, y + v))(v0)
        if batched:
            J = torch.func.jacrev(lambda Y: term.vf(t, Y).sum(0))(y)  # (n, B, n)
            return J.permute(1, 0, 2)
        return torch.func.jacrev(lambda Y: term.vf(t, Y))(y)


def _flat_base(term):
    """The solver-facing flat term behind ``term`` (an IMEX solver's implicit part, or the term
    itself): it carries the flattener, the bound ``args`` and the time sign."""
    base = getattr(term, "base", term)
    if not all(hasattr(base, k) for k in ("flat", "args", "sign")):
        raise TypeError(f"jac=...: the solver got a term without the user's state layout ({type(term).__name__})")
    return base


def user_jacobian(fn, term, t, y: torch.Tensor, batched: bool, graph: bool = False) -> torch.Tensor:
    r"""The Jacobian of the flat vector field from the user's ``jac(t, y, args)``, batch first:
    ``(B, n, n)`` in per-sample mode, ``(1, N, N)`` in shared mode.

    ``fn`` gets the time (a tensor, as the vector field does), the state in the user's shape
    (single-tensor states only) and ``args``, and returns :math:`\partial f/\partial y` in the
    user's shapes: for a state of shape ``S = (*lead, m)`` either ``S + (m,)`` (one ``(m, m)``
    block per leading index: the field acts on the last dimension of each row independently; in
    per-sample mode with ``S = (B, n)`` this is ``(B, n, n)``) or the full ``S + S`` (per-sample:
    ``(B, *rest, *rest)``). Integration backwards in time (``t1 < t0``) is handled here: the flat
    field is ``-f(-t, y)``, so its Jacobian is ``-fn(-t, y)``. ``graph``: keep the result in
    autograd's graph (Rosenbrock gradients); otherwise it is computed without one.
    """
    base = _flat_base(term)
    flat = base.flat
    if not flat.single:
        raise TypeError(
            "jac=... supports a single-tensor state (its Jacobian is one (..., n, n) tensor); this solve's y0 is a "
            "tuple/dict. Flatten the state into one tensor, or leave jac=None (automatic Jacobians)."
        )
    from .._terms import time_dtype

    tdt = time_dtype(y.dtype)
    tt = t if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=tdt, device=y.device)
    if base.sign < 0:
        tt = -tt
    ctx = torch.enable_grad() if graph else torch.no_grad()
    with ctx:
        yu = flat.state_to_tree(y if graph else y.detach())
        J = fn(tt, yu, base.args)
    S = tuple(yu.shape)
    if not isinstance(J, torch.Tensor):
        raise TypeError(f"jac=... must return a tensor (the Jacobian), got {type(J).__name__}")
    shape = tuple(J.shape)
    if batched:
        B, n = y.shape
        if shape == S + S[1:]:
            J = J.reshape(B, n, n)
        else:
            raise ValueError(
                f"jac=... returned shape {shape}; for the per-sample state of shape {S} it must be "
                f"{S + S[1:]} (each sample's Jacobian, d f_b / d y_b)"
            )
    else:
        N = y.shape[-1]
        if shape == S + S:
            J = J.reshape(1, N, N)
        elif len(S) >= 2 and shape == S + S[-1:]:
            m = S[-1]
            L = N // m
            eye = torch.eye(L, dtype=J.dtype, device=J.device)
            J = torch.einsum("ab,aij->aibj", eye, J.reshape(L, m, m)).reshape(1, N, N)
        else:
            want = f"{S + S}" if len(S) < 2 else f"{S + S[-1:]} (one block per row) or {S + S} (full)"
            raise ValueError(f"jac=... returned shape {shape}; for the state of shape {S} it must be {want}")
    if not J.is_floating_point():
        raise TypeError(f"jac=... must return a floating tensor, got dtype {J.dtype}")
    J = J.to(dtype=y.dtype, device=y.device)
    if base.sign < 0:
        J = -J
    return J if graph else J.detach()


def _probe_eval(F, t, z):
    """``F(t, z)`` evaluated with autograd on, detached, and whether it needed a gradient (a stage
    whose field reaches parameters gets the implicit-function-theorem gradient)."""
    with torch.enable_grad():
        fz = F(t, z)
    return fz.detach(), fz.requires_grad


def _where(mask, a, b):
    """Row selection: ``mask`` is ``(B,)``; ``a`` and ``b`` have the batch first."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def _step_codes(failed, singular, stats, t0_row, yb, y1, y_err, eta, slopes):
    """The Newton result codes of a step, and its outputs with the failed rows replaced: ``y1 = y0``
    and a large finite error, so the controller rejects them (``slopes``: ``(end slope, start
    slope)`` pairs, the start one kept on failed rows; ``None`` entries pass through). Returns
    ``(code, y1, y_err, eta, slopes)``."""
    code = torch.where(singular, NEWTON_SINGULAR, torch.where(failed, NEWTON_DIVERGED, NEWTON_OK))
    if bool(failed.any()):
        stats.failures += failed.long()
        stats.fail_t = torch.where(failed, t0_row, stats.fail_t)
        big = torch.finfo(yb.dtype).max / (100.0 * max(yb.shape[-1], 1))
        fail_err = (_FAIL_ERROR * (1 + yb.detach().abs())).clamp(max=big)
        y1 = _where(failed, yb, y1)
        y_err = _where(failed, fail_err, torch.nan_to_num(y_err.detach()))
        slopes = [None if f1 is None else _where(failed, f0, f1) for f1, f0 in slopes]
        eta = torch.where(failed, torch.ones_like(eta), eta)
    else:
        slopes = [f1 for f1, _ in slopes]
    return code, y1, y_err, eta, slopes


_ADJ_ITERS = 10  # refinement corrections of the adjoint stage solve before the dense fallback
_ADJ_DENSE = 8  # adjoint stage solves of up to this many states use the exact Jacobian at Z instead


def _requires_grad(x) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def _vjp_jacobian(fz, zl):
    """``J(Z)`` per row, ``(B, n, n)``, from ``n`` vector--Jacobian products through the recorded
    evaluation ``fz = F(t, zl)`` (one vmapped backward pass; a loop where vmap cannot)."""
    n = zl.shape[-1]
    eye = torch.eye(n, dtype=zl.dtype, device=zl.device)
    E = eye.unsqueeze(1).expand(n, *zl.shape).contiguous()  # (n, B, n): e_i in every row
    try:
        (J,) = torch.autograd.grad(fz, zl, E, retain_graph=True, is_grads_batched=True)
        return J.movedim(0, -2)
    except RuntimeError:  # an operation without a batching rule for its backward
        return torch.stack([torch.autograd.grad(fz, zl, e, retain_graph=True)[0] for e in E], -2)


class _StageIFT(torch.autograd.Function):
    """The converged stage value ``Z`` of ``Z = psi + hg f(t, Z)``, differentiated by the implicit
    function theorem (see the module docstring). Input: ``r = psi + hg f(t, Z_leaf)``, recorded
    with ``Z_leaf`` a detached copy of ``Z``; the forward returns ``Z`` unchanged; the backward
    returns ``lambda`` with ``(I - hg J(Z))^T lambda = grad_Z`` as the cotangent of ``r``, zero on
    the rows not in ``ok``."""

    @staticmethod
    def forward(ctx, r, z, data):
        ctx.data = data
        return z.clone()

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "torchnde: create_graph=True (second derivatives) through the stages of an implicit solver "
                "(ESDIRK / KenCarp) is not supported: their gradient comes from the implicit function theorem, "
                "whose backward is not differentiable. Differentiate once, or use a Rosenbrock or explicit solver "
                "for higher derivatives."
            )
        fz, zl, hg, LU, piv, ok, tol = ctx.data
        okc = ok.unsqueeze(-1)
        zero = torch.zeros_like(g)
        g = torch.where(okc, g, zero)
        if not fz.requires_grad:  # f does not depend on Z: A = I
            return g, None, None
        n = g.shape[-1]
        if n <= _ADJ_DENSE:
            # small systems: the exact A = I - hg J(Z) costs one (vmapped) backward pass, about as
            # much as two refinement corrections, and makes the solve direct
            A = torch.eye(n, dtype=g.dtype, device=g.device) - hg.unsqueeze(-1) * _vjp_jacobian(fz, zl)
            lam, info = torch.linalg.solve_ex(A.mT, g)
            lam = torch.where((info != 0).unsqueeze(-1), torch.full_like(lam, math.nan), lam)
            return torch.where(okc, lam, zero), None, None

        def solve_t(v):  # M^-T v with M = I - (hg J)_LU: the forward factorisation, transposed
            return torch.where(okc, torch.linalg.lu_solve(LU, piv, v.unsqueeze(-1), adjoint=True).squeeze(-1), zero)

        def jt(v):  # J(Z)^T v per row: one vector-Jacobian product through the recorded evaluation
            (u,) = torch.autograd.grad(fz, zl, v, retain_graph=True, allow_unused=True)
            return zero if u is None else u

        lam = solve_t(g)
        conv = ~ok | ~g.any(-1)
        for _ in range(_ADJ_ITERS):
            if bool(conv.all()):
                break
            d = solve_t(g - lam + hg * jt(lam))
            lam = lam + d
            # stop on the correction's size itself: the iteration matrix is far from normal when
            # the factorisation is stale, so a rate estimate from successive corrections (as for
            # Newton's forward iterations) can undershoot the error by orders of magnitude; the
            # error after a correction was measured within about 10x of it
            nd = torch.linalg.vector_norm(d, dim=-1)
            conv = conv | (nd <= tol * torch.linalg.vector_norm(lam, dim=-1))
        if not bool(conv.all()):  # too slow or diverging (a very stale factorisation): solve with A itself
            A = torch.eye(n, dtype=g.dtype, device=g.device) - hg.unsqueeze(-1) * _vjp_jacobian(fz, zl)
            exact, info = torch.linalg.solve_ex(A.mT, g)
            exact = torch.where((info != 0).unsqueeze(-1), torch.full_like(exact, math.nan), exact)
            lam = torch.where(conv.unsqueeze(-1), lam, torch.where(okc, exact, zero))
        return lam, None, None


def _stage_ift(F, t, psi, z, hg, LU, piv, ok, tol):
    """``z`` (converged on the rows in ``ok``) with its implicit-function-theorem derivative
    attached (see :class:`_StageIFT`). Rows not in ``ok`` are evaluated at ``psi`` (finite, their
    gradient is zero) and keep their value."""
    zl = _where(ok, z, psi.detach()).requires_grad_(True)
    with torch.enable_grad():
        fz = F(t, zl)
        r = psi + hg * fz
    return _StageIFT.apply(r, z, (fz, zl, hg.detach(), LU, piv, ok, tol))


class AbstractESDIRK(AbstractAdaptiveSolver):
    """An ESDIRK method with simplified Newton iterations (see :mod:`torchnde.solvers._implicit`).

    Args:
        newton_rtol, newton_atol: the Newton iterations stop when the predicted remaining error is
            below ``newton_atol + newton_rtol * |Z|`` (RMS over the state). ``None`` (default):
            ``0.03`` times the adaptive controller's ``rtol`` / ``atol`` (Hairer & Wanner's
            κ·tol), and ``1e-7`` / ``1e-11`` with fixed steps. ``newton_rtol`` is raised to at
            least ``100 eps`` and ``newton_atol`` to ``10 eps`` of the state's dtype.
        max_iters: iterations allowed per stage before the step is rejected.
        jacobian: how the Jacobian is computed: ``"auto"`` (default: ``"loop"`` up to 16 states,
            ``"fwd"`` above), ``"loop"`` (``n`` backward passes of ``torch.autograd.grad``),
            ``"fwd"`` (``torch.func.jacfwd``) or ``"rev"`` (``torch.func.jacrev``).
        jac: a user-given Jacobian ``jac(t, y, args)`` of the vector field (of the implicit, second
            term for the IMEX solvers) in the user's shapes, used instead of ``jacobian`` (no
            autograd or ``torch.func`` pass and no vector-field evaluation per Jacobian): for a
            single-tensor state of shape ``(..., n)`` it returns ``(..., n, n)`` (per sample in
            per-sample mode: ``(B, n, n)``), or the full ``state.shape * 2``; see
            :func:`user_jacobian`. It only steers the Newton iterations: an inexact ``jac``
            costs iterations (or fails steps), not accuracy, and gradients do not use it.
    """

    tableau: ClassVar[DIRKTableau]
    #: filter the error estimate by (I - h gamma J)^-1 (for estimates that are large on stiff
    #: components, such as implicit Euler's)
    filter_error: ClassVar[bool] = False

    def __init__(
        self,
        newton_rtol: float | None = None,
        newton_atol: float | None = None,
        max_iters: int = 10,
        jacobian: str = "auto",
        jac=None,
    ):
        for name, v in (("newton_rtol", newton_rtol), ("newton_atol", newton_atol)):
            if v is not None and not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{type(self).__name__}({name}=...) must be a finite float > 0, got {v!r}")
        if not (isinstance(max_iters, int) and max_iters >= 1):
            raise ValueError(f"{type(self).__name__}(max_iters=...) must be an int >= 1, got {max_iters!r}")
        if jacobian not in ("auto", "loop", "fwd", "rev"):
            raise ValueError(
                f"{type(self).__name__}(jacobian=...) must be 'auto', 'loop', 'fwd' or 'rev', got {jacobian!r}"
            )
        self.newton_rtol = None if newton_rtol is None else float(newton_rtol)
        self.newton_atol = None if newton_atol is None else float(newton_atol)
        if jac is not None and not callable(jac):
            raise TypeError(f"{type(self).__name__}(jac=...) must be a callable jac(t, y, args), got {jac!r}")
        self.max_iters = max_iters
        self.jacobian = jacobian
        self.jac = jac

    def with_tolerances(self, rtol: float, atol: float):
        """This solver with the Newton tolerances left at ``None`` set from the step-size
        controller's (called by the loop for adaptive solves; the solver object itself is not
        changed)."""
        if self.newton_rtol is not None and self.newton_atol is not None:
            return self
        out = copy.copy(self)
        if out.newton_rtol is None:
            out.newton_rtol = _KAPPA * float(rtol)
        if out.newton_atol is None:
            out.newton_atol = _KAPPA * float(atol)
        return out

    def _key(self):
        return (type(self), self.newton_rtol, self.newton_atol, self.max_iters, self.jacobian, self.jac)

    def __eq__(self, other):
        return isinstance(other, AbstractESDIRK) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        default = type(self)()
        args = [
            f"{k}={getattr(self, k)!r}"
            for k in ("newton_rtol", "newton_atol", "max_iters", "jacobian", "jac")
            if getattr(self, k) != getattr(default, k)
        ]
        return f"{type(self).__name__}({', '.join(args)})"

    # --- state: (f0, J, LU, pivots, hg_lu, jac_stale, eta, stats), batch first (B = 1 in shared mode)

    def init(self, term, t0, y0):
        if term.rough:
            raise TypeError(f"{type(self).__name__} solves ODEs only; SDEs need an SDE solver (see SDE_SOLVERS)")
        if y0.is_complex():
            raise TypeError(f"{type(self).__name__} needs a real state, got dtype {y0.dtype}")
        batched = getattr(term, "batched", False)
        f0 = term.vf(t0, y0)
        yb = y0 if batched else y0.unsqueeze(0)
        B, n = yb.shape
        if not batched and n > _DENSE_WARN:
            warnings.warn(
                f"{type(self).__name__} builds a dense ({n}, {n}) Jacobian and LU of the flattened state "
                f"({2 * n * n * yb.element_size() / 2**30:.2f} GiB). If y0 is a batch of independent problems, "
                "pass per_sample=True: each sample then gets its own small Jacobian.",
                stacklevel=2,
            )
        kw = dict(dtype=yb.dtype, device=yb.device)
        J = torch.zeros(B, n, n, **kw)
        piv = torch.ones(B, n, dtype=torch.int32, device=yb.device)
        return (
            f0,
            J,
            J.clone(),
            piv,
            torch.zeros(B, **kw),
            torch.ones(B, dtype=torch.bool, device=yb.device),
            torch.ones(B, **kw),
            NewtonStats(B, t0.dtype if batched else torch.float64, yb.device, batched),
        )

    def initial_derivative(self, state):
        return state[0]

    def solution_stats(self, state) -> dict:
        """Newton iterations and failures, Jacobian and LU counts, for ``Solution.stats``."""
        stats = next((x for x in state if isinstance(x, NewtonStats)), None)
        return {} if stats is None else stats.as_dict()

    def _tols(self, dtype):
        eps = torch.finfo(dtype).eps
        rtol = _NEWTON_RTOL if self.newton_rtol is None else self.newton_rtol
        atol = _NEWTON_ATOL if self.newton_atol is None else self.newton_atol
        return max(rtol, 100 * eps), max(atol, 10 * eps)

    def _setup(self, term, t0, t1, y0):
        """What every implicit step starts from, batch first (``B = 1`` in the shared mode):
        ``(batched, coef, yb, kw, h, dt, t0_row, hg)`` with ``dt`` a float or ``(B, 1)``, the step
        start ``t0_row`` as ``(B,)`` (float64 in the shared mode) and ``hg = h gamma`` ``(B, 1)``."""
        batched = getattr(term, "batched", False)
        tab = self.tableau
        coef = tab.tensors(y0.dtype, y0.device)
        yb = y0 if batched else y0.unsqueeze(0)
        kw = dict(dtype=yb.dtype, device=yb.device)
        h = t1 - t0
        if batched:
            dt = h.to(yb.dtype).unsqueeze(-1)  # (B, 1)
            t0_row = t0
        else:
            dt = float(h)
            t0_row = torch.full((1,), float(t0), dtype=torch.float64, device=yb.device)
        hg = (dt * tab.gamma) if batched else torch.full((1, 1), dt * tab.gamma, **kw)  # (B, 1)
        return batched, coef, yb, kw, h, dt, t0_row, hg

    def step(self, term, t0, t1, y0, state):
        f0, J, LU, piv, hg_lu, stale, eta, stats = state
        batched, coef, yb, kw, h, dt, t0_row, hg = self._setup(term, t0, t1, y0)

        def F(t, z):
            return term.vf(t, z) if batched else term.vf(t, z[0]).unsqueeze(0)

        # J is stale after slow convergence, and where a Newton solve from this step start failed
        need_jac = stale | (stats.fail_t == t0_row)
        J, LU, piv, hg_lu, singular = self._refresh(term, t0, y0, t0_row, hg, J, LU, piv, hg_lu, need_jac, stats)
        f0b = f0 if batched else f0.unsqueeze(0)
        ks, failed, theta_max, eta = self._stages(F, t0, h, dt, yb, f0b, hg, LU, piv, eta, ~singular, coef, stats)
        # a failure with a Jacobian from an earlier step: retry those rows once with a fresh one
        retry = failed & ~need_jac
        if bool(retry.any()):
            J, LU, piv, hg_lu, sing2 = self._refresh(term, t0, y0, t0_row, hg, J, LU, piv, hg_lu, retry, stats)
            ks2, failed2, theta2, eta2 = self._stages(
                F, t0, h, dt, yb, f0b, hg, LU, piv, eta, retry & ~sing2, coef, stats
            )
            ks = [_where(retry, k2, k) for k, k2 in zip(ks, ks2)]
            failed = torch.where(retry, failed2 | sing2, failed)
            singular = singular | (retry & sing2)
            theta_max = torch.where(retry, theta2, theta_max)
            eta = torch.where(retry, eta2, eta)
        failed = failed | singular
        y1 = _lincomb(yb, dt, ks, coef["b"], coef["b_f"])
        y_err = _lincomb(None, dt, ks, coef["err"], coef["err_f"])
        if self.filter_error:
            y_err = torch.linalg.lu_solve(LU, piv, y_err.unsqueeze(-1)).squeeze(-1)
        f1 = ks[-1]

        # --- failed rows: y1 = y0 and a large finite error, so the controller rejects them
        code, y1, y_err, eta, (f1,) = _step_codes(failed, singular, stats, t0_row, yb, y1, y_err, eta, [(f1, f0b)])
        stale1 = theta_max > _THETA_JAC
        state1 = (f1 if batched else f1[0], J, LU, piv, hg_lu, stale1, eta, stats)
        if not batched:
            y1, y_err, f1, code = y1[0], y_err[0], f1[0], code[0]
        return y1, y_err, (t0, t1, y0, y1, f0, f1), state1, code

    def _auto_jacobian(self, term, t0, y0, batched, stats):
        """:func:`jacobian` in this solver's mode; ``"auto"`` falls back to ``"loop"`` (for the rest
        of the solve) where ``torch.func`` cannot transform the vector field, such as
        BacksolveAdjoint's adjoint field above 16 states, which calls ``torch.autograd.grad``."""
        mode = stats.jac_mode or self.jacobian
        if mode != "auto":
            return jacobian(term, t0, y0, batched, mode)
        try:
            return jacobian(term, t0, y0, batched, mode)
        except RuntimeError as e:
            if "functorch" not in str(e) and "torch.func" not in str(e) and "vmap" not in str(e):
                raise
            stats.jac_mode = "loop"
            return jacobian(term, t0, y0, batched, "loop")

    def _refresh(self, term, t0, y0, t0_row, hg, J, LU, piv, hg_lu, need_jac, stats):
        """A fresh Jacobian at ``(t0, y0)`` on the rows in ``need_jac`` (reusing one already computed
        at this ``t0``), and the LU of ``I - h gamma J`` where J changed or ``h gamma`` moved by
        more than 30 %. Returns ``(J, LU, piv, hg_lu, singular)``."""
        batched = getattr(term, "batched", False)
        if bool(need_jac.any()):
            have = stats.jac_t == t0_row
            if stats.jac is not None and bool((have | ~need_jac).all()):
                Jn = stats.jac
            else:
                if self.jac is not None:
                    Jn = user_jacobian(self.jac, term, t0, y0, batched)
                else:
                    Jn = self._auto_jacobian(term, t0, y0, batched, stats)
                    Jn = Jn if batched else Jn.unsqueeze(0)
                stats.jacobians += 1
                stats.jac = Jn
                stats.jac_t = t0_row
            J = _where(need_jac, Jn, J)
        hg_row = hg.squeeze(-1)
        ratio = hg_row / hg_lu
        need_lu = need_jac | ~torch.isfinite(ratio) | ((ratio - 1).abs() > _REFACTOR)
        singular = torch.zeros_like(need_jac)
        if bool(need_lu.any()):
            eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
            LUn, pivn, info = torch.linalg.lu_factor_ex(eye - hg.unsqueeze(-1) * J)
            stats.factorizations += 1
            LU = _where(need_lu, LUn, LU)
            piv = _where(need_lu, pivn, piv)
            hg_lu = torch.where(need_lu, hg_row, hg_lu)
            singular = need_lu & (info != 0)
        return J, LU, piv, hg_lu, singular

    def _stages(self, F, t0, h, dt, yb, f0b, hg, LU, piv, eta, active, coef, stats):
        """The implicit stages on the rows in ``active``. Returns ``(ks, failed, theta_max, eta)``."""
        tab = self.tableau
        rtol, atol = self._tols(yb.dtype)
        ks = [f0b]
        failed = torch.zeros_like(active)
        theta_max = torch.zeros_like(eta)
        hg_safe = torch.where(hg == 0, torch.ones_like(hg), hg)  # finished samples (h = 0): k = 0
        shared = isinstance(dt, float)
        for i in range(1, tab.num_stages):
            psi = _lincomb(yb, dt, ks, coef["a"][i], coef["a_f"][i])
            z0 = psi + hg * ks[-1]  # predictor: the previous stage's slope
            ti = _node(t0, h, float(tab.c[i]))
            if shared:
                z, bad, theta, eta = self._newton_shared(
                    F, ti, psi, z0, hg, LU, piv, eta, active & ~failed, rtol, atol, stats
                )
            else:
                z, bad, theta, eta = self._newton(F, ti, psi, z0, hg, LU, piv, eta, active & ~failed, rtol, atol, stats)
            failed = failed | bad
            theta_max = torch.maximum(theta_max, theta)
            ks.append((z - psi) / hg_safe)
        return ks, failed, theta_max, eta

    def _adj_tol(self, dtype) -> float:
        """Relative tolerance of the adjoint stage solve (see the module docstring)."""
        rtol = _NEWTON_RTOL if self.newton_rtol is None else self.newton_rtol
        return max(100 * torch.finfo(dtype).eps, min(1e-10, 1e-3 * rtol))

    def _newton(self, F, t, psi, z, hg, LU, piv, eta, active, rtol, atol, stats):
        """Simplified Newton for ``z = psi + hg f(t, z)`` on the rows in ``active``.

        Returns ``(z, failed, theta, eta)``: the solution (rows that fail keep their last finite
        iterate), the rows that failed, the largest contraction rate seen and the last eta. The
        iterations record no graph; when autograd records, the converged rows' derivative is
        attached by the implicit function theorem (:func:`_stage_ift`)."""
        if not bool(active.any()):
            return z, torch.zeros_like(active), torch.zeros_like(eta), eta
        record = torch.is_grad_enabled() and (psi.requires_grad or _requires_grad(hg) or _requires_grad(t))
        probe = torch.is_grad_enabled() and not record
        z = z.detach()
        done = ~active
        failed = torch.zeros_like(active)
        theta_max = torch.zeros_like(eta)
        eps = torch.finfo(z.dtype).eps
        eta_it = eta.clamp(min=_ETA_FLOOR) ** 0.8
        nrm_old = None
        theta = torch.zeros_like(eta)
        M = self.max_iters
        with torch.no_grad():
            psi_ = psi.detach()
            hg_ = hg.detach()
            for m in range(M):
                run = ~done
                stats.iterations += run.long()
                if probe and m == 0:  # does f reach a tensor that needs a gradient? (same evaluation)
                    fz, record = _probe_eval(F, t, z)
                else:
                    fz = F(t, z)
                r = psi_ + hg_ * fz - z
                dz = torch.linalg.lu_solve(LU, piv, r.unsqueeze(-1)).squeeze(-1)
                scale = atol + rtol * z.abs()
                nrm = torch.linalg.vector_norm(dz / scale, dim=-1) / math.sqrt(max(z.shape[-1], 1))
                nrm = torch.nan_to_num(nrm, nan=math.inf)
                bad = ~torch.isfinite(nrm)
                if m > 0:
                    th = nrm / nrm_old.clamp(min=1e-300)
                    # Hairer & Wanner: the geometric mean of the last two rates after the second
                    theta = th if m == 1 else torch.sqrt(th * theta)
                    eta_it = theta / (1 - theta).clamp(min=eps)
                    # the error predicted after the iterations left is still too large
                    slow = eta_it * theta ** (M - 1 - m) * nrm > 1
                    bad = bad | (theta >= 0.99) | slow
                    theta_max = torch.where(run, torch.maximum(theta_max, theta.nan_to_num(1.0)), theta_max)
                bad = bad & run
                conv = run & ~bad & (eta_it * nrm <= 1)
                upd = run & ~bad
                z = _where(upd, z + dz, z)
                eta = torch.where(conv, eta_it, eta)
                failed = failed | bad
                done = done | conv | bad
                if not bool((~done).any()):
                    break
                nrm_old = torch.where(run, nrm, torch.ones_like(nrm))
        failed = failed | ~done  # not converged in max_iters
        ok = active & ~failed
        if record and bool(ok.any()):
            z = _stage_ift(F, t, psi, z, hg, LU, piv, ok, self._adj_tol(z.dtype))
        theta_max = torch.where(failed, torch.ones_like(theta_max), theta_max)
        return z, failed, theta_max, eta

    def _newton_shared(self, F, t, psi, z, hg, LU, piv, eta, active, rtol, atol, stats):
        """:meth:`_newton` for shared mode (one system): the same iteration and tests, with the
        convergence control on Python floats (one host sync per iteration, as the batched version
        has too) instead of a dozen small tensor ops."""
        fail = torch.ones(1, dtype=torch.bool, device=z.device)
        if not bool(active[0]):
            return z, ~fail, torch.zeros_like(eta), eta
        record = torch.is_grad_enabled() and (psi.requires_grad or _requires_grad(hg) or _requires_grad(t))
        probe = torch.is_grad_enabled() and not record
        eps = torch.finfo(z.dtype).eps
        e = float(eta[0])
        eta_it = max(e, _ETA_FLOOR) ** 0.8
        theta = theta_max = 0.0
        nrm_old = 1.0
        M = self.max_iters
        hgf = float(hg[0, 0])
        inv_sqrt_n = 1.0 / math.sqrt(max(z.shape[-1], 1))
        z = z.detach()
        with torch.no_grad():
            psi_ = psi.detach()
            for m in range(M):
                stats.iterations += 1
                if probe and m == 0:  # does f reach a tensor that needs a gradient? (same evaluation)
                    fz, record = _probe_eval(F, t, z)
                else:
                    fz = F(t, z)
                r = torch.add(psi_, fz, alpha=hgf) - z
                dz = torch.linalg.lu_solve(LU, piv, r.unsqueeze(-1)).squeeze(-1)
                scale = torch.add(z.abs(), atol / rtol).mul_(rtol)
                nrm = float(torch.linalg.vector_norm(dz / scale)) * inv_sqrt_n
                if not math.isfinite(nrm):
                    break
                if m > 0:
                    th = nrm / max(nrm_old, 1e-300)
                    theta = th if m == 1 else math.sqrt(th * theta)
                    theta_max = max(theta_max, theta)
                    if theta >= 0.99:
                        break
                    eta_it = theta / max(1 - theta, eps)
                    if eta_it * theta ** (M - 1 - m) * nrm > 1:
                        break
                z = z + dz
                if eta_it * nrm <= 1:
                    if record:
                        with torch.enable_grad():
                            z = _stage_ift(F, t, psi, z, hg, LU, piv, fail, self._adj_tol(z.dtype))  # fail: all True
                    kw = dict(dtype=eta.dtype, device=eta.device)
                    return z, ~fail, torch.full((1,), theta_max, **kw), torch.full((1,), eta_it, **kw)
                nrm_old = nrm
        return z, fail, torch.ones_like(eta), eta

    def dense_coeffs(self, term, dense_info):
        t0, t1, y0, y1, f0, f1 = dense_info
        h = t1 - t0
        dt = h if isinstance(h, float) else h.to(y0.dtype).unsqueeze(-1)
        return hermite_coeffs(y0, y1, f0, f1, dt)
