"""The reference warp: sampling grid by broadcasting, then ``F.grid_sample``.

Every other path is tested against this one. It differs from the textbook
``affine_grid`` recipe only in how the grid is made: the source coordinates
are computed in pixels from (θ, centre) by broadcasting an (H, 1) column
against a (1, W) row, so no (B, H, W, 3) base grid and no batched matmul are
built, and the geometry is the same for every ``align_corners``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def source_coords(angle: Tensor, center: Tensor, source: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Pixel coordinates (x, y), each (B, H, W), that the output pixels of an H×W output read from.

    The output pixel p takes the input at ``s + R(θ)ᵀ (p - c)``: with rows
    pointing down, ``x_src = sx + cos θ·u - sin θ·v`` and
    ``y_src = sy + sin θ·u + cos θ·v`` where ``(u, v) = p - c``. That turns
    the content counter-clockwise as displayed for positive θ. ``c`` is the
    output-side centre and ``s`` the input point shown there; a rotation
    about c has ``s = c``, a translation moves one against the other.
    """
    dtype, device = angle.dtype, angle.device
    cos = torch.cos(angle).view(-1, 1, 1)
    sin = torch.sin(angle).view(-1, 1, 1)
    u = torch.arange(w, dtype=dtype, device=device).view(1, 1, w) - center[:, 0].view(-1, 1, 1)
    v = torch.arange(h, dtype=dtype, device=device).view(1, h, 1) - center[:, 1].view(-1, 1, 1)
    x = source[:, 0].view(-1, 1, 1) + cos * u - sin * v
    y = source[:, 1].view(-1, 1, 1) + sin * u + cos * v
    return x, y


def normalize(coord: Tensor, n: int, align_corners: bool) -> Tensor:
    """Pixel coordinate -> grid_sample's [-1, 1] coordinate along an axis of n pixels."""
    if align_corners:
        # With one pixel every coordinate samples pixel 0; keep the graph alive.
        return coord * (2.0 / (n - 1)) - 1.0 if n > 1 else coord * 0.0
    return (coord * 2.0 + 1.0) / n - 1.0


def warp(
    image: Tensor,
    angle: Tensor,
    center: Tensor,
    source: Tensor,
    mode: str,
    padding_mode: str,
    align_corners: bool,
    size: tuple[int, int] | None = None,
) -> Tensor:
    """Turn ``image`` (B, C, H, W) by ``angle`` (B,): output ``center`` (B, 2) shows input ``source`` (B, 2).

    ``angle``, ``center`` and ``source`` are in the coordinate dtype (float32
    or float64); the image is sampled in that dtype and cast back to its own.
    ``size`` is the output's (H, W), default the input's.
    """
    b, _, h, w = image.shape
    ho, wo = (h, w) if size is None else size
    x, y = source_coords(angle, center, source, ho, wo)
    grid = torch.stack((normalize(x, w, align_corners), normalize(y, h, align_corners)), dim=-1).expand(
        b, ho, wo, 2
    )
    src = image if image.dtype == angle.dtype else image.to(angle.dtype)
    out = F.grid_sample(src, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    return out.to(image.dtype)
