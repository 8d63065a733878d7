"""A pull over an older copy of a file copies the chunks it holds instead of fetching them."""

from __future__ import annotations

import errno
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import count_fetches, failing_fallocate, random_bytes, tree_bytes, write

from chunkstore import filespace
from chunkstore.dirlock import locked
from chunkstore.errors import CorruptChunk, InvalidInput, StoreUnavailable
from chunkstore.repository import Repository
from chunkstore.reuse import holds
from chunkstore.synthetic import weights, write_safetensors

MB = 1 << 20


def model(seed: int, names: list[str]) -> dict:
    rng = np.random.default_rng(seed)
    return {n: ("BF16", (512, 512), weights(rng, 512 * 512, "bf16")) for n in names}


@pytest.fixture
def two_checkpoints(repo: Repository, tmp_path):
    """v1, and v2 with one tensor retrained, one added and a longer header (metadata), so every
    unchanged tensor sits at another offset."""
    names = [f"layers.{i}.w" for i in range(6)]
    v1 = model(0, names)
    (tmp_path / "v1").mkdir()
    write_safetensors(tmp_path / "v1" / "model.safetensors", v1)
    v2 = {**v1, "layers.2.w": model(1, ["layers.2.w"])["layers.2.w"]}
    v2 = {"embed.w": model(2, ["embed.w"])["embed.w"], **v2}
    (tmp_path / "v2").mkdir()
    write_safetensors(tmp_path / "v2" / "model.safetensors", v2, {"step": "2000" * 20})
    repo.push(tmp_path / "v1", repo="m", tags=["v1"], delta=False)
    repo.push(tmp_path / "v2", repo="m", tags=["v2"], delta=False)
    return tmp_path / "v1", tmp_path / "v2"


def test_pull_over_the_previous_version_fetches_only_what_changed(repo, two_checkpoints, tmp_path):
    v1, v2 = two_checkpoints
    repo.pull("m@v1", tmp_path / "out")
    asked = count_fetches(repo.store)
    repo.pull("m@v2", tmp_path / "out", force=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        v2 / "model.safetensors"
    ).read_bytes()
    manifest = repo.manifest(repo.resolve("m@v2").files[0])
    changed = {t.name for t in manifest.tensors} - {
        "layers.0.w",
        "layers.1.w",
        "layers.3.w",
        "layers.4.w",
        "layers.5.w",
    }
    assert changed == {"embed.w", "layers.2.w"}
    fetched_bytes = sum(n for cid, n in manifest.chunks if cid in set(asked))
    # the header, the new tensor and the retrained one (512 KiB each), not the five unchanged
    assert 1 * MB <= fetched_bytes < 1.2 * MB


def test_pull_over_an_identical_file_fetches_nothing_and_leaves_it_in_place(
    repo, two_checkpoints, tmp_path
):
    repo.pull("m@v2", tmp_path / "out")
    path = tmp_path / "out" / "model.safetensors"
    path.chmod(0o600)
    stale = write(tmp_path / "out" / ".model.safetensors.chunkstore-partial", b"from before")
    before = path.stat()
    asked = count_fetches(repo.store)
    repo.pull("m@v2", tmp_path / "out", force=True)
    assert asked == []
    assert path.read_bytes() == (two_checkpoints[1] / "model.safetensors").read_bytes()
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert after.st_mode & 0o777 == repo.resolve("m@v2").files[0].mode & 0o777
    assert not stale.exists()


@pytest.mark.parametrize(
    "old",
    [
        b"",  # empty
        b"\xff" * 100,  # shorter, not safetensors
        random_bytes(3 * MB, seed=9),  # as long, other bytes
    ],
    ids=["empty", "short", "other-bytes"],
)
def test_a_file_that_holds_nothing_useful_is_replaced_correctly(
    repo, two_checkpoints, tmp_path, old
):
    write(tmp_path / "out" / "model.safetensors", old)
    repo.pull("m@v2", tmp_path / "out", force=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        two_checkpoints[1] / "model.safetensors"
    ).read_bytes()


def test_a_corrupted_old_copy_is_never_trusted(repo, two_checkpoints, tmp_path):
    repo.pull("m@v2", tmp_path / "out")
    path = tmp_path / "out" / "model.safetensors"
    data = bytearray(path.read_bytes())
    for at in range(10_000, len(data), 300_000):  # a flipped bit in many chunks
        data[at] ^= 1
    path.write_bytes(bytes(data))
    asked = count_fetches(repo.store)
    repo.pull("m@v2", tmp_path / "out", force=True)
    assert path.read_bytes() == (two_checkpoints[1] / "model.safetensors").read_bytes()
    assert len(asked) > 0  # the damaged chunks came from the store


