r"""Signatures and log-signatures of piecewise-linear paths, to depth 3, in torch.

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
* the logarithm :math:`\log(1 + X) = X - X^2/2 + X^3/3` truncated at the depth;
* the log-signature is returned as the coefficients of the *Lyndon words* of length at most the
  depth in that logarithm, ordered by length, then lexicographically (the ``"words"`` layout of
  signatory's ``logsignature``, which torchcde's ``logsig_windows`` returns; its channel count is
  Witt's formula, :func:`logsignature_channels`). Depth 1: the increments; depth 2: the
  increments and the Lévy areas :math:`A_{ij} = \tfrac12 \int (X^i - X^i_a) dX^j - (X^j - X^j_a)
  dX^i`, :math:`i < j`.

Depths 1, 2 and 3 are supported; deeper truncations raise ``NotImplementedError``.
"""

from __future__ import annotations

import functools
import itertools

import torch

__all__ = ["signature", "logsignature", "logsignature_channels", "lyndon_words"]

MAX_DEPTH = 3


def _check_depth(depth) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    if depth > MAX_DEPTH:
        raise NotImplementedError(
            f"log-signatures of depth {depth} are not implemented in torchnde (depths 1 to {MAX_DEPTH} are); "
            "use depth <= 3, or signatory/iisignature for deeper truncations"
        )
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


def _outer(a, b):
    """``a ⊗ b`` for ``a`` of shape ``(..., C, ..., C)`` (``m`` trailing dimensions) and ``b`` of
    shape ``(..., D)`` with the same leading dimensions: ``(..., C, ..., C, D)``."""
    return a.unsqueeze(-1) * b.view(*b.shape[:-1], *([1] * (a.dim() - b.dim() + 1)), b.shape[-1])


def signature(x: torch.Tensor, depth: int) -> list:
    r"""The signature of the piecewise-linear path through the points ``x`` (``(..., L, C)``),
    to ``depth``: a list ``[S1, S2, ...]`` of tensors of shapes ``(..., C)``, ``(..., C, C)``,
    ``(..., C, C, C)`` (the level-0 term, 1, omitted). One point (``L = 1``): zeros."""
    _check_path(x)
    _check_depth(depth)
    d = x[..., 1:, :] - x[..., :-1, :]  # (..., L - 1, C): segment increments
    if d.shape[-2] == 0:
        C = x.shape[-1]
        return [x.new_zeros(*x.shape[:-2], *([C] * k)) for k in range(1, depth + 1)]
    # prefix signatures before each segment (exclusive cumulative sums) and the segments' terms
    seg1 = d
    pre1 = seg1.cumsum(-2) - seg1
    levels = [seg1.sum(-2)]
    if depth >= 2:
        dd = _outer(d, d)  # (..., L - 1, C, C)
        seg2 = _outer(pre1, d) + dd / 2
        levels.append(seg2.sum(-3))
    if depth >= 3:
        pre2 = seg2.cumsum(-3) - seg2
        seg3 = _outer(pre2, d) + _outer(pre1, dd.flatten(-2)).view(*dd.shape, -1) / 2 + _outer(dd, d) / 6
        levels.append(seg3.sum(-4))
    return levels


def _tensor_log(levels: list) -> list:
    """``log(1 + X)`` truncated at ``len(levels)``, for ``X`` given by its levels ``1..N``."""
    depth = len(levels)
    x1 = levels[0]
    out = [x1]
    if depth >= 2:
        x11 = _outer(x1, x1)
        out.append(levels[1] - x11 / 2)
    if depth >= 3:
        x2 = levels[1]
        x1x2 = x1.view(*x1.shape, 1, 1) * x2.unsqueeze(-3)  # X1 ⊗ X2
        x2x1 = _outer(x2, x1)  # X2 ⊗ X1
        x111 = _outer(x11, x1)
        out.append(levels[2] - (x1x2 + x2x1) / 2 + x111 / 3)
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
    levels = _tensor_log(signature(x, depth))
    C = x.shape[-1]
    index = _word_index(C, depth)
    parts = []
    for k, (level, idx) in enumerate(zip(levels, index), start=1):
        if idx:
            flat = level.flatten(-k)
            parts.append(flat[..., list(idx)])
    return torch.cat(parts, -1)
