"""Who may call a node: TLS server credentials and bearer tokens with a scope.

A node started with ``--tokens FILE`` checks the ``authorization: Bearer TOKEN`` metadata of
every ``chunkstore.v1`` call (the health and reflection services stay open: probes carry no
token). No token or an unknown one is UNAUTHENTICATED; a token whose scope is below what the
method needs (:data:`METHOD_SCOPES`; scopes are ordered read < write < admin) is
PERMISSION_DENIED. A method missing from the table needs admin, so an RPC added later is safe
until someone decides otherwise. Without ``--tokens``, every caller may do everything.

The tokens file (TOML)::

    [[tokens]]
    token = "4f9c..."        # any printable ASCII without spaces; use long random ones
    scope = "write"          # read | write | admin
    name = "ci"              # optional: named in refusals instead of the token

Token values never appear in messages, logs or metrics; they are compared as SHA-256 digests in
constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import grpc

from chunkstore.client.rpc import Credentials, valid_token
from chunkstore.errors import InvalidInput
from chunkstore.tomlfile import load_toml

from .metrics import NodeMetrics

PREFIX = "/chunkstore.v1."  # other services (health, reflection) are open


class Scope(IntEnum):
    """What a token allows; each scope includes the ones below it."""

    READ = 1  # read chunks, manifests, versions, tags, the map, totals
    WRITE = 2  # push: store chunks, manifests, versions, stages; move tags; remove versions
    ADMIN = 3  # delete chunks and manifests (GC), change membership

    def __str__(self) -> str:
        return self.name.lower()


#: The scope each ``chunkstore.v1`` method needs, by ``Service/Method``. A method not listed
#: needs admin.
METHOD_SCOPES: dict[str, Scope] = {
    # Missing and MarkWanted mark the chunks they find as wanted (GC spares them): part of a
    # push.
    "ChunkService/Missing": Scope.WRITE,
    "ChunkService/MarkWanted": Scope.WRITE,
    "ChunkService/PutChunks": Scope.WRITE,
    "ChunkService/GetChunks": Scope.READ,
    "ChunkService/DeleteChunks": Scope.ADMIN,
    "ChunkService/ScanChunks": Scope.READ,
    "ChunkService/Totals": Scope.READ,
    "MetaService/PutManifest": Scope.WRITE,
    "MetaService/PutManifests": Scope.WRITE,
    "MetaService/GetManifests": Scope.READ,
    "MetaService/GetManifest": Scope.READ,
    "MetaService/PutManifestParts": Scope.WRITE,
    "MetaService/GetManifestParts": Scope.READ,
    "MetaService/HasManifests": Scope.READ,
    "MetaService/ScanManifests": Scope.READ,
    "MetaService/DeleteManifests": Scope.ADMIN,
    "MetaService/PutVersion": Scope.WRITE,
    "MetaService/GetVersion": Scope.READ,
    "MetaService/ListVersions": Scope.READ,
    "MetaService/DeleteVersion": Scope.WRITE,
    "MetaService/ListRepos": Scope.READ,
    "MetaService/SetTag": Scope.WRITE,
    "MetaService/DeleteTag": Scope.WRITE,
    "MetaService/ListTags": Scope.READ,
    # Stages: a job's ranks fill one version, then one commits or aborts (deletes) it.
    "MetaService/PutStage": Scope.WRITE,
    "MetaService/GetStage": Scope.READ,
    "MetaService/PutStageFile": Scope.WRITE,
    "MetaService/ListStageFiles": Scope.READ,
    "MetaService/DeleteStage": Scope.WRITE,
    "MetaService/RestoreStage": Scope.WRITE,
    "MetaService/ReleaseStage": Scope.WRITE,
    "MetaService/ListStages": Scope.READ,
    "ClusterService/GetClusterMap": Scope.READ,
    "ClusterService/GetNodeStatus": Scope.READ,
    # Repair compares what nodes hold without marking anything; moving data and membership
    # (PublishMap, Reconcile) stay admin, which is also what peers are given.
    "ChunkService/Holds": Scope.READ,
    "ChunkService/RangeDigests": Scope.READ,
}


def required_scope(method: str) -> Scope:
    """The scope a call of ``method`` (``/chunkstore.v1.Service/Method``) needs."""
    return METHOD_SCOPES.get(method.removeprefix(PREFIX), Scope.ADMIN)


@dataclass(frozen=True)
class TokenEntry:
    """One token of the file: its name (or ``#N``), its scope, the SHA-256 of its value."""

    name: str
    scope: Scope
    digest: bytes = field(repr=False)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """The tokens a node accepts. :meth:`load` reads them from a file."""

    def __init__(self, entries: Sequence[TokenEntry]) -> None:
        self.entries = tuple(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def find(self, token: str) -> TokenEntry | None:
        """The entry of ``token``, or None. Takes the same time for every token of a length
        (every entry is compared, without stopping at a match)."""
        digest = _digest(token)
        found = None
        for entry in self.entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        return found

    @classmethod
    def load(cls, path: str | Path) -> Tokens:
        """Read and check a tokens file; InvalidInput with one line starting with ``path``."""
        data = load_toml(path, "tokens file")
        try:
            return cls.from_dict(data)
        except InvalidInput as e:
            raise InvalidInput(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> Tokens:
        """Tokens from a parsed file; InvalidInput names the first rule broken."""
        for key in spec:
            if key != "tokens":
                raise InvalidInput(f"unknown key {key!r} (want [[tokens]] tables)")
        rows = spec.get("tokens")
        if not isinstance(rows, list) or not rows:
            raise InvalidInput("no tokens: want one or more [[tokens]] tables")
        entries: list[TokenEntry] = []
        seen: dict[bytes, str] = {}
        for i, row in enumerate(rows, start=1):
            where = f"token #{i}"
            if not isinstance(row, dict):
                raise InvalidInput(f"{where}: want a [[tokens]] table")
            for key in row:
                if key not in ("token", "scope", "name"):
                    raise InvalidInput(f"{where}: unknown key {key!r} (want token, scope, name)")
            for key in ("token", "scope"):
                if key not in row:
                    raise InvalidInput(f"{where}: missing key {key!r}")
            name = row.get("name", f"#{i}")
            if not isinstance(name, str) or not name:
                raise InvalidInput(f"{where}: name must be a non-empty string")
            if "name" in row:
                where = f"token #{i} ({name!r})"
            token, scope = row["token"], row["scope"]
            if not isinstance(token, str) or not valid_token(token):
                raise InvalidInput(
                    f"{where}: the token must be a non-empty string of printable ASCII "
                    "without spaces"
                )
            if scope not in ("read", "write", "admin"):
                raise InvalidInput(f"{where}: unknown scope {scope!r} (want read, write or admin)")
            digest = _digest(token)
            if digest in seen:
                raise InvalidInput(f"{where}: duplicate token (the same as {seen[digest]})")
            if any(e.name == name for e in entries):
                raise InvalidInput(f"{where}: duplicate name {name!r}")
            seen[digest] = where
            entries.append(TokenEntry(name, Scope[scope.upper()], digest))
        return cls(entries)


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the call's ``authorization: Bearer TOKEN`` metadata; None if absent, ""
    if malformed."""
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                return ""
            kind, _, token = value.partition(" ")
            return token.strip() if kind.lower() == "bearer" else ""
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses ``chunkstore.v1`` calls whose token is absent, unknown or of too low a scope
    (see the module docstring); counts each refusal in ``metrics`` under its status code."""

    def __init__(self, tokens: Tokens, metrics: NodeMetrics | None = None) -> None:
        self._tokens = tokens
        self._metrics = metrics

    def check(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> tuple[grpc.StatusCode, str] | None:
        """None if the call may go on, else the status and message to refuse it with."""
        token = bearer_token(metadata)
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, (
                "this node requires a token (set CHUNKSTORE_TOKEN or pass --token)"
            )
        if not token:
            return grpc.StatusCode.UNAUTHENTICATED, (
                "malformed authorization metadata (want 'Bearer TOKEN')"
            )
        entry = self._tokens.find(token)
        if entry is None:
            return grpc.StatusCode.UNAUTHENTICATED, "unknown token"
        needed = required_scope(method)
        if entry.scope < needed:
            who = "token" if entry.name.startswith("#") else f"token {entry.name!r}"
            name = method.rsplit("/", 1)[-1]
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"{who} has scope {entry.scope}, {name} needs {needed}"
            )
        return None

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or not method.startswith(PREFIX):
            return handler
        refusal = self.check(method, handler_call_details.invocation_metadata)
        if refusal is None:
            return handler
        return refusing_handler(handler, method, *refusal, self._metrics)


def refusing_handler(
    handler: grpc.RpcMethodHandler,
    method: str,
    code: grpc.StatusCode,
    message: str,
    metrics: NodeMetrics | None,
) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that ends every call with ``code`` and ``message``
    (without parsing the request), counted in ``metrics``."""
    service, _, name = method.removeprefix(PREFIX).partition("/")

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        if metrics is not None:
            metrics.observe_rpc(service, name, code.name, 0.0)
        context.abort(code, message)

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)


# TLS and the node's own credentials


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read {what}: {e.strerror or e}") from None


def server_credentials(
    cert_file: str | Path, key_file: str | Path, client_ca_file: str | Path | None = None
) -> grpc.ServerCredentials:
    """TLS credentials of a node; with ``client_ca_file``, clients must present a certificate
    that CA signed (mutual TLS). InvalidInput, in one line, for a file that cannot be read or
    a certificate that does not go with its key."""
    cert, key = _read(cert_file, "TLS certificate"), _read(key_file, "TLS key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, ValueError) as e:
        raise InvalidInput(
            f"{cert_file}, {key_file}: not a PEM certificate and its private key ({e})"
        ) from None
    client_ca = None
    if client_ca_file is not None:
        client_ca = _read(client_ca_file, "client CA bundle")
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as e:
            raise InvalidInput(f"{client_ca_file}: not a PEM CA bundle ({e})") from None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


@dataclass(frozen=True)
class NodeSecurity:
    """How a node guards its port and what it presents to its peers.

    ``tls``: server credentials (None: plaintext); ``tokens``: accepted tokens (None: auth
    off); ``peer``: credentials for the node's own calls to other nodes (see
    :func:`load_node_security`); ``describe`` summarises it for the start-up line.
    """

    tls: grpc.ServerCredentials | None = None
    mutual_tls: bool = False
    tokens: Tokens | None = None
    peer: Credentials = field(default_factory=Credentials)

    def describe(self) -> str:
        transport = "mutual TLS" if self.mutual_tls else "TLS" if self.tls else "plaintext"
        auth = f"{len(self.tokens)} tokens" if self.tokens else "no auth"
        return f"{transport}, {auth}"


def load_node_security(
    *,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_client_ca: str | None = None,
    tokens_file: str | None = None,
    peer_token_file: str | None = None,
) -> NodeSecurity:
    """Load a node's TLS files, tokens and peer credentials; InvalidInput in one line.

    Peer calls (node to node) use TLS when the node serves TLS, trusting ``$CHUNKSTORE_TLS_CA``
    (else the system roots) and presenting ``$CHUNKSTORE_TLS_CERT``/``KEY``, else the node's
    own certificate and key, as a client certificate; they carry the token in
    ``peer_token_file``, else ``$CHUNKSTORE_TOKEN``.
    """
    if (tls_cert is None) != (tls_key is None):
        raise InvalidInput("--tls-cert and --tls-key go together")
    if tls_client_ca is not None and tls_cert is None:
        raise InvalidInput("--tls-client-ca needs --tls-cert and --tls-key")
    tls = None
    if tls_cert is not None and tls_key is not None:
        tls = server_credentials(tls_cert, tls_key, tls_client_ca)
    tokens = Tokens.load(tokens_file) if tokens_file is not None else None
    token = None
    if peer_token_file is not None:
        token = _read(peer_token_file, "peer token").decode("utf-8", "replace").strip()
        if not valid_token(token):
            raise InvalidInput(
                f"{peer_token_file}: want one token (printable ASCII without spaces)"
            )
    peer = Credentials.from_env(tls=tls is not None, token=token)
    if tls is not None and peer.cert is None and tls_cert is not None and tls_key is not None:
        peer = Credentials(
            tls=True,
            token=peer.token,
            ca=peer.ca,
            cert=_read(tls_cert, "TLS certificate"),
            key=_read(tls_key, "TLS key"),
            server_name=peer.server_name,
        )
    return NodeSecurity(tls, tls_client_ca is not None, tokens, peer)
