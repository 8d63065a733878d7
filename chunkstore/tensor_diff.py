"""Tensor-level differences between two trees of files with tensors (two versions, or a
version and local files).

Tensors are matched by name across the files of a tree: in the file of the same path first,
then in the other files of the old tree in path order, so a checkpoint saved in other shards
compares tensor by tensor. A tensor is unchanged when the chunks covering it are the same, at
the same offsets relative to it; no bytes are read for it. With ``stats``, the tensors whose
chunks changed are read from both trees to count their differing bytes and take the relative
L2 norm of the change.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from chunkstore.errors import InvalidInput
from chunkstore.model import Manifest, TensorInfo
from chunkstore.progress import NoProgress, Progress
from chunkstore.restore import ChunkedReader
from chunkstore.stores.base import ChunkStore
from chunkstore.tensor_index import DTYPE_BITS
from chunkstore.tensors import VALUE_DTYPES, flat_values

#: Bytes of each of two tensors that ``stats`` compares at a time (whole elements of any
#: dtype): its memory is a few times this, whatever the tensors' size.
COMPARE_BLOCK_BYTES = 8 << 20


@dataclass
class TensorChange:
    name: str
    bytes_changed: int  # bytes of the new tensor in chunks the old tree lacks
    old: TensorInfo
    new: TensorInfo
    differing_bytes: int | None = None  # exact count, with stats
    #: ||new - old|| / ||old||, with stats, for numbers: inf when the old tensor is all zeros
    #: and the new one is not, nan when either holds NaN or infinite values (null in JSON)
    relative_l2: float | None = None
    old_path: str | None = None  # the old file, if not the one of the same path

    def to_json(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "bytes_changed": self.bytes_changed}
        if self.old_path is not None:
            out["old_file"] = self.old_path
        if self.old.dtype != self.new.dtype or self.old.shape != self.new.shape:
            out["old"] = {"dtype": self.old.dtype, "shape": list(self.old.shape)}
            out["new"] = {"dtype": self.new.dtype, "shape": list(self.new.shape)}
        if self.differing_bytes is not None:
            out["differing_bytes"] = self.differing_bytes
            finite = self.relative_l2 is not None and math.isfinite(self.relative_l2)
            out["relative_l2"] = self.relative_l2 if finite else None
            if not finite:
                out["relative_l2_undefined"] = undefined_l2_reason(self.relative_l2)
        return out


def undefined_l2_reason(value: float | None) -> str | None:
    """Why a relative L2 change has no finite value (None if it has one)."""
    if value is None:
        return "no values: 8-, 6- or 4-bit float codes"
    if math.isinf(value):
        return "the old tensor is all zeros"
    if math.isnan(value):
        return "NaN or infinite values"
    return None


@dataclass
class TensorDiff:
    """The tensors of one file: added, changed and unchanged (for a file of the new tree),
    and removed from the whole tree (for a file of the old one)."""

    path: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[TensorChange] = field(default_factory=list)
    unchanged: int = 0

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "added": self.added,
            "removed": self.removed,
            "changed": [c.to_json() for c in self.changed],
            "unchanged": self.unchanged,
        }


def diff_tensors(
    store: ChunkStore,
    old: Mapping[str, Manifest],
    new: Mapping[str, Manifest],
    stats: bool = False,
    local: Mapping[str, Path] | None = None,
    progress: Progress | None = None,
) -> list[TensorDiff]:
    """Compare the tensors of two trees (path -> manifest): one diff per file of ``new``
    with tensors, and one per file of ``old`` some of whose tensors no file of ``new`` has,
    in path order. ``local`` maps paths of ``new`` to the local files its bytes are read
    from (instead of the store). With ``stats``, ``progress`` follows the tensors of ``new``
    (in bytes) as they are compared."""
    before = _OldTree(old)
    local = local or {}
    diffs: dict[str, TensorDiff] = {}
    progress = progress if stats and progress is not None else NoProgress()
    compare = _Comparison(store, old, progress) if stats else None
    tensor_files = sorted(p for p, m in new.items() if m.tensors)
    progress.start(sum(t.end - t.begin for p in tensor_files for t in new[p].tensors), "comparing")
    try:
        for path in tensor_files:
            with ExitStack() as files:  # a local file is open while its tensors are compared
                reader: BinaryIO | None = None
                if compare is not None:
                    reader = (
                        files.enter_context(open(local[path], "rb"))
                        if path in local
                        else ChunkedReader(store, new[path])
                    )
                diffs[path] = _diff_file(path, before, new[path], compare, reader, progress)
    finally:
        progress.finish()
    present = {t.name for manifest in new.values() for t in manifest.tensors}
    for path, tensors in before.tensors.items():
        removed = sorted(name for name in tensors if name not in present)
        if removed:
            diffs.setdefault(path, TensorDiff(path)).removed = removed
    return [diffs[path] for path in sorted(diffs)]


class _OldTree:
    """The tensors of the old tree, by file and by name, and the chunks of all its files."""

    def __init__(self, files: Mapping[str, Manifest]) -> None:
        self.manifests = {path: m for path, m in sorted(files.items()) if m.tensors}
        self.tensors = {path: {t.name: t for t in m.tensors} for path, m in self.manifests.items()}
        self._holders: dict[str, list[str]] = defaultdict(list)  # name -> paths, in order
        for path, tensors in self.tensors.items():
            for name in tensors:
                self._holders[name].append(path)
        self.ids = {cid for m in files.values() for cid, _ in m.chunks}
        self._starts: dict[str, list[int]] = {}

    def find(self, name: str, path: str) -> str | None:
        """The old file to compare tensor ``name`` of new file ``path`` with, if any."""
        if name in self.tensors.get(path, ()):
            return path
        holders = self._holders.get(name)
        return holders[0] if holders else None

    def starts(self, path: str) -> list[int]:
        if path not in self._starts:
            self._starts[path] = self.manifests[path].offsets()
        return self._starts[path]


def _diff_file(
    path: str,
    old: _OldTree,
    new: Manifest,
    compare: _Comparison | None,
    new_bytes: BinaryIO | None,
    progress: Progress,
) -> TensorDiff:
    """The diff of new file ``path``; with stats, ``compare`` reads tensors whose chunks
    changed from the old tree and from ``new_bytes`` (the new file's bytes). ``progress``
    advances by each tensor's bytes once it is done with (``compare`` advances it for those
    it reads)."""
    result = TensorDiff(path)
    after = {t.name: t for t in new.tensors}
    new_starts = new.offsets()
    matched: list[tuple[TensorInfo, str]] = []
    for name, tensor in after.items():
        where = old.find(name, path)
        if where is None:
            result.added.append(name)
            progress.advance(tensor.end - tensor.begin)
        else:
            matched.append((tensor, where))
    result.added.sort()
    # in the new file's order, which reads it front to back (by name a small tensor could
    # cost a chunk of 64 KiB each)
    for b, where in sorted(matched, key=lambda m: m[0].begin):
        a = old.tensors[where][b.name]
        spans_a = _chunk_spans(old.manifests[where], old.starts(where), a)
        spans_b = _chunk_spans(new, new_starts, b)
        same_layout = a.dtype == b.dtype and a.shape == b.shape
        if same_layout and spans_a == spans_b:
            result.unchanged += 1
            progress.advance(b.end - b.begin)
            continue
        changed = sum(
            min(off + n, b.end - b.begin) - max(off, 0)
            for off, cid, n in spans_b
            if cid not in old.ids
        )
        change = TensorChange(b.name, changed, a, b, old_path=where if where != path else None)
        if compare is not None and new_bytes is not None and same_layout:
            change.differing_bytes, change.relative_l2 = compare(where, a, new_bytes, b)
            differs = change.differing_bytes > 0  # exact: shared chunks may have changed around it
        else:
            differs = change.bytes_changed > 0 or not same_layout
            progress.advance(b.end - b.begin)
        if differs:
            result.changed.append(change)
        else:
            result.unchanged += 1  # same bytes, cut differently
    result.changed.sort(key=lambda change: change.name)
    return result


def _chunk_spans(
    manifest: Manifest, starts: list[int], tensor: TensorInfo
) -> list[tuple[int, bytes, int]]:
    """(offset relative to the tensor, chunk id, length) of the chunks overlapping it;
    ``starts`` are the chunks' offsets (found by bisection: a file of 20 000 tensors is
    compared in one pass over its chunks, not one per tensor)."""
    out = []
    i = max(0, bisect_right(starts, tensor.begin) - 1)
    while i < len(starts) and starts[i] < tensor.end:
        cid, length = manifest.chunks[i]
        if starts[i] + length > tensor.begin:
            out.append((starts[i] - tensor.begin, cid, length))
        i += 1
    return out


class _Comparison:
    """Compares tensors of the old tree's stored files with those of new files, read
    :data:`COMPARE_BLOCK_BYTES` of each at a time into the same buffers, so memory stays
    bounded whatever the tensors' size."""

    def __init__(self, store: ChunkStore, old: Mapping[str, Manifest], progress: Progress) -> None:
        self._store = store
        self._old = old
        self._progress = progress
        self._old_readers: dict[str, ChunkedReader] = {}
        self._buffers: list[tuple[memoryview, ...]] = []  # two pairs, made when first needed

    def __call__(
        self, old_path: str, a: TensorInfo, new_bytes: BinaryIO, b: TensorInfo
    ) -> tuple[int, float | None]:
        """The bytes that differ between tensor ``a`` of old file ``old_path`` and ``b`` of
        the new file read from ``new_bytes`` (one dtype and shape), and the relative L2 norm of
        the change (None for dtypes whose bytes are codes, not values)."""
        if old_path not in self._old_readers:
            self._old_readers[old_path] = ChunkedReader(self._store, self._old[old_path])
        change = _Change(a.dtype, a.end - a.begin)
        for old, new in self._blocks((self._old_readers[old_path], new_bytes), a, b):
            change.add(old, new)
            self._progress.advance(len(new))
        return change.differing, change.relative_l2()

    def _blocks(
        self, readers: tuple[BinaryIO, BinaryIO], a: TensorInfo, b: TensorInfo
    ) -> Iterator[tuple[memoryview, ...]]:
        """The bytes of ``a`` and ``b`` a block at a time. The next pair is read on another
        thread while the caller works on this one; each pair is valid until the next is asked
        for."""
        size = a.end - a.begin
        for reader, tensor in zip(readers, (a, b), strict=True):
            reader.seek(tensor.begin)
        if not self._buffers and size > 0:
            self._buffers = [
                tuple(memoryview(bytearray(COMPARE_BLOCK_BYTES)) for _ in range(2))
                for _ in range(2)
            ]

        def read(k: int) -> tuple[memoryview, ...]:
            start = k * COMPARE_BLOCK_BYTES
            views = tuple(
                view[: min(COMPARE_BLOCK_BYTES, size - start)] for view in self._buffers[k % 2]
            )
            for reader, view in zip(readers, views, strict=True):
                _read_into(reader, view)
            return views

        count = -(-size // COMPARE_BLOCK_BYTES)
        if count <= 1:
            yield from map(read, range(count))
            return
        with ThreadPoolExecutor(1, thread_name_prefix="tensor-read") as pool:
            pending = pool.submit(read, 0)
            for k in range(count):
                pair = pending.result()
                if k + 1 < count:
                    pending = pool.submit(read, k + 1)
                yield pair


def _read_into(reader: BinaryIO, view: memoryview) -> None:
    """Fill ``view`` from ``reader``; a file that ends first (changed while being read) is an
    error."""
    done = 0
    while done < len(view):
        count = reader.readinto(view[done:])
        if not count:
            raise InvalidInput(
                f"{getattr(reader, 'name', '') or 'a file'} ended before its tensors did"
            )
        done += count


class _Change:
    """The change between two tensors of one dtype, fed their bytes a block at a time: the
    bytes that differ and, for dtypes in :data:`VALUE_DTYPES`, the L2 norms of the old values
    and of the change.

    The arithmetic is in float64 (complex128 for complex dtypes), on pieces of :data:`PIECE`
    elements that stay in the CPU's cache, ~3x faster than whole blocks; the pieces' norms
    combine without overflow."""

    PIECE = 1 << 16

    def __init__(self, dtype: str, size: int) -> None:
        """For tensors of ``size`` bytes."""
        self.dtype = dtype
        self.values = dtype in VALUE_DTYPES
        self.itemsize = max(1, DTYPE_BITS[dtype] // 8)
        self.step = self.PIECE * self.itemsize  # bytes per piece
        as_type = np.complex128 if dtype in ("C64", "C128") else np.float64
        piece = min(self.PIECE, size // self.itemsize) if self.values else 0
        self._old, self._new = np.empty(piece, as_type), np.empty(piece, as_type)
        self.differing = 0
        self.norm = self.delta = 0.0

    def add(self, old: memoryview, new: memoryview) -> None:
        """Two blocks of whole elements, at the same place in each tensor."""
        for start in range(0, len(old), self.step):
            a, b = old[start : start + self.step], new[start : start + self.step]
            self.differing += int(
                np.count_nonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
            )
            if self.values:
                count = len(a) // self.itemsize
                x, y = self._old[:count], self._new[:count]
                np.copyto(x, flat_values(a, self.dtype))
                np.copyto(y, flat_values(b, self.dtype))
                # NaN and infinite values make the norms nan or inf (see relative_l2), quietly
                with np.errstate(invalid="ignore", over="ignore"):
                    self.norm = math.hypot(self.norm, _norm(x))
                    y -= x
                    self.delta = math.hypot(self.delta, _norm(y))

    def relative_l2(self) -> float | None:
        """||new - old|| / ||old||: inf when the old values are all zeros and the new are not,
        nan when a tensor holds NaN or infinite values (or squares past float64's range); None
        for 8-, 6- and 4-bit float codes (no values)."""
        if not self.values:
            return None
        if not (math.isfinite(self.norm) and math.isfinite(self.delta)):
            return math.nan
        if self.norm:
            return self.delta / self.norm
        return 0.0 if self.delta == 0 else math.inf


def _norm(x: np.ndarray) -> float:
    """The L2 norm of a float64 or complex128 array, summed by numpy itself: BLAS would start
    its thread pool in a library caller's process, where it spins for as long again."""
    flat = x.view(np.float64)
    return math.sqrt(float(np.einsum("i,i->", flat, flat)))
