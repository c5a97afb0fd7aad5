r"""MRS: fast exponential-integrator samplers for the mean-reverting SDE, ODE and SDE forms.

MRS (Li et al. 2025, "MRS: a fast sampler for mean reverting diffusion based on ODE and SDE
solvers", ICLR) applies the semi-analytic solvers of DPM-Solver (Lu et al. 2022) to the
mean-reverting SDE of image restoration (IR-SDE, Luo et al. 2023),

.. math:: dx = \theta(\mu - x)\,dt + s\,dW,

:class:`~torchnde.generative.processes.MeanReverting` (constant :math:`\theta`, :math:`s`). Its
marginal is :math:`x_t = \mu + \alpha_t (x_0 - \mu) + \sigma_t\varepsilon` with

.. math:: \alpha_t = e^{-\theta t}, \qquad \sigma_t^2 = \frac{s^2}{2\theta}(1 - e^{-2\theta t}),
          \qquad \lambda_t = \log\frac{\alpha_t}{\sigma_t}, \qquad
          t(\lambda) = \frac{1}{2\theta}\log\Big(1 + \frac{2\theta}{s^2} e^{-2\lambda}\Big).

So :math:`z = x - \mu` is a linear SDE :math:`dz = -\theta z\,dt + s\,dW` with drift
:math:`f = \dot\alpha/\alpha = -\theta` and :math:`g^2 = s^2 = -2\sigma_t^2\dot\lambda_t`, whose
data is :math:`z_0 = x_0 - \mu` (equivalently ``y = x - m(t)``, :math:`m = (1-\alpha)\mu`, which
follows the same SDE with data :math:`x_0`; the code uses this form, the same arithmetic). The
reverse-time equations in :math:`z` are then integrated exactly in their linear part; with
:math:`h = \lambda_t - \lambda_s > 0` (a step from ``s`` down to ``t``), :math:`\hat x_0` the data
prediction and :math:`\hat\varepsilon` the noise prediction:

* **ODE, noise prediction**: :math:`z_t = \frac{\alpha_t}{\alpha_s} z_s - \sigma_t \sum_{j<k}
  h^{j+1}\varphi_{j+1}(h)\,\hat\varepsilon^{(j)}_s`;
* **ODE, data prediction**: :math:`z_t = \frac{\sigma_t}{\sigma_s} z_s + \alpha_t \sum_{j<k}
  h^{j+1}\varphi_{j+1}(-h)\,(\hat x_0 - \mu)^{(j)}_s`;
* **SDE, noise prediction**: :math:`z_t = \frac{\alpha_t}{\alpha_s} z_s - 2\sigma_t \sum_{j<k}
  h^{j+1}\varphi_{j+1}(h)\,\hat\varepsilon^{(j)}_s + \sigma_t\sqrt{e^{2h} - 1}\,\xi`;
* **SDE, data prediction**: :math:`z_t = \frac{\sigma_t}{\sigma_s}e^{-h} z_s + \alpha_t
  \sum_{j<k} 2^{-j}(2h)^{j+1}\varphi_{j+1}(-2h)\,(\hat x_0 - \mu)^{(j)}_s + \sigma_t\sqrt{1 -
  e^{-2h}}\,\xi`,

with :math:`\varphi_1(z) = (e^z - 1)/z`, :math:`\varphi_{j+1}(z) = (\varphi_j(z) - 1/j!)/z`,
:math:`\xi \sim N(0, I)` and :math:`(\cdot)^{(j)}` the :math:`j`-th derivative in
:math:`\lambda`. The SDE forms follow from the reverse SDE :math:`dz = [(f - 2\dot\lambda) z +
2\dot\lambda\alpha\hat x_0]dt + g\,d\bar W` (data) or :math:`dz = [f z + g^2\hat\varepsilon /
\sigma]dt + g\,d\bar W` (noise) by variation of constants: the linear part and the Itô isometry
are exact; only the prediction is expanded (Lu et al. 2022b's SDE-DPM-Solver++ and Gonzalez et
al. 2023's SEEDS have the same first-order updates). Order 1 is the MRS analogue of DDIM (ODE) and
of DDPM's ancestral step (SDE); order 2 estimates the derivative from the previous step's
prediction (multistep, one evaluation per step, :math:`D = (p_s - p_{prev}) /
(\lambda_s - \lambda_{prev})`, the multistep form of Lu et al. 2022b). The first step is of order 1, and on
grids shorter than :data:`~torchnde.generative.fast_samplers.LOWER_ORDER_FINAL_STEPS` the last
one too (``lower_order_final``).

In :func:`~torchnde.generative.samplers.sample` the presets are :data:`MRS_SAMPLERS`::

    out = sample(model, MeanReverting(theta=4.0, mean=mu), shape, nfe=10, sampler="mrs_ode_2",
                 parameterisation="eps")

(``mrs_{ode,sde}_{1,2}`` predict the data, ``mrs_{ode,sde}_eps_{1,2}`` the noise; the grid is
uniform in log-SNR). MRS's paper recommends data prediction for its numerical stability (the
noise-prediction coefficients grow like :math:`e^h`, the SDE's like :math:`e^{2h}`); in
``benchmarks/mrs.md`` (exact score) the second-order noise-prediction SDE diverges at 5 NFE, while
the two ODE forms are close to each other at every budget.
"""

