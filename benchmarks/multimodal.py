"""Multimodal pairs: can ``register(..., metric="mi")`` align images whose intensities do not match?

Draws rigid pairs from a seed given on the command line and registers them with rotstn's mutual
information path, rotstn's default NCC path, and SimpleITK's Mattes mutual information from an
exhaustive angle start (``registration.peer_simpleitk(multimodal=True)``: every 10° over the
circle, then coarse-to-fine gradient descent, all by Mattes MI, started at the images' centres).

* geometry: ``rotstn.data.rigid_pairs``: full ±180°, turned about a random point in the central
  half of fixed, shifted by up to 20 % of each side, overlap ≥ 50 %; sides 96–256 px drawn per
  group, a quarter of the groups non-square;
* intensities: fixed is a crop of a picture scaled to [0, 1]; moving shows the same scene through
  a map — ``inverted`` 1 − x, ``square`` 1 − 4(x − 0.5)² (non-monotonic: x and 1 − x look alike),
  ``lookup`` three grey levels in a non-monotonic order (0.5, 1, 0 over the picture's terciles) —
  over every picture that ships with the installed packages (``rotstn.data.bundled_pictures()``);
  and ``ihc`` pairs: scikit-image's immunohistochemistry picture separated into stains (optical
  density times ``skimage.color.hed_from_rgb``, as ``rgb2hed`` computes it before it clips),
  fixed the hematoxylin channel, moving the eosin channel under the same map
  (``scipy.ndimage.map_coordinates``, cubic). In this picture eosin carries little stain of its
  own: its channel is dominated by the other two (correlation −0.88 with DAB, −0.38 with
  hematoxylin); ``rgb2hed``'s clipped eosin channel is 0 nearly everywhere;
* noise: Gaussian σ ∈ ``--noise`` on both images after the map.

A result is *right* when its largest displacement error over the true overlap is under 1 px
(against the known truth), *trusted* when ``score >= rotstn.registration.TRUST``. Printed per
family (map × noise): pairs, success and trusted-and-wrong of each method, the share of right
rotstn results trusted, the median error of right results, time per pair (rotstn: one batched call
per group; SimpleITK: one pair at a time, on ``--sitk-every``-th groups) and SimpleITK's time over
rotstn-MI's on the same pairs.

    python benchmarks/multimodal.py --seed 1
    python benchmarks/multimodal.py --seed 1 --sitk-every 0          # rotstn only
    python benchmarks/multimodal.py --seed 1 --pairs 2 --pictures 4  # a quick look
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trust import pct, true_errors

import rotstn

MAPS = ("inverted", "square", "lookup")
SIDES = (96, 128, 192, 256)
IHC_GROUPS = 8  # groups of ihc pairs per noise level


@dataclass
class Group:
    kind: str  # a map name or "ihc"
    picture: str
    noise: float
    size: tuple[int, int]
    seed: int
    n: int


@dataclass
class Outcome:
    group: Group
    errors: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def intensity_map(kind: str, x: torch.Tensor) -> torch.Tensor:
    """One of MAPS applied to (N, 1, H, W) values in [0, 1]."""
    if kind == "inverted":
        return 1 - x
    if kind == "square":
        return 1 - 4 * (x - 0.5) ** 2
    low, high = torch.quantile(x.flatten(1), torch.tensor([1 / 3, 2 / 3], dtype=x.dtype), dim=1)
    low, high = low.view(-1, 1, 1, 1), high.view(-1, 1, 1, 1)
    return torch.where(x < low, 0.5, torch.where(x < high, 1.0, 0.0)).to(x.dtype)


def draw_groups(seed: int, pairs: int, noise: tuple[float, ...], pictures: int | None) -> list[Group]:
    from rotstn.data import bundled_pictures

    rng = np.random.default_rng(seed)
    names = [name for family in bundled_pictures().values() for name in family]
    if pictures is not None:
        names = list(rng.choice(names, size=min(pictures, len(names)), replace=False))

    def size() -> tuple[int, int]:
        side = int(rng.choice(SIDES))
        other = int(rng.choice(SIDES)) if rng.random() < 0.25 else side
        return (side, other) if rng.random() < 0.5 else (other, side)

    groups = []
    for level in noise:
        for kind in MAPS:
            for name in names:
                groups.append(Group(kind, str(name), level, size(), int(rng.integers(2**31)), pairs))
        for _ in range(IHC_GROUPS):
            side = int(rng.choice(SIDES))
            groups.append(
                Group("ihc", "immunohistochemistry", level, (side, side), int(rng.integers(2**31)), pairs)
            )
    return groups


def _stains() -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin optical densities of scikit-image's IHC picture, each scaled to [0, 1]."""
    from skimage import data
    from skimage.color import hed_from_rgb

    rgb = data.immunohistochemistry().astype(np.float64) / 255
    hed = -np.log(np.maximum(rgb, 1e-6)) @ hed_from_rgb

    def unit(x: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(x, (1, 99))
        return np.clip((x - lo) / (hi - lo), 0, 1)

    return unit(hed[..., 0]), unit(hed[..., 1])


def ihc_pairs(g: Group, same: bool = False):
    """Fixed: a hematoxylin crop; moving: the eosin channel under a rigid map drawn like rigid_pairs'.

    ``same``: moving shows the hematoxylin channel too (a check of the geometry).
    """
    from registration import matrix_from
    from scipy import ndimage

    from rotstn.data import RigidPairs

    hema, eosin = _stains()
    if same:
        eosin = hema
    rng = np.random.default_rng(g.seed)
    h, w = g.size
    side = hema.shape[0]
    fixed, moving, matrices = [], [], []
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    while len(fixed) < g.n:
        angle = rng.uniform(-math.pi, math.pi)
        # The turn is about a random point in the central half of fixed, then a shift of up to 20 %.
        pivot = rng.uniform(-0.25, 0.25, 2) * (w, h)
        a = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        t = pivot - a.T @ pivot + rng.uniform(-0.2, 0.2, 2) * (w, h)
        m = matrix_from(angle, tuple(t), (h, w), (h, w))
        # Place fixed in the picture so that every sample of both images lies inside it (no padding).
        corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], dtype=np.float64)
        # moving pixel q shows the point of fixed m⁻¹ q: the picture at origin + that point
        inverse = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
        reach = np.vstack([corners[:, :2], (inverse @ corners.T).T])
        lo, hi = reach.min(0), reach.max(0)
        low, high = 2 - lo, side - 3 - hi
        if np.any(high < low):
            continue
        origin = rng.uniform(low, high)
        fixed.append(ndimage.map_coordinates(hema, [yy + origin[1], xx + origin[0]], order=3))
        # moving(q) = eosin at origin + m⁻¹ q
        q = np.stack([xx.ravel(), yy.ravel(), np.ones(h * w)])
        p = inverse @ q
        moving.append(
            ndimage.map_coordinates(eosin, [p[1] + origin[1], p[0] + origin[0]], order=3).reshape(h, w)
        )
        matrices.append(m)
    f = torch.tensor(np.array(fixed), dtype=torch.float32)[:, None]
    mv = torch.tensor(np.array(moving), dtype=torch.float32)[:, None]
    matrix = torch.tensor(np.array(matrices))
    zeros = torch.zeros(g.n, dtype=torch.float64)
    return RigidPairs(f, mv, matrix, zeros, torch.zeros(g.n, 2, dtype=torch.float64), zeros, ("ihc",) * g.n)


