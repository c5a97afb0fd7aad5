"""Generative benchmarks with TRAINED models: quality against NFE on 2-D moons, and digits bits/dim.

Usage::

    python benchmarks/generative_trained.py           # full run (~10 minutes on one thread of a lightly
                                                      # loaded 2-core machine); writes generative_trained.md
                                                      # and generative_trained.png next to this file
    python benchmarks/generative_trained.py --quick   # smoke run (< 1 minute; temporary directory)
    python benchmarks/generative_trained.py --out DIR

    # the two parts as two one-thread processes at once, then the report from their saved results
    python benchmarks/generative_trained.py --parts A --save DIR &
    python benchmarks/generative_trained.py --parts B --save DIR; wait
    python benchmarks/generative_trained.py --parts "" --report DIR

Everything is seeded: up to timings, reruns give the same numbers on the same machine and versions.

Part A (scaled moons, ``torchnde.generative.data.sample("moons")``). A VP-SDE ε-model and a
conditional flow-matching model are trained with the loop of ``torchnde train``
(:func:`torchnde.cli.train.train`, configured by
:meth:`torchnde.cli.demo_generative.GenerativeDemoConfig.train_config`, i.e. what ``torchnde demo``
trains, with more steps). Then every sampler of
:data:`torchnde.generative.samplers.ALL_SAMPLERS` (score model) and Euler / Heun / Tsit5-adaptive
(flow model, :meth:`torchnde.cli._models.ModelSpec.sample`) runs at NFE budgets 5 ... 200 (and
1000 for Euler–Maruyama), adaptive ones at a ladder of tolerances, each with several sample seeds.
Metrics:

* exact W2 (:func:`torchnde.generative.metrics.wasserstein2`, optimal assignment) between the
  samples and one held-out data set of the same size, next to the W2 floor (fresh data sets
  against the same reference);
* ΔNLL: the cross-entropy of the samples under the *true* moons density (computed by quadrature
  over the arc parameter) minus the true entropy. 0 is ideal; > 0 samples off the moons;
* the model's NLL of held-out data through its probability-flow ODE
  (:func:`torchnde.generative.likelihood.log_prob`, exact trace and Hutchinson), against the true
  entropy (the NLL of a perfect model).

Part B (scikit-learn's 8x8 digits, :func:`torchnde.generative.data.digits`, levels 0..16). A VP
ε-model and a flow-matching model (``flow_matching.MLP`` on 64 dimensions, trained with
:func:`torchnde.generative.flow_matching.fit`) on uniformly dequantized images
(:func:`torchnde.generative.likelihood.dequantize`, mapped to [-1, 1)), test-set bits/dim through
the probability-flow ODE (Hutchinson and exact trace) against simple baselines, and sample quality
against NFE (W2 and MMD to the dequantized test set, with the data-vs-data floor).

References: Song et al. 2021 (score SDEs, probability-flow likelihood); Ho et al. 2020 (ε-loss);
Lipman et al. 2023 (flow matching); Grathwohl et al. 2019 (FFJORD, Hutchinson trace);
Theis, van den Oord & Bethge 2016 (dequantization and bits/dim).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent

torch.set_num_threads(1)
with contextlib.suppress(RuntimeError):  # only settable before any inter-op work
    torch.set_num_interop_threads(1)

# the sibling benchmark script (this folder is on sys.path when a script here runs)
from _common import machine_info  # noqa: E402
from generative import _f  # noqa: E402

import torchnde as tn  # noqa: E402
from torchnde.cli._models import MODELS, derive_seed, eval_data  # noqa: E402
from torchnde.cli.demo_generative import GenerativeDemoConfig  # noqa: E402
from torchnde.cli.train import train  # noqa: E402
from torchnde.controllers import PIDController  # noqa: E402
from torchnde.generative import data as gdata  # noqa: E402
from torchnde.generative import metrics  # noqa: E402
from torchnde.generative.flow_matching import MLP, cfm_loss, fit, sample_ode  # noqa: E402
from torchnde.generative.likelihood import bits_per_dim, dequantize, log_prob  # noqa: E402
from torchnde.generative.objectives import dsm_loss, nll_bound  # noqa: E402
from torchnde.generative.parameterisation import Parameterisation  # noqa: E402
from torchnde.generative.processes import VP  # noqa: E402
from torchnde.generative.samplers import ALL_SAMPLERS, sample  # noqa: E402
from torchnde.solvers import Euler, Heun, Tsit5  # noqa: E402

ADAPTIVE = ("pf_adaptive", "sde_adaptive", "adaptive")
FLOW_SAMPLERS = ("euler", "heun", "adaptive")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _stats(values):
    """(mean, sd, min, max) of finite values; NaNs if any run failed."""
    v = [float(x) for x in values]
    if not v or not all(math.isfinite(x) for x in v):
        return (math.nan,) * 4
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return statistics.fmean(v), sd, min(v), max(v)


def _times(t, x):
    if isinstance(t, torch.Tensor) and t.dim() == 1:
        return t.to(x)
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


class Counted:
    """A vector field ``f(t, x)`` that counts its (batched) evaluations."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, t, x):
        self.calls += 1
        return self.f(t, x)


def vp_field(model, process):
    """(probability-flow velocity, t_data, t_prior, prior log-density) of an ε-model on ``process``."""
    score = Parameterisation("eps", process).as_score(model)
    pf = process.probability_flow(score)
    return (lambda t, x: pf.vf(t, x, None)), process.t0, process.t1, process.prior_log_prob


def fm_field(model):
    """The flow-matching velocity: data at t = 1, N(0, I) at t = 0 (prior ``None`` = standard normal)."""
    return (lambda t, x: model(_times(t, x), x)), 1.0, 0.0, None


