"""register_stack, rotstn.io and the stack commands, on stacks made by scipy with known transforms."""

import math

import numpy as np
import pytest
import torch

from rotstn import register_stack
from rotstn.cli import main
from rotstn.data import bundled_image

tifffile = pytest.importorskip("tifffile")
ndimage = pytest.importorskip("scipy.ndimage")
from rotstn import io  # noqa: E402

SIZE = 64
SOURCE = 160
# full-circle turns between frames, a sudden one included
ANGLES = np.radians([0.0, 3.0, -4.0, 170.0, 175.0, -120.0, -118.0, 10.0])
SHIFTS = np.array(
    [[0, 0], [2.5, -1.0], [-3.0, 2.0], [4.0, 4.0], [1.0, -5.0], [-2.0, 0.5], [0.0, 3.0], [5, -2]]
)


def _matrix(angle: float, t: np.ndarray, size: int, source: int) -> np.ndarray:
    """3×3: output pixel (x, y, 1) -> source pixel, turned by angle about the centres, shifted by t."""
    c, s = math.cos(angle), math.sin(angle)
    a = np.array([[c, -s], [s, c]])
    c_out, c_in = np.full(2, (size - 1) / 2), np.full(2, (source - 1) / 2)
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = a, c_in - a @ (c_out + t)
    return m


def _scipy_frames(angles=ANGLES, shifts=SHIFTS, noise=0.0, seed=0):
    """Frames cut from a picture by scipy (independent of rotstn) and the true (N, 3, 3) maps from
    frame 0 pixels to frame i pixels."""
    picture = bundled_image("camera")[150 : 150 + SOURCE, 170 : 170 + SOURCE]
    rng = np.random.default_rng(seed)
    frames, to_picture = [], []
    for a, t in zip(angles, shifts, strict=True):
        m = _matrix(a, t, SIZE, SOURCE)
        # scipy works in (row, col): swap x and y
        frame = ndimage.affine_transform(
            picture, m[:2, :2][::-1, ::-1], offset=m[:2, 2][::-1], output_shape=(SIZE, SIZE), order=3
        )
        frames.append(frame + noise * rng.standard_normal(frame.shape))
        to_picture.append(m)
    truth = np.stack([np.linalg.inv(m) @ to_picture[0] for m in to_picture])
    return torch.tensor(np.stack(frames), dtype=torch.float32)[:, None], truth


def _displacement(matrix: torch.Tensor, truth: np.ndarray) -> np.ndarray:
    """Largest distance (pixels) between where the two maps send the frame's corners, per frame."""
    corners = np.array([[0, 0, 1], [SIZE - 1, 0, 1], [0, SIZE - 1, 1], [SIZE - 1, SIZE - 1, 1]], float).T
    got = matrix.numpy() @ corners
    want = truth[:, :2] @ corners
    return np.linalg.norm(got - want, axis=1).max(1)


@pytest.fixture(scope="module")
def stack():
    return _scipy_frames()


@pytest.mark.parametrize("reference", ["first", "previous"])
def test_matches_scipy_truth(stack, reference):
    frames, truth = stack
    result = register_stack(frames, reference=reference, batch_size=3)
    assert result.matrix.shape == (len(frames), 2, 3)
    assert result.frame.tolist() == list(range(len(frames)))
    assert _displacement(result.matrix, truth).max() < 0.2
    assert bool((result.score > 0.9).all())
    # angle and translation are those of the matrix (rigid_matrix's inverse)
    assert torch.allclose(torch.sin(result.angle), result.matrix[:, 1, 0], atol=1e-9)


def test_previous_composes_pairwise_maps(stack):
    frames, truth = stack
    # composing true pairwise maps H_k = M_k · H_{k-1} gives the true map from frame 0
    pairwise = [truth[k] @ np.linalg.inv(truth[k - 1]) for k in range(1, len(truth))]
    h = np.eye(3)
    for k, m in enumerate(pairwise, 1):
        h = m @ h
        assert np.allclose(h, truth[k])
    # a frame that does not match its predecessor (replaced by noise) forces a re-anchor on frame 0
    broken = frames.clone()
    broken[4] = torch.rand_like(broken[4])
    good = np.array([i for i in range(len(frames)) if i != 4])
    for polish in (False, True):
        result = register_stack(broken, reference="previous", batch_size=4, polish=polish)
        assert _displacement(result.matrix[good], truth[good]).max() < 0.2
        assert float(result.score[4]) < 0.9
    # the plain chain: frame 5 follows a frame it does not match and is re-anchored; with the
    # polish every frame that shares frame 0's content ends up registered on frame 0 directly
    assert bool(result.anchored[good].all())
    result = register_stack(broken, reference="previous", batch_size=4, polish=False)
    assert bool(result.anchored[5]) and not bool(result.anchored[2])


