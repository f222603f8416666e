"""Fast paths for the rotation warp, behind one dispatch function.

``warp`` is the only entry point the rest of rotstn uses. It picks the
implementation for the tensors it is given; ``use_backend`` forces one, for
tests and benchmarks.

"cpu" (``cpu``) is chosen automatically for CPU tensors outside
``torch.compile`` when the output has the input's size (rotations and rigid
warps alike): one autograd function around aten's grid sampler with a grid
built from a row and a column term and a backward that reduces straight to
dθ and the centre's and source point's gradients; bilinear with zero padding
runs a compiled C kernel instead of aten's sampler where one could be built
(``compiled.py``: AVX-512, AVX2 or generic, picked at run time). Under
``torch.compile`` and ``torch.export`` the reference graph is traced instead
(inductor fuses it), as under TorchScript tracing (``torch.jit.trace``, ONNX
export), and under torch.func transforms (vmap, grad) the reference path runs.

"triton" (``triton_warp``) is chosen automatically for CUDA tensors when
triton imports and the call is one it serves (bilinear; float32, float16 or
bfloat16 images); anything else takes the reference path. Forced with
``use_backend("triton")``, it runs CPU tensors under Triton's interpreter and
raises ``ValueError`` for a call it does not serve, so a test or benchmark
never measures a silent fallback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from . import cpu, reference, triton_warp

BACKENDS = ("auto", "reference", "cpu", "triton")
_forced = "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a warp implementation inside a ``with`` block ('auto' restores the choice)."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def warp(
    image: Tensor,
    angle: Tensor,
    center: Tensor,
    source: Tensor,
    mode: str,
    padding_mode: str,
    align_corners: bool,
    size: tuple[int, int] | None = None,
) -> Tensor:
    """Warp (B, C, H, W) by (B,) radians: output pixel ``center`` (B, 2) shows input pixel ``source`` (B, 2).

    A rotation about c passes ``source=center`` (the same tensor); a rigid
    warp moves one against the other (``reference.source_coords``). ``size``
    is the output's (H, W), default the input's.
    """
    same_size = size is None or tuple(size) == tuple(image.shape[-2:])
    if _forced == "triton":
        reason = triton_warp.unsupported(image, angle, mode, align_corners)
        if reason is None and not same_size:
            reason = "an output size other than the input's"
        if reason is not None:
            raise ValueError(f"backend 'triton' does not support {reason}; use backend 'auto' or 'reference'")
        if not triton_warp.available():
            raise RuntimeError(
                "backend 'triton' needs the optional triton package: pip install 'rotstn[triton]'"
            )
        return triton_warp.warp(image, angle, center, source, padding_mode, align_corners)
    if (
        _forced == "auto"
        and same_size
        and image.is_cuda
        and triton_warp.unsupported(image, angle, mode, align_corners) is None
        and triton_warp.available()
    ):
        return triton_warp.warp(image, angle, center, source, padding_mode, align_corners)
    cpu_ok = _forced == "cpu" or (_forced == "auto" and _cpu_fits(image, angle, center, source))
    if same_size and cpu_ok:
        return cpu.warp(image, angle, center, source, mode, padding_mode, align_corners)
    return reference.warp(image, angle, center, source, mode, padding_mode, align_corners, size)


def _cpu_fits(image: Tensor, angle: Tensor, center: Tensor, source: Tensor) -> bool:
    # Under torch.compile the reference graph is the better input: inductor fuses it.
    # TorchScript tracing (torch.jit.trace, the dynamo=False ONNX exporter) would record
    # the custom Function as an opaque node, or the C kernel not at all: trace F.grid_sample.
    # torch.func transforms (vmap, grad) need plain differentiable ops, not a custom Function.
    return (
        image.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
        and not any(
            torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (image, angle, center, source)
        )
    )
