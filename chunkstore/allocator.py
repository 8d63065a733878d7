"""Keeping freed memory for reuse: the process moves GBs through buffers of a few MiB.

glibc's malloc serves a large block from a fresh mapping, or trims the top of its heap when a
large block is freed, and hands the pages back to the kernel; the next message of the same
size then faults every page in again and the kernel zeroes each one. Measured on a push of
1 GB to three local nodes, that was about a sixth of the nodes' CPU and a tenth of the
client's, and a fifth of the client's in a pull. :func:`keep_freed_memory` raises the
thresholds so that freed blocks stay in the heap for the next message.
"""

from __future__ import annotations

import ctypes
import logging

from chunkstore.libc import function

log = logging.getLogger(__name__)

MiB = 1 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def keep_freed_memory(trim_bytes: int = 64 * MiB, mmap_bytes: int = 32 * MiB) -> bool:
    """Have glibc keep up to ``trim_bytes`` of freed memory at the top of a heap and serve
    blocks below ``mmap_bytes`` from the heap. Once per process; False where there is no
    glibc (the call then does nothing)."""
    global _done
    if _done:
        return True
    mallopt = function("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_bytes) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_bytes) == 1
    if not ok:
        log.debug("mallopt refused the thresholds")
    _done = ok
    return ok
