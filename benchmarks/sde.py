"""Neural-SDE benchmarks: torchnde against torchsde and a hand-written Euler--Maruyama loop, same
problems, same process, one thread.

Usage::

    python benchmarks/sde.py               # full run (~6-7 minutes on 2 cores), writes sde.md + sde.png here
    python benchmarks/sde.py --quick       # smoke mode (~1 minute; writes to a temporary directory)
    python benchmarks/sde.py --out DIR     # write sde.md and sde.png into DIR
    python benchmarks/sde.py --profile     # also print a cProfile of torchnde Euler on (16, 2, 32), 100 steps

Problem: dy = f(y) dt + g(y) dW on [0, 1], float32, with a tanh-MLP drift f and a diagonal
diffusion g_i(y) = sigmoid(MLP_i(y_i)) (one small MLP per component, so the noise commutes, as
Milstein's method needs); an additive-noise variant g_i(t) = sigmoid(MLP_i(t)) for SRA1/ShARK.
Sizes (batch, state, hidden) = (16, 2, 32) and (256, 16, 64), 100 and 1000 constant steps.
Forward (no autograd) and forward + backward (loss = sum of squares of y(1), gradients for all
parameters), each the median of interleaved repeats, with a fresh Brownian sample in every run.
See README.md in this directory ("SDEs and CDEs").
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

torch.set_num_threads(1)
with contextlib.suppress(RuntimeError):  # only settable before any inter-op work
    torch.set_num_interop_threads(1)

import torchsde  # noqa: E402
from _common import log_profile, machine_info  # noqa: E402  (this folder, on sys.path)

import torchnde as tn  # noqa: E402
from torchnde.paths import BrownianGrid, VirtualBrownianTree  # noqa: E402

MLP_SEED, Y0_SEED, LAW_SEED = 0, 1, 2
T0, T1 = 0.0, 1.0

# ---------------------------------------------------------------------------------------------
# solvers that may not exist yet (written in parallel): looked up by name, None if missing

_SOLVER_MODULES = {
    "ItoMilstein": "milstein",
    "StratonovichMilstein": "milstein",
    "EulerHeun": "euler_heun",
    "SRA1": "sra1",
    "ShARK": "shark",
    "SPaRK": "spark",
    "ReversibleHeun": "reversible_heun",
}


def find_solver(name):
    """The torchnde solver class ``name``: from ``torchnde``, ``torchnde.solvers`` or its own module."""
    for mod in (tn, getattr(tn, "solvers", None)):
        if mod is not None and hasattr(mod, name):
            return getattr(mod, name)
    with contextlib.suppress(ImportError, AttributeError):
        import importlib

        return getattr(importlib.import_module(f"torchnde.solvers.{_SOLVER_MODULES.get(name, name.lower())}"), name)
    return getattr(tn, name, None)


# ---------------------------------------------------------------------------------------------
# the model


def make_drift(d, w):
    """Linear(d, w)-tanh-Linear(w, w)-tanh-Linear(w, d), PyTorch's default initialisation."""
    return torch.nn.Sequential(
        torch.nn.Linear(d, w), torch.nn.Tanh(), torch.nn.Linear(w, w), torch.nn.Tanh(), torch.nn.Linear(w, d)
    )


class DiagMLP(torch.nn.Module):
    """``out_i = sigmoid(sum_k v_ik tanh(u_ik x_i + a_ik) + c_i)``: one 1-w-1 MLP per component ``i``.

    Applied to ``y`` it is a diagonal diffusion whose component ``i`` depends on ``y_i`` only
    (commutative noise); applied to ``t`` (broadcast to every component) an additive one."""

    def __init__(self, d, w):
        super().__init__()
        bound = 1.0 / math.sqrt(w)
        self.u = torch.nn.Parameter(torch.empty(d, w).uniform_(-1.0, 1.0))
        self.a = torch.nn.Parameter(torch.empty(d, w).uniform_(-1.0, 1.0))
        self.v = torch.nn.Parameter(torch.empty(d, w).uniform_(-bound, bound))
        self.c = torch.nn.Parameter(torch.empty(d).uniform_(-bound, bound))

    def forward(self, x):
        # plain mul + add: torch.addcmul has no forward-mode AD formula (under torch.func.jvp, as in
        # Milstein's method, it runs a Python decomposition, ~10x slower)
        h = torch.tanh(x.unsqueeze(-1) * self.u + self.a)
        return torch.sigmoid((h * self.v).sum(-1) + self.c)


@dataclass
class Problem:
    shape: tuple  # (batch, state, hidden)
    f: torch.nn.Module  # drift
    g: DiagMLP  # diffusion of y (diagonal) or of t (additive)
    y0: torch.Tensor
    params: list = field(default_factory=list)

    def gt(self, t, like):
        """The additive diffusion g(t), broadcast to ``like``'s shape."""
        tt = torch.as_tensor(t, dtype=like.dtype, device=like.device).reshape(1, 1).expand(1, like.shape[-1])
        return self.g(tt).expand_as(like)


