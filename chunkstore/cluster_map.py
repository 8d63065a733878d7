"""The cluster map: which storage nodes exist, and how many of them keep each chunk.

Operators write it as a TOML file::

    epoch = 1            # optional, default 1; raise it on every change
    replicas = 3         # optional, default min(3, number of nodes)
    write_quorum = 2     # optional, default replicas // 2 + 1

    [[nodes]]
    id = "node-a"        # letters, digits, '_', '.', '-'
    address = "10.0.0.1:7400"
    weight = 1.0         # optional, default 1.0; relative share of the chunks

Nodes serve it to clients as :meth:`ClusterMap.to_dict` (JSON/protobuf transport). Every
:class:`ClusterMap` that exists is valid: construction checks every rule, and each broken rule is
reported as one line in a :class:`ClusterMapError` (:class:`ClusterFileError` when it comes from a
file, prefixed with the file's path).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import blake3

from chunkstore.errors import InvalidInput
from chunkstore.ring import HashRing
from chunkstore.tomlfile import load_toml
from chunkstore.v1 import store_pb2 as pb

_ID_RE = re.compile(r"[A-Za-z0-9_.-]+")
_ADDRESS_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})")
_TOP_KEYS = ("epoch", "replicas", "write_quorum", "nodes")
_NODE_KEYS = ("id", "address", "weight")


class ClusterMapError(InvalidInput):
    """A cluster map that breaks a rule; str() names the rule and the offending value."""


class ClusterFileError(ClusterMapError):
    """A cluster file that cannot be read, is not TOML, or describes an invalid map."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class NodeSpec:
    """One storage node: its stable id, where to reach it, and its relative capacity."""

    id: str
    address: str  # HOST:PORT; an IPv6 host in brackets
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID_RE.fullmatch(self.id):
            raise ClusterMapError(
                f"bad node id {self.id!r}: use only letters, digits, '_', '.' and '-'"
            )
        match = isinstance(self.address, str) and _ADDRESS_RE.fullmatch(self.address)
        if not match or not 1 <= int(match[1]) <= 65535:
            raise ClusterMapError(
                f"node {self.id!r}: bad address {self.address!r}: want HOST:PORT, port 1-65535"
            )
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w <= 0:
            raise ClusterMapError(f"node {self.id!r}: weight must be a number > 0, got {w!r}")


