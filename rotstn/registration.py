"""Rotation registration: the angle that turns ``moving`` onto ``fixed``.

Convention
----------
``register(fixed, moving)`` returns θ with ``rotate(moving, θ) ≈ fixed``:
radians, positive counter-clockwise as displayed, about the image centre
``((W-1)/2, (H-1)/2)`` (see :mod:`rotstn.functional`). The images are
compared on the central disc, the largest region that stays inside both
images for every angle.

How it works
------------
1. Both images are made grey (channel mean) and blurred by the same small
   Gaussian. An isotropic blur commutes with rotation, so it does not move
   the answer; it takes out noise before anything is compared.
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
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validate
from .functional import rotate, rotation_matrix, wrap_angle

__all__ = ["Registration", "register"]

MIN_SIZE = 8


@dataclass(frozen=True)
class Registration:
    """What :func:`register` found.

    Attributes:
        angle: ``(B,)`` radians in (-π, π] with ``rotate(moving, angle) ≈ fixed``.
        score: ``(B,)`` NCC of the aligned pair over the central disc, in [-1, 1]
            (1 is a perfect match up to brightness and contrast; a failed pair
            shows up as a low score).
        aligned: ``(B, C, H, W)`` ``rotate(moving, angle)``, in moving's dtype.
    """

    angle: Tensor
    score: Tensor
    aligned: Tensor


InitLike = Callable[[Tensor, Tensor], object]


def register(
    fixed: Tensor,
    moving: Tensor,
    *,
    init: InitLike | None = None,
    init_window: float = math.radians(20),
    smooth: float = 1.0,
    iterations: int = 20,
) -> Registration:
    """Find the rotation about the centre that aligns ``moving`` onto ``fixed``.

    Convention: the returned θ satisfies ``rotate(moving, θ) ≈ fixed``;
    radians, positive counter-clockwise as displayed, about
    ``((W-1)/2, (H-1)/2)``. Works over the full circle without training, for
    any ``H × W`` (non-square too), and is insensitive to brightness,
    contrast and moderate gamma differences (it maximises a normalised
    cross-correlation). See the module docstring for the method.

    Args:
        fixed: ``(B, C, H, W)`` or ``(C, H, W)`` floating-point image(s).
        moving: the same ``H × W``; batch 1 or B (each side broadcasts),
            any number of channels (estimation uses the channel mean).
        init: optional initialiser, e.g. a trained paired
            :class:`rotstn.RotationSTN`: called as ``init(moving, fixed)`` (4-D
            tensors, under ``torch.no_grad()``), returning a ``(B,)`` angle
            tensor or an object with an ``.angle`` attribute. The global search
            is then restricted to ``init_window`` around its answer, which
            settles near-symmetric images the way the initialiser learned to.
            A module still in training mode gets a warning (call ``.eval()``).
        init_window: half-width in radians of the search around ``init``'s
            angle; ignored without ``init``.
        smooth: standard deviation in pixels of the Gaussian applied to both
            images before estimation (0 turns it off). It does not bias the
            angle and makes noisy pairs more accurate.
        iterations: maximum Gauss–Newton steps (0 returns the global estimate).

    Returns:
        A :class:`Registration` with ``angle`` ``(B,)``, ``score`` ``(B,)``
        and ``aligned`` ``(B, C, H, W)``, all detached. ``angle`` and
        ``score`` are float32 (float64 for float64 inputs).

    Raises:
        TypeError: a non-tensor, non-floating image, or a bad ``init``.
        ValueError: mismatched sizes or batches, images smaller than 8×8,
            NaN/Inf pixels, or an image that is constant over the central disc.

    Example:
        >>> from rotstn.data import rotated_pairs
        >>> pairs = rotated_pairs(4, (64, 96), seed=0)
        >>> result = register(pairs.fixed, pairs.moving)
        >>> bool((result.angle - pairs.angle).abs().max() < math.radians(0.1))
        True
        >>> result.aligned.shape
        torch.Size([4, 1, 64, 96])
    """
    f, m = _check_pair(fixed, moving)
    init_window = _check_nonneg(init_window, "init_window")
    smooth = _check_nonneg(smooth, "smooth")
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    b = max(f.shape[0], m.shape[0])
    h, w = f.shape[-2:]
    dtype = torch.promote_types(torch.promote_types(f.dtype, m.dtype), torch.float32)
    with torch.no_grad():
        guess = None if init is None else _run_init(init, f, m, b, dtype)
        fg = f.to(dtype).mean(1, keepdim=True).expand(b, 1, h, w)
        mg = m.to(dtype).mean(1, keepdim=True).expand(b, 1, h, w)
        disc = _Disc(h, w, dtype, f.device)
        _check_not_flat(fg, disc, "fixed")
        _check_not_flat(mg, disc, "moving")
        fs, ms = _blur(fg, smooth), _blur(mg, smooth)
        angle, spacing = _global_search(fs, ms, disc.radius, guess, init_window)
        angle = _gauss_newton(fs, ms, angle, disc, iterations, reach=2 * spacing)
        angle = wrap_angle(angle)
        score = _ncc(disc.take(fg), disc.sample(mg, angle))
        aligned = rotate(m.expand(b, *m.shape[1:]), angle)
    return Registration(angle, score, aligned)


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


def _blur(image: Tensor, sigma: float) -> Tensor:
    if sigma == 0:
        return image
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    # Separable, with replicated borders: the disc stays clear of most of
    # what the border handling invents.
    out = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


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


def _check_image(x: object, name: str) -> Tensor:
    x = _validate.image(x, name)
    h, w = x.shape[-2:]
    if min(h, w) < MIN_SIZE:
        raise ValueError(f"{name} must be at least {MIN_SIZE}×{MIN_SIZE} pixels, got H={h}, W={w}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        shape = _validate.shape_str(x)
        raise ValueError(f"{name} must have at least one sample and one channel, got {shape}")
    bad = ~torch.isfinite(x).flatten(1).all(1)
    if bool(bad.any()):
        raise ValueError(f"{name} contains NaN or Inf pixels (sample(s) {_indices(bad)})")
    return x


def _check_pair(fixed: object, moving: object) -> tuple[Tensor, Tensor]:
    f, m = _check_image(fixed, "fixed"), _check_image(moving, "moving")
    if f.shape[-2:] != m.shape[-2:]:
        raise ValueError(
            "fixed and moving must have the same height and width, got fixed "
            f"{_validate.shape_str(f)} and moving {_validate.shape_str(m)}"
        )
    if f.device != m.device:
        raise ValueError(f"fixed is on {f.device} but moving is on {m.device}; put both on one device")
    _validate.batch_size({"fixed": f.shape[0], "moving": m.shape[0]})
    return f, m


def _check_nonneg(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_not_flat(gray: Tensor, disc: _Disc, name: str) -> None:
    values = disc.take(gray)
    spread = values.amax(-1) - values.amin(-1)
    scale = values.abs().amax(-1).clamp_min(1.0)
    flat = spread <= 1e-6 * scale
    if bool(flat.any()):
        raise ValueError(
            f"{name} is constant over its central disc (sample(s) {_indices(flat)}): "
            "there is nothing to register"
        )


def _indices(mask: Tensor) -> str:
    idx = mask.nonzero().flatten().tolist()
    return ", ".join(map(str, idx[:10])) + (", ..." if len(idx) > 10 else "")


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
