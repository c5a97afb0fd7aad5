"""Terms: what is integrated.

A term supplies a vector field ``vf(t, y, args)``, a control increment ``contr(t0, t1)`` and
their product ``prod(vf, control)``. An ODE is one :class:`ODETerm`; stochastic and controlled
equations add control terms driven by a path (Brownian motion, interpolated data) in the same
loop.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

import torch

from ._tree import tree_leaves, tree_map, tree_zip

__all__ = ["AbstractTerm", "ODETerm", "ControlTerm", "MultiTerm", "SDETerm", "NOISE_TYPES"]


# --------------------------------------------------------------------------------------------
# time as it reaches user code

_TIME_TABLES: dict = {}  # (dtype, device, inference mode) -> {float time: 0-d tensor}
_TIME_CACHE_SIZE = 4096  # per table; a full table is emptied


def _first_leaf(y):
    while not isinstance(y, torch.Tensor):
        if isinstance(y, dict):
            y = next(iter(y.values()))
        elif isinstance(y, (tuple, list)) and y:
            y = y[0]
        else:
            return None
    return y


def time_table(dtype: torch.dtype, device) -> dict:
    """The cache of 0-d time tensors of one dtype and device (in the current inference mode: a
    tensor made in inference mode cannot be saved for backward outside it)."""
    key = (dtype, device, torch.is_inference_mode_enabled())
    table = _TIME_TABLES.get(key)
    if table is None:
        table = _TIME_TABLES[key] = {}
    return table


def cached_time(t: float, table: dict, dtype: torch.dtype, device) -> torch.Tensor:
    """``t`` as a 0-d tensor from ``table`` (see :func:`time_table`), made and kept on a miss. A
    cached tensor that user code modified in place or made require grad is replaced."""
    out = table.get(t)
    if out is not None and out._version == 0 and not out.requires_grad:
        return out
    out = torch.full((), t, dtype=dtype, device=device)
    if type(out) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(out):
        # (a tensor made inside a torch.func transform belongs to it and is not kept)
        if len(table) >= _TIME_CACHE_SIZE:
            table.clear()
        table[t] = out
    return out


def prefill_times(ts: list, dtype: torch.dtype, device) -> None:
    """Put the times ``ts`` (Python floats) into the cache of :func:`cached_time` with one tensor
    construction: a fixed-step solve knows its step times before the first step (see
    ``torchnde/_fixed.py``), so its vector-field calls at them become lookups. The entries are
    views of one tensor, equal to what :func:`cached_time` would make."""
    table = time_table(dtype, device)
    new = list(dict.fromkeys(t for t in ts if t not in table))[:_TIME_CACHE_SIZE]
    if not new:
        return
    if len(table) + len(new) > _TIME_CACHE_SIZE:
        table.clear()
    table.update(zip(new, torch.tensor(new, dtype=dtype, device=device).unbind()))


def time_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of times for a state of ``dtype``: its real counterpart."""
    if dtype.is_floating_point:
        return dtype
    return dtype.to_real() if dtype.is_complex else torch.get_default_dtype()


def user_time(t, like):
    """``t`` as a user's vector field receives it: a Python number becomes a 0-d tensor with the
    (real) dtype and the device of ``like`` (``y``, or a tree of tensors); tensors pass unchanged.

    The loop keeps times as Python floats (shared mode), so this runs once per vector-field
    evaluation (:class:`~torchnde._flat._FlatTerm` does the same with the dtype and device looked
    up once per solve). The tensors are cached per ``(value, dtype, device)``: a time seen before
    (the same grid in every training iteration, a step's end reused as the next step's start)
    costs a dictionary lookup, a new one a ``torch.full`` (no host-to-device copy, no sync).
    """
    if type(t) is not float:
        if type(t) is not int:
            return t
        t = float(t)
    leaf = _first_leaf(like)
    if leaf is None:
        return torch.tensor(t)
    dtype = time_dtype(leaf.dtype)
    if type(leaf) is not torch.Tensor:  # tensor subclasses (FakeTensor, ...): never cached
        return torch.full((), t, dtype=dtype, device=leaf.device)
    return cached_time(t, time_table(dtype, leaf.device), dtype, leaf.device)


