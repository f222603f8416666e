"""`python -m rotstn register` round trips on image files in a temporary directory."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from rotstn.cli import main  # noqa: E402


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "rotstn", *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT
    )


def scipy_pair(rgb: bool, angle_deg: float):
    from scipy import ndimage
    from skimage import data

    picture = data.astronaut()[40:300, 120:380] if rgb else data.camera()[100:360, 150:410]
    axes = (1, 0)
    turned = ndimage.rotate(picture.astype(np.float64), angle_deg, axes=axes, reshape=False, order=3)
    window = (slice(80, 180), slice(65, 195))  # a 100×130 window: the rotated content has no padding
    fixed = np.clip(np.rint(turned[window]), 0, 255).astype(np.uint8)
    return fixed, np.ascontiguousarray(picture[window])


@pytest.mark.parametrize(("rgb", "angle"), [(False, -121.0), (True, 47.5)])
def test_round_trip(tmp_path, rgb, angle):
    fixed, moving = scipy_pair(rgb, angle)
    Image.fromarray(fixed).save(tmp_path / "fixed.png")
    Image.fromarray(moving).save(tmp_path / "moving.png")
    out = tmp_path / "aligned.png"
    result = run_cli("register", tmp_path / "fixed.png", tmp_path / "moving.png", "-o", out)
    assert result.returncode == 0, result.stderr
    found = float(re.search(r"angle: (-?[\d.]+) deg", result.stdout).group(1))
    score = float(re.search(r"score: (-?[\d.]+)", result.stdout).group(1))
    assert abs((found - angle + 180) % 360 - 180) < 0.05
    assert score > 0.98
    aligned = np.asarray(Image.open(out))
    assert aligned.shape == moving.shape and aligned.dtype == np.uint8
    # The written image matches fixed on the central disc.
    yy, xx = np.mgrid[:100, :130]
    disc = np.hypot(yy - 49.5, xx - 64.5) < 48
    diff = aligned.astype(float)[disc] - fixed.astype(float)[disc]
    assert np.abs(diff).mean() < 3.0


def test_colour_fixed_grey_moving_and_no_output(tmp_path, capsys):
    fixed, moving = scipy_pair(True, 10.0)
    Image.fromarray(fixed).save(tmp_path / "fixed.png")
    Image.fromarray(moving).convert("L").save(tmp_path / "moving.jpg", quality=95)
    assert main(["register", str(tmp_path / "fixed.png"), str(tmp_path / "moving.jpg")]) == 0
    out = capsys.readouterr().out
    found = float(re.search(r"angle: (-?[\d.]+) deg", out).group(1))
    assert abs(found - 10.0) < 0.1
    assert "aligned:" not in out


def test_errors(tmp_path, capsys):
    Image.fromarray(np.zeros((40, 50), np.uint8) + 7).save(tmp_path / "flat.png")
    Image.fromarray((np.arange(40 * 60) % 251).astype(np.uint8).reshape(40, 60)).save(tmp_path / "wide.png")
    Image.fromarray((np.arange(40 * 50) % 13).astype(np.uint8).reshape(40, 50)).save(tmp_path / "b.png")
    for files, message in [
        (("nothere.png", "b.png"), "No such file"),
        (
            ("b.png", "b.png", "--fixed-mask", "wide.png"),
            "--fixed-mask .*wide.png is 60×40 .* but its image is 50×40",
        ),
        (("flat.png", "b.png"), "fixed is constant"),
    ]:
        args = [str(tmp_path / f) if f.endswith(".png") else f for f in files]
        assert main(["register", *args]) == 1
        assert re.search("rotstn register: error: .*" + message, capsys.readouterr().err)
    with pytest.raises(SystemExit) as usage:
        main(["register", str(tmp_path / "b.png")])
    assert usage.value.code == 2 and "MOVING" in capsys.readouterr().err


def test_16_bit_round_trip(tmp_path, capsys):
    fixed, moving = scipy_pair(False, -30.0)
    Image.fromarray(fixed.astype(np.uint16) * 257).save(tmp_path / "f.png")
    Image.fromarray(moving.astype(np.uint16) * 257).save(tmp_path / "m.png")
    assert (
        main(["register", str(tmp_path / "f.png"), str(tmp_path / "m.png"), "-o", str(tmp_path / "a.png")])
        == 0
    )
    found = float(re.search(r"angle: (-?[\d.]+) deg", capsys.readouterr().out).group(1))
    assert abs(found + 30.0) < 0.01
    aligned = np.asarray(Image.open(tmp_path / "a.png"))
    assert aligned.shape == moving.shape and aligned.max() > 255


def test_rotation_and_translation_with_a_mask(tmp_path, capsys):
    from rotstn.data import rigid_pairs

    pairs = rigid_pairs(1, (120, 150), moving_size=(130, 130), seed=2)
    fixed = np.clip(pairs.fixed[0, 0].numpy() * 255, 0, 255).round().astype(np.uint8)
    moving = np.clip(pairs.moving[0, 0].numpy() * 255, 0, 255).round().astype(np.uint8)
    moving[5:25, 5:70] = 255  # a label that fixed does not have
    mask = np.full(moving.shape, 255, np.uint8)
    mask[3:27, 3:72] = 0
    for name, array in (("f.png", fixed), ("m.png", moving), ("mask.png", mask)):
        Image.fromarray(array).save(tmp_path / name)
    files = [str(tmp_path / n) for n in ("f.png", "m.png")]
    assert (
        main(["register", *files, "--moving-mask", str(tmp_path / "mask.png"), "-o", str(tmp_path / "a.png")])
        == 0
    )
    out = capsys.readouterr().out
    found = float(re.search(r"angle: (-?[\d.]+) deg", out).group(1))
    tx, ty = (float(v) for v in re.search(r"translation: (-?[\d.]+) (-?[\d.]+) px", out).groups())
    assert abs((found - np.degrees(pairs.angle[0].item()) + 180) % 360 - 180) < 0.05
    assert abs(tx - pairs.translation[0, 0].item()) < 0.1 and abs(ty - pairs.translation[0, 1].item()) < 0.1
    matrix = np.array([float(v) for v in re.search(r"matrix: (.*)", out).group(1).split()]).reshape(2, 3)
    np.testing.assert_allclose(matrix, pairs.matrix[0].numpy(), atol=0.1)
    assert np.asarray(Image.open(tmp_path / "a.png")).shape == fixed.shape


def test_strict_exit_status_on_an_unrelated_pair(tmp_path, capsys):
    from rotstn.data import rigid_pairs

    pairs = rigid_pairs(1, (96, 96), unrelated=True, seed=3)
    for name, t in (("f.png", pairs.fixed), ("m.png", pairs.moving)):
        Image.fromarray(np.clip(t[0, 0].numpy() * 255, 0, 255).round().astype(np.uint8)).save(tmp_path / name)
    files = [str(tmp_path / n) for n in ("f.png", "m.png")]
    assert main(["register", *files]) == 0
    assert "do not trust this result" in capsys.readouterr().out
    assert main(["register", *files, "--strict"]) == 3


def test_metric_mi_registers_a_negative(tmp_path, capsys):
    fixed, moving = scipy_pair(False, 63.0)
    Image.fromarray(fixed).save(tmp_path / "f.png")
    Image.fromarray(255 - moving).save(tmp_path / "m.png")  # the negative: NCC has no peak at the truth
    files = [str(tmp_path / n) for n in ("f.png", "m.png")]
    assert main(["register", *files, "--metric", "mi"]) == 0
    out = capsys.readouterr().out
    angle = float(re.search(r"angle: (\S+) deg", out).group(1))
    assert abs(angle - 63.0) < 0.2, out
    assert "do not trust" not in out
