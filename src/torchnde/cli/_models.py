"""The models ``torchnde train`` knows (``model.type``), and the processes they run on.

Each entry of :data:`MODELS` is a :class:`ModelSpec`: how to build the network from a
configuration, draw the randomness of one training step, compute the loss, sample and evaluate the
log-density. Everything random in a training step is a pure function of ``(seed, step)`` and of the
index of each sample in the *global* batch, so one process and ``N`` torchrun processes (each taking
its shard of the global batch) train the same model, and a resumed run repeats exactly what an
uninterrupted one does.

* ``"vp"``: a score-based diffusion model on the VP-SDE (Song et al. 2021, "Score-based generative
  modeling through stochastic differential equations"), an ε-predicting MLP with a sinusoidal
  time embedding trained by denoising score matching with the ε-loss of Ho et al. 2020 (DDPM),
  sampled with :func:`torchnde.generative.samplers.sample` and evaluated through the
  probability-flow ODE.
* ``"gdss"``: graph generation with a system of SDEs (GDSS, Jo et al. 2022) on the offline graph
  data sets; see :mod:`torchnde.cli._graphs` (sampling and evaluation are graph-specific there).
* ``"flow_matching"``: conditional flow matching (Lipman et al. 2023) with the independent or the
  minibatch-optimal-transport coupling (Tong et al. 2024, OT-CFM), sampled by solving the learned
  ODE with Euler, Heun or an adaptive solver.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ._errors import resolve_device

__all__ = ["ModelSpec", "MODELS", "Runtime", "runtime", "derive_seed", "shard", "DIM"]

#: dimension of the built-in toy data
DIM = 2


def derive_seed(*words: int) -> int:
    """A 63-bit seed that is a pure function of the integers ``words`` (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


# streams of derived seeds (the second word), so no two uses share random numbers
_DATA, _NOISE, _SAMPLE, _EVAL_DATA, _NLL_PROBE = 0, 1, 2, 3, 4


def _cpu_generator(*words: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*words))


def _times(t, x: torch.Tensor) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        t = t.to(dtype=x.dtype, device=x.device)
        return t.expand(x.shape[0]) if t.dim() == 0 else t
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


class _Counted:
    """``model(t, x)`` counting its calls (for the NFE of a sampler)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, t, x):
        self.calls += 1
        return self.model(_times(t, x), x)


def training_data(cfg: dict, step: int) -> torch.Tensor:
    """The global data batch of ``step`` (float64, CPU): fresh samples of ``data.name``."""
    from ..generative import data

    return data.sample(
        cfg["data.name"], cfg["train.batch_size"], seed=derive_seed(cfg["seed"], _DATA, step), dtype=torch.float64
    )


def eval_data(cfg: dict, n: int, which: int = 0) -> torch.Tensor:
    """``n`` fresh samples of the data set, independent of every training batch (float64, CPU)."""
    from ..generative import data

    return data.sample(cfg["data.name"], n, seed=derive_seed(cfg["seed"], _EVAL_DATA, which), dtype=torch.float64)


def shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rows ``[rank * B/world, (rank + 1) * B/world)`` of every tensor of a global batch."""
    b = next(iter(batch.values())).shape[0]
    lo, hi = rank * b // world, (rank + 1) * b // world
    return {k: v[lo:hi] for k, v in batch.items()}


@dataclass(frozen=True)
class ModelSpec:
    """A model family of ``torchnde train``.

    Attributes:
        name: its ``model.type``.
        description: one line for messages and docs.
        samplers: the sampler names ``torchnde sample`` accepts for it.
        default_sampler, default_nfe: what ``torchnde evaluate`` uses unless told otherwise.
        fixed_nfe_samplers: samplers whose cost is set by ``nfe`` (the others are adaptive).
    """

    name: str
    description: str
    samplers: tuple
    default_sampler: str
    default_nfe: int
    adaptive_samplers: tuple
    _batch: Callable
    _loss: Callable
    _sample: Callable
    _velocity: Callable
    _build: Callable | None = None

    def build(self, cfg: dict) -> nn.Module:
        """A freshly initialised network (its weights drawn from torch's global generator)."""
        from ..generative.flow_matching import MLP

        if self._build is not None:
            return self._build(cfg)
        return MLP(DIM, hidden=cfg["model.hidden"], depth=cfg["model.depth"], time_features=cfg["model.time_features"])

    def global_batch(self, cfg: dict, step: int) -> dict[str, torch.Tensor]:
        """All the random inputs of training step ``step`` for the whole global batch (float64,
        CPU): a pure function of ``(seed, step)``, row ``i`` belonging to global sample ``i``."""
        return self._batch(cfg, step)

    def loss(self, model, batch: dict[str, torch.Tensor], cfg: dict) -> torch.Tensor:
        """The training loss on (a shard of) a batch: the mean over its rows."""
        return self._loss(model, batch, cfg)

    def sample(self, model, cfg: dict, n: int, *, sampler: str, nfe: int | None, seed: int, dtype, device, rtol, atol):
        """``(samples (n, DIM), model evaluations)`` from a trained ``model``."""
        if sampler not in self.samplers:
            raise ValueError(
                f"unknown sampler {sampler!r} for a {self.name!r} model; valid samplers: {', '.join(self.samplers)}"
            )
        if sampler not in self.adaptive_samplers:
            if nfe is None or isinstance(nfe, bool) or int(nfe) != nfe or nfe < 1:
                raise ValueError(f"nfe must be an integer >= 1 for sampler {sampler!r}, got {nfe!r}")
        return self._sample(model, cfg, n, sampler, nfe, seed, dtype, device, rtol, atol)

    def log_prob(self, model, cfg: dict, x: torch.Tensor, *, rtol: float, atol: float) -> torch.Tensor:
        """Exact log-density (nats) of ``x`` under the model's ODE flow (instantaneous change of
        variables, exact trace, per-sample adaptive steps)."""
        from ..controllers import PIDController
        from ..generative.likelihood import log_prob

        field, t_data, t_prior, prior = self._velocity(model, cfg)
        with torch.no_grad():
            return log_prob(
                field,
                x,
                t_data,
                t_prior,
                prior,
                trace="exact",
                controller=PIDController(rtol=rtol, atol=atol),
                per_sample=True,
            )


