"""Where :func:`rotstn.register_stack` reads frames from: a protocol and the in-memory and Dask sources.

A source is a list of same-size frames read in slices: ``len(src)``, ``src.frame_shape``
``(C, H, W)`` and ``src.read(start, stop)`` -> float32 ``(n, C, H, W)`` CPU tensor, values
unchanged. :func:`rotstn.io.open_stack` gives one for TIFF files, folders, Zarr arrays and
OME-Zarr images; tensors, NumPy arrays and ``dask.array.Array`` are wrapped here. A source
that a Dask worker must read is pickled and sent to it, so it holds a path or a task
graph, never the frames (except :class:`TensorFrames`, which sends each part its own
slice: :func:`part_source`).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor


def read_frames(read: Any, start: int, stop: int, failure: str) -> Tensor:
    """``read(start, stop)`` (an array of frames) as float32; where it fails, the first frame that
    fails alone is named: ``ValueError("frame i: <failure>: <the reader's error>")``."""
    try:
        data = read(start, stop)
    except Exception:
        for i in range(start, stop):
            try:
                read(i, i + 1)
            except Exception as exc:
                raise ValueError(f"frame {i}: {failure}: {exc}") from exc
        raise
    return torch.from_numpy(data.astype(np.float32))


__all__ = ["DaskFrames", "FrameSource", "TensorFrames", "as_source", "part_source"]


class FrameSource(Protocol):
    """What :func:`register_stack` reads from: a list of same-size frames read in slices.

    :func:`rotstn.io.open_stack` returns one for a TIFF file, a folder, a Zarr array or an
    OME-Zarr image; a tensor, array or ``dask.array.Array`` ``(N, C, H, W)`` / ``(N, H, W)``
    is wrapped in one.
    """

    frame_shape: tuple[int, int, int]  # (C, H, W)

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> Tensor:
        """Frames ``start:stop`` as a float32 ``(n, C, H, W)`` CPU tensor (no scaling)."""
        ...


def _check_shape(shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(shape) == 3:
        return (1, *shape[1:])
    if len(shape) != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W) or (N, H, W), got {tuple(shape)}")
    return tuple(shape[1:])


class TensorFrames:
    """A :class:`FrameSource` over frames already in memory: ``(N, C, H, W)`` or ``(N, H, W)``."""

    def __init__(self, frames: Tensor | np.ndarray, name: str = "frames", offset: int = 0) -> None:
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(np.ascontiguousarray(frames))
        if not isinstance(frames, Tensor):
            raise TypeError(
                f"{name} must be a tensor or array (N, C, H, W) or (N, H, W), or a stack from "
                f"rotstn.io.open_stack; got {type(frames).__name__}"
            )
        self.frame_shape = _check_shape(tuple(frames.shape), name)
        if frames.dim() == 3:
            frames = frames[:, None]
        if frames.is_complex() or frames.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got {frames.dtype}")
        self.frames = frames
        # a part sent to a worker holds frames offset:offset+n of a stack of `_n` frames
        self.offset, self._n = offset, offset + frames.shape[0]

    def __len__(self) -> int:
        return self._n

    def read(self, start: int, stop: int) -> Tensor:
        if start < self.offset:
            raise IndexError(f"frames {start}:{stop} are not in this part ({self.offset}:{self._n})")
        return self.frames[start - self.offset : stop - self.offset].to("cpu", torch.float32)


class DaskFrames:
    """A :class:`FrameSource` over a ``dask.array.Array`` ``(N, C, H, W)`` or ``(N, H, W)``.

    Each :meth:`read` computes only the frames asked for, in the calling thread (the
    synchronous scheduler: on a Dask worker that is the worker's own task), so the
    array is never read whole. Its graph must be computable there (from Zarr, from
    files, from NumPy); an array of a client's persisted futures is not.
    """

    distributable = True  # Dask workers can read it: register_stack uses the active client

    def __init__(self, array: Any, name: str = "frames") -> None:
        self.frame_shape = _check_shape(tuple(array.shape), name)
        if any(not isinstance(s, int) or s != s for s in array.shape):  # NaN: unknown chunk sizes
            raise ValueError(
                f"{name} must have known chunk sizes (call compute_chunk_sizes()), got shape {array.shape}"
            )
        if np.dtype(array.dtype).kind not in "uif":
            raise TypeError(f"{name} must hold real numbers, got {array.dtype}")
        self.array = array if array.ndim == 4 else array[:, None]
        self.dtype = np.dtype(array.dtype)
        self.metadata: dict[str, Any] = {}

    def __len__(self) -> int:
        return self.array.shape[0]

    def read(self, start: int, stop: int) -> Tensor:
        return read_frames(self._compute, start, stop, "cannot read it from the dask array")

    def _compute(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[start:stop].compute(scheduler="synchronous"))

    def close(self) -> None:
        pass


def _is_dask_array(x: Any) -> bool:
    return type(x).__name__ == "Array" and type(x).__module__.startswith("dask.array")


def as_source(frames: Any) -> FrameSource:
    """``frames`` as a :class:`FrameSource` (a source is returned as it is)."""
    if isinstance(frames, (Tensor, np.ndarray)):
        return TensorFrames(frames)
    if _is_dask_array(frames):
        return DaskFrames(frames)
    if hasattr(frames, "read") and hasattr(frames, "frame_shape") and hasattr(frames, "__len__"):
        return frames
    raise TypeError(
        "frames must be a tensor, array or dask array (N, C, H, W) or (N, H, W), or a stack from "
        f"rotstn.io.open_stack; got {type(frames).__name__}"
    )


def part_source(src: FrameSource, start: int, stop: int) -> FrameSource:
    """What a worker needs to read frames ``start:stop`` of ``src``: the source itself, or the slice."""
    if isinstance(src, TensorFrames):
        lo = start - src.offset
        return TensorFrames(src.frames[lo : lo + stop - start], offset=start)
    return src
