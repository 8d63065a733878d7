"""The C library's few calls that Python does not wrap (``mallopt``, ``madvise``,
``fallocate``, ``mmap`` at a fixed address), loaded once for the modules that need them."""

from __future__ import annotations

import ctypes
import ctypes.util

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
except OSError:
    _LIBC = None


def function(name: str, *argtypes: type, restype: type = ctypes.c_int) -> ctypes._CFuncPtr | None:
    """The C library's ``name`` returning ``restype`` (int unless told), with ``argtypes`` set;
    None where there is no such function (errno is kept for :func:`ctypes.get_errno`)."""
    fn = getattr(_LIBC, name, None)
    if fn is None:
        return None
    fn.argtypes = argtypes
    fn.restype = restype
    return fn
