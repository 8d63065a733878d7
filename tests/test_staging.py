"""Multi-rank checkpoint save: several processes fill one stage, one commits a single version."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cluster_checks import metric, wait_until
from cluster_fixtures import LocalCluster, cluster_fixture
from conftest import random_bytes, tree_bytes, write

from chunkstore import staging
from chunkstore.client.cluster_store import stage_key
from chunkstore.client.rpc import NodeClient
from chunkstore.connect import connect
from chunkstore.errors import InvalidInput, NotFound, StoreFull, StoreUnavailable
from chunkstore.repository import Repository
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc

MB = 1 << 20
RANK_SCRIPT = """
import sys, chunkstore
store = chunkstore.connect(sys.argv[1])
store.stage_add(sys.argv[2], sys.argv[3], as_path=sys.argv[4])
store.close()
"""
RACE_SCRIPT = """
import sys, chunkstore, chunkstore.errors
store = chunkstore.connect(sys.argv[1])
stage = store.open_stage(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()  # both have opened the stage: commit at once
try:
    print(stage.commit().id.hex())
except chunkstore.errors.NotFound as e:
    print("lost:", e)
"""

claim_cluster = cluster_fixture(nodes=3, replicas=2)


def rank_files(tmp_path: Path, ranks: int) -> list[Path]:
    return [
        write(tmp_path / "ranks" / f"rank{r}.bin", random_bytes(2 * MB + r, seed=r))
        for r in range(ranks)
    ]


def run_ranks(url: str, stage_id: str, files: list[Path]) -> None:
    """Ranks 1..N-1 as separate processes, all at once; rank 0 is the caller."""
    env = {**os.environ, "CHUNKSTORE_AUTHOR": "rank"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, url, stage_id, str(f), f"shards/{f.name}"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for f in files
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err


def check_four_ranks(url: str, tmp_path: Path) -> None:
    files = rank_files(tmp_path, 4)
    with connect(url) as store:
        stage = store.stage("llama-ft", message="step 500", tags=["s500"], metrics={"loss": 1.5})
        store.stage_add(stage.id, files[0], as_path=f"shards/{files[0].name}")
        run_ranks(url, stage.id, files[1:])
        with pytest.raises(NotFound):
            store.log("llama-ft")  # nothing is visible before the commit
        version = stage.commit()
        assert sorted(f.path for f in version.files) == [f"shards/rank{r}.bin" for r in range(4)]
        assert version.tags == ["s500"] and version.metrics == {"loss": 1.5}
        assert [v.id for v in store.log("llama-ft")] == [version.id]
        store.pull("llama-ft@s500", tmp_path / "out")
        assert tree_bytes(tmp_path / "out" / "shards") == tree_bytes(tmp_path / "ranks")
        with pytest.raises(NotFound):
            store.open_stage(stage.id)  # a committed stage is gone


def check_racing_commits(url: str, tmp_path: Path, rounds: int = 3) -> None:
    """Two processes commit one stage at the same moment: one version, one clear refusal."""
    f = write(tmp_path / "race" / "shard.bin", random_bytes(MB, seed=7))
    with connect(url) as store:
        for i in range(rounds):
            stage = store.stage("race", message=f"race {i}")
            store.stage_add(stage.id, f)
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", RACE_SCRIPT, url, stage.id],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]
            for p in procs:  # each has opened the stage
                assert p.stdout.readline() == "ready\n", p.communicate(timeout=120)
            outs = sorted(p.communicate("go\n", timeout=120)[0].strip() for p in procs)
            assert all(p.returncode == 0 for p in procs), outs
            winner, loser = outs
            assert loser.startswith(f"lost: no stage {stage.id}") or loser.startswith(
                f"lost: stage {stage.id} was committed, aborted or expired meanwhile"
            ), outs
            assert [v.id.hex() for v in store.log("race")][0] == winner
        assert [v.message for v in store.log("race")] == [
            f"race {i}" for i in reversed(range(rounds))
        ]


def test_four_ranks_on_the_embedded_store(tmp_path):
    check_four_ranks(str(tmp_path / "store"), tmp_path)
    check_racing_commits(str(tmp_path / "store"), tmp_path)


def test_four_ranks_on_a_cluster(tmp_path):
    with LocalCluster(tmp_path / "cluster", nodes=3, replicas=2) as cluster:
        check_four_ranks(cluster.url, tmp_path)
        check_racing_commits(cluster.url, tmp_path)


def test_a_commit_with_a_node_down_says_so_and_keeps_the_stage(tmp_path):
    """Staged files whose owners cannot all be asked are not 'gone': the commit fails as
    unavailable, naming the node, and succeeds once the node is back."""
    files = rank_files(tmp_path, 4)
    with (
        LocalCluster(tmp_path / "cluster", nodes=3, replicas=2) as cluster,
        connect(cluster.url) as store,
    ):
        stage = store.stage("m", message="step 1")
        for f in files:
            store.stage_add(stage.id, f)
        cluster.kill("n3")  # owns about 2/3 of the staged chunks and manifests
        with pytest.raises(StoreUnavailable, match="n3") as info:
            stage.commit(expect=4)
        assert "\n" not in str(info.value)
        assert store.store.list_repos() == []
        cluster.start("n3")
        with connect(cluster.url) as again:  # no wait for this client's reconnect backoff
            assert len(again.open_stage(stage.id).commit(expect=4).files) == 4
            assert len(again.log("m")) == 1


def test_a_commit_short_of_a_majority_of_the_stage_owners_leaves_the_stage(tmp_path):
    """With write quorum 1 the files' checks pass with a node down, but the claim needs a
    majority of the stage's owners: it must fail as unavailable without deleting the stage
    anywhere (nor blame another process), so the commit works once the node is back."""
    (f,) = rank_files(tmp_path, 1)
    with (
        LocalCluster(tmp_path / "cluster", nodes=3, replicas=2, write_quorum=1) as cluster,
        connect(cluster.url) as store,
    ):
        stage = store.stage("m", message="step 1")
        store.stage_add(stage.id, f)
        down = cluster.map.owners(stage_key(bytes.fromhex(stage.id)))[1].id
        cluster.kill(down)
        with pytest.raises(StoreUnavailable, match=f"claim stage {stage.id}.*node {down}"):
            stage.commit()
        assert store.open_stage(stage.id).id == stage.id  # still there on the live owner
        assert store.store.list_repos() == []
        cluster.start(down)
        with connect(cluster.url) as again:  # no wait for this client's reconnect backoff
            assert [e.path for e in again.open_stage(stage.id).commit().files] == [f.name]


class _LostAnswer(grpc.RpcError, grpc.Call):
    """What a client sees of a call the node carried out but whose answer it never got (the
    connection dropped): UNAVAILABLE, which the client retries."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "Socket closed"

    def initial_metadata(self):
        return None

    def trailing_metadata(self):
        return None

    def is_active(self) -> bool:
        return False

    def time_remaining(self):
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback) -> bool:
        return False


