"""Brownian motion as a path: a virtual Brownian tree and a fixed-grid Brownian path.

Both sample, for every element of the requested shape, a Brownian motion ``W`` on ``[t0, t1]``
from the counter-based generator of :mod:`torchnde.paths._rng`, so values are a pure function of
``(seed, element, time)``: deterministic, independent of the order of queries, identical on any
device (up to the last ulp of a float64 ``erfinv``).

Interval statistics. Over ``[a, a + l]`` the tree carries, in float64, the *local* statistics
``X = (W, I, J)`` with ``W = W(a+l) - W(a)``, ``I = int_a^{a+l} (W(u) - W(a)) du`` and
``J = int_a^{a+l} (W(u) - W(a)) (u - a) du`` (only the first 1, 2 or 3 of them, depending on
``levy_area``). They are jointly Gaussian with covariance
``[[l, l^2/2, l^3/3], [l^2/2, l^3/3, 5 l^4/24], [l^3/3, 5 l^4/24, 2 l^5/15]]``, they combine
exactly over adjacent intervals (``W = W1 + W2``, ``I = I1 + l2 W1 + I2``,
``J = J1 + W1 (l^2 - l1^2)/2 + J2 + l1 I2``), and an interval is split by exact Gaussian
conditioning of the left part on the whole. The Lévy areas are read off at the end:
``H = I/h - W/2`` (space-time, variance ``h/12``) and ``K = I/(2h) - J/h^2 + W/12``
(space-time-time, variance ``h/720``), independent of ``W`` and of each other (Foster 2020,
"Numerical approximations for stochastic differential equations", DPhil thesis, Oxford; Foster,
Lyons & Oberhauser 2020, "An optimal polynomial approximation of Brownian motion").

Virtual Brownian tree (Gaines & Lyons 1997, "Variable step size control in the numerical solution
of stochastic differential equations"; Li, Wong, Chen & Duvenaud 2020, "Scalable gradients for
stochastic differential equations"; Kidger, Foster, Li & Lyons 2021, "Efficient and accurate
gradients for neural SDEs"): dyadic halving of ``[t0, t1]`` down to leaves of length at most
``tol``; a time inside a leaf is reached by a last conditional split of the leaf, driven by the
leaf's own key. An interval ``[s, t]`` is assembled from interval-local pieces below the lowest
common ancestor of ``s`` and ``t`` (no cancellation between large prefix integrals).
"""

from __future__ import annotations

import bisect
import math

import numpy as np
import torch

from . import _rng
from ._base import AbstractBrownianPath, BrownianIncrement
from ._chains import ChainCache, levy_numpy

__all__ = ["VirtualBrownianTree", "BrownianGrid"]

_LEVY = {None: 1, "space-time": 2, "space-time-time": 3}
_STREAM_ROOT, _STREAM_SPLIT, _STREAM_LEAF, _STREAM_GRID = 11, 12, 13, 14
# speculative blocks of consecutive steps: first size, largest size, and a cap on steps * d * elements
# (a level of a block's descent then stays near the CPU's L2 cache; measured at (256, 16))
_BLOCK_MIN, _BLOCK_MAX, _BLOCK_ELEMENTS = 8, 256, 1 << 16
# speculate after this many adjacent equal-length queries in a row (one run of 2 is common
# without constant steps: the two half steps of step doubling, whose block would be wasted)
_SPEC_RUN = 2
# normals are drawn a group of levels at a time, about this many values per group
_RNG_CHUNK = 1 << 17
# pieces are gathered into one buffer and added at once below this many values, else per level
_BATCH_ELEMENTS = 1 << 17
# scratch buffers (and the kept chain) are kept between calls up to this size
_KEEP_BYTES = 64 << 20


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
        self.offsets = np.cumsum([0, *self.sizes]).tolist()
        self.cols = self.offsets[-1]
        self.per_sample = isinstance(seed, torch.Tensor)

    def split(self, flat: torch.Tensor):
        """``flat`` of shape ``(rows * cols,)`` (or ``(rows, cols)``) -> the tree of leaves."""
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


# ----------------------------------------------------------------------- Gaussian interval algebra
def _cov(length: float, d: int) -> np.ndarray:
    el = length
    c = np.array(
        [
            [el, el**2 / 2, el**3 / 3],
            [el**2 / 2, el**3 / 3, 5 * el**4 / 24],
            [el**3 / 3, 5 * el**4 / 24, 2 * el**5 / 15],
        ]
    )
    return c[:d, :d]


def _combine_mats(l1: float, l2: float, d: int) -> tuple[np.ndarray, np.ndarray]:
    el = l1 + l2
    c1 = np.array([[1.0, 0.0, 0.0], [l2, 1.0, 0.0], [(el * el - l1 * l1) / 2, 0.0, 1.0]])
    c2 = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, l1, 1.0]])
    return c1[:d, :d], c2[:d, :d]


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((c + c.T) / 2)
    return v * np.sqrt(np.clip(w, 0.0, None))


