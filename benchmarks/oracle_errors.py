"""How far is rotstn.rotate from the independent references? Prints the maxima.

    python benchmarks/oracle_errors.py

The same comparisons as tests/test_oracles.py (which assert the tolerances),
reported as numbers: scipy.ndimage.rotate (order=1) on the image interior,
torch.rot90 for quarter turns, kornia's rotate on non-square images; float64.
"""

from __future__ import annotations

import math

import kornia
import numpy as np
import scipy.ndimage as ndi
import torch
from skimage import data

import rotstn


def crop(h: int, w: int, seed: int) -> torch.Tensor:
    cam = torch.from_numpy(data.camera()).double() / 255
    g = np.random.default_rng(seed)
    top, left = g.integers(0, cam.shape[0] - h), g.integers(0, cam.shape[1] - w)
    return cam[top : top + h, left : left + w]


def interior(h: int, w: int, margin: float = 2.0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.hypot(xx - (w - 1) / 2, yy - (h - 1) / 2) <= min(h, w) / 2 - margin


def main() -> None:
    sizes = [(32, 32), (33, 33), (24, 40), (41, 26), (17, 30)]
    scipy_err = 0.0
    for h, w in sizes:
        img = crop(h, w, h * w)
        for a in (0.3, -1.2, 2.5, math.pi):
            ref = ndi.rotate(img.numpy(), math.degrees(a), reshape=False, order=1, mode="constant")
            for ac in (False, True):
                ours = rotstn.rotate(img[None], a, align_corners=ac)[0].numpy()
                scipy_err = max(scipy_err, float(np.abs(ours - ref)[interior(h, w)].max()))
    rot90_err = 0.0
    for n in (7, 8, 31, 32):
        x = torch.rand(2, 3, n, n, dtype=torch.float64)
        for k in (1, 2, 3, -1):
            diff = rotstn.rotate(x, k * math.pi / 2) - torch.rot90(x, k, (-2, -1))
            rot90_err = max(rot90_err, diff.abs().max().item())
    kornia_err = 0.0
    for h, w in [(24, 40), (41, 26)]:
        x = crop(h, w, 5)[None, None].repeat(3, 2, 1, 1)
        a = torch.tensor([0.5, -2.0, 1.3], dtype=torch.float64)
        ref = kornia.geometry.transform.rotate(x, torch.rad2deg(a), align_corners=True)
        diff = (rotstn.rotate(x, a, align_corners=True) - ref)[..., torch.from_numpy(interior(h, w))]
        kornia_err = max(kornia_err, diff.abs().max().item())
    print("| reference | cases | max abs difference (float64) |")
    print("|---|---|---|")
    print(
        f"| scipy.ndimage.rotate(order=1), interior | 5 sizes, 4 angles, 2 align_corners | {scipy_err:.1e} |"
    )
    print(f"| torch.rot90 | n = 7, 8, 31, 32 × k = 1, 2, 3, -1 | {rot90_err:.1e} |")
    print(f"| kornia rotate, non-square interior | 24×40, 41×26 × 3 angles | {kornia_err:.1e} |")


if __name__ == "__main__":
    main()
