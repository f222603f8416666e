"""register() (rigid model): rotation about an unknown centre, on real pictures warped by scipy.

References nobody here wrote: the pairs are made by scipy.ndimage.affine_transform
(rotstn.data.rigid_pairs) from scikit-image's bundled pictures; torch.rot90 and
slicing give exact quarter turns and shifts; scikit-image's phase_cross_correlation
and, where installed, SimpleITK are the peers the answers must agree with.
"""

import importlib.util
import math

import numpy as np
import pytest
import torch
from helpers import real_image

import rotstn
from rotstn.data import rigid_pairs


def max_displacement(estimate: torch.Tensor, truth: torch.Tensor, size, moving_size=None) -> torch.Tensor:
    """(B,) largest |estimate(p) - truth(p)| over the fixed pixels whose true location lies in moving."""
    h, w = size
    hm, wm = moving_size or size
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    p = torch.stack((xx.flatten(), yy.flatten(), torch.ones(h * w, dtype=torch.float64)))
    true, est = truth.double() @ p, estimate.double() @ p
    inside = (true[:, 0] >= 0) & (true[:, 0] <= wm - 1) & (true[:, 1] >= 0) & (true[:, 1] <= hm - 1)
    return torch.where(inside, (est - true).norm(dim=1), torch.zeros(())).amax(1)


def assert_right_or_flagged(result, d: torch.Tensor, at_least: int, precision: float = 1.0) -> None:
    """Every pair is right (max displacement under ``precision``) or scored under TRUST; enough are right."""
    right = d < precision
    flagged = result.score < rotstn.registration.TRUST
    assert bool((right | flagged).all()), (d, result.score)
    assert int(right.sum()) >= at_least, d


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_recovers_scipy_rigid_pairs(size):
    pairs = rigid_pairs(10, size, seed=3)
    result = rotstn.register(pairs.fixed, pairs.moving)
    d = max_displacement(result.matrix, pairs.matrix, size)
    assert_right_or_flagged(result, d, at_least=9)
    assert d.median() < 0.02, d
    right = d < 1
    angle_error = rotstn.angle_difference(result.angle.double(), pairs.angle).abs()[right]
    assert angle_error.max() < 1e-3
    assert (result.translation.double() - pairs.translation)[right].abs().max() < 0.05


def test_large_shifts_and_partial_overlap():
    pairs = rigid_pairs(6, (160, 160), min_shift=0.2, max_shift=0.25, seed=4)
    assert pairs.overlap.max() < 0.75
    result = rotstn.register(pairs.fixed, pairs.moving)
    d = max_displacement(result.matrix, pairs.matrix, (160, 160))
    assert d.max() < 1.0, d
    # The overlap it reports is the true one (a fraction of the smaller image).
    assert (result.overlap.double() - pairs.overlap).abs().max() < 0.05


def test_noise_and_photometric_change():
    pairs = rigid_pairs(8, (128, 128), noise=0.05, photometric=True, seed=5)
    result = rotstn.register(pairs.fixed, pairs.moving)
    d = max_displacement(result.matrix, pairs.matrix, (128, 128))
    assert (d < 1).sum() >= 7, d
    assert d.median() < 0.15, d


def test_quarter_turn_and_shift_from_rot90():
    big = real_image(140, 140, seed=1)[0, 0]
    turned = torch.rot90(big, 1, (-2, -1))
    fixed = turned[None, 20:120, 30:130]
    moving = big[None, 35:115, 25:125]  # another window, another size: (80, 100)
    result = rotstn.register(fixed, moving)
    # Fixed pixel (x, y) shows turned[20 + y, 30 + x] = big[30 + x, 139 - 20 - y],
    # which is moving pixel (x', y') = (119 - y - 25, 30 + x - 35).
    expected = torch.tensor([[[0.0, -1.0, 94.0], [1.0, 0.0, -5.0]]], dtype=torch.float64)
    torch.testing.assert_close(result.matrix.double(), expected, atol=0.01, rtol=0)
    assert abs(result.angle.item() - math.pi / 2) < 1e-4


