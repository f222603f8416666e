"""register(model="rotation"): rotation about the centre, on pictures rotated by scipy; conventions, errors.

The rigid model (the default) has its own file, test_rigid.py.

References nobody here wrote: scipy.ndimage.rotate makes the pairs, torch.rot90
gives exact quarter turns, and scikit-image's Fourier–Mellin recipe
(warp_polar + phase_cross_correlation) is the classical estimate we must agree with.
"""

import functools
import math

import numpy as np
import pytest
import torch
from helpers import real_image

import rotstn
from rotstn.data import rotated_pairs
from rotstn.registration._rotation import _Disc

register = functools.partial(rotstn.register, model="rotation")

FULL_CIRCLE = [math.radians(a) for a in (-179.5, -135.0, -90.0, -33.3, 0.0, 12.7, 90.0, 180.0)]


def error_deg(estimate, truth):
    return rotstn.angle_difference(estimate.double(), truth.double()).abs().rad2deg()


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (81, 57)])
def test_recovers_scipy_rotations_over_the_full_circle(size):
    pairs = rotated_pairs(len(FULL_CIRCLE), size, angles=FULL_CIRCLE, seed=1)
    result = register(pairs.fixed, pairs.moving)
    err = error_deg(result.angle, pairs.angle)
    assert err.max() < 0.1, err
    assert result.angle.shape == (len(FULL_CIRCLE),)
    assert bool(((result.angle > -math.pi) & (result.angle <= math.pi)).all())
    assert result.score.min() > 0.95


def test_noise_and_photometric_change():
    pairs = rotated_pairs(10, (96, 96), noise=0.05, photometric=True, seed=3)
    result = register(pairs.fixed, pairs.moving)
    err = error_deg(result.angle, pairs.angle)
    assert err.median() < 0.1 and err.max() < 1.0, err


def test_refinement_improves_the_global_estimate():
    pairs = rotated_pairs(10, (64, 64), seed=4)
    coarse = error_deg(register(pairs.fixed, pairs.moving, iterations=0).angle, pairs.angle)
    fine = error_deg(register(pairs.fixed, pairs.moving).angle, pairs.angle)
    assert coarse.max() < 0.5
    assert fine.mean() < coarse.mean() / 2


@pytest.mark.parametrize("theta", [0.3, -2.5, math.pi])
def test_sign_convention(theta):
    # register(fixed=rotate(x, θ), moving=x) gives θ: rotate(moving, θ) ≈ fixed.
    x = real_image(64, 96, seed=2)
    result = register(rotstn.rotate(x, theta), x)
    assert error_deg(result.angle, torch.tensor([theta])).item() < 0.01


def test_quarter_turn_from_rot90():
    x = real_image(64, 64, seed=5)
    result = register(torch.rot90(x, 1, (-2, -1)), x)
    assert error_deg(result.angle, torch.tensor([math.pi / 2])).item() < 0.01
    # The aligned image is moving rotated by the answer, and it matches fixed on the disc.
    disc = _Disc(64, 64, torch.float64, x.device)
    fixed = disc.take(torch.rot90(x, 1, (-2, -1)))
    assert (disc.take(result.aligned) - fixed).abs().max() < 1e-3


