"""``solve(..., compile=True)``: the solver's step, with the vector field, through ``torch.compile``.

What is compiled is one step of an explicit Runge--Kutta method on an ODE (all its stages, the
vector-field evaluations, the stage combinations, the error estimate and, for a
:class:`~torchnde.PIDController` with the RMS norm, the error's scaled norm, handed to the
controller) as one graph (``fullgraph=True``). The loop around it (step-size decisions, saving,
events, dense output) stays eager; when nothing uses the steps' dense information the graph does
not return it.

How the compiled code is reused. ``torch.compile`` keeps its compiled graphs on the *code
object* of the function it compiles, behind guards (on shapes, dtypes, devices, the attributes
the trace read). This module gives each (solver class, vector-field code, device type, variant)
a code object of its own (:func:`_entry`), so that

* a training loop re-solving the same problem (a new solver object, a new ``ODETerm``, a new
  batch of the same shape each iteration, updated parameters) finds the graph of the first solve
  and compiles nothing more;
* a different problem gets its own graphs and does not use up the recompile limit of another.

Two things are kept out of the graph so that nothing in it changes from step to step:

* times: the loop's shared-mode times are Python floats, which ``torch.compile`` would bake into
  the graph as constants (a recompilation each step). They enter as 0-d tensors of the state's
  real dtype, as per-sample times always do; ``t`` reaches the vector field as
  that tensor (``ODETerm(..., time_as_float=True)`` is not supported compiled);
* counting: the term seen inside the graph (:class:`_Traced`) counts its evaluations while it is
  traced; the count is a constant of the graph, returned with the step and added to the solve's
  ``nfe`` outside. The one-time check of the vector field's output is done eagerly before the
  first compiled step (the loop's ``solver.init``, or one eager step).

A step that cannot be compiled (no C++ compiler for inductor on CPU, no triton on GPU, a vector
field ``torch.compile`` cannot trace as one graph) is not an error: the solve warns once per
(solver, vector field) pair and runs that pair eagerly from then on. Terms and solvers the compiled
path does not cover (SDEs, CDE paths, implicit and Rosenbrock solvers) run eagerly with a warning.
"""

from __future__ import annotations

import types
import warnings

import torch

from ._flat import _FlatTerm
from ._terms import ODETerm, _SumODE, time_dtype
from .controllers import PIDController
from .controllers._pid import _RMS, rms_norm
from .solvers._base import AbstractERK, LazyDerivative

__all__ = ["compiled_step", "clear_cache"]

#: the ``torch.compile`` backend (tests use ``"eager"`` to check the caching without inductor's cost)
_BACKEND = "inductor"


def _options(device_type: str) -> dict | None:
    """inductor's options: on CPU the wrapper that calls the kernels is C++ (``cpp_wrapper``),
    which takes a quarter or more off a small step's time (measured in benchmarks/compiled.md);
    elsewhere inductor's defaults (no CUDA graphs: the loop keeps the outputs of earlier steps,
    which a replayed graph would overwrite)."""
    if _BACKEND != "inductor":
        return None
    return {"cpp_wrapper": True} if device_type == "cpu" else None


# (solver class, vector-field key, device type, backend) -> _Entry: a code object per entry (see
# the docstring). Code objects cannot be weakly referenced, so the cache is bounded instead: past
# _CACHE_SIZE entries the oldest is dropped, and its compiled graphs with its code object.
_CACHE: dict = {}
_CACHE_SIZE = 64
_COUNT = 0  # entries made so far (their code objects' names)


def clear_cache() -> None:
    """Forget the compiled steps (their graphs are dropped with their code objects)."""
    _CACHE.clear()


class _Traced:
    """The term a solver sees inside the compiled step: ``_FlatTerm.vf`` without the counting in
    the solve's statistics and the output check (both done outside the graph)."""

    rough = False
    __slots__ = ("term", "flat", "args", "sign", "batched", "calls")

    def __init__(self, term, flat, args, sign, batched):
        self.term, self.flat, self.args, self.sign, self.batched = term, flat, args, sign, batched
        self.calls = 0

    def vf(self, t, y):
        self.calls += 1  # at trace time: a constant of the graph
        neg = self.sign < 0
        out = self.term.vf(-t if neg else t, self.flat.state_to_tree(y), self.args)
        out = self.flat.tree_to_state(out)
        return -out if neg else out


