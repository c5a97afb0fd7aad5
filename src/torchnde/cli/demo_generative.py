"""``torchnde demo``: a score model and a flow-matching model on a 2-D data set, every sampler at
several NFE budgets, exact W2, precision/recall and likelihoods against the data's own, a
Schrödinger-bridge panel, a PNG grid and a Markdown report.

The demo strings together what the library provides, with no integration loop of its own:

1. **Training** with :func:`torchnde.cli.train.train` (the loop of ``torchnde train``): a VP-SDE
   score model (Song et al. 2021, "Score-based generative modeling through stochastic differential
   equations"; an ε-predicting MLP trained by denoising score matching, Ho et al. 2020, on times
   uniform in log-SNR) and a conditional flow-matching model (Lipman et al. 2023, "Flow matching
   for generative modeling"), each with a tqdm progress bar. The recipe (MLP 3×256, learning rate
   1e-2 cosine-decayed, 3000 steps) is what makes the samples crisp: with 3×128 at 2e-3 a band of
   samples filled the gap between the moons that W2 did not see. With ``workers > 1`` the flow
   (and the bridge) train in a second Python process while the VP model trains in this one. The
   checkpoints are kept in ``OUT/vp`` and ``OUT/flow_matching``, so ``torchnde sample OUT/vp``
   and ``torchnde evaluate OUT/vp`` work afterwards.
2. **Sampling**: the score model with every sampler of :func:`torchnde.generative.samplers.sample`
   named in :attr:`GenerativeDemoConfig.vp_samplers` (reverse-SDE Euler–Maruyama,
   predictor–corrector, probability-flow Euler/Heun, DPM-Solver 3M and DPM-Solver++ 2M/3M (Lu et
   al. 2022), EDM Heun (Karras et al. 2022, on their ρ-grid: :func:`edm_times`), and the adaptive
   probability-flow and reverse-SDE samplers), the flow-matching model with Euler, Heun and an
   adaptive solver, each fixed-step sampler at every NFE budget and each adaptive one at every
   tolerance.
3. **Metrics**: the exact W2 distance (optimal assignment,
   :func:`torchnde.generative.metrics.wasserstein2`) between the samples and as many fresh data
   points, next to the W2 between two fresh data sets (what a perfect model would score); the
   precision and recall at radius :attr:`GenerativeDemoConfig.radius`
   (:func:`torchnde.generative.metrics.precision_recall`), which see samples off the data that W2
   averages away; the NLL of fresh data through each model's ODE with the exact trace and
   per-sample adaptive steps (:func:`torchnde.generative.likelihood.log_prob`; for the score model
   its probability-flow ODE), next to the data's own NLL from its exact density
   (:func:`torchnde.generative.metrics.toy_log_prob`) on the same points.
4. **Bridge panel** (:func:`train_bridge`): a Schrödinger bridge from ``bridge_source``
   (``8gaussians``) to the data through :mod:`torchnde.generative.bridges`.
5. **Output** in ``OUT``: ``generative.png`` (the data, the two learned densities, the bridge,
   and a grid of samples per sampler and budget), ``report.md`` (the tables sampler × NFE × W2 ×
   precision × recall × time, NLL, bridge) and ``results.json`` (the same numbers).

Everything is a deterministic function of the seed (up to the timings).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ._deps import require
from ._errors import prepare_output_dir

__all__ = [
    "GenerativeDemoConfig",
    "GenerativeDemoResult",
    "Row",
    "run_generative_demo",
    "plot_grid",
    "write_report",
    "report_markdown",
    "DEFAULT_VP_SAMPLERS",
    "FM_SAMPLERS",
    "edm_times",
]

#: the score-model samplers the demo runs (names of :func:`torchnde.generative.samplers.sample`)
DEFAULT_VP_SAMPLERS = (
    "euler_maruyama",
    "pc",
    "pf_euler",
    "pf_heun",
    "dpm_3m",
    "dpmpp_2m",
    "dpmpp_3m",
    "edm_heun",
    "pf_adaptive",
    "sde_adaptive",
)
#: the flow-matching samplers (those of ``torchnde sample`` for a flow-matching model)
FM_SAMPLERS = ("euler", "heun", "adaptive")
_ADAPTIVE = ("pf_adaptive", "sde_adaptive", "adaptive")
_TIME_SAMPLING = {"uniform": "uniform in t", "logsnr": "uniform in log-SNR, which weights low noise more"}
#: data sets whose exact log-density is known (:func:`torchnde.generative.metrics.toy_log_prob`)
_EXACT_DENSITY = ("moons", "8gaussians")

_LABELS = {
    "euler_maruyama": "Euler–Maruyama (reverse SDE)",
    "pc": "predictor–corrector (EM + Langevin)",
    "pf_euler": "probability flow, Euler",
    "pf_heun": "probability flow, Heun",
    "dpm_3m": "DPM-Solver 3M",
    "dpmpp_2m": "DPM-Solver++ 2M",
    "dpmpp_3m": "DPM-Solver++ 3M",
    "edm_heun": "EDM Heun",
    "pf_adaptive": "probability flow, Tsit5 adaptive",
    "sde_adaptive": "reverse SDE, SPaRK adaptive",
    "euler": "Euler",
    "heun": "Heun",
    "adaptive": "Tsit5 adaptive",
}


@dataclass
class GenerativeDemoConfig:
    """Everything that defines a run of the generative demo. :meth:`quick` gives a seconds-long
    smoke-test version."""

    data: str = "moons"
    seed: int = 0
    vp_steps: int = 3000
    fm_steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-2
    hidden: int = 256
    depth: int = 3
    vp_time_sampling: str = "logsnr"  # the VP model's training times (model.time_sampling)
    dtype: str = "float32"
    device: str = "cpu"
    n_samples: int = 2000  # per sampler and budget, compared with as many fresh data points
    nll_n: int = 300  # fresh data points for the NLL
    nll_tol: float = 1e-5  # rtol = atol of the likelihood solves
    vp_samplers: tuple = DEFAULT_VP_SAMPLERS
    fm_samplers: tuple = FM_SAMPLERS
    vp_nfes: tuple = (5, 10, 20, 50, 200)
    fm_nfes: tuple = (2, 5, 10, 20, 50)
    tolerances: tuple = (1e-1, 1e-2, 1e-3)  # rtol = atol of the adaptive samplers
    density_grid: int = 40  # points per side of the density plots (0: no density plots)
    density_tol: float = 1e-4
    threads: int | None = 1  # torch CPU threads during the demo (restored after; None: leave them)
    # the bridge panel: a Schrödinger bridge from bridge_source to data (None: no panel; moons
    # instead when it is the data set itself)
    bridge_source: str | None = "8gaussians"
    bridge_sigma: float = 0.3  # the reference sigma W; the coupling is entropic OT at 2 sigma^2
    bridge_steps: int = 2000
    bridge_pairs: int = 2048  # size of the entropic-OT coupling the bridge is trained on
    bridge_nfe: int = 50  # Euler-Maruyama steps of the bridge SDE
    workers: int = 2  # cores used at once: two models trained in two processes, W2 in worker threads (1: none)
    radius: float = 0.1  # of the precision/recall pair (in standard deviations of the data)

    @classmethod
    def quick(cls, **kw) -> GenerativeDemoConfig:
        """A few seconds: 200 training steps of a 3×128 MLP, 300 samples, two budgets, one
        tolerance, a 200-step bridge; one process."""
        base = cls(
            vp_steps=200,
            fm_steps=200,
            n_samples=300,
            nll_n=50,
            nll_tol=1e-4,
            vp_nfes=(5, 20),
            fm_nfes=(2, 10),
            tolerances=(1e-2,),
            density_grid=12,
            density_tol=1e-3,
            hidden=128,
            workers=1,
            bridge_steps=200,
            bridge_pairs=256,
            bridge_nfe=10,
        )
        return replace(base, **kw)

    def train_config(self, model_type: str) -> dict:
        """The resolved ``torchnde train`` configuration of one of the two models."""
        from ._config import defaults

        cfg = defaults()
        cfg.update(
            {
                "seed": self.seed,
                "dtype": self.dtype,
                "device": self.device,
                "data.name": self.data,
                "model.type": model_type,
                "model.hidden": self.hidden,
                "model.depth": self.depth,
                "train.steps": self.vp_steps if model_type == "vp" else self.fm_steps,
                "train.batch_size": self.batch_size,
                "train.lr": self.lr,
            }
        )
        if model_type == "vp":
            cfg["model.time_sampling"] = self.vp_time_sampling
        cfg["train.checkpoint_every"] = cfg["train.steps"]
        cfg["train.log_every"] = max(1, min(100, cfg["train.steps"] // 10))
        from ._config import check

        return check(cfg, where="in the demo's configuration")


@dataclass
class Row:
    """One sampling run: a line of the report's table and a panel of the grid."""

    model: str  # "vp" or "flow_matching"
    sampler: str
    budget: float  # the NFE budget, or the tolerance of an adaptive sampler
    adaptive: bool
    nfe: float  # model evaluations actually made (per sample batch)
    w2: float
    seconds: float
    precision: float = float("nan")  # fraction of samples within cfg.radius of a data point
    recall: float = float("nan")  # fraction of data points within cfg.radius of a sample


