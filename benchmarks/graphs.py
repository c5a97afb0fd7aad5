"""GDSS graph generation on CPU: community-small trained with torchnde.generative.graphs.train,
sampled with S4 and predictor–corrector at equal NFE, MMDs beside their data-vs-data floors.

Per seed ``s`` (3 seeds): 100 community-small graphs generated from ``s``, split 80/20 (GDSS's
protocol); a GraphScoreModel trained ``--steps`` steps on the 80; ``--n-gen`` graphs sampled with
S4 (``nfe`` steps, Langevin corrector snr 0.05 inside) and with PC (``nfe // 2`` steps, one
corrector each), both ``nfe`` evaluations (+1 for the final Tweedie denoising). Each set of
generated graphs is compared (GDSS's MMD convention) with

* the 20 test graphs (GDSS's protocol) and
* 500 fresh graphs of the generator (a larger test set),

and beside each number stands the floor: a fresh draw of ``--n-gen`` graphs of the generator
against the same reference, and the Erdős–Rényi baseline (the training graphs' sizes and density).
Grid graphs: one training step is timed and the full budget extrapolated (see the md). Writes
``graphs.md`` beside this file.

    python benchmarks/graphs.py             # ~10 min on 2 busy cores
    python benchmarks/graphs.py --quick     # smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from torchnde.generative.graphs import erdos_renyi_like, graph_mmd, load, train_test_split
from torchnde.generative.graphs.train import build_model, fit, graph_process, prepare, sample_graphs

METRICS = ("degree", "clustering", "orbit", "spectral")


def _fmt(v):
    v = np.asarray(v, dtype=float)
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if v.size > 1 else f"{v.mean():.4f}"


def run_seed(s, args, log):
    torch.manual_seed(s)
    graphs = load("community_small", 100, seed=s)
    train, test = train_test_split(graphs, 0.2, seed=s)
    fresh = load("community_small", args.n_fresh, seed=1000 + s)
    floor_set = load("community_small", args.n_gen, seed=2000 + s)
    er = erdos_renyi_like(train, args.n_gen, seed=3000 + s)
    b = prepare(train, max_nodes=20, max_degree=12)
    F = b.x.shape[-1]
    model = build_model(F, hidden=args.hidden, depth=args.depth, powers=3, layers=args.depth, heads=4)
    mp = graph_process()
    r = fit(model, mp, b, steps=args.steps, batch_size=args.batch, lr=args.lr, ema_decay=args.ema, seed=s)
    log(f"seed {s}: trained {args.steps} steps, {r.seconds:.0f} s wall, {r.cpu_seconds:.0f} s thread CPU")
    out = {"train_wall": r.seconds, "train_cpu": r.cpu_seconds, "rows": {}}
    sizes = [g.number_of_nodes() for g in train]
    refs = {"test": test, "fresh": fresh}
    for ref_name, ref in refs.items():
        out["rows"][("floor", ref_name)] = graph_mmd(ref, floor_set, METRICS)
        out["rows"][("ER", ref_name)] = graph_mmd(ref, er, METRICS)
    for sampler in ("s4", "pc"):
        w, c = time.perf_counter(), time.thread_time()
        gen = sample_graphs(
            r.ema, mp, args.n_gen, sizes, max_nodes=20, features=F, sampler=sampler, nfe=args.nfe, snr=0.05, seed=s
        )
        out[f"{sampler}_wall"], out[f"{sampler}_cpu"] = time.perf_counter() - w, time.thread_time() - c
        out[f"{sampler}_edges"] = float(np.mean([g.number_of_edges() for g in gen]))
        for ref_name, ref in refs.items():
            out["rows"][(sampler, ref_name)] = graph_mmd(ref, gen, METRICS)
        log(
            f"seed {s}: {sampler} {out[f'{sampler}_wall']:.0f} s wall, {out[f'{sampler}_cpu']:.0f} s CPU, "
            f"fresh {out['rows'][(sampler, 'fresh')]}"
        )
    return out


def grid_step_time(args):
    """Thread-CPU seconds of one training step on grid graphs (padded to 361 nodes)."""
    graphs = load("grid", 8, seed=0)
    b = prepare(graphs, max_nodes=361, max_degree=4)
    torch.manual_seed(0)
    model = build_model(b.x.shape[-1], hidden=args.hidden, depth=args.depth, powers=3, layers=args.depth, heads=4)
    c = time.thread_time()
    fit(model, graph_process(), b, steps=1, batch_size=args.grid_batch, ema_decay=0)
    step = time.thread_time() - c
    c = time.thread_time()
    with torch.no_grad():
        x, adj, mask = (v[: args.grid_batch] for v in b)
        model(torch.full((x.shape[0],), 0.5), {"x": x, "adj": adj}, mask)
    return step, time.thread_time() - c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--nfe", type=int, default=200)
    ap.add_argument("--n-gen", type=int, default=200)
    ap.add_argument("--n-fresh", type=int, default=500)
    ap.add_argument("--grid-batch", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "graphs.md"))
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.nfe, args.n_gen, args.n_fresh = 2, 5, 4, 10, 20
    torch.set_num_threads(1)
    began_wall, began_cpu = time.perf_counter(), time.process_time()
    load0 = os.getloadavg()[0]
    results = [run_seed(s, args, print) for s in range(args.seeds)]
    grid_step, grid_fwd = grid_step_time(args)
    lines = [
        "# GDSS graph generation on CPU: community-small",
        "",
        "Written by `benchmarks/graphs.py` (see its docstring for the protocol). MMD² in GDSS's",
        "convention (`graph_mmd(..., convention='gdss')`; spectral: GRAN's Gaussian-TV kernel), mean ±",
        f"sd over {args.seeds} seeds (data set, split, weights, samples all drawn from the seed).",
        "",
        f"Budget: {args.steps} training steps, batch {args.batch}, Adam lr {args.lr} (cosine), EMA {args.ema},",
        f"hidden {args.hidden}, {args.depth} GCN / attention layers, 3 adjacency powers, VP(0.1, 20) on both",
        f"leaves; {args.n_gen} generated graphs per sampler at NFE {args.nfe} (+1 Tweedie denoising",
        "evaluation): S4 = NFE steps with its Langevin corrector inside, PC = NFE/2 predictor steps with one",
        "corrector each, snr 0.05 for both. Quantised at 0.5.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load {load0:.1f} at",
        "the start), one torch thread.",
        "",
        "| reference | method | degree | clustering | orbit | spectral |",
        "|---|---|---|---|---|---|",
    ]
    labels = {"floor": "data vs data (floor)", "ER": "Erdős–Rényi", "s4": "GDSS, S4", "pc": "GDSS, PC"}
    for ref, ref_label in (("test", "test split (20)"), ("fresh", f"fresh ({args.n_fresh})")):
        for method in ("floor", "ER", "s4", "pc"):
            vals = [_fmt([r["rows"][(method, ref)][m] for r in results]) for m in METRICS]
            lines.append(f"| {ref_label} | {labels[method]} | " + " | ".join(vals) + " |")
    lines += ["", "Targets (issue 14): community-small degree / clustering / orbit MMD within one sd of the floor:", ""]
    for ref, ref_label in (("test", "test split (20)"), ("fresh", f"fresh ({args.n_fresh})")):
        for method in ("s4", "pc"):
            verdicts = []
            for m in ("degree", "clustering", "orbit"):
                fl = np.array([r["rows"][("floor", ref)][m] for r in results])
                v = np.mean([r["rows"][(method, ref)][m] for r in results])
                bound = fl.mean() + (fl.std(ddof=1) if fl.size > 1 else 0.0)
                verdicts.append(f"{m} {v:.4f} vs {bound:.4f}: {'met' if v <= bound else 'missed'}")
            lines.append(f"* {ref_label}, {labels[method]}: " + "; ".join(verdicts))
    mean = lambda k: _fmt([r[k] for r in results])  # noqa: E731
    lines += [
        "",
        "Time per seed (seconds; wall clock on the loaded machine, and the thread's CPU time):",
        "",
        "| phase | wall | thread CPU |",
        "|---|---|---|",
        f"| training ({args.steps} steps) | {mean('train_wall')} | {mean('train_cpu')} |",
        f"| S4 sampling ({args.n_gen} graphs, NFE {args.nfe}) | {mean('s4_wall')} | {mean('s4_cpu')} |",
        f"| PC sampling ({args.n_gen} graphs, NFE {args.nfe}) | {mean('pc_wall')} | {mean('pc_cpu')} |",
        "",
        f"Mean edges per generated graph: S4 {mean('s4_edges')}, PC {mean('pc_edges')}.",
        "",
        "## Grid",
        "",
        f"One training step on {args.grid_batch} grid graphs padded to 361 nodes takes {grid_step:.1f} s of",
        f"thread CPU (one forward pass {grid_fwd:.1f} s) with the same network. GDSS trains grid for",
        "thousands of epochs and samples with 1000 steps; at these costs even 1000 steps of batch 4 and",
        f"one 1000-step sampling run of 20 graphs would take ~{1000 * grid_step / 3600:.1f} h +",
        f"~{1000 * grid_fwd * 20 / args.grid_batch / 3600:.1f} h of CPU, so grid was not trained here.",
        "",
        f"Whole run: {time.perf_counter() - began_wall:.0f} s wall, {time.process_time() - began_cpu:.0f} s process CPU.",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
