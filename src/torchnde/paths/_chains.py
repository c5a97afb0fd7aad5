"""The single-interval fast path of :class:`~torchnde.paths.VirtualBrownianTree`: kept chains.

A solver with adaptive (uneven) steps asks one interval ``[s, t]`` at a time, and consecutive
queries share most of their root-to-leaf paths (the next step starts where the last one ended).
The vectorised descent (``VirtualBrownianTree._compute``) plans every query in numpy and runs
about ten tensor ops per level, which on small shapes costs a millisecond of fixed overhead per
query. This module answers one shared-time interval from *kept chains* instead:

* a chain is the list of the children of every node on the path from the root to a leaf, plus
  the leaf's bridge normals; the chains of the last few query ends are kept (a small LRU);
* a new end reuses the longest common prefix of a kept chain (its top levels are exactly the
  same nodes) and splits only the levels below it, with all their normals drawn in one RNG call;
* the interval's pieces (the two leaf parts and the siblings below the lowest common ancestor)
  are then gathered from the two chains, weighted, and summed in one ``index_add_``.

Every node is split by the same float operations as in the vectorised descent (``a W + b z`` and
``a W - b z`` for the halving without Lévy areas, the column-by-column product ``[AA | BB]
[parent; z]`` otherwise), the pieces come in the same order (by source level; at a level, the
leaf parts, then ``s``'s sibling, then ``t``'s) with the same weights, and they are summed by the
same ``index_add_`` into zeros: the result is bit for bit that of
``_compute([lo], [hi], None)``, which the tests check.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _rng

__all__ = ["ChainCache", "levy_numpy"]

# how many chains are kept (the two ends of the last query, and a few before: a rejected step's
# end, a midpoint)
_KEEP_CHAINS = 4


class ChainCache:
    """Kept root-to-leaf chains of one tree (shared times), and the single-interval query that
    uses them. The methods take the owning VirtualBrownianTree ``tree`` and read only its
    constants and ``_root`` (conditioning the tree must :meth:`clear` the cache).

    On the CPU with float64 internals the chains are numpy arrays: an elementwise float64 product
    or sum is the same IEEE operation in numpy as in torch (no fused multiply-add in either), and
    on vectors of a few dozen values numpy's per-op cost is about a third of torch's. Elsewhere
    they are tensors on the tree's device, split by the same operators."""

    def __init__(self, tree, streams: tuple[int, int], split_many):
        self.split_stream, self.leaf_stream = streams
        self.numpy = tree.device.type == "cpu" and tree._idt == torch.float64
        self.chains: list = []  # [(leaf, kids, z)], most recent last
        self.root = None  # the tree's root stats, as an array of the backend
        self.halving = None  # per level: how a node is split (see _constants)
        self.zmul = self.ek32 = self.tags = None
        self.splits: dict = {}  # split_rows' cache
        self.split_many = split_many

    def clear(self) -> None:
        self.chains, self.root = [], None

    def fresh(self, tree) -> ChainCache:
        return ChainCache(tree, (self.split_stream, self.leaf_stream), self.split_many)

    def _constants(self, tree):
        """The root, and per level how a node is split: ``(a, [b, -b])`` (d = 1: the children
        are ``a W + b z`` and ``a W - b z``) or the transposed halving matrix ``[AA | BB]^T``."""
        if self.root is None:
            self.root = tree._root.cpu().numpy() if self.numpy else tree._root
        if self.halving is None:
            self.ek32 = tree._ek32.cpu().numpy() if self.numpy else None
            streams = np.full(tree._depth + 1, self.split_stream)
            streams[-1] = self.leaf_stream
            self.tags = _rng.key_tags(streams[:, None], np.arange(tree._d)[None, :])  # (D + 1, d)
            self.halving = []
            for lev in range(tree._depth):
                split = tree._split1[lev]
                if split is not None:
                    pm = torch.tensor([split[1], -split[1]], dtype=torch.float64).view(2, 1, 1)
                    self.halving.append((split[0], pm.numpy() if self.numpy else pm.to(tree._idt).to(tree.device)))
                else:
                    cols = tree._ab_cols[lev][:, 0]  # [j]: column j of [AA | BB], (2d, 1)
                    self.halving.append((None, cols.cpu().numpy() if self.numpy else cols))
            # d = 1 in numpy: the [b, -b] of every level at once (the products z b of a chain in one op)
            if self.numpy and tree._d == 1 and all(a is not None for a, _ in self.halving):
                self.zmul = np.stack([m for _, m in self.halving])

    def split_rows(self, r: np.ndarray, length: float, d: int):
        """``split_many(r, length, d)`` (the conditional split of a leaf at fractions ``r``),
        row by row from a cache: a query's leaf fractions come back in the next query (the end
        of one step is the start of the next), and the rows of ``split_many`` are independent."""
        a, b = np.empty((r.shape[0], d, d)), np.empty((r.shape[0], d, d))
        for i, v in enumerate(r.tolist()):
            row = self.splits.get(v)
            if row is None:
                if len(self.splits) >= 64:
                    self.splits.clear()
                ra, rb = self.split_many(np.array([v]), length, d)
                row = self.splits[v] = (ra[0], rb[0])
            a[i], b[i] = row
        return a, b

    # ------------------------------------------------------------------------------ chains
    def chain(self, tree, leaf: int):
        """``(kids, z)`` for ``leaf``: ``kids[lev]`` (``(2, d, C)``) the children of the node at
        level ``lev`` on its path, ``z`` (``(d, C)``) its bridge normals."""
        D, d, idt, dev = tree._depth, tree._d, tree._idt, tree.device
        cols = tree._ek32.shape[0]
        best, shared = None, -1  # shared: the deepest level whose node (and children) is reused
        for i, (cleaf, ckids, cz) in enumerate(self.chains):
            x = cleaf ^ leaf
            if x == 0:
                self.chains.append(self.chains.pop(i))
                return ckids, cz
            lev = D - x.bit_length()
            if lev > shared:
                best, shared = ckids, lev
        first = shared + 1  # the first level to split
        kids = best[:first] if best is not None else []
        # normals: the split keys of levels first..D-1, then the leaf's bridge keys
        self._constants(tree)
        levs = np.arange(first, D + 1)
        heap = (np.int64(leaf) >> (D - levs)) + (np.int64(1) << levs)  # heap numbers of the nodes
        if D < 27:  # nodes below 2**28: keys from the tags of (stream, component) per level
            keys = _rng.small_node_keys(heap.astype(np.uint32)[:, None], self.tags[first:]).reshape(-1)
        else:
            stream = np.where(levs == D, self.leaf_stream, self.split_stream)
            keys = _rng.node_keys(stream[:, None], heap[:, None], np.arange(d)[None, :]).reshape(-1)
        if self.numpy:
            zs = _rng.normals_numpy(self.ek32, keys).reshape(-1, d, cols)
        else:
            nrow = keys.shape[0]
            z64 = torch.empty(nrow, cols, dtype=torch.float64, device=dev)
            bits = [torch.empty(nrow, cols, dtype=torch.int32, device=dev) for _ in range(2)]
            _rng.normals_into(z64, tree._ek32, torch.as_tensor(keys, device=dev), *bits)
            zs = (z64 if idt == torch.float64 else z64.to(idt)).view(-1, d, cols)
        zmul = zs[: D - first, None] * self.zmul[first:] if self.zmul is not None else None
        for i, lev in enumerate(range(first, D)):
            stats = self.root if lev == 0 else kids[lev - 1][(leaf >> (D - lev)) & 1]
            a, m = self.halving[lev]
            if a is not None:  # d = 1: a W + b z, a W - b z (z (-b) is exactly -(z b))
                kids.append(stats * a + (zmul[i] if zmul is not None else zs[i] * m))
            elif self.numpy:  # [AA | BB] [parent; z]: the products, summed in the order of j
                prods = np.concatenate([stats, zs[i]])[:, None, :] * m  # [j, i] = x_j AB[i, j]
                kids.append(np.add.accumulate(prods, axis=0)[-1].reshape(2, d, cols))
            else:
                flat = stats[:1] * m[0]
                for j in range(1, 2 * d):
                    x = stats[j : j + 1] if j < d else zs[i][j - d : j - d + 1]
                    flat += x * m[j]
                kids.append(flat.reshape(2, d, cols))
        zleaf = zs[D - first]
        self.chains.append((leaf, kids, zleaf))
        if len(self.chains) > _KEEP_CHAINS:
            del self.chains[0]
        return kids, zleaf

    # ------------------------------------------------------------------------ one interval
    def interval(self, tree, lo: int, hi: int):
        """Local stats ``(1, d, C)`` of ``[lo, hi]`` (lattice points, ``lo <= hi``; a float64 array
        on the numpy backend, else a tensor), equal bit for
        bit to ``tree._compute([lo], [hi], None)`` (the pieces' weights from ``tree._leaf_maps``,
        as the vectorised descent computes them)."""
        D, E, d, idt, dev = tree._depth, tree._extra, tree._d, tree._idt, tree.device
        top = (1 << D) - 1
        ka, kb = min(lo >> E, top), min(hi >> E, top)
        kids_a, za = self.chain(tree, ka)
        kids_b, zb = (kids_a, za) if kb == ka else self.chain(tree, kb)
        # sibling pieces below the lowest common ancestor, level by level: s's right siblings
        # (while s's path goes left), t's left siblings (while t's path goes right)
        sib_src, sib_lev, sib_node = [], [], []
        for lev in range(D - (ka ^ kb).bit_length() + 1, D):
            ca, cb = ka >> (D - lev - 1), kb >> (D - lev - 1)
            if not ca & 1:
                sib_src.append(kids_a[lev][1])
                sib_lev.append(lev)
                sib_node.append(ca + 1)
            if cb & 1:
                sib_src.append(kids_b[lev][0])
                sib_lev.append(lev)
                sib_node.append(cb - 1)
        g_leaf_stats, g_leaf_z, g_sib = tree._leaf_maps(lo, hi, np.array(sib_lev, dtype=np.int64), sib_node)
        # order of the vectorised descent: by source level; at level D - 1 the leaf parts first
        leaf_stats = [kids_a[D - 1][ka & 1]] if ka == kb else [kids_a[D - 1][ka & 1], kids_b[D - 1][kb & 1]]
        leaf_z = [za] if ka == kb else [za, zb]
        at_last = len(sib_lev) - sum(1 for lev in sib_lev if lev == D - 1)
        pieces = sib_src[:at_last] + leaf_stats + sib_src[at_last:] + leaf_z
        g = np.concatenate([g_sib[:at_last], g_leaf_stats, g_sib[at_last:], g_leaf_z])
        if self.numpy:
            parts = np.stack(pieces)
        else:
            parts = torch.stack(pieces)
            g = torch.as_tensor(g, dtype=idt, device=dev)
        # weighted as the vectorised descent does: w[p, i] = sum_j parts[p, j] g[p, i, j], j in order
        if d == 1:
            w = parts * g.reshape(-1, 1, 1)
        else:
            w = parts[:, :1] * g[:, :, :1]
            for j in range(1, d):
                w += parts[:, j : j + 1] * g[:, :, j : j + 1]
        if self.numpy:  # the sum 0 + w[0] + w[1] + ... of index_add_, in the same order
            w[0] += 0.0
            return np.add.accumulate(w, axis=0, out=w)[-1:]
        out = torch.zeros(1, d, tree._ek32.shape[0], dtype=idt, device=dev)
        return out.index_add_(0, torch.zeros(len(pieces), dtype=torch.int64, device=dev), w)


def levy_numpy(x: np.ndarray, h: float, dtype) -> tuple:
    """``_levy_rows(x, [h], [1.0], dtype)`` for one interval in numpy: ``x`` the local stats
    ``(1, d, C)`` (float64) over ``h``; the same float operations in the same order, and torch's
    cast to ``dtype``. Returns ``(W, H, K)``, each ``(1, C)`` or None."""
    d = x.shape[1]
    w, hh, kk = x[:, 0], None, None
    if d >= 2:
        hq, inv = (h, 1.0 / h) if h > 0 else (1.0, 0.0)
        hh = x[:, 1] - x[:, 0] * (hq / 2)  # H = (I - W h/2) / h
        hh *= inv
        if d >= 3:  # K = (W + 6 I / h - 12 J / h^2) / 12
            kk = x[:, 0] + x[:, 1] * (6.0 * inv)
            kk -= x[:, 2] * (12.0 * inv * inv)
            kk *= inv * hq / 12
    return tuple(None if v is None else torch.from_numpy(v).to(dtype, copy=True) for v in (w, hh, kk))
