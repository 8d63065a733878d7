"""Stores: the protocol every store implements and the stores that run in one process."""

from chunkstore.stores.base import ChunkInfo, ChunkStore, ChunkTotals, MetaStore, Store
from chunkstore.stores.lmdb_store import LmdbStore
from chunkstore.stores.memory import MemoryStore

__all__ = [
    "ChunkInfo",
    "ChunkStore",
    "ChunkTotals",
    "LmdbStore",
    "MemoryStore",
    "MetaStore",
    "Store",
]
