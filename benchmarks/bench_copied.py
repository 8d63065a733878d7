"""A push of a file no read lease can guard (copied into memory as it is cut) against the same
file mapped, measured in the same run.

    python benchmarks/bench_copied.py [--size-mb 512] [--repeat 3]

A push maps each file and guards the map with a read lease (see ``chunkstore.lease``). Where
no lease can be taken (a writer holds the file open, a file system without leases, another
user's file), the file is read into anonymous memory ahead of the cutter instead, and the
chunks to store are read again from the file, so that a file truncated meanwhile cannot end
the process with SIGBUS. Here the benchmark holds the file open for writing to force that.

One bf16 safetensors file of ``--size-mb``. Each push runs in a subprocess of its own, into a
fresh embedded store: ``first`` stores every chunk; ``again`` pushes the same file to a second
repo of that store (every chunk known: cut and hash only). ``mapped`` and ``copied`` take
turns; the fastest of ``--repeat`` counts. The file is read once first, so both read it from
the page cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench_cluster import aligned, peak_rss
from precompile import compile_package

from chunkstore.connect import connect
from chunkstore.synthetic import make_series

MODES = ("mapped", "copied")
KINDS = ("first", "again")


def run_pushes(mode: str, store: Path, src: Path) -> dict[str, dict[str, float]]:
    """Push ``src`` twice into a new store, in this process: seconds, CPU seconds and the peak
    RSS after each. With ``copied``, the file is held open for writing meanwhile."""
    out = {}
    with connect(str(store)) as repo, ExitStack() as held:
        if mode == "copied":
            held.enter_context(open(src / "model.safetensors", "r+b"))
        for kind in KINDS:
            start, cpu = time.perf_counter(), time.process_time()
            result = repo.push(src, repo=kind)
            out[kind] = {
                "seconds": time.perf_counter() - start,
                "cpu": time.process_time() - cpu,
                "rss": peak_rss(),
                "new": result.stats.new_chunks,
            }
    return out


def in_subprocess(mode: str, store: Path, src: Path) -> dict[str, dict[str, float]]:
    command = [sys.executable, "-W", "ignore", __file__, "--child", mode, str(store), str(src)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=512, help="size of the file")
    parser.add_argument("--repeat", type=int, default=3, help="fastest of N pushes per mode")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, store, src = args.child
        print(json.dumps(run_pushes(mode, Path(store), Path(src))))
        return
    compile_package()
    with tempfile.TemporaryDirectory(prefix="bench-copied-") as tmp:
        work = Path(tmp)
        src = make_series(work / "series", versions=1, size_mb=args.size_mb, tensor_mb=8)[0]
        size = (src / "model.safetensors").stat().st_size
        (src / "model.safetensors").read_bytes()  # into the page cache
        best: dict[str, dict[str, dict[str, float]]] = {}
        for _ in range(args.repeat):
            for mode in MODES:
                store = work / "store"
                shutil.rmtree(store, ignore_errors=True)
                got = in_subprocess(mode, store, src)
                for kind in KINDS:
                    kept = best.setdefault(mode, {}).get(kind)
                    if kept is None or got[kind]["seconds"] < kept["seconds"]:
                        best[mode][kind] = got[kind]
    mb = size / 1e6
    rows = [("push", "mapped MB/s", "copied MB/s", "ratio", "CPU s mapped / copied", "RSS MiB")]
    for kind in KINDS:
        mapped, copied = best["mapped"][kind], best["copied"][kind]
        rows.append(
            (
                kind,
                f"{mb / mapped['seconds']:.0f}",
                f"{mb / copied['seconds']:.0f}",
                f"{mapped['seconds'] / copied['seconds']:.2f}x",
                f"{mapped['cpu']:.2f} / {copied['cpu']:.2f}",
                f"{mapped['rss'] / 2**20:.0f} / {copied['rss'] / 2**20:.0f}",
            )
        )
    print(f"{mb:.0f} MB bf16 safetensors, embedded store, fastest of {args.repeat}")
    print(aligned(rows))
    assert best["copied"]["again"]["new"] == 0, "the copied push cut the file differently"


if __name__ == "__main__":
    main()
