r"""STEER: random end times (Ghosh, Behl, Dupont, Torr & Namboodiri, "STEER: Simple Temporal
Regularization For Neural ODEs", NeurIPS 2020).

Each training iteration integrates to :math:`t_1' \sim U[t_1 - b, t_1 + b]` instead of :math:`t_1`
(``b < |t_1 - t_0|``); the model learns dynamics that are insensitive to the exact end time, which
in practice makes them smoother and cheaper to solve. Test time integrates to :math:`t_1` itself.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["steer_end_time"]


def steer_end_time(
    t0,
    t1,
    b: float,
    *,
    batch: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device=None,
):
    r"""A STEER end time :math:`t_1' \sim U[t_1 - b, t_1 + b]` (Ghosh et al. 2020).

    Args:
        t0, t1: the nominal interval (numbers or 0-d tensors); ``t1 < t0`` works too (the end
            time stays on the same side of ``t0``).
        b: the half-width, ``0 <= b < |t1 - t0|``.
        batch: ``None`` for one end time (a Python float, for a shared solve), or ``B`` for a
            ``(B,)`` tensor of end times, one per sample (``solve(..., per_sample=True)``).
        seed, generator: make the draw reproducible (one of them; neither: the global RNG).
        dtype, device: of the per-sample tensor (use ``y0``'s).

    Returns:
        A float, or a ``(batch,)`` tensor.

    Raises:
        ValueError: ``b`` negative or not smaller than the interval, bad ``batch``.
    """
    a = _number(t0, "t0")
    e = _number(t1, "t1")
    if a == e:
        raise ValueError(f"t0 == t1 == {a}; the interval must be non-empty")
    if isinstance(b, bool) or not isinstance(b, numbers.Real) or not math.isfinite(b) or b < 0:
        raise ValueError(f"b must be a finite number >= 0, got {b!r}")
    if b >= abs(e - a):
        raise ValueError(
            f"b = {b} must be smaller than |t1 - t0| = {abs(e - a)}: the random end time must stay on the "
            "same side of t0 (Ghosh et al. use b well below the interval, e.g. 0.5 for [0, 1])"
        )
    if generator is not None and seed is not None:
        raise ValueError("pass either seed or generator, not both")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 0):
        raise ValueError(f"batch must be None or an int >= 0, got {batch!r}")
    if generator is None and seed is not None:
        generator = torch.Generator(device=device if device is not None else "cpu").manual_seed(int(seed))
    shape = () if batch is None else (int(batch),)
    u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    out = e + b * (2 * u - 1)
    return float(out) if batch is None else out


def _number(x, name) -> float:
    if isinstance(x, torch.Tensor):
        if x.dim() != 0:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(x.shape)}")
        x = float(x.detach())
    elif isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x
