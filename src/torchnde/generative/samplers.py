r"""Samplers of diffusion models: thin presets over :func:`torchnde.solve`.

Each sampler builds a term from a process (:meth:`~DiffusionProcess.reverse_sde` or
:meth:`~DiffusionProcess.probability_flow`), picks a solver and a step policy, and calls
``solve`` once from ``t1`` down to ``t0``; none has a loop of its own. One signature serves all::

    out = sample(model, process, (2000, 2), nfe=100, sampler="euler_maruyama",
                 parameterisation="eps", seed=0)
    out.x, out.nfe

=====================  ================================================================  ============
``sampler``            method                                                            steps
=====================  ================================================================  ============
``"euler_maruyama"``   reverse-time SDE, Euler–Maruyama (Song et al. 2021)               ``nfe``
``"pc"``               predictor–corrector: Euler–Maruyama + Langevin corrector with a  ``nfe // (1 + n_corrector)``
                       signal-to-noise ratio ``snr`` (Song et al. 2021, Alg. 4–5)
``"pf_euler"``         probability-flow ODE, Euler                                       ``nfe``
``"pf_heun"``          probability-flow ODE, Heun (2 evaluations per step)               ``nfe // 2``
``"pf_adaptive"``      probability-flow ODE, ``Tsit5`` + ``PIDController(rtol, atol)``   adaptive
``"dpm_1"`` ...        DPM-Solver (noise prediction) / DPM-Solver++ (``"dpmpp_*"``, data  ``ceil(nfe / 2)``
``"dpmpp_3m"``         prediction), order ``k``, singlestep ``*ks`` or multistep ``*km``   (``*2s``), ``nfe // 3
                       (:class:`~torchnde.generative.fast_samplers.DPMSolver`); lower     + 1`` (``*3s``),
                       orders at the start (multistep) and, below 15 steps, at the end    ``nfe`` (``*m``)
``"edm_heun"``         EDM Heun, Karras et al. 2022 Alg. 1 (last step Euler on EDM)       ``nfe // 2``
``"edm_heun_sde"``     EDM Heun with churn (``s_churn``, ``s_tmin``, ``s_tmax``,          (EDM: ``(nfe + 1)
                       ``s_noise``), Alg. 2                                              // 2``)
``"sde_adaptive"``     reverse SDE, ``SPaRK`` + ``PIDController(rtol, atol)`` on a        adaptive
                       ``VirtualBrownianTree`` (rejected steps re-query the same path)
``"mrs_ode_2"`` ...    MRS for :class:`~torchnde.generative.processes.MeanReverting` only  ``nfe``
                       (Li et al. 2025): ``mrs_{ode,sde}[_eps]_{1,2}``, ODE or SDE form,
                       data (or ``_eps`` noise) prediction, order 1 or 2, multistep
                       (:class:`~torchnde.generative.mrs.MRSolver`)
=====================  ================================================================  ============

:data:`SAMPLERS` lists the first five, :data:`ALL_SAMPLERS` every name but the MRS presets
(:data:`~torchnde.generative.mrs.MRS_SAMPLERS`, which need a ``MeanReverting`` process). Every
fixed-grid sampler takes ``time_shift=True`` (the Time-Shift Sampler,
:mod:`~torchnde.generative.time_shift`).

Fixed-step samplers step along the process's time grid :meth:`~DiffusionProcess.times` (uniform
in ``t``, Karras et al.'s :math:`\rho`-schedule for :class:`EDM`) or a grid you pass as
``times``; the DPM-Solver presets default to a grid uniform in log-SNR
(:func:`~torchnde.generative.fast_samplers.logsnr_times`) except on :class:`EDM`. ``nfe`` is the
budget of model evaluations; the result reports the evaluations actually made
(``SampleResult.nfe``). The fixed-step samplers spend it exactly when it divides into whole
steps: e.g. ``pf_euler`` makes ``nfe`` evaluations and ``pf_heun`` ``2 * (nfe // 2)`` (explicit
Runge--Kutta solvers without FSAL evaluate the derivative at a step's start lazily, so the end
point of the last step is never evaluated).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._saveat import SaveAt
from .._solution import Solution
from .._solve import solve
from .._terms import ControlTerm, ODETerm
from ..controllers import PIDController, StepTo
from ..paths import BrownianGrid, VirtualBrownianTree
from ..solvers import Euler, Heun, SPaRK, Tsit5
from ..solvers._base import AbstractERK, AbstractSolver, linear_coeffs
from ..solvers._tableau import ButcherTableau
from ._shapes import batch_hint, check_shape, event_mismatch, event_shape_of
from .fast_samplers import (
    DPM_SAMPLERS,
    FAST_SAMPLERS,
    DPMSolver,
    EDMHeun,
    _direct_vf,
    _tree_of,
    dpm_orders,
    dpm_steps,
    edm_heun_steps,
    logsnr_times,
)
from .mrs import MRS_SAMPLERS, MRSolver
from .parameterisation import Parameterisation
from .processes import EDM, DiffusionProcess, _Diffusion, _ReverseDrift
from .time_shift import TimeShift

__all__ = ["sample", "SampleResult", "SAMPLERS", "ALL_SAMPLERS", "LangevinCorrector"]


@dataclass
class SampleResult:
    """What :func:`sample` returns.

    Attributes:
        x: the samples, shape ``shape``.
        nfe: model evaluations made (the corrector's included).
        num_steps: solver steps taken (accepted + rejected).
        solution: the :class:`~torchnde.Solution` of the solve.
    """

    x: torch.Tensor
    nfe: int
    num_steps: Any
    solution: Solution


# ------------------------------------------------------------------------- Langevin corrector
class LangevinCorrector(AbstractSolver):
    r"""Predictor–corrector step for a reverse-time SDE (Song et al. 2021, Algorithms 4 and 5).

    At the start of each step, ``n_corrector`` Langevin MCMC steps at the current time
    :math:`x \leftarrow x + \epsilon\,s(x) + \sqrt{2\epsilon}\,z` with the step size
    :math:`\epsilon = 2 (r\,\overline{\|z\|} / \overline{\|s(x)\|})^2` set by the signal-to-noise
    ratio ``snr`` = r, with the norms averaged over the batch as in Song et al.'s code (per-sample
    norms make the step explode where the score vanishes; so here a sample's corrector step size
    depends on the rest of the batch), then one
    Euler–Maruyama step of the reverse SDE (the predictor). The corrector's normals come from
    ``noise``, a Brownian path of shape ``(n_corrector, *shape)`` independent of the SDE's path
    (each increment over the step, normalised).

    A solver object built per sampling call (it holds the score function); fixed steps only, not
    per-sample.
    """

    order: ClassVar = None
    dense_order: ClassVar = 1
    strong_order: ClassVar = {"additive": 0.5}
    calculus: ClassVar = "ito"

    def __init__(self, score_fn: Callable, noise, *, snr: float = 0.16, n_corrector: int = 1):
        if not snr > 0:
            raise ValueError(f"snr must be > 0, got {snr}")
        if isinstance(n_corrector, bool) or not isinstance(n_corrector, numbers.Integral) or n_corrector < 1:
            raise ValueError(f"n_corrector must be an int >= 1, got {n_corrector!r}")
        self.score_fn, self.noise, self.snr, self.n_corrector = score_fn, noise, float(snr), int(n_corrector)

    def __repr__(self):
        return f"LangevinCorrector(snr={self.snr}, n_corrector={self.n_corrector})"

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def init(self, term, t0, y0):
        return None

    def step(self, term, t0, t1, y0, state):
        if not isinstance(t0, float):
            raise NotImplementedError("the predictor-corrector sampler does not support per_sample=True")
        sign = term.sign
        s, t = sign * t0, sign * t1
        x = term.flat.state_to_tree(y0)
        zs = self.noise.evaluate(min(s, t), max(s, t)) / math.sqrt(abs(t - s))
        for j in range(self.n_corrector):
            z = zs[j]
            grad = self.score_fn(s, x)
            b = x.shape[0]
            gn = grad.reshape(b, -1).norm(dim=-1).mean()
            zn = z.reshape(b, -1).norm(dim=-1).mean()
            eps = 2 * (self.snr * zn / gn.clamp(min=torch.finfo(x.dtype).tiny)) ** 2
            x = x + eps * grad + torch.sqrt(2 * eps) * z
        y = term.flat.tree_to_state(x)
        y1 = y + term.vf_prod(t0, y, term.contr(t0, t1))
        return y1, None, (y0, y1), None, None

    def dense_coeffs(self, term, dense_info):
        return linear_coeffs(*dense_info)


# ---------------------------------------------------------------------------------- sample()
def _prediction_field(f):
    """A model's prediction ``f(t, x)`` as the vector field of an ``ODETerm``: a plain function,
    whose signature a term reads once per code object (an object's at every term built)."""

    def prediction(t, x, args=None):
        return f(t, x)

    prediction.event_shape = event_shape_of(f)
    return prediction


def _prediction_term(model, process: DiffusionProcess, parameterisation: str):
    """The ``ODETerm`` of ``model``'s own prediction (of kind ``parameterisation``) and the counted
    prediction behind it (its ``calls`` are the model's evaluations)."""
    predict = Parameterisation(parameterisation, process).as_kind(model, parameterisation)
    return ODETerm(_prediction_field(predict), time_as_float=True), predict


def _check_sample_shape(model, shape) -> tuple[int, ...]:
    """``shape`` checked, and against the ``event_shape`` the model declares (if any)."""
    shape = check_shape(shape)
    expected = event_shape_of(model)
    if expected is not None and shape[1:] != expected:
        raise event_mismatch(f"shape={shape}", expected, f"shape={batch_hint(expected)}")
    return shape


def _initial_state(process: DiffusionProcess, shape, x_init, seed: int, dtype, device) -> torch.Tensor:
    """A prior draw of ``shape`` from a generator seeded with ``seed``, or ``x_init`` (checked
    to have ``shape``)."""
    if x_init is None:
        dev = torch.device(device) if device is not None else torch.get_default_device()
        gen = torch.Generator(device=dev).manual_seed(int(seed))
        return process.prior_sample(shape, generator=gen, dtype=dtype, device=dev)
    if tuple(x_init.shape) != shape:
        raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected {tuple(shape)}")
    return x_init


class _FixedHeun(AbstractERK):
    """Heun's method without its embedded error estimate: on the fixed grid of ``"pf_heun"`` the
    estimate would be computed at every step and never read (same steps as :class:`Heun`)."""

    tableau = ButcherTableau(c=Heun.tableau.c, a=Heun.tableau.a, b=Heun.tableau.b)
    order = Heun.order
    dense_order = Heun.dense_order

    def __repr__(self):
        return "Heun()"


class _FlowEuler(AbstractSolver):
    """Euler's method for ``"pf_euler"`` (shared float times; ``Euler()`` otherwise): the same
    steps and values as :class:`Euler` (``y1 = y0 + h f(t0, y0)``), with the probability-flow
    field called directly at the real time in the state's own shape once the first step has
    checked its output (no flat view or sign flips per step). Linear dense output."""

    order: ClassVar = 1
    dense_order: ClassVar = 1

    def __repr__(self):
        return "Euler()"

    def init(self, term, t0, y0):
        return None

    def step(self, term, t0, t1, y0, state):
        f = _direct_vf(term) if type(t0) is float else None
        if f is not None and term.sign < 0:  # the field at real time -t0 is -f(t0): step by -h
            x = _tree_of(term, y0, state)
            term.nfe += 1
            x1 = torch.add(x, f(-t0, x, term.args), alpha=t0 - t1)
            y1 = term.flat.tree_to_state(x1)
            return y1, None, (y0, y1), (y1, x1), None
        y1 = torch.add(y0, term.vf(t0, y0), alpha=t1 - t0)
        return y1, None, (y0, y1), None, None

    def dense_coeffs(self, term, dense_info):
        return linear_coeffs(*dense_info)


class _ReverseEulerMaruyama(Euler):
    """Euler--Maruyama for the reverse SDE that ``sample`` builds (``"euler_maruyama"``): the same
    steps and values as :class:`Euler` on it, ``y1 = y0 + (f dt + g dW)``, with the drift called
    directly at the real time in the state's own shape and the (additive) diffusion as a float
    (no ``full_like`` tensor), once the first step has checked the term's outputs."""

    def __repr__(self):
        return "Euler()"

    def __init__(self, process):
        self._g: dict = {}
        self._process = process
        self._term = self._drift = None  # the term checked last, and its drift's evaluation

    def _direct(self, term):
        """The drift's evaluation ``(t, x)`` if ``term`` is the sampler's reverse SDE with its
        outputs checked, else ``None`` (checked once per solve)."""
        if term is self._term:
            return self._drift
        sde = getattr(term, "sde", None)
        if not (
            sde is not None and term.checked and term.checked_g and term.checked_w and not term.custom
            and term.flat.single and type(sde.drift) is ODETerm and type(sde.control) is ControlTerm
        ):  # fmt: skip
            return None
        impl = getattr(sde.drift.vector_field, "impl", None)
        if not (
            isinstance(impl, _ReverseDrift) and isinstance(getattr(sde.control.vector_field, "impl", None), _Diffusion)
        ):
            return None
        self._term, self._drift = term, impl._eval
        return self._drift

    def step(self, term, t0, t1, y0, state):
        drift = self._direct(term) if type(t0) is float and term.sign < 0 else None
        if drift is not None:
            s = -t0  # the real time
            g = self._g.get(s)
            if g is None:
                if len(self._g) > 4096:
                    self._g.clear()
                g = self._g[s] = self._process.diffusion(s)
            w = term.noise(t0, t1)
            x = _tree_of(term, y0, state)
            term.nfe += 1
            term.nfe_diffusion += 1
            x1 = x + torch.add(w * g, drift(s, x), alpha=t0 - t1)
            y1 = term.flat.tree_to_state(x1)
            return y1, None, (y0, y1), (y1, x1), None
        return super().step(term, t0, t1, y0, state)


SAMPLERS = ("euler_maruyama", "pc", "pf_euler", "pf_heun", "pf_adaptive")
#: every sampler name of every process: :data:`SAMPLERS` and those of
#: :mod:`~torchnde.generative.fast_samplers` (``sample`` also takes the MRS presets of
#: :mod:`~torchnde.generative.mrs`, ``"mrs_ode_2"``, ..., for ``MeanReverting`` processes only)
ALL_SAMPLERS = SAMPLERS + FAST_SAMPLERS
_ADAPTIVE = ("pf_adaptive", "sde_adaptive")
_DEFAULT_TOL = {"pf_adaptive": 1e-5, "sde_adaptive": 1e-2}


def _steps_for(sampler: str, nfe: int, n_corrector: int, process: DiffusionProcess | None = None) -> int:
    """The grid's number of steps for a budget of ``nfe`` evaluations (``process``: EDM Heun's
    final Euler step; also used by :func:`~torchnde.generative.multi.multi_sample`)."""
    if sampler == "pf_heun":
        n = nfe // 2
    elif sampler == "pc":
        n = nfe // (1 + n_corrector)
    elif sampler in DPM_SAMPLERS:
        n = dpm_steps(sampler, nfe)
    elif sampler in ("edm_heun", "edm_heun_sde"):
        n = edm_heun_steps(process, nfe)
    else:
        n = nfe
    if n < 1:
        raise ValueError(f"nfe={nfe} is too small for sampler {sampler!r} (it leaves no step)")
    return n


def _check_nfe(sampler: str, nfe) -> int:
    """``nfe`` of a fixed-grid sampler without ``times``: an int >= 1."""
    if nfe is None:
        raise ValueError(f"sampler {sampler!r} needs nfe=... (the number of model evaluations)")
    if isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral) or nfe < 1:
        raise ValueError(f"nfe must be an int >= 1, got {nfe!r}")
    return int(nfe)