def test_plain_files_reuse_the_unchanged_runs(repo, tmp_path):
    data = bytearray(random_bytes(8 * MB, seed=4))
    write(tmp_path / "a" / "w.bin", bytes(data))
    repo.push(tmp_path / "a", repo="p")
    data[6 * MB : 6 * MB + 10] = b"0123456789"  # one chunk changes in place
    write(tmp_path / "b" / "w.bin", bytes(data))
    repo.push(tmp_path / "b", repo="p")
    repo.pull("p~1", tmp_path / "out")
    asked = count_fetches(repo.store)
    repo.pull("p", tmp_path / "out", force=True)
    assert (tmp_path / "out" / "w.bin").read_bytes() == bytes(data)
    manifest = repo.manifest(repo.resolve("p").files[0])
    assert sum(n for cid, n in manifest.chunks if cid in set(asked)) < 300 * 1024


def test_pull_over_with_deltas(repo, tmp_path):
    names = [f"layers.{i}.w" for i in range(4)]
    v1 = model(0, names)
    rng = np.random.default_rng(7)
    v2 = dict(v1)
    dtype, shape, flat = v1["layers.1.w"]
    nudged = (flat.view(np.uint16) ^ rng.integers(0, 2, flat.size, dtype=np.uint16)).view(
        flat.dtype
    )
    v2["layers.1.w"] = (dtype, shape, nudged)
    for name, content in (("v1", v1), ("v2", v2)):
        (tmp_path / name).mkdir()
        write_safetensors(tmp_path / name / "model.safetensors", content)
        repo.push(tmp_path / name, repo="d", tags=[name])
    assert repo.manifest(repo.resolve("d@v2").files[0]).deltas  # layers.1.w is delta-coded
    repo.pull("d@v1", tmp_path / "out")
    repo.pull("d@v2", tmp_path / "out", force=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        tmp_path / "v2" / "model.safetensors"
    ).read_bytes()


def test_bytes_inserted_near_the_start_of_a_plain_file(repo, tmp_path):
    data = random_bytes(6 * MB, seed=5)
    write(tmp_path / "a" / "w.bin", data)
    repo.push(tmp_path / "a", repo="p")
    grown = b"a longer preamble" + data
    write(tmp_path / "b" / "w.bin", grown)
    repo.push(tmp_path / "b", repo="p")
    for old, new in ((data, grown), (grown, data)):  # inserted, then removed again
        write(tmp_path / "out" / "w.bin", old)
        asked = count_fetches(repo.store)
        ref = "p" if new is grown else "p~1"
        repo.pull(ref, tmp_path / "out", force=True)
        assert (tmp_path / "out" / "w.bin").read_bytes() == new
        manifest = repo.manifest(repo.resolve(ref).files[0])
        # the first run of 16 chunks holds the change; the rest is found further on
        assert sum(n for cid, n in manifest.chunks if cid in set(asked)) < 1.5 * MB


def _cut_off_after(repo: Repository, share: float, files_whole: int) -> None:
    """Make the store deliver ``files_whole`` files, then ``share`` of the next one's chunks,
    then become unreachable."""
    store = repo.store
    real_read_into = type(store).read_into
    calls = []

    def read_into(chunk_ids, consume, workers=2):
        calls.append(chunk_ids)
        if len(calls) <= files_whole:
            return real_read_into(store, chunk_ids, consume, workers=workers)
        real_read_into(store, chunk_ids[: int(len(chunk_ids) * share)], consume, workers=workers)
        raise StoreUnavailable("node n1: unavailable: connection refused")

    store.read_into = read_into


def test_an_interrupted_pull_resumes_where_it_stopped(repo, tmp_path):
    data = random_bytes(8 * MB, seed=6)
    write(tmp_path / "a" / "w.bin", data)
    write(tmp_path / "a" / "b.bin", data[:MB])
    repo.push(tmp_path / "a", repo="p", delta=False)
    _cut_off_after(repo, 0.6, files_whole=1)  # b.bin whole, then part of w.bin
    with pytest.raises(StoreUnavailable):
        repo.pull("p", tmp_path / "out")
    partial = tmp_path / "out" / ".w.bin.chunkstore-partial"
    assert partial.exists() and not (tmp_path / "out" / "w.bin").exists()
    assert (tmp_path / "out" / "b.bin").read_bytes() == data[:MB]
    del repo.store.read_into
    with pytest.raises(InvalidInput, match="interrupted pull .* --force to resume"):
        repo.pull("p", tmp_path / "out")
    asked = count_fetches(repo.store)
    repo.pull("p", tmp_path / "out", force=True)
    assert tree_bytes(tmp_path / "out") == {"b.bin": data[:MB], "w.bin": data}  # no partial
    manifest = repo.manifest(repo.resolve("p").file("w.bin"))
    fetched = sum(n for cid, n in manifest.chunks if cid in set(asked))
    assert 0 < fetched < 0.5 * len(data)  # only what the first pull had not written


