"""Circular losses and metrics for angles.

Convention
----------
Angles are in radians and compared modulo 2π (modulo ``period`` where a
function takes one), so 359° and 1° are 2° apart and no loss has a seam. Every
distance-like loss is zero at a match and periodic in the prediction and the
target. Angles may have any shape: ``(B,)`` for one angle per sample,
``(B, N)`` for N angles per sample (N phases, N pixels); unit vectors and
per-bin logits carry one extra trailing dimension (2 or K).

``reduction`` is ``"mean"`` (default), ``"sum"`` or ``"none"`` (the
per-angle values, shaped like the target).

Uncertainty that can be checked: :func:`von_mises_credible_arc` and
:func:`binned_credible_arc` give the half-width h of the arc ``[μ - h, μ + h]``
about the prediction that holds a given probability under the predicted
distribution, :func:`in_arc` says whether the truth fell inside, and
:func:`von_mises_nll` / :func:`binned_nll` score the distribution on the truth.
On held-out data a calibrated head's 50 % arcs hold the truth about 50 % of
the time (``benchmarks/uncertainty.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import wrap_angle

__all__ = [
    "angular_error",
    "binned_credible_arc",
    "binned_nll",
    "circular_soft_cross_entropy",
    "circular_soft_labels",
    "cosine_loss",
    "in_arc",
    "unit_norm_penalty",
    "von_mises_credible_arc",
    "von_mises_loss",
    "von_mises_nll",
]

REDUCTIONS = ("mean", "sum", "none")
WINDOWS = ("von_mises", "gaussian")


def _reduce(value: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return value.mean()
    if reduction == "sum":
        return value.sum()
    if reduction == "none":
        return value
    raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {reduction!r}")


def _as_float(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _same_shape(a: Tensor, b: Tensor, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{na} and {nb} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _unit_vectors(vec: Tensor, target: Tensor, name: str = "pred") -> None:
    if vec.dim() == 0 or vec.shape[-1] != 2 or vec.shape[:-1] != target.shape:
        raise ValueError(
            f"{name} must have shape (*target.shape, 2) = {(*target.shape, 2)} (x = cos, y = sin), "
            f"got {tuple(vec.shape)}"
        )


def angular_error(
    pred: Tensor,
    target: Tensor,
    *,
    period: float = 2 * math.pi,
    degrees: bool = False,
    reduction: str = "none",
) -> Tensor:
    """Absolute angular error ``|pred - target|`` wrapped to ``[0, period / 2]``.

    Args:
        pred: predicted angles, radians, any shape.
        target: true angles, same shape.
        period: the period the angles live on: ``2π`` (default), or ``2π / n``
            for an object with n-fold symmetry.
        degrees: return degrees instead of radians.
        reduction: ``"none"`` (default, shaped like ``target``), ``"mean"`` or ``"sum"``.

    Returns:
        The error, in ``[0, period / 2]`` (radians, or degrees with ``degrees=True``).

    Example:
        >>> a, b = torch.deg2rad(torch.tensor([359.0])), torch.deg2rad(torch.tensor([1.0]))
        >>> angular_error(a, b, degrees=True)
        tensor([2.0000])
    """
    pred, target = _as_float(pred, "pred"), _as_float(target, "target")
    _same_shape(pred, target, "pred", "target")
    if not period > 0:
        raise ValueError(f"period must be positive, got {period}")
    scale = 2 * math.pi / period
    err = wrap_angle((pred - target) * scale).abs() / scale
    return _reduce(torch.rad2deg(err) if degrees else err, reduction)


def cosine_loss(pred: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """``1 - cos(pred - target)``: zero at a match, 2 at the opposite angle.

    Smooth everywhere and periodic; its gradient ``sin(pred - target)`` fades
    near the opposite angle, so it trains best from a reasonable start.

    Args:
        pred: predicted angles (radians), ``(B,)``, ``(B, N)`` or any shape.
        target: true angles, same shape.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> cosine_loss(torch.tensor([0.0, math.pi]), torch.tensor([2 * math.pi, 0.0]), reduction="none")
        tensor([0., 2.])
    """
    pred, target = _as_float(pred, "pred"), _as_float(target, "target")
    _same_shape(pred, target, "pred", "target")
    return _reduce(1 - torch.cos(pred - target), reduction)


def von_mises_loss(pred: Tensor, target: Tensor, *, kappa: float = 1.0, reduction: str = "mean") -> Tensor:
    """The von Mises (biternion) loss ``1 - exp(κ (cos Δ - 1))``.

    ``Δ`` is the angle between prediction and target. For small ``κ`` this is
    ``κ`` times :func:`cosine_loss`; larger ``κ`` saturates far from the target,
    so a few wild predictions (outliers, symmetric look-alikes) do not dominate
    the gradient.

    Args:
        pred: predicted angles ``(...)`` in radians, or unit vectors ``(..., 2)``
            as ``(cos, sin)``; vectors are normalised first.
        target: true angles ``(...)`` in radians.
        kappa: concentration of the loss window, > 0.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> von_mises_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([0.0]))
        tensor(0.)
    """
    pred, target = _as_float(pred, "pred"), _as_float(target, "target")
    if not kappa > 0:
        raise ValueError(f"kappa must be positive, got {kappa}")
    if pred.shape == target.shape:
        cos_delta = torch.cos(pred - target)
    else:
        _unit_vectors(pred, target)
        v = F.normalize(pred, dim=-1, eps=1e-12)
        cos_delta = v[..., 0] * torch.cos(target) + v[..., 1] * torch.sin(target)
    return _reduce(1 - torch.exp(kappa * (cos_delta - 1)), reduction)


def von_mises_nll(mean: Tensor, kappa: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of ``target`` under a von Mises ``(mean, κ)``.

    ``-κ cos(target - mean) + log(2π I0(κ))``, computed with the exponentially
    scaled Bessel function (``I0`` alone overflows float32 above κ ≈ 88) so it
    stays finite for any ``κ``. It is periodic in
    ``mean`` and ``target`` and, for a fixed ``κ``, smallest at a match; unlike the
    distance losses it is not zero there (its minimum ``log(2π I0(κ)) - κ``
    falls as ``κ`` grows, which is what rewards a confident correct prediction).

    Args:
        mean: predicted mean directions, radians, shaped like ``target``.
        kappa: predicted concentrations (> 0), shaped like ``target``.
        target: true angles, radians, ``(B,)``, ``(B, N)`` or any shape.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> von_mises_nll(torch.tensor([0.0]), torch.tensor([1e-6]), torch.tensor([2.0]))  # ≈ log 2π
        tensor(1.8379)
    """
    mean, kappa, target = _as_float(mean, "mean"), _as_float(kappa, "kappa"), _as_float(target, "target")
    _same_shape(mean, target, "mean", "target")
    _same_shape(kappa, target, "kappa", "target")
    # κ(1 - cos Δ) + log i0e(κ) is -κ cos Δ + log I0(κ) without cancelling two large numbers,
    # and 1 - cos Δ = 2 sin²(Δ/2) keeps its precision for small Δ (where a large κ magnifies it).
    one_minus_cos = 2 * torch.sin((target - mean) / 2) ** 2
    nll = kappa * one_minus_cos + torch.log(torch.special.i0e(kappa)) + math.log(2 * math.pi)
    return _reduce(nll, reduction)


