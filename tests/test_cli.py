"""The ``torchnde`` command line: parser, ``--version``, ``demo`` (generative and ``--ode``) and missing
optional dependencies."""

import json
import re
import subprocess
import sys

import pytest
import torch

import torchnde as tn
from torchnde.cli import COMMANDS, build_parser, main
from torchnde.cli.demo import DemoConfig, run_demo, true_trajectory
from torchnde.cli.demo_generative import (
    DEFAULT_VP_SAMPLERS,
    FM_SAMPLERS,
    GenerativeDemoConfig,
    run_generative_demo,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_writes_png_and_prints_stats(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["demo", "--ode", "--iters", "5", "--out", tmp_path, "--no-progress"]) == 0
    png = tmp_path / "spiral.png"
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == PNG_MAGIC
    out = capsys.readouterr().out
    for key in ("num_steps", "num_accepted", "num_rejected", "nfe", "final loss", "wall time"):
        assert key in out
    assert str(png) in out


def test_demo_restores_threads_and_rng(tmp_path):
    pytest.importorskip("matplotlib")
    threads = torch.get_num_threads()
    state = torch.get_rng_state()
    main(["demo", "--ode", "--iters", "1", "--out", tmp_path, "--no-progress", "--threads", "1"])
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), state)


def test_demo_is_deterministic():
    cfg = DemoConfig(iters=3, seed=7)
    a = run_demo(cfg, out=None, progress=False, log=lambda *_: None)
    b = run_demo(cfg, out=None, progress=False, log=lambda *_: None)
    c = run_demo(DemoConfig(iters=3, seed=8), out=None, progress=False, log=lambda *_: None)
    assert a.losses == b.losses and torch.equal(a.learned_ys, b.learned_ys)
    assert a.losses != c.losses


def test_true_trajectory_is_the_spiral():
    # Independent check of the data: RK4 with a small fixed step agrees with the adaptive solve.
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    ts = torch.linspace(0, 5, 51, dtype=torch.float64)
    sol = true_trajectory(y0, ts)
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
    ref = tn.solve(
        tn.ODETerm(lambda t, y, a: (y**3) @ A),
        tn.RK4(),
        0.0,
        5.0,
        y0,
        dt0=1e-3,
        saveat=tn.SaveAt(ts=ts),
        max_steps=None,
    )
    assert sol.ys.shape == (51, 2) and sol.ys.dtype == torch.float64
    torch.testing.assert_close(sol.ys, ref.ys, rtol=0, atol=1e-8)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"torchnde {tn.__version__}"


def test_unknown_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err and "demo" in err
    assert "torchnde --help" in err


