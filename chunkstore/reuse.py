"""Reusing what a pull's destination already holds.

A pull over an older copy of a file (``pull --force`` onto a previous checkpoint) copies each
chunk that the old file holds where this version has it, instead of fetching and decoding it:
whole files that are already right, and in files with tensors every tensor whose bytes did not
change, wherever a different header moved it. A chunk's place in the old file is a guess,
never trusted: its bytes are read once, and written only if they hash to the chunk's id.

Chunks are tried by group: the chunks of one tensor, or a run of :data:`GROUP_CHUNKS` chunks
of other bytes. The rest of a group is tried only if its first chunk matched, so an old file
that changed everywhere (every weight nudged by a training step) costs one chunk's read and
hash per group. Outside tensors a group's first chunk is looked for at its own offset, then
as far from the old file's end as from the new one's: where bytes were inserted or removed
near the start (a longer header, in any format), everything after them is found there.

The same guesses find the base chunks of delta-coded chunks (:func:`local_bases`), when the
old file is the version the deltas were coded against; and :func:`in_place` and
:func:`holds` check a file against its own manifest (a pull resuming in its partial file,
``status``).
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from chunkstore import ids
from chunkstore.byte_readers import FileReader
from chunkstore.file_index import read_index
from chunkstore.model import Manifest
from chunkstore.parallel import for_each
from chunkstore.progress import NoProgress, Progress

#: Chunks of bytes outside tensors that stand or fall with the first of them.
GROUP_CHUNKS = 16

#: ``(chunk id, length, offsets in the old file to look at)``
Guess = tuple[bytes, int, tuple[int, ...]]


def reuse_chunks(
    manifest: Manifest,
    old: Path,
    write: Callable[[bytes, bytes], None],
    wanted: set[bytes] | None = None,
    workers: int = 2,
) -> set[bytes]:
    """Hand ``write(id, raw)`` every chunk of ``manifest`` (of those in ``wanted``, if given)
    that the file ``old`` holds where this file has it (or, in a tensor ``old`` also has, as
    far from the tensor's start), checked against its id; return the ids handed over.
    ``write`` is called from ``workers`` threads at once. An unreadable ``old`` reuses
    nothing."""
    found: set[bytes] = set()

    def keep(cid: bytes, data: bytes, at: int) -> None:
        if cid not in found:
            found.add(cid)
            write(cid, data)

    expect = {cid: cid for cid, _ in manifest.chunks if wanted is None or cid in wanted}
    _scan(manifest, old, expect, keep, workers)
    return found


def local_bases(
    manifest: Manifest, old: Path, bases: Mapping[bytes, bytes], workers: int = 2
) -> dict[bytes, int]:
    """Where ``old`` holds the base chunks of delta-coded chunks: for each chunk of ``bases``
    (chunk id -> id of its base, of the same dtype) whose base the old file holds where this
    file has the chunk (the old file being the version the delta was coded against), the
    offset of the base's bytes in ``old``."""
    found: dict[bytes, int] = {}

    def keep(cid: bytes, data: bytes, at: int) -> None:
        found[cid] = at

    _scan(manifest, old, bases, keep, workers)
    return found


def _scan(
    manifest: Manifest,
    old: Path,
    expect: Mapping[bytes, bytes],
    keep: Callable[[bytes, bytes, int], None],
    workers: int,
) -> None:
    """Call ``keep(id, bytes, offset in old)`` for every chunk of ``expect`` (chunk id -> the
    id its bytes in ``old`` should have) found where :func:`_groups` guesses."""
    try:
        fd = os.open(old, os.O_RDONLY)
    except OSError:
        return
    try:
        size = os.fstat(fd).st_size

        def read(cid: bytes, length: int, at: int) -> bytes | None:
            return _bytes_of(fd, size, expect[cid], length, at)

        def try_group(group: list[Guess]) -> None:
            (cid, length, places), rest = group[0], group[1:]
            for place, at in enumerate(places):  # where the first chunk is, the rest are
                data = read(cid, length, at)
                if data is not None:
                    keep(cid, data, at)
                    for other, n, others_places in rest:
                        at = others_places[place]
                        if (data := read(other, n, at)) is not None:
                            keep(other, data, at)
                    return

        groups = _groups(manifest, _tensor_starts(fd, size), size - manifest.size)
        wanted = ([g for g in group if g[0] in expect] for group in groups)
        for_each(try_group, (group for group in wanted if group), workers, "reuse")
    finally:
        os.close(fd)


def _groups(
    manifest: Manifest, old_starts: dict[str, tuple[int, int]], growth: int
) -> Iterator[list[Guess]]:
    """The manifest's chunks with where the old file may hold them, grouped: one group per
    tensor the old file also has (same name and size), runs of GROUP_CHUNKS chunks elsewhere,
    looked for at their offset and ``growth`` (old size - new size) bytes further. Chunks of
    tensors whose old copy differs in size are not tried."""
    places = (0, growth) if growth else (0,)
    tensors = sorted(manifest.tensors, key=lambda t: (t.begin, t.end))  # empty ones first
    begins = [t.begin for t in tensors]
    run: list[Guess] = []
    group: list[Guess] = []
    group_tensor: str | None = None
    pos = 0
    for cid, length in manifest.chunks:
        k = bisect_right(begins, pos) - 1
        tensor = tensors[k] if k >= 0 and pos + length <= tensors[k].end else None
        if tensor is None:
            run.append((cid, length, tuple(pos + shift for shift in places)))
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
                group.append((cid, length, (old[0] + pos - tensor.begin,)))
        pos += length
    if group:
        yield group
    if run:
        yield run


def _tensor_starts(fd: int, size: int) -> dict[str, tuple[int, int]]:
    """Name -> (start, byte length) of each tensor of the old file, if it has a tensor index
    (safetensors, or a PyTorch checkpoint)."""
    # Read with pread, not mapped: a map would fault if the file shrank meanwhile. The caller
    # closes fd.
    index = read_index(FileReader(fd), size)
    return {t.name: (t.begin, t.end - t.begin) for t in index.tensors} if index else {}


def _bytes_of(fd: int, size: int, cid: bytes, length: int, at: int) -> bytes | None:
    """The ``length`` bytes at ``at`` of the file open at ``fd`` (``size`` bytes long), if they
    hash to ``cid``."""
    data = os.pread(fd, length, at) if at >= 0 and at + length <= size else b""
    return data if len(data) == length and ids.chunk_id(data) == cid else None


#: Chunks read and hashed per task when checking a whole file.
_CHECK_CHUNKS = 64


def in_place(
    path: Path, chunks: Sequence[tuple[bytes, int]], offsets: Mapping[bytes, Sequence[int]]
) -> set[bytes]:
    """Ids of ``chunks`` (``(id, length)``) whose bytes the file at ``path`` holds at every one
    of their ``offsets``: what an interrupted pull of the same file already wrote."""
    return _in_place(path, chunks, offsets, stop_at_miss=False)[0]


def holds(manifest: Manifest, path: Path, progress: Progress | None = None) -> bool:
    """Whether the file at ``path`` holds exactly the bytes ``manifest`` describes: its size,
    and each chunk's bytes at its offsets hashing to the chunk's id. The first chunk that
    differs stops the reading, so a changed file costs less than a whole read. The bytes
    checked advance ``progress``. Raises OSError if the file cannot be read."""
    if path.stat().st_size != manifest.size:
        return False
    chunks, offsets = manifest.placements()
    return not _in_place(path, chunks, offsets, stop_at_miss=True, progress=progress)[1]


def _in_place(
    path: Path,
    chunks: Sequence[tuple[bytes, int]],
    offsets: Mapping[bytes, Sequence[int]],
    stop_at_miss: bool,
    progress: Progress | None = None,
) -> tuple[set[bytes], bool]:
    """The ids of ``chunks`` whose bytes ``path`` holds at all their ``offsets``, and whether
    one did not (with ``stop_at_miss``, the reading ends at the first that does not)."""
    progress = progress or NoProgress()
    present: set[bytes] = set()
    missed = threading.Event()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size

        def check(task: Sequence[tuple[bytes, int]]) -> None:
            for cid, length in task:
                if stop_at_miss and missed.is_set():
                    return
                if all(_bytes_of(fd, size, cid, length, at) is not None for at in offsets[cid]):
                    present.add(cid)
                else:
                    missed.set()
            progress.advance(sum(length * len(offsets[cid]) for cid, length in task))

        tasks = (chunks[i : i + _CHECK_CHUNKS] for i in range(0, len(chunks), _CHECK_CHUNKS))
        for_each(check, tasks, 2, "check")
    finally:
        os.close(fd)
    return present, missed.is_set()
