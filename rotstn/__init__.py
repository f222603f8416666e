"""rotstn: rotation as a first-class, differentiable operation in PyTorch."""

from .functional import angle_difference, rotate, rotation_matrix, wrap_angle
from .modules import Rotate
from .registration import Registration, register

__all__ = [
    "Registration",
    "Rotate",
    "angle_difference",
    "register",
    "rotate",
    "rotation_matrix",
    "wrap_angle",
]
__version__ = "0.1.0"