_ARITY: dict = {}  # (owner, what, code object, number of defaults) -> _arity_error's answer


def _arity_error(owner: str, vector_field, what: str) -> str | None:
    """:func:`_arity_check` cached for plain functions by their code (terms built anew in every
    training iteration from the same lambda read its signature once)."""
    code = getattr(vector_field, "__code__", None)
    if type(vector_field) is not types.FunctionType or code is None:
        return _arity_check(owner, vector_field, what)
    key = (owner, what, code, len(vector_field.__defaults__ or ()), bool(vector_field.__kwdefaults__))
    if key not in _ARITY:
        if len(_ARITY) > 1024:
            _ARITY.clear()
        _ARITY[key] = _arity_check(owner, vector_field, what)
    return _ARITY[key]


def _arity_check(owner: str, vector_field, what: str) -> str | None:
    """A message if ``vector_field`` cannot be called as ``f(t, y, args)``, read from its
    signature (``None`` when it can, or when the signature cannot be read)."""
    fn = vector_field
    name = getattr(vector_field, "__name__", None)
    if isinstance(fn, torch.nn.Module):
        # torch.compile and (Distributed)DataParallel wrappers take *args; read the inner forward
        from .nn._neural_ode import _unwrap

        name = f"{type(_unwrap(fn)).__name__}.forward"
        fn = _unwrap(fn).forward
    elif name is None:
        name = type(vector_field).__name__
    # a function can be named in the suggested wrapper; a module or other object is called f/g there
    call = name if name.isidentifier() and not isinstance(vector_field, torch.nn.Module) else what
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind(None, None, None)
        return None
    except TypeError:
        pass
    two = True
    try:
        sig.bind(None, None)
    except TypeError:
        two = False
    if two:
        return (
            f"{owner} calls its vector field as {what}(t, y, args), but {name}{sig} takes two arguments "
            f"(the torchdiffeq convention {what}(t, y)); wrap it: {owner}(lambda t, y, args: {call}(t, y)"
            f"{', path, ...' if owner == 'ControlTerm' else ''}), "
            "or give it a third parameter args (which receives solve(..., args=...))"
        )
    return f"{owner} calls its vector field as {what}(t, y, args), but {name}{sig} cannot take (t, y, args)"


class AbstractTerm:
    """Something integrated over time: ``dy = vf(t, y, args) d(control)``."""

    def vf(self, t, y, args):  # pragma: no cover - interface
        raise NotImplementedError

    def contr(self, t0, t1):  # pragma: no cover - interface
        raise NotImplementedError

    def prod(self, vf, control):  # pragma: no cover - interface
        raise NotImplementedError

    def vf_prod(self, t, y, args, control):
        return self.prod(self.vf(t, y, args), control)


class ODETerm(AbstractTerm):
    r"""The term :math:`f(t, y, \text{args})\,dt` of an ODE :math:`\dot y = f(t, y, \text{args})`.

    Args:
        vector_field: ``f(t, y, args)`` returning a value with the structure, shapes, dtype and
            device of ``y``. ``t`` is a 0-d tensor with ``y0``'s (real) dtype and device, so
            ``t.expand(batch, 1)``, ``torch.cat([t.expand(b, 1), y], -1)`` and ``net(t, y)``
            work as in other PyTorch code; in per-sample mode it is a tensor of shape
            ``(batch,)`` holding each sample's time. (The solver keeps its times in float64:
            with a float32 ``y0``, ``t`` is rounded to float32.) An ``nn.Module`` works (its
            parameters receive gradients). A two-argument ``f(t, y)`` is refused with a message:
            wrap it as ``ODETerm(lambda t, y, args: f(t, y))``.
        time_as_float: pass ``t`` as a Python float instead (shared mode only; per-sample times
            stay tensors). Slightly cheaper, and what torchnde's own terms (samplers, front-ends)
            use; for vector fields that do Python arithmetic on ``t``.
    """

    time_as_float = False

    def __init__(self, vector_field: Callable[[Any, Any, Any], Any], *, time_as_float: bool = False):
        if not callable(vector_field):
            raise TypeError(f"ODETerm needs a callable vector field f(t, y, args); got {type(vector_field).__name__}")
        msg = _arity_error("ODETerm", vector_field, "f")
        if msg is not None:
            raise TypeError(msg)
        self.vector_field = vector_field
        self.time_as_float = bool(time_as_float)

    def vf(self, t, y, args):
        if not self.time_as_float:
            t = user_time(t, y)
        return self.vector_field(t, y, args)

    def contr(self, t0, t1):
        return t1 - t0

    def prod(self, vf, control):
        return vf * control

    def __repr__(self):
        return f"ODETerm({getattr(self.vector_field, '__name__', type(self.vector_field).__name__)})"


