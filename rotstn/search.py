"""Targets for an STN trained by a downstream loss: search the turns, keep the best.

An STN in front of a classifier (``RotationSTN(paired=False)``) learns its
angle from the gradient of the class loss. That gradient is local: it says
which way a small turn helps, never that a digit lying on its side should
turn 90°, and early in training, when the classifier has learned little, it
is mostly noise. :func:`best_turn` asks the downstream model directly: it
turns each image by a set of candidate angles around the STN's current
estimate, scores every turned image with the downstream loss (no gradient),
and returns, per image, the turn that scored best. Training the STN's head
towards it (``stn.angle_loss(out, target)``) is a global, labelled-by-the-task
signal built from the same loss; no angle is ever given.

Convention as in :mod:`rotstn.functional`: radians, counter-clockwise as
displayed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import _validate
from .functional import rotate, wrap_angle

__all__ = ["best_turn"]


def best_turn(
    image: Tensor,
    score: Callable[[Tensor], Tensor],
    *,
    around: Tensor | None = None,
    candidates: int = 16,
    span: float = math.pi,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> Tensor:
    """The candidate turn that minimises ``score(rotate(image, turn))``, per image.

    Candidates are ``around + δ`` with ``candidates`` offsets ``δ`` evenly spaced
    over ``[-span, span]`` (around the full circle, ``2π / candidates`` apart,
    when ``span = π``), plus ``δ = 0`` if the grid misses it: ``around`` is always
    tried first and kept on ties, so the result never scores worse than it. Runs without
    gradient: the result is a target, not a prediction.

    Args:
        image: ``(B, C, H, W)`` the images the STN reads (not the warped ones).
        score: maps turned images ``(B, C, H, W)`` to one loss per image ``(B,)``,
            lower is better; e.g. ``lambda im: F.cross_entropy(cnn(im), y, reduction="none")``.
        around: ``(B,)`` radians, the centre of the search (typically the STN's
            ``out.angle``); default 0.
        candidates: number of turns tried per image (>= 2); with ``span = π`` they
            are ``2π / candidates`` apart.
        span: the largest offset from ``around``, in ``(0, π]`` radians.
        mode, padding_mode: as in :func:`rotstn.rotate`.

    Returns:
        ``(B,)`` radians, wrapped to ``(-π, π]``, detached.

    Example:
        >>> x = torch.zeros(1, 1, 9, 9); x[..., 4, 6:] = 1   # a bar pointing right
        >>> goal = torch.rot90(x, 1, (-2, -1))                # the same bar pointing up
        >>> turn = best_turn(x, lambda im: (im - goal).pow(2).flatten(1).sum(1), candidates=8)
        >>> round(float(turn), 4)  # a quarter turn counter-clockwise
        1.5708
    """
    x = _validate.image(image, "image")
    if image.dim() != 4:
        raise ValueError(
            f"image must be (B, C, H, W), got {_validate.shape_str(image)}; add one with image[None]"
        )
    if not callable(score):
        raise TypeError(
            f"score must be a callable mapping images to per-image losses, got {type(score).__name__}"
        )
    if not isinstance(candidates, int) or isinstance(candidates, bool) or candidates < 2:
        raise ValueError(f"candidates must be an int >= 2, got {candidates!r}")
    if isinstance(span, bool) or not isinstance(span, (int, float)) or not 0 < span <= math.pi:
        raise ValueError(f"span must be a number in (0, π] radians, got {span!r}")
    b = x.shape[0]
    if around is None:
        base = x.new_zeros(b)
    else:
        if not isinstance(around, Tensor) or around.shape != (b,):
            got = _validate.shape_str(around) if isinstance(around, Tensor) else type(around).__name__
            raise ValueError(f"around must be a tensor of shape ({b},) (one angle per image), got {got}")
        if around.device != x.device:
            raise ValueError(f"around must be on the image's device {x.device}, got {around.device}")
        base = around.detach().to(x.dtype)
    if span == math.pi:
        offsets = torch.arange(candidates, dtype=x.dtype, device=x.device) * (2 * math.pi / candidates)
        offsets = wrap_angle(offsets)
    else:
        offsets = torch.linspace(-span, span, candidates, dtype=x.dtype, device=x.device)
        offsets = offsets[(offsets.abs() > 1e-12)]
        offsets = torch.cat((offsets.new_zeros(1), offsets))
    best = torch.full((b,), math.inf, dtype=torch.float64, device=x.device)
    turn = base.clone()
    with torch.no_grad():
        for delta in offsets:
            angle = base + delta
            s = score(rotate(x, angle, mode=mode, padding_mode=padding_mode))
            if not isinstance(s, Tensor) or s.shape != (b,):
                got = _validate.shape_str(s) if isinstance(s, Tensor) else type(s).__name__
                raise ValueError(f"score must return one loss per image, shape ({b},), got {got}")
            s = torch.nan_to_num(s.detach().double(), nan=math.inf)
            better = s < best
            best = torch.where(better, s, best)
            turn = torch.where(better, angle, turn)
    return wrap_angle(turn)
