"""Command line: ``rotstn register FIXED MOVING [-o ALIGNED]``.

Also runnable as ``python -m rotstn``. Images are read and written with
Pillow (PNG, JPEG, TIFF, BMP, ...). Colour images are registered on their
grey level (the channel mean) and every channel is rotated by the angle found;
an alpha channel is rotated too but not used for the estimate.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import numpy as np
import torch

from .functional import rotate
from .registration import register

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


def _register(args: argparse.Namespace) -> int:
    fixed, _ = _read(args.fixed)
    moving, dtype = _read(args.moving)
    if fixed.shape[1:] != moving.shape[1:]:
        raise ValueError(
            f"FIXED and MOVING must have the same size, got {args.fixed} "
            f"{fixed.shape[2]}×{fixed.shape[1]} and {args.moving} {moving.shape[2]}×{moving.shape[1]} (W×H)"
        )
    result = register(_colour(fixed), _colour(moving), smooth=args.smooth)
    angle = result.angle[0]
    print(f"angle: {math.degrees(float(angle)):.4f} deg")
    print(f"score: {float(result.score[0]):.4f}")
    if args.output is not None:
        _write(args.output, rotate(moving, angle), dtype)
        print(f"aligned: {args.output}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rotstn", description="Rotation tools from rotstn.")
    commands = parser.add_subparsers(dest="command", required=True)
    reg = commands.add_parser(
        "register",
        help="find the rotation that aligns MOVING onto FIXED",
        description=(
            "Find the rotation about the image centre that aligns MOVING onto FIXED, over the "
            "full circle. Prints the angle in degrees (counter-clockwise as displayed) and the "
            "normalised cross-correlation of the aligned pair over the central disc."
        ),
    )
    reg.add_argument("fixed", metavar="FIXED", help="reference image file")
    reg.add_argument("moving", metavar="MOVING", help="image file to turn onto FIXED (same size)")
    reg.add_argument("-o", "--output", metavar="ALIGNED", help="write MOVING rotated onto FIXED here")
    reg.add_argument(
        "--smooth", type=float, default=1.0, help="Gaussian blur (pixels) before estimating (default 1)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _register(args)
    except (OSError, ValueError, TypeError) as exc:
        print(f"rotstn {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