DeleteHook = Callable[[str, bytes, Callable[[], object]], object]


class _HookedMeta:
    """A node's metadata stub whose DeleteStage calls go through ``hook(node id, claimant,
    call)``, which makes the real ``call()`` or not and answers in its place."""

    def __init__(self, stub, node_id: str, hook: DeleteHook) -> None:
        self._stub, self._node_id, self._hook = stub, node_id, hook

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)
        if name != "DeleteStage":
            return method

        def delete(request, **kwargs):
            return self._hook(self._node_id, request.claimant, lambda: method(request, **kwargs))

        return delete


def hook_delete_stage(monkeypatch, hook: DeleteHook) -> None:
    """Send every client's DeleteStage calls in this process through ``hook``."""
    real_meta = NodeClient.meta
    monkeypatch.setattr(
        NodeClient, "meta", property(lambda node: _HookedMeta(real_meta.fget(node), node.id, hook))
    )


def test_a_commit_whose_delete_answer_is_lost_still_makes_its_version(
    claim_cluster, tmp_path, monkeypatch
):
    """The second of the stage's two owners deletes it, but the answer is lost: the client
    tries again with the same claimant, and the node's OK makes the claim this commit's. One
    version, and the stage is gone (without the claimant the retry's NOT_FOUND would fail the
    commit after both owners had deleted the stage: no version and no stage)."""
    (f,) = rank_files(tmp_path, 1)
    with connect(claim_cluster.url) as store:
        stage = store.stage("lost-answer", message="step 1")
        store.stage_add(stage.id, f)
        owners = [n.id for n in claim_cluster.map.owners(stage_key(bytes.fromhex(stage.id)))]
        calls: list[tuple[str, bytes]] = []

        def lose_second_owners_first_answer(node_id: str, claimant: bytes, call):
            calls.append((node_id, claimant))
            answer = call()
            if calls == [(owners[0], claimant), (owners[1], claimant)]:
                raise _LostAnswer()
            return answer

        hook_delete_stage(monkeypatch, lose_second_owners_first_answer)
        version = stage.commit(expect=1)
        monkeypatch.undo()
        assert [node_id for node_id, _ in calls] == [owners[0], owners[1], owners[1]]
        assert len({claimant for _, claimant in calls}) == 1  # one claimant for the claim
        assert len(calls[0][1]) == 16
        assert [v.id for v in store.log("lost-answer")] == [version.id]
        assert store.store.list_stages() == []
        with pytest.raises(NotFound):
            store.open_stage(stage.id)


