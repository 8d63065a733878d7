"""MetaService over a node's store: manifests, version records and tags, one call per method.

Absent records raise NotFound and malformed keys InvalidInput in the store; the RPC interceptor
reports them as NOT_FOUND and INVALID_ARGUMENT. Manifests, version, stage and staged file
records, and tag names, are checked as clients read them before they are stored: one no client
could read is refused (INVALID_ARGUMENT) and nothing of it is stored, so that it cannot break
everybody's listings and pulls.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import grpc

from chunkstore import errors
from chunkstore.client import manifest_parts
from chunkstore.model import (
    Manifest,
    check_repo_name,
    check_tag_name,
    decode_version,
    parse_record,
)
from chunkstore.stores.base import MetaStore
from chunkstore.v1 import model_pb2
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc

from .chunk_service import chunk_ids
from .limits import MANIFESTS_REPLY_BYTES, MAX_PARTED_MANIFEST_BYTES

SCAN_BATCH = 4096  # ManifestInfo per ScanManifests message
STAGE_ID_SIZE = 16

_EMPTY = pb.Empty()


class MetaServicer(pb_grpc.MetaServiceServicer):
    """Serves the metadata of ``store``. Manifest ids are checked like chunk ids (32 bytes)."""

    def __init__(self, store: MetaStore) -> None:
        self._store = store

    def PutManifest(self, request: pb.ManifestRecord, context: grpc.ServicerContext) -> pb.Empty:
        (manifest_id,) = chunk_ids([request.id])
        with _refused():
            Manifest.decode(manifest_id, request.data)
        self._store.put_manifest(manifest_id, request.data)
        return _EMPTY

    def PutManifests(self, request: pb.ManifestRecords, context: grpc.ServicerContext) -> pb.Empty:
        manifest_ids = chunk_ids([record.id for record in request.records])
        records = [(mid, r.data) for mid, r in zip(manifest_ids, request.records, strict=True)]
        with _refused():
            for mid, data in records:
                Manifest.decode(mid, data)
        self._store.put_manifests(records)
        return _EMPTY

    def GetManifest(self, request: pb.ChunkIds, context: grpc.ServicerContext) -> pb.ManifestRecord:
        if len(request.ids) != 1:
            raise errors.InvalidInput(f"GetManifest takes exactly one id, got {len(request.ids)}")
        (manifest_id,) = chunk_ids(request.ids)
        return pb.ManifestRecord(id=manifest_id, data=self._store.get_manifest(manifest_id))

    def GetManifests(
        self, request: pb.ChunkIds, context: grpc.ServicerContext
    ) -> pb.ManifestRecords:
        records, size = [], 0
        for manifest_id in chunk_ids(request.ids):
            try:
                data = self._store.get_manifest(manifest_id)
            except errors.NotFound:
                continue
            size += len(data)
            if size > MANIFESTS_REPLY_BYTES:
                break
            records.append(pb.ManifestRecord(id=manifest_id, data=data))
        return pb.ManifestRecords(records=records)

    def PutManifestParts(
        self, request_iterator: Iterator[pb.ManifestPart], context: grpc.ServicerContext
    ) -> pb.Empty:
        try:
            manifest_id, data = manifest_parts.joined(request_iterator, MAX_PARTED_MANIFEST_BYTES)
        except manifest_parts.TooLarge as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        (manifest_id,) = chunk_ids([manifest_id])
        with _refused():
            Manifest.decode(manifest_id, data)
        self._store.put_manifest(manifest_id, data)
        return _EMPTY

    def GetManifestParts(
        self, request: pb.ChunkIds, context: grpc.ServicerContext
    ) -> Iterator[pb.ManifestPart]:
        if len(request.ids) != 1:
            raise errors.InvalidInput(f"GetManifestParts takes one id, got {len(request.ids)}")
        (manifest_id,) = chunk_ids(request.ids)
        yield from manifest_parts.pieces(manifest_id, self._store.get_manifest(manifest_id))

    def HasManifests(self, request: pb.ChunkIds, context: grpc.ServicerContext) -> pb.ChunkIds:
        wanted = chunk_ids(request.ids)
        found = self._store.has_manifests(wanted)
        return pb.ChunkIds(ids=[m for m in dict.fromkeys(wanted) if m in found])

    def ScanManifests(
        self, request: pb.Empty, context: grpc.ServicerContext
    ) -> Iterator[pb.ManifestInfoBatch]:
        batch: list[pb.ManifestInfo] = []
        for manifest_id, stored_at in self._store.scan_manifests():
            batch.append(pb.ManifestInfo(id=manifest_id, stored_at=stored_at))
            if len(batch) >= SCAN_BATCH:
                yield pb.ManifestInfoBatch(manifests=batch)
                batch = []
        if batch:
            yield pb.ManifestInfoBatch(manifests=batch)

    def DeleteManifests(
        self, request: pb.ChunkIds, context: grpc.ServicerContext
    ) -> pb.DeleteResult:
        return pb.DeleteResult(deleted=self._store.delete_manifests(chunk_ids(request.ids)))

    def PutVersion(self, request: pb.VersionRecord, context: grpc.ServicerContext) -> pb.Empty:
        with _refused():
            decode_version(check_repo_name(request.repo), request.id, request.data)
        self._store.put_version(request.repo, request.id, request.data)
        return _EMPTY

    def GetVersion(self, request: pb.VersionKey, context: grpc.ServicerContext) -> pb.VersionRecord:
        data = self._store.get_version(request.repo, request.id)
        return pb.VersionRecord(repo=request.repo, id=request.id, data=data)

    def ListVersions(
        self, request: pb.RepoName, context: grpc.ServicerContext
    ) -> pb.VersionRecords:
        rows = self._store.list_versions(request.repo)
        return pb.VersionRecords(
            versions=[pb.VersionRecord(repo=request.repo, id=vid, data=data) for vid, data in rows]
        )

    def DeleteVersion(self, request: pb.VersionKey, context: grpc.ServicerContext) -> pb.Empty:
        self._store.delete_version(request.repo, request.id)
        return _EMPTY

    def ListRepos(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.RepoNames:
        return pb.RepoNames(repos=self._store.list_repos())

    def SetTag(self, request: pb.Tag, context: grpc.ServicerContext) -> pb.Empty:
        check_tag_name(request.tag)  # deleting one stays possible, whatever its name
        self._store.set_tag(check_repo_name(request.repo), request.tag, request.version_id)
        return _EMPTY

    def DeleteTag(self, request: pb.Tag, context: grpc.ServicerContext) -> pb.Empty:
        self._store.delete_tag(request.repo, request.tag)
        return _EMPTY

    def ListTags(self, request: pb.RepoName, context: grpc.ServicerContext) -> pb.Tags:
        tags = self._store.tags(request.repo)
        return pb.Tags(
            tags=[pb.Tag(repo=request.repo, tag=t, version_id=v) for t, v in sorted(tags.items())]
        )

    def PutStage(self, request: pb.StageRecord, context: grpc.ServicerContext) -> pb.Empty:
        stage_id = _stage_id(request.id)
        _check_stage(stage_id, request.data, {})
        self._store.put_stage(stage_id, request.data, request.released)
        return _EMPTY

    def GetStage(self, request: pb.StageKey, context: grpc.ServicerContext) -> pb.StageRecord:
        stage_id = _stage_id(request.id)
        return pb.StageRecord(id=stage_id, data=self._store.get_stage(stage_id))

    def PutStageFile(self, request: pb.StageFile, context: grpc.ServicerContext) -> pb.Empty:
        stage_id = _stage_id(request.stage_id)
        _check_stage(stage_id, None, {request.path: request.data})
        self._store.put_stage_file(stage_id, request.path, request.data)
        return _EMPTY

    def ListStageFiles(self, request: pb.StageKey, context: grpc.ServicerContext) -> pb.StageFiles:
        stage_id = _stage_id(request.id)
        files = self._store.stage_files(stage_id)
        return pb.StageFiles(
            files=[pb.StageFile(stage_id=stage_id, path=p, data=d) for p, d in files.items()]
        )

    def DeleteStage(
        self, request: pb.DeleteStageRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        claimant = request.claimant if request.HasField("claimant") else None
        self._store.delete_stage(_stage_id(request.id), claimant)
        return _EMPTY

    def RestoreStage(
        self, request: pb.RestoreStageRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        stage_id = _stage_id(request.id)
        files = {f.path: f.data for f in request.files}
        _check_stage(stage_id, request.data, files)
        self._store.restore_stage(stage_id, request.claimant, request.data, files)
        return _EMPTY

    def ReleaseStage(
        self, request: pb.ReleaseStageRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        stage_id = _stage_id(request.id)
        _check_stage(stage_id, request.data, {})
        self._store.release_claim(stage_id, request.claimant, request.data)
        return _EMPTY

    def ListStages(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.StageRecords:
        return pb.StageRecords(
            stages=[pb.StageRecord(id=i, data=d) for i, d in self._store.list_stages()]
        )


@contextmanager
def _refused() -> Iterator[None]:
    """Report a record that cannot be read as the client's bad input."""
    try:
        yield
    except errors.CorruptRecord as e:
        raise errors.InvalidInput(f"refused: {e}; nothing was stored") from None


def _check_stage(stage_id: bytes, record: bytes | None, files: Mapping[str, bytes]) -> None:
    """Refuse (InvalidInput) a stage record (unless None) or a staged file's record that
    cannot be read."""
    with _refused():
        if record is not None:
            parse_record(model_pb2.Stage, record, f"stage {stage_id.hex()}")
        for path, data in files.items():
            what = f"the record of {path!r} in stage {stage_id.hex()}"
            parse_record(model_pb2.StagedFile, data, what)


def _stage_id(raw: bytes) -> bytes:
    if len(raw) != STAGE_ID_SIZE:
        raise errors.InvalidInput(f"a stage id has {STAGE_ID_SIZE} bytes, got {len(raw)}")
    return raw
