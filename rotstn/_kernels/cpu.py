"""The CPU fast path: one custom autograd function around aten's grid sampler.

Where the time goes without it (B = 64, 128², one channel, two threads): the
plain recipe builds an (N, H, W, 3) base grid and a batched matmul in
``affine_grid``, and rebuilds both in backward; the reference path builds the
grid from about ten full-size (B, H, W) temporaries and carries the grid
gradient back through all of them. The sampler itself is the smaller part.
Here:

* forward writes the normalised grid with one broadcast add of a (B, 2, 1, W)
  column term and a (B, 2, H, 1) row term (both computed in float64 and
  rounded once each, then once more in the add) into two planes, and hands aten's
  ``grid_sampler_2d`` a permuted (B, H, W, 2) view of them, which it reads
  directly;
* backward asks ``grid_sampler_2d_backward`` only for the gradients that are
  needed (its ``output_mask``) and reduces the (B, H, W, 2) grid gradient to
  dθ and S = Σ (∂L/∂x_src, ∂L/∂y_src) in one pass: the source coordinates are
  separable, ``x_src = sx + cos θ·u - sin θ·v`` with ``u_j = j - cx`` and
  ``v_i = i - cy``, so every sum needed is a sum over i weighted by 1 or
  ``v_i`` (one batched matmul over the gradient) followed by a small sum over
  j weighted by 1 or ``u_j``. S is the source point's gradient; the centre's
  follows from it (``_center_and_source_grads``).

Bilinear with zero padding on real CPU tensors goes one step further when the
compiled kernel (``compiled.py``, ``rotate_cpu.c``) could be built: forward and
backward are each one fused pass in C over the pixels, vectorised on AVX2 and
AVX-512 (the variant is picked at run time; corners come in as 8-byte loads of
row pairs in float32, masked gathers in float64), with no grid
at all and dθ and S accumulated per sample. Other modes and paddings, traced
calls (``torch.compile``, export, ``torch.jit``), and machines without a C
compiler use aten's sampler as above.

Double backward (``create_graph=True``) recomputes the gradient through the
reference path, which is made of differentiable ops.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from . import compiled, machine, reference

# aten's integer codes for grid_sampler_2d's interpolation and padding modes.
_MODE = {"bilinear": 0, "nearest": 1, "bicubic": 2}
_PADDING = {"zeros": 0, "border": 1, "reflection": 2}


def _scale(n: int, align_corners: bool) -> tuple[float, float]:
    """(a, b) with ``normalised = a·pixel + b`` along an axis of n pixels (as ``reference.normalize``)."""
    if align_corners:
        return (2.0 / (n - 1), -1.0) if n > 1 else (0.0, 0.0)
    return 2.0 / n, 1.0 / n - 1.0


def _grid(
    angle: Tensor, center: Tensor, source: Tensor, h: int, w: int, align_corners: bool, dtype: torch.dtype
) -> Tensor:
    """The (B, H, W, 2) normalised sampling grid for (B,) angles, (B, 2) centres and source points.

    It is stored as two planes (B, 2, H, W) and returned as a permuted view:
    the planar broadcast add runs along contiguous rows (an interleaved
    (B, H, W, 2) add measured eight times slower), and aten's CPU sampler reads
    planar grids without a copy.
    """
    wide = torch.promote_types(dtype, torch.float64)
    b, device = angle.shape[0], angle.device
    cos, sin = torch.cos(angle.to(wide)), torch.sin(angle.to(wide))
    cx, cy = center.to(wide).unbind(1)
    sx, sy = source.to(wide).unbind(1)
    ax, bx = _scale(w, align_corners)
    ay, by = _scale(h, align_corners)
    # normalised (x, y) = (a_x·sx + b_x, a_y·sy + b_y) + (a_x·cos, a_y·sin)·u_j + (-a_x·sin, a_y·cos)·v_i
    base = torch.stack((sx * ax + bx, sy * ay + by), dim=1).view(b, 2, 1)
    per_u = torch.stack((cos * ax, sin * ay), dim=1).view(b, 2, 1)
    per_v = torch.stack((sin * -ax, cos * ay), dim=1).view(b, 2, 1)
    u = torch.arange(w, dtype=wide, device=device).view(1, 1, w) - cx.view(b, 1, 1)
    v = torch.arange(h, dtype=wide, device=device).view(1, 1, h) - cy.view(b, 1, 1)
    cols = torch.addcmul(base, per_u, u).to(dtype).view(b, 2, 1, w)
    rows = (per_v * v).to(dtype).view(b, 2, h, 1)
    return torch.add(cols, rows).permute(0, 2, 3, 1)


def _real_cpu(t: Tensor) -> bool:
    # Fake, meta, functorch-wrapped or other subclassed tensors have no memory the C kernel can read.
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.device.type == "cpu"
        and t.layout == torch.strided
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def _tracing() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", None)
    return (
        torch.compiler.is_compiling()
        or (exporting is not None and exporting())
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
    )


def kernel_serves(
    image: Tensor,
    angle: Tensor,
    center: Tensor,
    source: Tensor,
    mode: str,
    padding_mode: str,
    align_corners: bool,
) -> bool:
    """Whether the compiled kernel runs this call (and builds it on first use).

    In pixels, zero padding is the same for both ``align_corners`` except along
    an axis of one pixel, which ``align_corners=True`` samples at pixel 0 for
    every coordinate (``reference.normalize``); those calls stay on aten.
    """
    h, w = image.shape[-2:]
    return (
        mode == "bilinear"
        and padding_mode == "zeros"
        and not (align_corners and min(h, w) == 1)
        and (h + 2) * (w + 2) < 2**31  # the kernel's gathers index a channel in int32
        and angle.dtype in (torch.float32, torch.float64)
        and not _tracing()
        and all(_real_cpu(t) for t in (image, angle, center, source))
        and compiled.library() is not None
    )


def _kernel_args(
    image: Tensor, angle: Tensor, center: Tensor, source: Tensor, with_par: bool = True
) -> tuple[Tensor, int, Tensor | None]:
    """(samples, batch stride, (B, 6) cos, sin, cx, cy, sx, sy in float64, or None) for the C kernel."""
    src = image if image.dtype == angle.dtype else image.to(angle.dtype)
    # A broadcast image (stride 0 over the batch) is read in place; anything else non-contiguous is copied.
    if src.shape[0] > 1 and src.stride(0) == 0 and src[0].is_contiguous():
        stride = 0
    else:
        src = src.contiguous()
        stride = src.shape[1] * src.shape[2] * src.shape[3]
    if not with_par:
        return src, stride, None
    a = angle.detach().to(torch.float64)
    points = (center.detach().to(torch.float64), source.detach().to(torch.float64))
    par = torch.cat((torch.cos(a)[:, None], torch.sin(a)[:, None], *points), 1)
    return src, stride, par.contiguous()


def _kernel_forward(
    image: Tensor, angle: Tensor, center: Tensor, source: Tensor, derivatives: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The output, the kernel's (B, 6) parameters and, when asked, the (B, 2, C, H, W) derivatives.

    The derivatives (∂out/∂x, ∂out/∂y per channel, in the sampling dtype) let the backward's θ and
    point sums skip reading the image's corners again; both are kept for the backward.
    """
    src, stride, par = _kernel_args(image, angle, center, source)
    b, c, h, w = src.shape
    out = torch.empty((b, c, h, w), dtype=src.dtype)
    deriv = torch.empty((b, 2, c, h, w), dtype=src.dtype) if derivatives else None
    lib = compiled.library()
    fn = lib.rotstn_forward_f32 if src.dtype == torch.float32 else lib.rotstn_forward_f64
    status = fn(
        src.data_ptr(),
        stride,
        out.data_ptr(),
        deriv.data_ptr() if deriv is not None else None,
        par.data_ptr(),
        *(b, c, h, w),
        torch.get_num_threads(),
    )
    if status:
        raise MemoryError("rotstn's compiled CPU kernel could not allocate its row buffers")
    return out.to(image.dtype), par, deriv