def test_a_claim_whose_delete_answer_is_lost_beats_one_that_came_after(
    claim_cluster, tmp_path, monkeypatch
):
    """Two processes commit one stage. Both read it on both owners; the first to delete it on
    the first owner loses that answer, and the other's delete reaches that owner before the
    retry does: it finds the stage deleted by another claimant and commits nothing, while the
    retry is answered OK and the first commit makes the one version."""
    (f,) = rank_files(tmp_path, 1)
    with connect(claim_cluster.url) as first, connect(claim_cluster.url) as other:
        stage = first.stage("lost-race", message="step 1")
        first.stage_add(stage.id, f)
        head = claim_cluster.map.owners(stage_key(bytes.fromhex(stage.id)))[0].id
        arrivals: list[bytes] = []  # claimants of the deletes on the first owner, in order
        other_waits, first_deleted, other_done = (threading.Event() for _ in range(3))

        def interleave(node_id: str, claimant: bytes, call):
            if node_id != head:
                return call()
            arrivals.append(claimant)
            if len(arrivals) == 1:  # the other process: held until the first deleted it
                other_waits.set()
                assert first_deleted.wait(30)
                try:
                    return call()
                finally:
                    other_done.set()
            if len(arrivals) == 2:  # the first process: deleted, the answer lost
                call()
                first_deleted.set()
                assert other_done.wait(30)
                raise _LostAnswer()
            return call()  # the first process's retry

        hook_delete_stage(monkeypatch, interleave)
        failures: list[BaseException] = []

        def commit_other() -> None:
            try:
                other.open_stage(stage.id).commit()
            except BaseException as e:  # checked below
                failures.append(e)

        thread = threading.Thread(target=commit_other)
        thread.start()
        assert other_waits.wait(60)
        version = stage.commit()
        thread.join(60)
        monkeypatch.undo()
        assert len(arrivals) == 3 and arrivals[0] != arrivals[1] == arrivals[2]
        assert len(failures) == 1 and isinstance(failures[0], NotFound), failures
        assert "committed, aborted or expired meanwhile" in str(failures[0])
        assert [v.id for v in first.log("lost-race")] == [version.id]
        assert first.store.list_stages() == []


class _Unreachable(_LostAnswer):
    """What a client sees of a call that never reached the node (it is down)."""

    def details(self) -> str:
        return "failed to connect to all addresses"


def holders(cluster: LocalCluster, stage_id: str) -> dict[str, set[str]]:
    """The owners of the stage that hold it, each with the paths of its files there."""
    raw = bytes.fromhex(stage_id)
    found = {}
    for node in cluster.map.owners(stage_key(raw)):
        with grpc.insecure_channel(cluster.address(node.id)) as channel:
            meta = pb_grpc.MetaServiceStub(channel)
            try:
                meta.GetStage(pb.StageKey(id=raw), timeout=10)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e
                continue
            files = meta.ListStageFiles(pb.StageKey(id=raw), timeout=10).files
            found[node.id] = {f.path for f in files}
    return found


