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

    table      k entries of (1 byte method: 0 raw / 1 zstd / 2 sparse, 4 bytes stored size)
    planes     the k stored planes, in order
    remainder  the last ``length % k`` raw bytes

A sparse plane (mostly zero bytes, like the exponent planes of XOR deltas between successive
checkpoints, see :mod:`chunkstore.delta`) is stored as its nonzero bytes: a 4-byte count n,
then n positions (2 bytes each if the plane has at most 65536 bytes, else 4), ascending, then
the n byte values. It is chosen over zstd when at most 1.5x its size, since it decodes several
times faster than zstd's many short matches.

Ids 4 and up are free for later codecs: add an object with ``name``, ``encode`` and ``decode``
to ``CODECS``; callers only use the functions below. (Deltas between versions are not a codec:
an XOR chunk is an ordinary chunk, see :mod:`chunkstore.delta`; :func:`decode_xor`,
:func:`decode_xor_many`, :func:`xor_into` and :func:`planes_of` let it be rebuilt without extra
passes.)
A codec never changes a chunk's id, which is the BLAKE3 of the raw bytes.

Decoding allocates at most the header's raw length (up to 4 GiB): a caller that takes blobs from
the network should check ``raw_length(blob)`` against its maximum chunk size first.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import zstandard

from chunkstore import ids
from chunkstore.errors import CorruptChunk

RAW, ZSTD, PLANES2, PLANES4 = 0, 1, 2, 3
# Whole chunks: zstd level 1. Byte planes: level 1 with min_match 7 and a 64-entry hash table
# (level 1 picks min_match 5 for small inputs). The sign/exponent plane of float weights holds
# few real matches: its gain is Huffman coding, which spurious short matches only disturb. On
# normal fp32/bf16 weights this stores 0.34 of the plane instead of 0.38, ~2.8x faster to
# compress and ~2.4x faster to decompress. Levels -1 to 3, min_match 5 or 6 and larger hash
# tables measured worse in both.
_PLANE_PARAMS = zstandard.ZstdCompressionParameters.from_level(1, min_match=7, hash_log=6)
MIN_GAIN = 0.95  # compressed data is kept only if it is at most this fraction of its input
SPARSE_OVER_ZSTD = 1.5  # a sparse plane is kept if at most this times its zstd size
SAMPLE_WINDOW = 2048  # bytes taken from each of two places of a chunk to choose its codec

_HEADER = struct.Struct("<BI")
_PLANE_ENTRY = struct.Struct("<BI")
_COUNT = struct.Struct("<I")
PLANE_RAW, PLANE_ZSTD, PLANE_SPARSE = 0, 1, 2
_local = threading.local()


#: Raw bytes as decoding gives them: bytes, or a bytes-like object (a memoryview or a 1-D uint8
#: array) that may share memory with the blob it was decoded from.
RawBuffer = bytes | memoryview | np.ndarray


class CodecError(Exception):
    """A blob that cannot be decoded; str() says why."""


class Codec(Protocol):
    """One way of storing a chunk's raw bytes as a payload."""

    name: str

    def encode(self, raw: memoryview) -> list[bytes | memoryview]:
        """Return the payload for ``raw``, as parts to be concatenated."""

    def decode(self, payload: memoryview, length: int) -> RawBuffer:
        """Return the ``length`` raw bytes of ``payload`` (possibly a view of it); raise
        CodecError if it is malformed."""


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

    def decode(self, payload: memoryview, length: int) -> RawBuffer:
        if len(payload) != length:
            raise CodecError(f"raw payload has {len(payload)} bytes, expected {length}")
        return payload


class Zstd:
    name = "zstd"

    def encode(self, raw: memoryview) -> list[bytes | memoryview]:
        return [_zstd().whole.compress(raw)]

    def decode(self, payload: memoryview, length: int) -> RawBuffer:
        return _decompress(payload, length)


