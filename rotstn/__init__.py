"""rotstn: rotation as a first-class, differentiable operation in PyTorch."""

from .functional import angle_difference, rotate, rotation_matrix, wrap_angle
from .modules import Rotate

__all__ = ["Rotate", "angle_difference", "rotate", "rotation_matrix", "wrap_angle"]
__version__ = "0.1.0"
