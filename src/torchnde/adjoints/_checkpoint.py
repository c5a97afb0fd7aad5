"""Checkpointed discretise-then-optimise gradients."""

from __future__ import annotations

import dataclasses
import math

import torch

from .._saveat import SaveAt
from .._tree import tree_map
from ..controllers._grid import StepEnds
from ._base import AbstractAdjoint
from ._params import _scalar, check_reached, discover

__all__ = ["CheckpointAdjoint"]


class CheckpointAdjoint(AbstractAdjoint):
    """Discretise-then-optimise with recomputation: exact gradients of the computed solution in
    memory that grows with the number of checkpoints, not the number of steps.

    The solve runs once without recording a graph, to find its steps. The recorded steps are then
    replayed, still without a graph, in ``checkpoints`` segments, keeping only each segment's
    initial state (and the saved outputs). The backward pass recomputes one segment at a time with
    a graph, from its saved initial state, and differentiates it, last segment first. Gradients
    equal those of :class:`DirectAdjoint` up to floating point (the same steps are taken);
    gradients reach ``y0``, tensors in ``args`` and every parameter the vector field uses.

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
        # the replays step with StepEnds, not the adaptive controller: bind what the solver takes
        # from the controller (implicit solvers' Newton tolerances) once, so every pass agrees
        from ..controllers import PIDController

        if isinstance(problem.controller, PIDController) and hasattr(problem.solver, "with_tolerances"):
            bound = problem.solver.with_tolerances(problem.controller.rtol, problem.controller.atol)
            problem = dataclasses.replace(problem, solver=bound)
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

        flat, y0, args_proxy, proxies, arg_leaves, params = discover(problem)
        t0 = _scalar(problem.t0)
        user_ts = None if saveat.ts is None else torch.as_tensor(saveat.ts, dtype=torch.float64).flatten().tolist()

        # 2. plan the segments: each replays its recorded steps and saves what falls inside it
        subs, seg_times = [], []
        start = t0
        for k in range(segments):
            seg_ends = ends[bounds[k] : bounds[k + 1]]
            stop = seg_ends[-1]
            if saveat.steps:
                sub_save, seg_ts = SaveAt(steps=True), seg_ends
            else:
                seg_ts = []
                if user_ts is not None:
                    seg_ts = [s for s in user_ts if (k == 0 or (s - start) * sign > 0) and (s - stop) * sign <= 0]
                sub_save = SaveAt(ts=seg_ts, t1=True) if seg_ts else SaveAt(t1=True)
            controller = StepEnds([e * sign for e in seg_ends])
            subs.append(
                dataclasses.replace(
                    problem,
                    t0=start,
                    t1=stop,
                    dt0=None,
                    controller=controller,
                    saveat=sub_save,
                    max_steps=None,
                    progress=None,
                )
            )
            seg_times.append(seg_ts)
            start = stop
        outs = _Segments.apply(subs, integrate, flat, args_proxy, proxies, arg_leaves, y0, *arg_leaves, *params)
        ts_out, ys_out = [], []
        if saveat.t0:
            ts_out.append(t0)
            ys_out.append(y0)
        row = 0
        for seg_ts in seg_times:
            # a segment's rows: its save times (steps: every step end) and then its end state
            n_rows = len(seg_ts) + (0 if saveat.steps else 1)
            ys_out.extend(outs[row : row + len(seg_ts)].unbind(0))
            ts_out.extend(seg_ts)
            row += n_rows
        y = outs[row - 1]
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


class _Segments(torch.autograd.Function):
    """The replayed segments: run without a graph; in backward, each segment is recomputed with
    a graph from its saved initial state and differentiated, last segment first."""

    @staticmethod
    def forward(ctx, subs, integrate, flat, args_proxy, proxies, arg_leaves, y0, *tensors):
        detached_args = tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, args_proxy)
        starts, outs = [], []
        y = y0.detach()
        with torch.no_grad():
            for sub in subs:
                starts.append(y)
                out = flat.flatten_leading(
                    integrate(dataclasses.replace(sub, y0=flat.unflatten(y), args=detached_args)).ys
                )
                outs.append(out)
                y = out[-1]
        ctx.subs, ctx.integrate, ctx.flat, ctx.args_proxy = subs, integrate, flat, args_proxy
        ctx.proxy_list = [proxies[id(x)] for x in arg_leaves]
        ctx.rows = [o.shape[0] for o in outs]
        ctx.save_for_backward(*starts, *tensors[len(arg_leaves) :])
        return torch.cat(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_outs):
        n = len(ctx.subs)
        starts, params = ctx.saved_tensors[:n], list(ctx.saved_tensors[n:])
        wrt = [*ctx.proxy_list, *params]
        grads = [None] * len(wrt)
        grad_segments = list(torch.split(grad_outs, ctx.rows))
        carry = None  # gradient reaching the end state of the segment being processed
        for k in range(n - 1, -1, -1):
            g = grad_segments[k]
            if carry is not None:
                g = g.clone()
                g[-1] += carry
            with torch.enable_grad():
                y_k = starts[k].detach().requires_grad_()
                sub = dataclasses.replace(ctx.subs[k], y0=ctx.flat.unflatten(y_k), args=ctx.args_proxy)
                out = ctx.flat.flatten_leading(ctx.integrate(sub).ys)
                got = torch.autograd.grad(out, (y_k, *wrt), g, allow_unused=True)
            carry = got[0]
            for i, v in enumerate(got[1:]):
                if v is not None:
                    grads[i] = v if grads[i] is None else grads[i] + v
        check_reached(params, [gi is not None for gi in grads[len(ctx.proxy_list) :]])
        return (None,) * 6 + (carry, *[torch.zeros_like(w) if gi is None else gi for gi, w in zip(grads, wrt)])
