"""What the peer-suite runners share: writing a shim package into a temporary folder, and
reading pytest's closing counts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)")


def write_shim(root: Path, package: str, modules: dict[str, str], extra: dict[str, str] | None = None) -> Path:
    """Write ``package`` (its ``{module file name: source}``) under ``root``, and ``extra`` files
    beside it; return ``root``, the directory to put first on PYTHONPATH."""
    pkg = root / package
    pkg.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (pkg / name).write_text(source)
    for name, source in (extra or {}).items():
        (root / name).write_text(source)
    return root


def parse_counts(text: str) -> dict:
    """pytest's closing line as ``{"passed": n, "failed": n, ...}`` (empty if there is none)."""
    counts = {}
    for line in reversed(text.splitlines()):
        if re.search(r"\b(passed|failed|error|skipped|no tests ran|deselected)\b", line) and (
            "=" in line or " in " in line
        ):
            for n, what in _COUNT.findall(line):
                what = {"error": "errors", "warning": "warnings"}.get(what, what)
                counts[what] = counts.get(what, 0) + int(n)
            if counts:
                break
    return counts


def shim_env(shim_root: Path | None) -> dict:
    """The environment for a peer's test run: one thread (the runs are timed against each other),
    and the shim first on PYTHONPATH unless ``shim_root`` is None (a native run)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    if shim_root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(shim_root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_test_files(files, cwd: Path, env: dict, pytest_args: list, k: str | None, log_dir: Path | None) -> dict:
    """Run each test file in its own pytest process, print its counts and time and the totals, and
    return the total counts (a file whose output has no closing line counts as one error)."""
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    total, total_t = {}, 0.0
    for f in files:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=append", *pytest_args]
        cmd += [str(f)] + (["-k", k] if k else [])
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        out = res.stdout + res.stderr
        if log_dir:
            (log_dir / f"{f.stem}.log").write_text(out)
        counts = parse_counts(out)
        if not counts:
            counts = {"errors": 1}
            print(out[-3000:])
        total_t += dt
        for key, v in counts.items():
            total[key] = total.get(key, 0) + v
        print(f"{f.name:32s} {_shown(counts):50s} {dt:8.1f} s", flush=True)
    print(f"{'total':32s} {_shown(total):50s} {total_t:8.1f} s", flush=True)
    return total


def _shown(counts: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items() if k != "warnings")
