"""Brownian motion as a path: a virtual Brownian tree and a fixed-grid Brownian path.

This module re-exports the two paths and the helpers the tests use; the code lives by concept in

* :mod:`._brownian_common`: shape trees and their flat layout, argument checks, the common front
  end (:class:`_PathBase`);
* :mod:`._levy`: Lévy-area statistics, the Gaussian algebra of Brownian intervals;
* :mod:`._tree`: :class:`VirtualBrownianTree` (lattice, speculative blocks, answer cache);
* :mod:`._descent`: the tree's vectorised descent over a batch of intervals;
* :mod:`._chains`: the tree's single-interval kept chains (small shapes);
* :mod:`._grid`: :class:`BrownianGrid`;
* :mod:`._rng`: the counter-based generator both draw from.
"""

from __future__ import annotations

from ._brownian_common import _Layout, _PathBase
from ._descent import _Work
from ._grid import BrownianGrid
from ._levy import _levy_rows, _split_many, _to_levy
from ._tree import VirtualBrownianTree

__all__ = ["VirtualBrownianTree", "BrownianGrid"]

# private names kept importable from here (tests and older imports)
_PRIVATE = (_Layout, _PathBase, _Work, _levy_rows, _split_many, _to_levy)
