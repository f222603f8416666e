"""Command line: ``rotstn register FIXED MOVING [-o ALIGNED] [--fixed-mask M] [--moving-mask M]``.

``rotstn register-stack IN -o OUT --reference first --transforms t.csv [--mask M]
[--frames START:STOP] [--device cuda] [--batch-size N]`` registers a TIFF stack,
a folder of images, a Zarr array or an OME-Zarr image, streaming, in this process
or (``--workers N``, ``--scheduler ADDRESS``) on a Dask cluster, which writes the
aligned stack to OUT.zarr; ``rotstn merge-transforms a.csv b.csv -o all.csv``
joins the tables of parts registered separately. Exit status: 0 done, 1 bad
input, 3 (with ``--strict``) a score below the trust threshold.

Also runnable as ``python -m rotstn``. Images are read and written with
Pillow (PNG, JPEG, TIFF, BMP, ...). Colour images are registered on their
grey level (the channel mean, or ``--channel``) and every channel is
resampled with the transform found; an alpha channel is resampled too but
not used for the estimate. Masks are image files: non-zero pixels are
compared, zero pixels (labels, rulers, borders) are not.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Sequence

import numpy as np
import torch

from .registration import TRUST, register

__all__ = ["main"]


def _read(path: str) -> tuple[torch.Tensor, np.dtype]:
    """Image file -> (C, H, W) float64 (integer files scaled to [0, 1]) and the file's dtype."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("rotstn register reads images with Pillow: pip install pillow") from exc
    with Image.open(path) as img:
        if img.mode not in ("L", "RGB", "RGBA", "I;16", "I", "F"):
            # Palette, 1-bit, CMYK, ...: to plain 8-bit channels, keeping transparency.
            transparent = "A" in img.mode or "transparency" in img.info
            img = img.convert("RGBA" if transparent else "RGB" if img.mode != "1" else "L")
        array = np.asarray(img)
    dtype = array.dtype
    data = array.astype(np.float64)
    if np.issubdtype(dtype, np.integer):
        # 32-bit integer images come from 16-bit files opened in mode "I".
        data /= 65535.0 if dtype.itemsize >= 2 else 255.0
    if data.ndim == 2:
        data = data[..., None]
    return torch.from_numpy(np.ascontiguousarray(data.transpose(2, 0, 1))), dtype


def _write(path: str, image: torch.Tensor, dtype: np.dtype) -> None:
    from PIL import Image

    data = image.permute(1, 2, 0).numpy()
    if np.issubdtype(dtype, np.integer):
        top = 65535 if dtype.itemsize >= 2 else 255
        data = np.clip(np.rint(data * top), 0, top).astype(dtype)
    else:
        data = data.astype(np.float32)
    Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data).save(path)


def _colour(image: torch.Tensor) -> torch.Tensor:
    """The channels that carry the picture: alpha is left out of the estimate."""
    return image[:3] if image.shape[0] in (2, 4) else image


def _mask(path: str | None, image: torch.Tensor, name: str) -> torch.Tensor | None:
    if path is None:
        return None
    mask, _ = _read(path)
    if mask.shape[1:] != image.shape[1:]:
        raise ValueError(
            f"{name} {path} is {mask.shape[2]}×{mask.shape[1]} (W×H) but its image is "
            f"{image.shape[2]}×{image.shape[1]}"
        )
    return _colour(mask).amax(0) > 0


def _register(args: argparse.Namespace) -> int:
    fixed, _ = _read(args.fixed)
    moving, dtype = _read(args.moving)
    result = register(
        _colour(fixed),
        _colour(moving),
        model=args.model,
        fixed_mask=_mask(
            args.fixed_mask or args.mask, fixed, "--fixed-mask" if args.fixed_mask else "--mask"
        ),
        moving_mask=_mask(
            args.moving_mask or args.mask, moving, "--moving-mask" if args.moving_mask else "--mask"
        ),
        channel=args.channel,
        smooth=args.smooth,
        metric=args.metric,
    )
    tx, ty = (float(v) for v in result.translation[0])
    score = float(result.score[0])
    print(f"angle: {math.degrees(float(result.angle[0])):.4f} deg")
    print(f"translation: {tx:.3f} {ty:.3f} px (x right, y down)")
    print(f"score: {score:.4f}" + ("" if score >= TRUST else f" (below {TRUST}: do not trust this result)"))
    print(f"predicted error: {float(result.error_px[0]):.3f} px (largest displacement over the overlap)")
    if bool(result.ambiguous[0]):
        runner = math.degrees(float(result.runner_up_angle[0]))
        print(f"ambiguous: a turn of {runner:.4f} deg fits nearly as well")
    m = result.matrix[0].tolist()
    print("matrix: " + "  ".join(" ".join(f"{v:.6f}" for v in row) for row in m))
    if args.output is not None:
        _write(args.output, result.apply(moving[None])[0], dtype)
        print(f"aligned: {args.output}")
    return 0 if score >= TRUST or not args.strict else 3


