"""Global search of the rigid model: the angle over the full circle and the translation.

Run on a coarse pyramid level (about 64 pixels a side), in two steps:

1. **Angle candidates from magnitude spectra** (the Fourier–Mellin idea,
   Reddy & Chatterji 1996). The magnitude of the Fourier transform does not
   change when the image is translated, and turns with it when the image is
   rotated. Both images are windowed (a separable Hann window times their
   mask, so neither the frame nor a masked region draws lines in the
   spectrum), their log-magnitude spectra sampled on rings, and the rings
   correlated circularly over the angle by one FFT. A peak gives θ modulo
   180° (a magnitude spectrum is point-symmetric), so each of the ``peaks``
   best peaks gives two candidates, θ and θ + π.
2. **Translations of each candidate by phase correlation** (Kuglin & Hines
   1975): ``moving`` is turned by the candidate onto a canvas that holds all
   of it, both images are tapered at the edges of their content (frame and
   mask), and the highest peaks of the whitened cross-power spectrum's
   inverse give candidate shifts, for every shift at once.
3. **Verification** of every (angle, shift) hypothesis by the masked
   normalised cross-correlation over the overlap of the two images
   (``_refine.significance``), ranked by how unlikely that NCC is by chance
   (Fisher's z times √overlap): a high NCC on a sliver of the images is
   common, the same NCC over half of them is not. This also settles the
   180° ambiguity.

When the best hypothesis is weak (texture without dominant orientations,
strong noise), angles every ``SWEEP_STEP`` over the circle are tried the
same way.

References:
    B. S. Reddy, B. N. Chatterji, "An FFT-based technique for translation,
    rotation, and scale-invariant image registration", IEEE Trans. Image
    Processing 5(8), 1996.
    C. D. Kuglin, D. C. Hines, "The phase correlation image alignment
    method", Proc. IEEE Int. Conf. Cybernetics and Society, 1975.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _kernels
from ._images import Level, centre

N_ANGLES = 256  # samples of [0, π) on each ring of the spectrum: 0.7° apart
SWEEP_BELOW = 1.2  # best refined significance (Fisher z·√overlap) under which the circle is swept
SWEEP_STEP = math.radians(4)
LOWPASS = 0.2  # cycles per pixel: the Gaussian weight of the phase correlation


def _windows(level: Level) -> Tensor:
    """(B, 5, h, w) mean-free image under five round windows: the inscribed disc and one per quadrant.

    Each window is radially symmetric (a Hann profile over a disc): a
    separable window blurs the spectrum more along one axis than the other,
    and that anisotropy, the same in both images, pulls the angle towards 0°.
    The quadrant windows matter when the images overlap in part: some pair of
    windows, one in each image, then still sees the same content.
    """
    img = level.image
    h, w = img.shape[-2:]
    y = torch.arange(h, dtype=img.dtype, device=img.device).view(1, h, 1)
    x = torch.arange(w, dtype=img.dtype, device=img.device).view(1, 1, w)
    side = min(h, w)
    cx = torch.tensor([(w - 1) / 2, w / 4, 3 * w / 4, w / 4, 3 * w / 4], dtype=img.dtype, device=img.device)
    cy = torch.tensor([(h - 1) / 2, h / 4, h / 4, 3 * h / 4, 3 * h / 4], dtype=img.dtype, device=img.device)
    radius = torch.tensor([side / 2, *[side / 4] * 4], dtype=img.dtype, device=img.device)
    r = ((x - cx.view(-1, 1, 1)).square() + (y - cy.view(-1, 1, 1)).square()).sqrt() / radius.view(-1, 1, 1)
    win = torch.where(r < 1, 0.5 + 0.5 * torch.cos(math.pi * r), torch.zeros_like(r)).unsqueeze(0)
    weight = win * level.content()
    mean = (img * weight).sum((-2, -1), keepdim=True) / weight.sum((-2, -1), keepdim=True).clamp_min(1e-12)
    return (img - mean) * weight


def _rings(level: Level, radii: Tensor) -> Tensor:
    """(B, 5, R, N_ANGLES) log-magnitudes of the windows, on rings of ``radii`` cycles/pixel, φ in [0, π)."""
    x = _windows(level)
    b, n, h, w = x.shape
    # A real image's magnitude spectrum is point-symmetric: half of it (kx >= 0) holds all of it.
    spectrum = torch.fft.fftshift(_power(torch.fft.rfft2(x)).sqrt(), dim=-2)
    half = spectrum.shape[-1]
    spectrum = spectrum.reshape(b * n, 1, h, half)
    spectrum = torch.log(spectrum + 1e-3 * spectrum.flatten(1).amax(1).view(-1, 1, 1, 1) + 1e-12)
    phi = torch.arange(N_ANGLES, dtype=x.dtype, device=x.device) * (math.pi / N_ANGLES)
    # Counter-clockwise as displayed, rows down: (kx, ky) = ρ (cos φ, -sin φ), read at (-kx, -ky) if kx < 0.
    kx = radii.view(-1, 1) * torch.cos(phi)
    ky = -radii.view(-1, 1) * torch.sin(phi)
    ky = torch.where(kx < 0, -ky, ky)
    col = kx.abs() * w
    row = h // 2 + ky * h
    grid = torch.stack(((2 * col + 1) / half - 1, (2 * row + 1) / h - 1), dim=-1)
    rings = F.grid_sample(spectrum, grid.expand(b * n, -1, -1, -1), align_corners=False).view(
        b, n, *grid.shape[:2]
    )
    # The isotropic part of a ring says nothing about the angle.
    rings = rings - rings.mean(-1, keepdim=True)
    return rings / rings.square().sum((2, 3), keepdim=True).sqrt().clamp_min(1e-12)


def _peaks(corr: Tensor, n: int) -> list[Tensor]:
    """The n highest peaks of (B, N_ANGLES) circular curves, at least 3° apart, as (B,) angles in [0, π)."""
    rows = torch.arange(corr.shape[0], device=corr.device)
    found = []
    for _ in range(n):
        k = corr.argmax(1)
        left, mid, right = corr[rows, (k - 1) % N_ANGLES], corr[rows, k], corr[rows, (k + 1) % N_ANGLES]
        curvature = left - 2 * mid + right
        ok = torch.isfinite(curvature) & (curvature < 0)
        offset = torch.where(ok, 0.5 * (left - right) / curvature, torch.zeros_like(mid)).clamp(-0.5, 0.5)
        found.append((k + offset) * (math.pi / N_ANGLES))
        near = (torch.arange(N_ANGLES, device=corr.device).view(1, -1) - k.view(-1, 1) + 4) % N_ANGLES <= 8
        corr = corr.masked_fill(near, -math.inf)
    return found


def spectral_angles(fixed: Level, moving: Level, peaks: int) -> Tensor:
    """(B, 2·peaks) candidate angles (radians) from the magnitude spectra of the windows.

    Every window of fixed is correlated with every window of moving (25 circular
    correlations over the angle); the ``peaks`` highest peaks over all of them,
    at least 3° apart, are the candidates, each with its 180° twin.
    """
    side = min(*fixed.image.shape[-2:], *moving.image.shape[-2:])
    # Mid to high frequencies: texture orientation is shared by two windows even where their content
    # differs, the lowest rings are dominated by what each window happens to hold.
    radii = torch.linspace(max(3.0 / side, 0.08), 0.4, 24, dtype=fixed.image.dtype, device=fixed.image.device)
    ff = torch.fft.rfft(_rings(fixed, radii), dim=-1)  # (B, 5, R, K)
    fm = torch.fft.rfft(_rings(moving, radii), dim=-1)
    corr = torch.fft.irfft(torch.einsum("birk,bjrk->bijk", ff, fm.conj()), n=N_ANGLES, dim=-1)
    # The two large windows first; then the best peak among the smaller windows' 24 pairs.
    found = _peaks(corr[:, 0, 0], peaks)
    others = corr.flatten(1, 2)[:, 1:]
    for a in found:
        k = (a * (N_ANGLES / math.pi)).round().long()
        near = (torch.arange(N_ANGLES, device=corr.device).view(1, -1) - k.view(-1, 1) + 4) % N_ANGLES <= 8
        others = others.masked_fill(near.unsqueeze(1), -math.inf)
    best = others.flatten(1).argmax(1)
    rows = torch.arange(corr.shape[0], device=corr.device)
    found += _peaks(others[rows, best // N_ANGLES], 1)
    angle = torch.stack(found, 1)
    return torch.cat((angle, angle + math.pi), dim=1)


def _fft_size(n: int) -> int:
    """The smallest 2^a·3^b·5^c >= n (fast FFT lengths)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _taper(mask: Tensor) -> Tensor:
    """A weight that is 1 inside ``mask`` and falls smoothly to 0 over ~4 pixels at its edges."""
    weight = F.avg_pool2d(F.avg_pool2d(F.pad(mask, (4, 4, 4, 4)), (1, 9), stride=1), (9, 1), stride=1)
    return ((weight - 0.5) * 2).clamp(0, 1) * mask


