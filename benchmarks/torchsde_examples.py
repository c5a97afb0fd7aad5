"""torchsde's own examples, run with torchsde and through ``torchnde.compat.torchsde``.

The three example scripts of torchsde's repository (``examples/latent_sde_lorenz.py``,
``examples/cont_ddpm.py``, ``examples/sde_gan.py``) are loaded from a clone of torchsde at run time
(nothing of them is copied here) and run with reduced sizes and a few training iterations, once
with ``import torchsde`` and once with ``import torchnde.compat.torchsde as torchsde``: the
example module's global ``torchsde`` is swapped between the two, so the same code, the same models
and the same seeds run through both front-ends in the same process. Rounds are interleaved (the
order of the front-ends alternates), every iteration is timed in thread CPU time
(``time.thread_time``), and the table gives the median time per iteration and the ratio
torchsde / torchnde (> 1: the front-end is faster than torchsde).

Usage::

    python benchmarks/torchsde_examples.py                 # ~2-3 minutes on 2 cores, writes torchsde_examples.md here
    python benchmarks/torchsde_examples.py --quick         # smoke mode (~30 s; writes to a temporary directory)
    python benchmarks/torchsde_examples.py --examples DIR  # torchsde's examples folder (default: $TORCHSDE_EXAMPLES,
                                                           # else ../peers/torchsde/examples next to this repository)
    python benchmarks/torchsde_examples.py --profile       # also print a cProfile of each case through the front-end

The examples need packages this benchmark does not install: ``fire`` (their command lines) and,
for ``cont_ddpm.py``, ``torchvision`` (MNIST) and ``kornia``/``einops`` (its U-Net). Missing ones
are replaced by empty modules: the command line and the data set are not used, and the U-Net is
replaced by a small MLP denoiser written here (see ``TinyDenoiser``); everything that touches
``torchsde`` is the example's own code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

torch.set_num_threads(1)
with contextlib.suppress(RuntimeError):  # only settable before any inter-op work
    torch.set_num_interop_threads(1)

import torchsde  # noqa: E402
from _common import log_profile, machine_info  # noqa: E402  (this folder, on sys.path)

import torchnde.compat.torchsde as compat  # noqa: E402

FRONTENDS = {"torchsde": torchsde, "torchnde": compat}
_PACKAGE = "_torchsde_examples"


# ---------------------------------------------------------------------------------------------
# loading the examples


def examples_dir(arg: str | None) -> Path | None:
    """torchsde's ``examples`` folder: ``arg`` if given, else ``$TORCHSDE_EXAMPLES`` if set, else a
    clone of torchsde in ``../peers/torchsde`` next to this repository (None if it does not exist)."""
    if arg is not None:  # asked for: that folder or nothing
        candidates = [arg]
    elif os.environ.get("TORCHSDE_EXAMPLES"):
        candidates = [os.environ["TORCHSDE_EXAMPLES"]]
    else:
        candidates = [HERE.parent.parent / "peers" / "torchsde" / "examples"]
    for c in candidates:
        if c and (Path(c) / "latent_sde_lorenz.py").is_file():
            return Path(c)
    return None


def _stub(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__doc__ = "an empty stand-in (torchsde_examples.py): the example's use of it is not run"
    return mod


def load_example(folder: Path, name: str) -> types.ModuleType:
    """Execute ``folder/name.py`` as a module of a stand-in package (for its ``from . import unet``),
    with empty modules for the optional packages that are not installed."""
    stubs = {}
    for opt in ("fire", "torchvision"):
        if importlib.util.find_spec(opt) is None:
            stubs[opt] = _stub(opt)
    pkg = _stub(_PACKAGE)
    pkg.__path__ = []  # a package, but nothing is imported from the folder itself
    stubs[_PACKAGE] = pkg
    unet = _stub(f"{_PACKAGE}.unet")  # the U-Net needs kornia and einops; replaced by TinyDenoiser
    stubs[f"{_PACKAGE}.unet"] = pkg.unet = unet
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        mod = types.ModuleType(f"{_PACKAGE}.{name}")
        mod.__file__ = str(folder / f"{name}.py")
        mod.__package__ = _PACKAGE
        code = compile((folder / f"{name}.py").read_text(), mod.__file__, "exec")
        exec(code, mod.__dict__)  # noqa: S102 - torchsde's example, loaded to be benchmarked
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod


@contextlib.contextmanager
def frontend(mod: types.ModuleType, name: str):
    """Run ``mod`` with its global ``torchsde`` bound to the front-end ``name`` (the effect of
    editing its ``import torchsde`` line)."""
    old = mod.torchsde
    mod.torchsde = FRONTENDS[name]
    try:
        yield
    finally:
        mod.torchsde = old


# ---------------------------------------------------------------------------------------------
# the cases: setup(frontend) -> step() (one training iteration / one sampling call)


class TinyDenoiser(torch.nn.Module):
    """The stand-in for cont_ddpm.py's U-Net (which needs kornia and einops): ``(t, x) ->`` an
    image of ``x``'s shape, by an MLP on the flattened image and ``t``."""

    def __init__(self, size: int, hidden: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(size + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, size)
        )  # fmt: skip

    def forward(self, t, x):
        flat = x.flatten(start_dim=1)
        out = self.net(torch.cat([flat, t.reshape(-1, 1).expand(flat.shape[0], 1).to(flat)], dim=1))
        return out.view_as(x)


