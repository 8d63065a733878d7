"""keep_freed_memory: once per process, harmless where glibc is missing."""

from __future__ import annotations

import subprocess
import sys


def test_keep_freed_memory_applies_once_and_reuses_freed_blocks():
    code = """
import resource
from chunkstore.client.allocator import keep_freed_memory
assert keep_freed_memory(16 << 20)
assert keep_freed_memory(16 << 20)  # a second call changes nothing
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # warm up
    bytes(4 << 20)
before = faults()
for _ in range(50):
    bytes(4 << 20)  # each freed at once: the next reuses its pages
print(faults() - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 50 * (4 << 20) // 4096 // 10  # under a tenth of a fresh mapping each