def test_matrix_angle_translation_aligned_agree():
    pairs = rigid_pairs(3, (64, 80), moving_size=(72, 72), seed=6)
    result = rotstn.register(pairs.fixed, pairs.moving)
    torch.testing.assert_close(
        result.matrix, rotstn.rigid_matrix(result.angle, result.translation, (64, 80), (72, 72))
    )
    torch.testing.assert_close(result.aligned, rotstn.warp(pairs.moving, matrix=result.matrix, size=(64, 80)))
    torch.testing.assert_close(result.apply(pairs.moving), result.aligned)
    torch.testing.assert_close(
        result.aligned,
        rotstn.warp(pairs.moving, result.angle, result.translation, size=(64, 80)),
        atol=1e-4,
        rtol=0,
    )


def test_fixed_inside_a_larger_moving():
    # The smaller field of view inside the larger one (a tile of a slide, a detail of a scan).
    pairs = rigid_pairs(4, (64, 64), moving_size=(128, 128), max_shift=0.3, seed=21)
    result = rotstn.register(pairs.fixed, pairs.moving)
    d = max_displacement(result.matrix, pairs.matrix, (64, 64), (128, 128))
    assert d.max() < 1.0, d
    assert result.aligned.shape == (4, 1, 64, 64)


def test_masks_leave_out_a_label():
    pairs = rigid_pairs(4, (128, 128), seed=8)
    moving = pairs.moving.clone()
    moving[:, :, 4:40, 4:80] = 1.0  # a bright label burnt into moving only
    mask = torch.ones(128, 128, dtype=torch.bool)
    mask[2:42, 2:82] = False
    result = rotstn.register(pairs.fixed, moving, moving_mask=mask)
    d = max_displacement(result.matrix, pairs.matrix, (128, 128))
    assert_right_or_flagged(result, d, at_least=3, precision=0.1)
    fixed = pairs.fixed.clone()
    fixed[:, :, 80:120, 10:50] = 0.0  # a black corner in fixed
    fmask = torch.ones(4, 1, 128, 128)
    fmask[:, :, 78:122, 8:52] = 0
    result = rotstn.register(fixed, moving, fixed_mask=fmask, moving_mask=mask)
    d = max_displacement(result.matrix, pairs.matrix, (128, 128))
    assert_right_or_flagged(result, d, at_least=3, precision=0.1)


def test_register_on_one_channel_apply_to_all():
    from scipy import ndimage
    from skimage import data

    rgb = data.astronaut()[40:300, 120:380].astype(np.float64) / 255
    angle = 35.0
    turned = ndimage.rotate(rgb, angle, axes=(1, 0), reshape=False, order=3)
    fixed = torch.from_numpy(turned[70:190, 60:180]).permute(2, 0, 1)
    moving = torch.from_numpy(rgb[80:200, 70:190]).permute(2, 0, 1).contiguous()
    result = rotstn.register(fixed, moving, channel=1)
    assert abs(math.degrees(result.angle.item()) - angle) < 0.05
    assert result.aligned.shape == (1, 3, 120, 120)
    inner = result.aligned[0, :, 30:90, 30:90]
    for c in range(3):
        assert np.corrcoef(inner[c].flatten(), fixed[c, 30:90, 30:90].flatten())[0, 1] > 0.99


def test_agrees_with_phase_cross_correlation_on_a_shift():
    from skimage.registration import phase_cross_correlation

    big = real_image(120, 120, seed=9)[0, 0]
    fixed, moving = big[10:100, 12:102], big[17:107, 4:94]
    shift, _, _ = phase_cross_correlation(fixed.numpy(), moving.numpy(), upsample_factor=100)
    result = rotstn.register(fixed[None], moving[None])
    assert abs(result.angle.item()) < 1e-3
    # skimage's shift (row, col) moves moving onto fixed: our translation is the same shift in (x, y).
    torch.testing.assert_close(
        result.translation[0].double(), torch.tensor([shift[1], shift[0]]), atol=0.02, rtol=0
    )


