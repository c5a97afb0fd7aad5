r"""Fast diffusion samplers as solvers for :func:`torchnde.solve`: DPM-Solver, DPM-Solver++ and
EDM Heun.

Each is an :class:`~torchnde.solvers.AbstractSolver` whose ``step`` is one step of the method;
``solve`` does the stepping (on the sampler's time grid through ``ConstantStepSize`` with
``step_ts``), and anything carried between steps (the multistep history) lives in the solver
state. :func:`torchnde.generative.samplers.sample` registers them under the names of
:data:`FAST_SAMPLERS`; they can also be used directly::

    term = process.probability_flow(score)          # or ODETerm of an x0/eps prediction
    sol = tn.solve(term, DPMSolver(process, order=2), process.t1, process.t0, x1,
                   dt0=process.t0 - process.t1, controller=grid_controller)

**DPM-Solver** (Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver: a fast ODE solver for diffusion
probabilistic model sampling in around 10 steps", NeurIPS) and **DPM-Solver++** (Lu et al. 2022b,
"DPM-Solver++: fast solver for guided sampling of diffusion probabilistic models") integrate the
probability-flow ODE exactly in its linear part. In the log-SNR :math:`\lambda = \log(\alpha /
\sigma)` and with :math:`y = x - m(t)` (the marginal :math:`x_t = \alpha x_0 + m + \sigma
\varepsilon`), the ODE's solution from ``s`` to ``t`` (:math:`h = \lambda_t - \lambda_s`) is

.. math::
    y_t = \frac{\alpha_t}{\alpha_s} y_s - \sigma_t \int_0^h e^{h-u}\,\hat\varepsilon(\lambda_s + u)\,du
        = \frac{\sigma_t}{\sigma_s} y_s + \alpha_t \int_0^h e^{-(h-u)}\,\hat x_0(\lambda_s + u)\,du,

the noise-prediction form (DPM-Solver) and the data-prediction form (DPM-Solver++). A Taylor
expansion of the prediction in :math:`\lambda` gives the order-:math:`k` update

.. math:: y_t = \tfrac{\alpha_t}{\alpha_s} y_s - \sigma_t \sum_{j<k} h^{j+1}\varphi_{j+1}(h)\,
          \hat\varepsilon^{(j)}_s \quad\text{or}\quad
          y_t = \tfrac{\sigma_t}{\sigma_s} y_s + \alpha_t \sum_{j<k} h^{j+1}\varphi_{j+1}(-h)\,
          \hat x^{(j)}_{0,s},

with :math:`\varphi_1(z) = (e^z - 1)/z`, :math:`\varphi_{j+1}(z) = (\varphi_j(z) - 1/j!)/z`. The
derivatives come from extra evaluations inside the step at log-SNR-uniform intermediate times
(*singlestep*: :math:`r = 1/2` for order 2; :math:`r = 1/3, 2/3` for order 3, Lu et al.'s
DPM-Solver-3, which uses only the last difference) or from the previous steps' predictions
(*multistep*: divided differences on the non-uniform :math:`\lambda` grid; the first steps use
lower orders). These are the "Taylor" forms of the papers' updates (same orders). Order 1 is DDIM
(Song, Meng & Ermon 2021).

*Budgets.* A budget of ``nfe`` evaluations is spent exactly (:func:`dpm_orders`,
:func:`dpm_steps`): singlestep solvers take Lu et al.'s (2022a, Sec. 3.4) "DPM-Solver-fast"
schedule, ``nfe // k + 1`` steps of order ``k`` ending in a step or two of lower order
(:func:`singlestep_orders`), rather than ``nfe // k`` steps (at ``nfe = 5`` third order made one
step of 3 evaluations, far outside its region of accuracy); multistep solvers make ``nfe`` steps,
and on grids shorter than :data:`LOWER_ORDER_FINAL_STEPS` their last steps have orders ..., 2, 1
(Lu et al. 2022b's ``lower_order_final``: high-order multistep updates over a few large final
log-SNR steps are unstable; :func:`multistep_orders`). Measured with the exact score of a 2-D
8-Gaussian mixture (``benchmarks/generative.py``), at 5 evaluations: DPM-Solver-3 singlestep
W2 41 / 67 (VP / EDM) -> 0.59 / 1.05, DPM-Solver++(3M) 0.81 / 1.94 -> 0.33 / 0.34,
DPM-Solver++(2M) 0.48 / 0.93 -> 0.29 / 0.32 (an exact draw's floor: 0.13). On the
noise-prediction multistep solvers the final lower orders are about neutral (0.19 -> 0.19 on VP,
0.22-0.25 -> 0.27 on EDM at 5 evaluations).

**EDM Heun** (Karras, Aittala, Aila & Laine 2022, "Elucidating the design space of
diffusion-based generative models", Algorithms 1 and 2): Heun's method on the probability-flow
ODE along Karras's :math:`\rho`-grid, with optional "churn": before each step with time in
``[s_tmin, s_tmax]`` the state is pushed forward in noise to :math:`\hat t = t(1 + \gamma)`,
:math:`\gamma = \min(S_{churn}/N, \sqrt2 - 1)`, by the process's exact forward transition (for
:class:`~torchnde.generative.processes.EDM`: :math:`\hat x = x + \sqrt{\hat t^2 - t^2}\,S_{noise}
\varepsilon`), then the Heun step runs from :math:`\hat t`.
On :class:`~torchnde.generative.processes.EDM` the last step is an Euler step, as in Karras et
al.'s algorithms (``final_euler``; :func:`edm_heun_steps` gives the steps of a budget).
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar

import torch

from .._terms import ODETerm
from ..solvers._base import AbstractSolver, linear_coeffs
from .parameterisation import KINDS, Parameterisation
from .processes import EDM, VE, VP, DiffusionProcess, MeanReverting, SubVP

__all__ = [
    "DPMSolver",
    "EDMHeun",
    "logsnr",
    "logsnr_times",
    "dpm_steps",
    "edm_heun_steps",
    "dpm_orders",
    "singlestep_orders",
    "multistep_orders",
    "LOWER_ORDER_FINAL_STEPS",
    "FAST_SAMPLERS",
    "DPM_SAMPLERS",
]

#: the DPM-Solver presets of :func:`~torchnde.generative.samplers.sample`: ``name -> (order,
#: multistep, prediction)``; ``dpm_*`` predict the noise (DPM-Solver), ``dpmpp_*`` the data
#: (DPM-Solver++); ``s`` singlestep, ``m`` multistep.
DPM_SAMPLERS = {
    "dpm_1": (1, True, "eps"),
    "dpm_2s": (2, False, "eps"),
    "dpm_3s": (3, False, "eps"),
    "dpm_2m": (2, True, "eps"),
    "dpm_3m": (3, True, "eps"),
    "dpmpp_1": (1, True, "x0"),
    "dpmpp_2s": (2, False, "x0"),
    "dpmpp_3s": (3, False, "x0"),
    "dpmpp_2m": (2, True, "x0"),
    "dpmpp_3m": (3, True, "x0"),
}
#: the samplers of this module (registered in ``sample``)
FAST_SAMPLERS = (*DPM_SAMPLERS, "edm_heun", "edm_heun_sde", "sde_adaptive")


# ------------------------------------------------------------------------------------ log-SNR
def logsnr(process: DiffusionProcess, t: float) -> float:
    r""":math:`\lambda(t) = \log\alpha(t) - \log\sigma(t)` (decreasing in ``t``)."""
    a, s = process.marginal(float(t))
    return math.log(a) - math.log(s)


def _softplus(z: float) -> float:
    return z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))


def _t_of_logsnr(process, lam: float, lo: float, hi: float) -> float:
    """The time in ``[lo, hi]`` with log-SNR ``lam``: closed forms for VP, sub-VP, VE, EDM and
    MeanReverting (and a process's own ``_t_of_logsnr_f(lam)`` if it has one), bisection
    otherwise."""
    t = None
    custom = getattr(process, "_t_of_logsnr_f", None)  # a process's own closed form
    if custom is not None:
        t = custom(lam)
    elif isinstance(process, MeanReverting):  # alpha^2 / sigma^2 = 2 theta / (s^2 (e^(2 theta t) - 1))
        th = process.theta
        t = math.log1p(2 * th * math.exp(-2 * lam) / process.sigma**2) / (2 * th)
    elif isinstance(process, EDM):
        t = math.exp(-lam)
    elif isinstance(process, VE):
        t = (-lam - math.log(process.sigma_min)) / math.log(process.sigma_max / process.sigma_min)
    elif isinstance(process, VP):  # also SubVP
        if isinstance(process, SubVP):  # alpha / (1 - alpha^2) = e^lam
            e = math.exp(lam)
            alpha = 2 * e / (1 + math.sqrt(1 + 4 * e * e))
            B = -2 * math.log(alpha)  # the integral of beta
        else:  # alpha^2 / (1 - alpha^2) = e^(2 lam)
            B = _softplus(-2 * lam)
        b0, db = process.beta_min, process.beta_max - process.beta_min
        t = B / b0 if db == 0 else 2 * B / (b0 + math.sqrt(b0 * b0 + 2 * db * B))
    if t is not None:
        return min(max(t, lo), hi)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if logsnr(process, mid) > lam:  # lambda decreases in t: the root is later
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def logsnr_times(process: DiffusionProcess, n: int, *, t_start=None, t_end=None, dtype=torch.float64, device=None):
    """``n + 1`` decreasing times from ``t_start`` (default ``process.t1``) to ``t_end``
    (``process.t0``) uniform in log-SNR (the grid Lu et al. 2022 recommend for singlestep
    DPM-Solver)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"the number of steps must be an int >= 1, got {n!r}")
    hi = process.t1 if t_start is None else float(t_start)
    lo = process.t0 if t_end is None else float(t_end)
    l_hi, l_lo = logsnr(process, hi), logsnr(process, lo)
    ts = [hi]
    for i in range(1, n):
        ts.append(_t_of_logsnr(process, l_hi + (l_lo - l_hi) * i / n, lo, hi))
    ts.append(lo)
    return torch.tensor(ts, dtype=dtype, device=device)


