"""The store protocol on every store (``store`` fixture), then what only LmdbStore promises."""

from __future__ import annotations

import errno
import mmap
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb
import pytest
from conftest import random_bytes, rss_file_kib

from chunkstore import ids
from chunkstore.errors import (
    ChunkNotFound,
    ChunkstoreError,
    CorruptChunk,
    CorruptStore,
    InvalidInput,
    NotFound,
    PermissionDenied,
    StageClaimed,
    StoreFull,
    StoreUnavailable,
)
from chunkstore.model import Manifest, encode_version
from chunkstore.stores import ChunkTotals, LmdbStore, Store, base, lmdb_store, memory
from chunkstore.stores.resident import FaultBudget
from chunkstore.v1 import model_pb2

ROOT = Path(__file__).resolve().parents[1]
KB = 1 << 10
STAGE = model_pb2.Stage(repo="r", message="m").SerializeToString()
STAGED = model_pb2.StagedFile(new_bytes=1).SerializeToString()


def blob(raw: bytes) -> bytes:
    """A blob in the raw codec (id 0): 1 byte codec, 4 bytes length, the raw bytes."""
    return bytes([0]) + len(raw).to_bytes(4, "little") + raw


def record(repo: str, n: int) -> tuple[bytes, bytes]:
    """``(id, record)`` of version number ``n`` of ``repo``: a real record, as nodes accept."""
    return encode_version(
        repo=repo,
        parents=[],
        created_ns=n,
        author="tester",
        message=f"v{n}",
        files=[],
        params={},
        metrics={},
        inputs=[],
        new_bytes=0,
    )


def manifest(key: str, chunks: int = 1) -> tuple[bytes, bytes]:
    """``(id, record)`` of a real manifest, one per ``key``, of ``chunks`` chunks: as nodes
    accept."""
    listed = [(ids.chunk_id(f"{key}/{i}".encode()), 1) for i in range(chunks)]
    return Manifest(len(listed), listed).encode()


def large_manifest(key: str, nbytes: int) -> tuple[bytes, bytes]:
    """``(id, record)`` of a real manifest of at least ``nbytes`` bytes (one chunk of ``key``
    listed again and again: 38 bytes each)."""
    count = nbytes // 38 + 1
    return Manifest(count, [(ids.chunk_id(key.encode()), 1)] * count).encode()


