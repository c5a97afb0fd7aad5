"""``NeuralCDE``: a neural controlled differential equation as one ``nn.Module``."""

from __future__ import annotations

from torch import nn

from .._saveat import SaveAt
from .._solution import Solution
from .._solve import solve
from .._terms import ControlTerm, ODETerm, check_control_shapes, user_time
from ..adjoints import AbstractAdjoint
from ..controllers import AbstractController, PIDController
from ..paths import AbstractPath
from ..paths._interp import _PiecewisePolynomial
from ..solvers import AbstractAdaptiveSolver, AbstractSolver
from ._neural_ode import _check_adjoint_and_max_steps, _check_controller, _FieldModule, _ode_solver, _unwrap

__all__ = ["NeuralCDE"]


def _check(module, what: str, optional: bool = False):
    if module is None and optional:
        return
    if not isinstance(module, nn.Module):
        kind = "a function" if callable(module) else type(module).__name__
        raise TypeError(
            f"NeuralCDE needs {what} as an nn.Module (so that its parameters are registered); got {kind}"
            + (
                ". Wrap a function f as a module, e.g. nn.Identity() or a small nn.Module subclass"
                if callable(module)
                else ""
            )
        )


class _CDEField:
    """``f(t, z, args) dX/dt`` with the path's derivative coefficients read from ``args``:
    the ODE that ``ControlTerm(f, path)`` on a smooth path amounts to."""

    def __init__(self, vf, path):
        self.vf, self.path = vf, path
        self.__name__ = type(path).__name__
        self.checked = False

    def __call__(self, t, z, args):
        # the path reads the loop's float time, the user's module a 0-d tensor (see ODETerm)
        user_args, dcoeffs = args
        dX = self.path._poly(dcoeffs, t, False)
        g = self.vf(user_time(t, z), z, user_args)
        if not self.checked:
            check_control_shapes("the NeuralCDE vector field", "general", g, z, dX)
            self.checked = True
        return (g @ dX.unsqueeze(-1)).squeeze(-1)


