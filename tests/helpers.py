"""Shared test data and wrappers: crops of real bundled pictures, the disc a rotation keeps in frame, and
RotationSTN modules that return plain tensors (what a deployment exports)."""

import numpy as np
import torch


def real_image(h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """A crop of scikit-image's bundled camera picture, (1, 1, h, w) float64 in [0, 1]."""
    from skimage import data

    cam = torch.from_numpy(data.camera()).double() / 255.0
    g = torch.Generator().manual_seed(seed)
    top = int(torch.randint(0, cam.shape[0] - h, (1,), generator=g))
    left = int(torch.randint(0, cam.shape[1] - w, (1,), generator=g))
    return cam[top : top + h, left : left + w][None, None].clone()


def interior(h: int, w: int, margin: float = 2.0) -> np.ndarray:
    """(h, w) bool: pixels inside the disc that stays in the image under any rotation about the centre."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(xx - (w - 1) / 2, yy - (h - 1) / 2)
    return r <= min(h, w) / 2 - margin


class ExportedSTN(torch.nn.Module):
    """A single-input RotationSTN returning its warped image and angle as plain tensors."""

    def __init__(self, stn: torch.nn.Module) -> None:
        super().__init__()
        self.stn = stn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.stn(x)
        return out.warped, out.angle


class ExportedPairedSTN(ExportedSTN):
    """The same for a paired RotationSTN: forward(moving, fixed)."""

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.stn(moving, fixed)
        return out.warped, out.angle
