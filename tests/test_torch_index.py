"""PyTorch checkpoints understood: the tensor index of a ``torch.save`` file is read without
torch and without running its pickle, and its tensors get byte planes, deltas, diffs and
partial loads as safetensors tensors do.

The files under ``data/torch`` were written by torch 2.13 (``torch.save``; ``legacy.pt`` with
``_use_new_zipfile_serialization=False``); their values are small integers, so the bytes each
tensor must hold are known here without torch.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import count_fetches, tree_bytes
from test_cli import run
from test_delta import stepped

from chunkstore.byte_readers import BufferReader, FileReader
from chunkstore.file_index import read_index
from chunkstore.repository import Repository
from chunkstore.stores.memory import MemoryStore
from chunkstore.synthetic import (
    bf16_from_f32,
    f32_from_bf16,
    weights,
    write_safetensors,
    write_torch_checkpoint,
)
from chunkstore.torch_index import read_torch_index

DATA = Path(__file__).parent / "data" / "torch"
KB = 1024


def index_of(data: bytes):
    return read_torch_index(BufferReader(data), len(data))


def by_name(data: bytes) -> dict:
    return {t.name: t for t in index_of(data).tensors}


# -- reading the index ----------------------------------------------------------------------------


def test_a_state_dict_saved_by_torch_is_indexed_by_tensor_path():
    data = (DATA / "mixed.pt").read_bytes()
    tensors = by_name(data)
    # The tied "lm_head.weight" and the column view share embed's storage: one entry, named by
    # the first path that views all of it.
    assert list(tensors) == ["embed.weight", "norm", "steps", "half", "p", "meta.layers.0"]
    expected = {
        "embed.weight": ("BF16", (6, 4), bf16_from_f32(np.arange(24, dtype=np.float32))),
        "norm": ("F32", (4,), np.ones(4, np.float32)),
        "steps": ("I64", (), np.array(7, np.int64)),
        "half": ("F16", (3,), np.arange(3, dtype=np.float16)),
        "p": ("F32", (2,), np.arange(2, dtype=np.float32)),
        "meta.layers.0": ("I32", (2,), np.full(2, 5, np.int32)),
    }
    for name, (dtype, shape, values) in expected.items():
        t = tensors[name]
        assert (t.dtype, t.shape) == (dtype, shape)
        assert data[t.begin : t.end] == values.tobytes()
    assert index_of(data).header_end == tensors["embed.weight"].begin


def test_an_optimizer_state_is_indexed_by_parameter_and_moment():
    tensors = by_name((DATA / "optimizer.pt").read_bytes())
    assert {name: (t.dtype, t.shape) for name, t in tensors.items()} == {
        "state.0.step": ("F32", ()),
        "state.0.exp_avg": ("F32", (2, 4)),
        "state.0.exp_avg_sq": ("F32", (2, 4)),
        "state.1.step": ("F32", ()),
        "state.1.exp_avg": ("F32", (2,)),
        "state.1.exp_avg_sq": ("F32", (2,)),
    }


def test_new_dtypes_saved_over_untyped_storage_and_subclasses_are_indexed():
    data = (DATA / "new_dtypes.pt").read_bytes()
    tensors = {name: (t.dtype, t.shape, data[t.begin : t.end]) for name, t in by_name(data).items()}
    assert tensors == {
        "f8": ("F8_E4M3", (6,), bytes([0, 56, 64, 68, 72, 74])),  # 0..5 in float8_e4m3fn
        "u16": ("U16", (4,), np.array([0, 1, 2, 65535], "<u2").tobytes()),
        "w": ("F32", (3,), np.arange(3, dtype=np.float32).tobytes()),
    }
    data = (DATA / "subclass.pt").read_bytes()  # a torch.Tensor subclass of a __main__ class
    assert {n: (t.dtype, t.shape) for n, t in by_name(data).items()} == {"sub": ("F32", (3,))}


def test_a_storage_no_tensor_views_whole_is_named_by_the_tensor_viewing_it():
    data = (DATA / "partial.pt").read_bytes()  # {"column": x[:, 1]}
    (t,) = index_of(data).tensors
    assert (t.name, t.dtype, t.shape) == ("column.storage", "F32", (24,))
    assert data[t.begin : t.end] == np.arange(24, dtype=np.float32).tobytes()


def test_names_do_not_depend_on_the_archive_prefix(tmp_path):
    """torch.save names the archive after the file's stem: step-3.pt and step-6.pt of one run
    must still pair up, tensor by tensor."""
    for name in ("partial.pt", "odd.pt"):
        data = (DATA / name).read_bytes()
        renamed = _with_prefix(data, "step-6/")
        assert [t.name for t in index_of(renamed).tensors] == [
            t.name for t in index_of(data).tensors
        ]
    repo = Repository(MemoryStore())
    for step in (3, 6):
        (tmp_path / f"step-{step}.pt").write_bytes(
            _with_prefix((DATA / "odd.pt").read_bytes(), f"step-{step}/")
        )
        repo.push(tmp_path / f"step-{step}.pt", "r")
    (d,) = repo.tensor_diff("r~", "r")
    assert (d.path, d.added, d.removed) == ("step-6.pt", [], [])  # each paired with its own
    # (tensors this small share chunks with the zip's headers, which name the archive)
    odd = by_name((DATA / "odd.pt").read_bytes())
    assert {c.name: c.old_path for c in d.changed} == dict.fromkeys(odd, "step-3.pt")
    phase = repo.load_tensors("r", "phase")["phase"]
    assert phase.dtype == np.complex128 and phase.tolist() == [0, 1, 2]


def test_what_cannot_be_typed_or_named_once_is_left_out_not_the_whole_index():
    """odd.pt: {"a.b": ones(2), "a": {"b": zeros(2)}, "phase": complex128 0..2, "q": a qint8
    quantized tensor, "w": float32 0..2}. The two paths flattening to "a.b" are named by
    their storages, complex128 is indexed, the quantized storage is left to plain bytes."""
    data = (DATA / "odd.pt").read_bytes()
    tensors = {name: (t.dtype, t.shape, data[t.begin : t.end]) for name, t in by_name(data).items()}
    assert tensors == {
        "data/0": ("F32", (2,), np.ones(2, np.float32).tobytes()),
        "data/1": ("F32", (2,), np.zeros(2, np.float32).tobytes()),
        "phase": ("C128", (3,), np.arange(3, dtype=np.complex128).tobytes()),
        "w": ("F32", (3,), np.arange(3, dtype=np.float32).tobytes()),
    }


def _with_prefix(data: bytes, prefix: str) -> bytes:
    """A copy of the checkpoint ``data`` with its archive's prefix replaced by ``prefix``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(prefix + info.filename.partition("/")[2], src.read(info))
    return out.getvalue()