def _paired(a, b):
    """Mean and standard error of ``a - b`` over the same points (a paired comparison)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def nll_of(field, x, *, trace, tol, seed=0, chunk=None):
    """Per-sample log-densities (float64 numpy) and the number of batched field evaluations."""
    f, t_data, t_prior, prior = field
    chunk = chunk or x.shape[0]
    out, calls = [], 0
    for i in range(0, x.shape[0], chunk):
        g = Counted(f)
        with torch.no_grad():
            lp = log_prob(
                g,
                x[i : i + chunk],
                t_data,
                t_prior,
                prior,
                trace=trace,
                controller=PIDController(rtol=tol, atol=tol),
                per_sample=True,
                seed=seed + i,
            )
        out.append(lp.detach().double().cpu())
        calls += g.calls
    return torch.cat(out).numpy(), calls


# =============================================================================================
# part A: moons


def moons_log_density(x, k=1024):
    """Exact log-density of the standardised moons law (``data.sample("moons")``) at ``x`` (n, 2):
    a uniform angle on either half circle (probability 1/2 each) plus N(0, 0.05² I) noise, before
    the fixed standardisation; the arc integral by the midpoint rule on ``k`` angles (spacing far
    below the noise scale)."""
    (m0, m1), (s0, s1) = ((0.5, 0.25), (0.86747, 0.49668))  # data._STANDARDISE["moons"], as documented
    x = torch.as_tensor(x, dtype=torch.float64)
    raw = torch.stack([x[:, 0] * s0 + m0, x[:, 1] * s1 + m1], 1)
    th = (torch.arange(k, dtype=torch.float64) + 0.5) * (math.pi / k)
    up = torch.stack([th.cos(), th.sin()], 1)
    lo = torch.stack([1 - th.cos(), 0.5 - th.sin()], 1)
    centres = torch.cat([up, lo])  # 2k equally weighted centres
    sd = 0.05
    out = []
    for i in range(0, raw.shape[0], 2048):
        d2 = torch.cdist(raw[i : i + 2048], centres).square()
        lp = torch.logsumexp(-d2 / (2 * sd * sd), 1) - math.log(2 * k) - math.log(2 * math.pi * sd * sd)
        out.append(lp)
    return torch.cat(out) + math.log(s0 * s1)


def part_a(args, workdir):
    res = {"train": {}}
    cfg = GenerativeDemoConfig(seed=0, vp_steps=args.vp_steps, fm_steps=args.fm_steps)
    models = {}
    for mt in ("vp", "flow_matching"):
        tcfg = cfg.train_config(mt)
        out = Path(workdir) / f"moons_{mt}"
        ck = out / "checkpoint.pt"
        if ck.exists():
            ck.unlink()
        t = time.perf_counter()
        r = train(tcfg, out, progress=False, log=lambda *_: None, threads=1)
        res["train"][mt] = dict(steps=r.step, loss=r.log[-1][1] if r.log else math.nan, seconds=time.perf_counter() - t)
        model = r.model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        models[mt] = (tcfg, model)
        log(
            f"A: trained {mt}: {r.step} steps, loss {res['train'][mt]['loss']:.4f}, {res['train'][mt]['seconds']:.0f} s"
        )
    tcfg_vp = models["vp"][0]
    proc = VP(tcfg_vp["model.beta_min"], tcfg_vp["model.beta_max"], t0=tcfg_vp["model.t0"], t1=1.0)
    res["process"] = repr(proc)
    n = args.n
    ref = eval_data(tcfg_vp, n, 0)
    floors = [metrics.wasserstein2(eval_data(tcfg_vp, n, 10 + k), ref) for k in range(args.floor_draws)]
    res["floor"] = _stats(floors)
    big = eval_data(tcfg_vp, 10000, 3)
    lp_true = moons_log_density(big)
    res["entropy"] = (-float(lp_true.mean()), float(lp_true.std()) / math.sqrt(lp_true.numel()))
    dn_floor = [-float(moons_log_density(eval_data(tcfg_vp, n, 10 + k)).mean()) - res["entropy"][0] for k in range(3)]
    res["dnll_floor"] = _stats(dn_floor)
    log(f"A: W2 floor {res['floor'][0]:.4f}; true entropy {res['entropy'][0]:.4f} nats")
    seeds = [derive_seed(0, 7, k) for k in range(args.seeds)]
    plan = []
    for s in ALL_SAMPLERS:
        if s in ADAPTIVE:
            plan += [("vp", s, "tol", tol) for tol in args.tols[s]]
        else:
            plan += [("vp", s, "nfe", b) for b in args.budgets + (args.em_extra if s == "euler_maruyama" else ())]
    for s in FLOW_SAMPLERS:
        if s in ADAPTIVE:
            plan += [("flow_matching", s, "tol", tol) for tol in args.tols["adaptive"]]
        else:
            plan += [("flow_matching", s, "nfe", b) for b in args.budgets]
    rows = []
    tstart = time.perf_counter()
    for mt, s, kind, val in plan:
        tcfg, model = models[mt]
        w2s, dn, nfes, secs, err = [], [], [], [], None
        for seed in seeds:
            t = time.perf_counter()
            try:
                with torch.no_grad():
                    if mt == "vp":
                        kw = dict(rtol=val, atol=val) if kind == "tol" else dict(nfe=int(val))
                        o = sample(model, proc, (n, 2), sampler=s, parameterisation="eps", seed=seed, **kw)
                        x, used = o.x, o.nfe
                    else:
                        tol = val if kind == "tol" else 1e-5
                        x, used = MODELS[mt].sample(
                            model, tcfg, n, sampler=s, nfe=None if kind == "tol" else int(val), seed=seed,
                            dtype=torch.float32, device="cpu", rtol=tol, atol=tol,
                        )  # fmt: skip
            except (ValueError, RuntimeError) as e:  # a budget too small for the sampler, or a failure
                err = str(e).splitlines()[0][:120]
                break
            secs.append(time.perf_counter() - t)
            x = x.detach().double().cpu()
            ok = bool(torch.isfinite(x).all())
            w2s.append(metrics.wasserstein2(x, ref) if ok else math.inf)
            dn.append(-float(moons_log_density(x).mean()) - res["entropy"][0] if ok else math.inf)
            nfes.append(float(used))
        rows.append(
            dict(model=mt, sampler=s, kind=kind, setting=val, w2=_stats(w2s), dnll=_stats(dn),
                 nfe=statistics.fmean(nfes) if nfes else math.nan, seconds=statistics.fmean(secs) if secs else math.nan,
                 error=err, w2_all=w2s)
        )  # fmt: skip
        r = rows[-1]
        log(f"A: {mt:13s} {s:14s} {kind}={val:<7g} NFE {r['nfe']:7.1f}  W2 {r['w2'][0]:.4f} ± {r['w2'][1]:.4f}"
            + (f"  ({err})" if err else ""))  # fmt: skip
    res["sampling_seconds"] = time.perf_counter() - tstart
    res["rows"] = rows
    # likelihood of held-out data through each model's ODE
    xs = eval_data(tcfg_vp, args.nll_n, 2).float()
    res["nll_standard_normal"] = -float(tn.generative.likelihood.standard_normal_log_prob(xs.double()).mean())
    lp_true_x = moons_log_density(xs)
    res["nll_true"] = -float(lp_true_x.mean())
    lik = []
    for mt in ("vp", "flow_matching"):
        tcfg, model = models[mt]
        field = vp_field(model, proc) if mt == "vp" else fm_field(model)
        exact_lp = None
        for trace, tol in [("exact", t) for t in args.nll_tols] + [("hutchinson-gaussian", args.nll_tols[-1])]:
            t = time.perf_counter()
            lp, calls = nll_of(field, xs, trace=trace, tol=tol, seed=derive_seed(0, 4))
            nll = -lp
            lik.append(
                dict(model=mt, trace=trace, tol=tol, nll=float(nll.mean()), se=float(nll.std(ddof=1) / math.sqrt(len(nll))),
                     gap=float((nll - (-lp_true_x.numpy())).mean()), calls=calls, seconds=time.perf_counter() - t,
                     paired=_paired(-lp, -exact_lp) if trace != "exact" else None)
            )  # fmt: skip
            if trace == "exact":
                exact_lp = lp
            r = lik[-1]
            log(
                f"A: NLL {mt} {trace} tol {tol:g}: {r['nll']:.4f} ± {r['se']:.4f} nats ({calls} evals, {r['seconds']:.1f} s)"
            )
    res["lik"] = lik
    t = time.perf_counter()
    nb = sde_bound_bpd(models["vp"][1], proc, xs, n_times=args.bound_times, seed=derive_seed(0, 5))
    res["bound"] = dict(nll=float(nb.mean()), se=float(nb.std(ddof=1) / math.sqrt(len(nb))), times=args.bound_times,
                        seconds=time.perf_counter() - t)  # fmt: skip
    log(f"A: vp SDE bound: {res['bound']['nll']:.4f} ± {res['bound']['se']:.4f} nats")
    res["samples"] = {}
    with torch.no_grad():  # a few sample sets for the figure
        res["samples"]["data"] = ref[:1000]
        for mt, s, b in (("vp", "euler_maruyama", 5), ("vp", "dpmpp_2m", 5), ("vp", "euler_maruyama", 200)):
            res["samples"][f"VP {s} {b}"] = sample(
                models[mt][1], proc, (1000, 2), sampler=s, parameterisation="eps", nfe=b, seed=seeds[0]
            ).x.double()
        for s, b in (("euler", 5), ("euler", 200)):
            res["samples"][f"FM {s} {b}"] = MODELS["flow_matching"].sample(
                models["flow_matching"][1], models["flow_matching"][0], 1000, sampler=s, nfe=b, seed=seeds[0],
                dtype=torch.float32, device="cpu", rtol=1e-5, atol=1e-5,
            )[0].double()  # fmt: skip
    return res


# =============================================================================================
# part B: digits

LEVELS = gdata.DIGITS_LEVELS  # 17
LOW, HIGH = -1.0, 1.0
SCALE = (HIGH - LOW) / LEVELS  # y = LOW + SCALE * (x + u)


def vp_eps_loss(process):
    """:func:`torchnde.generative.objectives.dsm_loss` (ε-model, the plain ε-MSE of Ho et al. 2020,
    uniform times) in the form ``flow_matching.fit`` calls: ``loss(model, x0, x1, generator=...)``
    with ``(x0, x1)`` = (standard normal noise, data)."""

    def loss(model, eps, x0, *, generator=None):
        return dsm_loss(model, process, x0, parameterisation="eps", eps=eps, generator=generator)

    return loss


def sde_bound_bpd(model, process, x, *, n_times, seed):
    """Song et al. 2021b's upper bound on the reverse SDE's NLL
    (:func:`torchnde.generative.objectives.nll_bound`), per image, in nats (numpy)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return nll_bound(model, process, x, parameterisation="eps", n_times=n_times, generator=g).double().numpy()


