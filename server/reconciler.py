"""The reconciler: one loop per node that both rebalances after membership changes and repairs
lost replicas (anti-entropy).

A pass walks everything the node holds, in key order: chunks (in windows of key ranges), then
manifests, the version records and tags of each repo, and stages. For every key it works out
the owners under the node's current map and asks each other owner, in batches, which of the
keys it holds (``Holds``, ``HasManifests``, ``ListVersions``...). Chunk ranges that a
``RangeDigests`` comparison shows in sync with a peer are skipped without asking id by id.
Then, for each key:

- one node is *responsible* for it: the first owner in ring order that holds it, or, when no
  owner holds it, every non-owner that does. The responsible node copies the key to each
  owner that lacks it (chunks in PutChunks streams, records with their put calls), so a key
  is sent once, not once per replica;
- a node that holds a key it does not own drops its copy, but only once every owner has
  confirmed that it holds it durably (answered that it holds it, or acknowledged the copy),
  and only if the map has not changed meanwhile.

A pass runs at start, whenever the map changes, every ``interval`` seconds, and on request
(:meth:`Reconciler.run_now`, the ``Reconcile`` RPC behind ``chunkstore cluster repair``).
Copies are throttled to ``rate`` bytes per second. The position in the chunk key space is kept
in the node's state file, so a pass interrupted by a restart resumes under the same map. A
change of map aborts the running pass and starts a new one.

Deletions are not replicated (no tombstones): a record removed while one owner was down comes
back from that owner, as the cluster client documents. Stages are the exception that commits
and aborts need: an owner that remembers a claim (or an abort) of a stage refuses any copy of
it, and a node whose copy every other owner refuses so drops it, since no majority could ever
hold it again. A copy carries the claims given up that this node knows of (a commit that lost
could not put the stage back everywhere), and an owner whose note names one of them accepts it.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Any

import grpc

from chunkstore import errors
from chunkstore.client.cluster_store import repo_key, stage_key
from chunkstore.client.manifest_parts import send_manifest
from chunkstore.client.rpc import REFUSED, NodeCallError, NodeClient
from chunkstore.client.wire import put_chunks_batch
from chunkstore.cluster_map import ClusterMap, ClusterMapError, map_digest, map_from_proto, newer
from chunkstore.v1 import store_pb2 as pb

from .keyspace import KEY_SPACE, position, range_digests, ranges_for, scan_range
from .worker import NodeWorker

log = logging.getLogger("chunkstore.reconciler")

MiB = 1 << 20
DEFAULT_INTERVAL = 60.0
DEFAULT_RATE = 64 * MiB
WINDOW_RANGES = 8  # key ranges per step of a pass
ASK_BATCH = 8192  # ids per existence question
MESSAGE_BYTES = 2 * MiB  # blob bytes per PutChunks message
STREAM_BYTES = 32 * MiB  # blob bytes per PutChunks stream
CHUNK_SHARE = 0.9  # of a pass's progress: the chunk walk (the records follow)
PROBE_TIMEOUT = 3.0  # seconds a peer gets to answer at the start of a pass
#: A chunk wanted here within this many seconds is marked wanted on its owners before it is
#: dropped here (GC grace periods are hours; marks younger than a minute are not refreshed).
WANTED_RECENTLY = 24 * 3600.0
_STATE = "reconciler"


@dataclass
class Report:
    """What one pass did and found (the ReconcileReport message)."""

    epoch: int = 0
    chunks_copied: int = 0
    bytes_copied: int = 0
    chunks_dropped: int = 0
    records_copied: int = 0
    records_dropped: int = 0
    chunks_under_replicated: int = 0
    records_under_replicated: int = 0
    misplaced: int = 0
    under_replicated_found: int = 0
    ranges_skipped: int = 0
    seconds: float = 0.0
    complete: bool = False
    peers_refused: list[str] = field(default_factory=list)

    @property
    def under_replicated(self) -> int:
        return self.chunks_under_replicated + self.records_under_replicated

    def to_proto(self) -> pb.ReconcileReport:
        return pb.ReconcileReport(
            epoch=self.epoch,
            chunks_copied=self.chunks_copied,
            bytes_copied=self.bytes_copied,
            chunks_dropped=self.chunks_dropped,
            records_copied=self.records_copied,
            records_dropped=self.records_dropped,
            under_replicated=self.under_replicated,
            misplaced=self.misplaced,
            under_replicated_found=self.under_replicated_found,
            ranges_skipped=self.ranges_skipped,
            seconds=self.seconds,
            complete=self.complete,
            peers_refused=self.peers_refused,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class _Plan:
    """Who gets which keys, and which keys this node answers for."""

    sends: dict[str, list[bytes]]
    responsible: set[bytes]


def _plan(
    me: str,
    keys: Sequence[bytes],
    rows: Sequence[Sequence[str]],
    holders: dict[bytes, set[str]],
    unreachable: set[str],
) -> _Plan:
    """The copies this node makes: each key it is responsible for (see the module docstring)
    to each reachable owner that lacks it."""
    sends: dict[str, list[bytes]] = {}
    responsible: set[bytes] = set()
    for key, row in zip(keys, rows, strict=True):
        held = holders[key]
        if me in row:
            if next(o for o in row if o in held) != me:
                continue  # an earlier owner holds it and copies it
        elif any(o in held for o in row):
            continue  # an owner holds it and copies it; this node drops it once all do
        responsible.add(key)
        for owner in row:
            if owner not in held and owner not in unreachable:
                sends.setdefault(owner, []).append(key)
    return _Plan(sends, responsible)


def _outcome(
    me: str,
    keys: Sequence[bytes],
    rows: Sequence[Sequence[str]],
    holders: dict[bytes, set[str]],
    responsible: set[bytes],
) -> tuple[list[bytes], int, int]:
    """After the copies: (keys to drop here, keys this node answers for that are still below
    their replica count, keys left here unowned)."""
    drops: list[bytes] = []
    short = misplaced = 0
    for key, row in zip(keys, rows, strict=True):
        held = holders[key]
        lacking = sum(o not in held for o in row)
        if key in responsible:
            short += lacking > 0
        if me not in row:
            if lacking:
                misplaced += 1
            else:
                drops.append(key)
    return drops, short, misplaced


def rows_of(keys: Sequence[bytes], rows: Sequence[Sequence[str]]) -> dict[bytes, Sequence[str]]:
    return dict(zip(keys, rows, strict=True))


def _batches(items: Sequence[bytes], size: int) -> Iterator[Sequence[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Aborted(Exception):
    """The map changed or the node is stopping: the pass ends incomplete."""


class Reconciler(NodeWorker):
    """The repair and rebalancing loop of node ``node_id`` over ``store`` (module docstring)."""

    thread_name = "reconciler"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Takes the arguments of :class:`NodeWorker`."""
        super().__init__(*args, **kwargs)
        self._cond = threading.Condition()
        self._wanted = False
        self._started = 0  # passes started
        self._done = 0  # number of the last complete pass
        self._last: Report | None = None  # the last complete pass
        self._running: Report | None = None
        self._progress = 1.0
        self._totals = Counter[str]()
        self._down: set[str] = set()  # peers that failed during the running pass
        self._refused: set[str] = set()  # peers that refused this node's calls in it
        self._seen: dict[str, int] = {}  # peer id -> its incarnation, found by the probe
        self._checked: dict[str, int] = {}  # the same, of the last complete pass
        # Stages held here that a peer refused as claimed there: said once, not every pass.
        self._claimed_elsewhere: set[bytes] = set()
        #: New at every start, so that peers tell this node from an earlier run of it.
        self.incarnation = secrets.randbits(63) + 1
        self._holder.subscribe(lambda cluster: self.wake())
        self._metrics.cluster_epoch.set(self._holder.epoch)

    # control

    def _interrupt(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wake(self) -> None:
        """Start a pass as soon as the running one (if any) ends."""
        self._metrics.cluster_epoch.set(self._holder.epoch)
        with self._cond:
            self._wanted = True
            self._cond.notify_all()

    def run_now(self, timeout: float | None = None) -> Report:
        """Start a pass (after the running one, if any) and return its report once a complete
        pass has ended. Raises StoreUnavailable if the node stops or ``timeout`` passes first."""
        with self._cond:
            target = self._started + 1
            self._wanted = True
            self._cond.notify_all()
            done = self._cond.wait_for(lambda: self._done >= target or self._stop.is_set(), timeout)
            last = self._last
        if self._stop.is_set():
            raise errors.StoreUnavailable(f"node {self.node_id} is stopping")
        if not done or last is None:
            raise errors.StoreUnavailable(
                f"node {self.node_id}: the reconciler pass did not end within {timeout:.0f} s"
            )
        return last

    def status(self) -> dict[str, Any]:
        """The fields of NodeStatus that describe the reconciler."""
        last, running = self._last, self._running
        epoch = self._holder.epoch
        rebalancing = (
            last is None or last.epoch != epoch or last.misplaced > 0 or last.under_replicated > 0
        )
        return {
            "in_map": self._holder.in_map(),
            "rebalancing": rebalancing,
            "pass_running": running is not None,
            "pass_progress": self._progress if running is not None else 1.0,
            "pass_epoch": last.epoch if last else 0,
            "misplaced": last.misplaced if last else 0,
            "under_replicated": last.under_replicated if last else 0,
            "chunks_copied": self._totals["chunks_copied"],
            "chunks_dropped": self._totals["chunks_dropped"],
            "bytes_copied": self._totals["bytes_copied"],
            "passes": self._done,
            "peers_refused": list(last.peers_refused) if last else [],
            "incarnation": self.incarnation,
            "checked": dict(self._checked),
        }

    def _loop(self) -> None:
        first = True
        while True:
            with self._cond:
                if not first:
                    self._cond.wait_for(lambda: self._wanted or self._stop.is_set(), self.interval)
                if self._stop.is_set():
                    return
                self._wanted = False
                self._started += 1
                number = self._started
            first = False
            report = None
            try:
                report = self._pass()
            except Exception:
                log.exception("node %s: reconciler pass failed", self.node_id)
                self._stop.wait(1.0)
            finally:
                self._running = None
            complete = report is not None and report.complete
            self._metrics.reconcile_passes.labels("complete" if complete else "aborted").inc()
            with self._cond:
                if complete:
                    self._done, self._last = number, report
                    self._checked = {
                        p: i for p, i in self._seen.items() if p not in self._down | self._refused
                    }
                elif not self._stop.is_set():
                    self._wanted = True  # the map changed or the pass failed: again
                self._cond.notify_all()
            if complete:
                self._publish(report)

    def _publish(self, report: Report) -> None:
        m = self._metrics
        m.chunks_under_replicated.set(report.chunks_under_replicated)
        m.records_under_replicated.set(report.records_under_replicated)
        m.keys_misplaced.set(report.misplaced)
        m.reconcile_progress.set(1.0)
        m.reconcile_last_pass.set(time.time())
        if report.chunks_copied or report.chunks_dropped or report.records_copied:
            log.info(
                "node %s: pass under epoch %d: %d chunks (%d bytes) and %d records copied, "
                "%d chunks and %d records dropped, %d keys below replica count, %d misplaced, "
                "%.1f s",
                self.node_id,
                report.epoch,
                report.chunks_copied,
                report.bytes_copied,
                report.records_copied,
                report.chunks_dropped,
                report.records_dropped,
                report.under_replicated,
                report.misplaced,
                report.seconds,
            )

    # one pass

    def _pass(self) -> Report:
        started = time.monotonic()
        cluster = self._holder.map
        digest = map_digest(cluster).hex()
        saved = self._state.get(_STATE)
        if saved.get("map") == digest and isinstance(saved.get("position"), int):
            at = saved["position"]
            report = Report.from_dict(saved.get("report") or {})
            report.complete = False
            if at:
                log.info(
                    "node %s: resuming the pass under epoch %d at %.0f%% of the key space",
                    self.node_id,
                    cluster.epoch,
                    100 * at / KEY_SPACE,
                )
        else:
            at, report = 0, Report()
        report.epoch = cluster.epoch
        self._running = report
        try:
            self._probe(cluster)
        except _Aborted:
            report.seconds = time.monotonic() - started
            return report
        ranges = ranges_for(self._store.totals().chunks)
        span = KEY_SPACE // ranges
        at -= at % span
        saved_at = time.monotonic()
        try:
            while at < KEY_SPACE:
                self._check(cluster)
                count = min(WINDOW_RANGES, (KEY_SPACE - at) // span)
                self._chunk_window(cluster, at, span, count, report)
                at += span * count
                self._progress = CHUNK_SHARE * at / KEY_SPACE
                self._metrics.reconcile_progress.set(self._progress)
                if time.monotonic() - saved_at > 1.0 or at >= KEY_SPACE:
                    self._state.put(
                        _STATE, {"map": digest, "position": at, "report": asdict(report)}
                    )
                    saved_at = time.monotonic()
            self._manifests(cluster, report)
            self._progress = CHUNK_SHARE + (1 - CHUNK_SHARE) / 2
            self._repos(cluster, report)
            self._stages(cluster, report)
            self._check(cluster)
        except _Aborted:
            report.seconds = time.monotonic() - started
            return report
        report.complete = True
        report.peers_refused = sorted(self._refused)
        report.seconds = time.monotonic() - started
        self._state.put(_STATE, {"map": digest, "position": 0})
        return report

    def _probe(self, cluster: ClusterMap) -> None:
        """Find the peers that answer, waiting out a reconnect backoff of their channels (a
        peer that does not answer is left out of this pass), and adopt a newer map that one
        of them serves (which ends the pass: _Aborted)."""
        self._down = set()
        self._refused = set()
        self._seen = {}
        clients = self._peers.others(cluster)
        if not clients:
            return

        def probe(client: NodeClient) -> pb.ClusterMap | None:
            try:
                reply = client.cluster.GetClusterMap(
                    pb.Empty(), timeout=PROBE_TIMEOUT, wait_for_ready=True
                )
                status = client.cluster.GetNodeStatus(pb.Empty(), timeout=PROBE_TIMEOUT)
            except grpc.RpcError as exc:
                failure = NodeCallError.from_rpc(client.spec, exc)
                client.record(failure)
                self._down.add(client.id)
                if failure.code in REFUSED:  # a wrong or missing peer token: say so
                    self._refused.add(client.id)
                    log.warning("node %s: peer refuses this node: %s", self.node_id, failure)
                return None
            client.record(None)
            self._seen[client.id] = status.incarnation
            return reply

        with ThreadPoolExecutor(min(16, len(clients)), thread_name_prefix="probe") as pool:
            replies = list(pool.map(probe, clients))
        for client, reply in zip(clients, replies, strict=True):
            if reply is None:
                continue
            try:
                theirs = map_from_proto(reply)
            except ClusterMapError:
                continue
            if newer(theirs, cluster):
                self._holder.offer(theirs, f"node {client.id}")
        self._check(cluster)

    def _check(self, cluster: ClusterMap) -> None:
        if self._stop.is_set() or self._holder.map is not cluster:
            raise _Aborted

    def _client(self, cluster: ClusterMap, node_id: str) -> NodeClient:
        return self._peers.client(cluster.node(node_id))

    def _call(
        self, client: NodeClient, service: str, method: str, request: Any, timeout: float
    ) -> Any:
        """``client.<service>.<method>(request)`` with retries (see NodeClient.run)."""

        def call() -> Any:
            return getattr(getattr(client, service), method)(request, timeout=timeout)

        try:
            return client.run(call)
        except NodeCallError as e:
            # A refusal is a peer token short of what repair needs (RangeDigests is skipped
            # where a node of an earlier release refuses it; the ids are asked one by one).
            if e.code in REFUSED and method != "RangeDigests":
                self._refused.add(client.id)
            raise

    # chunks

    def _chunk_window(
        self, cluster: ClusterMap, lo: int, span: int, count: int, report: Report
    ) -> None:
        """Reconcile the chunks held here in ranges ``lo + i * span`` (i < ``count``)."""
        me = self.node_id
        infos = list(scan_range(self._store, lo, lo + span * count))
        if not infos:
            return
        ids = [info.id for info in infos]
        rows = cluster.ring().owners_many(ids, cluster.replicas)
        holders: dict[bytes, set[str]] = {cid: {me} for cid in ids}
        unreachable = self._down
        others = sorted({o for row in rows for o in row} - {me} - unreachable)
        policy = self._peers.policy
        for peer in others:
            client = self._client(cluster, peer)
            in_sync: set[int] = set()
            digests, counts = range_digests(ids, rows, me, peer, lo, span, count)
            if any(counts):
                request = pb.RangeDigestsRequest(
                    epoch=cluster.epoch, peer=me, start=lo, span=span, count=count
                )
                try:
                    reply = self._call(client, "chunks", "RangeDigests", request, policy.timeout)
                    if len(reply.digests) == count:
                        in_sync = {
                            i
                            for i in range(count)
                            if counts[i]
                            and reply.counts[i] == counts[i]
                            and reply.digests[i] == digests[i]
                        }
                        report.ranges_skipped += len(in_sync)
                        self._metrics.reconcile_ranges_skipped.inc(len(in_sync))
                except NodeCallError as e:
                    if e.code not in (
                        grpc.StatusCode.UNIMPLEMENTED,
                        grpc.StatusCode.PERMISSION_DENIED,
                    ):
                        unreachable.add(peer)
                        continue
            ask = []
            for cid, row in zip(ids, rows, strict=True):
                if peer in row:
                    if me in row and (position(cid) - lo) // span in in_sync:
                        holders[cid].add(peer)
                    else:
                        ask.append(cid)
            try:
                for part in _batches(ask, ASK_BATCH):
                    request = pb.ChunkIds(ids=part)
                    timeout = policy.deadline(34 * len(part))
                    held = self._call(client, "chunks", "Holds", request, timeout)
                    for cid in held.ids:
                        if cid in holders:
                            holders[cid].add(peer)
            except NodeCallError:
                unreachable.add(peer)
        plan = _plan(me, ids, rows, holders, unreachable)
        report.under_replicated_found += self._found(ids, rows, holders, plan.responsible)
        for peer, cids in plan.sends.items():
            for cid in self._send_chunks(self._client(cluster, peer), cids, report):
                holders[cid].add(peer)
        drops, short, misplaced = _outcome(me, ids, rows, holders, plan.responsible)
        report.chunks_under_replicated += short
        report.misplaced += misplaced
        recent = time.time() - WANTED_RECENTLY
        wanted = {info.id for info in infos if info.wanted_at >= recent}
        drops = self._still_wanted_elsewhere(cluster, drops, rows_of(ids, rows), wanted)
        if drops:
            self._check(cluster)  # a new map may make this node an owner again
            dropped = self._store.delete(drops)
            report.chunks_dropped += dropped
            self._totals["chunks_dropped"] += dropped
            self._metrics.reconcile_chunks_dropped.inc(dropped)

    def _still_wanted_elsewhere(
        self,
        cluster: ClusterMap,
        drops: list[bytes],
        rows: dict[bytes, Sequence[str]],
        wanted: set[bytes],
    ) -> list[bytes]:
        """The chunks of ``drops`` that may go. A chunk wanted here lately (a push found it
        here, by a client that did not know the new map yet) may go only once every owner
        has marked it wanted too (by ``Missing``), so that GC on the owners spares it as it
        would have here."""
        recent = [cid for cid in drops if cid in wanted]
        if not recent:
            return drops
        keep: set[bytes] = set()
        for peer in sorted({o for cid in recent for o in rows[cid]}):
            ask = [cid for cid in recent if peer in rows[cid]]
            try:
                absent = self._call(
                    self._client(cluster, peer),
                    "chunks",
                    "Missing",
                    pb.ChunkIds(ids=ask),
                    self._peers.policy.deadline(34 * len(ask)),
                )
            except NodeCallError:
                keep.update(ask)
                continue
            keep.update(absent.ids)
        return [cid for cid in drops if cid not in keep]

    def _found(
        self,
        keys: Sequence[bytes],
        rows: Sequence[Sequence[str]],
        holders: dict[bytes, set[str]],
        responsible: set[bytes],
    ) -> int:
        found = sum(
            1
            for key, row in zip(keys, rows, strict=True)
            if key in responsible and any(o not in holders[key] for o in row)
        )
        self._metrics.reconcile_under_replicated_found.inc(found)
        return found

    def _send_chunks(self, client: NodeClient, cids: list[bytes], report: Report) -> set[bytes]:
        """Copy the chunks to ``client``'s node; return those it acknowledged."""
        acked: set[bytes] = set()
        batch: list[tuple[bytes, bytes]] = []
        size = 0
        for cid in cids:
            if self._stop.is_set():
                break
            try:
                ((_, blob),) = list(self._store.get([cid]))
            except errors.ChunkNotFound:
                continue  # deleted meanwhile (GC)
            batch.append((cid, blob))
            size += len(blob)
            if size >= STREAM_BYTES:
                acked |= self._stream(client, batch, size, report)
                batch, size = [], 0
        if batch:
            acked |= self._stream(client, batch, size, report)
        return acked

    def _stream(
        self, client: NodeClient, chunks: list[tuple[bytes, bytes]], size: int, report: Report
    ) -> set[bytes]:
        """One PutChunks stream of ``chunks`` (``size`` blob bytes), throttled."""
        messages: list[list[tuple[bytes, bytes]]] = [[]]
        filled = 0
        for cid, blob in chunks:
            if filled and filled + len(blob) > MESSAGE_BYTES:
                messages.append([])
                filled = 0
            messages[-1].append((cid, blob))
            filled += len(blob)

        def requests() -> Iterator[bytes]:
            for seq, message in enumerate(messages):
                if not self._bucket.take(sum(len(b) for _, b in message)):
                    return
                yield put_chunks_batch(seq, message)

        rate = self._bucket.rate
        timeout = client.policy.deadline(size, stream=True) + (size / rate if rate > 0 else 0)
        acked: set[bytes] = set()
        try:
            for ack in client.put_encoded(requests(), timeout=timeout):
                if 0 <= ack.seq < len(messages):
                    sent = messages[ack.seq]
                    acked.update(cid for cid, _ in sent)
                    nbytes = sum(len(b) for _, b in sent)
                    report.chunks_copied += len(sent)
                    report.bytes_copied += nbytes
                    self._totals["chunks_copied"] += len(sent)
                    self._totals["bytes_copied"] += nbytes
                    self._metrics.reconcile_chunks_copied.inc(len(sent))
                    self._metrics.reconcile_bytes_copied.inc(nbytes)
            client.record(None)
        except grpc.RpcError as exc:
            failure = NodeCallError.from_rpc(client.spec, exc)
            client.record(failure)
            if failure.retryable:
                self._down.add(client.id)
            if failure.code in REFUSED:
                self._refused.add(client.id)
            if not self._stop.is_set():
                log.warning("node %s: copying chunks: %s", self.node_id, failure)
        return acked

    # records

    def _copied(self, kind: str, n: int, report: Report) -> None:
        report.records_copied += n
        self._metrics.reconcile_records_copied.labels(kind).inc(n)

    def _dropped(self, kind: str, n: int, report: Report) -> None:
        report.records_dropped += n
        self._metrics.reconcile_records_dropped.labels(kind).inc(n)

    def _manifests(self, cluster: ClusterMap, report: Report) -> None:
        me = self.node_id
        policy = self._peers.policy
        batch: list[bytes] = []
        scanned = (mid for mid, _ in self._store.scan_manifests())
        while True:
            batch = [mid for _, mid in zip(range(ASK_BATCH), scanned, strict=False)]
            if not batch:
                return
            self._check(cluster)
            rows = cluster.ring().owners_many(batch, cluster.replicas)
            holders: dict[bytes, set[str]] = {mid: {me} for mid in batch}
            unreachable = self._down
            for peer in sorted({o for row in rows for o in row} - {me} - unreachable):
                ask = [mid for mid, row in zip(batch, rows, strict=True) if peer in row]
                request = pb.ChunkIds(ids=ask)
                try:
                    held = self._call(
                        self._client(cluster, peer),
                        "meta",
                        "HasManifests",
                        request,
                        policy.deadline(34 * len(ask)),
                    )
                except NodeCallError:
                    unreachable.add(peer)
                    continue
                for mid in held.ids:
                    if mid in holders:
                        holders[mid].add(peer)
            plan = _plan(me, batch, rows, holders, unreachable)
            report.under_replicated_found += self._found(batch, rows, holders, plan.responsible)
            for peer, mids in plan.sends.items():
                client = self._client(cluster, peer)
                for mid in mids:
                    try:
                        data = self._store.get_manifest(mid)
                    except errors.NotFound:
                        continue
                    try:
                        timeout = policy.deadline(len(data))
                        client.run(partial(send_manifest, client, mid, data, timeout))
                    except NodeCallError as e:
                        log.warning("node %s: copying manifest: %s", me, e)
                        break
                    holders[mid].add(peer)
                    self._copied("manifest", 1, report)
            drops, short, misplaced = _outcome(me, batch, rows, holders, plan.responsible)
            report.records_under_replicated += short
            report.misplaced += misplaced
            if drops:
                self._check(cluster)
                self._dropped("manifest", self._store.delete_manifests(drops), report)

    def _repos(self, cluster: ClusterMap, report: Report) -> None:
        for repo in self._store.list_repos():
            self._check(cluster)
            try:
                self._repo(cluster, repo, report)
            except errors.ChunkstoreError as e:
                log.warning("node %s: reconciling repo %r: %s", self.node_id, repo, e)

    def _repo(self, cluster: ClusterMap, repo: str, report: Report) -> None:
        me = self.node_id
        timeout = self._peers.policy.deadline(stream=True)
        row = [n.id for n in cluster.owners(repo_key(repo))]
        local = dict(self._store.list_versions(repo))
        views: dict[str, tuple[set[bytes], dict[str, bytes]]] = {
            me: (set(local), self._store.tags(repo))
        }
        unreachable = self._down
        name = pb.RepoName(repo=repo)
        for peer in row:
            if peer == me or peer in unreachable:
                continue
            try:
                client = self._client(cluster, peer)
                versions = self._call(client, "meta", "ListVersions", name, timeout)
                tags = self._call(client, "meta", "ListTags", name, timeout)
            except NodeCallError:
                unreachable.add(peer)
                continue
            views[peer] = (
                {v.id for v in versions.versions},
                {t.tag: t.version_id for t in tags.tags},
            )
        vids = sorted(local)
        rows = [row] * len(vids)
        holders = {vid: {o for o, (have, _) in views.items() if vid in have} for vid in vids}
        plan = _plan(me, vids, rows, holders, unreachable)
        report.under_replicated_found += self._found(vids, rows, holders, plan.responsible)
        for peer, sends in plan.sends.items():
            client = self._client(cluster, peer)
            for vid in sends:
                record = pb.VersionRecord(repo=repo, id=vid, data=local[vid])
                try:
                    timeout = self._peers.policy.deadline(len(record.data))
                    self._call(client, "meta", "PutVersion", record, timeout)
                except NodeCallError as e:
                    log.warning("node %s: copying a version of %r: %s", me, repo, e)
                    if e.code == grpc.StatusCode.INVALID_ARGUMENT:
                        continue  # a record no client can read (an earlier node took it)
                    break
                holders[vid].add(peer)
                views[peer][0].add(vid)
                self._copied("version", 1, report)
        self._tags(cluster, repo, row, views, report)
        drops, short, misplaced = _outcome(me, vids, rows, holders, plan.responsible)
        report.records_under_replicated += short
        report.misplaced += misplaced
        if me not in row and len(drops) == len(vids) and not unreachable.intersection(row):
            mine = views[me][1]
            if all(t in views[o][1] for o in row for t in mine):
                self._check(cluster)
                for vid in vids:
                    try:
                        self._store.delete_version(repo, vid)
                    except errors.NotFound:
                        continue
                    self._dropped("version", 1, report)

    def _tags(
        self,
        cluster: ClusterMap,
        repo: str,
        row: list[str],
        views: dict[str, tuple[set[bytes], dict[str, bytes]]],
        report: Report,
    ) -> None:
        """Owners of the repo get the tag most owners hold (ties: the earliest owner's, as the
        client reads them); a non-owner only fills in tags no owner has."""
        me = self.node_id
        order = [o for o in row if o in views]
        if me not in row:
            order = [me, *order]
        names = sorted({t for _, tags in views.values() for t in tags})
        for tag in names:
            if me in row:
                having = [o for o in order if tag in views[o][1]]
                if not having or having[0] != me:
                    continue  # the first owner holding it sets it right
                votes = Counter(views[o][1][tag] for o in having)
                value = votes.most_common(1)[0][0]
                targets = [o for o in order if views[o][1].get(tag) != value]
            else:
                if tag not in views[me][1] or any(tag in views[o][1] for o in row if o in views):
                    continue
                value = views[me][1][tag]
                targets = [o for o in row if o in views]
            for target in targets:
                if value not in views[target][0]:
                    continue  # that owner lacks the version: next pass, once it is copied
                try:
                    if target == me:
                        self._store.set_tag(repo, tag, value)
                    else:
                        request = pb.Tag(repo=repo, tag=tag, version_id=value)
                        client = self._client(cluster, target)
                        timeout = self._peers.policy.timeout
                        self._call(client, "meta", "SetTag", request, timeout)
                except (NodeCallError, errors.NotFound) as e:
                    log.warning("node %s: setting tag %s@%s: %s", me, repo, tag, e)
                    continue
                views[target][1][tag] = value
                self._copied("tag", 1, report)

    def _stages(self, cluster: ClusterMap, report: Report) -> None:
        me = self.node_id
        policy = self._peers.policy
        stages = self._store.list_stages()
        self._claimed_elsewhere &= {stage_id for stage_id, _ in stages}
        for stage_id, data in stages:
            self._check(cluster)
            row = [n.id for n in cluster.owners(stage_key(stage_id))]
            files = self._store.stage_files(stage_id)
            key = pb.StageKey(id=stage_id)
            has: dict[str, tuple[bool, set[str]]] = {}
            unreachable = self._down
            for peer in row:
                if peer == me or peer in unreachable:
                    continue
                client = self._client(cluster, peer)
                try:
                    try:
                        self._call(client, "meta", "GetStage", key, policy.timeout)
                        listed = self._call(
                            client, "meta", "ListStageFiles", key, policy.deadline()
                        )
                        has[peer] = (True, {f.path for f in listed.files})
                    except NodeCallError as e:
                        if e.code != grpc.StatusCode.NOT_FOUND:
                            raise
                        has[peer] = (False, set())
                except NodeCallError:
                    unreachable.add(peer)
            holders = {
                stage_id: {me} | {p for p, (ok, paths) in has.items() if ok and set(files) <= paths}
            }
            plan = _plan(me, [stage_id], [row], holders, unreachable)
            report.under_replicated_found += self._found(
                [stage_id], [row], holders, plan.responsible
            )
            claimed: set[str] = set()  # owners that refused the copy as claimed there
            for peer in plan.sends:
                theirs = has[peer]
                if self._send_stage(cluster, peer, stage_id, data, files, theirs, report, claimed):
                    holders[stage_id].add(peer)
            others = [p for p in row if p != me]
            if claimed and self._drop_if_claimed(cluster, stage_id, others, claimed):
                self._dropped("stage", 1, report)
                continue
            drops, short, misplaced = _outcome(me, [stage_id], [row], holders, plan.responsible)
            report.records_under_replicated += short
            report.misplaced += misplaced
            if drops:
                self._check(cluster)
                try:
                    self._store.delete_stage(stage_id)
                    self._dropped("stage", 1, report)
                except errors.NotFound:
                    pass

    def _send_stage(
        self,
        cluster: ClusterMap,
        peer: str,
        stage_id: bytes,
        data: bytes,
        files: dict[str, bytes],
        theirs: tuple[bool, set[str]],
        report: Report,
        claimed: set[str],
    ) -> bool:
        """Copy the stage (with the claims of it given up that this node knows of), or the
        files of it that ``peer`` lacks; whether it now has all. A peer that refuses the stage
        as claimed there is added to ``claimed``."""
        client = self._client(cluster, peer)
        policy = self._peers.policy
        present, paths = theirs
        try:
            if not present:
                released = sorted(self._store.released_claims(stage_id))
                record = pb.StageRecord(id=stage_id, data=data, released=released)
                self._call(client, "meta", "PutStage", record, policy.deadline(len(data)))
                self._copied("stage", 1, report)
            for path, body in files.items():
                if path in paths:
                    continue
                request = pb.StageFile(stage_id=stage_id, path=path, data=body)
                timeout = policy.deadline(len(body))
                self._call(client, "meta", "PutStageFile", request, timeout)
                self._copied("stage_file", 1, report)
        except NodeCallError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                claimed.add(peer)
            else:
                log.warning("node %s: copying stage %s: %s", self.node_id, stage_id.hex(), e)
            return False
        return True

    def _drop_if_claimed(
        self, cluster: ClusterMap, stage_id: bytes, others: list[str], claimed: set[str]
    ) -> bool:
        """Drop this node's copy of a stage that every one of its ``others`` owners refuses as
        claimed there (``claimed``: they remember that claim until an hour after the stage
        expires); whether it did.

        If every other owner refuses it, no majority of them can hold the stage again before
        it has expired, so it can never be committed: the copy is dropped. If only some do
        (a commit in progress, or one that lost a race and could not put the stage back
        everywhere, until its release reaches this node and goes with the copy), it is kept,
        and that is said once.
        """
        if set(others) <= claimed:
            self._check(cluster)
            with contextlib.suppress(errors.NotFound):
                self._store.delete_stage(stage_id)
            log.info(
                "node %s: dropped its copy of stage %s: every other owner (%s) refuses it as "
                "claimed there (committed or aborted while this node was away)",
                self.node_id,
                stage_id.hex(),
                ", ".join(sorted(others)),
            )
            return True
        if stage_id not in self._claimed_elsewhere:
            self._claimed_elsewhere.add(stage_id)
            log.info(
                "node %s: stage %s was claimed on node %s (being committed, or a commit that "
                "could not put it back there): it refuses this node's copy, which stays here",
                self.node_id,
                stage_id.hex(),
                ", ".join(sorted(claimed)),
            )
        return False
