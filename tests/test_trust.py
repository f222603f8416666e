"""register(): when may a result be trusted, how far off may it be, and is it the only answer?

References nobody here wrote: pairs warped by scipy.ndimage (rotstn.data.rigid_pairs) from the
pictures bundled with scikit-image and matplotlib, with the truth known; scikit-image's own
checkerboard (a periodic texture); and imreg_dft's shipped example pairs (resources/examples of its
source distribution), with the transforms imreg_dft's regression tests check. Those pairs are read
from ``ROTSTN_IMREG_DFT_EXAMPLES`` or ``~/.cache/rotstn/imreg_dft/resources/examples``, which
``.ci/run`` fills from the package registry's sdist; the tests that need them skip elsewhere.
"""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_rigid import max_displacement

import rotstn
from rotstn.data import bundled_image, rigid_pairs
from rotstn.registration import TRUST


def test_error_px_bounds_the_true_error_of_right_results():
    pairs = rigid_pairs(12, (128, 128), pivot=0.5, min_overlap=0.5, seed=21)
    result = rotstn.register(pairs.fixed, pairs.moving)
    d = max_displacement(result.matrix, pairs.matrix, (128, 128))
    right = d < 1
    assert int(right.sum()) >= 11, d
    assert bool((d[right] <= result.error_px[right]).float().mean() >= 0.9), (d, result.error_px)
    assert float(result.error_px[right].median()) <= 0.5
    # Trusted results are predicted within ERROR_TRUST.
    trusted = result.score >= TRUST
    assert bool((result.error_px[trusted] <= rotstn.registration.ERROR_TRUST).all())


def test_unrelated_pictures_get_a_low_score_and_a_large_predicted_error():
    pairs = rigid_pairs(6, (96, 96), unrelated=True, seed=12)
    result = rotstn.register(pairs.fixed, pairs.moving)
    assert float(result.score.max()) < TRUST, result.score
    assert float(result.error_px.min()) >= 1.0, result.error_px


@pytest.mark.parametrize(
    ("picture", "size", "kind", "seed"),
    [
        # Trusted (0.994-1.000) and 1.2-3.9 px wrong before the predicted error entered the score.
        ("clock", (192, 192), "centred", 1047011951),
        ("cell", (256, 256), "centred", 1929083636),
        ("text", (384, 384), "rigid", 212088022),
    ],
)
def test_noisy_pairs_that_were_trusted_and_wrong_are_not(picture, size, kind, seed):
    rigid = kind == "rigid"
    pairs = rigid_pairs(
        4,
        size,
        max_shift=0.25 if rigid else 0.0,
        pivot=0.5 if rigid else 0.0,
        noise=0.1,
        photometric=True,
        min_overlap=0.5,
        images=(picture,),
        min_std=0.04,
        seed=seed,
    )
    result = rotstn.register(pairs.fixed, pairs.moving)
    d = max_displacement(result.matrix, pairs.matrix, size)
    trusted = result.score >= TRUST
    assert not bool((trusted & (d >= 1)).any()), (d, result.score, result.error_px)
    # What is not right is not predicted to be right either.
    assert bool((result.error_px[d >= 1] >= 1).all()), (d, result.error_px)


def _clean_pairs(picture: str, size: tuple[int, int], seed: int):
    return rigid_pairs(
        4, size, max_shift=0.25, pivot=0.5, min_overlap=0.5, images=(picture,), min_std=0.04, seed=seed
    )


@pytest.mark.parametrize(
    ("picture", "seed", "rows"), [("cell", 1328405613, [0, 2]), ("coins", 301114544, [1])]
)
def test_small_smooth_pictures_are_found_by_sweeping_the_circle(picture, seed, rows):
    # 64² crops of smooth pictures, turned about a random point and shifted: the magnitude spectrum's
    # angle candidates missed these pairs (found 20-100 px off, not trusted) before distrusted results
    # were searched again over the whole circle.
    pairs = _clean_pairs(picture, (64, 64), seed)
    result = rotstn.register(pairs.fixed, pairs.moving)
    d = max_displacement(result.matrix, pairs.matrix, (64, 64))
    assert bool((d[rows] < 1).all()), (d, result.score)
    assert not bool(((result.score >= TRUST) & (d >= 1)).any()), (d, result.score)


