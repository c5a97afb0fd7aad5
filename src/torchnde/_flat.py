"""What solvers see of the terms: a flat state, forward internal time, bound ``args``.

:func:`solve` works on one flat tensor (``Flattener``) and integrates backwards in time by a sign
flip; these wrappers translate between that view and the user's vector fields. ODE terms become a
:class:`_FlatTerm` (``vf(t, y)``), SDE terms a :class:`_FlatSDE` (drift, diffusion, Brownian
increments and their products).
"""

from __future__ import annotations

import torch

from ._terms import ControlTerm, ODETerm, SDETerm, _SumODE, cached_time, time_dtype, time_table, user_time
from ._tree import Flattener, tree_leaves, tree_map

__all__ = ["flat_term"]

# scratch buffers of finished solves, by (dtype, device, leaf shapes, per-sample, inference
# mode): a solve takes its state's entry (dict.pop: two solves never share one) and hands it
# back when it ends; bounded (a full pool is emptied)
_SCRATCH_POOL: dict = {}
_SCRATCH_POOL_SIZE = 32


class _FlatTerm:
    """The user's term seen by solvers: flat state, forward internal time, args bound, NFE counted.

    ``vf(t, y)`` is the whole vector field. A ``MultiTerm`` of several ODE terms (summed by
    :func:`~torchnde._terms.normalize_terms`) keeps its parts: ``num_parts`` says how many, and
    IMEX solvers evaluate them apart with ``vf_explicit`` (the first) and ``vf_implicit`` (the
    second), each counted as one evaluation in ``nfe``.
    """

    rough = False

    __slots__ = ("term", "flat", "args", "sign", "nfe", "batched", "checked", "times", "checked_parts", "_vf", "_shape")
    __slots__ += ("_state_shape", "scratch", "direct", "need_dense", "_pool_key")

    def __init__(self, term, flat: Flattener, args, sign: float, batched: bool):
        self.term = term
        self.flat = flat
        self.args = args
        self.sign = sign
        self.nfe = 0
        self.batched = batched
        self.checked = False
        # a plain ODETerm that wants tensor time: convert here, with the cache table looked up
        # once per solve (ODETerm.vf then passes the tensor through); other terms convert inside
        self.times = None
        self._vf = None
        if type(term).vf is ODETerm.vf and not term.time_as_float:
            dtype = time_dtype(flat.dtype)
            self.times = (time_table(dtype, flat.device), dtype, flat.device)
            self._vf = term.vector_field
        self.checked_parts = [False, False]
        # a single tensor: the flat state viewed in the user's shape and the output reshaped to
        # the state's shape directly (what Flattener.state_to_tree / tree_to_state do, less two
        # calls per evaluation)
        self._shape = flat.shapes[0] if flat.single else None
        self._state_shape = flat.state_shape if flat.single else None
        # buffers a solver may keep for the length of the solve (the explicit Runge-Kutta steps'
        # stage buffer, solvers/_base.py), by the solver's own key; handed back by release() at
        # the end of the solve for the next solve of the same state (a training loop), so they
        # are made once, not once per solve
        self._pool_key = (flat.dtype, flat.device, tuple(flat.shapes), batched, torch.is_inference_mode_enabled())
        self.scratch = _SCRATCH_POOL.pop(self._pool_key, None) or {}
        # what a solver's inner loop may call instead of vf, once vf has checked the output: set
        # below for a plain ODETerm (tensor time) on a single tensor forward in time
        self.direct = None
        # whether the steps' dense information is read (dense output, saving between step ends,
        # events, a solver wrapping the step): the loop sets it False when nothing reads it, and
        # the explicit Runge-Kutta fast path then keeps its stages in the user's shape
        self.need_dense = True

    def release(self) -> None:
        """Hand :attr:`scratch` back for the next solve of the same state (the solve is over;
        nothing a solve returns refers to these buffers)."""
        if self.scratch:
            if len(_SCRATCH_POOL) >= _SCRATCH_POOL_SIZE:
                _SCRATCH_POOL.clear()
            _SCRATCH_POOL[self._pool_key] = self.scratch
            self.scratch = {}

    @property
    def num_parts(self) -> int:
        """How many terms the vector field is the sum of (``MultiTerm(ODETerm(f), ODETerm(g))``
        gives 2, a single ``ODETerm`` 1)."""
        return len(self.term.terms) if isinstance(self.term, _SumODE) else 1

    def vf_explicit(self, t, y):
        """The first part of a two-part sum (the non-stiff term of an IMEX split)."""
        return self._part(0, t, y)

    def vf_implicit(self, t, y):
        """The second part of a two-part sum (the stiff term of an IMEX split)."""
        return self._part(1, t, y)

    def _part(self, i: int, t, y):
        if self.num_parts != 2:
            raise TypeError(
                f"vf_explicit/vf_implicit need a MultiTerm of two ODE terms (explicit, implicit); "
                f"the term is {self.term!r} ({self.num_parts} part(s))"
            )
        self.nfe += 1
        part = self.term.terms[i]
        out = part.vf(-t if self.sign < 0 else t, self.flat.state_to_tree(y), self.args)
        if not self.checked_parts[i]:
            self.flat.check_output(out, f"the vector field of {part!r}")
            self.checked_parts[i] = True
        out = self.flat.tree_to_state(out)
        return -out if self.sign < 0 else out

    def vf(self, t, y):
        self.nfe += 1
        neg = self.sign < 0
        if neg:
            t = -t
        shape = self._shape
        x = y.view(shape) if shape is not None else self.flat.state_to_tree(y)
        times = self.times
        if times is None:
            out = self.term.vf(t, x, self.args)
        else:  # ODETerm.vf itself, with the time converted here
            if type(t) is float:
                tt = times[0].get(t)
                t = tt if tt is not None and not tt._version and not tt.requires_grad else cached_time(t, *times)
            out = self._vf(t, x, self.args)
        if not self.checked:
            self.flat.check_output(out, f"the vector field of {self.term!r}")
            self.checked = True
            self._set_direct()
        out = out.reshape(self._state_shape) if shape is not None else self.flat.tree_to_state(out)
        return -out if neg else out

    def _set_direct(self):
        """``direct = (f, shape, state_shape, args, table, make_time)``: ``f(t, y.view(shape),
        args).reshape(state_shape)`` is :meth:`vf` at a float time whose 0-d tensor is
        ``table.get(t)`` if cached and unmodified, else ``make_time(t)``; callers count ``nfe``.
        Only for a plain :class:`~torchnde.ODETerm` taking tensor time, a single-tensor state and
        forward internal time (no sign flips); else ``None``."""
        if self.times is None or self._shape is None or self.sign < 0:
            return
        table, dtype, device = self.times

        def make_time(t):
            return cached_time(t, table, dtype, device)

        self.direct = (self._vf, self._shape, self._state_shape, self.args, table, make_time)


