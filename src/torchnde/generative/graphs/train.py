r"""Training and sampling glue for graph generation (GDSS, Jo, Lee & Hwang 2022).

The pieces are the generic multi-component layer (:mod:`torchnde.generative.multi`) and this
package's data and networks; this module wires them the way GDSS does:

* **Process** (:func:`graph_process`): node features ``x`` and the adjacency ``adj`` each diffused
  by a VP-SDE (or the adjacency by a VE-SDE, GDSS's choice; see :func:`graph_process` for why the
  default differs), the adjacency noise symmetric with a zero diagonal
  (:func:`~torchnde.generative.multi.symmetric_noise`) and padded nodes masked
  (``mask_dims={"x": (1,), "adj": (1, 2)}``).
* **Training** (:func:`fit`): :func:`~torchnde.generative.multi.multi_dsm_loss` on minibatches of
  the padded training tensors (one-hot degree node features, 0/1 adjacency, node masks), Adam, an
  exponential moving average of the weights (the sampled model; warm-up
  ``min(decay, (1 + k) / (10 + k))`` at step ``k`` so that short runs are not dominated by the
  initial weights).
* **Sampling** (:func:`sample_graphs`): node counts drawn from the training set's sizes (GDSS's
  ``init_flags``), :func:`~torchnde.generative.multi.multi_sample` with S4 or predictor–corrector
  (or any sampler of :data:`~torchnde.generative.multi.MULTI_SAMPLERS`), the adjacency quantised at
  0.5 and returned as networkx graphs (the sampled node features are discarded, as in GDSS).

Everything random is a function of the seeds passed in.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
from torch import nn

from ..multi import MultiProcess, multi_dsm_loss, multi_sample, symmetric_noise
from ..objectives import training_times
from ..processes import VE, VP
from .data import GraphBatch, to_graphs, to_tensors
from .networks import AdjScoreNet, GraphScoreModel, NodeScoreNet

__all__ = ["graph_process", "build_model", "fit", "FitResult", "sample_graphs", "EMA", "prepare"]

TIMES = ("uniform", "logsnr")


def graph_process(
    x_beta: tuple[float, float] = (0.1, 20.0),
    adj_beta: tuple[float, float] = (0.1, 20.0),
    *,
    adj_sigma: tuple[float, float] | None = None,
    t0: float = 1e-3,
) -> MultiProcess:
    """The system of SDEs: a VP-SDE ``beta`` in ``x_beta`` on the node features, and on the adjacency
    a VP-SDE (``adj_beta``) or, with ``adj_sigma=(sigma_min, sigma_max)``, a VE-SDE; symmetric
    adjacency noise with a zero diagonal, padded nodes masked.

    GDSS's community-small and grid settings are ``graph_process((0.1, 1.0), adj_sigma=(0.2, 1.0))``:
    neither process reaches its N(0, I) prior at ``t = 1`` (the VP keeps ``alpha(1) = 0.76`` of the
    data, the VE adds noise of sd 1 to 0/1 entries), so sampling starts off the distribution the
    network was trained on. On community-small (3000 steps, one seed) that pair undershot the edge
    count (36 edges per graph against 39) and its degree MMD stayed ~10x the default's (0.067 against
    0.006), though it matched 4-node orbits better (0.026 against 0.090); hence the default, VP(0.1,
    20) on both leaves, which reaches its prior (docs/graphs.md).
    """
    adj = VP(*adj_beta, t0=t0, t1=1.0) if adj_sigma is None else VE(*adj_sigma, t0=t0, t1=1.0)
    return MultiProcess(
        {"x": VP(*x_beta, t0=t0, t1=1.0), "adj": adj},
        noise_transform={"adj": symmetric_noise},
        mask_dims={"x": (1,), "adj": (1, 2)},
    )


def _adjacency_process(process: MultiProcess):
    """The ``"adj"`` leaf's process (whose log-SNR ``times="logsnr"`` is uniform in)."""
    return process.leaf_processes[process._paths.index(("adj",))]