def _phis(z: float, k: int) -> list[float]:
    r""":math:`[\varphi_1(z), ..., \varphi_k(z)]` (series for small ``|z|``)."""
    if abs(z) < 1e-2:
        # phi_j(z) = sum_m z^m / (m + j)!
        return [sum(z**m / math.factorial(m + j) for m in range(8)) for j in range(1, k + 1)]
    out = [math.expm1(z) / z]
    for j in range(1, k):
        out.append((out[-1] - 1 / math.factorial(j)) / z)
    return out


# ------------------------------------------------------------------------------- step schedules
#: multistep solvers with fewer steps than this use lower orders in their last steps by default
#: (``lower_order_final``; the threshold of Lu et al.'s reference code)
LOWER_ORDER_FINAL_STEPS = 15


def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


def singlestep_orders(order: int, nfe: int) -> tuple[int, ...]:
    """Per-step orders of singlestep DPM-Solver of ``order`` that spend exactly ``nfe``
    evaluations (Lu et al. 2022a, Sec. 3.4, "DPM-Solver-fast"): order 3 makes
    ``nfe // 3 + 1`` steps of orders ``[3, ..., 3, 2, 1]`` (``nfe % 3 == 0``), ``[3, ..., 3, 1]``
    (``nfe % 3 == 1``) or ``[3, ..., 3, 2]`` (``nfe % 3 == 2``); order 2 makes ``[2, ..., 2]`` or
    ``[2, ..., 2, 1]``; order 1 ``nfe`` steps of order 1. Every budget ``>= 1`` gives a step."""
    order, nfe = _check_int("order", order, 1), _check_int("nfe", nfe, 1)
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if order == 1:
        return (1,) * nfe
    if order == 2:
        return (2,) * (nfe // 2) + ((1,) if nfe % 2 else ())
    k = nfe // 3 + 1
    tail = {0: (2, 1), 1: (1,), 2: (2,)}[nfe % 3]
    return (3,) * (k - len(tail)) + tail


def multistep_orders(order: int, num_steps: int, *, lower_order_final: bool = True) -> tuple[int, ...]:
    """Per-step orders of multistep DPM-Solver of ``order`` over ``num_steps`` steps: the first
    steps are limited by the history (warm-up, orders 1, 2, ...), and with ``lower_order_final``
    and fewer than :data:`LOWER_ORDER_FINAL_STEPS` steps the last ones by the number of steps
    left (orders ..., 2, 1; Lu et al. 2022b, DPM-Solver++, whose code does this because
    high-order multistep steps are unstable when the steps in log-SNR are few and large)."""
    order, num_steps = _check_int("order", order, 1), _check_int("num_steps", num_steps, 1)
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    final = lower_order_final and num_steps < LOWER_ORDER_FINAL_STEPS
    return tuple(min(order, i + 1, num_steps - i if final else order) for i in range(num_steps))


def _preset(sampler):
    if sampler not in DPM_SAMPLERS:
        raise ValueError(f"unknown DPM-Solver preset {sampler!r}; choose one of {tuple(DPM_SAMPLERS)}")
    return DPM_SAMPLERS[sampler]


def dpm_orders(sampler: str, nfe: int, *, lower_order_final: bool = True) -> tuple[int, ...]:
    """Per-step orders of the preset ``sampler`` (a key of :data:`DPM_SAMPLERS`) at a budget of
    ``nfe`` evaluations: :func:`singlestep_orders` or :func:`multistep_orders` (one evaluation
    per step). Their costs add up to ``nfe`` exactly."""
    order, multistep, _ = _preset(sampler)
    if multistep:
        return multistep_orders(order, nfe, lower_order_final=lower_order_final)
    return singlestep_orders(order, nfe)


def dpm_steps(sampler: str, nfe: int) -> int:
    """The number of grid steps of the preset ``sampler`` at a budget of ``nfe`` evaluations
    (``len(dpm_orders(sampler, nfe))``: ``nfe`` multistep; singlestep ``nfe`` for order 1,
    ``ceil(nfe / 2)`` for order 2, ``nfe // 3 + 1`` for order 3); 0 if ``nfe < 1``."""
    order, multistep, _ = _preset(sampler)
    if isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral):
        raise ValueError(f"nfe must be an int, got {nfe!r}")
    if nfe < 1:
        return 0
    return int(nfe) if multistep else len(singlestep_orders(order, int(nfe)))


