"""Stack registration: rotstn.register_stack against pystackreg on stacks with known transforms.

    PYTHONPATH=. python benchmarks/stack.py [--quick] [--threads 2] [--repeat 3] [--memory-mb 200]
    PYTHONPATH=. python benchmarks/stack.py --figure docs/img/stack_walk.png   # the figure only
    PYTHONPATH=. python benchmarks/stack.py --tuning   # rotstn's options: polish, anchor_every, fine_points
    PYTHONPATH=. python benchmarks/stack.py --dask [--quick] [--repeat 3] [--dask-gb 4 --worker-memory 1GiB]

Stacks are cut by scipy (``ndimage.affine_transform``, cubic, independent of
rotstn) from bundled scikit-image pictures, so every frame's true map is known:

* ``walk-192``: 300 frames of 192², a random walk of the angle (σ 2° a frame)
  and the translation (σ 1 px a frame, kept within ±20 px), two sudden turns
  (+97° at frame 100, -143° at frame 200), Gaussian noise σ 0.02 (picture in [0, 1]);
* ``walk-512``: 40 frames of 512², the same walk (a sudden turn of +71° at frame 20).

For each reference (``first``, ``previous``) and each method: success (largest
displacement of the frame's corners from the truth under 1 px), median
displacement, the largest (drift shows there with ``previous``), frames/s
(wall clock, the whole stack, after one warm-up batch of rotstn; with
``--repeat N`` the fastest of N runs, as other jobs on a shared machine only
ever slow a run down). pystackreg is
``StackReg(RIGID_BODY).register_stack`` with the same reference.

Memory: a ``--memory-mb`` (default 200 MB, not the issue's 2 GB, to keep the
run short on a shared machine) uint16 TIFF of 1024² frames is written in /tmp
and registered through ``rotstn register-stack`` in a child process; the table
gives the child's peak resident memory (``ru_maxrss``) next to the file's size.

With ``--dask`` (``pip install rotstn[dask]``), the Zarr stack on a ``distributed.LocalCluster``
of 1 and 2 worker processes (one thread each) against the same call in this process, and a Zarr
stack several times larger than a worker's memory limit:

* throughput: ``walk-192`` (``--dask-frames``, default 480 frames) as a uint16 Zarr array in /tmp,
  registered in parts of ``--part-size`` (64) frames, frames/s (the fastest of ``--repeat``, after
  each worker has registered one warm-up part) and the largest difference of the mapped corners
  from the in-process result (which uses the same parts);
* memory: ``--dask-gb`` (default 4) GB of uint16 1024² frames as an uncompressed Zarr array, two
  workers of ``--worker-memory`` (default 1 GiB) each, the aligned stack written to Zarr by the
  workers; the peak resident memory of each worker process (``ru_maxrss``) and whether a worker was
  restarted (the nanny kills one that passes 95 % of its limit).

torch's OpenMP threads keep their default wait policy (``benchmarks/registration.py`` says why).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _machine import machine_line
from scipy import ndimage

import rotstn
from rotstn.data import bundled_image


def to_picture(angle: float, t: np.ndarray, size: int, source: tuple[int, int]) -> np.ndarray:
    """3×3: frame pixel (x, y, 1) -> picture pixel: turned by ``angle`` about the centres, shifted by t."""
    c, s = math.cos(angle), math.sin(angle)
    a = np.array([[c, -s], [s, c]])
    c_out = np.full(2, (size - 1) / 2)
    c_in = np.array([(source[1] - 1) / 2, (source[0] - 1) / 2])
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = a, c_in - a @ (c_out + t)
    return m


def make_stack(
    picture: np.ndarray,
    n: int,
    size: int,
    turns: dict[int, float],
    seed: int,
    noise: float,
    photometric: bool = False,
):
    """Frames (N, size, size) float32 and the true maps (N, 3, 3) from frame 0 pixels to frame i pixels.

    ``photometric``: each frame gets its own random gamma (0.6-1.6), contrast (0.6-1.0) and offset
    (0-0.2), as ``rotstn.data.rotated_pairs(photometric=True)`` gives its fixed images.
    """
    rng = np.random.default_rng(seed)
    pixels = np.random.default_rng([seed, 1])  # photometric changes: the same walk with or without
    angle, t = 0.0, np.zeros(2)
    frames, maps = [], []
    for i in range(n):
        if i:
            angle += math.radians(rng.normal(0, 2)) + math.radians(turns.get(i, 0.0))
            t = np.clip(t + rng.normal(0, 1, 2), -20, 20)
        m = to_picture(angle, t, size, picture.shape)
        frame = ndimage.affine_transform(
            picture, m[:2, :2][::-1, ::-1], offset=m[:2, 2][::-1], output_shape=(size, size), order=3
        )
        if photometric:
            gamma = math.exp(pixels.uniform(math.log(0.6), math.log(1.6)))
            frame = pixels.uniform(0.6, 1.0) * np.clip(frame, 0.0, 1.0) ** gamma + pixels.uniform(0.0, 0.2)
        frames.append(frame + noise * rng.standard_normal(frame.shape))
        maps.append(m)
    truth = np.stack([np.linalg.inv(m) @ maps[0] for m in maps])
    return np.stack(frames).astype(np.float32), truth


def displacement(matrix: np.ndarray, truth: np.ndarray, size: int) -> np.ndarray:
    """Largest distance (pixels) between where two maps send the frame's corners, per frame."""
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]], float).T
    return np.linalg.norm(matrix[:, :2] @ corners - truth[:, :2] @ corners, axis=1).max(1)


