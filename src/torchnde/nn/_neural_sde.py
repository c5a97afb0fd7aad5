"""``NeuralSDE``: drift and diffusion modules and an SDE solve, packaged as one ``nn.Module``."""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable

import torch
from torch import nn

from .._saveat import SaveAt
from .._solution import Solution
from .._solve import solve
from .._terms import NOISE_TYPES, ControlTerm, MultiTerm, ODETerm
from ..adjoints import AbstractAdjoint
from ..controllers import AbstractController, ConstantStepSize, PIDController
from ..paths import AbstractBrownianPath
from ..solvers import AbstractAdaptiveSolver, AbstractSolver, Euler
from ._neural_ode import _check_adjoint_and_max_steps, _check_controller, _check_solver_class, _FieldModule

__all__ = ["NeuralSDE", "brownian_shape", "default_brownian"]


def _check_module(module, what: str):
    if not isinstance(module, nn.Module):
        kind = "a function" if callable(module) else type(module).__name__
        raise TypeError(
            f"NeuralSDE needs the {what} as an nn.Module (so that its parameters are registered); got {kind}. "
            "For plain functions use torchnde.solve(MultiTerm(ODETerm(f), ControlTerm(g, bm)), ...)"
        )


def brownian_shape(noise: str, y_shape, brownian_size: int | None = None) -> torch.Size:
    """The shape of the Brownian motion driving a state of shape ``y_shape`` (see
    :class:`~torchnde.ControlTerm`): ``y_shape`` for diagonal noise, ``(*y_shape[:-1], 1)`` for
    scalar noise and ``(*y_shape[:-1], brownian_size)`` for general noise."""
    y_shape = torch.Size(y_shape)
    if noise == "diagonal":
        return y_shape
    if noise == "scalar":
        return torch.Size((*y_shape[:-1], 1))
    return torch.Size((*y_shape[:-1], int(brownian_size)))


def default_brownian(t0: float, t1: float, shape, *, seed: int, dtype, device, levy_area=None, grid=None):
    """The Brownian path :class:`NeuralSDE` makes for each call.

    With ``grid`` (the exact step times of a constant-step solve, a sorted list of floats) a
    :class:`~torchnde.paths.BrownianGrid` on those times (increments sampled once, exact on
    the grid, cheapest); otherwise a :class:`~torchnde.paths.VirtualBrownianTree`, which answers
    any query (adaptive steps, rejected steps) consistently.
    """
    from ..paths._brownian import BrownianGrid, VirtualBrownianTree

    if grid is not None:
        return BrownianGrid(
            torch.tensor(grid, dtype=torch.float64),
            shape,
            levy_area=levy_area,
            seed=seed,
            dtype=dtype,
            device=device,
        )
    return VirtualBrownianTree(t0, t1, shape, levy_area=levy_area, seed=seed, dtype=dtype, device=device)


def constant_step_grid(t0: float, t1: float, dt: float, stops) -> list[float]:
    """The step times of a constant-step solve on ``[t0, t1]`` that lands on ``stops``: each
    interval between consecutive stops is cut into the fewest equal steps of at most ``dt``
    (no sliver steps next to a stop)."""
    knots = sorted({float(t0), float(t1)} | {float(s) for s in stops if t0 < s < t1})
    out = [knots[0]]
    for a, b in zip(knots, knots[1:]):
        n = max(1, math.ceil((b - a) / dt - 1e-9))
        out.extend(a + (b - a) * k / n for k in range(1, n))
        out.append(b)
    return out


def _seed_from_global_rng() -> int:
    # the path's seed is drawn from torch's global generator, so torch.manual_seed makes runs
    # reproducible while every call gets a fresh path
    return int(torch.randint(0, 2**62, (1,)).item())