def test_the_synthetic_writer_matches_what_torch_writes(tmp_path):
    values = bf16_from_f32(np.arange(24, dtype=np.float32))
    write_torch_checkpoint(tmp_path / "m.pt", {"embed.weight": ("BF16", (6, 4), values)})
    mine = by_name((tmp_path / "m.pt").read_bytes())["embed.weight"]
    torch_made = by_name((DATA / "mixed.pt").read_bytes())["embed.weight"]
    assert (mine.dtype, mine.shape, mine.end - mine.begin) == (
        torch_made.dtype,
        torch_made.shape,
        torch_made.end - torch_made.begin,
    )


def test_files_that_are_not_checkpoints_we_understand_are_plain_bytes(tmp_path):
    good = (DATA / "mixed.pt").read_bytes()
    assert index_of((DATA / "legacy.pt").read_bytes()) is None  # pre-zip torch.save
    assert index_of(b"") is None and index_of(b"PK\x03\x04") is None
    assert index_of(good[: len(good) // 2]) is None  # truncated: no central directory
    plain_zip = io.BytesIO()
    with zipfile.ZipFile(plain_zip, "w") as archive:
        archive.writestr("notes.txt", "hello")
    assert index_of(plain_zip.getvalue()) is None
    # torch.save writes its pickle first: a zip that holds one elsewhere is not read.
    assert index_of(_rewritten(good, {}, first="mixed/version")) is None
    assert index_of(_rewritten(good, {"mixed/byteorder": b"big"})) is None
    assert index_of(_rewritten(good, {"mixed/data/1": b"\0" * 12})) is None  # numel disagrees
    assert index_of(_rewritten(good, {}, compress="mixed/data/0")) is None
    assert index_of(_rewritten(good, {"mixed/data.pkl": b"\x80\x02garbage"})) is None
    # A malformed header never fails a push: the file is stored and pulled as bytes.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "odd.pt").write_bytes(_rewritten(good, {"mixed/byteorder": b"big"}))
    repo = Repository(MemoryStore())
    repo.push(tmp_path / "in", "m")
    assert not repo.manifest(repo.resolve("m").file("odd.pt")).tensors
    repo.pull("m", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "in")


def test_nothing_the_pickle_names_is_run(tmp_path):
    marker = tmp_path / "ran"
    evil = (
        b"\x80\x02}(X\x01\x00\x00\x00x"
        + b"cposix\nsystem\n(X"
        + len(f"touch {marker}").to_bytes(4, "little")
        + f"touch {marker}".encode()
        + b"tR"
        + b"X\x01\x00\x00\x00y"
        + b"cbuiltins\neval\n(X\x08\x00\x00\x00__import__tR"
        + b"u."
    )
    pickle_bytes = (DATA / "mixed.pt").read_bytes()
    data = _rewritten(pickle_bytes, {"mixed/data.pkl": evil})
    assert index_of(data) is None  # no tensor in it, and nothing ran
    assert not marker.exists()


def _rewritten(
    data: bytes, replace: dict[str, bytes], compress: str | None = None, first: str | None = None
) -> bytes:
    """A copy of the zip ``data`` with some members' bytes replaced (or one compressed, or one
    moved to the front)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        infos = sorted(src.infolist(), key=lambda info: info.filename != first)
        for info in infos:
            kind = zipfile.ZIP_DEFLATED if info.filename == compress else zipfile.ZIP_STORED
            dst.writestr(info.filename, replace.get(info.filename, src.read(info)), kind)
    return out.getvalue()


# -- what the index buys ------------------------------------------------------------------------


def checkpoint(seed: int = 0, kb: int = 256) -> dict:
    """A bf16 model state and its fp32 Adam moments, as one torch.save'd dict would hold."""
    rng = np.random.default_rng(seed)
    count = kb * KB // 2
    out = {
        f"model.layers.{i}.w": ("BF16", (count // 64, 64), weights(rng, count, "bf16"))
        for i in range(3)
    }
    out["model.norm"] = ("BF16", (64,), weights(rng, 64, "bf16"))
    out["step"] = ("I64", (), np.array(1000, np.int64))
    return out


def save(root: Path, name: str, tensors: dict) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    write_torch_checkpoint(path / "model.pt", tensors)
    return path


def test_a_training_step_of_a_torch_checkpoint_is_stored_as_deltas(repo: Repository, tmp_path):
    v1 = checkpoint()
    p1, p2 = save(tmp_path, "v1", v1), save(tmp_path, "v2", stepped(v1, 1))
    repo.push(p1, "m", tags=["v1"])
    result = repo.push(p2, "m", tags=["v2"])
    manifest = repo.manifest(repo.resolve("m@v2").file("model.pt"))
    assert [t.name for t in manifest.tensors][:2] == ["model.layers.0.w", "model.layers.1.w"]
    assert result.stats.delta_chunks > 0 and manifest.deltas

    other = Repository(MemoryStore())
    other.push(p1, "m")
    without = other.push(p2, "m", delta=False)
    assert result.stats.new_stored_bytes < 0.6 * without.stats.new_stored_bytes
    for ref, source in (("m@v1", p1), ("m@v2", p2)):
        repo.pull(ref, tmp_path / ref)
        assert tree_bytes(tmp_path / ref) == tree_bytes(source)
    assert repo.verify().ok


def test_tensor_diff_and_partial_load_of_a_torch_checkpoint(repo: Repository, tmp_path):
    v1 = checkpoint(seed=2)
    v2 = dict(v1)
    v2["model.layers.1.w"] = stepped(v1, 3)["model.layers.1.w"]
    repo.push(save(tmp_path, "v1", v1), "m", tags=["v1"])
    repo.push(save(tmp_path, "v2", v2), "m", tags=["v2"])
    (diff,) = repo.tensor_diff("m@v1", "m@v2", stats=True)
    # Tensors smaller than a chunk share chunks with the zip's headers (which hold each
    # member's CRC): only the large ones are told apart.
    changed = {c.name: c for c in diff.changed}
    assert {n for n in changed if n.startswith("model.layers")} == {"model.layers.1.w"}
    assert 0 < changed["model.layers.1.w"].relative_l2 < 0.05

    asked = count_fetches(repo.store)
    got = repo.load_tensors("m", ["model.layers.1.w"], file="model.pt")
    expected = f32_from_bf16(v2["model.layers.1.w"][2]).reshape(v2["model.layers.1.w"][1])
    assert np.array_equal(got["model.layers.1.w"], expected)
    manifest = repo.manifest(repo.resolve("m").file("model.pt"))
    fetched = sum(length for cid, length in manifest.chunks if cid in set(asked))
    assert fetched < manifest.size / 2  # that tensor's chunks, not the file


def test_cli_shows_and_diffs_the_tensors_of_a_torch_checkpoint(env_store, tmp_path, capsys):
    v1 = checkpoint(seed=4)
    v2 = dict(v1)
    v2["model.layers.2.w"] = stepped(v1, 5)["model.layers.2.w"]
    for tag, tensors in (("v1", v1), ("v2", v2)):
        code, _, err = run(
            capsys, "push", str(save(tmp_path, tag, tensors)), "--repo", "m", "--tag", tag
        )
        assert code == 0, err
    code, out, _ = run(capsys, "diff", "m@v1", "m@v2", "--tensors", "--json")
    assert code == 0
    report = json.loads(out)
    changed = {c["name"] for c in report["changed"] if c["file"] == "model.pt"}
    assert {n for n in changed if n.startswith("model.layers")} == {"model.layers.2.w"}
    code, out, _ = run(capsys, "show", "m", "--tensors")
    assert code == 0 and "model.layers.2.w" in out and "BF16" in out


@pytest.mark.parametrize(
    "name", ["mixed.pt", "optimizer.pt", "legacy.pt", "new_dtypes.pt", "subclass.pt"]
)
def test_read_index_takes_torch_checkpoints(name):
    data = (DATA / name).read_bytes()
    assert read_index(BufferReader(data), len(data)) == index_of(data)


def test_pull_over_the_previous_checkpoint_copies_its_moved_tensors(repo: Repository, tmp_path):
    rng = np.random.default_rng(7)
    v1 = {f"layers.{i}.w": ("BF16", (512, 512), weights(rng, 512 * 512, "bf16")) for i in range(4)}
    # v2: a tensor inserted first and one retrained, so every kept tensor sits elsewhere.
    v2 = {"embed.w": ("BF16", (512, 512), weights(rng, 512 * 512, "bf16")), **v1}
    v2["layers.2.w"] = ("BF16", (512, 512), weights(rng, 512 * 512, "bf16"))
    repo.push(save(tmp_path, "v1", v1), "m", tags=["v1"], delta=False)
    repo.push(save(tmp_path, "v2", v2), "m", tags=["v2"], delta=False)
    repo.pull("m@v1", tmp_path / "out")
    calls = count_fetches(repo.store)
    repo.pull("m@v2", tmp_path / "out", force=True)
    asked = set(calls)
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "v2")
    manifest = repo.manifest(repo.resolve("m@v2").file("model.pt"))
    fetched = sum(n for cid, n in manifest.chunks if cid in asked)
    assert fetched < 0.45 * manifest.size  # the new and the retrained tensor, not the other 3


def test_damaged_checkpoints_never_fail_reading_their_index():
    good = (DATA / "optimizer.pt").read_bytes()
    rng = np.random.default_rng(3)
    with zipfile.ZipFile(io.BytesIO(good)) as archive:
        pkl = archive.read("optimizer/data.pkl")
    for _ in range(300):
        damaged = bytearray(pkl)
        for at in rng.integers(0, len(pkl), int(rng.integers(1, 4))):
            damaged[at] = int(rng.integers(0, 256))
        data = _rewritten(good, {"optimizer/data.pkl": bytes(damaged)})
        assert_within(index_of(data), data)
    for _ in range(100):
        data = bytearray(good)
        data[int(rng.integers(0, len(good)))] ^= 0xFF
        assert_within(index_of(bytes(data)), data)


def assert_within(index, data) -> None:
    """An index read from damaged bytes, if any, still only names ranges of the file."""
    assert index is None or all(0 <= t.begin <= t.end <= len(data) for t in index.tensors)


@pytest.mark.parametrize("name", ["mixed.pt", "model.safetensors"])
def test_a_file_that_shrank_since_its_size_was_taken_has_no_index(tmp_path, name):
    """A file read with pread while it shrinks (no lease guards it) reads short: its index is
    None, never a fault or a half-read index."""
    path = tmp_path / name
    if name.endswith(".pt"):
        path.write_bytes((DATA / name).read_bytes())
    else:
        write_safetensors(path, {"w": ("F32", (256,), np.ones(256, np.float32))})
    size = path.stat().st_size

    def index_now():
        with contextlib.closing(FileReader(os.open(path, os.O_RDONLY))) as reader:
            return read_index(reader, size)

    whole = index_now()
    assert whole == read_index(BufferReader(path.read_bytes()), size) and whole is not None
    # A safetensors index is its header; a checkpoint's also needs the zip directory at its end.
    cuts = [0, 6, whole.header_end - 1] + ([size - 1] if name.endswith(".pt") else [])
    for cut in cuts:
        os.truncate(path, cut)
        assert index_now() is None, cut
