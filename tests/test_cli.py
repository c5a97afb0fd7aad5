"""The ``torchnde`` command line: parser, ``--version``, ``demo`` and missing optional dependencies."""

import subprocess
import sys

import pytest
import torch

import torchnde as tn
from torchnde.cli import COMMANDS, build_parser, main
from torchnde.cli.demo import DemoConfig, run_demo, true_trajectory

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_writes_png_and_prints_stats(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["demo", "--iters", "5", "--out", tmp_path, "--no-progress"]) == 0
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
    main(["demo", "--iters", "1", "--out", tmp_path, "--no-progress", "--threads", "1"])
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


@pytest.mark.parametrize("missing, flags", [("matplotlib", ["--no-progress"]), ("tqdm", [])])
def test_missing_optional_dependency(monkeypatch, tmp_path, capsys, missing, flags):
    # A None entry in sys.modules makes `import missing` raise ImportError.
    for name in list(sys.modules):
        if name == missing or name.startswith(missing + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)
    assert main(["demo", "--iters", "1", "--out", tmp_path, *flags]) == 1
    err = capsys.readouterr().err
    assert missing in err and "pip install 'torchnde[cli]'" in err
    assert not (tmp_path / "spiral.png").exists()


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "torchnde.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"torchnde {tn.__version__}"
