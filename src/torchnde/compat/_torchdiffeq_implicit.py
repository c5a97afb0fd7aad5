r"""torchdiffeq's fixed-grid implicit Runge--Kutta methods as torchnde solvers.

torchdiffeq's current sources (after its 0.2.5 release) list nine implicit methods for fixed grids:
``implicit_euler``, ``implicit_midpoint``, ``trapezoid``, ``radauIIA3``, ``gl4``, ``radauIIA5``,
``gl6``, ``sdirk2`` and ``trbdf2``. Here each is a :class:`FixedIRK` with its published Butcher
tableau, usable through :func:`torchnde.solve` with fixed steps (``ConstantStepSize``,
``StepTo``; they have no error estimate).

The step. With stage increments :math:`Z_i = Y_i - y_0`, an ``s``-stage method solves

.. math::
    Z = h (A \otimes I) F(y_0 + Z), \qquad F_i(y_0 + Z) = f(t_0 + c_i h, y_0 + Z_i),

all stages together, by simplified Newton iterations (Hairer & Wanner, *Solving ODEs II*, IV.8)

.. math::
    (I - h A \otimes J)\,\Delta^{(m)} = h (A \otimes I) F(y_0 + Z^{(m)}) - Z^{(m)},
    \qquad Z^{(m+1)} = Z^{(m)} + \Delta^{(m)},

with the Jacobian :math:`J = \partial f / \partial y(t_0, y_0)` (torchnde's
:func:`~torchnde.solvers._implicit.jacobian`, detached) and one LU factorisation of the
``(s n, s n)`` matrix per step; per sample in per-sample mode (``(B, s n, s n)`` through
``torch.linalg.lu_factor_ex``, each sample with its own convergence). A method whose first
stage is explicit (``trapezoid``, ``trbdf2``: first row of ``A`` zero, ``c_1 = 0``) uses
:math:`f(t_0, y_0)` for it and iterates on the other stages only. The new state is
:math:`y_1 = y_0 + h (b_1 - d\cdot a_{:,1}) f_0 + \sum_i d_i Z_i` with :math:`d = b^T A^{-1}` on
the implicit stages (no further evaluation; for the stiffly accurate methods :math:`y_1 = y_0 +
Z_s`). The Jacobian and LU are recomputed every step (the fixed-grid methods cannot shrink a
step whose Newton iteration failed, so they do not risk a stale one).

Convergence (Hairer & Wanner IV.8): with :math:`\theta_m = \|\Delta^{(m)}\| /
\|\Delta^{(m-1)}\|`, stop after at least two iterations when :math:`\theta_m / (1 - \theta_m)
\|\Delta^{(m)}\| \le 1` in the RMS norm scaled by
``newton_atol + newton_rtol * max(|y_0|, |y_0 + Z|)``; fail when :math:`\theta_m \ge 0.99`
(unless the iteration has stalled, at the rounding level of the residual, within a relative
``max(1e-9, sqrt(eps))``: 1.5e-8 in float64, 3.5e-4 in float32), a value is NaN/inf, after
``max_iters`` iterations, or when the LU factorisation is singular. A failure is the step's fifth return value
(:data:`~torchnde.solvers._implicit.NEWTON_DIVERGED` / ``NEWTON_SINGULAR``), which the loop turns
into ``Result.nonlinear_divergence`` / ``Result.singular_jacobian`` (fixed steps cannot be
shrunk). torchdiffeq instead runs Broyden iterations on the whole flattened batch and only
warns when they do not converge.

Gradients: autograd differentiates through the iterations (J and its LU are constants of the
iteration), plus one more iteration after convergence so that the derivative is that of the
converged stages.

Gauss--Legendre of order 4 uses its published nodes :math:`1/2 \mp \sqrt3/6`; torchdiffeq's
``gl4`` evaluates both stages at the first node, which changes its results for a non-autonomous
``func`` (by 3e-3 on a forced pendulum at ``step_size=0.05``; autonomous ones agree to 1e-9).

Tableaus: Hairer & Wanner, *Solving ODEs II* (2nd ed.), IV.5 (Gauss--Legendre, Radau IIA) and
IV.6 (SDIRK2: R. Alexander, SIAM J. Numer. Anal. 14, 1977); TR-BDF2: M. E. Hosea & L. F.
Shampine, Appl. Numer. Math. 20, 1996 (its ESDIRK form, :math:`\gamma = 1 - \sqrt2/2`).
"""

