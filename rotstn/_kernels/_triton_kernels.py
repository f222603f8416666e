"""Triton kernels of the fused rotation warp (imported only by ``triton_warp``).

Each program takes ``BLOCK`` output pixels of one batch element, computes
their source coordinates from (θ, centre) in float32 registers and walks the
channels, so no sampling grid ever reaches memory. The geometry and the
padding rules are those of ``reference.warp`` (``F.grid_sample`` with the
pixel grid of ``reference.source_coords``), gradients included.

This module imports triton at the top; ``triton_warp`` loads it lazily, once
compiled and, for CPU tensors, once more under ``TRITON_INTERPRET=1``.
"""

import triton
import triton.language as tl

ZEROS = tl.constexpr(0)
BORDER = tl.constexpr(1)
REFLECTION = tl.constexpr(2)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _pad(coord, size, PADDING: tl.constexpr, ALIGN: tl.constexpr):
    """Apply grid_sample's padding rule to a pixel coordinate along an axis of ``size``.

    Returns the coordinate to sample at and its derivative with respect to the
    input coordinate (±1 or 0), as ``grid_sampler_compute_source_index_set_grad``.
    """
    hi = size - 1.0
    mult = tl.full(coord.shape, 1.0, tl.float32)
    if PADDING == ZEROS:
        # Corners more than a pixel outside all read zero; clamping keeps the
        # float -> int conversion of far-away coordinates defined.
        coord = tl.minimum(tl.maximum(coord, -2.0), size + 1.0)
    else:
        if PADDING == REFLECTION:
            # Mirror about -0.5 and size - 0.5 (align_corners=False) or about
            # 0 and size - 1 (align_corners=True), as grid_sample does.
            if ALIGN:
                low = 0.0
                span = hi
            else:
                low = -0.5
                span = size * 1.0
            d = coord - low
            mult = tl.where(d < 0.0, -1.0, 1.0)
            d = tl.abs(d)
            flips = tl.floor(d / span)
            extra = d - flips * span
            odd = (flips - 2.0 * tl.floor(flips * 0.5)) == 1.0
            coord = tl.where(odd, span - extra, extra) + low
            mult = tl.where(odd, -mult, mult)
        # Border (and reflection, for rounding) clamps to [0, size - 1]; the
        # edges themselves count as outside for the gradient, as in PyTorch.
        mult = tl.where((coord > 0.0) & (coord < hi), mult, 0.0)
        coord = tl.minimum(tl.maximum(coord, 0.0), hi)
    return coord, mult