def unit_norm_penalty(vec: Tensor, *, reduction: str = "mean") -> Tensor:
    """``(‖v‖ - 1)²`` for raw 2-vectors ``(..., 2)`` before they are normalised.

    Normalising a vector onto the circle makes its angle independent of its
    length; this keeps the length near 1, away from the origin where the
    angle (and its gradient) is undefined.

    Example:
        >>> unit_norm_penalty(torch.tensor([[0.6, 0.8], [0.0, 2.0]]), reduction="none")
        tensor([0., 1.])
    """
    vec = _as_float(vec, "vec")
    if vec.dim() == 0 or vec.shape[-1] != 2:
        raise ValueError(f"vec must have shape (..., 2), got {tuple(vec.shape)}")
    return _reduce((torch.linalg.vector_norm(vec, dim=-1) - 1) ** 2, reduction)


def circular_soft_labels(
    target: Tensor, bins: int, *, width: float = 1.0, window: str = "von_mises"
) -> Tensor:
    """Soft labels over ``bins`` equal bins of the circle, centred on ``target``.

    Bin ``k`` is centred on ``2πk / bins``. The window wraps around: a target
    just below 2π puts weight on the first bins as well as the last.

    Args:
        target: angles in radians, any shape.
        bins: number of bins K (>= 2).
        width: window width in bins (the von Mises window has ``κ = 1/σ²`` with
            ``σ = width · 2π / K``; the Gaussian window has standard deviation σ on the
            wrapped distance). ``width = 0`` gives one-hot labels on the nearest bin.
        window: ``"von_mises"`` (default) or ``"gaussian"``.

    Returns:
        ``(*target.shape, bins)``, non-negative, summing to 1 over the last dimension.

    Example:
        >>> circular_soft_labels(torch.tensor([0.0]), 8, width=0.0)
        tensor([[1., 0., 0., 0., 0., 0., 0., 0.]])
    """
    target = _as_float(target, "target")
    if not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins!r}")
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {', '.join(map(repr, WINDOWS))}; got {window!r}")
    if not width >= 0:
        raise ValueError(f"width must be >= 0 (in bins), got {width}")
    step = 2 * math.pi / bins
    if width == 0:
        nearest = torch.remainder(torch.round(target / step), bins).long()
        return F.one_hot(nearest, bins).to(target.dtype)
    centres = torch.arange(bins, dtype=target.dtype, device=target.device) * step
    delta = wrap_angle(target.unsqueeze(-1) - centres)
    sigma = width * step
    if window == "von_mises":
        logits = (torch.cos(delta) - 1) / sigma**2
    else:
        logits = -0.5 * (delta / sigma) ** 2
    return torch.softmax(logits, dim=-1)


