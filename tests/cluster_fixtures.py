"""Real storage node processes on loopback ports, for tests.

    from cluster_fixtures import LocalCluster, cluster_fixture

    cluster3 = cluster_fixture(nodes=3, replicas=2)   # a module-scoped pytest fixture

    def test_roundtrip(cluster3):
        store = open_store(cluster3.url)
        ...

    def test_failover(tmp_path):
        with LocalCluster(tmp_path, nodes=3) as cluster:
            cluster.kill("n2")
            ...
            cluster.start("n2")

Nodes are ``n1``..``nN`` on ``127.0.0.1``, with ports picked at run time; the directory layout
is that of ``chunkstore cluster up`` (see :mod:`chunkstore.server.local_cluster`). Every process
a LocalCluster starts is stopped when it closes: on leaving the ``with`` block, at the end of the
fixture's scope (also when a test failed), or at interpreter exit.
"""

from __future__ import annotations

import atexit
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from chunkstore.client.rpc import Credentials
from chunkstore.cluster_map import ClusterMap
from chunkstore.server import local_cluster


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    return local_cluster.free_ports(1)[0]


def write_cluster_file(
    directory: str | Path, n: int = 3, replicas: int | None = None, write_quorum: int | None = None
) -> tuple[Path, ClusterMap]:
    """Write ``directory/cluster.toml`` for nodes n1..n<n> on free loopback ports."""
    cluster = local_cluster.create(directory, n, replicas, write_quorum)
    return Path(directory) / local_cluster.MAP_FILE, cluster


class LocalCluster:
    """A cluster of node processes in ``directory``, running inside a ``with`` block.

    Entering starts every node and waits until all answer SERVING (``timeout`` seconds in all);
    if one fails, the others are stopped and the error shows the tail of its log.

    ``node_args`` are extra options of every node (e.g. ``--tls-cert``, ``--tokens``);
    ``credentials`` are those the health probes need (TLS: a CA, maybe a client certificate).
    With ``--tls-cert``, :attr:`url` is ``grpcs://``.
    """

    def __init__(
        self,
        directory: str | Path,
        nodes: int = 3,
        replicas: int | None = None,
        write_quorum: int | None = None,
        timeout: float = 30.0,
        node_args: Sequence[str] = (),
        credentials: Credentials | None = None,
        listen: dict[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        #: node id -> address that node binds instead of its map address (e.g. to put a
        #: TCP proxy on the map address); may be filled in before entering the ``with`` block.
        self.listen: dict[str, str] = dict(listen or {})
        self.map_path, self.map = write_cluster_file(directory, nodes, replicas, write_quorum)
        local_cluster.set_node_args(directory, node_args)
        self.url = local_cluster.store_url(self.map, tls="--tls-cert" in node_args)
        self.credentials = credentials
        self.timeout = timeout
        self._processes: dict[str, subprocess.Popen] = {}
        self._joined: dict[str, tuple[str, str]] = {}  # node id -> (address, seed URL)

    def __enter__(self) -> LocalCluster:
        atexit.register(self.close)
        try:
            for node in self.map.nodes:
                self._spawn(node.id)
            for node in self.map.nodes:
                self._wait(node.id)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def address(self, node_id: str) -> str:
        if node_id in self._joined:
            return self._joined[node_id][0]
        return self.map.node(node_id).address

    def join(self, node_id: str, seed: str | None = None) -> str:
        """Start a new node ``node_id`` with ``--join`` (default seed: this cluster's URL) on
        a free port, as an operator adds a node: it serves, but owns nothing until a map that
        includes it is published. Returns its address; :meth:`start` restarts it the same way.
        """
        port, metrics_port = local_cluster.free_ports(2)
        address = f"{local_cluster.HOST}:{port}"
        (self.directory / f"{node_id}.metrics").write_text(f"{metrics_port}\n")
        self._joined[node_id] = (address, seed or self.url)
        self.start(node_id)
        return address

    def node_data(self, node_id: str) -> Path:
        """The directory of a node's store."""
        return self.directory / node_id

    def metrics_url(self, node_id: str) -> str:
        port = (self.directory / f"{node_id}.metrics").read_text().strip()
        return f"http://{local_cluster.HOST}:{port}/metrics"

    def log(self, node_id: str) -> str:
        """Everything a node has written to stdout and stderr."""
        return (self.directory / f"{node_id}.log").read_text(errors="replace")

    def process(self, node_id: str) -> subprocess.Popen:
        """The process of a node started by this cluster (running or not)."""
        return self._processes[node_id]

    def start(self, node_id: str) -> None:
        """(Re)start a stopped or killed node with its data; return once it serves."""
        if self._running(node_id):
            raise RuntimeError(f"node {node_id} is running")
        self._spawn(node_id)
        self._wait(node_id)

    def stop(self, node_id: str, timeout: float = 15.0) -> int:
        """SIGTERM a node and wait for it to exit; return its exit code."""
        process = self._processes[node_id]
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        return process.wait(timeout)

    def kill(self, node_id: str) -> None:
        """SIGKILL a node, as a crash would end it, and wait for it to be gone."""
        process = self._processes[node_id]
        if process.poll() is None:
            process.kill()
        process.wait()

    def close(self) -> None:
        """Stop every node still running (SIGTERM, then SIGKILL after a timeout)."""
        local_cluster.stop_processes(list(self._processes.values()))
        for node_id in self._processes:
            (self.directory / f"{node_id}.pid").unlink(missing_ok=True)
        atexit.unregister(self.close)

    def _running(self, node_id: str) -> bool:
        process = self._processes.get(node_id)
        return process is not None and process.poll() is None

    def _spawn(self, node_id: str) -> None:
        placement = None
        if node_id in self._joined:
            address, seed = self._joined[node_id]
            placement = ["--listen", address, "--join", seed]
        elif node_id in self.listen:  # bound elsewhere than its map address
            map_file = str(self.directory / local_cluster.MAP_FILE)
            placement = ["--cluster", map_file, "--listen", self.listen[node_id]]
        self._processes[node_id] = local_cluster.start_node(
            self.directory, node_id, placement=placement
        )

    def _wait(self, node_id: str) -> None:
        local_cluster.wait_serving(
            self.directory,
            node_id,
            self.address(node_id),
            self._processes[node_id],
            self.timeout,
            self.credentials,
        )


def cluster_fixture(
    nodes: int = 3,
    replicas: int | None = None,
    write_quorum: int | None = None,
    scope: str = "module",
) -> Callable[..., Iterator[LocalCluster]]:
    """A pytest fixture that yields a running :class:`LocalCluster` for ``scope``.

    Assign it to a module-level name; that name is the fixture's name.
    """

    @pytest.fixture(scope=scope)
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
        directory = tmp_path_factory.mktemp("cluster")
        with LocalCluster(directory, nodes, replicas, write_quorum) as cluster:
            yield cluster

    return fixture
