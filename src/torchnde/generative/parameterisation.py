r"""What a denoising model predicts, and conversions between the choices.

With the marginal :math:`x_t = \alpha x_0 + m + \sigma\varepsilon` of a forward process (see
:mod:`torchnde.generative.processes`; write :math:`y = x_t - m`), a model may predict

* ``"eps"``: the noise :math:`\varepsilon` (Ho et al. 2020, DDPM);
* ``"x0"``: the clean data :math:`x_0`;
* ``"v"``: :math:`v = \alpha\varepsilon - \sigma x_0` (Salimans & Ho 2022, "Progressive
  distillation for fast sampling of diffusion models"; for VP processes it is the velocity of the
  angle :math:`\phi` with :math:`\alpha = \cos\phi`, :math:`\sigma = \sin\phi`);
* ``"score"``: :math:`\nabla_x\log p_t(x) = -\varepsilon/\sigma` (Song et al. 2021);
* ``"velocity"``: the probability-flow drift :math:`f(t, x) - \tfrac12 g^2\nabla\log p_t`
  (what flow-matching models learn; Lipman et al. 2023).

Each is an invertible affine function of :math:`\varepsilon` given :math:`(t, x_t)`, so any of
them converts to any other (:class:`Parameterisation`), and every sampler works with every
parameterisation. The conversions use the *predicted* quantities, e.g. ``x0`` from ``eps`` is
Tweedie's estimate :math:`(y - \sigma\hat\varepsilon)/\alpha`.
"""

from __future__ import annotations

import torch

from ._shapes import ModelShapeError, event_shape_of, reraise_if_shape_error
from .processes import DiffusionProcess, _batch_time, _plus, expand_time

__all__ = ["Parameterisation", "KINDS"]

#: the quantities a model may predict
KINDS = ("eps", "x0", "v", "score", "velocity")


def _minus(x, offset):
    """``x - offset``, skipping the no-op subtraction of the float ``0.0``."""
    return _plus(x, -offset) if isinstance(offset, float) else x - offset


class Parameterisation:
    """Conversions for a model that predicts ``kind`` under ``process``.

    Every method takes the time ``t`` (float or ``(B,)`` tensor), the noisy state ``x`` and the
    model's output ``out`` (a prediction of ``kind``) and returns the prediction of another kind.
    ``as_score(model)`` / ``as_kind(model, kind)`` wrap a model ``model(t, x)`` so that it returns
    the score (or another kind); the wrapper calls the model with ``t`` as a ``(B,)`` tensor in
    ``x``'s dtype (what networks take), and counts its calls in ``.calls``.

    Args:
        kind: one of ``"eps"``, ``"x0"``, ``"v"``, ``"score"``, ``"velocity"``.
        process: the forward process (a :class:`~torchnde.generative.processes.DiffusionProcess`).
    """

    def __init__(self, kind: str, process: DiffusionProcess):
        if kind not in KINDS:
            raise ValueError(f"unknown parameterisation {kind!r}; choose one of {KINDS}")
        if not isinstance(process, DiffusionProcess):
            raise TypeError(f"process must be a DiffusionProcess such as VP(), got {type(process).__name__}")
        self.kind = kind
        self.process = process

    def __repr__(self):
        return f"Parameterisation({self.kind!r}, {self.process!r})"

    # -- the hub: everything goes through eps --------------------------------------------------
    def _coeffs(self, t, x):
        a, s = self.process.marginal(t)
        return expand_time(a, x), expand_time(s, x), _minus(x, self.process.mean_offset(t, x))

    def _eps_from(self, kind, t, x, out):
        if kind == "eps":
            return out
        a, s, y = self._coeffs(t, x)
        if kind == "x0":
            return (y - a * out) / s
        if kind == "score":
            return out * -s
        if kind == "v":
            return (s * y + a * out) / (a * a + s * s)
        # velocity = f - 1/2 g^2 score = f + g^2 eps / (2 sigma)
        g2 = expand_time(self.process.diffusion2(t), x)
        return (out - self.process.drift(t, x)) * (2 * s / g2)

    def _from_eps(self, kind, t, x, eps):
        if kind == "eps":
            return eps
        a, s, y = self._coeffs(t, x)
        if kind == "x0":
            return (y - s * eps) / a
        if kind == "score":
            return eps / -s
        if kind == "v":
            x0 = (y - s * eps) / a
            return a * eps - s * x0
        g2 = expand_time(self.process.diffusion2(t), x)
        return self.process.drift(t, x) + (0.5 * g2 / s) * eps

    def convert(self, to: str, t, x, out):
        """The model output ``out`` (of this parameterisation's kind) as a prediction of ``to``."""
        if to not in KINDS:
            raise ValueError(f"unknown parameterisation {to!r}; choose one of {KINDS}")
        if to == self.kind:
            return out
        if to == "x0" and self.kind == "v":  # direct, better conditioned than via eps
            a, s, y = self._coeffs(t, x)
            return (a * y - s * out) / (a * a + s * s)
        return self._from_eps(to, t, x, self._eps_from(self.kind, t, x, out))

    def to_eps(self, t, x, out):
        return self.convert("eps", t, x, out)

    def to_x0(self, t, x, out):
        return self.convert("x0", t, x, out)

    def to_v(self, t, x, out):
        return self.convert("v", t, x, out)

    def to_score(self, t, x, out):
        return self.convert("score", t, x, out)

    def to_velocity(self, t, x, out):
        return self.convert("velocity", t, x, out)

    def as_kind(self, model, kind: str) -> _Converted:
        """``model(t, x)`` (predicting this parameterisation's kind) as a function ``(t, x)`` that
        predicts ``kind``."""
        if kind not in KINDS:
            raise ValueError(f"unknown parameterisation {kind!r}; choose one of {KINDS}")
        return _Converted(self, model, kind)

    def as_score(self, model) -> _Converted:
        """``model(t, x)`` as a score function ``score(t, x)``."""
        return self.as_kind(model, "score")


