"""Version and stage records that cannot be read: nodes refuse to store them, and readers that
meet one already stored (written by an earlier node, or damaged on disk) name it instead of
failing with an internal error; GC refuses to act on a listing without it, and prune keeps
every version such a record may name as an input (and refuses where that is unknown)."""

from __future__ import annotations

import json

import grpc
import pytest
from cluster_fixtures import LocalCluster
from conftest import random_bytes, tree_bytes, write

from chunkstore import ids
from chunkstore.client.cli import main
from chunkstore.client.cluster_store import ClusterStore, repo_key
from chunkstore.errors import ChunkstoreWarning, CorruptRecord, UnreadableVersion
from chunkstore.repository import Repository, UnreadableRemoved
from chunkstore.retention import KeepPolicy
from chunkstore.stores.base import Store
from chunkstore.stores.lmdb_store import LmdbStore
from chunkstore.v1 import model_pb2
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc

GARBAGE = b"\xff\xfe not a version record"
GARBAGE_ID = ids.record_id(GARBAGE)


def plant(store: Store, repo: str = "m") -> bytes:
    """Store a version record of ``repo`` that does not parse, as a node of an earlier release
    accepted it; return its id."""
    store.put_version(repo, GARBAGE_ID, GARBAGE)
    return GARBAGE_ID


def push_three(repo: Repository, tmp_path) -> list:
    """Three versions of ``m``, each with a file the others lack."""
    out = []
    for i in range(3):
        write(tmp_path / "ckpt" / "model.bin", random_bytes(300_000, seed=i))
        out.append(repo.push(tmp_path / "ckpt", "m", message=f"step {i}").version)
    return out


def unreadable_warning(repo: str = "m", vid: bytes = GARBAGE_ID) -> str:
    return f"version record {repo}@{vid.hex()} is unreadable: it does not parse as a Version"


def test_listings_go_on_past_an_unreadable_record_and_name_it(repo: Repository, tmp_path):
    pushed = push_three(repo, tmp_path)
    plant(repo.store)
    plant(repo.store, "broken")  # a repo with nothing readable
    with pytest.warns(ChunkstoreWarning) as caught:
        assert [v.id for v in repo.log("m")] == [v.id for v in reversed(pushed)]
        assert [(r.name, r.versions) for r in repo.repos()] == [("m", 3)]
        assert repo.stats()["versions"] == 3
        assert repo.resolve("m").id == pushed[-1].id
        assert repo.log("broken") == []
    assert {str(w.message) for w in caught} == {
        unreadable_warning() + "; left out",
        unreadable_warning("broken") + "; left out",
    }


def test_a_ref_naming_an_unreadable_record_says_which(repo: Repository, tmp_path):
    push_three(repo, tmp_path)
    vid = plant(repo.store)
    repo.store.set_tag("m", "bad", vid)
    for ref in ("m@bad", f"m@{vid.hex()[:12]}"):
        with pytest.raises(UnreadableVersion, match=unreadable_warning()) as info:
            repo.pull(ref, tmp_path / "out")
        assert info.value.exit_code == 4
    assert not (tmp_path / "out").exists()
    with pytest.raises(CorruptRecord, match="'broken' has no version that can be read"):
        plant(repo.store, "broken")
        repo.resolve("broken")


