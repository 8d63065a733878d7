"""The push pipeline: cut files into chunks, find the ones the store lacks, encode and store them.

Per file: memory-map (or, where no lease can guard the map, read into memory ahead of the
cutter: see :class:`~chunkstore.chunking.MappedFile`) -> cut (FastCDC) on the calling thread
-> per window of chunks, ids (BLAKE3) on the hashing threads while the next window is cut, then
one batched existence check (windows waiting together, such as those of many small files, share
one); the missing chunks are encoded on a thread pool and handed, in order, to a writer thread
that stores them in large all-or-nothing batches. Memory is bounded by the window and the
writer's queue, never by file size.

A file may be written to while it is pushed. Each new chunk is read again from the file (or its
map) and hashed again before it is encoded, so the store never holds a blob that does not match
its id (the push fails instead), and a file whose size or modification time moved during the
push fails it before anything is committed; so does one truncated or opened for writing while
a lease guards its map (see :mod:`chunkstore.lease`) or while it is read into memory, instead
of SIGBUS. A file removed, or replaced by another (an atomic save), while it is pushed is
stored as it was read.

With a base (:class:`~chunkstore.delta.BaseTensors`, read once a file with tensors comes up), a
tensor the base also has is cut at the
base tensor's chunk boundaries, and each of its chunks the store lacks may be stored as a delta
against the paired base chunk (see :mod:`chunkstore.delta`): the existence check also asks for
the keyframes. An encoding task tries a tensor's first two chunks as deltas before the
others, and decides for each between the delta and the standalone encoding; a tensor whose
first two tried chunks do not pay (rewritten rather than nudged) has its other chunks stored on
their own, their keyframes never read (see :func:`_encode_group`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

from chunkstore import codec, ids
from chunkstore.byte_readers import ByteReader, FileReader
from chunkstore.chunking import Chunker, ChunkerParams, MappedFile, file_regions
from chunkstore.delta import BaseChunk, BaseTensors, Encoded, base_length, encode_chunk
from chunkstore.errors import ChunkstoreError, ChunkstoreWarning
from chunkstore.file_index import read_index
from chunkstore.model import DeltaRef, Manifest
from chunkstore.progress import NoProgress, Progress
from chunkstore.stores.base import ChunkStore
from chunkstore.tensor_index import TensorIndex

MiB = 1 << 20


@dataclass
class IngestStats:
    scanned_bytes: int = 0
    chunks: int = 0
    new_chunks: int = 0
    new_raw_bytes: int = 0
    new_stored_bytes: int = 0
    delta_chunks: int = 0  # new chunks stored as deltas against a base chunk
    delta_raw_bytes: int = 0  # raw bytes of those chunks


@dataclass(frozen=True)
class PipelineLimits:
    window_bytes: int = 16 * MiB  # raw bytes per existence check
    group_bytes: int = 4 * MiB  # raw bytes per encoding task
    batch_bytes: int = 16 * MiB  # encoded bytes per store write
    # Encoding tasks in flight before the reader waits. Their encoded chunks must fill a store
    # batch, so that the next batch is ready when the writer is back from storing one: with 4
    # (~11 MiB encoded) it waited for two more tasks after each batch, and 1 GB first pushes
    # took 5 % (cluster) to 12 % (embedded) longer.
    queued_groups: int = 8
    workers: int = 2  # encoding threads


_DONE = object()
#: A chunk waiting to be stored: id, bytes, element size of the tensor it lies in (if any),
#: the base chunk it is paired with (if any), and its offset in its file.
_Pending = tuple[bytes, memoryview, int | None, BaseChunk | None, int]
#: A cut of a file: offset, length, element size, base chunk (see :func:`plan_cuts`).
_Cut = tuple[int, int, int | None, BaseChunk | None]


#: Files whose windows may be hashed but not yet checked: each holds its file open.
FILES_IN_FLIGHT = 64


@dataclass
class _Window:
    """Cuts of one file, hashed on the hashing threads, waiting for an existence check; the
    checker checks all waiting windows with one call and sets each one's ``result``."""

    mapped: MappedFile
    cuts: list[_Cut]
    datas: list[memoryview]
    hashes: list[Future[list[bytes]]]
    size: int  # raw bytes
    result: Future[list[tuple[bytes, int]]] = field(default_factory=Future)