def _benchmark_pair(picture: str, size: tuple[int, int], noise: float, seed: int, row: int):
    """One pair of ``benchmarks/trust.py``'s rigid groups (the pairs, fixed and moving of row ``row``)."""
    pairs = rigid_pairs(
        4,
        size,
        max_shift=0.25,
        pivot=0.5,
        noise=noise,
        photometric=noise > 0,
        min_overlap=0.5,
        images=(picture,),
        min_std=0.04,
        seed=seed,
    )
    return pairs, pairs.fixed[row : row + 1], pairs.moving[row : row + 1]


def _registered(picture: str, size: tuple[int, int], noise: float, seed: int, row: int):
    """register() on that pair (:func:`_benchmark_pair`): the result, and its largest displacement
    error against the truth over the true overlap, in pixels."""
    pairs, fixed, moving = _benchmark_pair(picture, size, noise, seed, row)
    result = rotstn.register(fixed, moving)
    return result, float(max_displacement(result.matrix, pairs.matrix[row : row + 1], size)[0])


@pytest.mark.parametrize(
    ("picture", "size", "seed", "row"),
    [("astronaut", (192, 192), 452343252, 1), ("horse", (384, 384), 1668895481, 3)],
)
def test_a_near_miss_of_the_answer_is_no_second_alignment(picture, size, seed, row):
    # Clean pairs, right to 0.06 px: the search's runner-up was the same alignment 1° and a few
    # pixels off (still "distinct" on the coarse search level), so the result was called ambiguous
    # and scored 0.002-0.01. Refined as far as the pick, the runner-up lands on it.
    result, d = _registered(picture, size, 0.0, seed, row)
    assert d < 0.1, d
    assert float(result.score) >= TRUST and not bool(result.ambiguous), result


@pytest.mark.parametrize(
    ("picture", "size", "seed", "row"),
    [("chelsea", (512, 64), 1911830450, 2), ("colorwheel", (384, 384), 1491406730, 2)],
)
def test_a_search_that_lands_far_off_is_refined_all_the_way(picture, size, seed, row):
    # Clean pairs whose search pick was 40-150 px off: each Gauss-Newton step moved a point at most a
    # pixel of its level, so 20 steps a level ended 7-35 px short of the optimum (not trusted, wrong).
    result, d = _registered(picture, size, 0.0, seed, row)
    assert d < 0.1 and float(result.score) >= TRUST, (d, result)


def test_a_silhouette_is_not_swapped_for_an_edge_slid_along_itself():
    # A 256×96 crop of a horse silhouette: the search found it (3 px off), but its runner-up, a straight
    # edge slid along itself on the flat background (NCC 1.0000 against 0.9999, significance 2.7
    # against 3.3 on half the overlap), took its place, 313 px off. NCCs that close are now a tie that
    # the significance breaks. (The result stays untrusted: it has one textured block.)
    result, d = _registered("horse", (256, 96), 0.0, 1697844960, 2)
    assert d < 1, (d, result)


@pytest.mark.parametrize(
    ("size", "noise", "seed", "row"),
    [((64, 512), 0.02, 572168398, 1), ((256, 256), 0.0, 99700451, 2), ((64, 512), 0.0, 2018395418, 0)],
)
def test_a_checkerboard_a_half_turn_away_is_named_ambiguous(size, noise, seed, row):
    # The board matches itself a half (or quarter) turn and a period away: these results were 350-460 px
    # off and trusted (0.97-1.00), the other exact alignment having been left out of the search's
    # hypotheses (all three near misses of one peak), ranked low on a smaller overlap, or found by the
    # sweep over the circle as its runner-up and dropped when the two searches' picks were merged.
    result, d = _registered("checkerboard", size, noise, seed, row)
    if d >= 1:
        assert float(result.score) < TRUST and float(result.error_px) >= 1, (d, result)
    assert bool(result.ambiguous), result


