"""rotstn: rotation as a first-class, differentiable operation in PyTorch."""

from . import encoders, heads, losses
from .functional import angle_difference, rigid_matrix, rotate, rotation_matrix, warp, wrap_angle
from .modules import Rotate, RotationSTN, STNOutput
from .registration import Registration, StackRegistration, register, register_stack
from .registration._pairs import register_pairs
from .search import best_turn

__all__ = [
    "Registration",
    "Rotate",
    "RotationSTN",
    "STNOutput",
    "StackRegistration",
    "angle_difference",
    "best_turn",
    "encoders",
    "heads",
    "losses",
    "register",
    "register_pairs",
    "register_stack",
    "rigid_matrix",
    "rotate",
    "rotation_matrix",
    "warp",
    "wrap_angle",
]
__version__ = "0.1.0"
