r"""The local error and stiffness estimates of one solver step, and the stochastic-time regulariser.

An adaptive solver already computes, at every step, an estimate of its local error (the
embedded pair's difference) and, for some Runge--Kutta pairs, a stiffness estimate from two stages
evaluated at the same time. Both are cheap proxies for how hard the dynamics are to solve: a
vector field with small error estimates lets the controller take long steps.

* Pal, Ma, Shah & Rackauckas, "Opening the Blackbox: Accelerating Neural Differential Equations by
  Regularizing Internal Solver Heuristics", ICML 2021 -- the *global* regulariser, the sum of
  these estimates over the accepted steps (see :mod:`torchnde.regularisers._global`).
* Pal, Edelman & Rackauckas, "Locally Regularized Neural Differential Equations: Some Black Boxes
  Were Meant to Remain Closed!", ICML 2023 -- the *local* regulariser: the same estimates at one
  random time per iteration. It needs no access to the integration loop, so it works with every
  adjoint.

:func:`local_error` takes one step of the solver's own ``step`` from ``(t, y)`` with autograd
through it; :func:`sample_local_regulariser` draws the random time(s) and reads ``y(t)`` from a
solve's dense output; :func:`solve_with_local_regulariser` splits a solve at the random time (the
construction of Pal et al. 2023), so the state there comes from whatever adjoint the solve uses.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from .._flat import flat_term
from .._saveat import SaveAt
from .._solution import Solution
from .._terms import AbstractTerm, ControlTerm, MultiTerm, ODETerm, SDETerm, normalize_terms
from .._tree import Flattener, tree_map
from ..controllers import PIDController
from ..solvers import AbstractAdaptiveSolver, AbstractSolver
from ..solvers._base import AbstractERK

__all__ = [
    "LocalEstimate",
    "local_error",
    "sample_local_regulariser",
    "solve_with_local_regulariser",
    "starting_step",
    "stiffness_pair",
]


@dataclass
class LocalEstimate:
    """What :func:`local_error` (and the samplers built on it) return.

    Attributes:
        error: the norm of the step's embedded error estimate: a 0-d tensor, or ``(batch,)`` in
            per-sample mode. Differentiable with respect to ``y``, ``args`` and the vector field's
            parameters. For the samplers: the unbiased estimate of its integral over ``[t0, t1]``.
        stiffness: the stiffness estimate :math:`\\rho` (same shape), when asked for, else ``None``.
        t: the time(s) of the step's start.
        h: the step size(s) used (signed like ``t1 - t0``).
    """

    error: torch.Tensor
    stiffness: torch.Tensor | None
    t: Any
    h: Any


def stiffness_pair(solver) -> tuple[int, int] | None:
    """The indices ``(i, j)``, ``i < j``, of the last two stages of an explicit Runge--Kutta
    tableau evaluated at the same time (``c_i == c_j``), or ``None`` if it has none. Dopri5 and
    Tsit5: stages 6 and 7 (both at ``t + h``; 0-based ``(5, 6)``)."""
    if not isinstance(solver, AbstractERK):
        return None
    c = solver.tableau.c
    best = None
    for j in range(len(c)):
        for i in range(j):
            if c[i] == c[j] and i != j:
                best = (i, j)
    return best


def _stiffness_pair_for(solver, stiffness: bool) -> tuple[int, int] | None:
    """:func:`stiffness_pair` of ``solver`` when the stiffness is asked for (``None`` otherwise);
    a ``TypeError`` when the solver has no such pair."""
    if not stiffness:
        return None
    pair = stiffness_pair(solver)
    if pair is None:
        raise TypeError(
            f"stiffness=True needs an explicit Runge--Kutta pair with two stages at the same time (Dopri5, Tsit5); "
            f"{type(solver).__name__} has none"
        )
    return pair


def _check_ode_term(terms, who: str):
    if isinstance(terms, type) or not isinstance(terms, AbstractTerm):
        raise TypeError(f"{who} needs an ODE term such as ODETerm(f); got {terms!r}")
    if isinstance(terms, (SDETerm, ControlTerm)) or (
        isinstance(terms, MultiTerm) and any(isinstance(t, ControlTerm) for t in terms.terms)
    ):
        raise TypeError(
            f"{who} needs an ODE term (ODETerm, or a MultiTerm of ODETerms); got {terms!r}. The local error "
            "estimate of an SDE step mixes the Brownian increment in and is not a smoothness measure"
        )


def _check_solver(solver, who: str):
    if isinstance(solver, type):
        raise TypeError(f"{who} needs a solver instance, got the class {solver.__name__}; use {solver.__name__}()")
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"{who} needs a solver such as Dopri5(), got {type(solver).__name__}")
    if not isinstance(solver, AbstractAdaptiveSolver):
        raise TypeError(
            f"{who} needs a solver with an embedded error estimate (an adaptive solver such as Dopri5(), "
            f"Tsit5(), Bosh3()); {type(solver).__name__} has none"
        )


def _as_time(x, name: str, per_sample: bool, batch: int | None, dtype, device):
    """A Python float (shared mode) or a ``(batch,)`` tensor of ``dtype`` (per-sample mode)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype.is_complex:
            raise TypeError(f"{name} must be real, got dtype {x.dtype}")
        if not per_sample:
            if x.dim() != 0:
                raise ValueError(
                    f"{name} must be a scalar (got shape {tuple(x.shape)}); one value per sample needs per_sample=True"
                )
            x = float(x)
    elif not isinstance(x, numbers.Real) or isinstance(x, bool):
        raise TypeError(f"{name} must be a real number or a tensor, got {type(x).__name__}")
    if not per_sample:
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"{name} must be finite, got {x}")
        return x
    v = torch.as_tensor(x, dtype=dtype, device=device)
    if v.dim() == 0:
        v = v.expand(batch)
    if v.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},) (the batch), got {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} must be finite, got {v.tolist()}")
    return v.clone()


