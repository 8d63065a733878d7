"""The cluster client: the store protocol over gRPC to the storage nodes of a cluster.

Placement follows the ring of the cluster map (:mod:`chunkstore.cluster_map`): a chunk lives
on the owners of its id, a manifest on the owners of its id, and the version records and tags of
a repo on the owners of ``b"repo:" + name``, so one repo's history sits on the same nodes.

Replication rules, for every kind of record:

- A write goes to every owner, in parallel, and succeeds once ``write_quorum`` owners made it
  durable; otherwise it raises an error that names the failed nodes. Parts that did reach some
  owners stay there (unreferenced chunks and manifests are collected by GC).
- A chunk (or a manifest, in :meth:`has_manifests`) counts as stored when at least
  ``write_quorum`` of its owners hold it, so a push re-sends what is under-replicated and
  thereby repairs it. Unreachable owners count as lacking it in an existence check before a
  write (:meth:`missing`, :meth:`lacking`); the checks that decide whether something is gone
  (:meth:`mark_wanted`, :meth:`has_manifests`) raise instead when an unreachable owner
  leaves it below the quorum.
- A read goes to one owner and moves on to the next on any failure, NOT_FOUND included, and
  asks the next one too if the first has not answered within the grace period. Listings
  (versions, tags) ask every owner and merge what the reachable ones hold; they are complete
  once ``replicas - write_quorum + 1`` owners answered (those include one that acknowledged
  each write). A copy of a record (a version, a manifest) that does not hash to its id is
  damaged: readers take another owner's intact copy, and a push of the same file replaces a
  damaged manifest (nodes keep the intact bytes they are sent). A tag that owners disagree
  on (moved while one was down) takes the value most of them hold, ties going to the earlier
  owner on the ring. Removals are not remembered (no tombstones): an owner that was down
  during a removal brings the record back when it returns.
- Whole-store views (:meth:`scan`, :meth:`scan_manifests`, :meth:`totals`) need every node
  and raise StoreUnavailable naming the ones that did not answer: a partial view would let GC
  or ``stats`` act on a wrong picture. :meth:`list_repos` merges the nodes that answer,
  and needs all but ``replicas - 1`` of them (so that every repo has an owner among them).

Membership changes: the client asks a node for the cluster map again every ``map_refresh``
seconds (in the background) and at once when every owner of a record lacks it or a write
fails; a newer map replaces its own (writes go to the new owners, and a failed write is tried
once more under the new map). While nodes move data to the new owners, a read whose owners all
lack a record asks every other node of the map too.

Every call has a deadline and is retried with backoff (:mod:`.rpc`); a node that failed gets
one call at a time until it answers again. Once enough nodes answered, a slower one gets a
short grace period and then counts as failed (none, if it was failing already:
:mod:`.quorum`), and a read stream that stalls moves to other owners (:mod:`.fetch`): a dead
or hung node costs about a second, not a deadline per call.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TypeVar

import grpc

from chunkstore import codec, errors, ids
from chunkstore.allocator import keep_freed_memory
from chunkstore.batching import by_size
from chunkstore.cluster_map import ClusterMap, ClusterMapError, NodeSpec, map_from_proto, newer
from chunkstore.forks import OpenedIn
from chunkstore.stores.base import (
    CLAIMANT_BYTES,
    ChunkInfo,
    ChunkTotals,
    Store,
    check_claimant,
    check_released,
)
from chunkstore.v1 import store_pb2 as pb

from . import manifest_parts
from .fetch import Fetch
from .manifest_parts import ONE_MESSAGE_BYTES, send_manifest
from .push import put_chunks
from .quorum import Replies, call_each, first_answer, remove_all, write_all, write_many
from .rpc import (
    DEFAULT_POLICY,
    REFUSED,
    Credentials,
    NodeCallError,
    NodeClient,
    RpcPolicy,
    connect_hint,
    to_error,
)

T = TypeVar("T")
MiB = 1 << 20
#: Freed memory the client keeps for its next messages, and the size below which a block comes
#: from the heap (see :mod:`chunkstore.allocator`): above the 1-2 MiB of a message, small
#: enough that a push of a 4 GB file keeps its peak RSS under 300 MiB.
CLIENT_KEPT_BYTES = 4 * MiB
MAP_REFRESH = 2.0  # seconds between background checks for a newer cluster map
log = logging.getLogger(__name__)
SCHEME = "grpc://"
TLS_SCHEME = "grpcs://"
ID_BYTES_ON_WIRE = 34  # a 32-byte id in a repeated bytes field, for deadlines
_SCAN_LIMIT = 4096  # ChunkInfo per ScanChunks message
MARK_BATCH = 65536  # ids per MarkWanted call (~2 MiB)


def repo_key(repo: str) -> bytes:
    """The ring key of a repo's version records and tags (a hash, so repos spread evenly)."""
    return ids.record_id(b"repo:" + repo.encode())


def stage_key(stage_id: bytes) -> bytes:
    """The ring key of a stage and its files."""
    return ids.record_id(b"stage:" + stage_id)


def parse_url(url: str) -> list[str]:
    """The ``HOST:PORT`` addresses of ``grpc://HOST:PORT[,HOST:PORT...]`` (or ``grpcs://``,
    the same over TLS); InvalidInput if bad."""
    scheme = TLS_SCHEME if url.startswith(TLS_SCHEME) else SCHEME
    if not url.startswith(scheme):
        raise errors.InvalidInput(
            f"not a cluster URL: {url!r} (want grpc://HOST:PORT[,...] or grpcs://...)"
        )
    addresses = [a.strip() for a in url[len(scheme) :].rstrip("/").split(",")]
    for address in addresses:
        try:
            NodeSpec("seed", address)
        except ClusterMapError:
            raise errors.InvalidInput(
                f"invalid cluster URL {url!r}: bad address {address!r} (want HOST:PORT)"
            ) from None
    return addresses


def fetch_map(addresses: Sequence[str], policy: RpcPolicy) -> ClusterMap:
    """The cluster map served by the first of ``addresses`` that answers.

    Each address gets one attempt per round, ``policy.attempts`` rounds with backoff between
    them. Raises StoreUnavailable naming every address and why it failed.
    """
    failures: dict[str, NodeCallError] = {}
    for round_ in range(policy.attempts):
        if round_:
            time.sleep(policy.delay(round_))
        for address in addresses:
            try:
                return _map_from(_ask_map(address, policy), address)
            except NodeCallError as failure:
                if failure.code in REFUSED:  # a verdict on the caller: no point in retrying
                    raise to_error("cluster map", [failure]) from None
                failures[address] = failure
    reasons = "; ".join(f"{a}: {f.code.name.lower()}: {f.detail}" for a, f in failures.items())
    hint = connect_hint(policy.credentials, list(failures.values()))
    scheme = TLS_SCHEME if policy.credentials and policy.credentials.tls else SCHEME
    raise errors.StoreUnavailable(
        f"no node of {scheme}{','.join(addresses)} answers: {reasons}{hint}"
    )