def test_agrees_with_scikit_image_fourier_mellin():
    from scipy import ndimage
    from skimage.filters import window
    from skimage.registration import phase_cross_correlation
    from skimage.transform import warp_polar

    def fourier_mellin(fixed, moving, n=720):
        hann = window("hann", fixed.shape)

        def polar(x):
            spectrum = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2((x - x.mean()) * hann))))
            radius = x.shape[0] // 2
            return warp_polar(spectrum, radius=radius, output_shape=(n, radius))[: n // 2, 2:]

        shift = phase_cross_correlation(polar(fixed), polar(moving), upsample_factor=20, normalization=None)
        shift = shift[0]
        angle = -shift[0] * 360 / n  # warp_polar's angle runs clockwise as displayed
        candidates = [angle, angle + 180]
        scores = [np.corrcoef(ndimage.rotate(moving, a, reshape=False, order=1)[32:96, 32:96].ravel(),
                              fixed[32:96, 32:96].ravel())[0, 1] for a in candidates]  # fmt: skip
        return math.radians(candidates[int(np.argmax(scores))])

    angles = [math.radians(a) for a in (-150, -60, 25, 100, 170, -20)]
    pairs = rotated_pairs(6, (128, 128), images=("camera", "astronaut", "coins"), angles=angles, seed=2)
    ours = register(pairs.fixed, pairs.moving).angle
    peer = torch.tensor([fourier_mellin(f[0].double().numpy(), m[0].double().numpy())
                         for f, m in zip(pairs.fixed, pairs.moving, strict=True)])  # fmt: skip
    assert error_deg(ours, peer).max() < 1.5
    assert error_deg(ours, pairs.angle).median() < error_deg(peer, pairs.angle).median()


def test_batch_broadcasting_and_3d_inputs():
    pairs = rotated_pairs(3, (48, 64), seed=6)
    moving = rotstn.rotate(pairs.fixed[:1], torch.tensor([-0.5, 0.2, 1.0]))
    one_fixed = register(pairs.fixed[:1], moving)
    assert one_fixed.angle.shape == (3,) and one_fixed.aligned.shape == (3, 1, 48, 64)
    assert error_deg(one_fixed.angle, torch.tensor([0.5, -0.2, -1.0])).max() < 0.1
    single = register(pairs.fixed[1], pairs.moving[1])
    assert single.angle.shape == (1,) and single.aligned.shape == (1, 1, 48, 64)
    assert error_deg(single.angle, pairs.angle[1:2]).item() < 0.1


def test_colour_images_rotate_every_channel():
    from scipy import ndimage
    from skimage import data

    rgb = data.astronaut()[40:240, 150:350].astype(np.float64) / 255
    turned = ndimage.rotate(rgb, 70.0, axes=(1, 0), reshape=False, order=3)
    fixed = torch.from_numpy(turned[50:150, 50:150]).permute(2, 0, 1)
    moving = torch.from_numpy(rgb[50:150, 50:150]).permute(2, 0, 1).contiguous()
    result = register(fixed, moving)
    assert error_deg(result.angle, torch.tensor([math.radians(70.0)])).item() < 0.05
    assert result.aligned.shape == (1, 3, 100, 100)
    disc = _Disc(100, 100, torch.float64, fixed.device)
    for c in range(3):
        aligned, expected = disc.take(result.aligned[:, c : c + 1])[0], disc.take(fixed[None, c : c + 1])[0]
        assert np.corrcoef(aligned, expected)[0, 1] > 0.99


def test_score_flags_a_wrong_pair():
    pairs = rotated_pairs(2, (64, 64), images=("camera", "grass"), seed=7)
    good = register(pairs.fixed, pairs.moving)
    swapped = register(pairs.fixed, pairs.moving.flip(0))
    assert good.score.min() > 0.95
    assert swapped.score.max() < 0.5


def test_dtypes_and_detached_outputs():
    x = real_image(48, 48, seed=8).requires_grad_()
    fixed = rotstn.rotate(x, 0.7)
    result = register(fixed, x)
    assert result.angle.dtype == torch.float64 and not result.angle.requires_grad
    assert not result.aligned.requires_grad
    half = register(fixed.detach().half(), x.detach().half())
    assert half.angle.dtype == torch.float32 and half.aligned.dtype == torch.float16
    assert error_deg(half.angle, torch.tensor([0.7])).item() < 0.1


def test_device(device):
    pairs = rotated_pairs(2, (48, 48), seed=9)
    result = register(pairs.fixed.to(device), pairs.moving.to(device))
    assert result.angle.device.type == device
    assert error_deg(result.angle.cpu(), pairs.angle).max() < 0.1


def test_disc_sampling_equals_rotate():
    # The refinement samples only the disc; it must read what rotate() writes there.
    x = real_image(40, 56, seed=10)
    angle = torch.tensor([0.4, -2.0], dtype=torch.float64)
    disc = _Disc(40, 56, torch.float64, x.device)
    expected = disc.take(rotstn.rotate(x, angle))
    torch.testing.assert_close(disc.sample(x.expand(2, -1, -1, -1), angle), expected)


def test_init_callable_and_object_with_angle():
    # An image with exact 2-fold symmetry has two equally good answers, θ and θ + π:
    # the initialiser decides which one comes back.
    x = real_image(64, 64, seed=11)
    x = x + torch.rot90(x, 2, (-2, -1))
    theta = torch.tensor([0.6], dtype=torch.float64)
    fixed = rotstn.rotate(x, theta)
    for guess in (0.6 + 0.1, 0.6 + math.pi - 0.2):
        result = register(fixed, x, init=lambda moving, fixed, g=guess: torch.full((1,), g))
        expected = theta if abs(guess - 0.6) < 1 else theta + math.pi
        assert error_deg(result.angle, expected).item() < 0.01

    class Output:
        def __init__(self, angle):
            self.angle = angle

    result = register(fixed, x, init=lambda moving, fixed: Output(torch.tensor([0.5])))
    assert error_deg(result.angle, theta).item() < 0.01


def test_init_is_called_with_moving_then_fixed():
    pairs = rotated_pairs(2, (48, 48), seed=12)
    seen = {}

    def init(moving, fixed):
        seen["moving"], seen["fixed"] = moving, fixed
        return pairs.angle

    register(pairs.fixed, pairs.moving, init=init)
    assert torch.equal(seen["moving"], pairs.moving) and torch.equal(seen["fixed"], pairs.fixed)


def _image(*shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0))


def _pair(**extra):
    return {"fixed": _image(1, 32, 32), "moving": _image(1, 32, 32), **extra}


