"""Fault suite: real node processes on loopback, faults injected while clients push, stage and
commit, pull and collect garbage, and one invariant checked at the end of every run:

- every version whose push was acknowledged (returned) reads back byte-identical;
- no version that was not acknowledged is visible half-written: every visible version pulls
  completely, byte-identical to what was pushed under its message, and ``verify`` is clean;
- after ``chunkstore cluster repair`` every chunk, manifest and version record of the repo is on
  all of its owners (asked with Holds, which marks nothing wanted).

The random schedule is seeded; the seed is in the test id (``seed=N``) and in the output, so a
failure replays with ``CHUNKSTORE_FAULT_SEED=N``. ``CHUNKSTORE_FAULT_ROUNDS`` makes each run
longer (default 8 rounds per seed; the whole file runs in well under a minute).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
from cluster_checks import all_chunks, metric, node_status, placement_gaps, stub, wait_until
from cluster_fixtures import LocalCluster, free_port
from conftest import random_bytes, tree_bytes, write
from prometheus_client.parser import text_string_to_metric_families
from tcp_proxy import TcpProxy

from chunkstore import codec, errors, ids
from chunkstore.client.cli import main as cli_main
from chunkstore.client.cluster_store import ClusterStore
from chunkstore.client.rpc import RpcPolicy
from chunkstore.ingest import PipelineLimits
from chunkstore.repository import Repository
from chunkstore.server.local_cluster import HOST, set_node_args
from chunkstore.stores.lmdb_store import LmdbStore
from chunkstore.v1 import store_pb2 as pb

REPO = "m"
NODES = ["n1", "n2", "n3", "n4"]
PROXIED = "n4"  # the node whose map address is a TCP proxy
#: Repair only when asked (and at start); no scrub unless a test turns it on.
NODE_ARGS = ["--reconcile-interval", "3600", "--map-refresh", "0.5", "--scrub-rate", "0"]
SCRUB_ARGS = ["--reconcile-interval", "3600", "--map-refresh", "0.5",
              "--scrub-interval", "0.2", "--scrub-rate", "64M"]  # fmt: skip
#: Windows of 1 MiB: a push of a few MiB reports progress (and can be hit) several times.
SMALL_WINDOWS = PipelineLimits(window_bytes=1 << 20, group_bytes=512 << 10, batch_bytes=1 << 20)
#: Short deadlines so that a hung node costs a test seconds, not minutes.
POLICY = RpcPolicy(
    timeout=5.0, stream_timeout=10.0, stall_timeout=2.0, max_backoff=0.5, reconnect_backoff_ms=250
)
OWN_BYTES = 4 << 20  # new bytes per pushed version (plus 2 MiB shared by all)
FAULTS = ["kill", "pause", "drop", "delay", "reset"]
OPS = ["push", "push", "stage", "pull", "gc"]
GC_HOOKS = ("list_repos", "scan", "delete")  # where in a GC its fault lands

_env_seed = os.environ.get("CHUNKSTORE_FAULT_SEED")
SEEDS = [int(_env_seed)] if _env_seed else [1, 2]
ROUNDS = int(os.environ.get("CHUNKSTORE_FAULT_ROUNDS", "8"))


def connect(cluster: LocalCluster, limits: PipelineLimits = PipelineLimits()) -> Repository:
    return Repository(ClusterStore.connect(cluster.url, POLICY), limits=limits)


@contextlib.contextmanager
def proxied_cluster(directory: Path, node_args=NODE_ARGS):
    """4 nodes, replicas 3, write quorum 2; n4's map address is a TCP proxy to the port it
    listens on, so its traffic (clients' and peers') can be cut or slowed."""
    cluster = LocalCluster(directory, nodes=4, replicas=3, write_quorum=2, node_args=node_args)
    map_host, map_port = cluster.address(PROXIED).rsplit(":", 1)
    real_port = free_port()
    cluster.listen[PROXIED] = f"{HOST}:{real_port}"
    proxy = TcpProxy((HOST, real_port), listen=(map_host, int(map_port)), delay=0.3).start()
    try:
        with cluster:
            yield cluster, proxy
    finally:
        proxy.stop()


class Ledger:
    """What was pushed under which message, and which pushes were acknowledged."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.attempted: dict[str, Path] = {}
        self.acked: set[str] = set()
        self.removed: set[str] = set()  # acknowledged, then removed with every node up

    def tree(self, message: str, seed: int, shared: bytes, size: int = 2 << 20) -> Path:
        path = self.root / message
        write(path / "shared.bin", shared)  # the same in every version: deduplicated
        write(path / "own.bin", random_bytes(size, seed=seed))
        self.attempted[message] = path
        return path

    def push(self, repo: Repository, message: str) -> None:
        repo.push(self.attempted[message], REPO, message=message)
        self.acked.add(message)


