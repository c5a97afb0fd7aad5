"""torchsde's ``sdeint``, ``sdeint_adjoint`` and Brownian motions, computed by torchnde.

Switching an existing code base is one import line::

    # from torchsde import sdeint, sdeint_adjoint, BrownianInterval, BrownianTree
    from torchnde.compat.torchsde import sdeint, sdeint_adjoint, BrownianInterval, BrownianTree

The signatures, defaults (``dt=1e-3, rtol=1e-5, atol=1e-4, dt_min=1e-5``), method names, noise
types and return values are torchsde's (0.2.x). The ``sde`` object is used as in torchsde: its
``f(t, y)`` and ``g(t, y)`` (or ``f_and_g``; ``h`` for ``logqp``), ``noise_type`` and ``sde_type``;
``t`` is a 0-d tensor of ``ts``'s dtype. ``y0`` is ``(batch, d)``, the result ``(len(ts), batch, d)``.

Also torchsde's ``BaseSDE``, ``SDEIto``, ``SDEStratonovich``, ``BaseBrownian``,
``ReverseBrownian``, ``brownian_interval_like`` and the ``settings`` containers (``METHODS``,
``NOISE_TYPES``, ``SDE_TYPES``, ``LEVY_AREA_APPROXIMATIONS``, ``METHOD_OPTIONS``).

What is computed the same way:

* the time grid: fixed steps ``ts[0] + dt, ts[0] + 2 dt, ...`` accumulated in ``ts``'s dtype as
  torchsde does, the last step clamped to ``ts[-1]``, each step ending exactly on the grid;
  outputs between steps are linear interpolations of the steps around them (the steps do not land
  on ``ts``), so with the same Brownian path a fixed-step solve reproduces torchsde's to rounding
  error for every method;
* the schemes of ``"euler"``, ``"milstein"``, ``"srk"`` (Rößler's SRA1 on additive noise, SRID2
  on diagonal and scalar noise: :class:`~torchnde.solvers.SRID2`), ``"midpoint"``, ``"heun"``,
  ``"euler_heun"``, ``"reversible_heun"`` and ``"log_ode"`` (the log-ODE midpoint scheme with the
  Brownian motion's Davie/Foster Lévy area);
* ``adaptive=True``: torchsde's error estimate (one full step against two half steps, for every
  method) and its step-size rule, outputs interpolated between steps: the same steps and values;
* the ``logqp`` penalty (``0.5 |u|^2`` with ``g u = f - h``, integrated as an extra state),
  ``names=`` renaming, ``extra=True`` (``()``, or ``(f, g, z)`` for ``"reversible_heun"``, which
  ``extra_solver_state=`` resumes from), SDEs that define only ``g_prod`` / ``f_and_g_prod`` (the
  diffusion matrix is recovered column by column: ``m`` products per evaluation on general noise).

The noise types become a :class:`~torchnde.ControlTerm`: ``"diagonal"`` → ``noise="diagonal"``;
``"scalar"`` (``g`` of shape ``(batch, d, 1)``) → ``noise="scalar"`` with ``g`` squeezed;
``"additive"`` → ``noise="general", additive=True``; ``"general"`` → ``noise="general"``. The
calculus is declared from ``sde_type``.

What differs:

* the default Brownian motion is a :class:`~torchnde.VirtualBrownianTree` seeded from torch's
  global generator (``torch.manual_seed`` makes it reproducible; torchsde draws from numpy). The
  Brownian classes here give other sample paths than torchsde's for the same ``entropy``.
* ``sdeint_adjoint`` uses :class:`~torchnde.BacksolveAdjoint` (or, for ``"reversible_heun"``,
  :class:`~torchnde.ReversibleAdjoint`, exact gradients of the computed solution); gradients reach
  every tensor ``f`` and ``g`` use, whether or not it is listed in ``adjoint_params`` (unused
  listed parameters get zeros). On an Itô SDE with non-additive noise the values are ``sdeint``'s
  and the gradients those of the stochastic adjoint of the SDE's Stratonovich form (drift minus
  ``½ Σ_j (∂g_j/∂y) g_j``), solved backwards with the midpoint method whatever the Itô
  ``adjoint_method``; this costs one extra forward solve of the Stratonovich form.
* unknown keyword arguments, unknown ``options`` and unknown ``names`` keys raise ``TypeError``
  (torchsde warns or ignores them); a fixed ``dt`` below the resolution of ``ts``'s dtype raises
  ``ValueError`` (torchsde loops forever).

Not supported (``NotImplementedError`` naming the alternative): ``extra=True`` /
``extra_solver_state`` with ``"reversible_heun"`` in ``sdeint_adjoint`` or with ``adaptive=True``.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from torch import nn

from .._results import SolveError
from .._saveat import SaveAt
from .._solve import solve
from .._terms import ControlTerm, MultiTerm, ODETerm, cached_time, time_table
from ..adjoints import BacksolveAdjoint, DirectAdjoint, ReversibleAdjoint
from ..controllers import ConstantStepSize, PIDController, StepTo
from ..paths import AbstractBrownianPath, BrownianIncrement
from ..solvers import AbstractAdaptiveSolver, AbstractSolver
from ..solvers._base import linear_coeffs

__all__ = [
    "sdeint",
    "sdeint_adjoint",
    "BaseSDE",
    "SDEIto",
    "SDEStratonovich",
    "BaseBrownian",
    "BrownianInterval",
    "BrownianTree",
    "BrownianPath",
    "ReverseBrownian",
    "brownian_interval_like",
    "SolveError",
    "METHODS",
    "NOISE_TYPES",
    "SDE_TYPES",
    "LEVY_AREA_APPROXIMATIONS",
    "METHOD_OPTIONS",
]


class _Choices(type):
    """A class of string constants that behaves like torchsde's ``settings`` containers:
    ``NOISE_TYPES.diagonal == "diagonal"``, ``"diagonal" in NOISE_TYPES``, ``NOISE_TYPES.all()``."""

    def all(cls) -> list:
        return sorted(v for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, str))

    def __contains__(cls, item) -> bool:
        return item in cls.all()

    def __iter__(cls):
        return iter(cls.all())

    def __str__(cls) -> str:
        return str(cls.all())


class METHODS(metaclass=_Choices):
    """The ``method`` names of torchsde's ``sdeint`` (``torchsde.settings.METHODS``)."""

    euler = "euler"
    milstein = "milstein"
    srk = "srk"
    midpoint = "midpoint"
    reversible_heun = "reversible_heun"
    adjoint_reversible_heun = "adjoint_reversible_heun"
    heun = "heun"
    log_ode_midpoint = "log_ode"
    euler_heun = "euler_heun"


class NOISE_TYPES(metaclass=_Choices):  # noqa: N801 - torchsde's name
    """torchsde's noise types: ``general``, ``diagonal``, ``scalar``, ``additive``."""

    general = "general"
    diagonal = "diagonal"
    scalar = "scalar"
    additive = "additive"


class SDE_TYPES(metaclass=_Choices):  # noqa: N801 - torchsde's name
    """torchsde's SDE types: ``ito``, ``stratonovich``."""

    ito = "ito"
    stratonovich = "stratonovich"


class LEVY_AREA_APPROXIMATIONS(metaclass=_Choices):  # noqa: N801 - torchsde's name
    """torchsde's ``levy_area_approximation`` values."""

    none = "none"
    space_time = "space-time"
    davie = "davie"
    foster = "foster"


class METHOD_OPTIONS(metaclass=_Choices):  # noqa: N801 - torchsde's name
    """The keys of ``options`` (``grad_free`` for ``"milstein"``)."""

    grad_free = "grad_free"


_SDE_TYPES = ("ito", "stratonovich")
_NOISE_TYPES = ("diagonal", "additive", "scalar", "general")
_LEVY = ("none", "space-time", "davie", "foster")


class BaseSDE(nn.Module):
    """torchsde's ``BaseSDE``: an ``nn.Module`` with validated ``noise_type`` and ``sde_type``
    attributes. Subclass it and define ``f(t, y)`` and ``g(t, y)`` (or ``f_and_g``; ``h`` for
    ``logqp``).

    Example:
        >>> class OU(BaseSDE):
        ...     def __init__(self):
        ...         super().__init__(noise_type="diagonal", sde_type="ito")
        ...     def f(self, t, y): return -y
        ...     def g(self, t, y): return 0.1 * torch.ones_like(y)
        >>> OU().noise_type
        'diagonal'
    """

    def __init__(self, noise_type, sde_type):
        super().__init__()
        if noise_type not in _NOISE_TYPES:
            raise ValueError(f"Expected noise type in {sorted(_NOISE_TYPES)}, but found {noise_type}")
        if sde_type not in _SDE_TYPES:
            raise ValueError(f"Expected sde type in {sorted(_SDE_TYPES)}, but found {sde_type}")
        self.noise_type = noise_type
        self.sde_type = sde_type


class SDEIto(BaseSDE):
    """torchsde's ``SDEIto(noise_type)``: a :class:`BaseSDE` with ``sde_type="ito"``."""

    def __init__(self, noise_type):
        super().__init__(noise_type=noise_type, sde_type="ito")


class SDEStratonovich(BaseSDE):
    """torchsde's ``SDEStratonovich(noise_type)``: a :class:`BaseSDE` with ``sde_type="stratonovich"``."""

    def __init__(self, noise_type):
        super().__init__(noise_type=noise_type, sde_type="stratonovich")


