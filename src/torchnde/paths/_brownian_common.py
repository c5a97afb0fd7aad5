"""What the Brownian paths share: shape trees and their flat layout, argument checks, and the
common front end (:class:`_PathBase`: time clamping, ``evaluate``, per-sample times).

Both paths (:mod:`._tree`, :mod:`._grid`) sample, for every element of the requested shape, a
Brownian motion ``W`` on ``[t0, t1]`` from the counter-based generator of
:mod:`torchnde.paths._rng`, so values are a pure function of ``(seed, element, time)``:
deterministic, independent of the order of queries, identical on any device (up to the last ulp
of a float64 ``erfinv``). Interval statistics and Lévy areas: :mod:`._levy`.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from ._base import AbstractBrownianPath, BrownianIncrement, interval_times
from ._levy import _to_levy

_LEVY = {None: 1, "space-time": 2, "space-time-time": 3}
_STREAM_ROOT, _STREAM_SPLIT, _STREAM_LEAF, _STREAM_GRID = 11, 12, 13, 14


# ----------------------------------------------------------------------------------- shapes, seeds
def _is_shape(x) -> bool:
    return isinstance(x, torch.Size) or (
        isinstance(x, (tuple, list)) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)
    )


def _shape_leaves(tree) -> list[tuple[int, ...]]:
    if _is_shape(tree):
        if isinstance(tree, list) and len(tree) == 0:
            raise ValueError("shape: an empty list is not a shape; use () for a scalar")
        if any(i < 0 for i in tree):
            raise ValueError(f"shape {tuple(tree)} has a negative dimension")
        return [tuple(tree)]
    if isinstance(tree, dict):
        if not tree:
            raise ValueError("shape is an empty dict")
        return [leaf for k in sorted(tree) for leaf in _shape_leaves(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [leaf for x in tree for leaf in _shape_leaves(x)]
    raise ValueError(
        f"shape must be a torch.Size / tuple of ints, or a dict/tuple/list of them; got {tree!r} "
        f"(type {type(tree).__name__})"
    )


def _unflatten(tree, leaves: list):
    it = iter(leaves)

    def build(s):
        if _is_shape(s):
            return next(it)
        if isinstance(s, dict):
            built = {k: build(s[k]) for k in sorted(s)}
            return {k: built[k] for k in s}
        return type(s)(build(x) for x in s)

    return build(tree)


class _Layout:
    """Where each leaf of the shape tree lives in the flat ``(rows * cols,)`` element vector."""

    def __init__(self, shape, seed):
        self.tree = shape
        self.single = _is_shape(shape)
        self.leaves = _shape_leaves(shape)
        if isinstance(seed, torch.Tensor):
            if seed.dtype not in (torch.int64, torch.int32) or seed.dim() != 1:
                raise ValueError(
                    f"a seed tensor must be an int64 tensor of shape (B,); got {seed.dtype} {tuple(seed.shape)}"
                )
            b = seed.shape[0]
            for leaf in self.leaves:
                if len(leaf) == 0 or leaf[0] != b:
                    raise ValueError(
                        f"per-sample seeds of shape ({b},) need every leaf of shape to have leading dimension {b}; "
                        f"got leaf shapes {self.leaves}"
                    )
            self.rows = b
            self.row_shapes = [leaf[1:] for leaf in self.leaves]
        else:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"seed must be an int or an int64 tensor of shape (B,); got {seed!r}")
            self.rows = 1
            self.row_shapes = list(self.leaves)
        self.sizes = [math.prod(s) for s in self.row_shapes]
        self.offsets = [0, *itertools.accumulate(self.sizes)]
        self.cols = self.offsets[-1]
        self.per_sample = isinstance(seed, torch.Tensor)
        # a single tensor shape (not a tree): split is one reshape
        self.plain = self.single and not self.per_sample

    def split(self, flat: torch.Tensor):
        """``flat`` of shape ``(rows * cols,)`` (or ``(rows, cols)``) -> the tree of leaves."""
        if self.plain:
            return flat.reshape(self.leaves[0])
        if self.per_sample:
            flat = flat.reshape(self.rows, self.cols)
            if len(self.leaves) == 1:
                return _unflatten(self.tree, [flat.reshape(self.leaves[0])])
            outs = [flat[:, a:b].reshape(shape) for a, b, shape in zip(self.offsets, self.offsets[1:], self.leaves)]
        else:
            if len(self.leaves) == 1:
                return _unflatten(self.tree, [flat.reshape(self.leaves[0])])
            outs = [flat[a:b].reshape(shape) for a, b, shape in zip(self.offsets, self.offsets[1:], self.leaves)]
        return _unflatten(self.tree, outs)

    def split_rows(self, flat: torch.Tensor):
        """``flat`` of shape ``(N, rows * cols)`` -> the tree of leaves, each ``(N, *leaf)``."""
        n = flat.shape[0]
        if len(self.leaves) == 1:
            return _unflatten(self.tree, [flat.reshape(n, *self.leaves[0])])
        flat = flat.reshape(n, self.rows, self.cols)
        outs = [flat[:, :, a:b].reshape(n, *shape) for a, b, shape in zip(self.offsets, self.offsets[1:], self.leaves)]
        return _unflatten(self.tree, outs)


# ------------------------------------------------------------------------------- common front end
def _check_common(t0, t1, levy_area, dtype):
    t0 = float(t0)
    t1 = float(t1)
    if not (math.isfinite(t0) and math.isfinite(t1)) or not t0 < t1:
        raise ValueError(f"need finite t0 < t1; got t0={t0}, t1={t1}")
    if levy_area not in _LEVY:
        raise ValueError(f"levy_area must be None, 'space-time' or 'space-time-time'; got {levy_area!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype; got {dtype!r}")
    return t0, t1


def _internal_dtype(device) -> torch.dtype:
    # float64 everywhere except on backends without it (Apple MPS)
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class _PathBase(AbstractBrownianPath):
    def _init_common(self, t0, t1, shape, levy_area, seed, dtype, device):
        self.t0, self.t1 = _check_common(t0, t1, levy_area, dtype)
        self.levy_area = levy_area
        self.shape = shape
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.get_default_device()
        self._layout = _Layout(shape, seed)
        self._d = _LEVY[levy_area]
        self._idt = _internal_dtype(self.device)
        self.seed = seed
        # rounding slack for endpoint queries: a few ulps of float32 at the endpoints
        self._slack = 4 * float(torch.finfo(torch.float32).eps) * max(abs(self.t0), abs(self.t1), self.t1 - self.t0)
        # float times strictly between these are kept as they are by _clamp (its fast path in _time)
        self._inner = (self.t0 + self._slack, self.t1 - self._slack)

    def _clamp(self, t: float, name: str) -> float:
        """Times within float32 rounding of an endpoint are snapped to it; further out is an error."""
        if t <= self.t0 + self._slack:
            if t < self.t0 - self._slack:
                raise ValueError(f"{name}={t!r} is before t0={self.t0!r} of {type(self).__name__}")
            return self.t0
        if t >= self.t1 - self._slack:
            if t > self.t1 + self._slack:
                raise ValueError(f"{name}={t!r} is after t1={self.t1!r} of {type(self).__name__}")
            return self.t1
        return t

    def _clamp_array(self, t: np.ndarray, name: str) -> np.ndarray:
        """:meth:`_clamp` of many times (the same comparisons), as a new float64 array."""
        a = np.array(t, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has a non-finite time: {a[~np.isfinite(a)][0]!r}")
        low = a <= self.t0 + self._slack
        high = ~low & (a >= self.t1 - self._slack)
        if (a < self.t0 - self._slack).any():
            raise ValueError(
                f"{name}={a[a < self.t0 - self._slack][0]!r} is before t0={self.t0!r} of {type(self).__name__}"
            )
        if (a > self.t1 + self._slack).any():
            raise ValueError(
                f"{name}={a[a > self.t1 + self._slack][0]!r} is after t1={self.t1!r} of {type(self).__name__}"
            )
        a[low] = self.t0
        a[high] = self.t1
        return a

    def _intervals(self, s, t):
        """The user times of :meth:`increments` (float64 arrays) and their clamped copies."""
        ss, tt = interval_times(s, t)
        return ss, tt, self._clamp_array(ss, "s"), self._clamp_array(tt, "t")

    def _time(self, t, name: str):
        """A Python float (shared time) or a list of B floats (per-sample times)."""
        if type(t) is float and self._inner[0] < t < self._inner[1]:
            return t
        if isinstance(t, torch.Tensor):
            if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1 and self._layout.rows != 1):
                return self._clamp(t.item(), name)
            if t.dim() == 1 and t.shape[0] == self._layout.rows and self._layout.per_sample:
                return [self._clamp(v, name) for v in t.detach().to("cpu", torch.float64).tolist()]
            raise ValueError(
                f"{name} must be a float, a 0-d tensor, or a (B,) tensor with B = shape[0] = "
                f"{self._layout.rows} when the path has per-sample seeds; got a tensor of shape {tuple(t.shape)}"
            )
        return self._clamp(float(t), name)

    def evaluate(self, s, t=None):
        if t is None:
            return self.increment(self.t0, s).W
        return self.increment(s, t).W

    def increment(self, s, t) -> BrownianIncrement:
        s_ = self._time(s, "s")
        t_ = self._time(t, "t")
        if isinstance(s_, list) or isinstance(t_, list):
            return self._per_sample_times(s_, t_, s, t)
        key = (s_, t_)
        if self._last_key == key:
            return self._last
        if s_ <= t_:
            x, h, sign = self._stats(s_, t_), t_ - s_, 1.0
        else:
            x, h, sign = self._stats(t_, s_), s_ - t_, -1.0
        out = _to_levy(x, h, self._d, sign, self.dtype, self._layout)
        out = out._replace(dt=t - s)
        self._last_key, self._last = key, out
        return out

    def _per_sample_times(self, s_, t_, s, t) -> BrownianIncrement:
        """Per-sample times: one row (sample) at a time, each with its own seed (slow path)."""
        if not self._layout.per_sample:
            raise ValueError("(B,) query times need per-sample seeds (an int64 tensor seed of shape (B,))")
        rows = self._layout.rows
        ss = s_ if isinstance(s_, list) else [s_] * rows
        tt = t_ if isinstance(t_, list) else [t_] * rows
        parts = [[] for _ in range(3)]
        for b in range(rows):
            sub = self._row_path(b)
            inc = sub.increment(ss[b], tt[b])
            for i, v in enumerate((inc.W, inc.H, inc.K)):
                if v is not None:
                    parts[i].append(_rng_flat(v, sub._layout))
        outs = [None if not p else self._layout.split(torch.stack(p)) for p in parts]
        dt = (t if isinstance(t, torch.Tensor) else torch.as_tensor(t)) - (
            s if isinstance(s, torch.Tensor) else torch.as_tensor(s)
        )
        return BrownianIncrement(dt=dt, W=outs[0], H=outs[1], K=outs[2])

    def _row_path(self, b: int):
        if self._rows_cache is None:
            self._rows_cache = {}
        if b not in self._rows_cache:
            self._rows_cache[b] = self._make_row(b)
        return self._rows_cache[b]


def _rng_flat(tree, layout: _Layout) -> torch.Tensor:
    leaves = _flatten_tree(tree)
    return torch.cat([x.reshape(-1) for x in leaves]) if len(leaves) > 1 else leaves[0].reshape(-1)


def _flatten_tree(tree) -> list:
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree) for leaf in _flatten_tree(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [leaf for x in tree for leaf in _flatten_tree(x)]
    return [tree]


def _row_shape(tree):
    if _is_shape(tree):
        return tuple(tree)[1:]
    if isinstance(tree, dict):
        return {k: _row_shape(v) for k, v in tree.items()}
    return type(tree)(_row_shape(x) for x in tree)
