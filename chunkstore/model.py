"""Versions, file entries and manifests: their Python shape and their canonical encoding.

The canonical encoding is the deterministic protobuf serialization of the messages in
``proto/chunkstore/v1/model.proto``; a record's id is BLAKE3-256 of that encoding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf.message import DecodeError
from google.protobuf.message import Message as _Message

from chunkstore import ids
from chunkstore.errors import CorruptRecord, InvalidInput, NotFound, UnreadableVersion
from chunkstore.v1 import model_pb2

M = TypeVar("M", bound=_Message)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME = 200


def check_repo_name(name: str) -> str:
    """Return ``name`` if it is a valid repo name, else raise InvalidInput."""
    if not (len(name) <= MAX_NAME and _NAME.fullmatch(name)):
        raise InvalidInput(
            f"invalid repo name {name!r}: use letters, digits, '.', '_', '-' and '/' separators"
        )
    return name


def check_tag_name(tag: str) -> str:
    """Return ``tag`` if it is a valid tag name, else raise InvalidInput."""
    if not (len(tag) <= MAX_NAME and _TAG.fullmatch(tag)):
        raise InvalidInput(f"invalid tag {tag!r}: use letters, digits, '.', '_' and '-'")
    return tag


def normalise_path(path: str) -> str:
    """Return a manifest path in normal form, or raise InvalidInput if it is unsafe.

    A stored path is relative, '/'-separated, and never climbs out of the tree it names:
    absolute paths, '..' components, empty names and NUL bytes are refused.
    """
    unsafe = not path or "\0" in path or "\\" in path or path.startswith("/")
    if unsafe or any(p in ("..", ".", "") for p in path.split("/")):
        raise InvalidInput(
            f"unsafe path {path!r}: a stored path is relative and '/'-separated, with no "
            "'..', '.' or empty part, backslash or NUL"
        )
    return path


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    digest: bytes
    manifest_id: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class VersionLink:
    repo: str
    id: bytes

    def __str__(self) -> str:
        return f"{self.repo}@{ids.short(self.id)}"


@dataclass
class Version:
    """An immutable version of a repo, plus its tags (which live outside the record)."""

    repo: str
    id: bytes
    parents: list[bytes]
    created_ns: int
    author: str
    message: str
    files: list[FileEntry]
    params: dict[str, str]
    metrics: dict[str, float]
    inputs: list[VersionLink]
    new_bytes: int
    tags: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Sum of the sizes of the version's files."""
        return sum(f.size for f in self.files)

    @property
    def short_id(self) -> str:
        return ids.short(self.id)

    @property
    def ref(self) -> str:
        return f"{self.repo}@{self.short_id}"

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise NotFound(f"{self.ref} has no file {path!r}")

    def to_json(self) -> dict:
        return {
            "id": self.id.hex(),
            "repo": self.repo,
            "parents": [p.hex() for p in self.parents],
            "created": self.created_ns / 1e9,
            "author": self.author,
            "message": self.message,
            "tags": sorted(self.tags),
            "params": dict(self.params),
            "metrics": dict(self.metrics),
            "inputs": [{"repo": i.repo, "id": i.id.hex()} for i in self.inputs],
            "size": self.size,
            "new_bytes": self.new_bytes,
            "files": [
                {"path": f.path, "size": f.size, "digest": f.digest.hex()} for f in self.files
            ],
        }


def encode_version(
    *,
    repo: str,
    parents: list[bytes],
    created_ns: int,
    author: str,
    message: str,
    files: list[FileEntry],
    params: dict[str, str],
    metrics: dict[str, float],
    inputs: list[VersionLink],
    new_bytes: int,
) -> tuple[bytes, bytes]:
    """Return ``(version id, canonical record)`` for these fields."""
    msg = model_pb2.Version(
        repo=repo,
        parents=parents,
        created_ns=created_ns,
        author=author,
        message=message,
        files=[
            model_pb2.FileEntry(
                path=f.path, size=f.size, digest=f.digest, manifest_id=f.manifest_id, mode=f.mode
            )
            for f in sorted(files, key=lambda f: f.path)
        ],
        params=params,
        metrics=metrics,
        inputs=[model_pb2.VersionLink(repo=i.repo, id=i.id) for i in inputs],
        new_bytes=new_bytes,
    )
    data = msg.SerializeToString(deterministic=True)
    return ids.record_id(data), data


