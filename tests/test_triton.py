"""The Triton warp against the reference path (F.grid_sample), values and gradients.

Without a GPU the kernels run on CPU tensors under Triton's interpreter
(``use_backend("triton")`` loads an interpreted copy of the kernels, see
``rotstn/_kernels/triton_warp.py``); with CUDA the same tests also run the
compiled kernels. Everything that needs triton is skipped when it is not
installed. Sizes are small: the interpreter runs each program in numpy.
"""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import real_image

import rotstn
from rotstn._kernels import reference, triton_warp, use_backend

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

PADDINGS = ["zeros", "border", "reflection"]


def _case(shape, dtype, device, seed=0):
    """Real image crops, per-sample angles beyond ±π/2 and centres, some outside the image."""
    b, c, h, w = shape
    img = torch.cat([real_image(h, w, seed=seed + i) for i in range(b * c)]).view(b, c, h, w)
    g = torch.Generator().manual_seed(seed)
    angle = (torch.rand(b, generator=g) * 2 - 1) * 3.0
    center = torch.stack(
        (torch.rand(b, generator=g) * (w + 6) - 3, torch.rand(b, generator=g) * (h + 6) - 3), dim=-1
    )
    grad_out = torch.randn(shape, generator=g, dtype=torch.float64)
    return (
        img.to(device, dtype).requires_grad_(),
        angle.to(device).requires_grad_(),
        center.to(device).requires_grad_(),
        grad_out.to(device, dtype),
    )


def _run(warp, img, angle, center, grad_out):
    out = warp(img, angle, center)
    grads = torch.autograd.grad(out, [t for t in (img, angle, center) if t.requires_grad], grad_out)
    return out, grads


def _both(img, angle, center, grad_out, padding_mode, align_corners):
    def fused(i, a, c):
        return triton_warp.warp(i, a, c, c, padding_mode, align_corners)

    def ref(i, a, c):
        return reference.warp(i, a, c, c, "bilinear", padding_mode, align_corners)

    return _run(fused, img, angle, center, grad_out), _run(ref, img, angle, center, grad_out)


