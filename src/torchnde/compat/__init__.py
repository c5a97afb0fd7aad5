"""Drop-in front-ends with the call signatures of other libraries.

* :mod:`torchnde.compat.torchdiffeq`: ``odeint`` and ``odeint_adjoint`` with torchdiffeq's
  signatures, so that switching is one import line::

      from torchnde.compat.torchdiffeq import odeint, odeint_adjoint
"""

__all__ = ["torchdiffeq"]
