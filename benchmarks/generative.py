"""Diffusion-sampler benchmarks: quality against NFE with the exact score, and the cost per model
evaluation against hand-written sampling loops. Same process, one thread.

Usage::

    python benchmarks/generative.py              # full run (~7 minutes on 2 cores), writes generative.md + .png here
    python benchmarks/generative.py --quick      # smoke mode (~1 minute; writes to a temporary directory)
    python benchmarks/generative.py --out DIR    # write generative.md and generative.png into DIR

Part 1 (quality). Data: an 8-component Gaussian mixture shaped like the standardised
"8gaussians" (centres on a circle of radius 2/1.436, std 0.25/1.436, equal weights), whose
diffused marginals, scores and log-densities are known exactly
(:class:`torchnde.generative.oracles.GaussianMixtureData`). Every sampler of
``torchnde.generative.samplers.ALL_SAMPLERS`` runs with the exact score on ``VP()`` and ``EDM()``
at NFE budgets 5 ... 1000 (the adaptive ones at a ladder of tolerances). Metrics: the exact W2
(optimal assignment) between the samples and an exact draw of p_t0 of the same size, next to the
W2 between two exact draws (the Monte-Carlo floor); the NLL of the samples under the exact p_t0
minus that of exact draws (the entropy of p_t0); and, for the adaptive probability-flow path, the
error of the PF-ODE log-likelihood (``likelihood.log_prob``) against the exact log p_t0.

Part 2 (time per NFE). An untrained time-conditioned MLP eps-network
(``flow_matching.MLP(2, hidden=w, depth=2)``), float32, every sampler at 100 NFE on VP, against
hand-written loops of the same model with pre-sampled noise (Euler--Maruyama, probability-flow
Euler, DPM-Solver++ 2M, and EDM Heun on EDM). Medians of interleaved rounds.
See README.md in this directory ("Generative samplers").
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

import torch

HERE = Path(__file__).resolve().parent

torch.set_num_threads(1)
with contextlib.suppress(RuntimeError):  # only settable before any inter-op work
    torch.set_num_interop_threads(1)

from _common import machine_info  # noqa: E402  (this folder, on sys.path)

import torchnde as tn  # noqa: E402
from torchnde.controllers import PIDController  # noqa: E402
from torchnde.generative.fast_samplers import logsnr_times  # noqa: E402
from torchnde.generative.flow_matching import MLP  # noqa: E402
from torchnde.generative.likelihood import log_prob  # noqa: E402
from torchnde.generative.metrics import wasserstein2  # noqa: E402
from torchnde.generative.oracles import GaussianMixtureData  # noqa: E402
from torchnde.generative.processes import EDM, VP  # noqa: E402
from torchnde.generative.samplers import ALL_SAMPLERS, sample  # noqa: E402

ADAPTIVE = ("pf_adaptive", "sde_adaptive")
STOCHASTIC = ("euler_maruyama", "pc", "edm_heun_sde", "sde_adaptive")


def mixture() -> GaussianMixtureData:
    """Eight Gaussians on a circle, scaled like ``data.sample("8gaussians")`` (std 1.436 per axis)."""
    scale = math.sqrt(2.0**2 / 2 + 0.25**2)  # raw per-coordinate std of 8gaussians
    ang = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    means = torch.stack([ang.cos(), ang.sin()], 1) * (2.0 / scale)
    return GaussianMixtureData(torch.ones(8), means, 0.25 / scale)


def processes():
    return {"VP": VP(), "EDM": EDM()}


# ---------------------------------------------------------------------------------------------
# part 1: quality


def exact_draw(mix, proc, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return mix.marginal_sample(proc, proc.t0, n, generator=gen, dtype=torch.float32)


def quality(mix, name, proc, budgets, tols, n, log):
    """W2 to an exact draw and NLL gap for every sampler and budget (or tolerance)."""
    ref = exact_draw(mix, proc, n, seed=1000)
    big = mix.marginal_sample(proc, proc.t0, 20000, generator=torch.Generator().manual_seed(2000))
    lp_big = mix.log_prob(proc, proc.t0, big)
    entropy = -float(lp_big.mean())
    entropy_se = float(lp_big.std()) / math.sqrt(lp_big.numel())
    floors = [wasserstein2(exact_draw(mix, proc, n, seed=3000 + k), ref) for k in range(3)]
    score = mix.score_fn(proc)
    # one prior draw for every sampler; the exact probability-flow map of it (float64, Tsit5 at
    # 1e-9) is the limit of every deterministic sampler
    x_init = proc.prior_sample((n, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    flow = sample(score, proc, (n, 2), sampler="pf_adaptive", x_init=x_init.double(), rtol=1e-9, atol=1e-9).x
    flow_w2 = wasserstein2(flow, ref)
    rows = []
    for smp in ALL_SAMPLERS:
        settings = [("tol", t) for t in tols[smp]] if smp in ADAPTIVE else [("nfe", b) for b in budgets]
        for kind, val in settings:
            kw = dict(rtol=val, atol=val) if kind == "tol" else dict(nfe=val)
            w = time.perf_counter()
            try:
                out = sample(score, proc, (n, 2), sampler=smp, seed=0, x_init=x_init, **kw)
            except ValueError as e:  # the budget leaves no step for this sampler
                log(f"  {name} {smp} {kind}={val}: skipped ({e})")
                continue
            wall = time.perf_counter() - w
            x = out.x
            ok = bool(torch.isfinite(x).all())
            w2 = wasserstein2(x, ref) if ok else math.nan
            nll_gap = -float(mix.log_prob(proc, proc.t0, x.double()).mean()) - entropy if ok else math.nan
            det = smp not in STOCHASTIC
            rms = float((x.double() - flow).square().sum(-1).mean().sqrt()) if ok and det else math.nan
            rows.append(
                dict(
                    process=name,
                    sampler=smp,
                    kind=kind,
                    setting=val,
                    nfe=out.nfe,
                    w2=w2,
                    nll=nll_gap,
                    rms=rms,
                    wall=wall,
                )
            )
            log(
                f"  {name} {smp:14s} {kind}={val:<6g} nfe={out.nfe:5d} W2={w2:.4f} dNLL={nll_gap:+.4f} rms={rms:.2e} ({wall:.2f} s)"
            )
    return rows, dict(floors=floors, entropy=entropy, entropy_se=entropy_se, flow_w2=flow_w2)


def pf_likelihood(mix, name, proc, tols, n, log):
    """Error of the adaptive PF-ODE log-likelihood (Tsit5 + PID, per-sample steps, exact trace,
    float64) against the exact log p_t0, on exact draws; the prior is the exact p_t1, so the error
    is the solver's alone. Also with the N(0, prior_std^2) prior, as a model would use."""
    x = mix.marginal_sample(proc, proc.t0, n, generator=torch.Generator().manual_seed(4000))
    exact = mix.log_prob(proc, proc.t0, x)
    term = proc.probability_flow(mix.score_fn(proc))
    rows = []
    for tol in tols:
        w = time.perf_counter()
        with torch.no_grad():  # the trace's vector-Jacobian products run under enable_grad inside
            lp, sol = log_prob(
                term,
                x,
                proc.t0,
                proc.t1,
                prior_log_prob=lambda z: mix.log_prob(proc, proc.t1, z),
                controller=PIDController(rtol=tol, atol=tol),
                return_solution=True,
            )
        wall = time.perf_counter() - w
        lp_prior = lp - mix.log_prob(proc, proc.t1, sol.ys[0][:, -1]) + proc.prior_log_prob(sol.ys[0][:, -1])
        steps = sol.stats["num_steps"]
        steps = steps.double() if isinstance(steps, torch.Tensor) else torch.tensor(float(steps))
        err = (lp - exact).abs()
        rows.append(
            dict(
                process=name,
                tol=tol,
                mean_err=float(err.mean()),
                max_err=float(err.max()),
                bias=float((lp - exact).mean()),
                prior_bias=float((lp_prior - exact).mean()),
                steps=float(steps.mean()),
                steps_max=float(steps.max()),
                wall=wall,
            )
        )
        log(
            f"  {name} PF likelihood tol={tol:g}: mean |err| {err.mean():.2e}, max {err.max():.2e}, steps {steps.mean():.0f}"
        )
    return rows


