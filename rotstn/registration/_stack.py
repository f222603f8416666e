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
  ``anchor_every`` re-anchors periodically to bound the drift. With the polish
  (default), each composed map is refined directly on frame 0 and kept where
  that scores at least TRUST (the content is still shared): the chain only
  carries the frames that no longer match frame 0, and the drift does not add
  up over the others.
* ``"mean"``: register on frame 0, average the aligned frames (each pixel over
  the frames that cover it), then register again on that mean
  (``mean_passes`` passes in all).
* a tensor ``(C, H, W)`` or ``(H, W)``: that image (any size).

Tracking
--------
Consecutive frames move little, except for sudden turns. With ``track=True``
(default) a batch is registered in three batched steps instead of a global
search per frame:

1. the pairwise maps ``P_k`` (frame ``k-1`` to frame ``k``) by Gauss–Newton
   from the identity on the two coarsest pyramid levels; a pair that still
   does not match (a sudden turn) predicts nothing;
2. the prediction ``P_k · H_{k-1}``, chained from the last known map, refined
   on the reference through every level, then the same full-resolution
   refinement and score as :func:`register`; kept where it scores at least
   :data:`rotstn.registration.TRUST` and moved less than ``REACH`` pixels of
   the search level (further, Gauss–Newton may have stopped on its way);
3. the first failure after a known map (its own: a turn, changed content)
   goes through the global search (with ``"previous"``, the chain), and the
   frames after it are predicted again from that result; after ``WAVES``
   rounds every frame left is searched.

Parts
-----
The range is cut into parts of ``part_size`` frames (whole batches; ``_parts``), the same way
wherever it runs, and every part is registered by ``_run_part`` against the pass's reference:
one after the other in this process, or one task each on a Dask cluster (``_stack_parts``).
A part starts without a prediction, as ``start`` does, so the cut is part of the result and
the engine is not: the local and the Dask runs agree bit for bit. With ``"mean"`` each part
also returns the sum of its aligned frames and their cover, added in part order.

The reference is blurred and its pyramid built once per part, not per batch.
A frame that tracks gets the answer the global search would give (the same
refinement from a start in the same basin; ``tests/test_stack.py`` checks
both), at a fraction of the cost.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..functional import warp
from . import _stack_parts
from ._stack_sources import FrameSource, TensorFrames, as_source

__all__ = ["FrameSource", "StackRegistration", "TensorFrames", "matrix_parameters", "register_stack"]

