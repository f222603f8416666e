"""The compiled CPU kernel: ``rotate_cpu.c`` built at first use and called through ctypes.

The C source ships as package data, so installing rotstn never needs a
compiler. The first call that can use the kernel compiles it with the system C
compiler into a per-user cache (``$ROTSTN_CACHE_DIR``, else
``$XDG_CACHE_HOME/rotstn``, else ``~/.cache/rotstn``) under a name keyed by a
hash of the source, the flags, the compiler and the machine, and loads it with
``ctypes``. No compiler, a failed build, or ``ROTSTN_NO_COMPILE=1`` leaves
``library()`` returning None and rotstn on its aten-based path; the reason is
reported once through ``warnings`` when ``ROTSTN_DEBUG`` is set.
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

SOURCE = Path(__file__).with_name("rotate_cpu.c")
# Portable code only (no -march=native: the cache may be shared between machines);
# -fno-math-errno lets floor() inline, without -ffast-math's reassociation.
FLAGS = ("-O3", "-fPIC", "-shared", "-std=c99", "-fno-math-errno", "-pthread")

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


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    for suffix in ("f32", "f64"):
        fwd = getattr(lib, f"rotstn_forward_{suffix}")
        fwd.argtypes = [_c_dptr, _c_int64, _c_dptr, _c_dptr, _c_int64, _c_int64, _c_int64, _c_int64, _c_int]
        fwd.restype = _c_int
        bwd = getattr(lib, f"rotstn_backward_{suffix}")
        bwd.argtypes = [
            *(_c_dptr, _c_int64, _c_dptr, _c_dptr, _c_dptr, _c_dptr),
            *(_c_int64, _c_int64, _c_int64, _c_int64, _c_int),
        ]
        bwd.restype = _c_int
    return lib


def _build() -> ctypes.CDLL:
    """Compile (or find in the cache) and load the kernel; raises with the reason when it cannot."""
    if os.environ.get("ROTSTN_NO_COMPILE") == "1":
        raise RuntimeError("ROTSTN_NO_COMPILE=1")
    if sys.platform == "win32":
        raise RuntimeError("the compiled kernel is built on POSIX systems only")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc, clang)")
    folder = cache_dir()
    # The AVX2 clone of the coordinate pass needs ifunc support (glibc); where that build
    # fails, the portable one is used. A cached build of either is reused without compiling.
    attempts = [(*FLAGS, *extra) for extra in ((), ("-DROTSTN_NO_CLONES",))]
    targets = [_target(folder, cc, flags) for flags in attempts]
    for target in targets:
        if target.exists():
            return _declare(ctypes.CDLL(str(target)))
    errors = []
    for flags, target in zip(attempts, targets, strict=True):
        try:
            _compile(cc, flags, target)
        except RuntimeError as err:
            errors.append(str(err))
            continue
        return _declare(ctypes.CDLL(str(target)))
    raise RuntimeError("; ".join(errors))


def _target(folder: Path, cc: list[str], flags: tuple[str, ...]) -> Path:
    """The cached library's path: keyed by source, flags, compiler and machine."""
    parts = [SOURCE.read_bytes(), " ".join(flags).encode(), cc[0].encode(), platform.machine().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return folder / f"rotate_cpu-{platform.machine()}-{key}.so"


def _compile(cc: list[str], flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a unique name and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [*cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None when it cannot be built here (then rotstn uses aten's sampler)."""
    try:
        return _build()
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as err:
        if os.environ.get("ROTSTN_DEBUG"):
            warnings.warn(
                f"rotstn: compiled CPU kernel unavailable ({err}); using aten's sampler", stacklevel=2
            )
        return None