from __future__ import annotations

import math
from typing import ClassVar

from .fast_samplers import DPMSolver, _check_int, _phis, _tree_of, multistep_orders
from .processes import DiffusionProcess, MeanReverting

__all__ = ["MRSolver", "MRS_SAMPLERS", "mrs_steps"]

#: the MRS presets of :func:`~torchnde.generative.samplers.sample`: ``name -> (order, sde,
#: prediction)``; one model evaluation per step (multistep)
MRS_SAMPLERS = {
    "mrs_ode_1": (1, False, "x0"),
    "mrs_ode_2": (2, False, "x0"),
    "mrs_sde_1": (1, True, "x0"),
    "mrs_sde_2": (2, True, "x0"),
    "mrs_ode_eps_1": (1, False, "eps"),
    "mrs_ode_eps_2": (2, False, "eps"),
    "mrs_sde_eps_1": (1, True, "eps"),
    "mrs_sde_eps_2": (2, True, "eps"),
}


def mrs_steps(sampler: str, nfe: int) -> int:
    """The number of steps of the MRS preset ``sampler`` at a budget of ``nfe`` evaluations
    (``nfe``: one evaluation per step)."""
    if sampler not in MRS_SAMPLERS:
        raise ValueError(f"unknown MRS preset {sampler!r}; choose one of {tuple(MRS_SAMPLERS)}")
    return _check_int("nfe", nfe, 1)


def _check_mean_reverting(process):
    if not isinstance(process, MeanReverting):
        name = type(process).__name__ if isinstance(process, DiffusionProcess) else repr(process)
        raise TypeError(
            f"MRS samples the mean-reverting SDE: process must be a MeanReverting(...), got {name}; "
            "for other processes use DPMSolver (the 'dpm_*' / 'dpmpp_*' samplers)"
        )


