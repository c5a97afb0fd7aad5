"""What the peer-suite runners share: writing a shim package into a temporary folder, and
reading pytest's closing counts."""

from __future__ import annotations

import re
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
