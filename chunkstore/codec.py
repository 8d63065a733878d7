"""Chunk codecs: how a chunk's raw bytes are stored ("blob") and read back.

Blob format (all integers little-endian)::

    header   1 byte codec id, 4 bytes raw length
    payload  depends on the codec:
      0 raw      the raw bytes
      1 zstd     one zstd frame of the raw bytes (content size recorded in the frame)
      2 planes2  byte planes of 2-byte elements (bf16, fp16, int16)
      3 planes4  byte planes of 4-byte elements (fp32, int32)

A planes-k payload views the first ``m = length // k * k`` bytes as ``length // k`` elements of
k bytes and stores plane j = bytes j, j+k, j+2k, ...: the sign/exponent bytes of floats land in
one plane that compresses well, the mantissa bytes in planes stored as they are. Layout::

    table      k entries of (1 byte method: 0 raw / 1 zstd, 4 bytes stored size)
    planes     the k stored planes, in order
    remainder  the last ``length % k`` raw bytes

Ids 4 and up are free for later codecs (dtype-aware planes, XOR deltas): add an object with
``name``, ``encode`` and ``decode`` to ``CODECS``; callers only use the functions below.
A codec never changes a chunk's id, which is the BLAKE3 of the raw bytes.

Decoding allocates at most the header's raw length (up to 4 GiB): a caller that takes blobs from
the network should check ``raw_length(blob)`` against its maximum chunk size first.
"""

import struct
import threading
from typing import Protocol

import numpy as np
import zstandard

from chunkstore import ids
from chunkstore.errors import CorruptChunk

RAW, ZSTD, PLANES2, PLANES4 = 0, 1, 2, 3
# Whole chunks: zstd level 1. Byte planes: level 1 with min_match 7 and a 1 Ki-entry hash table
# (level 1 picks min_match 5 for small inputs); on the sign/exponent plane of normal fp32/bf16
# weights this stores 0.35 of the plane instead of 0.40, ~1.7x faster to compress and ~2x faster
# to decompress. Levels -1 to 3 and min_match 5 or 6 measured worse.
_PLANE_PARAMS = zstandard.ZstdCompressionParameters.from_level(1, min_match=7, hash_log=10)
MIN_GAIN = 0.95  # compressed data is kept only if it is at most this fraction of its input
SAMPLE_WINDOW = 2048  # bytes taken from each of two places of a chunk to choose its codec

_HEADER = struct.Struct("<BI")
_PLANE_ENTRY = struct.Struct("<BI")
_local = threading.local()


class CodecError(Exception):
    """A blob that cannot be decoded; str() says why."""


class Codec(Protocol):
    """One way of storing a chunk's raw bytes as a payload."""

    name: str

    def encode(self, raw: memoryview) -> list[bytes | memoryview]:
        """Return the payload for ``raw``, as parts to be concatenated."""

    def decode(self, payload: memoryview, length: int) -> bytes:
        """Return the ``length`` raw bytes of ``payload``; raise CodecError if it is malformed."""


def _zstd() -> threading.local:
    """This thread's zstd objects, which must not be shared between threads."""
    if not hasattr(_local, "decompressor"):
        _local.whole = zstandard.ZstdCompressor(level=1)
        _local.plane = zstandard.ZstdCompressor(compression_params=_PLANE_PARAMS)
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local