@pytest.mark.skipif(importlib.util.find_spec("SimpleITK") is None, reason="SimpleITK is not installed")
def test_agrees_with_simpleitk_refinement():
    import SimpleITK as sitk

    pairs = rigid_pairs(3, (96, 96), max_shift=0.1, seed=10)
    result = rotstn.register(pairs.fixed, pairs.moving)
    for i in range(3):
        f = sitk.GetImageFromArray(pairs.fixed[i, 0].double().numpy())
        m = sitk.GetImageFromArray(pairs.moving[i, 0].double().numpy())
        # Start SimpleITK next to our answer: it refines, it does not search.
        # SimpleITK's transform maps fixed physical points (x, y) to moving ones: our matrix's direction.
        tx = sitk.Euler2DTransform()
        tx.SetAngle(float(result.angle[i]))
        tx.SetTranslation(result.matrix[i, :, 2].double().tolist())
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsCorrelation()
        reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-6, 300)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetInitialTransform(tx, inPlace=False)
        reg.SetInterpolator(sitk.sitkLinear)
        out = sitk.Euler2DTransform(sitk.CompositeTransform(reg.Execute(f, m)).GetNthTransform(0))
        peer = torch.tensor([*out.GetMatrix(), *out.GetTranslation()], dtype=torch.float64)
        peer = torch.stack(
            (torch.stack((peer[0], peer[1], peer[4])), torch.stack((peer[2], peer[3], peer[5])))
        )
        assert max_displacement(peer[None], result.matrix[i : i + 1], (96, 96)).item() < 0.05


def test_score_separates_right_from_unrelated_pairs():
    right = rigid_pairs(6, (96, 96), seed=11)
    unrelated = rigid_pairs(6, (96, 96), unrelated=True, seed=12)
    good = rotstn.register(right.fixed, right.moving)
    bad = rotstn.register(unrelated.fixed, unrelated.moving)
    threshold = rotstn.registration.TRUST
    assert good.score.min() > threshold > bad.score.max(), (good.score, bad.score)


def test_one_structure_matches_are_flagged():
    # Noisy pairs where one structure dominates (a crater on a noisy plain, the rim of the retina's field
    # of view): lining up that structure alone must not earn a trusted score.
    pairs = rigid_pairs(96, (128, 128), noise=0.02, photometric=True, seed=3)
    pick = [2, 74]
    assert [pairs.names[i] for i in pick] == ["moon", "retina"]
    result = rotstn.register(pairs.fixed[pick], pairs.moving[pick])
    d = max_displacement(result.matrix, pairs.matrix[pick], (128, 128))
    assert_right_or_flagged(result, d, at_least=0)


def test_fine_structure_found_one_level_finer():
    # A 256² retina crop with a 20–25 % shift: on the 64² search level the vessels blur away and the
    # rim of the field of view matches itself; the untrusted result is searched again one level finer.
    pairs = rigid_pairs(24, (256, 256), min_shift=0.2, max_shift=0.25, seed=0)
    i = 14
    assert pairs.names[i] == "retina"
    result = rotstn.register(pairs.fixed[i : i + 1], pairs.moving[i : i + 1])
    d = max_displacement(result.matrix, pairs.matrix[i : i + 1], (256, 256))
    assert d.item() < 0.1, d
    assert result.score.item() > rotstn.registration.TRUST


def test_texture_limited_result_is_not_searched_again(monkeypatch):
    # A right noisy pair whose agreement rests on one textured block scores 1/3 of its agreement (the
    # three-block rule); a finer level has no more texture, so it is not searched again. The retina pair
    # above, whose blocks disagree, is.
    import rotstn.registration as registration

    searches = []
    search = registration._search_rigid

    def counting(pf, *args, **kwargs):
        searches.append(pf.levels[0].image.shape[0])
        return search(pf, *args, **kwargs)

    monkeypatch.setattr(registration, "_search_rigid", counting)
    pairs = rigid_pairs(24, (128, 128), noise=0.05, photometric=True, seed=0)
    result = rotstn.register(pairs.fixed[10:11], pairs.moving[10:11])
    assert result.score.item() < registration.TRUST
    assert max_displacement(result.matrix, pairs.matrix[10:11], (128, 128)).item() < 1
    assert searches == [1]
    searches.clear()
    retina = rigid_pairs(24, (256, 256), min_shift=0.2, max_shift=0.25, seed=0)
    rotstn.register(retina.fixed[14:15], retina.moving[14:15])
    assert searches == [1, 1]


