"""Regularisers that make neural differential equations cheaper to solve.

Solver heuristics (Pal et al. 2021, 2023):

- :func:`local_error` -- one step of the solver's own ``step`` from ``(t, y)``: the norm of its
  embedded error estimate and, for Dopri5/Tsit5, a stiffness estimate, differentiable;
- :func:`sample_local_regulariser` -- the local regulariser at random times, from a dense solution;
- :func:`solve_with_local_regulariser` -- a solve split at a random time with the local
  regulariser there (every adjoint);
- :func:`solve_with_global_regulariser` -- the sum over the accepted steps of the error (and
  stiffness) estimates, accumulated during the solve.

Comparators:

- :class:`RegularisedTerm` -- kinetic energy, Jacobian Frobenius norm (Finlay et al. 2020) and
  TayNODE ``K = 2`` (Kelly et al. 2020) as augmented-state integrals;
- :func:`steer_end_time` -- STEER's random end times (Ghosh et al. 2020).

See docs/regularisation.md.
"""

from ._augmented import REGULARISERS, RegularisedTerm, probe_like
from ._global import GlobalEstimate, solve_with_global_regulariser
from ._local import (
    LocalEstimate,
    local_error,
    sample_local_regulariser,
    solve_with_local_regulariser,
    starting_step,
    stiffness_pair,
)
from ._steer import steer_end_time

__all__ = [
    "LocalEstimate",
    "local_error",
    "sample_local_regulariser",
    "solve_with_local_regulariser",
    "starting_step",
    "stiffness_pair",
    "GlobalEstimate",
    "solve_with_global_regulariser",
    "RegularisedTerm",
    "probe_like",
    "REGULARISERS",
    "steer_end_time",
]
