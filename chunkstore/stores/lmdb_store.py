"""The embedded store: one LMDB environment in a directory.

It is the default store on one machine and each storage node's shard. Named databases
(key -> value; times are unix seconds as float64 LE):

- ``chunks``: chunk id -> encoded blob
- ``chunk_meta``: chunk id -> wanted_at (float64 LE) + blob size (uint32 LE)
- ``manifests``: manifest id -> manifest record
- ``manifest_meta``: manifest id -> stored_at
- ``versions``: repo (UTF-8) + NUL + version id -> version record
- ``tags``: repo (UTF-8) + NUL + tag (UTF-8) -> version id
- ``stages``: stage id -> stage record
- ``stage_files``: stage id + NUL + path (UTF-8) -> staged file record
- ``stage_claims``: stage id -> time + time kept until (float64 LE each) + claimant of its last
  delete that carried one (see :meth:`LmdbStore.delete_stage`); a store of an earlier release
  noted the time and claimant only, kept for ``CLAIM_KEPT_SECONDS``
- ``stage_releases``: stage id + claimant -> time + time kept until (float64 LE each): the
  claimants that gave up their claim of a stage (see :meth:`LmdbStore.release_claim`)
- ``meta``: ``format`` -> ``1``; ``stored_bytes`` -> total blob bytes, uint64 LE

Every write is one transaction committed with sync, so it is durable and all or nothing. LMDB
allows one write transaction per environment: writers queue on a lock, readers run alongside.
Several processes may open the same directory. When the memory map is full it is doubled and the
write retried; only a full disk fails a write (:class:`~chunkstore.errors.StoreFull`).

A store whose files this process may not write (a read-only mount, another user's directory)
can be opened to read only (``readonly=None`` falls back to that). LMDB keeps its readers in
``lock.mdb``, which it opens to write even then, except on a read-only file system; where that
file cannot be written either, the store is read without it: its reads then do not hold back
another process's writes, so they may fail (and every chunk, manifest and version record read
is still checked against its id) while its owner writes to it.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TypeVar

import lmdb

from chunkstore import errors
from chunkstore.forks import OpenedIn
from chunkstore.stores import base
from chunkstore.stores.base import ChunkInfo, ChunkTotals, Store, replaces
from chunkstore.stores.resident import FaultBudget, drop_resident, mapped_ranges

T = TypeVar("T")

FORMAT = b"1"
_DBS = (
    b"chunks",
    b"chunk_meta",
    b"manifests",
    b"manifest_meta",
    b"versions",
    b"tags",
    b"stages",
    b"stage_files",
    b"stage_claims",
    b"stage_releases",
    b"meta",
)
#: Databases added to format 1 since its first stores were made: a store without one gets it
#: when it is first opened to write (one opened to read only never needs it).
_ADDED = frozenset({b"stage_claims", b"stage_releases"})
_FORMAT_KEY = b"format"
_STORED_KEY = b"stored_bytes"
_SCAN_BATCH = 4096  # keys per read transaction when iterating a whole database
_GET_BATCH_BYTES = 16 << 20  # blob bytes copied out per read transaction in get()
#: The page cache holds the file in large folios (up to 2 MiB), and touching one record maps
#: the whole folio it lies in, so scattered lookups grow residency fast. Lookups and writes
#: count the faults they take, every CHECK_RECORDS records, and drop the map's pages once they
#: took RECORD_FAULTS (a fault maps 0.6 MiB on average here, 2 MiB at most); the folios of a
#: working set stay mapped until then. Blob reads drop them every RELEASE_BYTES or
#: RELEASE_BLOBS: blobs read in the order they were written share their folios.
CHECK_RECORDS = 4
RECORD_FAULTS = 32
RELEASE_BYTES = 32 << 20
RELEASE_BLOBS = 128
_FULL_DISK_BYTES = 64 << 20  # an I/O error at commit with less free space means a full disk
_MAX_KEY = 511  # LMDB's default maximum key size
_STAMP = struct.Struct("<d")
_NOTE = struct.Struct("<dd")  # a stage_claims note's time and the time it is kept until
_CHUNK_META = struct.Struct("<dI")  # wanted_at, blob size
WANTED_REFRESH_SECONDS = 60.0


class _Gate:
    """Shared/exclusive lock: read transactions share it; a map resize or a write
    transaction's abort takes it alone. A waiting exclusive holder holds back new readers.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            self._cond.wait_for(lambda: not self._active)
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


#: The process that opened the environment at each path (LMDB opens one per path and process;
#: a forked child inherits the parent's and cannot open it again).
_OPEN_HERE: dict[str, OpenedIn] = {}