def build_model(
    features: int,
    *,
    hidden: int = 32,
    depth: int = 3,
    powers: int = 2,
    layers: int = 5,
    heads: int = 4,
    channels: int = 8,
    final_channels: int = 4,
) -> GraphScoreModel:
    """A :class:`GraphScoreModel`: a ``depth``-layer GCN node network and an attention network of
    ``layers`` layers of ``heads`` heads over ``powers`` adjacency powers (``channels`` channels between
    layers, ``final_channels`` out of the last), both ``hidden`` wide. The defaults are GDSS's
    community-small and grid sizes (``c_init = 2``, ``c_hid = 8``, ``c_final = 4``, 5 layers)."""
    return GraphScoreModel(
        NodeScoreNet(features, hidden, depth),
        AdjScoreNet(features, hidden, powers, layers, heads, channels=channels, final_channels=final_channels),
    )


def prepare(graphs: list[nx.Graph], *, max_nodes: int | None = None, max_degree: int | None = None, dtype=None):
    """Padded training tensors of ``graphs`` (one-hot degree features) -> :class:`GraphBatch`."""
    return to_tensors(
        graphs, max_nodes=max_nodes, max_degree=max_degree, features="degree", dtype=dtype or torch.float32
    )


class EMA:
    """Exponential moving average of a module's parameters (and a copy holding it).

    ``update(step)`` uses the decay ``min(decay, (1 + step) / (10 + step))``."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1); got {decay}")
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained ``model``, its EMA copy ``ema`` (or the model itself
    when ``ema_decay=0``), the losses ``[(step, loss)]``, wall and thread-CPU seconds."""

    model: nn.Module
    ema: nn.Module
    losses: list = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def fit(
    model: nn.Module,
    process: MultiProcess,
    batch: GraphBatch,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 5e-3,
    ema_decay: float = 0.999,
    grad_clip: float | None = 1.0,
    cosine: bool = True,
    seed: int = 0,
    log_every: int = 100,
    log: Callable | None = None,
    trim: bool = True,
    times: str = "uniform",
) -> FitResult:
    """Train ``model`` by denoising score matching of the joint system on the padded ``batch``.

    Minibatches of ``batch_size`` graphs drawn with replacement; Adam with learning rate ``lr``
    (cosine-decayed to 0 over ``steps`` if ``cosine``), gradient norm clipped to ``grad_clip``.
    ``log(step, loss)`` every ``log_every`` steps if given. With ``trim`` each minibatch is cut to
    its largest graph's node count (the networks ignore padded nodes, so only the cost changes: grid
    graphs of 100–361 nodes padded to 361 pay for the padding otherwise; one host sync per step).
    ``times``: the training times, ``"uniform"`` on ``[t0, t1]`` or ``"logsnr"`` (uniform in the
    adjacency process's log-SNR, :func:`~torchnde.generative.objectives.training_times`: more of the
    training at low and middle noise, where uniform times of a VP(0.1, 20) spend little; on
    community-small it helped one data seed and not another, see docs/graphs.md).
    """
    if times not in TIMES:
        raise ValueError(f"times must be one of {TIMES}; got {times!r}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive; got {steps}, {batch_size}")
    x, adj, mask = batch
    param = next(model.parameters())
    x, adj, mask = (v.to(dtype=param.dtype, device=param.device) for v in (x, adj, mask))
    g = torch.Generator(device=param.device).manual_seed(int(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    ema = EMA(model, ema_decay) if ema_decay > 0 else None
    counts = mask.sum(-1)
    adj_process = _adjacency_process(process) if times == "logsnr" else None
    losses, run = [], 0.0
    t_wall, t_cpu = time.perf_counter(), time.thread_time()
    model.train()
    for step in range(steps):
        i = torch.randint(0, x.shape[0], (batch_size,), generator=g, device=param.device)
        n = int(counts[i].max()) if trim else x.shape[1]
        t = None  # uniform: drawn inside the loss
        if adj_process is not None:
            t = training_times(adj_process, batch_size, time_sampling="logsnr", generator=g)
        loss = multi_dsm_loss(
            model,
            process,
            {"x": x[i, :n], "adj": adj[i, :n, :n]},
            mask=mask[i, :n],
            parameterisation="eps",
            generator=g,
            t=t,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        if ema is not None:
            ema.update(model, step)
        run += float(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            k = (step + 1) % log_every or log_every
            losses.append((step + 1, run / k))
            run = 0.0
            if log is not None:
                log(step + 1, losses[-1][1])
    model.eval()
    return FitResult(
        model, ema.model if ema is not None else model, losses, time.perf_counter() - t_wall, time.thread_time() - t_cpu
    )


def sample_graphs(
    model: nn.Module,
    process: MultiProcess,
    n: int,
    sizes,
    *,
    max_nodes: int,
    features: int,
    sampler: str = "s4",
    nfe: int = 1000,
    snr: float = 0.05,
    n_corrector: int = 1,
    seed: int = 0,
    chunk_size: int = 256,
    threshold: float = 0.5,
    denoise: bool = True,
    return_tensors: bool = False,
    dtype: torch.dtype | None = None,
    device=None,
):
    """``n`` graphs from a trained model.

    Args:
        sizes: the node counts to draw from uniformly (the training graphs' sizes, GDSS's protocol).
        max_nodes, features: the padded ``N`` and ``F`` the model was trained with.
        sampler, nfe, snr, n_corrector: :func:`~torchnde.generative.multi.multi_sample`'s (the
            Langevin ``snr`` 0.05 is GDSS's for these data sets; at equal NFE ``"pc"`` takes
            ``nfe // 2`` steps with one corrector each, ``"s4"`` ``nfe`` steps); ``snr <= 0``
            turns the corrector off.
        seed: seeds the node counts and the sampler (chunk ``c`` of the sampler: ``100003 seed + c``).
        chunk_size: graphs per solve; the drawn node counts are sorted so that each chunk holds
            graphs of similar sizes and is padded only to its largest (the graphs are returned in the
            order of the draws).
        threshold: the adjacency quantisation level.
        denoise: end with Tweedie's posterior mean (one more evaluation; removes the noise of
            level ``sigma(t0)``, 0.2 for the default VE adjacency, that the samples still carry;
            GDSS likewise returns the last step's mean).
        return_tensors: also return ``(adj, mask)``, the continuous samples.
        dtype, device: of the samples (default: those of ``model``'s first parameter, so ``model``
            may be any callable if both are given).

    Returns:
        a list of ``n`` networkx graphs (and the tensors with ``return_tensors``).
    """
    sizes = np.asarray(list(sizes), dtype=np.int64)
    if sizes.size == 0 or sizes.min() < 1 or sizes.max() > max_nodes:
        raise ValueError(f"sizes must be node counts in 1..{max_nodes}; got {sizes.tolist()[:10]}")
    if snr <= 0:  # no corrector
        snr, n_corrector = 0.16, 0
    if dtype is None or device is None:
        param = next(model.parameters())
        dtype, device = dtype or param.dtype, device or param.device
    rng = np.random.default_rng(int(seed))
    drawn = rng.choice(sizes, size=int(n))
    order = np.argsort(-drawn, kind="stable")  # largest first, so chunk c is padded to drawn[order[c * chunk]]
    out, adjs, masks = [None] * int(n), [None] * int(n), [None] * int(n)
    with torch.no_grad():
        for c, start in enumerate(range(0, int(n), int(chunk_size))):
            idx = order[start : start + chunk_size]
            k = torch.as_tensor(drawn[idx], device=device)
            b, m = k.shape[0], int(drawn[idx].max())
            mask = (torch.arange(m, device=device)[None] < k[:, None]).to(dtype)
            res = multi_sample(
                model, process, {"x": (b, m, features), "adj": (b, m, m)},
                nfe=nfe, sampler=sampler, parameterisation="eps", mask=mask, seed=int(seed) * 100003 + c,
                snr=snr, n_corrector=n_corrector, dtype=dtype, device=device, denoise=denoise,
            )  # fmt: skip
            a = res.x["adj"]
            for j, gr in zip(idx, to_graphs(a, mask, threshold=threshold)):
                out[j] = gr
            if return_tensors:
                pad = max_nodes - m
                a = torch.nn.functional.pad(a, (0, pad, 0, pad))
                mask = torch.nn.functional.pad(mask, (0, pad))
                for r, j in enumerate(idx):
                    adjs[j], masks[j] = a[r], mask[r]
    if return_tensors:
        return out, (torch.stack(adjs), torch.stack(masks))
    return out