def test_gc_and_prune_refuse_while_a_record_is_unreadable(repo: Repository, tmp_path):
    pushed = push_three(repo, tmp_path)
    repo.rm(f"m@{pushed[0].short_id}")  # its file's chunks are garbage now
    vid = plant(repo.store)
    chunks = repo.store.totals().chunks
    for call, what in (
        (lambda: repo.gc(grace_seconds=0), "gc deleted nothing"),
        (lambda: repo.gc(grace_seconds=0, dry_run=True), "gc deleted nothing"),
        (lambda: repo.prune("m", KeepPolicy(last=1)), "prune removed nothing"),
    ):
        with pytest.raises(
            CorruptRecord, match=f"{what}: {unreadable_warning()}.* rm m@{vid.hex()}"
        ):
            call()
    assert repo.store.totals().chunks == chunks
    assert len(repo.store.list_versions("m")) == 3
    repo.store.set_tag("m", "bad", vid)
    removed = repo.rm("m@bad")  # with the tags that were on it
    assert removed == UnreadableRemoved("m", vid, ["bad"])
    assert len(repo.store.list_versions("m")) == 2 and "bad" not in repo.store.tags("m")
    assert repo.gc(grace_seconds=0).deleted_chunks > 0
    assert [v.id for v in repo.prune("m", KeepPolicy(last=1)).removed] == [pushed[1].id]


def damage(store: Store, repo: str, vid: bytes) -> None:
    """Replace version ``vid`` of ``repo`` with a copy that still parses (its inputs intact)
    but no longer matches its id, as damage on disk leaves a record."""
    msg = model_pb2.Version.FromString(store.get_version(repo, vid))
    msg.message += " (damaged)"
    store.delete_version(repo, vid)
    store.put_version(repo, vid, msg.SerializeToString())


def push_n(repo: Repository, tmp_path, count: int, name: str = "m", inputs=()) -> list:
    """``count`` versions of ``name``, each with a file the others lack."""
    out = []
    for i in range(count):
        write(tmp_path / name / "model.bin", random_bytes(50_000, seed=len(name) * 100 + i))
        out.append(repo.push(tmp_path / name, name, message=f"step {i}", inputs=inputs).version)
    return out


def test_prune_goes_on_past_unreadable_records_that_name_none_of_its_versions(
    repo: Repository, tmp_path
):
    pushed = push_three(repo, tmp_path)
    damage(repo.store, "m", pushed[1].id)  # parses: it names no input
    (x,) = push_n(repo, tmp_path, 1, "x")
    misfiled = repo.store.get_version("x", x.id)  # intact, but a version of x stored as "other"'s
    repo.store.put_version("other", x.id, misfiled)
    with pytest.warns(ChunkstoreWarning) as caught:
        result = repo.prune("m", KeepPolicy(last=1))
    assert [v.id for v in result.removed] == [pushed[0].id]
    assert [(v.id, why) for v, why in result.kept] == [(pushed[2].id, ["newest", "last 1"])]
    assert sorted((e.repo, e.version_id, e.reason) for e in result.unreadable) == [
        ("m", pushed[1].id, "it does not match its id"),
        ("other", x.id, "it is a version of repo 'x'"),
    ]
    assert {str(w.message) for w in caught} == {
        f"version record m@{pushed[1].id.hex()} is unreadable: it does not match its id; "
        "prune keeps every version of 'm' it names as an input",
        f"version record other@{x.id.hex()} is unreadable: it is a version of repo 'x'; "
        "prune keeps every version of 'm' it names as an input",
    }
    assert sorted(vid for vid, _ in repo.store.list_versions("m")) == sorted(
        [pushed[1].id, pushed[2].id]  # the unreadable record stays: only rm removes it
    )