def _rms(x: torch.Tensor) -> torch.Tensor:
    x = x.abs() if x.is_complex() else x
    return torch.linalg.vector_norm(x, dim=-1) / math.sqrt(max(x.shape[-1], 1))


def local_error(
    terms,
    solver,
    t,
    y,
    h,
    args=None,
    *,
    per_sample: bool = False,
    stiffness: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
    norm=None,
) -> LocalEstimate:
    r"""One step of ``solver`` from ``(t, y)`` of size ``h``; the norm of its error estimate.

    The step is the solver's own ``step`` (the same stages, weights and error weights as inside
    :func:`~torchnde.solve`), run with autograd, so the result is differentiable with respect to
    ``y``, tensors in ``args`` and the parameters of the vector field; ``t`` and ``h`` are held
    fixed. This is the per-time quantity of the local regulariser of Pal, Edelman & Rackauckas
    (ICML 2023), and one term of the global regulariser of Pal, Ma, Shah & Rackauckas (ICML 2021).

    Args:
        terms: an ``ODETerm`` (or a ``MultiTerm`` of ODE terms).
        solver: an adaptive solver (``Dopri5()``, ``Tsit5()``, ``Bosh3()``, an implicit one, ...).
        t: the start of the step (a number or 0-d tensor; per-sample: also ``(batch,)``).
        y: the state there, with the structure of the solve's ``y0`` (per-sample: batch first).
        h: the step size, signed like ``t1 - t0`` (a number or 0-d tensor; per-sample: also
            ``(batch,)``, all of one sign).
        args: the vector field's third argument.
        per_sample: the leading dimension of ``y`` is a batch of independent problems: the
            error norm is per sample, shape ``(batch,)``.
        stiffness: also return the stiffness estimate
            :math:`\rho = \|k_j - k_i\| / \|Y_j - Y_i\|` from the two stages ``i < j`` evaluated
            at the same time (Shampine 1977; Hairer & Wanner, *Solving ODEs II*, IV.2; used by Pal
            et al. 2021): for Dopri5 and Tsit5 the sixth and seventh stages, both at ``t + h``.
            :math:`\rho` estimates the magnitude of the dominant eigenvalue of :math:`\partial f /
            \partial y`; the solver is limited by stability where :math:`|h| \rho` nears its
            stability boundary (about 3.3 for Dopri5). 2-norms over the (per-sample) state.
        rtol, atol: if given, the error is scaled as the step-size controller scales it,
            :math:`e / (\text{atol} + \text{rtol} \max(|y_0|, |y_1|))` (the scale held fixed), so
            ``error <= 1`` means the controller would accept the step. Both or neither.
        norm: reduces the last dimension of the (scaled) flat error; RMS by default.

    Returns:
        A :class:`LocalEstimate`.

    Raises:
        TypeError: not an ODE term, or a solver without an error estimate; ``stiffness=True`` for a
            solver without two stages at the same time.
        ValueError: bad times or step size (zero, non-finite, mixed signs).
    """
    who = "local_error"
    _check_ode_term(terms, who)
    _check_solver(solver, who)
    if (rtol is None) != (atol is None):
        raise ValueError(f"local_error needs both rtol and atol, or neither; got rtol={rtol!r}, atol={atol!r}")
    if norm is not None and not callable(norm):
        raise TypeError(f"norm must be a function reducing the last dimension, got {type(norm).__name__}")
    pair = _stiffness_pair_for(solver, stiffness)
    flat = Flattener(y, batch=per_sample, name="y")
    real = flat.dtype.to_real() if flat.dtype.is_complex else flat.dtype
    t0 = _as_time(t, "t", per_sample, flat.batch_size, real, flat.device)
    hh = _as_time(h, "h", per_sample, flat.batch_size, real, flat.device)
    if per_sample:
        if (hh == 0).any():
            raise ValueError("h must be non-zero for every sample")
        if not ((hh > 0).all() or (hh < 0).all()):
            raise ValueError("h must have one sign for the whole batch (all forward or all backward in time)")
        sign = 1.0 if flat.batch_size == 0 or bool(hh[0] > 0) else -1.0
    else:
        if hh == 0:
            raise ValueError("h must be non-zero")
        sign = 1.0 if hh > 0 else -1.0
    if not isinstance(terms, (ODETerm, SDETerm)):
        terms = normalize_terms(terms, backward=sign < 0)
    term = flat_term(terms, flat, args, sign, per_sample)
    tau0 = t0 * sign
    tau1 = tau0 + hh * sign
    if rtol is not None and hasattr(solver, "with_tolerances"):  # as the loop does: e.g. Newton tolerances
        solver = solver.with_tolerances(rtol, atol)
    y0 = flat.flatten(y)
    state = solver.init(term, tau0, y0)
    y1, y_err, dense_info, _, _ = solver.step(term, tau0, tau1, y0, state)
    if y_err is None:  # pragma: no cover - adaptive solvers always return one
        raise TypeError(f"{type(solver).__name__}.step returned no error estimate")
    if rtol is not None:
        scale = torch.maximum(y0.detach().abs(), y1.detach().abs()) * rtol + atol
        y_err = y_err / scale
    err = (norm or _rms)(y_err)
    rho = _stiffness(solver, pair, dense_info, y0, tau0, tau1) if pair is not None else None
    return LocalEstimate(err, rho, t, h)