REFERENCES = ("first", "previous", "mean")


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
        error_px: ``(N,)`` predicted largest displacement error in pixels of each frame's map, as
            :attr:`Registration.error_px`, measured against the reference (with ``"previous"``
            on the pair: a composed map adds the errors of the pairs since its anchor); NaN where
            unknown (a transforms table written before the column existed).
    """

    frame: Tensor
    angle: Tensor
    translation: Tensor
    matrix: Tensor
    score: Tensor
    anchored: Tensor
    size: tuple[int, int]
    error_px: Tensor | None = None

    def __post_init__(self) -> None:
        if self.error_px is None:
            object.__setattr__(self, "error_px", torch.full_like(self.score, math.nan))

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
        src = as_source(frames)
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
    track: bool = True,
    polish: bool = True,
    fine_points: int | None = None,
    write: Callable[[Tensor], object] | Any | None = None,
    progress: bool = False,
    part_size: int | None = None,
    client: Any = None,
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
        track: follow the stack (module docstring, "Tracking"): each frame is refined from
            the map predicted by its predecessor and only frames whose refined map scores
            below :data:`rotstn.registration.TRUST`, or that have no prediction, go through
            the global search of :func:`register`. ``False``: every frame is searched (slower,
            same answers on frames that track).
        polish: with ``"previous"`` and ``track``, refine each frame's composed map directly
            on frame 0 and keep that where it scores at least ``TRUST`` (the content is still
            shared): the chain's drift does not add up there. ``False``: the plain chain.
        fine_points: reference pixels compared at full resolution (default an eighth of them, at
            least ``max_points``; ``max_points`` on the coarser levels). More is more precise on
            large frames and slower (docs/stack.md).
        write: called with each batch of aligned frames ``(n, C, H_ref, W_ref)`` float32 CPU,
            in frame order, as soon as it is done (on the last pass); or a region writer such
            as :class:`rotstn.io.ZarrWriter` (``write.write_frames(first_frame, batch)``), which
            Dask workers call for their own frames.
        progress: show a tqdm progress bar (frames/s) if tqdm is installed; with Dask it counts
            the frames of the parts done across the workers.
        part_size: frames per part (rounded up to whole batches). The range is cut into parts the
            same way on one machine and on Dask, which is why both give the same results; a
            part's first frame has no prediction and is searched, and with ``"previous"`` it is
            registered on frame 0 directly, as with ``start``. Default :data:`PART_SIZE` (256),
            and one part (the whole range) with ``"previous"``, whose chain a part would restart.
        client: a ``dask.distributed.Client``: the parts are registered on its workers (each
            reads its own frames and calls ``write.write_frames`` itself) and the rows gathered.
            Default: the active client for a ``dask.array.Array`` or a Zarr stack, none for
            frames in memory. ``False``: in this process (docs/stack.md, "Large stacks on a
            cluster").
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

    src = as_source(frames)
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
    settings = _settings(options, fine_points, tuple(ref.shape[-2:]))
    parts = _parts(start, stop, part_size, batch_size, mode)
    engine = _stack_parts.engine(client, src)
    engine.check_writer(write)
    bar = _bar(progress, passes * (stop - start))
    result: StackRegistration | None = None
    try:
        for p in range(passes):
            last = p == passes - 1
            work = _Pass(
                settings,
                ref,
                mode,
                anchor_below,
                anchor_every,
                track,
                polish and track and mode == "previous",
                # a later pass of "mean" starts every frame from its map on the earlier mean
                None if result is None else result.matrix,
                start,
                not last,
                device,
                batch_size,
                mask_d,
                options,
            )
            outs = engine.run(_run_part, (src,), work, parts, write if last else None, bar)
            result = _gather([r for r, _, _ in outs])
            if not last:
                ref = _mean([t for _, t, _ in outs], [c for _, _, c in outs])
    finally:
        if bar is not None:
            bar.close()
    return result


# Frames per part when the stack is split (``part_size=None``), except with ``"previous"`` (one part:
# a part's chain restarts on frame 0). A part's first frame has no prediction and is searched, so parts
# cost one global search each and move the other frames' answers by float32 rounding only (docs/stack.md).
PART_SIZE = 256


def _parts(start: int, stop: int, part_size: int | None, batch_size: int, mode: str) -> list[tuple[int, int]]:
    """``start:stop`` cut into parts of whole batches, the same for every engine (local or Dask)."""
    if part_size is None:
        part_size = stop - start if mode == "previous" else PART_SIZE
    if isinstance(part_size, bool) or not isinstance(part_size, int) or part_size < 1:
        raise ValueError(f"part_size must be an int >= 1 or None, got {part_size!r}")
    step = -(-part_size // batch_size) * batch_size  # whole batches: a part's batches are the local ones
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


@dataclass(frozen=True)
class _Pass:
    """One pass over the stack against one reference: all a part needs besides its frames (picklable)."""

    settings: dict[str, Any] | None
    ref: Tensor
    mode: str
    anchor_below: float
    anchor_every: int
    track: bool
    polish: bool
    prior: Tensor | None  # (stop - start, 2, 3): each frame's map on the earlier mean
    start: int  # the first frame of the whole range (prior's row 0)
    average: bool  # also sum the aligned frames and their cover, for the next pass's mean
    device: torch.device
    batch_size: int
    mask: Tensor | None
    options: dict[str, Any]


def _run_part(
    src: FrameSource, work: _Pass, start: int, stop: int, write: Any, bar: Any = None
) -> tuple[StackRegistration, Tensor | None, Tensor | None]:
    """Frames ``start:stop`` of one pass: the result and (``work.average``) the aligned sum and cover.

    The one engine: the local loop calls it part by part, a Dask worker calls it for its part.
    """
    if write is not None and hasattr(write, "write_frames"):
        write = _RegionWrite(write, start)
    job = _Job(src, work.device, work.batch_size, work.mask, work.options, bar)
    if work.settings is not None:
        prior = None if work.prior is None else work.prior[start - work.start : stop - work.start]
        tracker = _Tracker(
            job,
            work.settings,
            work.ref,
            work.mode,
            work.anchor_below,
            work.anchor_every,
            work.track,
            work.polish,
            prior,
        )
        return tracker.run(start, stop, write, work.average)
    if work.mode == "previous":
        return job.chain(work.ref, start, stop, work.anchor_below, work.anchor_every, write), None, None
    return job.against(work.ref, start, stop, write, work.average)


class _RegionWrite:
    """``write(batch)`` in frame order onto a writer that takes ``write_frames(first_frame, batch)``."""

    def __init__(self, writer: Any, start: int) -> None:
        self.writer, self.next = writer, start

    def __call__(self, batch: Tensor) -> None:
        self.writer.write_frames(self.next, batch)
        self.next += batch.shape[0]


def _gather(parts: list[StackRegistration]) -> StackRegistration:
    """The parts' rows (in frame order) as one result: every tensor field concatenated."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    values = {
        f.name: torch.cat([getattr(p, f.name) for p in parts])
        if isinstance(getattr(first, f.name), Tensor)
        else getattr(first, f.name)
        for f in fields(first)
    }
    return type(first)(**values)


