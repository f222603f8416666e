"""Registration: rotstn.register against the classical methods, on the same pairs.

    python benchmarks/registration.py [--pairs 24] [--sets ...] [--methods ...] [--quick]

Two tables of accuracy and time, one of score trust, and a conversion check.

**Rigid model** (rotation about an unknown centre = rotation + translation):
pairs from :func:`rotstn.data.rigid_pairs` (crops of scikit-image's bundled
pictures; ``moving`` made by ``scipy.ndimage.affine_transform``, angle uniform
over the circle, shift up to 25 % of the side per axis). Sets: ``128`` (clean
128²), ``96x160`` (clean), ``noisy128`` (σ 0.05 on both images + gamma /
contrast / brightness on one), ``256-shift`` (shifts of 20–25 % of the side),
``512`` and ``2048`` (pictures upscaled to hold the pair; the peers run on
the first ``--large-peer-pairs`` pairs there, they take seconds per pair).
Methods, each through its documented API and converted to rotstn's matrix
(the pixel of moving that shows fixed pixel ``(x, y)`` is ``matrix @ (x, y, 1)``):

* ``rotstn``: ``rotstn.register(fixed, moving)`` on the whole set (chunks of
  ``--chunk`` pairs at 2048²), ``torch.set_num_threads(--threads)`` (default 2);
  the time is the median of ``--rotstn-repeats`` runs of the set (one at 2048²).
* ``fourier-mellin``: scikit-image's recipe per pair (Hann window,
  log-magnitude spectrum, ``warp_polar``, ``phase_cross_correlation`` for the
  angle mod 180°), then ``phase_cross_correlation`` for the shift of both
  candidates (θ and θ + 180°), keeping the one with the higher NCC over the
  overlap.
* ``imreg_dft``: ``imreg_dft.similarity`` with the scale constrained to 1.
* ``simpleitk``: SimpleITK's large-rotation recipe: ``Euler2DTransform``
  placed by ``CenteredTransformInitializer`` (moments), an exhaustive search
  over the angle (every 10°, Mattes mutual information), then multi-resolution
  refinement (regular-step gradient descent, mutual information, shrink
  4-2-1) and a full-resolution polish (correlation). Of the variants tried on
  12 clean 128² pairs this one succeeded most often (58 %; geometric-centre
  initialisation 17 %, a correlation search 33 %, no polish: same successes,
  10× less precise).
* ``pystackreg``: ``StackReg(StackReg.RIGID_BODY).register(fixed, moving)``.

Metrics: a pair succeeds when the largest displacement between the estimated
and the true map over the true overlap (fixed pixels whose true location lies
in moving) is under 1 px; median and p95 of that displacement, median angle
error, milliseconds per pair (wall and process CPU time; rotstn's is its
batch time divided by the pairs).

**Score trust**: rotstn's ``.score`` on the rigid sets' pairs mixed with
``--pairs`` unrelated pairs (moving from another picture) and ``--pairs``
pairs with 1–10 % overlap (128²): AUROC of the score for separating success
(largest displacement < 1 px, never for unrelated pairs) from failure, the
lowest score of a success, the highest of a failure and a suggested threshold.

**Rotation model** (the earlier table, set ``rotation``): pairs from
:func:`rotstn.data.rotated_pairs` (rotation about the image centre),
``rotstn.register(..., model="rotation")`` against Fourier–Mellin (angle
only), an exhaustive NCC search (kornia's ``rotate`` at 0.5°, then 0.01°; on
the first ``--reference-pairs`` pairs, it takes a second a pair) and kornia's
``ImageRegistrator`` (rotation model, from identity, on ``--kornia-pairs``
pairs of each set and as many with θ within ±20°).
rotstn and Fourier–Mellin are timed interleaved, median of ``--repeats``.

**Conversion check** (set ``conversion``): for each peer, on one clean pair
with a smooth moving image (so that interpolation error is small), the mean
difference between the peer's own resampling of moving and
``scipy.ndimage.affine_transform`` with the converted matrix, beside the
difference a 0.5 px error in the conversion would make.

The peers are optional (``pip install rotstn[bench]``); a missing one is
reported and skipped. The machine may be shared: compare ratios.
"""

from __future__ import annotations

import os

# The peer's small matrix products (phase_cross_correlation's upsampled DFT)
# run fastest on one BLAS thread; more threads only wait on each other.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# torch's OpenMP threads run with their default wait policy, as users get them.
# On a CPU shared with other jobs, OMP_WAIT_POLICY=PASSIVE keeps a descheduled
# spinning thread from holding up every small op (measured here: up to 20×
# slower); on an idle machine it makes rotstn slower (each op wakes a sleeping
# thread), so the tables in the docs are measured without it.

