"""The example scripts run and do what their docs say (short runs)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script, *args, timeout=600):
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.skipif(importlib.util.find_spec("aeon") is None, reason="aeon (ships JapaneseVowels) not installed")
def test_japanese_vowels_neural_cde_learns():
    """Three epochs already classify the nine speakers well above chance (1/9); the full 30-epoch
    run's accuracy is in docs/cde.md."""
    out = _run("japanese_vowels_cde.py", "--epochs", "3", "--threads", "1")
    acc = float(re.search(r"test accuracy ([0-9.]+)", out).group(1))
    assert acc > 0.7, out


def test_latent_sde_example_runs_and_improves(tmp_path):
    out = _run("latent_sde.py", "--iters", "30", "--threads", "1", "--out", str(tmp_path))
    elbos = [float(x) for x in re.findall(r"ELBO\s+(-?[0-9.]+)", out)]
    assert len(elbos) >= 2 and elbos[-1] > elbos[0], out


def test_bouncing_ball_fit_improves():
    """Ten steps already halve the loss (the full run's recovered e and g: the example's docstring)."""
    out = _run("bouncing_ball.py", "--iters", "10", "--threads", "1")
    first = float(re.search(r"initial loss ([0-9.]+)", out).group(1))
    last = float(re.search(r"final loss ([0-9.]+)", out).group(1))
    e = float(re.search(r"recovered e ([0-9.]+)", out).group(1))
    assert last < 0.5 * first and 0.6 < e < 0.9, out


def test_spiking_network_trains():
    out = _run("spiking.py", "--iters", "4", "--trials", "8", "--threads", "1")
    before = float(re.search(r"before: loss ([0-9.]+)", out).group(1))
    after = float(re.search(r"after:  loss ([0-9.]+)", out).group(1))
    assert after < before, out


def test_stiff_kinetics_trains_where_tsit5_stops():
    """Tsit5 ends in max_steps_reached on the Robertson kinetics; three Kvaerno5 Adam steps already
    lower the loss (the full run's numbers: the example's docstring)."""
    out = _run("stiff_kinetics.py", "--iters", "3", "--threads", "1")
    assert "Tsit5, max_steps=2000: max_steps_reached" in out, out
    before = float(re.search(r"before: loss ([0-9.e+-]+)", out).group(1))
    after = float(re.search(r"after:  loss ([0-9.e+-]+)", out).group(1))
    assert after < 0.5 * before, out


def test_stiff_pde_closure_trains_through_imex():
    """Tsit5 stops at max_steps on the method-of-lines Fisher-KPP problem; three KenCarp4 Adam
    steps lower the loss (the full run's numbers: the example's docstring)."""
    out = _run("stiff_pde_closure.py", "--iters", "3", "--threads", "1")
    assert "Tsit5, max_steps=500: max_steps_reached" in out, out
    before = float(re.search(r"before: loss ([0-9.e+-]+)", out).group(1))
    after = float(re.search(r"after:  loss ([0-9.e+-]+)", out).group(1))
    assert after < 0.8 * before, out
