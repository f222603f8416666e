"""The rotation-about-the-centre model: ``register(..., model="rotation")``.

For pairs that were cut so that the rotation is about the image centre (no
translation): θ with ``rotate(moving, θ) ≈ fixed``, compared on the central
disc, the largest region that stays inside both images for every angle.

How it works
------------
1. Both images are blurred by the same small Gaussian. An isotropic blur
   commutes with rotation, so it does not move the answer; it takes out noise
   before anything is compared.
2. Global estimate over the whole circle. On a polar grid around the centre
   (radius r, angle φ counter-clockwise) ``rotate(moving, θ)`` is ``moving``
   shifted by θ along φ. One FFT along φ of the r-weighted, normalised polar
   samples gives the normalised cross-correlation (NCC) of the two discs for
   every angle at once, and a parabola through the peak and its neighbours
   puts it between grid angles. The intensities themselves are correlated,
   not magnitude spectra as in Fourier–Mellin, so there is no 180° ambiguity
   to settle.
3. Refinement. Gauss–Newton on θ maximises the NCC over the disc's pixels,
   sampling ``moving`` through :func:`rotstn.rotation_matrix` (the same
   geometry as :func:`rotstn.rotate`; only the disc is sampled). The
   derivative of the image with respect to the angle is taken from ``fixed``
   (``∂/∂δ rotate(fixed, δ) = -v·∂f/∂x + u·∂f/∂y`` at pixel offset (u, v)
   from the centre), so it is computed once and every step costs one
   sampling of ``moving`` and two dot products; secant updates of the slope
   make the convergence superlinear (2–4 steps from the global estimate).
   The refinement never moves more than two polar grid steps from the
   global peak, so it cannot wander to another one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import rotation_matrix, wrap_angle
from ._images import blur, check_not_flat


def estimate(
    fixed: Tensor,
    moving: Tensor,
    guess: Tensor | None,
    window: float,
    smooth: float,
    iterations: int,
) -> tuple[Tensor, Tensor]:
    """(B,) angle and (B,) disc NCC for grey (B, 1, H, W) images of one size (already broadcast)."""
    h, w = fixed.shape[-2:]
    disc = _Disc(h, w, fixed.dtype, fixed.device)
    check_not_flat(disc.take(fixed), None, "fixed", "over its central disc")
    check_not_flat(disc.take(moving), None, "moving", "over its central disc")
    fs, ms = blur(fixed, smooth), blur(moving, smooth)
    angle, spacing = _global_search(fs, ms, disc.radius, guess, window)
    angle = _gauss_newton(fs, ms, angle, disc, iterations, reach=2 * spacing)
    angle = wrap_angle(angle)
    score = _ncc(disc.take(fixed), disc.sample(moving, angle))
    return angle, score


class _Disc:
    """The central disc: the pixels compared, and how to sample them rotated."""

    def __init__(self, h: int, w: int, dtype: torch.dtype, device: torch.device) -> None:
        self.h, self.w = h, w
        # Half a pixel inside the largest inscribed circle, so that no rotated
        # sample reads the zero padding.
        self.radius = (min(h, w) - 1) / 2 - 0.5
        u = torch.arange(w, dtype=dtype, device=device) - (w - 1) / 2
        v = torch.arange(h, dtype=dtype, device=device) - (h - 1) / 2
        inside = (v.view(-1, 1).square() + u.view(1, -1).square()) <= self.radius**2
        self.index = inside.flatten().nonzero().squeeze(1)
        self.u = u.view(1, -1).expand(h, w).flatten()[self.index]
        self.v = v.view(-1, 1).expand(h, w).flatten()[self.index]
        # Disc pixels in affine_grid's normalised output coordinates.
        xn = (2 * (self.u + (w - 1) / 2) + 1) / w - 1
        yn = (2 * (self.v + (h - 1) / 2) + 1) / h - 1
        self.points = (xn.view(1, -1), yn.view(1, -1))

    def take(self, image: Tensor) -> Tensor:
        """(B, 1, H, W) -> (B, N) values on the disc."""
        return image.flatten(1)[:, self.index]

    def sample(self, image: Tensor, angle: Tensor) -> Tensor:
        """(B, N) values of ``rotate(image, angle)`` on the disc, without the rest of the grid."""
        m = rotation_matrix(angle, (self.h, self.w)).unsqueeze(-1)
        x, y = self.points
        gx = m[:, 0, 0] * x + m[:, 0, 1] * y + m[:, 0, 2]
        gy = m[:, 1, 0] * x + m[:, 1, 1] * y + m[:, 1, 2]
        grid = torch.stack((gx, gy), dim=-1)
        return F.grid_sample(image, grid.unsqueeze(1), align_corners=False).flatten(1)


def _standardise(x: Tensor) -> Tensor:
    """Zero mean and unit norm along the last dimension."""
    x = x - x.mean(-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def _ncc(a: Tensor, b: Tensor) -> Tensor:
    return (_standardise(a) * _standardise(b)).sum(-1)


def _polar(image: Tensor, radius: float, n_angles: int) -> tuple[Tensor, Tensor]:
    """Sample (B, 1, H, W) on rings up to ``radius`` at n_angles angles φ (counter-clockwise).

    Returns (B, R, n_angles) samples and the (R, 1) radii.
    """
    b, _, h, w = image.shape
    # Rings 2 px apart, outermost on the rim: the blurred images carry little
    # more, and the refinement does the rest at full resolution.
    n_r = max(int(radius / 2), 1)
    r = radius - 2.0 * torch.arange(n_r, dtype=image.dtype, device=image.device).view(n_r, 1)
    phi = torch.arange(n_angles, dtype=image.dtype, device=image.device) * (2 * math.pi / n_angles)
    # Rows grow downwards, so counter-clockwise as displayed is y = cy - r sin φ.
    x = (w - 1) / 2 + r * torch.cos(phi)
    y = (h - 1) / 2 - r * torch.sin(phi)
    grid = torch.stack(((2 * x + 1) / w - 1, (2 * y + 1) / h - 1), dim=-1)
    out = F.grid_sample(image, grid.expand(b, n_r, n_angles, 2), align_corners=False)
    return out[:, 0], r


def _global_search(
    fixed: Tensor, moving: Tensor, radius: float, guess: Tensor | None, window: float
) -> tuple[Tensor, float]:
    """(B,) angle maximising the disc NCC over the whole circle (or near ``guess``), and the grid spacing."""
    # A sample every ~2 px of arc on the rim (like the rings); a power of two for the FFT.
    n_angles = 1 << max(math.ceil(math.log2(math.pi * radius)), 3)
    pf, r = _polar(fixed, radius, n_angles)
    pm, _ = _polar(moving, radius, n_angles)
    pf, pm = _polar_standardise(pf, r), _polar_standardise(pm, r)
    # corr[k] = Σ_r Σ_φ fixed(r, φ) moving(r, φ - φ_k): peaks at φ_k = θ.
    spectrum = (torch.fft.rfft(pf, dim=-1) * torch.fft.rfft(pm, dim=-1).conj()).sum(1)
    corr = torch.fft.irfft(spectrum, n=n_angles, dim=-1)
    step = 2 * math.pi / n_angles
    if guess is not None:
        phi = torch.arange(n_angles, dtype=corr.dtype, device=corr.device) * step
        far = wrap_angle(phi.view(1, -1) - guess.view(-1, 1)).abs() > max(window, step)
        corr = corr.masked_fill(far, -math.inf)
    k = corr.argmax(-1, keepdim=True)
    left = corr.gather(1, (k - 1) % n_angles)
    mid = corr.gather(1, k)
    right = corr.gather(1, (k + 1) % n_angles)
    curvature = left - 2 * mid + right
    # Parabola vertex; -inf neighbours (edge of the init window) leave the peak on the grid.
    offset = torch.where(
        torch.isfinite(curvature) & (curvature < 0), 0.5 * (left - right) / curvature, torch.zeros_like(mid)
    )
    return wrap_angle((k + offset).squeeze(1) * step), step


def _polar_standardise(polar: Tensor, r: Tensor) -> Tensor:
    """Centre (B, R, A) polar samples on the disc mean and scale them to unit norm.

    Ring r stands for about 2πr pixels of the disc, so each side is weighted
    by sqrt(r): their product then sums like the pixels of the disc.
    """
    ring = polar.mean(-1, keepdim=True)
    mean = (ring * r).sum(1, keepdim=True) / r.sum()
    out = (polar - mean) * r.sqrt()
    return out / out.square().sum((1, 2), keepdim=True).sqrt().clamp_min(torch.finfo(out.dtype).tiny)


def _gauss_newton(
    fixed: Tensor, moving: Tensor, start: Tensor, disc: _Disc, iterations: int, reach: float
) -> Tensor:
    """Refine (B,) angles by Gauss–Newton on the disc NCC, staying within ``reach`` of ``start``."""
    angle = start
    if iterations == 0:
        return angle
    f = disc.take(fixed)
    centred = f - f.mean(-1, keepdim=True)
    norm = centred.norm(dim=-1, keepdim=True)
    f_std = centred / norm
    grad_y, grad_x = torch.gradient(fixed[:, 0], dim=(-2, -1))
    # d/dδ rotate(fixed, δ) at δ = 0, for the standardised fixed image; the
    # part along f_std is removed because standardising makes it invisible.
    jac = (-disc.v * disc.take(grad_x.unsqueeze(1)) + disc.u * disc.take(grad_y.unsqueeze(1))) / norm
    jac = jac - jac.mean(-1, keepdim=True)
    jac = jac - (jac * f_std).sum(-1, keepdim=True) * f_std
    curvature = jac.square().sum(-1).clamp_min(torch.finfo(jac.dtype).tiny)
    # One step never moves more than ~1.5 px at the rim: the linearisation
    # holds over about a pixel, and the global estimate is closer than that.
    max_step = 1.5 / max(disc.radius, 1.0)
    slope, previous = curvature, None
    for _ in range(iterations):
        # g(θ) = <J, standardised rotate(moving, θ)> is zero at the NCC optimum;
        # its slope is about <J, J> (Gauss-Newton) and is refined by secants,
        # which takes the linear convergence of the fixed-image Jacobian to
        # superlinear.
        g = (jac * _standardise(disc.sample(moving, angle))).sum(-1)
        if previous is not None:
            secant = (g - previous[1]) / (angle - previous[0])
            usable = torch.isfinite(secant) & (secant > 0.2 * curvature) & (secant < 5 * curvature)
            slope = torch.where(usable, secant, curvature)
        step = (-g / slope).clamp(-max_step, max_step)
        previous = (angle, g)
        # The global search has settled which peak this is: never walk off to another one.
        angle = start + (angle + step - start).clamp(-reach, reach)
        # A thousandth of a pixel at the rim is far below what any pair resolves.
        if float(step.abs().max()) * disc.radius < 1e-3:
            break
    return angle
