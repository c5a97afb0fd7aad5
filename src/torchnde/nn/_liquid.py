r"""Liquid time-constant networks: ``LTC`` (the ODE, solved by :func:`torchnde.solve`) and
``CfC`` (closed-form continuous-time cells, no solver).

Hasani, Lechner, Amini, Rus, Grosu, *Liquid Time-constant Networks* (AAAI 2021); Hasani,
Lechner, Amini, Liebenwein, Ray, Tschaikowski, Teschl, Rus, *Closed-form Continuous-time Neural
Networks* (Nature Machine Intelligence 2022).

Both read a sequence ``x`` ``(batch, length, input_size)`` with per-sample, per-step elapsed
times ``dt`` ``(batch, length)`` (or observation times ``ts``) and an optional ``mask``
``(batch, length)``: a masked step is treated as absent (the state is held and its time is added
to the next observed step). They return ``(hs, h_last)``: the hidden state after every step,
``(batch, length, hidden_size)``, and after the last observed step, ``(batch, hidden_size)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adjoints import AbstractAdjoint
from ..controllers import AbstractController
from ..solvers import AbstractSolver
from ._recurrent import Evolver, check_sizes, scan_observations, sequence_inputs

__all__ = ["LTC", "CfC"]


class _LiquidParams(nn.Module):
    r"""The LTC's parameters: conductance :math:`f = \sigma(W[I; x] + b)`, leak
    :math:`w_\tau = \mathrm{softplus}(\cdot) \ge 0` and reversal potential ``A``."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.conductance = nn.Linear(input_size + hidden_size, hidden_size)
        self.w_tau_raw = nn.Parameter(torch.full((hidden_size,), -1.0))
        self.A = nn.Parameter(torch.randn(hidden_size))

    def w_tau(self):
        return nn.functional.softplus(self.w_tau_raw)

    def f(self, inp, h):
        return torch.sigmoid(self.conductance(torch.cat([inp, h], -1)))


