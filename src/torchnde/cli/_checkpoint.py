"""Checkpoints of ``torchnde train``: written atomically, loaded without unpickling code.

A checkpoint is a ``dict`` holding only tensors and plain Python values (``dict``, ``list``,
``tuple``, ``str``, ``int``, ``float``, ``bool``, ``None``), so it loads with
``torch.load(weights_only=True)``, which refuses anything that would run code while unpickling:

=================  =========================================================================
key                value
=================  =========================================================================
``format``         ``"torchnde.cli/checkpoint"`` (what :func:`load_checkpoint` checks first)
``version``        the format version, :data:`VERSION`
``model_type``     the ``model.type`` of the configuration (``"vp"``, ``"flow_matching"``)
``config``         the resolved configuration (flat dotted keys)
``step``           optimiser steps taken
``model``          the model's ``state_dict``
``optimizer``      the Adam optimiser's ``state_dict`` (moments and per-parameter step counts)
``rng``            ``{"torch": ByteTensor, "cuda": [ByteTensor, ...]}``: random-number states
``log``            ``[[step, loss], ...]`` at every logging step
``world_size``     the number of processes that trained it (informative)
``torchnde``       the torchnde version that wrote it
=================  =========================================================================

:func:`save_checkpoint` writes to a temporary file in the target's directory, flushes it to disk
and renames it over the target with :func:`os.replace` (atomic on POSIX and Windows), so an
interruption leaves either the previous checkpoint or the new one, never a partial file.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint", "check_plain"]

FORMAT = "torchnde.cli/checkpoint"
VERSION = 1
_REQUIRED = ("model_type", "config", "step", "model", "optimizer", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read or used (the message says which and why)."""


_PLAIN = (str, int, float, bool, type(None))


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``obj`` is made only of tensors and plain values."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where}: key {k!r} is not a str or int")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(f"{where} is a {type(obj).__name__}: a checkpoint may hold only tensors and plain values")


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus the ``format``/``version`` header) to ``path`` atomically."""
    path = Path(path)
    data = {"format": FORMAT, "version": VERSION, **payload}
    check_plain(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (not possible on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> dict[str, Any]:
    """Load and check a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`CheckpointError` for a missing, corrupt or unsafe file (one that holds Python
    objects ``weights_only=True`` refuses), for a file that is not a ``torchnde train`` checkpoint,
    and for a model type this version does not know.
    """
    from ._models import MODELS

    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "GLOBAL" in text:  # the weights-only unpickler met a class or function: unsafe
            found = re.search(r"GLOBAL:? ?([\w.]+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"refusing to load {str(path)!r}: it holds Python objects{what} other than tensors and plain "
                "values, which could run code when unpickled (torch.load(weights_only=True) rejected it)"
            ) from None
        raise CheckpointError(
            f"cannot read {str(path)!r}: the file is corrupt or not a PyTorch file (unpickling failed)"
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"cannot read {str(path)!r}: the file is corrupt or not a PyTorch file ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint written by 'torchnde train'")
    if ck.get("version") != VERSION:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint format version {ck.get('version')!r}; this torchnde reads version {VERSION}"
        )
    missing = [k for k in _REQUIRED if k not in ck]
    if missing:
        raise CheckpointError(f"{str(path)!r} is incomplete: it lacks {', '.join(missing)}")
    if ck["model_type"] not in MODELS:
        raise CheckpointError(
            f"{str(path)!r} holds a model of type {ck['model_type']!r}, which this torchnde does not know; "
            f"known types: {', '.join(MODELS)}"
        )
    ck["path"] = str(path)
    return ck
