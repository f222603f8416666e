"""Differentiable 2-D rotation: the functional layer.

Convention
----------
This is the one place the convention is written down; everything in rotstn
follows it and ``tests/test_oracles.py`` checks it against scipy and torch.

* Angles are in **radians**. Positive turns the content **counter-clockwise
  as displayed** (row 0 at the top, rows going down), the sign of
  ``scipy.ndimage.rotate``, kornia's ``rotate`` and
  ``torch.rot90(x, 1, dims=(-2, -1))``.
* The centre is ``(x, y)`` in pixels: x is the column, y the row, pixel
  centres at integers. The default is the image centre ``((W-1)/2, (H-1)/2)``.
* The rotation is a true rotation in pixel space whatever the aspect ratio;
  ``align_corners`` only says how grid_sample's [-1, 1] range maps onto pixels,
  so it changes what is sampled outside the image (padding) and never the
  interior.
* Output pixel ``p`` reads the input at ``c + R(θ)ᵀ·(p - c)`` in (x, y-down)
  coordinates, i.e. ``x_src = cx + cos θ·(x - cx) - sin θ·(y - cy)`` and
  ``y_src = cy + sin θ·(x - cx) + cos θ·(y - cy)``.
* A **rigid map** (rotation about an unknown point = rotation + translation) is
  a ``(B, 2, 3)`` pixel matrix ``M``: the input pixel that output pixel
  ``(x, y)`` shows is ``M @ (x, y, 1)`` (the map a warp samples with; for
  :func:`rotstn.register`, output = fixed and input = moving). With angle θ
  and translation ``t = (tx, ty)`` pixels (x right, y down),
  ``M = [A | c_in - A·(c_out + t)]`` with ``A = [[cos θ, -sin θ], [sin θ, cos θ]]``
  and ``c_in``, ``c_out`` the two image centres: the input turned by θ about its
  centre, then moved by ``t`` (centres on each other when ``t = 0``). So
  ``warp(x, θ)`` is ``rotate(x, θ)``, and ``warp(x, θ, t)`` is that rotation
  followed by a shift of the content by ``t``.

Gradient at the identity
------------------------
Bilinear sampling is piecewise linear with a kink on every pixel centre. At
θ = 0 (about any integer or half-integer centre) every sample lands on a pixel
centre, so the derivative there is one-sided: PyTorch's grid_sample takes, for
every pixel, the difference towards the next pixel (x + 1, y + 1). The angle
gradient at θ = 0 is thus a finite-difference estimate of the image gradient
shifted by half a pixel: it has the sign of the true derivative for natural
images, and optimisation started at θ = 0 moves off the kink in one step and
sees the ordinary gradient afterwards. ``mode="bicubic"`` is smooth there
(its derivative is continuous) if you need the exact two-sided derivative at
the identity. ``mode="nearest"`` is piecewise constant and gives the angle a
zero gradient everywhere.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from . import _kernels, _validate

__all__ = ["angle_difference", "rigid_matrix", "rotate", "rotation_matrix", "warp", "wrap_angle"]

Number = float | int
AngleLike = Tensor | Number
CenterLike = Tensor | tuple[float, float] | list[float] | None


def wrap_angle(angle: AngleLike) -> Tensor:
    """Wrap angles to the interval (-π, π].

    Args:
        angle: radians, any shape (a Python number gives a 0-d tensor).

    Returns:
        A tensor of the same shape with ``wrap_angle(a) ≡ a (mod 2π)``; the
        gradient is 1 everywhere except on the jump at ±π.

    Example:
        >>> wrap_angle(torch.tensor([3 * math.pi / 2, -math.pi, math.pi]))
        tensor([-1.5708,  3.1416,  3.1416])
    """
    a = angle if isinstance(angle, Tensor) else torch.tensor(float(angle))
    if not a.is_floating_point():
        a = a.to(torch.get_default_dtype())
    return math.pi - torch.remainder(math.pi - a, 2 * math.pi)


def angle_difference(a: AngleLike, b: AngleLike) -> Tensor:
    """Signed difference ``a - b`` wrapped to (-π, π] (broadcasting).

    Example:
        >>> angle_difference(torch.tensor(0.1), torch.tensor(2 * math.pi - 0.1))
        tensor(0.2000)
    """
    a = a if isinstance(a, Tensor) else torch.tensor(float(a))
    b = b if isinstance(b, Tensor) else torch.tensor(float(b))
    return wrap_angle(a - b)


def _coord_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision has 11 bits of mantissa: a 512-pixel coordinate would be
    # off by a quarter pixel. Coordinates are always at least float32.
    return torch.promote_types(dtype, torch.float32)


def _sampling_args(image: object, mode: object, padding_mode: object, align_corners: object) -> tuple:
    """The checked (B, C, H, W) image and sampling options shared by rotate and warp."""
    img = _validate.image(image)
    mode = _validate.choice(mode, _validate.MODES, "mode")
    padding_mode = _validate.choice(padding_mode, _validate.PADDING_MODES, "padding_mode")
    return img, mode, padding_mode, _validate.flag(align_corners, "align_corners")


def rotation_matrix(
    angle: AngleLike,
    size: tuple[int, int],
    center: CenterLike = None,
    align_corners: bool = False,
) -> Tensor:
    """The (B, 2, 3) ``affine_grid`` matrix of a pixel-space rotation.

    ``F.grid_sample(x, F.affine_grid(M, x.shape, align_corners=ac),
    align_corners=ac)`` with ``M = rotation_matrix(angle, (H, W), center, ac)``
    equals ``rotate(x, angle, center, align_corners=ac)``. The aspect ratio is
    folded in (rotating in the normalised [-1, 1]² square would shear a
    non-square image), and the matrix is built with ``torch.stack``, so
    gradients reach ``angle`` and ``center`` (``torch.tensor([cos, ...])``
    would silently cut them off).

    Args:
        angle: radians, counter-clockwise as displayed; number, ``()`` or ``(B,)``.
        size: ``(H, W)`` of the image the matrix is for.
        center: ``(x, y)`` pixels, ``(2,)`` or ``(B, 2)``; default the image centre.
        align_corners: the value you will pass to ``affine_grid``/``grid_sample``.

    Returns:
        ``(B, 2, 3)`` in the angle's floating dtype (at least float32).

    Example:
        >>> m = rotation_matrix(torch.tensor(0.5, requires_grad=True), (4, 8))
        >>> m.shape, m.grad_fn is not None
        (torch.Size([1, 2, 3]), True)
    """
    h, w = _validate.size(size)
    align_corners = _validate.flag(align_corners, "align_corners")
    like = next((t for t in (angle, center) if isinstance(t, Tensor)), torch.empty(0))
    dtype = _coord_dtype(like.dtype if like.is_floating_point() else torch.get_default_dtype())
    a = _validate.angle(angle, like, dtype, None)
    c = _validate.center(center, like, dtype, None)
    if c is None:
        c = torch.tensor([[(w - 1) / 2, (h - 1) / 2]], dtype=dtype, device=like.device)
    n = _validate.batch_size({"angle": a.shape[0], "center": c.shape[0]})
    a, c = a.expand(n), c.expand(n, 2)
    # pixel = scale * normalised + (size - 1) / 2 along each axis
    sx = w / 2 if not align_corners else max(w - 1, 1) / 2
    sy = h / 2 if not align_corners else max(h - 1, 1) / 2
    cos, sin = torch.cos(a), torch.sin(a)
    dx, dy = c[:, 0] - (w - 1) / 2, c[:, 1] - (h - 1) / 2
    tx = ((1 - cos) * dx + sin * dy) / sx
    ty = ((1 - cos) * dy - sin * dx) / sy
    row0 = torch.stack((cos, -sin * (sy / sx), tx), dim=-1)
    row1 = torch.stack((sin * (sx / sy), cos, ty), dim=-1)
    return torch.stack((row0, row1), dim=-2)


def rotate(
    image: Tensor,
    angle: AngleLike,
    center: CenterLike = None,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> Tensor:
    """Rotate images by ``angle`` radians about ``center``, differentiably.

    Convention: positive angles turn the content counter-clockwise as
    displayed (rows down), like ``scipy.ndimage.rotate`` and
    ``torch.rot90(x, 1, (-2, -1))``; ``center`` is ``(x, y)`` in pixels,
    default ``((W-1)/2, (H-1)/2)``. See the module docstring.

    Args:
        image: ``(B, C, H, W)`` or ``(C, H, W)``, any floating dtype. float16 and
            bfloat16 keep their dtype; coordinates and interpolation are computed
            in float32 (float64 for float64 images).
        angle: radians; a number, ``()`` or ``(B,)`` tensor.
        center: ``(x, y)`` pixels; ``(2,)`` or ``(B, 2)`` tensor or pair of numbers.
        mode: ``"bilinear"`` (default), ``"bicubic"`` (smooth gradient, also at
            θ = 0) or ``"nearest"`` (no gradient to the angle).
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"``: what is read
            outside the input.
        align_corners: grid_sample's convention; it only affects padding.

    Batch sizes broadcast: image, angle and centre each carry 1 or B entries,
    so one image rotated by a ``(B,)`` angle gives ``(B, C, H, W)``.

    Returns:
        The rotated images, same dtype and device, ``(B, C, H, W)``; ``(C, H, W)``
        when the image is 3-D and neither angle nor centre is batched.

    Differentiable with respect to image, angle and centre. At exactly θ = 0
    the bilinear angle gradient is one-sided (module docstring).

    Example:
        >>> x = torch.arange(9.0).view(1, 3, 3)
        >>> torch.equal(rotate(x, math.pi / 2).round(), torch.rot90(x, 1, (-2, -1)))
        True
    """
    img, mode, padding_mode, align_corners = _sampling_args(image, mode, padding_mode, align_corners)
    dtype = _coord_dtype(img.dtype)
    b, ch, h, w = img.shape
    hint = b if b != 1 else None
    a = _validate.angle(angle, img, dtype, hint)
    c = _validate.center(center, img, dtype, hint)
    batched = (
        image.dim() == 4
        or (isinstance(angle, Tensor) and angle.dim() == 1)
        or (c is not None and isinstance(center, Tensor) and center.dim() == 2)
    )
    n = _validate.batch_size({"image": b, "angle": a.shape[0], "center": 1 if c is None else c.shape[0]})
    if c is None:
        c = torch.tensor([[(w - 1) / 2, (h - 1) / 2]], dtype=dtype, device=img.device)
    if mode == "nearest" and (a.requires_grad or c.requires_grad) and torch.is_grad_enabled():
        warnings.warn(
            "rotate(mode='nearest') is piecewise constant: angle and center get zero gradient; "
            "use mode='bilinear' or 'bicubic' to learn them",
            stacklevel=2,
        )
    if n == 0:
        # Keep the graph so .backward() on an empty result still works.
        out = img[:0] + (a.sum() + c.sum()).to(img.dtype) * 0
    else:
        c = c.expand(n, 2)
        out = _kernels.warp(img.expand(n, ch, h, w), a.expand(n), c, c, mode, padding_mode, align_corners)
    return out if batched else out.squeeze(0)


TranslationLike = Tensor | tuple[float, float] | list[float] | None


def rigid_matrix(
    angle: AngleLike,
    translation: TranslationLike = None,
    size: tuple[int, int] = (1, 1),
    source_size: tuple[int, int] | None = None,
) -> Tensor:
    """The ``(B, 2, 3)`` pixel matrix of a rigid map (module docstring, "rigid map").

    ``M @ (x, y, 1)`` is the pixel of the source image (``source_size``) that
    output pixel ``(x, y)`` of an image of ``size`` shows. Differentiable in
    ``angle`` and ``translation``.

    Args:
        angle: radians, counter-clockwise as displayed; number, ``()`` or ``(B,)``.
        translation: ``(tx, ty)`` pixels, ``(2,)`` or ``(B, 2)``; default none.
        size: ``(H, W)`` of the output (for :func:`rotstn.register`: fixed).
        source_size: ``(H, W)`` of the source (moving); default ``size``.

    Returns:
        ``(B, 2, 3)`` in the angle's floating dtype (at least float32).

    Example:
        >>> m = rigid_matrix(math.pi / 2, (2.0, -1.0), (5, 5))
        >>> m.round(decimals=4) + 0.0  # output (x, y) shows source (3 - y, x - 2)
        tensor([[[ 0., -1.,  3.],
                 [ 1.,  0., -2.]]])
    """
    h, w = _validate.size(size)
    hs, ws = (h, w) if source_size is None else _validate.size(source_size, "source_size")
    like = next((t for t in (angle, translation) if isinstance(t, Tensor)), torch.empty(0))
    dtype = _coord_dtype(like.dtype if like.is_floating_point() else torch.get_default_dtype())
    a = _validate.angle(angle, like, dtype, None)
    t = _validate.pair(translation, "translation", like, dtype, None)
    if t is None:
        t = torch.zeros(1, 2, dtype=dtype, device=like.device)
    n = _validate.batch_size({"angle": a.shape[0], "translation": t.shape[0]})
    a, t = a.expand(n), t.expand(n, 2)
    cos, sin = torch.cos(a), torch.sin(a)
    # centre of the output moved by t: the point that shows the source's centre
    ox, oy = (w - 1) / 2 + t[:, 0], (h - 1) / 2 + t[:, 1]
    bx = (ws - 1) / 2 - (cos * ox - sin * oy)
    by = (hs - 1) / 2 - (sin * ox + cos * oy)
    row0 = torch.stack((cos, -sin, bx), dim=-1)
    row1 = torch.stack((sin, cos, by), dim=-1)
    return torch.stack((row0, row1), dim=-2)


def warp(
    image: Tensor,
    angle: AngleLike | None = None,
    translation: TranslationLike = None,
    *,
    matrix: Tensor | None = None,
    size: tuple[int, int] | None = None,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> Tensor:
    """Apply a rigid map (rotation + translation) to images, differentiably.

    Convention (module docstring, "rigid map"): ``warp(x, θ, t)`` turns the
    content by θ radians counter-clockwise as displayed about the image
    centre, then moves it by ``t = (tx, ty)`` pixels (x right, y down);
    ``warp(x, θ)`` equals ``rotate(x, θ)``. Equivalently, give the map as
    ``matrix``: output pixel ``(x, y)`` shows input pixel ``matrix @ (x, y, 1)``,
    e.g. the ``.matrix`` of :func:`rotstn.register` (then ``warp(moving,
    matrix=result.matrix, size=fixed.shape[-2:]) ≈ fixed``).

    Args:
        image: ``(B, C, H, W)`` or ``(C, H, W)``, any floating dtype.
        angle: radians; a number, ``()`` or ``(B,)``. Required unless ``matrix`` is given.
        translation: ``(tx, ty)`` pixels; ``(2,)`` or ``(B, 2)``; default no shift.
        matrix: ``(2, 3)`` or ``(B, 2, 3)`` rigid pixel matrix, instead of angle and
            translation; its 2×2 part must be a rotation (to 1e-3).
        size: ``(H, W)`` of the output, default the input's. The input's centre is
            placed on the output's centre (plus ``t``).
        mode, padding_mode, align_corners: as in :func:`rotate`.

    Batch sizes broadcast as in :func:`rotate`.

    Returns:
        ``(B, C, H_out, W_out)``, same dtype and device; ``(C, H_out, W_out)`` when
        nothing is batched.

    Differentiable with respect to image, angle and translation (or matrix).
    Same-size warps run on the fast CPU and Triton kernels (a translation
    moves the output centre against the input point it shows).

    Example:
        >>> x = torch.zeros(1, 5, 5); x[0, 2, 2] = 1.0
        >>> y = warp(x, 0.0, (1.0, -2.0))  # the bright pixel moves right 1, up 2
        >>> [int(i) for i in (y[0] == 1).nonzero()[0]]
        [0, 3]
    """
    img, mode, padding_mode, align_corners = _sampling_args(image, mode, padding_mode, align_corners)
    dtype = _coord_dtype(img.dtype)
    b, ch, h, w = img.shape
    ho, wo = (h, w) if size is None else _validate.size(size)
    hint = b if b != 1 else None
    if matrix is not None:
        if angle is not None or translation is not None:
            raise ValueError("give either matrix or angle (and translation), not both")
        m = _validate.rigid(matrix, img, dtype, hint)
        a = torch.atan2(m[:, 1, 0], m[:, 0, 0])
        # x_src = A·p + b: the output origin shows input pixel b.
        center = torch.zeros_like(m[:, :, 2])
        source = m[:, :, 2]
        batched = image.dim() == 4 or matrix.dim() == 3
        sizes = {"image": b, "matrix": m.shape[0]}
    else:
        if angle is None:
            raise ValueError("angle is required (or give matrix=)")
        a = _validate.angle(angle, img, dtype, hint)
        t = _validate.pair(translation, "translation", img, dtype, hint)
        source = torch.tensor([[(w - 1) / 2, (h - 1) / 2]], dtype=dtype, device=img.device)
        center = torch.tensor([[(wo - 1) / 2, (ho - 1) / 2]], dtype=dtype, device=img.device)
        if t is not None:
            center = center + t
        batched = (
            image.dim() == 4
            or (isinstance(angle, Tensor) and angle.dim() == 1)
            or (isinstance(translation, Tensor) and translation.dim() == 2)
        )
        sizes = {"image": b, "angle": a.shape[0], "translation": 1 if t is None else t.shape[0]}
    n = _validate.batch_size(sizes)
    if mode == "nearest" and (a.requires_grad or center.requires_grad) and torch.is_grad_enabled():
        warnings.warn(
            "warp(mode='nearest') is piecewise constant: angle and translation get zero gradient",
            stacklevel=2,
        )
    if n == 0:
        out = img[:0, :, :ho, :wo].new_zeros((0, ch, ho, wo)) + (a.sum() + center.sum()).to(img.dtype) * 0
    else:
        out = _kernels.warp(
            img.expand(n, ch, h, w),
            a.expand(n),
            center.expand(n, 2),
            source.expand(n, 2),
            mode,
            padding_mode,
            align_corners,
            None if (ho, wo) == (h, w) else (ho, wo),
        )
    return out if batched else out.squeeze(0)
