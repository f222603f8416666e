"""Module twins of the functional layer, and the rotation STN built on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import _validate
from .encoders import ConcatEncoder, ConvEncoder, PolarCorrelationEncoder
from .functional import AngleLike, CenterLike, rotate, wrap_angle
from .heads import AngleHead, AnglePrediction, build_head

__all__ = ["Rotate", "RotationSTN", "STNOutput"]


class Rotate(nn.Module):
    """``nn.Module`` form of :func:`rotstn.rotate`.

    Convention as in :mod:`rotstn.functional`: radians, counter-clockwise as
    displayed, centre ``(x, y)`` pixels.

    Args:
        angle: a fixed angle (number, ``()`` or ``(B,)``) used when ``forward``
            gets none. Stored as a buffer, or as a parameter with ``learnable=True``.
        center: ``(x, y)`` pixels, ``(2,)`` or ``(B, 2)``; default the image centre.
        mode, padding_mode, align_corners: as in :func:`rotstn.rotate`.
        learnable: make ``angle`` an ``nn.Parameter`` (starts at ``angle`` or 0).

    Shape:
        ``forward(image, angle=None)``: image ``(B, C, H, W)`` or ``(C, H, W)``;
        output as :func:`rotstn.rotate`.

    Example:
        >>> layer = Rotate(learnable=True)
        >>> layer(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 1, 8, 8])
    """

    angle: Tensor | None

    def __init__(
        self,
        angle: AngleLike | None = None,
        center: CenterLike = None,
        *,
        mode: str = "bilinear",
        padding_mode: str = "zeros",
        align_corners: bool = False,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        self.mode = _validate.choice(mode, _validate.MODES, "mode")
        self.padding_mode = _validate.choice(padding_mode, _validate.PADDING_MODES, "padding_mode")
        self.align_corners = _validate.flag(align_corners, "align_corners")
        if learnable and angle is None:
            angle = 0.0
        a = None if angle is None else torch.as_tensor(angle, dtype=torch.get_default_dtype()).clone()
        if a is not None and a.dim() > 1:
            raise ValueError(f"angle must have shape () or (B,), got {_validate.shape_str(a)}")
        if learnable:
            self.angle = nn.Parameter(a)
        else:
            self.register_buffer("angle", a)
        c = None if center is None else torch.as_tensor(center, dtype=torch.get_default_dtype()).clone()
        self.register_buffer("center", c)

    def forward(self, image: Tensor, angle: AngleLike | None = None) -> Tensor:
        if angle is None:
            if self.angle is None:
                raise ValueError("angle is required: pass it to forward() or to Rotate(angle=...)")
            angle = self.angle
        return rotate(
            image,
            angle,
            self.center,
            mode=self.mode,
            padding_mode=self.padding_mode,
            align_corners=self.align_corners,
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, padding_mode={self.padding_mode!r}, align_corners={self.align_corners}"


@dataclass
class STNOutput:
    """What :class:`RotationSTN` returns.

    Attributes:
        warped: ``(B, C, H, W)`` the input turned by ``angle`` (one resampling of the original).
        angle: ``(B,)`` radians, the sum of the per-step predictions.
        concentration: ``(B,)`` von Mises κ of the last step (von Mises head), else None.
        confidence: ``(B,)`` the last step's confidence in [0, 1] where the head has one.
        steps: one ``(base, prediction)`` per refinement step: ``base`` ``(B,)`` is the
            angle the input was turned by before the step, ``prediction`` the head's
            :class:`rotstn.heads.AnglePrediction` of the residual.
    """

    warped: Tensor
    angle: Tensor
    concentration: Tensor | None
    confidence: Tensor | None
    steps: list[tuple[Tensor, AnglePrediction]]


class RotationSTN(nn.Module):
    """A spatial transformer that predicts one rotation per image and applies it.

    Convention as in :mod:`rotstn.functional`: radians, counter-clockwise as
    displayed, about the image centre (or ``center``).

    * ``paired=True``: ``forward(moving, fixed)`` predicts the angle θ with
      ``rotstn.rotate(moving, θ) ≈ fixed`` (the sign of :func:`rotstn.register`).
      If ``moving = rotate(fixed, α)``, that angle is −α: train with
      ``stn.angle_loss(out, rotated_by=alpha)``.
    * ``paired=False``: ``forward(x)`` predicts the angle that brings ``x`` to a
      canonical pose learned from the data (the classic STN in front of a classifier).
      If ``x = rotate(canonical, α)``, that angle is −α: train with
      ``stn.angle_loss(out, rotated_by=alpha)``.
      The downstream loss's gradient only says which way a small turn helps; to
      also train the STN towards the turn that loss scores best, add
      ``stn.angle_loss(out, rotstn.best_turn(x, per_image_loss, around=out.angle))``.

    The encoder reads the image(s), the head turns features into an angle, and
    :func:`rotstn.rotate` warps; gradients from a loss on ``.warped`` or
    ``.angle`` reach every encoder parameter. The default encoder is
    :class:`rotstn.encoders.PolarCorrelationEncoder`, which scores all 128
    candidate angles by circular cross-correlation of polar feature maps, read
    by a :class:`rotstn.heads.BinnedHead`; with another head the default is a
    :class:`rotstn.encoders.ConvEncoder` (paired: on both images stacked as channels).
    A fresh STN predicts θ = 0 for any input, i.e. starts as the identity, by
    its initialisation, not by a schedule: the module holds no counter, so
    ``forward`` is a function of the inputs and the parameters, the same in
    every call, in training and in evaluation, eager or compiled.
    ``state_dict`` holds the parameters and the fixed ``center`` only.
    Paired, the identity is the head's gain at 0 (:mod:`rotstn.heads`): the
    correlation of the two images already points at the answer, and the
    gain's gradient follows it. Unpaired with the default encoder, the
    identity is the encoder's **zero template** and the head starts at gain 1
    (:class:`rotstn.encoders.PolarCorrelationEncoder`): a gain of 0 in front
    of a random template let a downstream loss's gradient reach one number
    only, the gain, through the random template's opinion of each image,
    which is noise (the gain took a random sign, negative for seed 0 on
    rotated MNIST, and the STN never learnt to canonicalise from a class loss;
    ``benchmarks/stcnn.py``). With the zero template that gradient reaches
    every template entry from the first step, each image's feature map
    weighted by the turn that image needs, as in the spatial transformer
    paper's zero-initialised localisation layer.

    With ``steps=k`` it refines: predict, turn the input by the estimate,
    predict the residual, k times. The angles add up, and ``.warped`` is the
    **original** image resampled once by the total (no blur from resampling a
    resampled image).

    Args:
        in_channels: C of the images.
        paired: two images (registration) or one (canonical pose).
        encoder: a module mapping ``(moving, fixed)`` (paired) or ``x`` to features
            ``(B, F)`` (its ``out_features`` attribute gives F) or per-bin scores ``(B, K)``.
        head: an :class:`rotstn.heads.AngleHead` or one of ``"binned"``,
            ``"unit_vector"``, ``"von_mises"``.
        steps: refinement steps k >= 1.
        center: ``(x, y)`` pixels to rotate about; default the image centre.
        mode, padding_mode: as in :func:`rotstn.rotate`.
        head_kwargs: passed to the head when ``head`` is a name (``bins``, ``symmetry``,
            ``identity_start=False`` to keep PyTorch's initialisation, ...).

    Shape:
        images ``(B, C, H, W)``, any H, W; ``.warped`` ``(B, C, H, W)``, ``.angle`` ``(B,)``.

    Example:
        >>> stn = RotationSTN(1)
        >>> out = stn(torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28))
        >>> out.warped.shape, out.angle.shape, bool((out.angle == 0).all())
        (torch.Size([2, 1, 28, 28]), torch.Size([2]), True)
        >>> loss = stn.angle_loss(out, rotated_by=torch.tensor([0.5, -1.0]))  # moving = rotate(fixed, α)
    """

    def __init__(
        self,
        in_channels: int,
        *,
        paired: bool = True,
        encoder: nn.Module | None = None,
        head: AngleHead | str = "binned",
        steps: int = 1,
        center: CenterLike = None,
        mode: str = "bilinear",
        padding_mode: str = "zeros",
        **head_kwargs: object,
    ) -> None:
        super().__init__()
        self.paired = _validate.flag(paired, "paired")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.steps = steps
        self.mode = _validate.choice(mode, _validate.MODES, "mode")
        self.padding_mode = _validate.choice(padding_mode, _validate.PADDING_MODES, "padding_mode")
        if encoder is None:
            if head == "binned":
                identity = head_kwargs.get("identity_start", True)
                encoder = PolarCorrelationEncoder(
                    in_channels,
                    paired=paired,
                    bins=head_kwargs.get("bins", 128),
                    identity_start=identity if isinstance(identity, bool) else True,
                )
                if not paired:
                    # The zero template gives the identity and passes the gradient on; a gain
                    # of 0 in the head as well would stop it (see the class docstring).
                    head_kwargs = {**head_kwargs, "identity_start": False}
            elif paired:
                encoder = ConcatEncoder(in_channels)
            else:
                encoder = ConvEncoder(in_channels)
        elif not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        if isinstance(head, str):
            head = build_head(head, getattr(encoder, "out_features", None), **head_kwargs)
        elif not isinstance(head, AngleHead):
            raise TypeError(f"head must be an rotstn.heads.AngleHead or a name, got {type(head).__name__}")
        elif head_kwargs:
            raise TypeError(f"head options {sorted(head_kwargs)} only apply when head is given by name")
        self.encoder, self.head = encoder, head
        c = None if center is None else torch.as_tensor(center, dtype=torch.get_default_dtype()).clone()
        self.register_buffer("center", c)

    def _rotate(self, x: Tensor, angle: Tensor) -> Tensor:
        return rotate(x, angle, self.center, mode=self.mode, padding_mode=self.padding_mode)

    def forward(self, moving: Tensor, fixed: Tensor | None = None) -> STNOutput:
        x = _validate.image(moving, "moving" if self.paired else "x")
        if moving.dim() != 4:
            raise ValueError(
                f"{'moving' if self.paired else 'x'} must be (B, C, H, W), got {tuple(moving.shape)}"
            )
        if self.paired and fixed is None:
            raise ValueError("fixed is required: this RotationSTN is paired (forward(moving, fixed))")
        if not self.paired and fixed is not None:
            raise ValueError("this RotationSTN has paired=False: call forward(x) with one image")
        total = x.new_zeros(x.shape[0])
        steps: list[tuple[Tensor, AnglePrediction]] = []
        for i in range(self.steps):
            current = x if i == 0 else self._rotate(x, total)
            features = self.encoder(current, fixed) if self.paired else self.encoder(current)
            pred = self.head(features)
            if pred.angle.shape != total.shape:
                raise ValueError(
                    f"the head must give one angle per image, shape ({x.shape[0]},), "
                    f"got {tuple(pred.angle.shape)}"
                )
            steps.append((total, pred))
            total = total + pred.angle
        last = steps[-1][1]
        return STNOutput(
            warped=self._rotate(x, total),
            angle=total,
            concentration=last.concentration,
            confidence=last.confidence,
            steps=steps,
        )

    def angle_loss(
        self, output: STNOutput, target_angle: Tensor | None = None, *, rotated_by: Tensor | None = None
    ) -> Tensor:
        """The head's loss, averaged over the refinement steps; give the target as you hold it.

        Give exactly one of:

        * ``target_angle``: the angle the STN should **apply**, the ``rotate``
          sign of ``.angle`` (paired: ``rotate(moving, target) ≈ fixed``;
          unpaired: ``rotate(x, target)`` is in canonical pose).
        * ``rotated_by=α``: how the input was **made**: unpaired ``x =
          rotate(canonical, α)``, paired ``moving = rotate(fixed, α)``. The
          target is then −α (wrapped; modulo 2π/n for a head with ``symmetry=n``).

        The two differ by a sign, and the wrong one cannot be learnt at all
        by the default encoders: they are rotation-equivariant by design (the
        polar correlation turns a rotation of the input into a shift of the
        scores), so the angle they report for ``rotate(c, α)`` moves by −α.
        Trained on the rotation *it was made with* as ``target_angle``, a
        default unpaired STN on '3's at multiples of 20° ends at tens of
        degrees of error with no error message. Any other encoder that fits
        the wrong sign gives ``.warped = rotate(x, α)``, turned twice as far
        from the canonical pose instead of back to it.

        Step i is trained to predict the residual ``target - base_i`` (wrapped; the
        base is held fixed), so every step learns to correct what is left.

        Args:
            output: what ``forward`` returned.
            target_angle: ``(B,)`` radians, the angle to apply (positional).
            rotated_by: ``(B,)`` radians, the angle the input was rotated by (keyword only).

        Returns:
            A 0-d tensor, the mean over the batch and the steps.

        Example:
            >>> stn = RotationSTN(1, paired=False)
            >>> alpha = torch.tensor([0.3, -2.0])
            >>> x = rotate(torch.rand(1, 1, 16, 16), alpha)  # x = rotate(canonical, α)
            >>> out = stn(x)
            >>> torch.equal(stn.angle_loss(out, rotated_by=alpha), stn.angle_loss(out, -alpha))
            True
        """
        if not isinstance(output, STNOutput):
            raise TypeError(f"output must be the STNOutput of forward(), got {type(output).__name__}")
        if (target_angle is None) == (rotated_by is None):
            got = "neither" if target_angle is None else "both"
            raise ValueError(
                "give exactly one of target_angle (the angle the STN should apply, the rotate sign) "
                f"and rotated_by= (the angle the input was rotated by), got {got}"
            )
        name, value = ("target_angle", target_angle) if rotated_by is None else ("rotated_by", rotated_by)
        if not isinstance(value, Tensor) or value.shape != output.angle.shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a tensor of shape {tuple(output.angle.shape)}, got {got}")
        target = target_angle if rotated_by is None else wrap_angle(-rotated_by)
        total = sum(self.head.loss(pred, wrap_angle(target - base.detach())) for base, pred in output.steps)
        return total / len(output.steps)