@dataclass
class Case:
    key: str
    example: str  # module name
    label: str
    what: str  # what one iteration is
    setup: callable  # (mod, seed, quick) -> step callable (run inside frontend())
    iters: int = 3  # timed iterations per round
    notes: list = field(default_factory=list)


def lorenz_data(mod, seed, quick):
    """One call of the example's data generation: ``StochasticLorenz().sample(...)`` (torchsde's
    default method for this Itô diagonal SDE, ``"srk"``, with the default ``dt=1e-3``)."""
    batch, t1 = (8, 0.25) if quick else (32, 0.5)
    torch.manual_seed(seed)
    y0 = torch.randn(batch, 3)
    ts = torch.linspace(0.0, t1, 25)

    def step():
        return mod.StochasticLorenz().sample(y0, ts, 0.01, normalize=True)

    return step


def lorenz_train(adjoint: bool):
    def setup(mod, seed, quick):
        batch = 8 if quick else (16 if adjoint else 32)
        n, t1 = (50, 1.0) if adjoint else (100, 2.0)
        torch.manual_seed(seed)
        ts = torch.linspace(0.0, t1, n)
        xs = torch.randn(n, batch, 3)  # normalised data stand-in (its own generation is timed separately)
        model = mod.LatentSDE(data_size=3, latent_size=4, context_size=16, hidden_size=32)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        kl = mod.LinearScheduler(iters=100)

        def step():
            model.zero_grad()
            log_pxs, log_ratio = model(xs, ts, 0.01, adjoint, "euler")
            loss = -log_pxs + log_ratio * kl.val
            loss.backward()
            opt.step()
            kl.step()
            return loss.detach()

        return step

    if adjoint:
        setup.__doc__ = (
            "The example's training iteration with its option ``adjoint=True``: ``sdeint_adjoint(..., "
            "adjoint_params=(ctx, *parameters), dt=1e-2, logqp=True, method='euler')`` (torchsde's default "
            "adjoint method for this Itô SDE: ``'milstein'``; torchnde: the adjoint of the Stratonovich form, "
            "midpoint), batch 16, context 16, hidden 32, latent 4, 50 observation times on [0, 1] (100 steps), Adam."
        )
    else:
        setup.__doc__ = (
            "The example's training iteration (its ``main`` loop body) at reduced size: batch 32 (example: "
            "1024), context 16 (64), hidden 32 (128), latent 4, the example's 100 observation times on [0, 2], "
            "``sdeint(..., dt=1e-2, logqp=True, method='euler')`` (200 steps), backward, Adam."
        )
    return setup