def baselines(train_int, test_int, test_y, train_deq):
    """bits/dim of simple models of the test images (same dequantization convention)."""
    D = train_int.shape[1]
    out = {"uniform over 17 levels": math.log2(LEVELS)}
    # independent per-pixel histograms, add-1/2 (Jeffreys) smoothing: exact discrete NLL
    tr = train_int.long().numpy()
    te = test_int.long().numpy()
    counts = np.stack([np.bincount(tr[:, j], minlength=LEVELS) for j in range(D)]) + 0.5
    probs = counts / counts.sum(1, keepdims=True)
    out["per-pixel histogram (independent, +1/2 smoothing)"] = float(
        -np.log2(probs[np.arange(D)[None, :], te]).sum(1).mean() / D
    )
    # Gaussians on the dequantized data (continuous densities: same conversion as the models)
    mu = train_deq.mean(0)
    cov = torch.cov(train_deq.T)
    for name, c in (
        ("diagonal Gaussian (dequantized)", torch.diag(cov.diagonal())),
        ("full-covariance Gaussian (dequantized)", cov),
    ):
        dist = torch.distributions.MultivariateNormal(mu, covariance_matrix=c)
        nll = -dist.log_prob(test_y).mean()
        out[name] = float(bits_per_dim(float(nll), D, scale=SCALE))
    with contextlib.suppress(ImportError):
        from sklearn.mixture import GaussianMixture

        gm = GaussianMixture(10, covariance_type="full", random_state=0, reg_covar=1e-4).fit(train_deq.numpy())
        nll = -gm.score_samples(test_y.numpy()).mean()
        out["10-component full-covariance GMM (dequantized)"] = float(bits_per_dim(float(nll), D, scale=SCALE))
    return out