@pytest.mark.parametrize(("picture", "seed"), [("cell", 1119477748), ("clock", 450189219)])
def test_smooth_pictures_under_noise_are_not_trusted_when_wrong(picture, seed):
    # σ 0.05 with a gamma on smooth 384² pictures: the noise carries most of the gradients, and these
    # results, 1.1 and 2.4 px off, were trusted with error_px 0.39-0.49 (the noise-corrected
    # Gauss-Newton matrix is a small difference of two large numbers there).
    result, d = _registered(picture, (384, 384), 0.05, seed, 1)
    assert not (float(result.score) >= TRUST and d >= 1), (d, result.score, result.error_px)
    assert float(result.error_px) >= d, (d, result.error_px)


@pytest.mark.parametrize(
    ("picture", "size", "seed", "row"),
    [("cell", (192, 192), 1068977854, 0), ("moon", (384, 384), 176787976, 3)],
)
def test_noisy_results_off_by_a_pixel_are_refined_on_more_points(picture, size, seed, row):
    # σ 0.05 with a gamma: on 8192 points these ended 1.5 and 1.2 px off (error_px 3.4 and 2.1), and only
    # results predicted within 1 px were refined on four times as many; every agreeing one now is.
    result, d = _registered(picture, size, 0.05, seed, row)
    assert d < 1, (d, result.error_px)
    assert float(result.error_px) >= d, (d, result.error_px)


def test_a_result_predicted_over_half_a_pixel_off_is_not_trusted():
    # A 512² pair at σ 0.02 predicted 0.51 px off (1.006 px in truth) scored 0.962: the score fell as
    # (0.5 / error_px)² beyond ERROR_TRUST, which an agreement of 1.0 kept over TRUST up to 0.527 px.
    pairs, fixed, moving = _benchmark_pair(
        "matplotlib/Minduka_Present_Blue_Pack", (512, 512), 0.02, 2068964282, 3
    )
    result = rotstn.register(fixed, moving)
    assert float(result.error_px) > rotstn.registration.ERROR_TRUST, result.error_px
    assert float(result.score) < TRUST, result.score
    # And no result of a batch is trusted with a predicted error over ERROR_TRUST.
    pairs = rigid_pairs(8, (160, 160), noise=0.03, photometric=True, min_overlap=0.5, seed=8)
    result = rotstn.register(pairs.fixed, pairs.moving)
    over = result.error_px > rotstn.registration.ERROR_TRUST
    assert not bool((result.score[over] >= TRUST).any()), (result.score, result.error_px)


def test_masking_a_tiny_region_does_not_make_a_wrong_repeat_trusted():
    # A 384×96 strip of a lattice tower lines up at a translation 92 px along it. Masking the 1.4 % of
    # the overlap that disagreed there (as if only one image showed it) made that wrong result score
    # 0.967; regions under UNMATCHED[0] of the overlap are no longer masked out.
    pairs = _clean_pairs("rocket", (384, 96), 242556489)
    result = rotstn.register(pairs.fixed, pairs.moving)
    d = max_displacement(result.matrix, pairs.matrix, (384, 96))
    assert not bool(((result.score >= TRUST) & (d >= 1)).any()), (d, result.score)
    assert bool((result.error_px[d >= 1] >= 1).all()), (d, result.error_px)


def test_periodic_texture_is_flagged_ambiguous():
    board = torch.tensor(bundled_image("checkerboard"), dtype=torch.float32)  # 25-pixel squares
    fixed = board[20:148, 30:158][None, None]
    moving = board[20 + 9 : 148 + 9, 30 + 14 : 158 + 14][None, None]  # a shift of (14, 9) px
    result = rotstn.register(fixed, moving)
    assert bool(result.ambiguous.all()), result
    assert float(result.score.max()) < TRUST
    assert float(result.error_px.min()) >= rotstn.registration.DISTINCT
    assert torch.isfinite(result.runner_up_angle).all()


