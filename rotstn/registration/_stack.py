"""Register a stack of frames (time-lapse, serial sections) against one reference, batch by batch.

Convention
----------
``result.matrix[i] @ (x, y, 1)`` is the pixel of frame ``i`` that shows
reference pixel ``(x, y)`` (the rigid map of :mod:`rotstn.functional`, with
fixed = the reference and moving = frame ``i``), so
``warp(frame_i, matrix=result.matrix[i], size=reference size)`` is frame ``i``
aligned on the reference.

References
----------
* ``"first"``: frame 0 of the whole stack (also when only ``start:stop`` is
  registered, so parts registered by different processes share it).
* ``"previous"``: frame ``k`` is registered on frame ``k - 1``, giving ``M_k``
  (frame ``k-1`` pixels to frame ``k`` pixels), and the maps are composed as
  3×3 homogeneous matrices, ``H_{0→k} = M_k · H_{0→k-1}``, so every frame maps
  to frame 0's coordinates. Errors add up along the chain like a random walk
  (``benchmarks/stack.py`` measures it); a frame whose pair score is below
  ``anchor_below`` (the content changed, the pair failed) is registered on
  frame 0 directly and the chain restarts from it when that is better, and
  ``anchor_every`` re-anchors periodically to bound the drift.
* ``"mean"``: register on frame 0, average the aligned frames (each pixel over
  the frames that cover it), then register again on that mean
  (``mean_passes`` passes in all).
* a tensor ``(C, H, W)`` or ``(H, W)``: that image (any size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..functional import warp

__all__ = ["FrameSource", "StackRegistration", "TensorFrames", "matrix_parameters", "register_stack"]

REFERENCES = ("first", "previous", "mean")


class FrameSource(Protocol):
    """What :func:`register_stack` reads from: a list of same-size frames read in slices.

    :func:`rotstn.io.open_stack` returns one for a TIFF file or a folder; a tensor or
    array ``(N, C, H, W)`` / ``(N, H, W)`` is wrapped in one.
    """

    frame_shape: tuple[int, int, int]  # (C, H, W)

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> Tensor:
        """Frames ``start:stop`` as a float32 ``(n, C, H, W)`` CPU tensor (no scaling)."""
        ...


class TensorFrames:
    """A :class:`FrameSource` over frames already in memory: ``(N, C, H, W)`` or ``(N, H, W)``."""

    def __init__(self, frames: Tensor | np.ndarray, name: str = "frames") -> None:
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(np.ascontiguousarray(frames))
        if not isinstance(frames, Tensor):
            raise TypeError(
                f"{name} must be a tensor or array (N, C, H, W) or (N, H, W), or a stack from "
                f"rotstn.io.open_stack; got {type(frames).__name__}"
            )
        if frames.dim() == 3:
            frames = frames[:, None]
        if frames.dim() != 4:
            raise ValueError(f"{name} must have shape (N, C, H, W) or (N, H, W), got {tuple(frames.shape)}")
        if frames.is_complex() or frames.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got {frames.dtype}")
        self.frames = frames
        self.frame_shape = tuple(frames.shape[1:])

    def __len__(self) -> int:
        return self.frames.shape[0]

    def read(self, start: int, stop: int) -> Tensor:
        return self.frames[start:stop].to("cpu", torch.float32)


@dataclass(frozen=True)
class StackRegistration:
    """What :func:`register_stack` found, one row per registered frame (CPU, float64).

    Attributes:
        frame: ``(N,)`` int64 index of each frame in the stack.
        angle: ``(N,)`` radians in (-π, π], counter-clockwise as displayed.
        translation: ``(N, 2)`` ``(tx, ty)`` pixels (x right, y down), as in :class:`Registration`.
        matrix: ``(N, 2, 3)``: ``matrix[i] @ (x, y, 1)`` is the pixel of frame ``frame[i]``
            that shows reference pixel ``(x, y)``.
        score: ``(N,)`` in [0, 1]; above 0.9 trust it. With ``reference="previous"`` it is the
            score of the pair that was registered last for that frame (on the previous frame, or
            on frame 0 where the chain was re-anchored).
        anchored: ``(N,)`` bool, frames registered directly on the reference.
        size: ``(H, W)`` of the reference: the aligned frames' size.
    """

    frame: Tensor
    angle: Tensor
    translation: Tensor
    matrix: Tensor
    score: Tensor
    anchored: Tensor
    size: tuple[int, int]

    def __len__(self) -> int:
        return self.frame.shape[0]

    def apply(self, frames: Tensor, *, rows: slice | None = None, mode: str = "bilinear") -> Tensor:
        """Warp ``frames`` ``(n, C, H, W)`` (the frames of rows ``rows``, default all) onto the reference.

        Returns ``(n, C, H_ref, W_ref)`` in the frames' floating dtype (float32 for integer frames).
        """
        rows = slice(None) if rows is None else rows
        x = frames if frames.is_floating_point() else frames.to(torch.float32)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        m = self.matrix[rows].to(device=x.device, dtype=dtype)
        if m.shape[0] != x.shape[0]:
            raise ValueError(f"frames has {x.shape[0]} frame(s) but rows selects {m.shape[0]} transform(s)")
        return warp(x, matrix=m, size=self.size, mode=mode)

    def aligned(self, frames: Tensor | np.ndarray | FrameSource, batch_size: int = 32) -> Iterator[Tensor]:
        """Aligned frames, ``batch_size`` at a time: ``torch.cat(list(result.aligned(stack)))``.

        ``frames`` is the whole stack (indexed by :attr:`frame`), as given to :func:`register_stack`.
        """
        src = _source(frames)
        idx = self.frame.tolist()
        for i in range(0, len(idx), batch_size):
            lo, hi = idx[i], idx[min(i + batch_size, len(idx)) - 1] + 1
            chunk = src.read(lo, hi)[torch.tensor(idx[i : i + batch_size]) - lo]
            yield self.apply(chunk, rows=slice(i, i + batch_size))


def matrix_parameters(
    matrix: Tensor, size: tuple[int, int], source_size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Angle ``(N,)`` and translation ``(N, 2)`` of rigid pixel matrices (inverse of ``rigid_matrix``)."""
    a = matrix[:, :, :2]
    angle = torch.atan2(a[:, 1, 0], a[:, 0, 0])
    c_out = matrix.new_tensor([(size[1] - 1) / 2, (size[0] - 1) / 2])
    c_in = matrix.new_tensor([(source_size[1] - 1) / 2, (source_size[0] - 1) / 2])
    # b = c_in - A (c_out + t)  =>  t = Aᵀ (c_in - b) - c_out
    t = torch.einsum("nji,nj->ni", a, c_in - matrix[:, :, 2]) - c_out
    return angle, t