def _step(solver, term, flat, args, sign, batched, t0, t1, y, f0, lazy_t, lazy_y, tols, dense):
    """One solver step on the traced term; what the compiled function runs.

    ``f0`` is the start derivative, or ``None`` when the loop holds it unevaluated (a
    :class:`LazyDerivative` at ``(lazy_t, lazy_y)``): it is evaluated here, inside the graph.
    The step's own unevaluated end derivative (non-FSAL methods) leaves the graph as its state
    (``lazy_next``) and the positions in ``dinfo`` that held it (``lazy_at``); the caller
    rebuilds one :class:`LazyDerivative` on the eager term for them.

    With ``tols = (rtol, atol)`` (a :class:`~torchnde.PIDController` with the RMS norm) the
    error estimate's scaled norm is computed here too, as the controller computes it
    (``PIDController._scaled_norm``), so that the loop's step-size decision costs no further
    tensor operations.
    """
    tt = _Traced(term, flat, args, sign, batched)
    f0_made = None  # the start derivative when it is evaluated here (the caller keeps it)
    if f0 is None:
        f0 = f0_made = tt.vf(lazy_t, lazy_y)
    y1, y_err, dinfo, s1, code = solver.step(tt, t0, t1, y, f0)
    if not dense:  # nothing asks for the step's dense output: fewer outputs (and none aliasing inputs)
        dinfo = None
    lazy_next = None
    if isinstance(s1, LazyDerivative):
        lazy_next, s1 = s1.y, None
    lazy_at = ()
    if isinstance(dinfo, tuple):
        lazy_at = tuple(i for i, x in enumerate(dinfo) if isinstance(x, LazyDerivative))
        if lazy_at:
            dinfo = tuple(None if i in lazy_at else x for i, x in enumerate(dinfo))
    norm = None
    if tols is not None and y_err is not None:
        m = torch.maximum(y.detach().abs(), y1.detach().abs())
        norm = torch.linalg.vector_norm(y_err.detach() / torch.addcmul(tols[1], m, tols[0]), dim=-1)
    return y1, y_err, dinfo, s1, code, tt.calls, f0_made, lazy_next, lazy_at, norm


class _Entry:
    """One compiled step function (its own code object) and whether compiling it failed."""

    __slots__ = ("fn", "failed", "name")

    def __init__(self, name: str, device_type: str):
        code = _step.__code__.replace(co_name=name, co_qualname=name)
        fresh = types.FunctionType(code, _step.__globals__, name)
        self.fn = torch.compile(fresh, backend=_BACKEND, fullgraph=True, options=_options(device_type))
        self.failed = False
        self.name = name


def _vf_key(term):
    """What identifies a vector field across solves: its code (a function or lambda, so a new
    closure over the same model each iteration still matches) or its type (a module)."""
    if isinstance(term, _SumODE):  # a sum of ODE terms: its parts
        return tuple(_vf_key(part) for part in term.terms)
    vf = term.vector_field if isinstance(term, ODETerm) else term
    fn = getattr(vf, "__func__", vf)  # bound methods: the function
    code = getattr(fn, "__code__", None)
    return code if code is not None else type(vf)


def _entry(solver, term, device_type: str, variant: tuple) -> _Entry:
    """The entry of (solver class, vector field, device type); ``variant`` (grad mode, fused
    error norm, dense output) splits it further, so that the variants one problem needs (a
    forward solve with gradients, a no-grad replay, a backward solve) do not share the recompile
    limit of one code object."""
    key = (type(solver), _vf_key(term), device_type, _BACKEND, variant)
    entry = _CACHE.get(key)
    if entry is None:
        global _COUNT
        _COUNT += 1
        if len(_CACHE) >= _CACHE_SIZE:
            del _CACHE[next(iter(_CACHE))]
        entry = _CACHE[key] = _Entry(f"torchnde_step_{type(solver).__name__}_{_COUNT}", device_type)
    return entry


def _unsupported(solver, term) -> str | None:
    """Why the compiled path does not cover this solve (``None`` if it does)."""
    if not isinstance(term, _FlatTerm):
        return f"only ODE terms are compiled (got {type(term).__name__}: an SDE or another term)"
    if not isinstance(solver, AbstractERK):
        return f"only explicit Runge-Kutta solvers are compiled (got {solver!r})"
    if _wants_float(term.term) and not term.batched:
        return "a term with time_as_float=True (its vector field wants Python-float times)"
    return None


def _wants_float(term) -> bool:
    """Whether a vector field of the term takes Python-float times (a sum: any of its parts)."""
    if isinstance(term, _SumODE):
        return any(_wants_float(part) for part in term.terms)
    return bool(getattr(term, "time_as_float", False))


