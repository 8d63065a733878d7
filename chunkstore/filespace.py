"""Reserving a file's disk space before its bytes are written out of order.

A pull writes each chunk at its offset from several threads. Into a file that only has its
size set (``ftruncate``), ext4 reserves and maps blocks page by page as the writes arrive,
which cost a quarter of each write's CPU here. Blocks allocated up front with ``fallocate``
are filled in place: 1 GB of 69 KB writes took 0.22 CPU-seconds instead of 0.30. The
reservation also makes a pull that cannot fit fail before it fetches anything.
"""

from __future__ import annotations

import ctypes
import errno
import os

from chunkstore.libc import function

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_FALLOCATE = function("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def reserve(fd: int, size: int, name: str | os.PathLike = "") -> None:
    """Give the file open at ``fd`` the length ``size`` with its blocks allocated where the
    file system can (reading them gives zeros); elsewhere only its length is set.

    Raises OSError (ENOSPC) naming ``name`` when the disk cannot hold ``size`` bytes.
    """
    if size > 0 and _FALLOCATE is not None:
        if _FALLOCATE(fd, 0, 0, size) == 0:
            return
        err = ctypes.get_errno()
        if err not in _UNSUPPORTED:
            raise OSError(err, os.strerror(err), os.fspath(name) if name else None)
    os.ftruncate(fd, size)
