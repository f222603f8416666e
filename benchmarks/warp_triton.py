"""How fast is the fused Triton warp on an NVIDIA GPU? Against the plain eager recipe.

    python benchmarks/warp_triton.py              # the full table (CUDA + triton needed)
    python benchmarks/warp_triton.py --quick      # only (256, 3, 256, 256), the target cell
    python benchmarks/warp_triton.py --smoke      # tiny sizes on CPU under the interpreter:
                                                  # checks this script, its timings mean nothing

Sizes are those of ``benchmarks/warp.py`` (B ∈ {1, 64, 256}, C ∈ {1, 3},
64² to 512²), which include (256, 3, 256, 256), in float32 and bfloat16.
Methods, rotating by a (B,) angle about the image centre, bilinear, zero
padding, ``align_corners=False``:

* ``plain``: ``rotstn.rotation_matrix`` + ``F.affine_grid`` + ``F.grid_sample``
  in eager mode, the recipe every ratio is measured against;
* ``triton``: ``rotstn.rotate`` with the Triton backend forced.

``fwd`` is inference (no tensor requires grad); ``fwd+bwd`` is forward and
backward with gradients to the image and the angle. Times are medians of
``triton.testing.do_bench`` (CUDA events, L2 flushed between calls). GB/s
is the minimal traffic over the median time, as in ``benchmarks/warp.py``:
read the input and write the output (``fwd``), plus read the output gradient
and the input and write the input gradient (``fwd+bwd``); % peak divides it
by the memory bandwidth of the device (from its properties, ``--peak-gbs``
overrides). ``max |Δ|`` is the largest difference from the reference backend.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from warp import make_step, plain, reference  # the same recipes and timed step as benchmarks/warp.py

import rotstn
from rotstn._kernels import triton_warp, use_backend

# Theoretical HBM bandwidth in GB/s, for torch builds whose device properties
# lack the memory clock and bus width.
KNOWN_PEAK_GBS = {"H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H200": 4800.0, "A100": 2039.0}


def fused(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    with use_backend("triton"):
        return rotstn.rotate(x, angle)


def peak_gbs(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    return next((gbs for name, gbs in KNOWN_PEAK_GBS.items() if name in props.name), None)


def median_ms(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(step, warmup=25, rep=200, return_mode="median")
    step()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def run_cell(
    device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int], peak: float | None
) -> list[tuple[str, float, float, float]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=gen).to(device, dtype)
    angle = (torch.rand(shape[0], generator=gen) * 6 - 3).to(device)
    with torch.no_grad():
        error = (fused(x, angle).float() - reference(x, angle).float()).abs().max().item()
    b, c, h, w = shape
    rows = []
    for backward in (False, True):
        ms = {
            name: median_ms(make_step(f, x, angle, backward), device)
            for name, f in (("plain", plain), ("triton", fused))
        }
        traffic = x.numel() * x.element_size() * (5 if backward else 2)
        gbs = traffic / (ms["triton"] * 1e-3) / 1e9
        ratio = ms["plain"] / ms["triton"]
        pct = f"{100 * gbs / peak:.0f} %" if peak else "?"
        row = [str(b), str(c), f"{h}×{w}", "fwd+bwd" if backward else "fwd", f"{ms['plain']:.3f}"]
        row += [f"{ms['triton']:.3f}", f"{ratio:.2f}", f"{gbs:.3g}", pct, f"{error:.1e}"]
        print("| " + " | ".join(row) + " |", flush=True)
        rows.append(("fwd+bwd" if backward else "fwd", ratio, gbs, error))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only (256, 3, 256, 256)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run under the interpreter")
    parser.add_argument("--peak-gbs", type=float, default=None, help="memory bandwidth of the device, GB/s")
    args = parser.parse_args()
    if not triton_warp.available():
        sys.exit("benchmarks/warp_triton.py needs triton: pip install 'rotstn[triton]'")
    if args.smoke:
        device, shapes = torch.device("cpu"), [(2, 3, 16, 16)]
    elif not torch.cuda.is_available():
        sys.exit(
            "benchmarks/warp_triton.py needs a CUDA device and none was found; "
            "without one, tests/test_triton.py checks the kernels under the Triton interpreter"
        )
    else:
        device = torch.device("cuda")
        grid = [(b, c, s, s) for b in (1, 64, 256) for c in (1, 3) for s in (64, 128, 256, 512)]
        shapes = [(256, 3, 256, 256)] if args.quick else grid
    peak = None if device.type == "cpu" else peak_gbs(device, args.peak_gbs)
    name = "CPU (interpreter smoke run)" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"{name}, torch {torch.__version__}, peak {peak or '?'} GB/s")
    worst = {}
    for dtype in (torch.float32, torch.bfloat16):
        print(f"\n### {str(dtype).removeprefix('torch.')}\n")
        print("| B | C | H×W | pass | plain ms | triton ms | × plain | triton GB/s | % peak | max abs Δ |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for shape in shapes:
            for pass_, ratio, gbs, _ in run_cell(device, dtype, shape, peak):
                key = (dtype, pass_)
                worst[key] = min(worst.get(key, ratio), ratio)
                if shape == (256, 3, 256, 256) and dtype == torch.float32 and pass_ == "fwd" and peak:
                    print(f"<!-- target: fwd fp32 (256, 3, 256, 256) at {100 * gbs / peak:.0f} % of peak -->")
    print("\nSlowest ratio to plain per dtype and pass (target: never below 1; fwd+bwd >= 3):")
    for (dtype, pass_), ratio in worst.items():
        print(f"- {str(dtype).removeprefix('torch.')} {pass_}: {ratio:.2f}×")


if __name__ == "__main__":
    main()