def test_a_commit_whose_delete_answers_are_lost_on_every_try_still_makes_its_version(
    claim_cluster, tmp_path, monkeypatch
):
    """The second owner deletes the stage, but the answers of every try of that call are
    lost: the claim asks that owner again after the first pass, the node answers OK (it
    remembers the claimant), and the commit makes its one version."""
    (f,) = rank_files(tmp_path, 1)
    with connect(claim_cluster.url) as store:
        stage = store.stage("lost-answers", message="step 1")
        store.stage_add(stage.id, f)
        second = claim_cluster.map.owners(stage_key(bytes.fromhex(stage.id)))[1].id
        tries: list[bytes] = []

        def lose_every_answer_of_the_first_call(node_id: str, claimant: bytes, call):
            if node_id != second:
                return call()
            tries.append(claimant)
            answer = call()
            if len(tries) <= store.store.policy.attempts:
                raise _LostAnswer()
            return answer

        hook_delete_stage(monkeypatch, lose_every_answer_of_the_first_call)
        version = stage.commit(expect=1)
        monkeypatch.undo()
        assert len(tries) == store.store.policy.attempts + 1 and len(set(tries)) == 1
        assert [v.id for v in store.log("lost-answers")] == [version.id]
        assert holders(claim_cluster, stage.id) == {}


def test_a_commit_that_cannot_reach_an_owner_to_delete_puts_the_stage_back(
    claim_cluster, tmp_path, monkeypatch
):
    """The second owner cannot be reached for the deletes (down after the read): the claim
    is short of a majority, fails as unavailable naming that owner, and puts the stage back
    on the first owner, which it had deleted it from; a commit then makes the one version."""
    (f,) = rank_files(tmp_path, 1)
    with connect(claim_cluster.url) as store:
        stage = store.stage("unreachable", message="step 1")
        store.stage_add(stage.id, f)
        first, second = (n.id for n in claim_cluster.map.owners(stage_key(bytes.fromhex(stage.id))))
        deleted: list[str] = []

        def second_owner_down(node_id: str, claimant: bytes, call):
            if node_id == second:
                raise _Unreachable()
            deleted.append(node_id)
            return call()

        hook_delete_stage(monkeypatch, second_owner_down)
        with pytest.raises(StoreUnavailable) as info:
            stage.commit(expect=1)
        monkeypatch.undo()
        assert deleted == [first]
        message = str(info.value)
        assert f"claim stage {stage.id}: 1 of its 2 owners gave it to this caller" in message
        assert "put back on 2 of the 2 owners" in message and f"node {second}" in message
        assert "\n" not in message
        assert holders(claim_cluster, stage.id) == {first: {f.name}, second: {f.name}}
        assert "unreachable" not in store.store.list_repos()
        with connect(claim_cluster.url) as again:  # no wait for the reconnect backoff
            version = again.open_stage(stage.id).commit(expect=1)
            assert [v.id for v in again.log("unreachable")] == [version.id]
        assert holders(claim_cluster, stage.id) == {}


def wait_for_repair_passes(cluster: LocalCluster, *node_ids: str, passes: int = 3) -> None:
    """Wait until each of the nodes has completed ``passes`` more repair passes."""

    def done(node_id: str) -> float:
        url = cluster.metrics_url(node_id)
        return metric(url, "chunkstore_reconcile_passes_total", result="complete")

    firsts = {n: done(n) for n in node_ids}
    wait_until(
        lambda: all(done(n) >= first + passes for n, first in firsts.items()),
        30,
        f"{passes} repair passes on {', '.join(node_ids)}",
    )


Staged = tuple[LocalCluster, Repository, staging.Stage, Path]


def one_file_stage(tmp_path: Path, **cluster: int) -> Iterator[Staged]:
    """A stage of one file on a 3-node cluster (``cluster``: its replicas and write quorum)
    with repair passes every 0.5 s: the cluster, a client, the stage and the file."""
    (f,) = rank_files(tmp_path, 1)
    nodes = ["--reconcile-interval", "0.5"]
    with (
        LocalCluster(tmp_path / "c", nodes=3, node_args=nodes, **cluster) as c,
        connect(c.url) as store,
    ):
        stage = store.stage("m", message="step 1")
        store.stage_add(stage.id, f)
        yield c, store, stage, f


@pytest.fixture
def staged_on_three(tmp_path) -> Iterator[Staged]:
    """:func:`one_file_stage` with 3 replicas, write quorum 2."""
    yield from one_file_stage(tmp_path, replicas=3, write_quorum=2)


