"""chunkstore: a distributed, deduplicating store for large model weight files.

import chunkstore
store = chunkstore.connect()            # $CHUNKSTORE_STORE, else the embedded default
store.push("ckpt-2000/", repo="llama-ft", message="step 2000", tags=["v2"])
store.pull("llama-ft@v2", "restored/")

The repository classes load on first use, so that importing the package (as the command line
does before it configures numpy's libraries) loads no numpy.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from chunkstore.connect import connect, open_store
from chunkstore.errors import ChunkstoreError
from chunkstore.model import FileEntry, Manifest, Version
from chunkstore.retention import KeepPolicy

if TYPE_CHECKING:
    from chunkstore.repository import Diff, PushResult, Repository

_LAZY = dict.fromkeys(("Diff", "PushResult", "Repository"), "chunkstore.repository")

__all__ = [
    "ChunkstoreError",
    "Diff",
    "FileEntry",
    "KeepPolicy",
    "Manifest",
    "PushResult",
    "Repository",
    "Version",
    "connect",
    "open_store",
]


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'chunkstore' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
