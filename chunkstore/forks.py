"""Stores are not carried across ``fork``: an LMDB environment and a gRPC channel belong to the
process that opened them, and a forked child using them would corrupt the lock table or hang.
A store checks which process it is in and says so, instead of failing in either of those ways.
"""

from __future__ import annotations

import os

from chunkstore.errors import ChunkstoreError


class OpenedIn:
    """The process that opened ``what``; :meth:`check` raises in any other (a forked child).
    ``reopens``: whether a forked child may open its own (a gRPC connection may; an LMDB
    environment may not while the child holds the parent's copy)."""

    def __init__(self, what: str, reopens: bool = False) -> None:
        self._pid = os.getpid()
        self._what = what
        self._reopens = reopens

    def check(self) -> None:
        if os.getpid() != self._pid:
            remedy = (
                "connect again in this process"
                if self._reopens
                else "open it in a process started with multiprocessing's 'spawn' method (a "
                "forked child cannot open it again while it holds the copy)"
            )
            raise ChunkstoreError(
                f"{self._what} was opened in process {self._pid}, which this one was forked "
                f"from: use it there, or {remedy}"
            )