# method -> (sde types it solves, noise types it handles); torchsde's own table
_ALL_NOISE = _NOISE_TYPES
_METHODS = {
    "euler": (("ito",), _ALL_NOISE),
    "milstein": (_SDE_TYPES, ("additive", "diagonal", "scalar")),
    "srk": (("ito",), ("additive", "diagonal", "scalar")),
    "midpoint": (("stratonovich",), _ALL_NOISE),
    "heun": (("stratonovich",), _ALL_NOISE),
    "euler_heun": (("stratonovich",), _ALL_NOISE),
    "reversible_heun": (("stratonovich",), _ALL_NOISE),
    "adjoint_reversible_heun": (("stratonovich",), _ALL_NOISE),
    "log_ode": (("stratonovich",), _ALL_NOISE),
}
_NAMES = {
    "drift": "f",
    "diffusion": "g",
    "prior_drift": "h",
    "diffusion_prod": "g_prod",
    "drift_and_diffusion": "f_and_g",
    "drift_and_diffusion_prod": "f_and_g_prod",
}


# --------------------------------------------------------------------------------------------
# methods -> solvers


def _import_solver(name: str):
    """A solver class of :mod:`torchnde.solvers` by name (imported lazily: some SDE solvers are
    newer than this module)."""
    from .. import solvers

    cls = getattr(solvers, name, None)
    if cls is None:
        import importlib

        for mod in ("milstein", "euler_heun", "sra1", "shark", "spark", "srid2"):
            try:
                m = importlib.import_module(f"torchnde.solvers.{mod}")
            except ImportError:
                continue
            cls = getattr(m, name, None)
            if cls is not None:
                break
    if cls is None:
        raise NotImplementedError(f"torchnde.solvers.{name} is not available in this version of torchnde")
    return cls


def _milstein(sde_type: str, options: dict):
    grad_free = bool(options.pop("grad_free", False))
    cls = _import_solver("ItoMilstein" if sde_type == "ito" else "StratonovichMilstein")
    # torchsde's grad_free=True is the derivative-free variant; torchnde's Milstein solvers take
    # the derivative of g by a Jacobian-vector product. Both have strong order 1 on commutative
    # noise; the derivative-free scheme is accepted and solved with the derivative.
    del grad_free
    return cls()


class _LogODEMidpoint(AbstractSolver):
    r"""torchsde's ``"log_ode"``: the explicit midpoint method applied to the log-ODE of the step
    (Lie--Trotter splitting), with the Lévy area :math:`A` of the Brownian motion approximated
    (Davie / Foster). With :math:`t' = t_n + h/2`,

    .. math::
        y' = y_n + \tfrac h2 f(t_n, y_n) + \tfrac12 g(t_n, y_n) \Delta W,\qquad
        y_{n+1} = y_n + h f(t', y') + g(t', y') \Delta W + \sum_{k,l} (\partial_y g_{\cdot l}\, g_{\cdot k})(t', y') A_{kl}.

    The Lévy-area term vanishes for diagonal, scalar and additive noise (where the scheme is the
    midpoint method); for general noise it costs one Jacobian-vector product per Brownian
    dimension. Strong order 0.5 (general noise), 1 (commutative noise), weak order 1.
    """

    order = None
    dense_order = 1
    calculus = "stratonovich"
    levy_area = None
    strong_order = {"general": 0.5, "commutative": 1.0}

    def __init__(self, levy_A=None):
        self.levy_A = levy_A  # (t0, t1) -> Lévy area (batch, m, m), or None for non-general noise

    def init(self, term, t0, y0):
        return None

    def step(self, term, t0, t1, y0, state):
        if getattr(term, "custom", False):
            raise ValueError(
                "method='log_ode' cannot solve the adjoint SDE (it needs the diffusion itself); use "
                "adjoint_method='midpoint' (or 'heun', 'euler_heun')"
            )
        h = t1 - t0
        w = term.noise(t0, t1)
        f0 = term.vf(t0, y0)
        g0 = term.diffusion(t0, y0)
        ym = y0 + (0.5 * h) * f0 + 0.5 * term.gprod(g0, w)
        tm = t0 + 0.5 * h
        fm = term.vf(tm, ym)
        gm = term.diffusion(tm, ym)
        y1 = y0 + h * fm + term.gprod(gm, w)
        if self.levy_A is not None and term.noise_type == "general" and not term.control.additive:
            from ..solvers.milstein import _jvp

            A = self.levy_A(t0, t1)
            ga = torch.bmm(gm, A)
            flat = term.flat.tree_to_state
            for col in range(gm.shape[-1]):
                _, d = _jvp(lambda y, col=col: flat(term.diffusion(tm, y)[..., col]), ym, flat(ga[..., col]))
                y1 = y1 + d
        return y1, None, (y0, y1), None, None

    def dense_coeffs(self, term, dense_info):
        return linear_coeffs(*dense_info)


def _solver_for(method: str, sde_type: str, noise_type: str, options: dict, what: str = "method") -> AbstractSolver:
    """The torchnde solver of a torchsde method (``options`` is consumed)."""
    if method == "log_ode":
        return _LogODEMidpoint()
    if method == "milstein":
        return _milstein(sde_type, options)
    if method == "srk":
        return _import_solver("SRA1" if noise_type == "additive" else "SRID2")()
    if method == "euler":
        from ..solvers import Euler

        return Euler()
    if method == "midpoint":
        from ..solvers import Midpoint

        return Midpoint()
    if method == "heun":
        from ..solvers import Heun

        return Heun()
    if method == "euler_heun":
        return _import_solver("EulerHeun")()
    if method in ("reversible_heun", "adjoint_reversible_heun"):
        from ..solvers import ReversibleHeun

        return ReversibleHeun()
    raise ValueError(f"Method '{method}' does not match any known method.")  # pragma: no cover


def _check_method(method, sde_type, noise_type, what="method"):
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"Expected {what} in {sorted(_METHODS)}, but found {method}.")
    types, noises = _METHODS[method]
    if sde_type not in types:
        raise ValueError(f"SDE is of type {sde_type} but solver is for type {types[0]}")
    if noise_type not in noises:
        raise ValueError(f"SDE has noise type {noise_type} but solver only supports noise types {noises}")


def _default_method(sde_type: str, noise_type: str) -> str:
    if sde_type == "stratonovich":
        return "midpoint"
    return "euler" if noise_type == "general" else "srk"


def _default_adjoint_method(sde_type: str, noise_type: str, method: str) -> str:
    if method == "reversible_heun":
        return "adjoint_reversible_heun"
    if sde_type == "stratonovich":
        return "midpoint"
    return "milstein" if noise_type == "diagonal" else "euler"


class _StepDoubling(AbstractAdaptiveSolver):
    """torchsde's error estimate for any method: one full step against two half steps (the
    result of the two half steps is kept). Made per base solver by :func:`_step_doubling`."""

    order = None
    dense_order = 1
    base: AbstractSolver

    def init(self, term, t0, y0):
        return self.base.init(term, t0, y0)

    def step(self, term, t0, t1, y0, state):
        y_full = self.base.step(term, t0, t1, y0, state)[0]
        tm = t0 + 0.5 * (t1 - t0)
        y_half, _, _, s_half, _ = self.base.step(term, t0, tm, y0, state)
        y1, _, _, s1, result = self.base.step(term, tm, t1, y_half, s_half)
        return y1, y1 - y_full, (y0, y1), s1, result

    def dense_coeffs(self, term, dense_info):
        return linear_coeffs(*dense_info)

    def __repr__(self):
        return f"StepDoubling({self.base!r})"

    def __eq__(self, other):
        return isinstance(other, _StepDoubling) and other.base == self.base

    def __hash__(self):
        return hash(("step_doubling", self.base))


def _step_doubling(base: AbstractSolver) -> AbstractAdaptiveSolver:
    cls = type(base)
    orders = dict(cls.strong_order)
    sub = type(
        f"StepDoubling{cls.__name__}",
        (_StepDoubling,),
        {
            "strong_order": orders,
            "calculus": cls.calculus,
            "levy_area": cls.levy_area,
            # the local error of a strong-order-p scheme is O(h^(p + 1/2)); the controller's
            # exponent is 1 / (error_order + 1)
            "error_order": min(orders.values()) if orders else 0.5,
        },
    )
    solver = sub()
    solver.base = base
    return solver


# --------------------------------------------------------------------------------------------
# Brownian motion


class BaseBrownian:
    """torchsde's ``BaseBrownian``: the interface of a Brownian motion that ``sdeint`` accepts as
    ``bm=``. A subclass defines ``__call__(ta, tb=None, return_U=False, return_A=False)`` (the
    increment ``W(tb) - W(ta)``, optionally with the space-time and Lévy areas) and the
    properties ``shape``, ``dtype``, ``device`` and ``levy_area_approximation``. Every Brownian
    motion of this module is one (and also a torchnde :class:`~torchnde.paths.AbstractBrownianPath`)."""

    __slots__ = ()

    def __call__(self, ta, tb=None, return_U=False, return_A=False):  # pragma: no cover - interface
        raise NotImplementedError

    def size(self) -> torch.Size:
        return self.shape


