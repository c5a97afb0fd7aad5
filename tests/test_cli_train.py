"""``torchnde train / sample / evaluate``: configs, checkpoints, resume, metrics and torchrun DDP."""

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torchnde.cli import main
from torchnde.cli._checkpoint import FORMAT, VERSION, CheckpointError, check_plain, load_checkpoint, save_checkpoint
from torchnde.cli._config import ConfigError, resolve
from torchnde.cli._models import MODELS
from torchnde.cli.train import train
from torchnde.generative.samplers import ALL_SAMPLERS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "configs" / "moons_vp.toml"

TINY = [
    "model.hidden=16",
    "model.depth=2",
    "train.batch_size=32",
    "train.steps=12",
    "train.checkpoint_every=3",
    "train.log_every=2",
]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def _quiet(*_):
    pass


def _tiny(*extra):
    return resolve(EXAMPLE, [*TINY, *extra])


# ------------------------------------------------------------------------------------------ config
def test_example_config_and_typed_overrides(tmp_path):
    cfg = resolve(EXAMPLE)
    assert cfg["model.type"] == "vp" and cfg["data.name"] == "moons" and cfg["train.steps"] == 2000
    f = tmp_path / "c.toml"
    f.write_text('seed = 3\n[model]\ntype = "flow_matching"\n[train]\nlr = 1e-2\n')
    cfg = resolve(
        f, ["train.lr=5e-4", "train.steps=7", "data.name=8gaussians", "train.cosine=false", "model.beta_max=10"]
    )
    assert cfg["seed"] == 3 and cfg["model.type"] == "flow_matching"
    assert cfg["train.lr"] == 5e-4 and cfg["train.steps"] == 7 and cfg["train.cosine"] is False
    assert cfg["data.name"] == "8gaussians"
    assert cfg["model.beta_max"] == 10.0 and isinstance(cfg["model.beta_max"], float)  # int -> float
    assert cfg["model.hidden"] == 128  # untouched default


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1e-3", ["unknown configuration key 'train.lrr'", "Did you mean 'train.lr'", "Valid keys: seed"]),
        ("data.name=mons", ["invalid data.name 'mons'", "Did you mean 'moons'", "moons, 8gaussians, checkerboard"]),
        ("model.type=score", ["invalid model.type 'score'", "Valid choices: vp, flow_matching"]),
        ("model.coupling=sinkhorn", ["Valid choices: independent, ot"]),
        ("train.steps=1.5", ["train.steps (from --set) must be an integer, got 1.5"]),
        ("train.steps=0", ["train.steps (from --set) must be > 0"]),
        ("train.cosine=1", ["must be true or false"]),
        ("dtype=float16", ["Valid choices: float32, float64"]),
        ("device=tpu", ["invalid device 'tpu'"]),
        ("train.lr", ["--set expects KEY=VALUE"]),
    ],
)
def test_config_errors_name_the_valid_choices(override, expected):
    with pytest.raises(ConfigError) as e:
        resolve(EXAMPLE, [override])
    for text in expected:
        assert text in str(e.value)


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nstpes = 3\n")
    with pytest.raises(
        ConfigError, match=r"unknown configuration key 'train.stpes' \(in .*c.toml\)\. Did you mean 'train.steps'"
    ):
        resolve(f)
    f.write_text("[train\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        resolve(f)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(tmp_path / "missing.toml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ConfigError, match="use .toml, .yaml or .yml"):
        resolve(tmp_path / "c.json")


