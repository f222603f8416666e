"""benchmarks/registration.py: geometry helpers, each peer's conversion to rotstn's matrix, a --quick run."""

import importlib.util
import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rotstn
from rotstn.data import rigid_pairs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "registration.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("registration_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules; the script imports its neighbours (benchmarks/).
    sys.modules[spec.name] = module
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    yield module
    del sys.modules[spec.name]


def test_matrix_and_displacement_helpers(bench):
    pairs = rigid_pairs(3, (40, 56), moving_size=(48, 44), seed=1)
    for i in range(3):
        t = pairs.translation[i].tolist()
        matrix = bench.matrix_from(float(pairs.angle[i]), t, (40, 56), (48, 44))
        np.testing.assert_allclose(matrix, pairs.matrix[i].numpy(), atol=1e-12)
        assert bench.max_displacement(matrix, matrix, (40, 56), (48, 44)) == 0
        shifted = matrix.copy()
        shifted[:, 2] += [0.3, 0.4]
        assert bench.max_displacement(shifted, matrix, (40, 56), (48, 44)) == pytest.approx(0.5)
        turned = bench.matrix_from(float(pairs.angle[i]) + 0.01, t, (40, 56), (48, 44))
        assert bench.angle_error_deg(turned, matrix) == pytest.approx(math.degrees(0.01))
    assert bench.max_displacement(np.full((2, 3), np.nan), matrix, (40, 56), (48, 44)) == math.inf
    # The scipy warp with the true matrix reproduces fixed over the overlap.
    fixed, moving = pairs.fixed[0, 0].double().numpy(), pairs.moving[0, 0].double().numpy()
    warped = bench.warp(moving, pairs.matrix[0].numpy(), fixed.shape, order=1)
    ok = np.isfinite(warped)
    assert ok.mean() > 0.3 and np.abs(warped - fixed)[ok].mean() < 0.02


def test_auroc_and_threshold(bench):
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2])
    ok = np.array([True, True, True, False, False])
    assert bench.auroc(scores, ok) == 1.0
    assert bench.suggested_threshold(scores, ok)[0] == pytest.approx(0.5)
    assert bench.auroc(scores, ~ok) == 0.0
    assert math.isnan(bench.auroc(scores, np.ones(5, dtype=bool)))


@pytest.mark.parametrize("peer", ["fourier-mellin", "imreg_dft", "simpleitk", "pystackreg"])
def test_peer_conversion_matches_its_own_resampling(bench, peer):
    # The peer's own resampling of moving by its estimate equals scipy's with the converted matrix.
    pytest.importorskip(bench.PEERS[peer][0])
    diff, wrong = bench.conversion_check([peer], seed=0)[peer]
    assert diff < 0.05 * wrong


def test_quick_run(bench):
    if "model" not in inspect.signature(rotstn.register).parameters:
        pytest.skip("rotstn.register has no model= argument yet (issue 11)")
    # Peers that cannot be imported here (CI installs only the dev extra) are left out.
    versions = bench.peer_versions()
    methods = ["rotstn"] + [name for name in bench.PEERS if not versions[name].startswith("unavailable")]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--pairs", "2", "--methods", *methods],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert (
        "## Rigid model" in out and "## Score trust" in out and "AUROC" in out and "## Rotation model" in out
    )
    rows = [line for line in out.splitlines() if line.startswith("| clean 128² |")]
    assert len(rows) == len(methods)


def test_warp_benchmark_subset_names_the_machine_first():
    # benchmarks/warp.py: CPU model and kernel variant first, then one row per cell and pass asked for.
    script = ROOT / "benchmarks" / "warp.py"
    args = ["--batches", "2", "--sizes", "9x13", "--channels", "2", "--dtypes", "float64"]
    args += ["--passes", "fwd", "fwd+bwd", "--budget", "0", "--methods", "plain", "rotstn"]
    done = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("CPU: ") and "kernel variant" in lines[0] and lines[1].startswith("caches (")
    rows = [line for line in lines if line.startswith("| 2 | 2 | 9×13 |")]
    assert [row.split(" | ")[3] for row in rows] == ["fwd", "fwd+bwd"]
    assert "### cpu, float64" in done.stdout and "float32" not in done.stdout.split("###", 1)[1]


def test_stcnn_tables_read_back_the_per_seed_lines(tmp_path, capsys):
    # benchmarks/stcnn.py --from-log: the tables of runs made one seed per process.
    spec = importlib.util.spec_from_file_location("stcnn_benchmark", ROOT / "benchmarks" / "stcnn.py")
    stcnn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stcnn)
    runs = {
        ("cnn", 0): {12: {"error": 8.0}, 25: {"error": 6.0}},
        ("cnn", 1): {12: {"error": 10.0}, 25: {"error": 5.0}},
        ("stcnn", 0): {
            12: {"error": 4.0, "angle": 9.5, "raw": 100.0},
            25: {"error": 3.0, "angle": 8.0, "raw": 1.0},
        },
        ("stcnn", 1): {
            12: {"error": 6.0, "angle": 12.5, "raw": 2.0},
            25: {"error": 2.0, "angle": 7.0, "raw": 3.0},
        },
    }
    log = tmp_path / "run.log"
    log.write_text("noise\n" + "\n".join(stcnn.per_seed_line(90, s, k, r) for (k, s), r in runs.items()))
    found = stcnn.read_logs([str(log)])
    assert found[90]["stcnn"][1][12] == runs[("stcnn", 1)][12]
    stcnn.table(90, found[90])
    out = capsys.readouterr().out
    # median 5.00 / 9.00 = 0.56×, worst 6.00 / 10.00 = 0.60×; angle median of 9.5 and 12.5
    assert "| 12 | ST-CNN | 4.00, 6.00 | 5.00 | 6.00 | 0.56× | 0.60× | 9.5, 12.5 | 11.0 |" in out


def test_multimodal_pairs_keep_the_truth_and_a_quick_run_prints_the_table():
    """benchmarks/multimodal.py: the stain pairs' geometry (checked on one stain by NCC), a quick run."""
    pytest.importorskip("SimpleITK")
    from test_rigid import max_displacement

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import multimodal
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    g = multimodal.Group("ihc", "immunohistochemistry", 0.0, (96, 128), 5, 3)
    pairs = multimodal.ihc_pairs(g, same=True)
    result = rotstn.register(pairs.fixed, pairs.moving)
    d = max_displacement(result.matrix, pairs.matrix, g.size)
    assert float(d.max()) < 0.1, d
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "multimodal.py"), "--seed", "3", "--pairs", "1",
         "--pictures", "1", "--noise", "0", "--sitk-every", "4", "--threads", "1"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "CPU:" in done.stdout.splitlines()[0]
    assert "| inverted σ 0 | 1 |" in done.stdout and "| ihc σ 0 |" in done.stdout
