from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChunkRef(_message.Message):
    __slots__ = ("id", "length", "delta", "base", "transform")
    ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    length: int
    delta: bytes
    base: bytes
    transform: str
    def __init__(self, id: _Optional[bytes] = ..., length: _Optional[int] = ..., delta: _Optional[bytes] = ..., base: _Optional[bytes] = ..., transform: _Optional[str] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape", "begin", "end")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    begin: int
    end: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., begin: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class FileManifest(_message.Message):
    __slots__ = ("size", "chunks", "tensors")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    size: int
    chunks: _containers.RepeatedCompositeFieldContainer[ChunkRef]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    def __init__(self, size: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[ChunkRef, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ...) -> None: ...

class FileEntry(_message.Message):
    __slots__ = ("path", "size", "digest", "manifest_id", "mode")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    digest: bytes
    manifest_id: bytes
    mode: int
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., digest: _Optional[bytes] = ..., manifest_id: _Optional[bytes] = ..., mode: _Optional[int] = ...) -> None: ...

class Version(_message.Message):
    __slots__ = ("repo", "parents", "created_ns", "author", "message", "files", "params", "metrics", "inputs", "new_bytes")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REPO_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_NS_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    NEW_BYTES_FIELD_NUMBER: _ClassVar[int]
    repo: str
    parents: _containers.RepeatedScalarFieldContainer[bytes]
    created_ns: int
    author: str
    message: str
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    params: _containers.ScalarMap[str, str]
    metrics: _containers.ScalarMap[str, float]
    inputs: _containers.RepeatedCompositeFieldContainer[VersionLink]
    new_bytes: int
    def __init__(self, repo: _Optional[str] = ..., parents: _Optional[_Iterable[bytes]] = ..., created_ns: _Optional[int] = ..., author: _Optional[str] = ..., message: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., params: _Optional[_Mapping[str, str]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., inputs: _Optional[_Iterable[_Union[VersionLink, _Mapping]]] = ..., new_bytes: _Optional[int] = ...) -> None: ...

class VersionLink(_message.Message):
    __slots__ = ("repo", "id")
    REPO_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    repo: str
    id: bytes
    def __init__(self, repo: _Optional[str] = ..., id: _Optional[bytes] = ...) -> None: ...

class Stage(_message.Message):
    __slots__ = ("repo", "message", "author", "params", "metrics", "tags", "inputs", "created_ns", "expires_ns")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REPO_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_NS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_NS_FIELD_NUMBER: _ClassVar[int]
    repo: str
    message: str
    author: str
    params: _containers.ScalarMap[str, str]
    metrics: _containers.ScalarMap[str, float]
    tags: _containers.RepeatedScalarFieldContainer[str]
    inputs: _containers.RepeatedCompositeFieldContainer[VersionLink]
    created_ns: int
    expires_ns: int
    def __init__(self, repo: _Optional[str] = ..., message: _Optional[str] = ..., author: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., tags: _Optional[_Iterable[str]] = ..., inputs: _Optional[_Iterable[_Union[VersionLink, _Mapping]]] = ..., created_ns: _Optional[int] = ..., expires_ns: _Optional[int] = ...) -> None: ...

class StagedFile(_message.Message):
    __slots__ = ("entry", "new_bytes")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    NEW_BYTES_FIELD_NUMBER: _ClassVar[int]
    entry: FileEntry
    new_bytes: int
    def __init__(self, entry: _Optional[_Union[FileEntry, _Mapping]] = ..., new_bytes: _Optional[int] = ...) -> None: ...