def chunks(n: int, size: int = 100, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """``n`` distinct (id, blob) pairs with ``size`` raw bytes each."""
    out = []
    for i in range(n):
        raw = (seed * 1_000_003 + i).to_bytes(8, "little") * (size // 8)
        out.append((ids.chunk_id(raw), blob(raw)))
    return out


def stored(store: Store, pairs: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    return dict(store.get([cid for cid, _ in pairs]))


class ExplodingList(list):
    """A batch that fails while it is being stored, at its third item."""

    def __iter__(self):
        for i, item in enumerate(super().__iter__()):
            if i == 2:
                raise RuntimeError("boom")
            yield item


# chunks, on every store


def test_put_get_scan_totals(store: Store):
    pairs = chunks(5)
    assert store.put(pairs) == sum(len(b) for _, b in pairs)
    assert stored(store, pairs) == dict(pairs)
    assert sorted((i.id, i.stored_size) for i in store.scan()) == sorted(
        (cid, len(b)) for cid, b in pairs
    )
    assert store.totals().chunks == 5
    assert store.totals().stored_bytes == sum(len(b) for _, b in pairs)
    assert store.missing([cid for cid, _ in pairs]) == set()


def test_empty_store(store: Store):
    assert list(store.scan()) == []
    assert (store.totals().chunks, store.totals().stored_bytes) == (0, 0)
    assert store.put([]) == 0
    assert list(store.get([])) == []
    assert store.delete([]) == 0


def test_put_of_existing_id_keeps_first_blob(store: Store):
    (cid, first), (_, other) = chunks(2)
    assert store.put([(cid, first), (cid, other)]) == len(first)  # duplicate within a batch
    assert store.put([(cid, other)]) == 0
    assert stored(store, [(cid, first)]) == {cid: first}
    assert store.totals().stored_bytes == len(first)


def test_get_of_absent_id_raises(store: Store):
    pairs = chunks(2)
    store.put(pairs[:1])
    with pytest.raises(ChunkNotFound) as info:
        list(store.get([pairs[0][0], pairs[1][0]]))
    assert info.value.chunk_id == pairs[1][0]


def two_of_three_stored(store: Store) -> tuple[list[tuple[bytes, bytes]], dict[bytes, float]]:
    """Three chunks, the first two stored; their wanted_at, and a pause so that a mark shows."""
    pairs = chunks(3)
    store.put(pairs[:2])
    before = {i.id: i.wanted_at for i in store.scan()}
    time.sleep(0.01)
    return pairs, before


def test_missing_reports_absent_and_refreshes_wanted_at(store: Store, monkeypatch):
    monkeypatch.setattr(lmdb_store, "WANTED_REFRESH_SECONDS", 0.0)
    pairs, before = two_of_three_stored(store)
    asked = [pairs[0][0], pairs[2][0]]
    assert store.missing(asked) == {pairs[2][0]}
    after = {i.id: i.wanted_at for i in store.scan()}
    assert after[pairs[0][0]] > before[pairs[0][0]]
    assert after[pairs[1][0]] == before[pairs[1][0]]  # not asked about
    assert pairs[2][0] not in after  # asking stores nothing


def test_lacking_then_mark_wanted_marks_what_was_found(store: Store, monkeypatch):
    monkeypatch.setattr(lmdb_store, "WANTED_REFRESH_SECONDS", 0.0)
    pairs, before = two_of_three_stored(store)
    every = [cid for cid, _ in pairs]
    assert store.lacking(every) == {pairs[2][0]}
    assert store.mark_wanted(every) == {pairs[2][0]}  # names what is not stored
    after = {i.id: i.wanted_at for i in store.scan()}
    assert all(after[cid] > before[cid] for cid, _ in pairs[:2])
    assert pairs[2][0] not in after  # asking stores nothing


def test_lmdb_lacking_defers_marks_and_mark_wanted_names_chunks_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(lmdb_store, "WANTED_REFRESH_SECONDS", 0.0)
    with LmdbStore(tmp_path / "s") as store:
        pairs = chunks(3)
        store.put(pairs)
        before = {i.id: i.wanted_at for i in store.scan()}
        time.sleep(0.01)
        assert store.lacking([cid for cid, _ in pairs]) == set()
        assert {i.id: i.wanted_at for i in store.scan()} == before  # no write yet
        store.delete([pairs[2][0]], unwanted_since=time.time())  # a GC with no grace
        assert store.mark_wanted([cid for cid, _ in pairs]) == {pairs[2][0]}
        after = {i.id: i.wanted_at for i in store.scan()}
        assert all(after[cid] > before[cid] for cid, _ in pairs[:2])


def test_lmdb_missing_skips_refreshing_recently_wanted_chunks(tmp_path):
    with LmdbStore(tmp_path / "s") as store:
        pairs = chunks(2)
        store.put(pairs)
        before = {i.id: i.wanted_at for i in store.scan()}
        assert store.missing([cid for cid, _ in pairs]) == set()
        assert {i.id: i.wanted_at for i in store.scan()} == before


def test_put_refreshes_wanted_at_of_existing(store: Store):
    pairs = chunks(1)
    store.put(pairs)
    (before,) = store.scan()
    time.sleep(0.01)
    store.put(pairs)
    (after,) = store.scan()
    assert after.wanted_at > before.wanted_at


def test_delete(store: Store):
    pairs = chunks(3)
    store.put(pairs)
    absent = chunks(1, seed=9)[0][0]
    assert store.delete([pairs[0][0], pairs[1][0], absent]) == 2
    assert store.missing([cid for cid, _ in pairs]) == {pairs[0][0], pairs[1][0]}
    assert [i.id for i in store.scan()] == [pairs[2][0]]
    assert (store.totals().chunks, store.totals().stored_bytes) == (1, len(pairs[2][1]))
    assert store.put(pairs[:1]) == len(pairs[0][1])  # can be stored again


def test_delete_spares_chunks_wanted_since_cutoff(store: Store):
    old, young = chunks(2)
    store.put([old])
    cutoff = time.time()
    time.sleep(0.01)
    store.put([young])
    assert store.delete([old[0], young[0]], unwanted_since=cutoff) == 1
    assert store.missing([old[0], young[0]]) == {old[0]}
    assert store.totals() == ChunkTotals(1, len(young[1]))
    # An existence check counts as wanting: GC must not take a chunk a push was told exists.
    assert store.missing([young[0]]) == set()
    assert store.delete([young[0]], unwanted_since=time.time() - 60) == 0


def test_put_is_all_or_nothing(store: Store):
    with pytest.raises(RuntimeError, match="boom"):
        store.put(ExplodingList(chunks(5)))
    assert list(store.scan()) == []
    assert store.totals().stored_bytes == 0


def test_read_verifies(store: Store):
    raw = b"weights" * 100
    good = ids.chunk_id(raw)
    bad = ids.chunk_id(b"something else")
    store.put([(good, blob(raw)), (bad, blob(raw))])
    assert dict(store.read([good], workers=1)) == {good: raw}
    with pytest.raises(CorruptChunk):
        list(store.read([good, bad]))


def test_concurrent_writers(store: Store):
    batches = [chunks(20, seed=s) for s in range(8)]
    failures: list[BaseException] = []

    def write(mine: list[list[tuple[bytes, bytes]]]) -> None:
        try:
            for batch in mine:
                store.put(batch)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=write, args=(batches[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert store.totals().chunks == 160


# manifests, versions, tags, on every store


def test_manifests(store: Store):
    (m1, one), (m2, two), (m3, _) = manifest("one"), manifest("two"), manifest("three")
    store.put_manifest(m1, one)
    store.put_manifest(m2, two)
    assert store.get_manifest(m1) == one
    assert store.has_manifests([m1, m3]) == {m1}
    assert sorted(mid for mid, _ in store.scan_manifests()) == sorted([m1, m2])
    assert store.delete_manifests([m1, m3]) == 1
    assert [mid for mid, _ in store.scan_manifests()] == [m2]
    with pytest.raises(NotFound):
        store.get_manifest(m1)
    assert store.delete_manifests([m1]) == 0


def test_put_manifests_stores_each_and_refreshes_stored_at(store: Store):
    records = [manifest(f"m{i}", i + 1) for i in range(300)]
    old = records[0][0]
    store.put_manifest(old, records[0][1])
    ((_, first),) = store.scan_manifests()
    time.sleep(0.01)
    store.put_manifests(records)
    assert store.has_manifests([mid for mid, _ in records]) == {mid for mid, _ in records}
    assert all(store.get_manifest(mid) == data for mid, data in records)
    stored_at = dict(store.scan_manifests())
    assert stored_at[old] > first and len(stored_at) == 300
    store.put_manifests([])
    assert store.delete_manifests([mid for mid, _ in records]) == 300


def test_get_manifests_in_order_and_an_absent_one_is_not_found(store: Store):
    records = [manifest(f"g{i}") for i in range(300)]
    store.put_manifests(records)
    wanted = [mid for mid, _ in reversed(records)] + [records[5][0]]
    assert store.get_manifests(wanted) == [data for _, data in reversed(records)] + [records[5][1]]
    assert store.get_manifests([]) == []
    absent = manifest("absent")[0]
    with pytest.raises(NotFound, match=absent.hex()):
        store.get_manifests([records[0][0], absent])
    assert store.delete_manifests([mid for mid, _ in records]) == 300


def test_put_manifest_again_keeps_data_and_refreshes_stored_at(store: Store):
    mid, data = manifest("m")
    started = time.time()
    store.put_manifest(mid, data)
    ((_, first),) = store.scan_manifests()
    assert started <= first <= time.time()
    time.sleep(0.01)
    store.put_manifest(mid, data)
    ((_, second),) = store.scan_manifests()
    assert second > first
    assert store.get_manifest(mid) == data


def test_versions(store: Store):
    (v1, one), (v2, two), (other, in_r2) = record("r", 1), record("r", 2), record("r2", 1)
    store.put_version("r", v1, one)
    store.put_version("r", v1, one)  # idempotent
    store.put_version("r", v2, two)
    store.put_version("r2", other, in_r2)
    assert store.get_version("r", v2) == two
    assert sorted(store.list_versions("r")) == sorted([(v1, one), (v2, two)])
    assert store.list_versions("nope") == []
    with pytest.raises(NotFound):
        store.get_version("r", record("r", 3)[0])
    with pytest.raises(NotFound):
        store.get_version("r3", v1)
    with pytest.raises(NotFound):
        store.delete_version("r", record("r", 3)[0])


def test_tags(store: Store):
    (v1, one), (v2, two) = record("r", 1), record("r", 2)
    store.put_version("r", v1, one)
    store.put_version("r", v2, two)
    store.set_tag("r", "t", v1)
    store.set_tag("r", "t", v2)  # moves
    store.set_tag("r", "best.v_1-x", v1)
    assert store.tags("r") == {"t": v2, "best.v_1-x": v1}
    assert store.tags("r2") == {}
    store.delete_tag("r", "t")
    assert store.tags("r") == {"best.v_1-x": v1}
    with pytest.raises(NotFound):
        store.delete_tag("r", "t")
    with pytest.raises(NotFound):
        store.set_tag("r", "t", record("r", 3)[0])  # no such version
    assert store.tags("r") == {"best.v_1-x": v1}


def test_delete_version_removes_its_tags(store: Store):
    for repo in ("r", "r2"):
        (v1, one), (v2, two) = record(repo, 1), record(repo, 2)
        store.put_version(repo, v1, one)
        store.put_version(repo, v2, two)
        store.set_tag(repo, "a", v1)
        store.set_tag(repo, "b", v1)
        store.set_tag(repo, "c", v2)
    (v1, _), (v2, two) = record("r", 1), record("r", 2)
    store.delete_version("r", v1)
    assert store.tags("r") == {"c": v2}
    (w1, _), (w2, _) = record("r2", 1), record("r2", 2)
    assert store.tags("r2") == {"a": w1, "b": w1, "c": w2}
    assert store.list_versions("r") == [(v2, two)]


def test_list_repos(store: Store):
    assert store.list_repos() == []
    for repo in ("b", "a-b", "a", "ab", "a"):
        for n in (1, 2):
            store.put_version(repo, *record(repo, n))
    assert store.list_repos() == ["a", "a-b", "ab", "b"]
    for n in (1, 2):
        store.delete_version("ab", record("ab", n)[0])
    assert store.list_repos() == ["a", "a-b", "b"]


def new_stage(store: Store) -> bytes:
    """The id of a new stage holding one file ``a``."""
    stage_id = os.urandom(16)
    store.put_stage(stage_id, STAGE)
    store.put_stage_file(stage_id, "a", STAGED)
    return stage_id


def test_a_delete_retried_by_its_claimant_succeeds_and_nobody_elses(store: Store):
    """A claimant whose delete removed the stage, but whose answer was lost, tries again and
    succeeds; another claimant, or none, finds the stage gone."""
    sid, mine, other = new_stage(store), os.urandom(16), os.urandom(16)
    store.delete_stage(sid, mine)
    assert sid not in dict(store.list_stages()) and store.stage_files(sid) == {}
    store.delete_stage(sid, mine)  # the retry
    for claimant in (other, None):
        with pytest.raises(NotFound, match=f"stage {sid.hex()} not found"):
            store.delete_stage(sid, claimant)
    with pytest.raises(NotFound):
        store.claim_stage(sid)
    with pytest.raises(NotFound):
        store.get_stage(sid)
    assert sid not in dict(store.list_stages())  # what is remembered is no stage

    store.restore_stage(sid, mine, STAGE, {"a": STAGED})  # a commit that failed puts it back
    store.delete_stage(sid, other)  # then another claims it
    store.delete_stage(sid, other)
    with pytest.raises(NotFound):
        store.delete_stage(sid, mine)  # only the last delete's claimant is remembered
    store.restore_stage(sid, other, STAGE, {})
    store.delete_stage(sid)  # a delete without a claimant (abort, GC) leaves none to retry
    for claimant in (mine, other):
        with pytest.raises(NotFound):
            store.delete_stage(sid, claimant)


def test_only_the_claimant_that_deleted_a_stage_puts_it_back_and_once(store: Store):
    """Once a claimant deleted a stage, nobody else can make it exist again while that is
    remembered: not another claimant's put-back, nor a PutStage (a repair's copy). Its own
    put-back re-creates it as given, once; a stage that is there is left as it is."""
    sid, mine, other = new_stage(store), os.urandom(16), os.urandom(16)
    store.delete_stage(sid, mine)
    for put in (
        lambda: store.restore_stage(sid, other, STAGE, {"a": STAGED}),
        lambda: store.put_stage(sid, STAGE),
    ):
        with pytest.raises(StageClaimed, match=f"stage {sid.hex()} was claimed"):
            put()
        assert sid not in dict(store.list_stages()) and store.stage_files(sid) == {}
    store.restore_stage(sid, mine, STAGE, {"a": STAGED, "b": STAGED})
    assert store.get_stage(sid) == STAGE and store.stage_files(sid) == {"a": STAGED, "b": STAGED}
    store.restore_stage(sid, other, b"other", {})  # there: left as it is
    assert store.get_stage(sid) == STAGE and store.stage_files(sid) == {"a": STAGED, "b": STAGED}
    store.delete_stage(sid, other)
    with pytest.raises(StageClaimed):  # a late repeat of the first put-back: too late
        store.restore_stage(sid, mine, STAGE, {"a": STAGED})
    assert sid not in dict(store.list_stages())
    store.restore_stage(sid, other, STAGE, {})
    store.delete_stage(sid)  # an abort: nobody may put it back
    for claimant in (mine, other):
        with pytest.raises(StageClaimed):
            store.restore_stage(sid, claimant, STAGE, {})
    assert sid not in dict(store.list_stages())
    claimed = new_stage(store)
    assert store.claim_stage(claimed, mine) == (STAGE, {"a": STAGED})
    with pytest.raises(StageClaimed):
        store.put_stage(claimed, STAGE)
    store.restore_stage(claimed, mine, STAGE, {"a": STAGED})  # a commit that failed
    assert store.claim_stage(claimed, other) == (STAGE, {"a": STAGED})


def test_a_put_back_with_a_bad_claimant_is_refused_and_changes_nothing(store: Store):
    sid, mine = new_stage(store), os.urandom(16)
    store.delete_stage(sid, mine)
    for claimant in (b"", b"c" * 15, b"c" * 17):
        with pytest.raises(InvalidInput, match=f"has 16 bytes, got {len(claimant)}"):
            store.restore_stage(sid, claimant, STAGE, {})
    kept = new_stage(store)
    with pytest.raises(InvalidInput, match="has 16 bytes, got 3; nothing was changed"):
        store.claim_stage(kept, b"abc")
    assert dict(store.list_stages()) == {kept: STAGE} and store.stage_files(kept) == {"a": STAGED}
    store.restore_stage(sid, mine, STAGE, {})
    assert store.get_stage(sid) == STAGE


def test_a_claimant_of_the_wrong_size_is_refused_and_deletes_nothing(store: Store):
    sid = new_stage(store)
    for claimant in (b"", b"c" * 15, b"c" * 17, b"c" * 32):
        with pytest.raises(InvalidInput, match=f"has 16 bytes, got {len(claimant)}; nothing was"):
            store.delete_stage(sid, claimant)
    assert store.get_stage(sid) == STAGE and store.stage_files(sid) == {"a": STAGED}
    assert sid in dict(store.list_stages())
    store.delete_stage(sid)


class Clock:
    """The time as the stores see it (the ``time`` of their modules), moved by hand."""

    def __init__(self, monkeypatch) -> None:
        self.now = time.time()
        for module in (lmdb_store, memory):
            monkeypatch.setattr(module, "time", self)

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


def test_a_claimant_is_remembered_for_an_hour(store: Store, monkeypatch):
    clock = Clock(monkeypatch)
    sid, mine = new_stage(store), os.urandom(16)
    store.delete_stage(sid, mine)
    clock.now += base.CLAIM_KEPT_SECONDS - 1
    store.delete_stage(sid, mine)
    clock.now += 2
    with pytest.raises(NotFound):
        store.delete_stage(sid, mine)


def test_a_claimant_is_remembered_until_its_stage_expires(store: Store, monkeypatch):
    """A copy of a claimed stage left on an owner that was down (which a repair would copy
    back) is refused for as long as the stage could still be committed, not only for an hour;
    an hour after the stage has expired (clocks differ), nothing could commit it, and the note
    goes."""
    clock = Clock(monkeypatch)
    day = 24 * 3600
    record = model_pb2.Stage(repo="r", expires_ns=int((clock.now + day) * 1e9))
    sid, mine = os.urandom(16), os.urandom(16)
    store.put_stage(sid, record.SerializeToString())
    store.claim_stage(sid, mine)
    clock.now += day + base.CLAIM_KEPT_SECONDS - 1
    with pytest.raises(StageClaimed):
        store.put_stage(sid, record.SerializeToString())
    store.delete_stage(sid, mine)  # its claimant's retry still succeeds
    assert store.list_stages() == []
    clock.now += 2
    with pytest.raises(StageClaimed):
        store.restore_stage(sid, mine, STAGE, {})  # forgotten: not even its claimant
    store.put_stage(sid, record.SerializeToString())
    assert store.get_stage(sid) == record.SerializeToString()


def test_a_copy_carrying_the_release_of_the_noted_claimant_is_accepted(store: Store):
    """A claimant that lost, and could not put the stage back where it deleted it, releases
    its claim; a copy of the stage that carries that release is accepted where the delete is
    noted (and the note goes), one carrying another claimant's release is not."""
    sid, mine, other = new_stage(store), os.urandom(16), os.urandom(16)
    store.delete_stage(sid, mine)
    with pytest.raises(StageClaimed):
        store.put_stage(sid, STAGE, released=[other])
    assert store.list_stages() == []
    store.put_stage(sid, STAGE, released=[other, mine])
    assert store.get_stage(sid) == STAGE
    store.delete_stage(sid)
    store.put_stage(sid, STAGE)  # the note went with the copy it let in


def test_a_released_claim_is_remembered_as_long_as_its_delete_would_be(store: Store, monkeypatch):
    clock = Clock(monkeypatch)
    day = 24 * 3600
    record = model_pb2.Stage(repo="r", expires_ns=int((clock.now + day) * 1e9))
    sid, mine = os.urandom(16), os.urandom(16)
    store.release_claim(sid, mine, record.SerializeToString())  # held here or not
    assert store.released_claims(sid) == {mine}
    assert store.released_claims(os.urandom(16)) == set()
    clock.now += day + base.CLAIM_KEPT_SECONDS - 1
    assert store.released_claims(sid) == {mine}
    clock.now += 2
    assert store.released_claims(sid) == set()


def test_releasing_a_claim_drops_the_note_of_its_delete_here(store: Store):
    sid, mine, other = new_stage(store), os.urandom(16), os.urandom(16)
    store.delete_stage(sid, mine)
    store.release_claim(sid, other, STAGE)
    with pytest.raises(StageClaimed):
        store.put_stage(sid, STAGE)
    store.release_claim(sid, mine, STAGE)
    assert store.released_claims(sid) == {mine, other}
    store.put_stage(sid, STAGE)
    assert store.get_stage(sid) == STAGE


def test_a_release_with_a_bad_claimant_is_refused_and_changes_nothing(store: Store):
    sid, mine = new_stage(store), os.urandom(16)
    store.delete_stage(sid, mine)
    for claimant in (b"", b"c" * 15, b"c" * 17):
        with pytest.raises(InvalidInput, match=f"has 16 bytes, got {len(claimant)}"):
            store.release_claim(sid, claimant, STAGE)
        with pytest.raises(InvalidInput, match=f"has 16 bytes, got {len(claimant)}"):
            store.put_stage(sid, STAGE, released=[mine, claimant])
    assert store.released_claims(sid) == set()
    assert store.list_stages() == []
    with pytest.raises(StageClaimed):
        store.put_stage(sid, STAGE)


# LmdbStore only


def stage_claims(path: Path, db: bytes = b"stage_claims") -> int:
    """How many claimants the closed store at ``path`` remembers (with ``db``
    ``b"stage_releases"``: how many releases)."""
    with (
        lmdb.open(str(path), max_dbs=16, readonly=True, lock=False) as env,
        env.begin() as txn,
    ):
        return txn.stat(env.open_db(db, txn=txn, create=False))["entries"]


def test_lmdb_forgets_claimants_as_it_deletes_stages_later(tmp_path, monkeypatch):
    """Claimants are not kept for ever: every removal of a stage drops those older than
    CLAIM_KEPT_SECONDS (then no claimant's retry could still come)."""
    clock = Clock(monkeypatch)
    path = tmp_path / "s"
    with LmdbStore(path) as store:
        for _ in range(20):
            store.delete_stage(new_stage(store), os.urandom(16))
        assert store.list_stages() == []
    assert stage_claims(path) == 20
    clock.now += base.CLAIM_KEPT_SECONDS
    with LmdbStore(path) as store:
        sid, mine = new_stage(store), os.urandom(16)
        store.delete_stage(sid, mine)
        store.delete_stage(sid, mine)
        store.claim_stage(new_stage(store))  # a claim in one transaction notes nobody
    assert stage_claims(path) == 1


def test_lmdb_forgets_releases_as_it_notes_later_ones(tmp_path, monkeypatch):
    clock = Clock(monkeypatch)
    path = tmp_path / "s"
    with LmdbStore(path) as store:
        for _ in range(20):
            store.release_claim(os.urandom(16), os.urandom(16), STAGE)
    assert stage_claims(path, b"stage_releases") == 20
    clock.now += base.CLAIM_KEPT_SECONDS
    with LmdbStore(path) as store:
        store.release_claim(os.urandom(16), os.urandom(16), STAGE)
    assert stage_claims(path, b"stage_releases") == 1


def test_lmdb_reads_the_claimant_notes_of_an_earlier_release(tmp_path, monkeypatch):
    """Notes of the time and claimant only, as an earlier release wrote them, are kept for
    CLAIM_KEPT_SECONDS."""
    clock = Clock(monkeypatch)
    path = tmp_path / "s"
    mine = os.urandom(16)
    with LmdbStore(path) as store:
        sid = new_stage(store)
        store.delete_stage(sid, mine)
    with lmdb.open(str(path), max_dbs=16) as env, env.begin(write=True) as txn:
        claims = env.open_db(b"stage_claims", txn=txn, create=False)
        txn.put(sid, struct.pack("<d", clock.now) + mine, db=claims)
    clock.now += base.CLAIM_KEPT_SECONDS - 1
    with LmdbStore(path) as store:
        store.delete_stage(sid, mine)
        with pytest.raises(StageClaimed):
            store.put_stage(sid, STAGE)
        clock.now += 2
        store.put_stage(sid, STAGE)
        assert store.get_stage(sid) == STAGE


def test_an_lmdb_store_made_before_stage_claims_gets_them_when_opened_to_write(tmp_path):
    path = tmp_path / "s"
    with LmdbStore(path) as store:
        sid = new_stage(store)
    with lmdb.open(str(path), max_dbs=16) as env, env.begin(write=True) as txn:
        for db in (b"stage_claims", b"stage_releases"):
            txn.drop(env.open_db(db, txn=txn, create=False), delete=True)
    before = (path / "data.mdb").read_bytes()
    with LmdbStore(path, readonly=True) as store:
        assert store.list_stages() == [(sid, STAGE)]
        assert store.released_claims(sid) == set()
    assert (path / "data.mdb").read_bytes() == before  # opened to read, it adds nothing
    with LmdbStore(path) as store:
        mine = os.urandom(16)
        store.delete_stage(sid, mine)
        store.delete_stage(sid, mine)
        store.release_claim(sid, mine, STAGE)
    assert stage_claims(path) == 0  # the release dropped the note of its delete
    assert stage_claims(path, b"stage_releases") == 1


def test_lmdb_map_grows(tmp_path):
    with LmdbStore(tmp_path / "s", map_size=64 * KB) as store:
        batches = [chunks(16, size=16 * KB, seed=s) for s in range(16)]  # 4 MiB
        batches.append(chunks(64, size=32 * KB, seed=99))  # 2 MiB in one transaction
        for batch in batches:
            store.put(batch)
        every = [pair for batch in batches for pair in batch]
        assert stored(store, every) == dict(every)
        assert store.totals().stored_bytes == sum(len(b) for _, b in every)
        used, size = store.map_usage()
        assert size > 64 * KB and used <= size


def test_lmdb_grows_under_concurrent_readers(tmp_path):
    """Resizes and aborts wait for reads in other threads, neither starving nor deadlocking."""
    with LmdbStore(tmp_path / "s", map_size=64 * KB) as store:
        base = chunks(4, size=4 * KB, seed=1)
        store.put(base)
        done = threading.Event()
        failures: list[BaseException] = []

        def read() -> None:
            try:
                while not done.is_set():
                    assert stored(store, base) == dict(base)
                    assert len(list(store.scan())) >= 4
                    store.totals()
            except BaseException as e:
                failures.append(e)

        readers = [threading.Thread(target=read) for _ in range(3)]
        for t in readers:
            t.start()
        started = time.monotonic()
        for s in range(2, 40):
            store.put(chunks(8, size=16 * KB, seed=s))
            with pytest.raises(NotFound):  # a write that aborts
                store.delete_tag("r", "absent")
        elapsed = time.monotonic() - started
        done.set()
        for t in readers:
            t.join()
        assert failures == []
        assert store.totals().chunks == 4 + 38 * 8
        assert elapsed < 30  # py-lmdb's abort waits for idle readers: it must not starve


def test_lmdb_write_while_iterating(tmp_path):
    """A half-consumed get() or scan() holds no transaction, so a growing write can proceed."""
    with LmdbStore(tmp_path / "s", map_size=64 * KB) as store:
        first = chunks(4, size=4 * KB)
        store.put(first)
        reading, scanning = store.get([cid for cid, _ in first]), store.scan()
        next(reading), next(scanning)
        store.put(chunks(64, size=16 * KB, seed=1))  # 1 MiB: the map must grow
        assert len(list(reading)) == 3 and len(list(scanning)) >= 3


def test_lmdb_scan_resumes_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr("chunkstore.stores.lmdb_store._SCAN_BATCH", 3)
    with LmdbStore(tmp_path / "s") as store:
        pairs = chunks(10)
        store.put(pairs)
        scanned = [i.id for i in store.scan()]
        assert scanned == sorted(cid for cid, _ in pairs)
        for i in range(7):
            store.put_manifest(bytes([i]), b"m")
        assert [mid for mid, _ in store.scan_manifests()] == [bytes([i]) for i in range(7)]


def test_lmdb_data_survives_close_and_processes(tmp_path):
    path = tmp_path / "s"
    code = (
        "import sys\n"
        "from chunkstore.stores import LmdbStore\n"
        "from test_stores import chunks\n"
        "with LmdbStore(sys.argv[1]) as s:\n"
        "    s.put(chunks(10))\n"
        "    s.put_version('r', b'v1', b'record')\n"
        "    s.set_tag('r', 't', b'v1')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    subprocess.run([sys.executable, "-c", code, str(path)], env=env, check=True, timeout=60)
    with LmdbStore(path) as store:
        assert stored(store, chunks(10)) == dict(chunks(10))
        assert store.totals().stored_bytes == sum(len(b) for _, b in chunks(10))
        assert store.tags("r") == {"t": b"v1"}
        store.put_manifest(b"m", b"manifest")
    with LmdbStore(path, readonly=True) as store:
        assert store.get_manifest(b"m") == b"manifest"
        assert store.missing([cid for cid, _ in chunks(10)]) == set()
        with pytest.raises(StoreUnavailable, match="read-only"):
            store.put(chunks(1, seed=1))


def test_a_closed_lmdb_store_says_it_is_closed(tmp_path):
    with LmdbStore(tmp_path / "s") as store:
        store.put(chunks(2))
    for call in (
        store.totals,
        lambda: store.put(chunks(1, seed=1)),
        lambda: store.get_version("r", b"v1"),
        store.writing().__enter__,
    ):
        with pytest.raises(StoreUnavailable, match=f"the store at {tmp_path / 's'} is closed"):
            call()
    store.close()  # closing again is harmless


def test_lmdb_adopts_map_grown_by_another_process(tmp_path):
    path = tmp_path / "s"
    code = (
        "import sys\n"
        "from chunkstore.stores import LmdbStore\n"
        "from test_stores import chunks\n"
        "with LmdbStore(sys.argv[1], map_size=64 * 1024) as s:\n"
        "    s.put(chunks(64, size=32 * 1024, seed=int(sys.argv[2])))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}

    def grow_elsewhere(seed: int) -> list[tuple[bytes, bytes]]:
        args = [sys.executable, "-c", code, str(path), str(seed)]
        subprocess.run(args, env=env, check=True, timeout=60)
        return chunks(64, size=32 * KB, seed=seed)

    with LmdbStore(path, map_size=64 * KB) as store:
        store.put(chunks(1))
        first = grow_elsewhere(1)
        store.put(chunks(8, size=32 * KB, seed=2))  # a write past our old map
        second = grow_elsewhere(3)
        assert stored(store, first + second) == dict(first + second)  # a read past it
        assert store.totals().chunks == 1 + 64 + 8 + 64
        assert store.map_usage()[1] >= 4 << 20


def refuse_writing(monkeypatch, reason: str) -> list[tuple[bool, bool]]:
    """Make LMDB fail as it does on a store whose files this process may not write, for
    ``reason``: with "permission denied" (another user's files) it cannot open the data file or
    the lock file to write; on a "read-only file system" it cannot open the data file to write,
    and opened to read it uses no lock file. File modes cannot show this in a test that may
    run as root, who writes any file. Returns the ``(readonly, lock)`` of each open."""
    real, opens = lmdb.open, []

    def open_(path: str, **options):
        readonly, lock = options.get("readonly", False), options.get("lock", True)
        opens.append((readonly, lock))
        if not readonly or (lock and reason == "permission denied"):
            error = lmdb.ReadonlyError if reason == "permission denied" else lmdb.Error
            raise error(f"{path}: {reason[:1].upper()}{reason[1:]}")
        return real(path, **options)

    monkeypatch.setattr(lmdb, "open", open_)
    return opens


@pytest.mark.parametrize("reason", ["permission denied", "read-only file system"])
def test_a_store_that_cannot_be_written_is_opened_to_read(tmp_path, monkeypatch, reason):
    path = tmp_path / "s"
    vid, data = record("r", 1)
    with LmdbStore(path) as store:
        store.put(chunks(3))
        store.put_version("r", vid, data)
    before = (path / "data.mdb").read_bytes()
    opens = refuse_writing(monkeypatch, reason)
    with pytest.raises(PermissionDenied, match=f"^cannot open store at {path}: {reason}$"):
        LmdbStore(path)  # to write: a node's store, say
    with LmdbStore(path, readonly=None) as store:
        assert stored(store, chunks(3)) == dict(chunks(3))
        assert store.list_versions("r") == [(vid, data)]
        assert store.missing([cid for cid, _ in chunks(4)]) == {chunks(4)[3][0]}
        for write in (
            lambda: store.put(chunks(1, seed=1)),
            lambda: store.put_version("r", *record("r", 2)),
            lambda: store.set_tag("r", "t", vid),
            lambda: store.delete([cid for cid, _ in chunks(3)]),
            store.writing().__enter__,
            store.check_may_collect,
        ):
            with pytest.raises(
                PermissionDenied, match=f"^store at {path} cannot be written: {reason}; nothing"
            ):
                write()
    with LmdbStore(path, readonly=True) as store:
        assert store.list_versions("r") == [(vid, data)]
        with pytest.raises(StoreUnavailable, match="is open read-only"):
            store.put(chunks(1, seed=1))
    assert (path / "data.mdb").read_bytes() == before
    without_lock = [(True, False)] if reason == "permission denied" else []
    assert opens == [(False, True)] + [(False, True), (True, True), *without_lock] + [
        (True, True),
        *without_lock,
    ]


def test_lmdb_unusable_paths(tmp_path):
    (tmp_path / "afile").write_bytes(b"x")
    with pytest.raises(StoreUnavailable, match="cannot open store at .*afile/store: not a dir"):
        LmdbStore(tmp_path / "afile" / "store")
    with pytest.raises(StoreUnavailable, match="cannot open store at /proc/"):
        LmdbStore("/proc/chunkstore-test/store")
    with pytest.raises(StoreUnavailable, match="no store there"):
        LmdbStore(tmp_path / "nothing", create=False)
    with pytest.raises(StoreUnavailable, match="no store there"):
        LmdbStore(tmp_path / "nothing", readonly=True)
    assert not (tmp_path / "nothing").exists()


def test_lmdb_refuses_what_is_not_a_store(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("hello")
    with pytest.raises(StoreUnavailable, match="not empty and holds no store"):
        LmdbStore(tmp_path / "docs")
    with lmdb.open(str(tmp_path / "other")) as env, env.begin(write=True) as txn:
        txn.put(b"key", b"value")
    with pytest.raises(StoreUnavailable, match="not a chunkstore store"):
        LmdbStore(tmp_path / "other")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "data.mdb").write_bytes(b"\0" * 8192)
    with pytest.raises(CorruptStore, match="store at .*junk is damaged: .* not an LMDB file"):
        LmdbStore(tmp_path / "junk")


def damaged_copies(tmp_path: Path) -> dict[str, Path]:
    """Copies of a store holding a few chunks: cut short, emptied, and with pages
    overwritten by noise."""
    with LmdbStore(tmp_path / "good") as store:
        store.put(chunks(40, size=32 * KB))
    data = (tmp_path / "good" / "data.mdb").read_bytes()
    pages = {"short": data[: len(data) // 3], "empty": b"", "noise": bytearray(data)}
    pages["noise"][2 * 4096 :] = random_bytes(len(data) - 2 * 4096, seed=9)  # all but the headers
    with (
        lmdb.open(str(tmp_path / "good"), max_dbs=16, readonly=True, lock=False) as env,
        env.begin() as txn,
    ):
        record = txn.get(b"chunks")  # the main database holds each named one's record
    root = int.from_bytes(record[40:48], "little")  # the chunks database's root page
    pages["index"] = bytearray(data)
    pages["index"][root * 4096 : (root + 1) * 4096] = random_bytes(4096, seed=10)
    out = {}
    for name, content in pages.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.mdb").write_bytes(bytes(content))
        out[name] = tmp_path / name
    return out


def test_a_damaged_store_is_reported_not_read_or_rewritten(tmp_path):
    copies = damaged_copies(tmp_path)
    reasons = {
        "short": "was cut short",
        "empty": "is empty",
        "noise": "cannot read",
        "index": "cannot read",
    }
    for name, path in copies.items():
        before = (path / "data.mdb").read_bytes()
        for readonly in (False, True):
            with (
                pytest.raises(CorruptStore, match=f"is damaged: .*{reasons[name]}"),
                LmdbStore(path, readonly=readonly) as store,
            ):
                list(store.scan())
                dict(store.get([cid for cid, _ in chunks(40, size=32 * KB)]))
        assert (path / "data.mdb").read_bytes() == before  # nothing was written over it


def test_lmdb_one_open_per_process(tmp_path):
    with LmdbStore(tmp_path / "s"), pytest.raises(StoreUnavailable, match="already open"):
        LmdbStore(tmp_path / "s")
    LmdbStore(tmp_path / "s").close()  # free again once closed


def test_lmdb_rejects_unusable_names(tmp_path):
    with LmdbStore(tmp_path / "s") as store:
        with pytest.raises(InvalidInput):
            store.put_version("a\0b", b"v", b"x")
        with pytest.raises(InvalidInput):
            store.put_version("r" * 600, b"v", b"x")


class _Txn:
    """A write transaction whose disk fills up at the third put, or at commit."""

    def __init__(self, txn: lmdb.Transaction, error: Exception, at: str) -> None:
        self._txn, self._error, self._at, self._puts = txn, error, at, 0

    def __getattr__(self, name: str):
        return getattr(self._txn, name)

    def put(self, *args, **kwargs):
        self._puts += 1
        if self._at == "put" and self._puts == 3:
            raise self._error
        return self._txn.put(*args, **kwargs)

    def commit(self):
        if self._at == "commit":
            self._txn.abort()  # as LMDB does when its commit fails
            raise self._error
        self._txn.commit()


class _FullDiskEnv:
    def __init__(self, env: lmdb.Environment, error: Exception, at: str) -> None:
        self._env, self._error, self._at = env, error, at

    def __getattr__(self, name: str):
        return getattr(self._env, name)

    def begin(self, write: bool = False, **kwargs):
        txn = self._env.begin(write=write, **kwargs)
        return _Txn(txn, self._error, self._at) if write else txn


@pytest.mark.parametrize("at", ["put", "commit"])
@pytest.mark.parametrize(
    "error",
    [lmdb.DiskError("mdb_txn_commit: No space left on device"), OSError(errno.ENOSPC, "full")],
)
def test_lmdb_full_disk(tmp_path, monkeypatch, error, at):
    with LmdbStore(tmp_path / "s") as store:
        kept = chunks(2, seed=1)
        store.put(kept)
        monkeypatch.setattr(store, "_env", _FullDiskEnv(store._env, error, at))
        with pytest.raises(StoreFull, match="is full .*nothing of this write was stored"):
            store.put(chunks(5))
        monkeypatch.undo()
        assert {i.id for i in store.scan()} == {cid for cid, _ in kept}
        assert store.totals().stored_bytes == sum(len(b) for _, b in kept)
        assert store.put(chunks(5)) > 0  # the store still works


def test_lmdb_reads_do_not_keep_the_map_resident(tmp_path):
    """Reading 192 MiB of chunks leaves at most about one release interval of map pages."""
    with LmdbStore(tmp_path / "s") as store:
        all_ids = []
        for seed in range(6):
            batch = chunks(512, size=65536, seed=100 + seed)
            store.put(batch)
            all_ids += [cid for cid, _ in batch]
        before = rss_file_kib()
        read = sum(len(blob) for _, blob in store.get(all_ids))
        assert read >= 192 << 20
        assert rss_file_kib() - before < 100 << 10


def test_lmdb_lookups_and_writes_do_not_keep_the_map_resident(tmp_path):
    """Scattered lookups map a large folio each; they are dropped as the lookups go."""
    with LmdbStore(tmp_path / "s") as store:
        for seed in range(6):
            store.put(chunks(512, size=65536, seed=200 + seed))
        before = rss_file_kib()
        absent = [ids.chunk_id(i.to_bytes(8, "little")) for i in range(20_000)]
        assert store.missing(absent) == set(absent)
        store.put(chunks(512, size=65536, seed=300))
        assert rss_file_kib() - before < 32 << 10


def test_fault_budget_is_spent_by_the_faults_threads_take():
    """Touching fresh pages of an anonymous map faults once per page; the budget adds up the
    faults of every thread that checks it and starts again from nothing once reset."""
    budget = FaultBudget(48)
    area = mmap.mmap(-1, 128 * mmap.PAGESIZE)
    try:
        assert not budget.spent()  # a thread's first check only records where it starts

        def touch(first: int, count: int) -> None:
            for page in range(first, first + count):
                area[page * mmap.PAGESIZE] = 1

        touch(0, 24)
        assert not budget.spent()
        other = threading.Thread(target=lambda: (budget.spent(), touch(24, 32), budget.spent()))
        other.start()
        other.join()
        assert budget.spent()  # 24 faults here and 32 on the other thread
        budget.reset()
        assert not budget.spent()
        touch(56, 8)
        assert not budget.spent()
    finally:
        area.close()


def test_lmdb_writing_lays_commits_out_at_the_end_and_frees_the_space_after(tmp_path):
    """Inside writing() no commit reuses pages an earlier one freed (the file grows by all
    it wrote); after it, the freed pages are reused and the file grows less."""

    def used_after_puts(store: LmdbStore, seed: int) -> int:
        for i in range(30):
            store.put(chunks(32, size=2048, seed=seed + i))
        return store.map_usage()[0]

    with LmdbStore(tmp_path / "a") as plain, LmdbStore(tmp_path / "b") as pinned:
        reusing = used_after_puts(plain, 1000)
        empty = pinned.map_usage()[0]
        with pinned.writing():
            appending = used_after_puts(pinned, 1000)
        assert appending > reusing
        after = used_after_puts(pinned, 2000)
        assert after - appending < appending - empty  # the same writes, into freed pages
        stored = {i.id for i in pinned.scan()}
        assert {cid for cid, _ in chunks(32, size=2048, seed=1000)} <= stored


def test_lmdb_writing_survives_map_growth_nested_and_from_threads(tmp_path):
    with LmdbStore(tmp_path / "s", map_size=1 << 20) as store:
        written = []
        with store.writing():

            def put_some(seed: int) -> None:
                with store.writing():
                    for i in range(8):
                        batch = chunks(16, size=16384, seed=seed + i)
                        store.put(batch)
                        written.extend(batch)

            threads = [threading.Thread(target=put_some, args=(s,)) for s in (0, 100)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert store.map_usage()[1] > 1 << 20  # the map grew while the snapshot was held
        assert dict(store.get([cid for cid, _ in written])) == dict(written)
        store.put(chunks(4, seed=500))  # and writes go on after it


# fork


def _in_child(fn) -> int:
    """Run ``fn`` in a forked child; its exit status (0 when ``fn`` returns True)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if fn() else 1
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _says_reopen(call, remedy: str = "open it in a process started with multiprocessing's") -> bool:
    try:
        call()
    except ChunkstoreError as e:
        return f"which this one was forked from: use it there, or {remedy}" in str(e)
    return False


def test_a_store_used_after_fork_says_to_open_it_again(tmp_path):
    from chunkstore.client.rpc import NodeClient, RpcPolicy
    from chunkstore.cluster_map import NodeSpec

    with LmdbStore(tmp_path / "s") as store:
        store.put(chunks(3))
        client = NodeClient(NodeSpec("n1", "127.0.0.1:1"), RpcPolicy())
        assert _in_child(lambda: _says_reopen(lambda: store.totals())) == 0
        assert _in_child(lambda: _says_reopen(lambda: store.put(chunks(1, seed=9)))) == 0
        reconnect = "connect again in this process"
        assert _in_child(lambda: _says_reopen(lambda: client.chunks, reconnect)) == 0
        # opening it again in the child (chunkstore.connect() there) says the same
        assert _in_child(lambda: _says_reopen(lambda: LmdbStore(tmp_path / "s"))) == 0
        assert store.totals().chunks == 3  # the parent's store is untouched and still works
        store.put(chunks(1, seed=9))
        assert store.totals().chunks == 4