class _BrownianBase(AbstractBrownianPath, BaseBrownian):
    """A Brownian path usable by torchnde (``evaluate``/``increment``) and callable like
    torchsde's Brownian motions."""

    _levy_name: str
    _w0 = None

    @property
    def levy_area_approximation(self) -> str:
        return self._levy_name

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._size)

    def size(self) -> torch.Size:
        return self.shape

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return self._device

    def _increment(self, s: float, t: float):
        raise NotImplementedError  # pragma: no cover

    def evaluate(self, s, t=None):
        if t is None:
            s, t = self.t0, s
        s, t = _as_time(s), _as_time(t)
        if s > t:
            return -self._increment(t, s)[0]
        return self._increment(s, t)[0]

    def increment(self, s, t) -> BrownianIncrement:
        s, t = _as_time(s), _as_time(t)
        if s > t:
            W, H = self._increment(t, s)
            return BrownianIncrement(s - t, -W, H)
        W, H = self._increment(s, t)
        return BrownianIncrement(t - s, W, H)

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        """torchsde's query: ``W(tb) - W(ta)``, or with ``tb=None`` the value ``W(ta)`` (for
        :class:`BrownianInterval` measured from its ``t0``; :class:`BrownianTree` and
        :class:`BrownianPath` add ``w0``). ``return_U`` adds ``U = int_ta^tb (W(s) - W(ta)) ds``
        (``None`` without a space-time Lévy area), ``return_A`` the Davie/Foster approximation of
        the Lévy area (``None`` unless built with ``levy_area_approximation="davie"``/``"foster"``)."""
        point = tb is None
        if point:
            ta, tb = self.t0, ta
        ta, tb = _as_time(ta), _as_time(tb)
        if ta > tb:
            raise RuntimeError(f"Query times ta={ta:.3f} and tb={tb:.3f} must respect ta <= tb.")
        W, H = self._increment(ta, tb)
        if point and not return_U and not return_A and self._w0 is not None:
            return W + self._w0
        h = tb - ta
        out = [W]
        if return_U:
            out.append(None if H is None else h * (0.5 * W + H))
        if return_A:
            out.append(self._levy_A(W, H, ta, tb))
        return out[0] if len(out) == 1 else tuple(out)

    def _levy_A(self, W, H, ta, tb):
        """Davie's approximation of the Lévy area from the space-time Lévy area, with Foster's
        correction of the variance for ``"foster"`` (Davie 2014, "KMT theory applied to
        approximations of SDE"; Foster 2020, "Numerical approximations for stochastic differential
        equations", thesis, Oxford). The Gaussian part is drawn from a generator seeded by
        ``(entropy, ta, tb)``: the same query gives the same value."""
        if self._levy_name not in ("davie", "foster"):
            return None
        if W.dim() in (0, 1):
            return torch.zeros_like(W)
        h = tb - ta
        A = H.unsqueeze(-1) * W.unsqueeze(-2) - W.unsqueeze(-1) * H.unsqueeze(-2)
        gen = torch.Generator().manual_seed(hash((self.entropy, ta, tb)) & 0x7FFF_FFFF_FFFF_FFFF)
        noise = torch.randn((*W.shape, W.shape[-1]), generator=gen, dtype=torch.float64)
        noise = (noise - noise.transpose(-1, -2)).to(dtype=W.dtype, device=W.device)
        if self._levy_name == "foster":
            H2 = H**2
            std = (0.1 * h * (0.1 * h + H2.unsqueeze(-1) + H2.unsqueeze(-2))).sqrt()
        else:
            std = math.sqrt(h * h / 12)
        return A + std * noise

    def __repr__(self):
        return (
            f"{type(self).__name__}(t0={self.t0:.3f}, t1={self.t1:.3f}, shape={tuple(self._size)}, "
            f"dtype={self._dtype}, device={self._device}, entropy={self.entropy}, "
            f"levy_area_approximation={self._levy_name!r})"
        )


def _as_time(t) -> float:
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"a time must be a scalar, got a tensor of shape {tuple(t.shape)}")
        return float(t.detach())
    return float(t)


def _random_entropy() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


class _TreeBrownian(_BrownianBase):
    """Shared construction: a :class:`~torchnde.VirtualBrownianTree` over ``[t0, t1]``."""

    def _build(self, t0, t1, size, dtype, device, entropy, tol, levy):
        t0, t1 = _as_time(t0), _as_time(t1)
        if t0 > t1:
            raise ValueError(f"Initial time {t0} should be less than terminal time {t1}.")
        if levy not in _LEVY:
            raise ValueError(f"`levy_area_approximation` must be one of {list(_LEVY)}, but got '{levy}'.")
        if size is None:
            size = ()
        size = tuple(int(s) for s in (size if isinstance(size, (tuple, list, torch.Size)) else (size,)))
        dtype = torch.get_default_dtype() if dtype is None else dtype
        device = torch.device("cpu") if device is None else torch.device(device)
        self.entropy = _random_entropy() if entropy is None else int(entropy)
        self.t0, self.t1 = t0, t1
        self._size, self._dtype, self._device = size, dtype, device
        self._levy_name = levy
        self.levy_area = None if levy == "none" else "space-time"
        from ..paths._brownian import VirtualBrownianTree

        kw = {} if tol is None or tol <= 0 else {"tol": float(tol)}
        self._tree = VirtualBrownianTree(
            t0, t1, size, levy_area=self.levy_area, seed=self.entropy, dtype=dtype, device=device, **kw
        )

    def _increment(self, s, t):
        if self.levy_area is None:
            return self._tree.evaluate(s, t), None
        inc = self._tree.increment(s, t)
        return inc.W, inc.H

    def evaluate(self, s, t=None):
        return self._tree.evaluate(s, t)

    def increment(self, s, t) -> BrownianIncrement:
        return self._tree.increment(s, t)

    @property
    def increments(self):
        """The tree's vectorised query over many intervals, where the tree has one (an
        ``AttributeError`` otherwise, so ``hasattr(bm, "increments")`` tells)."""
        return self._tree.increments


def _reject(kwargs: dict, where: str, valid):
    if kwargs:
        raise TypeError(
            f"{where} got unexpected keyword argument(s) {', '.join(map(repr, kwargs))}; supported: {', '.join(valid)}"
        )


class BrownianInterval(_TreeBrownian):
    """torchsde's ``BrownianInterval``, as a :class:`~torchnde.VirtualBrownianTree`.

    ``entropy`` is the tree's seed (``None``: drawn from torch's global generator);
    ``levy_area_approximation="space-time"`` builds the tree with the space-time Lévy area
    (needed by ``method="srk"``), ``"davie"``/``"foster"`` also give Davie's / Foster's
    approximation of the Lévy area through ``return_A=True``. ``tol > 0`` is the tree's
    resolution in time. ``dt``, ``pool_size``, ``cache_size`` and ``halfway_tree`` tune torchsde's
    data structure and are accepted without effect (the tree is always query-order independent,
    like torchsde's ``halfway_tree=True``). ``W`` (and with a Lévy area ``H``) condition the path
    on its increment (and space-time Lévy area) over ``[t0, t1]``; ``size``, ``dtype`` and
    ``device`` then default to ``W``'s.

    Example:
        >>> bm = BrownianInterval(t0=0.0, t1=1.0, size=(4, 1), entropy=0)
        >>> bm(0.0, 0.5).shape
        torch.Size([4, 1])
    """

    _VALID = (
        "t0", "t1", "size", "dtype", "device", "entropy", "dt", "tol", "pool_size", "cache_size",
        "halfway_tree", "levy_area_approximation", "W", "H",
    )  # fmt: skip

    def __init__(
        self,
        t0=0.0,
        t1=1.0,
        size=None,
        dtype=None,
        device=None,
        entropy=None,
        dt=None,
        tol=0.0,
        pool_size=8,
        cache_size=45,
        halfway_tree=False,
        levy_area_approximation="none",
        W=None,
        H=None,
        **kwargs,
    ):
        _reject(kwargs, "BrownianInterval()", self._VALID)
        if tol < 0:
            raise ValueError("`tol` should be non-negative.")
        if W is not None:
            if not isinstance(W, torch.Tensor):
                raise TypeError(f"W must be a tensor, got {type(W).__name__}")
            size = W.shape if size is None else size
            dtype = W.dtype if dtype is None else dtype
            device = W.device if device is None else device
            if tuple(size) != tuple(W.shape):
                raise ValueError(f"size {tuple(size)} does not match W's shape {tuple(W.shape)}")
        if H is not None and (W is None or levy_area_approximation == "none"):
            raise ValueError("H (the space-time Lévy area over [t0, t1]) needs W and a levy_area_approximation")
        self._build(t0, t1, size, dtype, device, entropy, tol, levy_area_approximation)
        if W is not None:
            self._tree._condition(W, H)


class BrownianTree(_TreeBrownian):
    """torchsde's ``BrownianTree(t0, w0, t1=None, w1=None, entropy=None, tol=1e-6, ...)``: a
    Brownian motion of ``w0``'s shape, dtype and device with ``W(t0) = w0``, over ``[t0, t1]``
    (``t1`` defaults to ``t0 + 1``). ``pool_size``, ``cache_depth`` and ``safety`` are accepted
    without effect; ``w1`` conditions the path on ``W(t1) = w1``."""

    _VALID = ("t0", "w0", "t1", "w1", "entropy", "tol", "pool_size", "cache_depth", "safety")

    def __init__(
        self, t0, w0, t1=None, w1=None, entropy=None, tol=1e-6, pool_size=24, cache_depth=9, safety=None, **kwargs
    ):
        _reject(kwargs, "BrownianTree()", self._VALID)
        if not isinstance(w0, torch.Tensor):
            raise TypeError(f"w0 must be a tensor, got {type(w0).__name__}")
        t1 = _as_time(t0) + 1 if t1 is None else t1
        self._build(t0, t1, w0.shape, w0.dtype, w0.device, entropy, tol, "none")
        self._w0 = w0
        if w1 is not None:
            self._tree._condition(w1 - w0)