NOISE_TYPES = ("diagonal", "scalar", "general")


def _leaf_prod(noise: str):
    if noise == "general":
        return lambda g, x: (g @ x.unsqueeze(-1)).squeeze(-1)
    return lambda g, x: g * x


class ControlTerm(AbstractTerm):
    r"""The term :math:`g(t, y, \text{args})\,dX(t)`: a vector field times the increment of a path.

    With :class:`~torchnde.VirtualBrownianTree` (or another Brownian path) as ``X`` this is the
    diffusion of an SDE, combined with the drift by :class:`MultiTerm`; with an interpolation of
    data it is a controlled differential equation (solved by every ODE solver as
    :math:`\dot y = g(t, y)\,\dot X(t)`).

    The noise structure is declared, so that solvers can check that they apply and use it:

    ============  ==========================================  ================================
    ``noise``     shape of ``g(t, y, args)``                  shape of the path ``X``
    ============  ==========================================  ================================
    "diagonal"    ``y.shape``; ``dy_i = g_i dX_i``             ``y.shape``
    "scalar"      ``y.shape``; one path for every component   ``(*y.shape[:-1], 1)``
    "general"     ``(*y.shape, m)``; ``dy = g @ dX``          ``(*y.shape[:-1], m)``
    ============  ==========================================  ================================

    For a tree-structured ``y``, ``g`` and ``X`` are trees of the same structure and each leaf
    follows the table.

    Args:
        vector_field: ``g(t, y, args)`` (an ``nn.Module`` works).
        path: an :class:`~torchnde.paths.AbstractPath`: Brownian motion or interpolated data.
        noise: ``"diagonal"``, ``"scalar"`` or ``"general"`` (the default, also what a neural CDE
            uses).
        additive: declare that ``g`` does not depend on ``y`` (additive noise). Solvers such as
            :class:`~torchnde.SRA1` and :class:`~torchnde.ShARK` need it; others reach a higher
            strong order with it.
        commutative: declare that general noise is commutative
            (:math:`L^j g^k = L^k g^j`), as Milstein's method needs. Diagonal and scalar noise
            are commutative anyway (diagonal noise: ``g_i`` depends on ``y`` only through
            ``y_i``).
        calculus: optionally declare the SDE's calculus, ``"ito"`` or ``"stratonovich"``; solve()
            then refuses a solver of the other calculus (unless the noise is additive, where both
            agree). ``None`` (default): the solver's calculus is the SDE's.
        check: for an SDE, verify the declared noise structure once per solve, at
            ``(t0, y0)``, with :meth:`check_noise` (a few automatic-differentiation passes),
            raising ``ValueError`` if it does not hold. Default ``False``. (A CDE on interpolated
            data, solved as an ODE, does not use the declarations.)
        time_as_float: pass ``t`` to ``g`` as a Python float instead of a 0-d tensor (see
            :class:`ODETerm`).

    **Declarations are trusted.** ``noise``, ``additive`` and ``commutative`` are not verified
    by default (that would cost derivatives of ``g`` at every solve): a wrong declaration lets a
    solver use a formula that does not hold, so it converges to a wrong solution or at a lower
    order without an error. Pass ``check=True`` (or call :meth:`check_noise` on a typical state)
    to have them verified.

    ``t`` reaches ``g`` as for :class:`ODETerm`: a 0-d tensor on ``y0``'s device with its (real)
    dtype, a ``(batch,)`` tensor in per-sample mode.
    """

    time_as_float = False

    def __init__(
        self,
        vector_field: Callable[[Any, Any, Any], Any],
        path,
        *,
        noise: str = "general",
        additive: bool = False,
        commutative: bool = False,
        calculus: str | None = None,
        check: bool = False,
        time_as_float: bool = False,
    ):
        from .paths import AbstractPath

        if not callable(vector_field):
            raise TypeError(
                f"ControlTerm needs a callable vector field g(t, y, args); got {type(vector_field).__name__}"
            )
        msg = _arity_error("ControlTerm", vector_field, "g")
        if msg is not None:
            raise TypeError(msg)
        if not isinstance(path, AbstractPath):
            raise TypeError(
                "ControlTerm needs a path (e.g. VirtualBrownianTree(...) or an interpolation such as "
                f"CubicSpline(ts, xs)); got {type(path).__name__}"
            )
        if noise not in NOISE_TYPES:
            raise ValueError(f"ControlTerm(noise=...) must be one of {NOISE_TYPES}, got {noise!r}")
        if calculus not in (None, "ito", "stratonovich"):
            raise ValueError(f"ControlTerm(calculus=...) must be None, 'ito' or 'stratonovich', got {calculus!r}")
        self.vector_field = vector_field
        self.path = path
        self.noise = noise
        self.additive = bool(additive)
        self.commutative = bool(commutative) or noise in ("diagonal", "scalar")
        self.calculus = calculus
        self.check = bool(check)
        self.time_as_float = bool(time_as_float)
        self._leaf_prod = _leaf_prod(noise)

    @property
    def noise_class(self) -> str:
        """The most specific class of the noise: ``"additive"``, ``"commutative"`` or ``"general"``."""
        if self.additive:
            return "additive"
        return "commutative" if self.commutative else "general"

    def vf(self, t, y, args):
        if not self.time_as_float:
            t = user_time(t, y)
        return self.vector_field(t, y, args)

    def contr(self, t0, t1):
        return self.path.evaluate(t0, t1)

    def check_noise(self, t, y, args=None, *, rtol: float | None = None) -> None:
        r"""Verify the declared noise structure at one state ``(t, y)`` by automatic
        differentiation of ``g``; raise ``ValueError`` naming the violated condition.

        - ``additive=True``: :math:`\partial g / \partial y = 0` (one vector-Jacobian product with
          a random direction).
        - ``noise="general"`` with ``commutative=True``: :math:`L^j g^k = L^k g^j` for every pair
          of Brownian dimensions, :math:`L^j = g^j \cdot \nabla_y` (``m`` Jacobian-vector
          products; the rows of a batch are checked together, as Milstein's method treats them).
        - ``noise="diagonal"``: ``g_i`` depends on the last dimension of ``y`` only through
          ``y_i`` (one product per component of the last dimension; a dependence between the
          rows of a batch is not looked for).

        Scalar noise is always commutative. The check holds at the given state only (a
        derivative can vanish at one point); use a typical state. ``y`` must be a tensor for the
        commutativity checks (the additive check also takes a tree). ``rtol``: relative tolerance
        of the commutativity comparison (default ``10 * sqrt(eps)`` of the dtype).
        """
        if not self.time_as_float:
            t = user_time(t, y)
        with torch.enable_grad():
            ys = _tree_detach_grad(y)
            g = self.vector_field(t, ys, args)
            if self.additive:
                _check_additive(self, g, ys)
        commutative_general = self.noise == "general" and self.commutative and not self.additive
        if not (commutative_general or (self.noise == "diagonal" and not self.additive)):
            return
        if not isinstance(y, torch.Tensor):
            raise TypeError(
                f"check_noise verifies commutativity for a tensor state; got {type(y).__name__} "
                "(check each leaf's vector field separately, or pass check=False)"
            )
        _check_commutative(self, t, y.detach(), args, rtol)

    def prod(self, vf, control):
        if isinstance(vf, torch.Tensor):
            return self._leaf_prod(vf, control)
        return tree_zip(vf, control, self._leaf_prod)

    def to_ode(self, left: bool = False) -> ODETerm:
        """The ODE ``dy/dt = g(t, y, args) dX/dt`` of a control term on a smooth path. ``left=True``
        takes one-sided derivatives from the left at the path's knots (for solving backwards in time,
        where a step leaves a knot to the left)."""
        if not self.path.smooth:
            raise TypeError(f"{type(self.path).__name__} has no derivative; a ControlTerm on it is an SDE")
        return _ControlledODE(self, left)

    def __repr__(self):
        name = getattr(self.vector_field, "__name__", type(self.vector_field).__name__)
        return f"ControlTerm({name}, {type(self.path).__name__}, noise={self.noise!r})"