def test_prune_keeps_what_an_unreadable_record_may_name_and_stops_where_that_is_unknown(
    repo: Repository, tmp_path
):
    pushed = push_n(repo, tmp_path, 4)
    (ft,) = push_n(repo, tmp_path, 1, "ft", inputs=[f"m@{pushed[0].short_id}"])
    (v4,) = push_n(repo, tmp_path, 1, "m", inputs=[f"m@{pushed[1].short_id}"])
    damage(repo.store, "ft", ft.id)  # another repo's record, naming m's first version
    damage(repo.store, "m", v4.id)  # m's newest, naming its second
    with pytest.warns(ChunkstoreWarning):
        dry = repo.prune("m", KeepPolicy(last=1), dry_run=True)
        result = repo.prune("m", KeepPolicy(last=1))
    for r in (dry, result):
        assert [v.id for v in r.removed] == [pushed[2].id]
        assert [(v.id, why) for v, why in r.kept] == [
            (pushed[3].id, ["newest", "last 1"]),
            (pushed[1].id, [f"input of unreadable m@{v4.short_id}"]),
            (pushed[0].id, [f"input of unreadable ft@{ft.short_id}"]),
        ]
    assert len(repo.store.list_versions("m")) == 4

    # A record that does not parse may name any version: prune removes nothing while one is
    # there and would remove something (m's first version, once ft's record is gone)...
    repo.rm(f"ft@{ft.id.hex()}")
    kept = sorted(vid for vid, _ in repo.store.list_versions("m"))
    vid = plant(repo.store, "elsewhere")
    for dry_run in (True, False):
        with pytest.raises(CorruptRecord) as info:
            repo.prune("m", KeepPolicy(last=1), dry_run=dry_run)
        assert str(info.value) == (
            f"prune removed nothing: {unreadable_warning('elsewhere')}, so which versions it "
            "names as inputs is unknown; restore from a copy of the store, or remove it "
            f"(chunkstore rm elsewhere@{vid.hex()}), then prune again"
        )
        assert info.value.exit_code == 4
    assert sorted(v for v, _ in repo.store.list_versions("m")) == kept
    # ...but it goes on if the rules keep every version anyway.
    with pytest.warns(ChunkstoreWarning) as caught:
        result = repo.prune("m", KeepPolicy(last=10))
    assert result.removed == [] and len(caught) == 2  # and m's own unreadable record
    assert {(e.repo, e.version_id) for e in result.unreadable} == {("elsewhere", vid), ("m", v4.id)}
    repo.rm(f"elsewhere@{vid.hex()}")

    # A link to a version of m that is not there stops it too: its id may be what was damaged.
    (gone,) = push_n(repo, tmp_path, 1, "gone-input")
    (user,) = push_n(repo, tmp_path, 1, "user", inputs=[f"m@{pushed[3].short_id}"])
    msg = model_pb2.Version.FromString(repo.store.get_version("user", user.id))
    msg.inputs[0].id = gone.id  # the id of no version of m
    repo.store.delete_version("user", user.id)
    repo.store.put_version("user", user.id, msg.SerializeToString())
    with pytest.raises(CorruptRecord, match="prune removed nothing: version record user@"):
        repo.prune("m", KeepPolicy(last=1))
    assert sorted(v for v, _ in repo.store.list_versions("m")) == kept


def test_verify_lists_an_unreadable_record_and_checks_the_rest(repo: Repository, tmp_path):
    push_three(repo, tmp_path)
    plant(repo.store)
    with pytest.warns(ChunkstoreWarning):  # the resolve of a good ref names the record it skips
        assert repo.verify("m").ok
    result = repo.verify()
    assert not result.ok and result.chunks > 0 and not result.corrupt and not result.missing
    assert [(e.repo, e.version_id) for e in result.unreadable] == [("m", GARBAGE_ID)]


def test_stage_records_that_cannot_be_read(repo: Repository, tmp_path):
    write(tmp_path / "a.bin", random_bytes(10_000, seed=1))
    broken = repo.stage("m")
    repo.store.put_stage(bytes.fromhex(broken.id), GARBAGE)
    with pytest.raises(CorruptRecord, match=f"stage {broken.id} is unreadable"):
        repo.open_stage(broken.id)
    open_ = repo.stage("m")
    open_.add(tmp_path / "a.bin")
    repo.store.put_stage_file(bytes.fromhex(open_.id), "b.bin", GARBAGE)
    with pytest.raises(CorruptRecord, match=f"the record of 'b.bin' in stage {open_.id} is unread"):
        open_.commit()
    result = repo.gc(grace_seconds=0)  # a stage nobody can commit is dropped as expired
    assert result.expired_stages == 1 and repo.store.list_stages()[0][0].hex() == open_.id
    open_.add(tmp_path / "a.bin", as_path="b.bin")  # adding the file again replaces its record
    assert [f.path for f in open_.commit().files] == ["a.bin", "b.bin"]