def test_mean_and_given_reference(stack):
    frames, truth = stack
    mean = register_stack(frames, reference="mean", batch_size=4)
    assert _displacement(mean.matrix, truth).max() < 0.3
    given = register_stack(frames, reference=frames[0, 0], batch_size=8)
    assert _displacement(given.matrix, truth).max() < 0.2


def test_aligned_frames_match_reference(stack):
    frames, _ = stack
    result = register_stack(frames, batch_size=4)
    aligned = torch.cat(list(result.aligned(frames, batch_size=3)))
    assert aligned.shape == frames.shape
    inner = slice(24, 40)  # the part of frame 0 every turned frame covers
    err = (aligned[:, 0, inner, inner] - frames[0, 0, inner, inner]).abs().mean((1, 2))
    assert float(err.max()) < 0.02


def test_parts_merge_to_whole(stack, tmp_path):
    frames, truth = stack
    whole = register_stack(frames, reference="previous", batch_size=4)
    a = register_stack(frames, reference="previous", stop=5, batch_size=4)
    b = register_stack(frames, reference="previous", start=5, batch_size=4)
    assert bool(b.anchored[0])  # a part's first frame is registered on frame 0 directly
    io.write_transforms(tmp_path / "b.csv", b)
    io.write_transforms(tmp_path / "a.csv", a)
    merged = io.merge_transforms([tmp_path / "b.csv", tmp_path / "a.csv"], tmp_path / "all.csv")
    assert merged.frame.tolist() == list(range(len(frames)))
    assert _displacement(merged.matrix, truth).max() < 0.2
    assert torch.allclose(merged.matrix, whole.matrix, atol=0.05)
    with pytest.raises(ValueError, match=r"frame 0 is in both .*a\.csv and .*all\.csv"):
        io.merge_transforms([tmp_path / "a.csv", tmp_path / "all.csv"])


def test_transforms_csv_round_trip(stack, tmp_path):
    frames, _ = stack
    result = register_stack(frames[:4], batch_size=4)
    io.write_transforms(tmp_path / "t.csv", result)
    back = io.read_transforms(tmp_path / "t.csv", size=(SIZE, SIZE))
    assert torch.equal(back.frame, result.frame)
    for name in ("matrix", "angle", "translation", "score", "error_px"):
        assert torch.allclose(getattr(back, name), getattr(result, name), atol=1e-9), name
    header = (tmp_path / "t.csv").read_text().splitlines()[0]
    assert header == "frame,angle_deg,tx,ty,score,m00,m01,m02,m10,m11,m12,error_px"


def test_stack_error_px_is_small_where_frames_are_right_and_an_older_table_reads_as_nan(stack, tmp_path):
    frames, truth = stack
    for reference in ("first", "previous"):
        result = register_stack(frames, reference=reference, batch_size=8)
        d = torch.from_numpy(_displacement(result.matrix, truth))
        trusted = result.score >= 0.9
        assert bool(trusted.any())
        assert bool((d[trusted] <= result.error_px[trusted]).float().mean() >= 0.9), (d, result.error_px)
        assert float(result.error_px[trusted].median()) <= 0.5, result.error_px
    io.write_transforms(tmp_path / "t.csv", result)
    lines = (tmp_path / "t.csv").read_text().splitlines()
    (tmp_path / "old.csv").write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    assert bool(torch.isnan(io.read_transforms(tmp_path / "old.csv").error_px).all())


def test_tiff_round_trip_keeps_dtype_and_pixel_size(tmp_path):
    data = np.random.default_rng(0).integers(0, 65535, (5, 24, 32), dtype=np.uint16)
    path = tmp_path / "in.tif"
    with io.StackWriter(path, np.uint16, {"resolution": (4.0, 4.0), "resolutionunit": 1, "unit": "um"}) as w:
        w.write(torch.from_numpy(data[:3, None].astype(np.float32)))
        w.write(torch.from_numpy(data[3:, None].astype(np.float32)))
    stack = io.open_stack(path)
    assert len(stack) == 5 and stack.frame_shape == (1, 24, 32) and stack.dtype == np.uint16
    assert stack.metadata["unit"] == "um" and tuple(stack.metadata["resolution"]) == (4.0, 4.0)
    assert np.array_equal(stack.read(1, 4)[:, 0].numpy().astype(np.uint16), data[1:4])
    stack.close()
    # compressed, page by page (no memmap)
    tifffile.imwrite(tmp_path / "z.tif", data, compression="zlib")
    z = io.open_stack(tmp_path / "z.tif")
    assert np.array_equal(z.read(2, 5)[:, 0].numpy(), data[2:5])
    z.close()


