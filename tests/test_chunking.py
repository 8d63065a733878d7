"""The memory map a push reads files through: pages it no longer needs are given back."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
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


def test_a_file_open_for_writing_is_mapped_unguarded_and_says_so(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(MiB))
    with MappedFile(path) as mapped:
        assert mapped._lease is not None and not mapped.writer_present
    with open(path, "r+b"), MappedFile(path) as mapped:  # a writer holds it open
        assert mapped._lease is None and mapped.writer_present
        assert mapped.view[:8].tobytes() == path.read_bytes()[:8]


_HOLD = """
import sys, time
from pathlib import Path
from chunkstore.chunking import MappedFile
mapped = MappedFile(Path(sys.argv[1]))
view = mapped.view
print(mapped._lease is not None, flush=True)
deadline = time.monotonic() + 20
while not mapped.changed() and time.monotonic() < deadline:
    view[len(view) - 1]  # the last page: past the end once the file is truncated
    time.sleep(0.001)
print(mapped.changed(), view[len(view) - 1], flush=True)
"""


@pytest.mark.parametrize("how", ["rewrite", "truncate"])
def test_a_mapped_file_truncated_meanwhile_reads_as_changed_not_sigbus(tmp_path, how):
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(8 * MiB))
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "True"  # a lease guards the map
        started = time.monotonic()
        if how == "rewrite":  # what torch.save does to an existing path
            with open(path, "wb") as f:  # waits until the holder let go of its lease
                f.write(b"new")
        else:
            os.truncate(path, 1000)
        assert time.monotonic() - started < 10  # well within the kernel's 45 s break time
        out, _ = holder.communicate(timeout=30)
    finally:
        holder.kill()
    assert holder.returncode == 0  # -7 is SIGBUS
    assert out.split() == ["True", "0"]


_PUSH_WHILE_REWRITTEN = """
import sys, threading
from pathlib import Path
from chunkstore import codec, ids
from chunkstore.errors import ChunkstoreError
from chunkstore.repository import Repository
from chunkstore.stores.lmdb_store import LmdbStore

path, store, thread = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

class RewriteOnFirstBytes:
    done = False
    def start(self, total, label): pass
    def finish(self): pass
    def advance(self, done, new=0):
        if not self.done:
            self.done = True
            with open(path, "wb") as f:
                f.write(b"short")

def push(repository):
    try:
        repository.push(path.parent, repo="m", progress=RewriteOnFirstBytes())
    except ChunkstoreError as exc:
        print(exc)

with LmdbStore(store) as s:
    repository = Repository(s)  # made on the main thread, as a training script does
    if thread == "main":
        push(repository)
    else:  # a background checkpoint upload
        worker = threading.Thread(target=push, args=(repository,))
        worker.start()
        worker.join()
    blobs = s.get([info.id for info in s.scan()])
    print(s.list_repos(), all(ids.chunk_id(codec.decode(b)) == cid for cid, b in blobs))
"""


@pytest.mark.parametrize("thread", ["main", "worker"])
def test_a_file_rewritten_in_place_during_its_push_fails_it_cleanly(tmp_path, thread):
    path = tmp_path / "src" / "model.bin"
    path.parent.mkdir()
    path.write_bytes(os.urandom(200 * MiB))
    done = subprocess.run(
        [sys.executable, "-c", _PUSH_WHILE_REWRITTEN, str(path), str(tmp_path / "store"), thread],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr  # -7 is SIGBUS
    assert done.stdout.splitlines() == [
        f"{path} changed while it was pushed; nothing was committed: push again once it is written",
        "[] True",  # nothing committed, and no blob stored under another's id
    ]
    assert path.read_bytes() == b"short"