def _frames(text: str | None, n: int) -> tuple[int, int]:
    if text is None:
        return 0, n
    match = re.fullmatch(r"\s*(-?\d*)\s*:\s*(-?\d*)\s*", text)
    if match is None:
        raise ValueError(f"--frames must be START:STOP (e.g. 0:100, 100:), got {text!r}")
    start, stop, _ = slice(*(int(v) if v else None for v in match.groups())).indices(n)
    if start >= stop:
        raise ValueError(f"--frames {text} selects no frames of the {n} in the stack")
    return start, stop


def _zarr_options(args: argparse.Namespace) -> dict:
    options: dict = {}
    if args.level is not None:
        options["level"] = args.level
    if args.read_channel is not None:
        options["channel"] = args.read_channel
    if args.axis is not None:
        options["axis"] = args.axis
    if args.missing_chunks is not None:
        options["missing_chunks"] = args.missing_chunks
    for text in args.index or []:
        match = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", text)
        if match is None:
            raise ValueError(f"--index must be AXIS=K (e.g. z=3), got {text!r}")
        options.setdefault("index", {})[match.group(1)] = int(match.group(2))
    return options


def _client(args: argparse.Namespace) -> tuple[object, object]:
    """(client, cluster) for --scheduler / --workers; (None, None) to register in this process."""
    if args.scheduler is None and args.workers is None:
        return None, None
    if args.scheduler is not None and args.workers is not None:
        raise ValueError(
            "--scheduler and --workers exclude each other: run on a cluster, or start a local one"
        )
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise ImportError(
            "--scheduler and --workers need dask.distributed: pip install rotstn[dask]"
        ) from exc
    if args.scheduler is not None:
        return Client(args.scheduler), None
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    cluster = LocalCluster(
        n_workers=args.workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        memory_limit=args.memory_limit or "auto",
    )
    return Client(cluster), cluster


def _register_stack(args: argparse.Namespace) -> int:
    from . import io
    from .registration import register_stack

    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    distributed = args.scheduler is not None or args.workers is not None
    if distributed and args.output is not None and not io.is_zarr(args.output):
        raise ValueError(
            f"--out {args.output}: with --workers or --scheduler the workers write the aligned stack "
            "themselves, to Zarr (--out OUT.zarr)"
        )
    stack = io.open_stack(args.input, **_zarr_options(args))
    client = cluster = None
    try:
        start, stop = _frames(args.frames, len(stack))
        reference: str | torch.Tensor = args.reference
        if args.reference not in ("first", "previous", "mean"):
            if not os.path.exists(args.reference):
                raise ValueError(
                    "--reference must be first, previous, mean or an image file; "
                    f"{args.reference} does not exist"
                )
            # unscaled, like the frames (a TIFF reference: its first page)
            reference = torch.from_numpy(io.read_image(args.reference).astype(np.float32))
        elif args.reference == "mean" and (start, stop) != (0, len(stack)):
            raise ValueError(
                "--reference mean with --frames would give each part its own mean; register the whole "
                "stack, or pass a mean image as --reference FILE"
            )
        mask = None
        if args.mask is not None:
            m, _ = _read(args.mask)
            if tuple(m.shape[1:]) != tuple(stack.frame_shape[1:]):
                raise ValueError(
                    f"--mask {args.mask} is {m.shape[2]}×{m.shape[1]} (W×H) but the frames are "
                    f"{stack.frame_shape[2]}×{stack.frame_shape[1]}"
                )
            mask = _colour(m).amax(0) > 0
        names = None
        if isinstance(stack, io.FolderStack):
            names = [p.name for p in stack.files[start:stop]]
        writer = None
        if args.output is not None and io.is_zarr(args.output):
            size = (
                tuple(reference.shape[-2:]) if isinstance(reference, torch.Tensor) else stack.frame_shape[1:]
            )
            shape = (stop - start, stack.frame_shape[0], *size)
            writer = _Shifted(io.ZarrWriter(args.output, shape, stack.dtype, stack.metadata), start)
        elif args.output is not None:
            writer = io.StackWriter(args.output, stack.dtype, stack.metadata, names)
        client, cluster = _client(args)
        try:
            result = register_stack(
                stack,
                reference=reference,
                start=start,
                stop=stop,
                batch_size=args.batch_size,
                mask=mask,
                device=args.device,
                anchor_every=args.anchor_every,
                write=None if writer is None else writer if isinstance(writer, _Shifted) else writer.write,
                progress=not args.quiet,
                part_size=args.part_size,
                client=client if client is not None else False,
                smooth=args.smooth,
                metric=args.metric,
            )
        finally:
            if writer is not None:
                writer.close()
        if isinstance(writer, _Shifted):
            writer.writer.record(result, args.reference)
    finally:
        stack.close()
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    if args.transforms is not None:
        io.write_transforms(args.transforms, result)
    low = int((result.score < TRUST).sum())
    print(
        f"registered frames {start}:{stop} of {args.input}"
        + (f"; aligned: {args.output}" if args.output else "")
        + (f"; transforms: {args.transforms}" if args.transforms else "")
    )
    if low:
        bad = result.frame[result.score < TRUST].tolist()
        print(
            f"{low} frame(s) scored below {TRUST} (do not trust them): {bad[:20]}{' ...' if low > 20 else ''}"
        )
    return 3 if low and args.strict else 0


