"""keep_freed_memory: freed message buffers are reused instead of faulted in again."""

from __future__ import annotations

import subprocess
import sys

BURSTS = """
import resource, sys
from chunkstore.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory(64 << 20)
    assert keep_freed_memory(64 << 20)  # a second call changes nothing
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def burst():  # 32 MiB of messages in flight, then freed
    blocks = [bytearray(2 << 20) for _ in range(16)]
    del blocks
burst()
before = faults()
for _ in range(5):
    burst()
print(faults() - before)
"""


def faults(mode: str) -> int:
    command = [sys.executable, "-c", BURSTS, mode]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def test_freed_buffers_are_reused_without_page_faults():
    pages = 5 * (32 << 20) // 4096
    assert faults("default") > pages // 2  # glibc hands them back and faults them in again
    assert faults("keep") < pages // 50
