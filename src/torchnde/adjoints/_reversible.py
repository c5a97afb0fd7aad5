"""Exact gradients in constant memory from an algebraically reversible solver."""

from __future__ import annotations

import dataclasses

import torch

from .._terms import SDETerm
from ..controllers import ConstantStepSize
from ..controllers._base import with_step_ts
from ..solvers import AbstractAdaptiveSolver, AbstractERK
from ..solvers.reversible_heun import AbstractReversibleSolver, ReversibleHeun
from ._base import AbstractAdjoint
from ._params import check_reached, discover

__all__ = ["AbstractReversibleSolver", "ReversibleAdjoint", "ReversibleHeun"]


class _Reversible(AbstractReversibleSolver):
    """McCallum & Foster's reversible wrapper of an explicit Runge--Kutta method ``Psi``:

    ``y1 = l y0 + (1 - l) z0 + Psi_h(t0, z0)`` and ``z1 = z0 - Psi_{-h}(t1, y1)`` (``Psi`` the
    base method's increment, so ``Psi_{-h}(t1, y1)`` is a step back from ``y1``), with
    ``z0 = y0`` at the start. The state carries ``(z, f(t, z))``; a step costs two steps of the base
    method. Both maps are explicitly invertible, so the backward pass recomputes ``(y0, z0)`` from
    ``(y1, z1)`` instead of storing it.
    """

    def __init__(self, base: AbstractERK, lam: float):
        self.base = base
        self.lam = lam
        self.order = base.order
        self.dense_order = 1
        self.error_order = getattr(base, "error_order", None)

    def init(self, term, t0, y0):
        return (y0, term.vf(t0, y0))

    def step(self, term, t0, t1, y0, state):
        z, fz = state
        adaptive = self.error_order is not None
        inc, y_error = self.base.increment(term, t0, t1, z, fz, error=adaptive)
        y1 = torch.lerp(z, y0, self.lam) + inc  # l y0 + (1 - l) z + h Psi_h(t0, z)
        back, _ = self.base.increment(term, t1, t0, y1, term.vf(t1, y1))
        z1 = z - back
        return y1, y_error, None, (z1, term.vf(t1, z1)), None

    def dense_coeffs(self, term, dense_info):  # pragma: no cover - guarded in ReversibleAdjoint
        raise NotImplementedError("ReversibleAdjoint has no dense output")

    def backward_step(self, term, t0, t1, y1, z1, a_y, a_z, wrt):
        base, lam = self.base, self.lam
        with torch.enable_grad():
            y1_ = y1.detach().requires_grad_()
            back, _ = base.increment(term, t1, t0, y1_, term.vf(t1, y1_))
            # z1 = z0 - back(y1): the adjoint of z1 reaches y1 with a minus sign
            gb = torch.autograd.grad(back, (y1_, *wrt), -a_z, allow_unused=True)
        z0 = (z1 + back).detach()
        with torch.enable_grad():
            z0_ = z0.requires_grad_()
            inc, _ = base.increment(term, t0, t1, z0_, term.vf(t0, z0_))
            a_y1 = a_y + gb[0]
            gf = torch.autograd.grad(inc, (z0_, *wrt), a_y1, allow_unused=True)
        y0 = (y1 - (1 - lam) * z0 - inc.detach()) / lam
        return y0, z0, lam * a_y1, a_z + (1 - lam) * a_y1 + gf[0], [*gb[1:], *gf[1:]]

    def __eq__(self, other):
        return type(self) is type(other) and self.base == other.base and self.lam == other.lam

    def __hash__(self):
        return hash((type(self), self.base, self.lam))


class _AdaptiveReversible(_Reversible, AbstractAdaptiveSolver):
    pass