def _homogeneous(m: Tensor) -> Tensor:
    bottom = m.new_tensor([0.0, 0.0, 1.0]).expand(m.shape[0], 1, 3)
    return torch.cat([m, bottom], 1)


def _source(frames: Any) -> FrameSource:
    if isinstance(frames, (Tensor, np.ndarray)):
        return TensorFrames(frames)
    if hasattr(frames, "read") and hasattr(frames, "frame_shape") and hasattr(frames, "__len__"):
        return frames
    raise TypeError(
        "frames must be a tensor or array (N, C, H, W) or (N, H, W), or a stack from rotstn.io.open_stack; "
        f"got {type(frames).__name__}"
    )


def register_stack(
    frames: Tensor | np.ndarray | FrameSource,
    *,
    reference: str | Tensor = "first",
    start: int = 0,
    stop: int | None = None,
    batch_size: int = 16,
    mask: Tensor | None = None,
    device: str | torch.device | None = None,
    anchor_below: float | None = None,
    anchor_every: int = 0,
    mean_passes: int = 2,
    write: Callable[[Tensor], object] | None = None,
    progress: bool = False,
    **options: Any,
) -> StackRegistration:
    """Register every frame of a stack on one reference, ``batch_size`` frames per :func:`register` call.

    Convention: ``result.matrix[i] @ (x, y, 1)`` is the pixel of frame ``i`` that shows
    reference pixel ``(x, y)``; full ±180° between frames (module docstring).

    Only one batch of frames is in memory at a time (plus the reference and, with
    ``"previous"``, the last frame), so a stack opened with :func:`rotstn.io.open_stack`
    streams from disk; pass ``write`` to stream the aligned frames out.

    Args:
        frames: ``(N, C, H, W)`` or ``(N, H, W)`` tensor or array, or a stack from
            :func:`rotstn.io.open_stack` (any object with ``len``, ``frame_shape`` and
            ``read(start, stop)``). Integer frames are registered as float32, unscaled.
        reference: ``"first"``, ``"previous"``, ``"mean"`` or an image ``(C, H, W)`` / ``(H, W)``.
        start, stop: register only frames ``start:stop`` (default all), against the same
            reference as the whole stack: ``"first"`` is frame 0, and with ``"previous"`` frame
            ``start`` is registered on frame 0 directly. ``"mean"`` averages ``start:stop`` only.
        batch_size: frames per :func:`register` call; larger is faster up to memory.
        mask: ``(H, W)`` where every frame has content to compare (both sides of each pair).
        device: where to register (``"cuda"``); default the CPU. Results come back to the CPU.
        anchor_below: with ``"previous"``, a pair scoring below this (default
            :data:`rotstn.registration.TRUST`) is registered on frame 0 directly.
        anchor_every: with ``"previous"``, also re-anchor every this many frames (0: never); the
            direct result replaces the chained one when its score is above ``anchor_below``.
            Smaller bounds the drift better and costs one more registration per anchor.
        mean_passes: with ``"mean"``, registrations in all (the first on frame 0).
        write: called with each batch of aligned frames ``(n, C, H_ref, W_ref)`` float32 CPU,
            in frame order, as soon as it is done (on the last pass).
        progress: show a tqdm progress bar (frames/s) if tqdm is installed.
        **options: passed to :func:`register` (``smooth``, ``channel``, ``search_size``, ...).

    Returns:
        A :class:`StackRegistration` with one row per frame in ``start:stop``.

    Raises:
        TypeError, ValueError: bad frames (empty stack, wrong shape), reference, range or option.

    Example:
        >>> from rotstn.data import bundled_image
        >>> from rotstn import warp
        >>> img = torch.tensor(bundled_image("camera")[100:164, 150:214], dtype=torch.float32)
        >>> turns = torch.tensor([0.0, 1.0, -2.5])
        >>> stack = warp(img.expand(3, 1, 64, 64), turns)
        >>> result = register_stack(stack, reference="first")
        >>> bool(((result.angle + turns).abs() < 1e-2).all())
        True
    """
    from . import TRUST

    src = _source(frames)
    n = len(src)
    if n == 0:
        raise ValueError("frames is an empty stack (0 frames)")
    stop = n if stop is None else stop
    for name, v in (
        ("start", start),
        ("stop", stop),
        ("batch_size", batch_size),
        ("mean_passes", mean_passes),
    ):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if not 0 <= start < stop <= n:
        raise ValueError(f"start:stop must select frames within 0:{n}, got {start}:{stop}")
    if batch_size < 1 or mean_passes < 1 or anchor_every < 0:
        raise ValueError(
            f"batch_size and mean_passes must be >= 1 and anchor_every >= 0, got {batch_size}, "
            f"{mean_passes}, {anchor_every}"
        )
    anchor_below = TRUST if anchor_below is None else float(anchor_below)
    if isinstance(reference, str):
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES} or an image tensor, got {reference!r}")
        ref = src.read(0, 1)[0]
    else:
        ref = reference if isinstance(reference, Tensor) else torch.as_tensor(np.asarray(reference))
        if ref.dim() == 2:
            ref = ref[None]
        if ref.dim() != 3 or ref.shape[0] not in (1, src.frame_shape[0]):
            raise ValueError(
                f"reference image must have shape (H, W) or (C, H, W) with C=1 or {src.frame_shape[0]}, "
                f"got {tuple(ref.shape)}"
            )
        ref = ref.to(torch.float32).expand(src.frame_shape[0], *ref.shape[1:])
    device = torch.device("cpu") if device is None else torch.device(device)
    mask_d = None if mask is None else torch.as_tensor(mask).to(device)
    mode = reference if isinstance(reference, str) else "image"
    passes = mean_passes if mode == "mean" else 1
    bar = _bar(progress, passes * (stop - start))
    job = _Job(src, device, batch_size, mask_d, options, bar)
    try:
        for p in range(passes):
            last = p == passes - 1
            if mode == "previous":
                result = job.chain(ref, start, stop, anchor_below, anchor_every, write)
            else:
                result, mean = job.against(ref, start, stop, write if last else None, average=not last)
                ref = mean if mean is not None else ref
    finally:
        if bar is not None:
            bar.close()
    return result


