"""How a cluster read spreads ids over their owners (no servers: the nodes are stand-ins)."""

from __future__ import annotations

import os
import time
from collections import Counter

import grpc

from chunkstore import codec, ids
from chunkstore.client import fetch, wire
from chunkstore.client.fetch import Fetch
from chunkstore.client.rpc import RpcPolicy
from chunkstore.cluster_map import NodeSpec


class _Call:
    """A GetChunks stream of a stand-in: ``messages``, ``pause`` seconds before each; cancelling
    ends it."""

    def __init__(self, messages: list[bytes], pause: float) -> None:
        self._messages = iter(messages)
        self._pause = pause
        self.cancelled = False

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        time.sleep(self._pause)
        if self.cancelled:
            raise StopIteration
        return next(self._messages)

    def cancel(self) -> None:
        self.cancelled = True


class StandInNode:
    """Answers GetChunks from ``blobs`` in one message, and records the ids it was asked for."""

    def __init__(self, node_id: str, blobs: dict[bytes, bytes], healthy: bool = True) -> None:
        self.spec = NodeSpec(node_id, "127.0.0.1:1")
        self.id = node_id
        self.healthy = healthy
        self.asked: list[bytes] = []
        self._blobs = blobs

    def get_encoded(self, request, timeout=None):
        self.asked.extend(request.ids)
        return _Call([wire.chunk_batch([(cid, self._blobs[cid]) for cid in request.ids])], 0.0)

    def record(self, failure) -> None:
        pass


def _chunks(count: int) -> dict[bytes, bytes]:
    datas = [os.urandom(1000) for _ in range(count)]
    return {ids.chunk_id(data): codec.encode(data) for data in datas}


def _read(keys: list[bytes], owners: dict[bytes, tuple[StandInNode, ...]]) -> dict[bytes, bytes]:
    """Every id of ``keys`` read, verified, from the stand-ins ``owners`` names."""
    got: dict[bytes, bytes] = {}

    def keep(cid: bytes, raw) -> None:
        got[cid] = bytes(raw)

    Fetch(
        keys,
        lambda wanted: [owners[k] for k in wanted],
        policy=RpcPolicy(),
        verify=True,
        deliver=keep,
    ).run()
    return got


def test_ids_are_spread_evenly_over_their_owners_in_order(monkeypatch):
    monkeypatch.setattr(fetch, "MIN_HANDOFF", 1 << 30)  # the first spread, with no hand-off after
    blobs = _chunks(600)
    nodes = [StandInNode(f"n{i}", blobs) for i in range(3)]
    pairs = [(nodes[0], nodes[1]), (nodes[0], nodes[2]), (nodes[1], nodes[2])]  # n0 first twice
    owners = {cid: pairs[i % 3] for i, cid in enumerate(blobs)}
    got = _read(list(blobs), owners)
    assert got == {cid: codec.decode(blob) for cid, blob in blobs.items()}
    loads = [len(node.asked) for node in nodes]
    assert sum(loads) == len(blobs) and max(loads) - min(loads) <= 1
    order = {cid: i for i, cid in enumerate(blobs)}
    for node in nodes:
        assert all(node in owners[cid] for cid in node.asked)
        assert node.asked == sorted(node.asked, key=order.__getitem__)


def test_unhealthy_owners_are_asked_only_when_no_owner_is_healthy(monkeypatch):
    monkeypatch.setattr(fetch, "MIN_HANDOFF", 1 << 30)  # the first spread, with no hand-off after
    blobs = _chunks(90)
    healthy, sick, also_sick = (
        StandInNode("n0", blobs),
        StandInNode("n1", blobs, healthy=False),
        StandInNode("n2", blobs, healthy=False),
    )
    keys = list(blobs)
    owners = {cid: (sick, healthy) for cid in keys[:60]}
    owners.update({cid: (sick, also_sick) for cid in keys[60:]})
    assert len(_read(keys, owners)) == len(blobs)
    assert Counter(healthy.asked) == Counter(keys[:60])
    # Both owners of the rest are unhealthy: they share those ids, least loaded first.
    assert sorted([*sick.asked, *also_sick.asked]) == sorted(keys[60:])
    assert abs(len(sick.asked) - len(also_sick.asked)) <= 1


class PacedNode(StandInNode):
    """A stand-in that sends ``batch`` chunks per message, ``pause`` seconds apart; counts what
    it sent, and fails every call after its first ``calls`` ones."""

    def __init__(self, node_id, blobs, pause: float, batch: int = 4, calls: int = 1 << 30):
        super().__init__(node_id, blobs)
        self.pause, self.batch, self.calls = pause, batch, calls
        self.sent: list[bytes] = []

    def get_encoded(self, request, timeout=None):
        self.asked.extend(request.ids)
        self.calls -= 1
        if self.calls < 0:
            raise grpc.RpcError("this node is gone")
        ids_ = list(request.ids)
        groups = [ids_[i : i + self.batch] for i in range(0, len(ids_), self.batch)]
        node = self

        class Counting(_Call):
            def __next__(self) -> bytes:
                message = super().__next__()
                node.sent.extend(cid for cid, _ in wire.read_chunk_batch(message))
                return message

        return Counting(
            [wire.chunk_batch([(c, self._blobs[c]) for c in g]) for g in groups], self.pause
        )


def test_an_idle_owner_takes_over_the_tail_of_a_slow_stream():
    blobs = _chunks(400)
    fast, slow = PacedNode("fast", blobs, pause=0.0005), PacedNode("slow", blobs, pause=0.01)
    keys = list(blobs)
    got = _read(keys, {cid: (slow, fast) for cid in keys})
    assert got == {cid: codec.decode(blob) for cid, blob in blobs.items()}
    # Each was given half; the fast one then took over most of the slow one's half, which
    # stopped early instead of sending all it was first asked for.
    assert len(slow.asked) == 200 and len(fast.asked) > 300
    assert len(slow.sent) < 150


def test_ids_handed_to_a_node_that_fails_are_read_from_their_other_owner():
    blobs = _chunks(400)
    # The fast node answers its first call, then is gone: the ids handed to it go back.
    fast = PacedNode("fast", blobs, pause=0.0005, calls=1)
    slow = PacedNode("slow", blobs, pause=0.002)
    keys = list(blobs)
    got = _read(keys, {cid: (slow, fast) for cid in keys})
    assert got == {cid: codec.decode(blob) for cid, blob in blobs.items()}
    assert len(fast.asked) > 200  # it was handed some
    assert set(slow.sent) | set(fast.sent) == set(keys)
