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


def source_coords(angle: Tensor, center: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Pixel coordinates (x, y), each (B, H, W), that output pixels read from.

    The output pixel p takes the input at ``c + R(θ)ᵀ (p - c)``: with rows
    pointing down, ``x_src = cx + cos θ·u - sin θ·v`` and
    ``y_src = cy + sin θ·u + cos θ·v`` where ``(u, v) = p - c``. That turns
    the content counter-clockwise as displayed for positive θ.
    """
    dtype, device = angle.dtype, angle.device
    cos = torch.cos(angle).view(-1, 1, 1)
    sin = torch.sin(angle).view(-1, 1, 1)
    cx = center[:, 0].view(-1, 1, 1)
    cy = center[:, 1].view(-1, 1, 1)
    u = torch.arange(w, dtype=dtype, device=device).view(1, 1, w) - cx
    v = torch.arange(h, dtype=dtype, device=device).view(1, h, 1) - cy
    x = cx + cos * u - sin * v
    y = cy + sin * u + cos * v
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
    mode: str,
    padding_mode: str,
    align_corners: bool,
) -> Tensor:
    """Rotate ``image`` (B, C, H, W) by ``angle`` (B,) about ``center`` (B, 2).

    ``angle`` and ``center`` are in the coordinate dtype (float32 or float64);
    the image is sampled in that dtype and cast back to its own.
    """
    b, _, h, w = image.shape
    x, y = source_coords(angle, center, h, w)
    grid = torch.stack((normalize(x, w, align_corners), normalize(y, h, align_corners)), dim=-1).expand(
        b, h, w, 2
    )
    src = image if image.dtype == angle.dtype else image.to(angle.dtype)
    out = F.grid_sample(src, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    return out.to(image.dtype)
