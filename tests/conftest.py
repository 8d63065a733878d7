"""Shared fixtures: stores of every kind, repositories over them, and file helpers."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest

from chunkstore.repository import Repository
from chunkstore.stores.lmdb_store import LmdbStore
from chunkstore.stores.memory import MemoryStore


@pytest.fixture(params=["memory", "lmdb"])
def store(request, tmp_path):
    s = MemoryStore() if request.param == "memory" else LmdbStore(tmp_path / "store")
    request.addfinalizer(s.close)
    return s


@pytest.fixture
def repo(store) -> Repository:
    return Repository(store)


@pytest.fixture
def lmdb_repo(tmp_path) -> Repository:
    r = Repository(LmdbStore(tmp_path / "store"))
    yield r
    r.close()


def random_bytes(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, for comparing trees."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def env_store(tmp_path, monkeypatch) -> Path:
    """Point CHUNKSTORE_STORE at a fresh embedded store for CLI tests."""
    path = tmp_path / "cli-store"
    monkeypatch.setenv("CHUNKSTORE_STORE", str(path))
    monkeypatch.delenv("CHUNKSTORE_DEBUG", raising=False)
    return path


os.environ.setdefault("CHUNKSTORE_AUTHOR", "tester")


def rss_file_kib() -> int:
    """Resident pages of mapped files in this process, in KiB (RssFile of /proc/self/status)."""
    return _status_kib("RssFile")


def rss_anon_kib() -> int:
    """Resident anonymous pages of this process, in KiB (RssAnon of /proc/self/status)."""
    return _status_kib("RssAnon")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def failing_fallocate(code: int):
    """A stand-in for the C library's ``fallocate`` that fails with errno ``code``."""

    def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(code)
        return -1

    return fallocate


def count_fetches(store) -> list[bytes]:
    """Record every chunk id ``store`` is asked for from now on, by any of its read paths
    (one read may pass an id through several of them: count distinct ids)."""
    asked: list[bytes] = []
    real_get, real_read_into, real_with_blobs = store.get, store.read_into, store.with_blobs

    def get(chunk_ids):
        asked.extend(chunk_ids)
        return real_get(chunk_ids)

    def read_into(chunk_ids, consume, workers=2):
        asked.extend(chunk_ids)
        return real_read_into(chunk_ids, consume, workers=workers)

    def with_blobs(chunk_ids, fn):
        asked.extend(chunk_ids)
        return real_with_blobs(chunk_ids, fn)

    store.get, store.read_into, store.with_blobs = get, read_into, with_blobs
    return asked


class RecordedProgress:
    """A Progress that keeps what it was told: each unit of work as [label, total, done]."""

    def __init__(self) -> None:
        self.units: list[list] = []

    def start(self, total: int, label: str) -> None:
        self.units.append([label, total, 0])

    def advance(self, done: int, new: int = 0) -> None:
        self.units[-1][2] += done

    def finish(self) -> None:
        pass