@dataclass(frozen=True)
class ClusterMap:
    """The nodes of a cluster and its replication rule, as of one epoch.

    Each chunk lives on ``replicas`` nodes (its owners on the ring); a write is acknowledged once
    ``write_quorum`` of them hold it durably.
    """

    epoch: int
    replicas: int
    write_quorum: int
    nodes: tuple[NodeSpec, ...]

    def __post_init__(self) -> None:
        for name in ("epoch", "replicas", "write_quorum"):
            if not _is_int(getattr(self, name)):
                raise ClusterMapError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.epoch < 1:
            raise ClusterMapError(f"epoch must be >= 1, got {self.epoch}")
        if not self.nodes:
            raise ClusterMapError("no nodes: a cluster needs at least one [[nodes]] entry")
        ids: set[str] = set()
        addresses: dict[str, str] = {}
        for node in self.nodes:
            if node.id in ids:
                raise ClusterMapError(f"duplicate node id {node.id!r}")
            ids.add(node.id)
            other = addresses.setdefault(node.address.lower(), node.id)
            if other != node.id:
                raise ClusterMapError(
                    f"nodes {other!r} and {node.id!r} have the same address {node.address!r}"
                )
        if self.replicas < 1:
            raise ClusterMapError(f"replicas must be >= 1, got {self.replicas}")
        if self.replicas > len(self.nodes):
            raise ClusterMapError(
                f"replicas = {self.replicas} but there are only {len(self.nodes)} nodes"
            )
        if not 1 <= self.write_quorum <= self.replicas:
            raise ClusterMapError(
                f"write_quorum must be between 1 and replicas ({self.replicas}), "
                f"got {self.write_quorum}"
            )

    @cached_property
    def _ring(self) -> HashRing:
        return HashRing([(node.id, node.weight) for node in self.nodes])

    @cached_property
    def _by_id(self) -> dict[str, NodeSpec]:
        return {node.id: node for node in self.nodes}

    def ring(self) -> HashRing:
        """The placement ring of these nodes (built once per map)."""
        return self._ring

    def owners(self, key: bytes) -> list[NodeSpec]:
        """The ``replicas`` nodes that keep ``key``, primary first (see :mod:`chunkstore.ring`)."""
        by_id = self._by_id
        return [by_id[node_id] for node_id in self._ring.owners(key, self.replicas)]

    def node(self, node_id: str) -> NodeSpec:
        """The node with this id; ``KeyError`` if the map has none."""
        return self._by_id[node_id]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str, int, float, list, dict) that :meth:`from_dict` reads back."""
        return {
            "epoch": self.epoch,
            "replicas": self.replicas,
            "write_quorum": self.write_quorum,
            "nodes": [{"id": n.id, "address": n.address, "weight": n.weight} for n in self.nodes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClusterMap:
        """Build and validate a map from :meth:`to_dict` output or a parsed cluster file.

        ``epoch``, ``replicas``, ``write_quorum`` and each node's ``weight`` may be absent and
        take the defaults in the module docstring; an unknown key is an error.
        Raises :class:`ClusterMapError`.
        """
        _reject_unknown(data, _TOP_KEYS, "")
        if "nodes" not in data:
            raise ClusterMapError("missing required key 'nodes' (add [[nodes]] entries)")
        raw_nodes = data["nodes"]
        if not isinstance(raw_nodes, list) or not all(isinstance(n, Mapping) for n in raw_nodes):
            raise ClusterMapError("'nodes' must be an array of tables ([[nodes]])")
        nodes = tuple(_node_from_dict(i, raw) for i, raw in enumerate(raw_nodes, start=1))
        replicas = data.get("replicas", min(3, len(nodes)))
        write_quorum = data.get("write_quorum", replicas // 2 + 1 if _is_int(replicas) else None)
        return cls(data.get("epoch", 1), replicas, write_quorum, nodes)

    def to_toml(self) -> str:
        """This map as a cluster file that :func:`load_cluster_file` reads back equal."""
        lines = [
            f"epoch = {self.epoch}",
            f"replicas = {self.replicas}",
            f"write_quorum = {self.write_quorum}",
        ]
        for n in self.nodes:
            # Ids and addresses are validated to plain ASCII without quotes or backslashes.
            lines += ["", "[[nodes]]", f'id = "{n.id}"', f'address = "{n.address}"']
            lines.append(f"weight = {n.weight!r}")
        return "\n".join(lines) + "\n"


def _reject_unknown(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [key for key in data if key not in allowed]
    if unknown:
        raise ClusterMapError(
            f"{where}unknown key {', '.join(map(repr, unknown))} (allowed: {', '.join(allowed)})"
        )


def _node_from_dict(number: int, data: Mapping[str, Any]) -> NodeSpec:
    where = f"node #{number}: "
    _reject_unknown(data, _NODE_KEYS, where)
    for key in ("id", "address"):
        if key not in data:
            raise ClusterMapError(f"{where}missing required key {key!r}")
    return NodeSpec(data["id"], data["address"], data.get("weight", 1.0))


def load_cluster_file(path: str | Path) -> ClusterMap:
    """Read and validate a TOML cluster file.

    Raises :class:`ClusterFileError` whose one line starts with ``path``: the file cannot be
    read, is not UTF-8 TOML (with tomllib's line and column), or breaks a rule of the map.
    """
    data = load_toml(path, "cluster file", ClusterFileError)
    try:
        return ClusterMap.from_dict(data)
    except ClusterMapError as e:
        raise ClusterFileError(f"{path}: {e}") from None


def map_to_proto(cluster: ClusterMap) -> pb.ClusterMap:
    """The map as the ClusterService serves it."""
    return pb.ClusterMap(
        epoch=cluster.epoch,
        replicas=cluster.replicas,
        write_quorum=cluster.write_quorum,
        nodes=[pb.NodeInfo(id=n.id, address=n.address, weight=n.weight) for n in cluster.nodes],
    )


def map_from_proto(message: pb.ClusterMap) -> ClusterMap:
    """The map a node serves; raises ClusterMapError if it breaks a rule."""
    return ClusterMap(
        epoch=message.epoch,
        replicas=message.replicas,
        write_quorum=message.write_quorum,
        nodes=tuple(NodeSpec(n.id, n.address, n.weight) for n in message.nodes),
    )


def map_digest(cluster: ClusterMap) -> bytes:
    """BLAKE3 of the map's deterministic protobuf encoding."""
    return blake3.blake3(map_to_proto(cluster).SerializeToString(deterministic=True)).digest()


def newer(a: ClusterMap, b: ClusterMap | None) -> bool:
    """Whether map ``a`` supersedes map ``b`` (any map supersedes None): a higher epoch, or at
    the same epoch a larger :func:`map_digest`, so that everyone settles on the same one of two
    maps made at once."""
    return b is None or (a.epoch, map_digest(a)) > (b.epoch, map_digest(b))
