"""What the benchmark scripts share: the machine description of their reports, and a cProfile
dump. The scripts run alone (``python benchmarks/NAME.py``), so this folder is on ``sys.path``."""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import platform
import pstats
from pathlib import Path

import torch

import torchnde as tn


def machine_info(**peers: str) -> dict[str, str]:
    """CPU, torch (with its thread counts), torchnde, the given peer libraries' versions
    (``**{"label": version}``) and
    Python, for the "Machine" section of a report."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "CPU": f"{cpu} ({os.cpu_count()} logical cores)",
        "torch": f"{torch.__version__} (threads: {torch.get_num_threads()} intra-op, "
        f"{torch.get_num_interop_threads()} inter-op)",
        "torchnde": getattr(tn, "__version__", "?"),
        **peers,
        "Python": f"{platform.python_version()} ({platform.system()} {platform.release()})",
    }


def log_profile(run_once, reps: int, title: str, log, limit: int = 20) -> None:
    """Call ``run_once(i)`` once to warm up, then ``reps`` times under cProfile, and log the
    ``limit`` functions with the most self time under ``title``."""
    run_once(0)
    pr = cProfile.Profile()
    pr.enable()
    for i in range(reps):
        run_once(i)
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(limit)
    log(f"{title}, by self time:")
    log(out.getvalue())