def _half_pulled(repo: Repository, tmp_path, seed: int) -> bytes:
    """Push a 4 MB file, pull it into ``out`` cut off half way; the file's bytes."""
    data = random_bytes(4 * MB, seed=seed)
    write(tmp_path / "a" / "w.bin", data)
    repo.push(tmp_path / "a", repo="p", delta=False)
    _cut_off_after(repo, 0.5, files_whole=0)
    with pytest.raises(StoreUnavailable):
        repo.pull("p", tmp_path / "out")
    del repo.store.read_into
    return data


def test_push_and_status_leave_out_the_partial_files_of_interrupted_pulls(repo, tmp_path):
    _half_pulled(repo, tmp_path, seed=8)
    write(tmp_path / "out" / "sub" / ".x.bin.chunkstore-partial-earlier", b"set aside")
    write(tmp_path / "out" / "notes.txt", b"mine")
    assert (tmp_path / "out" / ".w.bin.chunkstore-partial").exists()
    status = repo.status(tmp_path / "out", "p")
    assert [c.path for c in status.added] == ["notes.txt"]
    assert [c.path for c in status.removed] == ["w.bin"]
    version = repo.push(tmp_path / "out", repo="q").version
    assert [f.path for f in version.files] == ["notes.txt"]


def test_a_pull_that_fails_for_good_leaves_no_partial_file(repo, tmp_path):
    write(tmp_path / "a" / "w.bin", random_bytes(2 * MB, seed=7))
    repo.push(tmp_path / "a", repo="p")
    store = repo.store
    real_read_into = type(store).read_into

    def damaged(chunk_ids, consume, workers=2):
        real_read_into(store, chunk_ids[:5], consume, workers=workers)
        raise CorruptChunk(chunk_ids[5])

    store.read_into = damaged
    with pytest.raises(CorruptChunk):
        repo.pull("p", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # it made the directory, and leaves none behind


def test_a_symlink_in_place_of_the_partial_file_is_not_followed(repo, tmp_path):
    write(tmp_path / "a" / "w.bin", random_bytes(MB, seed=8))
    repo.push(tmp_path / "a", repo="p")
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".w.bin.chunkstore-partial").symlink_to(victim)
    with pytest.raises(OSError):
        repo.pull("p", tmp_path / "out", force=True)
    assert victim.read_bytes() == b"keep me"


def test_a_resume_that_fails_before_copying_leaves_the_partial_file_as_it_was(
    repo, tmp_path, monkeypatch
):
    data = _half_pulled(repo, tmp_path, seed=9)
    partial = tmp_path / "out" / ".w.bin.chunkstore-partial"
    kept = partial.read_bytes()
    monkeypatch.setattr(filespace, "_FALLOCATE", failing_fallocate(errno.ENOSPC))
    with pytest.raises(OSError, match="No space left"):
        repo.pull("p", tmp_path / "out", force=True)
    assert partial.read_bytes() == kept  # the disk-full attempt changed nothing
    monkeypatch.undo()
    repo.pull("p", tmp_path / "out", force=True)
    assert tree_bytes(tmp_path / "out") == {"w.bin": data}


def test_holds_compares_a_file_with_a_manifest_chunk_by_chunk(repo, tmp_path):
    data = bytearray(random_bytes(3 * MB, seed=10))
    write(tmp_path / "a" / "w.bin", bytes(data))
    manifest = repo.manifest(repo.push(tmp_path / "a", repo="p").version.files[0])
    path = tmp_path / "a" / "w.bin"
    assert holds(manifest, path)
    data[-1] ^= 1  # the last byte
    path.write_bytes(bytes(data))
    assert not holds(manifest, path)
    path.write_bytes(bytes(data[:-1]))  # one byte short
    assert not holds(manifest, path)
    with pytest.raises(FileNotFoundError):
        holds(manifest, tmp_path / "missing")


def test_a_pull_interrupted_twice_loses_nothing_it_wrote(repo, tmp_path):
    data = random_bytes(8 * MB, seed=11)
    write(tmp_path / "a" / "w.bin", data)
    repo.push(tmp_path / "a", repo="p", delta=False)
    manifest = repo.manifest(repo.resolve("p").file("w.bin"))
    for share in (0.5, 0.4):  # half, then 40 % of what was left
        _cut_off_after(repo, share, files_whole=0)
        with pytest.raises(StoreUnavailable):
            repo.pull("p", tmp_path / "out", force=True)
        del repo.store.read_into
    asked = count_fetches(repo.store)
    repo.pull("p", tmp_path / "out", force=True)
    assert tree_bytes(tmp_path / "out") == {"w.bin": data}
    fetched = sum(n for cid, n in manifest.chunks if cid in set(asked))
    assert 0 < fetched < 0.35 * len(data)  # ~30 % was left after the two interrupted pulls


