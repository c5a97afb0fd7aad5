"""Events: conditions located on the dense output of accepted steps, terminal or state-resetting,
with gradients of event times and post-event states.

:class:`Event` is the user's description. :class:`_Events` is what the loop (``_loop.py``) asks,
after each decided step, whether an event happened in the accepted part of the step; it works in
the loop's internal (forward) time on the flat state, one row per sample (the shared mode is one
row whose conditions are every element of ``cond``'s output).

Gradients (discretise-then-optimise, through the loop's own graph): with the located time
:math:`\\tau_d` held fixed, the event time is :math:`\\tau = \\tau_d + \\Delta` with

.. math:: \\Delta = -\\frac{g(\\tau_d, y(\\tau_d)) - \\mathrm{sg}[g(\\tau_d, y(\\tau_d))]}{\\mathrm{sg}[\\dot g]},
   \\qquad \\dot g = \\partial_t g + \\partial_y g \\cdot f^-,

which is zero in value and has the implicit-function-theorem derivative
:math:`d\\tau/d\\theta = -(\\partial_\\theta g + \\partial_y g\\, \\partial_\\theta y)/\\dot g`. The state
before the event is :math:`y^- = y(\\tau_d) + f^-\\Delta`, the state after it
:math:`y^+ = r(\\tau, y^-)` and the solve continues from :math:`z = y^+ - f^+\\Delta` at the fixed
time :math:`\\tau_d` (values unchanged), so the gradient of everything after the event carries
the saltation term :math:`(r_y f^- + r_t - f^+)\\,d\\tau/d\\theta` (the sensitivity jump of
discontinuous ODEs, e.g. Hairer, Nørsett & Wanner I.14; Holberg & Salvi 2024 for event SDEs).
Here :math:`f^-` is the slope of the step's dense output at :math:`\\tau_d` (equal to the vector field
up to the interpolation error), so the located time and state are differentiated exactly as they
were computed, and :math:`f^+` is the vector field (an SDE's drift) at the post-event state.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._solution import _horner, _horner_derivative

__all__ = ["Event", "EventRecord"]

#: root-finding iterations at most (Illinois converges in ~10; bisection needs ~55 in float64)
_MAX_ITER = 100
#: halvings of a step searched for the first point past a just-reset surface
_SURFACE_HALVINGS = 12


class Event:
    r"""An event: a time where ``cond(t, y, args)`` crosses zero (or becomes true).

    Pass one, or a list, as ``solve(..., event=...)``. Events are looked for after every
    accepted step, on that step's dense output; the earliest root in the step wins whatever the
    order of the list.

    Args:
        cond: ``cond(t, y, args) -> tensor``. Real-valued: an event is a sign change of an element.
            Boolean: an event is where an element becomes ``True`` (``direction=-1``: ``False``),
            located by bisection; its time is then not differentiable. In the shared mode every
            element of the output is a condition of the one system (the first root of any element
            is the event); with ``per_sample=True`` the output is ``(batch,)`` or ``(batch, m)``
            and each sample has its own events.
        direction: ``+1`` only crossings from negative to positive, ``-1`` from positive to
            negative, ``0`` both.
        terminal: the solve (in per-sample mode: that sample) ends at the event.
        reset: for ``terminal=False``: ``reset(t, y, args, which) -> y_plus`` (the structure of
            ``y``); the solve continues from ``y_plus`` at the event time. ``which`` is the index of
            the element of ``cond`` that fired (a long tensor: 0-d, or ``(batch,)`` per sample;
            the reset is applied only to the samples where this event fired). ``None`` with
            ``terminal=False`` records the event and goes on.
        check_points: also evaluate ``cond`` at this many interior points of every accepted step,
            so that two crossings inside one step (which leave the sign at its ends unchanged)
            are found. Default 0.
        tol: the time tolerance of the located root (default ``10 eps max(1, |t|)`` in the
            dtype of the state).
        name: a label used in messages.
    """

    def __init__(
        self,
        cond: Callable,
        *,
        direction: int = 0,
        terminal: bool = True,
        reset: Callable | None = None,
        check_points: int = 0,
        tol: float | None = None,
        name: str | None = None,
    ):
        if not callable(cond):
            raise TypeError(f"Event(cond) must be a callable cond(t, y, args), got {type(cond).__name__}")
        if direction not in (-1, 0, 1) or isinstance(direction, bool):
            raise ValueError(f"Event(direction=...) must be -1, 0 or +1, got {direction!r}")
        if not isinstance(terminal, bool):
            raise TypeError(f"Event(terminal=...) must be True or False, got {terminal!r}")
        if reset is not None and not callable(reset):
            raise TypeError(f"Event(reset=...) must be a callable reset(t, y, args, which), got {type(reset).__name__}")
        if reset is not None and terminal:
            raise ValueError(
                "Event(reset=...) needs terminal=False: a terminal event ends the solve, a reset continues it"
            )
        if not isinstance(check_points, numbers.Integral) or isinstance(check_points, bool) or check_points < 0:
            raise ValueError(f"Event(check_points=...) must be an int >= 0, got {check_points!r}")
        if tol is not None and not (isinstance(tol, numbers.Real) and math.isfinite(tol) and tol > 0):
            raise ValueError(f"Event(tol=...) must be a positive number or None, got {tol!r}")
        self.cond = cond
        self.direction = int(direction)
        self.terminal = terminal
        self.reset = reset
        self.check_points = int(check_points)
        self.tol = None if tol is None else float(tol)
        self.name = name

    def __repr__(self):
        label = self.name or getattr(self.cond, "__name__", "cond")
        kind = "terminal" if self.terminal else ("reset" if self.reset is not None else "recorded")
        return f"Event({label}, direction={self.direction}, {kind})"


@dataclass
class EventRecord:
    """The events of a solve (``Solution.events``).

    In the shared mode each array has a leading ``(K,)`` dimension, one entry per event in time
    order; in per-sample mode ``(batch, K)``, NaN/-1 padded after each sample's own events.

    Attributes:
        t: event times (differentiable for real-valued conditions).
        event: which :class:`Event` of the list fired (long; -1 padding).
        component: which element of its condition fired (long; -1 padding).
        y_minus: the state just before each event (the structure of ``y0``, leading ``(K,)`` or
            ``(batch, K)``); differentiable.
        y_plus: the state just after it (equal to ``y_minus`` without a reset).
        ties: ``(..., K, n)`` bool over all ``n`` conditions (the elements of every event, in list
            order): every condition whose root lies within the tolerance of the reported one.
        count: number of events (int; per sample a ``(batch,)`` tensor).
        terminated: whether the solve ended at a terminal event (or at ``max_events``).
    """

    t: torch.Tensor
    event: torch.Tensor
    component: torch.Tensor
    y_minus: Any
    y_plus: Any
    ties: torch.Tensor
    count: Any
    terminated: Any


def as_events(event) -> list[Event] | None:
    """``solve``'s ``event=`` argument as a list (``None`` for none), checked."""
    if event is None:
        return None
    events = list(event) if isinstance(event, (list, tuple)) else [event]
    if not events:
        return None
    for e in events:
        if not isinstance(e, Event):
            raise TypeError(
                f"solve(event=...) takes Event(...) objects (or a list of them), got {type(e).__name__}; "
                "wrap a condition as Event(cond, direction=..., terminal=...)"
            )
    return events


