"""rotate and Rotate in the PyTorch ecosystem: torch.compile, autocast,
state_dict, ONNX (opset 18, checked with onnxruntime)."""

import io

import pytest
import torch
from helpers import real_image

import rotstn


def test_compile_rotate_module_no_graph_break():
    layer = rotstn.Rotate(center=(7.5, 4.0), mode="bicubic")
    x = real_image(12, 20).float().expand(3, 2, 12, 20)
    a = torch.tensor([0.2, -1.0, 2.5])
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x, a), layer(x, a))


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
