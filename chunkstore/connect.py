"""Opening a store from a URL: a path (embedded LMDB), ``memory://``, ``grpc://HOST:PORT,...``,
or ``grpcs://HOST:PORT,...`` (a cluster over TLS).

A cluster client sends ``token`` (default ``$CHUNKSTORE_TOKEN``) on every call; over TLS it
trusts the CAs in ``$CHUNKSTORE_TLS_CA`` (default: the system's) and presents the client
certificate in ``$CHUNKSTORE_TLS_CERT`` and ``$CHUNKSTORE_TLS_KEY`` if set.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from chunkstore.errors import InvalidInput

if TYPE_CHECKING:  # imported where used: importing chunkstore stays light
    from chunkstore.repository import Repository
    from chunkstore.stores.base import Store

ENV_STORE = "CHUNKSTORE_STORE"
#: The schemes a store URL may have; anything else before ``://`` is an error, never a path.
SCHEMES = ("grpc", "grpcs", "memory", "file")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def default_store_path() -> Path:
    """``$XDG_DATA_HOME/chunkstore``, else ``~/.local/share/chunkstore``."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "chunkstore"


def store_url(url: str | None = None) -> str:
    """The store to use: ``url`` if given, else ``$CHUNKSTORE_STORE``, else the default path."""
    return url or os.environ.get(ENV_STORE) or str(default_store_path())


def normal_scheme(url: str) -> str:
    """``url`` with its ``SCHEME://`` prefix, if any, in lower case (schemes are
    case-insensitive); InvalidInput if chunkstore does not know the scheme (``grcp://HOST:PORT``
    must not be taken for a directory and created)."""
    match = _SCHEME.match(url)
    if not match:
        return url
    scheme = match.group(1).lower()
    if scheme not in SCHEMES:
        raise InvalidInput(
            f"unknown store scheme {match.group(1)!r} (use grpc://HOST:PORT or a directory)"
        )
    return scheme + url[len(match.group(1)) :]


def open_store(url: str | None = None, *, token: str | None = None, create: bool = True) -> Store:
    """Open the store a URL names (see :func:`store_url` for the default); a cluster's nodes
    get ``token`` (default ``$CHUNKSTORE_TOKEN``). Without ``create``, an embedded store that
    does not exist yet is an error instead of being made. An embedded store whose files this
    process may not write (a read-only mount, another user's store) is opened to read: its
    writes raise PermissionDenied."""
    url = normal_scheme(store_url(url))
    if url.startswith("memory://"):
        from chunkstore.stores.memory import MemoryStore

        return MemoryStore()
    if url.startswith(("grpc://", "grpcs://")):
        from chunkstore.client.cluster_store import ClusterStore
        from chunkstore.client.rpc import Credentials, RpcPolicy

        credentials = Credentials.from_env(tls=url.startswith("grpcs://"), token=token)
        return ClusterStore.connect(url, RpcPolicy(credentials=credentials))
    from chunkstore.stores.lmdb_store import LmdbStore

    return LmdbStore(store_directory(url), create=create, readonly=None)


def store_directory(url: str) -> Path | None:
    """The directory of the embedded store ``url`` names (a path or ``file://``), None for
    other stores; InvalidInput for an unknown scheme (see :func:`normal_scheme`)."""
    url = normal_scheme(url)
    if _SCHEME.match(url) and not url.startswith("file://"):
        return None
    return Path(url.removeprefix("file://")).expanduser()


def connect(url: str | None = None, *, token: str | None = None, create: bool = True) -> Repository:
    """A :class:`Repository` over the store a URL names (default: the embedded store); see
    :func:`open_store` for ``token`` and ``create``."""
    from chunkstore.repository import Repository

    return Repository(open_store(url, token=token, create=create))
