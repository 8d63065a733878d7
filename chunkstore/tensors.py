"""Tensors of stored safetensors and torch.save files: partial loads, lazy mappings and
tensor-level diffs.

Every read goes through :class:`~chunkstore.restore.ChunkedReader`, so loading one tensor of a
multi-GB file fetches only the chunks that hold that tensor's bytes.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Mapping
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


def to_array(raw: bytes, tensor: TensorInfo) -> np.ndarray:
    """A numpy array of a tensor's bytes. bfloat16 becomes float32 (exactly: its top half).
    Dtypes numpy has no type for stay raw uint8 codes: one per element for 8-bit floats; for
    the packed 4- and 6-bit floats, the bytes of each last-axis row (see :func:`packed_shape`)."""
    if tensor.dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(tensor.shape)
    if tensor.dtype in _CODES:
        return np.frombuffer(raw, np.uint8).reshape(packed_shape(tensor))
    return np.frombuffer(raw, dtype=np.dtype(_NUMPY[tensor.dtype]).newbyteorder("<")).reshape(
        tensor.shape
    )


def packed_shape(tensor: TensorInfo) -> tuple[int, ...]:
    """The shape of a tensor's bytes: its own, with the last axis counted in bytes for dtypes
    packed below a byte (flat when a row is not whole bytes)."""
    bits = DTYPE_BITS[tensor.dtype]
    if bits >= 8:
        return tensor.shape
    if tensor.shape and tensor.shape[-1] * bits % 8 == 0:
        return (*tensor.shape[:-1], tensor.shape[-1] * bits // 8)
    return (tensor.end - tensor.begin,)


def to_torch(raw: bytes, tensor: TensorInfo) -> Any:
    """A torch tensor of a tensor's bytes, in its own dtype where torch has it (bfloat16 and
    8-bit floats included), else as :func:`to_array` gives it."""
    try:
        import torch
    except ImportError:
        raise InvalidInput("framework='pt' needs torch, which is not installed") from None

    buf = bytearray(raw)  # writable, so torch does not warn and the tensor owns its memory
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

    def raw(self, name: str) -> bytes:
        tensor = self.info(name)
        self._reader.seek(tensor.begin)
        return self._reader.read(tensor.end - tensor.begin)

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
    old_reader = ChunkedReader(store, old) if stats else None
    new_reader = (new_bytes or ChunkedReader(store, new)) if stats else None
    old_ids = {cid for cid, _ in old.chunks}
    old_starts, new_starts = old.offsets(), new.offsets()
    for name in sorted(before.keys() & after.keys()):
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
            change.differing_bytes, change.relative_l2 = _compare(old_reader, new_reader, a, b)
            differs = change.differing_bytes > 0  # exact: shared chunks may have changed around it
        else:
            differs = change.bytes_changed > 0 or not same_layout
        if differs:
            result.changed.append(change)
        else:
            result.unchanged += 1  # same bytes, cut differently
    return result


def _compare(
    old_reader: BinaryIO, new_reader: BinaryIO, a: TensorInfo, b: TensorInfo
) -> tuple[int, float | None]:
    old_reader.seek(a.begin)
    new_reader.seek(b.begin)
    raw_a, raw_b = old_reader.read(a.end - a.begin), new_reader.read(b.end - b.begin)
    differing = int(
        np.count_nonzero(np.frombuffer(raw_a, np.uint8) != np.frombuffer(raw_b, np.uint8))
    )
    if a.dtype not in _NUMBERS:
        return differing, None  # 8-, 6- and 4-bit float codes: no norm to take
    as_type = np.complex128 if a.dtype == "C64" else np.float64
    x = to_array(raw_a, a).astype(as_type).ravel()
    y = to_array(raw_b, b).astype(as_type).ravel()
    norm = float(np.linalg.norm(x))
    delta = float(np.linalg.norm(y - x))
    return differing, (delta / norm if norm else (0.0 if delta == 0 else float("inf")))


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