def ddpm_sample(mod, seed, quick):
    """The example's reverse-SDE sampling (``ReverseDiffeqWrapper.sde_sample_final``: Stratonovich,
    diagonal noise, torchsde's default ``"midpoint"``, ``dt=1e-2`` over ``[-1, 0]`` with float32
    times) of 16 MNIST-sized images (1, 28, 28), with the small MLP denoiser in place of the U-Net."""
    batch = 4 if quick else 16
    torch.manual_seed(seed)
    forward = mod.ScoreMatchingSDE(denoiser=TinyDenoiser(28 * 28, 128), input_size=(1, 28, 28))
    reverse = mod.ReverseDiffeqWrapper(forward)

    def step():
        return reverse.sde_sample_final(batch_size=batch)

    return step


def gan_train(mod, seed, quick):
    """The example's training iteration (its ``main`` loop body): the generator's
    ``sdeint_adjoint(..., method="reversible_heun", dt=1.0, adjoint_method="adjoint_reversible_heun")``
    over 64 times (63 steps, general noise of 3 channels, hidden 16), the neural-CDE discriminator
    (``torchcde.cdeint``, which calls the real torchsde in both runs) on generated and real samples,
    backward, Adadelta, weight clipping; the example's sizes except batch 128 (example: 1024). The
    data are the example's ``get_data`` (made once per process with torchsde, untimed)."""
    batch = 32 if quick else 128
    ts, data_size, loader = _gan_data(mod, batch)
    torch.manual_seed(seed)
    generator = mod.Generator(data_size, 5, 3, 16, 16, 1)
    discriminator = mod.Discriminator(data_size, 16, 16, 1)
    with torch.no_grad():
        for p in generator._initial.parameters():
            p *= 3
        for p in generator._func.parameters():
            p *= 0.5
    g_opt = torch.optim.Adadelta(generator.parameters(), lr=2e-4, weight_decay=0.01)
    d_opt = torch.optim.Adadelta(discriminator.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    data = loader.dataset.tensors[0]

    def step():
        (real,) = (data[torch.randint(0, data.shape[0], (batch,), generator=gen)],)
        generated = generator(ts, batch)
        loss = discriminator(generated) - discriminator(real)
        loss.backward()
        for p in generator.parameters():
            p.grad *= -1
        g_opt.step()
        d_opt.step()
        g_opt.zero_grad()
        d_opt.zero_grad()
        with torch.no_grad():
            for m in discriminator.modules():
                if isinstance(m, torch.nn.Linear):
                    lim = 1 / m.out_features
                    m.weight.clamp_(-lim, lim)
        return loss.detach()

    return step


def gan_generator(mod, seed, quick):
    """The SDE-GAN's generator alone (the part of the iteration that calls ``torchsde``): forward
    (``sdeint_adjoint`` with reversible Heun, 63 steps, batch 128) and backward of the sum of squares of
    its output."""
    batch = 32 if quick else 128
    torch.manual_seed(seed)
    generator = mod.Generator(2, 5, 3, 16, 16, 1)
    ts = torch.linspace(0, 63, 64)

    def step():
        generator.zero_grad()
        loss = generator(ts, batch).pow(2).sum()
        loss.backward()
        return loss.detach()

    return step


_GAN_DATA: dict = {}


def _gan_data(mod, batch):
    if batch not in _GAN_DATA:
        old = mod.torchsde
        mod.torchsde = torchsde
        try:
            torch.manual_seed(0)
            _GAN_DATA[batch] = mod.get_data(batch_size=batch, device="cpu")
        finally:
            mod.torchsde = old
    return _GAN_DATA[batch]


def cases():
    return [
        Case(
            "lorenz_data", "latent_sde_lorenz", "latent SDE (Lorenz): data, `StochasticLorenz.sample`",
            "one sdeint call (srk, dt=1e-3, 500 steps, batch 32)", lorenz_data, iters=2,
        ),
        Case(
            "lorenz_train", "latent_sde_lorenz", "latent SDE (Lorenz): training iteration, `sdeint` (logqp)",
            "forward (euler, 200 steps, logqp) + backward + Adam", lorenz_train(False), iters=3,
        ),
        Case(
            "lorenz_train_adj", "latent_sde_lorenz",
            "latent SDE (Lorenz): training iteration, `sdeint_adjoint` (logqp)",
            "forward (euler, 100 steps, logqp) + adjoint backward + Adam", lorenz_train(True), iters=2,
        ),
        Case(
            "ddpm_sample", "cont_ddpm", "continuous-time DDPM: reverse-SDE sampling, `sdeint`",
            "one sde_sample_final (midpoint, 100 steps, 16 x 784)", ddpm_sample, iters=3,
        ),
        Case(
            "gan_train", "sde_gan", "SDE-GAN: training iteration, `sdeint_adjoint` (reversible Heun)",
            "generator (63 steps) + CDE discriminator x2 + backward + Adadelta", gan_train, iters=3,
        ),
        Case(
            "gan_generator", "sde_gan", "SDE-GAN: generator alone, `sdeint_adjoint` (reversible Heun)",
            "generator forward (63 steps) + backward", gan_generator, iters=4,
        ),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# timing


@dataclass
class Result:
    case: Case
    times: dict = field(default_factory=lambda: {k: [] for k in FRONTENDS})
    losses: dict = field(default_factory=lambda: {k: [] for k in FRONTENDS})
    failure: str = ""

    def median(self, fe):
        return statistics.median(self.times[fe]) if self.times[fe] else math.nan


def _value(out) -> float:
    if isinstance(out, torch.Tensor):
        return float(out.detach().float().abs().mean())
    return math.nan


def run_case(mod, case: Case, rounds: int, quick: bool, log) -> Result:
    """``rounds`` interleaved rounds; in each, each front-end (alternating which goes first) builds
    the case from the round's seed, runs one untimed warm-up iteration, then ``case.iters`` timed
    ones."""
    res = Result(case)
    for r in range(rounds):
        order = list(FRONTENDS) if r % 2 == 0 else list(reversed(FRONTENDS))
        for fe in order:
            with frontend(mod, fe):
                step = case.setup(mod, 100 + r, quick)
                step()  # warm-up (first-call costs: module caches, lazy imports)
                for _ in range(case.iters):
                    c = time.thread_time()
                    out = step()
                    res.times[fe].append(time.thread_time() - c)
                    res.losses[fe].append(_value(out))
    a, b = res.median("torchsde"), res.median("torchnde")
    log(f"  {case.key:18s} torchsde {a * 1e3:8.1f} ms   torchnde {b * 1e3:8.1f} ms   ratio {a / b:5.2f}x")
    return res


# ---------------------------------------------------------------------------------------------
# report


def write_md(path: Path, info: dict, results: list, folder: Path, elapsed, rounds, quick, load):
    lines = [
        "# torchsde's own examples through `torchnde.compat.torchsde`",
        "",
        f"Generated by `python benchmarks/torchsde_examples.py{' --quick' if quick else ''}` in {elapsed[0]:.0f} s "
        f"wall, {elapsed[1]:.0f} s CPU of this process; 1-minute load average {load[0]:.2f} at the start and "
        f"{load[1]:.2f} at the end.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        "## Setup",
        "",
        f"torchsde's example scripts, loaded from `{folder.name}/` of a clone of torchsde (not copied into this "
        "repository), each run twice in the same process: with `import torchsde` and with "
        "`import torchnde.compat.torchsde as torchsde` (the example module's global `torchsde` is swapped). "
        "Same code, same models, same seeds; the Brownian samples differ (each front-end draws its own). "
        f"{rounds} interleaved rounds (the front-ends' order alternates); in each, each front-end builds the case "
        "from the round's seed, runs one untimed warm-up iteration and then the timed ones. Times are thread CPU "
        "time (`time.thread_time`) per iteration, the median over all timed iterations; one thread. "
        "**ratio = torchsde / torchnde** (> 1: faster through the front-end).",
        "",
        "Sizes are reduced so that the whole run takes a few minutes on 2 cores. `fire`, `torchvision`, `kornia` "
        "and `einops` are not needed: missing modules are empty stand-ins (the command lines and MNIST are not "
        "used), and cont_ddpm.py's U-Net is replaced by a small MLP denoiser (784+1 -> 128 -> 784) written in the "
        "benchmark; everything that calls `torchsde` is the example's own code.",
        "",
        "## Results",
        "",
        "| example | one iteration | torchsde [ms] | torchnde [ms] | ratio | timed iterations |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for res in results:
        c = res.case
        if res.failure:
            lines.append(f"| {c.label} | {c.what} | failed: {res.failure} | | | |")
            continue
        a, b = res.median("torchsde"), res.median("torchnde")
        lines.append(
            f"| {c.label} | {c.what} | {a * 1e3:.1f} | {b * 1e3:.1f} | **{a / b:.2f}x** | {len(res.times['torchnde'])} |"
        )
    lines += [
        "",
        "Where torchsde is several times slower, the causes are in torchsde (profiled): in the DDPM sampling, "
        "with float32 `ts` (what the example passes) its accumulated time ends a rounding error short of `ts[-1]` "
        "and it takes one more, tiny step; its `BrownianInterval` then sizes its dependency tree from that step "
        "and builds ~50 000 nodes (`_split_exact` is most of the profile). The front-end takes the same extra step "
        "(its results are torchsde's to rounding error) at the cost of any other step. In the Lorenz data (srk) "
        "and the latent SDE's training iteration, torchsde's per-step Python (its srk step) and its "
        "`BrownianInterval` searches (~80 000-90 000 `_loc_inner` calls per iteration) are a visible share. In "
        "the SDE-GAN's full iteration most of the time is the discriminator, which calls torchcde (and through it "
        "torchsde) in both runs.",
    ]
    lines += ["", "### What each case runs", ""]
    for res in results:
        doc = " ".join((res.case.setup.__doc__ or "").split())
        lines.append(f"- **{res.case.label}**: {doc}")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke mode: smaller sizes, one round")
    ap.add_argument("--out", type=Path, default=None, help="directory for torchsde_examples.md")
    ap.add_argument("--examples", default=None, help="torchsde's examples folder")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick: 1)")
    ap.add_argument("--only", default=None, help="comma-separated case keys")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of each case through the front-end")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    folder = examples_dir(args.examples)
    if folder is None:
        log(
            "torchsde's examples not found (pass --examples DIR or set TORCHSDE_EXAMPLES to the examples/ folder of "
            "a clone of https://github.com/google-research/torchsde); skipped"
        )
        return 0
    if args.out is None:  # a smoke run must never overwrite the committed results
        args.out = Path(tempfile.mkdtemp(prefix="torchnde-tsde-examples-")) if args.quick else HERE
    args.out.mkdir(parents=True, exist_ok=True)
    rounds = args.rounds or (1 if args.quick else 3)
    start, start_cpu, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    modules, results = {}, []
    for case in cases():
        if args.only and case.key not in args.only.split(","):
            continue
        if case.example not in modules:
            modules[case.example] = load_example(folder, case.example)
        mod = modules[case.example]
        try:
            results.append(run_case(mod, case, rounds, args.quick, log))
        except Exception as e:  # noqa: BLE001 - reported in the table
            log(f"  {case.key}: failed: {type(e).__name__}: {e}")
            results.append(Result(case, failure=f"{type(e).__name__}: {e}"))
        if args.profile:
            with frontend(mod, "torchnde"):
                step = case.setup(mod, 0, args.quick)
                log_profile(lambda i, step=step: step(), 2, f"{case.key} through torchnde.compat.torchsde", log)
    elapsed = (time.perf_counter() - start, time.process_time() - start_cpu)
    info = machine_info(torchsde=torchsde.__version__)
    out = args.out / "torchsde_examples.md"
    write_md(out, info, results, folder, elapsed, rounds, args.quick, (load0, os.getloadavg()[0]))
    log(f"wrote {out} ({elapsed[0]:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
