"""Process-level settings for speed, applied by the entry points (`train.py`, `sample.py`,
`eval_fid.py`) before they allocate; the library never applies them on import."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# Largest value glibc accepts for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX / 2 = 32 MiB).
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20


def tune_host_allocator() -> bool:
    """Keep freed host memory for reuse instead of handing it back to the kernel after each step.

    A training step on the CPU allocates and frees hundreds of MB of activations and gradients in
    blocks of 1-13 MB. glibc serves blocks above its (adaptive) mmap threshold with fresh pages
    from the kernel and trims freed heap memory back, so many steps start by page-faulting and
    zeroing those pages again: we counted up to 150,000 minor faults (600 MB) in one DiT-S/2 step
    and 3-15 % more CPU time per step than with the settings here, which serve every block below
    32 MiB from the heap and keep up to 1 GiB of freed memory mapped (0 faults per step;
    benchmarks/README.md). The price: the process keeps its peak heap (it would reach it again
    next step anyway). GPU runs are unaffected apart from host-side buffers.

    Does nothing (returns False) off glibc or when the user set any of glibc's own MALLOC_*_
    variables, which then win. Returns True when applied.
    """
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    ok &= mallopt(_M_TOP_PAD, TOP_PAD) == 1
    return bool(ok)
