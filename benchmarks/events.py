"""Events: torchnde's `solve(..., event=...)` against torchdiffeq's `odeint_event`, side by side.

(a) The bouncing-ball fit of examples/bouncing_ball.py: one optimisation step (forward and
    backward) of the loss on 60 heights at fixed times through four bounces, with respect to the
    restitution e and gravity g. torchnde: one `solve` with a resetting event. torchdiffeq: the
    way its own examples/bouncing_ball.py does it, one `odeint_event` per bounce for the impact
    times, then one `odeint` per segment between impacts for the heights.
(b) 1024 balls dropped from different heights (U[2, 12] m, e = 0.8), each until its own third
    impact. torchnde: one solve with `per_sample=True` and `max_events=3`. torchdiffeq stops the
    whole batch at the first event of any element, so per-sample events need a loop: three
    `odeint_event` calls per ball. Only the first 64 balls are timed for torchdiffeq and the time
    is scaled by 1024/64 (the balls are independent; the report says so).

Same solver (Dopri5), rtol = atol = 1e-8, float64, one torch thread, one process; medians.

    python benchmarks/events.py            # writes benchmarks/events.md (about 2 minutes)
    python benchmarks/events.py --quick    # smoke mode; the numbers mean nothing
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torchdiffeq
from _common import machine_info

import torchnde as tn

F64 = torch.float64
TOL = 1e-8
E_TRUE, G_TRUE, H0, T_END = 0.8, 9.81, 5.0, 5.0
# torchdiffeq's bouncing-ball example lifts the ball by 1e-7 after each impact so that the event
# function, zero there, does not fire again at once (its located impact can be up to ~1e-7 below
# ground, so we lift from max(h, 0): else the ball may start below ground and fall forever)
LIFT = 1e-7


def fall(t, y, args):
    g, _ = args
    return torch.stack([y[..., 1], -g * torch.ones_like(y[..., 1])], -1)


def height(t, y, args):
    return y[..., 0]


def bounce(t, y, args, which):
    _, e = args
    return torch.stack([y[..., 0], -e * y[..., 1]], -1)


IMPACT = tn.Event(height, direction=-1, terminal=False, reset=bounce)
CONTROLLER = tn.PIDController(rtol=TOL, atol=TOL)
SOLVER = tn.Dopri5()
TERM = tn.ODETerm(fall)


# ----------------------------------------------------------------------------------------------
# (a) the fit


def tn_heights(g, e, ts, y0):
    sol = tn.solve(
        TERM, SOLVER, 0.0, T_END, y0, args=(g, e), saveat=tn.SaveAt(ts=ts), controller=CONTROLLER, event=IMPACT
    )
    return sol.ys[:, 0]


def td_heights(g, e, ts, y0):
    """torchdiffeq: impact times by odeint_event (one call per bounce), then odeint per segment."""

    def f(t, y):
        return fall(t, y, (g, e))

    t0 = torch.zeros((), dtype=F64)
    state, starts, states = y0, [t0], [y0]
    while True:
        t_ev, sol = torchdiffeq.odeint_event(
            f, state, t0, event_fn=lambda t, y: y[0], reverse_time=False, rtol=TOL, atol=TOL, method="dopri5"
        )
        if float(t_ev) >= T_END:
            break
        y_minus = sol[-1]
        state = torch.stack([y_minus[0].clamp(min=0) + LIFT, -e * y_minus[1]])
        t0 = t_ev
        starts.append(t0)
        states.append(state)
    out = []
    for k, (s, y) in enumerate(zip(starts, states)):
        end = float(starts[k + 1]) if k + 1 < len(starts) else float("inf")
        mask = (ts > float(s)) & (ts <= end)
        if not bool(mask.any()):
            continue
        tt = torch.cat([s.reshape(1), ts[mask]])
        out.append(torchdiffeq.odeint(f, y, tt, rtol=TOL, atol=TOL, method="dopri5")[1:, 0])
    return torch.cat(out)


def bench_fit(steps: int):
    ts = torch.linspace(0.05, T_END, 60, dtype=F64)
    y0 = torch.tensor([H0, 0.0], dtype=F64)
    with torch.no_grad():
        observed = tn_heights(torch.tensor(G_TRUE, dtype=F64), torch.tensor(E_TRUE, dtype=F64), ts, y0)
    libs = {"torchnde": tn_heights, "torchdiffeq": td_heights}
    params = {name: (torch.tensor(0.7, dtype=F64, requires_grad=True), torch.tensor(9.0, dtype=F64, requires_grad=True))
              for name in libs}  # fmt: skip
    wall = {name: [] for name in libs}
    cpu = {name: [] for name in libs}
    first = {}
    for i in range(steps + 1):  # interleaved, so that a change in the machine's load hits both
        for name, heights in libs.items():
            e, g = params[name]
            w0, c0 = time.perf_counter(), time.thread_time()
            loss = ((heights(g, e, ts, y0) - observed) ** 2).mean()
            de, dg = torch.autograd.grad(loss, (e, g))
            w1, c1 = time.perf_counter(), time.thread_time()
            if i:  # the first is a warm-up
                wall[name].append(w1 - w0)
                cpu[name].append(c1 - c0)
            else:
                first[name] = (float(loss.detach()), (float(de), float(dg)))
    return {
        name: dict(time=statistics.median(wall[name]), cpu=statistics.median(cpu[name]), loss=first[name][0],
                   grad=first[name][1])
        for name in libs
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# (b) 1024 balls, each to its own third impact


def tn_batch(y0):
    sol = tn.solve(
        TERM, SOLVER, 0.0, 20.0, y0, args=(9.8, E_TRUE), controller=CONTROLLER, event=IMPACT, max_events=3,
        per_sample=True,
    )  # fmt: skip
    return sol.events.t


def td_batch(y0):
    def f(t, y):
        return fall(t, y, (9.8, E_TRUE))

    out = []
    for b in range(y0.shape[0]):
        t0, state, times = torch.zeros((), dtype=F64), y0[b], []
        for _ in range(3):
            t_ev, sol = torchdiffeq.odeint_event(
                f, state, t0, event_fn=lambda t, y: y[0], reverse_time=False, rtol=TOL, atol=TOL, method="dopri5"
            )
            y_minus = sol[-1]
            state = torch.stack([y_minus[0].clamp(min=0) + LIFT, -E_TRUE * y_minus[1]])
            t0 = t_ev
            times.append(t_ev)
        out.append(torch.stack(times))
    return torch.stack(out)


def closed_form(h0):
    t1 = torch.sqrt(2 * h0 / 9.8)
    return torch.stack([t1, t1 * (1 + 2 * E_TRUE), t1 * (1 + 2 * E_TRUE + 2 * E_TRUE**2)], -1)


def bench_batch(batch: int, subset: int, reps: int):
    gen = torch.Generator().manual_seed(0)
    h0 = 2 + 10 * torch.rand(batch, dtype=F64, generator=gen)
    y0 = torch.stack([h0, torch.zeros_like(h0)], -1)
    with torch.no_grad():
        tn_batch(y0[:8])  # warm-up
        tn_times, td_times, tn_cpu, td_cpu = [], [], [], []
        for _ in range(reps):
            w0, c0 = time.perf_counter(), time.thread_time()
            t_tn = tn_batch(y0)
            tn_times.append(time.perf_counter() - w0)
            tn_cpu.append(time.thread_time() - c0)
            w0, c0 = time.perf_counter(), time.thread_time()
            t_td = td_batch(y0[:subset])
            td_times.append(time.perf_counter() - w0)
            td_cpu.append(time.thread_time() - c0)
    exact = closed_form(h0)
    return dict(
        tn=statistics.median(tn_times),
        td=statistics.median(td_times) * batch / subset,
        td_subset=statistics.median(td_times),
        tn_cpu=statistics.median(tn_cpu),
        td_cpu=statistics.median(td_cpu) * batch / subset,
        diff=float((t_tn[:subset] - t_td).abs().max()),
        err_tn=float((t_tn - exact).abs().max()),
        err_td=float((t_td - exact[:subset]).abs().max()),
        all_three=bool((~torch.isnan(t_tn)).all()),
    )


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("events.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    wall = time.perf_counter()
    steps, batch, subset, reps = (2, 64, 4, 1) if args.quick else (21, 1024, 64, 5)

    fit = bench_fit(steps)
    print("fit", fit)
    b = bench_batch(batch, subset, reps)
    print("batch", b)
    total = time.perf_counter() - wall

    a_n, a_d = fit["torchnde"], fit["torchdiffeq"]
    info = machine_info(torchdiffeq=torchdiffeq.__version__)
    lines = [
        "# Events: torchnde against torchdiffeq's odeint_event",
        "",
        f"Generated by `python benchmarks/events.py{' --quick' if args.quick else ''}` in {total:.0f} s; "
        f"one torch thread, one process; Dopri5 at rtol = atol = {TOL:g} in both libraries; float64. "
        f"Load average (1 min) at the end: {os.getloadavg()[0]:.2f} (other processes share the machine). "
        "What is measured and why: the docstring of `benchmarks/events.py`.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## (a) Bouncing-ball fit: one optimisation step",
        "",
        f"The loss of [`examples/bouncing_ball.py`](../examples/bouncing_ball.py) (60 heights at fixed times over "
        f"[0, {T_END}] s, four bounces) and its gradient with respect to e and g, at e = 0.7, g = 9.0. "
        f"Median over {steps} steps after a warm-up, the two libraries' steps interleaved; wall time and "
        "thread CPU time (less disturbed by other processes).",
        "",
        "| library | how | ms per step (wall) | ms per step (CPU) | torchdiffeq / torchnde (wall, CPU) | loss | "
        "dloss/de | dloss/dg |",
        "|---|---|---|---|---|---|---|---|",
        f"| torchnde | one `solve`, resetting `Event`, `SaveAt(ts=...)` | {1e3 * a_n['time']:.1f} | "
        f"{1e3 * a_n['cpu']:.1f} | {a_d['time'] / a_n['time']:.2f}×, {a_d['cpu'] / a_n['cpu']:.2f}× | "
        f"{a_n['loss']:.6f} | {a_n['grad'][0]:.6f} | {a_n['grad'][1]:.6f} |",
        f"| torchdiffeq {torchdiffeq.__version__} | `odeint_event` per bounce, then `odeint` per segment | "
        f"{1e3 * a_d['time']:.1f} | {1e3 * a_d['cpu']:.1f} | 1.00× | {a_d['loss']:.6f} | {a_d['grad'][0]:.6f} | "
        f"{a_d['grad'][1]:.6f} |",
        "",
        f"(torchdiffeq's restarts lift the ball to max(h, 0) + {LIFT:g} m after each impact, as its example "
        "lifts it by 1e-7, so that the event function, zero there, does not fire again at once.)",
        "",
        f"## (b) {batch} balls, each to its own third impact",
        "",
        f"Heights U[2, 12] m, e = {E_TRUE}, g = 9.8, under `torch.no_grad()`. torchnde: one `solve(..., "
        "per_sample=True, max_events=3)`. torchdiffeq: three `odeint_event` calls per ball, ball by ball "
        f"(its `odeint_event` stops the whole batch at the first event of any element); **only the first "
        f"{subset} balls are timed and the times are multiplied by {batch}/{subset}**. Median of {reps} runs, "
        "wall time and thread CPU time.",
        "",
        f"| library | wall time for {batch} balls (s) | CPU time (s) | torchdiffeq / torchnde (wall, CPU) |",
        "|---|---|---|---|",
        f"| torchnde, `per_sample=True` | {b['tn']:.3f} | {b['tn_cpu']:.3f} | {b['td'] / b['tn']:.0f}×, "
        f"{b['td_cpu'] / b['tn_cpu']:.0f}× |",
        f"| torchdiffeq {torchdiffeq.__version__}, loop over balls | {b['td']:.2f} (scaled from {b['td_subset']:.2f} s "
        f"for {subset}) | {b['td_cpu']:.2f} | 1× |",
        "",
        f"- Largest difference between the two libraries' impact times (first {subset} balls, three impacts "
        f"each): {b['diff']:.1e} s.",
        f"- Largest error against the closed form t_k = t_1 (1 + 2e + ... + 2e^(k-1)), t_1 = sqrt(2 h0 / g): "
        f"torchnde {b['err_tn']:.1e} s ({batch} balls), torchdiffeq {b['err_td']:.1e} s ({subset} balls).",
        f"- Every torchnde ball reached its third impact: {b['all_three']}.",
        "- Free fall is a quadratic in time, which Dopri5 integrates exactly in a handful of growing steps: "
        "these times are mostly the per-call cost of each library and torchnde's batching of the balls, "
        "not the cost of stepping.",
        "- torchdiffeq's error is the lift after each impact (about lift / speed per impact); torchnde needs none, "
        "as its event has `direction=-1` and a reset event does not fire again at the surface it just left.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out} in {total:.0f} s")


if __name__ == "__main__":
    main()
