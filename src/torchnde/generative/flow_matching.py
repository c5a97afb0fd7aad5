r"""The flow-matching family: conditional flow matching, OT-CFM, rectified flow, stochastic interpolants.

All four learn a time-dependent vector field :math:`v_\theta(t, x)` that transports a source
distribution :math:`p_0` (usually :math:`\mathcal N(0, I)`) at :math:`t = 0` to the data
distribution :math:`p_1` at :math:`t = 1`, by regression on a per-pair target, and all of them
sample by solving :math:`\dot x = v_\theta(t, x)` with :func:`torchnde.solve` (no integration
loop here).

* **Conditional flow matching** (Lipman et al. 2023, "Flow matching for generative modeling";
  Tong et al. 2024, "Improving and generalizing flow-based generative models with minibatch
  optimal transport"): with pairs :math:`(x_0, x_1)` drawn from a coupling,
  :math:`x_t = (1-t) x_0 + t x_1 + \sigma \varepsilon` and target :math:`u_t = x_1 - x_0`;
  minimise :math:`\mathbb E\,\lVert v_\theta(t, x_t) - u_t\rVert^2`. The independent coupling
  draws :math:`x_0` and :math:`x_1` independently (:func:`cfm_loss` with ``coupling="independent"``).
* **OT-CFM** (Tong et al. 2024; Pooladian et al. 2023): the pairs of a minibatch are re-matched by
  the exact optimal assignment for the squared distance (``coupling="ot"``, solved by
  ``scipy.optimize.linear_sum_assignment``), which makes the learned paths nearly straight, so
  few solver steps suffice.
* **Rectified flow** (Liu, Gong & Liu 2023, "Flow straight and fast"): flow matching with
  :math:`\sigma = 0` (:func:`rectified_flow_loss`), followed by *reflow*: draw new pairs
  :math:`(x_0, \Phi(x_0))` with the current model's flow map :math:`\Phi` and retrain on them
  (:func:`reflow`); every reflow straightens the paths.
* **Stochastic interpolants** (Albergo & Vanden-Eijnden 2023, "Building normalizing flows with
  stochastic interpolants"; Albergo, Boffi & Vanden-Eijnden 2023, "Stochastic interpolants: a
  unifying framework for flows and diffusions"): :class:`StochasticInterpolant`, with a latent
  noise :math:`\gamma(t) z` of tunable level, learns a velocity and a denoiser with one model and
  samples with an ODE or, through the score, with an SDE of any noise level.

Model convention: ``model(t, x)`` with ``x`` of shape ``(batch, ...)`` and ``t`` a ``(batch,)``
tensor of ``x``'s dtype and device; it returns the velocity, shaped like ``x``
(:class:`StochasticInterpolant` models return two such tensors: see there).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from .. import _solve
from .._saveat import SaveAt
from .._terms import ControlTerm, MultiTerm, ODETerm
from ..paths import BrownianGrid, VirtualBrownianTree
from ..solvers import AbstractAdaptiveSolver, Euler
from ._shapes import batch_hint, event_mismatch, event_shape_of, reraise_if_shape_error

__all__ = [
    "MLP",
    "ot_coupling",
    "cfm_loss",
    "rectified_flow_loss",
    "sample_ode",
    "reflow_pairs",
    "reflow",
    "fit",
    "StochasticInterpolant",
]


# ---------------------------------------------------------------------------------------- helpers
def _times(t, x: torch.Tensor) -> torch.Tensor:
    """``t`` (a float, 0-d or ``(batch,)`` tensor) as a ``(batch,)`` tensor like ``x``."""
    if isinstance(t, torch.Tensor):
        t = t.to(dtype=x.dtype, device=x.device)
        return t.expand(x.shape[0]) if t.dim() == 0 else t
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A ``(batch,)`` tensor reshaped to broadcast against ``x`` of shape ``(batch, ...)``."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def _check_pair(x0: torch.Tensor, x1: torch.Tensor) -> None:
    if x0.shape != x1.shape:
        raise ValueError(
            f"x0 and x1 must have the same shape (batch, ...); got {tuple(x0.shape)} and {tuple(x1.shape)}"
        )
    if x0.dim() < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0 and x1 need a non-empty leading batch dimension; got shape {tuple(x0.shape)}")


def _final(sol, solve_kwargs) -> torch.Tensor:
    """The value at the end of a solve saved at ``t1`` (per-sample solutions are ``(batch, T, ...)``)."""
    return sol.ys[:, -1] if solve_kwargs.get("per_sample") else sol.ys[-1]


def _sde_setup(solver, controller, nfe, path, x: torch.Tensor, seed, solve_kwargs: dict):
    """The solver and Brownian path of an additive-noise SDE sampled from 0 to 1: ``Euler()`` by
    default, checked against an adaptive ``controller``; with constant steps ``nfe`` (an int >=
    1) sets ``solve_kwargs``' default ``dt0`` and ``max_steps``; without ``path``, a
    :class:`~torchnde.VirtualBrownianTree` (adaptive) or a :class:`~torchnde.BrownianGrid` of the
    ``nfe`` steps of ``x``'s shape, carrying the Lévy area the solver declares (e.g. ``SRA1()``)."""
    solver = Euler() if solver is None else solver
    adaptive = controller is not None
    if adaptive and not isinstance(solver, AbstractAdaptiveSolver):
        raise TypeError(f"an adaptive controller needs an adaptive solver such as Heun(); got {solver!r}")
    if not adaptive:
        if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
            raise ValueError(f"nfe must be an int >= 1; got {nfe!r}")
        solve_kwargs.setdefault("dt0", 1.0 / nfe)
        solve_kwargs.setdefault("max_steps", nfe + 8)
    if path is None:
        kw = dict(seed=seed, dtype=x.dtype, device=x.device, levy_area=getattr(solver, "levy_area", None))
        path = (
            VirtualBrownianTree(0.0, 1.0, tuple(x.shape), **kw)
            if adaptive
            else BrownianGrid.uniform(0.0, 1.0, nfe, tuple(x.shape), **kw)
        )
    return solver, path