class LTC(_LiquidParams):
    r"""Liquid time-constant cell (Hasani et al. 2021), solved with :func:`torchnde.solve`:

    .. math:: \dot h = -\big(w_\tau + f(I, h)\big) \odot h + f(I, h) \odot A,
              \qquad f(I, h) = \sigma(W [I; h] + b),

    with the input :math:`I = x_l` held over :math:`(t_{l-1}, t_l]` (as in :class:`S4D`). Between
    two observations each sample is solved over its own interval (per-sample ``t0``/``t1`` and
    steps: ``solve(..., per_sample=True)``), so a batch of differently spaced series is one
    solve per step. Any torchnde solver works; the liquid time constant
    :math:`1/(w_\tau + f)` can make the cell stiff, where an implicit solver (``Kvaerno5()``,
    ``Rodas5P()``) helps.

    Args:
        input_size, hidden_size: the sizes of ``x``'s last dimension and of the state.
        solver: default ``Tsit5()``.
        controller: default ``PIDController(rtol=1e-3, atol=1e-6)`` (adaptive solvers).
        adjoint: default ``DirectAdjoint()``.
        dt0: first (or, with constant steps, every) step size.
        max_steps: per solve (one solve per observation).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        solver: AbstractSolver | None = None,
        controller: AbstractController | None = None,
        adjoint: AbstractAdjoint | None = None,
        dt0=None,
        max_steps: int | None = 4096,
    ):
        check_sizes("LTC", input_size=input_size, hidden_size=hidden_size)
        super().__init__(input_size, hidden_size)
        self._evolve = Evolver("LTC", solver, controller, adjoint, dt0, max_steps)

    def vector_field(self, t, h, inp):
        f = self.f(inp, h)
        return -(self.w_tau() + f) * h + f * self.A

    def forward(self, x, dt=None, *, ts=None, mask=None, h0=None, t0=0.0):
        """Run over a sequence; see the module docstring for ``dt``/``ts``/``mask``/``h0``.
        ``t0`` (a number or ``(batch,)``) is the time of ``h0`` (only shifts the solves)."""
        dt, mask, h = sequence_inputs("LTC", x, self.input_size, dt, ts, mask, h0, self.hidden_size)
        B = x.shape[0]
        t_last = torch.as_tensor(t0, dtype=x.dtype, device=x.device).expand(B).clone()

        def update(k, h, t, span):
            return self._evolve(self.vector_field, h, t, span, x[:, k])

        return scan_observations(dt, mask, h, update, t_last)

    def extra_repr(self):
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}, solver={self._evolve.solver!r}"


class CfC(nn.Module):
    r"""Closed-form continuous-time cell (Hasani et al. 2022): a recurrent cell whose update over
    an elapsed time :math:`\Delta` is an explicit function of :math:`\Delta`, so irregular sampling
    costs no solver.

    ``mode="default"`` is the paper's gated CfC (its Eq. 10): a backbone MLP on :math:`[I; h]`
    feeds three heads ``f``, ``g``, ``h``, and

    .. math:: h_{\text{new}} = \sigma(-f\,\Delta) \odot g + \big(1 - \sigma(-f\,\Delta)\big) \odot h.

    ``mode="pure"`` is the closed-form solution of the LTC ODE (see :class:`LTC`; same
    parameters: ``conductance``, ``w_tau``, ``A``) with the conductance frozen over the step at
    :math:`f = \sigma(W[I_l; h_{l-1}] + b)`:

    .. math:: h_{\text{new}} = h_\infty + (h - h_\infty)\,e^{-(w_\tau + f)\Delta},
              \qquad h_\infty = \frac{f A}{w_\tau + f}.

    This is exact for the LTC when ``f`` does not depend on the state (no recurrent conductance
    weights) and the input is held over the step: the LTC is then linear with constant
    coefficients over the step (tested against :class:`LTC` solved at tight tolerance). The
    paper's closed form (its Theorem 1), :math:`(h_0 - A)\,e^{-(w_\tau + f)t} \odot f(-I) + A`,
    is an approximation for general inputs; it coincides with the expression here only when
    :math:`w_\tau = 0` and its factor :math:`f(-I)` equals 1, so torchnde uses the exact
    expression.

    Args:
        input_size, hidden_size: sizes of ``x``'s last dimension and of the state.
        mode: ``"default"`` or ``"pure"``.
        backbone_units, backbone_layers: the backbone MLP (``"default"`` only; 0 layers feeds
            :math:`[I; h]` to the heads directly).
        activation: the backbone's activation module class (default ``nn.SiLU``).

    ``forward(x, dt=None, *, ts=None, mask=None, h0=None)`` returns ``(hs, h_last)`` (see the
    module docstring); ``dt`` defaults to 1 per step.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        mode: str = "default",
        backbone_units: int = 64,
        backbone_layers: int = 1,
        activation=nn.SiLU,
    ):
        super().__init__()
        check_sizes("CfC", input_size=input_size, hidden_size=hidden_size)
        if mode not in ("default", "pure"):
            raise ValueError(f"CfC(mode=...) must be 'default' or 'pure', got {mode!r}")
        self.input_size, self.hidden_size, self.mode = input_size, hidden_size, mode
        if mode == "pure":
            self.liquid = _LiquidParams(input_size, hidden_size)
            return
        if backbone_layers < 0 or (backbone_layers > 0 and backbone_units < 1):
            raise ValueError(
                f"CfC needs backbone_layers >= 0 and backbone_units >= 1, got {backbone_layers}, {backbone_units}"
            )
        layers, width = [], input_size + hidden_size
        for _ in range(backbone_layers):
            layers += [nn.Linear(width, backbone_units), activation()]
            width = backbone_units
        self.backbone = nn.Sequential(*layers)
        self.head_f = nn.Linear(width, hidden_size)
        self.head_g = nn.Linear(width, hidden_size)
        self.head_h = nn.Linear(width, hidden_size)

    def cell(self, inp, h, delta):
        """One update: ``inp`` ``(batch, input_size)``, ``h`` ``(batch, hidden)``, elapsed time
        ``delta`` ``(batch,)``."""
        delta = delta[:, None]
        if self.mode == "pure":
            p = self.liquid
            f = p.f(inp, h)
            rate = p.w_tau() + f
            h_inf = f * p.A / rate
            return h + (h_inf - h) * -torch.expm1(-rate * delta)
        z = self.backbone(torch.cat([inp, h], -1))
        gate = torch.sigmoid(-self.head_f(z) * delta)
        return gate * torch.tanh(self.head_g(z)) + (1 - gate) * torch.tanh(self.head_h(z))

    def forward(self, x, dt=None, *, ts=None, mask=None, h0=None):
        dt, mask, h = sequence_inputs("CfC", x, self.input_size, dt, ts, mask, h0, self.hidden_size)
        return scan_observations(dt, mask, h, lambda k, h, t, span: self.cell(x[:, k], h, span))

    def extra_repr(self):
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}, mode={self.mode!r}"