class Planes:
    """Byte planes of k-byte elements, each plane zstd-compressed only where that pays."""

    def __init__(self, k: int):
        self.k = k
        self.name = f"planes{k}"
        self._table = struct.Struct("<" + "BI" * k)  # the k entries of _PLANE_ENTRY

    def encode(self, raw: memoryview) -> list[bytes | memoryview]:
        k, m = self.k, len(raw) // self.k
        planes = _split(np.frombuffer(raw, np.uint8, count=m * k), k)
        compressor, table, stored = _zstd().plane, [], []
        for row in planes:
            plane = memoryview(row)
            nonzero = int(np.count_nonzero(row))
            sparse_size = _COUNT.size + nonzero * (_position_size(m) + 1)
            if sparse_size > MIN_GAIN * m and _incompressible(compressor, plane):
                table.append(_PLANE_ENTRY.pack(PLANE_RAW, m))
                stored.append(plane)
                continue
            packed = compressor.compress(plane)
            if sparse_size <= MIN_GAIN * m and sparse_size <= SPARSE_OVER_ZSTD * len(packed):
                sparse = _encode_sparse(row)
                table.append(_PLANE_ENTRY.pack(PLANE_SPARSE, len(sparse)))
                stored.append(sparse)
            elif len(packed) <= MIN_GAIN * m:
                table.append(_PLANE_ENTRY.pack(PLANE_ZSTD, len(packed)))
                stored.append(packed)
            else:
                table.append(_PLANE_ENTRY.pack(PLANE_RAW, m))
                stored.append(plane)
        return [*table, *stored, raw[m * k :]]

    def decode(self, payload: memoryview, length: int) -> RawBuffer:
        planes, remainder = self.decode_planes(payload, length)
        return _interleave(planes, remainder, length)

    def decode_planes(
        self, payload: memoryview, length: int, sparse: bool = False
    ) -> tuple[list, memoryview]:
        """The k planes of ``payload`` and its raw remainder, not yet interleaved; with
        ``sparse``, a sparse plane is given as its (positions, values) arrays."""
        table, remainder = self.plane_table(payload, length)
        m = length // self.k
        planes: list = []
        for j, (method, stored) in enumerate(table):
            if method == PLANE_ZSTD:
                planes.append(_decompress(stored, m))
            elif method == PLANE_SPARSE:
                parts = _sparse_parts(stored, m, self.name, j)
                planes.append(parts if sparse else _dense(parts, m))
            else:
                planes.append(stored)
        return planes, remainder

    def plane_table(
        self, payload: memoryview, length: int
    ) -> tuple[list[tuple[int, memoryview]], memoryview]:
        """``(method, stored bytes)`` of each of the k planes of ``payload``, and its raw
        remainder, with the sizes checked; nothing is decompressed yet."""
        k, m = self.k, length // self.k
        offset = self._table.size
        if len(payload) < offset:
            raise CodecError(f"{self.name} payload too short for its plane table")
        entries = self._table.unpack_from(payload)
        table = []
        for j in range(k):
            method, size = entries[2 * j], entries[2 * j + 1]
            stored = payload[offset : offset + size]
            if len(stored) != size:
                raise CodecError(f"{self.name} plane {j} is truncated")
            if method not in (PLANE_ZSTD, PLANE_SPARSE) and not (method == PLANE_RAW and size == m):
                raise CodecError(f"{self.name} plane {j} has bad method {method} or size {size}")
            table.append((method, stored))
            offset += size
        if len(payload) - offset != length - m * k:
            raise CodecError(f"{self.name} payload has a wrong remainder")
        return table, payload[offset:]


PROBE_BYTES = 4096  # a plane whose first bytes do not shrink is stored without compressing


def _incompressible(compressor: zstandard.ZstdCompressor, plane: memoryview) -> bool:
    """Whether a probe of the plane's first bytes shows zstd will not pay (mantissa planes
    of float weights), so the whole plane need not be compressed to find out."""
    if len(plane) < 4 * PROBE_BYTES:
        return False
    return len(compressor.compress(plane[:PROBE_BYTES])) > MIN_GAIN * PROBE_BYTES


def _position_size(m: int) -> int:
    return 2 if m <= 1 << 16 else 4


def _encode_sparse(plane: np.ndarray) -> bytes:
    positions = np.flatnonzero(plane != 0)  # ~10x faster than on the uint8 values
    dtype = f"<u{_position_size(len(plane))}"
    return b"".join(
        [_COUNT.pack(len(positions)), positions.astype(dtype).tobytes(), plane[positions].tobytes()]
    )


def _sparse_parts(
    stored: memoryview, m: int, codec_name: str, j: int
) -> tuple[np.ndarray, np.ndarray]:
    """The (positions, values) of sparse plane ``j`` of ``m`` bytes, checked."""
    if len(stored) < _COUNT.size:
        raise CodecError(f"{codec_name} plane {j} is too short for a sparse plane")
    (count,) = _COUNT.unpack_from(stored)
    width = _position_size(m)
    if len(stored) != _COUNT.size + count * (width + 1) or count > m:
        raise CodecError(
            f"{codec_name} plane {j}: a sparse plane of {count} bytes has a wrong size"
        )
    positions = np.frombuffer(stored, f"<u{width}", count, _COUNT.size)
    # Ascending as written; only bounds are checked here, since positions out of order change
    # the decoded bytes, which their chunk's id then rejects.
    if count and int(positions.max()) >= m:
        raise CodecError(f"{codec_name} plane {j}: a sparse position lies outside the plane")
    return positions, np.frombuffer(stored, np.uint8, count, _COUNT.size + count * width)


