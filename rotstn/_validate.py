"""Argument checking shared by the public functions.

Every check raises an error that names the argument and says what was
received, so a wrong call fails at the call site and not deep inside torch.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

MODES = ("nearest", "bilinear", "bicubic")
PADDING_MODES = ("zeros", "border", "reflection")


def shape_str(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ("," if t.dim() == 1 else "") + ")"


def image(x: object, name: str = "image") -> Tensor:
    """Check an image and return it as (B, C, H, W)."""
    if not isinstance(x, Tensor):
        hint = " (convert with torch.from_numpy)" if type(x).__name__ == "ndarray" else ""
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}{hint}")
    if x.dim() not in (3, 4):
        hint = f"; add a channel dimension with {name}[None]" if x.dim() == 2 else ""
        raise ValueError(f"{name} must have shape (C, H, W) or (B, C, H, W), got {shape_str(x)}{hint}")
    if not x.is_floating_point():
        hint = f" (convert with {name}.float() / 255)" if x.dtype == torch.uint8 else ""
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}{hint}")
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(f"{name} must have H >= 1 and W >= 1, got shape {shape_str(x)}")
    return x if x.dim() == 4 else x.unsqueeze(0)


def choice(value: object, options: Sequence[str], name: str) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _as_tensor(value: object, name: str, like: Tensor, dtype: torch.dtype) -> Tensor:
    if isinstance(value, Tensor):
        if value.device != like.device:
            raise ValueError(
                f"{name} is on {value.device} but image is on {like.device}; move it with .to(image.device)"
            )
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real tensor, got {value.dtype}")
        return value.to(dtype)
    if isinstance(value, bool) or not _is_real_or_seq(value):
        raise TypeError(f"{name} must be a real number or a tensor, got {type(value).__name__}")
    return torch.as_tensor(value, dtype=dtype, device=like.device)


def _is_real_or_seq(value: object) -> bool:
    if isinstance(value, numbers.Real):
        return True
    if isinstance(value, Sequence) and not isinstance(value, str):
        return all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
    return hasattr(value, "__array__")


def batch_size(sizes: dict[str, int]) -> int:
    """Broadcast batch sizes: each must be 1 or the common size."""
    # A plain loop rather than a set: under torch.export the sizes are SymInts.
    n = 1
    for b in sizes.values():
        if b != 1:
            if n != 1 and b != n:
                desc = ", ".join(f"{k} has {v}" for k, v in sizes.items())
                raise ValueError(f"batch sizes do not match: {desc}")
            n = b
    return n


def angle(value: object, like: Tensor, dtype: torch.dtype, batch: int | None) -> Tensor:
    """Return the angle as a 1-D tensor (1,) or (B,) in ``dtype``."""
    t = _as_tensor(value, "angle", like, dtype)
    if t.dim() > 1 or (batch is not None and t.dim() == 1 and t.shape[0] not in (1, batch)):
        want = "() or (B,)" if batch is None else f"() or (B,) with B={batch}"
        raise ValueError(f"angle must have shape {want}, got {shape_str(t)}")
    return t.reshape(-1)


def center(value: object, like: Tensor, dtype: torch.dtype, batch: int | None) -> Tensor | None:
    """Return the centre as (1, 2) or (B, 2) in ``dtype``, or None."""
    return pair(value, "center", like, dtype, batch)


def size(value: object, name: str = "size") -> tuple[int, int]:
    if isinstance(value, torch.Size | tuple | list) and len(value) == 2:
        h, w = value
        if torch.jit.is_tracing() and isinstance(h, Tensor) and isinstance(w, Tensor):
            # TorchScript tracing hands out a shape's entries as 0-d tensors; a trace
            # fixes the image size anyway (only the batch may vary).
            h, w = int(h), int(w)
        if isinstance(h, int) and isinstance(w, int) and h >= 1 and w >= 1:
            return h, w
    raise ValueError(f"{name} must be (H, W) with positive ints, got {value!r}")


def pair(value: object, name: str, like: Tensor, dtype: torch.dtype, batch: int | None) -> Tensor | None:
    """An (x, y) pixel pair as (1, 2) or (B, 2) in ``dtype``, or None."""
    if value is None:
        return None
    t = _as_tensor(value, name, like, dtype)
    ok = (t.dim() == 1 and t.shape[0] == 2) or (t.dim() == 2 and t.shape[1] == 2)
    if ok and batch is not None and t.dim() == 2:
        ok = t.shape[0] in (1, batch)
    if not ok:
        want = "(2,) or (B, 2)" if batch is None else f"(2,) or (B, 2) with B={batch}"
        raise ValueError(f"{name} must have shape {want} as (x, y) pixels, got {shape_str(t)}")
    return t.reshape(-1, 2)


def rigid(value: object, like: Tensor, dtype: torch.dtype, batch: int | None, name: str = "matrix") -> Tensor:
    """A rigid (rotation + translation) pixel matrix as (1, 2, 3) or (B, 2, 3) in ``dtype``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a (B, 2, 3) tensor, got {type(value).__name__}")
    t = _as_tensor(value, name, like, dtype)
    ok = t.shape[-2:] == (2, 3) and t.dim() in (2, 3)
    if ok and batch is not None and t.dim() == 3:
        ok = t.shape[0] in (1, batch)
    if not ok:
        want = "(2, 3) or (B, 2, 3)" if batch is None else f"(2, 3) or (B, 2, 3) with B={batch}"
        raise ValueError(f"{name} must have shape {want}, got {shape_str(t)}")
    t = t.reshape(-1, 2, 3)
    a = t[:, :, :2].detach()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    eye = torch.eye(2, dtype=dtype, device=t.device)
    off = (a.transpose(1, 2) @ a - eye).abs().amax((1, 2)) + (torch.linalg.det(a) - 1).abs()
    if bool((off > 1e-3).any()):
        raise ValueError(
            f"{name} must be rigid (its 2×2 part a rotation: orthonormal, determinant 1); "
            f"sample(s) {(off > 1e-3).nonzero().flatten().tolist()[:10]} are not"
        )
    return t
