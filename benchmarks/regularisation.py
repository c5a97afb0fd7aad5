"""Regularising neural ODEs to be cheap to solve: test-time NFE, accuracy / MSE and training cost of
every regulariser of `torchnde.regularisers`, against no regulariser, over 3 seeds.

Tasks:

(a) Toy map (Kelly et al. 2020's toy): learn z(1) = z(0) + z(0)^3 for z(0) ~ U[-1, 1] with a
    time-dependent field dz/dt = MLP(z, t) (1 -> 32 -> 32 -> 1, tanh) on [0, 1]; full-batch MSE,
    test MSE on 1000 fresh points.
(b) scikit-learn digits: the model and data split of `examples/regularised_digits.py` (imported
    from it: linear encoder 64 -> 32, dz/dt = MLP(z) on [0, 5], linear read-out, 80/20 split by the
    seed), batches of 128, 20 epochs; test accuracy on the 360 held-out images.

Methods: none; `local` (`solve_with_local_regulariser`, Pal et al. 2023); `global`
(`solve_with_global_regulariser`, Pal et al. 2021); `kinetic` and `jacobian` (Frobenius norm,
Hutchinson probe drawn per iteration) (`RegularisedTerm`, Finlay et al. 2020); `taynode`
(`RegularisedTerm(taylor2=True)`, Kelly et al. 2020, K = 2); `steer` (random end time
t1' ~ U[t1 - b, t1 + b], Ghosh et al. 2020). The solver heuristics are penalised on the
controller-scaled error (rtol/atol passed), so `error <= 1` means an accepted step.

Measured, per task, method and seed (0, 1, 2): test metric and test NFE (adaptive Dopri5 with the
training tolerances, the test set as one batch, under no_grad), training NFE per iteration, and
training time: the whole run's thread CPU time (and wall time), and the cost of one iteration at
the same (initial) parameters, median of interleaved repetitions (thread CPU time; the machine is
shared). Dopri5 with `PIDController`, float32, one torch thread, `DirectAdjoint`.

    python benchmarks/regularisation.py            # writes benchmarks/regularisation.md (~8 min)
    python benchmarks/regularisation.py --quick    # smoke mode (~20 s, temporary file); the numbers mean nothing
    python benchmarks/regularisation.py --profile  # also a cProfile of one iteration per method (digits)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import log_profile, machine_info
from torch import nn

import torchnde as tn
from torchnde import regularisers as R

# the digits model and data come from the example (its main() only runs as a script)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import regularised_digits as digits  # noqa: E402

METHODS = ("none", "local", "local_first", "global", "kinetic", "jacobian", "taynode", "steer")
LABELS = {
    "none": "none",
    "local": "local (`solve_with_local_regulariser`)",
    "local_first": 'local, `h="first"` (the local step is the second solve\'s first)',
    "global": "global (`solve_with_global_regulariser`)",
    "kinetic": "kinetic (`RegularisedTerm(kinetic=True)`)",
    "jacobian": "Jacobian Frobenius (`jacobian_frobenius=True`, Hutchinson)",
    "taynode": "TayNODE (`taylor2=True`)",
    "steer": "STEER (`steer_end_time`)",
}
SEEDS = (0, 1, 2)
TOY_DTYPE = torch.float32
TOY_TOL = (1e-5, 1e-7)


# ----------------------------------------------------------------------------------------------
# tasks


class ToyField(nn.Module):
    """dz/dt = MLP(z, t): time-dependent, so TayNODE's df/dt is not zero."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
        )

    def forward(self, t, z, args):
        return self.net(torch.cat([z, t.expand(z.shape[0], 1).to(z.dtype)], -1))


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.field = ToyField()
        self.encode = nn.Identity()
        self.readout = nn.Identity()


@dataclass
class Task:
    name: str
    t1: float
    rtol: float
    atol: float
    lr: float
    lam: dict  # the weight of each method's regulariser
    model: nn.Module = None
    train_x: torch.Tensor = None
    train_y: torch.Tensor = None
    test_x: torch.Tensor = None
    test_y: torch.Tensor = None
    batch: int = 0  # 0: full batch
    epochs: int = 1
    metric: str = ""
    extra: dict = field(default_factory=dict)

    def loss(self, pred, y):
        if self.name == "digits":
            return nn.functional.cross_entropy(pred, y)
        return (pred - y).pow(2).mean()

    def score(self, pred, y) -> float:
        if self.name == "digits":
            return float((pred.argmax(-1) == y).float().mean())
        return float((pred - y).pow(2).mean())

    def batches(self, gen: torch.Generator):
        n = self.train_x.shape[0]
        for _ in range(self.epochs):
            if not self.batch:
                yield self.train_x, self.train_y
                continue
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, self.batch):
                idx = perm[i : i + self.batch]
                yield self.train_x[idx], self.train_y[idx]