def test_phase_correlation_of_twin_angles_equals_turning_by_them():
    # θ + π comes from θ's canvas flipped (a conjugate spectrum times a ramp), not a second resampling.
    from rotstn.registration import _prepare, _search

    pairs = rigid_pairs(3, (96, 160), seed=1)
    levels = [_prepare(image, None, 1.0, 1).levels[-1] for image in (pairs.fixed, pairs.moving)]
    angles = _search.spectral_angles(*levels, peaks=2)
    plain = _search.phase_correlation(*levels, (96, 160), (96, 160), angles, peaks=2)
    twins = _search.phase_correlation(*levels, (96, 160), (96, 160), angles, peaks=2, twins=True)
    torch.testing.assert_close(twins[1], plain[1], atol=1e-4, rtol=0)


def test_batch_result_equals_one_pair_at_a_time():
    # Pairs stop refining one by one; a pair's answer must not depend on the others in its batch.
    pairs = rigid_pairs(5, (96, 96), noise=0.03, seed=21)
    batch = rotstn.register(pairs.fixed, pairs.moving)
    for i in range(5):
        one = rotstn.register(pairs.fixed[i : i + 1], pairs.moving[i : i + 1])
        d = max_displacement(one.matrix, batch.matrix[i : i + 1].double(), (96, 96))
        assert d.item() < 1e-3, (i, d)
        assert abs(one.score.item() - batch.score[i].item()) < 1e-3


def test_rotation_only_pairs_and_model_option():
    from rotstn.data import rotated_pairs

    pairs = rotated_pairs(4, (64, 64), seed=13)
    rigid = rotstn.register(pairs.fixed, pairs.moving)
    rotation = rotstn.register(pairs.fixed, pairs.moving, model="rotation")
    err = rotstn.angle_difference(rigid.angle.double(), pairs.angle.double()).abs()
    assert err.max() < math.radians(0.05)
    assert rigid.translation.abs().max() < 0.05
    assert rotation.translation.abs().max() == 0
    torch.testing.assert_close(rotation.matrix, rotstn.rigid_matrix(rotation.angle, None, (64, 64)))


def test_dtypes_batches_and_detached():
    pairs = rigid_pairs(3, (64, 64), seed=14, dtype=torch.float64)
    result = rotstn.register(pairs.fixed.requires_grad_(), pairs.moving)
    assert result.matrix.dtype == torch.float64 and not result.matrix.requires_grad
    assert not result.aligned.requires_grad
    half = rotstn.register(pairs.fixed.detach().half(), pairs.moving.half())
    assert half.matrix.dtype == torch.float32 and half.aligned.dtype == torch.float16
    assert max_displacement(half.matrix, pairs.matrix, (64, 64)).max() < 1.0
    one = rotstn.register(pairs.fixed[0].detach(), pairs.moving[:2])  # one fixed, two moving
    assert one.matrix.shape == (2, 2, 3)


def test_device(device):
    pairs = rigid_pairs(2, (64, 64), seed=15)
    result = rotstn.register(pairs.fixed.to(device), pairs.moving.to(device))
    assert result.matrix.device.type == device
    assert max_displacement(result.matrix.cpu(), pairs.matrix, (64, 64)).max() < 1.0


def test_same_input_same_output():
    pairs = rigid_pairs(2, (64, 64), seed=16)
    a = rotstn.register(pairs.fixed, pairs.moving)
    b = rotstn.register(pairs.fixed, pairs.moving)
    assert torch.equal(a.matrix, b.matrix) and torch.equal(a.score, b.score)


def _img(*shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0))