class LmdbStore(Store):
    """A store in the LMDB environment in directory ``path``.

    ``create`` makes the directory and an empty store if there is none; ``map_size`` is the
    initial map size in bytes (it grows as needed). The map is address space, not memory or
    disk: a large one lets a store grow for long without remapping, which would end the
    snapshot :meth:`writing` holds.

    ``readonly`` True opens the store to read only: writes (and :meth:`writing`) raise
    StoreUnavailable, and :meth:`missing` cannot mark chunks wanted. False opens it to write:
    PermissionDenied if its files cannot be written. None opens it to write where its files
    can be written, else to read only (see the module): writes then raise PermissionDenied
    saying why, and change nothing.

    Open a directory once per process (py-lmdb refuses a second open) and share the store
    between threads; other processes may open it at the same time.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        create: bool = True,
        map_size: int = 64 << 30,
        readonly: bool | None = False,
    ) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self.directory = self.path
        self._key = os.path.realpath(self.path)  # of the environment, in _OPEN_HERE
        self._readonly = readonly is True
        self._unwritable: str | None = None  # why a store opened to write is read only
        self._opened_in = OpenedIn(f"the store at {self.location}")
        self._write_lock = threading.RLock()  # held by the writer, taken again to resize
        self._gate = _Gate()
        self._closed = False
        self._env = self._open_env(create and not self._readonly, map_size, readonly is None)
        _OPEN_HERE[self._key] = self._opened_in
        try:
            dbs = self._open_dbs()
        except BaseException:
            self._forget()
            self._env.close()
            raise
        (
            self._chunks,
            self._chunk_meta,
            self._manifests,
            self._manifest_meta,
            self._versions,
            self._tags,
            self._stages,
            self._stage_files,
            self._stage_claims,
            self._stage_releases,
            self._meta,
        ) = dbs
        self._map_ranges = mapped_ranges(self.path / "data.mdb")
        self._blobs_since_release = self._bytes_since_release = 0
        self._record_faults = FaultBudget(RECORD_FAULTS)
        self._pin: lmdb.Transaction | None = None  # the snapshot writing() holds
        self._writing = 0  # writing() contexts open

    def _open_env(self, create: bool, map_size: int, fall_back: bool) -> lmdb.Environment:
        data = self.path / "data.mdb"
        if data.is_file() and data.stat().st_size == 0:
            # LMDB would take an empty file for a new store and write one over it.
            raise self._damaged("its data.mdb is empty")
        exists = data.exists()
        if not exists:
            if self.path.is_dir() and any(self.path.iterdir()):
                raise self._unavailable("the directory is not empty and holds no store")
            if not create:
                raise errors.StoreMissing(f"cannot open store at {self.location}: no store there")
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise self._unavailable(_reason(e)) from None
        try:
            env = self._lmdb_env(map_size, fall_back and exists)
        except lmdb.InvalidError:
            raise self._damaged("its data.mdb is not an LMDB file") from None
        except (OSError, lmdb.Error) as e:
            opened = _OPEN_HERE.get(self._key)
            if opened is not None:
                opened.check()  # open in the process this one was forked from: say so
            raise self._unavailable(_reason(e)) from None
        try:
            self._check_length(env)
        except BaseException:
            env.close()
            raise
        env.reader_check()
        return env

    def _lmdb_env(self, map_size: int, fall_back: bool) -> lmdb.Environment:
        """The environment, opened to write unless the store is read only; with ``fall_back``,
        to read only if its files cannot be written; read only, without LMDB's lock file if
        that cannot be written either (see the module)."""
        if not self._readonly:
            try:
                return self._lmdb_open(map_size, lock=True)
            except (OSError, lmdb.Error) as e:
                if not (fall_back and _not_permitted(e)):
                    raise
                self._readonly, self._unwritable = True, _reason(e)
        try:
            return self._lmdb_open(map_size, lock=True)
        except (OSError, lmdb.Error) as e:
            if not _not_permitted(e):
                raise
        return self._lmdb_open(map_size, lock=False)

    def _lmdb_open(self, map_size: int, lock: bool) -> lmdb.Environment:
        return lmdb.open(
            str(self.path),
            map_size=map_size,
            readonly=self._readonly,
            create=False,
            max_dbs=len(_DBS),
            sync=True,
            metasync=True,
            lock=lock,
        )

    def _check_length(self, env: lmdb.Environment) -> None:
        """Refuse a data file shorter than the pages its header says are in use: reading
        one of the missing pages through the map would kill the process (SIGBUS)."""
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        size = (self.path / "data.mdb").stat().st_size
        if size < needed:
            raise self._damaged(f"its data.mdb was cut short ({size} of {needed} bytes)")

    def _damaged(self, reason: str) -> errors.CorruptStore:
        return errors.CorruptStore(
            f"store at {self.location} is damaged: {reason}; restore it from a copy "
            "(chunkstore copy, or a backup of the directory)"
        )

    def _open_dbs(self) -> list[lmdb._Database | None]:
        try:
            return self._create_or_open_dbs()
        except _DAMAGE:
            raise self._damaged("LMDB found a page it cannot read") from None

    def _create_or_open_dbs(self) -> list[lmdb._Database | None]:
        """Every database of _DBS, in order; one of _ADDED is None in a store opened to read
        only that lacks it."""
        if self._env.stat()["entries"] == 0 and not self._readonly:  # a new, empty environment
            with self._env.begin(write=True) as txn:
                dbs = [self._env.open_db(name, txn=txn) for name in _DBS]
                txn.put(_FORMAT_KEY, FORMAT, db=dbs[-1])
            return dbs
        try:
            found = {n: self._env.open_db(n, create=False) for n in _DBS if n not in _ADDED}
        except lmdb.NotFoundError:
            raise self._unavailable("not a chunkstore store") from None
        with self._env.begin() as txn:
            format_found = txn.get(_FORMAT_KEY, db=found[b"meta"])
        if format_found != FORMAT:
            raise self._unavailable(f"not a chunkstore store of format {FORMAT.decode()}")
        for name in _ADDED:
            try:
                found[name] = self._env.open_db(name, create=False)
            except lmdb.NotFoundError:
                found[name] = None if self._readonly else self._env.open_db(name)
        return [found[name] for name in _DBS]

    def _forget(self) -> None:
        if _OPEN_HERE.get(self._key) is self._opened_in:
            del _OPEN_HERE[self._key]

    def _unavailable(self, reason: str) -> errors.ChunkstoreError:
        """The error for a store that cannot be opened: PermissionDenied where this process
        may not read or write its files, else StoreUnavailable."""
        cls = errors.PermissionDenied if reason in _NOT_PERMITTED else errors.StoreUnavailable
        return cls(f"cannot open store at {self.location}: {reason}")

    def _check_writable(self) -> None:
        """Raise unless the store takes writes (see the class)."""
        if self._unwritable is not None:
            raise errors.PermissionDenied(
                f"store at {self.location} cannot be written: {self._unwritable}; nothing was "
                "changed"
            )
        if self._readonly:
            raise errors.StoreUnavailable(f"store at {self.location} is open read-only")

    def check_may_collect(self) -> None:
        """A read-only store refuses (GC, and ``verify --repair``, delete)."""
        self._check_writable()

    def close(self) -> None:
        """Close the environment; later calls raise StoreUnavailable."""
        with self._write_lock, self._gate.exclusive():
            if self._pin is not None:
                self._pin.abort()
                self._pin = None
            self._forget()
            self._env.close()
            self._closed = True

    def _check_open(self) -> None:
        """Raise StoreUnavailable once the store is closed (LMDB's own error says only that
        an object is closed). Callers hold the write lock or the gate, as close() takes both."""
        if self._closed:
            raise errors.StoreUnavailable(f"the store at {self.location} is closed")

    # transactions

    def _read(self, fn: Callable[[lmdb.Transaction], T], *, buffers: bool = False) -> T:
        """Return ``fn(txn)`` run in a read transaction.

        With ``buffers``, values are views into the map that are valid only inside ``fn``.
        """
        self._opened_in.check()
        while True:
            with self._gate.shared():
                self._check_open()
                try:
                    with self._env.begin(buffers=buffers) as txn:
                        return fn(txn)
                except lmdb.MapResizedError:
                    pass
                except _DAMAGE:
                    raise self._damaged("LMDB found a page it cannot read") from None
            self._set_map_size(0)  # another process grew the map: adopt its size

    def _write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Return ``fn(txn)`` run in one write transaction, committed durably: all or nothing.

        A full map is doubled and ``fn`` run again from the start; a full disk raises StoreFull.
        """
        self._opened_in.check()
        self._check_writable()
        with self._write_lock:
            self._check_open()
            while True:
                try:
                    return self._attempt(fn)
                except lmdb.MapFullError:
                    self._set_map_size(2 * self._env.info()["map_size"])
                except lmdb.MapResizedError:
                    self._set_map_size(0)
                except _DAMAGE:
                    raise self._damaged("LMDB found a page it cannot read") from None
                except (lmdb.Error, OSError) as e:
                    if not self._disk_full(e):
                        raise
                    raise errors.StoreFull(
                        f"store at {self.location} is full (no space left on device); "
                        "nothing of this write was stored"
                    ) from e

    def _disk_full(self, e: lmdb.Error | OSError) -> bool:
        """Whether a failed write failed for lack of space. LMDB reports a short write at
        commit as a plain I/O error, so that counts too when the disk is (nearly) full."""
        if isinstance(e, lmdb.DiskError):
            return True
        if isinstance(e, OSError):
            return e.errno in (errno.ENOSPC, errno.EDQUOT)
        if "Input/output error" not in str(e):
            return False
        try:
            return shutil.disk_usage(self.path).free < _FULL_DISK_BYTES
        except OSError:
            return False

    def _attempt(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        txn = self._env.begin(write=True)
        try:
            result = fn(txn)
        except BaseException:
            # py-lmdb's abort of a write transaction waits until no thread is inside an LMDB
            # call: with readers busy that can take seconds, so hold them back meanwhile.
            with self._gate.exclusive():
                txn.abort()
            raise
        txn.commit()  # on failure LMDB has already discarded the transaction
        return result

    def _set_map_size(self, size: int) -> None:
        """Change the map size (0: adopt the size another process set).

        LMDB requires that no transaction of this process is open meanwhile.
        """
        with self._write_lock, self._gate.exclusive():
            if self._pin is not None:
                self._pin.abort()
            self._env.set_mapsize(size)
            self._map_ranges = mapped_ranges(self.path / "data.mdb")
            if self._pin is not None:
                self._pin = self._env.begin()

    def _rows(
        self,
        db: lmdb._Database,
        row: Callable[[lmdb.Transaction, lmdb.Cursor], T],
        after: bytes = b"",
    ) -> Iterator[T]:
        """Yield ``row(txn, cursor)`` at every key of ``db`` after ``after`` (b"": from the
        first) in order, without holding one read transaction for long: each one reads a batch,
        the next resumes after its last key.
        """
        while True:
            last, rows = self._read(partial(_rows_after, db, after, row), buffers=True)
            yield from rows
            if last is None:
                return
            after = last

    def _stored(self, txn: lmdb.Transaction) -> int:
        return int.from_bytes(txn.get(_STORED_KEY, b"", db=self._meta), "little")

    def _add_stored(self, txn: lmdb.Transaction, delta: int) -> None:
        txn.put(_STORED_KEY, (self._stored(txn) + delta).to_bytes(8, "little"), db=self._meta)

    # chunks

    def missing(self, ids: Sequence[bytes]) -> set[bytes]:
        """See :meth:`ChunkStore.missing` (and :meth:`ChunkStore.mark_wanted`, which is this):
        lookups in key order, then one synced transaction marking the stored ones. A chunk
        wanted within the last ``WANTED_REFRESH_SECONDS`` is not re-marked, which spares that
        write when pushes follow each other; GC grace periods are hours, far above it."""
        now = time.time()
        ordered = sorted(set(ids))
        wanted = self._read(partial(_wanted_at, self._chunk_meta, ordered, self._trim_in_txn))
        absent = set(ordered).difference(wanted)
        stale = [cid for cid, at in wanted.items() if at < now - WANTED_REFRESH_SECONDS]
        if stale and not self._readonly:
            absent.update(self._write(partial(self._mark_wanted, stale, now)))
        return absent

    def lacking(self, ids: Sequence[bytes]) -> set[bytes]:
        """See :meth:`ChunkStore.lacking`: lookups only. Marks are what a check costs here (a
        synced transaction rewriting pages all over the chunk index), so a push defers them to
        one :meth:`mark_wanted` for all its chunks: ~1 s per GB pushed less on this machine."""
        wanted = self._read(partial(_wanted_at, self._chunk_meta, ids, self._trim_in_txn))
        return set(ids).difference(wanted)

    def _mark_wanted(self, ids: list[bytes], now: float, txn: lmdb.Transaction) -> list[bytes]:
        """Set wanted_at of the ids still stored; return those deleted meanwhile."""
        gone = []
        for i, cid in enumerate(ids, 1):
            if i % CHECK_RECORDS == 0:
                self._trim_in_txn()
            if not _touch(txn, self._chunk_meta, cid, now):
                gone.append(cid)
        return gone

    @contextmanager
    def writing(self) -> Iterator[None]:
        """See :meth:`ChunkStore.writing`: a read snapshot is held meanwhile.

        A commit frees the previous copies of the B-tree pages it rewrote, and LMDB puts the
        next commits' pages there, all over the file. The kernel keeps the file in large
        page-cache folios and writes a whole folio back for a few changed bytes in it: a 1 GB
        first push wrote 3.9 GB to disk, a 4 GB one 31 GB. While a snapshot older than those
        pages is held, LMDB cannot reuse them, so each commit's pages go to the end of the file
        in one piece: 0.8 and 3.4 GB written, and the pushes took 1.8 s instead of 2.5 and
        8.9 s instead of 13.7. The file holds the pages freed meanwhile (~5 % of what was
        written) until the last context ends; later writes reuse them. Growing the map ends
        the snapshot (LMDB remaps with no transaction open) and takes a new one.

        A read-only store refuses here, as it would each write, before any work is done.
        """
        self._check_writable()
        with self._write_lock:
            self._check_open()
            self._writing += 1
            if self._pin is None:
                self._pin = self._env.begin()
        try:
            yield
        finally:
            with self._write_lock:
                self._writing -= 1
                if not self._writing and self._pin is not None:
                    self._pin.abort()
                    self._pin = None

    def put(self, chunks: Sequence[tuple[bytes, bytes]]) -> int:
        if not chunks:
            return 0
        now = time.time()

        def write(txn: lmdb.Transaction) -> int:
            added = 0
            for i, (cid, blob) in enumerate(chunks, 1):
                if i % CHECK_RECORDS == 0:
                    self._trim_in_txn()
                if txn.put(cid, blob, db=self._chunks, overwrite=False):
                    added += len(blob)
                    txn.put(cid, _CHUNK_META.pack(now, len(blob)), db=self._chunk_meta)
                else:
                    _touch(txn, self._chunk_meta, cid, now)
            if added:
                self._add_stored(txn, added)
            return added

        return self._write(write)

    def _count_for_release(self, blobs: int, nbytes: int) -> None:
        """Drop the map's resident pages once ``RELEASE_BLOBS`` or ``RELEASE_BYTES`` of blobs
        were read."""
        self._blobs_since_release += blobs
        self._bytes_since_release += nbytes
        if self._blobs_since_release >= RELEASE_BLOBS or self._bytes_since_release >= RELEASE_BYTES:
            self._blobs_since_release = self._bytes_since_release = 0
            self._release()

    def _release(self) -> None:
        with self._gate.shared():  # no remap meanwhile: the ranges stay valid
            drop_resident(self._map_ranges)

    def _trim_in_txn(self) -> None:
        """Drop the map's resident pages once records read or written have spent their fault
        budget. Called inside a transaction, which holds the gate or the write lock, so the
        map is not remapped meanwhile. Values read before are copies or views, which fault
        their pages back in when touched."""
        if self._record_faults.spent():
            drop_resident(self._map_ranges)
            self._record_faults.reset()

    def get(self, ids: Sequence[bytes]) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(id, blob)`` in request order, copying up to 16 MiB per read transaction.

        Every ``RELEASE_BLOBS`` or ``RELEASE_BYTES`` read, the map's resident pages are dropped (see
        :mod:`.resident`), so reading a whole large store keeps memory small.
        """
        start = 0
        while start < len(ids):
            batch = self._read(partial(self._get_batch, ids, start))
            start += len(batch)
            self._count_for_release(len(batch), sum(len(blob) for _, blob in batch))
            yield from batch

    def with_blobs(
        self, ids: Sequence[bytes], fn: Callable[[Mapping[bytes, bytes | memoryview]], T]
    ) -> T:
        """See :meth:`ChunkStore.with_blobs`: the blobs are views into the map, read in one
        transaction, so decoding reads the map directly (page faults with the GIL released)."""

        def run(txn: lmdb.Transaction) -> tuple[T, int]:
            blobs = {}
            for cid in ids:
                blob = txn.get(cid, db=self._chunks)
                if blob is None:
                    raise errors.ChunkNotFound(cid)
                blobs[cid] = blob
            return fn(blobs), sum(len(blob) for blob in blobs.values())

        result, nbytes = self._read(run, buffers=True)
        self._count_for_release(len(ids), nbytes)
        return result

    def _get_batch(
        self, ids: Sequence[bytes], start: int, txn: lmdb.Transaction
    ) -> list[tuple[bytes, bytes]]:
        batch, size = [], 0
        for i in range(start, len(ids)):
            cid = ids[i]
            blob = txn.get(cid, db=self._chunks)
            if blob is None:
                raise errors.ChunkNotFound(cid)
            batch.append((cid, blob))
            size += len(blob)
            if size >= _GET_BATCH_BYTES:
                break
        return batch

    def delete(self, ids: Iterable[bytes], unwanted_since: float | None = None) -> int:
        ids = list(ids)

        def remove(txn: lmdb.Transaction) -> int:
            removed = freed = 0
            for cid in ids:
                meta = txn.get(cid, db=self._chunk_meta)
                if meta is None:
                    continue
                wanted_at, size = _CHUNK_META.unpack(meta)
                if unwanted_since is not None and wanted_at >= unwanted_since:
                    continue
                txn.delete(cid, db=self._chunks)
                txn.delete(cid, db=self._chunk_meta)
                removed += 1
                freed += size
            if removed:
                self._add_stored(txn, -freed)
            return removed

        return self._write(remove) if ids else 0

    def scan(self, after: bytes = b"") -> Iterator[ChunkInfo]:
        """See :meth:`ChunkStore.scan`; in id order, starting after ``after`` if given."""

        def info(txn: lmdb.Transaction, cursor: lmdb.Cursor) -> ChunkInfo:
            wanted_at, size = _CHUNK_META.unpack(cursor.value())
            return ChunkInfo(bytes(cursor.key()), size, wanted_at)

        return self._rows(self._chunk_meta, info, after)

    def holds(self, ids: Sequence[bytes]) -> set[bytes]:
        """The ids among ``ids`` that are stored; unlike :meth:`missing`, marks nothing."""
        return set(self._read(partial(_present, self._chunk_meta, ids)))

    def totals(self) -> ChunkTotals:
        return self._read(
            lambda txn: ChunkTotals(txn.stat(self._chunks)["entries"], self._stored(txn))
        )

    def map_usage(self) -> tuple[int, int]:
        """Bytes of the map in use and the current map size."""
        with self._gate.shared():
            info, stat = self._env.info(), self._env.stat()
        return (info["last_pgno"] + 1) * stat["psize"], info["map_size"]

    # manifests

    def put_manifest(self, manifest_id: bytes, data: bytes) -> None:
        """Store a manifest and set its stored_at to now (see :meth:`MetaStore.put_manifest`:
        a damaged copy is replaced)."""
        self.put_manifests([(manifest_id, data)])

    def put_manifests(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        """Store manifests as :meth:`put_manifest` does, all in one transaction."""
        stamp = _stamp()

        def write(txn: lmdb.Transaction) -> None:
            for manifest_id, data in records:
                _put_record(self._manifests, manifest_id, manifest_id, data, txn)
                txn.put(manifest_id, stamp, db=self._manifest_meta)

        self._write(write)

    def get_manifest(self, manifest_id: bytes) -> bytes:
        (data,) = self.get_manifests([manifest_id])
        return data

    def get_manifests(self, manifest_ids: Sequence[bytes]) -> list[bytes]:
        """As :meth:`get_manifest` for each id, in one transaction."""
        found = self._read(lambda txn: [txn.get(mid, db=self._manifests) for mid in manifest_ids])
        for manifest_id, data in zip(manifest_ids, found, strict=True):
            if data is None:
                raise errors.NotFound(f"manifest {manifest_id.hex()} is not in the store")
        return found

    def has_manifests(self, manifest_ids: Sequence[bytes]) -> set[bytes]:
        return set(self._read(partial(_present, self._manifests, manifest_ids)))

    def scan_manifests(self) -> Iterator[tuple[bytes, float]]:
        """Yield ``(id, stored_at)`` of every manifest: the time of its last put_manifest."""

        def info(txn: lmdb.Transaction, cursor: lmdb.Cursor) -> tuple[bytes, float]:
            mid = bytes(cursor.key())
            return mid, _STAMP.unpack(txn.get(mid, db=self._manifest_meta))[0]

        return self._rows(self._manifests, info)

    def delete_manifests(self, manifest_ids: Iterable[bytes]) -> int:
        ids = list(manifest_ids)

        def remove(txn: lmdb.Transaction) -> int:
            removed = 0
            for mid in ids:
                if txn.delete(mid, db=self._manifests):
                    txn.delete(mid, db=self._manifest_meta)
                    removed += 1
            return removed

        return self._write(remove) if ids else 0

    # versions and tags

    def put_version(self, repo: str, version_id: bytes, data: bytes) -> None:
        key = _key(repo, version_id)
        self._write(partial(_put_record, self._versions, key, version_id, data))

    def get_version(self, repo: str, version_id: bytes) -> bytes:
        data = self._read(lambda txn: txn.get(_key(repo, version_id), db=self._versions))
        if data is None:
            raise errors.NotFound(f"version {version_id.hex()} is not in repo {repo!r}")
        return data

    def list_versions(self, repo: str) -> list[tuple[bytes, bytes]]:
        return self._read(partial(_with_prefix, self._versions, _key(repo, b"")))

    def delete_version(self, repo: str, version_id: bytes) -> None:
        def remove(txn: lmdb.Transaction) -> None:
            if not txn.delete(_key(repo, version_id), db=self._versions):
                raise errors.NotFound(f"version {version_id.hex()} is not in repo {repo!r}")
            prefix = _key(repo, b"")
            cursor = txn.cursor(db=self._tags)
            cursor.set_range(prefix)
            while cursor.key().startswith(prefix):  # an unpositioned cursor's key is b""
                if cursor.value() == version_id:
                    cursor.delete()  # moves to the next key
                else:
                    cursor.next()

        self._write(remove)

    def list_repos(self) -> list[str]:
        def repos(txn: lmdb.Transaction) -> list[str]:
            names = []
            cursor = txn.cursor(db=self._versions)
            positioned = cursor.first()
            while positioned:
                repo = cursor.key().split(b"\0", 1)[0]
                names.append(repo.decode())
                positioned = cursor.set_range(repo + b"\1")  # skip this repo's other versions
            return names  # UTF-8 byte order is code point order: already sorted

        return self._read(repos)

    def set_tag(self, repo: str, tag: str, version_id: bytes) -> None:
        """Point ``repo@tag`` at a version; NotFound if that version is not stored."""
        key = _key(repo, tag.encode())

        def write(txn: lmdb.Transaction) -> None:
            if not _present(self._versions, [_key(repo, version_id)], txn):
                raise errors.NotFound(f"version {version_id.hex()} is not in repo {repo!r}")
            txn.put(key, version_id, db=self._tags)

        self._write(write)

    def delete_tag(self, repo: str, tag: str) -> None:
        key = _key(repo, tag.encode())

        def remove(txn: lmdb.Transaction) -> None:
            if not txn.delete(key, db=self._tags):
                raise errors.NotFound(f"tag {tag!r} is not in repo {repo!r}")

        self._write(remove)

    def tags(self, repo: str) -> dict[str, bytes]:
        rows = self._read(partial(_with_prefix, self._tags, _key(repo, b"")))
        return {tag.decode(): version_id for tag, version_id in rows}

    # stages

    def put_stage(self, stage_id: bytes, data: bytes, released: Collection[bytes] = ()) -> None:
        base.check_released(released)

        def write(txn: lmdb.Transaction) -> None:
            noted = _noted_claimant(txn.get(stage_id, db=self._stage_claims), time.time())
            if noted is not None:
                if noted not in released:
                    raise errors.StageClaimed(stage_id)
                txn.delete(stage_id, db=self._stage_claims)
            txn.put(stage_id, data, db=self._stages)

        self._write(write)

    def release_claim(self, stage_id: bytes, claimant: bytes, record: bytes) -> None:
        """See :meth:`MetaStore.release_claim`; each call also drops the releases no longer
        kept, so there are never more than those of stages that have not expired yet, or of
        the last CLAIM_KEPT_SECONDS."""
        base.check_claimant(claimant)

        def write(txn: lmdb.Transaction) -> None:
            now = time.time()
            _drop_where(
                txn, self._stage_releases, lambda n: not base.claim_kept(*_NOTE.unpack(n), now)
            )
            note = _NOTE.pack(now, base.kept_until(record, now))
            txn.put(stage_id + claimant, note, db=self._stage_releases)
            noted = _noted_claimant(txn.get(stage_id, db=self._stage_claims), now)
            if noted == claimant:
                txn.delete(stage_id, db=self._stage_claims)

        self._write(write)

    def released_claims(self, stage_id: bytes) -> set[bytes]:
        """The claimants that gave up their claim of the stage (:meth:`release_claim`),
        while remembered."""
        if self._stage_releases is None:  # a store of an earlier release, opened to read
            return set()
        rows = self._read(partial(_with_prefix, self._stage_releases, stage_id))
        now = time.time()
        return {
            bytes(claimant) for claimant, note in rows if base.claim_kept(*_NOTE.unpack(note), now)
        }

    def get_stage(self, stage_id: bytes) -> bytes:
        data = self._read(lambda txn: txn.get(stage_id, db=self._stages))
        if data is None:
            raise errors.NotFound(f"stage {stage_id.hex()} not found")
        return data

    def put_stage_file(self, stage_id: bytes, path: str, data: bytes) -> None:
        def write(txn: lmdb.Transaction) -> None:
            if txn.get(stage_id, db=self._stages) is None:
                raise errors.NotFound(f"stage {stage_id.hex()} not found")
            txn.put(_stage_key(stage_id, path), data, db=self._stage_files)

        self._write(write)

    def stage_files(self, stage_id: bytes) -> dict[str, bytes]:
        rows = self._read(partial(_with_prefix, self._stage_files, stage_id + b"\0"))
        return {path.decode(): data for path, data in rows}

    def delete_stage(self, stage_id: bytes, claimant: bytes | None = None) -> None:
        """Remove a stage and its files, noting ``claimant`` (see
        :meth:`MetaStore.delete_stage`). Every removal drops the notes no longer kept, so there
        are never more than the deletes of stages that have not expired yet, or of the last
        CLAIM_KEPT_SECONDS."""
        base.check_claimant(claimant)

        def delete(txn: lmdb.Transaction) -> None:
            if claimant is not None and txn.get(stage_id, db=self._stages) is None:
                noted = txn.get(stage_id, db=self._stage_claims)
                if _noted_claimant(noted, time.time()) == claimant:
                    return  # this claimant's retry: its first try deleted the stage
            self._remove_stage(txn, stage_id, claimant)

        self._write(delete)

    def claim_stage(
        self, stage_id: bytes, claimant: bytes | None = None
    ) -> tuple[bytes, dict[str, bytes]]:
        """One transaction reads and removes the stage; ``claimant`` is noted only so that it
        can :meth:`restore_stage` it."""
        base.check_claimant(claimant)
        return self._write(partial(self._remove_stage, stage_id=stage_id, claimant=claimant))

    def restore_stage(
        self, stage_id: bytes, claimant: bytes, record: bytes, files: Mapping[str, bytes]
    ) -> None:
        base.check_claimant(claimant)

        def restore(txn: lmdb.Transaction) -> None:
            if txn.get(stage_id, db=self._stages) is not None:
                return
            noted = _noted_claimant(txn.get(stage_id, db=self._stage_claims), time.time())
            if noted != claimant:
                raise errors.StageClaimed(stage_id)
            txn.put(stage_id, record, db=self._stages)
            for path, data in files.items():
                txn.put(_stage_key(stage_id, path), data, db=self._stage_files)
            txn.delete(stage_id, db=self._stage_claims)

        self._write(restore)

    def _remove_stage(
        self, txn: lmdb.Transaction, stage_id: bytes, claimant: bytes | None
    ) -> tuple[bytes, dict[str, bytes]]:
        """Remove a stage and its files, note who removed it (``claimant``, or nobody) and
        drop expired notes; return ``(record, files)`` as they were. NotFound if absent."""
        record = txn.get(stage_id, db=self._stages)
        if record is None:
            raise errors.NotFound(f"stage {stage_id.hex()} not found")
        rows = _with_prefix(self._stage_files, stage_id + b"\0", txn)
        files = {path.decode(): data for path, data in rows}
        txn.delete(stage_id, db=self._stages)
        for path, _ in rows:
            txn.delete(stage_id + b"\0" + path, db=self._stage_files)
        now = time.time()
        _drop_where(txn, self._stage_claims, lambda noted: _noted_claimant(noted, now) is None)
        if claimant is None:
            txn.delete(stage_id, db=self._stage_claims)
        else:
            note = _NOTE.pack(now, base.kept_until(record, now)) + claimant
            txn.put(stage_id, note, db=self._stage_claims)
        return record, files

    def list_stages(self) -> list[tuple[bytes, bytes]]:
        return self._read(
            lambda txn: [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self._stages)]
        )


def _put_record(
    db: lmdb._Database, key: bytes, record_id: bytes, data: bytes, txn: lmdb.Transaction
) -> None:
    """Store a record (a manifest, a version) under ``key``, replacing a damaged copy only
    (see :func:`~chunkstore.stores.base.replaces`)."""
    added = txn.put(key, data, db=db, overwrite=False)
    if not added and replaces(record_id, txn.get(key, db=db), data):
        txn.put(key, data, db=db)


def _drop_where(txn: lmdb.Transaction, db: lmdb._Database, stale: Callable[[bytes], bool]) -> None:
    """Delete every entry of ``db`` whose value is ``stale``."""
    for key in [key for key, value in txn.cursor(db=db) if stale(value)]:
        txn.delete(key, db=db)


def _noted_claimant(noted: bytes | None, now: float) -> bytes | None:
    """The claimant a note of ``stage_claims`` (time + claimant) names, if it is still kept at
    ``now`` (see :func:`~chunkstore.stores.base.claim_kept`)."""
    if noted is None:
        return None
    if len(noted) == _STAMP.size + base.CLAIMANT_BYTES:  # noted by an earlier release
        (at,) = _STAMP.unpack_from(noted)
        until, claimant = at + base.CLAIM_KEPT_SECONDS, noted[_STAMP.size :]
    else:
        at, until = _NOTE.unpack_from(noted)
        claimant = noted[_NOTE.size :]
    return claimant if base.claim_kept(at, until, now) else None


def _key(repo: str, name: bytes) -> bytes:
    """The key of a version or tag: repo + NUL + name."""
    if "\0" in repo:
        raise errors.InvalidInput(f"repo name {repo!r} contains a NUL character")
    key = repo.encode() + b"\0" + name
    if len(key) > _MAX_KEY:
        raise errors.InvalidInput(f"repo and name together exceed {_MAX_KEY} bytes: {repo!r}")
    return key


def _wanted_at(
    chunk_meta: lmdb._Database,
    ids: Sequence[bytes],
    trim: Callable[[], None],
    txn: lmdb.Transaction,
) -> dict[bytes, float]:
    """wanted_at of each stored chunk among ``ids``; ``trim()`` every CHECK_RECORDS."""
    out = {}
    for i, cid in enumerate(ids, 1):
        if i % CHECK_RECORDS == 0:
            trim()
        meta = txn.get(cid, db=chunk_meta)
        if meta is not None:
            out[cid] = _CHUNK_META.unpack(meta)[0]
    return out


def _present(db: lmdb._Database, keys: Sequence[bytes], txn: lmdb.Transaction) -> list[bytes]:
    """The keys among ``keys`` that ``db`` holds, looked up without copying values."""
    cursor = txn.cursor(db=db)
    return [k for k in keys if cursor.set_key(k)]


def _with_prefix(
    db: lmdb._Database, prefix: bytes, txn: lmdb.Transaction
) -> list[tuple[bytes, bytes]]:
    """``(key without prefix, value)`` for every key of ``db`` that starts with ``prefix``."""
    cursor = txn.cursor(db=db)
    cursor.set_range(prefix)
    rows = []
    while cursor.key().startswith(prefix):
        rows.append((cursor.key()[len(prefix) :], cursor.value()))
        cursor.next()
    return rows


def _rows_after(
    db: lmdb._Database,
    after: bytes,
    row: Callable[[lmdb.Transaction, lmdb.Cursor], T],
    txn: lmdb.Transaction,
) -> tuple[bytes | None, list[T]]:
    """Up to _SCAN_BATCH rows from the first key after ``after`` (b"": from the start), and
    the last key read, or None when the database is exhausted."""
    cursor = txn.cursor(db=db)
    positioned = cursor.set_range(after)
    if positioned and after and cursor.key() == after:
        positioned = cursor.next()
    rows: list[T] = []
    last = after
    while positioned and len(rows) < _SCAN_BATCH:
        rows.append(row(txn, cursor))
        last = bytes(cursor.key())
        positioned = cursor.next()
    return (last if positioned else None), rows


def _touch(txn: lmdb.Transaction, chunk_meta: lmdb._Database, cid: bytes, now: float) -> bool:
    """Set a stored chunk's wanted_at to ``now``; False if the chunk is not stored."""
    meta = txn.get(cid, db=chunk_meta)
    if meta is None:
        return False
    _, size = _CHUNK_META.unpack(meta)
    txn.put(cid, _CHUNK_META.pack(now, size), db=chunk_meta)
    return True