def compiled_step(solver, term, problem):
    """The step function the loop calls (``solver.step``'s signature), compiled.

    Falls back to ``solver.step`` with a warning where the solve is not covered (see the module
    docstring).
    """
    why = _unsupported(solver, term)
    if why is not None:
        warnings.warn(f"solve(..., compile=True): {why}; this solve runs eagerly", stacklevel=4)
        return solver.step
    controller = problem.controller
    if not (isinstance(controller, PIDController) and controller.norm is rms_norm):
        controller = None  # (other norms: the controller computes them eagerly)
    saveat = problem.saveat
    # the steps' dense information is used only to save between step ends and to locate events
    dense = saveat.ts is not None or bool(saveat.steps) or bool(saveat.dense) or bool(problem.events)
    variant = (torch.is_grad_enabled(), controller is not None, dense)
    entry = _entry(solver, term.term, term.flat.device.type, variant)
    return _CompiledStep(solver, term, entry, controller, dense)


def _as_time(t, dtype, device):
    return t if isinstance(t, torch.Tensor) else torch.full((), t, dtype=dtype, device=device)


class _CompiledStep:
    """``solver.step(term, t0, t1, y, state)`` through the entry's compiled function."""

    __slots__ = ("solver", "entry", "tdtype", "device", "prepared", "controller", "tols", "last", "dense")

    def __init__(self, solver, term, entry, controller, dense):
        self.solver, self.entry, self.controller, self.dense = solver, entry, controller, dense
        like = torch.empty(0, dtype=time_dtype(term.flat.dtype), device=term.flat.device)
        self.tols = None if controller is None else controller._tolerances(like)  # (rtol, atol) 0-d tensors
        flat = term.flat
        self.tdtype, self.device = time_dtype(flat.dtype), flat.device
        self.prepared = False
        self.last = (None, None)  # the last step's end time and its tensor (the next start, usually)

    def __call__(self, term, t0, t1, y, state):
        solver, entry = self.solver, self.entry
        if entry.failed or not term.checked:
            # the first evaluation checks the vector field's output eagerly (clear messages)
            return solver.step(term, t0, t1, y, state)
        if not self.prepared:  # the tableau's coefficient tensors exist before tracing
            solver.tableau.tensors(y.dtype, y.device)
            self.prepared = True
        lazy = state if isinstance(state, LazyDerivative) else None
        f0, lazy_t, lazy_y = state, None, None
        if lazy is not None:
            f0 = lazy.f
            if f0 is None:
                lazy_t = _as_time(lazy.t, self.tdtype, self.device)
                lazy_y = lazy.y
        if isinstance(t0, torch.Tensor):  # per-sample times are tensors already
            tt0, tt1 = t0, t1
        else:
            last_t, last_tt = self.last
            tt0 = last_tt if t0 == last_t else torch.full((), t0, dtype=self.tdtype, device=self.device)
            tt1 = torch.full((), t1, dtype=self.tdtype, device=self.device)
            self.last = (t1, tt1)
        try:
            out = entry.fn(
                solver,
                term.term,
                term.flat,
                term.args,
                term.sign,
                term.batched,
                tt0,
                tt1,
                y,
                f0,
                lazy_t,
                lazy_y,
                self.tols,
                self.dense,
            )
        except Exception as err:  # noqa: BLE001 - any failure to compile: eager from here on
            entry.failed = True
            warnings.warn(
                f"solve(..., compile=True): torch.compile could not compile the {type(solver).__name__} step "
                f"with this vector field ({type(err).__name__}: {_first_line(err)}); running it eagerly",
                stacklevel=3,
            )
            return solver.step(term, t0, t1, y, state)
        y1, y_err, dinfo, s1, code, calls, f0, lazy_next, lazy_at, norm = out
        term.nfe += calls
        if norm is not None:  # the controller's next _scaled_norm(y_err, ...) is this one
            self.controller._pre = (y_err, _RMS(norm, y_err.shape[-1]))
        if lazy is not None and lazy.f is None:
            lazy.f = f0  # as eagerly: a rejected step's retry reuses the start derivative
        if lazy_next is not None or lazy_at:
            nxt = LazyDerivative(term, t1, y1 if lazy_next is None else lazy_next)
            if lazy_next is not None:
                s1 = nxt
            if lazy_at:
                dinfo = tuple(nxt if i in lazy_at else x for i, x in enumerate(dinfo))
        if not isinstance(t0, torch.Tensor) and isinstance(dinfo, tuple) and len(dinfo) > 2:
            # ERK dense information starts with (t0, t1): the loop's float times again
            dinfo = (t0, t1, *dinfo[2:])
        return y1, y_err, dinfo, s1, code


def _first_line(err) -> str:
    s = str(err).strip().splitlines()
    return s[0][:300] if s else ""
