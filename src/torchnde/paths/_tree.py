"""The virtual Brownian tree (Gaines & Lyons 1997, "Variable step size control in the numerical
solution of stochastic differential equations"; Li, Wong, Chen & Duvenaud 2020, "Scalable
gradients for stochastic differential equations"; Kidger, Foster, Li & Lyons 2021, "Efficient and
accurate gradients for neural SDEs"): dyadic halving of ``[t0, t1]`` down to leaves of length at
most ``tol``; a time inside a leaf is reached by a last conditional split of the leaf, driven by the
leaf's own key. An interval ``[s, t]`` is assembled from interval-local pieces below the lowest
common ancestor of ``s`` and ``t`` (no cancellation between large prefix integrals).

The front end (lattice, speculative blocks of constant steps, the answer cache) is here; the
vectorised descent is :mod:`._descent`, the single-interval kept chains :mod:`._chains`, the
interval algebra :mod:`._levy`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _descent, _rng
from ._base import BrownianIncrement, interval_dt
from ._brownian_common import _STREAM_LEAF, _STREAM_ROOT, _STREAM_SPLIT, _PathBase, _row_shape
from ._chains import ChainCache, levy_numpy
from ._descent import _sibling_maps, _Work
from ._levy import (
    _combine_many,
    _cov,
    _levy_rows,
    _position_maps,
    _psd_sqrt,
    _split_many,
    _split_scaled,
    _uncombine_scaled,
)

__all__ = ["VirtualBrownianTree"]

# speculative blocks of consecutive steps: first size, largest size, and a cap on steps * d * elements
# (a level of a block's descent then stays near the CPU's L2 cache; measured at (256, 16))
_BLOCK_MIN, _BLOCK_MAX, _BLOCK_ELEMENTS = 8, 256, 1 << 16
# speculate after this many adjacent equal-length queries in a row (one run of 2 is common
# without constant steps: the two half steps of step doubling, whose block would be wasted)
_SPEC_RUN = 2
# increments(): intervals per vectorised descent, as a cap on intervals * d * elements (a chunk's
# scratch buffers are about 100 bytes per counted value: ~25 MiB, kept between calls; 2**17 to
# 2**19 measured within noise of each other at (256, 16))
_INCREMENTS_ELEMENTS = 1 << 18
# ... and on intervals per descent (its numpy planning holds a few (depth + 1, 2 intervals) arrays)
_INCREMENTS_MAX = 4096


# the constants of a tree's halving, per (span, depth, d) and per (dtype, device): they depend on
# nothing else, so trees of the same interval share them (exactly the values each would compute)
_HALVING: dict = {}
_HALVING_TENSORS: dict = {}
_HALVING_KEEP = 32


def _halving(span: float, depth: int, d: int, idt, dev):
    """``(split1, ab_cols, root_sqrt)`` of a tree on an interval of length ``span``: per level the
    halving matrix ``[AA | BB]`` (both children ``= [AA | BB] @ [parent; z]``) as columns
    ``ab_cols[lev, j]`` (a tensor, read only), ``split1[lev] = (a, b)`` where the children are
    ``a W + b z`` and ``a W - b z`` (d = 1) else None, and the root's covariance square root."""
    key = (span, depth, d)
    consts = _HALVING.get(key)
    if consts is None:
        mats = []
        for lev in range(depth):
            length = span * 2.0**-lev
            a, b = _split_scaled(0.5, length, d)
            ar, br = _uncombine_scaled(0.5, length, d, a, b)
            mats.append(np.block([[a, b], [ar, br]]))
        mats = np.array(mats).reshape(-1, 2 * d, 2 * d)
        # d = 1: the children are a W + b z and a W - b z (exactly these products), two products
        # and two sums instead of four and two
        split1 = [
            (float(m[0, 0]), float(m[0, 1])) if d == 1 and m[1, 0] == m[0, 0] and m[1, 1] == -m[0, 1] else None
            for m in mats
        ]
        if len(_HALVING) >= _HALVING_KEEP:
            _HALVING.clear()
        consts = _HALVING[key] = (mats, split1, _psd_sqrt(_cov(span, d)))
    tkey = (*key, idt, str(dev))
    tensors = _HALVING_TENSORS.get(tkey)
    if tensors is None:
        mats, _, root_sqrt = consts
        ab = torch.tensor(mats, dtype=idt, device=dev)
        if len(_HALVING_TENSORS) >= _HALVING_KEEP:
            _HALVING_TENSORS.clear()
        tensors = _HALVING_TENSORS[tkey] = (
            ab.transpose(1, 2).reshape(-1, 2 * d, 1, 2 * d, 1),  # [lev, j] = column j
            torch.tensor(root_sqrt, dtype=idt, device=dev),
        )
    return consts[1], tensors[0], tensors[1]