def test_streaming_equals_in_memory(stack, tmp_path):
    frames, _ = stack
    data = np.clip(np.rint(frames[:, 0].numpy() * 60000), 0, 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", data)
    memory = torch.from_numpy(data.astype(np.float32))[:, None]
    expected = register_stack(memory, reference="previous", batch_size=3)
    src = io.open_stack(tmp_path / "in.tif")
    with io.StackWriter(tmp_path / "out.tif", src.dtype) as out:
        streamed = register_stack(src, reference="previous", batch_size=3, write=out.write)
    src.close()
    assert torch.allclose(streamed.matrix, expected.matrix, atol=1e-6)
    aligned = tifffile.imread(tmp_path / "out.tif")
    want = torch.cat(list(expected.aligned(memory, batch_size=8)))[:, 0].numpy()
    assert aligned.dtype == np.uint16
    assert np.abs(aligned.astype(np.float64) - np.clip(np.rint(want), 0, 65535)).max() <= 1


def test_bad_inputs_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="empty stack"):
        register_stack(torch.zeros(0, 1, 16, 16))
    with pytest.raises(ValueError, match="start:stop"):
        register_stack(torch.zeros(3, 1, 16, 16), start=2, stop=1)
    with pytest.raises(ValueError, match="reference must be one of"):
        register_stack(torch.zeros(3, 1, 16, 16), reference="last")
    bad = tmp_path / "bad.tif"
    bad.write_text("not a tiff")
    with pytest.raises(ValueError, match=r"bad\.tif"):
        io.open_stack(bad)
    with pytest.raises(ValueError, match=r"missing\.tif does not exist"):
        io.open_stack(tmp_path / "missing.tif")
    folder = tmp_path / "frames"
    folder.mkdir()
    with pytest.raises(ValueError, match="empty stack"):
        io.open_stack(folder)
    from PIL import Image

    Image.fromarray(np.zeros((20, 30), np.uint8)).save(folder / "f1.png")
    Image.fromarray(np.zeros((20, 31), np.uint8)).save(folder / "f2.png")
    with pytest.raises(ValueError, match=r"mixed frame sizes: .*f2\.png is 31×20"):
        io.open_stack(folder)
    (folder / "f2.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"cannot read .*f2\.png"):
        io.open_stack(folder)
    assert main(["register-stack", str(bad), "-q"]) == 1
    assert main(["merge-transforms", str(bad), "-o", str(tmp_path / "m.csv")]) == 1


def test_cli_parts_and_folders(stack, tmp_path, capsys):
    frames, truth = stack
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    data = np.clip(np.rint(frames[:, 0].numpy() * 255), 0, 255).astype(np.uint8)
    for i, frame in enumerate(data):
        Image.fromarray(frame).save(folder / f"frame{i}.png")  # frame10 sorts after frame9
    parts = []
    for span in ("0:4", "4:"):
        csv = tmp_path / f"t{span[0]}.csv"
        rc = main(
            [
                "register-stack",
                str(folder),
                "-o",
                str(tmp_path / "out"),
                "--transforms",
                str(csv),
                "--frames",
                span,
                "--batch-size",
                "4",
                "-q",
                "--strict",
            ]
        )
        assert rc == 0
        parts.append(str(csv))
    assert main(["merge-transforms", *parts, "-o", str(tmp_path / "all.csv")]) == 0
    merged = io.read_transforms(tmp_path / "all.csv")
    assert _displacement(merged.matrix, truth).max() < 0.3
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == sorted(f"frame{i}.png" for i in range(len(frames)))
    assert np.asarray(Image.open(tmp_path / "out" / "frame0.png")).dtype == np.uint8
    assert main(["register-stack", str(folder), "--frames", "5:2", "-q"]) == 1
    assert "selects no frames" in capsys.readouterr().err


def _walk(n, turn_at, seed=3):
    """A random walk (σ 2° and 0.7 px a frame) with a sudden turn of 150° at frame ``turn_at``."""
    rng = np.random.default_rng(seed)
    angles = np.cumsum(np.radians(rng.normal(0, 2, n)))
    angles[turn_at:] += math.radians(150)
    shifts = np.clip(np.cumsum(rng.normal(0, 0.7, (n, 2)), 0), -8, 8)
    angles[0], shifts[0] = 0.0, 0.0
    return angles, shifts


@pytest.fixture(scope="module")
def walk():
    return _scipy_frames(*_walk(24, 11), noise=0.02, seed=1)


@pytest.fixture
def searched(monkeypatch):
    """Frames that went through the global search (rotstn.registration._search_from)."""
    from rotstn import registration

    count = []
    original = registration._search_from

    def spy(fixed, moving, **kw):
        count.append(moving.levels[0].image.shape[0])
        return original(fixed, moving, **kw)

    monkeypatch.setattr(registration, "_search_from", spy)
    return count


@pytest.mark.parametrize("reference", ["first", "previous"])
def test_tracking_catches_a_sudden_turn(walk, searched, reference):
    frames, truth = walk
    # the turn (frame 11) lies inside a batch: the frames after it are predicted through it
    result = register_stack(frames, reference=reference, batch_size=8)
    d = _displacement(result.matrix, truth)
    assert d.max() < 0.2, d
    assert bool((result.score > 0.9).all())
    # tracked, not searched: only the turn needs the global search (a pair and a frame with "previous")
    assert 1 <= sum(searched) <= 2


def test_tracked_equals_searched(walk, searched):
    frames, _ = walk
    tracked = register_stack(frames, batch_size=8)
    assert sum(searched) == 1
    full = register_stack(frames, batch_size=8, track=False)
    assert sum(searched) == 1 + len(frames)
    # the same full-resolution refinement from different starts: the same answer
    assert _displacement(tracked.matrix, full.matrix.numpy()).max() < 0.01
    assert torch.allclose(tracked.score, full.score, atol=1e-3)


def _noisy_retina(n=12, size=192, turn_at=9, turn=71.0, seed=1):
    """Frames of the retina picture with σ 0.05 noise and a random gamma, contrast and offset each
    (as ``rotated_pairs(photometric=True)``), a walk with a sudden turn, and the true maps."""
    picture = bundled_image("retina")
    rng = np.random.default_rng(seed)
    angles, shifts = _walk(n, turn_at, seed)
    angles[turn_at:] += math.radians(turn - 150)
    frames, to_picture = [], []
    for a, t in zip(angles, shifts, strict=True):
        c, s = math.cos(a), math.sin(a)
        m = np.eye(3)
        m[:2, :2] = [[c, -s], [s, c]]
        m[:2, 2] = np.array(picture.shape[::-1]) / 2 - 0.5 - m[:2, :2] @ (np.full(2, (size - 1) / 2) + t)
        frame = ndimage.affine_transform(
            picture, m[:2, :2][::-1, ::-1], offset=m[:2, 2][::-1], output_shape=(size, size), order=3
        )
        gamma = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
        frame = rng.uniform(0.6, 1.0) * np.clip(frame, 0, 1) ** gamma + rng.uniform(0, 0.2)
        frames.append(frame + rng.normal(0, 0.05, frame.shape))
        to_picture.append(m)
    truth = np.stack([np.linalg.inv(m) @ to_picture[0] for m in to_picture])
    return torch.tensor(np.stack(frames), dtype=torch.float32), truth


def test_noisy_frames_under_trust_are_tracked_not_searched_again(searched):
    # Noise and a gamma per frame put most right results under TRUST; where the refinement stayed
    # near its prediction and matches the reference significantly it is kept, not searched again:
    # only the sudden turn is searched, and every frame is as close to the truth as a search of
    # every frame (track=False) puts it, to a third of a pixel (about the noise of either here).
    from rotstn.registration import TRUST

    frames, truth = _noisy_retina()
    size = frames.shape[-1]
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]], float).T

    def displacement(result):
        return np.linalg.norm(result.matrix.numpy() @ corners - truth[:, :2] @ corners, axis=1).max(1)

    tracked = register_stack(frames, batch_size=8)
    assert sum(searched) == 1
    assert int((tracked.score < TRUST).sum()) >= len(frames) // 2
    full = register_stack(frames, batch_size=8, track=False)
    assert sum(searched) == 1 + len(frames)
    d, d_full = displacement(tracked), displacement(full)
    assert np.median(d) < 1.5 and bool((d <= d_full + 0.3).all()), (d, d_full)