def _stiffness(solver, pair, dense_info, y0, tau0, tau1) -> torch.Tensor:
    """:math:`\\|k_j - k_i\\| / \\|Y_j - Y_i\\|` from the step's stages (``dense_info`` of an
    explicit Runge--Kutta step holds them), the stage states rebuilt from the tableau."""
    ks = dense_info[-1]
    if not isinstance(ks, (list, tuple)) or len(ks) != solver.tableau.num_stages:  # pragma: no cover
        raise RuntimeError(f"{type(solver).__name__}.step did not hand over its stages; cannot estimate stiffness")
    i, j = pair
    a = solver.tableau.a
    dt = tau1 - tau0
    dt = dt if isinstance(dt, float) else dt.to(y0.dtype).unsqueeze(-1)

    # Y_j - Y_i = dt sum_m (a_jm - a_im) k_m, formed directly (no cancellation of y0)
    row_i = list(a[i]) + [0] * (len(a[j]) - len(a[i]))
    inc = None
    for coef_j, coef_i, k in zip(a[j], row_i, ks):
        c = float(coef_j) - float(coef_i)
        if c != 0.0:
            inc = k * c if inc is None else inc + k * c
    if inc is None:  # pragma: no cover - two stages at the same time differ in their rows
        raise RuntimeError("the two stages share their state; cannot estimate stiffness")
    dy = dt * inc
    dk = ks[j] - ks[i]
    num = torch.linalg.vector_norm(dk, dim=-1)
    den = torch.linalg.vector_norm(dy, dim=-1)
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