import argparse
import importlib
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from _machine import machine_line
from kornia.geometry import ImageRegistrator
from kornia.geometry.transform import rotate as kornia_rotate
from scipy import ndimage
from skimage.filters import window
from skimage.registration import phase_cross_correlation
from skimage.transform import warp_polar

import rotstn
from rotstn.data import rigid_pairs, rotated_pairs

THREADS = 2
# imreg_dft 2.0.0 imports from scipy.ndimage.interpolation, deprecated since SciPy 1.8.
warnings.filterwarnings("ignore", category=DeprecationWarning, module="imreg_dft")

# --------------------------------------------------------------------------
# The matrix convention, written independently of rotstn.
# --------------------------------------------------------------------------


def matrix_from(angle: float, t: tuple[float, float], fixed_shape, moving_shape) -> np.ndarray:
    """``[A | c_m - A (c_f + t)]``: fixed(p) = moving(c_m + A (p - c_f - t)), θ counter-clockwise."""
    a = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    c_f = np.array([(fixed_shape[1] - 1) / 2, (fixed_shape[0] - 1) / 2])
    c_m = np.array([(moving_shape[1] - 1) / 2, (moving_shape[0] - 1) / 2])
    return np.concatenate([a, (c_m - a @ (c_f + np.asarray(t, dtype=np.float64)))[:, None]], 1)


def warp(moving: np.ndarray, matrix: np.ndarray, shape, order: int = 1) -> np.ndarray:
    """Moving resampled on the fixed grid by scipy: out(x, y) = moving(matrix @ (x, y, 1)), NaN outside."""
    # scipy indexes (row, column): swap both the input and the output axes of the (x, y) map.
    return ndimage.affine_transform(
        moving, matrix[::-1, 1::-1], offset=matrix[::-1, 2], output_shape=shape, order=order, cval=np.nan
    )


def overlap_mask(matrix: np.ndarray, fixed_shape, moving_shape) -> np.ndarray:
    """Fixed pixels whose location in moving, under ``matrix``, lies inside moving."""
    yy, xx = np.mgrid[: fixed_shape[0], : fixed_shape[1]].astype(np.float64)
    qx = matrix[0, 0] * xx + matrix[0, 1] * yy + matrix[0, 2]
    qy = matrix[1, 0] * xx + matrix[1, 1] * yy + matrix[1, 2]
    return (qx >= 0) & (qx <= moving_shape[1] - 1) & (qy >= 0) & (qy <= moving_shape[0] - 1)


def max_displacement(estimate: np.ndarray, truth: np.ndarray, fixed_shape, moving_shape) -> float:
    """Largest |estimate(p) - truth(p)| in pixels over the true overlap (inf for a missing estimate)."""
    if not np.isfinite(estimate).all():
        return math.inf
    mask = overlap_mask(truth, fixed_shape, moving_shape)
    if not mask.any():
        return math.inf
    # The displacement is affine in p: its largest norm over the overlap is
    # reached on the overlap's outline, and its rows and columns hold it.
    yy, xx = np.nonzero(mask)
    d = estimate - truth
    dx = d[0, 0] * xx + d[0, 1] * yy + d[0, 2]
    dy = d[1, 0] * xx + d[1, 1] * yy + d[1, 2]
    return float(np.sqrt(dx * dx + dy * dy).max())


def matrix_angle(matrix: np.ndarray) -> float:
    return math.atan2(matrix[1, 0], matrix[0, 0])


def angle_error_deg(estimate: np.ndarray, truth: np.ndarray) -> float:
    if not np.isfinite(estimate).all():
        return math.inf
    d = matrix_angle(estimate) - matrix_angle(truth)
    return abs(math.degrees(math.atan2(math.sin(d), math.cos(d))))


def ncc_overlap(fixed: np.ndarray, moving: np.ndarray, matrix: np.ndarray) -> float:
    turned = warp(moving, matrix, fixed.shape)
    ok = np.isfinite(turned)
    if ok.sum() < 16:
        return -1.0
    a, b = fixed[ok] - fixed[ok].mean(), turned[ok] - turned[ok].mean()
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


# --------------------------------------------------------------------------
# Peers. Each takes one (fixed, moving) float64 pair and returns the matrix in
# rotstn's convention and the peer's own resampling of an image by its estimate.
# --------------------------------------------------------------------------


@dataclass
class PeerResult:
    """One peer's estimate: ``convert()`` gives rotstn's matrix, ``resample(image)`` applies it its way.

    ``convert`` runs outside the timing: for imreg_dft it resamples two ramps.
    """

    convert: Callable[[], np.ndarray]
    resample: Callable[[np.ndarray], np.ndarray]