def _times_grid(times) -> torch.Tensor:
    """The user's ``times`` as a float64 CPU grid, checked to be strictly decreasing."""
    grid = torch.as_tensor(times, dtype=torch.float64).detach().cpu().reshape(-1)
    if grid.numel() < 2 or not (grid[1:] < grid[:-1]).all():
        raise ValueError("times must be a strictly decreasing grid of at least two times")
    return grid


def sample(
    model: Callable,
    process: DiffusionProcess,
    shape,
    *,
    nfe: int | None = None,
    sampler: str = "euler_maruyama",
    parameterisation: str = "score",
    seed: int | None = None,
    callback: Callable | None = None,
    x_init: torch.Tensor | None = None,
    times=None,
    t_start: float | None = None,
    t_end: float | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
    rtol: float | None = None,
    atol: float | None = None,
    snr: float = 0.16,
    n_corrector: int = 1,
    solver: AbstractSolver | None = None,
    per_sample: bool = False,
    max_steps: int | None = None,
    progress=None,
    s_churn: float | None = None,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    wrap_solver: Callable | None = None,
    time_shift: bool | TimeShift | None = None,
) -> SampleResult:
    """Draw samples from a diffusion model by solving its reverse SDE or probability-flow ODE.

    Args:
        model: ``model(t, x)`` predicting ``parameterisation`` (``t`` a ``(B,)`` tensor in ``x``'s
            dtype); an exact oracle's ``score_fn`` / ``model`` works too.
        process: the forward process the model was trained on.
        shape: of the samples, ``(batch, *event_shape)``. A model that declares its
            ``event_shape`` (torchnde's ``MLP``, the exact oracles) is checked against it up
            front; for any other model, a shape error raised by its first call is re-raised as a
            :class:`~torchnde.generative.ModelShapeError` (a ``ValueError``) naming the
            shape it received.
        nfe: budget of model evaluations (fixed-step samplers; required). The adaptive sampler
            ignores it (its cost is set by ``rtol``/``atol``) and reports what it used.
        sampler: one of :data:`ALL_SAMPLERS`, or for a
            :class:`~torchnde.generative.processes.MeanReverting` process one of
            :data:`~torchnde.generative.mrs.MRS_SAMPLERS`.
        parameterisation: what the model predicts: ``"eps"``, ``"x0"``, ``"v"``, ``"score"`` or
            ``"velocity"``.
        seed: seeds the prior draw and the Brownian path (``None``: drawn from torch's global
            generator, so ``torch.manual_seed`` makes runs repeatable).
        callback: ``callback(i, t, x)`` for every accepted step ``i = 0, 1, ...`` with the step's
            end time and state, called in order after the solve (the states are saved with
            ``SaveAt(steps=True)``).
        x_init: the starting state at ``t_start`` instead of a prior draw.
        times: a decreasing grid of step times from ``t_start`` to ``t_end`` (fixed-step samplers;
            overrides ``nfe``'s grid).
        t_start, t_end: the interval (default ``process.t1`` and ``process.t0``).
        dtype, device: of the samples (ignored with ``x_init``).
        rtol, atol: tolerances of ``"pf_adaptive"`` (default 1e-5) and ``"sde_adaptive"`` (default
            1e-2: an SDE solver's error falls slowly with the step, so 1e-5 would take many
            thousands of steps).
        snr, n_corrector: the Langevin corrector of ``"pc"``.
        solver: override the sampler's solver (e.g. ``RK4()`` for a fixed-step PF-ODE, ``SRA1()``
            is not supported here since it needs a Lévy-area path). A DPM preset's term returns
            the model's own output, so a :class:`DPMSolver` passed to one needs
            ``term_kind=parameterisation`` (checked).
        per_sample: per-sample adaptive steps (``"pf_adaptive"``).
        max_steps: passed to ``solve`` (default: enough for the grid, 4096 for adaptive).
        progress: passed to ``solve``.
        s_churn, s_tmin, s_tmax, s_noise: the churn of ``"edm_heun_sde"`` (Karras et al. 2022,
            Alg. 2; ``s_churn`` defaults to 10 there, and is 0 for ``"edm_heun"``).
        wrap_solver: ``wrap_solver(solver) -> solver`` applied to the sampler's solver, e.g.
            :class:`~torchnde.generative.conditional.Inpaint` (conditioning on any sampler).
        time_shift: the Time-Shift Sampler (Li et al. 2024; fixed-grid samplers): ``True`` or a
            :class:`~torchnde.generative.time_shift.TimeShift` of options; the model is run at the
            time whose noise level matches the state's variance, within a window around the grid
            time (see :mod:`~torchnde.generative.time_shift`).

    Returns:
        :class:`SampleResult`.
    """
    if sampler not in ALL_SAMPLERS and sampler not in MRS_SAMPLERS:
        raise ValueError(
            f"unknown sampler {sampler!r}; choose one of {ALL_SAMPLERS} (or, for MeanReverting, {tuple(MRS_SAMPLERS)})"
        )
    if not isinstance(process, DiffusionProcess):
        raise TypeError(f"process must be a DiffusionProcess such as VP(), got {type(process).__name__}")
    shape = _check_sample_shape(model, shape)
    t_start = process.t1 if t_start is None else float(t_start)
    t_end = process.t0 if t_end is None else float(t_end)
    if not t_start > t_end:
        raise ValueError(f"sampling runs backwards in time: need t_start > t_end, got {t_start}, {t_end}")
    fixed = sampler not in _ADAPTIVE
    if time_shift is not None and time_shift is not False:
        if not fixed:
            raise ValueError(f"time_shift is an option of the fixed-grid samplers, not of {sampler!r}")
        if time_shift is True:
            time_shift = TimeShift()
        if not isinstance(time_shift, TimeShift):
            raise TypeError(f"time_shift must be True, False/None or a TimeShift(...), got {type(time_shift).__name__}")
        model = time_shift.wrap(model, process)
    if fixed and times is None:
        n = _steps_for(sampler, _check_nfe(sampler, nfe), n_corrector, process)
        if (sampler in DPM_SAMPLERS or sampler in MRS_SAMPLERS) and not isinstance(process, EDM):
            grid = logsnr_times(process, n, t_start=t_start, t_end=t_end)
        elif t_start == process.t1 and t_end == process.t0:
            grid = process.times(n)
        else:
            grid = torch.linspace(t_start, t_end, n + 1, dtype=torch.float64)
    elif fixed:
        grid = _times_grid(times)
        t_start, t_end = float(grid[0]), float(grid[-1])
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    x = _initial_state(process, shape, x_init, seed, dtype, device)
    score = Parameterisation(parameterisation, process).as_score(model)

    def brownian(s, extra=(), levy_area=None):
        kw = dict(seed=s, dtype=x.dtype, device=x.device)
        if fixed:  # increments of the grid's cells, sampled up front
            return BrownianGrid(grid.flip(0), (*extra, *x.shape), **kw)
        return VirtualBrownianTree(t_end, t_start, (*extra, *x.shape), levy_area=levy_area, **kw)

    if sampler == "sde_adaptive":
        step = solver or SPaRK()
        path = brownian(int(seed), levy_area=getattr(step, "levy_area", None))
        terms = process.reverse_sde(score, x.shape, path=path)
    elif sampler in DPM_SAMPLERS or sampler in MRS_SAMPLERS:
        # the model's own output (counted); the solver converts it with cached coefficients
        terms, predict = _prediction_term(model, process, parameterisation)
        score = predict  # counts the model's evaluations
        if isinstance(solver, DPMSolver) and solver.term_kind != parameterisation:
            raise ValueError(
                f"the {sampler!r} preset's term returns the model's own output ({parameterisation!r}); "
                f"build the solver with {type(solver).__name__}(..., term_kind={parameterisation!r}), "
                f"got {solver.term_kind!r}"
            )
        if sampler in DPM_SAMPLERS:
            order, multistep, prediction = DPM_SAMPLERS[sampler]
            step = solver or DPMSolver(
                process,
                order,
                multistep=multistep,
                prediction=prediction,
                term_kind=parameterisation,
                num_steps=grid.numel() - 1,
                orders=dpm_orders(sampler, int(nfe)) if times is None else None,
            )
        else:
            order, sde, prediction = MRS_SAMPLERS[sampler]
            step = solver or MRSolver(
                process,
                order,
                prediction=prediction,
                sde=sde,
                term_kind=parameterisation,
                num_steps=grid.numel() - 1,
                noise=brownian(int(seed)) if sde else None,
            )
    elif sampler in ("edm_heun", "edm_heun_sde"):
        terms = process.probability_flow(score)
        churn = 0.0 if sampler == "edm_heun" else (10.0 if s_churn is None else float(s_churn))
        noise = brownian(int(seed) + 1) if churn > 0 else None
        step = solver or EDMHeun(
            process,
            s_churn=churn,
            s_tmin=s_tmin,
            s_tmax=s_tmax,
            s_noise=s_noise,
            num_steps=grid.numel() - 1,
            noise=noise,
        )
    elif sampler in ("euler_maruyama", "pc"):
        terms = process.reverse_sde(score, x.shape, path=brownian(int(seed)))
        if sampler == "pc":
            corrector_noise = brownian(int(seed) + 1, (n_corrector,))
            step = LangevinCorrector(score, corrector_noise, snr=snr, n_corrector=n_corrector)
        else:
            step = solver or (Euler() if per_sample else _ReverseEulerMaruyama(process))
    else:
        terms = process.probability_flow(score)
        euler = Euler() if per_sample else _FlowEuler()
        step = solver or {"pf_euler": euler, "pf_heun": _FixedHeun(), "pf_adaptive": Tsit5()}[sampler]
    if fixed and not per_sample:  # the model's time tensors of the grid, made at once
        score.prefill_times(grid, x)
    if wrap_solver is not None:
        step = wrap_solver(step)
    if fixed:
        controller, dt0 = StepTo(grid), None
        steps = max_steps if max_steps is not None else grid.numel() + 8
    else:
        tol = _DEFAULT_TOL[sampler]
        controller = PIDController(rtol=tol if rtol is None else rtol, atol=tol if atol is None else atol)
        dt0 = None
        steps = max_steps if max_steps is not None else 4096
    saveat = SaveAt(steps=True) if callback is not None else SaveAt(t1=True)
    sol = solve(
        terms,
        step,
        t_start,
        t_end,
        x,
        dt0=dt0,
        controller=controller,
        saveat=saveat,
        max_steps=steps,
        per_sample=per_sample,
        progress=progress,
    )
    if callback is not None:
        ts, ys = sol.ts, sol.ys
        for i in range(ys.shape[1] if per_sample else ys.shape[0]):
            if per_sample:
                callback(i, ts[:, i], ys[:, i])
            else:
                callback(i, float(ts[i]), ys[i])
        out = ys[:, -1] if per_sample else ys[-1]
        if per_sample:  # rows are padded past each sample's last step: take the last finite one
            last = torch.isfinite(ts).sum(-1) - 1
            out = ys[torch.arange(ys.shape[0], device=ys.device), last]
    else:
        out = sol.ys[-1] if not per_sample else sol.ys[:, -1]
    return SampleResult(x=out, nfe=score.calls, num_steps=sol.stats["num_steps"], solution=sol)