def test_one_curved_rim_is_not_trusted():
    # An annulus lines up with itself at any turn about its centre: one rim pins down no angle.
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    radius = torch.hypot(xx - 70, yy - 58)
    ring = torch.exp(-((radius - 40) ** 2) / 8)[None, None]
    g = torch.Generator().manual_seed(0)
    fixed = ring + 0.01 * torch.randn(ring.shape, generator=g)
    moving = rotstn.warp(ring, torch.tensor([0.7]), torch.tensor([3.0, -2.0])) + 0.01 * torch.randn(
        ring.shape, generator=g
    )
    result = rotstn.register(fixed, moving)
    assert float(result.score) < TRUST, result.score
    assert float(result.error_px) >= 1.0


def test_registration_fields_have_the_batch_shape():
    pairs = rigid_pairs(3, (64, 64), seed=2)
    result = rotstn.register(pairs.fixed, pairs.moving)
    assert result.error_px.shape == result.ambiguous.shape == result.runner_up_angle.shape == (3,)
    assert result.ambiguous.dtype == torch.bool
    assert bool(torch.isnan(result.runner_up_angle[~result.ambiguous]).all())


def test_a_region_only_moving_shows_does_not_push_the_estimate():
    pairs = rigid_pairs(4, (192, 192), max_shift=0.2, pivot=0.5, min_overlap=0.6, seed=3)
    moving = pairs.moving.clone()
    yy, xx = torch.meshgrid(torch.arange(192.0), torch.arange(192.0), indexing="ij")
    for i in range(4):
        blob = ((yy - 70 - 10 * i) ** 2 + (xx - 58 - 8 * i) ** 2 < 28**2).float()
        moving[i, 0] = moving[i, 0] * (1 - blob)  # a dark disc the fixed image does not have
    result = rotstn.register(pairs.fixed, moving)
    d = max_displacement(result.matrix, pairs.matrix, (192, 192))
    trusted = result.score >= TRUST
    # Trusted results are right and within their predicted error; without masking out the disc, one
    # of the four was (0.98, 0.15 px off), the others scored 0.00-0.12 at 0.18-0.92 px.
    assert bool((d[trusted] <= result.error_px[trusted]).all()), (d, result.score, result.error_px)
    assert int(trusted.sum()) >= 2, (d, result.score)


# -----------------------------------------------------------------------------------------------
# imreg_dft's shipped example pairs.


def _examples() -> Path | None:
    for root in (os.environ.get("ROTSTN_IMREG_DFT_EXAMPLES"), Path.home() / ".cache/rotstn/imreg_dft"):
        if root is None:
            continue
        for path in (Path(root), Path(root) / "resources" / "examples"):
            if (path / "constraints" / "two.png").exists():
                return path
    return None


EXAMPLES = _examples()
needs_examples = pytest.mark.skipif(EXAMPLES is None, reason="imreg_dft's example pairs are not unpacked")


def _load(name: str) -> torch.Tensor:
    from matplotlib import image
    from skimage.color import rgb2gray

    pixels = np.asarray(image.imread(EXAMPLES / name))[..., :3]
    pixels = pixels / 255.0 if pixels.dtype == np.uint8 else pixels
    return torch.tensor(rgb2gray(pixels), dtype=torch.float32)[None, None]


@needs_examples
def test_imreg_dft_translation_pair_is_right_and_trusted_both_ways():
    a, b = _load("sample1.png"), _load("sample2.png")
    forward, backward = rotstn.register(a, b), rotstn.register(b, a)
    # imreg_dft's regression test: sample2 is sample1 shifted by (-19, 79) px, both ways round.
    torch.testing.assert_close(forward.translation[0], torch.tensor([-19.0, 79.0]), atol=0.5, rtol=0)
    torch.testing.assert_close(backward.translation[0], torch.tensor([19.0, -79.0]), atol=0.5, rtol=0)
    assert abs(float(forward.angle)) < 1e-3
    assert float(forward.score) >= TRUST and float(backward.score) >= TRUST
    assert abs(float(forward.score) - float(backward.score)) < 0.05