def run_rotstn(frames: np.ndarray, reference: str, batch_size: int) -> np.ndarray:
    result = rotstn.register_stack(torch.from_numpy(frames), reference=reference, batch_size=batch_size)
    return result.matrix.numpy()


def run_pystackreg(frames: np.ndarray, reference: str) -> np.ndarray:
    from pystackreg import StackReg

    # tmats map reference (x = column, y = row) to the frame's pixels: rotstn's matrix convention.
    return StackReg(StackReg.RIGID_BODY).register_stack(
        frames.astype(np.float64), reference=reference, axis=0
    )


def accuracy_table(stacks: dict, references: list[str], batch_size: int, repeat: int = 1) -> list[str]:
    try:
        import pystackreg  # noqa: F401

        methods = ["rotstn", "pystackreg"]
    except ImportError:
        methods = ["rotstn"]
        print("pystackreg is not installed: its rows are left out (pip install pystackreg)")
    rows = [
        "| stack | reference | method | success (< 1 px) | median displacement (px) | max (px) | frames/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (frames, truth) in stacks.items():
        size = frames.shape[-1]
        # one warm-up batch of this frame size (torch's first calls allocate and dispatch)
        run_rotstn(frames[: batch_size + 1], "first", batch_size)
        for reference in references:
            for method in methods:
                seconds = math.inf
                for _ in range(repeat):  # the fastest of `repeat` runs: other jobs share the CPU
                    start = time.perf_counter()
                    if method == "rotstn":
                        matrix = run_rotstn(frames, reference, batch_size)
                    else:
                        matrix = run_pystackreg(frames, reference)
                    seconds = min(seconds, time.perf_counter() - start)
                d = displacement(matrix, truth, size)
                rows.append(
                    f"| {name} | {reference} | {method} | {100 * np.mean(d < 1):.1f} % | "
                    f"{np.median(d):.3f} | {d.max():.3f} | {len(frames) / seconds:.1f} |"
                )
                print(rows[-1], flush=True)
    return rows


def memory_table(megabytes: int, batch_size: int) -> list[str]:
    import tifffile

    size = 1024
    n = max(1, megabytes * 2**20 // (size * size * 2))
    picture = bundled_image("retina")
    frames, _ = make_stack(picture, 2, size, {}, seed=1, noise=0.0)
    pages = np.clip(np.rint(frames * 60000), 0, 65535).astype(np.uint16)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        path = Path(tmp) / "big.tif"
        with tifffile.TiffWriter(path, imagej=True) as w:
            for i in range(n):
                w.write(pages[i % 2][None], contiguous=True)
        code = (
            "import resource, sys; from rotstn.cli import main; "
            "rc = main(sys.argv[1:]); "
            "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
        )
        cmd = [sys.executable, "-c", code, "register-stack", str(path), "-o", str(Path(tmp) / "out.tif")]
        cmd += ["--transforms", str(Path(tmp) / "t.csv"), "--batch-size", str(batch_size), "-q"]
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
        peak = int(out.stdout.split("maxrss")[-1]) * 1024
        file_mb = path.stat().st_size / 2**20
    batch_mb = batch_size * size * size * 4 / 2**20
    return [
        "| TIFF (uint16, 1024² frames) | frames | batch | one batch, float32 | peak RSS | frames/s |",
        "|---|---|---|---|---|---|",
        f"| {file_mb:.0f} MB | {n} | {batch_size} | {batch_mb:.0f} MB | {peak / 2**20:.0f} MB | "
        f"{n / seconds:.2f} |",
    ]


def tuning_tables(stacks: dict, batch_size: int) -> list[str]:
    """rotstn alone: drift of ``previous`` with and without the polish, and ``fine_points`` on 512²."""
    rows = [
        "| stack | reference | options | success (< 1 px) | median displacement (px) | max (px) | "
        "frames on frame 0 | frames/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    (n192, s192), (n512, s512) = list(stacks.items())[:2]
    runs = [
        (n192, s192, "previous", {"polish": False}),
        (n192, s192, "previous", {"polish": False, "anchor_every": 50}),
        (n192, s192, "previous", {"polish": False, "anchor_every": 20}),
        (n192, s192, "previous", {}),
        (n192, s192, "first", {"track": False}),
        (n512, s512, "first", {"fine_points": 8192}),
        (n512, s512, "first", {"fine_points": 16384}),
        (n512, s512, "first", {}),
        (n512, s512, "first", {"fine_points": 65536}),
        (n512, s512, "first", {"track": False}),
    ]
    for name, (frames, truth), reference, options in runs:
        start = time.perf_counter()
        result = rotstn.register_stack(
            torch.from_numpy(frames), reference=reference, batch_size=batch_size, **options
        )
        seconds = time.perf_counter() - start
        d = displacement(result.matrix.numpy(), truth, frames.shape[-1])
        text = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
        rows.append(
            f"| {name} | {reference} | {text} | {100 * np.mean(d < 1):.1f} % | {np.median(d):.3f} | "
            f"{d.max():.3f} | {int(result.anchored.sum())} | {len(frames) / seconds:.1f} |"
        )
        print(rows[-1], flush=True)
    return rows


def figure(path: str, stack: tuple[np.ndarray, np.ndarray], batch_size: int) -> None:
    """A few frames before/after and the recovered angle and translation against the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames, truth = stack
    size = frames.shape[-1]
    result = rotstn.register_stack(torch.from_numpy(frames), reference="first", batch_size=batch_size)
    aligned = torch.cat(list(result.aligned(torch.from_numpy(frames), batch_size=batch_size)))[:, 0]
    true_angle, true_t = rotstn.registration._stack.matrix_parameters(
        torch.from_numpy(truth[:, :2].copy()), (size, size), (size, size)
    )
    show = [0, 99, 100, 200, len(frames) - 1]
    fig = plt.figure(figsize=(12, 6.4))
    grid = fig.add_gridspec(3, len(show), height_ratios=[1, 1, 1.1])
    for j, i in enumerate(show):
        for row, (img, label) in enumerate(((frames[i], "frame"), (aligned[i].numpy(), "aligned"))):
            ax = fig.add_subplot(grid[row, j])
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{label} {i}", fontsize=9)
            ax.axis("off")
    ax = fig.add_subplot(grid[2, :3])
    x = np.arange(len(frames))
    ax.plot(x, np.degrees(np.unwrap(true_angle.numpy())), "k-", lw=3, alpha=0.3, label="truth")
    ax.plot(x, np.degrees(np.unwrap(result.angle.numpy())), "C0.", ms=2, label="rotstn")
    ax.set_xlabel("frame")
    ax.set_ylabel("angle (deg)")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[2, 3:])
    for k, name in enumerate(("tx", "ty")):
        ax.plot(x, true_t[:, k].numpy(), "k-", lw=3, alpha=0.3)
        ax.plot(x, result.translation[:, k].numpy(), f"C{k + 1}.", ms=2, label=f"{name} rotstn (grey: truth)")
    ax.set_xlabel("frame")
    ax.set_ylabel("pixels")
    ax.legend(fontsize=8)
    fig.suptitle("register_stack(reference='first') on walk-192: a random walk with turns of +97° and -143°")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    d = displacement(result.matrix.numpy(), truth, size)
    print(f"{path}: max displacement {d.max():.3f} px, median {np.median(d):.3f} px")


def _warm() -> str:
    """On a worker: import rotstn and register one small stack (torch's first calls, the C kernels)."""
    import rotstn
    from rotstn.data import bundled_image

    img = torch.tensor(bundled_image("camera")[100:164, 150:214], dtype=torch.float32)
    rotstn.register_stack(rotstn.warp(img.expand(3, 1, 64, 64), torch.tensor([0.0, 1.0, -2.0])), client=False)
    return rotstn.__file__


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def dask_throughput(n: int, part_size: int, batch_size: int, repeat: int) -> list[str]:
    """In process (1 and 2 torch threads) and on 1 and 2 workers, the runs interleaved ``repeat`` times."""
    import contextlib

    import zarr
    from distributed import Client

    from rotstn import io
    from rotstn.registration._stack_parts import local_cluster

    frames, truth = make_stack(bundled_image("astronaut"), n, 192, {100: 97.0, 200: -143.0}, 0, 0.02)
    data = np.clip(np.rint(frames * 60000), 0, 65535).astype(np.uint16)
    memory = torch.from_numpy(data.astype(np.float32))[:, None]
    kw = {"part_size": part_size, "batch_size": batch_size}
    engines = [
        "in process, 1 torch thread",
        "in process, 2 torch threads",
        "Dask, 1 worker",
        "Dask, 2 workers",
    ]
    best = dict.fromkeys(engines, math.inf)
    cpu = dict.fromkeys(engines, math.inf)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp, contextlib.ExitStack() as stack:
        path = Path(tmp) / "walk.zarr"
        zarr.create_array(path, data=data, chunks=(16, 192, 192))
        clients = {}
        for workers in (1, 2):
            cluster = stack.enter_context(local_cluster(workers))  # as `register-stack --workers N`
            clients[f"Dask, {workers} worker{'s' if workers > 1 else ''}"] = stack.enter_context(
                Client(cluster)
            )
        for client in clients.values():
            client.run(_warm)
        rotstn.register_stack(memory[: batch_size + 1], client=False)  # warm-up in this process
        loads = []
        for _ in range(repeat):
            for name in engines:
                client = clients.get(name)
                torch.set_num_threads(2 if "2 torch" in name else 1)
                loads.append(os.getloadavg()[0])
                used = sum(client.run(_cpu_seconds).values()) if client else _cpu_seconds()
                start = time.perf_counter()
                got = rotstn.register_stack(io.open_stack(path), client=client or False, **kw)
                seconds = time.perf_counter() - start
                used = (sum(client.run(_cpu_seconds).values()) if client else _cpu_seconds()) - used
                best[name], cpu[name] = min(best[name], seconds), min(cpu[name], used)
                results[name] = got
    want = results[engines[0]].matrix.numpy()
    rows = [
        f"| engine (walk-192 as Zarr, {n} frames, parts of {part_size}) | frames/s (wall) | "
        "frames per CPU second | max corner difference from in process, 1 thread (px) | success (< 1 px) |",
        "|---|---|---|---|---|",
    ]
    for name in engines:
        got = results[name].matrix.numpy()
        d = displacement(got, want, 192).max()
        ok = np.mean(displacement(got, truth, 192) < 1)
        rows.append(f"| {name} | {n / best[name]:.1f} | {n / cpu[name]:.1f} | {d:.1e} | {100 * ok:.1f} % |")
    rows.append(f"\n1-minute load average before the runs: {min(loads):.1f} to {max(loads):.1f}")
    return rows


def dask_memory(gigabytes: float, worker_memory: str, batch_size: int) -> list[str]:
    import resource

    import zarr
    from distributed import Client

    from rotstn import io
    from rotstn.registration._stack_parts import local_cluster

    size = 1024
    n = max(2, int(gigabytes * 2**30) // (size * size * 2))
    frames, _ = make_stack(bundled_image("retina"), 2, size, {}, seed=1, noise=0.0)
    pages = np.clip(np.rint(frames * 60000), 0, 65535).astype(np.uint16)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        path = Path(tmp) / "big.zarr"
        arr = zarr.create_array(
            path, shape=(n, size, size), chunks=(1, size, size), dtype=np.uint16, compressors=None
        )
        for i in range(0, n, 64):
            arr[i : i + 64] = pages[np.arange(i, min(i + 64, n)) % 2]
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        with local_cluster(2, worker_memory) as cluster, Client(cluster) as client:
            before = set(client.scheduler_info()["workers"])
            stack = io.open_stack(path)
            out = io.ZarrWriter(Path(tmp) / "out.zarr", (n, *stack.frame_shape), stack.dtype, stack.metadata)
            start = time.perf_counter()
            result = rotstn.register_stack(stack, batch_size=batch_size, client=client, write=out)
            seconds = time.perf_counter() - start
            peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            after = set(client.scheduler_info()["workers"])
            limit = next(iter(client.scheduler_info()["workers"].values()))["memory_limit"]
        trusted = float((result.score > 0.9).float().mean())
    peak = " / ".join(f"{v / 2**20:.0f} MB" for v in peaks.values())
    return [
        "| Zarr (uint16, 1024² frames, uncompressed) | frames | on disk | workers × limit | batch | "
        "peak RSS per worker | workers restarted | frames/s | score > 0.9 |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {n * size * size * 2 / 2**30:.1f} GiB | {n} | {disk / 2**30:.2f} GiB | "
        f"2 × {limit / 2**30:.2f} GiB | {batch_size} | {peak} | {len(before - after)} | {n / seconds:.2f} | "
        f"{100 * trusted:.1f} % |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small stacks, no memory run (a smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1, help="time each run N times, keep the fastest")
    parser.add_argument(
        "--noise",
        nargs="+",
        default=["clean", "noisy"],
        choices=("clean", "noisy"),
        help="clean: σ 0.02 as before; noisy: σ 0.05 and a random gamma, contrast and offset per frame",
    )
    parser.add_argument("--figure", metavar="PNG", help="draw the walk-192 figure here and stop")
    parser.add_argument("--memory-mb", type=int, default=200, help="size of the streamed TIFF (0: skip)")
    parser.add_argument(
        "--tuning",
        action="store_true",
        help="rotstn only: drift of previous with and without the polish, fine_points on 512², and stop",
    )
    parser.add_argument("--dask", action="store_true", help="the Dask tables (1 and 2 workers, memory) only")
    parser.add_argument("--dask-frames", type=int, default=480, help="frames of the Dask throughput stack")
    parser.add_argument(
        "--part-size", type=int, default=64, help="frames per part in the Dask throughput run"
    )
    parser.add_argument(
        "--dask-gb", type=float, default=4.0, help="size of the Dask memory run's stack (0: skip)"
    )
    parser.add_argument("--worker-memory", default="1GiB", help="memory limit per worker in the memory run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.dask:
        print(f"{machine_line()}; rotstn batch size {args.batch_size}\n")
        n = 48 if args.quick else args.dask_frames
        rows = dask_throughput(n, 16 if args.quick else args.part_size, args.batch_size, args.repeat)
        print("\n" + "\n".join(rows))
        if args.dask_gb and not args.quick:
            print("\n" + "\n".join(dask_memory(args.dask_gb, args.worker_memory, 8)), flush=True)
        return
    n192, n512 = (12, 4) if args.quick else (300, 40)
    walk = bundled_image("astronaut")
    if args.figure:
        figure(args.figure, make_stack(walk, n192, 192, {100: 97.0, 200: -143.0}, 0, 0.02), args.batch_size)
        return
    retina = bundled_image("retina")
    stacks = {}
    for level in args.noise:
        noisy = level == "noisy"
        sigma, tag = (0.05, ", σ 0.05 + gamma") if noisy else (0.02, "")
        stacks[f"walk-192 ({n192} frames{tag})"] = make_stack(
            walk, n192, 192, {100: 97.0, 200: -143.0}, 0, sigma, noisy
        )
        stacks[f"walk-512 ({n512} frames{tag})"] = make_stack(retina, n512, 512, {20: 71.0}, 1, sigma, noisy)
    print(f"{machine_line()}; {torch.get_num_threads()} threads, rotstn batch size {args.batch_size}\n")
    if args.tuning:
        rows = tuning_tables(stacks, args.batch_size)
        print("\n" + "\n".join(rows))
        return
    rows = accuracy_table(stacks, ["first", "previous"], args.batch_size, args.repeat)
    print("\n" + "\n".join(rows))
    if args.memory_mb and not args.quick:
        print("\n" + "\n".join(memory_table(args.memory_mb, 8)))


if __name__ == "__main__":
    main()
