"""Time and peak memory of one large registration, against the size of its input.

    python benchmarks/registration_memory.py [--size 2048] [--threads 2]

The pair (rotstn.data.rigid_pairs, seed 0) is made in a child process and
handed over through a temporary file, so that this process's peak resident
memory (``ru_maxrss``) is reached by ``register`` alone; the table gives it
above the resident memory just before the call.

torch's OpenMP threads keep their default wait policy (``benchmarks/registration.py`` says why).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import rotstn


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pair.pt"
        code = (
            "import torch, sys; from rotstn.data import rigid_pairs; "
            f"p = rigid_pairs(1, ({args.size}, {args.size}), seed=0); "
            "torch.save({'fixed': p.fixed, 'moving': p.moving, 'matrix': p.matrix}, sys.argv[1])"
        )
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
        pair = torch.load(path)
    fixed, moving = pair["fixed"], pair["moving"]
    warm = slice(0, 256)
    rotstn.register(fixed[..., warm, warm].contiguous(), moving[..., warm, warm].contiguous())
    start_rss = _resident()
    start = time.perf_counter()
    result = rotstn.register(fixed, moving)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size_in = (fixed.numel() + moving.numel()) * fixed.element_size()
    err = (result.matrix.double() - pair["matrix"]).abs().max().item()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| size | wall s | input MiB | peak RSS above start MiB | × input | max matrix error |")
    print("|---|---|---|---|---|---|")
    above = max(peak - start_rss, 0)
    print(
        f"| {args.size}² | {seconds:.2f} | {size_in / 2**20:.0f} | {above / 2**20:.0f} "
        f"| {above / size_in:.1f} | {err:.2e} |"
    )


if __name__ == "__main__":
    main()
