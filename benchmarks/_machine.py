"""What every timing depends on: the CPU model, the vector ISA and torch's build (for the benchmarks)."""

from __future__ import annotations

import contextlib
import os
import platform

import torch


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (Linux /proc/cpuinfo, else platform)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """CPU model, the compiled kernel's variant in use, and torch's build."""
    from rotstn._kernels import compiled

    return (
        f"CPU: {cpu_model()} ({os.cpu_count()} threads); rotstn CPU kernel variant: {compiled.active_isa()} "
        f"(supported here: {', '.join(compiled.supported())}); torch {torch.__version__} "
        f"(aten CPU capability {torch.backends.cpu.get_cpu_capability()})"
    )
