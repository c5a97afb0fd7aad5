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

**EDM Heun** (Karras, Aittala, Aila & Laine 2022, "Elucidating the design space of
diffusion-based generative models", Algorithms 1 and 2): Heun's method on the probability-flow
ODE along Karras's :math:`\rho`-grid, with optional "churn": before each step with time in
``[s_tmin, s_tmax]`` the state is pushed forward in noise to :math:`\hat t = t(1 + \gamma)`,
:math:`\gamma = \min(S_{churn}/N, \sqrt2 - 1)`, by the process's exact forward transition (for
:class:`~torchnde.generative.processes.EDM`: :math:`\hat x = x + \sqrt{\hat t^2 - t^2}\,S_{noise}
\varepsilon`), then the Heun step runs from :math:`\hat t`.
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar

import torch

from ..solvers._base import AbstractSolver, linear_coeffs
from .parameterisation import KINDS, Parameterisation
from .processes import EDM, VE, VP, DiffusionProcess, SubVP

__all__ = ["DPMSolver", "EDMHeun", "logsnr", "logsnr_times", "FAST_SAMPLERS", "DPM_SAMPLERS"]

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
    """The time in ``[lo, hi]`` with log-SNR ``lam``: closed forms for VP, sub-VP, VE and EDM,
    bisection otherwise."""
    t = None
    if isinstance(process, EDM):
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


