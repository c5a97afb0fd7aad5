"""``torchnde train``: train a generative model from a configuration file, resumable and torchrun-ready.

``torchnde train CONFIG [--set KEY=VALUE ...] [--out DIR] [--resume] [--stop-at STEP]``

The configuration (see :mod:`torchnde.cli._config`) names the data set, the model
(:data:`torchnde.cli._models.MODELS`) and the optimisation. Training writes ``DIR/config.json``
(the resolved configuration) and ``DIR/checkpoint.pt`` every ``train.checkpoint_every`` steps and
at the end, atomically (:mod:`torchnde.cli._checkpoint`). ``--resume`` continues from
``DIR/checkpoint.pt`` and ends bitwise where an uninterrupted run ends: every random number of a
step is a function of ``(seed, step)``, and the checkpoint holds the weights, the optimiser's
moments and the random-number states.

Under ``torchrun --nproc-per-node N`` the same command trains with
:class:`~torch.nn.parallel.DistributedDataParallel` (gloo on the CPU, NCCL on CUDA devices): every
process draws the global batch of the step and takes its ``1/N`` shard, DDP averages the gradients,
so the trained model is that of one process with the same global batch (up to rounding). Rank 0
writes the files.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ._config import SCHEMA, ConfigError, check, resolve
from ._deps import positive_int as _positive_int
from ._deps import require
from ._errors import prepare_output_dir
from ._models import MODELS, Runtime, runtime, shard

__all__ = [
    "HELP",
    "DESCRIPTION",
    "add_arguments",
    "run",
    "train",
    "TrainResult",
    "TrainingInterrupted",
    "RESUMABLE_CHANGES",
]

HELP = "train a diffusion or flow-matching model from a config file (resumable, torchrun-ready)"
DESCRIPTION = (
    "Train a VP-SDE score model or a flow-matching model on a built-in 2-D data set, or a GDSS graph model "
    "(model.type = 'gdss') on an offline graph data set. CONFIG is a TOML "
    "(or, with PyYAML, YAML) file; --set KEY=VALUE overrides one key. Writes DIR/config.json and "
    "DIR/checkpoint.pt (atomically); --resume continues from DIR/checkpoint.pt. Runs unchanged under "
    "'torchrun --nproc-per-node N' (DistributedDataParallel; each process takes a shard of the global batch)."
)

#: keys that may differ between a checkpoint's configuration and the one it is resumed with
RESUMABLE_CHANGES = ("train.steps", "train.checkpoint_every", "train.log_every", "device")

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainResult:
    model: nn.Module
    config: dict
    step: int
    log: list = field(default_factory=list)  # [[step, loss], ...]
    checkpoint: Path | None = None
    stopped_early: bool = False
    wall_time: float = 0.0


def _lr(cfg: dict, step: int) -> float:
    """The learning rate of ``step`` (a function of the step alone: nothing to checkpoint)."""
    lr = cfg["train.lr"]
    if cfg["train.cosine"]:
        lr *= 0.5 * (1.0 + math.cos(math.pi * step / cfg["train.steps"]))
    return lr


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_resume_config(old: dict, new: dict) -> None:
    diff = [k for k in SCHEMA if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]
    if diff:
        lines = ", ".join(f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in diff)
        raise ConfigError(
            f"cannot resume with a different configuration ({lines}); only {', '.join(RESUMABLE_CHANGES)} may change"
        )


def train(
    cfg: dict,
    out: str | Path,
    *,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = False,
    log: Callable = print,
    on_step: Callable | None = None,
    threads: int | None = 1,
) -> TrainResult:
    """Train the model of configuration ``cfg`` (a resolved flat config, see
    :func:`torchnde.cli._config.resolve`) and checkpoint it in ``out``.

    Args:
        resume: continue from ``out/checkpoint.pt`` (its configuration is used; ``cfg`` may only
            change :data:`RESUMABLE_CHANGES`, or be ``None``).
        stop_at: stop after global step ``stop_at`` (writing the checkpoint), as a time-limited job
            would; ``--resume`` continues later.
        progress: a tqdm progress bar on stderr (rank 0).
        on_step: ``on_step(step, loss)`` after every optimiser step (``step`` counts from 1).
        threads: torch CPU threads while training (restored afterwards; ``None`` leaves them). The
            models are tiny, so one thread is fastest; more only add synchronisation.
    """
    began = time.perf_counter()
    out = Path(out)
    ckpt_path = out / CHECKPOINT
    ck = None
    if not resume:  # a bad --out fails here, before any training
        prepare_output_dir(out)
    if resume:
        ck = load_checkpoint(ckpt_path)
        stored = check(ck["config"], where=f"in {ckpt_path}")
        if cfg is not None:
            _check_resume_config(stored, cfg)
            stored.update({k: cfg[k] for k in RESUMABLE_CHANGES})
        cfg = stored
    elif ckpt_path.exists():
        raise CheckpointError(
            f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out directory"
        )
    if cfg is None:
        raise ConfigError("no configuration given")
    spec = MODELS[cfg["model.type"]]
    tqdm = require("tqdm", "the progress bar of torchnde train (or pass --no-progress)").tqdm if progress else None
    with runtime(cfg["device"], cfg["dtype"], threads, option="--set device=") as rt:
        return _train(cfg, spec, rt, out, ckpt_path, ck, stop_at, tqdm, log, on_step, began)


def _train(cfg, spec, rt: Runtime, out, ckpt_path, ck, stop_at, tqdm, log, on_step, began) -> TrainResult:
    B, W = cfg["train.batch_size"], rt.world_size
    if B % W:
        raise ConfigError(f"train.batch_size ({B}) must be a multiple of the number of processes ({W})")
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        torch.manual_seed(cfg["seed"])
        model = spec.build(cfg).to(dtype=rt.dtype, device=rt.device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg["train.lr"])
        start, history = 0, []
        if ck is not None:
            try:
                model.load_state_dict(ck["model"])
                opt.load_state_dict(ck["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(f"{ckpt_path} does not match its own configuration: {e}") from None
            _set_rng_state(ck["rng"], rt.device)
            start, history = int(ck["step"]), [list(p) for p in ck.get("log", [])]
        steps = cfg["train.steps"]
        end = steps if stop_at is None else max(start, min(steps, int(stop_at)))
        net = model
        if rt.distributed:
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if rt.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            where = (
                f"{W} processes ({'nccl' if rt.device.type == 'cuda' else 'gloo'})" if rt.distributed else "1 process"
            )
            verb = f"resuming at step {start} of {steps}" if ck is not None else f"training {steps} steps"
            log(
                f"{verb}: {spec.description} on {cfg['data.name']}, global batch {B} on {where}, "
                f"{rt.device}, {cfg['dtype']}"
            )

        saved = [start if ck is not None else None]  # the step of the checkpoint on disk

        def save(step):
            payload = {
                "model_type": cfg["model.type"],
                "config": dict(cfg),
                "step": step,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": _rng_state(rt.device),
                "log": history,
                "world_size": W,
                "torchnde": _version(),
            }
            if rt.is_main:
                save_checkpoint(ckpt_path, payload)
            rt.barrier()
            saved[0] = step

        bar = None
        if tqdm is not None and rt.is_main:
            bar = tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        every, log_every = cfg["train.checkpoint_every"], cfg["train.log_every"]
        step = start
        # one process: the first Ctrl-C ends the run after the current step, with a checkpoint of
        # it; under torchrun the processes would stop at different steps, so the run stops at once
        stopper = _StopOnInterrupt(enabled=not rt.distributed)
        try:
            with stopper:
                for step in range(start, end):
                    for group in opt.param_groups:
                        group["lr"] = _lr(cfg, step)
                    batch = {k: v.to(dtype=rt.dtype, device=rt.device) for k, v in spec.global_batch(cfg, step).items()}
                    loss = spec.loss(net, shard(batch, rt.rank, W), cfg)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    done = step + 1
                    if done % log_every == 0 or done == end:
                        mean = rt.all_reduce_(loss.detach().clone()) / W
                        history.append([done, float(mean)])
                        if bar is not None:
                            bar.set_postfix(loss=f"{history[-1][1]:.4f}", refresh=False)
                    if bar is not None:
                        bar.update(1)
                    if done % every == 0 or done == end or stopper.requested:
                        save(done)
                    if on_step is not None:
                        on_step(done, float(loss.detach()))
                    if stopper.requested:
                        if saved[0] != done:  # the signal came during on_step
                            save(done)
                        raise TrainingInterrupted(_interrupted(f"after step {done} of {steps}", saved[0], ckpt_path))
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:
            where = f"at step {step + 1} of {steps}"
            raise TrainingInterrupted(_interrupted(where, saved[0], ckpt_path, every)) from None
        finally:
            if bar is not None:
                bar.close()
    stopped = end < steps
    wall = time.perf_counter() - began
    if rt.is_main:
        last = f", loss {history[-1][1]:.4f}" if history else ""
        if end == start:
            log(f"nothing to do: the checkpoint {ckpt_path} is already at step {end} of {steps}")
        else:
            log(f"step {end} of {steps}{last}; wrote {ckpt_path} ({wall:.1f} s)")
        if stopped:
            log(f"stopped at step {end}; continue with: {resume_command(out)}")
    return TrainResult(model, cfg, end, history, ckpt_path, stopped, wall)


class TrainingInterrupted(KeyboardInterrupt):
    """``torchnde train`` was interrupted; the message says which step the checkpoint on disk
    holds and how to resume."""


def resume_command(out) -> str:
    """The command that continues the run in ``out``."""
    return f"torchnde train --resume --out {shlex.quote(str(out))}"


def _interrupted(where: str, saved: int | None, ckpt_path: Path, every: int | None = None) -> str:
    if saved is None:
        first = f" (the first is written at step {every})" if every else ""
        return f"{where}; no checkpoint was saved yet{first}: run the command again to start over"
    return f"{where}; saved checkpoint at step {saved} to {ckpt_path}; resume with `{resume_command(ckpt_path.parent)}`"


class _StopOnInterrupt:
    """While active (in the main thread, with Python's default SIGINT handler), the first SIGINT
    only sets :attr:`requested` (the loop then checkpoints the step it is in and stops); a second
    one interrupts at once."""

    def __init__(self, enabled: bool):
        self.enabled, self.requested, self._old = enabled, False, None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\ntorchnde train: interrupt: saving a checkpoint after this step (press Ctrl-C again to stop at once)",
            file=sys.stderr,
        )

    def __enter__(self):
        if (
            self.enabled
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None
        return False


def _version() -> str:
    from torchnde import __version__

    return __version__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", metavar="CONFIG", help="TOML or YAML configuration file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one configuration key, e.g. --set train.lr=1e-3 (repeatable)",
    )
    parser.add_argument("--out", metavar="DIR", default="runs/train", help="output directory (default: runs/train)")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    parser.add_argument(
        "--stop-at",
        metavar="STEP",
        type=_positive_int,
        default=None,
        help="stop after this global step, writing the checkpoint (for time-limited jobs; resume later)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (then tqdm is not needed)")
    parser.add_argument(
        "--threads", metavar="T", type=_positive_int, default=1, help="torch CPU threads per process (default: 1)"
    )


def run(args: argparse.Namespace) -> int:
    if args.config is None and not args.resume:
        raise ConfigError("CONFIG is required (unless --resume continues the run in --out)")
    if args.config is None:  # --resume: the checkpoint's configuration, with the overrides
        stored = check(load_checkpoint(Path(args.out) / CHECKPOINT)["config"])
        cfg = resolve(None, args.overrides, base=stored)
    else:
        cfg = resolve(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(cfg, indent=2))
        return 0
    train(cfg, args.out, resume=args.resume, stop_at=args.stop_at, progress=not args.no_progress, threads=args.threads)
    return 0
