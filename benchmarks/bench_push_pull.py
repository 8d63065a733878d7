"""Push and pull of a checkpoint series on the embedded store, against cp, borg, restic and DVC.

    python benchmarks/bench_push_pull.py [--size-mb N] [--dtype bf16|fp32|both] [--repeat N]
                                         [--keep DIR] [--json PATH]

What is measured, for each tool on the same generated files in the same run:

- **Files**: ``chunkstore.synthetic.make_series`` writes three safetensors checkpoints of
  ``--size-mb`` MiB each (v2 and v3 each re-draw ~10% of the tensors of the one before), plus a
  header-only variant of v1: the same tensor bytes under a longer ``__metadata__``, so every
  offset after the header shifts by a few bytes.
- **Phases**: push v1 (first push), push v2 and v3 (~10% new each), push the header-only variant
  (new bytes stored as a share of the file's size), and pull v3 into a fresh directory (checked
  byte for byte against the source afterwards, untimed). Throughput is the version's logical
  size over wall time, in MB/s (MB = 10^6 bytes), and includes each CLI's start-up; CPU
  seconds (user + system, all threads) per GB of it are reported too, since they vary less
  than wall time on a shared machine.
- **Stored / logical**: bytes the tool says it stores (``chunkstore stats --json``, ``borg info
  --json`` unique_csize, ``restic stats --mode raw-data``) after v1-v3, over their total size;
  and the repository's allocated size on disk (like ``du``) over the same total.
- **Peak RSS**: every phase runs as a command in a small wrapper process that reports
  ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of its one child, so the figure is that phase's alone
  (the series is generated in a child process, so the benchmark itself stays small). It counts
  mapped file pages (a memory-mapped source, an LMDB map) as the kernel does; the wrapper also
  samples the child's anonymous memory (``RssAnon``) every 20 ms, shown in brackets.
- **Targets** (DESIGN.md, "Performance"): first push >= borg lz4's speed; stored bytes < borg
  zstd's; a ~10%-new push >= 2x the faster borg; pull >= 1.4x the faster ``borg extract``;
  header-only change < 1% of the file stored anew; client peak RSS < 300 MB (for a 4 GB file).

Tools: ``chunkstore`` (CLI, embedded LMDB store in a temp dir via ``CHUNKSTORE_STORE``, ``-q``);
``cp -r`` (push = copy into a repo directory, then fsync the copies, since the stores sync their
writes; pull = copy back); ``borg`` (``init --encryption none``; ``create --files-cache disabled``
with ``--compression lz4`` and, in a second repository, ``zstd,3``; ``extract``) and ``restic``
(``init``, ``backup --force``, ``restore``) and ``dvc`` (see :class:`Dvc`) when installed,
otherwise skipped with a note. No tool
uses a cache of file metadata to skip reading: each reads every byte it stores, as a new
checkpoint file would require anyway. With ``--repeat N`` every tool runs N times, the tools
taking turns, and each figure is the best of the N (the largest peak RSS).

The page cache is not dropped (that needs root and would disturb other work on the machine):
each push reads its source once before the timed run, so every tool reads from a warm cache;
pending writes are flushed (``sync``) before each timed phase, so that one tool's write-back does
not slow the next; pulls write into the page cache without fsync (no tool syncs on restore).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from precompile import compile_package

from chunkstore.synthetic import DTYPES, make_series, write_safetensors

MB = 1_000_000
REPO = "bench"
SERIES = ("v1", "v2", "v3")  # labels of the three versions; v2 and v3 are ~10% new
HEADER = "header"  # label of the header-only variant of v1
PULLED = "v3"  # the version every tool restores

#: Runs a command; writes to argv[1] its exit code, wall seconds and, from getrusage of that one
#: child, peak RSS and CPU seconds, plus the peak anonymous RSS sampled from /proc every 20 ms.
_WRAPPER = """
import json, resource, subprocess, sys, threading, time
def anon_rss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0
def sample(child, peak):
    while child.poll() is None:
        peak[0] = max(peak[0], anon_rss(child.pid))
        time.sleep(0.02)