def parse_record(message: type[M], data: bytes, what: str) -> M:
    """``data`` parsed as a ``message``; CorruptRecord naming ``what`` if it does not parse."""
    try:
        return message.FromString(data)
    except DecodeError:
        name = message.DESCRIPTOR.name
        raise CorruptRecord(f"{what} is unreadable: it does not parse as a {name}") from None


def parse_version(repo: str, version_id: bytes, data: bytes) -> model_pb2.Version:
    """The message of the record stored as version ``version_id`` of ``repo``, not checked
    against its id (choosing among versions reads the time of every record; only those decoded
    whole are hashed). UnreadableVersion if it does not parse or is a version of another
    repo."""
    try:
        msg = model_pb2.Version.FromString(data)
    except DecodeError:
        raise UnreadableVersion(repo, version_id, "it does not parse as a Version") from None
    if msg.repo != repo:
        raise UnreadableVersion(repo, version_id, f"it is a version of repo {msg.repo!r}")
    return msg


def trusted_inputs(data: bytes) -> list[VersionLink] | None:
    """The input links a version record parses to, taken as they are (None if it does not
    parse): what can still be told of a record that does not match its id or is stored under
    another repo."""
    try:
        msg = model_pb2.Version.FromString(data)
    except DecodeError:
        return None
    return _links(msg)


def _links(msg: model_pb2.Version) -> list[VersionLink]:
    return [VersionLink(i.repo, i.id) for i in msg.inputs]


def decode_version(
    repo: str, version_id: bytes, data: bytes, tags: list[str] | None = None
) -> Version:
    """Decode the record stored as version ``version_id`` of ``repo``, with its tags.

    UnreadableVersion, naming the record, unless it hashes to its id, parses and is a version
    of ``repo``. Clients check every record they decode so, and nodes every record they are
    sent (a record no client could read is refused, never stored).
    """
    if ids.record_id(data) != version_id:
        raise UnreadableVersion(repo, version_id, "it does not match its id")
    msg = parse_version(repo, version_id, data)
    return Version(
        repo=msg.repo,
        id=version_id,
        parents=list(msg.parents),
        created_ns=msg.created_ns,
        author=msg.author,
        message=msg.message,
        files=[
            FileEntry(
                path=f.path, size=f.size, digest=f.digest, manifest_id=f.manifest_id, mode=f.mode
            )
            for f in msg.files
        ],
        params=dict(msg.params),
        metrics=dict(msg.metrics),
        inputs=_links(msg),
        new_bytes=msg.new_bytes,
        tags=sorted(tags or []),
    )


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


#: How a delta-coded chunk's prediction is made from its base chunk's bytes.
TRANSFORMS = ("", "bf16_from_f32", "f16_from_f32")


@dataclass(frozen=True)
class DeltaRef:
    """A chunk rebuilt from two stored chunks: raw = raw(delta) XOR predict(raw(base)).

    ``base`` is always a chunk stored under its own id (a keyframe), never a delta itself, so a
    delta-coded chunk is at most one step from stored bytes. See :mod:`chunkstore.delta`.
    """

    delta: bytes  # id of the stored XOR chunk
    base: bytes  # id of the stored base chunk
    transform: str = ""  # one of TRANSFORMS