def edm_heun_steps(process: DiffusionProcess, nfe: int, final_euler: bool | None = None) -> int:
    """The number of grid steps of :class:`EDMHeun` at a budget of ``nfe`` evaluations: with a
    final Euler step (the default on :class:`EDM`) ``(nfe + 1) // 2`` (``2N - 1`` evaluations for
    ``N`` steps, as Karras et al.), otherwise ``nfe // 2``; 0 if that leaves no step."""
    if isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral):
        raise ValueError(f"nfe must be an int, got {nfe!r}")
    if final_euler is None:
        final_euler = isinstance(process, EDM)
    return max(int(nfe) + 1 if final_euler else int(nfe), 0) // 2


# --------------------------------------------------------------------------------- DPM-Solver
def _tree_of(term, y, state):
    """The state ``y`` in the user's shape: the tensor a step kept in its solver state
    ``(y1, x1)`` when ``y`` is that step's ``y1`` (the shaped tensor itself, not a view of a view:
    a view op fewer per step, and the model gets a base tensor), else a view of ``y``."""
    if type(state) is tuple and len(state) == 2 and state[0] is y:
        return state[1]
    return term.flat.state_to_tree(y)


def _direct_vf(term):
    """The user's vector field ``f(t, x, args)`` (real time as a float, user shapes) behind the
    solver's view ``term`` of a plain float-time :class:`~torchnde.ODETerm`, once its first
    evaluation has checked the output (``None`` otherwise). Calling it directly skips the flat
    view's time and sign conversions: the same values, a few operations and calls fewer per
    evaluation. The caller counts the evaluation (``term.nfe``)."""
    inner = getattr(term, "term", None)
    if type(inner) is ODETerm and inner.time_as_float and getattr(term, "checked", False) and not term.rough:
        return inner.vector_field
    return None


