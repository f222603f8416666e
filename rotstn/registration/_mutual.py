"""Multimodal registration (``metric="mi"``): mutual information to search, an intensity map after.

Where the two images show the same structure with intensities related by an
unknown function (two stains, an inverted scan, a non-monotonic lookup), the
normalised cross-correlation of :mod:`._search` and :mod:`._refine` has no peak
at the truth. This module replaces what depends on a linear relation:

1. **Search by mutual information for every translation at once**
   (Öfverstedt et al. 2022). Each image is cut into ``LEVELS`` intensity
   levels (quantiles over its content); for every candidate angle, the moving
   image is turned onto a canvas and the joint histogram of the levels is
   counted for all shifts by cross-correlating the per-level indicator images
   (``LEVELS²`` FFT products, one inverse FFT each). The mutual information
   of each shift, less its small-sample bias, times the square root of the
   overlap share (as :func:`._refine.significance` weighs an NCC) ranks the
   (angle, shift) hypotheses. This runs on a level of about ``SEARCH_SIDE``
   pixels, angles every ``ANGLE_STEP`` over the circle.
2. **An intensity map** per hypothesis: with the images aligned by it, the
   conditional mean of one image's intensity given the other's (a
   Nadaraya–Watson regression over ``MAP_POINTS`` grey values), taken in the
   direction that explains more of the variance (the correlation ratio,
   Roche et al. 1998): a non-monotonic lookup ``g = φ(f)`` is a function of
   ``f`` but not the other way round. The mapped image and the other one are
   then linearly related, and the NCC path's Gauss–Newton refinement, score,
   predicted error and ambiguity apply unchanged (:func:`register`, "Trust").
   The map is estimated again at full resolution once the refinement has
   pinned the alignment down, and the refinement run again from there.

The score of such a result is the NCC path's agreement of the mapped image with
the other: a correlation ratio, measured block by block, in [0, 1]. It is high
where one image's intensity is (locally) a function of the other's.

References:
    J. Öfverstedt, J. Lindblad, N. Sladoje, "Fast computation of mutual
    information in the frequency domain with applications to global multimodal
    image alignment", Pattern Recognition Letters 159, 2022.
    A. Roche, G. Malandain, X. Pennec, N. Ayache, "The correlation ratio as a new
    similarity measure for multimodal image registration", MICCAI 1998.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _kernels
from ._images import Level, centre
from ._search import _fft_size, canvas_side, canvas_translation, turn_onto_canvas

LEVELS = 6  # intensity levels of the mutual-information search
SEARCH_SIDE = 40  # the search level's geometric-mean side is halved down to about this (pixels)
ANGLE_STEP = math.radians(5)
PLANES = 4096  # joint-histogram planes (pairs × angles × LEVELS²) held at once (memory)
MAP_POINTS = 64  # grey values at which an intensity map is tabulated
BANDWIDTH = 1 / 40  # of an intensity map's grey-value range: the kernel's standard deviation
MAP_SAMPLES = 32768  # pixels an intensity map is estimated from (a regular subset beyond that)


def quantise(image: Tensor, weight: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """(B, levels, h, w) level indicators times ``weight``, and the (B, levels - 1) thresholds.

    Thresholds are the image's quantiles over the pixels with ``weight > 0.5``.
    """
    b = image.shape[0]
    flat = image.reshape(b, -1)
    inside = weight.expand_as(image).reshape(b, -1) > 0.5
    q = torch.linspace(0, 1, levels + 1, dtype=image.dtype, device=image.device)[1:-1]
    thresholds = torch.nanquantile(flat.masked_fill(~inside, math.nan), q, dim=1).T.contiguous()
    return indicators(image, weight, thresholds), thresholds


def indicators(image: Tensor, weight: Tensor, thresholds: Tensor) -> Tensor:
    """(B, L, h, w): which of the L = len(thresholds) + 1 levels each pixel is in, times ``weight``."""
    index = (image.unsqueeze(-1) > thresholds.view(thresholds.shape[0], 1, 1, 1, -1)).sum(-1)
    one_hot = F.one_hot(index[:, 0], thresholds.shape[1] + 1).permute(0, 3, 1, 2).to(image.dtype)
    return one_hot * weight


def _xlogx(x: Tensor) -> Tensor:
    return x * torch.log(x.clamp_min(1e-12))


def _information(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Mutual information (nats) and total count of (..., K, K, L0, L1) joint counts over (K, K)."""
    counts = counts.clamp_min(0)
    rows, cols = counts.sum(-3), counts.sum(-4)
    n = rows.sum(-3)
    entropy_sums = _xlogx(counts).sum((-4, -3)) - _xlogx(rows).sum(-3) - _xlogx(cols).sum(-3)
    return (entropy_sums + _xlogx(n)) / n.clamp_min(1e-12), n