@needs_triton
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("shape", [(3, 2, 7, 10), (2, 1, 17, 18)], ids=["odd-h", "two-blocks"])
def test_float32_matches_reference(shape, padding_mode, align_corners, device):
    # Both paths compute the same float32 coordinates up to the reference's
    # round trip through grid_sample's [-1, 1] units (a few ulp of a pixel
    # coordinate), so values and per-pixel gradients agree to ~1e-6 and the
    # angle/centre sums over H·W·C terms to ~1e-5 relative.
    case = _case(shape, torch.float32, device)
    (out, grads), (ref_out, ref_grads) = _both(*case, padding_mode, align_corners)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    g_img, g_angle, g_center = grads
    r_img, r_angle, r_center = ref_grads
    torch.testing.assert_close(g_img, r_img, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_angle, r_angle, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_center, r_center, rtol=1e-4, atol=1e-4)
    assert r_angle.abs().min() > 1e-2  # the comparison is not vacuous


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("padding_mode", "align_corners"), [("zeros", False), ("reflection", True)])
def test_half_precision_matches_reference(dtype, padding_mode, align_corners, device):
    # Both paths sample in float32 and round once to the image dtype, so
    # values and grad-image differ by at most one ulp of that dtype; the
    # angle/centre gradients are float32 sums of identical inputs.
    case = _case((2, 2, 9, 8), dtype, device)
    (out, grads), (ref_out, ref_grads) = _both(*case, padding_mode, align_corners)
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == torch.float32
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out, ref_out, rtol=0, atol=eps)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=eps, atol=eps * ref_grads[0].abs().max().item())
    torch.testing.assert_close(grads[1], ref_grads[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[2], ref_grads[2], rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("wanted", ["image", "angle", "center"])
def test_gradient_of_one_input(wanted, device):
    # The backward skips the scatter or the geometry reduction when their
    # inputs need no gradient; each on its own must still be right.
    img, angle, center, grad_out = _case((2, 1, 6, 7), torch.float32, device, seed=3)
    for name, t in (("image", img), ("angle", angle), ("center", center)):
        t.requires_grad_(name == wanted)
    (_, (g,)), (_, (r,)) = _both(img, angle, center, grad_out, "border", False)
    torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@needs_triton
def test_rotate_dispatch_broadcast_and_strides(device):
    # Through the public rotate(): one channels-last image broadcast over a
    # (B,) angle reaches the kernel as a stride-0 batch with permuted strides.
    img = real_image(9, 12, seed=5).float().expand(1, 3, 9, 12).contiguous()
    img = img.to(device).to(memory_format=torch.channels_last).requires_grad_()
    angle = torch.tensor([0.4, -1.3, 2.5], device=device, requires_grad=True)
    grad_out = torch.randn(3, 3, 9, 12, device=device)
    results = []
    for backend in ("triton", "reference"):
        with use_backend(backend):
            out = rotstn.rotate(img, angle, (5.0, 3.5), padding_mode="reflection")
        results.append((out, *torch.autograd.grad(out, (img, angle), grad_out)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_triton
def test_quarter_turn_and_identity_are_exact(device):
    # Independent of grid_sample: a quarter turn about the centre of a square
    # image is torch.rot90, and θ = 0 is the identity, to float32 rounding.
    x = real_image(8, 8, seed=2).float().to(device).expand(2, 2, 8, 8)
    with use_backend("triton"):
        quarter = rotstn.rotate(x, math.pi / 2)
        torch.testing.assert_close(quarter, torch.rot90(x, 1, (-2, -1)), rtol=0, atol=1e-6)
        assert torch.equal(rotstn.rotate(x, 0.0), x)


@needs_triton
def test_interpreter_is_confined_to_its_copy_of_the_kernels():
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    before = os.environ.get("TRITON_INTERPRET")
    assert isinstance(triton_warp.kernels(interpret=True).warp_forward, InterpretedFunction)
    assert os.environ.get("TRITON_INTERPRET") == before
    if before != "1":
        # triton's own library and the compiled kernels stay compiled.
        assert isinstance(triton.language.zeros, JITFunction)
        assert isinstance(triton_warp.kernels(interpret=False).warp_forward, JITFunction)


def _signature(kernel, pointers, constexprs):
    # Every argument that is not a pointer or a constexpr is an int32 size or stride.
    return {
        name: pointers.get(name, "constexpr" if name in constexprs else "i32") for name in kernel.arg_names
    }


@needs_triton
@pytest.mark.parametrize(
    ("image", "padding", "align", "need_image", "need_geometry"),
    [("fp32", 0, False, True, True), ("bf16", 1, True, True, False), ("fp16", 2, False, False, True)],
)
def test_kernels_compile_for_hopper(image, padding, align, need_image, need_geometry):
    # The interpreter runs the kernels with Python semantics; the compiler is
    # stricter (globals, types, loop-carried pointers). Compiling down to an
    # sm_90 cubin needs no GPU, so those errors fail here too.
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    module = triton_warp.kernels(interpret=False)
    if not isinstance(module.warp_forward, triton.runtime.jit.JITFunction):
        pytest.skip("TRITON_INTERPRET=1 is set for the whole process")
    target = GPUTarget("cuda", 90, 32)
    coords = {"angle_ptr": "*fp32", "center_ptr": "*fp32", "source_ptr": "*fp32"}
    fwd_consts = {"PADDING": padding, "ALIGN": align, "BLOCK": 256}
    fwd_ptrs = {"img_ptr": f"*{image}", "out_ptr": f"*{image}", **coords}
    bwd_consts = {**fwd_consts, "NEED_IMAGE": need_image, "NEED_GEOMETRY": need_geometry}
    bwd_ptrs = {"img_ptr": f"*{image}", "gout_ptr": f"*{image}", "gimg_ptr": "*fp32", "gpart_ptr": "*fp32"}
    for kernel, ptrs, consts in (
        (module.warp_forward, fwd_ptrs, fwd_consts),
        (module.warp_backward, {**bwd_ptrs, **coords}, bwd_consts),
    ):
        try:
            src = ASTSource(fn=kernel, signature=_signature(kernel, ptrs, consts), constexprs=consts)
        except TypeError:
            pytest.skip(f"triton {triton.__version__} has an older ahead-of-time compile API")
        compiled = triton.compile(src, target=target, options={"num_warps": 4, "enable_fp_fusion": True})
        assert compiled.asm["cubin"]


@needs_triton
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_rigid_warp_matches_reference(padding_mode, device):
    # A translation moves the output centre against the input point it shows (source ≠ centre).
    g = torch.Generator().manual_seed(3)
    img = torch.rand(2, 3, 11, 13, generator=g).to(device).requires_grad_()
    angle = torch.tensor([0.4, -2.2], device=device, requires_grad=True)
    center = torch.tensor([[6.0, 5.0], [7.5, 4.0]], device=device, requires_grad=True)
    source = torch.tensor([[4.5, 6.25], [8.0, 3.0]], device=device, requires_grad=True)
    grad_out = torch.rand(2, 3, 11, 13, generator=g).to(device)
    results = []
    for fn in (
        lambda: triton_warp.warp(img, angle, center, source, padding_mode, False),
        lambda: reference.warp(img, angle, center, source, "bilinear", padding_mode, False),
    ):
        out = fn()
        results.append((out, *torch.autograd.grad(out, [img, angle, center, source], grad_out)))
    for fused, ref in zip(*results, strict=True):
        torch.testing.assert_close(fused, ref, atol=2e-4, rtol=1e-4)
    with use_backend("triton"):
        torch.testing.assert_close(
            rotstn.warp(img, angle, source - center), reference.warp(
                img, angle, torch.tensor([[6.0, 5.0]], device=device) + source - center,
                torch.tensor([[6.0, 5.0]], device=device).expand(2, 2), "bilinear", "zeros", False
            ), atol=2e-4, rtol=1e-4,
        )  # fmt: skip


def test_forced_backend_rejects_what_it_does_not_serve():
    x = torch.rand(1, 1, 5, 5)
    with use_backend("triton"):
        for kwargs, words in (
            ({"mode": "nearest"}, "mode='nearest'"),
            ({"mode": "bicubic"}, "mode='bicubic'"),
        ):
            with pytest.raises(ValueError, match=words):
                rotstn.rotate(x, 0.3, **kwargs)
        with pytest.raises(ValueError, match=r"torch\.float64"):
            rotstn.rotate(x.double(), 0.3)
        with pytest.raises(ValueError, match="one pixel"):
            rotstn.rotate(torch.rand(1, 1, 1, 5), 0.3, align_corners=True)


def test_forced_backend_without_triton_says_how_to_install(monkeypatch):
    monkeypatch.setattr(triton_warp, "available", lambda: False)
    with use_backend("triton"), pytest.raises(RuntimeError, match=r"rotstn\[triton\]"):
        rotstn.rotate(torch.rand(1, 1, 5, 5), 0.3)


def test_auto_keeps_cpu_and_unsupported_calls_on_the_reference_path(monkeypatch, device):
    def refuse(*args):
        raise AssertionError("the Triton kernel was called")

    monkeypatch.setattr(triton_warp, "warp", refuse)
    x = torch.rand(1, 2, 6, 6, device=device)
    rotstn.rotate(x.double(), 0.3)
    rotstn.rotate(x, 0.3, mode="bicubic")
    if device == "cpu":
        rotstn.rotate(x, 0.3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@needs_triton
def test_auto_uses_triton_for_cuda(monkeypatch):
    calls = []
    fused = triton_warp.warp
    monkeypatch.setattr(triton_warp, "warp", lambda *a: calls.append(1) or fused(*a))
    rotstn.rotate(torch.rand(2, 3, 16, 16, device="cuda"), 0.3)
    assert calls == [1]


def test_import_does_not_load_triton():
    code = (
        "import sys, torch, rotstn; rotstn.rotate(torch.rand(1, 4, 4), 0.5); print('triton' in sys.modules)"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == "False"
