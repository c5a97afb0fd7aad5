"""The reversible Heun method and the interface of exactly invertible solvers."""

from __future__ import annotations

import torch

from ._base import AbstractSolver, hermite_coeffs, linear_coeffs

__all__ = ["AbstractReversibleSolver", "ReversibleHeun"]


class AbstractReversibleSolver(AbstractSolver):
    """A solver whose step can be inverted exactly. Its state is ``(z, f(t, z))`` for a second
    state ``z`` that starts equal to ``y``; :meth:`backward_step` reconstructs the previous
    ``(y, z)`` from the next one and backpropagates through the step, and :meth:`reverse` walks
    the whole solve back that way, which is what :class:`ReversibleAdjoint` needs."""

    def initial_derivative(self, state):
        v = state[1]
        return v if isinstance(v, torch.Tensor) else None  # an SDE's state holds (drift, diffusion)

    def backward_step(self, term, t0, t1, y1, z1, a_y, a_z, wrt):  # pragma: no cover - interface
        """Returns ``(y0, z0, a_y0, a_z0, grads)``: the reconstructed states, the adjoints of
        ``(y0, z0)`` and a list of vector-Jacobian products with ``wrt`` (``None`` if unused)."""
        raise NotImplementedError

    def reverse(self, term, times: list, y, z, incoming: dict, wrt: list):
        """The backward pass over the steps ``times[0] -> ... -> times[-1]`` (internal time) from
        the final ``(y, z)``: ``incoming[n]`` is the gradient reaching ``y`` at ``times[n]``.
        Returns the gradient of ``y0`` and one entry per ``wrt`` (``None`` if it was not reached).
        This default calls :meth:`backward_step` step by step."""
        a_y = torch.zeros_like(y)
        a_z = torch.zeros_like(y)
        g = [None] * len(wrt)
        for n in range(len(times) - 1, 0, -1):
            if n in incoming:
                a_y = a_y + incoming[n]
            y, z, a_y, a_z, parts = self.backward_step(term, times[n - 1], times[n], y, z, a_y, a_z, wrt)
            _accumulate(g, parts)
        if 0 in incoming:
            a_y = a_y + incoming[0]
        return a_y + a_z, g


def _accumulate(g: list, parts: list) -> None:
    """Adds blocks of ``len(g)`` vector-Jacobian products (``None``: not reached) into ``g``."""
    for i, part in enumerate(parts):
        if part is not None:
            i %= len(g)
            g[i] = part if g[i] is None else g[i] + part