def _tree_detach_grad(y):
    """``y`` detached, its floating tensors requiring grad (a fresh leaf to differentiate at)."""
    return tree_map(
        lambda x: (
            x.detach().requires_grad_(x.dtype.is_floating_point or x.dtype.is_complex)
            if isinstance(x, torch.Tensor)
            else x
        ),
        y,
    )


def _probe(x, seed: int = 0):
    """A fixed pseudo-random direction shaped like ``x`` (on its device, with its dtype)."""
    gen = torch.Generator().manual_seed(seed)
    real = x.dtype.to_real() if x.dtype.is_complex else x.dtype
    return torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device=x.device, dtype=real).to(x.dtype)


def _check_additive(term, g, ys):
    outs = [x for x in tree_leaves(g) if isinstance(x, torch.Tensor) and x.requires_grad]
    ins = [x for x in tree_leaves(ys) if isinstance(x, torch.Tensor) and x.requires_grad]
    if not outs or not ins:
        return
    vs = [_probe(x, i) for i, x in enumerate(outs)]
    grads = torch.autograd.grad(outs, ins, vs, allow_unused=True)
    worst = max((float(d.abs().max()) for d in grads if d is not None and d.numel()), default=0.0)
    if worst > 0:
        raise ValueError(
            f"{term!r} declares additive=True, but g depends on y at the state checked: a random "
            f"vector-Jacobian product v^T dg/dy is nonzero (max |.| = {worst:.3g}). Solvers for additive "
            "noise (SRA1, ShARK) would give wrong results; remove additive=True"
        )


