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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import wrap_angle

__all__ = [
    "angular_error",
    "circular_soft_cross_entropy",
    "circular_soft_labels",
    "cosine_loss",
    "unit_norm_penalty",
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
