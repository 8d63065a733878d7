"""ClusterStore against real node processes on loopback ports: round trips through the
repository layer, placement by the ring, node failures, corrupt replicas, and the store protocol.

Clusters come from ``cluster_fixtures``; every process they start is stopped at the end.
"""

from __future__ import annotations

import filecmp
import json
import signal
import threading
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import test_stores
from cluster_fixtures import LocalCluster, cluster_fixture, free_port
from conftest import count_fetches, random_bytes, tree_bytes, write

# The store protocol as every store keeps it, run here against a cluster (``store`` below).
# Left out: test_put_of_existing_id_keeps_first_blob and test_read_verifies store blobs that do
# not match their ids, which nodes refuse; test_a_claimant_is_remembered_for_an_hour and
# test_a_claimant_is_remembered_until_its_stage_expires would wait an hour or a day on a node.
from test_stores import (  # noqa: F401
    blob,
    test_a_claimant_of_the_wrong_size_is_refused_and_deletes_nothing,
    test_a_delete_retried_by_its_claimant_succeeds_and_nobody_elses,
    test_concurrent_writers,
    test_delete,
    test_delete_version_removes_its_tags,
    test_empty_store,
    test_get_manifests_in_order_and_an_absent_one_is_not_found,
    test_get_of_absent_id_raises,
    test_list_repos,
    test_manifests,
    test_put_get_scan_totals,
    test_put_is_all_or_nothing,
    test_put_manifest_again_keeps_data_and_refreshes_stored_at,
    test_put_manifests_stores_each_and_refreshes_stored_at,
    test_put_refreshes_wanted_at_of_existing,
    test_tags,
    test_versions,
)

from chunkstore import ids
from chunkstore.client.cli import main as cli_main
from chunkstore.client.cluster_store import ClusterStore, repo_key
from chunkstore.client.rpc import NodeCallError, NodeClient, RpcPolicy, to_error
from chunkstore.client.wire import put_chunks_batch
from chunkstore.cluster_map import ClusterMap, NodeSpec
from chunkstore.connect import connect
from chunkstore.errors import (
    ChunkNotFound,
    CorruptChunk,
    InvalidInput,
    NotFound,
    StoreFull,
    StoreUnavailable,
)
from chunkstore.ingest import PipelineLimits
from chunkstore.model import Manifest
from chunkstore.repository import Repository
from chunkstore.retention import KeepPolicy
from chunkstore.stores import lmdb_store
from chunkstore.stores.lmdb_store import LmdbStore
from chunkstore.synthetic import make_series, optimizer_step, weights, write_safetensors
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc

MB = 1 << 20
# Small windows and batches: a 16 MB push makes many existence checks and writes.
SMALL_WINDOWS = PipelineLimits(window_bytes=2 * MB, group_bytes=1 * MB, batch_bytes=2 * MB)

cluster3 = cluster_fixture(nodes=3, replicas=2)
cluster4 = cluster_fixture(nodes=4, replicas=3)
contract_cluster = cluster_fixture(nodes=3, replicas=2)


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    """Three bf16 safetensors checkpoints of 16 MB, each rewriting ~10% of the last."""
    return make_series(tmp_path_factory.mktemp("series"), versions=3, size_mb=16)


def push_all(repo: Repository, versions: list[Path], name: str = "model") -> None:
    for path in versions:
        repo.push(path, name, message=path.name, tags=[path.name])


def assert_pulls_identical(repo: Repository, versions: list[Path], dest: Path, name="model"):
    for path in versions:
        out = dest / path.name
        repo.pull(f"{name}@{path.name}", out)
        for original in path.iterdir():
            assert filecmp.cmp(original, out / original.name, shallow=False), original


def node_holds(address: str, chunk_ids: list[bytes]) -> set[bytes]:
    """The chunks among ``chunk_ids`` that the node at ``address`` holds, asked directly."""
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.ChunkServiceStub(channel).Missing(pb.ChunkIds(ids=chunk_ids), timeout=10)
    return set(chunk_ids) - set(reply.ids)


def repo_chunks(repo: Repository, ref: str) -> list[bytes]:
    version = repo.resolve(ref)
    return list(dict.fromkeys(cid for f in version.files for cid, _ in repo.manifest(f).chunks))


class KillAt:
    """A progress sink that SIGKILLs a node once ``share`` of a push or pull is done."""

    def __init__(self, cluster: LocalCluster, node_id: str, share: float) -> None:
        self.cluster, self.node_id, self.share = cluster, node_id, share
        self.total = self.done = 0

    def start(self, total: int, label: str) -> None:
        self.total = total

    def advance(self, done: int, new: int = 0) -> None:
        self.done += done
        if (
            self.done >= self.share * self.total
            and self.cluster.process(self.node_id).poll() is None
        ):
            self.cluster.kill(self.node_id)

    def finish(self) -> None:
        pass


