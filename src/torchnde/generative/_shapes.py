"""Shape checks of the generative models: the data shape a model declares, and clear errors when a
model is given data of another shape.

A model may declare the shape of one example as ``model.event_shape`` (a tuple, as
``torch.distributions`` and :class:`~torchnde.generative.cnf.CNF` do). The models torchnde builds
declare it (:class:`~torchnde.generative.flow_matching.MLP`, the exact oracles' ``model`` and
``score_fn``), and its wrappers pass it on (a :class:`~torchnde.generative.parameterisation.
Parameterisation` wrapper, a process's probability-flow and reverse drifts), so ``sample`` and
``log_prob`` check the shape of their input once, before any solve. For a model that declares
nothing, the error raised by its first call on data of the wrong shape (a broadcast or
matrix-multiplication error from deep inside) is re-raised as :class:`ModelShapeError` naming the
shape it received; the ``try`` costs nothing while no error is raised.
"""

from __future__ import annotations

import numbers

import torch

__all__ = [
    "ModelShapeError",
    "event_shape_of",
    "check_shape",
    "event_mismatch",
    "batch_hint",
    "reraise_if_shape_error",
]


class ModelShapeError(ValueError, RuntimeError):
    """A model met data of a shape it does not take. Both a ``ValueError`` (bad input) and a
    ``RuntimeError`` (what the underlying torch error was), so either ``except`` catches it."""


def event_shape_of(model) -> tuple[int, ...] | None:
    """The shape of one example that ``model`` declares as ``model.event_shape``, or ``None``."""
    shape = getattr(model, "event_shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(s) for s in shape)
    except TypeError:  # not a sequence of ints: not a declaration we understand
        return None


def check_shape(shape, name: str = "shape") -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints (batch first), or a ``ValueError`` naming it."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if isinstance(shape, numbers.Integral) or not isinstance(shape, (tuple, list)):
        raise ValueError(f"{name} must be a tuple (batch, *event_shape) such as (1000, 2), got {shape!r}")
    if not shape or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape):
        raise ValueError(f"{name} must be a non-empty tuple of positive ints (batch, *event_shape), got {shape!r}")
    return tuple(int(s) for s in shape)


def event_mismatch(subject: str, expected: tuple, fix: str) -> ModelShapeError:
    """The error for ``subject`` (e.g. ``"shape=(5, 3)"``) that does not fit a model taking examples
    of shape ``expected``; ``fix`` says what to pass instead."""
    return ModelShapeError(
        f"{subject} does not fit the model, which takes examples of shape {expected} "
        f"(data dimension {_dimension(expected)}): pass {fix}"
    )


def batch_hint(expected: tuple) -> str:
    """``"(batch, 2)"`` for examples of shape ``(2,)``."""
    return f"(batch, {', '.join(map(str, expected))})" if expected else "(batch,)"


def _dimension(shape: tuple) -> str:
    n = 1
    for s in shape:
        n *= s
    return str(n) if len(shape) <= 1 else f"{n} = {' x '.join(map(str, shape))}"


# substrings of torch's messages for tensors whose shapes do not fit together
_SHAPE_MESSAGES = (
    "size of tensor",
    "shapes cannot be multiplied",
    "size mismatch",
    "is invalid for input of size",
    "sizes of tensors must match",
    "same number of dimensions",
    "expected input",
    "expanded size",
    "dimension out of range",
    "expected size",
    "the same shape",
    "broadcast",
    "too many indices",
    "must match the size",
)


def reraise_if_shape_error(error: BaseException, what: str, x: torch.Tensor, expected=None) -> None:
    """Raise :class:`ModelShapeError` from ``error`` if it is torch's error for mismatched shapes,
    raised by ``what`` (e.g. ``"the model"``) called on ``x``; return otherwise (the caller then
    re-raises ``error`` unchanged)."""
    if isinstance(error, ModelShapeError) or not isinstance(error, (RuntimeError, IndexError)):
        return
    text = str(error)
    if not any(m in text.lower() for m in _SHAPE_MESSAGES):
        return
    event = tuple(x.shape[1:])
    if expected is not None:
        want = f"it takes examples of shape {tuple(expected)}"
    else:
        want = "does it take examples of this shape? (a model declares its own with model.event_shape)"
    raise ModelShapeError(
        f"{what} failed on a batch of shape {tuple(x.shape)} (examples of shape {event}, data dimension "
        f"{_dimension(event)}); {want}. The error was: {type(error).__name__}: {text}"
    ) from error
