"""Copying versions from one store to another: a laptop's embedded store to the team's
cluster, or a cluster's version into a local store to work offline.

A version is copied with the ancestors (parents, within its repo) the destination lacks, oldest
first, each as a push would write it: its chunks (the ones the destination lacks; those it
holds are marked wanted, as a push marks them, so a concurrent GC cannot take them), then its
manifests, then its version record, the same bytes under the same id. So a copy interrupted at
any point leaves the destination with whole versions only, and running it again finishes it.
Tags of the copied versions follow them, except a tag the destination already has on another
version, which is left as it is. Inputs of other repos (a base model) are not copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from chunkstore import codec
from chunkstore.batching import by_size
from chunkstore.model import Manifest, Version
from chunkstore.parallel import imap
from chunkstore.progress import NoProgress, Progress
from chunkstore.refs import load_versions, resolve
from chunkstore.stores.base import Store

#: Blob bytes read from the source and written to the destination at once.
BATCH_BYTES = 16 << 20
#: Batches being written at once, while the next is read.
PUTS_AT_ONCE = 2


@dataclass
class CopyResult:
    repo: str
    copied: list[Version] = field(default_factory=list)  # written to the destination, oldest first
    present: int = 0  # versions the destination held already
    chunks: int = 0  # chunks copied
    stored_bytes: int = 0  # their blob bytes
    tags: list[str] = field(default_factory=list)  # tags set on the destination
    kept_tags: list[str] = field(default_factory=list)  # left on another version there

    def to_json(self) -> dict:
        return {
            "repo": self.repo,
            "copied": [v.id.hex() for v in self.copied],
            "present": self.present,
            "chunks": self.chunks,
            "stored_bytes": self.stored_bytes,
            "tags": self.tags,
            "kept_tags": self.kept_tags,
        }


def copy_version(
    source: Store,
    dest: Store,
    ref: str,
    history: bool = True,
    progress: Progress | None = None,
) -> CopyResult:
    """Copy the version ``ref`` names from ``source`` to ``dest``, with its ancestors that
    ``dest`` lacks unless ``history`` is False. Progress goes over the copied versions' bytes,
    with the blob bytes copied as "new"; a blob that does not match its id stops the copy
    (CorruptChunk) before anything that needs it is written."""
    version = resolve(source, ref)
    repo = version.repo
    chain = _ancestors(version, load_versions(source, repo)) if history else [version]
    held = {vid for vid, _ in dest.list_versions(repo)}
    todo = [v for v in reversed(chain) if v.id not in held]
    result = CopyResult(repo, present=len(chain) - len(todo))
    progress = progress or NoProgress()
    progress.start(sum(v.size for v in todo), f"copy {version.ref}")
    try:
        with dest.writing():
            for v in todo:
                _copy_one(source, dest, v, result, progress)
                result.copied.append(v)
    finally:
        progress.finish()
    copied = {v.id for v in chain}
    there = dest.tags(repo)
    for tag, vid in sorted(source.tags(repo).items()):
        if vid not in copied or there.get(tag) == vid:
            continue
        if tag in there:
            result.kept_tags.append(tag)
            continue
        dest.set_tag(repo, tag, vid)
        result.tags.append(tag)
    return result


def _ancestors(version: Version, versions: Sequence[Version]) -> list[Version]:
    """``version`` and every ancestor of it among ``versions`` (its repo's), newest first."""
    by_id = {v.id: v for v in versions}
    out, seen, todo = [], {version.id}, [version]
    while todo:
        v = todo.pop()
        out.append(v)
        for parent in v.parents:
            if parent in by_id and parent not in seen:
                seen.add(parent)
                todo.append(by_id[parent])
    return sorted(out, key=lambda v: (v.created_ns, v.id), reverse=True)


def _copy_one(
    source: Store, dest: Store, version: Version, result: CopyResult, progress: Progress
) -> None:
    """Copy one version: its chunks the destination lacks, its manifests, its record."""
    manifest_ids = list(dict.fromkeys(f.manifest_id for f in version.files))
    records = list(zip(manifest_ids, source.get_manifests(manifest_ids), strict=True))
    wanted = list(
        dict.fromkeys(
            cid for mid, data in records for cid in Manifest.decode(mid, data).stored_ids()
        )
    )
    lacking = dest.lacking(wanted)
    share = version.size / max(1, len(wanted))  # of the version's bytes, per chunk: progress
    copy = [cid for cid in wanted if cid in lacking]
    _copy_chunks(source, dest, copy, result, progress, share)
    present = [cid for cid in wanted if cid not in lacking]
    gone = dest.mark_wanted(present) if present else set()  # taken by a GC meanwhile
    _copy_chunks(source, dest, [cid for cid in present if cid in gone], result, progress, 0)
    dest.put_manifests(records)
    dest.put_version(version.repo, version.id, source.get_version(version.repo, version.id))
    progress.advance(version.size - round(share * len(copy)))


def _copy_chunks(
    source: Store,
    dest: Store,
    ids: list[bytes],
    result: CopyResult,
    progress: Progress,
    share: float,
) -> None:
    """Copy blobs as they are (no re-encoding), each checked against its id first unless the
    destination checks what it receives itself (a cluster's nodes do). Reading the next
    batch overlaps writing the ones before (PUTS_AT_ONCE at a time)."""

    def put(batch: list[tuple[bytes, bytes]]) -> tuple[int, int]:
        if not dest.remote:
            for cid, blob in batch:
                codec.verified_buffer(cid, blob)  # raises CorruptChunk naming it
        dest.put(batch)
        return len(batch), sum(len(blob) for _, blob in batch)

    blobs = ((cid, bytes(blob)) for cid, blob in source.get(ids))
    batches = by_size(blobs, lambda pair: len(pair[1]), BATCH_BYTES)
    for chunks, size in imap(put, batches, PUTS_AT_ONCE, "copy-put", queued=1):
        result.chunks += chunks
        result.stored_bytes += size
        progress.advance(round(share * chunks), size)
