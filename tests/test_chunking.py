"""The memory map a push reads files through: pages it no longer needs are given back."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import rss_anon_kib, rss_file_kib

from chunkstore.chunking import FILL_BYTES, ChunkerParams, MappedFile
from chunkstore.ingest import local_manifest
from chunkstore.progress import NoProgress

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


def test_a_file_no_lease_can_guard_is_copied_as_it_is_read_and_cannot_fault(tmp_path):
    path = tmp_path / "model.bin"
    data = os.urandom(20 * MiB + 5)
    path.write_bytes(data)
    with MappedFile(path) as mapped:
        assert not mapped.copied and not mapped.writer_present  # mapped, a lease guards it
    with open(path, "r+b") as writer, MappedFile(path) as mapped:  # a writer holds it open
        assert mapped.copied and mapped.writer_present
        view = mapped.view
        mapped.fill(1000)  # reads ahead FILL_BYTES
        assert view[: FILL_BYTES + 8].tobytes() == data[:FILL_BYTES] + bytes(8)
        mapped.fill(FILL_BYTES + 1)
        assert view[FILL_BYTES : 2 * FILL_BYTES].tobytes() == data[FILL_BYTES : 2 * FILL_BYTES]
        reader = mapped.reader()
        mapped.release(0, FILL_BYTES)
        assert view[4096:4104].tobytes() == bytes(8)  # dropped pages read as zeros
        assert reader.read(4096, 8) == data[4096:4104]  # the reader reads the file
        writer.truncate(MiB)
        mapped.fill(len(data))  # no SIGBUS: reads short
        assert view[len(data) - 8 :].tobytes() == bytes(8)
        assert reader.read(2 * MiB, 8) == b"" and mapped.changed()
        del view
    assert reader.read(16, 8) == data[16:24]  # outlives the map until closed
    reader.close()


def test_a_copied_file_is_hashed_in_memory_bounded_by_its_read_ahead(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(96 * MiB))
    peak = []

    class Sample(NoProgress):
        def advance(self, done, new=0):
            peak.append(rss_anon_kib())

    with open(path, "r+b"):  # a writer holds it open: copied, not mapped
        before = rss_anon_kib()
        manifest = local_manifest(path, ChunkerParams(), progress=Sample())
    assert sum(length for _, length in manifest.chunks) == 96 * MiB
    assert max(peak) - before < 32 << 10  # KiB: the read-ahead, not the file


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
    elif thread == "writer open":  # no lease: the file is copied as it is read, not mapped
        with open(path, "r+b"):
            push(repository)
    else:  # a background checkpoint upload
        worker = threading.Thread(target=push, args=(repository,))
        worker.start()
        worker.join()
    blobs = s.get([info.id for info in s.scan()])
    print(s.list_repos(), all(ids.chunk_id(codec.decode(b)) == cid for cid, b in blobs))
"""


@pytest.mark.parametrize("thread", ["main", "worker", "writer open"])
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


_TRUNCATED_AS_ITS_INDEX_IS_READ = """
import sys
from pathlib import Path
import numpy as np
import chunkstore.ingest, chunkstore.reuse
from chunkstore.errors import ChunkstoreError
from chunkstore.repository import Repository
from chunkstore.stores.lmdb_store import LmdbStore
from chunkstore.synthetic import weights, write_safetensors

tmp, where = Path(sys.argv[1]), sys.argv[2]
src, out = tmp / "src", tmp / "out"
src.mkdir()
def checkpoint(seed):
    rng = np.random.default_rng(seed)
    tensors = {f"w{i}": ("BF16", (1 << 20,), weights(rng, 1 << 20, "bf16")) for i in range(4)}
    write_safetensors(src / "model.safetensors", tensors)

def truncating(module, victim):
    original = module.read_index
    def read_index(reader, size):  # the file shrinks as its index is read
        module.read_index = original
        victim().write_bytes(b"")
        return original(reader, size)
    module.read_index = read_index

with LmdbStore(tmp / "store") as s:
    repository = Repository(s)
    if where == "push":
        checkpoint(0)
        truncating(chunkstore.ingest, lambda: src / "model.safetensors")
        with open(src / "model.safetensors", "r+b"):  # held open: copied, not mapped
            try:
                repository.push(src, repo="m")
            except ChunkstoreError as exc:
                print(exc)
        print(s.list_repos())
    else:  # a pull over an older copy of the file, which shrinks as it is read
        checkpoint(0)
        repository.push(src, repo="m")
        repository.pull("m", out)
        checkpoint(10)
        repository.push(src, repo="m")
        truncating(chunkstore.reuse, lambda: out / "model.safetensors")
        repository.pull("m", out, force=True)
        print((out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes())
"""


@pytest.mark.parametrize("where", ["push", "pull"])
def test_a_file_truncated_as_its_tensor_index_is_read_cannot_fault(tmp_path, where):
    """The tensor index of a file no lease guards (a push's held-open file, a pull's older
    copy) is read with pread: a file that shrinks meanwhile reads short, it cannot fault. The
    push then fails cleanly; the pull fetches what it cannot copy."""
    done = subprocess.run(
        [sys.executable, "-c", _TRUNCATED_AS_ITS_INDEX_IS_READ, str(tmp_path), where],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr  # -7 is SIGBUS
    path = tmp_path / "src" / "model.safetensors"
    assert done.stdout.splitlines() == (
        [
            f"{path} changed while it was pushed; nothing was committed: "
            "push again once it is written",
            "[]",
        ]
        if where == "push"
        else ["True"]  # every chunk fetched instead
    )
