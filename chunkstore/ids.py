"""Content ids: BLAKE3-256 of raw chunk bytes, and file digests derived from chunk lists."""

from collections.abc import Iterable

import blake3

ID_SIZE = 32


def chunk_id(data: bytes | memoryview) -> bytes:
    """Return the 32-byte BLAKE3-256 digest of ``data``."""
    return blake3.blake3(data).digest()


def record_id(encoded: bytes) -> bytes:
    """Return the id of a canonically encoded record (manifest, version)."""
    return blake3.blake3(encoded).digest()


def file_digest(chunks: Iterable[tuple[bytes, int]]) -> bytes:
    """Digest of a file from its ordered (chunk id, length) list, without reading its bytes.

    Two files have the same digest exactly when they have the same chunks in the same order,
    which (chunk ids being collision-resistant) means the same bytes under the same chunking.
    """
    h = blake3.blake3(b"chunkstore-file-v1")
    for cid, length in chunks:
        h.update(cid)
        h.update(length.to_bytes(8, "little"))
    return h.digest()


def short(id_: bytes, digits: int = 8) -> str:
    """The first ``digits`` hex digits of an id, as shown to users."""
    return id_.hex()[:digits]