# x0 / eps from a prediction of another kind: pred = cy * y + co * out (y = x - m(t)); the
# velocity is not of this form and goes through Parameterisation
def _affine(to, kind, a, s):
    n = a * a + s * s
    if to == "x0":
        return {"eps": (1 / a, -s / a), "score": (1 / a, s * s / a), "v": (a / n, -s / n)}.get(kind)
    return {"x0": (1 / s, -a / s), "score": (0.0, -s), "v": (s / n, a / n)}.get(kind)


def _is_zero(m) -> bool:
    if type(m) is float:  # the common case, without the numbers.Real (ABC) check
        return m == 0.0
    return isinstance(m, numbers.Real) and m == 0


class DPMSolver(AbstractSolver):
    r"""DPM-Solver (``prediction="eps"``) and DPM-Solver++ (``prediction="x0"``) of order 1 to 3,
    singlestep or multistep, as one exponential-integrator step per :func:`torchnde.solve` step
    (see the module docstring for the update).

    The term is an :class:`~torchnde.ODETerm` whose vector field predicts ``term_kind`` under
    ``process``: by default the probability-flow ODE itself
    (``process.probability_flow(score)``, ``term_kind="velocity"``), so the solver is a drop-in
    for ``Euler()``/``Heun()`` on the same term; or an ``ODETerm`` of the model's prediction of
    another kind of :data:`~torchnde.generative.parameterisation.KINDS` (``"x0"``, ``"eps"``,
    ``"v"``, ``"score"``), converted here with the process's coefficients. It works with every
    process (their ``marginal(t)`` and ``mean_offset``); time steps are those of ``solve`` (use a
    fixed grid: ``ConstantStepSize`` with ``step_ts``, as ``sample`` does). Shared times only
    (not ``per_sample``). The process's coefficients are computed once per grid time (Python
    floats, cached in the solver state of one solve).

    **Orders per step.** Without ``num_steps``/``orders`` every step has order ``order``
    (multistep: after the warm-up steps, which have orders 1, 2). With ``num_steps`` (the
    grid's number of steps) a multistep solver uses :func:`multistep_orders`: with
    ``lower_order_final`` (the default) and fewer than :data:`LOWER_ORDER_FINAL_STEPS` steps its
    last steps have orders ..., 2, 1 (Lu et al. 2022b). ``orders`` (one per step) sets the
    orders outright, e.g. :func:`singlestep_orders` for a singlestep solver that spends a whole
    budget (Lu et al. 2022a, Sec. 3.4); multistep steps are still limited by their history. With
    either, solving over more steps than given is an error.

    Cost per step: the step's order in evaluations singlestep, 1 multistep.

    Args:
        process: the forward process.
        order: 1, 2 or 3, the highest order (every entry of ``orders`` is at most ``order``).
        multistep: multistep (history of predictions in the solver state) or singlestep.
        prediction: ``"x0"`` (DPM-Solver++, Lu et al. 2022b) or ``"eps"`` (DPM-Solver, Lu et al.
            2022).
        term_kind: what the term's vector field returns.
        num_steps: the number of steps of the grid (enables ``lower_order_final``).
        orders: the order of every step (its length is the number of steps).
        lower_order_final: multistep only: lower orders in the last steps of a short grid.
    """

    dense_order: ClassVar = 1

    def __init__(
        self,
        process: DiffusionProcess,
        order: int = 2,
        *,
        multistep: bool = True,
        prediction: str = "x0",
        term_kind: str = "velocity",
        num_steps: int | None = None,
        orders=None,
        lower_order_final: bool = True,
    ):
        if not isinstance(process, DiffusionProcess):
            raise TypeError(f"process must be a DiffusionProcess such as VP(), got {type(process).__name__}")
        if order not in (1, 2, 3) or isinstance(order, bool):
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
        if prediction not in ("x0", "eps"):
            raise ValueError(f"prediction must be 'x0' (DPM-Solver++) or 'eps' (DPM-Solver), got {prediction!r}")
        if term_kind not in KINDS:
            raise ValueError(f"unknown term_kind {term_kind!r}; choose one of {KINDS}")
        if num_steps is not None:
            num_steps = _check_int("num_steps", num_steps, 1)
        if orders is not None:
            orders = tuple(orders)
            if not orders or any(isinstance(k, bool) or k not in (1, 2, 3) or k > order for k in orders):
                raise ValueError(f"orders must be a non-empty sequence of orders 1..order={order}, got {orders!r}")
            if num_steps is not None and num_steps != len(orders):
                raise ValueError(f"num_steps={num_steps} but {len(orders)} orders")
            num_steps = len(orders)
        elif num_steps is not None:
            orders = (
                multistep_orders(order, num_steps, lower_order_final=lower_order_final)
                if multistep
                else (order,) * num_steps
            )
        self.process, self.order, self.multistep = process, int(order), bool(multistep)
        self.prediction, self.term_kind = prediction, term_kind
        self.num_steps, self.orders, self.lower_order_final = num_steps, orders, bool(lower_order_final)
        self._param = Parameterisation(term_kind, process)
        self._no_offset = type(process).mean_offset is DiffusionProcess.mean_offset

    def __repr__(self):
        name = "DPMSolver++" if self.prediction == "x0" else "DPMSolver"
        kind = "multistep" if self.multistep else "singlestep"
        extra = "" if self.orders is None else f", orders={self.orders}"
        return f"{name}(order={self.order}, {kind}, term_kind={self.term_kind!r}{extra})"

    def _key(self):
        return (type(self), id(self.process), self.order, self.multistep, self.prediction, self.term_kind, self.orders)

    def __eq__(self, other):
        return isinstance(other, DPMSolver) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    # -- pieces ------------------------------------------------------------------------------
    def init(self, term, t0, y0):
        # (index of the next step, log-SNRs of the history, its predictions, per-time cache, the last
        # step's (y1, x1): its state flat and in the user's shape)
        return (0, (), (), {}, None)

    def _coef(self, cache, t: float):
        """``(alpha, sigma, log-SNR, affine)`` at real time ``t`` (floats, computed once per
        solve; ``affine`` the prediction's conversion, see :func:`_affine`)."""
        c = cache.get(t)
        if c is None:
            a, s = self.process.marginal(t)
            a, s = float(a), float(s)
            aff = None if self.term_kind == self.prediction else _affine(self.prediction, self.term_kind, a, s)
            c = cache[t] = (a, s, math.log(a) - math.log(s), aff)
        return c

    def _offset(self, t: float, x):
        """:math:`m(t)` (the float 0.0 for processes without a mean offset, without a call)."""
        return 0.0 if self._no_offset else self.process.mean_offset(t, x)

    def _predict(self, term, cache, t: float, x: torch.Tensor) -> torch.Tensor:
        """The prediction at real time ``t`` and state ``x`` (user shapes): one evaluation."""
        sg = term.sign
        f = _direct_vf(term)
        if f is not None:  # the user's field at the real time (no flat view, no sign flips)
            term.nfe += 1
            out = f(t, x, term.args)
        else:
            out = term.vf(sg * t, term.flat.tree_to_state(x))
            out = term.flat.state_to_tree(-out if sg < 0 else out)
        if self.term_kind == self.prediction:
            return out
        cs = self._coef(cache, t)[3]
        if cs is None:  # the velocity
            return self._param.convert(self.prediction, t, x, out)
        m = self._offset(t, x)
        y = x if _is_zero(m) else x - m
        cy, co = cs
        return co * out if cy == 0 else torch.add(cy * y, out, alpha=co)

    def _combine(self, cache, s: float, t: float, x, terms, c: float | None = None, noise=None):
        r"""The update from ``s`` to ``t``: ``c * (x - m(s)) + sum(w * pred) [+ std * xi] + m(t)``,
        where ``terms`` are ``(w_j, pred)`` pairs of the Taylor coefficients
        :math:`h^{j+1}\varphi_{j+1}` already folded into the predictions' weights; ``c`` defaults
        to the ODE's :math:`\sigma_t/\sigma_s` (data) or :math:`\alpha_t/\alpha_s` (noise), and
        ``noise`` is an SDE form's ``(std, xi)``."""
        if c is None:
            a_s, s_s = self._coef(cache, s)[:2]
            a_t, s_t = self._coef(cache, t)[:2]
            c = (s_t / s_s) if self.prediction == "x0" else (a_t / a_s)
        m_s = self._offset(s, x)
        y = x if _is_zero(m_s) else x - m_s
        out = c * y
        for w, d in terms:
            out = torch.add(out, d, alpha=w)
        if noise is not None:
            std, xi = noise
            out = torch.add(out, xi.to(dtype=out.dtype), alpha=std)
        m_t = self._offset(t, x)
        return out if _is_zero(m_t) else out + m_t

    def _order_of_step(self, i: int) -> int:
        """The order of step ``i`` (``order``, or the ``orders`` set up; more steps are an error)."""
        if self.orders is None:
            return self.order
        if i < len(self.orders):
            return self.orders[i]
        raise ValueError(f"{self!r} was set up for {self.num_steps} steps; the solve takes more")

    @staticmethod
    def _multistep_terms(b, lam_s: float, p_s, lams, ms):
        """The ``(weight, prediction)`` pairs of a multistep update of order ``len(b)`` from the
        Taylor coefficients ``b``, the prediction ``p_s`` at log-SNR ``lam_s`` and the history's
        log-SNRs ``lams`` and predictions ``ms`` (derivatives as divided differences on the
        non-uniform log-SNR grid, expanded into weights of the predictions)."""
        if len(b) == 1:
            return [(b[0], p_s)]
        if len(b) == 2:
            d1 = lam_s - lams[-1]
            return [(b[0] + b[1] / d1, p_s), (-b[1] / d1, ms[-1])]
        # derivatives p_s, d01 + d012 * d1 and 2 d012
        d1, d2 = lam_s - lams[-1], lams[-1] - lams[-2]
        c = (b[1] * d1 + 2 * b[2]) / (d1 + d2)
        return [(b[0] + (b[1] + c) / d1, p_s), (-(b[1] + c) / d1 - c / d2, ms[-1]), (c / d2, ms[-2])]

    def _history(self, i: int, lams, ms, lam_s: float, p_s):
        """``(next step index, log-SNRs, predictions)``: the multistep history after step ``i``."""
        keep = self.order - 1
        return (i + 1, (*lams, lam_s)[-keep:], (*ms, p_s)[-keep:]) if keep else (i + 1, (), ())

    def _taylor(self, cache, s: float, t: float, k: int) -> list[float]:
        r"""The coefficients of the order-``k`` update's derivatives: :math:`\alpha_t
        h^{j+1}\varphi_{j+1}(-h)` (data prediction) or :math:`-\sigma_t h^{j+1}\varphi_{j+1}(h)`
        (noise prediction), ``j < k``."""
        lam_s = self._coef(cache, s)[2]
        a_t, s_t, lam_t, _ = self._coef(cache, t)
        h = lam_t - lam_s
        if self.prediction == "x0":
            return [a_t * h ** (j + 1) * f for j, f in enumerate(_phis(-h, k))]
        return [-s_t * h ** (j + 1) * f for j, f in enumerate(_phis(h, k))]

    def _mid(self, cache, s, t, r):
        """Intermediate time at log-SNR ``lam_s + r h``."""
        lam_s, lam_t = self._coef(cache, s)[2], self._coef(cache, t)[2]
        return _t_of_logsnr(self.process, lam_s + r * (lam_t - lam_s), min(s, t), max(s, t))

    # -- the step ----------------------------------------------------------------------------
    def step(self, term, t0, t1, y0, state):
        if not isinstance(t0, float):
            raise NotImplementedError("DPMSolver does not support per_sample=True (use a shared time grid)")
        i, lams, ms, cache, prev = state
        k = self._order_of_step(i)
        sg = term.sign
        s, t = sg * float(t0), sg * float(t1)
        x = _tree_of(term, y0, prev)
        lam_s = self._coef(cache, s)[2]
        m_s = self._predict(term, cache, s, x)
        if self.multistep:
            k = min(k, len(lams) + 1)
            terms = self._multistep_terms(self._taylor(cache, s, t, k), lam_s, m_s, lams, ms)
            x1 = self._combine(cache, s, t, x, terms)
            new_state = (*self._history(i, lams, ms, lam_s, m_s), cache, None)
        else:
            b = self._taylor(cache, s, t, k)
            if k == 1:
                x1 = self._combine(cache, s, t, x, [(b[0], m_s)])
            elif k == 2:
                s1 = self._mid(cache, s, t, 0.5)
                u = self._combine(cache, s, s1, x, [(self._taylor(cache, s, s1, 1)[0], m_s)])
                d = self._coef(cache, s1)[2] - lam_s
                p1 = self._predict(term, cache, s1, u)
                x1 = self._combine(cache, s, t, x, [(b[0] - b[1] / d, m_s), (b[1] / d, p1)])
            else:
                s1, s2 = self._mid(cache, s, t, 1 / 3), self._mid(cache, s, t, 2 / 3)
                u1 = self._combine(cache, s, s1, x, [(self._taylor(cache, s, s1, 1)[0], m_s)])
                p1 = self._predict(term, cache, s1, u1)
                d1 = self._coef(cache, s1)[2] - lam_s
                c = self._taylor(cache, s, s2, 2)
                u2 = self._combine(cache, s, s2, x, [(c[0] - c[1] / d1, m_s), (c[1] / d1, p1)])
                p2 = self._predict(term, cache, s2, u2)
                d2 = self._coef(cache, s2)[2] - lam_s
                x1 = self._combine(cache, s, t, x, [(b[0] - b[1] / d2, m_s), (b[1] / d2, p2)])
            new_state = (i + 1, lams, ms, cache, None)
        y1 = term.flat.tree_to_state(x1)
        return y1, None, (y0, y1), (*new_state[:4], (y1, x1)), None

    def dense_coeffs(self, term, dense_info):
        return linear_coeffs(*dense_info)


