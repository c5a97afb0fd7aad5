"""What solvers see of the terms: a flat state, forward internal time, bound ``args``.

:func:`solve` works on one flat tensor (``Flattener``) and integrates backwards in time by a sign
flip; these wrappers translate between that view and the user's vector fields. ODE terms become a
:class:`_FlatTerm` (``vf(t, y)``), SDE terms a :class:`_FlatSDE` (drift, diffusion, Brownian
increments and their products).
"""

from __future__ import annotations

import torch

from ._terms import ODETerm, SDETerm, _SumODE, cached_time, time_dtype, time_table
from ._tree import Flattener, tree_leaves, tree_map

__all__ = ["flat_term"]


class _FlatTerm:
    """The user's term seen by solvers: flat state, forward internal time, args bound, NFE counted.

    ``vf(t, y)`` is the whole vector field. A ``MultiTerm`` of several ODE terms (summed by
    :func:`~torchnde._terms.normalize_terms`) keeps its parts: ``num_parts`` says how many, and
    IMEX solvers evaluate them apart with ``vf_explicit`` (the first) and ``vf_implicit`` (the
    second), each counted as one evaluation in ``nfe``.
    """

    rough = False

    __slots__ = ("term", "flat", "args", "sign", "nfe", "batched", "checked", "times", "checked_parts")

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
        if type(term).vf is ODETerm.vf and not term.time_as_float:
            dtype = time_dtype(flat.dtype)
            self.times = (time_table(dtype, flat.device), dtype, flat.device)
        self.checked_parts = [False, False]

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
        if self.sign < 0:
            t = -t
        times = self.times
        if times is None:
            out = self.term.vf(t, self.flat.state_to_tree(y), self.args)
        else:  # ODETerm.vf itself, with the time converted here
            if type(t) is float:
                tt = times[0].get(t)
                t = tt if tt is not None and not tt._version and not tt.requires_grad else cached_time(t, *times)
            out = self.term.vector_field(t, self.flat.state_to_tree(y), self.args)
        if not self.checked:
            self.flat.check_output(out, f"the vector field of {self.term!r}")
            self.checked = True
        out = self.flat.tree_to_state(out)
        return -out if self.sign < 0 else out


class _FlatSDE:
    """An SDE seen by solvers: flat state, forward internal time, args bound.

    ``vf(t, y)`` is the drift (flat; zero if there is none), ``diffusion(t, y)`` the diffusion in
    the user's shapes, ``noise(t0, t1)`` the Brownian increment over an internal-time step,
    ``gprod(g, dW)`` their product as a flat increment. The generic pair interface
    ``vf_pair`` / ``contr`` / ``prod`` lets Runge--Kutta-type solvers treat drift and noise
    together: ``prod(vf_pair(t, y), contr(t0, t1))`` is ``f dt + g dW``.
    """

    rough = True
    __slots__ = (
        "sde", "flat", "args", "sign", "nfe", "nfe_diffusion", "batched", "checked", "checked_g", "checked_w",
        "control", "path", "noise_type", "noise_class", "custom",
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

    def vf(self, t, y):
        """The drift on the flat state (zeros if the SDE has none)."""
        if self.custom:
            zero = tree_map(torch.zeros_like, self.path.evaluate(self.path.t0, self.path.t0))
            return self.vf_prod(t, y, (1.0, zero))
        if self.sde.drift is None:
            return torch.zeros_like(y)
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

    def diffusion(self, t, y):
        """``g(t, y)`` in the user's shapes (see :class:`~torchnde.ControlTerm`)."""
        self.nfe_diffusion += 1
        s = -t if self.sign < 0 else t
        tree = self.flat.state_to_tree(y)
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
        dt = control[0]
        if self.sign < 0 and self.sde.drift is not None and isinstance(dt, float):
            # backwards in time: the drift's sign flip goes into the scalar (one op fewer, same values)
            f = self._user_drift(t, y)
            return torch.add(self.gprod(self.diffusion(t, y), control[1]), f, alpha=-dt)
        return self.prod(self.vf_pair(t, y), control)

    def gprod(self, g, w):
        """``g dW`` as a flat increment."""
        return self.flat.tree_to_state(self.control.prod(g, w))

    def vf_pair(self, t, y):
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


def _leaf_shapes(flat: Flattener, tree, what: str) -> list:
    leaves = tree_leaves(tree)
    if len(leaves) != len(flat.shapes) or not all(isinstance(x, torch.Tensor) for x in leaves):
        raise ValueError(f"{what} must be a tensor (or a tree like y0 with {len(flat.shapes)} tensors)")
    for x in leaves:
        if x.dtype != flat.dtype or x.device != flat.device:
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
    shapes = _leaf_shapes(flat, g, f"the diffusion of {control!r}")
    for got, want in zip(shapes, flat.shapes):
        ok = got == want if noise in ("diagonal", "scalar") else (len(got) == len(want) + 1 and got[:-1] == want)
        if not ok:
            raise ValueError(
                f"the diffusion of {control!r} returned shape {got}; with noise={noise!r} and y of shape "
                f"{want} it must have shape {_expected(noise, want, 1)}"
            )


def _check_noise(flat, w, noise, path):
    shapes = _leaf_shapes(flat, w, f"the increment of {path!r}")
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
