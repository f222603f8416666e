"""Offline pairs of rotated real images, for tests, benchmarks and examples.

The pictures are scikit-image's bundled ones (nothing is downloaded); the
rotation is done by ``scipy.ndimage.rotate`` (cubic spline), a warper
independent of rotstn's. Both packages are needed only here (the ``dev`` and
``examples`` extras install them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["IMAGES", "RotatedPairs", "bundled_image", "rotated_pairs"]

IMAGES = ("camera", "coins", "moon", "astronaut", "retina", "brick", "grass", "gravel", "chelsea", "coffee")


@functools.lru_cache(maxsize=32)
def bundled_image(name: str) -> np.ndarray:
    """One of scikit-image's bundled pictures as a float64 grey image in [0, 1].

    Args:
        name: a name from :data:`IMAGES` (any ``skimage.data`` function that
            ships with the package works).

    Returns:
        ``(H, W)`` read-only float64 array (it is cached); colour pictures are
        converted with ``skimage.color.rgb2gray``.
    """
    from skimage import color, data

    loader = getattr(data, name, None)
    if loader is None or not callable(loader):
        raise ValueError(f"name must be a picture in skimage.data such as {IMAGES[0]!r}; got {name!r}")
    img = loader()
    if img.ndim == 3:
        img = color.rgb2gray(img[..., :3])
    img = np.asarray(img, dtype=np.float64)
    img = img / 255.0 if img.max() > 1.0 else img.copy()
    img.setflags(write=False)
    return img


@dataclass(frozen=True)
class RotatedPairs:
    """Pairs with ``rotate(moving, angle) ≈ fixed`` on the central disc.

    Attributes:
        fixed: ``(N, 1, H, W)``.
        moving: ``(N, 1, H, W)``.
        angle: ``(N,)`` radians, the rotation that maps moving onto fixed.
        names: the picture each pair was cut from.
    """

    fixed: Tensor
    moving: Tensor
    angle: Tensor
    names: tuple[str, ...]


def rotated_pairs(
    n: int,
    size: tuple[int, int] = (128, 128),
    *,
    images: tuple[str, ...] = IMAGES,
    noise: float = 0.0,
    photometric: bool = False,
    max_angle: float = math.pi,
    angles: Sequence[float] | None = None,
    min_std: float = 0.05,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> RotatedPairs:
    """Cut ``n`` (fixed, moving) pairs from the bundled pictures.

    For each pair a crop larger than the ``size`` rectangle's diagonal is cut
    from a picture and rotated by ``scipy.ndimage.rotate`` (order 3, about its
    centre); ``fixed`` is the centre ``size`` of the rotated crop and
    ``moving`` the same window of the unrotated one. The rotated window has no
    padding anywhere, so ``rotate(moving, angle)`` and ``fixed`` agree on the
    central disc up to interpolation.

    Args:
        n: number of pairs; the pictures are used in turn.
        size: ``(H, W)`` of each image.
        images: names of bundled pictures (see :func:`bundled_image`).
        noise: standard deviation of Gaussian noise added independently to
            both images (pixel values are in [0, 1]).
        photometric: apply a random gamma (0.6–1.6), contrast (0.6–1.0) and
            brightness offset (0–0.2) to ``fixed`` only.
        max_angle: angles are drawn uniformly from [-max_angle, max_angle] radians.
        angles: the ``n`` angles in radians to use instead of random ones.
        min_std: crops whose central disc has a grey-level standard deviation
            below this are redrawn (nothing to register on a flat patch).
        seed: seeds crops, angles, noise and photometric changes; crops and
            angles do not depend on ``noise`` and ``photometric``.
        dtype: floating dtype of the returned tensors.

    Returns:
        A :class:`RotatedPairs`.

    Example:
        >>> pairs = rotated_pairs(2, (32, 48))
        >>> pairs.fixed.shape, pairs.angle.shape
        (torch.Size([2, 1, 32, 48]), torch.Size([2]))
    """
    from scipy import ndimage

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    h, w = size
    if angles is not None and len(angles) != n:
        raise ValueError(f"angles must hold n={n} values, got {len(angles)}")
    rng = np.random.default_rng(seed)
    # A second stream for noise and photometric changes, so that the same seed
    # gives the same crops and angles clean or noisy.
    rng_pixels = np.random.default_rng([seed, 1])
    diag = math.hypot(h, w)
    # A margin of a few pixels keeps the spline's boundary handling out of the window.
    pad_h, pad_w = math.ceil(max(diag - h, 0) / 2) + 3, math.ceil(max(diag - w, 0) / 2) + 3
    big_h, big_w = h + 2 * pad_h, w + 2 * pad_w
    pictures = {name: bundled_image(name) for name in images}
    yy, xx = np.mgrid[:h, :w]
    disc = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) <= (min(h, w) - 1) / 2
    fixed, moving, used, names = [], [], [], []
    for i in range(n):
        name = images[i % len(images)]
        pic = pictures[name]
        if pic.shape[0] < big_h or pic.shape[1] < big_w:
            raise ValueError(f"picture {name!r} {pic.shape} is too small for size {size}")
        for _ in range(1000):
            top = int(rng.integers(0, pic.shape[0] - big_h + 1))
            left = int(rng.integers(0, pic.shape[1] - big_w + 1))
            crop = pic[top : top + big_h, left : left + big_w]
            # Redraw crops whose compared region (the central disc) is flat, like
            # the retina's black surround or the moon's plains.
            if crop[pad_h : pad_h + h, pad_w : pad_w + w][disc].std() > min_std:
                break
        else:
            raise ValueError(f"no crop of {name!r} has a central disc with std > {min_std}")
        angle = float(rng.uniform(-max_angle, max_angle))
        if angles is not None:
            angle = float(angles[i])
        rotated = ndimage.rotate(crop, math.degrees(angle), reshape=False, order=3, mode="reflect")
        f = rotated[pad_h : pad_h + h, pad_w : pad_w + w]
        m = crop[pad_h : pad_h + h, pad_w : pad_w + w]
        if photometric:
            gamma = math.exp(rng_pixels.uniform(math.log(0.6), math.log(1.6)))
            f = rng_pixels.uniform(0.6, 1.0) * np.clip(f, 0.0, 1.0) ** gamma + rng_pixels.uniform(0.0, 0.2)
        if noise > 0:
            f = f + rng_pixels.normal(0.0, noise, f.shape)
            m = m + rng_pixels.normal(0.0, noise, m.shape)
        fixed.append(f)
        moving.append(m)
        used.append(angle)
        names.append(name)

    def stack(arrays: list[np.ndarray]) -> Tensor:
        return torch.from_numpy(np.stack(arrays)[:, None]).to(dtype)

    return RotatedPairs(stack(fixed), stack(moving), torch.tensor(used, dtype=dtype), tuple(names))