BAD = {
    "model": ({"model": "affine"}, ValueError, "model must be one of 'rigid', 'rotation'; got 'affine'"),
    "mask shape": (
        {"fixed_mask": torch.ones(30, 32)},
        ValueError,
        r"fixed_mask must have shape \(H, W\).*H=32, W=32.*got \(30, 32\)",
    ),
    "mask type": ({"moving_mask": np.ones((32, 32))}, TypeError, "moving_mask must be a torch.Tensor"),
    "mask empty": (
        {"moving_mask": torch.zeros(32, 32, dtype=torch.bool)},
        ValueError,
        r"moving_mask leaves fewer than 64 pixels to compare \(sample\(s\) 0\)",
    ),
    "mask nan": ({"fixed_mask": torch.full((32, 32), math.nan)}, ValueError, "fixed_mask contains NaN"),
    "channel": ({"channel": 3}, ValueError, "channel must be an int index into fixed's 1 channel"),
    "min_overlap": ({"min_overlap": 1.5}, ValueError, "min_overlap must be between 0 and 1"),
    "search_size": ({"search_size": 4}, ValueError, "search_size must be an int >= 16, got 4"),
    "rotation with masks": (
        {"model": "rotation", "fixed_mask": torch.ones(32, 32)},
        ValueError,
        "model='rotation' needs fixed and moving of one size and no masks",
    ),
    "constant over the mask": (
        {"fixed": torch.ones(1, 1, 32, 32), "fixed_mask": torch.ones(32, 32)},
        ValueError,
        r"fixed is constant over its mask \(sample\(s\) 0\)",
    ),
    "constant under the mask": (
        {"fixed": torch.ones(1, 1, 32, 32)},
        ValueError,
        r"fixed is constant \(sample\(s\) 0\)",
    ),
}


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD.values(), ids=BAD.keys())
def test_bad_input_errors(kwargs, error, match):
    args = {"fixed": _img(1, 1, 32, 32), "moving": _img(1, 1, 32, 32), **kwargs}
    with pytest.raises(error, match=match):
        rotstn.register(**args)


def test_nan_pixels_named():
    moving = _img(2, 1, 32, 32)
    moving[1, 0, 3, 3] = math.nan
    with pytest.raises(ValueError, match=r"moving contains NaN or Inf pixels \(sample\(s\) 1\)"):
        rotstn.register(_img(2, 1, 32, 32), moving)


def test_noise_estimate_recovers_added_noise():
    from rotstn.registration._images import noise_variance

    picture = real_image(200, 200, seed=17).float()
    g = torch.Generator().manual_seed(0)
    for sigma in (0.02, 0.05, 0.1):
        noisy = picture + sigma * torch.randn(picture.shape, generator=g)
        estimate = noise_variance(noisy, None, 0.0).sqrt().item()
        # The picture's own fine texture adds a little: within 25 % of the noise added.
        assert abs(estimate - sigma) < 0.25 * sigma, (sigma, estimate)


# The compiled overlap sums and Gauss–Newton loop (rotstn/_kernels/register_cpu.c) against the same
# computation in torch ops, which other devices and machines without a C compiler run.
needs_kernel = pytest.mark.skipif(
    rotstn._kernels.compiled.library() is None, reason="no C compiler here (or ROTSTN_NO_COMPILE=1)"
)


def _levels(dtype: torch.dtype, masked: bool, b: int = 3):
    from rotstn.registration._images import Level

    g = torch.Generator().manual_seed(7)
    fixed = torch.nn.functional.avg_pool2d(torch.rand(b, 1, 50, 66, generator=g, dtype=dtype), 3, 1, 1)
    moving = torch.nn.functional.avg_pool2d(torch.rand(b, 1, 48, 60, generator=g, dtype=dtype), 3, 1, 1)
    mask = None
    if masked:
        mask = torch.ones_like(moving)
        mask[:, :, 10:20, 5:40] = 0
        mask[1, :, 30:, :] = 0.5  # not counted (> 0.999 counts)
    return Level(fixed, None, 2, 1.0), Level(moving, mask, 2, 1.0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("gradient", [False, True])
def test_overlap_sums_kernel_matches_torch(dtype, masked, gradient):
    from rotstn.registration import _refine

    fixed, moving = _levels(dtype, masked)
    pts = _refine._Points(fixed, 600, gradient=True)
    frame = _refine._Frame((100, 132), (96, 120), 2, fixed.image)
    pts.jt = (pts.x - 30) * pts.gy - (pts.y - 20) * pts.gx
    terms = (pts.jt, pts.gx, pts.gy) if gradient else None
    # (B, M) hypotheses: small and large turns, shifts that leave part of fixed outside moving (none with
    # a point exactly on moving's frame, where the two round the normalised and pixel coordinates apart).
    angle = torch.tensor([[0.0, 0.3, -2.0, 3.1], [1.0, -0.2, 0.05, 2.5], [0.4, 0.4, -1.5, 0.0]], dtype=dtype)
    t = torch.tensor([[3.3, -4.1], [40.0, 10.0], [-7.5, 22.0], [0.3, -0.3]], dtype=dtype).expand(3, 4, 2)
    got = _refine._overlap_sums_kernel(pts, moving, frame, angle, t, terms)
    want = _refine._overlap_sums_torch(pts, moving, frame, angle, t, terms)
    assert got.shape == want.shape == (3, 4, 21 if gradient else 6)
    scale = want.abs().amax(-1, keepdim=True)  # sums of one row share its scale
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got / scale, want / scale, atol=tol, rtol=0)
    # One fixed for the whole batch (a stack's reference), and one moving for it: the same sums.
    one = _refine._overlap_sums_kernel(
        pts.select(torch.tensor([1])), moving.select(torch.tensor([1])), frame, angle[1:2], t[1:2], None
    )
    torch.testing.assert_close(one[0], _refine._overlap_sums_kernel(pts, moving, frame, angle, t, None)[1])


