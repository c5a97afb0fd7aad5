"""Paths: things with increments over time, which drive control terms.

A path ``X`` is queried by ``evaluate(s, t)`` for its increment ``X(t) - X(s)`` (``s > t`` is
allowed and gives the negated increment), or ``evaluate(s)`` for its value ``X(s)`` (Brownian
motion starts at zero at its ``t0``). Times are Python floats or 0-d tensors; in per-sample mode
``(batch,)`` tensors, one time per sample, and the leading dimension of every returned tensor is
the batch.

Two kinds:

* *smooth* paths (interpolations of data) also have ``derivative(t)``; a control term driven by
  one is solved as the ODE ``dy/dt = g(t, y) dX/dt`` by any ODE solver at full order.
* *rough* paths (Brownian motion) have no derivative; a control term driven by one is an SDE and
  needs an SDE solver. Brownian paths also give Lévy areas through ``increment(s, t)``.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

__all__ = ["AbstractPath", "AbstractBrownianPath", "BrownianIncrement"]


class AbstractPath:
    """A path with increments ``evaluate(s, t) = X(t) - X(s)``."""

    #: True if the path has a derivative (interpolated data), False for Brownian motion.
    smooth: ClassVar[bool] = True

    #: the interval the path is defined on (Python floats)
    t0: float
    t1: float

    def evaluate(self, s, t=None) -> Any:  # pragma: no cover - interface
        """``X(t) - X(s)``, or ``X(s)`` when ``t`` is None."""
        raise NotImplementedError

    def derivative(self, t, left: bool = False) -> Any:  # pragma: no cover - interface
        """``dX/dt`` at ``t`` (smooth paths only); at a knot of a piecewise path the derivative of
        the piece to the right, or with ``left=True`` the one to the left."""
        raise NotImplementedError


class BrownianIncrement(NamedTuple):
    """What a Brownian path gives over ``[s, t]`` with ``h = t - s``.

    ``W``: the increment ``W(t) - W(s)``. ``H``: the space-time Lévy area
    ``(1/h) int_s^t (W(u) - W(s) - (u - s)/h W) du`` (or None if the path was built without it);
    ``K``: the space-time-time Lévy area (or None). Each has the path's shape (tree).
    """

    dt: Any
    W: Any
    H: Any = None
    K: Any = None


class AbstractBrownianPath(AbstractPath):
    """Brownian motion as a path: ``evaluate`` gives increments; ``increment`` gives increments
    together with the Lévy areas the path was built with (``levy_area``)."""

    smooth: ClassVar[bool] = False
    levy_area: str | None = None  # None, "space-time" or "space-time-time"
    shape: Any  # torch.Size or a tree of them

    def increment(self, s, t) -> BrownianIncrement:  # pragma: no cover - interface
        raise NotImplementedError

    def increments(self, s, t) -> BrownianIncrement:
        """Many intervals at once: ``increment(s[k], t[k])`` for ``k < N``, stacked.

        Args:
            s, t: 1-d sequences of ``N`` times each (lists of floats, numpy arrays or 1-d
                tensors); ``s[k] > t[k]`` (a reversed interval) is allowed, as in
                :meth:`increment`.

        Returns:
            a :class:`BrownianIncrement` whose ``W`` (and ``H``, ``K`` where the path has them)
            have a leading dimension ``N`` before the path's shape (on every leaf of a tree
            shape), and ``dt`` the float64 CPU tensor ``t - s`` of shape ``(N,)``. Row ``k`` is
            ``increment(float(s[k]), float(t[k]))`` bit for bit, and asking changes no value of
            later queries. The times are shared by all samples (with per-sample seeds too; for
            one interval per sample, pass ``(B,)`` times to :meth:`increment`).

        This default asks :meth:`increment` once per interval; :class:`VirtualBrownianTree`
        (one vectorised descent) and :class:`BrownianGrid` (indexing its cells) override it.
        """
        ss, tt = interval_times(s, t)
        rows = [self.increment(a, b) for a, b in zip(ss.tolist(), tt.tolist())]
        if not rows:  # N = 0: the shapes from one (empty) query
            one = self.increment(self.t0, self.t0)
            stacked = [None if v is None else tree_map(lambda x: x.new_empty((0, *x.shape)), v) for v in one[1:]]
        else:
            stacked = [None if rows[0][i] is None else stack_trees([r[i] for r in rows]) for i in (1, 2, 3)]
        return BrownianIncrement(interval_dt(ss, tt), *stacked)

    def derivative(self, t, left: bool = False):
        raise TypeError("Brownian motion has no derivative; solve a ControlTerm on it with an SDE solver")


def interval_times(s, t) -> tuple[np.ndarray, np.ndarray]:
    """The ``(s, t)`` of :meth:`AbstractBrownianPath.increments` as two float64 arrays (one host
    transfer for a tensor); ValueError unless both are 1-d of the same length."""
    out = []
    for name, x in (("s", s), ("t", t)):
        if isinstance(x, torch.Tensor):
            if x.dim() != 1:
                raise ValueError(f"increments: {name} must be 1-d (N times); got a tensor of shape {tuple(x.shape)}")
            out.append(x.detach().to("cpu", torch.float64).numpy())
            continue
        a = np.array(x, dtype=np.float64)
        if a.ndim != 1:
            raise ValueError(f"increments: {name} must be a 1-d sequence of N times; got shape {a.shape}")
        out.append(a)
    if out[0].shape != out[1].shape:
        raise ValueError(f"increments: s and t must have the same length; got {len(out[0])} and {len(out[1])}")
    return out[0], out[1]


def interval_dt(ss: np.ndarray, tt: np.ndarray) -> torch.Tensor:
    """``t - s`` per interval, a float64 CPU tensor."""
    return torch.from_numpy(tt - ss)


def tree_map(fn, tree):
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return fn(tree)


def stack_trees(trees: list):
    """Trees of the same structure -> one tree whose leaves are the stacked leaves (dim 0)."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: stack_trees([x[k] for x in trees]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(stack_trees([x[i] for x in trees]) for i in range(len(first)))
    return torch.stack(trees)


def unstack_tree(tree, n: int) -> list:
    """A tree whose leaves have a leading dimension ``n`` -> ``n`` trees of their rows (views)."""
    if isinstance(tree, torch.Tensor):
        return list(tree.unbind(0))
    if isinstance(tree, dict):
        cols = {k: unstack_tree(v, n) for k, v in tree.items()}
        return [{k: cols[k][r] for k in tree} for r in range(n)]
    cols = [unstack_tree(v, n) for v in tree]
    return [type(tree)(c[r] for c in cols) for r in range(n)]
