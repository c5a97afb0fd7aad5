r"""Automatic stiffness detection and switching between an explicit and an implicit solver.

:class:`AutoSwitch` starts with its explicit solver and watches for stiffness along the explicit
steps with the estimate of Hairer & Wanner (*Solving ODEs II*, IV.2, "stiffness detection", as in
their code DOPRI5): two stages evaluated at the same time, :math:`k_i = f(t_0 + c h, Y_i)` and
:math:`k_j = f(t_0 + c h, Y_j)`, give

.. math::
    \rho = \frac{\|k_i - k_j\|}{\|Y_i - Y_j\|} \approx |\lambda|,

a lower estimate of the dominant eigenvalue of the Jacobian in the direction the step's error
lives in (no extra evaluation). A stiff problem keeps an explicit method's step at its stability
boundary, so :math:`h\rho` sits at the boundary of the stability region on the negative real axis
(3.51 for Tsit5, 3.31 for Dopri5; computed from the tableau). An accepted step with
:math:`h\rho` above ``stiff_fraction`` (0.9) of that boundary "looks stiff"; after
``stiff_steps`` (15) of them, with no run of ``calm_steps`` (6) non-stiff-looking steps in
between (which resets the count), the solve switches to the implicit solver. (DOPRI5 uses
3.25, 0.98 of its boundary; measured on y' = -1e4 (y - cos 3t) at rtol 1e-7, Tsit5's accepted
steps settle at h rho = 3.256, 0.93 of its boundary, and Dopri5's at 2.93, 0.89 of its own, so
0.98 would never switch there. At 0.9 none of the non-stiff checks (harmonic oscillator, Van der
Pol mu = 1, Lorenz, decay; rtol 1e-2 to 1e-6) switches; at 0.8 Lorenz at rtol 1e-2 does. With
Dopri5 as the explicit solver, pass ``stiff_fraction=0.85`` for tight tolerances.)

In implicit mode the solver reads the Jacobian the implicit solver already holds (no extra
evaluation) and estimates its spectral radius :math:`\rho_J` by a few power iterations
(capped by :math:`\min(\|J\|_1, \|J\|_\infty)`, both upper bounds of it). When
:math:`h\rho_J` is below ``back_fraction`` (0.5) of the explicit method's boundary for
``back_steps`` (15) accepted steps in a row, the explicit method could take those steps stably
and more cheaply, and the solve switches back.

On a switch the newly used solver's state is re-initialised at the current ``(t, y)``: the
implicit solver's with the explicit step's last stage (the derivative there, no extra
evaluation), the explicit solver's with one fresh evaluation.

Per sample (``per_sample=True``) every sample has its own mode and counters (``(B,)`` tensors).
The step makes the explicit step on the rows in explicit mode and the implicit step on the rows
in implicit mode; each solver sees the other rows with a zero step (``t1 = t0``, so their values
stay finite and their gradients zero) and the results are selected per row. A batch that mixes
modes pays for both steps on every row.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch

from ._base import AbstractAdaptiveERK, AbstractAdaptiveSolver, LazyDerivative, _resolve
from ._implicit import AbstractESDIRK

__all__ = ["AutoSwitch", "stability_boundary"]


def stability_boundary(tableau) -> float:
    """Where the stability region of an explicit Runge--Kutta tableau ends on the negative real
    axis: the smallest ``x > 0`` with ``|R(-x)| > 1`` (``R`` the stability polynomial)."""
    s = len(tableau.c)
    A = np.zeros((s, s))
    for i, row in enumerate(tableau.a):
        for j, x in enumerate(row):
            A[i, j] = float(x)
    b = np.array([float(x) for x in tableau.b])
    # R(z) = 1 + z b^T (I - z A)^-1 1 = 1 + sum_k z^k b^T A^(k-1) 1 (A nilpotent)
    coeffs = [1.0]
    v = np.ones(s)
    for _ in range(s):
        coeffs.append(float(b @ v))
        v = A @ v
    xs = np.arange(1, 200001) * 1e-4  # up to 20, resolution 1e-4
    R = np.polyval(coeffs[::-1], -xs)
    out = np.nonzero(np.abs(R) > 1.0)[0]
    return float(xs[out[0]] - 1e-4) if out.size else 20.0


def _same_node_pair(tableau):
    """The last two stages with the same node ``c`` (``None`` if there are none)."""
    c = [float(x) for x in tableau.c]
    for i in range(len(c) - 1, 0, -1):
        for j in range(i - 1, 0, -1):
            if c[i] == c[j]:
                return j, i
    return None


class _KnownDerivative:
    """The term, but ``vf`` at ``(t, y)`` (``y`` the very tensor given) returns the known
    derivative instead of evaluating it (re-initialising an inner solver costs nothing)."""

    __slots__ = ("term", "y", "f")

    def __init__(self, term, y, f):
        self.term, self.y, self.f = term, y, f

    def vf(self, t, y):
        if y is self.y:
            return self.f
        return self.term.vf(t, y)

    def __getattr__(self, name):
        return getattr(self.term, name)


def _split(state):
    """An inner state as a list of leaves and how to rebuild it (``-1``: one object)."""
    if isinstance(state, tuple):
        return list(state), len(state)
    return [state], -1


def _join(leaves, n):
    return leaves[0] if n == -1 else tuple(leaves)


def _pick(mask, a, b):
    """``a`` where ``mask`` else ``b``, row by row; non-tensor leaves are ``b``'s (e.g. shared
    counters)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return b
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def _pick_state(mask, a, b):
    if isinstance(a, tuple):
        return tuple(_pick(mask, x, y) for x, y in zip(a, b))
    return _pick(mask, a, b)


