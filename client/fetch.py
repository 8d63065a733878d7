"""Reading chunks from every node at once, with failover to the other owners of each chunk.

The ids are spread over their owners (each goes to the least loaded of its healthy owners), and
GetChunks streams to the chosen nodes run in parallel, each on its own thread. When asked to, a
thread verifies what it receives (decoding and BLAKE3 release the GIL, so that work runs in
parallel too) and hands it over through a bounded queue, which bounds the bytes in flight, or,
given a ``deliver`` callback, calls it itself (:meth:`Fetch.run`): nothing then funnels through
the reader's thread. Messages are read without copying blobs (:mod:`.wire`).

A node whose streams have all ended takes over the back half of what each stream still running
elsewhere has left of the ids it also owns (at least ``MIN_HANDOFF`` of them), so a slower
node, or one that started late, does not leave the others idle at the end of a read: the
stream that gave them up ends once the ids it kept have arrived. Whichever stream brings an id
first delivers it; the other skips it undecoded.

Ids that a stream did not deliver (the node failed, lacked them, or sent bytes that do not match
their id) go to their next owner. A stream that delivers nothing for ``stall_timeout`` while the
reader waits is cancelled and counts as failed that way, so a hung node costs seconds, not a
whole deadline. The same node is tried again, after a backoff, only for a retryable failure
(UNAVAILABLE, DEADLINE_EXCEEDED, a stall) and only once no other owner is left.

When every owner of an id has failed, the other nodes of the cluster are asked, once each, if
a ``fallback`` gives them: while chunks move to new owners after a membership change, a chunk
may still sit only on nodes that no longer own it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from chunkstore import codec, errors
from chunkstore.v1 import store_pb2 as pb

from . import wire
from .rpc import NodeCallError, NodeClient, RpcPolicy

#: Blob bytes assumed per requested chunk when setting a GetChunks deadline (the chunker's max).
DEADLINE_BYTES_PER_CHUNK = 256 << 10
_POLL = 0.1  # seconds between checks for an abandoned fetch while the queue is full
#: The fewest ids an idle node takes over from a running stream (~1 MiB of chunks): below that,
#: the stream they come from finishes them sooner than a new one starts.
MIN_HANDOFF = 16

Owners = Callable[[Sequence[bytes]], Sequence[Sequence[NodeClient]]]
#: The code of an id a stream did not get to: another id it asked for was absent (NOT_FOUND
#: ends a GetChunks stream); such an id is asked of the same node again.
_UNSENT = grpc.StatusCode.ABORTED
_UNSENT_DETAIL = "not sent: the stream ended at "
Fallback = Callable[[], Sequence[NodeClient]]
#: Takes an id and its bytes, valid only during the call (see :meth:`Fetch.run`).
Deliver = Callable[[bytes, codec.RawBuffer], None]


@dataclass(eq=False)
class _Stream:
    """One GetChunks call: its node, the ids asked for, the ones it is still to bring (not yet
    received, nor handed to another node), and when it last made progress."""

    node: NodeClient
    ids: list[bytes]
    last: float = field(default_factory=time.monotonic)
    call: grpc.Future | None = None
    stalled: bool = False
    keep: set[bytes] = field(init=False)
    gave_up_ids: bool = False  # some of its ids were handed to another node

    def __post_init__(self) -> None:
        self.keep = set(self.ids)

    def abandon(self) -> None:
        """Cancel the call; it then reports its undelivered ids as failed (retryable)."""
        self.stalled = True
        if self.call is not None:
            self.call.cancel()


class Fetch:
    """One parallel read of ``ids``; iterate it once for ``(id, data)`` of every id, any order.

    ``owners(ids)`` gives the owners of each id, primary first. ``data`` is the blob, or with
    ``verify`` the raw bytes checked against the id. An id asked for twice is yielded twice.
    Each node gets up to ``streams_per_node`` streams at once; at most ``queue_batches``
    received batches (about 1 MiB each) wait for the caller. ``fallback()``, called at most
    once, when some id's owners are spent, gives the nodes to ask next (each once). Raises
    ChunkNotFound, CorruptChunk or StoreUnavailable for an id no node could deliver. Abandoning
    the iterator cancels the streams.

    With ``deliver``, call :meth:`run` instead of iterating: the stream threads call
    ``deliver(id, data)`` themselves, from several threads at once, and an exception it raises
    ends the fetch and is raised by :meth:`run`. There ``data`` is bytes-like and valid only
    during the call (it may share the received message): nothing is copied that is written
    out at once.
    """

    def __init__(
        self,
        ids: Sequence[bytes],
        owners: Owners,
        *,
        policy: RpcPolicy,
        verify: bool,
        streams_per_node: int = 1,
        queue_batches: int = 16,
        fallback: Fallback | None = None,
        deliver: Deliver | None = None,
    ) -> None:
        self._copies = Counter(ids)
        distinct = list(self._copies)
        self._owners = dict(zip(distinct, owners(distinct), strict=True))
        self._policy = policy
        self._verify = verify
        self._streams = max(1, streams_per_node)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_batches)
        self._stop = threading.Event()
        self._running: set[_Stream] = set()
        self._first: dict[bytes, str] = {}  # the node each id was first asked of
        self._tries: dict[bytes, Counter[str]] = {}  # per id asked again: node id -> asks
        self._failures: dict[bytes, list[NodeCallError]] = {}
        self._fallback = fallback
        self._others: Sequence[NodeClient] | None = None
        self._deliver = deliver
        self._remaining = set(self._copies)  # ids not delivered yet
        self._lock = threading.Lock()  # guards _remaining and every stream's keep

    def run(self) -> None:
        """Fetch every id, handing each to ``deliver`` on the stream threads."""
        if self._deliver is None:
            raise TypeError("Fetch.run needs a deliver callback; iterate the fetch instead")
        for _ in self:  # nothing is yielded: the streams deliver
            pass

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        remaining = self._remaining
        try:
            for node, ids in self._assign(list(self._copies)).items():
                step = -(-len(ids) // self._streams)
                for start in range(0, len(ids), step):
                    self._start(node, ids[start : start + step], 0.0)
            while self._running:
                try:
                    kind, stream, payload = self._queue.get(timeout=self._policy.stall_timeout)
                except queue.Empty:
                    self._abandon_stalled()
                    continue
                if kind == "chunks":
                    for cid, data in payload:
                        if self._claim(cid):
                            for _ in range(self._copies[cid]):
                                yield cid, data
                    continue
                if kind == "crash":
                    raise payload
                self._running.discard(stream)
                if not payload and not any(s.node is stream.node for s in self._running):
                    self._hand_off(stream.node)
                retry: dict[NodeClient, list[bytes]] = {}
                delay: Counter[NodeClient] = Counter()
                for cid, failure in payload.items():
                    if cid in remaining:
                        node, wait = self._next_owner(cid, failure)
                        retry.setdefault(node, []).append(cid)
                        delay[node] = max(delay[node], wait)
                for node, ids in retry.items():
                    self._start(node, ids, delay[node])
        finally:
            self._stop.set()
            for stream in self._running:
                if stream.call is not None:
                    stream.call.cancel()

    def _claim(self, cid: bytes) -> bool:
        """Whether ``cid`` is still to be delivered; from now on it is not."""
        with self._lock:
            if cid in self._remaining:
                self._remaining.discard(cid)
                return True
            return False

    def _abandon_stalled(self) -> None:
        """Cancel the streams that delivered nothing for ``stall_timeout`` (a hung node)."""
        limit = time.monotonic() - self._policy.stall_timeout
        for stream in self._running:
            if stream.last <= limit:
                stream.abandon()

    # planning

    def _assign(self, ids: list[bytes]) -> dict[NodeClient, list[bytes]]:
        """Each id to the least loaded of its healthy owners (of all its owners if none is
        healthy), the first in ring order on a tie; each node's ids in the order given."""
        choices = {
            owners: [n for n in owners if n.healthy] or list(owners)
            for owners in set(self._owners.values())
        }
        load = dict.fromkeys({n for nodes in choices.values() for n in nodes}, 0)
        plan: dict[NodeClient, list[bytes]] = {}
        for cid in ids:
            node, *others = choices[self._owners[cid]]
            for other in others:
                if load[other] < load[node]:
                    node = other
            load[node] += 1
            self._first[cid] = node.id
            plan.setdefault(node, []).append(cid)
        return plan

    def _hand_off(self, node: NodeClient) -> None:
        """Give idle ``node`` the back half of each running stream's remaining ids it owns."""
        for stream in list(self._running):
            if stream.node is node or stream.stalled:
                continue
            with self._lock:
                left = [
                    cid
                    for cid in stream.ids
                    if cid in stream.keep and cid in self._remaining and node in self._owners[cid]
                ]
                if len(left) < 2 * MIN_HANDOFF:
                    continue
                taken = left[len(left) // 2 :]
                stream.keep.difference_update(taken)
                stream.gave_up_ids = True
            for cid in taken:
                self._tries_of(cid)[node.id] += 1
            self._start(node, taken, 0.0)

    def _tries_of(self, cid: bytes) -> Counter[str]:
        """How often ``cid`` was asked of each node."""
        tries = self._tries.get(cid)
        if tries is None:
            tries = self._tries[cid] = Counter({self._first[cid]: 1})
        return tries

    def _next_owner(self, cid: bytes, failure: NodeCallError) -> tuple[NodeClient, float]:
        """Where to ask for ``cid`` after ``failure``, and how long to wait first.

        Raises the error that reports ``cid`` when no owner is left to try.
        """
        if failure.code == _UNSENT and failure.detail.startswith(_UNSENT_DETAIL):
            # ask the same node again: nothing says it lacks this id
            return self._client(cid, failure.node.id), 0.0
        self._failures.setdefault(cid, []).append(failure)
        tries = self._tries_of(cid)
        limit = self._policy.attempts
        if not failure.retryable:
            tries[failure.node.id] = limit  # this owner will not do
        candidates = [n for n in self._owners[cid] if tries[n.id] < limit]
        if not candidates:
            candidates = [n for n in self._other_nodes(cid) if not tries[n.id]]
        if not candidates:
            raise self._error(cid)
        node = min(candidates, key=lambda n: (tries[n.id], not n.healthy))
        wait = self._policy.delay(tries[node.id]) if tries[node.id] else 0.0
        tries[node.id] += 1
        return node, wait

    def _client(self, cid: bytes, node_id: str) -> NodeClient:
        """The client of node ``node_id``, an owner or fallback node of ``cid``."""
        return next(n for n in [*self._owners[cid], *(self._others or ())] if n.id == node_id)

    def _other_nodes(self, cid: bytes) -> list[NodeClient]:
        """The fallback nodes that do not own ``cid``, healthy ones first."""
        if self._fallback is None:
            return []
        if self._others is None:
            self._others = self._fallback()
        owners = {n.id for n in self._owners[cid]}
        return sorted((n for n in self._others if n.id not in owners), key=lambda n: not n.healthy)

    def _error(self, cid: bytes) -> errors.ChunkstoreError:
        failures = self._failures[cid]
        codes = {f.code for f in failures}
        if codes == {grpc.StatusCode.NOT_FOUND}:
            return errors.ChunkNotFound(cid)
        if codes <= {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DATA_LOSS}:
            bad = [f for f in failures if f.code == grpc.StatusCode.DATA_LOSS]
            where = ", ".join(f"{f.node.id} ({f.detail})" for f in bad)
            return errors.CorruptChunk(cid, f"bad on every owner that has it: {where}")
        lines = "; ".join(f"{f.node.id}: {f.code.name.lower()}: {f.detail}" for f in failures)
        return errors.StoreUnavailable(f"cannot read chunk {cid.hex()}: {lines}")

    # streams

    def _start(self, node: NodeClient, ids: list[bytes], delay: float) -> None:
        stream = _Stream(node, ids, time.monotonic() + delay)
        self._running.add(stream)
        threading.Thread(
            target=self._run, args=(stream, delay), name=f"fetch-{node.id}", daemon=True
        ).start()

    def _run(self, stream: _Stream, delay: float) -> None:
        """Post what the stream delivers, then ("end", {id: failure}) for the rest."""
        try:
            if delay and self._stop.wait(delay):
                return
            failures = self._receive(stream)
        except Exception as exc:  # a bug, not a node failure: the reader re-raises it
            self._post(("crash", stream, exc))
            return
        self._post(("end", stream, failures))

    def _receive(self, stream: _Stream) -> dict[bytes, NodeCallError]:
        node = stream.node
        wanted = stream.keep
        failures: dict[bytes, NodeCallError] = {}
        try:
            nbytes = len(stream.ids) * DEADLINE_BYTES_PER_CHUNK
            stream.call = call = node.get_encoded(
                pb.ChunkIds(ids=stream.ids), timeout=self._policy.deadline(nbytes, stream=True)
            )
            if stream.stalled or self._stop.is_set():
                call.cancel()
            for message in call:
                stream.last = time.monotonic()
                out = self._unpack(node, message, wanted, failures)
                if self._deliver is not None:
                    self._hand_over(stream, out)
                elif out and not self._post(("chunks", stream, out)):
                    return {}
                stream.last = time.monotonic()
                if not wanted and stream.gave_up_ids:  # the rest is another node's now
                    call.cancel()
                    break
            node.record(None)
            rest = NodeCallError(node.spec, grpc.StatusCode.NOT_FOUND, "not in its reply")
        except wire.WireError as e:  # the node answered, with bytes that are no ChunkBatch
            call.cancel()
            rest = NodeCallError(
                node.spec, grpc.StatusCode.DATA_LOSS, f"malformed GetChunks message: {e}"
            )
        except grpc.RpcError as exc:
            if self._stop.is_set():  # cancelled by the reader
                return {}
            if stream.stalled:
                rest = NodeCallError(
                    node.spec,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"stalled: nothing received for {self._policy.stall_timeout:.0f} s",
                )
            else:
                rest = NodeCallError.from_rpc(node.spec, exc)
                absent = _named(rest, set(stream.ids))
                if absent is not None:
                    # The node lacks one chunk, which ended the stream; the ones after it are
                    # not known to be absent there (during a move a node holds some of them).
                    with self._lock:
                        kept = absent in wanted  # else it was handed to another node
                        wanted.discard(absent)
                    if kept:
                        failures[absent] = rest
                    rest = NodeCallError(node.spec, _UNSENT, f"{_UNSENT_DETAIL}{absent.hex()}")
            node.record(rest)
        with self._lock:  # the reader may be handing some of them off meanwhile
            failures.update(dict.fromkeys(wanted, rest))
        return failures

    def _hand_over(self, stream: _Stream, chunks: list[tuple[bytes, bytes]]) -> None:
        """Deliver ``chunks`` not delivered yet (each as often as it was asked for)."""
        for cid, data in chunks:
            if self._stop.is_set():
                return
            if self._claim(cid):
                for _ in range(self._copies[cid]):
                    self._deliver(cid, data)
                stream.last = time.monotonic()

    def _unpack(
        self,
        node: NodeClient,
        message: bytes,
        wanted: set[bytes],
        failures: dict[bytes, NodeCallError],
    ) -> list[tuple[bytes, bytes]]:
        """The wanted chunks of a ChunkBatch ``message`` (verified if asked); bad ones go to
        ``failures``. Raises WireError if ``message`` is not a ChunkBatch."""
        out = []
        for cid, blob in wire.read_chunk_batch(message):
            with self._lock:
                kept = cid in wanted
                wanted.discard(cid)
                if not kept and cid not in self._remaining:
                    continue  # not asked for, or handed off and brought by the other node
            if not self._verify:
                out.append((cid, bytes(blob)))
                continue
            try:
                out.append((cid, self._decode(cid, blob)))
            except errors.CorruptChunk as exc:
                reason = str(exc).removeprefix(f"chunk {cid.hex()} is corrupt: ")
                failures[cid] = NodeCallError(node.spec, grpc.StatusCode.DATA_LOSS, reason)
        return out

    def _decode(self, cid: bytes, blob: memoryview) -> codec.RawBuffer:
        """The verified raw bytes of ``blob``: a buffer that may share the received message
        when they go to ``deliver`` at once, else a copy of their own."""
        if self._deliver is not None:
            return codec.verified_buffer(cid, blob)
        return codec.decode_verified(cid, blob)

    def _post(self, item: tuple) -> bool:
        """Queue ``item`` for the reader; False if the fetch was abandoned meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False


def _named(failure: NodeCallError, asked: set[bytes]) -> bytes | None:
    """The id among ``asked`` that a NOT_FOUND ``failure`` names as absent, if any."""
    if failure.code != grpc.StatusCode.NOT_FOUND:
        return None
    for word in failure.detail.split():
        if len(word) == 64:
            try:
                cid = bytes.fromhex(word)
            except ValueError:
                continue
            if cid in asked:
                return cid
    return None