def _mean(totals: list[Tensor | None], counts: list[Tensor | None]) -> Tensor:
    """The mean of the aligned frames (each pixel over the frames that cover it), summed in part order."""
    total, count = totals[0], counts[0]
    for t, c in zip(totals[1:], counts[1:], strict=True):
        total, count = total + t, count + c
    return torch.where(count > 0.5, total / count.clamp_min(1e-6), 0.0)


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
    ) -> tuple[StackRegistration, Tensor | None, Tensor | None]:
        """Every frame on one reference image; optionally the sum of the aligned frames and their cover."""
        rows: list[tuple[Tensor, Tensor]] = []
        total = count = None
        for _, batch in self._batches(start, stop):
            r = self._register(ref[None], batch)
            rows.append((r.matrix.cpu().double(), r.score.cpu().double(), r.error_px.cpu().double()))
            aligned = r.aligned.cpu().float()
            if write is not None:
                write(aligned)
            if average:
                cover = warp(
                    torch.ones_like(batch[:, :1]), matrix=r.matrix.cpu().float(), size=ref.shape[-2:]
                )
                total = aligned.sum(0) if total is None else total + aligned.sum(0)
                count = cover.sum(0) if count is None else count + cover.sum(0)
        matrix, score, error = (torch.cat(parts) for parts in zip(*rows, strict=True))
        anchored = torch.ones(stop - start, dtype=torch.bool)
        return self._result(matrix, score, anchored, start, tuple(ref.shape[-2:]), error), total, count

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
        matrices, scores, anchors, errors = [], [], [], []
        prev: Tensor | None = None  # the frame before the batch
        h_prev: Tensor | None = None  # its 3×3 map from frame 0
        e_prev = torch.zeros((), dtype=torch.float64)  # its predicted error
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
            pm, ps, pe = pair.matrix.cpu().double(), pair.score.cpu().double(), pair.error_px.cpu().double()
            index = torch.arange(i0, i0 + n)
            want = ~has_prev | (ps < anchor_below)
            if anchor_every:
                want |= (index % anchor_every == 0) & (index > 0)
            direct_m, direct_s, direct_e = pm.clone(), ps.clone(), pe.clone()
            if bool(want.any()):
                sel = want.nonzero()[:, 0]
                d = self._register(ref[None], batch[sel])
                direct_m[sel], direct_s[sel] = d.matrix.cpu().double(), d.score.cpu().double()
                direct_e[sel] = d.error_px.cpu().double()
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
                    e_prev = direct_e[k]
                else:
                    h = _homogeneous(pm[k : k + 1])[0] @ h_prev
                    scores.append(ps[k])
                    e_prev = e_prev + pe[k]
                anchors.append(use)
                errors.append(e_prev)
                batch_h.append(h)
                h_prev = h
            m = torch.stack(batch_h)[:, :2]
            matrices.append(m)
            if write is not None:
                write(warp(batch, matrix=m.float(), size=size))
            prev = batch[-1]
        result = self._result(
            torch.cat(matrices), torch.stack(scores), torch.tensor(anchors), start, size, torch.stack(errors)
        )
        return result

    def _result(
        self,
        matrix: Tensor,
        score: Tensor,
        anchored: Tensor,
        start: int,
        size: tuple[int, int],
        error: Tensor,
    ) -> StackRegistration:
        angle, t = matrix_parameters(matrix, size, tuple(self.src.frame_shape[-2:]))
        frame = torch.arange(start, start + matrix.shape[0])
        return StackRegistration(frame, angle, t, matrix, score, anchored, size, error)