def _spectral_radius(J: torch.Tensor, iters: int = 12) -> torch.Tensor:
    """An estimate of the spectral radius of each ``(n, n)`` matrix in ``J`` (``(B, n, n)``): the
    geometric mean growth of the last half of ``iters`` power iterations (which also settles for
    complex pairs), capped by ``min(||J||_1, ||J||_inf)``."""
    n = J.shape[-1]
    # a fixed start with no symmetry (an all-ones vector is orthogonal to common eigenvectors)
    v = 1.0 + torch.arange(n, dtype=J.dtype, device=J.device) / (n + math.pi)
    v = (v / torch.linalg.vector_norm(v)).expand(J.shape[0], n).unsqueeze(-1)
    logs = []
    tiny = torch.finfo(J.dtype).tiny
    for k in range(iters):
        w = J @ v
        nw = torch.linalg.vector_norm(w, dim=(-2, -1))
        v = w / nw.clamp(min=tiny).view(-1, 1, 1)
        if k >= iters // 2:
            logs.append(torch.log(nw.clamp(min=tiny)))
    rho = torch.exp(torch.stack(logs).mean(0))
    cap = torch.minimum(J.abs().sum(-1).amax(-1), J.abs().sum(-2).amax(-1))
    rho = torch.minimum(rho, cap)
    return torch.where(cap > 0, rho, torch.zeros_like(rho))