class BrownianPath(_TreeBrownian):
    """torchsde's ``BrownianPath(t0, w0, window_size=8)``: a Brownian motion of ``w0``'s shape,
    dtype and device with ``W(t0) = w0`` over ``[t0, t0 + 1]`` (as in torchsde).
    ``window_size`` is accepted without effect."""

    _VALID = ("t0", "w0", "window_size")

    def __init__(self, t0, w0, window_size=8, **kwargs):
        _reject(kwargs, "BrownianPath()", self._VALID)
        if not isinstance(w0, torch.Tensor):
            raise TypeError(f"w0 must be a tensor, got {type(w0).__name__}")
        self._build(t0, _as_time(t0) + 1, w0.shape, w0.dtype, w0.device, None, 0.0, "none")
        self._w0 = w0


class ReverseBrownian(_BrownianBase):
    """torchsde's ``ReverseBrownian(base_brownian)``: the Brownian motion ``s -> base(-s)`` on
    ``[-t1, -t0]``, for solving an SDE backwards in time in the forward direction (torchsde's
    reversibility idiom: ``sdeint(minus_sde, ys[-1], -ts.flip(0), bm=ReverseBrownian(bm))``).

    ``rb(ta, tb)`` is ``base(-tb, -ta)`` (the statistics are not negated, as in torchsde: the
    minus-SDE's drift and diffusion carry the sign). As a torchnde path, its increment over
    ``[s, t]`` is the same ``W``, with the space-time Lévy area of the reversed interval
    (``-H``: the Brownian bridge of the reversed path is the negated bridge).
    """

    def __init__(self, base_brownian):
        self.base_brownian = base_brownian
        t0 = getattr(base_brownian, "t0", getattr(base_brownian, "_start", None))
        t1 = getattr(base_brownian, "t1", getattr(base_brownian, "_end", None))
        self.t0 = None if t1 is None else -_as_time(t1)
        self.t1 = None if t0 is None else -_as_time(t0)
        self.entropy = getattr(base_brownian, "entropy", None)
        self._size = tuple(base_brownian.shape)
        self._dtype, self._device = base_brownian.dtype, base_brownian.device
        self._levy_name = base_brownian.levy_area_approximation
        self.levy_area = None if self._levy_name == "none" else "space-time"

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if tb is None:
            ta, tb = self.t0, ta
        return self.base_brownian(-_as_time(tb), -_as_time(ta), return_U=return_U, return_A=return_A)

    def _increment(self, s, t):
        base = self.base_brownian
        if isinstance(base, _BrownianBase):
            W, H = base._increment(-t, -s)
            return W, (None if H is None else -H)
        if self.levy_area is None:
            return base(-t, -s), None
        W, U = base(-t, -s, return_U=True)
        H = U / (t - s) - 0.5 * W
        return W, -H

    def __repr__(self):
        return f"ReverseBrownian(base_brownian={self.base_brownian!r})"


def brownian_interval_like(y, t0=0.0, t1=1.0, size=None, dtype=None, device=None, **kwargs):
    """torchsde's ``brownian_interval_like``: a :class:`BrownianInterval` with ``y``'s shape, dtype
    and device (each overridable); other keyword arguments go to :class:`BrownianInterval`."""
    return BrownianInterval(
        t0=t0,
        t1=t1,
        size=y.shape if size is None else size,
        dtype=y.dtype if dtype is None else dtype,
        device=y.device if device is None else device,
        **kwargs,
    )


class _CallablePath(AbstractBrownianPath):
    """Any torchsde-style Brownian motion (``bm(ta, tb, return_U=...)``, ``bm.shape``,
    ``bm.levy_area_approximation``), e.g. torchsde's own ``BrownianInterval``, as a torchnde path."""

    def __init__(self, bm, t0: float, t1: float):
        self.bm = bm
        self.t0, self.t1 = t0, t1
        self.shape = torch.Size(bm.shape)
        self.levy_area = "space-time" if bm.levy_area_approximation in ("space-time", "davie", "foster") else None

    def _query(self, s, t):
        if self.levy_area is None:
            return self.bm(s, t), None
        W, U = self.bm(s, t, return_U=True)
        h = t - s
        return W, U / h - 0.5 * W

    def evaluate(self, s, t=None):
        if t is None:
            s, t = self.t0, s
        s, t = _as_time(s), _as_time(t)
        return -self.bm(t, s) if s > t else self.bm(s, t)

    def increment(self, s, t):
        s, t = _as_time(s), _as_time(t)
        if s > t:
            W, H = self._query(t, s)
            return BrownianIncrement(s - t, -W, H)
        W, H = self._query(s, t)
        return BrownianIncrement(t - s, W, H)

    def __repr__(self):
        return f"torchsde-style {type(self.bm).__name__}"


# --------------------------------------------------------------------------------------------
# the SDE object


class _Fields:
    """torchnde's drift and diffusion ``(t, y, args)`` from a torchsde SDE object."""

    def __init__(self, sde, names, logqp, time_dtype, device):
        names = dict(names or {})
        unknown = [k for k in names if k not in _NAMES]
        if unknown:
            raise TypeError(f"unknown names key(s) {', '.join(map(repr, unknown))}; valid keys are {', '.join(_NAMES)}")
        self.sde = sde
        self.lookup = {std: names.get(key, std) for key, std in _NAMES.items()}
        self.noise_type = sde.noise_type
        self.logqp = logqp
        self.time_dtype, self.device = time_dtype, device
        self._tables = {}  # inference mode -> torchnde's table of time tensors of this dtype and device
        self._f = self._method("f")
        self._g = self._method("g")
        self._h = self._method("h")
        fg = self._method("f_and_g")
        # an SDE that defines only f_and_g: one call gives the drift and the diffusion at a point
        self._fg = fg if self._f is None and self._g is None else None
        if self._f is None and fg is not None:
            self._f = lambda t, y: fg(t, y)[0]
        if self._g is None and fg is not None:
            self._g = lambda t, y: fg(t, y)[1]
        fgp = self._method("f_and_g_prod")
        if self._f is None and fgp is not None:
            # the drift does not depend on the vector: f_and_g_prod(t, y, 0)[0]
            self._f = lambda t, y: fgp(t, y, y.new_zeros(self._noise_shape(y)))[0]
        self._g_prod = self._method("g_prod")
        if self._g_prod is None and fgp is not None:
            self._g_prod = lambda t, y, v: fgp(t, y, v)[1]
        self.noise_size = None  # set by sdeint when g is recovered from g_prod (general/additive noise)
        self._last = {}  # the last evaluation of g (or f_and_g), shared by drift and diffusion (see _at)
        self.share_g = False  # set by _StratonovichFields: its correction evaluates g too
        if self._f is None:
            raise ValueError(
                "sde must define at least one of `f`, `f_and_g`, or `f_and_g_prod`. (Or possibly more depending "
                "on the method chosen.)"
            )
        self.from_prod = self._g is None and self._g_prod is not None
        if self.from_prod:
            self._g = self._g_from_prod
        if self._g is None:
            raise ValueError(
                "sde must define at least one of `g`, `f_and_g`, `g_prod` or `f_and_g_prod`. (Or possibly more "
                "depending on the method chosen.)"
            )
        if logqp and (self._method("f") is None or self._method("g") is None or self._h is None):
            raise AttributeError("If using logqp then drift, diffusion and prior drift must all be specified.")
        self.__name__ = type(sde).__name__

    def _noise_shape(self, y):
        if self.noise_type == "diagonal":
            return y.shape
        if self.noise_type == "scalar":
            return (y.shape[0], 1)
        if self.noise_size is None:
            raise ValueError(
                "Cannot infer noise size (i.e. number of Brownian motion channels). Either pass `bm` explicitly, or "
                "specify one of the `g`, `f_and_g` functions."
            )
        return (y.shape[0], self.noise_size)

    def _g_from_prod(self, t, y):
        """The diffusion matrix of an SDE that defines only ``g_prod(t, y, v)`` (or
        ``f_and_g_prod``): ``g`` itself for diagonal noise (``v = 1``), its single column for scalar
        noise, and for general/additive noise one product per Brownian channel (the columns
        ``g e_j``), so such an SDE costs ``m`` evaluations of ``g_prod`` per diffusion evaluation."""
        shape = self._noise_shape(y)
        if self.noise_type == "diagonal":
            return self._g_prod(t, y, y.new_ones(shape))
        if self.noise_type == "scalar":
            return self._g_prod(t, y, y.new_ones(shape)).unsqueeze(-1)
        eye = torch.eye(shape[1], dtype=y.dtype, device=y.device)
        cols = [self._g_prod(t, y, eye[j].expand(shape)) for j in range(shape[1])]
        return torch.stack(cols, dim=-1)

    def _method(self, std):
        fn = getattr(self.sde, self.lookup.get(std, std), None)
        return fn if callable(fn) else None

    def time(self, t):
        """``t`` as torchsde passes it: a 0-d tensor of ``ts``'s dtype (on ``y0``'s device). Python
        floats (the loop's times) come from torchnde's cache of time tensors, so a grid time seen
        before (a step's end is the next step's start) costs a lookup, not a new tensor."""
        if type(t) is float:
            inference = torch.is_inference_mode_enabled()
            table = self._tables.get(inference)
            if table is None:
                table = self._tables[inference] = time_table(self.time_dtype, self.device)
            out = table.get(t)
            if out is not None and out._version == 0 and not out.requires_grad:
                return out
            return cached_time(t, table, self.time_dtype, self.device)
        if isinstance(t, torch.Tensor):
            return t.to(dtype=self.time_dtype, device=self.device)
        return torch.tensor(t, dtype=self.time_dtype, device=self.device)

    def _u(self, f, g, h):
        """``u`` with ``g u = f - h`` (torchsde's ``logqp``)."""
        if self.noise_type == "diagonal":
            eps = 1e-7
            g = torch.where(g.abs().detach() > eps, g, torch.full_like(g, eps) * g.sign())
            return (f - h) / g
        return (torch.linalg.pinv(g) @ (f - h).unsqueeze(-1)).squeeze(-1)

    def _at(self, kind: str, fn, t, tt, y, x):
        """``fn(tt, x)`` for ``x`` taken from the state ``y`` at time ``t``, ``kind`` ``"g"`` or
        ``"fg"`` (``f_and_g``). The last evaluation of each kind is kept: a second call with the
        same ``y`` object (unchanged), the same ``t`` and the same grad mode returns the same
        tensors. A solver evaluates the drift and the diffusion at the same point; the drift of
        ``logqp`` and the Itô-Stratonovich correction need ``g`` there too, and an SDE with only
        ``f_and_g`` gives both at once: torchsde evaluates ``g`` (or ``f_and_g``) once per point, and
        so does this. Tensors of a ``torch.func`` transform are never kept."""
        grad = torch.is_grad_enabled()
        last = self._last.get(kind)
        if (
            last is not None
            and last[0] is y
            and last[1] == y._version
            and last[2] == t
            and last[3] == grad
            and last[5] == _versions(last[4])
        ):
            return last[4]
        out = fn(tt, x)
        if type(t) is float and type(y) is torch.Tensor and not _functorch_wrapped(y):
            self._last[kind] = (y, y._version, t, grad, out, _versions(out))
        else:
            self._last.pop(kind, None)
        return out

    def _g_at(self, t, tt, y, x):
        if self._fg is not None:
            return self._at("fg", self._fg, t, tt, y, x)[1]
        if not (self.logqp or self.share_g):  # nothing else evaluates g at the point: no keeping
            return self._g(tt, x)
        return self._at("g", self._g, t, tt, y, x)

    def drift(self, t, y, args):
        tt = self.time(t)
        if not self.logqp:
            if self._fg is None:
                return self._f(tt, y)
            return self._at("fg", self._fg, t, tt, y, y)[0]
        x = y[:, :-1]
        f, g, h = self._f(tt, x), self._g_at(t, tt, y, x), self._h(tt, x)
        u = self._u(f, g, h)
        return torch.cat([f, 0.5 * (u**2).sum(dim=1, keepdim=True)], dim=1)

    def diffusion(self, t, y, args, shared=True):
        tt = self.time(t)
        if not (self.logqp or self.share_g) and self._fg is None:  # the plain case, first
            g = self._g(tt, y)
            return g.squeeze(-1) if self.noise_type == "scalar" else g
        x = y[:, :-1] if self.logqp else y
        g = self._g_at(t, tt, y, x) if shared else self._g(tt, x)
        if self.logqp:
            pad = g.new_zeros((g.shape[0], 1, *g.shape[2:]))
            g = torch.cat([g, pad], dim=1)
        if self.noise_type == "scalar":
            g = g.squeeze(-1)
        return g

    def raw_g(self, t, y):
        return self._g(t, y)

    def raw_f(self, t, y):
        return self._f(t, y)


