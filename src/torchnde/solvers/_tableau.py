"""Butcher tableaus: the published coefficients of an explicit Runge--Kutta method.

A tableau is pure data. :class:`~torchnde.solvers.AbstractERK` turns it into a step function;
adding a solver means writing its tableau (and, where one is published, its dense-output
polynomials) in a file of its own and listing the class in :data:`torchnde.solvers.SOLVERS`.

Conventions (stage indices are 0-based):

* ``c[i]`` is the time node and ``a[i]`` the row of coefficients of stage ``i``; ``a[i]`` has
  exactly ``i`` entries (explicit methods), so ``a[0] == ()`` and ``c[0] == 0``.
* ``b`` are the weights of the propagated solution, ``b_error`` the weights of the embedded error
  estimate ``y_error = h * sum_i b_error[i] k_i`` (that is ``b - b_hat``, so they sum to zero).
* ``fsal``: the last stage is evaluated at ``(t0 + h, y1)`` ("first same as last"), so it is the
  derivative at the end of the step and the next step reuses it.
* Dense output: ``y(t0 + theta h) = y0 + h * sum_j b_j(theta) K_j`` with
  ``b_j(theta) = sum_p dense[j][p] * theta**(p + 1)``. The vector ``K`` is the ``s`` stages,
  then -- for methods that are not FSAL -- the derivative ``f(t0 + h, y1)``, then the
  ``dense_stages`` (extra stages evaluated only when dense output is needed). Each extra stage is
  ``(c, a_row)`` where ``a_row`` spans every entry of ``K`` before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch

Number = float | int | Fraction

__all__ = ["ButcherTableau"]


def _floats(row) -> tuple[float, ...]:
    return tuple(float(x) for x in row)


@dataclass(frozen=True, eq=False)
class ButcherTableau:
    """Coefficients of an explicit Runge--Kutta method (see the module docstring)."""

    c: tuple
    a: tuple
    b: tuple
    b_error: tuple | None = None
    fsal: bool = False
    dense: tuple | None = None
    dense_stages: tuple = ()
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        s = len(self.c)
        if len(self.a) != s or len(self.b) != s:
            raise ValueError(f"tableau sizes differ: len(c)={s}, len(a)={len(self.a)}, len(b)={len(self.b)}")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(f"row {i} of a must have {i} entries (explicit method), got {len(row)}")
        if self.b_error is not None and len(self.b_error) != s:
            raise ValueError(f"b_error must have {s} entries, got {len(self.b_error)}")
        if self.dense is not None:
            n = self.num_dense_k
            if len(self.dense) != n:
                raise ValueError(f"dense must have one row per entry of K ({n}), got {len(self.dense)}")

    @property
    def num_stages(self) -> int:
        return len(self.c)

    @property
    def num_dense_k(self) -> int:
        """Length of the vector ``K`` that the dense-output polynomials combine."""
        return len(self.c) + (0 if self.fsal else 1) + len(self.dense_stages)

    def tensors(self, dtype: torch.dtype, device: torch.device) -> dict:
        """The coefficients as tensors of ``dtype`` on ``device`` (cached; they are constants)."""
        key = (dtype, device)
        out = self._cache.get(key)
        if out is None:
            kw = dict(dtype=dtype, device=device)
            out = {
                "c": [float(x) for x in self.c],
                "a_f": [_floats(row) for row in self.a],
                "b_f": _floats(self.b),
                "b_error_f": None if self.b_error is None else _floats(self.b_error),
                "dense_stages_f": [_floats(row) for _, row in self.dense_stages],
                "a": [torch.tensor(_floats(row), **kw) if row else None for row in self.a],
                "b": torch.tensor(_floats(self.b), **kw),
                "b_error": None if self.b_error is None else torch.tensor(_floats(self.b_error), **kw),
                "dense": None if self.dense is None else torch.tensor([_floats(r) for r in self.dense], **kw),
                "dense_stages": [torch.tensor(_floats(row), **kw) for _, row in self.dense_stages],
            }
            self._cache[key] = out
        return out