# --------------------------------------------------------------------------------- DPM-Solver
class DPMSolver(AbstractSolver):
    r"""DPM-Solver (``prediction="eps"``) and DPM-Solver++ (``prediction="x0"``) of order 1 to 3,
    singlestep or multistep, as one exponential-integrator step per :func:`torchnde.solve` step
    (see the module docstring for the update).

    The term is an :class:`~torchnde.ODETerm` whose vector field predicts ``term_kind`` under
    ``process``: by default the probability-flow ODE itself
    (``process.probability_flow(score)``, ``term_kind="velocity"``), so the solver is a drop-in
    for ``Euler()``/``Heun()`` on the same term; or an ``ODETerm`` of the model's x0 / eps
    prediction (``term_kind="x0"``/``"eps"``, no conversions). Any other kind of
    :data:`~torchnde.generative.parameterisation.KINDS` is converted with
    :class:`~torchnde.generative.parameterisation.Parameterisation`. It works with every process
    (their ``marginal(t)`` and ``mean_offset``); time steps are those of ``solve`` (use a fixed
    grid: ``ConstantStepSize`` with ``step_ts``, as ``sample`` does). Shared times only (not
    ``per_sample``).

    Cost per step: ``order`` evaluations singlestep, 1 multistep.

    Args:
        process: the forward process.
        order: 1, 2 or 3.
        multistep: multistep (history of predictions in the solver state) or singlestep.
        prediction: ``"x0"`` (DPM-Solver++, Lu et al. 2022b) or ``"eps"`` (DPM-Solver, Lu et al.
            2022).
        term_kind: what the term's vector field returns.
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
    ):
        if not isinstance(process, DiffusionProcess):
            raise TypeError(f"process must be a DiffusionProcess such as VP(), got {type(process).__name__}")
        if order not in (1, 2, 3) or isinstance(order, bool):
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
        if prediction not in ("x0", "eps"):
            raise ValueError(f"prediction must be 'x0' (DPM-Solver++) or 'eps' (DPM-Solver), got {prediction!r}")
        if term_kind not in KINDS:
            raise ValueError(f"unknown term_kind {term_kind!r}; choose one of {KINDS}")
        self.process, self.order, self.multistep = process, int(order), bool(multistep)
        self.prediction, self.term_kind = prediction, term_kind
        self._param = Parameterisation(term_kind, process)

    def __repr__(self):
        name = "DPMSolver++" if self.prediction == "x0" else "DPMSolver"
        kind = "multistep" if self.multistep else "singlestep"
        return f"{name}(order={self.order}, {kind}, term_kind={self.term_kind!r})"

    def _key(self):
        return (type(self), id(self.process), self.order, self.multistep, self.prediction, self.term_kind)

    def __eq__(self, other):
        return isinstance(other, DPMSolver) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    # -- pieces ------------------------------------------------------------------------------
    def init(self, term, t0, y0):
        return ((), ())  # multistep history: (log-SNRs, predictions), most recent last

    def _predict(self, term, t: float, x: torch.Tensor) -> torch.Tensor:
        """The prediction at real time ``t`` and state ``x`` (user shapes): one evaluation."""
        sg = term.sign
        out = term.vf(sg * t, term.flat.tree_to_state(x))
        out = term.flat.state_to_tree(-out if sg < 0 else out)
        return self._param.convert(self.prediction, t, x, out)

    def _update(self, s: float, t: float, x, derivs, lam_s: float, lam_t: float):
        """Order-``len(derivs)`` exponential-integrator update from real time ``s`` to ``t``."""
        p = self.process
        a_s, sig_s = p.marginal(s)
        a_t, sig_t = p.marginal(t)
        h = lam_t - lam_s
        y = x - p.mean_offset(s, x)
        if self.prediction == "x0":
            phis = _phis(-h, len(derivs))
            out = (sig_t / sig_s) * y
            for j, d in enumerate(derivs):
                out = out + (a_t * h ** (j + 1) * phis[j]) * d
        else:
            phis = _phis(h, len(derivs))
            out = (a_t / a_s) * y
            for j, d in enumerate(derivs):
                out = out - (sig_t * h ** (j + 1) * phis[j]) * d
        return out + p.mean_offset(t, x)

    def _mid(self, s, t, lam_s, h, r):
        """Intermediate time at log-SNR ``lam_s + r h`` and its exact log-SNR."""
        u = _t_of_logsnr(self.process, lam_s + r * h, min(s, t), max(s, t))
        return u, logsnr(self.process, u)

    # -- the step ----------------------------------------------------------------------------
    def step(self, term, t0, t1, y0, state):
        if not isinstance(t0, float):
            raise NotImplementedError("DPMSolver does not support per_sample=True (use a shared time grid)")
        sg = term.sign
        s, t = sg * t0, sg * t1
        x = term.flat.state_to_tree(y0)
        lam_s, lam_t = logsnr(self.process, s), logsnr(self.process, t)
        h = lam_t - lam_s
        m_s = self._predict(term, s, x)
        lams, ms = state
        if self.multistep:
            k = min(self.order, len(lams) + 1)
            derivs = [m_s]
            if k >= 2:
                d01 = (m_s - ms[-1]) / (lam_s - lams[-1])
                if k == 3:
                    d12 = (ms[-1] - ms[-2]) / (lams[-1] - lams[-2])
                    d012 = (d01 - d12) / (lam_s - lams[-2])
                    derivs = [m_s, d01 + d012 * (lam_s - lams[-1]), 2 * d012]
                else:
                    derivs = [m_s, d01]
            x1 = self._update(s, t, x, derivs, lam_s, lam_t)
            keep = self.order - 1
            new_state = ((*lams, lam_s)[-keep:], (*ms, m_s)[-keep:]) if keep else ((), ())
        else:
            if self.order == 1:
                x1 = self._update(s, t, x, [m_s], lam_s, lam_t)
            elif self.order == 2:
                s1, l1 = self._mid(s, t, lam_s, h, 0.5)
                u = self._update(s, s1, x, [m_s], lam_s, l1)
                d1 = self._predict(term, s1, u) - m_s
                x1 = self._update(s, t, x, [m_s, d1 / (l1 - lam_s)], lam_s, lam_t)
            else:
                s1, l1 = self._mid(s, t, lam_s, h, 1 / 3)
                s2, l2 = self._mid(s, t, lam_s, h, 2 / 3)
                u1 = self._update(s, s1, x, [m_s], lam_s, l1)
                D1 = self._predict(term, s1, u1) - m_s
                u2 = self._update(s, s2, x, [m_s, D1 / (l1 - lam_s)], lam_s, l2)
                D2 = self._predict(term, s2, u2) - m_s
                x1 = self._update(s, t, x, [m_s, D2 / (l2 - lam_s)], lam_s, lam_t)
            new_state = state
        y1 = term.flat.tree_to_state(x1)
        return y1, None, (y0, y1), new_state, None

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
    ):
        if not isinstance(process, DiffusionProcess):
            raise TypeError(f"process must be a DiffusionProcess such as EDM(), got {type(process).__name__}")
        if not s_churn >= 0 or not s_noise >= 0:
            raise ValueError(f"need s_churn >= 0 and s_noise >= 0, got {s_churn}, {s_noise}")
        if s_churn > 0 and (noise is None or num_steps is None or num_steps < 1):
            raise ValueError("s_churn > 0 needs num_steps (the grid's step count) and noise (a Brownian path)")
        self.process, self.s_churn, self.s_tmin, self.s_tmax = process, float(s_churn), float(s_tmin), float(s_tmax)
        self.s_noise, self.num_steps, self.noise = float(s_noise), num_steps, noise
        self.gamma = min(self.s_churn / num_steps, math.sqrt(2) - 1) if self.s_churn > 0 else 0.0

    def __repr__(self):
        return f"EDMHeun(s_churn={self.s_churn}, s_tmin={self.s_tmin}, s_tmax={self.s_tmax}, s_noise={self.s_noise})"

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def init(self, term, t0, y0):
        return None

    def step(self, term, t0, t1, y0, state):
        if not isinstance(t0, float):
            raise NotImplementedError("EDMHeun does not support per_sample=True")
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
        d = term.vf(tau0, y)
        y_e = y + h * d
        d2 = term.vf(t1, y_e)
        y1 = y + (0.5 * h) * (d + d2)
        return y1, None, (y0, y1), None, None

    def dense_coeffs(self, term, dense_info):
        return linear_coeffs(*dense_info)
