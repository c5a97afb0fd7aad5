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

__all__ = ["VirtualBrownianTree", "BrownianGrid"]

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


def _combine(x1: torch.Tensor, x2: torch.Tensor, l1: float, l2: float) -> torch.Tensor:
    """Stats of the union of adjacent intervals ``[.. l1 ..][.. l2 ..]`` (rows W, I, J)."""
    out = x1 + x2
    d = x1.shape[0]
    if d >= 2:
        out[1].add_(x1[0], alpha=l2)
    if d >= 3:
        el = l1 + l2
        out[2].add_(x1[0], alpha=(el * el - l1 * l1) / 2).add_(x2[1], alpha=l1)
    return out


def _uncombine(x: torch.Tensor, x1: torch.Tensor, l1: float, l2: float) -> torch.Tensor:
    """Stats of the right part ``[.. l2 ..]`` given the whole and the left part ``[.. l1 ..]``."""
    out = x - x1
    d = x.shape[0]
    if d >= 2:
        out[1].add_(x1[0], alpha=-l2)
    if d >= 3:
        el = l1 + l2
        out[2].add_(x1[0], alpha=-(el * el - l1 * l1) / 2).add_(out[1], alpha=-l1)
    return out


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
    relative to the forward interval ``[t, s]``.
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
        self._seed_tensor = seed if isinstance(seed, torch.Tensor) else None
        self._ekeys = _rng.element_keys(seed, self._layout.cols, device=self.device)
        self._last_key = None
        self._last = None
        self._rows_cache = None
        d, idt, dev = self._d, self._idt, self.device
        # halving matrices per level: both children (2d rows) = AA @ parent + BB @ z
        aa, bb = [], []
        for lev in range(self._depth):
            length = span * 2.0**-lev
            a, b = _split_scaled(0.5, length, d)
            ar, br = _uncombine_scaled(0.5, length, d, a, b)
            aa.append(np.concatenate([a, ar]))
            bb.append(np.concatenate([b, br]))
        shape_ab = (max(self._depth, 1), 2 * d, d)
        self._aa = torch.tensor(np.array(aa).reshape(-1), dtype=idt, device=dev).reshape(shape_ab)[: self._depth]
        self._bb = torch.tensor(np.array(bb).reshape(-1), dtype=idt, device=dev).reshape(shape_ab)[: self._depth]
        root_sqrt = _psd_sqrt(_cov(span, d))
        z = _rng.normals(self._ekeys, [_rng.key(_STREAM_ROOT, 1, j) for j in range(d)], dtype=idt)
        self._root = torch.tensor(root_sqrt, dtype=idt, device=dev) @ z  # (d, M)
        # cached descent: node index, stats and children per level; leaf bridge normals
        self._ks: list[int] = [0]
        self._nodes: list[torch.Tensor] = [self._root]
        self._children: list[torch.Tensor] = []
        self._leafz: torch.Tensor | None = None
        self._leafz_k = -1

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

    # descent --------------------------------------------------------------------------------
    def _locate(self, t: float) -> tuple[list[int], float]:
        """Node index at every level 0..depth of the leaf containing ``t``, and ``t``'s fraction
        in that leaf."""
        x = (t - self.t0) / self._span
        x = min(max(x, 0.0), 1.0)
        n = 1 << self._depth
        y = x * n
        k = min(int(y), n - 1)
        r = min(max(y - k, 0.0), 1.0)
        return [k >> (self._depth - lev) for lev in range(self._depth + 1)], r

    def _descend(self, ks: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Node stats and children along the path ``ks``, reusing the cached prefix."""
        depth = self._depth
        cached = self._ks
        lev0 = 0
        while lev0 < len(cached) and cached[lev0] == ks[lev0]:
            lev0 += 1
        # nodes at levels < lev0 are shared, and so are their children
        nodes = self._nodes[:lev0]
        children = self._children[:lev0]
        if len(children) == lev0 and lev0 <= depth:
            nodes.append(children[-1][self._d :] if ks[lev0] & 1 else children[-1][: self._d])
        start = len(children)  # first level whose children must be computed
        d = self._d
        keys = [_rng.key(_STREAM_SPLIT, (1 << lev) + ks[lev], j) for lev in range(start, depth) for j in range(d)]
        need_leaf = self._leafz_k != ks[depth]
        if need_leaf:
            keys += [_rng.key(_STREAM_LEAF, (1 << depth) + ks[depth], j) for j in range(d)]
        if keys:
            z = _rng.normals(self._ekeys, keys, dtype=self._idt)
            m = depth - start
            if m > 0:
                bz = torch.bmm(self._bb[start:depth], z[: m * d].view(m, d, -1))
                for i, lev in enumerate(range(start, depth)):
                    ch = torch.addmm(bz[i], self._aa[lev], nodes[lev])
                    children.append(ch)
                    nodes.append(ch[d:] if ks[lev + 1] & 1 else ch[:d])
            if need_leaf:
                self._leafz = z[-d:]
                self._leafz_k = ks[depth]
        self._ks, self._nodes, self._children = ks, nodes, children
        return nodes, children, self._leafz

    def _leaf_split(self, node: torch.Tensor, leafz: torch.Tensor, r: float) -> torch.Tensor:
        """Stats of ``[leaf start, leaf start + r * leaf length]`` (the leaf's bridge)."""
        length = self._span * 2.0**-self._depth
        if self._d == 1:
            return torch.add(node * r, leafz, alpha=math.sqrt(max(r * (1 - r), 0.0) * length))
        a, b = _split_scaled(r, length, self._d)
        ab = torch.tensor(np.concatenate([a, b], axis=1), dtype=self._idt, device=self.device)
        return torch.addmm(ab[:, self._d :] @ leafz, ab[:, : self._d], node)

    def _stats(self, s: float, t: float) -> torch.Tensor:
        """Local stats (W, I, J) of ``[s, t]``, ``s <= t``, float64 ``(d, M)``."""
        depth = self._depth
        leaf_len = self._span * 2.0**-depth
        ks_s, rs = self._locate(s)
        ks_t, rt = self._locate(t)
        # path of s first (usually the cached previous end), keep its tensors, then t
        nodes_s, ch_s, leafz_s = self._descend(ks_s)
        pre_s = self._leaf_split(nodes_s[depth], leafz_s, rs)
        if ks_s[depth] == ks_t[depth]:
            pre_t = self._leaf_split(nodes_s[depth], leafz_s, rt)
            return _uncombine(pre_t, pre_s, rs * leaf_len, (rt - rs) * leaf_len)
        nodes_t, ch_t, leafz_t = self._descend(ks_t)
        lam = 0
        while ks_s[lam + 1] == ks_t[lam + 1]:
            lam += 1
        # suffix of s up to the end of its node at level lam + 1
        suf = _uncombine(nodes_s[depth], pre_s, rs * leaf_len, (1 - rs) * leaf_len)
        suf_len = (1 - rs) * leaf_len
        for lev in range(depth - 1, lam, -1):
            if not ks_s[lev + 1] & 1:  # s went left: the right sibling follows
                sib_len = self._span * 2.0 ** -(lev + 1)
                suf = _combine(suf, ch_s[lev][self._d :], suf_len, sib_len)
                suf_len += sib_len
        pre = self._leaf_split(nodes_t[depth], leafz_t, rt)
        pre_len = rt * leaf_len
        for lev in range(depth - 1, lam, -1):
            if ks_t[lev + 1] & 1:  # t went right: the left sibling precedes
                sib_len = self._span * 2.0 ** -(lev + 1)
                pre = _combine(ch_t[lev][: self._d], pre, sib_len, pre_len)
                pre_len += sib_len
        return _combine(suf, pre, suf_len, pre_len)


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
        z = _rng.normals(ekeys, [_rng.key(_STREAM_GRID, c, j) for c in range(n) for j in range(d)], dtype=idt)
        z = z.view(n, d, -1)
        sq = np.stack([_psd_sqrt(_cov(el, d)) for el in lengths])  # (n, d, d)
        self._cells = torch.bmm(torch.tensor(sq, dtype=idt, device=dev), z)  # (n, d, M) local stats
        # one-cell answers, precomputed in the output dtype
        self._w1 = self._cells[:, 0].to(dtype)
        h = torch.tensor(lengths, dtype=idt, device=dev).view(n, 1)
        c = self._cells
        self._h1 = (c[:, 1] / h - c[:, 0] / 2).to(dtype) if d >= 2 else None
        self._k1 = (c[:, 1] / (2 * h) - c[:, 2] / h**2 + c[:, 0] / 12).to(dtype) if d >= 3 else None
        self._tol = 1e-9 * (self.t1 - self.t0) + self._slack

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
