"""Paths that drive control terms: Brownian motion and interpolations of data."""

from ._base import AbstractBrownianPath, AbstractPath, BrownianIncrement

__all__ = ["AbstractPath", "AbstractBrownianPath", "BrownianIncrement"]
