r"""BDIA: exactly invertible deterministic sampling by bi-directional integration approximation.

Zhang, Lewis & Kleijn 2023 ("Exact diffusion inversion via bi-directional integration
approximation", ECCV 2024). A deterministic one-evaluation sampler (DDIM, or Euler on the
probability-flow ODE) moves the state by :math:`\Delta(t_i \to t \mid x_i)`, an approximation of
the flow's integral from :math:`t_i` to :math:`t` built from the one model evaluation at
:math:`(t_i, x_i)`. BDIA uses that evaluation in both directions: on the grid
:math:`t_N > \dots > t_0`, the first step is the base sampler's, and then

.. math::
    x_{i-1} = \gamma\,x_{i+1} + (1-\gamma)\,x_i
              - \gamma\,\Delta(t_i \to t_{i+1} \mid x_i) + \Delta(t_i \to t_{i-1} \mid x_i),

i.e. the sampler's forward step from :math:`x_i` plus :math:`\gamma` times the difference between
:math:`x_{i+1}` and its backward reconstruction :math:`x_i + \Delta(t_i \to t_{i+1} \mid x_i)`
(with :math:`\gamma = 1` a leapfrog: :math:`x_{i-1} = x_{i+1} - \Delta(t_i\to t_{i+1}) +
\Delta(t_i \to t_{i-1})`). The recursion carries two states and costs one evaluation per step.
Given the last *pair* :math:`(x_0, x_1)` it runs backwards exactly,

.. math::
    x_{i+1} = \big[x_{i-1} - (1-\gamma)\,x_i + \gamma\,\Delta(t_i \to t_{i+1} \mid x_i)
              - \Delta(t_i \to t_{i-1} \mid x_i)\big] / \gamma,

so :func:`bdia_invert` recovers the starting noise :math:`x_N` up to round-off (``gamma > 0``),
where the usual DDIM inversion (stepping DDIM forwards in time with the evaluation at the start of
each step) is only first-order accurate. The increments are

* ``base="ddim"`` (Song, Meng & Ermon 2021): with :math:`y = x - m(t_i)` and the noise prediction
  :math:`\hat\varepsilon`, :math:`x_i + \Delta(t_i \to t) = \frac{\alpha_t}{\alpha_i} y +
  (\sigma_t - \frac{\alpha_t \sigma_i}{\alpha_i})\hat\varepsilon + m(t)`;
* ``base="pf_euler"``: :math:`\Delta(t_i \to t) = (t - t_i)\,v(t_i, x_i)`, with :math:`v` the
  probability-flow velocity.

::

    out = bdia_sample(model, VP(), (64, 2), nfe=50, parameterisation="eps", seed=0)
    xT = bdia_invert(model, VP(), out.x, out.x_prev, out.times, parameterisation="eps").x

Like every sampler here it is a solver for :func:`torchnde.solve` (:class:`BDIASolver`; the
second state is the solver's state), stepping a fixed grid. :math:`\gamma = 1` (the default) is
the time-symmetric leapfrog, whose inverse is the same recursion run up the grid; with
:math:`\gamma < 1` the inversion divides by :math:`\gamma` at every step (the recursion's second
root is :math:`-1/\gamma`), so its round-off grows like :math:`\gamma^{-N}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._saveat import SaveAt
from .._solve import solve
from ..controllers import StepTo
from ..solvers._base import AbstractSolver, linear_coeffs
from .parameterisation import KINDS, Parameterisation
from .processes import DiffusionProcess
from .samplers import _check_sample_shape, _initial_state, _prediction_term

__all__ = ["BDIASolver", "BDIAResult", "bdia_sample", "bdia_invert", "BDIA_BASES"]

#: the deterministic one-evaluation samplers BDIA can wrap
BDIA_BASES = ("ddim", "pf_euler")


@dataclass
class BDIAResult:
    """What :func:`bdia_sample` and :func:`bdia_invert` return.

    Attributes:
        x: the last state (the sample at ``times[-1]``, or the recovered noise at ``times[0]``).
        x_prev: the state one grid time before it (the second of BDIA's two states; what
            :func:`bdia_invert` needs with ``x``).
        times: the grid of the sampling direction, decreasing (``times[0]`` the noise's time).
        nfe: model evaluations made.
    """

    x: torch.Tensor
    x_prev: torch.Tensor
    times: torch.Tensor
    nfe: int


class BDIASolver(AbstractSolver):
    """One BDIA step per :func:`torchnde.solve` step (see the module docstring).

    The term is an ``ODETerm`` whose vector field returns the model's prediction of ``term_kind``
    (converted here to the noise or the probability-flow velocity). Fixed grids, shared times
    only. In the sampling direction (decreasing times) the first step is the base sampler's; with
    ``invert=True`` the solve runs up the grid from the pair ``start = (x_prev, t_prev)`` (the
    state one grid time *below* the solve's start) and every step is the exact inverse.

    Args:
        process: the forward process.
        base: ``"ddim"`` or ``"pf_euler"``.
        gamma: BDIA's :math:`\\gamma` in ``(0, 1]`` (0 is the base sampler itself, not invertible).
        term_kind: what the term's vector field returns (one of
            :data:`~torchnde.generative.parameterisation.KINDS`).
        invert: run the inverse recursion (needs ``start``).
        start: ``(x_prev, t_prev)`` for ``invert=True``.
    """

    order: ClassVar = 1
    dense_order: ClassVar = 1

    def __init__(
        self,
        process: DiffusionProcess,
        *,
        base: str = "ddim",
        gamma: float = 1.0,
        term_kind: str = "eps",
        invert: bool = False,
        start=None,
    ):
        if not isinstance(process, DiffusionProcess):
            raise TypeError(f"process must be a DiffusionProcess such as VP(), got {type(process).__name__}")
        if base not in BDIA_BASES:
            raise ValueError(f"unknown BDIA base sampler {base!r}; choose one of {BDIA_BASES}")
        gamma = float(gamma)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if invert and gamma == 0.0:
            raise ValueError("BDIA with gamma=0 is the base sampler, which has no exact inverse; use gamma > 0")
        if term_kind not in KINDS:
            raise ValueError(f"unknown term_kind {term_kind!r}; choose one of {KINDS}")
        if invert and start is None:
            raise ValueError("invert=True needs start=(x_prev, t_prev), the state one grid time below the start")
        self.process, self.base, self.gamma, self.term_kind = process, base, gamma, term_kind
        self.invert, self.start = bool(invert), start
        self._param = Parameterisation(term_kind, process)

    def __repr__(self):
        return f"BDIASolver(base={self.base!r}, gamma={self.gamma}, invert={self.invert})"

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def init(self, term, t0, y0):
        if self.invert:
            x_prev, t_prev = self.start
            return (x_prev, float(t_prev))
        return (None, None)

    def _prediction(self, term, s: float, x):
        sg = term.sign
        out = term.vf(sg * s, term.flat.tree_to_state(x))
        out = term.flat.state_to_tree(-out if sg < 0 else out)
        return self._param.convert("eps" if self.base == "ddim" else "velocity", s, x, out)

    def _delta(self, s: float, t: float, x, out):
        r""":math:`\Delta(s \to t \mid x)` from the evaluation ``out`` at ``(s, x)``."""
        if self.base == "pf_euler":
            return (t - s) * out
        p = self.process
        (a_s, s_s), (a_t, s_t) = p.marginal(s), p.marginal(t)
        m_s, m_t = p.mean_offset(s, x), p.mean_offset(t, x)
        r = a_t / a_s
        return (r - 1.0) * (x - m_s) + (s_t - r * s_s) * out + (m_t - m_s)

    def step(self, term, t0, t1, y0, state):
        if not isinstance(t0, float):
            raise NotImplementedError("BDIA does not support per_sample=True (use a shared time grid)")
        sg = term.sign
        s, t = sg * float(t0), sg * float(t1)
        x = term.flat.state_to_tree(y0)
        x_prev, t_prev = state
        out = self._prediction(term, s, x)
        g = self.gamma
        if x_prev is None:  # the first sampling step: the base sampler's
            x1 = x + self._delta(s, t, x, out)
        elif not self.invert:
            x1 = g * x_prev + (1 - g) * x - g * self._delta(s, t_prev, x, out) + self._delta(s, t, x, out)
        else:
            x1 = (x_prev - (1 - g) * x + g * self._delta(s, t, x, out) - self._delta(s, t_prev, x, out)) / g
        y1 = term.flat.tree_to_state(x1)
        return y1, None, (y0, y1), (x, s), None

    def dense_coeffs(self, term, dense_info):
        return linear_coeffs(*dense_info)


def _grid(process, nfe, times):
    if times is not None:
        grid = torch.as_tensor(times, dtype=torch.float64).detach().cpu().reshape(-1)
    else:
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 2:
            raise ValueError(f"BDIA needs nfe=... an int >= 2 (one evaluation per step), got {nfe!r}")
        grid = process.times(nfe)
    if grid.numel() < 3 or not (grid[1:] < grid[:-1]).all():
        raise ValueError("times must be a strictly decreasing grid of at least three times (two steps)")
    return grid


def bdia_sample(
    model,
    process: DiffusionProcess,
    shape,
    *,
    nfe: int | None = None,
    parameterisation: str = "score",
    base: str = "ddim",
    gamma: float = 1.0,
    times=None,
    x_init: torch.Tensor | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> BDIAResult:
    """Sample with BDIA (``nfe`` steps of one evaluation on ``process.times(nfe)``, or the
    decreasing grid ``times``) from a prior draw (``seed``) or ``x_init``.

    Returns a :class:`BDIAResult`: the sample ``x``, the state ``x_prev`` one grid time before it,
    the grid and the evaluations made; :func:`bdia_invert` maps ``(x, x_prev)`` back to the
    starting state exactly.
    """
    grid = _grid(process, nfe, times)
    shape = _check_sample_shape(model, shape)
    if x_init is None and seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    x = _initial_state(process, shape, x_init, seed, dtype, device)
    term, predict = _prediction_term(model, process, parameterisation)
    step = BDIASolver(process, base=base, gamma=gamma, term_kind=parameterisation)
    sol = solve(
        term,
        step,
        float(grid[0]),
        float(grid[-1]),
        x,
        controller=StepTo(grid),
        saveat=SaveAt(steps=True),
        max_steps=grid.numel() + 8,
    )
    return BDIAResult(x=sol.ys[-1], x_prev=sol.ys[-2], times=grid, nfe=predict.calls)


def bdia_invert(
    model,
    process: DiffusionProcess,
    x: torch.Tensor,
    x_prev: torch.Tensor,
    times,
    *,
    parameterisation: str = "score",
    base: str = "ddim",
    gamma: float = 1.0,
) -> BDIAResult:
    """Invert :func:`bdia_sample`: from its last two states ``x`` (at ``times[-1]``) and
    ``x_prev`` (at ``times[-2]``) run BDIA's recursion back up the grid ``times`` (decreasing, as
    :attr:`BDIAResult.times`) to the state at ``times[0]`` (``len(times) - 2`` evaluations).

    Returns a :class:`BDIAResult` whose ``x`` is the recovered start and ``x_prev`` the state at
    ``times[1]``. ``model``, ``process``, ``base``, ``gamma`` and the grid must be those of the
    sampling; the result is exact up to round-off (use float64 for ~1e-12)."""
    grid = _grid(process, None, times)
    if x.shape != x_prev.shape:
        raise ValueError(f"x and x_prev must have the same shape, got {tuple(x.shape)} and {tuple(x_prev.shape)}")
    term, predict = _prediction_term(model, process, parameterisation)
    up = grid.flip(0)
    step = BDIASolver(process, base=base, gamma=gamma, term_kind=parameterisation, invert=True, start=(x, float(up[0])))
    sol = solve(
        term,
        step,
        float(up[1]),
        float(up[-1]),
        x_prev,
        controller=StepTo(up[1:]),
        saveat=SaveAt(steps=True),
        max_steps=grid.numel() + 8,
    )
    ys = sol.ys
    return BDIAResult(x=ys[-1], x_prev=ys[-2] if ys.shape[0] > 1 else x_prev, times=grid, nfe=predict.calls)
