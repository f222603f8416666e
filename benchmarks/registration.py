"""Rotation registration: rotstn.register against the classical methods, on the same pairs.

    python benchmarks/registration.py [--pairs 60] [--repeats 5] [--kornia-pairs 8]

Pairs: crops of scikit-image's bundled pictures rotated by scipy.ndimage.rotate
(rotstn.data.rotated_pairs), angles uniform over the full circle, 128×128 and
96×160, clean and with Gaussian noise σ = 0.05 on both images plus a random
gamma/contrast/brightness change on the fixed one. Methods:

* rotstn: ``rotstn.register`` on the whole batch, torch.set_num_threads(2).
* Fourier–Mellin: scikit-image's recipe per pair (Hann window, log-magnitude
  spectrum zero-padded to a square, ``warp_polar``, ``phase_cross_correlation``
  with upsampling; the 180° ambiguity settled by the NCC of the two candidates
  after ``scipy.ndimage.rotate``).
* exhaustive NCC: the accuracy reference. kornia's ``rotate`` at every 0.5°
  over the circle, then every 0.01° within ±0.5° of the best; NCC over the
  central disc.
* kornia ImageRegistrator: rotation-only model, Adam lr 1 (degrees), 3 pyramid
  levels, 100 iterations a level, L1 loss. It always starts from the identity,
  so it is run on the first ``--kornia-pairs`` pairs of each set and on as many
  pairs of the same kind with θ within ±20° (it takes about a second per pair).

rotstn and Fourier–Mellin are timed in the same process, interleaved, and the
table reports the median over ``--repeats`` of wall and CPU (process) time
per pair and the ratio of the two. The machine may be shared: compare ratios.
"""

from __future__ import annotations

import os

# The peer's small matrix products (phase_cross_correlation's upsampled DFT)
# run fastest on one BLAS thread; more threads only wait on each other.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# torch's two OpenMP threads spin while they wait for each other by default; on
# a CPU shared with other jobs a spinning thread is often descheduled and every
# small op then waits a time slice (measured here: 20× slower). Passive waiting
# costs nothing on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from kornia.geometry import ImageRegistrator
from kornia.geometry.transform import rotate as kornia_rotate
from scipy import ndimage
from skimage.filters import window
from skimage.registration import phase_cross_correlation
from skimage.transform import warp_polar

import rotstn
from rotstn.data import rotated_pairs


def disc_mask(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) <= (min(h, w) - 1) / 2 - 1


def fourier_mellin(fixed: np.ndarray, moving: np.ndarray, n_angles: int = 720, upsample: int = 20) -> float:
    """scikit-image's Fourier–Mellin rotation estimate for one pair, in radians (rotstn's sign)."""
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
    angle = -shift[0] * 360.0 / n_angles
    disc = disc_mask(h, w)
    scores = []
    for candidate in (angle, angle + 180.0):
        turned = ndimage.rotate(moving, candidate, reshape=False, order=1)
        scores.append(np.corrcoef(turned[disc], fixed[disc])[0, 1])
    return math.radians(angle + 180.0 * int(np.argmax(scores)))


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


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=60, help="pairs per set")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats")
    parser.add_argument("--kornia-pairs", type=int, default=8, help="pairs per set for ImageRegistrator")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.pairs} pairs per set\n")
    print("| set | method | median ° | p95 ° | max ° | ms/pair (wall) | ms/pair (CPU) |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for size in ((128, 128), (96, 160)):
        for noisy in (False, True):
            pairs = rotated_pairs(
                args.pairs, size, noise=0.05 if noisy else 0.0, photometric=noisy, seed=args.seed
            )
            name = f"{size[0]}×{size[1]} {'noisy' if noisy else 'clean'}"
            f64, m64 = pairs.fixed[:, 0].double().numpy(), pairs.moving[:, 0].double().numpy()
            n = args.pairs

            def run_rotstn(pairs=pairs):
                return rotstn.register(pairs.fixed, pairs.moving).angle

            def run_fm(f64=f64, m64=m64, n=n):
                return torch.tensor([fourier_mellin(f64[i], m64[i]) for i in range(n)])

            run_rotstn()  # warm-up
            times = {"rotstn": [], "fm": []}
            for rep in range(args.repeats):
                order = (("rotstn", run_rotstn), ("fm", run_fm))
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

            ex, ex_wall, ex_cpu = timed(
                lambda pairs=pairs, n=n: torch.tensor(
                    [exhaustive(pairs.fixed[i : i + 1], pairs.moving[i : i + 1]) for i in range(n)]
                )
            )
            k = min(args.kornia_pairs, n)
            noise = 0.05 if noisy else 0.0
            small = rotated_pairs(
                k, size, noise=noise, photometric=noisy, max_angle=math.radians(20), seed=args.seed
            )
            kornia_rows = []
            for label, subset in (("", pairs), (", θ within ±20°", small)):
                kr, kr_wall, kr_cpu = timed(
                    lambda s=subset, k=k: torch.tensor(
                        [kornia_registrator(s.fixed[i : i + 1], s.moving[i : i + 1]) for i in range(k)]
                    )
                )
                kornia_rows.append(
                    (
                        f"kornia ImageRegistrator{label} ({k} pairs)",
                        errors_deg(kr, subset.angle[:k]),
                        kr_wall / k * 1e3,
                        kr_cpu / k * 1e3,
                    )
                )
            rows = [
                ("rotstn.register", errors_deg(est_rotstn, pairs.angle), med("rotstn", 0), med("rotstn", 1)),
                ("Fourier–Mellin (skimage)", errors_deg(est_fm, pairs.angle), med("fm", 0), med("fm", 1)),
                ("exhaustive NCC (0.01°)", errors_deg(ex, pairs.angle), ex_wall / n * 1e3, ex_cpu / n * 1e3),
                *kornia_rows,
            ]
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
        rotstn.register(f, m)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            rotstn.register(f, m)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / args.repeats / args.pairs * 1e3
        print(f"\nGPU ({torch.cuda.get_device_name()}): rotstn.register 128×128, {ms:.3f} ms/pair")
    else:
        print("\nNo GPU here: GPU timing not measured.")


if __name__ == "__main__":
    main()