def make_problem(shape, y0=None):
    batch, d, w = shape
    torch.manual_seed(MLP_SEED)
    f = make_drift(d, w)
    g = DiagMLP(d, w)
    if y0 is None:
        torch.manual_seed(Y0_SEED)
        y0 = torch.randn(batch, d)
    p = Problem(shape, f, g, y0)
    p.params = list(f.parameters()) + list(g.parameters())
    return p


class TorchsdeSDE(torch.nn.Module):
    """The same SDE for torchsde (additive noise: ``g`` as a ``(batch, d, d)`` diagonal matrix, the
    shape torchsde's ``noise_type="additive"`` needs)."""

    def __init__(self, prob: Problem, sde_type: str, additive: bool):
        super().__init__()
        self.f_net, self.g_net = prob.f, prob.g
        self.prob = prob
        self.sde_type = sde_type
        self.noise_type = "additive" if additive else "diagonal"
        self.additive = additive

    def f(self, t, y):
        return self.f_net(y)

    def g(self, t, y):
        if self.additive:
            return torch.diag_embed(self.prob.gt(t, y))
        return self.g_net(y)


# ---------------------------------------------------------------------------------------------
# methods: make(prob, n) -> run(seed) returning y(1) (a fresh Brownian sample per seed)


@dataclass(frozen=True)
class Method:
    key: str  # unique id
    label: str  # table label
    lib: str  # "hand" | "torchnde" | "torchsde"
    group: str  # comparison group
    make: callable
    additive: bool = False  # runs on the additive-noise problem
    missing: str = ""  # non-empty: not available (reason)


def hand_em(prob: Problem, n: int):
    """The floor: Euler--Maruyama with all increments sampled by one ``torch.randn``."""
    f, g, y0 = prob.f, prob.g, prob.y0
    h = (T1 - T0) / n
    sq = math.sqrt(h)
    gen = torch.Generator(device=y0.device)

    def run(seed):
        gen.manual_seed(seed)
        dw = torch.randn((n, *y0.shape), generator=gen, dtype=y0.dtype, device=y0.device).mul_(sq)
        y = y0
        for i in range(n):
            y = y + f(y) * h + g(y) * dw[i]
        return y

    return run


def tn_make(solver_name, path="tree", tol=None, additive=False, levy=None, adjoint=None):
    """torchnde ``solve`` with a constant step; ``path`` "tree" (VirtualBrownianTree, ``tol``
    a float, None for the default, or "h/2") or "grid" (BrownianGrid.uniform)."""

    def make(prob: Problem, n: int):
        solver = find_solver(solver_name)()
        y0 = prob.y0
        h = (T1 - T0) / n
        drift = tn.ODETerm(lambda t, y, args: prob.f(y))
        if additive:
            diff = lambda t, y, args: prob.gt(t, y)  # noqa: E731
        else:
            diff = lambda t, y, args: prob.g(y)  # noqa: E731
        lev = levy if levy is not None else getattr(solver, "levy_area", None)
        adj = adjoint() if adjoint is not None else tn.DirectAdjoint()
        kw = dict(levy_area=lev, dtype=y0.dtype, device=y0.device)
        t_tol = h / 2 if tol == "h/2" else tol

        def run(seed):
            if path == "grid":
                bm = BrownianGrid.uniform(T0, T1, n, tuple(y0.shape), seed=seed, **kw)
            else:
                bm = VirtualBrownianTree(T0, T1, tuple(y0.shape), tol=t_tol, seed=seed, **kw)
            term = tn.MultiTerm(drift, tn.ControlTerm(diff, bm, noise="diagonal", additive=additive))
            sol = tn.solve(term, solver, T0, T1, y0, dt0=h, adjoint=adj, max_steps=n + 10)
            return sol.ys[-1]

        return run

    return make


def ts_make(method, sde_type="ito", bm="interval", additive=False, adjoint_method=None):
    """torchsde ``sdeint`` (``sdeint_adjoint`` if ``adjoint_method``) with ``bm`` "interval" (its
    default ``BrownianInterval``, built by sdeint) or "tree" (``BrownianTree``, default tol)."""

    def make(prob: Problem, n: int):
        sde = TorchsdeSDE(prob, sde_type, additive)
        y0 = prob.y0
        h = (T1 - T0) / n
        # float64 times: with float32 ts, torchsde's accumulated time falls short of t1 by ~1e-6
        # and it takes one extra tiny step (see README.md)
        ts = torch.tensor([T0, T1], dtype=torch.float64, device=y0.device)
        levy = "space-time" if method == "srk" else "none"
        kw = dict(method=method, dt=h)
        sdeint = torchsde.sdeint
        if adjoint_method is not None:
            sdeint = torchsde.sdeint_adjoint
            kw["adjoint_method"] = adjoint_method

        def run(seed):
            if bm == "tree":
                b = torchsde.BrownianTree(T0, torch.zeros_like(y0), t1=T1, entropy=seed)
            else:
                b = torchsde.BrownianInterval(
                    T0, T1, size=tuple(y0.shape), dtype=y0.dtype, device=y0.device, entropy=seed,
                    levy_area_approximation=levy,
                )  # fmt: skip
            return sdeint(sde, y0, ts, bm=b, **kw)[-1]

        return run

    return make


