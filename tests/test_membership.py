"""Membership changes on real node processes: a node joins and is added while data is stored
and read, a node is removed and drained, maps survive restarts, ``cluster status`` reports it.

Nodes run with quick background work (``cluster_checks.FAST``); every process is stopped at the
end of its test.
"""

from __future__ import annotations

import filecmp
import json
import threading
import time
from pathlib import Path

import pytest
from cluster_checks import (
    FAST,
    cli,
    node_status,
    placement_gaps,
    served_map,
    status,
    wait_settled,
    wait_until,
)
from cluster_fixtures import LocalCluster, free_port

from chunkstore.client.cluster_store import ClusterStore
from chunkstore.repository import Repository
from chunkstore.synthetic import make_series

# Slow enough that reads and writes overlap the move, fast enough for a short test.
THROTTLED = [*FAST, "--repair-rate", "2M"]


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    """Four bf16 checkpoints of 8 MB, each rewriting ~10% of the last."""
    return make_series(tmp_path_factory.mktemp("series"), versions=4, size_mb=8)


def pull_identical(repo: Repository, path: Path, dest: Path, name: str = "m") -> None:
    out = dest / path.name
    repo.pull(f"{name}@{path.name}", out, force=True)
    for original in path.iterdir():
        assert filecmp.cmp(original, out / original.name, shallow=False), original


class Reader(threading.Thread):
    """Pulls the given versions over and over through one client until stopped; keeps the
    first error and counts the rounds that read every version back byte-identical."""

    def __init__(self, url: str, versions: list[Path], dest: Path) -> None:
        super().__init__(daemon=True)
        self.store = ClusterStore.connect(url)
        self.versions, self.dest = versions, dest
        self.rounds = 0
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            with Repository(self.store) as repo:
                while not self.halt.is_set():
                    for path in self.versions:
                        pull_identical(repo, path, self.dest)
                    self.rounds += 1
        except BaseException as e:  # reported by the test
            self.error = e

    def finish(self) -> int:
        self.halt.set()
        self.join(60)
        if self.error is not None:
            raise self.error
        return self.rounds


def test_a_joined_node_owns_nothing_until_added_then_takes_its_share(tmp_path, series, capsys):
    with LocalCluster(tmp_path / "c", nodes=3, replicas=2, node_args=THROTTLED) as cluster:
        addresses = {n.id: n.address for n in cluster.map.nodes}
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            for path in series[:3]:
                repo.push(path, "m", message=path.name, tags=[path.name])
        before = wait_settled(addresses.values(), 1)
        total = sum(n["chunks"] for n in before["nodes"])

        # A node started with --join fetches the map, serves, and owns nothing.
        addresses["n4"] = cluster.join("n4")
        assert served_map(addresses["n4"]) == cluster.map
        time.sleep(2.5)  # two reconciler intervals: nothing comes its way
        joined = node_status(addresses["n4"])
        assert (joined.in_map, joined.epoch, joined.chunks) == (False, 1, 0)
        seeds = cluster.url.removeprefix("grpc://").split(",")
        assert [n["id"] for n in status(seeds)["nodes"]] == ["n1", "n2", "n3"]

        # Reads through a client made before the change go on during the move, and so does a push.
        reader = Reader(cluster.url, series[:3], tmp_path / "reads")
        reader.start()
        wait_until(lambda: reader.rounds >= 1 or reader.error, 60, "a first read round")
        code, out, err = cli(
            capsys, "cluster", "add-node", "n4", addresses["n4"], "--store", cluster.url
        )
        assert code == 0, err
        assert "epoch 2" in out and "4 of 4 nodes" in out
        moving = status(addresses.values())
        assert moving["epoch"] == 2 and len(moving["nodes"]) == 4
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            repo.push(series[3], "m", message=series[3].name, tags=[series[3].name])
        rounds_at_push = reader.rounds
        settled = wait_settled(addresses.values(), 2)
        wait_until(lambda: reader.rounds > rounds_at_push or reader.error, 60, "a later read")
        assert reader.finish() >= 2

        # Everything reads back byte-identical, from a new client and from the old one.
        with Repository(ClusterStore.connect(f"grpc://{addresses['n4']}")) as repo:
            assert repo.store.cluster.epoch == 2
            for path in series:
                pull_identical(repo, path, tmp_path / "after")
            gaps = placement_gaps(repo.store.cluster, addresses, repo, "m", exact=True)
            assert gaps == []

        # The new node holds about a quarter of the chunks, and about that much moved.
        after_total = sum(n["chunks"] for n in settled["nodes"])
        n4 = next(n for n in settled["nodes"] if n["id"] == "n4")
        assert 0.15 < n4["chunks"] / after_total < 0.35
        copied = sum(n["chunks_copied"] for n in settled["nodes"])
        moved = copied / total
        print(f"\njoin of a 4th node: moved {copied} of {total} chunk copies = {moved:.3f}")
        assert 0.15 < moved < 0.35