# --------------------------------------------------------------------------------------------
# planning one call


class _Grid(StepTo):
    """torchsde's fixed steps: from each time of the grid to the next (the grid is torchsde's
    accumulated ``t + dt``). The steps are the grid's own, whatever ``dt0`` the solve (or the
    backward solve of an adjoint) passes: stepping by ``dt0`` in float64 towards a grid computed
    in float32 would end ~1e-9 short of every grid time and add a sliver step there."""

    jump_ts = None

    def __init__(self, grid: list):
        self.step_ts = torch.tensor(grid, dtype=torch.float64)

    def init(self, term, solver, t0, t1, y0, f0, dt0, ops):
        return ConstantStepSize.init(self, term, solver, t0, t1, y0, f0, t1 - t0, ops)

    def __repr__(self):
        return f"torchsde grid ({len(self.step_ts) + 1} steps)"


def _torchsde_grid(t0, t_end, dt, dtype) -> list:
    """The step ends of torchsde's fixed-step loop: ``t <- min(t + dt, t_end)`` accumulated in the
    dtype of ``ts`` (as torchsde does), excluding ``t0`` and ``t_end``.

    float32 and float64 (every ``ts`` torchsde users pass) are accumulated by one
    ``numpy.add.accumulate`` per chunk: a sequential sum rounded to the dtype after every
    addition, the same numbers as torch's ``t + dt`` on a 0-d tensor one step at a time (a
    Python loop of tensor operations costs ~25 µs a step, as much as a small solve's step).
    Other dtypes are accumulated with torch one step at a time."""
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(dtype)
    if np_dtype is None:
        out = []
        t = torch.tensor(t0, dtype=dtype)
        end = torch.tensor(t_end, dtype=dtype)
        while True:
            t = torch.minimum(t + dt, end)
            if t >= end:
                return out
            if float(t) <= (out[-1] if out else t0):
                raise _stalled(dt, float(t), dtype)
            out.append(float(t))
    end = np_dtype(t_end)
    t = np_dtype(t0)
    parts = []
    while True:
        n = int(min(max(math.ceil(float(end - t) / dt) + 2, 16), 1 << 20))
        incs = np.full(n + 1, dt, dtype=np_dtype)
        incs[0] = t
        acc = np.add.accumulate(incs, dtype=np_dtype)[1:]
        past = np.flatnonzero(acc >= end)
        if past.size:
            parts.append(acc[: past[0]])
            break
        if not acc[-1] > t:
            raise _stalled(dt, float(t), dtype)
        parts.append(acc)
        t = acc[-1]
    return np.concatenate(parts).astype(np.float64).tolist()


def _stalled(dt, t, dtype) -> ValueError:
    return ValueError(
        f"dt={dt} is below the resolution of ts's dtype ({dtype}) at t={t}: t + dt rounds back to t, so the "
        "fixed steps would never reach ts[-1] (torchsde loops forever here); pass a larger dt or float64 ts"
    )


class _TorchsdeSteps(PIDController):
    """torchsde's adaptive step-size rule on a step-doubling error estimate (the error is the RMS of
    ``(y_full - y_halves) / (rtol max(|y_full|, |y_halves|) + atol)``; rejected steps shrink by
    ``(0.9 / err)^(1/1.5)``, accepted ones grow by ``(0.9 / err)^(1/4.5)`` times a proportional
    term ``(ratio / previous ratio)^0.13``, at most 1.4x; steps of ``dt_min`` are always accepted),
    so that an adaptive solve takes the steps torchsde takes."""

    def __init__(self, rtol: float, atol: float, dt_min: float):
        super().__init__(rtol=rtol, atol=atol, dtmin=dt_min, force_dtmin=True)

    def init(self, term, solver, t0, t1, y0, f0, dt0, ops):
        return ops.full(dt0), None

    def adapt(self, t0, t1, y0, y1, y_error, error_order, cstate, ops):
        dt = t1 - t0
        with torch.no_grad():
            y_full = y1 - y_error
            tol = torch.addcmul(
                torch.full((), self.atol, dtype=y1.dtype, device=y1.device),
                torch.maximum(y_full.abs(), y1.abs()),
                torch.full((), self.rtol, dtype=y1.dtype, device=y1.device),
            ).clamp_min(1e-7)
            err = float((y_error / tol).square().mean().sqrt().clamp_min(1e-7))
        if not math.isfinite(err):
            return False, dt * 0.2, None, None
        ratio = 0.9 / err
        prev = ratio if cstate is None else cstate
        if err > 1:
            factor = max(0.2, min(1.4, ratio ** (1 / 1.5)))
            nxt = prev
        else:
            factor = max(1.0, min(1.4, ratio ** (1 / 4.5) * (ratio / prev) ** 0.13))
            nxt = ratio
        dt_next = dt * factor
        if dt_next < self.dtmin:
            dt_next, nxt = self.dtmin, None
        accept = err <= 1 or dt_next <= self.dtmin
        return accept, dt_next, nxt, None

    def __repr__(self):
        return f"torchsde step sizes (rtol={self.rtol}, atol={self.atol}, dt_min={self.dtmin})"


class _Plan:
    pass


class _StratonovichFields:
    """The Stratonovich form of an Itô SDE: drift ``f - ½ Σ_j (∂g_j/∂y) g_j`` (the Itô-to-Stratonovich
    correction, by automatic differentiation of ``g``), the same diffusion. Differentiable twice
    (the stochastic adjoint differentiates the corrected drift)."""

    def __init__(self, fields: _Fields, noise_type: str):
        self.fields, self.noise_type = fields, noise_type
        fields.share_g = True

    def correction(self, t, y, args):
        from ..solvers.milstein import _jvp

        create = torch.is_grad_enabled()
        with torch.enable_grad():
            y_ = y if y.requires_grad else y.detach().requires_grad_()
            if self.noise_type == "diagonal":
                # ∂g/∂y is diagonal (torchsde's diagonal noise): (∂g/∂y)^T g = (∂g_i/∂y_i) g_i. g is
                # shared with the diffusion term only when this graph is kept (create_graph)
                g = self.fields.diffusion(t, y_, args, shared=create)
                if not g.requires_grad:
                    return torch.zeros_like(y)
                (d,) = torch.autograd.grad(g, y_, g, create_graph=create, allow_unused=True)
                return torch.zeros_like(y) if d is None else 0.5 * d
        g = self.fields.diffusion(t, y, args)
        if self.noise_type == "scalar":
            _, d = _jvp(lambda z: self.fields.diffusion(t, z, args), y, g)
            return 0.5 * d
        out = None
        for j in range(g.shape[-1]):
            _, d = _jvp(lambda z, j=j: self.fields.diffusion(t, z, args)[..., j], y, g[..., j])
            out = d if out is None else out + d
        return 0.5 * out

    def drift(self, t, y, args):
        return self.fields.drift(t, y, args) - self.correction(t, y, args)

    def diffusion(self, t, y, args):
        return self.fields.diffusion(t, y, args)