def corrupt(cluster: LocalCluster, node_id: str, cid: bytes, bad: bytes) -> None:
    """Replace a chunk's blob in a node's store while the node is stopped."""
    cluster.stop(node_id)
    with LmdbStore(cluster.node_data(node_id), create=False) as shard:
        assert shard.delete([cid]) == 1
        shard.put([(cid, bad)])
    cluster.start(node_id)


# round trips and placement


@pytest.mark.parametrize("cluster_name", ["cluster3", "cluster4"])
def test_versions_round_trip(request, cluster_name, series, tmp_path):
    cluster: LocalCluster = request.getfixturevalue(cluster_name)
    with Repository(ClusterStore.connect(cluster.url)) as repo:
        assert repo.store.location == cluster.url
        push_all(repo, series, "rt")
        assert [v.message for v in repo.log("rt")] == [p.name for p in reversed(series)]
        second = repo.resolve(f"rt@{series[1].name}")
        assert second.new_bytes < 0.4 * second.size  # only the rewritten tensors were new
        assert_pulls_identical(repo, series, tmp_path, "rt")
        assert repo.verify().ok
        stats = repo.stats()
        assert stats["versions"] == 3
        assert 0 < stats["stored_bytes"] < stats["logical_bytes"] / 2  # unique bytes, not copies
    with ClusterStore.connect(cluster.url) as store:  # a second client sees the same
        assert "rt" in store.list_repos()
        with Repository(store) as repo, repo.open(f"rt@{series[0].name}", "model.safetensors") as f:
            f.seek(1000)
            assert f.read(5000) == (series[0] / "model.safetensors").read_bytes()[1000:6000]


def test_a_tree_of_many_small_files_round_trips_and_a_lost_chunk_fails_its_pull(cluster3, tmp_path):
    """Small files are pulled several at once and manifests read and written several at once:
    every file arrives whole, and a chunk lost from every owner fails the pull naming it,
    leaving no partial file behind."""
    tree = tmp_path / "tree"
    for i in range(40):
        write(tree / f"d{i % 3}" / f"f{i:02}.bin", random_bytes(3000 + 997 * i, seed=i))
    write(tree / "big.bin", random_bytes(6 << 20, seed=99))  # pulled on its own
    with Repository(ClusterStore.connect(cluster3.url)) as repo:
        version = repo.push(tree, "many").version
        assert len(version.files) == 41
        repo.pull("many", tmp_path / "out")
        assert tree_bytes(tmp_path / "out") == tree_bytes(tree)
        lost = repo.manifest(version.file("d1/f19.bin")).chunks[0][0]
        assert repo.store.delete([lost]) == 1
        with pytest.raises(ChunkNotFound) as info:
            repo.pull("many", tmp_path / "again")
        assert info.value.chunk_id == lost
        assert not [p for p in (tmp_path / "again").rglob("*") if "partial" in p.name]
        assert not (tmp_path / "again" / "d1" / "f19.bin").exists()


def test_a_manifest_too_large_for_one_message_round_trips(cluster3):
    """A file of ~60 GB in 64 KiB chunks has a manifest of ~36 MiB, past the 32 MiB a message
    carries: it is stored and read in pieces, and decodes whole."""
    rng = np.random.default_rng(5)
    count = 900_000
    chunk_ids = rng.integers(0, 256, (count, 32), dtype=np.uint8)
    chunks = [(row.tobytes(), 65536 + i % 4096) for i, row in enumerate(chunk_ids)]
    manifest = Manifest(sum(n for _, n in chunks), chunks, [])
    manifest_id, data = manifest.encode()
    assert len(data) > 32 << 20
    with ClusterStore.connect(cluster3.url) as store:
        store.put_manifest(manifest_id, data)
        assert manifest_id in store.has_manifests([manifest_id])
        assert Manifest.decode(manifest_id, store.get_manifest(manifest_id)).chunks == chunks


