"""The tensor index of a safetensors file, read from its header without trusting it.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping tensor
names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of
the header), then the tensor bytes. Anything that does not parse cleanly, or whose offsets
disagree with the file, is not treated as safetensors: :func:`read_index` returns None and the
file is handled as plain bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from chunkstore.byte_readers import ByteReader
from chunkstore.model import TensorInfo

#: Bits per element of each dtype the safetensors format defines (as of safetensors 0.8).
SAFETENSORS_DTYPE_BITS = {
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "U16": 16,
    "I16": 16,
    "F16": 16,
    "BF16": 16,
    "U32": 32,
    "I32": 32,
    "F32": 32,
    "U64": 64,
    "I64": 64,
    "F64": 64,
    "C64": 64,
}
#: Bits per element of every dtype a tensor index may hold: safetensors' and complex128, which
#: only torch.save checkpoints hold.
DTYPE_BITS = {**SAFETENSORS_DTYPE_BITS, "C128": 128}
#: Bytes of the numbers a dtype's elements are made of, where that is not the element's size:
#: a complex64 is two fp32 values, a complex128 two fp64 values.
_NUMBER_SIZE = {"C64": 4, "C128": 8}
MAX_HEADER = 100 << 20  # the safetensors format's own limit


@dataclass(frozen=True)
class TensorIndex:
    header_end: int  # absolute offset where tensor data starts
    tensors: list[TensorInfo]  # sorted by begin; absolute byte ranges

    def element_size(self, tensor: TensorInfo) -> int:
        return element_size(tensor.dtype)


def element_size(dtype: str) -> int:
    """Bytes a tensor's chunks are aligned to and split into byte planes by: the size of the
    numbers its elements are made of, 1 for dtypes packed below a byte."""
    return _NUMBER_SIZE.get(dtype, max(1, DTYPE_BITS[dtype] // 8))


def read_safetensors_index(reader: ByteReader, file_size: int) -> TensorIndex | None:
    """The tensor index of the safetensors file of ``file_size`` bytes that ``reader`` reads
    (only its header is read), or None."""
    if file_size < 8:
        return None
    head = reader.read(0, 8)
    if len(head) < 8:
        return None
    (length,) = struct.unpack("<Q", head)
    header_end = 8 + length
    if length < 2 or length > MAX_HEADER or header_end > file_size:
        return None
    data = reader.read(8, length)
    if len(data) < length:  # the file shrank meanwhile
        return None
    try:
        header = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    tensors = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        tensor = _tensor(name, spec, header_end, file_size)
        if tensor is None:
            return None
        tensors.append(tensor)
    tensors.sort(key=lambda t: (t.begin, t.end))
    for before, after in zip(tensors, tensors[1:], strict=False):
        if after.begin < before.end:  # overlapping tensors: not a file we understand
            return None
    return TensorIndex(header_end, tensors)


def _tensor(name: str, spec: object, header_end: int, file_size: int) -> TensorInfo | None:
    if not isinstance(spec, dict):
        return None
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_BITS or not isinstance(shape, list):
        return None
    if not isinstance(offsets, list):
        return None
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    if len(offsets) != 2 or not all(isinstance(o, int) for o in offsets):
        return None
    begin, end = header_end + offsets[0], header_end + offsets[1]
    if not header_end <= begin <= end <= file_size:
        return None
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or end - begin != bits // 8:  # packed dtypes fill whole bytes
        return None
    return TensorInfo(name, dtype, tuple(shape), begin, end)
