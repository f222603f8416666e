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


def check_not_flat(values: Tensor, keep: Tensor | None, name: str, where: str = "") -> None:
    """Raise when any sample's (B, N) ``values`` (where ``keep`` says, if given) are all the same."""
    if keep is None:
        hi, lo = values.amax(1), values.amin(1)
    else:
        hi = values.masked_fill(~keep, -math.inf).amax(1)
        lo = values.masked_fill(~keep, math.inf).amin(1)
    flat = (hi - lo) <= 1e-6 * torch.maximum(hi.abs(), lo.abs()).clamp_min(1.0)
    if bool(flat.any()):
        place = f" {where}" if where else ""
        raise ValueError(
            f"{name} is constant{place} (sample(s) {indices(flat)}): there is nothing to register"
        )


def blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) with replicated borders (``sigma`` 0 leaves it)."""
    if sigma == 0:
        return image
    radius = math.ceil(3 * sigma)
    taps = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
    kernel = [v / sum(taps) for v in taps]
    return _blur_axis(_blur_axis(image, kernel, -1), kernel, -2)


def masked_blur(image: Tensor, mask: Tensor | None, sigma: float) -> tuple[Tensor, Tensor | None, float]:
    """Blur that reads only where ``mask`` is set; the mask and frame margin whose pixels stay comparable.

    Masked-out pixels (labels, rulers, borders) would otherwise bleed ~3σ into
    the pixels that are compared (normalised convolution keeps them out).
    Near the frame and the mask's edges a blurred pixel is made of fewer
    neighbours than the same scene point in the other image: such pixels are
    never compared. Returns the blurred image, the mask with the pixels near
    its edges removed (None when no mask was given), and the margin in
    pixels to leave out along the frame.
    """
    if sigma == 0:
        return image, mask, 0.0
    margin = float(math.ceil(2 * sigma))
    if mask is None:
        return blur(image, sigma), None, margin
    radius = math.ceil(3 * sigma)
    # The weight of the kernel that falls inside the mask (zeros outside the frame).
    weight = blur(F.pad(mask, (radius, radius, radius, radius)), sigma)[..., radius:-radius, radius:-radius]
    out = blur(image * mask, sigma) / weight.clamp_min(1e-6)
    return out, ((weight > 0.9) & (mask > 0.5)).to(image.dtype), margin


def noise_variance(image: Tensor, mask: Tensor | None, sigma: float) -> Tensor:
    """(B,) variance of white noise in (B, 1, H, W) after a Gaussian blur of ``sigma``.

    The noise level is estimated before the blur by Immerkær's method: the
    mean absolute response to a 3×3 operator that cancels every linear ramp
    (so smooth content and straight edges barely enter), ``σ = √(π/2)/6 ·
    mean|I * N|``. A blur of ``sigma`` divides a white-noise variance by the
    sum of its squared weights.

    Reference: J. Immerkær, "Fast noise variance estimation", Computer Vision
    and Image Understanding 64(2), 1996.
    """
    # The operator is the second difference [1, -2, 1] along rows times the same along columns.
    # A statistic: the rows around every few rows of a large image are plenty.
    step = max(1, image.shape[-2] // 256)
    h = image.shape[-2]

    def dxx(line: Tensor) -> Tensor:
        return line[..., :-2] - 2 * line[..., 1:-1] + line[..., 2:]

    # rows 1, 1 + step, ... < h - 1, each with the rows above and below (strided views, no copies)
    if step <= 2:
        # every row takes part (or every other): difference them all once
        d = dxx(image)
        rows = [d[..., first : h - 2 + first : step, :] for first in range(3)]
    else:
        # on the kept rows only: a large image is never differenced whole
        rows = [dxx(image[..., first : h - 2 + first : step, :]) for first in range(3)]
    response = (rows[0] - 2 * rows[1] + rows[2]).abs()
    if mask is None:
        mean = response.mean((1, 2, 3))
    else:
        inner = (F.avg_pool2d(mask, 3, stride=1) > 0.999).to(image.dtype)[..., 0 : h - 2 : step, :]
        mean = (response * inner).sum((1, 2, 3)) / inner.sum((1, 2, 3)).clamp_min(1)
    variance = (math.sqrt(math.pi / 2) / 6 * mean).square()
    if sigma > 0:
        radius = math.ceil(3 * sigma)
        taps = torch.tensor([math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)])
        variance = variance * float((taps / taps.sum()).square().sum()) ** 2
    return variance


def pool(image: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """One pyramid step: 2×2 mean (over the masked pixels when a mask is given)."""
    if mask is None:
        return F.avg_pool2d(image, 2), None
    m = F.avg_pool2d(mask, 2)
    return F.avg_pool2d(image * mask, 2) / m.clamp_min(1e-6), m


@dataclass
class Level:
    """One pyramid level of one image.

    Attributes:
        image: (B, 1, h, w) grey values.
        mask: (B, 1, h, w) where the image has content (values in [0, 1]; 1 counts), or None for
            everywhere but ``margin``.
        scale: 2**k for level k.
        margin: pixels along the frame that are not compared (the blur's reach).
    """

    image: Tensor
    mask: Tensor | None
    scale: int
    margin: float = 0.0

    def select(self, rows: Tensor) -> Level:
        """The level for a subset of the batch (a bool or index tensor)."""
        return Level(
            self.image[rows], None if self.mask is None else self.mask[rows], self.scale, self.margin
        )

    def halve(self) -> Level:
        """The next coarser pyramid level."""
        image, mask = pool(self.image, self.mask)
        # A pooled pixel reaches half a pixel further than its inputs.
        return Level(image, mask, self.scale * 2, self.margin / 2 + 0.5)

    def inside(self, x: Tensor, y: Tensor) -> Tensor:
        """Whether bilinear samples at level pixels (x, y) read only compared pixels of the frame."""
        h, w = self.image.shape[-2:]
        m = self.margin
        return (x >= m) & (x <= w - 1 - m) & (y >= m) & (y <= h - 1 - m)

    def inside_grid(self, grid: Tensor) -> Tensor:
        """:meth:`inside` for grid_sample coordinates (``align_corners=False``) in this level, (..., 2).

        Level pixel q is in [m, side - 1 - m] when ``(2q + 1)/side - 1`` is within ±(1 - (2m + 1)/side).
        """
        h, w = self.image.shape[-2:]
        m = self.margin
        return (grid[..., 0].abs() <= 1 - (2 * m + 1) / w) & (grid[..., 1].abs() <= 1 - (2 * m + 1) / h)

    def area(self) -> Tensor:
        """(B or 1,) pixels compared: :meth:`content` summed, without building it when there is no mask."""
        if self.mask is not None:
            return self.content().sum((1, 2, 3))
        h, w = self.image.shape[-2:]
        y = torch.arange(h, dtype=self.image.dtype, device=self.image.device)
        x = torch.arange(w, dtype=self.image.dtype, device=self.image.device)
        rows = self.inside(torch.full_like(y, (w - 1) / 2), y).sum()
        cols = self.inside(x, torch.full_like(x, (h - 1) / 2)).sum()
        return (rows * cols).to(self.image.dtype).view(1)

    def content(self) -> Tensor:
        """(B or 1, 1, h, w) 1 where the image is compared, else 0."""
        h, w = self.image.shape[-2:]
        y = torch.arange(h, dtype=self.image.dtype, device=self.image.device).view(-1, 1)
        x = torch.arange(w, dtype=self.image.dtype, device=self.image.device).view(1, -1)
        frame = self.inside(x, y).to(self.image.dtype).view(1, 1, h, w)
        return frame if self.mask is None else frame * (self.mask > 0.999)


def pyramid(image: Tensor, mask: Tensor | None, halvings: int, margin: float = 0.0) -> list[Level]:
    """Full resolution and ``halvings`` coarser levels, finest first."""
    levels = [Level(image, mask, 1, margin)]
    for _ in range(halvings):
        levels.append(levels[-1].halve())
    return levels


def to_level(point: Tensor | float, scale: int) -> Tensor | float:
    """Level-0 pixel coordinate -> the same point in the coordinates of a level of this scale."""
    return (point + 0.5) / scale - 0.5


def centre(h: int, w: int, scale: int, like: Tensor) -> Tensor:
    """(1, 2) level coordinates of the level-0 image centre ((W-1)/2, (H-1)/2)."""
    c = torch.tensor([[(w - 1) / 2, (h - 1) / 2]], dtype=like.dtype, device=like.device)
    return to_level(c, scale)  # type: ignore[return-value]