@dataclass(frozen=True)
class _Keyframe:
    """A stored chunk a new chunk may be coded against, as a delta."""

    id: bytes
    transform: str
    length: int  # raw length it must have to predict the new chunk
    tensor: str  # the base tensor it lies in


#: What an encoding task gets per chunk: id, bytes, element size, and the keyframe to code a
#: delta against, if any.
_Task = tuple[bytes, bytes | memoryview, int | None, _Keyframe | None]
#: A chunk queued for an encoding task: id, offset and length in its file, element size, and
#: the keyframe to code a delta against, if any.
_Queued = tuple[bytes, int, int, int | None, _Keyframe | None]


def local_manifest(
    path: Path,
    params: ChunkerParams,
    base: BaseTensors | None = None,
    name: str | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """The manifest a push of the file at ``path`` would make (cut the same way, against the
    same ``base``), with nothing stored: its chunks are hashed, not encoded (``progress``
    advances by each chunk's length)."""
    chunker = Chunker(params)
    progress = progress or NoProgress()
    with MappedFile(path) as mapped:
        view = mapped.view
        index = _index_of(mapped)
        chunks = []
        cuts = plan_cuts(chunker, view, index, base, name)
        for offset, length, _, _ in mapped.filled_ahead(cuts, 2 * params.max_size):
            chunks.append((ids.chunk_id(view[offset : offset + length]), length))
            mapped.release_before(offset)  # memory stays bounded by a chunk, not the file
            progress.advance(length)
        return Manifest(mapped.size, chunks, index.tensors if index else [])


def has_tensor_index(path: Path) -> bool:
    """Whether the file at ``path`` is a safetensors or torch.save file (its header read, not
    the rest)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with contextlib.closing(FileReader(fd)) as reader:
        return read_index(reader, os.fstat(fd).st_size) is not None


def _index_of(mapped: MappedFile) -> TensorIndex | None:
    """The tensor index of the file, read with ``pread`` when it is copied (a map of it could
    fault if it shrank meanwhile)."""
    with contextlib.closing(mapped.reader()) as reader:
        return read_index(reader, mapped.size)


def plan_cuts(
    chunker: Chunker,
    view: memoryview,
    index: TensorIndex | None,
    base: BaseTensors | None = None,
    path: str | None = None,
) -> Iterator[tuple[int, int, int | None, BaseChunk | None]]:
    """Yield ``(offset, length, element size or None, base chunk or None)`` of every chunk of
    a file, as a push cuts it.

    Without a base (or for what the base lacks) this is :meth:`Chunker.cut_file`. A tensor
    cut on its own whose name and shape the base has, chunk-aligned, with a dtype it predicts,
    is cut at the base tensor's chunk boundaries instead, each chunk paired with its base chunk.
    """
    if not base or index is None:
        for offset, length, element_size in chunker.cut_file(view, index):
            yield offset, length, element_size, None
        return
    tensors = {t.begin: t for t in index.tensors}
    for region in file_regions(index, len(view), chunker.params.min_size):
        tensor = tensors.get(region.begin) if region.element_size else None
        cuts = None
        if tensor is not None and tensor.end == region.end:
            cuts = base.match(path, tensor)
        if cuts is None:
            for offset, length in chunker.cut_region(view, region):
                yield offset, length, region.element_size, None
        else:
            for offset, length, base_chunk in cuts:
                yield region.begin + offset, length, region.element_size, base_chunk


class Ingester:
    """Stores the chunks of files; use one per push, then call :meth:`finish`.

    After :meth:`finish` returns, every chunk of every ingested file is durable in the store.
    """

    def __init__(
        self,
        store: ChunkStore,
        params: ChunkerParams = ChunkerParams(),
        limits: PipelineLimits = PipelineLimits(),
        progress: Progress | None = None,
        base: Callable[[], BaseTensors | None] | None = None,
    ) -> None:
        self.store = store
        self.limits = limits
        self.stats = IngestStats()
        self._chunker = Chunker(params)
        self._progress = progress or NoProgress()
        self._load_base = base
        self._known: set[bytes] = set()  # stored already, or queued for storing in this push
        self._present: set[bytes] = set()  # relied on as stored, confirmed by finish()
        # Stored for the base versions, which reference them: relied on without asking.
        self._assumed: set[bytes] = set()
        self._delta_of: dict[bytes, DeltaRef] = {}  # chunks of this push rebuilt from deltas
        self._delta_tried: dict[bytes, str] = {}  # chunk queued with a base -> base tensor
        self._delta_outcomes: dict[str, list[int]] = {}  # base tensor -> [paid, missed]
        self._written: set[bytes] = set()  # ids handed to the store by this push
        self._manifests: list[Manifest] = []
        self._pool = ThreadPoolExecutor(limits.workers, thread_name_prefix="chunk-encode")
        # Existence checks run on their own thread, overlapping the next window's hashing.
        self._checker = ThreadPoolExecutor(1, thread_name_prefix="chunk-check")
        self._hasher = ThreadPoolExecutor(limits.workers, thread_name_prefix="chunk-hash")
        self._checks: deque[_Window] = deque()  # not yet known to be checked, in order
        self._unchecked: list[_Window] = []  # handed to the checker, not yet taken by it
        self._unchecked_lock = threading.Lock()
        self._files: list[tuple[int, list[_Window], TensorIndex | None]] = []
        self._queue: queue.Queue = queue.Queue(maxsize=limits.queued_groups)
        self._error: BaseException | None = None
        self._maps: list[MappedFile] = []
        self._writer = threading.Thread(target=self._write_loop, name="chunk-writer", daemon=True)
        self._writer.start()

    def ingest_file(self, path: Path, name: str | None = None) -> None:
        """Chunk one file and queue its chunks to be checked, and its new ones stored; its
        manifest is in :attr:`manifests` once :meth:`finish` returns.

        A file with a tensor index (safetensors, or a torch.save checkpoint) is cut along its
        tensors (:func:`~chunkstore.chunking.file_regions`) and its index kept in the
        manifest; any other file, or a malformed one, is cut as plain bytes. ``name`` (the
        stored path) picks base tensors of the same file first. The calling thread goes on to
        the next file while this one's chunks are checked: the checks of many small files
        are asked in a few calls, not one each.
        """
        mapped = MappedFile(path)
        self._maps.append(mapped)
        if mapped.writer_present:
            warnings.warn(_still_written(path), ChunkstoreWarning, stacklevel=2)
        view = mapped.view
        index = _index_of(mapped)
        windows: list[_Window] = []
        cuts: list[_Cut] = []
        cut_bytes = 0
        # Bytes still to be read by checks and encoders: pages before them can be dropped.
        in_flight = 3 * self.limits.window_bytes + self.limits.group_bytes * (
            self.limits.queued_groups + 2
        )
        base = self._base if index is not None else None
        planned = plan_cuts(self._chunker, view, index, base, name)
        for cut in mapped.filled_ahead(planned, 2 * self._chunker.params.max_size):
            cuts.append(cut)
            cut_bytes += cut[1]
            if cut_bytes >= self.limits.window_bytes:
                windows.append(self._identify(mapped, cuts))
                mapped.release_before(cut[0] - in_flight)
                cuts, cut_bytes = [], 0
        if cuts:
            windows.append(self._identify(mapped, cuts))
        # Once checked, the encoders' views keep what they still read mapped: a push of
        # thousands of files holds open only the few in flight, not one descriptor per file.
        if windows:
            windows[-1].result.add_done_callback(lambda _: mapped.close())
        else:
            mapped.close()  # an empty file
        self._files.append((mapped.size, windows, index))

    @property
    def manifests(self) -> list[Manifest]:
        """The manifests of the ingested files, in order (complete after :meth:`finish`)."""
        return self._manifests

    @cached_property
    def _base(self) -> BaseTensors | None:
        """The base versions' tensors, read when the first file with tensors needs them."""
        base = self._load_base() if self._load_base is not None else None
        if base:
            self._assumed.update(base.stored_ids())
        return base

    def finish(self) -> IngestStats:
        """Wait until every queued chunk is durable; raise what the writer met, if anything.

        While the last batches are stored, marks wanted in one call the chunks this push relies
        on without uploading them: those the existence checks found stored (see
        :meth:`~chunkstore.stores.base.ChunkStore.lacking`) and those of the base versions. Any
        found gone (taken by a concurrent GC, or lost) is stored again from its file, and a
        chunk coded against one is stored on its own. Then records in each ingested file's
        manifest the chunks stored as deltas.
        """
        try:
            while self._checks:
                self._checks.popleft().result.result()
            for size, windows, index in self._files:
                chunks = [chunk for window in windows for chunk in window.result.result()]
                self._manifests.append(Manifest(size, chunks, index.tensors if index else []))
            self._put_queue(_DONE)
            # Every check is done: the marks go out while the writer stores the last batches.
            marked = (
                self._checker.submit(self.store.mark_wanted, list(self._present))
                if self._present
                else None
            )
            self._writer.join()
            if self._error is not None:
                raise self._error
            gone = marked.result() if marked is not None else set()
            for mapped in self._maps:
                if mapped.changed():
                    raise _changed(mapped.path)
            if gone:
                self._store_again(gone)
            if self._delta_of:
                for manifest in self._manifests:
                    for i, (cid, _) in enumerate(manifest.chunks):
                        if cid in self._delta_of:
                            manifest.deltas[i] = self._delta_of[cid]
            return self.stats
        finally:
            self.close()

    def _store_again(self, gone: set[bytes]) -> None:
        """Store again, read from the ingested files, the chunks among ``gone`` and those coded
        as deltas against one; each read is checked against its id first."""
        need = set(gone)
        for cid, ref in list(self._delta_of.items()):
            if ref.delta in gone or ref.base in gone:
                del self._delta_of[cid]
                need.add(cid)
        batch: list[tuple[bytes, bytes]] = []
        raw_bytes = batch_bytes = 0
        for mapped, manifest in zip(self._maps, self._manifests, strict=True):
            if not need.intersection(cid for cid, _ in manifest.chunks):
                continue
            try:
                again = MappedFile(mapped.path)
            except FileNotFoundError:
                raise _changed(mapped.path) from None
            with again, contextlib.closing(again.reader()) as reader:
                for (cid, length), offset in zip(manifest.chunks, manifest.offsets(), strict=True):
                    if cid not in need:
                        continue
                    data = reader.read(offset, length)
                    if ids.chunk_id(data) != cid:
                        raise _changed(mapped.path)
                    blob = codec.encode(data)  # chosen by sample: the rare path needs no index
                    batch.append((cid, blob))
                    raw_bytes += length
                    batch_bytes += len(blob)
                    need.discard(cid)
                    if batch_bytes >= self.limits.batch_bytes:
                        self._store_batch(batch, raw_bytes)
                        batch, raw_bytes, batch_bytes = [], 0, 0
        if batch:
            self._store_batch(batch, raw_bytes)

    def close(self) -> None:
        """Stop the pipeline without waiting for queued work (after an error or interrupt)."""
        if self._writer.is_alive():
            self._error = self._error or InterruptedError("push interrupted")
        self._checker.shutdown(wait=True, cancel_futures=True)
        self._hasher.shutdown(wait=True, cancel_futures=True)
        if self._writer.is_alive():
            self._drain_queue()
            self._queue.put(_DONE)
            self._writer.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        # The windows view the maps: dropped first, so that closing a map unmaps it now.
        self._files.clear()
        self._checks.clear()
        for mapped in self._maps:
            mapped.close()
        self._maps.clear()

    def _identify(self, mapped: MappedFile, cuts: list[_Cut]) -> _Window:
        """Queue a window of cuts to be hashed (on the hashing threads: BLAKE3 releases the
        GIL) and then checked; its ``result`` gives its chunks' ``(id, length)``.

        The calling thread goes on cutting meanwhile. In flight are at most three windows'
        bytes, and the windows of at most FILES_IN_FLIGHT files: the caller waits for the
        oldest beyond that.
        """
        self._raise_writer_error()
        view = mapped.view
        datas = [view[offset : offset + length] for offset, length, _, _ in cuts]
        step = -(-len(datas) // self.limits.workers) or 1
        hashes = [
            self._hasher.submit(_hash_all, datas[i : i + step]) for i in range(0, len(datas), step)
        ]
        window = _Window(mapped, cuts, datas, hashes, sum(cut[1] for cut in cuts))
        with self._unchecked_lock:
            self._unchecked.append(window)
        self._checker.submit(self._check_waiting)
        self._checks.append(window)
        while self._checks and (
            len(self._checks) > FILES_IN_FLIGHT
            or sum(w.size for w in self._checks) > 3 * self.limits.window_bytes
        ):
            self._checks.popleft().result.result()
        while self._checks and self._checks[0].result.done():
            self._checks.popleft()
        return window

    def _check_waiting(self) -> None:
        """Check every window handed over and not yet taken, with one existence check."""
        with self._unchecked_lock:
            windows, self._unchecked = self._unchecked, []
        if not windows:
            return  # taken by the call before
        try:
            results = self._check(windows)
        except BaseException as e:
            for window in windows:
                window.result.set_exception(e)
            return
        for window, result in zip(windows, results, strict=True):
            window.result.set_result(result)

    def _check(self, windows: list[_Window]) -> list[list[tuple[bytes, int]]]:
        """Ask the store, in one call, which chunks of the (hashed) windows it lacks and queue
        those for encoding; each encoding task drops the pages of its chunks when done, and a
        window's pages are dropped once it is hashed (the encoders fault back in those of
        its new chunks), so a window of stored chunks costs no memory once hashed. Returns
        each window's ``(id, length)`` of its chunks.

        Chunks paired with a base chunk also get their keyframe asked for (and so marked
        wanted by :meth:`finish`); a lacking chunk whose keyframe is stored is queued with it,
        and the encoder decides whether a delta pays. A lacking chunk equal to a delta-coded
        base chunk reuses that chunk's delta.
        """
        items: list[list[_Pending]] = []
        fresh: list[dict[bytes, _Pending]] = []
        taken: set[bytes] = set()  # fresh in an earlier window of this call
        for window in windows:
            chunk_ids = [cid for part in window.hashes for cid in part.result()]
            # Hashed: its pages can go now, before the windows hashed after it are waited for.
            cuts = window.cuts
            window.mapped.release(cuts[0][0], cuts[-1][0] + cuts[-1][1])
            items.append(
                [
                    (cid, data, element_size, base, offset)
                    for cid, data, (offset, _, element_size, base) in zip(
                        chunk_ids, window.datas, window.cuts, strict=True
                    )
                ]
            )
            new = {}
            for item in items[-1]:
                if item[0] not in self._known and item[0] not in taken:
                    new[item[0]] = item
                    taken.add(item[0])
            fresh.append(new)
        wanted = dict.fromkeys(
            [*taken, *(s for new in fresh for item in new.values() for s in _base_ids(item))]
        )
        ask = [sid for sid in wanted if sid not in self._present and sid not in self._assumed]
        lacking = self.store.lacking(ask) if ask else set()
        self._present.update(sid for sid in wanted if sid not in lacking)
        self._known.update(taken)
        for window, window_items, new in zip(windows, items, fresh, strict=True):
            self._queue_new(window.mapped, window_items, new, lacking)
            window.datas = window.hashes = []  # views of the map: closing it waits for them
        return [[(item[0], len(item[1])) for item in window_items] for window_items in items]

    def _queue_new(
        self,
        mapped: MappedFile,
        window: list[_Pending],
        fresh: dict[bytes, _Pending],
        lacking: set[bytes],
    ) -> None:
        """Queue for encoding the chunks of one checked window that the store lacks."""
        scanned = sum(len(item[1]) for item in window)
        self.stats.scanned_bytes += scanned
        self.stats.chunks += len(window)
        new_bytes = 0
        group: list[_Queued] = []
        group_bytes = group_begin = 0
        for cid, data, element_size, base, offset in fresh.values():
            if cid not in lacking:
                continue
            reuse = _reusable(cid, base)
            if reuse is not None and {reuse.delta, reuse.base} <= self._present:
                self._delta_of[cid] = reuse  # the same bytes as the base chunk: reuse its delta
                continue
            key = base.keyframe() if base is not None else None
            keyframe = None
            if key is not None and key[0] in self._present and self._deltas_may_pay(base):
                length = base_length(len(data), key[1])
                keyframe = _Keyframe(key[0], key[1], length, base.tensor)
                self._delta_tried[cid] = base.tensor
            if not group:
                group_begin = offset
            group.append((cid, offset, len(data), element_size, keyframe))
            group_bytes += len(data)
            new_bytes += len(data)
            if group_bytes >= self.limits.group_bytes:
                self._queue_group(mapped, group, group_begin, offset + len(data))
                group, group_bytes = [], 0
        if group:
            self._queue_group(mapped, group, group_begin, offset + len(data))
        self._progress.advance(scanned, new_bytes)

    def _queue_group(self, mapped: MappedFile, group: list[_Queued], begin: int, end: int) -> None:
        reader = mapped.reader()  # the file's map may be closed before the group is encoded
        encode = partial(_encode_then_release, self.store, group, self._delta_outcomes, mapped)
        try:
            task = self._pool.submit(encode, reader, begin, end)
        except BaseException:  # the push is being stopped
            reader.close()
            raise
        task.add_done_callback(lambda _: reader.close())  # also if it is cancelled
        self._put_queue(task)

    def _deltas_may_pay(self, base: BaseChunk) -> bool:
        """False once two chunks of the base tensor were tried and none paid as a delta (a
        tensor rewritten rather than nudged): its other chunks skip reading their bases."""
        return _verdict(self._delta_outcomes.get(base.tensor, (0, 0))) is not False

    def _put_queue(self, item: object) -> None:
        while True:
            self._raise_writer_error()
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain_queue(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Future):
                item.cancel()

    def _write_loop(self) -> None:
        batch: list[tuple[bytes, bytes]] = []
        batch_bytes = 0
        raw_bytes = 0
        try:
            while True:
                item = self._queue.get()
                if item is _DONE or self._error is not None:
                    break
                for encoded in item.result():
                    tensor = self._delta_tried.pop(encoded.chunk_id, None)
                    if tensor is not None:
                        outcomes = self._delta_outcomes.setdefault(tensor, [0, 0])
                        outcomes[encoded.ref is None] += 1
                    if encoded.ref is not None:
                        self._delta_of[encoded.chunk_id] = encoded.ref
                        self.stats.delta_chunks += 1
                        self.stats.delta_raw_bytes += encoded.raw_length
                    if encoded.store_id in self._written:
                        continue  # the same delta bytes as a chunk stored before
                    self._written.add(encoded.store_id)
                    batch.append((encoded.store_id, encoded.blob))
                    batch_bytes += len(encoded.blob)
                    raw_bytes += encoded.raw_length
                if batch_bytes >= self.limits.batch_bytes:
                    self._store_batch(batch, raw_bytes)
                    batch, batch_bytes, raw_bytes = [], 0, 0
            if batch and self._error is None:
                self._store_batch(batch, raw_bytes)
        except BaseException as exc:  # handed to the reading thread
            self._error = self._error or exc
            self._drain_queue()

    def _store_batch(self, batch: Sequence[tuple[bytes, bytes]], raw_bytes: int) -> None:
        added = self.store.put(batch)
        self.stats.new_chunks += len(batch)
        self.stats.new_raw_bytes += raw_bytes
        self.stats.new_stored_bytes += added


def _reusable(cid: bytes, base: BaseChunk | None) -> DeltaRef | None:
    """The delta of a base chunk with the same bytes as chunk ``cid``, if it has one."""
    if base is not None and base.id == cid and not base.relation:
        return base.ref
    return None


def _base_ids(item: _Pending) -> list[bytes]:
    """Stored chunks a lacking chunk paired with a base could be coded against."""
    cid, _, _, base, _ = item
    if base is None:
        return []
    reuse = _reusable(cid, base)
    out = [reuse.delta, reuse.base] if reuse is not None else []
    key = base.keyframe()
    if key is not None:
        out.append(key[0])
    return out


def _hash_all(datas: list[memoryview]) -> list[bytes]:
    return [ids.chunk_id(data) for data in datas]


def _encode_then_release(
    store: ChunkStore,
    group: list[_Queued],
    known: Mapping[str, list[int]],
    mapped: MappedFile,
    reader: ByteReader,
    begin: int,
    end: int,
) -> list[Encoded]:
    """Encode a group of chunks lying in ``[begin, end)`` of a file, read through ``reader``,
    then drop those pages.

    Each chunk is first copied out and hashed again: encoding reads only bytes known to be the
    chunk's, so a file written to while it is pushed fails the push instead of leaving in the
    store a blob that does not match its id.
    """
    try:
        settled: list[_Task] = []
        for cid, offset, length, size, key in group:
            own = reader.read(offset, length)
            if ids.chunk_id(own) != cid:
                raise _changed(mapped.path)
            settled.append((cid, own, size, key))
        return _encode_group(store, settled, known)
    finally:
        mapped.release(begin, end)


def _still_written(path: Path) -> str:
    return (
        f"{path} is open for writing: it is pushed as it reads now, and the push fails if it "
        "changes meanwhile; push files once they are written"
    )


def _changed(path: Path) -> ChunkstoreError:
    return ChunkstoreError(
        f"{path} changed while it was pushed; nothing was committed: push again once it is written"
    )


def _encode_group(
    store: ChunkStore, group: list[_Task], known: Mapping[str, list[int]] | None = None
) -> list[Encoded]:
    """Encode a group of chunks, each one that has a keyframe as a delta where that pays.

    A tensor is judged by its first :data:`PROBES` chunks tried as deltas: once one pays, all
    its chunks are tried; once all of them miss (a tensor rewritten rather than nudged), the
    rest are stored on their own and their keyframes are never read, so a push over a cluster
    fetches no base chunk it will not use. ``known`` holds the push's outcomes so far per base
    tensor, ``[paid, missed]``. Keyframes are read in at most two calls: first those of the
    chunks of tensors that pay and of the probes, then, once the probes are judged, those of
    the other chunks of tensors whose probes paid. If a read fails (a keyframe gone or
    damaged: verify reports it), the chunks left are stored on their own.
    """
    known = known or {}
    outcomes = {key.tensor: list(known.get(key.tensor, (0, 0))) for *_, key in group if key}
    out: list[Encoded | None] = [None] * len(group)
    waiting = list(range(len(group)))
    while waiting:
        now, waiting = _next_round(group, waiting, outcomes)
        tried = []
        for i in now:
            if _pays(group[i][3], outcomes) is False:
                cid, data, size, _ = group[i]
                out[i] = encode_chunk(cid, data, size)
            else:
                tried.append(i)
        if not tried:
            continue
        keys = list(dict.fromkeys(group[i][3].id for i in tried))
        try:
            store.with_blobs(keys, partial(_encode_tried, group, tried, outcomes, out))
        except ChunkstoreError:
            for i in [*tried, *waiting]:
                cid, data, size, _ = group[i]
                out[i] = encode_chunk(cid, data, size)
            break
    return out  # type: ignore[return-value]  # every index was set


#: Chunks of a tensor tried as deltas before its other chunks are: if none of them pays, the
#: others are not tried.
PROBES = 2


def _verdict(outcome: Sequence[int]) -> bool | None:
    """Whether a tensor's chunks pay as deltas, from its ``[paid, missed]`` so far: True once
    one did, False once :data:`PROBES` did not and none did, None while being probed."""
    paid, missed = outcome
    if paid:
        return True
    return False if missed >= PROBES else None


def _pays(key: _Keyframe | None, outcomes: Mapping[str, list[int]]) -> bool | None:
    """The :func:`_verdict` on ``key``'s tensor; False without a keyframe."""
    return False if key is None else _verdict(outcomes[key.tensor])


def _next_round(
    group: list[_Task], waiting: list[int], outcomes: Mapping[str, list[int]]
) -> tuple[list[int], list[int]]:
    """Split the waiting chunks (indices into ``group``) into those to encode now and those
    that wait for their tensor's probes, which are among the first."""
    now, later = [], []
    probes: dict[str, int] = {}
    for i in waiting:
        key = group[i][3]
        if _pays(key, outcomes) is None:
            room = PROBES - outcomes[key.tensor][1]
            if probes.get(key.tensor, 0) >= room:
                later.append(i)
                continue
            probes[key.tensor] = probes.get(key.tensor, 0) + 1
        now.append(i)
    return now, later


def _encode_tried(
    group: list[_Task],
    tried: list[int],
    outcomes: dict[str, list[int]],
    out: list[Encoded | None],
    blobs: Mapping[bytes, bytes | memoryview],
) -> None:
    """Encode the ``tried`` chunks of ``group`` into ``out``, each as a delta against its
    keyframe (in ``blobs``) where that is smaller, counting each outcome for its tensor."""
    for i in tried:
        cid, data, size, key = group[i]
        blob = blobs[key.id]
        raw = codec.verified_buffer(key.id, blob)
        if len(raw) != key.length:
            encoded = encode_chunk(cid, data, size)
        else:
            base_size = None if key.transform else len(blob)  # a keyframe is stored whole
            encoded = encode_chunk(cid, data, size, (key.id, raw, key.transform), base_size)
        outcomes[key.tensor][encoded.ref is None] += 1
        out[i] = encoded