def _functorch_wrapped(x) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def _versions(out) -> tuple:
    """The version counters of a tensor or a tuple of tensors (a kept output changed in place is
    not handed out again)."""
    if isinstance(out, torch.Tensor):
        return (out._version,)
    return tuple(v._version if isinstance(v, torch.Tensor) else None for v in out)


def _check_sde(sde, y0, ts, logqp):
    if not hasattr(sde, "noise_type"):
        raise ValueError("sde does not have the attribute noise_type.")
    if sde.noise_type not in _NOISE_TYPES:
        raise ValueError(f"Expected noise type in {sorted(_NOISE_TYPES)}, but found {sde.noise_type}.")
    if not hasattr(sde, "sde_type"):
        raise ValueError("sde does not have the attribute sde_type.")
    if sde.sde_type not in _SDE_TYPES:
        raise ValueError(f"Expected sde type in {sorted(_SDE_TYPES)}, but found {sde.sde_type}.")
    if not torch.is_tensor(y0):
        raise ValueError("`y0` must be a torch.Tensor.")
    if y0.dim() != 2:
        raise ValueError("`y0` must be a 2-dimensional tensor of shape (batch, channels).")
    if not torch.is_tensor(ts):
        if not isinstance(ts, (tuple, list)) or not all(isinstance(t, numbers.Real) for t in ts):
            raise ValueError("Evaluation times `ts` must be a 1-D Tensor or list/tuple of floats.")
        ts = torch.tensor(ts, dtype=y0.dtype, device=y0.device)
    if ts.dim() != 1 or len(ts) == 0:
        raise ValueError("Evaluation times `ts` must be a 1-D Tensor or list/tuple of floats.")
    if ts.requires_grad:
        raise ValueError("Gradients with respect to `ts` are not supported; pass ts.detach().")
    tl = ts.detach().cpu().to(torch.float64).tolist()
    if any(b <= a for a, b in zip(tl[:-1], tl[1:])):
        raise ValueError("Evaluation times `ts` must be strictly increasing.")
    return ts, tl


def _check_options(options, method):
    options = dict(options or {})
    valid = ("grad_free",) if method == "milstein" else ()
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method={method!r}; "
            + (f"valid options are: {', '.join(valid)}" if valid else "this method takes no options")
        )
    return options


def _prepare(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, names, logqp, where):
    for name, v in (("dt", dt), ("rtol", rtol), ("atol", atol), ("dt_min", dt_min)):
        if isinstance(v, torch.Tensor) and v.requires_grad:
            raise ValueError(f"Argument {name} must not require gradient.")
    ts, tl = _check_sde(sde, y0, ts, logqp)
    p = _Plan()
    p.sde_type, p.noise_type = sde.sde_type, sde.noise_type
    p.method = _default_method(p.sde_type, p.noise_type) if method is None else method
    if adaptive and p.method == "euler" and p.noise_type != "additive":
        # before the method's checks, as torchsde does (an adaptive Euler on a Stratonovich SDE
        # warns, then raises)
        warnings.warn(
            "Numerical solution is not guaranteed to converge to the correct solution when using adaptive "
            "time-stepping with the Euler--Maruyama method with non-additive noise.",
            stacklevel=3,
        )
    _check_method(p.method, p.sde_type, p.noise_type)
    if p.method == "adjoint_reversible_heun":
        raise ValueError("adjoint_reversible_heun can only be used for adjoint_method.")
    opts = _check_options(options, p.method)
    p.fields = _Fields(sde, names, logqp, ts.dtype, y0.device)
    if p.fields.from_prod and bm is not None and len(getattr(bm, "shape", ())) == 2:
        p.fields.noise_size = int(bm.shape[-1])
    # shapes (torchsde's contract)
    t0 = p.fields.time(tl[0])
    fy = p.fields.raw_f(t0, y0)
    gy = p.fields.raw_g(t0, y0)
    B, d = y0.shape
    if tuple(fy.shape) != (B, d):
        raise ValueError(f"Drift must be of shape (batch, state_channels) = {(B, d)}, but got {tuple(fy.shape)}.")
    if p.noise_type == "diagonal":
        if tuple(gy.shape) != (B, d):
            raise ValueError(
                f"Diffusion must be of shape (batch, state_channels) = {(B, d)}, but got {tuple(gy.shape)}."
            )
        m = d
    else:
        if gy.dim() != 3 or tuple(gy.shape[:2]) != (B, d):
            raise ValueError(
                f"Diffusion must be of shape (batch, state_channels, noise_channels) = {(B, d, 'm')}, but got "
                f"{tuple(gy.shape)}."
            )
        m = gy.shape[2]
    if p.noise_type == "scalar" and m != 1:
        raise ValueError(f"Scalar noise must have only one channel; the diffusion has {m} noise channels.")
    p.y0 = y0
    if logqp:
        p.y0 = torch.cat((y0, y0.new_zeros((B, 1))), dim=1)
        if p.noise_type == "diagonal":
            m = d + 1
    p.solver = _solver_for(p.method, p.sde_type, p.noise_type, opts)
    p.ts, p.tl = ts, tl
    p.dt = float(dt)
    if not p.dt > 0:
        raise ValueError(f"dt must be > 0, got {dt}")
    p.adaptive = bool(adaptive)
    if p.adaptive:
        # torchsde's error estimate (step doubling, for every method: an embedded estimate such as
        # Heun's Euler is O(h) on an SDE, ~10x the steps) and its step-size rule
        p.controller = _TorchsdeSteps(float(rtol), float(atol), float(dt_min))
        p.solver = _step_doubling(p.solver)
    else:
        p.controller = _Grid(_torchsde_grid(tl[0], tl[-1], p.dt, ts.dtype)) if len(tl) > 1 else None
    # the Brownian motion
    if bm is None:
        if len(tl) > 1:
            levy = "space-time" if p.solver.levy_area is not None else "none"
            if p.method == "log_ode":
                levy = "foster"
            bm = BrownianInterval(
                t0=tl[0], t1=tl[-1], size=(B, m), dtype=y0.dtype, device=y0.device, levy_area_approximation=levy
            )
    else:
        shape = tuple(getattr(bm, "shape", ()))
        if len(shape) != 2:
            raise ValueError("`bm` must be of shape (batch, noise_channels).")
        if shape[0] != B:
            raise ValueError("Batch sizes not consistent.")
        if shape[1] != m:
            raise ValueError("Noise sizes not consistent.")
        if not isinstance(bm, AbstractBrownianPath):
            if not callable(bm) or not hasattr(bm, "levy_area_approximation"):
                raise TypeError(
                    "bm must be a Brownian motion: torchnde.compat.torchsde.BrownianInterval/BrownianTree/"
                    f"BrownianPath, a torchnde Brownian path, or a torchsde Brownian motion; got {type(bm).__name__}"
                )
            bm = _CallablePath(bm, tl[0], tl[-1])
    p.bm = bm
    if p.method == "log_ode" and bm is not None:
        _attach_levy_area(p.solver, bm)
    p.noise = {"diagonal": "diagonal", "scalar": "scalar"}.get(p.noise_type, "general")
    p.logqp = logqp
    return p


def _attach_levy_area(solver, bm) -> None:
    """Give the log-ODE solver (possibly inside the step-doubling wrapper) the Lévy area of ``bm``,
    which must approximate it (torchsde: ``levy_area_approximation`` ``"davie"`` or ``"foster"``)."""
    approx = getattr(bm, "levy_area_approximation", None)
    if approx not in ("davie", "foster"):
        raise ValueError(
            "method='log_ode' needs a Brownian motion with levy_area_approximation='davie' or 'foster', got "
            f"{approx!r}; build it with BrownianInterval(..., levy_area_approximation='foster')"
        )
    call = bm.bm if isinstance(bm, _CallablePath) else bm
    base = getattr(solver, "base", solver)
    base.levy_A = lambda t0, t1: call(t0, t1, return_A=True)[1]


def _run(p: _Plan, adjoint):
    try:
        return _run_solve(p, adjoint)
    finally:
        # the kept diffusion evaluation (and its graph) is not kept past the solve
        getattr(p.fields, "fields", p.fields)._last.clear()


