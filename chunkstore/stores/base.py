"""The store protocol: everything the repository layer needs from a place that keeps data.

A store keeps two kinds of things:

- **chunks**, addressed by their id (BLAKE3-256 of the raw bytes) and kept as encoded blobs
  (see :mod:`chunkstore.codec`); and
- **metadata**: file manifests (by id), version records (by repo and id) and tags (by repo and
  name), each an opaque byte string whose meaning belongs to :mod:`chunkstore.model`.

Every write returns only once it is durable. Nothing here interprets versions, so the same
repository layer runs on every implementation: :class:`MemoryStore` for tests,
:class:`LmdbStore` on one machine, and the cluster client over gRPC.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import DecodeError

from chunkstore import codec, errors, ids
from chunkstore.parallel import for_each
from chunkstore.v1 import model_pb2


@dataclass(frozen=True)
class ChunkInfo:
    """What a store knows of one stored chunk without decoding it."""

    id: bytes
    stored_size: int  # encoded bytes kept
    wanted_at: float  # unix time of the last write or existence check that found it


T = TypeVar("T")
CHUNKS_PER_TASK = 16  # chunks a reading thread fetches in one call, then decodes
#: Size of a claimant token: random bytes a caller makes once per claim of a stage and passes
#: to every try of :meth:`MetaStore.delete_stage`, so that its own retry is told from another's.
CLAIMANT_BYTES = 16
#: How long a store remembers which claimant deleted a stage, at least: a retry follows within
#: seconds. A stage that expires later is remembered that long after it expires (see
#: :func:`kept_until`).
CLAIM_KEPT_SECONDS = 3600.0


def kept_until(record: bytes, at: float) -> float:
    """Until when a store remembers the claimant that deleted, at ``at``, the stage whose
    record is ``record``: :data:`CLAIM_KEPT_SECONDS` after the delete, or after the stage
    expires if that is later (the margin is for clocks that differ). A copy of the stage that
    another owner still holds (it was down at the claim) is refused meanwhile, so it can never
    be committed a second time: once expired, a stage can no longer be committed. A record that
    does not parse is remembered the least."""
    try:
        expires = model_pb2.Stage.FromString(record).expires_ns / 1e9
    except DecodeError:
        expires = 0.0
    return max(at, expires) + CLAIM_KEPT_SECONDS


def claim_kept(at: float, until: float, now: float) -> bool:
    """Whether a note that a claimant deleted a stage, made at ``at`` and kept until ``until``,
    is still kept at ``now`` (a clock set back by CLAIM_KEPT_SECONDS or more keeps none)."""
    return at - CLAIM_KEPT_SECONDS < now < until


def check_claimant(claimant: bytes | None) -> None:
    """Raise InvalidInput unless ``claimant`` is None or :data:`CLAIMANT_BYTES` bytes."""
    if claimant is not None and len(claimant) != CLAIMANT_BYTES:
        raise errors.InvalidInput(
            f"a claimant token has {CLAIMANT_BYTES} bytes, got {len(claimant)}; nothing was changed"
        )


def check_released(released: Collection[bytes]) -> None:
    """:func:`check_claimant` of each claimant a copy of a stage says gave its claim up."""
    for claimant in released:
        check_claimant(claimant)


@dataclass(frozen=True)
class ChunkTotals:
    chunks: int
    stored_bytes: int


class ChunkStore(ABC):
    """Content-addressed chunk storage."""

    #: Whether reading a chunk moves it over a network (a cluster): reading and hashing bytes
    #: found in local files is then cheaper than fetching them, and :meth:`with_blobs` costs a
    #: round trip per call.
    remote: bool = False

    @abstractmethod
    def missing(self, ids: Sequence[bytes]) -> set[bytes]:
        """Return the ids among ``ids`` that are not stored; mark the stored ones wanted now.

        Marking matters for garbage collection: a chunk found here is spared by a concurrent GC
        for the grace period, so a push that skips uploading it cannot lose it.
        """

    def lacking(self, ids: Sequence[bytes]) -> set[bytes]:
        """As :meth:`missing`, except that the store may leave the stored ones unmarked: the
        caller then passes them to :meth:`mark_wanted` before anything that relies on them
        becomes visible. Stores whose marks are cheap mark them here already."""
        return self.missing(ids)

    def mark_wanted(self, ids: Sequence[bytes]) -> set[bytes]:
        """Mark the stored chunks among ``ids`` wanted now; return the ids that are not stored.

        A push calls it once at its end for every chunk it relies on without uploading: those
        :meth:`lacking` found (a concurrent GC may have taken an unmarked one since) and those
        it never asked for because a stored version references them.
        """
        return self.missing(ids)

    def writing(self) -> AbstractContextManager[None]:
        """A context around a series of writes (a push): the store may hold back reusing the
        space they free until it ends, to lay each write out in one piece. Contexts may nest
        and overlap, from any thread. A store that takes no writes raises here, as it would at
        the first write, before the work that leads to it."""
        return nullcontext()

    @abstractmethod
    def put(self, chunks: Sequence[tuple[bytes, bytes]]) -> int:
        """Store ``(id, blob)`` pairs durably, all or none; return the blob bytes newly added.

        An id already stored keeps its blob. The caller vouches that each blob decodes to bytes
        with that id; stores that take writes from the network check it themselves.
        """

    @abstractmethod
    def get(self, ids: Sequence[bytes]) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(id, blob)`` for every id, in any order; raise ChunkNotFound for an absent one.

        Blobs are not verified here: use :meth:`read` for bytes that reach a user.
        """

    @abstractmethod
    def delete(self, ids: Iterable[bytes], unwanted_since: float | None = None) -> int:
        """Remove these chunks where present; return how many were removed.

        With ``unwanted_since``, a chunk wanted at or after that time (stored, or found by
        :meth:`missing`) is kept: the check and the removal are one atomic step, so a push that
        was just told a chunk exists never loses it to a concurrent GC.
        """

    @abstractmethod
    def scan(self) -> Iterator[ChunkInfo]:
        """Yield every stored chunk once."""

    @abstractmethod
    def totals(self) -> ChunkTotals:
        """Count and encoded size of all stored chunks."""

    def with_blobs(
        self, ids: Sequence[bytes], fn: Callable[[Mapping[bytes, bytes | memoryview]], T]
    ) -> T:
        """Return ``fn(blobs)`` over the blobs of these chunks (ChunkNotFound if one is absent).

        The blobs may be views into the store that are valid only during the call, so ``fn``
        decodes them without copying and must not keep them. ``fn`` runs once.
        """
        return fn(dict(self.get(ids)))

    def read(self, ids: Sequence[bytes], workers: int = 2) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(id, raw bytes)`` for every id, each verified against its id, in any order.

        Raises CorruptChunk naming the first chunk whose bytes do not match, ChunkNotFound for
        an absent one. Decoding and hashing run on ``workers`` threads (both release the GIL).
        """
        if workers <= 1:
            for cid, blob in self.get(ids):
                yield cid, codec.decode_verified(cid, blob)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="chunk-decode") as pool:
            pending = []
            for cid, blob in self.get(ids):
                pending.append(pool.submit(_decode_pair, cid, blob))
                if len(pending) >= 4 * workers:
                    yield pending.pop(0).result()
            for fut in pending:
                yield fut.result()

    def read_into(
        self,
        ids: Sequence[bytes],
        consume: Callable[[bytes, codec.RawBuffer], None],
        workers: int = 2,
    ) -> None:
        """Call ``consume(id, raw bytes)`` for every id, each verified as by :meth:`read`.

        Calls come from ``workers`` threads at once, each fetching (through
        :meth:`with_blobs`), decoding and verifying its own chunks, so ``consume`` must be
        thread-safe (writing at a file offset is). The raw bytes are bytes-like and valid only
        during the call: nothing is copied that is written out at once. This is the fast path
        for writing many chunks out: nothing funnels through one thread.
        """

        def decode_task(task: Sequence[bytes]) -> None:
            def decode_all(blobs: Mapping[bytes, bytes | memoryview]) -> None:
                for cid in task:
                    consume(cid, codec.verified_buffer(cid, blobs[cid]))

            self.with_blobs(task, decode_all)

        tasks = (ids[i : i + CHUNKS_PER_TASK] for i in range(0, len(ids), CHUNKS_PER_TASK))
        for_each(decode_task, tasks, workers, "chunk-decode")


def _decode_pair(cid: bytes, blob: bytes) -> tuple[bytes, bytes]:
    return cid, codec.decode_verified(cid, blob)


def replaces(record_id: bytes, held: bytes | memoryview, data: bytes) -> bool:
    """Whether the bytes ``data`` of a record (a manifest, a version) replace its stored copy
    ``held``: the copy is damaged (not ``data``) and ``data`` is intact (hashes to the id)."""
    return held != data and ids.record_id(data) == record_id


class MetaStore(ABC):
    """Manifests, version records and tags. Keys are bytes ids and str names."""

    @abstractmethod
    def put_manifest(self, manifest_id: bytes, data: bytes) -> None:
        """Store a file manifest durably (idempotent); its stored_at becomes now. A stored
        copy with other bytes is damaged (ids hash the bytes): it is replaced if ``data``
        hashes to the id (see :func:`replaces`), so pushing the file again repairs it."""

    def put_manifests(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        """:meth:`put_manifest` of each ``(id, data)``: a push's manifests, in as few
        durable writes as the store allows."""
        for manifest_id, data in records:
            self.put_manifest(manifest_id, data)

    @abstractmethod
    def get_manifest(self, manifest_id: bytes) -> bytes:
        """Return a stored manifest; raise NotFound if absent."""

    def get_manifests(self, manifest_ids: Sequence[bytes]) -> list[bytes]:
        """:meth:`get_manifest` of each id, in order, in as few reads as the store allows."""
        return [self.get_manifest(manifest_id) for manifest_id in manifest_ids]

    @abstractmethod
    def has_manifests(self, manifest_ids: Sequence[bytes]) -> set[bytes]:
        """Return the ids among ``manifest_ids`` that are stored."""

    @abstractmethod
    def put_version(self, repo: str, version_id: bytes, data: bytes) -> None:
        """Store a version record durably; from then on it is visible (idempotent). A stored
        copy with other bytes is damaged: it is replaced if ``data`` hashes to the id (see
        :func:`replaces`)."""

    @abstractmethod
    def get_version(self, repo: str, version_id: bytes) -> bytes:
        """Return a version record; raise NotFound if absent."""

    @abstractmethod
    def list_versions(self, repo: str) -> list[tuple[bytes, bytes]]:
        """Return ``(id, record)`` for every version of ``repo``, in no particular order."""

    @abstractmethod
    def delete_version(self, repo: str, version_id: bytes) -> None:
        """Remove a version record and every tag that points at it; NotFound if absent."""

    @abstractmethod
    def list_repos(self) -> list[str]:
        """Names of repos with at least one version, sorted."""

    @abstractmethod
    def set_tag(self, repo: str, tag: str, version_id: bytes) -> None:
        """Point ``repo@tag`` at a stored version, creating or moving the tag; NotFound if the
        version is not stored."""

    @abstractmethod
    def delete_tag(self, repo: str, tag: str) -> None:
        """Remove a tag; NotFound if absent."""

    @abstractmethod
    def tags(self, repo: str) -> dict[str, bytes]:
        """All tags of ``repo``: name -> version id."""

    @abstractmethod
    def put_stage(self, stage_id: bytes, data: bytes, released: Collection[bytes] = ()) -> None:
        """Store a stage record durably, creating or replacing it; StageClaimed while a delete
        of it that carried a claimant is remembered here (only :meth:`restore_stage` by that
        claimant re-creates it then), unless that claimant is among ``released`` (it gave its
        claim up, see :meth:`release_claim`): the note of its delete is then dropped."""

    @abstractmethod
    def get_stage(self, stage_id: bytes) -> bytes:
        """Return a stage record; NotFound if absent."""

    @abstractmethod
    def put_stage_file(self, stage_id: bytes, path: str, data: bytes) -> None:
        """Record one file of a stage (replacing one of the same path); NotFound if the stage
        is absent."""

    @abstractmethod
    def stage_files(self, stage_id: bytes) -> dict[str, bytes]:
        """The files recorded for a stage: path -> record (empty if none or no stage)."""

    @abstractmethod
    def delete_stage(self, stage_id: bytes, claimant: bytes | None = None) -> None:
        """Remove a stage and its files; NotFound if absent, unless ``claimant`` (a token, see
        :func:`check_claimant`) made the last delete of it here and the store still remembers
        it (see :func:`kept_until`): a retry whose first try deleted it then succeeds again."""

    @abstractmethod
    def claim_stage(
        self, stage_id: bytes, claimant: bytes | None = None
    ) -> tuple[bytes, dict[str, bytes]]:
        """Remove a stage and its files, returning ``(record, files)`` as they were: of callers
        claiming one stage at once, exactly one gets it, the others NotFound (as they do if it
        is absent). ``claimant`` (a token, see :func:`check_claimant`) is noted as with
        :meth:`delete_stage`, so that the caller can :meth:`restore_stage` it."""

    @abstractmethod
    def restore_stage(
        self, stage_id: bytes, claimant: bytes, record: bytes, files: Mapping[str, bytes]
    ) -> None:
        """Put back a stage that ``claimant`` deleted (or claimed), with its record and files.

        It is re-created only if it is absent and the last delete of it was this claimant's,
        still remembered (see :func:`kept_until`); the claimant is then forgotten, so it is put
        back once. A stage that is there is left as it is. Otherwise StageClaimed: another claimant,
        an abort or GC deleted it since, and it stays deleted. So once a claimant deleted a
        stage, nobody but that claimant can make it exist again while the note is kept, unless
        it gives its claim up (:meth:`release_claim`)."""

    @abstractmethod
    def release_claim(self, stage_id: bytes, claimant: bytes, record: bytes) -> None:
        """Note that ``claimant`` gave up its claim of the stage whose record is ``record``
        (its commit fell short of a majority, and it could not put the stage back on every
        owner it deleted it from). The note is kept as long as that claimant's delete would
        be (:func:`kept_until`), so that repair can hand it on with a copy of the stage to an
        owner where the delete is still noted, which then accepts the copy (``released`` of
        :meth:`put_stage`); a note of that claimant's delete here is dropped. InvalidInput
        for a claimant of another size than :data:`CLAIMANT_BYTES`."""

    @abstractmethod
    def list_stages(self) -> list[tuple[bytes, bytes]]:
        """``(id, record)`` of every stage."""

    @abstractmethod
    def scan_manifests(self) -> Iterator[tuple[bytes, float]]:
        """Yield ``(id, stored_at)`` of every manifest once; stored_at is its last put's time."""

    @abstractmethod
    def delete_manifests(self, manifest_ids: Iterable[bytes]) -> int:
        """Remove these manifests where present; return how many were removed."""


class Store(ChunkStore, MetaStore):
    """A complete store: chunks and metadata. Use as a context manager or call :meth:`close`."""

    #: Human-readable location, shown in errors and ``stats``.
    location: str = ""
    #: The local directory holding the store's files, if it has one: a push leaves it out.
    directory: Path | None = None

    def check_may_collect(self) -> None:  # noqa: B027 - optional hook
        """Raise PermissionDenied unless this caller may delete chunks and manifests (what GC
        does), before GC does any work. A local store lets whoever opens it to write."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files, connections and threads."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
