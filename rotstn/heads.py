"""Angle heads: features in, an angle out, and the loss that trains them.

Convention
----------
A head maps features ``(..., F)`` to angles ``(...)`` in radians (counter-clockwise
as displayed, as everywhere in rotstn): ``(B, F)`` features give one angle per
sample ``(B,)``, ``(B, N, F)`` give N angles per sample ``(B, N)``. Each head
knows its **encoding** of an angle (``encode``), its **decoding** (``forward``
returns an :class:`AnglePrediction`) and its **loss** (``loss(prediction,
target)``), so there is no seam at 0/2π anywhere.

``symmetry=n`` is for objects that look the same after a turn of 2π/n (a '0'
or an '8' at n = 2): the head predicts ``nθ``, which is well defined, and
reports ``θ`` in ``(-π/n, π/n]``; the loss compares ``nθ`` with ``n·target``.

Identity start: a freshly built head reports θ ≈ 0 (within 1e-3 rad) whatever
its input, so a :class:`rotstn.RotationSTN` starts as the identity warp.
The decoded angle is pulled towards 0 by a weight that decays
geometrically from 10⁴ to 0 over the first ``warmup`` training-mode forward
calls. The loss always sees the head's own output, so supervised training
runs at full speed from the first step. A loss on the warped image goes
through the pulled angle, whose gradient is scaled down while the pull is
strong: for purely unsupervised training use a short ``warmup`` (or 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import losses
from .functional import wrap_angle

__all__ = ["AngleHead", "AnglePrediction", "BinnedHead", "UnitVectorHead", "VonMisesHead", "build_head"]

_IDENTITY_WEIGHT = 1e4


@dataclass
class AnglePrediction:
    """What a head predicts.

    Attributes:
        angle: ``(...)`` radians in ``(-π/n, π/n]`` for symmetry order n.
        raw: the head's raw output, ``(..., 2)`` vectors or ``(..., K)`` logits
            (what the loss is computed on).
        raw_angle: ``(...)`` the angle ``nθ`` decoded from ``raw`` without the
            identity start, in ``(-π, π]``.
        concentration: ``(...)`` von Mises κ of the prediction (:class:`VonMisesHead`),
            else None.
        confidence: ``(...)`` in [0, 1]: the probability mass near the peak
            (:class:`BinnedHead`), the length of the mean vector (:class:`VonMisesHead`,
            ``I1(κ)/I0(κ)``), else None.
    """

    angle: Tensor
    raw: Tensor
    raw_angle: Tensor
    concentration: Tensor | None = None
    confidence: Tensor | None = None


class AngleHead(nn.Module):
    """Base class: symmetry handling and the identity start shared by all heads.

    Subclasses implement ``_decode(raw) -> (psi, extras)`` giving the angle
    ``ψ = nθ`` in radians, and ``loss``.
    """

    seen: Tensor

    def __init__(self, in_features: int | None, *, symmetry: int = 1, warmup: int = 100) -> None:
        super().__init__()
        if in_features is not None and (not isinstance(in_features, int) or in_features < 1):
            raise ValueError(f"in_features must be a positive int or None, got {in_features!r}")
        if not isinstance(symmetry, int) or symmetry < 1:
            raise ValueError(
                f"symmetry must be a positive int (the order n of n-fold symmetry), got {symmetry!r}"
            )
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (training forward calls), got {warmup!r}")
        self.in_features = in_features
        self.symmetry = symmetry
        self.warmup = warmup
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    @property
    def period(self) -> float:
        """The period of the reported angle, ``2π / symmetry``."""
        return 2 * math.pi / self.symmetry

    def warmup_progress(self) -> Tensor:
        """Fraction of the warm-up done, a 0-d float tensor in [0, 1] (1 when ``warmup`` is 0)."""
        if self.warmup == 0:
            return torch.ones((), device=self.seen.device)
        # Tensor ops, not int(self.seen): no graph break under torch.compile.
        return self.seen.clamp(max=self.warmup).float() / self.warmup

    def identity_weight(self) -> Tensor:
        """Weight of the pull towards θ = 0: 10⁴ before training, 0 after ``warmup`` steps (0-d tensor)."""
        return _IDENTITY_WEIGHT ** (1 - self.warmup_progress()) - 1

    def _check_features(self, features: Tensor) -> Tensor:
        if not isinstance(features, Tensor) or not features.is_floating_point():
            raise TypeError(f"features must be a floating-point torch.Tensor, got {features!r:.60}")
        want = self.in_features if self.in_features is not None else getattr(self, "bins", None)
        if features.dim() == 0 or (want is not None and features.shape[-1] != want):
            raise ValueError(
                f"features must have shape (..., {want}) for {type(self).__name__}, "
                f"got {tuple(features.shape)}"
            )
        return features

    def _finish(self, psi: Tensor) -> Tensor:
        w = self.identity_weight().to(psi.dtype)
        if self.training and torch.is_grad_enabled():
            self.seen += 1
        # With w = 0 (after the warm-up) this is wrap(psi), with derivative 1.
        psi = torch.atan2(torch.sin(psi), torch.cos(psi) + w)
        return wrap_angle(psi) / self.symmetry

    def encode_target(self, target: Tensor) -> Tensor:
        """The angle the head's output is compared with: ``n · target`` wrapped."""
        if not isinstance(target, Tensor) or not target.is_floating_point():
            raise TypeError(f"target must be a floating-point torch.Tensor of radians, got {target!r:.60}")
        return wrap_angle(target * self.symmetry)

    def _check_target(self, pred: AnglePrediction, target: Tensor) -> Tensor:
        t = self.encode_target(target)
        if t.shape != pred.angle.shape:
            raise ValueError(
                f"target must have the prediction's shape {tuple(pred.angle.shape)}, "
                f"got {tuple(target.shape)}"
            )
        return t

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, symmetry={self.symmetry}, warmup={self.warmup}"