@dataclass(frozen=True)
class Manifest:
    """The content of one file: its chunks in order and, for a file with tensors (safetensors,
    torch.save), its tensor index.

    ``chunks`` holds every chunk's (id, length), whether it is stored under its id or rebuilt
    from a delta; ``deltas`` maps the index of each delta-coded chunk to how it is rebuilt. The
    digest depends on ``chunks`` only, so it is the same with or without deltas.
    """

    size: int
    chunks: list[tuple[bytes, int]]  # (chunk id, raw length), in file order
    tensors: list[TensorInfo] = field(default_factory=list)
    deltas: dict[int, DeltaRef] = field(default_factory=dict)  # chunk index -> delta

    @property
    def digest(self) -> bytes:
        return ids.file_digest(self.chunks)

    def offsets(self) -> list[int]:
        """Start offset of each chunk."""
        out, pos = [], 0
        for _, length in self.chunks:
            out.append(pos)
            pos += length
        return out

    def placements(self) -> tuple[list[tuple[bytes, int]], dict[bytes, list[int]]]:
        """Each distinct chunk once as ``(id, length)``, in file order, and every offset at
        which the file holds each."""
        order: list[tuple[bytes, int]] = []
        offsets: dict[bytes, list[int]] = {}
        pos = 0
        for cid, length in self.chunks:
            if cid not in offsets:
                order.append((cid, length))
                offsets[cid] = []
            offsets[cid].append(pos)
            pos += length
        return order, offsets

    def delta_refs(self) -> dict[bytes, DeltaRef]:
        """Chunk id -> how it is rebuilt, for every delta-coded chunk."""
        return {self.chunks[i][0]: ref for i, ref in self.deltas.items()}

    def stored_ids(self) -> list[bytes]:
        """Ids of the chunks the store must hold to rebuild this file, each once: the plain
        chunks' own ids, and the delta and base of every delta-coded chunk."""
        out: dict[bytes, None] = {}
        for i, (cid, _) in enumerate(self.chunks):
            ref = self.deltas.get(i)
            if ref is None:
                out[cid] = None
            else:
                out[ref.delta] = None
                out[ref.base] = None
        return list(out)

    def encode(self) -> tuple[bytes, bytes]:
        """Return ``(manifest id, canonical record)``."""
        msg = model_pb2.FileManifest(
            size=self.size,
            tensors=[
                model_pb2.TensorInfo(
                    name=t.name, dtype=t.dtype, shape=t.shape, begin=t.begin, end=t.end
                )
                for t in self.tensors
            ],
        )
        add = msg.chunks.add  # 3x faster than building ChunkRef messages and passing a list
        for i, (cid, length) in enumerate(self.chunks):
            ref = self.deltas.get(i)
            if ref is None:
                add(id=cid, length=length)
            else:
                add(id=cid, length=length, delta=ref.delta, base=ref.base, transform=ref.transform)
        data = msg.SerializeToString(deterministic=True)
        return ids.record_id(data), data

    @classmethod
    def decode(cls, manifest_id: bytes, data: bytes) -> Manifest:
        """Parse a stored manifest, checking it against its id and its own sizes:
        CorruptRecord naming it unless it is one (nodes refuse such a record, never store it).
        """
        what = f"manifest {manifest_id.hex()}"
        if ids.record_id(data) != manifest_id:
            raise CorruptRecord(f"{what} is unreadable: it does not match its id")
        msg = parse_record(model_pb2.FileManifest, data, what)
        chunks = [(c.id, c.length) for c in msg.chunks]
        if sum(n for _, n in chunks) != msg.size:
            raise CorruptRecord(f"{what} is unreadable: its chunk lengths do not add up")
        deltas = {}
        for i, c in enumerate(msg.chunks):
            if not (c.delta or c.base or c.transform):
                continue
            if len(c.delta) != ids.ID_SIZE or len(c.base) != ids.ID_SIZE:
                raise CorruptRecord(f"{what} is unreadable: it has a malformed delta at {i}")
            if c.transform not in TRANSFORMS:
                raise CorruptRecord(
                    f"{what} is unreadable: it has an unknown delta transform {c.transform!r}"
                )
            deltas[i] = DeltaRef(c.delta, c.base, c.transform)
        tensors = [TensorInfo(t.name, t.dtype, tuple(t.shape), t.begin, t.end) for t in msg.tensors]
        return cls(size=msg.size, chunks=chunks, tensors=tensors, deltas=deltas)
