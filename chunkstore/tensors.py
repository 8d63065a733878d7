"""Tensors of stored safetensors and torch.save files: partial loads, lazy mappings and
tensor-level diffs.

Every read goes through :class:`~chunkstore.restore.ChunkedReader`, so loading one tensor of a
multi-GB file fetches only the chunks that hold that tensor's bytes.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from chunkstore.errors import InvalidInput, NotFound
from chunkstore.model import Manifest, TensorInfo, Version
from chunkstore.restore import ChunkedReader
from chunkstore.stores.base import ChunkStore
from chunkstore.tensor_index import DTYPE_BITS

_NUMPY = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "C64": np.complex64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
#: Dtypes numpy has no type for, by their torch name (None: torch has none either).
_CODES = {
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",  # two values per byte, as safetensors packs them
    "F6_E2M3": None,
    "F6_E3M2": None,
}
#: Dtypes whose arrays (as :func:`to_array` gives them) hold the values themselves.
_NUMBERS = {*_NUMPY, "BF16"}
#: Bytes of each of two tensors that ``--stats`` compares at a time (whole elements of any
#: dtype): its memory is a few times this, whatever the tensors' size.
COMPARE_BLOCK_BYTES = 8 << 20


def to_array(raw: bytes | bytearray, tensor: TensorInfo) -> np.ndarray:
    """A numpy array of a tensor's bytes. bfloat16 becomes float32 (exactly: its top half).
    Dtypes numpy has no type for stay raw uint8 codes: one per element for 8-bit floats; for
    the packed 4- and 6-bit floats, the bytes of each last-axis row (see :func:`packed_shape`)."""
    if tensor.dtype in _CODES and tensor.dtype != "BF16":
        return np.frombuffer(raw, np.uint8).reshape(packed_shape(tensor))
    return _values(raw, tensor.dtype).reshape(tensor.shape)


def _values(raw: bytes | memoryview, dtype: str) -> np.ndarray:
    """The values of whole elements of a dtype in :data:`_NUMBERS`, flat."""
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32)
    return np.frombuffer(raw, dtype=np.dtype(_NUMPY[dtype]).newbyteorder("<"))


def packed_shape(tensor: TensorInfo) -> tuple[int, ...]:
    """The shape of a tensor's bytes: its own, with the last axis counted in bytes for dtypes
    packed below a byte (flat when a row is not whole bytes)."""
    bits = DTYPE_BITS[tensor.dtype]
    if bits >= 8:
        return tensor.shape
    if tensor.shape and tensor.shape[-1] * bits % 8 == 0:
        return (*tensor.shape[:-1], tensor.shape[-1] * bits // 8)
    return (tensor.end - tensor.begin,)


def to_torch(raw: bytes | bytearray, tensor: TensorInfo) -> Any:
    """A torch tensor of a tensor's bytes, in its own dtype where torch has it (bfloat16 and
    8-bit floats included), else as :func:`to_array` gives it."""
    try:
        import torch
    except ImportError:
        raise InvalidInput("framework='pt' needs torch, which is not installed") from None

    # writable, so torch does not warn, and the tensor's own memory
    buf = raw if isinstance(raw, bytearray) else bytearray(raw)
    if tensor.dtype in _CODES:
        flat = (
            torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        )
        torch_dtype = getattr(torch, _CODES[tensor.dtype] or "", None)
        if torch_dtype is None:
            return flat.reshape(packed_shape(tensor))
        return flat.view(torch_dtype).reshape(packed_shape(tensor))
    return torch.from_numpy(to_array(buf, tensor))


class LazyTensors(Mapping):
    """A read-only mapping name -> tensor over one stored file with tensors; each lookup fetches
    only that tensor's chunks."""

    def __init__(
        self, store: ChunkStore, manifest: Manifest, name: str, framework: str = "np"
    ) -> None:
        if framework not in ("np", "pt"):
            raise InvalidInput(f"unknown framework {framework!r}: use 'np' or 'pt'")
        self._reader = ChunkedReader(store, manifest, name=name)
        self._tensors = {t.name: t for t in manifest.tensors}
        self._framework = framework

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise NotFound(f"{self._reader.name} has no tensor {name!r}") from None

    def raw(self, name: str) -> bytearray:
        """The bytes of tensor ``name``, in a buffer of their own (so arrays made on it are
        writable)."""
        tensor = self.info(name)
        self._reader.seek(tensor.begin)
        out = bytearray(tensor.end - tensor.begin)
        _read_into(self._reader, memoryview(out))
        return out

    def __getitem__(self, name: str) -> Any:
        convert = to_torch if self._framework == "pt" else to_array
        return convert(self.raw(name), self.info(name))

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


@dataclass
class TensorChange:
    name: str
    bytes_changed: int  # bytes of the new tensor in chunks the old file lacks
    old: TensorInfo
    new: TensorInfo
    differing_bytes: int | None = None  # exact count, with stats
    relative_l2: float | None = None  # ||new - old|| / ||old||, with stats, for numbers

    def to_json(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "bytes_changed": self.bytes_changed}
        if self.old.dtype != self.new.dtype or self.old.shape != self.new.shape:
            out["old"] = {"dtype": self.old.dtype, "shape": list(self.old.shape)}
            out["new"] = {"dtype": self.new.dtype, "shape": list(self.new.shape)}
        if self.differing_bytes is not None:
            out["differing_bytes"] = self.differing_bytes
            out["relative_l2"] = self.relative_l2
        return out


@dataclass
class TensorDiff:
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


