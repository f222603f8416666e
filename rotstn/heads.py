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

Identity start, by construction: with ``identity_start=True`` (the default)
the last layer starts so that a fresh head reports θ = 0 for any input, and
a :class:`rotstn.RotationSTN` starts as the identity warp. What the head
decodes is its last layer with the weight multiplied by a learned ``gain``
(``10 · gate``) that starts at 0, and a bias that encodes θ = 0 (the unit
vector ``(1, 0)``, or logits peaked at bin 0); the weight itself keeps
PyTorch's random initialisation. A :class:`BinnedHead` that reads per-bin
scores directly decodes ``gain · scores + max(1 - gain, 0) · peak`` (``peak``
a fixed bump at bin 0): the angle leaves 0 gradually as the gain grows, and
from ``gain = 1`` on the scores alone count. Each head's loss is taken on
what it decodes and on the layer's own output (gain 1), so the layer and the
encoder train at full strength from the first step while the gain grows.
There is no counter and no state: a head is a function of its input and its
parameters, in training and in evaluation.
A function that ignores its input at the start also passes no gradient back
to it, so through the angle (a loss on the warped image) the encoder in front
of a fresh head gets a zero gradient on the first step and a non-zero one from
the second (the first update moves the gain off zero), as with the spatial
transformer paper's zero-initialised localisation layer; through the head's
own loss it learns from the first step. ``identity_start=False`` starts at
``gain = 1``, e.g. to use a correlation encoder untrained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import losses
from .functional import wrap_angle

# gain = _GATE_RATE · gate: Adam moves a parameter by about its learning rate per step, so
# the gain reaches 1 from the identity start in about 1 / (10 lr) steps (33 at lr 3e-3).
_GATE_RATE = 10.0

__all__ = ["AngleHead", "AnglePrediction", "BinnedHead", "UnitVectorHead", "VonMisesHead", "build_head"]


