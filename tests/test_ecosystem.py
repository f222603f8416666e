"""rotate and Rotate in the PyTorch ecosystem: torch.compile, autocast,
state_dict, ONNX (opset 18, checked with onnxruntime). RotationSTN's turn is
in test_stn_ecosystem.py."""

import io

import pytest
import torch
from helpers import real_image

import rotstn
from rotstn import _kernels

# Every warp implementation that serves CPU tensors (triton is tested in test_triton.py).
CPU_BACKENDS = [b for b in _kernels.BACKENDS if b != "triton"]


def test_compile_rotate_module_no_graph_break():
    layer = rotstn.Rotate(center=(7.5, 4.0), mode="bicubic")
    x = real_image(12, 20).float().expand(3, 2, 12, 20)
    a = torch.tensor([0.2, -1.0, 2.5])
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x, a), layer(x, a))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_every_backend_fullgraph_forward_and_backward(backend, mode):
    # A fast path (custom autograd.Function, dispatch on device) must not break the graph either.
    x = real_image(12, 20).float().expand(3, 2, 12, 20).clone().requires_grad_()
    a = torch.tensor([0.2, -1.0, 2.5], requires_grad=True)
    c = torch.tensor([7.5, 4.0], requires_grad=True)
    torch._dynamo.reset()
    with _kernels.use_backend("reference"):
        ref = rotstn.rotate(x, a, c, mode=mode)
        ref_grads = torch.autograd.grad((ref * ref).sum(), (x, a, c))
    with _kernels.use_backend(backend):
        fn = torch.compile(lambda x, a, c: rotstn.rotate(x, a, c, mode=mode), fullgraph=True)
        out = fn(x, a, c)
        grads = torch.autograd.grad((out * out).sum(), (x, a, c))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_compile_dynamic_shapes():
    fn = torch.compile(rotstn.rotate, fullgraph=True, dynamic=True)
    for h, w, b in [(12, 20, 2), (17, 9, 3)]:
        x = real_image(h, w).float().expand(b, 1, h, w)
        a = torch.linspace(-2.0, 2.0, b)
        torch.testing.assert_close(fn(x, a), rotstn.rotate(x, a), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu(dtype):
    x = real_image(32, 48).float()
    a = torch.tensor(0.7, requires_grad=True)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    with torch.autocast("cpu", dtype=dtype):
        y = conv(x)  # autocast makes this half precision
        assert y.dtype == dtype
        out = rotstn.rotate(y, a)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = rotstn.rotate(y.float(), a)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)
    out.float().sum().backward()
    assert torch.isfinite(a.grad)


def test_autocast_keeps_coordinates_in_float32():
    # bfloat16 has 8 bits of mantissa: a coordinate near x = 250 computed in it
    # would be off by up to half a pixel. Under autocast the warp must match the
    # float32 warp of the same bfloat16 pixels up to the final rounding.
    x = real_image(256, 256, seed=3).float()
    conv = torch.nn.Conv2d(1, 1, 1, bias=False)
    torch.nn.init.ones_(conv.weight)
    angle = torch.tensor([0.3, -2.2])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        out = rotstn.rotate(y, angle)
    assert y.dtype == out.dtype == torch.bfloat16
    ref = rotstn.rotate(y.float(), angle)
    err = (out.float() - ref).abs()
    # Rounding to bfloat16: half a unit in the last place of values up to 1.
    assert float(err.max()) <= 2**-8, float(err.max())
    coarse = rotstn.rotate(y.float(), angle.bfloat16().float())
    assert float((coarse - ref).abs().max()) > 10 * 2**-8, "the test image cannot tell the angles apart"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda(dtype):
    x = real_image(64, 96).float().cuda()
    a = torch.tensor([0.7, -1.9], device="cuda", requires_grad=True)
    conv = torch.nn.Conv2d(1, 3, 3, padding=1).cuda()
    with torch.autocast("cuda", dtype=dtype):
        y = conv(x)
        out = rotstn.rotate(y, a)
    assert y.dtype == out.dtype == dtype and torch.isfinite(out).all()
    ref = rotstn.rotate(y.float(), a)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)
    out.float().sum().backward()
    assert torch.isfinite(a.grad).all()


def test_state_dict_round_trip():
    layer = rotstn.Rotate(torch.tensor([0.1, 0.2]), (3.0, 4.0), learnable=True)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = rotstn.Rotate(torch.zeros(2), (0.0, 0.0), learnable=True)
    fresh.load_state_dict(torch.load(buf))
    x = torch.rand(2, 1, 9, 9)
    torch.testing.assert_close(fresh(x), layer(x))


def _export(model, args, path, dynamic_shapes=None):
    pytest.importorskip("onnxscript")
    torch.onnx.export(model, args, path, opset_version=18, dynamo=True, dynamic_shapes=dynamic_shapes)


def test_onnx_rotate_opset18(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")

    class Warp(torch.nn.Module):
        def forward(self, x, angle):
            return rotstn.rotate(x, angle)

    model = Warp().eval()
    path = str(tmp_path / "rotate.onnx")
    x, a = torch.rand(2, 3, 20, 30), torch.tensor([0.3, -2.0])
    _export(model, (x, a), path, dynamic_shapes=({0: "b", 2: "h", 3: "w"}, {0: "b"}))
    proto = onnx.load(path)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    session = ort.InferenceSession(path)
    for shape in [(2, 3, 20, 30), (4, 3, 33, 17)]:
        x = torch.from_numpy(real_image(shape[2], shape[3]).float().expand(*shape).numpy().copy())
        a = torch.linspace(-3, 3, shape[0])
        (out,) = session.run(None, {"x": x.numpy(), "angle": a.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), model(x, a), rtol=0, atol=1e-5)


def test_onnx_rotate_module(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    layer = rotstn.Rotate(0.4, padding_mode="reflection").eval()
    path = str(tmp_path / "layer.onnx")
    x = real_image(24, 24).float()
    _export(layer, (x,), path)
    (out,) = ort.InferenceSession(path).run(None, {"image": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), layer(x), rtol=0, atol=1e-5)
