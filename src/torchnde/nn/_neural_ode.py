"""``NeuralODE``: a vector-field module and a solve, packaged as one ``nn.Module``."""

from __future__ import annotations

import inspect
import numbers

from torch import nn

from .._saveat import SaveAt
from .._solution import Solution
from .._solve import solve
from .._terms import ODETerm
from ..adjoints import AbstractAdjoint, DirectAdjoint
from ..controllers import AbstractController, PIDController
from ..solvers import AbstractAdaptiveSolver, AbstractSolver, Tsit5

__all__ = ["NeuralODE"]


def _unwrap(module: nn.Module) -> nn.Module:
    """The module whose ``forward`` does the work: looks through ``torch.compile`` and
    ``(Distributed)DataParallel`` wrappers, whose own ``forward`` takes ``*args, **kwargs``."""
    seen = set()
    while id(module) not in seen:
        seen.add(id(module))
        inner = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = module.module
        if not isinstance(inner, nn.Module):
            break
        module = inner
    return module


def _check_solver_class(owner: str, solver) -> None:
    """A solver class given instead of an instance gets a message saying so."""
    if isinstance(solver, type):
        raise TypeError(f"{owner} expects a solver instance, got the class {solver.__name__}; use {solver.__name__}()")


def _check_controller(owner: str, controller) -> None:
    if controller is not None and not isinstance(controller, AbstractController):
        raise TypeError(
            f"{owner}(controller=...) must be ConstantStepSize() or PIDController(...), got {type(controller).__name__}"
        )


def _ode_solver(owner: str, solver):
    """``solver`` (``Tsit5()`` for ``None``), checked to be a solver instance."""
    if solver is None:
        solver = Tsit5()
    _check_solver_class(owner, solver)
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"{owner}(solver=...) must be a solver such as Tsit5(), got {type(solver).__name__}")
    return solver


def _ode_solver_and_controller(owner: str, solver, controller, dt0):
    """:func:`_ode_solver` and the controller: ``PIDController(rtol=1e-3, atol=1e-6)`` for an
    adaptive solver given none; a solver without an error estimate needs ``dt0`` (constant
    steps) or a controller, and cannot take a ``PIDController``."""
    solver = _ode_solver(owner, solver)
    adaptive = isinstance(solver, AbstractAdaptiveSolver)
    if controller is None and adaptive:
        controller = PIDController(rtol=1e-3, atol=1e-6)
    elif controller is None and dt0 is None:
        raise ValueError(
            f"{type(solver).__name__}() has no error estimate, so {owner} needs dt0=... (constant steps); "
            "or use an adaptive solver such as Tsit5()"
        )
    _check_controller(owner, controller)
    if isinstance(controller, PIDController) and not adaptive:
        raise TypeError(
            f"{type(solver).__name__}() has no error estimate, so it cannot be used with PIDController; "
            "pass dt0=... for constant steps or use an adaptive solver such as Tsit5()"
        )
    return solver, controller


def _check_adjoint_and_max_steps(owner: str, adjoint, max_steps):
    """The checks every module here makes of ``adjoint`` and ``max_steps``; returns the adjoint
    (``DirectAdjoint()`` for ``None``)."""
    if adjoint is None:
        adjoint = DirectAdjoint()
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            f"{owner}(adjoint=...) must be an adjoint such as DirectAdjoint(), got {type(adjoint).__name__}"
        )
    if max_steps is not None and (not isinstance(max_steps, numbers.Integral) or max_steps < 1):
        raise ValueError(f"{owner}(max_steps=...) must be a positive int or None, got {max_steps!r}")
    return adjoint


def _check_module(vector_field):
    if not isinstance(vector_field, nn.Module):
        kind = "a function" if callable(vector_field) else type(vector_field).__name__
        raise TypeError(
            f"NeuralODE needs the vector field as an nn.Module (so that its parameters are registered); "
            f"got {kind}. For a plain function f(t, y, args) use torchnde.solve(ODETerm(f), ...)"
        )


