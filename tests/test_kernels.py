"""The warp backends against each other and against float64 gradcheck.

The reference backend (grid by broadcasting + F.grid_sample, differentiated by
autograd) is the oracle for values and first derivatives; torch.autograd's
numerical gradcheck is the oracle for every backend's derivatives, including
the reference's own. The oracle tests in test_oracles.py run on every backend.
"""

import itertools
import math

import pytest
import torch
from helpers import real_image
from torch.autograd import gradcheck, gradgradcheck

import rotstn
from rotstn import _kernels

FAST = ["cpu"]
MODES = ["bilinear", "bicubic", "nearest"]
PADDINGS = ["zeros", "border", "reflection"]
# even/odd, square/non-square, single row and column
SIZES = [(16, 16), (15, 22), (21, 10), (1, 7), (6, 1)]


def run(backend, image, angle, center, grad_out, **kwargs):
    """Output and the gradients of <output, grad_out> with respect to image, angle and centre."""
    leaves = [t.detach().requires_grad_() for t in (image, angle, center)]
    with _kernels.use_backend(backend):
        out = rotstn.rotate(*leaves, **kwargs)
    out.backward(grad_out)
    return out, *(t.grad for t in leaves)


def inputs(h, w, batch=3, channels=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = (real_image(h + 8, w + 8, seed=seed)[..., 4 : 4 + h, 4 : 4 + w] * 0.8).float()
    image = (image + 0.2 * torch.rand(batch, channels, h, w, generator=g)).to(dtype)
    # Angles and centres away from the pixel grid, where bilinear sampling is smooth.
    angle = torch.tensor([0.37, -1.91, 2.83])[:batch].to(dtype if dtype == torch.float64 else torch.float32)
    center = torch.rand(batch, 2, generator=g, dtype=angle.dtype) * torch.tensor([w, h]) + 0.123
    grad_out = torch.randn(batch, channels, h, w, generator=g).to(dtype)
    return image, angle, center, grad_out


def assert_close_scaled(actual, expected, rtol):
    """Equal up to rtol times the largest magnitude (sums of many terms round differently)."""
    scale = expected.abs().max().clamp_min(1e-12)
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale.item())


