"""What every timing depends on: the CPU model, the vector ISA and torch's build (for the benchmarks)."""

from __future__ import annotations

import contextlib
import os
import platform

import torch


def cpu_model() -> str:
    """The CPU's model name, family and model numbers and vector extensions as the OS reports them.

    Linux /proc/cpuinfo; else platform. The family and model tell CPUs apart whose names do not
    (a cloud VM may call a Zen 4 just "AMD EPYC").
    """
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                break  # the first CPU is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    vector = [name for name in ("avx512f", "avx512bw", "avx512vl", "avx2", "fma") if name in flags]
    family, model = fields.get("cpu family", "?"), fields.get("model", "?")
    return (
        f"{fields['model name']} (vendor {fields.get('vendor_id', '?')}, family {family} model {model}; "
        f"{' '.join(vector) or 'no AVX2'})"
    )


def machine_line() -> str:
    """CPU model, the compiled kernel's variant in use, and torch's build."""
    from rotstn._kernels import compiled

    return (
        f"CPU: {cpu_model()} ({os.cpu_count()} threads); rotstn CPU kernel variant: {compiled.active_isa()} "
        f"(supported here: {', '.join(compiled.supported())}); torch {torch.__version__} "
        f"(aten CPU capability {torch.backends.cpu.get_cpu_capability()})"
    )


def tuning_line() -> str:
    """The caches the compiled kernel's limits were chosen from, and those limits."""
    from rotstn._kernels import machine

    return machine.describe()
