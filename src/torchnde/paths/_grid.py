"""A Brownian path sampled up front on a fixed grid (:class:`BrownianGrid`)."""

from __future__ import annotations

import bisect

import numpy as np
import torch

from . import _rng
from ._base import BrownianIncrement, interval_dt, tree_map, unstack_tree
from ._brownian_common import _STREAM_GRID, _PathBase, _row_shape
from ._levy import _scale_rows, _to_levy, _unit_sqrt

__all__ = ["BrownianGrid"]


class _FlatLayout:
    """A layout that leaves a flat vector flat (for :func:`_to_levy` rows)."""

    @staticmethod
    def split(flat: torch.Tensor) -> torch.Tensor:
        return flat


_FLAT = _FlatLayout()


def _neg(tree):
    return -tree if isinstance(tree, torch.Tensor) else tree_map(torch.neg, tree)


class BrownianGrid(_PathBase):
    """Brownian motion sampled up front on a fixed grid ``ts`` (for fixed steps known in advance).

    Every cell ``[ts[i], ts[i+1]]`` gets its increment (and ``H``, ``K``) from the same counter
    RNG as :class:`VirtualBrownianTree` (keyed by the cell index), with the same statistics. A query
    must be a union of consecutive cells (to rounding); otherwise a ValueError suggests the tree.
    One-cell queries are an indexing op; longer ones combine the cells exactly. ``ts`` is a
    1-d sequence/tensor of increasing times (``BrownianGrid.uniform(t0, t1, num_steps, shape)``
    for equal cells). Per-sample
    seeds as for the tree; per-sample (B,) query times are served row by row (slow path).
    """

    def __init__(self, ts, shape, *, levy_area=None, seed=0, dtype=torch.float32, device=None):
        grid = [float(v) for v in (ts.detach().cpu().reshape(-1).tolist() if isinstance(ts, torch.Tensor) else ts)]
        if len(grid) < 2:
            raise ValueError(f"ts needs at least two times; got {grid}")
        if any(b <= a for a, b in zip(grid, grid[1:])):
            raise ValueError("ts must be strictly increasing")
        self._init_common(grid[0], grid[-1], shape, levy_area, seed, dtype, device)
        self.ts = grid
        self._grid_np = np.array(grid, dtype=np.float64)
        self._last_key = None
        self._last = None
        self._rows_cache = None
        d, idt, dev = self._d, self._idt, self.device
        lengths = np.diff(np.array(grid))
        self._lengths = lengths.tolist()
        ekeys = _rng.element_keys(seed, self._layout.cols, device=dev)
        n = len(lengths)
        z = _rng.normals(
            ekeys, np.stack([_rng.node_keys(_STREAM_GRID, np.arange(n), j) for j in range(d)], 1).reshape(-1), dtype=idt
        )
        z = z.view(n, d, -1)
        # Cov(cell of length l) = S C(1) S with S = diag(l^0.5, l^1.5, l^2.5): one square root
        sq = torch.tensor(_scale_rows(lengths, d)[:, :, None] * _unit_sqrt(d)[None], dtype=idt, device=dev)
        # (n, d, M) local stats; without Levy areas the (1, 1) factors make it a plain product
        self._cells = sq * z if d == 1 else torch.bmm(sq, z)
        # one-cell answers, precomputed in the output dtype
        self._w1 = self._cells[:, 0].to(dtype)
        self._h1 = self._k1 = None
        if d >= 2:
            h = torch.tensor(lengths, dtype=idt, device=dev).view(n, 1)
            c = self._cells
            self._h1 = (c[:, 1] / h - c[:, 0] / 2).to(dtype)
            self._k1 = (c[:, 1] / (2 * h) - c[:, 2] / h**2 + c[:, 0] / 12).to(dtype) if d >= 3 else None
        self._tol = 1e-9 * (self.t1 - self.t0) + self._slack
        # fast path of increment()/evaluate(): one-cell queries between exact grid times (float
        # times that _time keeps as they are: no interior grid time within clamping slack of an end)
        self._pos = {v: i for i, v in enumerate(grid)}
        self._exact = all(self._inner[0] < v < self._inner[1] for v in grid[1:-1])
        self._rows = None  # per cell, the forward answer (W, H, K) in the path's shape, built on first use

    def _cell_rows(self) -> list:
        """The one-cell answers ``(W, H, K)`` (trees of views of the precomputed cells), per cell."""
        if self._rows is None:
            n = len(self._lengths)
            cols = []
            for v in (self._w1, self._h1, self._k1):
                if v is None:
                    cols.append([None] * n)
                elif self._layout.per_sample:
                    cols.append([self._layout.split(x) for x in v.unbind(0)])
                else:
                    cols.append(unstack_tree(self._layout.split_rows(v), n))
            self._rows = list(zip(*cols))
        return self._rows

    def _one_cell(self, s: float, t: float):
        """The answer of a one-cell query between exact grid times, or None."""
        i, j = self._pos.get(s), self._pos.get(t)
        if i is None or j is None or not self._exact:
            return None
        if j == i + 1:
            return BrownianIncrement(t - s, *self._cell_rows()[i])
        if i == j + 1:
            w, h, k = self._cell_rows()[j]
            return BrownianIncrement(t - s, _neg(w), h, None if k is None else _neg(k))
        return None

    def evaluate(self, s, t=None):
        if t is not None and type(s) is float and type(t) is float:
            i, j = self._pos.get(s), self._pos.get(t)
            if i is not None and j is not None and self._exact:
                if j == i + 1:
                    return self._cell_rows()[i][0]
                if i == j + 1:
                    return _neg(self._cell_rows()[j][0])
        return super().evaluate(s, t)

    @classmethod
    def uniform(cls, t0, t1, num_steps: int, shape, **kwargs) -> BrownianGrid:
        """The grid of ``num_steps`` equal cells on ``[t0, t1]``."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int; got {num_steps!r}")
        t0, t1 = float(t0), float(t1)
        grid = [t0 + (t1 - t0) * i / num_steps for i in range(num_steps)] + [t1]
        return cls(grid, shape, **kwargs)

    def __repr__(self):
        seed = f"tensor{tuple(self.seed.shape)}" if isinstance(self.seed, torch.Tensor) else self.seed
        return (
            f"BrownianGrid(t0={self.t0}, t1={self.t1}, num_cells={len(self._lengths)}, shape={self.shape}, "
            f"levy_area={self.levy_area!r}, seed={seed}, dtype={self.dtype}, device={self.device})"
        )

    def _make_row(self, b: int):
        return BrownianGrid(
            self.ts,
            _row_shape(self.shape),
            levy_area=self.levy_area,
            seed=int(self.seed[b]),
            dtype=self.dtype,
            device=self.device,
        )

    def _index(self, t: float) -> int:
        j = self._pos.get(t)
        if j is not None:  # a grid time: its own index (the nearest, at distance 0)
            return j
        i = bisect.bisect_left(self.ts, t)
        cands = [j for j in (i - 1, i) if 0 <= j < len(self.ts)]
        j = min(cands, key=lambda j: abs(self.ts[j] - t))
        if abs(self.ts[j] - t) <= self._tol:
            return j
        raise ValueError(
            f"BrownianGrid: time {t!r} is not on its grid (nearest grid times "
            f"{self.ts[max(i - 1, 0)]!r}, {self.ts[min(i, len(self.ts) - 1)]!r}); queries must be unions "
            f"of grid cells. Use VirtualBrownianTree for arbitrary query times."
        )

    def _index_array(self, t: np.ndarray) -> np.ndarray:
        """:meth:`_index` of many (clamped) times: the nearest grid index (the earlier on a tie)."""
        g = self._grid_np
        n = g.shape[0]
        i = np.searchsorted(g, t, side="left")  # bisect_left
        before = np.where(i >= 1, np.abs(g[np.maximum(i - 1, 0)] - t), np.inf)
        after = np.where(i < n, np.abs(g[np.minimum(i, n - 1)] - t), np.inf)
        j = np.where(before <= after, i - 1, i)
        off = np.minimum(before, after) > self._tol
        if off.any():
            self._index(float(t[off][0]))  # raises, with the nearest grid times
        return j

    def increments(self, s, t) -> BrownianIncrement:
        """``increment(s[k], t[k])`` for ``k < N``, stacked (:meth:`AbstractBrownianPath.increments`):
        one-cell intervals (the steps of the grid, either direction) by one gather from the
        precomputed cells, longer ones combined as :meth:`increment` combines them; row ``k``
        equals ``increment(s[k], t[k])`` bit for bit. The times are shared by all samples."""
        ss, tt, sa, ta = self._intervals(s, t)
        i, j = self._index_array(sa), self._index_array(ta)
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        flip = i > j
        one = hi == lo + 1
        dev = self.device
        idx = torch.as_tensor(np.where(one, lo, 0), device=dev)
        neg = torch.as_tensor(flip, device=dev).view(-1, 1) if flip.any() else None
        outs = []
        for v, odd in ((self._w1, True), (self._h1, False), (self._k1, True)):
            if v is None:
                outs.append(None)
                continue
            x = v.index_select(0, idx)
            outs.append(torch.where(neg, -x, x) if odd and neg is not None else x)
        for k in np.flatnonzero(~one).tolist():  # empty or several cells: as increment() computes them
            a, b, sign = int(lo[k]), int(hi[k]), -1.0 if flip[k] else 1.0
            if a == b:
                x, h = torch.zeros_like(self._cells[0]), 0.0
            else:
                x, h = self._combine_cells(a, b)
            row = _to_levy(x, h, self._d, sign, self.dtype, _FLAT)
            for out, v in zip(outs, row[1:]):
                if out is not None:
                    out[k] = v
        split = self._layout.split_rows
        return BrownianIncrement(interval_dt(ss, tt), *(None if v is None else split(v) for v in outs))

    def increment(self, s, t) -> BrownianIncrement:
        if type(s) is float and type(t) is float:
            out = self._one_cell(s, t)
            if out is not None:
                return out
        s_ = self._time(s, "s")
        t_ = self._time(t, "t")
        if isinstance(s_, list) or isinstance(t_, list):
            return self._per_sample_times(s_, t_, s, t)
        i, j = self._index(s_), self._index(t_)
        sign = 1.0
        if i > j:
            i, j, sign = j, i, -1.0
        if j == i + 1:  # one cell: indexing only
            split = self._layout.split
            w = self._w1[i]
            return BrownianIncrement(
                dt=t - s,
                W=split(w if sign > 0 else -w),
                H=None if self._h1 is None else split(self._h1[i]),
                K=None if self._k1 is None else split(self._k1[i] if sign > 0 else -self._k1[i]),
            )
        key = (i, j, sign)
        if self._last_key == key:
            return self._last
        if i == j:
            x = torch.zeros_like(self._cells[0])
            h = 0.0
        else:
            x, h = self._combine_cells(i, j)
        out = _to_levy(x, h, self._d, sign, self.dtype, self._layout)._replace(dt=t - s)
        self._last_key, self._last = key, out
        return out

    def _combine_cells(self, i: int, j: int) -> tuple[torch.Tensor, float]:
        """Local stats of ``[ts[i], ts[j]]`` as weighted sums over its cells (exact combination)."""
        d = self._d
        s, t = self.ts[i], self.ts[j]
        a = np.array(self.ts[i:j])
        b = np.array(self.ts[i + 1 : j + 1])
        cells = self._cells[i:j]  # (m, d, M)
        w = cells[:, 0].sum(0)
        rows = [w]
        if d >= 2:
            # I = sum I_c + sum W_c (t - b_c)
            wt = torch.tensor(t - b, dtype=self._idt, device=self.device)
            rows.append(cells[:, 1].sum(0) + wt @ cells[:, 0])
        if d >= 3:
            # J = sum [J_c + (a_c - s) I_c] + sum W_c ((t-s)^2 - (b_c-s)^2)/2
            wa = torch.tensor(a - s, dtype=self._idt, device=self.device)
            wj = torch.tensor(((t - s) ** 2 - (b - s) ** 2) / 2, dtype=self._idt, device=self.device)
            rows.append(cells[:, 2].sum(0) + wa @ cells[:, 1] + wj @ cells[:, 0])
        return torch.stack(rows), t - s