def methods():
    rev = getattr(tn, "ReversibleAdjoint", None)
    ms = [
        Method("hand", "hand-written EM loop (pre-sampled noise)", "hand", "euler", lambda p, n: hand_em(p, n)),
        Method("tn_euler_tree", "torchnde Euler + VirtualBrownianTree", "torchnde", "euler", tn_make("Euler")),
        Method(
            "tn_euler_tree_h2", "torchnde Euler + VirtualBrownianTree(tol=h/2)", "torchnde", "euler",
            tn_make("Euler", tol="h/2"),
        ),
        Method(
            "tn_euler_grid", "torchnde Euler + BrownianGrid.uniform", "torchnde", "euler", tn_make("Euler", path="grid")
        ),
        Method("ts_euler", "torchsde euler + BrownianInterval", "torchsde", "euler", ts_make("euler")),
        Method("ts_euler_tree", "torchsde euler + BrownianTree", "torchsde", "euler", ts_make("euler", bm="tree")),
        Method("tn_milstein", "torchnde ItoMilstein", "torchnde", "milstein", tn_make("ItoMilstein")),
        Method("ts_milstein", "torchsde milstein (Itô)", "torchsde", "milstein", ts_make("milstein")),
        Method("ts_srk", "torchsde srk (diagonal: SRID2)", "torchsde", "srk_diag", ts_make("srk")),
        Method(
            "tn_sra1", "torchnde SRA1 (additive)", "torchnde", "srk_add", tn_make("SRA1", additive=True), additive=True
        ),
        Method(
            "tn_shark", "torchnde ShARK (additive)", "torchnde", "srk_add", tn_make("ShARK", additive=True),
            additive=True,
        ),
        Method(
            "ts_srk_add", "torchsde srk (additive: SRA1)", "torchsde", "srk_add", ts_make("srk", additive=True),
            additive=True,
        ),
        Method(
            "tn_revheun", "torchnde ReversibleHeun + ReversibleAdjoint", "torchnde", "revheun",
            tn_make("ReversibleHeun", adjoint=rev),
        ),
        Method(
            "ts_revheun", "torchsde reversible_heun + adjoint_reversible_heun", "torchsde", "revheun",
            ts_make("reversible_heun", "stratonovich", adjoint_method="adjoint_reversible_heun"),
        ),
        Method("tn_heun", "torchnde Heun (Stratonovich)", "torchnde", "heun", tn_make("Heun")),
        Method("ts_heun", "torchsde heun", "torchsde", "heun", ts_make("heun", "stratonovich")),
        Method("tn_midpoint", "torchnde Midpoint (Stratonovich)", "torchnde", "midpoint", tn_make("Midpoint")),
        Method("ts_midpoint", "torchsde midpoint", "torchsde", "midpoint", ts_make("midpoint", "stratonovich")),
        Method("tn_eulerheun", "torchnde EulerHeun", "torchnde", "eulerheun", tn_make("EulerHeun")),
        Method("ts_eulerheun", "torchsde euler_heun", "torchsde", "eulerheun", ts_make("euler_heun", "stratonovich")),
    ]  # fmt: skip
    need = {
        "tn_milstein": "ItoMilstein",
        "tn_sra1": "SRA1",
        "tn_shark": "ShARK",
        "tn_revheun": "ReversibleHeun",
        "tn_eulerheun": "EulerHeun",
    }
    out = []
    for m in ms:
        reason = ""
        if m.key in need and find_solver(need[m.key]) is None:
            reason = f"torchnde.{need[m.key]} not found"
        if m.key == "tn_revheun" and rev is None:
            reason = "torchnde.ReversibleAdjoint not found"
        out.append(Method(**{**m.__dict__, "missing": reason}) if reason else m)
    return out


#: the Euler-Maruyama group (the only one run at (256, 16, 64) with 1000 steps, to keep the run short)
EULER_KEYS = ("hand", "tn_euler_tree", "tn_euler_tree_h2", "tn_euler_grid", "ts_euler", "ts_euler_tree")

