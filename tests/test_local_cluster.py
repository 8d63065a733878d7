"""Local clusters: ``cluster up/status/down`` as the CLI runs them, and the LocalCluster helper."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from cluster_checks import cli
from cluster_fixtures import LocalCluster

from chunkstore.cluster_map import load_cluster_file
from chunkstore.errors import InvalidInput
from chunkstore.server import local_cluster
from chunkstore.server.command import add_cluster_parser


def cluster_cli(capsys, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="chunkstore")
    add_cluster_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cluster", *argv])
    code = args.run(args)
    out, err = capsys.readouterr()
    return code, out, err


def node_gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def wait_stopped(d: Path, node_id: str, timeout: float = 10.0) -> None:
    """Wait until node ``node_id`` of the cluster in ``d`` no longer runs (reaping it)."""
    deadline = time.monotonic() + timeout
    while node_id in local_cluster.running_nodes(d) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node_id not in local_cluster.running_nodes(d), f"{node_id} still runs"


def test_up_status_down(tmp_path: Path, capsys):
    d = tmp_path / "cluster"
    code, out, err = cluster_cli(capsys, "up", "--nodes", "3", "--dir", str(d))
    pids = {}
    try:
        assert code == 0, err
        cluster = load_cluster_file(d / "cluster.toml")
        url = out.strip()
        assert url == "grpc://" + ",".join(n.address for n in cluster.nodes)
        assert url.count("127.0.0.1:") == 3
        pids = {n.id: int((d / f"{n.id}.pid").read_text()) for n in cluster.nodes}
        assert all(not node_gone(pid) for pid in pids.values())

        code, out, _ = cluster_cli(capsys, "status", "--dir", str(d), "--json")
        assert code == 0
        status = json.loads(out)
        assert status["epoch"] == 1
        assert [n["id"] for n in status["nodes"]] == ["n1", "n2", "n3"]
        assert all(n["healthy"] and n["chunks"] == 0 for n in status["nodes"])
        assert sum(n["share"] for n in status["nodes"]) == pytest.approx(1.0)

        code, out, _ = cluster_cli(capsys, "status", "--store", url)
        assert code == 0
        assert "3 of 3 nodes healthy" in out
        assert out.count("serving") == 3

        code, out, err = cluster_cli(capsys, "up", "--dir", str(d))
        assert code == 0 and out.strip() == url
        assert "nothing to start: n1, n2, n3 already run" in err
        assert {n.id: int((d / f"{n.id}.pid").read_text()) for n in cluster.nodes} == pids
    finally:
        code, out, _ = cluster_cli(capsys, "down", "--dir", str(d))
    assert code == 0
    assert out.strip() == "stopped n1, n2, n3"
    assert all(node_gone(pid) for pid in pids.values())
    assert list(d.glob("*.pid")) == []

    code, out, err = cluster_cli(capsys, "status", "--dir", str(d))
    assert code == 6  # no node reached at all: the store is unavailable
    assert "0 of 3 nodes healthy" in out
    assert out.count("unavailable") == 3
    assert err == (
        f"chunkstore cluster status: error: no node of {d} answers (n1, n2, n3: unavailable); "
        f"start them with: chunkstore cluster up --dir {d}\n"
    )


def test_status_of_a_local_cluster_none_of_whose_nodes_answers_exits_6(tmp_path: Path, capsys):
    d = tmp_path / "cluster"
    local_cluster.create(d, 2)  # nothing serves on its ports
    code, out, err = cluster_cli(capsys, "status", "--dir", str(d), "--json", "--timeout", "1")
    assert code == 6 and err.count("\n") == 1
    assert err.startswith(f"chunkstore cluster status: error: no node of {d} answers (n1, n2: ")
    status = json.loads(out)  # stdout holds the report alone
    assert status["state"] == "degraded" and not any(n["healthy"] for n in status["nodes"])


def test_up_again_restarts_the_same_cluster_with_its_data(tmp_path: Path):
    d = tmp_path / "cluster"
    url = local_cluster.cluster_up(d, nodes=2, replicas=2).url
    try:
        marker = d / "n1" / "data.mdb"
        assert marker.exists()
        assert sorted(local_cluster.running_nodes(d)) == ["n1", "n2"]
        local_cluster.cluster_down(d)
        assert local_cluster.running_nodes(d) == {}
        assert local_cluster.cluster_up(d).url == url
        assert sorted(local_cluster.running_nodes(d)) == ["n1", "n2"]
        status = local_cluster.cluster_status(load_cluster_file(d / "cluster.toml"))
        assert [n["healthy"] for n in status["nodes"]] == [True, True]
        with pytest.raises(InvalidInput, match=r"nodes 2 \(asked 3\)"):
            local_cluster.cluster_up(d, nodes=3)
    finally:
        local_cluster.cluster_down(d)


def test_up_starts_only_the_nodes_that_do_not_run(tmp_path: Path, capsys):
    d = tmp_path / "cluster"
    code, out, err = cluster_cli(capsys, "up", "--nodes", "3", "--dir", str(d))
    try:
        assert code == 0, err
        url = out.strip()
        pids = local_cluster.running_nodes(d)
        os.kill(pids["n1"], signal.SIGKILL)
        wait_stopped(d, "n1")
        code, out, err = cluster_cli(capsys, "up", "--dir", str(d), "--json")
        assert code == 0, err
        assert json.loads(out) == {
            "url": url,
            "dir": str(d.resolve()),
            "started": ["n1"],
            "running": ["n2", "n3"],
            "not_started": [],
        }
        assert "started n1 (n2, n3 already run)" in err
        again = local_cluster.running_nodes(d)
        assert again["n2"] == pids["n2"] and again["n3"] == pids["n3"]
        assert again["n1"] != pids["n1"]
        status = local_cluster.cluster_status(load_cluster_file(d / "cluster.toml"))
        assert all(n["healthy"] for n in status["nodes"])
    finally:
        code, out, err = cluster_cli(capsys, "down", "--dir", str(d), "--json")
    assert code == 0, err
    assert json.loads(out) == {"dir": str(d.resolve()), "stopped": ["n1", "n2", "n3"]}


def test_up_restarts_the_nodes_of_the_current_map_only(tmp_path: Path, capsys):
    d = tmp_path / "cluster"
    url = local_cluster.cluster_up(d, nodes=3, replicas=2).url
    try:
        code, _, err = cli(capsys, "cluster", "remove-node", "n3", "--store", url)
        assert code == 0, err
        served = local_cluster.current_map(d)
        assert served.epoch == 2 and [n.id for n in served.nodes] == ["n1", "n2"]
        local_cluster.cluster_down(d)  # n3 stopped with the others, as if done draining
        up = local_cluster.cluster_up(d)
        assert (up.started, up.running, up.removed) == (["n1", "n2"], [], ["n3"])
        assert sorted(local_cluster.running_nodes(d)) == ["n1", "n2"]
        assert up.url == local_cluster.store_url(served)
        code, _, err = cluster_cli(capsys, "up", "--dir", str(d))
        assert code == 0 and "not started: n3 (no longer in the cluster map)" in err
        code, out, err = cluster_cli(capsys, "up", "--dir", str(d), "--json")
        assert code == 0 and "not started: n3" in err  # notes stay on stderr
        report = json.loads(out)
        assert (report["started"], report["running"], report["not_started"]) == (
            [],
            ["n1", "n2"],
            ["n3"],
        )
        with pytest.raises(InvalidInput, match=r"nodes 2 \(asked 3\)"):
            local_cluster.cluster_up(d, nodes=3)
    finally:
        local_cluster.cluster_down(d)


@pytest.mark.parametrize("nodes", ["0", "-1"])
def test_up_needs_at_least_one_node(tmp_path: Path, capsys, nodes: str):
    d = tmp_path / "cluster"
    code, out, err = cluster_cli(capsys, "up", "--nodes", nodes, "--dir", str(d))
    assert code == 2 and out == ""
    assert f"a cluster needs at least 1 node (asked for {nodes})" in err
    assert not d.exists()


def test_up_and_down_json_errors_are_one_line_on_stderr(tmp_path: Path, capsys):
    code, out, err = cluster_cli(
        capsys, "up", "--nodes", "0", "--dir", str(tmp_path / "c"), "--json"
    )
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert err.startswith("chunkstore cluster up: error: a cluster needs at least 1 node")
    assert not (tmp_path / "c").exists()
    code, out, err = cluster_cli(capsys, "down", "--dir", str(tmp_path / "none"), "--json")
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert err.startswith("chunkstore cluster down: error: ") and "holds no cluster" in err
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("action", ["down", "status"])
@pytest.mark.parametrize("exists", [True, False])
def test_down_and_status_of_a_directory_without_a_cluster_exit_2_and_change_nothing(
    tmp_path: Path, capsys, action: str, exists: bool
):
    d = tmp_path / "not-a-cluster"
    if exists:
        d.mkdir()
        (d / "notes.txt").write_text("mine")
        (d / "n1.pid").write_text(f"{os.getpid()}\n")  # not a node: never signalled
    for json_flag in ([], ["--json"]):
        code, out, err = cluster_cli(capsys, action, "--dir", str(d), *json_flag)
        assert (code, out) == (2, "")
        assert err == (
            f"chunkstore cluster {action}: error: {d} holds no cluster (no cluster.toml): give "
            "the directory given to cluster up\n"
        )
    if exists:
        assert sorted(p.name for p in d.iterdir()) == ["n1.pid", "notes.txt"]
        assert (d / "notes.txt").read_text() == "mine"
    else:
        assert not d.exists()


def test_a_failed_first_start_leaves_nothing_behind(tmp_path: Path, capsys):
    bad_tokens = tmp_path / "tokens.toml"
    bad_tokens.write_text('[[tokens]]\ntoken = "abc"\nscope = "root"\n')
    d = tmp_path / "cluster"
    code, out, err = cluster_cli(capsys, "up", "--dir", str(d), "--tokens", str(bad_tokens))
    assert code == 2 and out == "" and "unknown scope 'root'" in err
    assert not d.exists()

    # Nodes that do not serve in time: stopped, and what was made for them removed; a
    # directory that was there before stays, with what it held.
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    code, _, err = cluster_cli(capsys, "up", "--dir", str(d), "--timeout", "0.001")
    assert code == 6 and err.startswith("chunkstore cluster up: error: node n1 did not start: ")
    assert "it did not answer SERVING on 127.0.0.1:" in err and "stopped again: n2, n3" in err
    assert f"nothing of the new cluster was left in {d}" in err
    assert [p.name for p in d.iterdir()] == ["notes.txt"]
    code, _, err = cluster_cli(capsys, "up", "--dir", str(tmp_path / "new"), "--timeout", "0.001")
    assert code == 6 and not (tmp_path / "new").exists()

    # A retry starts a new cluster, without the options of the failed one.
    code, out, err = cluster_cli(capsys, "up", "--dir", str(d), "--nodes", "1")
    try:
        assert code == 0, err
        assert local_cluster.node_args(d) == []
    finally:
        local_cluster.cluster_down(d)


def test_up_with_a_failing_node_stops_the_others_and_shows_its_log(tmp_path: Path):
    d = tmp_path / "cluster"
    local_cluster.create(d, 3)
    (d / "n2").mkdir()
    (d / "n2" / "stray-file").write_text("not a store")
    with pytest.raises(local_cluster.NodeDidNotStart) as err:
        local_cluster.cluster_up(d, timeout=30)
    assert str(err.value) == (  # the error line n2 wrote in its log
        f"node n2 did not start: cannot open store at {d / 'n2'}: the directory is not empty "
        "and holds no store (it exited with code 6); stopped again: n1, n3"
    )
    assert list(d.glob("*.pid")) == [] and node_processes(d) == []
    assert local_cluster.cluster_down(d) == []


def node_processes(d: Path) -> list[int]:
    """The pids of the node processes that run with their data in ``d``."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if local_cluster.NODE_MODULE.encode() in args and str(d).encode() in b" ".join(args):
            pids.append(int(cmdline.parent.name))
    return pids


