"""Data-vs-data MMD floors of the offline graph data sets, and the Erdős–Rényi baseline beside them.

For each data set and test-set size ``n``: the MMD² between two independent draws of ``n`` graphs
of the same generator (mean ± sd over seeds), in GDSS's convention and in the unbiased
positive-definite one (torchnde.generative.graphs.metrics), and the MMD² of the Erdős–Rényi
baseline (the data's size distribution and edge density, fitted on 100 training graphs) against
``n`` test graphs, over the same seeds. Writes ``graph_floors.md`` beside this file.

    python benchmarks/graph_floors.py            # ~3 min on 2 busy cores
    python benchmarks/graph_floors.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from torchnde.generative.graphs import erdos_renyi_like, graph_mmd, load, mmd_floor

METRICS = ("degree", "clustering", "orbit", "spectral")


def _er(name, n, seeds, convention):
    vals = {m: [] for m in METRICS}
    for s in seeds:
        train = load(name, 100, seed=10_000 + s)
        test = load(name, n, seed=20_000 + s)
        out = graph_mmd(test, erdos_renyi_like(train, n, seed=30_000 + s), METRICS, convention=convention)
        for m in METRICS:
            vals[m].append(out[m])
    return {m: (float(np.mean(v)), float(np.std(v, ddof=1))) for m, v in vals.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "graph_floors.md"))
    args = ap.parse_args()
    cases = [
        ("community_small", 20, 20),
        ("community_small", 100, 10),
        ("community_small", 500, 5),
        ("grid", 20, 10),
        ("grid", 100, 5),
        ("planar", 40, 5),
        ("sbm", 40, 5),
    ]
    if args.quick:
        cases = [("community_small", 10, 2), ("grid", 3, 2)]
    lines = [
        "# Graph MMD floors (data vs data) and the Erdős–Rényi baseline",
        "",
        "Written by `benchmarks/graph_floors.py`. MMD² values, mean ± sd over seeds. *floor*: two",
        "independent draws of `n` graphs from the same generator; *ER*: the Erdős–Rényi baseline",
        "(fitted on 100 training graphs) against `n` test graphs. `gdss`: GDSS's kernels and biased",
        "estimate (spectral: GRAN's Gaussian-TV kernel); `unbiased`: positive-definite kernels,",
        "unbiased estimate (can be negative). See docs/graphs.md.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}.",
        "",
    ]
    t0 = time.perf_counter()
    for convention in ("gdss", "unbiased"):
        lines += [
            f"## convention `{convention}`",
            "",
            "| data | n | seeds | what | " + " | ".join(METRICS) + " |",
            "|---|---|---|---|" + "---|" * len(METRICS),
        ]
        for name, n, n_seeds in cases:
            seeds = range(n_seeds)
            floor = mmd_floor(name, n, seeds, METRICS, convention=convention)
            er = _er(name, n, seeds, convention)
            for what, res in (("floor", floor), ("ER", er)):
                cells = " | ".join(f"{res[m][0]:.4f} ± {res[m][1]:.4f}" for m in METRICS)
                lines.append(f"| {name} | {n} | {n_seeds} | {what} | {cells} |")
            print(f"{convention} {name} n={n}: {time.perf_counter() - t0:.0f} s", flush=True)
        lines.append("")
    lines.append(f"Total time: {time.perf_counter() - t0:.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