BAD_INPUTS = {
    "size mismatch": (
        {"fixed": _image(1, 1, 32, 32), "moving": _image(1, 1, 32, 33)},
        ValueError,
        r"model='rotation' needs fixed and moving of one size"
        r".*fixed \(1, 1, 32, 32\), moving \(1, 1, 32, 33\)",
    ),
    "batch mismatch": (
        {"fixed": _image(2, 1, 32, 32), "moving": _image(3, 1, 32, 32)},
        ValueError,
        "fixed has 2, moving has 3",
    ),
    "2-D image": (
        {"fixed": _image(32, 32), "moving": _image(32, 32)},
        ValueError,
        r"fixed must have shape .*got \(32, 32\); add a channel",
    ),
    "5-D image": (
        {"fixed": _image(1, 1, 1, 32, 32), "moving": _image(1, 1, 32, 32)},
        ValueError,
        "fixed must have shape",
    ),
    "numpy array": (
        {"fixed": np.zeros((1, 32, 32)), "moving": _image(1, 32, 32)},
        TypeError,
        "fixed must be a torch.Tensor, got ndarray.*from_numpy",
    ),
    "uint8 image": (
        _pair(moving=torch.zeros(1, 32, 32, dtype=torch.uint8)),
        TypeError,
        "moving must be a floating-point tensor, got torch.uint8.*/ 255",
    ),
    "int64 image": (
        _pair(moving=torch.zeros(1, 32, 32, dtype=torch.int64)),
        TypeError,
        "moving must be a floating-point tensor, got torch.int64",
    ),
    "constant fixed": (
        {"fixed": torch.full((2, 1, 32, 32), 0.5), "moving": _image(2, 1, 32, 32)},
        ValueError,
        r"fixed is constant over its central disc \(sample\(s\) 0, 1\)",
    ),
    "constant moving": (_pair(moving=torch.zeros(1, 32, 32)), ValueError, "moving is constant"),
    "too small": (
        {"fixed": _image(1, 4, 32), "moving": _image(1, 4, 32)},
        ValueError,
        "fixed must be at least 8×8 pixels, got H=4, W=32",
    ),
    "negative smooth": (_pair(smooth=-1.0), ValueError, "smooth must be a finite number >= 0, got -1.0"),
    "float iterations": (_pair(iterations=2.5), ValueError, "iterations must be an int >= 0, got 2.5"),
    "init not callable": (
        _pair(init=0.3),
        TypeError,
        r"init must be callable as init\(moving, fixed\), got float",
    ),
    "init wrong shape": (
        _pair(init=lambda m, f: torch.zeros(3)),
        ValueError,
        r"init returned an angle of shape \(3,\), expected \(1,\)",
    ),
    "init returns a list": (
        _pair(init=lambda m, f: [0.1]),
        TypeError,
        r"init must return a \(B,\) angle tensor",
    ),
}


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        register(**kwargs)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_pixels(bad):
    moving = _image(3, 1, 32, 32)
    moving[2, 0, 5, 7] = bad
    with pytest.raises(ValueError, match=r"moving contains NaN or Inf pixels \(sample\(s\) 2\)"):
        register(_image(3, 1, 32, 32), moving)


def test_rotated_pairs_agree_with_rotate():
    # scipy's cubic spline and rotstn's bilinear warp agree on the disc up to interpolation.
    pairs = rotated_pairs(3, (40, 60), angles=[0.5, -2.0, 3.0], seed=13)
    disc = _Disc(40, 60, torch.float64, pairs.fixed.device)
    turned = rotstn.rotate(pairs.moving.double(), pairs.angle.double())
    assert (disc.take(turned) - disc.take(pairs.fixed.double())).abs().mean() < 0.02
    noisy = rotated_pairs(3, (40, 60), seed=13, noise=0.05, photometric=True)
    clean = rotated_pairs(3, (40, 60), seed=13)
    assert torch.equal(noisy.angle, clean.angle)
    assert 0.03 < (noisy.moving - clean.moving).std() < 0.07


def test_init_with_a_rotation_stn():
    # A fresh RotationSTN predicts θ ≈ 0; register() searches init_window around it.
    stn = rotstn.RotationSTN(1).eval()
    pairs = rotated_pairs(2, (48, 48), angles=[0.2, 2.0], seed=14)
    near = register(pairs.fixed, pairs.moving, init=stn)
    assert error_deg(near.angle[:1], pairs.angle[:1]).item() < 0.1
    # 2 rad lies outside the window: not found, and the low score says so.
    assert near.angle[1].abs() < math.radians(26) and near.score[1] < 0.9 < near.score[0]
    wide = register(pairs.fixed, pairs.moving, init=stn, init_window=math.pi)
    assert error_deg(wide.angle, pairs.angle).max() < 0.1
    with pytest.warns(UserWarning, match=r"init is in training mode.*init.eval\(\)"):
        register(pairs.fixed, pairs.moving, init=stn.train())
