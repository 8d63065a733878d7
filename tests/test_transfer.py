"""Copying versions between stores: embedded to embedded, to and from a cluster, with history,
tags, delta-coded chunks and inputs; copying again copies nothing; a failed copy leaves whole
versions only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cluster_fixtures import cluster_fixture, free_port
from conftest import random_bytes, tree_bytes, write
from test_cli import run
from test_delta import model, save, stepped

from chunkstore.client.cluster_store import ClusterStore
from chunkstore.errors import CorruptChunk, NotFound, StoreUnavailable
from chunkstore.repository import Repository
from chunkstore.stores.lmdb_store import LmdbStore
from chunkstore.stores.memory import MemoryStore

cluster3 = cluster_fixture(nodes=3, replicas=2)


def three_steps(repo: Repository, root: Path) -> list[Path]:
    """Three versions of repo "m" one optimizer step apart (the later two delta-coded),
    tagged v1..v3, plus a small file; their directories."""
    tensors = model(seed=60)
    paths = []
    for i in range(3):
        path = save(root, f"s{i}", tensors)
        write(path / "notes.txt", b"step %d" % i)
        repo.push(path, "m", tags=[f"v{i + 1}"])
        paths.append(path)
        tensors = stepped(tensors, seed=61 + i)
    return paths


def assert_pulls(repo: Repository, refs_and_paths, out: Path) -> None:
    for ref, path in refs_and_paths:
        repo.pull(ref, out / ref)
        assert tree_bytes(out / ref) == tree_bytes(path)


def test_a_version_is_copied_with_its_history_and_tags(repo: Repository, tmp_path):
    paths = three_steps(repo, tmp_path)
    assert repo.manifest(repo.resolve("m").file("model.safetensors")).deltas
    dest = Repository(MemoryStore())
    result = repo.copy("m", dest)
    assert [v.ref for v in result.copied] == [v.ref for v in reversed(repo.log("m"))]
    assert result.tags == ["v1", "v2", "v3"] and result.present == 0
    assert [v.id for v in dest.log("m")] == [v.id for v in repo.log("m")]  # the same records
    assert_pulls(dest, [("m@v1", paths[0]), ("m@v2", paths[1]), ("m", paths[2])], tmp_path)
    assert dest.verify().ok

    again = repo.copy("m", dest)
    assert (again.copied, again.chunks, again.present, again.tags) == ([], 0, 3, [])


def test_only_copies_one_version_and_a_later_copy_brings_the_rest(repo: Repository, tmp_path):
    paths = three_steps(repo, tmp_path)
    dest = Repository(LmdbStore(tmp_path / "dest"))
    only = repo.copy("m@v2", dest, history=False)
    assert [v.ref for v in only.copied] == [repo.resolve("m@v2").ref] and only.tags == ["v2"]
    assert_pulls(dest, [("m@v2", paths[1])], tmp_path)
    rest = repo.copy("m", dest)
    assert len(rest.copied) == 2 and rest.present == 1 and rest.tags == ["v1", "v3"]
    assert 0 < rest.chunks < only.chunks + rest.chunks  # v2's chunks were not sent twice
    assert_pulls(dest, [("m@v1", paths[0]), ("m", paths[2])], tmp_path / "again")
    dest.store.close()


def test_a_tag_the_destination_has_elsewhere_is_left_as_it_is(repo: Repository, tmp_path):
    three_steps(repo, tmp_path)
    dest = Repository(MemoryStore())
    repo.copy("m@v1", dest)
    dest.tag("m@v1", "v3")  # the destination's own idea of v3
    result = repo.copy("m", dest)
    assert result.kept_tags == ["v3"] and result.tags == ["v2"]
    assert dest.resolve("m@v3").id == repo.resolve("m@v1").id


def test_a_bad_ref_or_a_damaged_chunk_leaves_whole_versions_only(repo: Repository, tmp_path):
    three_steps(repo, tmp_path)
    dest = Repository(MemoryStore())
    with pytest.raises(NotFound):
        repo.copy("m@nope", dest)
    with pytest.raises(NotFound):
        repo.copy("other", dest)
    assert dest.repos() == [] and dest.store.totals().chunks == 0

    manifest = repo.manifest(repo.resolve("m").file("model.safetensors"))
    newest_only = set(manifest.stored_ids()) - {
        cid for v in repo.log("m")[1:] for f in v.files for cid in repo.manifest(f).stored_ids()
    }
    damaged = sorted(newest_only)[0]
    real_get = repo.store.get
    repo.store.get = lambda ids: (
        (cid, b"\x00" + blob[1:] if cid == damaged else blob) for cid, blob in real_get(ids)
    )
    with pytest.raises(CorruptChunk) as info:
        repo.copy("m", dest)
    assert info.value.chunk_id == damaged
    assert [v.ref for v in dest.log("m")] == [v.ref for v in repo.log("m")[1:]]  # v1, v2 whole
    assert dest.verify().ok


def test_chunks_a_gc_took_during_the_copy_are_copied_again(repo: Repository, tmp_path):
    paths = three_steps(repo, tmp_path)
    dest = Repository(MemoryStore())
    repo.copy("m@v1", dest)
    needs = {
        ref: {cid for f in repo.resolve(ref).files for cid in repo.manifest(f).stored_ids()}
        for ref in ("m@v1", "m@v2")
    }
    shared = sorted(needs["m@v1"] & needs["m@v2"])[0]  # held by v1 there, needed by v2 too
    real_lacking = dest.store.lacking

    def collected_after_the_check(ids):
        lacking = real_lacking(ids)
        dest.store.delete([shared])  # a GC right after the check found it stored
        return lacking

    dest.store.lacking = collected_after_the_check
    repo.copy("m@v2", dest)
    assert shared in {info.id for info in dest.store.scan()}
    assert_pulls(dest, [("m@v2", paths[1])], tmp_path)


def lineage(repo: Repository, root: Path) -> dict[str, Path]:
    """A data set "data" (v1); a base model "base" v1 and v2, v2 made from the data set; a
    fine-tune "ft" of base v2, delta-coded against it. Their directories by ref."""
    tensors = model(seed=70)
    paths = {"data@v1": root / "data"}
    write(paths["data@v1"] / "train.jsonl", random_bytes(50_000, seed=71))
    repo.push(paths["data@v1"], "data", tags=["v1"])
    paths["base@v1"] = save(root, "base1", tensors)
    repo.push(paths["base@v1"], "base", tags=["v1"])
    paths["base@v2"] = save(root, "base2", stepped(tensors, seed=72))
    repo.push(paths["base@v2"], "base", tags=["v2"], inputs=["data@v1"])
    paths["ft"] = save(root, "ft", stepped(stepped(tensors, seed=72), seed=73))
    repo.push(paths["ft"], "ft", inputs=["base@v2"])
    assert repo.manifest(repo.resolve("ft").file("model.safetensors")).deltas
    return paths


def names(repo: Repository) -> list[str]:
    return sorted(r.name for r in repo.repos())


def written_in_order(dest: Repository) -> list[tuple[str, bytes]]:
    """Record the (repo, id) of every version record ``dest`` is given, in order."""
    written: list[tuple[str, bytes]] = []
    real_put = dest.store.put_version

    def put_version(repo, vid, data):
        written.append((repo, vid))
        return real_put(repo, vid, data)

    dest.store.put_version = put_version
    return written


def test_inputs_are_copied_first_with_their_own_history_and_inputs(repo: Repository, tmp_path):
    paths = lineage(repo, tmp_path)
    dest = Repository(MemoryStore())
    alone = repo.copy("ft", dest)
    assert names(dest) == ["ft"] and alone.inputs == [] and alone.missing_inputs == []
    assert_pulls(dest, [("ft", paths["ft"])], tmp_path / "alone")  # its chunks came anyway

    written = written_in_order(dest)
    result = repo.copy("ft", dest, inputs=True)
    assert (result.copied, result.present) == ([], 1)
    assert {r.repo: len(r.copied) for r in result.inputs} == {"base": 2, "data": 1}
    assert {r.repo: r.tags for r in result.inputs} == {"base": ["v1", "v2"], "data": ["v1"]}
    assert sum(r.chunks for r in result.inputs) > 0
    assert names(dest) == ["base", "data", "ft"]
    position = {vid: i for i, (_, vid) in enumerate(written)}
    for repo_name, vid in written:  # nothing is written before what it names
        v = dest.store.get_version(repo_name, vid)
        named = [*repo.resolve(f"{repo_name}@{vid.hex()}").parents]
        named += [link.id for link in repo.resolve(f"{repo_name}@{vid.hex()}").inputs]
        assert v is not None and all(position[n] < position[vid] for n in named if n in position)
    assert [w[0] for w in written] == ["data", "base", "base"]  # oldest first, where free to
    assert_pulls(dest, [(ref, path) for ref, path in paths.items()], tmp_path / "all")
    assert dest.verify().ok
    again = repo.copy("ft", dest, inputs=True)
    assert [(r.repo, r.copied, r.present) for r in again.inputs] == [
        ("data", [], 1),
        ("base", [], 2),
    ]


def test_only_with_inputs_takes_the_named_versions_alone(repo: Repository, tmp_path):
    paths = lineage(repo, tmp_path)
    dest = Repository(MemoryStore())
    result = repo.copy("ft", dest, history=False, inputs=True)
    assert [(r.repo, [v.ref for v in r.copied]) for r in result.inputs] == [
        ("data", [repo.resolve("data@v1").ref]),
        ("base", [repo.resolve("base@v2").ref]),
    ]
    assert [v.ref for v in dest.log("base")] == [repo.resolve("base@v2").ref]
    assert_pulls(dest, [("base@v2", paths["base@v2"]), ("ft", paths["ft"])], tmp_path / "out")


def test_an_input_the_source_lost_is_reported_and_the_rest_copied(repo: Repository, tmp_path):
    paths = lineage(repo, tmp_path)
    lost = repo.resolve("data@v1")
    repo.rm("data@v1")
    dest = Repository(MemoryStore())
    result = repo.copy("ft", dest, inputs=True)
    assert [str(link) for link in result.missing_inputs] == [f"data@{lost.short_id}"]
    assert [r.repo for r in result.inputs] == ["base"] and names(dest) == ["base", "ft"]
    assert_pulls(dest, [("base@v2", paths["base@v2"]), ("ft", paths["ft"])], tmp_path / "out")


def test_to_a_cluster_and_back(repo: Repository, cluster3, tmp_path):
    paths = three_steps(repo, tmp_path)
    with Repository(ClusterStore.connect(cluster3.url)) as shared:
        pushed = repo.copy("m", shared)
        assert len(pushed.copied) == 3
        back = Repository(MemoryStore())
        assert len(shared.copy("m@v2", back).copied) == 2
        assert_pulls(back, [("m@v1", paths[0]), ("m@v2", paths[1])], tmp_path)
        assert_pulls(shared, [("m", paths[2])], tmp_path / "shared")
        for v in shared.log("m"):
            shared.rm(v.ref)


def test_copy_command(env_store, tmp_path, capsys):
    write(tmp_path / "ckpt" / "w.bin", random_bytes(300_000, seed=3))
    assert run(capsys, "push", str(tmp_path / "ckpt"), "--repo", "m", "--tag", "v1")[0] == 0
    dest = tmp_path / "dest"
    code, out, err = run(capsys, "copy", "m", "--to", str(dest), "-q", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert len(report["copied"]) == 1 and report["tags"] == ["v1"] and report["chunks"] > 0
    code, out, _ = run(capsys, "copy", "m", "--to", str(dest))
    assert code == 0 and "copied 0 versions of m" in out and "1 already there" in out
    code, _, err = run(capsys, "pull", "m@v1", str(tmp_path / "out"), "--store", str(dest), "-q")
    assert code == 0, err
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "ckpt")
    code, out, err = run(capsys, "copy", "m", "--to", f"{env_store}/.")
    assert (code, out) == (2, "") and "--to names the store m is already in" in err
    code, out, err = run(capsys, "copy", "nope", "--to", str(tmp_path / "never"))
    assert code != 0 and "unknown repo 'nope'" in err and not (tmp_path / "never").exists()
    write(tmp_path / "ft" / "w.bin", random_bytes(200_000, seed=4))
    code, _, err = run(capsys, "push", str(tmp_path / "ft"), "--repo", "ft", "--input", "m@v1")
    assert code == 0, err
    code, out, err = run(capsys, "copy", "ft", "--to", str(tmp_path / "d2"), "--inputs")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("copied 1 version of m to ") and "tags v1" in lines[0]
    assert lines[1].startswith("copied 1 version of ft to ") and len(lines) == 2
    code, out, err = run(capsys, "copy", "ft", "--to", str(tmp_path / "d2"), "--inputs", "--json")
    report = json.loads(out)
    assert code == 0 and report["present"] == 1 and report["missing_inputs"] == []
    assert [(r["repo"], r["present"]) for r in report["inputs"]] == [("m", 1)]
    dead = f"grpc://127.0.0.1:{free_port()}"
    code, _, err = run(capsys, "copy", "m", "--to", dead)
    assert code == StoreUnavailable.exit_code and dead.removeprefix("grpc://") in err
    assert err.count("\n") == 1  # one line saying why, no traceback
