"""The ``gdss`` model type of ``torchnde train``/``sample``/``evaluate``: graph generation with a
system of SDEs (GDSS, Jo, Lee & Hwang 2022) on the offline graph data sets of
:mod:`torchnde.generative.graphs`.

Training goes through the generic loop of ``torchnde train`` (resumable, torchrun-ready): the data
set is ``data.n_graphs`` graphs of ``data.name`` generated from ``seed`` and split
``1 - data.test_fraction`` / ``data.test_fraction`` (GDSS's 80/20 protocol); every step draws
``train.batch_size`` training graphs, times and (symmetric) noise from ``(seed, step)``. The
network is :class:`_EMAModel`: the :class:`~torchnde.generative.graphs.GraphScoreModel` being
trained plus an exponential moving average of its weights (updated on every training forward pass,
saved in the checkpoint, and the one used in eval mode, i.e. for sampling).

``sample`` writes graph6 (``.g6``, ``networkx.read_graph6`` reads the list back) or node-link JSON
(``.json``); ``evaluate`` prints degree / clustering / orbit / spectral MMD of the samples against
the held-out test set (GDSS's protocol) and against ``n`` fresh graphs of the generator, each next to
its data-vs-data floor and the Erdős–Rényi baseline, and plots generated vs reference graphs.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["build", "batch", "loss", "sample", "write_graphs", "evaluate_graphs", "write_graph_report", "plot_graphs"]

_DATA, _NOISE, _FRESH = 0, 1, 5
GRAPH_FORMATS = (".g6", ".json")
METRICS = ("degree", "clustering", "orbit", "spectral")


class _EMAModel(nn.Module):
    """``net`` (trained) and ``ema`` (its moving average; used in eval mode)."""

    def __init__(self, net: nn.Module, decay: float):
        super().__init__()
        self.net, self.decay = net, float(decay)
        self.ema = copy.deepcopy(net)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def _update(self):
        k = int(self.updates)
        d = min(self.decay, (1.0 + k) / (10.0 + k))
        for e, p in zip(self.ema.parameters(), self.net.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        self.updates += 1

    def forward(self, t, state, mask=None):
        if self.training:
            if self.decay > 0:
                self._update()  # the average of the weights up to the previous step
            return self.net(t, state, mask)
        return (self.ema if self.decay > 0 else self.net)(t, state, mask)


@functools.lru_cache(maxsize=4)
def _dataset(name: str, n_graphs: int, test_fraction: float, seed: int, max_nodes: int):
    from ..generative.graphs import load, to_tensors, train_test_split

    graphs = load(name, n_graphs, seed=seed)
    train, test = train_test_split(graphs, test_fraction, seed=seed)
    n = max_nodes or max(g.number_of_nodes() for g in graphs)
    max_degree = max(max(d for _, d in g.degree()) for g in train)
    tensors = to_tensors(train, max_nodes=n, max_degree=max_degree, dtype=torch.float64)
    return train, test, tensors


def dataset(cfg: dict):
    """``(train graphs, test graphs, padded float64 training tensors)`` of the configuration."""
    return _dataset(
        cfg["data.name"], cfg["data.n_graphs"], cfg["data.test_fraction"], cfg["seed"], cfg["data.max_nodes"]
    )


def process(cfg: dict):
    from ..generative.graphs.train import graph_process

    return graph_process(
        (cfg["model.beta_min"], cfg["model.beta_max"]),
        (cfg["model.sigma_min"], cfg["model.sigma_max"]),
        t0=cfg["model.t0"],
    )


def build(cfg: dict) -> nn.Module:
    from ..generative.graphs.train import build_model

    F = dataset(cfg)[2].x.shape[-1]
    net = build_model(
        F, hidden=cfg["model.hidden"], depth=cfg["model.depth"], powers=cfg["model.powers"],
        layers=cfg["model.layers"], heads=cfg["model.heads"], channels=cfg["model.channels"],
        final_channels=cfg["model.final_channels"],
    )  # fmt: skip
    return _EMAModel(net, cfg["model.ema"])


def batch(cfg: dict, step: int) -> dict:
    from ..generative.multi import symmetric_noise
    from ._models import _cpu_generator

    x, adj, mask = dataset(cfg)[2]
    g = _cpu_generator(cfg["seed"], _NOISE, step)
    b = cfg["train.batch_size"]
    i = torch.randint(0, x.shape[0], (b,), generator=g)
    mp = process(cfg)
    if cfg["model.time_sampling"] == "logsnr":  # uniform in the adjacency's log-SNR
        from ..generative.graphs.train import _adjacency_process
        from ..generative.objectives import training_times

        t = training_times(_adjacency_process(mp), b, time_sampling="logsnr", generator=g)
    else:
        t = mp.t0 + (mp.t1 - mp.t0) * torch.rand(b, generator=g, dtype=torch.float64)
    ex = torch.randn(x[i].shape, generator=g, dtype=torch.float64)
    ea = symmetric_noise(torch.randn(adj[i].shape, generator=g, dtype=torch.float64))
    return {"x": x[i], "adj": adj[i], "mask": mask[i], "t": t, "eps_x": ex, "eps_adj": ea}


def loss(model, b: dict, cfg: dict) -> torch.Tensor:
    from ..generative.multi import multi_dsm_loss

    return multi_dsm_loss(
        model, process(cfg), {"x": b["x"], "adj": b["adj"]}, mask=b["mask"], parameterisation="eps",
        t=b["t"], eps={"x": b["eps_x"], "adj": b["eps_adj"]},
    )  # fmt: skip


def sample(model, cfg: dict, n: int, *, sampler: str, nfe: int, seed: int, chunk_size: int = 256):
    """``(graphs, model evaluations per chunk)``."""
    from ..generative.graphs.train import sample_graphs

    train, _, t = dataset(cfg)
    calls = {"n": 0}

    def counted(tt, state, mask=None):
        calls["n"] += 1
        return model(tt, state, mask)

    graphs = sample_graphs(
        counted, process(cfg), n, [g.number_of_nodes() for g in train], max_nodes=t.x.shape[1],
        features=t.x.shape[-1], sampler=sampler, nfe=nfe, snr=cfg["sample.snr"],
        n_corrector=1 if cfg["sample.snr"] > 0 else 0, seed=seed, chunk_size=chunk_size,
        dtype=next(model.parameters()).dtype, device=next(model.parameters()).device,
    )  # fmt: skip
    chunks = -(-n // chunk_size)
    return graphs, calls["n"] / chunks


def write_graphs(path, graphs) -> Path:
    """Write graphs as graph6 (``.g6``, one line per graph) or node-link JSON (``.json``)."""
    import networkx as nx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".g6":
        with open(path, "wb") as f:
            for g in graphs:
                f.write(nx.to_graph6_bytes(g, header=False))
    elif suffix == ".json":
        data = [{"nodes": g.number_of_nodes(), "edges": [list(e) for e in g.edges()]} for g in graphs]
        path.write_text(json.dumps(data) + "\n")
    else:
        raise ValueError(f"unknown graph output format {suffix!r}; use {', '.join(GRAPH_FORMATS)}")
    return path


def read_graphs(path) -> list:
    """The graphs written by :func:`write_graphs`."""
    import networkx as nx

    path = Path(path)
    if path.suffix.lower() == ".g6":
        out = nx.read_graph6(path)
        return out if isinstance(out, list) else [out]
    out = []
    for d in json.loads(path.read_text()):
        g = nx.Graph()
        g.add_nodes_from(range(d["nodes"]))
        g.add_edges_from(map(tuple, d["edges"]))
        out.append(g)
    return out


def evaluate_graphs(graphs, cfg: dict, *, n: int, seed: int = 0) -> dict:
    """MMD (GDSS's convention) of ``graphs`` against the test split and against ``n`` fresh graphs,
    with the data-vs-data floors (a fresh set of the same size as the reference) and the
    Erdős–Rényi baseline."""
    from ..generative.graphs import erdos_renyi_like, graph_mmd, load
    from ._models import derive_seed

    train, test, _ = dataset(cfg)
    name = cfg["data.name"]
    fresh = lambda k, w: load(name, k, seed=derive_seed(cfg["seed"], _FRESH, w))  # noqa: E731
    ref_big, floor_big = fresh(n, 0), fresh(n, 1)
    floor_test = fresh(len(test), 2)
    er = erdos_renyi_like(train, len(graphs), seed=derive_seed(cfg["seed"], _FRESH, 3))
    out = {"n_test": len(test), "n_fresh": n, "n_generated": len(graphs), "rows": {}}
    for ref_name, ref, floor in (("test", test, floor_test), ("fresh", ref_big, floor_big)):
        out["rows"][ref_name] = {
            "model": graph_mmd(ref, graphs, METRICS),
            "floor": graph_mmd(ref, floor, METRICS),
            "erdos_renyi": graph_mmd(ref, er, METRICS),
        }
    out["reference_graphs"] = ref_big
    return out


def write_graph_report(m: dict, directory) -> tuple[Path, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    js = directory / "metrics.json"
    js.write_text(json.dumps({k: v for k, v in m.items() if k != "reference_graphs"}, indent=2) + "\n")
    lines = [
        f"# Evaluation of `{m['checkpoint']}`",
        "",
        f"gdss model on `{m['data']}` after {m['step']} steps; {m['n']} graphs with `{m['sampler']}` (NFE {m['nfe']}, "
        f"{m['nfe_used']:.1f} evaluations per chunk, {m['sample_seconds']:.2f} s, {m['processes']} process(es)).",
        "",
        "MMD² in GDSS's convention (biased; Gaussian EMD kernels for degree and clustering, Gaussian kernel",
        "on mean orbit counts, Gaussian TV kernel for the spectrum). The floor is a fresh draw of the",
        "generator of the reference's size; Erdős–Rényi has the training graphs' sizes and edge density.",
        "",
        "| reference | metric | model | data-vs-data floor | Erdős–Rényi |",
        "|---|---|---|---|---|",
    ]
    for ref, label in (("test", f"test split ({m['n_test']})"), ("fresh", f"fresh ({m['n_fresh']})")):
        r = m["rows"][ref]
        for k in METRICS:
            lines.append(f"| {label} | {k} | {r['model'][k]:.4f} | {r['floor'][k]:.4f} | {r['erdos_renyi'][k]:.4f} |")
    if m.get("plot"):
        lines += ["", f"![generated vs reference]({Path(m['plot']).name})"]
    md = directory / "metrics.md"
    md.write_text("\n".join(lines) + "\n")
    return js, md


def plot_graphs(path, generated, reference, k: int = 8, title: str = "") -> Path:
    """A PNG: ``k`` generated graphs (top row) above ``k`` reference graphs (spring layout)."""
    from ._deps import require

    require("matplotlib", "plotting the graphs")
    import networkx as nx
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = max(1, min(k, len(generated), len(reference)))
    fig = Figure(figsize=(1.8 * k, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(2, k, squeeze=False))
    for row, (graphs, label, color) in enumerate(
        ((generated, "generated", "tab:blue"), (reference, "reference", "tab:green"))
    ):
        for j in range(k):
            g, ax = graphs[j], axes[row, j]
            pos = nx.spring_layout(g, seed=0)
            nx.draw_networkx(g, pos=pos, ax=ax, node_size=12, node_color=color, with_labels=False, width=0.6)
            ax.set_axis_off()
            ax.set_title(f"{label}: {g.number_of_nodes()} n, {g.number_of_edges()} e", fontsize=7)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def timed_sample(model, cfg, n, sampler, nfe, seed, chunk_size):
    began, cpu = time.perf_counter(), time.thread_time()
    graphs, used = sample(model, cfg, n, sampler=sampler, nfe=nfe, seed=seed, chunk_size=chunk_size)
    return graphs, used, time.perf_counter() - began, time.thread_time() - cpu


def run_sample(args, ck: dict, cfg: dict, spec, model, rt) -> int:
    """``torchnde sample`` for a ``gdss`` checkpoint: graphs to ``.g6`` / ``.json``."""
    from ._errors import prepare_output_file
    from .sample import resolve_sampler

    sampler, nfe = resolve_sampler(spec, args.sampler, args.nfe)
    n = args.n if args.n is not None else 200
    out = Path(args.out) if args.out else Path(ck["path"]).parent / f"graphs-{sampler}-nfe{nfe}.g6"
    prepare_output_file(out, GRAPH_FORMATS)
    graphs, used, seconds, cpu = timed_sample(model, cfg, n, sampler, nfe, args.seed, args.chunk_size)
    if rt.is_main:
        write_graphs(out, graphs)
        info = {
            "file": str(out),
            "n": n,
            "model": spec.name,
            "step": int(ck["step"]),
            "sampler": sampler,
            "nfe": nfe,
            "nfe_used": used,
            "seconds": round(seconds, 3),
            "thread_cpu_seconds": round(cpu, 3),
            "mean_edges": float(np.mean([g.number_of_edges() for g in graphs])),
        }
        print(json.dumps(info))
    rt.barrier()
    return 0


def run_evaluate(args, ck: dict, cfg: dict, spec, model, rt, out_dir: Path) -> int:
    """``torchnde evaluate`` for a ``gdss`` checkpoint: the MMD table with floors and a plot."""
    from .sample import resolve_sampler

    sampler, nfe = resolve_sampler(spec, args.sampler, args.nfe)
    n = args.n if args.n is not None else 200
    if n < 2:
        from ._errors import UsageError

        raise UsageError(f"-n {n}: an MMD between graph sets needs at least 2 generated graphs (200 or more)")
    graphs, used, seconds, cpu = timed_sample(model, cfg, n, sampler, nfe, args.seed, args.chunk_size)
    if not rt.is_main:
        return 0
    m = evaluate_graphs(graphs, cfg, n=n, seed=args.seed)
    ref = m.pop("reference_graphs")
    m.update(
        checkpoint=ck["path"], model=spec.name, data=cfg["data.name"], step=int(ck["step"]), n=n, sampler=sampler,
        nfe=nfe, nfe_used=used, sample_seconds=round(seconds, 3), sample_thread_cpu_seconds=round(cpu, 3),
        processes=rt.world_size,
    )  # fmt: skip
    if not getattr(args, "no_plot", False):
        try:
            m["plot"] = str(plot_graphs(out_dir / "graphs.png", graphs, ref, title=f"{cfg['data.name']}: {sampler}"))
        except Exception as e:  # a missing matplotlib must not lose the metrics
            m["plot_error"] = str(e).splitlines()[0]
    js, md = write_graph_report(m, out_dir)
    print(md.read_text(), end="")
    print(f"wrote {js} and {md}" + (f" and {m['plot']}" if m.get("plot") else ""))
    return 0
