r"""Permutation-equivariant score networks for graphs, in the spirit of GDSS (Jo, Lee & Hwang 2022).

GDSS models a graph as node features :math:`X \in \mathbb R^{N\times F}` and a (noisy, continuous)
adjacency :math:`A \in \mathbb R^{N\times N}` diffused by a *system* of SDEs; the reverse system
needs the two partial scores :math:`\nabla_X \log p_t(X, A)` and :math:`\nabla_A \log p_t(X, A)`,
each learned by its own network that sees both components. Written from the paper's description:

* :class:`NodeScoreNet` (the score for ``X``): a stack of graph convolutions
  :math:`H_{l+1} = \tanh(\hat A H_l W_l + b_l)` (Kipf & Welling 2017, with the symmetric
  normalisation :math:`\hat A = D^{-1/2}(A + I)D^{-1/2}`, degrees taken in absolute value since a
  noisy :math:`A` has negative entries), :math:`H_0 = X`, and an MLP on the concatenation
  :math:`[H_0, \dots, H_L]` of every layer's output.
* :class:`AdjScoreNet` (the score for ``A``): the adjacency powers
  :math:`A, A^2, \dots, A^K` (each divided by :math:`n^{k-1}`, ``n`` the graph's node count, so that
  a noisy :math:`A` does not blow up) are ``K`` channels of higher-order connectivity. Each layer
  runs, per channel, a graph multi-head attention whose queries, keys and values are graph
  convolutions of the node features over that channel; the symmetrised, ``tanh``-squashed
  attention matrices become the next layer's ``K`` adjacency channels, and the attention-weighted
  values (averaged over the channels) the next node features. An MLP on the concatenated channels
  of every layer and the product of the final node features, at each node pair, gives the score,
  symmetrised.

Both are permutation-equivariant (only matrix products with :math:`A`, node-wise maps and
pair-wise maps), take an optional node ``mask`` (``(B, N)``, 1 for real nodes; padded nodes get
zero features, zero adjacency rows and zero outputs) and an optional time ``t`` (``(B,)`` or a
scalar), embedded by sinusoidal features and added to every layer's node features (GDSS's networks
take no time and rely on the output being divided by the noise scale; here both are possible with
``time_embedding=0``). Outputs of :class:`AdjScoreNet` are symmetric with a zero diagonal.

:class:`GraphScoreModel` pairs the two as ``model(t, {"x": X, "adj": A}) -> {"x": ..., "adj": ...}``,
the tree-state convention of the generic multi-component diffusion layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["NodeScoreNet", "AdjScoreNet", "GraphScoreModel", "mask_adjacency", "gcn_normalise"]


def _check(x: torch.Tensor, adj: torch.Tensor, mask: torch.Tensor | None, features: int) -> torch.Tensor:
    if adj.dim() != 3 or adj.shape[-1] != adj.shape[-2]:
        raise ValueError(f"adj must have shape (B, N, N); got {tuple(adj.shape)}")
    B, N = adj.shape[:2]
    if x.dim() != 3 or tuple(x.shape[:2]) != (B, N) or x.shape[-1] != features:
        raise ValueError(f"x must have shape (B, N, F) = {(B, N, features)}; got {tuple(x.shape)}")
    if mask is None:
        return adj.new_ones(B, N)
    if tuple(mask.shape) != (B, N):
        raise ValueError(f"mask must have shape (B, N) = {(B, N)}; got {tuple(mask.shape)}")
    return mask.to(adj.dtype)


def mask_adjacency(adj: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the rows and columns of padded nodes and the diagonal of a ``(B, [K,] N, N)`` adjacency."""
    m = mask[:, None, :] * mask[:, :, None]
    if adj.dim() == 4:
        m = m[:, None]
    eye = torch.eye(adj.shape[-1], dtype=adj.dtype, device=adj.device)
    return adj * m * (1 - eye)