def _ask_map(address: str, policy: RpcPolicy) -> pb.ClusterMap:
    node = NodeClient(NodeSpec("seed", address), replace(policy, attempts=1))
    try:
        return node.run(lambda: node.cluster.GetClusterMap(pb.Empty(), timeout=policy.timeout))
    finally:
        node.close()


def _map_from(reply: pb.ClusterMap, address: str) -> ClusterMap:
    try:
        return map_from_proto(reply)
    except ClusterMapError as e:
        raise errors.StoreUnavailable(f"{address} serves an invalid cluster map: {e}") from None


@dataclass
class _Claim:
    """A caller's claim of a stage (see :meth:`ClusterStore.claim_stage`): what it read, and
    how the owners answered its deletes."""

    stage_id: bytes
    claimant: bytes
    record: bytes
    files: dict[str, bytes]
    owners: int
    deleted: list[NodeClient] = field(default_factory=list)
    #: Owners whose delete failed with a retryable status, so far.
    unanswered: dict[NodeClient, NodeCallError] = field(default_factory=dict)
    #: NOT_FOUND (another caller has it there), or worse.
    refused: list[NodeCallError] = field(default_factory=list)


class ClusterStore(Store):
    """The store of a cluster: chunks and metadata on its nodes, replicated by the ring.

    Thread-safe. Channels to the nodes open on first use; :meth:`close` closes them and the
    thread pool. ``message_bytes`` bounds the blob bytes of one PutChunks message (a node
    verifies each message as it arrives and commits the messages waiting together, so small
    messages keep its pipeline full and the client's memory low; 1 MiB measured best);
    ``read_buffer`` the received batches (~1 MiB each) :meth:`read` holds for its caller,
    which bounds a read's memory (:meth:`read_into` holds none: the stream threads consume).
    ``map_refresh``: seconds between checks for a newer cluster map (see the module docstring).
    """

    remote = True

    def __init__(
        self,
        cluster: ClusterMap,
        location: str = "",
        policy: RpcPolicy = DEFAULT_POLICY,
        *,
        message_bytes: int = 1 * MiB,
        read_buffer: int = 16,
        map_refresh: float = MAP_REFRESH,
    ) -> None:
        self.cluster = cluster
        self.location = location or SCHEME + ",".join(n.address for n in cluster.nodes)
        self.policy = policy
        self.message_bytes = message_bytes
        self.read_buffer = read_buffer
        self.map_refresh = map_refresh
        keep_freed_memory(CLIENT_KEPT_BYTES, CLIENT_KEPT_BYTES)  # messages are ~1-2 MiB
        self._nodes = {n.id: NodeClient(n, policy) for n in cluster.nodes}
        self._retired: list[NodeClient] = []  # clients of nodes whose address changed
        self._map_lock = threading.Lock()
        self._map_checked = time.monotonic()
        self._refreshing = False
        self._executor = ThreadPoolExecutor(
            max(8, 4 * len(self._nodes)), thread_name_prefix="cluster-rpc"
        )
        self._opened_in = OpenedIn(f"the cluster store {self.location}", reopens=True)
        self._closed = False

    @classmethod
    def connect(cls, url: str, policy: RpcPolicy = DEFAULT_POLICY) -> ClusterStore:
        """Open the cluster named by ``grpc://HOST:PORT[,HOST:PORT...]``, or ``grpcs://...``
        to speak TLS to every node.

        The scheme decides TLS; the policy's credentials, if it has none those of the
        environment (:meth:`Credentials.from_env`), give the CA, client certificate and token.
        The map comes from the first listed address that answers; from then on the client
        talks to the nodes the map lists. Raises InvalidInput for a malformed URL,
        PermissionDenied if a node refuses the token, and StoreUnavailable if no listed
        address answers.
        """
        addresses = parse_url(url)
        tls = url.startswith(TLS_SCHEME)
        credentials = policy.credentials or Credentials.from_env(tls=tls)
        policy = replace(policy, credentials=replace(credentials, tls=tls))
        return cls(fetch_map(addresses, policy), url, policy)

    def close(self) -> None:
        """Close the channels and the thread pool; later calls raise StoreUnavailable."""
        self._closed = True
        with self._map_lock:
            self._map_checked = math.inf  # no more refreshes
        for node in [*self._nodes.values(), *self._retired]:
            node.close()
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def _pool(self) -> ThreadPoolExecutor:
        """The threads that call the nodes; a forked child has none of them (its copy of the
        pool would queue calls forever), so there this raises instead, as it does once the
        store is closed."""
        self._opened_in.check()
        if self._closed:
            raise errors.StoreUnavailable(f"the cluster store {self.location} is closed")
        return self._executor

    # the cluster map

    def _current(self) -> ClusterMap:
        """The map, with a check for a newer one started in the background when it is due."""
        self._opened_in.check()  # no refresh from a forked child, where every call fails
        if time.monotonic() - self._map_checked > self.map_refresh:
            with self._map_lock:
                due = not self._refreshing and time.monotonic() - self._map_checked > (
                    self.map_refresh
                )
                self._refreshing |= due
            if due:
                threading.Thread(
                    target=self._refresh_in_background, name="cluster-map", daemon=True
                ).start()
        return self.cluster

    def _refresh_in_background(self) -> None:
        try:
            self.refresh_map()
        except Exception:  # never let a refresh break the caller's operation
            log.exception("refreshing the cluster map failed")
        finally:
            self._refreshing = False

    def refresh_map(self, timeout: float = 2.0) -> bool:
        """Ask the nodes of the map for theirs (healthy ones first, until one answers with a
        map at least as new) and adopt a newer one; return whether the map changed."""
        changed = False
        nodes = sorted(self._map_nodes(), key=lambda n: not n.healthy)
        timeout = min(timeout, self.policy.timeout)
        for node in nodes:
            try:
                reply = node.cluster.GetClusterMap(pb.Empty(), timeout=timeout)
                theirs = map_from_proto(reply)
            except (grpc.RpcError, ClusterMapError, errors.StoreUnavailable):
                continue
            changed |= self._adopt(theirs)
            if theirs.epoch >= self.cluster.epoch:
                break
        with self._map_lock:
            if self._map_checked != math.inf:
                self._map_checked = time.monotonic()
        return changed

    def _adopt(self, cluster: ClusterMap) -> bool:
        """Use ``cluster`` from now on if it is newer than the current map."""
        with self._map_lock:
            if self._map_checked == math.inf or not newer(cluster, self.cluster):
                return False
            for spec in cluster.nodes:
                known = self._nodes.get(spec.id)
                if known is None or known.spec.address != spec.address:
                    if known is not None:
                        self._retired.append(known)
                    self._nodes[spec.id] = NodeClient(spec, self.policy)
            old, self.cluster = self.cluster, cluster
        log.info("cluster map epoch %d -> %d", old.epoch, cluster.epoch)
        return True

    def _map_nodes(self) -> list[NodeClient]:
        """The clients of the nodes in the current map."""
        return [self._nodes[n.id] for n in self.cluster.nodes]

    def _under_newest_map(self, operation: Callable[[], T]) -> T:
        """``operation()``; if it fails for want of nodes and a newer map is found, once more
        under that map."""
        try:
            return operation()
        except errors.StoreUnavailable:
            if not self.refresh_map():
                raise
        return operation()

    def _read_anywhere(self, key: bytes, call: Callable[[NodeClient], T], what: str) -> T:
        """``call`` on the owners of ``key`` until one answers; if every owner lacks the
        record, once more under the newest map, on its owners and then every other node."""
        owners = self._owners(key)
        try:
            return first_answer(self._pool, owners, call, what, self.policy.straggler_grace)
        except errors.NotFound as absent:
            self.refresh_map()
            now = self._owners(key)
            rest = [n for n in now if n not in owners]
            rest += [n for n in self._map_nodes() if n not in owners and n not in rest]
            if not rest:
                raise
            try:
                return first_answer(self._pool, rest, call, what, self.policy.straggler_grace)
            except errors.ChunkstoreError:
                raise absent from None

    # placement

    @property
    def _quorum(self) -> int:
        return self.cluster.write_quorum

    def _owners(self, key: bytes) -> list[NodeClient]:
        cluster = self._current()
        return [self._nodes[n.id] for n in cluster.owners(key)]

    def _owners_many(self, keys: Sequence[bytes]) -> list[tuple[NodeClient, ...]]:
        cluster = self._current()
        rows = cluster.ring().owners_many(keys, cluster.replicas)
        nodes = self._nodes
        clients = {row: tuple(nodes[node_id] for node_id in row) for row in set(rows)}
        return [clients[row] for row in rows]

    def _by_owner(self, keys: Sequence[bytes]) -> dict[NodeClient, list[bytes]]:
        """Every owner of each key, with the keys it owns."""
        groups: dict[NodeClient, list[bytes]] = {}
        for key, owners in zip(keys, self._owners_many(keys), strict=True):
            for node in owners:
                groups.setdefault(node, []).append(key)
        return groups

    def check_may_collect(self) -> None:
        """Ask every node for an admin-only call that changes nothing (deleting no
        manifests): PermissionDenied if a node refuses the token, StoreUnavailable naming the
        nodes that do not answer (GC needs every node anyway)."""
        request = pb.ChunkIds(ids=[])
        replies = call_each(
            self._pool,
            {
                n: partial(n.meta.DeleteManifests, request, timeout=self.policy.timeout)
                for n in self._map_nodes()
            },
        )
        if replies.failed:
            refused = any(f.code in REFUSED for f in replies.failed)
            raise to_error(
                "gc needs an admin token" if refused else "gc needs every node", replies.failed
            )

    def _every_node(self, call: Callable[[NodeClient], T], what: str) -> dict[str, T]:
        """``call`` on every node; raise naming the nodes that failed, if any did."""
        replies = call_each(self._pool, {n: partial(call, n) for n in self._map_nodes()})
        if replies.failed:
            raise to_error(f"{what} needs every node", replies.failed)
        return replies.ok

    def _reported(
        self, rpc: Callable[[NodeClient], Callable[..., pb.ChunkIds]]
    ) -> Callable[[NodeClient, list[bytes]], set[bytes]]:
        """An ``ask`` for :meth:`_held`: the keys a node lists in its reply to ``rpc(node)``,
        called with the keys and a deadline for their size."""

        def ask(node: NodeClient, keys: list[bytes]) -> set[bytes]:
            deadline = self.policy.deadline(ID_BYTES_ON_WIRE * len(keys))
            return set(rpc(node)(pb.ChunkIds(ids=keys), timeout=deadline).ids)

        return ask

    def _held(
        self,
        keys: Sequence[bytes],
        ask: Callable[[NodeClient, list[bytes]], set[bytes]],
        strict: str | None = None,
    ) -> set[bytes]:
        """The keys that at least ``write_quorum`` of their owners hold.

        ``ask(node, keys)`` returns the ones ``node`` holds; a node that fails holds none,
        unless it refused the request as invalid, which raises InvalidInput, or refused the
        caller, which raises PermissionDenied. With ``strict`` (what the call does), a key
        short of the quorum while some node failed raises instead, naming the failed nodes.
        """
        groups = self._by_owner(keys)
        replies = call_each(
            self._pool,
            {n: partial(ask, n, ks) for n, ks in groups.items()},
            partial(self._covered, keys, groups),
        )
        refused = [
            f
            for f in replies.failed
            if f.code == grpc.StatusCode.INVALID_ARGUMENT or f.code in REFUSED
        ]
        if refused:
            raise to_error(strict or "existence check", refused)
        holders: Counter[bytes] = Counter()
        for held in replies.ok.values():
            holders.update(held)
        held = {key for key in keys if holders[key] >= self._quorum}
        if strict and replies.failed and len(held) < len(keys):
            raise to_error(f"{strict}: write quorum {self._quorum} not reached", replies.failed)
        return held

    def _covered(
        self, keys: Sequence[bytes], groups: dict[NodeClient, list[bytes]], replies: Replies
    ) -> bool:
        """Whether at least ``write_quorum`` owners of every key have answered."""
        answered: Counter[bytes] = Counter()
        for node, group in groups.items():
            if node.id in replies.ok:
                answered.update(group)
        return all(answered[key] >= self._quorum for key in keys)

    # chunks

    def missing(self, ids: Sequence[bytes]) -> set[bytes]:
        """The ids that fewer than ``write_quorum`` of their owners hold (so a push re-sends
        under-replicated chunks); the owners that hold one mark it wanted now."""
        distinct = list(dict.fromkeys(ids))
        if not distinct:
            return set()

        def ask(node: NodeClient, keys: list[bytes]) -> set[bytes]:
            reply = node.chunks.Missing(
                pb.ChunkIds(ids=keys), timeout=self.policy.deadline(ID_BYTES_ON_WIRE * len(keys))
            )
            return set(keys).difference(reply.ids)

        return set(distinct) - self._held(distinct, ask)

    def lacking(self, ids: Sequence[bytes]) -> set[bytes]:
        """As :meth:`missing`, by lookups only (``Holds``): the owners mark nothing, so a check
        costs them no synced transaction; :meth:`mark_wanted` marks what a push found."""
        distinct = list(dict.fromkeys(ids))
        if not distinct:
            return set()
        return set(distinct) - self._held(distinct, self._reported(lambda n: n.chunks.Holds))

    def mark_wanted(self, ids: Sequence[bytes]) -> set[bytes]:
        """Mark the chunks wanted on every owner (one ``MarkWanted`` call per node and
        ``MARK_BATCH`` ids); return those that fewer than ``write_quorum`` owners still hold.

        Raises StoreUnavailable naming the failed nodes if a node that did not answer leaves
        some chunk below the quorum: that chunk is not known to be gone.
        """
        distinct = list(dict.fromkeys(ids))
        if not distinct:
            return set()

        def mark(node: NodeClient, keys: list[bytes]) -> set[bytes]:
            gone: set[bytes] = set()
            for start in range(0, len(keys), MARK_BATCH):
                part = keys[start : start + MARK_BATCH]
                reply = node.chunks.MarkWanted(
                    pb.ChunkIds(ids=part),
                    timeout=self.policy.deadline(ID_BYTES_ON_WIRE * len(part)),
                )
                gone.update(reply.ids)
            return set(keys) - gone

        return set(distinct) - self._held(distinct, mark, "mark chunks wanted")

    def put(self, chunks: Sequence[tuple[bytes, bytes]]) -> int:
        """Store each chunk on all its owners; succeed once ``write_quorum`` of them have it.

        Returns the blob bytes newly added as the chunks' primary owners report them (the
        unique bytes this batch added; an undercount only if a primary failed). Raises
        StoreUnavailable (or StoreFull, when a full node keeps the quorum from being met)
        naming the failed nodes. Not all or nothing across nodes: chunks that reached some
        owners before a failure stay there.
        """
        if not chunks:
            return 0
        pairs = [(cid, blob if isinstance(blob, bytes) else bytes(blob)) for cid, blob in chunks]

        def put() -> int:
            owners = self._owners_many([cid for cid, _ in pairs])
            return put_chunks(self._pool, pairs, owners, self._quorum, self.message_bytes)

        return self._under_newest_map(put)

    def get(self, ids: Sequence[bytes]) -> Iterator[tuple[bytes, bytes]]:
        """Blobs from all nodes at once, each id from one owner, failing over to the others."""
        return iter(self._fetch(ids, verify=False, workers=1))

    def read(self, ids: Sequence[bytes], workers: int = 2) -> Iterator[tuple[bytes, bytes]]:
        """Verified raw bytes, fetched like :meth:`get`; decoding and hashing run on the
        threads that receive the streams (at least ``workers`` of them). A chunk whose bytes
        do not match its id on one owner is read from the next."""
        return iter(self._fetch(ids, verify=True, workers=workers))

    def read_into(
        self,
        ids: Sequence[bytes],
        consume: Callable[[bytes, codec.RawBuffer], None],
        workers: int = 2,
    ) -> None:
        """As :meth:`read`, calling ``consume(id, raw bytes)`` on the threads that receive the
        streams (several at once: ``consume`` must be thread-safe), so nothing funnels through
        the caller's thread. The raw bytes are bytes-like and valid only during the call, as
        in :meth:`ChunkStore.read_into`. An exception ``consume`` raises ends the read and is
        raised here.
        """
        self._fetch(ids, verify=True, workers=workers, deliver=consume).run()

    def _fetch(
        self,
        ids: Sequence[bytes],
        *,
        verify: bool,
        workers: int,
        deliver: Callable[[bytes, codec.RawBuffer], None] | None = None,
    ) -> Fetch:
        involved = min(len(self._nodes), max(1, len(ids)))
        return Fetch(
            ids,
            self._owners_many,
            policy=self.policy,
            verify=verify,
            streams_per_node=math.ceil(workers / involved),
            queue_batches=self.read_buffer,
            fallback=self._fallback_nodes,
            deliver=deliver,
        )

    def _fallback_nodes(self) -> list[NodeClient]:
        """Every node of the newest map: where a read goes when a chunk's owners lack it."""
        self.refresh_map()
        return self._map_nodes()

    def delete(self, ids: Iterable[bytes], unwanted_since: float | None = None) -> int:
        """Remove the chunks from every owner; return how many the primaries removed.

        Raises, naming the nodes, if some chunk could not be removed from ``write_quorum`` of
        its owners (what was removed stays removed). Each node checks ``unwanted_since`` and
        removes in one transaction.
        """

        def remove(node: NodeClient, keys: list[bytes]) -> int:
            reply = node.chunks.DeleteChunks(
                pb.DeleteChunksRequest(ids=keys, unwanted_since=unwanted_since),
                timeout=self.policy.deadline(ID_BYTES_ON_WIRE * len(keys)),
            )
            return reply.deleted

        return self._delete(list(dict.fromkeys(ids)), remove, "delete chunks")

    def _delete(
        self, keys: list[bytes], remove: Callable[[NodeClient, list[bytes]], int], what: str
    ) -> int:
        """Run ``remove`` on every owner of the keys: one call for the keys a node is primary
        for, one for the rest. Returns the primaries' count."""
        if not keys:
            return 0
        runs: dict[NodeClient, tuple[list[bytes], list[bytes]]] = {}
        for key, owners in zip(keys, self._owners_many(keys), strict=True):
            for rank, node in enumerate(owners):
                runs.setdefault(node, ([], []))[rank > 0].append(key)
        calls = {node: _removal(remove, node, *run) for node, run in runs.items()}
        groups = {node: primary + others for node, (primary, others) in runs.items()}
        replies = call_each(self._pool, calls, partial(self._covered, keys, groups))
        if not self._covered(keys, groups, replies):
            raise to_error(f"{what}: write quorum {self._quorum} not reached", replies.failed)
        return sum(replies.ok.values())

    def scan(self) -> Iterator[ChunkInfo]:
        """Every chunk once, merged from every node in id order (largest wanted_at wins).

        Raises StoreUnavailable if a node cannot be read to the end.
        """
        streams = [self._scan_node(node) for node in self._map_nodes()]
        merged = heapq.merge(*streams, key=lambda info: info.id)
        for cid, group in itertools.groupby(merged, key=lambda info: info.id):
            infos = list(group)
            yield ChunkInfo(
                cid,
                max(i.stored_size for i in infos),
                max(i.wanted_at for i in infos),
            )

    def _scan_node(self, node: NodeClient) -> Iterator[ChunkInfo]:
        """``node``'s chunks in id order; a broken stream resumes after the last id received."""
        after = b""
        failures = 0
        while True:
            request = pb.ScanChunksRequest(after=after, limit=_SCAN_LIMIT)
            try:
                for batch in node.chunks.ScanChunks(
                    request, timeout=self.policy.deadline(stream=True)
                ):
                    for c in batch.chunks:
                        yield ChunkInfo(c.id, c.stored_size, c.wanted_at)
                        after = c.id
                    failures = 0
                node.record(None)
                return
            except grpc.RpcError as exc:
                failure = NodeCallError.from_rpc(node.spec, exc)
                failures += 1
                if not failure.retryable or failures >= node.attempts():
                    node.record(failure)
                    raise to_error("scan chunks needs every node", [failure]) from None
                time.sleep(self.policy.delay(failures))

    def totals(self) -> ChunkTotals:
        """Chunks and blob bytes of the cluster, estimated as the sum over all nodes divided by
        ``replicas``: exact when every chunk has all its replicas. Needs every node."""
        replies = self._every_node(
            lambda n: n.chunks.Totals(pb.Empty(), timeout=self.policy.timeout), "totals"
        )
        r = self.cluster.replicas
        return ChunkTotals(
            sum(t.chunks for t in replies.values()) // r,
            sum(t.stored_bytes for t in replies.values()) // r,
        )

    # manifests

    def put_manifest(self, manifest_id: bytes, data: bytes) -> None:
        """One message for most manifests; in pieces past ``ONE_MESSAGE_BYTES`` (see
        :mod:`.manifest_parts`)."""
        self._under_newest_map(
            lambda: write_all(
                self._pool,
                self._owners(manifest_id),
                lambda n: send_manifest(n, manifest_id, data, self.policy.deadline(len(data))),
                self._quorum,
                f"store manifest {manifest_id.hex()}",
            )
        )

    def put_manifests(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        """Each node gets the manifests it owns in a few PutManifests messages (up to
        ``ONE_MESSAGE_BYTES`` each), all nodes at once: a push of many small files costs a
        call per node, not one per file and owner (a node without that call, of an earlier
        release, gets them one by one). A manifest too large to share a message goes on its
        own (:meth:`put_manifest`)."""
        data_of = dict(records)
        large = [mid for mid, data in data_of.items() if len(data) > ONE_MESSAGE_BYTES]
        for manifest_id in large:
            self.put_manifest(manifest_id, data_of.pop(manifest_id))
        if data_of:
            self._under_newest_map(partial(self._put_small_manifests, data_of))

    def _put_small_manifests(self, data_of: dict[bytes, bytes]) -> None:
        def send(node: NodeClient, manifest_ids: list[bytes]) -> None:
            for batch in by_size(manifest_ids, lambda mid: len(data_of[mid]), ONE_MESSAGE_BYTES):
                message = pb.ManifestRecords(
                    records=[pb.ManifestRecord(id=mid, data=data_of[mid]) for mid in batch]
                )
                size = sum(len(data_of[mid]) for mid in batch)
                try:
                    node.meta.PutManifests(message, timeout=self.policy.deadline(size))
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    for mid in batch:  # a node of an earlier release: one at a time
                        timeout = self.policy.deadline(len(data_of[mid]))
                        send_manifest(node, mid, data_of[mid], timeout)

        owners = dict(zip(data_of, self._owners_many(list(data_of)), strict=True))
        write_many(
            self._pool, owners, send, self._quorum, lambda mid: f"store manifest {mid.hex()}"
        )

    def _read_intact(
        self, key: bytes, record_id: bytes, call: Callable[[NodeClient], bytes], what: str
    ) -> bytes:
        """:meth:`_read_anywhere` of a record that must hash to ``record_id``: an owner whose
        copy is damaged counts as failed, and the next owner is asked. A damaged copy is
        returned only when no owner gave an intact one, for its reader to report."""
        damaged: list[bytes] = []

        def intact(node: NodeClient) -> bytes:
            data = call(node)
            if not _intact(record_id, data):
                damaged.append(data)
                raise NodeCallError(node.spec, grpc.StatusCode.DATA_LOSS, "its copy is damaged")
            return data

        try:
            return self._read_anywhere(key, intact, what)
        except errors.ChunkstoreError:
            if damaged:
                return damaged[0]
            raise

    def get_manifest(self, manifest_id: bytes) -> bytes:
        """Read in pieces, whatever its size: a large one fits no single message. An owner's
        damaged copy is passed over for another owner's (see :meth:`_read_intact`)."""
        request = pb.ChunkIds(ids=[manifest_id])
        return self._read_intact(
            manifest_id,
            manifest_id,
            lambda n: manifest_parts.joined(
                n.meta.GetManifestParts(request, timeout=self.policy.deadline(stream=True))
            )[1],
            f"read manifest {manifest_id.hex()}",
        )

    def get_manifests(self, manifest_ids: Sequence[bytes]) -> list[bytes]:
        """One GetManifests call per node, all nodes at once, each id asked of one of its
        owners (a healthy one first); what a node left out (absent there, past its reply's
        size, or the node failed) is read as :meth:`get_manifest` reads it, failing over."""
        distinct = list(dict.fromkeys(manifest_ids))
        if not distinct:
            return []
        asked: dict[NodeClient, list[bytes]] = {}
        for mid, owners in zip(distinct, self._owners_many(distinct), strict=True):
            node = min(owners, key=lambda n: not n.healthy)  # the first healthy owner
            asked.setdefault(node, []).append(mid)

        def ask(node: NodeClient, mids: list[bytes]) -> list[pb.ManifestRecord]:
            reply = node.meta.GetManifests(
                pb.ChunkIds(ids=mids), timeout=self.policy.deadline(ONE_MESSAGE_BYTES)
            )
            return list(reply.records)

        # Once one node answered, the others get the grace period: a hung node's share is read
        # from other owners then, not after its deadline.
        replies = call_each(
            self._pool, {n: partial(ask, n, m) for n, m in asked.items()}, lambda r: bool(r.ok)
        )
        found = {
            record.id: record.data
            for records in replies.ok.values()
            for record in records
            if record.id in distinct and _intact(record.id, record.data)
        }  # a damaged copy is read again, from another owner if one has it intact
        return [found[mid] if mid in found else self.get_manifest(mid) for mid in manifest_ids]

    def has_manifests(self, manifest_ids: Sequence[bytes]) -> set[bytes]:
        """The manifests that at least ``write_quorum`` of their owners hold.

        Raises StoreUnavailable naming the failed nodes if a node that did not answer leaves
        some manifest below the quorum: that manifest is not known to be gone.
        """
        distinct = list(dict.fromkeys(manifest_ids))
        if not distinct:
            return set()
        return self._held(
            distinct, self._reported(lambda n: n.meta.HasManifests), "check manifests"
        )

    def scan_manifests(self) -> Iterator[tuple[bytes, float]]:
        """``(id, stored_at)`` of every manifest once, the latest stored_at of its copies.

        Needs every node."""
        replies = self._every_node(self._manifest_infos, "scan manifests")
        latest: dict[bytes, float] = {}
        for infos in replies.values():
            for mid, stored_at in infos:
                latest[mid] = max(stored_at, latest.get(mid, stored_at))
        yield from latest.items()

    def _manifest_infos(self, node: NodeClient) -> list[tuple[bytes, float]]:
        stream = node.meta.ScanManifests(pb.Empty(), timeout=self.policy.deadline(stream=True))
        return [(m.id, m.stored_at) for batch in stream for m in batch.manifests]

    def delete_manifests(self, manifest_ids: Iterable[bytes]) -> int:
        def remove(node: NodeClient, keys: list[bytes]) -> int:
            reply = node.meta.DeleteManifests(
                pb.ChunkIds(ids=keys), timeout=self.policy.deadline(ID_BYTES_ON_WIRE * len(keys))
            )
            return reply.deleted

        return self._delete(list(dict.fromkeys(manifest_ids)), remove, "delete manifests")

    # versions and tags

    def put_version(self, repo: str, version_id: bytes, data: bytes) -> None:
        record = pb.VersionRecord(repo=repo, id=version_id, data=data)
        self._under_newest_map(
            lambda: write_all(
                self._pool,
                self._owners(repo_key(repo)),
                lambda n: n.meta.PutVersion(record, timeout=self.policy.deadline(len(data))),
                self._quorum,
                f"store version {version_id.hex()} of {repo!r}",
            )
        )

    def get_version(self, repo: str, version_id: bytes) -> bytes:
        """An owner's damaged copy is passed over for another's (see :meth:`_read_intact`)."""
        key = pb.VersionKey(repo=repo, id=version_id)
        return self._read_intact(
            repo_key(repo),
            version_id,
            lambda n: n.meta.GetVersion(key, timeout=self.policy.timeout).data,
            f"read version {version_id.hex()} of {repo!r}",
        )

    def list_versions(self, repo: str) -> list[tuple[bytes, bytes]]:
        """Every version any reachable owner of the repo holds; of a record some owner holds
        damaged (not hashing to its id), an intact copy if another owner has one."""
        request = pb.RepoName(repo=repo)
        replies = self._ask_owners(
            repo,
            lambda n: n.meta.ListVersions(request, timeout=self.policy.deadline(stream=True)),
            "list versions",
        )
        merged: dict[bytes, bytes] = {}
        for reply in replies:
            for v in reply.versions:
                held = merged.get(v.id)
                if held is None or (not _intact(v.id, held) and _intact(v.id, v.data)):
                    merged[v.id] = v.data  # an intact copy wins over a damaged one
        return list(merged.items())

    def delete_version(self, repo: str, version_id: bytes) -> None:
        key = pb.VersionKey(repo=repo, id=version_id)
        remove_all(
            self._pool,
            self._owners(repo_key(repo)),
            lambda n: n.meta.DeleteVersion(key, timeout=self.policy.timeout),
            self._quorum,
            f"delete version {version_id.hex()} of {repo!r}",
        )

    def list_repos(self) -> list[str]:
        """Repos the reachable nodes hold versions of. Raises (StoreUnavailable, naming the
        nodes that did not answer) unless all but ``replicas - 1`` nodes answered: fewer might
        miss every owner of a repo, and an incomplete list would pass for the whole."""
        # Once all but replicas - 1 nodes answered, every repo has an owner among them.
        nodes = self._map_nodes()
        enough = len(nodes) - self.cluster.replicas + 1
        replies = call_each(
            self._pool,
            {n: partial(self._repo_names, n) for n in nodes},
            lambda r: len(r.ok) >= enough,
        )
        if len(replies.ok) < enough:
            raise to_error(
                f"list repos: {len(replies.ok)} of {len(nodes)} nodes answered, {enough} needed "
                "to see every repo",
                replies.failed,
            )
        return sorted({name for reply in replies.ok.values() for name in reply.repos})

    def _repo_names(self, node: NodeClient) -> pb.RepoNames:
        return node.meta.ListRepos(pb.Empty(), timeout=self.policy.deadline(stream=True))

    def set_tag(self, repo: str, tag: str, version_id: bytes) -> None:
        request = pb.Tag(repo=repo, tag=tag, version_id=version_id)
        self._under_newest_map(
            lambda: write_all(
                self._pool,
                self._owners(repo_key(repo)),
                lambda n: n.meta.SetTag(request, timeout=self.policy.timeout),
                self._quorum,
                f"set tag {repo}@{tag}",
            )
        )

    def delete_tag(self, repo: str, tag: str) -> None:
        request = pb.Tag(repo=repo, tag=tag)
        remove_all(
            self._pool,
            self._owners(repo_key(repo)),
            lambda n: n.meta.DeleteTag(request, timeout=self.policy.timeout),
            self._quorum,
            f"delete tag {repo}@{tag}",
        )

    def tags(self, repo: str) -> dict[str, bytes]:
        """Tags from every reachable owner; where they disagree, the value most hold."""
        request = pb.RepoName(repo=repo)
        replies = self._ask_owners(
            repo, lambda n: n.meta.ListTags(request, timeout=self.policy.timeout), "list tags"
        )
        votes: dict[str, Counter[bytes]] = {}
        for reply in replies:  # in ring order: Counter keeps first-seen order for ties
            for t in reply.tags:
                votes.setdefault(t.tag, Counter())[t.version_id] += 1
        return {tag: counts.most_common(1)[0][0] for tag, counts in votes.items()}

    def _ask_owners(self, repo: str, call: Callable[[NodeClient], T], what: str) -> list[T]:
        """``call`` on every owner of ``repo``'s records: the answers in ring order. Once
        ``replicas - write_quorum + 1`` owners answered (enough to see every acknowledged
        write), the others get the grace period of :func:`call_each`.

        Raises if no owner answers."""
        return self._ask_key_owners(repo_key(repo), call, f"{what} of {repo!r}")

    def _ask_key_owners(self, key: bytes, call: Callable[[NodeClient], T], what: str) -> list[T]:
        owners = self._owners(key)
        # Any replicas - write_quorum + 1 owners include one that acknowledged each write.
        enough = max(1, len(owners) - self._quorum + 1)
        replies = call_each(
            self._pool, {n: partial(call, n) for n in owners}, lambda r: len(r.ok) >= enough
        )
        if not replies.ok:
            raise to_error(what, replies.failed)
        return [replies.ok[n.id] for n in owners if n.id in replies.ok]

    # stages: placed by their id, replicated like versions

    def put_stage(self, stage_id: bytes, data: bytes, released: Collection[bytes] = ()) -> None:
        check_released(released)
        record = pb.StageRecord(id=stage_id, data=data, released=released)
        write_all(
            self._pool,
            self._owners(stage_key(stage_id)),
            lambda n: n.meta.PutStage(record, timeout=self.policy.deadline(len(data))),
            self._quorum,
            f"store stage {stage_id.hex()}",
        )

    def get_stage(self, stage_id: bytes) -> bytes:
        key = pb.StageKey(id=stage_id)
        return self._read_anywhere(
            stage_key(stage_id),
            lambda n: n.meta.GetStage(key, timeout=self.policy.timeout),
            f"read stage {stage_id.hex()}",
        ).data

    def put_stage_file(self, stage_id: bytes, path: str, data: bytes) -> None:
        record = pb.StageFile(stage_id=stage_id, path=path, data=data)
        write_all(
            self._pool,
            self._owners(stage_key(stage_id)),
            lambda n: n.meta.PutStageFile(record, timeout=self.policy.deadline(len(data))),
            self._quorum,
            f"add {path!r} to stage {stage_id.hex()}",
        )

    def stage_files(self, stage_id: bytes) -> dict[str, bytes]:
        """The files any reachable owner of the stage recorded."""
        key = pb.StageKey(id=stage_id)
        replies = self._ask_key_owners(
            stage_key(stage_id),
            lambda n: n.meta.ListStageFiles(key, timeout=self.policy.deadline(stream=True)),
            f"list files of stage {stage_id.hex()}",
        )
        files: dict[str, bytes] = {}
        for reply in replies:
            for f in reply.files:
                files.setdefault(f.path, f.data)
        return files

    def delete_stage(self, stage_id: bytes, claimant: bytes | None = None) -> None:
        """Delete it from every owner, each remembering ``claimant``."""
        check_claimant(claimant)
        request = pb.DeleteStageRequest(id=stage_id, claimant=claimant)
        remove_all(
            self._pool,
            self._owners(stage_key(stage_id)),
            lambda n: n.meta.DeleteStage(request, timeout=self.policy.timeout),
            self._quorum,
            f"delete stage {stage_id.hex()}",
        )

    def claim_stage(
        self, stage_id: bytes, claimant: bytes | None = None
    ) -> tuple[bytes, dict[str, bytes]]:
        """Read the stage and its files, then delete it from the owners holding it, one at a
        time in ring order. A node deletes a record once, so the caller whose deletes succeed
        on a majority of the owners claimed it, and two callers cannot both; one that finds it
        already deleted on a node that holds it stops there (so with every owner up, the one
        who deletes it first on the first owner wins). A file added between the read and the
        deletes is not in the claim.

        Every delete of this claim carries one claimant token (``claimant``, or one made for
        it): a node that deleted the stage but whose answer was lost (a dropped connection, a
        deadline) answers the retry of that delete OK, as it remembers who deleted it, where
        another caller gets NOT_FOUND. So a lost answer does not make this caller lose a claim
        it won (except on a node of an earlier release, which ignores the token). An owner
        whose delete still failed with a retryable status after its tries is asked again,
        after the others, for ``policy.attempts`` more rounds with backoff, while the claim is
        short of a majority and no owner said another caller has it.

        A caller short of a majority puts the stage back (:meth:`restore_stage`: its record
        and the files read) on the owners it deleted it from, or may have (those that did not
        answer), so that a commit can claim it later; with owners down, two racing callers
        may split the owners and both fail, and the stage is then back, not lost. A node puts
        it back only for the claimant that made its last delete there, and refuses any other
        PutStage of it while it remembers that delete, so nothing is committed twice: a
        winner's deletes hold a majority of the owners, and each of those nodes re-creates the
        stage for nobody but the winner (a put-back of a loser lands only where the loser's
        delete was the last, which no winner's delete followed). The error then says how
        many owners gave it to this caller, names the owners that did not answer, and where it
        was put back or could not be: NotFound if an owner answered that another caller
        deleted it, else (owners unreachable) StoreUnavailable, and the stage can be claimed
        once they are back. An owner that deleted it for this caller but could not be reached
        to put it back keeps it deleted; the claim is then released on the other owners
        (:meth:`release_claim`), whose repair copies the stage back there once it is back.

        When the read finds the stage on no more than half of the owners, nothing is
        deleted: NotFound if every other owner answered that it lacks it (another claimed
        it), else StoreUnavailable naming the owners that did not answer."""
        check_claimant(claimant)
        owners = self._owners(stage_key(stage_id))
        key = pb.StageKey(id=stage_id)
        records = call_each(
            self._pool,
            {
                n: partial(lambda n: n.meta.GetStage(key, timeout=self.policy.timeout), n)
                for n in owners
            },
        )
        if len(records.ok) <= len(owners) // 2:
            raise to_error(
                f"claim stage {stage_id.hex()}: {len(records.ok)} of its {len(owners)} owners "
                "hold it, a majority is needed",
                records.failed,
            )
        claim = _Claim(
            stage_id,
            claimant or secrets.token_bytes(CLAIMANT_BYTES),
            next(iter(records.ok.values())).data,
            self.stage_files(stage_id),
            len(owners),
        )
        majority = len(owners) // 2 + 1
        free = self._delete_for(claim, [n for n in owners if n.id in records.ok])
        for retry in range(self.policy.attempts + 1, 2 * self.policy.attempts + 1):
            if not (free and claim.unanswered and len(claim.deleted) < majority):
                break
            time.sleep(self.policy.delay(retry))  # on from the backoff of node.run's own tries
            free = self._delete_for(claim, list(claim.unanswered))
        if len(claim.deleted) >= majority:
            return claim.record, claim.files
        raise self._claim_failed(claim)

    def _delete_for(self, claim: _Claim, nodes: list[NodeClient]) -> bool:
        """Delete the claimed stage from ``nodes`` in turn, noting each answer in ``claim``;
        False at the first node that says another caller has it."""
        delete = pb.DeleteStageRequest(id=claim.stage_id, claimant=claim.claimant)
        for node in nodes:
            try:
                node.run(lambda n=node: n.meta.DeleteStage(delete, timeout=self.policy.timeout))
            except NodeCallError as failure:
                if failure.retryable:
                    claim.unanswered[node] = failure
                    continue
                claim.unanswered.pop(node, None)
                claim.refused.append(failure)
                if failure.code == grpc.StatusCode.NOT_FOUND:
                    return False
                continue
            claim.unanswered.pop(node, None)
            claim.deleted.append(node)
        return True

    def _claim_failed(self, claim: _Claim) -> errors.ChunkstoreError:
        """Put the stage back where this claim deleted it, or may have; the error that says
        so (see :meth:`claim_stage`)."""
        what = (
            f"claim stage {claim.stage_id.hex()}: {len(claim.deleted)} of its {claim.owners} "
            "owners gave it to this caller, a majority is needed"
        )
        targets = [*claim.deleted, *claim.unanswered]
        if targets:
            back = self._put_back(
                claim.stage_id, claim.claimant, claim.record, claim.files, targets
            )
            kept = [n.id for n in targets if n.id not in back.ok]
            what += f"; put back on {len(back.ok)} of the {len(targets)} owners it deleted it from"
            what += " or that did not answer" if claim.unanswered else ""
            what += f" (not on {', '.join(kept)})" if kept else ""
            if kept:
                what += self._release(claim.stage_id, claim.claimant, claim.record)
        failures = [*claim.refused, *claim.unanswered.values()]
        taken = [f for f in claim.refused if f.code == grpc.StatusCode.NOT_FOUND]
        if taken:
            more = "".join(f"; {f}" for f in failures if f not in taken)
            return errors.NotFound(
                f"{what}; node {taken[0].node.id} says another caller claimed it first{more}"
            )
        return to_error(what, failures)

    def _put_back(
        self,
        stage_id: bytes,
        claimant: bytes,
        record: bytes,
        files: Mapping[str, bytes],
        nodes: Sequence[NodeClient],
    ) -> Replies[object]:
        """RestoreStage on each of ``nodes``, in parallel."""
        request = pb.RestoreStageRequest(
            id=stage_id,
            claimant=claimant,
            data=record,
            files=[pb.StageFile(stage_id=stage_id, path=p, data=d) for p, d in files.items()],
        )
        timeout = self.policy.deadline(request.ByteSize())
        return call_each(
            self._pool,
            {n: partial(lambda n: n.meta.RestoreStage(request, timeout=timeout), n) for n in nodes},
        )

    def restore_stage(
        self, stage_id: bytes, claimant: bytes, record: bytes, files: Mapping[str, bytes]
    ) -> None:
        """Put the stage back on every owner (see :meth:`MetaStore.restore_stage`); raises
        unless a write quorum of them hold it then. If some owner could not take it back, the
        claim is released (:meth:`release_claim`) on the others."""
        check_claimant(claimant)
        owners = self._owners(stage_key(stage_id))
        replies = self._put_back(stage_id, claimant, record, files, owners)
        released = self._release(stage_id, claimant, record) if replies.failed else ""
        if len(replies.ok) < self._quorum:
            raise to_error(
                f"put back stage {stage_id.hex()}: {len(replies.ok)} of its {len(owners)} "
                f"owners hold it, write quorum is {self._quorum}{released}",
                replies.failed,
            )

    def release_claim(self, stage_id: bytes, claimant: bytes, record: bytes) -> None:
        """Release it on every owner of the stage; raises unless one of them noted it."""
        check_claimant(claimant)
        replies = self._releases(stage_id, claimant, record)
        if not replies.ok:
            raise to_error(f"release claim of stage {stage_id.hex()}", replies.failed)

    def _releases(self, stage_id: bytes, claimant: bytes, record: bytes) -> Replies[object]:
        """ReleaseStage on every owner, in parallel."""
        request = pb.ReleaseStageRequest(id=stage_id, claimant=claimant, data=record)
        return call_each(
            self._pool,
            {
                n: partial(lambda n: n.meta.ReleaseStage(request, timeout=self.policy.timeout), n)
                for n in self._owners(stage_key(stage_id))
            },
        )

    def _release(self, stage_id: bytes, claimant: bytes, record: bytes) -> str:
        """Release a claim that could not be put back on every owner it deleted the stage
        from: their notes of its delete would refuse every other copy of the stage, so that it
        could not be committed before it expires. What was done, for an error message."""
        replies = self._releases(stage_id, claimant, record)
        return (
            f"; claim released on {len(replies.ok)} of its {len(replies.ok) + len(replies.failed)}"
            " owners (their repair copies the stage back to the others once they are back)"
        )

    def list_stages(self) -> list[tuple[bytes, bytes]]:
        """Stages of every node (GC needs them all: it raises if a node does not answer)."""
        replies = self._every_node(
            lambda n: n.meta.ListStages(pb.Empty(), timeout=self.policy.deadline(stream=True)),
            "list stages",
        )
        stages: dict[bytes, bytes] = {}
        for reply in replies.values():
            for record in reply.stages:
                stages.setdefault(record.id, record.data)
        return list(stages.items())


def _intact(record_id: bytes, data: bytes) -> bool:
    """Whether a record's bytes (a version's, a manifest's) hash to its id."""
    return ids.record_id(data) == record_id


def _removal(
    remove: Callable[[NodeClient, list[bytes]], int],
    node: NodeClient,
    primary: list[bytes],
    others: list[bytes],
) -> Callable[[], int]:
    """A call for :meth:`NodeClient.run` that removes ``primary``, then ``others``, from
    ``node`` and returns the primary count; a retry does not repeat a step that succeeded."""
    removed: int | None = None

    def run() -> int:
        nonlocal removed
        if removed is None:
            removed = remove(node, primary) if primary else 0
        if others:
            remove(node, others)
        return removed

    return run
