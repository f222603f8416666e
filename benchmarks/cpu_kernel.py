"""The compiled CPU kernel against the aten-based fast path, cell by cell.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_kernel.py

Both columns are ``rotstn.rotate`` (bilinear, zero padding, float32, torch's
thread count); ``kernel`` is the compiled kernel (the variant ``ROTSTN_CPU_ISA``
picks, else the best this CPU runs), ``aten path`` disables it as
``ROTSTN_NO_COMPILE=1`` would. Each cell is the
median CPU time (``time.process_time``: all threads, waiting for a CPU not
counted) of alternating rounds; ``fwd+bwd`` asks for gradients to image and
angle. Prints a markdown table; ratio above 1 means the kernel is faster.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import rotstn
from rotstn._kernels import cpu


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    library = cpu.compiled.library()
    if library is None:
        raise SystemExit("the compiled kernel could not be built here (see ROTSTN_DEBUG=1)")

    def use_kernel(on: bool) -> None:
        cpu.compiled.library = (lambda: library) if on else (lambda: None)

    isa = library.rotstn_isa().decode()
    print(f"torch {torch.__version__}, {args.threads} CPU threads, cpu clock, kernel variant {isa}\n")
    print("| B | C | H×W | pass | kernel ms | aten path ms | aten path / kernel |")
    print("|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for b, s, c in [(b, s, c) for b in (1, 8, 64) for s in (32, 64, 128, 256, 512) for c in (1, 3)]:
        if b * s * s > 64 * 128 * 128:
            continue
        x, angle = torch.rand(b, c, s, s, generator=gen), torch.rand(b, generator=gen) * 6 - 3
        repeats = max(7, min(200, int(3e6 / (b * c * s * s))))
        for name in ("fwd", "fwd+bwd"):

            def call(x=x, angle=angle, name=name) -> None:
                if name == "fwd":
                    rotstn.rotate(x, angle)
                    return
                leaves = x.detach().requires_grad_(), angle.detach().requires_grad_()
                rotstn.rotate(*leaves).sum().backward()

            rounds = {True: [], False: []}
            for on in (True, False, True, False):
                use_kernel(on)
                rounds[on].append(median_ms(call, repeats))
            kernel, aten = min(rounds[True]), min(rounds[False])
            print(f"| {b} | {c} | {s}² | {name} | {kernel:.3f} | {aten:.3f} | {aten / kernel:.2f} |")
    use_kernel(True)


if __name__ == "__main__":
    main()
