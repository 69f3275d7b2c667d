"""Process-wide allocator tuning for workers that run many short numeric kernels (the proposals stage).

glibc's malloc serves every block over M_MMAP_THRESHOLD (128 KiB at start, raised dynamically as blocks are
freed) with a fresh mmap and unmaps it on free, so a kernel's scratch images can come back as new pages each
call: one page fault per 4 KiB touched. Raising the mmap and trim thresholds keeps freed blocks in the heap for the
next sweep (page faults and time per sweep: docs/results.md, "Engineering measurements").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


def keep_freed_memory(mmap_threshold_mb: int = 32, trim_threshold_mb: int = 128) -> bool:
    """Serve blocks under `mmap_threshold_mb` from the heap and keep up to `trim_threshold_mb` of freed heap for
    reuse. Idempotent; returns False where malloc is not glibc's (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold_mb << 20)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold_mb << 20))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