#: the comparisons: (group title, torchnde keys, torchsde key)
PAIRS = [
    ("Euler-Maruyama, tree (default tol)", ["tn_euler_tree"], "ts_euler"),
    ("Euler-Maruyama, tree (tol = h/2)", ["tn_euler_tree_h2"], "ts_euler"),
    ("Euler-Maruyama, grid", ["tn_euler_grid"], "ts_euler"),
    ("Itô Milstein", ["tn_milstein"], "ts_milstein"),
    ("SRK, diagonal noise (torchnde's closest: ItoMilstein)", ["tn_milstein"], "ts_srk"),
    ("SRK, additive noise (SRA1 / ShARK vs torchsde srk)", ["tn_sra1", "tn_shark"], "ts_srk_add"),
    ("reversible Heun + its adjoint", ["tn_revheun"], "ts_revheun"),
    ("Heun (Stratonovich)", ["tn_heun"], "ts_heun"),
    ("midpoint (Stratonovich)", ["tn_midpoint"], "ts_midpoint"),
    ("Euler-Heun (Stratonovich)", ["tn_eulerheun"], "ts_eulerheun"),
]


# ---------------------------------------------------------------------------------------------
# timing


@dataclass
class Row:
    shape: tuple
    n: int
    key: str
    label: str
    lib: str
    fwd: float = math.nan  # median forward wall time (no autograd)
    fb: float = math.nan  # median forward + backward wall time
    fwd_cpu: float = math.nan
    fb_cpu: float = math.nan
    reps: int = 0
    failure: str = ""


def zero_grads(params):
    for p in params:
        p.grad = None


def time_fwd(run, seed):
    w, c = time.perf_counter(), time.thread_time()
    with torch.no_grad():
        run(seed)
    return time.perf_counter() - w, time.thread_time() - c


def time_fb(run, seed, params):
    zero_grads(params)
    w, c = time.perf_counter(), time.thread_time()
    y1 = run(seed)
    y1.pow(2).sum().backward()
    out = time.perf_counter() - w, time.thread_time() - c
    del y1
    return out


def run_config(shape, n, ms, timing, log):
    """Warm-up of every method, then interleaved rounds (each: every method's forward, then its
    forward + backward). Slow methods (warm-up fwd + bwd above ``timing["slow"]`` s) get
    ``timing["slow_reps"]`` repeats instead of ``timing["reps"]``."""
    prob = make_problem(shape)
    padd = make_problem(shape)  # the additive problem: same networks, g of t
    rows, runs = [], {}
    seed = 1000
    n_warm = min(n, 10)
    for m in ms:
        row = Row(shape, n, m.key, m.label, m.lib)
        rows.append(row)
        if m.missing:
            row.failure = f"skipped: {m.missing}"
            continue
        p = padd if m.additive else prob
        try:
            # warm-up on a short solve (same shapes, same code paths); its time, scaled to n steps,
            # decides the number of repeats
            run = m.make(p, n)
            try:
                warm = m.make(p, n_warm)
                time_fwd(warm, seed)
                t_fb = time_fb(warm, seed + 1, p.params)[0] * n / n_warm
            except RecursionError:  # torchsde's BrownianTree at some step sizes: warm up at n steps
                time_fwd(run, seed)
                t_fb = time_fb(run, seed + 1, p.params)[0]
        except Exception as e:  # reported, not fatal
            row.failure = f"{type(e).__name__}: {str(e).splitlines()[0][:140]}"
            log(f"  {str(shape):14s} {n:5d} {m.label:52s} FAILED {row.failure}")
            continue
        reps = timing["slow_reps"] if t_fb > timing["slow"] else timing["reps"]
        runs[m.key] = (run, p.params, reps)
    samples = {k: [] for k in runs}
    rounds = max((r for _, _, r in runs.values()), default=0)
    for k in range(rounds):
        for key, (run, params, reps) in runs.items():
            if k >= reps:
                continue
            seed += 2
            gc.collect()
            a = time_fwd(run, seed)
            gc.collect()
            b = time_fb(run, seed + 1, params)
            samples[key].append((a, b))
    for row in rows:
        s = samples.get(row.key)
        if not s:
            continue
        row.fwd = statistics.median(a[0] for a, _ in s)
        row.fwd_cpu = statistics.median(a[1] for a, _ in s)
        row.fb = statistics.median(b[0] for _, b in s)
        row.fb_cpu = statistics.median(b[1] for _, b in s)
        row.reps = len(s)
        log(
            f"  {str(shape):14s} {n:5d} {row.label:52s} fwd {row.fwd * 1e3:9.1f} ms  fwd+bwd {row.fb * 1e3:9.1f} ms "
            f"(n={row.reps})"
        )
    return rows


# ---------------------------------------------------------------------------------------------
# agreement in law


@dataclass
class LawCheck:
    title: str
    a: str  # label
    b: str
    z_mean: float  # max over components of |mean_a - mean_b| / standard error
    z_std: float  # the same for the standard deviations
    mean_a: list
    std_a: list
    failure: str = ""


