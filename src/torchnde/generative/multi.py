r"""Multi-component diffusion: a *system* of forward SDEs over a tree-structured state, one
process per leaf, coupled through the partial scores of the joint density.

GDSS (Jo, Lee & Hwang 2022, "Score-based generative modeling of graphs via the system of
stochastic differential equations", ICML, Section 3) diffuses node features :math:`X` and an
adjacency :math:`A` with two forward SDEs (Eq. 4)

.. math:: dX = f_{1,t}(X)\,dt + g_{1,t}\,dW_1, \qquad dA = f_{2,t}(A)\,dt + g_{2,t}\,dW_2,

and generates with the *coupled* reverse-time system (Eq. 5): for every leaf :math:`k`,

.. math:: dX_k = [f_{k,t}(X_k) - g_{k,t}^2\,\nabla_{X_k}\log p_t(X)]\,d\bar t + g_{k,t}\,d\bar W_k,

where :math:`\nabla_{X_k}\log p_t(X)` is the partial score of the *joint* marginal of all leaves
(each leaf's forward process is independent given the data, so the joint forward transition
factorises and the reverse drift of a leaf needs only its own partial score). This module is that
construction for any tree of leaves (a dict ``{"x": ..., "adj": ...}``, a tuple, nested dicts):
nothing in it is graph-specific. torchnde's core already solves tree-structured states
(:func:`torchnde.solve` flattens the tree; the user's functions see the tree), so the reverse SDE
and probability-flow ODE of the system are ordinary terms, solved by the usual solvers.

Interface (what a graph model, e.g. ``torchnde.generative.graphs``, plugs into)
------------------------------------------------------------------------------

* **Process**: ``mp = MultiProcess({"x": VP(), "adj": VE()}, noise_transform={"adj":
  symmetric_noise}, mask_dims={"x": (1,), "adj": (1, 2)})``. Leaves are
  :class:`~torchnde.generative.processes.DiffusionProcess` objects; every per-leaf option is a tree
  of the same structure, or (for a dict of processes) a dict naming some of the keys (the others
  get ``None``). All leaves must share ``t1``; the system's ``t0`` is the largest leaf ``t0``
  (override either with ``t0=``/``t1=``).
* **State**: a tree with the processes' structure; every leaf a tensor ``(B, ...)`` with the same
  batch size ``B``, dtype and device.
* **Score model**: ``model(t, state)`` -> a tree of the state's structure and shapes holding the
  partial scores :math:`\nabla_{X_k}\log p_t(X)` (``parameterisation="score"``) or the predicted
  standard-normal noise of each leaf (``"eps"``: the score is ``-out / sigma_k(t)``). ``t`` is a
  ``(B,)`` tensor in the state's dtype. **With a mask** (below) the model is called as
  ``model(t, state, mask)`` with the mask exactly as the caller passed it (e.g. the ``(B, N)``
  node mask), so that it can ignore padded entries.
* **Hooks** (generic; GDSS's graphs are one use):

  - ``noise_transform``: per leaf, a *linear* map ``z -> T(z)`` applied to every standard-normal
    draw of that leaf: the forward noising of :func:`multi_dsm_loss` and
    :meth:`MultiProcess.marginal_sample`, the prior draw, the reverse SDE's Brownian increments
    (the solve's path is wrapped), the Langevin corrector's noise and the S4 transitions' noise.
    It must act on the trailing dimensions (draws may carry extra leading dimensions) and keep
    unit variance on the subspace the leaf lives in. :func:`symmetric_noise` is
    :math:`(Z + Z^\top)/\sqrt2` with the diagonal zeroed (a symmetric matrix with zero diagonal
    and standard-normal off-diagonal entries; GDSS's adjacency noise). With the score on the same
    subspace (a symmetric score for a symmetric leaf: the model's job), samples stay on it
    exactly: symmetric with a zero diagonal, to the bit.
  - ``mask``: keeps chosen entries at zero in noise, scores and samples (e.g. padded nodes of
    graphs of different sizes in one batch). Pass ``mask=`` to the sampler / loss either as a
    ``(B, N)`` tensor of 0/1 *item* flags, expanded per leaf along the dimensions ``mask_dims``
    declares (``{"x": (1,), "adj": (1, 2)}``: features of item ``i`` masked by ``mask[:, i]``,
    entry ``(i, j)`` of ``adj`` by ``mask[:, i] * mask[:, j]``; a leaf absent from ``mask_dims``
    is not masked), or as a tree of per-leaf masks broadcastable to each leaf (``None`` for an
    unmasked leaf). Masked entries of every noise draw, every score, the drift and diffusion of
    the reverse SDE and the initial state are multiplied by the mask, so they stay exactly zero.
    The loss averages each leaf's squared error over its unmasked entries only.

* **Sampling**: :func:`multi_sample` (``sampler`` one of :data:`MULTI_SAMPLERS`) returns a
  :class:`MultiSampleResult` whose ``x`` is a tree. Every sampler is one :func:`torchnde.solve`
  call; ``"pc"`` and ``"s4"`` are solver classes (:class:`TreeLangevinCorrector`,
  :class:`S4Solver`) stepping the reverse SDE on a fixed grid.
* **Training**: :func:`multi_dsm_loss`: one time per sample shared by all leaves, each leaf noised
  by its own process, one model call, a weighted sum of per-leaf denoising score matching losses.
* **Oracle**: :class:`JointGaussian` (Gaussian data on a dict of leaves, some symmetric
  zero-diagonal matrices, with any coupling between leaves) has exact partial scores at every
  time under every process with :math:`m(t) = 0`.

The S4 solver
-------------

GDSS's "Symmetric Splitting for System of SDEs" (Section 3.3 of the paper, Algorithm 2 of its
appendix; inspired by the symmetric splitting of Dockhorn et al. 2022, "Score-based generative
modeling with critically-damped Langevin diffusion", ICLR). Our reading: the reverse SDE of each
leaf is split into a *linear* part :math:`dX = f_t(X)\,d\bar t + g_t\,d\bar W` (the forward SDE
run backwards in time; its transition is Gaussian and known exactly) and a *score* part
:math:`dX = -g_t^2\,\nabla\log p_t\,d\bar t`. One step from :math:`t` to :math:`t - h`:

1. one evaluation of the joint score :math:`S = s(t, X)`;
2. a Langevin corrector step with that same score (per leaf, Song et al. 2021's step size from a
   signal-to-noise ratio ``snr``), skipped with ``n_corrector=0``;
3. the exact transition of the linear part over :math:`[t - h/2, t]`:
   :math:`X \leftarrow \frac{\alpha_{t-h/2}}{\alpha_t}(X - m_t) + m_{t-h/2} + \sqrt{v}\,z` with
   :math:`v = (\alpha_{t-h/2}/\alpha_t)^2\sigma_t^2 - \sigma_{t-h/2}^2` (the variance of
   :math:`\int g^2` carried through the linear flow, from :math:`d(\sigma^2/\alpha^2)/dt =
   g^2/\alpha^2`);
4. the score drift over the whole step with the score of 1.: :math:`X \leftarrow X + h\,
   g_t^2\,S`;
5. the exact transition over :math:`[t - h, t - h/2]`.

One score evaluation per step (the corrector and the drift share it), against two for a
predictor–corrector step with one corrector. The GDSS code (``solver.py``) computes the score at
the start of the step before the correction and weights it by :math:`h\,g_t^2` at the step's
start, as here. (We tried the exact :math:`\int g^2` over the step instead, by Simpson's rule: with
the score frozen at the step's start it was less accurate on the Gaussian oracle, e.g. relative
covariance error 0.13 against 0.04 at 32 steps with a VE leaf; :math:`g_t^2` pairs with
:math:`s_t`.) Its VP transition uses the variance :math:`1 - e^{-\int\beta}` where the exact
transition of the split linear SDE has :math:`e^{\int\beta} - 1` (equal to first order in the
step); we use the exact one. Its corrector multiplies the step size by the discrete VP
:math:`\alpha_i = 1 - \beta_i/N` and has a noise scale ``scale_eps``; ours is the step size of
:class:`~torchnde.generative.samplers.LangevinCorrector` (no :math:`\alpha_i`, no extra scale).
The transitions' normals are the Brownian increments of the solve's path over the two half steps
(normalised), so S4 runs inside :func:`torchnde.solve` on the reverse-SDE term like any SDE
solver. Like every explicit scheme it needs small enough steps: the frozen-score step multiplies a
Gaussian leaf by about :math:`1 - h g^2/\mathrm{Var}`, so with VP's :math:`\beta_{max} = 20` and
4 steps it diverges (8 and more are fine on the oracle).
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
from .._terms import ControlTerm, MultiTerm, ODETerm
from .._tree import _unflatten_structure
from ..controllers import PIDController, StepTo
from ..paths import BrownianGrid, VirtualBrownianTree
from ..paths._base import AbstractBrownianPath, BrownianIncrement
from ..solvers import Euler, SPaRK, Tsit5
from ..solvers._base import AbstractSolver, linear_coeffs
from .objectives import _weight
from .processes import DiffusionProcess, expand_time
from .samplers import _ADAPTIVE, _DEFAULT_TOL, _check_nfe, _FixedHeun, _steps_for, _times_grid

__all__ = [
    "MultiProcess",
    "JointScore",
    "symmetric_noise",
    "multi_sample",
    "MultiSampleResult",
    "multi_dsm_loss",
    "S4Solver",
    "TreeLangevinCorrector",
    "JointGaussian",
    "MULTI_SAMPLERS",
]

#: the samplers of :func:`multi_sample`
MULTI_SAMPLERS = ("euler_maruyama", "pc", "s4", "pf_euler", "pf_heun", "pf_adaptive", "sde_adaptive")
_LOSS_WEIGHTINGS = ("eps", "score")


# ------------------------------------------------------------------------------------- hooks
def symmetric_noise(z: torch.Tensor) -> torch.Tensor:
    r""":math:`(Z + Z^\top)/\sqrt2` over the last two dimensions, with the diagonal set to zero.

    For ``z`` standard normal, the result is a symmetric matrix (to the bit) with a zero diagonal
    and standard-normal off-diagonal entries, independent above the diagonal: the noise of a
    leaf that lives on symmetric zero-diagonal matrices (GDSS's adjacency). A linear map, so it
    turns Brownian increments into Brownian increments on that subspace. Extra leading dimensions
    are kept."""
    if z.dim() < 2 or z.shape[-1] != z.shape[-2]:
        raise ValueError(
            f"symmetric_noise needs square matrices in the last two dimensions, got shape {tuple(z.shape)}"
        )
    s = (z + z.transpose(-1, -2)) * (1 / math.sqrt(2))
    return s - torch.diag_embed(s.diagonal(dim1=-2, dim2=-1))


# ------------------------------------------------------------------------------ tree helpers
def _path_name(path: tuple) -> str:
    return "".join(f"[{k!r}]" for k in path) or "<root>"


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)}"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        return (
            ("(" if isinstance(x, tuple) else "[")
            + ", ".join(_describe(v) for v in x)
            + (")" if isinstance(x, tuple) else "]")
        )
    return type(x).__name__


def _walk(ref, tree, path: tuple, out: list, what: str, root) -> None:
    """Append to ``out`` the parts of ``tree`` at the leaf positions of ``ref`` (dict keys in sorted
    order, as :func:`torchnde._tree.tree_leaves`); ValueError if the structures differ."""
    if isinstance(ref, dict):
        if not isinstance(tree, dict) or set(tree) != set(ref):
            got = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
            raise ValueError(
                f"{what} does not match the processes' tree at {_path_name(path)}: expected a dict with keys "
                f"{sorted(ref)}, got {got} (in {_describe(root)})"
            )
        for k in sorted(ref):
            _walk(ref[k], tree[k], (*path, k), out, what, root)
    elif isinstance(ref, (tuple, list)):
        if not isinstance(tree, (tuple, list)) or len(tree) != len(ref):
            got = (
                f"{type(tree).__name__} of length {len(tree)}"
                if isinstance(tree, (tuple, list))
                else type(tree).__name__
            )
            raise ValueError(
                f"{what} does not match the processes' tree at {_path_name(path)}: expected a "
                f"{type(ref).__name__} of length {len(ref)}, got {got} (in {_describe(root)})"
            )
        for i, (r, x) in enumerate(zip(ref, tree)):
            _walk(r, x, (*path, i), out, what, root)
    else:
        out.append(tree)


def _leaf_paths(ref, path=()) -> list:
    if isinstance(ref, dict):
        return [p for k in sorted(ref) for p in _leaf_paths(ref[k], (*path, k))]
    if isinstance(ref, (tuple, list)):
        return [p for i, r in enumerate(ref) for p in _leaf_paths(r, (*path, i))]
    return [path]


def _coeff(c) -> float:
    return float(c)


# --------------------------------------------------------------------------------- the process
class MultiProcess:
    r"""A system of forward diffusion processes, one per leaf of a tree-structured state.

    Args:
        processes: a tree (dict / tuple / list, nested) whose leaves are
            :class:`~torchnde.generative.processes.DiffusionProcess` objects, e.g.
            ``{"x": VP(), "adj": VE()}``.
        noise_transform: per leaf, ``None`` or a linear map ``T(z)`` applied to every standard
            normal draw of that leaf (see the module docstring; :func:`symmetric_noise`).
        mask_dims: per leaf, ``None`` or the dimensions (of the leaf, batch dimension 0) along
            which a ``(B, N)`` item mask applies, e.g. ``{"x": (1,), "adj": (1, 2)}``.
        t0, t1: the system's time range (default: the largest leaf ``t0``; the leaves' common
            ``t1``, which they must share).

    Per-leaf options take a tree of the processes' structure or, for a dict of processes, a
    dict naming some of its keys.

    Raises:
        TypeError: a leaf is not a ``DiffusionProcess``, or a transform is not callable.
        ValueError: the leaves' ``t1`` differ (pass ``t1=``), an option's tree does not match.
    """

    def __init__(self, processes, *, noise_transform=None, mask_dims=None, t0: float | None = None, t1=None):
        self.processes = processes
        self._paths = _leaf_paths(processes)
        procs: list = []
        _walk(processes, processes, (), procs, "processes", processes)
        if not procs:
            raise ValueError("MultiProcess needs at least one process")
        for p, path in zip(procs, self._paths):
            if not isinstance(p, DiffusionProcess):
                raise TypeError(
                    f"every leaf of processes must be a DiffusionProcess such as VP(); the leaf "
                    f"{_path_name(path)} is {type(p).__name__}"
                )
        self._procs = procs
        self._structure = _structure_of(processes)
        self._transforms = self._per_leaf(noise_transform, "noise_transform")
        for f, path in zip(self._transforms, self._paths):
            if f is not None and not callable(f):
                raise TypeError(f"noise_transform{_path_name(path)} must be callable z -> T(z), got {type(f).__name__}")
        dims = self._per_leaf(mask_dims, "mask_dims")
        self._mask_dims = []
        for d, path in zip(dims, self._paths):
            if d is None:
                self._mask_dims.append(None)
                continue
            d = (d,) if isinstance(d, numbers.Integral) else tuple(d)
            if not d or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 1 for i in d):
                raise ValueError(
                    f"mask_dims{_path_name(path)} must be dimensions >= 1 of the leaf (0 is the batch), got {d!r}"
                )
            self._mask_dims.append(tuple(int(i) for i in d))
        t1s = [p.t1 for p in procs]
        if t1 is None:
            if max(t1s) - min(t1s) > 1e-12 * max(1.0, abs(max(t1s))):
                raise ValueError(
                    f"the leaves' processes end at different times t1={dict(zip(map(_path_name, self._paths), t1s))}; "
                    "build them with the same t1 or pass MultiProcess(..., t1=...)"
                )
            t1 = t1s[0]
        self.t1 = float(t1)
        self.t0 = float(max(p.t0 for p in procs)) if t0 is None else float(t0)
        if not self.t0 < self.t1:
            raise ValueError(f"need t0 < t1, got t0={self.t0}, t1={self.t1}")

    def __repr__(self):
        return f"MultiProcess({self.processes!r}, t0={self.t0}, t1={self.t1})"

    # -- trees -------------------------------------------------------------------------------
    @property
    def num_leaves(self) -> int:
        return len(self._procs)

    @property
    def leaf_processes(self) -> list:
        """The processes in leaf order (dict keys sorted)."""
        return list(self._procs)

    def _per_leaf(self, value, name: str) -> list:
        n = len(self._procs)
        if value is None:
            return [None] * n
        if isinstance(self.processes, dict) and isinstance(value, dict):
            extra = set(value) - set(self.processes)
            if extra:
                raise ValueError(
                    f"{name} names keys {sorted(extra)} that are not leaves of processes {sorted(self.processes)}"
                )
            value = {k: value.get(k, _none_like(self.processes[k])) for k in self.processes}
            value = {k: _none_like(self.processes[k]) if v is None else v for k, v in value.items()}
        out: list = []
        _walk(self.processes, value, (), out, name, value)
        return out

    def leaves(self, tree, what: str = "the state") -> list:
        """The leaves of ``tree`` (a tree of the processes' structure) in leaf order."""
        out: list = []
        _walk(self.processes, tree, (), out, what, tree)
        return out

    def unflatten(self, leaves: list):
        """The tree of the processes' structure holding ``leaves`` (in leaf order)."""
        return _unflatten_structure(self._structure, list(leaves))

    def check_state(self, tree, what: str = "the state") -> list:
        """The leaves of a state, checked: tensors, one batch size, one dtype and device."""
        xs = self.leaves(tree, what)
        for x, path in zip(xs, self._paths):
            if not isinstance(x, torch.Tensor) or x.dim() < 1:
                raise TypeError(f"{what}{_path_name(path)} must be a tensor of shape (batch, ...), got {_describe(x)}")
        b = {x.shape[0] for x in xs}
        if len(b) != 1:
            raise ValueError(
                f"every leaf of {what} needs the same batch size (first dimension); got "
                f"{ {_path_name(p): tuple(x.shape) for p, x in zip(self._paths, xs)} }"
            )
        first = xs[0]
        for x in xs[1:]:
            if x.dtype != first.dtype or x.device != first.device:
                raise TypeError(
                    f"every leaf of {what} must share one dtype and device; got "
                    f"{[(str(x.dtype), str(x.device)) for x in xs]}"
                )
        return xs

    def shapes(self, shapes) -> list:
        """The leaf shapes of a tree of shapes (tuples of ints at the processes' leaves)."""
        out: list = []
        _walk(self.processes, shapes, (), out, "shapes", shapes)
        res = []
        for s, path in zip(out, self._paths):
            if isinstance(s, torch.Size):
                s = tuple(s)
            if (
                not isinstance(s, (tuple, list))
                or not s
                or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in s)
            ):
                raise ValueError(f"shapes{_path_name(path)} must be a shape (batch, ...) of ints, got {s!r}")
            res.append(tuple(int(i) for i in s))
        if len({s[0] for s in res}) != 1:
            raise ValueError(f"every leaf shape needs the same batch size (first dimension); got {res}")
        return res

    # -- masks and noise ---------------------------------------------------------------------
    def leaf_masks(self, mask, xs: list) -> list:
        """Per-leaf masks broadcastable to the leaves ``xs`` (in their dtype), from a ``(B, N)``
        item mask (expanded along ``mask_dims``) or a tree of per-leaf masks; ``None`` entries
        for unmasked leaves. ValueError on a wrong shape."""
        n = len(xs)
        if mask is None:
            return [None] * n
        if isinstance(mask, torch.Tensor):
            if all(d is None for d in self._mask_dims):
                raise ValueError(
                    "a (B, N) mask tensor needs MultiProcess(..., mask_dims=...) to say which dimensions of "
                    "each leaf it masks (or pass a tree of per-leaf masks)"
                )
            b = xs[0].shape[0]
            if mask.dim() != 2 or mask.shape[0] != b:
                raise ValueError(f"mask must have shape (batch, N) = ({b}, N), got {tuple(mask.shape)}")
            out = []
            for x, d, path in zip(xs, self._mask_dims, self._paths):
                if d is None:
                    out.append(None)
                    continue
                m = mask.to(dtype=x.dtype, device=x.device)
                full = None
                for i in d:
                    if i >= x.dim() or x.shape[i] != mask.shape[1]:
                        raise ValueError(
                            f"mask of shape {tuple(mask.shape)} masks dimension {i} of the leaf {_path_name(path)} "
                            f"(mask_dims), but that leaf has shape {tuple(x.shape)}: dimension {i} must have size "
                            f"{mask.shape[1]}"
                        )
                    view = [1] * x.dim()
                    view[0], view[i] = b, mask.shape[1]
                    mi = m.view(view)
                    full = mi if full is None else full * mi
                out.append(full)
            return out
        ms = self._per_leaf(mask, "mask")
        out = []
        for m, x, path in zip(ms, xs, self._paths):
            if m is None:
                out.append(None)
                continue
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"mask{_path_name(path)} must be a tensor or None, got {type(m).__name__}")
            try:
                ok = torch.broadcast_shapes(m.shape, x.shape) == x.shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(
                    f"mask{_path_name(path)} of shape {tuple(m.shape)} does not broadcast to the leaf's shape {tuple(x.shape)}"
                )
            out.append(m.to(dtype=x.dtype, device=x.device))
        return out

    def apply_noise_hooks(self, zs: list, masks: list) -> list:
        """``noise_transform`` then the mask, leaf by leaf, on standard-normal draws ``zs``."""
        out = []
        for z, f, m in zip(zs, self._transforms, masks):
            if f is not None:
                z = f(z)
            if m is not None:
                z = z * m
            out.append(z)
        return out

    def _noise_leaves(self, xs: list, masks: list, generator=None) -> list:
        zs = [torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) for x in xs]
        return self.apply_noise_hooks(zs, masks)

    def noise(self, like, *, mask=None, generator=None):
        """Standard-normal noise shaped like the state ``like``, through the hooks (a tree)."""
        xs = self.check_state(like, "like")
        return self.unflatten(self._noise_leaves(xs, self.leaf_masks(mask, xs), generator))

    # -- forward -----------------------------------------------------------------------------
    def marginal_sample(self, t, x0, *, eps=None, mask=None, generator=None):
        """A draw of the state at time ``t`` (float or ``(B,)``) given data ``x0``: each leaf
        through its own process, with noise ``eps`` (a tree, drawn through the hooks if omitted;
        a given ``eps`` is used as it is)."""
        xs = self.check_state(x0, "x0")
        masks = self.leaf_masks(mask, xs)
        es = self._noise_leaves(xs, masks, generator) if eps is None else self._eps_leaves(eps, xs)
        return self.unflatten(self._marginal_leaves(t, xs, es, masks))

    def _eps_leaves(self, eps, xs):
        es = self.leaves(eps, "eps")
        for e, x, path in zip(es, xs, self._paths):
            if not isinstance(e, torch.Tensor) or e.shape != x.shape:
                raise ValueError(
                    f"eps{_path_name(path)} must have the data's shape {tuple(x.shape)}, got {_describe(e)}"
                )
        return es

    def _marginal_leaves(self, t, xs, es, masks):
        out = []
        for p, x, e, m in zip(self._procs, xs, es, masks):
            y = p.marginal_sample(t, x, e)
            out.append(y if m is None else y * m)
        return out

    def prior_sample(self, shapes, *, mask=None, generator=None, dtype=torch.float32, device=None):
        """A draw from every leaf's prior (through the noise hooks), a tree."""
        ss = self.shapes(shapes)
        zs = [torch.randn(s, generator=generator, dtype=dtype, device=device) for s in ss]
        masks = self.leaf_masks(mask, zs)
        zs = self.apply_noise_hooks(zs, masks)
        out = []
        for p, z, m in zip(self._procs, zs, masks):
            y = z * p.prior_std() + p.prior_mean(z)
            out.append(y if m is None else y * m)
        return self.unflatten(out)

    # -- reverse -----------------------------------------------------------------------------
    def score(self, model: Callable, *, parameterisation: str = "score", mask=None) -> JointScore:
        """``model`` as the joint score function of this system (see :class:`JointScore`)."""
        return JointScore(self, model, parameterisation=parameterisation, mask=mask)

    def _drift_leaves(self, score: JointScore, t, xs: list, c: float) -> list:
        ss = score.leaves(t, xs)
        out = []
        for p, x, s, m in zip(self._procs, xs, ss, score.masks_for(xs)):
            g2 = p.diffusion2(t)
            g2 = g2 if not isinstance(g2, torch.Tensor) else expand_time(g2, x)
            d = p.drift(t, x) - (c * g2) * s
            out.append(d if m is None else d * m)
        return out

    def reverse_drift(self, score: JointScore, t, x):
        r"""The drift of the reverse system, leaf by leaf :math:`f_k - g_k^2 s_k` (a tree)."""
        return self.unflatten(self._drift_leaves(score, t, self.leaves(x), 1.0))

    def pf_drift(self, score: JointScore, t, x):
        r"""The probability-flow velocity, leaf by leaf :math:`f_k - \tfrac12 g_k^2 s_k`."""
        return self.unflatten(self._drift_leaves(score, t, self.leaves(x), 0.5))

    def probability_flow(self, score: JointScore) -> ODETerm:
        """The probability-flow ODE of the system as an :class:`~torchnde.ODETerm` on the tree."""

        def probability_flow(t, x, args=None):
            return self.unflatten(self._drift_leaves(score, t, self.leaves(x), 0.5))

        return ODETerm(probability_flow, time_as_float=True)

    def reverse_sde(self, score: JointScore, path) -> MultiTerm:
        r"""The reverse-time system :math:`dX_k = [f_k - g_k^2 s_k]\,dt + g_k\,d\bar W_k` as a
        :class:`~torchnde.MultiTerm` on the tree (diagonal additive noise). ``path`` is a
        Brownian path with the state's tree of shapes; its increments go through the noise
        transforms (the path is wrapped) and the diffusion carries the masks."""
        noisy = _HookedPath(path, self) if any(f is not None for f in self._transforms) else path

        def reverse_drift(t, x, args=None):
            return self.unflatten(self._drift_leaves(score, t, self.leaves(x), 1.0))

        def diffusion(t, x, args=None):
            xs = self.leaves(x)
            out = []
            for p, leaf, m in zip(self._procs, xs, score.masks_for(xs)):
                g = p.diffusion(t)
                g = (
                    torch.full_like(leaf, g)
                    if not isinstance(g, torch.Tensor)
                    else torch.ones_like(leaf) * expand_time(g, leaf)
                )
                out.append(g if m is None else g * m)
            return self.unflatten(out)

        drift = ODETerm(reverse_drift, time_as_float=True)
        noise = ControlTerm(diffusion, noisy, noise="diagonal", additive=True, calculus="ito", time_as_float=True)
        return MultiTerm(drift, noise)

    def linear_transition(self, k: int, s: float, e: float, x: torch.Tensor, z: torch.Tensor | None):
        r"""Leaf ``k`` moved by the exact transition of the linear part :math:`dX = f\,dt + g\,dW`
        of its reverse SDE from time ``s`` down to ``e < s``:
        :math:`\frac{\alpha_e}{\alpha_s}(X - m_s) + m_e + \sqrt{v}\,z`,
        :math:`v = (\alpha_e/\alpha_s)^2\sigma_s^2 - \sigma_e^2` (``z`` standard normal through
        the hooks; ``None``: the mean only)."""
        p = self._procs[k]
        a_s, sig_s = map(_coeff, p.marginal(s))
        a_e, sig_e = map(_coeff, p.marginal(e))
        r = a_e / a_s
        v = max((r * sig_s) ** 2 - sig_e**2, 0.0)
        ms, me = p.mean_offset(s, x), p.mean_offset(e, x)
        y = x * r if (isinstance(ms, float) and ms == 0.0) else (x - ms) * r
        if not (isinstance(me, float) and me == 0.0):
            y = y + me
        if z is not None and v > 0:
            y = torch.add(y, z, alpha=math.sqrt(v))
        return y


