"""rotstn.data.rigid_pairs against scipy.ndimage: the matrix convention, shifts, overlap, seeds, errors."""

import math

import numpy as np
import pytest
import torch
from helpers import interior
from scipy import ndimage

from rotstn.data import rigid_pairs


def convention_matrix(angle: float, t: np.ndarray, fixed_size, moving_size) -> np.ndarray:
    # Written from the convention, independently of rotstn.data: [A | c_m - A (c_f + t)].
    a = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    c_f = np.array([(fixed_size[1] - 1) / 2, (fixed_size[0] - 1) / 2])
    c_m = np.array([(moving_size[1] - 1) / 2, (moving_size[0] - 1) / 2])
    return np.concatenate([a, (c_m - a @ (c_f + t))[:, None]], 1)


def moving_at_fixed_pixels(matrix: np.ndarray, moving: np.ndarray, fixed_size, margin: float = 1.0):
    # Moving sampled bilinearly at matrix @ (x, y, 1) for every fixed pixel whose image lies inside moving.
    yy, xx = np.mgrid[: fixed_size[0], : fixed_size[1]].astype(np.float64)
    qx = matrix[0, 0] * xx + matrix[0, 1] * yy + matrix[0, 2]
    qy = matrix[1, 0] * xx + matrix[1, 1] * yy + matrix[1, 2]
    hm, wm = moving.shape
    inside = (qx >= margin) & (qx <= wm - 1 - margin) & (qy >= margin) & (qy <= hm - 1 - margin)
    return ndimage.map_coordinates(moving, [qy[inside], qx[inside]], order=1), inside


@pytest.mark.parametrize(("size", "moving_size"), [((48, 48), None), ((40, 64), (56, 36))])
def test_matrix_maps_fixed_pixels_to_the_moving_pixels_that_show_them(size, moving_size):
    pairs = rigid_pairs(6, size, moving_size=moving_size, seed=1)
    moving_size = moving_size or size
    assert pairs.moving.shape == (6, 1, *moving_size)
    for i in range(6):
        expected = convention_matrix(float(pairs.angle[i]), pairs.translation[i].numpy(), size, moving_size)
        np.testing.assert_allclose(pairs.matrix[i].numpy(), expected, atol=1e-12)
        sampled, inside = moving_at_fixed_pixels(
            pairs.matrix[i].numpy(), pairs.moving[i, 0].double().numpy(), size
        )
        assert inside.mean() > 0.2
        # Bilinear resampling of a cubic-spline warp: interpolation error only.
        assert np.abs(sampled - pairs.fixed[i, 0].double().numpy()[inside]).mean() < 0.02


def test_without_shift_fixed_is_scipy_rotate_of_moving():
    pairs = rigid_pairs(4, (64, 80), max_shift=0.0, dtype=torch.float64)
    assert torch.equal(pairs.translation, torch.zeros(4, 2))
    disc = interior(64, 80, margin=3)
    for i in range(4):
        moving, fixed = pairs.moving[i, 0].numpy(), pairs.fixed[i, 0].numpy()
        degrees = math.degrees(float(pairs.angle[i]))
        turned = ndimage.rotate(moving, degrees, reshape=False, order=3)
        wrong_sign = ndimage.rotate(moving, -degrees, reshape=False, order=3)
        assert np.abs(turned - fixed)[disc].mean() < 0.01
        assert np.abs(wrong_sign - fixed)[disc].mean() > 3 * np.abs(turned - fixed)[disc].mean()


def test_upscaled_pictures_keep_the_convention():
    # 600² does not fit in the 512² camera: the picture is upscaled, the pair is still exact.
    pairs = rigid_pairs(1, (600, 600), images=("camera",), seed=2)
    sampled, inside = moving_at_fixed_pixels(
        pairs.matrix[0].numpy(), pairs.moving[0, 0].double().numpy(), (600, 600)
    )
    assert np.abs(sampled - pairs.fixed[0, 0].double().numpy()[inside]).mean() < 0.01


def test_angles_and_shifts_within_bounds():
    pairs = rigid_pairs(20, (40, 80), min_shift=0.1, max_shift=0.2, seed=3)
    assert ((pairs.angle > -math.pi) & (pairs.angle <= math.pi)).all()
    assert pairs.angle.std() > 1.0
    relative = pairs.translation.abs() / torch.tensor([80.0, 40.0])
    assert ((relative >= 0.1) & (relative <= 0.2)).all()
    assert (pairs.translation > 0).any(0).all() and (pairs.translation < 0).any(0).all()


