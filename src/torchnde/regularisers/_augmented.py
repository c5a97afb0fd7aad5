r"""Integral regularisers as augmented-state ODE terms: kinetic energy, Jacobian Frobenius norm and
Taylor-mode (TayNODE, ``K = 2``), so one :func:`~torchnde.solve` returns the state and the
regularisers together.

* Finlay, Jacobsen, Nurbekyan & Oberman, "How to train your neural ODE: the world of Jacobian and
  kinetic regularization", ICML 2020 (RNODE): :math:`\int \|f\|^2 dt` and
  :math:`\int \|\partial f / \partial y\|_F^2 dt`, the latter with Hutchinson's estimator
  :math:`\|\varepsilon^\top \partial f/\partial y\|^2`, :math:`E[\varepsilon\varepsilon^\top] = I`.
* Kelly, Bettencourt, Johnson & Duvenaud, "Learning differential equations that are easy to
  solve", NeurIPS 2020 (TayNODE): :math:`\int \|d^K y / dt^K\|^2 dt`; for ``K = 2``,
  :math:`\ddot y = (\partial f/\partial y) f + \partial f/\partial t`, one Jacobian-vector product
  (``torch.func.jvp``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._terms import ODETerm
from .._tree import _structure, _unflatten_structure, tree_leaves, tree_map

__all__ = ["RegularisedTerm", "probe_like", "REGULARISERS"]

#: the names of the integrals :class:`RegularisedTerm` can add, in the order they are stored
REGULARISERS = ("kinetic", "jacobian_frobenius", "taylor2")
_PROBES = ("gaussian", "rademacher")


def probe_like(y, kind: str = "gaussian", *, seed: int | None = None, generator: torch.Generator | None = None):
    """Hutchinson probe vectors shaped like ``y`` (a tensor or tree): standard normal or Rademacher
    (±1) entries, so :math:`E[\\varepsilon\\varepsilon^\\top] = I`. Draw new ones for every
    training iteration (``seed=iteration``) and keep them fixed during a solve."""
    if kind not in _PROBES:
        raise ValueError(f"kind must be one of {_PROBES}, got {kind!r}")
    if generator is not None and seed is not None:
        raise ValueError("pass either seed or generator, not both")
    leaves = tree_leaves(y)
    if not leaves or not all(isinstance(x, torch.Tensor) for x in leaves):
        raise TypeError("probe_like needs a tensor or a tree of tensors")
    if generator is None and seed is not None:
        generator = torch.Generator(device=leaves[0].device).manual_seed(int(seed))

    def draw(x):
        if kind == "gaussian":
            return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        bits = torch.randint(0, 2, x.shape, generator=generator, device=x.device)
        return (2 * bits - 1).to(x.dtype)

    return tree_map(draw, y)


def _sq(x: torch.Tensor, batch: bool) -> torch.Tensor:
    """``|x|^2`` summed over every dimension (``batch``: but the first)."""
    x2 = (x.abs() if x.is_complex() else x).pow(2)
    if not batch:
        return x2.sum()
    return x2.reshape(x2.shape[0], math.prod(x2.shape[1:])).sum(-1)


def _sum_sq(tree, batch: bool) -> torch.Tensor:
    out = None
    for leaf in tree_leaves(tree):
        s = _sq(leaf, batch)
        out = s if out is None else out + s
    return out


class RegularisedTerm:
    r"""An ODE term whose state also integrates regularisers: ``(y, {name: r})`` with
    :math:`\dot r = q(t, y)`.

    Build it from the model's ``ODETerm``, solve ``reg.term`` from ``reg.init(y0)``, and split the
    result with ``reg.split``::

        reg = RegularisedTerm(tn.ODETerm(f), kinetic=True, taylor2=True)
        sol = tn.solve(reg.term, tn.Dopri5(), 0.0, 1.0, reg.init(y0), controller=...)
        y1, r = reg.split(sol.ys)          # r["kinetic"], r["taylor2"]: shape (T,) (or (T, B))
        loss = task_loss(y1[-1]) + 0.01 * r["kinetic"][-1] + 0.01 * r["taylor2"][-1]

    The integrands (each summed over the state; with ``batch=True`` over every dimension but the
    first, giving one value per sample):

    * ``kinetic``: :math:`\|f\|^2` (Finlay et al. 2020).
    * ``jacobian_frobenius``: :math:`\|\partial f/\partial y\|_F^2` -- with ``probe`` a tree like
      ``y`` (see :func:`probe_like`) Hutchinson's unbiased estimate
      :math:`\|\varepsilon^\top \partial f/\partial y\|^2` (one vector-Jacobian product); with
      ``probe="exact"`` the exact norm, one vector-Jacobian product per state element (small
      states; with ``batch=True`` the rows of different samples must not interact). Finlay et al.
      2020.
    * ``taylor2``: :math:`\|d^2y/dt^2\|^2` with :math:`\ddot y = (\partial f/\partial y) f +
      \partial f/\partial t` from one ``torch.func.jvp`` (TayNODE with ``K = 2``, Kelly et al.
      2020). The vector field must be one ``torch.func`` can transform (no in-place updates of
      captured tensors, no ``.item()``), and must use ``t`` through torch operations (a term with
      ``time_as_float=True`` is refused: its ``∂f/∂t`` would be lost).

    The derivatives keep their graph when gradients are enabled (``create_graph``), so every
    adjoint differentiates the regularisers (``DirectAdjoint``, ``CheckpointAdjoint``,
    ``BacksolveAdjoint``, ``ReversibleAdjoint``); ``BacksolveAdjoint`` then differentiates the
    regularisers' integrands once more (a second-order derivative of ``f``).

    The integrals run over the solve's time, :math:`\int_{t_0}^{t_1} q\,dt`: negative when
    ``t1 < t0`` (use ``.abs()``). They are part of the state, so an adaptive controller also
    controls their error: with ``PIDController`` they may take a few more steps than the plain
    solve (weight them out with the controller's ``norm=`` if that matters).

    Args:
        term: the model's ``ODETerm``.
        kinetic, jacobian_frobenius, taylor2: which integrals to add (at least one).
        probe: for ``jacobian_frobenius``: a tree like ``y`` of fixed probe vectors
            (:func:`probe_like`), or ``"exact"``.
        batch: keep the leading dimension of the state as a batch: each integral has shape
            ``(B,)`` (needed with ``solve(..., per_sample=True)``); otherwise they are scalars.
    """

    def __init__(
        self,
        term: ODETerm,
        *,
        kinetic: bool = False,
        jacobian_frobenius: bool = False,
        taylor2: bool = False,
        probe: Any = None,
        batch: bool = False,
    ):
        if not isinstance(term, ODETerm):
            raise TypeError(
                f"RegularisedTerm wraps an ODETerm(f); got {term!r}. (SDE and CDE terms are not supported: "
                "their integrands would need the control)"
            )
        self.names = tuple(n for n, on in zip(REGULARISERS, (kinetic, jacobian_frobenius, taylor2)) if on)
        if not self.names:
            raise ValueError(
                "RegularisedTerm needs at least one of kinetic=True, jacobian_frobenius=True, taylor2=True"
            )
        if jacobian_frobenius:
            if probe is None:
                raise ValueError(
                    "jacobian_frobenius=True needs probe=...: a tree like y0 of Hutchinson probes "
                    "(probe_like(y0, seed=...)), or probe='exact' for the exact norm (small states)"
                )
            if isinstance(probe, str) and probe != "exact":
                raise ValueError(f"probe must be a tree of tensors like y0 or 'exact', got {probe!r}")
        elif probe is not None:
            raise ValueError("probe=... is only used with jacobian_frobenius=True")
        if taylor2 and term.time_as_float:
            raise ValueError(
                "taylor2=True needs df/dt, which a term with time_as_float=True cannot give (t is a Python "
                "float); build the ODETerm without time_as_float"
            )
        self.inner = term
        self.probe = probe
        self.batch = bool(batch)
        self.term = ODETerm(self._field, time_as_float=term.time_as_float)

    def __repr__(self):
        return f"RegularisedTerm({self.inner!r}, {', '.join(self.names)})"

    # ----------------------------------------------------------------------------------------

    def init(self, y0):
        """The augmented initial state ``(y0, {name: 0})``."""
        leaves = tree_leaves(y0)
        if not leaves or not all(isinstance(x, torch.Tensor) for x in leaves):
            raise TypeError("RegularisedTerm.init needs y0 as a tensor or a tree of tensors")
        x = leaves[0]
        if self.batch:
            if x.dim() == 0:
                raise ValueError("batch=True needs y0 with a leading batch dimension")
            shape: tuple = (x.shape[0],)
        else:
            shape = ()
        zero = torch.zeros(shape, dtype=x.dtype, device=x.device)
        return (y0, {n: zero.clone() for n in self.names})

    def split(self, ys):
        """``(y, {name: r})`` from an augmented state or a solution's ``ys`` (real parts of the
        integrals for a complex state)."""
        if not (isinstance(ys, tuple) and len(ys) == 2 and isinstance(ys[1], dict)):
            raise TypeError("RegularisedTerm.split expects the augmented state (y, {name: r}) that the solve returns")
        y, regs = ys
        return y, {n: (r.real if r.is_complex() else r) for n, r in regs.items()}

    # ----------------------------------------------------------------------------------------

    def _field(self, t, state, args):
        if not (isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict)):
            raise TypeError(
                "the RegularisedTerm's vector field got a state that is not (y, {name: r}); solve from reg.init(y0)"
            )
        y = state[0]
        field = self.inner.vector_field
        outer = torch.is_grad_enabled()
        need_vjp = "jacobian_frobenius" in self.names
        out: dict = {}
        if "taylor2" in self.names:
            f, ydd = self._taylor(field, t, y, args)
        else:
            f, ydd = None, None
        if need_vjp:
            with torch.enable_grad():
                leaves = tree_leaves(y)
                yg = [x if x.requires_grad else x.detach().requires_grad_() for x in leaves]
                ytree = _unflatten_structure(_structure(y), yg)
                fg = field(t, ytree, args)
                out["jacobian_frobenius"] = self._frobenius(fg, yg, outer)
            if f is None:
                f = fg
        if f is None:
            f = field(t, y, args)
        if "kinetic" in self.names:
            out["kinetic"] = _sum_sq(f, self.batch)
        if ydd is not None:
            out["taylor2"] = _sum_sq(ydd, self.batch)
        if not outer:
            out = {k: v.detach() for k, v in out.items()}
        # store in the state's dtype (a complex state keeps real values in a complex leaf)
        like = tree_leaves(f)[0]
        regs = {n: out[n].to(like.dtype) for n in self.names}
        return (f, regs)

    def _frobenius(self, f, yg: list, outer: bool) -> torch.Tensor:
        fl = tree_leaves(f)
        if not any(x.requires_grad for x in fl):  # f does not depend on y
            x = yg[0]
            return torch.zeros((x.shape[0],) if self.batch else (), dtype=x.real.dtype, device=x.device)
        if isinstance(self.probe, str):  # exact: one vector-Jacobian product per state element (per sample)
            return self._frobenius_exact(fl, yg, outer)
        eps = tree_leaves(self.probe)
        if len(eps) != len(fl) or any(e.shape != x.shape for e, x in zip(eps, fl)):
            raise ValueError(
                f"the probe has shapes {[tuple(e.shape) for e in eps]} but the state has "
                f"{[tuple(x.shape) for x in fl]}; draw it with probe_like(y0, ...) (per solve, the same shape as y0)"
            )
        grads = torch.autograd.grad(fl, yg, grad_outputs=eps, create_graph=outer, allow_unused=True)
        total = None
        for g, x in zip(grads, yg):
            s = _sq(torch.zeros_like(x) if g is None else g, self.batch)
            total = s if total is None else total + s
        return total

    def _frobenius_exact(self, fl: list, yg: list, outer: bool) -> torch.Tensor:
        rows = [x.reshape(x.shape[0], -1) if self.batch else x.reshape(1, -1) for x in fl]
        total = None
        for r in rows:
            for i in range(r.shape[1]):
                grads = torch.autograd.grad(r[:, i].sum(), yg, create_graph=outer, retain_graph=True, allow_unused=True)
                for g, x in zip(grads, yg):
                    s = _sq(torch.zeros_like(x) if g is None else g, self.batch)
                    total = s if total is None else total + s
        return total

    def _taylor(self, field, t, y, args):
        """``f`` and ``d^2y/dt^2 = (df/dy) f + df/dt`` by one forward-mode product."""
        if not isinstance(t, torch.Tensor):  # pragma: no cover - refused in __init__
            raise TypeError("taylor2 needs t as a tensor")
        f = field(t, y, args)
        leaves = tree_leaves(y)
        structure = _structure(y)

        def g(tt, *ys):
            return tuple(tree_leaves(field(tt, _unflatten_structure(structure, list(ys)), args)))

        tangents = (torch.ones_like(t), *tree_leaves(f))
        _, jv = torch.func.jvp(g, (t, *leaves), tangents)
        ydd = _unflatten_structure(_structure(f), list(jv))
        return f, ydd
