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
* :class:`AdjScoreNet` (the score for ``A``), GDSS's ``ScoreNetworkA`` layout: the adjacency
  powers :math:`A, \dots, A^K` (``powers``, GDSS's ``c_init = 2``) are the first layer's channels of
  higher-order connectivity. Each layer runs, per input channel, a graph multi-head attention whose
  queries, keys and values are graph convolutions of the node features over that channel; the
  symmetrised, ``tanh``-squashed attention maps and the layer's input channels go through a
  pair-wise MLP to the next layer's channels (``channels`` between layers, ``final_channels`` after
  the last: GDSS's ``c_hid = 8`` and ``c_final = 4``), and an MLP of the channels' values gives the
  next node features. The score at each node pair is an MLP of the concatenated channels of every
  layer, symmetrised. (An earlier layout that fed only the attention maps forward and mixed node
  features through them trained far worse: community-small degree MMD 0.16 against 0.011 at the same
  budget; see docs/graphs.md.)

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


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.ELU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class _ChannelAttention(nn.Module):
    """One layer of :class:`AdjScoreNet`: per input channel a graph attention whose queries, keys and
    values are graph convolutions over that channel (all channels in one batched product); new node
    features from the channels' values (not in the last layer, whose node features nothing reads),
    new channels from the attention maps and the old channels."""

    def __init__(self, features: int, hidden: int, heads: int, c_in: int, c_out: int, nodes_out: bool = True):
        super().__init__()
        self.hidden, self.heads = hidden, heads
        bound = 1.0 / math.sqrt(features)
        k = 3 if nodes_out else 2
        self.weight = nn.Parameter(torch.empty(c_in, features, k * hidden).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(c_in, k * hidden))
        width = 2 * max(c_in, c_out)
        self.node = _mlp([c_in * hidden, width, hidden]) if nodes_out else None
        self.edge = _mlp([2 * c_in, width, c_out])

    def forward(self, h: torch.Tensor, chans: torch.Tensor, mask: torch.Tensor):
        B, C, N = chans.shape[:3]
        conv = gcn_normalise(chans, mask) @ torch.einsum("bnf,cfo->bcno", h, self.weight)
        q, k, *v = (conv + self.bias[None, :, None, :]).split(self.hidden, -1)  # (B, C, N, hidden) each
        dh = self.hidden // self.heads
        s = torch.einsum("bcihd,bcjhd->bchij", q.reshape(B, C, N, self.heads, dh), k.reshape(B, C, N, self.heads, dh))
        s = torch.tanh(s / math.sqrt(self.hidden)).mean(2)
        s = 0.5 * (s + s.transpose(-1, -2))  # (B, C, N, N): symmetric attention maps
        if self.node is not None:
            h = torch.tanh(self.node(v[0].permute(0, 2, 1, 3).reshape(B, N, C * self.hidden))) * mask[..., None]
        e = self.edge(torch.cat([s, chans], 1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return h, mask_adjacency(e + e.transpose(-1, -2), mask)


class AdjScoreNet(nn.Module):
    r"""Attention over adjacency channels: the score network for the adjacency (see the module docstring).

    Args:
        features: ``F``, the node-feature dimension.
        hidden: width of the node features and of the attention queries/keys inside the network.
        powers: the adjacency powers :math:`A, \dots, A^K` that form the first layer's channels.
        layers: number of attention layers.
        heads: attention heads per channel (``hidden`` must be divisible by it).
        time_embedding: width of the time embedding (``0``: no time input).
        channels: adjacency channels between layers (GDSS's ``c_hid``).
        final_channels: adjacency channels out of the last layer (GDSS's ``c_final``).
        normalise_powers: divide :math:`A^k` by :math:`n^{k-1}` (``n`` the graph's node count);
            keeps the powers of a large noisy adjacency bounded (GDSS does not).
    """

    def __init__(
        self,
        features: int,
        hidden: int = 32,
        powers: int = 2,
        layers: int = 5,
        heads: int = 4,
        time_embedding: int = 32,
        *,
        channels: int = 8,
        final_channels: int = 4,
        normalise_powers: bool = False,
    ):
        super().__init__()
        if min(features, hidden, powers, layers, heads, channels, final_channels) < 1:
            raise ValueError("features, hidden, powers, layers, heads, channels and final_channels must be positive")
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.features, self.hidden, self.powers, self.heads = features, hidden, powers, heads
        self.normalise_powers = bool(normalise_powers)
        ins = [powers] + [channels] * (layers - 1)
        outs = [channels] * (layers - 1) + [final_channels]
        self.layers = nn.ModuleList(
            _ChannelAttention(features if i == 0 else hidden, hidden, heads, ins[i], outs[i], i < layers - 1)
            for i in range(layers)
        )
        width = powers + sum(outs)
        self.time = _TimeEmbedding(time_embedding) if time_embedding else None
        self.time_proj = (
            nn.ModuleList(nn.Linear(time_embedding, features if i == 0 else hidden) for i in range(layers))
            if time_embedding
            else None
        )
        self.time_edge = nn.Linear(time_embedding, width) if time_embedding else None
        self.final = _mlp([width, 2 * width, 2 * width, 1])

    def _powers(self, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = mask.sum(-1).clamp_min(1.0)[:, None, None]
        out, p = [a], a
        for _ in range(self.powers - 1):
            p = p @ a
            if self.normalise_powers:
                p = p / n
            out.append(p)
        return mask_adjacency(torch.stack(out, 1), mask)  # (B, K, N, N)

    def forward(self, x: torch.Tensor, adj: torch.Tensor, mask: torch.Tensor | None = None, t=None) -> torch.Tensor:
        """Score for ``adj`` ``(B, N, N)`` given ``x``: symmetric, zero diagonal, zero on padded nodes."""
        mask = _check(x, adj, mask, self.features)
        m = mask[..., None]
        chans = self._powers(mask_adjacency(adj, mask), mask)
        collected = [chans]
        temb = None if self.time is None else self.time(0.0 if t is None else t, adj.shape[0], adj)
        h = x * m
        for i, layer in enumerate(self.layers):
            if temb is not None:
                h = h + self.time_proj[i](temb)[:, None, :] * m
            h, chans = layer(h, chans, mask)
            collected.append(chans)
        e = torch.cat(collected, 1).permute(0, 2, 3, 1)  # (B, N, N, every layer's channels)
        if temb is not None:
            e = e + self.time_edge(temb)[:, None, None, :]
        out = self.final(e).squeeze(-1)
        return mask_adjacency(0.5 * (out + out.transpose(-1, -2)), mask)


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