@pytest.mark.parametrize("end", ["commit", "abort"])
def test_a_stage_ended_while_an_owner_was_down_is_dropped_by_that_owner(staged_on_three, end):
    """The owner that was down at the commit (or abort) still holds the stage when it comes
    back. Its repair offers that copy to the other owners, which refuse it: they remember the
    claim (an abort leaves the same note) until an hour after the stage expires. Refused by
    every other owner, the copy could never be committed, so the node drops it, and says so
    once. The stage is not committed again, nor brought back."""
    c, store, stage, _ = staged_on_three
    c.kill("n3")
    version = stage.commit(expect=1) if end == "commit" else stage.abort()
    c.start("n3")
    wait_for_repair_passes(c, "n3")
    assert holders(c, stage.id) == {}
    with connect(c.url) as again, pytest.raises(NotFound, match="committed, aborted or"):
        again.open_stage(stage.id)
    if end == "abort":
        assert "m" not in store.store.list_repos()
    else:
        assert [v.id for v in store.log("m")] == [version.id]
    said = [line for line in c.log("n3").splitlines() if stage.id in line]
    assert len(said) == 1, said
    assert "dropped its copy" in said[0] and "WARNING" not in said[0]


def test_a_stage_one_owner_refuses_as_claimed_is_kept_by_the_others(staged_on_three):
    """One owner remembers a claim of the stage (a commit that lost a race and could not put
    it back there), the two others still hold it. Their repair offers it to that owner, which
    refuses it; they keep their copies and say so once each at most, and a commit by their
    majority makes the version."""
    c, store, stage, f = staged_on_three
    with grpc.insecure_channel(c.address("n1")) as channel:
        meta = pb_grpc.MetaServiceStub(channel)
        request = pb.DeleteStageRequest(id=bytes.fromhex(stage.id), claimant=os.urandom(16))
        meta.DeleteStage(request, timeout=10)
    wait_for_repair_passes(c, "n2", "n3")
    assert holders(c, stage.id) == {"n2": {f.name}, "n3": {f.name}}
    said = {n: [line for line in c.log(n).splitlines() if stage.id in line] for n in ("n2", "n3")}
    assert 1 <= sum(map(len, said.values())) <= 2, said  # by the one or both that offer it
    assert all(len(lines) <= 1 for lines in said.values()), said
    assert all("refuses this node's copy" in line for lines in said.values() for line in lines)
    version = stage.commit(expect=1)
    assert [v.id for v in store.log("m")] == [version.id]
    assert holders(c, stage.id) == {}


@pytest.fixture
def staged_on_two(tmp_path) -> Iterator[Staged]:
    """:func:`one_file_stage` with 2 replicas."""
    yield from one_file_stage(tmp_path, replicas=2)


def check_copied_back_and_committable(c: LocalCluster, stage: staging.Stage, f: Path) -> None:
    """The first of the stage's two owners, which was down, is started: the second's repair
    copies the stage back to it, and a commit makes the one version."""
    first, second = (n.id for n in c.map.owners(stage_key(bytes.fromhex(stage.id))))
    c.start(first)
    wait_for_repair_passes(c, second)
    assert holders(c, stage.id) == {first: {f.name}, second: {f.name}}
    with connect(c.url) as again:  # no wait for the reconnect backoff
        version = again.open_stage(stage.id).commit(expect=1)
        assert [v.id for v in again.log("m")] == [version.id]