def search(
    fixed: Level,
    moving: Level,
    size: tuple[int, int],
    moving_size: tuple[int, int],
    angles: Tensor,
    min_overlap: float,
    keep: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``keep`` best (angle, translation) hypotheses by mutual information, for (B, A) angles.

    Returns ``(B, keep)`` angles, ``(B, keep, 2)`` translations (level-0 pixels) and their
    ranking value (bias-corrected MI times √(overlap / smaller area); -inf for none).
    """
    f, g = fixed.image, moving.image
    b, n_angles = angles.shape
    dtype, device = f.dtype, f.device
    h, w = f.shape[-2:]
    hm, wm = g.shape[-2:]
    scale = fixed.scale
    d = canvas_side(hm, wm)
    c_d = (d - 1) / 2
    c_f, c_m = centre(*size, scale, f), centre(*moving_size, scale, f)
    k = LEVELS
    f_weight, g_weight = fixed.content(), moving.content()
    fa, _ = quantise(f, f_weight.expand_as(f), k)
    _, g_thresholds = quantise(g, g_weight.expand_as(g), k)
    area = torch.minimum(f_weight.sum((1, 2, 3)), g_weight.sum((1, 2, 3))).expand(b)
    # Shifts s (fixed p against canvas p + s) within reach of s0, the shift that puts the centres
    # together; the FFT length along each axis keeps those exact (no wrapped-around content).
    s0 = (c_d - c_f[0, 1].item(), c_d - c_f[0, 0].item())
    reach = (0.5 * max(h, hm), 0.5 * max(w, wm))
    first, length, sides = [], [], []
    for n, mid, r in zip((h, w), s0, reach, strict=True):
        lo, hi = math.ceil(mid - r), math.floor(mid + r)
        first.append(lo)
        length.append(hi - lo + 1)
        sides.append(_fft_size(max(d - lo, hi + n) + 1))
    p = tuple(sides)
    ky = torch.fft.fftfreq(p[0], device=device, dtype=dtype).view(-1, 1)
    kx = torch.fft.rfftfreq(p[1], device=device, dtype=dtype).view(1, -1)
    # conj(FA)·e^{2πi(first·k)}: correlation index 0 is shift ``first``.
    ramp = torch.polar(torch.ones_like(ky * kx), 2 * math.pi * (first[0] * ky + first[1] * kx))
    conj_fa = torch.fft.rfft2(fa, s=p).conj() * ramp  # (B, K, p0, p1r)
    planes = torch.cat((g, g_weight.expand_as(g)), 1)
    best_value = torch.full((b, n_angles), -math.inf, dtype=dtype, device=device)
    best_index = torch.zeros((b, n_angles), dtype=torch.long, device=device)
    bias = (k - 1) ** 2 / 2
    chunk = max(1, PLANES // (b * k * k))
    for a0 in range(0, n_angles, chunk):
        turn = angles[:, a0 : a0 + chunk]
        kt = turn.shape[1]
        turned = turn_onto_canvas(planes, c_m, turn, d)
        content = (turned[:, 1:] > 0.999).to(dtype)
        gb = indicators(turned[:, :1], content, g_thresholds.repeat_interleave(kt, 0))
        fb = torch.fft.rfft2(gb, s=p).view(b, kt, 1, k, p[0], -1)
        cross = conj_fa.view(b, 1, k, 1, p[0], -1) * fb  # (B, kt, K, K, p0, p1r)
        # The inverse transform of the rows that hold the shifts kept only (a quarter less work).
        rows = torch.fft.ifft(cross, dim=-2)[..., : length[0], :]
        counts = torch.fft.irfft(rows, n=p[1], dim=-1)[..., : length[1]]
        mi, n = _information(counts)  # (B, kt, L0, L1)
        share = n / area.view(-1, 1, 1, 1)
        value = (mi - bias / n.clamp_min(1)) * share
        value = torch.where(share >= min_overlap, value, torch.full_like(value, -math.inf))
        flat = value.flatten(2)
        v, i = flat.max(2)
        best_value[:, a0 : a0 + kt], best_index[:, a0 : a0 + kt] = v, i
    # The best shift of each angle; the ``keep`` best angles that are local maxima over the angle
    # (a broad peak would otherwise fill every slot with one hypothesis).
    circular = _circular_angles(angles)
    if circular:
        left_v, right_v = best_value.roll(1, 1), best_value.roll(-1, 1)
    else:
        pad = torch.full_like(best_value[:, :1], -math.inf)
        left_v = torch.cat((pad, best_value[:, :-1]), 1)
        right_v = torch.cat((best_value[:, 1:], pad), 1)
    peak = (best_value >= left_v) & (best_value >= right_v)
    ranked = torch.where(peak, best_value, torch.full_like(best_value, -math.inf))
    keep = min(keep, n_angles)
    value, pick = ranked.topk(keep, dim=1)
    index = best_index.gather(1, pick)
    sy = (index // length[1] + first[0]).to(dtype)
    sx = (index % length[1] + first[1]).to(dtype)
    t = canvas_translation(sx, sy, c_d, c_f, scale)
    return angles.gather(1, pick), t, value


def _circular_angles(angles: Tensor) -> bool:
    """Whether a row of angles is evenly spread over the whole circle (its ends are neighbours)."""
    if angles.shape[1] < 3:
        return False
    step = angles[0, 1] - angles[0, 0]
    return bool(abs(float(step) * angles.shape[1] - 2 * math.pi) < 1e-6)


def sweep_angles(b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(b, K) angles every ``ANGLE_STEP`` over the circle."""
    n = round(2 * math.pi / ANGLE_STEP)
    return (torch.arange(n, dtype=dtype, device=device) * (2 * math.pi / n)).expand(b, n)


def search_level(level: Level, moving: Level) -> tuple[Level, Level]:
    """The levels the mutual information is searched on: halved down to about ``SEARCH_SIDE``.

    The larger image's geometric-mean side ends between 0.6 and 1.25 times ``SEARCH_SIDE`` (the
    search's cost grows with its square), never a side under 24 pixels.
    """
    while True:
        sides = (*level.image.shape[-2:], *moving.image.shape[-2:])
        mean_side = math.sqrt(max(sides[0] * sides[1], sides[2] * sides[3]))
        if mean_side < 1.25 * SEARCH_SIDE or min(sides) < 48:
            return level, moving
        level, moving = level.halve(), moving.halve()


# ---------------------------------------------------------------------------------------------
# The intensity map.


def sampled(fixed: Level, moving: Level, size: tuple[int, int], moving_size: tuple[int, int],
            angle: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(B, N) fixed values, moving values at the same points under (angle, t), and their weights.

    At most ``MAP_SAMPLES`` points (a regular subset of fixed's pixels), weights 1 where both images
    have content there.
    """
    f = fixed.image.expand(angle.shape[0], *fixed.image.shape[1:])
    h, w = f.shape[-2:]
    step = max(1, math.ceil(math.sqrt(h * w / MAP_SAMPLES)))
    c_f = centre(*size, fixed.scale, f)
    c_m = centre(*moving_size, moving.scale, f)
    planes = torch.cat((moving.image, moving.content().expand_as(moving.image)), 1)
    planes = planes.expand(angle.shape[0], *planes.shape[1:])
    b = angle.shape[0]
    out = _kernels.warp(
        planes.reshape(2 * b, 1, *planes.shape[-2:]),
        angle.repeat_interleave(2),
        (c_f + t / fixed.scale).repeat_interleave(2, 0),
        c_m.expand(2 * b, 2),
        "bilinear",
        "zeros",
        False,
        (h, w),
    ).view(b, 2, h, w)
    weight = fixed.content().expand(b, 1, h, w)[..., ::step, ::step] * (out[:, 1:, ::step, ::step] > 0.999)
    return f[..., ::step, ::step].flatten(1), out[:, :1, ::step, ::step].flatten(1), weight.flatten(1)


def regression(x: Tensor, y: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """E[y | x] tabulated at ``MAP_POINTS`` values of x: (B, P) grid, (B, P) means, (B,) explained share.

    A local-linear Gaussian-kernel regression over x's range (no bias where the samples thin out at
    its ends, unlike a kernel mean), bandwidth ``BANDWIDTH`` of the range, computed on the grid: the
    samples are binned linearly onto it and the kernel sums taken by convolution. The share is the
    correlation ratio η² = var(E[y|x]) / var(y) over the weights.
    """
    b, p = x.shape[0], MAP_POINTS
    inside = w > 0
    big = torch.finfo(x.dtype).max
    lo = torch.where(inside, x, torch.full_like(x, big)).amin(1, keepdim=True)
    hi = torch.where(inside, x, torch.full_like(x, -big)).amax(1, keepdim=True)
    span = (hi - lo).clamp_min(1e-6)
    grid = lo + span * torch.linspace(0, 1, p, dtype=x.dtype, device=x.device)
    u = ((x - lo) / span * (p - 1)).clamp(0, p - 1)
    i0 = u.floor().clamp(max=p - 2).long()
    frac = u - i0
    sums = x.new_zeros(b, 2, p)  # weight and weighted y per grid point
    for index, share in ((i0, 1 - frac), (i0 + 1, frac)):
        sums[:, 0].scatter_add_(1, index, w * share)
        sums[:, 1].scatter_add_(1, index, w * share * y)
    sigma = BANDWIDTH * (p - 1)
    reach = math.ceil(3 * sigma)
    offset = torch.arange(-reach, reach + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offset / sigma) ** 2)
    taps = torch.stack((kernel, kernel * offset, kernel * offset**2)).unsqueeze(1)  # (3, 1, taps)
    # m[j] = Σ_k K(k - j)·(k - j)^r·sums[k] for r = 0, 1, 2.
    m = F.conv1d(sums.view(2 * b, 1, p), taps, padding=reach).view(b, 2, 3, p)
    s0, s1, s2 = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    t0, t1 = m[:, 1, 0], m[:, 1, 1]
    det = s0 * s2 - s1 * s1
    total = w.sum(1, keepdim=True).clamp_min(1e-12)
    mean_y = (w * y).sum(1, keepdim=True) / total
    local_mean = torch.where(s0 > 1e-3, t0 / s0.clamp_min(1e-12), mean_y.expand(b, p))
    # The local line where the samples pin it down; the local mean where they span too little of x.
    steady = det > 1e-3 * s0 * s0 * sigma**2
    means = torch.where(steady, (s2 * t0 - s1 * t1) / det.clamp_min(1e-30), local_mean)
    fitted = apply(x, grid, means)
    var_y = (w * (y - mean_y).square()).sum(1) / total[:, 0]
    explained = (w * (fitted - mean_y).square()).sum(1) / total[:, 0]
    return grid, means, (explained / var_y.clamp_min(1e-12)).clamp(0, 1)


def apply(values: Tensor, grid: Tensor, means: Tensor) -> Tensor:
    """A tabulated map (B, P) applied to (B, ...) values: linear between grid points, constant beyond."""
    b, p = grid.shape
    flat = values.reshape(b, -1)
    lo, span = grid[:, :1], (grid[:, -1:] - grid[:, :1]).clamp_min(1e-12)
    u = ((flat - lo) / span * (p - 1)).clamp(0, p - 1)
    i0 = u.floor().clamp(max=p - 2).long()
    frac = u - i0
    m0, m1 = means.gather(1, i0), means.gather(1, i0 + 1)
    return (m0 + frac * (m1 - m0)).view_as(values)


def intensity_map(
    fixed: Level,
    moving: Level,
    size: tuple[int, int],
    moving_size: tuple[int, int],
    angle: Tensor,
    t: Tensor,
    on: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The map that makes the pair linearly related under (angle, t), per pair.

    Returns ``(grid, means, on_fixed)``: the (B, P) tabulated map, and (B,) bool, True where it
    maps fixed's intensities onto moving's, False where it maps moving's onto fixed's: ``on``, or
    by default the direction whose map explains more of the other image's variance.
    """
    f, g, w = sampled(fixed, moving, size, moving_size, angle, t)
    grid_f, means_f, share_f = regression(f, g, w)  # E[g | f]
    grid_g, means_g, share_g = regression(g, f, w)  # E[f | g]
    on_fixed = share_f >= share_g if on is None else torch.full_like(share_f, on, dtype=torch.bool)
    grid = torch.where(on_fixed.unsqueeze(1), grid_f, grid_g)
    means = torch.where(on_fixed.unsqueeze(1), means_f, means_g)
    return grid, means, on_fixed
