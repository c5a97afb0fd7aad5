"""torchnde.generative.graphs: offline graph data, tensor conversion, orbit counts, MMDs, score networks."""

import itertools
import math

import networkx as nx
import numpy as np
import pytest
import torch

from torchnde.generative.graphs import (
    AdjScoreNet,
    GraphScoreModel,
    NodeScoreNet,
    erdos_renyi_like,
    graph_mmd,
    load,
    mmd_floor,
    orbit_counts,
    to_graphs,
    to_tensors,
    train_test_split,
)
from torchnde.generative.graphs.metrics import ORBITS, _orbit_of, descriptors, mmd

# ---------------------------------------------------------------------------------------------
# orbit counts against closed forms and brute-force enumeration


def _expected(n, pairs):
    out = np.zeros((n, 15), dtype=np.int64)
    for node, orbit, value in pairs:
        out[node, orbit] = value
    return out


@pytest.mark.parametrize("n", [4, 5, 7])
def test_orbits_complete_graph(n):
    c = orbit_counts(nx.complete_graph(n))
    want = np.zeros(15, dtype=np.int64)
    want[0], want[3], want[14] = n - 1, math.comb(n - 1, 2), math.comb(n - 1, 3)
    assert (c == want).all()


@pytest.mark.parametrize("m", [3, 5])
def test_orbits_star(m):
    c = orbit_counts(nx.star_graph(m))  # node 0 is the centre
    centre = np.zeros(15, dtype=np.int64)
    centre[[0, 2, 7]] = m, math.comb(m, 2), math.comb(m, 3)
    leaf = np.zeros(15, dtype=np.int64)
    leaf[[0, 1, 6]] = 1, m - 1, math.comb(m - 1, 2)
    assert (c[0] == centre).all() and (c[1:] == leaf).all()


def test_orbits_path():
    n = 7
    c = orbit_counts(nx.path_graph(n))
    for i in range(n):
        want = np.zeros(15, dtype=np.int64)
        want[0] = (i > 0) + (i < n - 1)
        want[1] = (i >= 2) + (i <= n - 3)
        want[2] = 0 < i < n - 1
        want[4] = (i >= 3) + (i <= n - 4)
        want[5] = (i >= 1 and i <= n - 3) + (i >= 2 and i <= n - 2)
        assert (c[i] == want).all(), (i, c[i], want)


def test_orbits_cycles():
    c4 = orbit_counts(nx.cycle_graph(4))
    want4 = np.zeros(15, dtype=np.int64)
    want4[[0, 1, 2, 8]] = 2, 2, 1, 1
    assert (c4 == want4).all()
    c7 = orbit_counts(nx.cycle_graph(7))
    want7 = np.zeros(15, dtype=np.int64)
    want7[[0, 1, 2, 4, 5]] = 2, 2, 1, 2, 2
    assert (c7 == want7).all()


def test_orbits_paw_and_diamond():
    paw = nx.Graph([(0, 1), (1, 2), (0, 2), (2, 3)])  # 3 is the tail, 2 the centre
    c = orbit_counts(paw)
    assert [int(c[v, o]) for v, o in ((3, 9), (0, 10), (1, 10), (2, 11))] == [1, 1, 1, 1]
    diamond = nx.Graph([(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)])  # 1, 2 have degree 3
    c = orbit_counts(diamond)
    assert c[0, 12] == c[3, 12] == 1 and c[1, 13] == c[2, 13] == 1
    assert len(ORBITS) == 15


def test_orbits_match_enumeration_on_random_graphs():
    rng = np.random.default_rng(3)
    for _ in range(4):
        g = nx.gnp_random_graph(7, float(rng.uniform(0.3, 0.8)), seed=int(rng.integers(1 << 30)))
        a = nx.to_numpy_array(g)
        brute = np.zeros((7, 15), dtype=np.int64)
        brute[:, 0] = a.sum(1)
        for k in (3, 4):
            for s in itertools.combinations(range(7), k):
                sub = a[np.ix_(s, s)]
                for i, v in enumerate(s):
                    o = _orbit_of(sub, i)
                    if o is not None:
                        brute[v, o] += 1
        assert (orbit_counts(g) == brute).all()


# ---------------------------------------------------------------------------------------------
# data


