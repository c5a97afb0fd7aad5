r"""Additive (IMEX) Runge--Kutta steps: an explicit method for a non-stiff term, an ESDIRK for a
stiff one, sharing their stages.

For :math:`y' = f^E(t, y) + f^I(t, y)` an additive Runge--Kutta method (Kennedy & Carpenter,
"Additive Runge--Kutta schemes for convection--diffusion--reaction equations", Appl. Numer. Math.
44, 139--181, 2003) computes, at stage :math:`i` with node :math:`c_i`,

.. math::
    Z_i = \psi_i + h\gamma f^I(t_0 + c_i h, Z_i), \qquad
    \psi_i = y_0 + h \sum_{j<i} \bigl(a^E_{ij} k^E_j + a^I_{ij} k^I_j\bigr),

then :math:`k^E_i = f^E(t_0 + c_i h, Z_i)` and :math:`k^I_i = (Z_i - \psi_i) / (h\gamma)`, and
advances with weights shared by both parts: :math:`y_1 = y_0 + h \sum_j b_j (k^E_j + k^I_j)`
(the embedded solution uses :math:`\hat b`). Only the implicit part's Jacobian is formed and
factorised; the nonlinear stage equations are solved by the simplified Newton iterations of
:class:`~torchnde.solvers._implicit.AbstractESDIRK` (same Jacobian/LU reuse rules, same
convergence tests, a failed solve is a rejected step with a per-sample reason code).

The user passes ``MultiTerm(ODETerm(f_explicit), ODETerm(f_implicit))``; ``solve()`` sums it
for every other solver, and the flat term keeps the two parts for these (``vf_explicit``,
``vf_implicit``). A plain :class:`~torchnde.ODETerm` is treated as entirely implicit: the step
is then the ESDIRK method of the implicit tableau alone.

Unlike a stiffly accurate ESDIRK, :math:`y_1` is not the last stage (the explicit weights differ
from the explicit tableau's last row), so an IMEX step evaluates both parts once more at
:math:`(t_1, y_1)`: they are the next step's first stage and the end derivative of the dense
output. Per step an IMEX solve costs ``s`` explicit evaluations and one implicit evaluation per
Newton iteration plus one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ._base import _lincomb, _node, hermite_coeffs
from ._implicit import (
    _THETA_JAC,
    AbstractESDIRK,
    DIRKTableau,
    _step_codes,
    _where,
)

__all__ = ["AbstractKenCarp", "ARKTableau"]


@dataclass(frozen=True, eq=False)
class ARKTableau:
    """An additive Runge--Kutta pair: explicit rows ``explicit[i]`` (``i`` entries each, on the
    stages before ``i``) and the ESDIRK ``implicit`` (:class:`DIRKTableau`) whose nodes, weights
    ``b`` and embedded weights ``b_hat`` both parts share.

    ``dense``: the published dense-output weights, one row per stage, ``dense[j][p]`` the
    coefficient of :math:`\\theta^{p+1}` in :math:`b_j(\\theta)`, so that
    :math:`y(t_0 + \\theta h) = y_0 + h \\sum_j b_j(\\theta) (k^E_j + k^I_j)`; ``None`` for cubic
    Hermite interpolation from the values and derivatives at both ends.
    """

    explicit: tuple
    implicit: DIRKTableau
    dense: tuple | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        s = self.implicit.num_stages
        if len(self.explicit) != s or any(len(row) != i for i, row in enumerate(self.explicit)):
            raise ValueError(f"the explicit tableau needs {s} rows with 0, 1, ..., {s - 1} entries")
        if self.dense is not None and len(self.dense) != s:
            raise ValueError(f"dense needs one row per stage ({s}), got {len(self.dense)}")

    def explicit_matrix(self):
        """The explicit ``(s, s)`` Butcher matrix (strictly lower triangular)."""
        s = self.implicit.num_stages
        A = [[0.0] * s for _ in range(s)]
        for i, row in enumerate(self.explicit):
            for j, x in enumerate(row):
                A[i][j] = float(x)
        return A

    def tensors(self, dtype, device) -> dict:
        key = (dtype, device)
        out = self._cache.get(key)
        if out is None:
            # stage i combines [k^I_0..k^I_{i-1}, k^E_0..k^E_{i-1}] in one op
            rows = [
                tuple(float(x) for x in ai) + tuple(float(x) for x in ae)
                for ai, ae in zip(self.implicit.a, self.explicit)
            ]
            out = {
                "c": tuple(float(x) for x in self.implicit.c),
                "aIE": [torch.tensor(r, dtype=dtype, device=device) for r in rows],
                "aIE_f": rows,
                "dense": None
                if self.dense is None
                else torch.tensor([[float(x) for x in r] for r in self.dense], dtype=dtype, device=device),
            }
            self._cache[key] = out
        return out


class _ImplicitPart:
    """The stiff part of a flat term, seen as a term of its own (for :func:`jacobian`)."""

    __slots__ = ("vf", "batched", "rough", "base")

    def __init__(self, term, split: bool):
        self.vf = term.vf_implicit if split else term.vf
        self.base = term  # the flat term (state layout, args, time sign) for a user-given jac
        self.batched = getattr(term, "batched", False)
        self.rough = False


class AbstractKenCarp(AbstractESDIRK):
    """An additive Runge--Kutta (IMEX) method: explicit for the first term of
    ``MultiTerm(ODETerm(f_explicit), ODETerm(f_implicit))``, ESDIRK with simplified Newton for the
    second (see :mod:`torchnde.solvers._imex`). A plain ``ODETerm`` is integrated as entirely
    implicit. Arguments as :class:`~torchnde.solvers.AbstractESDIRK`.
    """

    ark: ClassVar[ARKTableau]

    # --- state: the ESDIRK state with k^I_0 first, then k^E_0 (None without an explicit part):
    # (fI0, J, LU, piv, hg_lu, jac_stale, eta, stats, fE0), batch first (B = 1 in shared mode)

    def _split(self, term) -> bool:
        name = type(self).__name__
        if term.rough:
            raise TypeError(f"{name} solves ODEs only; SDEs need an SDE solver (see SDE_SOLVERS)")
        parts = getattr(term, "num_parts", 1)
        if parts > 2:
            raise TypeError(
                f"{name} splits MultiTerm(ODETerm(f_explicit), ODETerm(f_implicit)) into an explicit and an "
                f"implicit part, but got a MultiTerm of {parts} ODE terms; sum the non-stiff terms into one "
                "ODETerm and the stiff ones into another"
            )
        return parts == 2

    def init(self, term, t0, y0):
        split = self._split(term)
        state = super().init(_ImplicitPart(term, split), t0, y0)
        fE0 = term.vf_explicit(t0, y0) if split else None
        return (*state, fE0)

    def initial_derivative(self, state):
        return state[0] if state[-1] is None else state[0] + state[-1]

    def step(self, term, t0, t1, y0, state):
        fI0, J, LU, piv, hg_lu, stale, eta, stats, fE0 = state
        split = fE0 is not None
        imp = _ImplicitPart(term, split)
        batched, coef, yb, kw, h, dt, t0_row, hg = self._setup(imp, t0, t1, y0)
        arkc = self.ark.tensors(y0.dtype, y0.device)

        def rows(vf):
            return vf if batched else (lambda t, z: vf(t, z[0]).unsqueeze(0))

        FI = rows(imp.vf)
        FE = rows(term.vf_explicit) if split else None
        fI0b = fI0 if batched else fI0.unsqueeze(0)
        fE0b = None if not split else (fE0 if batched else fE0.unsqueeze(0))

        need_jac = stale | (stats.fail_t == t0_row)
        J, LU, piv, hg_lu, singular = self._refresh(imp, t0, y0, t0_row, hg, J, LU, piv, hg_lu, need_jac, stats)
        args = (FI, FE, t0, h, dt, yb, fI0b, fE0b, hg, LU, piv, eta)
        kI, kE, failed, theta_max, eta = self._ark_stages(*args, ~singular, coef, arkc, stats)
        # a failure with a Jacobian from an earlier step: retry those rows once with a fresh one
        retry = failed & ~need_jac
        if bool(retry.any()):
            J, LU, piv, hg_lu, sing2 = self._refresh(imp, t0, y0, t0_row, hg, J, LU, piv, hg_lu, retry, stats)
            args = (FI, FE, t0, h, dt, yb, fI0b, fE0b, hg, LU, piv, eta)
            kI2, kE2, failed2, theta2, eta2 = self._ark_stages(*args, retry & ~sing2, coef, arkc, stats)
            kI = [_where(retry, k2, k) for k, k2 in zip(kI, kI2)]
            if split:
                kE = [_where(retry, k2, k) for k, k2 in zip(kE, kE2)]
            failed = torch.where(retry, failed2 | sing2, failed)
            singular = singular | (retry & sing2)
            theta_max = torch.where(retry, theta2, theta_max)
            eta = torch.where(retry, eta2, eta)
        failed = failed | singular
        ks = [a + b for a, b in zip(kI, kE)] if split else kI
        y1 = _lincomb(yb, dt, ks, coef["b"], coef["b_f"])
        y_err = _lincomb(None, dt, ks, coef["err"], coef["err_f"])
        if split:  # y1 is not a stage: both parts again at its end (the next step's first stage)
            fI1, fE1 = FI(t1, y1), FE(t1, y1)
        else:  # stiffly accurate: y1 is the last stage, whose slope is known
            fI1, fE1 = kI[-1], None

        # failed rows: y1 = y0 and a large finite error, so the controller rejects them
        slopes = [(fI1, fI0b), (fE1, fE0b)]  # (fE1 is None without an explicit part)
        code, y1, y_err, eta, (fI1, fE1) = _step_codes(failed, singular, stats, t0_row, yb, y1, y_err, eta, slopes)
        stale1 = theta_max > _THETA_JAC
        f0b = fI0b + fE0b if split else fI0b
        f1 = fI1 + fE1 if split else fI1
        if not batched:
            y1, y_err, code = y1[0], y_err[0], code[0]
            fI1, f0b, f1 = fI1[0], f0b[0], f1[0]
            fE1 = fE1[0] if split else None
            ks = [k[0] for k in ks]
        state1 = (fI1, J, LU, piv, hg_lu, stale1, eta, stats, fE1)
        return y1, y_err, (t0, t1, y0, y1, f0b, f1, ks), state1, code

    def _ark_stages(self, FI, FE, t0, h, dt, yb, fI0, fE0, hg, LU, piv, eta, active, coef, arkc, stats):
        """The stages on the rows in ``active``. Returns ``(kI, kE, failed, theta_max, eta)``
        (``kE`` is ``None`` without an explicit part)."""
        tab = self.tableau
        rtol, atol = self._tols(yb.dtype)
        kI = [fI0]
        kE = None if FE is None else [fE0]
        failed = torch.zeros_like(active)
        theta_max = torch.zeros_like(eta)
        hg_safe = torch.where(hg == 0, torch.ones_like(hg), hg)  # finished samples (h = 0): k = 0
        c = arkc["c"]
        shared = isinstance(dt, float)  # one system: Newton control on Python floats
        for i in range(1, tab.num_stages):
            if kE is None:
                psi = _lincomb(yb, dt, kI, coef["a"][i], coef["a_f"][i])
            else:
                psi = _lincomb(yb, dt, kI + kE, arkc["aIE"][i], arkc["aIE_f"][i])
            z0 = psi + hg * kI[-1]  # predictor: the previous stage's implicit slope
            ti = _node(t0, h, c[i])
            newton = self._newton_shared if shared else self._newton
            z, bad, theta, eta = newton(FI, ti, psi, z0, hg, LU, piv, eta, active & ~failed, rtol, atol, stats)
            failed = failed | bad
            theta_max = torch.maximum(theta_max, theta)
            kI.append((z - psi) / hg_safe)
            if kE is not None:
                kE.append(FE(ti, z))
        return kI, kE, failed, theta_max, eta

    def dense_coeffs(self, term, dense_info):
        t0, t1, y0, y1, f0, f1, ks = dense_info
        h = t1 - t0
        dt = h if isinstance(h, float) else h.to(y0.dtype).unsqueeze(-1)
        dense = self.ark.tensors(y0.dtype, y0.device)["dense"]
        if dense is None:
            return hermite_coeffs(y0, y1, f0, f1, dt)
        # C[p] = dt * sum_j dense[j, p] k_j: one (P, s) @ (s, N) product, batched per sample
        C = dense.t() @ torch.stack(ks, -2)
        return C * (dt if isinstance(dt, float) else dt.unsqueeze(-1))
