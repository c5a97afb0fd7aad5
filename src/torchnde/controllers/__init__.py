"""Step-size controllers."""

from ._base import AbstractController
from ._constant import ConstantStepSize, StepTo
from ._pid import PIDController, rms_norm

__all__ = ["AbstractController", "ConstantStepSize", "PIDController", "StepTo", "rms_norm"]
