"""Statistical and structural tests of the counter RNG, VirtualBrownianTree and BrownianGrid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from torchnde.paths import _brownian as brownian
from torchnde.paths import _descent, _rng
from torchnde.paths._brownian import BrownianGrid, VirtualBrownianTree

F64 = torch.float64
P_MIN = 1e-3  # fixed seeds: these pass deterministically; the threshold only guards the law


def _ks_normal(x: torch.Tensor, var: float) -> float:
    return stats.kstest(x.reshape(-1).double().numpy() / np.sqrt(var), "norm").pvalue


# ------------------------------------------------------------------------------------------ RNG
def test_rng_normal_and_independent():
    ek = _rng.element_keys(7, 20000)
    z = _rng.normals(ek, _rng.node_keys(1, np.arange(4)))
    assert z.dtype == F64 and z.shape == (4, 20000)
    for row in z:
        assert _ks_normal(row, 1.0) > P_MIN
    c = np.corrcoef(z.numpy())
    assert np.abs(c - np.eye(4)).max() < 0.03
    # neighbouring elements are independent too
    assert abs(np.corrcoef(z[0, :-1].numpy(), z[0, 1:].numpy())[0, 1]) < 0.03
    # pure function of the keys; per-row seeds reproduce single seeds
    assert torch.equal(z, _rng.normals(_rng.element_keys(7, 20000), _rng.node_keys(1, np.arange(4))))
    rows = _rng.element_keys(torch.tensor([7, 9]), 100).view(2, 100)
    assert torch.equal(rows[1], _rng.element_keys(9, 100))
    assert _rng.normals(ek[:10], _rng.node_keys(1, [0]), dtype=torch.float32).dtype == torch.float32


# ------------------------------------------------------------------------------------ the laws
@pytest.mark.parametrize("cls", ["tree", "grid"])
def test_increment_and_levy_laws(cls):
    n = 40000
    if cls == "tree":
        path = VirtualBrownianTree(0.0, 2.0, (n,), levy_area="space-time-time", seed=1, dtype=F64)
        s, t = 0.3, 0.7123
    else:
        path = BrownianGrid([0.0, 0.3, 0.5, 0.7123, 2.0], (n,), levy_area="space-time-time", seed=1, dtype=F64)
        s, t = 0.3, 0.7123
    h = t - s
    inc = path.increment(s, t)
    assert _ks_normal(inc.W, h) > P_MIN
    assert _ks_normal(inc.H, h / 12) > P_MIN
    assert _ks_normal(inc.K, h / 720) > P_MIN
    c = np.corrcoef(torch.stack([inc.W, inc.H, inc.K]).numpy())
    assert np.abs(c - np.eye(3)).max() < 0.03
    # W over a disjoint interval is independent
    other = path.increment(0.0, 0.3).W
    assert abs(np.corrcoef(other.numpy(), inc.W.numpy())[0, 1]) < 0.03


def test_bridge_law():
    # W(u) given W(s), W(t): mean (lerp), variance (u-s)(t-u)/(t-s)
    n = 40000
    path = VirtualBrownianTree(0.0, 1.0, (n,), seed=5, dtype=F64)
    s, u, t = 0.2, 0.33, 0.61
    ws, wu, wt = path.evaluate(s), path.evaluate(u), path.evaluate(t)
    lam = (u - s) / (t - s)
    resid = wu - (ws + lam * (wt - ws))
    assert _ks_normal(resid, (u - s) * (t - u) / (t - s)) > P_MIN
    assert abs(np.corrcoef(resid.numpy(), (wt - ws).numpy())[0, 1]) < 0.03


def test_short_intervals_law_and_float32_accuracy():
    n = 20000
    p64 = VirtualBrownianTree(0.0, 1.0, (n,), levy_area="space-time", seed=2, dtype=F64)
    p32 = VirtualBrownianTree(0.0, 1.0, (n,), levy_area="space-time", seed=2, dtype=torch.float32)
    s, h = 0.4123456, 3e-5  # a few leaves (tol ~ 1e-6)
    a, b = p64.increment(s, s + h), p32.increment(s, s + h)
    assert _ks_normal(a.W, h) > P_MIN and _ks_normal(a.H, h / 12) > P_MIN
    assert torch.allclose(b.W.double(), a.W, rtol=1e-5, atol=1e-6 * h**0.5)
    assert torch.allclose(b.H.double(), a.H, rtol=1e-5, atol=1e-6 * h**0.5)


# -------------------------------------------------------------------------- structure
def test_determinism_and_query_order():
    times = np.random.default_rng(0).uniform(0, 1, 12).tolist()
    ref = None
    for order in range(3):
        path = VirtualBrownianTree(0.0, 1.0, {"a": (3, 2), "b": (4,)}, levy_area="space-time", seed=11, dtype=F64)
        perm = np.random.default_rng(order).permutation(len(times))
        vals = {}
        for i in perm:
            vals[i] = path.increment(0.05, times[i])
        got = [torch.cat([vals[i].W["a"].reshape(-1), vals[i].W["b"], vals[i].H["b"]]) for i in range(len(times))]
        if ref is None:
            ref = got
        else:
            for x, y in zip(ref, got):
                assert torch.allclose(x, y, rtol=0, atol=1e-14)


@pytest.mark.parametrize("levy", [None, "space-time", "space-time-time"])
def test_additivity(levy):
    path = VirtualBrownianTree(-1.0, 3.0, (50,), levy_area=levy, seed=3, dtype=F64)
    s, u, t = -0.37, 1.234567, 2.9
    a, b, w = path.increment(s, u), path.increment(u, t), path.increment(s, t)
    assert torch.allclose(a.W + b.W, w.W, atol=1e-12)
    if levy is not None:
        h1, h2, h = u - s, t - u, t - s
        # H of the whole from the halves, via I = int_s^t (W - W(s)) = I1 + h2 W1 + I2, I_k = h_k (H_k + W_k / 2)
        ih = h1 * (a.H + a.W / 2) + h2 * (b.H + b.W / 2) + h2 * a.W  # I = int (W - W(s))
        assert torch.allclose(ih / h - w.W / 2, w.H, atol=1e-12)
    # backwards queries negate W and keep H
    r = path.increment(t, s)
    assert torch.allclose(r.W, -w.W)
    if levy is not None:
        assert torch.allclose(r.H, w.H)
    if levy == "space-time-time":
        assert torch.allclose(r.K, -w.K)


def test_grid_combines_cells_like_the_law():
    g = BrownianGrid.uniform(0.0, 1.0, 8, (30000,), levy_area="space-time-time", seed=4, dtype=F64)
    inc = g.increment(0.125, 0.625)
    h = 0.5
    assert _ks_normal(inc.W, h) > P_MIN and _ks_normal(inc.H, h / 12) > P_MIN and _ks_normal(inc.K, h / 720) > P_MIN
    parts = [g.increment(i / 8, (i + 1) / 8) for i in range(1, 5)]
    assert torch.allclose(sum(p.W for p in parts), inc.W, atol=1e-12)
    assert torch.allclose(g.increment(0.625, 0.125).W, -inc.W)
    one = g.increment(0.25, 0.375)
    assert torch.allclose(g.increment(0.375, 0.25).K, -one.K)
    with pytest.raises(ValueError, match="VirtualBrownianTree"):
        g.increment(0.1, 0.3)


@pytest.mark.parametrize("cls", [VirtualBrownianTree, BrownianGrid])
def test_per_sample_seeds_equal_separate_paths(cls):
    seeds = torch.tensor([3, 8, 8, 1])
    shape = {"x": (4, 3), "y": (4, 2, 2)}
    make = (
        (lambda **kw: cls(0.0, 1.0, **kw))
        if cls is VirtualBrownianTree
        else (lambda **kw: cls([0.0, 0.25, 0.5, 1.0], **kw))
    )
    batched = make(shape=shape, seed=seeds, levy_area="space-time", dtype=F64)
    inc = batched.increment(0.25, 0.5)
    for b in range(4):
        single = make(shape={"x": (3,), "y": (2, 2)}, seed=int(seeds[b]), levy_area="space-time", dtype=F64)
        one = single.increment(0.25, 0.5)
        for k in ("x", "y"):
            assert torch.allclose(inc.W[k][b], one.W[k], rtol=0, atol=1e-15)
            assert torch.allclose(inc.H[k][b], one.H[k], rtol=0, atol=1e-15)
    # per-sample (B,) query times
    ts = torch.tensor([0.25, 0.5, 0.5, 1.0], dtype=F64)
    per = batched.increment(torch.zeros(4, dtype=F64), ts)
    for b in range(4):
        want = batched.increment(0.0, float(ts[b])).W["x"][b]
        assert torch.allclose(per.W["x"][b], want, atol=1e-12)


def test_float32_endpoints_and_dtypes():
    t0, t1 = torch.tensor(0.1, dtype=torch.float32), torch.tensor(0.7, dtype=torch.float32)
    path = VirtualBrownianTree(0.1, 0.7, (5,), levy_area="space-time", dtype=torch.float32)
    inc = path.increment(t0, t1)
    assert inc.W.dtype == torch.float32 and inc.W.shape == (5,)
    assert torch.isfinite(inc.H).all()
    assert torch.equal(path.evaluate(t1), path.evaluate(0.1, 0.7))
    assert path.evaluate(0.7 + 1e-9).shape == (5,)
    assert "VirtualBrownianTree" in repr(path) and "BrownianGrid" in repr(BrownianGrid([0, 1], (2,)))


def test_errors():
    with pytest.raises(ValueError, match="t0 < t1"):
        VirtualBrownianTree(1.0, 1.0, (2,))
    with pytest.raises(ValueError, match="levy_area"):
        VirtualBrownianTree(0.0, 1.0, (2,), levy_area="space")
    with pytest.raises(ValueError, match="dtype"):
        VirtualBrownianTree(0.0, 1.0, (2,), dtype=torch.int32)
    with pytest.raises(ValueError, match="shape"):
        VirtualBrownianTree(0.0, 1.0, "abc")
    with pytest.raises(ValueError, match="leading dimension"):
        VirtualBrownianTree(0.0, 1.0, (3, 2), seed=torch.tensor([1, 2]))
    path = VirtualBrownianTree(0.0, 1.0, (2,))
    with pytest.raises(ValueError, match="after t1"):
        path.evaluate(0.0, 1.5)
    with pytest.raises(ValueError, match="before t0"):
        path.evaluate(-0.1)
    with pytest.raises(ValueError, match="increasing"):
        BrownianGrid([0.0, 0.5, 0.5], (2,))


# ------------------------------------------------------------------ speculation, vectorisation
@pytest.mark.parametrize("levy", [None, "space-time-time"])
@pytest.mark.parametrize("direction", [1, -1])
@pytest.mark.parametrize("per_level", [False, True])
def test_speculative_blocks_equal_direct_queries(levy, direction, per_level, monkeypatch):
    # a solver-like loop (t_{n+1} = t_n + dt, the last step clipped to the end) triggers the
    # speculative block path; the same intervals asked of a fresh tree in a shuffled order (no
    # speculation: no two consecutive queries are adjacent) must give the same bits.
    # per_level: pieces accumulated level by level (the large-shape mode) instead of at once
    if per_level:
        monkeypatch.setattr(_descent, "_BATCH_ELEMENTS", 0)
    n, dt = 57, 1.0 / 50
    spec = VirtualBrownianTree(0.0, 1.1, (3, 2), levy_area=levy, seed=9, dtype=F64)
    t, times = (0.0, [0.0]) if direction > 0 else (1.1, [1.1])
    for _ in range(n):
        t = min(t + dt, 1.1) if direction > 0 else max(t - dt, 0.0)
        times.append(t)
    seq = [spec.increment(a, b) for a, b in zip(times, times[1:])]
    assert len(spec._block) > 8  # the blocks were used
    direct = VirtualBrownianTree(0.0, 1.1, (3, 2), levy_area=levy, seed=9, dtype=F64)
    for i in np.random.default_rng(1).permutation(n):
        one = direct.increment(times[i], times[i + 1])
        assert torch.equal(one.W, seq[i].W)
        if levy is not None:
            assert torch.equal(one.H, seq[i].H) and torch.equal(one.K, seq[i].K)
    # and the steps add up to the whole
    whole = direct.increment(times[0], times[-1]).W
    assert torch.allclose(sum(x.W for x in seq), whole, atol=1e-12)


def test_per_sample_times_vectorised_equal_single_trees():
    seeds = torch.tensor([4, 17, 4, 2, 99])
    batched = VirtualBrownianTree(0.0, 2.0, (5, 3), seed=seeds, levy_area="space-time-time", dtype=F64)
    rng = np.random.default_rng(3)
    s = torch.tensor(rng.uniform(0, 2, 5))
    t = torch.tensor(rng.uniform(0, 2, 5))
    t[1] = s[1]  # an empty interval
    inc = batched.increment(s, t)
    assert inc.W.shape == (5, 3) and torch.equal(inc.dt, t - s)
    for b in range(5):
        single = VirtualBrownianTree(0.0, 2.0, (3,), seed=int(seeds[b]), levy_area="space-time-time", dtype=F64)
        one = single.increment(float(s[b]), float(t[b]))
        for x, y in ((inc.W, one.W), (inc.H, one.H), (inc.K, one.K)):
            assert torch.allclose(x[b], y, rtol=0, atol=1e-14)
    assert torch.equal(inc.W[1], torch.zeros(3, dtype=F64))


def test_short_interval_levy_area_against_float64_reference():
    # local assembly (no differences of large prefix integrals) keeps H of a short interval
    # accurate to float64 rounding: it matches the exact combination of its two parts
    p = VirtualBrownianTree(0.0, 1.0, (2000,), levy_area="space-time", seed=6, dtype=F64)
    s, h1, h2 = 0.73 - 0.73 % 2.0**-30, 14 * 2.0**-24, 29 * 2.0**-24  # a few leaves, on the time lattice
    h = h1 + h2
    whole = p.increment(s, s + h)
    a, b = p.increment(s, s + h1), p.increment(s + h1, s + h)
    ih = h1 * (a.H + a.W / 2) + h2 * (b.H + b.W / 2) + h2 * a.W
    assert torch.allclose(ih / h - whole.W / 2, whole.H, rtol=0, atol=1e-9 * h**0.5)


@pytest.mark.parametrize("levy", [None, "space-time"])
def test_kept_chain_and_blocks_equal_fresh_trees(levy):
    # the tree keeps the root-to-leaf chain of the last point between calls and computes
    # constant steps in blocks; every answer must equal a fresh tree's (no chain, no block)
    kw = dict(levy_area=levy, seed=21, dtype=F64)
    path = VirtualBrownianTree(0.0, 1.0, (40,), **kw)
    times = [k / 300 for k in range(41)] + [0.5, 0.2, 0.2 + 1e-6, 0.9]  # steps, then jumps
    got = [path.increment(a, b) for a, b in zip(times, times[1:])]
    for i in (0, 7, 8, 23, 39, 40, 41, 42, 43):
        fresh = VirtualBrownianTree(0.0, 1.0, (40,), **kw).increment(times[i], times[i + 1])
        assert torch.equal(got[i].W, fresh.W)
        if levy is not None:
            assert torch.equal(got[i].H, fresh.H)


@pytest.mark.parametrize("levy", [None, "space-time", "space-time-time"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_kept_chains_equal_the_vectorised_descent(levy, backend):
    # single intervals of small shapes are answered from kept root-to-leaf chains (numpy on the
    # CPU, or tensor ops); each must equal the vectorised descent's answer bit for bit, at
    # uneven increasing times, backwards, inside one leaf and at random
    tree = VirtualBrownianTree(0.0, 2.0, (4, 2), levy_area=levy, seed=5, dtype=torch.float32)
    assert tree._chains is not None
    tree._chains.numpy = backend == "numpy"
    ref = VirtualBrownianTree(0.0, 2.0, (4, 2), levy_area=levy, seed=5, dtype=torch.float32)
    rng = np.random.default_rng(2)
    ts = np.concatenate([[0.0], np.cumsum(rng.uniform(1e-7, 0.05, 25))]).tolist()
    pairs = list(zip(ts, ts[1:])) + [(b, a) for a, b in zip(ts, ts[1:])][::3] + [(0.3, 0.3 + 1e-8), (0.7, 0.7)]
    pairs += [tuple(rng.uniform(0, 2, 2)) for _ in range(10)]
    for s, t in pairs:
        got = tree.increment(s, t)
        lo, hi = sorted((tree._lattice(s), tree._lattice(t)))
        vals = brownian._levy_rows(ref._compute(np.array([lo]), np.array([hi]), None), np.array([(hi - lo) * ref._q]),
                                   np.ones(1), torch.float32)  # fmt: skip
        sign = 1.0 if tree._lattice(s) <= tree._lattice(t) else -1.0
        want = ref._answer(vals, 0, sign, t - s)
        for x, y in zip(got[1:], want[1:]):
            assert (x is None and y is None) or torch.equal(x, y)


def test_step_doubling_half_steps_start_no_block():
    # the two half steps of step doubling are adjacent and equal: no speculative block (it would
    # be wasted); three equal adjacent steps in a row do start one
    tree = VirtualBrownianTree(0.0, 1.0, (4, 2), seed=3, dtype=F64)
    t = 0.0
    for h in np.random.default_rng(0).uniform(0.01, 0.03, 20):
        tree.increment(t, t + h), tree.increment(t, t + h / 2), tree.increment(t + h / 2, t + h)
        t += h
    assert not tree._block
    for k in range(3):
        tree.increment(t + 0.01 * k, t + 0.01 * (k + 1))
    assert tree._block