def test_polish_bounds_the_drift_of_previous():
    frames, truth = _scipy_frames(*_walk(40, 19), noise=0.05, seed=1)
    chain = _displacement(register_stack(frames, reference="previous", polish=False).matrix, truth)
    polished = register_stack(frames, reference="previous")
    d = _displacement(polished.matrix, truth)
    first = _displacement(register_stack(frames, reference="first").matrix, truth)
    # the chain adds up every pair's error; polished on frame 0, every frame is as good as "first"
    assert np.median(d) < 0.7 * np.median(chain) and d.max() < chain.max()
    assert np.allclose(d, first, atol=0.01)
    assert bool(polished.anchored.all())


def test_tracking_options_and_fallback(walk):
    frames, truth = walk
    # more points at full resolution, a smaller batch, one channel of two: the same frames
    two = torch.cat([frames, frames.flip(-1)], 1)
    result = register_stack(two, batch_size=5, channel=0, fine_points=4096, smooth=1.5)
    assert _displacement(result.matrix, truth).max() < 0.2
    # options tracking does not handle go to register() batch by batch
    result = register_stack(frames[:6], batch_size=4, init_window=0.5)
    assert _displacement(result.matrix, truth[:6]).max() < 0.2
    with pytest.raises(ValueError, match="fine_points"):
        register_stack(frames, fine_points=10)
    bad = frames.clone()
    bad[9, 0, 3, 3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        register_stack(bad, batch_size=4)


def test_agrees_with_pystackreg_on_small_turns():
    pystackreg = pytest.importorskip("pystackreg")
    angles = np.radians([0.0, 2.0, -3.0, 4.0, 1.0, -2.0])
    shifts = np.array([[0, 0], [1.5, -1.0], [-2.0, 1.0], [2.0, 2.5], [0.5, -2.0], [-1.0, 0.5]])
    frames, truth = _scipy_frames(angles, shifts)
    for reference in ("first", "previous"):
        theirs = pystackreg.StackReg(pystackreg.StackReg.RIGID_BODY).register_stack(
            frames[:, 0].double().numpy(), reference=reference, axis=0
        )
        ours = register_stack(frames, reference=reference, batch_size=6)
        # pystackreg's tmats use the same convention (reference pixel -> frame pixel, x = column)
        assert _displacement(torch.from_numpy(theirs[:, :2]), truth).max() < 0.3
        assert _displacement(ours.matrix, theirs).max() < 0.3


def test_cli_tiff_keeps_dtype_and_pixel_size(stack, tmp_path):
    frames, truth = stack
    from PIL import Image

    data = np.clip(np.rint(frames[:, 0].numpy() * 4000), 0, 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", data, imagej=True, resolution=(2.0, 2.0), metadata={"unit": "um"})
    Image.fromarray(data[0]).save(tmp_path / "ref.png")  # a given reference image (frame 0)
    rc = main(
        [
            "register-stack",
            str(tmp_path / "in.tif"),
            "-o",
            str(tmp_path / "out.tif"),
            "-q",
            "--reference",
            str(tmp_path / "ref.png"),
            "--transforms",
            str(tmp_path / "t.csv"),
        ]
    )
    assert rc == 0
    with tifffile.TiffFile(tmp_path / "out.tif") as out:
        assert out.series[0].shape == data.shape and out.series[0].dtype == np.uint16
        assert out.pages.first.resolution == (2.0, 2.0) and out.imagej_metadata["unit"] == "um"
    assert _displacement(io.read_transforms(tmp_path / "t.csv").matrix, truth).max() < 0.2


def test_parts_agree_with_one_part_to_float32_rounding(walk):
    frames, truth = walk
    one = register_stack(frames, batch_size=4, part_size=len(frames))
    parts = register_stack(frames, batch_size=4, part_size=6)  # rounded up to whole batches: 8
    # each part's first frame is searched instead of tracked: the same map to float32 precision
    assert _displacement(parts.matrix, one.matrix.numpy()).max() < 1e-3
    assert _displacement(parts.matrix, truth).max() < 0.2
    # the default: 256 frames a part, one part with "previous"
    assert torch.equal(register_stack(frames, batch_size=4).matrix, one.matrix)
    with pytest.raises(ValueError, match="part_size must be an int >= 1 or None, got 0"):
        register_stack(frames, part_size=0)
