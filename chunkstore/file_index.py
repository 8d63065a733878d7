"""The files whose tensors chunkstore understands: safetensors, and PyTorch checkpoints
(``torch.save``'s zip format). Every other file, or a malformed one, is plain bytes."""

from __future__ import annotations

from chunkstore.tensor_index import TensorIndex, read_safetensors_index
from chunkstore.torch_index import read_torch_index


def read_index(data: bytes | memoryview, file_size: int) -> TensorIndex | None:
    """The tensor index of the file whose bytes are ``data`` (the whole file, which may be a
    memory map), or None if it is neither format (or a malformed one)."""
    return read_safetensors_index(data, file_size) or read_torch_index(data, file_size)