def visible_versions(repo: Repository) -> list:
    """The versions of the repo a client sees ([] for a repo with none)."""
    try:
        return repo.log(REPO)
    except errors.NotFound:
        return []


def repair(cluster: LocalCluster, capsys) -> dict:
    before = capsys.readouterr()
    code = cli_main(["cluster", "repair", "--store", cluster.url, "--json"])
    out, err = capsys.readouterr()
    sys.stdout.write(before.out)  # keep the test's own output for its report
    sys.stderr.write(before.err)
    assert code == 0, f"cluster repair failed ({code}): {out}{err}"
    return json.loads(out)


def check_invariant(cluster: LocalCluster, ledger: Ledger, capsys, tmp: Path) -> None:
    """The invariant of every run (see the module docstring); every node must be up."""
    repair(cluster, capsys)
    with connect(cluster) as repo:
        visible = visible_versions(repo)
        messages = [v.message for v in visible]
        assert ledger.acked <= set(messages), "an acknowledged version is not visible"
        back = sorted(ledger.removed & set(messages))
        if back:  # removals are not replicated as tombstones (README): then it must be whole
            print(f"removed versions visible again: {back}")
        assert len(messages) == len(set(messages)), f"a version is listed twice: {messages}"
        for version in visible:
            assert version.message in ledger.attempted, f"unknown version {version.message!r}"
            dest = tmp / "check" / version.message
            repo.pull(f"{REPO}@{version.id.hex()}", dest, force=True)
            assert tree_bytes(dest) == tree_bytes(ledger.attempted[version.message]), (
                f"version {version.message!r} does not read back byte-identical"
            )
        result = repo.verify()
        assert result.ok, f"verify: {len(result.missing)} missing, {len(result.corrupt)} corrupt"
        if visible:  # under the map the nodes serve now (membership may have changed)
            current = repo.store.cluster
            addresses = {n.id: n.address for n in current.nodes}
            assert placement_gaps(current, addresses, repo, REPO) == []


# -- the random schedule -------------------------------------------------------------------


class Faults:
    """Inject one fault at a time into a node of the cluster, and heal it."""

    def __init__(self, cluster: LocalCluster, proxy: TcpProxy) -> None:
        self.cluster = cluster
        self.proxy = proxy

    def inject(self, fault: str, node: str) -> None:
        if fault == "kill":
            self.cluster.kill(node)
        elif fault == "pause":
            self.cluster.process(node).send_signal(signal.SIGSTOP)
        else:
            self.proxy.mode = fault

    def heal(self, fault: str, node: str) -> None:
        if fault == "kill":
            self.cluster.start(node)
        elif fault == "pause":
            self.cluster.process(node).send_signal(signal.SIGCONT)
        else:
            self.proxy.mode = "pass"


class Trigger:
    """A Progress that injects the fault once ``at`` (a share) of an operation's bytes were
    handled, so that the fault lands while the operation runs; :meth:`fire` also does it from
    outside (for GC, whose store calls are hooked instead, and for an operation that ended
    first)."""

    def __init__(self, at: float, inject) -> None:
        self.at = at
        self.inject = inject
        self.total = self.done = 0
        self.fired = threading.Event()
        self.mid_op = False
        self._lock = threading.Lock()

    def start(self, total: int, label: str) -> None:
        self.total, self.done = total, 0

    def advance(self, done: int, new: int = 0) -> None:
        self.done += done
        if self.total and self.done >= self.at * self.total:
            self.fire(mid_op=True)

    def finish(self) -> None:
        pass

    def fire(self, mid_op: bool) -> None:
        with self._lock:
            if self.fired.is_set():
                return
            self.mid_op = mid_op
            try:
                self.inject()
            finally:
                self.fired.set()