class ReversibleHeun(AbstractReversibleSolver):
    r"""The reversible Heun method (Kidger, Foster, Li & Lyons 2021), one evaluation per step:

    .. math::
        z_{n+1} = 2 y_n - z_n + K(t_n, z_n),\qquad
        y_{n+1} = y_n + \tfrac12 \big(K(t_n, z_n) + K(t_{n+1}, z_{n+1})\big),

    with :math:`K(t, z) = h f(t, z)` for an ODE (order 2) and :math:`K(t, z) = f(t, z)\,h + g(t, z)\,\Delta W`
    for a Stratonovich SDE (strong order 0.5, 1 with additive noise). Exactly invertible, so
    :class:`~torchnde.ReversibleAdjoint` gives exact gradients of the computed solution in
    constant memory. Constant steps (``dt0``); its parasitic mode (eigenvalue :math:`-1` as
    :math:`h \to 0`) is not damped, so it suits smooth, non-stiff problems. Dense output: cubic
    Hermite (ODEs), linear (SDEs).
    """

    order = 2
    dense_order = 2
    calculus = "stratonovich"
    strong_order = {"general": 0.5, "additive": 1.0}

    def init(self, term, t0, y0):
        return (y0, _vf(term, t0, y0))

    def step(self, term, t0, t1, y0, state):
        z0, v0 = state
        c = _contr(term, t0, t1)
        k0 = _prod(term, v0, c)
        z1 = torch.add(k0 - z0, y0, alpha=2.0)  # 2 y0 - z0 + K(t0, z0)
        v1 = _vf(term, t1, z1)
        y1 = torch.add(y0, k0 + _prod(term, v1, c), alpha=0.5)
        dense = (y0, y1) if term.rough else (t0, t1, y0, y1, v0, v1)
        return y1, None, dense, (z1, v1), None

    def dense_coeffs(self, term, dense_info):
        if len(dense_info) == 2:
            return linear_coeffs(*dense_info)
        t0, t1, y0, y1, f0, f1 = dense_info
        h = t1 - t0
        return hermite_coeffs(y0, y1, f0, f1, h if isinstance(h, float) else h.unsqueeze(-1))

    def backward_step(self, term, t0, t1, y1, z1, a_y, a_z, wrt):
        c = _contr(term, t0, t1)  # the same control as forwards (Brownian paths are deterministic)
        with torch.enable_grad():
            z1_ = z1.detach().requires_grad_()
            k1 = _prod(term, _vf(term, t1, z1_), c)
            # y1 depends on z1 through K(z1): the adjoint of z1 gains J^T a_y / 2
            # retain_graph: tensors computed outside the solve from parameters keep their graph for
            # the next step's VJP (the step's own graph is freed with k1 all the same)
            g1 = torch.autograd.grad(k1, (z1_, *wrt), a_y * 0.5, allow_unused=True, retain_graph=True)
        a_z1 = a_z if g1[0] is None else a_z + g1[0]  # None: K does not depend on z
        z0 = (2 * y1 - z1 - k1).detach()
        with torch.enable_grad():
            z0_ = z0.requires_grad_()
            k0 = _prod(term, _vf(term, t0, z0_), c)
            g0 = torch.autograd.grad(k0, (z0_, *wrt), a_z1 + a_y * 0.5, allow_unused=True, retain_graph=True)
        y0 = y1 - 0.5 * (k0.detach() + k1.detach())
        a_z0 = -a_z1 if g0[0] is None else g0[0] - a_z1
        return y0, z0, a_y + 2 * a_z1, a_z0, [*g1[1:], *g0[1:]]

    def reverse(self, term, times, y, z, incoming, wrt):
        r"""The backward pass with one evaluation of the vector field per step.

        ``v_n = f(t_n, z_n)`` (an SDE: the pair ``(f, g)``) enters two steps: as
        ``K_n^+ = K(v_n, c_n)``, the first stage of step ``n`` (control ``c_n``), and as
        ``K_n^- = K(v_n, c_{n-1})``, the last stage of step ``n - 1``. Walking back, each point
        ``n`` evaluates ``v_n`` once with a graph. Its values reconstruct
        ``y_n = y_{n+1} - (K_n^+ + K_{n+1}^-) / 2`` and ``z_{n-1} = 2 y_n - z_n - K_n^-`` (the
        arithmetic of :meth:`backward_step`), and one vector-Jacobian product through both
        products gives ``z_n``'s and the parameters' share of the gradient: ``K_n^+`` receives
        ``a^z_{n+1} + a^y_{n+1} / 2`` and ``K_n^-`` receives ``a^y_n / 2``, with
        ``a^y_n = a^y_{n+1} + 2 a^z_{n+1}`` (plus the gradient of the output at ``t_n``) and
        ``a^z_n = -a^z_{n+1} + (\partial (K_n^+, K_n^-) / \partial z_n)^T (\ldots)``. So
        ``N + 1`` evaluations and products for ``N`` steps, where :meth:`backward_step` takes
        ``2N`` (torchsde's ``adjoint_reversible_heun``: ``N`` with a graph and ``N`` without)."""
        n = len(times) - 1
        a_y = incoming[n] if n in incoming else torch.zeros_like(y)
        g = [None] * len(wrt)
        if n == 0:
            return a_y, g
        c_plus = a_plus = a_z = k_next = None  # c_n, the cotangent of K_n^+, a^z_{n+1}, K_{n+1}^-
        c_minus = _contr(term, times[n - 1], times[n])
        while True:
            with torch.enable_grad():
                z_ = z.detach().requires_grad_()
                v = _vf(term, times[n], z_)
                outs, cots = [], []
                if c_plus is not None:
                    k_plus = _prod(term, v, c_plus)
                    outs.append(k_plus)
                    cots.append(a_plus)
                if c_minus is not None:
                    k_minus = _prod(term, v, c_minus)
                    outs.append(k_minus)
                    cots.append(a_y * 0.5)
                # retain_graph: tensors computed outside the solve from parameters keep their graph
                # for the next point's product (the point's own graph is freed with v all the same)
                got = torch.autograd.grad(outs, (z_, *wrt), cots, allow_unused=True, retain_graph=True)
            _accumulate(g, got[1:])
            if got[0] is None:  # K does not depend on z
                a_z = torch.zeros_like(y) if a_z is None else -a_z
            else:
                a_z = got[0] if a_z is None else got[0] - a_z
            if c_plus is not None:
                y = torch.add(y, k_plus.detach() + k_next, alpha=-0.5)
            if n == 0:
                return a_y + a_z, g
            k_next = k_minus.detach()
            z = (y + y - z - k_next).detach()
            a_plus = torch.add(a_z, a_y, alpha=0.5)
            a_y = torch.add(a_y, a_z, alpha=2.0)
            n -= 1
            if n in incoming:
                a_y = a_y + incoming[n]
            c_plus, c_minus = c_minus, (_contr(term, times[n - 1], times[n]) if n > 0 else None)


def _vf(term, t, z):
    return term.vf_pair(t, z) if term.rough else term.vf(t, z)


def _contr(term, t0, t1):
    if term.rough:
        return term.contr(t0, t1)
    h = t1 - t0
    return h if isinstance(h, float) else h.unsqueeze(-1)


def _prod(term, v, c):
    return term.prod(v, c) if term.rough else v * c