@needs_examples
@pytest.mark.parametrize(
    ("fixed", "moving"),
    [("sample1.png", "sample3.png"), ("sample3.png", "sample1.png"), ("sample3c.jpg", "sample1.png")],
)
def test_imreg_dft_pairs_with_a_scale_change_are_refused(fixed, moving):
    # Scaled by 1.25 (or 0.8) and turned by 30°: no rigid map explains them.
    result = rotstn.register(_load(fixed), _load(moving))
    assert float(result.score) < TRUST, result.score
    assert float(result.error_px) >= 1.0


@needs_examples
def test_imreg_dft_tricky_pair_is_right_and_trusted_and_never_trusted_wrong_off_the_truth():
    tricky = _load("constraints/tricky.png")
    result = rotstn.register(tricky, tricky)
    assert abs(float(result.angle)) < 1e-3 and float(result.translation.abs().max()) < 0.05
    assert float(result.score) >= TRUST
    h, w = tricky.shape[-2:]
    truth = rotstn.rigid_matrix(torch.zeros(1), torch.zeros(1, 2), (h, w), (h, w)).double()
    # Windows that exclude the truth (0°), as imreg_dft's constraint test does (140° ± 20°).
    for centre, half in ((140, 20), (90, 30), (-120, 20)):
        _assert_not_trusted_and_wrong(tricky, truth, centre, half)


def _assert_not_trusted_and_wrong(tricky: torch.Tensor, truth: torch.Tensor, centre: float, half: float):
    held = rotstn.register(
        tricky,
        tricky,
        init=lambda m, f: torch.full((m.shape[0],), math.radians(centre)),
        init_window=math.radians(half),
    )
    d = max_displacement(held.matrix, truth, tuple(tricky.shape[-2:]))
    assert not (float(held.score) >= TRUST and float(d) >= 1), (centre, held.score, d)


@needs_examples
@pytest.mark.xfail(
    reason="known limit: turned by 180° the two large disks swap and only a 216-pixel dot disagrees, "
    "in a block where the other image is flat; the score counts a block only where both images have "
    "texture, so this wrong result is trusted (0.9999)",
    strict=True,
)
def test_imreg_dft_tricky_pair_held_at_180_degrees_is_not_trusted():
    tricky = _load("constraints/tricky.png")
    h, w = tricky.shape[-2:]
    truth = rotstn.rigid_matrix(torch.zeros(1), torch.zeros(1, 2), (h, w), (h, w)).double()
    _assert_not_trusted_and_wrong(tricky, truth, 180, 20)


@needs_examples
def test_imreg_dft_two_and_three_disks_is_exact_and_named_ambiguous():
    # Two equal disks against three: they line up with disks 1-2 or 2-3, turned by +90° or -90°.
    # Four exact answers: the pair is ambiguous, and rotstn must say so rather than pick one with
    # confidence; its pick must still be one of them (the unmatched disk must not pull it off).
    two, three = _load("constraints/two.png"), _load("constraints/three.png")
    result = rotstn.register(two, three)
    assert bool(result.ambiguous), result
    assert float(result.score) < TRUST
    assert abs(abs(math.degrees(float(result.angle))) - 90) < 0.02, math.degrees(float(result.angle))
    swapped = rotstn.register(three, two)
    assert bool(swapped.ambiguous)
    assert float(swapped.score) < TRUST