def test_a_removed_node_is_drained_then_can_stop(tmp_path, series, capsys):
    with LocalCluster(tmp_path / "c", nodes=4, replicas=2, node_args=FAST) as cluster:
        addresses = {n.id: n.address for n in cluster.map.nodes}
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            for path in series[:2]:
                repo.push(path, "m", message=path.name, tags=[path.name])
        held_before = node_status(addresses["n2"]).chunks
        assert held_before > 0

        code, out, err = cli(capsys, "cluster", "remove-node", "n2", "--store", cluster.url)
        assert code == 0, err
        assert "epoch 2 (n1, n3, n4)" in out
        rest = {k: v for k, v in addresses.items() if k != "n2"}
        # Status shows n2 leaving until it has handed everything over: it owns nothing now
        # and drops each chunk once every owner holds it.
        settled = wait_settled(rest.values(), 2)
        assert [(d["id"], d["chunks"]) for d in settled["departed"]] == [("n2", 0)]
        # in the same form as the nodes of the map, with no share of the ring
        assert set(settled["departed"][0]) == set(settled["nodes"][0])
        assert settled["departed"][0]["share"] == 0.0
        assert node_status(addresses["n2"]).in_map is False
        code, out, _ = cli(capsys, "cluster", "status", "--store", cluster.url)
        assert code == 0 and "drained: may stop" in out and "in sync" in out.splitlines()[0]
        assert cluster.stop("n2") == 0
        assert status(rest.values())["departed"] == []

        with Repository(ClusterStore.connect(cluster.url)) as repo:  # n2 listed first, dead
            assert [n.id for n in repo.store.cluster.nodes] == ["n1", "n3", "n4"]
            for path in series[:2]:
                pull_identical(repo, path, tmp_path / "out")
            assert placement_gaps(repo.store.cluster, rest, repo, "m", exact=True) == []
            assert repo.verify().ok

        code, _, err = cli(capsys, "cluster", "remove-node", "n9", "--store", cluster.url)
        assert code == 2 and "no node 'n9'" in err and err.count("\n") == 1
        code, _, err = cli(capsys, "cluster", "remove-node", "n1", "--store", cluster.url)
        assert code == 0, err  # 2 nodes left, replicas 2
        code, _, err = cli(capsys, "cluster", "remove-node", "n3", "--store", cluster.url)
        assert code == 2 and err == (
            "chunkstore cluster remove-node: error: cannot remove node 'n3': a map needs at "
            "least as many nodes as replicas (2), and 1 would be left\n"
        )


def test_maps_survive_restarts_and_spread_between_nodes(tmp_path, capsys):
    with LocalCluster(tmp_path / "c", nodes=3, replicas=2, node_args=FAST) as cluster:
        n4 = cluster.join("n4")
        code, _, err = cli(capsys, "cluster", "add-node", "n4", n4, "--store", cluster.url)
        assert code == 0, err
        epoch2 = served_map(cluster.address("n1"))
        assert epoch2.epoch == 2 and [n.id for n in epoch2.nodes] == ["n1", "n2", "n3", "n4"]
        assert (cluster.node_data("n1") / "cluster-map.toml").exists()

        # Restarted with its original cluster file (epoch 1), n1 keeps the newer map it stored.
        cluster.stop("n1")
        cluster.start("n1")
        assert served_map(cluster.address("n1")) == epoch2

        # A node that does not serve is refused unless --force, and nothing changes.
        dead = f"127.0.0.1:{free_port()}"
        code, out, err = cli(capsys, "cluster", "add-node", "n5", dead, "--store", cluster.url)
        assert code == 6 and out == ""
        assert f"cannot add n5: no node serves at {dead}" in err and "--force" in err
        assert len(err.strip().splitlines()) == 1
        assert served_map(cluster.address("n1")).epoch == 2

        # A change made while n3 is down reaches it from its peers once it is back.
        cluster.stop("n3")
        code, out, err = cli(
            capsys, "cluster", "add-node", "n5", dead, "--weight", "0.5", "--force",
            "--store", cluster.url, "--json",
        )  # fmt: skip
        assert code == 0, err
        # warnings stay on stderr, named as the command's errors are
        assert "chunkstore cluster add-node: warning: node n3 did not take the map (" in err
        added = json.loads(out)
        assert (added["added"], added["epoch"]) == ("n5", 3)
        assert added["nodes"] == ["n1", "n2", "n3", "n4", "n5"]
        assert added["accepted"] == ["n1", "n2", "n4"] and list(added["failed"]) == ["n3", "n5"]
        cluster.start("n3")
        learned = wait_until(
            lambda: served_map(cluster.address("n3")).epoch == 3, 15, "n3 to learn epoch 3"
        )
        assert learned
        assert served_map(cluster.address("n3")) == served_map(cluster.address("n2"))
        assert "cluster map epoch 2 -> 3 from node n" in cluster.log("n3")  # from a peer

        # A joined node, restarted, keeps the newest map too.
        cluster.stop("n4")
        cluster.start("n4")
        assert served_map(n4).epoch == 3

        # Adding a node twice, or at an address in use, changes nothing.
        code, _, err = cli(capsys, "cluster", "add-node", "n4", n4, "--store", cluster.url)
        assert code == 2 and "already in the map" in err
        code, _, err = cli(
            capsys, "cluster", "add-node", "n6", cluster.address("n2"), "--store", cluster.url
        )
        assert code == 2 and "same address" in err
        assert served_map(cluster.address("n1")).epoch == 3


