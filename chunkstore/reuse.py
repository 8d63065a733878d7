"""Reusing what a pull's destination already holds.

A pull over an older copy of a file (``pull --force`` onto a previous checkpoint) copies each
chunk that the old file holds where this version has it, instead of fetching and decoding it:
whole files that are already right, and in safetensors files every tensor whose bytes did not
change, wherever a different header moved it. A chunk's place in the old file is a guess,
never trusted: its bytes are read once, and written only if they hash to the chunk's id.

Chunks are tried by group: the chunks of one tensor, or a run of :data:`GROUP_CHUNKS` chunks
of other bytes. The rest of a group is tried only if its first chunk matched, so an old file
that changed everywhere (every weight nudged by a training step) costs one chunk's read and
hash per group.
"""

from __future__ import annotations

import os
import struct
from bisect import bisect_right
from collections.abc import Callable, Iterator
from pathlib import Path

from chunkstore import ids
from chunkstore.model import Manifest
from chunkstore.parallel import for_each
from chunkstore.tensor_index import MAX_HEADER, read_index

#: Chunks of bytes outside tensors that stand or fall with the first of them.
GROUP_CHUNKS = 16

#: ``(chunk id, offset in the new file, length, offset in the old file)``
Guess = tuple[bytes, int, int, int]


def reuse_chunks(
    manifest: Manifest,
    old: Path,
    write: Callable[[bytes, bytes], None],
    workers: int = 2,
) -> set[bytes]:
    """Hand ``write(id, raw)`` every chunk of ``manifest`` that the file ``old`` holds where
    this file has it (or, in a tensor ``old`` also has, as far from the tensor's start),
    checked against its id; return the ids handed over. ``write`` is called from ``workers``
    threads at once. An unreadable ``old`` reuses nothing."""
    try:
        fd = os.open(old, os.O_RDONLY)
    except OSError:
        return set()
    try:
        size = os.fstat(fd).st_size
        found: set[bytes] = set()

        def try_group(group: list[Guess]) -> None:
            for i, (cid, _, length, at) in enumerate(group):
                if cid in found:
                    continue
                data = os.pread(fd, length, at) if at + length <= size else b""
                if len(data) != length or ids.chunk_id(data) != cid:
                    if i == 0:
                        return  # this group changed: do not read the rest
                    continue
                found.add(cid)
                write(cid, data)

        for_each(try_group, _groups(manifest, _tensor_starts(fd, size)), workers, "reuse")
        return found
    finally:
        os.close(fd)


def _groups(manifest: Manifest, old_starts: dict[str, tuple[int, int]]) -> Iterator[list[Guess]]:
    """The manifest's chunks with where the old file would hold them, grouped: one group per
    tensor the old file also has (same name and size), runs of GROUP_CHUNKS chunks elsewhere.
    Chunks of tensors whose old copy differs in size are not tried."""
    tensors = sorted(manifest.tensors, key=lambda t: t.begin)
    begins = [t.begin for t in tensors]
    run: list[Guess] = []
    group: list[Guess] = []
    group_tensor: str | None = None
    pos = 0
    for cid, length in manifest.chunks:
        k = bisect_right(begins, pos) - 1
        tensor = tensors[k] if k >= 0 and pos + length <= tensors[k].end else None
        if tensor is None:
            run.append((cid, pos, length, pos))
            if len(run) == GROUP_CHUNKS:
                yield run
                run = []
        else:
            old = old_starts.get(tensor.name)
            if tensor.name != group_tensor and group:
                yield group
                group = []
            group_tensor = tensor.name
            if old is not None and old[1] == tensor.end - tensor.begin:
                group.append((cid, pos, length, old[0] + pos - tensor.begin))
        pos += length
    if group:
        yield group
    if run:
        yield run


def _tensor_starts(fd: int, size: int) -> dict[str, tuple[int, int]]:
    """Name -> (start, byte length) of each tensor of the old file, if it is safetensors."""
    prefix = os.pread(fd, 8, 0)
    if len(prefix) < 8:
        return {}
    (length,) = struct.unpack("<Q", prefix)
    if length > min(MAX_HEADER, size):
        return {}
    index = read_index(prefix + os.pread(fd, length, 8), size)
    if index is None:
        return {}
    return {t.name: (t.begin, t.end - t.begin) for t in index.tensors}
