"""The tensor index of a PyTorch checkpoint (``torch.save``'s zip format), read without torch
and without running anything the checkpoint's pickle names.

``torch.save`` writes a zip archive (members stored, not compressed) holding ``PREFIX/data.pkl``
(a pickle of the saved object, with each tensor storage as a persistent id
``('storage', torch.<Type>Storage, key, location, numel)``) and each storage's bytes as the
member ``PREFIX/data/KEY``. The pickle is read by an unpickler that resolves every global to an
inert stand-in: ``torch._utils._rebuild_tensor_v2`` and ``_rebuild_parameter`` record which
storage a tensor views with which shape, anything else becomes an opaque record that is only
walked for names. No module is imported and no callable of the checkpoint runs.

Each storage of a plain element type becomes one entry of the index, over its member's bytes:
named by the path of the tensor that views all of it (``state.0.exp_avg``,
``model.layers.3.weight``: dictionary keys and sequence positions joined by dots) with that
tensor's shape; when no tensor views it whole (a transposed or partial view), by the path of
the first tensor that views it and ``.storage`` (``model.proj_T.storage``), else ``data/KEY``,
with one dimension. No name holds the archive's prefix (the stem of the file's name when it was
saved), so ``step-3.pt`` and ``step-6.pt`` pair up. Storages whose names collide (``{"a.b": x,
"a": {"b": y}}``) are named ``data/KEY``. Storage keys and tensor paths are stable across the
checkpoints of one training run, so the entries of successive checkpoints pair up for deltas
and diffs as safetensors tensors do. A storage without a plain element type (quantized,
complex32) is left out of the index, its bytes stored as plain bytes. Anything that does not
parse cleanly is not a checkpoint we understand: :func:`read_torch_index` returns None and the
file is handled as plain bytes.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
from collections import Counter
from dataclasses import dataclass, replace

from chunkstore.byte_readers import ByteReader
from chunkstore.model import TensorInfo
from chunkstore.seekable import SeekableReader
from chunkstore.tensor_index import DTYPE_BITS, TensorIndex
from chunkstore.tensor_index import element_size as element_bytes

#: torch's storage type names -> safetensors dtype names.
STORAGE_DTYPES = {
    "FloatStorage": "F32",
    "DoubleStorage": "F64",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
    "ComplexFloatStorage": "C64",
    "ComplexDoubleStorage": "C128",
    "Float8_e4m3fnStorage": "F8_E4M3",
    "Float8_e5m2Storage": "F8_E5M2",
    "Float8_e4m3fnuzStorage": "F8_E4M3FNUZ",
    "Float8_e5m2fnuzStorage": "F8_E5M2FNUZ",
    "UInt16Storage": "U16",
    "UInt32Storage": "U32",
    "UInt64Storage": "U64",
}
#: torch's dtype names (``torch.float8_e4m3fn``...) -> safetensors dtype names: a tensor of a
#: dtype without a storage type of its own is saved over untyped (byte) storage, with its dtype.
TORCH_DTYPES = {
    "float32": "F32",
    "float64": "F64",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "complex64": "C64",
    "complex128": "C128",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
}
_REBUILD_TENSOR = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}
_REBUILD_PARAMETER = {
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
}
MAX_PICKLE = 256 << 20  # a data.pkl beyond this is not read (it holds names, not tensor bytes)
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length
_LOCAL_SIGNATURE = b"PK\x03\x04"


def read_torch_index(reader: ByteReader, file_size: int) -> TensorIndex | None:
    """The tensor index of the ``torch.save`` checkpoint of ``file_size`` bytes that
    ``reader`` reads (its zip directory, pickle and member headers, not the tensors), or
    None."""
    if not _starts_with_a_pickle(reader):
        return None
    try:
        return _read(_Archive(reader, file_size))
    except Exception:  # noqa: BLE001 - whatever a damaged zip or pickle raises, it is bytes
        return None


def _starts_with_a_pickle(reader: ByteReader) -> bool:
    """Whether the file's first zip member is ``PREFIX/data.pkl``, as torch.save writes it: a
    cheap test that spares other zip files (a dataset of many members, an ``.npz``) a reading
    of their whole directory."""
    head = reader.read(0, _LOCAL_HEADER.size)
    if len(head) < _LOCAL_HEADER.size:
        return False
    signature, name_length, _ = _LOCAL_HEADER.unpack(head)
    name = reader.read(_LOCAL_HEADER.size, name_length)
    return signature == _LOCAL_SIGNATURE and name.endswith(b"/data.pkl") and name.count(b"/") == 1


def _read(archive: _Archive) -> TensorIndex | None:
    with zipfile.ZipFile(archive) as zipped:
        members = {info.filename: info for info in zipped.infolist()}
        pickles = [name for name in members if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            return None
        prefix = pickles[0][: -len("data.pkl")]
        order = members.get(prefix + "byteorder")
        if order is not None and archive.member_bytes(order) != b"little":
            return None  # written on a big-endian machine: not bytes we can plane or diff
        pkl = members[pickles[0]]
        if pkl.file_size > MAX_PICKLE:
            return None
        storages, tensors, viewers = _unpickle(archive.member_bytes(pkl))
    entries = {}
    for key, (dtype, numel) in storages.items():
        info = members.get(f"{prefix}data/{key}")
        if info is None or dtype not in DTYPE_BITS or info.compress_type != zipfile.ZIP_STORED:
            return None
        bits = numel * DTYPE_BITS[dtype]
        if bits % 8 or info.file_size != bits // 8:
            return None
        begin = archive.data_start(info)
        if key in tensors:
            name, shape = tensors[key]
        else:
            name, shape = (f"{viewers[key]}.storage" if key in viewers else f"data/{key}"), (numel,)
        entries[key] = TensorInfo(name, dtype, shape, begin, begin + info.file_size)
    index = _distinct_names(entries)
    if not index:
        return None
    index.sort(key=lambda t: (t.begin, t.end))
    for before, after in zip(index, index[1:], strict=False):
        if after.begin < before.end:
            return None
    return TensorIndex(index[0].begin, index)


def _distinct_names(entries: dict[str, TensorInfo]) -> list[TensorInfo]:
    """The entries (by storage key), each named once: storages whose names collide (``{"a.b":
    x, "a": {"b": y}}`` both flatten to ``a.b``) are named ``data/KEY`` instead, with one
    dimension, and any still colliding are left out (their bytes are stored as plain bytes)."""

    def clashing(infos: dict[str, TensorInfo]) -> set[str]:
        counts = Counter(t.name for t in infos.values())
        return {key for key, t in infos.items() if counts[t.name] > 1}

    renamed = dict(entries)
    for key in clashing(entries):
        t = entries[key]
        numel = (t.end - t.begin) * 8 // DTYPE_BITS[t.dtype]
        renamed[key] = replace(t, name=f"data/{key}", shape=(numel,))
    left_out = clashing(renamed)
    return [t for key, t in renamed.items() if key not in left_out]


class _Archive(SeekableReader):
    """The file as a read-only, seekable raw file (for ``zipfile``), read through a
    :class:`~chunkstore.byte_readers.ByteReader`, with what the index needs of its members."""

    def __init__(self, reader: ByteReader, size: int) -> None:
        super().__init__(size)
        self._reader = reader

    def readinto(self, buffer) -> int:  # type: ignore[override]
        chunk = self._reader.read(self._pos, min(len(buffer), max(0, self._size - self._pos)))
        buffer[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def member_bytes(self, info: zipfile.ZipInfo) -> bytes:
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{info.filename} is compressed")
        data = self._reader.read(self.data_start(info), info.file_size)
        if len(data) != info.file_size:
            raise ValueError(f"{info.filename} was cut short")
        return data

    def data_start(self, info: zipfile.ZipInfo) -> int:
        """Where a member's bytes start: after its local header, whose extra field (torch pads
        the data to 64 bytes with it) may differ from the central directory's."""
        header = self._reader.read(info.header_offset, _LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size:
            raise ValueError(f"{info.filename}: its local header lies past the end")
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        if signature != _LOCAL_SIGNATURE:
            raise ValueError(f"{info.filename}: no local header at {info.header_offset}")
        begin = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        if begin + info.file_size > self._size:
            raise ValueError(f"{info.filename} runs past the end of the file")
        return begin


# -- the pickle ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str | None  # None: a storage type without a plain element type (quantized, ...)
    numel: int


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def views_all(self) -> bool:
        """Whether the tensor is its storage's elements in row-major order, all of them."""
        if self.offset != 0 or math.prod(self.shape) != self.storage.numel:
            return False
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


class _Opaque:
    """Any object the pickle builds other than a tensor: its arguments, state and items, kept
    only to be walked for the tensors (and names) inside. Subclassed per global it names."""

    args: tuple = ()
    state: object = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args = args + tuple(kwargs.values())

    def __setstate__(self, state: object) -> None:
        self.state = state

    def __setitem__(self, key: object, value: object) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: object) -> None:
        items = self.__dict__.setdefault("items", {})
        items[len(items)] = value

    def extend(self, values: object) -> None:
        for value in values:  # type: ignore[attr-defined]
            self.append(value)

    def children(self) -> list[tuple[object, object]]:
        return [*enumerate(self.args), ("", self.state), *self.__dict__.get("items", {}).items()]