@pytest.mark.filterwarnings("ignore:rotate.mode='nearest'. is piecewise constant")
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mode, padding_mode", list(itertools.product(MODES, PADDINGS)))
@pytest.mark.parametrize("align_corners", [False, True])
def test_values_and_gradients_match_reference(backend, mode, padding_mode, align_corners):
    kw = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    for h, w in SIZES:
        image, angle, center, grad_out = inputs(h, w, seed=h * w)
        ref = run("reference", image, angle, center, grad_out, **kw)
        got = run(backend, image, angle, center, grad_out, **kw)
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-5)
        assert_close_scaled(got[1], ref[1], rtol=1e-5)
        for g, r in zip(got[2:], ref[2:], strict=True):
            assert_close_scaled(g, r, rtol=1e-4)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_other_dtypes_match_reference(backend, dtype):
    image, angle, center, grad_out = inputs(13, 18, dtype=dtype)
    for mode in ("bilinear", "bicubic"):
        ref = run("reference", image, angle, center, grad_out, mode=mode)
        got = run(backend, image, angle, center, grad_out, mode=mode)
        assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == angle.dtype
        # Half images are sampled in float32 on both paths and rounded once at the end.
        tol = 1e-10 if dtype == torch.float64 else 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(got[0], ref[0], rtol=tol, atol=tol)
        torch.testing.assert_close(got[1], ref[1], rtol=tol, atol=tol)
        for g, r in zip(got[2:], ref[2:], strict=True):
            assert_close_scaled(g, r, rtol=1e-9 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("backend", FAST)
def test_batch_broadcast_matches_reference(backend):
    # One image, four angles and centres: the image gradient sums over the batch.
    image, angle, center, grad_out = inputs(12, 17, batch=3)
    image = image[:1]
    ref = run("reference", image, angle, center, grad_out)
    got = run(backend, image, angle, center, grad_out)
    assert got[0].shape == (3, 2, 12, 17) and got[1].shape == (1, 2, 12, 17)
    for g, r in zip(got, ref, strict=True):
        assert_close_scaled(g, r, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_gradients_that_were_not_asked_for_are_skipped(backend):
    # Each subset of requires_grad gives exactly the gradients of the full call.
    image, angle, center, grad_out = inputs(11, 14)
    with _kernels.use_backend(backend):
        full = run(backend, image, angle, center, grad_out)[1:]
        for wanted in itertools.product([False, True], repeat=3):
            if not any(wanted):
                continue
            leaves = [
                t.detach().requires_grad_(w) for t, w in zip((image, angle, center), wanted, strict=True)
            ]
            rotstn.rotate(*leaves).backward(grad_out)
            for leaf, w, expect in zip(leaves, wanted, full, strict=True):
                if w:
                    torch.testing.assert_close(leaf.grad, expect, rtol=0, atol=0)
                else:
                    assert leaf.grad is None


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_gradcheck(backend, mode, align_corners):
    x = torch.rand(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([0.3, -2.1], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([[1.23, 1.71], [3.1, 2.4]], dtype=torch.float64, requires_grad=True)
    with _kernels.use_backend(backend):
        for padding_mode in PADDINGS:

            def f(x, a, c, padding_mode=padding_mode):
                return rotstn.rotate(
                    x, a, c, mode=mode, padding_mode=padding_mode, align_corners=align_corners
                )

            assert gradcheck(f, (x, a, c))
            assert gradgradcheck(f, (x, a, c))


def test_auto_picks_the_cpu_path_on_cpu():
    x = torch.rand(1, 1, 6, 6)
    a = torch.tensor(0.2, requires_grad=True)
    assert type(rotstn.rotate(x, a).grad_fn).__name__ == "_WarpBackward"
    with _kernels.use_backend("reference"):
        assert type(rotstn.rotate(x, a).grad_fn).__name__ != "_WarpBackward"


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', .*got 'fast'"):
        with _kernels.use_backend("fast"):
            pass


@pytest.mark.parametrize("backend", FAST)
def test_dynamo_fullgraph_with_backward(backend):
    x = real_image(16, 20).float().repeat(2, 1, 1, 1)
    a = torch.tensor([0.3, -1.2])
    eager = run(backend, x, a, torch.tensor([[9.5, 7.5]]), torch.ones(2, 1, 16, 20))
    with _kernels.use_backend(backend):
        compiled = torch.compile(rotstn.rotate, fullgraph=True)
        leaves = [t.detach().requires_grad_() for t in (x, a, torch.tensor([[9.5, 7.5]]))]
        out = compiled(*leaves)
        out.backward(torch.ones_like(out))
    torch.testing.assert_close(out, eager[0])
    for leaf, expect in zip(leaves, eager[1:], strict=True):
        assert_close_scaled(leaf.grad, expect, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_identity_angle_gradient_matches_reference_on_power_of_two_sizes(backend):
    # At θ = 0 every sample sits on bilinear's kink and the gradient is one-sided;
    # which side depends on how the normalised coordinate rounds. On power-of-two
    # sizes the coordinates are exact on both paths, so the gradients agree.
    for dtype in (torch.float32, torch.float64):
        x = real_image(32, 64, seed=4).to(dtype)
        goal = rotstn.rotate(x, 0.1, mode="bicubic")
        grads = []
        for name in ("reference", backend):
            th = torch.zeros((), dtype=dtype, requires_grad=True)
            with _kernels.use_backend(name):
                torch.nn.functional.mse_loss(rotstn.rotate(x, th), goal).backward()
            grads.append(th.grad)
        assert grads[0] < 0
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=0)


def test_quarter_turn_gradient_matches_finite_difference():
    # Off the kink a quarter turn plus a small offset is smooth: the fast path's
    # angle gradient equals the central difference of the loss.
    x = real_image(24, 24, seed=6)
    goal = torch.rot90(x, 1, (-2, -1))
    theta = torch.tensor(math.pi / 2 + 0.013, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.mse_loss(rotstn.rotate(x, theta), goal)
    loss.backward()
    h = 1e-6
    with torch.no_grad():
        plus, minus = (torch.nn.functional.mse_loss(rotstn.rotate(x, theta + d), goal) for d in (h, -h))
    torch.testing.assert_close(theta.grad, (plus - minus) / (2 * h), rtol=1e-4, atol=0)