# ---------------------------------------------------------------------------------------------
# part 2: time per NFE


class Counted(torch.nn.Module):
    """The eps-network ``model(t, x)``; counts calls."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, t, x):
        self.calls += 1
        return self.net(t, x)


def _prior(proc, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return proc.prior_sample(shape, generator=gen, dtype=torch.float32)


def hand_em(model, proc: VP, shape, n):
    """Reverse-SDE Euler--Maruyama on VP's uniform grid, eps-model, noise drawn by one randn."""
    b0, db = proc.beta_min, proc.beta_max - proc.beta_min
    B = shape[0]

    def run(seed):
        x = _prior(proc, shape, seed)
        z = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed + 1))
        ts = torch.linspace(proc.t1, proc.t0, n + 1, dtype=torch.float64).tolist()
        for i in range(n):
            t, dt = ts[i], ts[i + 1] - ts[i]
            beta = b0 + db * t
            sigma = math.sqrt(-math.expm1(-(b0 * t + 0.5 * db * t * t)))
            eps = model(torch.full((B,), t), x)
            # x + (f - g^2 score) dt + g sqrt(|dt|) z, with score = -eps / sigma
            x = x + (-0.5 * beta * dt) * x + (beta * dt / sigma) * eps + math.sqrt(-beta * dt) * z[i]
        return x

    return run