def _dense(parts: tuple[np.ndarray, np.ndarray], m: int) -> np.ndarray:
    out = np.zeros(m, np.uint8)
    out[parts[0]] = parts[1]
    return out


def _xor_sparse(out: np.ndarray, parts: tuple[np.ndarray, np.ndarray], k: int, j: int) -> None:
    """XOR sparse plane ``j`` of elements of ``k`` bytes into the interleaved bytes ``out``,
    at its nonzero bytes only."""
    positions, values = parts
    if len(positions):
        where = np.multiply(positions, k, dtype=np.intp)
        where += j
        out[where] ^= values


def _split(elements: np.ndarray, k: int) -> np.ndarray:
    """The k byte planes (rows of a (k, m) array) of ``elements``, k-byte elements as bytes.

    Planes of 2- and 4-byte elements come from shifts of 16-bit words, several times faster
    than numpy's strided byte copies.
    """
    m = len(elements) // k
    planes = np.empty((k, m), np.uint8)
    if k == 2:
        words = elements.view("<u2")
        np.copyto(planes[0], words, casting="unsafe")  # keeps the low byte
        np.right_shift(words, 8, out=planes[1], casting="unsafe")
    elif k == 4:
        values = elements.view("<u4")
        for rows, words in ((planes[:2], values.astype("<u2")), (planes[2:], values >> 16)):
            np.copyto(rows[0], words, casting="unsafe")
            np.right_shift(words, 8, out=rows[1], casting="unsafe")
    else:
        planes[:] = elements.reshape(m, k).T
    return planes


