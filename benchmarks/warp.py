"""How fast is the rotation warp? rotstn.rotate against the usual recipes.

    python benchmarks/warp.py            # full grid: B 1/16/64, 127², 128², 250×333, 512², C 1-4, fp32+fp64
    python benchmarks/warp.py --quick    # B = 64, 128², C ∈ {1, 3}, float32: the target cells
    python benchmarks/warp.py --batches 64 --sizes 127 128 --channels 1 3 --dtypes float32  # a subset
    python benchmarks/warp.py --breakdown  # where the time goes at B = 64, 128² (CPU)
    ROTSTN_CPU_ISA=avx2 python benchmarks/warp.py  # the compiled kernel's AVX2 variant forced
    python benchmarks/warp.py --quick --threads all  # every CPU thread (also: --threads 1)

The first lines name what the numbers depend on: the CPU model (family, model, vector
extensions), the compiled kernel's variant in use (avx512, avx2, generic, or none: aten's
sampler), torch's build (version, aten's own CPU capability), and the caches the kernel's
limits were chosen from (``rotstn/_kernels/machine.py``).

Methods, all rotating by a (B,) angle about the image centre with
``align_corners=False``, bilinear, zero padding (``--methods`` picks the columns; plain, rotstn
and kornia by default):

* ``plain``: ``rotstn.rotation_matrix`` + ``F.affine_grid`` + ``F.grid_sample``,
  the aspect-correct textbook recipe every ratio is measured against;
* ``rotstn``: ``rotstn.rotate`` with its automatic backend (the CPU fast path on
  CPU tensors, with the compiled kernel where it could be built; run with
  ``ROTSTN_NO_COMPILE=1`` to time the aten-based fast path instead);
* ``kornia``: ``kornia.geometry.transform.rotate`` (degrees, converted outside
  the timed call);
* ``reference`` (opt-in): ``rotstn.rotate`` with the reference backend forced (grid by
  broadcasting + ``F.grid_sample``), to show what the fast path itself buys;
* ``compiled`` (opt-in): ``torch.compile`` of ``plain`` (static shapes, one compile per
  cell, compile time excluded); cells where it fails say so.

``fwd`` is inference (no tensor requires grad). ``fwd+bwd`` is forward and
``backward`` with gradients to the image and the angle; gradients are reset to
None between calls, as ``optimizer.zero_grad()`` does. Each cell times the
methods round-robin, drops calls during which this process waited for a CPU
(Linux schedstat; the machine may be shared) and reports the median of the
clean calls; the ratio is plain's median over the method's (above 1
is faster than plain). ``copy`` is the time to read the input and write an
output of the same size once (``out.copy_(x)``, torch's threads): no warp can
beat it, so it shows each row's distance to the memory limit. GB/s is the
minimal traffic over the median time: read the input and write the output for
``fwd``; in addition read the output gradient and the input again and write the
input gradient for ``fwd+bwd``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _machine import machine_line, tuning_line

import rotstn
from rotstn import _kernels

Method = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def plain(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    m = rotstn.rotation_matrix(angle, tuple(x.shape[-2:])).to(x.dtype)
    grid = F.affine_grid(m, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def fast(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    return rotstn.rotate(x, angle)


def reference(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    with _kernels.use_backend("reference"):
        return rotstn.rotate(x, angle)


def kornia_rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    import kornia

    return kornia.geometry.transform.rotate(x, degrees, align_corners=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(f: Method, x: torch.Tensor, angle: torch.Tensor, backward: bool) -> Callable[[], None]:
    """One timed call: forward only under no_grad, or forward + backward to image and angle."""
    if not backward:

        def step() -> None:
            with torch.no_grad():
                f(x, angle)

        return step
    xg, ag = x.detach().requires_grad_(), angle.detach().requires_grad_()
    grad_out = torch.rand_like(x)

    def step() -> None:
        xg.grad = ag.grad = None
        f(xg, ag).backward(grad_out)

    return step


def run_delay_ns() -> int:
    """Nanoseconds this process's threads have spent runnable but waiting for a CPU (Linux schedstat)."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/schedstat") as f:
            total += int(f.read().split()[1])
    return total


