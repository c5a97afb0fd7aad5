"""Step-size controllers: choose each step and decide whether to accept it."""

from __future__ import annotations

from typing import Any

__all__ = ["AbstractController"]


class AbstractController:
    """Chooses step sizes.

    ``init`` returns the first step size; ``adapt`` sees a step's error estimate and returns
    whether to accept it, the next step size and the controller's state. Both work on Python
    floats (one step size for the whole state) or on ``(batch,)`` tensors (per-sample mode) via
    the ``ops`` namespace the loop passes in.
    """

    step_ts: Any = None
    jump_ts: Any = None
    dtmax: float | None = None
    #: True for controllers that accept every step and choose step times that do not depend on
    #: the state (``adapt`` reads only the times and its own state): such solves are planned
    #: ahead and run by the fused fixed-step loop (see ``torchnde/_fixed.py``).
    fixed_grid: bool = False

    def init(self, term, solver, t0, t1, y0, f0, dt0, ops) -> Any:  # pragma: no cover
        raise NotImplementedError

    def adapt(self, t0, t1, y0, y1, y_error, error_order, cstate, ops):  # pragma: no cover
        raise NotImplementedError


def with_step_ts(controller, ts):
    """A copy of ``controller`` whose steps also land on the times ``ts``."""
    import copy

    import torch

    ts = torch.as_tensor(ts, dtype=torch.float64).detach().cpu().flatten()
    controller = copy.copy(controller)
    old = getattr(controller, "step_ts", None)
    controller.step_ts = torch.unique(ts if old is None else torch.cat([old, ts]))
    return controller