def test_generators_deterministic_and_sized():
    for name, n, check in [
        ("community_small", 12, lambda g: g.number_of_nodes() in range(12, 21, 2)),
        ("grid", 3, lambda g: 100 <= g.number_of_nodes() <= 361 and g.number_of_edges() > 0),
        ("planar", 2, lambda g: g.number_of_nodes() == 64 and nx.check_planarity(g)[0] and nx.is_connected(g)),
        ("sbm", 2, lambda g: 40 <= g.number_of_nodes() <= 200 and nx.is_connected(g)),
    ]:
        a, b, c = load(name, n, seed=1), load(name, n, seed=1), load(name, n, seed=2)
        assert len(a) == n and all(check(g) for g in a), name
        assert [sorted(g.edges()) for g in a] == [sorted(g.edges()) for g in b], name
        assert [sorted(g.edges()) for g in a] != [sorted(g.edges()) for g in c], name
    comm = load("community_small", 30, seed=0)
    assert all(nx.is_connected(g) for g in comm)  # two dense communities and >= 1 bridge
    with pytest.raises(ValueError, match="unknown graph data set"):
        load("ego", 3)


def test_train_test_split():
    gs = load("community_small", 10, seed=0)
    train, test = train_test_split(gs, 0.2, seed=0)
    assert len(train) == 8 and len(test) == 2
    assert {id(g) for g in train} | {id(g) for g in test} == {id(g) for g in gs}


def test_tensor_round_trip():
    gs = load("community_small", 5, seed=4) + [nx.path_graph(3)]
    batch = to_tensors(gs, max_nodes=22, dtype=torch.float64)
    x, adj, mask = batch
    assert adj.shape == (6, 22, 22) and mask.shape == (6, 22) and x.shape[:2] == (6, 22)
    assert torch.equal(adj, adj.transpose(1, 2)) and not adj.diagonal(dim1=1, dim2=2).any()
    assert torch.equal(mask.sum(1), torch.tensor([float(g.number_of_nodes()) for g in gs], dtype=torch.float64))
    pad = mask == 0
    assert not adj[pad].any() and not x[pad].any()
    # one-hot degree features
    assert torch.equal(x.argmax(-1)[~pad], adj.sum(-1)[~pad].long())
    back = to_graphs(adj, mask)
    assert [(g.number_of_nodes(), sorted(g.edges())) for g in back] == [
        (g.number_of_nodes(), sorted(g.edges())) for g in gs
    ]
    # a continuous sample thresholded at 0.5 (only the upper triangle is read)
    noisy = adj * 0.9 + 0.4 * torch.rand(adj.shape, generator=torch.Generator().manual_seed(0), dtype=adj.dtype)
    assert [sorted(g.edges()) for g in to_graphs(noisy, mask)] == [sorted(g.edges()) for g in gs]
    ones = to_tensors(gs, features="ones")
    assert ones.x.shape[-1] == 1 and torch.equal(ones.x[..., 0], ones.mask)
    with pytest.raises(ValueError, match="max_nodes"):
        to_tensors(gs, max_nodes=10)


# ---------------------------------------------------------------------------------------------
# MMD


def test_mmd_identical_zero_and_different_positive():
    comm = load("community_small", 12, seed=0)
    ring = [nx.cycle_graph(n) for n in range(12, 21, 2)] * 2
    same = graph_mmd(comm, comm, ("degree", "clustering", "orbit", "spectral"))
    assert all(abs(v) < 1e-12 for v in same.values()), same
    diff = graph_mmd(comm, ring, ("degree", "clustering", "orbit", "spectral"))
    assert all(v > 0.1 for v in diff.values()), diff
    u_same = graph_mmd(comm, comm, ("degree", "clustering", "orbit", "spectral"), convention="unbiased")
    u_diff = graph_mmd(comm, ring, ("degree", "clustering", "orbit", "spectral"), convention="unbiased")
    # the U-statistic of a set against itself is 2 (mean off-diagonal k - mean k) <= 0: small, not 0
    assert all(-0.2 < v <= 1e-12 for v in u_same.values()) and all(u_diff[k] > 0.2 for k in u_diff), (u_same, u_diff)


def test_mmd_kernels_and_emd():
    # two point masses two degrees apart: EMD = 2, so the Gaussian-EMD MMD of singletons is 2 - 2 e^{-2}
    X, Y = np.array([[0.0, 1.0, 0.0, 0.0]]), np.array([[0.0, 0.0, 0.0, 1.0]])
    assert mmd(X, Y, kernel="gaussian_emd", sigma=1.0) == pytest.approx(2 - 2 * math.exp(-2.0))
    assert mmd(X, Y, kernel="laplacian_emd", sigma=1.0) == pytest.approx(2 - 2 * math.exp(-2.0))
    assert mmd(X, Y, kernel="gaussian_tv", sigma=1.0) == pytest.approx(2 - 2 * math.exp(-0.5))
    with pytest.raises(ValueError, match="unknown kernel"):
        mmd(X, Y, kernel="rbf")
    d = descriptors([nx.path_graph(3)], "degree")
    assert np.allclose(d, [[0, 2 / 3, 1 / 3]])