def part_b(args):
    res = {"train": {}}
    dt = torch.float32
    tr = gdata.digits("train", dtype=torch.float64).tensors[0]
    te = gdata.digits("test", dtype=torch.float64).tensors[0]
    D = tr.shape[1]
    res["sizes"] = (tr.shape[0], te.shape[0])
    deq = lambda x, seed: dequantize(  # noqa: E731
        x, LEVELS, low=LOW, high=HIGH, generator=torch.Generator().manual_seed(seed), dtype=dt
    )
    test_y = deq(te, 12345)  # ONE fixed dequantization draw of the test set, shared by every model
    train_fixed = deq(tr, 54321)
    res["baselines"] = baselines(tr, te, test_y.double(), train_fixed.double())
    for k, v in res["baselines"].items():
        log(f"B: baseline {k}: {v:.3f} bits/dim")
    proc = VP(0.1, 20.0, t0=1e-3, t1=1.0)
    res["process"] = repr(proc)

    def pairs(b, gen):
        idx = torch.randint(0, tr.shape[0], (b,), generator=gen)
        x = tr[idx]
        u = torch.rand(x.shape, generator=gen, dtype=dt)  # fresh dequantization noise every step
        y = LOW + SCALE * (x.to(dt) + u)
        return torch.randn(y.shape, generator=gen, dtype=dt), y

    models = {}
    for mt in ("vp", "flow_matching"):
        torch.manual_seed(derive_seed(1, 0 if mt == "vp" else 1) % 2**31)
        model = MLP(D, hidden=args.d_hidden, depth=args.d_depth, time_features=8).to(dt)
        t = time.perf_counter()
        loss = vp_eps_loss(proc) if mt == "vp" else cfm_loss
        hist = fit(
            model,
            pairs,
            loss=loss,
            steps=args.d_steps,
            batch_size=256,
            lr=args.d_lr,
            seed=derive_seed(1, 2, len(models)),
        )
        res["train"][mt] = dict(steps=args.d_steps, loss=statistics.fmean(hist[-100:]), seconds=time.perf_counter() - t)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        models[mt] = model
        log(
            f"B: trained {mt}: loss {res['train'][mt]['loss']:.4f} (mean of last 100), {res['train'][mt]['seconds']:.0f} s"
        )
    # bits/dim
    lik = []
    xs = test_y[: args.bpd_n]
    for mt, model in models.items():
        field = vp_field(model, proc) if mt == "vp" else fm_field(model)
        runs = [("hutchinson-rademacher", args.bpd_tol, xs), ("hutchinson-gaussian", args.bpd_tol, xs)]
        runs += [("exact", args.bpd_tol, xs[: args.exact_n])]
        runs += [("hutchinson-rademacher", args.bpd_tol, xs[: args.exact_n])]  # same images: the pair to compare
        runs += [("hutchinson-rademacher", args.bpd_tol * 10, xs)]
        exact_bpd = None
        for i, (trace, tol, x) in enumerate(runs):
            t = time.perf_counter()
            lp, calls = nll_of(field, x, trace=trace, tol=tol, seed=derive_seed(1, 4), chunk=args.bpd_chunk)
            bpd = bits_per_dim(-lp, D, scale=SCALE)
            lik.append(
                dict(model=mt, trace=trace, tol=tol, n=x.shape[0], bpd=float(bpd.mean()),
                     se=float(bpd.std(ddof=1) / math.sqrt(len(bpd))), calls=calls, seconds=time.perf_counter() - t,
                     paired=_paired(bpd, exact_bpd) if i == 3 else None)
            )  # fmt: skip
            if trace == "exact":
                exact_bpd = bpd
            r = lik[-1]
            log(
                f"B: {mt} {trace} tol {tol:g} n={r['n']}: {r['bpd']:.3f} ± {r['se']:.3f} bits/dim ({calls} evals, {r['seconds']:.0f} s)"
            )
    res["lik"] = lik
    t = time.perf_counter()
    nb = sde_bound_bpd(models["vp"], proc, xs, n_times=args.bound_times, seed=derive_seed(1, 5))
    bpd = bits_per_dim(nb, D, scale=SCALE)
    res["bound"] = dict(n=xs.shape[0], bpd=float(bpd.mean()), se=float(bpd.std(ddof=1) / math.sqrt(len(bpd))),
                        times=args.bound_times, seconds=time.perf_counter() - t)  # fmt: skip
    log(f"B: vp SDE bound: {res['bound']['bpd']:.3f} ± {res['bound']['se']:.3f} bits/dim")
    res["zero_fraction"] = float((te == 0).double().mean())
    # sample quality against NFE
    n = te.shape[0]
    d = torch.cdist(test_y.double(), test_y.double())
    med = float(d[d > 0].median())
    bw = tuple(med * f for f in (0.25, 0.5, 1.0, 2.0, 4.0))
    res["mmd_bandwidths"] = bw
    g = torch.Generator().manual_seed(777)
    fl_w2, fl_mmd = [], []
    for _ in range(args.floor_draws):
        sub = train_fixed[torch.randperm(tr.shape[0], generator=g)[:n]].double()
        fl_w2.append(metrics.wasserstein2(sub, test_y))
        fl_mmd.append(metrics.mmd2(sub, test_y, bandwidths=bw))
    res["floor_w2"], res["floor_mmd"] = _stats(fl_w2), _stats(fl_mmd)
    log(f"B: floor W2 {res['floor_w2'][0]:.3f}, MMD² {res['floor_mmd'][0]:.4f} (median distance {med:.2f})")
    seeds = [derive_seed(1, 7, k) for k in range(args.d_seeds)]
    rows = []
    plan = [("vp", s, "nfe", b) for s in args.d_samplers for b in args.d_budgets]
    plan += [("vp", "pf_adaptive", "tol", tol) for tol in (1e-2, 1e-3)]
    plan += [("flow_matching", s, "nfe", b) for s in ("euler", "heun") for b in args.d_budgets]
    plan += [("flow_matching", "adaptive", "tol", tol) for tol in (1e-2, 1e-3)]
    samples = {}
    for mt, s, kind, val in plan:
        model = models[mt]
        w2s, mmds, nfes, err = [], [], [], None
        for seed in seeds:
            try:
                with torch.no_grad():
                    if mt == "vp":
                        kw = dict(rtol=val, atol=val) if kind == "tol" else dict(nfe=int(val))
                        o = sample(model, proc, (n, D), sampler=s, parameterisation="eps", seed=seed, dtype=dt, **kw)
                        x, used = o.x, o.nfe
                    else:
                        x0 = torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=dt)
                        f = Counted(fm_field(model)[0])
                        if kind == "tol":
                            x = sample_ode(
                                f, x0, solver=Tsit5(), controller=PIDController(rtol=val, atol=val), max_steps=4096
                            )
                        else:
                            x = sample_ode(f, x0, nfe=int(val), solver=Euler() if s == "euler" else Heun())
                        used = f.calls
            except (ValueError, RuntimeError) as e:
                err = str(e).splitlines()[0][:120]
                break
            x = x.detach().double()
            ok = bool(torch.isfinite(x).all())
            w2s.append(metrics.wasserstein2(x, test_y) if ok else math.inf)
            mmds.append(metrics.mmd2(x, test_y, bandwidths=bw) if ok else math.inf)
            nfes.append(float(used))
            if seed == seeds[0]:
                samples[(mt, s, val)] = x[:40]
        rows.append(dict(model=mt, sampler=s, kind=kind, setting=val, w2=_stats(w2s), mmd=_stats(mmds),
                         nfe=statistics.fmean(nfes) if nfes else math.nan, error=err))  # fmt: skip
        r = rows[-1]
        log(f"B: {mt:13s} {s:12s} {kind}={val:<6g} NFE {r['nfe']:6.1f}  W2 {r['w2'][0]:.3f}  MMD² {r['mmd'][0]:.4f}")
    res["rows"], res["samples"] = rows, samples
    res["test_images"] = test_y[:40].double()
    return res


# =============================================================================================
# report


def _num(v, spec):
    """``format(v, spec)``, switching to 3 significant digits in exponent form for huge values."""
    if abs(v) >= 1e4:
        return format(v, "+.2e" if spec.startswith("+") else ".2e")
    return format(v, spec)


def _cell(r, key, spec=".3f", sd_spec=".3f"):
    if r is None:
        return ""
    if r["error"]:
        return "n/a"
    st = r[key]
    if not math.isfinite(st[0]):
        return "**inf**"
    s = f"{_num(st[0], spec)} ± {_num(st[1], sd_spec)}"
    if r["kind"] == "nfe" and abs(r["nfe"] - r["setting"]) > 0.01:
        s += f" ({r['nfe']:.0f})"
    return s