def test_a_stage_whose_input_became_unreadable_still_takes_files(repo: Repository, tmp_path):
    base = repo.push(write(tmp_path / "a.bin", random_bytes(10_000, seed=1)), "base").version
    stage = repo.stage("m", inputs=[base.ref])
    repo.store.delete_version("base", base.id)
    repo.store.put_version("base", base.id, GARBAGE)  # damaged since the stage was opened
    with pytest.warns(ChunkstoreWarning, match=unreadable_warning("base", base.id)):
        stage.add(tmp_path / "a.bin")  # no base to code deltas against, that is all
    assert [f.path for f in stage.commit().files] == ["a.bin"]


# -- the command line ---------------------------------------------------------------------------


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_cli_lists_past_an_unreadable_record_and_gc_refuses(env_store, tmp_path, capsys):
    for seed in (1, 2):  # two versions: prune --keep-last 1 would remove one
        write(tmp_path / "ckpt" / "model.bin", random_bytes(300_000, seed=seed))
        assert run(capsys, "push", str(tmp_path / "ckpt"), "--repo", "m", "-q")[0] == 0
    with LmdbStore(env_store) as store:  # damaged, or written by an earlier node
        vid = plant(store)
    warning = f"chunkstore: warning: {unreadable_warning()}; left out\n"
    for argv in (["ls"], ["log", "m"], ["stats"], ["log", "m", "--json"]):
        code, out, err = run(capsys, *argv)
        assert code == 0 and err == warning, argv
        assert out
    for argv in (["gc", "--grace", "0"], ["prune", "m", "--keep-last", "1"]):
        code, out, err = run(capsys, *argv)
        assert code == 4 and out == "" and len(err.splitlines()) == 1, argv
        assert err.startswith("chunkstore: error: ") and f"rm m@{vid.hex()}" in err
    code, out, err = run(capsys, "verify", "-q")
    hint = f"(restore it from a copy of the store, or remove it: chunkstore rm m@{vid.hex()})"
    assert code == 4 and f"{unreadable_warning()} {hint}\n" in err
    assert err.endswith("0 corrupt chunks and 0 missing chunks, 1 unreadable version record\n")
    code, _, err = run(capsys, "pull", f"m@{vid.hex()[:10]}", str(tmp_path / "out"))
    assert code == 4 and err == (
        f"chunkstore: error: {unreadable_warning()} (restore it from a copy of the store, or "
        f"remove it: chunkstore rm m@{vid.hex()})\n"
    )
    code, out, _ = run(capsys, "rm", f"m@{vid.hex()[:10]}")
    assert code == 0 and out.startswith(f"removed the unreadable version record m@{vid.hex()};")
    assert run(capsys, "gc", "--grace", "0")[0] == 0


def test_rm_json_of_an_unreadable_record_names_the_tags_it_removed(env_store, tmp_path, capsys):
    write(tmp_path / "ckpt" / "model.bin", random_bytes(300_000, seed=1))
    assert run(capsys, "push", str(tmp_path / "ckpt"), "--repo", "m", "-q", "--tag", "ok")[0] == 0
    with LmdbStore(env_store) as store:
        vid = plant(store)
        store.set_tag("m", "bad", vid)
        store.set_tag("m", "also-bad", vid)
    code, out, _ = run(capsys, "rm", "m@bad", "--json")
    assert code == 0
    assert json.loads(out) == {
        "repo": "m",
        "id": vid.hex(),
        "removed": vid.hex(),
        "tags": ["also-bad", "bad"],
    }
    with LmdbStore(env_store) as store:
        assert list(store.tags("m")) == ["ok"]


# -- nodes --------------------------------------------------------------------------------------


