"""Security of a cluster, tried as clients and operators would: TLS and mutual TLS on the gRPC
port, tokens with read, write and admin scopes, open health checks, size limits.

Real node processes on loopback ports (``cluster_fixtures``), one cluster per kind, shared by
the module. The CA, certificates and keys are made at run time with the ``openssl`` command,
in a temporary directory; tokens are random per run.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cluster_fixtures import LocalCluster, write_cluster_file
from conftest import random_bytes, tree_bytes, write
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from test_node import assert_one_error_line, run_node
from test_stores import large_manifest

import chunkstore
from chunkstore import ids
from chunkstore.client import manifest_parts
from chunkstore.client.cli import main as cli_main
from chunkstore.client.cluster_store import ClusterStore
from chunkstore.client.rpc import (
    Credentials,
    NodeCallError,
    NodeClient,
    RpcPolicy,
    to_error,
)
from chunkstore.cluster_map import NodeSpec
from chunkstore.errors import InvalidInput, PermissionDenied, StoreFull, StoreUnavailable
from chunkstore.server import local_cluster
from chunkstore.server.auth import METHOD_SCOPES, Scope, load_node_security, required_scope
from chunkstore.server.limits import MAX_MANIFEST_BYTES, MAX_VERSION_BYTES
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

MiB = 1 << 20
TOKENS = {scope: f"{scope}-{secrets.token_hex(16)}" for scope in ("read", "write", "admin")}
NAMES = {"read": "reader", "write": "writer", "admin": "operator"}
SECURITY_ENV = (
    "CHUNKSTORE_TOKEN",
    "CHUNKSTORE_TLS_CA",
    "CHUNKSTORE_TLS_CERT",
    "CHUNKSTORE_TLS_KEY",
    "CHUNKSTORE_TLS_SERVER_NAME",
    "CHUNKSTORE_STORE",
)
BIG_CHANNEL = [("grpc.max_send_message_length", 64 * MiB)]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in SECURITY_ENV:
        monkeypatch.delenv(name, raising=False)


# a throwaway PKI


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_args(self, mutual: bool = False) -> list[str]:
        args = ["--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key)]
        return args + (["--tls-client-ca", str(self.ca)] if mutual else [])


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> Pki:
    """A CA, and a server and a client certificate it signed, for 127.0.0.1 and localhost."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
        "-subj", "/CN=chunkstore test CA", "-days", "2",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    ext = d / "leaf.cnf"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    for who in ("server", "client"):
        _openssl(
            "req", "-new", *ec, "-keyout", str(d / f"{who}.key"), "-out", str(d / f"{who}.csr"),
            "-subj", f"/CN={who}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(d / f"{who}.csr"), "-CA", str(d / "ca.pem"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
            "-extfile", str(ext), "-out", str(d / f"{who}.pem"),
        )  # fmt: skip
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tokens_toml() -> str:
    return "".join(
        f'[[tokens]]\ntoken = "{token}"\nscope = "{scope}"\nname = "{NAMES[scope]}"\n\n'
        for scope, token in TOKENS.items()
    )


# clusters


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, pki):
    """Two nodes serving TLS (no client certificates), no tokens."""
    directory = tmp_path_factory.mktemp("tls")
    probe = Credentials(tls=True, ca=pki.ca.read_bytes())
    with LocalCluster(directory, 2, 2, node_args=pki.server_args(), credentials=probe) as c:
        yield c


@pytest.fixture(scope="module")
def mtls_cluster(tmp_path_factory, pki):
    """One node that requires client certificates."""
    directory = tmp_path_factory.mktemp("mtls")
    probe = Credentials(
        tls=True,
        ca=pki.ca.read_bytes(),
        cert=pki.client_cert.read_bytes(),
        key=pki.client_key.read_bytes(),
    )
    with LocalCluster(directory, 1, node_args=pki.server_args(mutual=True), credentials=probe) as c:
        yield c


@pytest.fixture(scope="module")
def auth_cluster(tmp_path_factory):
    """Two plaintext nodes that require tokens, and call each other with the admin token."""
    directory = tmp_path_factory.mktemp("auth")
    tokens = directory / "tokens.toml"
    tokens.write_text(tokens_toml())
    peer_token = directory / "peer-token"
    peer_token.write_text(TOKENS["admin"])
    args = ["--tokens", str(tokens), "--peer-token-file", str(peer_token)]
    with LocalCluster(directory, 2, 2, node_args=args) as c:
        yield c


