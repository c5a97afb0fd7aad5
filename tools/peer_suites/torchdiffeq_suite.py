"""Run torchdiffeq's own test suite (or its examples) against ``torchnde.compat.torchdiffeq``.

Nothing of torchdiffeq is copied into torchnde: the script builds, in a temporary directory
outside the repository, a shim package named ``torchdiffeq`` whose ``__init__`` re-exports
``torchnde.compat.torchdiffeq``, puts it first on ``PYTHONPATH`` and runs the test files of a
torchdiffeq checkout (default ``/work/peers/torchdiffeq``) with pytest, one file at a time, each in
its own process with a timeout, then prints the pass/fail counts per file.

Usage::

    python tools/peer_suites/torchdiffeq_suite.py [--peer DIR] [--files odeint_tests.py ...]
        [--native] [--timeout S] [-k EXPR] [--junit-dir DIR]
    python tools/peer_suites/torchdiffeq_suite.py --example ode_demo.py -- --niters 10

``--native`` runs the same files against the installed torchdiffeq instead (the reference).
``--example`` runs one of the checkout's ``examples/`` scripts through the shim, unchanged (only
the import is redirected), with the arguments after ``--``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHIM = '''"""Shim: torchdiffeq's names, computed by torchnde (built by tools/peer_suites)."""
from torchnde.compat.torchdiffeq import *  # noqa: F401,F403
from torchnde.compat.torchdiffeq import __all__  # noqa: F401
'''

FILES = ("api_tests.py", "event_tests.py", "gradient_tests.py", "norm_tests.py", "odeint_tests.py")


def build_shim(root: Path) -> Path:
    pkg = root / "torchdiffeq"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(SHIM)
    return root


def _env(shim_root: Path | None, extra: list[str]) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    paths = ([str(shim_root)] if shim_root is not None else []) + extra
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["MPLBACKEND"] = "Agg"
    return env


_SUMMARY = re.compile(r"(\d+) (passed|failed|error|errors|skipped|deselected)")


def run_file(path: Path, env: dict, timeout: float, k: str | None, junit: Path | None) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(path.name)]
    if k:
        cmd += ["-k", k]
    if junit is not None:
        cmd += [f"--junitxml={junit / (path.stem + '.xml')}"]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=path.parent, env=env, capture_output=True, text=True, timeout=timeout)
        text = out.stdout + out.stderr
        timed_out = False
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        timed_out = True
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    last = [ln for ln in text.splitlines() if " in " in ln and ("passed" in ln or "failed" in ln or "error" in ln)]
    if last:
        for n, what in _SUMMARY.findall(last[-1]):
            what = "error" if what.startswith("error") else what
            if what in counts:
                counts[what] += int(n)
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)))
    return {
        "counts": counts,
        "seconds": time.perf_counter() - t0,
        "timed_out": timed_out,
        "failed": failed,
        "text": text,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", default="/work/peers/torchdiffeq", help="a torchdiffeq checkout (with tests/, examples/)")
    ap.add_argument("--files", nargs="*", default=list(FILES), help="test files under tests/ to run")
    ap.add_argument("--native", action="store_true", help="run against the installed torchdiffeq (no shim)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per file")
    ap.add_argument("-k", default=None, help="pytest -k expression")
    ap.add_argument("--junit-dir", default=None, help="write one JUnit XML per file here")
    ap.add_argument("--show-failures", action="store_true", help="list the failing test ids")
    ap.add_argument("--example", default=None, help="run examples/<name> through the shim instead of the tests")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for --example, after --")
    args = ap.parse_args(argv)
    peer = Path(args.peer).resolve()
    repo_src = Path(__file__).resolve().parents[2] / "src"
    with tempfile.TemporaryDirectory(prefix="torchdiffeq_shim_") as tmp:
        shim = None if args.native else build_shim(Path(tmp))
        env = _env(shim, [] if args.native else [str(repo_src)])
        if args.example:
            rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
            workdir = Path(tmp) / "run"
            workdir.mkdir()
            t0 = time.perf_counter()
            rc = subprocess.run(
                [sys.executable, str(peer / "examples" / args.example), *rest], cwd=workdir, env=env
            ).returncode
            print(
                f"{args.example}: exit {rc} in {time.perf_counter() - t0:.1f} s ({'native' if args.native else 'torchnde'})"
            )
            return rc
        junit = Path(args.junit_dir).resolve() if args.junit_dir else None
        if junit is not None:
            junit.mkdir(parents=True, exist_ok=True)
        total = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        for name in args.files:
            r = run_file(peer / "tests" / name, env, args.timeout, args.k, junit)
            c = r["counts"]
            for key in total:
                total[key] += c[key]
            note = " (TIMED OUT)" if r["timed_out"] else ""
            print(
                f"{name:22s} passed {c['passed']:4d}  failed {c['failed']:4d}  errors {c['error']:3d}  "
                f"skipped {c['skipped']:3d}  {r['seconds']:7.1f} s{note}",
                flush=True,
            )
            if not any(c.values()):
                print(r["text"][-3000:])
            if args.show_failures:
                for f in r["failed"]:
                    print("   ", f)
        print(
            f"{'total':22s} passed {total['passed']:4d}  failed {total['failed']:4d}  errors {total['error']:3d}  "
            f"skipped {total['skipped']:3d}  ({'native torchdiffeq' if args.native else 'torchnde.compat.torchdiffeq'})"
        )
        return 0 if total["failed"] == 0 and total["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
