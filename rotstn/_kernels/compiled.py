"""The compiled CPU kernels: ``rotate_cpu.c`` and ``register_cpu.c``, built at first use, called by ctypes.

``rotate_cpu.c`` is the warp (forward and backward, :mod:`rotstn._kernels.cpu`);
``register_cpu.c`` the overlap sums of the rigid registration
(:mod:`rotstn.registration._refine`). Both go into one shared library.

The C sources ship as package data, so installing rotstn never needs a
compiler. The first call that can use the kernel compiles it with the system C
compiler into a per-user cache (``$ROTSTN_CACHE_DIR``, else
``$XDG_CACHE_HOME/rotstn``, else ``~/.cache/rotstn``) under a name keyed by a
hash of the source, the flags, the compiler and the machine, and loads it with
``ctypes``. No compiler, a failed build, or ``ROTSTN_NO_COMPILE=1`` leaves
``library()`` returning None and rotstn on its aten-based path; the reason is
reported once through ``warnings`` when ``ROTSTN_DEBUG`` is set.

One source, one shared library per instruction set (``ISAS``): on x86-64 the
same file is compiled with AVX-512, with AVX2 + FMA, or with the baseline
flags, and the C preprocessor picks vector or scalar loops from the compiler's
own feature macros. The generic build is made first and asks the CPU (and OS)
what it can run (``rotstn_cpu_features``); the best variant that builds is
used. ``ROTSTN_CPU_ISA=avx512|avx2|generic`` forces one (tests and benchmarks
force each; asking for one the CPU cannot run raises). Only the variants a
process uses are compiled. Other machines (aarch64) build the generic variant,
whose scalar loops the compiler vectorises where it can (NEON is baseline there).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

from . import machine

SOURCES = tuple(Path(__file__).with_name(name) for name in ("rotate_cpu.c", "register_cpu.c"))
# No -march=native: the cache may be shared between machines, so each variant names its ISA;
# -fno-math-errno lets floor() inline, without -ffast-math's reassociation; -fopenmp-simd lets the sums
# of register_cpu.c vectorise (its ``omp simd`` reductions), with or without OpenMP threads.
FLAGS = ("-O3", "-fPIC", "-shared", "-std=c99", "-fno-math-errno", "-fopenmp-simd", "-pthread")
ISAS = ("avx512", "avx2", "generic")  # best first
ISA_FLAGS = {
    "avx512": ("-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma"),
    "avx2": ("-mavx2", "-mfma"),
    "generic": (),
}
_FEATURE_BITS = {"avx2": 1, "avx512": 2}  # rotstn_cpu_features() in rotate_cpu.c

_c_int64, _c_int, _c_dptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


def cache_dir() -> Path:
    """Where built kernels are kept."""
    if os.environ.get("ROTSTN_CACHE_DIR"):
        return Path(os.environ["ROTSTN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rotstn"


def _compiler() -> list[str] | None:
    configured = sysconfig.get_config_var("CC")
    if configured:
        words = shlex.split(configured)
        if words and shutil.which(words[0]):
            return words[:1]
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None


def _openmp_flags() -> tuple[str, ...] | None:
    """-fopenmp where torch runs on GNU OpenMP (libgomp loaded in this process), else None.

    Linked against libgomp.so.1, the kernel gets the runtime torch already loaded and with it
    torch's thread pool. Under another OpenMP runtime (LLVM's or Intel's) a second pool would
    compete with torch's, so the kernel keeps its own pthreads there.
    """
    try:
        with open("/proc/self/maps") as maps:
            return ("-fopenmp",) if "libgomp" in maps.read() else None
    except OSError:
        return None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    for suffix in ("f32", "f64"):
        fwd = getattr(lib, f"rotstn_forward_{suffix}")
        # image, batch stride, output, derivatives or None, parameters, B, C, H, W, threads
        fwd.argtypes = [
            _c_dptr,
            _c_int64,
            _c_dptr,
            _c_dptr,
            _c_dptr,
            _c_int64,
            _c_int64,
            _c_int64,
            _c_int64,
            _c_int,
        ]
        fwd.restype = _c_int
        bwd = getattr(lib, f"rotstn_backward_{suffix}")
        # image, batch stride, output gradient, image gradient, derivatives, geo, parameters, ...
        bwd.argtypes = [
            *(_c_dptr, _c_int64, _c_dptr, _c_dptr, _c_dptr, _c_dptr, _c_dptr),
            *(_c_int64, _c_int64, _c_int64, _c_int64, _c_int),
        ]
        bwd.restype = _c_int
        sums = getattr(lib, f"rotstn_overlap_sums_{suffix}")
        # x, y, n, f, pw, jt, gx, gy, fixed batch stride, image, mask, moving batch stride, H, W, margin,
        # affine, rows, rows per pair, out, threads
        sums.argtypes = [
            *(_c_dptr, _c_dptr, _c_int64, _c_dptr, _c_dptr, _c_dptr, _c_dptr, _c_dptr, _c_int64),
            *(_c_dptr, _c_dptr, _c_int64, _c_int64, _c_int64, ctypes.c_double),
            *(_c_dptr, _c_int64, _c_int64, _c_dptr, _c_int),
        ]
        sums.restype = _c_int
        refine = getattr(lib, f"rotstn_refine_{suffix}")
        # x, y, n, f, pw, jt, gx, gy, fixed batch stride, image, mask, moving batch stride, H, W, margin,
        # frame, radius, tolerance, iterations, angle, t, B, threads
        refine.argtypes = [
            *(_c_dptr, _c_dptr, _c_int64, _c_dptr, _c_dptr, _c_dptr, _c_dptr, _c_dptr, _c_int64),
            *(_c_dptr, _c_dptr, _c_int64, _c_int64, _c_int64, ctypes.c_double),
            *(_c_dptr, ctypes.c_double, ctypes.c_double, _c_int64, _c_dptr, _c_dptr, _c_int64, _c_int),
        ]
        refine.restype = _c_int
    lib.rotstn_set_limits.argtypes = [_c_int64]
    lib.rotstn_set_limits.restype = None
    lib.rotstn_isa.restype = ctypes.c_char_p
    lib.rotstn_cpu_features.restype = _c_int
    lib.rotstn_openmp.restype = _c_int
    return lib


def _build(isa: str) -> ctypes.CDLL:
    """Compile (or find in the cache) and load one variant; raises with the reason when it cannot."""
    if os.environ.get("ROTSTN_NO_COMPILE") == "1":
        raise RuntimeError("ROTSTN_NO_COMPILE=1")
    if sys.platform == "win32":
        raise RuntimeError("the compiled kernel is built on POSIX systems only")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc, clang)")
    # With OpenMP where the compiler has it (the kernel then shares torch's libgomp pool, see
    # run() in the source), else pthreads. A cached build of either is reused without compiling.
    attempts = [(*FLAGS, *ISA_FLAGS[isa], *extra) for extra in (_openmp_flags(), ()) if extra is not None]
    targets = [_target(cache_dir(), cc, flags, isa) for flags in attempts]
    target = next((t for t in targets if t.exists()), None)
    errors = []
    for flags, candidate in zip(attempts, targets, strict=True):
        if target is not None:
            break
        try:
            _compile(cc, flags, candidate)
            target = candidate
        except RuntimeError as err:
            errors.append(str(err))
    if target is None:
        raise RuntimeError("; ".join(errors))
    lib = _declare(ctypes.CDLL(str(target)))
    built = lib.rotstn_isa().decode()
    if built != isa:  # e.g. a compiler that accepts the flags but lacks the intrinsics' macros
        raise RuntimeError(f"the {isa} build compiled as {built!r}")
    lib.rotstn_set_limits(machine.limits().prefetch_max_bytes)
    return lib


@functools.cache
def _variant(isa: str) -> ctypes.CDLL | str:
    """The loaded variant, or the reason it could not be built."""
    try:
        return _build(isa)
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as err:
        return str(err)


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@functools.lru_cache(maxsize=1)
def supported() -> tuple[str, ...]:
    """The variants this CPU can run, best first (only "generic" off x86 or without a compiler)."""
    generic = _variant("generic")
    if isinstance(generic, str) or not _x86():
        return ("generic",)
    bits = generic.rotstn_cpu_features()
    return tuple(isa for isa in ISAS if isa == "generic" or bits & _FEATURE_BITS[isa])


def requested_isa() -> str | None:
    """``ROTSTN_CPU_ISA`` when set (validated), else None for the automatic choice."""
    name = os.environ.get("ROTSTN_CPU_ISA", "").strip().lower()
    if not name:
        return None
    if name not in ISAS:
        raise ValueError(f"ROTSTN_CPU_ISA must be one of {', '.join(ISAS)} (or unset); got {name!r}")
    return name


def _target(folder: Path, cc: list[str], flags: tuple[str, ...], isa: str) -> Path:
    """The cached library's path: keyed by source, flags, compiler and machine."""
    parts = [
        *(source.read_bytes() for source in SOURCES),
        " ".join(flags).encode(),
        cc[0].encode(),
        platform.machine().encode(),
    ]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return folder / f"rotate_cpu-{platform.machine()}-{isa}-{key}.so"