def _decompress(frame: memoryview, length: int) -> bytes:
    try:
        # Check the size the frame claims before zstd allocates room for it.
        if zstandard.frame_content_size(frame) != length:
            raise CodecError(f"zstd frame does not hold {length} bytes")
        out = _zstd().decompressor.decompress(frame, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CodecError(f"zstd: {e}") from e
    if len(out) != length:
        raise CodecError(f"zstd frame decoded to {len(out)} bytes, expected {length}")
    return out


class Raw:
    name = "raw"

    def encode(self, raw: memoryview) -> list[bytes | memoryview]:
        return [raw]

    def decode(self, payload: memoryview, length: int) -> bytes:
        if len(payload) != length:
            raise CodecError(f"raw payload has {len(payload)} bytes, expected {length}")
        return bytes(payload)


class Zstd:
    name = "zstd"

    def encode(self, raw: memoryview) -> list[bytes | memoryview]:
        return [_zstd().whole.compress(raw)]

    def decode(self, payload: memoryview, length: int) -> bytes:
        return _decompress(payload, length)


class Planes:
    """Byte planes of k-byte elements, each plane zstd-compressed only where that pays."""

    def __init__(self, k: int):
        self.k = k
        self.name = f"planes{k}"

    def encode(self, raw: memoryview) -> list[bytes | memoryview]:
        k, m = self.k, len(raw) // self.k
        planes = np.frombuffer(raw, np.uint8, count=m * k).reshape(m, k).T.copy()
        compressor, table, stored = _zstd().plane, [], []
        for plane in map(memoryview, planes):
            packed = compressor.compress(plane)
            if len(packed) <= MIN_GAIN * m:
                table.append(_PLANE_ENTRY.pack(1, len(packed)))
                stored.append(packed)
            else:
                table.append(_PLANE_ENTRY.pack(0, m))
                stored.append(plane)
        return [*table, *stored, raw[m * k :]]

    def decode(self, payload: memoryview, length: int) -> bytes:
        k, m = self.k, length // self.k
        offset = k * _PLANE_ENTRY.size
        if len(payload) < offset:
            raise CodecError(f"{self.name} payload too short for its plane table")
        planes = []
        for j, (method, size) in enumerate(_PLANE_ENTRY.iter_unpack(payload[:offset])):
            stored = payload[offset : offset + size]
            if len(stored) != size:
                raise CodecError(f"{self.name} plane {j} is truncated")
            if method == 0 and size == m:
                planes.append(stored)
            elif method == 1:
                planes.append(_decompress(stored, m))
            else:
                raise CodecError(f"{self.name} plane {j} has bad method {method} or size {size}")
            offset += size
        if len(payload) - offset != length - m * k:
            raise CodecError(f"{self.name} payload has a wrong remainder")
        out = np.empty(length, np.uint8)
        elements = out[: m * k].reshape(m, k)
        for j, plane in enumerate(planes):
            elements[:, j] = np.frombuffer(plane, np.uint8)
        out[m * k :] = np.frombuffer(payload[offset:], np.uint8)
        return out.tobytes()


CODECS: dict[int, Codec] = {RAW: Raw(), ZSTD: Zstd(), PLANES2: Planes(2), PLANES4: Planes(4)}
_PLANES_BY_SIZE = {2: PLANES2, 4: PLANES4}


def _sample(raw: memoryview) -> memoryview:
    """Two element-aligned windows, around 1/4 and 3/4 of the chunk (all of a small chunk)."""
    n = len(raw)
    if n <= 4 * SAMPLE_WINDOW:
        return raw
    starts = [(n * i // 4) & ~7 for i in (1, 3)]
    return memoryview(b"".join(raw[s : s + SAMPLE_WINDOW] for s in starts))


def encode_as(raw: bytes | memoryview, codec_id: int) -> bytes:
    """Return the blob of ``raw`` under codec ``codec_id``, whatever its size."""
    view = memoryview(raw).cast("B")
    if len(view) >= 1 << 32:
        raise ValueError(f"a chunk of {len(view)} bytes is too long for a blob")
    return b"".join([_HEADER.pack(codec_id, len(view)), *CODECS[codec_id].encode(view)])


def encode(raw: bytes | memoryview, element_size: int | None = None) -> bytes:
    """Return the blob of chunk ``raw``, stored the way that keeps it smallest.

    The codec is chosen by encoding a sample of a few KiB with each candidate: whole-chunk zstd
    and byte planes of 2 and 4 bytes (only of ``element_size`` if given, none if that is not 2
    or 4). The chunk is stored raw unless the winner stores it in at most 0.95 of its size.
    """
    view = memoryview(raw).cast("B")
    sizes = list(_PLANES_BY_SIZE) if element_size is None else [element_size]
    candidates = [ZSTD] + [_PLANES_BY_SIZE[k] for k in sizes if k in _PLANES_BY_SIZE]
    sample = _sample(view)
    best, best_size = RAW, MIN_GAIN * len(sample)
    for codec_id in candidates:
        size = sum(map(len, CODECS[codec_id].encode(sample)))
        if size <= best_size:
            best, best_size = codec_id, size
    if best != RAW:
        blob = encode_as(view, best)
        if len(blob) - _HEADER.size <= MIN_GAIN * len(view):
            return blob
    return encode_as(view, RAW)


def _parse_header(blob: bytes | memoryview) -> tuple[Codec, int]:
    if len(blob) < _HEADER.size:
        raise CodecError(f"blob of {len(blob)} bytes is shorter than its header")
    codec_id, length = _HEADER.unpack_from(blob)
    if codec_id not in CODECS:
        raise CodecError(f"unknown codec id {codec_id}")
    return CODECS[codec_id], length


def raw_length(blob: bytes | memoryview) -> int:
    """Return the raw length recorded in ``blob``'s header; raise CodecError if it has none."""
    return _parse_header(blob)[1]


def codec_name(blob: bytes | memoryview) -> str:
    """Return the name of ``blob``'s codec ("raw", "zstd", "planes2", "planes4")."""
    return _parse_header(blob)[0].name


def decode(blob: bytes | memoryview) -> bytes:
    """Return the raw bytes of ``blob``; raise CodecError if it is malformed.

    The result is not checked against any id: use ``decode_verified`` for bytes from a store.
    """
    codec, length = _parse_header(blob)
    return codec.decode(memoryview(blob)[_HEADER.size :], length)


def decode_verified(chunk_id: bytes, blob: bytes | memoryview) -> bytes:
    """Return the raw bytes of ``blob``, checked to hash to ``chunk_id``.

    Raises CorruptChunk(chunk_id, reason) if the blob is malformed or its bytes have another id.
    """
    try:
        raw = decode(blob)
    except CodecError as e:
        raise CorruptChunk(chunk_id, str(e)) from e
    if ids.chunk_id(raw) != chunk_id:
        raise CorruptChunk(chunk_id)
    return raw
