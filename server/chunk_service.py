"""ChunkService over a node's store: verified, durable writes and batched reads.

Every chunk a client sends is decoded and hashed before anything of its batch is stored, so no
client can poison an id that other versions deduplicate against.

A PutChunks stream is a pipeline: a reader thread takes each message off the stream and
verifies it (on the verification pool) while the messages before it are being committed; the
verified batches of every stream go to the node's :class:`~.group_commit.GroupCommit`, which
writes all that are waiting in one synced transaction, and each batch is acknowledged, in
order, once its transaction is durable. The chunk messages of PutChunks and GetChunks are read
and written by hand (:mod:`chunkstore.client.wire`), without copying blobs into protobuf
objects; :func:`add_chunk_service` registers the service that way.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from functools import partial
from typing import NamedTuple

import grpc

from chunkstore import codec, errors
from chunkstore.client import wire
from chunkstore.ids import ID_SIZE
from chunkstore.stores.lmdb_store import LmdbStore
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc

from .group_commit import GroupCommit
from .keyspace import KEY_SPACE, MAX_RANGES, digests_for
from .membership import MapHolder
from .metrics import NodeMetrics

MAX_CHUNK_BYTES = 16 << 20  # largest raw chunk accepted (the chunker's own upper bound)
GET_BATCH_BYTES = 1 << 20  # blob bytes per GetChunks response message (1 MiB pulled fastest)
GET_GROUP = 128  # ids GetChunks reads in one read transaction
PUT_WINDOW = 4  # batches of one PutChunks stream verified ahead of their acknowledgement
_POLL = 0.1  # seconds between checks for an abandoned stream while a queue is full or empty
_END = object()
SCAN_DEFAULT_LIMIT = 4096  # ChunkInfo per ScanChunks message when the request says 0
SCAN_MAX_LIMIT = 65536


class Rejection(NamedTuple):
    """Why one chunk of a PutChunks batch was refused."""

    reason: str  # a label of chunkstore_chunks_rejected_total
    message: str


def check_chunk(cid: bytes, blob: bytes | memoryview) -> Rejection | None:
    """None if ``blob`` decodes to bytes whose BLAKE3 is ``cid``, else why not.

    The raw length in the blob's header is checked before decoding allocates room for it.
    """
    if len(cid) != ID_SIZE:
        return Rejection("bad_id", f"chunk id {cid.hex()!r} has {len(cid)} bytes, not {ID_SIZE}")
    try:
        length = codec.raw_length(blob)
    except codec.CodecError as e:
        return Rejection("corrupt", f"chunk {cid.hex()} is corrupt: {e}")
    if length > MAX_CHUNK_BYTES:
        return Rejection(
            "too_large",
            f"chunk {cid.hex()} is too large: {length} raw bytes, at most {MAX_CHUNK_BYTES}",
        )
    try:
        codec.verified_buffer(cid, blob)
    except errors.CorruptChunk as e:
        return Rejection("corrupt", str(e))
    return None


def check_chunks(chunks: Sequence[wire.WireChunk]) -> list[Rejection]:
    """The rejections of the bad ones among ``chunks``."""
    return [r for r in (check_chunk(cid, blob) for cid, blob in chunks) if r is not None]


def _chunk_batches(
    ids: Sequence[bytes], blobs: Mapping[bytes, bytes | memoryview]
) -> list[tuple[bytes, int, int]]:
    """``(serialized ChunkBatch, chunks, blob bytes)`` of messages of about
    ``GET_BATCH_BYTES`` holding the blobs of ``ids`` in order."""
    out = []
    batch: list[tuple[bytes, bytes | memoryview]] = []
    size = 0
    for cid in ids:
        blob = blobs[cid]
        batch.append((cid, blob))
        size += len(blob)
        if size >= GET_BATCH_BYTES:
            out.append((wire.chunk_batch(batch), len(batch), size))
            batch, size = [], 0
    if batch:
        out.append((wire.chunk_batch(batch), len(batch), size))
    return out


def _done(result: object) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


def _post(window: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put ``item`` in ``window``; False if the stream was abandoned meanwhile."""
    while not stop.is_set():
        try:
            window.put(item, timeout=_POLL)
            return True
        except queue.Full:
            continue
    return False


def _get(window: queue.Queue, stop: threading.Event, context: grpc.ServicerContext) -> object:
    """The next item of ``window``; raises if the call ended meanwhile."""
    while True:
        try:
            return window.get(timeout=_POLL)
        except queue.Empty:
            if not context.is_active():
                raise errors.StoreUnavailable("the call ended") from None


def chunk_ids(ids: Sequence[bytes]) -> Sequence[bytes]:
    """``ids``, checked to be chunk ids; raise InvalidInput naming the first that is not."""
    for i, cid in enumerate(ids):
        if len(cid) != ID_SIZE:
            raise errors.InvalidInput(
                f"id #{i} ({cid.hex()!r}) has {len(cid)} bytes; ids are {ID_SIZE} bytes"
            )
    return ids


