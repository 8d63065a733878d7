"""A store in process memory, for tests: plain dicts behind one lock."""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence

from chunkstore import errors
from chunkstore.stores import base
from chunkstore.stores.base import ChunkInfo, ChunkTotals, Store, replaces


class MemoryStore(Store):
    """Keeps everything in dicts; thread-safe; gone when the object is."""

    location = "memory://"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: dict[bytes, bytes] = {}
        self._wanted_at: dict[bytes, float] = {}
        self._manifests: dict[bytes, bytes] = {}
        self._manifest_stored_at: dict[bytes, float] = {}
        self._versions: dict[tuple[str, bytes], bytes] = {}
        self._tags: dict[tuple[str, str], bytes] = {}
        self._stages: dict[bytes, bytes] = {}
        self._stage_files: dict[bytes, dict[str, bytes]] = {}
        # id -> (time, time kept until, claimant)
        self._stage_claims: dict[bytes, tuple[float, float, bytes]] = {}
        # (id, claimant that gave its claim up) -> (time, time kept until)
        self._stage_releases: dict[tuple[bytes, bytes], tuple[float, float]] = {}

    # chunks

    def missing(self, ids: Sequence[bytes]) -> set[bytes]:
        now = time.time()
        absent = set()
        with self._lock:
            for cid in ids:
                if cid in self._chunks:
                    self._wanted_at[cid] = now
                else:
                    absent.add(cid)
        return absent

    def put(self, chunks: Sequence[tuple[bytes, bytes]]) -> int:
        now = time.time()
        added = 0
        items = list(chunks)  # all or none: fail before changing anything
        with self._lock:
            for cid, blob in items:
                if cid not in self._chunks:
                    self._chunks[cid] = bytes(blob)
                    added += len(blob)
                self._wanted_at[cid] = now
        return added

    def get(self, ids: Sequence[bytes]) -> Iterator[tuple[bytes, bytes]]:
        for cid in ids:
            with self._lock:
                blob = self._chunks.get(cid)
            if blob is None:
                raise errors.ChunkNotFound(cid)
            yield cid, blob

    def delete(self, ids: Iterable[bytes], unwanted_since: float | None = None) -> int:
        removed = 0
        with self._lock:
            for cid in ids:
                if cid not in self._chunks:
                    continue
                if unwanted_since is not None and self._wanted_at[cid] >= unwanted_since:
                    continue
                if self._chunks.pop(cid, None) is not None:
                    del self._wanted_at[cid]
                    removed += 1
        return removed

    def scan(self) -> Iterator[ChunkInfo]:
        with self._lock:
            infos = [ChunkInfo(c, len(b), self._wanted_at[c]) for c, b in self._chunks.items()]
        yield from infos

    def totals(self) -> ChunkTotals:
        with self._lock:
            return ChunkTotals(len(self._chunks), sum(map(len, self._chunks.values())))

    # manifests

    def put_manifest(self, manifest_id: bytes, data: bytes) -> None:
        """Store a manifest and set its stored_at to now (see :meth:`MetaStore.put_manifest`:
        a damaged copy is replaced)."""
        now = time.time()
        with self._lock:
            held = self._manifests.get(manifest_id)
            if held is None or replaces(manifest_id, held, data):
                self._manifests[manifest_id] = bytes(data)
            self._manifest_stored_at[manifest_id] = now

    def get_manifest(self, manifest_id: bytes) -> bytes:
        with self._lock:
            data = self._manifests.get(manifest_id)
        if data is None:
            raise errors.NotFound(f"manifest {manifest_id.hex()} is not in the store")
        return data

    def has_manifests(self, manifest_ids: Sequence[bytes]) -> set[bytes]:
        with self._lock:
            return {m for m in manifest_ids if m in self._manifests}

    def scan_manifests(self) -> Iterator[tuple[bytes, float]]:
        """Yield ``(id, stored_at)`` of every manifest: the time of its last put_manifest."""
        with self._lock:
            infos = list(self._manifest_stored_at.items())
        yield from infos

    def delete_manifests(self, manifest_ids: Iterable[bytes]) -> int:
        removed = 0
        with self._lock:
            for mid in manifest_ids:
                if self._manifests.pop(mid, None) is not None:
                    del self._manifest_stored_at[mid]
                    removed += 1
        return removed

    # versions and tags

    def put_version(self, repo: str, version_id: bytes, data: bytes) -> None:
        with self._lock:
            held = self._versions.get((repo, version_id))
            if held is None or replaces(version_id, held, data):
                self._versions[(repo, version_id)] = bytes(data)

    def get_version(self, repo: str, version_id: bytes) -> bytes:
        with self._lock:
            data = self._versions.get((repo, version_id))
        if data is None:
            raise errors.NotFound(f"version {version_id.hex()} is not in repo {repo!r}")
        return data

    def list_versions(self, repo: str) -> list[tuple[bytes, bytes]]:
        with self._lock:
            return [(vid, data) for (r, vid), data in self._versions.items() if r == repo]

    def delete_version(self, repo: str, version_id: bytes) -> None:
        with self._lock:
            if self._versions.pop((repo, version_id), None) is None:
                raise errors.NotFound(f"version {version_id.hex()} is not in repo {repo!r}")
            for key in [k for k, v in self._tags.items() if k[0] == repo and v == version_id]:
                del self._tags[key]

    def list_repos(self) -> list[str]:
        with self._lock:
            return sorted({repo for repo, _ in self._versions})

    def set_tag(self, repo: str, tag: str, version_id: bytes) -> None:
        """Point ``repo@tag`` at a version; NotFound if that version is not stored."""
        with self._lock:
            if (repo, version_id) not in self._versions:
                raise errors.NotFound(f"version {version_id.hex()} is not in repo {repo!r}")
            self._tags[(repo, tag)] = version_id

    def delete_tag(self, repo: str, tag: str) -> None:
        with self._lock:
            if self._tags.pop((repo, tag), None) is None:
                raise errors.NotFound(f"tag {tag!r} is not in repo {repo!r}")

    def tags(self, repo: str) -> dict[str, bytes]:
        with self._lock:
            return {t: vid for (r, t), vid in self._tags.items() if r == repo}

    # stages

    def put_stage(self, stage_id: bytes, data: bytes, released: Collection[bytes] = ()) -> None:
        base.check_released(released)
        with self._lock:
            noted = self._noted(stage_id)
            if noted is not None:
                if noted not in released:
                    raise errors.StageClaimed(stage_id)
                del self._stage_claims[stage_id]
            self._stages[stage_id] = bytes(data)
            self._stage_files.setdefault(stage_id, {})

    def release_claim(self, stage_id: bytes, claimant: bytes, record: bytes) -> None:
        base.check_claimant(claimant)
        now = time.time()
        with self._lock:
            self._stage_releases = {
                key: note
                for key, note in self._stage_releases.items()
                if base.claim_kept(*note, now)
            }
            self._stage_releases[stage_id, claimant] = (now, base.kept_until(record, now))
            if self._noted(stage_id) == claimant:
                del self._stage_claims[stage_id]

    def released_claims(self, stage_id: bytes) -> set[bytes]:
        """The claimants that gave up their claim of the stage (:meth:`release_claim`),
        while remembered."""
        now = time.time()
        with self._lock:
            return {
                claimant
                for (sid, claimant), note in self._stage_releases.items()
                if sid == stage_id and base.claim_kept(*note, now)
            }

    def get_stage(self, stage_id: bytes) -> bytes:
        with self._lock:
            try:
                return self._stages[stage_id]
            except KeyError:
                raise errors.NotFound(f"stage {stage_id.hex()} not found") from None

    def put_stage_file(self, stage_id: bytes, path: str, data: bytes) -> None:
        with self._lock:
            if stage_id not in self._stages:
                raise errors.NotFound(f"stage {stage_id.hex()} not found")
            self._stage_files[stage_id][path] = bytes(data)

    def stage_files(self, stage_id: bytes) -> dict[str, bytes]:
        with self._lock:
            return dict(self._stage_files.get(stage_id, {}))

    def delete_stage(self, stage_id: bytes, claimant: bytes | None = None) -> None:
        base.check_claimant(claimant)
        with self._lock:
            noted = None if stage_id in self._stages else self._noted(stage_id)
            if claimant is not None and noted == claimant:
                return  # this claimant's retry: its first try deleted the stage
            self._remove_stage(stage_id, claimant)

    def claim_stage(
        self, stage_id: bytes, claimant: bytes | None = None
    ) -> tuple[bytes, dict[str, bytes]]:
        base.check_claimant(claimant)
        with self._lock:
            return self._remove_stage(stage_id, claimant)

    def restore_stage(
        self, stage_id: bytes, claimant: bytes, record: bytes, files: Mapping[str, bytes]
    ) -> None:
        base.check_claimant(claimant)
        with self._lock:
            if stage_id in self._stages:
                return
            if self._noted(stage_id) != claimant:
                raise errors.StageClaimed(stage_id)
            self._stages[stage_id] = bytes(record)
            self._stage_files[stage_id] = {path: bytes(data) for path, data in files.items()}
            del self._stage_claims[stage_id]

    def _noted(self, stage_id: bytes) -> bytes | None:
        """The claimant of the last delete of the stage, if still kept. The caller holds the
        lock."""
        at, until, by = self._stage_claims.get(stage_id, (0.0, 0.0, b""))
        return by if by and base.claim_kept(at, until, time.time()) else None

    def _remove_stage(
        self, stage_id: bytes, claimant: bytes | None
    ) -> tuple[bytes, dict[str, bytes]]:
        """Remove a stage and its files, note who removed it (``claimant``, or nobody) and drop
        the notes no longer kept; return ``(record, files)`` as they were. NotFound if absent.
        The caller holds the lock."""
        record = self._stages.pop(stage_id, None)
        if record is None:
            raise errors.NotFound(f"stage {stage_id.hex()} not found")
        now = time.time()
        self._stage_claims = {
            k: note for k, note in self._stage_claims.items() if base.claim_kept(*note[:2], now)
        }
        if claimant is None:
            self._stage_claims.pop(stage_id, None)
        else:
            self._stage_claims[stage_id] = (now, base.kept_until(record, now), claimant)
        return record, self._stage_files.pop(stage_id, {})

    def list_stages(self) -> list[tuple[bytes, bytes]]:
        with self._lock:
            return list(self._stages.items())