class UnitVectorHead(AngleHead):
    """Predict ``(x, y)``, normalise it onto the circle, read ``θ = atan2(y, x)``.

    No tanh: a squashing activation pulls ``x`` and ``y`` towards ±1 and the
    angle towards odd multiples of 45°. Normalisation has no preferred angle.

    Args:
        in_features: feature size F.
        symmetry: order n of the object's rotational symmetry (predicts nθ).
        loss: ``"cosine"`` (``1 - cos Δ``) or ``"von_mises"`` (biternion, ``kappa``).
        kappa: concentration of the von Mises loss.
        norm_weight: weight of :func:`rotstn.losses.unit_norm_penalty` on the raw
            vector, keeping it away from the origin.
        warmup: training forward calls over which the identity start fades.

    Shape:
        features ``(..., F)`` -> angle ``(...)``.

    Example:
        >>> head = UnitVectorHead(16, norm_weight=0.0)
        >>> p = head(torch.randn(4, 16))
        >>> p.angle.shape, bool(p.angle.abs().max() < 1e-3)
        (torch.Size([4]), True)
        >>> head.loss(p, p.raw_angle.detach()).item() < 1e-6  # zero at the head's own angle
        True
    """

    def __init__(
        self,
        in_features: int,
        *,
        symmetry: int = 1,
        loss: str = "cosine",
        kappa: float = 1.0,
        norm_weight: float = 0.01,
        warmup: int = 100,
    ) -> None:
        if in_features is None:
            raise ValueError("in_features must be a positive int for UnitVectorHead, got None")
        super().__init__(in_features, symmetry=symmetry, warmup=warmup)
        if loss not in ("cosine", "von_mises"):
            raise ValueError(f"loss must be 'cosine' or 'von_mises'; got {loss!r}")
        self.loss_name, self.kappa, self.norm_weight = loss, kappa, norm_weight
        self.proj = nn.Linear(in_features, 2)
        with torch.no_grad():
            self.proj.bias.copy_(torch.tensor([1.0, 0.0]))

    def forward(self, features: Tensor) -> AnglePrediction:
        raw = self.proj(self._check_features(features))
        psi = torch.atan2(raw[..., 1], raw[..., 0])
        return AnglePrediction(angle=self._finish(psi), raw=raw, raw_angle=psi)

    def loss(self, pred: AnglePrediction, target: Tensor, *, reduction: str = "mean") -> Tensor:
        """Cosine or von Mises loss on the normalised vector, plus the unit-norm penalty."""
        t = self._check_target(pred, target)
        v = F.normalize(pred.raw, dim=-1, eps=1e-12)
        if self.loss_name == "cosine":
            value = 1 - (v[..., 0] * torch.cos(t) + v[..., 1] * torch.sin(t))
            value = losses._reduce(value, reduction)
        else:
            value = losses.von_mises_loss(v, t, kappa=self.kappa, reduction=reduction)
        return value + self.norm_weight * losses.unit_norm_penalty(pred.raw, reduction=reduction)


