"""Command line: ``rotstn register FIXED MOVING [-o ALIGNED] [--fixed-mask M] [--moving-mask M]``.

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
    )
    tx, ty = (float(v) for v in result.translation[0])
    score = float(result.score[0])
    print(f"angle: {math.degrees(float(result.angle[0])):.4f} deg")
    print(f"translation: {tx:.3f} {ty:.3f} px (x right, y down)")
    print(f"score: {score:.4f}" + ("" if score >= TRUST else f" (below {TRUST}: do not trust this result)"))
    m = result.matrix[0].tolist()
    print("matrix: " + "  ".join(" ".join(f"{v:.6f}" for v in row) for row in m))
    if args.output is not None:
        _write(args.output, result.apply(moving[None])[0], dtype)
        print(f"aligned: {args.output}")
    return 0 if score >= TRUST or not args.strict else 3


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
        "--strict", action="store_true", help=f"exit with status 3 when the score is below {TRUST}"
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