def circular_soft_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    width: float = 1.0,
    window: str = "von_mises",
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of per-bin logits against circular soft labels (as a KL divergence).

    Returns ``CE(labels, softmax(logits)) - H(labels)``, the KL divergence from
    the soft labels of :func:`circular_soft_labels` to the predicted
    distribution: the same gradient as the cross-entropy, and zero when the
    prediction equals the labels. A neighbouring bin costs little and the
    opposite bin a lot, unlike plain classification where every wrong bin
    costs the same.

    Args:
        logits: ``(..., K)`` scores, bin k centred on ``2πk / K``.
        target: true angles, radians, ``logits.shape[:-1]``: ``(B,)``, ``(B, N)``, ...
        width, window: the soft-label window (see :func:`circular_soft_labels`).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> labels = circular_soft_labels(torch.tensor([1.0]), 16)
        >>> circular_soft_cross_entropy(labels.log(), torch.tensor([1.0])).abs() < 1e-6
        tensor(True)
    """
    logits, target = _as_float(logits, "logits"), _as_float(target, "target")
    if logits.dim() == 0 or logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits must have shape (*target.shape, K) with target {tuple(target.shape)}, "
            f"got {tuple(logits.shape)}"
        )
    labels = circular_soft_labels(target.detach(), logits.shape[-1], width=width, window=window)
    log_p = torch.log_softmax(logits, dim=-1)
    kl = (torch.xlogy(labels, labels) - labels * log_p).sum(-1)
    return _reduce(kl, reduction)


def _check_level(level: float) -> float:
    if not isinstance(level, float | int) or not 0 < level < 1:
        raise ValueError(f"level must be a probability in (0, 1), got {level!r}")
    return float(level)


def von_mises_credible_arc(kappa: Tensor, level: float) -> Tensor:
    """Half-width of the arc about the mean that holds ``level`` of a von Mises distribution.

    The von Mises density is symmetric and peaks at its mean, so the arc
    ``[μ - h, μ + h]`` is also the shortest one with that probability. h solves
    ``∫_{-h}^{h} exp(κ cos u) du / (2π I0(κ)) = level``: integrated numerically
    for 1001 values of κ from 1e-4 to 1e6 (log-spaced) and interpolated in
    ``log κ`` (relative error below 1e-4); beyond 1e6 the normal approximation
    ``z / √κ`` is exact to that precision, below 1e-4 the uniform ``level · π``.

    Args:
        kappa: concentrations κ >= 0, any shape.
        level: the probability the arc holds, in (0, 1).

    Returns:
        h in radians, shaped like ``kappa``, in ``(0, π]`` (``level · π`` at κ = 0).

    Example:
        >>> von_mises_credible_arc(torch.tensor([0.0, 100.0]), 0.9)  # uniform: 0.9 π; κ = 100: ≈ 1.645 / √κ
        tensor([2.8274, 0.1649])
    """
    kappa = _as_float(kappa, "kappa")
    level = _check_level(level)
    if bool((kappa < 0).any()):
        raise ValueError(f"kappa must be >= 0, got a minimum of {kappa.min().item():.3g}")
    lo, hi, n = -4.0, 6.0, 1001
    table = _von_mises_arc_table(level, lo, hi, n, kappa.device)
    pos = ((torch.log10(kappa.double().clamp(10**lo, 10**hi)) - lo) * ((n - 1) / (hi - lo))).clamp(0, n - 1)
    i = pos.floor().long().clamp(max=n - 2)
    h = torch.lerp(table[i], table[i + 1], pos - i)
    z = math.sqrt(2) * torch.special.erfinv(torch.tensor(level, dtype=torch.float64)).item()
    h = torch.where(kappa.double() > 10**hi, z / kappa.double().clamp(min=1).sqrt(), h)
    return h.to(kappa.dtype)


def _von_mises_arc_table(level: float, lo: float, hi: float, n: int, device: torch.device) -> Tensor:
    """h for κ = 10**linspace(lo, hi, n), by the trapezoid rule on a grid spanning 40 σ (or π)."""
    kappa = torch.logspace(lo, hi, n, dtype=torch.float64, device=device)
    top = (40 / kappa.sqrt()).clamp(max=math.pi)
    u = torch.linspace(0, 1, 4096, dtype=torch.float64, device=device) * top[:, None]
    # exp(κ (cos u - 1)): the density up to a constant, without overflow for large κ;
    # 1 - cos u = 2 sin²(u/2) keeps its precision for small u.
    density = torch.exp(-2 * kappa[:, None] * torch.sin(u / 2) ** 2)
    steps = (density[:, 1:] + density[:, :-1]) * (0.5 * (u[:, 1:] - u[:, :-1]))
    cdf = torch.cat((torch.zeros_like(density[:, :1]), steps.cumsum(-1)), dim=-1)
    cdf = cdf / cdf[:, -1:]
    i = torch.searchsorted(cdf, torch.full_like(cdf[:, :1], level)).clamp(1, u.shape[1] - 1)
    c0, c1 = cdf.gather(-1, i - 1), cdf.gather(-1, i)
    u0, u1 = u.gather(-1, i - 1), u.gather(-1, i)
    return (u0 + (level - c0) / (c1 - c0).clamp(min=1e-300) * (u1 - u0)).squeeze(-1)


def binned_credible_arc(logits: Tensor, center: Tensor, level: float, *, iterations: int = 40) -> Tensor:
    """Half-width of the arc about ``center`` that holds ``level`` of a binned distribution.

    The distribution is ``softmax(logits)`` over K bins, bin k centred on
    ``2πk / K`` with its probability spread evenly over its width. The arc
    ``[center - h, center + h]`` is the narrowest one about the prediction
    that holds ``level``; h is found by bisection (``iterations`` halvings of π).

    Args:
        logits: ``(..., K)`` per-bin scores.
        center: ``(...)`` radians, the predicted angle (e.g. the decoded one).
        level: the probability the arc holds, in (0, 1).

    Returns:
        h in radians, shaped like ``center``, in ``[0, π]``.

    Example:
        >>> binned_credible_arc(torch.zeros(1, 8), torch.zeros(1), 0.5)  # uniform: a quarter turn each side
        tensor([1.5708])
    """
    logits, center = _as_float(logits, "logits"), _as_float(center, "center")
    level = _check_level(level)
    if logits.dim() == 0 or logits.shape[:-1] != center.shape:
        raise ValueError(
            f"logits must have shape (*center.shape, K) with center {tuple(center.shape)}, "
            f"got {tuple(logits.shape)}"
        )
    bins = logits.shape[-1]
    width = 2 * math.pi / bins
    p = torch.softmax(logits.double(), dim=-1)
    centres = torch.arange(bins, dtype=torch.float64, device=logits.device) * width
    d = wrap_angle(centres - center.double().unsqueeze(-1))
    left, right = d - width / 2, d + width / 2

    def mass(h: Tensor) -> Tensor:
        h = h.unsqueeze(-1)
        # The bin [left, right] may reach past ±π: count its overlap with the arc and the arc's copies at ±2π.
        inside = sum(
            (torch.minimum(right, h + shift) - torch.maximum(left, -h + shift)).clamp(min=0)
            for shift in (-2 * math.pi, 0.0, 2 * math.pi)
        )
        return (p * inside).sum(-1) / width

    lo, hi = (
        torch.zeros_like(center, dtype=torch.float64),
        torch.full_like(center, math.pi, dtype=torch.float64),
    )
    for _ in range(iterations):
        mid = (lo + hi) / 2
        enough = mass(mid) >= level
        hi, lo = torch.where(enough, mid, hi), torch.where(enough, lo, mid)
    return hi.to(center.dtype)


def binned_nll(logits: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Negative log-density of ``target`` under ``softmax(logits)`` spread evenly over each bin.

    ``-log(p_k / w)`` for the bin k that contains the target (w = 2π / K), so it
    is in the same units as :func:`von_mises_nll` (a density per radian) and
    the two heads' NLLs can be compared; ``log 2π`` ≈ 1.84 is a uniform guess.

    Args:
        logits: ``(..., K)`` per-bin scores, bin k centred on ``2πk / K``.
        target: true angles, radians, ``logits.shape[:-1]``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> binned_nll(torch.zeros(1, 4), torch.tensor([1.0]))  # uniform: log 2π
        tensor(1.8379)
    """
    logits, target = _as_float(logits, "logits"), _as_float(target, "target")
    if logits.dim() == 0 or logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits must have shape (*target.shape, K) with target {tuple(target.shape)}, "
            f"got {tuple(logits.shape)}"
        )
    bins = logits.shape[-1]
    width = 2 * math.pi / bins
    k = torch.remainder(torch.round(target / width), bins).long()
    log_p = torch.log_softmax(logits, dim=-1).gather(-1, k.unsqueeze(-1)).squeeze(-1)
    return _reduce(math.log(width) - log_p, reduction)


def in_arc(center: Tensor, half_width: Tensor, target: Tensor, *, period: float = 2 * math.pi) -> Tensor:
    """Whether ``target`` lies on the arc ``[center - half_width, center + half_width]`` (modulo ``period``).

    Averaged over held-out data this is the coverage of credible arcs: about
    ``level`` for a calibrated distribution.

    Args:
        center, half_width, target: radians, the same shape.
        period: ``2π``, or ``2π / n`` for an object with n-fold symmetry.

    Returns:
        A bool tensor shaped like ``target``.

    Example:
        >>> in_arc(torch.tensor([3.0, 3.0]), torch.tensor([0.5, 0.5]), torch.tensor([-3.0, 2.0]))
        tensor([ True, False])
    """
    return angular_error(center, target, period=period) <= _as_float(half_width, "half_width")