def run_op(
    op: str, repo: Repository, ledger: Ledger, message: str, tmp: Path, progress: Trigger
) -> str:
    """Push version ``message``, stage its two files as two ranks would and commit them, pull
    it (``op`` "pull": ``message`` names an acknowledged version), or collect garbage; return
    what happened, in words."""
    if op == "push":
        repo.push(ledger.attempted[message], REPO, message=message, progress=progress)
        ledger.acked.add(message)
        return "acknowledged"
    if op == "stage":
        stage = repo.stage(REPO, message=message)
        tree = ledger.attempted[message]
        repo.stage_add(stage.id, tree / "shared.bin", as_path="shared.bin")
        repo.stage_add(stage.id, tree / "own.bin", as_path="own.bin", progress=progress)
        stage.commit(expect=2)
        ledger.acked.add(message)
        return "staged and committed"
    if op == "pull":
        version = next(v for v in repo.log(REPO) if v.message == message)
        dest = tmp / "pulls" / f"{message}-{time.monotonic_ns()}"
        repo.pull(f"{REPO}@{version.id.hex()}", dest, progress=progress)
        assert tree_bytes(dest) == tree_bytes(ledger.attempted[message]), "pulled wrong bytes"
        return f"pulled {message} byte-identical"
    # Fire from one of the store calls GC makes (client side): at the start of the mark
    # phase, between mark and sweep, or within the sweep.
    hook = GC_HOOKS[min(len(GC_HOOKS) - 1, int(progress.at * len(GC_HOOKS)))]
    original = getattr(repo.store, hook)

    def hooked(*args, **kwargs):
        progress.fire(mid_op=True)
        return original(*args, **kwargs)

    setattr(repo.store, hook, hooked)
    try:
        result = repo.gc(grace_seconds=0)
    finally:
        delattr(repo.store, hook)
    return f"gc (fault at {hook}) deleted {result.deleted_chunks} chunks"


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed={s}")
def test_random_fault_schedule(tmp_path, capsys, seed):
    """Per round: start a push, a stage-and-commit, a pull or a GC (after removing a version,
    so that GC has garbage to sweep); inject one fault at a random point of its progress
    (kill -9, SIGSTOP, or the proxy in front of n4 dropping, delaying or resetting); hold it a
    random time; heal it (restart, SIGCONT, pass); record what the operation returned. With
    replicas 3 and write quorum 2, one fault at a time must fail no push, no commit and no
    pull; GC may refuse (it must not sweep without every node) but must never take a chunk a
    visible version needs."""
    rng = random.Random(seed)
    ledger = Ledger(tmp_path / "trees")
    shared = random_bytes(2 << 20, seed=seed + 1000)
    faults = [FAULTS[i % len(FAULTS)] for i in range(ROUNDS)]
    rng.shuffle(faults)
    log = [f"fault seed {seed}, {ROUNDS} rounds (replay: CHUNKSTORE_FAULT_SEED={seed})"]
    mid_op = 0
    with proxied_cluster(tmp_path / "c") as (cluster, proxy):
        injector = Faults(cluster, proxy)
        with connect(cluster, SMALL_WINDOWS) as repo, ThreadPoolExecutor(1) as pool:
            ledger.tree("base", seed * 1000, shared, size=OWN_BYTES)
            ledger.push(repo, "base")
            for r, fault in enumerate(faults):
                op = rng.choice(OPS)
                node = PROXIED if fault in ("drop", "delay", "reset") else rng.choice(NODES)
                hold = rng.uniform(0.3, 1.5)
                message = f"r{r}"
                note = ""
                if op in ("push", "stage"):
                    ledger.tree(message, seed * 1000 + r + 1, shared, size=OWN_BYTES)
                elif op == "pull":
                    message = rng.choice(sorted(ledger.acked))
                elif op == "gc":
                    removable = sorted(ledger.acked - {"base"})
                    if removable:  # removed while every node is up: it must stay removed
                        gone = rng.choice(removable)
                        repo.rm(f"{REPO}@{version_id(repo, gone)}")
                        ledger.acked.discard(gone)
                        ledger.removed.add(gone)
                        note = f" (removed {gone} first)"
                at = rng.uniform(0.0, 0.9)
                step = f"round {r}: {op} {message if op != 'gc' else ''}{note} with {fault} "
                step += f"of {node} at {at:.0%} for {hold:.2f} s"
                print(step, flush=True)
                trigger = Trigger(at, partial(injector.inject, fault, node))
                began = time.monotonic()
                future = pool.submit(run_op, op, repo, ledger, message, tmp_path, trigger)
                try:
                    while not (trigger.fired.wait(0.01) or future.done()):
                        pass
                    trigger.fire(mid_op=False)  # no-op if it fired during the operation
                    time.sleep(hold)
                finally:
                    if trigger.fired.is_set():
                        injector.heal(fault, node)
                mid_op += trigger.mid_op
                settle(repo)  # one fault at a time: the next begins once this one is healed
                try:
                    outcome = future.result(timeout=120)
                except errors.StoreUnavailable as e:
                    if op != "gc":
                        raise AssertionError(f"seed {seed}: {step}: {op} failed: {e}") from e
                    outcome = f"gc refused: {e}"  # GC needs every node; refusing is right
                except Exception as e:
                    raise AssertionError(f"seed {seed}: {step}: {op} failed: {e!r}") from e
                took = time.monotonic() - began
                where = "mid-op" if trigger.mid_op else "after the op"
                log.append(f"{step}: fault {where}; {outcome} ({took:.1f} s)")
        log.append(f"{mid_op} of {ROUNDS} faults landed while the operation ran")
        print("\n".join(log), flush=True)
        check_invariant(cluster, ledger, capsys, tmp_path)


