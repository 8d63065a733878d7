"""Group commit: the verified batches of every PutChunks stream of a node, written together.

A synced LMDB commit costs a disk flush, and LMDB has a single writer anyway. One thread takes
every batch waiting when it becomes free and writes them in one transaction, committed with
sync; each batch is acknowledged (its future resolved) only after that commit. A transaction
that fails fails every batch in it, and stores nothing of any of them. While it commits, the
streams verify their next batches, which then make up the next group.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from chunkstore import errors
from chunkstore.stores.lmdb_store import LmdbStore

MiB = 1 << 20
GROUP_BYTES = 64 * MiB  # blob bytes of one transaction at most (a batch is never split)

Chunk = tuple[bytes, bytes | memoryview]


@dataclass(eq=False)
class _Batch:
    chunks: Sequence[Chunk]
    size: int
    done: Future = field(default_factory=Future)


class GroupCommit:
    """Writes batches of chunks to ``store`` on one thread, as many per transaction as are
    waiting (up to ``group_bytes``). Thread-safe; :meth:`close` finishes what was submitted.
    """

    def __init__(self, store: LmdbStore, group_bytes: int = GROUP_BYTES) -> None:
        self._store = store
        self._group_bytes = group_bytes
        self._cond = threading.Condition()
        self._waiting: list[_Batch] = []
        self._closed = False
        self._thread: threading.Thread | None = None

    def put(self, chunks: Sequence[Chunk]) -> Future:
        """Queue ``chunks`` (verified) for the next transaction. The future gives the blob
        bytes they added once committed durably, or the error that failed their transaction.
        """
        batch = _Batch(chunks, sum(len(blob) for _, blob in chunks))
        with self._cond:
            if self._closed:
                raise errors.StoreUnavailable("the node is shutting down")
            self._waiting.append(batch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
                self._thread.start()
            self._cond.notify()
        return batch.done

    def close(self) -> None:
        """Commit what is waiting, then stop the thread; later puts raise StoreUnavailable."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._closed)
                if not self._waiting:
                    return
                group = [self._waiting.pop(0)]
                size = group[0].size
                while self._waiting and size + self._waiting[0].size <= self._group_bytes:
                    group.append(self._waiting.pop(0))
                    size += group[-1].size
            self._commit(group)

    def _commit(self, group: list[_Batch]) -> None:
        try:
            added = self._write(group)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting stream
            for batch in group:
                batch.done.set_exception(exc)
            return
        for batch, nbytes in zip(group, added, strict=True):
            batch.done.set_result(nbytes)

    def _write(self, group: list[_Batch]) -> list[int]:
        """One transaction for the group; the bytes each batch added."""
        if len(group) == 1:
            return [self._store.put(group[0].chunks)]
        # The store reports what a whole transaction added; each batch is credited with its
        # chunks that were not stored before and not in an earlier batch of the group.
        everything = [chunk for batch in group for chunk in batch.chunks]
        seen = set(self._store.holds([cid for cid, _ in everything]))
        added = []
        for batch in group:
            nbytes = 0
            for cid, blob in batch.chunks:
                if cid not in seen:
                    seen.add(cid)
                    nbytes += len(blob)
            added.append(nbytes)
        total = self._store.put(everything)
        return _settle(added, total)


def _settle(added: list[int], total: int) -> list[int]:
    """``added`` corrected to sum to ``total``: another writer may have stored or removed a
    chunk between the look and the write; the difference goes to the last batches."""
    out = list(added)
    excess = sum(out) - total
    for i in reversed(range(len(out))):
        if excess <= 0:
            break
        take = min(out[i], excess)
        out[i] -= take
        excess -= take
    if excess < 0:
        out[-1] -= excess
    return out
