"""The continuous adjoint (optimise-then-discretise)."""

from __future__ import annotations

import copy
import dataclasses

import torch

from .._terms import ODETerm, SDETerm, reverse_terms
from .._tree import tree_map
from ..controllers import ConstantStepSize, PIDController, rms_norm
from ..solvers.reversible_heun import AbstractReversibleSolver
from ._base import AbstractAdjoint, DirectAdjoint
from ._params import _scalar, check_reached, discover

__all__ = ["BacksolveAdjoint"]


class BacksolveAdjoint(AbstractAdjoint):
    r"""The continuous adjoint (Chen et al. 2018): gradients by solving the adjoint ODE backwards.

    The forward solve keeps no graph. The backward pass solves, from the last save time to ``t0``,
    the augmented system :math:`\dot y = f`, :math:`\dot a = -a^\top \partial f/\partial y`,
    :math:`\dot g = -a^\top \partial f/\partial \theta`, adding each save time's incoming gradient
    to :math:`a` and restarting :math:`y` from the saved forward value. Memory is constant in the
    number of steps; the gradients are those of the exact solution, so they differ from the
    gradients of the computed solution by about the solver's tolerance.

    Gradients reach ``y0``, tensors in ``args`` and every leaf tensor the vector field uses
    (``nn.Module`` parameters, captured tensors), found by walking the autograd graph of one
    evaluation. A captured tensor computed *outside* the solve from parameters (not a leaf) is
    differentiated through as well, as long as its graph is still alive; pass such tensors in
    ``args`` to be safe. Gradients with respect to ``t0``, ``t1`` and save times are added by
    ``solve`` for every adjoint.

    Args:
        solver: the solver of the backward solve (default: the forward solver).
        controller: its step-size controller (default: the forward controller; with constant
            steps, the same step size).
        seminorm: measure the backward error without the parameter-gradient components (Kidger,
            Chen & Lyons 2021): they do not feed back into the dynamics, so controlling their
            error only shrinks steps.

    Not supported (``NotImplementedError``): ``per_sample=True``, ``SaveAt(steps=True)``,
    ``SaveAt(dense=True)``, double backward.
    """

    def __init__(self, solver=None, controller=None, seminorm: bool = True):
        self.solver = solver
        self.controller = controller
        self.seminorm = seminorm

    def __repr__(self):
        return f"BacksolveAdjoint(solver={self.solver!r}, controller={self.controller!r}, seminorm={self.seminorm})"

    def loop(self, problem, integrate):
        if not torch.is_grad_enabled():
            return integrate(problem)
        if problem.per_sample:
            raise NotImplementedError(
                "BacksolveAdjoint does not support per_sample=True yet; use adjoint=DirectAdjoint()"
            )
        if problem.saveat.steps or problem.saveat.dense:
            raise NotImplementedError(
                "BacksolveAdjoint supports SaveAt(t0=..., ts=..., t1=...) only; for SaveAt(steps=True) "
                "or SaveAt(dense=True) use adjoint=DirectAdjoint() or CheckpointAdjoint()"
            )
        if isinstance(problem.terms, SDETerm):
            _check_sde(problem, self.solver)
        flat, y0, args_proxy, proxies, arg_leaves, params = discover(problem)
        if not params and not arg_leaves and not y0.requires_grad:
            return integrate(problem)
        box = {}
        ys = _Backsolve.apply(
            self, problem, integrate, flat, args_proxy, proxies, arg_leaves, box, y0, *arg_leaves, *params
        )
        sol = box["solution"]
        return dataclasses.replace(sol, ys=flat.unflatten(ys))

    def backward_controller(self, problem, n_state: int):
        ctrl = self.controller if self.controller is not None else problem.controller
        if isinstance(ctrl, PIDController) and self.seminorm:
            ctrl = copy.copy(ctrl)
            ctrl._tol_cache = {}
            ctrl.norm = lambda x: rms_norm(x[..., :n_state])
        return ctrl