def test_bad_option_value(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--iters", "0"])
    assert e.value.code == 2
    assert "--iters: must be a positive integer" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: torchnde" in err and "demo" in err


def test_every_command_has_help():
    text = build_parser().format_help()
    for name in COMMANDS:
        assert name in text


@pytest.mark.parametrize("variant", [["--ode"], ["--quick"]], ids=["ode", "generative"])
@pytest.mark.parametrize("missing, flags", [("matplotlib", ["--no-progress"]), ("tqdm", [])])
def test_missing_optional_dependency(monkeypatch, tmp_path, capsys, missing, flags, variant):
    # A None entry in sys.modules makes `import missing` raise ImportError.
    for name in list(sys.modules):
        if name == missing or name.startswith(missing + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)
    assert main(["demo", *variant, "--iters", "1", "--out", tmp_path, *flags]) == 1
    err = capsys.readouterr().err
    assert missing in err and "pip install 'torchnde[cli]'" in err
    assert list(tmp_path.iterdir()) == []  # it failed before training: nothing written


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "torchnde.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"torchnde {tn.__version__}"


# ------------------------------------------------------------------------------ generative demo
def test_generative_demo_quick(tmp_path, capsys):
    """``torchnde demo --quick``: trains both models, runs every sampler, writes the PNG grid, the
    report (a row per sampler and budget) and the JSON, and keeps the checkpoints."""
    pytest.importorskip("matplotlib")
    assert main(["demo", "--quick", "--out", tmp_path, "--no-progress"]) == 0
    png = tmp_path / "generative.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 50_000
    report = (tmp_path / "report.md").read_text()
    out = capsys.readouterr().out
    assert report in out and str(png) in out and "wall time" in out
    cfg = GenerativeDemoConfig.quick()
    rows = [
        line for line in report.splitlines() if line.startswith(("| VP-SDE |", "| flow matching |")) and "`" in line
    ]
    named = [re.search(r"`(\w+)`", line).group(1) for line in rows]
    assert set(named) == set(DEFAULT_VP_SAMPLERS) | set(FM_SAMPLERS)
    adaptive = ("pf_adaptive", "sde_adaptive", "adaptive")
    for s in DEFAULT_VP_SAMPLERS:
        assert named.count(s) == (len(cfg.tolerances) if s in adaptive else len(cfg.vp_nfes)), s
    for s in FM_SAMPLERS:
        assert named.count(s) == (len(cfg.tolerances) if s in adaptive else len(cfg.fm_nfes)), s
    assert "| data | two fresh data sets |" in report and "NLL (nats)" in report
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["rows"]) == len(rows)
    for r in res["rows"]:
        assert r["nfe"] >= 1 and r["seconds"] >= 0 and r["w2"] > 0
        if not r["adaptive"]:  # the budget is respected
            assert r["nfe"] <= r["budget"]
    assert set(res["nll"]) == {"vp", "flow_matching"}
    # the new metrics: precision/recall per run and for the data, the data's own NLL, the bridge
    assert all(0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 for r in res["rows"])
    assert res["precision_recall_floor"][0] > 0.8 and res["nll_data"]["nats"] > 0
    assert all(abs(v["gap"] - (v["nats"] - res["nll_data"]["nats"])) < 1e-9 for v in res["nll"].values())
    assert "| precision | recall |" in report and "data (exact density)" in report and "`edm_heun` is" in report
    assert "## Bridge" in report and res["bridge"]["source"] == "8gaussians" and res["bridge"]["w2"] > 0
    assert all(v["nats"] == v["nats"] and v["stderr"] > 0 for v in res["nll"].values())
    for mt in ("vp", "flow_matching"):  # `torchnde sample/evaluate OUT/vp` work afterwards
        assert (tmp_path / mt / "checkpoint.pt").exists()
    # a rerun into the same directory starts afresh (it replaces its own checkpoints)
    assert main(["demo", "--quick", "--iters", "3", "--out", tmp_path, "--no-progress"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["train"]["vp"]["steps"] == 3


def test_generative_demo_is_deterministic_and_learns():
    """Same seed, same numbers (but for the timings); the global RNG and the thread count are
    restored. And training helps: after 300 steps every sampler's W2 to fresh data is at most 85%
    of that of the (1-step) untrained model (measured: 0.32, 0.33, 0.30 against 84, 121, 0.69),
    and the flow's NLL is lower by more than twice the combined standard error (measured: 1.87
    against 2.85 nats, combined standard error 0.12)."""
    small = dict(vp_samplers=("pf_euler", "dpmpp_2m"), fm_samplers=("euler",), vp_nfes=(20,), fm_nfes=(20,))
    small.update(density_grid=0, nll_n=50, n_samples=500, bridge_source=None)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    kw = dict(out=None, progress=False, log=lambda *_: None)
    a = run_generative_demo(GenerativeDemoConfig.quick(vp_steps=300, fm_steps=300, **small), **kw)
    b = run_generative_demo(GenerativeDemoConfig.quick(vp_steps=300, fm_steps=300, **small), **kw)
    c = run_generative_demo(GenerativeDemoConfig.quick(vp_steps=1, fm_steps=1, **small), **kw)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    key = [(r.model, r.sampler, r.budget, r.nfe, r.w2) for r in a.rows]
    assert key == [(r.model, r.sampler, r.budget, r.nfe, r.w2) for r in b.rows]
    assert all(a.nll[m]["nats"] == b.nll[m]["nats"] for m in a.nll)
    assert [r.sampler for r in a.rows] == ["pf_euler", "dpmpp_2m", "euler"]
    for trained, untrained in zip(a.rows, c.rows):
        assert trained.w2 < 0.85 * untrained.w2, (trained, untrained)
    fa, fc = a.nll["flow_matching"], c.nll["flow_matching"]
    assert fc["nats"] - fa["nats"] > 2 * (fa["stderr"] ** 2 + fc["stderr"] ** 2) ** 0.5
    assert a.nll["vp"]["nats"] < c.nll["vp"]["nats"] - 1.0


def test_generative_demo_trains_in_two_processes_alike():
    """``workers=2`` trains the flow and the bridge in a second Python process while the VP model
    trains in this one: the same weights as training one after the other (one thread each, seeded
    alike)."""
    from torchnde.cli.demo_generative import _train_both

    quiet = lambda *_: None  # noqa: E731
    kw = dict(vp_steps=3, fm_steps=3, bridge_steps=3, bridge_pairs=64)
    a = _train_both(GenerativeDemoConfig.quick(**kw), None, False, quiet, {})
    b = _train_both(GenerativeDemoConfig.quick(workers=2, **kw), None, False, quiet, {})
    assert set(a) == set(b) == {"vp", "flow_matching", "bridge"}
    for mt in a:
        sa, sb = a[mt][1].state_dict(), b[mt][1].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), mt
        assert not any(p.requires_grad for p in b[mt][1].parameters())


def test_generative_demo_bad_data_set(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--data", "mons"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'mons'" in err and "moons" in err and "8gaussians" in err
