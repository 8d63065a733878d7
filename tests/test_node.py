"""One storage node as clients and operators see it: a real process on a loopback port.

Most tests share one node (module scope) and use fresh random chunks, so they do not depend on
each other; the SIGTERM test runs last and restarts the node it stopped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
import test_stores
from cluster_fixtures import cluster_fixture, write_cluster_file
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from chunkstore import codec, ids
from chunkstore.cluster_map import ClusterMap, NodeSpec
from chunkstore.errors import StoreFull
from chunkstore.server.metrics import NodeMetrics
from chunkstore.server.node import NodeServer
from chunkstore.stores.lmdb_store import LmdbStore
from chunkstore.v1 import model_pb2
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc

MiB = 1 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 32 * MiB),
    ("grpc.max_receive_message_length", 32 * MiB),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

node = cluster_fixture(nodes=1)


@pytest.fixture(scope="module")
def channel(node):
    with grpc.insecure_channel(node.address("n1"), options=CHANNEL_OPTIONS) as ch:
        yield ch


@pytest.fixture
def chunks_api(channel) -> pb_grpc.ChunkServiceStub:
    return pb_grpc.ChunkServiceStub(channel)


@pytest.fixture
def meta_api(channel) -> pb_grpc.MetaServiceStub:
    return pb_grpc.MetaServiceStub(channel)


def make_chunks(n: int, size: int = 8192) -> list[tuple[bytes, bytes]]:
    """``n`` new (id, blob) pairs; odd ones compress (zstd/planes), even ones are stored raw."""
    out = []
    for i in range(n):
        raw = os.urandom(size) if i % 2 == 0 else os.urandom(16) * (size // 16)
        out.append((ids.chunk_id(raw), codec.encode(raw)))
    return out


def batch(seq: int, pairs: list[tuple[bytes, bytes]]) -> pb.PutChunksBatch:
    return pb.PutChunksBatch(seq=seq, chunks=[pb.EncodedChunk(id=c, blob=b) for c, b in pairs])


def put(api: pb_grpc.ChunkServiceStub, *batches: list[tuple[bytes, bytes]]) -> list:
    requests = [batch(seq, pairs) for seq, pairs in enumerate(batches, start=1)]
    return list(api.PutChunks(iter(requests), timeout=30))


def get(api: pb_grpc.ChunkServiceStub, chunk_ids: list[bytes]) -> dict[bytes, bytes]:
    return {
        c.id: c.blob
        for b in api.GetChunks(pb.ChunkIds(ids=chunk_ids), timeout=30)
        for c in b.chunks
    }


def missing(api: pb_grpc.ChunkServiceStub, chunk_ids: list[bytes]) -> list[bytes]:
    return list(api.Missing(pb.ChunkIds(ids=chunk_ids), timeout=30).ids)


# startup: one clear line and a non-zero exit for every bad start


def run_node(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chunkstore.server.node", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_error_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chunkstore node: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0]
    assert result.stdout == ""


NODES = '[[nodes]]\nid = "n1"\naddress = "127.0.0.1:7401"\n'
OTHER = '[[nodes]]\nid = "n2"\naddress = "127.0.0.1:7402"\n'


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (NODES + NODES.replace("7401", "7402"), "duplicate node id 'n1'"),
        ("replica = 2\n" + NODES, "unknown key 'replica'"),
        ("replicas = 3\n" + NODES + OTHER, "replicas = 3 but there are only 2 nodes"),
    ],
    ids=["duplicate-id", "unknown-key", "replicas-above-nodes"],
)
def test_bad_cluster_file_exits_2_with_one_line(tmp_path: Path, text: str, reason: str):
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    result = run_node("--id", "n1", "--cluster", str(path), "--data", str(tmp_path / "data"))
    assert result.returncode == 2
    assert_one_error_line(result, str(path), reason)
    assert not (tmp_path / "data").exists()


def test_id_not_in_map_exits_2_with_one_line(tmp_path: Path):
    path, _ = write_cluster_file(tmp_path, 2)
    result = run_node("--id", "n9", "--cluster", str(path), "--data", str(tmp_path / "data"))
    assert result.returncode == 2
    assert_one_error_line(result, "no node 'n9'", "n1, n2", "start it with --join grpc://SEED")


def test_unusable_data_dir_exits_with_one_line(tmp_path: Path):
    path, _ = write_cluster_file(tmp_path, 1)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "unrelated.txt").write_text("not a store")
    result = run_node("--id", "n1", "--cluster", str(path), "--data", str(tmp_path / "data"))
    assert result.returncode == 6
    assert_one_error_line(result, "cannot open store", "not empty")


def test_port_in_use_exits_with_one_line(tmp_path: Path):
    path, cluster = write_cluster_file(tmp_path, 1)
    host, port = cluster.node("n1").address.split(":")
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()
        result = run_node("--id", "n1", "--cluster", str(path), "--data", str(tmp_path / "d"))
    assert result.returncode == 1
    assert_one_error_line(result, f"cannot listen on {host}:{port}: address already in use")


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_bad_metrics_port_exits_2_before_anything_is_made(tmp_path: Path, port: str):
    path, _ = write_cluster_file(tmp_path, 1)
    data = tmp_path / "d"
    argv = ["--id", "n1", "--cluster", str(path), "--data", str(data), "--metrics-port", port]
    result = run_node(*argv)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        f"chunkstore node: error: argument --metrics-port: bad port {port!r}: want 0-65535"
    )
    assert not data.exists()


# health, reflection, cluster service


def test_health_serving_through_standard_client(channel):
    api = health_pb2_grpc.HealthStub(channel)
    for service in ("", "chunkstore.v1.ChunkService", "chunkstore.v1.MetaService"):
        reply = api.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == SERVING
    with pytest.raises(grpc.RpcError) as err:
        api.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_services(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    assert set(db.get_services()) >= {
        "chunkstore.v1.ChunkService",
        "chunkstore.v1.MetaService",
        "chunkstore.v1.ClusterService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    described = db.FindFileContainingSymbol("chunkstore.v1.ChunkService")
    assert "PutChunks" in [m.name for m in described.service[0].method]


def test_cluster_map_and_node_status(node, channel):
    api = pb_grpc.ClusterServiceStub(channel)
    served = api.GetClusterMap(pb.Empty(), timeout=5)
    assert (served.epoch, served.replicas, served.write_quorum) == (1, 1, 1)
    assert [(n.id, n.address, n.weight) for n in served.nodes] == [("n1", node.address("n1"), 1.0)]
    status = api.GetNodeStatus(pb.Empty(), timeout=5)
    assert (status.id, status.epoch) == ("n1", 1)
    assert status.data_dir == str(node.node_data("n1"))
    assert 0 < status.map_used_bytes <= status.map_size_bytes
    totals = pb_grpc.ChunkServiceStub(channel).Totals(pb.Empty(), timeout=5)
    assert (status.chunks, status.stored_bytes) == (totals.chunks, totals.stored_bytes)


# chunks


def test_good_batches_are_acked_then_readable(chunks_api):
    first, second = make_chunks(4), make_chunks(3, size=100_000)
    acks = put(chunks_api, first, second)
    assert [(a.seq, a.added_bytes) for a in acks] == [
        (1, sum(len(b) for _, b in first)),
        (2, sum(len(b) for _, b in second)),
    ]
    assert get(chunks_api, [c for c, _ in first + second]) == dict(first + second)
    again = put(chunks_api, first)
    assert [(a.seq, a.added_bytes) for a in again] == [(1, 0)]


def test_get_streams_large_reads_in_several_messages(chunks_api):
    pairs = make_chunks(12, size=512 * 1024)  # 6 MiB, half of it compressible
    put(chunks_api, pairs[:6], pairs[6:])
    replies = list(chunks_api.GetChunks(pb.ChunkIds(ids=[c for c, _ in pairs]), timeout=30))
    assert len(replies) > 1
    assert {c.id: c.blob for r in replies for c in r.chunks} == dict(pairs)


def _mismatch(good: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    return good[0], codec.encode(os.urandom(64))


def _garbage(good: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    return good[0], b"\x07 no such codec"


def _truncated(good: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    return good[0], codec.encode_as(os.urandom(1000), codec.RAW)[:-1]


def _too_large(good: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    return good[0], bytes([codec.RAW]) + (17 * MiB).to_bytes(4, "little") + b"x"


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (_mismatch, "does not match its id"),
        (_garbage, "unknown codec id 7"),
        (_truncated, "raw payload has 999 bytes"),
        (_too_large, "too large"),
    ],
    ids=["mismatch", "garbage", "truncated", "too-large"],
)
def test_bad_chunk_fails_the_batch_and_stores_nothing_of_it(chunks_api, spoil, reason):
    earlier, pairs = make_chunks(2), make_chunks(5)
    pairs[3] = spoil(pairs[3])
    acks = []
    with pytest.raises(grpc.RpcError) as err:
        for ack in chunks_api.PutChunks(iter([batch(1, earlier), batch(2, pairs)]), timeout=30):
            acks.append(ack)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert pairs[3][0].hex() in err.value.details()
    assert reason in err.value.details()
    assert "batch 2" in err.value.details()
    assert [a.seq for a in acks] == [1]  # the batch before stays acknowledged and stored
    assert missing(chunks_api, [c for c, _ in earlier]) == []
    assert missing(chunks_api, [c for c, _ in pairs]) == [c for c, _ in pairs]


def test_batches_after_a_bad_one_are_not_stored(chunks_api):
    first, bad, after = make_chunks(2), make_chunks(2), make_chunks(3)
    bad[0] = _mismatch(bad[0])
    requests = [batch(1, first), batch(2, bad), batch(3, after)]
    acks = []
    with pytest.raises(grpc.RpcError) as err:
        for ack in chunks_api.PutChunks(iter(requests), timeout=30):
            acks.append(ack)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [a.seq for a in acks] == [1]
    assert missing(chunks_api, [c for c, _ in first]) == []
    assert missing(chunks_api, [c for c, _ in bad + after]) == [c for c, _ in bad + after]


def test_many_batches_in_one_stream_are_acked_in_order(chunks_api):
    batches = [make_chunks(3, size=50_000) for _ in range(20)]
    acks = put(chunks_api, *batches)
    assert [a.seq for a in acks] == list(range(1, 21))
    assert [a.added_bytes for a in acks] == [sum(len(b) for _, b in p) for p in batches]


def test_malformed_put_message_is_invalid_argument(channel):
    raw = channel.stream_stream(
        "/chunkstore.v1.ChunkService/PutChunks",
        request_serializer=None,
        response_deserializer=pb.PutChunksAck.FromString,
    )
    with pytest.raises(grpc.RpcError) as err:
        list(raw(iter([b"\x12\x05abc"]), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed PutChunks message" in err.value.details()


def test_chunk_id_of_wrong_length_is_invalid_argument(chunks_api):
    cid, blob = make_chunks(1)[0]
    with pytest.raises(grpc.RpcError) as err:
        put(chunks_api, [(cid[:31], blob)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "31 bytes" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        missing(chunks_api, [cid, b"short"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "id #1" in err.value.details()


def test_missing_answers_thousands_of_ids_in_one_call(chunks_api):
    stored = make_chunks(50, size=256)
    put(chunks_api, stored)
    absent = [os.urandom(32) for _ in range(5000)]
    asked = absent[:2500] + [c for c, _ in stored] + absent[2500:]
    assert missing(chunks_api, asked) == absent


def test_get_of_an_absent_chunk_is_not_found_naming_it(chunks_api):
    stored = make_chunks(2)
    put(chunks_api, stored)
    absent = os.urandom(32)
    with pytest.raises(grpc.RpcError) as err:
        get(chunks_api, [stored[0][0], absent, stored[1][0]])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert absent.hex() in err.value.details()


def test_scan_pages_after_an_id_and_delete(chunks_api):
    pairs = make_chunks(7, size=64)
    put(chunks_api, pairs)
    pages = list(chunks_api.ScanChunks(pb.ScanChunksRequest(limit=3), timeout=30))
    assert all(len(p.chunks) <= 3 for p in pages)
    listed = [c.id for p in pages for c in p.chunks]
    assert listed == sorted(listed)
    assert {c for c, _ in pairs} <= set(listed)
    sizes = {c.id: c.stored_size for p in pages for c in p.chunks}
    assert all(sizes[c] == len(b) for c, b in pairs)
    pivot = sorted(c for c, _ in pairs)[3]
    after = [
        c.id for p in chunks_api.ScanChunks(pb.ScanChunksRequest(after=pivot)) for c in p.chunks
    ]
    assert after == [c for c in listed if c > pivot]

    before = chunks_api.Totals(pb.Empty(), timeout=5)
    deleted = chunks_api.DeleteChunks(pb.ChunkIds(ids=[c for c, _ in pairs[:4]]), timeout=5)
    assert deleted.deleted == 4
    totals = chunks_api.Totals(pb.Empty(), timeout=5)
    assert totals.chunks == before.chunks - 4
    assert totals.stored_bytes == before.stored_bytes - sum(len(b) for _, b in pairs[:4])
    assert missing(chunks_api, [c for c, _ in pairs]) == [c for c, _ in pairs[:4]]


# metadata


_manifest = test_stores.manifest


def test_manifests_versions_and_tags(meta_api):
    mid, data = test_stores.manifest(os.urandom(8).hex())
    repo = f"repo-{mid.hex()[:8]}"
    vid, record = test_stores.record(repo, 1)
    meta_api.PutManifest(pb.ManifestRecord(id=mid, data=data), timeout=5)
    assert meta_api.GetManifest(pb.ChunkIds(ids=[mid]), timeout=5).data == data
    other = os.urandom(32)
    assert list(meta_api.HasManifests(pb.ChunkIds(ids=[other, mid]), timeout=5).ids) == [mid]

    meta_api.PutVersion(pb.VersionRecord(repo=repo, id=vid, data=record), timeout=5)
    assert meta_api.GetVersion(pb.VersionKey(repo=repo, id=vid), timeout=5).data == record
    listed = meta_api.ListVersions(pb.RepoName(repo=repo), timeout=5).versions
    assert [(v.repo, v.id, v.data) for v in listed] == [(repo, vid, record)]
    assert repo in meta_api.ListRepos(pb.Empty(), timeout=5).repos
    meta_api.SetTag(pb.Tag(repo=repo, tag="best", version_id=vid), timeout=5)
    tags = meta_api.ListTags(pb.RepoName(repo=repo), timeout=5).tags
    assert [(t.tag, t.version_id) for t in tags] == [("best", vid)]
    meta_api.DeleteTag(pb.Tag(repo=repo, tag="best"), timeout=5)
    assert list(meta_api.ListTags(pb.RepoName(repo=repo), timeout=5).tags) == []
    meta_api.DeleteVersion(pb.VersionKey(repo=repo, id=vid), timeout=5)
    deleted = meta_api.DeleteManifests(pb.ChunkIds(ids=[mid, other]), timeout=5)
    assert deleted.deleted == 1


def test_put_manifests_stores_all_or_nothing(meta_api):
    key = os.urandom(8).hex()
    records = [
        pb.ManifestRecord(id=m, data=d) for m, d in (_manifest(f"{key}{i}") for i in range(50))
    ]
    every = pb.ChunkIds(ids=[r.id for r in records])
    for bad, needle in [
        (pb.ManifestRecord(id=b"short", data=b"x"), "id #10"),
        (pb.ManifestRecord(id=records[0].id, data=b"x"), "does not match its id"),
        (pb.ManifestRecord(id=ids.record_id(b"\xff\xff"), data=b"\xff\xff"), "does not parse"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            meta_api.PutManifests(
                pb.ManifestRecords(records=[*records[:10], bad, *records[10:]]), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in info.value.details()
        assert list(meta_api.HasManifests(every, timeout=5).ids) == []  # nothing of the call
    meta_api.PutManifests(pb.ManifestRecords(records=records), timeout=5)
    assert list(meta_api.HasManifests(every, timeout=5).ids) == [r.id for r in records]
    got = meta_api.GetManifest(pb.ChunkIds(ids=[records[7].id]), timeout=5).data
    assert got == records[7].data
    meta_api.DeleteManifests(every, timeout=5)


def test_get_manifests_leaves_out_the_absent_and_what_is_past_its_size(meta_api):
    key = os.urandom(8).hex()
    (small, small_data), (absent, _) = _manifest(f"{key}s"), _manifest(f"{key}a")
    meta_api.PutManifest(pb.ManifestRecord(id=small, data=small_data), timeout=5)
    bigs = [_manifest(f"{key}b{i}", 250_000) for i in range(2)]
    assert all(len(data) > 9 << 20 for _, data in bigs)
    for mid, data in bigs:
        meta_api.PutManifest(pb.ManifestRecord(id=mid, data=data), timeout=30)
    (big1, _), (big2, _) = bigs
    reply = meta_api.GetManifests(pb.ChunkIds(ids=[absent, small, big1, big2]), timeout=30)
    assert [r.id for r in reply.records] == [small, big1]  # big2 would pass 16 MiB
    assert reply.records[0].data == small_data
    with pytest.raises(grpc.RpcError) as info:
        meta_api.GetManifests(pb.ChunkIds(ids=[b"short"]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    meta_api.DeleteManifests(pb.ChunkIds(ids=[small, big1, big2]), timeout=5)


def test_records_no_client_can_read_are_refused_and_nothing_is_stored(meta_api):
    repo = f"refused-{os.urandom(4).hex()}"
    vid, record = test_stores.record(repo, 1)
    other_id, other = test_stores.record("elsewhere", 1)
    garbage = b"\xff\xfe not a record"
    sid, refused_sid = os.urandom(16), os.urandom(16)
    meta_api.PutStage(pb.StageRecord(id=sid, data=model_pb2.Stage(repo=repo).SerializeToString()))
    refused = [
        (pb.VersionRecord(repo=repo, id=ids.record_id(garbage), data=garbage), "parse as a Ver"),
        (pb.VersionRecord(repo=repo, id=b"\1" * 32, data=record), "does not match its id"),
        (pb.VersionRecord(repo=repo, id=other_id, data=other), "of repo 'elsewhere'"),
        (pb.VersionRecord(repo="../up", id=vid, data=record), "invalid repo name '../up'"),
        (pb.StageRecord(id=refused_sid, data=garbage), "does not parse as a Stage"),
        (pb.StageFile(stage_id=sid, path="a", data=garbage), "does not parse as a StagedFile"),
    ]
    put = {
        pb.VersionRecord: meta_api.PutVersion,
        pb.StageRecord: meta_api.PutStage,
        pb.StageFile: meta_api.PutStageFile,
    }
    for request, needle in refused:
        with pytest.raises(grpc.RpcError) as info:
            put[type(request)](request, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, needle
        assert needle in info.value.details()
    assert list(meta_api.ListVersions(pb.RepoName(repo=repo), timeout=5).versions) == []
    assert repo not in meta_api.ListRepos(pb.Empty(), timeout=5).repos
    stages = [s.id for s in meta_api.ListStages(pb.Empty(), timeout=5).stages]
    assert sid in stages and refused_sid not in stages
    assert list(meta_api.ListStageFiles(pb.StageKey(id=sid), timeout=5).files) == []

    meta_api.PutVersion(pb.VersionRecord(repo=repo, id=vid, data=record), timeout=5)
    for tag in ("", "a b", "x@y"):
        with pytest.raises(grpc.RpcError) as info:
            meta_api.SetTag(pb.Tag(repo=repo, tag=tag, version_id=vid), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "invalid tag" in str(
            info.value.details()
        )
    assert list(meta_api.ListTags(pb.RepoName(repo=repo), timeout=5).tags) == []
    meta_api.DeleteVersion(pb.VersionKey(repo=repo, id=vid), timeout=5)
    meta_api.DeleteStage(pb.DeleteStageRequest(id=sid), timeout=5)


def test_stages_round_trip_and_a_stage_file_needs_its_stage(meta_api):
    sid = b"\7" * 16
    record = model_pb2.Stage(repo="r", expires_ns=2).SerializeToString()
    staged = model_pb2.StagedFile(new_bytes=3).SerializeToString()
    meta_api.PutStage(pb.StageRecord(id=sid, data=record))
    meta_api.PutStageFile(pb.StageFile(stage_id=sid, path="a/b", data=staged))
    assert meta_api.GetStage(pb.StageKey(id=sid)).data == record
    files = meta_api.ListStageFiles(pb.StageKey(id=sid)).files
    assert [(f.path, f.data) for f in files] == [("a/b", staged)]
    assert [r.id for r in meta_api.ListStages(pb.Empty()).stages] == [sid]
    meta_api.DeleteStage(pb.DeleteStageRequest(id=sid))
    assert list(meta_api.ListStageFiles(pb.StageKey(id=sid)).files) == []
    assert list(meta_api.ListStages(pb.Empty()).stages) == []


def put_stage(meta_api) -> bytes:
    """The id of a new stage on the node, holding one file ``a``."""
    sid = os.urandom(16)
    meta_api.PutStage(pb.StageRecord(id=sid, data=model_pb2.Stage(repo="r").SerializeToString()))
    staged = model_pb2.StagedFile(new_bytes=1).SerializeToString()
    meta_api.PutStageFile(pb.StageFile(stage_id=sid, path="a", data=staged))
    return sid


def test_a_delete_stage_repeated_by_its_claimant_succeeds_and_nobody_elses(meta_api, channel):
    """The retry of a DeleteStage whose answer was lost is answered OK; another claimant's
    delete, or one without a claimant, gets NOT_FOUND; what the node remembers is no stage."""
    earlier = channel.unary_unary(  # DeleteStage as a client of an earlier release calls it
        "/chunkstore.v1.MetaService/DeleteStage",
        request_serializer=pb.StageKey.SerializeToString,
        response_deserializer=pb.Empty.FromString,
    )
    old = put_stage(meta_api)
    earlier(pb.StageKey(id=old), timeout=5)  # deletes, as it did
    assert old not in [r.id for r in meta_api.ListStages(pb.Empty(), timeout=5).stages]
    sid, mine, other = put_stage(meta_api), os.urandom(16), os.urandom(16)
    meta_api.DeleteStage(pb.DeleteStageRequest(id=sid, claimant=mine), timeout=5)
    meta_api.DeleteStage(pb.DeleteStageRequest(id=sid, claimant=mine), timeout=5)
    for delete in (
        lambda: meta_api.DeleteStage(pb.DeleteStageRequest(id=sid, claimant=other), timeout=5),
        lambda: meta_api.DeleteStage(pb.DeleteStageRequest(id=sid), timeout=5),
        lambda: earlier(pb.StageKey(id=sid), timeout=5),
    ):
        with pytest.raises(grpc.RpcError) as info:
            delete()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert f"stage {sid.hex()} not found" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        meta_api.GetStage(pb.StageKey(id=sid), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert sid not in [r.id for r in meta_api.ListStages(pb.Empty(), timeout=5).stages]


def test_delete_stage_refuses_a_claimant_of_the_wrong_size_and_deletes_nothing(meta_api):
    sid = put_stage(meta_api)
    for claimant in (b"", b"c" * 15, b"c" * 17):
        with pytest.raises(grpc.RpcError) as info:
            meta_api.DeleteStage(pb.DeleteStageRequest(id=sid, claimant=claimant), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"has 16 bytes, got {len(claimant)}" in info.value.details()
    assert meta_api.GetStage(pb.StageKey(id=sid), timeout=5).id == sid
    assert [f.path for f in meta_api.ListStageFiles(pb.StageKey(id=sid), timeout=5).files] == ["a"]
    meta_api.DeleteStage(pb.DeleteStageRequest(id=sid), timeout=5)


def test_restore_stage_puts_back_only_a_readable_stage_for_the_claimant_that_deleted_it(
    meta_api,
):
    sid, mine, other = put_stage(meta_api), os.urandom(16), os.urandom(16)
    record = meta_api.GetStage(pb.StageKey(id=sid), timeout=5).data
    files = list(meta_api.ListStageFiles(pb.StageKey(id=sid), timeout=5).files)
    meta_api.DeleteStage(pb.DeleteStageRequest(id=sid, claimant=mine), timeout=5)
    garbage = b"\xff\xfe not a record"
    bad_file = pb.StageFile(stage_id=sid, path="a", data=garbage)
    refused = [
        (pb.RestoreStageRequest(id=sid, claimant=b"c" * 15, data=record, files=files), "got 15"),
        (pb.RestoreStageRequest(id=sid[:8], claimant=mine, data=record), "a stage id has 16"),
        (pb.RestoreStageRequest(id=sid, claimant=mine, data=garbage), "parse as a Stage"),
        (
            pb.RestoreStageRequest(id=sid, claimant=mine, data=record, files=[bad_file]),
            "parse as a StagedFile",
        ),
    ]
    for request, needle in refused:
        with pytest.raises(grpc.RpcError) as info:
            meta_api.RestoreStage(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, needle
        assert needle in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # another claimant's put-back
        meta_api.RestoreStage(
            pb.RestoreStageRequest(id=sid, claimant=other, data=record, files=files), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert sid not in [r.id for r in meta_api.ListStages(pb.Empty(), timeout=5).stages]

    restore = pb.RestoreStageRequest(id=sid, claimant=mine, data=record, files=files)
    meta_api.RestoreStage(restore, timeout=5)
    assert meta_api.GetStage(pb.StageKey(id=sid), timeout=5).data == record
    back = meta_api.ListStageFiles(pb.StageKey(id=sid), timeout=5).files
    assert [(f.path, f.data) for f in back] == [(f.path, f.data) for f in files]
    meta_api.DeleteStage(pb.DeleteStageRequest(id=sid), timeout=5)


def test_release_stage_lets_in_a_copy_that_carries_it_and_refuses_bad_input(meta_api):
    """A ReleaseStage of the claimant whose delete the node notes drops that note; a
    PutStage that carries the release of the noted claimant is accepted (a repair's copy);
    bad claimants, ids and records are refused and change nothing."""
    sid, mine, other = put_stage(meta_api), os.urandom(16), os.urandom(16)
    record = meta_api.GetStage(pb.StageKey(id=sid), timeout=5).data
    meta_api.DeleteStage(pb.DeleteStageRequest(id=sid, claimant=mine), timeout=5)
    refused = [
        (meta_api.ReleaseStage, pb.ReleaseStageRequest(id=sid, claimant=b"c", data=record)),
        (meta_api.ReleaseStage, pb.ReleaseStageRequest(id=sid[:8], claimant=mine, data=record)),
        (meta_api.ReleaseStage, pb.ReleaseStageRequest(id=sid, claimant=mine, data=b"\xff")),
        (meta_api.PutStage, pb.StageRecord(id=sid, data=record, released=[mine, b"c" * 17])),
    ]
    for call, request in refused:
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
    for released in ([], [other]):
        with pytest.raises(grpc.RpcError) as info:
            meta_api.PutStage(pb.StageRecord(id=sid, data=record, released=released), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    meta_api.PutStage(pb.StageRecord(id=sid, data=record, released=[other, mine]), timeout=5)
    assert meta_api.GetStage(pb.StageKey(id=sid), timeout=5).data == record

    second = put_stage(meta_api)
    meta_api.DeleteStage(pb.DeleteStageRequest(id=second, claimant=mine), timeout=5)
    meta_api.ReleaseStage(pb.ReleaseStageRequest(id=second, claimant=mine, data=record))
    meta_api.PutStage(pb.StageRecord(id=second, data=record), timeout=5)
    for stage_id in (sid, second):
        meta_api.DeleteStage(pb.DeleteStageRequest(id=stage_id), timeout=5)


def test_scan_manifests_streams_ids_with_their_time(meta_api):
    key = os.urandom(8).hex()
    records = dict(_manifest(f"{key}{i}") for i in range(3))
    mids = set(records)
    for mid, data in records.items():
        meta_api.PutManifest(pb.ManifestRecord(id=mid, data=data), timeout=5)
    infos = [m for b in meta_api.ScanManifests(pb.Empty(), timeout=30) for m in b.manifests]
    found = {m.id: m.stored_at for m in infos if m.id in mids}
    assert set(found) == mids
    assert all(t > 1e9 for t in found.values())


@pytest.mark.parametrize(
    ("call", "code", "needle"),
    [
        (lambda api: api.GetManifest(pb.ChunkIds(ids=[b"\1" * 32])), "NOT_FOUND", "manifest 0101"),
        (lambda api: api.GetManifest(pb.ChunkIds(ids=[])), "INVALID_ARGUMENT", "exactly one id"),
        (lambda api: api.GetVersion(pb.VersionKey(repo="r", id=b"\2" * 32)), "NOT_FOUND", "repo"),
        (lambda api: api.DeleteTag(pb.Tag(repo="r", tag="t")), "NOT_FOUND", "tag 't'"),
        (lambda api: api.SetTag(pb.Tag(repo="r", tag="t", version_id=b"v")), "NOT_FOUND", "v"),
        (lambda api: api.ListVersions(pb.RepoName(repo="a\0b")), "INVALID_ARGUMENT", "NUL"),
        (lambda api: api.GetStage(pb.StageKey(id=b"\3" * 16)), "NOT_FOUND", "stage 0303"),
        (lambda api: api.GetStage(pb.StageKey(id=b"short")), "INVALID_ARGUMENT", "16 bytes"),
        (
            lambda api: api.PutStageFile(pb.StageFile(stage_id=b"\4" * 16, path="a", data=b"")),
            "NOT_FOUND",
            "stage 0404",
        ),
        (
            lambda api: api.DeleteStage(pb.DeleteStageRequest(id=b"\5" * 16)),
            "NOT_FOUND",
            "stage 0505",
        ),
    ],
    ids=[
        "manifest",
        "no-id",
        "version",
        "tag",
        "tag-to-absent",
        "nul-repo",
        "stage",
        "stage-id-length",
        "file-to-absent-stage",
        "delete-absent-stage",
    ],
)
def test_meta_errors_have_status_and_message(meta_api, call, code, needle):
    with pytest.raises(grpc.RpcError) as err:
        call(meta_api)
    assert err.value.code().name == code
    assert needle in err.value.details()


# metrics


def scrape(node) -> tuple[set[str], dict[tuple[str, tuple], float]]:
    """Metric family names and sample values of the node's /metrics page."""
    with urllib.request.urlopen(node.metrics_url("n1"), timeout=5) as reply:
        text = reply.read().decode()
    families = list(text_string_to_metric_families(text))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples
    }
    return {f.name for f in families}, samples