def toy_task(seed: int, iters: int) -> Task:
    g = torch.Generator().manual_seed(1000 + seed)
    x = 2 * torch.rand(256, 1, generator=g, dtype=TOY_DTYPE) - 1
    xt = 2 * torch.rand(1000, 1, generator=g, dtype=TOY_DTYPE) - 1
    torch.manual_seed(seed)
    lam = dict(local=0.1, local_first=0.1, **{"global": 0.01}, kinetic=0.01, jacobian=0.01, taynode=0.01, steer=0.5)
    return Task(
        "toy", t1=1.0, rtol=TOY_TOL[0], atol=TOY_TOL[1], lr=1e-2, lam=lam, model=ToyModel().to(TOY_DTYPE), train_x=x, train_y=x + x**3,
        test_x=xt, test_y=xt + xt**3, batch=0, epochs=iters, metric="test MSE",
    )  # fmt: skip


def digits_task(seed: int, epochs: int) -> Task:
    xtr, ytr, xte, yte = digits.load(seed)
    torch.manual_seed(seed)
    lam = dict(local=1.0, local_first=1.0, **{"global": 1.0}, kinetic=0.01, jacobian=0.01, taynode=0.01, steer=0.5)
    return Task(
        "digits", t1=5.0, rtol=1e-5, atol=1e-7, lr=1e-2, lam=lam, model=digits.Classifier(32, 64), train_x=xtr,
        train_y=ytr, test_x=xte, test_y=yte, batch=128, epochs=epochs, metric="test accuracy",
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# one training iteration


def objective(task: Task, method: str, x, y, it: int):
    """The training loss of one batch (task loss + weighted regulariser) and the solve's NFE."""
    model = task.model
    term = tn.ODETerm(model.field)
    solver = tn.Dopri5()
    ctrl = tn.PIDController(rtol=task.rtol, atol=task.atol)
    z0 = model.encode(x)
    lam = task.lam.get(method, 0.0)
    reg = 0.0
    t1 = task.t1
    if method in ("local", "local_first"):
        sol, est = R.solve_with_local_regulariser(
            term, solver, 0.0, t1, z0, controller=ctrl, seed=it, rtol=task.rtol, atol=task.atol,
            h="first" if method == "local_first" else None,
        )  # fmt: skip
        z1, reg = sol.ys[-1], lam * est.error
    elif method == "global":
        sol, est = R.solve_with_global_regulariser(
            term, solver, 0.0, t1, z0, controller=ctrl, rtol=task.rtol, atol=task.atol
        )
        z1, reg = sol.ys[-1], lam * est.error
    elif method in ("kinetic", "jacobian", "taynode"):
        kw = dict(kinetic=True) if method == "kinetic" else dict(taylor2=True) if method == "taynode" else dict(
            jacobian_frobenius=True, probe=R.probe_like(z0.detach(), seed=it))  # fmt: skip
        aug = R.RegularisedTerm(term, **kw)
        sol = tn.solve(aug.term, solver, 0.0, t1, aug.init(z0), controller=ctrl)
        zs, r = aug.split(sol.ys)
        z1 = zs[-1]
        reg = lam * next(iter(r.values()))[-1] / z0.shape[0]
    elif method == "steer":
        t_end = R.steer_end_time(0.0, t1, lam * t1, seed=it)
        sol = tn.solve(term, solver, 0.0, t_end, z0, controller=ctrl)
        z1 = sol.ys[-1]
    elif method == "none":
        sol = tn.solve(term, solver, 0.0, t1, z0, controller=ctrl)
        z1 = sol.ys[-1]
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return task.loss(model.readout(z1), y) + reg, sol.stats["nfe"]


def train(task: Task, method: str, seed: int) -> dict:
    opt = torch.optim.Adam(task.model.parameters(), lr=task.lr)
    gen = torch.Generator().manual_seed(seed)
    it, nfe = 0, 0
    w0, c0 = time.perf_counter(), time.thread_time()
    for x, y in task.batches(gen):
        loss, n = objective(task, method, x, y, it)
        opt.zero_grad()
        loss.backward()
        opt.step()
        nfe += n
        it += 1
    wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
    model = task.model
    with torch.no_grad():
        z0 = model.encode(task.test_x)
        sol = tn.solve(tn.ODETerm(model.field), tn.Dopri5(), 0.0, task.t1, z0,
                       controller=tn.PIDController(rtol=task.rtol, atol=task.atol))  # fmt: skip
        score = task.score(model.readout(sol.ys[-1]), task.test_y)
    return dict(score=score, nfe=sol.stats["nfe"], train_nfe=nfe / it, wall=wall, cpu=cpu, iters=it)


def iteration_cost(make_task, reps: int) -> dict:
    """Thread CPU time of one training iteration (forward + backward, no optimiser step) at the
    initial parameters of seed 0, on the first batch; methods interleaved, median of ``reps``
    after a warm-up."""
    tasks = {m: make_task(0) for m in METHODS}
    out = {m: [] for m in METHODS}
    nfe = {}
    for r in range(reps + 1):
        for m in METHODS:
            task = tasks[m]
            x, y = next(task.batches(torch.Generator().manual_seed(0)))
            task.model.zero_grad()
            c0 = time.thread_time()
            loss, n = objective(task, m, x, y, 0)
            loss.backward()
            c = time.thread_time() - c0
            if r:
                out[m].append(c)
            nfe[m] = n
    return {m: dict(cpu=statistics.median(out[m]), nfe=nfe[m]) for m in METHODS}


def local_breakdown(make_task, reps: int) -> dict:
    """Where the local regulariser's time goes (digits, seed 0, initial parameters, first batch):
    forward + backward of the plain solve; of the same solve split at t_r (two solves, the second
    started as `solve_with_local_regulariser` starts it); of the split plus the local step
    (`local_error`); and of `solve_with_local_regulariser` itself. Thread CPU time, medians of
    ``reps`` interleaved repetitions after a warm-up."""
    task = make_task(0)
    x, _ = next(task.batches(torch.Generator().manual_seed(0)))
    term, solver = tn.ODETerm(task.model.field), tn.Dopri5()
    ctrl = tn.PIDController(rtol=task.rtol, atol=task.atol)
    kw = dict(controller=ctrl)
    _, est = R.solve_with_local_regulariser(term, solver, 0.0, task.t1, task.model.encode(x), seed=0, **kw)
    tr, h = float(est.t), float(est.h)

    def plain():
        sol = tn.solve(term, solver, 0.0, task.t1, task.model.encode(x), **kw)
        sol.ys[-1].sum().backward()
        return sol.stats["nfe"]

    def split(step: bool):
        a = tn.solve(term, solver, 0.0, tr, task.model.encode(x), **kw)
        dt0 = tr / max(int(a.stats["num_accepted"]), 1)
        b = tn.solve(term, solver, tr, task.t1, a.ys[-1], dt0=dt0, **kw)
        loss = b.ys[-1].sum()
        n = a.stats["nfe"] + b.stats["nfe"]
        if step:
            e = R.local_error(term, solver, tr, a.ys[-1], h, rtol=task.rtol, atol=task.atol)
            loss = loss + e.error
            n += 7
        loss.backward()
        return n

    def local():
        sol, e = R.solve_with_local_regulariser(term, solver, 0.0, task.t1, task.model.encode(x), seed=0,
                                                rtol=task.rtol, atol=task.atol, **kw)  # fmt: skip
        (sol.ys[-1].sum() + e.error).backward()
        return sol.stats["nfe"] + 7

    fs = {"plain solve": plain, "split at t_r": lambda: split(False), "split + local step": lambda: split(True),
          "solve_with_local_regulariser": local}  # fmt: skip
    times = {k: [] for k in fs}
    nfe = {}
    for r in range(reps + 1):
        for k, f in fs.items():
            task.model.zero_grad()
            c0 = time.thread_time()
            nfe[k] = f()
            if r:
                times[k].append(time.thread_time() - c0)
    return {k: dict(cpu=statistics.median(times[k]), nfe=nfe[k]) for k in fs} | {"t_r": tr, "h": h}


# ----------------------------------------------------------------------------------------------
# report


def ms(x):
    return statistics.mean(x), (statistics.stdev(x) if len(x) > 1 else 0.0)


def fmt(x, spec):
    m, s = ms(x)
    return f"{m:{spec}} ± {s:{spec.lstrip('+')}}"


def run_task(name, make_task, reps, log):
    runs = {m: [] for m in METHODS}
    for seed in SEEDS:
        for m in METHODS:
            r = train(make_task(seed), m, seed)
            runs[m].append(r)
            log(f"{name} seed {seed} {m:9s} {r}")
    cost = iteration_cost(make_task, reps)
    log(f"{name} iteration cost {cost}")
    return runs, cost


def table(name, runs, cost, metric, is_acc):
    base = runs["none"]
    lines = [
        f"| method | {metric} | Δ vs none (paired) | test NFE | NFE / none | train NFE / iter | "
        "ms / iter at init (CPU) | × none | run CPU s | × none | run wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for m in METHODS:
        rs = runs[m]
        sc = [r["score"] for r in rs]
        if is_acc:
            sc_s = fmt([100 * s for s in sc], ".1f") + " %"
            d = [100 * (r["score"] - b["score"]) for r, b in zip(rs, base)]
            d_s = fmt(d, "+.1f") + " pts"
        else:
            sc_s = fmt([1e3 * s for s in sc], ".2f") + " e-3"
            d = [r["score"] / b["score"] for r, b in zip(rs, base)]
            d_s = fmt(d, ".2f") + "×"
        nfe = [r["nfe"] for r in rs]
        nfe_ratio = [r["nfe"] / b["nfe"] for r, b in zip(rs, base)]
        cpu = [r["cpu"] for r in rs]
        cpu_ratio = [r["cpu"] / b["cpu"] for r, b in zip(rs, base)]
        it_ratio = cost[m]["cpu"] / cost["none"]["cpu"]
        summary[m] = dict(delta=ms(d)[0], nfe_ratio=ms(nfe_ratio)[0], it_ratio=it_ratio, run_ratio=ms(cpu_ratio)[0],
                          it_ms=1e3 * cost[m]["cpu"], run_cpu=ms(cpu)[0])  # fmt: skip
        lines.append(
            f"| {LABELS[m]} | {sc_s} | {d_s if m != 'none' else '—'} | {fmt(nfe, '.0f')} | "
            f"{fmt(nfe_ratio, '.2f')} | {fmt([r['train_nfe'] for r in rs], '.1f')} | "
            f"{1e3 * cost[m]['cpu']:.1f} ({cost[m]['nfe']} NFE) | {it_ratio:.2f}× | {fmt(cpu, '.1f')} | "
            f"{fmt(cpu_ratio, '.2f')}× | {fmt([r['wall'] for r in rs], '.1f')} |"
        )
    return lines, summary


def targets(dig: dict, toy: dict) -> list:
    """The issue's targets for the error-estimate regularisers, on digits."""

    def ok(b):
        return "**met**" if b else "**missed**"

    lines = [
        "## Targets",
        "",
        "From the issue: the error-estimate regulariser reaches <= 0.7x test NFE with <= 0.5 points accuracy loss "
        "and <= 20% training overhead, and beats TayNODE's training time. Checked on digits (means over the seeds; "
        "the NFE ratio and the accuracy change are paired by seed), for the error-estimate regularisers; "
        "training overhead per iteration (at the initial parameters) and over a whole run (thread CPU time).",
        "",
        '| target | local | local, `h="first"` | global |',
        "|---|---|---|---|",
    ]
    rows = [
        ("test NFE <= 0.7x none", lambda d: d["nfe_ratio"] <= 0.7, lambda d: f"{d['nfe_ratio']:.2f}x"),
        ("accuracy loss <= 0.5 points", lambda d: d["delta"] >= -0.5, lambda d: f"{d['delta']:+.1f} pts"),
        ("overhead per iteration <= 1.2x", lambda d: d["it_ratio"] <= 1.2, lambda d: f"{d['it_ratio']:.2f}x"),
        ("overhead over a whole run <= 1.2x", lambda d: d["run_ratio"] <= 1.2, lambda d: f"{d['run_ratio']:.2f}x"),
        ("faster than TayNODE per iteration", lambda d: d["it_ms"] < dig["taynode"]["it_ms"],
         lambda d: f"{d['it_ms']:.1f} ms vs {dig['taynode']['it_ms']:.1f} ms"),
        ("faster than TayNODE over a whole run", lambda d: d["run_cpu"] < dig["taynode"]["run_cpu"],
         lambda d: f"{d['run_cpu']:.1f} s vs {dig['taynode']['run_cpu']:.1f} s"),
    ]  # fmt: skip
    for name, test, show in rows:
        cells = [f"{show(dig[m])} {ok(test(dig[m]))}" for m in ("local", "local_first", "global")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += [
        "",
        f"On the toy map (no accuracy target; MSE ratio paired by seed): local {toy['local']['nfe_ratio']:.2f}x test "
        f"NFE at {toy['local']['delta']:.2f}x the MSE, global {toy['global']['nfe_ratio']:.2f}x at "
        f"{toy['global']['delta']:.2f}x; per iteration {toy['local']['it_ratio']:.2f}x and "
        f"{toy['global']['it_ratio']:.2f}x, over a run {toy['local']['run_ratio']:.2f}x and "
        f"{toy['global']['run_ratio']:.2f}x.",
    ]
    return lines


NOTES = [
    "## Notes",
    "",
    "- **NFE at init** counts the solves' evaluations (`sol.stats[\"nfe\"]`); the local regulariser's own "
    'step (7 evaluations of Dopri5) comes on top, except with `h="first"` under `DirectAdjoint`, where it is the '
    "second solve's first step.",
    "- **Accuracy is noisy**: the seed-to-seed spread (the ± columns) is several points, larger than the 0.5-point "
    "target, so with 3 seeds the accuracy row says only on which side of the target the mean fell.",
    "- **Weights**: digits as `examples/regularised_digits.py` (1 on the controller-scaled error, 0.01 on the "
    "integrals divided by the batch size, b = t1/2 for STEER). Toy: picked on seed 0 from local 0.01 / 0.03 / 0.1 "
    "and global 0.001 / 0.01 (the smaller weights left the test NFE unchanged); kinetic, Jacobian and TayNODE 0.01, "
    "not tuned.",
    "- **Toy NFE is quantised**: the trained maps take 3 or 4 Dopri5 steps (20 or 26 evaluations with the "
    "starting-step heuristic's 2), so its ratios are 1, 0.77 or 1.3 per seed.",
    '- `h="first"` takes the local step with the first piece\'s mean accepted step, smaller than the whole '
    "solve's when t_r falls in the controller's early ramp-up, so at the same weight it regularises less than the "
    "default `h` (compare their test NFE).",
    "- JapaneseVowels (the issue's third data set) is not included: the regularisers apply to ODE terms, and no "
    "neural-ODE model of it is built here (its examples use CDEs and sequence layers).",
]


def breakdown_lines(brk: dict, cost: dict) -> list:
    base = brk["plain solve"]["cpu"]
    lines = [
        "## Where the local regulariser's time goes",
        "",
        f"Digits, seed 0, initial parameters, first batch; forward + backward, thread CPU time, medians "
        f"(this draw: t_r = {brk['t_r']:.2f} of [0, 5], local step h = {brk['h']:.3f}).",
        "",
        "| what | ms | × plain | NFE |",
        "|---|---|---|---|",
    ]
    for k in ("plain solve", "split at t_r", "split + local step", "solve_with_local_regulariser"):
        lines.append(f"| {k} | {1e3 * brk[k]['cpu']:.1f} | {brk[k]['cpu'] / base:.2f}× | {brk[k]['nfe']} |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    out = args.out or (Path(tempfile.gettempdir()) / "regularisation.md" if args.quick else
                       Path(__file__).with_name("regularisation.md"))  # fmt: skip
    toy_iters, dig_epochs, reps = (5, 1, 1) if args.quick else (200, 20, 7)
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    log = print

    def make_toy(seed):
        return toy_task(seed, toy_iters)

    def make_digits(seed):
        return digits_task(seed, dig_epochs)

    if args.profile:
        for m in METHODS:
            task = make_digits(0)
            x, y = next(task.batches(torch.Generator().manual_seed(0)))

            def once(i, task=task, m=m, x=x, y=y):
                loss, _ = objective(task, m, x, y, i)
                loss.backward()

            log_profile(once, 5, f"digits, one iteration, {m}", log, limit=25)

    toy_runs, toy_cost = run_task("toy", make_toy, reps, log)
    dig_runs, dig_cost = run_task("digits", make_digits, reps, log)
    brk = local_breakdown(make_digits, 2 * reps)
    log(f"local breakdown {brk}")
    wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0

    toy_lines, toy_sum = table("toy", toy_runs, toy_cost, "test MSE", False)
    dig_lines, dig_sum = table("digits", dig_runs, dig_cost, "test accuracy", True)
    info = machine_info()
    lines = [
        "# Regularisation: test-time NFE, accuracy and training cost",
        "",
        f"Generated by `python benchmarks/regularisation.py{' --quick' if args.quick else ''}` in {wall:.0f} s wall, "
        f"{cpu:.0f} s thread CPU; one torch thread, one process. Load average (1 min) at the end: "
        f"{os.getloadavg()[0]:.2f} (other processes share the machine: compare CPU times). What is measured "
        "and why: the docstring of `benchmarks/regularisation.py`.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## (a) Toy map z(1) = z(0) + z(0)^3",
        "",
        *toy_lines,
        "",
        "## (b) Digits",
        "",
        *dig_lines,
        "",
        *targets(dig_sum, toy_sum),
        "",
        *breakdown_lines(brk, dig_cost),
        "",
        *NOTES,
        "",
    ]
    out.write_text("\n".join(lines))
    log("\n".join(lines))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