def settle(repo: Repository, timeout: float = 30.0) -> None:
    """Wait until this client reaches every node again (a call to each answers): after a
    restart or a healed partition its channel may still be backing off, and a fault injected
    meanwhile would be a second one at a time."""

    def reachable() -> bool:
        try:
            repo.store.totals()  # one call to every node; raises if one does not answer
        except errors.ChunkstoreError:
            return False
        return True

    wait_until(reachable, timeout, "the client to reach every node again", every=0.1)


def version_id(repo: Repository, message: str) -> str:
    return next(v.id.hex() for v in repo.log(REPO) if v.message == message)


# -- single faults -------------------------------------------------------------------------


def flip_a_byte(data_dir: Path, cid: bytes) -> None:
    """Flip one byte in the middle of a stored chunk of a stopped node."""
    with LmdbStore(data_dir, create=False) as shard:
        ((_, blob),) = list(shard.get([cid]))
        bad = bytearray(blob)
        bad[len(bad) // 2] ^= 0x01
        assert shard.delete([cid]) == 1
        shard.put([(cid, bytes(bad))])


def test_a_flipped_byte_is_read_around_and_scrubbed(tmp_path, capsys):
    """A byte flipped in a chunk on two of its three owners: pulls still return the right
    bytes (from the third owner); with the third owner down too, a pull fails rather than hand
    out a wrong byte; scrub then replaces both bad copies and the invariant holds."""
    ledger = Ledger(tmp_path / "trees")
    ledger.tree("v1", 7, random_bytes(2 << 20, seed=8))
    with proxied_cluster(tmp_path / "c") as (cluster, _):
        with connect(cluster) as repo:
            ledger.push(repo, "v1")
            version = repo.log(REPO)[0]
            cids = [cid for f in version.files for cid, _ in repo.manifest(f).chunks]
        cid = cids[len(cids) // 2]
        owners = [n.id for n in cluster.map.owners(cid)]
        bad, good = owners[:2], owners[2]
        for node in bad:
            cluster.stop(node)
            flip_a_byte(cluster.node_data(node), cid)
            cluster.start(node)
        with connect(cluster) as repo:
            for i in range(3):
                dest = tmp_path / "pull" / str(i)
                repo.pull(REPO, dest)
                assert tree_bytes(dest) == tree_bytes(ledger.attempted["v1"])
        cluster.kill(good)
        with connect(cluster) as repo, pytest.raises(errors.ChunkstoreError):
            repo.pull(REPO, tmp_path / "pull" / "no-good-copy")
        cluster.start(good)

        set_node_args(cluster.directory, SCRUB_ARGS)
        for node in bad:
            cluster.stop(node)
            cluster.start(node)
        for node in bad:
            url = cluster.metrics_url(node)
            wait_until(lambda u=url: metric(u, "chunkstore_scrub_repaired_total") >= 1, 30,
                       f"{node} to scrub and repair the chunk")  # fmt: skip
            assert metric(url, "chunkstore_scrub_errors_total") == 1
        for node in owners:
            (blob,) = stored_blobs(cluster.address(node), [cid])
            assert codec.decode_verified(cid, blob)
        check_invariant(cluster, ledger, capsys, tmp_path)


def addresses_of(cluster: LocalCluster) -> dict[str, str]:
    return {n.id: n.address for n in cluster.map.nodes}


def stored_blobs(address: str, ids: list[bytes]) -> list[bytes]:
    channel, chunks, _, _ = stub(address)
    with channel:
        return [
            c.blob for b in chunks.GetChunks(pb.ChunkIds(ids=ids), timeout=10) for c in b.chunks
        ]


def test_a_client_killed_mid_push_then_the_push_again_reuses_what_was_stored(tmp_path, capsys):
    """SIGKILL a client process halfway through a push: no version appears; the same push run
    again succeeds and sends only what the first did not store."""
    ledger = Ledger(tmp_path / "trees")
    big = ledger.root / "big"
    write(big / "w.bin", random_bytes(48 << 20, seed=31))
    ledger.attempted["big"] = big
    with proxied_cluster(tmp_path / "c") as (cluster, _):
        addresses = [n.address for n in cluster.map.nodes]
        script = (
            "import sys\n"
            "from chunkstore.client.cluster_store import ClusterStore\n"
            "from chunkstore.repository import Repository\n"
            "r = Repository(ClusterStore.connect(sys.argv[1]))\n"
            "r.push(sys.argv[2], 'm', message='big')\n"
        )
        client = subprocess.Popen([sys.executable, "-c", script, cluster.url, str(big)])
        try:
            wait_until(  # a quarter of the copies of its chunks: some have both by then
                lambda: (
                    sum(node_status(a).stored_bytes for a in addresses) >= (2 * (48 << 20)) // 4
                    or client.poll() is not None
                ),
                30,
                "the client to store a quarter of its chunks",
                every=0.01,
            )
        finally:
            client.kill()
        assert client.wait() == -signal.SIGKILL, "the push finished before it could be killed"
        stored = sum(node_status(a).chunks for a in addresses)
        with connect(cluster) as repo:
            assert visible_versions(repo) == [], "a push that was killed left a version"
            result = repo.push(big, REPO, message="big")
            ledger.acked.add("big")
        scanned, new = result.stats.scanned_bytes, result.stats.new_raw_bytes
        print(f"killed after {stored} chunk copies; again: {new} of {scanned} bytes new")
        assert 0 < new < scanned, "the second push did not reuse what the first stored"
        check_invariant(cluster, ledger, capsys, tmp_path)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """Mount a tmpfs of ``size`` at ``path`` (root only); skip the test where that fails."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a full store: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def store_full_rejections(cluster: LocalCluster, node_id: str) -> float:
    """Chunks a node refused for lack of space, from its metrics."""
    with urllib.request.urlopen(cluster.metrics_url(node_id), timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "chunkstore_chunks_rejected_total"
        and sample.labels.get("reason") == "store_full"
    )


def resize_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def test_a_node_whose_store_is_full(tmp_path, capsys):
    """n1's data directory is a small tmpfs that fills up: pushes go on (the other owners
    make the quorum), n1 stays up and keeps serving reads; once its disk grows, repair fills
    in what it missed."""
    ledger = Ledger(tmp_path / "trees")
    shared = random_bytes(1 << 20, seed=41)
    with contextlib.ExitStack() as stack:
        cluster = LocalCluster(
            tmp_path / "c", nodes=4, replicas=3, write_quorum=2, node_args=NODE_ARGS
        )
        disk = stack.enter_context(tmpfs(cluster.node_data("n1"), "3m"))
        stack.enter_context(cluster)
        with connect(cluster) as repo:
            for i in range(4):
                ledger.tree(f"v{i}", 50 + i, shared, size=3 << 20)
                ledger.push(repo, f"v{i}")
            assert cluster.process("n1").poll() is None
            assert store_full_rejections(cluster, "n1") > 0, "n1 never filled up"
            assert "Traceback" not in cluster.log("n1")  # answered RESOURCE_EXHAUSTED
            some = all_chunks(cluster.address("n1"))
            assert some, "n1 holds nothing"
            (blob,) = stored_blobs(cluster.address("n1"), some[:1])
            assert codec.decode_verified(some[0], blob)  # n1 still serves reads
            gaps = placement_gaps(cluster.map, addresses_of(cluster), repo, REPO)
            assert any(g.startswith("n1 lacks") for g in gaps), gaps
        resize_tmpfs(disk, "64m")
        check_invariant(cluster, ledger, capsys, tmp_path)


def test_a_full_disk_is_reported_as_store_full(tmp_path):
    with (
        tmpfs(tmp_path / "disk", "2m") as disk,
        LmdbStore(disk / "s") as store,
        pytest.raises(errors.StoreFull),
    ):
        for i in range(64):
            raw = random_bytes(256 << 10, seed=i)
            store.put([(ids.chunk_id(raw), codec.encode(raw))])


def test_tcp_proxy_modes(tmp_path):
    """The proxy itself: pass forwards, drop holds, delay slows, reset cuts; stop joins."""
    import socket
    import threading

    server = socket.create_server((HOST, 0))
    port = server.getsockname()[1]
    stop = threading.Event()

    def echo() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                while data := conn.recv(1024):
                    conn.sendall(data)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    proxy = TcpProxy((HOST, port), delay=0.3).start()
    try:
        with socket.create_connection((HOST, proxy.port), timeout=2) as s:
            s.sendall(b"ping")
            assert s.recv(16) == b"ping"
            proxy.mode = "delay"
            began = time.monotonic()
            s.sendall(b"slow")
            assert s.recv(16) == b"slow"
            assert time.monotonic() - began >= 0.5  # both directions delayed
            proxy.mode = "drop"
            s.sendall(b"lost")
            s.settimeout(0.5)
            with pytest.raises(TimeoutError):
                s.recv(16)
            proxy.mode = "reset"
            with pytest.raises((ConnectionResetError, OSError)):
                s.settimeout(2)
                s.sendall(b"x")
                assert s.recv(16) == b""
                raise ConnectionResetError
        proxy.mode = "pass"
        with socket.create_connection((HOST, proxy.port), timeout=2) as s:
            s.sendall(b"again")
            assert s.recv(16) == b"again"
    finally:
        proxy.stop()
        stop.set()
        thread.join(2)
        server.close()
    with pytest.raises(ValueError):
        proxy.mode = "bogus"
    assert not [t for t in threading.enumerate() if t.name.startswith("proxy-")]


def test_kill_and_restart_during_a_rebalance(tmp_path, capsys):
    """A fifth node joins and is added while the cluster holds data; one node is killed -9
    while chunks move (the move is throttled so it is still going), a push runs meanwhile, the
    node comes back: every acknowledged version reads back, and after repair every chunk is
    on its owners under the new map."""
    ledger = Ledger(tmp_path / "trees")
    shared = random_bytes(1 << 20, seed=51)
    args = [
        "--reconcile-interval",
        "1",
        "--map-refresh",
        "0.5",
        "--scrub-rate",
        "0",
        "--repair-rate",
        "2M",
    ]
    with LocalCluster(tmp_path / "c", nodes=4, replicas=3, write_quorum=2, node_args=args) as c:
        with connect(c) as repo:
            for i in range(4):
                ledger.tree(f"v{i}", 60 + i, shared, size=3 << 20)
                ledger.push(repo, f"v{i}")
        address = c.join("n5")
        assert cli_main(["cluster", "add-node", "n5", address, "--store", c.url]) == 0
        c.kill("n2")  # mid-move: ~1/5 of ~50 MB of replicas at 2 MB/s per node
        with connect(c) as repo:
            ledger.tree("v4", 64, shared, size=3 << 20)
            ledger.push(repo, "v4")
            assert repo.store.cluster.epoch == 2
        c.start("n2")
        with connect(c) as repo:
            settle(repo)
        check_invariant(c, ledger, capsys, tmp_path)
