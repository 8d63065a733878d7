"""Read leases that keep a memory-mapped file from killing the process when it shrinks (Linux).

Reading a page of a file mapping past the file's end raises SIGBUS, which no Python code can
catch: a checkpoint truncated or rewritten in place (``open(path, "wb")``, as ``torch.save``
does) while a push maps it would kill the process. While a file is mapped, a :class:`Lease`
holds a read lease on it (``F_SETLEASE``). A writer's open for writing, or a truncate, then
waits while the kernel sends SIGIO to the process's main thread; the handler here puts
anonymous zero pages in place of the mapping (same addresses: nothing can fault on them), marks
the lease broken, so the reader knows the file changed, and releases the lease, so the writer
goes on.

A lease is taken only where that is safe and possible: SIGIO has its default action (which
would end the process) and the handler can be installed, which only the main thread may do
(:func:`prepare` does it early), or it already is; the caller owns the file or has CAP_LEASE;
nobody has the file open for writing; the file system supports leases. Otherwise
:func:`guard` returns None, and :class:`~chunkstore.chunking.MappedFile` reads the file into
memory instead of mapping it. The kernel breaks a lease itself after
``/proc/sys/fs/lease-break-time`` seconds (45 by default), so a main thread kept that long
from running Python code leaves the mapping unguarded again.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import signal
import struct
import threading

import numpy as np

from chunkstore.libc import function

_F_SETOWN_EX = 15
_F_OWNER_TID = 0
_MAP_FIXED = 0x10
_MMAP = function(
    "mmap",
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
    restype=ctypes.c_void_p,
)

#: Held while a lease's mapping is replaced or closed; reentrant because the SIGIO handler runs
#: in the main thread, between any two bytecodes of code that may hold it.
_LOCK = threading.RLock()
_HELD: dict[int, Lease] = {}  # lease fd -> lease, while the lease is held
_CLOSING: list[Lease] = []  # broken or released, their map still viewed: closed when it can be


class Lease:
    """A read lease on one open file guarding one read-only shared map of it; see the module.

    Owns ``fd`` and a reference to ``mm`` (so the map is unmapped only by :meth:`close`, never
    behind the SIGIO handler's back).
    """

    def __init__(self, fd: int, mm: mmap.mmap) -> None:
        self._fd = fd
        self._mm = mm
        self._address = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        self._length = len(mm)
        #: Whether a writer broke the lease: the map then reads as zeros, not as the file.
        self.broken = False
        self._closed = False

    def close(self) -> None:
        """Close the map and give the lease up; while views of the map are alive, both are
        kept (the lease still guarding them) and closed at a later close or :func:`guard`."""
        with _LOCK:
            if self._close():
                if self in _CLOSING:
                    _CLOSING.remove(self)
            elif self not in _CLOSING:
                _CLOSING.append(self)

    def _close(self) -> bool:
        """Whether the map is closed (nothing views it any more); then the lease goes too."""
        if self._closed:
            return True
        try:
            self._mm.close()
        except BufferError:
            return False
        _HELD.pop(self._fd, None)  # before its number may be reused
        os.close(self._fd)  # gives up the lease too
        self._closed = True
        return True

    def _break(self) -> None:
        """Put zero pages in place of the map, then let the writer go on."""
        if not self._mm.closed:
            _MMAP(
                self._address,
                self._length,
                mmap.PROT_READ,
                _MAP_FIXED | mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                -1,
                0,
            )
        self.broken = True
        _HELD.pop(self._fd, None)
        fcntl.fcntl(self._fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


class WriterPresent(Exception):
    """No lease can be taken because the file is open for writing (by any process)."""


def guard(fd: int, mm: mmap.mmap) -> Lease | None:
    """A read lease on the file open read-only as ``fd`` guarding ``mm``, a map of it, or None
    where none can be taken (see the module); WriterPresent if that is because the file is
    open for writing. On success the lease owns ``fd``."""
    with _LOCK:
        _CLOSING[:] = [lease for lease in _CLOSING if not lease._close()]
    if _MMAP is None or not prepare():
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        if e.errno == errno.EAGAIN:
            raise WriterPresent from None
        return None
    try:
        # Tell the main thread, whatever it waits in: it is where Python runs the handler.
        owner = struct.pack("ii", _F_OWNER_TID, threading.main_thread().native_id)
        fcntl.fcntl(fd, _F_SETOWN_EX, owner)
    except OSError:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return None
    lease = Lease(fd, mm)
    with _LOCK:
        _HELD[fd] = lease
    return lease


def prepare() -> bool:
    """Whether SIGIO runs this module's handler, installing it if SIGIO has its default action
    and this is the main thread (the only one that may install a handler). Once installed,
    files mapped by any thread can be guarded: :class:`~chunkstore.repository.Repository`
    calls this when it is made, so a push from a background thread is guarded too."""
    current = signal.getsignal(signal.SIGIO)
    if current is _on_sigio:
        return True
    if current is not signal.SIG_DFL or threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGIO, _on_sigio)
    return True


def _on_sigio(signum: int, frame: object) -> None:
    """Break every held lease a writer is waiting on (its pending type is no longer a read
    lease)."""
    with _LOCK:
        for fd, lease in list(_HELD.items()):
            if fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
                lease._break()
