"""Step-size controllers."""

from ._base import AbstractController
from ._constant import ConstantStepSize
from ._pid import PIDController, rms_norm

__all__ = ["AbstractController", "ConstantStepSize", "PIDController", "rms_norm"]