def _stamp() -> bytes:
    return _STAMP.pack(time.time())


#: What LMDB raises on pages it cannot read: a page that is not what its parent says is
#: CORRUPTED or PAGE_NOTFOUND, and the transaction that met it is then BAD_TXN.
_DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.BadTxnError)


def _reason(e: OSError | lmdb.Error) -> str:
    """The short reason of an OS or LMDB error, e.g. 'permission denied'."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e).rsplit(": ", 1)[-1]
    return text[:1].lower() + text[1:]


#: The reasons (see :func:`_reason`) for a file this process may not open as it asked:
#: permission denied, a read-only file system, an immutable file.
_NOT_PERMITTED = frozenset(
    _reason(OSError(code, os.strerror(code))) for code in (errno.EACCES, errno.EROFS, errno.EPERM)
)


def _not_permitted(e: OSError | lmdb.Error) -> bool:
    """Whether opening failed because a file may not be opened as asked (LMDB reports EACCES
    as ReadonlyError, other errors by their text only)."""
    return isinstance(e, lmdb.ReadonlyError) or _reason(e) in _NOT_PERMITTED


def _stage_key(stage_id: bytes, path: str) -> bytes:
    key = stage_id + b"\0" + path.encode()
    if len(key) > _MAX_KEY:
        raise errors.InvalidInput(f"staged path too long: {path!r}")
    return key
