"""Shared test data: crops of real bundled pictures."""

import torch


def real_image(h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """A crop of scikit-image's bundled camera picture, (1, 1, h, w) float64 in [0, 1]."""
    from skimage import data

    cam = torch.from_numpy(data.camera()).double() / 255.0
    g = torch.Generator().manual_seed(seed)
    top = int(torch.randint(0, cam.shape[0] - h, (1,), generator=g))
    left = int(torch.randint(0, cam.shape[1] - w, (1,), generator=g))
    return cam[top : top + h, left : left + w][None, None].clone()
