"""Tensors of stored safetensors and torch.save files: partial loads and lazy mappings
(tensor-level diffs are :mod:`chunkstore.tensor_diff`).

Every read goes through :class:`~chunkstore.restore.ChunkedReader`, so loading one tensor of a
multi-GB file fetches only the chunks that hold that tensor's bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from chunkstore.errors import InvalidInput, NotFound, TensorNotFound
from chunkstore.model import Manifest, TensorInfo, Version
from chunkstore.restore import ChunkedReader
from chunkstore.stores.base import ChunkStore
from chunkstore.tensor_index import DTYPE_BITS

_NUMPY = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "C64": np.complex64,
    "C128": np.complex128,
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
VALUE_DTYPES = {*_NUMPY, "BF16"}


def to_array(raw: bytes | bytearray, tensor: TensorInfo) -> np.ndarray:
    """A numpy array of a tensor's bytes. bfloat16 becomes float32 (exactly: its top half).
    Dtypes numpy has no type for stay raw uint8 codes: one per element for 8-bit floats; for
    the packed 4- and 6-bit floats, the bytes of each last-axis row (see :func:`packed_shape`)."""
    if tensor.dtype in _CODES and tensor.dtype != "BF16":
        return np.frombuffer(raw, np.uint8).reshape(packed_shape(tensor))
    return flat_values(raw, tensor.dtype).reshape(tensor.shape)


def flat_values(raw: bytes | memoryview, dtype: str) -> np.ndarray:
    """The values of whole elements of a dtype in :data:`VALUE_DTYPES`, flat."""
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
        """The index entry of tensor ``name``; TensorNotFound (a KeyError) if none."""
        try:
            return self._tensors[name]
        except KeyError:
            raise TensorNotFound(f"{self._reader.name} has no tensor {name!r}") from None

    def raw(self, name: str) -> bytearray:
        """The bytes of tensor ``name``, in a buffer of their own (so arrays made on it are
        writable)."""
        tensor = self.info(name)
        self._reader.seek(tensor.begin)
        out = bytearray(tensor.end - tensor.begin)
        self._reader.readinto(out)  # whole: the index lies within the file
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


#: Why a file has no tensor index.
NO_INDEX = (
    "not a safetensors or zip-format torch.save file: legacy torch.save files and files that "
    "do not parse are stored as plain bytes"
)


def tensor_files(
    version: Version, manifests: Mapping[str, Manifest], file: str | None
) -> list[str]:
    """Paths of the version's files that have a tensor index (just ``file`` if given)."""
    if file is not None:
        if file not in manifests:
            raise NotFound(f"{version.ref} has no file {file!r}")
        if not manifests[file].tensors:
            raise InvalidInput(f"{version.ref}:{file} has no tensor index ({NO_INDEX})")
        return [file]
    paths = [p for p, m in manifests.items() if m.tensors]
    if not paths:
        raise InvalidInput(f"{version.ref} holds no safetensors or torch.save file")
    return paths