def time_cell(
    steps: dict[str, Callable[[], object]],
    device: torch.device,
    budget_s: float,
    min_clean: int = 7,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, tuple[float, bool]]:
    """Median seconds per call of each step, timed round-robin, and whether it is clean.

    On a shared machine other processes take our cores now and then; a call
    during which our threads waited more than 2 % of its time for a CPU is
    dropped. The median is over the clean calls when at least ``min_clean``
    of them came in within the budget, else over all calls (flagged). With
    ``clock=time.process_time`` (CPU seconds of all threads) waiting costs
    nothing and every call counts.
    """
    measure_delay = clock is time.perf_counter and os.path.exists("/proc/self/task")
    times: dict[str, list[tuple[float, bool]]] = {name: [] for name in steps}
    start = time.perf_counter()
    for step in steps.values():  # warm-up (allocator, compile)
        step()
    rounds = 0

    def enough() -> bool:
        return all(sum(clean for _, clean in ts) >= min_clean for ts in times.values())

    while rounds < min_clean or (time.perf_counter() - start < budget_s and not enough() and rounds < 2000):
        for name, step in steps.items():
            sync(device)
            delay = run_delay_ns() if measure_delay else 0
            t = clock()
            step()
            sync(device)
            dt = clock() - t
            delay = (run_delay_ns() - delay) if measure_delay else 0
            times[name].append((dt, delay <= 0.02 * dt * 1e9))
        rounds += 1
    result = {}
    for name, ts in times.items():
        clean = [dt for dt, ok in ts if ok]
        ok = len(clean) >= min_clean
        result[name] = (statistics.median(clean if ok else [dt for dt, _ in ts]), ok)
    return result


def pieces(c: int) -> dict[str, Callable[[], object]]:
    """The separately timed pieces of plain and of the fast path (B = 64, 128², float32)."""
    from rotstn._kernels import cpu

    b, s = 64, 128
    angle = torch.rand(b, generator=torch.Generator().manual_seed(0)) * 6 - 3
    center = torch.full((b, 2), (s - 1) / 2)
    theta = rotstn.rotation_matrix(angle, (s, s))
    grid = cpu._grid(angle, center, center, s, s, False, torch.float32)
    grad_grid = torch.rand(b, s, s, 2)
    x, g = torch.rand(b, c, s, s), torch.rand(b, c, s, s)
    sampler_backward = torch.ops.aten.grid_sampler_2d_backward
    kernel = {}
    if cpu.compiled.library() is not None:
        kernel = {
            "compiled kernel forward": lambda: cpu._kernel_forward(x, angle, center, center),
            "compiled kernel backward, both": lambda: cpu._kernel_backward(
                g, x, angle, center, center, True, True
            ),
            "… angle and centre only": lambda: cpu._kernel_backward(g, x, angle, center, center, False, True),
        }
    return {
        "affine_grid forward (plain)": lambda: F.affine_grid(theta, [b, c, s, s], align_corners=False),
        "affine_grid backward (plain)": lambda: torch.ops.aten.affine_grid_generator_backward(
            grad_grid, [b, c, s, s], False
        ),
        "planar grid (fast path)": lambda: cpu._grid(angle, center, center, s, s, False, torch.float32),
        "grid gradient → dθ, dc (fast path)": lambda: cpu._reduce_grid_grad(grad_grid, angle, center, False),
        "aten grid_sampler_2d": lambda: torch.grid_sampler_2d(x, grid, 0, 0, False),
        "aten grid_sampler_2d_backward, both": lambda: sampler_backward(
            g, x, grid, 0, 0, False, [True, True]
        ),
        "… grid gradient only": lambda: sampler_backward(g, x, grid, 0, 0, False, [False, True]),
        **kernel,
    }


def breakdown(budget: float, clock: Callable[[], float]) -> None:
    """Print the median time of each piece at C = 1 and C = 3."""
    meds = [time_cell(pieces(c), torch.device("cpu"), budget, clock=clock) for c in (1, 3)]
    print("| piece (B = 64, 128², float32) | C=1 ms | C=3 ms |")
    print("|---|---|---|")
    for name in meds[0]:
        print(f"| {name} | {ms(*meds[0][name])} | {ms(*meds[1][name])} |")