class NeuralSDE(_FieldModule):
    r"""A neural SDE :math:`dy = f_\theta(t, y)\,dt + g_\theta(t, y)\circ dW(t)` as an ``nn.Module``.

    ``NeuralSDE(f, g, dt0=0.01)(y0, ts)`` solves
    ``MultiTerm(ODETerm(f), ControlTerm(g, W, noise=noise))`` with :func:`torchnde.solve` from
    ``y0`` at ``ts[0]`` and returns the states at the times ``ts``: a tensor of shape
    ``(len(ts), *y0.shape)`` (row 0 is ``y0``), the layout of ``NeuralODE(...)(...).ys``.

    Each call draws a fresh Brownian path :math:`W` whose seed comes from torch's global RNG
    (``torch.randint``), so ``torch.manual_seed`` makes runs reproducible; ``seed=`` fixes the
    path of one call and ``bm=`` passes a path. Steps land on every time in ``ts``, so the saved
    states are states of the solver (not interpolations between steps). The calculus is the
    solver's: :class:`~torchnde.Euler` solves Itô SDEs, :class:`~torchnde.Heun`,
    :class:`~torchnde.Midpoint` and :class:`~torchnde.ReversibleHeun` Stratonovich SDEs (the two
    agree for additive noise). ``calculus=`` declares it, so that a solver of the other calculus is
    refused.

    The drift and diffusion are registered as the submodules ``drift`` and ``diffusion``
    (``parameters()``, ``state_dict()``, ``.to(...)``, ``DistributedDataParallel`` work as for
    :class:`~torchnde.nn.NeuralODE`). Their ``forward`` takes ``(t, y)`` or ``(t, y, args)``;
    ``t`` is a 0-d tensor with ``y0``'s dtype and device. The diffusion returns, for a state ``y`` of shape ``(..., d)``:

    ============  ====================  ===============================
    ``noise``     diffusion's shape      Brownian motion's shape
    ============  ====================  ===============================
    "diagonal"    ``(..., d)``           ``(..., d)``
    "scalar"      ``(..., d)``           ``(..., 1)``
    "general"     ``(..., d, m)``        ``(..., m)``, ``m = brownian_size``
    ============  ====================  ===============================

    Args:
        drift: ``nn.Module`` computing :math:`f_\theta(t, y)` (shape of ``y``).
        diffusion: ``nn.Module`` computing :math:`g_\theta(t, y)` (see the table).
        noise: ``"diagonal"`` (default), ``"scalar"`` or ``"general"``.
        brownian_size: ``m`` for general noise.
        additive, commutative, calculus: declarations passed to :class:`~torchnde.ControlTerm`
            (``additive=True`` unlocks :class:`SRA1`/:class:`ShARK`; ``commutative=True`` the
            Milstein methods on general noise).
        brownian: how a call's path is made: ``None`` for :func:`default_brownian` (a
            :class:`~torchnde.paths.BrownianGrid` on the step times with constant steps, a
            :class:`~torchnde.paths.VirtualBrownianTree` with adaptive steps), or a callable
            ``brownian(t0, t1, shape, *, seed, dtype, device, levy_area, grid)`` returning an
            :class:`~torchnde.AbstractBrownianPath` (``grid`` is the list of step times when
            they are known in advance, else ``None``).
        solver: default ``Euler()`` (Euler--Maruyama, Itô).
        dt0: the largest step with constant steps: each interval between consecutive save times
            is cut into the fewest equal steps of at most ``dt0``. Needed unless an adaptive
            ``controller`` is given (then it is the first step; ``None`` picks it).
        controller: ``None`` (constant steps of ``dt0``) or ``PIDController(...)`` with an adaptive
            SDE solver (e.g. ``Heun()``).
        adjoint: default ``DirectAdjoint()``; ``ReversibleHeun()`` with ``ReversibleAdjoint()``
            gives exact gradients in constant memory.
        max_steps: the most steps a solve may take (``None``: no limit).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchnde.nn._neural_sde import NeuralSDE
        >>> class Drift(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(2, 2)
        ...     def forward(self, t, y):
        ...         return self.net(y)
        >>> class Diffusion(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.log_sigma = nn.Parameter(torch.zeros(2))
        ...     def forward(self, t, y):
        ...         return self.log_sigma.exp().expand_as(y)
        >>> model = NeuralSDE(Drift(), Diffusion(), dt0=0.05)
        >>> ys = model(torch.zeros(16, 2), torch.linspace(0, 1, 11))
        >>> ys.shape
        torch.Size([11, 16, 2])
    """

    def __init__(
        self,
        drift: nn.Module,
        diffusion: nn.Module,
        *,
        noise: str = "diagonal",
        brownian_size: int | None = None,
        additive: bool = False,
        commutative: bool = False,
        calculus: str | None = None,
        brownian: Callable | None = None,
        solver: AbstractSolver | None = None,
        dt0: float | None = None,
        controller: AbstractController | None = None,
        adjoint: AbstractAdjoint | None = None,
        max_steps: int | None = 16384,
    ):
        super().__init__()
        if noise not in NOISE_TYPES:
            raise ValueError(f"NeuralSDE(noise=...) must be one of {NOISE_TYPES}, got {noise!r}")
        if noise == "general" and not (isinstance(brownian_size, numbers.Integral) and brownian_size >= 1):
            raise ValueError(
                f"NeuralSDE(noise='general') needs brownian_size=m (the number of Brownian motions), got {brownian_size!r}"
            )
        if solver is None:
            solver = Euler()
        _check_solver_class("NeuralSDE", solver)
        if not isinstance(solver, AbstractSolver) or not solver.strong_order:
            raise TypeError(f"NeuralSDE(solver=...) must be an SDE solver such as Euler() or Heun(), got {solver!r}")
        _check_controller("NeuralSDE", controller)
        if isinstance(controller, PIDController) and not isinstance(solver, AbstractAdaptiveSolver):
            raise TypeError(
                f"{type(solver).__name__}() has no error estimate, so it cannot be used with PIDController; "
                "use Heun() (or another adaptive SDE solver) or constant steps (dt0=...)"
            )
        if dt0 is None and not isinstance(controller, PIDController):
            raise ValueError("NeuralSDE needs dt0=... (constant steps) or controller=PIDController(...)")
        if dt0 is not None and not (isinstance(dt0, numbers.Real) and dt0 > 0 and math.isfinite(dt0)):
            raise ValueError(f"NeuralSDE(dt0=...) must be a positive float, got {dt0!r}")
        adjoint = _check_adjoint_and_max_steps("NeuralSDE", adjoint, max_steps)
        if brownian is not None and not callable(brownian):
            raise TypeError(f"NeuralSDE(brownian=...) must be None or a callable making a path, got {brownian!r}")
        self.drift = drift
        self.diffusion = diffusion
        self.noise = noise
        self.brownian_size = brownian_size
        self.additive, self.commutative, self.calculus = additive, commutative, calculus
        self.brownian = brownian
        self.solver = solver
        self.dt0 = None if dt0 is None else float(dt0)
        self.controller = controller
        self.adjoint = adjoint
        self.max_steps = max_steps

    _fields = ("drift", "diffusion")

    def _check_field(self, name, value):
        _check_module(value, name)

    def _f(self, t, y, args):
        return self._call("drift", t, y, args)

    def _g(self, t, y, args):
        return self._call("diffusion", t, y, args)

    # ------------------------------------------------------------------------------------------

    def _plan(self, ts):
        """Times as floats, and the controller that lands on every save time; the step grid when
        steps are constant (known in advance)."""
        if not isinstance(ts, torch.Tensor):
            ts = torch.as_tensor(ts, dtype=torch.float64)
        ts = ts.detach()
        if ts.dim() != 1 or ts.shape[0] < 2:
            raise ValueError(f"NeuralSDE needs ts as a 1-D tensor of at least 2 times, got shape {tuple(ts.shape)}")
        times = ts.to(torch.float64).cpu()
        if not (times[1:] > times[:-1]).all():
            raise ValueError(f"NeuralSDE needs strictly increasing ts, got {times.tolist()}")
        t0, t1 = float(times[0]), float(times[-1])
        inner = times[1:-1]
        controller = copy.copy(self.controller if self.controller is not None else ConstantStepSize())
        old = controller.step_ts
        if inner.numel() or old is not None:
            controller.step_ts = torch.unique(inner if old is None else torch.cat([old.to(torch.float64), inner]))
        grid = None
        if isinstance(controller, ConstantStepSize):
            stops = [] if controller.step_ts is None else controller.step_ts.tolist()
            grid = constant_step_grid(t0, t1, self.dt0, stops)
            # land on every grid time: the steps are then exactly the grid's intervals
            controller.step_ts = torch.tensor(grid[1:-1], dtype=torch.float64)
        return ts, t0, t1, controller, grid

    def make_brownian(self, y0: torch.Tensor, t0: float, t1: float, *, seed: int | None = None, grid=None):
        """The Brownian path for a solve from ``y0`` on ``[t0, t1]`` (seeded from torch's global
        RNG unless ``seed`` is given)."""
        if seed is None:
            seed = _seed_from_global_rng()
        shape = brownian_shape(self.noise, y0.shape, self.brownian_size)
        make = default_brownian if self.brownian is None else self.brownian
        return make(
            t0, t1, shape, seed=seed, dtype=y0.dtype, device=y0.device, levy_area=self.solver.levy_area, grid=grid
        )

    def solution(self, y0: torch.Tensor, ts, *, args=None, seed: int | None = None, bm=None) -> Solution:
        """As :meth:`forward`, but returns the whole :class:`~torchnde.Solution` (``.ys``,
        ``.stats``, ``.result``)."""
        if not isinstance(y0, torch.Tensor):
            raise TypeError(f"NeuralSDE needs y0 as a tensor, got {type(y0).__name__}")
        if seed is not None and bm is not None:
            raise ValueError("pass seed=... or bm=..., not both")
        if args is not None and self._drift_arity == 2 and self._diffusion_arity == 2:
            raise TypeError(
                "args=... was given but neither the drift nor the diffusion takes it; give forward a third "
                "parameter, forward(self, t, y, args)"
            )
        ts, t0, t1, controller, grid = self._plan(ts)
        if bm is None:
            bm = self.make_brownian(y0, t0, t1, seed=seed, grid=grid)
        elif not isinstance(bm, AbstractBrownianPath):
            raise TypeError(f"NeuralSDE(..., bm=...) must be a Brownian path, got {type(bm).__name__}")
        terms = MultiTerm(
            ODETerm(self._f),
            ControlTerm(
                self._g,
                bm,
                noise=self.noise,
                additive=self.additive,
                commutative=self.commutative,
                calculus=self.calculus,
            ),
        )
        return solve(
            terms,
            self.solver,
            t0,
            t1,
            y0,
            dt0=self.dt0,
            args=args,
            saveat=SaveAt(ts=ts),
            controller=controller,
            adjoint=self.adjoint,
            max_steps=self.max_steps,
        )

    def forward(self, y0: torch.Tensor, ts, *, args=None, seed: int | None = None, bm=None) -> torch.Tensor:
        """Solve from ``y0`` at ``ts[0]`` and return the states at ``ts``.

        Args:
            y0: the initial state, a tensor (``(..., d)``; a batch is leading dimensions).
            ts: the strictly increasing save times (a 1-D tensor or sequence; not differentiated).
            args: handed to a drift/diffusion whose ``forward`` takes ``(t, y, args)``.
            seed: the seed of this call's Brownian path (default: drawn from torch's global RNG).
            bm: a Brownian path to use instead (it must cover ``[ts[0], ts[-1]]`` and have the
                shape of :func:`brownian_shape`).

        Returns:
            A tensor of shape ``(len(ts), *y0.shape)``.
        """
        return self.solution(y0, ts, args=args, seed=seed, bm=bm).ys

    def extra_repr(self) -> str:
        parts = [f"noise={self.noise!r}", f"solver={self.solver!r}", f"adjoint={self.adjoint!r}"]
        if self.dt0 is not None:
            parts.append(f"dt0={self.dt0!r}")
        if self.controller is not None:
            parts.append(f"controller={self.controller!r}")
        return ", ".join(parts)