def test_metrics_scrape_names_and_counters_moving(node, chunks_api):
    names, before = scrape(node)
    assert {
        "chunkstore_stored_chunks",
        "chunkstore_stored_bytes",
        "chunkstore_lmdb_map_used_bytes",
        "chunkstore_lmdb_map_size_bytes",
        "chunkstore_chunks_received",
        "chunkstore_received_bytes",
        "chunkstore_chunks_deduplicated",
        "chunkstore_chunks_rejected",
        "chunkstore_served_bytes",
        "chunkstore_rpc_duration_seconds",
        "chunkstore_rpcs",
    } <= names

    pairs = make_chunks(3)
    size = sum(len(b) for _, b in pairs)
    put(chunks_api, pairs)
    missing(chunks_api, [c for c, _ in pairs])
    get(chunks_api, [c for c, _ in pairs])
    bad = [(pairs[0][0], b"\x07")]
    with pytest.raises(grpc.RpcError):
        put(chunks_api, bad)
    _, after = scrape(node)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("chunkstore_chunks_received_total") == 3
    assert delta("chunkstore_received_bytes_total") == size
    assert delta("chunkstore_added_bytes_total") == size
    assert delta("chunkstore_chunks_deduplicated_total") == 3
    assert delta("chunkstore_chunks_rejected_total", reason="corrupt") == 1
    assert delta("chunkstore_served_bytes_total") == size
    assert delta("chunkstore_stored_chunks") == 3
    assert delta("chunkstore_stored_bytes") == size
    put_calls = {"service": "ChunkService", "method": "PutChunks"}
    assert delta("chunkstore_rpc_duration_seconds_count", **put_calls) == 2
    assert delta("chunkstore_rpcs_total", **put_calls, code="INVALID_ARGUMENT") == 1
    assert all(len(v) < 64 for _, labels in after for _, v in labels)  # no chunk ids in labels