@pytest.mark.parametrize("side", [73, 96, 192])
def test_a_small_image_inside_a_large_one_scores_the_same_either_way_round(side):
    # Crops turned out of a 512² picture by scipy-independent means (rotstn.warp is checked against
    # scipy in tests/test_warp.py): 2 %, 3.5 % and 14 % of its area. The score used to be 0.00 with the
    # crop as moving (its blocks were laid over the large image) and 1.0 the other way round.
    big = torch.tensor(bundled_image("astronaut"), dtype=torch.float32)[None, None]
    truth = rotstn.rigid_matrix(torch.tensor([0.4]), torch.tensor([[30.0, -20.0]]), (side, side), (512, 512))
    crop = rotstn.warp(big, matrix=truth, size=(side, side))
    into_big, into_crop = rotstn.register(big, crop), rotstn.register(crop, big)
    assert abs(float(into_big.score) - float(into_crop.score)) < 0.05
    assert float(into_big.score) >= TRUST
    d = max_displacement(into_crop.matrix, truth, (side, side), (512, 512))
    assert float(d) < 0.1, d
    square = torch.cat((into_big.matrix.double(), torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64)), 1)
    d_back = max_displacement(torch.linalg.inv(square)[:, :2], truth, (side, side), (512, 512))
    assert float(d_back) < 0.1, d_back


@pytest.mark.parametrize(("picture", "seed", "row"), [("coins", 479039058, 1), ("chelsea", 582719246, 0)])
def test_a_noisy_pair_refined_on_a_stronger_blur_is_right_and_trusted(picture, seed, row, monkeypatch):
    # benchmarks/trust.py --seed 50 rows at σ 0.1 with gamma, 512²: without the last refinement on
    # images blurred SMOOTHER times more (registration._smoother) they were right (0.10, 0.17 px) but
    # predicted 1.23 and 0.92 px off and not trusted; with it 0.03 and 0.07 px, predicted under 0.5.
    result, error = _registered(picture, (512, 512), 0.1, seed, row)
    assert error < 0.5, error
    assert float(result.error_px) >= error, (result.error_px, error)
    assert float(result.score) >= TRUST, (result.score, result.error_px)
    monkeypatch.setattr(rotstn.registration, "_smoother", lambda *args: None)
    without, _ = _registered(picture, (512, 512), 0.1, seed, row)
    assert float(without.error_px) > float(result.error_px), (without.error_px, result.error_px)
    assert float(without.score) < TRUST, without.score


@pytest.mark.parametrize("sigma", [0.0, 0.7, 1.0, 2.0, 3.0])
def test_the_noise_share_of_gradients_matches_scipy_blurred_noise(sigma):
    # The noise floor of the covariance (_refine._spread) and of the localisation: the share of blurred
    # white noise's variance a central difference keeps, against noise blurred by scipy.ndimage.
    from scipy import ndimage

    from rotstn.registration._refine import gradient_share

    noise = np.random.default_rng(3).standard_normal((1024, 1024))
    blurred = ndimage.gaussian_filter(noise, sigma, truncate=6.0)[32:-32, 32:-32] if sigma else noise
    difference = (blurred[:, 2:] - blurred[:, :-2]) / 2
    measured = difference.var() / blurred.var()
    assert gradient_share(sigma) == pytest.approx(measured, rel=0.04), measured


def test_a_strip_of_a_repeating_picture_lined_up_a_repeat_off_is_not_trusted(monkeypatch):
    # benchmarks/trust.py --seed 73: a 512×64 strip of the checkerboard at σ 0.02, lined up 330 px off
    # (one repeat of the board, 0.3° off), scored 0.999 with no runner-up: the search's hypotheses
    # never held the truth, and nothing tested whether fixed repeats itself (registration._repeats).
    result, error = _registered("checkerboard", (512, 64), 0.02, 1235591510, 1)
    assert error >= 1 or float(result.score) >= TRUST, (error, result.score)  # the case still arises
    assert not (error >= 1 and float(result.score) >= TRUST), (error, result.score)
    if error >= 1:
        assert bool(result.ambiguous[0]), result
        assert float(result.error_px) >= 1, result.error_px
    monkeypatch.setattr(rotstn.registration, "_repeats", lambda *args: None)
    before, error_before = _registered("checkerboard", (512, 64), 0.02, 1235591510, 1)
    assert error_before >= 1 and float(before.score) >= TRUST, (error_before, before.score)