def moments(y):
    """Per component: mean, std and the standard errors of both (the std's from the fourth moment)."""
    y = y.double()
    n = y.shape[0]
    m = y.mean(0)
    c = y - m
    var = c.pow(2).mean(0)
    m4 = c.pow(4).mean(0)
    sd = var.sqrt()
    se_m = (var / n).sqrt()
    se_var = ((m4 - var**2).clamp_min(0) / n).sqrt()
    se_sd = se_var / (2 * sd)
    return m, sd, se_m, se_sd


def law_checks(ms, n_samples, n_steps, log):
    """Every torchnde method against its torchsde counterpart (and the hand loop against torchsde
    euler) on one initial condition repeated ``n_samples`` times, (16, 2, 32) networks: the mean
    and std of y(1) per component must agree within Monte-Carlo error."""
    shape = (n_samples, 2, 32)
    y0 = make_problem((1, 2, 32)).y0.expand(n_samples, 2).contiguous()
    prob = make_problem(shape, y0)
    by_key = {m.key: m for m in ms}
    pairs = [("hand loop vs torchsde euler", "hand", "ts_euler")]
    for title, tks, tsk in PAIRS:
        pairs += [(title, tk, tsk) for tk in tks]
    seen, out = set(), []
    for title, ka, kb in pairs:
        if (ka, kb) in seen:
            continue
        seen.add((ka, kb))
        ma, mb = by_key[ka], by_key[kb]
        if ma.missing or mb.missing:
            out.append(LawCheck(title, ma.label, mb.label, math.nan, math.nan, [], [], ma.missing or mb.missing))
            continue
        try:
            with torch.no_grad():
                ya = ma.make(prob, n_steps)(LAW_SEED)
                yb = mb.make(prob, n_steps)(LAW_SEED + 7)
        except Exception as e:
            out.append(LawCheck(title, ma.label, mb.label, math.nan, math.nan, [], [], f"{type(e).__name__}: {e}"))
            continue
        ma_, sa, sema, sesa = moments(ya)
        mb_, sb, semb, sesb = moments(yb)
        zm = float(((ma_ - mb_).abs() / (sema**2 + semb**2).sqrt()).max())
        zs = float(((sa - sb).abs() / (sesa**2 + sesb**2).sqrt()).max())
        out.append(LawCheck(title, ma.label, mb.label, zm, zs, ma_.tolist(), sa.tolist()))
        log(f"  law: {ma.label} vs {mb.label}: max |z| mean {zm:.2f}, std {zs:.2f}")
    return out


# ---------------------------------------------------------------------------------------------
# report


def fmt_ms(s):
    if not math.isfinite(s):
        return "–"
    return f"{s * 1e3:.2f}" if s < 0.1 else f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def fmt_x(x):
    return "–" if not math.isfinite(x) else f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def get(rows, shape, n, key):
    return next((r for r in rows if r.shape == shape and r.n == n and r.key == key and not r.failure), None)


#: ratios and targets use the thread CPU time (``time.thread_time``): other processes on a shared
#: machine disturb it much less than wall time (both are in the tables)
RATIO_CPU = True


def ratio(a, b, attr):
    if a is None or b is None:
        return math.nan
    attr = f"{attr}_cpu" if RATIO_CPU else attr
    return getattr(a, attr) / getattr(b, attr)


def targets(rows, configs):
    """(target, where, measured, met) rows: the speed issue's targets."""
    out = []

    def fin(*xs):
        return all(math.isfinite(x) for x in xs)

    # Euler-Maruyama with the default tree: <= 1.3x the hand loop forward, <= 1.2x forward + backward
    for shape, n in configs:
        hand, r = get(rows, shape, n, "hand"), get(rows, shape, n, "tn_euler_tree")
        fw, fb = ratio(r, hand, "fwd"), ratio(r, hand, "fb")
        out.append(
            ("EM + VirtualBrownianTree (default) <= 1.3x the hand loop fwd, <= 1.2x fwd+bwd", f"{shape}, {n} steps",
             f"fwd {fmt_x(fw)}, fwd+bwd {fmt_x(fb)}", (fw <= 1.3 and fb <= 1.2) if fin(fw, fb) else None)
        )  # fmt: skip
    # every torchnde-vs-torchsde cell >= 1.0x; >= 1.5x at 1000 steps (the SRK-diagonal row compares
    # different methods and is left out)
    for title, tks, tsk in PAIRS:
        if tsk == "ts_srk":
            continue
        for tk in tks:
            vals, oks = [], []
            for shape, n in configs:
                a, b = get(rows, shape, n, tk), get(rows, shape, n, tsk)
                fw, fb = ratio(b, a, "fwd"), ratio(b, a, "fb")
                if fin(fw, fb):
                    lim = 1.5 if n >= 1000 else 1.0
                    vals.append(f"{shape[0]}/{n}: {fw:.2f}/{fb:.2f}")
                    oks.append(fw >= lim and fb >= lim)
            label = next((r.label for r in rows if r.key == tk), tk)
            out.append(
                (f"{label}: >= 1.0x torchsde (>= 1.5x at 1000 steps)", title,
                 ("batch/steps: fwd/fwd+bwd " + ", ".join(vals)) if vals else "not run", all(oks) if oks else None)
            )  # fmt: skip
    return out