class ReversibleAdjoint(AbstractAdjoint):
    r"""Exact gradients with O(1) memory (McCallum & Foster 2024, "Efficient, accurate and stable
    gradients for neural ODEs").

    The solve runs the *reversible* version of the given explicit Runge--Kutta solver: a second
    state :math:`z` is carried along and each step is

    .. math::
        y_{n+1} = \lambda y_n + (1-\lambda) z_n + \Psi_h(t_n, z_n),\qquad
        z_{n+1} = z_n - \Psi_{-h}(t_{n+1}, y_{n+1}),

    with :math:`\Psi_h(t, y)` the increment of one base step of size :math:`h` from :math:`(t, y)`. It
    keeps the base method's order and can be inverted exactly. The backward pass walks the
    steps in reverse, *reconstructing* each state from the next one instead of storing it, and
    backpropagates through one step at a time: memory does not grow with the number of steps
    (only the step times are kept), and the gradients are those of the computed solution (equal to
    :class:`DirectAdjoint` on the same reversible discretisation, up to the floating-point error
    of the reconstruction). Each step costs two steps of the base method. Adaptive solvers keep
    their error estimate (from the first half-step); save times are stepped onto exactly.

    Caveat: the scheme carries a parasitic mode with growth factor ``l / R(h mu)`` per step on
    ``y' = mu y``: where the dynamics contract strongly over a step it grows, so strongly
    contracting problems need smaller steps than the base method (see docs/adjoints.md).

    Args:
        l: the coupling :math:`\lambda \in (0, 1]`; values just below 1 (the default, 0.999, as
            recommended by McCallum & Foster) damp the parasitic mode between :math:`y` and
            :math:`z` while keeping the reconstruction well conditioned.

    Not supported (``NotImplementedError``): solvers that are not explicit Runge--Kutta methods,
    ``per_sample=True``, ``SaveAt(steps=True)``, ``SaveAt(dense=True)``, ``jump_ts``, double
    backward.
    """

    def __init__(self, l: float = 0.999):  # noqa: E741 - the paper's name
        if not 0 < l <= 1:
            raise ValueError(f"ReversibleAdjoint(l=...) must be in (0, 1], got {l!r}")
        self.l = float(l)

    def __repr__(self):
        return f"ReversibleAdjoint(l={self.l})"

    def _prepare(self, problem):
        solver = problem.solver
        if not isinstance(solver, (AbstractERK, AbstractReversibleSolver)):
            raise NotImplementedError(
                f"ReversibleAdjoint needs an explicit Runge-Kutta solver (e.g. Tsit5()), got {type(solver).__name__}; "
                "use adjoint=DirectAdjoint() or CheckpointAdjoint() with other solvers"
            )
        if isinstance(problem.terms, SDETerm) and not isinstance(solver, AbstractReversibleSolver):
            raise NotImplementedError(
                f"ReversibleAdjoint on an SDE needs an algebraically reversible SDE solver: ReversibleHeun(), "
                f"not {type(solver).__name__}"
            )
        if problem.per_sample:
            raise NotImplementedError(
                "ReversibleAdjoint does not support per_sample=True yet; use adjoint=DirectAdjoint()"
            )
        if problem.saveat.steps or problem.saveat.dense:
            raise NotImplementedError(
                "ReversibleAdjoint supports SaveAt(t0=..., ts=..., t1=...) only; for SaveAt(steps=True) or "
                "SaveAt(dense=True) use adjoint=DirectAdjoint() or CheckpointAdjoint()"
            )
        controller = problem.controller
        if getattr(controller, "jump_ts", None) is not None:
            raise NotImplementedError("ReversibleAdjoint does not support jump_ts; use adjoint=CheckpointAdjoint()")
        if isinstance(solver, AbstractReversibleSolver):
            wrapped = solver  # already reversible, e.g. ReversibleHeun()
        else:
            wrapped = (_AdaptiveReversible if isinstance(solver, AbstractAdaptiveSolver) else _Reversible)(
                solver, self.l
            )
        if problem.saveat.ts is not None:
            # land on every save time so saved values are states of the reversible scheme
            controller = with_step_ts(controller if controller is not None else ConstantStepSize(), problem.saveat.ts)
        return dataclasses.replace(problem, solver=wrapped, controller=controller)

    def loop(self, problem, integrate):
        prepared = self._prepare(problem)
        if not torch.is_grad_enabled():
            return integrate(prepared)
        flat, y0, args_proxy, proxies, arg_leaves, params = discover(problem)
        if not params and not arg_leaves and not y0.requires_grad:
            return integrate(prepared)
        box = {}
        ys = _ReversibleFn.apply(
            prepared, integrate, flat, args_proxy, proxies, arg_leaves, box, y0, *arg_leaves, *params
        )
        return dataclasses.replace(box["solution"], ys=flat.unflatten(ys), internal=None)


class _ReversibleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem, integrate, flat, args_proxy, proxies, arg_leaves, box, y0, *tensors):
        from .._tree import tree_map

        detached_args = tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, args_proxy)
        with torch.no_grad():
            sol = integrate(
                dataclasses.replace(problem, y0=flat.unflatten(y0.detach()), args=detached_args, record=True)
            )
        box["solution"] = sol
        ys = flat.flatten_leading(sol.ys)
        ctx.problem, ctx.flat, ctx.args_proxy = problem, flat, args_proxy
        ctx.proxy_list = [proxies[id(x)] for x in arg_leaves]
        ctx.internal = sol.internal
        ctx.save_times = sol.ts.tolist()
        ctx.save_for_backward(*tensors[len(arg_leaves) :])
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys):
        from .._flat import flat_term

        params = list(ctx.saved_tensors)
        problem, flat, internal = ctx.problem, ctx.flat, ctx.internal
        wrt = [*ctx.proxy_list, *params]
        solver = problem.solver
        sign = internal["sign"]
        term = flat_term(problem.terms, flat, ctx.args_proxy, sign, False)
        term.checked = True
        times = [internal["t0"], *internal["step_ends"]]  # internal (forward) time
        # incoming gradients per step index: save times were stepped onto exactly
        incoming = {}
        index = {t: n for n, t in enumerate(times)}
        for j, t_user in enumerate(ctx.save_times):
            n = index.get(t_user * sign)
            if n is None:  # not reached (a failed solve with throw=False): nothing flows back
                continue
            incoming[n] = incoming[n] + grad_ys[j] if n in incoming else grad_ys[j]

        path = getattr(term, "path", None) if term.rough else None
        if path is not None and len(times) > 2 and hasattr(path, "increments"):
            # the Brownian increments of the steps, computed ahead in the order the backward pass
            # asks for them (last step first), in chunks, as the fused forward loop does; the same
            # values as step-by-step queries
            from .._fixed import Prefetched

            term.path = Prefetched(path, [term._times(times[n - 1], times[n]) for n in range(len(times) - 1, 0, -1)])
        try:
            a_y0, g = solver.reverse(term, times, internal["y"], internal["solver_state"][0], incoming, wrt)
        finally:
            if path is not None:
                term.path = path
        if len(times) > 1:
            check_reached(params, [gi is not None for gi in g[len(ctx.proxy_list) :]])
        grads = [torch.zeros_like(w) if gi is None else gi.to(w.dtype) for gi, w in zip(g, wrt)]
        return (None,) * 7 + (a_y0, *grads)