def _identical_note(rows):
    """A sentence naming the score-model samplers whose W2 agrees at every budget (to 1e-5, relative)."""
    by = {}
    for r in rows:
        if r["model"] == "vp" and r["kind"] == "nfe" and not r["error"]:
            by.setdefault(r["sampler"], {})[r["setting"]] = tuple(r["w2_all"])
    names, pairs = list(by), []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = set(by[a]) & set(by[b])
            if common and all(np.allclose(by[a][k], by[b][k], rtol=1e-5, atol=0) for k in common):
                pairs.append(f"`{a}` = `{b}`")
    if not pairs:
        return ""
    return (
        " Rows that agree at every budget (the same update on this process; `dpm_1` and `dpmpp_1` are both DDIM): "
        + ", ".join(pairs)
        + "."
    )


def best_per_budget(rows, budgets):
    """Per budget: the sampler with the lowest mean W2, and those not distinguishable from it: the
    mean paired difference (same seeds, so same prior draws and reference) within two standard
    errors of the paired differences."""
    out = []
    for b in budgets:
        cand = [
            r for r in rows if r["kind"] == "nfe" and r["setting"] == b and not r["error"] and math.isfinite(r["w2"][0])
        ]
        if not cand:
            continue
        cand.sort(key=lambda r: r["w2"][0])
        best = cand[0]
        tie = []
        for r in cand[1:]:
            d = np.asarray(r["w2_all"]) - np.asarray(best["w2_all"])
            se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
            if d.mean() <= 2 * se:
                tie.append(r["sampler"])
        out.append((b, best, tie))
    return out


