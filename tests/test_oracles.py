"""rotstn's geometry against references nobody here wrote.

scipy.ndimage.rotate (order=1) for the general case, torch.rot90 for exact
quarter turns, kornia for non-square images. This file is the one test of
the sign and centre convention stated in rotstn/functional.py; it runs on
every warp backend.
"""

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from helpers import interior, real_image

import rotstn
from rotstn import _kernels

SIZES = [(32, 32), (33, 33), (24, 40), (41, 26), (17, 30)]


@pytest.fixture(autouse=True, params=["auto", "reference"])
def backend(request):
    """Every oracle test runs on the automatic choice and on the reference path."""
    with _kernels.use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("angle", [0.3, -1.2, 2.5, math.pi])
@pytest.mark.parametrize("align_corners", [False, True])
def test_matches_scipy(size, angle, align_corners):
    h, w = size
    img = real_image(h, w, seed=h * w)[0, 0]
    ours = rotstn.rotate(img[None], angle, align_corners=align_corners)[0].numpy()
    ref = ndi.rotate(img.numpy(), math.degrees(angle), reshape=False, order=1, mode="constant")
    mask = interior(h, w)
    assert mask.sum() > 50
    np.testing.assert_allclose(ours[mask], ref[mask], rtol=0, atol=1e-6)


def test_matches_scipy_off_centre():
    # scipy.ndimage.rotate has no centre argument; affine_transform with the
    # same rotation written in (row, col) order is the reference.
    img = real_image(40, 40, seed=3)[0, 0].numpy()
    a, c = 0.7, np.array([17.0, 22.0])  # (x, y)
    m = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    c_rc = c[::-1]
    ref = ndi.affine_transform(img, m, offset=c_rc - m @ c_rc, order=1)
    ours = rotstn.rotate(torch.from_numpy(img)[None], a, torch.from_numpy(c))[0].numpy()
    yy, xx = np.mgrid[0:40, 0:40]
    mask = np.hypot(xx - c[0], yy - c[1]) <= 15
    np.testing.assert_allclose(ours[mask], ref[mask], rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [7, 8, 31, 32])
@pytest.mark.parametrize("k", [1, 2, 3, -1])
def test_quarter_turns_equal_rot90(n, k):
    x = torch.rand(2, 3, n, n, dtype=torch.float64)
    out = rotstn.rotate(x, k * math.pi / 2)
    torch.testing.assert_close(out, torch.rot90(x, k, (-2, -1)), rtol=0, atol=1e-9)


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_interior_independent_of_align_corners(size):
    h, w = size
    x = real_image(h, w, seed=1)
    a = torch.tensor([0.4], dtype=torch.float64)
    mask = torch.from_numpy(interior(h, w))
    for mode in ("bilinear", "bicubic", "nearest"):
        ref = rotstn.rotate(x, a + 1e-3, mode=mode, align_corners=False)[..., mask]
        other = rotstn.rotate(x, a + 1e-3, mode=mode, align_corners=True)[..., mask]
        torch.testing.assert_close(ref, other, rtol=0, atol=1e-9)


@pytest.mark.parametrize("size", [(24, 40), (41, 26), (32, 32)], ids=str)
@pytest.mark.parametrize("align_corners", [False, True])
def test_matches_kornia(size, align_corners):
    kornia = pytest.importorskip("kornia")
    h, w = size
    x = real_image(h, w, seed=5).repeat(3, 2, 1, 1)
    angle = torch.tensor([0.5, -2.0, 1.3], dtype=torch.float64)
    centre = torch.tensor([[(w - 1) / 2, (h - 1) / 2], [10.0, 12.0], [15.5, 9.25]], dtype=torch.float64)
    ours = rotstn.rotate(x, angle, centre, align_corners=align_corners)
    ref = kornia.geometry.transform.rotate(x, torch.rad2deg(angle), centre, align_corners=align_corners)
    # Compare where both read from inside the image (padding conventions differ).
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[4:-4, 4:-4] = True
    valid = rotstn.rotate(torch.ones_like(x), angle, centre) > 1 - 1e-9
    keep = mask & valid.all(1).all(0)
    assert keep.sum() > 100
    torch.testing.assert_close(ours[..., keep], ref[..., keep], rtol=0, atol=1e-9)


def test_rotation_matrix_with_affine_grid_equals_rotate():
    x = real_image(24, 40, seed=2)
    for ac in (False, True):
        m = rotstn.rotation_matrix(torch.tensor(0.8, dtype=torch.float64), (24, 40), (11.0, 13.5), ac)
        grid = torch.nn.functional.affine_grid(m, x.shape, align_corners=ac)
        via_grid = torch.nn.functional.grid_sample(x, grid, align_corners=ac)
        torch.testing.assert_close(via_grid, rotstn.rotate(x, 0.8, (11.0, 13.5), align_corners=ac))
