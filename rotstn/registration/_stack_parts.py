"""Where the parts of a stack are registered: in this process, or on the workers of a Dask cluster.

:func:`rotstn.register_stack` cuts the frames into parts (``_stack._parts``: whole batches,
the same cut for both engines) and hands each engine the same function, ``_stack._run_part``
(``_pairs._run_part`` for :func:`rotstn.registration.register_pairs`), so the two paths share
one engine and give the same rows: the local engine runs the parts one after the other, the
Dask engine submits one task per part and gathers the rows in frame order.

On Dask each task gets its frames' source (a path or a task graph; a slice for frames in
memory), the pass (the reference image, options, the earlier pass's maps for ``"mean"``)
and the writer; it reads its frames, writes its aligned frames into its own region of the
output and returns its rows (a few hundred bytes a frame). A worker that dies mid-part loses
nothing: the scheduler runs the part again on another worker, which writes the same region
again and returns the same rows, and only the rows of the part's finished run are gathered.
"""

from __future__ import annotations

import sys
import uuid
from typing import Any

from ._stack_sources import FrameSource, part_source

__all__ = ["DaskEngine", "LocalEngine", "engine", "local_cluster"]


class LocalEngine:
    """The parts one after the other in this process."""

    def check_writer(self, write: Any) -> None:
        pass

    def run(
        self,
        func: Any,
        sources: tuple[FrameSource, ...],
        work: Any,
        parts: list[tuple[int, int]],
        write: Any,
        bar: Any,
    ) -> list:
        return [func(*sources, work, a, b, write, bar) for a, b in parts]


class DaskEngine:
    """One task per part on a ``dask.distributed`` client's workers, rows gathered in frame order."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def check_writer(self, write: Any) -> None:
        if write is not None and not hasattr(write, "write_frames"):
            raise TypeError(
                "write must be a region writer that the Dask workers call (write_frames(first_frame, "
                f"batch), e.g. rotstn.io.ZarrWriter) when a client registers the stack, got {write!r}"
            )

    def run(
        self,
        func: Any,
        sources: tuple[FrameSource, ...],
        work: Any,
        parts: list[tuple[int, int]],
        write: Any,
        bar: Any,
    ) -> list:
        from distributed import as_completed

        run = uuid.uuid4().hex[:8]
        futures = [
            self.client.submit(
                func,
                *(part_source(src, a, b) for src in sources),
                work,
                a,
                b,
                write,
                key=f"rotstn-part-{a}-{b}-{run}",
            )
            for a, b in parts
        ]
        size = {f.key: b - a for f, (a, b) in zip(futures, parts, strict=True)}
        try:
            for done in as_completed(futures):
                if done.status == "error":
                    done.result()  # raises the part's error here (frame index and all)
                if bar is not None:
                    bar.update(size[done.key])
            return self.client.gather(futures)
        finally:
            self.client.cancel(futures)


# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 (return freed memory at once), and a fixed
# trim threshold also fixes glibc's mmap threshold at 128 KiB: every pyramid level and temporary is then
# a fresh mmap, faulted in page by page (8× the page faults, 1.7× the time of a 192² frame here). Taking
# blocks under 16 MiB from the heap again keeps the trimming and the speed (docs/stack.md, "Memory").
WORKER_ENVIRON = {"MALLOC_MMAP_THRESHOLD_": 16 * 2**20}


def local_cluster(n_workers: int, memory_limit: str | int | None = None) -> Any:
    """A ``distributed.LocalCluster`` of ``n_workers`` processes of one thread on the loopback interface."""
    import dask
    from distributed import LocalCluster

    environ = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENVIRON.items()}
    with dask.config.set(environ):
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            memory_limit=memory_limit or "auto",
        )


def engine(client: Any, src: FrameSource) -> LocalEngine | DaskEngine:
    """The engine for ``client`` (module docstring); ``None``: the active client for sources workers read."""
    if client is False:
        return LocalEngine()
    if client is None:
        if not getattr(src, "distributable", False) or "distributed" not in sys.modules:
            return LocalEngine()
        from distributed import default_client

        try:
            client = default_client()
        except ValueError:  # no client is active
            return LocalEngine()
    if not hasattr(client, "submit") or not hasattr(client, "gather"):
        raise TypeError(f"client must be a dask.distributed.Client, None or False, got {client!r}")
    return DaskEngine(client)