# --------------------------------------------------------------------------------------------
# random times


def _generator(generator, seed, device):
    if generator is not None and seed is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    return generator


def _uniform(shape, lo, hi, generator, dtype, device):
    u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    return lo + (hi - lo) * u


def sample_local_regulariser(
    sol: Solution,
    terms,
    solver,
    *,
    args=None,
    h=None,
    num_times: int = 1,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stiffness: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
    norm=None,
) -> LocalEstimate:
    r"""The local regulariser of Pal, Edelman & Rackauckas (ICML 2023) from a solve's dense output.

    Draws ``num_times`` times :math:`t_i \sim U[t_0, t_1]` (per sample in per-sample mode), takes
    ``y(t_i)`` from ``sol.evaluate`` (differentiable with ``DirectAdjoint``, the adjoint that
    supports dense output), takes one step of ``solver`` from there (:func:`local_error`) and
    returns

    .. math:: \hat R = |t_1 - t_0| \frac{1}{n} \sum_{i=1}^n E(t_i),

    an unbiased estimate of :math:`\int_{t_0}^{t_1} E(t)\,dt` (the error-estimate integral that
    the global regulariser of Pal et al. 2021 sums over the accepted steps), and likewise for the
    stiffness estimate if asked.

    Args:
        sol: a solution with dense output (``solve(..., saveat=SaveAt(dense=True))``).
        terms, solver, args: the problem (the solver must be adaptive; usually the solve's own).
        h: the step size. ``None`` (default): the accepted step of the solve that contains
            :math:`t_i` -- the step the controller chose there (held fixed, not differentiated).
        num_times: how many times to draw (per sample).
        seed, generator: make the draw reproducible (one of them; neither: the global RNG).
        stiffness, rtol, atol, norm: as :func:`local_error`.

    Returns:
        A :class:`LocalEstimate` whose ``error`` (and ``stiffness``) is the estimate above (0-d;
        ``(batch,)`` per sample) and ``t``, ``h`` the times drawn and steps used (``(n,)``; per
        sample ``(batch, n)``).

    Raises:
        ValueError: a solution without dense output (use :func:`solve_with_local_regulariser`
            with adjoints that have none), ``num_times < 1``.
    """
    if not isinstance(sol, Solution):
        raise TypeError(f"sample_local_regulariser needs the Solution of a solve, got {type(sol).__name__}")
    if sol.interpolation is None:
        raise ValueError(
            "sample_local_regulariser reads y(t) from the solution's dense output; solve with "
            "saveat=SaveAt(dense=True) (DirectAdjoint), or use solve_with_local_regulariser, which works with "
            "every adjoint"
        )
    if isinstance(num_times, bool) or not isinstance(num_times, numbers.Integral) or num_times < 1:
        raise ValueError(f"num_times must be a positive int, got {num_times!r}")
    interp = sol.interpolation
    per_sample = interp.batched
    t_dtype = interp.t_start.dtype
    device = interp.t_start.device
    gen = _generator(generator, seed, device)
    direction = interp.direction
    if per_sample:
        B = interp.t_start.shape[0]
        t0 = torch.as_tensor(sol.t0, dtype=t_dtype, device=device).expand(B)
        t1 = torch.as_tensor(sol.t1, dtype=t_dtype, device=device).expand(B)
        ts = _uniform((B, num_times), t0.unsqueeze(-1), t1.unsqueeze(-1), gen, t_dtype, device)
        span = (t1 - t0).abs()
    else:
        t0, t1 = float(sol.t0), float(sol.t1)
        ts = _uniform((num_times,), t0, t1, gen, t_dtype, device)
        span = abs(t1 - t0)
    if h is None:
        hs = _accepted_step(interp, ts) * direction
    else:
        hs = torch.as_tensor(h, dtype=t_dtype, device=device).detach()
        hs = hs.expand_as(ts) if hs.dim() == 0 or per_sample is False else hs.unsqueeze(-1).expand_as(ts)
    errs, rhos = [], []
    for i in range(num_times):
        if per_sample:
            ti, hi = ts[:, i], hs[:, i]
            yi = sol.evaluate(ti)
        else:
            ti, hi = ts[i], hs[i]
            yi = sol.evaluate(ti)
        est = local_error(
            terms, solver, ti, yi, hi, args, per_sample=per_sample, stiffness=stiffness, rtol=rtol, atol=atol,
            norm=norm,
        )  # fmt: skip
        errs.append(est.error)
        rhos.append(est.stiffness)
    scale = span.to(errs[0].dtype) if isinstance(span, torch.Tensor) else span
    err = torch.stack(errs).mean(0) * scale
    rho = torch.stack(rhos).mean(0) * scale if stiffness else None
    return LocalEstimate(err, rho, ts, hs)