def test_yaml_config(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 5\nmodel:\n  type: flow_matching\n")
    try:
        import yaml  # noqa: F401

        cfg = resolve(f)
        assert cfg["train.steps"] == 5 and cfg["model.type"] == "flow_matching"
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML missing: a clear error, not a traceback
    with pytest.raises(ConfigError, match=r"YAML configs need PyYAML.*pip install pyyaml"):
        resolve(f)


def test_cli_config_error_exit_status(tmp_path, capsys):
    assert main(["train", EXAMPLE, "--set", "data.name=mons", "--out", tmp_path, "--no-progress"]) == 2
    assert "Did you mean 'moons'" in capsys.readouterr().err
    assert main(["train", "--out", tmp_path, "--no-progress"]) == 2
    assert "CONFIG is required" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists()
    assert main(["train", EXAMPLE, "--set", "train.steps=9", "--print-config", "--out", tmp_path]) == 0
    assert json.loads(capsys.readouterr().out)["train.steps"] == 9


# -------------------------------------------------------------------------------------- checkpoints
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    good = {"model_type": "vp", "config": {}, "step": 1, "model": {"w": torch.ones(3)}, "optimizer": {}, "rng": {}}
    save_checkpoint(path, good)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.write(b"half-written")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {**good, "step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["step"] == 1  # the old checkpoint, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left
    with pytest.raises(CheckpointError, match="may hold only tensors and plain values"):
        check_plain({"x": [1, object()]})


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_unsafe_corrupt_and_foreign_files_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": VERSION, "x": _Evil()}, evil)
    with pytest.raises(CheckpointError, match=r"refusing to load .*Python objects \(\w+\.system\).* could run code"):
        load_checkpoint(evil)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, foreign)
    with pytest.raises(CheckpointError, match="is not a checkpoint written by 'torchnde train'"):
        load_checkpoint(foreign)
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model_type": "vp", "config": {}, "step": 1, "model": {}, "optimizer": {}, "rng": {}})
    data = good.read_bytes()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch file"):
        load_checkpoint(corrupt)
    pickled = tmp_path / "pickled.pt"
    pickled.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch file|refusing"):
        load_checkpoint(pickled)
    other = tmp_path / "other.pt"
    save_checkpoint(other, {"model_type": "gan", "config": {}, "step": 1, "model": {}, "optimizer": {}, "rng": {}})
    with pytest.raises(CheckpointError, match="type 'gan'.*known types: vp, flow_matching"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing.pt")


# ------------------------------------------------------------------------------------------- resume
def _state(path):
    ck = load_checkpoint(path)
    return ck["model"], ck["optimizer"]["state"], ck["step"]


def _assert_same(a, b):
    (ma, oa, sa), (mb, ob, sb) = a, b
    assert sa == sb
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), (i, k)


@pytest.mark.parametrize("model", ["vp", "flow_matching"])
def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, model, capsys):
    extra = ["model.coupling=ot", "model.sigma=0.1"] if model == "flow_matching" else []
    cfg = _tiny(f"model.type={model}", *extra)
    full = train(cfg, tmp_path / "full", log=_quiet)
    assert full.step == 12 and [s for s, _ in full.log] == [2, 4, 6, 8, 10, 12]
    # through the command line: stop at step 6 (as a time-limited job would), then --resume
    sets = [a for kv in (*TINY, f"model.type={model}", *extra) for a in ("--set", kv)]
    args = ["train", EXAMPLE, *sets, "--out", tmp_path / "cut", "--no-progress"]
    assert main([*args, "--stop-at", "6"]) == 0
    assert "continue with: torchnde train --resume" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "cut")["step"] == 6
    assert main(["train", "--resume", "--out", tmp_path / "cut", "--no-progress"]) == 0
    _assert_same(_state(tmp_path / "full" / "checkpoint.pt"), _state(tmp_path / "cut" / "checkpoint.pt"))
    assert load_checkpoint(tmp_path / "cut")["log"] == full.log