def _run_solve(p: _Plan, adjoint):
    if len(p.tl) == 1:
        return p.y0.unsqueeze(0).clone()
    # the Brownian classes of this module are wrappers of a torchnde VirtualBrownianTree: the solve
    # queries the tree itself (the same values, one call less per step, and the tree's
    # vectorised queries over a planned grid reach the fixed-step loop)
    path = p.bm._tree if isinstance(p.bm, _TreeBrownian) else p.bm
    control = ControlTerm(
        p.fields.diffusion,
        path,
        noise=p.noise,
        additive=p.noise_type == "additive",
        calculus=p.sde_type,
        time_as_float=True,  # the front-end makes torchsde's tensor time itself
    )
    terms = MultiTerm(ODETerm(p.fields.drift, time_as_float=True), control)
    interp = None
    save = p.tl
    if p.adaptive and isinstance(adjoint, DirectAdjoint):
        # as torchsde: the steps do not land on ts; each output is the linear interpolation
        # between the accepted steps around it
        sol = solve(
            terms,
            p.solver,
            p.tl[0],
            p.tl[-1],
            p.y0,
            dt0=p.dt,
            saveat=SaveAt(t0=True, steps=True),
            controller=p.controller,
            adjoint=adjoint,
            max_steps=None,
        )
        nodes = sol.ts.detach().cpu().to(torch.float64).tolist()
        interp = _interpolation(nodes, p.tl, p.ts)
        return _interpolate(sol.ys[interp[0]], interp)
    if not p.adaptive:
        # torchsde's steps do not land on ts: keep the steps around each output time and
        # interpolate linearly between them, as torchsde does
        nodes = [p.tl[0], *p.controller.step_ts.tolist(), p.tl[-1]]
        interp = _interpolation(nodes, p.tl, p.ts)
        save = [nodes[k] for k in interp[0]]
    # ts = [t0, t1] (the usual call): the initial and final values, no save times to land on
    saveat = SaveAt(t0=True, t1=True) if save == [p.tl[0], p.tl[-1]] else SaveAt(ts=save)
    sol = solve(
        terms,
        p.solver,
        p.tl[0],
        p.tl[-1],
        p.y0,
        dt0=p.dt,
        saveat=saveat,
        controller=p.controller,
        adjoint=adjoint,
        max_steps=None,
    )
    if interp is None:
        return sol.ys
    return _interpolate(sol.ys, interp)


def _interpolation(nodes: list, tl: list, ts: torch.Tensor):
    """Which step of torchsde's loop each output time falls in, and its linear weights.

    Returns ``(kept, prev, curr, w0, w1)``: the indices of the grid nodes to save (the first is
    ``t0``), and for ``ts[1:]`` the positions in ``kept`` of the step's ends and the weights
    ``(t1 - t) / (t1 - t0)``, ``(t - t0) / (t1 - t0)`` computed in ``ts``'s dtype (torchsde's formula).
    An output time that is a grid time (always ``ts[-1]``) is that node's value (torchsde's
    weights are exactly 0 and 1 there): only that node is kept, with weights 0 and 1; when every
    output time is a grid time, ``w0`` and ``w1`` are ``None`` (the kept nodes are the outputs).
    """
    pairs = []
    i = 0
    for out_t in tl[1:]:
        while nodes[i] < out_t:
            i += 1
        pairs.append((i, i) if nodes[i] == out_t else (i - 1, i))
    kept = sorted({0, *(k for pair in pairs for k in pair)})
    pos = {k: j for j, k in enumerate(kept)}
    prev = [pos[a] for a, _ in pairs]
    curr = [pos[b] for _, b in pairs]
    if all(a == b for a, b in pairs):
        return kept, prev, curr, None, None
    grid = torch.tensor(nodes, dtype=torch.float64).to(ts.dtype)
    tp = grid[[a for a, _ in pairs]]
    tc = grid[[b for _, b in pairs]]
    to = ts.detach().cpu()[1:]
    exact = tp == tc
    span = torch.where(exact, torch.ones_like(tc), tc - tp)
    w0 = torch.where(exact, torch.zeros_like(tc), (tc - to) / span).to(ts.device)
    w1 = torch.where(exact, torch.ones_like(tc), (to - tp) / span).to(ts.device)
    return kept, prev, curr, w0, w1


def _interpolate(ys, interp):
    """The outputs at ``ts`` from the kept nodes' values ``ys`` (see :func:`_interpolation`)."""
    _, prev, curr, w0, w1 = interp
    if w0 is None:
        return ys
    out = w0.view(-1, 1, 1) * ys[prev] + w1.view(-1, 1, 1) * ys[curr]
    return torch.cat([ys[:1], out])


def _parse_return(p: _Plan, ys, extra: bool, extra_state=()):
    outs = []
    if p.logqp:
        ys, log_ratio = ys[..., :-1], ys[..., -1]
        outs = [ys, log_ratio[1:] - log_ratio[:-1]]
    else:
        outs = [ys]
    if extra:
        outs.append(extra_state)
    return outs[0] if len(outs) == 1 else tuple(outs)


def _check_extra(p: _Plan, extra, extra_solver_state, where="sdeint"):
    if p.method != "reversible_heun" or not (extra or extra_solver_state is not None):
        return False
    if where != "sdeint" or p.adaptive:
        raise NotImplementedError(
            f"extra=True / extra_solver_state with method='reversible_heun' is supported by sdeint with fixed steps "
            f"only, not by {where}{' with adaptive=True' if p.adaptive else ''}; drop them, or use sdeint"
        )
    if extra_solver_state is not None:
        if not isinstance(extra_solver_state, (tuple, list)) or len(extra_solver_state) != 3:
            raise ValueError(
                "extra_solver_state for method='reversible_heun' must be the (f, g, z) returned with extra=True, got "
                f"{type(extra_solver_state).__name__}"
            )
    return True


def _prod(noise_type: str, g, w):
    """``g dW`` for torchnde's diffusion shapes (scalar noise: ``g`` squeezed to ``(batch, d)``)."""
    if noise_type in ("diagonal", "scalar"):
        return g * w
    return torch.bmm(g, w.unsqueeze(-1)).squeeze(-1)


def _reversible_heun_extra(p: _Plan, extra_solver_state):
    """``method="reversible_heun"`` with torchsde's solver state ``(f, g, z)`` exposed: the reversible
    Heun steps (Kidger, Foster, Li & Lyons 2021) on torchsde's grid, written out here so that the
    state can be returned (``extra=True``) and resumed (``extra_solver_state=``), e.g. to run the
    solve backwards with :class:`ReverseBrownian` and recover the input to rounding error. Gradients
    by autograd through the steps. Returns ``(ys, (f, g, z))`` (``g`` in torchsde's shape)."""
    fields, noise = p.fields, p.noise
    nodes = [p.tl[0], *p.controller.step_ts.tolist(), p.tl[-1]]
    y = p.y0
    if extra_solver_state is None:
        f, g, z = fields.drift(nodes[0], y, None), fields.diffusion(nodes[0], y, None), y
    else:
        f, g, z = extra_solver_state
        if noise == "scalar" and g.dim() == 3:
            g = g.squeeze(-1)
    out = [y]
    for a, b in zip(nodes[:-1], nodes[1:]):
        h = fields.time(b) - fields.time(a)
        w = p.bm.evaluate(a, b)
        z1 = 2 * y - z + f * h + _prod(noise, g, w)
        f1, g1 = fields.drift(b, z1, None), fields.diffusion(b, z1, None)
        y = y + (f + f1) * (0.5 * h) + _prod(noise, g + g1, 0.5 * w)
        f, g, z = f1, g1, z1
        out.append(y)
    interp = _interpolation(nodes, p.tl, p.ts)
    g_out = g.unsqueeze(-1) if noise == "scalar" else g
    return _interpolate(torch.stack(out)[interp[0]], interp), (f, g_out, z)


_SDEINT_ARGS = (
    "sde", "y0", "ts", "bm", "method", "dt", "adaptive", "rtol", "atol", "dt_min", "options", "names", "logqp",
    "extra", "extra_solver_state",
)  # fmt: skip


def sdeint(
    sde,
    y0,
    ts,
    bm=None,
    method=None,
    dt=1e-3,
    adaptive=False,
    rtol=1e-5,
    atol=1e-4,
    dt_min=1e-5,
    options=None,
    names=None,
    logqp=False,
    extra=False,
    extra_solver_state=None,
    **unused_kwargs,
):
    """Integrate an SDE: torchsde's ``sdeint``, computed by :func:`torchnde.solve`.

    Args:
        sde: an object with ``f(t, y)`` (drift, ``(batch, d)``) and ``g(t, y)`` (diffusion:
            ``(batch, d)`` for diagonal noise, ``(batch, d, m)`` otherwise; ``m = 1`` for scalar
            noise), or ``f_and_g``; ``h(t, y)`` (prior drift) for ``logqp``; attributes
            ``noise_type`` (``"diagonal"``, ``"additive"``, ``"scalar"``, ``"general"``) and
            ``sde_type`` (``"ito"``, ``"stratonovich"``).
        y0: ``(batch, d)`` initial state at ``ts[0]``.
        ts: strictly increasing output times (tensor or list of floats).
        bm: the Brownian motion, of shape ``(batch, m)``: :class:`BrownianInterval`,
            :class:`BrownianTree`, :class:`BrownianPath`, any torchnde Brownian path, or a
            torchsde Brownian motion. Default: a new :class:`BrownianInterval` over
            ``[ts[0], ts[-1]]`` (with the space-time Lévy area if the method needs it).
        method: ``"euler"``, ``"milstein"``, ``"srk"`` (SRA1 on additive, SRID2 on diagonal and
            scalar noise), ``"midpoint"``, ``"heun"``, ``"euler_heun"``, ``"reversible_heun"``,
            ``"log_ode"`` (needs ``levy_area_approximation="davie"`` or ``"foster"``). Default
            (torchsde's): ``"midpoint"`` for Stratonovich SDEs; for Itô SDEs ``"srk"``, or
            ``"euler"`` on general noise.
        dt: the step size (fixed steps) or the initial step size (``adaptive=True``).
        adaptive, rtol, atol, dt_min: adaptive stepping (see the module docstring).
        options: ``{"grad_free": bool}`` for ``"milstein"``; no other options.
        names: rename the methods of ``sde``: keys ``"drift"``, ``"diffusion"``,
            ``"prior_drift"``, ``"diffusion_prod"``, ``"drift_and_diffusion"``,
            ``"drift_and_diffusion_prod"``.
        logqp: also return the increments of the log-ratio penalty
            :math:`\\int \\tfrac12 |u|^2 dt` with :math:`g u = f - h` between output times,
            ``(len(ts) - 1, batch)``.
        extra: also return the solver's extra state: ``()`` for the stateless methods, torchsde's
            ``(f, g, z)`` for ``"reversible_heun"`` (fixed steps).
        extra_solver_state: ignored by the stateless methods, as in torchsde; for
            ``"reversible_heun"`` the ``(f, g, z)`` to continue from.

    Returns:
        ``ys`` of shape ``(len(ts), batch, d)``; with ``logqp`` also the log-ratio increments; with
        ``extra`` also the extra solver state.

    Example:
        >>> import torch
        >>> from torchnde.compat.torchsde import sdeint
        >>> class SDE(torch.nn.Module):
        ...     noise_type, sde_type = "diagonal", "ito"
        ...     def f(self, t, y): return -y
        ...     def g(self, t, y): return 0.1 * torch.ones_like(y)
        >>> sdeint(SDE(), torch.ones(3, 2), torch.linspace(0, 1, 5), method="euler", dt=0.01).shape
        torch.Size([5, 3, 2])
    """
    _reject(unused_kwargs, "sdeint()", _SDEINT_ARGS)
    p = _prepare(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, names, logqp, "sdeint")
    if _check_extra(p, extra, extra_solver_state) and len(p.tl) > 1:
        ys, state = _reversible_heun_extra(p, extra_solver_state)
        return _parse_return(p, ys, extra, state)
    return _parse_return(p, _run(p, DirectAdjoint()), extra)