# ---------------------------------------------------------------------------------------------
# Tracking: refine from a predicted map, search only where that fails.

# Default share of the reference's pixels compared at full resolution in a stack (every third row and
# column): 0.033 px instead of 0.059 px median on the 512² benchmark stack (docs/stack.md).
FINE_SHARE = 8
WAVES = 3  # rounds of predict-and-refine per batch before every frame left is searched
# A refinement that ends further than this from its prediction (pixels of the search level, at the
# reference's corners) is not trusted, whatever its score: the prediction was far off and Gauss–Newton
# (steps of at most a pixel of each level, ``iterations`` per level) may have stopped on its way.
REACH = 4.0
# Gauss–Newton steps at full resolution after the coarser levels (which hand over a start within a
# few hundredths of a pixel): more changes the answers by far less than the noise (docs/stack.md).
FINE_ITERATIONS = 3
PAIR_ITERATIONS = 6  # Gauss–Newton steps per level for a pair's prediction (a turn never converges)
_TRACKED = ("channel", "smooth", "iterations", "min_overlap", "search_size", "max_points")


def _settings(
    options: dict[str, Any], fine_points: int | None, size: tuple[int, int]
) -> dict[str, Any] | None:
    """The rigid options tracking honours, validated as :func:`register` does; None for any other option."""
    from . import _check_int, _check_number, register

    if (
        not set(options) <= {*_TRACKED, "model", "metric"}
        or options.get("model", "rigid") != "rigid"
        or options.get("metric", "ncc") != "ncc"
    ):
        # init, model="rotation", metric="mi", unknown names: register() itself, batch by batch
        return None
    params = inspect.signature(register).parameters
    s = {name: options.get(name, params[name].default) for name in _TRACKED}
    s["smooth"] = _check_number(s["smooth"], "smooth")
    s["min_overlap"] = _check_number(s["min_overlap"], "min_overlap")
    if not 0 < s["min_overlap"] < 1:
        raise ValueError(f"min_overlap must be between 0 and 1 (exclusive), got {s['min_overlap']!r}")
    s["iterations"] = _check_int(s["iterations"], "iterations", 0)
    s["search_size"] = _check_int(s["search_size"], "search_size", 16)
    s["max_points"] = _check_int(s["max_points"], "max_points", 256)
    if fine_points is None:
        s["fine_points"] = max(size[0] * size[1] // FINE_SHARE, s["max_points"])
    else:
        s["fine_points"] = _check_int(fine_points, "fine_points", 256)
    return s


class _Tracker:
    """One pass over ``start:stop`` against one reference, with tracking (module docstring).

    Per batch: the pairwise maps ``P_k`` (frame ``k-1`` pixels to frame ``k`` pixels) by
    Gauss–Newton from the identity on the coarse levels (consecutive frames move little);
    predictions ``P_k · H_{k-1}`` chained from the last known map; every predicted frame
    refined on the reference at once and kept where it scores at least TRUST; the first
    failure of each run (its predecessor is known, so the failure is its own: a sudden turn,
    changed content) goes to the fallback (the global search, or with ``"previous"`` the
    chain), and the frames after it are predicted again from its result, ``WAVES`` rounds at
    most; then every frame left goes to the fallback.
    """

    def __init__(
        self,
        job: _Job,
        settings: dict[str, Any],
        ref: Tensor,
        mode: str,
        anchor_below: float,
        anchor_every: int,
        track: bool,
        polish: bool,
        prior: Tensor | None = None,
    ) -> None:
        from . import _check_image, _check_mask, _grey, _n_levels, _prepare
        from ._images import check_not_flat

        self.job, self.s = job, settings
        self.mode, self.anchor_below, self.anchor_every = mode, anchor_below, anchor_every
        self.track, self.polish, self.prior = track, polish, prior
        self.size = tuple(ref.shape[-2:])
        self.frame_size = tuple(job.src.frame_shape[-2:])
        self.levels = _n_levels(self.size, self.frame_size, settings["search_size"])
        r = _check_image(ref[None].to(job.device, torch.float32), "reference")
        grey = _grey(r, settings["channel"], torch.float32, 1, "reference")
        # a reference of another size has no mask: the mask describes the frames
        rmask = job.mask if self.size == self.frame_size else None
        rmask = _check_mask(rmask, "mask", r, 1, torch.float32)
        check_not_flat(grey.flatten(1), None if rmask is None else rmask.flatten(1) > 0, "reference")
        self.ref = _prepare(grey, rmask, settings["smooth"], self.levels)
        self._prepare_fn = _prepare
        self.checked = False  # the frames' size and dtype, checked on the first batch

    # -- helpers -----------------------------------------------------------------------------

    def _opts(self) -> dict[str, Any]:
        s = self.s
        return {
            "iterations": s["iterations"],
            "min_overlap": s["min_overlap"],
            "max_points": s["max_points"],
            "fine_points": s["fine_points"],
            "fine_iterations": min(s["iterations"], FINE_ITERATIONS),
        }

    def _prepare(self, batch: Tensor) -> Any:
        from . import _check_image, _check_mask, _grey
        from ._images import check_not_flat

        x = batch.to(self.job.device)
        if not self.checked or not bool(torch.isfinite(x.sum()).item()):
            # the sum is finite when every pixel is (short of overflow): the full check names the frames
            x = _check_image(x, "frames")
            self.checked = True
        b = x.shape[0]
        grey = _grey(x, self.s["channel"], torch.float32, b, "frames")
        mask = _check_mask(self.job.mask, "mask", x, b, torch.float32)
        check_not_flat(grey.flatten(1), None if mask is None else mask.flatten(1) > 0, "frames")
        return self._prepare_fn(grey, mask, self.s["smooth"], self.levels)

    def _maps(self, angle: Tensor, t: Tensor, size: tuple[int, int]) -> Tensor:
        """(n, 3, 3) float64 CPU maps from ``size`` pixels to frame pixels."""
        from ..functional import rigid_matrix

        return _homogeneous(rigid_matrix(angle.double().cpu(), t.double().cpu(), size, self.frame_size))

    def _params(self, maps: list[Tensor], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        angle, t = matrix_parameters(torch.stack(maps)[:, :2], size, self.frame_size)
        return angle.to(self.job.device, torch.float32), t.to(self.job.device, torch.float32)

    def _refine(self, fixed: Any, moving: Any, maps: list[Tensor], size: tuple[int, int]) -> tuple:
        from . import _refine_from

        angle, t = self._params(maps, size)
        fit = _refine_from(fixed, moving, angle, t, **self._opts())
        return (
            self._maps(fit.angle, fit.translation, size),
            fit.score.double().cpu(),
            fit.error.double().cpu(),
        )

    def _search(self, fixed: Any, moving: Any, size: tuple[int, int]) -> tuple:
        from . import _search_from

        fit = _search_from(fixed, moving, **self._opts())
        return (
            self._maps(fit.angle, fit.translation, size),
            fit.score.double().cpu(),
            fit.error.double().cpu(),
        )

    def _batch_errors(self, state: _BatchState, frames: Any, m: Tensor) -> Tensor:
        """(n,) predicted errors of a batch's final maps ``(n, 2, 3)``: measured on the reference where
        they were refined there, scored on it now where they were composed along a chain."""
        missing = [k for k, e in enumerate(state.error) if e is None]
        if missing:
            like = frames.levels[0].image
            rows = self._rows(missing, like)
            for k, e in zip(missing, self._errors(frames.select(rows), m[missing]), strict=True):
                state.error[k] = e
        return torch.stack(state.error)

    def _errors(self, frames: Any, m: Tensor) -> Tensor:
        """(n,) predicted error of maps ``(n, 2, 3)`` of prepared ``frames``, measured on the reference."""
        from . import _scored

        angle, t = matrix_parameters(m, self.size, self.frame_size)
        like = frames.levels[0].image
        fit, _ = _scored(
            self.ref, frames, angle.to(like), t.to(like), self.s["max_points"], self.s["min_overlap"], None
        )
        return fit.error.double().cpu()

    @staticmethod
    def _rows(ks: list[int], like: Tensor) -> Tensor:
        return torch.tensor(ks, dtype=torch.long, device=like.device)

    # -- one pass ----------------------------------------------------------------------------

    def run(
        self, start: int, stop: int, write: Callable[[Tensor], object] | None, average: bool
    ) -> tuple[StackRegistration, Tensor | None, Tensor | None]:
        matrices, scores, anchors, errors = [], [], [], []
        total = count = None
        prev = None  # the prepared frame before the batch
        base = None  # its 3×3 map from the reference
        # frame 0 of the stack is the reference (or was, for a mean): the identity predicts it
        from_first = start == 0 and self.mode in ("first", "previous", "mean")
        for i0, batch in self.job._batches(start, stop):
            n = batch.shape[0]
            frames = self._prepare(batch)
            like = frames.levels[0].image
            chain_fixed = _Before(prev, frames)
            has_prev = [prev is not None or k > 0 for k in range(n)]
            pairs = self._pairs(frames, chain_fixed, has_prev, i0 == 0 and from_first)
            h0 = torch.eye(3, dtype=torch.float64) if i0 == 0 and from_first else base
            state = _BatchState(n, h0)
            if self.prior is not None and self.track:
                rows = list(range(n))
                prior = [_homogeneous(self.prior[i0 - start + k : i0 - start + k + 1])[0] for k in rows]
                self._try(state, frames, rows, prior)
            elif self.track and not (self.mode == "previous" and not self.polish):
                self._waves(state, frames, pairs, chain_fixed, has_prev, i0)
            left = [k for k in range(n) if not state.resolved[k]]
            if left:
                self._fallback(state, frames, left, pairs, chain_fixed, has_prev, i0)
            m = torch.stack(state.h)[:, :2]
            matrices.append(m)
            errors.append(self._batch_errors(state, frames, m))
            scores.append(torch.stack(state.score))
            anchors.append(torch.tensor(state.anchored))
            if write is not None or average:
                aligned = warp(batch, matrix=m.float(), size=self.size)
                if write is not None:
                    write(aligned)
                if average:
                    cover = warp(torch.ones_like(batch[:, :1]), matrix=m.float(), size=self.size)
                    total = aligned.sum(0) if total is None else total + aligned.sum(0)
                    count = cover.sum(0) if count is None else count + cover.sum(0)
            prev = frames.select(self._rows([n - 1], like))
            base = state.h[-1]
        result = self.job._result(
            torch.cat(matrices), torch.cat(scores), torch.cat(anchors), start, self.size, torch.cat(errors)
        )
        return result, total, count

    def _pairs(self, frames: Any, chain_fixed: Any, has_prev: list[bool], first: bool) -> list[Tensor | None]:
        """Coarse pairwise maps ``P_k`` from the identity (None: no predecessor, no match, no tracking)."""
        from . import _refine

        pairs: list[Tensor | None] = [None] * len(has_prev)
        if first:
            pairs[0] = torch.eye(3, dtype=torch.float64)  # frame 0 is the reference itself
        ks = [k for k, p in enumerate(has_prev) if p]
        if not self.track or self.prior is not None or not ks:
            return pairs
        like = frames.levels[0].image
        # the two coarsest levels (not full resolution) are plenty for a prediction
        coarse = slice(max(1, len(frames.levels) - 2), None) if len(frames.levels) > 1 else slice(None)
        rows = self._rows(ks, like)
        fixed, moving = chain_fixed.select(rows, coarse), frames.select(rows, coarse)
        angle, t = _refine.refine(
            fixed.levels,
            moving.levels,
            self.frame_size,
            self.frame_size,
            like.new_zeros(len(ks)),
            like.new_zeros(len(ks), 2),
            min(self.s["iterations"], PAIR_ITERATIONS),
            self.s["max_points"],
        )
        # A pair that does not match after those steps (a sudden turn) predicts nothing: its frame goes
        # to the fallback at once instead of being refined from a wrong start.
        clear = self._clear(fixed.levels[-1], moving.levels[-1], self.frame_size, angle, t)
        maps = self._maps(angle, t, self.frame_size)
        for j, k in enumerate(ks):
            if bool(clear[j]):
                pairs[k] = maps[j]
        return pairs

    def _accept(
        self, maps: Tensor, score: Tensor, predictions: list[Tensor], size: tuple[int, int] | None = None
    ) -> Tensor:
        """(n,) bool: refined ``maps`` scoring TRUST that stayed within ``REACH`` of their predictions.

        ``size``: of the fixed side (default the reference's).
        """
        from . import TRUST

        return (score >= TRUST) & self._near(maps, predictions, size)

    def _near(self, maps: Tensor, predictions: list[Tensor], size: tuple[int, int] | None = None) -> Tensor:
        """(n,) bool: ``maps`` within ``REACH`` pixels of the search level of their predictions."""
        h, w = self.size if size is None else size
        corners = torch.tensor(
            [[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], dtype=torch.float64
        ).T
        moved = (maps @ corners - torch.stack(predictions) @ corners)[:, :2].norm(dim=1).amax(1)
        return moved <= REACH * 2**self.levels

    def _significant(self, moving: Any, maps: Tensor) -> Tensor:
        """(n,) bool: ``maps`` of prepared frames ``moving`` match the reference on the search level
        as clearly as the global search requires of its own answers (:meth:`_clear`)."""
        angle, t = self._params(list(maps), self.size)
        return self._clear(self.ref.levels[-1], moving.levels[-1], self.size, angle, t)

    def _clear(self, fixed: Any, moving: Any, size: tuple[int, int], angle: Tensor, t: Tensor) -> Tensor:
        """(n,) bool on the CPU: one rigid map per pair of levels is as significant as the global
        search requires of its own answers (``_search.SWEEP_BELOW``); ``size`` is the fixed side's."""
        from . import _refine, _search

        z = _refine.significance(
            fixed, moving, size, self.frame_size, angle[:, None], t[:, None],
            self.s["max_points"], self.s["min_overlap"],
        )[:, 0].cpu()  # fmt: skip
        return z >= _search.SWEEP_BELOW

    def _try(self, state: _BatchState, frames: Any, ks: list[int], predictions: list[Tensor]) -> None:
        """Refine frames ``ks`` on the reference from ``predictions``; keep those :meth:`_accept` takes.

        A refinement that scores under TRUST but stayed near its prediction and matches the
        reference significantly on the search level is kept too: the prediction (the pairwise map
        chained from a known one) and the refinement on the reference agree, and the global search
        would only find the same map again. On noisy stacks most frames score under TRUST (the score
        is calibrated for single pairs), and searching each of them again cost more than the whole
        tracking; the score reported stays the one measured.
        """
        like = frames.levels[0].image
        moving = frames.select(self._rows(ks, like))
        maps, score, error = self._refine(self.ref, moving, predictions, self.size)
        ok = self._accept(maps, score, predictions)
        doubt = (~ok & self._near(maps, predictions)).nonzero()[:, 0]
        if doubt.numel():
            coarse = moving.select(doubt.to(like.device), slice(-1, None))
            ok[doubt] = self._significant(coarse, maps[doubt])
        for j, k in enumerate(ks):
            if bool(ok[j]):
                state.set(k, maps[j], score[j], True, error[j])

    def _waves(
        self,
        state: _BatchState,
        frames: Any,
        pairs: list[Tensor | None],
        chain_fixed: Any,
        has_prev: list[bool],
        i0: int,
    ) -> None:
        n = state.n
        for wave in range(WAVES):
            predictions: dict[int, Tensor] = {}
            cur = state.h0
            for k in range(n):
                if state.resolved[k]:
                    cur = state.h[k]
                    continue
                cur = None if cur is None or pairs[k] is None else pairs[k] @ cur
                if cur is not None:
                    predictions[k] = cur
            if predictions:
                self._try(state, frames, list(predictions), list(predictions.values()))
            left = [k for k in range(n) if not state.resolved[k]]
            if not left or wave == WAVES - 1:
                return
            # A failure right after a known map is the frame's own; the ones after it were predicted
            # through it and get another try from what the fallback finds.
            own = [k for k in left if k == 0 or state.resolved[k - 1]]
            self._fallback(state, frames, own, pairs, chain_fixed, has_prev, i0)

    def _fallback(
        self,
        state: _BatchState,
        frames: Any,
        ks: list[int],
        pairs: list[Tensor | None],
        chain_fixed: Any,
        has_prev: list[bool],
        i0: int,
    ) -> None:
        """Frames ``ks`` (in order) that tracking did not settle: the global search, or the chain."""
        like = frames.levels[0].image
        if self.mode != "previous":
            maps, score, error = self._search(self.ref, frames.select(self._rows(ks, like)), self.size)
            for j, k in enumerate(ks):
                state.set(k, maps[j], score[j], True, error[j])
            return
        self._chain(state, frames, ks, pairs, chain_fixed, has_prev, i0)

    def _chain(
        self,
        state: _BatchState,
        frames: Any,
        ks: list[int],
        pairs: list[Tensor | None],
        chain_fixed: Any,
        has_prev: list[bool],
        i0: int,
    ) -> None:
        """``"previous"``: each frame on the one before, composed; re-anchored on frame 0 where weak."""
        like = frames.levels[0].image
        fs = self.frame_size
        pair_m: dict[int, Tensor] = {}
        pair_s: dict[int, float] = {}
        with_prev = [k for k in ks if has_prev[k]]
        tracked = [k for k in with_prev if pairs[k] is not None]
        if tracked:
            rows = self._rows(tracked, like)
            start = [pairs[k] for k in tracked]
            maps, score, _ = self._refine(chain_fixed.select(rows), frames.select(rows), start, fs)
            # a pair that moved far from its coarse start is searched (below) like a weak one
            score = torch.where(self._accept(maps, score.clamp_min(1.0), start, fs), score, -1.0)
            for j, k in enumerate(tracked):
                pair_m[k], pair_s[k] = maps[j], float(score[j])
        weak = [k for k in with_prev if pair_s.get(k, -1.0) < self.anchor_below]
        if weak:
            rows = self._rows(weak, like)
            maps, score, _ = self._search(chain_fixed.select(rows), frames.select(rows), fs)
            for j, k in enumerate(weak):
                if float(score[j]) > pair_s.get(k, -1.0):
                    pair_m[k], pair_s[k] = maps[j], float(score[j])
        want = [
            k
            for k in ks
            if not has_prev[k]
            or pair_s[k] < self.anchor_below
            or (self.anchor_every and (i0 + k) % self.anchor_every == 0 and i0 + k > 0)
        ]
        direct: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        if want:
            maps, score, error = self._search(self.ref, frames.select(self._rows(want, like)), self.size)
            direct = {k: (maps[j], score[j], error[j]) for j, k in enumerate(want)}
        chained = []
        for k in ks:
            h_prev = state.h[k - 1] if k > 0 else state.h0
            use = k in direct and (
                not has_prev[k]
                or float(direct[k][1]) >= self.anchor_below
                or (pair_s[k] < self.anchor_below and float(direct[k][1]) > pair_s[k])
            )
            if use:
                state.set(k, *direct[k][:2], True, direct[k][2])
            else:
                state.set(k, pair_m[k] @ h_prev, torch.tensor(pair_s[k], dtype=torch.float64), False)
                chained.append(k)
        if self.polish and chained:
            start = [state.h[k] for k in chained]
            maps, score, error = self._refine(
                self.ref, frames.select(self._rows(chained, like)), start, self.size
            )
            ok = self._accept(maps, score, start)
            for j, k in enumerate(chained):
                if bool(ok[j]):
                    state.set(k, maps[j], score[j], True, error[j])


class _Before:
    """The frame before each frame of a batch: ``prev`` (the batch's predecessor) for frame 0."""

    def __init__(self, prev: Any, frames: Any) -> None:
        self.prev, self.frames = prev, frames

    def select(self, rows: Tensor, levels: slice = slice(None)) -> Any:
        """The predecessors of frames ``rows`` (ascending, frame 0 only when ``prev`` is known)."""
        if int(rows[0]) > 0:
            return self.frames.select(rows - 1, levels)
        prev = self.prev.select(rows[:1] * 0, levels)
        return prev if rows.numel() == 1 else prev.cat(self.frames.select(rows[1:] - 1, levels))


class _BatchState:
    """The maps (3×3 from the reference, float64), scores and anchors found so far in one batch."""

    def __init__(self, n: int, h0: Tensor | None) -> None:
        self.n, self.h0 = n, h0
        self.h: list[Tensor] = [torch.eye(3, dtype=torch.float64)] * n
        self.score: list[Tensor] = [torch.zeros((), dtype=torch.float64)] * n
        self.anchored = [False] * n
        self.resolved = [False] * n
        # the predicted error of a map measured on the reference; None where it was composed
        self.error: list[Tensor | None] = [None] * n

    def set(self, k: int, h: Tensor, score: Tensor, anchored: bool, error: Tensor | None = None) -> None:
        self.h[k], self.score[k], self.anchored[k], self.resolved[k] = h, score.reshape(()), anchored, True
        self.error[k] = None if error is None else error.reshape(())