@dataclass
class GenerativeDemoResult:
    config: GenerativeDemoConfig
    rows: list[Row]
    w2_floor: float
    nll: dict  # model -> {"nats", "stderr", "bits_per_dim", "seconds", "gap", "gap_stderr"}
    nll_standard_normal: float
    train: dict  # model -> {"steps", "loss", "seconds"}
    wall_time: float
    samples: dict = field(default_factory=dict)  # (model, sampler, budget) -> (n, 2) tensor
    densities: dict = field(default_factory=dict)  # model -> (grid, grid) log-density
    extent: tuple = (-3.0, 3.0, -3.0, 3.0)
    data: torch.Tensor | None = None
    pr_floor: tuple = (float("nan"), float("nan"))  # precision, recall of fresh data against data
    nll_data: dict | None = None  # the data's own NLL on the same points (exact density), if known
    bridge: dict | None = None  # the bridge panel's numbers (see train_bridge)
    bridge_paths: torch.Tensor | None = None  # (nfe + 1, n, 2): the bridge's sample paths
    png: Path | None = None
    report: Path | None = None
    json: Path | None = None


# ---------------------------------------------------------------------------------------------
# the steps


def _train_one(cfg: GenerativeDemoConfig, model_type: str, out: Path | None, progress: bool, log):
    """Train one model with the loop of ``torchnde train`` (checkpoint in ``out/model_type``)."""
    import tempfile

    from .train import CHECKPOINT, TrainingInterrupted, train

    tcfg = cfg.train_config(model_type)
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp) if out is None else out / model_type
        stale = where / CHECKPOINT
        if stale.exists():  # the previous demo's: a rerun starts afresh
            stale.unlink()
        try:
            res = train(tcfg, where, progress=progress, log=log, threads=None)
        except TrainingInterrupted:  # its message says how to resume `torchnde train`, not the demo
            raise KeyboardInterrupt from None
    model = res.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tcfg, model, res