def hand_pf_euler(model, proc: VP, shape, n):
    """Probability-flow Euler on VP's uniform grid."""
    b0, db = proc.beta_min, proc.beta_max - proc.beta_min
    B = shape[0]

    def run(seed):
        x = _prior(proc, shape, seed)
        ts = torch.linspace(proc.t1, proc.t0, n + 1, dtype=torch.float64).tolist()
        for i in range(n):
            t, dt = ts[i], ts[i + 1] - ts[i]
            beta = b0 + db * t
            sigma = math.sqrt(-math.expm1(-(b0 * t + 0.5 * db * t * t)))
            eps = model(torch.full((B,), t), x)
            x = x + (-0.5 * beta * dt) * x + (0.5 * beta * dt / sigma) * eps
        return x

    return run


def hand_dpmpp_2m(model, proc: VP, shape, n):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) on the log-SNR-uniform grid, eps-model."""
    B = shape[0]

    def run(seed):
        x = _prior(proc, shape, seed)
        ts = logsnr_times(proc, n).tolist()
        coef = [proc.marginal(t) for t in ts]
        lam = [math.log(a) - math.log(s) for a, s in coef]
        x0_prev = None
        for i in range(n):
            (a_s, s_s), (a_t, s_t) = coef[i], coef[i + 1]
            h = lam[i + 1] - lam[i]
            eps = model(torch.full((B,), ts[i]), x)
            x0 = (x - s_s * eps) / a_s
            if x0_prev is None:
                d = x0
            else:
                r = (lam[i] - lam[i - 1]) / h
                d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            x = (s_t / s_s) * x - (a_t * math.expm1(-h)) * d
            x0_prev = x0
        return x

    return run


def hand_edm_heun(model, proc: EDM, shape, n):
    """EDM Heun (Karras et al. 2022, Alg. 1, two evaluations in every step) on the rho-grid."""
    B = shape[0]

    def run(seed):
        x = _prior(proc, shape, seed)
        ts = proc.times(n).tolist()
        for i in range(n):
            t, t1 = ts[i], ts[i + 1]
            d = model(torch.full((B,), t), x)  # dx/dt = (x - x0) / t = eps
            xe = x + (t1 - t) * d
            d2 = model(torch.full((B,), t1), xe)
            x = x + (0.5 * (t1 - t)) * (d + d2)
        return x

    return run


def lib_run(model, proc, shape, smp, nfe, tol):
    kw = dict(rtol=tol, atol=tol) if smp in ADAPTIVE else dict(nfe=nfe)

    def run(seed):
        return sample(model, proc, shape, sampler=smp, parameterisation="eps", seed=seed, **kw).x

    return run


def timing(shapes, nfe, reps, log):
    """Interleaved rounds: every method once per round, then a block of model calls."""
    rows, checks = [], []
    for B, width in shapes:
        torch.manual_seed(0)
        model = Counted(MLP(2, hidden=width, depth=2)).eval()
        shape = (B, 2)
        vp, edm = VP(), EDM()
        methods = {
            "hand EM": (hand_em(model, vp, shape, nfe), None),
            "hand PF-Euler": (hand_pf_euler(model, vp, shape, nfe), None),
            "hand DPM++ 2M": (hand_dpmpp_2m(model, vp, shape, nfe), None),
            "hand EDM Heun (EDM)": (hand_edm_heun(model, edm, shape, nfe // 2), None),
        }
        pair = {
            "euler_maruyama": "hand EM",
            "pf_euler": "hand PF-Euler",
            "dpmpp_2m": "hand DPM++ 2M",
            "edm_heun (EDM)": "hand EDM Heun (EDM)",
        }
        for smp in ALL_SAMPLERS:
            methods[smp] = (lib_run(model, vp, shape, smp, nfe, 1e-2 if smp == "sde_adaptive" else 1e-3), pair.get(smp))
        methods["edm_heun (EDM)"] = (lib_run(model, edm, shape, "edm_heun", nfe, None), pair["edm_heun (EDM)"])
        t_one = torch.full((B,), 0.5)
        x_one = torch.randn(shape)
        with torch.no_grad():
            # agreement of the deterministic pairs (same prior draw)
            for lib, hand in (
                ("pf_euler", "hand PF-Euler"),
                ("dpmpp_2m", "hand DPM++ 2M"),
                ("edm_heun (EDM)", "hand EDM Heun (EDM)"),
            ):
                a, b = methods[lib][0](7), methods[hand][0](7)
                checks.append(((B, width), lib, hand, float((a - b).abs().max()), float(b.abs().max())))
            nfes = {}
            for key, (run, _) in methods.items():  # warm-up, and the NFE of one run
                model.calls = 0
                run(0)
                nfes[key] = model.calls
            times = {key: [] for key in methods}
            calls, grids = [], []
            order = list(methods)
            for r in range(reps):
                for key in order if r % 2 == 0 else order[::-1]:
                    c = time.thread_time()
                    methods[key][0](r)
                    times[key].append(time.thread_time() - c)
                c = time.thread_time()
                for _ in range(200):
                    model(t_one, x_one)
                calls.append((time.thread_time() - c) / 200)
                c = time.thread_time()  # the Brownian grid that euler_maruyama builds per call
                tn.paths.BrownianGrid(vp.times(nfe).flip(0), shape, seed=r)
                grids.append(time.thread_time() - c)
        call = statistics.median(calls)
        for key, (_, hand) in methods.items():
            med = statistics.median(times[key])
            rows.append(
                dict(
                    shape=(B, width),
                    method=key,
                    nfe=nfes[key],
                    time=med,
                    per_nfe=med / nfes[key],
                    call=call,
                    hand=hand,
                    grid=statistics.median(grids),
                )
            )
        log(f"  (batch {B}, width {width}): one model call {call * 1e6:.0f} us")
        for row in rows[-len(methods) :]:
            log(
                f"    {row['method']:20s} nfe={row['nfe']:5d} {row['time'] * 1e3:8.2f} ms  {row['per_nfe'] * 1e6:7.0f} us/NFE"
            )
    return rows, checks


# ---------------------------------------------------------------------------------------------
# report


def _f(v, spec=".3f"):
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def per_nfe_ratio(rows, method, shape):
    by = {r["method"]: r for r in rows if r["shape"] == shape}
    r = by[method]
    ref = by[r["hand"]] if r["hand"] else by["hand EM"]
    return r["per_nfe"] / ref["per_nfe"], bool(r["hand"])


def time_section(args, trows, checks, note=None) -> list[str]:
    """The lines of section 2 (time per NFE)."""
    L = []
    add = L.append
    add("## 2. Time per NFE against hand-written loops\n")
    add(
        f"Untrained `flow_matching.MLP(2, hidden=w, depth=2)` eps-network, float32, every sampler with `nfe={args.t_nfe}` on "
        "`VP()` (adaptive: `pf_adaptive` at 1e-3, `sde_adaptive` at 1e-2; `edm_heun (EDM)` on `EDM()`), "
        '`parameterisation="eps"`. Each run includes the prior draw and all set-up (grid, Brownian path, terms), '
        f"as a user's call does. Thread CPU time, median of {args.reps} interleaved rounds. **ratio**: "
        "time per NFE ÷ that of the matching hand-written loop (same model, same grid, noise pre-sampled by one "
        "`randn`); for samplers without their own hand loop, ÷ the hand Euler–Maruyama loop's time per NFE "
        "(marked *vs EM*: a different method, so only indicative). **overhead**: time per NFE ÷ one model call.\n"
    )
    for shape in sorted({r["shape"] for r in trows}):
        rs = [r for r in trows if r["shape"] == shape]
        add(f"### batch {shape[0]}, width {shape[1]}: one model call {rs[0]['call'] * 1e6:.0f} µs\n")
        em = next((r for r in rs if r["method"] == "euler_maruyama"), None)
        if em is not None:
            add(
                f"Building the `BrownianGrid` of the SDE samplers (counter-based normals, so a path is reproducible "
                f"from its seed and the same as the `VirtualBrownianTree`'s): {em['grid'] * 1e6:.0f} µs per call, "
                f"{em['grid'] / em['nfe'] * 1e6:.1f} µs per NFE at nfe={em['nfe']} (the hand loops draw their noise "
                "with one `randn`).\n"
            )
        add("| method | NFE | time (ms) | µs / NFE | overhead | ratio |")
        add("|---|---:|---:|---:|---:|---:|")
        for r in rs:
            if r["method"].startswith("hand"):
                ratio = "(reference)"
            else:
                q, own = per_nfe_ratio(trows, r["method"], shape)
                ratio = f"**{q:.2f}×**" if own else f"{q:.2f}× vs EM"
            add(
                f"| {r['method'] if r['method'].startswith('hand') else '`' + r['method'] + '`'} | {r['nfe']} | "
                f"{r['time'] * 1e3:.2f} | {r['per_nfe'] * 1e6:.0f} | {r['per_nfe'] / r['call']:.2f} | {ratio} |"
            )
        add("")
    add(
        "What is left at small batch is per-step Python work rather than tensor ops (a library step makes about as "
        "many full-batch ops as the hand loop: the process coefficients are computed with `math` for float times, the "
        "eps→score scale is folded into the drift's coefficient, Euler's update is one fused op): the term wrappers "
        "and the flattening of the state, the solve loop's bookkeeping and its one finiteness reduction per step, "
        "and for the SDE samplers the diffusion term, the Brownian increment lookup and the grid built per call. "
        "It is a fixed cost of some tens of µs per step, invisible at batch 4096.\n"
    )
    add("Agreement of the deterministic pairs (same prior draw; max |library − hand|, and max |hand|):\n")
    for shape, lib, hand, diff, mag in checks:
        add(f"- {shape}: `{lib}` vs {hand}: {diff:.2e} (of {mag:.2f})")
    add("")
    add("### Target: within 5% of the hand-written loop per NFE\n")
    add("| shape | sampler | ratio | met |")
    add("|---|---|---:|---|")
    for shape in sorted({r["shape"] for r in trows}):
        for r in trows:
            if r["shape"] == shape and r["hand"]:
                q, _ = per_nfe_ratio(trows, r["method"], shape)
                add(f"| {shape} | `{r['method']}` | {q:.2f}× | {'met' if q <= 1.05 else 'missed'} |")
    add("")
    if note:
        add(note + "\n")
    return L


def write_md(path, args, info, qual, floors, lik, trows, checks, budgets, elapsed):
    L = []
    add = L.append
    add("# Generative benchmarks: diffusion samplers with the exact score, and time per NFE\n")
    add(
        "Written by `benchmarks/generative.py`"
        + (" **in --quick mode (numbers mean little)**" if args.quick else "")
        + ".\n"
    )
    add("## Machine\n")
    for k, v in info.items():
        add(f"- {k}: {v}")
    wall, cpu, l0, l1 = elapsed
    add(f"- run: {wall:.0f} s wall, {cpu:.0f} s process CPU; load average {l0:.2f} at start, {l1:.2f} at end\n")
    add("## 1. Quality against NFE (exact score, 2-D 8-Gaussian mixture)\n")
    add(
        f"{args.n} samples per run (float32, `seed=0`), compared with one exact draw of p_t0 of the same size. "
        "**W2**: exact 2-Wasserstein distance (optimal assignment). **floor**: W2 between two exact draws "
        "(three independent draws against the same reference: mean, min–max), the Monte-Carlo noise of the "
        "measurement: differences below its spread mean nothing. **ΔNLL**: mean exact −log p_t0 of the samples minus "
        "that of 20 000 exact draws (the entropy of p_t0); 0 is ideal, > 0 means samples in low-density regions "
        "(blurred), < 0 samples too concentrated at the modes. NFE is the number of score evaluations actually made "
        "(`SampleResult.nfe`). Columns are the NFE budgets passed as `nfe=`; the adaptive samplers are listed by "
        "tolerance (rtol = atol).\n"
    )
    for name in processes():
        fl = floors[name]
        add(f"### {name}\n")
        add(
            f"W2 floor: {statistics.mean(fl['floors']):.3f} (min–max {min(fl['floors']):.3f}–{max(fl['floors']):.3f}); "
            f"entropy of p_t0: {fl['entropy']:.3f} ± {fl['entropy_se']:.3f} nats.\n"
        )
        add(
            f"W2 of the exact probability-flow map of the same prior draw (the limit of every deterministic sampler): "
            f"{fl['flow_w2']:.3f}.\n"
        )
        add("W2 (actual NFE in parentheses where it differs from the budget):\n")
        add("| sampler | " + " | ".join(str(b) for b in budgets) + " |")
        add("|---|" + "---:|" * len(budgets))
        for smp in ALL_SAMPLERS:
            if smp in ADAPTIVE:
                continue
            cells = []
            for b in budgets:
                r = next((r for r in qual if r["process"] == name and r["sampler"] == smp and r["setting"] == b), None)
                if r is None:
                    cells.append("–")
                else:
                    cells.append(_f(r["w2"]) + ("" if r["nfe"] == b else f" ({r['nfe']})"))
            add(f"| `{smp}` | " + " | ".join(cells) + " |")
        add("\nΔNLL (nats):\n")
        add("| sampler | " + " | ".join(str(b) for b in budgets) + " |")
        add("|---|" + "---:|" * len(budgets))
        for smp in ALL_SAMPLERS:
            if smp in ADAPTIVE:
                continue
            cells = []
            for b in budgets:
                r = next((r for r in qual if r["process"] == name and r["sampler"] == smp and r["setting"] == b), None)
                cells.append("–" if r is None else _f(r["nll"], "+.3f"))
            add(f"| `{smp}` | " + " | ".join(cells) + " |")
        add(
            "\nDeterministic samplers: RMS distance of each sample to the exact probability-flow map of the same "
            "start (float64 Tsit5 at 1e-9), free of Monte-Carlo noise:\n"
        )
        add("| sampler | " + " | ".join(str(b) for b in budgets) + " |")
        add("|---|" + "---:|" * len(budgets))
        for smp in ALL_SAMPLERS:
            if smp in ADAPTIVE or smp in STOCHASTIC:
                continue
            cells = []
            for b in budgets:
                r = next((r for r in qual if r["process"] == name and r["sampler"] == smp and r["setting"] == b), None)
                cells.append("–" if r is None else _f(r["rms"], ".1e"))
            add(f"| `{smp}` | " + " | ".join(cells) + " |")
        add("\nAdaptive samplers (RMS to the flow map for `pf_adaptive` only):\n")
        add("| sampler | rtol = atol | NFE | W2 | ΔNLL | RMS to flow map | wall (s) |")
        add("|---|---:|---:|---:|---:|---:|---:|")
        for r in qual:
            if r["process"] == name and r["kind"] == "tol":
                add(
                    f"| `{r['sampler']}` | {r['setting']:g} | {r['nfe']} | {_f(r['w2'])} | {_f(r['nll'], '+.3f')} | {_f(r['rms'], '.1e')} | {r['wall']:.2f} |"
                )
        add("")
    add("### PF-ODE log-likelihood error (adaptive path)\n")
    add(
        f"`likelihood.log_prob(process.probability_flow(exact score), x, t0, t1)` on {args.lik_n} exact draws of p_t0, "
        "float64, `Tsit5` + `PIDController(rtol=atol=tol)`, per-sample steps (the default with `DirectAdjoint`), exact "
        "trace; prior = the exact p_t1, so the error is the solver's. Error = |log p − exact log p_t0| in nats. "
        "'bias with N(0, σ²) prior' replaces the exact p_t1 by the process's Gaussian prior (what a trained model uses): "
        "the mean log p − exact at that tolerance.\n"
    )
    add(
        "| process | tol | mean abs error | max abs error | mean error | bias with N(0, σ²) prior | steps (mean / max) | wall (s) |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in lik:
        add(
            f"| {r['process']} | {r['tol']:g} | {r['mean_err']:.2e} | {r['max_err']:.2e} | {r['bias']:+.2e} | "
            f"{r['prior_bias']:+.2e} | {r['steps']:.0f} / {r['steps_max']:.0f} | {r['wall']:.2f} |"
        )
    add("")
    L += time_section(args, trows, checks)
    add("## 3. Trained models and digits bits/dim\n")
    add(
        "In [generative_trained.md](generative_trained.md) (`benchmarks/generative_trained.py`): quality against "
        "NFE for every sampler with models trained on moons, and test-set bits/dim on scikit-learn's 8x8 digits.\n"
    )
    path.write_text("\n".join(L) + "\n")


def plot(path, qual, floors):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    cmap = plt.get_cmap("tab20")
    for ax, name in zip(axes, processes()):
        fl = floors[name]["floors"]
        ax.axhspan(min(fl), max(fl), color="0.85", label="exact vs exact (floor)")
        for i, smp in enumerate(ALL_SAMPLERS):
            rs = sorted((r for r in qual if r["process"] == name and r["sampler"] == smp), key=lambda r: r["nfe"])
            if not rs:
                continue
            style = "--" if smp in STOCHASTIC else "-"
            marker = "s" if smp in ADAPTIVE else "o"
            ax.plot(
                [r["nfe"] for r in rs], [r["w2"] for r in rs], style, marker=marker, ms=3, color=cmap(i % 20), label=smp
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE (score evaluations made)")
        ax.set_title(f"{name}: W2 to an exact draw of p_t0")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("W2")
    axes[1].legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke mode: about a minute")
    ap.add_argument("--out", type=Path, default=None, help="directory for generative.md and generative.png")
    ap.add_argument(
        "--only",
        choices=("all", "time"),
        default="all",
        help="'time': run section 2 (time per NFE) alone and replace that section of an existing generative.md",
    )
    args = ap.parse_args(argv)
    if args.out is None:  # a smoke run must never overwrite the committed results
        args.out = Path(tempfile.mkdtemp(prefix="torchnde-generative-")) if args.quick else HERE
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    start, start_cpu, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    if args.quick:
        budgets, args.n, args.lik_n = (5, 20, 100), 400, 64
        tols = {"pf_adaptive": (1e-2, 1e-4), "sde_adaptive": (1e-1,)}
        lik_tols = (1e-3, 1e-5)
        shapes, args.t_nfe, args.reps = [(256, 64)], 20, 3
    else:
        budgets, args.n, args.lik_n = (5, 10, 20, 50, 100, 200, 1000), 1500, 256
        tols = {"pf_adaptive": (1e-1, 1e-2, 1e-3, 1e-4, 1e-5), "sde_adaptive": (1e-1, 1e-2)}
        lik_tols = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
        shapes, args.t_nfe, args.reps = [(256, 64), (4096, 256)], 100, 7
    if args.only == "time":
        return only_time(args, shapes, log)
    mix = mixture()
    info = machine_info()
    qual, floors, lik = [], {}, []
    log("part 1: quality")
    with torch.no_grad():
        for name, proc in processes().items():
            rows, fl = quality(mix, name, proc, budgets, tols, args.n, log)
            qual += rows
            floors[name] = fl
    for name, proc in processes().items():
        lik += pf_likelihood(mix, name, proc, lik_tols, args.lik_n, log)
    log("part 2: time per NFE")
    trows, checks = timing(shapes, args.t_nfe, args.reps, log)
    elapsed = (time.perf_counter() - start, time.process_time() - start_cpu, load0, os.getloadavg()[0])
    write_md(args.out / "generative.md", args, info, qual, floors, lik, trows, checks, budgets, elapsed)
    with contextlib.suppress(ImportError):
        plot(args.out / "generative.png", qual, floors)
    log(f"wrote {args.out / 'generative.md'} ({elapsed[0]:.0f} s wall, {elapsed[1]:.0f} s CPU)")


def only_time(args, shapes, log):
    """Re-measure section 2 and splice it into ``generative.md`` (section 1 is left as it is)."""
    torch.set_num_threads(1)
    path = args.out / "generative.md"
    old = path.read_text() if path.exists() else HERE.joinpath("generative.md").read_text()
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    log("part 2: time per NFE")
    trows, checks = timing(shapes, args.t_nfe, args.reps, log)
    wall, load1 = time.perf_counter() - start, os.getloadavg()[0]
    note = (
        f"Section 2 re-measured alone (`--only time`{' --quick' if args.quick else ''}, "
        f"{torch.get_num_threads()} thread): {wall:.0f} s wall; load average {load0:.2f} at start, {load1:.2f} at end "
        "(the machine is shared, so absolute times vary from run to run; the ratios are measured side by side)."
    )
    new = "\n".join(time_section(args, trows, checks, note))
    a, b = old.index("## 2. Time per NFE"), old.index("## 3. ")
    path.write_text(old[:a] + new + "\n" + old[b:])
    log(f"wrote section 2 of {path} ({wall:.0f} s wall)")


if __name__ == "__main__":
    main()
