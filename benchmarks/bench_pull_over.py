"""A pull onto the previous version's files against a pull into an empty directory, measured in
the same run, on the embedded store and on a local cluster.

    python benchmarks/bench_pull_over.py [--size-mb N] [--repeat N] [--nodes 3] [--no-cluster]

Two bf16 safetensors series of two versions each:

- **10% new**: the second version rewrites ~10% of the tensors and bumps the step in the
  header, which moves every tensor;
- **one step**: the second version is the first one optimizer step later (every weight
  nudged), stored as deltas against the first.

Both are pushed, then the second version is pulled into an empty directory ("fresh") and with
``--force`` onto a directory holding the first ("over"), where the chunks the old file holds
are copied from it, and a delta-coded chunk whose base it holds is rebuilt on those bytes with
only its delta fetched (:mod:`chunkstore.reuse`). Each pull runs in a subprocess of its own
(peak RSS is its alone); fresh and over take turns, the fastest of ``--repeat`` counts.
``fetched`` is the raw size of the chunks that needed the store; for the one-step series the
stored bytes those reads move are printed below the table.
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

import numpy as np
from bench_cluster import aligned, peak_rss, processes_cpu
from precompile import compile_package

from chunkstore.connect import connect
from chunkstore.progress import Tally
from chunkstore.server import local_cluster
from chunkstore.synthetic import make_series, optimizer_step, weights, write_safetensors

MiB = 1 << 20
TENSOR_MB = 8


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


def measure(
    url: str, pids: list[int], work: Path, repeat: int, repo: str
) -> dict[str, dict[str, float]]:
    """The fastest fresh and over pull of ``repo``'s latest version (with the nodes' CPU
    seconds)."""
    best: dict[str, dict[str, float]] = {}
    for _ in range(repeat):
        for kind in ("fresh", "over"):
            dest = work / "pulled"
            shutil.rmtree(dest, ignore_errors=True)
            if kind == "over":
                subprocess.run(
                    [sys.executable, __file__, "--child", url, f"{repo}~1", str(dest)],
                    check=True,
                    capture_output=True,
                )
            nodes = processes_cpu(pids)
            run = in_subprocess(url, repo, dest)
            run["nodes"] = processes_cpu(pids) - nodes
            if kind not in best or run["seconds"] < best[kind]["seconds"]:
                best[kind] = {**run, "rss": max(run["rss"], best.get(kind, {}).get("rss", 0))}
    shutil.rmtree(work / "pulled", ignore_errors=True)
    return best


def push_series(url: str, series: dict[str, list[Path]]) -> None:
    with connect(url, create=True) as repo:
        for name, versions in series.items():
            for version in versions:
                repo.push(version, name, message=version.name)


def one_step(out: Path, size_mb: float) -> list[Path]:
    """v1: bf16 weights in 8 MiB tensors; v2: v1 one optimizer step later."""
    rng = np.random.default_rng(1)
    elems = TENSOR_MB * MiB // 2
    v1 = {
        f"layers.{i}.weight": ("BF16", (elems // 1024, 1024), weights(rng, elems, "bf16"))
        for i in range(max(1, int(size_mb) // TENSOR_MB))
    }
    v2 = {
        name: (d, shape, optimizer_step(rng, flat, "bf16")) for name, (d, shape, flat) in v1.items()
    }
    paths = []
    for label, tensors in (("v1", v1), ("v2", v2)):
        (out / label).mkdir(parents=True)
        write_safetensors(out / label / "model.safetensors", tensors)
        paths.append(out / label)
    return paths


def stored_reads(url: str, repo_name: str) -> tuple[int, int]:
    """Stored bytes of the blobs a fresh pull of ``repo_name``'s latest version reads, and of
    the ones a pull over the version its deltas were coded against reads (the deltas)."""
    with connect(url) as repo:
        manifest = repo.manifest(repo.resolve(repo_name).files[0])
        refs = manifest.delta_refs()
        sizes = dict((cid, len(blob)) for cid, blob in repo.store.get(manifest.stored_ids()))
    deltas = {ref.delta for ref in refs.values()}
    return sum(sizes.values()), sum(sizes[d] for d in deltas) + sum(
        sizes[cid] for cid, _ in manifest.chunks if cid not in refs
    )


def table(results: dict[str, dict[str, dict[str, float]]], sizes: dict[str, int]) -> str:
    rows = [
        (
            "series, store",
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
        size = sizes[store.split(",")[0]]

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
        series = {
            "10% new": make_series(work / "new", versions=2, size_mb=args.size_mb, dtype="bf16"),
            "one step": one_step(work / "step", args.size_mb),
        }
        os.sync()
        sizes = {name: (v[1] / "model.safetensors").stat().st_size for name, v in series.items()}
        print(f"bf16 safetensors, {args.size_mb:.0f} MiB per version; best of {args.repeat}")
        names = {name: name.replace("% ", "-").replace(" ", "-") for name in series}
        stores = {"embedded": (str(work / "embedded"), [])}
        results = {}
        cluster_dir = work / "cluster"
        if not args.no_cluster:
            url = local_cluster.cluster_up(cluster_dir, nodes=args.nodes, replicas=2).url
            pids = list(local_cluster.running_nodes(cluster_dir).values())
            stores[f"cluster ({args.nodes} nodes)"] = (url, pids)
        try:
            for url, _ in stores.values():
                push_series(url, {names[n]: v for n, v in series.items()})
            for name in series:
                for store, (url, pids) in stores.items():
                    found = measure(url, pids, work, args.repeat, names[name])
                    results[f"{name}, {store}"] = found
        finally:
            if not args.no_cluster:
                local_cluster.cluster_down(cluster_dir)
        print(table(results, sizes))
        fresh, over = stored_reads(stores["embedded"][0], names["one step"])
        print(
            f"one step: the pull reads {fresh / 1e6:.0f} MB of stored blobs fresh, "
            f"{over / 1e6:.0f} MB over v1 (its deltas only)"
        )


if __name__ == "__main__":
    main()