def _train_info(res, out) -> dict:
    return {
        "steps": res.step,
        "loss": res.log[-1][1] if res.log else float("nan"),
        "seconds": res.wall_time,
        "checkpoint": str(res.checkpoint) if out is not None else None,
    }


def _train_in_worker(path: str) -> None:
    """The second process of :func:`_train_both`: read ``(cfg, jobs, out)`` from the pickle
    ``path``, train those models (``"flow_matching"``, ``"bridge"``) and write their
    configurations, weights, training records and log lines to ``path + ".out"``. A fresh
    interpreter started with ``python -c`` (not multiprocessing, which would re-run the caller's
    ``__main__`` script)."""
    import pickle

    with open(path, "rb") as f:
        cfg, jobs, out = pickle.load(f)
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    results = {}
    for job in jobs:
        lines = []
        if job == "bridge":
            model, info = train_bridge(cfg, torch.device("cpu"))
            results[job] = (None, model.state_dict(), info, lines)
        else:
            tcfg, model, res = _train_one(cfg, job, out, False, lines.append)
            results[job] = (tcfg, model.state_dict(), _train_info(res, out), lines)
    with open(path + ".out", "wb") as f:
        pickle.dump(results, f)


def _bridge_network(cfg: GenerativeDemoConfig, device) -> torch.nn.Module:
    from ..generative.flow_matching import MLP
    from ._models import derive_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, 20))
        net = MLP(2, hidden=cfg.hidden, depth=cfg.depth, time_features=8)
    return net.to(dtype=getattr(torch, cfg.dtype), device=device)


def train_bridge(cfg: GenerativeDemoConfig, device) -> tuple[torch.nn.Module, dict]:
    """The bridge panel's model: a Schrödinger bridge from ``cfg.bridge_source`` to ``cfg.data``
    for the reference ``sigma W`` (``sigma = cfg.bridge_sigma``), as SB-CFM in its SDE form (Tong et
    al. 2024): ``cfg.bridge_pairs`` source and target points coupled by entropic optimal transport
    at regularisation ``2 sigma^2`` (the bridge's own endpoint coupling; log-domain Sinkhorn,
    :func:`torchnde.generative.bridges.sinkhorn_coupling`), then the drift of the Markovian
    projection learned by bridge matching (:func:`~torchnde.generative.bridges.bridge_matching_loss`)
    with the demo's MLP, learning rate and batch. Returns ``(model, info)``."""
    from ..generative import data as gdata
    from ..generative.bridges import bridge_matching_loss, sinkhorn_coupling
    from ..generative.flow_matching import fit
    from ._models import derive_seed

    began = time.perf_counter()
    model = _bridge_network(cfg, device)
    p = next(model.parameters())
    x0 = gdata.sample(cfg.bridge_source, cfg.bridge_pairs, seed=derive_seed(cfg.seed, 21), dtype=torch.float64)
    x1 = gdata.sample(cfg.data, cfg.bridge_pairs, seed=derive_seed(cfg.seed, 22), dtype=torch.float64)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 23))
    x0, x1 = sinkhorn_coupling(x0, x1, 2 * cfg.bridge_sigma**2, generator=gen)
    losses = fit(
        model,
        (x0.to(dtype=p.dtype, device=p.device), x1.to(dtype=p.dtype, device=p.device)),
        loss=bridge_matching_loss,
        steps=cfg.bridge_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=derive_seed(cfg.seed, 24),
        bridge=cfg.bridge_sigma,
    )
    model.eval().requires_grad_(False)
    last = losses[-min(50, len(losses)) :]
    return model, {"steps": cfg.bridge_steps, "loss": sum(last) / len(last), "seconds": time.perf_counter() - began}


def _train_both(cfg: GenerativeDemoConfig, out: Path | None, progress: bool, log, trained: dict) -> dict:
    """Train the VP and the flow-matching model (and the bridge of the bridge panel): one after
    the other, or (``cfg.workers > 1`` on a CPU) the flow and the bridge in a second process while
    the VP model trains here. Each model is a function of the seed alone (one torch thread in both
    processes), so the two ways give the same weights."""
    bridge = cfg.bridge_source is not None
    if cfg.workers < 2 or not str(cfg.device).startswith("cpu"):
        fitted = {}
        for mt in ("vp", "flow_matching"):
            tcfg, model, res = _train_one(cfg, mt, out, progress, log)
            fitted[mt] = (tcfg, model)
            trained[mt] = _train_info(res, out)
        if bridge:
            log(f"training the bridge {cfg.bridge_source} -> {cfg.data}: {cfg.bridge_steps} steps")
            model, info = train_bridge(cfg, next(fitted["vp"][1].parameters()).device)
            fitted["bridge"] = (None, model)
            trained["bridge"] = info
        return fitted
    import pickle
    import subprocess
    import tempfile

    from ._models import MODELS

    jobs = ("flow_matching", "bridge") if bridge else ("flow_matching",)
    log(f"training {' and '.join(jobs)} in a second process while the VP-SDE model trains here")
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "job.pkl")
        with open(path, "wb") as f:
            pickle.dump((cfg, jobs, out), f)
        code = "import sys; from torchnde.cli.demo_generative import _train_in_worker; _train_in_worker(sys.argv[1])"
        # the child imports this torchnde even when it is not installed (a source checkout on sys.path)
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
        proc = subprocess.Popen([sys.executable, "-c", code, path], env=env)
        try:
            tcfg, model, res = _train_one(cfg, "vp", out, progress, log)
            status = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: stop the worker too
                proc.kill()
                proc.wait()
        if status != 0:
            raise RuntimeError(f"the demo's second training process ({', '.join(jobs)}) failed (exit status {status})")
        with open(path + ".out", "rb") as f:
            results = pickle.load(f)
    fitted = {"vp": (tcfg, model)}
    trained["vp"] = _train_info(res, out)
    for job in jobs:
        jcfg, state, info, lines = results[job]
        for line in lines:
            log(line)
        if job == "bridge":
            net = _bridge_network(cfg, torch.device("cpu"))
        else:
            net = MODELS[job].build(jcfg).to(dtype=getattr(torch, jcfg["dtype"]))
        net.load_state_dict(state)
        net.eval().requires_grad_(False)
        fitted[job] = (jcfg, net)
        trained[job] = info
    return fitted


