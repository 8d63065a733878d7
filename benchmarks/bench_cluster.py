"""The cluster client against the embedded store, measured in the same run.

    python benchmarks/bench_cluster.py [--size-mb N] [--nodes 3] [--replicas 2] [--rounds 2]
    python benchmarks/bench_cluster.py --files 500     # many small files instead

Makes a bf16 safetensors series of two versions (the second rewrites ~10% of the tensors), or
with ``--files N`` two trees of N files of 20-200 KB (the second rewrites ~10% of them),
starts a local cluster (node processes on loopback ports, as ``chunkstore cluster up`` does)
and, for each store, times three phases: the first push, the push of the second version (~10%
new) and a pull of it. Each phase runs in a subprocess of its own, so the peak RSS reported is
that phase's alone. To damp the noise of a shared machine the two stores take turns phase by
phase, the whole is repeated ``--rounds`` times on new stores and the pull ``--pulls`` times per
round, and the fastest run of each phase counts (with the largest RSS seen). Throughput is
logical bytes of the version per second.

A second table gives the CPU seconds of each fastest run: the client's (the phase's process,
while it ran the phase) and the nodes' (all node processes, over the phase's process), and the
most the cluster/embedded ratio could be on this machine's cores: the embedded phase's time
over the cluster's CPU spread perfectly over every core.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from precompile import compile_package

from chunkstore.connect import connect
from chunkstore.server import local_cluster
from chunkstore.synthetic import make_series

REPO = "bench"
#: Phase, and the least cluster/embedded throughput ratio aimed for.
PHASES = (("first push", 0.5), ("push, ~10% new", 0.8), ("pull", 0.6))


def small_file_trees(out: Path, files: int) -> list[Path]:
    """Two trees of ``files`` random files of 20-200 KB in a few folders (a checkpoint saved
    per rank and per shard); the second rewrites ~10% of them."""
    rng = random.Random(7)
    trees = [out / "v1", out / "v2"]
    for i in range(files):
        data = rng.randbytes(rng.randrange(20_000, 200_000))
        for tree in trees:
            if tree.name == "v2" and i % 10 == 0:
                data = rng.randbytes(len(data))
            path = tree / f"part-{i % 8}" / f"rank-{i:05}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return trees


def run_phase(phase: str, url: str, source: Path, dest: Path) -> dict[str, float]:
    """Run one phase against the store at ``url`` in this process; its seconds, CPU seconds
    and peak RSS."""
    with connect(url) as repo:
        start, cpu = time.perf_counter(), time.process_time()
        if phase == "pull":
            repo.pull(REPO, dest)
        else:
            repo.push(source, REPO, message=phase)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu": cpu, "rss": peak_rss()}


def processes_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used so far."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def peak_rss() -> int:
    """Peak resident bytes of this process: VmHWM where /proc has it, else ru_maxrss.

    On Linux ru_maxrss keeps, across exec, the peak of the parent that forked the process,
    which would report the benchmark's own peak (the generated series) for every phase.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def in_subprocess(phase: str, url: str, source: Path, dest: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--phase", phase, url, str(source), str(dest)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


Results = dict[str, dict[str, dict[str, float]]]  # store -> phase -> seconds, cpu, nodes, rss
Store = tuple[str, list[int]]  # URL, and the pids of its node processes


def measure(stores: dict[str, Store], versions: list[Path], work: Path, pulls: int) -> Results:
    """Seconds, CPU seconds and peak RSS of each phase on each (empty) store, the stores
    taking turns so that both see the same machine load; a pull is repeated ``pulls`` times."""
    steps = [
        ("first push", "push", versions[0], 1),
        ("push, ~10% new", "push", versions[1], 1),
        ("pull", "pull", versions[1], pulls),
    ]
    results: Results = {name: {} for name in stores}
    for phase, kind, source, repeat in steps:
        for name, (url, pids) in stores.items():
            for _ in range(repeat):
                dest = work / "pulled"
                nodes = processes_cpu(pids)
                run = in_subprocess(kind, url, source, dest)
                run["nodes"] = processes_cpu(pids) - nodes
                shutil.rmtree(dest, ignore_errors=True)
                results[name][phase] = best(results[name].get(phase), run)
    return results