def _vector_field_arity(module: nn.Module) -> int:
    """2 if ``module`` is called as ``module(t, y)``, 3 if as ``module(t, y, args)``."""
    forward = _unwrap(module).forward
    name = type(_unwrap(module)).__name__
    try:
        sig = inspect.signature(forward)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"NeuralODE could not read the signature of {name}.forward ({e}); the vector field's "
            "forward must take (t, y) or (t, y, args)"
        ) from None
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    var_positional = any(p.kind is p.VAR_POSITIONAL for p in params)
    kw_required = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    shown = f"{name}.forward{sig}"
    if kw_required or len(required) > 3 or (len(positional) < 2 and not var_positional):
        raise TypeError(
            f"NeuralODE needs a vector field whose forward takes (t, y) or (t, y, args); got {shown}. "
            "Wrap a network of y alone, e.g. `def forward(self, t, y): return self.net(y)`"
        )
    return 3 if (var_positional or len(positional) >= 3) else 2


class _FieldModule(nn.Module):
    """Base of the modules here: the attributes named in ``_fields`` hold vector-field modules,
    each checked by :meth:`_check_field` and with its calling convention, ``(t, y)`` or
    ``(t, y, args)``, read once whenever it is (re)set."""

    _fields: tuple = ()

    def _check_field(self, name: str, value) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __setattr__(self, name, value):
        if name in self._fields:
            self._check_field(name, value)
            arity = _vector_field_arity(value)
            super().__setattr__(name, value)
            object.__setattr__(self, f"_{name}_arity", arity)
        else:
            super().__setattr__(name, value)

    def _call(self, name: str, t, y, args):
        field = getattr(self, name)
        return field(t, y) if getattr(self, f"_{name}_arity") == 2 else field(t, y, args)


