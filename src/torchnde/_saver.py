"""What the loop keeps (``SaveAt``) and how it becomes ``Solution.ts`` / ``Solution.ys``.

A saver sees the solve three times: at the start (``t0``, and save times equal to ``t0``), after
each accepted step (:meth:`save`: save times inside the step from the step's dense output, the
step end for ``steps=True``, the step's polynomial for ``dense=True``) and at the end
(:meth:`assemble`: ``t0``, ``ts``, steps, ``t1`` in that order, and the dense interpolation).
:class:`SharedSaver` keeps Python-float times (one step size for the batch); :class:`BatchSaver`
keeps ``(batch,)`` rows and masks and compacts them per sample at the end.
"""

from __future__ import annotations

import math

import torch

from ._solution import DenseInterpolation, _horner
from ._stops import EPS_LAND
from ._tree import tree_map

__all__ = ["SharedSaver", "BatchSaver"]


def _poly(y0, C, theta):
    return y0 + _horner(C, theta)


class SharedSaver:
    """Saving with one (Python float) time for the whole state."""

    def __init__(self, saveat, ts_save, flat, tau0, y0, sign, time_dtype):
        self.saveat, self.ts_save, self.flat, self.sign, self.time_dtype = saveat, ts_save, flat, sign, time_dtype
        self.tau0, self.y_t0 = tau0, y0
        self.ts_y: list = []  # values at ts_save[:len(ts_y)]
        self.steps_t: list = []  # floats
        self.steps_y: list = []
        self.dense_rows: list = []  # (t, t_next, y, C)
        self.ts_ptr = 0
        if ts_save is not None:
            while self.ts_ptr < len(ts_save) and ts_save[self.ts_ptr] <= tau0:
                self.ts_y.append(y0)
                self.ts_ptr += 1

    def save(self, step):
        """After an accepted step ``step.t -> step.t_next``."""
        ts_save = self.ts_save
        if ts_save is not None:
            t, t_next = step.t, step.t_next
            h = t_next - t
            ptr, T = self.ts_ptr, len(ts_save)
            while ptr < T and ts_save[ptr] <= t_next + EPS_LAND * h:
                tau_s = ts_save[ptr]
                if tau_s >= t_next:
                    self.ts_y.append(step.y1)
                else:
                    self.ts_y.append(_poly(step.y, step.C, (tau_s - t) / h))
                ptr += 1
            self.ts_ptr = ptr
        if self.saveat.steps:
            self.steps_t.append(step.t_next)
            self.steps_y.append(step.y1)
        if self.saveat.dense:
            self.dense_rows.append((step.t, step.t_next, step.y, step.C))

    def assemble(self, t_end, y):
        """``(ts, ys, interpolation)`` of a solve that ended at internal time ``t_end`` in ``y``."""
        saveat, ts_save, flat = self.saveat, self.ts_save, self.flat
        interp = self._dense() if saveat.dense and self.dense_rows else None
        ts_list, ys_parts = [], []
        if saveat.t0:
            ts_list.append(self.tau0)
            ys_parts.append(self.y_t0)
        if ts_save is not None:
            n_saved, T = len(self.ts_y), len(ts_save)
            ts_list.extend(ts_save[:n_saved])
            ys_parts.extend(self.ts_y)
            if n_saved < T:  # failed before the last save times: pad with NaN
                ts_list.extend(ts_save[n_saved:])
                ys_parts.extend([torch.full_like(y, math.nan)] * (T - n_saved))
        if saveat.steps:
            ts_list.extend(self.steps_t)
            ys_parts.extend(self.steps_y)
        if saveat.t1:
            ts_list.append(t_end)
            ys_parts.append(y)
        sign = self.sign
        ts = torch.tensor([v * sign for v in ts_list], dtype=self.time_dtype, device=flat.device) if ts_list else None
        ys = flat.unflatten(torch.stack(ys_parts)) if ys_parts else None
        return ts, ys, interp

    def _dense(self):
        rows, dev = self.dense_rows, self.flat.device
        TS = torch.tensor([r[0] for r in rows], dtype=torch.float64, device=dev)
        TE = torch.tensor([r[1] for r in rows], dtype=torch.float64, device=dev)
        Y = torch.stack([r[2] for r in rows])
        C = torch.stack([r[3] for r in rows])
        return DenseInterpolation(TS, TE, Y, C, self.sign, self.flat, False)


