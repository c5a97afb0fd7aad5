"""Training configurations of ``torchnde train``: the schema, TOML/YAML files and ``--set`` overrides.

A configuration is a flat mapping of dotted keys (``train.lr``) to values, written in a file as
nested tables::

    seed = 0
    [data]
    name = "moons"
    [model]
    type = "vp"
    [train]
    steps = 2000

Every key has a default, a type and (for names) a set of valid choices in :data:`SCHEMA`; a file
only lists what it changes. ``--set train.lr=1e-3`` overrides one key; the value is read with TOML
syntax (``1e-3`` is a float, ``true`` a bool, ``"x"`` or a bare word a string) and checked against
the key's type. An unknown key, a value of the wrong type or an invalid choice raises
:class:`ConfigError` with a message naming the valid keys or choices.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import UsageError, check_device_name

__all__ = ["ConfigError", "Field", "SCHEMA", "defaults", "load_file", "parse_override", "resolve", "to_nested"]


class ConfigError(ValueError):
    """A configuration that cannot be used (the message says why and what is valid)."""


@dataclass(frozen=True)
class Field:
    """One configuration key: its default, type (``int``, ``float``, ``bool`` or ``str``), the valid
    choices of a name (``None``: any value of the type), whether it must be positive, and a
    one-line description (used by ``docs/cli.md``)."""

    default: Any
    type: type
    help: str
    choices: tuple | None = None
    positive: bool = False
    nonnegative: bool = False


def _data_names() -> tuple:
    from ..generative.data import TOY_DENSITIES

    return tuple(TOY_DENSITIES) + _graph_data_names()


def _graph_data_names() -> tuple:
    from ..generative.graphs.data import DATASETS

    return tuple(DATASETS)


def _model_names() -> tuple:
    from ._models import MODELS

    return tuple(MODELS)


# The choices of data.name and model.type come from their registries (filled in lazily).
_LAZY_CHOICES = {"data.name": _data_names, "model.type": _model_names}

#: every key of a training configuration
SCHEMA: dict[str, Field] = {
    "seed": Field(0, int, "seeds the initial weights, the data and the noise of every step", nonnegative=True),
    "dtype": Field("float32", str, "floating-point type of the model and the data", choices=("float32", "float64")),
    "device": Field("auto", str, "'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    "data.name": Field(
        "moons", str, "built-in 2-D data set (torchnde.generative.data), or a graph data set for model.type 'gdss'"
    ),
    "data.n_graphs": Field(100, int, "gdss: graphs generated from the seed (train/test split)", positive=True),
    "data.test_fraction": Field(0.2, float, "gdss: fraction of data.n_graphs held out as the test set", positive=True),
    "data.max_nodes": Field(0, int, "gdss: padded node count N (0: the largest graph)", nonnegative=True),
    "model.type": Field("vp", str, "'vp' (VP-SDE score model), 'flow_matching' or 'gdss' (graphs)"),
    "model.hidden": Field(128, int, "width of the MLP's hidden layers", positive=True),
    "model.depth": Field(3, int, "number of hidden layers", positive=True),
    "model.time_features": Field(8, int, "sin/cos time-embedding frequencies", nonnegative=True),
    "model.beta_min": Field(0.1, float, "vp: beta(0) of the VP-SDE", nonnegative=True),
    "model.beta_max": Field(20.0, float, "vp: beta(1) of the VP-SDE", positive=True),
    "model.t0": Field(1e-3, float, "vp: smallest diffusion time (training and sampling)", positive=True),
    "model.time_sampling": Field(
        "uniform",
        str,
        "vp, gdss: training times, 'uniform' in t or 'logsnr' (uniform in log-SNR: more weight on low noise)",
        choices=("uniform", "logsnr"),
    ),
    "model.coupling": Field(
        "independent", str, "flow_matching: 'independent' (CFM) or 'ot' (OT-CFM)", choices=("independent", "ot")
    ),
    "model.sigma": Field(0.0, float, "flow_matching: width of the Gaussian path around the line", nonnegative=True),
    "model.powers": Field(
        2, int, "gdss: adjacency powers (first-layer channels) of the adjacency network", positive=True
    ),
    "model.layers": Field(5, int, "gdss: attention layers of the adjacency network", positive=True),
    "model.channels": Field(8, int, "gdss: adjacency channels between attention layers", positive=True),
    "model.final_channels": Field(4, int, "gdss: adjacency channels out of the last attention layer", positive=True),
    "model.heads": Field(4, int, "gdss: attention heads per channel", positive=True),
    "model.adj_process": Field(
        "vp",
        str,
        "gdss: the adjacency's SDE, 'vp' (beta_min/beta_max, as the node features) or 've'",
        choices=("vp", "ve"),
    ),
    "model.sigma_min": Field(0.2, float, "gdss, adj_process 've': sigma(t0) of the VE-SDE", positive=True),
    "model.sigma_max": Field(1.0, float, "gdss, adj_process 've': sigma(1) of the VE-SDE", positive=True),
    "model.ema": Field(0.999, float, "gdss: EMA decay of the sampled weights (0: none)", nonnegative=True),
    "sample.snr": Field(0.05, float, "gdss: Langevin corrector's signal-to-noise ratio (pc, s4)", nonnegative=True),
    "train.steps": Field(2000, int, "optimiser steps in total", positive=True),
    "train.batch_size": Field(256, int, "global batch size (split across torchrun processes)", positive=True),
    "train.lr": Field(2e-3, float, "Adam learning rate", positive=True),
    "train.cosine": Field(True, bool, "decay the learning rate to 0 along a cosine over train.steps"),
    "train.checkpoint_every": Field(500, int, "write the checkpoint every N steps (and at the end)", positive=True),
    "train.log_every": Field(100, int, "report the loss every N steps", positive=True),
}


def _choices(key: str):
    f = SCHEMA[key]
    if f.choices is not None:
        return f.choices
    lazy = _LAZY_CHOICES.get(key)
    return lazy() if lazy is not None else None


def defaults() -> dict[str, Any]:
    """The default configuration (flat, dotted keys)."""
    return {k: f.default for k, f in SCHEMA.items()}


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, SCHEMA, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown configuration key {key!r} ({where}).{hint} Valid keys: {', '.join(SCHEMA)}")


def _check_value(key: str, value: Any, where: str) -> Any:
    """``value`` converted to the type of ``key`` (ints become floats), or :class:`ConfigError`."""
    f = SCHEMA[key]
    ok = True
    if f.type is bool:
        ok = isinstance(value, bool)
    elif f.type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif f.type is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            ok = math.isfinite(value)
    elif f.type is str:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{key} ({where}) must be {_type_name(f.type)}, got {value!r}")
    if f.positive and not value > 0:
        raise ConfigError(f"{key} ({where}) must be > 0, got {value!r}")
    if f.nonnegative and not value >= 0:
        raise ConfigError(f"{key} ({where}) must be >= 0, got {value!r}")
    choices = _choices(key)
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"invalid {key} {value!r} ({where}).{hint} Valid choices: {', '.join(map(str, choices))}")
    if key == "device":
        try:
            check_device_name(value, where)
        except UsageError as e:
            raise ConfigError(str(e)) from None
    return value


def _type_name(t: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[t]


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in SCHEMA:
            if not v:
                continue
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def to_nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 1e-3}`` -> ``{"train": {"lr": 1e-3}}``."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out


def _read_text(path: Path) -> str:
    """The file's text, or :class:`ConfigError` for one that is unreadable or not UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        bad = e.object[e.start : e.start + 1].hex()
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{bad} at line {line}, offset {e.start}); a configuration is a "
            "TOML or YAML text file saved as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration ({e.strerror or e})") from None


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """The keys set by a TOML (``.toml``) or YAML (``.yaml``/``.yml``, needs PyYAML) file, flat."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ConfigError(f"configuration file {str(path)!r} is a directory; give a .toml or .yaml file")
    if not path.is_file():
        raise ConfigError(f"configuration file {str(path)!r} does not exist")
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError as e:
                raise ConfigError("TOML configs need Python >= 3.11 or the tomli package (pip install tomli)") from e
        try:
            tree = tomllib.loads(_read_text(path))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"{path}: YAML configs need PyYAML, which is not installed (pip install pyyaml); "
                "TOML configs (.toml) need nothing beyond Python"
            ) from None
        try:
            tree = yaml.safe_load(_read_text(path)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a YAML config must be a mapping of keys to values")
    else:
        raise ConfigError(f"{path}: unknown configuration format {suffix!r}; use .toml, .yaml or .yml")
    return _flatten(tree)


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``. The value is read as a TOML value; if that
    fails it is taken as a plain string (so ``data.name=moons`` needs no quotes)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. train.lr=1e-3), got {text!r}")
    raw = raw.strip()
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            tomllib = None
    value: Any = raw
    if tomllib is not None:
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except Exception:
            value = raw
    elif raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        for conv in (int, float):
            try:
                value = conv(raw)
                break
            except ValueError:
                pass
    return key, value


def resolve(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple = (), *, base: dict | None = None
) -> dict[str, Any]:
    """The full, checked configuration: ``base`` (default: the defaults), then the file's keys,
    then ``overrides`` (``KEY=VALUE`` strings, applied in order)."""
    cfg = defaults() if base is None else dict(base)
    layers = []
    if path is not None:
        layers.append((load_file(path), f"in {path}"))
    if overrides:
        layers.append((dict(parse_override(o) for o in overrides), "from --set"))
    for values, where in layers:
        for key, value in values.items():
            if key not in SCHEMA:
                raise _unknown_key(key, where)
            cfg[key] = _check_value(key, value, where)
    return check(cfg)


def check(cfg: dict[str, Any], where: str = "in the configuration") -> dict[str, Any]:
    """Check a full flat configuration (e.g. one stored in a checkpoint); returns a checked copy."""
    out = {}
    for key, value in cfg.items():
        if key not in SCHEMA:
            raise _unknown_key(key, where)
        out[key] = _check_value(key, value, where)
    missing = [k for k in SCHEMA if k not in out]
    for k in missing:
        out[k] = SCHEMA[k].default
    if out["model.beta_max"] < out["model.beta_min"]:
        raise ConfigError(
            f"model.beta_max ({out['model.beta_max']}) must be >= model.beta_min ({out['model.beta_min']})"
        )
    if not out["model.t0"] < 1:
        raise ConfigError(f"model.t0 must be in (0, 1), got {out['model.t0']}")
    graph_data = out["data.name"] in _graph_data_names()
    if graph_data != (out["model.type"] == "gdss"):
        raise ConfigError(
            f"model.type {out['model.type']!r} and data.name {out['data.name']!r} do not go together: graph data sets "
            f"({', '.join(_graph_data_names())}) need model.type 'gdss', and 'gdss' needs one of them"
        )
    if not out["data.test_fraction"] < 1:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {out['data.test_fraction']}")
    if not out["model.sigma_min"] < out["model.sigma_max"]:
        raise ConfigError(
            f"model.sigma_min ({out['model.sigma_min']}) must be < model.sigma_max ({out['model.sigma_max']})"
        )
    if not out["model.ema"] < 1:
        raise ConfigError(f"model.ema must be in [0, 1), got {out['model.ema']}")
    return out
