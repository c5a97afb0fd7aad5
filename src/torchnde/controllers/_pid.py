"""Adaptive step-size control: the PID controller of Söderlind (2003)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .._results import Result
from ._base import AbstractController

__all__ = ["PIDController", "rms_norm"]


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Root-mean-square over the last dimension (the flattened state of each sample)."""
    return torch.linalg.vector_norm(x, dim=-1) / math.sqrt(max(x.shape[-1], 1))  # (an empty state: 0)


class _RMS:
    """A vector norm awaiting its 1/sqrt(N) factor, so that the division happens on a Python
    float (one step size for the state) instead of as one more tensor op per step."""

    __slots__ = ("norm", "n")

    def __init__(self, norm, n):
        self.norm, self.n = norm, n


def _to_scalar(ops, value):
    if isinstance(value, _RMS):
        return ops.to_scalar(value.norm) / math.sqrt(max(value.n, 1))
    return ops.to_scalar(value)


class PIDController(AbstractController):
    r"""Adaptive step sizes from an embedded error estimate.

    A step with error estimate :math:`e` is accepted when
    :math:`\|e / (\mathrm{atol} + \mathrm{rtol}\max(|y_0|, |y_1|))\| \le 1`. The next step is
    :math:`h_{n+1} = h_n \cdot \mathrm{safety}\cdot \varepsilon_n^{\beta_1}
    \varepsilon_{n-1}^{\beta_2}\varepsilon_{n-2}^{\beta_3}` with :math:`\varepsilon = 1/\|\cdot\|`,
    :math:`\beta_1 = (p + i + d)/k`, :math:`\beta_2 = -(p + 2d)/k`, :math:`\beta_3 = d/k` and
    :math:`k` one more than the order of the error estimate (Söderlind 2003; Hairer, Nørsett &
    Wanner, *Solving ODEs I/II*). The default ``pcoeff=0, icoeff=1, dcoeff=0`` is the classic
    integral controller. After a rejection the step shrinks by the integral rule alone.

    When ``solve`` gets ``dt0=None`` the first step is chosen by the algorithm of Hairer, Nørsett
    & Wanner (*Solving ODEs I*, II.4), costing one extra vector-field evaluation.

    Args:
        rtol, atol: relative and absolute tolerances (> 0 between them).
        pcoeff, icoeff, dcoeff: PID coefficients (e.g. ``pcoeff=0.4, icoeff=0.3`` is Hairer's PI
            controller scaled per Söderlind).
        safety: factor < 1 applied to every proposed step.
        factormin, factormax: bounds on the ratio of consecutive step sizes.
        dtmin: smallest step allowed. A step that would need to be smaller fails with
            ``dt_min_reached`` unless ``force_dtmin=True``, which accepts steps of size ``dtmin``.
        dtmax: largest step allowed.
        force_dtmin: see ``dtmin``.
        step_ts: times that steps must land on (e.g. known features of the vector field).
        jump_ts: times of discontinuities of the vector field: steps land on them and the
            derivative is re-evaluated after the jump (an FSAL stage is not reused across it).
        norm: the norm of the scaled error, ``norm(x) -> tensor`` reducing the last dimension
            (the flattened state; in per-sample mode ``x`` has shape ``(batch, N)``). RMS by
            default.
    """

    def __init__(
        self,
        rtol: float = 1e-3,
        atol: float = 1e-6,
        pcoeff: float = 0.0,
        icoeff: float = 1.0,
        dcoeff: float = 0.0,
        safety: float = 0.9,
        factormin: float = 0.2,
        factormax: float = 10.0,
        dtmin: float | None = None,
        dtmax: float | None = None,
        force_dtmin: bool = False,
        step_ts: Sequence[float] | torch.Tensor | None = None,
        jump_ts: Sequence[float] | torch.Tensor | None = None,
        norm: Callable[[torch.Tensor], torch.Tensor] = rms_norm,
    ):
        for name, v in (("rtol", rtol), ("atol", atol)):
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ValueError(f"PIDController({name}=...) must be a finite float >= 0, got {v!r}")
        if rtol == 0 and atol == 0:
            raise ValueError("PIDController needs rtol > 0 or atol > 0; got rtol=0 and atol=0")
        if not 0 < safety <= 1:
            raise ValueError(f"PIDController(safety=...) must be in (0, 1], got {safety!r}")
        if not 0 < factormin <= 1 <= factormax:
            raise ValueError(
                f"PIDController needs 0 < factormin <= 1 <= factormax; got factormin={factormin!r}, "
                f"factormax={factormax!r}"
            )
        if dtmin is not None and dtmin < 0:
            raise ValueError(f"PIDController(dtmin=...) must be >= 0, got {dtmin!r}")
        if dtmax is not None and dtmax <= 0:
            raise ValueError(f"PIDController(dtmax=...) must be > 0, got {dtmax!r}")
        if dtmin is not None and dtmax is not None and dtmin > dtmax:
            raise ValueError(f"PIDController needs dtmin <= dtmax; got dtmin={dtmin!r}, dtmax={dtmax!r}")
        if force_dtmin and not dtmin:
            raise ValueError("PIDController(force_dtmin=True) needs a positive dtmin")
        if not callable(norm):
            raise TypeError(f"PIDController(norm=...) must be callable, got {type(norm).__name__}")
        self.rtol, self.atol = float(rtol), float(atol)
        self.pcoeff, self.icoeff, self.dcoeff = float(pcoeff), float(icoeff), float(dcoeff)
        self.safety, self.factormin, self.factormax = float(safety), float(factormin), float(factormax)
        self.dtmin = float(dtmin) if dtmin is not None else 0.0
        self.dtmax = float(dtmax) if dtmax is not None else None
        self.force_dtmin = force_dtmin
        self.step_ts = _as_times(step_ts, "step_ts")
        self.jump_ts = _as_times(jump_ts, "jump_ts")
        self.norm = norm
        self._tol_cache: dict = {}
        self._pre = None  # (error estimate, its scaled norm) from a compiled step, used once

    def __repr__(self):
        return f"PIDController(rtol={self.rtol}, atol={self.atol})"

    def _tolerances(self, like: torch.Tensor):
        """rtol and atol as 0-d tensors of ``like``'s real dtype and device (cached constants),
        so the error scale is one fused ``addcmul``."""
        key = (like.dtype, like.device)
        tols = self._tol_cache.get(key)
        if tols is None:
            kw = dict(dtype=like.dtype, device=like.device)
            tols = self._tol_cache[key] = (torch.tensor(self.rtol, **kw), torch.tensor(self.atol, **kw))
        return tols

    def _scaled_norm(self, x, y0, y1=None):
        pre = getattr(self, "_pre", None)  # the norm of x, computed inside a compiled step (torchnde/_compile.py)
        if pre is not None:
            self._pre = None
            if pre[0] is x:
                return pre[1]
        # step sizes are policy, not part of the differentiated computation: detach (cheaper than
        # entering a no_grad context every step; without autograd there is nothing to detach)
        if torch.is_grad_enabled():
            x, y0 = x.detach(), y0.detach()
            y1 = None if y1 is None else y1.detach()
        a0 = y0.abs()
        m = a0 if y1 is None else torch.maximum(a0, y1.abs())
        tols = self._tol_cache.get((m.dtype, m.device))
        rtol, atol = tols if tols is not None else self._tolerances(m)
        ratio = x / torch.addcmul(atol, m, rtol)
        if self.norm is rms_norm:  # fast path: the 1/sqrt(N) is applied by the caller's ops
            return _RMS(torch.linalg.vector_norm(ratio, dim=-1), ratio.shape[-1])
        return self.norm(ratio)

    def init(self, term, solver, t0, t1, y0, f0, dt0, ops):
        cstate = (ops.full(1.0), ops.full(1.0))
        if dt0 is not None:
            return ops.full(dt0), cstate
        # Hairer, Nørsett & Wanner, Solving ODEs I, II.4 "automatic step size selection".
        if f0 is None:
            with torch.no_grad():
                f0 = term.vf(t0, y0)
        d0 = _to_scalar(ops, self._scaled_norm(y0, y0))
        d1 = _to_scalar(ops, self._scaled_norm(f0, y0))
        small = ops.or_(d0 < 1e-5, d1 < 1e-5)
        h0 = ops.where(small, ops.full(1e-6), 0.01 * d0 / ops.where(small, ops.full(1.0), d1))
        h0 = ops.minimum(h0, t1 - t0)
        h0 = ops.maximum(h0, 1e-300)
        h0y = h0 if not ops.batched else h0.to(y0.real.dtype if y0.is_complex() else y0.dtype).unsqueeze(-1)
        with torch.no_grad():
            y1 = y0.detach() + h0y * f0.detach() if ops.batched else torch.add(y0.detach(), f0.detach(), alpha=h0)
            f1 = term.vf(t0 + h0, y1)
        d2 = _to_scalar(ops, self._scaled_norm(f1 - f0.detach(), y0)) / h0
        d2 = ops.nan_to(d2, math.inf)
        dmax = ops.maximum(d1, d2)
        tiny = dmax <= 1e-15
        h1 = ops.where(
            tiny,
            ops.maximum(ops.full(1e-6), h0 * 1e-3),
            (0.01 / ops.where(tiny, ops.full(1.0), dmax)) ** (1.0 / ((solver.order or solver.error_order) + 1)),
        )
        dt = ops.minimum(100 * h0, h1)
        if self.dtmax is not None:
            dt = ops.minimum(dt, self.dtmax)
        if self.dtmin:
            dt = ops.maximum(dt, self.dtmin)
        return dt, cstate

    def adapt(self, t0, t1, y0, y1, y_error, error_order, cstate, ops):
        if not ops.batched:
            return self._adapt_scalar(t1 - t0, y0, y1, y_error, error_order, cstate)
        dt = t1 - t0
        err = _to_scalar(ops, self._scaled_norm(y_error, y0, y1))
        err = ops.nan_to(err, math.inf)
        accept = err <= 1.0
        k = error_order + 1
        b1 = (self.pcoeff + self.icoeff + self.dcoeff) / k
        b2 = -(self.pcoeff + 2 * self.dcoeff) / k
        b3 = self.dcoeff / k
        inv = 1.0 / ops.maximum(err, 1e-300)
        prev1, prev2 = cstate
        shrink = self.safety * inv ** (1.0 / k)  # after a rejection: the integral rule alone
        grow = shrink if b1 == 1.0 / k else self.safety * inv**b1
        if b2:
            grow = grow * prev1**b2
        if b3:
            grow = grow * prev2**b3
        if grow is shrink:  # integral control: one clamp serves both cases
            factor = ops.clamp(grow, self.factormin, ops.where(accept, self.factormax, 1.0))
        else:
            factor = ops.where(
                accept,
                ops.clamp(grow, self.factormin, self.factormax),
                ops.clamp(shrink, self.factormin, 1.0),
            )
        dt_next = dt * factor
        if self.dtmax is not None:
            dt_next = ops.minimum(dt_next, self.dtmax)
        result = None
        if self.dtmin:
            if self.force_dtmin:
                at_min = dt <= self.dtmin * (1 + 1e-12)
                accept = ops.or_(accept, ops.and_(at_min, ops.isfinite(err)))
                dt_next = ops.maximum(dt_next, self.dtmin)
            else:
                too_small = ops.and_(ops.not_(accept), dt_next < self.dtmin)
                result = (too_small, Result.dt_min_reached)
        if b2 or b3:  # only a PI/PID controller needs the error history
            cstate = (ops.where(accept, inv, prev1), ops.where(accept, prev1, prev2))
        return accept, dt_next, cstate, result

    def _adapt_scalar(self, dt, y0, y1, y_error, error_order, cstate, memo=None):
        """:meth:`adapt` with one step size (``ScalarOps``): the same arithmetic on Python floats,
        written out (it runs once per step, and the calls into ``ops`` cost as much as the rest).
        ``memo``: a list ``[y, |y|]`` the caller keeps for one solve, so that ``|y1|`` of an
        accepted step is not computed again as the next step's ``|y0|``."""
        if self.norm is rms_norm and getattr(self, "_pre", None) is None and not torch.is_grad_enabled():
            # _scaled_norm's RMS path inline (nothing to detach)
            tols = self._tol_cache.get((y0.dtype, y0.device))
            rtol, atol = tols if tols is not None else self._tolerances(y0)
            if memo is None:
                m = torch.maximum(y0.abs(), y1.abs())
            else:
                a1 = y1.abs()
                m = torch.maximum(memo[1] if memo[0] is y0 else y0.abs(), a1)
                memo[0], memo[1] = y1, a1
            n = y_error.shape[-1]
            err = torch.linalg.vector_norm(y_error / torch.addcmul(atol, m, rtol), dim=-1).item() / math.sqrt(max(n, 1))
        else:
            v = self._scaled_norm(y_error, y0, y1)
            err = v.norm.item() / math.sqrt(max(v.n, 1)) if type(v) is _RMS else v.item()
        if err != err:
            err = math.inf
        accept = err <= 1.0
        k = error_order + 1
        b1 = (self.pcoeff + self.icoeff + self.dcoeff) / k
        b2 = -(self.pcoeff + 2 * self.dcoeff) / k
        b3 = self.dcoeff / k
        inv = 1.0 / (err if err >= 1e-300 else 1e-300)
        prev1, prev2 = cstate
        shrink = self.safety * inv ** (1.0 / k)  # after a rejection: the integral rule alone
        fmin = self.factormin
        if b1 == 1.0 / k and not b2 and not b3:  # integral control: one clamp serves both cases
            hi = self.factormax if accept else 1.0
            factor = fmin if shrink < fmin else (hi if shrink > hi else shrink)
        else:
            grow = shrink if b1 == 1.0 / k else self.safety * inv**b1
            if b2:
                grow = grow * prev1**b2
            if b3:
                grow = grow * prev2**b3
            if accept:
                hi = self.factormax
                factor = fmin if grow < fmin else (hi if grow > hi else grow)
            else:
                factor = fmin if shrink < fmin else (1.0 if shrink > 1.0 else shrink)
        dt_next = dt * factor
        dtmax = self.dtmax
        if dtmax is not None and not dt_next <= dtmax:
            dt_next = dtmax
        result = None
        dtmin = self.dtmin
        if dtmin:
            if self.force_dtmin:
                at_min = dt <= dtmin * (1 + 1e-12)
                accept = accept or (at_min and math.isfinite(err))
                if not dt_next >= dtmin:
                    dt_next = dtmin
            else:
                result = ((not accept) and dt_next < dtmin, Result.dt_min_reached)
        if b2 or b3:  # only a PI/PID controller needs the error history
            cstate = (inv if accept else prev1, prev1 if accept else prev2)
        return accept, dt_next, cstate, result


def _as_times(ts, name):
    if ts is None:
        return None
    t = torch.as_tensor(ts, dtype=torch.float64).detach().cpu().flatten()
    if t.numel() == 0:
        return None
    if not torch.isfinite(t).all():
        raise ValueError(f"PIDController({name}=...) must be finite, got {t.tolist()}")
    return torch.unique(t)  # sorted, deduplicated