class _Shifted:
    """A region writer for frames ``start:stop`` of a stack: frame ``start`` is the output's frame 0."""

    def __init__(self, writer: object, start: int) -> None:
        self.writer, self.start = writer, start

    def write_frames(self, first: int, batch: torch.Tensor) -> None:
        self.writer.write_frames(first - self.start, batch)

    def close(self) -> None:
        self.writer.close()


def _merge(args: argparse.Namespace) -> int:
    from . import io

    merged = io.merge_transforms(args.tables, args.output)
    frames = merged.frame.tolist()
    gaps = sorted(set(range(frames[0], frames[-1] + 1)) - set(frames))
    print(f"merged {len(args.tables)} table(s), frames {frames[0]}..{frames[-1]}: {args.output}")
    if gaps:
        print(f"warning: {len(gaps)} frame(s) missing: {gaps[:20]}{' ...' if len(gaps) > 20 else ''}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rotstn", description="Rotation tools from rotstn.")
    commands = parser.add_subparsers(dest="command", required=True)
    reg = commands.add_parser(
        "register",
        help="find the rotation and translation that align MOVING onto FIXED",
        description=(
            "Find the rigid transform (a rotation about an unknown point: angle and translation) "
            "that aligns MOVING onto FIXED, over the full circle. Prints the angle in degrees "
            "(counter-clockwise as displayed), the translation in pixels, the score (trust the "
            f"result above {TRUST}) and the 2×3 pixel matrix that maps a FIXED pixel (x, y, 1) to the "
            "MOVING pixel that shows it. Exit status: 0 done, 1 bad input, 3 low score with --strict."
        ),
    )
    reg.add_argument("fixed", metavar="FIXED", help="reference image file")
    reg.add_argument("moving", metavar="MOVING", help="image file to bring onto FIXED (any size)")
    reg.add_argument(
        "-o", "--output", metavar="ALIGNED", help="write MOVING resampled onto FIXED's grid here"
    )
    reg.add_argument(
        "--mask", metavar="MASK", help="one mask for both images (same size): non-zero is compared"
    )
    reg.add_argument("--fixed-mask", metavar="MASK", help="image file, non-zero where FIXED is compared")
    reg.add_argument("--moving-mask", metavar="MASK", help="image file, non-zero where MOVING is compared")
    reg.add_argument(
        "--model",
        choices=("rigid", "rotation"),
        default="rigid",
        help="rigid (default): angle and translation; rotation: about the image centre only",
    )
    reg.add_argument(
        "--channel", type=int, default=None, help="estimate on this channel (default: their mean)"
    )
    reg.add_argument(
        "--smooth", type=float, default=1.0, help="Gaussian blur (pixels) before estimating (default 1)"
    )
    reg.add_argument(
        "--metric",
        choices=("ncc", "mi"),
        default="ncc",
        help="ncc (default): intensities related linearly; mi: by any function (two stains, an inverted "
        "scan; mutual information search, slower)",
    )
    reg.add_argument(
        "--strict", action="store_true", help=f"exit with status 3 when the score is below {TRUST}"
    )
    stack = commands.add_parser(
        "register-stack",
        help="register every frame of a TIFF stack, folder of images or (OME-)Zarr on one reference",
        description=(
            "Register every frame of INPUT (a multi-page TIFF, a folder of PNG/JPEG/TIFF images, a Zarr "
            "array or an OME-Zarr image) on one reference, over the full circle, a batch at a time (the "
            "stack is streamed, never loaded whole), in this process or on Dask workers (--workers, "
            "--scheduler). "
            "Writes the aligned frames (same dtype; TIFF pixel size kept) and a transforms table (CSV: "
            "frame, "
            "angle_deg, tx, ty, score, m00..m12, where the matrix maps a reference pixel (x, y, 1) to the "
            "frame's pixel that shows it). Exit status: 0 done, 1 bad input, 3 a frame scored below "
            f"{TRUST} with --strict."
        ),
    )
    stack.add_argument(
        "input", metavar="INPUT", help="multi-page TIFF file, folder of images, Zarr array or OME-Zarr image"
    )
    stack.add_argument(
        "-o",
        "--out",
        "--output",
        dest="output",
        metavar="OUT",
        help="aligned stack: OUT.zarr (OME-Zarr, with the transforms; written by the workers with --workers "
        "or --scheduler), a .tif/.tiff file, or a folder (one file a frame)",
    )
    stack.add_argument("--transforms", metavar="CSV", help="write the transforms table here")
    stack.add_argument(
        "--reference",
        default="first",
        metavar="REF",
        help="first (default), previous (each on the one before, composed to frame 0), mean, "
        "or an image file",
    )
    stack.add_argument("--mask", metavar="MASK", help="image file, non-zero where the frames are compared")
    stack.add_argument(
        "--frames",
        metavar="START:STOP",
        help="register only these frames (Python slice, e.g. 0:1000) against the whole stack's reference; "
        "join the parts' tables with merge-transforms",
    )
    stack.add_argument("--device", default=None, help="cpu (default) or cuda")
    stack.add_argument("--batch-size", type=int, default=16, help="frames per registration call (default 16)")
    stack.add_argument(
        "--anchor-every",
        type=int,
        default=0,
        help="with --reference previous: also register every N-th frame on frame 0 (bounds drift; 0: never)",
    )
    stack.add_argument(
        "--smooth", type=float, default=1.0, help="Gaussian blur (pixels) before estimating (default 1)"
    )
    stack.add_argument(
        "--metric",
        choices=("ncc", "mi"),
        default="ncc",
        help="ncc (default): intensities related linearly; mi: by any function (two stains, an inverted "
        "scan; mutual information search, slower)",
    )
    zarr = stack.add_argument_group("Zarr and OME-Zarr input")
    zarr.add_argument("--level", type=int, default=None, help="OME-Zarr resolution level (default 0, full)")
    zarr.add_argument(
        "--read-channel", type=int, default=None, metavar="C", help="read only this channel (default all)"
    )
    zarr.add_argument("--axis", choices=("t", "z"), default=None, help="OME-Zarr axis along which frames lie")
    zarr.add_argument(
        "--index",
        action="append",
        metavar="AXIS=K",
        help="OME-Zarr: the position on another axis (e.g. z=3 when the frames are t); repeatable",
    )
    zarr.add_argument(
        "--missing-chunks",
        choices=("error", "fill"),
        default=None,
        help="a chunk the store does not hold: error (default, naming the frame) or fill (read the fill "
        "value, as Zarr does: for stacks written without their empty chunks)",
    )
    dask = stack.add_argument_group("Dask (pip install rotstn[dask])")
    dask.add_argument(
        "--scheduler", metavar="ADDRESS", help="run on this Dask cluster (e.g. tcp://10.0.0.5:8786)"
    )
    dask.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="start a local Dask cluster of N worker processes",
    )
    dask.add_argument(
        "--memory-limit", default=None, metavar="BYTES", help="with --workers: memory per worker (e.g. 1GiB)"
    )
    dask.add_argument(
        "--part-size",
        type=int,
        default=None,
        metavar="N",
        help="frames per part, the unit of work of a worker (default 256; the whole stack with previous)",
    )
    stack.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    stack.add_argument(
        "--strict", action="store_true", help=f"exit with status 3 when a frame scores below {TRUST}"
    )
    merge = commands.add_parser(
        "merge-transforms",
        help="join transforms tables of parts of one stack (register-stack --frames)",
        description="Join the transforms tables of parts of one stack into one, in frame order. A frame in "
        "two tables is an error (exit status 1); missing frames are reported.",
    )
    merge.add_argument("tables", metavar="CSV", nargs="+", help="transforms tables")
    merge.add_argument("-o", "--output", metavar="CSV", required=True, help="the merged table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        run = {"register": _register, "register-stack": _register_stack, "merge-transforms": _merge}
        return run[args.command](args)
    except (OSError, ValueError, TypeError, ImportError) as exc:
        print(f"rotstn {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