def test_nodes_refuse_unreadable_records_and_readers_name_those_stored_before(tmp_path, capsys):
    src = write(tmp_path / "ckpt" / "model.bin", random_bytes(300_000, seed=1)).parent
    with LocalCluster(tmp_path / "cluster", nodes=1) as cluster:
        url = cluster.url
        assert run(capsys, "push", str(src), "--repo", "m", "--store", url, "-q")[0] == 0
        with grpc.insecure_channel(cluster.address("n1")) as channel:
            meta = pb_grpc.MetaServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                meta.PutVersion(pb.VersionRecord(repo="m", id=GARBAGE_ID, data=GARBAGE), timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == f"refused: {unreadable_warning()}; nothing was stored"
        code, out, err = run(capsys, "ls", "--store", url)
        assert code == 0 and out.startswith("m  1 version  ") and err == ""

        cluster.stop("n1")  # what an earlier release of the node stored
        with LmdbStore(cluster.node_data("n1")) as store:
            plant(store)
        cluster.start("n1")
        code, out, err = run(capsys, "ls", "--store", url)
        assert code == 0 and out.startswith("m  1 version  ")
        assert err == f"chunkstore: warning: {unreadable_warning()}; left out\n"
        code, _, err = run(capsys, "gc", "--grace", "0", "--store", url)
        assert code == 4 and "gc deleted nothing" in err
        assert run(capsys, "rm", f"m@{GARBAGE_ID.hex()}", "--store", url)[0] == 0
        code, _, err = run(capsys, "gc", "--grace", "0", "--store", url)
        assert code == 0 and err == ""
        assert run(capsys, "pull", "m", str(tmp_path / "out"), "--store", url, "-q")[0] == 0
    assert tree_bytes(tmp_path / "out") == tree_bytes(src)


def test_a_manifest_that_cannot_be_read_is_named_and_refused_by_nodes(tmp_path, capsys):
    """A manifest damaged on disk fails a pull with one line naming it (exit 4, not an
    internal error), and nodes refuse to store one that does not match its id or parse."""
    store_dir = tmp_path / "store"
    with Repository(LmdbStore(store_dir)) as repo:
        write(tmp_path / "ckpt" / "w.bin", random_bytes(200_000))
        version = repo.push(tmp_path / "ckpt", "m").version
        mid = version.files[0].manifest_id
        assert repo.store.delete_manifests([mid]) == 1
        repo.store.put_manifest(mid, GARBAGE)  # as a damaged disk might leave it
    assert main(["pull", "m", str(tmp_path / "out"), "--store", str(store_dir)]) == 4
    err = capsys.readouterr().err
    assert f"manifest {mid.hex()} is unreadable: it does not match its id" in err
    assert len(err.strip().splitlines()) == 1
    with Repository(LmdbStore(store_dir)) as repo:
        repo.store.put_manifest(mid, GARBAGE)  # bytes that do not hash to the id: kept out
        assert repo.store.get_manifest(mid) == GARBAGE
        assert repo.push(tmp_path / "ckpt", "m").version.files[0].manifest_id == mid
    # The push of the same file replaced the damaged copy.
    assert main(["pull", "m", str(tmp_path / "out"), "--store", str(store_dir), "-q"]) == 0
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "ckpt")

    with (
        LocalCluster(tmp_path / "c", nodes=1, replicas=1) as cluster,
        grpc.insecure_channel(cluster.address("n1")) as channel,
    ):
        meta = pb_grpc.MetaServiceStub(channel)
        for record, why in [
            (pb.ManifestRecord(id=mid, data=GARBAGE), "does not match its id"),
            (pb.ManifestRecord(id=GARBAGE_ID, data=GARBAGE), "does not parse"),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                meta.PutManifest(record, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert why in info.value.details() and "nothing was stored" in info.value.details()
        assert list(meta.HasManifests(pb.ChunkIds(ids=[mid, GARBAGE_ID]), timeout=10).ids) == []


def damage_on(cluster: LocalCluster, node_id: str, write) -> None:
    """Change what node ``node_id`` holds while it is stopped, as a damaged disk might."""
    cluster.stop(node_id)
    with LmdbStore(cluster.node_data(node_id)) as store:
        write(store)
    cluster.start(node_id)


def test_a_damaged_copy_on_one_owner_is_read_from_another_and_a_push_repairs_it(tmp_path, capsys):
    """With two replicas, a manifest or version record damaged on the owner a reader asks
    first is read from the other owner; pushing the file again replaces the damaged manifest."""
    src = write(tmp_path / "ckpt" / "w.bin", random_bytes(300_000, seed=4)).parent
    with LocalCluster(tmp_path / "c", nodes=3, replicas=2) as cluster:
        url = cluster.url
        with Repository(ClusterStore.connect(url)) as repo:
            version = repo.push(src, "m").version
        mid = version.files[0].manifest_id
        first = cluster.map.owners(mid)[0].id
        damaged_manifest = GARBAGE + b" in place of a manifest"

        def replace_manifest(store: Store) -> None:
            store.delete_manifests([mid])
            store.put_manifest(mid, damaged_manifest)

        damage_on(cluster, first, replace_manifest)
        for command in (["pull", "m", str(tmp_path / "out")], ["verify", "m"]):
            code, _, err = run(capsys, *command, "--store", url, "-q")
            assert (code, err) == (0, "")
        assert tree_bytes(tmp_path / "out") == tree_bytes(src)

        with Repository(ClusterStore.connect(url)) as repo:
            assert repo.push(src, "m").version.files[0].manifest_id == mid
        cluster.stop(first)
        with LmdbStore(cluster.node_data(first)) as store:
            assert ids.record_id(store.get_manifest(mid)) == mid  # the push repaired it
        cluster.start(first)

        record_owner = cluster.map.owners(repo_key("m"))[0].id

        def replace_version(store: Store) -> None:
            store.delete_version("m", version.id)
            store.put_version("m", version.id, b"damaged" + bytes(40))

        damage_on(cluster, record_owner, replace_version)
        copy = tmp_path / "copy"
        code, _, err = run(
            capsys, "copy", f"m@{version.id.hex()}", "--to", str(copy), "-q", "--store", url
        )
        assert (code, err) == (0, "")
        with Repository(LmdbStore(copy)) as repo:
            assert repo.resolve(f"m@{version.id.hex()}").id == version.id


def test_the_cli_prune_names_the_unreadable_records_it_kept_versions_for(
    env_store, tmp_path, capsys
):
    for seed in (1, 2, 3):
        write(tmp_path / "ckpt" / "model.bin", random_bytes(50_000, seed=seed))
        assert run(capsys, "push", str(tmp_path / "ckpt"), "--repo", "m", "-q")[0] == 0
    write(tmp_path / "ft" / "model.bin", random_bytes(50_000, seed=9))
    first = json.loads(run(capsys, "log", "m", "--json")[1])[-1]["id"]
    push = ["push", str(tmp_path / "ft"), "--repo", "ft", "-q", "--input", f"m@{first[:12]}"]
    assert run(capsys, *push)[0] == 0
    ft = json.loads(run(capsys, "log", "ft", "--json")[1])[0]["id"]
    with LmdbStore(env_store) as store:
        damage(store, "ft", bytes.fromhex(ft))
    code, out, err = run(capsys, "prune", "m", "--keep-last", "1", "--json")
    assert code == 0
    assert err == (
        f"chunkstore: warning: version record ft@{ft} is unreadable: it does not match its id; "
        "prune keeps every version of 'm' it names as an input\n"
    )
    report = json.loads(out)
    assert report["unreadable"] == [{"repo": "ft", "id": ft, "reason": "it does not match its id"}]
    assert [v["id"] for v in report["kept"]][-1] == first
    assert report["kept"][-1]["reasons"] == [f"input of unreadable ft@{ft[:8]}"]
    assert len(report["removed"]) == 1