def gcn_normalise(adj: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r""":math:`D^{-1/2}(A + I)D^{-1/2}` on real nodes, with :math:`D = \mathrm{diag}(\sum_j |A + I|_{ij})`."""
    eye = torch.eye(adj.shape[-1], dtype=adj.dtype, device=adj.device)
    m = mask if adj.dim() == 3 else mask[:, None]
    a = adj + eye * m[..., None]
    d = a.abs().sum(-1).clamp_min(1.0).rsqrt()
    return d[..., :, None] * a * d[..., None, :]


class _TimeEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t, batch: int, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=like.dtype, device=like.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"t must be a scalar or have shape ({batch},); got {tuple(t.shape)}")
        half = self.dim // 2
        freq = torch.exp(torch.linspace(0.0, math.log(1000.0), half, dtype=like.dtype, device=like.device))
        ang = t[:, None] * freq[None]
        emb = torch.cat([torch.sin(ang), torch.cos(ang)], -1)
        if emb.shape[-1] < self.dim:
            emb = torch.cat([emb, t[:, None]], -1)
        return self.mlp(emb)


class NodeScoreNet(nn.Module):
    """GCN-based score network for the node features (see the module docstring).

    Args:
        features: ``F``, the node-feature dimension (input and output).
        hidden: width of the GCN layers.
        depth: number of GCN layers ``L``.
        time_embedding: width of the time embedding (``0``: no time input).
    """

    def __init__(self, features: int, hidden: int = 32, depth: int = 3, time_embedding: int = 32):
        super().__init__()
        if features < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"features, hidden and depth must be positive; got {features}, {hidden}, {depth}")
        self.features = features
        self.layers = nn.ModuleList(nn.Linear(features if i == 0 else hidden, hidden) for i in range(depth))
        self.time = _TimeEmbedding(time_embedding) if time_embedding else None
        self.time_proj = (
            nn.ModuleList(nn.Linear(time_embedding, hidden) for _ in range(depth)) if time_embedding else None
        )
        cat = features + depth * hidden
        self.out = nn.Sequential(nn.Linear(cat, 2 * hidden), nn.ELU(), nn.Linear(2 * hidden, features))

    def forward(self, x: torch.Tensor, adj: torch.Tensor, mask: torch.Tensor | None = None, t=None) -> torch.Tensor:
        """Score for ``x`` ``(B, N, F)`` given ``adj`` ``(B, N, N)``; zero on padded nodes."""
        mask = _check(x, adj, mask, self.features)
        m = mask[..., None]
        a = gcn_normalise(mask_adjacency(adj, mask), mask)
        temb = None
        if self.time is not None:
            temb = self.time(0.0 if t is None else t, adj.shape[0], adj)
        h = x * m
        hs = [h]
        for i, lin in enumerate(self.layers):
            z = a @ lin(h)
            if temb is not None:
                z = z + self.time_proj[i](temb)[:, None, :]
            h = torch.tanh(z) * m
            hs.append(h)
        return self.out(torch.cat(hs, -1)) * m


