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

from chunkstore.model import TensorInfo

#: Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
MAX_HEADER = 100 << 20  # the safetensors format's own limit


@dataclass(frozen=True)
class TensorIndex:
    header_end: int  # absolute offset where tensor data starts
    tensors: list[TensorInfo]  # sorted by begin; absolute byte ranges

    def element_size(self, tensor: TensorInfo) -> int:
        return DTYPE_SIZES[tensor.dtype]


def read_index(data: bytes | memoryview, file_size: int) -> TensorIndex | None:
    """The tensor index of a safetensors file whose first bytes are ``data``, or None.

    ``data`` must hold at least the whole header (the caller passes the mapped file).
    """
    if file_size < 8 or len(data) < 8:
        return None
    (length,) = struct.unpack_from("<Q", data, 0)
    header_end = 8 + length
    if length < 2 or length > MAX_HEADER or header_end > file_size or header_end > len(data):
        return None
    try:
        header = json.loads(bytes(data[8:header_end]).decode("utf-8"))
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
    if dtype not in DTYPE_SIZES or not isinstance(shape, list) or not isinstance(offsets, list):
        return None
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    if len(offsets) != 2 or not all(isinstance(o, int) for o in offsets):
        return None
    begin, end = header_end + offsets[0], header_end + offsets[1]
    if not header_end <= begin <= end <= file_size:
        return None
    if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        return None
    return TensorInfo(name, dtype, tuple(shape), begin, end)