# ------------------------------------------------------------------------------------------ VP-SDE
def _process(cfg):
    from ..generative.processes import VP

    return VP(cfg["model.beta_min"], cfg["model.beta_max"], t0=cfg["model.t0"], t1=1.0)


def _vp_batch(cfg, step):
    g = _cpu_generator(cfg["seed"], _NOISE, step)
    b, t0 = cfg["train.batch_size"], cfg["model.t0"]
    if cfg.get("model.time_sampling", "uniform") == "logsnr":  # one uniform draw per sample, as below
        from ..generative.objectives import training_times

        t = training_times(_process(cfg), b, time_sampling="logsnr", generator=g)
    else:
        t = t0 + (1.0 - t0) * torch.rand(b, generator=g, dtype=torch.float64)
    eps = torch.randn(b, DIM, generator=g, dtype=torch.float64)
    return {"x0": training_data(cfg, step), "t": t, "eps": eps}


def _vp_loss(model, batch, cfg):
    # denoising score matching in its eps form (Ho et al. 2020; Song et al. 2021, Eq. (7) with
    # lambda(t) = sigma(t)^2): || eps_theta(t, alpha x0 + sigma eps) - eps ||^2
    from ..generative.objectives import dsm_loss

    return dsm_loss(model, _process(cfg), batch["x0"], t=batch["t"], eps=batch["eps"])


def _vp_sample(model, cfg, n, sampler, nfe, seed, dtype, device, rtol, atol):
    from ..generative.samplers import sample

    with torch.no_grad():
        out = sample(
            model,
            _process(cfg),
            (n, DIM),
            nfe=nfe,
            sampler=sampler,
            parameterisation="eps",
            seed=seed,
            dtype=dtype,
            device=device,
            rtol=rtol,
            atol=atol,
        )
    return out.x, int(out.nfe)


def _vp_velocity(model, cfg):
    from ..generative.parameterisation import Parameterisation

    process = _process(cfg)
    score = Parameterisation("eps", process).as_score(model)
    return process.probability_flow(score), process.t0, process.t1, process.prior_log_prob


# ------------------------------------------------------------------------------- flow matching
def _fm_batch(cfg, step):
    from ..generative.flow_matching import ot_coupling

    g = _cpu_generator(cfg["seed"], _NOISE, step)
    b = cfg["train.batch_size"]
    x1 = training_data(cfg, step)
    x0 = torch.randn(b, DIM, generator=g, dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64)
    z = torch.randn(b, DIM, generator=g, dtype=torch.float64)
    if cfg["model.coupling"] == "ot":  # on the global batch, so every process count pairs alike
        x0, x1 = ot_coupling(x0, x1)
    return {"x0": x0, "x1": x1, "t": t, "z": z}


def _fm_loss(model, batch, cfg):
    # conditional flow matching (Lipman et al. 2023; Tong et al. 2024, Eq. (14)):
    # x_t = (1 - t) x0 + t x1 + sigma z, target u_t = x1 - x0
    t, x0, x1 = batch["t"], batch["x0"], batch["x1"]
    tb = t[:, None]
    x_t = (1 - tb) * x0 + tb * x1
    if cfg["model.sigma"] > 0:
        x_t = x_t + cfg["model.sigma"] * batch["z"]
    return (model(t, x_t) - (x1 - x0)).square().mean()


