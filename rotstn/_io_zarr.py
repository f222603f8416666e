"""Zarr arrays and OME-Zarr images as stacks of frames, and the aligned stack written back as OME-Zarr.

Public through :mod:`rotstn.io` (:func:`rotstn.io.open_stack`, :class:`rotstn.io.ZarrStack`,
:class:`rotstn.io.ZarrWriter`); needs ``zarr`` (``pip install rotstn[dask]``), and
``ome-zarr`` to write OME-Zarr metadata.

* A Zarr array ``(N, H, W)`` or ``(N, C, H, W)``: frames along axis 0.
* An OME-Zarr image (NGFF 0.4 or 0.5: a group with ``multiscales``): one resolution
  ``level`` (0 = full resolution), frames along its ``t`` or ``z`` axis (``axis=``), every
  channel or one (``channel=``), and a fixed position on any other axis (``index=``).

Both are read a slice of frames at a time, straight from the chunks. A chunk that a read
needs and the store does not hold is an error naming the frame (Zarr itself would give the
fill value, which for a stack means a blank or partly blank frame registered as if it were
data; ``missing_chunks="fill"`` reads them as Zarr does), and so is a chunk that cannot be
decoded. A :class:`ZarrStack` pickles as its path and selection, so Dask workers open it
themselves.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["ZarrStack", "ZarrWriter", "is_zarr"]

FRAME_AXES = ("t", "z")


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Zarr stacks need zarr: pip install zarr (or rotstn[dask])") from exc
    return zarr


def is_zarr(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Zarr array or group (v2 or v3) on disk, or is named ``*.zarr``."""
    p = os.fspath(path)
    return p.rstrip("/").endswith(".zarr") or any(
        os.path.exists(os.path.join(p, name)) for name in ("zarr.json", ".zarray", ".zgroup")
    )


def _multiscales(attrs: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, str | None]:
    if "ome" in attrs and "multiscales" in attrs["ome"]:  # NGFF 0.5 (Zarr v3)
        return attrs["ome"]["multiscales"], attrs["ome"].get("version", "0.5")
    if "multiscales" in attrs:  # NGFF 0.4 (Zarr v2)
        ms = attrs["multiscales"]
        return ms, ms[0].get("version", "0.4") if ms else None
    return None, None


