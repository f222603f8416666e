"""Image preparation shared by the registration stages: blur, masks, pyramid.

Pyramid coordinates: level ``k`` halves the resolution ``k`` times by 2×2
averaging (odd last rows and columns dropped), so its pixel ``x_k`` covers
level-0 pixels around ``x = s·(x_k + 0.5) - 0.5`` with ``s = 2**k``, whatever
the image size. Every stage maps its geometry between levels with
:func:`to_level` and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def indices(mask: Tensor) -> str:
    """The first few True positions of a 1-D mask, for error messages."""
    idx = mask.nonzero().flatten().tolist()
    return ", ".join(map(str, idx[:10])) + (", ..." if len(idx) > 10 else "")


def _blur_axis(image: Tensor, kernel: list[float], dim: int) -> Tensor:
    # Shifted, weighted adds along one axis (replicated borders): memory-bound and several times
    # faster on the CPU than conv2d with a thin kernel.
    r = len(kernel) // 2
    n = image.shape[dim]
    pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)
    padded = F.pad(image, pad, mode="replicate")
    out = padded.narrow(dim, 0, n) * kernel[0]
    for i in range(1, len(kernel)):
        out.add_(padded.narrow(dim, i, n), alpha=kernel[i])
    return out


def blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) with replicated borders (``sigma`` 0 leaves it)."""
    if sigma == 0:
        return image
    radius = math.ceil(3 * sigma)
    taps = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
    kernel = [v / sum(taps) for v in taps]
    return _blur_axis(_blur_axis(image, kernel, -1), kernel, -2)


def masked_blur(image: Tensor, mask: Tensor | None, sigma: float) -> tuple[Tensor, Tensor | None]:
    """Blur that reads only where ``mask`` is set, and the pixels whose blur is trustworthy.

    Masked-out pixels (labels, rulers, borders) would otherwise bleed ~3σ into
    the pixels that are compared (normalised convolution keeps them out).
    Near the frame and the mask's edges a blurred pixel is made of fewer
    neighbours than the same scene point in the other image: those pixels
    (the blur's weight inside the mask below 0.9) are left out of the
    returned mask, so that they are never compared.
    """
    if sigma == 0:
        return image, mask
    # Without a mask the weight is the same for every sample: compute it once.
    ones = image.new_ones((1, 1, *image.shape[-2:])) if mask is None else mask
    radius = math.ceil(3 * sigma)
    # The weight of the kernel that falls inside the frame and the mask (zeros outside the frame).
    weight = blur(F.pad(ones, (radius, radius, radius, radius)), sigma)[..., radius:-radius, radius:-radius]
    out = blur(image * ones, sigma) / weight.clamp_min(1e-6) if mask is not None else blur(image, sigma)
    return out, ((weight > 0.9) & (ones > 0.5)).to(image.dtype).expand(image.shape[0], 1, *image.shape[-2:])


def pool(image: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """One pyramid step: 2×2 mean (over the masked pixels when a mask is given)."""
    if mask is None:
        return F.avg_pool2d(image, 2), None
    m = F.avg_pool2d(mask, 2)
    return F.avg_pool2d(image * mask, 2) / m.clamp_min(1e-6), m


@dataclass
class Level:
    """One pyramid level: grey image (B, 1, h, w), mask (B, 1, h, w) or None, and its scale 2**k."""

    image: Tensor
    mask: Tensor | None
    scale: int

    def select(self, rows: Tensor) -> Level:
        """The level for a subset of the batch (a bool or index tensor)."""
        return Level(self.image[rows], None if self.mask is None else self.mask[rows], self.scale)


def pyramid(image: Tensor, mask: Tensor | None, halvings: int) -> list[Level]:
    """Full resolution and ``halvings`` coarser levels, finest first."""
    levels = [Level(image, mask, 1)]
    for _ in range(halvings):
        img, m = pool(levels[-1].image, levels[-1].mask)
        levels.append(Level(img, m, levels[-1].scale * 2))
    return levels


def to_level(point: Tensor | float, scale: int) -> Tensor | float:
    """Level-0 pixel coordinate -> the same point in the coordinates of a level of this scale."""
    return (point + 0.5) / scale - 0.5


def centre(h: int, w: int, scale: int, like: Tensor) -> Tensor:
    """(1, 2) level coordinates of the level-0 image centre ((W-1)/2, (H-1)/2)."""
    c = torch.tensor([[(w - 1) / 2, (h - 1) / 2]], dtype=like.dtype, device=like.device)
    return to_level(c, scale)  # type: ignore[return-value]