def _accepted_step(interp, ts: torch.Tensor) -> torch.Tensor:
    """The length (internal time, positive) of the accepted step containing each time in ``ts``."""
    tau = ts * interp.direction
    if interp.batched:
        idx = torch.searchsorted(interp.t_end.contiguous(), tau.contiguous())
        nvalid = torch.isfinite(interp.t_end).sum(-1, keepdim=True).clamp(min=1)
        idx = torch.minimum(idx, nvalid - 1)
        return torch.gather(interp.t_end, 1, idx) - torch.gather(interp.t_start, 1, idx)
    idx = torch.searchsorted(interp.t_end, tau).clamp(max=interp.t_end.shape[0] - 1)
    return interp.t_end[idx] - interp.t_start[idx]


def starting_step(
    terms, solver, t, y, direction: float, *, rtol: float, atol: float, args=None, per_sample=False, span=None
):
    r"""A step size for an adaptive solve starting at ``(t, y)``: the starting-step algorithm of
    Hairer, Nørsett & Wanner (*Solving ODEs I*, II.4), as ``solve`` uses with ``dt0=None`` (two
    evaluations), on the RMS norm of the state scaled by ``atol + rtol |y|``; the first trial step
    is capped by ``|span|`` (the interval's length) if given. Without gradients; returns a float
    (per sample: ``(batch,)``) signed by ``direction``."""
    flat = Flattener(y, batch=per_sample, name="y")
    real = flat.dtype.to_real() if flat.dtype.is_complex else flat.dtype
    sign = 1.0 if direction > 0 else -1.0
    if not isinstance(terms, (ODETerm, SDETerm)):
        terms = normalize_terms(terms, backward=sign < 0)
    term = flat_term(terms, flat, args, sign, per_sample)
    tau = _as_time(t, "t", per_sample, flat.batch_size, real, flat.device) * sign
    with torch.no_grad():
        y0 = flat.flatten(tree_map(torch.Tensor.detach, y))
        scale = y0.abs() * rtol + atol
        f0 = term.vf(tau, y0)
        d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
        if span is not None:
            cap = span.abs().to(h0.dtype) if isinstance(span, torch.Tensor) else abs(float(span))
            h0 = torch.minimum(h0, torch.as_tensor(cap, dtype=h0.dtype, device=h0.device))
        h0 = h0.clamp_min(1e-300)
        h0c = h0.unsqueeze(-1) if per_sample else h0
        f1 = term.vf(tau + (h0.to(real) if per_sample else float(h0)), y0 + h0c * f0)
        d2 = _rms((f1 - f0) / scale) / h0
        dmax = torch.maximum(d1, d2)
        order = solver.order or solver.error_order
        h1 = torch.where(
            dmax <= 1e-15,
            torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
            (0.01 / dmax.clamp_min(1e-300)) ** (1.0 / (order + 1)),
        )
        dt = torch.minimum(100 * h0, h1)
    return dt.to(real) * sign if per_sample else float(dt) * sign


def _direct(solve_kwargs) -> bool:
    from ..adjoints import DirectAdjoint

    adjoint = solve_kwargs.get("adjoint")
    return adjoint is None or isinstance(adjoint, DirectAdjoint)