@dataclass
class Fired:
    """What an event changes in the accepted step (rows where ``mask``)."""

    mask: torch.Tensor  # (S,) bool
    theta: torch.Tensor  # (S,) the event's place in the step, in [0, 1]
    tau: torch.Tensor  # (S,) located internal time (detached)
    y_minus: torch.Tensor  # (S, N) the state at the event (graph; + f- Delta)
    y_next: torch.Tensor  # (S, N) the state the solve continues from (z) or stops at
    stop: torch.Tensor  # (S,) bool: terminal (or max_events)


class _Events:
    """Event detection, location and bookkeeping for one solve (see the module docstring).

    Rows: ``S`` = the batch in per-sample mode, 1 in the shared mode (``t`` a Python float, ``y``
    ``(N,)``); :meth:`check` takes and returns the loop's own shapes.
    """

    def __init__(self, events, term, flat, args, sign, per_sample, max_events, time_dtype):
        self.events = events
        self.term = term
        self.flat = flat
        self.args = args
        self.sign = sign
        self.per_sample = per_sample
        self.max_events = max_events
        self.time_dtype = time_dtype
        self.eps = torch.finfo(time_dtype).eps
        self.checks = max(e.check_points for e in events)
        self.cols = None  # per condition column: (event index, component, direction, is_bool)

    # ---------------------------------------------------------------------------------------
    # evaluation in the loop's internal time on (S, N) rows

    def _t_user(self, tau):
        """The time the user's functions see: (S,) internal -> 0-d (shared) or (S,) user time."""
        t = tau * self.sign
        return t if self.per_sample else t.reshape(())

    def _tree(self, y):
        return self.flat.state_to_tree(y if self.per_sample else y[0])

    def _g(self, tau, y, event_idx=None):
        """All conditions at internal times ``tau`` (S,), states ``y`` (S, N): (S, M) float, with
        booleans as -1/+1 (and the per-event layout fixed on the first call)."""
        out = []
        layout = []
        S = y.shape[0]
        t = self._t_user(tau)
        tree = self._tree(y)
        for k, e in enumerate(self.events):
            if event_idx is not None and k != event_idx:
                continue
            g = e.cond(t, tree, self.args)
            if not isinstance(g, torch.Tensor):
                g = torch.as_tensor(g, device=y.device)
            if self.per_sample:
                if g.dim() == 0 or g.shape[0] != S or g.dim() > 2:
                    raise ValueError(
                        f"the condition of {e!r} returned shape {tuple(g.shape)}; with per_sample=True it must be "
                        f"(batch,) or (batch, m) with batch = {S}"
                    )
                g = g.reshape(S, -1)
            else:
                g = g.reshape(1, -1)
            is_bool = g.dtype == torch.bool
            if is_bool:
                g = g.to(self.time_dtype) * 2 - 1
            elif g.dtype.is_complex:
                raise TypeError(f"the condition of {e!r} must be real or boolean, got {g.dtype}")
            else:
                g = g.to(self.time_dtype)
            layout.append((k, g.shape[1], is_bool))
            out.append(g)
        if self.cols is None and event_idx is None:
            cols = []
            for k, m, is_bool in layout:
                d = self.events[k].direction
                cols += [(k, j, d, is_bool) for j in range(m)]
            if not cols:
                raise ValueError("the event conditions returned no elements")
            self.cols = cols
            dev = y.device
            self.col_event = torch.tensor([c[0] for c in cols], device=dev)
            self.col_comp = torch.tensor([c[1] for c in cols], device=dev)
            self.col_dir = torch.tensor([c[2] for c in cols], device=dev)
            self.col_bool = torch.tensor([c[3] for c in cols], device=dev)
            self.col_terminal = torch.tensor([self.events[c[0]].terminal for c in cols], device=dev)
        return torch.cat(out, 1)

    def _f(self, tau, y):
        """The vector field (the drift of an SDE) on rows, in internal time."""
        if self.per_sample:
            return self.term.vf(tau, y)
        return self.term.vf(float(tau[0]), y[0]).unsqueeze(0)

    def _gdot(self, tau, y, f, col):
        """d/dt of condition column ``col`` (S,) along ``f`` at (tau, y): ∂t g + ∂y g · f."""
        with torch.enable_grad():
            tl = tau.detach().clone().requires_grad_()
            yl = y.detach().clone().requires_grad_()
            g = self._g(tl, yl).gather(1, col.unsqueeze(1)).squeeze(1)
            if not g.requires_grad:
                return torch.zeros_like(tau)
            gt, gy = torch.autograd.grad(g.sum(), (tl, yl), allow_unused=True)
        out = torch.zeros_like(tau) if gt is None else gt.detach()
        if gy is not None:
            out = out + (gy.detach() * f.detach()).real.sum(-1).to(out.dtype)
        return out

    def _gdot_all(self, tau, y, f):
        """d/dt of every condition (S, M) along ``f``: one Jacobian-vector product (by the
        double-backward identity: the derivative in ``u`` of ``u^T J v`` is ``J v``)."""
        with torch.enable_grad():
            tl = tau.detach().clone().requires_grad_()
            yl = y.detach().clone().requires_grad_()
            g = self._g(tl, yl)
            if not g.requires_grad:
                return torch.zeros_like(g)
            u = torch.zeros_like(g, requires_grad=True)
            gt, gy = torch.autograd.grad(g, (tl, yl), grad_outputs=u, create_graph=True, allow_unused=True)
            parts = [
                x
                for x in (
                    (gt.sum() if gt is not None else None),
                    (gy * f.detach()).real.sum() if gy is not None else None,
                )
                if x is not None
            ]
            if not parts or not any(x.requires_grad for x in parts):
                return torch.zeros_like(g)
            (jv,) = torch.autograd.grad(sum(parts), u, allow_unused=True)
        return torch.zeros_like(g) if jv is None else jv.detach()

    def _start(self, tau, y, g, rows):
        """Signs of the conditions where a solve starts (t0, or just after an event, for ``rows``).

        A condition sitting on its surface (``|g|`` no more than the time tolerance times its
        rate) takes the sign of the side it moves to, so a ball that leaves the ground after a
        bounce is above it, and its next impact is a crossing. Returns (signs, on-surface mask)."""
        s = torch.sign(g)
        small = rows.unsqueeze(1) & (g.abs() <= math.sqrt(self.eps)) & ~self.col_bool
        surface = torch.zeros_like(small)
        if bool(small.any()):
            gd = self._gdot_all(tau, y, self._f(tau, y.detach()).detach())
            on = small & (g.abs() <= 1e3 * self._tol(tau).unsqueeze(1) * gd.abs())
            s = torch.where(on, torch.sign(gd), s)
            surface = on
        return s, surface

    # ---------------------------------------------------------------------------------------
    # the loop's interface

    def init(self, t, y):
        """Conditions at the start of the solve."""
        ys = y if self.per_sample else y.unsqueeze(0)
        tau = self._tau(t, ys)
        with torch.no_grad():
            self.g_prev = self._g(tau, ys.detach())
        S, M = self.g_prev.shape
        self.count = torch.zeros(S, dtype=torch.long, device=ys.device)
        self.rows: list = []  # (mask, t, event, component, y_minus, y_plus, ties)
        self.terminated = torch.zeros(S, dtype=torch.bool, device=ys.device)
        # conditions on their surface at the start (e.g. just after an event): their side, see _start
        self.s_prev, self.surface = self._start(tau, ys.detach(), self.g_prev, torch.ones_like(self.terminated))

    def _tau(self, t, ys):
        if isinstance(t, torch.Tensor):
            return t.to(self.time_dtype).reshape(-1).expand(ys.shape[0])
        return torch.full((ys.shape[0],), float(t), dtype=self.time_dtype, device=ys.device)

    def _crossed(self, s_a, s_b):
        """(S, M) bool: a crossing in the allowed direction between signs ``s_a`` and ``s_b``."""
        up = (s_a < 0) & (s_b >= 0)
        down = (s_a > 0) & (s_b <= 0)
        d = self.col_dir
        return torch.where(d > 0, up, torch.where(d < 0, down, up | down))

    def check(self, t, t_next, y, y1, coeffs, accept):
        """Look for events in the accepted steps ``t -> t_next``; return a :class:`Fired` or
        ``None``. ``coeffs()`` gives the step's dense coefficients (computed only when needed)."""
        ps = self.per_sample
        ys = y if ps else y.unsqueeze(0)
        y1s = y1 if ps else y1.unsqueeze(0)
        acc = accept if ps else torch.tensor([bool(accept)], device=ys.device)
        ta = self._tau(t, ys)
        tb = self._tau(t_next, ys)
        h = tb - ta
        grad = torch.is_grad_enabled()

        def dense():  # the step's coefficients keep their graph (the loop saves with them too)
            with torch.set_grad_enabled(grad):
                return coeffs()

        with torch.no_grad():
            g1 = self._g(tb, y1s.detach())
            s1 = torch.sign(g1)
            C = None
            cand = self._crossed(self.s_prev, s1) & acc.unsqueeze(1)
            # bracket [a, b] in units of the step (theta), per row
            a = torch.zeros_like(h)
            b = torch.ones_like(h)
            ga, gb = self.g_prev, g1
            if self.checks:
                C = dense()
                Cs = C if ps else C.unsqueeze(0)
                found = torch.zeros_like(acc)
                s_lo, g_lo = self.s_prev, self.g_prev
                lo = torch.zeros_like(h)
                K = self.checks + 1
                for j in range(1, K + 1):
                    th = torch.full_like(h, j / K)
                    gj = g1 if j == K else self._g(ta + th * h, self._interp(ys, Cs, th).detach())
                    sj = torch.sign(gj)
                    hit = self._crossed(s_lo, sj).any(1) & acc & ~found
                    a = torch.where(hit, lo, a)
                    b = torch.where(hit, th, b)
                    ga = torch.where(hit.unsqueeze(1), g_lo, ga)
                    gb = torch.where(hit.unsqueeze(1), gj, gb)
                    found = found | hit
                    lo, s_lo, g_lo = th, sj, gj
                cand = self._crossed(torch.where((a > 0).unsqueeze(1), torch.sign(ga), self.s_prev), torch.sign(gb))
                cand = cand & found.unsqueeze(1)
            rows = cand.any(1)
            if not bool(rows.any()):
                self._advance(acc, g1)
                return None
            if C is None:
                C = dense()
            Cs = C if ps else C.unsqueeze(0)
            yd, Cd = ys.detach(), Cs.detach()
            theta, col, ties, rows = self._locate(ta, h, yd, Cd, a, b, ga, gb, rows)
            if not bool(rows.any()):
                self._advance(acc, g1)
                return None
        Cs = C if ps else C.unsqueeze(0)  # (outside no_grad: a view made there would not carry gradients)
        return self._fire(ta, h, ys, Cs, theta, col, ties, rows, acc, g1)

    def _advance(self, acc, g1):
        m = acc.unsqueeze(1)
        self.g_prev = torch.where(m, g1, self.g_prev)
        self.s_prev = torch.where(m, torch.sign(g1), self.s_prev)
        self.surface = self.surface & ~m

    def _interp(self, ys, Cs, theta):
        th = theta.to(ys.real.dtype if ys.is_complex() else ys.dtype).unsqueeze(-1)
        return ys + _horner(Cs, th)

    def _eval(self, ta, h, yd, Cd, theta):
        return self._g(ta + theta * h, self._interp(yd, Cd, theta))

    def _locate(self, ta, h, yd, Cd, a, b, ga, gb, rows):
        """The earliest root in [a, b] per row: bisection while several conditions cross, then
        Illinois (regula falsi) on the one that does, bisection for boolean ones."""
        s_a = torch.where((a > 0).unsqueeze(1), torch.sign(ga), self.s_prev)
        tol_t = self._tol(ta + h)
        tol = (tol_t / h.abs().clamp(min=torch.finfo(h.dtype).tiny)).clamp(max=0.5)
        # a condition left by a reset at the start of this step: its sign at the step start is the
        # side it moved to; find a point past the surface (else the crossing was the surface itself)
        surf = self.surface & self._crossed(s_a, torch.sign(gb)) & rows.unsqueeze(1) & (a == 0).unsqueeze(1)
        if bool(surf.any()):
            need = surf.any(1)
            p = b.clone()
            ok = torch.zeros_like(need)
            gp_found = ga.clone()
            for _ in range(_SURFACE_HALVINGS):
                p = torch.where(need & ~ok, p / 2, p)
                gp = self._eval(ta, h, yd, Cd, p)
                good = need & ~ok & ((torch.sign(gp) == s_a) | ~surf).all(1)
                gp_found = torch.where(good.unsqueeze(1), gp, gp_found)
                ok = ok | good
                if bool((ok | ~need).all()):
                    break
            # rows whose only crossings were the surface: none; others restart from p, unless a
            # condition that was not at the surface crossed in [0, p]
            early = self._crossed(s_a, torch.sign(gp_found)) & ~surf
            use_p = ok & ~early.any(1)
            a = torch.where(use_p, p, a)
            ga = torch.where(use_p.unsqueeze(1), gp_found, ga)
            s_a = torch.where(use_p.unsqueeze(1), torch.sign(gp_found), s_a)
            b = torch.where(ok & early.any(1), p, b)
            gb = torch.where((ok & early.any(1)).unsqueeze(1), gp_found, gb)
            rows = rows & (ok | ~need)
        s_b = torch.sign(gb)
        cross = self._crossed(s_a, s_b) & rows.unsqueeze(1)
        rows = rows & cross.any(1)
        # phase 1: bisection until one condition is left (or the bracket is within tolerance)
        for _ in range(_MAX_ITER):
            many = rows & (cross.sum(1) > 1) & (b - a > tol)
            if not bool(many.any()):
                break
            m = (a + b) / 2
            gm = self._eval(ta, h, yd, Cd, m)
            sm = torch.sign(gm)
            left = self._crossed(s_a, sm) & rows.unsqueeze(1)
            go_left = many & left.any(1)
            go_right = many & ~left.any(1)
            b = torch.where(go_left, m, b)
            gb = torch.where(go_left.unsqueeze(1), gm, gb)
            s_b = torch.where(go_left.unsqueeze(1), sm, s_b)
            a = torch.where(go_right, m, a)
            ga = torch.where(go_right.unsqueeze(1), gm, ga)
            s_a = torch.where(go_right.unsqueeze(1), sm, s_a)
            cross = self._crossed(s_a, s_b) & rows.unsqueeze(1)
        ties = cross
        # the reported condition: the first crossing one (ties: the lowest index)
        col = torch.argmax(cross.to(torch.int8), dim=1)
        fa = ga.gather(1, col.unsqueeze(1)).squeeze(1)
        fb = gb.gather(1, col.unsqueeze(1)).squeeze(1)
        single = rows & (cross.sum(1) == 1)
        boolean = self.col_bool[col]
        sa = s_a.gather(1, col.unsqueeze(1)).squeeze(1)  # the sign at a (at 0 maybe a reset surface's side)
        side = torch.zeros_like(col)  # Illinois: which end moved last (+1 b, -1 a)
        for _ in range(_MAX_ITER):
            # (fb == 0 keeps going: the secant is then b itself, so this bisects towards the first
            # point where the condition left its side, e.g. a condition that jumps to exactly 0)
            act = single & (b - a > tol)
            if not bool(act.any()):
                break
            secant = (a * fb - b * fa) / (fb - fa)
            mid = (a + b) / 2
            inside = torch.isfinite(secant) & (secant > a) & (secant < b)
            c = torch.where(boolean | ~inside, mid, secant)
            # a secant point that barely moves an end: step at least a tolerance inwards
            c = torch.minimum(torch.maximum(c, a + tol / 2), b - tol / 2)
            c = torch.where(b - a <= tol, mid, c)
            fc = self._eval(ta, h, yd, Cd, c).gather(1, col.unsqueeze(1)).squeeze(1)
            sc = torch.sign(fc)
            same_b = ~self._crossed_col(sa, sc, col)  # no crossing in [a, c]: the root is in [c, b]
            move_a = act & same_b
            move_b = act & ~same_b
            fb = torch.where(move_a & (side < 0), fb / 2, fb)  # Illinois: halve the stale end
            fa = torch.where(move_b & (side > 0), fa / 2, fa)
            a = torch.where(move_a, c, a)
            fa = torch.where(move_a, fc, fa)
            sa = torch.where(move_a, sc, sa)
            b = torch.where(move_b, c, b)
            fb = torch.where(move_b, fc, fb)
            side = torch.where(move_a, -1, torch.where(move_b, 1, side))
        return b, col, ties, rows

    def _crossed_col(self, s_a, s_b, col):
        d = self.col_dir[col]
        up = (s_a < 0) & (s_b >= 0)
        down = (s_a > 0) & (s_b <= 0)
        return torch.where(d > 0, up, torch.where(d < 0, down, up | down))

    def _tol(self, t):
        e = self.events
        if all(ev.tol is not None for ev in e):
            return torch.full_like(t, min(ev.tol for ev in e))
        base = 10 * self.eps * t.abs().clamp(min=1)
        given = [ev.tol for ev in e if ev.tol is not None]
        return torch.minimum(base, torch.full_like(t, min(given))) if given else base

    def _fire(self, ta, h, ys, Cs, theta, col, ties, rows, acc, g1):
        """Build the differentiable pre/post-event states and record the event."""
        ps = self.per_sample
        tau_d = ta + theta * h
        y_d = self._interp(ys, Cs, theta)  # with the step's graph
        # the slope of the step's dense output at the event (not f): the event time and state are
        # then differentiated exactly as computed, also for an SDE's linear dense output
        rdt = ys.real.dtype if ys.is_complex() else ys.dtype
        th = theta.to(rdt).unsqueeze(-1)
        h_safe = torch.where(h != 0, h, torch.ones_like(h)).to(rdt)  # (finished samples take empty steps)
        f_minus = (_horner_derivative(Cs.detach(), th) / h_safe.unsqueeze(-1)).detach()
        y_minus, y_plus, y_next, stop = self.jump(tau_d, y_d, f_minus, col, ties, rows)
        # conditions at the new start: the sign a condition left on its surface moves to
        with torch.no_grad():
            cont = rows & ~stop
            g_new = self._g(tau_d, y_plus.detach())
            s_new, surface = self._start(tau_d, y_plus.detach(), g_new, cont)
            r = rows.unsqueeze(1)
            a = acc.unsqueeze(1)
            self.g_prev = torch.where(r, g_new, torch.where(a, g1, self.g_prev))
            self.s_prev = torch.where(r, s_new, torch.where(a, torch.sign(g1), self.s_prev))
            self.surface = torch.where(r, surface, self.surface & ~a)
        if not ps:
            return Fired(rows[0], theta[0], tau_d[0], y_minus[0], y_next[0], stop[0])
        return Fired(rows, theta, tau_d, y_minus, y_next, stop)

    def jump(self, tau_d, y_d, f_minus, col, ties, rows):
        """The event at the located time ``tau_d`` (S,) and state ``y_d`` (S, N) with slope
        ``f_minus`` there, for ``rows``: the differentiable pre-event state, the post-event state,
        the state to continue from (see the module docstring) and which rows stop; recorded."""
        ps = self.per_sample
        delta = torch.zeros_like(tau_d)
        real = rows & ~self.col_bool[col]
        if torch.is_grad_enabled() and bool(real.any()):
            g = self._g(tau_d, y_d).gather(1, col.unsqueeze(1)).squeeze(1)
            if g.requires_grad:
                gdot = self._gdot(tau_d, y_d, f_minus, col)
                ok = real & (gdot != 0) & torch.isfinite(gdot)
                safe = torch.where(ok, gdot, torch.ones_like(gdot))
                delta = torch.where(ok, -(g - g.detach()) / safe, torch.zeros_like(g))
        dstate = delta.to(y_d.real.dtype if y_d.is_complex() else y_d.dtype).unsqueeze(1)
        y_minus = y_d + f_minus * dstate
        tau = tau_d + delta
        count = self.count + rows
        ev = self.col_event[col]
        stop = rows & (self.col_terminal[col] | (False if self.max_events is None else count >= self.max_events))
        y_plus = y_minus
        has_reset = torch.zeros_like(rows)
        for k, e in enumerate(self.events):
            go = rows & ~stop & (ev == k)
            if e.reset is None or not bool(go.any()):
                continue
            which = self.col_comp[col] if ps else self.col_comp[col].reshape(())
            out = e.reset(self._t_user(tau), self._tree(y_minus), self.args, which)
            try:
                out = self.flat.tree_to_state(out) if ps else self.flat.tree_to_state(out).unsqueeze(0)
            except (RuntimeError, ValueError, TypeError, AttributeError, IndexError) as err:
                raise ValueError(
                    f"the reset of {e!r} must return a state with the structure and shapes of y; "
                    f"converting what it returned failed: {err}"
                ) from err
            if out.shape != y_minus.shape:
                raise ValueError(
                    f"the reset of {e!r} returned a state of flat shape {tuple(out.shape)}; expected the "
                    f"structure and shapes of y ({tuple(y_minus.shape)})"
                )
            y_plus = torch.where(go.unsqueeze(1), out.to(y_minus.dtype), y_plus)
            has_reset = has_reset | go
        # a stopped row ends at (tau, y_minus); a recorded event continues from y_d at tau_d (the
        # time shift cancels); a reset continues from y_plus - f+ delta at tau_d
        y_next = torch.where(stop.unsqueeze(1), y_minus, y_d)
        if bool(has_reset.any()):
            f_plus = self._f(tau_d, y_plus.detach()).detach()
            y_next = torch.where(has_reset.unsqueeze(1), y_plus - f_plus * dstate, y_next)
        # record
        self.count = count
        self.terminated = self.terminated | stop
        self.rows.append((rows, tau * self.sign, ev, self.col_comp[col], y_minus, y_plus, ties))
        return y_minus, y_plus, y_next, stop

    # ---------------------------------------------------------------------------------------
    # the record

    def record(self) -> EventRecord:
        from ._saver import _compact  # (the per-sample compaction of the loop)

        flat = self.flat
        S = self.count.shape[0]
        M = len(self.cols) if self.cols is not None else 0
        dev = self.count.device
        if not self.rows:
            rdt = self.time_dtype
            K0 = (S, 0) if self.per_sample else (0,)
            empty_y = torch.zeros(*K0, flat.size, dtype=flat.dtype, device=dev)
            y_tree = self._unflat_rows(empty_y)
            return EventRecord(
                t=torch.zeros(K0, dtype=rdt, device=dev),
                event=torch.zeros(K0, dtype=torch.long, device=dev),
                component=torch.zeros(K0, dtype=torch.long, device=dev),
                y_minus=y_tree,
                y_plus=y_tree,
                ties=torch.zeros(*K0, M, dtype=torch.bool, device=dev),
                count=self.count if self.per_sample else 0,
                terminated=self.terminated if self.per_sample else False,
            )
        masks = [r[0] for r in self.rows]
        if self.per_sample:
            t, _ = _compact([r[1] for r in self.rows], masks)
            ev, _ = _compact([r[2] for r in self.rows], masks, pad_value=-1)
            comp, _ = _compact([r[3] for r in self.rows], masks, pad_value=-1)
            ym, _ = _compact([r[4] for r in self.rows], masks)
            yp, _ = _compact([r[5] for r in self.rows], masks)
            ties, _ = _compact([r[6] for r in self.rows], masks, pad_value=False)
            return EventRecord(
                t, ev, comp, self._unflat_rows(ym), self._unflat_rows(yp), ties, self.count, self.terminated
            )
        t = torch.stack([r[1][0] for r in self.rows])
        ev = torch.stack([r[2][0] for r in self.rows])
        comp = torch.stack([r[3][0] for r in self.rows])
        ym = torch.stack([r[4][0] for r in self.rows])
        yp = torch.stack([r[5][0] for r in self.rows])
        ties = torch.stack([r[6][0] for r in self.rows])
        return EventRecord(
            t,
            ev,
            comp,
            self._unflat_rows(ym),
            self._unflat_rows(yp),
            ties,
            int(self.count[0]),
            bool(self.terminated[0]),
        )

    def _unflat_rows(self, Y):
        """(K, N) -> tree with leading K (shared); (B, K, N) -> tree (B, K, ...) (per sample)."""
        from ._tree import tree_map

        if self.per_sample:
            return tree_map(lambda x: x.movedim(0, 1), self.flat.unflatten(Y.movedim(1, 0)))
        return self.flat.unflatten(Y)
