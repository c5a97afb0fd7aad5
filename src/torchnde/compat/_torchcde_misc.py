"""torchcde's ``torchcde.misc`` helpers that user code and torchcde's tests call
(``forward_fill``, ``tridiagonal_solve``, ``cheap_stack``), for
:mod:`torchnde.compat.torchcde` (``torchcde.misc.forward_fill(...)`` after the import change)."""

from __future__ import annotations

import torch

from ..paths._interp import _tridiagonal_solve

__all__ = ["forward_fill", "tridiagonal_solve", "cheap_stack"]


def cheap_stack(tensors, dim):
    """``torch.stack(tensors, dim)``."""
    return torch.stack(list(tensors), dim)


def tridiagonal_solve(b, A_upper, A_diagonal, A_lower):
    """Solve ``A x = b`` along the last dimension for the tridiagonal ``A`` with diagonal
    ``A_diagonal`` (``n``), superdiagonal ``A_upper`` and subdiagonal ``A_lower`` (``n - 1``),
    all broadcasting against each other (Thomas algorithm; no pivoting, so ``A`` should be
    diagonally dominant, as a spline's system is)."""
    zero = torch.zeros_like(A_diagonal[..., :1])
    lower = torch.cat([zero.expand(*A_lower.shape[:-1], 1), A_lower], -1)
    upper = torch.cat([A_upper, zero.expand(*A_upper.shape[:-1], 1)], -1)
    return _tridiagonal_solve(lower, A_diagonal, upper, b)


def forward_fill(x, fill_index=-2):
    """``x`` with each NaN replaced by the last non-NaN value before it along dimension
    ``fill_index``; NaNs before the first value stay NaN (as torchcde)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__}")
    dim = fill_index % x.dim()
    n = x.shape[dim]
    shape = [1] * x.dim()
    shape[dim] = n
    idx = torch.arange(n, device=x.device).view(shape).expand(x.shape)
    last = torch.where(torch.isnan(x), -1, idx).cummax(dim).values
    filled = x.gather(dim, last.clamp(min=0))
    return torch.where(last < 0, torch.full_like(x, float("nan")), filled)