from __future__ import annotations

import math

import torch

from ..solvers import AbstractSolver
from ..solvers._base import hermite_coeffs
from ..solvers._implicit import NEWTON_DIVERGED, NEWTON_OK, NEWTON_SINGULAR, jacobian

__all__ = ["FixedIRK", "IRK_METHODS"]

#: a Newton iteration that stops contracting (rounding) within this relative error (or the square
#: root of the dtype's eps, if larger) is converged
_STALL_OK = 1e-9

_S2, _S3, _S6, _S15 = math.sqrt(2.0), math.sqrt(3.0), math.sqrt(6.0), math.sqrt(15.0)


def _where(mask, a, b):
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def _fd_jacobian(term, t, y: torch.Tensor) -> torch.Tensor:
    """Forward differences, ``(..., n, n)``: for vector fields that the autograd modes cannot
    differentiate (one that itself calls ``torch.autograd.grad``, such as an adjoint system,
    under ``torch.func``). ``n + 1`` evaluations; in per-sample mode each direction moves all rows."""
    with torch.no_grad():
        y = y.detach()
        f0 = term.vf(t, y)
        delta = torch.finfo(y.dtype).eps ** 0.5 * y.abs().clamp(min=1.0)
        cols = []
        for j in range(y.shape[-1]):
            yj = y.clone()
            yj[..., j] += delta[..., j]
            cols.append((term.vf(t, yj) - f0) / delta[..., j : j + 1])
        return torch.stack(cols, -1)


def _jacobian(term, t, y, batched, mode):
    """torchnde's :func:`jacobian` (detached), or forward differences where ``mode`` is ``"fd"``.
    Returns ``(J, mode)``: a ``torch.func`` mode that the vector field does not support falls back
    to forward differences, for this step and (through the solver state) the next ones."""
    if mode != "fd":
        try:
            return jacobian(term, t, y, batched, mode), mode
        except RuntimeError as e:
            if "functorch" not in str(e) and "transform" not in str(e):
                raise
    return _fd_jacobian(term, t, y), "fd"


