"""Stages: one version filled by several processes (the ranks of a training job).

Rank 0 opens a stage and passes its id to the other ranks; each uploads its own files into it;
rank 0 commits once all reported. The commit checks that every staged chunk and manifest is
still stored, then writes one version record: before that nothing of the stage is visible, and
an aborted or expired stage leaves only unreferenced chunks, which GC collects after its grace.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
import warnings
from collections.abc import Collection
from functools import partial
from typing import TYPE_CHECKING

from chunkstore.errors import CorruptRecord, InvalidInput, NotFound, UnreadableVersion
from chunkstore.model import FileEntry, Version, VersionLink, normalise_path, parse_record
from chunkstore.progress import Progress
from chunkstore.refs import left_out
from chunkstore.stores.base import CLAIMANT_BYTES, MetaStore
from chunkstore.tree import local_path
from chunkstore.v1 import model_pb2

if TYPE_CHECKING:
    from chunkstore.repository import Repository

DEFAULT_STAGE_TTL = 24 * 3600.0
STAGE_ID_BYTES = 16


def parse_stage_id(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != STAGE_ID_BYTES:
        raise InvalidInput(f"invalid stage id {text!r}: want {2 * STAGE_ID_BYTES} hex digits")
    return raw


def stage_expired(record: model_pb2.Stage, now_ns: int | None = None) -> bool:
    return (now_ns or time.time_ns()) >= record.expires_ns


class Stage:
    """A handle on a stage; any process holding the id can add files, one commits."""

    def __init__(self, repository: Repository, stage_id: bytes, record: model_pb2.Stage) -> None:
        self._repository = repository
        self._raw_id = stage_id
        self.record = record

    @property
    def id(self) -> str:
        """The id to hand to the other processes."""
        return self._raw_id.hex()

    @property
    def repo(self) -> str:
        return self.record.repo

    @classmethod
    def create(
        cls,
        repository: Repository,
        *,
        repo: str,
        message: str,
        tags: list[str],
        params: dict[str, str],
        metrics: dict[str, float],
        inputs: list[VersionLink],
        author: str,
        ttl_seconds: float,
    ) -> Stage:
        if not ttl_seconds > 0:
            raise InvalidInput("a stage's time to live must be > 0 seconds")
        now = time.time_ns()
        record = model_pb2.Stage(
            repo=repo,
            message=message,
            author=author,
            params=params,
            metrics=metrics,
            tags=tags,
            inputs=[model_pb2.VersionLink(repo=i.repo, id=i.id) for i in inputs],
            created_ns=now,
            expires_ns=now + int(ttl_seconds * 1e9),
        )
        stage_id = secrets.token_bytes(STAGE_ID_BYTES)
        repository.store.put_stage(stage_id, record.SerializeToString(deterministic=True))
        return cls(repository, stage_id, record)

    @classmethod
    def open(cls, repository: Repository, stage_id: str) -> Stage:
        raw = parse_stage_id(stage_id)
        try:
            data = repository.store.get_stage(raw)
        except NotFound:
            raise NotFound(f"no stage {stage_id} (committed, aborted or expired)") from None
        return cls(repository, raw, parse_record(model_pb2.Stage, data, f"stage {stage_id}"))

    def _gone(self) -> NotFound:
        return NotFound(f"no stage {self.id} (committed, aborted or expired)")

    def _check_open(self) -> None:
        """Raise unless the stage still exists and has not expired."""
        try:
            self._repository.store.get_stage(self._raw_id)
        except NotFound:
            raise self._gone() from None
        if stage_expired(self.record):
            raise InvalidInput(f"stage {self.id} has expired")

    def add(
        self,
        path: str | os.PathLike,
        as_path: str | None = None,
        progress: Progress | None = None,
    ) -> list[FileEntry]:
        """Upload a file (stored as ``as_path``, default its base name) or a directory (its
        files under ``as_path/``, default at the top) into the stage.

        Returns the entries added. A path staged twice keeps the last upload. What a push
        would leave out of the directory (see :func:`~chunkstore.tree.list_tree`) is left out
        here too, with a :class:`UserWarning` for each.
        """
        self._check_open()
        local = local_path(path)
        found = self._repository.local_tree(local)
        for skipped in found.skipped:
            warnings.warn(f"{skipped.path} not staged: {skipped.reason}", stacklevel=2)
        tree = found.files
        if not tree:
            raise InvalidInput(f"nothing to stage: {path} holds no files")
        if as_path is not None:
            prefix = normalise_path(as_path)
            if local.is_file():
                tree = [(prefix, tree[0][1])]
            else:
                tree = [(f"{prefix}/{name}", local) for name, local in tree]
        repository = self._repository
        inputs = []
        for link in self.record.inputs:  # deltas against the inputs that are still there
            try:
                inputs.append(repository.resolve(f"{link.repo}@{link.id.hex()}"))
            except NotFound:
                continue
            except UnreadableVersion as e:  # no base to code deltas against: say so, go on
                left_out(e)
        base = partial(repository.delta_bases, self.repo, inputs)
        entries, stats = repository.store_tree(tree, f"stage {self.repo}", progress, base)
        share = stats.new_stored_bytes // len(entries)
        for entry in entries:
            staged = model_pb2.StagedFile(
                entry=model_pb2.FileEntry(
                    path=entry.path,
                    size=entry.size,
                    digest=entry.digest,
                    manifest_id=entry.manifest_id,
                    mode=entry.mode,
                ),
                new_bytes=share,
            )
            self._repository.store.put_stage_file(
                self._raw_id, entry.path, staged.SerializeToString(deterministic=True)
            )
        return entries

    def files(self) -> list[tuple[FileEntry, int]]:
        """The staged files with the new bytes each upload stored, sorted by path."""
        return _decoded(self.id, self._repository.store.stage_files(self._raw_id))

    def commit(self, expect: int | Collection[str] | None = None) -> Version:
        """Make the stage one version of its repo, atomically; the stage is gone after.

        ``expect`` refuses a partial checkpoint (a rank that died before its upload): the
        number of files the stage must hold, or their paths. Of processes committing one
        stage at once, one makes the version and the others get NotFound. A commit that fails
        leaves nothing visible and, unless another process committed it, the stage as it was.
        """
        self._check_open()
        store = self._repository.store
        raw = store.stage_files(self._raw_id)
        staged = _decoded(self.id, raw)
        self._check_complete([entry.path for entry, _ in staged], expect)
        entries = [entry for entry, _ in staged]
        self._check_durable(entries)
        claimant = secrets.token_bytes(CLAIMANT_BYTES)
        try:
            record, claimed = store.claim_stage(self._raw_id, claimant)
        except NotFound as e:
            raise NotFound(
                f"stage {self.id} was committed, aborted or expired meanwhile (by another "
                f"process?); nothing was committed here ({e})"
            ) from None
        if claimed != raw:  # a file was staged while this commit checked the others
            self._restore(claimant, record, claimed)
            raise InvalidInput(
                f"stage {self.id} changed while it was being committed; nothing was committed, "
                "commit again"
            )
        r = self.record
        try:
            version = self._repository.commit_version(
                r.repo,
                entries,
                r.message,
                dict(r.params),
                dict(r.metrics),
                [VersionLink(i.repo, i.id) for i in r.inputs],
                r.author,
                [],
                sum(new for _, new in staged),
            )
        except BaseException:
            self._restore(claimant, record, claimed)
            raise
        for tag in r.tags:  # after the version is written: a failure here keeps the stage gone
            store.set_tag(r.repo, tag, version.id)
        version.tags = list(r.tags)
        return version

    def abort(self) -> None:
        """Drop the stage; what its files uploaded is left to GC.

        The delete carries a claimant token of its own, as a commit's claim does: the owners
        remember it, so a copy an owner kept while it was down is refused by the others when
        it is back, not copied back to them by repair, and a retried delete whose first
        answer was lost succeeds."""
        try:
            self._repository.store.delete_stage(self._raw_id, secrets.token_bytes(CLAIMANT_BYTES))
        except NotFound:
            raise self._gone() from None

    def _check_complete(self, paths: list[str], expect: int | Collection[str] | None) -> None:
        if not paths:
            raise InvalidInput(f"stage {self.id} has no files")
        if expect is None:
            return
        if isinstance(expect, str) or (isinstance(expect, int) and expect < 1):
            raise InvalidInput(
                f"invalid expect={expect!r}: give the number of files (>= 1) or their paths"
            )
        if isinstance(expect, int):
            if len(paths) != expect:
                off = expect - len(paths)
                how = f"{off} missing" if off > 0 else f"{-off} more than expected"
                raise InvalidInput(
                    f"stage {self.id} holds {len(paths)} files, {expect} expected: {how} "
                    f"(staged: {_listed(paths)}); nothing was committed"
                )
            return
        wanted = {normalise_path(p) for p in expect}
        missing, extra = sorted(wanted - set(paths)), sorted(set(paths) - wanted)
        if missing or extra:
            problems = [f"{len(missing)} missing: {_listed(missing)}"] if missing else []
            problems += [f"{len(extra)} not expected: {_listed(extra)}"] if extra else []
            raise InvalidInput(
                f"stage {self.id} holds {len(paths)} of {len(wanted)} expected files "
                f"({'; '.join(problems)}); nothing was committed"
            )

    def _restore(self, claimant: bytes, record: bytes, files: dict[str, bytes]) -> None:
        """Put a stage this commit claimed back as it was, so it can be committed again."""
        self._repository.store.restore_stage(self._raw_id, claimant, record, files)

    def _check_durable(self, entries: list[FileEntry]) -> None:
        """Every manifest and chunk the entries need is stored (and marked wanted now).

        NotFound if one is gone; a cluster whose unreachable nodes leave that unknown raises
        StoreUnavailable instead (the files are not to be added again: the nodes are)."""
        store = self._repository.store
        manifest_ids = [e.manifest_id for e in entries]
        if store.has_manifests(manifest_ids) != set(manifest_ids):
            raise NotFound(f"stage {self.id}: some staged files' manifests are gone; add again")
        chunk_ids = list(
            dict.fromkeys(cid for e in entries for cid in self._repository.manifest(e).stored_ids())
        )
        for i in range(0, len(chunk_ids), 8192):
            if store.mark_wanted(chunk_ids[i : i + 8192]):
                raise NotFound(f"stage {self.id}: some staged chunks are gone; add the files again")


def _decoded(stage_id: str, files: dict[str, bytes]) -> list[tuple[FileEntry, int]]:
    """Staged file records (path -> record) as entries with their new bytes, by path;
    CorruptRecord naming the first that cannot be read (adding the file again replaces it)."""
    out = []
    for path, data in sorted(files.items()):
        what = f"the record of {path!r} in stage {stage_id}"
        staged = parse_record(model_pb2.StagedFile, data, what)
        e = staged.entry
        out.append((FileEntry(path, e.size, e.digest, e.manifest_id, e.mode), staged.new_bytes))
    return out


def _listed(paths: list[str], limit: int = 8) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def live_stage_manifests(store: MetaStore, drop: bool = True) -> tuple[set[bytes], int]:
    """The manifests of open stages' files (GC keeps them), after dropping expired stages
    (with ``drop``; else they are only counted).

    A stage whose record cannot be read counts as expired, and a staged file whose record
    cannot be read names no manifest: neither can ever be committed (a commit reads both; a
    file added again gets a new record).

    Returns ``(manifest ids, stages expired)``.
    """
    live: set[bytes] = set()
    dropped = 0
    now = time.time_ns()
    for stage_id, data in store.list_stages():
        try:
            expired = stage_expired(parse_record(model_pb2.Stage, data, "stage"), now)
        except CorruptRecord:
            expired = True
        if expired:
            if drop:
                with contextlib.suppress(NotFound):
                    store.delete_stage(stage_id)
            dropped += 1
            continue
        for staged in store.stage_files(stage_id).values():
            with contextlib.suppress(CorruptRecord):
                entry = parse_record(model_pb2.StagedFile, staged, "staged file").entry
                live.add(entry.manifest_id)
    return live, dropped
