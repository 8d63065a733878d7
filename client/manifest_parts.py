"""Manifests larger than one gRPC message, sent and read in pieces (MetaService's
``PutManifestParts`` and ``GetManifestParts``); a node stores each as one record.

A file of ~40 GB in 64 KiB chunks has a manifest of ~24 MiB (about 40 bytes per chunk): past
what one message may carry, short of what the largest checkpoints need.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from chunkstore.errors import InvalidInput
from chunkstore.v1 import store_pb2 as pb

if TYPE_CHECKING:
    from .rpc import NodeClient

MiB = 1 << 20
PIECE_BYTES = 2 * MiB  # manifest bytes per ManifestPart: under gRPC's default 4 MiB message limit
ONE_MESSAGE_BYTES = 16 * MiB  # a manifest up to this size is put in one PutManifest message


class TooLarge(InvalidInput):
    """A manifest sent in pieces that adds up to more than the receiver takes."""


def pieces(manifest_id: bytes, data: bytes) -> list[pb.ManifestPart]:
    """``data`` as messages of at most PIECE_BYTES, the first carrying ``manifest_id``."""
    starts = range(0, max(len(data), 1), PIECE_BYTES)
    return [
        pb.ManifestPart(
            id=manifest_id if start == 0 else b"", data=data[start : start + PIECE_BYTES]
        )
        for start in starts
    ]


def joined(parts: Iterable[pb.ManifestPart], limit: int | None = None) -> tuple[bytes, bytes]:
    """``(id, data)`` of a manifest received as ``parts``. InvalidInput if the first part names
    no id or a later one does; TooLarge once the data passes ``limit`` bytes."""
    manifest_id, data, size = b"", [], 0
    for i, part in enumerate(parts):
        if (i == 0) != bool(part.id):
            raise InvalidInput("a manifest's first part, and only it, carries the manifest's id")
        manifest_id = manifest_id or part.id
        size += len(part.data)
        if limit is not None and size > limit:
            raise TooLarge(f"manifest too large: over {limit} bytes")
        data.append(part.data)
    if not manifest_id:
        raise InvalidInput("a manifest sent in parts needs at least one part")
    return manifest_id, b"".join(data)


def send_manifest(node: NodeClient, manifest_id: bytes, data: bytes, timeout: float) -> None:
    """Store a manifest on ``node``: in one PutManifest message, or in pieces past
    ONE_MESSAGE_BYTES."""
    if len(data) <= ONE_MESSAGE_BYTES:
        node.meta.PutManifest(pb.ManifestRecord(id=manifest_id, data=data), timeout=timeout)
    else:
        node.meta.PutManifestParts(iter(pieces(manifest_id, data)), timeout=timeout)