def held_port(port: int = 0) -> socket.socket:
    """A listening socket on loopback ``port`` (0: any): no node can bind it while it is open."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the port a node just closed
    s.bind((local_cluster.HOST, port))
    s.listen()
    return s


def test_up_where_a_node_cannot_listen_exits_6_and_leaves_nothing_running(
    tmp_path: Path, capsys, monkeypatch
):
    with held_port() as taken:
        port = taken.getsockname()[1]
        # A new cluster whose n2 gets a port in use.
        real_free_ports = local_cluster.free_ports

        def free_ports(count: int, host: str = local_cluster.HOST) -> list[int]:
            return [real_free_ports(1)[0], port, *real_free_ports(count - 2)]

        monkeypatch.setattr(local_cluster, "free_ports", free_ports)
        d = tmp_path / "new"
        for json_flag in ([], ["--json"]):
            code, out, err = cluster_cli(capsys, "up", "--dir", str(d), *json_flag)
            assert (code, out) == (6, "") and err.count("\n") == 1
            assert err == (
                "chunkstore cluster up: error: node n2 did not start: cannot listen on "
                f"127.0.0.1:{port}: address already in use (it exited with code 1); stopped "
                f"again: n1, n3; nothing of the new cluster was left in {d}\n"
            )
            assert not d.exists() and node_processes(d) == []
    monkeypatch.undo()

    # An existing cluster, stopped, whose n1 finds its port taken on restart: n2 is stopped
    # again, and the cluster stays as it was.
    d = tmp_path / "old"
    url = local_cluster.cluster_up(d, nodes=2, replicas=2).url
    local_cluster.cluster_down(d)
    port = int(load_cluster_file(d / "cluster.toml").node("n1").address.rsplit(":", 1)[1])
    before = sorted(p.name for p in d.iterdir())
    with held_port(port):
        code, out, err = cluster_cli(capsys, "up", "--dir", str(d), "--json")
    assert (code, out) == (6, "") and err == (
        "chunkstore cluster up: error: node n1 did not start: cannot listen on "
        f"127.0.0.1:{port}: address already in use (it exited with code 1); stopped again: n2\n"
    )
    assert sorted(p.name for p in d.iterdir()) == before
    assert local_cluster.running_nodes(d) == {} and node_processes(d) == []
    # Once the port is free, the same cluster starts.
    assert local_cluster.cluster_up(d).url == url
    local_cluster.cluster_down(d)


def test_a_first_start_refuses_a_directory_holding_what_the_cluster_would_write(
    tmp_path: Path, capsys
):
    d = tmp_path / "work"
    (d / "n2").mkdir(parents=True)
    (d / "n2" / "notes.txt").write_text("mine")
    (d / "n3.log").write_text("my log")
    code, out, err = cluster_cli(capsys, "up", "--dir", str(d), "--json")
    assert (code, out) == (2, "")
    assert err == (
        f"chunkstore cluster up: error: {d} holds n2, n3.log, which a new cluster would use: "
        "move it away or use another directory\n"
    )
    assert sorted(p.name for p in d.iterdir()) == ["n2", "n3.log"]
    assert (d / "n2" / "notes.txt").read_text() == "mine" and node_processes(d) == []


def test_operator_commands_name_the_seeds_they_cannot_reach_and_exit_6(capsys):
    port = local_cluster.free_ports(1)[0]
    url = f"grpc://127.0.0.1:{port}"
    for argv in (
        ["status"],
        ["repair"],
        ["remove-node", "n2"],
        ["add-node", "n4", "127.0.0.1:1", "--force"],
    ):
        code, out, err = cluster_cli(capsys, *argv, "--store", url, "--json")
        assert (code, out) == (6, "") and err.count("\n") == 1
        assert err.startswith(
            f"chunkstore cluster {argv[0]}: error: no node of {url} serves a cluster map: "
            f"127.0.0.1:{port}: unavailable: "
        )


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["n4", "nonsense"], "node 'n4': bad address 'nonsense': want HOST:PORT, port 1-65535"),
        (["n4", "127.0.0.1:7404", "--weight", "0"], "node 'n4': weight must be a number > 0"),
        (["n 4", "127.0.0.1:7404"], "bad node id 'n 4': use only letters, digits"),
    ],
)
def test_add_node_refuses_bad_input_before_asking_any_node(capsys, argv, reason):
    url = f"grpc://127.0.0.1:{local_cluster.free_ports(1)[0]}"  # nothing serves there
    code, out, err = cluster_cli(capsys, "add-node", *argv, "--store", url, "--json")
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert err.startswith(f"chunkstore cluster add-node: error: cannot add a node: {reason}")


@pytest.mark.parametrize("action", ["status", "repair", "remove-node n2"])
@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "soon"])
def test_a_timeout_must_be_positive(capsys, action, timeout):
    with pytest.raises(SystemExit) as exit_:
        cluster_cli(capsys, *action.split(), "--store", "grpc://127.0.0.1:1", "--timeout", timeout)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"chunkstore cluster {action.split()[0]}: error: argument --timeout: want a number of "
        f"seconds > 0, got {timeout!r}"
    )


@pytest.mark.parametrize("timeout", ["0", "-1", "nan"])
def test_up_refuses_a_timeout_that_is_not_above_0_before_it_starts_anything(
    capsys, tmp_path: Path, timeout
):
    d = tmp_path / "cluster"
    try:
        with pytest.raises(SystemExit) as exit_:
            cluster_cli(capsys, "up", "--dir", str(d), "--nodes", "1", "--timeout", timeout)
    finally:  # had it started a node, stop it
        if (d / local_cluster.MAP_FILE).exists():
            local_cluster.cluster_down(d)
    assert exit_.value.code == 2 and not d.exists()
    assert capsys.readouterr().err.splitlines()[-1] == (
        "chunkstore cluster up: error: argument --timeout: want a number of seconds > 0, got "
        f"{timeout!r}"
    )


@pytest.mark.parametrize("timeout", ["-1", "nan"])
def test_down_refuses_a_timeout_below_0(capsys, tmp_path: Path, timeout):
    with pytest.raises(SystemExit) as exit_:
        cluster_cli(capsys, "down", "--dir", str(tmp_path), "--timeout", timeout)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "chunkstore cluster down: error: argument --timeout: want a number of seconds >= 0, got "
        f"{timeout!r}"
    )


def test_up_on_a_file_says_it_is_not_a_directory(capsys, tmp_path: Path):
    path = tmp_path / "a-file"
    path.write_text("not a cluster")
    code, out, err = cluster_cli(capsys, "up", "--dir", str(path), "--nodes", "1")
    assert (code, out) == (2, "")
    assert err == f"chunkstore cluster up: error: {path} is not a directory\n"
    assert path.read_text() == "not a cluster"


def test_cluster_commands_say_how_to_name_a_cluster(capsys, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("CHUNKSTORE_STORE", raising=False)
    code, out, err = cluster_cli(capsys, "status", "--json")
    assert (code, out) == (2, "") and err == (
        "chunkstore cluster status: error: no cluster given: pass --store "
        "grpc://HOST:PORT[,...] or --dir DIR, or set $CHUNKSTORE_STORE\n"
    )
    code, _, err = cluster_cli(capsys, "repair")
    assert code == 2 and err.endswith(
        "no cluster given: pass --store grpc://HOST:PORT[,...] or set $CHUNKSTORE_STORE\n"
    )
    monkeypatch.setenv("CHUNKSTORE_STORE", str(tmp_path / "embedded"))
    code, _, err = cluster_cli(capsys, "remove-node", "n2")
    assert code == 2 and err == (
        f"chunkstore cluster remove-node: error: $CHUNKSTORE_STORE ('{tmp_path / 'embedded'}') "
        "is not a cluster: give --store grpc://HOST:PORT[,...]\n"
    )
    assert not (tmp_path / "embedded").exists()


def test_status_needs_a_cluster_url(capsys, tmp_path: Path):
    code, _, err = cluster_cli(capsys, "status", "--store", str(tmp_path / "embedded"))
    assert code == 2
    assert "is not a cluster" in err
    for url in ("grpc://127.0.0.1:abc", "grpc://127.0.0.1:1,", "grpcs://:7400"):
        code, _, err = cluster_cli(capsys, "status", "--store", url)
        assert code == 2, err
        assert "invalid cluster URL" in err and len(err.strip().splitlines()) == 1


def test_local_cluster_kill_stop_start(tmp_path: Path):
    with LocalCluster(tmp_path, nodes=2, replicas=1) as cluster:
        assert cluster.url == local_cluster.store_url(cluster.map)
        cluster.kill("n1")
        status = local_cluster.cluster_status([cluster.address("n2")])
        assert [n["healthy"] for n in status["nodes"]] == [False, True]
        cluster.start("n1")
        assert cluster.stop("n2") == 0
        status = local_cluster.cluster_status(cluster.map)
        assert [n["healthy"] for n in status["nodes"]] == [True, False]
        assert cluster.node_data("n1") == tmp_path / "n1"
        cluster.start("n2")
        processes = [cluster.process(n) for n in ("n1", "n2")]
    assert all(p.poll() is not None for p in processes)


def test_local_cluster_stops_every_node_when_the_block_fails(tmp_path: Path):
    with pytest.raises(RuntimeError, match="test failed"), LocalCluster(tmp_path, nodes=1) as c:
        process = c.process("n1")
        raise RuntimeError("test failed")
    assert process.poll() is not None