# errors the store raises inside a running server


class BrokenStore(LmdbStore):
    """A store whose disk is full and whose repo listing has a bug."""

    def put(self, chunks):
        raise StoreFull(f"store at {self.location} is full (no space left on device)")

    def list_repos(self):
        raise RuntimeError("boom")


@pytest.fixture
def broken_node(tmp_path):
    store = BrokenStore(tmp_path / "store")
    cluster = ClusterMap(1, 1, 1, (NodeSpec("n1", "127.0.0.1:1"),))
    server = NodeServer("n1", cluster, store, NodeMetrics(store))
    port = server.listen("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        server.stop(0)
        store.close()


def test_full_store_is_resource_exhausted_and_reads_go_on(broken_node):
    api = pb_grpc.ChunkServiceStub(broken_node)
    pairs = make_chunks(2)
    with pytest.raises(grpc.RpcError) as err:
        put(api, pairs)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "full" in err.value.details()
    assert missing(api, [c for c, _ in pairs]) == [c for c, _ in pairs]
    assert api.Totals(pb.Empty(), timeout=5).chunks == 0


def test_unexpected_error_is_internal_and_the_node_keeps_serving(broken_node, caplog):
    meta = pb_grpc.MetaServiceStub(broken_node)
    with pytest.raises(grpc.RpcError) as err:
        meta.ListRepos(pb.Empty(), timeout=5)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "RuntimeError: boom" in err.value.details()
    assert "boom" in caplog.text  # logged with its traceback
    assert pb_grpc.ChunkServiceStub(broken_node).Totals(pb.Empty(), timeout=5).chunks == 0


# shutdown: last, as it restarts the shared node


def test_sigterm_turns_not_serving_exits_0_and_data_survives_restart(node, channel, chunks_api):
    pairs = make_chunks(3)
    put(chunks_api, pairs)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
    assert next(watch).status == SERVING
    node.process("n1").send_signal(signal.SIGTERM)
    assert next(watch).status == NOT_SERVING
    watch.cancel()
    assert node.stop("n1") == 0
    assert "node n1 stopped" in node.log("n1")

    node.start("n1")
    assert missing(chunks_api, [c for c, _ in pairs]) == []
    assert get(chunks_api, [c for c, _ in pairs]) == dict(pairs)
