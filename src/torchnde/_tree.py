"""Trees of tensors: flatten a state (tensor, dict, tuple or list of tensors) into one flat tensor.

The loop works on one flat tensor so that every stage combination is a single fused op; the
user's vector field sees the tree it was given. For a single tensor both directions are views.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Flattener", "tree_leaves", "tree_map", "tree_zip"]


def tree_leaves(tree: Any) -> list:
    """Leaves of a tree of dicts / tuples / lists, in a fixed order (dict keys sorted)."""
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree) for leaf in tree_leaves(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [leaf for x in tree for leaf in tree_leaves(x)]
    return [tree]


def tree_map(fn: Callable, tree: Any) -> Any:
    """Apply ``fn`` to every leaf, keeping the structure."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, tree[k]) for k in tree}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple
        return type(tree)(*(tree_map(fn, x) for x in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, x) for x in tree)
    return fn(tree)


def tree_zip(a: Any, b: Any, fn: Callable) -> Any:
    """``fn`` applied leaf by leaf to two trees of the same structure."""
    if isinstance(a, dict):
        return {k: tree_zip(a[k], b[k], fn) for k in a}
    if isinstance(a, (tuple, list)):
        return type(a)(tree_zip(x, y, fn) for x, y in zip(a, b))
    return fn(a, b)


def _structure(tree: Any) -> Any:
    return tree_map(lambda _: None, tree)


def _unflatten_structure(structure: Any, leaves: list) -> Any:
    it = iter(leaves)

    def build(s):
        if isinstance(s, dict):
            built = {k: build(s[k]) for k in sorted(s)}
            return {k: built[k] for k in s}
        if isinstance(s, tuple) and hasattr(s, "_fields"):
            return type(s)(*(build(x) for x in s))
        if isinstance(s, (tuple, list)):
            return type(s)(build(x) for x in s)
        return next(it)

    return build(structure)


def _describe(tree: Any) -> str:
    """A short picture of a tree's structure and shapes, e.g. ``{'a': Tensor(2, 3)}``."""
    if isinstance(tree, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in tree.items()) + "}"
    if isinstance(tree, (tuple, list)):
        inner = ", ".join(_describe(v) for v in tree)
        return (
            f"({inner},)"
            if isinstance(tree, tuple) and len(tree) == 1
            else (f"({inner})" if isinstance(tree, tuple) else f"[{inner}]")
        )
    if isinstance(tree, torch.Tensor):
        return f"Tensor{tuple(tree.shape)}"
    return type(tree).__name__


