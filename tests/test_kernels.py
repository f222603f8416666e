"""The warp backends against each other and against float64 gradcheck.

The reference backend (grid by broadcasting + F.grid_sample, differentiated by
autograd) is the oracle for values and first derivatives; torch.autograd's
numerical gradcheck is the oracle for every backend's derivatives, including
the reference's own. The oracle tests in test_oracles.py run on every backend.
"""

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

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


# The compiled C kernel (rotstn/_kernels/rotate_cpu.c): bilinear, zero padding, float32/float64.
needs_kernel = pytest.mark.skipif(
    _kernels.cpu.compiled.library() is None, reason="no C compiler here (or ROTSTN_NO_COMPILE=1)"
)


def run_kernel_and_reference(image, angle, center, grad_out, align_corners):
    ref = run("reference", image, angle, center, grad_out, align_corners=align_corners)
    # align_corners=True samples a one-pixel axis at pixel 0 everywhere: those calls stay on aten.
    served = not (align_corners and min(image.shape[-2:]) == 1)
    serves = _kernels.cpu.kernel_serves(image, angle, center, center, "bilinear", "zeros", align_corners)
    assert serves == served
    got = run("cpu", image, angle, center, grad_out, align_corners=align_corners)
    return got, ref


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("align_corners", [False, True])
def test_compiled_kernel_matches_reference(dtype, align_corners):
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    # even, odd, non-square, single row and column; one sample and several (split over samples
    # and, with fewer samples than threads, over rows)
    for (h, w), batch in itertools.product([(16, 16), (15, 22), (21, 10), (7, 1), (1, 9)], [1, 3]):
        image, angle, center, grad_out = inputs(h, w, batch=batch, channels=3, dtype=dtype, seed=h + w)
        angle = angle.to(dtype)
        got, ref = run_kernel_and_reference(image, angle, center.to(dtype), grad_out, align_corners)
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=tol)
        for g, r in zip(got[1:], ref[1:], strict=True):
            assert_close_scaled(g, r, rtol=tol * 10)


@needs_kernel
def test_compiled_kernel_angles_and_centres():
    # Large angles, quarter turns (off the kink by a little: cos(π/2) is not 0 in float32 either),
    # centres outside the image, and a batch big enough to run on several threads.
    h, w, n = 24, 31, 8
    image, _, _, grad_out = inputs(h, w, batch=n, channels=1)
    image = image.expand(n, 1, h, w) + 0.1 * torch.rand(
        n, 1, h, w, generator=torch.Generator().manual_seed(3)
    )
    angle = torch.tensor([math.pi / 2 + 1e-3, -math.pi / 2 - 2e-3, 40.3, -17.9, math.pi, 1e-3, 6.1, -0.77])
    center = torch.tensor(
        [
            [11.3, 9.7],
            [-6.2, 4.1],
            [40.5, 30.2],
            [15.0, -12.3],
            [3.3, 3.7],
            [30.9, 23.1],
            [12.1, 10.8],
            [-50.0, 80.0],
        ]
    )
    got, ref = run_kernel_and_reference(image, angle, center, grad_out, False)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-5)
    for g, r in zip(got[1:], ref[1:], strict=True):
        assert_close_scaled(g, r, rtol=1e-4)