class ChunkServicer(pb_grpc.ChunkServiceServicer):
    """Serves the chunks of ``store``; verification runs on the stream's reader thread and
    ``verify_pool`` (a batch is cut into ``verify_workers`` parts). Register it with
    :func:`add_chunk_service`; :meth:`close` it after the server stopped."""

    def __init__(
        self,
        store: LmdbStore,
        metrics: NodeMetrics,
        verify_pool: Executor,
        holder: MapHolder | None = None,
        *,
        verify_workers: int = 2,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._pool = verify_pool
        self._verify_parts = max(1, verify_workers)
        self._holder = holder
        self._commit = GroupCommit(store)

    def close(self) -> None:
        """Commit the batches still waiting; later writes fail with UNAVAILABLE."""
        self._commit.close()

    def Missing(self, request: pb.ChunkIds, context: grpc.ServicerContext) -> pb.ChunkIds:
        wanted = list(dict.fromkeys(chunk_ids(request.ids)))
        absent = self._store.missing(wanted)
        self._metrics.chunks_deduplicated.inc(len(wanted) - len(absent))
        return pb.ChunkIds(ids=[cid for cid in wanted if cid in absent])

    def PutChunks(
        self, request_iterator: Iterable[bytes], context: grpc.ServicerContext
    ) -> Iterator[pb.PutChunksAck]:
        window: queue.Queue = queue.Queue(maxsize=PUT_WINDOW)
        stop = threading.Event()
        threading.Thread(
            target=self._take_batches,
            args=(request_iterator, window, stop),
            name="put-reader",
            daemon=True,
        ).start()
        try:
            while True:
                item = _get(window, stop, context)
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                seq, chunks, committed = item
                try:
                    added = committed.result()
                except errors.StoreFull:
                    self._metrics.chunks_rejected.labels("store_full").inc(len(chunks))
                    raise
                self._metrics.chunks_received.inc(len(chunks))
                self._metrics.received_bytes.inc(sum(len(blob) for _, blob in chunks))
                self._metrics.added_bytes.inc(added)
                yield pb.PutChunksAck(seq=seq, added_bytes=added)
        finally:
            stop.set()

    def _take_batches(
        self, requests: Iterable[bytes], window: queue.Queue, stop: threading.Event
    ) -> None:
        """Read, verify and queue for commit each message of a PutChunks stream, in order;
        post ``(seq, chunks, future of the commit)`` for each, then the end or the error that
        stopped the stream (nothing after a bad batch is stored)."""
        try:
            for data in requests:
                if stop.is_set():
                    return
                try:
                    seq, chunks = wire.read_put_chunks_batch(data)
                except wire.WireError as e:
                    raise errors.InvalidInput(f"malformed PutChunks message: {e}") from None
                self._verify(seq, chunks)
                committed = self._commit.put(chunks) if chunks else _done(0)
                if not _post(window, (seq, chunks, committed), stop):
                    return
            _post(window, _END, stop)
        except Exception as exc:  # the stream's handler raises it
            _post(window, exc, stop)

    def _verify(self, seq: int, chunks: list[wire.WireChunk]) -> None:
        """Raise InvalidInput naming the first bad chunk; count every bad one."""
        step = -(-len(chunks) // self._verify_parts) or 1
        slices = [chunks[i : i + step] for i in range(0, len(chunks), step)]
        others = [self._pool.submit(check_chunks, part) for part in slices[1:]]
        rejections = check_chunks(slices[0]) if slices else []
        for other in others:
            rejections += other.result()
        if not rejections:
            return
        for r in rejections:
            self._metrics.chunks_rejected.labels(r.reason).inc()
        more = f" (and {len(rejections) - 1} more bad chunks)" if len(rejections) > 1 else ""
        raise errors.InvalidInput(
            f"batch {seq}: {rejections[0].message}{more}; nothing of this batch was stored"
        )

    def GetChunks(self, request: pb.ChunkIds, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Serialized ChunkBatch messages of about ``GET_BATCH_BYTES`` each, in request order;
        ends with NOT_FOUND at the first absent id."""
        wanted = chunk_ids(request.ids)
        for start in range(0, len(wanted), GET_GROUP):
            group = wanted[start : start + GET_GROUP]
            messages = self._store.with_blobs(group, partial(_chunk_batches, group))
            for message, count, size in messages:
                self._metrics.chunks_served.inc(count)
                self._metrics.served_bytes.inc(size)
                yield message

    def DeleteChunks(
        self, request: pb.DeleteChunksRequest, context: grpc.ServicerContext
    ) -> pb.DeleteResult:
        since = request.unwanted_since if request.HasField("unwanted_since") else None
        deleted = self._store.delete(chunk_ids(request.ids), unwanted_since=since)
        self._metrics.chunks_deleted.inc(deleted)
        return pb.DeleteResult(deleted=deleted)

    def ScanChunks(
        self, request: pb.ScanChunksRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ChunkInfoBatch]:
        """Stream the chunks with ids after ``request.after`` in id order, ``limit`` per message."""
        limit = min(request.limit or SCAN_DEFAULT_LIMIT, SCAN_MAX_LIMIT)
        batch: list[pb.ChunkInfo] = []
        for info in self._store.scan():
            if info.id <= request.after:
                continue
            batch.append(
                pb.ChunkInfo(id=info.id, stored_size=info.stored_size, wanted_at=info.wanted_at)
            )
            if len(batch) >= limit:
                yield pb.ChunkInfoBatch(chunks=batch)
                batch = []
        if batch:
            yield pb.ChunkInfoBatch(chunks=batch)

    def Totals(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.ChunkTotals:
        totals = self._store.totals()
        return pb.ChunkTotals(chunks=totals.chunks, stored_bytes=totals.stored_bytes)

    def Holds(self, request: pb.ChunkIds, context: grpc.ServicerContext) -> pb.ChunkIds:
        wanted = list(dict.fromkeys(chunk_ids(request.ids)))
        held = self._store.holds(wanted)
        return pb.ChunkIds(ids=[cid for cid in wanted if cid in held])

    def MarkWanted(self, request: pb.ChunkIds, context: grpc.ServicerContext) -> pb.ChunkIds:
        wanted = list(dict.fromkeys(chunk_ids(request.ids)))
        gone = self._store.mark_wanted(wanted)
        self._metrics.chunks_deduplicated.inc(len(wanted) - len(gone))
        return pb.ChunkIds(ids=[cid for cid in wanted if cid in gone])

    def RangeDigests(
        self, request: pb.RangeDigestsRequest, context: grpc.ServicerContext
    ) -> pb.RangeDigestsReply:
        if self._holder is None:
            raise errors.InvalidInput("this node keeps no cluster map")
        if not 1 <= request.count <= MAX_RANGES or request.span < 1:
            raise errors.InvalidInput(
                f"RangeDigests wants 1 to {MAX_RANGES} ranges of at least one position"
            )
        if request.start + request.span * request.count > KEY_SPACE:
            raise errors.InvalidInput("RangeDigests ranges end beyond the key space")
        cluster = self._holder.map
        digests, counts = digests_for(
            self._store,
            cluster,
            self._holder.node_id,
            request.peer,
            request.start,
            request.span,
            request.count,
        )
        return pb.RangeDigestsReply(epoch=cluster.epoch, digests=digests, counts=counts)


def add_chunk_service(servicer: ChunkServicer, server: grpc.Server) -> None:
    """Register ``servicer`` as ChunkService, as the generated code does, except that
    PutChunks requests reach it as bytes and GetChunks responses leave it as bytes (see
    :mod:`chunkstore.client.wire`): the same messages on the wire."""
    unary = grpc.unary_unary_rpc_method_handler
    stream = grpc.unary_stream_rpc_method_handler

    def codec(request: type, response: type | None) -> dict:
        return {
            "request_deserializer": request.FromString,
            "response_serializer": response.SerializeToString if response else None,
        }

    handlers = {
        "Missing": unary(servicer.Missing, **codec(pb.ChunkIds, pb.ChunkIds)),
        "PutChunks": grpc.stream_stream_rpc_method_handler(
            servicer.PutChunks,
            request_deserializer=None,
            response_serializer=pb.PutChunksAck.SerializeToString,
        ),
        "GetChunks": stream(servicer.GetChunks, **codec(pb.ChunkIds, None)),
        "DeleteChunks": unary(
            servicer.DeleteChunks, **codec(pb.DeleteChunksRequest, pb.DeleteResult)
        ),
        "ScanChunks": stream(servicer.ScanChunks, **codec(pb.ScanChunksRequest, pb.ChunkInfoBatch)),
        "Totals": unary(servicer.Totals, **codec(pb.Empty, pb.ChunkTotals)),
        "Holds": unary(servicer.Holds, **codec(pb.ChunkIds, pb.ChunkIds)),
        "MarkWanted": unary(servicer.MarkWanted, **codec(pb.ChunkIds, pb.ChunkIds)),
        "RangeDigests": unary(
            servicer.RangeDigests, **codec(pb.RangeDigestsRequest, pb.RangeDigestsReply)
        ),
    }
    service = pb.DESCRIPTOR.services_by_name["ChunkService"]
    missing = {m.name for m in service.methods} - handlers.keys()
    if missing:  # a method added to the .proto must be added here too
        raise RuntimeError(f"ChunkService methods without a handler: {sorted(missing)}")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
