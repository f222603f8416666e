"""register_stack on a dask.distributed LocalCluster (2 worker processes) from Zarr / OME-Zarr.

Every Dask result is compared with the in-memory call (``client=False``) on the same frames and
the same parts, which never touches Dask or Zarr: the two must agree to 1e-6 px at the frame's
corners (they are in fact bit-identical, as each part runs the same code on the same frames).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")
ome_zarr_writer = pytest.importorskip("ome_zarr.writer")
pytest.importorskip("scipy")

from test_stack import SIZE, _scipy_frames, _walk  # noqa: E402

from rotstn import io, register, register_pairs, register_stack  # noqa: E402
from rotstn.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N = 24
PART = 8  # three parts of two batches of 4


def _corners(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest distance (px) between where two sets of maps send the frame's corners."""
    c = torch.tensor(
        [[0, 0, 1], [SIZE - 1, 0, 1], [0, SIZE - 1, 1], [SIZE - 1, SIZE - 1, 1]], dtype=a.dtype
    ).T
    return float((a @ c - b @ c).norm(dim=1).max())


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def data():
    """uint16 frames (N, H, W): a walk with a sudden turn at frame 11."""
    frames, _ = _scipy_frames(*_walk(N, 11), noise=0.02, seed=1)
    return np.clip(np.rint(frames[:, 0].numpy() * 60000), 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def stores(data, tmp_path_factory):
    """The same frames as a plain Zarr array and as an OME-Zarr 0.5 image (t, c, z, y, x; 2 levels)."""
    root = tmp_path_factory.mktemp("zarr")
    plain = root / "plain.zarr"
    zarr.create_array(plain, data=data, chunks=(4, 32, 32))
    ome = root / "ome.zarr"
    group = zarr.open_group(ome, mode="w")
    two = np.stack([data, 65535 - data], 1)[:, :, None]  # two channels, one z
    ome_zarr_writer.write_image(
        two, group, axes="tczyx", scale_factors=[2], scale={"t": 2.0, "c": 1.0, "z": 1.0, "y": 0.5, "x": 0.5}
    )
    group.attrs["ome"] = {**dict(group.attrs["ome"]), "omero": {"channels": [{"label": "a"}, {"label": "b"}]}}
    return plain, ome


def _memory(data):
    return torch.from_numpy(data.astype(np.float32))[:, None]


@pytest.mark.parametrize("reference", ["first", "previous", "mean", "image"])
def test_zarr_on_the_cluster_equals_in_memory(client, data, stores, reference):
    plain, _ = stores
    ref = _memory(data)[5, 0] if reference == "image" else reference
    want = register_stack(_memory(data), reference=ref, batch_size=4, part_size=PART, client=False)
    got = register_stack(io.open_stack(plain), reference=ref, batch_size=4, part_size=PART, client=client)
    assert got.frame.tolist() == list(range(N))
    assert _corners(got.matrix, want.matrix) <= 1e-6
    assert torch.equal(got.matrix, want.matrix) and torch.equal(got.score, want.score)
    assert torch.equal(got.anchored, want.anchored)


def test_ome_zarr_in_and_out(client, data, stores, tmp_path):
    _, ome = stores
    stack = io.open_stack(ome, channel=1)
    assert len(stack) == N and stack.frame_shape == (1, SIZE, SIZE) and stack.dtype == np.uint16
    half = io.open_stack(ome, level=1)
    assert half.frame_shape == (2, SIZE // 2, SIZE // 2)
    memory = torch.from_numpy((65535 - data).astype(np.float32))[:, None]
    want = register_stack(memory, batch_size=4, part_size=PART, client=False)
    out = io.ZarrWriter(tmp_path / "out.zarr", (N, *stack.frame_shape), stack.dtype, stack.metadata)
    # the active client (the fixture's) registers a Zarr stack by default
    got = register_stack(stack, batch_size=4, part_size=PART, write=out, progress=True)
    out.record(got, "first")
    assert torch.equal(got.matrix, want.matrix)
    group = zarr.open_group(tmp_path / "out.zarr", mode="r")
    aligned = group["0"]
    assert aligned.shape == (N, 1, SIZE, SIZE) and aligned.dtype == np.uint16
    expected = torch.cat(list(want.aligned(memory, batch_size=8))).numpy()
    assert np.abs(aligned[:].astype(np.float64) - np.clip(np.rint(expected), 0, 65535)).max() <= 1
    table = group["transforms"][:]
    assert np.allclose(table[:, 5:11].reshape(N, 2, 3), got.matrix.numpy(), atol=0)
    assert np.array_equal(table[:, 11], got.error_px.numpy())
    assert group.attrs["rotstn"]["transforms"]["columns"][-1] == "error_px"
    assert group.attrs["rotstn"]["reference"] == "first"
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = next(iter(Reader(parse_url(str(tmp_path / "out.zarr")))()))
    assert node.data[0].shape == (N, 1, SIZE, SIZE) and node.data[0].dtype == np.uint16
    assert [a["name"] for a in node.metadata["axes"]] == ["t", "c", "y", "x"]
    scale = node.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale == [2.0, 1.0, 0.5, 0.5]
    assert group.attrs["ome"]["omero"]["channels"] == [{"label": "b"}]


def test_dask_array_input(client, data):
    darr = da.from_array(data, chunks=(5, SIZE, SIZE))
    want = register_stack(_memory(data), reference="previous", batch_size=4, part_size=PART, client=False)
    got = register_stack(darr, reference="previous", batch_size=4, part_size=PART)  # the active client
    assert torch.equal(got.matrix, want.matrix) and torch.equal(got.score, want.score)
    local = register_stack(darr, reference="previous", batch_size=4, part_size=PART, client=False)
    assert torch.equal(local.matrix, want.matrix)
    with pytest.raises(TypeError, match="region writer"):
        register_stack(darr, batch_size=4, write=lambda batch: None)


class DiesOnce(io.ZarrStack):
    """A Zarr stack whose reader kills its worker process the first time it reads frame 13."""

    def read(self, start, stop):
        marker = Path(self.path).with_suffix(".died")
        if start <= 13 < stop and not marker.exists():
            marker.touch()
            os._exit(1)  # the worker dies mid-part (frames 8:12 done and written, 12:16 not)
        return super().read(start, stop)


def test_killed_worker_leaves_the_result_identical(client, data, stores, tmp_path):
    plain, _ = stores
    want = register_stack(_memory(data), batch_size=4, part_size=PART, client=False)
    clean = tmp_path / "clean.zarr"
    out = io.ZarrWriter(clean, (N, 1, SIZE, SIZE), np.uint16)
    register_stack(io.open_stack(plain), batch_size=4, part_size=PART, write=out, client=client)
    stack = DiesOnce(plain)
    stack.path = str(tmp_path / "copy.zarr")  # the marker goes next to this test's own copy
    import shutil

    shutil.copytree(plain, stack.path)
    out = io.ZarrWriter(tmp_path / "killed.zarr", (N, 1, SIZE, SIZE), np.uint16)
    got = register_stack(stack, batch_size=4, part_size=PART, write=out, client=client)
    assert (tmp_path / "copy.died").exists()  # a worker did die
    assert got.frame.tolist() == list(range(N))  # no frame lost or doubled
    assert torch.equal(got.matrix, want.matrix) and torch.equal(got.score, want.score)
    a = zarr.open_group(clean, mode="r")["0"][:]
    b = zarr.open_group(tmp_path / "killed.zarr", mode="r")["0"][:]
    assert np.array_equal(a, b)
    client.wait_for_workers(2, timeout=60)


def test_missing_or_corrupt_chunk_names_the_frame(client, data, tmp_path):
    path = tmp_path / "s.zarr"
    zarr.create_array(path, data=data, chunks=(1, SIZE, SIZE))
    (path / "c" / "9" / "0" / "0").unlink()
    with pytest.raises(ValueError, match=r"frame 9: chunk c/9/0/0 of .*s\.zarr.* is missing"):
        register_stack(io.open_stack(path), batch_size=4, client=False)
    with pytest.raises(ValueError, match=r"frame 9: chunk c/9/0/0"):
        register_stack(io.open_stack(path), batch_size=4, part_size=PART, client=client)
    filled = io.open_stack(path, missing_chunks="fill")
    assert float(filled.read(9, 10).abs().max()) == 0.0
    (path / "c" / "13" / "0" / "0").write_bytes(b"not a chunk")
    with pytest.raises(ValueError, match=r"frame 13: cannot read its chunk"):
        io.open_stack(path, missing_chunks="fill").read(12, 16)


def test_ome_zarr_axis_choice_is_explicit(tmp_path):
    group = zarr.open_group(tmp_path / "tz.zarr", mode="w")
    ome_zarr_writer.write_image(
        np.ones((3, 1, 4, 16, 16), np.uint8), group, axes="tczyx", scale_factors=[], storage_options={}
    )
    with pytest.raises(ValueError, match=r"has t \(size 3\) and z \(size 4\): choose the frame axis"):
        io.open_stack(tmp_path / "tz.zarr")
    z = io.open_stack(tmp_path / "tz.zarr", axis="z", index={"t": 2})
    assert len(z) == 4 and z.read(0, 2).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"level must be an int in 0\.\.0"):
        io.open_stack(tmp_path / "tz.zarr", axis="t", index={"z": 0}, level=3)


def test_cli_on_a_scheduler(client, data, stores, tmp_path, capsys):
    _, ome = stores
    csv = tmp_path / "t.csv"
    args = ["register-stack", str(ome), "--out", str(tmp_path / "o.zarr"), "--transforms", str(csv)]
    args += ["--read-channel", "0", "--batch-size", "4", "--part-size", str(PART), "-q"]
    assert main([*args, "--scheduler", client.scheduler.address]) == 0
    want = register_stack(_memory(data), batch_size=4, part_size=PART, client=False)
    assert torch.equal(io.read_transforms(csv).matrix, want.matrix)
    assert zarr.open_group(tmp_path / "o.zarr", mode="r")["0"].shape == (N, 1, SIZE, SIZE)
    assert main([*args[:3], str(tmp_path / "o.tif"), "--workers", "2", "-q"]) == 1
    assert "to Zarr (--out OUT.zarr)" in capsys.readouterr().err


def test_pairs_on_the_cluster(client, tmp_path):
    from PIL import Image

    from rotstn.data import rigid_pairs

    pairs = rigid_pairs(10, (48, 56), moving_size=(52, 52), seed=4)
    fixed = np.clip(np.rint(pairs.fixed[:, 0].numpy() * 255), 0, 255).astype(np.uint8)
    moving = np.clip(np.rint(pairs.moving[:, 0].numpy() * 255), 0, 255).astype(np.uint8)
    f32 = [torch.from_numpy(x.astype(np.float32))[:, None] for x in (fixed, moving)]
    # one register() call per batch: the independent reference
    want = torch.cat([register(f32[0][i : i + 4], f32[1][i : i + 4]).matrix for i in range(0, 10, 4)])
    d = [da.from_array(x, chunks=(3, *x.shape[1:])) for x in (fixed, moving)]
    got = register_pairs(*d, batch_size=4, part_size=4)  # the active client
    assert got.frame.tolist() == list(range(10)) and got.size == (48, 56)
    assert torch.equal(got.matrix, want.double())
    rows = ["fixed,moving"]
    for i in range(10):
        Image.fromarray(fixed[i]).save(tmp_path / f"f{i}.png")
        Image.fromarray(moving[i]).save(tmp_path / f"m{i}.png")
        rows.append(f"f{i}.png,m{i}.png")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = io.ZarrWriter(tmp_path / "aligned.zarr", (10, 1, 48, 56), np.uint8)
    table = register_pairs(*io.open_pairs(tmp_path / "pairs.csv"), batch_size=4, client=client, write=out)
    assert torch.equal(table.matrix, got.matrix) and torch.equal(table.score, got.score)
    assert zarr.open_group(tmp_path / "aligned.zarr", mode="r")["0"][:].any()


def test_import_rotstn_needs_no_dask():
    code = "import sys, rotstn, rotstn.io; print(sorted({'dask', 'distributed', 'zarr'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"