_EDM_NOTE = (
    "`edm_heun` is Karras et al.'s (2022) Algorithm 1 as they ran it on VP models: Heun's method on the "
    "probability-flow ODE on their ρ = 7 grid of noise levels σ = σ(t)/α(t), mapped back to VP times "
    "(`edm_times`), which puts most steps at low noise; `pf_heun` is the same Heun method on the VP "
    "process's default grid, uniform in t. On one grid the two are the same computation (the ODE in x is "
    "the same, and on a VP process EDM Heun takes no final Euler step), so only the grid tells them apart. "
    "(`torchnde sample --sampler edm_heun` on a VP checkpoint uses the uniform grid, and then matches "
    "`pf_heun`.)"
)


def edm_times(process, n: int, rho: float = 7.0) -> torch.Tensor:
    """``n + 1`` decreasing times of ``process`` whose noise-to-signal ratios
    ``sigma(t) / alpha(t)`` follow Karras et al.'s (2022) ``rho``-schedule from ``t1`` to ``t0``
    (Eq. (5)), found by bisection on the (monotone) log-SNR. ``process.times(n)`` for an ``EDM``."""
    from ..generative.fast_samplers import logsnr

    t0, t1 = float(process.t0), float(process.t1)
    s_min, s_max = math.exp(-logsnr(process, t0)), math.exp(-logsnr(process, t1))
    lo, hi = s_min ** (1 / rho), s_max ** (1 / rho)
    ts = [t1]
    for i in range(1, n):
        target = -math.log((hi + i / n * (lo - hi)) ** rho)  # the log-SNR of step i (increasing in i)
        a, b = t0, t1
        for _ in range(60):  # lambda decreases in t
            mid = 0.5 * (a + b)
            a, b = (mid, b) if logsnr(process, mid) > target else (a, mid)
        ts.append(0.5 * (a + b))
    ts.append(t0)
    return torch.tensor(ts, dtype=torch.float64)


def _sample_one(model_type, model, tcfg, sampler, budget, n, seed):
    """``(samples, evaluations)`` of one sampler at one NFE budget (or tolerance)."""
    from ._models import DIM, MODELS, _process

    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    adaptive = sampler in _ADAPTIVE
    nfe = None if adaptive else int(budget)
    tol = float(budget) if adaptive else 1e-5
    with torch.no_grad():
        if model_type == "vp":
            from ..generative.fast_samplers import edm_heun_steps
            from ..generative.samplers import sample

            process = _process(tcfg)
            kw = dict(nfe=nfe)
            if sampler == "edm_heun":  # Karras et al.'s grid: see _EDM_NOTE
                kw = dict(times=edm_times(process, max(edm_heun_steps(process, nfe), 1)))
            out = sample(
                model, process, (n, DIM), sampler=sampler, parameterisation="eps",
                seed=seed, dtype=dtype, device=device, rtol=tol, atol=tol, **kw,
            )  # fmt: skip
            return out.x, float(out.nfe)
        x, calls = MODELS[model_type].sample(
            model, tcfg, n, sampler=sampler, nfe=nfe, seed=seed, dtype=dtype, device=device, rtol=tol, atol=tol
        )
        return x, float(calls)


def _extent(data: torch.Tensor, pad: float = 0.5) -> tuple:
    lo = data.min(0).values - pad
    hi = data.max(0).values + pad
    return (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))