def _check_commutative(term, t, y, args, rtol):
    from .solvers.milstein import _jvp  # forward mode, with torch's first-call warning silenced

    def g_of(z):
        return term.vector_field(t, z, args)

    g = g_of(y)
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"check_noise: the vector field of {term!r} returned {type(g).__name__}; expected a tensor")
    real = y.dtype.to_real() if y.dtype.is_complex else y.dtype
    rtol = 10 * torch.finfo(real).eps ** 0.5 if rtol is None else rtol
    if term.noise == "general":
        if g.shape[:-1] != y.shape:
            raise ValueError(f"{term!r} returned shape {tuple(g.shape)}; expected {(*y.shape, 'm')}")
        m = g.shape[-1]
        # A[j][..., k] = (dg^k/dy) g^j = L^j g^k
        A = torch.stack([_jvp(g_of, y, g[..., j])[1] for j in range(m)])  # (m, *y.shape, m)
        B = A.movedim(0, -1).transpose(-1, -2).movedim(-1, 0)  # B[j][..., k] = A[k][..., j]
        diff = (A - B).abs()
        scale = torch.maximum(A.abs(), B.abs()).max()
        bad = float(diff.max()) if diff.numel() else 0.0
        if bad > rtol * float(scale) + torch.finfo(real).tiny:
            j, k = divmod(int(diff.reshape(m, -1, m).amax(1).argmax()), m)
            raise ValueError(
                f"{term!r} declares commutative=True, but L^j g^k != L^k g^j at the state checked "
                f"(L^j = g^j . grad_y; worst pair j={j}, k={k}: |difference| = {bad:.3g} against a scale of "
                f"{float(scale):.3g}). Milstein's method would not converge at order 1; remove "
                "commutative=True and use a solver for general noise (e.g. Euler() for Itô, EulerHeun() or Heun() for "
                "Stratonovich SDEs)"
            )
        return
    # diagonal: g_k may depend on the last dimension of y only through y_k
    if g.shape != y.shape:
        raise ValueError(f"{term!r} returned shape {tuple(g.shape)}; with noise='diagonal' expected {tuple(y.shape)}")
    n = y.shape[-1] if y.dim() else 1
    if n == 1:  # one component per row: nothing to couple
        return
    for i in range(n):
        e = torch.zeros_like(g)
        e[..., i] = 1
        _, d = _jvp(g_of, y, g * e)
        off = d.clone()
        off[..., i] = 0
        bad = float(off.abs().max()) if off.numel() else 0.0
        if bad > 0:
            k = int(off.abs().reshape(-1, n).amax(0).argmax())
            raise ValueError(
                f"{term!r} declares noise='diagonal', but component {k} of g depends on component {i} of y "
                f"(g_{i} dg_{k}/dy_{i} = {bad:.3g} at the state checked); diagonal noise needs g_k to depend "
                "on y only through y_k. Use noise='general' with a (..., d, d) diffusion, or make g elementwise"
            )


