"""Partial loads, lazy mappings and tensor-level diffs of stored safetensors files."""

from __future__ import annotations

import io
import json
import os
import sys
import warnings

import numpy as np
import pytest
from conftest import RecordedProgress, count_fetches
from test_cli import _on_a_terminal, _with_a_terminal, run

from chunkstore import tensor_diff
from chunkstore import tensors as tensors_module
from chunkstore.errors import InvalidInput, NotFound
from chunkstore.jsonout import emit_json
from chunkstore.repository import Repository
from chunkstore.synthetic import weights, write_safetensors

MB = 1 << 20


def model(seed: int = 0, n: int = 6, mb: float = 1) -> dict:
    rng = np.random.default_rng(seed)
    count = int(mb * MB) // 4
    out = {
        f"layers.{i}.w": ("F32", (count // 128, 128), weights(rng, count, "fp32")) for i in range(n)
    }
    out["embed.bf16"] = ("BF16", (count // 128, 128), weights(rng, count, "bf16"))
    out["step"] = ("I64", (1,), np.array([1000], dtype=np.int64))
    return out


@pytest.fixture
def pushed(repo: Repository, tmp_path):
    tensors = model()
    (tmp_path / "v1").mkdir()
    write_safetensors(tmp_path / "v1" / "model.safetensors", tensors)
    (tmp_path / "v1" / "notes.txt").write_text("hi")
    repo.push(tmp_path / "v1", repo="m", tags=["v1"])
    return tensors


def _expected(spec) -> np.ndarray:
    dtype, shape, flat = spec
    if dtype == "BF16":
        return (flat.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return flat.reshape(shape)


def test_load_tensors_by_name_and_glob(repo, pushed):
    got = repo.load_tensors("m@v1", ["layers.1.w", "embed.*", "step"])
    assert set(got) == {"layers.1.w", "embed.bf16", "step"}
    for name, array in got.items():
        np.testing.assert_array_equal(array, _expected(pushed[name]))
    assert got["embed.bf16"].dtype == np.float32 and got["step"].dtype == np.int64
    assert all(array.flags.writeable for array in got.values())  # each in memory of its own
    assert set(repo.load_tensors("m", "layers.*", file="model.safetensors")) == {
        f"layers.{i}.w" for i in range(6)
    }


def test_an_exact_name_is_not_read_as_a_glob(repo, tmp_path):
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    (tmp_path / "v").mkdir()
    write_safetensors(
        tmp_path / "v" / "m.safetensors",
        {"blocks[0].w": ("F32", (4,), ones), "blocks0.w": ("F32", (4,), zeros)},
    )
    repo.push(tmp_path / "v", repo="g")
    got = repo.load_tensors("g", ["blocks[0].w"])
    assert list(got) == ["blocks[0].w"] and got["blocks[0].w"].tolist() == [1.0] * 4
    assert list(repo.load_tensors("g", "blocks[0].*")) == ["blocks0.w"]  # a glob stays one


def test_a_name_in_several_files_needs_file(repo, tmp_path):
    (tmp_path / "v").mkdir()
    for rank in range(2):
        state = {"exp_avg": ("F32", (3,), np.full(3, rank, np.float32))}
        write_safetensors(tmp_path / "v" / f"optim-{rank}.safetensors", state)
    write_safetensors(
        tmp_path / "v" / "w.safetensors", {"w": ("F32", (2,), np.ones(2, np.float32))}
    )
    repo.push(tmp_path / "v", repo="o")
    asked = count_fetches(repo.store)
    for names in ("exp_avg", ["w", "exp*"]):
        with pytest.raises(InvalidInput) as error:
            repo.load_tensors("o", names)
        assert str(error.value) == (
            f"tensor 'exp_avg' is in 2 files of {repo.resolve('o').ref}: optim-0.safetensors, "
            "optim-1.safetensors; pass file= to load from one of them"
        )
    assert asked == []  # refused before fetching anything
    got = repo.load_tensors("o", "exp_avg", file="optim-1.safetensors")
    assert got["exp_avg"].tolist() == [1.0] * 3
    assert list(repo.load_tensors("o", "w")) == ["w"]  # names in one file load as before


def test_load_tensors_errors(repo, pushed):
    with pytest.raises(NotFound, match="no tensor"):
        repo.load_tensors("m", ["layers.1.w", "nope*"])
    with pytest.raises(InvalidInput, match="no tensor index"):
        repo.load_tensors("m", "x", file="notes.txt")
    with pytest.raises(NotFound, match="no file"):
        repo.load_tensors("m", "x", file="other.safetensors")
    with pytest.raises(InvalidInput, match="framework"):
        repo.open_safetensors("m", "model.safetensors", framework="tf")


def test_torch_missing_is_a_clear_error(repo, pushed, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(InvalidInput, match="needs torch"):
        repo.load_tensors("m", "step", framework="pt")


def test_one_tensor_load_moves_only_its_chunks(repo, pushed):
    asked = count_fetches(repo.store)
    lazy = repo.open_safetensors("m", "model.safetensors")
    assert len(lazy) == 8 and "layers.3.w" in lazy
    assert asked == []  # building the mapping reads the manifest only
    np.testing.assert_array_equal(lazy["layers.3.w"], _expected(pushed["layers.3.w"]))
    manifest = repo.manifest(repo.resolve("m").file("model.safetensors"))
    fetched = sum(n for cid, n in manifest.chunks if cid in set(asked))
    assert MB <= fetched <= MB + 2 * 256 * 1024  # one tensor's chunks (raw size), not the file
    assert fetched < manifest.size / 5


def test_lazy_tensors_is_a_mapping_of_its_names(repo, pushed):
    lazy = repo.open_safetensors("m", "model.safetensors")
    assert lazy.get("nope") is None and lazy.get("nope", "default") == "default"
    np.testing.assert_array_equal(lazy.get("step"), _expected(pushed["step"]))
    with pytest.raises(KeyError) as missing:
        lazy["nope"]
    assert isinstance(missing.value, NotFound)  # the CLI reports it as "not found"
    assert str(missing.value) == "model.safetensors has no tensor 'nope'"


def _push_v2(repo, tmp_path, tensors):
    v2 = dict(tensors)
    rng = np.random.default_rng(5)
    dtype, shape, flat = v2["layers.2.w"]
    nudged = flat.copy()
    nudged[:1000] += np.float32(0.001)
    v2["layers.2.w"] = (dtype, shape, nudged)
    del v2["layers.5.w"]
    v2["head.w"] = ("F32", (256, 128), weights(rng, 256 * 128, "fp32"))
    (tmp_path / "v2").mkdir()
    write_safetensors(tmp_path / "v2" / "model.safetensors", v2)
    repo.push(tmp_path / "v2", repo="m", tags=["v2"])
    return flat, nudged


def test_tensor_diff(repo, pushed, tmp_path):
    old, new = _push_v2(repo, tmp_path, pushed)
    (d,) = repo.tensor_diff("m@v1", "m@v2")
    assert d.added == ["head.w"] and d.removed == ["layers.5.w"]
    assert [c.name for c in d.changed] == ["layers.2.w"]
    assert 0 < d.changed[0].bytes_changed < MB
    assert d.unchanged == 6
    shown = RecordedProgress()
    (s,) = repo.tensor_diff("m@v1", "m@v2", stats=True, progress=shown)
    v2_index = repo.manifest(repo.resolve("m@v2").files[0]).tensors
    tensor_bytes = sum(t.end - t.begin for t in v2_index)
    assert shown.units == [["comparing", tensor_bytes, tensor_bytes]]  # each tensor's bytes once
    change = s.changed[0]
    exact = np.linalg.norm((new - old).astype(np.float64)) / np.linalg.norm(old.astype(np.float64))
    assert change.relative_l2 == pytest.approx(exact, rel=1e-9)
    assert 0 < change.differing_bytes <= 4000


def test_tensor_diff_stats_read_a_block_at_a_time(repo, tmp_path, monkeypatch):
    """Tensors larger than a block, of every kind of dtype, in blocks and pieces that do not
    divide them: the same differing bytes and norms as the whole arrays give."""
    monkeypatch.setattr(tensor_diff, "COMPARE_BLOCK_BYTES", 4096)
    monkeypatch.setattr(tensor_diff._Change, "PIECE", 100)
    rng = np.random.default_rng(9)
    v1 = {
        "f32": ("F32", (1000, 37), weights(rng, 37000, "fp32")),
        "bf16": ("BF16", (3001,), weights(rng, 3001, "bf16")),
        "f64": ("F64", (2049,), rng.standard_normal(2049)),
        "c64": ("C64", (513,), (rng.standard_normal(513) + 1j).astype(np.complex64)),
        "i8": ("I8", (10001,), rng.integers(-128, 128, 10001, dtype=np.int8)),
        "codes": ("F8_E4M3", (7777,), rng.integers(0, 256, 7777, dtype=np.uint8)),
    }
    v2 = {}
    for name, (dtype, shape, flat) in v1.items():
        changed = flat.copy()
        where = rng.choice(len(flat), len(flat) // 7, replace=False)
        changed.view(np.uint8).reshape(len(flat), -1)[where, 0] ^= np.uint8(1)
        v2[name] = (dtype, shape, changed)
    for label, content in (("v1", v1), ("v2", v2)):
        (tmp_path / label).mkdir()
        write_safetensors(tmp_path / label / "m.safetensors", content)
        repo.push(tmp_path / label, repo="b", tags=[label], delta=False)
    (d,) = repo.tensor_diff("b@v1", "b@v2", stats=True)
    assert [c.name for c in d.changed] == sorted(v1)  # by name, though read in file order
    changes = {c.name: c for c in d.changed}
    for name, (dtype, _, old) in v1.items():
        new = v2[name][2]
        change = changes[name]
        assert change.differing_bytes == np.count_nonzero(
            old.view(np.uint8) != new.view(np.uint8)
        ), name
        if dtype == "F8_E4M3":
            assert change.relative_l2 is None
            continue
        if dtype == "BF16":
            old, new = (tensors_module.to_array(x.tobytes(), change.old) for x in (old, new))
        wide = np.complex128 if dtype == "C64" else np.float64
        x, y = old.astype(wide).ravel(), new.astype(wide).ravel()
        exact = np.linalg.norm(y - x) / np.linalg.norm(x)
        assert change.relative_l2 == pytest.approx(exact, rel=1e-9), name


def test_a_local_file_that_ends_before_its_tensors_is_an_error(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"x" * 100)
    with open(path, "rb") as f, pytest.raises(InvalidInput, match="short.safetensors ended"):
        tensor_diff._read_into(f, memoryview(bytearray(150)))


def test_tensor_diff_cli(env_store, tmp_path, capsys):
    tensors = model(n=3)
    (tmp_path / "v1").mkdir()
    write_safetensors(tmp_path / "v1" / "model.safetensors", tensors)
    assert run(capsys, "push", str(tmp_path / "v1"), "--repo", "m", "--tag", "v1")[0] == 0
    with _open(env_store) as repo:
        _push_v2(repo, tmp_path, {**tensors, "layers.5.w": tensors["layers.0.w"]})
    code, out, _ = run(capsys, "diff", "m@v1", "m@v2", "--tensors", "--stats", "--json")
    d = json.loads(out)
    assert code == 0 and d["added"] == ["head.w"] and d["removed"] == []
    assert [c["name"] for c in d["changed"]] == ["layers.2.w"]
    assert d["changed"][0]["bytes_changed"] > 0 and d["changed"][0]["relative_l2"] > 0
    assert d["unchanged"] == 4  # layers.0, layers.1, embed.bf16, step (layers.5 is new)
    code, out, _ = run(capsys, "diff", "m@v1", "m@v2", "--tensors")
    assert code == 0 and "M  layers.2.w" in out and "A  head.w" in out
    code, out, _ = run(capsys, "show", "m@v2", "--tensors", "--json")
    names = [t["name"] for t in json.loads(out)["tensors"]["model.safetensors"]]
    assert code == 0 and "head.w" in names
    code, _, err = run(capsys, "diff", "m@v1", "m@v2", "--tensors", "--file", "x.bin")
    assert code == 3 and "no file" in err


def test_a_side_without_tensors_has_none_either_way(repo, tmp_path):
    """The new version's file no longer parses: its tensors were removed, as the reverse diff
    says they were added; only when neither side has a tensor index is it an error."""
    (tmp_path / "good").mkdir()
    write_safetensors(
        tmp_path / "good" / "m.safetensors", {"w": ("F32", (4,), np.ones(4, np.float32))}
    )
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "m.safetensors").write_bytes(b"no longer a safetensors file")
    repo.push(tmp_path / "good", repo="m", tags=["good"])
    repo.push(tmp_path / "bad", repo="m", tags=["bad"])
    for file in (None, "m.safetensors"):
        (forward,) = repo.tensor_diff("m@good", "m@bad", file=file)
        (reverse,) = repo.tensor_diff("m@bad", "m@good", file=file)
        assert (forward.removed, forward.added, reverse.added, reverse.removed) == (
            ["w"],
            [],
            ["w"],
            [],
        )
    with pytest.raises(InvalidInput, match="zip-format torch.save file: legacy torch.save"):
        repo.tensor_diff("m@bad", "m@bad", file="m.safetensors")
    with pytest.raises(InvalidInput, match="no file has a tensor index"):
        repo.tensor_diff("m@bad", "m@bad")
    with pytest.raises(NotFound, match="have no file 'x.bin'"):
        repo.tensor_diff("m@good", "m@bad", file="x.bin")


def test_undefined_relative_l2_is_null_in_json_and_said_in_text(env_store, tmp_path, capsys):
    """A tensor holding NaN has no relative L2 change; an all-zero one that changes has an
    infinite one. JSON cannot spell either: strict JSON says null, text says which, and numpy
    warns of nothing."""
    for label, values in (
        ("v1", ([np.nan, 1.0], [0.0] * 1000)),
        ("v2", ([1.0, 1.0], [1.0] * 1000)),
    ):
        (tmp_path / label).mkdir()
        x, z = (np.array(v, dtype=np.float32) for v in values)
        write_safetensors(
            tmp_path / label / "m.safetensors", {"x": ("F32", (2,), x), "z": ("F32", (1000,), z)}
        )
        assert run(capsys, "push", str(tmp_path / label), "--repo", "m")[0] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, out, err = run(capsys, "diff", "m~", "m", "--tensors", "--stats", "--json")
        d = json.loads(out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
        assert code == 0 and err == ""
        assert {c["name"]: c["relative_l2"] for c in d["changed"]} == {"x": None, "z": None}
        assert {c["name"]: c["relative_l2_undefined"] for c in d["changed"]} == {
            "x": "NaN or infinite values",
            "z": "the old tensor is all zeros",
        }
        code, out, err = run(capsys, "diff", "m~", "m", "--tensors", "--stats")
        assert code == 0 and err == ""
        assert "relative L2 change n/a (NaN or infinite values)" in out
        assert "relative L2 change inf (the old tensor is all zeros)" in out
    with _open(env_store) as repo:
        (d,) = repo.tensor_diff("m~", "m", stats=True)
    changes = {c.name: c.relative_l2 for c in d.changed}
    assert np.isnan(changes["x"]) and changes["z"] == np.inf


def test_json_output_never_holds_nan_or_infinity():
    out = io.StringIO()
    emit_json({"a": [1.5, float("nan")], "b": {"c": float("-inf")}, "d": (float("inf"), 2)}, out)
    assert json.loads(out.getvalue()) == {"a": [1.5, None], "b": {"c": None}, "d": [None, 2]}


def _write_v2(tmp_path, tensors) -> None:
    """The local file a training job would write next: v1 with layers.2.w nudged, layers.5.w
    gone and head.w new (as :func:`_push_v2`, without pushing it)."""
    v2 = dict(tensors)
    dtype, shape, flat = v2["layers.2.w"]
    nudged = flat.copy()
    nudged[:1000] += np.float32(0.001)
    v2["layers.2.w"] = (dtype, shape, nudged)
    del v2["layers.5.w"]
    v2["head.w"] = ("F32", (256, 128), weights(np.random.default_rng(5), 256 * 128, "fp32"))
    write_safetensors(tmp_path / "v1" / "model.safetensors", v2)


@pytest.mark.parametrize("delta", [True, False])
def test_status_tensors_tells_what_a_push_would_change_and_stores_nothing(repo, tmp_path, delta):
    tensors = model()
    (tmp_path / "v1").mkdir()
    write_safetensors(tmp_path / "v1" / "model.safetensors", tensors)
    (tmp_path / "v1" / "notes.txt").write_text("hi")
    repo.push(tmp_path / "v1", repo="m")
    if delta:  # the latest version is stored as deltas against its parent
        tensors = {
            k: (d, s, f + np.float32(1e-4) if d == "F32" else f) for k, (d, s, f) in tensors.items()
        }
        write_safetensors(tmp_path / "v1" / "model.safetensors", tensors)
        assert repo.push(tmp_path / "v1", repo="m").stats.delta_chunks > 0
    asked = count_fetches(repo.store)
    (same,) = repo.status_tensors(tmp_path / "v1", "m", stats=True)
    assert (same.added, same.removed, same.changed, same.unchanged) == ([], [], [], 8)
    assert asked == []  # an unchanged file is checked against the ids, no chunk is read

    _write_v2(tmp_path, tensors)
    before = repo.store.totals()
    shown = RecordedProgress()
    (local,) = repo.status_tensors(tmp_path / "v1", "m", stats=True, progress=shown)
    size = (tmp_path / "v1" / "model.safetensors").stat().st_size
    assert [u for u in shown.units if u[0] == "hashing model.safetensors"] == [
        ["hashing model.safetensors", size, size]
    ]
    assert shown.units[-1][0] == "comparing" and shown.units[-1][1] == shown.units[-1][2] > 0
    assert repo.store.totals() == before  # nothing stored
    assert local.added == ["head.w"] and local.removed == ["layers.5.w"]
    assert [c.name for c in local.changed] == ["layers.2.w"] and local.unchanged == 6
    repo.push(tmp_path / "v1", repo="m")
    (pushed,) = repo.tensor_diff("m~", "m", stats=True)
    assert local.to_json() == pushed.to_json()  # what status said is what the push did


def test_tensor_diff_matches_tensors_across_shards(repo, tmp_path):
    """A checkpoint saved in other shards compares tensor by tensor: each tensor with the one
    of its name wherever it was, a removed one under the file it was in."""
    v1 = model(n=4)
    extra = {"extra.w": v1.pop("layers.3.w")}
    (tmp_path / "v1").mkdir()
    write_safetensors(tmp_path / "v1" / "model.safetensors", v1)
    write_safetensors(tmp_path / "v1" / "extra.safetensors", extra)
    repo.push(tmp_path / "v1", repo="s", tags=["v1"])
    rng = np.random.default_rng(4)
    nudged = v1["layers.1.w"][2].copy()
    nudged[:100] += np.float32(0.01)
    v2 = {**v1, "layers.1.w": ("F32", v1["layers.1.w"][1], nudged)}
    del v2["step"]
    v2["head.w"] = ("F32", (64, 64), weights(rng, 64 * 64, "fp32"))
    names = list(v2)
    (tmp_path / "v2").mkdir()
    write_safetensors(tmp_path / "v2" / "part-1.safetensors", {n: v2[n] for n in names[:2]})
    write_safetensors(tmp_path / "v2" / "part-2.safetensors", {n: v2[n] for n in names[2:]})
    repo.push(tmp_path / "v2", repo="s", tags=["v2"])

    diffs = {d.path: d for d in repo.tensor_diff("s@v1", "s@v2", stats=True)}
    assert set(diffs) == {
        "extra.safetensors",
        "model.safetensors",
        "part-1.safetensors",
        "part-2.safetensors",
    }
    assert diffs["extra.safetensors"].removed == ["extra.w"]
    assert diffs["model.safetensors"].removed == ["step"]
    assert (
        sum(len(d.added) for d in diffs.values()) == 1
        and "head.w" in diffs["part-2.safetensors"].added
    )
    changed = [c for d in diffs.values() for c in d.changed]
    assert [c.name for c in changed] == ["layers.1.w"]
    assert changed[0].old_path == "model.safetensors" and changed[0].differing_bytes > 0
    old = v1["layers.1.w"][2].astype(np.float64)
    exact = np.linalg.norm(nudged.astype(np.float64) - old) / np.linalg.norm(old)
    assert changed[0].relative_l2 == pytest.approx(exact, rel=1e-9)
    assert sum(d.unchanged for d in diffs.values()) == len(v2) - 2  # all but layers.1 and head

    (only,) = repo.tensor_diff("s@v1", "s@v2", file="part-1.safetensors")
    assert only.path == "part-1.safetensors" and not only.changed and not only.unchanged
    assert sorted(only.added) == sorted(names[:2])  # part-1 is new in v2

    local = {d.path: d for d in repo.status_tensors(tmp_path / "v2", "s", stats=True)}
    assert local.keys() == {"part-1.safetensors", "part-2.safetensors"}  # v2's files
    assert all(not d.changed and not d.added for d in local.values())  # v2 is the latest
    # resharded again locally (layers.1.w moves to part-2), and layers.2.w nudged
    stepped = v2["layers.2.w"][2].copy()
    stepped[-10:] -= np.float32(0.01)
    write_safetensors(tmp_path / "v2" / "part-1.safetensors", {"layers.0.w": v2["layers.0.w"]})
    write_safetensors(
        tmp_path / "v2" / "part-2.safetensors",
        {
            "layers.1.w": v2["layers.1.w"],
            "layers.2.w": ("F32", v2["layers.2.w"][1], stepped),
            "embed.bf16": v2["embed.bf16"],
            "head.w": v2["head.w"],
        },
    )
    local = {d.path: d for d in repo.status_tensors(tmp_path / "v2", "s")}
    assert [(c.name, c.old_path) for c in local["part-2.safetensors"].changed] == [
        ("layers.2.w", None)
    ]
    assert local["part-2.safetensors"].unchanged == 3 and local["part-1.safetensors"].unchanged == 1
    assert not any(d.added or d.removed for d in local.values())


def test_status_tensors_cli_and_its_errors(env_store, tmp_path, capsys):
    tensors = model(n=3)
    (tmp_path / "v1").mkdir()
    write_safetensors(tmp_path / "v1" / "model.safetensors", tensors)
    assert run(capsys, "push", str(tmp_path / "v1"), "--repo", "m")[0] == 0
    _write_v2(tmp_path, {**tensors, "layers.5.w": tensors["layers.0.w"]})
    code, out, _ = run(capsys, "status", str(tmp_path / "v1"), "--repo", "m", "--tensors")
    assert code == 0 and "M  layers.2.w" in out and "A  head.w" in out and "  D  " not in out
    code, out, _ = run(
        capsys, "status", str(tmp_path / "v1"), "--repo", "m", "--tensors", "--stats", "--json"
    )
    d = json.loads(out)
    assert code == 0 and d["changed"][0]["differing_bytes"] > 0 and d["unchanged"] == 4
    assert d["skipped"] == []
    dangling = tmp_path / "v1" / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")  # a push would leave it out: status says so
    status = ("status", str(tmp_path / "v1"), "--repo", "m", "--tensors", "--json")
    code, out, err = run(capsys, *status)
    reason = "dangling symlink: its target does not exist"
    assert code == 0 and json.loads(out)["skipped"] == [{"path": str(dangling), "reason": reason}]
    assert err == f"chunkstore: warning: {dangling} not pushed: {reason}\n"
    dangling.unlink()

    (tmp_path / "v1" / "model.safetensors").write_bytes(b"not a safetensors file any more")
    code, out, _ = run(capsys, "status", str(tmp_path / "v1"), "--repo", "m", "--tensors")
    assert code == 0 and out.count("  D  ") == 5  # every tensor went
    (tmp_path / "v1" / "model.safetensors").rename(tmp_path / "v1" / "notes.txt")
    code, out, _ = run(capsys, "status", str(tmp_path / "v1"), "--repo", "m", "--tensors")
    assert code == 0 and out.count("  D  ") == 5  # the file went, and its tensors with it
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("no tensors here")
    assert run(capsys, "push", str(tmp_path / "plain"), "--repo", "p")[0] == 0
    code, out, err = run(capsys, "status", str(tmp_path / "v1"), "--repo", "p", "--tensors")
    assert (code, out) == (2, "") and "hold no safetensors or torch.save file" in err
    code, _, err = run(capsys, "status", str(tmp_path / "nope"), "--repo", "m", "--tensors")
    assert code == 3 and "no such file or directory" in err
    code, _, err = run(capsys, "status", str(tmp_path / "v1"), "--repo", "x", "--tensors")
    assert code == 3 and "unknown repo" in err


def test_tensor_stats_show_progress_on_a_terminal(env_store, tmp_path, capsys):
    tensors = model()
    (tmp_path / "v1").mkdir()
    write_safetensors(tmp_path / "v1" / "model.safetensors", tensors)
    assert run(capsys, "push", str(tmp_path / "v1"), "--repo", "m", "--tag", "v1")[0] == 0
    with _open(env_store) as repo:
        _push_v2(repo, tmp_path, tensors)  # v1's local file now differs from the latest
    env = {**os.environ, "CHUNKSTORE_STORE": str(env_store), "COLUMNS": "120"}
    diff = ["diff", "m@v1", "m@v2", "--tensors", "--stats"]
    text = _on_a_terminal(env, *diff)
    assert "comparing" in text and "B/s" in text and "M  layers.2.w" in text
    out, text = _with_a_terminal(env, [*diff, "--json"])
    assert [c["name"] for c in json.loads(out)["changed"]] == ["layers.2.w"]  # JSON alone
    assert "comparing" in text and "{" not in text
    status = ["status", str(tmp_path / "v1"), "--repo", "m", "--tensors", "--stats"]
    text = _on_a_terminal(env, *status)
    assert "hashing model.safetensors" in text and "comparing" in text and " new" not in text
    assert "M  layers.2.w" in text
    for argv in (diff, status):
        out, text = _with_a_terminal(env, [*argv, "-q"])
        assert "M  layers.2.w" in out and "B/s" not in text and "comparing" not in text


def _open(path):
    from chunkstore.connect import connect

    return connect(str(path))


def _newer_dtypes(rng: np.random.Generator, scale_codes: np.ndarray, freqs: np.ndarray) -> dict:
    """Weights as recent quantized checkpoints store them: bf16, 8-bit scales, packed 4-bit
    floats, and complex64 rotary frequencies."""
    return {
        "w.bf16": ("BF16", (256, 256), weights(rng, 256 * 256, "bf16")),
        "w.scales": ("F8_E8M0", (256,), scale_codes),
        "w.fp4": ("F4", (64, 128), rng.integers(0, 256, 64 * 64, dtype=np.uint8)),
        "freqs": ("C64", (64, 32), freqs),
    }


def test_newer_dtypes_keep_the_tensor_index_load_and_diff(repo, tmp_path):
    rng = np.random.default_rng(3)
    codes = rng.integers(100, 140, 256, dtype=np.uint8)
    freqs = (rng.standard_normal(2048) + 1j * rng.standard_normal(2048)).astype(np.complex64)
    v1 = _newer_dtypes(rng, codes, freqs)
    (tmp_path / "v1").mkdir()
    write_safetensors(tmp_path / "v1" / "m.safetensors", v1)
    version = repo.push(tmp_path / "v1", repo="q", tags=["v1"]).version
    index = {t.name: t for t in repo.manifest(version.files[0]).tensors}
    assert {name: t.dtype for name, t in index.items()} == {
        "w.bf16": "BF16",
        "w.scales": "F8_E8M0",
        "w.fp4": "F4",
        "freqs": "C64",
    }
    loaded = repo.load_tensors("q@v1", ["w.scales", "w.fp4", "freqs"])
    assert loaded["w.scales"].dtype == np.uint8 and np.array_equal(loaded["w.scales"], codes)
    fp4 = loaded["w.fp4"]  # packed: each row's 128 values in 64 bytes
    assert fp4.shape == (64, 64) and np.array_equal(fp4.ravel(), v1["w.fp4"][2])
    assert loaded["freqs"].dtype == np.complex64 and loaded["freqs"].shape == (64, 32)
    assert np.array_equal(loaded["freqs"].ravel(), freqs)

    new_codes, new_freqs = codes.copy(), freqs.copy()
    new_codes[:10] += 1
    new_freqs[:100] *= np.complex64(1 + 0.01j)
    v2 = {**v1, "w.scales": ("F8_E8M0", (256,), new_codes), "freqs": ("C64", (64, 32), new_freqs)}
    (tmp_path / "v2").mkdir()
    write_safetensors(tmp_path / "v2" / "m.safetensors", v2)
    repo.push(tmp_path / "v2", repo="q", tags=["v2"])
    (d,) = repo.tensor_diff("q@v1", "q@v2", stats=True)
    changed = {c.name: c for c in d.changed}
    assert set(changed) == {"w.scales", "freqs"} and d.unchanged == 2
    assert changed["w.scales"].differing_bytes == 10
    assert changed["w.scales"].relative_l2 is None  # exponent codes, not values
    assert changed["w.scales"].to_json()["relative_l2_undefined"] == (
        "no values: 8-, 6- or 4-bit float codes"
    )
    assert "relative_l2_undefined" not in changed["freqs"].to_json()
    old, new = freqs.astype(np.complex128), new_freqs.astype(np.complex128)
    exact = np.linalg.norm(new - old) / np.linalg.norm(old)
    assert changed["freqs"].relative_l2 == pytest.approx(exact, rel=1e-9)


def test_chunk_spans_are_the_chunks_overlapping_each_tensor():
    """Found by bisection, they are what a scan over every chunk finds, for tensors starting
    and ending anywhere (inside chunks, on their edges, empty)."""
    from chunkstore.model import Manifest, TensorInfo
    from chunkstore.tensor_diff import _chunk_spans

    rng = np.random.default_rng(12)
    lengths = rng.integers(1, 50, 300).tolist()
    chunks = [(bytes([i % 256, i // 256]) * 16, n) for i, n in enumerate(lengths)]
    size = sum(lengths)
    manifest = Manifest(size, chunks, [])
    starts = manifest.offsets()
    for _ in range(2000):
        begin = int(rng.integers(0, size + 1))
        end = min(size, begin + int(rng.integers(0, 200)))
        tensor = TensorInfo("t", "U8", (end - begin,), begin, end)
        expected = [
            (start - begin, cid, n)
            for start, (cid, n) in zip(starts, chunks, strict=True)
            if start + n > begin and start < end
        ]
        assert _chunk_spans(manifest, starts, tensor) == expected