def _stages(solver) -> int:
    tableau = getattr(solver, "tableau", None)
    return len(tableau.c) if tableau is not None else 1


class MLP(nn.Module):
    """A small time-conditioned MLP ``model(t, x)`` for vectors ``x`` of shape ``(batch, dim)``.

    The input is ``x`` concatenated with ``t`` and ``sin``/``cos`` of ``2π k t`` for
    ``k = 1..time_features``; ``depth`` hidden layers of width ``hidden`` with SiLU activations;
    the output has ``out_dim`` (default ``dim``) features. Good enough for the 2-D toy densities.
    ``event_shape`` is ``(dim,)``: the samplers and ``log_prob`` check their input against it.
    """

    def __init__(
        self, dim: int, *, out_dim: int | None = None, hidden: int = 128, depth: int = 3, time_features: int = 4
    ):
        super().__init__()
        self.time_features = time_features
        self.event_shape = (int(dim),)
        layers: list[nn.Module] = []
        width = dim + 1 + 2 * time_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, out_dim or dim))
        self.net = nn.Sequential(*layers)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = _times(t, x)[:, None]
        feats = [x, t]
        if self.time_features:
            k = torch.arange(1, self.time_features + 1, dtype=x.dtype, device=x.device)
            feats += [torch.sin(2 * math.pi * k * t), torch.cos(2 * math.pi * k * t)]
        return self.net(torch.cat(feats, dim=-1))


