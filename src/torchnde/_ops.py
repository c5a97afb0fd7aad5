"""Arithmetic on times and step sizes, shared by both batch modes.

Controllers and the loop are written once against this small namespace: with one step size for
the whole state (:class:`ScalarOps`) times are Python floats and cost nothing to update; in
per-sample mode (:class:`BatchOps`) they are ``(batch,)`` tensors.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ScalarOps", "BatchOps"]


class ScalarOps:
    batched = False

    @staticmethod
    def full(x):
        return float(x)

    @staticmethod
    def true():
        return True

    @staticmethod
    def false():
        return False

    @staticmethod
    def minimum(a, b):
        return a if a <= b else b

    @staticmethod
    def maximum(a, b):
        return a if a >= b else b

    @staticmethod
    def where(c, a, b):
        return a if c else b

    @staticmethod
    def clamp(x, lo, hi):
        return lo if x < lo else (hi if x > hi else x)

    @staticmethod
    def to_scalar(x: torch.Tensor):
        return x.item()

    @staticmethod
    def isfinite(x):
        return math.isfinite(x)

    @staticmethod
    def and_(a, b):
        return a and b

    @staticmethod
    def or_(a, b):
        return a or b

    @staticmethod
    def not_(a):
        return not a

    @staticmethod
    def any(a) -> bool:
        return bool(a)

    @staticmethod
    def nan_to(x, value):
        return value if x != x else x


class BatchOps:
    batched = True

    def __init__(self, batch_size: int, dtype: torch.dtype, device: torch.device):
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device

    def full(self, x):
        if isinstance(x, torch.Tensor):
            return x.to(self.dtype).expand(self.batch_size).clone()
        return torch.full((self.batch_size,), float(x), dtype=self.dtype, device=self.device)

    def true(self):
        return torch.ones(self.batch_size, dtype=torch.bool, device=self.device)

    def false(self):
        return torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)

    @staticmethod
    def minimum(a, b):
        return torch.minimum(a, b) if isinstance(b, torch.Tensor) else torch.clamp(a, max=b)

    @staticmethod
    def maximum(a, b):
        return torch.maximum(a, b) if isinstance(b, torch.Tensor) else torch.clamp(a, min=b)

    @staticmethod
    def where(c, a, b):
        return torch.where(c, a, b)

    @staticmethod
    def clamp(x, lo, hi):
        if isinstance(hi, torch.Tensor):
            return torch.clamp(x, min=lo).clamp_(max=hi)
        return torch.clamp(x, lo, hi)

    def to_scalar(self, x: torch.Tensor):
        return x.to(self.dtype)

    @staticmethod
    def isfinite(x):
        return torch.isfinite(x)

    @staticmethod
    def and_(a, b):
        return a & b

    @staticmethod
    def or_(a, b):
        return a | b

    @staticmethod
    def not_(a):
        return ~a

    @staticmethod
    def any(a) -> bool:
        return bool(a.any())

    @staticmethod
    def nan_to(x, value):
        return torch.nan_to_num(x, nan=value)
