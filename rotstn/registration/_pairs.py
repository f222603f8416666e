"""A batch of independent pairs, registered a batch at a time, in this process or on a Dask cluster.

``register_pairs(fixed, moving)`` is :func:`rotstn.register` over pairs that do not fit in
memory at once: ``fixed[i]`` and ``moving[i]`` are read ``batch_size`` pairs at a time from
tensors, arrays, ``dask.array.Array``\\ s, Zarr stacks or the two columns of a table of files
(:func:`rotstn.io.open_pairs`), and registered by one :func:`register` call per batch. The
pairs are cut into parts of whole batches and run by the engines of :func:`register_stack`
(``_stack_parts``), so on Dask each worker reads and registers its own part and the rows are
the same as in this process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _stack_parts
from ._stack import PART_SIZE, StackRegistration, _bar, _gather, _Job, _parts, _RegionWrite
from ._stack_sources import FrameSource, as_source

__all__ = ["register_pairs"]


@dataclass(frozen=True)
class _Pairs:
    """What a part needs besides its pairs (picklable)."""

    device: torch.device
    batch_size: int
    options: dict[str, Any]


def _run_part(
    fixed: FrameSource, moving: FrameSource, work: _Pairs, start: int, stop: int, write: Any, bar: Any = None
) -> tuple[StackRegistration, None, None]:
    """Pairs ``start:stop``, one :func:`register` call per batch; ``write`` gets ``.aligned``."""
    from . import register

    if write is not None and hasattr(write, "write_frames"):
        write = _RegionWrite(write, start)
    job = _Job(moving, work.device, work.batch_size, None, work.options, bar)
    matrices, scores, errors = [], [], []
    for i in range(start, stop, work.batch_size):
        j = min(i + work.batch_size, stop)
        r = register(fixed.read(i, j).to(work.device), moving.read(i, j).to(work.device), **work.options)
        matrices.append(r.matrix.cpu().double())
        scores.append(r.score.cpu().double())
        errors.append(r.error_px.cpu().double())
        if write is not None:
            write(r.aligned.cpu().float())
        if bar is not None:
            bar.update(j - i)
    anchored = torch.ones(stop - start, dtype=torch.bool)
    size = tuple(fixed.frame_shape[-2:])
    result = job._result(torch.cat(matrices), torch.cat(scores), anchored, start, size, torch.cat(errors))
    return result, None, None


def register_pairs(
    fixed: Tensor | Any,
    moving: Tensor | Any,
    *,
    batch_size: int = 16,
    part_size: int | None = None,
    device: str | torch.device | None = None,
    write: Any = None,
    progress: bool = False,
    client: Any = None,
    **options: Any,
) -> StackRegistration:
    """Register ``moving[i]`` onto ``fixed[i]`` for every pair, ``batch_size`` pairs a :func:`register` call.

    Convention: as :func:`register` (``matrix[i] @ (x, y, 1)`` is the pixel of ``moving[i]`` that
    shows pixel ``(x, y)`` of ``fixed[i]``).

    Args:
        fixed, moving: ``(B, C, H, W)`` or ``(B, H, W)`` each, B pairs (tensors, arrays, dask arrays, stacks
            from :func:`rotstn.io.open_stack`, or the two stacks of :func:`rotstn.io.open_pairs`);
            the two may differ in size and channels. Integer images are registered unscaled.
        batch_size: pairs per :func:`register` call.
        part_size: pairs per part (whole batches; default 256), on one machine and on Dask alike.
        device: where to register; default the CPU.
        write: a callable given each batch's ``aligned`` (moving on fixed's grid) in order, or a
            region writer (:class:`rotstn.io.ZarrWriter`), which Dask workers call themselves.
        progress: a tqdm progress bar of pairs done.
        client: a ``dask.distributed.Client`` (default: the active one for dask arrays and Zarr
            stacks; ``False``: this process).
        **options: passed to :func:`register`.

    Returns:
        A :class:`StackRegistration`, one row per pair: ``frame`` is the pair's index, ``size`` is
        fixed's ``(H, W)``, ``anchored`` is all True.

    Example:
        >>> from rotstn import warp
        >>> from rotstn.data import bundled_image
        >>> img = torch.tensor(bundled_image("camera")[100:164, 150:214], dtype=torch.float32)
        >>> fixed = img.expand(4, 1, 64, 64)
        >>> turns = torch.tensor([0.5, -1.0, 2.0, 3.0])
        >>> result = register_pairs(fixed, warp(fixed, turns), batch_size=2)
        >>> bool(((result.angle + turns).abs() < 1e-2).all())
        True
    """
    fixed_src, moving_src = as_source(fixed), as_source(moving)
    n = len(fixed_src)
    if n != len(moving_src):
        raise ValueError(f"fixed and moving must hold as many images, got {n} and {len(moving_src)}")
    if n == 0:
        raise ValueError("fixed and moving are empty (0 pairs)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    parts = _parts(0, n, PART_SIZE if part_size is None else part_size, batch_size, "pairs")
    engine = _stack_parts.engine(
        client, fixed_src if getattr(fixed_src, "distributable", False) else moving_src
    )
    engine.check_writer(write)
    work = _Pairs(torch.device("cpu") if device is None else torch.device(device), batch_size, options)
    bar = _bar(progress, n)
    try:
        outs = engine.run(_run_part, (fixed_src, moving_src), work, parts, write, bar)
    finally:
        if bar is not None:
            bar.close()
    return _gather([r for r, _, _ in outs])
