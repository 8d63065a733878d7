"""The repository layer: push, pull, log, show, diff, tag, rm, prune, gc, verify, stats, status.

Written once against the store protocol (:mod:`chunkstore.stores.base`), so it runs unchanged
on the embedded store and on a cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import itertools
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from chunkstore import codec, ids, lease
from chunkstore.batching import by_size
from chunkstore.chunking import ChunkerParams
from chunkstore.delta import BaseTensors, base_length, read_chunks
from chunkstore.dirlock import locked
from chunkstore.errors import (
    ChunkNotFound,
    ChunkstoreWarning,
    CorruptChunk,
    CorruptRecord,
    InvalidInput,
    NotFound,
    UnreadableVersion,
)
from chunkstore.ingest import (
    Ingester,
    IngestStats,
    PipelineLimits,
    has_tensor_index,
    local_manifest,
)
from chunkstore.model import (
    DeltaRef,
    FileEntry,
    Manifest,
    Version,
    VersionLink,
    check_tag_name,
    decode_version,
    encode_version,
    normalise_path,
    trusted_inputs,
)
from chunkstore.model import (
    check_repo_name as _check_repo_name,
)
from chunkstore.parallel import for_each
from chunkstore.progress import NoProgress, Progress
from chunkstore.refs import (
    OnUnreadable,
    Ref,
    latest,
    left_out,
    load_versions,
    newest_and_count,
    reads_as_id_prefix,
    resolve,
    unknown_repo,
    users_of,
)
from chunkstore.restore import (
    ChunkedReader,
    partial_path,
    restore_file,
    restore_new_files,
    stream_file,
)
from chunkstore.retention import KeepPolicy, plan
from chunkstore.reuse import holds
from chunkstore.staging import DEFAULT_STAGE_TTL, Stage, live_stage_manifests
from chunkstore.stores.base import Store
from chunkstore.targets import check_targets
from chunkstore.tensor_diff import TensorDiff, diff_tensors
from chunkstore.tensors import NO_INDEX, LazyTensors, tensor_files
from chunkstore.transfer import CopyResult, copy_version
from chunkstore.tree import PARTIAL, LocalTree, Skipped, list_tree, local_path

DEFAULT_GC_GRACE = 6 * 3600.0
GC_DELETE_BATCH = 4096  # chunk ids per delete call
#: From a remote store, where each call costs a round trip more than its bytes: files of at
#: most SMALL_FILE_BYTES pulled at once (those not fetched in batches).
REMOTE_CALLS_AT_ONCE = 8
SMALL_FILE_BYTES = 4 << 20
#: Manifests read in one call (one per node on a cluster).
MANIFESTS_AT_ONCE = 256
#: Small files new to a pull's destination are fetched in batches of this many bytes or files
#: at most (each file open while its batch is read).
SMALL_BATCH_BYTES = 64 << 20
SMALL_BATCH_FILES = 128
_VERIFY_BATCH = 256


@dataclass
class PushResult:
    version: Version
    stats: IngestStats
    skipped: list[Skipped] = field(default_factory=list)  # local paths left out, and why

    @property
    def dedup_ratio(self) -> float:
        """Share of the scanned bytes that were already stored."""
        scanned = self.stats.scanned_bytes
        return 1.0 - self.stats.new_raw_bytes / scanned if scanned else 1.0


@dataclass
class FileChange:
    path: str
    old_size: int | None = None
    new_size: int | None = None
    # bytes of the new file in chunks the old one lacks; None where not counted (status reads
    # a local file only up to its first changed chunk)
    changed_bytes: int | None = 0

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "old_size": self.old_size,
            "new_size": self.new_size,
            "changed_bytes": self.changed_bytes,
        }


@dataclass
class Diff:
    old: str | None  # None: compared with nothing (a repo's first version)
    new: str
    added: list[FileChange] = field(default_factory=list)
    removed: list[FileChange] = field(default_factory=list)
    modified: list[FileChange] = field(default_factory=list)
    unchanged: int = 0
    params: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    metrics: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)  # local paths a push would leave out

    def to_json(self) -> dict:
        return {
            "old": self.old,
            "new": self.new,
            "added": [c.to_json() for c in self.added],
            "removed": [c.to_json() for c in self.removed],
            "modified": [c.to_json() for c in self.modified],
            "unchanged": self.unchanged,
            "params": {k: {"old": a, "new": b} for k, (a, b) in self.params.items()},
            "metrics": {k: {"old": a, "new": b} for k, (a, b) in self.metrics.items()},
            "skipped": [s.to_json() for s in self.skipped],
        }


@dataclass
class VerifyResult:
    chunks: int = 0
    bytes: int = 0
    corrupt: list[bytes] = field(default_factory=list)
    missing: list[bytes] = field(default_factory=list)
    deltas: int = 0  # delta-coded chunks rebuilt and found to match their ids
    removed: int = 0  # corrupt chunks removed (repair)
    unreadable: list[UnreadableVersion] = field(default_factory=list)  # version records

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing and not self.unreadable


@dataclass
class GcResult:
    versions: int
    reachable_chunks: int
    deleted_chunks: int
    deleted_bytes: int
    spared_young: int
    deleted_manifests: int
    expired_stages: int
    dry_run: bool = False  # counts what a real run would delete; nothing was


@dataclass
class PruneResult:
    repo: str
    kept: list[tuple[Version, list[str]]]  # each kept version, newest first, with why
    removed: list[Version]  # newest first
    dry_run: bool = False  # lists what a real run would remove; nothing was
    # version records (of any repo) that cannot be read and might name a version of the repo
    # as an input: the versions they name stay
    unreadable: list[UnreadableVersion] = field(default_factory=list)


@dataclass
class UnreadableRemoved:
    """A version record :meth:`Repository.rm` removed without reading it (it cannot be read):
    its repo, its id and the tags that were on it (removed with it)."""

    repo: str
    id: bytes
    tags: list[str]


@dataclass
class RepoSummary:
    name: str
    versions: int
    latest: Version


def default_author() -> str:
    """``CHUNKSTORE_AUTHOR``, else ``user@host``."""
    if author := os.environ.get("CHUNKSTORE_AUTHOR"):
        return author
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class Repository:
    """Version management of model files over any :class:`Store`."""

    def __init__(
        self,
        store: Store,
        chunker: ChunkerParams = ChunkerParams(),
        limits: PipelineLimits = PipelineLimits(),
    ) -> None:
        self.store = store
        self.chunker = chunker
        self.limits = limits
        lease.prepare()  # made on the main thread: pushes from any thread can then be guarded

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------------------

    def push(
        self,
        path: str | os.PathLike,
        repo: str,
        message: str = "",
        tags: Sequence[str] = (),
        params: dict[str, str] | None = None,
        metrics: dict[str, float] | None = None,
        inputs: Sequence[str] = (),
        author: str | None = None,
        progress: Progress | None = None,
        delta_base: str | None = None,
        delta: bool = True,
    ) -> PushResult:
        """Store the file or directory at ``path`` as a new version of ``repo``.

        Only chunks the store lacks are uploaded. The version becomes visible (and its tags
        are set) only after every chunk and manifest it references is durable; an interrupted
        push leaves no version behind, and the next push reuses what was stored.

        Tensors (of safetensors and torch.save files) that a base version also has are stored
        as deltas against it where that is clearly smaller (see :mod:`chunkstore.delta`). The
        base of a tensor is the first of ``inputs`` that has it (a fine-tune's base model), else
        the repo's latest version; ``delta_base`` names the one base instead; ``delta=False``
        stores every chunk on its own.
        """
        _check_repo_name(repo)
        for tag in tags:
            check_tag_name(tag)
        params = _check_params(params or {})
        metrics = _check_metrics(metrics or {})
        sources = [self.resolve(r) for r in inputs]
        links = [VersionLink(v.repo, v.id) for v in sources]
        if delta_base is not None and not delta:
            raise InvalidInput("--delta-base and --no-delta contradict each other")
        bases = [self.resolve(delta_base)] if delta_base is not None else None
        tree = self.local_tree(path)
        if not tree.files:
            raise InvalidInput(f"nothing to push: {path} holds no files")
        base = partial(self.delta_bases, repo, sources, bases) if delta else None
        entries, stats = self.store_tree(tree.files, f"push {repo}", progress, base)
        version = self.commit_version(
            repo, entries, message, params, metrics, links, author, tags, stats.new_stored_bytes
        )
        return PushResult(version, stats, tree.skipped)

    def local_tree(self, path: str | os.PathLike) -> LocalTree:
        """What a push of ``path`` stores and leaves out (see :func:`~chunkstore.tree.list_tree`);
        the store's own directory, if it lies under ``path``, is left out."""
        return list_tree(local_path(path), self.store.directory)

    def store_tree(
        self,
        tree: list[tuple[str, Path]],
        label: str,
        progress: Progress | None = None,
        base: Callable[[], BaseTensors | None] | None = None,
    ) -> tuple[list[FileEntry], IngestStats]:
        """Store the chunks and manifests of ``(stored path, local path)`` pairs durably,
        coding deltas against the tensors ``base`` gives where they pay (it is called once a
        file with tensors comes up: a tree of plain files reads no base manifest)."""
        progress = progress or NoProgress()
        progress.start(sum(local.stat().st_size for _, local in tree), label)
        with self.store.writing():
            ingester = Ingester(self.store, self.chunker, self.limits, progress, base)
            try:
                modes = []
                for name, local in tree:
                    # A file's mode is read with it: it may be gone by the end (see ingest).
                    modes.append(local.stat().st_mode & 0o777)
                    ingester.ingest_file(local, name)
                stats = ingester.finish()
                manifests = [
                    (name, mode, manifest)
                    for (name, _), mode, manifest in zip(
                        tree, modes, ingester.manifests, strict=True
                    )
                ]
            finally:
                ingester.close()
                progress.finish()
            entries = []
            records = []
            for name, mode, manifest in manifests:
                manifest_id, data = manifest.encode()
                records.append((manifest_id, data))
                entries.append(FileEntry(name, manifest.size, manifest.digest, manifest_id, mode))
            self.store.put_manifests(records)
        return entries, stats

    def delta_bases(
        self,
        repo: str,
        inputs: Sequence[Version] = (),
        bases: Sequence[Version] | None = None,
    ) -> BaseTensors | None:
        """The tensors a push to ``repo`` codes deltas against: those of ``bases`` if given,
        else of ``inputs`` (in order) then of the repo's latest version; None if there are
        none."""
        if bases is None:
            newest = latest(self.store, repo, left_out)
            bases = [*inputs, *([newest] if newest else [])]
        versions = []
        for version in {(v.repo, v.id): v for v in bases}.values():
            versions.append(self._manifests_by_path(version))
        base = BaseTensors(versions)
        return base if base else None

    def commit_version(
        self,
        repo: str,
        entries: list[FileEntry],
        message: str,
        params: dict[str, str],
        metrics: dict[str, float],
        links: list[VersionLink],
        author: str | None,
        tags: Sequence[str],
        new_bytes: int,
    ) -> Version:
        """Write a version record over durable files (the latest version is its parent), then
        its tags. Callers check the arguments first."""
        parent = latest(self.store, repo, left_out)
        vid, record = encode_version(
            repo=repo,
            parents=[parent.id] if parent else [],
            created_ns=time.time_ns(),
            author=author or default_author(),
            message=message,
            files=entries,
            params=params,
            metrics=metrics,
            inputs=list(dict.fromkeys(links)),  # a version named twice is recorded once
            new_bytes=new_bytes,
        )
        self.store.put_version(repo, vid, record)
        for tag in tags:
            self.store.set_tag(repo, tag, vid)
        return decode_version(repo, vid, record, list(tags))

    # -- multi-process saves ------------------------------------------------------------------

    def stage(
        self,
        repo: str,
        message: str = "",
        tags: Sequence[str] = (),
        params: dict[str, str] | None = None,
        metrics: dict[str, float] | None = None,
        inputs: Sequence[str] = (),
        author: str | None = None,
        ttl_seconds: float = DEFAULT_STAGE_TTL,
    ) -> Stage:
        """Open a stage: a version that several processes fill and one commits atomically.

        Pass ``stage.id`` to the other processes; each calls :meth:`stage_add`; then one calls
        ``stage.commit()`` (or ``abort()``). A stage not committed within ``ttl_seconds``
        expires, and the chunks its files uploaded fall to GC after the grace period.
        """
        _check_repo_name(repo)
        for tag in tags:
            check_tag_name(tag)
        links = [VersionLink(v.repo, v.id) for v in (self.resolve(r) for r in inputs)]
        return Stage.create(
            self,
            repo=repo,
            message=message,
            tags=list(tags),
            params=_check_params(params or {}),
            metrics=_check_metrics(metrics or {}),
            inputs=links,
            author=author or default_author(),
            ttl_seconds=ttl_seconds,
        )

    def open_stage(self, stage_id: str) -> Stage:
        """A handle on a stage another process opened."""
        return Stage.open(self, stage_id)

    def stage_add(
        self,
        stage_id: str,
        path: str | os.PathLike,
        as_path: str | None = None,
        progress: Progress | None = None,
    ) -> list[FileEntry]:
        """Upload a file or directory into a stage (see :meth:`Stage.add`)."""
        return self.open_stage(stage_id).add(path, as_path, progress)

    def tag(self, ref: str, tag: str) -> Version:
        """Point ``tag`` at the version ``ref`` names (moving it if it exists).

        A tag that reads as the id prefix of another version of the repo is refused: refs
        look up tags first, so it would hide that version.
        """
        check_tag_name(tag)
        version = self.resolve(ref)
        if reads_as_id_prefix(tag):
            for other in self.log(version.repo):
                if other.id != version.id and other.id.hex().startswith(tag.lower()):
                    raise InvalidInput(
                        f"tag {tag!r} would hide {other.ref}, whose id starts with it: "
                        "choose another name"
                    )
        self.store.set_tag(version.repo, tag, version.id)
        return self.resolve(f"{version.repo}@{version.short_id}")

    def tagged(self, repo: str, tag: str) -> bytes | None:
        """The id of the version ``tag`` of ``repo`` points at, or None if there is no such
        tag."""
        return self.store.tags(_check_repo_name(repo)).get(check_tag_name(tag))

    def untag(self, repo: str, tag: str) -> None:
        self.store.delete_tag(_check_repo_name(repo), check_tag_name(tag))

    def rm(self, ref: str) -> Version | UnreadableRemoved:
        """Remove a version record and its tags; its chunks go at the next ``gc``. Returns the
        version, with the tags that were on it.

        A record that cannot be read (see :func:`~chunkstore.model.decode_version`) is removed
        too when ``ref`` names it (by a tag or an id prefix): then only its repo, its id and
        the tags that were on it are returned, as an :class:`UnreadableRemoved`.
        """
        try:
            version: Version | UnreadableRemoved = self.resolve(ref)
        except UnreadableVersion as e:
            tags = sorted(t for t, vid in self.store.tags(e.repo).items() if vid == e.version_id)
            version = UnreadableRemoved(e.repo, e.version_id, tags)
        self.store.delete_version(version.repo, version.id)
        return version

    def prune(self, repo: str, policy: KeepPolicy, dry_run: bool = False) -> PruneResult:
        """Remove the versions of ``repo`` that ``policy`` does not keep (see
        :mod:`chunkstore.retention`: the newest, tagged versions and inputs of kept ones always
        stay); their chunks go at the next ``gc``. With ``dry_run`` nothing is removed.

        Each removal is one record deleted: an interrupted prune leaves every version either
        whole or gone, and running it again finishes it.

        A version record that cannot be read (of ``repo``, or of another repo if it might name
        one of ``repo``'s) is never removed, and every version of ``repo`` that its input links
        name, as far as it parses, stays; each is named in a ChunkstoreWarning and in
        ``unreadable``. One whose inputs are unknown (it does not parse, or a link names a
        version of ``repo`` that is not there: its id may be what was damaged) stops the
        prune, removing nothing (CorruptRecord naming each), unless nothing would be removed.
        """
        if policy.empty:
            raise InvalidInput(
                "prune needs a keep rule (--keep-last, --keep-within, --keep-lowest or "
                "--keep-highest); to remove one version use rm"
            )
        found: list[tuple[UnreadableVersion, bytes | None]] = []
        versions = load_versions(
            self.store, _check_repo_name(repo), on_unreadable=lambda e: found.append((e, None))
        )
        others = users_of(self.store, repo, on_unreadable=lambda e, data: found.append((e, data)))
        if not versions and not found:
            raise unknown_repo(self.store, repo)
        own = dict(self.store.list_versions(repo)) if found else {}
        read = [(e, own[e.version_id] if data is None else data) for e, data in found]
        pinned, unknown = _inputs_of_unreadable(repo, read, {v.id for v in versions})
        decided = plan(versions, policy, others, pinned)
        kept = [(v, why) for v, why in decided if why]
        removed = [v for v, why in decided if not why]
        if unknown and removed:
            it, names = ("it", "it names") if len(unknown) == 1 else ("them", "they name")
            raise CorruptRecord(
                f"prune removed nothing: {'; '.join(str(e) for e in unknown)}, so which "
                f"versions {names} as inputs is unknown; restore from a copy of the store, or "
                f"remove {it} ({', '.join(_rm_hint(e) for e in unknown)}), then prune again"
            )
        for error, _ in found:
            warnings.warn(
                f"{error}; prune keeps every version of {repo!r} it names as an input",
                ChunkstoreWarning,
                stacklevel=2,
            )
        if not dry_run:
            for v in removed:
                self.store.delete_version(v.repo, v.id)
        return PruneResult(repo, kept, removed, dry_run, [e for e, _ in found])

    def copy(
        self,
        ref: str,
        dest: Repository,
        history: bool = True,
        progress: Progress | None = None,
        inputs: bool = False,
    ) -> CopyResult:
        """Copy the version ``ref`` names into ``dest`` (another store), with the ancestors
        ``dest`` lacks unless ``history`` is False, with ``inputs`` the versions of other repos
        it was made from (a base model) likewise, and their tags; see
        :mod:`chunkstore.transfer`. Copying again copies nothing."""
        return copy_version(self.store, dest.store, ref, history, progress, inputs)

    # -- reading -----------------------------------------------------------------------------

    def resolve(self, ref: str | Ref) -> Version:
        """The version ``ref`` names (see :func:`~chunkstore.refs.resolve`): a record that
        cannot be read raises UnreadableVersion if it is the one named, else it is left out
        with a :class:`~chunkstore.errors.ChunkstoreWarning`."""
        return resolve(self.store, ref, left_out)

    def log(self, repo: str, limit: int | None = None) -> list[Version]:
        """Versions of ``repo``, newest first; the newest ``limit`` of them if given. Records
        that cannot be read are left out, each with a
        :class:`~chunkstore.errors.ChunkstoreWarning` naming it, so the others still list."""
        if limit is not None and limit < 1:
            raise InvalidInput(f"a log limit must be at least 1, not {limit}")
        unreadable: list[UnreadableVersion] = []
        versions = load_versions(self.store, _check_repo_name(repo), limit, unreadable.append)
        if not versions and not unreadable:
            raise unknown_repo(self.store, repo)
        for error in unreadable:
            left_out(error)
        return versions

    def repos(self) -> list[RepoSummary]:
        """Each repo with its count of versions and its newest one; records that cannot be
        read are left out, with a warning, as by :meth:`log` (a repo none of whose records
        can be read is left out entirely)."""
        out = []
        for name in self.store.list_repos():
            newest, count = newest_and_count(self.store, name, left_out)
            if newest is not None:
                out.append(RepoSummary(name, count, newest))
        return out

    def lineage(self, ref: str, depth: int = 8) -> list[tuple[int, Version | VersionLink]]:
        """The versions ``ref`` was made from, recursively: (depth, version or dangling link)."""
        out: list[tuple[int, Version | VersionLink]] = []

        def walk(version: Version, level: int) -> None:
            if level > depth:
                return
            for link in version.inputs:
                try:
                    source = resolve(self.store, Ref(link.repo, link.id.hex()), left_out)
                except NotFound:
                    out.append((level, link))
                    continue
                except UnreadableVersion as e:  # shown as a dangling link, with a warning
                    left_out(e)
                    out.append((level, link))
                    continue
                out.append((level, source))
                walk(source, level + 1)

        walk(self.resolve(ref), 1)
        return out

    def manifest(self, entry: FileEntry) -> Manifest:
        return Manifest.decode(entry.manifest_id, self.store.get_manifest(entry.manifest_id))

    def _manifests(self, entries: Iterable[FileEntry]) -> Iterator[Manifest]:
        """The manifests of ``entries``, in order; from a remote store several at a time."""
        return self._manifests_by_id(entry.manifest_id for entry in entries)

    def _manifests_by_path(self, version: Version) -> dict[str, Manifest]:
        paths = [f.path for f in version.files]
        return dict(zip(paths, self._manifests(version.files), strict=True))

    def _manifests_by_id(self, manifest_ids: Iterable[bytes]) -> Iterator[Manifest]:
        """The manifests, in order, read MANIFESTS_AT_ONCE at a time."""
        ids_iter = iter(manifest_ids)
        while batch := list(itertools.islice(ids_iter, MANIFESTS_AT_ONCE)):
            for manifest_id, data in zip(batch, self.store.get_manifests(batch), strict=True):
                yield Manifest.decode(manifest_id, data)

    @property
    def _calls_at_once(self) -> int:
        """Small files pulled at once: on a remote store each costs a round trip more than its
        bytes."""
        return REMOTE_CALLS_AT_ONCE if self.store.remote else 1

    def pull(
        self,
        ref: str,
        dest: str | os.PathLike,
        force: bool = False,
        progress: Progress | None = None,
        files: Sequence[str] | None = None,
    ) -> Version:
        """Recreate the tree of ``ref`` under ``dest``; every byte is verified on the way.

        ``dest`` must not exist or be an empty directory, unless ``force``: files of the
        version then replace files of the same name, and the chunks such a file already holds
        are copied from it instead of fetched (see :mod:`chunkstore.reuse`); one that already
        holds all of this version's bytes (each chunk hashed at its offsets) is left in place.
        With ``files`` (see :func:`select_files`), only the files they match are written.

        An interrupted pull resumes: the files it completed are in place, what it wrote of
        the next one is kept beside it, and the same pull run again with ``force`` keeps both,
        fetching only what is missing. Pulls into one ``dest`` take turns (see
        :mod:`chunkstore.dirlock`): with ``force``, the ranks of a job pulling the same version
        into one directory fetch it once, and the later ones find its files in place.
        """
        version = self.resolve(ref)
        entries = version.files if files is None else select_files(version, files)
        dest = local_path(dest)
        if dest.exists() and not dest.is_dir():
            raise InvalidInput(f"destination {dest} exists and is not a directory")
        targets = [dest.joinpath(*normalise_path(e.path).split("/")) for e in entries]
        created = not dest.exists()
        dest.mkdir(parents=True, exist_ok=True)
        try:
            with locked(dest):
                if any(dest.iterdir()) and not force:
                    if _holds_partials(dest):
                        raise InvalidInput(
                            f"destination {dest} holds an interrupted pull "
                            "(use --force to resume it)"
                        )
                    raise InvalidInput(
                        f"destination {dest} is not empty (use --force to write into it)"
                    )
                check_targets(dest, targets)
                self._pull_into(version, entries, targets, progress)
        except BaseException:
            if created:  # a pull that wrote nothing leaves no directory behind
                with contextlib.suppress(OSError):
                    dest.rmdir()
            raise
        return version

    def _pull_into(
        self,
        version: Version,
        entries: Sequence[FileEntry],
        targets: Sequence[Path],
        progress: Progress | None,
    ) -> None:
        """Write each of ``entries`` of ``version`` to its target, in a destination the
        caller holds locked."""
        manifests = self._manifests(entries)
        plan = list(zip(targets, entries, manifests, strict=True))
        progress = progress or NoProgress()
        progress.start(sum(entry.size for entry in entries), f"pull {version.ref}")

        def restore(item: tuple[Path, FileEntry, Manifest]) -> None:
            target, entry, manifest = item
            _make_parent(target)
            if target.is_dir():
                raise InvalidInput(f"cannot write {target}: a directory is in the way")
            old = target if target.is_file() else None  # a file being replaced: reuse it
            restore_file(
                self.store, manifest, target, progress, mode=entry.mode or 0o644, reuse=old
            )

        # Small files cost a round trip each more than their bytes. Those new to the
        # destination are fetched in batches, one read each; the others several at once from
        # a remote store. Large ones are read one at a time, each from every node in parallel.
        new, others = [], []
        for item in plan:
            if item[1].size <= SMALL_FILE_BYTES:
                (new if _new_plain_file(*item) else others).append(item)
        try:
            for batch in by_size(
                new, lambda item: item[1].size, SMALL_BATCH_BYTES, SMALL_BATCH_FILES
            ):
                for target, _, _ in batch:
                    _make_parent(target)
                restore_new_files(
                    self.store, [(m, t, e.mode or 0o644) for t, e, m in batch], progress
                )
            for_each(restore, others, self._calls_at_once, "pull")
            for item in plan:
                if item[1].size > SMALL_FILE_BYTES:
                    restore(item)
        finally:
            progress.finish()

    def write_file(self, ref: str, path: str, out: BinaryIO) -> FileEntry:
        """Write one file of a version to ``out`` (a binary stream), in order, every chunk
        verified: for streaming a whole file, several times faster than reading :meth:`open`."""
        entry = self.resolve(ref).file(normalise_path(path))
        stream_file(self.store, self.manifest(entry), out)
        return entry

    def open(self, ref: str, path: str) -> ChunkedReader:
        """A seekable, read-only file object over one file of a version."""
        version = self.resolve(ref)
        entry = version.file(normalise_path(path))
        return ChunkedReader(self.store, self.manifest(entry), name=entry.path)

    def diff(self, ref_a: str | None, ref_b: str) -> Diff:
        """How version ``ref_b`` differs from ``ref_a``; from nothing (every file added) if
        ``ref_a`` is None."""
        b = self.resolve(ref_b)
        a = (
            self.resolve(ref_a)
            if ref_a is not None
            else dataclasses.replace(b, files=[], params={}, metrics={})
        )
        result = Diff(old=a.ref if ref_a is not None else None, new=b.ref)
        old = {f.path: f for f in a.files}
        new = {f.path: f for f in b.files}
        for path in sorted(old.keys() | new.keys()):
            fa, fb = old.get(path), new.get(path)
            if fa is None:
                result.added.append(FileChange(path, None, fb.size, fb.size))
            elif fb is None:
                result.removed.append(FileChange(path, fa.size, None, 0))
            elif fa.digest != fb.digest:
                old_ids = {cid for cid, _ in self.manifest(fa).chunks}
                changed = sum(n for cid, n in self.manifest(fb).chunks if cid not in old_ids)
                result.modified.append(FileChange(path, fa.size, fb.size, changed))
            else:
                result.unchanged += 1
        for key in sorted(a.params.keys() | b.params.keys()):
            if a.params.get(key) != b.params.get(key):
                result.params[key] = (a.params.get(key), b.params.get(key))
        for key in sorted(a.metrics.keys() | b.metrics.keys()):
            if a.metrics.get(key) != b.metrics.get(key):
                result.metrics[key] = (a.metrics.get(key), b.metrics.get(key))
        return result

    def status(self, path: str | os.PathLike, repo: str, progress: Progress | None = None) -> Diff:
        """How the files at ``path`` differ from the latest version of ``repo``.

        A file whose size matches is read where the version has each of its chunks, and is
        unchanged if every chunk's bytes hash to its id (see :func:`~chunkstore.reuse.holds`);
        the first chunk that differs ends the reading. ``progress`` counts the bytes read.
        """
        newest = self._newest(repo)
        stored = {f.path: f for f in newest.files}
        result = Diff(old=newest.ref, new=str(path))
        tree = self.local_tree(path)
        result.skipped = tree.skipped
        local = {name: (file, file.stat().st_size) for name, file in tree.files}
        same_size = [
            (name, entry, local[name][0])
            for name, entry in stored.items()
            if name in local and local[name][1] == entry.size
        ]
        progress = progress or NoProgress()
        progress.start(sum(entry.size for _, entry, _ in same_size), f"status {path}")
        try:
            unchanged = {
                name
                for name, entry, file in same_size
                if holds(self.manifest(entry), file, progress)
            }
        finally:
            progress.finish()
        for name in sorted(stored.keys() | local.keys()):
            entry, (file, size) = stored.get(name), local.get(name, (None, None))
            if entry is None:
                result.added.append(FileChange(name, None, size, size))
            elif file is None:
                result.removed.append(FileChange(name, entry.size, None, 0))
            elif name in unchanged:
                result.unchanged += 1
            else:
                result.modified.append(FileChange(name, entry.size, size, None))
        return result

    def status_tensors(
        self,
        path: str | os.PathLike,
        repo: str,
        stats: bool = False,
        tree: LocalTree | None = None,
        progress: Progress | None = None,
    ) -> list[TensorDiff]:
        """Tensor-level differences between the files with tensors (safetensors, torch.save) at
        ``path`` and the repo's latest version (see :meth:`tensor_diff`); nothing is stored. A
        local file is cut as a push would cut it against that version and hashed; one that
        :meth:`status` finds unchanged is not read at all. ``tree`` is :meth:`local_tree` of
        ``path``, if the caller has listed it already (to report what it leaves out).
        ``progress`` follows each local file as it is checked against the stored one, or cut
        and hashed, then, with ``stats``, the comparison."""
        newest = self._newest(repo)
        stored = self._manifests_by_path(newest)
        base = BaseTensors([stored])
        progress = progress or NoProgress()
        mine: dict[str, Manifest] = {}
        read: dict[str, Path] = {}
        candidates: list[tuple[str, Path, Manifest | None]] = []
        for name, file in (tree or self.local_tree(path)).files:
            manifest = stored.get(name)
            if manifest is None or not manifest.tensors:
                if not has_tensor_index(file):
                    continue
                manifest = None
            candidates.append((name, file, manifest))
        try:
            for name, file, manifest in candidates:
                size = file.stat().st_size
                if manifest is not None and size == manifest.size:
                    progress.start(size, f"checking {name}")
                    if holds(manifest, file, progress):
                        mine[name] = manifest
                        continue
                progress.start(size, f"hashing {name}")
                mine[name] = local_manifest(file, self.chunker, base, name, progress)
                read[name] = file
        finally:
            progress.finish()
        if not any(m.tensors for m in [*mine.values(), *stored.values()]):
            raise InvalidInput(f"{path} and {newest.ref} hold no safetensors or torch.save file")
        return diff_tensors(self.store, stored, mine, stats, local=read, progress=progress)

    def open_safetensors(self, ref: str, path: str, framework: str = "np") -> LazyTensors:
        """A lazy mapping name -> tensor over one stored safetensors (or torch.save) file."""
        version = self.resolve(ref)
        entry = version.file(normalise_path(path))
        manifest = self.manifest(entry)
        tensor_files(version, {entry.path: manifest}, entry.path)
        return LazyTensors(self.store, manifest, entry.path, framework)

    def load_tensors(
        self,
        ref: str,
        names: str | Sequence[str],
        file: str | None = None,
        framework: str = "np",
    ) -> dict[str, Any]:
        """Load the tensors whose names match ``names`` (names or glob patterns), fetching only
        the chunks they cover. Searches every file with tensors of the version unless ``file``.

        A pattern that is a tensor's exact name means that tensor alone (``blocks[0].w`` is not
        read as a glob). NotFound if a pattern matches nothing; InvalidInput, before anything
        is fetched, if a matched name is in several files (pass ``file``).
        """
        patterns = [names] if isinstance(names, str) else list(names)
        version = self.resolve(ref)
        manifests = self._manifests_by_path(version)
        paths = tensor_files(version, manifests, file)
        holders: dict[str, list[str]] = {}  # name -> the files that have it, in path order
        for path in paths:
            for tensor in manifests[path].tensors:
                holders.setdefault(tensor.name, []).append(path)
        wanted: dict[str, None] = {}
        for pattern in patterns:
            matched = (
                [pattern]
                if pattern in holders
                else [name for name in holders if fnmatchcase(name, pattern)]
            )
            if not matched:
                raise NotFound(f"no tensor of {version.ref} matches {pattern!r}")
            wanted.update(dict.fromkeys(matched))
        shared = [name for name in wanted if len(holders[name]) > 1]
        if shared:
            more = f" (and {len(shared) - 1} more such tensors)" if len(shared) > 1 else ""
            raise InvalidInput(
                f"tensor {shared[0]!r} is in {len(holders[shared[0]])} files of {version.ref}: "
                f"{', '.join(holders[shared[0]])}{more}; pass file= to load from one of them"
            )
        out: dict[str, Any] = {}
        for path in paths:  # each file front to back
            chosen = [t.name for t in manifests[path].tensors if t.name in wanted]
            if chosen:
                lazy = LazyTensors(self.store, manifests[path], path, framework)
                out.update((name, lazy[name]) for name in chosen)
        return out

    def tensor_diff(
        self,
        ref_a: str,
        ref_b: str,
        file: str | None = None,
        stats: bool = False,
        progress: Progress | None = None,
    ) -> list[TensorDiff]:
        """Tensor-level differences between two versions: tensors matched by name across their
        files (a checkpoint saved in other shards compares tensor by tensor), or only those of
        ``file`` in each (see :mod:`chunkstore.tensor_diff`); with ``stats``, ``progress``
        follows the comparison."""
        a, b = self.resolve(ref_a), self.resolve(ref_b)
        old, new = self._manifests_by_path(a), self._manifests_by_path(b)
        if file is not None:
            if file not in old and file not in new:
                raise NotFound(f"{a.ref} and {b.ref} have no file {file!r}")
            old = {file: old[file]} if file in old else {}
            new = {file: new[file]} if file in new else {}
        # a side without tensors (the file went, or no longer parses) has none to compare
        if not any(m.tensors for m in [*old.values(), *new.values()]):
            what = f"{file} has no tensor index in either" if file else "no file has a tensor index"
            raise InvalidInput(f"{a.ref} and {b.ref}: {what} ({NO_INDEX})")
        return diff_tensors(self.store, old, new, stats, progress=progress)

    def stats(self) -> dict:
        """Counts and sizes of the whole store; version records that cannot be read are left
        out of them, each with a :class:`~chunkstore.errors.ChunkstoreWarning`."""
        totals = self.store.totals()
        versions = 0
        logical = 0
        repos = self.store.list_repos()
        for v in self._all_versions(left_out):
            versions += 1
            logical += v.size
        return {
            "location": self.store.location,
            "repos": len(repos),
            "versions": versions,
            "logical_bytes": logical,
            "stored_bytes": totals.stored_bytes,
            "chunks": totals.chunks,
            "dedup_ratio": (logical / totals.stored_bytes) if totals.stored_bytes else None,
        }

    # -- integrity and space -----------------------------------------------------------------

    def verify(
        self, ref: str | None = None, progress: Progress | None = None, repair: bool = False
    ) -> VerifyResult:
        """Re-read and re-hash every chunk reachable from ``ref`` (or from every version).

        Every stored chunk (plain chunks, and the delta and base of delta-coded ones) is
        checked against its id; then every delta-coded chunk whose parts are intact is rebuilt
        and checked against its own id. A chunk that fails is listed as corrupt or missing. A
        version record that cannot be read is listed as unreadable (its chunks are unknown);
        named by ``ref``, it raises UnreadableVersion.

        With ``repair`` (an embedded store only: a cluster's nodes replace a corrupt copy from
        another replica themselves), the corrupt chunks are removed, so that pushing the files
        that held them again stores them anew; a push otherwise finds them present.
        """
        if repair and self.store.remote:
            raise InvalidInput(
                "a cluster's nodes replace a corrupt copy from another replica themselves; "
                "to restore missing replicas use chunkstore cluster repair"
            )
        if repair:  # it deletes chunks, as GC does: a store that refuses says so before the work
            self.store.check_may_collect()
        result = self._verify(ref, progress)
        if repair and result.corrupt:
            result.removed = self.store.delete(result.corrupt)
        return result

    def _verify(self, ref: str | None, progress: Progress | None) -> VerifyResult:
        unreadable: list[UnreadableVersion] = []
        versions = [self.resolve(ref)] if ref else list(self._all_versions(unreadable.append))
        chunk_ids: dict[bytes, int] = {}
        rebuilt: dict[bytes, tuple[DeltaRef, int]] = {}
        for manifest in self._manifests(entry for v in versions for entry in v.files):
            for i, (cid, length) in enumerate(manifest.chunks):
                delta = manifest.deltas.get(i)
                if delta is None:
                    chunk_ids[cid] = length
                    continue
                rebuilt.setdefault(cid, (delta, length))
                chunk_ids.setdefault(delta.delta, length)
                chunk_ids.setdefault(delta.base, base_length(length, delta.transform))
        progress = progress or NoProgress()
        progress.start(sum(chunk_ids.values()) + sum(n for _, n in rebuilt.values()), "verify")
        result = VerifyResult(unreadable=unreadable)
        try:
            todo = list(chunk_ids)
            for i in range(0, len(todo), _VERIFY_BATCH):
                for cid, outcome in self._check_chunks(todo[i : i + _VERIFY_BATCH]):
                    if outcome == "missing":
                        result.missing.append(cid)
                    elif outcome == "corrupt":
                        result.corrupt.append(cid)
                    else:
                        result.chunks += 1
                        result.bytes += chunk_ids[cid]
                    progress.advance(chunk_ids[cid])
            bad = {*result.missing, *result.corrupt}
            todo = [x for x, (d, _) in rebuilt.items() if not {d.delta, d.base} & bad]
            refs = {x: d for x, (d, _) in rebuilt.items()}
            for i in range(0, len(todo), _VERIFY_BATCH):
                for cid, intact in self._check_rebuilt(todo[i : i + _VERIFY_BATCH], refs):
                    if intact:
                        result.deltas += 1
                    else:
                        result.corrupt.append(cid)
                    progress.advance(rebuilt[cid][1])
        finally:
            progress.finish()
        return result

    def _check_rebuilt(
        self, batch: list[bytes], refs: dict[bytes, DeltaRef]
    ) -> Iterator[tuple[bytes, bool]]:
        """Rebuild delta-coded chunks; ``(id, whether its bytes match it)`` for each."""
        try:
            done = [cid for cid, _ in read_chunks(self.store, batch, refs)]
        except (ChunkNotFound, CorruptChunk):
            for cid in batch:  # find which failed
                try:
                    for _ in read_chunks(self.store, [cid], refs):
                        pass
                except (ChunkNotFound, CorruptChunk):
                    yield cid, False
                else:
                    yield cid, True
            return
        for cid in done:
            yield cid, True

    def _check_chunks(self, batch: list[bytes]) -> Iterator[tuple[bytes, str]]:
        try:
            blobs = list(self.store.get(batch))
        except ChunkNotFound:
            for cid in batch:
                try:
                    blobs = list(self.store.get([cid]))
                except ChunkNotFound:
                    yield cid, "missing"
                    continue
                yield cid, _check_blob(cid, blobs[0][1])
            return
        for cid, blob in blobs:
            yield cid, _check_blob(cid, blob)

    def gc(
        self,
        grace_seconds: float = DEFAULT_GC_GRACE,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> GcResult:
        """Delete chunks and manifests no version references and nobody wanted lately.

        A chunk is spared while younger than ``grace_seconds`` (since it was stored or last
        found by an existence check), so a push in flight never loses what it relies on. With
        ``dry_run`` nothing is deleted (expired stages included): the result counts what
        would be. ``progress`` follows the reading of the live manifests (in bytes of the files
        they describe), then the scan of the stored chunks and their deletion (in stored bytes).

        A version record that cannot be read may reference any chunk, so GC stops before
        deleting anything (CorruptRecord naming it) until the record is restored or removed.
        """
        if grace_seconds < 0 or math.isnan(grace_seconds):
            raise InvalidInput("grace period must be >= 0 seconds")
        self.store.check_may_collect()  # a dry run too: it would fail for real otherwise
        started = time.time()
        try:
            versions = list(self._all_versions())
        except UnreadableVersion as e:
            raise CorruptRecord(
                f"gc deleted nothing: {e}, and the chunks it uses cannot be told from garbage; "
                f"restore it from a copy of the store, or remove it ({_rm_hint(e)}), then run "
                "gc again"
            ) from None
        live_manifests, stages_dropped = live_stage_manifests(self.store, drop=not dry_run)
        # each version's manifest with the size of the file it describes, which the bar counts
        described = {f.manifest_id: f.size for v in versions for f in v.files}
        live_manifests.update(described)
        live_chunks: set[bytes] = set()
        progress = progress or NoProgress()
        reading = list(live_manifests)
        progress.start(sum(described.values()), "gc: reading manifests")
        try:
            for mid, manifest in zip(reading, self._manifests_by_id(reading), strict=True):
                live_chunks.update(manifest.stored_ids())
                progress.advance(described.get(mid, 0))  # an open stage's file: not counted
        finally:
            progress.finish()
        cutoff = started - grace_seconds
        doomed, doomed_sizes, young = [], [], 0
        progress.start(self.store.totals().stored_bytes, "gc: scanning")
        try:
            for info in self.store.scan():
                progress.advance(info.stored_size)
                if info.id in live_chunks:
                    continue
                if info.wanted_at >= cutoff:
                    young += 1
                    continue
                doomed.append(info.id)
                doomed_sizes.append(info.stored_size)
        finally:
            progress.finish()
        stale_manifests = [
            mid
            for mid, stored_at in self.store.scan_manifests()
            if mid not in live_manifests and stored_at < cutoff
        ]
        if dry_run:
            deleted, deleted_manifests = len(doomed), len(stale_manifests)
        else:
            deleted = 0
            progress.start(sum(doomed_sizes), "gc: deleting")
            try:
                for i in range(0, len(doomed), GC_DELETE_BATCH):
                    batch = slice(i, i + GC_DELETE_BATCH)
                    deleted += self.store.delete(doomed[batch], unwanted_since=cutoff)
                    progress.advance(sum(doomed_sizes[batch]))
            finally:
                progress.finish()
            deleted_manifests = self.store.delete_manifests(stale_manifests)
        return GcResult(
            versions=len(versions),
            reachable_chunks=len(live_chunks),
            deleted_chunks=deleted,
            deleted_bytes=sum(doomed_sizes),
            spared_young=young,
            deleted_manifests=deleted_manifests,
            expired_stages=stages_dropped,
            dry_run=dry_run,
        )

    def _all_versions(self, on_unreadable: OnUnreadable | None = None) -> Iterable[Version]:
        """Every version of every repo; for a record that cannot be read, see
        :func:`~chunkstore.refs.load_versions`."""
        for name in self.store.list_repos():
            yield from load_versions(self.store, name, on_unreadable=on_unreadable)

    def _newest(self, repo: str) -> Version:
        """The latest version of ``repo``, decoding no other; NotFound for an unknown repo."""
        version = latest(self.store, _check_repo_name(repo), left_out)
        if version is None:
            raise unknown_repo(self.store, repo)
        return version


def _inputs_of_unreadable(
    repo: str, records: list[tuple[UnreadableVersion, bytes]], present: set[bytes]
) -> tuple[dict[bytes, list[str]], list[UnreadableVersion]]:
    """What version records that cannot be read (each with its bytes) tell a prune of
    ``repo``, whose versions are ``present``: each present version they name as an input, with
    why it stays; and the records whose inputs cannot be told (they do not parse, or name a
    version of ``repo`` that is not there: the id may be what was damaged)."""
    pinned: dict[bytes, list[str]] = {}
    unknown: list[UnreadableVersion] = []
    for error, data in records:
        links = trusted_inputs(data)
        if links is None or any(link.repo == repo and link.id not in present for link in links):
            unknown.append(error)
            continue
        for link in links:  # matched by id alone: the repo a link names may be damaged
            if link.id in present:
                why = f"input of unreadable {error.repo}@{ids.short(error.version_id)}"
                pinned.setdefault(link.id, []).append(why)
    return pinned, unknown


def _rm_hint(error: UnreadableVersion) -> str:
    """The command that removes a version record that cannot be read."""
    return f"chunkstore rm {error.repo}@{error.version_id.hex()}"


def _check_blob(cid: bytes, blob: bytes) -> str:
    try:
        codec.decode_verified(cid, blob)
    except CorruptChunk:
        return "corrupt"
    return "ok"


def _check_params(params: dict[str, str]) -> dict[str, str]:
    for key, value in params.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise InvalidInput(f"invalid param {key!r}={value!r}: keys and values are strings")
    return dict(params)


def _check_metrics(metrics: dict[str, float]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"invalid metric name {key!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InvalidInput(f"invalid metric {key}={value!r}: not a number") from None
        if not math.isfinite(number):
            raise InvalidInput(f"invalid metric {key}={value!r}: must be finite")
        out[key] = number
    return out


def _new_plain_file(target: Path, entry: FileEntry, manifest: Manifest) -> bool:
    """Whether a file can be pulled along with others in one read: nothing is at its place
    yet (no file, link or partial file of an earlier pull) and none of its chunks is rebuilt
    from a delta."""
    return not (manifest.deltas or os.path.lexists(target) or os.path.lexists(partial_path(target)))


def _make_parent(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InvalidInput(
            f"cannot write {target}: a file is in the way of its directory"
        ) from None


def _holds_partials(folder: Path) -> bool:
    """Whether an interrupted pull left files under ``folder`` to resume from."""
    return next(folder.rglob(f".*{PARTIAL}"), None) is not None


def select_files(version: Version, patterns: Sequence[str]) -> list[FileEntry]:
    """The files of ``version`` that any of ``patterns`` names: a glob over the whole path
    (``*.json``, ``model-0000[12]-*``) or a directory (``tokenizer`` for all under it).
    NotFound if a pattern names no file, so a typo never passes for an empty selection."""

    def names(pattern: str, path: str) -> bool:
        folder = pattern.rstrip("/")
        return fnmatchcase(path, pattern) or (bool(folder) and path.startswith(folder + "/"))

    for pattern in patterns:
        if not any(names(pattern, entry.path) for entry in version.files):
            raise NotFound(f"no file of {version.ref} matches {pattern!r}")
    return [e for e in version.files if any(names(p, e.path) for p in patterns)]
