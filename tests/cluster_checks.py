"""Checks on a running cluster for the membership, repair and scrub tests: who holds what
(asked without marking anything wanted), waiting for the cluster to settle, metrics, the CLI.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from chunkstore.client.cli import main as cli_main
from chunkstore.client.cluster_store import repo_key
from chunkstore.cluster_map import ClusterMap, map_from_proto
from chunkstore.repository import Repository
from chunkstore.server import local_cluster
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc

#: Node options that make background work quick enough for tests.
FAST = ["--reconcile-interval", "1", "--map-refresh", "0.5"]


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """The first true value of ``check()``; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def status(addresses: Sequence[str]) -> dict[str, Any]:
    return local_cluster.cluster_status(list(addresses))


def wait_settled(addresses: Sequence[str], epoch: int, timeout: float = 60.0) -> dict[str, Any]:
    """The cluster status once every node of map ``epoch`` is healthy and done rebalancing."""

    def settled() -> dict[str, Any] | None:
        s = status(addresses)
        done = (
            s["epoch"] == epoch
            and not s["rebalancing"]
            and all(n["healthy"] and n["epoch"] == epoch for n in s["nodes"])
        )
        return s if done else None

    return wait_until(settled, timeout, f"the cluster to settle under map epoch {epoch}")


def stub(address: str) -> tuple[grpc.Channel, Any, Any, Any]:
    channel = grpc.insecure_channel(address)
    return (
        channel,
        pb_grpc.ChunkServiceStub(channel),
        pb_grpc.MetaServiceStub(channel),
        pb_grpc.ClusterServiceStub(channel),
    )


def served_map(address: str) -> ClusterMap:
    channel, _, _, cluster = stub(address)
    with channel:
        return map_from_proto(cluster.GetClusterMap(pb.Empty(), timeout=10))


def node_status(address: str) -> pb.NodeStatus:
    channel, _, _, cluster = stub(address)
    with channel:
        return cluster.GetNodeStatus(pb.Empty(), timeout=10)


def chunks_held(address: str, ids: Sequence[bytes]) -> set[bytes]:
    """The chunks among ``ids`` the node holds (Holds: marks nothing wanted)."""
    channel, chunks, _, _ = stub(address)
    with channel:
        return set(chunks.Holds(pb.ChunkIds(ids=list(ids)), timeout=30).ids)


def all_chunks(address: str) -> list[bytes]:
    channel, chunks, _, _ = stub(address)
    with channel:
        stream = chunks.ScanChunks(pb.ScanChunksRequest(), timeout=30)
        return [c.id for batch in stream for c in batch.chunks]


def manifests_held(address: str, ids: Sequence[bytes]) -> set[bytes]:
    channel, _, meta, _ = stub(address)
    with channel:
        return set(meta.HasManifests(pb.ChunkIds(ids=list(ids)), timeout=30).ids)


def versions_and_tags(address: str, repo: str) -> tuple[set[bytes], dict[str, bytes]]:
    channel, _, meta, _ = stub(address)
    with channel:
        versions = meta.ListVersions(pb.RepoName(repo=repo), timeout=30).versions
        tags = meta.ListTags(pb.RepoName(repo=repo), timeout=30).tags
    return {v.id for v in versions}, {t.tag: t.version_id for t in tags}


def repo_contents(repo: Repository, name: str) -> tuple[list[bytes], list[bytes]]:
    """The chunk ids and manifest ids of every version of ``name``."""
    chunk_ids: dict[bytes, None] = {}
    manifest_ids: dict[bytes, None] = {}
    for version in repo.log(name):
        for f in version.files:
            manifest_ids[f.manifest_id] = None
            for cid, _ in repo.manifest(f).chunks:
                chunk_ids[cid] = None
    return list(chunk_ids), list(manifest_ids)


def placement_gaps(
    cluster: ClusterMap,
    addresses: dict[str, str],
    repo: Repository,
    name: str,
    exact: bool = False,
) -> list[str]:
    """Every way in which the chunks, manifests, versions and tags of repo ``name`` are not on
    all their owners (with ``exact``, also copies on nodes that do not own them); [] if none."""
    chunk_ids, manifest_ids = repo_contents(repo, name)
    versions = {v.id for v in repo.log(name)}
    tags = {tag: v.id for v in repo.log(name) for tag in v.tags}
    gaps = []
    rows = cluster.ring().owners_many(chunk_ids, cluster.replicas)
    for node_id, address in addresses.items():
        held = chunks_held(address, chunk_ids)
        owned = {cid for cid, row in zip(chunk_ids, rows, strict=True) if node_id in row}
        if owned - held:
            gaps.append(f"{node_id} lacks {len(owned - held)} of its {len(owned)} chunks")
        if exact and held - owned:
            gaps.append(f"{node_id} holds {len(held - owned)} chunks it does not own")
        owned_m = {m for m in manifest_ids if node_id in {o.id for o in cluster.owners(m)}}
        if owned_m - manifests_held(address, manifest_ids):
            gaps.append(f"{node_id} lacks manifests")
        if node_id in {o.id for o in cluster.owners(repo_key(name))}:
            have, have_tags = versions_and_tags(address, name)
            if versions - have:
                gaps.append(f"{node_id} lacks {len(versions - have)} versions")
            if have_tags != tags:
                gaps.append(f"{node_id} has tags {sorted(have_tags)} not {sorted(tags)}")
    return gaps


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample of a node's /metrics (0 if absent)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``chunkstore ARGV`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def wipe(directory: Path) -> None:
    """Empty a (stopped) node's data directory, as a replaced disk would be."""
    for path in directory.iterdir():
        path.unlink()