def _power(spectrum: Tensor) -> Tensor:
    """|X|² of a complex tensor (several times faster than ``abs`` on the CPU)."""
    return spectrum.real.square() + spectrum.imag.square()


def _prepare(image: Tensor, weight: Tensor) -> Tensor:
    """The image less its weighted mean, times the weight (what the phase correlation transforms)."""
    mean = (image * weight).sum((-2, -1), keepdim=True) / weight.sum((-2, -1), keepdim=True).clamp_min(1e-6)
    return (image - mean) * weight


def phase_correlation(
    fixed: Level,
    moving: Level,
    size: tuple[int, int],
    moving_size: tuple[int, int],
    angles: Tensor,
    peaks: int,
    twins: bool = False,
) -> tuple[Tensor, Tensor]:
    """Translations for each candidate angle from the peaks of a phase correlation.

    ``moving`` is turned by each angle onto a canvas that holds all of it;
    both images are tapered at the edges of their content (frame and mask)
    and the phase correlation's ``peaks`` highest local maxima within half
    an image side of centred are returned.

    Args:
        fixed, moving: the search level of each image (same scale).
        size, moving_size: level-0 (H, W) of fixed and moving.
        angles: (B, K) candidate angles.
        peaks: shifts kept per angle.
        twins: the second half of ``angles`` is the first half plus π. Moving turned by
            θ + π about the canvas centre is the canvas turned by θ, flipped: its
            transform is the conjugate of θ's times a phase ramp, so only half of the
            angles are resampled and transformed.

    Returns:
        ``(B, K·peaks)`` angles and ``(B, K·peaks, 2)`` translations (level-0 pixels).
    """
    f, g = fixed.image, moving.image
    b, k = angles.shape
    dtype, device = f.dtype, f.device
    h, w = f.shape[-2:]
    hm, wm = g.shape[-2:]
    scale = fixed.scale
    d = canvas_side(hm, wm)
    c_d = (d - 1) / 2
    c_f = centre(*size, scale, f)
    c_m = centre(*moving_size, scale, f)
    if twins and k % 2:
        raise ValueError(f"twins needs an even number of angles, got {k}")
    turn = angles[:, : k // 2] if twins else angles
    kt = turn.shape[1]
    # Turn moving and where it has content (its taper; it is linear in the samples, so it is made once
    # per image) by each candidate onto a d×d canvas whose centre shows moving's centre. Moving is
    # zero-padded to the canvas first (a same-size warp runs on the fast kernels), and the two planes
    # go as two one-channel images.
    taper = _taper(moving.content()).expand_as(g)
    turned = turn_onto_canvas(torch.cat((g, taper), 1), c_m, turn, d)

    p = (_fft_size(max(h, d)), _fft_size(max(w, d)))
    ff = torch.fft.rfft2(_prepare(f, _taper(fixed.content()).expand_as(f))[:, 0], s=p)  # shared by the angles
    fg = torch.fft.rfft2(_prepare(turned[:, :1], turned[:, 1:])[:, 0], s=p).view(b, kt, p[0], -1)
    ky = torch.fft.fftfreq(p[0], device=device, dtype=dtype).view(-1, 1)
    kx = torch.fft.rfftfreq(p[1], device=device, dtype=dtype).view(1, -1)
    # Whitened, and weighted towards the frequencies a coarse level resolves well.
    lowpass = torch.exp(-(kx.square() + ky.square()) / (2 * LOWPASS**2))
    magnitude = (_power(ff).unsqueeze(1) * _power(fg)).sqrt()
    floor = 1e-6 * magnitude.amax((-2, -1), keepdim=True)
    weight = lowpass / (magnitude + floor)
    # Shifts s (fixed p against canvas p + s) are kept within ``reach`` of s0, the shift that puts the
    # centres together: integer shifts first[i] ... first[i] + length[i] - 1 along each axis (the ones
    # the circular correlation tells apart, around s0). The spectrum is multiplied by a phase ramp
    # that moves shift first[i] to index 0, so those shifts are the correlation's first rows and
    # columns.
    s0 = (c_d - c_f[0, 1].item(), c_d - c_f[0, 0].item())
    reach = (0.5 * max(h, hm), 0.5 * max(w, wm))
    first, length = [], []
    for side, mid, r in zip(p, s0, reach, strict=True):
        lo = max(math.ceil(mid - r), math.ceil(mid - side / 2))
        hi = min(math.floor(mid + r), math.ceil(mid + side / 2) - 1)
        first.append(lo)
        length.append(hi - lo + 1)
    conj_f = ff.conj() * torch.polar(torch.ones_like(ky * kx), 2 * math.pi * (first[0] * ky + first[1] * kx))
    # Each half written in place: no concatenated copy of the spectra.
    cross = torch.empty((b, k, *fg.shape[-2:]), dtype=fg.dtype, device=device)
    weighted = fg * weight
    torch.mul(conj_f.unsqueeze(1), weighted, out=cross[:, :kt])
    if twins:
        # x flipped on the canvas, x'[n] = x[d - 1 - n], padded to p: X'(k) = e^{-2πik(d-1)/p}·conj(X(k)),
        # so its cross-power spectrum has the same magnitude (the weight is real).
        ramp = torch.polar(torch.ones_like(ky * kx), -2 * math.pi * (d - 1) * (ky + kx))
        torch.mul((conj_f * ramp).unsqueeze(1), weighted.conj(), out=cross[:, kt:])
    corr = torch.fft.irfft2(cross, s=p)[:, :, : length[0], : length[1]].reshape(b * k, -1)
    # The highest peaks, each at least 3 pixels from the ones before.
    window = torch.arange(-3, 4, device=device)
    found = []
    for _ in range(peaks):
        best = corr.argmax(1)
        found.append(best)
        r = ((best // length[1]).view(-1, 1, 1) + window.view(1, -1, 1)).clamp(0, length[0] - 1)
        c = ((best % length[1]).view(-1, 1, 1) + window.view(1, 1, -1)).clamp(0, length[1] - 1)
        corr = corr.scatter(1, (r * length[1] + c).flatten(1), -math.inf)
    ranked = torch.stack(found, 1)
    sy = (ranked // length[1] + first[0]).to(dtype)
    sx = (ranked % length[1] + first[1]).to(dtype)
    shifts = canvas_translation(sx, sy, c_d, c_f, scale).view(b, k * peaks, 2)
    return angles.repeat_interleave(peaks, 1), shifts


def canvas_side(hm: int, wm: int) -> int:
    """Side of the square canvas that holds an hm × wm image turned by any angle."""
    return math.ceil(math.hypot(hm, wm)) + 2


def turn_onto_canvas(planes: Tensor, c_m: Tensor, angles: Tensor, d: int) -> Tensor:
    """(B·K, C, d, d): the (B, C, hm, wm) planes turned by each of (B, K) angles onto a d×d canvas.

    The canvas's centre shows ``c_m`` (moving's centre in the planes' pixels, (1, 2)). The planes are
    zero-padded to the canvas first (a same-size warp runs on the fast kernels) and turned as one-channel
    images.
    """
    b, c, hm, wm = planes.shape
    k = angles.shape[1]
    c_d = (d - 1) / 2
    top, left = (d - hm) // 2, (d - wm) // 2
    padded = F.pad(planes, (left, d - wm - left, top, d - hm - top))
    n = c * b * k
    return _kernels.warp(
        padded.repeat_interleave(k, 0).view(n, 1, d, d),
        angles.reshape(-1).repeat_interleave(c),
        torch.full((n, 2), c_d, dtype=planes.dtype, device=planes.device),
        (c_m + c_m.new_tensor([[left, top]])).expand(n, 2),
        "bilinear",
        "zeros",
        False,
    ).view(b * k, c, d, d)


def canvas_translation(sx: Tensor, sy: Tensor, c_d: float, c_f: Tensor, scale: int) -> Tensor:
    """(..., 2) level-0 translations of canvas shifts (sx, sy) of a level of ``scale``.

    Fixed p shows canvas p + s = moving c_m + A(p + s - c_d), so t = c_d - s - c_f (level pixels).
    """
    return torch.stack(((c_d - sx - c_f[0, 0]) * scale, (c_d - sy - c_f[0, 1]) * scale), -1)


def sweep_angles(b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(b, K) angles every ``SWEEP_STEP`` over the circle, the second half the first plus π."""
    half = round(math.pi / SWEEP_STEP)
    angle = torch.arange(half, dtype=dtype, device=device) * (math.pi / half)
    return torch.cat((angle, angle + math.pi)).expand(b, 2 * half)
