"""The fused Triton warp: an autograd Function around ``_triton_kernels``.

The forward computes every output pixel's source coordinates from (θ, centre)
in registers and samples bilinearly; the backward scatters the image gradient
with atomic adds and reduces the θ and centre gradients per block inside the
kernel, so the (B, H, W, 2) grid and grad-grid of the reference path never
exist. Values and gradients follow ``reference.warp``.

Importing this module does not import triton: the kernels are loaded on first
use. CUDA tensors run the compiled kernels; CPU tensors (only reached when the
backend is forced, for tests) run the same kernels under Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PADDING = {"zeros": 0, "border": 1, "reflection": 2}
_BLOCK = 256
# FMA contraction on, as nvcc compiles grid_sample; saying so also silences
# triton 3.9's warning about the default changing.
_LAUNCH = {"num_warps": 4, "enable_fp_fusion": True}


@functools.cache
def available() -> bool:
    """Whether triton can be imported here (checked once, on first call)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton.language")
    except Exception:  # a broken install must not break rotstn: it just takes the reference path
        return False
    return True


def unsupported(image: Tensor, angle: Tensor, mode: str, align_corners: bool) -> str | None:
    """Why the kernel cannot serve this call, or None when it can."""
    if mode != "bilinear":
        return f"mode={mode!r} (only 'bilinear')"
    if image.dtype not in DTYPES:
        return f"image dtype {image.dtype} (only float32, float16, bfloat16)"
    if angle.dtype != torch.float32:
        return f"coordinate dtype {angle.dtype} (only float32)"
    if align_corners and min(image.shape[-2:]) == 1:
        return "align_corners=True with a side of one pixel"
    if image.device.type not in ("cuda", "cpu"):
        return f"device {image.device} (only CUDA, or CPU under the interpreter)"
    return None


@contextlib.contextmanager
def _interpret_env() -> Iterator[None]:
    # triton.jit reads TRITON_INTERPRET when it decorates a function, so only
    # the module loaded inside this block is interpreted; restoring the
    # variable leaves every other triton kernel in the process as it was.
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


@functools.cache
def kernels(interpret: bool) -> ModuleType:
    """The kernel module: compiled, or a second copy decorated under ``TRITON_INTERPRET=1``."""
    name = f"{__package__}._triton_kernels"
    if not interpret:
        return importlib.import_module(name)
    # triton itself must be imported outside the interpreted block: its own
    # library functions are decorated at import, and a copy decorated for the
    # interpreter breaks later compiled use (and triton's lazy submodules).
    importlib.import_module("triton.language")
    path = os.path.join(os.path.dirname(__file__), "_triton_kernels.py")
    spec = importlib.util.spec_from_file_location(name + "_interpreted", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with _interpret_env():
        spec.loader.exec_module(module)
    return module


def _launch_args(
    image: Tensor, angle: Tensor, center: Tensor, source: Tensor
) -> tuple[ModuleType, tuple[int, int], tuple]:
    b, c, h, w = image.shape
    module = kernels(interpret=not image.is_cuda)
    grid = (-(-h * w // _BLOCK), b)
    args = (c, h, w, *image.stride(), angle.stride(0), *center.stride(), *source.stride())
    return module, grid, args


class _TritonWarp(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        image: Tensor,
        angle: Tensor,
        center: Tensor,
        source: Tensor,
        padding_mode: str,
        align_corners: bool,
    ) -> Tensor:
        module, grid, args = _launch_args(image, angle, center, source)
        out = torch.empty(image.shape, dtype=image.dtype, device=image.device)
        module.warp_forward[grid](
            image,
            out,
            angle,
            center,
            source,
            *args,
            PADDING=_PADDING[padding_mode],
            ALIGN=align_corners,
            BLOCK=_BLOCK,
            **_LAUNCH,
        )
        ctx.save_for_backward(image, angle, center, source)
        ctx.padding_mode, ctx.align_corners = padding_mode, align_corners
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        image, angle, center, source = ctx.saved_tensors
        need_image = ctx.needs_input_grad[0]
        need_geometry = any(ctx.needs_input_grad[1:4])
        module, grid, args = _launch_args(image, angle, center, source)
        # Atomics accumulate in float32 whatever the image dtype: four bf16
        # round-offs per output pixel would swamp small gradients.
        g_image = torch.zeros(image.shape, dtype=torch.float32, device=image.device) if need_image else None
        partial = torch.empty((grid[1], grid[0], 3), dtype=torch.float32, device=image.device)
        module.warp_backward[grid](
            image,
            grad_out.contiguous(),
            g_image if need_image else partial,
            partial,
            angle,
            center,
            source,
            *args,
            PADDING=_PADDING[ctx.padding_mode],
            ALIGN=ctx.align_corners,
            NEED_IMAGE=need_image,
            NEED_GEOMETRY=need_geometry,
            BLOCK=_BLOCK,
            **_LAUNCH,
        )
        g_angle = g_center = g_source = None
        if need_geometry:
            sums = partial.sum(dim=1)
            g_angle = sums[:, 0] if ctx.needs_input_grad[1] else None
            g_source = sums[:, 1:] if ctx.needs_input_grad[3] else None
            if ctx.needs_input_grad[2]:
                # ∂x/∂c = -(cos, sin) and ∂y/∂c = -(-sin, cos): d(centre) = -Aᵀ·d(source).
                cos, sin = torch.cos(angle), torch.sin(angle)
                sx, sy = sums[:, 1], sums[:, 2]
                g_center = torch.stack((-cos * sx - sin * sy, sin * sx - cos * sy), dim=1)
        if g_image is not None and g_image.dtype != image.dtype:
            g_image = g_image.to(image.dtype)
        return g_image, g_angle, g_center, g_source, None, None


def warp(
    image: Tensor, angle: Tensor, center: Tensor, source: Tensor, padding_mode: str, align_corners: bool
) -> Tensor:
    """Bilinear warp of (B, C, H, W) by (B,) float32 radians; output ``center`` shows input ``source``."""
    return _TritonWarp.apply(image, angle, center, source, padding_mode, align_corners)
