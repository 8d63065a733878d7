"""A pull onto the previous version's files against a pull into an empty directory, measured in
the same run, on the embedded store and on a local cluster.

    python benchmarks/bench_pull_over.py [--size-mb N] [--repeat N] [--nodes 3] [--no-cluster]

Makes a bf16 safetensors series of two versions (the second rewrites ~10% of the tensors and
bumps the step in the header, which moves every tensor), pushes both, then times pulls of the
second: into an empty directory ("fresh"), and with ``--force`` onto a directory holding the
first ("over"), where the chunks the old file holds are copied from it instead of fetched
(:mod:`chunkstore.reuse`). Each pull runs in a subprocess of its own (peak RSS is its alone);
fresh and over take turns, the fastest of ``--repeat`` counts. ``fetched`` is the raw size of
the chunks that came from the store rather than the old files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_cluster import aligned, peak_rss, processes_cpu
from precompile import compile_package

from chunkstore.connect import connect
from chunkstore.progress import Tally
from chunkstore.server import local_cluster
from chunkstore.synthetic import make_series

REPO = "bench"


def run_pull(url: str, ref: str, dest: Path) -> dict[str, float]:
    """Pull ``ref`` into ``dest`` (with --force) in this process: seconds, CPU seconds, peak
    RSS and the raw bytes that came from the store."""
    with connect(url) as repo:
        tally = Tally()
        start, cpu = time.perf_counter(), time.process_time()
        repo.pull(ref, dest, force=True, progress=tally)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu": cpu, "rss": peak_rss(), "fetched": tally.new}


def in_subprocess(url: str, ref: str, dest: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", url, ref, str(dest)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def measure(url: str, pids: list[int], work: Path, repeat: int) -> dict[str, dict[str, float]]:
    """The fastest fresh and over pull of the second version (with the nodes' CPU seconds)."""
    best: dict[str, dict[str, float]] = {}
    for _ in range(repeat):
        for kind in ("fresh", "over"):
            dest = work / "pulled"
            shutil.rmtree(dest, ignore_errors=True)
            if kind == "over":
                subprocess.run(
                    [sys.executable, __file__, "--child", url, f"{REPO}~1", str(dest)],
                    check=True,
                    capture_output=True,
                )
            nodes = processes_cpu(pids)
            run = in_subprocess(url, REPO, dest)
            run["nodes"] = processes_cpu(pids) - nodes
            if kind not in best or run["seconds"] < best[kind]["seconds"]:
                best[kind] = {**run, "rss": max(run["rss"], best.get(kind, {}).get("rss", 0))}
    shutil.rmtree(work / "pulled", ignore_errors=True)
    return best


def push_series(url: str, versions: list[Path]) -> None:
    with connect(url, create=True) as repo:
        for version in versions:
            repo.push(version, REPO, message=version.name)


def table(results: dict[str, dict[str, dict[str, float]]], size: int) -> str:
    rows = [
        (
            "store",
            "fresh MB/s",
            "over MB/s",
            "over x",
            "fetched MB fresh/over",
            "CPU s client (nodes) fresh/over",
            "peak RSS MiB fresh/over",
        )
    ]
    for store, runs in results.items():
        fresh, over = runs["fresh"], runs["over"]

        def cpu(run: dict[str, float]) -> str:
            return f"{run['cpu']:.2f}" + (f" ({run['nodes']:.2f})" if run["nodes"] else "")

        rows.append(
            (
                store,
                f"{size / fresh['seconds'] / 1e6:.0f}",
                f"{size / over['seconds'] / 1e6:.0f}",
                f"{fresh['seconds'] / over['seconds']:.2f}x",
                f"{fresh['fetched'] / 1e6:.0f} / {over['fetched'] / 1e6:.0f}",
                f"{cpu(fresh)} / {cpu(over)}",
                f"{fresh['rss'] / 2**20:.0f} / {over['rss'] / 2**20:.0f}",
            )
        )
    return aligned(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=256, help="size of one version")
    parser.add_argument("--repeat", type=int, default=3, help="pulls of each kind per store")
    parser.add_argument("--nodes", type=int, default=3, help="nodes of the local cluster")
    parser.add_argument("--no-cluster", action="store_true", help="the embedded store only")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, ref, dest = args.child
        print(json.dumps(run_pull(url, ref, Path(dest))))
        return
    compile_package()
    with tempfile.TemporaryDirectory(prefix="bench-pull-over-") as tmp:
        work = Path(tmp)
        versions = make_series(work / "src", versions=2, size_mb=args.size_mb, dtype="bf16")
        os.sync()
        size = (versions[1] / "model.safetensors").stat().st_size
        print(f"{size / 1e6:.0f} MB bf16 safetensors, ~10% of tensors new; best of {args.repeat}")
        results = {}
        embedded = str(work / "embedded")
        push_series(embedded, versions)
        results["embedded"] = measure(embedded, [], work, args.repeat)
        if not args.no_cluster:
            cluster_dir = work / "cluster"
            url = local_cluster.cluster_up(cluster_dir, nodes=args.nodes, replicas=2)
            try:
                push_series(url, versions)
                pids = list(local_cluster.running_nodes(cluster_dir).values())
                results[f"cluster ({args.nodes} nodes)"] = measure(url, pids, work, args.repeat)
            finally:
                local_cluster.cluster_down(cluster_dir)
        print(table(results, size))


if __name__ == "__main__":
    main()