def ms(seconds: float, clean: bool) -> str:
    """Milliseconds, starred when too few calls ran without waiting for a CPU."""
    return f"{seconds * 1e3:.2f}" + ("" if clean else "*")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only B=64, 128x128, C in {1, 3}, float32")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64], help="batch sizes B")
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 2, 3, 4], help="channel counts C")
    parser.add_argument(
        "--sizes", nargs="+", default=["127", "128", "250x333", "512"], help="image sizes: 128 or HxW"
    )
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=("float32", "float64"))
    parser.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"], choices=("fwd", "fwd+bwd"))
    parser.add_argument(
        "--threads", default="2", help="torch.set_num_threads (CPU): a number, or 'all' for every CPU thread"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=10.0,
        help="most seconds per cell and pass spent collecting clean calls",
    )
    parser.add_argument("--max-pixels", type=int, default=64 * 512 * 512, help="skip cells with B*H*W above")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["plain", "rotstn", "kornia"],
        choices=("plain", "rotstn", "reference", "kornia", "compiled"),
        help="columns (plain always; add reference and compiled = torch.compile(plain) for more)",
    )
    parser.add_argument("--breakdown", action="store_true", help="time the pieces instead (CPU)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: CPU seconds of all threads per call (CPU only; for a busy machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1 if args.threads == "all" else int(args.threads))
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.breakdown:
        print(machine_line())
        breakdown(args.budget, clock)
        return

    cuda = torch.cuda.is_available() and args.clock == "wall"
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    batches, channels, sizes = args.batches, args.channels, [parse_size(s) for s in args.sizes]
    cpu_dtypes = [getattr(torch, name) for name in args.dtypes]
    if args.quick:
        batches, channels, sizes, cpu_dtypes = (64,), (1, 3), ((128, 128),), [torch.float32]
    passes = [p == "fwd+bwd" for p in args.passes]
    names = ["plain"] + [n for n in ("rotstn", "reference", "kornia", "compiled") if n in args.methods]
    print(machine_line())
    print(tuning_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.clock} clock")
    skipped = []
    for device in devices:
        dtypes = cpu_dtypes + ([torch.float16] if device.type == "cuda" else [])
        for dtype in dtypes:
            print(f"\n### {device.type}, {str(dtype).removeprefix('torch.')}\n")
            header = "| B | C | H×W | pass | copy ms | " + " | ".join(f"{n} ms" for n in names)
            header += " | " + " | ".join(f"{n} ×" for n in names[1:]) + " | rotstn GB/s | plain GB/s |"
            print(header)
            print("|" + "---|" * (header.count("|") - 1))
            for b in batches:
                for c in channels:
                    for hw in sizes:
                        if b * hw[0] * hw[1] > args.max_pixels:
                            skipped.append(f"{device.type} {dtype} B={b} C={c} {size_label(*hw)}")
                            continue
                        run_cell(device, dtype, b, c, hw, names, args.budget, clock, passes)
    if args.clock == "wall":
        print("\n* fewer than 7 calls ran without waiting for a CPU: median of all calls, less reliable.")
    if skipped:
        print(f"Skipped (B·H·W above --max-pixels={args.max_pixels}): " + ", ".join(skipped))


def parse_size(text: str) -> tuple[int, int]:
    """``128`` (square) or ``250x333`` (H×W)."""
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def size_label(h: int, w: int) -> str:
    return f"{h}²" if h == w else f"{h}×{w}"


def run_cell(
    device: torch.device,
    dtype: torch.dtype,
    b: int,
    c: int,
    hw: tuple[int, int],
    names: list[str],
    budget: float,
    clock: Callable[[], float],
    passes: list[bool],
) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(b, c, *hw, generator=gen).to(device, dtype)
    angle = (torch.rand(b, generator=gen) * 6 - 3).to(device, dtype)
    degrees = torch.rad2deg(angle)
    for backward in passes:
        every: dict[str, tuple[Method, torch.Tensor]] = {
            "plain": (plain, angle),
            "rotstn": (fast, angle),
            "reference": (reference, angle),
            "kornia": (kornia_rotate, degrees),
        }
        methods = {name: every[name] for name in names if name in every}
        if "compiled" in names:
            torch._dynamo.reset()
            methods["compiled"] = (torch.compile(plain, dynamic=False), angle)
        steps = {}
        for name, (f, a) in methods.items():
            step = make_step(f, x, a, backward)
            try:
                step()
            except Exception as err:  # a method that fails is reported in the table, not fatal
                print(f"<!-- {name} failed: {type(err).__name__}: {str(err).splitlines()[0][:100]} -->")
                continue
            steps[name] = step
        dst = torch.empty_like(x)
        steps["copy"] = lambda dst=dst: dst.copy_(x)
        timed = time_cell(steps, device, budget, clock=clock)
        med = {name: t for name, (t, _) in timed.items()}
        traffic = x.numel() * x.element_size() * (5 if backward else 2)
        cells = [ms(*timed[n]) if n in med else "fails" for n in names]
        ratios = [
            f"{med['plain'] / med[n]:.2f}" + ("" if timed["plain"][1] and timed[n][1] else "*")
            if n in med
            else "–"
            for n in names[1:]
        ]
        gbs = [f"{traffic / med[n] / 1e9:.1f}" if n in med else "–" for n in ("rotstn", "plain")]
        row = [str(b), str(c), size_label(*hw), "fwd+bwd" if backward else "fwd", ms(*timed["copy"]), *cells]
        row += [*ratios, *gbs]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