def test_cluster_status_json(tmp_path, capsys):
    cluster = LocalCluster(tmp_path / "c", nodes=3, replicas=3, write_quorum=2, node_args=FAST)
    with cluster:
        addresses = [n.address for n in cluster.map.nodes]
        wait_settled(addresses, 1)
        code, out, err = cli(capsys, "cluster", "status", "--json", "--store", cluster.url)
        assert code == 0, err
        report = json.loads(out)
        assert {"epoch", "rebalancing", "nodes"} <= set(report)
        assert report["epoch"] == 1 and report["rebalancing"] is False
        for node in report["nodes"]:
            assert {"id", "address", "healthy", "chunks", "bytes"} <= set(node)
            assert node["healthy"] is True and node["chunks"] == 0 and node["bytes"] == 0
        assert [n["id"] for n in report["nodes"]] == ["n1", "n2", "n3"]

        # The text form says whether data is moving, per node and in all.
        code, out, _ = cli(capsys, "cluster", "status", "--store", cluster.url)
        assert code == 0 and "in sync" in out.splitlines()[0]
        assert "STATE" in out

        # With a node down, writes miss a replica: the cluster is not in sync.
        cluster.kill("n3")
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            (tmp_path / "w").mkdir()
            (tmp_path / "w" / "x.bin").write_bytes(b"x" * 300_000)
            repo.push(tmp_path / "w", "small")
        code, out, _ = cli(capsys, "cluster", "repair", "--store", cluster.url, "--json")
        assert code == 1
        repaired = json.loads(out)
        down = [n for n in repaired["nodes"] if not n["ok"]]
        assert [n["id"] for n in down] == ["n3"]
        # in the same form as the nodes that answered, without counts
        assert set(down[0]) == set(repaired["nodes"][0])
        assert down[0]["chunks_copied"] is None and down[0]["peers_refused"] == []
        assert down[0]["error"].startswith("unavailable: ")
        assert sum(n["under_replicated"] for n in repaired["nodes"] if n["ok"]) > 0
        code, out, _ = cli(capsys, "cluster", "status", "--json", "--store", cluster.url)
        report = json.loads(out)
        assert code == 1  # a node is unhealthy
        assert report["rebalancing"] is True
        assert [n["healthy"] for n in report["nodes"]] == [True, True, False]

        cluster.start("n3")
        code, out, err = cli(capsys, "cluster", "repair", "--store", cluster.url)
        assert code == 0, out + err
        report = json.loads(cli(capsys, "cluster", "status", "--json", "--store", cluster.url)[1])
        assert report["rebalancing"] is False


def test_a_node_without_a_map_or_address_exits_with_one_line(tmp_path, capsys):
    from chunkstore.server.node import main as node_main

    assert node_main(["--id", "n1", "--data", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert (
        err == "chunkstore node: error: no cluster map: give --cluster FILE or --join grpc://SEED\n"
    )

    dead = f"grpc://127.0.0.1:{free_port()}"
    argv = ["--id", "n1", "--data", str(tmp_path / "b"), "--listen", "127.0.0.1:0", "--join", dead]
    assert node_main(argv) == 6
    err = capsys.readouterr().err
    assert err.startswith(
        f"chunkstore node: error: cannot fetch the cluster map from {dead}: "
        f"{dead.removeprefix('grpc://')}: unavailable: "
    )
    assert err.count("\n") == 1