class _FlatSDE:
    """An SDE seen by solvers: flat state, forward internal time, args bound.

    ``vf(t, y)`` is the drift (flat; zero if there is none), ``diffusion(t, y)`` the diffusion in
    the user's shapes, ``noise(t0, t1)`` the Brownian increment over an internal-time step,
    ``gprod(g, dW)`` their product as a flat increment. The generic pair interface
    ``vf_pair`` / ``contr`` / ``prod`` lets Runge--Kutta-type solvers treat drift and noise
    together: ``prod(vf_pair(t, y), contr(t0, t1))`` is ``f dt + g dW``.

    These run several times per step, so once the first evaluations have checked the user's
    outputs, a drift that is a plain :class:`~torchnde.ODETerm` and a diffusion that is a plain
    :class:`~torchnde.ControlTerm` are called directly (their ``vector_field``), with the time
    converted once per evaluation point from a cache looked up once per solve (as
    :class:`_FlatTerm` does), and a single-tensor state reshaped without tree handling. Same
    operations, same values as going through the terms.
    """

    rough = True
    __slots__ = (
        "sde", "flat", "args", "sign", "nfe", "nfe_diffusion", "batched", "checked", "checked_g", "checked_w",
        "control", "path", "noise_type", "noise_class", "custom",
        "_f", "_f_tt", "_g", "_g_tt", "_leaf", "_tcache", "_shape", "_state_shape", "need_error",
    )  # fmt: skip

    def __init__(self, sde: SDETerm, flat: Flattener, args, sign: float, batched: bool):
        self.sde = sde
        self.control = sde.control
        self.path = sde.control.path
        self.noise_type = sde.control.noise
        self.noise_class = sde.control.noise_class
        self.flat = flat
        self.args = args
        self.sign = sign
        self.batched = batched
        self.nfe = 0
        self.nfe_diffusion = 0
        self.checked = self.checked_g = self.checked_w = False
        self.custom = type(sde).vf_prod is not SDETerm.vf_prod
        if self.custom:
            self.checked = self.checked_g = self.checked_w = True
        # whether steps must return their error estimate: a loop whose steps are all accepted
        # whatever the estimate (fixed steps) may set it False to save the ops (SDE Runge-Kutta
        # steps then return None)
        self.need_error = True
        # the direct calls (None: through the term's own vf / prod): the user's functions, whether
        # they take tensor time (_tt), and the leaf product g dW of a single-tensor state
        drift, control = sde.drift, sde.control
        plain_f = drift is not None and type(drift).vf is ODETerm.vf
        plain_g = type(control).vf is ControlTerm.vf
        self._f = drift.vector_field if plain_f else None
        self._f_tt = plain_f and not drift.time_as_float
        self._g = control.vector_field if plain_g else None
        self._g_tt = plain_g and not control.time_as_float
        self._leaf = control._leaf_prod if flat.single and type(control).prod is ControlTerm.prod else None
        self._tcache = None
        if self._f_tt or self._g_tt:
            dtype = time_dtype(flat.dtype)
            self._tcache = (time_table(dtype, flat.device), dtype, flat.device)
        # single tensor: view the flat state as the user's shape with view(*shape) and flatten
        # outputs with flatten() (unbatched), each about a microsecond cheaper than passing a tuple
        self._shape = flat.shapes[0] if flat.single else None
        self._state_shape = None if flat.single and not flat.batch else flat.state_shape

    def _user_t(self, t, tree):
        """Internal time ``t`` as the user's time, and as a 0-d tensor for fields that take one
        (cached; see :func:`~torchnde._terms.user_time`): ``(s, s_tensor)``."""
        s = -t if self.sign < 0 else t
        if self._tcache is None:
            return s, s
        if type(s) is float:
            st = self._tcache[0].get(s)
            if st is None or st._version or st.requires_grad:
                st = cached_time(s, *self._tcache)
            return s, st
        return s, user_time(s, tree)

    def _tree(self, y):
        shape = self._shape
        if shape is None:
            return self.flat.state_to_tree(y)
        return y.view(*shape) if shape else y.view(shape)

    def _state(self, out):
        if self._shape is None:
            return self.flat.tree_to_state(out)
        return out.flatten() if self._state_shape is None else out.reshape(self._state_shape)

    def _fast_f(self, st, s, tree):
        """The drift (user's direction, flat) through the direct call (checked before)."""
        self.nfe += 1
        return self._state(self._f(st if self._f_tt else s, tree, self.args))

    def _fast_g(self, st, s, tree):
        self.nfe_diffusion += 1
        return self._g(st if self._g_tt else s, tree, self.args)

    def vf(self, t, y):
        """The drift on the flat state (zeros if the SDE has none)."""
        if self.custom:
            zero = tree_map(torch.zeros_like, self.path.evaluate(self.path.t0, self.path.t0))
            return self.vf_prod(t, y, (1.0, zero))
        if self.sde.drift is None:
            return torch.zeros_like(y)
        if self._f is not None and self.checked:
            tree = self._tree(y)
            s, st = self._user_t(t, tree)
            out = self._fast_f(st, s, tree)
        else:
            out = self._user_drift(t, y)
        return -out if self.sign < 0 else out

    drift = vf

    def _user_drift(self, t, y):
        """The drift on the flat state in the user's time direction (not negated)."""
        self.nfe += 1
        out = self.sde.drift.vf(-t if self.sign < 0 else t, self.flat.state_to_tree(y), self.args)
        if not self.checked:
            self.flat.check_output(out, f"the drift of {self.sde!r}")
            self.checked = True
        return self.flat.tree_to_state(out)

    def tree(self, y):
        """The flat state ``y`` in the user's shapes (a view of it for a single tensor)."""
        return self._tree(y)

    def state(self, out):
        """A value in the user's shapes (e.g. an increment) as a flat state."""
        return self._state(out)

    def drift_tree(self, t, tree):
        """The drift at a state in the user's shapes, in the user's shapes and time direction
        (not negated when the solve runs backwards: scale it by ``dt * sign``); ``None`` if the
        SDE has none."""
        if self.sde.drift is None:
            return None
        if self._f is not None and self.checked:
            s, st = self._user_t(t, tree)
            self.nfe += 1
            return self._f(st if self._f_tt else s, tree, self.args)
        return self.flat.state_to_tree(self._user_drift(t, self.flat.tree_to_state(tree)))

    def vf_tree(self, t, tree):
        """:meth:`vf` (the drift, in the solve's direction) at a state in the user's shapes, in
        the user's shapes."""
        f = self.drift_tree(t, tree)
        if f is None:
            return self._tree(torch.zeros_like(self._state(tree)))
        return -f if self.sign < 0 else f

    def gprod_tree(self, g, w):
        """:meth:`gprod` in the user's shapes."""
        leaf = self._leaf
        if leaf is not None and type(g) is torch.Tensor and type(w) is torch.Tensor:
            return leaf(g, w)
        return self._tree(self.gprod(g, w))

    def diffusion(self, t, y):
        """``g(t, y)`` in the user's shapes (see :class:`~torchnde.ControlTerm`)."""
        return self.diffusion_tree(t, self._tree(y))

    def diffusion_tree(self, t, tree):
        """``g(t, y)`` for a state ``tree`` in the user's shapes."""
        if self._g is not None and self.checked_g:
            s, st = self._user_t(t, tree)
            return self._fast_g(st, s, tree)
        self.nfe_diffusion += 1
        s = -t if self.sign < 0 else t
        g = self.control.vf(s, tree, self.args)
        if not self.checked_g:
            _check_diffusion(self.flat, g, self.noise_type, self.control)
            if self.control.check:  # ControlTerm(..., check=True): verify the declared noise once
                self.control.check_noise(s, tree, self.args)
            self.checked_g = True
        return g

    def _times(self, t0, t1):
        return (-t0, -t1) if self.sign < 0 else (t0, t1)

    def noise(self, t0, t1):
        """The Brownian increment over the internal-time step ``[t0, t1]``."""
        s, t = self._times(t0, t1)
        w = self.path.evaluate(s, t)
        if not self.checked_w:
            _check_noise(self.flat, w, self.noise_type, self.path)
            self.checked_w = True
        return w

    def levy(self, t0, t1):
        """:class:`~torchnde.paths.BrownianIncrement` (W and Lévy areas) over ``[t0, t1]``."""
        s, t = self._times(t0, t1)
        inc = self.path.increment(s, t)
        if not self.checked_w:
            _check_noise(self.flat, inc.W, self.noise_type, self.path)
            self.checked_w = True
        return inc

    def vf_prod(self, t, y, control):
        """``f dt + g dW`` at ``(t, y)`` for ``control = (dt, dW)`` (what Runge--Kutta stages need)."""
        if self.custom:  # a term that computes the product itself (e.g. the stochastic adjoint)
            self.nfe += 1
            dt, w = control
            s = self.sign
            out = self.sde.vf_prod(s * t, self.flat.state_to_tree(y), self.args, (s * dt, w))
            return self.flat.tree_to_state(out)
        dt, w = control
        if self._f is not None and self._g is not None and self.checked and self.checked_g and type(dt) is float:
            # the direct calls: drift first, then diffusion (as below), one time conversion
            tree = self._tree(y)
            s, st = self._user_t(t, tree)
            self.nfe += 1
            self.nfe_diffusion += 1
            f = self._f(st if self._f_tt else s, tree, self.args)
            g = self._g(st if self._g_tt else s, tree, self.args)
            # backwards in time the drift's sign flip goes into the scalar (one op fewer)
            alpha = -dt if self.sign < 0 else dt
            if self._leaf is not None and type(g) is torch.Tensor and type(w) is torch.Tensor:
                # a single tensor: g dW + f dt in the user's shape, flattened once
                return self._state(torch.add(self._leaf(g, w), f, alpha=alpha))
            return torch.add(self.gprod(g, w), self._state(f), alpha=alpha)
        if self.sign < 0 and self.sde.drift is not None and isinstance(dt, float):
            # backwards in time: the drift's sign flip goes into the scalar (one op fewer, same values)
            f = self._user_drift(t, y)
            return torch.add(self.gprod(self.diffusion(t, y), control[1]), f, alpha=-dt)
        return self.prod(self.vf_pair(t, y), control)

    def vf_prod_tree(self, t, tree, control):
        """:meth:`vf_prod` at a single-tensor state in the user's shape, in the user's shape (for
        solvers that view the state once per step instead of once per stage)."""
        dt, w = control
        if (
            self._leaf is not None and self._f is not None and self._g is not None and self.checked
            and self.checked_g and type(dt) is float
        ):  # fmt: skip
            s, st = self._user_t(t, tree)
            self.nfe += 1
            self.nfe_diffusion += 1
            f = self._f(st if self._f_tt else s, tree, self.args)
            g = self._g(st if self._g_tt else s, tree, self.args)
            if type(g) is torch.Tensor and type(w) is torch.Tensor:
                return torch.add(self._leaf(g, w), f, alpha=-dt if self.sign < 0 else dt)
            return self._tree(torch.add(self.gprod(g, w), self._state(f), alpha=-dt if self.sign < 0 else dt))
        return self._tree(self.vf_prod(t, self._state(tree), control))

    def gprod(self, g, w):
        """``g dW`` as a flat increment."""
        leaf = self._leaf
        if leaf is not None and type(g) is torch.Tensor and type(w) is torch.Tensor:
            return self._state(leaf(g, w))
        return self.flat.tree_to_state(self.control.prod(g, w))

    def vf_pair(self, t, y):
        """``(f, g)``: the drift (flat; ``None`` without one) and the diffusion at ``(t, y)``."""
        if self._f is not None and self._g is not None and self.checked and self.checked_g:
            tree = self._tree(y)
            s, st = self._user_t(t, tree)
            f = self._fast_f(st, s, tree)
            return (-f if self.sign < 0 else f), self._fast_g(st, s, tree)
        return (self.vf(t, y) if self.sde.drift is not None else None, self.diffusion(t, y))

    def contr(self, t0, t1):
        dt = t1 - t0
        return (dt if isinstance(dt, float) else dt.unsqueeze(-1), self.noise(t0, t1))

    def prod(self, pair, control):
        f, g = pair
        inc = self.gprod(g, control[1])
        if f is None:
            return inc
        dt = control[0]
        return torch.add(inc, f, alpha=dt) if isinstance(dt, float) else torch.addcmul(inc, f, dt)


