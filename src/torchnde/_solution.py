"""The value a solve returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ._results import Result

__all__ = ["Solution", "DenseInterpolation"]


def _horner(C: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``sum_p C[..., p, :] * theta**(p+1)`` with ``theta`` broadcast over the last dim."""
    acc = C[..., -1, :]
    scalar = isinstance(theta, float)
    for p in range(C.shape[-2] - 2, -1, -1):
        acc = torch.add(C[..., p, :], acc, alpha=theta) if scalar else torch.addcmul(C[..., p, :], acc, theta)
    return acc * theta


def _horner_derivative(C: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``d/dtheta sum_p C[..., p, :] * theta**(p+1)``."""
    P = C.shape[-2]
    acc = C[..., -1, :] * P
    for p in range(P - 2, -1, -1):
        acc = torch.addcmul(C[..., p, :] * (p + 1), acc, theta)
    return acc


class DenseInterpolation:
    """Piecewise-polynomial dense output of a solve: each accepted step's own interpolant.

    Stores per step its start time, length, start value and polynomial coefficients, in the
    internal (forward) time. In per-sample mode every array has a leading batch dimension and
    steps past a sample's last step are padding (``t_end = +inf``).
    """

    def __init__(self, t_start, t_end, y_start, coeffs, direction, flattener, batched):
        self.t_start = t_start  # (S,) or (B, S)
        self.t_end = t_end
        self.y_start = y_start  # (S, N) or (B, S, N)
        self.coeffs = coeffs  # (S, P, N) or (B, S, P, N)
        self.direction = direction
        self.flattener = flattener
        self.batched = batched

    def _locate(self, t):
        tau = torch.as_tensor(t, dtype=self.t_start.dtype, device=self.t_start.device) * self.direction
        if self.batched:
            B = self.t_start.shape[0]
            scalar_per_sample = tau.dim() <= 1
            q = tau.reshape(1, 1).expand(B, 1) if tau.dim() == 0 else (tau.reshape(B, 1) if tau.dim() == 1 else tau)
            idx = torch.searchsorted(self.t_end.contiguous(), q.contiguous())
            nvalid = torch.isfinite(self.t_end).sum(-1, keepdim=True).clamp(min=1)
            idx = torch.minimum(idx, nvalid - 1)
            t0 = torch.gather(self.t_start, 1, idx)
            h = torch.gather(self.t_end, 1, idx) - t0
            theta = (q - t0) / h
            bi = torch.arange(B, device=idx.device).unsqueeze(-1).expand_as(idx)
            return tau, scalar_per_sample, idx, bi, theta, h
        flat = tau.reshape(-1)
        idx = torch.searchsorted(self.t_end, flat).clamp(max=self.t_end.shape[0] - 1)
        t0 = self.t_start[idx]
        h = self.t_end[idx] - t0
        return tau, None, idx, None, (flat - t0) / h, h

    def _finish(self, vals, tau, scalar_per_sample):
        if self.batched:
            # vals: (B, T, N)
            if scalar_per_sample:
                return self.flattener.unflatten(vals[:, 0])
            lead = vals.transpose(0, 1)  # (T, B, N)
            from ._tree import tree_map

            return tree_map(lambda x: x.movedim(0, 1), self.flattener.unflatten(lead))
        vals = vals.reshape(*tau.shape, vals.shape[-1])
        return self.flattener.unflatten(vals)

    def evaluate(self, t) -> Any:
        tau, sps, idx, bi, theta, h = self._locate(t)
        dt = self.y_start.dtype
        th = theta.to(dt.to_real() if dt.is_complex else dt).unsqueeze(-1)
        if self.batched:
            C, y0 = self.coeffs[bi, idx], self.y_start[bi, idx]
        else:
            C, y0 = self.coeffs[idx], self.y_start[idx]
        return self._finish(y0 + _horner(C, th), tau, sps)

    def derivative(self, t) -> Any:
        tau, sps, idx, bi, theta, h = self._locate(t)
        dt = self.y_start.dtype
        rd = dt.to_real() if dt.is_complex else dt
        th = theta.to(rd).unsqueeze(-1)
        C = self.coeffs[bi, idx] if self.batched else self.coeffs[idx]
        d = _horner_derivative(C, th) / (h.to(rd).unsqueeze(-1) * self.direction)
        return self._finish(d, tau, sps)


@dataclass
class Solution:
    """What ``solve`` returns.

    Attributes:
        ts: the saved times, shape ``(T,)`` (per-sample mode: ``(batch, T)``).
        ys: the saved states with the structure of ``y0``; each tensor has a leading time
            dimension ``(T, *shape)`` (per-sample mode: ``(batch, T, *shape[1:])``). ``None`` when
            only dense output was asked for.
        stats: ``num_steps``, ``num_accepted``, ``num_rejected``, ``num_rejected_nonfinite`` (the
            rejected steps whose state or error estimate was NaN/inf; ints, or ``(batch,)`` tensors
            in per-sample mode) and ``nfe`` (vector-field evaluations).
        result: a :class:`Result` (per-sample mode: an int tensor of codes, one per sample).
        t0, t1: the interval that was solved.
        t_final: where the solve stopped: ``t1`` if it succeeded, else the time of its last
            accepted step, where it failed (a float; per-sample mode: a ``(batch,)`` tensor); the
            event time if a terminal event ended it.
        events: with ``solve(..., event=...)``: an :class:`~torchnde.EventRecord` (event times,
            which event fired, the states before and after, counts); ``None`` otherwise.
    """

    ts: torch.Tensor | None
    ys: Any
    stats: dict
    result: Any
    t0: Any = None
    t1: Any = None
    interpolation: DenseInterpolation | None = field(default=None, repr=False)
    internal: dict | None = field(default=None, repr=False)  # for adjoints: steps, final state
    t_final: Any = None
    events: Any = None

    @property
    def successful(self) -> bool:
        """Whether every sample reached t1."""
        r = self.result
        return bool((r == Result.successful).all()) if isinstance(r, torch.Tensor) else r == Result.successful

    def _need_dense(self):
        if self.interpolation is None:
            raise ValueError(
                "this solution has no dense output; solve with saveat=SaveAt(dense=True) to use "
                "evaluate() and derivative()"
            )
        return self.interpolation

    def evaluate(self, t) -> Any:
        """The solution at time(s) ``t`` from the solver's dense output.

        ``t`` is a scalar or a 1-D tensor of times (per-sample mode: a scalar, a ``(batch,)``
        tensor of one time per sample, or ``(batch, T)``); extra dimensions lead the result.
        """
        return self._need_dense().evaluate(t)

    def derivative(self, t) -> Any:
        """The time derivative of the dense output at time(s) ``t`` (same shapes as ``evaluate``)."""
        return self._need_dense().derivative(t)