class MRSolver(DPMSolver):
    r"""MRS of order 1 or 2 for :class:`~torchnde.generative.processes.MeanReverting`, ODE or SDE
    form, noise (``prediction="eps"``) or data (``"x0"``) prediction (the updates are in the
    module docstring). A multistep solver (one evaluation per step), used like
    :class:`~torchnde.generative.fast_samplers.DPMSolver` (whose ODE updates it shares: on the
    shifted state they are MRS's ODE solvers): the term is an ``ODETerm`` of the model's
    prediction of ``term_kind``, solved on a fixed decreasing grid. Shared times only.

    Args:
        process: a :class:`MeanReverting` process (anything else is a ``TypeError``).
        order: 1 or 2.
        prediction: ``"x0"`` (data) or ``"eps"`` (noise).
        sde: the reverse-SDE form (needs ``noise``) instead of the probability-flow ODE.
        term_kind: what the term's vector field returns.
        num_steps: the grid's number of steps (enables ``lower_order_final``).
        noise: the SDE form's Brownian path, of the state's shape, on the grid's interval (e.g. a
            ``BrownianGrid`` of the grid; the normals are its normalised increments over each
            step).
        lower_order_final: order 1 in the last step of grids shorter than 15 steps.
    """

    dense_order: ClassVar = 1

    def __init__(
        self,
        process: MeanReverting,
        order: int = 2,
        *,
        prediction: str = "x0",
        sde: bool = False,
        term_kind: str = "velocity",
        num_steps: int | None = None,
        noise=None,
        lower_order_final: bool = True,
    ):
        _check_mean_reverting(process)
        if isinstance(order, bool) or order not in (1, 2):
            raise ValueError(f"MRS has orders 1 and 2, got {order!r}")
        if sde and noise is None:
            raise ValueError("the SDE form of MRS (sde=True) needs noise=... (a Brownian path of the state's shape)")
        orders = None
        if num_steps is not None:
            orders = multistep_orders(order, _check_int("num_steps", num_steps, 1), lower_order_final=lower_order_final)
        super().__init__(
            process,
            order,
            multistep=True,
            prediction=prediction,
            term_kind=term_kind,
            orders=orders,
            lower_order_final=lower_order_final,
        )
        self.sde, self.noise = bool(sde), noise

    def __repr__(self):
        form = "SDE" if self.sde else "ODE"
        return f"MRSolver(order={self.order}, {form}, prediction={self.prediction!r}, term_kind={self.term_kind!r})"

    def _key(self):
        return (*super()._key(), self.sde, id(self.noise))

    def __eq__(self, other):
        return isinstance(other, MRSolver) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def _sde_coeffs(self, cache, s: float, t: float, k: int):
        """``(c, [b_j], noise std)`` of the SDE update from ``s`` to ``t`` (module docstring)."""
        a_s, s_s, lam_s, _ = self._coef(cache, s)
        a_t, s_t, lam_t, _ = self._coef(cache, t)
        h = lam_t - lam_s
        if self.prediction == "x0":
            c = (s_t / s_s) * math.exp(-h)
            b = [a_t * (2 * h) ** (j + 1) * f / 2**j for j, f in enumerate(_phis(-2 * h, k))]
            std = s_t * math.sqrt(max(-math.expm1(-2 * h), 0.0))
        else:
            c = a_t / a_s
            b = [-2 * s_t * h ** (j + 1) * f for j, f in enumerate(_phis(h, k))]
            std = s_t * math.sqrt(max(math.expm1(2 * h), 0.0))
        return c, b, std

    def step(self, term, t0, t1, y0, state):
        if not self.sde:
            return super().step(term, t0, t1, y0, state)
        if not isinstance(t0, float):
            raise NotImplementedError("MRSolver does not support per_sample=True (use a shared time grid)")
        sg = term.sign
        if sg > 0:
            raise ValueError("the SDE form of MRS samples (from t1 down to t0) only")
        i, lams, ms, cache, prev = state
        k = self._order_of_step(i)
        s, t = -float(t0), -float(t1)
        x = _tree_of(term, y0, prev)
        lam_s = self._coef(cache, s)[2]
        p_s = self._predict(term, cache, s, x)
        c, b, std = self._sde_coeffs(cache, s, t, min(k, len(lams) + 1))
        xi = self.noise.evaluate(t, s) / math.sqrt(s - t)
        out = self._combine(cache, s, t, x, self._multistep_terms(b, lam_s, p_s, lams, ms), c=c, noise=(std, xi))
        y1 = term.flat.tree_to_state(out)
        return y1, None, (y0, y1), (*self._history(i, lams, ms, lam_s, p_s), cache, (y1, out)), None