def _root_keys(d: int, dev) -> torch.Tensor:
    """The node keys of the root's ``d`` components (an int32 tensor, cached per device)."""
    key = (d, str(dev))
    out = _HALVING_TENSORS.get(key)
    if out is None:
        keys = np.concatenate([_rng.node_keys(_STREAM_ROOT, [1], j) for j in range(d)])
        out = _HALVING_TENSORS[key] = torch.as_tensor(keys.astype(np.int32), device=dev)
    return out


class VirtualBrownianTree(_PathBase):
    """Brownian motion on ``[t0, t1]`` queried at any times, in any order, in O(1) memory.

    Args:
        t0, t1: the interval (``t0 < t1``).
        shape: a ``torch.Size`` / tuple of ints, or a dict/tuple/list tree of them; every query
            returns tensors (trees) of this shape.
        tol: time resolution: the tree halves ``[t0, t1]`` until its leaves are no longer than
            ``tol`` (default ``(t1 - t0) * 2**-20``). Queries at times at least a leaf apart are
            jointly exact in law; two times inside one leaf are joined by a bridge driven by the
            leaf's key, so their mutual increment is exact only up to the leaf size.
        levy_area: None, ``"space-time"`` (``H``) or ``"space-time-time"`` (``H`` and ``K``).
        seed: an int, or an int64 tensor ``(B,)`` of per-sample seeds (every leaf of ``shape`` then
            has leading dimension ``B``, and sample ``b`` equals the tree of shape ``shape[1:]``
            with ``seed=int(seed[b])``).
        dtype, device: of the returned tensors (internally float64 where the device has it).

    ``evaluate(s, t)`` is ``W(t) - W(s)`` (``s > t`` gives the negated increment), ``evaluate(s)``
    is ``W(s)`` with ``W(t0) = 0``; ``increment(s, t)`` also gives ``H`` (and ``K``). For a
    reversed interval (``s > t``) ``H`` and ``K`` are those of the literal definitions with signed
    ``h = t - s``, i.e. of the time-reversed Brownian motion: ``W -> -W``, ``H -> H``, ``K -> -K``
    relative to the forward interval ``[t, s]``. With per-sample seeds, ``s`` and ``t`` may also be
    ``(B,)`` tensors (one interval per sample), answered in one vectorised descent.

    Algorithm. Query times are first snapped to a lattice of ``2**(depth + extra)`` cells on
    ``[t0, t1]`` (spacing at most ``(t1 - t0) * 2**-36``, and at least 256 cells per leaf), so every
    value is a pure function of ``(seed, lattice time)`` computed with exact integer node
    arithmetic. A batch of intervals is answered by one *vectorised descent*
    (:meth:`_compute`): per level, all distinct nodes the batch needs are split at once (their
    normals drawn from the counter RNG a group of levels at a time), and each interval ``[s, t]``
    is assembled as an exact weighted sum of interval-local pieces below the lowest common
    ancestor of ``s`` and ``t`` (the tail of ``s``'s leaf, the right siblings on ``s``'s path, the
    left siblings on ``t``'s path, the head of ``t``'s leaf): no cancellation between large prefix
    integrals, so short intervals keep full float64 accuracy. Solvers with constant steps query
    ``[t_n, t_n + h]`` back to back; once three consecutive queries each start where the last
    ended, with the same length (two in a row are common without constant steps: the half steps
    of step doubling), the next ``K`` steps (``K`` doubling from 8 up to a cache-sized cap while the guesses are
    used) are computed in one descent and cached, and later queries are a dictionary lookup. A
    guessed time that differs from the solver's only by rounding snaps to the same lattice point;
    a query the guess missed is simply computed. Since a cached answer is the same function of the
    lattice times as a direct one, values do not depend on query order or on the speculation.
    Between calls the tree keeps the root-to-leaf chain of the last point (the next block starts
    there, and shares its top levels) and its scratch buffers; both are caches that change no
    value.
    """

    def __init__(self, t0, t1, shape, *, tol=None, levy_area=None, seed=0, dtype=torch.float32, device=None):
        self._init_common(t0, t1, shape, levy_area, seed, dtype, device)
        span = self.t1 - self.t0
        if tol is None:
            tol = span * 2.0**-20
        tol = float(tol)
        if not tol > 0:
            raise ValueError(f"tol must be positive; got {tol}")
        self.tol = tol
        self._depth = max(0, min(52, math.ceil(math.log2(span / tol) - 1e-12)))
        self._span = span
        # lattice: 2**extra cells per leaf, 2**bits on [t0, t1]
        self._extra = max(8, 36 - self._depth)
        self._bits = self._depth + self._extra
        self._cells = float(2**self._bits)
        self._q = span / self._cells
        self._ekeys = _rng.element_keys(seed, self._layout.cols, device=self.device)
        self._ek32 = _rng.element_keys32(self._ekeys)
        self._rows_cache = None
        d, idt, dev = self._d, self._idt, self.device
        # reused scratch buffers, and the kept root-to-leaf chain of the last call (see _compute)
        self._work = _Work(dev)
        self._chain = None
        self._chain_buf = None
        # halving matrices per level: both children (2d rows) = [AA | BB] @ [parent; z]
        self._split1, self._ab_cols, root_sqrt = _halving(span, self._depth, d, idt, dev)
        # the root's normals (as _rng.normals draws them, without recomputing the 32-bit keys)
        m = self._ek32.shape[0]
        z = torch.empty(d, m, dtype=torch.float64, device=dev)
        bits = torch.empty(d, m, dtype=torch.int32, device=dev)
        _rng.normals_into(z, self._ek32, _root_keys(d, dev), bits, torch.empty_like(bits))
        self._root = root_sqrt @ (z if idt == torch.float64 else z.to(idt))  # (d, M)
        # answers cache: a speculative block of consecutive steps, and the last direct query
        self._block: dict = {}
        self._block_vals = None
        self._block_last = None
        self._block_size = _BLOCK_MIN
        self._block_cap = max(
            2, min(_BLOCK_MAX, _BLOCK_ELEMENTS // (d * max(1, self._layout.cols * self._layout.rows)))
        )
        self._prev = None
        self._run = 0
        self._last_key = None
        self._last = None
        # single intervals of small shapes: kept root-to-leaf chains (see _chains.py)
        small = (2 * self._depth + 4) * d * self._ek32.shape[0] <= _descent._BATCH_ELEMENTS
        self._chains = (
            ChainCache(self, (_STREAM_SPLIT, _STREAM_LEAF), _split_many) if self._depth > 0 and small else None
        )

    def _condition(self, W: torch.Tensor, H: torch.Tensor | None = None) -> None:
        """Condition the tree on its increment ``W = W(t1) - W(t0)`` (a tensor of the path's shape)
        and, with a space-time Lévy area, optionally on ``H`` over ``[t0, t1]``: every query is then
        drawn from the Brownian bridge with these end values. Without ``H``, ``H`` is drawn from
        its law given ``W`` (independent of ``W``, variance ``(t1 - t0) / 12``) from the tree's own
        normals. Single-seed trees without the space-time-time area only."""
        d, h = self._d, self._span
        if self._layout.per_sample or d > 2 or not self._layout.single:
            raise NotImplementedError(
                "conditioning a VirtualBrownianTree on its end values needs one seed, a single tensor shape and no "
                "space-time-time Lévy area"
            )
        root = self._root
        if W.numel() != root.shape[1]:
            raise ValueError(f"W must have {root.shape[1]} elements (shape {self.shape}), got shape {tuple(W.shape)}")
        # the root is S z for the symmetric square root S of its covariance: recover the normals z
        cov_sqrt = torch.tensor(_psd_sqrt(_cov(h, d)), dtype=root.dtype, device=root.device)
        z = torch.linalg.solve(cov_sqrt, root)
        w = W.detach().reshape(-1).to(root)
        rows = [w]
        if d == 2:
            # U = int_t0^t1 (W_s - W_t0) ds = h (W / 2 + H)
            if H is None:
                rows.append(0.5 * h * w + math.sqrt(h**3 / 12) * z[1])
            else:
                if H.numel() != w.numel():
                    raise ValueError(f"H must have the shape of W {tuple(W.shape)}, got {tuple(H.shape)}")
                rows.append(h * (0.5 * w + H.detach().reshape(-1).to(root)))
        self._root = torch.stack(rows)
        self._chain = None
        if self._chains is not None:
            self._chains.clear()
        self._block, self._block_vals, self._block_last, self._prev, self._last_key, self._last = (
            {},
            None,
            None,
            None,
            None,
            None,
        )

    def __repr__(self):
        seed = f"tensor{tuple(self.seed.shape)}" if isinstance(self.seed, torch.Tensor) else self.seed
        return (
            f"VirtualBrownianTree(t0={self.t0}, t1={self.t1}, shape={self.shape}, tol={self.tol:.3g} "
            f"(depth {self._depth}), levy_area={self.levy_area!r}, seed={seed}, dtype={self.dtype}, "
            f"device={self.device})"
        )

    def _make_row(self, b: int):
        return VirtualBrownianTree(
            self.t0,
            self.t1,
            _row_shape(self.shape),
            tol=self.tol,
            levy_area=self.levy_area,
            seed=int(self.seed[b]),
            dtype=self.dtype,
            device=self.device,
        )

    # front end ------------------------------------------------------------------------------
    def _lattice(self, t: float) -> int:
        """The lattice point of a (clamped) time: ``round((t - t0) / (t1 - t0) * 2**bits)``."""
        return min(max(round((t - self.t0) / self._span * self._cells), 0), 1 << self._bits)

    def _lattice_array(self, t: np.ndarray) -> np.ndarray:
        """:meth:`_lattice` for an array of times (the same float operations, so the same points)."""
        return np.clip(np.rint((t - self.t0) / self._span * self._cells), 0, self._cells).astype(np.int64)

    def increment(self, s, t) -> BrownianIncrement:
        s_ = self._time(s, "s")
        t_ = self._time(t, "t")
        if isinstance(s_, list) or isinstance(t_, list):
            return self._per_sample_times(s_, t_, s, t)
        ns, nt = self._lattice(s_), self._lattice(t_)
        lo, hi, sign = (ns, nt, 1.0) if ns <= nt else (nt, ns, -1.0)
        prev, self._prev = self._prev, (ns, nt, s_, t_)
        # consecutive equal steps: the length of the current run of adjacent equal-length queries
        equal = (
            prev is not None
            and ns == prev[1]
            and ns != nt
            and abs((t_ - s_) - (prev[3] - prev[2])) <= 1e-9 * abs(t_ - s_)
        )
        self._run = self._run + 1 if equal else 0
        row = self._block.get((lo, hi))
        if row is not None:
            if row == len(self._block) - 1:
                self._block_last = True
            return self._answer(self._block_vals, row, sign, t - s)
        key = (ns, nt)
        if self._last_key == key:
            return self._last._replace(dt=t - s)
        if self._run >= _SPEC_RUN:  # constant steps: speculate the next ones
            self._block_size = min(2 * self._block_size, self._block_cap) if self._block_last else _BLOCK_MIN
            self._speculate(s_, t_ - s_)
            self._block_last = False
            return self._answer(self._block_vals, self._block[(lo, hi)], sign, t - s)
        if self._chains is not None:  # small shapes: from the kept chains (same values)
            x, h = self._chains.interval(self, lo, hi), (hi - lo) * self._q
            if isinstance(x, np.ndarray):
                vals = levy_numpy(x, h, self.dtype)
            else:
                vals = _levy_rows(x, np.array([h]), np.ones(1), self.dtype, self._work)
        else:
            vals = self._levy_of(np.array([lo]), np.array([hi]), None, keep=nt)
        out = self._answer(vals, 0, sign, t - s)
        self._last_key, self._last = key, out
        return out

    def increments(self, s, t) -> BrownianIncrement:
        """``increment(s[k], t[k])`` for ``k < N``, stacked (:meth:`AbstractBrownianPath.increments`):
        the intervals are answered by vectorised descents of at most ``_INCREMENTS_ELEMENTS``
        values each (:meth:`_compute`, the function every single query is also computed by, so
        row ``k`` equals ``increment(s[k], t[k])`` bit for bit). The times are shared by all samples
        (also with per-sample seeds: ``s[k]``, ``t[k]`` are floats)."""
        ss, tt, sa, ta = self._intervals(s, t)
        ns, nt = self._lattice_array(sa), self._lattice_array(ta)
        lo, hi = np.minimum(ns, nt), np.maximum(ns, nt)
        sign = np.where(ns <= nt, 1.0, -1.0)
        n = lo.shape[0]
        m = self._ek32.shape[0]  # elements (all samples' with per-sample seeds)
        chunk = max(1, min(_INCREMENTS_MAX, _INCREMENTS_ELEMENTS // (self._d * m or 1)))
        parts = []
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            x = self._compute(lo[a:b], hi[a:b], None)
            parts.append(_levy_rows(x, (hi[a:b] - lo[a:b]) * self._q, sign[a:b], self.dtype, self._work))
        self._work.trim()
        if not parts:
            empty = torch.empty(0, m, dtype=self.dtype, device=self.device)
            parts = [tuple(None if i >= self._d else empty for i in range(3))]
        split = self._layout.split_rows
        vals = [None if p[0] is None else split(p[0] if len(p) == 1 else torch.cat(p)) for p in zip(*parts)]
        return BrownianIncrement(interval_dt(ss, tt), *vals)

    def _speculate(self, s: float, h: float) -> None:
        """Compute and cache the steps ``[s + k h, s + (k + 1) h]``, ``k < K`` (clipped at the ends)."""
        end = self.t1 if h > 0 else self.t0
        pts = [self._lattice(s)]
        for k in range(1, self._block_size + 1):
            tk = s + k * h
            if (end - tk) * math.copysign(1.0, h) <= self._slack:
                pts.append(self._lattice(end))
                break
            pts.append(self._lattice(tk))
        n = np.array(pts, dtype=np.int64)
        lo, hi = np.minimum(n[:-1], n[1:]), np.maximum(n[:-1], n[1:])
        self._block_vals = self._levy_of(lo, hi, None, keep=pts[-1])
        self._block = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(lo.tolist(), hi.tolist()))}

    def _leaf_maps(self, lo: int, hi: int, sib_lev: np.ndarray, sib_node: list):
        """The weights of one interval's pieces, as :meth:`_compute` computes them: its leaf parts'
        (stats, then bridge normals: the shared leaf's, or the tail of ``lo``'s and the head of
        ``hi``'s) and its siblings' (at levels ``sib_lev``)."""
        D, E, d = self._depth, self._extra, self._d
        top = (1 << D) - 1
        ell = self._span * 2.0**-D
        ka, kb = min(lo >> E, top), min(hi >> E, top)
        ra, rb = (lo - (ka << E)) / float(1 << E), (hi - (kb << E)) / float(1 << E)
        if d == 1:
            # every map of _leaf_parts is 1 x 1 and its products are by 1.0 (exact): the weights
            # are the differences of the split coefficients a = r, b = sqrt(r (1 - r) ell)
            def b(r):
                return math.sqrt(max(r * (1 - r), 0.0) * ell)

            if ka == kb:
                g_stats, g_normals = [rb - ra], [b(rb) - b(ra)]
            else:
                g_stats, g_normals = [1.0 - ra, rb - 0.0], [b(1.0) - b(ra), b(rb) - b(0.0)]
            ones = np.ones((sib_lev.shape[0], 1, 1))
            return np.array(g_stats).reshape(-1, 1, 1), np.array(g_normals).reshape(-1, 1, 1), ones
        # _leaf_parts for one interval: its arrays built directly (the same values)
        step = self._q
        h = (hi - lo) * step
        if ka == kb:
            r_from, r_to, start, end = np.array([ra]), np.array([rb]), np.zeros(1), np.array([h])
        else:
            r_from, r_to = np.array([ra, 0.0]), np.array([1.0, rb])
            start = np.array([0.0, ((kb << E) - lo) * step])
            end = np.array([(((ka + 1) << E) - lo) * step, h])
        split = self._chains.split_rows
        a_from, b_from = split(r_from, ell, d)
        a_to, b_to = split(r_to, ell, d)
        c1, c2 = _combine_many(r_from * ell, (r_to - r_from) * ell, d)
        c2i = np.linalg.inv(c2)
        pm = _position_maps(start, end, np.full(r_from.shape[0], h), d)
        g_stats, g_normals = pm @ c2i @ (a_to - c1 @ a_from), pm @ c2i @ (b_to - c1 @ b_from)
        n = sib_lev.shape[0]
        g_sib = _sibling_maps(sib_lev, np.array(sib_node, dtype=np.int64), lo, np.full(n, h), self._bits, step, d)
        return g_stats, g_normals, g_sib

    def _levy_of(self, lo: np.ndarray, hi: np.ndarray, rows, keep=None):
        x = self._compute(lo, hi, rows, keep)
        out = _levy_rows(x, (hi - lo) * self._q, np.ones(lo.shape[0]), self.dtype, self._work)
        self._work.trim()
        return out

    def __getstate__(self):
        # scratch buffers and the kept chain are caches: not copied or pickled
        state = dict(self.__dict__)
        state.update(_work=_Work(self.device), _chain=None, _chain_buf=None)
        if self._chains is not None:
            state["_chains"] = self._chains.fresh(self)
        return state

    def _answer(self, vals, row: int, sign: float, dt) -> BrownianIncrement:
        split = self._layout.split
        w, hh, kk = (None if v is None else v[row] for v in vals)
        if sign < 0:
            w = -w
            kk = None if kk is None else -kk
        return BrownianIncrement(
            dt=dt, W=split(w), H=None if hh is None else split(hh), K=None if kk is None else split(kk)
        )

    def _per_sample_times(self, s_, t_, s, t) -> BrownianIncrement:
        """(B,) query times: one interval per sample, all answered by one vectorised descent over
        the forest of per-sample trees (sample ``b`` uses only its own element keys)."""
        if not self._layout.per_sample:
            raise ValueError("(B,) query times need per-sample seeds (an int64 tensor seed of shape (B,))")
        rows = self._layout.rows
        ns = self._lattice_array(np.broadcast_to(np.asarray(s_, dtype=np.float64), (rows,)))
        nt = self._lattice_array(np.broadcast_to(np.asarray(t_, dtype=np.float64), (rows,)))
        lo, hi = np.minimum(ns, nt), np.maximum(ns, nt)
        sign = np.where(ns <= nt, 1.0, -1.0)
        x = self._compute(lo, hi, np.arange(rows))
        vals = _levy_rows(x, (hi - lo) * self._q, sign, self.dtype, self._work)
        self._work.trim()
        outs = [None if v is None else self._layout.split(v.reshape(-1)) for v in vals]
        dt = (t if isinstance(t, torch.Tensor) else torch.as_tensor(t)) - (
            s if isinstance(s, torch.Tensor) else torch.as_tensor(s)
        )
        return BrownianIncrement(dt=dt, W=outs[0], H=outs[1], K=outs[2])

    # vectorised descent ---------------------------------------------------------------------
    def _compute(self, lo: np.ndarray, hi: np.ndarray, rows, keep=None) -> torch.Tensor:
        """Local stats ``(Q, d, C)`` (float64) of the intervals ``[lo[q], hi[q]]``:
        :func:`._descent.compute`."""
        return _descent.compute(self, lo, hi, rows, keep)
