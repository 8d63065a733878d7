"""The chunk-carrying messages of ChunkService, written and read by hand.

``PutChunksBatch`` (client to node) and ``ChunkBatch`` (node to client) carry ~4 MiB of blobs
each. Building them as protobuf objects copies every blob into the message and again when
serializing it; reading one copies every blob out of the received bytes once more when a field
is read. Here a message is written by joining its encoded fields (one copy, at memory speed)
and read into ``memoryview`` slices of the received bytes (no copy): the bytes are the same as
protobuf's deterministic serialization, and any valid encoding of these messages is read as
protobuf would read it (fields in any order, unknown fields skipped, the last value of a
repeated scalar field winning).
"""

from __future__ import annotations

from collections.abc import Iterable

# Field keys, (field number << 3) | wire type (0 varint, 2 length-delimited).
_SEQ = b"\x08"  # PutChunksBatch.seq = 1
_PUT_CHUNK = b"\x12"  # PutChunksBatch.chunks = 2
_BATCH_CHUNK = b"\x0a"  # ChunkBatch.chunks = 1
_ID = b"\x0a"  # EncodedChunk.id = 1
_BLOB = b"\x12"  # EncodedChunk.blob = 2

_VARINT, _FIXED64, _DELIMITED, _FIXED32 = 0, 1, 2, 5

#: A chunk as read off the wire: its id and a view of its blob inside the received message.
WireChunk = tuple[bytes, memoryview]


class WireError(ValueError):
    """The bytes are not a valid encoding of the message."""


def varint(n: int) -> bytes:
    """The base-128 varint encoding of ``n`` >= 0."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _chunks(key: bytes, chunks: Iterable[tuple[bytes, bytes | memoryview]]) -> list:
    parts: list = []
    for cid, blob in chunks:
        head = _ID + varint(len(cid)) + cid if cid else b""
        if len(blob):
            head += _BLOB + varint(len(blob))
        parts += [key, varint(len(head) + len(blob)), head, blob]
    return parts


def put_chunks_batch(seq: int, chunks: Iterable[tuple[bytes, bytes | memoryview]]) -> bytes:
    """The serialized ``PutChunksBatch(seq=seq, chunks=[EncodedChunk(id, blob), ...])``."""
    head = [_SEQ, varint(seq)] if seq else []
    return b"".join(head + _chunks(_PUT_CHUNK, chunks))


def chunk_batch(chunks: Iterable[tuple[bytes, bytes | memoryview]]) -> bytes:
    """The serialized ``ChunkBatch(chunks=[EncodedChunk(id, blob), ...])``."""
    return b"".join(_chunks(_BATCH_CHUNK, chunks))


def read_put_chunks_batch(data: bytes) -> tuple[int, list[WireChunk]]:
    """``(seq, [(id, blob view), ...])`` of a serialized ``PutChunksBatch``; WireError if it
    is not one."""
    seq = 0
    chunks: list[WireChunk] = []
    view = memoryview(data)
    for number, kind, value, start in _fields(data, 0, len(data)):
        if number == 1 and kind == _VARINT:
            seq = value
        elif number == 2 and kind == _DELIMITED:
            chunks.append(_encoded_chunk(data, view, start, value))
    return seq, chunks


def read_chunk_batch(data: bytes) -> list[WireChunk]:
    """``[(id, blob view), ...]`` of a serialized ``ChunkBatch``; WireError if it is not one."""
    view = memoryview(data)
    return [
        _encoded_chunk(data, view, start, value)
        for number, kind, value, start in _fields(data, 0, len(data))
        if number == 1 and kind == _DELIMITED
    ]


def _encoded_chunk(data: bytes, view: memoryview, start: int, end: int) -> WireChunk:
    cid = b""
    blob = view[0:0]
    for number, kind, value, at in _fields(data, start, end):
        if kind != _DELIMITED:
            continue
        if number == 1:
            cid = data[at:value]
        elif number == 2:
            blob = view[at:value]
    return cid, blob


def _fields(data: bytes, pos: int, end: int) -> Iterable[tuple[int, int, int, int]]:
    """``(field number, wire type, value, start)`` of each field in ``data[pos:end]``.

    For a length-delimited field, ``start`` and ``value`` delimit its bytes; for a varint,
    ``value`` is the number; fixed-size fields give 0.
    """
    while pos < end:
        key, pos = _varint_at(data, pos, end)
        number, kind = key >> 3, key & 7
        start = pos
        if kind == _VARINT:
            value, pos = _varint_at(data, pos, end)
        elif kind == _DELIMITED:
            size, start = _varint_at(data, pos, end)
            value = pos = start + size
        elif kind == _FIXED64:
            value, pos = 0, pos + 8
        elif kind == _FIXED32:
            value, pos = 0, pos + 4
        else:
            raise WireError(f"unsupported wire type {kind} at byte {start}")
        if number == 0 or pos > end:
            raise WireError(f"malformed field at byte {start}")
        yield number, kind, value, start


def _varint_at(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``data[pos]`` and the position after it."""
    result = shift = 0
    while pos < end:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            break
    raise WireError(f"malformed varint before byte {pos}")