def test_deltas_round_trip_and_a_pull_over_their_base_fetches_only_the_deltas(cluster3, tmp_path):
    rng = np.random.default_rng(4)
    base = {
        f"layers.{i}.w": ("BF16", (512, 512), weights(rng, 512 * 512, "bf16")) for i in range(4)
    }
    step = {n: (d, s, optimizer_step(rng, flat, "bf16")) for n, (d, s, flat) in base.items()}
    for name, tensors in (("base", base), ("step", step)):
        (tmp_path / name).mkdir()
        write_safetensors(tmp_path / name / "m.safetensors", tensors)
    with Repository(ClusterStore.connect(cluster3.url)) as repo:
        repo.push(tmp_path / "base", repo="w")
        repo.push(tmp_path / "step", repo="w")
        refs = repo.manifest(repo.resolve("w").files[0]).delta_refs()
        assert refs  # the step is stored as deltas against the base
        repo.pull("w", tmp_path / "fresh")
        repo.pull("w~", tmp_path / "over")
        asked = count_fetches(repo.store)
        repo.pull("w", tmp_path / "over", force=True)
        for dest in ("fresh", "over"):
            got = (tmp_path / dest / "m.safetensors").read_bytes()
            assert got == (tmp_path / "step" / "m.safetensors").read_bytes()
        assert {ref.delta for ref in refs.values()} <= set(asked)
        assert not {ref.base for ref in refs.values()} & set(asked)


@pytest.mark.parametrize("cluster_name", ["cluster3", "cluster4"])
def test_data_lives_on_its_owners(request, cluster_name, tmp_path):
    cluster: LocalCluster = request.getfixturevalue(cluster_name)
    write(tmp_path / "ckpt" / "weights.bin", random_bytes(4 * MB, seed=3))
    with Repository(ClusterStore.connect(cluster.url)) as repo:
        version = repo.push(tmp_path / "ckpt", "placed").version
        chunk_ids = repo_chunks(repo, "placed")
    ring: ClusterMap = cluster.map
    held = {n.id: node_holds(n.address, chunk_ids) for n in ring.nodes}
    for cid in chunk_ids:
        assert {n for n, h in held.items() if cid in h} == {o.id for o in ring.owners(cid)}
    assert all(held.values())  # every node holds a share
    manifest_id = version.files[0].manifest_id
    for node in ring.nodes:
        with grpc.insecure_channel(node.address) as channel:
            meta = pb_grpc.MetaServiceStub(channel)
            has = meta.HasManifests(pb.ChunkIds(ids=[manifest_id]), timeout=10).ids
            versions = meta.ListVersions(pb.RepoName(repo="placed"), timeout=10).versions
        assert bool(has) == (node in ring.owners(manifest_id))
        assert bool(versions) == (node in ring.owners(repo_key("placed")))


def test_prune_and_gc_remove_unreferenced_data_from_every_node(tmp_path, series):
    with LocalCluster(tmp_path / "c", nodes=3, replicas=2) as cluster:
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            push_all(repo, series[:2])
            first = repo.resolve(f"model@{series[0].name}")
            old, new = repo_chunks(repo, first.ref), repo_chunks(repo, "model")
            repo.untag("model", series[0].name)  # a tagged version is never pruned
            first.tags.clear()
            assert repo.prune("model", KeepPolicy(last=1)).removed == [first]
            result = repo.gc(grace_seconds=0)
            gone = set(old) - set(new)
            assert result.deleted_chunks == len(gone) > 0
            assert result.deleted_manifests == 1
            assert repo.store.missing(old) == gone
            assert repo.stats()["chunks"] == len(new)
            assert_pulls_identical(repo, series[1:2], tmp_path / "out")
        for node in cluster.map.nodes:
            assert not node_holds(node.address, list(gone))


# failures


def test_push_completes_when_a_node_dies_midway(tmp_path, series):
    with LocalCluster(tmp_path / "c", nodes=3, replicas=3, write_quorum=2) as cluster:
        repo = Repository(ClusterStore.connect(cluster.url), limits=SMALL_WINDOWS)
        with repo:
            repo.push(series[0], "m", tags=[series[0].name])
            repo.push(series[1], "m", tags=[series[1].name], progress=KillAt(cluster, "n2", 0.4))
            assert cluster.process("n2").poll() is not None, "n2 was not killed during the push"
            repo.push(series[2], "m", tags=[series[2].name])
            assert_pulls_identical(repo, series, tmp_path / "while-down", "m")
        cluster.start("n2")  # back, without what was written while it was down
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            assert_pulls_identical(repo, series, tmp_path / "after-restart", "m")


def test_reads_survive_two_dead_owners_and_a_dead_seed(tmp_path, series):
    with LocalCluster(tmp_path / "c", nodes=3, replicas=3, write_quorum=2) as cluster:
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            push_all(repo, series[:2])
        cluster.kill("n1")
        # The URL lists the dead node first: the map comes from another.
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            first = series[0].name
            repo.pull(f"model@{first}", tmp_path / first, progress=KillAt(cluster, "n2", 0.5))
            assert cluster.process("n2").poll() is not None, "n2 was not killed during the pull"
            original = series[0] / "model.safetensors"
            assert filecmp.cmp(original, tmp_path / first / original.name, shallow=False)
            assert [v.message for v in repo.log("model")] == [series[1].name, first]
            assert_pulls_identical(repo, series[1:2], tmp_path / "out")


