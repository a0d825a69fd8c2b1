"""glibc malloc settings for PyTorch on CPU (``SWIN_MALLOC``), applied by the CLI and the benchmark at start-up.

glibc serves each large tensor buffer (above a threshold that starts at 128 KiB) with its own ``mmap`` and unmaps it on
free, and hands the top of its heap back to the kernel once 128 KiB of it are free: a training step then faults its
activations in afresh, page by page, every step (Swin-T fp32, batch 8: 30,000-100,000 minor page faults a step, 5-7 %
of the process's time in the kernel). ``heap`` keeps freed buffers for the next step instead: every buffer comes from
the heap (no ``mmap`` per buffer), and the heap is trimmed only above 1 GiB of free space at its top. A training
process then keeps its peak for reuse; ``swin.allocator.trim()`` hands the free part back.
Measured with ``python -m swin.bench --allocator`` (docs/benchmarks.md, "Allocator").

``SWIN_MALLOC=heap`` (default) or ``default`` (glibc's own settings). Nothing is changed where the C library is not
glibc, where ``LD_PRELOAD`` brings another allocator (jemalloc, tcmalloc), or where glibc's own ``MALLOC_*`` variables
are set: those choices are the user's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

SETTINGS = ("heap", "default")
# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
HEAP = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20}


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc() -> str:
    """Apply ``SWIN_MALLOC``; returns what is in force: ``heap``, ``default``, or why nothing was changed."""
    setting = os.environ.get("SWIN_MALLOC", "heap").strip().lower() or "heap"
    if setting not in SETTINGS:
        raise ValueError(f"SWIN_MALLOC={setting!r}: expected one of {', '.join(SETTINGS)}")
    if setting == "default":
        return setting
    if any(key.startswith("MALLOC_") for key in os.environ) or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return "left as set by MALLOC_* / LD_PRELOAD"
    libc = _glibc()
    if libc is None:
        return "left: not glibc"
    for param, value in HEAP.items():
        if not libc.mallopt(param, value):
            raise OSError(f"glibc's mallopt({param}, {value}) refused the SWIN_MALLOC=heap setting")
    return setting


def trim() -> None:
    """Return the heap's free memory to the kernel (``malloc_trim(0)``) where the C library is glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
