"""Drop-in front-ends with the call signatures of other libraries.

* :mod:`torchnde.compat.torchdiffeq`: ``odeint`` and ``odeint_adjoint`` with torchdiffeq's
  signatures, so that switching is one import line::

      from torchnde.compat.torchdiffeq import odeint, odeint_adjoint

* :mod:`torchnde.compat.torchsde`: ``sdeint``, ``sdeint_adjoint`` and torchsde's Brownian motion
  classes.
* :mod:`torchnde.compat.torchcde`: ``cdeint``, the interpolation-coefficient functions and the
  interpolation classes of torchcde.
"""

__all__ = ["torchdiffeq", "torchsde", "torchcde"]
