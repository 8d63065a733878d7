from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from chunkstore import codec, ids
from chunkstore.errors import CorruptChunk

CHUNK = 64 * 1024


def fp32_weights(n: int, seed: int = 0) -> np.ndarray:
    """Normal weights like a trained layer's, with the special values floats can hold."""
    w = np.random.default_rng(seed).normal(0.0, 0.02, n).astype(np.float32)
    specials = [np.nan, np.inf, -np.inf, -0.0, 1e-40, -1e-45, np.finfo(np.float32).max]
    w[: len(specials)] = specials
    return w


def bf16_bytes(w: np.ndarray) -> bytes:
    """bfloat16 = the top two bytes of each float32."""
    return (w.view(np.uint32) >> 16).astype(np.uint16).tobytes()


RNG = np.random.default_rng(1)
DATA = {
    "empty": b"",
    "one-byte": b"\x7f",
    "three-bytes": b"abc",
    "random": RNG.bytes(CHUNK),
    "random-odd": RNG.bytes(CHUNK + 3),
    "zeros": bytes(CHUNK),
    "zeros-odd": bytes(4097),
    "fp32": fp32_weights(CHUNK // 4).tobytes(),
    "fp32-odd": fp32_weights(CHUNK // 4).tobytes()[:-1],
    "fp32-small": fp32_weights(1000).tobytes()[:-3],
    "bf16": bf16_bytes(fp32_weights(CHUNK // 2)),
    "bf16-odd": bf16_bytes(fp32_weights(CHUNK // 2))[:-1],
}


@pytest.mark.parametrize("codec_id", sorted(codec.CODECS))
@pytest.mark.parametrize("name", DATA)
def test_every_codec_round_trips(codec_id, name):
    raw = DATA[name]
    blob = codec.encode_as(raw, codec_id)
    assert codec.raw_length(blob) == len(raw)
    assert codec.codec_name(blob) == codec.CODECS[codec_id].name
    assert codec.decode(blob) == raw
    assert codec.decode_verified(ids.chunk_id(raw), blob) == raw


@pytest.mark.parametrize("element_size", [None, 1, 2, 4, 8])
@pytest.mark.parametrize("name", DATA)
def test_encode_round_trips_and_never_grows_beyond_header(name, element_size):
    raw = DATA[name]
    blob = codec.encode(raw, element_size)
    assert codec.decode(blob) == raw
    assert len(blob) <= len(raw) + 5


def test_encode_accepts_memoryview_of_any_format():
    w = fp32_weights(CHUNK // 4)
    assert codec.decode(codec.encode(memoryview(w))) == w.tobytes()


@pytest.mark.parametrize("element_size", [None, 4])
def test_fp32_weights_choose_planes_and_shrink(element_size):
    raw = DATA["fp32"]
    blob = codec.encode(raw, element_size)
    assert codec.codec_name(blob) == "planes4"
    assert len(blob) < 0.95 * len(raw)


def test_bf16_weights_choose_planes_and_shrink():
    raw = DATA["bf16"]
    blob = codec.encode(raw, element_size=2)
    assert codec.codec_name(blob) == "planes2"
    assert len(blob) < 0.95 * len(raw)


def test_element_size_without_planes_codec_gets_no_planes():
    assert codec.codec_name(codec.encode(DATA["fp32"], element_size=1)) in ("raw", "zstd")


@pytest.mark.parametrize("name", ["random", "random-odd", "empty", "one-byte"])
def test_incompressible_chunks_stay_raw(name):
    blob = codec.encode(DATA[name])
    assert codec.codec_name(blob) == "raw"
    assert len(blob) == len(DATA[name]) + 5


def test_zeros_compress_to_almost_nothing():
    assert len(codec.encode(DATA["zeros"])) < 100


def test_encode_is_thread_safe():
    chunks = [fp32_weights(CHUNK // 4, seed).tobytes() for seed in range(32)]
    expected = [codec.encode(c) for c in chunks]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(codec.encode, chunks)) == expected
        assert list(pool.map(codec.decode, expected)) == chunks


def assert_corrupt(chunk_id: bytes, blob: bytes) -> None:
    with pytest.raises(CorruptChunk) as info:
        codec.decode_verified(chunk_id, blob)
    assert info.value.chunk_id == chunk_id
    assert chunk_id.hex() in str(info.value)


def flip(blob: bytes, pos: int) -> bytes:
    return blob[:pos] + bytes([blob[pos] ^ 0xFF]) + blob[pos + 1 :]


def with_length(blob: bytes, length: int) -> bytes:
    return blob[:1] + length.to_bytes(4, "little") + blob[5:]


RAW = DATA["fp32-odd"]
CID = ids.chunk_id(RAW)
BLOBS = {c.name: codec.encode_as(RAW, i) for i, c in codec.CODECS.items()}


@pytest.mark.parametrize(
    "make_bad",
    [
        pytest.param(lambda b: b[:0], id="no-header"),
        pytest.param(lambda b: b[:4], id="truncated-header"),
        pytest.param(lambda b: b"\x04" + b[1:], id="unknown-codec-4"),
        pytest.param(lambda b: b"\xff" + b[1:], id="unknown-codec-255"),
        pytest.param(lambda b: b[:5], id="header-only"),
        pytest.param(lambda b: b[:-1], id="truncated-payload"),
        pytest.param(lambda b: b[: len(b) // 2], id="half-payload"),
        pytest.param(lambda b: b + b"\0", id="trailing-byte"),
        pytest.param(lambda b: flip(b, len(b) // 2), id="flipped-middle-byte"),
        pytest.param(lambda b: flip(b, len(b) - 1), id="flipped-last-byte"),
        pytest.param(lambda b: with_length(b, len(RAW) + 1), id="length-plus-one"),
        pytest.param(lambda b: with_length(b, len(RAW) - 1), id="length-minus-one"),
        pytest.param(lambda b: with_length(b, 0), id="length-zero"),
        pytest.param(lambda b: with_length(b, 2**32 - 1), id="length-max"),
    ],
)
@pytest.mark.parametrize("codec_name", BLOBS)
def test_malformed_blob_is_corrupt_chunk(codec_name, make_bad):
    assert_corrupt(CID, make_bad(BLOBS[codec_name]))


@pytest.mark.parametrize("codec_id", sorted(codec.CODECS))
def test_flipped_byte_never_yields_wrong_bytes(codec_id):
    # A flip that zstd ignores (e.g. the frame header's unused bit) still decodes to the right
    # bytes; every other flip must raise CorruptChunk, never another error or wrong bytes.
    raw = DATA["fp32-small"]
    cid = ids.chunk_id(raw)
    blob = codec.encode_as(raw, codec_id)
    for pos in range(len(blob)):
        try:
            assert codec.decode_verified(cid, flip(blob, pos)) == raw
        except CorruptChunk as e:
            assert e.chunk_id == cid


@pytest.mark.parametrize("method", [3, 255])
def test_unknown_plane_method_is_corrupt_chunk(method):
    blob = BLOBS["planes4"]
    assert_corrupt(CID, blob[:5] + bytes([method]) + blob[6:])


def test_hash_mismatch_is_corrupt_chunk():
    other = ids.chunk_id(b"another chunk")
    assert_corrupt(other, BLOBS["planes4"])


@pytest.mark.parametrize("bad", [b"", b"\x00\x01", b"\x09" + bytes(4)])
def test_header_readers_reject_malformed_headers(bad):
    with pytest.raises(codec.CodecError):
        codec.raw_length(bad)
    with pytest.raises(codec.CodecError):
        codec.codec_name(bad)
