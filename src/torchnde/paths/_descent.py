"""The vectorised descent of :class:`~torchnde.paths.VirtualBrownianTree`: the local statistics
of a batch of intervals from one pass down the tree (:func:`compute`), with its reused scratch
buffers (:class:`_Work`)."""

from __future__ import annotations

import numpy as np
import torch

from . import _rng
from ._brownian_common import _STREAM_LEAF, _STREAM_SPLIT
from ._levy import _combine_many, _position_maps, _split_many

# normals are drawn a group of levels at a time, about this many values per group
_RNG_CHUNK = 1 << 17
# pieces are gathered into one buffer and added at once below this many values, else per level
_BATCH_ELEMENTS = 1 << 17
# scratch buffers (and the kept chain) are kept between calls up to this size
_KEEP_BYTES = 64 << 20


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


def compute(tree, lo: np.ndarray, hi: np.ndarray, rows, keep=None) -> torch.Tensor:
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
    D, E, T, d = tree._depth, tree._extra, tree._bits, tree._d
    idt, dev = tree._idt, tree.device
    q = lo.shape[0]
    per_sample = rows is not None
    if per_sample:
        cols = tree._layout.cols
        ek32 = tree._ek32.view(tree._layout.rows, cols)
        root = tree._root.view(d, tree._layout.rows, cols)
        prow = np.concatenate([rows, rows]).astype(np.int64)
    else:
        cols = tree._ek32.shape[0]
        ek32 = tree._ek32
        root = tree._root.view(d, 1, cols)
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
    chain = None if per_sample else tree._chain
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
            if tree._split1[lev] is not None and ncomp[lev] == ncomp[lev + 1] > 0:
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
    ell = tree._span * 2.0**-D
    h = (hi - lo) * tree._q
    same, diff, lq, g_stats, g_normals = _leaf_parts(ka, kb, frac[:q], frac[q:], lo, h, ell, E, tree._q, d)
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
        p_g.append(_sibling_maps(s_i, sib, lo[s_q], h[s_q], T, tree._q, d))
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
        buf = tree._chain_buf
        if buf is None or buf.shape != (D + 1, 2 * d, cols):
            buf = tree._chain_buf = torch.empty(D + 1, 2 * d, cols, dtype=idt, device=dev)
        save = (int(leaf[kidx]), buf)
        tree._chain = None  # until it is complete
    # one index tensor: piece sources, piece targets, parents, kept rows
    index = torch.as_tensor(np.concatenate([src_np, np.concatenate(p_q)[by_src], parent, krows]), device=dev)
    idx_src, idx_q = index[:npc], index[npc : 2 * npc]
    poff = np.concatenate([[0], np.cumsum(ncomp[1:])]).tolist()
    idx_par = index[2 * npc : 2 * npc + parent.shape[0]]
    idx_keep = index[2 * npc + parent.shape[0] :]
    if path.any():  # b times the side of the path child, per computed unit of a path level
        on = path[c_lev]
        bs = np.array([tree._split1[lev][1] if path[lev] else 0.0 for lev in range(D + 1)])[c_lev[on]]
        bsign = torch.as_tensor(bs * (1 - 2 * pbit[comp[on]]), dtype=idt, device=dev).view(-1, 1, 1)
        bsoff = np.concatenate([[0], np.cumsum(np.where(path, ncomp, 0))]).tolist()
    g_all = torch.as_tensor(g_np, dtype=idt, device=dev)
    if d > 1:
        g_all = g_all.transpose(1, 2).unsqueeze(-1)  # g[:, j] = column j, (P, d, 1)
        unit_g = [False] * (D + 2)
    else:
        notone = np.concatenate([[0], np.cumsum(g_np.reshape(-1) != 1.0)])
        unit_g = [notone[bounds[t + 2]] == notone[bounds[t + 1]] for t in range(-1, D + 1)]
    work = tree._work
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
        p = torch.index_select(src, 0, idx_src[a:b], out=work.get("pieces", (b - a) * d * cols, idt).view(-1, d, cols))
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
            split = tree._split1[lev]
            if split is not None:  # d = 1: children a W +- b z (in place: W, z are not needed again)
                sa = (
                    stats.mul_(split[0]) if lev else torch.mul(stats, split[0], out=tmpbuf[: m * cols].view(m, 1, cols))
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
                cab = tree._ab_cols[lev]
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
        tree._chain = save
    return out