# ---------------------------------------------------------------------------------------- couplings
def ot_coupling(x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-pair a minibatch by the exact optimal transport plan for the squared Euclidean cost.

    Returns ``(x0, x1[perm])`` where ``perm`` minimises ``sum_i |x0_i - x1_perm(i)|²`` (for two
    equal-size uniform empirical measures an optimal plan is a permutation; Tong et al. 2024).
    Solved by ``scipy.optimize.linear_sum_assignment`` on the CPU in float64, O(batch³).
    """
    from scipy.optimize import linear_sum_assignment

    _check_pair(x0, x1)
    a = x0.detach().reshape(x0.shape[0], -1).to("cpu", torch.float64)
    b = x1.detach().reshape(x1.shape[0], -1).to("cpu", torch.float64)
    cost = torch.cdist(a, b).square_().numpy()
    _, cols = linear_sum_assignment(cost)
    perm = torch.as_tensor(cols, dtype=torch.long, device=x1.device)
    return x0, x1[perm]


_COUPLINGS = ("independent", "ot")


# ---------------------------------------------------------------------------------------- losses
def cfm_loss(
    model: Callable,
    x0: torch.Tensor,
    x1: torch.Tensor,
    *,
    coupling: str = "independent",
    sigma: float = 0.0,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The conditional flow-matching loss :math:`\mathbb E\,\lVert v_\theta(t, x_t) - (x_1 - x_0)\rVert^2`.

    With :math:`x_t = (1-t)x_0 + t x_1 + \sigma\varepsilon`, :math:`t \sim U[0, 1)`,
    :math:`\varepsilon \sim \mathcal N(0, I)` (Lipman et al. 2023; Tong et al. 2024, Eq. (14)).

    Args:
        model: ``model(t, x)`` returning the velocity.
        x0: a minibatch of source samples (e.g. ``torch.randn_like(x1)``).
        x1: a minibatch of data, the same shape as ``x0``.
        coupling: ``"independent"`` (the pairs as given; for independent draws this is CFM) or
            ``"ot"`` (re-pair by the minibatch optimal assignment first: OT-CFM).
        sigma: the width of the Gaussian probability path around the straight line.
        generator: the source of ``t`` and ``ε`` (on ``x1``'s device), for reproducibility.
        t: optional ``(batch,)`` times to use instead of uniform draws.

    Returns:
        The loss, a 0-d tensor (mean over the batch and the coordinates).
    """
    _check_pair(x0, x1)
    if coupling not in _COUPLINGS:
        raise ValueError(f"coupling must be one of {_COUPLINGS}; got {coupling!r}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0; got {sigma}")
    if coupling == "ot":
        x0, x1 = ot_coupling(x0, x1)
    if t is None:
        t = torch.rand(x1.shape[0], generator=generator, dtype=x1.dtype, device=x1.device)
    else:
        t = _times(t, x1)
    tb = _bcast(t, x1)
    xt = (1 - tb) * x0 + tb * x1
    if sigma > 0:
        xt = xt + sigma * torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
    return (model(t, xt) - (x1 - x0)).square().mean()


def rectified_flow_loss(
    model: Callable, x0: torch.Tensor, x1: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""The rectified-flow loss (Liu et al. 2023, Eq. (1)): :math:`\mathbb E\,\lVert v_\theta(t, x_t) - (x_1 - x_0)\rVert^2`
    on straight interpolations :math:`x_t = (1-t)x_0 + t x_1` of the given pairs (which keep their
    coupling: independent draws for the first rectified flow, :func:`reflow_pairs` after that).
    The same as ``cfm_loss(model, x0, x1, coupling="independent", sigma=0)``."""
    return cfm_loss(model, x0, x1, coupling="independent", sigma=0.0, generator=generator)


# ---------------------------------------------------------------------------------------- sampling
def _ode_term(velocity: Callable) -> ODETerm:
    expected = event_shape_of(velocity)

    def vf(t, y, args):
        try:
            return velocity(_times(t, y), y)
        except (RuntimeError, IndexError) as e:
            reraise_if_shape_error(e, "the model", y, expected)
            raise

    return ODETerm(vf, time_as_float=True)


def _check_x0(model, x0) -> None:
    """``x0`` against the example shape ``model`` declares (if it declares one)."""
    expected = event_shape_of(model)
    if expected is not None and isinstance(x0, torch.Tensor) and tuple(x0.shape[1:]) != expected:
        raise event_mismatch(f"x0 of shape {tuple(x0.shape)}", expected, f"x0 of shape {batch_hint(expected)}")


def sample_ode(
    model: Callable,
    x0: torch.Tensor,
    *,
    nfe: int | None = 100,
    solver=None,
    controller=None,
    t0: float = 0.0,
    t1: float = 1.0,
    saveat: SaveAt | None = None,
    return_solution: bool = False,
    **solve_kwargs,
):
    r"""Transport ``x0`` along :math:`\dot x = v_\theta(t, x)` from ``t0`` to ``t1`` with :func:`torchnde.solve`.

    Args:
        model: ``model(t, x)`` returning the velocity.
        x0: source samples, shape ``(batch, ...)``.
        nfe: the budget of vector-field evaluations of a fixed-step solve: ``nfe // stages``
            equal steps (``stages`` = stages of the solver's tableau: 1 for ``Euler``, 2 for
            ``Heun``/``Midpoint``, 4 for ``RK4``). Ignored with an adaptive ``controller``.
        solver: any ODE solver (default ``Euler()``).
        controller: e.g. ``PIDController(rtol, atol)`` with an adaptive solver; then the solver
            chooses its steps and ``nfe`` is not used.
        t0, t1: the time interval (``t1 < t0`` runs the flow backwards: data to source).
        saveat: what to save (default: the final value); when given, the solution is returned.
        return_solution: return the :class:`~torchnde.Solution` (with ``stats["nfe"]``) instead of
            the samples.
        **solve_kwargs: passed to :func:`torchnde.solve` (``adjoint``, ``per_sample``, ``max_steps``...).

    Returns:
        The samples at ``t1`` (shape of ``x0``), or the :class:`~torchnde.Solution`.
    """
    _check_x0(model, x0)
    solver = Euler() if solver is None else solver
    if controller is None:
        if nfe is None or not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
            raise ValueError(f"nfe must be an int >= 1 for a fixed-step solve; got {nfe!r}")
        steps = max(1, nfe // _stages(solver))
        solve_kwargs.setdefault("dt0", (t1 - t0) / steps)
        solve_kwargs.setdefault("max_steps", steps + 8)
    sol = _solve.solve(
        _ode_term(model),
        solver,
        t0,
        t1,
        x0,
        controller=controller,
        saveat=saveat or SaveAt(t1=True),
        **solve_kwargs,
    )
    if return_solution or saveat is not None:
        return sol
    return _final(sol, solve_kwargs)


def reflow_pairs(
    model: Callable, x0: torch.Tensor, *, nfe: int = 100, solver=None, **sample_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """New training pairs ``(x0, x1)`` with ``x1`` the model's flow map of ``x0`` (no gradients):
    the coupling of the next rectified flow (Liu et al. 2023, Algorithm 1)."""
    with torch.no_grad():
        x1 = sample_ode(model, x0, nfe=nfe, solver=solver, **sample_kwargs)
    return x0, x1.detach()


def fit(
    model: nn.Module,
    pairs,
    *,
    loss: Callable = cfm_loss,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    cosine: bool = True,
    **loss_kwargs,
) -> list[float]:
    """A plain Adam training loop for any loss of this module (a convenience for tests and demos).

    Args:
        model: the module to train (in place).
        pairs: either a callable ``pairs(batch_size, generator) -> (x0, x1)`` that draws a fresh
            minibatch, or a tuple ``(x0, x1)`` of equal-length tensors from which minibatches of
            pairs are drawn jointly (the coupling is kept: reflow).
        loss: ``loss(model, x0, x1, generator=..., **loss_kwargs)``, e.g. :func:`cfm_loss`,
            :func:`rectified_flow_loss` or :meth:`StochasticInterpolant.loss`.
        steps, batch_size, lr: the optimisation; ``cosine`` decays the learning rate to 0 along a
            cosine.
        seed: seeds the generator of the minibatches, times and noise (on the data's device).

    Returns:
        The loss of every step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    p0 = params[0]
    gen = torch.Generator(device=p0.device).manual_seed(seed)
    if callable(pairs):
        draw = pairs
    else:
        xs0, xs1 = pairs
        _check_pair(xs0, xs1)

        def draw(n, generator):
            idx = torch.randint(0, xs0.shape[0], (n,), generator=generator, device=p0.device).to(xs0.device)
            return xs0[idx], xs1[idx]

    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    history = []
    for _ in range(steps):
        x0, x1 = draw(batch_size, gen)
        value = loss(model, x0, x1, generator=gen, **loss_kwargs)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if sched is not None:
            sched.step()
        history.append(float(value.detach()))
    return history


def reflow(
    model: nn.Module,
    x0: torch.Tensor,
    *,
    nfe: int = 100,
    solver=None,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    copy_model: bool = True,
) -> nn.Module:
    """One reflow step of rectified flow (Liu et al. 2023): pair the source samples ``x0`` with
    their images under the model's flow map (``nfe`` evaluations of ``solver``, default Euler),
    then train (a copy of, unless ``copy_model=False``) the model on these fixed pairs with
    :func:`rectified_flow_loss` for ``steps`` Adam steps. Returns the new model."""
    pairs = reflow_pairs(model, x0, nfe=nfe, solver=solver)
    new = copy.deepcopy(model) if copy_model else model
    fit(new, pairs, loss=rectified_flow_loss, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    return new


# ---------------------------------------------------------------------------------------- interpolants
class StochasticInterpolant:
    r"""A stochastic interpolant :math:`x_t = (1-t)\,x_0 + t\,x_1 + \gamma(t)\,z` with :math:`z \sim \mathcal N(0, I)`.

    (Albergo, Boffi & Vanden-Eijnden 2023, "Stochastic interpolants: a unifying framework for
    flows and diffusions", Sections 2–4.) The noise level is tunable: by default
    :math:`\gamma(t) = a\,t(1-t)` with ``noise`` :math:`= a \ge 0`, which vanishes at both ends
    (so :math:`x_0` and :math:`x_1` are matched exactly) and has a bounded derivative (so the
    regression targets have finite variance); pass ``gamma`` and ``dgamma`` callables for
    another choice (they must vanish at 0 and 1).

    One model learns both the velocity :math:`b(t,x) = \mathbb E[x_1 - x_0 + \gamma'(t) z \mid
    x_t = x]` and the denoiser :math:`\eta(t,x) = \mathbb E[z \mid x_t = x]`: ``model(t, x)``
    returns a pair ``(b, eta)``, or one tensor whose last dimension is twice the data's (split in
    halves: :class:`MLP` with ``out_dim=2 * dim``). The score of the interpolant's law is
    :math:`s = -\eta/\gamma`. From the one model:

    * :meth:`sample_ode`: :math:`\dot x = b(t, x)` (the transport ODE);
    * :meth:`sample_sde`: :math:`dx = [b + \epsilon(t) s]\,dt + \sqrt{2\epsilon(t)}\,dW`, which has
      the same marginals for every :math:`\epsilon(t) \ge 0` (Albergo et al. 2023, Thm. 2.8).
      With :math:`\epsilon(t) = c\,\gamma(t)` (``diffusion`` :math:`= c`) the drift is
      :math:`b - c\,\eta`, bounded even where :math:`\gamma` vanishes; it is integrated by
      Euler–Maruyama (or any SDE solver) through :func:`torchnde.solve` on a Brownian path.
    """

    def __init__(self, noise: float = 1.0, *, gamma: Callable | None = None, dgamma: Callable | None = None):
        if (gamma is None) != (dgamma is None):
            raise ValueError("pass both gamma and dgamma (its derivative), or neither")
        if noise < 0:
            raise ValueError(f"noise must be >= 0; got {noise}")
        self.noise = float(noise)
        self._gamma = gamma
        self._dgamma = dgamma

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """The latent noise level :math:`\\gamma(t)`."""
        return self._gamma(t) if self._gamma is not None else self.noise * t * (1 - t)

    def dgamma(self, t: torch.Tensor) -> torch.Tensor:
        """Its derivative :math:`\\gamma'(t)`."""
        return self._dgamma(t) if self._dgamma is not None else self.noise * (1 - 2 * t)

    @staticmethod
    def split(out, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A model's output as ``(b, eta)``, each shaped like ``x``."""
        if isinstance(out, (tuple, list)):
            b, eta = out
        else:
            if out.shape[-1] != 2 * x.shape[-1]:
                raise ValueError(
                    "a stochastic-interpolant model returns (b, eta) or one tensor with twice the data's last "
                    f"dimension; got {tuple(out.shape)} for data of shape {tuple(x.shape)}"
                )
            b, eta = out.chunk(2, dim=-1)
        return b, eta

    def interpolate(self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, z: torch.Tensor):
        """``(x_t, dx_t/dt)`` for times ``t`` of shape ``(batch,)``."""
        tb = _bcast(t, x1)
        xt = (1 - tb) * x0 + tb * x1 + self.gamma(tb) * z
        return xt, x1 - x0 + self.dgamma(tb) * z

    def loss(
        self,
        model: Callable,
        x0: torch.Tensor,
        x1: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r""":math:`\mathbb E\,[\lVert b(t, x_t) - \dot x_t\rVert^2 + \lVert \eta(t, x_t) - z\rVert^2]`
        (the velocity and denoiser losses of Albergo et al. 2023, Eqs. (2.13), (2.19)), with
        :math:`t \sim U[0, 1)` and :math:`x_0, x_1` the given (independent) minibatches."""
        _check_pair(x0, x1)
        if t is None:
            t = torch.rand(x1.shape[0], generator=generator, dtype=x1.dtype, device=x1.device)
        else:
            t = _times(t, x1)
        z = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        xt, dxt = self.interpolate(t, x0, x1, z)
        b, eta = self.split(model(t, xt), x1)
        return (b - dxt).square().mean() + (eta - z).square().mean()

    def velocity(self, model: Callable) -> Callable:
        """The velocity ``b(t, x)`` of a trained model, as a ``model(t, x)`` for :func:`sample_ode`."""
        return lambda t, x: self.split(model(t, x), x)[0]

    def score(self, model: Callable, t, x: torch.Tensor) -> torch.Tensor:
        r"""The score :math:`\nabla \log \rho_t(x) = -\eta(t, x)/\gamma(t)` (undefined where :math:`\gamma = 0`)."""
        t = _times(t, x)
        return -self.split(model(t, x), x)[1] / self.gamma(_bcast(t, x))

    def sample_ode(self, model: Callable, x0: torch.Tensor, **kwargs):
        """Samples by the transport ODE :math:`\\dot x = b(t, x)`; keywords as :func:`sample_ode`."""
        return sample_ode(self.velocity(model), x0, **kwargs)

    def sample_sde(
        self,
        model: Callable,
        x0: torch.Tensor,
        *,
        nfe: int = 100,
        diffusion: float = 1.0,
        solver=None,
        controller=None,
        seed: int = 0,
        path=None,
        return_solution: bool = False,
        **solve_kwargs,
    ):
        r"""Samples by the SDE :math:`dx = [b - c\,\eta]\,dt + \sqrt{2c\,\gamma(t)}\,dW` from 0 to 1.

        Args:
            model: the trained ``(b, eta)`` model.
            x0: source samples, shape ``(batch, ...)``.
            nfe: number of equal steps (one drift evaluation each for Euler–Maruyama); ignored
                with an adaptive ``controller``.
            diffusion: :math:`c` in :math:`\epsilon(t) = c\,\gamma(t)`; 0 gives the ODE.
            solver: an SDE solver for Itô SDEs (default ``Euler()``, Euler–Maruyama; the noise is
                additive, so Itô and Stratonovich solvers agree).
            controller: an adaptive controller (e.g. ``PIDController`` with ``Heun()``); the path
                is then a :class:`~torchnde.VirtualBrownianTree`.
            seed: the Brownian path's seed.
            path: a Brownian path of ``x0``'s shape on ``[0, 1]`` to use instead (default: a
                :class:`~torchnde.BrownianGrid` of the ``nfe`` steps, or a virtual Brownian tree;
                either with the Lévy area the solver declares, e.g. ``SRA1()``'s).
            return_solution: return the :class:`~torchnde.Solution` instead of the samples.
            **solve_kwargs: passed to :func:`torchnde.solve`.
        """
        if diffusion < 0:
            raise ValueError(f"diffusion must be >= 0; got {diffusion}")
        solver, path = _sde_setup(solver, controller, nfe, path, x0, seed, solve_kwargs)
        c = float(diffusion)

        def drift(t, x, args):
            t = _times(t, x)
            b, eta = self.split(model(t, x), x)
            return b - c * eta

        def sigma(t, x, args):
            g = self.gamma(_bcast(_times(t, x), x)).clamp_min(0.0)
            return torch.sqrt(2 * c * g).expand_as(x)

        terms = MultiTerm(
            ODETerm(drift, time_as_float=True),
            ControlTerm(sigma, path, noise="diagonal", additive=True, time_as_float=True),
        )
        sol = _solve.solve(terms, solver, 0.0, 1.0, x0, controller=controller, **solve_kwargs)
        return sol if return_solution else _final(sol, solve_kwargs)
