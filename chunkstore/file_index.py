"""The files whose tensors chunkstore understands: safetensors, and PyTorch checkpoints
(``torch.save``'s zip format). Every other file, or a malformed one, is plain bytes."""

from __future__ import annotations

from chunkstore.byte_readers import ByteReader
from chunkstore.tensor_index import TensorIndex, read_safetensors_index
from chunkstore.torch_index import read_torch_index


def read_index(reader: ByteReader, file_size: int) -> TensorIndex | None:
    """The tensor index of the file of ``file_size`` bytes that ``reader`` reads (only the
    parts that describe its tensors are read), or None if it is neither format (or a malformed
    one, or one that shrank meanwhile)."""
    return read_safetensors_index(reader, file_size) or read_torch_index(reader, file_size)