def test_overlap_is_the_fraction_of_fixed_pixels_inside_moving():
    pairs = rigid_pairs(5, (30, 50), moving_size=(40, 40), max_shift=0.4, seed=4)
    yy, xx = np.mgrid[:30, :50]
    ones = np.ones(30 * 50)
    for i in range(5):
        q = pairs.matrix[i].numpy() @ np.stack([xx.ravel(), yy.ravel(), ones])
        inside = (q[0] >= 0) & (q[0] <= 39) & (q[1] >= 0) & (q[1] <= 39)
        assert pairs.overlap[i].item() == pytest.approx(inside.mean())
    tiny = rigid_pairs(4, (64, 64), min_shift=0.5, max_shift=0.9, min_overlap=0.01, max_overlap=0.1, seed=5)
    assert ((tiny.overlap >= 0.01) & (tiny.overlap <= 0.1)).all()


def test_unrelated_pairs_take_fixed_from_another_picture():
    pairs = rigid_pairs(3, (48, 48), images=("camera", "coins", "brick"), unrelated=True, seed=6)
    assert pairs.names == ("coins/camera", "brick/coins", "camera/brick")
    related = rigid_pairs(3, (48, 48), images=("camera", "coins", "brick"), seed=6)
    assert torch.equal(pairs.moving, related.moving) and torch.equal(pairs.matrix, related.matrix)
    assert not torch.equal(pairs.fixed, related.fixed)


def test_determinism_by_seed_and_noise_leaves_geometry_alone():
    a = rigid_pairs(3, (32, 32), seed=7)
    b = rigid_pairs(3, (32, 32), seed=7)
    assert (
        torch.equal(a.fixed, b.fixed) and torch.equal(a.moving, b.moving) and torch.equal(a.matrix, b.matrix)
    )
    assert not torch.equal(a.matrix, rigid_pairs(3, (32, 32), seed=8).matrix)
    noisy = rigid_pairs(3, (32, 32), seed=7, noise=0.05, photometric=True)
    assert torch.equal(noisy.matrix, a.matrix)
    assert 0.03 < (noisy.moving - a.moving).std() < 0.07
    assert a.fixed.dtype == torch.float32 and a.matrix.dtype == torch.float64


BAD = {
    "n": ({"n": 0}, r"n must be a positive int, got 0"),
    "size": ({"size": (32,)}, r"size must be \(H, W\) with ints >= 2, got \(32,\)"),
    "moving_size": ({"moving_size": (1, 32)}, r"moving_size must be \(H, W\) with ints >= 2, got \(1, 32\)"),
    "shift order": ({"min_shift": 0.3, "max_shift": 0.2}, r"min_shift <= max_shift, got 0.3 and 0.2"),
    "negative shift": ({"min_shift": -0.1}, r"0 <= min_shift"),
    "overlap": (
        {"min_overlap": 0.5, "max_overlap": 0.2},
        r"min_overlap <= max_overlap <= 1, got 0.5 and 0.2",
    ),
    "noise": ({"noise": -1.0}, r"noise must be a finite number >= 0, got -1.0"),
    "images": ({"images": ("camera",), "unrelated": True}, r"images must name at least 2 picture\(s\)"),
    "picture": ({"images": ("nope",)}, r"name must be a picture in skimage.data"),
    "impossible": (
        {"max_shift": 0.0, "max_overlap": 0.5},
        r"no pair of picture 'camera' meets the constraints",
    ),
}


@pytest.mark.parametrize(("kwargs", "match"), BAD.values(), ids=BAD.keys())
def test_bad_arguments(kwargs, match):
    kwargs = {"n": 2, "size": (32, 32), **kwargs}
    with pytest.raises(ValueError, match=match):
        rigid_pairs(**kwargs)


def test_rigid_pairs_moving_shows_content():
    # The content check looks at the picture pixels moving shows, not its turned window's bounding box
    # (which once let a moving crop of retina's black surround, 4 grey levels deep, through).
    pairs = rigid_pairs(24, (96, 160), seed=0)
    assert pairs.moving.flatten(1).std(1).min() > 0.02
    assert pairs.fixed.flatten(1).std(1).min() > 0.02
