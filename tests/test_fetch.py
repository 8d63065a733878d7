"""How a cluster read spreads ids over their owners (no servers: the nodes are stand-ins)."""

from __future__ import annotations

import os
from collections import Counter

from chunkstore import codec, ids
from chunkstore.client import wire
from chunkstore.client.fetch import Fetch
from chunkstore.client.rpc import RpcPolicy
from chunkstore.cluster_map import NodeSpec


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
        return iter([wire.chunk_batch([(cid, self._blobs[cid]) for cid in request.ids])])

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


def test_ids_are_spread_evenly_over_their_owners_in_order():
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


def test_unhealthy_owners_are_asked_only_when_no_owner_is_healthy():
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