def test_ls_needs_all_but_replicas_minus_one_nodes(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CHUNKSTORE_TOKEN", raising=False)
    with LocalCluster(tmp_path / "c", nodes=3, replicas=2, write_quorum=1) as cluster:
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            for i in range(6):  # repos spread over every pair of owners
                write(tmp_path / f"r{i}" / "x.bin", random_bytes(1000, seed=i))
                repo.push(tmp_path / f"r{i}", f"repo-{i}")
        names = [f"repo-{i}" for i in range(6)]
        cluster.kill("n1")  # every repo still has an owner among n2, n3
        assert cli_main(["ls", "--json", "--store", cluster.url]) == 0
        assert [r["name"] for r in json.loads(capsys.readouterr().out)] == names
        cluster.kill("n2")  # repos owned by n1 and n2 alone are out of sight
        code = cli_main(["ls", "--json", "--store", cluster.url])
        out, err = capsys.readouterr()
        assert code == 6 and out == ""
        assert "list repos: 1 of 3 nodes answered, 2 needed" in err
        assert "n1" in err and "n2" in err and len(err.strip().splitlines()) == 1


def test_a_hung_node_costs_seconds_not_deadlines(tmp_path, series):
    quick = RpcPolicy(timeout=3, stream_timeout=6, straggler_grace=0.3, stall_timeout=1)
    with LocalCluster(tmp_path / "c", nodes=3, replicas=3, write_quorum=2) as cluster:
        with Repository(ClusterStore.connect(cluster.url, quick)) as repo:
            repo.push(series[0], "m", tags=[series[0].name])
            chunk_ids = repo_chunks(repo, "m")
        store = ClusterStore.connect(cluster.url, quick)
        assert store.list_repos() == ["m"]  # connected to every node, all healthy
        cluster.process("n2").send_signal(signal.SIGSTOP)  # alive to the kernel, silent
        try:
            start = time.monotonic()
            with store:  # n2's streams stall, and their chunks come from the others
                assert len(dict(store.read(chunk_ids))) == len(chunk_ids)
            assert quick.stall_timeout <= time.monotonic() - start < quick.stream_timeout
            with Repository(ClusterStore.connect(cluster.url, quick), limits=SMALL_WINDOWS) as repo:
                repo.push(series[1], "m", tags=[series[1].name])
                assert_pulls_identical(repo, series[:2], tmp_path / "out", "m")
            assert time.monotonic() - start < 4 * quick.stream_timeout
        finally:
            cluster.kill("n2")


def test_reads_of_a_connected_client_go_around_a_hung_node(tmp_path):
    """A training job's client has channels open to every node when one freezes (a stopped
    process, a cut cable). Each read of metadata then costs about the grace period, never a
    deadline, also where every write needs both owners (replicas 2, write quorum 2)."""
    quick = RpcPolicy(timeout=3, stream_timeout=6, straggler_grace=0.3, stall_timeout=1)
    with LocalCluster(tmp_path / "c", nodes=3, replicas=2, write_quorum=2) as cluster:
        owners = {f"repo-{i}": [n.id for n in cluster.map.owners(repo_key(f"repo-{i}"))]
                  for i in range(40)}  # fmt: skip
        names = sorted(  # repos whose records n2 holds first, second, not at all
            [r for r, o in owners.items() if o[0] == "n2"][:2]
            + [r for r, o in owners.items() if o[1] == "n2"][:2]
            + [r for r, o in owners.items() if "n2" not in o][:1]
        )
        assert len(names) == 5
        with Repository(ClusterStore.connect(cluster.url, quick)) as repo:
            for i, name in enumerate(names):
                data = write(tmp_path / name / "x.bin", random_bytes(300_000, seed=i))
                repo.push(data.parent, name, tags=["v1"])
            assert [r.name for r in repo.repos()] == names  # every channel open, all healthy
            cluster.process("n2").send_signal(signal.SIGSTOP)  # alive to the kernel, silent
            try:
                for name in names:
                    for what, read in [
                        ("log", partial(repo.log, name)),
                        ("tags", partial(repo.tagged, name, "v1")),
                        ("resolve", partial(repo.resolve, f"{name}@v1")),
                        ("pull", partial(repo.pull, f"{name}@v1", tmp_path / "out" / name)),
                    ]:
                        start = time.monotonic()
                        read()
                        took = time.monotonic() - start
                        assert took < quick.timeout, f"{what} {name} took {took:.1f} s"
                    assert filecmp.cmp(tmp_path / name / "x.bin", tmp_path / "out" / name / "x.bin")
            finally:
                cluster.kill("n2")


def test_dead_seed_is_skipped(cluster3):
    live = cluster3.address("n2")
    with ClusterStore.connect(f"grpc://127.0.0.1:{free_port()},{live}") as store:
        assert store.cluster == cluster3.map
        store.list_repos()


def test_a_cluster_store_used_after_fork_says_to_open_it_again(cluster3):
    """Its thread pool has no threads in a forked child: a call must fail, not wait forever."""
    with ClusterStore.connect(cluster3.url) as store:
        vid, data = test_stores.record("forked", 1)
        store.put_version("forked", vid, data)
        assert store.list_versions("forked") == [(vid, data)]  # the pool's threads ran
        for call in (lambda: store.list_versions("forked"), store.list_repos):

            def in_child(call=call) -> bool:
                signal.alarm(10)  # a hang ends the child instead of stalling the test
                return test_stores._says_reopen(call, "connect again in this process")

            assert test_stores._in_child(in_child) == 0

        def connect_again() -> bool:  # as the error says: a store of the child's own works
            signal.alarm(10)
            with ClusterStore.connect(cluster3.url) as own:
                return own.list_versions("forked") == [(vid, data)]

        assert test_stores._in_child(connect_again) == 0
        assert store.list_versions("forked") == [(vid, data)]  # the parent's works


def test_a_closed_cluster_store_says_it_is_closed(cluster3, tmp_path):
    with connect(cluster3.url) as repo:
        repo.push(write(tmp_path / "a.bin", random_bytes(1 << 20)), "closed", tags=["v1"])
        lazy = repo.open("closed@v1", "a.bin")
    for call in (
        lambda: repo.log("closed"),
        repo.repos,
        lambda: repo.pull("closed@v1", tmp_path / "out"),
        lambda: repo.push(tmp_path / "a.bin", "closed"),
        lambda: repo.stage("closed"),
        lambda: lazy.read(),
    ):
        with pytest.raises(StoreUnavailable, match="is closed"):
            call()
    repo.close()  # closing again is harmless


def test_no_reachable_seed_names_every_address():
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with pytest.raises(StoreUnavailable) as info:
        ClusterStore.connect("grpc://" + ",".join(dead))
    message = str(info.value)
    assert all(address in message for address in dead) and "\n" not in message


@pytest.mark.parametrize("url", ["grpc://", "grpc://host", "grpc://a:1,,b:2", "http://a:1"])
def test_malformed_url(url):
    with pytest.raises(InvalidInput):
        ClusterStore.connect(url)


def test_push_below_write_quorum_fails_and_shows_nothing(tmp_path, series, monkeypatch, capsys):
    with LocalCluster(tmp_path / "c", nodes=3, replicas=3, write_quorum=2) as cluster:
        store = ClusterStore.connect(cluster.url)
        cluster.kill("n2")
        cluster.kill("n3")
        with Repository(store) as repo, pytest.raises(StoreUnavailable) as info:
            repo.push(series[0], "m", tags=["v1"])
        message = str(info.value)
        assert "n2" in message and "n3" in message and "write quorum is 2" in message
        assert "\n" not in message

        monkeypatch.setenv("CHUNKSTORE_STORE", cluster.url)
        assert cli_main(["push", str(series[0]), "--repo", "m", "-q"]) == 6
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "n2" in err and "Traceback" not in err

        cluster.start("n2")
        cluster.start("n3")
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            assert repo.repos() == []
            with pytest.raises(NotFound):
                repo.log("m")


def test_corrupt_replica_is_read_from_another_owner(tmp_path):
    data = random_bytes(2 * MB, seed=7)
    write(tmp_path / "ckpt" / "w.bin", data)
    with LocalCluster(tmp_path / "c", nodes=3, replicas=2) as cluster:
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            repo.push(tmp_path / "ckpt", "m")
            cid = repo_chunks(repo, "m")[0]
            raw = dict(repo.store.read([cid]))[cid]
        primary, secondary = (n.id for n in cluster.map.owners(cid))
        bad = blob(bytes(reversed(raw)))  # decodes fine, hashes to another id
        corrupt(cluster, primary, cid, bad)

        with Repository(ClusterStore.connect(cluster.url)) as repo:
            assert dict(repo.store.get([cid]))[cid] == bad  # get() is unverified, primary first
            assert dict(repo.store.read([cid]))[cid] == raw
            repo.pull("m", tmp_path / "out")
            assert (tmp_path / "out" / "w.bin").read_bytes() == data

        corrupt(cluster, secondary, cid, bad)
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            with pytest.raises(CorruptChunk) as info:
                list(repo.store.read([cid]))
            assert primary in str(info.value) and secondary in str(info.value)
            assert repo.verify().corrupt == [cid]
            with pytest.raises(InvalidInput, match="nodes replace a corrupt copy"):
                repo.verify(repair=True)  # nothing removed: another replica may heal it
            assert dict(repo.store.get([cid]))[cid] == bad


def test_absent_chunk_is_not_found_on_every_owner(cluster3):
    absent = ids.chunk_id(b"never stored")
    with ClusterStore.connect(cluster3.url) as store:
        with pytest.raises(ChunkNotFound) as info:
            list(store.read([absent]))
        assert info.value.chunk_id == absent
        assert store.missing([absent]) == {absent}


def test_missing_repairs_an_under_replicated_chunk(cluster4):
    raw = random_bytes(1000, seed=11)
    cid = ids.chunk_id(raw)
    owners = cluster4.map.owners(cid)
    with grpc.insecure_channel(owners[0].address) as channel:  # one copy only, behind the client
        batch = pb.PutChunksBatch(seq=0, chunks=[pb.EncodedChunk(id=cid, blob=blob(raw))])
        list(pb_grpc.ChunkServiceStub(channel).PutChunks(iter([batch]), timeout=10))
    with ClusterStore.connect(cluster4.url) as store:
        assert store.missing([cid]) == {cid}  # 1 of 3 owners < write quorum 2
        assert store.put([(cid, blob(raw))]) == 0  # the primary had it: nothing new
        assert store.missing([cid]) == set()
    assert {n.id for n in cluster4.map.nodes if node_holds(n.address, [cid])} == {
        o.id for o in owners
    }


def wanted_at(address: str, cid: bytes) -> float:
    """When the node at ``address`` last marked chunk ``cid`` wanted, asked directly."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ChunkServiceStub(channel)
        for batch in stub.ScanChunks(pb.ScanChunksRequest(), timeout=10):
            for info in batch.chunks:
                if info.id == cid:
                    return info.wanted_at
    raise AssertionError(f"{address} does not hold {cid.hex()}")


def test_lacking_marks_nothing_and_mark_wanted_marks_every_owner(tmp_path, monkeypatch):
    raw = random_bytes(5000, seed=12)
    stale, absent = ids.chunk_id(raw), ids.chunk_id(b"never stored")
    an_hour_ago = time.time() - 3600
    with LocalCluster(tmp_path / "c", nodes=3, replicas=2) as cluster:
        owners = cluster.map.owners(stale)
        for owner in owners:  # a copy last wanted an hour ago on each owner
            cluster.stop(owner.id)
            with monkeypatch.context() as m, LmdbStore(cluster.node_data(owner.id)) as shard:
                m.setattr(lmdb_store, "time", SimpleNamespace(time=lambda: an_hour_ago))
                shard.put([(stale, blob(raw))])
            cluster.start(owner.id)
        started = time.time()
        with ClusterStore.connect(cluster.url) as store:
            assert store.lacking([stale, absent, stale]) == {absent}
            assert all(wanted_at(o.address, stale) < started for o in owners)
            assert store.mark_wanted([stale, absent]) == {absent}
            assert all(wanted_at(o.address, stale) >= started for o in owners)
            assert store.mark_wanted([]) == set()

            cluster.stop(owners[1].id)  # gone or unreachable? not known: no verdict
            with pytest.raises(StoreUnavailable, match=f"mark chunks wanted.*{owners[1].id}"):
                store.mark_wanted([stale])


def test_mark_wanted_refuses_a_malformed_id_and_marks_nothing(tmp_path, monkeypatch):
    raw = random_bytes(3000, seed=13)
    cid = ids.chunk_id(raw)
    an_hour_ago = time.time() - 3600
    with LocalCluster(tmp_path / "c", nodes=1, replicas=1) as cluster:
        (node,) = cluster.map.nodes
        cluster.stop(node.id)
        with monkeypatch.context() as m, LmdbStore(cluster.node_data(node.id)) as shard:
            m.setattr(lmdb_store, "time", SimpleNamespace(time=lambda: an_hour_ago))
            shard.put([(cid, blob(raw))])
        cluster.start(node.id)
        with grpc.insecure_channel(node.address) as channel:
            stub = pb_grpc.ChunkServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.MarkWanted(pb.ChunkIds(ids=[cid, b"short"]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "id #1" in info.value.details() and "32 bytes" in info.value.details()
        assert wanted_at(node.address, cid) == an_hour_ago
        with (
            ClusterStore.connect(cluster.url) as store,
            pytest.raises(InvalidInput, match="mark chunks wanted: .* id #0"),
        ):
            store.mark_wanted([b"short"])
        assert wanted_at(node.address, cid) == an_hour_ago


# the store protocol


@pytest.fixture
def store(contract_cluster):
    """A client of a cluster that is emptied again after each test."""
    s = ClusterStore.connect(contract_cluster.url)
    yield s
    for repo in s.list_repos():
        for vid, _ in s.list_versions(repo):
            s.delete_version(repo, vid)
    s.delete([info.id for info in s.scan()])
    s.delete_manifests([mid for mid, _ in s.scan_manifests()])
    s.close()


def test_delete_spares_chunks_wanted_since_cutoff(store):
    test_stores.test_delete_spares_chunks_wanted_since_cutoff(store)


@pytest.mark.parametrize("seq", [0, 1, 300])
def test_hand_encoded_put_batch_is_the_protobuf_encoding(seq):
    pairs = [(ids.chunk_id(b"x"), b"\0" * 5), (ids.chunk_id(b"y"), random_bytes(70_000))]
    message = pb.PutChunksBatch(
        seq=seq, chunks=[pb.EncodedChunk(id=cid, blob=data) for cid, data in pairs]
    )
    assert put_chunks_batch(seq, pairs) == message.SerializeToString(deterministic=True)
    assert put_chunks_batch(seq, []) == pb.PutChunksBatch(seq=seq).SerializeToString()


def test_node_failures_become_one_line_chunkstore_errors():
    a, b = NodeSpec("a", "10.0.0.1:7400"), NodeSpec("b", "10.0.0.2:7400")
    full = NodeCallError(a, grpc.StatusCode.RESOURCE_EXHAUSTED, "store at /srv is full")
    down = NodeCallError(b, grpc.StatusCode.UNAVAILABLE, "connection refused")
    error = to_error("store chunks", [full, down])
    assert isinstance(error, StoreFull)
    assert str(error) == (
        "store chunks: node a (10.0.0.1:7400): resource_exhausted: store at /srv is full; "
        "node b (10.0.0.2:7400): unavailable: connection refused"
    )
    assert isinstance(to_error("read", [down]), StoreUnavailable)
    absent = NodeCallError(a, grpc.StatusCode.NOT_FOUND, "version 0a is not in repo 'r'")
    assert str(to_error("read", [absent, absent])) == "version 0a is not in repo 'r'"
    assert isinstance(to_error("read", [absent, down]), StoreUnavailable)


def test_nodes_refuse_a_version_record_that_readers_would_find_damaged(store):
    vid, data = test_stores.record("r", 1)
    for bad_id, bad_data, reason in [
        (vid, b"\xff\xff not a record", "it does not match its id"),
        (ids.record_id(b"\xff\xff"), b"\xff\xff", "it does not parse as a Version"),
        (vid, data[:-1], "it does not match its id"),
    ]:
        refused = f"refused: version record r@.* is unreadable: {reason}"
        with pytest.raises(InvalidInput, match=refused) as info:
            store.put_version("r", bad_id, bad_data)
        assert "\n" not in str(info.value)
    with pytest.raises(InvalidInput, match="other@.* is unreadable: it is a version of repo 'r'"):
        store.put_version("other", vid, data)
    assert store.list_repos() == []
    store.put_version("r", vid, data)  # the record itself is taken
    assert store.list_versions("r") == [(vid, data)]


def test_a_damaged_copy_of_a_version_record_is_read_from_another_owner(tmp_path):
    with LocalCluster(tmp_path / "c", nodes=3, replicas=2) as cluster:
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            pushed = repo.push(write(tmp_path / "m" / "w.bin", random_bytes(1000)), "m").version
        for owner in cluster.map.owners(repo_key("m")):
            cluster.stop(owner.id)  # this owner's copy is damaged (the other's is intact)
            with LmdbStore(cluster.node_data(owner.id), create=False) as shard:
                shard.delete_version("m", pushed.id)
                shard.put_version("m", pushed.id, b"\xff\xff not a record")
            cluster.start(owner.id)
            with Repository(ClusterStore.connect(cluster.url)) as repo:
                assert [v.id for v in repo.log("m")] == [pushed.id]
            cluster.stop(owner.id)  # intact again, for the next owner's turn
            with LmdbStore(cluster.node_data(owner.id), create=False) as shard:
                shard.delete_version("m", pushed.id)
                shard.put_version("m", pushed.id, repo_record(cluster, "m", pushed.id))
            cluster.start(owner.id)


def repo_record(cluster: LocalCluster, repo: str, version_id: bytes) -> bytes:
    """The intact record of a version, as the cluster's clients read it."""
    with ClusterStore.connect(cluster.url) as store:
        return dict(store.list_versions(repo))[version_id]


def test_nodes_refuse_a_chunk_that_does_not_match_its_id(store):
    wrong = ids.chunk_id(b"other bytes")
    with pytest.raises(InvalidInput, match="does not match its id") as info:
        store.put([(wrong, blob(b"weights" * 100))])
    assert "\n" not in str(info.value)
    assert list(store.scan()) == []


def test_read_into_consumes_on_several_stream_threads(store):
    raws = [random_bytes(20_000, seed=100 + i) for i in range(60)]
    pairs = [(ids.chunk_id(raw), blob(raw)) for raw in raws]
    store.put(pairs)
    wanted = [cid for cid, _ in pairs]
    got: dict[bytes, list[bytes]] = {}
    threads = set()

    def consume(cid: bytes, raw: bytes) -> None:
        threads.add(threading.get_ident())
        got.setdefault(cid, []).append(raw)

    store.read_into([*wanted, wanted[0]], consume)  # an id asked twice is consumed twice
    assert got == {cid: [raw] for cid, raw in zip(wanted, raws, strict=True)} | {
        wanted[0]: [raws[0], raws[0]]
    }
    assert threading.get_ident() not in threads
    assert len(threads) > 1  # one stream per node, each consuming what it receives


def test_an_error_in_consume_ends_read_into(store):
    raws = [random_bytes(20_000, seed=200 + i) for i in range(30)]
    pairs = [(ids.chunk_id(raw), blob(raw)) for raw in raws]
    store.put(pairs)
    calls = []

    def consume(cid: bytes, raw: bytes) -> None:
        calls.append(cid)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        store.read_into([cid for cid, _ in pairs], consume)
    assert 1 <= len(calls) <= 3  # each stream stops at its first failure


def test_a_push_puts_its_manifests_in_a_call_per_node_and_needs_their_quorum(tmp_path, monkeypatch):
    records = [test_stores.manifest(f"{i}") for i in range(200)]
    calls: list[str] = []
    real_meta = NodeClient.meta
    monkeypatch.setattr(
        NodeClient, "meta", property(lambda node: _Counting(real_meta.fget(node), node.id, calls))
    )
    with (
        LocalCluster(tmp_path / "c", nodes=3, replicas=3, write_quorum=2) as cluster,
        ClusterStore.connect(cluster.url) as store,
    ):
        store.put_manifests(records)
        assert sorted(calls) == ["PutManifests n1", "PutManifests n2", "PutManifests n3"]
        assert store.has_manifests([m for m, _ in records]) == {m for m, _ in records}

        calls.clear()
        assert store.get_manifests([m for m, _ in records]) == [d for _, d in records]
        assert sorted(calls) == ["GetManifests n1", "GetManifests n2", "GetManifests n3"]

        cluster.kill("n3")  # every manifest still reaches 2 of its 3 owners
        more = [test_stores.manifest(f"more {i}") for i in range(50)]
        store.put_manifests(more)
        everything = [*records, *more]  # n3's share is read from the other owners
        assert store.get_manifests([m for m, _ in everything]) == [d for _, d in everything]

        cluster.kill("n2")
        with pytest.raises(StoreUnavailable) as info:
            store.put_manifests([test_stores.manifest("late")])
        message = str(info.value)
        assert "n2" in message and "n3" in message and "write quorum is 2" in message


def test_nodes_without_the_batched_manifest_calls_get_them_one_by_one(cluster3, monkeypatch):
    """A client talking to nodes of an earlier release, which answer UNIMPLEMENTED."""
    real_meta = NodeClient.meta
    monkeypatch.setattr(NodeClient, "meta", property(lambda n: _Older(real_meta.fget(n))))
    records = [test_stores.manifest(f"older {i}") for i in range(40)]
    with ClusterStore.connect(cluster3.url) as store:
        store.put_manifests(records)
        assert store.get_manifests([m for m, _ in records]) == [d for _, d in records]
        store.delete_manifests([m for m, _ in records])


class _Unimplemented(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNIMPLEMENTED

    def details(self) -> str:
        return "Method not found!"


class _Older:
    """A node's metadata stub as a node of an earlier release answers: no batched calls."""

    def __init__(self, stub) -> None:
        self._stub = stub

    def __getattr__(self, name: str):
        if name in ("PutManifests", "GetManifests"):

            def unimplemented(*args, **kwargs):
                raise _Unimplemented()

            return unimplemented
        return getattr(self._stub, name)


class _Counting:
    """A node's metadata stub that records each call's method and node."""

    def __init__(self, stub, node_id: str, calls: list[str]) -> None:
        self._stub, self._node_id, self._calls = stub, node_id, calls

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)

        def call(*args, **kwargs):
            self._calls.append(f"{name} {self._node_id}")
            return method(*args, **kwargs)

        return call