class _ControlledODE(ODETerm):
    """``g(t, y) dX/dt`` as an ODE term (CDEs on interpolated data). The path reads ``t`` as given
    (a float in shared mode); ``g`` receives it as the control term passes it."""

    time_as_float = True

    def __init__(self, control: ControlTerm, left: bool = False):
        self.control = control
        self.left = left
        self.vector_field = self._vf
        self._checked = False

    def _vf(self, t, y, args):
        c = self.control
        dx = c.path.derivative(t, left=True) if self.left else c.path.derivative(t)
        g = c.vf(t, y, args)
        if not self._checked:
            check_control_shapes(f"the vector field of {c!r}", c.noise, g, y, dx)
            self._checked = True
        return c.prod(g, dx)

    def reversed(self) -> _ControlledODE:
        return _ControlledODE(self.control, not self.left)

    def __repr__(self):
        return repr(self.control)


def check_control_shapes(what: str, noise: str, g, y, dx) -> None:
    """Once per solve: ``g``'s leaves have the shapes the noise type asks for (``(*y.shape, m)``
    for general noise, where ``m`` is the path's channel count), else a message saying so
    (instead of a broadcasting or ``bmm`` error from the product)."""
    gl, yl, xl = tree_leaves(g), tree_leaves(y), tree_leaves(dx)
    if len(gl) != len(yl) or not all(isinstance(x, torch.Tensor) for x in gl):
        raise ValueError(
            f"{what} must return a tensor (or a tree like y with {len(yl)} tensors); got {type(g).__name__}"
        )
    for gi, yi, xi in zip(gl, yl, xl if len(xl) == len(yl) else xl * len(yl)):
        general = noise == "general"
        want = (*yi.shape, xi.shape[-1]) if general else tuple(yi.shape)
        ok = tuple(gi.shape) == want
        if not ok:  # shapes that broadcast against y (e.g. one matrix for the whole batch) are fine
            try:
                ok = torch.broadcast_shapes(gi.shape[:-1] if general else gi.shape, yi.shape) == yi.shape
            except RuntimeError:
                ok = False
            ok = ok and (not general or (gi.dim() >= 2 and gi.shape[-1] == xi.shape[-1]))
        if not ok:
            hint = ""
            if general and tuple(gi.shape) == tuple(yi.shape):
                hint = (
                    f"; it is missing the channel dimension: return a (..., {yi.shape[-1] if yi.dim() else 1}, "
                    f"{xi.shape[-1]}) matrix per state (e.g. a final nn.Linear(hidden, hidden * channels) "
                    "reshaped with .view(*z.shape, channels))"
                )
            raise ValueError(
                f"{what} returned shape {tuple(gi.shape)}; with noise={noise!r}, "
                f"y of shape {tuple(yi.shape)} and a path with {xi.shape[-1]} channels it must return shape "
                f"{want} = (*y.shape, channels){hint}"
            )


class MultiTerm(AbstractTerm):
    """A sum of terms, e.g. ``MultiTerm(ODETerm(drift), ControlTerm(diffusion, brownian))`` for the SDE
    :math:`dy = f\\,dt + g\\,dW`. ``vf``/``contr`` give tuples, ``prod`` sums the products."""

    def __init__(self, *terms: AbstractTerm):
        if not terms:
            raise ValueError("MultiTerm needs at least one term")
        for term in terms:
            if not isinstance(term, AbstractTerm):
                raise TypeError(f"MultiTerm takes terms such as ODETerm(f) or ControlTerm(g, path); got {term!r}")
        self.terms = tuple(terms)

    def vf(self, t, y, args):
        return tuple(term.vf(t, y, args) for term in self.terms)

    def contr(self, t0, t1):
        return tuple(term.contr(t0, t1) for term in self.terms)

    def prod(self, vf, control):
        out = None
        for term, v, c in zip(self.terms, vf, control):
            p = term.prod(v, c)
            out = p if out is None else tree_zip(out, p, torch.add)
        return out

    def __repr__(self):
        return f"MultiTerm({', '.join(map(repr, self.terms))})"