@needs_kernel
def test_overlap_sums_kernel_survives_nan_and_far_points():
    from rotstn.registration import _refine

    fixed, moving = _levels(torch.float32, masked=True)
    pts = _refine._Points(fixed, 600)
    frame = _refine._Frame((100, 132), (96, 120), 2, fixed.image)
    angle = torch.tensor([[math.nan, 0.0], [0.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[[0.0, 0.0], [math.inf, 0.0]], [[1e9, -1e9], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    sums = _refine._overlap_sums_kernel(pts, moving, frame, angle, t, None)
    assert bool((sums[0, 0] == 0).all()) and bool((sums[0, 1] == 0).all()) and bool((sums[1, 0] == 0).all())
    assert sums[2, 0, 2] > 100  # the plain hypothesis keeps its points


@pytest.mark.parametrize("kernel", [True, False])
def test_gauss_newton_travels_further_than_a_pixel_a_step(monkeypatch, kernel):
    # One level, 20 steps, a start 27 px from the truth: a step moves no point more than the step limit,
    # and with the limit held at one pixel these pairs stopped 15-45 px short (scipy-warped astronaut
    # crops). Steps cut to the limit that keep their direction now lengthen it (_refine.REACH).
    from rotstn.registration import _displacement, _prepare, _refine
    from rotstn.registration._stack import matrix_parameters

    if kernel and rotstn._kernels.compiled.library() is None:
        pytest.skip("no C compiler here (or ROTSTN_NO_COMPILE=1)")
    if not kernel:
        monkeypatch.setattr(_refine, "_kernel_serves", lambda *args: False)
    size = (128, 128)
    pairs = rigid_pairs(4, size, max_shift=0.2, pivot=0.5, min_overlap=0.6, images=("astronaut",), seed=3)
    angle, t = matrix_parameters(pairs.matrix.to(pairs.fixed.dtype), size, size)
    pf, pm = (_prepare(x.mean(1, keepdim=True), None, 1.0, 1) for x in (pairs.fixed, pairs.moving))
    start = t + t.new_tensor([24.0, -12.0])
    a, t2 = _refine.refine(pf.levels, pm.levels, size, size, angle.clone(), start, 20, 8192)
    d = _displacement(size, size, a, t2, angle, t)
    assert bool((d[[0, 1, 3]] < 0.1).all()), d


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_gauss_newton_matches_torch_loop(monkeypatch, dtype):
    # The whole registration with the C loop and with the torch loop (CUDA's and the fallback's path).
    from rotstn.registration import _refine

    pairs = rigid_pairs(6, (96, 112), noise=0.02, seed=5, dtype=dtype)
    masks = torch.ones(6, 96, 112, dtype=torch.bool)
    masks[:, 70:, :30] = False  # a label in the corner of moving
    with_kernel = rotstn.register(pairs.fixed, pairs.moving, moving_mask=masks)
    monkeypatch.setattr(_refine, "_kernel_serves", lambda *args: False)
    with_torch = rotstn.register(pairs.fixed, pairs.moving, moving_mask=masks)
    d = max_displacement(with_kernel.matrix, with_torch.matrix, (96, 112))
    assert d.max().item() < (2e-3 if dtype == torch.float32 else 1e-6), d
    torch.testing.assert_close(with_kernel.score, with_torch.score, atol=2e-3, rtol=0)
    truth = max_displacement(with_kernel.matrix, pairs.matrix, (96, 112))
    assert_right_or_flagged(with_kernel, truth, at_least=5)