class Flattener:
    """Maps a tree of tensors to a flat tensor and back.

    With ``batch=False`` the flat tensor has shape ``(N,)``; with ``batch=True`` every leaf keeps
    its leading (batch) dimension and the flat tensor has shape ``(B, N)``.
    """

    def __init__(self, y0: Any, batch: bool, name: str = "y0"):
        leaves = tree_leaves(y0)
        if not leaves:
            raise ValueError(f"{name} is an empty tree; expected a tensor or a tree of tensors")
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"{name} must be a tensor or a dict/tuple/list of tensors; found a leaf of type "
                    f"{type(leaf).__name__} in {_describe(y0)}"
                )
        first = leaves[0]
        for leaf in leaves[1:]:
            if leaf.dtype != first.dtype or leaf.device != first.device:
                raise TypeError(
                    f"every tensor of {name} must share one dtype and device; got "
                    f"{[(str(x.dtype), str(x.device)) for x in leaves]}. Convert them first, e.g. "
                    f"tree_map(lambda x: x.to(torch.float64), {name})."
                )
        if not (first.dtype.is_floating_point or first.dtype.is_complex):
            raise TypeError(f"{name} must have a floating-point or complex dtype, got {first.dtype}")
        self.batch = batch
        self.single = not isinstance(y0, (dict, tuple, list))
        self.structure = None if self.single else _structure(y0)
        self.shapes = [tuple(x.shape) for x in leaves]
        if batch:
            sizes = {x.shape[0] if x.dim() else None for x in leaves}
            if None in sizes or len(sizes) != 1:
                raise ValueError(
                    f"per-sample mode needs every tensor of {name} to have the same leading (batch) "
                    f"dimension; got shapes {self.shapes}"
                )
            self.batch_size = leaves[0].shape[0]
            self.sizes = [math.prod(s[1:]) for s in self.shapes]
        else:
            self.batch_size = None
            self.sizes = [math.prod(s) for s in self.shapes]
        self.dtype = first.dtype
        self.device = first.device
        self.size = sum(self.sizes)
        self.state_shape = (self.batch_size, self.size) if batch else (self.size,)
        self.name = name

    def state_to_tree(self, flat: torch.Tensor) -> Any:
        """:meth:`unflatten` for a state with no extra leading dimensions (the hot path)."""
        return flat.view(self.shapes[0]) if self.single else self.unflatten(flat)

    def tree_to_state(self, tree: Any) -> torch.Tensor:
        """:meth:`flatten`, with a fast path for a single tensor."""
        return tree.reshape(self.state_shape) if self.single else self.flatten(tree)

    def flatten(self, tree: Any) -> torch.Tensor:
        if self.single:
            # (batched: explicit sizes, as -1 is ambiguous for an empty batch)
            return tree.reshape(self.state_shape) if self.batch else tree.reshape(-1)
        leaves = tree_leaves(tree)
        if self.batch:
            return torch.cat([x.reshape(self.batch_size, n) for x, n in zip(leaves, self.sizes)], dim=1)
        return torch.cat([x.reshape(-1) for x in leaves])

    def flatten_leading(self, tree: Any) -> torch.Tensor:
        """:meth:`flatten` for a tree whose leaves carry one extra leading dimension ``L``
        (e.g. saved times): returns ``(L, N)`` (shared mode only)."""
        leaves = tree_leaves(tree)
        n = leaves[0].shape[0]
        return torch.cat([x.reshape(n, -1) for x in leaves], dim=1) if len(leaves) > 1 else leaves[0].reshape(n, -1)

    def unflatten(self, flat: torch.Tensor) -> Any:
        """Inverse of :meth:`flatten`; extra leading dimensions of ``flat`` are kept."""
        lead = flat.shape[:-1]
        if self.batch:
            lead = flat.shape[:-2]
            if self.single:
                return flat.reshape((*lead, self.batch_size, *self.shapes[0][1:]))
            parts = torch.split(flat, self.sizes, dim=-1)
            leaves = [p.reshape((*lead, self.batch_size, *s[1:])) for p, s in zip(parts, self.shapes)]
        else:
            if self.single:
                return flat.reshape((*lead, *self.shapes[0]))
            parts = torch.split(flat, self.sizes, dim=-1)
            leaves = [p.reshape((*lead, *s)) for p, s in zip(parts, self.shapes)]
        return _unflatten_structure(self.structure, leaves)

    def check_output(self, out: Any, what: str) -> None:
        """Raise a clear error if ``out`` (a vector field's value) does not match the state."""
        try:
            leaves = tree_leaves(out)
            ok_structure = self.single == (not isinstance(out, (dict, tuple, list))) and (
                self.single or _structure(out) == self.structure
            )
        except Exception:  # pragma: no cover - defensive
            ok_structure = False
            leaves = []
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in leaves]
        if not ok_structure or shapes != self.shapes:
            raise ValueError(
                f"{what} returned {_describe(out)} but the state {self.name} is "
                f"{_describe(self.unflatten(torch.zeros(self.size if not self.batch else (self.batch_size, self.size))))}; "
                "the vector field must return a value with the same structure and shapes as y"
            )
        for leaf in leaves:
            if leaf.dtype != self.dtype or leaf.device != self.device:
                raise TypeError(
                    f"{what} returned a tensor of dtype {leaf.dtype} on {leaf.device}, but the state "
                    f"{self.name} is {self.dtype} on {self.device}. Make the vector field follow the "
                    "dtype and device of y (e.g. create constants with y.new_tensor(...))."
                )
