"""``torchnde demo``: the generative demo by default, the neural-ODE spiral with ``--ode``.

``torchnde demo`` trains a VP-SDE score model and a flow-matching model on a 2-D data set, samples
with every sampler at several NFE budgets, computes W2 and NLL and writes a PNG grid and a Markdown
report (:mod:`torchnde.cli.demo_generative`). ``torchnde demo --ode`` runs the first demo of the
project, kept in this module: learn the spiral of Chen et al. (2018) with a neural ODE.

The data is one trajectory of the known ODE ``dy/dt = (y**3) @ A`` with
``A = [[-0.1, 2.0], [-2.0, -0.1]]`` from ``y0 = [2, 0]`` over ``t`` in ``[0, 25]``, computed by
torchnde itself at tight tolerance. A neural ODE ``dy/dt = MLP(y**3)`` is fitted to random short
windows of it, then solved over the whole interval and compared with the truth in a plot.

Everything created here follows the dtype and device of ``y0`` (float64 on the CPU by default), so
the functions below can be reused with other devices.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import torchnde as tn

from ._deps import positive_int as _positive_int
from ._deps import require
from ._errors import prepare_output_dir
from .demo_generative import GenerativeDemoConfig, report_markdown, run_generative_demo

__all__ = [
    "HELP",
    "DESCRIPTION",
    "add_arguments",
    "run",
    "DemoConfig",
    "DemoResult",
    "run_demo",
    "true_matrix",
    "true_trajectory",
    "SpiralField",
    "train",
    "solve_learned",
    "plot_spiral",
]

HELP = (
    "diffusion, flow matching and a bridge on 2-D data: every sampler, W2, precision/recall, NLL, plots and a "
    "report (~2 min); --ode: a neural ODE"
)
DESCRIPTION = (
    "Train a VP-SDE score model and a flow-matching model on a 2-D data set (moons by default), sample "
    "with every sampler at several NFE budgets (Euler-Maruyama, predictor-corrector, probability-flow "
    "Euler/Heun/adaptive, DPM-Solver 3M, DPM-Solver++ 2M/3M, EDM Heun, adaptive SDE; flow: Euler/Heun/adaptive), "
    "compute the exact W2 and precision/recall against fresh data and the NLL through each model's ODE next to "
    "the data's own, add a Schroedinger bridge from 8gaussians, and write "
    "DIR/generative.png, DIR/report.md and DIR/results.json (about two minutes on 2 CPU cores; --quick: "
    "seconds). With --ode: the classic first neural ODE (Chen et al. 2018) instead: fit an MLP vector "
    "field to a spiral and plot true vs learned trajectories to DIR/spiral.png."
)

TRUE_A = ((-0.1, 2.0), (-2.0, -0.1))
TRUE_Y0 = (2.0, 0.0)


@dataclass
class DemoConfig:
    """Everything that defines a demo run. The defaults train in ~15 s on one CPU core."""

    iters: int = 3000
    seed: int = 0
    t1: float = 25.0
    num_points: int = 1000
    batch_size: int = 32
    batch_time: int = 6  # points per training window (window length = (batch_time - 1) * dt)
    lr: float = 3e-3
    hidden: int = 50
    rtol: float = 1e-6  # training and final solve of the learned model
    atol: float = 1e-8
    true_tol: float = 1e-10  # the data
    dtype: torch.dtype = torch.float64
    device: str | torch.device = "cpu"


@dataclass
class DemoResult:
    ts: torch.Tensor
    true_ys: torch.Tensor
    learned_ys: torch.Tensor
    losses: list[float]
    final_loss: float  # mean |learned - true| over the whole trajectory
    stats: dict
    true_stats: dict
    train_time: float
    wall_time: float
    png: Path | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# the problem


def true_matrix(like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(TRUE_A, dtype=like.dtype, device=like.device)


def true_trajectory(y0: torch.Tensor, ts: torch.Tensor, tol: float = 1e-10) -> tn.Solution:
    """The data: ``dy/dt = (y**3) @ A`` solved at ``ts`` with Dopri8 at tolerance ``tol``.

    ``tol`` is raised to ten times the machine epsilon of ``y0``'s dtype: no solver can meet a
    tolerance finer than the rounding of each step (in float32, 1e-10 costs 100x the steps).
    """
    tol = max(tol, 10 * torch.finfo(y0.dtype).eps)
    A = true_matrix(y0)
    return tn.solve(
        tn.ODETerm(lambda t, y, A: (y**3) @ A),
        tn.Dopri8(),
        float(ts[0]),
        float(ts[-1]),
        y0,
        args=A,
        saveat=tn.SaveAt(ts=ts),
        controller=tn.PIDController(rtol=tol, atol=tol),
        max_steps=None,
    )


class SpiralField(nn.Module):
    """``f(t, y) = MLP(y**3)``: the cube is the inductive bias of the original example."""

    def __init__(self, hidden: int = 50):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        for m in self.net:
            if isinstance(m, nn.Linear):
                # Small weights keep tanh out of saturation for |y**3| up to 8.
                nn.init.normal_(m.weight, mean=0.0, std=0.1)
                nn.init.zeros_(m.bias)

    def forward(self, t, y, args=None):
        return self.net(y**3)


def _controller(cfg: DemoConfig) -> tn.PIDController:
    return tn.PIDController(rtol=cfg.rtol, atol=cfg.atol)


def solve_learned(field: nn.Module, y0: torch.Tensor, ts: torch.Tensor, cfg: DemoConfig) -> tn.Solution:
    """Solve the learned ODE from ``y0`` (shape ``(2,)`` or ``(batch, 2)``), saving at ``ts``."""
    return tn.solve(
        tn.ODETerm(field),
        tn.Tsit5(),
        float(ts[0]),
        float(ts[-1]),
        y0,
        saveat=tn.SaveAt(ts=ts),
        controller=_controller(cfg),
        max_steps=100_000,
    )


def train(field: nn.Module, ts: torch.Tensor, ys: torch.Tensor, cfg: DemoConfig, on_iter=None) -> list[float]:
    """Fit ``field`` to windows of the trajectory ``ys`` (at times ``ts``); returns the losses.

    Each iteration draws ``batch_size`` windows of ``batch_time`` consecutive points and solves
    all of them in one batched solve: the ODE is autonomous, so every window can start at t = 0.
    ``on_iter(i, loss)`` is called after every step.
    """
    n = ts.shape[0]
    window_ts = ts[: cfg.batch_time] - ts[0]
    offsets = torch.arange(cfg.batch_time, device=ys.device)
    opt = torch.optim.Adam(field.parameters(), lr=cfg.lr)
    # Decaying the learning rate to lr/100 removes most of the end-of-training jitter of Adam.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.iters, 1), eta_min=cfg.lr / 100)
    losses = []
    for i in range(cfg.iters):
        starts = torch.randint(0, n - cfg.batch_time + 1, (cfg.batch_size,), device=ys.device)
        target = ys[starts.unsqueeze(0) + offsets.unsqueeze(1)]  # (batch_time, batch, 2)
        pred = solve_learned(field, target[0], window_ts, cfg).ys  # (batch_time, batch, 2)
        loss = (pred - target).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_iter is not None:
            on_iter(i, losses[-1])
    return losses


def plot_spiral(path: Path, ts: torch.Tensor, true_ys: torch.Tensor, learned_ys: torch.Tensor, title: str = "") -> Path:
    """Phase portrait and x(t), y(t) of the true and learned trajectories, as a PNG."""
    require("matplotlib", "plotting the demo")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    t = ts.detach().cpu().numpy()
    tr = true_ys.detach().cpu().numpy()
    le = learned_ys.detach().cpu().numpy()
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_phase, ax_x, ax_y = fig.subplots(1, 3, width_ratios=(1, 1.3, 1.3))
    # A wide pale "true" under a thin dashed "learned": both stay visible when they coincide.
    true_style = dict(color="tab:green", lw=4.0, alpha=0.4, label="true")
    learned_style = dict(color="tab:blue", ls="--", lw=1.2, label="learned")
    ax_phase.plot(tr[:, 0], tr[:, 1], **true_style)
    ax_phase.plot(le[:, 0], le[:, 1], **learned_style)
    ax_phase.plot(tr[0, 0], tr[0, 1], "ko", ms=4)
    ax_phase.annotate("y0", (tr[0, 0], tr[0, 1]), xytext=(-14, -4), textcoords="offset points", fontsize=8)
    ax_phase.set(xlabel="x", ylabel="y", title="phase portrait", aspect="equal")  # legend: on the right
    for ax, k, name in ((ax_x, 0, "x"), (ax_y, 1, "y")):
        ax.plot(t, tr[:, k], **true_style)
        ax.plot(t, le[:, k], **learned_style)
        ax.set(xlabel="t", ylabel=name, title=f"{name}(t)")
        ax.legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------
# the command


def run_demo(cfg: DemoConfig, out: str | os.PathLike | None = "out", progress: bool = True, log=print) -> DemoResult:
    """Generate the data, train, solve the learned model and (if ``out``) write ``out/spiral.png``.

    Deterministic given ``cfg.seed``; the global RNG state is restored afterwards.
    """
    if out is not None:  # fail before training, not after
        prepare_output_dir(out)
        require("matplotlib", "torchnde demo (to plot the result)")
    tqdm = require("tqdm", "torchnde demo's progress bar (or pass --no-progress)").tqdm if progress else None
    began = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        y0 = torch.tensor(TRUE_Y0, dtype=cfg.dtype, device=cfg.device)
        ts = torch.linspace(0.0, cfg.t1, cfg.num_points, dtype=y0.dtype, device=y0.device)
        truth = true_trajectory(y0, ts, cfg.true_tol)
        log(
            f"data: dy/dt = (y**3) @ A from y0 = {list(TRUE_Y0)}, {cfg.num_points} points on [0, {cfg.t1:g}] "
            f"(Dopri8, tol {max(cfg.true_tol, 10 * torch.finfo(y0.dtype).eps):g}: {truth.stats['num_steps']} steps, {truth.stats['nfe']} evaluations)"
        )
        field = SpiralField(cfg.hidden).to(dtype=y0.dtype, device=y0.device)
        log(
            f"training: {cfg.iters} Adam steps on {cfg.batch_size} windows of {cfg.batch_time} points "
            f"(Tsit5, rtol {cfg.rtol:g}, atol {cfg.atol:g})"
        )
        bar = tqdm(total=cfg.iters, desc="train", unit="it", dynamic_ncols=True, file=sys.stderr) if tqdm else None
        running = []

        def on_iter(i, loss):
            running.append(loss)
            if bar is not None:
                bar.update(1)
                if (i + 1) % 10 == 0 or i + 1 == cfg.iters:
                    bar.set_postfix(loss=f"{sum(running[-10:]) / len(running[-10:]):.2e}", refresh=False)

        t_train = time.perf_counter()
        try:
            losses = train(field, ts, truth.ys, cfg, on_iter)
        finally:
            if bar is not None:
                bar.close()
        train_time = time.perf_counter() - t_train
        with torch.no_grad():
            learned = solve_learned(field, y0, ts, cfg)
    final_loss = float((learned.ys - truth.ys).abs().mean())
    png = None
    if out is not None:
        png = plot_spiral(
            Path(out) / "spiral.png",
            ts,
            truth.ys,
            learned.ys,
            title=f"neural ODE on the spiral: {cfg.iters} iterations, mean |error| {final_loss:.3g}",
        )
    wall = time.perf_counter() - began
    return DemoResult(
        ts=ts,
        true_ys=truth.ys,
        learned_ys=learned.ys,
        losses=losses,
        final_loss=final_loss,
        stats={k: int(v) for k, v in learned.stats.items()},
        true_stats=dict(truth.stats),
        train_time=train_time,
        wall_time=wall,
        png=png,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..generative.data import TOY_DENSITIES

    d = DemoConfig()
    parser.add_argument(
        "--out", metavar="DIR", default="out", help="output directory (default: ./out; created if needed)"
    )
    parser.add_argument(
        "--ode", action="store_true", help="the neural-ODE spiral demo (Chen et al. 2018) instead of the generative one"
    )
    parser.add_argument(
        "--quick", action="store_true", help="generative demo: a seconds-long version (few steps, small NFE sets)"
    )
    parser.add_argument(
        "--data",
        metavar="NAME",
        default="moons",
        choices=TOY_DENSITIES,
        help=f"generative demo: the data set, one of {', '.join(TOY_DENSITIES)} (default: moons)",
    )
    parser.add_argument(
        "--iters",
        metavar="N",
        type=_positive_int,
        default=None,
        help=f"training iterations (default: {d.iters} with --ode; generative: "
        f"{GenerativeDemoConfig.vp_steps} for the score model, {GenerativeDemoConfig.fm_steps} for the flow)",
    )
    parser.add_argument("--seed", metavar="S", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (then tqdm is not needed)")
    parser.add_argument(
        "--threads",
        metavar="T",
        type=_positive_int,
        default=1,
        help="torch CPU threads during the demo (default: 1; the tensors are tiny, more threads only add overhead)",
    )
    parser.add_argument(
        "--workers",
        metavar="W",
        type=_positive_int,
        default=None,
        help="generative demo: cores used at once (default: 2, 1 with --quick): the two models train in two "
        "processes and the exact W2 runs in W threads while sampling goes on; 1: all in one thread",
    )


def run(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.ode:
            return _run_ode(args)
        return _run_generative(args)
    finally:
        torch.set_num_threads(threads)


def _run_generative(args: argparse.Namespace) -> int:
    kw = {"data": args.data, "seed": args.seed, "threads": args.threads}
    if args.workers is not None:
        kw["workers"] = args.workers
    if args.iters is not None:
        kw.update(vp_steps=args.iters, fm_steps=args.iters)
    cfg = GenerativeDemoConfig.quick(**kw) if args.quick else GenerativeDemoConfig(**kw)
    res = run_generative_demo(cfg, out=args.out, progress=not args.no_progress)
    print()
    print(report_markdown(res), end="")
    print()
    print(f"wall time: {res.wall_time:.1f} s")
    print(f"wrote {res.png}, {res.report} and {res.json}")
    return 0


def _run_ode(args: argparse.Namespace) -> int:
    cfg = DemoConfig(seed=args.seed) if args.iters is None else DemoConfig(iters=args.iters, seed=args.seed)
    res = run_demo(cfg, out=args.out, progress=not args.no_progress)
    w = max(len(k) for k in res.stats)
    print(f"final solve of the learned model over [0, {cfg.t1:g}] (Tsit5, rtol {cfg.rtol:g}, atol {cfg.atol:g}):")
    for k, v in res.stats.items():
        print(f"  {k:<{w}}  {v}")
    last = res.losses[-min(50, len(res.losses)) :]
    print(f"final training loss (mean |error| per window, last {len(last)} iterations): {sum(last) / len(last):.3e}")
    print(f"final loss (mean |error| of the learned trajectory over [0, {cfg.t1:g}]): {res.final_loss:.3e}")
    print(f"wall time: {res.wall_time:.1f} s (training {res.train_time:.1f} s)")
    print(f"wrote {res.png}")
    return 0
