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

Where it runs: on real CPU tensors, when the compiled library could be
built (:mod:`rotstn._kernels.compiled`), a level's whole loop, every pair's
steps until it stops, is one call into ``rotstn/_kernels/register_cpu.c``
(``rotstn_refine``), and the overlap NCC of any number of hypotheses another
(``rotstn_overlap_sums``). Elsewhere (CUDA, no C compiler) the same steps run
as torch ops on the whole batch; tests hold the two to the same answers.

References:
    S. Baker, I. Matthews, "Lucas-Kanade 20 years on: a unifying framework",
    International Journal of Computer Vision 56(3), 2004.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._kernels import compiled
from .._kernels.cpu import _real_cpu
from ._images import Level, centre

# Localisation (smallest over largest eigenvalue) under which a result is not pinned down: 1 % of the
# right results on benchmarks/registration.py's sets fall below 0.02, results sliding along one
# dominant edge or rim below 0.01.
LOCALISED = 0.01
# _spread groups the points into CLUSTERS × CLUSTERS blocks, within which residuals may be correlated.
CLUSTERS = 8
# Textured blocks a result must agree in to be trusted fully: a wrong result that lines up one structure
# (a crater, the rim of a round field of view) rests on one or two (examples/register.py).
MIN_BLOCKS = 3
# Longest step of refine(), in pixels of the level: a step first moves no point more than one pixel (the
# linearisation holds that far); each step that is cut to the limit and points the way the one before it
# did doubles it, up to REACH (a start 30 px off on one level crawled a pixel a step and ran out of
# iterations short of the optimum); any other step sets it back to one pixel.
REACH = 8.0