class _Converted:
    """A model seen through a conversion; ``calls`` counts the model's evaluations."""

    def __init__(self, param: Parameterisation, model, kind: str):
        if not callable(model):
            raise TypeError(f"the model must be callable as model(t, x); got {type(model).__name__}")
        self.param, self.model, self.kind = param, model, kind
        self.calls = 0
        self._times = None  # see prefill_times

    def prefill_times(self, times, x: torch.Tensor) -> None:
        """Make the model's ``(B,)`` time tensors for the float ``times`` (a sampler's grid) at
        once, for states like ``x``: one op for the grid instead of a ``torch.full`` per call.
        The same values (each row is the time rounded to ``x``'s dtype); a call at another time,
        with another batch, dtype or device, or after the model has written into one of them,
        makes its own as before."""
        if not isinstance(times, torch.Tensor):
            times = torch.tensor([float(v) for v in times], dtype=torch.float64)
        keys = times.detach().reshape(-1).tolist()
        grid = times.detach().reshape(-1, 1).to(dtype=x.dtype, device=x.device)
        rows = grid.expand(-1, x.shape[0]).contiguous().unbind(0)
        self._times = (dict(zip(keys, rows)), x.shape[0], x.dtype, x.device)

    @property
    def event_shape(self) -> tuple[int, ...] | None:
        """The example shape the wrapped model declares (``None`` if it declares none)."""
        return event_shape_of(self.model)

    def _model(self, t, x):
        self.calls += 1
        tt = None
        if self._times is not None and type(t) is float:
            rows, b, dtype, device = self._times
            tt = rows.get(t)
            if tt is not None and (tt._version or x.shape[0] != b or x.dtype is not dtype or x.device != device):
                tt = None
        try:
            out = self.model(_batch_time(t, x) if tt is None else tt, x)
        except (RuntimeError, IndexError) as e:
            reraise_if_shape_error(e, "the model", x, self.event_shape)
            raise
        if self.calls == 1 and getattr(out, "shape", None) != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelShapeError(
                f"the model must return a tensor shaped like its input x {tuple(x.shape)} (a prediction of "
                f"{self.param.kind!r}), got {got}"
            )
        return out

    def __call__(self, t, x):
        return self.param.convert(self.kind, t, x, self._model(t, x))

    def score_scale(self, t: float) -> float | None:
        """``k`` with the score ``k * model(t, x)`` at float time ``t`` (what :meth:`scaled_score`
        multiplies by), or ``None`` if the score is not a scaled model output."""
        if self.kind != "score" or self.param.kind not in ("eps", "score"):
            return None
        return 1.0 if self.param.kind == "score" else -1.0 / self.param.process.marginal(t)[1]

    def scaled_score(self, t: float, x):
        """``(out, k)`` with the score ``k * out`` for a score wrapper of an ``"eps"`` or
        ``"score"`` model at a float time (``out`` the model's output), so that a caller folds
        ``k`` into its own coefficient and saves an op; ``None`` (and no model call) otherwise."""
        if self.kind != "score" or self.param.kind not in ("eps", "score"):
            return None
        out = self._model(t, x)
        if self.param.kind == "score":
            return out, 1.0
        return out, -1.0 / self.param.process.marginal(t)[1]

    def __repr__(self):
        return f"{self.param!r}.as_kind({getattr(self.model, '__name__', type(self.model).__name__)}, {self.kind!r})"
