"""ChunkService over a node's store: verified, durable writes and batched reads.

Every chunk a client sends is decoded and hashed before anything of its batch is stored, so no
client can poison an id that other versions deduplicate against.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor
from typing import NamedTuple

import grpc

from chunkstore import codec, errors
from chunkstore.ids import ID_SIZE
from chunkstore.stores.lmdb_store import LmdbStore
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc

from .keyspace import KEY_SPACE, MAX_RANGES, digests_for
from .membership import MapHolder
from .metrics import NodeMetrics

MAX_CHUNK_BYTES = 16 << 20  # largest raw chunk accepted (the chunker's own upper bound)
GET_BATCH_BYTES = 2 << 20  # blob bytes per GetChunks response message
SCAN_DEFAULT_LIMIT = 4096  # ChunkInfo per ScanChunks message when the request says 0
SCAN_MAX_LIMIT = 65536


class Rejection(NamedTuple):
    """Why one chunk of a PutChunks batch was refused."""

    reason: str  # a label of chunkstore_chunks_rejected_total
    message: str


def check_chunk(chunk: pb.EncodedChunk) -> Rejection | None:
    """None if ``chunk.blob`` decodes to bytes whose BLAKE3 is ``chunk.id``, else why not.

    The raw length in the blob's header is checked before decoding allocates room for it.
    """
    cid, blob = chunk.id, chunk.blob
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
        codec.decode_verified(cid, blob)
    except errors.CorruptChunk as e:
        return Rejection("corrupt", str(e))
    return None


def chunk_ids(ids: Sequence[bytes]) -> Sequence[bytes]:
    """``ids``, checked to be chunk ids; raise InvalidInput naming the first that is not."""
    for i, cid in enumerate(ids):
        if len(cid) != ID_SIZE:
            raise errors.InvalidInput(
                f"id #{i} ({cid.hex()!r}) has {len(cid)} bytes; ids are {ID_SIZE} bytes"
            )
    return ids


class ChunkServicer(pb_grpc.ChunkServiceServicer):
    """Serves the chunks of ``store``; verification runs on ``verify_pool``."""

    def __init__(
        self,
        store: LmdbStore,
        metrics: NodeMetrics,
        verify_pool: Executor,
        holder: MapHolder | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._pool = verify_pool
        self._holder = holder

    def Missing(self, request: pb.ChunkIds, context: grpc.ServicerContext) -> pb.ChunkIds:
        wanted = list(dict.fromkeys(chunk_ids(request.ids)))
        absent = self._store.missing(wanted)
        self._metrics.chunks_deduplicated.inc(len(wanted) - len(absent))
        return pb.ChunkIds(ids=[cid for cid in wanted if cid in absent])

    def PutChunks(
        self, request_iterator: Iterable[pb.PutChunksBatch], context: grpc.ServicerContext
    ) -> Iterator[pb.PutChunksAck]:
        for batch in request_iterator:
            self._verify(batch)
            pairs = [(c.id, c.blob) for c in batch.chunks]
            try:
                added = self._store.put(pairs)
            except errors.StoreFull:
                self._metrics.chunks_rejected.labels("store_full").inc(len(pairs))
                raise
            self._metrics.chunks_received.inc(len(pairs))
            self._metrics.received_bytes.inc(sum(len(blob) for _, blob in pairs))
            self._metrics.added_bytes.inc(added)
            yield pb.PutChunksAck(seq=batch.seq, added_bytes=added)

    def _verify(self, batch: pb.PutChunksBatch) -> None:
        """Raise InvalidInput naming the first bad chunk of ``batch``; count every bad one."""
        rejections = [r for r in self._pool.map(check_chunk, batch.chunks) if r is not None]
        if not rejections:
            return
        for r in rejections:
            self._metrics.chunks_rejected.labels(r.reason).inc()
        more = f" (and {len(rejections) - 1} more bad chunks)" if len(rejections) > 1 else ""
        raise errors.InvalidInput(
            f"batch {batch.seq}: {rejections[0].message}{more}; nothing of this batch was stored"
        )

    def GetChunks(
        self, request: pb.ChunkIds, context: grpc.ServicerContext
    ) -> Iterator[pb.ChunkBatch]:
        batch: list[pb.EncodedChunk] = []
        size = 0
        for cid, blob in self._store.get(chunk_ids(request.ids)):
            batch.append(pb.EncodedChunk(id=cid, blob=blob))
            size += len(blob)
            if size >= GET_BATCH_BYTES:
                yield self._served(batch, size)
                batch, size = [], 0
        if batch:
            yield self._served(batch, size)

    def _served(self, batch: list[pb.EncodedChunk], size: int) -> pb.ChunkBatch:
        self._metrics.chunks_served.inc(len(batch))
        self._metrics.served_bytes.inc(size)
        return pb.ChunkBatch(chunks=batch)

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
