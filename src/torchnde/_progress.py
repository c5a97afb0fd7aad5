"""Optional progress meter for long solves."""

from __future__ import annotations

import sys
import time

__all__ = ["TextProgress", "make_progress"]


class TextProgress:
    """A dependency-free progress line on stderr, redrawn at most every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2, file=None):
        self.interval = interval
        self.file = file or sys.stderr

    def start(self, t0: float, t1: float) -> None:
        self.t0, self.t1 = t0, t1
        self.last = 0.0
        self.began = time.perf_counter()

    def update(self, t: float) -> None:
        now = time.perf_counter()
        if now - self.last < self.interval:
            return
        self.last = now
        frac = min(max((t - self.t0) / (self.t1 - self.t0), 0.0), 1.0)
        bar = "#" * int(30 * frac)
        self.file.write(f"\rsolve |{bar:<30}| {100 * frac:5.1f}%  t={t:.6g}  {now - self.began:.1f}s")
        self.file.flush()

    def close(self) -> None:
        self.last = 0.0
        self.update(self.t1)
        self.file.write("\n")
        self.file.flush()


class _TqdmProgress:
    def __init__(self):
        from tqdm.auto import tqdm

        self._tqdm = tqdm

    def start(self, t0, t1):
        self.t0, self.span = t0, t1 - t0
        self.bar = self._tqdm(total=1000, desc="solve", unit="‰", leave=False)
        self.done = 0

    def update(self, t):
        n = int(1000 * min(max((t - self.t0) / self.span, 0.0), 1.0))
        if n > self.done:
            self.bar.update(n - self.done)
            self.done = n

    def close(self):
        self.bar.close()


class _Internal:
    """Adapts a user meter to the loop's internal (forward) time."""

    def __init__(self, meter, sign):
        self.meter, self.sign = meter, sign

    def update(self, tau):
        self.meter.update(float(tau) * self.sign)

    def close(self):
        self.meter.close()


def make_progress(progress, tau0, tau1, sign):
    if progress is None or progress is False:
        return None
    if progress is True:
        try:
            meter = _TqdmProgress()
        except ImportError:
            meter = TextProgress()
    elif all(callable(getattr(progress, m, None)) for m in ("start", "update", "close")):
        meter = progress
    else:
        raise TypeError(
            f"progress must be None, True, or an object with start(t0, t1), update(t) and close(); got {progress!r}"
        )
    lo = float(tau0.min()) if hasattr(tau0, "min") else float(tau0)
    hi = float(tau1.max()) if hasattr(tau1, "max") else float(tau1)
    meter.start(lo * sign, hi * sign)
    return _Internal(meter, sign)
