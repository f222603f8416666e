"""Can a result's score and predicted error be trusted on pairs nobody tuned for?

Draws randomized rigid and centred pairs from a seed given on the command line,
over every picture that ships with the installed packages
(``rotstn.data.bundled_pictures()``: scikit-image's and matplotlib's), and
registers them with ``rotstn.register``:

* geometry: full ±180°; "rigid" pairs turn about a random point in the central
  half of the fixed image and are then shifted by up to 25 % of each side,
  "centred" pairs turn about the centre; every pair overlaps ≥ 50 %;
* sizes: square sides 64–512 px, a quarter of the groups non-square;
* pixels: Gaussian noise at σ ∈ {0, 0.02, 0.05, 0.1} on both images, and on the
  noisy levels a random gamma (0.6–1.6), contrast and offset on fixed.

A result is *right* when its largest displacement error over the true overlap
is under 1 px (measured against the known truth, not the method's own fit),
*trusted* when ``score >= rotstn.registration.TRUST``. Printed per noise level
and picture family: pairs, success, trusted-and-wrong count, share of right
results trusted, coverage of the predicted error ``error_px`` (share of right
results whose true error is at or below it), its median on right results, the
share of wrong results predicted at ≥ 1 px, ambiguous results and time per pair.

    python benchmarks/trust.py --seed 11
    python benchmarks/trust.py --seed 11 --fm-every 8     # + Fourier–Mellin's time on every 8th group
    python benchmarks/trust.py --seed 11 --from-truth     # + the success an NCC search could reach at best
    python benchmarks/trust.py --seed 11 --save-pairs /tmp/p.pt --time-only   # draw, keep, time
    python benchmarks/trust.py --load-pairs /tmp/p.pt         # time those pairs (any rotstn version)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rotstn

LEVELS = (0.0, 0.02, 0.05, 0.1)
SIDES = (64, 96, 128, 192, 256, 384, 512)


@dataclass
class Group:
    """Pairs of one picture, size, noise level and geometry, registered in one call."""

    family: str
    picture: str
    noise: float
    kind: str
    size: tuple[int, int]
    seed: int
    n: int


@dataclass
class Outcome:
    group: Group
    error: np.ndarray  # (n,) largest displacement error over the true overlap, px
    score: np.ndarray
    predicted: np.ndarray  # (n,) error_px, NaN where the code has none
    ambiguous: np.ndarray
    seconds: float
    fm_seconds: float = math.nan
    fm_error: np.ndarray = field(default_factory=lambda: np.zeros(0))
    from_truth: np.ndarray = field(
        default_factory=lambda: np.zeros(0)
    )  # --from-truth: error refined from the truth


def draw_groups(seed: int, per_picture: int, pairs: int) -> list[Group]:
    from rotstn.data import bundled_pictures

    rng = np.random.default_rng(seed)
    groups = []
    for level in LEVELS:
        for family, names in bundled_pictures().items():
            for name in names:
                for _ in range(per_picture):
                    side = int(rng.choice(SIDES))
                    other = int(rng.choice(SIDES)) if rng.random() < 0.25 else side
                    size = (side, other) if rng.random() < 0.5 else (other, side)
                    kind = "centred" if rng.random() < 0.25 else "rigid"
                    groups.append(Group(family, name, level, kind, size, int(rng.integers(2**31)), pairs))
    return groups


def make_pairs(g: Group):
    from rotstn.data import rigid_pairs

    rigid = g.kind == "rigid"
    return rigid_pairs(
        g.n,
        g.size,
        max_shift=0.25 if rigid else 0.0,
        pivot=0.5 if rigid else 0.0,
        noise=g.noise,
        photometric=g.noise > 0,
        min_overlap=0.5,
        images=(g.picture,),
        min_std=0.04,
        seed=g.seed,
    )


def true_errors(matrix, pairs) -> np.ndarray:
    """(n,) largest displacement error over the true overlap of estimated (n, 2, 3) pixel maps."""
    from registration import max_displacement

    est, truth = np.asarray(matrix, dtype=np.float64), pairs.matrix.numpy()
    shape_f, shape_m = pairs.fixed.shape[-2:], pairs.moving.shape[-2:]
    return np.array([max_displacement(est[i], truth[i], shape_f, shape_m) for i in range(len(est))])


def refined_from_truth(pairs) -> np.ndarray:
    """Largest displacement error of register's refinement started at the true map (no search).

    Where this is 1 px or more, the images' best normalised cross-correlation is itself that far from
    the truth (noise, gamma, too little texture): no search could have found a right answer by NCC.
    """
    from rotstn.registration import _n_levels, _prepare, _refine_from
    from rotstn.registration._stack import matrix_parameters

    size, moving_size = tuple(pairs.fixed.shape[-2:]), tuple(pairs.moving.shape[-2:])
    f, m = pairs.fixed.mean(1, keepdim=True), pairs.moving.mean(1, keepdim=True)
    angle, t = matrix_parameters(pairs.matrix.to(f.dtype), size, moving_size)
    n_levels = _n_levels(size, moving_size, 64)
    with torch.no_grad():
        fit = _refine_from(_prepare(f, None, 1.0, n_levels), _prepare(m, None, 1.0, n_levels), angle, t)
    return true_errors(rotstn.functional.rigid_matrix(fit.angle, fit.translation, size, moving_size), pairs)


def run(groups: list[Group], fm_every: int, time_only: bool, from_truth: bool = False) -> list[Outcome]:
    from registration import peer_fourier_mellin

    warm = make_pairs(groups[0])
    rotstn.register(warm.fixed, warm.moving)  # first-call costs (kernel compilation) are not per pair
    out = []
    for k, g in enumerate(groups):
        try:
            pairs = make_pairs(g)
        except ValueError:  # a picture too flat at this size: nothing to register
            continue
        start = time.perf_counter()
        result = rotstn.register(pairs.fixed, pairs.moving)
        seconds = time.perf_counter() - start
        n = len(pairs.fixed)
        if time_only:
            out.append(Outcome(g, np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n, bool), seconds))
            continue
        error = true_errors(result.matrix, pairs)
        predicted = getattr(result, "error_px", None)
        ambiguous = getattr(result, "ambiguous", None)
        o = Outcome(
            g,
            error,
            result.score.double().numpy(),
            np.full(n, np.nan) if predicted is None else predicted.double().numpy(),
            np.zeros(n, bool) if ambiguous is None else ambiguous.numpy(),
            seconds,
        )
        if from_truth:
            o.from_truth = refined_from_truth(pairs)
        if fm_every and k % fm_every == 0:
            start, fm = time.perf_counter(), []
            for i in range(n):
                f, m = pairs.fixed[i, 0].double().numpy(), pairs.moving[i, 0].double().numpy()
                fm.append(peer_fourier_mellin(f, m))
            o.fm_seconds = time.perf_counter() - start
            o.fm_error = true_errors([r.convert() for r in fm], pairs)
        out.append(o)
    return out


def save_pairs(groups: list[Group], path: str) -> None:
    kept = []
    for g in groups:
        try:
            pairs = make_pairs(g)
        except ValueError:
            continue
        kept.append((pairs.fixed, pairs.moving))
    torch.save(kept, path)


def time_saved(path: str, repeats: int = 3) -> None:
    """ms per pair of rotstn.register over saved pairs: the median of ``repeats`` passes."""
    kept = torch.load(path)
    rotstn.register(kept[0][0], kept[0][1])
    n = sum(len(f) for f, _ in kept)
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for f, m in kept:
            rotstn.register(f, m)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    print(
        f"{path}: {n} pairs, rotstn from {Path(rotstn.__file__).parent}: "
        f"{1e3 * sorted(walls)[repeats // 2] / n:.2f} ms/pair wall, "
        f"{1e3 * sorted(cpus)[repeats // 2] / n:.2f} ms/pair CPU (medians of {repeats} passes)"
    )


def pct(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{100 * x:.1f} %"


def row(label: str, outs: list[Outcome], trust: float) -> str:
    err = np.concatenate([o.error for o in outs])
    score = np.concatenate([o.score for o in outs])
    pred = np.concatenate([o.predicted for o in outs])
    amb = np.concatenate([o.ambiguous for o in outs])
    n = len(err)
    right = err < 1.0
    trusted = score >= trust
    bad = int((trusted & ~right).sum())
    right_trusted = trusted[right].mean() if right.any() else math.nan
    has_pred = np.isfinite(pred).any()
    coverage = (err[right] <= pred[right]).mean() if has_pred and right.any() else math.nan
    median = float(np.median(pred[right])) if has_pred and right.any() else math.nan
    flagged = (pred[~right] >= 1.0).mean() if has_pred and (~right).any() else math.nan
    ms = 1e3 * sum(o.seconds for o in outs) / max(n, 1)
    med = "–" if not math.isfinite(median) else f"{median:.3f}"
    truth = np.concatenate([o.from_truth for o in outs])
    attainable = f" {pct((truth < 1.0).mean())} |" if len(truth) == n else ""
    return (
        f"| {label} | {n} | {pct(right.mean())} |{attainable} {bad} | {pct(right_trusted)} "
        f"| {pct(coverage)} | {med} "
        f"| {pct(flagged)} | {int(amb.sum())} | {ms:.1f} |"
    )


def report(outs: list[Outcome], seed: int) -> None:
    trust = getattr(rotstn.registration, "TRUST", 0.9)
    print(f"\nseed {seed}: {sum(len(o.error) for o in outs)} pairs, TRUST = {trust}\n")
    extra = all(len(o.from_truth) == len(o.error) for o in outs)
    print(
        "| noise | family | pairs | success (< 1 px) |"
        + (" right from the truth |" if extra else "")
        + " trusted & wrong | right trusted | error_px coverage "
        "| error_px median (right) | wrong with error_px ≥ 1 | ambiguous | ms/pair |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if extra else ""))
    families = sorted({o.group.family for o in outs})
    for level in LEVELS:
        at = [o for o in outs if o.group.noise == level]
        for family in families:
            sel = [o for o in at if o.group.family == family]
            if sel:
                print(row(f"{level:g} | {family}", sel, trust))
        print(row(f"**{level:g}** | **all**", at, trust))
    for kind in ("rigid", "centred"):
        print(row(f"all | {kind} pairs", [o for o in outs if o.group.kind == kind], trust))
    print(row("**all** | **all**", outs, trust))
    wrong = [
        (o.group, i, o.error[i], o.score[i], o.predicted[i])
        for o in outs
        for i in range(len(o.error))
        if o.score[i] >= trust and not o.error[i] < 1.0
    ]
    for g, i, e, s, p in wrong:
        print(
            f"trusted and wrong: {g.picture} {g.size} σ={g.noise} {g.kind} seed={g.seed} pair {i}: "
            f"error {e:.2f} px, score {s:.3f}, error_px {p:.2f}"
        )
    fm = [o for o in outs if math.isfinite(o.fm_seconds)]
    if fm:
        ours = sum(o.seconds for o in fm)
        theirs = sum(o.fm_seconds for o in fm)
        n = sum(len(o.error) for o in fm)
        fm_right = np.concatenate([o.fm_error for o in fm]) < 1.0
        ok = np.concatenate([o.error for o in fm]) < 1.0
        print(
            f"\nFourier–Mellin (skimage recipe) on {n} of these pairs: {1e3 * theirs / n:.1f} ms/pair, "
            f"success {pct(fm_right.mean())}; rotstn {1e3 * ours / n:.1f} ms/pair, success {pct(ok.mean())}: "
            f"{theirs / ours:.1f}× less time"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=None, help="draws the pictures' crops, sizes and pairs")
    parser.add_argument("--per-picture", type=int, default=4, help="groups per picture and noise level")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per group (one register call)")
    parser.add_argument("--fm-every", type=int, default=0, help="time Fourier–Mellin on every k-th group")
    parser.add_argument("--time-only", action="store_true", help="register and time only")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--from-truth",
        action="store_true",
        help="also refine every pair from its true map: the success no NCC search can exceed",
    )
    parser.add_argument("--dump", help="write every pair's outcome to this .npz file")
    parser.add_argument("--save-pairs", help="keep the drawn pairs in this file (for --load-pairs)")
    parser.add_argument(
        "--load-pairs", help="time rotstn.register on pairs saved earlier (imports nothing else of rotstn)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from _machine import machine_line

    print(machine_line())
    if args.load_pairs:
        time_saved(args.load_pairs)
        return
    if args.seed is None:
        parser.error("--seed is required (or --load-pairs)")
    groups = draw_groups(args.seed, args.per_picture, args.pairs)
    if args.save_pairs:
        save_pairs(groups, args.save_pairs)
    outs = run(groups, args.fm_every, args.time_only, args.from_truth)
    if args.time_only:
        n = sum(len(o.error) for o in outs)
        ms = 1e3 * sum(o.seconds for o in outs) / n
        print(f"seed {args.seed}: {n} pairs, {ms:.2f} ms/pair (register only)")
        return
    report(outs, args.seed)
    if args.dump:
        np.savez(
            args.dump,
            error=np.concatenate([o.error for o in outs]),
            score=np.concatenate([o.score for o in outs]),
            predicted=np.concatenate([o.predicted for o in outs]),
            ambiguous=np.concatenate([o.ambiguous for o in outs]),
            picture=np.concatenate([[o.group.picture] * len(o.error) for o in outs]),
            noise=np.concatenate([[o.group.noise] * len(o.error) for o in outs]),
            side=np.concatenate([[max(o.group.size)] * len(o.error) for o in outs]),
            short=np.concatenate([[min(o.group.size)] * len(o.error) for o in outs]),
            kind=np.concatenate([[o.group.kind] * len(o.error) for o in outs]),
            group_seed=np.concatenate([[o.group.seed] * len(o.error) for o in outs]),
            index=np.concatenate([np.arange(len(o.error)) for o in outs]),
            from_truth=np.concatenate([o.from_truth for o in outs]),
        )


if __name__ == "__main__":
    main()
