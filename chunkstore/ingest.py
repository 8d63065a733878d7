"""The push pipeline: cut files into chunks, find the ones the store lacks, encode and store them.

Per file: memory-map -> cut (FastCDC) -> id (BLAKE3) on the calling thread; then, per window of
chunks, one batched existence check; the missing chunks are encoded on a thread pool and handed,
in order, to a writer thread that stores them in large all-or-nothing batches. Memory is bounded
by the window and the writer's queue, never by file size.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from chunkstore import codec, ids
from chunkstore.chunking import Chunker, ChunkerParams, MappedFile
from chunkstore.model import Manifest
from chunkstore.progress import NoProgress, Progress
from chunkstore.stores.base import ChunkStore
from chunkstore.tensor_index import read_index

MiB = 1 << 20


@dataclass
class IngestStats:
    scanned_bytes: int = 0
    chunks: int = 0
    new_chunks: int = 0
    new_raw_bytes: int = 0
    new_stored_bytes: int = 0


@dataclass(frozen=True)
class PipelineLimits:
    window_bytes: int = 32 * MiB  # raw bytes per existence check
    group_bytes: int = 4 * MiB  # raw bytes per encoding task
    batch_bytes: int = 16 * MiB  # encoded bytes per store write
    queued_groups: int = 8  # encoding tasks in flight before the reader waits
    workers: int = 2  # encoding threads


_DONE = object()
#: A chunk waiting to be stored: id, bytes, element size of the tensor it lies in (if any).
_Pending = tuple[bytes, memoryview, int | None]


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
    ) -> None:
        self.store = store
        self.limits = limits
        self.stats = IngestStats()
        self._chunker = Chunker(params)
        self._progress = progress or NoProgress()
        self._known: set[bytes] = set()  # stored already, or queued for storing in this push
        self._pool = ThreadPoolExecutor(limits.workers, thread_name_prefix="chunk-encode")
        # Existence checks run on their own thread, overlapping the next window's hashing.
        self._checker = ThreadPoolExecutor(1, thread_name_prefix="chunk-check")
        self._checks: deque[Future] = deque()
        self._queue: queue.Queue = queue.Queue(maxsize=limits.queued_groups)
        self._error: BaseException | None = None
        self._maps: list[MappedFile] = []
        self._writer = threading.Thread(target=self._write_loop, name="chunk-writer", daemon=True)
        self._writer.start()

    def ingest_file(self, path: Path) -> Manifest:
        """Chunk one file and queue its new chunks for storing; return its manifest.

        A safetensors file is cut along its tensors (:func:`~chunkstore.chunking.file_regions`)
        and its tensor index kept in the manifest; any other file, or a malformed one, is cut
        as plain bytes.
        """
        mapped = MappedFile(path)
        self._maps.append(mapped)
        view = mapped.view
        index = read_index(view, mapped.size)
        chunks: list[tuple[bytes, int]] = []
        window: list[_Pending] = []
        window_bytes = 0
        # Bytes still to be read by checks and encoders: pages before them can be dropped.
        in_flight = 3 * self.limits.window_bytes + self.limits.group_bytes * (
            self.limits.queued_groups + 2
        )
        for offset, length, element_size in self._chunker.cut_file(view, index):
            data = view[offset : offset + length]
            cid = ids.chunk_id(data)
            chunks.append((cid, length))
            window.append((cid, data, element_size))
            window_bytes += length
            if window_bytes >= self.limits.window_bytes:
                self._flush(window)
                mapped.release_before(offset - in_flight)
                window, window_bytes = [], 0
        self._flush(window)
        return Manifest(mapped.size, chunks, index.tensors if index else [])

    def finish(self) -> IngestStats:
        """Wait until every queued chunk is durable; raise what the writer met, if anything."""
        try:
            while self._checks:
                self._checks.popleft().result()
            self._put_queue(_DONE)
            self._writer.join()
            if self._error is not None:
                raise self._error
            return self.stats
        finally:
            self.close()

    def close(self) -> None:
        """Stop the pipeline without waiting for queued work (after an error or interrupt)."""
        if self._writer.is_alive():
            self._error = self._error or InterruptedError("push interrupted")
        self._checker.shutdown(wait=True, cancel_futures=True)
        if self._writer.is_alive():
            self._drain_queue()
            self._queue.put(_DONE)
            self._writer.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for mapped in self._maps:
            mapped.close()
        self._maps.clear()

    def _flush(self, window: list[_Pending]) -> None:
        if not window:
            return
        self._raise_writer_error()
        self._checks.append(self._checker.submit(self._check, window))
        while len(self._checks) > 2:
            self._checks.popleft().result()

    def _check(self, window: list[_Pending]) -> None:
        """Ask the store which chunks of the window it lacks and queue those for encoding."""
        scanned = sum(len(d) for _, d, _ in window)
        self.stats.scanned_bytes += scanned
        self.stats.chunks += len(window)
        fresh = list(dict.fromkeys(cid for cid, _, _ in window if cid not in self._known))
        lacking = self.store.missing(fresh) if fresh else set()
        self._known.update(fresh)
        new_bytes = 0
        group: list[_Pending] = []
        group_bytes = 0
        for cid, data, element_size in window:
            if cid not in lacking:
                continue
            lacking.discard(cid)  # a chunk repeated within the window is stored once
            group.append((cid, data, element_size))
            group_bytes += len(data)
            new_bytes += len(data)
            if group_bytes >= self.limits.group_bytes:
                self._put_queue(self._pool.submit(_encode_group, group))
                group, group_bytes = [], 0
        if group:
            self._put_queue(self._pool.submit(_encode_group, group))
        self._progress.advance(scanned, new_bytes)

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
                for cid, blob, raw_len in item.result():
                    batch.append((cid, blob))
                    batch_bytes += len(blob)
                    raw_bytes += raw_len
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


def _encode_group(group: list[_Pending]) -> list[tuple[bytes, bytes, int]]:
    return [(cid, codec.encode(data, size), len(data)) for cid, data, size in group]
