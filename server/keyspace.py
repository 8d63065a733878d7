"""Ranges of the ring's key space, and digests that tell two nodes whether a range is in sync.

A chunk id's ring position is its first 8 bytes, big-endian (:func:`chunkstore.ring.key_position`),
and a node's store lists its chunks in id order, so a range of positions is a contiguous run of
the store. Two owners of a key range compare it cheaply: each hashes the sorted ids it holds
that both of them own (:func:`range_digests`); equal digests mean neither lacks anything the
other has there, and only the ranges that differ need their ids compared one by one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import blake3

from chunkstore.cluster_map import ClusterMap
from chunkstore.stores.base import ChunkInfo
from chunkstore.stores.lmdb_store import LmdbStore

KEY_SPACE = 1 << 64
MAX_RANGES = 1 << 16  # ranges per RangeDigests call


def position(key: bytes) -> int:
    """The ring position of a chunk id."""
    return int.from_bytes(key[:8], "big")


def scan_range(store: LmdbStore, lo: int, hi: int) -> Iterator[ChunkInfo]:
    """The chunks ``store`` holds whose position is in ``[lo, hi)``, in id order."""
    # An 8-byte key sorts before every 32-byte id that starts with it and after all smaller ones.
    after = lo.to_bytes(8, "big") if lo else b""
    for info in store.scan(after=after):
        if position(info.id) >= hi:
            return
        yield info


def scan_ids(store: LmdbStore, lo: int, hi: int) -> Iterator[bytes]:
    """The ids of :func:`scan_range`."""
    for info in scan_range(store, lo, hi):
        yield info.id


def range_digests(
    ids: Sequence[bytes],
    rows: Sequence[Sequence[str]],
    me: str,
    peer: str,
    start: int,
    span: int,
    count: int,
) -> tuple[list[bytes], list[int]]:
    """Digest and count per range of the ``ids`` (sorted, each with its owners ``rows``) that
    both ``me`` and ``peer`` own; range i is ``[start + i * span, start + (i + 1) * span)``."""
    hashers = [blake3.blake3() for _ in range(count)]
    counts = [0] * count
    for cid, owners in zip(ids, rows, strict=True):
        if me in owners and peer in owners:
            i = (position(cid) - start) // span
            if 0 <= i < count:
                hashers[i].update(cid)
                counts[i] += 1
    return [h.digest() for h in hashers], counts


def digests_for(
    store: LmdbStore, cluster: ClusterMap, me: str, peer: str, start: int, span: int, count: int
) -> tuple[list[bytes], list[int]]:
    """:func:`range_digests` over what ``store`` holds, owners as ``cluster`` places them."""
    hi = min(KEY_SPACE, start + span * count)
    ids = list(scan_ids(store, start, hi))
    rows = cluster.ring().owners_many(ids, cluster.replicas) if ids else []
    return range_digests(ids, rows, me, peer, start, span, count)


def ranges_for(chunks: int, ids_per_range: int = 1024) -> int:
    """How many equal ranges to cut the key space into for a node holding ``chunks``: a power
    of two giving about ``ids_per_range`` ids each (at least 16, at most 2**20)."""
    want = max(1, chunks // ids_per_range)
    return min(1 << 20, max(16, 1 << (want - 1).bit_length()))
