"""Copying versions from one store to another: a laptop's embedded store to the team's
cluster, or a cluster's version into a local store to work offline.

A version is copied with the ancestors (parents, within its repo) the destination lacks, oldest
first, each as a push would write it: its chunks (the ones the destination lacks; those it
holds are marked wanted, as a push marks them, so a concurrent GC cannot take them), then its
manifests, then its version record, the same bytes under the same id. So a copy interrupted at
any point leaves the destination with whole versions only, and running it again finishes it.
Tags of the copied versions follow them, except a tag the destination already has on another
version, which is left as it is.

Asked to, a copy also brings the versions of other repos a version was made from (its inputs: a
base model, a data set), the inputs of those, and so on, each with its ancestors as above. A
version is written after every version it names (parents and inputs) that is copied with it, so
the destination never holds a lineage link whose target is still to come.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from graphlib import TopologicalSorter

from chunkstore import codec
from chunkstore.batching import by_size
from chunkstore.model import Manifest, Version, VersionLink
from chunkstore.parallel import imap
from chunkstore.progress import NoProgress, Progress
from chunkstore.refs import left_out, load_versions, resolve
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
    inputs: list[CopyResult] = field(default_factory=list)  # other repos copied as inputs
    missing_inputs: list[VersionLink] = field(default_factory=list)  # inputs the source lacks

    def to_json(self) -> dict:
        out = {
            "repo": self.repo,
            "copied": [v.id.hex() for v in self.copied],
            "present": self.present,
            "chunks": self.chunks,
            "stored_bytes": self.stored_bytes,
            "tags": self.tags,
            "kept_tags": self.kept_tags,
        }
        if self.inputs or self.missing_inputs:
            out["inputs"] = [r.to_json() for r in self.inputs]
            out["missing_inputs"] = [str(link) for link in self.missing_inputs]
        return out


def copy_version(
    source: Store,
    dest: Store,
    ref: str,
    history: bool = True,
    progress: Progress | None = None,
    inputs: bool = False,
) -> CopyResult:
    """Copy the version ``ref`` names from ``source`` to ``dest``, with its ancestors that
    ``dest`` lacks unless ``history`` is False, and with ``inputs`` the versions of other
    repos it was made from (see the module's docstring). Progress goes over the copied
    versions' bytes, with the blob bytes copied as "new"; a blob that does not match its id
    stops the copy (CorruptChunk) before anything that needs it is written. A version record
    the source cannot read is not copied: a warning names it, and the versions made on it are
    copied as if it had been removed. The result is the named version's repo's, with one per
    other repo in ``inputs``."""
    version = resolve(source, ref, left_out)
    plan = _Plan(source, history, inputs)
    order = plan.order(version)
    repos = list(dict.fromkeys(v.repo for v in order))
    held = {repo: {vid for vid, _ in dest.list_versions(repo)} for repo in repos}
    fresh = [v for v in order if v.id not in held[v.repo]]
    results = {
        repo: CopyResult(repo, present=sum(v.repo == repo and v.id in held[repo] for v in order))
        for repo in repos
    }
    progress = progress or NoProgress()
    progress.start(sum(v.size for v in fresh), f"copy {version.ref}")
    try:
        with dest.writing():
            for v in fresh:
                _copy_one(source, dest, v, results[v.repo], progress)
                results[v.repo].copied.append(v)
    finally:
        progress.finish()
    for repo, result in results.items():
        _copy_tags(source, dest, {v.id for v in order if v.repo == repo}, result)
    main = results.pop(version.repo)
    main.inputs = list(results.values())
    main.missing_inputs = plan.missing
    return main


class _Plan:
    """The versions a copy writes: the named one, its ancestors and, if asked, its inputs,
    closed under the same rule; each repo's versions read from the source once."""

    def __init__(self, source: Store, history: bool, inputs: bool) -> None:
        self._source = source
        self._history = history
        self._inputs = inputs
        self._repos: dict[str, dict[bytes, Version]] = {}
        self.missing: list[VersionLink] = []

    def _versions(self, repo: str) -> dict[bytes, Version]:
        if repo not in self._repos:
            versions = load_versions(self._source, repo, on_unreadable=left_out)
            self._repos[repo] = {v.id: v for v in versions}
        return self._repos[repo]

    def _named(self, version: Version) -> list[Version]:
        """The versions ``version`` names that the copy brings along: its parents the source
        holds (one removed there is history cut short) and, if asked, its inputs (one the
        source lacks is reported in ``missing``)."""
        out = []
        if self._history:
            siblings = self._versions(version.repo)
            out += [siblings[p] for p in version.parents if p in siblings]
        for link in version.inputs if self._inputs else ():
            found = self._versions(link.repo).get(link.id)
            if found is not None:
                out.append(found)
            elif link not in self.missing:
                self.missing.append(link)
        return out

    def order(self, version: Version) -> list[Version]:
        """Every version to copy, each after the ones it names (the oldest first of those
        that are free to go)."""
        deps: dict[bytes, list[bytes]] = {}
        by_id = {version.id: version}
        todo = [version]
        while todo:
            v = todo.pop()
            named = self._named(v)
            deps[v.id] = [w.id for w in named]
            for w in named:
                if w.id not in by_id:
                    by_id[w.id] = w
                    todo.append(w)
        sorter = TopologicalSorter(deps)
        sorter.prepare()
        out: list[Version] = []
        while sorter.is_active():
            ready = sorted((by_id[vid] for vid in sorter.get_ready()), key=_age)
            out += ready
            sorter.done(*(v.id for v in ready))
        return out


def _age(version: Version) -> tuple[int, bytes]:
    return version.created_ns, version.id


def _copy_tags(source: Store, dest: Store, copied: set[bytes], result: CopyResult) -> None:
    """Set on ``dest`` the tags of ``result.repo`` that name a ``copied`` version, except one
    ``dest`` has on another version."""
    there = dest.tags(result.repo)
    for tag, vid in sorted(source.tags(result.repo).items()):
        if vid not in copied or there.get(tag) == vid:
            continue
        if tag in there:
            result.kept_tags.append(tag)
            continue
        dest.set_tag(result.repo, tag, vid)
        result.tags.append(tag)


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