def _fm_sample(model, cfg, n, sampler, nfe, seed, dtype, device, rtol, atol):
    from ..controllers import PIDController
    from ..generative.flow_matching import sample_ode
    from ..solvers import Euler, Heun, Tsit5

    x0 = torch.randn(n, DIM, generator=_cpu_generator(seed), dtype=torch.float64).to(dtype=dtype, device=device)
    f = _Counted(model)
    with torch.no_grad():
        if sampler == "adaptive":
            tol = dict(rtol=1e-5 if rtol is None else rtol, atol=1e-5 if atol is None else atol)
            x = sample_ode(f, x0, solver=Tsit5(), controller=PIDController(**tol), max_steps=4096)
        else:
            x = sample_ode(f, x0, nfe=int(nfe), solver=Euler() if sampler == "euler" else Heun())
    return x, f.calls


def _fm_velocity(model, cfg):
    # data at t = 1, the N(0, I) source at t = 0
    return (lambda t, x: model(_times(t, x), x)), 1.0, 0.0, None


def _score_samplers() -> tuple:
    from ..generative.samplers import ALL_SAMPLERS

    return tuple(ALL_SAMPLERS)


def _gdss(name):
    def call(*args, **kwargs):
        from . import _graphs

        return getattr(_graphs, name)(*args, **kwargs)

    return call


def _gdss_not(what):
    def fail(*args, **kwargs):
        raise ValueError(f"a 'gdss' (graph) model has no {what}; torchnde sample/evaluate handle graphs themselves")

    return fail


#: ``model.type`` -> its :class:`ModelSpec`
MODELS: dict[str, ModelSpec] = {
    "vp": ModelSpec(
        "vp",
        "VP-SDE score model (eps-parameterised MLP, denoising score matching)",
        _score_samplers(),
        "euler_maruyama",
        200,
        ("pf_adaptive", "sde_adaptive"),
        _vp_batch,
        _vp_loss,
        _vp_sample,
        _vp_velocity,
    ),
    "flow_matching": ModelSpec(
        "flow_matching",
        "conditional flow matching (independent or OT coupling)",
        ("euler", "heun", "adaptive"),
        "euler",
        100,
        ("adaptive",),
        _fm_batch,
        _fm_loss,
        _fm_sample,
        _fm_velocity,
    ),
    "gdss": ModelSpec(
        "gdss",
        "GDSS graph score model (GCN node / adjacency-power attention networks, system of SDEs)",
        ("s4", "pc", "euler_maruyama", "pf_euler", "pf_heun"),
        "s4",
        200,
        (),
        _gdss("batch"),
        _gdss("loss"),
        _gdss_not("2-D sampler"),
        _gdss_not("log-density"),
        _gdss("build"),
    ),
}


# ------------------------------------------------------------------------------------ processes
@dataclass
class Runtime:
    """Where a command runs: this process's rank among ``world_size`` torchrun processes (rank 0
    and world size 1 without torchrun), its device and dtype."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the processes, in place (a no-op in one process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(x)
        return x


@contextlib.contextmanager
def runtime(device: str = "auto", dtype: str = "float32", threads: int | None = None, *, option: str = "--device"):
    """The :class:`Runtime` of this process. Under torchrun (``WORLD_SIZE > 1`` in the
    environment) it joins the process group (NCCL for CUDA devices, gloo on the CPU) unless one is
    already initialised, and leaves it again on exit if it joined it. ``threads`` sets torch's CPU
    threads for the duration (restored on exit). The device is checked by
    :func:`~torchnde.cli._errors.resolve_device` (a :class:`~torchnde.cli._errors.UsageError` for
    one this torch cannot use; ``option`` is how the user sets it, for the message)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, getattr(torch, dtype), option=option)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            owns = True
        rank, world = dist.get_rank(), dist.get_world_size()
    try:
        yield Runtime(rank, world, local_rank, dev, getattr(torch, dtype))
    finally:
        torch.set_num_threads(old_threads)
        if owns:
            import torch.distributed as dist

            dist.destroy_process_group()


def chunked(
    rt: Runtime, n: int, chunk_size: int, fn: Callable[[int, int, int], tuple[torch.Tensor, float]], width: int
):
    """Run ``fn(chunk_index, start, size) -> (rows (size, width), cost)`` on chunks of ``n`` rows,
    chunk ``c`` on process ``c % world_size``, and gather: every process gets all ``n`` rows (float64,
    CPU) and the list of costs. The result does not depend on the number of processes."""
    chunks = [(c, s, min(chunk_size, n - s)) for c, s in enumerate(range(0, n, chunk_size))]
    rows = torch.zeros(n, width, dtype=torch.float64, device=rt.device)
    costs = torch.zeros(len(chunks), dtype=torch.float64, device=rt.device)
    for c, s, size in chunks:
        if c % rt.world_size == rt.rank:
            out, cost = fn(c, s, size)
            rows[s : s + size] = out.reshape(size, width).to(torch.float64)
            costs[c] = float(cost)
    rt.all_reduce_(rows)
    rt.all_reduce_(costs)
    return rows.cpu(), costs.cpu().tolist()