@dataclass
class AnglePrediction:
    """What a head predicts.

    Attributes:
        angle: ``(...)`` radians in ``(-π/n, π/n]`` for symmetry order n.
        raw: the head's raw output, ``(..., 2)`` vectors or ``(..., K)`` logits
            (what the loss is computed on).
        raw_angle: ``(...)`` the angle ``nθ`` decoded from ``raw``, in ``(-π, π]``.
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
    """Base class: symmetry handling shared by all heads.

    Subclasses implement ``forward`` (decoding ``ψ = nθ`` in radians and
    passing it through ``_finish``) and ``loss``, and honour ``identity_start``
    in how they initialise their last layer.
    """

    def __init__(self, in_features: int | None, *, symmetry: int = 1, identity_start: bool = True) -> None:
        super().__init__()
        if in_features is not None and (not isinstance(in_features, int) or in_features < 1):
            raise ValueError(f"in_features must be a positive int or None, got {in_features!r}")
        if not isinstance(symmetry, int) or symmetry < 1:
            raise ValueError(
                f"symmetry must be a positive int (the order n of n-fold symmetry), got {symmetry!r}"
            )
        if not isinstance(identity_start, bool):
            raise TypeError(f"identity_start must be a bool, got {identity_start!r}")
        self.in_features = in_features
        self.symmetry = symmetry
        self.identity_start = identity_start
        # gain = _GATE_RATE · gate scales the last layer's weight (or the scores); 0 = identity.
        self.gate = nn.Parameter(torch.tensor(0.0 if identity_start else 1.0 / _GATE_RATE))

    @property
    def gain(self) -> Tensor:
        """The factor on the last layer's weight (or on the scores), ``10 · gate`` (0-d)."""
        return _GATE_RATE * self.gate

    def _gated(self, raw: Tensor, bias: Tensor) -> Tensor:
        """``bias + gain · (raw - bias)``: the last layer's output with its weight scaled by the gain."""
        bias = bias.to(raw.dtype)
        return bias + self.gain.to(raw.dtype) * (raw - bias)

    @property
    def period(self) -> float:
        """The period of the reported angle, ``2π / symmetry``."""
        return 2 * math.pi / self.symmetry

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
        return (
            f"in_features={self.in_features}, symmetry={self.symmetry}, identity_start={self.identity_start}"
        )


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
        identity_start: start with gain 0, so θ = 0 for any input (see the module docstring).

    Shape:
        features ``(..., F)`` -> angle ``(...)``.

    Example:
        >>> head = UnitVectorHead(16, norm_weight=0.0)
        >>> p = head(torch.randn(4, 16))
        >>> p.angle.shape, bool((p.angle == 0).all())
        (torch.Size([4]), True)
        >>> moved = UnitVectorHead(16, norm_weight=0.0, identity_start=False)  # gain 1
        >>> q = moved(torch.randn(4, 16))
        >>> moved.loss(q, q.raw_angle.detach()).item() < 1e-6  # zero at the head's own angle
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
        identity_start: bool = True,
    ) -> None:
        if in_features is None:
            raise ValueError("in_features must be a positive int for UnitVectorHead, got None")
        super().__init__(in_features, symmetry=symmetry, identity_start=identity_start)
        if loss not in ("cosine", "von_mises"):
            raise ValueError(f"loss must be 'cosine' or 'von_mises'; got {loss!r}")
        self.loss_name, self.kappa, self.norm_weight = loss, kappa, norm_weight
        self.proj = nn.Linear(in_features, 2)
        with torch.no_grad():
            self.proj.bias.copy_(torch.tensor([1.0, 0.0]))

    def forward(self, features: Tensor) -> AnglePrediction:
        raw = self.proj(self._check_features(features))
        vec = self._gated(raw, self.proj.bias)
        psi = torch.atan2(vec[..., 1], vec[..., 0])
        return AnglePrediction(angle=self._finish(psi), raw=raw, raw_angle=psi)

    def loss(self, pred: AnglePrediction, target: Tensor, *, reduction: str = "mean") -> Tensor:
        """Cosine or von Mises loss on the normalised vector, plus the unit-norm penalty.

        Taken on the vector decoded (weight scaled by the gain) and on the layer's own
        output (gain 1), which trains the layer and the encoder at full strength from
        the first step, whatever the gain.
        """
        t = self._check_target(pred, target)
        return sum(
            self._vector_loss(vec, t, reduction) for vec in (self._gated(pred.raw, self.proj.bias), pred.raw)
        )

    def _vector_loss(self, vec: Tensor, t: Tensor, reduction: str) -> Tensor:
        v = F.normalize(vec, dim=-1, eps=1e-12)
        if self.loss_name == "cosine":
            value = 1 - (v[..., 0] * torch.cos(t) + v[..., 1] * torch.sin(t))
            value = losses._reduce(value, reduction)
        else:
            value = losses.von_mises_loss(v, t, kappa=self.kappa, reduction=reduction)
        return value + self.norm_weight * losses.unit_norm_penalty(vec, reduction=reduction)