def best(a: dict[str, float] | None, b: dict[str, float]) -> dict[str, float]:
    """The faster run (its CPU seconds too), with the larger of the two peak RSS."""
    if a is None:
        return b
    faster = a if a["seconds"] <= b["seconds"] else b
    return {**faster, "rss": max(a["rss"], b["rss"])}


def run_rounds(args: argparse.Namespace, versions: list[Path], work: Path) -> Results:
    """``args.rounds`` rounds, each on a new embedded store and a new cluster; the best of all."""
    results: Results = {}
    for round_ in range(args.rounds):
        cluster_dir, embedded = work / f"cluster-{round_}", work / f"embedded-{round_}"
        url = local_cluster.cluster_up(cluster_dir, nodes=args.nodes, replicas=args.replicas).url
        try:
            pids = list(local_cluster.running_nodes(cluster_dir).values())
            stores = {"embedded": (str(embedded), []), "cluster": (url, pids)}
            for name, phases in measure(stores, versions, work, args.pulls).items():
                for phase, run in phases.items():
                    mine = results.setdefault(name, {})
                    mine[phase] = best(mine.get(phase), run)
        finally:
            local_cluster.cluster_down(cluster_dir)
        shutil.rmtree(cluster_dir)
        shutil.rmtree(embedded)
    return results


def table(results: Results, size: int) -> str:
    rows = [("phase", "embedded MB/s", "cluster MB/s", "ratio", "target", "RSS emb/cluster MiB")]
    for phase, target in PHASES:
        emb, clu = results["embedded"][phase], results["cluster"][phase]
        emb_rate, clu_rate = size / emb["seconds"] / 1e6, size / clu["seconds"] / 1e6
        ratio = clu_rate / emb_rate
        rows.append((
            phase,
            f"{emb_rate:.0f}",
            f"{clu_rate:.0f}",
            f"{ratio:.2f}x",
            f">= {target}x {'ok' if ratio >= target else 'MISSED'}",
            f"{emb['rss'] / 2**20:.0f} / {clu['rss'] / 2**20:.0f}",
        ))  # fmt: skip
    return aligned(rows)


def cpu_table(results: Results) -> str:
    """CPU seconds of each fastest run, and the ratio this machine's cores allow at most."""
    cores = os.cpu_count() or 1
    rows = [("phase", "embedded CPU s", "cluster CPU s client / nodes", f"at most ({cores} cores)")]
    for phase, _ in PHASES:
        emb, clu = results["embedded"][phase], results["cluster"][phase]
        spread = (clu["cpu"] + clu["nodes"]) / cores
        rows.append((
            phase,
            f"{emb['cpu']:.2f}",
            f"{clu['cpu']:.2f} / {clu['nodes']:.2f}",
            f"{emb['seconds'] / spread:.2f}x",
        ))  # fmt: skip
    return aligned(rows)


def aligned(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells as text columns, each as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=256, help="size of one version")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="rounds on new stores")
    parser.add_argument("--pulls", type=int, default=2, help="pulls per store and round")
    parser.add_argument(
        "--files", type=int, help="versions of this many small files instead of one large one"
    )
    parser.add_argument("--phase", choices=("push", "pull"), help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    compile_package()
    if args.phase:  # a child: url, source, destination
        url, source, dest = args.args
        print(json.dumps(run_phase(args.phase, url, Path(source), Path(dest))))
        return

    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        work = Path(tmp)
        if args.files:
            versions = small_file_trees(work / "src", args.files)
            what = f"{args.files} files"
        else:
            versions = make_series(work / "src", versions=2, size_mb=args.size_mb, dtype="bf16")
            what = "bf16 safetensors"
        os.sync()  # no writeback of the series behind the stores' synced commits
        size = sum(f.stat().st_size for f in versions[1].rglob("*") if f.is_file())
        print(
            f"{size / 1e6:.0f} MB of {what} per version; cluster of {args.nodes} nodes, "
            f"{args.replicas} replicas, on {local_cluster.HOST}",
            flush=True,
        )
        results = run_rounds(args, versions, work)
        print(table(results, size))
        print()
        print(cpu_table(results))
        print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
