"""``torchnde evaluate``: sample quality and likelihood of a checkpoint of ``torchnde train``.

``torchnde evaluate CHECKPOINT [--sampler NAME] [--nfe N] [-n COUNT] [--nll-n COUNT] [--out DIR]``

Draws ``COUNT`` samples (as ``torchnde sample``) and compares them with ``COUNT`` fresh samples of
the data set (never seen in training) by the exact W2 distance, the sliced W2 distance and the
squared MMD (:mod:`torchnde.generative.metrics`); the same three numbers between two independent
fresh data sets are reported as the floor a perfect model would reach at this sample size. The
negative log-likelihood (nats and bits per dimension) of ``--nll-n`` fresh data points is computed
through the model's ODE with the exact trace (:func:`torchnde.generative.likelihood.log_prob`;
for score models the probability-flow ODE), next to that of the standard normal as a reference.
Writes ``DIR/metrics.json`` and ``DIR/metrics.md``; under torchrun the samples and the
likelihoods are split across the processes and gathered, and rank 0 computes and writes the
metrics. ``-n 1`` is refused (a distance between distributions needs samples of them); fewer than
:data:`MIN_SAMPLES` samples or :data:`MIN_NLL_POINTS` likelihood points give a warning on stderr
and in the report, since the numbers are then mostly sampling noise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ._checkpoint import load_checkpoint
from ._config import check
from ._errors import UsageError, prepare_output_dir
from ._models import Runtime, chunked, eval_data, runtime
from .sample import add_common_arguments, draw_samples, load_trained, resolve_sampler

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run", "evaluate", "write_report"]

HELP = "evaluate a checkpoint of 'torchnde train': W2, sliced W2, MMD and NLL (torchrun-ready)"
DESCRIPTION = (
    "Compare samples of a trained model with fresh data (exact W2, sliced W2, MMD^2, each next to the "
    "data-vs-data floor) and compute the NLL of fresh data through the model's ODE; writes "
    "DIR/metrics.json and DIR/metrics.md. Graph (gdss) models: degree/clustering/orbit/spectral MMD against the "
    "test split and fresh graphs, beside the floors and the Erdos-Renyi baseline, and DIR/graphs.png."
)


#: fewer samples than this and the metrics are mostly sampling noise (a warning)
MIN_SAMPLES = 100
#: fewer likelihood points than this and the NLL's standard error is unreliable (a warning)
MIN_NLL_POINTS = 10


def check_sample_counts(n: int, nll_n: int) -> list[str]:
    """The warnings for small sample counts (see :data:`MIN_SAMPLES`); :class:`UsageError` for
    ``n < 2``, where the metrics are not defined as comparisons of distributions."""
    if n < 2:
        raise UsageError(
            f"-n {n}: W2, sliced W2 and MMD compare two distributions through their samples and need at least "
            f"2 samples ({MIN_SAMPLES} or more for numbers that mean something)"
        )
    warnings = []
    if n < MIN_SAMPLES:
        warnings.append(
            f"-n {n}: with fewer than {MIN_SAMPLES} samples W2, sliced W2 and MMD are dominated by sampling noise "
            "(compare them with the data-vs-data floor in the report, measured at the same n); use -n 1000"
        )
    if 0 < nll_n < MIN_NLL_POINTS:
        warnings.append(
            f"--nll-n {nll_n}: the NLL is a mean over {nll_n} point(s) "
            f"({'no standard error from one point' if nll_n == 1 else 'its standard error is unreliable'}); "
            "use --nll-n 500"
        )
    return warnings


def evaluate(
    path, rt: Runtime, *, n: int = 1000, nll_n: int = 500, sampler: str | None = None, nfe: int | None = None,
    seed: int = 0, rtol: float | None = None, atol: float | None = None, chunk_size: int = 1000,
) -> dict:  # fmt: skip
    """The metrics of the checkpoint at ``path`` (a dict; see the module docstring)."""
    from ..generative import metrics

    warnings = check_sample_counts(n, nll_n)
    ck, cfg, spec, model = load_trained(path, rt)
    sampler, nfe = resolve_sampler(spec, sampler, nfe)
    res = draw_samples(
        spec, model, cfg, rt, n, sampler=sampler, nfe=nfe, seed=seed, rtol=rtol, atol=atol, chunk_size=chunk_size
    )
    out = {
        "checkpoint": ck["path"],
        "model": spec.name,
        "data": cfg["data.name"],
        "step": int(ck["step"]),
        "n": n,
        "sampler": sampler,
        "nfe": nfe,
        "nfe_used": res.nfe_used,
        "sample_seconds": round(res.seconds, 3),
        "processes": rt.world_size,
    }
    if warnings:
        out["warnings"] = warnings
    if rt.is_main:
        x = res.x.to(torch.float64)
        data, data2 = eval_data(cfg, n, 0), eval_data(cfg, n, 1)
        out["w2"] = metrics.wasserstein2(x, data)
        out["sliced_w2"] = metrics.sliced_wasserstein(x, data, seed=seed)
        out["mmd2"] = metrics.mmd2(x, data)
        out["w2_data_floor"] = metrics.wasserstein2(data2, data)
        out["sliced_w2_data_floor"] = metrics.sliced_wasserstein(data2, data, seed=seed)
        out["mmd2_data_floor"] = metrics.mmd2(data2, data)
    if nll_n > 0:
        from ..generative.likelihood import standard_normal_log_prob

        dtype = next(model.parameters()).dtype
        xs = eval_data(cfg, nll_n, 2)
        began = time.perf_counter()

        def one(c, start, size):
            x = xs[start : start + size].to(dtype=dtype, device=rt.device)
            # the likelihood ODE's tolerances (1e-5 unless given; the sampler keeps its own default)
            tol = dict(rtol=1e-5 if rtol is None else rtol, atol=1e-5 if atol is None else atol)
            return spec.log_prob(model, cfg, x, **tol), 0.0

        lp, _ = chunked(rt, nll_n, chunk_size, one, 1)
        dims = xs.shape[1]
        out["nll_n"] = nll_n
        out["nll_nats"] = -float(lp.mean())
        out["nll_nats_stderr"] = float(lp.std() / math.sqrt(nll_n)) if nll_n > 1 else float("nan")
        out["bits_per_dim"] = out["nll_nats"] / (dims * math.log(2.0))
        out["nll_standard_normal"] = -float(standard_normal_log_prob(xs).mean())
        out["nll_seconds"] = round(time.perf_counter() - began, 3)
    return out


_ROWS = [
    ("W2 (exact)", "w2", "w2_data_floor"),
    ("sliced W2", "sliced_w2", "sliced_w2_data_floor"),
    ("MMD² (RBF, 7 bandwidths)", "mmd2", "mmd2_data_floor"),
]


def write_report(metrics: dict, directory: str | Path) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.md`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    js = directory / "metrics.json"
    js.write_text(json.dumps(metrics, indent=2) + "\n")
    m = metrics
    nfe = f"{m['nfe']}" if m["nfe"] is not None else "adaptive"
    lines = [
        f"# Evaluation of `{m['checkpoint']}`",
        "",
        f"{m['model']} model on `{m['data']}` after {m['step']} steps; {m['n']} samples with `{m['sampler']}` "
        f"(NFE {nfe}, {m['nfe_used']:.1f} evaluations used, {m['sample_seconds']:.2f} s, {m['processes']} process(es)).",
        "",
        "| metric | model vs data | data vs data (floor) |",
        "|---|---|---|",
    ]
    for name, key, floor in _ROWS:
        if key in m:
            lines.append(f"| {name} | {m[key]:.4f} | {m[floor]:.4f} |")
    for w in m.get("warnings", ()):
        lines += ["", f"**Warning:** {w}."]
    if "nll_nats" in m:
        lines += [
            "",
            f"NLL of {m['nll_n']} fresh data points through the model's ODE (exact trace): "
            f"**{m['nll_nats']:.4f} ± {m['nll_nats_stderr']:.4f} nats** "
            f"({m['bits_per_dim']:.4f} bits/dim); the standard normal scores {m['nll_standard_normal']:.4f} nats "
            f"({m['nll_seconds']:.2f} s).",
        ]
    md = directory / "metrics.md"
    md.write_text("\n".join(lines) + "\n")
    return js, md


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, n_default=1000)
    parser.add_argument(
        "--nll-n",
        metavar="COUNT",
        type=int,
        default=500,
        help="data points for the NLL (default: 500; 0 skips the likelihood)",
    )
    parser.add_argument(
        "--out", metavar="DIR", default=None, help="directory for metrics.json/.md (default: the checkpoint's)"
    )
    parser.add_argument("--no-plot", action="store_true", help="graph models: no graphs.png (then no matplotlib)")


def run(args: argparse.Namespace) -> int:
    if args.nll_n < 0:
        raise UsageError(f"--nll-n must be >= 0, got {args.nll_n}")
    ck = load_checkpoint(args.checkpoint)
    if ck.get("model_type") == "gdss":  # graphs: MMD table with floors, and a plot
        from ._graphs import run_evaluate
        from .sample import load_trained

        with runtime(args.device, check(ck["config"])["dtype"], args.threads) as rt:
            out = prepare_output_dir(args.out or Path(ck["path"]).parent)
            ck, cfg, spec, model = load_trained(args.checkpoint, rt)
            code = run_evaluate(args, ck, cfg, spec, model, rt, out)
            rt.barrier()
            return code
    args.n = 1000 if args.n is None else args.n
    check_sample_counts(args.n, args.nll_n)
    with runtime(args.device, check(ck["config"])["dtype"], args.threads) as rt:
        out = prepare_output_dir(args.out or Path(ck["path"]).parent)  # before the work, not after
        m = evaluate(
            args.checkpoint, rt, n=args.n, nll_n=args.nll_n, sampler=args.sampler, nfe=args.nfe,
            seed=args.seed, rtol=args.rtol, atol=args.atol, chunk_size=args.chunk_size,
        )  # fmt: skip
        if rt.is_main:
            for w in m.get("warnings", ()):
                print(f"torchnde evaluate: warning: {w}", file=sys.stderr)
            js, md = write_report(m, out)
            print(md.read_text(), end="")
            print(f"wrote {js} and {md}")
        rt.barrier()
    return 0
