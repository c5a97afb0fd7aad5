"""The adjoint slot of ``solve``: every gradient method wraps the same loop."""

from __future__ import annotations

__all__ = ["AbstractAdjoint", "DirectAdjoint"]


class AbstractAdjoint:
    """A gradient method. ``loop(problem, integrate)`` runs ``integrate(problem)`` (the one
    integration loop) and decides how autograd sees it: directly, checkpointed, or through a
    custom backward pass (continuous or reversible adjoints)."""

    def loop(self, problem, integrate):  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class DirectAdjoint(AbstractAdjoint):
    """Discretise-then-optimise: autograd records every operation of every step.

    Exact gradients of the computed solution; memory grows with the number of steps. Gradients
    reach ``y0``, tensors in ``args`` and the parameters of any module in the vector field. Step
    sizes are chosen from detached error estimates, so they are treated as constants.
    """

    def loop(self, problem, integrate):
        return integrate(problem)