@needs_kernel
def test_compiled_kernel_identity_and_broadcast_image():
    # θ = 0 on a power-of-two size (coordinates exact on both paths, one-sided gradients agree),
    # and one image expanded over the batch (read in place, gradient summed by autograd).
    x = real_image(32, 64, seed=2).float()
    angle = torch.tensor([0.0, 0.0, 0.4])
    center = torch.tensor([[31.5, 15.5], [20.0, 8.0], [31.5, 15.5]])
    grad_out = torch.randn(3, 1, 32, 64, generator=torch.Generator().manual_seed(1))
    got, ref = run_kernel_and_reference(x.expand(3, 1, 32, 64), angle, center, grad_out, False)
    for g, r in zip(got, ref, strict=True):
        assert_close_scaled(g, r, rtol=1e-5)
    leaves = [t.detach().requires_grad_() for t in (x, angle, center)]
    rotstn.rotate(leaves[0], leaves[1], leaves[2]).backward(grad_out)
    assert leaves[0].grad.shape == x.shape
    assert_close_scaled(leaves[0].grad, ref[1].sum(0, keepdim=True), rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("align_corners", [False, True])
def test_compiled_kernel_gradcheck(align_corners):
    x = torch.rand(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([0.3, -2.1], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([[1.23, 1.71], [3.1, 2.4]], dtype=torch.float64, requires_grad=True)
    assert _kernels.cpu.kernel_serves(x, a, c, c, "bilinear", "zeros", align_corners)

    def f(x, a, c):
        return rotstn.rotate(x, a, c, align_corners=align_corners)

    with _kernels.use_backend("cpu"):
        assert gradcheck(f, (x, a, c))
        assert gradgradcheck(f, (x, a, c))


def test_compiled_kernel_is_active_when_a_compiler_exists():
    # CI has a compiler: the kernel must actually build and be used, not silently fall back.
    import shutil

    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")) or sys.platform == "win32":
        pytest.skip("no C compiler")
    if os.environ.get("ROTSTN_NO_COMPILE") == "1":
        pytest.skip("ROTSTN_NO_COMPILE=1")
    assert _kernels.cpu.compiled.library() is not None
    x, a, c = torch.rand(2, 1, 8, 8), torch.rand(2), torch.rand(2, 2) * 8
    assert _kernels.cpu.kernel_serves(x, a, c, c, "bilinear", "zeros", False)
    assert not _kernels.cpu.kernel_serves(x, a, c, c, "bicubic", "zeros", False)
    assert not _kernels.cpu.kernel_serves(x, a, c, c, "bilinear", "border", False)


def test_compiled_kernel_fallback_without_compiling(tmp_path):
    # ROTSTN_NO_COMPILE=1: nothing is built, the aten-based path runs and matches the reference.
    code = (
        "import torch, rotstn\n"
        "from rotstn._kernels import cpu, use_backend\n"
        "assert cpu.compiled.library() is None\n"
        "x, a = torch.rand(2, 1, 9, 11), torch.tensor([0.3, -1.2], requires_grad=True)\n"
        "out = rotstn.rotate(x, a)\n"
        "assert type(out.grad_fn).__name__ == '_WarpBackward'\n"
        "with use_backend('reference'):\n"
        "    ref = rotstn.rotate(x, a)\n"
        "torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)\n"
        "out.sum().backward()\n"
        "print('fallback ok')\n"
    )
    env = {**os.environ, "ROTSTN_NO_COMPILE": "1", "ROTSTN_CACHE_DIR": str(tmp_path), "ROTSTN_DEBUG": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fallback ok" in done.stdout
    assert "ROTSTN_NO_COMPILE=1" in done.stderr  # the reason, reported once under ROTSTN_DEBUG
    assert list(tmp_path.iterdir()) == []


def test_functorch_transforms_fall_back_to_the_reference_path():
    x = real_image(12, 14).float()
    angles = torch.tensor([0.3, -0.8])
    batched = torch.vmap(lambda a: rotstn.rotate(x[0], a))(angles)
    with _kernels.use_backend("reference"):
        expect = torch.stack([rotstn.rotate(x[0], a) for a in angles])
    torch.testing.assert_close(batched, expect)
    grad = torch.func.grad(lambda a: rotstn.rotate(x, a).square().sum())(torch.tensor(0.3))
    a = torch.tensor(0.3, requires_grad=True)
    rotstn.rotate(x, a).square().sum().backward()
    torch.testing.assert_close(grad, a.grad, rtol=1e-4, atol=0)


@needs_kernel
def test_compiled_kernel_without_channels():
    # No pixels to sample: empty output, and zero (not uninitialised) angle and centre gradients.
    x = torch.rand(2, 0, 5, 6)
    a = torch.tensor([0.3, -1.0], requires_grad=True)
    c = torch.tensor([[2.0, 2.5], [1.0, 3.0]], requires_grad=True)
    assert _kernels.cpu.kernel_serves(x, a, c, c, "bilinear", "zeros", False)
    out = rotstn.rotate(x, a, c)
    assert out.shape == (2, 0, 5, 6)
    (out.sum() + a.sum() * 0 + c.sum() * 0).backward()
    assert torch.equal(a.grad, torch.zeros(2)) and torch.equal(c.grad, torch.zeros(2, 2))


# Each instruction-set variant of the compiled kernel (ROTSTN_CPU_ISA), forced in turn. A variant
# this CPU cannot run is skipped, not failed.
@pytest.fixture(params=_kernels.compiled.ISAS)
def isa(request, monkeypatch):
    if _kernels.cpu.compiled.library() is None:
        pytest.skip("no C compiler here (or ROTSTN_NO_COMPILE=1)")
    if request.param not in _kernels.compiled.supported():
        pytest.skip(f"this CPU cannot run the {request.param} variant")
    monkeypatch.setenv("ROTSTN_CPU_ISA", request.param)
    assert _kernels.compiled.active_isa() == request.param
    return request.param


def rigid_inputs(h, w, batch, channels, dtype, seed):
    """Image, angle, centre and a source point away from the centre (a rotation plus a translation)."""
    image, angle, center, grad_out = inputs(h, w, batch=batch, channels=channels, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    source = center + (torch.rand(batch, 2, generator=g, dtype=center.dtype) - 0.5) * 6
    return image, angle.to(center.dtype), center, source, grad_out


def run_warp(backend, image, angle, center, source, grad_out, align_corners=False):
    """Output and gradients to image, angle, centre and source of a rigid warp (source None: rotation)."""
    leaves = [t.detach().requires_grad_() for t in (image, angle, center)]
    src = leaves[2] if source is None else source.detach().requires_grad_()
    with _kernels.use_backend(backend):
        out = _kernels.warp(*leaves, src, "bilinear", "zeros", align_corners)
    out.backward(grad_out)
    return out, *(t.grad for t in leaves), None if source is None else src.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("align_corners", [False, True])
def test_every_variant_matches_reference(isa, dtype, align_corners):
    # Widths with whole vector steps and tails (16 / 8 / 4 lanes), steps wholly inside and across
    # the border, one sample (rows split over threads) and several, rotations and rigid warps.
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for (h, w), batch, channels in [((40, 37), 3, 1), ((33, 64), 1, 3), ((9, 21), 2, 2), ((5, 3), 2, 1)]:
        image, angle, center, source, grad_out = rigid_inputs(h, w, batch, channels, dtype, seed=h + w)
        for src in (None, source):
            assert _kernels.cpu.kernel_serves(
                image, angle, center, center if src is None else src, "bilinear", "zeros", align_corners
            )
            got = run_warp("cpu", image, angle, center, src, grad_out, align_corners)
            ref = run_warp("reference", image, angle, center, src, grad_out, align_corners)
            torch.testing.assert_close(got[0], ref[0], rtol=0, atol=tol)
            for g, r in zip(got[1:], ref[1:], strict=True):
                if r is not None:
                    assert_close_scaled(g, r, rtol=tol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels", [1, 2, 3, 4, 8])
def test_every_variant_every_channel_count_and_odd_widths(isa, dtype, channels):
    # Widths just above and below whole vector steps (16 / 8 / 4 lanes): a row ends with a step
    # that overlaps the one before (its first lanes masked off in the backward), or is narrower
    # than one step (scalar); rows split over threads (one sample) and samples over threads.
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for (h, w), batch in [((19, 17), 2), ((12, 31), 1), ((7, 9), 2)]:
        image, angle, center, source, grad_out = rigid_inputs(h, w, batch, channels, dtype, seed=w + channels)
        got = run_warp("cpu", image, angle, center, source, grad_out)
        ref = run_warp("reference", image, angle, center, source, grad_out)
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=tol)
        for g, r in zip(got[1:], ref[1:], strict=True):
            assert_close_scaled(g, r, rtol=tol * 10)


@pytest.mark.parametrize("align_corners", [False, True])
def test_every_variant_gradcheck(isa, align_corners):
    # float64 derivatives to image, angle, centre and source point: a rigid warp and a rotation.
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 2, 9, 19, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([0.11, -0.23], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([[9.23, 4.31], [8.6, 3.9]], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([[9.71, 4.12], [10.3, 4.45]], dtype=torch.float64, requires_grad=True)

    def rigid(x, a, c, s):
        return _kernels.warp(x, a, c, s, "bilinear", "zeros", align_corners)

    def rotation(x, a, c):
        return _kernels.warp(x, a, c, c, "bilinear", "zeros", align_corners)

    with _kernels.use_backend("cpu"):
        assert type(rigid(x, a, c, s).grad_fn).__name__ == "_WarpBackward"
        assert gradcheck(rigid, (x, a, c, s))
        assert gradcheck(rotation, (x, a, c))
        if not align_corners:
            assert gradgradcheck(rigid, (x, a, c, s))


def test_every_variant_is_independent_of_the_thread_count(isa):
    # Rows split over threads (one sample) and samples split over threads give the same bits.
    for batch in (1, 3):
        image, angle, center, source, grad_out = rigid_inputs(128, 96, batch, 2, torch.float32, seed=batch)
        results = []
        n = torch.get_num_threads()
        try:
            for threads in (1, 2, 3, 4):
                torch.set_num_threads(threads)
                results.append(run_warp("cpu", image, angle, center, source, grad_out))
        finally:
            torch.set_num_threads(n)
        for other in results[1:]:
            for g, r in zip(other, results[0], strict=True):
                assert torch.equal(g, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_variant_saved_derivatives_change_no_bit(isa, dtype, monkeypatch):
    # With a gradient to the angle or a point the forward keeps ∂out/∂x, ∂out/∂y for the backward;
    # ROTSTN_CPU_LOW_MEMORY=1 makes the backward load the image's corners instead. Same bits either
    # way: rotations and rigid warps, one and several channels, steps inside and across the border.
    for (h, w), batch, channels in [((40, 37), 3, 1), ((33, 64), 2, 3)]:
        image, angle, center, source, grad_out = rigid_inputs(h, w, batch, channels, dtype, seed=h)
        for src in (None, source):
            results = []
            for low in ("0", "1"):
                monkeypatch.setenv("ROTSTN_CPU_LOW_MEMORY", low)
                results.append(run_warp("cpu", image, angle, center, src, grad_out))
            for kept, loaded in zip(*results, strict=True):
                assert (kept is None and loaded is None) or torch.equal(kept, loaded)


def test_rotstn_cpu_isa_is_validated(monkeypatch):
    monkeypatch.setenv("ROTSTN_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="ROTSTN_CPU_ISA must be one of avx512, avx2, generic"):
        _kernels.compiled.requested_isa()


def test_translated_warp_matches_reference_and_scipy():
    # source ≠ centre: the CPU path serves it, equals the reference path, and equals scipy's
    # order-1 affine_transform away from the border (scipy's edge handling differs there).
    from scipy import ndimage as ndi

    h, w = 31, 44
    x = real_image(h, w, seed=8)
    angle = torch.tensor([0.7], dtype=torch.float64)
    center = torch.tensor([[20.3, 14.1]], dtype=torch.float64)
    source = torch.tensor([[23.9, 12.6]], dtype=torch.float64)
    out = _kernels.warp(x, angle, center, source, "bilinear", "zeros", False)
    with _kernels.use_backend("reference"):
        ref = _kernels.warp(x, angle, center, source, "bilinear", "zeros", False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    c, s = math.cos(0.7), math.sin(0.7)
    (cx, cy), (sx, sy) = center[0].tolist(), source[0].tolist()
    # (row, col) of the input read by output (i, j): y = c·i + s·j + oy, x = -s·i + c·j + ox.
    m = torch.tensor([[c, s], [-s, c]], dtype=torch.float64).numpy()
    offset = [sy - s * cx - c * cy, sx - c * cx + s * cy]
    expect = ndi.affine_transform(x[0, 0].numpy(), m, offset=offset, order=1)
    ii, jj = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (h, w)), indexing="ij")
    ys, xs = c * ii + s * jj + offset[0], -s * ii + c * jj + offset[1]
    inside = (xs >= 1) & (xs <= w - 2) & (ys >= 1) & (ys <= h - 2)
    assert inside.sum() > h * w / 3
    torch.testing.assert_close(out[0, 0][inside], torch.from_numpy(expect)[inside], rtol=0, atol=1e-12)


def test_dispatch_sends_rigid_warps_to_the_cpu_path_and_other_sizes_to_the_reference():
    x = torch.rand(2, 1, 12, 15)
    a = torch.tensor([0.3, -0.4], requires_grad=True)
    c, s = torch.tensor([[6.0, 5.5], [7.0, 5.0]]), torch.tensor([[5.0, 6.5], [8.0, 4.0]])
    assert type(_kernels.warp(x, a, c, s, "bilinear", "zeros", False).grad_fn).__name__ == "_WarpBackward"
    other = _kernels.warp(x, a, c, s, "bilinear", "zeros", False, size=(10, 9))
    assert other.shape == (2, 1, 10, 9) and type(other.grad_fn).__name__ != "_WarpBackward"


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "aten"])
def test_source_and_centre_gradients_gradcheck(kernel, monkeypatch):
    # The centre's gradient is -R(θ)ᵀ S and the source's S, on the kernel and on the aten path
    # (bicubic and border padding stay on aten), checked numerically in float64.
    if not kernel:
        monkeypatch.setattr(_kernels.cpu.compiled, "library", lambda: None)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 2, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([1.3], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([[3.27, 2.91]], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([[4.15, 3.42]], dtype=torch.float64, requires_grad=True)
    with _kernels.use_backend("cpu"):
        for mode, padding in (("bilinear", "zeros"), ("bicubic", "border")):

            def f(x, a, c, s, mode=mode, padding=padding):
                return _kernels.warp(x, a, c, s, mode, padding, True)

            assert gradcheck(f, (x, a, c, s))


def test_cache_sizes_are_read_from_sysfs_and_set_the_limits(tmp_path, monkeypatch):
    # A fake cpu0/cache: L1D and L2 per core (shared by two hyperthreads), an L3 for 16 CPUs.
    from rotstn._kernels import machine

    for name, level, kind, size, cpus in [
        ("index0", 1, "Data", "48K", "0,8"),
        ("index1", 1, "Instruction", "32K", "0,8"),
        ("index2", 2, "Unified", "2048K", "0,8"),
        ("index3", 3, "Unified", "107520K", "0-15"),
    ]:
        (tmp_path / name).mkdir()
        for field, value in [("level", level), ("type", kind), ("size", size), ("shared_cpu_list", cpus)]:
            (tmp_path / name / field).write_text(f"{value}\n")
    found = machine.from_sysfs(tmp_path)
    assert found == machine.Caches(24 * 2**10, 2**20, 105 * 2**20, "sysfs", 16)
    chosen = machine.limits_for(found)
    assert chosen.prefetch_max_bytes == 2**19 and chosen.derivatives_max_bytes == 3 * 105 * 2**20 // 4
    # A guest that reports its host's L3 (480 MiB for its 2 CPUs, as an Intel Xeon VM did): it
    # counts 16 MiB a CPU, so 24 MiB of derivatives are kept, not 360 MiB (slower there).
    (tmp_path / "index3" / "size").write_text("491520K\n")
    (tmp_path / "index3" / "shared_cpu_list").write_text("0-1\n")
    guest = machine.from_sysfs(tmp_path)
    assert guest.l3 == 480 * 2**20 and guest.l3_cpus == 2
    assert machine.limits_for(guest).derivatives_max_bytes == 24 * 2**20
    # No L3: the derivatives are kept only while they fit the L2.
    assert machine.limits_for(machine.Caches(2**15, 2**20, 0, "x")).derivatives_max_bytes == 3 * 2**18
    assert machine.from_sysfs(tmp_path / "missing") is None
    machine.caches.cache_clear()
    try:
        monkeypatch.setenv("ROTSTN_CPU_CACHES", "32K,1M,32M")
        assert machine.caches() == machine.Caches(2**15, 2**20, 2**25, "ROTSTN_CPU_CACHES")
        machine.caches.cache_clear()
        monkeypatch.setenv("ROTSTN_CPU_CACHES", "lots")
        with pytest.raises(ValueError, match="ROTSTN_CPU_CACHES"):
            machine.caches()
    finally:
        machine.caches.cache_clear()


def test_saved_derivatives_follow_the_last_level_cache(monkeypatch):
    # The forward keeps ∂out/∂x, ∂out/∂y only while they fit the limit the caches give.
    from rotstn._kernels import machine

    if _kernels.cpu.compiled.library() is None:
        pytest.skip("no C compiler here (or ROTSTN_NO_COMPILE=1)")
    image = torch.rand(2, 1, 32, 32, requires_grad=True)  # derivatives: 2 · 2 · 32 · 32 · 4 = 16 KiB
    angle = torch.tensor([0.3, -1.0], requires_grad=True)
    kept = []
    for limit in (16 * 2**10, 16 * 2**10 - 1):
        monkeypatch.setattr(machine, "limits", lambda limit=limit: machine.Limits(2**19, limit))
        with _kernels.use_backend("cpu"):
            out = _kernels.warp(image, angle, torch.full((2, 2), 15.5), None, "bilinear", "zeros", False)
        kept.append(out.grad_fn.deriv is not None)
    assert kept == [True, False]