_UNIT_SQRT: dict = {}


def _unit_sqrt(d: int) -> np.ndarray:
    """``_psd_sqrt(_cov(1.0, d))``, computed once per ``d`` (a constant)."""
    out = _UNIT_SQRT.get(d)
    if out is None:
        out = _UNIT_SQRT[d] = _psd_sqrt(_cov(1.0, d))
    return out


def _split_mats(r: float, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Left part ``[0, r]`` of a unit interval given the whole: ``X1 = A X + B z``, ``z ~ N(0, I)``
    (in the normalised coordinates of the unit interval)."""
    if d == 1:
        return np.array([[r]]), np.array([[math.sqrt(max(r * (1 - r), 0.0))]])
    if r <= 0.0:
        return np.zeros((d, d)), np.zeros((d, d))
    if r >= 1.0:
        return np.eye(d), np.zeros((d, d))
    c1, _ = _combine_mats(r, 1 - r, d)
    s11 = _cov(r, d)
    cross = s11 @ c1.T  # Cov(X1, X)
    a = np.linalg.solve(_cov(1.0, d), cross.T).T
    cond = s11 - a @ cross.T
    return a, _psd_sqrt(cond)


def _scale_rows(lengths: np.ndarray, d: int) -> np.ndarray:
    """:func:`_scale` of many lengths at once, ``(n, d)``."""
    return np.asarray(lengths, dtype=np.float64)[:, None] ** np.array([0.5, 1.5, 2.5])[:d]


def _scale(length: float, d: int) -> np.ndarray:
    return np.array([length**0.5, length**1.5, length**2.5])[:d]


def _split_scaled(r: float, length: float, d: int) -> tuple[np.ndarray, np.ndarray]:
    """``X1 = A X + B z`` for the left part ``[a, a + r l]`` of an interval of length ``l``."""
    a, b = _split_mats(r, d)
    s = _scale(length, d)
    return (s[:, None] * a) / s[None, :], s[:, None] * b


def _uncombine_scaled(r: float, length: float, d: int, a: np.ndarray, b: np.ndarray):
    """The right part given the whole and ``X1 = A X + B z``: ``X2 = C2^-1 (X - C1 X1)``."""
    l1 = r * length
    c1, c2 = _combine_mats(l1, length - l1, d)
    c2i = np.linalg.inv(c2)
    return c2i @ (np.eye(d) - c1 @ a), -c2i @ c1 @ b


def _to_levy(x: torch.Tensor, h: float, d: int, sign: float, dtype, layout: _Layout) -> BrownianIncrement:
    """Local stats over an interval of length ``h > 0`` -> (W, H, K), reversed if ``sign < 0``."""
    w = x[0] if sign > 0 else -x[0]
    hh = kk = None
    if d >= 2:
        hh = torch.add(x[1], x[0], alpha=-h / 2).mul_(1.0 / h) if h > 0 else torch.zeros_like(x[0])
    if d >= 3:
        if h > 0:
            kk = torch.add(x[0], x[1], alpha=6.0 / h).sub_(x[2], alpha=12.0 / (h * h)).mul_(1.0 / 12)
            if sign < 0:
                kk.neg_()
        else:
            kk = torch.zeros_like(x[0])
    conv = (lambda v: layout.split(v.to(dtype))) if x.dtype != dtype else layout.split
    return BrownianIncrement(dt=None, W=conv(w), H=None if hh is None else conv(hh), K=None if kk is None else conv(kk))


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

    def _time(self, t, name: str):
        """A Python float (shared time) or a list of B floats (per-sample times)."""
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


# -------------------------------------------------------------------------- virtual Brownian tree
def _cov_many(lengths: np.ndarray, d: int) -> np.ndarray:
    """:func:`_cov` for an array of lengths: ``(P, d, d)``."""
    el = np.asarray(lengths, dtype=np.float64)
    c = np.empty((el.shape[0], 3, 3))
    c[:, 0, 0] = el
    c[:, 0, 1] = c[:, 1, 0] = el**2 / 2
    c[:, 0, 2] = c[:, 2, 0] = c[:, 1, 1] = el**3 / 3
    c[:, 1, 2] = c[:, 2, 1] = 5 * el**4 / 24
    c[:, 2, 2] = 2 * el**5 / 15
    return c[:, :d, :d]


def _combine_many(l1: np.ndarray, l2: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_combine_mats` for arrays of lengths: ``X = C1 X1 + C2 X2``, each ``(P, d, d)``."""
    n = l1.shape[0]
    c1 = np.zeros((n, 3, 3))
    c2 = np.zeros((n, 3, 3))
    c1[:, [0, 1, 2], [0, 1, 2]] = 1.0
    c2[:, [0, 1, 2], [0, 1, 2]] = 1.0
    c1[:, 1, 0] = l2
    c1[:, 2, 0] = ((l1 + l2) ** 2 - l1 * l1) / 2
    c2[:, 2, 1] = l1
    return c1[:, :d, :d], c2[:, :d, :d]


def _split_many(r: np.ndarray, length: float, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Stats of ``[a, a + r l]`` inside an interval ``[a, a + l]`` with stats ``X``: ``A X + B z``
    with ``z ~ N(0, I)``, exact Gaussian conditioning; ``A, B`` of shape ``(P, d, d)``."""
    r = np.asarray(r, dtype=np.float64)
    n = r.shape[0]
    if d == 1:
        a = r.reshape(n, 1, 1)
        b = np.sqrt(np.clip(r * (1 - r), 0.0, None) * length).reshape(n, 1, 1)
        return a, b
    inside = (r > 0) & (r < 1)
    ru = np.where(inside, r, 0.5)  # unit-interval coordinates, then scaled by powers of length
    c1, _ = _combine_many(ru, 1 - ru, d)
    s11 = _cov_many(ru, d)
    cross = s11 @ np.swapaxes(c1, 1, 2)  # Cov(X1, X)
    a = np.swapaxes(np.linalg.solve(_cov(1.0, d), np.swapaxes(cross, 1, 2)), 1, 2)
    cond = s11 - a @ np.swapaxes(cross, 1, 2)
    w, v = np.linalg.eigh((cond + np.swapaxes(cond, 1, 2)) / 2)
    b = v * np.sqrt(np.clip(w, 0.0, None))[:, None, :]
    a[~inside] = 0.0
    b[~inside] = 0.0
    a[r >= 1] = np.eye(d)
    s = _scale(length, d)
    return s[None, :, None] * a / s[None, None, :], s[None, :, None] * b


def _position_maps(start: np.ndarray, end: np.ndarray, h: np.ndarray, d: int) -> np.ndarray:
    """How a piece ``[start, end]`` (relative to the start of an interval of length ``h``) enters
    the interval's stats: ``W += W_j``, ``I += I_j + (h - end) W_j``,
    ``J += J_j + start I_j + (h^2 - end^2)/2 W_j`` (exact combination; ``(P, d, d)``)."""
    m = np.zeros((start.shape[0], 3, 3))
    m[:, [0, 1, 2], [0, 1, 2]] = 1.0
    m[:, 1, 0] = h - end
    m[:, 2, 0] = (h * h - end * end) / 2
    m[:, 2, 1] = start
    return m[:, :d, :d]


def _leaf_parts(ka, kb, ra, rb, lo, h, ell, E, step, d, split=_split_many):
    """Weights of the leaf parts of intervals ``[lo, lo + h]`` whose ends lie in leaves ``ka``,
    ``kb`` (of length ``ell``, ``2**E`` lattice steps of ``step``) at fractions ``ra``, ``rb``:
    ``[ra, rb]`` of a shared leaf, else the tail of ``ka`` and the head of ``kb``. Returns
    ``(same, diff, lq, g_stats, g_normals)``: the parts of the shared leaves, then the tails, then
    the heads; ``lq`` the interval of each part, and the ``(P, d, d)`` maps by which the leaf's
    stats and its bridge normals enter the interval's stats. ``split``: :func:`_split_many` (or a
    function with its values, row by row)."""
    q = ka.shape[0]
    qi = np.arange(q)
    same = ka == kb
    diff = ~same
    nd = int(diff.sum())
    r_from = np.concatenate([ra[same], ra[diff], np.zeros(nd)])
    r_to = np.concatenate([rb[same], np.ones(nd), rb[diff]])
    lq = np.concatenate([qi[same], qi[diff], qi[diff]])
    start = np.concatenate([np.zeros(q), ((kb << E) - lo)[diff] * step])
    end = np.concatenate([h[same], (((ka + 1) << E) - lo)[diff] * step, h[diff]])
    a_from, b_from = split(r_from, ell, d)
    a_to, b_to = split(r_to, ell, d)
    c1, c2 = _combine_many(r_from * ell, (r_to - r_from) * ell, d)
    c2i = np.linalg.inv(c2) if d > 1 else c2
    pm = _position_maps(start, end, h[lq], d)
    return same, diff, lq, pm @ c2i @ (a_to - c1 @ a_from), pm @ c2i @ (b_to - c1 @ b_from)


def _sibling_maps(lev, sib, lo, h, T, step, d):
    """Weights of sibling nodes ``sib`` (children of level-``lev`` nodes, on a lattice of ``2**T``
    steps of ``step``) inside intervals ``[lo, lo + h]``: :func:`_position_maps`."""
    shift = T - 1 - lev
    s0 = ((sib << shift) - lo) * step
    s1 = (((sib + 1) << shift) - lo) * step
    return _position_maps(s0, s1, h, d)


def _levy_rows(x: torch.Tensor, h: np.ndarray, sign: np.ndarray, dtype, work=None):
    """Local stats ``(Q, d, C)`` over intervals of lengths ``h`` -> ``(W, H, K)``, each ``(Q, C)`` in
    ``dtype`` (or None), reversed where ``sign < 0`` (``W -> -W``, ``H -> H``, ``K -> -K``). The
    results never share memory with ``x``; intermediates go to ``work`` (a :class:`_Work`)."""
    q, d, c = x.shape
    dev = x.device

    def buf(name):
        if work is None:
            return torch.empty(q, c, dtype=x.dtype, device=dev)
        return work.get(name, q * c, x.dtype).view(q, c)

    w = x[:, 0]
    flip = bool((sign < 0).any())
    sg = torch.as_tensor(sign, dtype=x.dtype, device=dev).view(-1, 1) if flip else None
    hh = kk = None
    if d >= 2:
        pos = h > 0
        hq = torch.as_tensor(np.where(pos, h, 1.0), dtype=x.dtype, device=dev).view(-1, 1)
        inv = torch.as_tensor(np.where(pos, 1.0 / np.where(pos, h, 1.0), 0.0), dtype=x.dtype, device=dev)
        inv = inv.view(-1, 1)
        # H = (I - W h/2) / h
        hh = torch.mul(x[:, 0], hq / 2, out=buf("levy_h"))
        hh = torch.sub(x[:, 1], hh, out=hh).mul_(inv)
        if d >= 3:
            # K = (W + 6 I / h - 12 J / h^2) / 12
            kk = torch.mul(x[:, 1], 6.0 * inv, out=buf("levy_k"))
            kk = torch.add(x[:, 0], kk, out=kk)
            kk.sub_(torch.mul(x[:, 2], 12.0 * inv * inv, out=buf("levy_tmp"))).mul_(inv * hq / 12)
            if flip:
                kk.mul_(sg)
    if flip:
        w = torch.mul(w, sg, out=buf("levy_w"))
    return tuple(None if v is None else v.to(dtype, copy=True) for v in (w, hh, kk))


class _Work:
    """Grow-only scratch buffers, reused across calls: fresh multi-megabyte temporaries cost page
    faults on every call, which at large shapes was most of the time of a query. Buffers are
    dropped after a call if together they exceed ``_KEEP_BYTES`` (huge shapes then allocate per
    call, as any temporary would)."""

    def __init__(self, device):
        self.device = device
        self.bufs: dict = {}

    def trim(self) -> None:
        if sum(b.numel() * b.element_size() for b in self.bufs.values()) > _KEEP_BYTES:
            self.bufs.clear()

    def get(self, name: str, n: int, dtype) -> torch.Tensor:
        """A flat buffer of ``n`` values (a view of a kept buffer of at least that size)."""
        b = self.bufs.get(name)
        if b is None or b.numel() < n or b.dtype != dtype:
            size = max(n, int(1.25 * b.numel()) if b is not None and b.dtype == dtype else 0)
            b = self.bufs[name] = torch.empty(size, dtype=dtype, device=self.device)
        return b[:n]


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
        mats = []
        for lev in range(self._depth):
            length = span * 2.0**-lev
            a, b = _split_scaled(0.5, length, d)
            ar, br = _uncombine_scaled(0.5, length, d, a, b)
            mats.append(np.block([[a, b], [ar, br]]))
        mats = np.array(mats).reshape(-1, 2 * d, 2 * d)
        ab = torch.tensor(mats, dtype=idt, device=dev)
        # d = 1: the children are a W + b z and a W - b z (exactly these products), two products
        # and two sums instead of four and two
        self._split1 = [
            (float(m[0, 0]), float(m[0, 1])) if d == 1 and m[1, 0] == m[0, 0] and m[1, 1] == -m[0, 1] else None
            for m in mats
        ]
        self._ab_cols = ab.transpose(1, 2).reshape(-1, 2 * d, 1, 2 * d, 1)  # [lev, j] = column j
        root_sqrt = _psd_sqrt(_cov(span, d))
        z = _rng.normals(
            self._ekeys, np.concatenate([_rng.node_keys(_STREAM_ROOT, [1], j) for j in range(d)]), dtype=idt
        )
        self._root = torch.tensor(root_sqrt, dtype=idt, device=dev) @ z  # (d, M)
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
        small = (2 * self._depth + 4) * d * self._ek32.shape[0] <= _BATCH_ELEMENTS
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
        """Local stats ``(Q, d, C)`` (float64) of the intervals ``[lo[q], hi[q]]`` (lattice points,
        ``lo <= hi``).

        ``rows=None``: all elements share the query times (``C`` = all elements). Otherwise
        ``rows[q]`` is the sample of interval ``q`` and ``C`` its elements (per-sample times).
        ``keep``: a lattice point among ``lo``/``hi`` whose root-to-leaf chain is kept for the next
        call (shared times only).

        1. Leaves: point ``n`` lies in leaf ``k = n >> extra`` at fraction ``r``.
        2. Units: at every level, the distinct ``(sample, node)`` pairs on the points' paths,
           found as runs in the points sorted by ``(sample, leaf)``. A point shared by two
           intervals (the steps of a block) is one point, so each node is split once per call.
        3. The kept chain: the children of every node on the path of the previous call's
           ``keep`` point, and its leaf normals. Units on that path (the root, the top levels a
           block shares with the previous block, the block's first point) are not recomputed.
        4. Normals of the other units (split keys, then the leaves' bridge keys) from the counter
           RNG, a group of levels at a time, into reused buffers.
        5. Per level, one batched op: both children of every unit ``= [AA | BB] [parent; z]``.
        6. Pieces (planned in numpy): for each interval, the sibling nodes and the two leaf parts
           between its ends, each with the ``d x d`` matrix by which it enters the interval's
           stats (:func:`_position_maps`; leaf parts are linear in the leaf's stats and normals,
           :func:`_split_many`). They are gathered as their source level is computed, weighted
           and ``index_add_``-ed (level by level at large sizes, so no big intermediate).

        Each node is computed by the same float operations whatever the batch, and each interval
        adds its pieces in the same order (by source level), so an interval's stats are the same
        function of its lattice times whether it is asked alone or in a block, bit for bit.
        """
        D, E, T, d = self._depth, self._extra, self._bits, self._d
        idt, dev = self._idt, self.device
        q = lo.shape[0]
        per_sample = rows is not None
        if per_sample:
            cols = self._layout.cols
            ek32 = self._ek32.view(self._layout.rows, cols)
            root = self._root.view(d, self._layout.rows, cols)
            prow = np.concatenate([rows, rows]).astype(np.int64)
        else:
            cols = self._ek32.shape[0]
            ek32 = self._ek32
            root = self._root.view(d, 1, cols)
            prow = np.zeros(2 * q, dtype=np.int64)
        pts = np.concatenate([lo, hi])
        npt = pts.shape[0]
        leaf = np.minimum(pts >> E, (1 << D) - 1)
        frac = (pts - (leaf << E)) / float(1 << E)
        order = np.lexsort((leaf, prow)) if per_sample else np.argsort(leaf, kind="stable")
        inv = np.empty_like(order)
        inv[order] = np.arange(npt)
        sleaf, srow = leaf[order], prow[order]
        levs = np.arange(D + 1)
        # 2. units of all levels at once: unit g (level-major, sorted within a level) is at level
        # u_lev[g], first sorted point u_first[g], node u_node[g]; uid[lev, p] = its rank in the level
        node_m = sleaf[None, :] >> (D - levs)[:, None]
        new_m = np.ones((D + 1, npt), dtype=bool)
        new_m[:, 1:] = node_m[:, 1:] != node_m[:, :-1]
        if per_sample:
            new_m[:, 1:] |= (srow[1:] != srow[:-1])[None, :]
        uid = np.cumsum(new_m, axis=1) - 1
        counts = uid[:, -1] + 1
        u_lev, u_first = np.nonzero(new_m)
        u_node = node_m[u_lev, u_first]
        uoff = np.concatenate([[0], np.cumsum(counts)])
        u_loc = np.arange(u_lev.shape[0]) - uoff[u_lev]
        # 3. the kept chain: cpos[lev] = rank of its unit at level lev (-1: none). Buffer layout
        # of a level: the computed units in order, then the kept one; base[g] = row of unit g
        cpos = np.full(D + 1, -1)
        chain = None if per_sample else self._chain
        if chain is not None:
            hit = np.flatnonzero(u_node == (chain[0] >> (D - u_lev)))
            cpos[u_lev[hit]] = u_loc[hit]
        cached = u_loc == cpos[u_lev]
        base = u_loc - ((cpos[u_lev] >= 0) & (u_loc > cpos[u_lev]))
        base[cached] = counts[u_lev[cached]] - 1
        ncomp = counts - (cpos >= 0)
        comp = np.flatnonzero(~cached)  # computed units, level-major
        c_lev = u_lev[comp]
        # 4. node keys of the computed units (split keys, then the leaves' bridge keys)
        stream = np.where(c_lev == D, _STREAM_LEAF, _STREAM_SPLIT)
        heap = u_node[comp] + (np.int64(1) << c_lev)
        keys = _rng.node_keys(stream[:, None], heap[:, None], np.arange(d)[None, :]).reshape(-1)
        koff = np.concatenate([[0], np.cumsum(ncomp * d)]).tolist()
        groups, acc, start = [], 0, 0  # RNG groups of consecutive levels, ~_RNG_CHUNK values each
        for lev in range(D + 1):
            acc += int(ncomp[lev]) * d * cols
            if acc >= _RNG_CHUNK or lev == D:
                groups.append((start, lev))
                start, acc = lev + 1, 0
        # rows of the parents' children that are the computed units of levels >= 1
        cp = comp[c_lev > 0]
        pg = uoff[u_lev[cp] - 1] + uid[u_lev[cp] - 1, u_first[cp]]  # their parents (unit ids)
        # Path levels (d = 1): every computed unit has exactly one computed child unit (below the
        # top of a block, the points' paths are disjoint). The children are then written as
        # [path children | siblings] (a W + s b z, a W - s b z with s = +-1 picking the side), so
        # the next level's parents are a contiguous view, not a gather. Other levels store the
        # children of unit u at rows 2u, 2u + 1. The kept unit's children come last (2m, 2m + 1).
        path = np.zeros(D + 1, dtype=bool)
        pbit = np.zeros(u_lev.shape[0], dtype=np.int64)  # the path child's side, per unit
        if d == 1 and D > 0:
            coff = np.concatenate([[0], np.cumsum(ncomp)])
            for lev in range(D - 1):
                a0, a1, b0 = coff[lev], coff[lev + 1], coff[lev + 1] - ncomp[0]
                if self._split1[lev] is not None and ncomp[lev] == ncomp[lev + 1] > 0:
                    path[lev] = np.array_equal(pg[b0 : b0 + ncomp[lev]], comp[a0:a1])
            on = path[u_lev[pg]]
            pbit[pg[on]] = u_node[cp[on]] & 1
        m_of = ncomp[u_lev]

        def child_row(g, bit):
            """Row of child ``bit`` of unit ``g`` in its level's children buffer."""
            flat = 2 * base[g] + bit
            side = base[g] + m_of[g] * (bit != pbit[g])
            return np.where(path[u_lev[g]] & ~cached[g], side, flat)

        parent = child_row(pg, u_node[cp] & 1)
        # 6. pieces, each tagged with its source: -1 = a level-0 unit (depth 0 only), lev in
        # [0, D) = the children of the units of level lev, D = the leaves' normals
        ia, ib = inv[:q], inv[q:]  # sorted positions of the interval ends
        ka, kb = leaf[:q], leaf[q:]
        ell = self._span * 2.0**-D
        h = (hi - lo) * self._q
        same, diff, lq, g_stats, g_normals = _leaf_parts(ka, kb, frac[:q], frac[q:], lo, h, ell, E, self._q, d)
        lpos = np.concatenate([ia[same], ia[diff], ib[diff]])
        if D == 0:
            leaf_idx = base[uid[0, lpos]]
        else:
            leaf_idx = child_row(uoff[D - 1] + uid[D - 1, lpos], sleaf[lpos] & 1)
        nl = lq.shape[0]
        p_tag = [np.full(nl, D - 1), np.full(nl, D)]
        p_idx = [leaf_idx, base[uoff[D] + uid[D, lpos]]]
        p_q = [lq, lq]
        p_g = [g_stats, g_normals]
        if D > 0:
            # sibling nodes between the two leaves, below the lowest common ancestor: at level
            # lev, right siblings of a's path and left siblings of b's path
            na, nb = ka[None, :] >> (D - levs)[:, None], kb[None, :] >> (D - levs)[:, None]
            below = na[:-1] != nb[:-1]
            ai, aq = np.nonzero(below & ((na[1:] & 1) == 0))
            bi, bq = np.nonzero(below & ((nb[1:] & 1) == 1))
            s_i, s_q = np.concatenate([ai, bi]), np.concatenate([aq, bq])
            sib = np.concatenate([na[ai + 1, aq] + 1, nb[bi + 1, bq] - 1])
            spos = np.concatenate([ia[aq], ib[bq]])
            p_tag.append(s_i)
            p_idx.append(child_row(uoff[s_i] + uid[s_i, spos], sib & 1))
            p_q.append(s_q)
            p_g.append(_sibling_maps(s_i, sib, lo[s_q], h[s_q], T, self._q, d))
        tag = np.concatenate(p_tag)
        by_src = np.argsort(tag, kind="stable")  # pieces source by source; per-interval order kept
        npc = by_src.shape[0]
        bounds = np.searchsorted(tag[by_src], np.arange(-1, D + 2)).tolist()
        g_np = np.concatenate(p_g)[by_src]
        src_np = np.concatenate(p_idx)[by_src]
        # levels whose kept unit's children are read (by a piece, or as a computed unit's parent)
        ts = tag[by_src]
        use_kept = np.zeros(D + 2, dtype=bool)
        kl = ts[(ts >= 0) & (ts < D)]
        use_kept[kl[src_np[(ts >= 0) & (ts < D)] >= 2 * ncomp[kl]]] = True
        pl = u_lev[cp] - 1
        use_kept[pl[parent >= 2 * ncomp[pl]]] = True
        # the chain kept for the next call: the units on keep's path, and their children's rows
        save = None
        krows = np.zeros(0, dtype=np.int64)
        if keep is not None and not per_sample and (D + 1) * 2 * d * cols * 8 <= _KEEP_BYTES:
            kidx = int(np.flatnonzero(pts == keep)[0])
            kunit = uoff[:-1] + uid[:, int(inv[kidx])]
            ku = kunit[:D]
            krows = np.stack([child_row(ku, np.zeros_like(ku)), child_row(ku, np.ones_like(ku))], 1).reshape(-1)
            buf = self._chain_buf
            if buf is None or buf.shape != (D + 1, 2 * d, cols):
                buf = self._chain_buf = torch.empty(D + 1, 2 * d, cols, dtype=idt, device=dev)
            save = (int(leaf[kidx]), buf)
            self._chain = None  # until it is complete
        # one index tensor: piece sources, piece targets, parents, kept rows
        index = torch.as_tensor(np.concatenate([src_np, np.concatenate(p_q)[by_src], parent, krows]), device=dev)
        idx_src, idx_q = index[:npc], index[npc : 2 * npc]
        poff = np.concatenate([[0], np.cumsum(ncomp[1:])]).tolist()
        idx_par = index[2 * npc : 2 * npc + parent.shape[0]]
        idx_keep = index[2 * npc + parent.shape[0] :]
        if path.any():  # b times the side of the path child, per computed unit of a path level
            on = path[c_lev]
            bs = np.array([self._split1[lev][1] if path[lev] else 0.0 for lev in range(D + 1)])[c_lev[on]]
            bsign = torch.as_tensor(bs * (1 - 2 * pbit[comp[on]]), dtype=idt, device=dev).view(-1, 1, 1)
            bsoff = np.concatenate([[0], np.cumsum(np.where(path, ncomp, 0))]).tolist()
        g_all = torch.as_tensor(g_np, dtype=idt, device=dev)
        if d > 1:
            g_all = g_all.transpose(1, 2).unsqueeze(-1)  # g[:, j] = column j, (P, d, 1)
            unit_g = [False] * (D + 2)
        else:
            notone = np.concatenate([[0], np.cumsum(g_np.reshape(-1) != 1.0)])
            unit_g = [notone[bounds[t + 2]] == notone[bounds[t + 1]] for t in range(-1, D + 1)]
        work = self._work
        out = work.get("out", q * d * cols, idt).view(q, d, cols).zero_()
        batch = npc * d * cols <= _BATCH_ELEMENTS
        parts = work.get("pieces", npc * d * cols, idt).view(npc, d, cols) if batch else None

        def weigh(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            if d == 1:
                return p.mul_(g.view(-1, 1, 1))
            w = work.get("weighted", p.numel(), idt).view(p.shape)
            tmp = work.get("weighted_tmp", p.numel(), idt).view(p.shape)
            torch.mul(p[:, :1], g[:, 0], out=w)
            for j in range(1, d):
                w.add_(torch.mul(p[:, j : j + 1], g[:, j], out=tmp))
            return w

        def add_pieces(t: int, src: torch.Tensor) -> None:
            a, b = bounds[t + 1], bounds[t + 2]
            if a == b:
                return
            if batch:
                torch.index_select(src, 0, idx_src[a:b], out=parts[a:b])
                return
            p = torch.index_select(
                src, 0, idx_src[a:b], out=work.get("pieces", (b - a) * d * cols, idt).view(-1, d, cols)
            )
            if not unit_g[t + 1]:
                p = weigh(p, g_all[a:b])
            out.index_add_(0, idx_q[a:b], p)

        # 5. the descent
        units0 = root.index_select(1, torch.as_tensor(srow[u_first[: counts[0]]], device=dev)).transpose(0, 1)
        add_pieces(-1, units0)
        stats = units0
        width = int(counts[:D].max()) if D > 0 else 0
        chbufs = [work.get(f"children{i}", 2 * width * d * cols, idt) for i in range(2)]
        tmpbuf = work.get("children_tmp", 2 * width * d * cols, idt)
        zbuf, zoff, gi = None, 0, 0
        for lev in range(D + 1):
            if gi < len(groups) and groups[gi][0] == lev:
                ga, gb = groups[gi]
                gi += 1
                nrow = koff[gb + 1] - koff[ga]
                zbuf = work.get("z", (nrow + d) * cols, idt).view(nrow + d, cols)  # + a kept leaf
                if nrow:
                    direct = idt == torch.float64
                    zn = zbuf[:nrow] if direct else work.get("z64", nrow * cols, torch.float64).view(nrow, cols)
                    _rng.normals_into(
                        zn,
                        ek32,
                        torch.as_tensor(keys[koff[ga] : koff[gb + 1]], device=dev),
                        work.get("bits", nrow * cols, torch.int32).view(nrow, cols),
                        work.get("bits_tmp", nrow * cols, torch.int32).view(nrow, cols),
                        rows=None
                        if not per_sample
                        else torch.as_tensor(
                            np.repeat(srow[u_first[comp[koff[ga] // d : koff[gb + 1] // d]]], d), device=dev
                        ),
                    )
                    if not direct:
                        zbuf[:nrow].copy_(zn)
                zoff = 0
            n, c, m = int(counts[lev]), int(cpos[lev]), int(ncomp[lev])
            zl = zbuf[zoff : zoff + m * d].view(m, d, cols)
            zoff += m * d
            ksave = save is not None and not cached[kunit[lev]]
            if lev == D:  # the leaves: their bridge normals
                if c >= 0:
                    zbuf[zoff : zoff + d].copy_(chain[1][D, :d])
                src = zbuf[zoff - m * d : zoff + (d if c >= 0 else 0)].view(-1, d, cols)
                add_pieces(D, src)
                if ksave:
                    save[1][D, :d].copy_(src[int(base[kunit[D]])])
                break
            nxt = int(ncomp[lev + 1])
            if m == 0 and bounds[lev + 1] == bounds[lev + 2] and nxt == 0:
                continue  # a kept unit nobody needs at this level (the shared top of the path)
            ch = chbufs[lev & 1][: 2 * n * d * cols].view(2 * n, d, cols)
            if m:
                dst = ch[: 2 * m].view(m, 2 * d, cols)
                split = self._split1[lev]
                if split is not None:  # d = 1: children a W +- b z (in place: W, z are not needed again)
                    sa = (
                        stats.mul_(split[0])
                        if lev
                        else torch.mul(stats, split[0], out=tmpbuf[: m * cols].view(m, 1, cols))
                    )
                    if path[lev]:  # [a W + s b z | a W - s b z]: the path children, then their siblings
                        zb = zl.mul_(bsign[bsoff[lev] : bsoff[lev + 1]])
                        torch.add(sa, zb, out=ch[:m])
                        torch.sub(sa, zb, out=ch[m : 2 * m])
                    else:
                        zb = zl.mul_(split[1])
                        torch.add(sa, zb, out=dst[:, :1])
                        torch.sub(sa, zb, out=dst[:, 1:])
                else:
                    cab = self._ab_cols[lev]
                    tmp = tmpbuf[: 2 * m * d * cols].view(m, 2 * d, cols)
                    torch.mul(stats[:, :1], cab[0], out=dst)
                    for j in range(1, 2 * d):
                        x = stats[:, j : j + 1] if j < d else zl[:, j - d : j - d + 1]
                        dst.add_(torch.mul(x, cab[j], out=tmp))
            if c >= 0 and use_kept[lev]:
                ch[2 * m :].view(2 * d, cols).copy_(chain[1][lev])
            if ksave:
                torch.index_select(ch, 0, idx_keep[2 * lev : 2 * lev + 2], out=save[1][lev].view(2, d, cols))
            add_pieces(lev, ch)
            if path[lev]:
                stats = ch[:m]
            elif nxt:
                sel = work.get("stats", nxt * d * cols, idt).view(nxt, d, cols)
                stats = torch.index_select(ch, 0, idx_par[poff[lev] : poff[lev + 1]], out=sel)
        if batch and npc:
            out.index_add_(0, idx_q, weigh(parts, g_all))
        if save is not None:
            self._chain = save
        return out


# ---------------------------------------------------------------------------- fixed-grid Brownian
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
        # fast path of evaluate(): one-cell increments between exact grid times, in the leaf's shape
        self._pos = {v: i for i, v in enumerate(grid)}
        leaves = self._layout.leaves
        one = self._layout.single and len(leaves) == 1 and self._w1[0].numel() == math.prod(leaves[0])
        self._w_shaped = self._w1.view(n, *leaves[0]) if one else None

    def evaluate(self, s, t=None):
        if t is not None and self._w_shaped is not None and type(s) is float and type(t) is float:
            i, j = self._pos.get(s), self._pos.get(t)
            if i is not None and j is not None:
                if j == i + 1:
                    return self._w_shaped[i]
                if i == j + 1:
                    return -self._w_shaped[j]
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

    def increment(self, s, t) -> BrownianIncrement:
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
