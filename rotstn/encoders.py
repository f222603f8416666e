"""Default encoders for :class:`rotstn.RotationSTN`.

Convention
----------
An encoder turns images into what a head reads. Single-input encoders take
``forward(x)`` with ``x`` of shape ``(B, C, H, W)``; paired encoders take
``forward(moving, fixed)``. ``out_features`` is the feature size F of the
``(B, F)`` output, or ``None`` when the output is one score per angle bin
``(B, bins)`` (then ``bins`` says how many), which a
:class:`rotstn.heads.BinnedHead` built with ``in_features=None`` reads directly.
Any input size works (adaptive pooling, or resampling onto a fixed polar grid).

Angles follow :mod:`rotstn.functional`: radians, counter-clockwise as displayed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _validate

__all__ = ["ConcatEncoder", "ConvEncoder", "PolarCorrelationEncoder", "polar_grid"]

# Unpaired identity start. Adam moves every template entry by about its learning rate per
# step, whatever the gradient's size, so a template of N entries stored as is would reach
# norm 1 (full-strength scores) in a few steps, long before a downstream loss says anything
# but noise: it is stored as template / scale, scale = _TEMPLATE_STEP / sqrt(N), and its norm
# grows by at most about _TEMPLATE_STEP · lr per step. _TURN_COST is the height of the cosine
# added to the scores, the cost of turning: a small template turns an image by a little.
_TEMPLATE_STEP = 8.0
_TURN_COST = 2.0


class ConvEncoder(nn.Module):
    """A small CNN: three strided 3×3 conv blocks, adaptive pooling to 4×4, a linear layer.

    Args:
        in_channels: C of the input.
        width: channels of the first block (doubled in the later ones).
        out_features: F.

    Shape:
        ``(B, C, H, W)`` (any H, W >= 1) -> ``(B, F)``.

    Example:
        >>> ConvEncoder(1, out_features=32)(torch.rand(2, 1, 28, 40)).shape
        torch.Size([2, 32])
    """

    def __init__(self, in_channels: int, *, width: int = 16, out_features: int = 128) -> None:
        super().__init__()
        _check_channels(in_channels)
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
            nn.ReLU(),
            _AdaptiveAvgPool(4),
            nn.Flatten(),
            nn.Linear(2 * w * 16, out_features),
            nn.ReLU(),
        )
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.features(_validate.image(x, "x"))


class ConcatEncoder(nn.Module):
    """The obvious paired encoder: stack moving and fixed as channels, one CNN.

    It has to learn rotation from scratch in its filters, and it is the
    baseline the polar correlation encoder is measured against
    (``examples/paired_digits.py``).

    Shape:
        ``forward(moving, fixed)``, each ``(B, C, H, W)`` -> ``(B, F)``.

    Example:
        >>> ConcatEncoder(1, out_features=8)(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)).shape
        torch.Size([2, 8])
    """

    def __init__(self, in_channels: int, *, width: int = 16, out_features: int = 128) -> None:
        super().__init__()
        _check_channels(in_channels)
        self.net = ConvEncoder(2 * in_channels, width=width, out_features=out_features)
        self.out_features = out_features

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        m, f = _pair(moving, fixed)
        return self.net(torch.cat((m, f), dim=1))


def polar_grid(
    size: tuple[int, int],
    radii: int,
    bins: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """A ``grid_sample`` grid ``(1, radii, bins, 2)`` on circles about the image centre.

    Row j samples the circle of radius ``(j + 0.5) / radii · min(H, W) / 2`` pixels
    about ``((W-1)/2, (H-1)/2)``; column k the direction ``2πk / bins`` measured
    counter-clockwise as displayed. So rotating the image by ``α`` shifts the
    polar image by ``α / (2π / bins)`` columns: a rotation becomes a circular shift.
    The grid is for ``align_corners=False``.

    Example:
        >>> polar_grid((28, 28), 8, 64).shape
        torch.Size([1, 8, 64, 2])
    """
    h, w = _validate.size(size)
    dtype = dtype or torch.get_default_dtype()
    r = (torch.arange(radii, device=device, dtype=dtype) + 0.5) / radii * (min(h, w) / 2)
    phi = torch.arange(bins, device=device, dtype=dtype) * (2 * math.pi / bins)
    # Pixel (x, y) with y pointing down; counter-clockwise as displayed is -y.
    x = (w - 1) / 2 + r[:, None] * torch.cos(phi)
    y = (h - 1) / 2 - r[:, None] * torch.sin(phi)
    return torch.stack(((2 * x + 1) / w - 1, (2 * y + 1) / h - 1), dim=-1).unsqueeze(0)


class _PolarConv(nn.Module):
    """3×3 convolution on a polar image: circular along the angle, zero-padded along the radius."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (1, 1, 0, 0), mode="circular")
        return self.conv(F.pad(x, (0, 0, 1, 1)))