def _compile(cc: list[str], flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a unique name and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [*cc, *flags, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL | None:
    """The loaded kernel of the variant in use, or None when none can be built here (aten's sampler then)."""
    generic = _variant("generic")  # built first everywhere: it says what the CPU runs
    if isinstance(generic, str):
        _report(f"generic: {generic}")
        return None
    forced = requested_isa()
    if forced is not None and forced not in supported():
        raise RuntimeError(
            f"ROTSTN_CPU_ISA={forced} but this CPU runs only {', '.join(supported())}; "
            "unset it or pick one of those"
        )
    reasons = []
    for isa in (forced,) if forced else supported():
        lib = _variant(isa)
        if not isinstance(lib, str):
            return lib
        reasons.append(f"{isa}: {lib}")
    _report("; ".join(reasons))
    return None


def active_isa() -> str:
    """The variant in use ("avx512", "avx2", "generic"), or "none" (aten's sampler), for tables and logs."""
    lib = library()
    return "none" if lib is None else lib.rotstn_isa().decode()


@functools.cache
def _report(reason: str) -> None:
    if os.environ.get("ROTSTN_DEBUG"):
        warnings.warn(
            f"rotstn: compiled CPU kernel unavailable ({reason}); using aten's sampler", stacklevel=3
        )