class VonMisesHead(AngleHead):
    """A von Mises distribution: mean direction (normalised vector) and concentration κ.

    κ says how sure the head is (``1/κ`` ≈ the variance in rad² for large κ).
    The loss is :func:`rotstn.losses.von_mises_nll`. Trained from scratch the NLL
    is unstable: early on a large κ turns every mean error into a huge gradient.
    For the first ``warmup`` training calls the loss is therefore a blend that
    starts as the cosine loss on the mean plus the NLL of κ with the mean held
    fixed, and ends as the plain NLL.

    Args:
        in_features: feature size F.
        symmetry: order n of the object's rotational symmetry.
        kappa_max: upper bound on κ (keeps the NLL finite for perfect fits).
        warmup: training forward calls for the identity start and the NLL warm-up.

    Shape:
        features ``(..., F)`` -> angle and concentration ``(...)``.

    Example:
        >>> head = VonMisesHead(8)
        >>> p = head(torch.randn(3, 8))
        >>> p.concentration.shape, bool((p.concentration > 0).all())
        (torch.Size([3]), True)
    """

    def __init__(
        self, in_features: int, *, symmetry: int = 1, kappa_max: float = 1e3, warmup: int = 100
    ) -> None:
        if in_features is None:
            raise ValueError("in_features must be a positive int for VonMisesHead, got None")
        super().__init__(in_features, symmetry=symmetry, warmup=warmup)
        self.kappa_max = kappa_max
        self.proj = nn.Linear(in_features, 3)
        with torch.no_grad():
            self.proj.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))

    def forward(self, features: Tensor) -> AnglePrediction:
        raw = self.proj(self._check_features(features))
        kappa = (F.softplus(raw[..., 2]) + 1e-3).clamp(max=self.kappa_max)
        confidence = torch.special.i1e(kappa) / torch.special.i0e(kappa)
        psi = torch.atan2(raw[..., 1], raw[..., 0])
        return AnglePrediction(
            angle=self._finish(psi), raw=raw, raw_angle=psi, concentration=kappa, confidence=confidence
        )

    def loss(self, pred: AnglePrediction, target: Tensor, *, reduction: str = "mean") -> Tensor:
        """Von Mises NLL, blended in from a cosine loss over the warm-up."""
        t = self._check_target(pred, target)
        mean = pred.raw_angle
        nll = losses.von_mises_nll(mean, pred.concentration, t, reduction=reduction)
        if self.warmup == 0:
            return nll
        blend = self.warmup_progress().to(nll.dtype)
        gentle = losses.cosine_loss(mean, t, reduction=reduction) + losses.von_mises_nll(
            mean.detach(), pred.concentration, t, reduction=reduction
        )
        return blend * nll + (1 - blend) * gentle