def flat_term(terms, flat: Flattener, args, sign: float, batched: bool):
    """What solvers see of normalised terms: :class:`_FlatTerm` (ODE) or :class:`_FlatSDE`."""
    return (_FlatSDE if isinstance(terms, SDETerm) else _FlatTerm)(terms, flat, args, sign, batched)


def _leaf_shapes(flat: Flattener, tree, what) -> list:
    """The shapes of ``tree``'s leaves, checked against ``flat``; ``what`` (a string, or a callable
    making it: only an error needs it) names the tree in messages."""
    leaves = tree_leaves(tree)
    if len(leaves) != len(flat.shapes) or not all(isinstance(x, torch.Tensor) for x in leaves):
        what = what() if callable(what) else what
        raise ValueError(f"{what} must be a tensor (or a tree like y0 with {len(flat.shapes)} tensors)")
    for x in leaves:
        if x.dtype != flat.dtype or x.device != flat.device:
            what = what() if callable(what) else what
            raise TypeError(
                f"{what} has dtype {x.dtype} on {x.device} but y0 is {flat.dtype} on {flat.device}; "
                "build the Brownian path with dtype=y0.dtype, device=y0.device and make the diffusion follow y"
            )
    return [tuple(x.shape) for x in leaves]


def _expected(noise: str, shape: tuple, last: int | None) -> str:
    if noise == "diagonal":
        return str(shape)
    if noise == "scalar":
        return str((*shape[:-1], 1)) if last is None else str(shape)
    return str((*shape, "m")) if last is not None else str((*shape[:-1], "m"))


def _check_diffusion(flat, g, noise, control):
    shapes = _leaf_shapes(flat, g, lambda: f"the diffusion of {control!r}")
    for got, want in zip(shapes, flat.shapes):
        ok = got == want if noise in ("diagonal", "scalar") else (len(got) == len(want) + 1 and got[:-1] == want)
        if not ok:
            raise ValueError(
                f"the diffusion of {control!r} returned shape {got}; with noise={noise!r} and y of shape "
                f"{want} it must have shape {_expected(noise, want, 1)}"
            )


def _check_noise(flat, w, noise, path):
    shapes = _leaf_shapes(flat, w, lambda: f"the increment of {path!r}")
    for got, want in zip(shapes, flat.shapes):
        if noise == "diagonal":
            ok = got == want
        elif noise == "scalar":
            ok = got == (*want[:-1], 1)
        else:
            ok = len(got) == len(want) and got[:-1] == want[:-1]
        if not ok:
            raise ValueError(
                f"the Brownian path has shape {got}; with noise={noise!r} and y of shape {want} it must have "
                f"shape {_expected(noise, want, None)}"
            )
