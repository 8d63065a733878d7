"""The hand-written chunk messages (chunkstore.client.wire) against protobuf's own encoding,
and manifests sent in pieces (chunkstore.client.manifest_parts)."""

from __future__ import annotations

import os

import pytest

from chunkstore.client import manifest_parts, wire
from chunkstore.errors import InvalidInput
from chunkstore.v1 import store_pb2 as pb

PAIRS = [(os.urandom(32), b"\0" * 5), (os.urandom(32), os.urandom(70_000)), (os.urandom(32), b"")]


def as_bytes(chunks: list[wire.WireChunk]) -> list[tuple[bytes, bytes]]:
    return [(cid, bytes(blob)) for cid, blob in chunks]


@pytest.mark.parametrize("seq", [0, 1, 300, 2**63])
def test_put_batch_reads_what_protobuf_writes_and_writes_what_it_reads(seq):
    message = pb.PutChunksBatch(
        seq=seq, chunks=[pb.EncodedChunk(id=cid, blob=blob) for cid, blob in PAIRS]
    )
    data = message.SerializeToString(deterministic=True)
    got_seq, chunks = wire.read_put_chunks_batch(data)
    assert (got_seq, as_bytes(chunks)) == (seq, PAIRS)
    assert all(isinstance(blob, memoryview) for _, blob in chunks)  # no copies
    assert wire.put_chunks_batch(seq, PAIRS) == data


def test_chunk_batch_round_trip():
    message = pb.ChunkBatch(chunks=[pb.EncodedChunk(id=cid, blob=blob) for cid, blob in PAIRS])
    data = message.SerializeToString(deterministic=True)
    assert wire.chunk_batch(PAIRS) == data
    assert as_bytes(wire.read_chunk_batch(data)) == PAIRS
    assert pb.ChunkBatch.FromString(wire.chunk_batch(PAIRS)) == message
    assert wire.read_chunk_batch(b"") == []


def test_unknown_fields_are_skipped_and_field_order_does_not_matter():
    cid, blob = PAIRS[1]
    chunk = (
        b"\x12" + wire.varint(len(blob)) + blob  # blob before id
        + b"\x18\x07"  # unknown varint field 3
        + b"\x0a" + wire.varint(32) + cid
        + b"\x25" + b"abcd"  # unknown fixed32 field 4
    )  # fmt: skip
    data = (
        b"\x12" + wire.varint(len(chunk)) + chunk
        + b"\x19" + b"12345678"  # unknown fixed64 field 3
        + b"\x08\x05"  # seq after the chunks
    )  # fmt: skip
    assert pb.PutChunksBatch.FromString(data).seq == 5  # protobuf agrees that it is valid
    seq, chunks = wire.read_put_chunks_batch(data)
    assert (seq, as_bytes(chunks)) == (5, [(cid, blob)])


@pytest.mark.parametrize(
    "data",
    [
        b"\x08",  # a varint cut short
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a varint of 11 bytes
        b"\x12\x05abc",  # a field longer than the message
        b"\x12\x03\x0a\x05a",  # a field longer than the chunk that holds it
        b"\x0b",  # wire type 3 (groups)
        b"\x00\x01",  # field number 0
    ],
    ids=["short-varint", "long-varint", "overrun", "inner-overrun", "group", "field-0"],
)
def test_malformed_messages_raise_wire_error(data):
    with pytest.raises(wire.WireError):
        wire.read_put_chunks_batch(data)


# manifests in pieces


def test_a_manifest_in_pieces_joins_back_whole():
    data = bytes(range(256)) * (20_000)  # ~5 MB: three pieces
    parts = manifest_parts.pieces(b"i" * 32, data)
    assert len(parts) == 3 and parts[0].id == b"i" * 32 and not parts[1].id
    assert manifest_parts.joined(parts) == (b"i" * 32, data)
    assert manifest_parts.joined(manifest_parts.pieces(b"e" * 32, b"")) == (b"e" * 32, b"")


@pytest.mark.parametrize(
    "parts, message",
    [
        ([], "at least one part"),
        ([pb.ManifestPart(data=b"x")], "first part, and only it"),
        ([pb.ManifestPart(id=b"i", data=b"x"), pb.ManifestPart(id=b"j")], "first part, and only"),
    ],
)
def test_malformed_manifest_parts_are_refused(parts, message):
    with pytest.raises(InvalidInput, match=message):
        manifest_parts.joined(parts)


def test_manifest_parts_past_the_limit_are_refused():
    parts = manifest_parts.pieces(b"i" * 32, b"x" * (5 << 20))
    with pytest.raises(manifest_parts.TooLarge, match="manifest too large: over 4194304 bytes"):
        manifest_parts.joined(iter(parts), limit=4 << 20)