class _Points:
    """A regular subset of a level's fixed pixels: coordinates (N,), values and weights (B, N)."""

    def __init__(self, level: Level, max_points: int, gradient: bool = False) -> None:
        img, mask = level.image, level.mask
        h, w = img.shape[-2:]
        self.stride = max(1, math.ceil(math.sqrt(h * w / max_points)))
        rows = torch.arange((h - 1) % self.stride // 2, h, self.stride, device=img.device)
        cols = torch.arange((w - 1) % self.stride // 2, w, self.stride, device=img.device)
        self.shape = (rows.numel(), cols.numel())
        self.y = rows.to(img.dtype).view(-1, 1).expand(-1, cols.numel()).reshape(-1)
        self.x = cols.to(img.dtype).view(1, -1).expand(rows.numel(), -1).reshape(-1)
        self.homogeneous = torch.stack((self.x, self.y, torch.ones_like(self.x)))  # (3, N)

        r0, c0, nr, nc, s = int(rows[0]), int(cols[0]), rows.numel(), cols.numel(), self.stride

        def take(plane: Tensor, dr: int = 0, dc: int = 0) -> Tensor:
            # ``plane`` is padded by one pixel on every side: the points are a strided slice.
            r, c = r0 + 1 + dr, c0 + 1 + dc
            return plane[:, r : r + (nr - 1) * s + 1 : s, c : c + (nc - 1) * s + 1 : s].reshape(
                plane.shape[0], -1
            )

        # Points within a pixel of the frame count only without a margin; there the difference is one-sided.
        edge = "replicate" if gradient and level.margin < 1 else "constant"
        padded = F.pad(img, (1, 1, 1, 1), mode=edge)[:, 0]
        self.values = take(padded)
        weight = level.inside(self.x, self.y).to(img.dtype).expand_as(self.values)
        self.weight = weight if mask is None else weight * (take(F.pad(mask[:, 0], (1, 1, 1, 1))) > 0.999)
        if gradient:
            # Central differences at the points only (one-sided at the frame, where points carry no weight).
            self.gx = (take(padded, dc=1) - take(padded, dc=-1)) / 2
            self.gy = (take(padded, dr=1) - take(padded, dr=-1)) / 2

    def select(self, rows: Tensor) -> _Points:
        """The points of a subset of the batch (an index tensor); a batch of one is shared by all."""
        out = copy.copy(self)
        for name in ("values", "weight", "gx", "gy", "jt"):
            value = getattr(self, name, None)
            if value is not None and value.shape[0] > 1:
                setattr(out, name, value[rows])
        return out


def _overlap(pts: _Points, moving: Level, frame: _Frame, angle: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Moving's values at the fixed points and the points' weights in the overlap, each (B, M, N).

    For (B, M) angles and (B, M, 2) translations (level-0 pixels). A point counts
    where its bilinear sample reads only compared pixels of moving (inside the
    frame less the margin, and inside moving's mask) and the point itself counts.
    """
    h, w = moving.image.shape[-2:]
    grid = frame.grid(pts, angle, t, (h, w))
    planes = moving.image if moving.mask is None else torch.cat((moving.image, moving.mask), 1)
    out = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = moving.inside_grid(grid)
    if moving.mask is not None:
        inside = inside & (out[:, 1] > 0.999)
    return out[:, 0], pts.weight.unsqueeze(1) * inside


def _smaller_area(pts: _Points, moving: Level) -> Tensor:
    """(B, 1) compared pixels of the smaller image, in points of the fixed level's stride."""
    return torch.minimum(pts.weight.sum(1), moving.area() / pts.stride**2).clamp_min(1).unsqueeze(1)


def _moments(f: Tensor, g: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weighted count, covariance and the two variances (sums, not means) along the last dimension."""
    n = w.sum(-1)
    mean_f = (w * f).sum(-1, keepdim=True) / n.clamp_min(1).unsqueeze(-1)
    mean_g = (w * g).sum(-1, keepdim=True) / n.clamp_min(1).unsqueeze(-1)
    df, dg = f - mean_f, g - mean_g
    return n, (w * df * dg).sum(-1), (w * df.square()).sum(-1), (w * dg.square()).sum(-1)


# The sums of _overlap_sums for k point terms J: Σ w·J_i·J_j (i <= j, row-major), Σ w·J_i·g, Σ w·g².
def _upper(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i, k)]


# Where each entry of the 5×5 normal matrix sits among the 21 sums of a Gauss–Newton step.
_NORMAL = torch.tensor(
    [[_upper(5).index((min(i, j), max(i, j))) for j in range(5)] for i in range(5)]
).flatten()


def _overlap_sums(
    pts: _Points, moving: Level, frame: _Frame, angle: Tensor, t: Tensor, terms: tuple[Tensor, ...] | None
) -> Tensor:
    """(B, M, K) float64 sums over the overlap for (B, M) angles and (B, M, 2) translations.

    With the point terms J = (jθ, gx, gy, f, 1) (``terms`` the first three, each (B or 1, N)) the
    K = 21 sums of a Gauss–Newton step; without, J = (f, 1) and K = 6 moments (Σwf², Σwf, Σw,
    Σwfg, Σwg, Σwg²). Layout and meaning: ``rotstn/_kernels/register_cpu.c``, which computes
    them on real CPU tensors when the compiled library is there; torch ops otherwise.
    """
    if _kernel_serves(pts, moving, angle, terms):
        return _overlap_sums_kernel(pts, moving, frame, angle, t, terms)
    return _overlap_sums_torch(pts, moving, frame, angle, t, terms)


def _kernel_serves(pts: _Points, moving: Level, angle: Tensor, terms: tuple[Tensor, ...] | None) -> bool:
    tensors = [pts.x, pts.values, pts.weight, moving.image, angle, *(terms or ())]
    tensors += [] if moving.mask is None else [moving.mask]
    return (
        angle.dtype in (torch.float32, torch.float64)
        and all(_real_cpu(x) and x.dtype == angle.dtype for x in tensors)
        and min(moving.image.shape[-2:]) >= 2
        and (moving.image.shape[-2] + 1) * (moving.image.shape[-1] + 1) < 2**31  # int32 pixel offsets
        and compiled.library() is not None
    )


def _batch(arrays: list[Tensor], b: int) -> tuple[list[Tensor], int]:
    """Arrays of one batch layout for the kernel, and their batch stride in elements.

    One row each (stride 0) when every array holds one sample for the whole batch; else all of
    them expanded to ``b`` contiguous rows (a no-op for arrays that already are).
    """
    if all(x.shape[0] == 1 or x.stride(0) == 0 for x in arrays):
        return [x[:1].contiguous() for x in arrays], 0
    arrays = [x.expand(b, *x.shape[1:]).contiguous() for x in arrays]
    return arrays, arrays[0][0].numel()


def _kernel_args(pts: _Points, moving: Level, fixed: list[Tensor], b: int) -> tuple[list, list[Tensor]]:
    """The arguments both C entry points begin with, and the tensors they point into (kept alive).

    The points, up to five per-point arrays of the fixed side (values, weights, then jθ, gx, gy or
    none) with their batch stride, and the moving level (image, mask or none, batch stride, size,
    margin): ``register_cpu.c``'s ``x, y, n, f, pw, jt, gx, gy, fixed_bstride, img, mask,
    moving_bstride, H, W, margin``.
    """
    fixed, f_stride = _batch(fixed, b)
    planes, m_stride = _batch([moving.image] + ([] if moving.mask is None else [moving.mask]), b)
    x, y = pts.x.contiguous(), pts.y.contiguous()
    h, w = moving.image.shape[-2:]
    args = [
        x.data_ptr(),
        y.data_ptr(),
        x.numel(),
        *(a.data_ptr() for a in fixed),
        *[None] * (5 - len(fixed)),
        f_stride,
        planes[0].data_ptr(),
        planes[1].data_ptr() if len(planes) > 1 else None,
        m_stride,
        h,
        w,
        float(moving.margin),
    ]
    return args, [x, y, *fixed, *planes]


def _overlap_sums_kernel(
    pts: _Points, moving: Level, frame: _Frame, angle: Tensor, t: Tensor, terms: tuple[Tensor, ...] | None
) -> Tensor:
    b, m = angle.shape
    args, _alive = _kernel_args(pts, moving, [pts.values, pts.weight, *(terms or ())], b)
    affine = frame.affine(angle.double(), t.double()).reshape(b * m, 6).contiguous()
    k = 6 if terms is None else 21
    out = torch.empty(b * m, k, dtype=torch.float64)
    lib = compiled.library()
    fn = lib.rotstn_overlap_sums_f32 if angle.dtype == torch.float32 else lib.rotstn_overlap_sums_f64
    rc = fn(*args, affine.data_ptr(), b * m, m, out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        h, w = moving.image.shape[-2:]
        raise RuntimeError(f"rotstn_overlap_sums failed ({rc}) on a moving level of {h}×{w}")
    return out.view(b, m, k)


def _refine_kernel(
    pts: _Points,
    moving: Level,
    frame: _Frame,
    angle: Tensor,
    t: Tensor,
    radius: float,
    tolerance: float,
    iterations: int,
) -> tuple[Tensor, Tensor]:
    """One level of :func:`refine` in C (``rotstn_refine`` in ``register_cpu.c``): every pair's whole loop."""
    b = angle.shape[0]
    args, _alive = _kernel_args(pts, moving, [pts.values, pts.weight, pts.jt, pts.gx, pts.gy], b)
    a, tr = angle.to(torch.float64).contiguous(), t.to(torch.float64).contiguous()
    consts = torch.tensor(
        [
            float(frame.c_f[0, 0]),
            float(frame.c_f[0, 1]),
            float(frame.c_m[0, 0]),
            float(frame.c_m[0, 1]),
            frame.scale,
            REACH,
        ],
        dtype=torch.float64,
    )
    lib = compiled.library()
    fn = lib.rotstn_refine_f32 if angle.dtype == torch.float32 else lib.rotstn_refine_f64
    rc = fn(
        *args,
        consts.data_ptr(),
        radius,
        tolerance,
        iterations,
        a.data_ptr(),
        tr.data_ptr(),
        b,
        torch.get_num_threads(),
    )
    if rc != 0:
        h, w = moving.image.shape[-2:]
        raise RuntimeError(f"rotstn_refine failed ({rc}) on a moving level of {h}×{w}")
    return a.to(angle.dtype), tr.to(t.dtype)


def _overlap_sums_torch(
    pts: _Points, moving: Level, frame: _Frame, angle: Tensor, t: Tensor, terms: tuple[Tensor, ...] | None
) -> Tensor:
    g, w = (x.double() for x in _overlap(pts, moving, frame, angle, t))  # (B, M, N)
    f = pts.values.double().unsqueeze(1)
    parts = [f, torch.ones_like(f)]
    if terms is not None:
        parts = [*(x.double().unsqueeze(1) for x in terms), *parts]
    jac = torch.stack(parts, 2)  # (B or 1, 1, k, N)
    jw = jac * w.unsqueeze(2)
    normal = jw @ jac.transpose(-1, -2)
    k = jac.shape[2]
    i, j = zip(*_upper(k), strict=True)
    rhs = (jw @ g.unsqueeze(-1))[..., 0]
    return torch.cat((normal[..., list(i), list(j)], rhs, (w * g.square()).sum(-1, keepdim=True)), -1)


class _Frame:
    """Where fixed points land in moving on one level, for given (θ, t)."""

    def __init__(self, size: tuple[int, int], moving_size: tuple[int, int], scale: int, like: Tensor) -> None:
        self.c_f = centre(*size, scale, like)
        self.c_m = centre(*moving_size, scale, like)
        self.scale = scale

    def affine(self, angle: Tensor, t: Tensor) -> Tensor:
        """(B, M, 6) map into the moving level: level pixel ``q = (a0·x + a1·y + a2, a3·x + a4·y + a5)``.

        For (B, M) angles and (B, M, 2) translations in level-0 pixels:
        ``q = c_m + A(p - c_f - t/scale)`` for fixed level pixel ``p = (x, y)``.
        """
        cos, sin = torch.cos(angle), torch.sin(angle)
        ox = self.c_f[0, 0] + t[..., 0] / self.scale
        oy = self.c_f[0, 1] + t[..., 1] / self.scale
        qx0 = self.c_m[0, 0] - cos * ox + sin * oy
        qy0 = self.c_m[0, 1] - sin * ox - cos * oy
        return torch.stack((cos, -sin, qx0, sin, cos, qy0), -1)

    def grid(self, pts: _Points, angle: Tensor, t: Tensor, shape: tuple[int, int]) -> Tensor:
        """(B, M, N, 2) grid_sample coordinates in a moving level of ``shape`` of the points.

        :meth:`affine`, normalised as ``(2q + 1)/side - 1``: one matrix product for all points.
        """
        h, w = shape
        scale = angle.new_tensor([[2 / w], [2 / h]])
        offset = angle.new_tensor([[0.0, 0.0, 1 / w - 1], [0.0, 0.0, 1 / h - 1]])
        affine = self.affine(angle, t).unflatten(-1, (2, 3)) * scale + offset  # (B, M, 2, 3)
        return (affine @ pts.homogeneous).transpose(-1, -2).contiguous()


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
    """Refine (B,) angles and (B, 2) translations (level-0 pixels) coarse to fine.

    On each level a pair is done once its step moves no point by more than
    ``1e-3`` pixels (``2e-2`` on coarser levels, which only hand the next one a
    start) and then stays where it is: a pair's result does not depend on the
    others in the batch. The pairs still moving go on as a smaller batch. A step
    moves no point further than a limit that starts at one pixel of the level and
    doubles, up to ``REACH``, while the steps keep being cut to it in one direction.
    """
    angle, t = angle.clone(), translation.clone()
    for lf, lm in zip(reversed(fixed), reversed(moving), strict=True):
        if iterations == 0:
            break
        pts = _Points(lf, max_points, gradient=True)
        frame = _Frame(size, moving_size, lf.scale, angle)
        radius = max(math.hypot(*lf.image.shape[-2:]) / 2, 1.0)
        tolerance = 1e-3 if lf.scale == 1 else 2e-2
        # ∂F(R_δ(p))/∂(δθ, δtx, δty) at δ = 0, with δt in level pixels: rotation about c_f is (-v, u);
        # then the gain and offset of the intensity model.
        u, v = pts.x - frame.c_f[0, 0], pts.y - frame.c_f[0, 1]
        pts.jt = -v * pts.gx + u * pts.gy
        if _kernel_serves(pts, lm, angle, (pts.jt,)):
            angle, t = _refine_kernel(pts, lm, frame, angle, t, radius, tolerance, iterations)
            continue
        rows = torch.arange(angle.shape[0], device=angle.device)
        live = torch.ones_like(rows, dtype=torch.bool)  # a finished pair stays where it is
        previous = torch.zeros_like(t[:, :1].expand(-1, 3))
        limit = torch.ones_like(t[:, 0])
        for _ in range(iterations):
            a, tr = angle[rows], t[rows]
            tl = tr / lf.scale
            sums = _overlap_sums(pts, lm, frame, a.unsqueeze(1), tr.unsqueeze(1), (pts.jt, pts.gx, pts.gy))[
                :, 0
            ]
            hess = sums[:, _NORMAL.to(sums.device)].view(-1, 5, 5)
            hess = hess + torch.diag_embed(hess.diagonal(dim1=1, dim2=2) * 1e-6 + 1e-12)
            x = torch.linalg.solve(hess, sums[:, 15:20]).to(angle.dtype)
            # x = (a·δθ, a·δtx, a·δty, a, b): the model a·F + b ≈ G(W) is linear in it.
            gain = x[:, 3:4]
            delta = x[:, :3] / torch.where(gain.abs() > 1e-12, gain, torch.ones_like(gain))
            usable = (sums[:, 14] >= 16) & torch.isfinite(delta).all(1) & (gain[:, 0] > 0) & live
            delta = torch.where(usable.unsqueeze(1), delta, torch.zeros_like(delta))
            # Where noise or a weakly constrained direction shortens every step by the same ratio r, the
            # steps form a geometric series: take its sum, δ/(1 - r) (Aitken's extrapolation).
            moves = delta * delta.new_tensor([radius, 1.0, 1.0])
            dot = (moves * previous).sum(1)
            ratio = dot / previous.square().sum(1).clamp_min(1e-30)
            aligned = dot > 0.9 * moves.norm(dim=1) * previous.norm(dim=1)
            boost = torch.where(
                aligned & (ratio > 0.3) & (ratio < 0.9), 1 / (1 - ratio), torch.ones_like(ratio)
            )
            # Steps that neither shrink nor grow crawl along a long, shallow slope: take two at once.
            boost = torch.where(aligned & (ratio >= 0.9) & (ratio < 1.25), torch.full_like(ratio, 2.0), boost)
            previous = moves
            delta = delta * boost.unsqueeze(1)
            # A step moves no point more than `limit` pixels of this level (REACH).
            reach = delta[:, 0].abs() * radius + delta[:, 1:3].norm(dim=1)
            shrink = limit / torch.maximum(reach, limit)
            delta = delta * shrink.unsqueeze(1)
            longer = aligned & (reach > limit)
            limit = torch.where(longer, (2 * limit).clamp(max=REACH), torch.ones_like(limit))
            # W ← W ∘ R_δ⁻¹: θ - δθ, and t ← δt + A(δθ)·t (in level pixels).
            cos, sin = torch.cos(delta[:, 0]), torch.sin(delta[:, 0])
            t[rows] = (
                torch.stack(
                    (
                        delta[:, 1] + cos * tl[:, 0] - sin * tl[:, 1],
                        delta[:, 2] + sin * tl[:, 0] + cos * tl[:, 1],
                    ),
                    -1,
                )
                * lf.scale
            )
            angle[rows] = a - delta[:, 0]
            live = live & (reach * shrink >= tolerance)
            if not bool(live.any()):
                break
            # Pairs that are done leave the batch once they are half of it (each copy costs a step).
            if 2 * int(live.sum()) <= live.numel():
                keep = live.nonzero()[:, 0]
                rows, previous, live, limit = rows[keep], previous[keep], live[keep], limit[keep]
                pts, lm = pts.select(keep), lm.select(keep)
    return angle, t


def _ncc_over_overlap(
    pts: _Points, moving: Level, frame: _Frame, angle: Tensor, t: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """NCC over the overlap, overlap and smaller image size (points), each (B, M), for (B, M) hypotheses."""
    sff, sf, n, sfg, sg, sgg = _overlap_sums(pts, moving, frame, angle, t, None).unbind(-1)
    mean_f, mean_g = sf / n.clamp_min(1), sg / n.clamp_min(1)
    cov, var_f, var_g = sfg - mean_f * sg, sff - mean_f * sf, sgg - mean_g * sg
    var = var_f * var_g
    ncc = torch.where((var > 0) & (n >= 16), cov / var.clamp_min(1e-30).sqrt(), torch.zeros_like(cov))
    return ncc.to(angle.dtype), n.to(angle.dtype), _smaller_area(pts, moving)


def significance(
    fixed: Level,
    moving: Level,
    size: tuple[int, int],
    moving_size: tuple[int, int],
    angle: Tensor,
    translation: Tensor,
    max_points: int,
    min_overlap: float,
    with_ncc: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """(B, M) Fisher z of the overlap NCC times √overlap, for (B, M) angles and (B, M, 2) translations.

    Hypotheses overlapping less than ``min_overlap`` of the smaller image get -inf. With
    ``with_ncc``, also the (B, M) NCC itself (-inf where z is): z saturates at NCC 0.999, where
    only the NCC still tells two close alignments of a clean pair apart.
    """
    pts = _Points(fixed, max_points)
    frame = _Frame(size, moving_size, fixed.scale, angle)
    ncc, n, area = _ncc_over_overlap(pts, moving, frame, angle, translation)
    z = torch.atanh(ncc.clamp(-0.999, 0.999)) * (n / area).sqrt()
    enough = n >= min_overlap * area
    z = torch.where(enough, z, torch.full_like(z, -math.inf))
    if with_ncc:
        return z, torch.where(enough, ncc, torch.full_like(ncc, -math.inf))
    return z


def _block_ncc(pts: _Points, g: Tensor, w: Tensor, blocks: int, noise: tuple[Tensor, Tensor]) -> Tensor:
    """(B, blocks²) NCC of fixed and moving in a grid of blocks over the points; NaN where not measurable.

    A block counts when at least half of it lies in the overlap and both
    images vary there well above their noise (a flat block says nothing
    either way). Each NCC is corrected for the noise (divided by the square
    root of both sides' signal fraction, Spearman's disattenuation), so that
    a right result on a noisy pair scores as high as on a clean one.
    """
    b = g.shape[0]
    nr, nc = pts.shape
    br, bc = max(nr // blocks, 1), max(nc // blocks, 1)
    rr, cc = min(blocks, nr), min(blocks, nc)

    def grid(x: Tensor) -> Tensor:
        return (
            x.reshape(b, nr, nc)[:, : rr * br, : cc * bc]
            .reshape(b, rr, br, cc, bc)
            .transpose(2, 3)
            .flatten(3)
        )

    n, cov, var_f, var_g = _moments(grid(pts.values.expand(b, -1)), grid(g), grid(w))
    ncc = cov / (var_f * var_g).clamp_min(1e-30).sqrt()
    noise_f, noise_g = (v.view(-1, 1, 1) * n for v in noise)
    # "Flat": a block whose variance is mostly noise (or less than a thousandth of the image's).
    total = (pts.weight * (pts.values - pts.values.mean(1, keepdim=True)).square()).sum(1) / pts.weight.sum(
        1
    ).clamp_min(1)
    textured = (var_f > 4 * noise_f) & (var_g > 4 * noise_g) & (var_f > 1e-3 * total.view(b, 1, 1) * n)
    reliability = ((1 - noise_f / var_f.clamp_min(1e-30)) * (1 - noise_g / var_g.clamp_min(1e-30))).clamp_min(
        0.25
    )
    ncc = (ncc / reliability.sqrt()).clamp(max=1.0)
    usable = (n >= 0.5 * br * bc) & textured
    return torch.where(usable, ncc, torch.full_like(ncc, math.nan)).flatten(1)


def gradient_share(blur: float) -> float:
    """The share of blurred white noise's variance (``blur`` px Gaussian) that a central difference keeps.

    Blurred white noise is correlated ``exp(-d²/4σ²)`` at a distance ``d``, so a central difference
    (half the step over two pixels) keeps ``(1 - exp(-1/σ²)) / 2``: 0.5 unblurred, 0.32 at σ = 1,
    0.11 at σ = 2 (measured on blurred noise: 0.49 at σ = 0.5, 0.32, 0.11).
    """
    return 0.5 if blur <= 0 else (1 - math.exp(-1 / blur**2)) / 2


def _localisation(pts: _Points, frame: _Frame, w: Tensor, noise: Tensor, share: float) -> Tensor:
    """(B,) how well the overlap pins down all three motions, in [0, 1].

    The smallest over the largest eigenvalue of the Gauss–Newton matrix of
    (rotation about fixed's centre, as pixels at the overlap's mean radius,
    tx, ty), after taking out what the (B,) ``noise`` variance alone puts
    there. Near 0 when one motion leaves the overlap unchanged: a straight
    edge slides along itself, a circular rim (a round field of view) turns
    about its centre. Such a result is not pinned down, however well the
    images agree.
    """
    u, v = pts.x - frame.c_f[0, 0], pts.y - frame.c_f[0, 1]
    n = w.sum(1, keepdim=True).clamp_min(1)
    radius = ((w * (u.square() + v.square())).sum(1, keepdim=True) / n).sqrt().clamp_min(1)
    jac = torch.stack(((-v * pts.gx + u * pts.gy) / radius, pts.gx, pts.gy), 1)
    hess = (jac * w.unsqueeze(1)) @ jac.transpose(1, 2)
    eig = torch.linalg.eigvalsh(hess)
    # A central difference of the blurred white noise keeps ``share`` of its variance (gradient_share);
    # half of that is taken out, as the noise estimate also counts some fine texture.
    floor = n[:, 0] * noise * (share / 2)
    return ((eig[:, 0] - floor) / (eig[:, -1] - floor).clamp_min(1e-30)).clamp(0, 1)


def unmatched(fixed: Level, moving: Level, matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Fixed pixels of the overlap whose content ``moving`` does not show under ``matrix`` ``(B, 2, 3)``.

    ``matrix`` is in level-0 pixels; the two levels are of one scale. Moving is
    resampled onto fixed's grid (on this level), the best gain and
    offset fitted over the overlap, and a pixel is an outlier where the
    residual exceeds ``4·1.4826·MAD`` of all residuals (a robust noise scale), and
    a tenth of fixed's standard deviation over the overlap.
    Noise and a slightly misaligned edge give scattered outliers or thin lines;
    an object, debris or a label that only one image has gives a blob: the
    region is where at least 40 % of a 7×7 neighbourhood are outliers, grown by
    4 pixels. Returns the region ``(B, 1, H, W)`` (float, 1 = unmatched) and its
    ``(B,)`` fraction of the overlap.
    """
    from ..functional import warp

    h, w = fixed.image.shape[-2:]
    # Level pixel p is level-0 pixel s·(p + 0.5) - 0.5, on both sides: conjugate the map by that.
    s = float(fixed.scale)
    scale = matrix.new_tensor([[s, 0.0, (s - 1) / 2], [0.0, s, (s - 1) / 2], [0.0, 0.0, 1.0]])
    inverse = torch.linalg.inv(scale)
    square = torch.cat((matrix, matrix.new_tensor([0.0, 0.0, 1.0]).expand(matrix.shape[0], 1, 3)), 1)
    matrix = (inverse @ square @ scale)[:, :2]
    ones = torch.ones_like(moving.image)
    planes = torch.cat((moving.image, ones if moving.mask is None else moving.mask), 1)
    sampled = warp(planes, matrix=matrix.to(planes.dtype), size=(h, w))
    g, valid = sampled[:, :1], sampled[:, 1:] > 0.999
    yy, xx = (torch.arange(n, device=g.device, dtype=g.dtype) for n in (h, w))
    valid = valid & fixed.inside(xx.view(1, -1), yy.view(-1, 1)).view(1, 1, h, w)
    if fixed.mask is not None:
        valid = valid & (fixed.mask > 0.999)
    f = fixed.image

    def per_pair(x: Tensor) -> Tensor:
        return x.flatten(1).sum(1).view(-1, 1, 1, 1)

    wt = valid.to(g.dtype)
    n = per_pair(wt).clamp_min(1)
    mf, mg = per_pair(wt * f) / n, per_pair(wt * g) / n
    gain = per_pair(wt * (f - mf) * (g - mg)) / per_pair(wt * (g - mg).square()).clamp_min(1e-30)
    residual = (f - mf) - gain * (g - mg)
    flat = torch.where(valid, residual, torch.full_like(residual, math.nan)).flatten(1)
    centre_r = flat.nanmedian(1).values.view(-1, 1, 1, 1)
    mad = (flat - centre_r.flatten(1)).abs().nanmedian(1).values.view(-1, 1, 1, 1)
    # A clean pair leaves residuals near zero everywhere: a tenth of fixed's spread is the least that counts.
    bound = torch.maximum(4 * 1.4826 * mad, 0.1 * (per_pair(wt * (f - mf).square()) / n).sqrt())
    outlier = (valid & ((residual - centre_r).abs() > bound)).to(g.dtype)
    dense = F.avg_pool2d(outlier, 7, stride=1, padding=3, count_include_pad=False) > 0.4
    region = F.max_pool2d(dense.to(g.dtype), 9, stride=1, padding=4)
    fraction = (region * wt).flatten(1).sum(1) / n.flatten()
    return region, fraction


def _moving_gradient(pts: _Points, moving: Level, frame: _Frame, angle: Tensor, t: Tensor) -> Tensor:
    """(B, 2, N) the gradient of moving mapped onto fixed's frame, at the fixed points, along fixed's x, y.

    Central differences of moving where the points land (moving's bilinear samples a pixel either
    side, which is the bilinear sample of its central-difference image), turned back by the map's
    rotation: ``∇_p G(W(p)) = Aᵀ (∇G)(W(p))``.
    """
    h, w = moving.image.shape[-2:]
    grid = frame.grid(pts, angle.unsqueeze(1), t.unsqueeze(1), (h, w))  # (B, 1, N, 2)
    step = grid.new_tensor([[2 / w, 0.0], [-2 / w, 0.0], [0.0, 2 / h], [0.0, -2 / h]])
    sides = (grid.unsqueeze(2) + step.view(1, 1, 4, 1, 2)).flatten(1, 2)  # (B, 4, N, 2)
    g = F.grid_sample(moving.image, sides, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
    mx, my = (g[:, 0] - g[:, 1]) / 2, (g[:, 2] - g[:, 3]) / 2
    cos, sin = torch.cos(angle).unsqueeze(1), torch.sin(angle).unsqueeze(1)
    return torch.stack((cos * mx + sin * my, -sin * mx + cos * my), 1)


def _spread(
    pts: _Points, frame: _Frame, g: Tensor, w: Tensor, noise: Tensor, moving_gradient: Tensor, share: float
) -> Tensor:
    """(B, 2) how far the result may be from the truth, in pixels, where the overlap makes it largest.

    Column 0 is the standard deviation of the motion, column 1 the motion of the step still left.

    The covariance of (θ, tx, ty) at the result by the cluster-robust ("sandwich")
    estimator, ``H⁻¹ (Σ_c s_c s_cᵀ) H⁻¹``: ``H`` is the Gauss–Newton matrix of the
    fixed image's motion derivatives ``J`` over the overlap (the intensity gain and
    offset projected out), ``s_c = Σ J·r`` the sum over one of ``CLUSTERS²`` blocks of
    points of the derivatives times what the fitted gain and offset leave of moving
    (``r``: noise, and whatever the model does not explain — a gamma, content only one
    image has). Residuals are correlated within a block (blur, structure), which the
    textbook ``σ² H⁻¹`` would miss. ``H`` is read off the noisy fixed image: the (B,)
    ``noise`` variance's share of its gradients (``share`` of it) is taken out (it carries no information
    about the motion, and left in, it would make a faint texture under strong noise look
    well pinned down), down to a tenth of ``H``. That needs a noise estimate and a model of
    the blur, and where the noise carries nearly all of the gradients (a smooth picture under
    strong noise) what is left of ``H`` is a small difference of two large numbers. So ``H`` is
    also taken as the cross product of fixed's derivatives with those of moving mapped onto
    fixed's frame (``moving_gradient``, (B, 2, N)): the two images' noise is independent, so
    its share averages out of that product without an estimate of it (its symmetric part,
    eigenvalues kept above 1e-6 of the largest: a direction the product does not pin down
    gets a large variance). Each point's variance is the larger of the two. A turn δθ with a
    shift δt moves point ``p`` by ``(δtx - δθ·v, δty + δθ·u)`` (``(u, v) = p - c_f``): the
    standard deviation of that motion is taken at the overlap's point where it is largest, as
    is the motion of the Gauss–Newton step still left at the result (non-zero where it
    stopped short).
    """
    f = pts.values.expand_as(g)
    b = g.shape[0]
    n = w.sum(1).clamp_min(1)

    def centred(x: Tensor, weight: Tensor) -> Tensor:
        return x - (weight * x).sum(-1, keepdim=True) / n.view(-1, *[1] * (x.dim() - 1))

    fc, gc = centred(f, w), centred(g, w)
    var_f = (w * fc.square()).sum(1).clamp_min(1e-30)
    gain = (w * fc * gc).sum(1) / var_f
    residual = gc - gain.unsqueeze(1) * fc
    u, v = pts.x - frame.c_f[0, 0], pts.y - frame.c_f[0, 1]

    def motions(gx: Tensor, gy: Tensor, scale: Tensor | float) -> Tensor:
        """(B, 3, N) derivatives by (θ, tx, ty) of an image with gradient (gx, gy), centred."""
        x = torch.stack((-v * gx + u * gy, gx, gy), 1).expand(b, 3, -1)
        x = scale * centred(x, w.unsqueeze(1))
        # The part of each motion derivative that a change of gain explains is no motion either.
        along = (w.unsqueeze(1) * x * fc.unsqueeze(1)).sum(2, keepdim=True) / var_f.view(-1, 1, 1)
        return (x - along * fc.unsqueeze(1)).double()

    jac = motions(pts.gx, pts.gy, gain.view(-1, 1, 1))
    wd = w.double()
    hess = (jac * wd.unsqueeze(1)) @ jac.transpose(1, 2)
    # A central difference of the blurred white noise keeps ``share`` of its variance (gradient_share).
    r2 = (wd * (u.square() + v.square()).double()).sum(1)
    floor = torch.stack((r2, wd.sum(1), wd.sum(1)), 1) * (gain.square() * noise * share).double().unsqueeze(1)
    diagonal = hess.diagonal(dim1=1, dim2=2)
    hess = hess - torch.diag_embed(torch.minimum(floor, 0.9 * diagonal))
    hess = hess + torch.diag_embed(hess.diagonal(dim1=1, dim2=2) * 1e-9 + 1e-30)
    inv = torch.linalg.inv(hess)
    jm = motions(moving_gradient[:, 0], moving_gradient[:, 1], 1.0)
    cross = (jac * wd.unsqueeze(1)) @ jm.transpose(1, 2)
    values, vectors = torch.linalg.eigh((cross + cross.transpose(1, 2)) / 2)
    values = values.clamp_min(1e-6 * values.amax(1, keepdim=True).clamp_min(1e-30))
    inv_cross = vectors @ torch.diag_embed(1 / values) @ vectors.transpose(1, 2)
    nr, nc = pts.shape
    rows = torch.arange(nr, device=g.device) * CLUSTERS // nr
    cols = torch.arange(nc, device=g.device) * CLUSTERS // nc
    cluster = (rows.view(-1, 1) * CLUSTERS + cols.view(1, -1)).reshape(-1)
    parts = jac * (wd * residual.double()).unsqueeze(1)  # (B, 3, N)
    sums = parts.new_zeros(b, 3, CLUSTERS * CLUSTERS).index_add_(2, cluster, parts)
    used = torch.zeros(b, CLUSTERS * CLUSTERS, dtype=wd.dtype, device=g.device).index_add_(1, cluster, wd)
    clusters = (used > 0).sum(1).to(wd.dtype)
    meat = sums @ sums.transpose(1, 2) * (clusters / (clusters - 1).clamp_min(1)).view(-1, 1, 1)
    step = (inv @ sums.sum(2, keepdim=True))[..., 0]  # (B, 3)
    uu, vv = u.double().unsqueeze(0), v.double().unsqueeze(0)

    def motion_variance(inverse: Tensor) -> Tensor:
        cov = inverse @ meat @ inverse
        return (
            cov[:, :1, 0] * (uu.square() + vv.square())
            + cov[:, 1:2, 1]
            + cov[:, 2:3, 2]
            + 2 * (uu * cov[:, 0:1, 2] - vv * cov[:, 0:1, 1])
        )

    var = torch.maximum(motion_variance(inv), motion_variance(inv_cross))
    moved = torch.hypot(step[:, 1:2] - step[:, :1] * vv, step[:, 2:3] + step[:, :1] * uu)
    inside = w > 0
    spread = torch.where(inside, var, torch.zeros_like(var)).amax(1).clamp_min(0).sqrt()
    left = torch.where(inside, moved, torch.zeros_like(moved)).amax(1)
    return torch.stack((spread, left), 1).to(g.dtype)


def score(
    fixed: Level,
    moving: Level,
    size: tuple[int, int],
    moving_size: tuple[int, int],
    angle: Tensor,
    translation: Tensor,
    max_points: int,
    min_overlap: float,
    noise: tuple[Tensor, Tensor],
    blocks: int = 4,
    blur: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(B,) trust score in [0, 1], overlap fraction, textured blocks and spread (:func:`_spread`) of a result.

    The overlap is cut into a grid of ``blocks × blocks`` and the NCC of the
    two images is measured in each textured block, corrected for the
    images' (B,) ``noise`` variances: the score is the lower quartile of those
    NCCs (negative counts as 0), scaled down when the overlap does not pin
    the motion down (:func:`_localisation` under ``LOCALISED``) and when fewer
    than ``MIN_BLOCKS`` blocks are textured. A right result agrees
    everywhere; a wrong one that lines up one dominant structure (the rim of
    a round field of view, a long edge, a crater on a noisy plain) agrees in a
    few blocks only, which the whole-overlap NCC would not show. Scaled by
    ``min(1, overlap / (2·min_overlap))``: agreement on a sliver of the images
    is trusted less. The overlap is the fraction of the smaller image's
    (masked) pixels that the other one covers. ``blur`` is the Gaussian blur (pixels) the images had.
    """
    share = gradient_share(blur)
    pts = _Points(fixed, max_points, gradient=True)
    frame = _Frame(size, moving_size, fixed.scale, angle)
    g, w = (x[:, 0] for x in _overlap(pts, moving, frame, angle.unsqueeze(1), translation.unsqueeze(1)))
    overlap = (w.sum(1) / _smaller_area(pts, moving)[:, 0]).clamp(0, 1)
    local = _block_ncc(pts, g, w, blocks, noise)
    localisation = _localisation(pts, frame, w, noise[0], share)
    measured = torch.isfinite(local).any(1)
    quartile = torch.nanquantile(
        torch.where(measured.unsqueeze(1), local, torch.zeros_like(local)), 0.25, dim=1
    )
    trust = torch.where(measured, quartile, torch.zeros_like(quartile)).clamp(0, 1)
    trust = trust * (localisation / LOCALISED).clamp(max=1.0)
    textured = torch.isfinite(local).sum(1).to(trust.dtype)
    trust = trust * (textured / MIN_BLOCKS).clamp(max=1.0)
    spread = _spread(
        pts, frame, g, w, noise[0], _moving_gradient(pts, moving, frame, angle, translation), share
    )
    return trust * (overlap / (2 * min_overlap)).clamp(max=1.0), overlap, textured, spread
