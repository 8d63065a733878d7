"""Scrub on real node processes: a byte flipped inside a stored chunk (written straight into a
stopped node's LMDB) is found by the node's background re-verification, the chunk is replaced
with a good copy from another owner, and the metrics count both."""

from __future__ import annotations

from pathlib import Path

from cluster_checks import metric, stub, wait_until
from cluster_fixtures import LocalCluster
from conftest import random_bytes, write

from chunkstore import codec
from chunkstore.client.cluster_store import ClusterStore
from chunkstore.repository import Repository
from chunkstore.server.background import parse_rate
from chunkstore.stores.lmdb_store import LmdbStore
from chunkstore.v1 import store_pb2 as pb

SCRUB = ["--scrub-interval", "0.2", "--scrub-rate", "64M", "--reconcile-interval", "3600"]


def stored_blob(address: str, cid: bytes) -> bytes:
    channel, chunks, _, _ = stub(address)
    with channel:
        (batch,) = list(chunks.GetChunks(pb.ChunkIds(ids=[cid]), timeout=10))
    return batch.chunks[0].blob


def flip_a_byte(data_dir: Path, cid: bytes) -> bytes:
    """Flip one byte in the middle of a stored chunk's blob; return the bad blob."""
    with LmdbStore(data_dir, create=False) as shard:
        ((_, blob),) = list(shard.get([cid]))
        bad = bytearray(blob)
        bad[len(bad) // 2] ^= 0x01
        assert shard.delete([cid]) == 1
        shard.put([(cid, bytes(bad))])
    return bytes(bad)


def test_scrub_replaces_a_corrupt_chunk_with_a_good_replica(tmp_path: Path):
    data = random_bytes(3 << 20, seed=21)
    write(tmp_path / "ckpt" / "w.bin", data)
    with LocalCluster(tmp_path / "c", nodes=3, replicas=2, node_args=SCRUB) as cluster:
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            version = repo.push(tmp_path / "ckpt", "m").version
            cids = [cid for cid, _ in repo.manifest(version.files[0]).chunks]
        cid = cids[len(cids) // 2]
        victim = cluster.map.owners(cid)[0].id
        url = cluster.metrics_url(victim)
        good = stored_blob(cluster.address(victim), cid)
        wait_until(lambda: metric(url, "chunkstore_scrub_chunks_total") >= 1, 20, "a first sweep")

        cluster.stop(victim)
        bad = flip_a_byte(cluster.node_data(victim), cid)
        cluster.start(victim)
        assert bad != good

        wait_until(lambda: metric(url, "chunkstore_scrub_repaired_total") >= 1, 30, "the repair")
        assert metric(url, "chunkstore_scrub_errors_total") == 1
        assert metric(url, "chunkstore_scrub_chunks_total") >= len(cids) / 2
        assert stored_blob(cluster.address(victim), cid) == good
        assert codec.decode_verified(cid, good)
        assert "scrub: chunk" in cluster.log(victim)
        for other in {n.id for n in cluster.map.nodes} - {victim}:
            assert metric(cluster.metrics_url(other), "chunkstore_scrub_errors_total") == 0
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            assert repo.verify().ok


def test_rates_parse():
    assert parse_rate("64M") == 64 << 20
    assert parse_rate("512k") == 512 << 10
    assert parse_rate("1.5G") == 1.5 * (1 << 30)
    assert parse_rate("1000") == 1000
    assert parse_rate("0") == 0
