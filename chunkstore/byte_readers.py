"""Reading bytes of a file at given offsets, from memory or with ``pread``.

A file read with ``pread`` cannot fault when it shrinks meanwhile: it reads short. That is how
a file that may change under a reader, and that no lease guards, is read (see
:class:`chunkstore.chunking.MappedFile`).
"""

from __future__ import annotations

import os
from typing import Protocol


class ByteReader(Protocol):
    """Reads bytes of one file from any thread, until closed."""

    def read(self, offset: int, length: int) -> bytes:
        """A copy of ``length`` bytes at ``offset`` (fewer past the end, or if the file
        shrank meanwhile)."""

    def close(self) -> None:
        """Let go of what the reader holds."""


class BufferReader:
    """Reads a buffer: bytes, or a view of a map."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._view = memoryview(data)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self._view[offset : offset + length])

    def close(self) -> None:
        self._view.release()


class FileReader:
    """Reads an open file with ``pread``; :meth:`close` closes its descriptor."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        os.close(self._fd)
