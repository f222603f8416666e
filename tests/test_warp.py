"""rotstn.warp and rotstn.rigid_matrix: the rigid-map convention against scipy.ndimage.affine_transform.

References nobody here wrote: scipy.ndimage.affine_transform (order 1) samples
the input at ``matrix @ output + offset`` in (row, col) order; torch.rot90 and
integer slicing give exact quarter turns and shifts; float64 gradcheck.
"""

import math

import numpy as np
import pytest
import torch
from helpers import real_image
from scipy import ndimage

import rotstn
from rotstn import _kernels

BACKENDS = ["reference", "cpu", "auto"]


def scipy_warp(image: np.ndarray, matrix: np.ndarray, out_shape) -> np.ndarray:
    """rotstn's (x, y) pixel matrix applied by scipy, which works in (row, col)."""
    m = matrix
    rc = np.array([[m[1, 1], m[1, 0]], [m[0, 1], m[0, 0]]])
    return ndimage.affine_transform(image, rc, offset=(m[1, 2], m[0, 2]), output_shape=out_shape, order=1)


def readable(matrix: np.ndarray, out_shape, in_shape, margin: float = 0.0) -> np.ndarray:
    """Output pixels whose source lies inside the input (where zero padding plays no part)."""
    h, w = out_shape
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    x = matrix[0, 0] * xx + matrix[0, 1] * yy + matrix[0, 2]
    y = matrix[1, 0] * xx + matrix[1, 1] * yy + matrix[1, 2]
    return (x >= margin) & (x <= in_shape[1] - 1 - margin) & (y >= margin) & (y <= in_shape[0] - 1 - margin)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("in_shape", "out_shape", "angle", "shift"),
    [
        ((40, 40), (40, 40), 0.7, (3.0, -5.5)),
        ((33, 52), (33, 52), -2.4, (-7.25, 2.0)),
        ((30, 50), (45, 28), 1.1, (4.0, 1.5)),  # output of another size
        ((48, 36), (48, 36), math.pi, (0.0, 0.0)),
    ],
)
def test_warp_equals_scipy_affine_transform(backend, in_shape, out_shape, angle, shift):
    x = real_image(*in_shape, seed=1)
    m = rotstn.rigid_matrix(
        torch.tensor(angle, dtype=torch.float64), torch.tensor(shift), out_shape, in_shape
    )
    with _kernels.use_backend(backend):
        by_angle = rotstn.warp(x, angle, torch.tensor(shift, dtype=torch.float64), size=out_shape)
        by_matrix = rotstn.warp(x, matrix=m, size=out_shape)
    expected = scipy_warp(x[0, 0].numpy(), m[0].numpy(), out_shape)
    inside = readable(m[0].numpy(), out_shape, in_shape)
    assert inside.sum() > 0.3 * inside.size
    np.testing.assert_allclose(by_angle[0, 0].numpy()[inside], expected[inside], atol=1e-9)
    np.testing.assert_allclose(by_matrix[0, 0].numpy()[inside], expected[inside], atol=1e-9)


def test_translation_moves_content_right_and_down():
    x = torch.zeros(1, 9, 9, dtype=torch.float64)
    x[0, 4, 4] = 1.0
    y = rotstn.warp(x, 0.0, (2.0, 3.0))
    assert y[0, 7, 6] == 1.0 and y.sum() == 1.0


def test_warp_without_translation_is_rotate():
    x = real_image(30, 44, seed=2).expand(3, -1, -1, -1)
    angle = torch.tensor([0.3, -1.0, 2.5], dtype=torch.float64)
    torch.testing.assert_close(rotstn.warp(x, angle), rotstn.rotate(x, angle))


def test_quarter_turn_and_integer_shift_are_exact():
    big = real_image(40, 40, seed=3)[0, 0]
    turned = torch.rot90(big, 1, (-2, -1))
    # fixed = a window of the turned picture; moving = the picture's window at the same place.
    fixed = turned[None, 10:30, 12:32]
    moving = big[None, 10:30, 12:32]
    # moving's centre (19.5, 19.5 in the picture: x 21.5, y 19.5) lands, once turned, at
    # x = 19.5, y = 40 - 1 - 21.5 = 17.5 of the turned picture, i.e. (7.5, 7.5) in fixed: t = (-2, -2).
    y = rotstn.warp(moving, math.pi / 2, (-2.0, -2.0))
    np.testing.assert_allclose(y[0, :-2, :-2].numpy(), fixed[0, :-2, :-2].numpy(), atol=1e-9)


