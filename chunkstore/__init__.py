"""chunkstore: a distributed, deduplicating store for large model weight files.

import chunkstore
store = chunkstore.connect()            # $CHUNKSTORE_STORE, else the embedded default
store.push("ckpt-2000/", repo="llama-ft", message="step 2000", tags=["v2"])
store.pull("llama-ft@v2", "restored/")
"""

from chunkstore.connect import connect, open_store
from chunkstore.errors import ChunkstoreError
from chunkstore.model import FileEntry, Manifest, Version
from chunkstore.repository import Diff, PushResult, Repository

__all__ = [
    "ChunkstoreError",
    "Diff",
    "FileEntry",
    "Manifest",
    "PushResult",
    "Repository",
    "Version",
    "connect",
    "open_store",
]