class VonMisesHead(AngleHead):
    """A von Mises distribution: mean direction (normalised vector) and concentration κ.

    κ says how sure the head is (``1/κ`` ≈ the variance in rad² for large κ);
    :meth:`credible_arc` turns it into an arc that holds the truth with a given
    probability. The loss is the von Mises NLL
    (:func:`rotstn.losses.von_mises_nll`) plus the cosine loss ``1 - cos Δ`` of
    the mean (on the decoded and on the ungated output, see the module
    docstring). κ is trained by the NLL alone, a proper scoring rule: it is
    smallest when κ matches the spread of the mean's actual errors, which is
    what makes the arcs calibrated. The NLL's gradient to the mean is
    ``κ sin Δ``; at the identity start every error is possible, so the NLL
    first drives κ towards 0, and with it that gradient: alone it can stall
    with the mean unlearnt. The cosine term keeps the mean's gradient at
    least ``sin Δ`` (no schedule, no state).

    Args:
        in_features: feature size F.
        symmetry: order n of the object's rotational symmetry.
        kappa_max: upper bound on κ (keeps the NLL finite for perfect fits).
        identity_start: start with gain 0, so θ = 0 for any input (see the module docstring).

    Shape:
        features ``(..., F)`` -> angle and concentration ``(...)``.

    Example:
        >>> head = VonMisesHead(8)
        >>> p = head(torch.randn(3, 8))
        >>> p.concentration.shape, bool((p.concentration > 0).all())
        (torch.Size([3]), True)
    """

    def __init__(
        self, in_features: int, *, symmetry: int = 1, kappa_max: float = 1e3, identity_start: bool = True
    ) -> None:
        if in_features is None:
            raise ValueError("in_features must be a positive int for VonMisesHead, got None")
        super().__init__(in_features, symmetry=symmetry, identity_start=identity_start)
        self.kappa_max = kappa_max
        self.proj = nn.Linear(in_features, 3)
        with torch.no_grad():
            self.proj.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))

    def _mean_kappa(self, out: Tensor) -> tuple[Tensor, Tensor]:
        kappa = (F.softplus(out[..., 2]) + 1e-3).clamp(max=self.kappa_max)
        return torch.atan2(out[..., 1], out[..., 0]), kappa

    def forward(self, features: Tensor) -> AnglePrediction:
        raw = self.proj(self._check_features(features))
        psi, kappa = self._mean_kappa(self._gated(raw, self.proj.bias))
        confidence = torch.special.i1e(kappa) / torch.special.i0e(kappa)
        return AnglePrediction(
            angle=self._finish(psi), raw=raw, raw_angle=psi, concentration=kappa, confidence=confidence
        )

    def loss(self, pred: AnglePrediction, target: Tensor, *, reduction: str = "mean") -> Tensor:
        """The von Mises NLL plus the mean's cosine loss, on the decoded and the ungated output.

        The second (the layer's own output, gain 1) trains the layer and the encoder at
        full strength from the first step, whatever the gain.
        """
        t = self._check_target(pred, target)
        value = self.nll(pred, target, reduction=reduction) + losses.cosine_loss(
            pred.raw_angle, t, reduction=reduction
        )
        mean, kappa = self._mean_kappa(pred.raw)
        return (
            value
            + losses.von_mises_nll(mean, kappa, t, reduction=reduction)
            + losses.cosine_loss(mean, t, reduction=reduction)
        )

    def nll(self, pred: AnglePrediction, target: Tensor, *, reduction: str = "mean") -> Tensor:
        """Negative log-density of ``n · target`` under the predicted von Mises (per radian of ``nθ``)."""
        t = self._check_target(pred, target)
        return losses.von_mises_nll(pred.raw_angle, pred.concentration, t, reduction=reduction)

    def credible_arc(self, pred: AnglePrediction, level: float) -> Tensor:
        """Half-width h (radians of θ) of the arc ``[angle - h, angle + h]`` that holds ``level``.

        Example:
            >>> head = VonMisesHead(4, identity_start=False)
            >>> p = head(torch.randn(3, 4))
            >>> bool((head.credible_arc(p, 0.5) < head.credible_arc(p, 0.9)).all())
            True
        """
        if pred.concentration is None:
            raise ValueError("pred must be a VonMisesHead prediction (with a concentration), got none")
        return losses.von_mises_credible_arc(pred.concentration, level) / self.symmetry


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
        identity_start: start so that θ = 0 for any input: gain 0 (on the
            projection's weight, or with ``in_features=None`` on the scores)
            instead of 1, and logits peaked at bin 0.

    Shape:
        features ``(..., F)`` (or ``(..., K)``) -> angle ``(...)``; raw logits ``(..., K)``.

    Example:
        >>> head = BinnedHead(None, bins=16, identity_start=False)
        >>> logits = losses.circular_soft_labels(torch.tensor([1.0, -2.0]), 16).log()
        >>> head(logits).angle.detach().round(decimals=3)
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
        identity_start: bool = True,
    ) -> None:
        super().__init__(in_features, symmetry=symmetry, identity_start=identity_start)
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
        # Logits peaked at bin 0 and symmetric about it decode to exactly θ = 0.
        peak = torch.cos(torch.arange(bins) * self.bin_width)
        if in_features is None:
            self.proj = None
            # logits = gain · scores + max(1 - gain, 0) · peak: from gain 0 (the peak at bin 0
            # alone) the angle leaves 0 gradually as the gain grows, first towards scores that
            # beat the peak's small slope near 0; from gain 1 on, the scores alone.
            self.register_buffer("peak", peak, persistent=False)
        else:
            self.proj = nn.Linear(in_features, bins * (2 if residual else 1))
            # Residual offsets start at tanh(0) = 0.
            if identity_start:
                with torch.no_grad():
                    self.proj.bias.copy_(torch.cat((peak, torch.zeros(bins if residual else 0))))

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

    def logits(self, raw: Tensor) -> Tensor:
        """The ``(..., K)`` logits the angle is decoded from (``gain · scores + max(1 - gain, 0) · peak``)."""
        scores = raw[..., : self.bins]
        if self.proj is not None:
            return self._gated(scores, self.proj.bias[: self.bins])
        gain = self.gain.to(scores.dtype)
        return gain * scores + (1 - gain).clamp(min=0) * self.peak.to(scores.dtype)

    def forward(self, features: Tensor) -> AnglePrediction:
        scores, res = self._split(features)
        logits = self.logits(scores)
        psi, mass = self.decode(logits)
        raw = scores
        if res is not None:
            peak = logits.argmax(-1, keepdim=True)
            res_gated = self._gated(res, self.proj.bias[self.bins :])
            psi = psi + 0.5 * self.bin_width * torch.tanh(res_gated.gather(-1, peak).squeeze(-1))
            raw = torch.cat((scores, res), dim=-1)
        return AnglePrediction(angle=self._finish(psi), raw=raw, raw_angle=wrap_angle(psi), confidence=mass)

    def loss(self, pred: AnglePrediction, target: Tensor, *, reduction: str = "mean") -> Tensor:
        """Soft-label cross-entropy (KL) on the logits, plus a cosine loss on the residual.

        Reading scores directly, the loss is the KL of the scores themselves plus
        that of the decoded logits (:meth:`logits`): the first trains the encoder
        at full strength from the first step, whatever the gain; the second
        trains the gain (from 0 at the identity start).
        """
        t = self._check_target(pred, target)
        value = losses.circular_soft_cross_entropy(
            self.logits(pred.raw), t, width=self.label_width, window=self.window, reduction=reduction
        )
        # The layer's own output (gain 1) too: the encoder learns at full strength from step one.
        value = value + losses.circular_soft_cross_entropy(
            pred.raw[..., : self.bins], t, width=self.label_width, window=self.window, reduction=reduction
        )
        if self.residual:
            value = value + losses.cosine_loss(pred.raw_angle, t, reduction=reduction) / self.bin_width**2
        return value

    def nll(self, pred: AnglePrediction, target: Tensor, *, reduction: str = "mean") -> Tensor:
        """Negative log-density of ``n · target`` under the bins (:func:`rotstn.losses.binned_nll`)."""
        t = self._check_target(pred, target)
        return losses.binned_nll(self.logits(pred.raw), t, reduction=reduction)

    def credible_arc(self, pred: AnglePrediction, level: float) -> Tensor:
        """Half-width h (radians of θ) of the arc ``[angle - h, angle + h]`` holding ``level`` of the mass.

        Example:
            >>> head = BinnedHead(None, bins=16, identity_start=False)
            >>> p = head(losses.circular_soft_labels(torch.tensor([1.0]), 16, width=2.0).log())
            >>> bool(head.credible_arc(p, 0.5) < head.credible_arc(p, 0.9))
            True
        """
        return losses.binned_credible_arc(self.logits(pred.raw), pred.raw_angle, level) / self.symmetry


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
