"""Fast paths for the rotation warp, behind one dispatch function.

``warp`` is the only entry point the rest of rotstn uses. It picks the
implementation for the tensors it is given; ``use_backend`` forces one, for
tests and benchmarks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from . import cpu, reference

BACKENDS = ("auto", "reference", "cpu")
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
    mode: str,
    padding_mode: str,
    align_corners: bool,
) -> Tensor:
    """Rotate (B, C, H, W) by (B,) radians about (B, 2) pixel centres."""
    if _forced == "cpu" or (_forced == "auto" and _cpu_fits(image)):
        return cpu.warp(image, angle, center, mode, padding_mode, align_corners)
    return reference.warp(image, angle, center, mode, padding_mode, align_corners)


def _cpu_fits(image: Tensor) -> bool:
    # Under torch.compile the reference graph is the better input: inductor fuses it.
    return image.device.type == "cpu" and not torch.compiler.is_compiling()