class SDETerm(AbstractTerm):
    """What ``solve()`` makes of terms driven by Brownian motion: the drift (all ODE terms and
    control terms on smooth paths, summed; ``None`` if there is none) and the one control term on
    a rough path. ``vf`` returns ``(drift, diffusion)``."""

    def __init__(self, drift: ODETerm | None, control: ControlTerm):
        self.drift = drift
        self.control = control

    def vf(self, t, y, args):
        f = None if self.drift is None else self.drift.vf(t, y, args)
        return (f, self.control.vf(t, y, args))

    def contr(self, t0, t1):
        return (t1 - t0, self.control.contr(t0, t1))

    def prod(self, vf, control):
        g = self.control.prod(vf[1], control[1])
        if vf[0] is None:
            return g
        return tree_zip(g, ODETerm.prod(None, vf[0], control[0]), torch.add)

    def vf_prod(self, t, y, args, control):
        """``f dt + g dW`` for ``control = (dt, dW)``; a subclass may compute it directly."""
        return self.prod(self.vf(t, y, args), control)

    def __repr__(self):
        return f"SDETerm(drift={self.drift!r}, {self.control!r})"


def _sum_odes(terms: list) -> ODETerm | None:
    if not terms:
        return None
    if len(terms) == 1:
        return terms[0]
    return _SumODE(terms)


class _SumODE(ODETerm):
    time_as_float = True  # each term converts t for its own vector field

    def __init__(self, terms):
        self.terms = terms
        self.vector_field = self._vf

    def _vf(self, t, y, args):
        out = None
        for term in self.terms:
            v = term.vf(t, y, args)
            out = v if out is None else tree_zip(out, v, torch.add)
        return out

    def __repr__(self):
        return " + ".join(map(repr, self.terms))


def reverse_terms(terms):
    """Normalised terms for solving in the other direction: control terms on smooth paths switch
    between right and left derivatives at the path's knots (everything else is unchanged)."""
    if isinstance(terms, _ControlledODE):
        return terms.reversed()
    if isinstance(terms, _SumODE):
        return _SumODE([reverse_terms(t) for t in terms.terms])
    if isinstance(terms, SDETerm):
        return SDETerm(None if terms.drift is None else reverse_terms(terms.drift), terms.control)
    return terms


def normalize_terms(terms: AbstractTerm, backward: bool = False) -> AbstractTerm:
    """An :class:`ODETerm` (ODEs, and CDEs on smooth paths) or an :class:`SDETerm` (exactly one
    control term on Brownian motion). ``backward``: the solve runs backwards in time (smooth paths
    then use left derivatives at their knots)."""
    if isinstance(terms, (ODETerm, SDETerm)):
        return terms
    parts = list(terms.terms) if isinstance(terms, MultiTerm) else [terms]
    odes, rough = [], []
    for term in parts:
        if isinstance(term, MultiTerm):
            raise TypeError("nested MultiTerm: pass the terms to one MultiTerm(...)")
        if isinstance(term, ODETerm):
            odes.append(term)
        elif isinstance(term, ControlTerm):
            (odes if term.path.smooth else rough).append(term.to_ode(backward) if term.path.smooth else term)
        else:
            raise TypeError(
                f"solve() does not know how to integrate {type(term).__name__}; use ODETerm, ControlTerm or MultiTerm"
            )
    if len(rough) > 1:
        raise NotImplementedError(
            "more than one control term driven by Brownian motion; use one Brownian path with the "
            "noise dimensions concatenated (noise='general')"
        )
    drift = _sum_odes(odes)
    if not rough:
        return drift
    return SDETerm(drift, rough[0])
