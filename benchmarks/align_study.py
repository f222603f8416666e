"""How much can a rotation STN help a CNN on rotated digits? A validation-split study.

    python benchmarks/align_study.py                 # ~30 min on 2 cores
    python benchmarks/align_study.py --quick         # a smoke run: tiny data, one seed

Everything is scored on the validation split of ``examples/align_classify.py
--validate`` (train on 3500 digits, score on the other 500 training digits at
``--views`` fixed angles each); the test digits are not touched. Rows:

* the four models of the example (CNN, RotationSTN + CNN, the same with its
  STN also trained towards :func:`rotstn.best_turn`, affine STN + CNN), plus
  the best_turn row with the unit-vector STN and 8 candidates, and RotationSTN
  (class-loss gradient only) with its unit-vector head and with no identity
  warm-up;
* the **pose spread**: for each class, the circular standard deviation of the
  pose the digits reach the CNN in (their rotation plus the STN's), averaged
  over the classes: 54° for uniform rotations in ±90° (no STN); a perfect
  rotation STN would bring it to 0 (or to any fixed pose per class);
* **oracle** rows that bound what any rotation STN can give this CNN: the CNN
  trained and scored on digits that were turned back by their true angle
  (residual pose error 0), or left with a Gaussian residual pose error of
  σ degrees (what an STN that estimates the pose to within σ would feed it).

Rotations uniform in [-90°, 90°]; all rows share seeds, batches and the
schedule of the example. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import align_classify as ac


def pose_spread(final_pose: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the circular standard deviation (degrees) of the pose the CNN sees."""
    spreads = []
    for c in labels.unique():
        a = final_pose[labels == c].double()
        z = torch.complex(a.cos().mean(), a.sin().mean())
        spreads.append(math.degrees(math.sqrt(-2 * math.log(max(float(z.abs()), 1e-12)))))
    return sum(spreads) / len(spreads)


@torch.no_grad()
def seen_pose(model: ac.Classifier, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor | None:
    """The pose each digit reaches the CNN in: its rotation plus the STN's (None for the affine STN)."""
    if model.kind == "cnn":
        return angles
    if model.kind not in ("rot", "search"):
        return None
    turn = torch.cat([model.eval().stn(x[i : i + 500]).angle for i in range(0, len(x), 500)])
    return angles + turn


def gaussian(sigma_deg: float) -> ac.AngleSampler:
    """A sampler of Gaussian residual pose errors with standard deviation ``sigma_deg`` degrees."""

    def sample(n: int, max_angle: float, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, generator=generator) * math.radians(sigma_deg)

    return sample


# (label, model kind, RotationSTN head, identity start, best_turn candidates, sampler);
# sampler None = uniform in [-90°, 90°] as in the example.
UV_SEARCH = "RotationSTN(head='unit_vector') + CNN, also trained towards best_turn (8 candidates)"
ROWS: list[tuple[str, str, str, bool, int, ac.AngleSampler | None]] = [
    ("CNN", "cnn", "binned", True, 16, None),
    ("RotationSTN(paired=False) + CNN (example default)", "rot", "binned", True, 16, None),
    ("RotationSTN(paired=False) + CNN, also trained towards best_turn", "search", "binned", True, 16, None),
    (UV_SEARCH, "search", "unit_vector", True, 8, None),
    ("RotationSTN, no identity start (identity_start=False)", "rot", "binned", False, 16, None),
    ("RotationSTN, unit-vector head (ConvEncoder)", "rot", "unit_vector", True, 16, None),
    ("affine STN + CNN", "affine", "binned", True, 16, None),
    ("oracle: CNN on digits turned back by the true angle", "cnn", "binned", True, 16, gaussian(0.0)),
    ("oracle with residual pose error σ = 10°", "cnn", "binned", True, 16, gaussian(10.0)),
    ("oracle with residual pose error σ = 25°", "cnn", "binned", True, 16, gaussian(25.0)),
    ("oracle with residual pose error σ = 45°", "cnn", "binned", True, 16, gaussian(45.0)),
]
LONG = (
    "CNN",
    "RotationSTN(paired=False) + CNN (example default)",
    "RotationSTN(paired=False) + CNN, also trained towards best_turn",
    UV_SEARCH,
    "oracle: CNN on digits turned back by the true angle",
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--epochs", type=int, nargs="+", default=[4, 20], help="budgets; the longer ones run the LONG rows"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--views", type=int, default=6, help="fixed angles per validation digit")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--only",
        default=None,
        help="run only the rows whose label contains this, and the CNN (CNN: only the CNN)",
    )
    p.add_argument(
        "--quick", action="store_true", help="256 training digits, 1 epoch, one seed (a smoke run)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs, args.seeds = [1], [0]

    x_train, y_train, _, _ = ac.load_digits()
    x_fit, y_fit, x_val, y_val = ac.validation_split(x_train, y_train)
    if args.quick:
        x_fit, y_fit, x_val, y_val = x_fit[:256], y_fit[:256], x_val[:100], y_val[:100]

    print(
        f"\nValidation study, rotations uniform in [-90°, 90°]: {len(y_fit)} training digits, "
        f"{len(y_val)} validation digits × {args.views} views, seeds {args.seeds}\n"
    )
    print("| row | epochs | validation error % (mean) | per seed | vs CNN | pose spread ° | train s / seed |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for epochs in args.epochs:
        base = None
        for label, kind, head, identity_start, candidates, sampler in ROWS:
            if epochs != args.epochs[0] and label not in LONG:
                continue
            if args.only and label != "CNN" and (args.only == "CNN" or args.only not in label):
                continue
            cfg = ac.Config(
                math.pi / 2,
                epochs,
                64,
                3e-3,
                args.views,
                len(y_fit),
                head,
                64,
                identity_start,
                candidates,
                head,
            )
            sample = sampler or ac.random_angles
            xv, yv, angles = ac.test_set(x_val, y_val, cfg, sample)
            errors, spreads, t0 = [], [], time.perf_counter()
            for seed in args.seeds:
                model, err = ac.train(kind, seed, (x_fit, y_fit, xv, yv), cfg, sample)
                errors.append(100 * err)
                pose = seen_pose(model, xv, angles)
                spreads.append(None if pose is None else pose_spread(pose, yv))
            seconds = (time.perf_counter() - t0) / len(args.seeds)
            mean = sum(errors) / len(errors)
            base = mean if base is None else base
            per_seed = ", ".join(f"{e:.2f}" for e in errors)
            spread = "–" if None in spreads else f"{sum(spreads) / len(spreads):.0f}"
            print(
                f"| {label} | {epochs} | {mean:.2f} | {per_seed} | {mean / base:.2f}× | {spread} "
                f"| {seconds:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
