"""Paths that drive control terms: Brownian motion and interpolations of data."""

from ._base import AbstractBrownianPath, AbstractPath, BrownianIncrement
from ._brownian import BrownianGrid, VirtualBrownianTree

__all__ = ["AbstractPath", "AbstractBrownianPath", "BrownianIncrement", "VirtualBrownianTree", "BrownianGrid"]
