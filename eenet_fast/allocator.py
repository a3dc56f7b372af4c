"""A CPU allocator that keeps freed memory, so that time shares measured on the CPU hold.

glibc's ``malloc`` serves large blocks (a batch's activations: the demo CNN's first stage at 1024
rows is 38 MB) with ``mmap`` and gives them back to the system when they are freed, so the next
forward faults the same pages in again; which blocks go that way moves with a threshold that glibc
adjusts as the process runs. Measured on this project's shared 2-core CPU at batch 1024 (time share
of forwards that send every sample out at exit 1, 8 rounds, six measurements minutes apart):

========================  ==========================  ====================
allocator                 ResNet example              demo CNN
========================  ==========================  ====================
glibc defaults            0.34 or 0.46 (two levels)   0.46-0.48
:func:`steady_allocator`  0.31-0.32                   0.35-0.37
========================  ==========================  ====================

and the same forwards took 1.2-1.9x less time. A time budget calibrated in one of the two levels and
served in the other misses by a quarter. :func:`steady_allocator` stops ``mmap`` for allocations and
the return of freed memory to the system: the process keeps its peak CPU memory (RSS does not
shrink back; 0.73 GB instead of 0.62 GB for the ResNet run above). Preloading jemalloc or tcmalloc
(``LD_PRELOAD``) does the same job from outside the process.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

__all__ = ["steady_allocator", "allocator_is_steady"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the largest free top of the heap it keeps
_applied = False


@functools.cache
def has_glibc() -> bool:
    """Whether this process runs on glibc, whose ``mallopt`` this module sets (read once: Python finds
    out by scanning its own executable)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def steady_allocator() -> bool:
    """Make glibc's ``malloc`` in this process keep the memory it frees (see the module docstring).

    Call it once, before calibrating with ``costs="latency"`` and in the process that serves; it is
    process-wide and cannot be undone. Calling it again does nothing.

    Returns:
        True when the setting is in effect (glibc), False where there is no glibc ``mallopt`` (macOS,
        Windows, musl): nothing is changed there.
    """
    global _applied
    if _applied:
        return True
    if not has_glibc():
        return False
    libc = ctypes.CDLL(None)
    _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return _applied


def allocator_is_steady() -> bool:
    """Whether freed CPU memory stays in the process: :func:`steady_allocator` was called, glibc's
    own settings (``MALLOC_MMAP_MAX_``, ``GLIBC_TUNABLES`` with ``mmap_max``) or a preloaded
    jemalloc/tcmalloc do it, or there is no glibc to ask."""
    if _applied or not has_glibc():
        return True
    preload = os.environ.get("LD_PRELOAD", "")
    return ("MALLOC_MMAP_MAX_" in os.environ or "mmap_max" in os.environ.get("GLIBC_TUNABLES", "")
            or "jemalloc" in preload or "tcmalloc" in preload)