def _none_like(ref):
    if isinstance(ref, dict):
        return {k: _none_like(v) for k, v in ref.items()}
    if isinstance(ref, (tuple, list)):
        return type(ref)(_none_like(v) for v in ref)
    return None


def _structure_of(ref):
    if isinstance(ref, dict):
        return {k: _structure_of(v) for k, v in ref.items()}
    if isinstance(ref, tuple) and hasattr(ref, "_fields"):
        return type(ref)(*(_structure_of(v) for v in ref))
    if isinstance(ref, (tuple, list)):
        return type(ref)(_structure_of(v) for v in ref)
    return None


class _HookedPath(AbstractBrownianPath):
    """A Brownian path whose increments go through a :class:`MultiProcess`'s noise transforms
    (linear maps, so the result is again Brownian motion, on the leaves' subspaces)."""

    levy_area = None

    def __init__(self, base: AbstractBrownianPath, mp: MultiProcess):
        if getattr(base, "levy_area", None) is not None:
            raise ValueError("noise transforms apply to plain Brownian increments; build the path without levy_area")
        self.base, self.mp = base, mp
        self.t0, self.t1, self.shape = base.t0, base.t1, base.shape

    def _map(self, w):
        return self.mp.unflatten(
            self.mp.apply_noise_hooks(self.mp.leaves(w, "the Brownian increment"), [None] * self.mp.num_leaves)
        )

    def evaluate(self, s, t=None):
        return self._map(self.base.evaluate(s, t))

    def increment(self, s, t) -> BrownianIncrement:
        inc = self.base.increment(s, t)
        return BrownianIncrement(inc.dt, self._map(inc.W))

    def __repr__(self):
        return f"Hooked({self.base!r})"