def make_pairs(g: Group):
    """(pairs with the truth, fixed, moving) of a group, noise added."""
    from rotstn.data import rigid_pairs

    if g.kind == "ihc":
        pairs = ihc_pairs(g)
        fixed, moving = pairs.fixed, pairs.moving
    else:
        pairs = rigid_pairs(
            g.n, g.size, max_shift=0.2, pivot=0.5, min_overlap=0.5, images=(g.picture,), min_std=0.04,
            seed=g.seed,
        )  # fmt: skip
        lo = pairs.fixed.amin((1, 2, 3), keepdim=True)
        hi = pairs.fixed.amax((1, 2, 3), keepdim=True)
        fixed = (pairs.fixed - lo) / (hi - lo)
        moving = intensity_map(g.kind, ((pairs.moving - lo) / (hi - lo)).clamp(0, 1))
    if g.noise > 0:
        gen = torch.Generator().manual_seed(g.seed % 2**31)
        fixed = fixed + g.noise * torch.randn(fixed.shape, generator=gen)
        moving = moving + g.noise * torch.randn(moving.shape, generator=gen)
    return pairs, fixed, moving


def run(groups: list[Group], sitk_every: int) -> list[Outcome]:
    from registration import peer_simpleitk

    _, f, m = make_pairs(groups[0])
    rotstn.register(f, m, metric="mi")  # first-call costs are not per pair
    out = []
    for k, g in enumerate(groups):
        try:
            pairs, fixed, moving = make_pairs(g)
        except ValueError:  # a picture too flat at this size
            continue
        o = Outcome(g)
        for metric in ("mi", "ncc"):
            start = time.perf_counter()
            r = rotstn.register(fixed, moving, metric=metric)
            o.seconds[metric] = time.perf_counter() - start
            o.errors[metric] = true_errors(r.matrix, pairs)
            o.scores[metric] = r.score.double().numpy()
        if sitk_every and k % sitk_every == 0:
            start, matrices = time.perf_counter(), []
            for i in range(g.n):
                f, mv = fixed[i, 0].double().numpy(), moving[i, 0].double().numpy()
                matrices.append(peer_simpleitk(f, mv, multimodal=True).convert())
            o.seconds["sitk"] = time.perf_counter() - start
            o.errors["sitk"] = true_errors(matrices, pairs)
        out.append(o)
    return out


