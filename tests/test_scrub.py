"""Scrub on real node processes: a byte flipped inside a stored chunk (written straight into a
stopped node's LMDB) is found by the node's background re-verification, the chunk is replaced
with a good copy from another owner, and the metrics count both."""

from __future__ import annotations

from pathlib import Path

from cluster_checks import metric, stub, wait_until
from cluster_fixtures import LocalCluster
from conftest import random_bytes, write

from chunkstore import codec, ids
from chunkstore.client.cluster_store import ClusterStore, repo_key
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


def test_scrub_replaces_damaged_records_with_intact_copies(tmp_path: Path):
    """A manifest and a version record damaged on one owner are found once the chunks are
    verified and replaced by the other owner's intact copies; a manifest damaged on every
    owner is counted and kept (readers name it)."""
    write(tmp_path / "ckpt" / "a.bin", random_bytes(200_000, seed=22))
    write(tmp_path / "ckpt" / "b.bin", random_bytes(200_000, seed=23))
    with LocalCluster(tmp_path / "c", nodes=3, replicas=2, node_args=SCRUB) as cluster:
        with Repository(ClusterStore.connect(cluster.url)) as repo:
            version = repo.push(tmp_path / "ckpt", "m").version
        mended, lost = (f.manifest_id for f in version.files)
        damage: dict[str, list] = {n.id: [] for n in cluster.map.nodes}  # what, where
        damage[cluster.map.owners(mended)[0].id].append(("manifest", mended))
        for owner in cluster.map.owners(lost):
            damage[owner.id].append(("manifest", lost))
        damage[cluster.map.owners(repo_key("m"))[0].id].append(("version", version.id))
        for node_id in damage:  # all at once: no owner mends another before it is damaged
            cluster.stop(node_id)
        for node_id, records in damage.items():
            with LmdbStore(cluster.node_data(node_id), create=False) as shard:
                for kind, record_id in records:
                    if kind == "manifest":
                        shard.delete_manifests([record_id])
                        shard.put_manifest(record_id, b"damaged manifest")
                    else:
                        shard.delete_version("m", record_id)
                        shard.put_version("m", record_id, b"damaged version")
        for node_id in damage:
            cluster.start(node_id)

        def repaired(node_id: str, kind: str) -> float:
            url = cluster.metrics_url(node_id)
            return metric(url, "chunkstore_scrub_records_repaired_total", kind=kind)

        for node_id, records in damage.items():
            kinds = {kind for kind, record_id in records if record_id != lost}
            for kind in kinds:
                wait_until(
                    lambda n=node_id, k=kind: repaired(n, k) >= 1, 30, f"{kind} on {node_id}"
                )
        for owner in cluster.map.owners(lost):
            url = cluster.metrics_url(owner.id)
            wait_until(
                lambda u=url: (
                    metric(u, "chunkstore_scrub_record_errors_total", kind="manifest") >= 1
                ),
                30,
                "the damaged manifest found",
            )
            wait_until(
                lambda o=owner.id: "no other owner has an intact copy" in cluster.log(o),
                30,
                "the damaged manifest kept",
            )

        channel, _, meta, _ = stub(cluster.address(cluster.map.owners(mended)[0].id))
        with channel:
            parts = meta.GetManifestParts(pb.ChunkIds(ids=[mended]), timeout=10)
            assert ids.record_id(b"".join(p.data for p in parts)) == mended
        channel, _, meta, _ = stub(cluster.address(cluster.map.owners(repo_key("m"))[0].id))
        with channel:
            record = meta.GetVersion(pb.VersionKey(repo="m", id=version.id), timeout=10)
            assert ids.record_id(record.data) == version.id


def test_rates_parse():
    assert parse_rate("64M") == 64 << 20
    assert parse_rate("512k") == 512 << 10
    assert parse_rate("1.5G") == 1.5 * (1 << 30)
    assert parse_rate("1000") == 1000
    assert parse_rate("0") == 0
