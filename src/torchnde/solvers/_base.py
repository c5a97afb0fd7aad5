"""Solver interfaces and the generic explicit Runge--Kutta step.

How to implement a new solver
-----------------------------
1. Subclass :class:`AbstractSolver` (or :class:`AbstractAdaptiveSolver` if the step returns an
   error estimate) and declare ``order`` (and ``error_order`` for adaptive solvers and
   ``dense_order`` for the accuracy of its dense output).
2. Implement ``init(term, t0, y0) -> state`` and ``step(term, t0, t1, y0, state) -> (y1, y_error,
   dense_info, state, result)``. ``term.vf(t, y)`` evaluates the vector field on the flat state.
   ``t0``/``t1`` are Python floats, or ``(batch,)`` tensors in per-sample mode. Anything carried
   between steps lives in ``state``, never on ``self``, so solves are re-entrant.
3. Implement ``dense_coeffs(term, dense_info)``: polynomial coefficients ``C`` (shape ``(P, N)`` or
   ``(B, P, N)``) with ``y(t0 + theta (t1 - t0)) = y0 + sum_p C[p] theta^(p+1)``.
4. For an explicit Runge--Kutta method all of this is done by :class:`AbstractERK`: write the
   :class:`~torchnde.solvers.ButcherTableau` in a file of its own and add the class to
   ``torchnde.solvers.SOLVERS``; the generic tests then check its tableau, order and dense output.

SDE solvers
-----------
An SDE reaches ``step`` as a term with ``term.rough`` True (``torchnde._flat._FlatSDE``):
``term.vf(t, y)`` is the drift on the flat state, ``term.diffusion(t, y)`` the diffusion in the
user's shapes, ``term.noise(t0, t1)`` / ``term.levy(t0, t1)`` the Brownian increment (and Lévy
areas), ``term.gprod(g, dW)`` their product as a flat increment, and ``term.vf_prod(t, y,
term.contr(t0, t1))`` the whole ``f dt + g dW`` (what Runge--Kutta stages use). Declare
``strong_order`` (by noise class), ``calculus`` and ``levy_area``, add the class to
``torchnde.solvers.SDE_SOLVERS``, and the SDE tests check its strong order on every noise class
it claims.

Speed: a step of a small problem costs about as much per tensor op (views included) as per
element, so the built-in SDE steps fuse what they combine (``torch.add(..., alpha=)`` rather than
arithmetic with Python scalars) and, on a single-tensor state with a shared step, work in the
user's shape: ``term.tree(y)`` views the flat state once, ``term.vf_prod_tree``,
``term.vf_tree``, ``term.diffusion_tree``, ``term.gprod_tree`` and ``term.drift_tree`` evaluate
there, and ``term.state(inc)`` flattens the result once. ``term.need_error`` is False when the
loop ignores error estimates (then skip computing one).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ._tableau import ButcherTableau

__all__ = [
    "AbstractSolver",
    "AbstractAdaptiveSolver",
    "AbstractERK",
    "AbstractAdaptiveERK",
    "LazyDerivative",
    "linear_coeffs",
]


class AbstractSolver:
    """One step of a numerical method. Concrete solvers are stateless, hashable policy objects."""

    order: ClassVar[int | None]  # as an ODE solver; None for solvers of SDEs only
    dense_order: ClassVar[int]
    #: SDEs: the strong order by the most general noise class the solver handles at it, among
    #: "general", "commutative" (includes diagonal and scalar noise) and "additive"; empty for
    #: solvers of ODEs only.
    strong_order: ClassVar[dict] = {}
    #: SDEs: "ito" or "stratonovich" (the calculus whose solution the solver converges to).
    calculus: ClassVar[str | None] = None
    #: SDEs: the Lévy area the solver needs from the Brownian path (None, "space-time" or
    #: "space-time-time").
    levy_area: ClassVar[str | None] = None

    @classmethod
    def strong_order_for(cls, noise_class: str) -> float | None:
        """The strong order on SDEs with noise of this class (``None`` if the solver does not apply):
        additive noise is also commutative, commutative noise also general."""
        chain = ("additive", "commutative", "general")
        for c in chain[chain.index(noise_class) :]:
            if c in cls.strong_order:
                return cls.strong_order[c]
        return None

    def init(self, term, t0, y0: torch.Tensor) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def step(self, term, t0, t1, y0: torch.Tensor, state: Any):  # pragma: no cover - interface
        raise NotImplementedError

    def dense_coeffs(self, term, dense_info) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def initial_derivative(self, state) -> torch.Tensor | None:
        """The derivative at the start of the solve if the solver's state holds it (it saves the
        automatic initial step an evaluation), else ``None``."""
        return None

    def __repr__(self):
        return f"{type(self).__name__}()"

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))


class AbstractAdaptiveSolver(AbstractSolver):
    """A solver whose step returns an embedded error estimate, so it can adapt its step size."""

    error_order: ClassVar[int]


# Below this many elements one stacked matrix-vector product is cheaper than a chain of axpy
# ops; above it the chain wins because stacking copies every stage again (measured on CPU).
_STACK_MAX_NUMEL = 4096


def _lincomb(base, scale, ks: list, ct: torch.Tensor, cf: tuple):
    """``base + scale * sum_j cf[j] * ks[j]`` (``base`` may be ``None``).

    ``ct`` and ``cf`` are the same coefficients as a tensor and as Python floats. ``scale`` is a
    float (one step size) or a ``(batch, 1)`` tensor (per-sample).
    """
    scalar = isinstance(scale, float)
    if len(ks) == 1 and cf[0] == 1.0 and base is not None:  # e.g. Euler: one fused op, same result
        return torch.add(base, ks[0], alpha=scale) if scalar else torch.addcmul(base, scale, ks[0])
    if len(ks) > 1 and ks[0].numel() <= _STACK_MAX_NUMEL:
        # the coefficients are shared by the whole (flattened) state, per sample or not; the
        # increment is summed first and added to the state once (float32 precision)
        comb = torch.mv(torch.stack(ks).view(len(ks), -1).t(), ct).view_as(ks[0])
    else:
        terms = [(k, c) for k, c in zip(ks, cf) if c != 0.0]
        if not terms:
            return torch.zeros_like(ks[0]) if base is None else base.clone()
        # sum the stages first and add the increment to the state once: adding each small term
        # to the (larger) state separately loses precision in float32
        k0, c0 = terms[0]
        comb = torch.mul(k0, c0)
        for k, c in terms[1:]:
            comb.add_(k, alpha=c)
    if scalar:
        return comb * scale if base is None else torch.add(base, comb, alpha=scale)
    return comb * scale if base is None else torch.addcmul(base, scale, comb)


def _sde_comb(base, ks: list, ct: torch.Tensor, cf: tuple):
    """``base + sum_j cf[j] * ks[j]`` (``base`` may be ``None``) for an SDE step, whose stages are
    already increments (no step-size scale). Zero coefficients are skipped, and the combinations
    of the two-stage methods (Heun, midpoint) take at most two ops: one stage ``base + c k``, two
    stages with equal or opposite weights ``base + c (k_0 +- k_1)`` (the stages summed before the
    state, as :func:`_lincomb` does); anything else is :func:`_lincomb`."""
    nz = [(k, c) for k, c in zip(ks, cf) if c != 0.0]
    if len(nz) == 1:
        k, c = nz[0]
        if base is None:
            return k if c == 1.0 else k * c
        return torch.add(base, k, alpha=c)
    if len(nz) == 2:
        (k0, c0), (k1, c1) = nz
        if c0 == c1 or c0 == -c1:
            comb = k0 + k1 if c0 == c1 else k1 - k0
            if base is not None:
                return torch.add(base, comb, alpha=c1)
            return comb if c1 == 1.0 else comb.mul_(c1)
    return _lincomb(base, 1.0, ks, ct, cf)


_is_compiling = torch.compiler.is_compiling
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _node(t0, h, c: float):
    """The stage time ``t0 + c h`` (one fused op for per-sample time tensors)."""
    return t0 + c * h if isinstance(h, float) else torch.add(t0, h, alpha=c)


class LazyDerivative:
    """The vector field at ``(t, y)``, evaluated on first use and then kept.

    What a non-FSAL Runge--Kutta method carries between steps in shared-time mode: the next step
    evaluates it as its first stage, dense output evaluates it at the end of the step, and
    whichever comes first pays. So a fixed-step solve costs exactly ``steps * stages``
    evaluations (the derivative at the end of the last step is only made if dense output asks
    for it), and a rejected adaptive step keeps its first stage for the retry.
    """

    __slots__ = ("term", "t", "y", "f")

    def __init__(self, term, t, y):
        self.term, self.t, self.y, self.f = term, t, y, None

    def get(self) -> torch.Tensor:
        if self.f is None:
            self.f = self.term.vf(self.t, self.y)
        return self.f


def _resolve(f):
    return f.get() if isinstance(f, LazyDerivative) else f


def _dt_column(t0, t1):
    dt = t1 - t0
    return dt if isinstance(dt, float) else dt.unsqueeze(-1)


class AbstractERK(AbstractSolver):
    """An explicit Runge--Kutta method defined by its :class:`ButcherTableau`.

    FSAL tableaus reuse their last stage as the next step's first (one evaluation at the start,
    then ``s - 1`` a step); others carry the derivative at the end of the step as a
    :class:`LazyDerivative` (evaluated by the next step or by dense output, whichever needs it
    first), so a fixed-step solve costs exactly ``s`` evaluations a step. Per-sample solves
    evaluate it eagerly (their state is a tensor selected per sample). Dense output uses the
    method's own interpolant where the tableau has one, cubic Hermite otherwise.
    """

    tableau: ClassVar[ButcherTableau]

    def init(self, term, t0, y0):
        if term.rough:
            return None
        if self.tableau.fsal or getattr(term, "batched", True):
            return term.vf(t0, y0)
        return LazyDerivative(term, t0, y0)

    def initial_derivative(self, state):
        return state.f if isinstance(state, LazyDerivative) else state

    def _sde_step(self, term, t0, t1, y0):
        """The method on an SDE: every stage is an increment ``f dt + g dW`` over the whole step
        (the same Brownian increment at every stage), so methods with more than one stage converge
        to the Stratonovich solution and Euler to the Itô one. No FSAL reuse (the next step has a
        new increment); dense output is linear."""
        tab = self.tableau
        coef = tab.tensors(y0.dtype, y0.device)
        control = term.contr(t0, t1)
        h = t1 - t0
        # a single-tensor state: the stages in the user's shape (one view of the state per step,
        # not one per stage), the results flattened once
        single = term.flat.single and not getattr(term, "custom", True)
        x0 = term.tree(y0) if single else y0
        vf_prod = term.vf_prod_tree if single else term.vf_prod
        ks = [vf_prod(t0, x0, control)]
        a_t, a_f, c = coef["a"], coef["a_f"], coef["c"]
        for i in range(1, tab.num_stages):
            xi = _sde_comb(x0, ks, a_t[i], a_f[i])
            ks.append(vf_prod(_node(t0, h, c[i]), xi, control))
        # Euler-Maruyama: y0 + (f dt + g dW), one op
        if tab.num_stages == 1:
            y1 = y0 + (term.state(ks[0]) if single else ks[0])
        else:
            y1 = _sde_comb(x0, ks, coef["b"], coef["b_f"])
            y1 = term.state(y1) if single else y1
        y_error = None
        if coef["b_error"] is not None and term.need_error:
            y_error = _sde_comb(None, ks, coef["b_error"], coef["b_error_f"])
            y_error = term.state(y_error) if single else y_error
        return y1, y_error, (y0, y1), None, None

    def _stages(self, term, t0, h, dt, y0, f0, coef, n: int):
        """Stages ``k_1 = f0, ..., k_n`` and the state the last one was evaluated at."""
        ks = [f0]
        yi = y0
        a_t, a_f, c = coef["a"], coef["a_f"], coef["c"]
        for i in range(1, n):
            yi = _lincomb(y0, dt, ks, a_t[i], a_f[i])
            ks.append(term.vf(_node(t0, h, c[i]), yi))
        return ks, yi

    def step(self, term, t0, t1, y0, f0):
        if term.rough:
            return self._sde_step(term, t0, t1, y0)
        f0 = _resolve(f0)
        tab = self.tableau
        coef = tab.tensors(y0.dtype, y0.device)
        scratch = getattr(term, "scratch", None)
        if (
            scratch is not None and type(t0) is float and tab.num_stages > 2 and y0.dim() == 1
            and y0.shape[0] <= _STACK_MAX_NUMEL and not torch.is_grad_enabled() and not _is_compiling()
            and not _is_wrapped(y0)
        ):  # fmt: skip
            return self._step_buffered(term, t0, t1, y0, f0, coef, scratch)
        dt = _dt_column(t0, t1)
        ks, yi = self._stages(term, t0, t1 - t0, dt, y0, f0, coef, tab.num_stages)
        if tab.fsal:
            y1, f1 = yi, ks[-1]
        else:
            y1 = _lincomb(y0, dt, ks, coef["b"], coef["b_f"])
            f1 = term.vf(t1, y1) if getattr(term, "batched", True) else LazyDerivative(term, t1, y1)
        y_error = None
        if coef["b_error"] is not None:
            y_error = _lincomb(None, dt, ks, coef["b_error"], coef["b_error_f"])
        return y1, y_error, (t0, t1, y0, y1, f0, f1, ks), f1, None

    def _step_buffered(self, term, t0, t1, y0, f0, coef, scratch):
        """:meth:`step` with one step size, without autograd, on a small flat state (the checks
        are in :meth:`step`). The stages are copied into one ``(s, N)`` buffer as they are made,
        kept by the term for the whole solve (``term.scratch``; nothing of it outlives a step:
        the step returns the stages themselves), and the combination of stage ``i`` is one
        matrix-vector product with the first ``i`` rows of that buffer: a copy per stage instead
        of stacking all earlier stages again, and the same products as :func:`_lincomb`'s (the
        same ``(N, i)`` matrix layout, the same sums in the same order), so the same values."""
        tab = self.tableau
        n = y0.shape[0]
        key = (tab, n)
        buf = scratch.get(key)
        if buf is None:
            if len(scratch) >= 8:  # (tableaus made on the fly: the kept buffers stay bounded)
                scratch.clear()
            K = y0.new_zeros(tab.num_stages, n)
            # the rows (copy targets) and, per stage, the transposed block of the rows before it
            # and zeros, to scale the error estimate by h with an add (cheaper than a multiplication
            # by a Python float, the same value); the products go to ``tmp`` (no allocation)
            KT = K.t()
            blocks = [None] + [KT[:, :i] for i in range(1, tab.num_stages)]
            zero_tmp = y0.new_zeros(2, n)
            tmp = zero_tmp[1]
            direct = getattr(term, "direct", None)
            # (the last step's end as returned and in the user's shape: the next step starts there)
            user = None if direct is None else (tmp.view(direct[1]), K.view(-1, *direct[1]).unbind(0), [None, None])
            buf = scratch[key] = (K.unbind(0), blocks, KT, zero_tmp[0], tmp, user)
        rows, blocks, KT, zero, tmp, user = buf
        h = t1 - t0
        rows[0].copy_(f0)
        ks = [f0]
        a, c, mv, add = coef["a"], coef["c"], torch.mv, torch.add
        yi = y0
        direct = getattr(term, "direct", None)
        if direct is None or user is None:
            vf = term.vf
            for i in range(1, len(rows)):
                yi = add(y0, mv(blocks[i], a[i], out=tmp), alpha=h)
                k = vf(t0 + c[i] * h, yi)
                rows[i].copy_(k)
                ks.append(k)
        else:  # the user's function called directly (what term.vf does; see _FlatTerm.direct)
            f, shape, state_shape, args, table, tnew = direct
            # the stage states made in the user's shape (the same elementwise sums), so that only
            # the last one is viewed back as a flat state; when nothing reads the stages after
            # the step (term.need_dense False) they stay in the user's shape too, copied into
            # the buffer through its rows in that shape, and only the last one (the next step's
            # first stage, FSAL) is flattened
            tmp_user, rows_user, last = user
            flat_ks = term.need_dense
            y0_user = last[1] if last[0] is y0 else y0.view(shape)
            for i in range(1, len(rows)):
                mv(blocks[i], a[i], out=tmp)
                yi = add(y0_user, tmp_user, alpha=h)
                ti = t0 + c[i] * h
                tt = table.get(ti)
                if tt is None or tt._version or tt.requires_grad:
                    tt = tnew(ti)
                k = f(tt, yi, args)
                rows_user[i].copy_(k)
                ks.append(k.reshape(state_shape) if flat_ks else k)
            if not flat_ks:
                ks[-1] = ks[-1].reshape(state_shape)
            term.nfe += len(rows) - 1
            last[1] = yi
            yi = last[0] = yi.view(state_shape)
        if tab.fsal:
            y1, f1 = yi, ks[-1]
        else:
            y1 = add(y0, mv(KT, coef["b"], out=tmp), alpha=h)
            f1 = term.vf(t1, y1) if getattr(term, "batched", True) else LazyDerivative(term, t1, y1)
        y_error = None
        if coef["b_error"] is not None:
            y_error = add(zero, mv(KT, coef["b_error"], out=tmp), alpha=h)
        return y1, y_error, (t0, t1, y0, y1, f0, f1, ks), f1, None

    def increment(self, term, t0, t1, y0, f0, error: bool = False):
        """``y1 - y0`` of one step (no end-point derivative), and the error estimate if asked.

        Used by wrappers that combine steps, such as the reversible scheme of
        :class:`~torchnde.ReversibleAdjoint`.
        """
        tab = self.tableau
        f0 = _resolve(f0)
        coef = tab.tensors(y0.dtype, y0.device)
        dt = _dt_column(t0, t1)
        # an FSAL last stage only feeds the error estimate (its weight in b is zero)
        n = tab.num_stages - 1 if tab.fsal and not error else tab.num_stages
        ks, _ = self._stages(term, t0, t1 - t0, dt, y0, f0, coef, n)
        inc = _lincomb(None, dt, ks, coef["b"][:n], coef["b_f"][:n])
        y_error = _lincomb(None, dt, ks, coef["b_error"], coef["b_error_f"]) if error else None
        return inc, y_error

    def dense_coeffs(self, term, dense_info):
        if len(dense_info) == 2:
            return linear_coeffs(*dense_info)
        t0, t1, y0, y1, f0, f1, ks = dense_info
        f1 = _resolve(f1)
        if len(ks) > 2 and ks[1].shape != y0.shape:  # stages left in the user's shape (need_dense False)
            ks = [k.reshape(y0.shape) for k in ks]
        tab = self.tableau
        coef = tab.tensors(y0.dtype, y0.device)
        dt = _dt_column(t0, t1)
        if coef["dense"] is None:
            return hermite_coeffs(y0, y1, f0, f1, dt)
        K = list(ks) if tab.fsal else [*ks, f1]
        h = t1 - t0
        for (c, _), row_t, row_f in zip(tab.dense_stages, coef["dense_stages"], coef["dense_stages_f"]):
            yi = _lincomb(y0, dt, K, row_t, row_f)
            K.append(term.vf(_node(t0, h, float(c)), yi))
        # C[p] = dt * sum_j dense[j, p] K_j: one (P, n) @ (n, N) product, batched per sample
        C = coef["dense"].t() @ torch.stack(K, -2)
        return C * (dt if isinstance(dt, float) else dt.unsqueeze(-1))


class AbstractAdaptiveERK(AbstractERK, AbstractAdaptiveSolver):
    """An explicit Runge--Kutta pair with an embedded error estimate."""


def linear_coeffs(y0, y1):
    """Linear interpolation on a step (SDE solvers: the path between steps is not smooth)."""
    return (y1 - y0).unsqueeze(-2)


def hermite_coeffs(y0, y1, f0, f1, dt):
    """Cubic Hermite interpolation on a step from values and derivatives at both ends."""
    if not isinstance(dt, float):
        hf0, hf1 = dt * f0, dt * f1
    else:
        hf0, hf1 = f0 * dt, f1 * dt
    dy = y1 - y0
    c2 = 3 * dy - 2 * hf0 - hf1
    c3 = -2 * dy + hf0 + hf1
    return torch.stack([hf0, c2, c3], dim=-2)
