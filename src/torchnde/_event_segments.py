"""Events under the adjoints that do not differentiate the loop itself (checkpointed, backsolve,
reversible): the solve is cut at its events and each piece is an ordinary solve.

For each piece a first solve without a graph finds the next event (``max_events=1``); the piece
from the current start to that event time is then solved under the adjoint, and the event's
jump (implicit-function-theorem time, reset, saltation: :meth:`_Events.jump`) joins it to the
next piece. The located time is that of the first solve; the adjoint's piece ends there exactly,
so the state at the event is the piece's end state (no interpolation) and the gradient of the
event time uses the vector field there. Cost: about one extra forward solve.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ._events import _Events
from ._flat import flat_term
from ._results import Result, SolveError
from ._saveat import SaveAt
from ._solution import Solution
from ._tree import Flattener


def _scalar_time(x) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def solve_by_segments(p, adjoint, integrate) -> Solution:
    name = type(adjoint).__name__
    if p.per_sample:
        raise NotImplementedError(
            f"events with per_sample=True are supported with adjoint=DirectAdjoint() only (got {name})"
        )
    saveat = p.saveat
    if saveat.steps or saveat.dense:
        raise NotImplementedError(
            f"events under {name} support SaveAt(t0=..., t1=..., ts=...); for SaveAt(steps=True) or "
            "SaveAt(dense=True) use adjoint=DirectAdjoint()"
        )
    flat = Flattener(p.y0, batch=False)
    rdt = flat.dtype.to_real() if flat.dtype.is_complex else flat.dtype
    t0, t1 = _scalar_time(p.t0), _scalar_time(p.t1)
    sign = 1.0 if t1 > t0 else -1.0
    term = flat_term(p.terms, flat, p.args, sign, False)
    evs = _Events(p.events, term, flat, p.args, sign, False, p.max_events, rdt)
    y = flat.flatten(p.y0)
    evs.init(t0 * sign, y)
    user_ts = None if saveat.ts is None else torch.as_tensor(saveat.ts, dtype=torch.float64).flatten().tolist()
    out_t, out_y = [], []
    if saveat.t0:
        out_t.append(t0)
        out_y.append(y)
    k_ts = 0
    t = t0
    stats: dict = {}
    result = Result.successful
    one = torch.ones(1, dtype=torch.bool, device=flat.device)
    while True:
        with torch.no_grad():
            probe = integrate(
                dataclasses.replace(
                    p, t0=t, y0=flat.unflatten(y.detach()), saveat=SaveAt(t1=True), max_events=1, throw=False,
                    progress=None,
                )
            )  # fmt: skip
        fired = probe.successful and probe.events.count == 1
        end = probe.t_final if fired else t1
        seg_ts = [] if user_ts is None else [s for s in user_ts[k_ts:] if (s - end) * sign <= 0]
        k_ts += len(seg_ts)
        sub = dataclasses.replace(
            p, t0=t, t1=end, y0=flat.unflatten(y), events=None, max_events=None,
            saveat=SaveAt(ts=seg_ts, t1=True) if seg_ts else SaveAt(t1=True), throw=False,
        )  # fmt: skip
        sol = adjoint.loop(sub, integrate)
        for key, v in sol.stats.items():
            stats[key] = stats.get(key, 0) + v
        Y = flat.flatten_leading(sol.ys)
        out_t += seg_ts
        out_y += list(Y[: len(seg_ts)])
        y, t = Y[-1], sol.t_final
        if not sol.successful:
            result = sol.result
            break
        if not fired:
            break
        ev = probe.events
        col = next(i for i, c in enumerate(evs.cols) if c[0] == int(ev.event[0]) and c[1] == int(ev.component[0]))
        tau_d = torch.full((1,), end * sign, dtype=rdt, device=flat.device)
        f_minus = term.vf(end * sign, y.detach()).detach().unsqueeze(0)
        col_t = torch.full((1,), col, dtype=torch.long, device=flat.device)
        y_minus, _, y_next, stop = evs.jump(tau_d, y.unsqueeze(0), f_minus, col_t, ev.ties[:1], one)
        if bool(stop[0]):
            y = y_minus[0]
            break
        y = y_next[0]
    if user_ts is not None and k_ts < len(user_ts):  # after a terminal event (or a failure): NaN
        out_t += user_ts[k_ts:]
        out_y += [torch.full_like(y, math.nan)] * (len(user_ts) - k_ts)
    if saveat.t1:
        out_t.append(t)
        out_y.append(y)
    ts = torch.tensor(out_t, dtype=rdt, device=flat.device) if out_t else None
    ys = flat.unflatten(torch.stack(out_y)) if out_y else None
    sol = Solution(ts=ts, ys=ys, stats=stats, result=Result(result), t0=p.t0, t1=p.t1, t_final=t)
    sol.events = evs.record()
    if p.throw and not sol.successful:
        raise SolveError(
            f"solve failed ({Result(result).name}) at t = {t!r}: {Result(result).message}", result=result, solution=sol
        )
    return sol