class _Dict(dict):
    """An OrderedDict of the pickle (a state dict), which may carry attributes."""


class _StorageType:
    def __init__(self, dtype: str | None) -> None:
        self.dtype = dtype


@dataclass(frozen=True)
class _DType:
    name: str  # the safetensors name of a torch dtype the pickle names


def _rebuild_tensor(storage: object, offset: object, shape: object, stride: object, *_: object):
    if not (isinstance(storage, _Storage) and storage.dtype is not None):
        return _Opaque((storage, offset, shape, stride))
    return _Tensor(storage, int(offset), tuple(map(int, shape)), tuple(map(int, stride)))  # type: ignore[arg-type]


def _rebuild_tensor_v3(
    storage: object, offset: object, shape: object, stride: object, _grad, _hooks, dtype, *_
) -> object:
    """A tensor of a dtype saved over untyped storage: the storage is its bytes."""
    if not (isinstance(storage, _Storage) and storage.dtype == "U8" and isinstance(dtype, _DType)):
        return _Opaque((storage, offset, shape, stride, dtype))  # a dtype not understood: bytes
    size = element_bytes(dtype.name)
    if storage.numel % size:
        raise ValueError(f"storage {storage.key} is not a whole number of {dtype.name}")
    typed = _Storage(storage.key, dtype.name, storage.numel // size)
    return _rebuild_tensor(typed, offset, shape, stride)


def _rebuild_parameter(data: object, *_: object) -> object:
    return data


def _rebuild_from_type(func: object, _type: object, args: object, _state: object) -> object:
    """A tensor of a subclass: the tensor it wraps."""
    if func in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter):
        return func(*args)  # type: ignore[operator]
    return _Opaque((func, args))


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _REBUILD_TENSOR:
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_tensor_v3"):
            return _rebuild_tensor_v3
        if (module, name) in _REBUILD_PARAMETER:
            return _rebuild_parameter
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return _rebuild_from_type
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _StorageType("U8")
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(STORAGE_DTYPES.get(name))
        if module == "torch" and name in TORCH_DTYPES:
            return _DType(TORCH_DTYPES[name])
        if (module, name) == ("collections", "OrderedDict"):
            return _Dict
        return type(name, (_Opaque,), {})

    def persistent_load(self, pid: object) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"storage of {numel!r:.80} elements in {pid!r:.80}")
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else None
        return _Storage(str(key), dtype, numel)  # an untyped one is left out of the index