def solve_with_local_regulariser(
    terms,
    solver,
    t0,
    t1,
    y0,
    *,
    h=None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stiffness: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
    norm=None,
    **solve_kwargs,
) -> tuple[Solution, LocalEstimate]:
    r"""``solve`` split at a random time, with the local regulariser there (Pal, Edelman &
    Rackauckas, ICML 2023); works with every adjoint.

    Draws :math:`t_r \sim U[t_0, t_1]` (per sample with ``per_sample=True``), solves from ``t0``
    to :math:`t_r`, takes one step of ``solver`` from :math:`y(t_r)` with :func:`local_error`,
    and continues the solve from :math:`t_r` to ``t1``. The state :math:`y(t_r)` is the first
    solve's output, so its gradient comes from whatever ``adjoint=`` the solves use; the local step
    is plain autograd. The second solve's answer equals an unsplit solve's up to the tolerance
    (the steps differ near :math:`t_r`).

    Args:
        terms, solver, t0, t1, y0: as :func:`~torchnde.solve` (an ODE and an adaptive solver).
        h: the local step size (held fixed, not differentiated). ``None`` or ``"mean"``
            (default): the mean accepted step of the solve, :math:`|t_1 - t_0| / n_{accepted}`
            (per sample in per-sample mode) -- the scale of the steps the controller takes, so
            the penalised error is the one that sets the step count. ``"start"``: the starting
            step of Hairer, Nørsett & Wanner at :math:`(t_r, y(t_r))` for the controller's
            tolerances (more conservative: about a hundredth of the tolerance). ``"first"``: the
            mean accepted step of the first solve, :math:`|t_r - t_0| / n_{accepted}`, with which
            the second solve starts (with a ``PIDController``); under ``DirectAdjoint`` with one
            step size for the batch the local step *is* that solve's first step (its estimates are
            recorded there), so the regulariser costs no extra evaluations. Also the ``h``
            returned in the estimate when a controller limit shortens that step.
        seed, generator: make the draw of :math:`t_r` reproducible.
        stiffness, rtol, atol, norm: as :func:`local_error` (pass the controller's ``rtol`` and
            ``atol`` to scale the error as the controller does).
        **solve_kwargs: passed to both solves (``controller``, ``adjoint``, ``args``,
            ``per_sample``, ``max_steps``, ...). ``saveat`` may only save ``t1`` (the default).

    Returns:
        ``(solution, estimate)``: the second solve's :class:`~torchnde.Solution` (``t0`` set to
        the first's, ``stats`` the sum of both), and a :class:`LocalEstimate` whose ``error``
        (and ``stiffness``) is :math:`|t_1 - t_0|\,E(t_r)`, an unbiased estimate of
        :math:`\int_{t_0}^{t_1} E(t)\,dt`.
    """
    from .._solve import solve

    _check_ode_term(terms, "solve_with_local_regulariser")
    _check_solver(solver, "solve_with_local_regulariser")
    saveat = solve_kwargs.pop("saveat", None)
    if saveat is not None and (not isinstance(saveat, SaveAt) or saveat != SaveAt(t1=True)):
        raise ValueError(
            f"solve_with_local_regulariser supports saveat=SaveAt(t1=True) only (the solve is split at a random "
            f"time); got {saveat!r}. Save a trajectory with a separate solve, or use sample_local_regulariser on a "
            "dense solution"
        )
    if "dt0" in solve_kwargs:
        raise ValueError("solve_with_local_regulariser chooses the step sizes of both solves; do not pass dt0")
    per_sample = bool(solve_kwargs.get("per_sample", False))
    args = solve_kwargs.get("args")
    controller = solve_kwargs.get("controller")
    # the starting-step heuristic needs tolerances: the controller's, unless rtol/atol are given
    step_rtol, step_atol = rtol, atol
    if rtol is None and isinstance(controller, PIDController):
        step_rtol, step_atol = controller.rtol, controller.atol
    flat = Flattener(y0, batch=per_sample)
    real = flat.dtype.to_real() if flat.dtype.is_complex else flat.dtype
    gen = _generator(generator, seed, flat.device)
    if per_sample:
        a = _as_time(t0, "t0", True, flat.batch_size, real, flat.device)
        b = _as_time(t1, "t1", True, flat.batch_size, real, flat.device)
        tr = _uniform((flat.batch_size,), a, b, gen, real, flat.device)
        span = (b - a).abs()
        direction = 1.0 if flat.batch_size == 0 or bool(b[0] > a[0]) else -1.0
    else:
        a = _as_time(t0, "t0", False, None, real, flat.device)
        b = _as_time(t1, "t1", False, None, real, flat.device)
        if a == b:
            raise ValueError(f"t0 == t1 == {a}; the interval must be non-empty")
        u = float(torch.rand((), generator=gen, dtype=torch.float64, device=flat.device))
        # keep t_r strictly inside, so neither solve is empty
        u = min(max(u, 1e-6), 1 - 1e-6)
        tr = a + (b - a) * u
        span = abs(b - a)
        direction = 1.0 if b > a else -1.0
    first = solve(terms, solver, t0, tr, y0, saveat=SaveAt(t1=True), **solve_kwargs)
    yr = tree_map((lambda x: x[:, -1]) if per_sample else (lambda x: x[-1]), first.ys)
    # the second solve starts with the first's mean accepted step, not the starting-step heuristic:
    # that heuristic's small first step and the controller's ramp up from it cost the restart
    # several steps (digits benchmark: 64 -> 57 evaluations for the two pieces; the plain solve 44)
    n1 = first.stats["num_accepted"]
    if per_sample:
        n1 = torch.as_tensor(n1, device=tr.device).clamp(min=1).to(tr.dtype)
        dt0 = (tr - a).abs() / n1 * direction
    else:
        dt0 = abs(float(tr) - float(a)) / max(int(n1), 1) * direction
    second_kwargs = solve_kwargs
    if isinstance(controller, PIDController):
        second_kwargs = {**solve_kwargs, "dt0": dt0}
    first_h = isinstance(h, str) and h == "first"
    recorded = None
    second_solver = solver
    if first_h and not per_sample and isinstance(controller, PIDController) and _direct(solve_kwargs):
        # the local step is the second solve's first step: record its estimates there
        from ._global import _Recording

        pair = _stiffness_pair_for(solver, stiffness)
        second_solver = recorded = _Recording(solver, pair, False, rtol, atol, norm, first_only=True)
    second = solve(terms, second_solver, tr, t1, yr, saveat=SaveAt(t1=True), **second_kwargs)
    if recorded is not None and recorded.log:
        s0, s1, err, rho = recorded.log[0]
        h = (s1 - s0) * direction
        est = LocalEstimate(err, rho, tr, h)
    elif first_h:
        h = dt0
        est = None
    elif h is None or (isinstance(h, str) and h == "mean"):
        # the mean accepted step of the whole solve (the two pieces' steps together)
        n = first.stats["num_accepted"] + second.stats["num_accepted"]
        if per_sample:
            h = span / torch.as_tensor(n, device=span.device).clamp(min=1).to(span.dtype) * direction
        else:
            h = span / max(int(n), 1) * direction
    elif isinstance(h, str) and h == "start":
        if step_rtol is None:
            raise ValueError("h='start' needs tolerances: pass rtol and atol, or a controller=PIDController(...)")
        h = starting_step(
            terms, solver, tr, yr, direction, rtol=step_rtol, atol=step_atol, args=args, per_sample=per_sample
        )
    elif isinstance(h, str):
        raise ValueError(f"h must be a step size, None/'mean', 'first' or 'start'; got {h!r}")
    if recorded is None or not recorded.log:
        est = local_error(
            terms, solver, tr, yr, h, args, per_sample=per_sample, stiffness=stiffness, rtol=rtol, atol=atol,
            norm=norm,
        )  # fmt: skip
    stats = {k: v + first.stats.get(k, 0) for k, v in second.stats.items()}
    sol = dataclasses.replace(second, stats=stats, t0=first.t0)
    sc = span.to(est.error.dtype) if isinstance(span, torch.Tensor) else span
    rho = est.stiffness * sc if est.stiffness is not None else None
    return sol, LocalEstimate(est.error * sc, rho, tr, h)