class FixedIRK(AbstractSolver):
    """A fixed-step implicit Runge--Kutta method (see the module docstring). Subclasses set
    ``c``, ``a`` (rows of the full ``(s, s)`` matrix), ``b`` and ``order``.

    Args:
        max_iters: Newton iterations allowed per step (torchdiffeq's option; default 100).
        newton_rtol, newton_atol: the iteration stops when the predicted error is below
            ``newton_atol + newton_rtol * |Y|`` (RMS over the stages); raised to at least
            ``100 eps`` and ``10 eps`` of the state's dtype.
        jacobian: ``"auto"``, ``"loop"``, ``"fwd"`` or ``"rev"`` (as for torchnde's ESDIRK solvers),
            or ``"fd"`` (forward differences). A ``torch.func`` mode that the vector field does not
            support (e.g. an adjoint system that calls ``torch.autograd.grad``) falls back to
            ``"fd"``.
    """

    c: tuple
    a: tuple
    b: tuple
    dense_order = 3

    def __init__(self, max_iters: int = 100, newton_rtol: float = 1e-12, newton_atol: float = 1e-14, jacobian="auto"):
        if not (isinstance(max_iters, int) and max_iters >= 1):
            raise ValueError(f"{type(self).__name__}(max_iters=...) must be an int >= 1, got {max_iters!r}")
        for name, v in (("newton_rtol", newton_rtol), ("newton_atol", newton_atol)):
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{type(self).__name__}({name}=...) must be a finite float > 0, got {v!r}")
        if jacobian not in ("auto", "loop", "fwd", "rev", "fd"):
            raise ValueError(
                f"{type(self).__name__}(jacobian=...) must be 'auto', 'loop', 'fwd', 'rev' or 'fd', got {jacobian!r}"
            )
        self.max_iters = max_iters
        self.newton_rtol, self.newton_atol = float(newton_rtol), float(newton_atol)
        self.jacobian = jacobian
        s = len(self.c)
        self.explicit_first = self.c[0] == 0 and all(x == 0 for x in self.a[0])
        i0 = 1 if self.explicit_first else 0
        A = torch.tensor(self.a, dtype=torch.float64)
        b = torch.tensor(self.b, dtype=torch.float64)
        self.imp = list(range(i0, s))
        A_ii = A[i0:, i0:]
        d = torch.linalg.solve(A_ii.T, b[i0:])  # d = b_I^T A_II^-1
        e0 = float(b[0] - d @ A[i0:, 0]) if i0 else 0.0
        self._coef = {"A_ii": A_ii, "a_i0": A[i0:, 0] if i0 else None, "d": d, "e0": e0}
        self._cache = {}

    def _key(self):
        return (type(self), self.max_iters, self.newton_rtol, self.newton_atol, self.jacobian)

    def __eq__(self, other):
        return isinstance(other, FixedIRK) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return f"{type(self).__name__}(max_iters={self.max_iters})"

    def _tensors(self, dtype, device):
        key = (dtype, device)
        out = self._cache.get(key)
        if out is None:
            out = {
                k: v.to(dtype=dtype, device=device) if isinstance(v, torch.Tensor) else v for k, v in self._coef.items()
            }
            self._cache[key] = out
        return out

    def init(self, term, t0, y0):
        if term.rough:
            raise TypeError(f"{type(self).__name__} solves ODEs only")
        if y0.is_complex():
            raise TypeError(
                f"{type(self).__name__} needs a real state, got dtype {y0.dtype}; split a complex state into its "
                "real and imaginary parts (torch.view_as_real) to use an implicit method"
            )
        f0 = term.vf(t0, y0)
        B = y0.shape[0] if getattr(term, "batched", False) else 1
        return f0, torch.ones(B, dtype=y0.dtype, device=y0.device), self.jacobian

    def initial_derivative(self, state):
        return state[0]

    def step(self, term, t0, t1, y0, state):
        f0, eta, jac_mode = state
        batched = getattr(term, "batched", False)
        yb = y0 if batched else y0.unsqueeze(0)
        f0b = f0 if batched else f0.unsqueeze(0)
        B, n = yb.shape
        co = self._tensors(yb.dtype, yb.device)
        m = len(self.imp)
        h = t1 - t0
        hb = (
            h.to(yb.dtype).view(B, 1, 1)
            if batched
            else torch.full((1, 1, 1), float(h), dtype=yb.dtype, device=yb.device)
        )
        times = [t0 + self.c[i] * h for i in self.imp]

        def F(Z):  # (B, m, n) -> the vector field at the implicit stages, (B, m, n)
            Y = yb.unsqueeze(1) + Z
            if batched:
                return torch.stack([term.vf(ti, Y[:, k]) for k, ti in enumerate(times)], 1)
            return torch.stack([term.vf(ti, Y[0, k]) for k, ti in enumerate(times)], 0).unsqueeze(0)

        A = co["A_ii"]  # (m, m)
        base = None
        if self.explicit_first:  # the explicit first stage's contribution h a_i1 f0
            base = hb * co["a_i0"].view(1, m, 1) * f0b.unsqueeze(1)

        # Jacobian at (t0, y0) and the LU of I - h (A kron J), (B, m n, m n)
        J, jac_mode = _jacobian(term, t0, y0, batched, jac_mode)
        J = J if batched else J.unsqueeze(0)
        M = hb.view(B, 1, 1, 1, 1) * A.view(1, m, 1, m, 1) * J.view(B, 1, n, 1, n)
        M = torch.eye(m * n, dtype=yb.dtype, device=yb.device) - M.reshape(B, m * n, m * n)
        LU, piv, info = torch.linalg.lu_factor_ex(M)
        singular = info != 0

        eps = torch.finfo(yb.dtype).eps
        rtol, atol = max(self.newton_rtol, 100 * eps), max(self.newton_atol, 10 * eps)
        stall_ok = max(1.0, max(_STALL_OK, eps**0.5) / rtol)  # in units of the tolerance
        # predictor: Z_i = c_i h f0
        c_imp = torch.tensor([self.c[i] for i in self.imp], dtype=yb.dtype, device=yb.device)
        Z = hb * c_imp.view(1, m, 1) * f0b.unsqueeze(1)

        def residual(Z):
            r = torch.einsum("ij,bjn->bin", A, F(Z)) * hb - Z
            return r if base is None else r + base

        def solve_lin(r):
            return torch.linalg.lu_solve(LU, piv, r.reshape(B, m * n, 1)).view(B, m, n)

        y0_abs = yb.detach().abs().unsqueeze(1)
        done = singular.clone()
        failed = singular.clone()
        nrm_old = torch.ones(B, dtype=yb.dtype, device=yb.device)
        theta = torch.zeros_like(nrm_old)
        eta_new = eta
        for it in range(self.max_iters):
            run = ~done
            dZ = solve_lin(residual(Z))
            with torch.no_grad():
                # (the size of the state at the step start too: a stage value near zero of a
                # large component, e.g. a stiff mode that changes sign, cannot be resolved better
                # than the rounding of that component)
                scale = atol + rtol * torch.maximum((yb.unsqueeze(1) + Z).detach().abs(), y0_abs)
                nrm = torch.linalg.vector_norm((dZ.detach() / scale).reshape(B, -1), dim=-1) / math.sqrt(m * n)
                nrm = torch.nan_to_num(nrm, nan=math.inf)
                bad = ~torch.isfinite(nrm)
                conv = nrm == 0
                if it > 0:
                    th = nrm / nrm_old.clamp(min=1e-300)
                    theta = th if it == 1 else torch.sqrt(th * theta)
                    eta_it = theta / (1 - theta).clamp(min=eps)
                    conv = conv | (eta_it * nrm <= 1)
                    # stalled at the rounding level of the residual, close enough to the solution
                    slow = theta >= 0.99
                    conv = conv | (slow & (nrm <= stall_ok))
                    bad = bad | (slow & ~conv)
                    eta_new = torch.where(run & conv & ~bad, eta_it, eta_new)
                bad = bad & run
                conv = conv & run & ~bad
            Z = _where(run & ~bad, Z + dZ, Z)
            failed = failed | bad
            done = done | bad | conv
            if not bool((~done).any()):
                break
            nrm_old = torch.where(run, nrm, nrm_old)
        failed = failed | ~done
        if torch.is_grad_enabled() and (Z.requires_grad or f0b.requires_grad or yb.requires_grad):
            # one more iteration for autograd: the derivative of an iterate is that of the residual at
            # the one before it, so this makes it the derivative at the converged stages
            Z = _where(failed, Z, Z + solve_lin(residual(Z)))

        d = co["d"]
        inc = torch.einsum("i,bin->bn", d, Z)
        if self.explicit_first and co["e0"] != 0.0:
            inc = inc + hb.view(B, 1) * co["e0"] * f0b
        y1 = yb + inc
        code = torch.where(singular, NEWTON_SINGULAR, torch.where(failed, NEWTON_DIVERGED, NEWTON_OK))
        if bool(failed.any()):
            y1 = _where(failed, yb, y1)
            eta_new = torch.where(failed, torch.ones_like(eta_new), eta_new)
        if not batched:
            y1, code = y1[0], code[0]
        f1 = term.vf(t1, y1)
        return y1, None, (t0, t1, y0, y1, f0, f1), (f1, eta_new, jac_mode), code

    def dense_coeffs(self, term, dense_info):
        t0, t1, y0, y1, f0, f1 = dense_info
        h = t1 - t0
        dt = h if isinstance(h, float) else h.to(y0.dtype).unsqueeze(-1)
        return hermite_coeffs(y0, y1, f0, f1, dt)