def test_resume_after_keyboard_interrupt(tmp_path):
    cfg = _tiny()
    full = train(cfg, tmp_path / "full", log=_quiet)

    def interrupt(step, loss):
        if step == 8:  # after the checkpoint of step 6: steps 7 and 8 are lost and redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", log=_quiet, on_step=interrupt)
    assert load_checkpoint(tmp_path / "cut")["step"] == 6
    resumed = train(cfg, tmp_path / "cut", resume=True, log=_quiet)
    assert resumed.step == 12
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_resume_refuses_a_changed_config_and_overwriting(tmp_path, capsys):
    sets = [a for kv in TINY for a in ("--set", kv)]
    out = ["--out", tmp_path, "--no-progress"]
    assert main(["train", EXAMPLE, *sets, "--stop-at", "3", *out]) == 0
    assert main(["train", EXAMPLE, *sets, *out]) == 1
    assert "exists: pass --resume" in capsys.readouterr().err
    assert main(["train", EXAMPLE, *sets, "--set", "train.lr=0.1", "--resume", *out]) == 2
    err = capsys.readouterr().err
    assert "cannot resume with a different configuration (train.lr: 0.002 in the checkpoint, 0.1 now)" in err
    # train.steps may change: extend the run
    assert main(["train", "--resume", "--set", "train.steps=15", *out]) == 0
    assert load_checkpoint(tmp_path)["step"] == 15


