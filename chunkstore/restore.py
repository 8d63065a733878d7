"""Rebuilding files from their manifests: whole files (pull), streams (cat) and random access
(open).

Chunks are read through :func:`chunkstore.delta.read_chunks_into`, which rebuilds delta-coded
chunks from their delta and base chunks; every chunk is checked against its id either way.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import BinaryIO

from chunkstore.codec import RawBuffer
from chunkstore.delta import fetch_size, read_chunks_into, rebuild_on
from chunkstore.errors import StoreUnavailable
from chunkstore.filespace import reserve
from chunkstore.model import DeltaRef, Manifest
from chunkstore.progress import NoProgress, Progress
from chunkstore.reuse import holds, in_place, local_bases, reuse_chunks
from chunkstore.seekable import SeekableReader
from chunkstore.stores.base import ChunkStore
from chunkstore.tree import EARLIER, PARTIAL

MiB = 1 << 20


def partial_path(dest: Path) -> Path:
    """Where a pull writes ``dest`` until it is complete: a hidden file beside it."""
    return dest.with_name(f".{dest.name}{PARTIAL}")


def restore_file(
    store: ChunkStore,
    manifest: Manifest,
    dest: Path,
    progress: Progress | None = None,
    window_bytes: int = 256 * MiB,
    mode: int = 0o644,
    reuse: Path | None = None,
) -> None:
    """Write the file described by ``manifest`` to ``dest``, every chunk verified.

    The bytes go to a partial file beside ``dest`` (:func:`partial_path`) that is renamed into
    place only once complete, so ``dest`` never holds a partial file; its blocks are reserved
    first, so a file that cannot fit fails before anything is fetched. Chunks are copied
    instead of fetched from what the file's last interrupted pull wrote and from ``reuse``
    (an older copy of the file, typically ``dest`` itself), see :mod:`chunkstore.reuse`.
    Chunks are fetched a window at a time (memory stays bounded: a window counts the delta and
    base bytes a chunk needs) and each is written at every offset where the file holds it.

    A pull interrupted (Ctrl-C) or cut off from the store (StoreUnavailable) keeps its partial
    file, and the next pull of the same file continues in it, fetching only the chunks not yet
    in place (a partial file of another size, from another version, is copied from instead). A
    pull that fails otherwise (a damaged chunk, a full disk) removes what it wrote, and one that
    wrote nothing leaves the partial file as it found it.

    A ``dest`` that already holds the file's bytes (each chunk hashed at its offsets, stopping
    at the first that differs) is left in place: its mode set, a partial file of an earlier
    pull beside it removed, nothing fetched or written.
    """
    progress = progress or NoProgress()
    tmp = partial_path(dest)
    if dest.is_file() and not dest.is_symlink() and holds(manifest, dest):
        if dest.stat().st_mode & 0o777 != mode & 0o777:
            os.chmod(dest, mode & 0o777)
        tmp.unlink(missing_ok=True)
        progress.advance(manifest.size, 0)
        return
    earlier = tmp.with_name(tmp.name + EARLIER)
    order, offsets = manifest.placements()
    regular = tmp.is_file() and not tmp.is_symlink()
    resuming = regular and tmp.stat().st_size == manifest.size
    if regular and not resuming:
        os.replace(tmp, earlier)
    sources = [source for source in (earlier, reuse) if source is not None and source.is_file()]
    create = 0 if resuming else os.O_CREAT | os.O_TRUNC
    fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | create, 0o600)
    wrote = False
    try:
        reserve(fd, manifest.size, dest)
        refs = manifest.delta_refs()

        def write(cid: bytes, raw: bytes, fetched: bool = True) -> None:
            nonlocal wrote
            for offset in offsets[cid]:
                os.pwrite(fd, raw, offset)
            wrote = True
            progress.advance(len(raw) * len(offsets[cid]), len(raw) if fetched else 0)

        if resuming:
            done = in_place(tmp, order, offsets)
            progress.advance(sum(n * len(offsets[cid]) for cid, n in order if cid in done))
            order = [(cid, length) for cid, length in order if cid not in done]
        for source in sources:
            order = _take_from(source, store, manifest, refs, order, write)
        # Chunks are written on the decoding threads: nothing funnels through this one.
        if refs:
            for window in _windows(order, offsets, refs, window_bytes):
                read_chunks_into(store, window, refs, write)
        else:  # one pass; the store bounds what is in flight
            store.read_into([cid for cid, _ in order], write)
        os.fchmod(fd, mode & 0o777)
    except BaseException as exc:
        os.close(fd)
        if not wrote:  # leave what an earlier pull left as it was
            if earlier.exists():
                os.replace(earlier, tmp)
            elif not resuming:
                tmp.unlink(missing_ok=True)
        elif not isinstance(exc, KeyboardInterrupt | StoreUnavailable):
            tmp.unlink(missing_ok=True)
        raise
    finally:
        earlier.unlink(missing_ok=True)
    os.close(fd)
    os.replace(tmp, dest)


def restore_new_files(
    store: ChunkStore,
    files: Sequence[tuple[Manifest, Path, int]],
    progress: Progress | None = None,
) -> None:
    """Write several files none of which exists yet (``(manifest, dest, mode)``; no partial
    file beside them either, and no delta-coded chunk), fetching all their chunks in one read:
    many small files cost one call to each node, not one per file.

    As :func:`restore_file` does, each file is written to its partial file, with its blocks
    reserved first, and renamed into place once complete. A read interrupted (Ctrl-C) or cut
    off from the store keeps the partial files it wrote into, for the next pull to continue;
    any other failure removes them all. Either way no file of the call is renamed into place.
    """
    progress = progress or NoProgress()
    where: dict[bytes, list[tuple[int, int]]] = defaultdict(list)  # id -> (fd, offset)
    opened: list[tuple[int, Path, Path, int]] = []  # fd, partial, dest, mode
    written: set[int] = set()
    try:
        for manifest, dest, mode in files:
            tmp = partial_path(dest)
            fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CREAT | os.O_EXCL, 0o600)
            opened.append((fd, tmp, dest, mode))
            reserve(fd, manifest.size, dest)
            for (cid, _), offset in zip(manifest.chunks, manifest.offsets(), strict=True):
                where[cid].append((fd, offset))

        def write(cid: bytes, raw: bytes) -> None:
            for fd, offset in where[cid]:
                os.pwrite(fd, raw, offset)
                written.add(fd)
            progress.advance(len(raw) * len(where[cid]), len(raw))

        store.read_into(list(where), write)
        for fd, _, _, mode in opened:
            os.fchmod(fd, mode & 0o777)
    except BaseException as exc:
        resumable = isinstance(exc, KeyboardInterrupt | StoreUnavailable)
        for fd, tmp, _, _ in opened:
            os.close(fd)
            if not (resumable and fd in written):
                tmp.unlink(missing_ok=True)
        raise
    for fd, tmp, dest, _ in opened:
        os.close(fd)
        os.replace(tmp, dest)


def _take_from(
    source: Path,
    store: ChunkStore,
    manifest: Manifest,
    refs: dict[bytes, DeltaRef],
    order: list[tuple[bytes, int]],
    write: Callable[..., None],
) -> list[tuple[bytes, int]]:
    """Write the chunks of ``order`` that the file ``source`` holds, copied; over a network,
    also the delta-coded ones whose bases it holds (it is the version their deltas were coded
    against, say the base model a fine-tune was pushed over), rebuilt on those bytes with
    only their deltas fetched. Returns the chunks of ``order`` still to fetch."""
    found = reuse_chunks(manifest, source, partial(write, fetched=False), {c for c, _ in order})
    same_dtype = {
        cid: refs[cid].base
        for cid, _ in order
        if cid in refs and not refs[cid].transform and cid not in found
    }
    if store.remote and same_dtype:  # locally, a base blob decodes faster than bytes hash
        lengths = dict(order)
        where = local_bases(manifest, source, same_dtype)
        chunks = {cid: (lengths[cid], at) for cid, at in where.items()}
        found |= rebuild_on(store, chunks, refs, source, write) if chunks else set()
    return [(cid, length) for cid, length in order if cid not in found]


def stream_file(
    store: ChunkStore,
    manifest: Manifest,
    out: BinaryIO,
    window_bytes: int = 32 * MiB,
    write_bytes: int = MiB,
) -> None:
    """Write the file described by ``manifest`` to ``out`` in order, every chunk verified.

    Chunks are fetched ``window_bytes`` of the file at a time, as a pull fetches them (on
    several threads, deltas rebuilt), placed in one reused buffer, and written in pieces of
    ``write_bytes``: a 16 MiB write into a file's page cache took 4-5x the time of the same
    bytes in 1 MiB writes here.
    """
    refs = manifest.delta_refs()
    longest = max((length for _, length in manifest.chunks), default=0)
    view = memoryview(bytearray(window_bytes + longest))
    chunks = manifest.chunks
    i = 0
    while i < len(chunks):
        where: dict[bytes, list[int]] = defaultdict(list)  # chunk -> offsets in the window
        used = 0
        while i < len(chunks) and used < window_bytes:
            cid, length = chunks[i]
            where[cid].append(used)
            used += length
            i += 1

        def place(cid: bytes, raw: bytes, where: dict[bytes, list[int]] = where) -> None:
            for offset in where[cid]:
                view[offset : offset + len(raw)] = raw

        read_chunks_into(store, list(where), refs, place)
        for start in range(0, used, write_bytes):
            _write_all(out, view[start : min(used, start + write_bytes)])


def _write_all(out: BinaryIO, data: memoryview) -> None:
    """Write all of ``data``: a buffered stream may write less and say so (a pipe whose reader
    left writes part, and only the next write fails with EPIPE)."""
    while len(data):
        written = out.write(data)
        if not written:
            raise OSError(f"could not write to {getattr(out, 'name', 'the output')}")
        data = data[written:]


def _windows(
    order: list[tuple[bytes, int]],
    offsets: dict[bytes, list[int]],
    refs: dict[bytes, DeltaRef],
    window_bytes: int,
) -> Iterator[list[bytes]]:
    """Chunk ids in groups whose fetched bytes (deltas and bases included) fill a window."""
    window: list[bytes] = []
    size = 0
    for cid, length in order:
        window.append(cid)
        size += length * (len(offsets[cid]) - 1) + fetch_size(length, refs.get(cid))
        if size >= window_bytes:
            yield window
            window, size = [], 0
    if window:
        yield window


class ChunkedReader(SeekableReader):
    """A read-only, seekable file over a stored manifest; reads fetch only the chunks they need.

    A read places the chunks it fetches straight into the caller's buffer; the chunks at
    either end of it, which it may have read only part of, are kept, so small sequential
    reads cost one fetch per chunk.
    """

    def __init__(self, store: ChunkStore, manifest: Manifest, name: str = "") -> None:
        super().__init__(manifest.size)
        self._store = store
        self._manifest = manifest
        self._starts = manifest.offsets()
        self._refs = manifest.delta_refs()
        self._cache: dict[int, bytes] = {}  # chunk index -> raw bytes
        self.name = name

    def readinto(self, buffer) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        begin = self._pos
        end = min(begin + len(out), self._manifest.size)
        if end <= begin:
            return 0
        first = bisect_right(self._starts, begin) - 1
        last = bisect_right(self._starts, end - 1) - 1
        edges = {first, last}
        kept = {i: self._cache[i] for i in edges if i in self._cache}
        cached = list(kept)
        missing: dict[bytes, list[int]] = defaultdict(list)  # chunk id -> its indexes
        for i in range(first, last + 1):
            if i not in cached:
                missing[self._manifest.chunks[i][0]].append(i)

        def place(index: int, raw: RawBuffer) -> None:
            start = self._starts[index]
            lo, hi = max(begin, start), min(end, start + len(raw))
            out[lo - begin : hi - begin] = memoryview(raw).cast("B")[lo - start : hi - start]

        def fetched(cid: bytes, raw: RawBuffer) -> None:  # called from several threads
            for index in missing[cid]:
                place(index, raw)
                if index in edges:
                    kept[index] = bytes(raw)

        if missing:
            read_chunks_into(self._store, list(missing), self._refs, fetched)
        for index in cached:
            place(index, kept[index])
        self._cache = kept
        self._pos = end
        return end - begin
