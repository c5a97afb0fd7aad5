"""Input validation of the ``torchnde`` command line (issue 16): bad input gives one
``torchnde <command>: error: ...`` line and exit status 2 (1 for a failure while running, 130 when
interrupted), never a traceback.

Most cases run in this process through :func:`torchnde.cli.main` (an exception escaping it fails
the test); one true subprocess per command checks the real exit status and that stderr holds no
traceback. Nothing here trains more than a few steps of a tiny model."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from torchnde.cli import main
from torchnde.cli._checkpoint import load_checkpoint
from torchnde.cli._config import resolve
from torchnde.cli.train import TrainingInterrupted, train

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "configs" / "moons_vp.toml"
TINY = ["model.hidden=8", "model.depth=1", "model.time_features=1", "train.batch_size=8", "train.steps=2"]
SETS = [a for kv in TINY for a in ("--set", kv)]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHNDE_TRACEBACK"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A directory with a 2-step checkpoint ``ck/``, a plain file ``afile`` and a non-UTF-8
    config ``latin1.toml``."""
    root = tmp_path_factory.mktemp("cli")
    train(resolve(EXAMPLE, TINY), root / "ck", log=lambda *_: None)
    (root / "afile").write_text("not a directory\n")
    (root / "latin1.toml").write_bytes("seed = 0\n# café\n".encode("latin-1"))
    return root


def _cuda_missing() -> str:
    return "is not available" if not torch.cuda.is_available() else "does not exist"


# (argv with {w} for the work directory, exit status, a piece of the message)
CASES = [
    # --out under a file, an existing file, under /proc: every command
    (["train", EXAMPLE, *SETS, "--out", "{w}/afile"], 2, "'{w}/afile' is an existing file, not a directory"),
    (["train", EXAMPLE, *SETS, "--out", "{w}/afile/run"], 2, "'{w}/afile' is a file, so no directory can be made"),
    (["train", EXAMPLE, *SETS, "--out", "/proc/torchnde-run"], 2, "cannot create the directory '/proc/torchnde-run'"),
    (["sample", "{w}/ck", "--nfe", "2", "-n", "4", "--out", "{w}/afile/s.pt"], 2, "'{w}/afile' is an existing file"),
    (["sample", "{w}/ck", "--nfe", "2", "-n", "4", "--out", "/proc/s.pt"], 2, "cannot write files in '/proc'"),
    (["sample", "{w}/ck", "--nfe", "2", "-n", "4", "--out", "{w}/ck"], 2, "is a directory: give a file name"),
    (["sample", "{w}/ck", "--nfe", "2", "-n", "4", "--out", "{w}/s.txt"], 2, "unknown output format '.txt'"),
    (["evaluate", "{w}/ck", "--nfe", "2", "-n", "4", "--out", "{w}/afile"], 2, "'{w}/afile' is an existing file"),
    (["evaluate", "{w}/ck", "--nfe", "2", "-n", "4", "--out", "{w}/afile/x"], 2, "'{w}/afile' is a file, so no"),
    (["evaluate", "{w}/ck", "--nfe", "2", "-n", "4", "--out", "/proc/x"], 2, "cannot create the directory '/proc/x'"),
    (["demo", "--ode", "--iters", "1", "--no-progress", "--out", "{w}/afile"], 2, "'{w}/afile' is an existing file"),
    (["demo", "--quick", "--iters", "1", "--no-progress", "--out", "{w}/afile/d"], 2, "'{w}/afile' is a file"),
    # devices: one check for the configuration of train and the --device of sample / evaluate
    (["sample", "{w}/ck", "--device", "tpu"], 2, "invalid device 'tpu'; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    (["evaluate", "{w}/ck", "--device", "cuda:x"], 2, "invalid device 'cuda:x'"),
    (["train", EXAMPLE, *SETS, "--set", "device=tpu", "--out", "{w}/t"], 2, "invalid device 'tpu' (from --set)"),
    (["sample", "{w}/ck", "--device", "cuda:99", "--out", "{w}/s.pt"], 2, "device 'cuda:99' " + _cuda_missing()),
    (["train", EXAMPLE, *SETS, "--set", "device=cuda:99", "--out", "{w}/t"], 2, "use --set device=cpu"),
    (["sample", "{w}/ck", "--device", "mps", "--out", "{w}/s.pt"], 2, "device 'mps'"),
    # configuration files
    (["train", "{w}/latin1.toml", "--out", "{w}/t"], 2, "latin1.toml: not UTF-8 text (byte 0xe9 at line 2"),
    (["train", "{w}/missing.toml", "--out", "{w}/t"], 2, "configuration file '{w}/missing.toml' does not exist"),
    (["train", "{w}/ck", "--out", "{w}/t"], 2, "configuration file '{w}/ck' is a directory"),
    # sample counts of evaluate
    (["evaluate", "{w}/ck", "--nfe", "2", "-n", "1", "--out", "{w}/ev"], 2, "-n 1: W2, sliced W2 and MMD compare"),
]


def _fill(argv, w):
    return [str(a).replace("{w}", str(w)) for a in argv]


@pytest.mark.parametrize("argv, status, message", CASES, ids=[" ".join(map(str, c[0][:1] + c[0][-2:])) for c in CASES])
def test_bad_input_is_one_line_and_an_exit_status(work, capsys, argv, status, message, monkeypatch):
    if "mps" in argv and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    monkeypatch.chdir(work)
    try:
        code = main(_fill(argv, work))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == status, err
    assert message.replace("{w}", str(work)) in err, err
    assert "Traceback" not in err
    if argv[0] == "train" and "--out" in argv:  # nothing half-made where training would have written
        assert not (Path(_fill(argv, work)[argv.index("--out") + 1]) / "checkpoint.pt").exists()


def test_evaluate_warns_below_a_meaningful_number_of_samples(work, capsys):
    out = work / "ev-small"
    assert main(["evaluate", work / "ck", "--nfe", "2", "-n", "8", "--nll-n", "1", "--out", out]) == 0
    err = capsys.readouterr().err
    assert "warning: -n 8: with fewer than 100 samples W2, sliced W2 and MMD are dominated by sampling noise" in err
    assert "warning: --nll-n 1" in err and "no standard error" in err
    assert "**Warning:** -n 8" in (out / "metrics.md").read_text()


def test_an_interrupt_saves_the_step_and_says_how_to_resume(tmp_path):
    cfg = resolve(EXAMPLE, [*TINY[:-1], "train.steps=10", "train.checkpoint_every=3", "train.log_every=1"])

    def ctrl_c_at_4(step, loss):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, tmp_path, log=lambda *_: None, on_step=ctrl_c_at_4)
    # the first Ctrl-C lets the step finish and checkpoints it (not only the last periodic one, 3)
    assert load_checkpoint(tmp_path)["step"] == 4
    assert str(info.value) == (
        f"after step 4 of 10; saved checkpoint at step 4 to {tmp_path / 'checkpoint.pt'}; "
        f"resume with `torchnde train --resume --out {tmp_path}`"
    )
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored

    # another interrupt (raised in step 5): step 5 is lost, the message says which step was saved
    def raise_at_5(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match=r"at step 5 of 10; saved checkpoint at step 4 to"):
        train(cfg, tmp_path, resume=True, log=lambda *_: None, on_step=raise_at_5)