class BatchSaver:
    """Per-sample saving: each step contributes a row for every sample and a mask of the samples
    whose step was accepted; rows are compacted per sample once, at the end."""

    def __init__(self, saveat, ts_save, flat, tau0, y0, sign, time_dtype):
        self.saveat, self.ts_save, self.flat, self.sign, self.time_dtype = saveat, ts_save, flat, sign, time_dtype
        self.tau0, self.y_t0 = tau0, y0
        self.step_rows: list = []  # (B, 1 + N): [t_next, y1]
        self.step_masks: list = []
        self.dense_rows: list = []  # (t, t_next, y, C, accept)
        if ts_save is not None:
            self.ts_vals: list = []  # (bidx, pidx, values) batches, assembled at the end
            self.ts_ptr = (ts_save <= tau0.unsqueeze(-1)).sum(-1)
            at0 = self.ts_ptr > 0  # save points at exactly t0
            if at0.any():
                bi = at0.nonzero().flatten()
                self.ts_vals.append((bi, torch.zeros_like(bi), y0[bi]))
                # more than one save time equal to t0 cannot happen (ts strictly monotone)

    def save(self, step):
        """After a step accepted for the samples in ``step.accept``."""
        if self.ts_save is not None:
            self._save_ts(step)
        if self.saveat.steps:
            self.step_rows.append(torch.cat([step.t_next.to(self.flat.dtype).unsqueeze(-1), step.y1], -1))
            self.step_masks.append(step.accept)
        if self.saveat.dense:
            self.dense_rows.append((step.t, step.t_next, step.y, step.C, step.accept))

    def _save_ts(self, step):
        """Every requested time that falls inside each sample's accepted step."""
        ts_save, ts_ptr = self.ts_save, self.ts_ptr
        t, t_next, y, accept = step.t, step.t_next, step.y, step.accept
        T = ts_save.shape[1]
        h = t_next - t
        h_safe = torch.where(h > 0, h, torch.ones_like(h))
        while True:
            inb = ts_ptr < T
            cand = torch.gather(ts_save, 1, ts_ptr.clamp(max=T - 1).unsqueeze(-1)).squeeze(-1)
            m = accept & inb & (cand <= t_next + 1e-9 * h)
            if not m.any():
                self.ts_ptr = ts_ptr
                return
            theta = ((cand - t) / h_safe).clamp(0, 1).to(y.real.dtype if y.is_complex() else y.dtype).unsqueeze(-1)
            vals = _poly(y, step.C, theta)
            vals = torch.where((cand >= t_next).unsqueeze(-1), step.y1, vals)
            bi = m.nonzero().flatten()
            self.ts_vals.append((bi, ts_ptr[bi], vals[bi]))
            ts_ptr = ts_ptr + m

    def assemble(self, t_end, y):
        """``(ts, ys, interpolation)``; ``t_end`` is each sample's internal end time."""
        saveat, ts_save, flat, sign = self.saveat, self.ts_save, self.flat, self.sign
        B = flat.batch_size
        interp = None
        if saveat.dense and (self.dense_rows or B == 0):  # (an empty batch: an interpolation of nothing)
            interp = self._dense()
        parts_t, parts_y = [], []
        if saveat.t0:
            parts_t.append((self.tau0 * sign).unsqueeze(-1))
            parts_y.append(self.y_t0.unsqueeze(1))
        if ts_save is not None:
            ts_out = torch.full((B, ts_save.shape[1], flat.size), math.nan, dtype=flat.dtype, device=flat.device)
            if self.ts_vals:  # one scatter of everything saved (differentiable, no in-place writes)
                bi, pi, vals = (torch.cat(parts) for parts in zip(*self.ts_vals))
                ts_out = ts_out.index_put((bi, pi), vals)
            parts_t.append(ts_save * sign)
            parts_y.append(ts_out)
        if saveat.steps:
            # (no step taken, e.g. an empty batch: no rows)
            R = _compact(self.step_rows, self.step_masks)[0] if self.step_rows else y.new_zeros(B, 0, flat.size + 1)
            parts_t.append(R[..., 0].real.to(self.time_dtype) * sign)
            parts_y.append(R[..., 1:])
        if saveat.t1:
            parts_t.append((t_end * sign).unsqueeze(-1))
            parts_y.append(y.unsqueeze(1))
        ts = torch.cat(parts_t, 1) if parts_t else None
        ys_all = torch.cat(parts_y, 1) if parts_y else None
        ys = None
        if ys_all is not None:
            ys = tree_map(lambda x: x.movedim(0, 1), flat.unflatten(ys_all.movedim(1, 0)))
        return ts, ys, interp

    def _dense(self):
        rows, flat = self.dense_rows, self.flat
        if not rows:  # an empty batch
            TS = torch.zeros(flat.batch_size, 0, dtype=self.time_dtype, device=flat.device)
            Y = torch.zeros(flat.batch_size, 0, flat.size, dtype=flat.dtype, device=flat.device)
            return DenseInterpolation(TS, TS, Y, Y.unsqueeze(-2), self.sign, flat, True)
        masks = [r[4] for r in rows]
        TS, _ = _compact([r[0] for r in rows], masks)
        TE, M = _compact([r[1] for r in rows], masks, pad_value=math.inf)
        Y, _ = _compact([r[2] for r in rows], masks)
        C, _ = _compact([r[3] for r in rows], masks)
        TS = torch.where(M, TS, TE)
        return DenseInterpolation(TS, TE, Y, C, self.sign, flat, True)


def _compact(rows: list, masks: list, pad_value=math.nan):
    """Per-sample compaction: rows (S, B, ...) with masks (S, B) -> (B, S', ...) with the selected
    rows of each sample first (in order) and ``pad_value`` after."""
    R = torch.stack(rows)  # (S, B, ...)
    M = torch.stack(masks)  # (S, B)
    order = torch.argsort((~M).to(torch.int8), dim=0, stable=True)
    idx = order.view(*order.shape, *([1] * (R.dim() - 2))).expand_as(R)
    R = torch.gather(R, 0, idx)
    Ms = torch.gather(M, 0, order)
    count = int(M.sum(0).max()) if M.numel() else 0
    R = R[:count]
    Ms = Ms[:count]
    fill = Ms.view(*Ms.shape, *([1] * (R.dim() - 2)))
    R = torch.where(fill, R, torch.full_like(R, pad_value))
    return R.movedim(0, 1), Ms.movedim(0, 1)
