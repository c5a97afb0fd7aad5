"""Checkpointed discretise-then-optimise gradients."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from .._saveat import SaveAt
from .._tree import Flattener
from ..controllers._grid import StepEnds
from ._base import AbstractAdjoint
from ._params import _graph_leaves, _scalar, check_reached

__all__ = ["CheckpointAdjoint"]


class CheckpointAdjoint(AbstractAdjoint):
    """Discretise-then-optimise with recomputation: exact gradients of the computed solution in
    memory that grows with the number of checkpoints, not the number of steps.

    The solve runs once without recording a graph, to find its steps. The recorded steps are then
    replayed in ``checkpoints`` segments, each under :func:`torch.utils.checkpoint.checkpoint`:
    only each segment's initial state (and the saved outputs) is kept, and a segment's steps are
    recomputed with a graph during the backward pass. Gradients equal those of
    :class:`DirectAdjoint` up to floating point (the same steps are taken); gradients reach ``y0``,
    tensors in ``args`` and every parameter the vector field uses, as with ordinary autograd.

    Cost: about three forward solves (find the steps, replay, recompute in backward) and peak
    memory of ``O(checkpoints + steps / checkpoints)`` steps' worth of activations;
    ``checkpoints=None`` uses ``ceil(sqrt(steps))``, the minimiser of that bound. (Binomial
    checkpointing, Griewank & Walther 2000, would cut recomputation further; it is not used yet.)

    Args:
        checkpoints: number of segments (``None``: the square root of the number of steps).
    """

    def __init__(self, checkpoints: int | None = None):
        if checkpoints is not None and (not isinstance(checkpoints, int) or checkpoints < 1):
            raise ValueError(f"CheckpointAdjoint(checkpoints=...) must be a positive int or None, got {checkpoints!r}")
        self.checkpoints = checkpoints

    def __repr__(self):
        return f"CheckpointAdjoint(checkpoints={self.checkpoints})"

    def loop(self, problem, integrate):
        if not torch.is_grad_enabled():
            return integrate(problem)
        if problem.per_sample:
            raise NotImplementedError(
                "CheckpointAdjoint does not support per_sample=True yet; use adjoint=DirectAdjoint() "
                "(exact, memory grows with the number of steps)"
            )
        saveat = problem.saveat
        if saveat.dense:
            raise NotImplementedError(
                "CheckpointAdjoint does not support SaveAt(dense=True) yet; save at times with "
                "SaveAt(ts=...), or use adjoint=DirectAdjoint() for differentiable dense output"
            )
        # 1. find the steps (no graph)
        with torch.no_grad():
            first = integrate(dataclasses.replace(problem, saveat=SaveAt(steps=True)))
        sign = 1.0 if _scalar(problem.t1) > _scalar(problem.t0) else -1.0
        ends = first.ts.tolist()
        n = len(ends)
        if n == 0:
            return integrate(problem)
        segments = min(self.checkpoints or math.ceil(math.sqrt(n)), n)
        bounds = [round(k * n / segments) for k in range(segments + 1)]

        flat = Flattener(problem.y0, batch=False)
        t0 = _scalar(problem.t0)
        user_ts = None if saveat.ts is None else torch.as_tensor(saveat.ts, dtype=torch.float64).flatten().tolist()

        y = flat.flatten(problem.y0)
        ts_out, ys_out = [], []
        if saveat.t0:
            ts_out.append(t0)
            ys_out.append(y)
        start = t0
        for k in range(segments):
            seg_ends = ends[bounds[k] : bounds[k + 1]]
            stop = seg_ends[-1]
            if saveat.steps:
                sub_save = SaveAt(steps=True)
                seg_ts = seg_ends
            else:
                seg_ts = []
                if user_ts is not None:
                    seg_ts = [s for s in user_ts if (k == 0 or (s - start) * sign > 0) and (s - stop) * sign <= 0]
                sub_save = SaveAt(ts=seg_ts, t1=True) if seg_ts else SaveAt(t1=True)
            sub = dataclasses.replace(
                problem,
                t0=start,
                t1=stop,
                dt0=None,
                controller=StepEnds([e * sign for e in seg_ends]),
                saveat=sub_save,
                max_steps=None,
                progress=None,
            )

            def segment(y_flat, sub=sub, seen=[]):  # noqa: B006 - per-segment memory of the first call
                out = flat.flatten_leading(integrate(dataclasses.replace(sub, y0=flat.unflatten(y_flat))).ys)
                # the recomputation in backward must use the parameters the forward pass used
                # (not so under torch.func.functional_call, which swaps them back on exit)
                leaves = {id(x) for x in _graph_leaves([out], {id(y_flat)})}
                if not seen:
                    seen.append(leaves)
                else:
                    check_reached(list(seen[0]), [i in leaves for i in seen[0]])
                return out

            # no early stop: the recomputation must run to the end for the parameter check
            with set_checkpoint_early_stop(False):
                out = checkpoint(segment, y, use_reentrant=False)
            if saveat.steps:
                ys_out.extend(out.unbind(0))
                ts_out.extend(seg_ends)
            else:
                ys_out.extend(out[: len(seg_ts)].unbind(0))
                ts_out.extend(seg_ts)
            y = out[-1]
            start = stop
        if user_ts is not None and len(ts_out) - int(saveat.t0) < len(user_ts):
            # the solve failed before the last save times (throw=False): NaN, as in the loop
            missing = user_ts[len(ts_out) - int(saveat.t0) :]
            ts_out.extend(missing)
            ys_out.extend([torch.full_like(y, math.nan)] * len(missing))
        if saveat.t1:
            ts_out.append(ends[-1])
            ys_out.append(y)
        dtype = flat.dtype.to_real() if flat.dtype.is_complex else flat.dtype
        return dataclasses.replace(
            first,
            ts=torch.tensor(ts_out, dtype=dtype, device=flat.device),
            ys=flat.unflatten(torch.stack(ys_out)),
        )