def _method(name, order, c, a, b, doc):
    return type(name, (FixedIRK,), {"c": c, "a": a, "b": b, "order": order, "__doc__": doc, "__module__": __name__})


_G = 1.0 - _S2 / 2  # SDIRK2's and TR-BDF2's gamma

ImplicitEulerIRK = _method("ImplicitEulerIRK", 1, (1.0,), ((1.0,),), (1.0,), "Implicit Euler (Radau IIA, s = 1).")
ImplicitMidpoint = _method(
    "ImplicitMidpoint", 2, (0.5,), ((0.5,),), (1.0,), "The implicit midpoint rule (Gauss--Legendre, s = 1)."
)
Trapezoid = _method(
    "Trapezoid", 2, (0.0, 1.0), ((0.0, 0.0), (0.5, 0.5)), (0.5, 0.5), "The trapezoidal rule (Lobatto IIIA, s = 2)."
)
RadauIIA3 = _method(
    "RadauIIA3",
    3,
    (1 / 3, 1.0),
    ((5 / 12, -1 / 12), (3 / 4, 1 / 4)),
    (3 / 4, 1 / 4),
    "Radau IIA of order 3 (2 stages).",
)
GaussLegendre4 = _method(
    "GaussLegendre4",
    4,
    (0.5 - _S3 / 6, 0.5 + _S3 / 6),
    ((1 / 4, 1 / 4 - _S3 / 6), (1 / 4 + _S3 / 6, 1 / 4)),
    (0.5, 0.5),
    "Gauss--Legendre of order 4 (2 stages).",
)
RadauIIA5 = _method(
    "RadauIIA5",
    5,
    ((4 - _S6) / 10, (4 + _S6) / 10, 1.0),
    (
        ((88 - 7 * _S6) / 360, (296 - 169 * _S6) / 1800, (-2 + 3 * _S6) / 225),
        ((296 + 169 * _S6) / 1800, (88 + 7 * _S6) / 360, (-2 - 3 * _S6) / 225),
        ((16 - _S6) / 36, (16 + _S6) / 36, 1 / 9),
    ),
    ((16 - _S6) / 36, (16 + _S6) / 36, 1 / 9),
    "Radau IIA of order 5 (3 stages).",
)
GaussLegendre6 = _method(
    "GaussLegendre6",
    6,
    (0.5 - _S15 / 10, 0.5, 0.5 + _S15 / 10),
    (
        (5 / 36, 2 / 9 - _S15 / 15, 5 / 36 - _S15 / 30),
        (5 / 36 + _S15 / 24, 2 / 9, 5 / 36 - _S15 / 24),
        (5 / 36 + _S15 / 30, 2 / 9 + _S15 / 15, 5 / 36),
    ),
    (5 / 18, 4 / 9, 5 / 18),
    "Gauss--Legendre of order 6 (3 stages).",
)
SDIRK2 = _method(
    "SDIRK2",
    2,
    (_G, 1.0),
    ((_G, 0.0), (1 - _G, _G)),
    (1 - _G, _G),
    "Alexander's L-stable two-stage SDIRK method of order 2 (gamma = 1 - sqrt(2)/2).",
)
TRBDF2 = _method(
    "TRBDF2",
    2,
    (0.0, 2 * _G, 1.0),
    ((0.0, 0.0, 0.0), (_G, _G, 0.0), (_S2 / 4, _S2 / 4, _G)),
    (_S2 / 4, _S2 / 4, _G),
    "TR-BDF2 (Hosea & Shampine) as an ESDIRK method: a trapezoidal stage to 2 gamma h, then BDF2.",
)

#: torchdiffeq's method names
IRK_METHODS = {
    "implicit_euler": ImplicitEulerIRK,
    "implicit_midpoint": ImplicitMidpoint,
    "trapezoid": Trapezoid,
    "radauIIA3": RadauIIA3,
    "gl4": GaussLegendre4,
    "radauIIA5": RadauIIA5,
    "gl6": GaussLegendre6,
    "sdirk2": SDIRK2,
    "trbdf2": TRBDF2,
}