def row(label: str, outs: list[Outcome]) -> str:
    def cat(method: str, what: str) -> np.ndarray:
        parts = [getattr(o, what)[method] for o in outs if method in getattr(o, what)]
        return np.concatenate(parts) if parts else np.zeros(0)

    cells = [label, str(sum(o.group.n for o in outs))]
    for method in ("mi", "ncc"):
        e, s = cat(method, "errors"), cat(method, "scores")
        right, trusted = e < 1, s >= rotstn.registration.TRUST
        cells += [pct(right.mean()), str(int((trusted & ~right).sum()))]
        if method == "mi":
            cells += [
                pct((trusted & right).sum() / max(right.sum(), 1)),
                f"{np.median(e[right]):.3f}" if right.any() else "–",
                f"{1e3 * sum(o.seconds['mi'] for o in outs) / len(e):.0f}",
            ]
    sitk = [o for o in outs if "sitk" in o.seconds]
    if sitk:
        e = np.concatenate([o.errors["sitk"] for o in sitk])
        n = sum(o.group.n for o in sitk)
        t_sitk = sum(o.seconds["sitk"] for o in sitk)
        t_mi = sum(o.seconds["mi"] for o in sitk)
        mi_right = np.concatenate([o.errors["mi"] for o in sitk]) < 1
        cells += [
            f"{n}",
            pct((e < 1).mean()),
            pct(mi_right.mean()),
            f"{1e3 * t_sitk / n:.0f}",
            f"{t_sitk / t_mi:.1f}×",
        ]
    else:
        cells += ["0", "–", "–", "–", "–"]
    return "| " + " | ".join(cells) + " |"


def report(outs: list[Outcome], seed: int) -> None:
    print(
        f"\nseed {seed}: {sum(o.group.n for o in outs)} pairs; success = largest displacement error < 1 px; "
        f"trusted = score ≥ {rotstn.registration.TRUST}"
    )
    print(
        "| family | pairs | MI success | MI trusted & wrong | MI right trusted | MI median error px (right) "
        "| MI ms/pair | NCC success | NCC trusted & wrong | SimpleITK pairs | SimpleITK success "
        "| MI success (same pairs) | SimpleITK ms/pair | SimpleITK / MI time |"
    )
    print("|---" * 14 + "|")
    noises = sorted({o.group.noise for o in outs})
    for level in noises:
        for kind in (*MAPS, "ihc"):
            sub = [o for o in outs if o.group.kind == kind and o.group.noise == level]
            if sub:
                print(row(f"{kind} σ {level:g}", sub))
    print(row("all synthetic maps", [o for o in outs if o.group.kind != "ihc"]))
    print(row("all", outs))


def main(argv: list[str] | None = None) -> None:
    import registration
    from _machine import machine_line

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pairs", type=int, default=4, help="pairs a group (one picture, size and map)")
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.05])
    p.add_argument("--pictures", type=int, default=None, help="a random subset of this many pictures")
    p.add_argument("--sitk-every", type=int, default=3, help="SimpleITK on every N-th group (0: never)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    registration.THREADS = args.threads
    print(machine_line())
    versions = {"rotstn": rotstn.__version__, "torch": torch.__version__}
    if args.sitk_every:
        import SimpleITK as sitk

        versions["SimpleITK"] = sitk.Version.VersionString()
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()), f"; {args.threads} threads")
    groups = draw_groups(args.seed, args.pairs, tuple(args.noise), args.pictures)
    start = time.perf_counter()
    outs = run(groups, args.sitk_every)
    report(outs, args.seed)
    side = statistics.median(g.size[0] for g in groups)
    print(f"\n{time.perf_counter() - start:.0f} s in all; median group side {side}")


if __name__ == "__main__":
    main()
