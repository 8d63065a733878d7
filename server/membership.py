"""A node's view of the cluster map: the newest it has seen, kept in its data directory.

Maps are ordered by epoch; two different maps of the same epoch (two operators changing
membership at once) by the BLAKE3 digest of their canonical encoding, so every node settles on
the same one (:func:`newer`). A node adopts a map only if it is newer than its own, from
whoever offers it: ``PublishMap`` (``chunkstore cluster add-node``/``remove-node``), a peer
asked by :meth:`MapHolder.refresh_from_peers` (at start and every few seconds), or the seed of
``--join``. Each adopted map is written to ``DATA_DIR/cluster-map.toml`` before it is used, so a
node restarted with an older cluster file keeps the newest map it had.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from chunkstore.client.rpc import NodeCallError, NodeClient, RpcPolicy, at_address
from chunkstore.cluster_map import (
    ClusterFileError,
    ClusterMap,
    ClusterMapError,
    NodeSpec,
    load_cluster_file,
    map_from_proto,
    newer,
)
from chunkstore.errors import InvalidInput, StoreUnavailable
from chunkstore.v1 import store_pb2 as pb

log = logging.getLogger("chunkstore.membership")

PERSISTED_MAP = "cluster-map.toml"
DEPARTED_FILE = "departed-nodes.json"
MAX_DEPARTED = 32  # removed nodes remembered
DEFAULT_MAP_REFRESH = 5.0  # seconds between asking peers for a newer map
GOSSIP_SAMPLE = 3  # peers asked per round after the first


def load_persisted(data_dir: str | Path) -> ClusterMap | None:
    """The map a node persisted in ``data_dir``, or None if it has none.

    Raises ClusterFileError if the file is there but unreadable or invalid."""
    path = Path(data_dir) / PERSISTED_MAP
    if not path.exists():
        return None
    return load_cluster_file(path)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Peers:
    """A client per other node, made on first use with the node's peer policy (TLS and token:
    see :attr:`chunkstore.server.node.NodeServer.peer_policy`), remade if its address changes."""

    def __init__(self, node_id: str, policy: RpcPolicy) -> None:
        self.node_id = node_id
        self.policy = policy
        self._lock = threading.Lock()
        self._clients: dict[str, NodeClient] = {}

    def client(self, spec: NodeSpec) -> NodeClient:
        with self._lock:
            client = self._clients.get(spec.id)
            if client is None or client.spec.address != spec.address:
                if client is not None:
                    client.close()
                client = self._clients[spec.id] = NodeClient(spec, self.policy)
            return client

    def others(self, cluster: ClusterMap) -> list[NodeClient]:
        """Clients of every node of ``cluster`` but this one."""
        return [self.client(n) for n in cluster.nodes if n.id != self.node_id]

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


class MapHolder:
    """The current map of node ``node_id``; thread-safe. With ``data_dir``, every adopted map
    is persisted there first. Listeners are called (outside the lock) after each change."""

    def __init__(
        self, node_id: str, cluster: ClusterMap, data_dir: str | Path | None = None
    ) -> None:
        self.node_id = node_id
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._lock = threading.Lock()
        self._map = cluster
        self._listeners: list[Callable[[ClusterMap], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._departed: dict[str, NodeSpec] = self._load_departed()
        if self._data_dir is not None:
            try:
                persisted = load_persisted(self._data_dir)
            except ClusterFileError:
                persisted = None
            if persisted != cluster:
                self._persist(cluster)

    @property
    def map(self) -> ClusterMap:
        return self._map

    @property
    def epoch(self) -> int:
        return self._map.epoch

    def in_map(self) -> bool:
        return any(n.id == self.node_id for n in self._map.nodes)

    @property
    def departed(self) -> list[NodeSpec]:
        """Nodes that map changes this node saw took out of the map (the latest last)."""
        return list(self._departed.values())

    def _load_departed(self) -> dict[str, NodeSpec]:
        if self._data_dir is None:
            return {}
        try:
            rows = json.loads((self._data_dir / DEPARTED_FILE).read_text())
            return {r["id"]: NodeSpec(r["id"], r["address"], r.get("weight", 1.0)) for r in rows}
        except (OSError, ValueError, KeyError, TypeError, ClusterMapError):
            return {}

    def _note_departed(self, old: ClusterMap, new: ClusterMap) -> None:
        kept = {n.id for n in new.nodes}
        for node in old.nodes:
            if node.id not in kept:
                self._departed.pop(node.id, None)
                self._departed[node.id] = node
        for node_id in kept:
            self._departed.pop(node_id, None)
        while len(self._departed) > MAX_DEPARTED:
            self._departed.pop(next(iter(self._departed)))
        if self._data_dir is not None and self._data_dir.is_dir():
            rows = [{"id": n.id, "address": n.address, "weight": n.weight} for n in self.departed]
            _write_atomically(self._data_dir / DEPARTED_FILE, json.dumps(rows))

    def subscribe(self, listener: Callable[[ClusterMap], None]) -> None:
        self._listeners.append(listener)

    def offer(self, cluster: ClusterMap, source: str = "") -> bool:
        """Adopt ``cluster`` if it is newer than the current map; return whether it is the
        current map now (newly adopted or the same)."""
        with self._lock:
            current = self._map
            if cluster == current:
                return True
            if not newer(cluster, current):
                return False
            self._persist(cluster)
            self._note_departed(current, cluster)
            self._map = cluster
        log.info(
            "node %s: cluster map epoch %d -> %d%s (%d nodes: %s)",
            self.node_id,
            current.epoch,
            cluster.epoch,
            f" from {source}" if source else "",
            len(cluster.nodes),
            ", ".join(n.id for n in cluster.nodes),
        )
        for listener in self._listeners:
            try:
                listener(cluster)
            except Exception:
                log.exception("map listener failed")
        return True

    def _persist(self, cluster: ClusterMap) -> None:
        if self._data_dir is not None and self._data_dir.is_dir():
            _write_atomically(self._data_dir / PERSISTED_MAP, cluster.to_toml())

    def refresh_from_peers(
        self, peers: Peers, timeout: float = 2.0, sample: int | None = None
    ) -> bool:
        """Ask the other nodes of the map (``sample`` of them at random, or all) for their map
        and adopt the newest; True if the map changed. Nodes that do not answer are skipped."""
        changed = False
        clients = peers.others(self._map)
        if sample is not None and len(clients) > sample:
            clients = random.sample(clients, sample)
        for client in clients:
            try:
                reply = client.run(
                    lambda c=client: c.cluster.GetClusterMap(pb.Empty(), timeout=timeout)
                )
                theirs = map_from_proto(reply)
            except (NodeCallError, ClusterMapError):
                continue
            if newer(theirs, self._map):
                changed |= self.offer(theirs, f"node {client.id}")
        return changed

    def start_refresh(self, peers: Peers, interval: float = DEFAULT_MAP_REFRESH) -> None:
        """Ask every peer for a newer map now, then ``GOSSIP_SAMPLE`` random peers every
        ``interval`` seconds (a new map spreads to all nodes in a few rounds), in a thread."""

        def loop() -> None:
            sample = None
            while True:
                try:
                    self.refresh_from_peers(peers, sample=sample)
                    sample = GOSSIP_SAMPLE
                except Exception:
                    log.exception("map refresh failed")
                if self._stop.wait(interval):
                    return

        self._thread = threading.Thread(target=loop, name="map-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def fetch_seed_map(url: str, policy: RpcPolicy) -> ClusterMap:
    """The newest map among those the seeds of ``url`` (``grpc://HOST:PORT,...``) serve."""
    from chunkstore.client.cluster_store import parse_url

    best: ClusterMap | None = None
    failures = []
    for address in parse_url(url):
        client = NodeClient(NodeSpec("seed", address), policy)
        try:
            reply = client.run(
                lambda c=client: c.cluster.GetClusterMap(pb.Empty(), timeout=policy.timeout)
            )
            theirs = map_from_proto(reply)
        except NodeCallError as e:
            failures.append(at_address(e))
            continue
        except ClusterMapError as e:
            failures.append(f"{address}: serves an invalid cluster map: {e}")
            continue
        finally:
            client.close()
        if newer(theirs, best):
            best = theirs
    if best is None:
        raise StoreUnavailable(f"cannot fetch the cluster map from {url}: {'; '.join(failures)}")
    return best


def startup_map(
    node_id: str,
    data_dir: str | Path,
    cluster_file: str | Path | None,
    join: str | None,
    policy: RpcPolicy,
) -> ClusterMap:
    """The map a node starts with: the newest of its cluster file, the map persisted in its
    data directory and, with ``join``, the map its seeds serve.

    Raises InvalidInput if there is none, or if the cluster file is the only map and lacks
    ``node_id`` (a typo, most likely); StoreUnavailable if joining needs the seeds' map and
    none answers.
    """
    candidates: list[ClusterMap] = []
    file_map = load_cluster_file(cluster_file) if cluster_file is not None else None
    persisted = load_persisted(data_dir)
    candidates += [m for m in (file_map, persisted) if m is not None]
    if join is not None:
        try:
            candidates.append(fetch_seed_map(join, policy))
        except StoreUnavailable as e:
            if not candidates:
                raise
            log.warning("node %s: %s; starting with the map it has", node_id, e)
    if not candidates:
        raise InvalidInput("no cluster map: give --cluster FILE or --join grpc://SEED")
    lone_file = file_map is not None and persisted is None and join is None
    if lone_file and not any(n.id == node_id for n in file_map.nodes):
        ids = ", ".join(n.id for n in file_map.nodes)
        raise InvalidInput(
            f"{cluster_file}: no node {node_id!r} in the map (nodes: {ids}); to add a node to a "
            "running cluster, start it with --join grpc://SEED --listen HOST:PORT instead"
        )
    best = candidates[0]
    for m in candidates[1:]:
        if newer(m, best):
            best = m
    return best


def own_address(node_id: str, maps: Iterable[ClusterMap | None]) -> str | None:
    """The address of ``node_id`` in the first of ``maps`` that lists it."""
    for m in maps:
        if m is not None:
            for n in m.nodes:
                if n.id == node_id:
                    return n.address
    return None
