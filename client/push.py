"""Storing a batch of chunks on their owners: one PutChunks stream per node, all in parallel.

Each node receives the chunks it owns in messages of about ``message_bytes`` and acknowledges
a message once it is durable. A chunk is stored once ``quorum`` of its owners acknowledged a
message holding it. A node's messages hold either only chunks it is the primary owner of or
only others, so that the bytes a batch newly added can be counted once: as the primaries
report them.

Messages are serialized by hand (:func:`~chunkstore.client.wire.put_chunks_batch`): joining the
encoded fields copies each blob once, where protobuf objects copy it twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field

import grpc

from .quorum import settle
from .rpc import NodeCallError, NodeClient, RpcPolicy, to_error
from .wire import put_chunks_batch

Chunk = tuple[bytes, bytes]


@dataclass
class _Share:
    """The chunks one node receives, as messages of chunk indexes, and what it acknowledged."""

    node: NodeClient
    messages: list[list[int]] = field(default_factory=list)
    primary: list[bool] = field(default_factory=list)  # per message: chunks it is primary for
    acked: set[int] = field(default_factory=set)  # message numbers (the stream's seq)
    added: int = 0  # blob bytes its acknowledged primary messages added
    call: grpc.Future | None = None  # the stream in flight
    cut: bool = False  # cancelled as a straggler

    def cancel(self) -> None:
        self.cut = True
        if self.call is not None:
            self.call.cancel()


def put_chunks(
    pool: Executor,
    chunks: Sequence[Chunk],
    owners: Sequence[Sequence[NodeClient]],
    quorum: int,
    message_bytes: int,
) -> int:
    """Store ``chunks[i]`` on the nodes ``owners[i]`` (primary first); return the blob bytes
    the primaries newly added (an undercount only when a primary failed).

    Once every chunk has ``quorum`` acknowledgements, streams still running get a grace period
    (see :func:`~chunkstore.client.quorum.settle`), then are cancelled and their nodes marked
    slow. Raises (see :func:`~chunkstore.client.rpc.to_error`) when some chunk ends with fewer
    than ``quorum`` acknowledgements: StoreFull if a node was full, else StoreUnavailable naming
    every node that failed. Chunks acknowledged before the failure stay stored; they are not
    referenced by any version yet, so GC collects them if no later push does.
    """
    shares = _plan(chunks, owners, message_bytes)
    sends = {pool.submit(s.node.run, _sender(s, chunks, s.node.policy)): s for s in shares}
    failed: dict[str, NodeCallError] = {}
    acks = [0] * len(chunks)

    def absorb(send: Future) -> None:
        share = sends[send]
        try:
            send.result()
        except NodeCallError as failure:
            failed.setdefault(share.node.id, failure)
        for seq in share.acked:
            for i in share.messages[seq]:
                acks[i] += 1

    start = time.monotonic()
    grace = shares[0].node.policy.straggler_grace if shares else 0.0
    late = settle(sends, absorb, lambda: min(acks, default=quorum) >= quorum, grace)
    for send in late:
        sends[send].cancel()
    wait(late)
    for send in late:
        node = sends[send].node
        failed.setdefault(node.id, node.mark_slow(time.monotonic() - start))
        absorb(send)  # what it acknowledged before it was cut off still counts
    short = [i for i, n in enumerate(acks) if n < quorum]
    if short:
        first = chunks[short[0]][0].hex()
        more = f" and {len(short) - 1} more" if len(short) > 1 else ""
        raise to_error(
            f"cannot store chunk {first}{more}: {acks[short[0]]} of "
            f"{len(owners[short[0]])} owners stored it, write quorum is {quorum}",
            list(failed.values()),
        )
    return sum(share.added for share in shares)


def _plan(
    chunks: Sequence[Chunk], owners: Sequence[Sequence[NodeClient]], message_bytes: int
) -> list[_Share]:
    """Each node's share: its primary chunks and the others, cut into separate messages, the
    messages in the order of their first chunk."""
    runs: dict[NodeClient, tuple[list[int], list[int]]] = {}
    for i, nodes in enumerate(owners):
        for rank, node in enumerate(nodes):
            runs.setdefault(node, ([], []))[rank > 0].append(i)
    shares = []
    for node, (primary, others) in runs.items():
        share = _Share(node)
        messages = [
            (message, is_primary)
            for is_primary, run in ((True, primary), (False, others))
            for message in _cut(run, chunks, message_bytes)
        ]
        # In chunk order, so that every owner of a chunk receives it at about the same time:
        # chunks reach the quorum steadily, and a push cut short leaves more of them stored.
        for message, is_primary in sorted(messages, key=lambda m: m[0][0]):
            share.messages.append(message)
            share.primary.append(is_primary)
        shares.append(share)
    return shares


def _cut(run: list[int], chunks: Sequence[Chunk], limit: int) -> list[list[int]]:
    """``run`` cut into messages of at most ``limit`` blob bytes (at least one chunk each)."""
    messages: list[list[int]] = []
    size = limit
    for i in run:
        blob_size = len(chunks[i][1])
        if size + blob_size > limit:
            messages.append([])
            size = 0
        messages[-1].append(i)
        size += blob_size
    return messages


def _sender(share: _Share, chunks: Sequence[Chunk], policy: RpcPolicy) -> Callable[[], None]:
    """A call for :meth:`NodeClient.run` that sends the share's unacknowledged messages.

    It keeps its progress in ``share``: a retry resends only what was not acknowledged.
    """

    def send() -> None:
        pending = [seq for seq in range(len(share.messages)) if seq not in share.acked]
        expected = set(pending)
        nbytes = sum(len(chunks[i][1]) for seq in pending for i in share.messages[seq])
        requests = (
            put_chunks_batch(seq, [chunks[i] for i in share.messages[seq]]) for seq in pending
        )
        share.call = call = share.node.put_encoded(
            requests, timeout=policy.deadline(nbytes, stream=True)
        )
        if share.cut:
            call.cancel()
        for ack in call:
            if ack.seq in expected and ack.seq not in share.acked:
                share.acked.add(ack.seq)
                if share.primary[ack.seq]:
                    share.added += ack.added_bytes
        unacked = len(share.messages) - len(share.acked)
        if unacked:
            raise NodeCallError(
                share.node.spec,
                grpc.StatusCode.INTERNAL,
                f"PutChunks ended without acknowledging {unacked} of its messages",
            )

    return send