@triton.jit
def _geometry(angle_ptr, center_ptr, source_ptr, b, s_a, s_cb, s_ck, s_sb, s_sk, offs, W):
    """Batch element ``b``'s source point, cos and sin, and the (u, v) = p - c of pixels ``offs``."""
    theta = tl.load(angle_ptr + b * s_a)
    cx = tl.load(center_ptr + b * s_cb)
    cy = tl.load(center_ptr + b * s_cb + s_ck)
    sx = tl.load(source_ptr + b * s_sb)
    sy = tl.load(source_ptr + b * s_sb + s_sk)
    cos = tl.cos(theta)
    sin = tl.sin(theta)
    u = (offs % W).to(tl.float32) - cx
    v = (offs // W).to(tl.float32) - cy
    return sx, sy, cos, sin, u, v


@triton.jit
def _corners(x, y, valid, H, W, s_ih, s_iw):
    """Bilinear corners of (x, y): the weights' factors, in-image masks, strided offset of (x0, y0)."""
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    # Written as grid_sample writes them, so values agree to the last bits.
    tx0 = x0f + 1.0 - x
    tx1 = x - x0f
    ty0 = y0f + 1.0 - y
    ty1 = y - y0f
    in_x0 = (x0 >= 0) & (x0 < W)
    in_x1 = (x0 + 1 >= 0) & (x0 + 1 < W)
    in_y0 = valid & (y0 >= 0) & (y0 < H)
    in_y1 = valid & (y0 + 1 >= 0) & (y0 + 1 < H)
    o00 = y0.to(tl.int64) * s_ih + x0.to(tl.int64) * s_iw
    return x0, y0, tx0, tx1, ty0, ty1, in_y0 & in_x0, in_y0 & in_x1, in_y1 & in_x0, in_y1 & in_x1, o00


@triton.jit
def warp_forward(
    img_ptr,
    out_ptr,
    angle_ptr,
    center_ptr,
    source_ptr,
    C,
    H,
    W,
    s_ib,
    s_ic,
    s_ih,
    s_iw,
    s_a,
    s_cb,
    s_ck,
    s_sb,
    s_sk,
    PADDING: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < H * W
    geometry = (angle_ptr, center_ptr, source_ptr, b, s_a, s_cb, s_ck, s_sb, s_sk, offs, W)
    sx, sy, cos, sin, u, v = _geometry(*geometry)
    x, _ = _pad(sx + cos * u - sin * v, W * 1.0, PADDING, ALIGN)
    y, _ = _pad(sy + sin * u + cos * v, H * 1.0, PADDING, ALIGN)

    _, _, tx0, tx1, ty0, ty1, m00, m01, m10, m11, o00 = _corners(x, y, valid, H, W, s_ih, s_iw)
    w00 = tx0 * ty0
    w01 = tx1 * ty0
    w10 = tx0 * ty1
    w11 = tx1 * ty1
    o01 = o00 + s_iw
    o10 = o00 + s_ih
    o11 = o10 + s_iw

    src = img_ptr + b * s_ib
    dst = out_ptr + b * C * H * W + offs
    for _c in range(C):
        acc = tl.load(src + o00, mask=m00, other=0.0).to(tl.float32) * w00
        acc += tl.load(src + o01, mask=m01, other=0.0).to(tl.float32) * w01
        acc += tl.load(src + o10, mask=m10, other=0.0).to(tl.float32) * w10
        acc += tl.load(src + o11, mask=m11, other=0.0).to(tl.float32) * w11
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=valid)
        src += s_ic
        dst += H * W


@triton.jit
def warp_backward(
    img_ptr,
    gout_ptr,
    gimg_ptr,
    gpart_ptr,
    angle_ptr,
    center_ptr,
    source_ptr,
    C,
    H,
    W,
    s_ib,
    s_ic,
    s_ih,
    s_iw,
    s_a,
    s_cb,
    s_ck,
    s_sb,
    s_sk,
    PADDING: tl.constexpr,
    ALIGN: tl.constexpr,
    NEED_IMAGE: tl.constexpr,
    NEED_GEOMETRY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < H * W
    geometry = (angle_ptr, center_ptr, source_ptr, b, s_a, s_cb, s_ck, s_sb, s_sk, offs, W)
    sx, sy, cos, sin, u, v = _geometry(*geometry)
    x, dx_pad = _pad(sx + cos * u - sin * v, W * 1.0, PADDING, ALIGN)
    y, dy_pad = _pad(sy + sin * u + cos * v, H * 1.0, PADDING, ALIGN)

    x0, y0, tx0, tx1, ty0, ty1, m00, m01, m10, m11, o00 = _corners(x, y, valid, H, W, s_ih, s_iw)
    # grad-image is a fresh contiguous float32 tensor, whatever the image strides.
    q00 = y0.to(tl.int64) * W + x0.to(tl.int64)

    gout = gout_ptr + b * C * H * W + offs
    src = img_ptr + b * s_ib
    gimg = gimg_ptr + b * C * H * W
    gx = tl.full((BLOCK,), 0.0, tl.float32)
    gy = tl.full((BLOCK,), 0.0, tl.float32)
    for _c in range(C):
        g = tl.load(gout, mask=valid, other=0.0).to(tl.float32)
        if NEED_IMAGE:
            # Relaxed: the adds only need to be atomic, not ordered; the
            # default acq_rel puts a fence around every one of them.
            tl.atomic_add(gimg + q00, g * tx0 * ty0, mask=m00, sem="relaxed")
            tl.atomic_add(gimg + q00 + 1, g * tx1 * ty0, mask=m01, sem="relaxed")
            tl.atomic_add(gimg + q00 + W, g * tx0 * ty1, mask=m10, sem="relaxed")
            tl.atomic_add(gimg + q00 + W + 1, g * tx1 * ty1, mask=m11, sem="relaxed")
        if NEED_GEOMETRY:
            v00 = tl.load(src + o00, mask=m00, other=0.0).to(tl.float32)
            v01 = tl.load(src + o00 + s_iw, mask=m01, other=0.0).to(tl.float32)
            v10 = tl.load(src + o00 + s_ih, mask=m10, other=0.0).to(tl.float32)
            v11 = tl.load(src + o00 + s_ih + s_iw, mask=m11, other=0.0).to(tl.float32)
            gx += g * ((v01 - v00) * ty0 + (v11 - v10) * ty1)
            gy += g * ((v10 - v00) * tx0 + (v11 - v01) * tx1)
        gout += H * W
        src += s_ic
        gimg += H * W

    if NEED_GEOMETRY:
        gx *= dx_pad
        gy *= dy_pad
        # x = sx + cos·u - sin·v and y = sy + sin·u + cos·v with (u, v) = p - c: the sums of
        # (gx, gy) are the source point's gradient; the centre's follows from them (triton_warp.py).
        g_theta = gx * (-sin * u - cos * v) + gy * (cos * u - sin * v)
        part = gpart_ptr + (b * tl.num_programs(0) + pid) * 3
        tl.store(part, tl.reduce(g_theta, 0, _add))
        tl.store(part + 1, tl.reduce(gx, 0, _add))
        tl.store(part + 2, tl.reduce(gy, 0, _add))
