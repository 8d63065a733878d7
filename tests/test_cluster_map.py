"""The cluster map: parsing and validating cluster files, transport, placement."""

import os
from pathlib import Path

import pytest

from chunkstore.cluster_map import (
    ClusterFileError,
    ClusterMap,
    ClusterMapError,
    NodeSpec,
    load_cluster_file,
)
from chunkstore.errors import InvalidInput
from chunkstore.ring import HashRing

THREE_NODES = """
[[nodes]]
id = "a"
address = "10.0.0.1:7400"

[[nodes]]
id = "b"
address = "10.0.0.2:7400"

[[nodes]]
id = "c"
address = "10.0.0.3:7400"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def node(i: int, extra: str = "") -> str:
    return f'[[nodes]]\nid = "n{i}"\naddress = "host{i}:7400"\n{extra}\n'


def test_happy_path_with_defaults(tmp_path):
    cmap = load_cluster_file(write(tmp_path, THREE_NODES))
    assert cmap == ClusterMap(
        epoch=1,
        replicas=3,
        write_quorum=2,
        nodes=(
            NodeSpec("a", "10.0.0.1:7400"),
            NodeSpec("b", "10.0.0.2:7400"),
            NodeSpec("c", "10.0.0.3:7400"),
        ),
    )
    assert cmap.node("b").address == "10.0.0.2:7400"
    with pytest.raises(KeyError):
        cmap.node("z")


def test_happy_path_explicit(tmp_path):
    text = "epoch = 7\nreplicas = 2\nwrite_quorum = 1\n" + node(1, "weight = 2.5") + node(2)
    text += '[[nodes]]\nid = "v6"\naddress = "[fd00::1]:65535"\n'
    cmap = load_cluster_file(write(tmp_path, text))
    assert (cmap.epoch, cmap.replicas, cmap.write_quorum) == (7, 2, 1)
    assert [(n.id, n.weight) for n in cmap.nodes] == [("n1", 2.5), ("n2", 1.0), ("v6", 1.0)]


@pytest.mark.parametrize(("count", "replicas", "quorum"), [(1, 1, 1), (2, 2, 2), (5, 3, 2)])
def test_defaults_follow_node_count(tmp_path, count, replicas, quorum):
    cmap = load_cluster_file(write(tmp_path, "".join(node(i) for i in range(count))))
    assert (cmap.replicas, cmap.write_quorum) == (replicas, quorum)


def test_round_trips_through_toml_and_dict(tmp_path):
    text = "epoch = 3\nreplicas = 2\n" + node(1, "weight = 0.5") + node(2, "weight = 3")
    text += node(3) + '[[nodes]]\nid = "x"\naddress = "[::1]:1"\nweight = 1e-3\n'
    cmap = load_cluster_file(write(tmp_path, text))
    again = load_cluster_file(write(tmp_path, cmap.to_toml()))
    assert again == cmap
    assert again.to_toml() == cmap.to_toml()
    assert ClusterMap.from_dict(cmap.to_dict()) == cmap


def test_owners_follow_the_ring(tmp_path):
    cmap = load_cluster_file(write(tmp_path, "replicas = 2\n" + THREE_NODES))
    assert cmap.ring() is cmap.ring()
    ring = HashRing([("a", 1.0), ("b", 1.0), ("c", 1.0)])
    for key in (os.urandom(32) for _ in range(200)):
        owners = cmap.owners(key)
        assert [n.id for n in owners] == ring.owners(key, 2)
        assert all(cmap.node(n.id) is n for n in owners)


def test_errors_are_invalid_input():
    assert issubclass(ClusterFileError, InvalidInput)
    assert issubclass(ClusterFileError, ClusterMapError)


def check_error(path: Path, message: str) -> None:
    with pytest.raises(ClusterFileError) as err:
        load_cluster_file(path)
    assert str(err.value) == f"{path}: {message}"
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    check_error(tmp_path / "nope.toml", "cluster file not found")


def test_unreadable_file(tmp_path):
    check_error(tmp_path, "cannot read cluster file: Is a directory")


def test_not_utf8(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_bytes(b"replicas = 1\n# \xff\n")
    check_error(path, "not UTF-8 text (byte 15)")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "replicas = 1\nreplica = 2\n" + node(1),
            "unknown key 'replica' (allowed: epoch, replicas, write_quorum, nodes)",
        ),
        (
            node(1) + node(2, "wieght = 2"),
            "node #2: unknown key 'wieght' (allowed: id, address, weight)",
        ),
        ("replicas = 1\n", "missing required key 'nodes' (add [[nodes]] entries)"),
        ('[[nodes]]\naddress = "h:1"\n', "node #1: missing required key 'id'"),
        ('[[nodes]]\nid = "a"\n', "node #1: missing required key 'address'"),
        ("nodes = []\n", "no nodes: a cluster needs at least one [[nodes]] entry"),
        ('nodes = "a"\n', "'nodes' must be an array of tables ([[nodes]])"),
        (
            node(1) + '[[nodes]]\nid = "n1"\naddress = "other:1"\n',
            "duplicate node id 'n1'",
        ),
        (
            node(1) + '[[nodes]]\nid = "n2"\naddress = "HOST1:7400"\n',
            "nodes 'n1' and 'n2' have the same address 'HOST1:7400'",
        ),
        ("replicas = 0\n" + node(1), "replicas must be >= 1, got 0"),
        ("replicas = 3\n" + node(1) + node(2), "replicas = 3 but there are only 2 nodes"),
        ('replicas = "3"\n' + node(1), "replicas must be an integer, got '3'"),
        (
            "replicas = 2\nwrite_quorum = 0\n" + node(1) + node(2),
            "write_quorum must be between 1 and replicas (2), got 0",
        ),
        (
            "replicas = 2\nwrite_quorum = 3\n" + node(1) + node(2) + node(3),
            "write_quorum must be between 1 and replicas (2), got 3",
        ),
        ("epoch = 0\n" + node(1), "epoch must be >= 1, got 0"),
        ("epoch = 1.5\n" + node(1), "epoch must be an integer, got 1.5"),
        (node(1, "weight = 0"), "node 'n1': weight must be a number > 0, got 0"),
        (node(1, "weight = -1.5"), "node 'n1': weight must be a number > 0, got -1.5"),
        (node(1, 'weight = "2"'), "node 'n1': weight must be a number > 0, got '2'"),
        (node(1, "weight = true"), "node 'n1': weight must be a number > 0, got True"),
        (node(1, "weight = inf"), "node 'n1': weight must be a number > 0, got inf"),
        (
            '[[nodes]]\nid = "a b"\naddress = "h:1"\n',
            "bad node id 'a b': use only letters, digits, '_', '.' and '-'",
        ),
        (
            '[[nodes]]\nid = ""\naddress = "h:1"\n',
            "bad node id '': use only letters, digits, '_', '.' and '-'",
        ),
        (
            '[[nodes]]\nid = 7\naddress = "h:1"\n',
            "bad node id 7: use only letters, digits, '_', '.' and '-'",
        ),
    ],
)
def test_rule_violations(tmp_path, text, message):
    check_error(write(tmp_path, text), message)


@pytest.mark.parametrize(
    "address", ["host", "host:", ":7400", "host:0", "host:65536", "host:http", "::1:7400", 7400]
)
def test_bad_address(tmp_path, address):
    value = f'"{address}"' if isinstance(address, str) else address
    text = f'[[nodes]]\nid = "a"\naddress = {value}\n'
    check_error(
        write(tmp_path, text), f"node 'a': bad address {address!r}: want HOST:PORT, port 1-65535"
    )


def test_toml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "replicas = 1\nwrite_quorum = = 2\n" + node(1))
    with pytest.raises(ClusterFileError) as err:
        load_cluster_file(path)
    assert str(err.value).startswith(f"{path}: invalid TOML: ")
    assert str(err.value).endswith("(at line 2, column 16)")


def test_from_dict_reports_without_path():
    with pytest.raises(ClusterMapError, match="^duplicate node id 'a'$"):
        ClusterMap.from_dict(
            {"nodes": [{"id": "a", "address": "h:1"}, {"id": "a", "address": "h:2"}]}
        )


def test_constructed_maps_are_validated():
    with pytest.raises(ClusterMapError, match="replicas = 2 but there are only 1 nodes"):
        ClusterMap(epoch=1, replicas=2, write_quorum=1, nodes=(NodeSpec("a", "h:1"),))
