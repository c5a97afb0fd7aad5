"""Paths that drive control terms: Brownian motion and interpolations of data, and signatures of paths."""

from ._base import AbstractBrownianPath, AbstractPath, BrownianIncrement
from ._grid import BrownianGrid
from ._interp import CubicSpline, HermiteCubic, LinearInterpolation, RectilinearInterpolation, pad_sequences
from ._logsig import logsignature, logsignature_channels, lyndon_words, signature
from ._tree import VirtualBrownianTree

__all__ = [
    "AbstractPath",
    "AbstractBrownianPath",
    "BrownianIncrement",
    "VirtualBrownianTree",
    "BrownianGrid",
    "LinearInterpolation",
    "RectilinearInterpolation",
    "HermiteCubic",
    "CubicSpline",
    "pad_sequences",
    "signature",
    "logsignature",
    "logsignature_channels",
    "lyndon_words",
]
