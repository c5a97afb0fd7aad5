r"""The Time-Shift Sampler: run the network at the time whose noise level matches the sample.

Li, Qu, Yao, Sun & Moens 2024 ("Alleviating exposure bias in diffusion models through sampling
with shifted time steps", ICLR). A network is trained on exact draws of :math:`p_t`, but during
sampling it sees the sampler's own states, whose noise level drifts from the nominal one (exposure
bias). The Time-Shift Sampler estimates the noise level of the current state from its variance
and feeds the network the time, among candidates in a window around the nominal time, whose
expected variance is closest:

.. math:: t_s = \operatorname*{arg\,min}_{\tau \in W(t)} \big|\widehat{\operatorname{Var}}(x_t) -
          (\alpha_\tau^2 v + \sigma_\tau^2)\big|, \qquad
          W(t) = [t - w/2,\ t + w/2] \cap [t_0, t_1],

with :math:`v` the data's per-coordinate variance (``data_var``; Li et al. compare with
:math:`\sigma_\tau^2 = 1 - \bar\alpha_\tau` alone, i.e. ``data_var=0``, and stop shifting below a
cutoff time, where the data's variance dominates). :math:`\widehat{\operatorname{Var}}` is, as in
their code, the variance of each sample over its coordinates (``estimate="sample"``, one shifted
time per sample: for images, over the pixels), or the variance over the batch per coordinate,
averaged over the coordinates (``estimate="batch"``, one shifted time for the batch: for
low-dimensional data). Candidates are ``candidates`` times evenly spaced in the window.

Here the shift is an option of every fixed-grid sampler of
:func:`~torchnde.generative.samplers.sample` (``time_shift=True`` or ``time_shift=TimeShift(...)``):
the model is wrapped so that it is called at :math:`t_s`, and its prediction is used as the
prediction at the grid time :math:`t`; the sampler's own coefficients stay those of the grid (Li
et al. build the shift into their DDIM and PNDM steps; keeping the sampler's coefficients lets the
option work with every sampler, deterministic or stochastic, single- or multistep). No extra model
evaluations; the estimate is a few reductions per evaluation, without a host synchronisation.

::

    out = sample(model, VP(), (512, 3, 32, 32), nfe=20, sampler="dpmpp_2m", parameterisation="eps",
                 time_shift=TimeShift(window=0.02, cutoff=0.3, data_var=0.25))
"""

from __future__ import annotations

import torch

from ._shapes import event_shape_of
from .processes import DiffusionProcess, _batch_time

__all__ = ["TimeShift", "TimeShiftModel", "ESTIMATES"]

#: how the noise level of a state is estimated
ESTIMATES = ("sample", "batch")


class TimeShift:
    """The options of the Time-Shift Sampler (see the module docstring).

    Args:
        window: the window's width in the process's time (default: 2% of ``t1 - t0``, i.e.
            twenty of a thousand DDPM steps on ``[0, 1]``).
        cutoff: no shift at times ``<= cutoff`` (default: shift everywhere).
        data_var: the data's per-coordinate variance :math:`v` in the expected variance
            :math:`\\alpha^2 v + \\sigma^2` (Li et al.: 0).
        estimate: ``"sample"`` (per sample, over its coordinates; one shifted time per sample) or
            ``"batch"`` (over the batch per coordinate, averaged; one shifted time).
        candidates: the number of candidate times in the window (odd, so that the nominal time
            is one of them).
    """

    def __init__(
        self,
        window: float | None = None,
        *,
        cutoff: float | None = None,
        data_var: float = 0.0,
        estimate: str = "sample",
        candidates: int = 21,
    ):
        if window is not None and not float(window) > 0:
            raise ValueError(f"window must be a positive width in time, got {window}")
        if not float(data_var) >= 0:
            raise ValueError(f"data_var must be >= 0, got {data_var}")
        if estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 3 or candidates % 2 == 0:
            raise ValueError(f"candidates must be an odd int >= 3 (the nominal time in the middle), got {candidates!r}")
        self.window = None if window is None else float(window)
        self.cutoff = None if cutoff is None else float(cutoff)
        self.data_var, self.estimate, self.candidates = float(data_var), estimate, int(candidates)

    def __repr__(self):
        return (
            f"TimeShift(window={self.window}, cutoff={self.cutoff}, data_var={self.data_var}, "
            f"estimate={self.estimate!r}, candidates={self.candidates})"
        )

    def wrap(self, model, process: DiffusionProcess) -> TimeShiftModel:
        """``model(t, x)`` called at the shifted times."""
        return TimeShiftModel(model, process, self)


class TimeShiftModel:
    """``model(t, x)`` evaluated at the shifted time :meth:`shifted_time` (``t`` a float or a
    ``(B,)`` tensor; the model gets a ``(B,)`` tensor in ``x``'s dtype)."""

    def __init__(self, model, process: DiffusionProcess, options: TimeShift | None = None):
        if not callable(model):
            raise TypeError(f"the model must be callable as model(t, x); got {type(model).__name__}")
        if not isinstance(process, DiffusionProcess):
            raise TypeError(f"process must be a DiffusionProcess such as VP(), got {type(process).__name__}")
        self.model, self.process = model, process
        self.options = options if options is not None else TimeShift()
        w = self.options.window
        self.window = w if w is not None else 0.02 * (process.t1 - process.t0)
        self.event_shape = event_shape_of(model)

    def __repr__(self):
        return f"TimeShiftModel({getattr(self.model, '__name__', type(self.model).__name__)}, {self.options!r})"

    def _variance(self, x: torch.Tensor) -> torch.Tensor:
        """The estimated variance: ``(B,)`` (per sample) or a 0-d tensor (the batch)."""
        flat = x.reshape(x.shape[0], -1)
        if self.options.estimate == "sample":
            if flat.shape[1] < 2:
                raise ValueError("estimate='sample' needs states with at least two coordinates; use estimate='batch'")
            return flat.var(dim=1)
        if flat.shape[0] < 2:
            raise ValueError("estimate='batch' needs a batch of at least two samples")
        return flat.var(dim=0).mean()

    def shifted_time(self, t, x: torch.Tensor) -> torch.Tensor:
        """The time ``(B,)`` (in ``x``'s dtype) the model is run at for the state ``x`` at the
        nominal time ``t``."""
        tt = _batch_time(t, x)
        o, p = self.options, self.process
        n = o.candidates
        offsets = torch.linspace(-0.5 * self.window, 0.5 * self.window, n, dtype=x.dtype, device=x.device)
        cand = (tt[:, None] + offsets).clamp(min=p.t0, max=p.t1)  # (B, n)
        a, s = p.marginal(cand.reshape(-1))
        expected = (s * s + o.data_var * a * a).reshape(cand.shape).to(x.dtype)
        var = self._variance(x)
        var = var[:, None] if var.dim() == 1 else var
        best = (expected - var).abs().argmin(dim=1, keepdim=True)
        ts = cand.gather(1, best).squeeze(1)
        if o.cutoff is not None:
            ts = torch.where(tt > o.cutoff, ts, tt)
        return ts

    def __call__(self, t, x):
        return self.model(self.shifted_time(t, x), x)