def _density(model_type, model, tcfg, extent, n, tol):
    """Log-density of the model on an ``n × n`` grid over ``extent`` (row ``i``: the ``i``-th y)."""
    from ._models import MODELS

    p = next(model.parameters())
    xs = torch.linspace(extent[0], extent[1], n, dtype=p.dtype, device=p.device)
    ys = torch.linspace(extent[2], extent[3], n, dtype=p.dtype, device=p.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    lp = MODELS[model_type].log_prob(model, tcfg, pts, rtol=tol, atol=tol)
    return lp.reshape(n, n).to(torch.float64).cpu()


def run_generative_demo(
    cfg: GenerativeDemoConfig | None = None,
    out: str | os.PathLike | None = "out",
    *,
    progress: bool = True,
    log=print,
) -> GenerativeDemoResult:
    """Train both models, sample with every sampler and budget, compute W2 and the NLL, and (if
    ``out``) write ``generative.png``, ``report.md`` and ``results.json`` into ``out``.

    Deterministic given ``cfg.seed`` (but for the timings); the global RNG state is restored.
    """
    from ..generative.data import TOY_DENSITIES
    from ..generative.samplers import ALL_SAMPLERS
    from ._models import MODELS

    cfg = cfg or GenerativeDemoConfig()
    if cfg.data not in TOY_DENSITIES:
        raise ValueError(f"unknown data set {cfg.data!r}; valid: {', '.join(TOY_DENSITIES)}")
    if cfg.bridge_source is not None:
        if cfg.bridge_source not in TOY_DENSITIES:
            raise ValueError(f"unknown bridge source {cfg.bridge_source!r}; valid: {', '.join(TOY_DENSITIES)}")
        if cfg.bridge_source == cfg.data:  # a bridge from a data set to itself shows nothing
            cfg = replace(cfg, bridge_source="moons" if cfg.data != "moons" else "8gaussians")
    for s in cfg.vp_samplers:
        if s not in ALL_SAMPLERS:
            raise ValueError(f"unknown score-model sampler {s!r}; valid: {', '.join(ALL_SAMPLERS)}")
    for s in cfg.fm_samplers:
        if s not in MODELS["flow_matching"].samplers:
            raise ValueError(f"unknown flow sampler {s!r}; valid: {', '.join(MODELS['flow_matching'].samplers)}")
    if min((*cfg.vp_nfes, *cfg.fm_nfes)) < 1:
        raise ValueError("every NFE budget must be >= 1")
    # fail before training, not after
    require("scipy.optimize", "torchnde demo's exact W2 distance (an assignment problem)")
    if out is not None:
        prepare_output_dir(out)
        require("matplotlib", "torchnde demo (to plot the results)")
    tqdm = require("tqdm", "torchnde demo's progress bars (or pass --no-progress)").tqdm if progress else None
    out = None if out is None else Path(out)
    began = time.perf_counter()
    old_threads = torch.get_num_threads()
    if cfg.threads is not None:
        # the tensors are tiny: extra threads only add synchronisation, ruinous on a busy machine
        torch.set_num_threads(int(cfg.threads))
    try:
        return _run(cfg, out, tqdm, log, began)
    finally:
        torch.set_num_threads(old_threads)


def _run(cfg: GenerativeDemoConfig, out: Path | None, tqdm, log, began: float) -> GenerativeDemoResult:
    from ..generative import metrics
    from ..generative.likelihood import standard_normal_log_prob
    from ._models import MODELS, derive_seed, eval_data

    models = ("vp", "flow_matching")
    rows: list[Row] = []
    samples, densities, nll, trained = {}, {}, {}, {}
    bridge, bridge_paths, bridge_fut = None, None, None
    with torch.random.fork_rng(devices=[]):
        # 1. training
        fitted = _train_both(cfg, out, tqdm is not None, log, trained)
        # 2. sampling, 3. W2
        tcfg0 = fitted["vp"][0]
        data = eval_data(tcfg0, cfg.n_samples, 0)
        data2 = eval_data(tcfg0, cfg.n_samples, 1)
        w2_floor = metrics.wasserstein2(data2, data)
        pr_floor = metrics.precision_recall(data2, data, radius=cfg.radius)
        plan = []
        for mt, names, nfes in (("vp", cfg.vp_samplers, cfg.vp_nfes), ("flow_matching", cfg.fm_samplers, cfg.fm_nfes)):
            for s in names:
                for b in cfg.tolerances if s in _ADAPTIVE else nfes:
                    plan.append((mt, s, b))
        seed = derive_seed(cfg.seed, 7)  # one seed for every run: common random numbers
        log(
            f"sampling: {len(plan)} runs of {cfg.n_samples} samples; exact W2 against {cfg.n_samples} fresh "
            f"data points (two fresh data sets are {w2_floor:.4f} apart), precision/recall at radius "
            f"{cfg.radius:g} (two fresh data sets: {pr_floor[0]:.3f} / {pr_floor[1]:.3f})"
        )
        bar = tqdm(total=len(plan), desc="sample", unit="run", dynamic_ncols=True, file=sys.stderr) if tqdm else None
        # the exact W2 (an assignment problem, ~1 s each; scipy releases the GIL) runs in worker
        # threads while the next runs sample and the likelihoods are computed: the demo then keeps
        # cfg.workers cores busy
        pool = ThreadPoolExecutor(max_workers=cfg.workers) if cfg.workers > 1 else None
        pending = []
        try:
            try:
                for mt, s, b in plan:
                    tcfg, model = fitted[mt]
                    t = time.perf_counter()
                    x, used = _sample_one(mt, model, tcfg, s, b, cfg.n_samples, seed)
                    secs = time.perf_counter() - t
                    x = x.detach().to(torch.float64).cpu()
                    finite = bool(torch.isfinite(x).all())
                    p, r = metrics.precision_recall(x, data, radius=cfg.radius) if finite else (0.0, 0.0)
                    row = Row(mt, s, float(b), s in _ADAPTIVE, used, float("inf"), secs, p, r)
                    rows.append(row)
                    samples[(mt, s, b)] = x
                    if finite and pool is not None:
                        pending.append((row, pool.submit(metrics.wasserstein2, x, data)))
                    elif finite:
                        row.w2 = metrics.wasserstein2(x, data)
                    if bar is not None:
                        bar.set_postfix_str(f"{s} {b:g}: precision {p:.3f}", refresh=False)
                        bar.update(1)
                if "bridge" in fitted:  # the bridge panel: its samples join the W2 queue
                    t = time.perf_counter()
                    paths = _sample_bridge(cfg, fitted["bridge"][1], seed)
                    x = paths[-1]
                    p, r = metrics.precision_recall(x, data, radius=cfg.radius)
                    bridge = {
                        "source": cfg.bridge_source,
                        "sigma": cfg.bridge_sigma,
                        "nfe": cfg.bridge_nfe,
                        "precision": p,
                        "recall": r,
                        "seconds": time.perf_counter() - t,
                        **{f"train_{k}": v for k, v in trained["bridge"].items()},
                    }
                    if pool is not None:
                        bridge_fut = pool.submit(metrics.wasserstein2, x, data)
                    else:
                        bridge["w2"] = metrics.wasserstein2(x, data)
                    bridge_paths = paths
            finally:
                if bar is not None:
                    bar.close()
            # 4. likelihoods
            xs = eval_data(tcfg0, cfg.nll_n, 2)
            nll_std = -float(standard_normal_log_prob(xs).mean())
            lp_data = metrics.toy_log_prob(cfg.data, xs) if cfg.data in _EXACT_DENSITY and cfg.nll_n > 0 else None
            nll_data = None
            if lp_data is not None:
                nll_data = {"nats": -float(lp_data.mean()), "stderr": _stderr(lp_data)}
            extent = _extent(data)
            steps = [("nll", mt) for mt in models] if cfg.nll_n > 0 else []
            steps += [("density", mt) for mt in models] if cfg.density_grid > 0 else []
            log(
                f"likelihood: NLL of {cfg.nll_n} fresh points through each model's ODE (exact trace, per-sample "
                f"adaptive steps, tol {cfg.nll_tol:g})"
                + (f"; densities on a {cfg.density_grid}x{cfg.density_grid} grid" if cfg.density_grid > 0 else "")
            )
            bar = (
                tqdm(total=len(steps), desc="likelihood", unit="solve", dynamic_ncols=True, file=sys.stderr)
                if tqdm
                else None
            )
            try:
                for what, mt in steps:
                    tcfg, model = fitted[mt]
                    t = time.perf_counter()
                    if what == "nll":
                        p = next(model.parameters())
                        lp = MODELS[mt].log_prob(
                            model, tcfg, xs.to(dtype=p.dtype, device=p.device), rtol=cfg.nll_tol, atol=cfg.nll_tol
                        )
                        lp = lp.detach().to(torch.float64).cpu()
                        nats = -float(lp.mean())
                        nll[mt] = {
                            "nats": nats,
                            "stderr": _stderr(lp),
                            "bits_per_dim": nats / (xs.shape[1] * math.log(2.0)),
                            "seconds": time.perf_counter() - t,
                        }
                        if lp_data is not None:  # paired on the same points: an estimate of KL(data || model)
                            nll[mt]["gap"] = float((lp_data - lp).mean())
                            nll[mt]["gap_stderr"] = _stderr(lp_data - lp)
                    else:
                        densities[mt] = _density(mt, model, tcfg, extent, cfg.density_grid, cfg.density_tol)
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
            for row, fut in pending:  # the W2 queue
                row.w2 = fut.result()
            if bridge_fut is not None:
                bridge["w2"] = bridge_fut.result()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    result = GenerativeDemoResult(
        config=cfg,
        rows=rows,
        w2_floor=w2_floor,
        nll=nll,
        nll_standard_normal=nll_std,
        train=trained,
        wall_time=0.0,
        samples=samples,
        densities=densities,
        extent=extent,
        data=data,
        pr_floor=pr_floor,
        nll_data=nll_data,
        bridge=bridge,
        bridge_paths=bridge_paths,
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        result.png = plot_grid(result, out / "generative.png")
    result.wall_time = time.perf_counter() - began
    if out is not None:
        result.report = write_report(result, out / "report.md")
        result.json = out / "results.json"
        result.json.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    return result


def _sample_bridge(cfg: GenerativeDemoConfig, model, seed: int) -> torch.Tensor:
    """The bridge's sample paths from ``cfg.n_samples`` fresh source points: Euler–Maruyama on
    ``dX = model(t, X) dt + sigma dW`` through :func:`torchnde.generative.bridges.sample_bridge`,
    saved at every step; a float64 CPU tensor ``(bridge_nfe + 1, n, 2)`` (the last: the samples)."""
    from .._saveat import SaveAt
    from ..generative import data as gdata
    from ..generative.bridges import sample_bridge
    from ._models import derive_seed

    p = next(model.parameters())
    x0 = gdata.sample(cfg.bridge_source, cfg.n_samples, seed=derive_seed(cfg.seed, 25), dtype=p.dtype, device=p.device)
    ts = torch.linspace(0.0, 1.0, cfg.bridge_nfe + 1, dtype=torch.float64)
    with torch.no_grad():
        sol = sample_bridge(
            model, x0, bridge=cfg.bridge_sigma, nfe=cfg.bridge_nfe, seed=seed, saveat=SaveAt(t0=True, ts=ts[1:])
        )
    return sol.ys.detach().to(torch.float64).cpu()


def _stderr(v: torch.Tensor) -> float:
    return float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")


# ---------------------------------------------------------------------------------------------
# output


def _budget(row: Row) -> str:
    return f"rtol {row.budget:g}" if row.adaptive else f"{int(row.budget)}"


def _model_name(mt: str) -> str:
    return {"vp": "VP-SDE score model", "flow_matching": "flow matching", "bridge": "Schrödinger bridge"}[mt]


def plot_grid(res: GenerativeDemoResult, path: str | os.PathLike) -> Path:
    """The PNG: the data and the learned densities in the first row, then one row per sampler and
    one column per NFE budget (or tolerance), each panel titled with its W2."""
    require("matplotlib", "plotting the demo")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = []
    for r in res.rows:
        if (r.model, r.sampler) not in order:
            order.append((r.model, r.sampler))
    by = {(r.model, r.sampler): [q for q in res.rows if (q.model, q.sampler) == (r.model, r.sampler)] for r in res.rows}
    ncols = max(5 if res.bridge is not None else 3, max(len(v) for v in by.values()))
    nrows = 1 + len(order)
    size = 1.9
    fig = Figure(figsize=(ncols * size + 1.6, nrows * size + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    x0, x1, y0, y1 = res.extent
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_aspect("equal")
    dot = dict(s=0.8, alpha=0.5, linewidths=0, rasterized=True)
    d = res.data.numpy()
    axes[0, 0].scatter(d[:, 0], d[:, 1], color="tab:green", **dot)
    axes[0, 0].set_title(
        f"data ({res.config.data}), W2 floor {res.w2_floor:.3f}\nprecision floor {res.pr_floor[0]:.3f}", fontsize=7
    )
    for k, mt in enumerate(("vp", "flow_matching"), start=1):
        ax = axes[0, k]
        if mt in res.densities:
            ax.imshow(res.densities[mt].exp().numpy(), origin="lower", extent=res.extent, cmap="magma", aspect="equal")
            nl = f"\nNLL {res.nll[mt]['nats']:.3f}" if mt in res.nll else ""
            if nl and res.nll_data is not None:
                nl += f" (data's own {res.nll_data['nats']:.3f})"
            ax.set_title(f"density: {_model_name(mt)}{nl}", fontsize=7)
        else:
            ax.set_axis_off()
    first_free = 3
    if res.bridge is not None and res.bridge_paths is not None:
        _plot_bridge(axes[0, 3], axes[0, 4], res, dot)
        first_free = 5
    for ax in axes[0, first_free:]:
        ax.set_axis_off()
    for i, key in enumerate(order, start=1):
        mt, s = key
        runs = by[key]
        axes[i, 0].set_ylabel(f"{'VP' if mt == 'vp' else 'FM'}: {s}", fontsize=7)
        for j in range(ncols):
            ax = axes[i, j]
            if j >= len(runs):
                ax.set_axis_off()
                continue
            r = runs[j]
            x = res.samples[(r.model, r.sampler, r.budget if r.adaptive else int(r.budget))].numpy()
            ax.scatter(x[:, 0], x[:, 1], color="tab:blue" if mt == "vp" else "tab:orange", **dot)
            head = _budget(r) if r.adaptive else f"NFE {_budget(r)}"
            used = f" ({r.nfe:.0f})" if r.adaptive else ""
            ax.set_title(f"{head}{used}: W2 {r.w2:.3f}\nprecision {r.precision:.3f}", fontsize=7)
    fig.suptitle(
        f"torchnde demo: VP-SDE score model (blue) and flow matching (orange) on {res.config.data}; "
        f"W2 against fresh data, precision: fraction of samples within {res.config.radius:g} of the data",
        fontsize=9,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _plot_bridge(ax_paths, ax_end, res: GenerativeDemoResult, dot: dict) -> None:
    """The bridge panel: source points and some sample paths; the samples at the far end."""
    b, paths = res.bridge, res.bridge_paths.numpy()
    src, end = paths[0], paths[-1]
    ax_paths.scatter(src[:, 0], src[:, 1], color="tab:gray", **dot)
    for i in range(min(40, paths.shape[1])):
        ax_paths.plot(paths[:, i, 0], paths[:, i, 1], color="tab:purple", lw=0.4, alpha=0.6)
    ax_paths.set_title(f"bridge: {b['source']} → {res.config.data}\nSDE paths (σ = {b['sigma']:g})", fontsize=7)
    ax_end.scatter(end[:, 0], end[:, 1], color="tab:purple", **dot)
    ax_end.set_title(f"bridge end (EM, NFE {b['nfe']}): W2 {b['w2']:.3f}\nprecision {b['precision']:.3f}", fontsize=7)


def report_markdown(res: GenerativeDemoResult) -> str:
    """The Markdown report: configuration, training, the sampler × NFE × W2 × time table, NLL."""
    c = res.config
    lines = [
        "# torchnde demo: diffusion and flow matching on 2-D data",
        "",
        f"Data set `{c.data}` (standardised), seed {c.seed}, {c.dtype}, {c.device}; wall time {res.wall_time:.1f} s.",
        "",
        "## Training",
        "",
        "| model | steps | final loss | time (s) |",
        "|---|---|---|---|",
    ]
    for mt, t in res.train.items():
        lines.append(f"| {_model_name(mt)} | {t['steps']} | {t['loss']:.4f} | {t['seconds']:.1f} |")
    lines += [
        "",
        f"MLP {c.depth}×{c.hidden} with a sin/cos time embedding, Adam (lr {c.lr:g}, cosine decay), batch "
        f"{c.batch_size}: the loop of `torchnde train`. The VP-SDE model predicts the noise ε (denoising score "
        f"matching, training times {_TIME_SAMPLING.get(c.vp_time_sampling, c.vp_time_sampling)}); the "
        "flow-matching model the velocity x1 − x0 (independent coupling)."
        + (" The bridge (below): the same MLP and optimiser on its own loss." if res.bridge is not None else "")
        + (
            f" With {c.workers} workers the flow{' and the bridge' if res.bridge is not None else ''} train in a "
            "second process while the VP-SDE model trains (the same weights as one after the other)."
            if c.workers > 1 and str(c.device).startswith("cpu")
            else ""
        ),
        "",
        "## Samples",
        "",
        f"{c.n_samples} samples per run, all from the same seed; exact W2 (optimal assignment) against "
        f"{c.n_samples} fresh data points. Two fresh data sets are **{res.w2_floor:.4f}** apart: the floor a "
        "perfect model reaches at this sample size. W2 averages over the whole cloud and barely sees a thin "
        "band of samples between two modes; **precision** does: the fraction of samples with a data point "
        f"within {c.radius:g} (in the data's standard deviations), and **recall** the fraction of data "
        f"points with a sample within {c.radius:g} (a fixed-radius version of Kynkäänniemi et al. 2019, "
        "`torchnde.generative.metrics.precision_recall`). Two fresh data sets score "
        f"**{res.pr_floor[0]:.3f} / {res.pr_floor[1]:.3f}**. *NFE* is the budget of model evaluations (for "
        "adaptive samplers, the tolerance rtol = atol); *NFE used* counts the evaluations made. Times "
        "include the solver's overhead, one CPU thread.",
        "",
        "| model | sampler | NFE | NFE used | W2 | precision | recall | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res.rows:
        lines.append(
            f"| {'VP-SDE' if r.model == 'vp' else 'flow matching'} | `{r.sampler}` ({_LABELS.get(r.sampler, r.sampler)}) "
            f"| {_budget(r)} | {r.nfe:.0f} | {r.w2:.4f} | {r.precision:.3f} | {r.recall:.3f} | {r.seconds:.3f} |"
        )
    lines.append(
        f"| data | two fresh data sets | | | {res.w2_floor:.4f} | {res.pr_floor[0]:.3f} | {res.pr_floor[1]:.3f} | |"
    )
    if "edm_heun" in c.vp_samplers:
        lines += ["", _EDM_NOTE]
    if res.nll:
        lines += [
            "",
            "## Likelihood",
            "",
            f"NLL of {c.nll_n} fresh data points through each model's ODE (the probability-flow ODE of the score "
            f"model), exact trace, per-sample adaptive steps (Tsit5, rtol = atol = {c.nll_tol:g}).",
        ]
        if res.nll_data is not None:
            lines += [
                "",
                f"*Data* is the exact log-density of `{c.data}` on the same points "
                "(`torchnde.generative.metrics.toy_log_prob`, the generator's density integrated by quadrature): "
                "the floor of any model's NLL. *Gap* is the mean of log p_data − log p_model over the same "
                "points, an estimate of KL(data ‖ model) (± its paired standard error).",
            ]
        lines += [
            "",
            "| model | NLL (nats) | gap to the data (nats) | bits/dim | time (s) |",
            "|---|---|---|---|---|",
        ]
        for mt, v in res.nll.items():
            gap = f"{v['gap']:.4f} ± {v['gap_stderr']:.4f}" if "gap" in v else ""
            lines.append(
                f"| {_model_name(mt)} | {v['nats']:.4f} ± {v['stderr']:.4f} | {gap} | {v['bits_per_dim']:.4f} "
                f"| {v['seconds']:.1f} |"
            )
        if res.nll_data is not None:
            d = res.nll_data
            lines.append(f"| data (exact density) | {d['nats']:.4f} ± {d['stderr']:.4f} | 0 | | |")
        lines.append(f"| standard normal | {res.nll_standard_normal:.4f} | | | |")
    if res.bridge is not None:
        b = res.bridge
        lines += [
            "",
            "## Bridge",
            "",
            f"A Schrödinger bridge from `{b['source']}` to `{c.data}` for the reference σW, σ = {b['sigma']:g} "
            f"(`torchnde.generative.bridges`): {c.bridge_pairs} source and target points coupled by entropic "
            f"optimal transport at regularisation 2σ² (log-domain Sinkhorn: the bridge's own endpoint coupling), "
            f"then the drift of its Markovian projection learned by bridge matching (SB-CFM in its SDE form, "
            f"Tong et al. 2024) for {b['train_steps']} steps ({b['train_seconds']:.1f} s) with the same MLP, and "
            f"simulated by Euler–Maruyama (`sample_bridge`, {b['nfe']} steps) from {c.n_samples} fresh "
            f"`{b['source']}` points. Against the same fresh data as above:",
            "",
            "| bridge | NFE | W2 | precision | recall | time (s) |",
            "|---|---|---|---|---|---|",
            f"| {b['source']} → {c.data} | {b['nfe']} | {b['w2']:.4f} | {b['precision']:.3f} | {b['recall']:.3f} "
            f"| {b['seconds']:.3f} |",
        ]
    if res.png is not None:
        lines += ["", f"![samples and densities]({res.png.name})"]
    return "\n".join(lines) + "\n"


def write_report(res: GenerativeDemoResult, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report_markdown(res))
    return path


def _jsonable(res: GenerativeDemoResult) -> dict:
    cfg = asdict(res.config)
    return {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "train": res.train,
        "w2_floor": res.w2_floor,
        "precision_recall_floor": list(res.pr_floor),
        "nll_data": res.nll_data,
        "bridge": res.bridge,
        "rows": [asdict(r) for r in res.rows],
        "nll": res.nll,
        "nll_standard_normal": res.nll_standard_normal,
        "wall_time": res.wall_time,
    }