class AutoSwitch(AbstractAdaptiveSolver):
    """Start explicit, switch to an implicit solver when the problem turns stiff, and back.

    Stiffness is detected along the explicit steps (Hairer & Wanner, *Solving ODEs II*, IV.2: two
    stages at the same time give :math:`\\rho \\approx \\|\\Delta k\\| / \\|\\Delta Y\\|`, no extra
    evaluation): after ``stiff_steps`` accepted steps with :math:`h\\rho` at the explicit method's
    stability boundary the solve continues with ``implicit``. It switches back when the spectral
    radius of the Jacobian the implicit solver holds puts :math:`h\\rho` well inside the explicit
    stability region for ``back_steps`` steps in a row. See :mod:`torchnde.solvers.auto_switch`.

    With ``per_sample=True`` every sample switches on its own; a batch mixing the two modes pays
    for both steps. A non-stiff problem costs exactly what the explicit solver alone costs.

    ``Solution.stats`` gains ``"stiffness"`` (the last accepted step's :math:`h\\rho`: along the
    explicit steps the same-time estimate, along the implicit ones the Jacobian's; above about
    3.5 for Tsit5 a step is beyond the explicit stability region), ``"num_switches"`` and
    ``"num_implicit_steps"`` (accepted), per sample in per-sample mode, and the implicit solver's
    own counters where it reports them.

    Args:
        explicit: an adaptive explicit Runge--Kutta pair with two stages at the same node
            (``Tsit5()``, default, or ``Dopri5()``).
        implicit: an adaptive implicit solver: ``Kvaerno5()`` (default) or another
            :class:`~torchnde.solvers.AbstractESDIRK`, whose held Jacobian gives the switch-back
            estimate for free, or a Rosenbrock method such as ``Rodas5P()``, which keeps no
            Jacobian between steps: then one Jacobian-vector product (``torch.func.jvp``, one
            evaluation) per implicit step carries a power iteration along the steps.
        stiff_steps: stiff-looking accepted explicit steps before switching (Hairer: 15).
        calm_steps: consecutive non-stiff-looking explicit steps that reset that count (6).
        stiff_fraction: a step looks stiff when :math:`h\\rho` exceeds this fraction of the
            explicit stability boundary (0.9; see the module docstring for why not DOPRI5's 0.98).
        back_steps: consecutive accepted implicit steps with :math:`h\\rho_J` below
            ``back_fraction`` of the boundary before switching back (15).
        back_fraction: see ``back_steps`` (0.5).

    The step-size controller uses the smaller ``error_order`` of the two solvers (the same, 4,
    for the defaults). Dense output is each solver's own on each step (Tsit5's 4th-order
    interpolant, the ESDIRK's cubic Hermite, Rodas5P's own), zero-padded to one polynomial degree
    for the whole solve and selected per row in per-sample mode.

    Limitations:

    * The detection sees stiffness only where the explicit steps are held at the stability
      boundary. Where Tsit5's error estimate holds them lower (a stiff mode driven by a smooth
      forcing at tight tolerances: on y' = 1000 (y - cos t) at rtol 1e-7 its steps sit at
      h rho = 2.39, 0.68 of the boundary; or a decayed stiff transient whose mode is at the noise
      level, where the same-time estimate mixes in the smooth direction and reads 1-2.5) the solve
      stays explicit and costs what the explicit solver alone costs: lower ``stiff_fraction``
      (0.6 switches in both examples) or use the implicit solver directly.
    * Non-terminal events and ``jump_ts`` restart the solver (explicit) after they fire, so a
      stiff problem spends ``stiff_steps`` explicit steps re-detecting stiffness after each, and
      the counters in ``Solution.stats`` restart there too.
    * Gradients: use ``DirectAdjoint`` (tested against finite differences).
      ``CheckpointAdjoint`` replays its segments on the recorded steps from a fresh (explicit)
      state, so a segment that starts where the forward solve was implicit takes explicit steps
      far beyond the stability boundary and fails (``nonfinite``).
    * Shared mode costs two host synchronisations a step (the mode, and whether to switch).
    """

    def __init__(
        self,
        explicit: AbstractAdaptiveERK | None = None,
        implicit: AbstractAdaptiveSolver | None = None,
        *,
        stiff_steps: int = 15,
        calm_steps: int = 6,
        stiff_fraction: float = 0.9,
        back_steps: int = 15,
        back_fraction: float = 0.5,
    ):
        from .kvaerno5 import Kvaerno5
        from .tsit5 import Tsit5

        explicit = Tsit5() if explicit is None else explicit
        implicit = Kvaerno5() if implicit is None else implicit
        if isinstance(explicit, type) or isinstance(implicit, type):
            raise TypeError("AutoSwitch expects solver instances, e.g. AutoSwitch(Tsit5(), Kvaerno5())")
        if not isinstance(explicit, AbstractAdaptiveERK):
            raise TypeError(
                f"AutoSwitch(explicit=...) must be an adaptive explicit Runge-Kutta solver such as Tsit5(), "
                f"got {type(explicit).__name__}"
            )
        pair = _same_node_pair(explicit.tableau)
        if pair is None:
            raise TypeError(
                f"AutoSwitch(explicit=...) needs two stages at the same time to estimate stiffness; "
                f"{type(explicit).__name__} has none. Use Tsit5() or Dopri5()"
            )
        if not isinstance(implicit, AbstractAdaptiveSolver) or isinstance(implicit, AbstractAdaptiveERK):
            raise TypeError(
                f"AutoSwitch(implicit=...) must be an adaptive implicit solver such as Kvaerno5(), "
                f"got {type(implicit).__name__}"
            )
        for name, v in (("stiff_steps", stiff_steps), ("calm_steps", calm_steps), ("back_steps", back_steps)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"AutoSwitch({name}=...) must be an int >= 1, got {v!r}")
        for name, v in (("stiff_fraction", stiff_fraction), ("back_fraction", back_fraction)):
            if not (isinstance(v, (int, float)) and 0 < v and math.isfinite(v)):
                raise ValueError(f"AutoSwitch({name}=...) must be a finite float > 0, got {v!r}")
        self.explicit, self.implicit = explicit, implicit
        self.stiff_steps, self.calm_steps, self.back_steps = stiff_steps, calm_steps, back_steps
        self.stiff_fraction, self.back_fraction = float(stiff_fraction), float(back_fraction)
        self.boundary = stability_boundary(explicit.tableau)
        self._pair = pair
        # the degree of the dense output: C[p] multiplies theta^(p+1), p < P
        pe = len(explicit.tableau.dense[0]) if explicit.tableau.dense is not None else 3
        pi = 3 if isinstance(implicit, AbstractESDIRK) else getattr(implicit, "dense_degree", 5)
        self._P = max(pe, pi)
        # the controller: the explicit method's order for the first step (the solve starts there),
        # the smaller error order of the two
        self.order = explicit.order
        self.error_order = min(explicit.error_order, implicit.error_order)
        self.dense_order = min(explicit.dense_order, implicit.dense_order)
        tab = explicit.tableau
        i, j = pair
        ai = [float(x) for x in tab.a[i]] + [0.0] * (tab.num_stages - i)
        aj = [float(x) for x in tab.a[j]] + [0.0] * (tab.num_stages - j)
        # Y_j - Y_i = h sum_k (a_jk - a_ik) k_k (formed directly: no cancellation)
        self._dY = tuple(y - x for x, y in zip(ai, aj))
        self._cache: dict = {}

    def _key(self):
        return (
            self.explicit,
            self.implicit,
            self.stiff_steps,
            self.calm_steps,
            self.stiff_fraction,
            self.back_steps,
            self.back_fraction,
        )

    def __eq__(self, other):
        return isinstance(other, AutoSwitch) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return f"AutoSwitch({self.explicit!r}, {self.implicit!r})"

    def with_tolerances(self, rtol: float, atol: float):
        """The implicit solver's Newton tolerances from the controller's (see its own method)."""
        bind = getattr(self.implicit, "with_tolerances", None)
        if bind is None:
            return self
        implicit = bind(rtol, atol)
        if implicit is self.implicit:
            return self
        out = copy.copy(self)
        out.implicit = implicit
        return out

    # --- state: (mode, count, calm, hrho, switches, n_implicit, v, spec, *explicit, *implicit) -
    # mode: True where implicit; count: stiff-looking explicit steps / calm implicit steps; calm:
    # consecutive non-stiff-looking explicit steps; v: the power-iteration vector (B, n) of the
    # Jacobian-free estimate; spec: (explicit leaves, implicit leaves, per sample).
    # Everything is a (B,) tensor (B = 1 in shared mode), so the loop's per-row selection of
    # accepted steps applies to all of it. In shared mode the implicit state is built on the
    # first switch (its Jacobian can be large); per sample it is built at the start, from the
    # explicit solver's derivative (no evaluation).

    def init(self, term, t0, y0):
        if term.rough:
            raise TypeError("AutoSwitch solves ODEs only; SDEs need an SDE solver (see SDE_SOLVERS)")
        if y0.is_complex():
            raise TypeError(f"AutoSwitch needs a real state (its implicit solver does), got dtype {y0.dtype}")
        batched = getattr(term, "batched", False)
        es = self.explicit.init(term, t0, y0)
        B = y0.shape[0] if batched else 1
        dev = y0.device
        rdt = y0.real.dtype if y0.is_complex() else y0.dtype
        zl = torch.zeros(B, dtype=torch.long, device=dev)
        if batched:
            f0 = es.get() if isinstance(es, LazyDerivative) else es
            is_ = self.implicit.init(_KnownDerivative(term, y0, f0), t0, y0)
        else:
            is_ = None
        mode = torch.zeros(B, dtype=torch.bool, device=dev)
        v = torch.zeros(B, y0.shape[-1] if batched else y0.numel(), dtype=y0.dtype, device=dev)
        return self._pack(batched, mode, zl, zl, torch.zeros(B, dtype=rdt, device=dev), zl, zl, v, es, is_)

    @staticmethod
    def _pack(batched, mode, count, calm, hrho, switches, n_imp, v, es, is_):
        le, ne = _split(es)
        li, ni = _split(is_)
        return (mode, count, calm, hrho, switches, n_imp, v, (ne, ni, batched), *le, *li)

    @staticmethod
    def _unpack(state):
        mode, count, calm, hrho, switches, n_imp, v, (ne, ni, _) = state[:8]
        k = 1 if ne == -1 else ne
        es = _join(list(state[8 : 8 + k]), ne)
        is_ = _join(list(state[8 + k :]), ni)
        return mode, count, calm, hrho, switches, n_imp, v, es, is_

    def initial_derivative(self, state):
        return self.explicit.initial_derivative(self._unpack(state)[7])

    def _stiffness_explicit(self, dinfo):
        """``h rho`` per row from the explicit step's two same-time stages, and the direction
        ``Y_j - Y_i`` (detached)."""
        t0, t1, y0, y1, f0, f1, ks = dinfo
        with torch.no_grad():
            K = torch.stack(ks).view(len(ks), -1)  # (s, N) or (s, B n)
            # rows: k_j - k_i and (Y_j - Y_i) / h (one matrix product)
            D = (self._diff_matrix(K.dtype, K.device) @ K).view(2, *ks[0].shape)
            nrm = torch.linalg.vector_norm(D, dim=-1)
            num, den = nrm[0].reshape(-1), nrm[1].reshape(-1)
            # h rho = |h| ||k_j - k_i|| / ||Y_j - Y_i|| = ||k_j - k_i|| / ||(Y_j - Y_i) / h||
            hrho = torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), torch.zeros_like(num))
            return hrho, D[1].reshape(num.shape[0], -1)

    def _diff_matrix(self, dtype, device):
        key = (dtype, device)
        M = self._cache.get(key)
        if M is None:
            i, j = self._pair
            dk = [0.0] * len(self._dY)
            dk[i], dk[j] = -1.0, 1.0
            M = self._cache[key] = torch.tensor([dk, list(self._dY)], dtype=dtype, device=device)
        return M

    def _stiffness_implicit(self, term, state, t0, t1, y1, v, batched):
        """``h rho_J`` per row after an implicit step, and the power-iteration vector: from the
        Jacobian the implicit solver holds, or else (e.g. Rosenbrock methods, which keep none) by
        one Jacobian-vector product at ``(t1, y1)`` a step along the vector kept in the state
        (a power iteration spread over the steps, started from the explicit steps' stiff
        direction; one evaluation a step)."""
        J = _held_jacobian(self.implicit, state)
        with torch.no_grad():
            h = t1 - t0
            if J is not None:
                rho = _spectral_radius(J.detach())
            else:
                y1 = y1.detach()
                nv = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
                default = torch.ones_like(v) / math.sqrt(max(v.shape[-1], 1))
                u = torch.where(nv > 0, v / nv.clamp(min=torch.finfo(nv.dtype).tiny), default)
                if batched:
                    _, Ju = torch.func.jvp(lambda z: term.vf(t1, z), (y1,), (u,))
                else:
                    _, Ju = torch.func.jvp(lambda z: term.vf(t1, z), (y1,), (u[0],))
                    Ju = Ju.reshape(1, -1)
                rho = torch.linalg.vector_norm(Ju, dim=-1)
                v = torch.nan_to_num(Ju, nan=0.0, posinf=0.0, neginf=0.0)
                rho = torch.nan_to_num(rho, nan=math.inf)
            h = h.to(rho.dtype).abs() if isinstance(h, torch.Tensor) else abs(h)
            return rho * h, v

    def step(self, term, t0, t1, y0, state):
        mode, count, calm, hrho, switches, n_imp, v, es, is_ = self._unpack(state)
        batched = getattr(term, "batched", False)
        if batched:
            moving = t1 != t0  # finished samples (zero steps) need neither solver
            use_imp = mode & moving
            run_imp = bool(use_imp.any())
            # (all finished: some solver must make the empty step)
            run_exp = not run_imp or bool((moving & ~mode).any())
        else:
            run_imp = bool(mode[0])  # a Python bool would do, but the state is uniform
            run_exp = not run_imp
            use_imp = mode
        ye = ee = de = ce = yi = ei = di = ci = None
        hrho_e = hrho_i = None
        es1, is1 = es, is_
        if run_exp:
            t1e = torch.where(use_imp, t0, t1) if (batched and run_imp) else t1
            ye, ee, de, es1, ce = self.explicit.step(term, t0, t1e, y0, es)
            hrho_e, dir_e = self._stiffness_explicit(de)
        if run_imp:
            t1i = torch.where(use_imp, t1, t0) if (batched and run_exp) else t1
            yi, ei, di, is1, ci = self.implicit.step(term, t0, t1i, y0, is_)
            hrho_i, v_i = self._stiffness_implicit(term, is1, t0, t1i, yi, v, batched)

        # --- outputs, per row
        if batched and run_imp and run_exp:
            col = use_imp.unsqueeze(-1)
            y1 = torch.where(col, yi, ye)
            y_err = torch.where(col, ei, ee)
            code = None if ci is None else torch.where(use_imp, ci, torch.zeros_like(ci))
            hrho_new = torch.where(use_imp, hrho_i, hrho_e)
            v1 = torch.where(use_imp.unsqueeze(-1), v_i, v)
            es1 = _pick_state(~use_imp, es1, es)
            is1 = _pick_state(use_imp, is1, is_)
        elif run_imp:
            y1, y_err, code, hrho_new, v1 = yi, ei, ci, hrho_i, v_i
        else:
            y1, y_err, code, hrho_new, v1 = ye, ee, ce, hrho_e, v
        dinfo = (use_imp if batched else run_imp, de, di)

        # --- counters and switches (take effect only if the loop accepts the step)
        with torch.no_grad():
            count1, calm1, switch = count, calm, None
            if run_exp:  # stiff-looking steps count up; calm_steps calm ones in a row reset the count
                stiff = hrho_e > self.stiff_fraction * self.boundary
                calm_e = (calm + 1).masked_fill_(stiff, 0)
                count_e = (count + stiff).masked_fill_(calm_e >= self.calm_steps, 0)
                to_imp = count_e >= self.stiff_steps
                if batched:
                    to_imp &= ~mode
                count1, calm1, switch = count_e, calm_e, to_imp
            if run_imp:  # consecutive steps well inside the explicit stability region (NaN: not)
                count_i = (count + 1).masked_fill_(~(hrho_i < self.back_fraction * self.boundary), 0)
                to_exp = count_i >= self.back_steps
                if batched:
                    to_exp &= mode
                count1, switch = count_i, to_exp
            if run_exp and run_imp:
                count1 = torch.where(mode, count_i, count_e)
                calm1 = torch.where(mode, calm, calm_e)
                switch = to_imp | to_exp
            any_imp = any_exp = False
            mode1, switches1 = mode, switches
            if bool(switch.any()):  # (one host sync a step; the others only on a switch)
                any_imp = run_exp and bool(to_imp.any())
                any_exp = run_imp and bool(to_exp.any())
                count1 = count1.masked_fill(switch, 0)
                calm1 = calm1.masked_fill(switch, 0)
                if any_imp:
                    mode1 = mode1 | to_imp
                if any_exp:
                    mode1 = mode1 & ~to_exp
                switches1 = switches + switch
            n_imp1 = n_imp + use_imp if run_imp else n_imp
            hrho1 = hrho_new if hrho_new.dtype == hrho.dtype else hrho_new.to(hrho.dtype)
        if any_imp:  # re-initialise the implicit solver at (t1, y1) with the explicit derivative there
            v1 = torch.where(to_imp.unsqueeze(-1), dir_e.to(v1.dtype), v1)  # the stiff direction
            f1 = _resolve(de[5])
            fresh = self.implicit.init(_KnownDerivative(term, y1, f1), t1, y1)
            is1 = fresh if is1 is None else _pick_state(to_imp, fresh, is1)
            if not batched:
                es1 = None  # not needed until a switch back (which re-initialises it)
        if any_exp:  # re-initialise the explicit solver at (t1, y1) (one evaluation)
            fresh = self.explicit.init(term, t1, y1)
            es1 = fresh if es1 is None else _pick_state(to_exp, fresh, es1)
        state1 = self._pack(batched, mode1, count1, calm1, hrho1, switches1, n_imp1, v1, es1, is1)
        return y1, y_err, dinfo, state1, code

    def dense_coeffs(self, term, dense_info):
        use_imp, de, di = dense_info
        # every step's polynomial has the same number of coefficients (the saver stacks them):
        # the other solver's higher powers are zero
        if de is None:
            return self._pad(self.implicit.dense_coeffs(term, di))
        if di is None:
            return self._pad(self.explicit.dense_coeffs(term, de))
        Ce = self._pad(self.explicit.dense_coeffs(term, de))
        Ci = self._pad(self.implicit.dense_coeffs(term, di))
        return torch.where(use_imp.view(-1, 1, 1), Ci, Ce)

    def _pad(self, C):
        P = self._P
        if C.shape[-2] == P:
            return C
        if C.shape[-2] > P:
            raise RuntimeError(
                f"AutoSwitch: a dense-output polynomial of degree {C.shape[-2]} exceeds the {P} this wrapper "
                f"pads to; give the implicit solver a dense_degree attribute"
            )
        z = C.new_zeros(*C.shape[:-2], P - C.shape[-2], C.shape[-1])
        return torch.cat([C, z], -2)

    def solution_stats(self, state) -> dict[str, Any]:
        mode, count, calm, hrho, switches, n_imp, v, es, is_ = self._unpack(state)
        batched = state[7][2]
        out: dict[str, Any] = {}
        inner = getattr(self.implicit, "solution_stats", None)
        if inner is not None and is_ is not None:
            out.update(inner(is_))
        if batched:
            out.update(stiffness=hrho, num_switches=switches, num_implicit_steps=n_imp)
        else:
            out.update(stiffness=float(hrho[0]), num_switches=int(switches[0]), num_implicit_steps=int(n_imp[0]))
        return out


def _held_jacobian(solver, state):
    """The ``(B, n, n)`` Jacobian an implicit solver's state holds (``B = 1`` in shared mode), or
    ``None`` if it keeps none: ESDIRK solvers keep theirs; another solver may expose one with a
    ``held_jacobian(state)`` method."""
    hook = getattr(solver, "held_jacobian", None)
    if hook is not None:
        return hook(state)
    if isinstance(solver, AbstractESDIRK):
        return state[1]
    return None
