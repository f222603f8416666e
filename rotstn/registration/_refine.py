"""Refinement and scoring of the rigid model: Gauss–Newton on (θ, tx, ty) over the overlap.

The model: fixed pixel p shows moving at ``q = W(p) = c_m + A(θ)(p - c_f - t)``
(:mod:`rotstn.functional`, "rigid map"), up to a gain and an offset of the
intensities. Each step solves the linear least-squares problem

    min over δθ, δt, a, b of  Σ_p w(p) (a·F(R_δ(p)) + b - G(W(p)))²,

with ``F(R_δ(p))`` linearised, where ``R_δ`` is a small rigid motion of the
*fixed* image (rotation δθ about its centre, shift δt) and ``w`` keeps the
fixed pixels whose ``q`` lies inside moving (and both masks): the overlap,
recomputed at every step. Then ``W ← W ∘ R_δ⁻¹``. This is the inverse
compositional form of Gauss–Newton (Baker & Matthews 2004): the Jacobian
comes from the fixed image's gradient and is computed once per level, so a
step costs one bilinear sampling of moving (and where it has content) at
the points and two small reductions. With the best gain and offset the sum
is ``(1 - NCC²)·var(G)`` over the overlap, so the method maximises the
masked normalised cross-correlation. It runs from the search level to full
resolution, each level starting where the coarser one stopped, on a regular
subset of at most ``max_points`` fixed pixels per level (very large images
cost no more than moderate ones).

The score of a result is the NCC over the overlap at full resolution,
scaled down when the overlap is small (:func:`score`).

References:
    S. Baker, I. Matthews, "Lucas-Kanade 20 years on: a unifying framework",
    International Journal of Computer Vision 56(3), 2004.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._images import Level, centre


class _Points:
    """A regular subset of a level's fixed pixels: coordinates (N,), values and weights (B, N)."""

    def __init__(self, level: Level, max_points: int, gradient: bool = False) -> None:
        img, mask = level.image, level.mask
        h, w = img.shape[-2:]
        self.stride = max(1, math.ceil(math.sqrt(h * w / max_points)))
        rows = torch.arange((h - 1) % self.stride // 2, h, self.stride, device=img.device)
        cols = torch.arange((w - 1) % self.stride // 2, w, self.stride, device=img.device)
        self.y = rows.to(img.dtype).view(-1, 1).expand(-1, cols.numel()).reshape(-1)
        self.x = cols.to(img.dtype).view(1, -1).expand(rows.numel(), -1).reshape(-1)

        def take(plane: Tensor) -> Tensor:
            return plane[:, rows][:, :, cols].flatten(1)

        self.values = take(img[:, 0])
        self.weight = torch.ones_like(self.values) if mask is None else (take(mask[:, 0]) > 0.999).to(img.dtype)
        if gradient:
            gy, gx = torch.gradient(img[:, 0], dim=(-2, -1))
            self.gx, self.gy = take(gx), take(gy)


def _content(level: Level) -> Tensor:
    """(B, 2, h, w): the moving image and where it has content."""
    g = level.image
    return torch.cat((g, torch.ones_like(g) if level.mask is None else (level.mask > 0.999).to(g.dtype)), 1)


def _sample(channels: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
    """Bilinear samples (B, C, M, N) of ``channels`` at level pixels (qx, qy), each (B, M, N); zeros outside."""
    h, w = channels.shape[-2:]
    grid = torch.stack(((2 * qx + 1) / w - 1, (2 * qy + 1) / h - 1), -1)
    return F.grid_sample(channels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class _Frame:
    """Where fixed points land in moving on one level, for given (θ, t)."""

    def __init__(self, size: tuple[int, int], moving_size: tuple[int, int], scale: int, like: Tensor) -> None:
        self.c_f = centre(*size, scale, like)
        self.c_m = centre(*moving_size, scale, like)
        self.scale = scale

    def project(self, pts: _Points, angle: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(qx, qy), each (B, M, N), for (B, M) angles and (B, M, 2) translations in level-0 pixels."""
        cos, sin = torch.cos(angle).unsqueeze(-1), torch.sin(angle).unsqueeze(-1)
        u = pts.x - self.c_f[0, 0] - t[..., 0:1] / self.scale
        v = pts.y - self.c_f[0, 1] - t[..., 1:2] / self.scale
        return self.c_m[0, 0] + cos * u - sin * v, self.c_m[0, 1] + sin * u + cos * v


def refine(
    fixed: list[Level],
    moving: list[Level],
    size: tuple[int, int],
    moving_size: tuple[int, int],
    angle: Tensor,
    translation: Tensor,
    iterations: int,
    max_points: int,
) -> tuple[Tensor, Tensor]:
    """Refine (B,) angles and (B, 2) translations (level-0 pixels) from the coarsest given level to level 0."""
    angle, t = angle.clone(), translation.clone()
    for lf, lm in zip(reversed(fixed), reversed(moving), strict=True):
        if iterations == 0:
            break
        pts = _Points(lf, max_points, gradient=True)
        channels = _content(lm)
        frame = _Frame(size, moving_size, lf.scale, angle)
        radius = max(math.hypot(*lf.image.shape[-2:]) / 2, 1.0)
        # ∂F(R_δ(p))/∂(δθ, δtx, δty) at δ = 0, with δt in level pixels: rotation about c_f is (-v, u).
        u, v = pts.x - frame.c_f[0, 0], pts.y - frame.c_f[0, 1]
        jac = torch.stack((-v * pts.gx + u * pts.gy, pts.gx, pts.gy, pts.values, torch.ones_like(pts.values)), -1)
        for _ in range(iterations):
            qx, qy = frame.project(pts, angle.unsqueeze(1), t.unsqueeze(1))
            g, inside = _sample(channels, qx, qy)[:, :, 0].unbind(1)
            w = pts.weight * (inside > 0.999)
            jw = jac * w.unsqueeze(-1)
            hess = jw.transpose(1, 2) @ jac
            rhs = (jw * g.unsqueeze(-1)).sum(1)
            hess = hess + torch.diag_embed(hess.diagonal(dim1=1, dim2=2) * 1e-6 + 1e-12)
            x = torch.linalg.solve(hess, rhs)
            # x = (a·δθ, a·δtx, a·δty, a, b): the model a·F + b ≈ G(W) is linear in it.
            gain = x[:, 3:4]
            delta = x[:, :3] / torch.where(gain.abs() > 1e-12, gain, torch.ones_like(gain))
            # A step never moves a point more than a pixel of this level: the linearisation holds about that far.
            reach = delta[:, 0].abs() * radius + delta[:, 1:3].norm(dim=1)
            shrink = 1.0 / reach.clamp_min(1.0)
            usable = (w.sum(1) >= 16) & torch.isfinite(delta).all(1) & (gain[:, 0] > 0)
            delta = torch.where(usable.unsqueeze(1), delta * shrink.unsqueeze(1), torch.zeros_like(delta))
            # W ← W ∘ R_δ⁻¹: θ - δθ, and t ← δt + A(δθ)·t (in level pixels).
            cos, sin = torch.cos(delta[:, 0]), torch.sin(delta[:, 0])
            tl = t / lf.scale
            t = torch.stack(
                (delta[:, 1] + cos * tl[:, 0] - sin * tl[:, 1], delta[:, 2] + sin * tl[:, 0] + cos * tl[:, 1]), -1
            ) * lf.scale
            angle = angle - delta[:, 0]
            # Coarse levels only need to hand the next one a start well inside its reach.
            moved = torch.where(usable, reach * shrink, torch.zeros_like(reach))
            if float(moved.max()) < (1e-3 if lf.scale == 1 else 2e-2):
                break
    return angle, t


def _ncc_over_overlap(
    pts: _Points, channels: Tensor, frame: _Frame, angle: Tensor, t: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """NCC over the overlap, overlap and the smaller image's size (in points), each (B, M), for (B, M) hypotheses."""
    qx, qy = frame.project(pts, angle, t)
    g, inside = _sample(channels, qx, qy).unbind(1)
    w = pts.weight.unsqueeze(1) * (inside > 0.999)
    n = w.sum(-1)
    f = pts.values.unsqueeze(1)
    mean_f = (w * f).sum(-1, keepdim=True) / n.clamp_min(1).unsqueeze(-1)
    mean_g = (w * g).sum(-1, keepdim=True) / n.clamp_min(1).unsqueeze(-1)
    df, dg = f - mean_f, g - mean_g
    cov = (w * df * dg).sum(-1)
    var = (w * df.square()).sum(-1) * (w * dg.square()).sum(-1)
    ncc = torch.where((var > 0) & (n >= 16), cov / var.clamp_min(1e-30).sqrt(), torch.zeros_like(cov))
    area = torch.minimum(pts.weight.sum(1), channels[:, 1].sum((-2, -1)) / pts.stride**2).clamp_min(1)
    return ncc, n, area.unsqueeze(1)


def significance(
    fixed: Level,
    moving: Level,
    size: tuple[int, int],
    moving_size: tuple[int, int],
    angle: Tensor,
    translation: Tensor,
    max_points: int,
    min_overlap: float,
) -> Tensor:
    """(B, M) Fisher z of the overlap NCC times √overlap, for (B, M) angles and (B, M, 2) translations.

    Hypotheses overlapping less than ``min_overlap`` of the smaller image get -inf.
    """
    pts = _Points(fixed, max_points)
    frame = _Frame(size, moving_size, fixed.scale, angle)
    ncc, n, area = _ncc_over_overlap(pts, _content(moving), frame, angle, translation)
    z = torch.atanh(ncc.clamp(-0.999, 0.999)) * (n / area).sqrt()
    return torch.where(n >= min_overlap * area, z, torch.full_like(z, -math.inf))


def score(
    fixed: Level,
    moving: Level,
    size: tuple[int, int],
    moving_size: tuple[int, int],
    angle: Tensor,
    translation: Tensor,
    max_points: int,
    min_overlap: float,
) -> tuple[Tensor, Tensor]:
    """(B,) trust score in [0, 1] and (B,) overlap fraction of a result, on one level.

    The score is the NCC of the two images over their overlap (negative
    correlations count as 0), times ``min(1, overlap / (2·min_overlap))``:
    an agreement seen on only a sliver of the images is not trusted as much
    as one seen on a large part. The overlap is the fraction of the smaller
    image's (masked) pixels that the other one covers.
    """
    pts = _Points(fixed, max_points)
    frame = _Frame(size, moving_size, fixed.scale, angle)
    ncc, n, area = _ncc_over_overlap(pts, _content(moving), frame, angle.unsqueeze(1), translation.unsqueeze(1))
    overlap = (n / area).clamp(0, 1)[:, 0]
    trust = ncc[:, 0].clamp_min(0) * (overlap / (2 * min_overlap)).clamp(max=1.0)
    return trust, overlap
