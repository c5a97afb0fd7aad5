r"""``ODERNN``: a hidden state that follows a neural ODE between observations and is updated by a
GRU cell at each observation.

Rubanova, Chen, Duvenaud, *Latent ODEs for Irregularly-Sampled Time Series* (NeurIPS 2019:
ODE-RNN); De Brouwer, Simm, Arany, Moreau, *GRU-ODE-Bayes: Continuous Modeling of
Sporadically-Observed Time Series* (NeurIPS 2019: the GRU-ODE vector field).
"""

from __future__ import annotations

import torch
from torch import nn

from ..adjoints import AbstractAdjoint
from ..controllers import AbstractController
from ..solvers import AbstractSolver
from ._neural_ode import _vector_field_arity
from ._recurrent import Evolver, check_sizes, scan_observations, sequence_inputs

__all__ = ["ODERNN", "GRUODEField"]


class GRUODEField(nn.Module):
    r"""The GRU-ODE vector field (De Brouwer et al. 2019): the continuous limit of a GRU with no
    input, :math:`\dot h = (1 - z) \odot (g - h)` with :math:`z = \sigma(U_z h + b_z)`,
    :math:`r = \sigma(U_r h + b_r)`, :math:`g = \tanh(U_h (r \odot h) + b_h)`. Its state stays in
    :math:`[-1, 1]` when it starts there."""

    def __init__(self, hidden_size: int):
        super().__init__()
        check_sizes("GRUODEField", hidden_size=hidden_size)
        self.zr = nn.Linear(hidden_size, 2 * hidden_size)
        self.g = nn.Linear(hidden_size, hidden_size)

    def forward(self, t, h):
        z, r = torch.sigmoid(self.zr(h)).chunk(2, -1)
        return (1 - z) * (torch.tanh(self.g(r * h)) - h)


class _MLPField(nn.Module):
    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.Tanh(), nn.Linear(width, hidden_size))

    def forward(self, t, h):
        return self.net(h)


class ODERNN(nn.Module):
    r"""ODE-RNN (Rubanova et al. 2019) for irregularly sampled sequences.

    Between observations the hidden state follows :math:`\dot h = f_\theta(t, h)`, solved by
    :func:`torchnde.solve` with per-sample time spans (each sample from its own last observation
    time to its next one, with its own steps: ``per_sample=True``); at an observation
    :math:`h \leftarrow \mathrm{GRUCell}(x_l, h)`.

    Args:
        input_size, hidden_size: sizes of ``x``'s last dimension and of the state.
        vector_field: ``"mlp"`` (default: hidden → width → hidden with tanh, as in the paper),
            ``"gru"`` (:class:`GRUODEField`, the GRU-ODE of De Brouwer et al.) or an
            ``nn.Module`` with ``forward(t, h)`` (``t`` is a ``(batch,)`` tensor).
        width: hidden width of the ``"mlp"`` field.
        solver, controller, adjoint, dt0, max_steps: as for :class:`NeuralODE` (default
            ``Tsit5()`` with ``PIDController(rtol=1e-3, atol=1e-6)``); one solve per observation.

    ``forward(x, dt=None, *, ts=None, mask=None, h0=None, t0=None)``: ``x`` is
    ``(batch, length, input_size)``; ``ts`` ``(batch, length)`` the observation times (or ``dt``
    the time since the previous step; with ``ts`` the first observation is at the start, with
    ``dt`` the state first evolves by ``dt[:, 0]``); ``mask`` ``(batch, length)`` marks observed
    steps (a masked step is treated as absent: no update, and the state is not evolved to it
    but its time counts towards the next observed step; use it for padding). Returns
    ``(hs, h_last)``: the state right after each step ``(batch, length, hidden_size)`` and after
    the last observed step ``(batch, hidden_size)``.

    Example:
        >>> import torch
        >>> from torchnde.nn import ODERNN
        >>> rnn = ODERNN(3, 16, vector_field="gru")
        >>> x = torch.randn(4, 10, 3)
        >>> ts = torch.rand(4, 10).cumsum(1)              # each sample its own times
        >>> hs, h = rnn(x, ts=ts)
        >>> hs.shape, h.shape
        (torch.Size([4, 10, 16]), torch.Size([4, 16]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        vector_field="mlp",
        width: int = 64,
        solver: AbstractSolver | None = None,
        controller: AbstractController | None = None,
        adjoint: AbstractAdjoint | None = None,
        dt0=None,
        max_steps: int | None = 4096,
    ):
        super().__init__()
        check_sizes("ODERNN", input_size=input_size, hidden_size=hidden_size, width=width)
        self.input_size, self.hidden_size = input_size, hidden_size
        if isinstance(vector_field, str):
            if vector_field == "mlp":
                vector_field = _MLPField(hidden_size, width)
            elif vector_field == "gru":
                vector_field = GRUODEField(hidden_size)
            else:
                raise ValueError(f"ODERNN(vector_field=...) must be 'mlp', 'gru' or an nn.Module, got {vector_field!r}")
        elif not isinstance(vector_field, nn.Module):
            raise TypeError(
                f"ODERNN(vector_field=...) must be 'mlp', 'gru' or an nn.Module with forward(t, h), "
                f"got {type(vector_field).__name__}"
            )
        try:
            self._arity = _vector_field_arity(vector_field)
        except TypeError as e:
            raise TypeError(str(e).replace("NeuralODE", "ODERNN")) from None
        self.vector_field = vector_field
        self.update = nn.GRUCell(input_size, hidden_size)
        self._evolve = Evolver("ODERNN", solver, controller, adjoint, dt0, max_steps)

    def _vf(self, t, h, args):
        return self.vector_field(t, h) if self._arity == 2 else self.vector_field(t, h, args)

    def forward(self, x, dt=None, *, ts=None, mask=None, h0=None, t0=None):
        dt, mask, h = sequence_inputs("ODERNN", x, self.input_size, dt, ts, mask, h0, self.hidden_size)
        B = x.shape[0]
        start = None if ts is None else torch.as_tensor(ts, dtype=x.dtype, device=x.device)[..., 0].expand(B)
        if t0 is None:
            t0 = 0.0 if start is None else start
        t_last = torch.as_tensor(t0, dtype=x.dtype, device=x.device).expand(B).clone()
        if start is not None:  # the first observation is ts[:, 0], reached from t0
            lead = start - t_last
            if bool((lead < 0).any()):
                raise ValueError("ODERNN(t0=...) must not come after the first observation time ts[:, 0]")
            dt = torch.cat([lead[:, None], dt[:, 1:]], 1)

        def update(k, h, t, span):
            return self.update(x[:, k], self._evolve(self._vf, h, t, span))

        return scan_observations(dt, mask, h, update, t_last)

    def extra_repr(self):
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}, solver={self._evolve.solver!r}"
