"""Reading and writing image stacks and transforms tables, one batch of frames at a time.

* :func:`open_stack`: a multi-page TIFF (slices read straight from the file when the
  pixels are stored uncompressed in one block, page by page otherwise) or a folder
  of PNG/JPEG/TIFF images (one frame per file, in name order). Frames are read as
  ``(n, C, H, W)`` float32 with their values unchanged (no scaling), so the
  writer can give back the original dtype.
* :class:`StackWriter`: appends aligned frames to a TIFF (ImageJ-compatible for
  8/16-bit and float32 grey stacks, keeping the pixel size: resolution tags and
  the ImageJ unit) or to a folder, converting back to the input dtype.
* Zarr arrays and OME-Zarr images (:class:`ZarrStack`, through :func:`open_stack`) and
  :class:`ZarrWriter`, which Dask workers write region by region (``rotstn/_io_zarr.py``).
* :func:`write_transforms`, :func:`read_transforms`, :func:`merge_transforms`:
  the CSV table ``frame, angle_deg, tx, ty, score, m00, m01, m02, m10, m11, m12``
  (matrix convention of :func:`rotstn.register_stack`).

tifffile (TIFF) and Pillow (PNG/JPEG) are optional dependencies:
``pip install rotstn[io]``; zarr and ome-zarr: ``pip install rotstn[dask]``.
"""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._io_zarr import ZarrStack, ZarrWriter, is_zarr
from .registration._stack import StackRegistration, matrix_parameters

__all__ = [
    "FolderStack",
    "StackWriter",
    "TiffStack",
    "ZarrStack",
    "ZarrWriter",
    "merge_transforms",
    "open_pairs",
    "open_stack",
    "read_image",
    "read_transforms",
    "write_transforms",
]

TIFF = (".tif", ".tiff")
IMAGES = (".png", ".jpg", ".jpeg", *TIFF)
COLUMNS = ("frame", "angle_deg", "tx", "ty", "score", "m00", "m01", "m02", "m10", "m11", "m12")
# Written after COLUMNS; a table without it (written before it existed) reads as NaN.
ERROR_COLUMN = "error_px"


def _tifffile() -> Any:
    try:
        import tifffile
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("TIFF stacks need tifffile: pip install tifffile (or rotstn[io])") from exc
    return tifffile


def _chw(a: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, S) page(s) -> channels first."""
    return a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)


class TiffStack:
    """The pages of a multi-page TIFF as frames (a :class:`rotstn.registration._stack.FrameSource`).

    Attributes:
        path, dtype (numpy), frame_shape ``(C, H, W)``, metadata (``resolution``,
        ``resolutionunit``, ``unit``, ``spacing`` where the file has them).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        tifffile = _tifffile()
        self.path = str(path)
        try:
            self._file = tifffile.TiffFile(self.path)
            series = self._file.series[0]
            page = self._file.pages.first
        except Exception as exc:
            raise ValueError(f"cannot read {self.path} as a TIFF stack: {exc}") from exc
        shape, axes = tuple(series.shape), series.axes
        rgb = axes.endswith("S")
        frame_nd = 3 if rgb else 2
        if len(shape) < frame_nd:
            raise ValueError(f"{self.path} holds no image (series shape {shape})")
        self.dtype = np.dtype(series.dtype)
        h, w = shape[-frame_nd : len(shape) - frame_nd + 2]
        self.frame_shape = (shape[-1] if rgb else 1, h, w)
        self._n = math.prod(shape[:-frame_nd])
        # Uncompressed pixels in one block: read slices of it with plain file reads (a memory map would
        # count every page read so far in the process's resident memory).
        self._offset = series.dataoffset
        self._stored = np.dtype(series.dtype).newbyteorder(self._file.byteorder)
        self.metadata: dict[str, Any] = {}
        if page.tags.get("XResolution") is not None:
            self.metadata["resolution"] = page.resolution
            self.metadata["resolutionunit"] = int(page.resolutionunit)
        ij = self._file.imagej_metadata or {}
        for key in ("unit", "spacing", "finterval"):
            if key in ij:
                self.metadata[key] = ij[key]

    # pickled for a Dask worker as its path: the worker opens the file itself
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_file"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._file = _tifffile().TiffFile(self.path)

    def __len__(self) -> int:
        return self._n

    def read(self, start: int, stop: int) -> Tensor:
        if self._offset is not None:
            count = (stop - start) * math.prod(self.frame_shape)
            fh = self._file.filehandle
            fh.seek(self._offset + start * math.prod(self.frame_shape) * self._stored.itemsize)
            data = np.frombuffer(fh.read(count * self._stored.itemsize), self._stored, count)
            data = data.reshape(stop - start, *self._page_shape())
        else:
            data = self._file.asarray(key=range(start, stop)).reshape(stop - start, *self._page_shape())
        data = data[:, None] if data.ndim == 3 else np.moveaxis(data, -1, 1)
        return torch.from_numpy(data.astype(np.float32))

    def _page_shape(self) -> tuple[int, ...]:
        c, h, w = self.frame_shape
        return (h, w) if c == 1 else (h, w, c)

    def close(self) -> None:
        self._file.close()


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