class PolarCorrelationEncoder(nn.Module):
    """Score every rotation at once: polar resampling, a shared CNN, circular cross-correlation.

    Both images are resampled onto the polar grid of :func:`polar_grid`, where a
    rotation is a circular shift along the angle axis. A small CNN with circular
    padding along that axis (shared by the two inputs: a siamese encoder)
    commutes with those shifts, so its feature maps shift with the image. The
    normalised circular cross-correlation of the two feature maps, computed
    for all ``bins`` shifts by FFT, scores every candidate angle: score k is
    high when turning ``moving`` by ``2πk / bins`` makes it look like ``fixed``.
    The network only has to learn features that make the right peak sharp,
    not rotation itself, which is why it trains in minutes on a CPU.

    With ``paired=False`` the second input is a learned canonical template
    (a parameter in feature space): the scores say how far to turn ``x`` to
    bring it to the canonical pose.

    Identity start (``identity_start=True``, unpaired only): the template
    starts at zero, so every score is 0, which a :class:`rotstn.heads.BinnedHead`
    decodes as θ = 0 exactly, for any input. The template is the last layer
    of this localisation net, and it starts at zero like the zero-initialised
    regression layer of the spatial transformer paper: a downstream loss's
    gradient at θ = 0 reaches every template entry from the first step
    (``∂score_s/∂template`` is the input's feature map shifted by s, so the
    template learns the turn each image needs), and the turns the STN makes
    grow smoothly from 0 as the template does. The template is divided by its
    norm only once that norm exceeds 1 (the input's features always are), so
    a small template gives small, smooth scores instead of a random template's
    arbitrary angles. Two more pieces keep that start smooth (``docs/learning.md``,
    issue 22): the template is used as ``template_scale · template`` (``8 / sqrt(N)``
    for N entries), so Adam's per-entry steps grow its norm by about ``8 · lr`` per
    step instead of reaching full strength from the first steps' noise, and
    ``turn_cost`` (2) times a cosine peaked at bin 0 is added to the scores, so a
    small template turns an image by a little, not to the argmax of a tiny score.
    ``identity_start=False`` starts from a random template
    (PyTorch-style noise); a random template gives each image a fixed but
    arbitrary canonical pose, and a downstream loss has to undo that first.

    Args:
        in_channels: C.
        paired: compare two images (True) or an image with a learned template.
        bins: angle samples K (the output size), default 128.
        radii: radial samples R, default 16.
        width: feature channels, default 16.
        depth: number of conv layers, default 3.
        identity_start: unpaired: start the template at zero (θ = 0 for any
            input, see above) instead of at random. Ignored when paired.

    Shape:
        ``forward(moving, fixed)`` (or ``forward(x)``), ``(B, C, H, W)`` any size
        -> scores ``(B, bins)``; ``out_features`` is None.

    Example:
        >>> enc = PolarCorrelationEncoder(1, bins=32)
        >>> enc(torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 32])
    """

    out_features = None

    def __init__(
        self,
        in_channels: int,
        *,
        paired: bool = True,
        bins: int = 128,
        radii: int = 16,
        width: int = 16,
        depth: int = 3,
        identity_start: bool = True,
    ) -> None:
        super().__init__()
        _check_channels(in_channels)
        for name, v, lo in (("bins", bins, 4), ("radii", radii, 1), ("width", width, 1), ("depth", depth, 1)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        self.paired, self.bins, self.radii = _validate.flag(paired, "paired"), bins, radii
        layers: list[nn.Module] = []
        cin = in_channels
        for i in range(depth):
            layers.append(_PolarConv(cin, width))
            if i < depth - 1:
                layers.append(nn.ReLU())
            cin = width
        self.features = nn.Sequential(*layers)
        # Sharpness of the softmax over shifts; learned, in log space so it can grow fast.
        self.log_gain = nn.Parameter(torch.tensor(math.log(20.0)))
        if not isinstance(identity_start, bool):
            raise TypeError(f"identity_start must be a bool, got {identity_start!r}")
        self.identity_start = identity_start
        self.template = None
        # Unpaired identity start: the template's step and the turning cost (see the class docstring).
        slow = not paired and identity_start
        self.template_scale = _TEMPLATE_STEP / math.sqrt(width * radii * bins) if slow else 1.0
        self.turn_cost = _TURN_COST if slow else 0.0
        self.register_buffer(
            "cost", self.turn_cost * torch.cos(torch.arange(bins) * (2 * math.pi / bins)), persistent=False
        )
        if not paired:
            start = torch.zeros if identity_start else lambda *s: torch.randn(*s) * 0.1
            self.template = nn.Parameter(start(width, radii, bins))

    def polar_features(self, x: Tensor) -> Tensor:
        """``(B, width, radii, bins)`` features of the polar image of ``x``."""
        x = _validate.image(x, "x")
        grid = polar_grid(x.shape[-2:], self.radii, self.bins, device=x.device, dtype=x.dtype)
        polar = F.grid_sample(x, grid.expand(x.shape[0], -1, -1, -1), align_corners=False)
        return self.features(polar)

    def forward(self, moving: Tensor, fixed: Tensor | None = None) -> Tensor:
        if self.paired:
            if fixed is None:
                raise ValueError("fixed is required: this encoder is paired (forward(moving, fixed))")
            moving, fixed = _pair(moving, fixed)
            both = self.polar_features(torch.cat((moving, fixed)))
            # Slices, not chunk(2): chunk makes torch.export specialise the batch size.
            fm, ff = both[: moving.shape[0]], both[moving.shape[0] :]
        else:
            if fixed is not None:
                raise ValueError("this encoder has paired=False: call forward(x) with one image")
            fm = self.polar_features(moving)
            ff = (self.template_scale * self.template).unsqueeze(0).to(fm.dtype)
        fm = fm - fm.mean(dim=-1, keepdim=True)
        ff = ff - ff.mean(dim=-1, keepdim=True)
        fm = fm / (fm.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-6)
        if self.paired:
            ff = ff / (ff.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-6)
        else:
            # Not blown up while small: a zero template gives zero scores with a finite gradient.
            ff = ff / ff.flatten(1).norm(dim=1).clamp(min=1.0).view(-1, 1, 1, 1)
        scores = torch.exp(self.log_gain) * _circular_correlation(fm, ff)
        if self.turn_cost:
            scores = scores + self.cost.to(scores.dtype)
        return scores

    def extra_repr(self) -> str:
        return f"paired={self.paired}, bins={self.bins}, radii={self.radii}"


class _AdaptiveAvgPool(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` that the TorchScript ONNX exporter also takes.

    That exporter only writes adaptive pooling whose output size divides the
    input size. Under ONNX export the same averages are written as two
    matrix products with the (constant, for a fixed image size) averaging
    matrices; the eager path is aten's kernel.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not torch.onnx.is_in_onnx_export():
            return super().forward(x)
        return (
            _pool_matrix(x.shape[-2], self.output_size, x)
            @ x
            @ _pool_matrix(x.shape[-1], self.output_size, x).T
        )


def _pool_matrix(n: int | Tensor, out: int, like: Tensor) -> Tensor:
    # Output cell i averages inputs floor(i·n/out) .. ceil((i+1)·n/out) - 1, as aten does.
    n = int(n)
    i = torch.arange(out)
    start, stop = (i * n) // out, ((i + 1) * n + out - 1) // out
    j = torch.arange(n)
    inside = (j >= start[:, None]) & (j < stop[:, None])
    return (inside / (stop - start)[:, None]).to(like.dtype)


def _circular_correlation(fm: Tensor, ff: Tensor) -> Tensor:
    """``score[b, s] = Σ_{c, r, k} fm[b, c, r, k] · ff[b, c, r, k + s]`` (k + s mod K), shape (B, K)."""
    bins = fm.shape[-1]
    if not torch.onnx.is_in_onnx_export():
        # score[s] = sum_k fm[k] * ff[k + s]: turning moving by s bins matches fixed.
        spec = torch.conj(torch.fft.rfft(fm, dim=-1)) * torch.fft.rfft(ff, dim=-1)
        return torch.fft.irfft(spec.sum(dim=(1, 2)), n=bins, dim=-1)
    # The TorchScript ONNX exporter has no FFT: the same DFT as products with cos/sin matrices.
    k = torch.arange(bins, dtype=torch.float64)
    phase = torch.remainder(k[:, None] * k, bins) * (2 * math.pi / bins)
    cos, sin = torch.cos(phase).to(fm.dtype), torch.sin(phase).to(fm.dtype)
    mr, mi = fm @ cos, -(fm @ sin)
    fr, fi = ff @ cos, -(ff @ sin)
    # conj(M) · F, summed over channels and radii, then the inverse DFT's real part.
    pr = (mr * fr + mi * fi).sum(dim=(1, 2))
    pi = (mr * fi - mi * fr).sum(dim=(1, 2))
    return (pr @ cos - pi @ sin) / bins


def _check_channels(in_channels: object) -> None:
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")


def _pair(moving: Tensor, fixed: Tensor) -> tuple[Tensor, Tensor]:
    m, f = _validate.image(moving, "moving"), _validate.image(fixed, "fixed")
    if m.shape != f.shape:
        raise ValueError(
            "moving and fixed must have the same shape, "
            f"got {_validate.shape_str(m)} and {_validate.shape_str(f)}"
        )
    return m, f