def test_an_interrupted_demo_does_not_advise_torchnde_train(tmp_path, capsys, monkeypatch):
    import torchnde.cli.train as train_module

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted("after step 3 of 9; saved checkpoint at step 3 to x; resume with `torchnde train`")

    monkeypatch.setattr(train_module, "train", interrupted)
    assert main(["demo", "--quick", "--no-progress", "--out", tmp_path]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "torchnde demo: interrupted"


# ---------------------------------------------------------------------------- true subprocesses
def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHNDE_TRACEBACK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    return env


def _cli(*args, timeout=120):
    cmd = [sys.executable, "-m", "torchnde.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.mark.parametrize(
    "argv, status, message",
    [
        (["sample", "{w}/ck", "--device", "cuda:99", "--out", "{w}/s.pt"], 2, "device 'cuda:99' " + _cuda_missing()),
        (["evaluate", "{w}/ck", "--nfe", "2", "-n", "4", "--out", "{w}/afile/x"], 2, "'{w}/afile' is a file"),
        (["demo", "--ode", "--iters", "1", "--no-progress", "--out", "/proc/torchnde-demo"], 2, "cannot create"),
    ],
    ids=["sample", "evaluate", "demo"],
)
def test_subprocess_exit_status_and_no_traceback(work, argv, status, message):
    r = _cli(*_fill(argv, work))
    assert r.returncode == status, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"torchnde {argv[0]}: error: "), r.stderr
    assert message.replace("{w}", str(work)) in r.stderr
    assert "Traceback" not in r.stderr


def test_subprocess_train_ctrl_c(tmp_path):
    # a real SIGINT to a real training process: exit status 130, the step saved, how to resume
    sets = [
        a for kv in [*TINY[:-1], "train.steps=100000000", "train.checkpoint_every=100000000"] for a in ("--set", kv)
    ]
    cmd = [sys.executable, "-m", "torchnde.cli", "train", str(EXAMPLE), *sets, "--no-progress", "--out", str(tmp_path)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert p.stdout.readline().startswith("training 100000000 steps")
        time.sleep(0.3)  # into the loop
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    step = load_checkpoint(tmp_path)["step"]
    assert step >= 1
    assert f"torchnde train: interrupted: after step {step} of 100000000; saved checkpoint at step {step} to" in err
    assert f"resume with `torchnde train --resume --out {tmp_path}`" in err