def diff_file(
    store: ChunkStore,
    path: str,
    old: Manifest,
    new: Manifest,
    stats: bool = False,
    new_bytes: BinaryIO | None = None,
) -> TensorDiff:
    """Compare the tensors of two versions of one file with tensors.

    A tensor is unchanged when the chunks covering it are the same, at the same relative
    offsets; no bytes are fetched for it. Small tensors share chunks, so one may count as
    changed because a neighbour did. With ``stats``, the tensors whose chunks changed are
    fetched from both versions to count their differing bytes (those with none count as
    unchanged after all) and the relative L2 norm of the change. ``new_bytes`` is where the
    new version's bytes are read instead of the store (a local file).
    """
    result = TensorDiff(path)
    before = {t.name: t for t in old.tensors}
    after = {t.name: t for t in new.tensors}
    result.added = sorted(after.keys() - before.keys())
    result.removed = sorted(before.keys() - after.keys())
    if stats:
        compare = _Comparison(ChunkedReader(store, old), new_bytes or ChunkedReader(store, new))
    old_ids = {cid for cid, _ in old.chunks}
    old_starts, new_starts = old.offsets(), new.offsets()
    # in the new file's order, which reads both files front to back (by name they could take
    # a chunk of 64 KiB for each small tensor)
    for name in sorted(before.keys() & after.keys(), key=lambda name: after[name].begin):
        a, b = before[name], after[name]
        spans_a, spans_b = _chunk_spans(old, old_starts, a), _chunk_spans(new, new_starts, b)
        same_layout = a.dtype == b.dtype and a.shape == b.shape
        if same_layout and spans_a == spans_b:
            result.unchanged += 1
            continue
        changed = sum(
            min(off + n, b.end - b.begin) - max(off, 0)
            for off, cid, n in spans_b
            if cid not in old_ids
        )
        change = TensorChange(name, changed, a, b)
        if stats and same_layout:
            change.differing_bytes, change.relative_l2 = compare(a, b)
            differs = change.differing_bytes > 0  # exact: shared chunks may have changed around it
        else:
            differs = change.bytes_changed > 0 or not same_layout
        if differs:
            result.changed.append(change)
        else:
            result.unchanged += 1  # same bytes, cut differently
    result.changed.sort(key=lambda change: change.name)
    return result


class _Comparison:
    """Compares tensors of two files, read :data:`COMPARE_BLOCK_BYTES` of each at a time into
    the same buffers, so memory stays bounded whatever the tensors' size."""

    def __init__(self, old: BinaryIO, new: BinaryIO) -> None:
        self._readers = (old, new)
        self._buffers: list[tuple[memoryview, ...]] = []  # two pairs, made when first needed

    def __call__(self, a: TensorInfo, b: TensorInfo) -> tuple[int, float | None]:
        """The bytes that differ between tensor ``a`` of the old file and ``b`` of the new
        (one dtype and shape), and the relative L2 norm of the change (None for dtypes whose
        bytes are codes, not values)."""
        change = _Change(a.dtype)
        for old, new in self._blocks(a, b):
            change.add(old, new)
        return change.differing, change.relative_l2()

    def _blocks(self, a: TensorInfo, b: TensorInfo) -> Iterator[tuple[memoryview, ...]]:
        """The bytes of ``a`` and ``b`` a block at a time. The next pair is read on another
        thread while the caller works on this one; each pair is valid until the next is asked
        for."""
        size = a.end - a.begin
        for reader, tensor in zip(self._readers, (a, b), strict=True):
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
            for reader, view in zip(self._readers, views, strict=True):
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
    bytes that differ and, for dtypes in :data:`_NUMBERS`, the L2 norms of the old values and
    of the change.

    The arithmetic is in float64 (complex128 for C64), on pieces of :data:`PIECE` elements
    that stay in the CPU's cache, ~3x faster than whole blocks; the pieces' norms combine
    without overflow."""

    PIECE = 1 << 16

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.values = dtype in _NUMBERS
        self.itemsize = max(1, DTYPE_BITS[dtype] // 8)
        self.step = self.PIECE * self.itemsize  # bytes per piece
        as_type = np.complex128 if dtype == "C64" else np.float64
        self._old, self._new = np.empty(self.PIECE, as_type), np.empty(self.PIECE, as_type)
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
                np.copyto(x, _values(a, self.dtype))
                np.copyto(y, _values(b, self.dtype))
                self.norm = math.hypot(self.norm, _norm(x))
                y -= x
                self.delta = math.hypot(self.delta, _norm(y))

    def relative_l2(self) -> float | None:
        """||new - old|| / ||old||; None for 8-, 6- and 4-bit float codes (no values)."""
        if not self.values:
            return None
        if self.norm:
            return self.delta / self.norm
        return 0.0 if self.delta == 0 else float("inf")


def _norm(x: np.ndarray) -> float:
    """The L2 norm of a float64 or complex128 array, summed by numpy itself: BLAS would start
    its thread pool in a library caller's process, where it spins for as long again."""
    flat = x.view(np.float64)
    return math.sqrt(float(np.einsum("i,i->", flat, flat)))


def tensor_files(
    version: Version, manifests: Mapping[str, Manifest], file: str | None
) -> list[str]:
    """Paths of the version's files that have a tensor index (just ``file`` if given)."""
    if file is not None:
        if file not in manifests:
            raise NotFound(f"{version.ref} has no file {file!r}")
        if not manifests[file].tensors:
            raise InvalidInput(
                f"{version.ref}:{file} has no tensor index (not a safetensors or torch.save file)"
            )
        return [file]
    paths = [p for p, m in manifests.items() if m.tensors]
    if not paths:
        raise InvalidInput(f"{version.ref} holds no safetensors or torch.save file")
    return paths
