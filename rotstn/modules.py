"""Module twins of the functional layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _validate
from .functional import AngleLike, CenterLike, rotate

__all__ = ["Rotate"]


class Rotate(nn.Module):
    """``nn.Module`` form of :func:`rotstn.rotate`.

    Convention as in :mod:`rotstn.functional`: radians, counter-clockwise as
    displayed, centre ``(x, y)`` pixels.

    Args:
        angle: a fixed angle (number, ``()`` or ``(B,)``) used when ``forward``
            gets none. Stored as a buffer, or as a parameter with ``learnable=True``.
        center: ``(x, y)`` pixels, ``(2,)`` or ``(B, 2)``; default the image centre.
        mode, padding_mode, align_corners: as in :func:`rotstn.rotate`.
        learnable: make ``angle`` an ``nn.Parameter`` (starts at ``angle`` or 0).

    Shape:
        ``forward(image, angle=None)``: image ``(B, C, H, W)`` or ``(C, H, W)``;
        output as :func:`rotstn.rotate`.

    Example:
        >>> layer = Rotate(learnable=True)
        >>> layer(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 1, 8, 8])
    """

    angle: Tensor | None

    def __init__(
        self,
        angle: AngleLike | None = None,
        center: CenterLike = None,
        *,
        mode: str = "bilinear",
        padding_mode: str = "zeros",
        align_corners: bool = False,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        self.mode = _validate.choice(mode, _validate.MODES, "mode")
        self.padding_mode = _validate.choice(padding_mode, _validate.PADDING_MODES, "padding_mode")
        self.align_corners = _validate.flag(align_corners, "align_corners")
        if learnable and angle is None:
            angle = 0.0
        a = None if angle is None else torch.as_tensor(angle, dtype=torch.get_default_dtype()).clone()
        if a is not None and a.dim() > 1:
            raise ValueError(f"angle must have shape () or (B,), got {_validate.shape_str(a)}")
        if learnable:
            self.angle = nn.Parameter(a)
        else:
            self.register_buffer("angle", a)
        c = None if center is None else torch.as_tensor(center, dtype=torch.get_default_dtype()).clone()
        self.register_buffer("center", c)

    def forward(self, image: Tensor, angle: AngleLike | None = None) -> Tensor:
        if angle is None:
            if self.angle is None:
                raise ValueError("angle is required: pass it to forward() or to Rotate(angle=...)")
            angle = self.angle
        return rotate(
            image,
            angle,
            self.center,
            mode=self.mode,
            padding_mode=self.padding_mode,
            align_corners=self.align_corners,
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, padding_mode={self.padding_mode!r}, align_corners={self.align_corners}"
