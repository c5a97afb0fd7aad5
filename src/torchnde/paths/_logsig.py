r"""Signatures and log-signatures of piecewise-linear paths, to any depth, in torch.

The signature of a path :math:`X: [a, b] \to \mathbb R^C` is the sequence of its iterated
integrals :math:`S^{(k)}_{i_1 \dots i_k} = \int_{a < s_1 < \dots < s_k < b} dX^{i_1}_{s_1} \cdots
dX^{i_k}_{s_k}`; its logarithm in the truncated tensor algebra, the *log-signature*, lies in the
free Lie algebra and is described by fewer numbers. The log-ODE method (Lyons 2014; Morrill,
Salvi, Kidger, Foster & Lyons 2021, *Neural Rough Differential Equations for Long Time Series*)
replaces a long time series by the log-signatures of its windows.

How it is computed here:

* a linear segment with increment :math:`d` has signature :math:`\exp(d) = (1, d, d^{\otimes 2}/2,
  d^{\otimes 3}/6)`; the signature of the whole path is the product of its segments' (Chen's
  identity), accumulated for all segments at once with prefix sums;
* the logarithm :math:`\log(1 + X) = X - X^2/2 + X^3/3 - \dots` truncated at the depth;
* the log-signature is returned as the coefficients of the *Lyndon words* of length at most the
  depth in that logarithm, ordered by length, then lexicographically (the ``"words"`` layout of
  signatory's ``logsignature``, which torchcde's ``logsig_windows`` returns; its channel count is
  Witt's formula, :func:`logsignature_channels`). Depth 1: the increments; depth 2: the
  increments and the Lévy areas :math:`A_{ij} = \tfrac12 \int (X^i - X^i_a) dX^j - (X^j - X^j_a)
  dX^i`, :math:`i < j`.

Any depth works; the cost grows like :math:`C^N` (channels to the depth) per segment.
"""

from __future__ import annotations

import functools
import itertools

import torch

__all__ = ["signature", "logsignature", "logsignature_channels", "lyndon_words"]


def _check_depth(depth) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    return depth


def _is_lyndon(w: tuple) -> bool:
    """``w`` is strictly smaller than each of its proper rotations."""
    return all(w < w[i:] + w[:i] for i in range(1, len(w)))


@functools.cache
def lyndon_words(channels: int, depth: int) -> tuple:
    """The Lyndon words over ``0, ..., channels - 1`` of length ``1..depth``, ordered by length,
    then lexicographically: the layout of :func:`logsignature`."""
    _check_depth(depth)
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    return tuple(w for k in range(1, depth + 1) for w in itertools.product(range(channels), repeat=k) if _is_lyndon(w))


def logsignature_channels(channels: int, depth: int) -> int:
    """The number of coefficients of a log-signature (Witt's formula; as signatory's
    ``logsignature_channels``): 2 channels, depth 3 give 5."""
    return len(lyndon_words(channels, depth))


def _check_path(x):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        got = f"dtype {x.dtype}, shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor of shape (..., length, channels), got {got}")
    if x.shape[-2] < 1:
        raise ValueError("x must hold at least one point (dimension -2)")


def _tensor(a, b):
    """``a ⊗ b`` of two levels stored flat (``(..., C^j)`` and ``(..., C^m)``): ``(..., C^(j+m))``,
    ``a``'s index the major one (row-major, as ``reshape`` of a ``(C,) * (j + m)`` tensor)."""
    return (a.unsqueeze(-1) * b.unsqueeze(-2)).flatten(-2)


def _signature_flat(x, depth):
    """Levels ``1..depth`` of the signature, each flat ``(..., C^k)``."""
    d = x[..., 1:, :] - x[..., :-1, :]  # (..., L - 1, C): segment increments
    if d.shape[-2] == 0:
        C = x.shape[-1]
        return [x.new_zeros(*x.shape[:-2], C**k) for k in range(1, depth + 1)]
    # each segment's signature exp(d): levels d^(k)/k!
    seg_exp = [d]
    for k in range(2, depth + 1):
        seg_exp.append(_tensor(seg_exp[-1], d) / k)
    # Chen's identity for all segments at once: the signature up to segment i times exp(d_i);
    # "pre" holds the signatures before each segment (exclusive prefix sums of the "seg" terms)
    pre, levels = [], []
    for k in range(1, depth + 1):
        seg = seg_exp[k - 1]
        for j in range(1, k):
            seg = seg + _tensor(pre[j - 1], seg_exp[k - j - 1])
        pre.append(seg.cumsum(-2) - seg)
        levels.append(seg.sum(-2))
    return levels


def signature(x: torch.Tensor, depth: int) -> list:
    r"""The signature of the piecewise-linear path through the points ``x`` (``(..., L, C)``),
    to ``depth``: a list ``[S1, S2, ...]`` of tensors of shapes ``(..., C)``, ``(..., C, C)``,
    ``(..., C, C, C)``, ... (the level-0 term, 1, omitted). One point (``L = 1``): zeros."""
    _check_path(x)
    _check_depth(depth)
    C = x.shape[-1]
    return [s.view(*s.shape[:-1], *([C] * k)) for k, s in enumerate(_signature_flat(x, depth), start=1)]


def _tensor_log(levels: list) -> list:
    """``log(1 + X) = sum_n (-1)^(n+1) X^n / n``, truncated at ``len(levels)``, for ``X`` given by
    its flat levels ``1..N``."""
    depth = len(levels)
    out = list(levels)
    power = list(levels)  # X^n by level (None below level n)
    for n in range(2, depth + 1):
        nxt = [None] * depth
        for k in range(n, depth + 1):  # level k of X^n = sum_j (X^(n-1))_j ⊗ X_(k-j)
            terms = [_tensor(power[j - 1], levels[k - j - 1]) for j in range(n - 1, k) if power[j - 1] is not None]
            nxt[k - 1] = sum(terms[1:], terms[0])
        power = nxt
        sign = 1.0 if n % 2 else -1.0
        for k in range(n, depth + 1):
            out[k - 1] = out[k - 1] + (sign / n) * power[k - 1]
    return out


@functools.cache
def _word_index(channels: int, depth: int) -> tuple:
    """For each level ``k``, the flat indices (into ``C^k``) of the Lyndon words of length ``k``."""
    words = lyndon_words(channels, depth)
    out = []
    for k in range(1, depth + 1):
        out.append(tuple(sum(i * channels ** (k - 1 - p) for p, i in enumerate(w)) for w in words if len(w) == k))
    return tuple(out)


def logsignature(x: torch.Tensor, depth: int) -> torch.Tensor:
    r"""The log-signature of the piecewise-linear path through ``x`` (``(..., L, C)``):
    ``(..., logsignature_channels(C, depth))``, the coefficients of the Lyndon words (see the
    module docstring). Differentiable; follows ``x``'s dtype and device.

    Example:
        >>> import torch
        >>> from torchnde.paths._logsig import logsignature
        >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])   # right, then up
        >>> logsignature(x, 2)                                        # increments, Lévy area
        tensor([1.0000, 1.0000, 0.5000])
    """
    _check_path(x)
    _check_depth(depth)
    levels = _tensor_log(_signature_flat(x, depth))
    index = _word_index(x.shape[-1], depth)
    parts = [level[..., list(idx)] for level, idx in zip(levels, index) if idx]
    return torch.cat(parts, -1)
