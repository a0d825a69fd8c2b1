"""glibc malloc settings for PyTorch on CPU (``SWIN_MALLOC``), applied by the CLI and the benchmark at start-up.

glibc serves each large tensor buffer (above a threshold that starts at 128 KiB) with its own ``mmap`` and unmaps it on
free, and hands the top of its heap back to the kernel once 128 KiB of it are free: a training step then faults its
activations in afresh, page by page, every step (Swin-T fp32, batch 8: 30,000-100,000 minor page faults a step, 5-7 %
of the process's time in the kernel). ``heap`` keeps freed buffers for the next step instead: every buffer comes from
the heap (no ``mmap`` per buffer), and the heap is trimmed only above 1 GiB of free space at its top. A training
process then keeps its peak for reuse; ``swin.allocator.trim()`` hands the free part back.

``lean`` is the other way round, for memory over speed: every buffer from 1 MiB up gets its own ``mmap`` (a fixed
threshold: glibc no longer raises it to 32 MiB after the first such free) and goes back to the kernel when freed, and
the heap is trimmed above 128 KiB free, so the resident size follows the live tensors. Freed buffers stay resident
within a step otherwise, which hides what gradient checkpointing saves (Swin-T fp32 batch 16: its peak above the
persistent size is 0.8-0.9× that without it under ``heap`` or glibc's defaults, about 0.4× under ``lean``), at the cost
of faulting every buffer in afresh (1.5 million page faults a step). The CLI switches to it for a training run with
gradient checkpointing on unless ``SWIN_MALLOC`` says otherwise. Measured with ``python -m swin.bench --allocator``
(docs/benchmarks.md, "Allocator").

``SWIN_MALLOC=heap`` (default), ``lean`` or ``default`` (glibc's own settings). Nothing is changed where the C library
is not glibc, where ``LD_PRELOAD`` brings another allocator (jemalloc, tcmalloc), or where glibc's own ``MALLOC_*``
variables are set: those choices are the user's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

VARIABLE = "SWIN_MALLOC"
# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
# per setting, the mallopt values; each is glibc's default where the other setting changes it, so that either can
# follow the other in one process
SETTINGS: dict[str, dict[int, int]] = {
    "heap": {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 64 << 20},
    "lean": {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 1 << 20, M_TRIM_THRESHOLD: 128 << 10, M_TOP_PAD: 128 << 10},
    "default": {},
}


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc(unset: str = "heap") -> str:
    """Apply ``SWIN_MALLOC``, or ``unset`` where the variable is not set; returns what is in force (a setting's name)
    or why nothing was changed."""
    setting = os.environ.get(VARIABLE, "").strip().lower() or unset
    if setting not in SETTINGS:
        raise ValueError(f"{VARIABLE}={setting!r}: expected one of {', '.join(SETTINGS)}")
    if setting == "default":
        return setting
    if any(key.startswith("MALLOC_") for key in os.environ) or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return "left as set by MALLOC_* / LD_PRELOAD"
    libc = _glibc()
    if libc is None:
        return "left: not glibc"
    for param, value in SETTINGS[setting].items():
        if not libc.mallopt(param, value):
            raise OSError(f"glibc's mallopt({param}, {value}) refused the {VARIABLE}={setting} setting")
    libc.malloc_trim(0)  # what the last setting kept and this one would not
    return setting


def trim() -> None:
    """Return the heap's free memory to the kernel (``malloc_trim(0)``) where the C library is glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
