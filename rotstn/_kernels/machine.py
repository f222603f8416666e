"""What the CPU kernel's size limits are chosen from: the caches this machine reports, read at run time.

Two limits of the compiled kernel (``rotate_cpu.c``, docs/speed.md "How the limits follow the
machine") depend on cache sizes, and were constants measured on one CPU before:

* **prefetch**: a sample's image is prefetched whole before its first row when it fits half of
  one thread's share of L2 (the other half holds the output, gradient and derivative rows the
  same walk touches); a larger image would evict itself, and is left to the hardware prefetchers.
  On the Zen 4 EPYC (1 MiB L2 a core) this is the 512 KiB that was measured best there.
* **saved derivatives**: the forward keeps ∂out/∂x, ∂out/∂y for the backward when that tensor
  fits three quarters of the last-level cache (it is written by the forward and read back by the
  backward; beyond the L3 it goes through memory both ways and costs more than reading the image's
  corners again). On the EPYC's 32 MiB L3 this is the 24 MiB measured there (20-30 % faster at
  24 MiB, 20-27 % slower at 32 MiB). The L3 counts at most ``L3_PER_CPU_MAX`` for each CPU that
  sysfs says shares it: a virtual machine may report its host's whole L3 (an Intel Xeon guest with
  2 CPUs reports 480 MiB) of which its CPUs hold a small part; there, saving 96 MiB of derivatives
  made forward + backward 15-25 % slower, 24 MiB 25 % faster (docs/speed.md, fifth round).

The sizes come from Linux's ``/sys/devices/system/cpu/cpu0/cache`` (each cache's level, type,
size and the CPUs that share it), else from ``sysconf`` (glibc), else assumed (32 KiB, 1 MiB,
8 MiB; ``source`` says which). ``ROTSTN_CPU_CACHES="L1D,L2,L3"`` (e.g. ``48K,2M,105M``) sets them,
to try a machine's limits on another.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")
ASSUMED = (32 * 2**10, 2**20, 8 * 2**20)
# More L3 per CPU sharing it than any server core has (Zen 4 4 MiB, V-Cache parts 12 MiB, Xeons
# 1.5-5 MiB a core): a larger figure is a host's cache seen from a guest.
L3_PER_CPU_MAX = 16 * 2**20


@dataclass(frozen=True)
class Caches:
    """One thread's share of L1 data and L2, and the whole last-level cache, in bytes."""

    l1d: int
    l2: int
    l3: int
    source: str  # "sysfs", "sysconf", "ROTSTN_CPU_CACHES" or "assumed"
    l3_cpus: int = 0  # the CPUs sharing the L3 (sysfs ``shared_cpu_list``); 0 where unknown


@dataclass(frozen=True)
class Limits:
    """The kernel's cache-dependent limits, in bytes (docs/speed.md)."""

    prefetch_max_bytes: int
    derivatives_max_bytes: int


def parse_size(text: str) -> int:
    """``"48K"``, ``"2M"``, ``"1048576"`` -> bytes (sysfs's and ROTSTN_CPU_CACHES's notation)."""
    text = text.strip().upper().removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _cpu_count(cpu_list: str) -> int:
    """How many CPUs a sysfs list such as ``0-1,4`` names."""
    count = 0
    for part in cpu_list.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1
    return max(count, 1)


def from_sysfs(root: Path = SYSFS) -> Caches | None:
    """The caches cpu0 reports under ``root``; L1D and L2 divided among the CPUs sharing them."""
    found: dict[int, int] = {}
    l3_cpus = 0
    for index in sorted(root.glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            size = parse_size((index / "size").read_text())
            shared = index / "shared_cpu_list"
            sharing = _cpu_count(shared.read_text()) if shared.exists() else 1
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or size <= 0:
            continue
        found[level] = size if level >= 3 else size // sharing
        if level == 3:
            l3_cpus = sharing
    if 1 not in found or 2 not in found:
        return None
    return Caches(found[1], found[2], found.get(3, 0), "sysfs", l3_cpus)


def from_sysconf() -> Caches | None:
    names = ("SC_LEVEL1_DCACHE_SIZE", "SC_LEVEL2_CACHE_SIZE", "SC_LEVEL3_CACHE_SIZE")
    try:
        l1, l2, l3 = (os.sysconf(name) for name in names)
    except (ValueError, OSError, AttributeError):
        return None
    if l1 <= 0 or l2 <= 0:
        return None
    return Caches(l1, l2, max(l3, 0), "sysconf")


@functools.cache
def caches() -> Caches:
    """This machine's caches (``ROTSTN_CPU_CACHES`` first, then sysfs, sysconf, assumed)."""
    forced = os.environ.get("ROTSTN_CPU_CACHES", "").strip()
    if forced:
        try:
            l1, l2, l3 = (parse_size(part) for part in forced.split(","))
        except ValueError as err:
            raise ValueError(
                f"ROTSTN_CPU_CACHES must be 'L1D,L2,L3' such as '48K,2M,32M'; got {forced!r}"
            ) from err
        return Caches(l1, l2, l3, "ROTSTN_CPU_CACHES")
    return from_sysfs() or from_sysconf() or Caches(*ASSUMED, "assumed")


def usable_l3(found: Caches) -> int:
    """The L3 the kernel counts on: at most ``L3_PER_CPU_MAX`` for each CPU known to share it."""
    return min(found.l3, L3_PER_CPU_MAX * found.l3_cpus) if found.l3_cpus else found.l3


def limits_for(found: Caches) -> Limits:
    """The kernel's limits for these caches."""
    # No L3 reported: the L2 is the last level the derivatives can stay in.
    last = usable_l3(found) or found.l2
    return Limits(prefetch_max_bytes=found.l2 // 2, derivatives_max_bytes=3 * last // 4)


@functools.cache
def limits() -> Limits:
    """This machine's limits (``limits_for(caches())``, computed once)."""
    return limits_for(caches())


def describe() -> str:
    """One line for benchmark tables: the caches, where they came from, and the limits."""
    found, chosen = caches(), limits()
    mib = 2**20
    return (
        f"caches ({found.source}): L1D {found.l1d // 1024} KiB, L2 {found.l2 / mib:g} MiB per thread, "
        f"L3 {found.l3 / mib:g} MiB{_l3_share(found)}; kernel limits: prefetch images up to "
        f"{chosen.prefetch_max_bytes // 1024} KiB, keep derivatives up to "
        f"{chosen.derivatives_max_bytes / mib:g} MiB"
    )


def _l3_share(found: Caches) -> str:
    if not found.l3_cpus:
        return ""
    usable = usable_l3(found)
    counted = f", counted as {usable / 2**20:g} MiB" if usable < found.l3 else ""
    return f" for {found.l3_cpus} CPU{'s' if found.l3_cpus > 1 else ''}{counted}"