def probe_matrix(resample: Callable[[np.ndarray], np.ndarray], shape) -> np.ndarray:
    """The affine map a peer's own resampler applies, read off by resampling the coordinate ramps.

    Linear interpolation reproduces a linear ramp exactly, so away from the
    edges the resampled x and y ramps are the moving location of each fixed
    pixel.
    """
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    qx, qy = resample(xx), resample(yy)
    ok = ndimage.binary_erosion(np.isfinite(qx) & np.isfinite(qy), iterations=3)
    design = np.stack([xx[ok], yy[ok], np.ones(int(ok.sum()))], 1)
    coef, *_ = np.linalg.lstsq(design, np.stack([qx[ok], qy[ok]], 1), rcond=None)
    return coef.T


def fm_angle(fixed: np.ndarray, moving: np.ndarray, n_angles: int = 720, upsample: int = 20) -> float:
    """scikit-image's Fourier–Mellin angle estimate in degrees, rotstn's sign, modulo 180°."""
    h, w = fixed.shape
    side = max(h, w)
    hann = window("hann", (h, w))

    def log_spectrum(x: np.ndarray) -> np.ndarray:
        # Zero-padded to a square, so that frequency bins have the same spacing
        # on both axes and a rotation of the image is a rotation of the spectrum.
        padded = np.zeros((side, side))
        top, left = (side - h) // 2, (side - w) // 2
        padded[top : top + h, left : left + w] = (x - x.mean()) * hann
        return np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(padded))))

    radius = side // 2
    # The magnitude spectrum is symmetric: half the circle holds everything;
    # the two innermost radii (DC and the window's leakage) carry no angle.
    polar_f = warp_polar(log_spectrum(fixed), radius=radius, output_shape=(n_angles, radius), order=1)
    polar_m = warp_polar(log_spectrum(moving), radius=radius, output_shape=(n_angles, radius), order=1)
    half = n_angles // 2
    shift, _, _ = phase_cross_correlation(
        polar_f[:half, 2:], polar_m[:half, 2:], upsample_factor=upsample, normalization=None
    )
    # warp_polar's angle runs clockwise as displayed: the opposite of rotstn's sign.
    return -shift[0] * 360.0 / n_angles


def disc_mask(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) <= (min(h, w) - 1) / 2 - 1


def fourier_mellin(fixed: np.ndarray, moving: np.ndarray) -> float:
    """The rotation-model Fourier–Mellin angle in radians: the 180° candidate chosen by NCC on the disc."""
    angle = fm_angle(fixed, moving)
    disc = disc_mask(*fixed.shape)
    scores = []
    for candidate in (angle, angle + 180.0):
        turned = ndimage.rotate(moving, candidate, reshape=False, order=1)
        scores.append(np.corrcoef(turned[disc], fixed[disc])[0, 1])
    return math.radians(angle + 180.0 * int(np.argmax(scores)))


def peer_fourier_mellin(fixed: np.ndarray, moving: np.ndarray) -> PeerResult:
    angle = fm_angle(fixed, moving)
    best = None
    for candidate in (angle, angle + 180.0):
        turned = ndimage.rotate(moving, candidate, reshape=False, order=1)
        # The shift that registers the turned moving image with fixed:
        # ndimage.shift(turned, shift) ≈ fixed, i.e. fixed(p) = turned(p - shift).
        shift, _, _ = phase_cross_correlation(fixed, turned, upsample_factor=20)
        matrix = matrix_from(math.radians(candidate), (shift[1], shift[0]), fixed.shape, moving.shape)
        score = ncc_overlap(fixed, moving, matrix)
        if best is None or score > best[0]:
            best = (score, candidate, shift, matrix)
    _, candidate, shift, matrix = best

    def resample(image: np.ndarray) -> np.ndarray:
        turned = ndimage.shift(ndimage.rotate(image, candidate, reshape=False, order=3), shift, order=3)
        # NaN where the turn or the shift brought in no content: what the turn
        # cuts off at the frame must not come back as zeros with the shift.
        inside = ndimage.rotate(np.ones_like(image), candidate, reshape=False, order=1)
        inside = ndimage.shift(inside, shift, order=1)
        return np.where(inside > 0.999, turned, math.nan)

    return PeerResult(lambda: matrix, resample)


def peer_imreg_dft(fixed: np.ndarray, moving: np.ndarray) -> PeerResult:
    import imreg_dft

    # fixed is the template, moving the subject; a constraint of spread 0 fixes the scale.
    result = imreg_dft.similarity(fixed, moving, constraints={"scale": [1.0, 0]})
    # Its transform_img turns the subject by `angle` degrees (rotstn's sign) and
    # shifts it by tvec (y, x), but on a canvas 1.2× larger, turned with
    # scipy's reshape=True and cropped back: the centre it turns about moves
    # by up to half a pixel with the angle and the image's parity. The matrix
    # is therefore read off its own transform (probe_matrix), not rebuilt from
    # (angle, tvec) about the image centre, which is up to 0.7 px off.

    def convert() -> np.ndarray:
        return probe_matrix(
            lambda ramp: imreg_dft.transform_img_dict(ramp, result, bgval=math.nan, order=1), fixed.shape
        )

    return PeerResult(convert, lambda image: imreg_dft.transform_img_dict(image, result, order=3))


