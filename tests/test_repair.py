"""Repair (anti-entropy) on real node processes: a node replaced empty gets every chunk,
manifest, version record and tag it owns back; a write that missed an owner is completed; the
reconciler's metrics count what it found and did.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import grpc
import pytest
from cluster_checks import (
    FAST,
    cli,
    metric,
    node_status,
    placement_gaps,
    wait_settled,
    wait_until,
    wipe,
)
from cluster_fixtures import LocalCluster
from test_stores import large_manifest

from chunkstore.client import manifest_parts
from chunkstore.client.cluster_store import ClusterStore
from chunkstore.repository import Repository
from chunkstore.synthetic import make_series
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc

#: No periodic passes within a test: only the start-up pass and `cluster repair`.
ON_DEMAND = ["--reconcile-interval", "3600", "--map-refresh", "0.5"]


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    return make_series(tmp_path_factory.mktemp("series"), versions=3, size_mb=6)


def push(repo: Repository, paths: list[Path], name: str = "m") -> None:
    for path in paths:
        repo.push(path, name, message=path.name, tags=[path.name])


def pulls_identical(repo: Repository, paths: list[Path], dest: Path, name: str = "m") -> None:
    for path in paths:
        repo.pull(f"{name}@{path.name}", dest / path.name, force=True)
        for original in path.iterdir():
            assert filecmp.cmp(original, dest / path.name / original.name, shallow=False)


def test_a_node_replaced_empty_gets_everything_back_on_repair(tmp_path, series, capsys):
    cluster = LocalCluster(tmp_path / "c", nodes=4, replicas=3, write_quorum=2, node_args=ON_DEMAND)
    with cluster:
        addresses = {n.id: n.address for n in cluster.map.nodes}
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            push(repo, series)
            repo.tag(f"m@{series[0].name}", "best")
            assert placement_gaps(cluster.map, addresses, repo, "m", exact=True) == []
            # a manifest too large for one message (a file of ~60 GB), that n2 owns
            big_id, big = next(
                (mid, data)
                for mid, data in (large_manifest(f"big {i}", 36 << 20) for i in range(64))
                if "n2" in {n.id for n in cluster.map.owners(mid)}
            )
            repo.store.put_manifest(big_id, big)
        held = node_status(addresses["n2"]).chunks
        assert held > 0
        wait_settled(list(addresses.values()), 1)
        code, out, _ = cli(capsys, "cluster", "status", "--store", cluster.url)
        assert code == 0 and out.splitlines()[0].endswith("in sync")

        cluster.stop("n2")
        # No pass has run since, but a node that does not serve is never "in sync".
        code, out, _ = cli(capsys, "cluster", "status", "--store", cluster.url)
        assert code == 1
        assert "3 of 4 nodes healthy" in out and out.splitlines()[0].endswith("degraded")
        wipe(cluster.node_data("n2"))
        cluster.start("n2")  # empty, and with its original cluster file
        assert node_status(addresses["n2"]).chunks == 0
        wait_until(lambda: node_status(addresses["n2"]).passes, 30, "n2's start-up pass")
        # Its peers' last passes compared keys with the n2 that was there before.
        code, out, _ = cli(capsys, "cluster", "status", "--store", cluster.url, "--json")
        assert code == 0
        report = json.loads(out)
        assert report["state"] == "not yet checked"
        assert [n["checked"] for n in report["nodes"]] == [True, False, True, True]
        code, out, _ = cli(capsys, "cluster", "status", "--store", cluster.url)
        assert out.splitlines()[0].endswith("not yet checked")
        assert [line.split()[0] for line in out.splitlines() if "not yet checked" in line] == [
            "cluster",
            "n2",
        ]

        code, out, err = cli(capsys, "cluster", "repair", "--store", cluster.url, "--json")
        assert code == 0, out + err
        report = json.loads(out)
        assert report["epoch"] == 1
        by_node = {n["id"]: n for n in report["nodes"]}
        assert all(n["ok"] and n["complete"] for n in by_node.values())
        assert sum(n["chunks_copied"] for n in by_node.values()) == held  # each copied once
        assert sum(n["records_copied"] for n in by_node.values()) > 0
        assert sum(n["under_replicated_found"] for n in by_node.values()) >= held
        assert all(n["under_replicated"] == 0 and n["misplaced"] == 0 for n in by_node.values())
        assert node_status(addresses["n2"]).chunks == held
        report = json.loads(cli(capsys, "cluster", "status", "--store", cluster.url, "--json")[1])
        assert report["state"] == "in sync" and all(n["checked"] for n in report["nodes"])
        with grpc.insecure_channel(addresses["n2"]) as channel:  # copied to n2, in pieces
            parts = pb_grpc.MetaServiceStub(channel).GetManifestParts(
                pb.ChunkIds(ids=[big_id]), timeout=30
            )
            assert manifest_parts.joined(parts) == (big_id, big)

        with Repository(ClusterStore.connect(cluster.url)) as repo:
            assert placement_gaps(cluster.map, addresses, repo, "m", exact=True) == []
            assert repo.store.tags("m")["best"] == repo.resolve(f"m@{series[0].name}").id
            # Everything n2 owns reads back from n2 alone.
            cluster.kill("n1")
            cluster.kill("n3")
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            pulls_identical(repo, series, tmp_path / "out")

        code, out, _ = cli(capsys, "cluster", "repair", "--store", cluster.url)
        assert code == 1
        failed = [line.split(":")[0] for line in out.splitlines() if ": failed: " in line]
        assert failed == ["n1", "n3"]
        # --json names them as add-node and remove-node do: {node id: why}
        code, out, _ = cli(capsys, "cluster", "repair", "--store", cluster.url, "--json")
        report = json.loads(out)
        assert code == 1 and list(report["failed"]) == ["n1", "n3"]
        assert all(why.startswith("unavailable: ") for why in report["failed"].values())
        assert {n["id"]: n["error"] for n in report["nodes"] if not n["ok"]} == report["failed"]


def test_a_write_that_missed_an_owner_is_completed_by_the_periodic_pass(tmp_path, series):
    cluster = LocalCluster(tmp_path / "c", nodes=3, replicas=3, write_quorum=2, node_args=FAST)
    with cluster:
        addresses = {n.id: n.address for n in cluster.map.nodes}
        cluster.kill("n3")
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            push(repo, series[:2])  # acknowledged by n1 and n2: the write quorum
        cluster.start("n3")
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            wait_until(
                lambda: placement_gaps(cluster.map, addresses, repo, "m", exact=True) == [],
                30,
                "n3 to get what it missed",
            )
        wait_settled(addresses.values(), 1)
        n3_chunks = node_status(addresses["n3"]).chunks
        found = sum(
            metric(cluster.metrics_url(n), "chunkstore_reconcile_under_replicated_found_total")
            for n in addresses
        )
        copied = sum(
            metric(cluster.metrics_url(n), "chunkstore_reconcile_chunks_copied_total")
            for n in addresses
        )
        assert copied == n3_chunks > 0
        assert found >= n3_chunks
        for n in addresses:
            assert metric(cluster.metrics_url(n), "chunkstore_chunks_under_replicated") == 0
            assert metric(cluster.metrics_url(n), "chunkstore_cluster_epoch") == 1
            assert metric(cluster.metrics_url(n), "chunkstore_reconcile_passes_total",
                          result="complete") >= 1  # fmt: skip


def test_an_owner_down_shows_in_the_under_replicated_gauge(tmp_path, series):
    cluster = LocalCluster(tmp_path / "c", nodes=3, replicas=3, write_quorum=2, node_args=FAST)
    with cluster:
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            push(repo, series[:1])
        cluster.kill("n2")

        def gauge() -> float:
            return sum(
                metric(cluster.metrics_url(n), "chunkstore_chunks_under_replicated")
                for n in ("n1", "n3")
            )

        every = node_status(cluster.address("n1")).chunks
        # Every chunk lacks a copy: the node that answers for it counts it (once in all).
        wait_until(lambda: gauge() == every, 20, "the under-replicated gauge to count them")
        cluster.start("n2")
        wait_until(lambda: gauge() == 0, 20, "the gauge to fall back to 0")


def test_a_pass_cut_short_by_a_crash_resumes_where_it_stopped(tmp_path, series):
    slow = [*FAST, "--repair-rate", "1M"]
    cluster = LocalCluster(tmp_path / "c", nodes=3, replicas=3, write_quorum=2, node_args=slow)
    with cluster:
        addresses = {n.id: n.address for n in cluster.map.nodes}
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            push(repo, series)
        cluster.stop("n3")
        wipe(cluster.node_data("n3"))
        cluster.start("n3")
        url = cluster.metrics_url("n1")

        def halfway() -> bool:  # n1 copies to n3, and is past the first half of the key space
            return (
                metric(url, "chunkstore_reconcile_chunks_copied_total") > 0
                and 0.4 < metric(url, "chunkstore_reconcile_pass_progress") < 0.9
            )

        wait_until(halfway, 30, "n1 to be halfway through copying", every=0.05)
        cluster.kill("n1")
        cluster.start("n1")
        resumed = "resuming the pass under epoch 1 at 50% of the key space"
        wait_until(lambda: resumed in cluster.log("n1"), 10, "n1 to resume its pass")
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            wait_until(
                lambda: placement_gaps(cluster.map, addresses, repo, "m", exact=True) == [],
                60,
                "n3 to get everything back",
            )
