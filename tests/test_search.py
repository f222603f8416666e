"""best_turn: the candidate turn that scores best, per image, checked against scipy-rotated targets."""

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from helpers import interior, real_image

import rotstn


def disc_mask(n: int) -> torch.Tensor:
    """(n, n) float64: 1 inside the disc a turn keeps in frame, 0 outside."""
    return torch.from_numpy(interior(n, n)).double()


def scipy_rotated(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """The reference turn: scipy.ndimage.rotate, counter-clockwise as displayed, same shape."""
    out = ndi.rotate(x[0, 0].numpy(), degrees, reshape=False, order=1, mode="constant")
    return torch.from_numpy(np.ascontiguousarray(out))[None, None]


def masked_mse(goal: torch.Tensor, mask: torch.Tensor):
    return lambda im: ((im - goal) * mask).pow(2).flatten(1).sum(1)


@pytest.mark.parametrize("degrees", [70.0, -130.0, 180.0])
def test_finds_the_scipy_rotation_on_the_full_circle(degrees):
    x = real_image(48, 48, seed=3)
    goal = scipy_rotated(x, degrees)
    turn = rotstn.best_turn(x, masked_mse(goal, disc_mask(48)), candidates=36)  # a 10° grid
    error = rotstn.angle_difference(turn, torch.tensor(math.radians(degrees), dtype=turn.dtype))
    assert abs(math.degrees(float(error))) < 1e-9


def test_each_image_gets_its_own_turn_and_around_moves_the_grid():
    xs = torch.cat([real_image(40, 40, seed=s) for s in range(4)])
    truth = torch.tensor([25.0, -55.0, 105.0, 5.0], dtype=torch.float64)
    goals = torch.cat([scipy_rotated(xs[i : i + 1], float(truth[i])) for i in range(4)])
    score = masked_mse(goals, disc_mask(40))
    # A 20° grid shifted by 5°: every truth is on it.
    around = torch.full((4,), math.radians(5.0), dtype=torch.float64)
    turn = rotstn.best_turn(xs, score, around=around, candidates=18)
    torch.testing.assert_close(torch.rad2deg(turn), truth, rtol=0, atol=1e-4)


def test_local_span_tries_around_first_and_never_does_worse():
    x = real_image(40, 40, seed=5).repeat(3, 1, 1, 1)
    goal = scipy_rotated(x[:1], 12.0).repeat(3, 1, 1, 1)
    score = masked_mse(goal, disc_mask(40))
    around = torch.deg2rad(torch.tensor([12.0, 0.0, -40.0], dtype=torch.float64))
    turn = rotstn.best_turn(x, score, around=around, candidates=4, span=math.radians(15))
    # Already right: kept. From 0°: the grid (±15°, ±5°) holds 15°, the nearest to 12°.
    # From -40°: -25° is the best reachable.
    torch.testing.assert_close(
        torch.rad2deg(turn), torch.tensor([12.0, 15.0, -25.0], dtype=torch.float64), rtol=0, atol=1e-4
    )
    assert bool((score(rotstn.rotate(x, turn)) <= score(rotstn.rotate(x, around)) + 1e-12).all())


def test_no_gradient_and_the_score_runs_without_autograd():
    x = real_image(24, 24).float().requires_grad_()
    around = torch.zeros(1, requires_grad=True)
    seen = []

    def score(im):
        seen.append(torch.is_grad_enabled())
        return im.flatten(1).mean(1)

    turn = rotstn.best_turn(x, score, around=around, candidates=4)
    assert not turn.requires_grad and seen == [False] * 4 and turn.dtype == torch.float32


def test_nan_scores_are_never_chosen():
    x = real_image(24, 24).repeat(2, 1, 1, 1)
    calls = iter(range(100))

    def score(im):
        i = next(calls)
        return torch.tensor([float("nan") if i != 2 else 5.0, float("nan")], dtype=im.dtype)

    turn = rotstn.best_turn(x, score, candidates=4)
    # Image 0: only candidate 2 (a half turn) has a number. Image 1: all NaN, keeps around (0).
    torch.testing.assert_close(turn.abs(), torch.tensor([math.pi, 0.0], dtype=x.dtype))


def test_bad_arguments_name_themselves():
    x = torch.rand(2, 1, 8, 8)
    ok = lambda im: im.flatten(1).sum(1)  # noqa: E731
    with pytest.raises(ValueError, match=r"image must be \(B, C, H, W\), got \(1, 8, 8\)"):
        rotstn.best_turn(x[0], ok)
    with pytest.raises(TypeError, match="score must be a callable"):
        rotstn.best_turn(x, 3)
    with pytest.raises(ValueError, match=r"score must return one loss per image, shape \(2,\), got \(\)"):
        rotstn.best_turn(x, lambda im: im.sum())
    with pytest.raises(ValueError, match="candidates must be an int >= 2, got 1"):
        rotstn.best_turn(x, ok, candidates=1)
    with pytest.raises(ValueError, match="span must be a number in"):
        rotstn.best_turn(x, ok, span=4.0)
    with pytest.raises(ValueError, match=r"around must be a tensor of shape \(2,\).*got \(3,\)"):
        rotstn.best_turn(x, ok, around=torch.zeros(3))