def peer_pystackreg(fixed: np.ndarray, moving: np.ndarray) -> PeerResult:
    from pystackreg import StackReg

    reg = StackReg(StackReg.RIGID_BODY)
    tmat = reg.register(fixed, moving)
    # tmat maps reference (x = column, y = row) to the moving image's pixels:
    # rotstn's matrix, as a 3×3 homogeneous one.
    matrix = np.array(tmat[:2], dtype=np.float64)
    return PeerResult(lambda: matrix, lambda image: reg.transform(image, tmat))


def peer_simpleitk(fixed: np.ndarray, moving: np.ndarray, multimodal: bool = False) -> PeerResult:
    """SimpleITK's large-rotation recipe (module docstring).

    ``multimodal``: for intensities related by an unknown function (benchmarks/multimodal.py), the
    transform starts at the images' geometric centres (their intensity moments do not correspond)
    and every stage compares by Mattes mutual information (no correlation polish).
    """
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(THREADS)
    # Spacing 1 and origin 0: physical (x, y) = (column, row).
    f_img = sitk.GetImageFromArray(fixed.astype(np.float32))
    m_img = sitk.GetImageFromArray(moving.astype(np.float32))
    start = sitk.CenteredTransformInitializerFilter
    transform = sitk.CenteredTransformInitializer(
        f_img, m_img, sitk.Euler2DTransform(), start.GEOMETRY if multimodal else start.MOMENTS
    )
    side = max(fixed.shape)
    # The search: every 10° over the circle, translation held at the initializer's.
    steps = 36
    shrink = max(1, side // 128)
    search = sitk.ImageRegistrationMethod()
    search.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    search.SetInterpolator(sitk.sitkLinear)
    search.SetOptimizerAsExhaustive(numberOfSteps=[steps // 2, 0, 0], stepLength=2 * math.pi / steps)
    search.SetOptimizerScales([1.0, 1.0, 1.0])
    search.SetShrinkFactorsPerLevel([shrink])
    search.SetSmoothingSigmasPerLevel([shrink / 2])
    search.SetInitialTransform(transform, inPlace=True)
    search.Execute(f_img, m_img)
    # The refinement: coarse to fine over angle and translation (mutual
    # information), then a polish at full resolution (correlation: the pair is
    # one modality, and it is the sharper optimum). Large images are sampled
    # at random, 2^16 points a level, as the documentation suggests.
    sampling = min(1.0, 2**16 / fixed.size)
    levels = [4 * shrink, 2 * shrink, shrink] if shrink > 1 else [4, 2, 1]
    stages = [("mattes", levels)] if multimodal else [("mattes", levels), ("correlation", [1])]
    for metric, shrinks in stages:
        refine = sitk.ImageRegistrationMethod()
        if metric == "mattes":
            refine.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        else:
            refine.SetMetricAsCorrelation()
        if sampling < 1.0:
            refine.SetMetricSamplingStrategy(refine.RANDOM)
            refine.SetMetricSamplingPercentage(sampling, 1)
        refine.SetInterpolator(sitk.sitkLinear)
        refine.SetOptimizerAsRegularStepGradientDescent(
            learningRate=2.0, minStep=1e-4, numberOfIterations=200, gradientMagnitudeTolerance=1e-8
        )
        refine.SetOptimizerScalesFromPhysicalShift()
        refine.SetShrinkFactorsPerLevel(shrinks)
        refine.SetSmoothingSigmasPerLevel([sh / 2 if sh > 1 else 0 for sh in shrinks])
        refine.SetInitialTransform(transform, inPlace=True)
        refine.Execute(f_img, m_img)
    # The transform maps fixed physical points to moving ones: p -> R (p - C) + C + T.
    rot = np.array(transform.GetMatrix()).reshape(2, 2)
    centre, shift = np.array(transform.GetCenter()), np.array(transform.GetTranslation())
    matrix = np.concatenate([rot, (centre + shift - rot @ centre)[:, None]], 1)

    def resample(image: np.ndarray) -> np.ndarray:
        out = sitk.Resample(sitk.GetImageFromArray(image), f_img, transform, sitk.sitkBSpline, math.nan)
        return sitk.GetArrayFromImage(out)

    return PeerResult(lambda: matrix, resample)


PEERS: dict[str, tuple[str, Callable[[np.ndarray, np.ndarray], PeerResult]]] = {
    "fourier-mellin": ("skimage", peer_fourier_mellin),
    "imreg_dft": ("imreg_dft", peer_imreg_dft),
    "simpleitk": ("SimpleITK", peer_simpleitk),
    "pystackreg": ("pystackreg", peer_pystackreg),
}
LABELS = {
    "rotstn": "rotstn.register",
    "fourier-mellin": "Fourier–Mellin (skimage)",
    "imreg_dft": "imreg_dft similarity",
    "simpleitk": "SimpleITK exhaustive + refine",
    "pystackreg": "pystackreg RIGID_BODY",
}


def peer_versions() -> dict[str, str]:
    """Version of each importable peer's package; the reason for each that is not."""
    found = {}
    for name, (module, _) in PEERS.items():
        try:
            mod = importlib.import_module(module)
            found[name] = str(getattr(mod, "__version__", None) or mod.Version_VersionString())
        except Exception as err:
            found[name] = f"unavailable ({type(err).__name__}: {err})"
    return found


# --------------------------------------------------------------------------
# Rigid sets
# --------------------------------------------------------------------------

RIGID_SETS = {
    "128": ("clean 128²", {"size": (128, 128)}),
    "96x160": ("clean 96×160", {"size": (96, 160)}),
    "noisy128": ("noisy 128² (σ 0.05 + gamma)", {"size": (128, 128), "noise": 0.05, "photometric": True}),
    "256-shift": ("256², shifts 20–25 %", {"size": (256, 256), "min_shift": 0.2, "max_shift": 0.25}),
    "512": ("512²", {"size": (512, 512)}),
    "2048": ("2048²", {"size": (2048, 2048)}),
}


@dataclass
class Run:
    matrices: np.ndarray
    wall_ms: float
    cpu_ms: float
    scores: np.ndarray | None = None


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def run_rotstn(pairs, chunk: int, repeats: int = 1) -> Run:
    """The set through rotstn.register in chunks; times are the median over ``repeats`` runs of the set."""
    n = len(pairs.fixed)
    rotstn.register(pairs.fixed[:1], pairs.moving[:1])  # warm-up: first-call costs are not per pair
    runs = []
    for _ in range(repeats):
        matrices, scores, wall, cpu = [], [], 0.0, 0.0
        for lo in range(0, n, chunk):
            result, w, c = timed(
                lambda lo=lo: rotstn.register(pairs.fixed[lo : lo + chunk], pairs.moving[lo : lo + chunk])
            )
            matrices.append(result.matrix.detach().double().cpu().numpy())
            scores.append(result.score.detach().double().cpu().numpy())
            wall, cpu = wall + w, cpu + c
        runs.append(Run(np.concatenate(matrices), wall / n * 1e3, cpu / n * 1e3, np.concatenate(scores)))
    middle = sorted(runs, key=lambda run: run.wall_ms)[len(runs) // 2]
    return Run(runs[0].matrices, middle.wall_ms, middle.cpu_ms, runs[0].scores)


def run_peer(name: str, pairs, n: int) -> Run:
    fn = PEERS[name][1]
    matrices, wall, cpu = [], 0.0, 0.0
    for i in range(n):
        f, m = pairs.fixed[i, 0].double().numpy(), pairs.moving[i, 0].double().numpy()
        try:
            result, w, c = timed(lambda f=f, m=m: fn(f, m))
            matrix = result.convert()
        except Exception as err:
            print(f"<!-- {name} failed on pair {i}: {type(err).__name__}: {err} -->")
            matrix, w, c = np.full((2, 3), np.nan), 0.0, 0.0
        matrices.append(matrix)
        wall, cpu = wall + w, cpu + c
    return Run(np.stack(matrices), wall / n * 1e3, cpu / n * 1e3)


def evaluate(run: Run, pairs) -> tuple[np.ndarray, np.ndarray]:
    fixed_shape, moving_shape = pairs.fixed.shape[-2:], pairs.moving.shape[-2:]
    truth = pairs.matrix.numpy()
    disp = np.array(
        [
            max_displacement(run.matrices[i], truth[i], fixed_shape, moving_shape)
            for i in range(len(run.matrices))
        ]
    )
    angle = np.array([angle_error_deg(run.matrices[i], truth[i]) for i in range(len(run.matrices))])
    return disp, angle


def fmt(x: float, digits: int = 3) -> str:
    return "∞" if not math.isfinite(x) else f"{x:.{digits}f}"


def rigid_tables(args, sets: list[str], methods: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Print the rigid-model table; return rotstn's (scores, successes) per set for the score trust table."""
    print("## Rigid model: rotation about an unknown centre\n")
    print(
        "| set | method | pairs | success | median max disp. px | p95 px | median angle err. ° "
        "| ms/pair wall | ms/pair CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    trust = []
    for key in sets:
        label, kwargs = RIGID_SETS[key]
        n = args.pairs
        pairs, gen_wall, _ = timed(lambda kwargs=kwargs, n=n: rigid_pairs(n, seed=args.seed, **kwargs))
        large = kwargs["size"][0] * kwargs["size"][1] > 1024**2
        for method in methods:
            if method == "rotstn":
                chunk = args.chunk if large else n
                run = run_rotstn(pairs, chunk, 1 if large else args.rotstn_repeats)
                count = n
            else:
                count = min(n, args.large_peer_pairs) if large else n
                run = run_peer(method, pairs, count)
            disp, angle = evaluate(run, pairs)
            if method == "rotstn":
                trust.append((run.scores, disp < 1.0))
            print(
                f"| {label} | {LABELS[method]} | {count} | {(disp < 1).mean():.0%} | "
                f"{fmt(float(np.median(disp)))} | {fmt(float(np.quantile(disp, 0.95)))} | "
                f"{fmt(float(np.median(angle)))} | "
                f"{run.wall_ms:.1f} | {run.cpu_ms:.1f} |",
                flush=True,
            )
        print(f"<!-- {label}: {n} pairs generated in {gen_wall:.1f} s -->", flush=True)
    return trust


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random success scores above a random failure (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    above = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(above / (len(pos) * len(neg)))


def suggested_threshold(scores: np.ndarray, positive: np.ndarray) -> tuple[float, str]:
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan, "one class is empty"
    if pos.min() > neg.max():
        return float((pos.min() + neg.max()) / 2), "separates every pair"
    # Otherwise the threshold that maximises true-positive rate minus false-positive rate.
    candidates = np.unique(scores)
    gain = [(scores[positive] >= c).mean() - (scores[~positive] >= c).mean() for c in candidates]
    best = float(candidates[int(np.argmax(gain))])
    tpr, fpr = (pos >= best).mean(), (neg >= best).mean()
    return best, f"accepts {tpr:.0%} of successes, {fpr:.0%} of failures"


def trust_table(args, correct: list[tuple[np.ndarray, np.ndarray]]) -> None:
    n = args.pairs
    unrelated = rigid_pairs(n, (128, 128), unrelated=True, seed=args.seed + 1)
    tiny = rigid_pairs(
        n, (128, 128), min_shift=0.5, max_shift=0.9, min_overlap=0.01, max_overlap=0.1, seed=args.seed + 2
    )
    rows = (
        [("correct pairs (rigid sets)", *map(np.concatenate, zip(*correct, strict=True)))] if correct else []
    )
    run = run_rotstn(unrelated, n)
    rows.append(("unrelated pairs (128²)", run.scores, np.zeros(n, dtype=bool)))
    run = run_rotstn(tiny, n)
    disp, _ = evaluate(run, tiny)
    rows.append(("overlap 1–10 % (128²)", run.scores, disp < 1.0))
    print("\n## Score trust: rotstn's `.score`, success = max displacement < 1 px\n")
    print("| pairs | n | successes | min score of successes | max score of failures |")
    print("|---|---|---|---|---|")

    def extreme(values: np.ndarray, fn) -> str:
        return fmt(float(fn(values))) if len(values) else "–"

    for label, scores, ok in rows:
        print(
            f"| {label} | {len(scores)} | {int(ok.sum())} | {extreme(scores[ok], np.min)} | "
            f"{extreme(scores[~ok], np.max)} |"
        )
    scores = np.concatenate([r[1] for r in rows])
    ok = np.concatenate([r[2] for r in rows])
    threshold, note = suggested_threshold(scores, ok)
    print(
        f"\nAll {len(scores)} pairs: AUROC {fmt(auroc(scores, ok), 4)}; "
        f"suggested threshold {fmt(threshold)} ({note})."
    )


# --------------------------------------------------------------------------
# Conversion check
# --------------------------------------------------------------------------


def conversion_check(methods: list[str], seed: int) -> dict[str, tuple[float, float]]:
    """Per peer: mean |own resampling - scipy with the converted matrix| and the same for a 0.5 px error."""
    pairs = rigid_pairs(1, (128, 128), images=("astronaut",), seed=seed, dtype=torch.float64)
    fixed = pairs.fixed[0, 0].numpy()
    # A smooth moving image: what is left of the difference is geometry, not interpolation.
    moving = ndimage.gaussian_filter(pairs.moving[0, 0].numpy(), 2.0)
    out = {}
    for name in methods:
        result = PEERS[name][1](fixed, pairs.moving[0, 0].numpy())
        matrix = result.convert()
        own = np.asarray(result.resample(moving), dtype=np.float64)
        ours = warp(moving, matrix, fixed.shape, order=3)
        off = matrix.copy()
        off[:, 2] += 0.5 / math.sqrt(2)
        wrong = warp(moving, off, fixed.shape, order=3)
        # Compare away from the edges, where each library pads in its own way.
        valid = np.isfinite(ours) & np.isfinite(wrong) & np.isfinite(own)
        valid = ndimage.binary_erosion(valid, iterations=4)
        out[name] = (float(np.abs(own - ours)[valid].mean()), float(np.abs(wrong - ours)[valid].mean()))
    return out


def print_conversion_check(methods: list[str], seed: int) -> None:
    print("\n## Conversion check: each peer's own resampling vs scipy with the converted matrix\n")
    print("| peer | mean abs. difference | with a 0.5 px conversion error |")
    print("|---|---|---|")
    for name, (diff, wrong) in conversion_check(methods, seed).items():
        print(f"| {LABELS[name]} | {diff:.5f} | {wrong:.5f} |")


# --------------------------------------------------------------------------
# Rotation model (rotation about the image centre)
# --------------------------------------------------------------------------


def ncc_disc(a: torch.Tensor, b: torch.Tensor, disc: torch.Tensor) -> torch.Tensor:
    a, b = a[..., disc], b[..., disc]
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def exhaustive(fixed: torch.Tensor, moving: torch.Tensor) -> float:
    """Best NCC over a 0.5° grid on the circle, then a 0.01° grid within ±0.5° (kornia's rotate)."""
    h, w = fixed.shape[-2:]
    disc = torch.from_numpy(disc_mask(h, w))
    best = 0.0
    for grid in (torch.arange(-180.0, 180.0, 0.5), None):
        if grid is None:
            grid = best + torch.arange(-50, 51) * 0.01
        scores = []
        for chunk in grid.split(256):
            turned = kornia_rotate(moving.expand(len(chunk), -1, -1, -1), chunk)
            scores.append(ncc_disc(turned[:, 0], fixed[:, 0], disc).squeeze(-1))
        best = float(grid[int(torch.cat(scores).argmax())])
    return math.radians(best)


def kornia_registrator(fixed: torch.Tensor, moving: torch.Tensor) -> float:
    reg = ImageRegistrator("rotation", lr=1.0, num_iterations=100, pyramid_levels=3, loss_fn=F.l1_loss)
    reg.register(moving, fixed)
    # Its model maps fixed (destination) pixels to moving ones: rotstn's sign, negated.
    return -math.radians(float(reg.model.rot.detach()))


def errors_deg(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    return rotstn.angle_difference(estimate.double(), truth.double()).abs().rad2deg()


def summary(err: torch.Tensor) -> str:
    return f"{err.median():.4f} | {torch.quantile(err, 0.95):.4f} | {err.max():.4f}"


def rotation_table(args, methods: list[str]) -> None:
    print("\n## Rotation model: rotation about the image centre\n")
    print("| set | method | median ° | p95 ° | max ° | ms/pair (wall) | ms/pair (CPU) |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    sizes = ((128, 128), (96, 160))
    for size in sizes:
        for noisy in (False, True):
            pairs = rotated_pairs(
                args.pairs, size, noise=0.05 if noisy else 0.0, photometric=noisy, seed=args.seed
            )
            name = f"{size[0]}×{size[1]} {'noisy' if noisy else 'clean'}"
            f64, m64 = pairs.fixed[:, 0].double().numpy(), pairs.moving[:, 0].double().numpy()
            n = args.pairs

            def run_rot(pairs=pairs):
                return rotstn.register(pairs.fixed, pairs.moving, model="rotation").angle

            def run_fm(f64=f64, m64=m64, n=n):
                return torch.tensor([fourier_mellin(f64[i], m64[i]) for i in range(n)])

            run_rot()  # warm-up
            times = {"rotstn": [], "fm": []}
            for rep in range(args.repeats):
                order = (("rotstn", run_rot), ("fm", run_fm))
                for key, fn in order if rep % 2 == 0 else order[::-1]:
                    est, wall, cpu = timed(fn)
                    times[key].append((wall / n * 1e3, cpu / n * 1e3))
                    if key == "rotstn":
                        est_rotstn = est
                    else:
                        est_fm = est
            both = list(zip(times["fm"], times["rotstn"], strict=True))
            ratios.append(
                (
                    name,
                    statistics.median(f[0] / r[0] for f, r in both),
                    statistics.median(f[1] / r[1] for f, r in both),
                )
            )

            def med(key, i, times=times):
                return statistics.median(t[i] for t in times[key])

            rows = [
                ("rotstn.register", errors_deg(est_rotstn, pairs.angle), med("rotstn", 0), med("rotstn", 1)),
                ("Fourier–Mellin (skimage)", errors_deg(est_fm, pairs.angle), med("fm", 0), med("fm", 1)),
            ]
            if "exhaustive" in methods:
                r = min(args.reference_pairs, n)
                ex, ex_wall, ex_cpu = timed(
                    lambda pairs=pairs, r=r: torch.tensor(
                        [exhaustive(pairs.fixed[i : i + 1], pairs.moving[i : i + 1]) for i in range(r)]
                    )
                )
                rows.append(
                    (
                        f"exhaustive NCC (0.01°) ({r} pairs)",
                        errors_deg(ex, pairs.angle[:r]),
                        ex_wall / r * 1e3,
                        ex_cpu / r * 1e3,
                    )
                )
            if "kornia" in methods:
                k = min(args.kornia_pairs, n)
                noise = 0.05 if noisy else 0.0
                small = rotated_pairs(
                    k, size, noise=noise, photometric=noisy, max_angle=math.radians(20), seed=args.seed
                )
                for label, subset in (("", pairs), (", θ within ±20°", small)):
                    kr, kr_wall, kr_cpu = timed(
                        lambda s=subset, k=k: torch.tensor(
                            [kornia_registrator(s.fixed[i : i + 1], s.moving[i : i + 1]) for i in range(k)]
                        )
                    )
                    rows.append(
                        (
                            f"kornia ImageRegistrator{label} ({k} pairs)",
                            errors_deg(kr, subset.angle[:k]),
                            kr_wall / k * 1e3,
                            kr_cpu / k * 1e3,
                        )
                    )
            for method, err, wall, cpu in rows:
                print(f"| {name} | {method} | {summary(err)} | {wall:.2f} | {cpu:.2f} |", flush=True)
    print("\nFourier–Mellin time / rotstn time (median of the interleaved repeats):\n")
    print("| set | wall ratio | CPU ratio |")
    print("|---|---|---|")
    for name, rw, rc in ratios:
        print(f"| {name} | {rw:.2f}× | {rc:.2f}× |")
    if torch.cuda.is_available():
        pairs = rotated_pairs(args.pairs, (128, 128), seed=args.seed)
        f, m = pairs.fixed.cuda(), pairs.moving.cuda()
        rotstn.register(f, m, model="rotation")
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            rotstn.register(f, m, model="rotation")
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / args.repeats / args.pairs * 1e3
        print(
            f"\nGPU ({torch.cuda.get_device_name()}): rotstn.register 128×128, rotation model, "
            f"{ms:.3f} ms/pair"
        )


# --------------------------------------------------------------------------

ALL_SETS = ["rotation", *RIGID_SETS, "trust", "conversion"]
ALL_METHODS = ["rotstn", *PEERS, "exhaustive", "kornia"]
QUICK_SETS = ["rotation", "128", "96x160", "trust", "conversion"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=None, help="pairs per set (default 24, 4 with --quick)")
    parser.add_argument("--sets", nargs="+", choices=ALL_SETS, default=None, help="default: all")
    parser.add_argument(
        "--methods", nargs="+", choices=ALL_METHODS, default=None, help="default: all available"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test of about a minute: 4 pairs, small sets"
    )
    parser.add_argument("--large-peer-pairs", type=int, default=4, help="pairs per peer on the 2048² set")
    parser.add_argument("--chunk", type=int, default=4, help="pairs per register call at 2048²")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (rotation model)")
    parser.add_argument(
        "--rotstn-repeats",
        type=int,
        default=3,
        help="rigid sets below 2048²: rotstn's time is the median of this many runs of the set (a run "
        "takes tens of milliseconds, the peers' seconds)",
    )
    parser.add_argument("--reference-pairs", type=int, default=8, help="pairs per set for exhaustive NCC")
    parser.add_argument("--kornia-pairs", type=int, default=4, help="pairs per set for ImageRegistrator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help="torch threads for rotstn (default 2; the peers run on one core, SimpleITK on two)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs = args.pairs or 4
        args.repeats, args.kornia_pairs, args.reference_pairs = 1, 1, 2
        args.sets = args.sets or QUICK_SETS
    args.pairs = args.pairs or 24
    sets = args.sets or ALL_SETS
    torch.set_num_threads(args.threads)
    versions = peer_versions()
    wanted = args.methods or ALL_METHODS
    methods = [m for m in wanted if m not in PEERS or not versions[m].startswith("unavailable")]
    start = time.perf_counter()
    print(machine_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.pairs} pairs per set")
    print("peers: " + ", ".join(f"{LABELS[k]} {v}" for k, v in versions.items() if k in wanted) + "\n")
    rigid_methods = [m for m in methods if m in ("rotstn", *PEERS)]
    rigid = [s for s in sets if s in RIGID_SETS]
    trust = rigid_tables(args, rigid, rigid_methods) if rigid and rigid_methods else []
    if "trust" in sets and "rotstn" in methods:
        trust_table(args, trust)
    peers = [m for m in methods if m in PEERS]
    if "conversion" in sets and peers:
        print_conversion_check(peers, args.seed)
    if "rotation" in sets and "rotstn" in methods:
        rotation_table(args, methods)
    print(f"\nTotal {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