class FolderStack:
    """The image files of a folder (PNG/JPEG/TIFF, name order: frame2 before frame10) as frames.

    All files must have one size and channel count (checked from their headers when opened).
    ``files``: these files in this order instead (a column of a table of pairs, :func:`open_pairs`).
    """

    def __init__(self, path: str | os.PathLike, files: list[str | os.PathLike] | None = None) -> None:
        self.path = str(path)
        if files is not None:
            self.files = [Path(f) for f in files]
            for f in self.files:
                if not f.is_file():
                    raise ValueError(f"{f} (in {self.path}) does not exist")
        else:
            self.files = sorted(
                (p for p in Path(self.path).iterdir() if p.suffix.lower() in IMAGES),
                key=lambda p: _natural(p.name),
            )
        if not self.files:
            raise ValueError(f"{self.path} is an empty stack: no {'/'.join(IMAGES)} files in it")
        shapes = [self._header(p) for p in self.files]
        first = shapes[0]
        for p, s in zip(self.files, shapes, strict=True):
            if s != first:
                raise ValueError(
                    f"mixed frame sizes: {p} is {s[2]}×{s[1]} (W×H) with {s[0]} channel(s) but "
                    f"{self.files[0]} is {first[2]}×{first[1]} with {first[0]}"
                )
        self.frame_shape = first
        self.dtype = self._load(self.files[0]).dtype
        self.metadata: dict[str, Any] = {}

    @staticmethod
    def _header(p: Path) -> tuple[int, int, int]:
        if p.suffix.lower() in TIFF:
            tifffile = _tifffile()
            try:
                with tifffile.TiffFile(p) as t:
                    page = t.pages.first
                    return (page.samplesperpixel, page.imagelength, page.imagewidth)
            except Exception as exc:
                raise ValueError(f"cannot read {p}: {exc}") from exc
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(p) as img:
                return (len(img.getbands()), img.height, img.width)
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"cannot read {p}: {exc}") from exc

    @staticmethod
    def _load(p: Path) -> np.ndarray:
        return read_image(p)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, start: int, stop: int) -> Tensor:
        return torch.from_numpy(np.stack([self._load(p) for p in self.files[start:stop]]).astype(np.float32))

    def close(self) -> None:
        pass


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image file (PNG/JPEG/TIFF: its first page) as ``(C, H, W)`` in its own dtype, unscaled.

    Raises:
        ValueError: the file cannot be read (the message names it).
    """
    p = Path(path)
    try:
        if p.suffix.lower() in TIFF:
            with _tifffile().TiffFile(p) as t:
                return _chw(t.pages.first.asarray())
        from PIL import Image

        with Image.open(p) as img:
            return _chw(np.asarray(img))
    except Exception as exc:
        raise ValueError(f"cannot read {p}: {exc}") from exc


def open_stack(path: str | os.PathLike, **zarr_options: Any) -> TiffStack | FolderStack | ZarrStack:
    """Open a multi-page TIFF, a folder of images, a Zarr array or an OME-Zarr image as frames.

    Nothing is read yet. ``zarr_options`` (Zarr only, :class:`ZarrStack`): ``level`` (OME-Zarr
    resolution level, 0 = full), ``channel`` (one channel, default all), ``axis`` (the frame
    axis, ``"t"`` or ``"z"``), ``index`` (a position on any other axis, ``{"z": 3}``), ``array``
    (an array of a plain group), ``missing_chunks`` (``"error"``, default, or ``"fill"``).

    Raises:
        ValueError: the path does not exist, is not a TIFF, folder or Zarr store, cannot be read,
            holds no frames, or (folder) holds frames of mixed sizes. The message names the path.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p} does not exist")
    if is_zarr(p):
        stack: Any = ZarrStack(p, **zarr_options)
    elif zarr_options:
        raise ValueError(f"{', '.join(zarr_options)}: options for Zarr stacks, but {p} is not a Zarr store")
    elif p.is_dir():
        return FolderStack(p)
    elif p.suffix.lower() not in TIFF:
        raise ValueError(f"{p} is not a TIFF stack (.tif/.tiff), a Zarr store or a folder of images")
    else:
        stack = TiffStack(p)
    if len(stack) == 0:
        raise ValueError(f"{p} is an empty stack (0 frames)")
    return stack