_ADJOINT_ARGS = (
    "sde", "y0", "ts", "bm", "method", "adjoint_method", "dt", "adaptive", "adjoint_adaptive", "rtol",
    "adjoint_rtol", "atol", "adjoint_atol", "dt_min", "options", "adjoint_options", "adjoint_params", "names",
    "logqp", "extra", "extra_solver_state",
)  # fmt: skip


def sdeint_adjoint(
    sde,
    y0,
    ts,
    bm=None,
    method=None,
    adjoint_method=None,
    dt=1e-3,
    adaptive=False,
    adjoint_adaptive=False,
    rtol=1e-5,
    adjoint_rtol=1e-5,
    atol=1e-4,
    adjoint_atol=1e-4,
    dt_min=1e-5,
    options=None,
    adjoint_options=None,
    adjoint_params=None,
    names=None,
    logqp=False,
    extra=False,
    extra_solver_state=None,
    **unused_kwargs,
):
    """:func:`sdeint` with gradients from the stochastic adjoint: torchsde's ``sdeint_adjoint``.

    ``method="reversible_heun"`` (with ``adjoint_method=None`` or ``"adjoint_reversible_heun"``)
    uses :class:`~torchnde.ReversibleAdjoint`: exact gradients of the computed solution in constant
    memory. Every other method uses :class:`~torchnde.BacksolveAdjoint`, solving the adjoint SDE
    backwards on the same Brownian path with ``adjoint_method`` (default as in torchsde:
    ``"midpoint"`` for Stratonovich SDEs; ``"milstein"``/``"euler"`` for Itô SDEs), with fixed
    steps ``dt`` or, with ``adjoint_adaptive=True``, ``adjoint_rtol``/``adjoint_atol``.

    ``adjoint_params``: as in torchsde, ``sde`` must be an ``nn.Module`` unless it is given. Every
    tensor ``f`` and ``g`` use that requires gradients receives them (torchnde finds them by
    walking the autograd graph), listed or not.
    """
    _reject(unused_kwargs, "sdeint_adjoint()", _ADJOINT_ARGS)
    if adjoint_params is None and not isinstance(sde, nn.Module):
        raise ValueError(
            "`sde` must be an instance of nn.Module to specify the adjoint parameters; alternatively they can be "
            "specified explicitly via the `adjoint_params` argument. If there are no parameters then it is "
            "allowable to set `adjoint_params=()`."
        )
    for x in adjoint_params or ():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"adjoint_params must be tensors, got {type(x).__name__}")
    for name, v in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)):
        if isinstance(v, torch.Tensor) and v.requires_grad:
            raise ValueError(f"Argument {name} must not require gradient.")
    p = _prepare(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, names, logqp, "sdeint_adjoint")
    _check_extra(p, extra, extra_solver_state, "sdeint_adjoint")
    adj_method = (
        _default_adjoint_method(p.sde_type, p.noise_type, p.method) if adjoint_method is None else adjoint_method
    )
    if adj_method == "adjoint_reversible_heun" and p.method != "reversible_heun":
        raise ValueError("adjoint_method='adjoint_reversible_heun' can only be used with method='reversible_heun'.")
    if p.method == "reversible_heun" and adj_method == "adjoint_reversible_heun":
        if adjoint_options:
            _check_options(adjoint_options, adj_method)
        if adaptive or adjoint_adaptive:
            raise NotImplementedError(
                "method='reversible_heun' with adaptive or adjoint_adaptive is not supported by torchnde's "
                "ReversibleAdjoint; use fixed steps (dt=...)"
            )
        return _parse_return(p, _with_adjoint_params(_run(p, ReversibleAdjoint()), sde, adjoint_params), extra)
    if p.method == "reversible_heun":
        warnings.warn(
            f"method='reversible_heun', but adjoint_method!='adjoint_reversible_heun' ({adj_method!r}).", stacklevel=2
        )
    if adj_method not in _METHODS:
        raise ValueError(f"Expected adjoint_method in {sorted(_METHODS)}, but found {adj_method}.")
    if adj_method == "log_ode":
        raise ValueError(
            "adjoint_method='log_ode' cannot solve the adjoint SDE (it needs the diffusion itself, the adjoint offers "
            "only diffusion-vector products); use adjoint_method='midpoint'"
        )
    # the adjoint SDE has general noise; its method must solve the SDE's calculus
    types, _ = _METHODS[adj_method]
    if p.sde_type not in types:
        raise ValueError(f"SDE is of type {p.sde_type} but adjoint solver is for type {types[0]}")
    adj_opts = _check_options(adjoint_options, adj_method)
    ito_correction = p.sde_type == "ito" and p.noise_type != "additive"
    if ito_correction:
        # the stochastic adjoint is solved in Stratonovich form: the backward solve runs on the
        # Stratonovich form of the SDE (Itô drift minus the correction), with the midpoint method
        back = _solver_for("midpoint", "stratonovich", p.noise_type, {}, what="adjoint_method")
    else:
        back = _solver_for(adj_method, p.sde_type, p.noise_type, adj_opts, what="adjoint_method")
    if adjoint_adaptive:
        controller = _TorchsdeSteps(float(adjoint_rtol), float(adjoint_atol), float(dt_min))
        back = _step_doubling(back)
    else:
        # fixed steps of dt backwards (through the forward grid when the forward solve was fixed-step)
        controller = p.controller if not p.adaptive else ConstantStepSize()
    adjoint = BacksolveAdjoint(solver=back, controller=controller)
    ys = _ito_adjoint(p, back, adjoint) if ito_correction else _run(p, adjoint)
    return _parse_return(p, _with_adjoint_params(ys, sde, adjoint_params), extra)


class _ZeroGrads(torch.autograd.Function):
    """``ys`` unchanged, with zero gradients for ``params``: torchsde's ``sdeint_adjoint`` output
    depends on every adjoint parameter that requires grad (zero gradients for unused ones), so
    ``loss.backward()`` works even when the SDE uses none of them."""

    @staticmethod
    def forward(ctx, ys, *params):
        ctx.likes = [(p.shape, p.dtype, p.device) for p in params]
        return ys.view_as(ys)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.likes))


def _with_adjoint_params(ys, sde, adjoint_params):
    if not torch.is_grad_enabled():
        return ys
    params = sde.parameters() if adjoint_params is None else adjoint_params
    params = [x for x in params if isinstance(x, torch.Tensor) and x.requires_grad]
    if not params:
        return ys
    return _ZeroGrads.apply(ys, *params)


def _ito_adjoint(p: _Plan, back: AbstractSolver, adjoint: BacksolveAdjoint):
    """``sdeint_adjoint`` of an Itô SDE with non-additive noise. The values are those of the Itô
    solve with the chosen method (as ``sdeint`` gives them, without a graph); the gradients are those
    of the stochastic adjoint of the SDE's Stratonovich form (Itô drift minus
    ``½ Σ_j (∂g_j/∂y) g_j``, the same solution), which :class:`~torchnde.BacksolveAdjoint` solves
    backwards on the same Brownian path. The Stratonovich form is also solved forwards (with the
    adjoint's solver) to give the backward solve its restart values: one extra forward solve."""
    with torch.no_grad():
        ys = _run(p, DirectAdjoint())
    if not torch.is_grad_enabled():
        return ys
    q = _Plan()
    q.__dict__.update(p.__dict__)
    q.fields = _StratonovichFields(p.fields, p.noise_type)
    q.sde_type = "stratonovich"
    q.solver = _step_doubling(back) if p.adaptive else back
    ys_s = _run(q, adjoint)
    return ys + (ys_s - ys_s.detach())
