"""How gradients flow through a solve."""

from ._base import AbstractAdjoint, DirectAdjoint

__all__ = ["AbstractAdjoint", "DirectAdjoint"]
