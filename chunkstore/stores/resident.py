"""Dropping a file mapping's resident pages, so reading a large store does not grow RSS.

LMDB reads through a read-only shared memory map: every page a read touches stays mapped into
the process (and counted in its resident set) until the kernel needs the memory. Advising
``MADV_DONTNEED`` over the map unmaps those pages; their contents stay in the page cache and
are faulted back in when read again. This is safe only for a shared file mapping that nobody
writes through, which is how LMDB maps its file unless opened with ``writemap``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import resource
import threading
from pathlib import Path

from chunkstore.libc import function

_MADVISE = function("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """``(start, end)`` addresses of this process's mappings of the file at ``path``."""
    target = os.path.realpath(path)
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == target:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def drop_resident(ranges: list[tuple[int, int]]) -> None:
    """Unmap the resident pages of these (shared, read-only file) mappings."""
    if _MADVISE is None:
        return
    for start, end in ranges:
        _MADVISE(start, end - start, mmap.MADV_DONTNEED)


class FaultBudget:
    """Counts the page faults that threads take while reading a map, so that its pages are
    dropped only once they may hold about ``limit`` faults' worth, not on a fixed schedule.

    One fault maps a whole page-cache folio (up to 2 MiB), so the map's resident size stays
    under ``limit`` times that; dropping costs the refaults of the pages still in use, which a
    count of records read would pay even when every lookup hit pages mapped already. Faults a
    thread takes for anything else count too: the budget errs towards dropping.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._spent = 0
        self._seen = threading.local()  # the calling thread's fault count at its last check

    def spent(self) -> bool:
        """Add the calling thread's faults since its last check; True once the faults added
        since the last :meth:`reset` reach the limit."""
        now = _thread_faults()
        last = getattr(self._seen, "faults", now)
        self._seen.faults = now
        self._spent += now - last
        return self._spent >= self.limit

    def reset(self) -> None:
        self._spent = 0
        self._seen.faults = _thread_faults()


def _thread_faults() -> int:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_minflt + usage.ru_majflt
