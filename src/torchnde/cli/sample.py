"""``torchnde sample``: draw samples from a checkpoint of ``torchnde train``.

``torchnde sample CHECKPOINT [--sampler NAME] [--nfe N] [-n COUNT] [--out FILE]``

Score models (``model.type = "vp"``) use the samplers of
:data:`torchnde.generative.samplers.ALL_SAMPLERS` (DPM-Solver, EDM Heun and the adaptive SDE sampler
included); flow-matching models use ``euler``, ``heun`` (fixed
steps, ``nfe`` evaluations) or ``adaptive`` (``Tsit5`` with a PID controller, ``--rtol``/``--atol``).
The ``COUNT`` samples are drawn in chunks of ``--chunk-size``, chunk ``c`` from its own seed (a
function of ``--seed`` and ``c``), so the result does not depend on the number of processes: under
torchrun the chunks are shared out over the processes and gathered, and rank 0 writes ``FILE``
(``.pt``: a tensor; ``.npy``; ``.csv``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._checkpoint import CheckpointError, load_checkpoint
from ._config import check
from ._deps import positive_int as _positive_int
from ._errors import check_device_name, prepare_output_file
from ._models import DIM, MODELS, Runtime, chunked, derive_seed, runtime

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run", "load_trained", "draw_samples", "Samples", "write_samples"]

HELP = "draw samples from a checkpoint of 'torchnde train' (torchrun-ready)"
DESCRIPTION = (
    "Draw COUNT samples from a trained model with a sampler and an NFE budget and write them to FILE "
    "(.pt, .npy or .csv). Under torchrun the samples are split across the processes and gathered."
)

_SAMPLE_STREAM = 2

#: the file formats of ``--out``
FORMATS = (".pt", ".npy", ".csv")


@dataclass
class Samples:
    x: torch.Tensor  # (n, DIM) on the CPU, in the model's dtype
    sampler: str
    nfe: int | None  # the budget asked for
    nfe_used: float  # model evaluations per chunk, averaged over the chunks
    seconds: float


def load_trained(path, rt: Runtime | None = None, *, expect: str | None = None):
    """``(checkpoint, config, spec, model)`` of a checkpoint, the model on ``rt``'s device and in
    the checkpoint's dtype, in eval mode. ``expect`` names a required ``model.type``."""
    ck = load_checkpoint(path)
    cfg = check(ck["config"], where=f"in {ck['path']}")
    if cfg["model.type"] != ck["model_type"]:
        raise CheckpointError(f"{ck['path']}: model_type {ck['model_type']!r} disagrees with its configuration")
    if expect is not None and ck["model_type"] != expect:
        raise CheckpointError(f"{ck['path']} holds a {ck['model_type']!r} model, expected a {expect!r} model")
    spec = MODELS[ck["model_type"]]
    model = spec.build(cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{ck['path']}: the weights do not fit a {ck['model_type']!r} model: {e}") from None
    dtype = getattr(torch, cfg["dtype"])
    device = rt.device if rt is not None else torch.device("cpu")
    model = model.to(dtype=dtype, device=device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return ck, cfg, spec, model


def draw_samples(
    spec, model, cfg: dict, rt: Runtime, n: int, *, sampler: str, nfe: int | None, seed: int = 0,
    rtol: float | None = None, atol: float | None = None, chunk_size: int = 1000,
) -> Samples:  # fmt: skip
    """``n`` samples in chunks shared out over the processes of ``rt`` (see the module docstring)."""
    if sampler not in spec.samplers:
        raise ValueError(
            f"unknown sampler {sampler!r} for a {spec.name!r} model; valid samplers: {', '.join(spec.samplers)}"
        )
    if sampler not in spec.adaptive_samplers and (nfe is None or nfe < 1):
        raise ValueError(f"nfe must be an integer >= 1 for sampler {sampler!r}, got {nfe!r}")
    if n < 1 or chunk_size < 1:
        raise ValueError(f"need n >= 1 and chunk_size >= 1, got {n} and {chunk_size}")
    dtype = next(model.parameters()).dtype
    began = time.perf_counter()

    def one(c, start, size):
        return spec.sample(
            model, cfg, size, sampler=sampler, nfe=nfe, seed=derive_seed(seed, _SAMPLE_STREAM, c),
            dtype=dtype, device=rt.device, rtol=rtol, atol=atol,
        )  # fmt: skip

    x, costs = chunked(rt, n, chunk_size, one, DIM)
    return Samples(x.to(dtype), sampler, nfe, float(np.mean(costs)), time.perf_counter() - began)


def write_samples(path: str | Path, x: torch.Tensor) -> Path:
    """Write samples as ``.pt`` (a tensor, atomically), ``.npy`` or ``.csv``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".pt":
        import os
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(x.detach().cpu(), f)
        os.replace(tmp, path)
    elif suffix == ".npy":
        np.save(path, x.detach().cpu().numpy())
    elif suffix == ".csv":
        np.savetxt(path, x.detach().cpu().numpy(), delimiter=",", header="x,y", comments="")
    else:
        raise ValueError(f"unknown output format {suffix!r}; use {', '.join(FORMATS)}")
    return path


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def _device_name(s: str) -> str:
    """An argparse type: a device name (the same check as the configuration's ``device``)."""
    try:
        return check_device_name(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_common_arguments(parser: argparse.ArgumentParser, *, n_default: int) -> None:
    # -n defaults to None: n_default samples, 200 graphs for a gdss (graph) model
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pt of 'torchnde train' (or its directory)")
    parser.add_argument("--sampler", metavar="NAME", default=None, help="sampler (default: the model's default)")
    parser.add_argument(
        "--nfe", metavar="N", type=_positive_int, default=None, help="model evaluations per sample (>= 1)"
    )
    parser.add_argument(
        "-n",
        metavar="COUNT",
        type=_positive_int,
        default=None,
        help=f"samples (default: {n_default}; graph models: 200 graphs)",
    )
    parser.add_argument("--seed", metavar="S", type=int, default=0, help="seed of the samples (default: 0)")
    parser.add_argument(
        "--rtol", type=_positive_float, default=None, help="tolerance of adaptive samplers (1e-5; sde_adaptive 1e-2)"
    )
    parser.add_argument(
        "--atol", type=_positive_float, default=None, help="tolerance of adaptive samplers (1e-5; sde_adaptive 1e-2)"
    )
    parser.add_argument(
        "--chunk-size", metavar="K", type=_positive_int, default=1000, help="samples per solve (default: 1000)"
    )
    parser.add_argument(
        "--device", type=_device_name, default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' (default: auto)"
    )
    parser.add_argument(
        "--threads", metavar="T", type=_positive_int, default=1, help="torch CPU threads per process (default: 1)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, n_default=1000)
    parser.add_argument(
        "--out",
        metavar="FILE",
        default=None,
        help="output file: .pt, .npy or .csv; graphs: .g6 (graph6) or .json (default: next to the checkpoint)",
    )


def resolve_sampler(spec, sampler, nfe):
    """The sampler and NFE to use, or ``ValueError`` naming the valid samplers."""
    sampler = sampler or spec.default_sampler
    if sampler not in spec.samplers:
        raise ValueError(
            f"unknown sampler {sampler!r} for a {spec.name!r} model; valid samplers: {', '.join(spec.samplers)}"
        )
    if nfe is None and sampler not in spec.adaptive_samplers:
        nfe = spec.default_nfe
    return sampler, nfe


def run(args: argparse.Namespace) -> int:
    ck = load_checkpoint(args.checkpoint)
    with runtime(args.device, check(ck["config"])["dtype"], args.threads) as rt:
        ck, cfg, spec, model = load_trained(args.checkpoint, rt)
        if spec.name == "gdss":  # graphs: their own sampling and file formats
            from ._graphs import run_sample

            return run_sample(args, ck, cfg, spec, model, rt)
        args.n = 1000 if args.n is None else args.n
        sampler, nfe = resolve_sampler(spec, args.sampler, args.nfe)
        tag = f"nfe{nfe}" if nfe is not None else (f"rtol{args.rtol:g}" if args.rtol else "adaptive")
        out = Path(args.out) if args.out else Path(ck["path"]).parent / f"samples-{sampler}-{tag}.pt"
        prepare_output_file(out, FORMATS)  # before sampling, not after (every process: none waits alone)
        res = draw_samples(
            spec, model, cfg, rt, args.n, sampler=sampler, nfe=nfe, seed=args.seed,
            rtol=args.rtol, atol=args.atol, chunk_size=args.chunk_size,
        )  # fmt: skip
        if rt.is_main:
            write_samples(out, res.x)
            info = {
                "file": str(out),
                "n": args.n,
                "model": spec.name,
                "step": int(ck["step"]),
                "sampler": sampler,
                "nfe": nfe,
                "nfe_used": res.nfe_used,
                "seconds": round(res.seconds, 3),
                "processes": rt.world_size,
            }
            print(json.dumps(info))
        rt.barrier()
    return 0
