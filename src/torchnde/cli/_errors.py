"""What the ``torchnde`` commands share to turn bad input into one-line messages: the checks of
output locations and devices, and the one mapping from errors to exit statuses
(:func:`exit_status`, used by :func:`torchnde.cli.main` for every command).

Exit statuses: ``0`` success; ``1`` a failure while running (an unreadable checkpoint, a solve that
failed, a file system error while writing); ``2`` bad input (arguments, configuration, output
location, device); ``130`` interrupted. Set ``TORCHNDE_TRACEBACK=1`` in the environment to get the
Python traceback instead of the one-line message.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

__all__ = [
    "UsageError",
    "DEVICES",
    "check_device_name",
    "resolve_device",
    "prepare_output_dir",
    "prepare_output_file",
    "exit_status",
    "describe",
]


class UsageError(ValueError):
    """Input a command cannot use (the message says what was given and what is expected)."""


# --------------------------------------------------------------------------------------- devices
#: the device names the commands accept
DEVICES = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
_DEVICE = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")


def check_device_name(value: str, where: str = "") -> str:
    """``value`` if it is a device name the commands accept (see :data:`DEVICES`), else
    :class:`UsageError`. Only the spelling: whether the device exists is :func:`resolve_device`'s
    check (a configuration written on a GPU machine must still load on a CPU-only one)."""
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        at = f" ({where})" if where else ""
        raise UsageError(f"invalid device {value!r}{at}; use {DEVICES}")
    return value


def resolve_device(
    value: str, local_rank: int = 0, dtype: torch.dtype | None = None, *, option: str = "--device"
) -> torch.device:
    """The :class:`torch.device` of a device name, after checking that this torch can use it:
    ``auto`` is CUDA when available and else the CPU, ``cuda`` is ``cuda:LOCAL_RANK`` (one GPU per
    torchrun process). Raises :class:`UsageError` naming the device, what is available and the
    option that sets it (``option``: ``"--device"``, or ``"--set device="`` for a configuration)."""
    check_device_name(value)
    fix = f"{option}{'' if option.endswith('=') else ' '}"
    if value == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            why = (
                f"this torch ({torch.__version__}) was built without CUDA"
                if torch.version.cuda is None
                else "no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)"
            )
            raise UsageError(f"device {value!r} is not available: {why}; use {fix}cpu (or {fix}auto)")
        index = local_rank if value == "cuda" else int(value.split(":")[1])
        count = torch.cuda.device_count()
        if index >= count:
            raise UsageError(
                f"device {value!r}{' (torchrun local rank ' + str(local_rank) + ')' if value == 'cuda' else ''} "
                f"does not exist: {count} CUDA device(s) are visible (cuda:0 .. cuda:{count - 1})"
            )
        return torch.device(f"cuda:{index}")
    if value == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(
                f"device 'mps' is not available in this torch ({torch.__version__}) on this machine; use {fix}cpu"
            )
        if dtype == torch.float64:
            raise UsageError("device 'mps' does not support float64: use dtype float32 or another device")
        return torch.device("mps")
    return torch.device("cpu")


# ------------------------------------------------------------------------------- output locations
def prepare_output_dir(path, option: str = "--out", *, label: str | None = None) -> Path:
    """Create the output directory ``path`` (with its parents) if needed and check that files can
    be written in it, so that a command fails before its work rather than after it. Raises
    :class:`UsageError` naming ``option`` and the path (or ``label`` instead), and the reason."""
    p = Path(path)
    label = label or f"{option} {str(p)!r}"
    if p.exists() and not p.is_dir():
        raise UsageError(f"{label}: {str(p)!r} is an existing file, not a directory")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{label}: {str(parent)!r} is a file, so no directory can be made in it")
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{label}: cannot create the directory {str(p)!r} ({e.strerror or e})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".torchnde-write-check-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{label}: cannot write files in {str(p)!r} ({e.strerror or e})") from None
    return p


def prepare_output_file(path, suffixes: tuple[str, ...], option: str = "--out") -> Path:
    """Check an output file name (its format by ``suffixes``, e.g. ``(".pt", ".npy")``) and prepare
    its directory (:func:`prepare_output_dir`). An existing file is overwritten later."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(
            f"{option} {str(p)!r} is a directory: give a file name such as {str(p / ('x' + suffixes[0]))!r}"
        )
    if p.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {str(p)!r}: unknown output format {p.suffix!r}; use {', '.join(suffixes)}")
    prepare_output_dir(p.parent, label=f"{option} {str(p)!r}")
    return p


# ------------------------------------------------------------------------------------- exit status
def describe(error: BaseException) -> str:
    """A one-line description of ``error`` for a command's ``error:`` line."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename!s}" if error.filename is not None else ""
        return f"{error.strerror}{where}"
    return str(error) or type(error).__name__


def exit_status(error: BaseException) -> int | None:
    """The exit status of a command that raised ``error``, or ``None`` for an error that is not
    an expected failure (a bug: then the traceback is shown)."""
    from .._results import SolveError
    from ._checkpoint import CheckpointError
    from ._deps import MissingDependencyError

    if isinstance(error, (CheckpointError, SolveError, MissingDependencyError, OSError)):
        return 1
    if isinstance(error, ValueError):  # UsageError, ConfigError, and the library's input checks
        return 2
    return None
