"""Multi-rank checkpoint save: several processes fill one stage, one commits a single version."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_fixtures import LocalCluster
from conftest import random_bytes, tree_bytes, write

from chunkstore.connect import connect
from chunkstore.errors import InvalidInput, NotFound
from chunkstore.repository import Repository

MB = 1 << 20
RANK_SCRIPT = """
import sys, chunkstore
store = chunkstore.connect(sys.argv[1])
store.stage_add(sys.argv[2], sys.argv[3], as_path=sys.argv[4])
store.close()
"""


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


def test_four_ranks_on_the_embedded_store(tmp_path):
    check_four_ranks(str(tmp_path / "store"), tmp_path)


def test_four_ranks_on_a_cluster(tmp_path):
    with LocalCluster(tmp_path / "cluster", nodes=3, replicas=2) as cluster:
        check_four_ranks(cluster.url, tmp_path)


def test_abort_and_bad_ids(repo: Repository, tmp_path):
    f = write(tmp_path / "a.bin", random_bytes(MB))
    stage = repo.stage("m")
    repo.stage_add(stage.id, f)
    stage.abort()
    with pytest.raises(NotFound):
        repo.stage_add(stage.id, f)
    with pytest.raises(NotFound):
        stage.commit()
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


def test_gc_keeps_open_stages_and_drops_expired_ones(repo: Repository, tmp_path):
    kept = repo.stage("m")
    kept.add(write(tmp_path / "k" / "keep.bin", random_bytes(MB, seed=1)))
    doomed = repo.stage("m", ttl_seconds=0.5)  # long enough for the add on a busy machine
    doomed.add(write(tmp_path / "d" / "drop.bin", random_bytes(MB, seed=2)))
    time.sleep(0.6)
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