class _Backsolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, adjoint, problem, integrate, flat, args_proxy, proxies, arg_leaves, box, y0, *tensors):
        detached_args = tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, args_proxy)
        with torch.no_grad():
            sol = integrate(dataclasses.replace(problem, y0=flat.unflatten(y0.detach()), args=detached_args))
        box["solution"] = sol
        ys = flat.flatten_leading(sol.ys)
        ctx.adjoint, ctx.problem, ctx.flat = adjoint, problem, flat
        ctx.args_proxy, ctx.n_args = args_proxy, len(arg_leaves)
        ctx.proxy_list = [proxies[id(x)] for x in arg_leaves]
        ctx.save_for_backward(ys, *tensors[len(arg_leaves) :])
        ctx.ts = sol.ts.tolist()
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys):
        from .._solve import solve

        ys, *params = ctx.saved_tensors
        problem, flat = ctx.problem, ctx.flat
        wrt = [*ctx.proxy_list, *params]
        dtype = ys.dtype
        # the backward solve runs the other way: smooth control paths switch one-sided derivatives
        term, args_proxy = reverse_terms(problem.terms), ctx.args_proxy
        N = ys.shape[-1]

        def aug(t, state, _):
            y, a = state[0], state[1]
            with torch.enable_grad():
                y_ = y.detach().requires_grad_()
                out = flat.flatten(term.vf(t, flat.unflatten(y_), args_proxy))
                try:
                    # a vector field of t alone (no y, no parameter) has no graph: every VJP is zero
                    vjps = (
                        torch.autograd.grad(out, (y_, *wrt), grad_outputs=a, allow_unused=True)
                        if out.requires_grad
                        else (None,) * (1 + len(wrt))
                    )
                except RuntimeError as e:
                    if "second time" in str(e):
                        raise RuntimeError(
                            "BacksolveAdjoint could not differentiate the vector field: it uses a tensor "
                            "computed outside the solve from parameters (its graph was freed). Pass that "
                            "tensor through args=... instead, or use adjoint=DirectAdjoint()."
                        ) from e
                    raise
            for i, v in enumerate(vjps[1:]):
                reached[i] = reached[i] or v is not None
            dy = out.detach()
            da = torch.zeros_like(a) if vjps[0] is None else -vjps[0]
            dg = [torch.zeros_like(w, dtype=dtype) if v is None else -v.to(dtype) for w, v in zip(wrt, vjps[1:])]
            return (dy, da, *dg)

        reached = [False] * len(wrt)
        if isinstance(term, SDETerm):
            aug_term = _AugmentedSDE(term, flat, args_proxy, wrt, reached, dtype)
        else:
            aug_term = ODETerm(aug)
        ts = list(ctx.ts)
        t0 = _scalar(problem.t0)
        a = torch.zeros(N, dtype=dtype, device=ys.device)
        g = [torch.zeros_like(w, dtype=dtype) for w in wrt]
        solver = ctx.adjoint.solver if ctx.adjoint.solver is not None else problem.solver
        controller = ctx.adjoint.backward_controller(problem, 2 * N)
        dt0 = None if problem.dt0 is None else -_scalar(problem.dt0)
        if isinstance(controller, ConstantStepSize) and dt0 is None:
            raise ValueError("BacksolveAdjoint with constant steps needs the forward dt0")
        # walk the save times backwards; t0 closes the last interval
        points = [(ts[i], ys[i], grad_ys[i]) for i in range(len(ts))]
        if not points or points[0][0] != t0:
            points.insert(0, (t0, None, None))
        y = points[-1][1]
        for i in range(len(points) - 1, 0, -1):
            t_hi, y_hi, g_hi = points[i]
            if g_hi is not None:
                a = a + g_hi
            t_lo = points[i - 1][0]
            if t_lo == t_hi:
                continue
            state = (y_hi.to(dtype), a, *g)
            sol = solve(
                aug_term,
                solver,
                t_hi,
                t_lo,
                state,
                dt0=dt0,
                controller=controller,
                adjoint=DirectAdjoint(),
                max_steps=problem.max_steps,
            )
            y, a, *g = (x[-1] for x in sol.ys)
        if points[0][2] is not None:
            a = a + points[0][2]
        n_args = len(ctx.proxy_list)
        check_reached(params, reached[n_args:])
        grads = [gi.to(w.dtype) for gi, w in zip(g, wrt)]
        return (None,) * 8 + (a, *grads)


def _check_sde(problem, backward_solver):
    for solver in (problem.solver, backward_solver):
        if solver is None:
            continue
        if solver.calculus != "stratonovich" and problem.terms.control.noise_class != "additive":
            raise NotImplementedError(
                f"BacksolveAdjoint on an SDE solves the adjoint SDE backwards in Stratonovich form, so it needs "
                f"a Stratonovich solver (Heun(), Midpoint(), ReversibleHeun(), ...), not {type(solver).__name__} "
                f"({solver.calculus}). For Itô solvers use adjoint=DirectAdjoint() or CheckpointAdjoint()."
            )
        if isinstance(solver, AbstractReversibleSolver):
            raise NotImplementedError(
                "BacksolveAdjoint cannot use ReversibleHeun() on SDEs (its cached diffusion cannot be formed for "
                "the adjoint system); use adjoint=ReversibleAdjoint() with it, or Heun()/Midpoint() with backsolve"
            )


class _AugmentedSDE(SDETerm):
    """The stochastic adjoint (Li, Wong, Chen & Duvenaud 2020) of a Stratonovich SDE, solved backwards
    on the same Brownian path: the state is ``(y, a, g_1, ..., g_k)`` and over a step with control
    ``(dt, dW)`` the increment is ``(K, -a^T dK/dy, -a^T dK/dtheta_i)`` with
    ``K = f(t, y) dt + g(t, y) dW``: one vector-Jacobian product per evaluation, whatever the noise."""

    def __init__(self, sde: SDETerm, flat, args, wrt, reached, dtype):
        super().__init__(sde.drift, sde.control)
        self.sde, self.flat, self.args, self.wrt, self.reached, self.dtype = sde, flat, args, wrt, reached, dtype

    def vf_prod(self, t, state, _args, control):
        y, a = state[0], state[1]
        flat, wrt = self.flat, self.wrt
        with torch.enable_grad():
            y_ = y.detach().requires_grad_()
            inc = flat.flatten(self.sde.vf_prod(t, flat.unflatten(y_), self.args, control))
            # retain_graph: a tensor computed outside the solve from parameters (e.g. a latent SDE's
            # context) is differentiated through at every evaluation; its graph must survive. The
            # evaluation's own graph is freed with ``inc`` all the same.
            vjps = torch.autograd.grad(inc, (y_, *wrt), grad_outputs=a, allow_unused=True, retain_graph=True)
        for i, v in enumerate(vjps[1:]):
            self.reached[i] = self.reached[i] or v is not None
        dg = [torch.zeros_like(w, dtype=self.dtype) if v is None else -v.to(self.dtype) for w, v in zip(wrt, vjps[1:])]
        # an increment that does not depend on y (constant drift and diffusion): zero VJP
        da = torch.zeros_like(a) if vjps[0] is None else -vjps[0]
        return (inc.detach(), da, *dg)
