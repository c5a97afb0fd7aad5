"""``path.increments(s, t)``: many intervals at once, equal bit for bit to asking ``increment``
interval by interval (as a solver does), for the tree, the grid and the base-class default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchnde.paths import AbstractBrownianPath, BrownianGrid, BrownianIncrement, VirtualBrownianTree, _descent, _tree

F64, F32 = torch.float64, torch.float32
LEVY = [None, "space-time", "space-time-time"]
TREE_SHAPE = {"a": (3, 2), "b": [(4,), ()]}


def _leaves(x):
    if x is None:
        return [None]
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in _leaves(x[k])]
    if isinstance(x, (tuple, list)):
        return [v for y in x for v in _leaves(y)]
    return [x]


def _assert_rows_equal(many: BrownianIncrement, rows: list, s, t):
    """Row k of ``many`` is ``rows[k]`` bit for bit (values, dtypes and shapes, every leaf)."""
    assert many.dt.dtype == F64 and many.dt.shape == (len(rows),)
    assert many.dt.tolist() == [float(b) - float(a) for a, b in zip(s, t)]
    for i in (1, 2, 3):
        got = _leaves(many[i])
        for k, row in enumerate(rows):
            want = _leaves(row[i])
            assert len(got) == len(want)
            for g, w in zip(got, want):
                if w is None:
                    assert g is None
                    continue
                assert g.dtype == w.dtype and g.shape[1:] == w.shape and g.shape[0] == len(rows)
                assert torch.equal(g[k], w), (i, k)


def _grids():
    """Interval lists: forward and backward uniform steps, uneven steps, and a mixture."""
    rng = np.random.default_rng(4)
    fwd = [k / 37 for k in range(38)]
    uneven = np.concatenate([[0.0], np.cumsum(rng.uniform(1e-6, 0.06, 30)) * 0.9]).tolist()
    mixed = [tuple(rng.uniform(0.0, 1.0, 2).tolist()) for _ in range(12)] + [(0.3, 0.3), (1.0, 0.0), (0.0, 1.0)]
    return {
        "forward": list(zip(fwd, fwd[1:])),
        "backward": [(b, a) for a, b in zip(fwd, fwd[1:])][::-1],  # a backward-in-time solve
        "uneven": list(zip(uneven, uneven[1:])),
        "mixed": mixed,
    }


@pytest.mark.parametrize("levy", LEVY)
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("grid", ["forward", "backward", "uneven", "mixed"])
def test_tree_increments_equal_stepwise(levy, dtype, grid):
    ivs = _grids()[grid]
    s, t = [a for a, _ in ivs], [b for _, b in ivs]
    kw = dict(levy_area=levy, seed=3, dtype=dtype)
    stepwise = VirtualBrownianTree(0.0, 1.0, TREE_SHAPE, **kw)
    rows = [stepwise.increment(a, b) for a, b in ivs]  # as a solver asks (speculative blocks)
    path = VirtualBrownianTree(0.0, 1.0, TREE_SHAPE, **kw)
    path.increment(0.5, 0.25)  # queries before ...
    many = path.increments(s, t)
    _assert_rows_equal(many, rows, s, t)
    # ... and after change nothing: asked again, or one at a time
    _assert_rows_equal(path.increments(np.array(s), torch.tensor(t, dtype=F64)), rows, s, t)
    for k in (0, len(ivs) // 2, len(ivs) - 1):
        for x, y in zip(_leaves(path.increment(*ivs[k]).W), _leaves(rows[k].W)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("levy", LEVY)
@pytest.mark.parametrize("per_level", [False, True])
def test_tree_increments_in_chunks(levy, per_level, monkeypatch):
    # tiny chunks (one interval per descent) give the same bits; per_level: pieces accumulated
    # level by level (the large-shape mode of the descent), for both sides
    if per_level:
        monkeypatch.setattr(_descent, "_BATCH_ELEMENTS", 0)
    ts = [k / 50 for k in range(51)]
    s, t = ts[:-1], ts[1:]
    ref = VirtualBrownianTree(0.0, 1.0, (5, 2), levy_area=levy, seed=8, dtype=F64)
    rows = [ref.increment(a, b) for a, b in zip(s, t)]
    monkeypatch.setattr(_tree, "_INCREMENTS_ELEMENTS", 1)
    _assert_rows_equal(
        VirtualBrownianTree(0.0, 1.0, (5, 2), levy_area=levy, seed=8, dtype=F64).increments(s, t), rows, s, t
    )
    monkeypatch.setattr(_tree, "_INCREMENTS_ELEMENTS", 7 * 10 * 3)
    _assert_rows_equal(
        VirtualBrownianTree(0.0, 1.0, (5, 2), levy_area=levy, seed=8, dtype=F64).increments(s, t), rows, s, t
    )


def test_tree_increments_times_and_dt():
    # float32 tensor times (the rows are the queries at the same float32 values), endpoints
    # within float32 rounding, a shifted interval, a conditioned tree
    path = VirtualBrownianTree(0.1, 0.7, (4,), levy_area="space-time", seed=2)
    ts = torch.linspace(0.1, 0.7, 9, dtype=F32)
    many = path.increments(ts[:-1], ts[1:])
    rows = [
        VirtualBrownianTree(0.1, 0.7, (4,), levy_area="space-time", seed=2).increment(a, b)
        for a, b in zip(ts[:-1], ts[1:])
    ]
    _assert_rows_equal(many, rows, ts[:-1].tolist(), ts[1:].tolist())
    cond = VirtualBrownianTree(0.0, 1.0, (3,), seed=1, dtype=F64)
    cond._condition(torch.ones(3, dtype=F64))
    many = cond.increments([0.0, 0.2, 0.0], [0.2, 1.0, 1.0])
    assert torch.allclose(many.W[2], torch.ones(3, dtype=F64), atol=1e-14)
    assert torch.equal(many.W[1], cond.increment(0.2, 1.0).W)


@pytest.mark.parametrize("levy", LEVY)
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("grid", ["forward", "backward", "uneven", "cells"])
def test_grid_increments_equal_stepwise(levy, dtype, grid):
    ivs = _grids()[grid] if grid != "cells" else None
    if grid == "cells":  # one cell, several cells, empty, both directions
        ts = BrownianGrid.uniform(0.0, 1.0, 10, (2,)).ts
        ivs = [(ts[i], ts[j]) for i, j in [(0, 1), (3, 2), (2, 7), (9, 4), (5, 5), (0, 10), (10, 9)]]
        knots = ts
    else:
        knots = sorted({x for iv in ivs for x in iv})
    s, t = [a for a, _ in ivs], [b for _, b in ivs]
    kw = dict(levy_area=levy, seed=6, dtype=dtype)
    stepwise = BrownianGrid(knots, TREE_SHAPE, **kw)
    rows = [stepwise.increment(a, b) for a, b in ivs]
    path = BrownianGrid(knots, TREE_SHAPE, **kw)
    _assert_rows_equal(path.increments(s, t), rows, s, t)
    _assert_rows_equal(path.increments(np.array(s), np.array(t)), rows, s, t)


class _Ramp(AbstractBrownianPath):
    """A custom (non-random) path: ``W(t) = t`` on two leaves, ``H = (t - s)^2``."""

    def __init__(self):
        self.t0, self.t1, self.shape, self.levy_area = 0.0, 2.0, {"x": (2,), "y": ()}, "space-time"
        self.calls = 0

    def increment(self, s, t):
        self.calls += 1
        w = torch.tensor([t - s, 2 * (t - s)], dtype=F64)
        return BrownianIncrement(t - s, {"x": w, "y": w[1]}, {"x": w**2, "y": w[0] ** 2})


def test_base_class_default_loops_and_stacks():
    path = _Ramp()
    s, t = [0.0, 1.5, 0.25], [0.5, 1.0, 0.25]
    many = path.increments(s, t)
    assert path.calls == 3 and many.K is None
    _assert_rows_equal(many, [_Ramp().increment(a, b) for a, b in zip(s, t)], s, t)
    empty = path.increments([], [])
    assert empty.W["x"].shape == (0, 2) and empty.W["y"].shape == (0,) and empty.dt.shape == (0,)


def test_increments_empty_and_errors():
    tree = VirtualBrownianTree(0.0, 1.0, {"a": (3,), "b": (2, 2)}, levy_area="space-time")
    grid = BrownianGrid.uniform(0.0, 1.0, 4, (3,))
    e = tree.increments([], [])
    assert e.W["a"].shape == (0, 3) and e.W["b"].shape == (0, 2, 2) and e.H["a"].shape == (0, 3)
    assert grid.increments(np.zeros(0), np.zeros(0)).W.shape == (0, 3)
    for path in (tree, grid):
        with pytest.raises(ValueError, match="same length"):
            path.increments([0.0, 0.5], [0.5])
        with pytest.raises(ValueError, match="1-d"):
            path.increments(torch.zeros(2, 2), torch.zeros(2, 2))
        with pytest.raises(ValueError, match="after t1"):
            path.increments([0.0], [1.5])
        with pytest.raises(ValueError, match="non-finite"):
            path.increments([0.0], [float("nan")])
    with pytest.raises(ValueError, match="not on its grid"):
        grid.increments([0.0, 0.1], [0.25, 0.5])


@pytest.mark.parametrize("levy", LEVY)
@pytest.mark.parametrize("shape", [(3, 2), TREE_SHAPE, "per-sample"])
def test_grid_one_cell_fast_path_equals_general_path(levy, shape):
    # float grid times take a dictionary fast path; 0-d tensor times the general one (clamp,
    # nearest grid index, cell gather): the same values, both directions, increment and evaluate
    seed = 5
    if shape == "per-sample":
        shape, seed = (2, 3), torch.tensor([4, 9])
    g = BrownianGrid([0.0, 0.1, 0.35, 0.5, 1.0], shape, levy_area=levy, seed=seed, dtype=F64)
    for a, b in [(0.1, 0.35), (0.35, 0.1), (0.0, 0.1), (1.0, 0.5), (0.1, 0.5)]:
        fast, slow = g.increment(a, b), g.increment(torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64))
        for i in (1, 2, 3):
            for x, y in zip(_leaves(fast[i]), _leaves(slow[i])):
                assert (x is None and y is None) or torch.equal(x, y)
        for x, y in zip(_leaves(g.evaluate(a, b)), _leaves(fast.W)):
            assert torch.equal(x, y)
    # a grid time within clamping slack of t0 is clamped to t0 by the general path: the fast
    # path must not answer it as its own cell
    near = BrownianGrid([0.0, 1e-9, 0.5, 1.0], (4,), seed=1, dtype=F64)
    assert torch.equal(near.increment(1e-9, 0.5).W, near.increment(0.0, 0.5).W)
    assert torch.equal(near.evaluate(1e-9, 0.5), near.increment(0.0, 0.5).W)


@pytest.mark.parametrize("tol", [2.0, 0.3, 1e-3])
@pytest.mark.parametrize("levy", [None, "space-time-time"])
def test_tree_increments_any_depth(tol, levy):
    # depth 0 (one leaf), shallow and default-like trees
    ts = [k / 20 for k in range(21)]
    kw = dict(tol=tol, levy_area=levy, seed=2, dtype=F64)
    stepwise = VirtualBrownianTree(0.0, 1.0, (3,), **kw)
    rows = [stepwise.increment(a, b) for a, b in zip(ts, ts[1:])]
    _assert_rows_equal(VirtualBrownianTree(0.0, 1.0, (3,), **kw).increments(ts[:-1], ts[1:]), rows, ts[:-1], ts[1:])


@pytest.mark.parametrize("cls", [VirtualBrownianTree, BrownianGrid])
@pytest.mark.parametrize("levy", [None, "space-time-time"])
def test_increments_with_per_sample_seeds(cls, levy):
    # shared times on a path with per-sample seeds: rows equal the step-by-step queries, and
    # sample b equals the single-seed path with seed[b]
    seeds = torch.tensor([3, 8, 1])
    shape = {"x": (3, 2), "y": (3,)}
    ts = [k / 8 for k in range(9)]
    first = (0.0, 1.0) if cls is VirtualBrownianTree else (ts,)
    ivs = list(zip(ts, ts[1:])) + [(0.75, 0.25), (0.5, 0.5)]
    s, t = [a for a, _ in ivs], [b for _, b in ivs]
    stepwise = cls(*first, shape, levy_area=levy, seed=seeds, dtype=F64)
    rows = [stepwise.increment(a, b) for a, b in ivs]
    many = cls(*first, shape, levy_area=levy, seed=seeds, dtype=F64).increments(s, t)
    _assert_rows_equal(many, rows, s, t)
    assert many.W["x"].shape == (len(ivs), 3, 2)
    one = cls(*first, {"x": (2,), "y": ()}, levy_area=levy, seed=8, dtype=F64).increments(s, t)
    assert torch.allclose(many.W["x"][:, 1], one.W["x"], rtol=0, atol=1e-15)