class NeuralODE(_FieldModule):
    r"""A neural ODE :math:`\dot y = f_\theta(t, y)` as an ``nn.Module``.

    ``NeuralODE(f)(y0, t0, t1)`` solves the ODE from ``y0`` with :func:`torchnde.solve` and
    returns its :class:`~torchnde.Solution`; the states are ``.ys`` (shape ``(T, *y0.shape)``,
    one row per saved time: by default only ``t1``, so ``model(y0).ys[-1]`` is the final state).

    The vector field is registered as the submodule ``vector_field``, so ``parameters()``,
    ``state_dict()``/``load_state_dict()``, ``.to(...)``, optimisers,
    :func:`torch.func.functional_call` and ``DistributedDataParallel`` see its parameters.

    **Calling convention.** The signature of ``vector_field.forward`` is inspected once (when the
    vector field is set): with two positional parameters it is called as
    ``vector_field(t, y)``; with three (or ``*args``) as ``vector_field(t, y, args)``, receiving
    the ``args`` passed to :meth:`forward`. Anything else raises ``TypeError``. ``t`` is a 0-d
    tensor with ``y0``'s (real) dtype and device (as for :class:`~torchnde.ODETerm`) and ``y``
    has the structure of ``y0`` (a tensor, or a dict/tuple/list of tensors). The signature is
    read through ``torch.compile`` and ``DataParallel`` wrappers, so
    ``model.vector_field = torch.compile(model.vector_field)`` works (as does
    ``model.vector_field.compile()``, which keeps the ``state_dict`` keys).

    Args:
        vector_field: an ``nn.Module`` computing :math:`f_\theta(t, y)` (see above).
        solver: the solver (default ``Tsit5()``).
        controller: the step-size controller. Default: ``PIDController(rtol=1e-3, atol=1e-6)``
            for an adaptive solver; a solver without an error estimate (``Euler()``, ``RK4()``,
            ...) needs ``dt0`` and then takes constant steps.
        adjoint: how gradients are computed (default ``DirectAdjoint()``: backpropagate through
            the solver's operations). ``BacksolveAdjoint()`` and ``CheckpointAdjoint()`` trade
            compute for memory.
        saveat: what to save (default ``SaveAt(t1=True)``); :meth:`forward` can override it.
        dt0: the initial step size (with constant steps: every step), signed like ``t1 - t0``.
        max_steps: the most steps a solve may take (``None``: no limit); a solve that needs more
            raises :class:`~torchnde.SolveError`.

    Example:
        >>> import torch, torchnde as tn
        >>> from torchnde.nn import NeuralODE
        >>> class Field(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
        ...     def forward(self, t, y):
        ...         return self.net(y)
        >>> model = NeuralODE(Field(), saveat=tn.SaveAt(ts=torch.linspace(0, 1, 5)))
        >>> sol = model(torch.randn(16, 2))          # t0=0.0, t1=1.0
        >>> sol.ys.shape                              # (len(ts), *y0.shape)
        torch.Size([5, 16, 2])
        >>> sol.ys.square().mean().backward()         # gradients reach model.parameters()
    """

    def __init__(
        self,
        vector_field: nn.Module,
        solver: AbstractSolver | None = None,
        controller: AbstractController | None = None,
        adjoint: AbstractAdjoint | None = None,
        saveat: SaveAt | None = None,
        dt0=None,
        max_steps: int | None = 4096,
    ):
        super().__init__()
        _check_module(vector_field)
        solver, controller = _ode_solver_and_controller("NeuralODE", solver, controller, dt0)
        adjoint = _check_adjoint_and_max_steps("NeuralODE", adjoint, max_steps)
        if saveat is None:
            saveat = SaveAt(t1=True)
        if not isinstance(saveat, SaveAt):
            raise TypeError(f"NeuralODE(saveat=...) must be a SaveAt(...), got {type(saveat).__name__}")
        self.vector_field = vector_field
        self.solver = solver
        self.controller = controller
        self.adjoint = adjoint
        self.saveat = saveat
        self.dt0 = dt0
        self.max_steps = max_steps

    _fields = ("vector_field",)

    def _check_field(self, name, value):
        _check_module(value)

    def _vf(self, t, y, args):
        return self._call("vector_field", t, y, args)

    def forward(self, y0, t0=0.0, t1=1.0, args=None, saveat: SaveAt | None = None) -> Solution:
        """Solve from ``y0`` at ``t0`` to ``t1``.

        Args:
            y0: the initial state: a tensor (any shape; a batch is just leading dimensions) or a
                dict/tuple/list of tensors.
            t0, t1: start and end times (floats or 0-d tensors); ``t1 < t0`` integrates backwards.
            args: passed as the third argument of a vector field ``forward(t, y, args)``; must be
                ``None`` for a ``forward(t, y)``.
            saveat: overrides the ``saveat`` given at construction for this call.

        Returns:
            The :class:`~torchnde.Solution`: ``.ys`` holds the saved states (``(T, *y0.shape)``),
            ``.ts`` the saved times, ``.stats`` and ``.result`` what happened.
        """
        if args is not None and self._vector_field_arity == 2:
            raise TypeError(
                f"args=... was given but the vector field {type(_unwrap(self.vector_field)).__name__}.forward takes "
                "(t, y) and would ignore it; give it a third parameter, forward(self, t, y, args)"
            )
        return solve(
            ODETerm(self._vf),
            self.solver,
            t0,
            t1,
            y0,
            dt0=self.dt0,
            args=args,
            saveat=self.saveat if saveat is None else saveat,
            controller=self.controller,
            adjoint=self.adjoint,
            max_steps=self.max_steps,
        )

    def extra_repr(self) -> str:
        parts = [f"solver={self.solver!r}", f"controller={self.controller!r}", f"adjoint={self.adjoint!r}"]
        if self.dt0 is not None:
            parts.append(f"dt0={self.dt0!r}")
        return ", ".join(parts)
