"""Offline pairs of rotated real images, for tests, benchmarks and examples.

The pictures are scikit-image's bundled ones (nothing is downloaded); the
warps are done by ``scipy.ndimage.rotate`` and ``scipy.ndimage.affine_transform``
(cubic spline), warpers independent of rotstn's. Both packages are needed only here (the ``dev`` and
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

__all__ = [
    "IMAGES",
    "PICTURES",
    "RigidPairs",
    "RotatedPairs",
    "bundled_image",
    "bundled_pictures",
    "rigid_pairs",
    "rotated_pairs",
]

IMAGES = ("camera", "coins", "moon", "astronaut", "retina", "brick", "grass", "gravel", "chelsea", "coffee")

# Every picture that ships inside an installed package (nothing downloaded), by family. Names without a
# prefix are scikit-image's ``skimage.data`` functions; ``matplotlib/NAME`` is a file of matplotlib's
# sample data. Benchmarks draw from all of them, not only from the ten in IMAGES.
PICTURES = {
    "photo": (
        "camera", "astronaut", "chelsea", "coffee", "rocket", "clock", "stereo_motorcycle",
        "matplotlib/grace_hopper",
    ),
    "texture": ("brick", "grass", "gravel"),
    "microscopy": ("cell", "coins", "immunohistochemistry", "retina", "microaneurysms"),
    "astro-remote": ("moon", "hubble_deep_field", "matplotlib/jacksboro_fault_dem", "matplotlib/topobathy"),
    "medical": ("matplotlib/s1045", "shepp_logan_phantom"),
    "document": ("page", "text"),
    "graphic": ("checkerboard", "logo", "colorwheel", "horse", "matplotlib/Minduka_Present_Blue_Pack"),
}  # fmt: skip


def bundled_pictures() -> dict[str, tuple[str, ...]]:
    """The names in :data:`PICTURES` that load with the packages installed here, by family.

    Example:
        >>> "camera" in bundled_pictures()["photo"]
        True
    """
    out = {}
    for family, names in PICTURES.items():
        ok = []
        for name in names:
            try:
                bundled_image(name)
            except (ImportError, OSError, ValueError):
                continue
            ok.append(name)
        if ok:
            out[family] = tuple(ok)
    return out


def _matplotlib_picture(name: str) -> np.ndarray:
    import gzip

    from matplotlib import cbook

    if name == "s1045":  # a 256² MRI slice, raw big-endian uint16
        with gzip.open(cbook.get_sample_data("s1045.ima.gz", asfileobj=False)) as fh:
            return np.frombuffer(fh.read(), ">u2").reshape(256, 256).astype(np.float64)
    if name in ("jacksboro_fault_dem", "topobathy"):  # elevation models
        with np.load(cbook.get_sample_data(f"{name}.npz", asfileobj=False)) as data:
            return np.asarray(data["elevation" if name == "jacksboro_fault_dem" else "topo"], np.float64)
    from matplotlib import image

    for ext in (".jpg", ".png"):
        try:
            return np.asarray(image.imread(cbook.get_sample_data(name + ext, asfileobj=False)))
        except (OSError, ValueError):
            continue
    raise ValueError(f"matplotlib ships no sample picture {name!r}")


@functools.lru_cache(maxsize=64)
def bundled_image(name: str) -> np.ndarray:
    """One of the pictures bundled with installed packages as a float64 grey image in [0, 1].

    Args:
        name: a name from :data:`IMAGES` or :data:`PICTURES` (any ``skimage.data``
            function that ships with the package works; ``matplotlib/NAME`` reads
            matplotlib's sample data).

    Returns:
        ``(H, W)`` read-only float64 array (it is cached); colour pictures are
        converted with ``skimage.color.rgb2gray``, other ranges scaled to [0, 1].
    """
    from skimage import color, data

    if name.startswith("matplotlib/"):
        img = _matplotlib_picture(name.split("/", 1)[1])
    else:
        loader = getattr(data, name, None)
        if loader is None or not callable(loader) or name.startswith(("download", "file", "lbp", "lfw")):
            raise ValueError(f"name must be a picture in skimage.data such as {IMAGES[0]!r}; got {name!r}")
        img = loader()
        if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
            img = img[0]
    img = np.asarray(img)
    if img.ndim == 3:
        img = img[..., :3].astype(np.float64)
        img = color.rgb2gray(img / 255.0 if img.max() > 1.0 else img)
    img = np.asarray(img, dtype=np.float64)
    low, high = float(img.min()), float(img.max())
    if low < 0.0 or high > 1.0:
        img = (img - low) / max(high - low, 1e-12) if high > 255.0 or low < 0.0 else img / 255.0
    else:
        img = img.copy()
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


@dataclass(frozen=True)
class RigidPairs:
    """Pairs with ``fixed(p) = moving(matrix @ (p, 1))`` wherever ``matrix @ (p, 1)`` lies in ``moving``.

    Attributes:
        fixed: ``(N, 1, H, W)``.
        moving: ``(N, 1, Hm, Wm)``.
        matrix: ``(N, 2, 3)`` float64, pixels, ``(x, y)`` order: the pixel of
            ``moving`` that shows fixed pixel ``(x, y)`` is ``matrix @ (x, y, 1)``.
        angle: ``(N,)`` float64 radians θ in (-π, π].
        translation: ``(N, 2)`` float64 pixels ``(tx, ty)`` (x right, y down).
        overlap: ``(N,)`` float64, the fraction of fixed pixels whose moving
            location lies inside ``moving`` (``0 <= x <= Wm - 1``, ``0 <= y <= Hm - 1``).
        names: the picture each pair was cut from; ``"fixed_name/moving_name"``
            for unrelated pairs.
    """

    fixed: Tensor
    moving: Tensor
    matrix: Tensor
    angle: Tensor
    translation: Tensor
    overlap: Tensor
    names: tuple[str, ...]


# Picture pixels (of the original picture) kept between any sampled location
# and the picture's edge, so that the spline's mirrored boundary never shows.
_MARGIN = 2


def _rigid_matrix(
    angle: np.ndarray, translation: np.ndarray, fixed_size: tuple[int, int], moving_size: tuple[int, int]
) -> np.ndarray:
    # (N, 2, 3) matrices [A | c_m - A (c_f + t)], the convention of RigidPairs.matrix.
    cos, sin = np.cos(angle), np.sin(angle)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    c_f = np.array([(fixed_size[1] - 1) / 2, (fixed_size[0] - 1) / 2])
    c_m = np.array([(moving_size[1] - 1) / 2, (moving_size[0] - 1) / 2])
    shift = c_m - np.einsum("nij,nj->ni", rot, c_f + translation)
    return np.concatenate([rot, shift[..., None]], -1)


def _overlap(matrix: np.ndarray, fixed_size: tuple[int, int], moving_size: tuple[int, int]) -> float:
    h, w = fixed_size
    x, y = np.arange(w, dtype=np.float64)[None, :], np.arange(h, dtype=np.float64)[:, None]
    qx = matrix[0, 0] * x + matrix[0, 1] * y + matrix[0, 2]
    inside = (qx >= 0) & (qx <= moving_size[1] - 1)
    qy = matrix[1, 0] * x + matrix[1, 1] * y + matrix[1, 2]
    inside &= (qy >= 0) & (qy <= moving_size[0] - 1)
    return float(inside.mean())


class _Picture:
    """A bundled picture upscaled by ``scale``: its cubic spline sampled at (row, column) / scale.

    Sampling the original picture's spline at scaled coordinates is what
    ``scipy.ndimage.zoom`` (cubic) does, without building the large picture:
    a 2048² pair costs two 2048² evaluations, not a 4000² zoom.
    """

    def __init__(self, name: str, scale: float) -> None:
        from scipy import ndimage

        self.name, self.scale = name, scale
        self.pixels = bundled_image(name)
        self.coeffs = _coefficients(name)
        # Where sampled locations may lie, in upscaled pixels: (low, high) per (row, column).
        self.bounds = [(scale * _MARGIN, scale * (side - 1 - _MARGIN)) for side in self.pixels.shape]
        self._affine = ndimage.affine_transform

    def sample(self, matrix: np.ndarray, offset: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """out[o] = upscaled[matrix @ o + offset], with o and the result in (row, column)."""
        return self._affine(
            self.coeffs,
            matrix / self.scale,
            offset=np.asarray(offset) / self.scale,
            output_shape=shape,
            order=3,
            mode="mirror",
            prefilter=False,
        )

    def crop(self, top: int, left: int, size: tuple[int, int]) -> np.ndarray:
        if self.scale == 1.0:
            return self.pixels[top : top + size[0], left : left + size[1]].copy()
        return self.sample(np.eye(2), np.array([top, left], dtype=np.float64), size)

    def std(self, top: float, bottom: float, left: float, right: float) -> float:
        """Grey-level spread of the original pixels under an upscaled box (inclusive bounds)."""
        s = self.scale
        rows = slice(max(0, math.floor(top / s)), math.ceil(bottom / s) + 1)
        cols = slice(max(0, math.floor(left / s)), math.ceil(right / s) + 1)
        return float(self.pixels[rows, cols].std())

    def std_at(self, rows: np.ndarray, cols: np.ndarray) -> float:
        """Grey-level spread of the original pixels nearest to upscaled (row, column) points."""
        r = np.clip(np.rint(rows / self.scale).astype(int), 0, self.pixels.shape[0] - 1)
        c = np.clip(np.rint(cols / self.scale).astype(int), 0, self.pixels.shape[1] - 1)
        return float(self.pixels[r, c].std())


@functools.lru_cache(maxsize=32)
def _coefficients(name: str) -> np.ndarray:
    from scipy import ndimage

    coeffs = ndimage.spline_filter(bundled_image(name), order=3, mode="mirror")
    coeffs.setflags(write=False)
    return coeffs


def _scale_for(name: str, lengths: tuple[float, float]) -> float:
    # The smallest factor (in steps of 0.01) that gives the picture, within
    # its margins, the (rows, columns) lengths asked for; 1 when it has them.
    shape = bundled_image(name).shape
    need = max(length / (side - 1 - 2 * _MARGIN) for length, side in zip(lengths, shape, strict=True))
    return 1.0 if need <= 1.0 else math.ceil(need * 100 - 1e-9) / 100


def _pair_lengths(
    size: tuple[int, int], moving_size: tuple[int, int], max_shift: float
) -> tuple[float, float]:
    # Upscaled lengths (rows, columns) spanned by the fixed crop and the moving
    # window together, at the worst angle and shift.
    radius = math.hypot((moving_size[0] - 1) / 2, (moving_size[1] - 1) / 2)
    lengths = []
    for side in size:
        centre, shift = (side - 1) / 2, max_shift * side
        lengths.append(max(side - 1.0, centre + shift + radius) - min(0.0, centre - shift - radius))
    return lengths[0], lengths[1]


def rigid_pairs(
    n: int,
    size: tuple[int, int] = (128, 128),
    *,
    moving_size: tuple[int, int] | None = None,
    max_shift: float = 0.25,
    min_shift: float = 0.0,
    noise: float = 0.0,
    photometric: bool = False,
    unrelated: bool = False,
    min_overlap: float = 0.0,
    max_overlap: float = 1.0,
    images: tuple[str, ...] = IMAGES,
    min_std: float = 0.05,
    pivot: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> RigidPairs:
    """Cut ``n`` (fixed, moving) pairs related by a rotation about an unknown centre from bundled pictures.

    Convention:
        Pixel coordinates ``(x, y)``: x = column, y = row, pixel centres at
        integers, image centre ``c = ((W - 1) / 2, (H - 1) / 2)``; angles in
        radians, positive = counter-clockwise as displayed (rows down), the sign
        of ``scipy.ndimage.rotate``. For angle θ and translation
        ``t = (tx, ty)``, ``matrix = [A | c_m - A (c_f + t)]`` with
        ``A = [[cos θ, -sin θ], [sin θ, cos θ]]``, and
        ``fixed(p) = moving(c_m + A (p - c_f - t))``: ``moving`` turned by θ
        about its centre (like ``scipy.ndimage.rotate(moving, degrees(θ))``),
        then shifted by ``t`` pixels, shows ``fixed``. Equivalently, ``moving``
        turned by θ about the fixed point of the map (a random point, anywhere
        when ``t`` is large) — a rotation about an unknown centre.

    ``fixed`` is a crop of a bundled picture; ``moving`` is made from the same
    picture by ``scipy.ndimage.affine_transform`` (cubic spline, independent
    of rotstn) so that ``moving(matrix @ (p, 1)) = fixed(p)``. The crop is
    placed so that the whole of ``moving`` comes from inside the picture: no
    padding anywhere. Pictures too small for the geometry (large sizes such as
    512² or 2048²) are upscaled, by the smallest factor (in steps of 0.01)
    that holds the worst angle and shift: both images are then sampled from
    the picture's cubic spline at scaled coordinates, as
    ``scipy.ndimage.zoom`` (cubic) followed by the warp would, in one
    interpolation and without building the large picture (about a second a
    2048² pair). Upscaled pictures are smoother than the originals.

    Args:
        n: number of pairs; the pictures are used in turn.
        size: ``(H, W)`` of ``fixed``.
        moving_size: ``(Hm, Wm)`` of ``moving``; ``size`` when None.
        max_shift: largest ``|tx| / W`` and ``|ty| / H``.
        min_shift: smallest ``|tx| / W`` and ``|ty| / H``; each component is
            drawn uniformly between the two with a random sign. Shifts over
            0.25 give small overlaps (see ``overlap``).
        noise: standard deviation of Gaussian noise added independently to
            both images (pixel values are in [0, 1]).
        photometric: apply a random gamma (0.6–1.6), contrast (0.6–1.0) and
            brightness offset (0–0.2) to ``fixed`` only.
        unrelated: make ``fixed`` a crop of the next picture in ``images``
            instead (``matrix`` then describes how ``moving`` was made, but no
            transform relates the pair): pairs a registration should reject.
        min_overlap: pairs whose ``overlap`` is below this are redrawn.
        max_overlap: pairs whose ``overlap`` is above this are redrawn (0.1
            with ``min_shift=0.5, max_shift=0.9`` gives pairs with under 10 %
            overlap).
        images: names of bundled pictures (see :func:`bundled_image`).
        min_std: pairs whose ``fixed`` or ``moving`` shows picture pixels with a
            grey-level standard deviation below this are redrawn (``moving`` is
            checked on its turned window, not that window's bounding box).
        seed: seeds the geometry, crops, noise and photometric changes; each
            pair has its own streams, and the geometry and crops do not depend
            on ``noise`` and ``photometric``.
        dtype: floating dtype of ``fixed`` and ``moving``.

    Returns:
        A :class:`RigidPairs`.

    Example:
        >>> pairs = rigid_pairs(2, (32, 48), moving_size=(40, 40))
        >>> pairs.fixed.shape, pairs.moving.shape, pairs.matrix.shape
        (torch.Size([2, 1, 32, 48]), torch.Size([2, 1, 40, 40]), torch.Size([2, 2, 3]))
        >>> bool((pairs.translation.abs() <= 0.25 * torch.tensor([48, 32])).all())
        True
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    size = _check_size("size", size)
    moving_size = size if moving_size is None else _check_size("moving_size", moving_size)
    if not (math.isfinite(min_shift) and math.isfinite(max_shift) and 0 <= min_shift <= max_shift):
        raise ValueError(
            "min_shift and max_shift must satisfy 0 <= min_shift <= max_shift, "
            f"got {min_shift!r} and {max_shift!r}"
        )
    if not 0 <= min_overlap <= max_overlap <= 1:
        raise ValueError(
            "min_overlap and max_overlap must satisfy 0 <= min_overlap <= max_overlap <= 1, "
            f"got {min_overlap!r} and {max_overlap!r}"
        )
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if not (math.isfinite(pivot) and 0 <= pivot <= 1):
        raise ValueError(f"pivot must be a number in [0, 1], got {pivot!r}")
    if len(images) == 0 or (unrelated and len(set(images)) < 2):
        raise ValueError(f"images must name at least {2 if unrelated else 1} picture(s), got {images!r}")
    for name in images:
        bundled_image(name)
    h, w = size
    hm, wm = moving_size
    c_m = np.array([(wm - 1) / 2, (hm - 1) / 2])
    fixed: list[np.ndarray | None] = [None] * n
    moving: list[np.ndarray | None] = [None] * n
    matrices = np.zeros((n, 2, 3))
    angles, shifts, overlaps = np.zeros(n), np.zeros((n, 2)), np.zeros(n)
    names = [""] * n
    # A pivot off the centre moves the turned window by up to |u - Aᵀu| <= 2|u| on top of the shift.
    lengths = _pair_lengths(size, moving_size, max_shift + pivot)
    for i in range(n):
        name = images[i % len(images)]
        picture = _Picture(name, _scale_for(name, lengths))
        rng = np.random.default_rng([seed, i])
        angle, shift, matrix, top, left = _draw_geometry(
            rng, picture, size, moving_size, min_shift, max_shift, min_overlap, max_overlap, min_std, pivot
        )
        # The map from moving pixels to upscaled picture pixels, moving(q) = picture(G q):
        # G(q) = Aᵀ (q - c_m) + c_f + t + crop offset, written in (row, column) for scipy.
        rot_t = matrix[:, :2].T
        origin = rot_t @ (-c_m) + np.array([(w - 1) / 2 + left, (h - 1) / 2 + top]) + shift
        moving[i] = picture.sample(rot_t[::-1, ::-1], origin[::-1], moving_size)
        fixed[i] = picture.crop(top, left, size)
        matrices[i], angles[i], shifts[i] = matrix, angle, shift
        overlaps[i] = _overlap(matrix, size, moving_size)
        names[i] = name
    if unrelated:
        for i in range(n):
            other = _next_other(images, i)
            rng = np.random.default_rng([seed, i, 2])
            picture = _Picture(other, _scale_for(other, (h - 1, w - 1)))
            fixed[i] = _flat_free_crop(rng, picture, size, min_std)
            names[i] = f"{other}/{names[i]}"
    for i in range(n):
        rng_pixels = np.random.default_rng([seed, i, 1])
        f, m = fixed[i], moving[i]
        if photometric:
            gamma = math.exp(rng_pixels.uniform(math.log(0.6), math.log(1.6)))
            f = rng_pixels.uniform(0.6, 1.0) * np.clip(f, 0.0, 1.0) ** gamma + rng_pixels.uniform(0.0, 0.2)
        if noise > 0:
            f = f + rng_pixels.normal(0.0, noise, f.shape)
            m = m + rng_pixels.normal(0.0, noise, m.shape)
        fixed[i], moving[i] = f, m

    def stack(arrays: list) -> Tensor:
        return torch.from_numpy(np.stack(arrays)[:, None]).to(dtype)

    return RigidPairs(
        stack(fixed),
        stack(moving),
        torch.from_numpy(matrices),
        torch.from_numpy(angles),
        torch.from_numpy(shifts),
        torch.from_numpy(overlaps),
        tuple(names),
    )


def _check_size(label: str, size: tuple[int, int]) -> tuple[int, int]:
    if (
        len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)
        or min(size) < 2
    ):
        raise ValueError(f"{label} must be (H, W) with ints >= 2, got {size!r}")
    return int(size[0]), int(size[1])


def _next_other(images: tuple[str, ...], i: int) -> str:
    name = images[i % len(images)]
    for k in range(1, len(images) + 1):
        other = images[(i + k) % len(images)]
        if other != name:
            return other
    raise AssertionError("unreachable: images holds two different names")


def _flat_free_crop(
    rng: np.random.Generator, picture: _Picture, size: tuple[int, int], min_std: float
) -> np.ndarray:
    h, w = size
    (top_lo, top_hi), (left_lo, left_hi) = picture.bounds
    for _ in range(1000):
        top = int(rng.integers(math.ceil(top_lo), math.floor(top_hi - (h - 1)) + 1))
        left = int(rng.integers(math.ceil(left_lo), math.floor(left_hi - (w - 1)) + 1))
        if picture.std(top, top + h - 1, left, left + w - 1) > min_std:
            return picture.crop(top, left, size)
    raise ValueError(f"no crop of {picture.name!r} has a grey-level std > min_std={min_std}")


def _draw_geometry(
    rng: np.random.Generator,
    picture: _Picture,
    size: tuple[int, int],
    moving_size: tuple[int, int],
    min_shift: float,
    max_shift: float,
    min_overlap: float,
    max_overlap: float,
    min_std: float,
    pivot: float = 0.0,
) -> tuple[float, np.ndarray, np.ndarray, int, int]:
    # Angle, shift, matrix and crop offset (top, left) of one pair: the fixed
    # crop and the moving window, mapped into the picture, stay within its bounds.
    h, w = size
    hm, wm = moving_size
    (top_lo, top_hi), (left_lo, left_hi) = picture.bounds
    for _ in range(1000):
        angle = math.pi - rng.uniform(0.0, 2 * math.pi)
        magnitude = rng.uniform(min_shift, max_shift, 2) * np.array([w, h])
        shift = np.where(rng.random(2) < 0.5, -magnitude, magnitude)
        if pivot > 0:
            # Turned about the point c_f + u, which stays put: t = u - Aᵀu, then the shift on top.
            u = rng.uniform(-0.5, 0.5, 2) * pivot * np.array([w, h])
            cos, sin = math.cos(angle), math.sin(angle)
            shift = shift + u - np.array([cos * u[0] + sin * u[1], -sin * u[0] + cos * u[1]])
        matrix = _rigid_matrix(np.array([angle]), shift[None], size, moving_size)[0]
        overlap = _overlap(matrix, size, moving_size)
        if not min_overlap <= overlap <= max_overlap:
            continue
        cos, sin = abs(math.cos(angle)), abs(math.sin(angle))
        # Half extents of the turned moving window, and its centre relative to the crop.
        ex = cos * (wm - 1) / 2 + sin * (hm - 1) / 2
        ey = sin * (wm - 1) / 2 + cos * (hm - 1) / 2
        cx, cy = (w - 1) / 2 + shift[0], (h - 1) / 2 + shift[1]
        # Relative to the crop's top-left pixel, the box that holds both images.
        x0, x1 = min(0.0, cx - ex), max(w - 1.0, cx + ex)
        y0, y1 = min(0.0, cy - ey), max(h - 1.0, cy + ey)
        lefts = math.ceil(left_lo - x0), math.floor(left_hi - x1)
        tops = math.ceil(top_lo - y0), math.floor(top_hi - y1)
        if lefts[0] > lefts[1] or tops[0] > tops[1]:
            continue
        # Where a grid of moving's pixels lies in the picture, relative to the crop's top-left pixel (the
        # turned window itself: its bounding box can hold content that moving does not show).
        qx, qy = np.meshgrid(np.linspace(0, wm - 1, 32), np.linspace(0, hm - 1, 32))
        du, dv = qx - (wm - 1) / 2, qy - (hm - 1) / 2
        px = matrix[0, 0] * du + matrix[1, 0] * dv + cx
        py = matrix[0, 1] * du + matrix[1, 1] * dv + cy
        for _ in range(100):
            top, left = int(rng.integers(tops[0], tops[1] + 1)), int(rng.integers(lefts[0], lefts[1] + 1))
            if (
                picture.std(top, top + h - 1, left, left + w - 1) > min_std
                and picture.std_at(py + top, px + left) > min_std
            ):
                return angle, shift, matrix, top, left
    raise ValueError(
        f"no pair of picture {picture.name!r} meets the constraints "
        f"(overlap in [{min_overlap}, {max_overlap}], "
        f"shift in [{min_shift}, {max_shift}], std > min_std={min_std}) after 1000 draws"
    )
