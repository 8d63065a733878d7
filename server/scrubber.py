"""The scrubber: re-verifies every stored chunk against its id, in the background, at a bounded
rate, and replaces a corrupt chunk with a verified copy from another node.

A sweep reads the node's chunks in id order (decoding each and comparing its BLAKE3 with its
id, as every read does) at ``rate`` bytes per second; a sweep starts ``interval`` seconds after
the last one ended (or after the node's first start). Its position is kept in the node's state
file, so a sweep interrupted by a restart resumes where it was.

A chunk that fails is counted (``chunkstore_scrub_errors_total``), a good copy is fetched from
its other owners (then from any other node) and verified, and the bad copy is replaced by it
(``chunkstore_scrub_repaired_total``). If no node has a good copy, the bad one is deleted
anyway: it is worth nothing, and without it existence checks report the chunk missing, so the
next push that has it sends it again.

Once every chunk is verified, so is every manifest and version record the node holds (each
must hash to its id). A damaged one is counted (``chunkstore_scrub_record_errors_total``) and
replaced with an intact copy from another owner (``chunkstore_scrub_records_repaired_total``);
with no intact copy anywhere it is kept, since readers name it and ``rm`` (a version) or a push
of the same file (a manifest) mends it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from chunkstore import codec, errors, ids
from chunkstore.client import manifest_parts
from chunkstore.client.cluster_store import repo_key
from chunkstore.client.rpc import NodeCallError, NodeClient
from chunkstore.v1 import store_pb2 as pb

from .worker import NodeWorker

log = logging.getLogger("chunkstore.scrubber")

MiB = 1 << 20
DEFAULT_RATE = 16 * MiB
DEFAULT_INTERVAL = 24 * 3600.0
SAVE_EVERY = 5.0  # seconds between writes of the position
_STATE = "scrubber"


class Scrubber(NodeWorker):
    """Scrubs ``store`` of node ``node_id`` (see the module docstring)."""

    thread_name = "scrubber"

    def _loop(self) -> None:
        state = self._state.get(_STATE)
        if "next_sweep" not in state:
            state = {"next_sweep": time.time() + self.interval, "after": ""}
            self._state.put(_STATE, state)
        while not self._stop.is_set():
            wait = state["next_sweep"] - time.time()
            if wait > 0:
                if self._stop.wait(min(wait, 60.0)):
                    return
                continue
            try:
                finished = self._sweep(bytes.fromhex(state.get("after", "")))
                if finished:
                    self._check_records()
            except Exception:
                log.exception("node %s: scrub failed", self.node_id)
                finished = False
                if self._stop.wait(10.0):
                    return
            if finished:
                self._metrics.scrub_last_sweep.set(time.time())
                state = {"next_sweep": time.time() + self.interval, "after": ""}
                self._state.put(_STATE, state)
            else:
                state = self._state.get(_STATE)

    def _sweep(self, after: bytes) -> bool:
        """Verify the chunks after ``after``; True once every chunk was verified."""
        saved = time.monotonic()
        for info in self._store.scan(after):
            cid = info.id
            blob = self._read(cid)
            if blob is not None:
                if not self._bucket.take(len(blob)):
                    break
                self._metrics.scrub_chunks.inc()
                self._metrics.scrub_bytes.inc(len(blob))
                try:
                    codec.decode_verified(cid, blob)
                except errors.CorruptChunk as e:
                    self._metrics.scrub_errors.inc()
                    log.error("node %s: scrub: %s", self.node_id, e)
                    self._repair(cid)
            after = cid
            if time.monotonic() - saved > SAVE_EVERY:
                self._save(after)
                saved = time.monotonic()
        else:
            return True
        self._save(after)
        return False

    def _check_records(self) -> None:
        """Verify every manifest and version record; replace a damaged one with an intact copy
        from another owner where one has it."""
        if self._check_manifests():
            for repo in self._store.list_repos():
                if not self._check_versions(repo):
                    return

    def _check_manifests(self) -> bool:
        """:meth:`_check_records` of the manifests; False if stopped meanwhile."""
        for manifest_id, _ in list(self._store.scan_manifests()):
            try:
                (data,) = self._store.get_manifests([manifest_id])
            except errors.NotFound:
                continue  # deleted meanwhile
            if not self._bucket.take(len(data)):
                return False
            if not self._damaged("manifest", manifest_id, data):
                continue
            request = pb.ChunkIds(ids=[manifest_id])
            good = self._fetch_record(
                manifest_id,
                manifest_id,
                lambda c, request=request: manifest_parts.joined(
                    c.meta.GetManifestParts(request, timeout=c.policy.deadline(stream=True))
                )[1],
            )
            if good is not None:
                self._store.put_manifest(manifest_id, good)
                self._repaired("manifest", manifest_id)
        return True

    def _check_versions(self, repo: str) -> bool:
        """:meth:`_check_records` of one repo's version records; False if stopped meanwhile."""
        for version_id, data in self._store.list_versions(repo):
            if not self._bucket.take(len(data)):
                return False
            if not self._damaged("version", version_id, data):
                continue
            key = pb.VersionKey(repo=repo, id=version_id)
            good = self._fetch_record(
                repo_key(repo),
                version_id,
                lambda c, key=key: c.meta.GetVersion(key, timeout=c.policy.timeout).data,
            )
            if good is not None:
                self._store.put_version(repo, version_id, good)
                self._repaired("version", version_id)
        return True

    def _damaged(self, kind: str, record_id: bytes, data: bytes) -> bool:
        self._metrics.scrub_records.labels(kind).inc()
        if ids.record_id(data) == record_id:
            return False
        self._metrics.scrub_record_errors.labels(kind).inc()
        log.error("node %s: scrub: %s %s is damaged", self.node_id, kind, record_id.hex())
        return True

    def _repaired(self, kind: str, record_id: bytes) -> None:
        self._metrics.scrub_records_repaired.labels(kind).inc()
        log.info(
            "node %s: scrub: %s %s replaced by an intact copy", self.node_id, kind, record_id.hex()
        )

    def _fetch_record(
        self, key: bytes, record_id: bytes, read: Callable[[NodeClient], bytes]
    ) -> bytes | None:
        """Bytes of a record that hash to ``record_id``, from the other owners of ``key``."""
        cluster = self._holder.map
        for node in cluster.owners(key):
            if node.id == self.node_id:
                continue
            client = self._peers.client(node)
            try:
                data = client.run(lambda c=client: read(c))
            except NodeCallError as e:
                if e.code != grpc.StatusCode.NOT_FOUND:
                    log.warning("node %s: scrub: %s", self.node_id, e)
                continue
            if ids.record_id(data) == record_id:
                return data
        log.error(
            "node %s: scrub: no other owner has an intact copy of %s; kept it",
            self.node_id,
            record_id.hex(),
        )
        return None

    def _save(self, after: bytes) -> None:
        self._state.put(_STATE, {**self._state.get(_STATE), "after": after.hex()})

    def _read(self, cid: bytes) -> bytes | None:
        try:
            ((_, blob),) = list(self._store.get([cid]))
        except errors.ChunkNotFound:
            return None  # deleted meanwhile
        return bytes(blob)

    def _repair(self, cid: bytes) -> None:
        """Replace the corrupt chunk ``cid`` with a verified copy from another node."""
        good = self._fetch(cid)
        self._store.delete([cid])
        if good is None:
            log.error(
                "node %s: scrub: no other node has a good copy of chunk %s; deleted the bad one",
                self.node_id,
                cid.hex(),
            )
            return
        self._store.put([(cid, good)])
        self._metrics.scrub_repaired.inc()
        log.info("node %s: scrub: chunk %s replaced by a good copy", self.node_id, cid.hex())

    def _fetch(self, cid: bytes) -> bytes | None:
        """A blob of ``cid`` that verifies, from its other owners first, then any node."""
        cluster = self._holder.map
        owners = [n.id for n in cluster.owners(cid)]
        order = [o for o in owners if o != self.node_id]
        order += [n.id for n in cluster.nodes if n.id not in owners and n.id != self.node_id]
        request = pb.ChunkIds(ids=[cid])
        for node_id in order:
            client = self._peers.client(cluster.node(node_id))
            try:
                batches = client.run(
                    lambda c=client: list(
                        c.chunks.GetChunks(request, timeout=c.policy.deadline(stream=True))
                    )
                )
            except NodeCallError as e:
                if e.code != grpc.StatusCode.NOT_FOUND:
                    log.warning("node %s: scrub: %s", self.node_id, e)
                continue
            for batch in batches:
                for chunk in batch.chunks:
                    if chunk.id != cid:
                        continue
                    try:
                        codec.decode_verified(cid, chunk.blob)
                    except errors.CorruptChunk:
                        continue
                    return chunk.blob
        return None