def test_over_the_version_its_deltas_were_coded_against_only_the_deltas_are_fetched(repo, tmp_path):
    names = [f"layers.{i}.w" for i in range(4)]
    base = model(0, names)
    rng = np.random.default_rng(12)
    tuned = {}
    for name, (dtype, shape, flat) in base.items():  # every weight nudged, as one step does
        bits = flat.view(np.uint16) ^ rng.integers(0, 4, flat.size, dtype=np.uint16)
        tuned[name] = (dtype, shape, bits.view(flat.dtype))
    for name, content in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        write_safetensors(tmp_path / name / "m.safetensors", content)
    repo.push(tmp_path / "base", repo="llama")
    repo.push(tmp_path / "tuned", repo="ft", inputs=["llama"])  # deltas against the base model
    manifest = repo.manifest(repo.resolve("ft").files[0])
    refs = manifest.delta_refs()
    assert len(refs) > 0.9 * len(manifest.chunks)
    repo.pull("llama", tmp_path / "out")
    repo.store.remote = True  # as a cluster is: bytes at hand beat bytes over the network
    calls = count_fetches(repo.store)
    repo.pull("ft", tmp_path / "out", force=True)
    asked = set(calls)
    assert (tmp_path / "out" / "m.safetensors").read_bytes() == (
        tmp_path / "tuned" / "m.safetensors"
    ).read_bytes()
    assert {ref.delta for ref in refs.values()} <= asked
    assert not {ref.base for ref in refs.values()} & asked  # the bases came from the old file


# pulls into one directory at once


_RANK = """
import sys, time
from pathlib import Path
from chunkstore.connect import connect
from chunkstore.progress import Tally
store, dest, go = sys.argv[1:]
with connect(store) as repo:
    while not Path(go).exists():  # every rank is loaded and waiting: they start together
        time.sleep(0.001)
    tally = Tally()
    repo.pull("m", dest, force=True, progress=tally)
    print(tally.new)
"""


def test_pulls_into_one_directory_at_once_take_turns_and_fetch_once(lmdb_repo, tmp_path):
    """The ranks of a job each pull the same version into one local directory at the same
    moment (with force): every one succeeds, the file is whole, and it is fetched once."""
    write(tmp_path / "ckpt" / "model.bin", random_bytes(24 * MB, seed=3))
    lmdb_repo.push(tmp_path / "ckpt", "m")
    dest, go = tmp_path / "local-model", tmp_path / "go"
    argv = [sys.executable, "-c", _RANK, str(tmp_path / "store"), str(dest), str(go)]
    ranks = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        time.sleep(1.0)  # let them load
        go.touch()
        fetched = [int(rank.communicate(timeout=120)[0]) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [0, 0, 0]
    assert tree_bytes(dest) == tree_bytes(tmp_path / "ckpt")
    assert sorted(fetched) == [0, 0, 24 * MB]
    assert [p.name for p in dest.iterdir()] == ["model.bin"]  # no partial file left


def test_a_pull_waits_while_another_holds_the_directory(repo, two_checkpoints, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    with locked(dest):
        pull = threading.Thread(target=repo.pull, args=("m@v2", dest))
        pull.start()
        pull.join(0.3)
        assert pull.is_alive() and not (dest / "model.safetensors").exists()
    pull.join(60)
    assert not pull.is_alive()
    assert (dest / "model.safetensors").read_bytes() == (
        two_checkpoints[1] / "model.safetensors"
    ).read_bytes()


def test_pull_over_a_tree_of_another_shape_says_what_is_in_the_way(repo, tmp_path):
    write(tmp_path / "v1" / "a" / "b.txt", b"one")
    write(tmp_path / "v2" / "a", b"two")
    repo.push(tmp_path / "v1", repo="t", tags=["v1"])
    repo.push(tmp_path / "v2", repo="t", tags=["v2"])
    repo.pull("t@v1", tmp_path / "out1")
    with pytest.raises(InvalidInput, match="out1/a: a directory is in the way"):
        repo.pull("t@v2", tmp_path / "out1", force=True)
    assert tree_bytes(tmp_path / "out1") == {"a/b.txt": b"one"}
    repo.pull("t@v2", tmp_path / "out2")
    with pytest.raises(InvalidInput, match="out2/a/b.txt: a file is in the way of its directory"):
        repo.pull("t@v1", tmp_path / "out2", force=True)
    assert tree_bytes(tmp_path / "out2") == {"a": b"two"}
