"""torchdiffeq's fixed-step implicit methods on the problems of stiff_work_precision.py (run by
that script in a subprocess: once with the installed torchdiffeq, once with a source checkout
of a newer one put first on ``sys.path`` by ``--source``).

Reads ``{"methods": [...], "steps": [...], "problems": [names]}`` on stdin and prints one JSON
line per solve: problem, method, steps, y(T) (or null), vector-field evaluations, wall time,
the number of warnings torchdiffeq raised (its implicit solvers warn when their Broyden
iterations do not converge, and go on).
"""

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--source", default=None, help="a torchdiffeq source checkout to import instead of the installed one")
cli = p.parse_args()
if cli.source:
    sys.path.insert(0, cli.source)
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torchdiffeq  # noqa: E402
from stiff_work_precision import PROBLEMS  # noqa: E402

torch.set_num_threads(1)


def grid(name, T, n):
    """``n`` steps: log-spaced from 1e-6 for Robertson (its time scales span 11 decades), uniform
    otherwise."""
    if name.startswith("Robertson"):
        return torch.cat(
            [torch.zeros(1, dtype=torch.float64), torch.logspace(-6, math.log10(T), n, dtype=torch.float64)]
        )
    return torch.linspace(0.0, T, n + 1, dtype=torch.float64)


def main():
    spec = json.load(sys.stdin)
    for name in spec["problems"]:
        f, y0, T, _ = PROBLEMS[name]
        for method in spec["methods"]:
            for n in spec["steps"]:
                count = [0]

                def func(t, y, f=f, count=count):
                    count[0] += 1
                    return f(t, y, None)

                g = grid(name, T, n)
                t0 = time.perf_counter()
                with warnings.catch_warnings(record=True) as w, torch.no_grad():
                    warnings.simplefilter("always")
                    try:
                        out = torchdiffeq.odeint(
                            func, y0, torch.tensor([0.0, T], dtype=torch.float64), method=method,
                            options=dict(grid_constructor=lambda *a, g=g: g),
                        )[-1]  # fmt: skip
                        y = out.tolist() if bool(torch.isfinite(out).all()) else None
                        err = None
                    except Exception as e:  # noqa: BLE001 - reported, not hidden
                        y, err = None, f"{type(e).__name__}: {str(e)[:80]}"
                wall = time.perf_counter() - t0
                row = {"problem": name, "method": method, "steps": n, "y": y, "nfe": count[0], "wall": wall}
                row.update(warnings=len(w), error=err, version=torchdiffeq.__version__)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