start = time.perf_counter()
child = subprocess.Popen(sys.argv[2:])
peak = [0]
threading.Thread(target=sample, args=(child, peak), daemon=True).start()
rc = child.wait()
seconds = time.perf_counter() - start
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "seconds": seconds, "maxrss_kib": ru.ru_maxrss,
               "cpu": ru.ru_utime + ru.ru_stime, "anon": peak[0]}, f)
"""


# -- measuring one command ---------------------------------------------------------------------


@dataclass
class Run:
    """One timed command: wall and CPU seconds, peak resident bytes (all, and anonymous memory
    only, i.e. without mapped file pages; sampled, so a short peak may be missed), its output."""

    seconds: float
    cpu: float
    rss: int
    anon_rss: int
    stdout: str = ""


class CommandFailed(RuntimeError):
    pass


def measured(cmd: Sequence[str | Path], env: dict[str, str], cwd: Path | None = None) -> Run:
    """Run ``cmd`` under the wrapper; raise CommandFailed with its stderr if it fails.

    Dirty pages are written back first, so that one phase's writes do not slow the next.
    """
    os.sync()
    with tempfile.NamedTemporaryFile("r", suffix=".json") as report:
        proc = subprocess.run(
            [sys.executable, "-c", _WRAPPER, report.name, *map(str, cmd)],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
        )
        text = report.read()
    figures = json.loads(text) if text else {"rc": proc.returncode}
    if proc.returncode or figures["rc"]:
        raise CommandFailed(f"{' '.join(map(str, cmd))} failed: {proc.stderr.strip()[-2000:]}")
    return Run(
        figures["seconds"],
        figures["cpu"],
        figures["maxrss_kib"] * 1024,
        figures["anon"],
        proc.stdout,
    )


def output(cmd: Sequence[str | Path], env: dict[str, str], cwd: Path | None = None) -> str:
    """Stdout of an untimed command; raise CommandFailed if it fails."""
    proc = subprocess.run(list(map(str, cmd)), env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise CommandFailed(f"{' '.join(map(str, cmd))} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def disk_usage(path: Path) -> int:
    """Allocated bytes of the files under ``path``, as ``du`` counts them."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(
        (Path(root) / name).stat().st_blocks * 512
        for root, _, files in os.walk(path)
        for name in files
    )


def read_through(path: Path) -> None:
    """Read every file under ``path`` once, so that a timed read finds it in the page cache."""
    files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass


def same_tree(a: Path, b: Path) -> bool:
    """Whether two directories hold the same relative file names with the same bytes."""
    names_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    names_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return names_a == names_b and all(same_file(a / n, b / n) for n in names_a)


def same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            block = fa.read(16 << 20)
            if block != fb.read(16 << 20):
                return False
            if not block:
                return True


# -- the generated files -----------------------------------------------------------------------


def generate(out_dir: Path, size_mb: float, dtype: str) -> dict[str, Path]:
    """Write the series and the header-only variant in a child process; label -> directory.

    The child holds the series in memory while writing it; doing that elsewhere keeps this
    process small, so that the processes it starts do not inherit a large peak RSS.
    """
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_generate, args=(out_dir, size_mb, dtype))
    child.start()
    child.join()
    if child.exitcode:
        raise RuntimeError(f"generating the series failed (exit code {child.exitcode})")
    dirs = sorted(p for p in out_dir.iterdir() if p.name.startswith("step-"))
    return {**dict(zip(SERIES, dirs, strict=True)), HEADER: out_dir / "header-only"}


def _generate(out_dir: Path, size_mb: float, dtype: str) -> None:
    v1 = make_series(
        out_dir, versions=len(SERIES), size_mb=size_mb, dtype=dtype, changed_share=0.1
    )[0]
    header_dir = out_dir / "header-only"
    header_dir.mkdir()
    write_header_variant(v1 / "model.safetensors", header_dir / "model.safetensors")