def _join2(low: np.ndarray, high: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = high[i] << w | low[i]``: two arrays of w-bit values into one of 2w bits."""
    np.multiply(high, 1 << (8 * high.itemsize), out=out, dtype=out.dtype, casting="unsafe")
    out |= low


def _interleave(planes: list, remainder: RawBuffer, length: int) -> np.ndarray:
    """Elements of ``len(planes)`` bytes from their planes, then the remainder's bytes (a
    uint8 array). Planes of 2 and 4 are joined by 16- and 32-bit arithmetic, 1.4-3x faster
    than strided byte copies."""
    k = len(planes)
    m = length // k
    out = np.empty(length, np.uint8)
    rows = [np.frombuffer(plane, np.uint8) for plane in planes]
    if k == 2:
        _join2(rows[0], rows[1], out[: 2 * m].view("<u2"))
    elif k == 4:
        low, high = np.empty(m, "<u2"), np.empty(m, "<u2")
        _join2(rows[0], rows[1], low)
        _join2(rows[2], rows[3], high)
        _join2(low, high, out[: 4 * m].view("<u4"))
    else:
        elements = out[: m * k].reshape(m, k)
        for j, row in enumerate(rows):
            elements[:, j] = row
    if m * k < length:
        out[m * k :] = np.frombuffer(remainder, np.uint8)
    return out


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


def _choose(view: memoryview, element_size: int | None) -> tuple[int, float]:
    """The codec that stores a sample of ``view`` smallest, and the share of the sample it
    keeps (1.0 for raw)."""
    sizes = list(_PLANES_BY_SIZE) if element_size is None else [element_size]
    candidates = [ZSTD] + [_PLANES_BY_SIZE[k] for k in sizes if k in _PLANES_BY_SIZE]
    sample = _sample(view)
    if not len(sample):
        return RAW, 1.0
    best, best_size = RAW, MIN_GAIN * len(sample)
    for codec_id in candidates:
        size = sum(map(len, CODECS[codec_id].encode(sample)))
        if size <= best_size:
            best, best_size = codec_id, size
    return best, (best_size / len(sample) if best != RAW else 1.0)


def estimate(raw: bytes | memoryview, element_size: int | None = None) -> int:
    """Roughly the size of ``encode(raw, element_size)``, from the sample it chooses by.

    Costs a few KiB of encoding, not the chunk's; a chunk whose sampled windows are not typical
    of it (a sparse change, say) can be far off.
    """
    view = memoryview(raw).cast("B")
    return _HEADER.size + round(_choose(view, element_size)[1] * len(view))


def encode(raw: bytes | memoryview, element_size: int | None = None) -> bytes:
    """Return the blob of chunk ``raw``, stored the way that keeps it smallest.

    With an ``element_size`` of 2 or 4 (a tensor's chunk), byte planes of that size are used
    and each plane is compressed only if a probe of it shrinks. Otherwise the codec is chosen
    by encoding a sample of a few KiB with each candidate: whole-chunk zstd and byte planes of
    2 and 4 bytes. The chunk is stored raw unless the result is at most 0.95 of its size.
    """
    view = memoryview(raw).cast("B")
    if element_size in _PLANES_BY_SIZE:  # a tensor's elements: planes, each judged on its own
        best = _PLANES_BY_SIZE[element_size]
    else:
        best, _ = _choose(view, element_size)
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
    return bytes(decode_buffer(blob))


def decode_buffer(blob: bytes | memoryview) -> RawBuffer:
    """As :func:`decode`, without copying the result into a bytes object: it may be a view of
    ``blob`` (valid as long as ``blob`` is) or a uint8 array."""
    codec, length = _parse_header(blob)
    return codec.decode(memoryview(blob)[_HEADER.size :], length)


def decode_xor(blob: bytes | memoryview, other: bytes | memoryview) -> np.ndarray:
    """``decode(blob) XOR decode(other)`` as a uint8 array, for two blobs of the same raw length.

    When both are byte planes of the same element size the planes are XORed before they are
    interleaved, which saves one interleaving pass. Raises CodecError like :func:`decode`.
    """
    pair = _PlanePair.of(blob, other)
    if pair is None:
        a = np.frombuffer(decode_buffer(blob), np.uint8)
        b = np.frombuffer(decode_buffer(other), np.uint8)
        return np.bitwise_xor(a, b)
    m = pair.length // pair.codec.k
    return pair.xor([_decompress(frame, m) for frame in pair.frames()])


def decode_xor_many(
    pairs: Sequence[tuple[bytes | memoryview, bytes | memoryview]],
) -> list[np.ndarray | None]:
    """:func:`decode_xor` of each pair, or None for a pair that does not decode (decode_xor
    of that pair says why).

    The zstd planes of all pairs are decompressed in one call, which releases the GIL once
    for the lot instead of once per plane: a reader's threads then hand it to each other far
    less often, which costs them more than the calls themselves.
    """
    out: list[np.ndarray | None] = [None] * len(pairs)
    batched: list[tuple[int, _PlanePair]] = []
    for i, (blob, other) in enumerate(pairs):
        try:
            pair = _PlanePair.of(blob, other)
            if pair is None:
                out[i] = decode_xor(blob, other)
            else:
                batched.append((i, pair))
        except CodecError:
            pass
    frames = [pair.frames() for _, pair in batched]
    flat: list[memoryview] = []
    sizes: list[int] = []
    for (_, pair), group in zip(batched, frames, strict=True):
        flat += group
        sizes += [pair.length // pair.codec.k] * len(group)
    try:
        planes = _decompress_many(flat, sizes)
    except CodecError:  # one damaged frame fails the call: decode the pairs one by one
        planes = None
    start = 0
    for (i, pair), group in zip(batched, frames, strict=True):
        try:
            if planes is None:
                out[i] = decode_xor(*pairs[i])
            else:
                out[i] = pair.xor(planes[start : start + len(group)])
        except CodecError:
            pass
        start += len(group)
    return out


def _decompress_many(frames: list[memoryview], sizes: list[int]) -> list:
    """The zstd ``frames`` decompressed (bytes-like objects), each checked to hold its size."""
    if not frames:
        return []
    try:
        result = _zstd().decompressor.multi_decompress_to_buffer(
            frames, decompressed_sizes=np.array(sizes, np.uint64).tobytes()
        )
    except (zstandard.ZstdError, ValueError) as e:
        raise CodecError(f"zstd: {e}") from e
    return [result[i] for i in range(len(frames))]


@dataclass(frozen=True)
class _PlanePair:
    """Two byte-plane blobs of one element size and raw length, parsed, not yet decoded."""

    codec: Planes
    length: int
    tables: tuple[list[tuple[int, memoryview]], list[tuple[int, memoryview]]]
    remainders: tuple[memoryview, memoryview]

    @classmethod
    def of(cls, blob: bytes | memoryview, other: bytes | memoryview) -> _PlanePair | None:
        """The pair, None if the blobs are not byte planes of one element size; CodecError if
        either is malformed or their raw lengths differ."""
        codec, length = _parse_header(blob)
        other_codec, other_length = _parse_header(other)
        if length != other_length:
            raise CodecError(f"cannot XOR blobs of {length} and {other_length} raw bytes")
        if not (isinstance(codec, Planes) and isinstance(other_codec, Planes)):
            return None
        if codec.k != other_codec.k:
            return None
        table, rest = codec.plane_table(memoryview(blob)[_HEADER.size :], length)
        other_table, other_rest = codec.plane_table(memoryview(other)[_HEADER.size :], length)
        return cls(codec, length, (table, other_table), (rest, other_rest))

    def frames(self) -> list[memoryview]:
        """The zstd frames of both blobs' planes, plane by plane (the blob's, then the
        other's)."""
        return [
            stored
            for entries in zip(*self.tables, strict=True)
            for method, stored in entries
            if method == PLANE_ZSTD
        ]

    def xor(self, decompressed: Sequence) -> np.ndarray:
        """The XOR of the two blobs' raw bytes, given their :meth:`frames` decompressed.

        Dense planes are XORed before the one interleaving pass; a sparse plane is XORed
        afterwards, at its nonzero bytes only.
        """
        k, m = self.codec.k, self.length // self.codec.k
        frames = iter(decompressed)
        dense: list[np.ndarray] = []
        fixes: list[tuple[int, memoryview]] = []
        for j, ((method, a), (other_method, b)) in enumerate(zip(*self.tables, strict=True)):
            if method == PLANE_ZSTD:
                a = next(frames)
            if other_method == PLANE_ZSTD:
                b = next(frames)
            if method == PLANE_SPARSE:
                method, other_method, a, b = other_method, method, b, a
            if method == PLANE_SPARSE:  # both sparse
                dense.append(_dense(_sparse_parts(a, m, self.codec.name, j), m))
                fixes.append((j, b))
            elif other_method == PLANE_SPARSE:
                dense.append(np.frombuffer(a, np.uint8))
                fixes.append((j, b))
            else:
                dense.append(np.bitwise_xor(np.frombuffer(a, np.uint8), np.frombuffer(b, "u1")))
        rest, other_rest = self.remainders
        if len(rest):
            rest = np.bitwise_xor(np.frombuffer(rest, np.uint8), np.frombuffer(other_rest, "u1"))
        out = _interleave(dense, rest, self.length)
        for j, stored in fixes:
            _xor_sparse(out, _sparse_parts(stored, m, self.codec.name, j), k, j)
        return out


def planes_of(blob: bytes | memoryview) -> tuple[list[np.ndarray], memoryview] | None:
    """The byte planes (uint8 arrays) and raw remainder of a byte-plane blob, not interleaved;
    None for a blob of another codec. Raises CodecError like :func:`decode`."""
    codec, length = _parse_header(blob)
    if not isinstance(codec, Planes):
        return None
    planes, rest = codec.decode_planes(memoryview(blob)[_HEADER.size :], length)
    return [np.frombuffer(p, np.uint8) for p in planes], rest


def xor_into(target: np.ndarray, blob: bytes | memoryview) -> None:
    """XOR ``decode(blob)`` into ``target`` (a writable uint8 array of its raw length).

    The bytes of sparse planes are XORed where they are nonzero only, so a blob of mostly
    zeros costs little more than its nonzero bytes. Raises CodecError like :func:`decode`.
    """
    codec, length = _parse_header(blob)
    if len(target) != length:
        raise CodecError(f"cannot XOR a blob of {length} raw bytes into {len(target)} bytes")
    if not isinstance(codec, Planes):
        target ^= np.frombuffer(decode_buffer(blob), np.uint8)
        return
    k, m = codec.k, length // codec.k
    planes, rest = codec.decode_planes(memoryview(blob)[_HEADER.size :], length, True)
    elements = target[: m * k].reshape(m, k)
    for j, plane in enumerate(planes):
        if isinstance(plane, tuple):
            _xor_sparse(target, plane, k, j)
        else:
            elements[:, j] ^= np.frombuffer(plane, np.uint8)
    if len(rest):
        target[m * k :] ^= np.frombuffer(rest, np.uint8)


def decode_verified(chunk_id: bytes, blob: bytes | memoryview) -> bytes:
    """Return the raw bytes of ``blob``, checked to hash to ``chunk_id``.

    Raises CorruptChunk(chunk_id, reason) if the blob is malformed or its bytes have another id.
    """
    return bytes(verified_buffer(chunk_id, blob))


def verified_buffer(chunk_id: bytes, blob: bytes | memoryview) -> RawBuffer:
    """As :func:`decode_verified`, without the copy into a bytes object (see
    :func:`decode_buffer`): for bytes that are written out at once."""
    try:
        raw = decode_buffer(blob)
    except CodecError as e:
        raise CorruptChunk(chunk_id, str(e)) from e
    if ids.chunk_id(raw) != chunk_id:
        raise CorruptChunk(chunk_id)
    return raw
