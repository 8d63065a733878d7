"""Consistent-hash ring with virtual nodes: which nodes own a key.

Each node gets ``round(weight * vnodes_per_weight)`` virtual nodes (at least one if its weight is
positive, none if it is 0). Virtual node ``i`` of node ``node_id`` sits at the 64-bit position
given by the first 8 bytes (big-endian) of ``BLAKE3(f"{node_id}#{i}")``, so every process on
every machine builds the same ring from the same nodes, in whatever order they are listed.

A key's position is :func:`key_position`. Its owners are the first ``n`` distinct nodes met
walking clockwise (towards larger positions, wrapping at 2**64) from the first virtual node at or
after that position; the first owner is the key's primary.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence

import blake3
import numpy as np

_KEY_SPACE = 1 << 64
_ID_SIZE = 32


def _hash8(data: bytes) -> bytes:
    return blake3.blake3(data).digest()[:8]


def _key_prefix(key: bytes) -> bytes:
    return key[:8] if len(key) == _ID_SIZE else _hash8(key)


def key_position(key: bytes) -> int:
    """The ring position of ``key``, in ``[0, 2**64)``.

    A 32-byte key is taken to be a chunk id, which is already a BLAKE3-256 digest: its first
    8 bytes, big-endian, are its position. Any other key is hashed first: the first 8 bytes of
    ``BLAKE3(key)``. Keys that are 32 bytes long but not uniformly random must be hashed by the
    caller, or they will spread badly.
    """
    return int.from_bytes(_key_prefix(key), "big")


def key_positions(keys: Sequence[bytes]) -> np.ndarray:
    """:func:`key_position` of each key, as a ``uint64`` array."""
    prefixes = b"".join([_key_prefix(k) for k in keys])
    return np.frombuffer(prefixes, dtype=">u8").astype(np.uint64)


def _vnode_position(node_id: str, i: int) -> int:
    return int.from_bytes(_hash8(f"{node_id}#{i}".encode()), "big")


class HashRing:
    """An immutable consistent-hash ring over weighted nodes.

    ``nodes`` are ``(node id, weight)`` pairs with distinct ids and finite weights >= 0; a node of
    weight 0 owns nothing. Lookups cost one binary search: the list of the next ``n`` distinct
    nodes after each virtual node is computed once per ``n``, on first use, and cached (building
    it twice from two threads at once is harmless).
    """

    __slots__ = (
        "_nodes",
        "_vnodes_per_weight",
        "_positions",
        "_positions_np",
        "_vnode_ids",
        "_live",
        "_shares",
        "_rows",
    )

    def __init__(self, nodes: Sequence[tuple[str, float]], vnodes_per_weight: int = 128) -> None:
        if vnodes_per_weight < 1:
            raise ValueError(f"vnodes_per_weight must be >= 1, got {vnodes_per_weight}")
        seen: set[str] = set()
        vnodes: list[tuple[int, str]] = []
        for node_id, weight in nodes:
            if node_id in seen:
                raise ValueError(f"duplicate node id {node_id!r}")
            seen.add(node_id)
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"node {node_id!r}: weight must be finite and >= 0, got {weight}")
            count = max(1, round(weight * vnodes_per_weight)) if weight > 0 else 0
            vnodes.extend((_vnode_position(node_id, i), node_id) for i in range(count))
        vnodes.sort()  # ties on position (never seen in practice) break by node id

        self._nodes = tuple((node_id, float(weight)) for node_id, weight in nodes)
        self._vnodes_per_weight = vnodes_per_weight
        self._positions = [pos for pos, _ in vnodes]
        self._positions_np = np.array(self._positions, dtype=np.uint64)
        self._vnode_ids = [node_id for _, node_id in vnodes]
        self._live = len(set(self._vnode_ids))
        self._shares = self._primary_shares()
        self._rows: dict[int, list[tuple[str, ...]]] = {}

    @property
    def nodes(self) -> tuple[tuple[str, float], ...]:
        """The ``(node id, weight)`` pairs, in the order given."""
        return self._nodes

    @property
    def vnodes_per_weight(self) -> int:
        return self._vnodes_per_weight

    def owners(self, key: bytes, n: int) -> list[str]:
        """The first ``n`` distinct node ids clockwise from ``key``, primary first.

        Returns ``min(n, number of nodes with weight > 0)`` ids. ``n`` must be >= 1.
        """
        rows = self._rows.get(n)
        if rows is None:
            rows = self._build_rows(n)
        if not rows:
            return []
        i = bisect_left(self._positions, key_position(key))
        return list(rows[i if i < len(rows) else 0])

    def owners_many(self, keys: Sequence[bytes], n: int) -> list[tuple[str, ...]]:
        """``[tuple(self.owners(key, n)) for key in keys]``, with one vectorised search.

        Keys with the same owners share one tuple, so callers may map each distinct row once.
        """
        rows = self._rows.get(n)
        if rows is None:
            rows = self._build_rows(n)
        if not rows:
            return [() for _ in keys]
        idx = np.searchsorted(self._positions_np, key_positions(keys), side="left")
        idx[idx == len(rows)] = 0
        return [rows[i] for i in idx.tolist()]

    def share(self, node_id: str) -> float:
        """The fraction of the key space for which ``node_id`` is the primary owner.

        Shares of all nodes sum to 1 (0 for a ring without live nodes). Raises ``KeyError``
        for an id that is not on the ring.
        """
        return self._shares[node_id]

    def __repr__(self) -> str:
        return f"HashRing({list(self._nodes)!r}, vnodes_per_weight={self._vnodes_per_weight})"

    def _primary_shares(self) -> dict[str, float]:
        """Each vnode owns the arc from its predecessor (exclusive) to itself (inclusive)."""
        arcs = {node_id: 0 for node_id, _ in self._nodes}
        pos = self._positions
        for i, node_id in enumerate(self._vnode_ids):
            arcs[node_id] += (pos[i] - pos[i - 1]) % _KEY_SPACE if len(pos) > 1 else _KEY_SPACE
        return {node_id: arc / _KEY_SPACE for node_id, arc in arcs.items()}

    def _build_rows(self, n: int) -> list[tuple[str, ...]]:
        """For each vnode, the first ``min(n, live nodes)`` distinct nodes from it clockwise.

        Built backwards: the row of vnode ``i`` is its own node followed by the row of vnode
        ``i + 1`` without that node, cut to length. The walk starts from vnode 0's row, found
        directly, so the wrap-around is exact.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        want = min(n, self._live)
        ids = self._vnode_ids
        rows: list[tuple[str, ...]] = [()] * len(ids)
        if ids:
            first: list[str] = []
            for node_id in ids:
                if node_id not in first:
                    first.append(node_id)
                    if len(first) == want:
                        break
            rows[0] = after = tuple(first)
            for i in range(len(ids) - 1, 0, -1):
                own = ids[i]
                rows[i] = after = (own, *(x for x in after if x != own))[:want]
        self._rows[n] = rows
        return rows
