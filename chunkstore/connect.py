"""Opening a store from a URL: a path (embedded LMDB), ``memory://``, or ``grpc://HOST:PORT,...``."""

from __future__ import annotations

import os
from pathlib import Path

from chunkstore.repository import Repository
from chunkstore.stores.base import Store

ENV_STORE = "CHUNKSTORE_STORE"


def default_store_path() -> Path:
    """``$XDG_DATA_HOME/chunkstore``, else ``~/.local/share/chunkstore``."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "chunkstore"


def store_url(url: str | None = None) -> str:
    """The store to use: ``url`` if given, else ``$CHUNKSTORE_STORE``, else the default path."""
    return url or os.environ.get(ENV_STORE) or str(default_store_path())


def open_store(url: str | None = None) -> Store:
    """Open the store a URL names (see :func:`store_url` for the default)."""
    url = store_url(url)
    if url.startswith("memory://"):
        from chunkstore.stores.memory import MemoryStore

        return MemoryStore()
    if url.startswith("grpc://"):
        from chunkstore.client.cluster_store import ClusterStore

        return ClusterStore.connect(url)
    from chunkstore.stores.lmdb_store import LmdbStore

    path = url.removeprefix("file://")
    return LmdbStore(Path(path).expanduser())


def connect(url: str | None = None) -> Repository:
    """A :class:`Repository` over the store a URL names (default: the embedded store)."""
    return Repository(open_store(url))