def write_md(path, args, info, rows, configs, laws, tgts, timing, elapsed):
    L = []
    L.append("# torchnde SDE benchmark results")
    L.append("")
    L.append(
        f"Generated by `python benchmarks/sde.py{' --quick' if args.quick else ''}` in {elapsed[0]:.0f} s wall, "
        f"{elapsed[1]:.0f} s CPU of this process; 1-minute load average {elapsed[2]:.2f} at the start and "
        f"{elapsed[3]:.2f} at the end."
    )
    if args.quick:
        L.append("")
        L.append("**Quick (smoke-test) mode: few repeats. These numbers mean little.**")
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append("| | |")
    L.append("|---|---|")
    for k, v in info.items():
        L.append(f"| {k} | {v} |")
    L.append("")
    L.append("## Setup")
    L.append("")
    L.append(
        "dy = f(y) dt + g(y) dW on [0, 1] in float32, constant steps h = 1/steps. Drift f: "
        "Linear(d, w)-tanh-Linear(w, w)-tanh-Linear(w, d). Diagonal diffusion g_i(y) = "
        "sigmoid(sum_k v_ik tanh(u_ik y_i + a_ik) + c_i): one 1-w-1 MLP per component, so g_i depends on y_i only "
        "(diagonal noise that commutes, as Milstein and SRID2 need). Additive variant (SRA1, ShARK, torchsde srk "
        "with noise_type='additive'): the same networks with t in place of y_i, so g = g(t); torchsde gets it as the "
        "(batch, d, d) diagonal matrix its additive noise type needs. y0 ~ N(0, 1), PyTorch default "
        f"initialisation with seed {MLP_SEED}. One process, one thread, every library on the same modules."
    )
    L.append("")
    L.append(
        f"Each timing is the median over n interleaved rounds (n = {timing['reps']}; {timing['slow_reps']} for "
        f"methods whose forward + backward takes more than {timing['slow']:g} s), after one warm-up; every round runs "
        "each method's forward (under `torch.no_grad()`) and then its forward + backward (loss = sum(y(1)^2), "
        "gradients for all parameters of f and g). **Every run draws a fresh Brownian sample, and building the "
        "Brownian object is inside the timed region** (as in training, where each iteration samples new noise): "
        "`torch.randn` of all increments for the hand loop, `VirtualBrownianTree(...)` / `BrownianGrid.uniform(...)` "
        "for torchnde, `BrownianInterval(...)` / `BrownianTree(...)` for torchsde."
    )
    L.append("")
    L.append(
        "torchnde: `solve(MultiTerm(ODETerm(f), ControlTerm(g, path, noise='diagonal')), solver, 0, 1, y0, dt0=h)` "
        "with `DirectAdjoint` (backprop through the steps), except reversible Heun (`ReversibleAdjoint`). "
        "`VirtualBrownianTree` default tol is (t1 - t0) 2^-20 (depth 20); with tol = h/2 the leaves are no longer "
        "than half a step, so the step end points (spaced h >= tol apart) lie in different leaves and their "
        "increments are exact in law, with a tree of depth log2(2 steps) only. torchsde: `sdeint(sde, y0, ts, "
        "method=..., dt=h, bm=...)` (backprop through the solver), except reversible Heun (`sdeint_adjoint(..., "
        "adjoint_method='adjoint_reversible_heun')`); `ts` is float64 (with float32 `ts` torchsde's accumulated "
        "time stops ~1e-6 short of t1 and it takes one extra tiny step; at 100 steps that step lands exactly when "
        "`BrownianInterval` ends its warm-up and sizes its dependency tree from the last step, building ~50 000 "
        "nodes: ~2.8 s for a 100-step solve at (16, 2, 32)). `BrownianInterval` is built with the default "
        "arguments sdeint itself uses (no `dt` hint, cache 45), `BrownianTree` with its default tol 1e-6."
    )
    L.append("")
    L.append("## Times")
    L.append("")
    L.append(
        "All ratios (here, in the comparison tables and in the targets) are of thread CPU times "
        "(`time.thread_time`), which other processes on a shared machine disturb much less than wall time; both "
        "are listed. 'this / hand' divides this row's time by the hand-written loop's (1.0 = the floor). "
        + (
            "At (256, 16, 64) with 1000 steps only the Euler-Maruyama group runs (the other solvers' times grow "
            "linearly in the steps, as the other configurations show), to keep the whole run near 10 minutes."
            if not args.quick
            else ""
        )
    )
    L.append("")
    L.append("![speed-ups](sde.png)")
    L.append("")
    L.append(
        "| (batch, state, hidden) | steps | method | fwd [ms] | fwd+bwd [ms] | fwd CPU [ms] | fwd+bwd CPU [ms] | n | this / hand (fwd, fwd+bwd) |"
    )
    L.append("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for shape, n in configs:
        hand = get(rows, shape, n, "hand")
        for r in (r for r in rows if r.shape == shape and r.n == n):
            if r.failure:
                L.append(f"| {shape} | {n} | {r.label} | {r.failure} | | | | | |")
                continue
            rh = f"{fmt_x(ratio(r, hand, 'fwd'))}, {fmt_x(ratio(r, hand, 'fb'))}" if r.lib == "torchnde" else ""
            L.append(
                f"| {shape} | {n} | {r.label} | {fmt_ms(r.fwd)} | {fmt_ms(r.fb)} | {fmt_ms(r.fwd_cpu)} | "
                f"{fmt_ms(r.fb_cpu)} | {r.reps} | {rh} |"
            )
    L.append("")
    L.append("## torchnde vs torchsde, solver by solver (torchsde time / torchnde time)")
    L.append("")
    hdr = " | ".join(f"{s} {n} steps fwd | fwd+bwd" for s, n in configs)
    L.append(f"| comparison | torchnde | torchsde | {hdr} |")
    L.append("|---|---|---|" + "---:|---:|" * len(configs))
    for title, tks, tsk in PAIRS:
        for tk in tks:
            la = next((r.label for r in rows if r.key == tk), tk)
            lb = next((r.label for r in rows if r.key == tsk), tsk)
            cells = []
            for shape, n in configs:
                a, b = get(rows, shape, n, tk), get(rows, shape, n, tsk)
                cells.append(f"{fmt_x(ratio(b, a, 'fwd'))} | {fmt_x(ratio(b, a, 'fb'))}")
            L.append(f"| {title} | {la} | {lb} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("Also against torchsde euler + BrownianTree (torchsde time / torchnde Euler + VirtualBrownianTree time):")
    L.append("")
    L.append("| (batch, state, hidden) | steps | fwd | fwd+bwd |")
    L.append("|---|---:|---:|---:|")
    for shape, n in configs:
        a, b = get(rows, shape, n, "tn_euler_tree"), get(rows, shape, n, "ts_euler_tree")
        L.append(f"| {shape} | {n} | {fmt_x(ratio(b, a, 'fwd'))} | {fmt_x(ratio(b, a, 'fb'))} |")
    L.append("")
    if laws:
        L.append("## Agreement in law")
        L.append("")
        L.append(
            f"So that like is compared with like: each pair solved with {args.law_steps} steps on one initial "
            f"condition repeated {args.law_samples} times (the (·, 2, 32) networks), with independent Brownian "
            "samples. |z| is the largest over the 2 components of |difference| / standard error, for the mean and "
            "the standard deviation of y(1) (standard error of the std from the fourth moment). |z| < 4 passes. "
            "Both libraries' versions of the same scheme have the same law exactly; pairs of different schemes "
            "(SRK diagonal: SRID2 vs Milstein) agree up to their weak errors."
        )
        L.append("")
        L.append("| comparison | A | B | mean y(1) (A) | std y(1) (A) | max \\|z\\| mean | max \\|z\\| std | agree? |")
        L.append("|---|---|---|---|---|---:|---:|---|")
        for c in laws:
            if c.failure:
                L.append(f"| {c.title} | {c.a} | {c.b} | {c.failure} | | | | |")
                continue
            ok = "yes" if max(c.z_mean, c.z_std) < 4 else "**no**"
            mean = ", ".join(f"{x:.3f}" for x in c.mean_a)
            std = ", ".join(f"{x:.3f}" for x in c.std_a)
            L.append(f"| {c.title} | {c.a} | {c.b} | {mean} | {std} | {c.z_mean:.2f} | {c.z_std:.2f} | {ok} |")
        L.append("")
    L.append("## Targets")
    L.append("")
    L.append("| target | where | measured | met? |")
    L.append("|---|---|---|---|")
    for name, where, val, ok in tgts:
        L.append(f"| {name} | {where} | {val} | {'n/a' if ok is None else 'yes' if ok else '**no**'} |")
    L.append("")
    path.write_text("\n".join(L))


def plot(path, rows, configs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    # left: torchsde / torchnde per comparison (fwd + bwd)
    comps = [(title, tk, tsk) for title, tks, tsk in PAIRS for tk in tks]
    width = 0.8 / len(configs)
    ax = axes[0]
    for j, (shape, n) in enumerate(configs):
        vals = [ratio(get(rows, shape, n, tsk), get(rows, shape, n, tk), "fb") for _, tk, tsk in comps]
        xs = [i + (j - (len(configs) - 1) / 2) * width for i in range(len(comps))]
        ax.bar(xs, [v if math.isfinite(v) else 0 for v in vals], width, label=f"{shape}, {n} steps")
    ax.axhline(5, color="k", linestyle="--", linewidth=1, label="target 5x")
    ax.axhline(1, color="gray", linewidth=0.8)
    labels = []
    for _title, tk, _tsk in comps:
        lab = next((r.label for r in rows if r.key == tk), tk).replace("torchnde ", "")
        labels.append(lab.replace(" + VirtualBrownianTree", " + VBT").replace(" + BrownianGrid.uniform", " + grid"))
    ax.set_xticks(range(len(comps)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("torchsde time / torchnde time (fwd + bwd)")
    ax.set_title("speed-up over the torchsde counterpart")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    # right: Euler variants relative to the hand loop
    ax = axes[1]
    keys = ["tn_euler_tree", "tn_euler_tree_h2", "tn_euler_grid", "ts_euler", "ts_euler_tree"]
    for j, (shape, n) in enumerate(configs):
        hand = get(rows, shape, n, "hand")
        vals = [ratio(get(rows, shape, n, k), hand, "fb") for k in keys]
        xs = [i + (j - (len(configs) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(xs, [v if math.isfinite(v) else 0 for v in vals], width, label=f"{shape}, {n} steps")
    ax.axhline(1.5, color="k", linestyle="--", linewidth=1, label="target 1.5x (torchnde + tree)")
    ax.axhline(1, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(
        ["torchnde tree", "torchnde tree tol=h/2", "torchnde grid", "torchsde interval", "torchsde tree"],
        rotation=25, ha="right", fontsize=8,
    )  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("time / hand-written loop (fwd + bwd)")
    ax.set_title("Euler-Maruyama against the hand-written loop")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def profile_euler(log, shape=(16, 2, 32), n=100, reps=10):
    prob = make_problem(shape)
    for key in ("tn_euler_tree", "tn_euler_grid"):
        m = next(m for m in methods() if m.key == key)
        run = m.make(prob, n)
        title = f"cProfile of {reps} forward + backward runs, {m.label}, {shape}, {n} steps"
        log_profile(lambda i, run=run: time_fb(run, i, prob.params), reps, title, log, limit=22)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke mode: about a minute")
    ap.add_argument("--out", type=Path, default=None, help="directory for sde.md and sde.png")
    ap.add_argument("--profile", action="store_true", help="print cProfiles of torchnde Euler")
    args = ap.parse_args(argv)
    if args.out is None:  # a smoke run must never overwrite the committed results
        args.out = Path(tempfile.mkdtemp(prefix="torchnde-sde-")) if args.quick else HERE
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    start, start_cpu, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    # (shape, steps, methods: None for all, else the Euler-Maruyama group only)
    if args.quick:
        plan = [((16, 2, 32), 50, None), ((256, 16, 64), 20, EULER_KEYS)]
        timing = dict(reps=2, slow_reps=1, slow=1.0)
        args.law_samples, args.law_steps = 1024, 20
    else:
        plan = [((16, 2, 32), 100, None), ((16, 2, 32), 1000, None), ((256, 16, 64), 100, None)]
        plan.append(((256, 16, 64), 1000, EULER_KEYS))
        timing = dict(reps=5, slow_reps=3, slow=1.5)
        args.law_samples, args.law_steps = 8192, 100
    configs = [(shape, n) for shape, n, _ in plan]
    ms = methods()
    for m in ms:
        if m.missing:
            log(f"note: {m.label} skipped ({m.missing})")
    info = machine_info(torchsde=torchsde.__version__)
    rows = []
    for shape, n, keys in plan:
        log(f"{shape}, {n} steps")
        rows += run_config(shape, n, [m for m in ms if keys is None or m.key in keys], timing, log)
    log("agreement in law")
    laws = law_checks(ms, args.law_samples, args.law_steps, log)
    if args.profile:
        profile_euler(log)
    tgts = targets(rows, configs)
    elapsed = (time.perf_counter() - start, time.process_time() - start_cpu, load0, os.getloadavg()[0])
    write_md(args.out / "sde.md", args, info, rows, configs, laws, tgts, timing, elapsed)
    with contextlib.suppress(ImportError):
        plot(args.out / "sde.png", rows, configs)
    log("targets:")
    for name, where, val, ok in tgts:
        log(f"  [{'n/a' if ok is None else 'ok' if ok else 'MISS'}] {name} at {where}: {val}")
    log(f"wrote {args.out / 'sde.md'} ({elapsed[0]:.0f} s wall, {elapsed[1]:.0f} s CPU)")


if __name__ == "__main__":
    main()