# --------------------------------------------------------------------------------- sample/evaluate
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small VP model and a small flow-matching model, 500 steps each (~2 s each)."""
    root = tmp_path_factory.mktemp("trained")
    out = {}
    for model in ("vp", "flow_matching"):
        cfg = resolve(EXAMPLE, [f"model.type={model}", "model.hidden=64", "train.batch_size=128", "train.steps=500"])
        out[model] = train(cfg, root / model, log=_quiet).checkpoint
    return out


def test_sample_every_sampler(trained, tmp_path, capsys):
    for model, samplers in (("vp", ALL_SAMPLERS), ("flow_matching", MODELS["flow_matching"].samplers)):
        for sampler in samplers:
            f = tmp_path / f"{model}-{sampler}.pt"
            assert main(["sample", trained[model], "--sampler", sampler, "--nfe", "9", "-n", "50", "--out", f]) == 0
            info = json.loads(capsys.readouterr().out)
            x = torch.load(f, weights_only=True)
            assert x.shape == (50, 2) and torch.isfinite(x).all(), (model, sampler)
            assert info["sampler"] == sampler and info["n"] == 50 and info["nfe_used"] >= 1
            if sampler in ("euler_maruyama", "pf_euler", "euler"):
                # fixed steps of a one-stage method: exactly the budget
                assert info["nfe_used"] == 9, (sampler, info)
    for suffix in ("npy", "csv"):
        f = tmp_path / f"s.{suffix}"
        assert main(["sample", trained["vp"], "--nfe", "5", "-n", "20", "--out", f]) == 0
        x = np.load(f) if suffix == "npy" else np.loadtxt(f, delimiter=",", skiprows=1)
        assert x.shape == (20, 2)


def test_sample_is_independent_of_the_chunking_of_processes(trained, tmp_path, capsys):
    # the same seed gives the same samples; chunk c always uses the same seed (so under torchrun,
    # where chunks are shared out over processes, the result is the same: see the DDP test)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for f in (a, b):
        assert (
            main(["sample", trained["flow_matching"], "--nfe", "4", "-n", "30", "--chunk-size", "10", "--out", f]) == 0
        )
    assert torch.equal(torch.load(a), torch.load(b))


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["--nfe", "0"], 2, "--nfe: must be a positive integer, got 0"),
        (["--sampler", "ddim"], 2, "unknown sampler 'ddim' for a 'vp' model; valid samplers: euler_maruyama, pc"),
        (["--sampler", "heun"], 2, "valid samplers: euler_maruyama"),  # a flow sampler on a score model
    ],
)
def test_sample_bad_input(trained, tmp_path, capsys, args, status, message):
    try:
        code = main(["sample", trained["vp"], *args, "--out", tmp_path / "s.pt"])
    except SystemExit as e:  # argparse
        code = e.code
    assert code == status
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s.pt").exists()


def test_sample_and_evaluate_refuse_bad_checkpoints(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for cmd in ("sample", "evaluate"):
        assert main([cmd, bad]) == 1
        assert "corrupt or not a PyTorch file" in capsys.readouterr().err
    # weights of another model type under a checkpoint's name
    ck = load_checkpoint(save_checkpoint(tmp_path / "x.pt", {
        "model_type": "flow_matching", "config": {"model.type": "flow_matching"}, "step": 0,
        "model": {"w": torch.zeros(1)}, "optimizer": {}, "rng": {},
    }))  # fmt: skip
    assert ck["step"] == 0
    assert main(["sample", tmp_path / "x.pt"]) == 1
    assert "the weights do not fit a 'flow_matching' model" in capsys.readouterr().err


def test_evaluate_writes_metrics_and_beats_the_prior(trained, tmp_path, capsys):
    from torchnde.cli._models import eval_data
    from torchnde.generative import metrics

    for model in ("vp", "flow_matching"):
        out = tmp_path / model
        assert main(["evaluate", trained[model], "-n", "400", "--nll-n", "200", "--nfe", "40", "--out", out]) == 0
        m = json.loads((out / "metrics.json").read_text())
        md = (out / "metrics.md").read_text()
        assert "| W2 (exact) |" in md and "bits/dim" in md and str(out / "metrics.md") in capsys.readouterr().out
        for key in ("w2", "sliced_w2", "mmd2", "w2_data_floor", "nll_nats", "bits_per_dim", "nll_standard_normal"):
            assert np.isfinite(m[key]), key
        assert m["sliced_w2"] <= m["w2"] + 1e-12  # projections are 1-Lipschitz
        # After 500 steps the model is far from perfect but clearly better than its N(0, I) prior:
        # its W2 to fresh data is below the prior's (measured 0.47-0.50 vs 1.0), and its NLL is
        # below the standard normal's by more than 5 standard errors (measured ~0.3 nats, se ~0.03).
        prior = torch.randn(400, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        w2_prior = metrics.wasserstein2(prior, eval_data(load_checkpoint(trained[model])["config"], 400))
        assert m["w2"] < 0.8 * w2_prior, (m["w2"], w2_prior)
        assert m["nll_standard_normal"] - m["nll_nats"] > 5 * m["nll_nats_stderr"], m
        assert m["w2_data_floor"] < m["w2"]


# ---------------------------------------------------------------------------------------- torchrun
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(_free_port()), "-m", "torchnde.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_processes_train_and_sample_like_one(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    sets = ["dtype=float64", "model.hidden=32", "train.batch_size=64", "train.steps=20", "train.checkpoint_every=10"]
    flags = [a for kv in sets for a in ("--set", kv)]
    r = _torchrun(["train", EXAMPLE, *flags, "--out", tmp_path / "ddp", "--no-progress"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "global batch 64 on 2 processes (gloo)" in r.stdout
    one = train(resolve(EXAMPLE, sets), tmp_path / "one", log=_quiet)
    ck = load_checkpoint(tmp_path / "ddp")
    assert ck["world_size"] == 2 and ck["step"] == 20
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(ck["model"][k], v, rtol=0, atol=1e-12)  # measured: 1e-15
    # sampling: chunks shared out over the processes and gathered = one process
    r = _torchrun(["sample", tmp_path / "ddp", "--sampler", "pf_heun", "--nfe", "11", "-n", "90", "--chunk-size", "20",
                   "--out", tmp_path / "s2.pt"])  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["processes"] == 2
    args = ["sample", tmp_path / "ddp", "--sampler", "pf_heun", "--nfe", "11", "-n", "90", "--chunk-size", "20"]
    assert main([*args, "--out", tmp_path / "s1.pt"]) == 0
    assert torch.equal(torch.load(tmp_path / "s1.pt"), torch.load(tmp_path / "s2.pt"))