def write_md(path, args, info, A, B, elapsed):
    L = []
    add = L.append
    add("# Generative benchmarks with trained models: quality against NFE (moons) and digits bits/dim\n")
    add(
        "Written by `benchmarks/generative_trained.py`"
        + (" **in --quick mode (numbers mean little)**" if args.quick else "")
        + ".\n"
    )
    add("## Machine\n")
    for k, v in info.items():
        add(f"- {k}: {v}")
    if elapsed is not None:
        wall, cpu, l0, l1 = elapsed
        add(f"- run: {wall:.0f} s wall, {cpu:.0f} s process CPU; load average {l0:.2f} at start, {l1:.2f} at end")
    else:
        add(
            "- run: parts A and B ran as two separate one-thread processes at the same time (`--parts A --save DIR`, `--parts B --save DIR`, then `--parts '' --report DIR`)"
        )
    for name, P in (("A (moons)", A), ("B (digits)", B)):
        w, c, l0, l1 = P["elapsed"]
        add(f"- part {name}: {w:.0f} s wall, {c:.0f} s process CPU; load average {l0:.2f} at start, {l1:.2f} at end")
    add("")
    # ---------------------------------------------------------------- A
    add("## Summary\n")
    fl = A["floor"]
    add(
        f"Moons (W2 floor {fl[0]:.3f}, min–max {fl[2]:.3f}–{fl[3]:.3f}): the sampler with the lowest mean W2 at each NFE budget "
        "(details and ties in section A):\n"
    )
    budgets = list(args.budgets)
    add("| NFE | " + " | ".join(str(b) for b in budgets) + " |")
    add("|---|" + "---|" * len(budgets))
    for mt, name in (("vp", "VP ε-model"), ("flow_matching", "flow matching")):
        best = {b: bb for b, bb, _ in best_per_budget([r for r in A["rows"] if r["model"] == mt], budgets)}
        cells = [f"`{best[b]['sampler']}` {best[b]['w2'][0]:.3f}" if b in best else "" for b in budgets]
        add(f"| {name} | " + " | ".join(cells) + " |")
    add("")
    nll = {(r["model"], r["trace"], r["tol"]): r for r in A["lik"]}
    tol = args.nll_tols[-1]
    add(
        f"Moons held-out NLL (exact trace, tol {tol:g}): VP {nll[('vp', 'exact', tol)]['nll']:.3f}, flow matching "
        f"{nll[('flow_matching', 'exact', tol)]['nll']:.3f}, true density {A['nll_true']:.3f}, N(0, I) "
        f"{A['nll_standard_normal']:.3f} nats.\n"
    )
    add("Digits test-set bits/dim (lower is better; the models: Hutchinson–Rademacher, all test images):\n")
    add("| model | bits/dim |")
    add("|---|---:|")
    glance = [(k, v, None) for k, v in B["baselines"].items()]
    for r in B["lik"]:
        if (
            r["trace"] == "hutchinson-rademacher"
            and r["n"] == max(q["n"] for q in B["lik"])
            and r["tol"] == args.bpd_tol
        ):
            name = "VP ε-model (probability flow)" if r["model"] == "vp" else "flow matching"
            glance.append((f"**{name}**", r["bpd"], r["se"]))
    if "bound" in B:
        glance.append(
            ("**VP ε-model, reverse-SDE bound** (`objectives.nll_bound`)", B["bound"]["bpd"], B["bound"]["se"])
        )
    for k, v, se in sorted(glance, key=lambda g: g[1]):
        add(f"| {k} | {v:.3f}" + (f" ± {se:.3f}" if se is not None else "") + " |")
    add("")
    add("## A. Scaled moons: trained VP-SDE ε-model and flow-matching model\n")
    tr = A["train"]
    add(
        f"Both models are `flow_matching.MLP(2, hidden=128, depth=3, time_features=8)` trained by `torchnde.cli.train.train` "
        f"with the configuration of `torchnde demo` (`GenerativeDemoConfig.train_config`: batch 256, Adam lr 2e-3 with cosine decay, "
        f"float32, seed 0) but more steps: VP {tr['vp']['steps']} steps (final ε-loss {tr['vp']['loss']:.4f}, {tr['vp']['seconds']:.0f} s), "
        f"flow matching {tr['flow_matching']['steps']} steps (final loss {tr['flow_matching']['loss']:.4f}, "
        f"{tr['flow_matching']['seconds']:.0f} s). Process: `{A['process']}`.\n"
    )
    fl = A["floor"]
    add(
        f"**W2**: exact 2-Wasserstein distance (optimal assignment) between {args.n} samples and one held-out data set of {args.n} "
        f"points, **mean ± standard deviation over {args.seeds} sample seeds** (the same seeds, hence the same prior draws, for every "
        f"sampler). **W2 floor** (fresh data against the same reference, {args.floor_draws} draws): "
        f"**{fl[0]:.4f}** (min–max {fl[2]:.4f}–{fl[3]:.4f}, sd {fl[1]:.4f}): a perfect sampler of a perfect model scores this; "
        "differences smaller than these spreads mean nothing. Columns are the NFE budgets passed as `nfe=`; the actual number of model "
        "evaluations is in parentheses where it differs (`SampleResult.nfe`, or the calls of the flow model). "
        "'n/a': the budget leaves the sampler no step (it raises `ValueError`)." + _identical_note(A["rows"]) + "\n"
    )
    ent = A["entropy"]
    dfl = A["dnll_floor"]
    add(
        f"**ΔNLL**: mean −log p_true of the samples minus the entropy of the true moons law ({ent[0]:.4f} ± {ent[1]:.4f} nats, "
        f"10 000 draws; p_true by quadrature over the arc angle, see `moons_log_density`). 0 is ideal; > 0: mass off the moons "
        f"(blur, stray points: a point 0.25 scaled units off a moon costs ~ +10 nats); < 0: mass concentrated on the moons' "
        f"ridges. Held-out data score {dfl[0]:+.3f} (min–max {dfl[2]:+.3f}–{dfl[3]:+.3f}). Very sensitive to a few stray samples.\n"
    )
    rows = A["rows"]
    for mt, title in (("vp", "VP-SDE score model (ε)"), ("flow_matching", "flow-matching model")):
        mrows = [r for r in rows if r["model"] == mt]
        budgets = list(args.budgets) + (list(args.em_extra) if mt == "vp" else [])
        for key, label, spec in (("w2", "W2", ".3f"), ("dnll", "ΔNLL (nats)", "+.3f")):
            add(f"### {title}: {label}\n")
            add("| sampler | " + " | ".join(str(b) for b in budgets) + " |")
            add("|---|" + "---:|" * len(budgets))
            for s in dict.fromkeys(r["sampler"] for r in mrows if r["kind"] == "nfe"):
                by = {r["setting"]: r for r in mrows if r["sampler"] == s and r["kind"] == "nfe"}
                add(f"| `{s}` | " + " | ".join(_cell(by.get(b), key, spec, ".3f") for b in budgets) + " |")
            add("")
        ad = [r for r in mrows if r["kind"] == "tol"]
        if ad:
            add(f"Adaptive samplers ({title}):\n")
            add("| sampler | rtol = atol | NFE (mean) | W2 | ΔNLL | s per run |")
            add("|---|---:|---:|---:|---:|---:|")
            for r in ad:
                add(
                    f"| `{r['sampler']}` | {r['setting']:g} | {_f(r['nfe'], '.0f')} | {_cell(r, 'w2')} | {_cell(r, 'dnll', '+.3f')} | {_f(r['seconds'], '.2f')} |"
                )
            add("")
    add("### Best sampler per NFE budget (lowest mean W2)\n")
    add(
        f"'tied': the per-seed W2 difference to the best (paired: the same {args.seeds} seeds, prior draws and reference) "
        "is within two standard errors of zero; with so few seeds this is a rough screen, not a test.\n"
    )
    add("| model | NFE | best | W2 | tied with it | others within 5% of its W2 |")
    add("|---|---:|---|---:|---|---|")
    for mt, name in (("vp", "VP"), ("flow_matching", "flow matching")):
        budgets = list(args.budgets) + (list(args.em_extra) if mt == "vp" else [])
        mrows = [r for r in rows if r["model"] == mt]
        for b, best, tie in best_per_budget(mrows, budgets):
            near = [
                f"`{r['sampler']}`"
                for r in mrows
                if r["kind"] == "nfe"
                and r["setting"] == b
                and r is not best
                and not r["error"]
                and r["w2"][0] <= 1.05 * best["w2"][0]
            ]
            add(
                f"| {name} | {b} | `{best['sampler']}` | {_cell(best, 'w2')} | {', '.join(f'`{t}`' for t in tie) or '–'} "
                f"| {', '.join(near) or '–'} |"
            )
    add("")
    add("### Model NLL of held-out data (probability-flow likelihood)\n")
    add(
        f"`likelihood.log_prob` on {args.nll_n} held-out points, `Tsit5` + `PIDController(rtol=atol=tol)`, per-sample steps; "
        "VP: the probability-flow ODE of the ε-model from t0 = 1e-3 to 1 with the N(0, I) prior (the density of p_t0, the data "
        "blurred by σ(t0) ≈ 0.01); flow matching: its learned ODE from t = 1 (data) to 0 (N(0, I)). The Hutchinson rows use one "
        "Gaussian probe per point, fixed for the solve. 'gap to truth': mean of (model NLL − true −log p) over the same points "
        f"(≥ 0 in expectation for a density: the KL divergence). Baselines on these points: true density **{A['nll_true']:.4f}** nats, "
        f"standard normal {A['nll_standard_normal']:.4f} nats. 'evals': batched field evaluations (the slowest sample's steps).\n"
    )
    add("| model | trace | tol | NLL (nats) | gap to truth | − exact (paired) | evals | wall (s) |")
    add("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in A["lik"]:
        pr = f"{r['paired'][0]:+.4f} ± {r['paired'][1]:.4f}" if r.get("paired") else ""
        add(
            f"| {r['model']} | {r['trace']} | {r['tol']:g} | {r['nll']:.4f} ± {r['se']:.4f} | {r['gap']:+.4f} | {pr} | {r['calls']} | {r['seconds']:.1f} |"
        )
    add("")
    bd = A["bound"]
    add(
        f"VP, reverse-SDE likelihood bound (Song et al. 2021b, Thm. 2; `objectives.nll_bound`, {bd['times']} log-SNR-sampled "
        f"times per point, same points): **{bd['nll']:.4f} ± {bd['se']:.4f}** nats ({bd['seconds']:.1f} s). It bounds the NLL "
        "of the reverse *SDE*'s law, a different density from the probability-flow ODE's above (they agree only for the exact "
        "score).\n"
    )
    # ---------------------------------------------------------------- B
    add("## B. 8×8 digits: bits/dim and sample quality\n")
    ntr, nte = B["sizes"]
    trb = B["train"]
    add(
        f"scikit-learn's bundled digits via `torchnde.generative.data.digits` ({ntr} train / {nte} test images, stratified split, "
        "seed 0), 64 pixels with integer levels 0..16 (17 levels).\n"
    )
    add(
        "**Dequantization convention**: y = −1 + (2/17)(x + u), u ~ U[0, 1)⁶⁴ (`likelihood.dequantize(x, 17, low=-1, high=1)`), "
        "so y ∈ [−1, 1); fresh u at every training step; the test set is dequantized **once** (fixed seed) and every continuous "
        "model (and the Gaussian baselines) is scored on that same draw. bits/dim = (NLL_y − 64 log(2/17)) / (64 log 2) "
        "(`likelihood.bits_per_dim(nll, 64, scale=2/17)`), an upper bound on the discrete NLL of the integer images "
        "(Theis et al. 2016). Uniform over 17 levels is log2 17 = 4.087 bits/dim.\n"
    )
    add(
        f"Models: `flow_matching.MLP(64, hidden={args.d_hidden}, depth={args.d_depth}, time_features=8)`, float32, "
        f"{args.d_steps} Adam steps (batch 256, lr {args.d_lr:g}, cosine decay) with `flow_matching.fit`: VP ε-loss on "
        f"`{B['process']}` (final {trb['vp']['loss']:.4f}, {trb['vp']['seconds']:.0f} s) and conditional flow matching "
        f"(`cfm_loss`, σ = 0; final {trb['flow_matching']['loss']:.4f}, {trb['flow_matching']['seconds']:.0f} s).\n"
    )
    add("### Test-set bits/dim\n")
    add("Baselines (fitted on the training images):\n")
    add("| model | bits/dim |")
    add("|---|---:|")
    for k, v in B["baselines"].items():
        add(f"| {k} | {v:.3f} |")
    add("")
    add(
        "Trained models, probability-flow likelihood (`likelihood.log_prob`, `Tsit5` + `PIDController(rtol=atol=tol)`, "
        "per-sample steps; Hutchinson: one probe per image fixed for the solve; ± is the standard error over images, which "
        "includes the probe noise). 'exact' uses the exact trace (64 vector-Jacobian products per evaluation) on the first "
        f"{args.exact_n} test images; the Rademacher row just below it is on the same images.\n"
    )
    add("| model | trace | tol | images | bits/dim | − exact (paired) | evals | wall (s) |")
    add("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in B["lik"]:
        pr = f"{r['paired'][0]:+.4f} ± {r['paired'][1]:.4f}" if r.get("paired") else ""
        add(
            f"| {r['model']} | {r['trace']} | {r['tol']:g} | {r['n']} | {r['bpd']:.3f} ± {r['se']:.3f} | {pr} | {r['calls']} | {r['seconds']:.0f} |"
        )
    add("")
    bd = B["bound"]
    add(
        f"VP, reverse-SDE likelihood bound (Song et al. 2021b, Thm. 2; `objectives.nll_bound`, {bd['times']} log-SNR-sampled "
        f"times per image, {bd['n']} images, same dequantized draw and conversion): **{bd['bpd']:.3f} ± {bd['se']:.3f}** bits/dim "
        f"({bd['seconds']:.0f} s): an upper bound on the NLL of the reverse SDE's law, not of the probability-flow density.\n"
    )
    add(
        f"Why the independent per-pixel histogram is hard to beat here: {100 * B['zero_fraction']:.0f}% of the test pixels are 0 "
        "and many border pixels are 0 in (almost) every image, which a discrete histogram codes in nearly 0 bits; a smooth "
        "continuous density on the dequantized data must put its mass uniformly inside each level's cell of width 2/17 to match "
        "that, and pays for any spill-over. (The histogram read as a piecewise-constant density of the dequantized data has the "
        "same bits/dim, so a continuous model can in principle reach it.)\n"
    )
    add("### Sample quality against NFE\n")
    fw, fm = B["floor_w2"], B["floor_mmd"]
    bw = ", ".join(f"{b:.2f}" for b in B["mmd_bandwidths"])
    add(
        f"{nte} samples (the test-set size) per run against the dequantized test set, mean ± sd over {args.d_seeds} sample seeds. "
        f"**W2**: exact, in the [−1, 1) pixel units over 64 dimensions. **MMD²**: biased V-statistic with RBF bandwidths {bw} "
        f"(0.25–4 × the median test-test distance). **Floor** (random {nte}-image subsets of the dequantized *training* set against "
        f"the test set, {args.floor_draws} draws): W2 **{fw[0]:.3f}** (min–max {fw[2]:.3f}–{fw[3]:.3f}), MMD² **{fm[0]:.4f}** "
        f"(min–max {fm[2]:.4f}–{fm[3]:.4f}). Values at the floor mean as good as another sample of real digits. In 64 "
        "dimensions W2 favours smooth, averaged images (few Euler steps of the flow model land closer to the conditional mean): "
        "where W2 and MMD² disagree, MMD² (and the pictures) tell sample quality better.\n"
    )
    brow = B["rows"]
    for key, label, spec, sds in (("w2", "W2", ".3f", ".3f"), ("mmd", "MMD²", ".4f", ".4f")):
        add(f"{label}:\n")
        add("| model | sampler | " + " | ".join(str(b) for b in args.d_budgets) + " |")
        add("|---|---|" + "---:|" * len(args.d_budgets))
        for mt in ("vp", "flow_matching"):
            for s in dict.fromkeys(r["sampler"] for r in brow if r["model"] == mt and r["kind"] == "nfe"):
                by = {r["setting"]: r for r in brow if r["model"] == mt and r["sampler"] == s and r["kind"] == "nfe"}
                add(f"| {mt} | `{s}` | " + " | ".join(_cell(by.get(b), key, spec, sds) for b in args.d_budgets) + " |")
        add("")
    add("Adaptive samplers:\n")
    add("| model | sampler | rtol = atol | NFE (mean) | W2 | MMD² |")
    add("|---|---|---:|---:|---:|---:|")
    for r in brow:
        if r["kind"] == "tol":
            add(
                f"| {r['model']} | `{r['sampler']}` | {r['setting']:g} | {_f(r['nfe'], '.0f')} | {_cell(r, 'w2')} | {_cell(r, 'mmd', '.4f', '.4f')} |"
            )
    add("")
    add("`generative_trained.png`: W2 against NFE on moons (both models, the floor shaded), digits W2 and MMD² against NFE, "
        "moons samples, and a grid of generated digits (quantized back to 0..16 for display).\n")  # fmt: skip
    path.write_text("\n".join(L) + "\n")


def plot(path, args, A, B):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(18, 11))
    gs = fig.add_gridspec(2, 4)
    cmap = plt.get_cmap("tab20")
    # moons W2 vs NFE, score model
    for col, mt, title in ((0, "vp", "moons, VP ε-model"), (1, "flow_matching", "moons, flow matching")):
        ax = fig.add_subplot(gs[0, col])
        rows = [r for r in A["rows"] if r["model"] == mt]
        names = list(dict.fromkeys(r["sampler"] for r in rows))
        for i, s in enumerate(names):
            rr = sorted(
                [r for r in rows if r["sampler"] == s and not r["error"] and math.isfinite(r["w2"][0])],
                key=lambda r: r["nfe"],
            )
            if not rr:
                continue
            x = [r["nfe"] for r in rr]
            y = [r["w2"][0] for r in rr]
            e = [r["w2"][1] for r in rr]
            ls = "--" if s in ADAPTIVE else "-"
            ax.errorbar(x, y, yerr=e, label=s, color=cmap(i % 20), ls=ls, marker="o", ms=3, lw=1, capsize=2)
        fl = A["floor"]
        ax.axhspan(fl[2], fl[3], color="grey", alpha=0.3, label="data floor (min–max)")
        ax.axhline(fl[0], color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(max(fl[2] * 0.7, 1e-3), 4.0)
        ax.set_xlabel("NFE (model evaluations made)")
        ax.set_ylabel("W2 to held-out data")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=5.5, ncol=3, loc="upper right")
    # moons samples
    samp = A["samples"]
    sub = gs[0, 2:].subgridspec(2, 3)
    for i, (k, v) in enumerate(samp.items()):
        ax = fig.add_subplot(sub[i // 3, i % 3])
        v = v.numpy()
        ax.scatter(v[:, 0], v[:, 1], s=1, alpha=0.5)
        ax.set_xlim(-2.5, 2.5)
        ax.set_ylim(-2.5, 2.5)
        ax.set_title(k, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    # digits W2 and MMD vs NFE
    for col, key, label, fl in ((0, "w2", "W2", B["floor_w2"]), (1, "mmd", "MMD²", B["floor_mmd"])):
        ax = fig.add_subplot(gs[1, col])
        combos = list(dict.fromkeys((r["model"], r["sampler"]) for r in B["rows"]))
        for i, (mt, s) in enumerate(combos):
            rr = sorted(
                [
                    r
                    for r in B["rows"]
                    if (r["model"], r["sampler"]) == (mt, s) and not r["error"] and math.isfinite(r[key][0])
                ],
                key=lambda r: r["nfe"],
            )
            if not rr:
                continue
            ax.errorbar([r["nfe"] for r in rr], [r[key][0] for r in rr], yerr=[r[key][1] for r in rr],
                        label=f"{'VP' if mt == 'vp' else 'FM'} {s}", color=cmap(i % 20), marker="o", ms=3, lw=1, capsize=2,
                        ls="--" if mt == "flow_matching" else "-")  # fmt: skip
        ax.axhspan(fl[2], fl[3], color="grey", alpha=0.3, label="data floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_title(f"digits: {label} to the test set")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    # digit grid
    ax = fig.add_subplot(gs[1, 2:])
    pick = [("test data", B["test_images"])]
    for key in (
        ("vp", "euler_maruyama", 200),
        ("vp", "dpmpp_2m", 20),
        ("vp", "pf_adaptive", 1e-3),
        ("flow_matching", "euler", 200),
        ("flow_matching", "heun", 20),
        ("flow_matching", "adaptive", 1e-3),
    ):
        if key in B["samples"]:
            pick.append((f"{'VP' if key[0] == 'vp' else 'FM'} {key[1]} {key[2]:g}", B["samples"][key]))
    ncol = 12
    canvas = np.ones((len(pick) * 9, ncol * 9)) * 16
    for i, (_, imgs) in enumerate(pick):
        q = ((imgs - LOW) / SCALE).floor().clamp(0, LEVELS - 1).numpy()
        for j in range(min(ncol, q.shape[0])):
            canvas[i * 9 : i * 9 + 8, j * 9 : j * 9 + 8] = q[j].reshape(8, 8)
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=16, interpolation="nearest", aspect="equal")
    ax.set_yticks([i * 9 + 4 for i in range(len(pick))])
    ax.set_yticklabels([p[0] for p in pick], fontsize=8)
    ax.set_xticks([])
    ax.set_title("digits: test images and samples (rows: sampler, NFE or tolerance)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: under a minute")
    ap.add_argument("--out", type=Path, default=None, help="directory for generative_trained.md and .png")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where the moons checkpoints go (default: a temporary directory)"
    )
    ap.add_argument("--parts", default="AB", help="run part 'A' (moons), 'B' (digits) or both (default 'AB')")
    ap.add_argument("--save", type=Path, default=None, help="save each part's results into this directory")
    ap.add_argument(
        "--report", type=Path, default=None, help="write the report, loading the parts not run from this directory"
    )
    args = ap.parse_args(argv)
    if args.out is None:  # a smoke run never overwrites the committed results
        args.out = Path(tempfile.mkdtemp(prefix="torchnde-generative-trained-")) if args.quick else HERE
    args.out.mkdir(parents=True, exist_ok=True)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.vp_steps, args.fm_steps, args.n, args.seeds, args.floor_draws = 300, 300, 300, 2, 3
        args.d_seeds = 2
        args.budgets, args.em_extra = (5, 20), (100,)
        args.tols = {"pf_adaptive": (1e-2,), "sde_adaptive": (1e-1,), "adaptive": (1e-2,)}
        args.nll_n, args.nll_tols = 50, (1e-3,)
        args.d_hidden, args.d_depth, args.d_steps, args.d_lr = 128, 2, 200, 1e-3
        args.bpd_n, args.exact_n, args.bpd_tol, args.bpd_chunk = 40, 8, 1e-3, 40
        args.bound_times = 4
        args.d_samplers, args.d_budgets = ("euler_maruyama", "dpmpp_2m"), (10, 50)
    else:
        args.vp_steps, args.fm_steps, args.n, args.seeds, args.floor_draws = 6000, 5000, 1000, 5, 5
        args.d_seeds = 3
        args.budgets, args.em_extra = (5, 10, 20, 50, 100, 200), (1000,)
        args.tols = {"pf_adaptive": (1e-1, 1e-2, 1e-3), "sde_adaptive": (1e-1, 1e-2), "adaptive": (1e-1, 1e-2, 1e-3)}
        args.nll_n, args.nll_tols = 1000, (1e-3, 1e-4, 1e-5)
        args.d_hidden, args.d_depth, args.d_steps, args.d_lr = 512, 3, 5000, 1e-3
        args.bpd_n, args.exact_n, args.bpd_tol, args.bpd_chunk = 360, 50, 1e-5, 360
        args.bound_times = 200
        args.d_samplers, args.d_budgets = (
            ("euler_maruyama", "pf_euler", "dpmpp_2m", "edm_heun"),
            (5, 10, 20, 50, 100, 200),
        )
    info = machine_info()
    start, start_cpu, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    parts = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        for name, fn in (("A", lambda: part_a(args, work)), ("B", lambda: part_b(args))):
            if name not in args.parts:
                continue
            t, c, l0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
            parts[name] = fn()
            parts[name]["seconds"] = time.perf_counter() - t
            parts[name]["quick"] = args.quick
            parts[name]["elapsed"] = (time.perf_counter() - t, time.process_time() - c, l0, os.getloadavg()[0])
            log(f"part {name}: {parts[name]['seconds']:.0f} s")
            if args.save:  # for --report: the parts may run as separate processes
                torch.save(parts[name], Path(args.save) / f"part_{name}.pt")
    elapsed = (time.perf_counter() - start, time.process_time() - start_cpu, load0, os.getloadavg()[0])
    if args.report:
        for name in "AB":
            if name not in parts:
                parts[name] = torch.load(Path(args.report) / f"part_{name}.pt", weights_only=False)  # our own file
                if parts[name].get("quick", args.quick) != args.quick:
                    raise SystemExit(
                        f"part {name} in {args.report} was run with quick={parts[name]['quick']}: pass the same --quick"
                    )
        elapsed = None  # the parts ran in separate processes: report each part's own figures
    if "A" not in parts or "B" not in parts:
        log("partial run: no report written (combine the saved parts with --report DIR)")
        return
    write_md(args.out / "generative_trained.md", args, info, parts["A"], parts["B"], elapsed)
    with contextlib.suppress(ImportError):
        plot(args.out / "generative_trained.png", args, parts["A"], parts["B"])
    log(f"wrote {args.out / 'generative_trained.md'}")


if __name__ == "__main__":
    main()