def open_pairs(table: str | os.PathLike) -> tuple[FolderStack, FolderStack]:
    """A CSV table of image pairs (columns ``fixed`` and ``moving``, one pair a row) as two stacks.

    Paths are relative to the table's folder unless absolute. Each column's images must share one
    size (they are registered a batch at a time); the two columns may differ. For
    :func:`rotstn.registration.register_pairs`.

    Raises:
        ValueError: the table cannot be read, lacks a column, or names a file that does not exist.
    """
    try:
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ValueError(f"cannot read the table of pairs {table}: {exc}") from exc
    if not rows or {"fixed", "moving"} - set(rows[0]):
        raise ValueError(f"{table} is not a table of pairs: it needs the columns fixed and moving")
    here = Path(table).parent
    fixed = [here / r["fixed"] for r in rows]
    moving = [here / r["moving"] for r in rows]
    return FolderStack(table, files=fixed), FolderStack(table, files=moving)


def _convert(batch: Tensor, dtype: np.dtype) -> np.ndarray:
    """Frames as ``dtype``: rounded and clipped to its range for integer dtypes."""
    data = batch.detach().cpu().numpy()
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max)
    return data.astype(dtype)


class StackWriter:
    """Write frames batch by batch to a TIFF file (``.tif``/``.tiff``) or a folder (any other path).

    Values are rounded and clipped to ``dtype``'s range for integer dtypes. A folder gets
    ``names`` (default ``frame_00000.tif``, ...); TIFF pages keep ``metadata`` from a
    :class:`TiffStack` (pixel size).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dtype: np.dtype | str = np.float32,
        metadata: dict[str, Any] | None = None,
        names: list[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.metadata = dict(metadata or {})
        self.names = names
        self.count = 0
        self._tiff = None
        if self.path.suffix.lower() in TIFF:
            self._imagej = self.dtype in (np.uint8, np.uint16, np.float32)
            self._tiff = _tifffile().TiffWriter(self.path, imagej=self._imagej, bigtiff=not self._imagej)
        else:
            self.path.mkdir(parents=True, exist_ok=True)

    def write(self, batch: Tensor) -> None:
        """Append frames ``(n, C, H, W)``."""
        data = _convert(batch, self.dtype)
        for frame in data:
            page = frame[0] if frame.shape[0] == 1 else np.moveaxis(frame, 0, -1)
            if self._tiff is not None:
                kwargs: dict[str, Any] = {"contiguous": True}
                if "resolution" in self.metadata:
                    kwargs["resolution"] = tuple(self.metadata["resolution"])
                    kwargs["resolutionunit"] = self.metadata.get("resolutionunit")
                if self._imagej:
                    md = {k: self.metadata[k] for k in ("unit", "spacing", "finterval") if k in self.metadata}
                    kwargs["metadata"] = md
                    page = page[None]  # one ImageJ slice per page
                self._tiff.write(
                    page, photometric="rgb" if page.ndim == 3 and page.shape[-1] == 3 else None, **kwargs
                )
            else:
                name = self.names[self.count] if self.names else f"frame_{self.count:05d}.tif"
                self._save(self.path / name, page)
            self.count += 1

    @staticmethod
    def _save(path: Path, page: np.ndarray) -> None:
        if path.suffix.lower() in TIFF:
            _tifffile().imwrite(path, page)
        else:
            from PIL import Image

            Image.fromarray(page).save(path)

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()

    def __enter__(self) -> StackWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rows(result: StackRegistration) -> list[list[float]]:
    """The transforms table's rows as numbers: ``COLUMNS`` (frame, degrees, pixels, score, matrix), then
    ``ERROR_COLUMN``."""
    rows = []
    for i in range(len(result)):
        m = result.matrix[i].reshape(-1).tolist()
        tx, ty = result.translation[i].tolist()
        rows.append(
            [
                int(result.frame[i]),
                math.degrees(float(result.angle[i])),
                tx,
                ty,
                float(result.score[i]),
                *m,
                float(result.error_px[i]),
            ]
        )
    return rows


def write_transforms(path: str | os.PathLike, result: StackRegistration) -> None:
    """Write a transforms table: one CSV row per frame (``COLUMNS``; angle in degrees, pixels)."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow((*COLUMNS, ERROR_COLUMN))
        for row in _rows(result):
            out.writerow([row[0], *(repr(float(v)) for v in row[1:])])


