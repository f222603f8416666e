"""Registration: the rotation (and translation) that brings ``moving`` onto ``fixed``.

Convention
----------
``register(fixed, moving)`` finds the rigid map written down in
:mod:`rotstn.functional` ("rigid map"): ``result.matrix`` ``(B, 2, 3)`` maps
fixed pixel ``(x, y, 1)`` to the pixel of ``moving`` that shows it, and
``warp(moving, result.angle, result.translation) ≈ fixed``: ``moving``
turned by ``angle`` (radians, counter-clockwise as displayed) about its
centre, then shifted by ``translation`` pixels (x right, y down). With
``model="rotation"`` the translation is zero and ``rotate(moving, angle) ≈
fixed``.

Stages (one private module each, read in this order):

* ``_images``: grey level, blur, masks and the image pyramid;
* ``_search``: the global search on a coarse level: angle candidates over the
  full circle from magnitude spectra, the translation of each by masked FFT
  cross-correlation;
* ``_refine``: Gauss–Newton on (θ, tx, ty) over the overlap, coarse to fine,
  and the score;
* ``_rotation``: the rotation-about-the-centre model (``model="rotation"``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _validate
from ..functional import rigid_matrix, warp, wrap_angle
from . import _mutual, _refine, _rotation, _search
from ._images import Level, check_not_flat, indices, masked_blur, noise_variance, pyramid

__all__ = ["Registration", "StackRegistration", "register", "register_stack"]

MIN_SIZE = 8
MIN_MASKED = 64  # pixels a mask must leave
TRUST = 0.9  # the score above which a result is right (benchmarks/trust.py)
# The predicted error (error_px) is ERROR_SCALE standard deviations of the displacement plus the step
# still left (_refine._spread), at least ERROR_FLOOR (interpolation leaves a few hundredths of a pixel on
# clean pairs).
# ERROR_SCALE was set on benchmarks/trust.py --seed 1 so that about 95 % of right results lie under it.
# 2.25 (about 95 % on seeds 50 and 57, 6 % more right results trusted) made a 512² pair 1.006 px off
# trusted (predicted 0.38 px: a bias the covariance does not see; tests/test_trust.py): it stays 3.
ERROR_SCALE = 3.0
ERROR_FLOOR = 0.02
# A result is trusted only where its predicted error is at most this (beyond it the score is at most
# TRUST·(ERROR_TRUST / error_px)², _trust): the largest error of a trusted result should stay under a pixel.
ERROR_TRUST = 0.5
# A runner-up hypothesis whose significance is at least this fraction of the best one's, and which is
# DISTINCT pixels or more away from the result somewhere in the fixed frame, makes the result ambiguous.
AMBIGUOUS = 0.85
DISTINCT = 3.0
MATCHED = 0.02  # agreement with a runner-up this close to the pick's (both trusted): ambiguous (_settled)
NEAR_ANGLE = math.radians(4.0)  # search hypotheses this close in angle ...
NEAR_SHIFT = 6.0  # ... and in search-level pixels are near misses of each other (_diverse)
EXACT = 1e-3  # misfits (1 - NCC) this small tell two alignments of a clean pair no further apart (_settled)
TIED = 1e-4  # misfits within 2× of each other and this much: the NCC cannot choose between two (_settled)
SETTLE = 0.3  # a runner-up this significant next to the pick is refined as far and compared again (_settled)
# Shares of the overlap between which a region only one image shows is masked out (_without_unmatched).
UNMATCHED = (0.02, 0.25)
UNMATCHED_PIXELS = 128 * 128
MI_KEEP = 4  # hypotheses of the mutual-information search verified with their own intensity map (_rigid_mi)
MI_ROUNDS = 4  # at most, of full-resolution intensity map and refinement after the first (_rigid_mi)
# The intensity map, estimated from the images themselves, leaves a few hundredths of a pixel even on
# clean pairs (0.01-0.05 px on tests/test_mutual.py's inverted pairs, 0.005-0.02 for the same by NCC).
MI_ERROR_FLOOR = 0.05
MI_APART = 2.0  # times the distance between the two directions' results, a floor of an MI result's error
MI_SETTLED = 0.01  # pixels: a round that moves no pair further ends them
# A fixed image that matches itself this well a shift away (normalised autocorrelation) is checked for a
# second alignment one repeat away (_repeats).
PERIODIC = 0.7
SMOOTHER = 2.0  # times smooth: the blur of the last refinement of a result not yet precise (_smoother)
POLISH = 4  # times max_points that a result too uncertain to trust is refined on again (_polish)


@dataclass(frozen=True)
class Registration:
    """What :func:`register` found (all detached).

    Attributes:
        angle: ``(B,)`` radians in (-π, π], counter-clockwise as displayed.
        translation: ``(B, 2)`` ``(tx, ty)`` pixels (x right, y down): where moving's
            centre lands in fixed, relative to fixed's centre, after the turn.
        matrix: ``(B, 2, 3)`` pixel matrix: ``matrix @ (x, y, 1)`` is the pixel of moving
            that shows fixed pixel ``(x, y)`` (the map :func:`rotstn.warp` samples with).
        score: ``(B,)`` trust in [0, 1]: the normalised cross-correlation of the two
            images over their overlap, reduced when the overlap is small. Above 0.9
            the result can be trusted (see :func:`register`).
        overlap: ``(B,)`` fraction of the smaller image that the other one covers.
        aligned: ``(B, C, H, W)`` moving resampled onto fixed's pixel grid (zeros where
            moving has no content), in moving's dtype.
        error_px: ``(B,)`` predicted largest displacement error in pixels over fixed's
            frame: how far ``matrix`` may be from the truth somewhere in the overlap
            (:func:`register`, "Predicted error"). The diagonal of the larger image
            where the images do not agree (nothing bounds the error of such a result).
        ambiguous: ``(B,)`` bool: a second, distinct alignment (another angle, or a
            translation more than a few pixels away) explains the pair nearly as well
            (a periodic texture, a symmetric object); the score is halved.
        runner_up_angle: ``(B,)`` radians: that alignment's angle (NaN where there is none).
    """

    angle: Tensor
    translation: Tensor
    matrix: Tensor
    score: Tensor
    overlap: Tensor
    aligned: Tensor
    error_px: Tensor
    ambiguous: Tensor
    runner_up_angle: Tensor

    def apply(
        self,
        image: Tensor,
        *,
        mode: str = "bilinear",
        padding_mode: str = "zeros",
        align_corners: bool = False,
    ) -> Tensor:
        """Resample ``image`` (moving's size, any channels) onto fixed's grid with this result.

        Register on one channel, apply to all: ``result.apply(all_channels)``.
        """
        return warp(
            image,
            matrix=self.matrix.to(image.device),
            size=tuple(self.aligned.shape[-2:]),
            mode=mode,
            padding_mode=padding_mode,
            align_corners=align_corners,
        )


InitLike = Callable[[Tensor, Tensor], object]
MODELS = ("rigid", "rotation")
METRICS = ("ncc", "mi")


def register(
    fixed: Tensor,
    moving: Tensor,
    *,
    model: str = "rigid",
    metric: str = "ncc",
    fixed_mask: Tensor | None = None,
    moving_mask: Tensor | None = None,
    channel: int | None = None,
    init: InitLike | None = None,
    init_window: float = math.radians(20),
    smooth: float = 1.0,
    iterations: int = 20,
    min_overlap: float = 0.1,
    search_size: int = 64,
    max_points: int = 8192,
) -> Registration:
    """Find the rigid map (rotation about an unknown point) that aligns ``moving`` onto ``fixed``.

    Convention: ``warp(moving, result.angle, result.translation) ≈ fixed``, and
    ``result.matrix @ (x, y, 1)`` is the pixel of ``moving`` that shows fixed
    pixel ``(x, y)`` (:mod:`rotstn.functional`, "rigid map"). Angles over the
    full circle, translations up to about half the image, partial overlap,
    masks and images of different sizes; no training. Insensitive to
    brightness, contrast and moderate gamma differences (it maximises a
    normalised cross-correlation over the overlap).

    Method (module docstring): on a pyramid level of about ``search_size``
    pixels, angle candidates from magnitude spectra and the translation of
    each by masked FFT cross-correlation; then Gauss–Newton on the angle and
    translation over the overlap, coarse to fine.

    Args:
        fixed: ``(B, C, H, W)`` or ``(C, H, W)`` floating-point image(s).
        moving: ``(B, C, Hm, Wm)`` or ``(C, Hm, Wm)``; any size (the smaller field
            of view may lie inside the larger), batch 1 or B (each side broadcasts).
        model: ``"rigid"`` (angle and translation) or ``"rotation"`` (about the image
            centre, no translation: for pairs cut that way; same size, no masks).
        metric: ``"ncc"`` (intensities related by a gain and an offset) or ``"mi"`` (related by
            any function: two stains, a negative, a non-monotonic lookup). ``"mi"`` searches by
            mutual information over 6 intensity levels for every angle (5° apart) and translation,
            then refines and scores the pair with one image's intensities mapped onto the other's
            (docs/registration.md, "Multimodal pairs"); several times slower; rigid model only.
        fixed_mask, moving_mask: where each image has content to compare, ``(H, W)``,
            ``(1 or B, H, W)`` or ``(1 or B, 1, H, W)``, bool or float (> 0.5 counts).
            Leave out labels, rulers, zero borders.
        channel: estimate on this channel only (default: the channel mean); the
            result applies to every channel (``aligned``, :meth:`Registration.apply`).
        init: optional initialiser, e.g. a trained paired :class:`rotstn.RotationSTN`,
            called as ``init(moving, fixed)`` (4-D, same-size, under ``no_grad``) and
            returning ``(B,)`` angles or an object with ``.angle``. The angle search is
            then restricted to ``init_window`` around its answer.
        init_window: half-width in radians of that search; ignored without ``init``.
        smooth: Gaussian blur (pixels) applied to both images before estimation (0: none).
            It does not bias the answer and makes noisy pairs more accurate.
        iterations: maximum Gauss–Newton steps per pyramid level (0: the search's estimate).
        min_overlap: the smallest overlap the search considers, as a fraction of the
            smaller image. A lower value allows larger shifts; a higher one resists
            chance matches on small overlaps.
        search_size: longer side (pixels) of the pyramid level searched over the
            whole circle; larger is slower and finds pairs with only fine detail.
        max_points: fixed pixels compared per level (a regular subset beyond that).

    Returns:
        A :class:`Registration`. ``angle``, ``translation``, ``matrix``, ``score``,
        ``error_px`` are float32 (float64 for float64 inputs).

    Trust:
        ``score >= TRUST`` (0.9) marks a result to trust: the images agree block by
        block over the overlap (the lower quartile of noise-corrected NCCs in 4×4
        blocks, scaled down for small overlaps, fewer than three textured blocks, or an
        overlap that does not pin the motion down), the predicted error is at most
        ``ERROR_TRUST`` (0.5 px; beyond it the score is at most ``0.9 · (0.5 / error_px)²``), and
        no distinct alignment explains the pair nearly as well (else ``ambiguous`` and the
        score is halved). ``python benchmarks/trust.py --seed N`` measures it on randomized
        pairs over every bundled picture (docs/registration.md, "Trust").

    Predicted error:
        ``error_px`` is how far ``matrix`` may be from the truth at the worst point of
        the overlap, in pixels: ``ERROR_SCALE`` (3) standard deviations of the
        displacement under the cluster-robust Gauss–Newton covariance of (θ, tx, ty),
        plus the motion of the step still left, at least 0.02 px; at least the distance
        to the runner-up for an ambiguous result; the diagonal of the larger image where
        the images do not agree. Calibrated so that about 97 % of right results lie under
        it on that benchmark. Keep results with ``error_px`` under your tolerance (and
        ``score >= TRUST``); a threshold below about 0.05 px keeps only clean pairs.

    Raises:
        TypeError: a non-tensor or non-floating image or mask, or a bad ``init``.
        ValueError: images smaller than 8×8, NaN/Inf pixels, mismatched batches or mask
            sizes, a mask that leaves fewer than 64 pixels, an image constant over its
            mask, or a bad option.

    Example:
        >>> from rotstn.data import rotated_pairs
        >>> pairs = rotated_pairs(2, (64, 96), seed=0)
        >>> shifted = torch.roll(pairs.moving, shifts=(3, -5), dims=(-2, -1))
        >>> result = register(pairs.fixed, shifted)
        >>> bool((result.angle - pairs.angle).abs().max() < math.radians(0.1))
        True
        >>> result.aligned.shape, result.matrix.shape
        (torch.Size([2, 1, 64, 96]), torch.Size([2, 2, 3]))
        >>> negative = register(pairs.fixed, 1 - shifted, metric="mi")  # NCC has no peak here
        >>> bool((negative.angle - pairs.angle).abs().max() < math.radians(0.1))
        True
    """
    f = _check_image(fixed, "fixed")
    m = _check_image(moving, "moving")
    if f.device != m.device:
        raise ValueError(f"fixed is on {f.device} but moving is on {m.device}; put both on one device")
    model = _validate.choice(model, MODELS, "model")
    metric = _validate.choice(metric, METRICS, "metric")
    b = _validate.batch_size({"fixed": f.shape[0], "moving": m.shape[0]})
    size, moving_size = tuple(f.shape[-2:]), tuple(m.shape[-2:])
    init_window = _check_number(init_window, "init_window")
    smooth = _check_number(smooth, "smooth")
    min_overlap = _check_number(min_overlap, "min_overlap")
    if not 0 < min_overlap < 1:
        raise ValueError(f"min_overlap must be between 0 and 1 (exclusive), got {min_overlap!r}")
    iterations = _check_int(iterations, "iterations", 0)
    search_size = _check_int(search_size, "search_size", 16)
    max_points = _check_int(max_points, "max_points", 256)
    dtype = torch.promote_types(torch.promote_types(f.dtype, m.dtype), torch.float32)
    with torch.no_grad():
        fg, mg = _grey(f, channel, dtype, b, "fixed"), _grey(m, channel, dtype, b, "moving")
        fmask = _check_mask(fixed_mask, "fixed_mask", f, b, dtype)
        mmask = _check_mask(moving_mask, "moving_mask", m, b, dtype)
        guess = None if init is None else _run_init(init, f, m, b, dtype)
        if model == "rotation":
            if metric != "ncc":
                raise ValueError(
                    f"model='rotation' compares by NCC only, got metric={metric!r}; use model='rigid'"
                )
            if size != moving_size or fmask is not None or mmask is not None:
                raise ValueError(
                    "model='rotation' needs fixed and moving of one size and no masks, got fixed "
                    f"{_validate.shape_str(f)}, moving {_validate.shape_str(m)}; use model='rigid'"
                )
            angle, ncc = _rotation.estimate(fg, mg, guess, init_window, smooth, iterations)
            t = torch.zeros(b, 2, dtype=dtype, device=f.device)
            score, overlap = ncc.clamp_min(0), torch.ones_like(ncc)
            # The rotation model's score is the NCC alone: no spread is measured, so no error is predicted.
            nan = torch.full_like(score, math.nan)
            fit = _Fit(angle, t, score, overlap, nan, score, score < 0, nan, t, torch.zeros_like(score))
        else:
            for gray, mask, name in ((fg, fmask, "fixed"), (mg, mmask, "moving")):
                keep = None if mask is None else mask.flatten(1) > 0
                check_not_flat(gray.flatten(1), keep, name, "" if mask is None else "over its mask")
            # The smaller image is the one whose pixels are compared (its points all lie in the overlap
            # when it is inside the other): register the other way round and invert. The result does
            # not depend on which of two images of different sizes is called fixed.
            swap = moving_size[0] * moving_size[1] < size[0] * size[1]
            sides = ((mg, mmask), (fg, fmask)) if swap else ((fg, fmask), (mg, mmask))
            start = None if guess is None or not swap else -guess
            options = (init_window, smooth, iterations, min_overlap, search_size, max_points)
            rigid = _rigid if metric == "ncc" else _rigid_mi
            fit = rigid(*sides[0], *sides[1], guess if not swap else start, *options)
            if swap:
                fit = _inverted(fit, moving_size, size)
        angle = wrap_angle(fit.angle)
        matrix = rigid_matrix(angle, fit.translation, size, moving_size)
        aligned = warp(m.expand(b, *m.shape[1:]), matrix=matrix, size=size)
    return Registration(
        angle,
        fit.translation,
        matrix,
        fit.score,
        fit.overlap,
        aligned,
        fit.error,
        fit.ambiguous,
        torch.where(fit.ambiguous, wrap_angle(fit.runner_angle), torch.full_like(angle, math.nan)),
    )


def _inverted(fit: _Fit, size: tuple[int, int], moving_size: tuple[int, int]) -> _Fit:
    """``fit`` of (fixed = an image of ``size``, moving = one of ``moving_size``) with the roles swapped.

    The inverse rigid map turns by -θ; its translation is read off the inverted matrix.
    Score, overlap, predicted error (a distance) and ambiguity are the same for both directions.
    """

    from ._stack import _homogeneous, matrix_parameters

    def turned(angle: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        inverse = torch.linalg.inv(_homogeneous(rigid_matrix(angle, t, size, moving_size)))[:, :2]
        return -angle, matrix_parameters(inverse, moving_size, size)[1]

    angle, t = turned(fit.angle, fit.translation)
    runner_angle, runner_t = turned(fit.runner_angle.nan_to_num(0.0), fit.runner_translation)
    runner_angle = torch.where(torch.isnan(fit.runner_angle), fit.runner_angle, runner_angle)
    return _Fit(
        angle, t, fit.score, fit.overlap, fit.error, fit.agreement, fit.ambiguous, runner_angle, runner_t,
        fit.runner_ratio,
    )  # fmt: skip


@dataclass
class _Fit:
    """A batch of results on their way out: the fields of :class:`Registration` that estimation fills.

    ``agreement`` is the score before the predicted error and ambiguity lower it (what decides a
    second search); ``z`` the search-level significance the result was picked with.
    """

    angle: Tensor
    translation: Tensor
    score: Tensor
    overlap: Tensor
    error: Tensor
    agreement: Tensor
    ambiguous: Tensor
    runner_angle: Tensor  # the search's best distinct runner-up, NaN where none
    runner_translation: Tensor
    runner_ratio: Tensor  # its significance over the pick's, 0 where none

    FIELDS = (
        "angle", "translation", "score", "overlap", "error", "agreement",
        "ambiguous", "runner_angle", "runner_translation", "runner_ratio",
    )  # fmt: skip

    def update(self, rows: Tensor, take: Tensor, other: _Fit) -> None:
        """Where ``take`` (over ``rows``) is set, this batch's rows ``rows`` become ``other``'s."""
        for name in self.FIELDS:
            current, new = getattr(self, name), getattr(other, name)
            current[rows] = torch.where(_rows(take, new), new, current[rows])


@dataclass(frozen=True)
class _Prepared:
    """One side of a rigid registration, ready to compare: its pyramid and noise (``_prepare``)."""

    levels: list[Level]  # finest first, down to the search level
    noise: Tensor  # (B,) variance of its noise after the blur
    size: tuple[int, int]
    smooth: float = 1.0  # the blur (pixels) the levels were made with

    def expand(self, b: int) -> _Prepared:
        """The same image for a batch of ``b`` (views, no copies)."""
        if self.levels[0].image.shape[0] == b:
            return self
        levels = [
            Level(
                lv.image.expand(b, *lv.image.shape[1:]),
                None if lv.mask is None else lv.mask.expand(b, *lv.mask.shape[1:]),
                lv.scale,
                lv.margin,
            )
            for lv in self.levels
        ]
        return _Prepared(levels, self.noise.expand(b), self.size, self.smooth)

    def select(self, rows: Tensor, levels: slice = slice(None)) -> _Prepared:
        """A subset of the batch (an index tensor) on some of the levels (all by default)."""
        n = self.levels[0].image.shape[0]
        if rows.numel() == n and bool((rows == torch.arange(n, device=rows.device)).all()):
            return _Prepared(self.levels[levels], self.noise, self.size, self.smooth)  # all of it: no copies
        return _Prepared(
            [lv.select(rows) for lv in self.levels[levels]], self.noise[rows], self.size, self.smooth
        )

    def cat(self, other: _Prepared) -> _Prepared:
        """This batch followed by ``other``'s (same size and levels)."""
        levels = [
            Level(
                torch.cat((a.image, b.image)),
                None if a.mask is None else torch.cat((a.mask, b.mask)),
                a.scale,
                a.margin,
            )
            for a, b in zip(self.levels, other.levels, strict=True)
        ]
        return _Prepared(levels, torch.cat((self.noise, other.noise)), self.size, self.smooth)


def _n_levels(size: tuple[int, int], moving_size: tuple[int, int], search_size: int) -> int:
    """Halvings from full resolution to the search level.

    Both pyramids go down to one scale, the search level: the larger image's geometric-mean side about
    ``search_size`` (a long thin image keeps enough rows), never a side under 40 (fewer pixels leave the
    spectrum and the correlations too little).
    """
    side = math.sqrt(max(size[0] * size[1], moving_size[0] * moving_size[1]))
    smallest = min(*size, *moving_size)
    n_levels = 0
    while side / 2**n_levels > search_size * 1.5 and smallest >> (n_levels + 1) >= 40:
        n_levels += 1
    return n_levels


def _prepare(image: Tensor, mask: Tensor | None, smooth: float, n_levels: int) -> _Prepared:
    """Noise estimate, masked blur and pyramid of a (B, 1, H, W) grey image."""
    noise = noise_variance(image, mask, smooth)
    blurred, mask, margin = masked_blur(image, mask, smooth)
    return _Prepared(pyramid(blurred, mask, n_levels, margin), noise, tuple(image.shape[-2:]), smooth)


def _rigid(
    fixed: Tensor,
    fixed_mask: Tensor | None,
    moving: Tensor,
    moving_mask: Tensor | None,
    guess: Tensor | None,
    window: float,
    smooth: float,
    iterations: int,
    min_overlap: float,
    search_size: int,
    max_points: int,
) -> _Fit:
    n_levels = _n_levels(tuple(fixed.shape[-2:]), tuple(moving.shape[-2:]), search_size)
    pf = _prepare(fixed, fixed_mask, smooth, n_levels)
    pm = _prepare(moving, moving_mask, smooth, n_levels)
    fit = _register_prepared(pf, pm, guess, window, iterations, min_overlap, max_points)
    _without_unmatched(fixed, fixed_mask, pf, pm, fit, smooth, n_levels, iterations, min_overlap, max_points)
    _smoother(
        fixed, fixed_mask, moving, moving_mask, pf, pm, fit, smooth, iterations, min_overlap, max_points
    )
    _repeats(pf, pm, fit, iterations, min_overlap, max_points)
    return fit


def _self_lag(level: Level, least: float) -> tuple[Tensor, Tensor]:
    """(B, 2) the shift (x, y, level-0 pixels) at which an image best matches itself, and (B,) that NCC.

    The normalised autocorrelation over the image's content (by FFT, on overlaps of at least ``least``
    of it), at its highest local maximum (5×5) two or more level pixels from zero: 1 for a picture that
    repeats exactly (a checkerboard a period away), well under ``PERIODIC`` for one that does not (a
    smooth picture falls off from zero without a second peak).
    """
    wgt = level.content().expand_as(level.image)
    f = level.image
    n = wgt.sum((2, 3), keepdim=True).clamp_min(1)
    g = (f - (f * wgt).sum((2, 3), keepdim=True) / n) * wgt
    h, w = f.shape[-2:]
    size = (2 * h, 2 * w)

    def corr(a: Tensor, b: Tensor) -> Tensor:
        return torch.fft.irfft2(torch.fft.rfft2(a, s=size).conj() * torch.fft.rfft2(b, s=size), s=size)

    num, e1, e2, count = corr(g, g), corr(g * g, wgt), corr(wgt, g * g), corr(wgt, wgt)
    ncc = num / (e1 * e2).clamp_min(1e-30).sqrt()
    ncc = torch.where(count >= least * n, ncc, torch.full_like(ncc, -1.0))
    ncc = torch.fft.fftshift(ncc, dim=(-2, -1))  # lag 0 at (h, w)
    ly = torch.arange(2 * h, device=f.device).view(-1, 1) - h
    lx = torch.arange(2 * w, device=f.device).view(1, -1) - w
    far = (lx.square() + ly.square()) >= 4
    peak = (ncc == F.max_pool2d(ncc, 5, stride=1, padding=2)) & far
    ncc = torch.where(peak, ncc, torch.full_like(ncc, -1.0)).flatten(1)
    best, at = ncc.max(1)
    lag = torch.stack((at % (2 * w) - w, at // (2 * w) - h), 1).to(f.dtype) * level.scale
    return lag, best


def _repeats(
    pf: _Prepared, pm: _Prepared, fit: _Fit, iterations: int, min_overlap: float, max_points: int
) -> None:
    """Name a trusted result ambiguous where fixed repeats itself and the repeat aligns as well.

    Where fixed matches itself ``PERIODIC`` or better a shift ``s`` away (:func:`_self_lag`), the map
    taken from fixed pixel ``x + s`` instead of ``x`` (translation ``t - s``) is a second alignment
    of a periodic picture that the search's few hypotheses can miss: a 512×64 strip of the
    checkerboard lined up 330 px off (several periods) scored 0.999 with no runner-up. That map is
    refined and compared as the search's runner-up is (:func:`_settled`): where the images agree with
    it as well as with the pick, the result is ambiguous (its estimate is left as it was).
    """
    rows = ((fit.score >= TRUST) & ~fit.ambiguous).nonzero()[:, 0]
    if rows.numel() == 0:
        return
    k = next((i for i, lv in enumerate(pf.levels) if lv.image[0, 0].numel() <= UNMATCHED_PIXELS), -1)
    sf = pf.expand(fit.angle.shape[0]).select(rows)
    lag, best = _self_lag(sf.levels[k], 2 * min_overlap)
    periodic = best >= PERIODIC
    rows, lag = rows[periodic], lag[periodic]
    if rows.numel() == 0:
        return
    sf, sm = pf.expand(fit.angle.shape[0]).select(rows), pm.expand(fit.angle.shape[0]).select(rows)
    angle, t = fit.angle[rows], fit.translation[rows]
    runner = (angle.clone(), t - lag, torch.ones_like(angle))
    pick_a, pick_t, runner, _, tried = _settled(sf, sm, angle, t, runner, iterations, min_overlap, max_points)
    # Only the ambiguity is taken: where the repeat became the pick, the result stays and the repeat is
    # its runner-up (a 64-px strip of the colour wheel was swapped for an alignment 6.9 px off).
    swapped = (pick_a != angle) | (pick_t != t).any(1)
    runner = (
        torch.where(swapped, pick_a, runner[0]),
        torch.where(swapped.unsqueeze(1), pick_t, runner[1]),
        runner[2],
    )
    new, _ = _scored(sf, sm, angle, t, max_points, min_overlap, runner)
    fit.update(rows, new.ambiguous & tried, new)


def _smoother(
    fixed: Tensor,
    fixed_mask: Tensor | None,
    moving: Tensor,
    moving_mask: Tensor | None,
    pf: _Prepared,
    pm: _Prepared,
    fit: _Fit,
    smooth: float,
    iterations: int,
    min_overlap: float,
    max_points: int,
) -> None:
    """Refine again at full resolution on both images blurred ``SMOOTHER`` times more, where not yet precise.

    Where the predicted error is over half ``ERROR_TRUST`` (noise, little texture), a stronger blur
    averages each compared point with its neighbours, as if many more pixels were compared (a Gaussian
    blur commutes with a rotation: it moves no optimum of the rigid map). The result is refined on
    ``POLISH`` times the points of the blurred level, its agreement measured on the images as they were
    (the stronger blur would flatter a wrong result's blocks) and its spread on the blurred ones (whose
    noise is what the new estimate saw), and it is kept where its predicted error is smaller. On
    benchmarks/trust.py's development seeds (50, 57) at σ 0.05-0.1 this trusted 5-10 % more of the
    right results; all of it is chosen by the predicted error, nothing by the truth.
    """
    if smooth <= 0:
        return
    rows = ((fit.error > ERROR_TRUST / 2) & ~fit.ambiguous).nonzero()[:, 0]
    if rows.numel() == 0:
        return
    blur = smooth * SMOOTHER

    # The images (and masks) come expanded to the batch.
    qf = _prepare(fixed[rows], None if fixed_mask is None else fixed_mask[rows], blur, 0)
    qm = _prepare(moving[rows], None if moving_mask is None else moving_mask[rows], blur, 0)
    points = max_points * POLISH
    angle, t = _refine.refine(
        qf.levels, qm.levels, pf.size, pm.size, fit.angle[rows], fit.translation[rows], iterations, points
    )
    sf, sm = pf.select(rows, slice(0, 1)).expand(rows.numel()), pm.select(rows, slice(0, 1))
    noise = (sf.noise, sm.noise)
    agreement, overlap, _, _ = _refine.score(
        sf.levels[0], sm.levels[0], pf.size, pm.size, angle, t, max_points, min_overlap, noise, blur=smooth
    )
    noise = (qf.noise, qm.noise)
    *_, spread = _refine.score(
        qf.levels[0], qm.levels[0], pf.size, pm.size, angle, t, points, min_overlap, noise, blur=blur
    )
    runner = (fit.runner_angle[rows], fit.runner_translation[rows], fit.runner_ratio[rows])
    new = _judge(pf.size, pm.size, angle, t, agreement, overlap, spread, runner)
    fit.update(rows, new.error < fit.error[rows], new)


def _rigid_mi(
    fixed: Tensor,
    fixed_mask: Tensor | None,
    moving: Tensor,
    moving_mask: Tensor | None,
    guess: Tensor | None,
    window: float,
    smooth: float,
    iterations: int,
    min_overlap: float,
    search_size: int,
    max_points: int,
) -> _Fit:
    """``metric="mi"``: the search by mutual information, then the NCC path on intensity-mapped images.

    The ``MI_KEEP`` best hypotheses of the search (:func:`_mutual.search`) each get their own intensity
    map (:func:`_mutual.intensity_map`) and a few Gauss–Newton steps on the search level; the most
    significant wins, and the most significant distinct other is its runner-up (ambiguity, as in
    :func:`_hypotheses`). The winner's map is applied to the full-resolution image it maps, and the
    pair refined coarse to fine and scored (:func:`_finish`); then the map is estimated again at full
    resolution from that result, and the pair refined and scored once more.
    """
    size, moving_size = tuple(fixed.shape[-2:]), tuple(moving.shape[-2:])
    n_levels = _n_levels(size, moving_size, search_size)
    pf = _prepare(fixed, fixed_mask, smooth, n_levels)
    pm = _prepare(moving, moving_mask, smooth, n_levels)
    b = fixed.shape[0]
    dtype, device = fixed.dtype, fixed.device
    if guess is None:
        angles = _mutual.sweep_angles(b, dtype, device)
    else:
        steps = max(2 * math.ceil(window / _mutual.ANGLE_STEP), 1)
        angles = guess.view(-1, 1) + torch.linspace(-window, window, steps + 1, dtype=dtype, device=device)
    angle, t, _ = _mutual.search(
        *_mutual.search_level(pf.levels[-1], pm.levels[-1]), size, moving_size, angles, min_overlap, MI_KEEP
    )
    k = angle.shape[1]
    rows = torch.arange(b, device=device).repeat_interleave(k)
    lf, lm = pf.levels[-1].select(rows), pm.levels[-1].select(rows)
    a, tt = angle.reshape(-1), t.reshape(-1, 2)
    mf, mm = _mapped_levels(lf, lm, size, moving_size, a, tt)
    a, tt = _refine.refine([mf], [mm], size, moving_size, a, tt, min(iterations, 6), max_points // 2)
    mf, mm = _mapped_levels(lf, lm, size, moving_size, a, tt)
    z = _refine.significance(mf, mm, size, moving_size, a[:, None], tt[:, None], max_points, min_overlap)
    found = _best_and_runner(size, moving_size, a.view(b, k), tt.view(b, k, 2), z.view(b, k))
    angle, t, runner = found.angle, found.translation, found.runner()
    options = (iterations, min_overlap, max_points)
    # Map the full-resolution image with the search level's map and refine coarse to fine; then map
    # again from the result and refine at full resolution, until the map stops moving the result
    # (each round about halves what is left: a map estimated a little off the truth pulls towards it).
    # At full resolution the map is estimated from the images before the blur: a blur does not commute
    # with a non-monotonic map (blurred, a three-level lookup of fine texture is no function of the
    # blurred picture any more).
    raw = (
        Level(fixed, pf.levels[0].mask, 1, pf.levels[0].margin),
        Level(moving, pm.levels[0].mask, 1, pm.levels[0].margin),
    )
    # The map goes either way: fixed's intensities onto moving's, or back. Which one a refinement
    # follows best depends on the pair (a three-level lookup of a picture: mapping the picture onto
    # the three levels; the picture's negative: either), so both are refined and the one whose
    # images agree better is kept.
    args = (
        fixed,
        fixed_mask,
        moving,
        moving_mask,
        pf,
        pm,
        (pf.levels[-1], pm.levels[-1]),
        raw,
        angle,
        t,
        runner,
    )
    fit, qf, qm = _mi_rounds(*args, True, smooth, n_levels, options)
    back, bf, bm = _mi_rounds(*args, False, smooth, n_levels, options)
    take = back.agreement > fit.agreement
    # The two directions are two estimates under two intensity models: how far apart they end is an
    # error the noise does not show (a map that fits a slightly wrong alignment as well as the right
    # one: the rim of the retina's field of view under 1 - 4(x - 0.5)², 1.3-1.7 px off, both ways
    # within 0.5 px of each other, predicted 0.45 px and trusted before this).
    # Only where both directions make the images agree: a map that cannot hold (a non-monotonic map
    # inverted) ends anywhere and says nothing about the other.
    apart = _displacement(size, moving_size, fit.angle, fit.translation, back.angle, back.translation)
    apart = torch.where(torch.minimum(fit.agreement, back.agreement) >= TRUST, apart, torch.zeros_like(apart))
    fit.update(torch.arange(b, device=device), take, back)
    # The polish refines each pair on the mapped images of the direction it kept.
    qf, qm = _where_prepared(take, bf, qf), _where_prepared(take, bm, qm)
    _polish(qf, qm, fit, *options)
    _widened(fit, MI_APART * apart)
    return fit


def _widened(fit: _Fit, error: Tensor) -> None:
    """The predicted error at least ``error`` and ``MI_ERROR_FLOOR``, the score lowered to match."""
    wider = torch.maximum(fit.error, error).clamp_min(MI_ERROR_FLOOR)
    fit.score = _trust(fit.agreement, wider, fit.ambiguous)
    fit.error = wider


def _mi_rounds(
    fixed: Tensor,
    fixed_mask: Tensor | None,
    moving: Tensor,
    moving_mask: Tensor | None,
    pf: _Prepared,
    pm: _Prepared,
    coarse: tuple[Level, Level],
    raw: tuple[Level, Level],
    angle: Tensor,
    t: Tensor,
    runner: tuple[Tensor, Tensor, Tensor],
    on: bool,
    smooth: float,
    n_levels: int,
    options: tuple[int, float, int],
) -> tuple[_Fit, _Prepared, _Prepared]:
    """Map one way (``on``: fixed onto moving) with the coarse levels' map, refine coarse to fine; then
    map again from the result (estimated on ``raw``) and refine at full resolution, until the map stops
    moving the result (each round about halves what is left: a map estimated a little off the truth
    pulls towards it). Returns the result and the mapped pyramids it was scored on."""
    size, moving_size = pf.size, pm.size
    iterations, min_overlap, max_points = options
    fit = None
    for sides in (coarse, *[raw] * MI_ROUNDS):
        grid, means, on_fixed = _mutual.intensity_map(*sides, size, moving_size, angle, t, on)
        qf = _prepare(_mapped(fixed, grid, means, on_fixed), fixed_mask, smooth, n_levels)
        qm = _prepare(_mapped(moving, grid, means, ~on_fixed), moving_mask, smooth, n_levels)
        if fit is None:
            # The runner-up is not refined again here (_settled): it was verified with its own map,
            # which this pair, mapped for the pick, does not carry.
            fit, _ = _finish(qf, qm, angle, t, runner, *options, settle=False)
        else:
            a2, t2 = _refine.refine(
                qf.levels[:1], qm.levels[:1], size, moving_size, angle, t, iterations, max_points
            )
            moved = _displacement(size, moving_size, angle, t, a2, t2)
            fit, _ = _scored(qf, qm, a2, t2, max_points, min_overlap, runner)
            if bool((moved < MI_SETTLED).all()):
                break
        angle, t = fit.angle, fit.translation
    return fit, qf, qm


def _where_prepared(take: Tensor, a: _Prepared, b: _Prepared) -> _Prepared:
    """``a`` in the rows ``take``, ``b`` elsewhere (the same images mapped two ways: same masks)."""
    rows = take.view(-1, 1, 1, 1)
    levels = [
        Level(torch.where(rows, x.image, y.image), x.mask, x.scale, x.margin)
        for x, y in zip(a.levels, b.levels, strict=True)
    ]
    return _Prepared(levels, torch.where(take, a.noise, b.noise), a.size, a.smooth)


def _mapped(image: Tensor, grid: Tensor, means: Tensor, where: Tensor) -> Tensor:
    """``image`` (B, 1, H, W) through the tabulated map in the rows ``where``, unchanged elsewhere."""
    image = image.expand(grid.shape[0], *image.shape[1:])
    return torch.where(where.view(-1, 1, 1, 1), _mutual.apply(image, grid, means), image)


def _mapped_levels(
    fixed: Level, moving: Level, size: tuple[int, int], moving_size: tuple[int, int], angle: Tensor, t: Tensor
) -> tuple[Level, Level]:
    """A pair of levels with the intensity map of (angle, t) applied to the side it maps."""
    grid, means, on_fixed = _mutual.intensity_map(fixed, moving, size, moving_size, angle, t)
    f = Level(_mapped(fixed.image, grid, means, on_fixed), fixed.mask, fixed.scale, fixed.margin)
    m = Level(_mapped(moving.image, grid, means, ~on_fixed), moving.mask, moving.scale, moving.margin)
    return f, m


def _without_unmatched(
    fixed: Tensor,
    fixed_mask: Tensor | None,
    pf: _Prepared,
    pm: _Prepared,
    fit: _Fit,
    smooth: float,
    n_levels: int,
    iterations: int,
    min_overlap: float,
    max_points: int,
) -> None:
    """Refine again without what only one image shows, where that is a small part of the overlap.

    Content one image has and the other lacks (an object that moved, debris, a label, a disk with no
    counterpart) pulls a least-squares fit towards lining it up with something, and lowers the
    agreement of a right result. Where such a region (:func:`_refine.unmatched`) covers between
    ``UNMATCHED`` of the overlap, it is masked out of fixed and the result refined again from where it
    is; the new result is kept where its images agree better. More than the upper bound is no partial
    mismatch: the result stays as it is. Less than the lower bound (2 %) pushes an estimate little, and
    masking it can hide the one place where a wrong alignment shows: a strip of a lattice tower lined
    up one repeat off (92 px) disagreed in 1.4 % of its overlap, and without it scored 0.967.
    """
    # The region is found on the finest level of at most UNMATCHED_PIXELS pixels (a coarser one where
    # the images are large).
    # A result already trusted well within ERROR_TRUST has nothing to gain.
    settled = (fit.score >= TRUST) & (fit.error <= ERROR_TRUST / 2)
    rows = (~settled).nonzero()[:, 0]
    if rows.numel() == 0:
        return
    k = next((i for i, lv in enumerate(pf.levels) if lv.image[0, 0].numel() <= UNMATCHED_PIXELS), -1)
    matrix = rigid_matrix(fit.angle[rows], fit.translation[rows], pf.size, pm.size)
    region, fraction = _refine.unmatched(pf.levels[k].select(rows), pm.levels[k].select(rows), matrix)
    low, high = UNMATCHED
    inside = (fraction >= low) & (fraction <= high)
    rows, region = rows[inside], region[inside]
    if rows.numel() == 0:
        return
    if region.shape[-2:] != fixed.shape[-2:]:
        region = (F.interpolate(region, size=fixed.shape[-2:], mode="bilinear") > 0).to(fixed.dtype)
    keep = 1 - region
    mask = keep if fixed_mask is None else fixed_mask[rows] * keep
    sf = _prepare(fixed[rows], mask, smooth, n_levels)
    sm = pm.select(rows)
    runner = (fit.runner_angle[rows], fit.runner_translation[rows], fit.runner_ratio[rows])
    # The runner-up stays as the first pass left it: masking may lift the agreement of a wrong result
    # (the part that shows it is wrong is what gets masked), which must not drop a runner-up.
    new, _ = _finish(
        sf,
        sm,
        fit.angle[rows],
        fit.translation[rows],
        runner,
        iterations,
        min_overlap,
        max_points,
        settle=False,
    )
    fit.update(rows, new.agreement > fit.agreement[rows], new)


def _register_prepared(
    pf: _Prepared,
    pm: _Prepared,
    guess: Tensor | None,
    window: float,
    iterations: int,
    min_overlap: float,
    max_points: int,
    fine_points: int | None = None,
    fine_iterations: int | None = None,
) -> _Fit:
    """Search, refine from the search level down (hypotheses take only a few steps there), score.

    A result the score does not trust is searched again: one level finer, where fine structure
    (thin vessels, text) that vanished on the search level and left one dominant edge to match is
    still there; where the search level is full resolution (small images), over the whole circle
    every ``_search.SWEEP_STEP`` (without a guess): the magnitude spectrum's few angle candidates can
    all miss on a small smooth picture (64² crops of cells and coins, turned about a random point),
    and such a sweep costs little there. The more
    significant agreement over the whole overlap wins (as between hypotheses: the trust score of a
    wrong result that lines up one edge in many blocks can exceed that of a right result on a faint
    texture).
    """
    options = (iterations, min_overlap, max_points)
    fine = {"fine_points": fine_points, "fine_iterations": fine_iterations}
    found = _search_rigid(pf, pm, guess, window, *options)
    fit, textured = _finish(
        pf, pm, found.angle, found.translation, found.runner(), *options, **fine, spare=found.spare()
    )
    # A result held under TRUST only by the images' lack of texture (it agrees in every textured block,
    # and there are fewer than MIN_BLOCKS of them) is not searched again: the score is measured at full
    # resolution whatever level the search ran on, and a finer level has no more texture.
    agrees = fit.agreement * _refine.MIN_BLOCKS / textured.clamp(1, _refine.MIN_BLOCKS) >= TRUST
    retry = ((fit.agreement < TRUST) & ~agrees).nonzero()[:, 0]
    finer = len(pf.levels) > 1
    if retry.numel() > 0 and (finer or guess is None):
        # One level finer, or the whole circle where the search level is full resolution.
        levels, sweep = (slice(0, -1), False) if finer else (slice(None), True)
        sf, sm = pf.select(retry, levels), pm.select(retry, levels)
        found2 = _search_rigid(sf, sm, None if guess is None else guess[retry], window, *options, sweep=sweep)
        fit2, _ = _finish(
            sf, sm, found2.angle, found2.translation, found2.runner(), *options, **fine, spare=found2.spare()
        )
        z = _refine.significance(
            sf.levels[0],
            sm.levels[0],
            pf.size,
            pm.size,
            torch.stack((fit.angle[retry], fit2.angle), 1),
            torch.stack((fit.translation[retry], fit2.translation), 1),
            max_points,
            min_overlap,
        )
        fit.update(retry, z[:, 1] > z[:, 0], fit2)
    _polish(pf, pm, fit, iterations, min_overlap, max_points)
    return fit


def _polish(
    pf: _Prepared, pm: _Prepared, fit: _Fit, iterations: int, min_overlap: float, max_points: int
) -> None:
    """Refine again at full resolution on ``POLISH`` times the points where the result is not yet precise.

    Where the images agree but the predicted error is over half ``ERROR_TRUST`` (noise, little texture)
    and the points were a subset of fixed's pixels, more of them pin the result down better: the error
    of a least-squares estimate falls as one over the square root of the points it uses. That makes some
    results trusted, and brings others under a pixel that stay untrusted (noisy pairs 1.1–2 px off on
    8192 points of a 384² picture were 0.1–0.9 px off on four times as many). Ambiguous results are left
    as they are (more points do not tell two alignments apart).
    """
    h, w = pf.levels[0].image.shape[-2:]
    if h * w <= max_points:
        return
    rows = ((fit.agreement >= TRUST) & (fit.error > ERROR_TRUST / 2) & ~fit.ambiguous).nonzero()[:, 0]
    if rows.numel() == 0:
        return
    points = max_points * POLISH
    sf, sm = pf.select(rows, slice(0, 1)).expand(rows.numel()), pm.select(rows, slice(0, 1))
    angle, t = _refine.refine(
        sf.levels, sm.levels, pf.size, pm.size, fit.angle[rows], fit.translation[rows], iterations, points
    )
    runner = (fit.runner_angle[rows], fit.runner_translation[rows], fit.runner_ratio[rows])
    new, _ = _scored(sf, sm, angle, t, points, min_overlap, runner)
    fit.update(rows, new.error < fit.error[rows], new)


@dataclass
class _Found:
    """The global search's pick per pair, its significance, and the best distinct runner-up."""

    angle: Tensor
    translation: Tensor
    z: Tensor
    runner_angle: Tensor
    runner_translation: Tensor
    runner_z: Tensor
    spare_angle: Tensor | None = None  # the next distinct hypothesis after the runner-up
    spare_translation: Tensor | None = None
    spare_z: Tensor | None = None

    def runner(self) -> tuple[Tensor, Tensor, Tensor]:
        """The runner-up's angle, translation and significance over the pick's (0 where none)."""
        return self.runner_angle, self.runner_translation, self._ratio(self.runner_z)

    def spare(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The same for the next most significant distinct hypothesis (None where the search kept none)."""
        if self.spare_z is None:
            return None
        return self.spare_angle, self.spare_translation, self._ratio(self.spare_z)

    def _ratio(self, z: Tensor) -> Tensor:
        return torch.where(torch.isfinite(z), z / self.z.clamp_min(1e-6), torch.zeros_like(self.z))


def _displacement(
    size: tuple[int, int], moving_size: tuple[int, int], a1: Tensor, t1: Tensor, a2: Tensor, t2: Tensor
) -> Tensor:
    """Largest distance (pixels) between where two rigid maps send fixed's frame: at one of its corners."""
    h, w = size
    d = rigid_matrix(a1, t1, size, moving_size) - rigid_matrix(a2, t2, size, moving_size)
    corners = a1.new_tensor([[0.0, 0.0, 1.0], [w - 1, 0.0, 1.0], [0.0, h - 1, 1.0], [w - 1, h - 1, 1.0]])
    return (d @ corners.T).norm(dim=-2).amax(-1)


def _search_rigid(
    pf: _Prepared,
    pm: _Prepared,
    guess: Tensor | None,
    window: float,
    iterations: int,
    min_overlap: float,
    max_points: int,
    sweep: bool = False,
) -> _Found:
    """The global search: the best (angle, translation) on the search level, over the circle or the window.

    Without a guess, pairs whose best candidate is not convincing (or all pairs, with ``sweep``) also
    try angles every ``_search.SWEEP_STEP`` over the circle.
    """
    size, moving_size = pf.size, pm.size
    coarse_f, coarse_m = pf.levels[-1], pm.levels[-1]
    dtype, device = coarse_f.image.dtype, coarse_f.image.device
    if guess is None:
        angles = _search.spectral_angles(coarse_f, coarse_m, peaks=2)
    else:
        steps = max(2 * math.ceil(window / _search.SWEEP_STEP), 1)
        offsets = torch.linspace(-window, window, steps + 1, dtype=dtype, device=device)
        angles = guess.view(-1, 1) + offsets
    found = _hypotheses(
        coarse_f, coarse_m, size, moving_size, angles, min_overlap, max_points, iterations, guess is None
    )
    weak = (found.z < _search.SWEEP_BELOW) | sweep
    if guess is None and bool(weak.any()):
        # No convincing candidate: try the whole circle on those pairs, one level coarser where the
        # images keep 24 pixels a side (a quarter of the work), then check on the search level.
        sub_f, sub_m = coarse_f.select(weak), coarse_m.select(weak)
        sweep = _search.sweep_angles(int(weak.sum()), dtype, device)
        coarser = min(*sub_f.image.shape[-2:], *sub_m.image.shape[-2:]) >= 48
        level_f, level_m = (sub_f.halve(), sub_m.halve()) if coarser else (sub_f, sub_m)
        swept = _hypotheses(
            level_f, level_m, size, moving_size, sweep, min_overlap, max_points, iterations, True
        )
        a2, t2, z2 = swept.angle, swept.translation, swept.z
        if coarser:
            a2, t2 = _refine.refine(
                [sub_f], [sub_m], size, moving_size, a2, t2, min(iterations, 6), max_points
            )
            z2 = _refine.significance(
                sub_f, sub_m, size, moving_size, a2[:, None], t2[:, None], max_points, min_overlap
            )[:, 0]
        better = z2 > found.z[weak]
        if found.spare_z is not None:
            # Where the sweep's pick wins, its runner-up is the spare (compared on the search level).
            ra2, rt2, rz2 = swept.runner_angle, swept.runner_translation, swept.runner_z
            if coarser:
                zr = _refine.significance(
                    sub_f, sub_m, size, moving_size, ra2[:, None], rt2[:, None], max_points, min_overlap
                )[:, 0]
                rz2 = torch.where(torch.isfinite(rz2), zr, rz2)
            for name, new in (("angle", ra2), ("translation", rt2), ("z", rz2)):
                old = getattr(found, "spare_" + name)[weak]
                getattr(found, "spare_" + name)[weak] = torch.where(_rows(better, new), new, old)
        # The one that loses becomes the runner-up where it beats the winner's own runner-up.
        for name, new in (("angle", a2), ("translation", t2), ("z", z2)):
            old, runner = getattr(found, name)[weak], getattr(found, "runner_" + name)[weak]
            keep = _rows(better, new)
            swap = keep & (found.z[weak] > found.runner_z[weak]).view_as(keep)
            getattr(found, "runner_" + name)[weak] = torch.where(swap, old, runner)
            getattr(found, name)[weak] = torch.where(keep, new, old)
    return found


def _finish(
    pf: _Prepared,
    pm: _Prepared,
    angle: Tensor,
    t: Tensor,
    runner: tuple[Tensor, Tensor, Tensor] | None,
    iterations: int,
    min_overlap: float,
    max_points: int,
    fine_points: int | None = None,
    fine_iterations: int | None = None,
    settle: bool = True,
    spare: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[_Fit, Tensor]:
    """Gauss–Newton coarse to fine from (angle, t), the search level included, then the score.

    Returns the result and its textured blocks (:func:`_refine.score`); ``runner`` (the search's
    runner-up, :meth:`_Found.runner`, if a search gave the start) says whether it is ambiguous,
    after :func:`_settled` has refined it as far as the pick (unless ``settle`` is False); where it
    lands on the pick or is too weak to try, the search's next distinct hypothesis (``spare``) is
    tried the same way.

    ``fine_points`` (default ``max_points``) is the number of fixed pixels compared at full
    resolution: more pins the answer down more precisely on large images. ``fine_iterations``
    (default ``iterations``) caps the steps at full resolution after the coarser levels.
    """
    size, moving_size = pf.size, pm.size
    # Levels are refined one after the other: the coarser ones, then full resolution with its own settings.
    coarser = len(pf.levels) > 1
    angle, t = _refine.refine(
        pf.levels[1:], pm.levels[1:], size, moving_size, angle, t, iterations, max_points
    )
    angle, t = _refine.refine(
        pf.levels[:1],
        pm.levels[:1],
        size,
        moving_size,
        angle,
        t,
        iterations if fine_iterations is None or not coarser else fine_iterations,
        max_points if fine_points is None else fine_points,
    )
    merged = None
    if runner is not None and settle:
        angle, t, runner, merged, tried = _settled(
            pf, pm, angle, t, runner, iterations, min_overlap, max_points
        )
        open_ = merged | ~tried
        if spare is not None and bool(open_.any()):
            # The runner-up was a near miss of the pick, or too weak to try: the next distinct
            # hypothesis may be a real second alignment.
            second = (spare[0], spare[1], torch.where(open_, spare[2], torch.zeros_like(spare[2])))
            a2, t2, r2, merged2, tried2 = _settled(
                pf, pm, angle, t, second, iterations, min_overlap, max_points
            )
            took = open_ & tried2 & ~merged2
            angle, t = torch.where(took, a2, angle), torch.where(_rows(took, t), t2, t)
            runner = tuple(torch.where(_rows(took, x), y, x) for x, y in zip(runner, r2, strict=True))
            merged = merged & ~took
    return _scored(pf, pm, angle, t, max_points, min_overlap, runner, merged)


def _settled(
    pf: _Prepared,
    pm: _Prepared,
    angle: Tensor,
    t: Tensor,
    runner: tuple[Tensor, Tensor, Tensor],
    iterations: int,
    min_overlap: float,
    max_points: int,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor], Tensor, Tensor]:
    """The refined pick and its runner-up, refined as far and compared again at full resolution.

    Returns the pick, the runner-up, and two (B,) masks: ``merged`` (the runner-up landed on the
    pick) and ``tried`` (the runner-up was refined: at ``SETTLE`` or more, ``DISTINCT`` or further).

    The search compares hypotheses on its coarse level after a few steps each. There a near miss of
    the right answer (1° and a few pixels off) is still "distinct" and nearly as significant; refined
    like the pick, it lands on the pick. Such a runner-up is kept as it was, and the (B,) ``merged``
    returned says where: :func:`_scored` drops it only where the images then agree with the pick (two
    hypotheses that land on an alignment the images do not support say nothing about each other).
    There, too, a second exact alignment of a periodic or symmetric picture (a checkerboard a half
    turn and a period away) can look less significant than it is: unrefined, or on a smaller overlap.
    A runner-up at ``SETTLE`` of the pick's significance or more that stays distinct is compared with
    the pick at full resolution: the better-correlated of the two becomes the pick (the one the
    images agree with, where only one of them does), and the ratio of their significances names an
    ambiguity, as does a runner-up that the images agree with as well as with the pick (within
    ``MATCHED``, and at ``TRUST`` or more) and that leaves at most twice its misfit (plus ``EXACT``).
    """
    r_angle, r_t, ratio = runner
    size, moving_size = pf.size, pm.size
    apart = _displacement(size, moving_size, angle, t, r_angle, r_t)
    tried = (ratio >= SETTLE) & (apart >= DISTINCT)
    rows = tried.nonzero()[:, 0]
    merged = torch.zeros_like(tried)
    if rows.numel() == 0:
        return angle, t, runner, merged, tried
    b = angle.shape[0]
    sf, sm = pf.expand(b).select(rows), pm.expand(b).select(rows)
    ra, rt = _refine.refine(
        sf.levels[1:],
        sm.levels[1:],
        size,
        moving_size,
        r_angle[rows],
        r_t[rows],
        min(iterations, 6),
        max_points,
    )
    ra, rt = _refine.refine(sf.levels[:1], sm.levels[:1], size, moving_size, ra, rt, iterations, max_points)
    distinct = _displacement(size, moving_size, angle[rows], t[rows], ra, rt) >= DISTINCT
    merged[rows] = ~distinct
    # Where they stayed apart, compare the pick and the runner-up.
    keep = distinct.nonzero()[:, 0]
    if keep.numel() == 0:
        return angle, t, runner, merged, tried
    rows, ra, rt, k = rows[keep], ra[keep], rt[keep], keep.numel()
    sf, sm = sf.select(keep), sm.select(keep)
    both_a, both_t = torch.stack((angle[rows], ra), 1), torch.stack((t[rows], rt), 1)  # (k, 2): pick, runner
    z, ncc = _refine.significance(
        sf.levels[0], sm.levels[0], size, moving_size, both_a, both_t, max_points, min_overlap, with_ncc=True
    )
    pair_f, pair_m = sf.cat(sf), sm.cat(sm)
    agreement = (
        _refine.score(
            pair_f.levels[0],
            pair_m.levels[0],
            size,
            moving_size,
            both_a.T.reshape(-1),
            both_t.transpose(0, 1).reshape(-1, 2),
            max_points,
            min_overlap,
            (pair_f.noise, pair_m.noise),
            blur=pf.smooth,
        )[0]
        .view(2, k)
        .T
    )
    agrees = agreement >= TRUST
    # Misfits (1 - NCC) within a factor two of each other, give or take TIED, are a tie, which the
    # significance breaks: a straight edge slid along itself on a flat background correlates as well as
    # the right alignment of a silhouette (1.0000 against 0.9999) on a smaller overlap.
    misfit = 1 - ncc.clamp(max=1.0)
    low, high = misfit.amin(1), misfit.amax(1)
    better = torch.where(high <= 2 * low + TIED, z[:, 1] > z[:, 0], ncc[:, 1] > ncc[:, 0])
    swap = torch.where(agrees[:, 0] ^ agrees[:, 1], agrees[:, 1], better)
    best, second = torch.where(swap, z[:, 1], z[:, 0]), torch.where(swap, z[:, 0], z[:, 1])
    new_ratio = torch.where(
        torch.isfinite(second), (second / best.clamp_min(1e-6)).clamp(max=1.0), torch.zeros_like(best)
    )
    # The images agree with both, the runner-up about as well as with the pick, and it leaves no more
    # than twice the pick's misfit (1 - NCC), give or take EXACT: two exact alignments. (The block
    # agreement alone cannot see one small feature that only one of them lines up.)
    twins = (
        agrees.all(1)
        & (agreement[:, 1] >= agreement[:, 0] - MATCHED)
        & (misfit[:, 1] <= 2 * misfit[:, 0] + EXACT)
    )
    new_ratio = torch.where(twins, torch.ones_like(new_ratio), new_ratio)
    # The pick and the runner-up in their new order.
    angle, t, r_angle, r_t, ratio = angle.clone(), t.clone(), r_angle.clone(), r_t.clone(), ratio.clone()
    pick_a, pick_t = torch.where(swap, ra, angle[rows]), torch.where(swap.unsqueeze(1), rt, t[rows])
    r_angle[rows] = torch.where(swap, angle[rows], ra)
    r_t[rows] = torch.where(swap.unsqueeze(1), t[rows], rt)
    angle[rows], t[rows] = pick_a, pick_t
    ratio[rows] = new_ratio
    return angle, t, (r_angle, r_t, ratio), merged, tried


def _scored(
    pf: _Prepared,
    pm: _Prepared,
    angle: Tensor,
    t: Tensor,
    points: int,
    min_overlap: float,
    runner: tuple[Tensor, Tensor, Tensor] | None,
    merged: Tensor | None = None,
) -> tuple[_Fit, Tensor]:
    """Refined results scored at full resolution on ``points`` fixed pixels and judged (:func:`_judge`).

    Returns the result and its textured blocks (:func:`_refine.score`). Where ``merged`` (B,) is set
    (:func:`_settled`) and the images agree with the result, the runner-up is dropped.
    """
    # The score compares block by block per pair: it needs the fixed side per pair.
    pf = pf.expand(angle.shape[0])
    agreement, overlap, textured, spread = _refine.score(
        pf.levels[0], pm.levels[0], pf.size, pm.size, angle, t, points, min_overlap, (pf.noise, pm.noise),
        blur=pf.smooth,
    )  # fmt: skip
    if runner is not None and merged is not None:
        drop = merged & (agreement >= TRUST)
        runner = (runner[0], runner[1], torch.where(drop, torch.zeros_like(runner[2]), runner[2]))
    return _judge(pf.size, pm.size, angle, t, agreement, overlap, spread, runner), textured


def _judge(
    size: tuple[int, int],
    moving_size: tuple[int, int],
    angle: Tensor,
    t: Tensor,
    agreement: Tensor,
    overlap: Tensor,
    spread: Tensor,
    runner: tuple[Tensor, Tensor, Tensor] | None,
) -> _Fit:
    """The predicted error, ambiguity and final score of refined results (see :func:`register`).

    ``runner`` is the search's runner-up: its angle, translation and significance over the pick's.
    """
    error = (ERROR_SCALE * spread[:, 0] + spread[:, 1]).clamp_min(ERROR_FLOOR)
    if runner is None:
        runner = (torch.full_like(angle, math.nan), torch.zeros_like(t), torch.zeros_like(angle))
    r_angle, r_t, ratio = runner
    apart = _displacement(size, moving_size, angle, t, r_angle, r_t)
    ambiguous = (ratio >= AMBIGUOUS) & (apart >= DISTINCT)
    # Either alignment may be the true one: the error is at least the distance between them.
    error = torch.where(ambiguous, torch.maximum(error, apart), error)
    diagonal = math.hypot(*max(size, moving_size, key=lambda s: s[0] * s[1]))
    error = torch.where(agreement >= TRUST, error, torch.full_like(error, diagonal))
    score = _trust(agreement, error, ambiguous)
    return _Fit(angle, t, score, overlap, error, agreement, ambiguous, r_angle, r_t, ratio)


def _trust(agreement: Tensor, error: Tensor, ambiguous: Tensor) -> Tensor:
    """The score: the agreement, times ``(ERROR_TRUST / error)²`` beyond ``ERROR_TRUST``; halved if ambiguous.

    Beyond ``ERROR_TRUST`` the agreement counts at most ``TRUST``, so that no result predicted further off
    is trusted (with the factor alone, one predicted 0.51 px off and 1.006 px off in truth scored 0.962).
    """
    factor = (ERROR_TRUST / error).square()
    score = torch.where(factor >= 1, agreement, agreement.clamp(max=TRUST) * factor)
    return torch.where(ambiguous, score / 2, score)


def _search_from(
    fixed: _Prepared,
    moving: _Prepared,
    *,
    iterations: int = 20,
    min_overlap: float = 0.1,
    max_points: int = 8192,
    fine_points: int | None = None,
    fine_iterations: int | None = None,
) -> _Fit:
    """:func:`register`'s rigid path on prepared images."""
    b = max(fixed.levels[0].image.shape[0], moving.levels[0].image.shape[0])
    pf, pm = fixed.expand(b), moving.expand(b)
    return _register_prepared(
        pf, pm, None, 0.0, iterations, min_overlap, max_points, fine_points, fine_iterations
    )


def _refine_from(
    fixed: _Prepared,
    moving: _Prepared,
    angle: Tensor,
    translation: Tensor,
    *,
    iterations: int = 20,
    min_overlap: float = 0.1,
    max_points: int = 8192,
    fine_points: int | None = None,
    fine_iterations: int | None = None,
) -> _Fit:
    """A result refined from a start, without the global search (so never called ambiguous).

    ``fixed`` and ``moving`` come from ``_prepare`` (batch 1 or B each). The start goes through
    every pyramid level, the search level included, then the same full-resolution refinement
    and score as :func:`register`: a start near the answer ends where :func:`register` ends, a
    start too far from it ends with a low score.
    """
    b = max(fixed.levels[0].image.shape[0], moving.levels[0].image.shape[0], angle.shape[0])
    angle = angle.to(fixed.levels[0].image).expand(b).clone()
    translation = translation.to(fixed.levels[0].image).expand(b, 2).clone()
    # A fixed side of batch 1 (a stack's reference) is refined once for all: its points and gradients
    # are taken once, not once per pair.
    return _finish(
        fixed,
        moving.expand(b),
        angle,
        translation,
        None,
        iterations,
        min_overlap,
        max_points,
        fine_points=fine_points,
        fine_iterations=fine_iterations,
    )[0]


def _hypotheses(
    fixed: Level,
    moving: Level,
    size: tuple[int, int],
    moving_size: tuple[int, int],
    angles: Tensor,
    min_overlap: float,
    max_points: int,
    iterations: int,
    twins: bool,
    keep: int = 3,
) -> _Found:
    """The best (angle, translation) on the search level for candidate angles (B, K), and its runner-up.

    Every angle gets its phase correlation's best shifts; the ``keep`` most
    significant hypotheses of each pair are refined on this level and the
    most significant after refinement wins (a near miss of the right angle
    refines to a clear winner; a chance match does not). The runner-up is the
    most significant of the others that lies ``DISTINCT`` pixels or more from
    the winner somewhere in fixed's frame (significance -inf where none does).
    """
    angle, shifts = _search.phase_correlation(fixed, moving, size, moving_size, angles, peaks=2, twins=twins)
    # A first ranking on a quarter of the points is enough to pick which hypotheses to refine.
    z = _refine.significance(fixed, moving, size, moving_size, angle, shifts, max_points // 4, min_overlap)
    b = angle.shape[0]
    top = _diverse(angle, shifts, z, min(keep, z.shape[1]), fixed.scale)
    k = top.shape[1]
    angle = angle.gather(1, top).reshape(-1)
    shifts = shifts.gather(1, top.unsqueeze(-1).expand(-1, -1, 2)).reshape(-1, 2)
    rows = torch.arange(b, device=angle.device).repeat_interleave(k)
    # A few steps separate a near miss of the right answer (its NCC climbs) from a chance match (it does
    # not); wrong hypotheses need not converge.
    angle, shifts = _refine.refine(
        [fixed.select(rows)],
        [moving.select(rows)],
        size,
        moving_size,
        angle,
        shifts,
        min(iterations, 6),
        max_points // 2,
    )
    angle, shifts = angle.view(b, k), shifts.view(b, k, 2)
    z = _refine.significance(fixed, moving, size, moving_size, angle, shifts, max_points, min_overlap)
    return _best_and_runner(size, moving_size, angle, shifts, z)


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """A (B,) mask shaped to broadcast over ``like`` (B, ...)."""
    return mask.view(-1, *[1] * (like.dim() - 1))


def _diverse(angle: Tensor, shifts: Tensor, z: Tensor, keep: int, scale: int) -> Tensor:
    """(B, keep) indices of the most significant of (B, K) hypotheses, near misses of each other left out.

    Greedy: the most significant first, then each time the most significant of those not within
    ``NEAR_ANGLE`` and ``NEAR_SHIFT`` search-level pixels of one already kept (the same peak found
    from two angle candidates, or its neighbour), so that a second alignment (a symmetric or periodic
    picture's) is refined and can be named; where too few are left, the next most significant.
    """
    rows = torch.arange(z.shape[0], device=z.device)
    unused = torch.ones_like(z, dtype=torch.bool)
    available = unused.clone()
    chosen = []
    for _ in range(keep):
        pool = torch.where(available.any(1, keepdim=True), available, unused)
        idx = torch.where(pool, z, torch.full_like(z, -math.inf)).argmax(1)
        chosen.append(idx)
        turn = wrap_angle(angle - angle[rows, idx].unsqueeze(1)).abs()
        moved = (shifts - shifts[rows, idx].unsqueeze(1)).norm(dim=-1)
        near = (turn < NEAR_ANGLE) & (moved < NEAR_SHIFT * scale)
        unused[rows, idx] = False
        available = available & unused & ~near
    return torch.stack(chosen, 1)


def _best_and_runner(
    size: tuple[int, int],
    moving_size: tuple[int, int],
    angle: Tensor,
    shifts: Tensor,
    z: Tensor,
) -> _Found:
    """The most significant of (B, K) hypotheses, and the most significant of the others that lies
    ``DISTINCT`` pixels or more from it somewhere in fixed's frame (significance -inf where none does)."""
    b, k = z.shape
    best = z.argmax(1)
    pick = torch.arange(b, device=best.device)
    a, t = angle[pick, best], shifts[pick, best]
    apart = _displacement(
        size,
        moving_size,
        a.unsqueeze(1).expand(-1, k).reshape(-1),
        t.unsqueeze(1).expand(-1, k, 2).reshape(-1, 2),
        angle.reshape(-1),
        shifts.reshape(-1, 2),
    ).view(b, k)
    others = torch.where(apart >= DISTINCT, z, torch.full_like(z, -math.inf))
    second = others.argmax(1)
    rest = others.clone()
    rest[pick, second] = -math.inf
    third = rest.argmax(1)
    return _Found(
        a,
        t,
        z[pick, best],
        angle[pick, second],
        shifts[pick, second],
        others[pick, second],
        angle[pick, third],
        shifts[pick, third],
        rest[pick, third],
    )


def _grey(x: Tensor, channel: int | None, dtype: torch.dtype, b: int, name: str) -> Tensor:
    if channel is None:
        g = x.to(dtype).mean(1, keepdim=True)
    else:
        if (
            isinstance(channel, bool)
            or not isinstance(channel, int)
            or not -x.shape[1] <= channel < x.shape[1]
        ):
            raise ValueError(
                f"channel must be an int index into {name}'s {x.shape[1]} channel(s), got {channel!r}"
            )
        g = x[:, channel : channel + 1].to(dtype)
    return g.expand(b, 1, *x.shape[-2:])


def _check_image(x: object, name: str) -> Tensor:
    x = _validate.image(x, name)
    h, w = x.shape[-2:]
    if min(h, w) < MIN_SIZE:
        raise ValueError(f"{name} must be at least {MIN_SIZE}×{MIN_SIZE} pixels, got H={h}, W={w}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(
            f"{name} must have at least one sample and one channel, got {_validate.shape_str(x)}"
        )
    # NaN propagates through amax and amin, an infinity is one of them: far faster than isfinite().all().
    flat = x.flatten(1)
    bad = ~(torch.isfinite(flat.amax(1)) & torch.isfinite(flat.amin(1)))
    if bool(bad.any()):
        raise ValueError(f"{name} contains NaN or Inf pixels (sample(s) {indices(bad)})")
    return x


def _check_mask(mask: object, name: str, image: Tensor, b: int, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (bool or float), got {type(mask).__name__}")
    h, w = image.shape[-2:]
    m = mask
    if m.dim() == 2:
        m = m[None, None]
    elif m.dim() == 3:
        m = m[:, None]
    ok = m.dim() == 4 and m.shape[1] == 1 and tuple(m.shape[-2:]) == (h, w) and m.shape[0] in (1, b)
    if not ok:
        raise ValueError(
            f"{name} must have shape (H, W), (1 or B, H, W) or (1 or B, 1, H, W) with H={h}, W={w}, B={b}; "
            f"got {_validate.shape_str(mask)}"
        )
    if m.device != image.device:
        raise ValueError(f"{name} is on {m.device} but its image is on {image.device}")
    if m.is_complex():
        raise TypeError(f"{name} must be bool or real, got {m.dtype}")
    if m.is_floating_point() and not bool(torch.isfinite(m).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    m = (m > 0.5 if m.dtype != torch.bool else m).to(dtype).expand(b, 1, h, w)
    few = m.flatten(1).sum(1) < MIN_MASKED
    if bool(few.any()):
        raise ValueError(
            f"{name} leaves fewer than {MIN_MASKED} pixels to compare (sample(s) {indices(few)}): "
            "there is nothing to register"
        )
    return m


def _check_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_int(value: object, name: str, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _run_init(init: InitLike, fixed: Tensor, moving: Tensor, b: int, dtype: torch.dtype) -> Tensor:
    if not callable(init):
        raise TypeError(f"init must be callable as init(moving, fixed), got {type(init).__name__}")
    if isinstance(init, torch.nn.Module) and init.training:
        warnings.warn(
            "init is in training mode: batch-norm statistics would be updated and dropout applied; "
            "call init.eval() before register()",
            stacklevel=3,
        )
    out = init(moving.expand(b, *moving.shape[1:]), fixed.expand(b, *fixed.shape[1:]))
    # A tensor has an .angle method (the complex argument): test for it first.
    angle = out if isinstance(out, Tensor) else getattr(out, "angle", None)
    if not isinstance(angle, Tensor):
        raise TypeError(
            f"init must return a (B,) angle tensor or an object with .angle, got {type(out).__name__}"
        )
    if angle.shape not in ((b,), (1,), ()):
        raise ValueError(f"init returned an angle of shape {_validate.shape_str(angle)}, expected ({b},)")
    if not bool(torch.isfinite(angle).all()):
        raise ValueError("init returned a NaN or Inf angle")
    return angle.detach().to(device=fixed.device, dtype=dtype).reshape(-1).expand(b)


from ._stack import StackRegistration, register_stack  # noqa: E402  (uses register and TRUST)