class NeuralCDE(_FieldModule):
    r"""A neural controlled differential equation (Kidger, Morrill, Foster & Lyons 2020).

    .. math::
        z(t_0) = \zeta_\theta(X(t_0)), \qquad
        z(t) = z(t_0) + \int_{t_0}^{t} f_\theta(s, z(s))\,dX(s), \qquad
        \text{output} = \ell_\theta(z(t_1)),

    where :math:`X` is a path interpolating the data (e.g.
    :class:`~torchnde.paths.HermiteCubic`), :math:`f_\theta` (``vector_field``) maps the hidden
    state to a ``(hidden, channels)`` matrix, :math:`\zeta_\theta` is ``initial`` and
    :math:`\ell_\theta` is ``readout``. The CDE is solved as the ODE
    :math:`\dot z = f_\theta(t, z)\,\dot X(t)` (``ControlTerm(f, X)``) by :func:`torchnde.solve`,
    so every solver, controller and adjoint works.

    **Calling convention of the vector field** (as for :class:`~torchnde.nn.NeuralODE`): its
    ``forward`` takes ``(t, z)`` or ``(t, z, args)`` and returns a tensor of shape
    ``(*z.shape, channels)``, i.e. ``(..., hidden, channels)``; ``t`` is a 0-d tensor with the
    dtype and device of ``z`` (a ``(batch,)`` tensor with ``per_sample=True``).

    Args:
        vector_field: the ``nn.Module`` :math:`f_\theta` (see above). A final ``tanh`` keeps
            the solution well behaved (Kidger et al. 2020).
        initial: ``nn.Module`` mapping ``X(t0)`` (``(..., channels)``) to ``z0`` (``(..., hidden)``),
            e.g. ``nn.Linear(channels, hidden)``.
        readout: ``nn.Module`` applied to the saved hidden states (default: none, the states
            themselves), e.g. ``nn.Linear(hidden, classes)``.
        solver: default ``Tsit5()``.
        controller: default, per call, ``PIDController(rtol=1e-3, atol=1e-6, jump_ts=path.ts)``
            (steps land on the knots, where the derivative of a linear or rectilinear path jumps).
            A controller given here is used as is: pass ``jump_ts`` yourself if needed. A
            solver without an error estimate (``RK4()``, ...) needs ``dt0``.
        adjoint: default ``DirectAdjoint()``; ``CheckpointAdjoint()``/``BacksolveAdjoint()`` save
            memory (the backward solve of ``BacksolveAdjoint`` is most accurate on C1 paths:
            :class:`~torchnde.paths.HermiteCubic`, :class:`~torchnde.paths.CubicSpline`).
        dt0: initial (constant-step: every) step size.
        max_steps: most steps per solve (``None``: no limit).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchnde.nn._neural_cde import NeuralCDE
        >>> from torchnde.paths._interp import HermiteCubic
        >>> class Field(nn.Module):
        ...     def __init__(self, hidden, channels):
        ...         super().__init__()
        ...         self.hidden, self.channels = hidden, channels
        ...         self.net = nn.Sequential(nn.Linear(hidden, 32), nn.Softplus(), nn.Linear(32, hidden * channels), nn.Tanh())
        ...     def forward(self, t, z):
        ...         return self.net(z).view(*z.shape, self.channels)
        >>> model = NeuralCDE(Field(8, 3), nn.Linear(3, 8), nn.Linear(8, 2))
        >>> ts = torch.linspace(0, 1, 20)
        >>> X = HermiteCubic(ts, torch.randn(16, 20, 3))
        >>> model(X).shape                           # readout of z(t1)
        torch.Size([16, 2])
    """

    def __init__(
        self,
        vector_field: nn.Module,
        initial: nn.Module,
        readout: nn.Module | None = None,
        *,
        solver: AbstractSolver | None = None,
        controller: AbstractController | None = None,
        adjoint: AbstractAdjoint | None = None,
        dt0=None,
        max_steps: int | None = 4096,
    ):
        super().__init__()
        _check(initial, "initial (the map from X(t0) to z0)")
        _check(readout, "readout", optional=True)
        solver = _ode_solver("NeuralCDE", solver)
        adaptive = isinstance(solver, AbstractAdaptiveSolver)
        if controller is None and not adaptive and dt0 is None:
            raise ValueError(
                f"{type(solver).__name__}() has no error estimate, so NeuralCDE needs dt0=... (constant steps); "
                "or use an adaptive solver such as Tsit5()"
            )
        _check_controller("NeuralCDE", controller)
        adjoint = _check_adjoint_and_max_steps("NeuralCDE", adjoint, max_steps)
        self.vector_field = vector_field
        self.initial = initial
        self.readout = readout
        self.solver = solver
        self.controller = controller
        self.adjoint = adjoint
        self.dt0 = dt0
        self.max_steps = max_steps

    _fields = ("vector_field",)

    def _check_field(self, name, value):
        _check(value, "the vector field")

    def _vf(self, t, z, args):
        return self._call("vector_field", t, z, args)

    def _controller(self, path):
        if self.controller is not None:
            return self.controller
        if not isinstance(self.solver, AbstractAdaptiveSolver):
            return None  # constant steps of dt0
        return PIDController(rtol=1e-3, atol=1e-6, jump_ts=path.ts)

    def solve(self, path: AbstractPath, saveat: SaveAt | None = None, args=None, per_sample: bool = False) -> Solution:
        """The :class:`~torchnde.Solution` of the hidden state ``z`` on ``path`` (no readout)."""
        if not isinstance(path, AbstractPath) or not path.smooth:
            raise TypeError(
                "NeuralCDE needs an interpolation of the data as its path, e.g. HermiteCubic(ts, xs); got "
                f"{type(path).__name__}"
            )
        if args is not None and self._vector_field_arity == 2:
            raise TypeError(
                f"args=... was given but the vector field {type(_unwrap(self.vector_field)).__name__}.forward takes "
                "(t, z) and would ignore it; give it a third parameter, forward(self, t, z, args)"
            )
        z0 = self.initial(path.evaluate(path.t0))
        if isinstance(path, _PiecewisePolynomial):
            # the path's derivative coefficients travel in args, so that every adjoint (also
            # BacksolveAdjoint and CheckpointAdjoint) differentiates with respect to the data
            term = ODETerm(_CDEField(self._vf, path), time_as_float=True)
            args = (args, path._dcoeffs)
        else:
            term = ControlTerm(self._vf, path)
        return solve(
            term,
            self.solver,
            path.t0,
            path.t1,
            z0,
            dt0=self.dt0,
            args=args,
            saveat=SaveAt(t1=True) if saveat is None else saveat,
            controller=self._controller(path),
            adjoint=self.adjoint,
            max_steps=self.max_steps,
            per_sample=per_sample,
        )

    def forward(self, path: AbstractPath, saveat: SaveAt | None = None, args=None):
        """Solve from ``path.t0`` to ``path.t1`` and return the readout.

        Args:
            path: the interpolated data, batch shape ``(...)``, ``C`` channels.
            saveat: ``None`` (default): return ``readout(z(t1))``, shape ``(..., out)``. A
                ``SaveAt(...)``: return ``readout`` of every saved state, shape ``(S, ..., out)``
                (``S`` saved times, as ``Solution.ys``).
            args: the third argument of a vector field ``forward(t, z, args)``.
        """
        sol = self.solve(path, saveat, args)
        zs = sol.ys[-1] if saveat is None else sol.ys
        return zs if self.readout is None else self.readout(zs)

    def extra_repr(self) -> str:
        parts = [f"solver={self.solver!r}", f"controller={self.controller!r}", f"adjoint={self.adjoint!r}"]
        if self.dt0 is not None:
            parts.append(f"dt0={self.dt0!r}")
        return ", ".join(parts)
