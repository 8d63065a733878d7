"""Stores are not carried across ``fork``: an LMDB environment and a gRPC channel belong to the
process that opened them, and a forked child using them would corrupt the lock table or hang.
A store checks which process it is in and says so, instead of failing in either of those ways.
"""

from __future__ import annotations

import os

from chunkstore.errors import ChunkstoreError


class OpenedIn:
    """The process that opened ``what``; :meth:`check` raises in any other (a forked child)."""

    def __init__(self, what: str) -> None:
        self._pid = os.getpid()
        self._what = what

    def check(self) -> None:
        if os.getpid() != self._pid:
            raise ChunkstoreError(
                f"{self._what} was opened in process {self._pid}, which this one was forked "
                "from: use it there, or open it in a process started with multiprocessing's "
                "'spawn' method (a forked child cannot open it again while it holds the copy)"
            )
