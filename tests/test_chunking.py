"""The memory map a push reads files through: pages it no longer needs are given back."""

from __future__ import annotations

import os

import numpy as np
from conftest import rss_file_kib

from chunkstore.chunking import MappedFile

MiB = 1 << 20


def test_released_ranges_leave_residency_and_read_back_the_same(tmp_path):
    path = tmp_path / "f"
    data = os.urandom(64 * MiB + 123)
    path.write_bytes(data)
    with MappedFile(path) as mapped:
        view = mapped.view
        before = rss_file_kib()
        assert int(np.frombuffer(view, np.uint8).sum()) == int(
            np.frombuffer(data, np.uint8).sum()
        )  # every page touched
        assert rss_file_kib() - before > 48 << 10
        mapped.release(1, 40 * MiB + 5)  # pages wholly inside only
        mapped.release_before(40 * MiB)  # already dropped: a no-op
        assert rss_file_kib() - before < 32 << 10
        assert view[:16].tobytes() == data[:16]  # faulted back in from the page cache
        assert view[20 * MiB : 20 * MiB + 16].tobytes() == data[20 * MiB : 20 * MiB + 16]
        del view