# -------------------------------------------------------------------------------- joint score
class JointScore:
    r"""A joint score model of a :class:`MultiProcess` seen as the partial scores of every leaf.

    ``model(t, state)`` (or ``model(t, state, mask)`` when ``mask`` is given) returns a tree of
    the state's structure: the partial scores (``parameterisation="score"``) or each leaf's
    predicted noise (``"eps"``; score ``-out / sigma_k(t)``). Calls count in ``calls``; the
    output's structure and shapes are checked on the first call; scores are multiplied by the
    leaf masks. ``t`` may be a float (sent to the model as a ``(B,)`` tensor in the state's dtype)
    or a ``(B,)`` tensor.
    """

    def __init__(self, mp: MultiProcess, model: Callable, *, parameterisation: str = "score", mask=None):
        if not callable(model):
            raise TypeError(f"the model must be callable as model(t, state), got {type(model).__name__}")
        if parameterisation not in ("score", "eps"):
            raise ValueError(f"parameterisation must be 'score' or 'eps' for a joint model, got {parameterisation!r}")
        self.mp, self.model, self.kind, self.mask = mp, model, parameterisation, mask
        self.calls = 0
        self._checked = False
        self._masks = None  # (key, masks): the leaf masks of the last state's shapes
        self._times: dict = {}

    def masks_for(self, xs: list) -> list:
        """The leaf masks for states shaped like ``xs`` (cached)."""
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in xs)
        if self._masks is None or self._masks[0] != key:
            self._masks = (key, self.mp.leaf_masks(self.mask, xs))
        return self._masks[1]

    def _time(self, t, x: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            t = t.to(dtype=x.dtype, device=x.device)
            return t.expand(x.shape[0]) if t.dim() == 0 else t
        key = (float(t), x.shape[0], x.dtype, x.device)
        tt = self._times.get(key)
        if tt is None or tt._version:
            if len(self._times) > 4096:
                self._times.clear()
            tt = self._times[key] = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        return tt

    def leaves(self, t, xs: list) -> list:
        """The partial scores at time ``t`` of the state with leaves ``xs`` (leaf order)."""
        self.calls += 1
        state = self.mp.unflatten(xs)
        tt = self._time(t, xs[0])
        out = self.model(tt, state) if self.mask is None else self.model(tt, state, self.mask)
        outs = self.mp.leaves(out, "the score model's output")
        if not self._checked:
            for o, x, path in zip(outs, xs, self.mp._paths):
                if not isinstance(o, torch.Tensor) or o.shape != x.shape:
                    raise ValueError(
                        f"the score model's output{_path_name(path)} must have the state leaf's shape "
                        f"{tuple(x.shape)}, got {_describe(o)}"
                    )
            self._checked = True
        masks = self.masks_for(xs)
        res = []
        for p, o, x, m in zip(self.mp._procs, outs, xs, masks):
            if self.kind == "eps":
                _, sig = p.marginal(t)
                o = o * (-1.0 / sig) if not isinstance(sig, torch.Tensor) else -o / expand_time(sig, x)
            res.append(o if m is None else o * m)
        return res

    def __call__(self, t, state):
        return self.mp.unflatten(self.leaves(t, self.mp.leaves(state)))


# -------------------------------------------------------------------------------- solvers
def _per_leaf_floats(mp: MultiProcess, value, name: str) -> list:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        vals = [float(value)] * mp.num_leaves
    else:
        vals = [v for v in mp._per_leaf(value, name)]
        if any(v is None for v in vals):
            raise ValueError(f"{name} must be a number or give a number for every leaf, got {value!r}")
        vals = [float(v) for v in vals]
    for v in vals:
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    return vals


def _langevin(mp: MultiProcess, xs: list, ss: list, zs: list, snrs: list) -> list:
    r"""One Langevin step :math:`x + \epsilon s + \sqrt{2\epsilon} z` per leaf with
    :math:`\epsilon = 2(r\,\overline{\|z\|}/\overline{\|s\|})^2` (norms averaged over the batch,
    as :class:`~torchnde.generative.samplers.LangevinCorrector`)."""
    out = []
    for x, s, z, r in zip(xs, ss, zs, snrs):
        b = x.shape[0]
        gn = s.reshape(b, -1).norm(dim=-1).mean()
        zn = z.reshape(b, -1).norm(dim=-1).mean()
        eps = 2 * (r * zn / gn.clamp(min=torch.finfo(x.dtype).tiny)) ** 2
        out.append(x + eps * s + torch.sqrt(2 * eps) * z)
    return out


class _TreeSolver(AbstractSolver):
    order: ClassVar = None
    dense_order: ClassVar = 1
    strong_order: ClassVar = {"additive": 0.5}
    calculus: ClassVar = "ito"

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def init(self, term, t0, y0):
        return None

    def dense_coeffs(self, term, dense_info):
        return linear_coeffs(*dense_info)

    def _corrector_noise(self, s: float, e: float, masks: list) -> list:
        """The corrector's normals over the step (``n_corrector`` leading rows per leaf)."""
        w = self.mp.leaves(self.noise.evaluate(min(s, e), max(s, e)), "the corrector's noise")
        scale = 1 / math.sqrt(abs(s - e))
        return self.mp.apply_noise_hooks([x * scale for x in w], masks)


class TreeLangevinCorrector(_TreeSolver):
    r"""Predictor–corrector step of a :class:`MultiProcess`'s reverse SDE (Song et al. 2021,
    Algorithms 4–5, for a tree of leaves; GDSS's "PC sampler"): ``n_corrector`` Langevin steps
    at the step's start time, each with one evaluation of the joint score and a step size per
    leaf from the leaf's signal-to-noise ratio ``snr`` (a number, or one per leaf), then one
    Euler–Maruyama step of the reverse SDE (one more evaluation). The corrector's normals come
    from ``noise``, a Brownian path with shape ``(n_corrector, *leaf_shape)`` per leaf (its
    increments normalised), through the noise hooks. Fixed steps, shared times only.
    """

    def __init__(self, mp: MultiProcess, score: JointScore, noise, *, snr=0.16, n_corrector: int = 1):
        if isinstance(n_corrector, bool) or not isinstance(n_corrector, numbers.Integral) or n_corrector < 1:
            raise ValueError(f"n_corrector must be an int >= 1, got {n_corrector!r}")
        self.mp, self.score, self.noise, self.n_corrector = mp, score, noise, int(n_corrector)
        self.snr = _per_leaf_floats(mp, snr, "snr")

    def __repr__(self):
        return f"TreeLangevinCorrector(snr={self.snr}, n_corrector={self.n_corrector})"

    def step(self, term, t0, t1, y0, state):
        if not isinstance(t0, float):
            raise NotImplementedError("the predictor-corrector sampler does not support per_sample=True")
        mp = self.mp
        s, e = term.sign * t0, term.sign * t1
        xs = mp.leaves(term.flat.state_to_tree(y0))
        masks = self.score.masks_for(xs)
        zs = self._corrector_noise(s, e, masks)
        for j in range(self.n_corrector):
            xs = _langevin(mp, xs, self.score.leaves(s, xs), [z[j] for z in zs], self.snr)
        y = term.flat.tree_to_state(mp.unflatten(xs))
        y1 = y + term.vf_prod(t0, y, term.contr(t0, t1))
        return y1, None, (y0, y1), None, None


class S4Solver(_TreeSolver):
    r"""GDSS's S4 solver (Jo, Lee & Hwang 2022, Section 3.3 and Algorithm 2): per step one joint
    score evaluation, a Langevin corrector with it (``n_corrector=1``; ``0`` skips it), then a
    Strang splitting of the reverse SDE: the exact transition of each leaf's linear part over
    half the step, a score-drift step over the whole step with the same score, the exact
    transition over the other half. See the module docstring for the equations and how this
    reading compares with the paper's code.

    The transitions' normals are the Brownian increments of the solve's path (the reverse-SDE
    term's, through the noise hooks) over the two half steps, normalised: the path's grid must
    hold the steps' midpoints (:func:`multi_sample` builds it so). The corrector's come from
    ``noise`` (a path with a leading dimension 1 per leaf). Fixed steps, shared times only.
    """

    def __init__(self, mp: MultiProcess, score: JointScore, noise=None, *, snr=0.16, n_corrector: int = 1):
        if n_corrector not in (0, 1) or isinstance(n_corrector, bool):
            raise ValueError(
                f"S4 makes at most one corrector step (it reuses the step's one score evaluation); got "
                f"n_corrector={n_corrector!r}. Use sampler='pc' for more"
            )
        if n_corrector and noise is None:
            raise ValueError("S4Solver with n_corrector=1 needs the corrector's noise path")
        self.mp, self.score, self.noise, self.n_corrector = mp, score, noise, int(n_corrector)
        self.snr = _per_leaf_floats(mp, snr, "snr")

    def __repr__(self):
        return f"S4Solver(snr={self.snr}, n_corrector={self.n_corrector})"

    def step(self, term, t0, t1, y0, state):
        if not isinstance(t0, float):
            raise NotImplementedError("the S4 solver does not support per_sample=True")
        mp = self.mp
        sign = term.sign
        s, e = sign * t0, sign * t1  # real times, s > e when sampling
        tm = 0.5 * (t0 + t1)  # internal midpoint
        m = sign * tm
        h = s - e
        xs = mp.leaves(term.flat.state_to_tree(y0))
        masks = self.score.masks_for(xs)
        ss = self.score.leaves(s, xs)  # the step's one evaluation
        if self.n_corrector:
            zs = self._corrector_noise(s, e, masks)
            xs = _langevin(mp, xs, ss, [z[0] for z in zs], self.snr)
        w1 = mp.leaves(term.noise(t0, tm), "the Brownian increment")
        w2 = mp.leaves(term.noise(tm, t1), "the Brownian increment")
        c1, c2 = 1 / math.sqrt(abs(tm - t0)), 1 / math.sqrt(abs(t1 - tm))
        out = []
        for k, (x, sk, a, b, mk) in enumerate(zip(xs, ss, w1, w2, masks)):
            x = mp.linear_transition(k, s, m, x, a * c1 if mk is None else a * (c1 * mk))
            x = torch.add(x, sk, alpha=h * _coeff(mp._procs[k].diffusion2(s)))
            x = mp.linear_transition(k, m, e, x, b * c2 if mk is None else b * (c2 * mk))
            out.append(x if mk is None else x * mk)
        y1 = term.flat.tree_to_state(mp.unflatten(out))
        return y1, None, (y0, y1), None, None


# ---------------------------------------------------------------------------------- sampling
@dataclass
class MultiSampleResult:
    """What :func:`multi_sample` returns.

    Attributes:
        x: the samples, a tree of the processes' structure.
        nfe: joint-model evaluations made (the corrector's included).
        num_steps: solver steps taken.
        solution: the :class:`~torchnde.Solution` of the solve.
    """

    x: Any
    nfe: int
    num_steps: Any
    solution: Solution


def multi_sample(
    model: Callable,
    process: MultiProcess,
    shapes,
    *,
    nfe: int | None = None,
    sampler: str = "euler_maruyama",
    parameterisation: str = "score",
    mask=None,
    seed: int | None = None,
    x_init=None,
    times=None,
    dtype: torch.dtype = torch.float32,
    device=None,
    snr=0.16,
    n_corrector: int = 1,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int | None = None,
    progress=None,
    denoise: bool = False,
) -> MultiSampleResult:
    r"""Draw samples of a multi-component system by solving its coupled reverse SDE or
    probability-flow ODE with one :func:`torchnde.solve` call.

    Args:
        model: the joint score model (see the module docstring for its signature).
        process: the :class:`MultiProcess`.
        shapes: a tree of leaf shapes ``(batch, ...)`` of the processes' structure (ignored
            with ``x_init``).
        nfe: budget of model evaluations (fixed-grid samplers): ``"euler_maruyama"``,
            ``"pf_euler"`` and ``"s4"`` take ``nfe`` steps (S4: one evaluation per step, its
            corrector included), ``"pc"`` ``nfe // (1 + n_corrector)``, ``"pf_heun"`` ``nfe // 2``.
        sampler: one of :data:`MULTI_SAMPLERS`: ``"euler_maruyama"`` (reverse SDE,
            Euler–Maruyama), ``"pc"`` (:class:`TreeLangevinCorrector`), ``"s4"``
            (:class:`S4Solver`), ``"pf_euler"``/``"pf_heun"``/``"pf_adaptive"`` (probability-flow
            ODE: Euler, Heun, Tsit5 with a PID controller), ``"sde_adaptive"`` (reverse SDE,
            SPaRK with a PID controller on a virtual Brownian tree; no noise transforms).
        parameterisation: ``"score"`` or ``"eps"`` (per leaf, see :class:`JointScore`).
        mask: a ``(B, N)`` item mask or a tree of leaf masks (see the module docstring); the
            model is then called as ``model(t, state, mask)``.
        seed: seeds the prior draw and the Brownian paths (``None``: from torch's global RNG).
        x_init: the starting state (a tree) instead of a prior draw (masked if ``mask`` is given).
        times: a decreasing grid of step times (fixed-grid samplers; overrides ``nfe``'s uniform
            grid from ``process.t1`` to ``process.t0``).
        dtype, device: of the samples (ignored with ``x_init``).
        snr: the Langevin corrector's signal-to-noise ratio (``"pc"``, ``"s4"``): a number or
            one per leaf.
        n_corrector: corrector steps per step (``"pc"``: >= 1; ``"s4"``: 0 or 1).
        rtol, atol: tolerances of the adaptive samplers (defaults 1e-5 for the ODE, 1e-2 for the
            SDE).
        max_steps, progress: passed to ``solve``.
        denoise: replace the result by its posterior mean under the model, one more evaluation
            at the final time ``t``: :math:`E[X_0 \mid X_t] = (X_t - m(t) + \sigma^2 s)/\alpha`
            per leaf (Tweedie's formula; Efron 2011, "Tweedie's formula and selection bias"),
            which removes the noise of level :math:`\sigma(t)` the samples still carry.

    Returns:
        :class:`MultiSampleResult`.

    Raises:
        ValueError: unknown sampler, mismatched trees or shapes, a bad mask, ``nfe`` too small.
    """
    if sampler not in MULTI_SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {MULTI_SAMPLERS}")
    if not isinstance(process, MultiProcess):
        raise TypeError(f"process must be a MultiProcess, got {type(process).__name__}")
    fixed = sampler not in _ADAPTIVE
    t_start, t_end = process.t1, process.t0
    if fixed:
        if times is None:
            n = _steps_for(sampler, _check_nfe(sampler, nfe), n_corrector)
            grid = torch.linspace(t_start, t_end, n + 1, dtype=torch.float64)
        else:
            grid = _times_grid(times)
            t_start, t_end = float(grid[0]), float(grid[-1])
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    seed = int(seed)
    if x_init is None:
        dev = torch.device(device) if device is not None else torch.get_default_device()
        gen = torch.Generator(device=dev).manual_seed(seed)
        x = process.prior_sample(shapes, mask=mask, generator=gen, dtype=dtype, device=dev)
        xs = process.leaves(x)
    else:
        xs = process.check_state(x_init, "x_init")
        masks = process.leaf_masks(mask, xs)
        xs = [v if m is None else v * m for v, m in zip(xs, masks)]
        x = process.unflatten(xs)
    process.leaf_masks(mask, xs)  # shape errors up front
    score = process.score(model, parameterisation=parameterisation, mask=mask)
    shape_tree = process.unflatten([tuple(v.shape) for v in xs])
    dt, dv = xs[0].dtype, xs[0].device

    def path_on(ts, s, extra=()):
        shp = process.unflatten([(*extra, *v.shape) for v in xs]) if extra else shape_tree
        return BrownianGrid(ts, shp, seed=s, dtype=dt, device=dv)

    if sampler == "sde_adaptive":
        if any(f is not None for f in process._transforms):
            raise ValueError("sampler='sde_adaptive' does not support noise transforms; use a fixed-grid sampler")
        step = SPaRK()
        path = VirtualBrownianTree(t_end, t_start, shape_tree, seed=seed, dtype=dt, device=dv, levy_area=step.levy_area)
        terms = process.reverse_sde(score, path)
    elif sampler in ("euler_maruyama", "pc"):
        terms = process.reverse_sde(score, path_on(grid.flip(0), seed))
        if sampler == "pc":
            noise = path_on(grid.flip(0), seed + 1, (int(n_corrector),))
            step = TreeLangevinCorrector(process, score, noise, snr=snr, n_corrector=n_corrector)
        else:
            step = Euler()
    elif sampler == "s4":
        # the midpoints exactly as the solver computes them (Python floats, internal times negated)
        g = grid.tolist()
        fine = sorted(set(g) | {-(0.5 * (-a + -b)) for a, b in zip(g[:-1], g[1:])})
        terms = process.reverse_sde(score, BrownianGrid(fine, shape_tree, seed=seed, dtype=dt, device=dv))
        noise = path_on(grid.flip(0), seed + 1, (1,)) if n_corrector else None
        step = S4Solver(process, score, noise, snr=snr, n_corrector=n_corrector)
    else:
        terms = process.probability_flow(score)
        step = {"pf_euler": Euler(), "pf_heun": _FixedHeun(), "pf_adaptive": Tsit5()}[sampler]
    if fixed:
        controller, dt0 = StepTo(grid), None
        steps = max_steps if max_steps is not None else grid.numel() + 8
    else:
        tol = _DEFAULT_TOL[sampler]
        controller = PIDController(rtol=tol if rtol is None else rtol, atol=tol if atol is None else atol)
        dt0, steps = None, (max_steps if max_steps is not None else 4096)
    sol = solve(
        terms, step, t_start, t_end, x, dt0=dt0, controller=controller, saveat=SaveAt(t1=True), max_steps=steps,
        progress=progress,
    )  # fmt: skip
    out = sol.ys
    out_leaves = [v[-1] for v in process.leaves(out, "the solution")]
    masks = score.masks_for(xs)
    out_leaves = [v if m is None else v * m for v, m in zip(out_leaves, masks)]
    if denoise:
        ss = score.leaves(t_end, out_leaves)
        den = []
        for p, v, sc, m in zip(process._procs, out_leaves, ss, masks):
            a, sig = map(_coeff, p.marginal(t_end))
            off = p.mean_offset(t_end, v)
            y = (torch.add(v, sc, alpha=sig * sig) - off) / a
            den.append(y if m is None else y * m)
        out_leaves = den
    return MultiSampleResult(
        x=process.unflatten(out_leaves), nfe=score.calls, num_steps=sol.stats["num_steps"], solution=sol
    )


# ----------------------------------------------------------------------------------- training
def multi_dsm_loss(
    model: Callable,
    process: MultiProcess,
    x0,
    *,
    weights=None,
    weighting="eps",
    parameterisation: str = "score",
    mask=None,
    t: torch.Tensor | None = None,
    eps=None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    return_leaves: bool = False,
):
    r"""Denoising score matching of a joint model on a batch of tree-structured data: a weighted
    sum over leaves of per-leaf DSM losses (GDSS Eq. 7–8; Song et al. 2021, Eq. 7).

    One time per sample, uniform on ``[process.t0, process.t1]`` (shared by the leaves, as in
    GDSS); every leaf noised by its own process with its own noise (through the hooks); one model
    call on the joint noisy state. Leaf :math:`k`'s loss is the weighted mean squared error in
    noise space, :math:`w_k(t)\,\overline{\|\sigma_k \hat s_k + \varepsilon_k\|^2}` (the mean
    over the leaf's unmasked entries), with :math:`w = 1` for ``weighting="eps"`` (the error
    of :math:`\sigma s`, GDSS's and Song et al.'s default), :math:`1/\sigma^2` for ``"score"``, or
    :math:`\lambda(t)/\sigma^2` for a callable ``lambda(t)``.

    Args:
        model: the joint model (``model(t, state)``; ``model(t, state, mask)`` with a mask).
        process: the :class:`MultiProcess`.
        x0: a batch of data, a tree (padded entries zero if a mask is given).
        weights: per-leaf factors of the sum (a number per leaf; default 1).
        weighting: ``"eps"``, ``"score"`` or a callable, for every leaf or per leaf.
        parameterisation: ``"score"`` or ``"eps"``.
        mask: a ``(B, N)`` item mask or a tree of leaf masks.
        t: ``(B,)`` times (drawn uniformly if omitted); eps: the noise tree (drawn through the
            hooks if omitted, used as given otherwise); generator: for the draws.
        reduction: ``"mean"`` (over the batch) or ``"none"`` (the ``(B,)`` per-sample totals).
        return_leaves: also return the tree of per-leaf losses (reduced the same way, unweighted).

    Returns:
        the loss, or ``(loss, leaf_losses)`` with ``return_leaves=True``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if parameterisation not in ("score", "eps"):
        raise ValueError(f"parameterisation must be 'score' or 'eps', got {parameterisation!r}")
    if not isinstance(process, MultiProcess):
        raise TypeError(f"process must be a MultiProcess, got {type(process).__name__}")
    xs = process.check_state(x0, "x0")
    b = xs[0].shape[0]
    if b == 0:
        raise ValueError("x0 must hold at least one sample")
    masks = process.leaf_masks(mask, xs)
    if weights is None or isinstance(weights, numbers.Real):
        ws = [1.0 if weights is None else float(weights)] * process.num_leaves
    else:
        ws = [1.0 if v is None else float(v) for v in process._per_leaf(weights, "weights")]
    if callable(weighting) or isinstance(weighting, str):
        wts = [weighting] * process.num_leaves
    else:
        wts = [("eps" if v is None else v) for v in process._per_leaf(weighting, "weighting")]
    for w in wts:
        if not callable(w) and w not in _LOSS_WEIGHTINGS:
            raise ValueError(f"unknown weighting {w!r}; choose one of {_LOSS_WEIGHTINGS} or pass a callable lambda(t)")
    dev = xs[0].device
    if t is None:
        gdev = generator.device if generator is not None else dev
        u = torch.rand(b, generator=generator, dtype=torch.float64, device=gdev).to(dev)
        t = process.t0 + (process.t1 - process.t0) * u
    t = torch.as_tensor(t, device=dev)
    if t.shape != (b,):
        raise ValueError(f"t must have shape ({b},) (one time per sample), got {tuple(t.shape)}")
    es = process._noise_leaves(xs, masks, generator) if eps is None else process._eps_leaves(eps, xs)
    xt = process._marginal_leaves(t, xs, es, masks)
    state = process.unflatten(xt)
    tt = t.to(xs[0].dtype)
    out = model(tt, state) if mask is None else model(tt, state, mask)
    outs = process.leaves(out, "the model's output")
    t64 = t.to(torch.float64)
    per_leaf, total = [], None
    for k, (p, o, x, e, m) in enumerate(zip(process._procs, outs, xs, es, masks)):
        if not isinstance(o, torch.Tensor) or o.shape != x.shape:
            raise ValueError(
                f"the model's output{_path_name(process._paths[k])} must have the data leaf's shape "
                f"{tuple(x.shape)}, got {_describe(o)}"
            )
        _, sig = p.marginal(t)
        err = (o * expand_time(sig, x) + e) if parameterisation == "score" else (o - e)
        sq = err.square()
        if m is None:
            per = sq.reshape(b, -1).mean(-1)
        else:
            full = m.expand(x.shape)
            per = (sq * full).reshape(b, -1).sum(-1) / full.reshape(b, -1).sum(-1).clamp(min=1)
        w = _weight(p, wts[k], "uniform", t64, 0.5)
        per = w.to(per.dtype) * per
        per_leaf.append(per)
        total = ws[k] * per if total is None else total + ws[k] * per
    red = (lambda v: v.mean()) if reduction == "mean" else (lambda v: v)
    if return_leaves:
        return red(total), process.unflatten([red(v) for v in per_leaf])
    return red(total)


# ------------------------------------------------------------------------------------- oracle
class JointGaussian:
    r"""Gaussian data on a dict of leaves with exact partial scores at every time (an oracle).

    The data are :math:`E u` with coordinates :math:`u \sim N(\mu, \Sigma)` in
    :math:`\mathbb{R}^D` and a fixed linear embedding :math:`E`: a plain leaf's entries are its
    own coordinates (row-major); a ``symmetric`` leaf (a square matrix event ``(n, n)``) has the
    :math:`n(n-1)/2` entries above its diagonal as coordinates, copied below it, and a zero
    diagonal. Coordinates are in sorted-key order. Under a :class:`MultiProcess` with
    :func:`symmetric_noise` on the symmetric leaves, the coordinates diffuse independently with
    their leaf's :math:`(\alpha_k, \sigma_k)`, so the marginal is
    :math:`u_t \sim N(D_\alpha\mu, D_\alpha\Sigma D_\alpha + D_\sigma^2)` and the partial score of
    a leaf is the embedding of :math:`\nabla_u \log p_t(u)` (for a symmetric leaf: entry
    :math:`(i, j)` and :math:`(j, i)` both the derivative by the coordinate :math:`u_{ij}`, the
    score with which the reverse SDE driven by symmetric noise is exact). Processes with
    :math:`m(t) = 0` only (not :class:`~torchnde.generative.processes.MeanReverting`).

    Args:
        event_shapes: ``{name: event_shape}`` (no batch dimension).
        mean: ``(D,)``; cov: ``(D, D)`` symmetric positive definite (float64 is used inside).
        symmetric: the names of the symmetric leaves.
    """

    def __init__(self, event_shapes: dict, mean, cov, *, symmetric=()):
        if not isinstance(event_shapes, dict) or not event_shapes:
            raise TypeError("event_shapes must be a non-empty dict {name: event_shape}")
        self.event_shapes = {k: tuple(int(i) for i in v) for k, v in event_shapes.items()}
        self.symmetric = set(symmetric)
        unknown = self.symmetric - set(self.event_shapes)
        if unknown:
            raise ValueError(
                f"symmetric names leaves {sorted(unknown)} not in event_shapes {sorted(self.event_shapes)}"
            )
        self.keys = sorted(self.event_shapes)
        self.sizes = {}
        for k in self.keys:
            s = self.event_shapes[k]
            if k in self.symmetric:
                if len(s) != 2 or s[0] != s[1]:
                    raise ValueError(f"the symmetric leaf {k!r} needs an event shape (n, n), got {s}")
                self.sizes[k] = s[0] * (s[0] - 1) // 2
            else:
                self.sizes[k] = math.prod(s)
        self.dim = sum(self.sizes.values())
        self.mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        self.cov = torch.as_tensor(cov, dtype=torch.float64)
        if self.mean.shape != (self.dim,) or self.cov.shape != (self.dim, self.dim):
            raise ValueError(
                f"mean and cov must have shapes ({self.dim},) and ({self.dim}, {self.dim}) (D = number of "
                f"coordinates), got {tuple(self.mean.shape)} and {tuple(self.cov.shape)}"
            )
        self._chol = torch.linalg.cholesky(self.cov)
        self._cache: dict = {}  # (process, float time, device) -> (mean, inverse covariance)
        self._triu = {
            k: torch.triu_indices(self.event_shapes[k][0], self.event_shapes[k][0], 1) for k in self.symmetric
        }

    def coords(self, tree: dict) -> torch.Tensor:
        """The ``(B, D)`` coordinates of a state (for a symmetric leaf, the entries above the diagonal)."""
        cols = []
        for k in self.keys:
            x = tree[k]
            if k in self.symmetric:
                i, j = self._triu[k].to(x.device)
                cols.append(x[:, i, j])
            else:
                cols.append(x.reshape(x.shape[0], -1))
        return torch.cat(cols, -1)

    def embed(self, u: torch.Tensor) -> dict:
        """The state (a dict) of ``(B, D)`` coordinates."""
        out, at = {}, 0
        b = u.shape[0]
        for k in self.keys:
            c = u[:, at : at + self.sizes[k]]
            at += self.sizes[k]
            if k in self.symmetric:
                n = self.event_shapes[k][0]
                i, j = self._triu[k].to(u.device)
                m = u.new_zeros(b, n, n)
                m[:, i, j] = c
                m[:, j, i] = c
                out[k] = m
            else:
                out[k] = c.reshape(b, *self.event_shapes[k])
        return out

    def sample(self, n: int, *, generator=None, dtype=torch.float64, device=None) -> dict:
        """``n`` draws of the data, a dict."""
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=device)
        u = self.mean.to(z.device) + z @ self._chol.to(z.device).T
        return self.embed(u.to(dtype))

    def _coeffs(self, mp: MultiProcess, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-coordinate ``(alpha, sigma)`` at ``t``: ``(D,)`` for a float, ``(B, D)`` for ``(B,)``."""
        procs = mp.processes
        if not isinstance(procs, dict) or set(procs) != set(self.keys):
            raise ValueError(f"the oracle's leaves {self.keys} must be the MultiProcess's dict keys")
        a_cols, s_cols = [], []
        for k in self.keys:
            a, s = procs[k].marginal(t)
            a = torch.as_tensor(a, dtype=torch.float64)
            s = torch.as_tensor(s, dtype=torch.float64)
            a_cols.append(a.reshape(-1, 1).expand(-1, self.sizes[k]))
            s_cols.append(s.reshape(-1, 1).expand(-1, self.sizes[k]))
        a, s = torch.cat(a_cols, -1), torch.cat(s_cols, -1)
        return (a[0], s[0]) if not isinstance(t, torch.Tensor) or t.dim() == 0 else (a, s)

    def marginal(self, mp: MultiProcess, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(D,)`` and covariance ``(D, D)`` of the coordinates at time ``t`` (float64)."""
        a, s = self._coeffs(mp, float(t))
        return a * self.mean, a[:, None] * self.cov * a[None, :] + torch.diag(s * s)

    def score(self, mp: MultiProcess, t, x: dict) -> dict:
        """The exact partial scores (a dict) of the state ``x`` at time ``t`` (float or ``(B,)``)."""
        u = self.coords(x).to(torch.float64)
        if isinstance(t, torch.Tensor) and t.numel() and bool(t.min() == t.max()):
            t = float(t.reshape(-1)[0])  # one time for the batch (a sampler's): the cached path
        if isinstance(t, torch.Tensor) and t.dim() == 1:
            a, s = self._coeffs(mp, t.to(torch.float64).cpu())
            a, s = a.to(u.device), s.to(u.device)
            cov = a[:, :, None] * self.cov.to(u.device) * a[:, None, :] + torch.diag_embed(s * s)
            r = u - a * self.mean.to(u.device)
            g = -torch.linalg.solve(cov, r.unsqueeze(-1)).squeeze(-1)
        else:
            key = (id(mp), float(t), u.device)
            hit = self._cache.get(key)
            if hit is None:
                if len(self._cache) > 4096:
                    self._cache.clear()
                mu, cov = self.marginal(mp, float(t))
                hit = self._cache[key] = (mu.to(u.device), torch.linalg.inv(cov).to(u.device))
            g = -(u - hit[0]) @ hit[1]
        dtype = next(iter(x.values())).dtype
        return self.embed(g.to(dtype))

    def model(self, mp: MultiProcess):
        """The exact joint score model ``model(t, state)`` of this data under ``mp``."""

        def model(t, x, mask=None):
            return self.score(mp, t, x)

        return model