class ZarrStack:
    """The frames of a Zarr array or an OME-Zarr image (module docstring), read in slices.

    Attributes:
        path, frame_shape ``(C, H, W)``, dtype (numpy), metadata (``"ome"``: the axes, the
        scale of the level read, its NGFF version, ``omero`` channels and name, for
        :class:`ZarrWriter`).

    Example:
        >>> import tempfile, numpy as np, zarr
        >>> from rotstn.io import open_stack
        >>> path = tempfile.mkdtemp() + "/stack.zarr"
        >>> _ = zarr.create_array(path, data=np.arange(5 * 32 * 48, dtype=np.uint16).reshape(5, 32, 48))
        >>> stack = open_stack(path)
        >>> len(stack), stack.frame_shape, tuple(stack.read(1, 3).shape)
        (5, (1, 32, 48), (2, 1, 32, 48))
    """

    distributable = True  # Dask workers can read it: register_stack uses the active client

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        level: int = 0,
        channel: int | None = None,
        axis: str | None = None,
        index: dict[str, int] | None = None,
        array: str | None = None,
        missing_chunks: str = "error",
    ) -> None:
        zarr = _zarr()
        self.path = os.fspath(path)
        if missing_chunks not in ("error", "fill"):
            raise ValueError(f"missing_chunks must be 'error' or 'fill', got {missing_chunks!r}")
        self.missing_chunks = missing_chunks
        try:
            node = zarr.open(self.path, mode="r")
        except Exception as exc:
            raise ValueError(f"cannot read {self.path} as Zarr: {exc}") from exc
        self.metadata: dict[str, Any] = {}
        index = dict(index or {})
        if isinstance(node, zarr.Group):
            multiscales, version = _multiscales(dict(node.attrs))
            if multiscales:
                ms = multiscales[0]
                datasets = ms["datasets"]
                if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < len(datasets):
                    raise ValueError(
                        f"level must be an int in 0..{len(datasets) - 1} (the resolution levels of "
                        f"{self.path}), got {level!r}"
                    )
                array = datasets[level]["path"]
                names = [a["name"] if isinstance(a, dict) else a for a in ms["axes"]]
                axes = [a if isinstance(a, dict) else {"name": a} for a in ms["axes"]]
                scale, shift = [1.0] * len(names), None
                for t in datasets[level].get("coordinateTransformations", []):
                    if t.get("type") == "scale":
                        scale = [float(v) for v in t["scale"]]
                    elif t.get("type") == "translation":
                        shift = [float(v) for v in t["translation"]]
                omero = node.attrs.get("omero") or (node.attrs.get("ome") or {}).get("omero")
            else:
                if array is None:
                    members = sorted(name for name, _ in node.arrays())
                    raise ValueError(
                        f"{self.path} is a Zarr group without OME-Zarr multiscales: choose one of its "
                        f"arrays with array= (it holds {members})"
                    )
                names = axes = scale = shift = omero = version = None
            try:
                arr = node[array]
            except KeyError as exc:
                raise ValueError(f"{self.path} has no array {array!r}") from exc
        else:
            if array is not None:
                raise ValueError(f"{self.path} is a Zarr array, not a group: array= must be None")
            arr, names, axes, scale, shift, omero, version = node, None, None, None, None, None, None
        self.array_path = array
        self.dtype = np.dtype(arr.dtype)
        if self.dtype.kind not in "uif":
            raise TypeError(f"{self.path} must hold real numbers, got {arr.dtype}")
        shape = tuple(arr.shape)
        if names is None:
            if len(shape) not in (3, 4):
                raise ValueError(
                    f"{self.path} must be a Zarr array (N, H, W) or (N, C, H, W), got shape {shape}"
                )
            names = ["t", "y", "x"] if len(shape) == 3 else ["t", "c", "y", "x"]
            if axis is not None or index:
                raise ValueError(f"{self.path} is a plain Zarr array: axis= and index= are for OME-Zarr")
        if names[-2:] != ["y", "x"]:
            raise ValueError(f"{self.path}: the last two axes must be y and x, got {names}")
        self._select(names, shape, axis, channel, index)
        self.frame_shape = (
            1 if self._channel is not None or "c" not in names else shape[names.index("c")],
            shape[-2],
            shape[-1],
        )
        if axes is not None:
            keep = [
                self._frame_dim,
                *([names.index("c")] if "c" in names else []),
                len(names) - 2,
                len(names) - 1,
            ]
            self.metadata["ome"] = {
                "version": version,
                "axes": [axes[i] for i in keep],
                "scale": [scale[i] for i in keep],
                "translation": None if shift is None else [shift[i] for i in keep],
                "channel": self._channel,
                "omero": omero,
                "name": ms.get("name") if isinstance(ms, dict) else None,
            }
        self._arr = arr

    def _select(
        self, names: list[str], shape: tuple[int, ...], axis: str | None, channel: int | None, index: dict
    ) -> None:
        sizes = dict(zip(names, shape, strict=True))
        if axis is None:
            long = [a for a in FRAME_AXES if sizes.get(a, 1) > 1]
            if len(long) > 1:
                raise ValueError(
                    f"{self.path} has t (size {sizes['t']}) and z (size {sizes['z']}): choose the frame axis "
                    "with axis='t' or axis='z', and the position on the other with index={'z': k} or {'t': k}"
                )
            axis = long[0] if long else next((a for a in FRAME_AXES if a in sizes), None)
        if axis not in sizes or axis in ("c", "y", "x"):
            raise ValueError(
                f"axis must name the frame axis of {self.path} (one of {names[:-2]}), got {axis!r}"
            )
        for name, i in index.items():
            if name not in sizes or name in (axis, "c", "y", "x"):
                raise ValueError(f"index names an axis other than the frames, c, y and x; got {name!r}")
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < sizes[name]:
                raise ValueError(f"index[{name!r}] must be an int in 0..{sizes[name] - 1}, got {i!r}")
        others = [n for n in names[:-2] if n not in (axis, "c")]
        for name in others:
            if name not in index and sizes[name] > 1:
                raise ValueError(
                    f"{self.path} has a {name} axis of size {sizes[name]}: choose a position with "
                    f"index={{{name!r}: k}} (or make it the frame axis with axis={name!r})"
                )
        if channel is not None:
            nc = sizes.get("c", 1)
            if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < nc:
                raise ValueError(f"channel must be an int in 0..{nc - 1} ({self.path}), got {channel!r}")
        self._names, self._frame_dim, self._channel = names, names.index(axis), channel
        self._fixed = {names.index(n): index.get(n, 0) for n in others}
        self._n = sizes[axis]

    # pickled for a Dask worker as the path and the selection: the worker opens the array itself
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arr"] = None
        return state

    def _array(self) -> Any:
        if self._arr is None:
            node = _zarr().open(self.path, mode="r")
            self._arr = node if self.array_path is None else node[self.array_path]
        return self._arr

    def __len__(self) -> int:
        return self._n

    def _region(self, start: int, stop: int) -> list[Any]:
        sel: list[Any] = []
        for d, name in enumerate(self._names):
            if d == self._frame_dim:
                sel.append(slice(start, stop))
            elif name == "c" and self._channel is not None:
                sel.append(slice(self._channel, self._channel + 1))
            elif d in self._fixed:
                sel.append(slice(self._fixed[d], self._fixed[d] + 1))
            else:
                sel.append(slice(None))
        return sel

    def _missing(self, start: int, stop: int) -> tuple[int, str] | None:
        """The first frame in ``start:stop`` whose chunk the store does not hold, and the chunk's key."""
        from zarr.core.sync import sync

        arr = self._array()
        grid = arr.shards or arr.chunks
        ranges = []
        for sl, g, n in zip(self._region(start, stop), grid, arr.shape, strict=True):
            lo, hi, _ = sl.indices(n)
            ranges.append(range(lo // g, (hi - 1) // g + 1))
        coords = list(itertools.product(*ranges))
        keys = [arr.metadata.encode_chunk_key(c) for c in coords]

        async def exists() -> list[bool]:
            return await asyncio.gather(*[(arr.store_path / k).exists() for k in keys])

        for c, k, ok in zip(coords, keys, sync(exists()), strict=True):
            if not ok:
                first = max(start, c[self._frame_dim] * grid[self._frame_dim])
                return first, k
        return None

    def read(self, start: int, stop: int) -> Tensor:
        if self.missing_chunks == "error":
            missing = self._missing(start, stop)
            if missing is not None:
                i, key = missing
                raise ValueError(
                    f"frame {i}: chunk {key} of {os.path.join(self.path, self.array_path or '')} is missing "
                    "(open_stack(..., missing_chunks='fill') reads missing chunks as the fill value)"
                )
        from .registration._stack_sources import read_frames

        return read_frames(self._read, start, stop, f"cannot read its chunk of {self.path}")

    def _read(self, start: int, stop: int) -> np.ndarray:
        data = np.asarray(self._array()[tuple(self._region(start, stop))])
        # to (frame, c, y, x): the fixed axes are length 1, a missing c axis is added
        rest = [d for d in range(len(self._names)) if d != self._frame_dim and d not in self._fixed]
        data = data.transpose([self._frame_dim, *rest, *self._fixed]).reshape(stop - start, *self.frame_shape)
        return data

    def close(self) -> None:
        pass


class ZarrWriter:
    """The aligned stack as an OME-Zarr image ``(N, C, H, W)``, written region by region.

    Created (metadata and an empty array) in the calling process; :meth:`write_frames`
    writes frames ``first:first + n`` and is called by whichever process registered them
    (a Dask worker: the writer pickles as its path). Each frame is its own chunk along the
    frame axis, so parts written at once by different workers never share a chunk, and a
    part written twice (a retried task) writes the same values to the same chunks.

    The image is NGFF 0.4 (Zarr v2) or 0.5 (Zarr v3, default): ``metadata["ome"]`` from a
    :class:`ZarrStack` keeps the input's version, axes (names, types, units), pixel scale and
    channel names. :meth:`record` stores the transforms next to the image (array
    ``transforms``, the columns of :data:`rotstn.io.COLUMNS`) and in the group's attributes
    under ``"rotstn"`` (the reference, the columns).

    Example:
        >>> import tempfile, torch, zarr
        >>> out = ZarrWriter(tempfile.mkdtemp() + "/out.zarr", (3, 1, 16, 16), "uint16")
        >>> out.write_frames(0, torch.full((3, 1, 16, 16), 7.4))
        >>> a = zarr.open_group(out.path, mode="r")["0"]
        >>> a.shape, a.dtype.name, int(a[2, 0, 5, 5])
        ((3, 1, 16, 16), 'uint16', 7)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: tuple[int, int, int, int],
        dtype: np.dtype | str = np.float32,
        metadata: dict[str, Any] | None = None,
        chunks: tuple[int, int] | None = None,
    ) -> None:
        zarr = _zarr()
        self.path = os.fspath(path)
        self.shape = tuple(int(v) for v in shape)
        if len(self.shape) != 4:
            raise ValueError(f"shape must be (N, C, H, W), got {shape}")
        self.dtype = np.dtype(dtype)
        ome = dict((metadata or {}).get("ome") or {})
        version = ome.get("version") or "0.5"
        self.zarr_format = 2 if str(version).startswith("0.4") else 3
        _, c, h, w = self.shape
        cy, cx = chunks or (min(h, 1024), min(w, 1024))
        group = zarr.open_group(self.path, mode="w", zarr_format=self.zarr_format)
        group.create_array(
            "0",
            shape=self.shape,
            chunks=(1, c, cy, cx),
            dtype=self.dtype,
            fill_value=0,
            # a frame of zeros is still a frame: store every chunk, so a reader can tell a lost one
            config={"write_empty_chunks": True},
        )
        self._ome(group, ome, version)
        self._arr: Any = None

    def _ome(self, group: Any, ome: dict[str, Any], version: str) -> None:
        from ome_zarr.format import FormatV04, FormatV05
        from ome_zarr.writer import write_multiscales_metadata

        axes = [dict(a) for a in ome.get("axes") or []]
        scale = list(ome.get("scale") or [])
        shift = list(ome.get("translation") or [0.0] * len(axes))
        if len(axes) == 3:  # the input had no c axis: the output has one of size 1
            axes.insert(1, {"name": "c", "type": "channel"})
            scale.insert(1, 1.0)
            shift.insert(1, 0.0)
        if len(axes) != 4:
            axes = [
                {"name": "t", "type": "time"},
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space"},
                {"name": "x", "type": "space"},
            ]
            scale, shift = [1.0] * 4, [0.0] * 4
        fmt = FormatV04() if self.zarr_format == 2 else FormatV05()
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if any(shift):
            transforms.append({"type": "translation", "translation": shift})
        datasets = [{"path": "0", "coordinateTransformations": transforms}]
        extra: dict[str, Any] = {}
        omero = ome.get("omero")
        if omero and "channels" in omero:
            chans = omero["channels"]
            if ome.get("channel") is not None:
                chans = chans[ome["channel"] : ome["channel"] + 1]
            if len(chans) == self.shape[1]:
                extra["omero"] = {**omero, "channels": chans}
        write_multiscales_metadata(group, datasets, fmt=fmt, axes=axes, name=ome.get("name") or "aligned")
        if extra:
            if self.zarr_format == 2:
                group.attrs["omero"] = extra["omero"]
            else:
                group.attrs["ome"] = {**dict(group.attrs["ome"]), "omero": extra["omero"]}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arr"] = None
        return state

    def write_frames(self, first: int, batch: Tensor) -> None:
        """Write frames ``first:first + n`` from ``batch`` ``(n, C, H, W)`` (rounded and clipped to dtype)."""
        from .io import _convert

        if self._arr is None:
            self._arr = _zarr().open_group(self.path, mode="r+")["0"]
        data = _convert(batch, self.dtype)
        self._arr[first : first + data.shape[0]] = data

    def record(self, result: Any, reference: str) -> None:
        """Store the transforms table (one row per frame of ``result``) and the reference's name."""
        from .io import COLUMNS, ERROR_COLUMN, _rows

        columns = [*COLUMNS, ERROR_COLUMN]
        group = _zarr().open_group(self.path, mode="r+")
        table = np.array(_rows(result), dtype=np.float64).reshape(-1, len(columns))
        group.create_array("transforms", shape=table.shape, dtype=np.float64, overwrite=True)[...] = table
        group.attrs["rotstn"] = {
            "reference": reference,
            "transforms": {"array": "transforms", "columns": columns},
            "matrix": "m00..m12 map an aligned (reference) pixel (x, y, 1) to the frame's pixel",
        }

    def close(self) -> None:
        pass

    def __len__(self) -> int:
        return self.shape[0]
