"""The node's group commit: batches waiting together share one synced transaction, and a failed
transaction fails every batch in it and stores nothing of any of them."""

from __future__ import annotations

import os
import threading

import lmdb
import pytest

from chunkstore.errors import StoreUnavailable
from chunkstore.server.group_commit import GroupCommit, _settle
from chunkstore.stores.lmdb_store import LmdbStore


class HeldStore(LmdbStore):
    """An LmdbStore whose next put waits until released, and which counts its puts."""

    def __init__(self, path):
        super().__init__(path)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.puts: list[int] = []  # chunks per put

    def put(self, chunks):
        self.entered.set()
        self.release.wait(10)
        self.puts.append(len(chunks))
        return super().put(chunks)


@pytest.fixture
def store(tmp_path):
    s = HeldStore(tmp_path / "store")
    yield s
    s.close()


def chunks(n: int, size: int = 100) -> list[tuple[bytes, bytes]]:
    return [(os.urandom(32), os.urandom(size)) for _ in range(n)]


def hold(store: HeldStore, committer: GroupCommit) -> None:
    """Keep the committer busy with one batch, so that the next ones wait together."""
    store.release.clear()
    store.entered.clear()
    committer.put(chunks(1))
    assert store.entered.wait(10)


def test_batches_waiting_together_share_one_transaction(store):
    committer = GroupCommit(store)
    hold(store, committer)
    a, b = chunks(3), chunks(2, size=50)
    b.append(a[0])  # stored by a, so b does not add it again
    futures = [committer.put(a), committer.put(b)]
    store.release.set()
    assert [f.result(10) for f in futures] == [300, 100]
    assert store.puts == [1, 6]  # the held batch alone, then both in one transaction
    assert store.holds([cid for cid, _ in a + b]) == {cid for cid, _ in a + b}
    again = committer.put(a)
    assert again.result(10) == 0
    committer.close()


def test_a_failed_group_fails_every_batch_in_it_and_stores_nothing(store):
    committer = GroupCommit(store)
    hold(store, committer)
    good, bad = chunks(3), chunks(2)
    bad[1] = (b"k" * 600, b"value")  # a key LMDB refuses: the transaction fails
    futures = [committer.put(good), committer.put(bad)]
    store.release.set()
    for future in futures:
        with pytest.raises(lmdb.Error):
            future.result(10)
    assert store.holds([cid for cid, _ in good + bad[:1]]) == set()
    after = committer.put(chunks(1))  # the committer goes on
    assert after.result(10) == 100
    committer.close()


def test_batches_from_many_threads_are_all_committed(store):
    committer = GroupCommit(store)
    results: list[int] = []
    lock = threading.Lock()

    def writer() -> None:
        for _ in range(10):
            added = committer.put(chunks(4, size=10)).result(10)
            with lock:
                results.append(added)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [40] * 40
    assert store.totals().chunks == 160
    committer.close()


def test_close_commits_what_waits_then_refuses(store):
    committer = GroupCommit(store)
    hold(store, committer)
    waiting = committer.put(chunks(2))
    closing = threading.Thread(target=committer.close)
    closing.start()
    store.release.set()
    closing.join(10)
    assert waiting.result(0) == 200
    with pytest.raises(StoreUnavailable):
        committer.put(chunks(1))


def test_settle_moves_the_difference_to_the_last_batches():
    assert _settle([10, 20, 30], 60) == [10, 20, 30]
    assert _settle([10, 20, 30], 25) == [10, 15, 0]
    assert _settle([10, 20, 30], 70) == [10, 20, 40]
