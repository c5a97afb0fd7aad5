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
Writes ``graphs.md`` beside this file.

Grid (``graphs_grid.md``): one seed of GDSS's protocol (80 training graphs of 100–361 nodes, 20
generated graphs against the 20 test graphs) at the CPU budget ``--grid-steps`` /
``--grid-layers`` / ``--grid-nfe``, beside the floor and the Erdős–Rényi baseline.

    python benchmarks/graphs.py --skip-grid         # community-small: ~20 min of one CPU core
    python benchmarks/graphs.py --skip-community    # grid: ~45 min of one CPU core (2400 steps)
    python benchmarks/graphs.py --quick             # smoke test of both
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
    model = build_model(F, hidden=args.hidden, depth=args.depth, powers=args.powers, layers=args.layers)
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


def run_grid(args, log):
    """Grid (seed 0): GDSS's protocol (100 graphs split 80/20, 20 generated graphs against the 20
    test graphs) at the CPU budget of ``--grid-steps`` steps of ``--grid-batch`` graphs."""
    graphs = load("grid", 100, seed=0)
    train, test = train_test_split(graphs, 0.2, seed=0)
    b = prepare(train, max_nodes=361, max_degree=4)
    F = b.x.shape[-1]
    torch.manual_seed(0)
    model = build_model(F, hidden=args.hidden, depth=args.depth, powers=args.grid_powers, layers=args.grid_layers)
    mp = graph_process()
    out = {"rows": {}}
    out["rows"]["floor"] = graph_mmd(test, load("grid", args.grid_gen, seed=2000), METRICS)
    out["rows"]["ER"] = graph_mmd(test, erdos_renyi_like(train, args.grid_gen, seed=3000), METRICS)
    r = fit(model, mp, b, steps=args.grid_steps, batch_size=args.grid_batch, lr=args.lr, ema_decay=args.ema, seed=0)
    out["train_wall"], out["train_cpu"] = r.seconds, r.cpu_seconds
    log(f"grid: trained {args.grid_steps} steps, {r.seconds:.0f} s wall, {r.cpu_seconds:.0f} s thread CPU")
    w, c = time.perf_counter(), time.thread_time()
    sizes = [g.number_of_nodes() for g in train]
    gen = sample_graphs(
        r.ema, mp, args.grid_gen, sizes, max_nodes=361, features=F, sampler="s4", nfe=args.grid_nfe, snr=0.05,
        seed=0, chunk_size=5,
    )  # fmt: skip
    out["sample_wall"], out["sample_cpu"] = time.perf_counter() - w, time.thread_time() - c
    out["rows"]["s4"] = graph_mmd(test, gen, METRICS)
    out["edges"] = float(np.mean([g.number_of_edges() for g in gen]))
    out["data_edges"] = float(np.mean([g.number_of_edges() for g in test]))
    log(f"grid: {out}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--powers", type=int, default=2)
    ap.add_argument("--nfe", type=int, default=200)
    ap.add_argument("--n-gen", type=int, default=200)
    ap.add_argument("--n-fresh", type=int, default=500)
    ap.add_argument("--grid-batch", type=int, default=4)
    ap.add_argument("--grid-steps", type=int, default=2400)
    ap.add_argument("--grid-layers", type=int, default=3)
    ap.add_argument("--grid-powers", type=int, default=2)
    ap.add_argument("--grid-nfe", type=int, default=100)
    ap.add_argument("--grid-gen", type=int, default=20)
    ap.add_argument("--skip-community", action="store_true", help="grid only (writes graphs_grid.md)")
    ap.add_argument("--skip-grid", action="store_true", help="community-small only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "graphs.md"))
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.nfe, args.n_gen, args.n_fresh = 2, 5, 4, 10, 20
        args.grid_steps, args.grid_nfe, args.grid_gen = 2, 2, 5
    torch.set_num_threads(1)
    began_wall, began_cpu = time.perf_counter(), time.process_time()
    load0 = os.getloadavg()[0]
    if not args.skip_community:
        write_community(args, began_wall, began_cpu, load0)
    if not args.skip_grid:
        write_grid(args, load0)


def write_community(args, began_wall, began_cpu, load0):
    results = [run_seed(s, args, print) for s in range(args.seeds)]
    lines = [
        "# GDSS graph generation on CPU: community-small",
        "",
        "Written by `benchmarks/graphs.py` (see its docstring for the protocol). MMD² in GDSS's",
        "convention (`graph_mmd(..., convention='gdss')`; spectral: GRAN's Gaussian-TV kernel), mean ±",
        f"sd over {args.seeds} seeds (data set, split, weights, samples all drawn from the seed).",
        "",
        f"Budget: {args.steps} training steps, batch {args.batch}, Adam lr {args.lr} (cosine), EMA {args.ema}, uniform times,",
        f"hidden {args.hidden}, {args.depth} GCN layers (node network), {args.layers} attention layers over {args.powers} adjacency",
        "powers with 8 / 4 channels (adjacency network), VP(0.1, 20) on both",
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
        f"Whole run: {time.perf_counter() - began_wall:.0f} s wall, {time.process_time() - began_cpu:.0f} s process CPU.",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_grid(args, load0):
    began_wall, began_cpu = time.perf_counter(), time.process_time()
    g = run_grid(args, print)
    rows = g["rows"]
    lines = [
        "# GDSS graph generation on CPU: grid",
        "",
        "Written by `benchmarks/graphs.py --skip-community` (see its docstring). GDSS's protocol on grid",
        "(100 graphs of 100–361 nodes generated from seed 0, split 80/20; generated graphs against the 20",
        "test graphs; MMD² in GDSS's convention), one seed at a CPU budget: "
        f"{args.grid_steps} training steps of batch {args.grid_batch}",
        f"(minibatches trimmed to their largest graph), Adam lr {args.lr} (cosine), EMA {args.ema}, hidden {args.hidden},",
        f"{args.depth} GCN layers, {args.grid_layers} attention layers over {args.grid_powers} adjacency powers (8 / 4 channels),",
        f"VP(0.1, 20) on both leaves; {args.grid_gen} graphs sampled with S4 at NFE {args.grid_nfe} (snr 0.05), chunks",
        "of 5 graphs sorted by size, quantised at 0.5.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load {load0:.1f} at",
        "the start), one torch thread.",
        "",
        "| method | degree | clustering | orbit | spectral |",
        "|---|---|---|---|---|",
    ]
    labels = {"floor": "data vs data (floor)", "ER": "Erdős–Rényi", "s4": "GDSS, S4"}
    for k in ("floor", "ER", "s4"):
        lines.append(f"| {labels[k]} | " + " | ".join(f"{rows[k][m]:.4f}" for m in METRICS) + " |")
    deg, orb = rows["s4"]["degree"], rows["s4"]["orbit"]
    lines += [
        "",
        "Targets (issue 14, the paper's grid numbers): degree ≤ 0.111: "
        f"{'met' if deg <= 0.111 else 'missed'} ({deg:.4f}); orbit ≤ 0.070: {'met' if orb <= 0.070 else 'missed'} "
        f"({orb:.4f}).",
        "",
        f"Edges per graph: generated {g['edges']:.1f}, test graphs {g['data_edges']:.1f}.",
        "",
        "| phase | wall (s) | thread CPU (s) |",
        "|---|---|---|",
        f"| training ({args.grid_steps} steps of {args.grid_batch}) | {g['train_wall']:.0f} | {g['train_cpu']:.0f} |",
        f"| S4 sampling ({args.grid_gen} graphs, NFE {args.grid_nfe}) | {g['sample_wall']:.0f} | {g['sample_cpu']:.0f} |",
        "",
        f"Whole run: {time.perf_counter() - began_wall:.0f} s wall, {time.process_time() - began_cpu:.0f} s process CPU.",
    ]
    out = os.path.join(os.path.dirname(args.out), "graphs_grid.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