def write_header_variant(source: Path, dest: Path) -> None:
    """Rewrite ``source`` with a longer ``__metadata__``; the tensor bytes stay the same."""
    with open(source, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(source, dtype=np.uint8, mode="r", offset=8 + header_len)
    metadata = {**header.pop("__metadata__", {}), "note": "header-only change"}
    by_safetensors_name = {name: np.dtype(f"u{size}") for name, size in DTYPES.values()}
    tensors = {}
    for name, info in header.items():  # in file order: write_safetensors keeps dict order
        start, end = info["data_offsets"]
        flat = data[start:end].view(by_safetensors_name[info["dtype"]])
        tensors[name] = (info["dtype"], tuple(info["shape"]), flat)
    write_safetensors(dest, tensors, metadata)
    shift = dest.stat().st_size - source.stat().st_size
    if not 0 < shift <= 64:
        raise AssertionError(f"header-only variant shifted the data by {shift} bytes")


# -- the tools ---------------------------------------------------------------------------------


class Tool:
    """A way of storing versions of a directory and restoring one. Subclasses fill in the
    commands; ``work`` is a directory of the tool's own that is deleted after its run."""

    name = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.repo = work / "repo"
        self.env = {**os.environ, "LC_ALL": "C"}

    def setup(self) -> None:
        """Create an empty repository (untimed)."""

    def push(self, source: Path, label: str) -> Run:
        raise NotImplementedError

    def pull(self, label: str, dest: Path) -> Run:
        raise NotImplementedError

    def stored_bytes(self) -> int:
        """Bytes of data the tool says it stores (its own accounting)."""
        return disk_usage(self.repo)

    def disk_bytes(self) -> int:
        return disk_usage(self.repo)


class Chunkstore(Tool):
    name = "chunkstore"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.env["CHUNKSTORE_STORE"] = str(self.repo)
        self.cli = _chunkstore_cli()

    def push(self, source: Path, label: str) -> Run:
        return measured(
            [
                *self.cli,
                "push",
                source,
                "--repo",
                REPO,
                "--tag",
                label,
                "-m",
                label,
                "-q",
                "--json",
            ],
            self.env,
        )

    def pull(self, label: str, dest: Path) -> Run:
        return measured([*self.cli, "pull", f"{REPO}@{label}", dest, "-q"], self.env)

    def stored_bytes(self) -> int:
        return json.loads(output([*self.cli, "stats", "--json"], self.env))["stored_bytes"]


def _chunkstore_cli() -> list[str]:
    """The ``chunkstore`` script beside this interpreter, else the module."""
    script = Path(sys.executable).with_name("chunkstore")
    return [str(script)] if script.exists() else [sys.executable, "-m", "chunkstore.client.cli"]


class Copy(Tool):
    name = "cp"
    _COPY_AND_SYNC = 'cp -r "$1" "$2" && find "$2" -type f -exec sync {} +'

    def setup(self) -> None:
        self.repo.mkdir(parents=True)

    def push(self, source: Path, label: str) -> Run:
        return measured(
            ["sh", "-c", self._COPY_AND_SYNC, "sh", source, self.repo / label], self.env
        )

    def pull(self, label: str, dest: Path) -> Run:
        return measured(["cp", "-r", self.repo / label, dest], self.env)


class Borg(Tool):
    def __init__(self, work: Path, compression: str) -> None:
        super().__init__(work)
        self.compression = compression
        self.name = f"borg {compression.split(',')[0]}"
        self.env.update(
            BORG_BASE_DIR=str(work / "borg-home"),
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
            BORG_PASSPHRASE="",
            BORG_DISPLAY_PASSPHRASE="no",
            BORG_EXIT_CODES="legacy",
        )

    def setup(self) -> None:
        output(["borg", "init", "--encryption", "none", self.repo], self.env)

    def push(self, source: Path, label: str) -> Run:
        return measured(
            [
                "borg",
                "create",
                "--compression",
                self.compression,
                "--files-cache",
                "disabled",
                f"{self.repo}::{label}",
                ".",
            ],
            self.env,
            cwd=source,
        )

    def pull(self, label: str, dest: Path) -> Run:
        dest.mkdir(parents=True)
        return measured(["borg", "extract", f"{self.repo}::{label}"], self.env, cwd=dest)

    def stored_bytes(self) -> int:
        info = json.loads(output(["borg", "info", "--json", self.repo], self.env))
        return info["cache"]["stats"]["unique_csize"]


class Restic(Tool):
    name = "restic"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.env.update(
            RESTIC_REPOSITORY=str(self.repo),
            RESTIC_PASSWORD="benchmark",
            RESTIC_CACHE_DIR=str(work / "cache"),
            RESTIC_PROGRESS_FPS="0.01",
        )

    def setup(self) -> None:
        output(["restic", "init"], self.env)

    def push(self, source: Path, label: str) -> Run:
        return measured(
            ["restic", "backup", "--force", "--host", "bench", "--tag", label, "-q", "."],
            self.env,
            cwd=source,
        )

    def pull(self, label: str, dest: Path) -> Run:
        return measured(
            ["restic", "restore", "latest", "--tag", label, "--target", dest, "-q"], self.env
        )

    def stored_bytes(self) -> int:
        stats = json.loads(output(["restic", "stats", "--mode", "raw-data", "--json"], self.env))
        return stats["total_size"]


class Dvc(Tool):
    """DVC with a local remote, as an ML engineer versions a checkpoint directory with it: the
    version is copied into the workspace untimed (training writes it there), then ``dvc add``
    (MD5 of every file, a copy into DVC's cache) and ``dvc push`` (a copy to the remote) are
    timed; each version's ``.dvc`` file is kept, as git would keep it. A pull is ``dvc pull``
    of that ``.dvc`` file into a new workspace with an empty cache."""

    name = "dvc"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.workspace = work / "workspace"
        self.repo = work / "remote"  # what is stored: the remote
        self.env.update(DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(work / "site-cache"))

    def setup(self) -> None:
        self.repo.mkdir(parents=True)
        self._init(self.workspace)

    def _init(self, workspace: Path) -> None:
        workspace.mkdir(parents=True)
        output(["dvc", "init", "--no-scm", "-q"], self.env, cwd=workspace)
        output(["dvc", "remote", "add", "-d", "store", self.repo], self.env, cwd=workspace)

    def push(self, source: Path, label: str) -> Run:
        checkpoint = self.workspace / "ckpt"
        shutil.rmtree(checkpoint, ignore_errors=True)
        shutil.copytree(source, checkpoint)
        add = measured(["dvc", "add", "-q", "ckpt"], self.env, cwd=self.workspace)
        push = measured(["dvc", "push", "-q", "ckpt.dvc"], self.env, cwd=self.workspace)
        shutil.copy(self.workspace / "ckpt.dvc", self.work / f"{label}.dvc")
        return Run(
            add.seconds + push.seconds,
            add.cpu + push.cpu,
            max(add.rss, push.rss),
            max(add.anon_rss, push.anon_rss),
        )

    def pull(self, label: str, dest: Path) -> Run:
        workspace = self.work / "pull-workspace"
        self._init(workspace)
        shutil.copy(self.work / f"{label}.dvc", workspace / "ckpt.dvc")
        run = measured(["dvc", "pull", "-q", "ckpt.dvc"], self.env, cwd=workspace)
        (workspace / "ckpt").rename(dest)
        return run


#: Column order of the table: (column name, factory, executable it needs or None).
TOOLS: list[tuple[str, Callable[[Path], Tool], str | None]] = [
    ("chunkstore", Chunkstore, None),
    ("cp", Copy, "cp"),
    ("borg lz4", lambda work: Borg(work, "lz4"), "borg"),
    ("borg zstd", lambda work: Borg(work, "zstd,3"), "borg"),
    ("restic", Restic, "restic"),
    ("dvc", Dvc, "dvc"),
]


# -- one tool's run ----------------------------------------------------------------------------

PULL = "pull"  # the phase key of the pull; pushes are keyed by the version's label


@dataclass
class Phase:
    """One timed phase: throughput (MB/s), CPU seconds per GB handled, peak RSS in bytes."""

    mb_s: float
    cpu_s_per_gb: float
    rss: int
    anon_rss: int

    @classmethod
    def of(cls, run: Run, size: int) -> Phase:
        return cls(size / run.seconds / MB, run.cpu / (size / 1e9), run.rss, run.anon_rss)

    def best_of(self, other: Phase) -> Phase:
        """The faster and cheaper figures of two runs, the larger peaks."""
        return Phase(
            max(self.mb_s, other.mb_s),
            min(self.cpu_s_per_gb, other.cpu_s_per_gb),
            max(self.rss, other.rss),
            max(self.anon_rss, other.anon_rss),
        )


@dataclass
class Figures:
    """Everything measured for one tool; sizes in bytes."""

    phases: dict[str, Phase] = field(default_factory=dict)  # "v1".."v3", HEADER, PULL
    header_new_bytes: int = 0  # stored by the header-only push (tool's accounting)
    header_new_disk: int = 0  # growth of the repository on disk by that push
    stored_bytes: int = 0  # after v1-v3 (tool's accounting)
    disk_bytes: int = 0  # after v1-v3, allocated on disk
    logical_bytes: int = 0  # of v1-v3

    def best_of(self, other: Figures) -> Figures:
        """Per phase the best of both runs (see Phase.best_of); sizes of ``other``."""
        best = Figures(**{**other.__dict__})
        best.phases = {k: p.best_of(self.phases[k]) for k, p in other.phases.items()}
        return best


def run_tool(tool: Tool, files: dict[str, Path], keep: bool) -> Figures:
    """Push v1-v3, measure the store, push the header-only variant, pull v3 and check it."""
    figures = Figures()
    tool.work.mkdir(parents=True)
    tool.setup()
    for label in SERIES:
        figures.phases[label] = push(tool, files[label], label)
    figures.stored_bytes, figures.disk_bytes = tool.stored_bytes(), tool.disk_bytes()
    figures.logical_bytes = sum(tree_size(files[label]) for label in SERIES)
    figures.phases[HEADER] = push(tool, files[HEADER], HEADER)
    figures.header_new_bytes = tool.stored_bytes() - figures.stored_bytes
    figures.header_new_disk = tool.disk_bytes() - figures.disk_bytes
    dest = tool.work / "pulled"
    figures.phases[PULL] = Phase.of(tool.pull(PULLED, dest), tree_size(files[PULLED]))
    if not same_tree(files[PULLED], dest):
        raise AssertionError(f"{tool.name}: the pulled files differ from the pushed ones")
    if not keep:
        shutil.rmtree(tool.work)
    return figures


def push(tool: Tool, source: Path, label: str) -> Phase:
    read_through(source)
    return Phase.of(tool.push(source, label), tree_size(source))


def tree_size(path: Path) -> int:
    """Logical bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- the report --------------------------------------------------------------------------------


@dataclass
class Target:
    what: str
    goal: str
    met: bool | None  # None: a baseline is missing
    measured: str


def targets(results: dict[str, Figures], file_bytes: int) -> list[Target]:
    """The performance targets of DESIGN.md, each against the same run's baselines."""
    cs = results["chunkstore"]
    borgs = {k: v for k, v in results.items() if k.startswith("borg")}
    lz4, zstd = borgs.get("borg lz4"), borgs.get("borg zstd")
    fastest_borg_v2 = max((b.phases["v2"].mb_s for b in borgs.values()), default=None)
    fastest_borg_pull = max((b.phases[PULL].mb_s for b in borgs.values()), default=None)
    header_share = cs.header_new_bytes / file_bytes
    rss = max(p.rss for p in cs.phases.values())
    anon = max(p.anon_rss for p in cs.phases.values())
    size = f"{file_bytes / MB:.0f} MB"
    size_note = "" if file_bytes >= 4e9 else f"; the target is for 4 GB, this file is {size}"
    return [
        ratio_target(
            "first push speed vs borg lz4",
            cs.phases["v1"].mb_s,
            lz4.phases["v1"].mb_s if lz4 else None,
            1.0,
        ),
        ratio_target(
            "stored bytes (v1-v3) vs borg zstd",
            cs.stored_bytes,
            zstd.stored_bytes if zstd else None,
            1.0,
            higher=False,
        ),
        ratio_target(
            "10%-new push (v2) speed vs fastest borg", cs.phases["v2"].mb_s, fastest_borg_v2, 2.0
        ),
        ratio_target(
            "pull speed vs fastest borg extract", cs.phases[PULL].mb_s, fastest_borg_pull, 1.4
        ),
        Target(
            "header-only change: new bytes stored",
            "< 1%",
            header_share < 0.01,
            f"{header_share:.4%} of the file",
        ),
        Target(
            "client peak RSS, max of phases",
            "< 300 MB",
            rss < 300 * MB,
            f"{rss / MB:.0f} MB (anonymous memory {anon / MB:.0f} MB{size_note})",
        ),
    ]


def ratio_target(
    what: str, ours: float, theirs: float | None, goal: float, higher: bool = True
) -> Target:
    """``ours / theirs`` against ``goal`` (at least it if ``higher``, else less than it)."""
    sign = ">=" if higher else "<"
    if theirs is None:
        return Target(what, f"{sign} {goal:g}x", None, "n/a: borg is not installed")
    value = ours / theirs
    return Target(
        what, f"{sign} {goal:g}x", value >= goal if higher else value < goal, f"{value:.2f}x"
    )


def table(results: dict[str, Figures], skipped: dict[str, str], file_bytes: int) -> str:
    """The figures as a text table, one column per tool."""

    def speed(key: str) -> Callable[[Figures], str]:
        return lambda f: f"{f.phases[key].mb_s:.0f}"

    def cpu(key: str) -> Callable[[Figures], str]:
        return lambda f: f"{f.phases[key].cpu_s_per_gb:.2f}"

    def rss(key: str) -> Callable[[Figures], str]:
        return lambda f: f"{f.phases[key].rss / MB:.0f} ({f.phases[key].anon_rss / MB:.0f})"

    rows: list[tuple[str, Callable[[Figures], str]]] = [
        ("first push (v1), MB/s", speed("v1")),
        ("10%-new push (v2), MB/s", speed("v2")),
        ("10%-new push (v3), MB/s", speed("v3")),
        ("header-only push, MB/s", speed(HEADER)),
        ("header-only: new stored, % of file", lambda f: f"{f.header_new_bytes / file_bytes:.4%}"),
        ("header-only: repo growth on disk", lambda f: f"{f.header_new_disk / file_bytes:.4%}"),
        ("pull (v3), MB/s", speed(PULL)),
        ("stored / logical (v1-v3)", lambda f: f"{f.stored_bytes / f.logical_bytes:.3f}"),
        ("on disk / logical (v1-v3)", lambda f: f"{f.disk_bytes / f.logical_bytes:.3f}"),
        ("CPU s per GB: first push", cpu("v1")),
        ("CPU s per GB: 10%-new push (v2)", cpu("v2")),
        ("CPU s per GB: pull", cpu(PULL)),
        ("peak RSS (anon), MB: first push", rss("v1")),
        ("peak RSS (anon), MB: 10%-new push", rss("v2")),
        ("peak RSS (anon), MB: header-only", rss(HEADER)),
        ("peak RSS (anon), MB: pull", rss(PULL)),
    ]
    columns = [name for name, _, _ in TOOLS]
    width = max(len(label) for label, _ in rows) + 1
    lines = [f"{'':<{width}}" + "".join(f"{c:>12}" for c in columns)]
    for label, cell in rows:
        cells = [cell(results[c]) if c in results else "skipped" for c in columns]
        lines.append(f"{label:<{width}}" + "".join(f"{x:>12}" for x in cells))
    lines += [f"  {name}: {why}" for name, why in skipped.items()]
    return "\n".join(lines)


def target_lines(found: list[Target]) -> str:
    width = max(len(t.what) for t in found) + 2
    lines = [f"{'target':<{width}}{'goal':>10}  verdict  measured"]
    for t in found:
        verdict = {True: "met", False: "MISSED", None: "-"}[t.met]
        lines.append(f"{t.what:<{width}}{t.goal:>10}  {verdict:<7}  {t.measured}")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


def available_tools(
    only: set[str] | None = None,
) -> tuple[list[tuple[str, Callable[[Path], Tool]]], dict[str, str]]:
    """The tools to run (those in ``only``, if given), and the skipped ones with the reason."""
    chosen, skipped = [], {}
    for name, factory, executable in TOOLS:
        if only is not None and name.split()[0] not in only:
            skipped[name] = "skipped: not in --tools"
        elif executable and shutil.which(executable) is None:
            skipped[name] = f"skipped: `{executable}` is not installed"
        else:
            chosen.append((name, factory))
    return chosen, skipped


def bench_dtype(
    dtype: str, size_mb: float, repeat: int, root: Path, keep: bool, only: set[str] | None
) -> dict:
    """Generate one series and run every tool (of ``only``) on it ``repeat`` times; return all
    figures."""
    say(f"generating {len(SERIES)} x {size_mb:g} MB {dtype} checkpoints + header-only variant")
    files = generate(root / f"series-{dtype}", size_mb, dtype)
    file_bytes = tree_size(files["v1"])
    tools, skipped = available_tools(only)
    results: dict[str, Figures] = {}
    for attempt in range(repeat):
        for name, factory in tools:  # interleaved, so that load from elsewhere hits all alike
            say(f"run {attempt + 1}/{repeat}: {name}")
            work = root / f"{dtype}-{name.replace(' ', '-')}-{attempt + 1}"
            figures = run_tool(factory(work), files, keep)
            results[name] = results[name].best_of(figures) if name in results else figures
    if not keep:
        shutil.rmtree(files["v1"].parent)
    found = targets(results, file_bytes)
    title = (
        f"{dtype}, {file_bytes / MB:.0f} MB per version, 2x ~10% new, "
        f"best of {repeat} run(s), {os.cpu_count()} cores, page cache warm"
    )
    print(
        f"\n== {title}\n{table(results, skipped, file_bytes)}\n\n{target_lines(found)}\n",
        flush=True,
    )
    return {
        "dtype": dtype,
        "file_bytes": file_bytes,
        "repeat": repeat,
        "results": {name: asdict(f) for name, f in results.items()},
        "skipped": skipped,
        "targets": [asdict(t) for t in found],
    }


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size-mb",
        type=float,
        default=256,
        help="size of each checkpoint in MiB, as chunkstore.synthetic counts "
        "(default 256; e.g. 4096)",
    )
    parser.add_argument("--dtype", choices=["bf16", "fp32", "both"], default="bf16")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every tool N times and keep each figure's best (default 1)",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="work in DIR and keep everything there (default: a temp dir, removed at the end)",
    )
    parser.add_argument(
        "--tools",
        metavar="NAMES",
        help="comma-separated tools to run (default all: chunkstore,cp,borg,restic); "
        "e.g. chunkstore,borg where disk is short for cp's full copies",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write all figures as JSON to PATH ('-': stdout, and the tables go to stderr)",
    )
    args = parser.parse_args()
    compile_package()
    if args.json and str(args.json) == "-":
        sys.stdout = sys.stderr
    dtypes = ["bf16", "fp32"] if args.dtype == "both" else [args.dtype]
    only = None
    if args.tools:
        only = {name.strip() for name in args.tools.split(",") if name.strip()}
        known = {name.split()[0] for name, _, _ in TOOLS}
        if not only <= known or "chunkstore" not in only:
            parser.error(f"--tools {args.tools}: choose chunkstore and any of {sorted(known)}")
    if args.keep:
        if args.keep.exists() and any(args.keep.iterdir()):
            parser.error(f"--keep {args.keep}: the directory is not empty")
        args.keep.mkdir(parents=True, exist_ok=True)
        root, cleanup = args.keep, None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="bench-push-pull-")
        root = Path(cleanup.name)
    try:
        report = [
            bench_dtype(d, args.size_mb, args.repeat, root, bool(args.keep), only) for d in dtypes
        ]
    finally:
        if cleanup:
            cleanup.cleanup()
    if args.json:
        text = json.dumps(report, indent=2)
        if str(args.json) == "-":
            sys.__stdout__.write(text + "\n")
        else:
            args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