class AdjScoreNet(nn.Module):
    """Attention over adjacency powers: the score network for the adjacency (see the module docstring).

    Args:
        features: ``F``, the node-feature dimension.
        hidden: width of the node features inside the network.
        powers: ``K``, the number of adjacency powers (channels).
        layers: number of attention layers.
        heads: attention heads per channel (``hidden`` must be divisible by it).
        time_embedding: width of the time embedding (``0``: no time input).
    """

    def __init__(
        self,
        features: int,
        hidden: int = 32,
        powers: int = 3,
        layers: int = 3,
        heads: int = 4,
        time_embedding: int = 32,
    ):
        super().__init__()
        if min(features, hidden, powers, layers, heads) < 1:
            raise ValueError("features, hidden, powers, layers and heads must be positive")
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.features, self.hidden, self.powers, self.heads = features, hidden, powers, heads
        self.embed = nn.Linear(features, hidden)
        self.qkv = nn.ModuleList(nn.Linear(hidden, 3 * hidden) for _ in range(layers))
        self.node_out = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.time = _TimeEmbedding(time_embedding) if time_embedding else None
        self.time_proj = (
            nn.ModuleList(nn.Linear(time_embedding, hidden) for _ in range(layers)) if time_embedding else None
        )
        self.time_edge = nn.Linear(time_embedding, 2 * hidden) if time_embedding else None
        channels = powers * (layers + 1)
        self.edge_in = nn.Linear(channels, 2 * hidden)
        self.edge_nodes = nn.Linear(hidden, 2 * hidden, bias=False)
        self.edge_out = nn.Sequential(nn.ELU(), nn.Linear(2 * hidden, hidden), nn.ELU(), nn.Linear(hidden, 1))

    def _powers(self, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = mask.sum(-1).clamp_min(1.0)[:, None, None]
        out, p = [a], a
        for _ in range(self.powers - 1):
            p = (p @ a) / n
            out.append(p)
        return mask_adjacency(torch.stack(out, 1), mask)  # (B, K, N, N)

    def forward(self, x: torch.Tensor, adj: torch.Tensor, mask: torch.Tensor | None = None, t=None) -> torch.Tensor:
        """Score for ``adj`` ``(B, N, N)`` given ``x``: symmetric, zero diagonal, zero on padded nodes."""
        mask = _check(x, adj, mask, self.features)
        B, N = adj.shape[:2]
        m = mask[..., None]
        a = mask_adjacency(adj, mask)
        chans = self._powers(a, mask)
        collected = [chans]
        temb = None
        if self.time is not None:
            temb = self.time(0.0 if t is None else t, B, adj)
        h = torch.tanh(self.embed(x * m)) * m
        dh = self.hidden // self.heads
        for i, (qkv, lin) in enumerate(zip(self.qkv, self.node_out)):
            conv = gcn_normalise(chans, mask) @ h[:, None]  # (B, K, N, hidden): a GCN per channel
            q, k, v = qkv(conv).split(self.hidden, -1)
            q = q.reshape(B, self.powers, N, self.heads, dh)
            k = k.reshape(B, self.powers, N, self.heads, dh)
            s = torch.einsum("bcihd,bcjhd->bchij", q, k) / math.sqrt(dh)
            s = torch.tanh(0.5 * (s + s.transpose(-1, -2))).mean(2)  # (B, K, N, N), symmetric
            chans = mask_adjacency(s, mask)
            collected.append(chans)
            z = lin((chans @ v).mean(1))
            if temb is not None:
                z = z + self.time_proj[i](temb)[:, None, :]
            h = torch.tanh(z) * m
        e = self.edge_in(torch.cat(collected, 1).permute(0, 2, 3, 1))  # (B, N, N, 2 hidden)
        e = e + self.edge_nodes(h[:, :, None, :] * h[:, None, :, :])  # the final node features, pairwise
        if temb is not None:
            e = e + self.time_edge(temb)[:, None, None, :]
        out = self.edge_out(e).squeeze(-1)
        out = 0.5 * (out + out.transpose(-1, -2))
        return mask_adjacency(out, mask)


class GraphScoreModel(nn.Module):
    """The pair of partial-score networks as one model ``model(t, {"x": X, "adj": A}) -> {"x": s_X, "adj": s_A}``.

    The node mask is the ``mask`` argument — a ``(B, N)`` tensor, or a tree of per-leaf masks as
    :mod:`torchnde.generative.multi` accepts (its ``"x"`` leaf, ``(B, N, 1)`` or ``(B, N, F)``, gives
    the node mask) — or, when it is omitted, ``state["mask"]`` if present. It is called as
    ``model(t, state, mask)`` by the multi-component samplers and losses.
    """

    def __init__(self, node_net: NodeScoreNet, adj_net: AdjScoreNet):
        super().__init__()
        self.node_net, self.adj_net = node_net, adj_net

    def forward(self, t, state: dict, mask: torch.Tensor | None = None) -> dict:
        if not isinstance(state, dict) or "x" not in state or "adj" not in state:
            raise ValueError(f"state must be a dict with keys 'x' and 'adj'; got {type(state).__name__}")
        if mask is None:
            mask = state.get("mask")
        if isinstance(mask, dict):
            leaf = mask.get("x")
            mask = None if leaf is None else (leaf[..., 0] if leaf.dim() == 3 else leaf)
        x, adj = state["x"], state["adj"]
        return {"x": self.node_net(x, adj, mask, t), "adj": self.adj_net(x, adj, mask, t)}