def test_a_commit_that_loses_and_cannot_put_the_stage_back_releases_its_claim(
    staged_on_two, monkeypatch
):
    """With 2 replicas, X deletes the stage on the first owner, then finds it taken on the
    second by Y; the first owner is down before X can put the stage back there, so its note
    of X's delete would refuse every other copy until an hour after the stage expires, and the
    stage could never be committed. X releases its claim on the second owner instead. Y puts
    the stage back there; once the first owner is back, the second's repair hands it the
    release with its copy, the first accepts it, and a commit makes the one version."""
    c, store, stage, f = staged_on_two
    raw = bytes.fromhex(stage.id)
    first, second = (n.id for n in c.map.owners(stage_key(raw)))
    y = os.urandom(16)
    with grpc.insecure_channel(c.address(second)) as channel:
        meta = pb_grpc.MetaServiceStub(channel)
        record = meta.GetStage(pb.StageKey(id=raw), timeout=10).data
        files = meta.ListStageFiles(pb.StageKey(id=raw), timeout=10).files

        def y_takes_the_second_owner(node_id: str, claimant: bytes, call):
            if node_id == second:
                meta.DeleteStage(pb.DeleteStageRequest(id=raw, claimant=y), timeout=10)
                c.kill(first)  # before X can put the stage back there
            return call()

        hook_delete_stage(monkeypatch, y_takes_the_second_owner)
        with pytest.raises(NotFound) as info:
            stage.commit(expect=1)
        monkeypatch.undo()
        message = str(info.value)
        assert f"put back on 0 of the 1 owners it deleted it from (not on {first})" in message
        assert "claim released on 1 of its 2 owners" in message, message
        restore = pb.RestoreStageRequest(id=raw, claimant=y, data=record, files=files)
        meta.RestoreStage(restore, timeout=10)  # Y's commit failed too: Y puts it back
    check_copied_back_and_committable(c, stage, f)


def test_a_commit_that_cannot_put_back_a_stage_it_claimed_releases_its_claim(
    staged_on_two, monkeypatch
):
    """The commit claims the stage on both owners, then its version cannot be written and the
    first owner is down when the commit puts the stage back: it is back on the second only,
    and the claim is released there. Once the first owner is back, the second's repair copies
    the stage to it with the release, and a commit makes the one version."""
    c, store, stage, f = staged_on_two
    first = c.map.owners(stage_key(bytes.fromhex(stage.id)))[0].id

    def first_owner_lost(*args, **kwargs):
        c.kill(first)
        raise StoreUnavailable("the version could not be written")

    with monkeypatch.context() as m:
        m.setattr(store, "commit_version", first_owner_lost)
        with pytest.raises(StoreUnavailable) as info:
            stage.commit(expect=1)
    assert "claim released on 1 of its 2 owners" in str(info.value), info.value
    check_copied_back_and_committable(c, stage, f)


def test_a_claim_released_through_the_cluster_client_lets_the_stage_be_put_again(
    claim_cluster, tmp_path
):
    (f,) = rank_files(tmp_path, 1)
    with connect(claim_cluster.url) as store:
        stage = store.stage("released", message="step 1")
        store.stage_add(stage.id, f)
        raw, mine = bytes.fromhex(stage.id), os.urandom(16)
        record = store.store.get_stage(raw)
        store.store.delete_stage(raw, mine)
        with pytest.raises(NotFound):
            store.store.put_stage(raw, record)  # every owner notes the delete
        with pytest.raises(InvalidInput, match="has 16 bytes, got 3"):
            store.store.release_claim(raw, b"abc", record)
        store.store.release_claim(raw, mine, record)
        store.store.put_stage(raw, record)
        assert store.store.get_stage(raw) == record
        store.store.delete_stage(raw)