def test_erdos_renyi_baseline_above_floor():
    ref = load("community_small", 40, seed=10)
    er = erdos_renyi_like(load("community_small", 80, seed=11), 40, seed=12)
    dens = lambda gs: np.mean([nx.density(g) for g in gs])  # noqa: E731
    assert abs(dens(er) - dens(ref)) < 0.05
    got = graph_mmd(ref, er, ("degree", "clustering"))
    floor = mmd_floor("community_small", 40, seeds=range(3), metrics=("degree", "clustering"))
    for k in got:
        mean, sd = floor[k]
        assert got[k] > mean + 3 * sd, (k, got[k], floor[k])


# ---------------------------------------------------------------------------------------------
# score networks


def _batch(seed=0):
    gs = load("community_small", 3, seed=seed)
    b = to_tensors(gs, max_nodes=22, max_degree=12, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(b.adj.shape, generator=g, dtype=torch.float64)
    adj = (b.adj + 0.3 * (noise + noise.transpose(1, 2))) * (b.mask[:, None] * b.mask[:, :, None])
    x = b.x + 0.3 * torch.randn(b.x.shape, generator=g, dtype=torch.float64) * b.mask[..., None]
    return x, adj, b.mask


def _nets():
    torch.manual_seed(0)
    node = NodeScoreNet(13, hidden=16, depth=2, time_embedding=8).double()
    adjn = AdjScoreNet(13, hidden=16, powers=3, layers=2, heads=2, time_embedding=8).double()
    return node, adjn


def test_networks_equivariant_symmetric_masked():
    x, adj, mask = _batch()
    node, adjn = _nets()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    sx, sa = node(x, adj, mask, t), adjn(x, adj, mask, t)
    assert sx.shape == x.shape and sa.shape == adj.shape
    assert torch.allclose(sa, sa.transpose(1, 2)) and not sa.diagonal(dim1=1, dim2=2).any()
    pad = mask == 0
    assert not sx[pad].any() and not sa[pad].any() and not sa.transpose(1, 2)[pad].any()
    # permutation equivariance (the permutation mixes real and padded slots: the mask moves along)
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(1))
    px, padj, pmask = x[:, perm], adj[:, perm][:, :, perm], mask[:, perm]
    assert torch.allclose(node(px, padj, pmask, t), sx[:, perm], atol=1e-12)
    assert torch.allclose(adjn(px, padj, pmask, t), sa[:, perm][:, :, perm], atol=1e-12)
    # padded slots hold arbitrary values: they are ignored
    junk_x, junk_adj = x.clone(), adj.clone()
    junk_x[pad] = 5.0
    junk_adj[:, -1, :] = junk_adj[:, :, -1] = 3.0
    assert torch.allclose(node(junk_x, junk_adj, mask, t), sx, atol=1e-12)
    assert torch.allclose(adjn(junk_x, junk_adj, mask, t), sa, atol=1e-12)
    # the time matters
    assert not torch.allclose(adjn(x, adj, mask, t + 0.3), sa)


def test_graph_score_model_and_errors():
    x, adj, mask = _batch(1)
    node, adjn = _nets()
    model = GraphScoreModel(node, adjn)
    out = model(torch.full((3,), 0.5, dtype=torch.float64), {"x": x, "adj": adj, "mask": mask})
    assert set(out) == {"x", "adj"} and out["x"].shape == x.shape and out["adj"].shape == adj.shape
    tree_mask = {"x": mask[..., None], "adj": mask[:, None] * mask[:, :, None]}
    out2 = model(0.5 * torch.ones(3, dtype=torch.float64), {"x": x, "adj": adj}, tree_mask)
    assert torch.equal(out2["adj"], out["adj"]) and torch.equal(out2["x"], out["x"])
    loss = out["x"].square().mean() + out["adj"].square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="x must have shape"):
        node(x[..., :5], adj, mask)
    with pytest.raises(ValueError, match="dict with keys"):
        model(0.5, (x, adj))
    with pytest.raises(ValueError, match="divisible"):
        AdjScoreNet(3, hidden=10, heads=4)