def test_rigid_matrix_composes_like_the_definition():
    angle, t = torch.tensor([0.4, -1.3], dtype=torch.float64), torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    m = rotstn.rigid_matrix(angle, t, (20, 30), (25, 35))
    c_f, c_m = torch.tensor([14.5, 9.5], dtype=torch.float64), torch.tensor([17.0, 12.0], dtype=torch.float64)
    p = torch.tensor([3.0, 7.0], dtype=torch.float64)
    for i in range(2):
        cos, sin = math.cos(angle[i]), math.sin(angle[i])
        a = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
        expected = c_m + a @ (p - c_f - t[i].double())
        torch.testing.assert_close(m[i, :, :2] @ p + m[i, :, 2], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_image_angle_translation(backend):
    x = real_image(9, 11, seed=4).expand(2, -1, -1, -1).clone().requires_grad_()
    angle = torch.tensor([0.3, -2.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1.3, -0.4], [-2.2, 0.7]], dtype=torch.float64, requires_grad=True)
    with _kernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda i, a, s: rotstn.warp(i, a, s), (x, angle, t))
        assert torch.autograd.gradgradcheck(lambda i, a, s: rotstn.warp(i, a, s), (x, angle, t))


def test_gradcheck_matrix_and_other_size():
    x = real_image(8, 10, seed=5).requires_grad_()
    m = rotstn.rigid_matrix(
        torch.tensor(0.5, dtype=torch.float64), torch.tensor([1.0, -0.5]), (7, 12), (8, 10)
    )
    m = m.clone().requires_grad_()
    # Only rigid perturbations keep the matrix valid: differentiate through angle and translation.
    assert torch.autograd.gradcheck(lambda i: rotstn.warp(i, matrix=m.detach(), size=(7, 12)), (x,))
    angle = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    shift = torch.tensor([1.0, -0.5], dtype=torch.float64, requires_grad=True)

    def through_matrix(a, s):
        return rotstn.warp(x.detach(), matrix=rotstn.rigid_matrix(a, s, (7, 12), (8, 10)), size=(7, 12))

    assert torch.autograd.gradcheck(through_matrix, (angle, shift))


def test_translation_gradient_recovers_a_shift():
    # A result can be refined by gradient: descend on t from zero to a known sub-pixel shift.
    x = real_image(48, 48, seed=6).float()
    target = rotstn.warp(x, 0.2, (2.5, -1.5))
    t = torch.zeros(2, requires_grad=True)
    angle = torch.tensor(0.2, requires_grad=True)
    opt = torch.optim.Adam([t, angle], lr=0.1)
    for _ in range(150):
        opt.zero_grad()
        loss = (rotstn.warp(x, angle, t) - target)[..., 8:-8, 8:-8].square().mean()
        loss.backward()
        opt.step()
    assert (t.detach() - torch.tensor([2.5, -1.5])).abs().max() < 0.05
    assert abs(angle.item() - 0.2) < 0.01


BAD = {
    "matrix and angle": (dict(angle=0.1, matrix=torch.eye(2, 3)), ValueError, "either matrix or angle"),
    "no angle": (dict(), ValueError, "angle is required"),
    "matrix shape": (
        dict(matrix=torch.eye(3)),
        ValueError,
        r"matrix must have shape \(2, 3\) or \(B, 2, 3\)",
    ),
    "matrix not rigid": (
        dict(matrix=torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])),
        ValueError,
        r"matrix must be rigid.*sample\(s\) \[0\]",
    ),
    "matrix mirror": (
        dict(matrix=torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])),
        ValueError,
        "matrix must be rigid",
    ),
    "matrix nan": (dict(matrix=torch.full((2, 3), math.nan)), ValueError, "matrix contains NaN"),
    "translation shape": (
        dict(angle=0.1, translation=torch.zeros(3)),
        ValueError,
        r"translation must have shape",
    ),
    "translation batch": (
        dict(angle=0.1, translation=torch.zeros(3, 2)),
        ValueError,
        r"translation must have shape \(2,\) or \(B, 2\) with B=2",
    ),
    "size": (dict(angle=0.1, size=(0, 3)), ValueError, r"size must be \(H, W\) with positive ints"),
}


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD.values(), ids=BAD.keys())
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        rotstn.warp(torch.zeros(2, 1, 5, 5), **kwargs)


def test_batch_and_unbatched_shapes():
    x = torch.rand(3, 10, 12)
    assert rotstn.warp(x, 0.1, (1.0, 2.0)).shape == (3, 10, 12)
    assert rotstn.warp(x, torch.zeros(4)).shape == (4, 3, 10, 12)
    assert rotstn.warp(x, 0.0, torch.zeros(5, 2), size=(6, 7)).shape == (5, 3, 6, 7)
    assert rotstn.warp(x[None].expand(0, -1, -1, -1), 0.0).shape == (0, 3, 10, 12)
