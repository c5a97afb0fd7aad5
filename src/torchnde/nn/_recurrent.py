"""What the continuous-time recurrent cells (CfC, LTC, ODERNN) share: reading a sequence with
its time steps and mask, and evolving a hidden state between observations with per-sample
solves."""

from __future__ import annotations

import numbers

import torch

from .._saveat import SaveAt
from .._solve import solve
from .._terms import ODETerm
from ..adjoints import DirectAdjoint
from ..controllers import AbstractController
from ._neural_ode import _check_adjoint_and_max_steps, _ode_solver_and_controller


def check_sizes(owner: str, **sizes) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{owner}({name}=...) must be a positive int, got {value!r}")


def sequence_inputs(owner: str, x, input_size: int, dt, ts, mask, h0, hidden_size: int):
    """Check ``x`` ``(batch, length, input_size)`` and turn ``dt``/``ts``/``mask``/``h0`` into
    ``dt`` ``(batch, length)`` (>= 0, in ``x``'s dtype), ``mask`` ``(batch, length)`` bool and
    ``h0`` ``(batch, hidden)``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != input_size:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{owner} expects x of shape (batch, length, {input_size}), got {got}")
    if not x.is_floating_point():
        raise TypeError(f"{owner} expects a real floating-point x, got {x.dtype}")
    B, L = x.shape[:2]
    if dt is not None and ts is not None:
        raise ValueError(f"{owner}: pass either dt= (steps) or ts= (observation times), not both")

    def as_grid(name, v):
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and name == "dt":
            return torch.full((B, L), float(v), dtype=x.dtype, device=x.device)
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{owner}({name}=...) must be a (batch, length) tensor, got {type(v).__name__}")
        if v.dim() == 1 and v.shape[0] == L:
            v = v.expand(B, L)
        if tuple(v.shape) != (B, L):
            raise ValueError(
                f"{owner}({name}=...) must have shape (batch, length) = ({B}, {L}) (or (length,)), got {tuple(v.shape)}"
            )
        v = v.to(dtype=x.dtype, device=x.device)
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{owner}({name}=...) has NaN/inf entries")
        return v

    if ts is not None:
        ts = as_grid("ts", ts)
        dt = torch.cat([torch.zeros_like(ts[:, :1]), ts.diff(dim=1)], 1)
        if bool((dt < 0).any()):
            b, k = (dt < 0).nonzero()[0].tolist()
            raise ValueError(
                f"{owner}(ts=...) must be non-decreasing along each sequence; sample {b} goes from "
                f"{ts[b, k - 1].item()} to {ts[b, k].item()} at step {k}"
            )
    elif dt is None:
        dt = torch.ones(B, L, dtype=x.dtype, device=x.device)
    else:
        dt = as_grid("dt", dt)
        if bool((dt < 0).any()):
            b, k = (dt < 0).nonzero()[0].tolist()
            raise ValueError(
                f"{owner}(dt=...) must be >= 0 (time since the previous step); got {dt[b, k].item()} at "
                f"(sample, step) = ({b}, {k})"
            )
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.bool, device=x.device)
    else:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, L):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{owner}(mask=...) must be a (batch, length) = ({B}, {L}) tensor, got {got}")
        mask = mask.to(device=x.device, dtype=torch.bool)
    if h0 is None:
        h0 = x.new_zeros(B, hidden_size)
    elif not isinstance(h0, torch.Tensor) or tuple(h0.shape) != (B, hidden_size):
        got = tuple(h0.shape) if isinstance(h0, torch.Tensor) else type(h0).__name__
        raise ValueError(f"{owner}(h0=...) must have shape (batch, hidden_size) = ({B}, {hidden_size}), got {got}")
    return dt, mask, h0


def scan_observations(dt, mask, h, update, t_last=None):
    """Run a cell over a sequence's steps: the time since the last observed step accumulates
    over masked ones, and at an observed step ``k`` the state becomes ``update(k, h, t_last,
    span)``, ``span`` ``(batch,)`` the time since the last observation (per sample; where step
    ``k`` is masked, ``span`` is 0 and the update is discarded). ``t_last`` ``(batch,)``, if
    given, is the time of ``h`` and moves on by ``span``. Returns ``(hs, h_last)``: the state
    after each step ``(batch, length, hidden)`` and after the last observed one."""
    pending = torch.zeros_like(dt[:, 0])
    hs = []
    for k in range(dt.shape[1]):
        pending = pending + dt[:, k]
        obs = mask[:, k]
        span = torch.where(obs, pending, torch.zeros_like(pending))
        h = torch.where(obs[:, None], update(k, h, t_last, span), h)
        if t_last is not None:
            t_last = t_last + span
        pending = torch.where(obs, torch.zeros_like(pending), pending)
        hs.append(h)
    return torch.stack(hs, 1), h


class Evolver:
    """Solves ``dh/dt = field(t, h)`` per sample from each sample's last observation to the next,
    with :func:`torchnde.solve` in per-sample mode (each sample its own ``t0``, ``t1``, steps)."""

    def __init__(self, owner, solver, controller, adjoint, dt0, max_steps):
        solver, controller = _ode_solver_and_controller(owner, solver, controller, dt0)
        self.solver = solver
        self.controller: AbstractController | None = controller
        self.adjoint = _check_adjoint_and_max_steps(
            owner, adjoint if adjoint is not None else DirectAdjoint(), max_steps
        )
        self.dt0 = dt0
        self.max_steps = max_steps

    def __call__(self, field, h, t0, span, args=None):
        """``h`` ``(batch, hidden)`` at times ``t0`` ``(batch,)`` evolved by ``span`` ``(batch,)``
        (>= 0). Samples with ``span == 0`` keep ``h``: they get a unit interval with the field
        switched off (a per-sample solve needs non-empty intervals). ``field(t, h, args)``."""
        moving = span > 0
        if not bool(moving.any()):
            return h
        gate = moving.to(h.dtype)[:, None]
        t1 = t0 + torch.where(moving, span, torch.ones_like(span))

        def vf(t, y, a):
            return field(t, y, a) * gate

        sol = solve(
            ODETerm(vf),
            self.solver,
            t0,
            t1,
            h,
            dt0=self.dt0,
            args=args,
            saveat=SaveAt(t1=True),
            controller=self.controller,
            adjoint=self.adjoint,
            max_steps=self.max_steps,
            per_sample=True,
        )
        return sol.ys[:, -1]