def _unpickle(
    data: bytes,
) -> tuple[dict[str, tuple[str, int]], dict[str, tuple[str, tuple]], dict[str, str]]:
    """Storage key -> (dtype, numel) of every storage of a plain element type the pickle
    names; storage key -> (path, shape) of the first tensor found that views all of a storage;
    and storage key -> path of the first tensor found that views any of it."""
    storages: dict[str, tuple[str, int]] = {}
    named: dict[str, tuple[str, tuple]] = {}
    viewers: dict[str, str] = {}
    root = _Unpickler(io.BytesIO(data)).load()
    seen: set[int] = set()
    stack: list[tuple[str, object]] = [("", root)]
    while stack:
        path, obj = stack.pop()
        if isinstance(obj, _Storage):
            if obj.dtype is not None:
                storages.setdefault(obj.key, (obj.dtype, obj.numel))
            continue
        if isinstance(obj, _Tensor):
            storage = obj.storage
            if storages.setdefault(storage.key, (storage.dtype, storage.numel)) != (
                storage.dtype,
                storage.numel,
            ):
                raise ValueError(f"storage {storage.key} is named with two types or sizes")
            if path:
                viewers.setdefault(storage.key, path)
                if storage.key not in named and obj.views_all():
                    named[storage.key] = (path, obj.shape)
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        children: list[tuple[object, object]]
        if isinstance(obj, dict):
            children = list(obj.items())
        elif isinstance(obj, list | tuple):
            children = list(enumerate(obj))
        elif isinstance(obj, _Opaque):
            children = obj.children()
        else:
            continue
        for key, child in reversed(children):  # popped in order: the first path wins
            step = str(key) if isinstance(key, str | int) else ""
            stack.append((f"{path}.{step}" if path and step else path or step, child))
    return storages, named, viewers