def read_transforms(path: str | os.PathLike, size: tuple[int, int] | None = None) -> StackRegistration:
    """Read a transforms table written by :func:`write_transforms` (or ``rotstn register-stack``).

    The matrix columns are authoritative; angle and translation are recomputed from them when
    ``size`` ``(H, W)`` (the frames', equal to the reference's) is given, and read as written
    otherwise. ``anchored`` is not stored and reads as all False; ``size`` defaults to (0, 0).
    """
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ValueError(f"cannot read transforms table {path}: {exc}") from exc
    if not rows or set(COLUMNS) - set(rows[0]):
        raise ValueError(f"{path} is not a transforms table: it needs the columns {', '.join(COLUMNS)}")
    try:
        frame = torch.tensor([int(r["frame"]) for r in rows])
        num = torch.tensor([[float(r[c]) for c in COLUMNS[1:]] for r in rows], dtype=torch.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    matrix = num[:, 4:].reshape(-1, 2, 3)
    angle, t = torch.deg2rad(num[:, 0]), num[:, 1:3]
    if size is not None:
        angle, t = matrix_parameters(matrix, size, size)
    anchored = torch.zeros(len(rows), dtype=torch.bool)
    try:
        error = torch.tensor([float(r.get(ERROR_COLUMN) or "nan") for r in rows], dtype=torch.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return StackRegistration(frame, angle, t, matrix, num[:, 3], anchored, tuple(size or (0, 0)), error)


def merge_transforms(
    paths: list[str | os.PathLike], output: str | os.PathLike | None = None
) -> StackRegistration:
    """Join the tables of parts of one stack (``--frames START:STOP``) into one, in frame order.

    Raises:
        ValueError: a frame in two tables (both paths named), or no tables.
    """
    if not paths:
        raise ValueError("merge_transforms needs at least one transforms table, got none")
    parts = [read_transforms(p) for p in paths]
    seen: dict[int, str] = {}
    for p, part in zip(paths, parts, strict=True):
        for i in part.frame.tolist():
            if i in seen:
                raise ValueError(f"frame {i} is in both {seen[i]} and {p}")
            seen[i] = str(p)
    cat = {
        k: torch.cat([getattr(part, k) for part in parts])
        for k in ("frame", "angle", "translation", "matrix", "score", "anchored", "error_px")
    }
    order = cat["frame"].argsort()
    merged = StackRegistration(**{k: v[order] for k, v in cat.items()}, size=parts[0].size)
    if output is not None:
        write_transforms(output, merged)
    return merged