def _kernel_backward(
    grad_out: Tensor,
    image: Tensor,
    angle: Tensor,
    center: Tensor,
    source: Tensor,
    need_image: bool,
    need_geo: bool,
    par: Tensor | None = None,
    deriv: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Image gradient, dθ (B,) and S = Σ (∂L/∂x_src, ∂L/∂y_src) (B, 2), each None when not asked for.

    ``par``: the forward's (B, 6) kernel parameters, else computed again; ``deriv``: the forward's
    derivatives (``_kernel_forward``), which the θ and point sums then read instead of the image.
    """
    src, stride, computed = _kernel_args(image, angle, center, source, par is None)
    par = computed if par is None else par
    b, c, h, w = src.shape
    grad = grad_out.to(src.dtype).contiguous()
    grad_image = torch.empty((b, c, h, w), dtype=src.dtype) if need_image else None
    geo = torch.empty((b, 3), dtype=torch.float64) if need_geo else None
    lib = compiled.library()
    fn = lib.rotstn_backward_f32 if src.dtype == torch.float32 else lib.rotstn_backward_f64
    status = fn(
        src.data_ptr(),
        stride,
        grad.data_ptr(),
        grad_image.data_ptr() if grad_image is not None else None,
        deriv.data_ptr() if deriv is not None and need_geo else None,
        geo.data_ptr() if geo is not None else None,
        par.data_ptr(),
        b,
        c,
        h,
        w,
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("rotstn's compiled CPU kernel could not allocate its buffers")
    if grad_image is not None:
        grad_image = grad_image.to(image.dtype)
    if geo is None:
        return grad_image, None, None
    geo = geo.to(angle.dtype)
    return grad_image, geo[:, 0], geo[:, 1:]


def _center_and_source_grads(angle: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    """d(centre) and d(source), each (B, 2), from S = Σ over pixels of (∂L/∂x_src, ∂L/∂y_src).

    x_src = sx + cos·(j - cx) - sin·(i - cy) and y_src = sy + sin·(j - cx) + cos·(i - cy), so
    d(source) = S and d(centre) = -R(θ)ᵀ S.
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    s_x, s_y = total.unbind(-1)
    grad_center = torch.stack((-cos * s_x - sin * s_y, sin * s_x - cos * s_y), dim=-1)
    return grad_center, total


class _Warp(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        image: Tensor,
        angle: Tensor,
        center: Tensor,
        source: Tensor,
        mode: str,
        padding_mode: str,
        align_corners: bool,
    ) -> Tensor:
        # source None: a rotation, the source point is the centre (see ``warp``).
        ctx.options = (mode, padding_mode, align_corners)
        ctx.rotation = source is None
        source = center if source is None else source
        if kernel_serves(image, angle, center, source, mode, padding_mode, align_corners):
            ctx.kernel = True
            ctx.save_for_backward(image, angle, center, None if ctx.rotation else source, None)
            # With a gradient to the angle or a point, the forward also writes ∂out/∂x, ∂out/∂y
            # (2 values per output value, freed after the backward) so that the backward's sums
            # need not read the image's corners again; only while they fit three quarters of the
            # last-level cache (machine.limits: beyond it they go through memory both ways), and
            # ROTSTN_CPU_LOW_MEMORY=1 turns it off.
            geo = any(ctx.needs_input_grad[1:4])
            size = 2 * image.numel() * (8 if angle.dtype == torch.float64 else 4)
            keep = (
                geo
                and size <= machine.limits().derivatives_max_bytes
                and os.environ.get("ROTSTN_CPU_LOW_MEMORY") != "1"
            )
            out, ctx.par, ctx.deriv = _kernel_forward(image, angle, center, source, keep)
            return out
        ctx.kernel = False
        _, _, h, w = image.shape
        dtype = angle.dtype
        grid = _grid(angle, center, source, h, w, align_corners, dtype)
        src = image if image.dtype == dtype else image.to(dtype)
        out = torch.grid_sampler_2d(src, grid, _MODE[mode], _PADDING[padding_mode], align_corners)
        ctx.save_for_backward(image, angle, center, None if ctx.rotation else source, grid)
        return out.to(image.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        image, angle, center, source, grid = ctx.saved_tensors
        source = center if ctx.rotation else source
        mode, padding_mode, align_corners = ctx.options
        need_image, need_angle, need_center, need_source = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():
            return (*_differentiable_backward(ctx, grad_out), None, None, None)
        need_geo = need_angle or need_center or need_source
        if ctx.kernel:
            grad_image, grad_angle, total = _kernel_backward(
                grad_out, image, angle, center, source, need_image, need_geo, ctx.par, ctx.deriv
            )
            ctx.deriv = None  # the derivatives' memory goes now, not with the graph
        else:
            dtype = angle.dtype
            src = image if image.dtype == dtype else image.to(dtype)
            grad_image, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
                grad_out.to(dtype),
                src,
                grid,
                _MODE[mode],
                _PADDING[padding_mode],
                align_corners,
                [need_image, need_geo],
            )
            grad_image = grad_image.to(image.dtype) if need_image else None
            grad_angle = total = None
            if need_geo:
                grad_angle, total = _reduce_grid_grad(grad_grid, angle, center, align_corners)
        grad_center = grad_source = None
        if total is not None and (need_center or need_source):
            grad_center, grad_source = _center_and_source_grads(angle, total)
            if ctx.rotation:  # one tensor in both roles: (I - R(θ)ᵀ) S
                grad_center = grad_center + grad_source
        return (
            grad_image,
            grad_angle if need_angle else None,
            grad_center if need_center else None,
            grad_source if need_source else None,
            None,
            None,
            None,
        )


def _reduce_grid_grad(
    grad_grid: Tensor, angle: Tensor, center: Tensor, align_corners: bool
) -> tuple[Tensor, Tensor]:
    """dθ (B,) and S = Σ (∂L/∂x_src, ∂L/∂y_src) (B, 2) from the (B, H, W, 2) normalised grid's gradient."""
    b, h, w, _ = grad_grid.shape
    ax, _ = _scale(w, align_corners)
    ay, _ = _scale(h, align_corners)
    dtype, device = angle.dtype, angle.device
    u = torch.arange(w, dtype=dtype, device=device) - center[:, 0:1]  # (B, W)
    v = torch.arange(h, dtype=dtype, device=device) - center[:, 1:2]  # (B, H)
    # The one pass over the grid gradient: Σ_i and Σ_i v_i of it, per column and coordinate.
    ones_v = torch.stack((torch.ones_like(v), v), dim=1)  # (B, 2, H)
    by_col = torch.bmm(ones_v, grad_grid.reshape(b, h, 2 * w)).view(b, 2, w, 2)
    s_x, s_y = by_col[:, 0].sum(1).unbind(-1)  # Σ dL/dgx, Σ dL/dgy
    sv_x, sv_y = by_col[:, 1].sum(1).unbind(-1)  # Σ v·dL/dgx, ...
    su_x, su_y = torch.bmm(u[:, None, :], by_col[:, 0])[:, 0].unbind(-1)  # Σ u·dL/dgx, ...
    # Chain rule through normalised = a·pixel + b, x_src = sx + cos·u - sin·v, y_src = sy + sin·u + cos·v.
    cos, sin = torch.cos(angle), torch.sin(angle)
    grad_angle = ax * (-sin * su_x - cos * sv_x) + ay * (cos * su_y - sin * sv_y)
    return grad_angle, torch.stack((ax * s_x, ay * s_y), dim=-1)


def _differentiable_backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients that can themselves be differentiated: autograd through the reference path.

    For a rotation (no source tensor) the centre plays both roles and gets the whole gradient.
    """
    image, angle, center, source, _ = ctx.saved_tensors
    mode, padding_mode, align_corners = ctx.options
    source = center if ctx.rotation else source
    needs = list(ctx.needs_input_grad[:4])
    inputs = (image, angle, center, source)
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
    out = reference.warp(image, angle, center, source, mode, padding_mode, align_corners)
    grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


def warp(
    image: Tensor,
    angle: Tensor,
    center: Tensor,
    source: Tensor,
    mode: str,
    padding_mode: str,
    align_corners: bool,
) -> Tensor:
    """Warp ``image`` (B, C, H, W) by ``angle`` (B,): output ``center`` (B, 2) shows input ``source`` (B, 2).

    Same output size as the input; equal to ``reference.warp``. A rotation (``source is center``)
    passes no source tensor to the autograd function: torch.compile cannot trace one tensor
    given twice, and the centre's gradient is then the sum of both roles'.
    """
    point = None if source is center else source
    return _Warp.apply(image, angle, center, point, mode, padding_mode, align_corners)
