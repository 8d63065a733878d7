from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EncodedChunk(_message.Message):
    __slots__ = ("id", "blob")
    ID_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    blob: bytes
    def __init__(self, id: _Optional[bytes] = ..., blob: _Optional[bytes] = ...) -> None: ...

class ChunkIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, ids: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PutChunksBatch(_message.Message):
    __slots__ = ("seq", "chunks")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    chunks: _containers.RepeatedCompositeFieldContainer[EncodedChunk]
    def __init__(self, seq: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[EncodedChunk, _Mapping]]] = ...) -> None: ...

class PutChunksAck(_message.Message):
    __slots__ = ("seq", "added_bytes")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ADDED_BYTES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    added_bytes: int
    def __init__(self, seq: _Optional[int] = ..., added_bytes: _Optional[int] = ...) -> None: ...

class ChunkBatch(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[EncodedChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[EncodedChunk, _Mapping]]] = ...) -> None: ...

class ScanChunksRequest(_message.Message):
    __slots__ = ("after", "limit")
    AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after: bytes
    limit: int
    def __init__(self, after: _Optional[bytes] = ..., limit: _Optional[int] = ...) -> None: ...

class ChunkInfo(_message.Message):
    __slots__ = ("id", "stored_size", "wanted_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    STORED_SIZE_FIELD_NUMBER: _ClassVar[int]
    WANTED_AT_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    stored_size: int
    wanted_at: float
    def __init__(self, id: _Optional[bytes] = ..., stored_size: _Optional[int] = ..., wanted_at: _Optional[float] = ...) -> None: ...

class ChunkInfoBatch(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[ChunkInfo]
    def __init__(self, chunks: _Optional[_Iterable[_Union[ChunkInfo, _Mapping]]] = ...) -> None: ...

class DeleteChunksRequest(_message.Message):
    __slots__ = ("ids", "unwanted_since")
    IDS_FIELD_NUMBER: _ClassVar[int]
    UNWANTED_SINCE_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[bytes]
    unwanted_since: float
    def __init__(self, ids: _Optional[_Iterable[bytes]] = ..., unwanted_since: _Optional[float] = ...) -> None: ...

class DeleteResult(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class ChunkTotals(_message.Message):
    __slots__ = ("chunks", "stored_bytes")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    stored_bytes: int
    def __init__(self, chunks: _Optional[int] = ..., stored_bytes: _Optional[int] = ...) -> None: ...

class RangeDigestsRequest(_message.Message):
    __slots__ = ("epoch", "peer", "start", "span", "count")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    peer: str
    start: int
    span: int
    count: int
    def __init__(self, epoch: _Optional[int] = ..., peer: _Optional[str] = ..., start: _Optional[int] = ..., span: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class RangeDigestsReply(_message.Message):
    __slots__ = ("epoch", "digests", "counts")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    digests: _containers.RepeatedScalarFieldContainer[bytes]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, epoch: _Optional[int] = ..., digests: _Optional[_Iterable[bytes]] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class ManifestRecord(_message.Message):
    __slots__ = ("id", "data")
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    data: bytes
    def __init__(self, id: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class ManifestRecords(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[ManifestRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[ManifestRecord, _Mapping]]] = ...) -> None: ...

class ManifestPart(_message.Message):
    __slots__ = ("id", "data")
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    data: bytes
    def __init__(self, id: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class ManifestInfo(_message.Message):
    __slots__ = ("id", "stored_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    STORED_AT_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    stored_at: float
    def __init__(self, id: _Optional[bytes] = ..., stored_at: _Optional[float] = ...) -> None: ...

class ManifestInfoBatch(_message.Message):
    __slots__ = ("manifests",)
    MANIFESTS_FIELD_NUMBER: _ClassVar[int]
    manifests: _containers.RepeatedCompositeFieldContainer[ManifestInfo]
    def __init__(self, manifests: _Optional[_Iterable[_Union[ManifestInfo, _Mapping]]] = ...) -> None: ...

class VersionKey(_message.Message):
    __slots__ = ("repo", "id")
    REPO_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    repo: str
    id: bytes
    def __init__(self, repo: _Optional[str] = ..., id: _Optional[bytes] = ...) -> None: ...

class VersionRecord(_message.Message):
    __slots__ = ("repo", "id", "data")
    REPO_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    repo: str
    id: bytes
    data: bytes
    def __init__(self, repo: _Optional[str] = ..., id: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class VersionRecords(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionRecord]
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionRecord, _Mapping]]] = ...) -> None: ...

class RepoName(_message.Message):
    __slots__ = ("repo",)
    REPO_FIELD_NUMBER: _ClassVar[int]
    repo: str
    def __init__(self, repo: _Optional[str] = ...) -> None: ...

class RepoNames(_message.Message):
    __slots__ = ("repos",)
    REPOS_FIELD_NUMBER: _ClassVar[int]
    repos: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, repos: _Optional[_Iterable[str]] = ...) -> None: ...

class Tag(_message.Message):
    __slots__ = ("repo", "tag", "version_id")
    REPO_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    repo: str
    tag: str
    version_id: bytes
    def __init__(self, repo: _Optional[str] = ..., tag: _Optional[str] = ..., version_id: _Optional[bytes] = ...) -> None: ...

class Tags(_message.Message):
    __slots__ = ("tags",)
    TAGS_FIELD_NUMBER: _ClassVar[int]
    tags: _containers.RepeatedCompositeFieldContainer[Tag]
    def __init__(self, tags: _Optional[_Iterable[_Union[Tag, _Mapping]]] = ...) -> None: ...

class StageRecord(_message.Message):
    __slots__ = ("id", "data", "released")
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    data: bytes
    released: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, id: _Optional[bytes] = ..., data: _Optional[bytes] = ..., released: _Optional[_Iterable[bytes]] = ...) -> None: ...

class StageKey(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    def __init__(self, id: _Optional[bytes] = ...) -> None: ...

class StageFile(_message.Message):
    __slots__ = ("stage_id", "path", "data")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    stage_id: bytes
    path: str
    data: bytes
    def __init__(self, stage_id: _Optional[bytes] = ..., path: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class StageFiles(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[StageFile]
    def __init__(self, files: _Optional[_Iterable[_Union[StageFile, _Mapping]]] = ...) -> None: ...

class StageRecords(_message.Message):
    __slots__ = ("stages",)
    STAGES_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedCompositeFieldContainer[StageRecord]
    def __init__(self, stages: _Optional[_Iterable[_Union[StageRecord, _Mapping]]] = ...) -> None: ...

class DeleteStageRequest(_message.Message):
    __slots__ = ("id", "claimant")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLAIMANT_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    claimant: bytes
    def __init__(self, id: _Optional[bytes] = ..., claimant: _Optional[bytes] = ...) -> None: ...

class RestoreStageRequest(_message.Message):
    __slots__ = ("id", "claimant", "data", "files")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLAIMANT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    claimant: bytes
    data: bytes
    files: _containers.RepeatedCompositeFieldContainer[StageFile]
    def __init__(self, id: _Optional[bytes] = ..., claimant: _Optional[bytes] = ..., data: _Optional[bytes] = ..., files: _Optional[_Iterable[_Union[StageFile, _Mapping]]] = ...) -> None: ...

class ReleaseStageRequest(_message.Message):
    __slots__ = ("id", "claimant", "data")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLAIMANT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    claimant: bytes
    data: bytes
    def __init__(self, id: _Optional[bytes] = ..., claimant: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("id", "address", "weight")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    weight: float
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class ClusterMap(_message.Message):
    __slots__ = ("epoch", "replicas", "write_quorum", "nodes")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    WRITE_QUORUM_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    replicas: int
    write_quorum: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, epoch: _Optional[int] = ..., replicas: _Optional[int] = ..., write_quorum: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("id", "epoch", "chunks", "stored_bytes", "map_used_bytes", "map_size_bytes", "data_dir", "in_map", "rebalancing", "pass_running", "pass_progress", "pass_epoch", "misplaced", "under_replicated", "chunks_copied", "chunks_dropped", "bytes_copied", "passes", "departed", "peers_refused", "incarnation", "checked")
    class CheckedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAP_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAP_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_DIR_FIELD_NUMBER: _ClassVar[int]
    IN_MAP_FIELD_NUMBER: _ClassVar[int]
    REBALANCING_FIELD_NUMBER: _ClassVar[int]
    PASS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    PASS_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PASS_EPOCH_FIELD_NUMBER: _ClassVar[int]
    MISPLACED_FIELD_NUMBER: _ClassVar[int]
    UNDER_REPLICATED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_COPIED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    BYTES_COPIED_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    DEPARTED_FIELD_NUMBER: _ClassVar[int]
    PEERS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    id: str
    epoch: int
    chunks: int
    stored_bytes: int
    map_used_bytes: int
    map_size_bytes: int
    data_dir: str
    in_map: bool
    rebalancing: bool
    pass_running: bool
    pass_progress: float
    pass_epoch: int
    misplaced: int
    under_replicated: int
    chunks_copied: int
    chunks_dropped: int
    bytes_copied: int
    passes: int
    departed: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    peers_refused: _containers.RepeatedScalarFieldContainer[str]
    incarnation: int
    checked: _containers.ScalarMap[str, int]
    def __init__(self, id: _Optional[str] = ..., epoch: _Optional[int] = ..., chunks: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., map_used_bytes: _Optional[int] = ..., map_size_bytes: _Optional[int] = ..., data_dir: _Optional[str] = ..., in_map: _Optional[bool] = ..., rebalancing: _Optional[bool] = ..., pass_running: _Optional[bool] = ..., pass_progress: _Optional[float] = ..., pass_epoch: _Optional[int] = ..., misplaced: _Optional[int] = ..., under_replicated: _Optional[int] = ..., chunks_copied: _Optional[int] = ..., chunks_dropped: _Optional[int] = ..., bytes_copied: _Optional[int] = ..., passes: _Optional[int] = ..., departed: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., peers_refused: _Optional[_Iterable[str]] = ..., incarnation: _Optional[int] = ..., checked: _Optional[_Mapping[str, int]] = ...) -> None: ...

class PublishMapReply(_message.Message):
    __slots__ = ("epoch", "accepted")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    accepted: bool
    def __init__(self, epoch: _Optional[int] = ..., accepted: _Optional[bool] = ...) -> None: ...

class ReconcileReport(_message.Message):
    __slots__ = ("epoch", "chunks_copied", "bytes_copied", "chunks_dropped", "records_copied", "records_dropped", "under_replicated", "misplaced", "under_replicated_found", "ranges_skipped", "seconds", "complete", "peers_refused")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_COPIED_FIELD_NUMBER: _ClassVar[int]
    BYTES_COPIED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    RECORDS_COPIED_FIELD_NUMBER: _ClassVar[int]
    RECORDS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    UNDER_REPLICATED_FIELD_NUMBER: _ClassVar[int]
    MISPLACED_FIELD_NUMBER: _ClassVar[int]
    UNDER_REPLICATED_FOUND_FIELD_NUMBER: _ClassVar[int]
    RANGES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    PEERS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    chunks_copied: int
    bytes_copied: int
    chunks_dropped: int
    records_copied: int
    records_dropped: int
    under_replicated: int
    misplaced: int
    under_replicated_found: int
    ranges_skipped: int
    seconds: float
    complete: bool
    peers_refused: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, epoch: _Optional[int] = ..., chunks_copied: _Optional[int] = ..., bytes_copied: _Optional[int] = ..., chunks_dropped: _Optional[int] = ..., records_copied: _Optional[int] = ..., records_dropped: _Optional[int] = ..., under_replicated: _Optional[int] = ..., misplaced: _Optional[int] = ..., under_replicated_found: _Optional[int] = ..., ranges_skipped: _Optional[int] = ..., seconds: _Optional[float] = ..., complete: _Optional[bool] = ..., peers_refused: _Optional[_Iterable[str]] = ...) -> None: ...
