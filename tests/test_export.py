"""Every export path, each checked against eager PyTorch: torch.onnx.export with
dynamo=False (TorchScript tracing) and dynamo=True at opset 18, run with
onnxruntime; torch.jit.trace; torch.export.export. For `rotate` and `Rotate`
(also about a centre), the translating warp behind `register`'s result
(`_kernels.warp` with a source point other than the output centre), and an
eval-mode RotationSTN, paired and single, with each head. Where the exporter
allows a dynamic batch, it runs at several batch sizes."""

import warnings

import pytest
import torch
from helpers import ExportedPairedSTN, ExportedSTN, real_image

import rotstn
from rotstn import _kernels

PATHS = ["onnx_torchscript", "onnx_dynamo", "jit_trace", "torch_export"]
BATCHES = (1, 3, 5)


class RotateAbout(torch.nn.Module):
    """rotate() about a per-sample centre."""

    def forward(self, x: torch.Tensor, angle: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        return rotstn.rotate(x, angle, center)


class RigidWarp(torch.nn.Module):
    """The warp that applies a rigid result: output pixel `center` shows input pixel `source`."""

    def forward(
        self, x: torch.Tensor, angle: torch.Tensor, center: torch.Tensor, source: torch.Tensor
    ) -> torch.Tensor:
        return _kernels.warp(x, angle, center, source, "bilinear", "zeros", False)


def _digits(b: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.cat([real_image(size, size, seed + i).float() for i in range(b)])


def _rotate_inputs(b: int):
    return (_digits(b), torch.linspace(-3.0, 2.5, b), torch.rand(b, 2) * 6 + 11)


def _warp_inputs(b: int):
    center = torch.rand(b, 2) * 6 + 11
    return (
        _digits(b),
        torch.linspace(-3.0, 2.5, b),
        center,
        center + torch.linspace(-4.0, 3.0, 2 * b).view(b, 2),
    )


def _stn(paired: bool, head: str) -> torch.nn.Module:
    torch.manual_seed(0)
    stn = rotstn.RotationSTN(1, paired=paired, head=head, steps=2, identity_start=False).eval()
    if head != "binned":
        with torch.no_grad():  # a vector head at PyTorch's init barely turns: make it turn
            stn.head.proj.weight.mul_(30)
    return ExportedPairedSTN(stn) if paired else ExportedSTN(stn)


def _stn_inputs(paired: bool):
    def make(b: int):
        x = _digits(b, seed=3)
        turned = rotstn.rotate(x, torch.linspace(-2.5, 2.0, b) + 0.4)
        return (x, turned) if paired else (turned,)

    return make


CASES = {
    "Rotate": (lambda: rotstn.Rotate(0.7, padding_mode="reflection"), lambda b: (_digits(b),)),
    "rotate_center": (RotateAbout, _rotate_inputs),
    "rigid_warp": (RigidWarp, _warp_inputs),
    **{
        f"stn_{'paired' if p else 'single'}_{h}": (lambda p=p, h=h: _stn(p, h), _stn_inputs(p))
        for p in (False, True)
        for h in ("binned", "unit_vector", "von_mises")
    },
}


def _flat(out) -> list[torch.Tensor]:
    return [torch.as_tensor(o) for o in (out if isinstance(out, list | tuple) else [out])]


def _exported(path: str, model: torch.nn.Module, example: tuple, tmp_path):
    """Export `model` by `path`; returns (a callable on tensors, whether the batch is dynamic)."""
    names = [f"in{i}" for i in range(len(example))]
    # Angle and point inputs have the batch as dim 0 too; Rotate's fixed angle makes its batch static.
    dynamic = True
    if path in ("onnx_torchscript", "onnx_dynamo"):
        pytest.importorskip("onnx")
        ort = pytest.importorskip("onnxruntime")
        file = str(tmp_path / "model.onnx")
        if path == "onnx_torchscript":
            torch.onnx.export(
                model,
                example,
                file,
                opset_version=18,
                dynamo=False,
                input_names=names,
                dynamic_axes={n: {0: "batch"} for n in names},
            )
        else:
            pytest.importorskip("onnxscript")
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(
                model,
                example,
                file,
                opset_version=18,
                dynamo=True,
                input_names=names,
                dynamic_shapes=tuple({0: batch} for _ in example),
            )
        session = ort.InferenceSession(file)
        feed_names = [i.name for i in session.get_inputs()]

        def run(*xs):
            return [
                torch.from_numpy(o)
                for o in session.run(None, dict(zip(feed_names, (x.numpy() for x in xs), strict=True)))
            ]

        return run, dynamic
    if path == "jit_trace":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(model, example)
        return traced, dynamic
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, example, dynamic_shapes=tuple({0: batch} for _ in example))
    return program.module(), dynamic


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_eager(case, path, tmp_path, one_thread):
    make_model, make_inputs = CASES[case]
    model = make_model().eval()
    run, dynamic = _exported(path, model, make_inputs(3), tmp_path)
    for b in BATCHES if dynamic else (3,):
        inputs = make_inputs(b)
        with torch.no_grad():
            want = _flat(model(*inputs))
            got = _flat(run(*inputs))
        assert len(got) == len(want)
        if case.startswith("stn"):
            warped, angle = want
            assert float(angle.abs().max()) > 0.1, "the STN should turn the digits"
            diff = rotstn.angle_difference(got[1], angle)
            torch.testing.assert_close(diff, torch.zeros_like(diff), rtol=0, atol=1e-4)
            torch.testing.assert_close(got[0], warped, rtol=0, atol=1e-4)
        else:
            assert (want[0] - inputs[0]).abs().max() > 0.1, "the warp should move the image"
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)


def test_torchscript_onnx_export_of_rotate_has_grid_sample(tmp_path):
    # The failure this file started from: the CPU fast path's custom Function was traced
    # (UnsupportedOperatorError: aten::grid_sampler_2d). Traced calls take the reference path.
    onnx = pytest.importorskip("onnx")
    file = str(tmp_path / "rotate.onnx")
    torch.onnx.export(
        rotstn.Rotate(), (_digits(2), torch.tensor([0.3, -1.0])), file, opset_version=18, dynamo=False
    )
    ops = {n.op_type for n in onnx.load(file).graph.node}
    assert "GridSample" in ops