class BinnedHead(AngleHead):
    """K bins on the circle, trained with circular soft labels, decoded around the peak.

    Bin k is centred on ``2πk/K``. The loss is
    :func:`rotstn.losses.circular_soft_cross_entropy` (a von Mises or Gaussian
    window ``label_width`` bins wide). The angle is the circular mean of the
    softmax over the ``2·decode_window + 1`` bins around the most likely one:
    sub-bin precise, differentiable, and not pulled towards the middle by
    probability far from the peak (as a circular mean over all bins would be).

    Args:
        in_features: feature size F, projected linearly to K logits; ``None`` if
            the features already are K per-bin scores (e.g. the circular
            cross-correlation of :class:`rotstn.encoders.PolarCorrelationEncoder`).
        bins: K (default 128).
        symmetry: order n of the object's rotational symmetry.
        label_width: soft-label width in bins (0 = plain one-hot classification).
        window: ``"von_mises"`` or ``"gaussian"``.
        decode_window: bins on each side of the peak used by the decoder.
        decoder: ``"circular_mean"`` (default) or ``"parabolic"``: the vertex of the
            parabola through the logits of the peak and its two neighbours. The
            circular mean is calibrated by the soft-label training; the parabola
            suits logits that are a smooth score of the angle (a correlation),
            whatever their sharpness, and reads small residuals best (refinement).
        residual: also predict a per-bin offset within ±half a bin, added to
            the decoded angle and trained with a cosine loss (needs ``in_features``).
        warmup: training forward calls over which the identity start fades.

    Shape:
        features ``(..., F)`` (or ``(..., K)``) -> angle ``(...)``; raw logits ``(..., K)``.

    Example:
        >>> head = BinnedHead(None, bins=16, warmup=0)
        >>> logits = losses.circular_soft_labels(torch.tensor([1.0, -2.0]), 16).log()
        >>> head(logits).angle.round(decimals=3)
        tensor([ 1., -2.])
    """

    def __init__(
        self,
        in_features: int | None,
        *,
        bins: int = 128,
        symmetry: int = 1,
        label_width: float = 1.0,
        window: str = "von_mises",
        decode_window: int = 4,
        decoder: str = "circular_mean",
        residual: bool = False,
        warmup: int = 100,
    ) -> None:
        super().__init__(in_features, symmetry=symmetry, warmup=warmup)
        if not isinstance(bins, int) or bins < 4:
            raise ValueError(f"bins must be an int >= 4, got {bins!r}")
        if not isinstance(decode_window, int) or not 1 <= decode_window < bins // 2:
            raise ValueError(f"decode_window must be an int in [1, bins // 2), got {decode_window!r}")
        if residual and in_features is None:
            raise ValueError("residual=True needs in_features (a projection to predict the offsets)")
        losses.circular_soft_labels(torch.zeros(1), bins, width=label_width, window=window)  # validates
        self.bins, self.label_width, self.window = bins, label_width, window
        if decoder not in ("circular_mean", "parabolic"):
            raise ValueError(f"decoder must be 'circular_mean' or 'parabolic'; got {decoder!r}")
        self.decode_window, self.decoder, self.residual = decode_window, decoder, residual
        self.proj = None if in_features is None else nn.Linear(in_features, bins * (2 if residual else 1))

    @property
    def bin_width(self) -> float:
        return 2 * math.pi / self.bins

    def decode(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Angle ``ψ`` (radians, not yet divided by the symmetry) and peak mass, from ``(..., K)`` logits."""
        peak = logits.argmax(-1, keepdim=True)
        offsets = torch.arange(-self.decode_window, self.decode_window + 1, device=logits.device)
        idx = torch.remainder(peak + offsets, self.bins)
        window = logits.gather(-1, idx)
        mass = torch.softmax(logits, dim=-1).gather(-1, idx).sum(-1)
        if self.decoder == "parabolic":
            left, mid, right = window[..., self.decode_window - 1 : self.decode_window + 2].unbind(-1)
            # The peak is a maximum, so the curvature is <= 0; a flat top gives offset 0.
            curvature = (left - 2 * mid + right).clamp(max=-1e-12)
            shift = (0.5 * (left - right) / curvature).clamp(-0.5, 0.5) * self.bin_width
        else:
            local = torch.softmax(window, dim=-1)
            delta = offsets.to(logits.dtype) * self.bin_width
            shift = torch.atan2((local * torch.sin(delta)).sum(-1), (local * torch.cos(delta)).sum(-1))
        return peak.squeeze(-1).to(logits.dtype) * self.bin_width + shift, mass

    def _split(self, features: Tensor) -> tuple[Tensor, Tensor | None]:
        features = self._check_features(features)
        if self.proj is None:
            return features, None
        out = self.proj(features)
        if not self.residual:
            return out, None
        return out[..., : self.bins], out[..., self.bins :]

    def forward(self, features: Tensor) -> AnglePrediction:
        logits, res = self._split(features)
        psi, mass = self.decode(logits)
        raw = logits
        if res is not None:
            peak = logits.argmax(-1, keepdim=True)
            psi = psi + 0.5 * self.bin_width * torch.tanh(res.gather(-1, peak).squeeze(-1))
            raw = torch.cat((logits, res), dim=-1)
        return AnglePrediction(angle=self._finish(psi), raw=raw, raw_angle=wrap_angle(psi), confidence=mass)

    def loss(self, pred: AnglePrediction, target: Tensor, *, reduction: str = "mean") -> Tensor:
        """Soft-label cross-entropy (KL) on the logits, plus a cosine loss on the residual."""
        t = self._check_target(pred, target)
        logits = pred.raw[..., : self.bins]
        value = losses.circular_soft_cross_entropy(
            logits, t, width=self.label_width, window=self.window, reduction=reduction
        )
        if self.residual:
            value = value + losses.cosine_loss(pred.raw_angle, t, reduction=reduction) / self.bin_width**2
        return value


HEADS = {"binned": BinnedHead, "unit_vector": UnitVectorHead, "von_mises": VonMisesHead}


def build_head(name: str, in_features: int | None, **kwargs: object) -> AngleHead:
    """Make a head by name: ``"binned"``, ``"unit_vector"`` or ``"von_mises"``.

    Example:
        >>> build_head("binned", 32, bins=64).bins
        64
    """
    if name not in HEADS:
        raise ValueError(f"head must be an AngleHead or one of {', '.join(map(repr, HEADS))}; got {name!r}")
    return HEADS[name](in_features, **kwargs)
