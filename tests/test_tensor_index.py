"""safetensors understood: the index is read without trusting it, tensors are cut on their own."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from conftest import write
from safetensors.numpy import save_file

from chunkstore.byte_readers import BufferReader
from chunkstore.chunking import Chunker, file_regions
from chunkstore.repository import Repository
from chunkstore.synthetic import weights, write_safetensors
from chunkstore.tensor_index import read_safetensors_index

MB = 1 << 20


def index_of(data: bytes):
    return read_safetensors_index(BufferReader(data), len(data))


def tensors(n: int, mb: float = 1, seed: int = 0, dtype: str = "bf16") -> dict:
    rng = np.random.default_rng(seed)
    st, size = {"bf16": ("BF16", 2), "fp32": ("F32", 4)}[dtype]
    count = int(mb * MB) // size
    return {f"layer.{i}": (st, (count // 256, 256), weights(rng, count, dtype)) for i in range(n)}


def test_index_matches_the_reference_writer(tmp_path):
    arrays = {"b": np.arange(10, dtype=np.float32), "a": np.ones((3, 4), dtype=np.int64)}
    save_file(arrays, str(tmp_path / "m.safetensors"), metadata={"step": "1"})
    data = (tmp_path / "m.safetensors").read_bytes()
    index = index_of(data)
    assert index is not None
    by_name = {t.name: t for t in index.tensors}
    assert set(by_name) == {"a", "b"}
    for name, array in arrays.items():
        t = by_name[name]
        assert t.shape == array.shape and t.end - t.begin == array.nbytes
        assert data[t.begin : t.end] == array.tobytes()
    assert by_name["a"].dtype == "I64" and by_name["b"].dtype == "F32"


def _file(header: object, body: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


GOOD = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"short",
        _file(GOOD, b"\0" * 8, length=1 << 40),  # header longer than the file
        _file(b"{not json", b"\0" * 8),
        _file(b"\xff\xfe", b"\0" * 8),  # not UTF-8
        _file([1, 2], b"\0" * 8),  # not an object
        _file({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
        _file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8),
        _file({"t": {"dtype": "NOPE", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
        _file({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
        _file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8),
        _file({"t": "x"}, b"\0" * 8),
        _file({**GOOD, "u": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
    ],
    ids=lambda d: str(len(d)),
)
def test_malformed_headers_are_not_safetensors(data):
    assert index_of(data) is None


def test_malformed_file_still_pushes_as_bytes(repo: Repository, tmp_path):
    data = _file({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\1" * 8)
    write(tmp_path / "d" / "bad.safetensors", data)
    v = repo.push(tmp_path / "d", repo="m").version
    assert repo.manifest(v.files[0]).tensors == []
    repo.pull("m", tmp_path / "out")
    assert (tmp_path / "out" / "bad.safetensors").read_bytes() == data


def test_manifest_keeps_the_tensor_index(repo: Repository, tmp_path):
    (tmp_path / "d").mkdir()
    write_safetensors(tmp_path / "d" / "m.safetensors", tensors(3), {"step": "1"})
    v = repo.push(tmp_path / "d", repo="m").version
    index = repo.manifest(v.files[0]).tensors
    assert [t.name for t in index] == ["layer.0", "layer.1", "layer.2"]
    assert all(t.dtype == "BF16" and t.end - t.begin == MB for t in index)


def test_cuts_follow_tensors_and_element_boundaries(tmp_path):
    write_safetensors(tmp_path / "m.safetensors", tensors(3, mb=1.5, dtype="fp32"))
    data = memoryview((tmp_path / "m.safetensors").read_bytes())
    index = index_of(data)
    chunker = Chunker()
    cuts = list(chunker.cut_file(data, index))
    assert sum(n for _, n, _ in cuts) == len(data)
    starts = {t.begin for t in index.tensors}
    for tensor in index.tensors:
        inside = [(o, n, k) for o, n, k in cuts if tensor.begin <= o < tensor.end]
        assert inside[0][0] == tensor.begin and sum(n for _, n, _ in inside) == MB * 1.5
        assert all((o - tensor.begin) % 4 == 0 and k == 4 for o, _, k in inside)
    assert starts <= {o for o, _, _ in cuts}


def test_small_tensors_share_regions(tmp_path):
    small = {f"norm.{i}": ("F32", (64,), np.ones(64, np.float32) * i) for i in range(100)}
    write_safetensors(tmp_path / "m.safetensors", {**small, **tensors(1, dtype="fp32")})
    data = (tmp_path / "m.safetensors").read_bytes()
    regions = file_regions(index_of(data), len(data), 16 * 1024)
    assert len(regions) == 3  # header, the run of small tensors, the big tensor


def _new_bytes(repo: Repository, tmp_path, name: str, content: dict, metadata=None) -> int:
    d = tmp_path / name
    d.mkdir()
    write_safetensors(d / "model.safetensors", content, metadata)
    return repo.push(d, repo="m").stats.new_raw_bytes


def test_header_change_insert_and_reorder_store_little(repo: Repository, tmp_path):
    base = tensors(8, mb=1)
    total = _new_bytes(repo, tmp_path, "v1", base, {"step": "1"})
    assert total > 8 * MB
    header_only = _new_bytes(repo, tmp_path, "v2", base, {"step": "2", "note": "x" * 100})
    assert header_only < 0.01 * total
    names = list(base)
    inserted = dict(list(base.items())[:4])
    inserted["extra"] = tensors(1, mb=0.5, seed=9)["layer.0"]
    inserted.update(list(base.items())[4:])
    assert _new_bytes(repo, tmp_path, "v3", inserted) < 0.5 * MB + 0.01 * total
    reordered = {n: base[n] for n in reversed(names)}
    assert _new_bytes(repo, tmp_path, "v4", reordered) < 0.01 * total


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes", "element_size"),
    [
        ("F4", [3, 4], 6, 1),  # two values per byte
        ("F6_E2M3", [8], 6, 1),  # four values in three bytes
        ("F6_E3M2", [4], 3, 1),
        ("F8_E8M0", [5], 5, 1),
        ("F8_E4M3FNUZ", [5], 5, 1),
        ("F8_E5M2FNUZ", [5], 5, 1),
        ("C64", [2, 3], 48, 4),  # complex64: pairs of fp32, split into fp32 planes
        ("F64", [3], 24, 8),
    ],
)
def test_every_dtype_of_the_format_is_understood(dtype, shape, nbytes, element_size):
    data = _file(
        {"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}, b"\7" * nbytes
    )
    index = index_of(data)
    assert index is not None
    (tensor,) = index.tensors
    assert (tensor.dtype, tensor.end - tensor.begin) == (dtype, nbytes)
    assert index.element_size(tensor) == element_size


@pytest.mark.parametrize(("dtype", "shape"), [("F4", [3]), ("F6_E2M3", [2]), ("F6_E3M2", [5])])
def test_packed_dtypes_must_fill_whole_bytes(dtype, shape):
    for nbytes in (1, 2, 3, 4):
        data = _file(
            {"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}, b"\0" * 4
        )
        assert index_of(data) is None