def _bar(progress: bool, total: int) -> Any:
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, unit="frame", desc="register-stack", smoothing=0.1)


@dataclass
class _Job:
    src: FrameSource
    device: torch.device
    batch_size: int
    mask: Tensor | None
    options: dict[str, Any]
    bar: Any

    def _register(self, fixed: Tensor, moving: Tensor) -> Any:
        from . import register

        return register(
            fixed.to(self.device),
            moving.to(self.device),
            # a reference of another size has no mask: the mask describes the frames
            fixed_mask=self.mask if fixed.shape[-2:] == moving.shape[-2:] else None,
            moving_mask=self.mask,
            **self.options,
        )

    def _batches(self, start: int, stop: int) -> Iterator[tuple[int, Tensor]]:
        for i in range(start, stop, self.batch_size):
            batch = self.src.read(i, min(i + self.batch_size, stop))
            yield i, batch
            if self.bar is not None:
                self.bar.update(batch.shape[0])

    def against(
        self, ref: Tensor, start: int, stop: int, write: Callable[[Tensor], object] | None, average: bool
    ) -> tuple[StackRegistration, Tensor | None]:
        """Every frame on one reference image; optionally the mean of the aligned frames."""
        rows: list[tuple[Tensor, Tensor]] = []
        total = count = None
        for _, batch in self._batches(start, stop):
            r = self._register(ref[None], batch)
            rows.append((r.matrix.cpu().double(), r.score.cpu().double()))
            aligned = r.aligned.cpu().float()
            if write is not None:
                write(aligned)
            if average:
                cover = warp(
                    torch.ones_like(batch[:, :1]), matrix=r.matrix.cpu().float(), size=ref.shape[-2:]
                )
                total = aligned.sum(0) if total is None else total + aligned.sum(0)
                count = cover.sum(0) if count is None else count + cover.sum(0)
        mean = None if total is None else torch.where(count > 0.5, total / count.clamp_min(1e-6), 0.0)
        matrix = torch.cat([m for m, _ in rows])
        score = torch.cat([s for _, s in rows])
        anchored = torch.ones(stop - start, dtype=torch.bool)
        return self._result(matrix, score, anchored, start, tuple(ref.shape[-2:])), mean

    def chain(
        self,
        ref: Tensor,
        start: int,
        stop: int,
        anchor_below: float,
        anchor_every: int,
        write: Callable[[Tensor], object] | None,
    ) -> StackRegistration:
        """Each frame on the one before, maps composed to frame 0; re-anchored where weak."""
        size = tuple(ref.shape[-2:])
        matrices, scores, anchors = [], [], []
        prev: Tensor | None = None  # the frame before the batch
        h_prev: Tensor | None = None  # its 3×3 map from frame 0
        for i0, batch in self._batches(start, stop):
            n = batch.shape[0]
            # pair k: fixed = frame i0+k-1, moving = frame i0+k; frame 0 and a part's first frame
            # have no usable previous frame here and go straight to the reference.
            has_prev = torch.ones(n, dtype=torch.bool)
            if prev is None:
                has_prev[0] = False
                fixed = torch.cat([ref[None], batch[:-1]])
            else:
                fixed = torch.cat([prev[None], batch[:-1]])
            pair = self._register(fixed, batch)
            pm, ps = pair.matrix.cpu().double(), pair.score.cpu().double()
            index = torch.arange(i0, i0 + n)
            want = ~has_prev | (ps < anchor_below)
            if anchor_every:
                want |= (index % anchor_every == 0) & (index > 0)
            direct_m, direct_s = pm.clone(), ps.clone()
            if bool(want.any()):
                sel = want.nonzero()[:, 0]
                d = self._register(ref[None], batch[sel])
                direct_m[sel], direct_s[sel] = d.matrix.cpu().double(), d.score.cpu().double()
            batch_h = []
            for k in range(n):
                use = bool(want[k]) and (
                    not has_prev[k]
                    or bool(direct_s[k] >= anchor_below)
                    or (bool(ps[k] < anchor_below) and bool(direct_s[k] > ps[k]))
                )
                if use:
                    h = _homogeneous(direct_m[k : k + 1])[0]
                    scores.append(direct_s[k])
                else:
                    h = _homogeneous(pm[k : k + 1])[0] @ h_prev
                    scores.append(ps[k])
                anchors.append(use)
                batch_h.append(h)
                h_prev = h
            m = torch.stack(batch_h)[:, :2]
            matrices.append(m)
            if write is not None:
                write(warp(batch, matrix=m.float(), size=size))
            prev = batch[-1]
        result = self._result(torch.cat(matrices), torch.stack(scores), torch.tensor(anchors), start, size)
        return result

    def _result(
        self, matrix: Tensor, score: Tensor, anchored: Tensor, start: int, size: tuple[int, int]
    ) -> StackRegistration:
        angle, t = matrix_parameters(matrix, size, tuple(self.src.frame_shape[-2:]))
        frame = torch.arange(start, start + matrix.shape[0])
        return StackRegistration(frame, angle, t, matrix, score, anchored, size)