# ----------------------------------------------------------------------------------- EDM Heun
class EDMHeun(AbstractSolver):
    r"""Heun's method with Karras et al.'s stochastic "churn" (2022, Algorithms 1 and 2) for the
    probability-flow ODE of ``process`` (the term: ``process.probability_flow(score)``).

    With ``s_churn = 0`` it is Algorithm 1 (deterministic; two evaluations per step, no reuse of
    the end point so that churn and no churn cost the same). With ``s_churn > 0``, each step from
    ``t_i`` with ``s_tmin <= t_i <= s_tmax`` first raises the time to :math:`\hat t = t_i(1 +
    \gamma)`, :math:`\gamma = \min(s_{churn}/N, \sqrt2 - 1)` (``N = num_steps``) and adds the
    noise of the process's forward transition: :math:`\hat x - m(\hat t) = a (x - m(t_i)) +
    \sqrt{\sigma(\hat t)^2 - a^2\sigma(t_i)^2}\,s_{noise}\,\varepsilon` with :math:`a =
    \alpha(\hat t)/\alpha(t_i)` (for :class:`EDM`: :math:`\hat x = x + \sqrt{\hat t^2 -
    t_i^2}\,s_{noise}\,\varepsilon`, Algorithm 2). ``s_tmin``/``s_tmax`` are times (noise levels
    for ``EDM``). The normals :math:`\varepsilon` are the normalised increments of ``noise``
    (a Brownian path of the state's shape, e.g. a ``BrownianGrid`` on the sampling grid) over
    each step. Sampling direction only (``t1 < t0``); shared times only.

    **Final Euler step.** Karras et al.'s samplers end with an Euler step (their last step goes
    to :math:`\sigma = 0`, where the Heun correction is skipped), so ``N`` steps cost ``2N - 1``
    evaluations. Here the grid ends at ``process.t0`` (for :class:`EDM` the small
    :math:`\sigma_{min}`), and with ``final_euler`` the last step is an Euler step all the same:
    the correction's evaluation at :math:`\sigma_{min}` with a few large steps is what ruins small
    budgets (measured with the exact score of a 2-D mixture on ``EDM()``: distance to the exact
    flow map 4.7 -> 1.0 at 4-5 evaluations, 2.2 -> 0.72 at 8-9; unchanged from 20 on).
    ``final_euler=None`` (default) turns it on for :class:`EDM` only: on processes whose
    grids are uniform in ``t`` (``VP()``) the last step is long and the Euler step costs more
    than it saves (0.020 -> 0.045 at 40 evaluations). It needs ``num_steps`` (the grid's step
    count; without it the default is off). :func:`edm_heun_steps` gives the steps of a budget.
    """

    order: ClassVar = 2
    dense_order: ClassVar = 1

    def __init__(
        self,
        process: DiffusionProcess,
        *,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        s_noise: float = 1.0,
        num_steps: int | None = None,
        noise=None,
        final_euler: bool | None = None,
    ):
        if not isinstance(process, DiffusionProcess):
            raise TypeError(f"process must be a DiffusionProcess such as EDM(), got {type(process).__name__}")
        if num_steps is not None:
            num_steps = _check_int("num_steps", num_steps, 1)
        if final_euler is None:
            final_euler = isinstance(process, EDM) and num_steps is not None
        elif final_euler and num_steps is None:
            raise ValueError("final_euler=True needs num_steps (the grid's step count)")
        if not s_churn >= 0 or not s_noise >= 0:
            raise ValueError(f"need s_churn >= 0 and s_noise >= 0, got {s_churn}, {s_noise}")
        if s_churn > 0 and (noise is None or num_steps is None or num_steps < 1):
            raise ValueError("s_churn > 0 needs num_steps (the grid's step count) and noise (a Brownian path)")
        self.process, self.s_churn, self.s_tmin, self.s_tmax = process, float(s_churn), float(s_tmin), float(s_tmax)
        self.s_noise, self.num_steps, self.noise = float(s_noise), num_steps, noise
        self.final_euler = bool(final_euler)
        self.gamma = min(self.s_churn / num_steps, math.sqrt(2) - 1) if self.s_churn > 0 else 0.0

    def __repr__(self):
        return (
            f"EDMHeun(s_churn={self.s_churn}, s_tmin={self.s_tmin}, s_tmax={self.s_tmax}, s_noise={self.s_noise}, "
            f"final_euler={self.final_euler})"
        )

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def init(self, term, t0, y0):
        return 0  # the index of the next step (then with the last step's (y1, x1))

    def step(self, term, t0, t1, y0, state):
        if not isinstance(t0, float):
            raise NotImplementedError("EDMHeun does not support per_sample=True")
        state, prev = (state, None) if type(state) is int else state
        if self.final_euler and state >= self.num_steps:
            raise ValueError(f"{self!r} was set up for {self.num_steps} steps; the solve takes more")
        sg = term.sign
        s = sg * t0
        y = y0
        tau0 = t0
        if self.gamma > 0 and self.s_tmin <= s <= self.s_tmax:
            if sg > 0:
                raise ValueError("EDMHeun's churn runs in the sampling direction only (from t1 down to t0)")
            p = self.process
            s_hat = s * (1 + self.gamma)
            x = term.flat.state_to_tree(y0)
            a0, sig0 = p.marginal(s)
            a1, sig1 = p.marginal(s_hat)
            a = a1 / a0
            lo, hi = sg * t1, s  # the step's interval in real time
            eps = self.noise.evaluate(lo, hi) / math.sqrt(hi - lo)
            std = math.sqrt(max(sig1 * sig1 - a * a * sig0 * sig0, 0.0)) * self.s_noise
            x_hat = a * (x - p.mean_offset(s, x)) + p.mean_offset(s_hat, x) + std * eps
            y = term.flat.tree_to_state(x_hat)
            tau0 = sg * s_hat
        h = t1 - tau0
        f = _direct_vf(term)
        if f is not None and sg < 0:  # the user's field at real times: -d, so -h (same values)
            x = _tree_of(term, y, prev)
            term.nfe += 1
            v = f(-tau0, x, term.args)
            x_e = torch.add(x, v, alpha=-h)
            if self.final_euler and state == self.num_steps - 1:
                x1 = x_e
            else:
                term.nfe += 1
                x1 = torch.add(x, v + f(-t1, x_e, term.args), alpha=-0.5 * h)
            y1 = term.flat.tree_to_state(x1)
            return y1, None, (y0, y1), (state + 1, (y1, x1)), None
        d = term.vf(tau0, y)
        y_e = torch.add(y, d, alpha=h)
        if self.final_euler and state == self.num_steps - 1:
            y1 = y_e
        else:
            d2 = term.vf(t1, y_e)
            y1 = torch.add(y, d + d2, alpha=0.5 * h)
        return y1, None, (y0, y1), state + 1, None

    def dense_coeffs(self, term, dense_info):
        return linear_coeffs(*dense_info)