def make_tree(root: Path, seed: int, files: int = 2, size: int = 300_000) -> Path:
    for i in range(files):
        write(root / f"shard-{i}.bin", random_bytes(size, seed * 100 + i))
    return root


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# TLS


def test_tls_round_trip_push_and_pull_via_grpcs(tls_cluster, pki, tmp_path, monkeypatch, capsys):
    assert tls_cluster.url.startswith("grpcs://")
    monkeypatch.setenv("CHUNKSTORE_TLS_CA", str(pki.ca))
    src = make_tree(tmp_path / "src", seed=1)
    with chunkstore.connect(tls_cluster.url) as repo:
        pushed = repo.push(src, "tls-model", message="over TLS").version
        repo.pull("tls-model", tmp_path / "back")
    assert tree_bytes(tmp_path / "back") == tree_bytes(src)
    capsys.readouterr()
    assert cli_main(["log", "tls-model", "--store", tls_cluster.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] == pushed.id.hex()


def test_server_name_overrides_the_host_checked(tls_cluster, pki, monkeypatch):
    monkeypatch.setenv("CHUNKSTORE_TLS_CA", str(pki.ca))
    monkeypatch.setenv("CHUNKSTORE_TLS_SERVER_NAME", "localhost")  # in the SAN, as 127.0.0.1 is
    with chunkstore.connect(tls_cluster.url) as repo:
        repo.stats()
    monkeypatch.setenv("CHUNKSTORE_TLS_SERVER_NAME", "elsewhere.example")
    with pytest.raises(StoreUnavailable, match="no node of grpcs://"):
        chunkstore.connect(tls_cluster.url)


def test_plaintext_client_against_tls_node_fails_clearly(tls_cluster, capsys):
    plain = tls_cluster.url.replace("grpcs://", "grpc://")
    assert cli_main(["ls", "--store", plain]) == StoreUnavailable.exit_code
    line = one_line(capsys.readouterr().err)
    assert line.startswith("chunkstore: error: no node of grpc://")
    assert "if the nodes serve TLS, use grpcs://" in line


def test_tls_client_without_the_ca_fails_in_one_line(tls_cluster):
    """As a user runs it: a process of its own, whose stderr gRPC could write to as well."""
    result = subprocess.run(
        [sys.executable, "-m", "chunkstore.client.cli", "ls", "--store", tls_cluster.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k not in SECURITY_ENV},
    )
    assert result.returncode == StoreUnavailable.exit_code
    line = one_line(result.stderr)
    assert "CERTIFICATE_VERIFY_FAILED" in line
    assert "set $CHUNKSTORE_TLS_CA" in line


def test_mutual_tls_refuses_a_client_without_certificate(mtls_cluster, pki, monkeypatch, capsys):
    monkeypatch.setenv("CHUNKSTORE_TLS_CA", str(pki.ca))
    assert cli_main(["ls", "--store", mtls_cluster.url]) == StoreUnavailable.exit_code
    assert "set $CHUNKSTORE_TLS_CERT and $CHUNKSTORE_TLS_KEY" in one_line(capsys.readouterr().err)

    monkeypatch.setenv("CHUNKSTORE_TLS_CERT", str(pki.client_cert))
    monkeypatch.setenv("CHUNKSTORE_TLS_KEY", str(pki.client_key))
    assert cli_main(["stats", "--store", mtls_cluster.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["versions"] == 0


def test_client_certificate_without_key_is_invalid_input(monkeypatch, pki):
    monkeypatch.setenv("CHUNKSTORE_TLS_CERT", str(pki.client_cert))
    with pytest.raises(InvalidInput, match="CHUNKSTORE_TLS_KEY"):
        Credentials.from_env(tls=True)
    monkeypatch.setenv("CHUNKSTORE_TLS_KEY", str(pki.client_key.with_name("absent.key")))
    with pytest.raises(InvalidInput, match="absent.key: cannot read"):
        Credentials.from_env(tls=True)


def test_credentials_keep_token_and_key_out_of_repr(pki):
    creds = Credentials(
        tls=True, token=TOKENS["admin"], cert=b"cert", key=pki.client_key.read_bytes()
    )
    assert TOKENS["admin"] not in repr(creds)
    assert "PRIVATE" not in repr(creds)


# tokens


def channel_with(cluster: LocalCluster, token: str | None = None, node: str = "n1"):
    return Credentials(token=token).channel(cluster.address(node), BIG_CHANNEL)


def test_health_and_reflection_need_no_token(auth_cluster):
    with grpc.insecure_channel(auth_cluster.address("n1")) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "chunkstore.v1.ChunkService" in services


def test_no_or_unknown_token_is_unauthenticated(auth_cluster, capsys, monkeypatch):
    cases = [
        (None, "requires a token"),
        ("not-a-token", "unknown token"),
        (TOKENS["admin"] + "x", "unknown token"),
    ]
    for token, needle in cases:
        with channel_with(auth_cluster, token) as channel, pytest.raises(grpc.RpcError) as info:
            pb_grpc.ClusterServiceStub(channel).GetClusterMap(pb.Empty(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert needle in info.value.details()
    no_bearer = [("authorization", TOKENS["admin"])]
    with channel_with(auth_cluster) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.ClusterServiceStub(channel).GetClusterMap(pb.Empty(), timeout=5, metadata=no_bearer)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in info.value.details()

    assert cli_main(["ls", "--store", auth_cluster.url]) == PermissionDenied.exit_code
    line = one_line(capsys.readouterr().err)
    assert line.startswith("chunkstore: error: cluster map: node seed 127.0.0.1:")
    assert "unauthenticated: this node requires a token (set CHUNKSTORE_TOKEN" in line
    monkeypatch.setenv("CHUNKSTORE_TOKEN", TOKENS["read"])
    assert cli_main(["ls", "--store", auth_cluster.url]) == 0


def test_every_method_refuses_no_token_and_a_token_below_its_scope(auth_cluster):
    """Refusals come before the handler, so these calls (empty requests) change nothing."""
    below = {Scope.WRITE: TOKENS["read"], Scope.ADMIN: TOKENS["write"]}
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            name = f"/{service.full_name}/{method.name}"
            kind = (
                ("stream" if method.client_streaming else "unary")
                + "_"
                + ("stream" if method.server_streaming else "unary")
            )
            need = required_scope(name)
            tokens = [(None, grpc.StatusCode.UNAUTHENTICATED)]
            if need in below:
                tokens.append((below[need], grpc.StatusCode.PERMISSION_DENIED))
            for token, code in tokens:
                with channel_with(auth_cluster, token) as channel:
                    call = getattr(channel, kind)(name)
                    request = iter([b""]) if method.client_streaming else b""
                    with pytest.raises(grpc.RpcError) as info:
                        reply = call(request, timeout=5)
                        if method.server_streaming:
                            list(reply)
                assert info.value.code() == code, name
                if code == grpc.StatusCode.PERMISSION_DENIED:
                    assert info.value.details().endswith(f"{method.name} needs {need}"), name


def test_scope_table_names_real_methods_and_new_ones_need_admin():
    methods = {
        f"{s.name}/{m.name}" for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods
    }
    assert set(METHOD_SCOPES) <= methods
    assert required_scope("/chunkstore.v1.ClusterService/AddNode") == Scope.ADMIN
    assert required_scope("/chunkstore.v1.ChunkService/DeleteChunks") == Scope.ADMIN
    assert required_scope("/chunkstore.v1.ChunkService/Missing") == Scope.WRITE
    assert required_scope("/chunkstore.v1.ChunkService/MarkWanted") == Scope.WRITE
    assert required_scope("/chunkstore.v1.ChunkService/GetChunks") == Scope.READ


def test_read_token_pulls_but_cannot_push(auth_cluster, tmp_path, capsys):
    url = auth_cluster.url
    src = make_tree(tmp_path / "v1", seed=2)
    with chunkstore.connect(url, token=TOKENS["write"]) as repo:
        repo.push(src, "read-test", message="v1")
    with chunkstore.connect(url, token=TOKENS["read"]) as repo:
        repo.pull("read-test", tmp_path / "back")
        before = repo.store.totals()
    assert tree_bytes(tmp_path / "back") == tree_bytes(src)

    new = make_tree(tmp_path / "v2", seed=3)
    argv = ["push", str(new), "--repo", "read-test", "-q", "--store", url]
    assert cli_main([*argv, "--token", TOKENS["read"]]) == PermissionDenied.exit_code
    line = one_line(capsys.readouterr().err)
    # The existence check only looks (read scope); storing the new chunks needs write.
    assert ": permission denied: token 'reader' has scope read, PutChunks needs write" in line
    assert TOKENS["read"] not in line

    chunk = random_bytes(5000, 99)
    with channel_with(auth_cluster, TOKENS["read"]) as channel:
        api = pb_grpc.ChunkServiceStub(channel)
        batch = pb.PutChunksBatch(seq=1, chunks=[pb.EncodedChunk(id=ids.chunk_id(chunk))])
        with pytest.raises(grpc.RpcError) as info:
            list(api.PutChunks(iter([batch]), timeout=10))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with chunkstore.connect(url, token=TOKENS["read"]) as repo:
        assert repo.store.totals() == before
        assert [v.message for v in repo.log("read-test")] == ["v1"]


def test_write_token_pushes_but_only_admin_collects_garbage(auth_cluster, tmp_path, capsys):
    url = auth_cluster.url
    src = make_tree(tmp_path / "gone", seed=4)
    write_args = ["--store", url, "--token", TOKENS["write"]]
    assert cli_main(["push", str(src), "--repo", "gc-test", "-q", *write_args]) == 0
    assert cli_main(["rm", "gc-test", *write_args]) == 0
    capsys.readouterr()

    # Refused before any work, whether or not there is something to delete, dry run or not.
    for extra in (["--dry-run"], ["--dry-run", "--grace", "1e9"], ["--grace", "1e9"], []):
        assert cli_main(["gc", "--grace", "0", *extra, *write_args]) == PermissionDenied.exit_code
        line = one_line(capsys.readouterr().err)
        assert line.startswith("chunkstore: error: gc needs an admin token: node n")
        assert "permission denied: token 'writer' has scope write" in line
        assert "needs admin" in line and "quorum" not in line

    assert (
        cli_main(["gc", "--grace", "0", "--json", "--store", url, "--token", TOKENS["admin"]]) == 0
    )
    assert json.loads(capsys.readouterr().out)["deleted_chunks"] > 0


def test_refusals_are_counted_and_tokens_never_logged(auth_cluster):
    with channel_with(auth_cluster, TOKENS["read"]) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.MetaServiceStub(channel).SetTag(pb.Tag(repo="r", tag="t"), timeout=5)
    text = urllib.request.urlopen(auth_cluster.metrics_url("n1"), timeout=10).read().decode()
    assert (
        'chunkstore_rpcs_total{code="PERMISSION_DENIED",method="SetTag",service="MetaService"}'
        in text
    )
    assert 'code="UNAUTHENTICATED"' in text
    for node_id in ("n1", "n2"):
        log = auth_cluster.log(node_id)
        assert "plaintext, 3 tokens" in log
        assert not any(token in log + text for token in TOKENS.values())


def test_cluster_status_sends_the_token(auth_cluster, capsys):
    argv = ["cluster", "status", "--store", auth_cluster.url, "--json"]
    assert cli_main([*argv, "--token", TOKENS["read"]]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [n["healthy"] for n in status["nodes"]] == [True, True]
    assert cli_main(argv) == PermissionDenied.exit_code  # no token: the map is refused
    out, err = capsys.readouterr()
    assert out == "" and one_line(err).startswith(
        f"chunkstore cluster status: error: no node of {auth_cluster.url} serves a cluster "
        f"map: {auth_cluster.address('n1')}: unauthenticated: this node requires a token"
    )


def test_cluster_status_reports_nodes_that_refuse_the_token_as_serving(tmp_path, capsys):
    """A node whose health check passes but that refuses the caller's token serves: status
    says "token refused" (what it holds is unknown) and exits 7, not 1 (degraded); a node that
    does not serve still makes the cluster degraded (exit 1) whatever the others refuse."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(tokens_toml())
    peer_token = tmp_path / "peer-token"
    peer_token.write_text(TOKENS["admin"])
    args = ["--tokens", str(tokens), "--peer-token-file", str(peer_token)]
    with LocalCluster(tmp_path / "c", 2, 2, node_args=args) as cluster:
        by_dir = ["cluster", "status", "--dir", str(cluster.directory)]
        assert cli_main([*by_dir, "--json"]) == PermissionDenied.exit_code  # no token at all
        out, err = capsys.readouterr()
        status = json.loads(out)
        assert status["state"] == "token refused"
        for node in status["nodes"]:
            assert node["healthy"] and node["token_refused"]
            assert node["error"] == "UNAUTHENTICATED"
            assert node["chunks"] is None and node["checked"] is None
        assert one_line(err) == (
            "chunkstore cluster status: nodes n1, n2 refuse this caller: give a token (any "
            "scope) with --token or $CHUNKSTORE_TOKEN"
        )
        assert cli_main([*by_dir, "--json", "--token", TOKENS["read"]]) == 0
        status = json.loads(capsys.readouterr().out)
        assert not any(n["token_refused"] for n in status["nodes"])

        # n2 restarted with the read token revoked: n1 serves the map and its status, n2 serves
        # but refuses the read token.
        tokens.write_text(tokens_toml().split("\n\n", 1)[1])
        assert cluster.stop("n2") == 0
        cluster.start("n2")
        by_url = ["cluster", "status", "--store", cluster.url, "--token", TOKENS["read"]]
        assert cli_main(by_url) == PermissionDenied.exit_code
        out, err = capsys.readouterr()
        lines = out.splitlines()
        assert lines[0].endswith("2 of 2 nodes healthy, replicas 2, write quorum 2, token refused")
        n1, n2 = (line.split() for line in lines[2:4])
        assert n1[:3] == ["n1", cluster.address("n1"), "serving"] and n1[3] == "0"
        assert n2[:4] == ["n2", cluster.address("n2"), "serving", "-"]
        assert lines[3].endswith("token refused (unauthenticated)")
        assert "nodes n2 refuse this caller" in one_line(err)
        assert cli_main([*by_url, "--json"]) == PermissionDenied.exit_code
        status = json.loads(capsys.readouterr().out)
        assert [(n["healthy"], n["token_refused"]) for n in status["nodes"]] == [
            (True, False),
            (True, True),
        ]
        assert status["nodes"][0]["checked"] is True  # its only peer's report is unknown
        assert status["rebalancing"] is False  # n2's unknown state counts for nothing

        # n2 down and n1 refusing the caller: degraded (exit 1) comes before token refused.
        cluster.kill("n2")
        assert cli_main([*by_dir, "--timeout", "1"]) == 1
        out, err = capsys.readouterr()
        assert out.splitlines()[0].endswith("degraded") and "refuse this caller" in err


def test_membership_changes_need_an_admin_token(auth_cluster, capsys):
    epoch = local_cluster.fetch_map(
        [auth_cluster.address("n1")], credentials=Credentials(token=TOKENS["read"])
    ).epoch
    argv = ["cluster", "add-node", "n9", "127.0.0.1:1", "--force", "--store", auth_cluster.url]
    assert cli_main([*argv, "--token", TOKENS["write"]]) == PermissionDenied.exit_code
    out, err = capsys.readouterr()
    line = one_line(err)
    assert out == "" and "added" not in line
    assert line.startswith("chunkstore cluster add-node: error: cannot add n9: ")
    assert "membership changes need an admin token" in line
    assert "permission denied: token 'writer' has scope write, PublishMap needs admin" in line
    served = local_cluster.fetch_map(
        [auth_cluster.address("n1")], credentials=Credentials(token=TOKENS["read"])
    )
    assert served.epoch == epoch
    assert cli_main(argv) == PermissionDenied.exit_code  # no token: the map is refused
    line = one_line(capsys.readouterr().err)
    assert line.startswith(
        f"chunkstore cluster add-node: error: no node of {auth_cluster.url} serves a cluster "
        f"map: {auth_cluster.address('n1')}: unauthenticated: this node requires a token"
    )


def test_peer_credentials_reach_other_nodes(auth_cluster, tmp_path, pki):
    """What server code uses to call its peers: NodeClient with the node's peer policy."""
    token_file = tmp_path / "peer-token"
    token_file.write_text(TOKENS["admin"] + "\n")
    security = load_node_security(peer_token_file=str(token_file))
    assert security.peer.token == TOKENS["admin"] and not security.peer.tls
    peer = NodeClient(
        NodeSpec("n2", auth_cluster.address("n2")), RpcPolicy(credentials=security.peer)
    )
    try:
        assert peer.run(lambda: peer.cluster.GetNodeStatus(pb.Empty(), timeout=5)).id == "n2"
    finally:
        peer.close()

    tls = load_node_security(
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
        peer_token_file=str(token_file),
    )
    assert tls.peer.tls and tls.peer.cert == pki.server_cert.read_bytes()
    assert tls.describe() == "mutual TLS, no auth"


# bad start


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('[[tokens]]\ntoken = "abc"\nscope = "root"\n', "unknown scope 'root'"),
        (
            '[[tokens]]\ntoken = "abc"\nscope = "read"\n'
            '[[tokens]]\ntoken = "abc"\nscope = "admin"\n',
            "token #2: duplicate token (the same as token #1)",
        ),
        ('[[tokens]]\nscope = "read"\n', "token #1: missing key 'token'"),
        ('[[tokens]]\ntoken = "abc"\n', "token #1: missing key 'scope'"),
        ('[[tokens]]\ntoken = "abc"\nscope = "read"\nrole = "x"\n', "unknown key 'role'"),
        ('token = "abc"\n', "unknown key 'token'"),
        ("", "no tokens"),
        ('[[tokens]]\ntoken = "a b"\nscope = "read"\n', "printable ASCII without spaces"),
        ("[[tokens]\n", "invalid TOML"),
    ],
    ids=[
        "unknown-scope",
        "duplicate",
        "no-token",
        "no-scope",
        "unknown-key",
        "top-level-key",
        "empty",
        "space",
        "not-toml",
    ],
)
def test_bad_tokens_file_exits_2_with_one_line(tmp_path: Path, text: str, reason: str):
    cluster, _ = write_cluster_file(tmp_path, 1)
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(text)
    data = tmp_path / "data"
    result = run_node(
        "--id", "n1", "--cluster", str(cluster), "--data", str(data), "--tokens", str(tokens)
    )
    assert result.returncode == 2
    assert_one_error_line(result, str(tokens), reason)
    assert "abc" not in result.stderr
    assert not data.exists()


def test_bad_tls_files_exit_2_with_one_line(tmp_path: Path, pki):
    cluster, _ = write_cluster_file(tmp_path, 1)
    base = ["--id", "n1", "--cluster", str(cluster), "--data", str(tmp_path / "data")]
    mismatched = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)]
    result = run_node(*base, *mismatched)
    assert result.returncode == 2
    assert_one_error_line(result, "not a PEM certificate and its private key")
    result = run_node(*base, "--tls-cert", str(pki.server_cert))
    assert result.returncode == 2
    assert_one_error_line(result, "--tls-cert and --tls-key go together")
    assert not (tmp_path / "data").exists()


# limits


def test_oversize_requests_are_resource_exhausted_and_store_nothing(auth_cluster):
    manifest_id = ids.record_id(b"big manifest")
    with channel_with(auth_cluster, TOKENS["write"]) as channel:
        meta = pb_grpc.MetaServiceStub(channel)
        cases = [
            (pb.ManifestRecord(id=manifest_id, data=b"m" * (40 * MiB)), "larger than max"),
            (
                pb.ManifestRecord(id=manifest_id, data=b"m" * (MAX_MANIFEST_BYTES + 1)),
                f"manifest too large: {MAX_MANIFEST_BYTES + 1} bytes, at most {MAX_MANIFEST_BYTES}",
            ),
        ]
        for request, needle in cases:
            with pytest.raises(grpc.RpcError) as info:
                meta.PutManifest(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert needle in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            version = pb.VersionRecord(
                repo="big", id=b"v" * 32, data=b"x" * (MAX_VERSION_BYTES + 1)
            )
            meta.PutVersion(version, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "version record too large" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            meta.GetManifest(pb.ChunkIds(ids=[manifest_id]), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

    # The client sends a manifest too large for one message in pieces, and reads it back so.
    manifest_id, big = large_manifest("big", 40 * MiB)
    store = ClusterStore.connect(
        auth_cluster.url, RpcPolicy(credentials=Credentials(token=TOKENS["write"]))
    )
    try:
        store.put_manifest(manifest_id, big)
        assert store.get_manifest(manifest_id) == big
    finally:
        store.close()
    with channel_with(auth_cluster, TOKENS["read"]) as channel:
        with pytest.raises(grpc.RpcError) as info:
            parts = manifest_parts.pieces(ids.record_id(b"other"), b"m" * 100)
            pb_grpc.MetaServiceStub(channel).PutManifestParts(iter(parts), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Malformed piece streams and requests are refused, and store nothing.
    other = ids.record_id(b"malformed")
    with channel_with(auth_cluster, TOKENS["write"]) as channel:
        meta = pb_grpc.MetaServiceStub(channel)
        bad_streams = [
            ([pb.ManifestPart(data=b"no id")], "first part, and only it"),
            ([pb.ManifestPart(id=other, data=b"a"), pb.ManifestPart(id=other)], "only it"),
            ([pb.ManifestPart(id=b"short", data=b"a")], "32"),
        ]
        for parts, needle in bad_streams:
            with pytest.raises(grpc.RpcError) as info:
                meta.PutManifestParts(iter(parts), timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert needle in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(meta.GetManifestParts(pb.ChunkIds(ids=[other, manifest_id]), timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            list(meta.GetManifestParts(pb.ChunkIds(ids=[other]), timeout=5))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_refusals_and_size_limits_map_to_their_errors():
    a, b = NodeSpec("n1", "10.0.0.1:7401"), NodeSpec("n2", "10.0.0.2:7401")
    denied = NodeCallError(
        a, grpc.StatusCode.PERMISSION_DENIED, "token has scope read, PutChunks needs write"
    )
    error = to_error("store chunks", [denied, NodeCallError(b, denied.code, denied.detail)])
    assert isinstance(error, PermissionDenied) and error.exit_code == 7
    assert str(error) == (
        "store chunks: node n1 10.0.0.1:7401: permission denied: "
        "token has scope read, PutChunks needs write (and 1 more node)"
    )
    large = NodeCallError(
        a, grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (5 vs. 4)"
    )
    assert isinstance(to_error("put", [large]), InvalidInput)
    full = NodeCallError(b, grpc.StatusCode.RESOURCE_EXHAUSTED, "store at /srv is full")
    assert isinstance(to_error("put", [large, full]), StoreFull)


# cluster up


def test_cluster_up_passes_tls_and_tokens_to_its_nodes(tmp_path, pki, monkeypatch, capsys):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(tokens_toml())
    monkeypatch.setenv("CHUNKSTORE_TLS_CA", str(pki.ca))
    d = tmp_path / "cluster"
    up = ["cluster", "up", "--dir", str(d), "--nodes", "1", *pki.server_args()]
    try:
        assert cli_main([*up, "--tokens", str(tokens)]) == 0
        url = capsys.readouterr().out.strip()
        assert url.startswith("grpcs://127.0.0.1:")
        assert local_cluster.uses_tls(d)
        status = ["cluster", "status", "--dir", str(d), "--json"]
        assert cli_main(status) == 7  # no token: GetNodeStatus is refused
        out, err = capsys.readouterr()
        assert json.loads(out)["nodes"][0]["error"] == "UNAUTHENTICATED"
        assert err == (
            "chunkstore cluster status: nodes n1 refuse this caller: give a token (any scope) "
            "with --token or $CHUNKSTORE_TOKEN\n"
        )
        assert cli_main([*status, "--token", TOKENS["read"]]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["nodes"][0]["healthy"] and err == ""
    finally:
        local_cluster.cluster_down(d)


def test_cluster_up_with_tokens_gives_its_nodes_an_admin_peer_token(tmp_path, capsys):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(tokens_toml())
    d = tmp_path / "cluster"
    up = ["cluster", "up", "--dir", str(d), "--nodes", "3", "--replicas", "2"]
    try:
        assert cli_main([*up, "--tokens", str(tokens)]) == 0  # no $CHUNKSTORE_TOKEN
        url = capsys.readouterr().out.strip()
        peer_token = d / local_cluster.PEER_TOKEN_FILE
        assert peer_token.read_text().strip() == TOKENS["admin"]
        assert peer_token.stat().st_mode & 0o777 == 0o600
        assert TOKENS["admin"] not in " ".join(local_cluster.node_args(d))
        src = make_tree(tmp_path / "data", seed=7)
        push = ["push", str(src), "--repo", "peers", "-q", "--store", url]
        assert cli_main([*push, "--token", TOKENS["write"]]) == 0
        repair = ["cluster", "repair", "--store", url, "--json", "--token", TOKENS["admin"]]
        assert cli_main(repair) == 0, capsys.readouterr()
        report = json.loads(capsys.readouterr().out)
        assert all(n["ok"] and n["under_replicated"] == 0 for n in report["nodes"])
        assert all(n["peers_refused"] == [] for n in report["nodes"])
        logs = "".join((d / f"n{i}.log").read_text() for i in (1, 2, 3))
        assert "peer refuses" not in logs and TOKENS["admin"] not in logs
    finally:
        local_cluster.cluster_down(d)

    # A tokens file without an admin token cannot serve as the nodes' peer token.
    tokens.write_text(f'[[tokens]]\ntoken = "{TOKENS["write"]}"\nscope = "write"\n')
    assert cli_main([*up, "--dir", str(tmp_path / "c2"), "--tokens", str(tokens)]) == 2
    assert "no admin token" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "c2").exists()


def test_peers_that_refuse_a_node_are_reported_not_counted_as_under_replication(tmp_path, capsys):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(tokens_toml())
    # No peer token and no $CHUNKSTORE_TOKEN: the nodes refuse each other.
    with LocalCluster(tmp_path / "c", 3, 2, node_args=["--tokens", str(tokens)]) as cluster:
        src = make_tree(tmp_path / "data", seed=8)
        push = ["push", str(src), "--repo", "r", "-q", "--store", cluster.url]
        assert cli_main([*push, "--token", TOKENS["write"]]) == 0
        repair = ["cluster", "repair", "--store", cluster.url, "--token", TOKENS["admin"]]
        assert cli_main([*repair, "--json"]) == 1
        report = json.loads(capsys.readouterr().out)
        assert {n["id"]: n["peers_refused"] for n in report["nodes"]} == {
            "n1": ["n2", "n3"],
            "n2": ["n1", "n3"],
            "n3": ["n1", "n2"],
        }
        assert all(n["under_replicated"] is None for n in report["nodes"])  # not known
        assert cli_main(repair) == 1
        out, err = capsys.readouterr()
        assert out.count("peer authentication failed") == 3 and "below replica" not in out
        assert "peer authentication failed on n1, n2, n3" in err and "below" not in err

        status = ["cluster", "status", "--store", cluster.url, "--token", TOKENS["read"]]
        assert cli_main(status) == 1
        out = capsys.readouterr().out
        assert out.splitlines()[0].endswith("peer authentication failed")
        assert "under-replicated" not in out and "in sync" not in out
        assert "n1  " in out and "(n2, n3 refuse it)" in out


def test_copy_to_a_cluster_that_requires_a_token(auth_cluster, tmp_path, capsys, monkeypatch):
    """The destination's token is its own (``--to-token``): a read token is refused there, and
    nothing is copied; a write token copies."""
    source = tmp_path / "local"
    monkeypatch.setenv("CHUNKSTORE_STORE", str(source))
    write(tmp_path / "ckpt" / "w.bin", random_bytes(200_000, seed=31))
    assert cli_main(["push", str(tmp_path / "ckpt"), "--repo", "copied", "-q"]) == 0
    url = auth_cluster.url
    code = cli_main(["copy", "copied", "--to", url, "--to-token", TOKENS["read"], "-q"])
    err = capsys.readouterr().err
    assert code != 0 and "has scope read, PutChunks needs write" in err
    with ClusterStore.connect(url, RpcPolicy(credentials=Credentials(token=TOKENS["read"]))) as r:
        assert r.list_versions("copied") == []
    code = cli_main(["copy", "copied", "--to", url, "--to-token", TOKENS["write"], "-q"])
    assert code == 0, capsys.readouterr().err
    reader = ClusterStore.connect(url, RpcPolicy(credentials=Credentials(token=TOKENS["read"])))
    try:
        assert [vid for vid, _ in reader.list_versions("copied")]
    finally:
        reader.close()
