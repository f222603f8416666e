"""What gradient does the identity angle get? Bilinear's kink at θ = 0.

    python benchmarks/identity_gradient.py

For crops of bundled pictures and a target rotated by ±δ, prints the autograd
derivative of the MSE at θ = 0 next to the one-sided finite differences of the
same loss (left, right) and the bicubic derivative. The bilinear derivative is
shown for the automatic warp backend and for the reference one: at θ = 0 every
sample sits on a kink and which side each pixel takes depends on how its
normalised coordinate rounds, so the two can differ when a side is not a power
of two (at 128 × 128 they are equal).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from skimage import data

import rotstn
from rotstn import _kernels


def loss(x: torch.Tensor, goal: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    return F.mse_loss(rotstn.rotate(x, theta, mode=mode), goal)


def main() -> None:
    h = 1e-5
    print(
        "| image | size | target | autograd (bilinear) | reference backend | left FD | right FD "
        "| bicubic autograd |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (rows, cols) in itertools.product(("camera", "coins", "moon"), ((128, 128), (100, 120))):
        img = torch.from_numpy(getattr(data, name)()).double() / 255
        x = img[50 : 50 + rows, 50 : 50 + cols][None, None]
        for target in (0.05, -0.05, 0.5):
            goal = rotstn.rotate(x, target, mode="bicubic")
            th = torch.zeros((), dtype=torch.float64, requires_grad=True)
            loss(x, goal, th, "bilinear").backward()
            thr = torch.zeros((), dtype=torch.float64, requires_grad=True)
            with _kernels.use_backend("reference"):
                loss(x, goal, thr, "bilinear").backward()
            thc = torch.zeros((), dtype=torch.float64, requires_grad=True)
            loss(x, goal, thc, "bicubic").backward()
            with torch.no_grad():
                zero, pos, neg = (
                    loss(x, goal, torch.tensor(t, dtype=torch.float64), "bilinear") for t in (0.0, h, -h)
                )
            print(
                f"| {name} | {rows}×{cols} | {target:+.2f} | {th.grad.item():+.4f} | {thr.grad.item():+.4f} "
                f"| {((zero - neg) / h).item():+.4f} "
                f"| {((pos - zero) / h).item():+.4f} | {thc.grad.item():+.4f} |"
            )


if __name__ == "__main__":
    main()