def test_racing_commits_that_split_the_owners_both_fail_and_put_the_stage_back(
    claim_cluster, tmp_path, monkeypatch
):
    """Two processes commit one stage; both read it on both owners. One (X) deletes it on the
    first owner; the other (Y) cannot reach that owner, deletes it on the second, and asks
    the first again: X has it. X finds the second owner taken by Y. Neither holds a majority:
    both fail, and both put the stage back where they deleted it, so a later commit makes
    the one version (without the put-backs the stage would be gone for good)."""
    (f,) = rank_files(tmp_path, 1)
    with connect(claim_cluster.url) as a, connect(claim_cluster.url) as b:
        stage = a.stage("split", message="step 1")
        a.stage_add(stage.id, f)
        first, second = (n.id for n in claim_cluster.map.owners(stage_key(bytes.fromhex(stage.id))))
        order: list[bytes] = []  # claimants in the order they reached the first owner
        y_came, x_deleted, y_deleted, y_asked_again = (threading.Event() for _ in range(4))

        def split(node_id: str, claimant: bytes, call):
            if node_id == first:
                if not order:
                    order.append(claimant)
                    assert y_came.wait(30)  # both have read the stage before any delete
                    answer = call()
                    x_deleted.set()
                    return answer
                if claimant == order[0]:
                    return call()
                if not y_deleted.is_set():  # Y, first pass: the owner is unreachable
                    if not y_came.is_set():
                        order.append(claimant)
                        y_came.set()
                        assert x_deleted.wait(30)
                    raise _Unreachable()
                try:  # Y asks again, after it deleted the stage on the second owner
                    return call()
                finally:
                    y_asked_again.set()
            if claimant == order[0]:  # X on the second owner: after Y, and X waits for Y
                assert y_deleted.wait(30)
                try:
                    return call()
                finally:
                    assert y_asked_again.wait(30)
            answer = call()
            y_deleted.set()
            return answer

        hook_delete_stage(monkeypatch, split)
        failures: dict[str, BaseException] = {}

        def commit(name: str, store) -> None:
            try:
                store.open_stage(stage.id).commit(expect=1)
            except BaseException as e:  # checked below
                failures[name] = e

        threads = [threading.Thread(target=commit, args=p) for p in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        monkeypatch.undo()
        assert len(order) == 2 and order[0] != order[1]
        assert sorted(failures) == ["a", "b"], failures
        assert holders(claim_cluster, stage.id) == {first: {f.name}, second: {f.name}}
        for e in failures.values():
            assert isinstance(e, NotFound) and "nothing was committed here" in str(e), e
            assert "1 of its 2 owners gave it to this caller" in str(e)
            assert "says another caller claimed it first" in str(e)
        assert "split" not in a.store.list_repos()
        with connect(claim_cluster.url) as again:
            version = again.open_stage(stage.id).commit(expect=1)
            assert [v.id for v in again.log("split")] == [version.id]
        assert holders(claim_cluster, stage.id) == {}


def test_a_commit_that_loses_a_race_after_its_checks_commits_nothing(repo: Repository, tmp_path):
    stage = repo.stage("m")
    stage.add(write(tmp_path / "a.bin", random_bytes(MB)))
    other = repo.open_stage(stage.id)  # another process's handle
    checks = stage._check_durable
    stage._check_durable = lambda entries: (checks(entries), other.commit())  # type: ignore[method-assign]
    with pytest.raises(NotFound, match="committed, aborted or expired meanwhile"):
        stage.commit()
    assert len(repo.log("m")) == 1


def test_a_file_staged_during_a_commit_makes_it_refuse_and_keep_the_stage(
    repo: Repository, tmp_path
):
    stage = repo.stage("m")
    stage.add(write(tmp_path / "a" / "a.bin", random_bytes(MB, seed=1)))
    late = write(tmp_path / "b" / "b.bin", random_bytes(MB, seed=2))
    checks = stage._check_durable
    stage._check_durable = lambda entries: (checks(entries), repo.stage_add(stage.id, late))  # type: ignore[method-assign]
    with pytest.raises(InvalidInput, match="changed while it was being committed"):
        stage.commit()
    assert repo.store.list_repos() == []
    stage._check_durable = checks  # type: ignore[method-assign]
    assert sorted(f.path for f in stage.commit().files) == ["a.bin", "b.bin"]


def test_a_commit_whose_version_fails_keeps_the_stage(repo: Repository, tmp_path, monkeypatch):
    stage = repo.stage("m", tags=["t"])
    stage.add(write(tmp_path / "a.bin", random_bytes(MB)))

    def fail(*args, **kwargs):
        raise StoreFull("store is full")

    with monkeypatch.context() as m:
        m.setattr(repo, "commit_version", fail)
        with pytest.raises(StoreFull):
            stage.commit()
    assert repo.store.list_repos() == [] and [e.path for e, _ in stage.files()] == ["a.bin"]
    version = stage.commit()
    assert version.tags == ["t"] and repo.resolve("m@t").id == version.id


def test_commit_refuses_a_partial_checkpoint(repo: Repository, tmp_path):
    stage = repo.stage("m")
    for r in (0, 1, 3):  # rank 2 died
        stage.add(write(tmp_path / f"s{r}.bin", random_bytes(MB, seed=r)), as_path=f"model-{r}.bin")
    with pytest.raises(InvalidInput) as error:
        stage.commit(expect=4)
    assert str(error.value) == (
        f"stage {stage.id} holds 3 files, 4 expected: 1 missing (staged: model-0.bin, "
        "model-1.bin, model-3.bin); nothing was committed"
    )
    with pytest.raises(InvalidInput) as error:
        stage.commit(expect=[f"model-{r}.bin" for r in range(4)])
    assert str(error.value) == (
        f"stage {stage.id} holds 3 of 4 expected files (1 missing: model-2.bin); "
        "nothing was committed"
    )
    with pytest.raises(InvalidInput, match="not expected: model-3.bin"):
        stage.commit(expect=["model-0.bin", "model-1.bin"])
    for bad in (0, "model-0.bin"):
        with pytest.raises(InvalidInput, match="invalid expect"):
            stage.commit(expect=bad)  # type: ignore[arg-type]
    assert repo.store.list_repos() == []  # nothing committed, the stage still open
    stage.add(write(tmp_path / "s2.bin", random_bytes(MB, seed=2)), as_path="model-2.bin")
    assert len(stage.commit(expect=4).files) == 4


def test_abort_and_bad_ids(repo: Repository, tmp_path):
    f = write(tmp_path / "a.bin", random_bytes(MB))
    stage = repo.stage("m")
    repo.stage_add(stage.id, f)
    stage.abort()
    with pytest.raises(NotFound):
        repo.stage_add(stage.id, f)
    for after in (stage.commit, stage.abort):
        with pytest.raises(NotFound) as error:
            after()
        assert str(error.value) == f"no stage {stage.id} (committed, aborted or expired)"
    with pytest.raises(InvalidInput, match="invalid stage id"):
        repo.open_stage("xyz")
    with pytest.raises(InvalidInput, match="no files"):
        repo.stage("m").commit()
    with pytest.raises(InvalidInput):
        repo.stage("bad repo name")
    with pytest.raises(NotFound):
        repo.stage_add(repo.stage("m").id, tmp_path / "missing.bin")
    assert repo.store.list_repos() == []


def test_same_path_twice_keeps_the_last(repo: Repository, tmp_path):
    stage = repo.stage("m")
    stage.add(write(tmp_path / "a" / "w.bin", b"first"))
    stage.add(write(tmp_path / "b" / "w.bin", b"second"))
    version = stage.commit()
    repo.pull(version.ref, tmp_path / "out")
    assert (tmp_path / "out" / "w.bin").read_bytes() == b"second"


class _Clock:
    """The ``time`` module as staging sees it, with a clock that can be moved ahead."""

    def __init__(self) -> None:
        self.ahead_ns = 0

    def __getattr__(self, name: str):
        return getattr(time, name)

    def time_ns(self) -> int:
        return time.time_ns() + self.ahead_ns


def test_gc_keeps_open_stages_and_drops_expired_ones(repo: Repository, tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(staging, "time", clock)
    kept = repo.stage("m")
    kept.add(write(tmp_path / "k" / "keep.bin", random_bytes(MB, seed=1)))
    doomed = repo.stage("m", ttl_seconds=60)  # however long the add takes on a busy machine
    doomed.add(write(tmp_path / "d" / "drop.bin", random_bytes(MB, seed=2)))
    clock.ahead_ns = 61 * 10**9  # a minute later: doomed has expired, kept has not
    with pytest.raises(InvalidInput, match="expired"):
        doomed.commit()
    dry = repo.gc(grace_seconds=0, dry_run=True)
    assert dry.expired_stages == 1 and dry.deleted_chunks > 0
    repo.open_stage(doomed.id)  # a dry run drops no stage either
    result = repo.gc(grace_seconds=0)
    assert result.expired_stages == 1 and result.deleted_chunks == dry.deleted_chunks
    with pytest.raises(NotFound):
        repo.open_stage(doomed.id)
    version = kept.commit()  # its chunks survived the sweep
    repo.pull(version.ref, tmp_path / "out")
    assert (tmp_path / "out" / "keep.bin").read_bytes() == (
        tmp_path / "k" / "keep.bin"
    ).read_bytes()


def test_commit_refuses_when_staged_chunks_are_gone(repo: Repository, tmp_path):
    stage = repo.stage("m")
    stage.add(write(tmp_path / "w.bin", random_bytes(MB, seed=3)))
    repo.store.delete([info.id for info in repo.store.scan()][:1])
    with pytest.raises(NotFound, match="chunks are gone"):
        stage.commit()
    assert repo.store.list_repos() == []
