"""Reserving a pulled file's space: allocated up front, refused at once when it cannot fit."""

from __future__ import annotations

import errno
import os

import pytest
from conftest import failing_fallocate, random_bytes, tree_bytes, write

from chunkstore import filespace


def test_reserve_allocates_zeroed_blocks(tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        filespace.reserve(fd, 3 << 20, path)
        st = os.fstat(fd)
        assert st.st_size == 3 << 20
        assert st.st_blocks * 512 >= 3 << 20  # allocated, not a sparse file
        assert os.pread(fd, 4096, 2 << 20) == bytes(4096)
    finally:
        os.close(fd)


def test_reserve_beyond_the_disk_names_the_file_and_changes_nothing(tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as info:
            filespace.reserve(fd, 1 << 60, path)
        assert info.value.errno in (errno.ENOSPC, errno.EFBIG)
        assert info.value.filename == str(path)
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)


def test_pull_that_cannot_fit_fails_before_reading_and_leaves_nothing(repo, tmp_path, monkeypatch):
    src = write(tmp_path / "src" / "model.bin", random_bytes(1 << 20, seed=3)).parent
    repo.push(src, repo="m")
    reads = []
    for name in ("read_into", "with_blobs", "get"):
        method = getattr(repo.store, name)
        monkeypatch.setattr(
            repo.store, name, lambda *a, _m=method, _n=name, **k: reads.append(_n) or _m(*a, **k)
        )
    monkeypatch.setattr(filespace, "_FALLOCATE", failing_fallocate(errno.ENOSPC))
    dest = tmp_path / "out"
    with pytest.raises(OSError, match="No space left") as info:
        repo.pull("m", dest)
    assert "model.bin" in info.value.filename
    assert reads == []
    assert tree_bytes(dest) == {}


def test_pull_where_fallocate_is_unsupported_sets_the_length_only(repo, tmp_path, monkeypatch):
    src = write(tmp_path / "src" / "model.bin", random_bytes(1 << 20, seed=4)).parent
    repo.push(src, repo="m")
    monkeypatch.setattr(filespace, "_FALLOCATE", failing_fallocate(errno.EOPNOTSUPP))
    repo.pull("m", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(src)
