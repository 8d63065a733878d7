"""Taking turns in a directory: pulls into one destination run one after another.

Without it, two processes pulling into the same directory at once (the ranks of a job on one
machine, say) would write the same partial files, and one could rename a file into place while
the other was still writing it.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory``, waiting while another process (or thread)
    holds it. The lock is the directory's own (``flock``): nothing is created, and a process
    that dies lets go of it. Where the file system has no such locks, nothing is locked."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
        yield
    finally:
        os.close(fd)  # releases the lock
