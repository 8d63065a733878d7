"""The command line as a user drives it: output shapes, --json, exit codes, one-line errors."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence

import pytest
from conftest import failing_fallocate, random_bytes, tree_bytes, write

from chunkstore import filespace
from chunkstore.client.cli import build_parser, main
from chunkstore.errors import ChunkstoreError
from chunkstore.stores.lmdb_store import LmdbStore

MB = 1 << 20


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli(*argv: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chunkstore.client.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        **kw,
    )


@pytest.fixture
def two_versions(env_store, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    write(ckpt / "model.bin", random_bytes(2 * MB, seed=1))
    write(ckpt / "config.json", b"{}")
    assert (
        run(
            capsys,
            "push",
            str(ckpt),
            "--repo",
            "llama-ft",
            "-m",
            "step 1000",
            "--tag",
            "v1",
            "--param",
            "lr=3e-4",
            "--metric",
            "loss=2.31",
        )[0]
        == 0
    )
    write(ckpt / "config.json", b'{"a": 1}')
    code, out, _ = run(
        capsys,
        "push",
        str(ckpt),
        "--repo",
        "llama-ft",
        "-m",
        "step 2000",
        "--tag",
        "v2",
        "--metric",
        "loss=2.05",
    )
    assert code == 0
    return ckpt, out


def test_push_summary_line(two_versions):
    _, out = two_versions
    assert out.startswith("pushed llama-ft@") and "[v2]" in out
    assert "new (" in out and "% deduplicated" in out


def test_log_json_shape(two_versions, capsys):
    code, out, _ = run(capsys, "log", "llama-ft", "--json")
    log = json.loads(out)
    assert code == 0 and [v["message"] for v in log] == ["step 2000", "step 1000"]
    for key in ("id", "message", "tags", "params", "metrics", "created", "size"):
        assert key in log[0]
    assert log[1]["params"] == {"lr": "3e-4"} and log[0]["metrics"] == {"loss": 2.05}
    assert log[0]["tags"] == ["v2"]
    code, out, _ = run(capsys, "log", "llama-ft")
    assert code == 0 and "step 2000" in out.splitlines()[0] and "[v1]" in out.splitlines()[1]
    code, out, _ = run(capsys, "log", "llama-ft", "-n", "1", "--json")
    assert code == 0 and [v["message"] for v in json.loads(out)] == ["step 2000"]
    for limit in ("-1", "0"):
        code, out, err = run(capsys, "log", "llama-ft", "-n", limit)
        assert (code, out) == (2, "") and f"a log limit must be at least 1, not {limit}" in err


def test_log_shows_a_message_of_several_lines_on_one(env_store, tmp_path, capsys):
    write(tmp_path / "d" / "a.txt", b"a")
    code, _, err = run(
        capsys, "push", str(tmp_path / "d"), "--repo", "m", "-m", "fix\n\nlong story"
    )
    assert code == 0, err
    code, out, _ = run(capsys, "log", "m")
    assert code == 0 and len(out.splitlines()) == 1 and out.rstrip().endswith("stored  fix ...")
    code, out, _ = run(capsys, "log", "m", "--json")
    assert json.loads(out)[0]["message"] == "fix\n\nlong story"  # kept whole


def test_diff_json_shape(two_versions, capsys):
    code, out, _ = run(capsys, "diff", "llama-ft@v1", "llama-ft@v2", "--json")
    d = json.loads(out)
    assert code == 0
    assert d["modified"][0]["path"] == "config.json" and d["added"] == [] and d["removed"] == []
    assert d["metrics"] == {"loss": {"old": 2.31, "new": 2.05}}
    assert d["params"] == {"lr": {"old": "3e-4", "new": None}}
    # ~ names the version before: the same diff as by tags
    assert run(capsys, "diff", "llama-ft~", "llama-ft", "--json")[1] == out
    code, _, err = run(capsys, "diff", "llama-ft~2", "llama-ft")
    assert code != 0 and "llama-ft~2 does not exist" in err and "\n" not in err.strip()
    # one ref: what that version changed against the one before
    assert run(capsys, "diff", "llama-ft", "--json")[1] == out
    assert run(capsys, "diff", "llama-ft@v2", "--json")[1] == out
    # the first version: everything in it is added
    code, out, _ = run(capsys, "diff", "llama-ft~1", "--json")
    first = json.loads(out)
    assert code == 0 and first["old"] is None and first["new"].startswith("llama-ft@")
    assert sorted(f["path"] for f in first["added"]) == ["config.json", "model.bin"]
    code, out, err = run(capsys, "diff", "llama-ft~1", "--tensors")
    assert (code, out) == (2, "") and "is the first version of its repo" in err


def test_stats_json_and_ls(two_versions, capsys):
    code, out, _ = run(capsys, "stats", "--json")
    s = json.loads(out)
    assert code == 0 and s["versions"] == 2 and s["chunks"] > 0
    assert s["logical_bytes"] > s["stored_bytes"] > 0
    code, out, _ = run(capsys, "ls", "--json")
    assert [r["name"] for r in json.loads(out)] == ["llama-ft"]
    assert run(capsys, "ls")[1].startswith("llama-ft  2 versions  latest ")
    assert run(capsys, "rm", "llama-ft~1")[0] == 0
    assert run(capsys, "ls")[1].startswith("llama-ft  1 version  latest ")


def test_counts_of_one_are_singular(env_store, tmp_path, capsys):
    write(tmp_path / "one" / "config.json", b'{"layers": 2}')  # one file, one chunk
    assert run(capsys, "push", str(tmp_path / "one"), "--repo", "one", "-q")[0] == 0

    def line(*argv: str) -> str:
        code, out, err = run(capsys, *argv)
        assert code == 0, err
        return out

    assert "one  1 version  latest " in line("ls")
    assert "in 1 file, " in line("show", "one")
    assert "in 1 chunk\n" in line("stats")
    assert line("verify", "-q").startswith("verified 1 chunk (")
    assert "would remove 0 of 1 version (dry run" in line(
        "prune", "one", "--keep-last", "1", "--dry-run"
    )
    copied = line("copy", "one", "--to", str(tmp_path / "other"))
    assert copied.startswith("copied 1 version of one to ") and " in 1 chunk\n" in copied
    line("rm", "one")
    collected = line("gc", "--grace", "0")
    assert collected.startswith("gc: 1 chunk deleted (") and "from 0 versions kept" in collected


def test_pull_show_status_tag_rm_gc_verify(two_versions, tmp_path, capsys):
    ckpt, _ = two_versions
    assert run(capsys, "pull", "llama-ft@v1", str(tmp_path / "out"))[0] == 0
    assert (tmp_path / "out" / "model.bin").read_bytes() == (ckpt / "model.bin").read_bytes()
    assert (tmp_path / "out" / "config.json").read_bytes() == b"{}"
    code, out, _ = run(capsys, "show", "llama-ft@v1", "--json")
    assert code == 0 and json.loads(out)["params"] == {"lr": "3e-4"}
    code, out, _ = run(capsys, "status", str(ckpt), "--repo", "llama-ft", "--json")
    assert code == 0 and json.loads(out)["unchanged"] == 2
    assert run(capsys, "tag", "llama-ft@v1", "best")[0] == 0
    assert run(capsys, "tag", "llama-ft~1", "first")[0] == 0  # any ref form names the version
    v1_short = json.loads(run(capsys, "show", "llama-ft@v1", "--json")[1])["id"][:8]
    code, out, _ = run(capsys, "tag", "-d", "llama-ft", "first")  # a bare name: any of its tags
    assert (code, out) == (0, f"deleted tag first (was on llama-ft@{v1_short})\n")
    assert run(capsys, "tag", "llama-ft~1", "first")[0] == 0
    code, out, err = run(capsys, "tag", "-d", "llama-ft@v2", "first")
    assert (code, out) == (2, "") and f"tag first is on llama-ft@{v1_short}, not on" in err
    code, out, err = run(capsys, "tag", "-d", "llama-ft@nosuch", "first")
    assert (code, out) == (3, "")
    assert run(capsys, "tag", "-d", "llama-ft@v1", "first")[0] == 0
    code, out, _ = run(capsys, "tag", "llama-ft~1", "first", "--json")
    v1 = json.loads(out)
    assert code == 0 and v1 == {
        "repo": "llama-ft",
        "tag": "first",
        "id": v1["id"],
        "deleted": False,
        "moved_from": None,
    }
    code, out, _ = run(capsys, "tag", "llama-ft", "first")
    assert out.startswith(f"moved tag llama-ft@first from {v1_short} to llama-ft@")
    assert run(capsys, "tag", "llama-ft~1", "first")[0] == 0
    v2_id = json.loads(run(capsys, "show", "llama-ft@v2", "--json")[1])["id"]
    code, out, err = run(capsys, "tag", "llama-ft@v1", v2_id[:9])  # reads as v2's id
    assert (code, out) == (2, "") and "would hide llama-ft@" in err
    assert run(capsys, "show", f"llama-ft@{v2_id[:9]}", "--json")[1].count(v2_id) == 1
    code, out, _ = run(capsys, "tag", "-d", "llama-ft", "first", "--json")
    assert json.loads(out) == {"repo": "llama-ft", "tag": "first", "id": v1["id"], "deleted": True}
    code, out, err = run(capsys, "tag", "-d", "llama-ft", "first", "--json")
    assert (code, out) == (3, "") and "tag 'first' is not in repo 'llama-ft'" in err
    code, out, _ = run(capsys, "rm", "llama-ft@v1", "--json")
    assert code == 0 and json.loads(out) == {
        "repo": "llama-ft",
        "id": v1["id"],
        "removed": v1["id"],
        "tags": ["best", "v1"],
    }
    code, out, _ = run(capsys, "gc", "--grace", "0", "--json")
    assert code == 0 and json.loads(out)["deleted_chunks"] >= 1
    code, out, _ = run(capsys, "verify")
    assert code == 0 and "all intact" in out


@pytest.mark.parametrize(
    ("argv", "needle", "exit_code"),
    [
        (["push", "/no/such/dir", "--repo", "m"], "no such file", 3),
        (["push", ".", "--repo", "m", "--param", "noequals"], "--param", 2),
        (["push", ".", "--repo", "m", "--metric", "loss=low"], "not a number", 2),
        (
            ["push", ".", "--repo", "m", "--param", "lr=1", "--param", "lr=2"],
            "lr is given twice",
            2,
        ),
        (["push", ".", "--repo", "m", "--metric", "a=1", "--metric", "a=1"], "a is given twice", 2),
        (["log", "unknown-repo"], "unknown repo", 3),
        (["pull", "llama-ft@nosuchtag", "out"], "no tag", 3),
        (["pull", "llama-ft@abc", "out"], "no tag", 2),
        (["show", "llama-ft@0123"], "at least 6", 2),
        (["diff", "llama-ft@v1", "nope"], "unknown repo", 3),
        (["diff", "llama-ft", "--file", "model.bin"], "--file picks the file", 2),
    ],
)
def test_bad_input_is_one_line_and_nonzero(two_versions, capsys, argv, needle, exit_code):
    assert main(["stats", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    code, out, err = run(capsys, *argv)
    assert code == exit_code
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == before


def test_pull_selected_files(two_versions, tmp_path, capsys):
    code, out, _ = run(capsys, "pull", "llama-ft", str(tmp_path / "o"), "--file", "*.json")
    assert code == 0 and "1 of 2 files" in out
    assert tree_bytes(tmp_path / "o") == {"config.json": b'{"a": 1}'}
    code, out, _ = run(capsys, "pull", "llama-ft", str(tmp_path / "j"), "--file", "m*", "--json")
    assert code == 0 and json.loads(out)["pulled"] == ["model.bin"]
    code, _, err = run(capsys, "pull", "llama-ft", str(tmp_path / "x"), "--file", "*.yaml")
    assert code != 0 and "matches '*.yaml'" in err and not (tmp_path / "x").exists()


def test_cat_writes_one_file_to_stdout(two_versions, env_store, tmp_path):
    ckpt, _ = two_versions
    env = {**os.environ, "CHUNKSTORE_STORE": str(env_store)}
    out = subprocess.run(
        [sys.executable, "-m", "chunkstore.client.cli", "cat", "llama-ft~", "model.bin"],
        capture_output=True,
        env=env,
    )
    assert out.returncode == 0 and out.stdout == (ckpt / "model.bin").read_bytes()
    missing = cli("cat", "llama-ft", "nope.bin", env=env)
    assert missing.returncode == 3 and "has no file 'nope.bin'" in missing.stderr
    with open("/dev/full", "wb") as full:  # a full disk behind stdout
        failed = subprocess.run(
            [sys.executable, "-m", "chunkstore.client.cli", "cat", "llama-ft", "model.bin"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    assert failed.returncode == 1
    assert failed.stderr.strip() == "chunkstore: error: No space left on device: standard output"


def test_pull_over_the_previous_version_reports_what_it_fetched(two_versions, tmp_path, capsys):
    assert run(capsys, "pull", "llama-ft~", str(tmp_path / "o"))[0] == 0
    code, out, _ = run(capsys, "pull", "llama-ft", str(tmp_path / "o"), "--force", "--json")
    d = json.loads(out)
    assert code == 0 and 0 < d["fetched_bytes"] < 1000  # config.json only; model.bin copied
    code, out, _ = run(capsys, "pull", "llama-ft", str(tmp_path / "o"), "--force")
    assert code == 0 and " 0 B fetched" in out  # everything was in place


def test_output_into_a_closed_pipe_stops_quietly(two_versions, env_store):
    """``chunkstore log | head -1``: once the reader has gone, no error and no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "chunkstore.client.cli", "log", "llama-ft", "--json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "CHUNKSTORE_STORE": str(env_store)},
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 128 + signal.SIGPIPE
    assert proc.stderr == ""


def test_cluster_output_into_a_closed_pipe_stops_quietly(tmp_path):
    """``chunkstore cluster status --json | head -1``: no traceback either."""
    (tmp_path / "cluster.toml").write_text(
        'replicas = 1\n[[nodes]]\nid = "n1"\naddress = "127.0.0.1:9"\n'  # nothing serves
    )
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        argv = ["cluster", "status", "--dir", str(tmp_path), "--json", "--timeout", "0.5"]
        command = [sys.executable, "-m", "chunkstore.client.cli", *argv]
        proc = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (128 + signal.SIGPIPE, "")


def test_pull_into_non_empty_dir_needs_force(two_versions, tmp_path, capsys):
    write(tmp_path / "busy" / "x", b"x")
    code, _, err = run(capsys, "pull", "llama-ft", str(tmp_path / "busy"))
    assert code == 2 and "not empty" in err and "--force" in err
    assert run(capsys, "pull", "llama-ft", str(tmp_path / "busy"), "--force")[0] == 0
    assert set(tree_bytes(tmp_path / "busy")) == {"x", "model.bin", "config.json"}


def test_pull_onto_a_full_disk_is_one_line_naming_the_file(
    two_versions, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(filespace, "_FALLOCATE", failing_fallocate(errno.ENOSPC))
    code, _, err = run(capsys, "pull", "llama-ft", str(tmp_path / "out"))
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()]
    assert "No space left on device" in err and str(tmp_path / "out") in err
    assert tree_bytes(tmp_path / "out") == {}


def test_unwritable_store_path_is_one_line(tmp_path):
    blocker = write(tmp_path / "file", b"")
    env = {**os.environ, "CHUNKSTORE_STORE": str(blocker / "store")}
    proc = cli("ls", env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot" in proc.stderr


def test_corrupt_chunk_fails_pull_and_verify(env_store, tmp_path):
    write(tmp_path / "d" / "w.bin", random_bytes(MB, seed=4))
    env = {**os.environ, "CHUNKSTORE_STORE": str(env_store)}
    assert cli("push", str(tmp_path / "d"), "--repo", "m", env=env).returncode == 0
    from chunkstore import codec
    from chunkstore.stores.lmdb_store import LmdbStore

    with LmdbStore(env_store) as store:
        info = next(iter(store.scan()))
        raw = codec.decode(dict(store.get([info.id]))[info.id])
        store.delete([info.id])
        store.put([(info.id, codec.encode(b"X" + raw[1:]))])
    pull = cli("pull", "m", str(tmp_path / "out"), env=env)
    assert pull.returncode == 4 and info.id.hex() in pull.stderr and "Traceback" not in pull.stderr
    verify = cli("verify", env=env)
    assert verify.returncode == 4 and info.id.hex() in verify.stderr


def test_verify_repair_drops_corrupt_chunks_and_a_push_stores_them_anew(
    env_store, tmp_path, capsys
):
    from test_delta import model, save, stepped

    from chunkstore import codec
    from chunkstore.connect import connect

    v1 = model(seed=1)
    dirs = [save(tmp_path, "v1", v1), save(tmp_path, "v2", stepped(v1, seed=2))]
    for d in dirs:
        assert run(capsys, "push", str(d), "--repo", "m", "-q")[0] == 0
    with connect(str(env_store)) as repo:
        manifest = repo.manifest(repo.resolve("m").file("model.safetensors"))
        assert manifest.deltas  # v2 is stored as deltas against v1
        victims = [next(iter(manifest.deltas.values())).delta, manifest.chunks[0][0]]
        for cid in victims:
            raw = codec.decode(dict(repo.store.get([cid]))[cid])
            repo.store.delete([cid])
            repo.store.put([(cid, codec.encode(b"X" + raw[1:]))])
    code, out, err = run(capsys, "verify", "--repair", "--json")
    report = json.loads(out)
    assert code == 4 and report["removed"] == 2
    assert set(report["corrupt"]) >= {cid.hex() for cid in victims}
    code, out, err = run(capsys, "verify")
    assert code == 4 and all(f"missing chunk {cid.hex()}" in err for cid in victims)
    for d in dirs:
        assert run(capsys, "push", str(d), "--repo", "m", "-q")[0] == 0
    code, out, _ = run(capsys, "verify")
    assert code == 0 and "all intact" in out
    assert run(capsys, "pull", "m", str(tmp_path / "out"), "-q")[0] == 0
    out_bytes = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert out_bytes == (dirs[1] / "model.safetensors").read_bytes()


def _holds_chunks(store_dir) -> bool:
    """Whether the store a push in another process writes has committed any chunk yet."""
    if not (store_dir / "data.mdb").exists():
        return False
    try:
        with LmdbStore(store_dir, readonly=True) as store:
            return store.totals().chunks > 0
    except ChunkstoreError:  # still being made
        return False


#: The CLI as a terminal starts it, where Ctrl-C raises KeyboardInterrupt. A process keeps an
#: ignored signal ignored across exec, and Python installs its SIGINT handler only where SIGINT
#: is not ignored: run as a background job of a shell without job control (which ignores
#: SIGINT), ``python -m chunkstore.client.cli`` would never see the Ctrl-C.
_CLI_AT_A_TERMINAL = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from chunkstore.client.cli import main; sys.exit(main())"
)


def test_ctrl_c_mid_push_leaves_nothing_visible_and_next_push_reuses(env_store, tmp_path):
    data = random_bytes(300 * MB, seed=5)
    write(tmp_path / "big" / "w.bin", data)
    env = {**os.environ, "CHUNKSTORE_STORE": str(env_store)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CLI_AT_A_TERMINAL,
            "push",
            str(tmp_path / "big"),
            "--repo",
            "m",
            "-q",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _holds_chunks(env_store):
            time.sleep(0.05)  # until a batch of chunks is committed, as another process sees
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    if proc.returncode == 0:
        pytest.fail("push finished before it could be interrupted; make the file larger")
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert cli("log", "m", env=env).returncode == 3  # no version is visible
    again = cli("push", str(tmp_path / "big"), "--repo", "m", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["new_raw_bytes"] < len(data)


def test_ctrl_c_mid_pull_keeps_what_was_written_for_the_next_pull(
    two_versions, tmp_path, capsys, monkeypatch
):
    real_read_into = LmdbStore.read_into

    def interrupted(self, chunk_ids, consume, workers=2):  # in model.bin, half way
        if len(chunk_ids) == 1:  # config.json
            return real_read_into(self, chunk_ids, consume, workers=workers)
        real_read_into(self, chunk_ids[: len(chunk_ids) // 2], consume, workers=workers)
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(LmdbStore, "read_into", interrupted)
        code, _, err = run(capsys, "pull", "llama-ft", str(tmp_path / "o"))
    assert code == 130 and "run it again with --force to resume" in err
    code, _, err = run(capsys, "pull", "llama-ft", str(tmp_path / "o"))
    assert code == 2 and "holds an interrupted pull (use --force to resume it)" in err
    assert run(capsys, "pull", "llama-ft", str(tmp_path / "o"), "--force")[0] == 0
    ckpt, _ = two_versions
    assert tree_bytes(tmp_path / "o") == tree_bytes(ckpt)


def test_help_has_examples():
    proc = cli("push", "--help")
    assert proc.returncode == 0 and "example:" in proc.stdout and "--metric" in proc.stdout
    assert "examples:" in cli("--help").stdout


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by name, ``cluster ACTION`` included."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found[f"{prefix}{name}"] = sub
                    walk(sub, f"{prefix}{name} ")

    walk(build_parser(), "")
    return found


def test_every_argument_of_every_command_is_explained(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    for name, parser in _command_parsers().items():
        explained = parser.format_help().partition("\nexample")[0]  # examples are as written
        assert max(map(len, explained.splitlines())) <= 80, f"chunkstore {name} --help is wide"
        if name not in ("node", "cluster"):  # their actions (subcommands) are checked apart
            assert "example" in (parser.epilog or ""), f"chunkstore {name} --help has no example"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue  # each of its commands is one of the parsers checked
            assert action.help, f"chunkstore {name}: {action.dest} has no help"
            if action.option_strings and action.nargs != 0 and action.metavar is None:
                # argparse's metavar, the name in capitals, must say what the option takes
                assert action.dest in ("dir", "file", "message", "repo", "store", "tag", "token")
    assert "--to STORE" in cli("copy", "--help").stdout
    assert "--to-token TOKEN" in cli("copy", "--help").stdout
    assert "-n N, --limit N" in cli("log", "--help").stdout


def test_the_cluster_file_node_help_shows_is_one_a_node_takes(tmp_path):
    from chunkstore.cluster_map import load_cluster_file

    shown = _command_parsers()["node"].format_help()
    example = shown.partition("cluster.toml, one [[nodes]] entry per node:\n")[2]
    (tmp_path / "cluster.toml").write_text(textwrap.dedent(example))
    cluster = load_cluster_file(tmp_path / "cluster.toml")
    assert [(n.id, n.weight) for n in cluster.nodes] == [("n1", 1), ("n2", 1), ("n3", 2)]
    assert (cluster.replicas, cluster.write_quorum) == (3, 2)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["pus", "."],
            "chunkstore: error: argument COMMAND: invalid choice: 'pus', maybe you meant 'push'?",
        ),
        (
            ["log", "m", "--limt", "1"],
            "chunkstore log: error: unrecognized arguments: --limt 1 (maybe you meant --limit?)",
        ),
        (
            ["push", ".", "--repo", "m", "--mesage=x"],
            "chunkstore push: error: "
            "unrecognized arguments: --mesage=x (maybe you meant --message?)",
        ),
        (["log", "m", "extra"], "chunkstore log: error: unrecognized arguments: extra\n"),
        (["cluster", "stauts"], "invalid choice: 'stauts', maybe you meant 'status'?"),
        (
            ["cluster", "down", "--dir", "d", "--timout", "3"],
            "chunkstore cluster down: error: "
            "unrecognized arguments: --timout 3 (maybe you meant --timeout?)",
        ),
    ],
)
def test_a_typo_names_the_command_and_suggests_the_nearest_word(env_store, capsys, argv, needle):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    out, err = capsys.readouterr()
    assert (exit.value.code, out) == (2, "") and needle in err
    assert err.startswith(f"usage: chunkstore {argv[0] if argv[0] != 'pus' else ''}".rstrip())
    assert not env_store.exists()  # nothing was opened, let alone stored


def test_an_internal_error_is_one_line_with_exit_70(two_versions, capsys, monkeypatch):
    from chunkstore.repository import Repository

    def broken(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(Repository, "stats", broken)
    code, out, err = run(capsys, "stats")
    assert (code, out) == (70, "") and len(err.strip().splitlines()) == 1
    assert err.startswith("chunkstore: internal error: RuntimeError: boom (set CHUNKSTORE_DEBUG=1")
    monkeypatch.setenv("CHUNKSTORE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["stats"])


def test_cat_has_no_json_option():
    assert "--json" not in cli("cat", "--help").stdout  # it writes the file's bytes


def _on_a_terminal(env: dict[str, str], *argv: str) -> str:
    """What the CLI run with ``argv`` writes to a terminal (its exit code must be 0)."""
    return _with_a_terminal(env, argv, stdout_too=True)[1]


def _with_a_terminal(
    env: dict[str, str], argv: Sequence[str], stdout_too: bool = False
) -> tuple[str, str]:
    """``(stdout, terminal)``: what the CLI run with ``argv`` writes to a pipe on stdout and to
    a terminal on stderr (on stdout too with ``stdout_too``; its exit code must be 0). Its
    stdout must fit in a pipe's buffer."""
    import pty

    command = (sys.executable, "-m", "chunkstore.client.cli", *argv)
    primary, secondary = pty.openpty()
    stdout = secondary if stdout_too else subprocess.PIPE
    proc = subprocess.Popen(command, env=env, stdin=secondary, stdout=stdout, stderr=secondary)
    os.close(secondary)
    seen = b""
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:  # the other end closed
            break
        if not data:
            break
        seen += data
    os.close(primary)
    out = "" if stdout_too else proc.stdout.read().decode()
    assert proc.wait(timeout=60) == 0
    return out, seen.decode(errors="replace")


def test_progress_bar_on_a_terminal_only(env_store, tmp_path):
    write(tmp_path / "d" / "w.bin", random_bytes(48 * MB, seed=8))
    env = {**os.environ, "CHUNKSTORE_STORE": str(env_store), "COLUMNS": "120"}
    text = _on_a_terminal(env, "push", str(tmp_path / "d"), "--repo", "m")
    assert "push m" in text and "B/s" in text and "pushed m@" in text
    piped = cli("push", str(tmp_path / "d"), "--repo", "m", env=env)
    assert piped.returncode == 0 and "B/s" not in piped.stderr and piped.stderr == ""
    quiet = cli("push", str(tmp_path / "d"), "--repo", "m", "-q", env=env)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    text = _on_a_terminal(env, "verify", "m")
    assert "verify " in text and "B/s" in text and "verified " in text
    assert " new" not in text  # verifying stores nothing: no "0 B new" in its bar
    text = _on_a_terminal(env, "status", str(tmp_path / "d"), "--repo", "m")
    assert "status " in text and "B/s" in text and "1 unchanged" in text and " new" not in text
    quiet = cli("status", str(tmp_path / "d"), "--repo", "m", "-q", env=env)
    assert quiet.returncode == 0 and quiet.stderr == "" and "1 unchanged" in quiet.stdout


def test_gc_shows_progress_on_a_terminal(env_store, tmp_path):
    env = {**os.environ, "CHUNKSTORE_STORE": str(env_store), "COLUMNS": "120"}
    for seed in (1, 2):
        write(tmp_path / "d" / "w.bin", random_bytes(8 * MB, seed=seed))
        assert cli("push", str(tmp_path / "d"), "--repo", "m", env=env).returncode == 0
    assert cli("rm", "m~1", env=env).returncode == 0
    text = _on_a_terminal(env, "gc", "--grace", "0", "--dry-run")
    assert "gc: reading manifests" in text  # the live versions' manifests, before the scan
    assert "gc: scanning" in text and "gc: deleting" not in text  # a dry run deletes nothing
    assert "would be deleted" in text and "B/s" in text and " new" not in text
    out, text = _with_a_terminal(env, ["gc", "--grace", "0", "--json"])
    assert json.loads(out)["deleted_chunks"] > 0  # stdout holds the JSON alone
    assert "gc: deleting" in text and "B/s" in text and "{" not in text
    assert "gc: reading manifests" in text
    out, text = _with_a_terminal(env, ["gc", "-q"])
    assert out.startswith("gc: 0 chunks") and "gc: scanning" not in text and "B/s" not in text
    assert "gc: reading" not in text


def test_reading_a_store_that_does_not_exist_creates_nothing(tmp_path):
    env = {**os.environ, "CHUNKSTORE_STORE": str(tmp_path / "typo" / "store")}
    for argv in (["ls"], ["log", "m"], ["stats"], ["gc"]):
        proc = cli(*argv, env=env)
        assert proc.returncode == 6 and "no store there" in proc.stderr, proc.stderr
        assert "a push makes one; for another store give --store PATH or set" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "typo").exists()


def test_an_unknown_url_scheme_is_refused_and_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "ckpt" / "w.bin", random_bytes(10_000, seed=1))
    # the schemes chunkstore knows work
    assert run(capsys, "push", "ckpt", "--repo", "m", "--store", f"file://{tmp_path}/s")[0] == 0
    assert run(capsys, "ls", "--store", "memory://")[0] == 0
    code, out, _ = run(capsys, "ls", "--store", f"FILE://{tmp_path}/s", "--json")  # any case
    assert code == 0 and [r["name"] for r in json.loads(out)] == ["m"]
    for argv in (
        ["push", "ckpt", "--repo", "m", "--store", "grcp://cluster-1:7400"],
        ["ls", "--store", "grcp://127.0.0.1:33151"],
        ["copy", "m", "--store", "s", "--to", "s3://bucket/x"],
    ):
        code, _, err = run(capsys, *argv)
        assert code == 2, err
        assert "unknown store scheme" in err and "use grpc://HOST:PORT or a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "s"]


def test_store_may_be_given_before_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CHUNKSTORE_STORE", raising=False)
    write(tmp_path / "ckpt" / "w.bin", random_bytes(100_000, seed=1))
    first, second = str(tmp_path / "one"), str(tmp_path / "two")
    assert run(capsys, "--store", first, "push", str(tmp_path / "ckpt"), "--repo", "m")[0] == 0
    code, out, _ = run(capsys, "--store", first, "ls", "--json")
    assert code == 0 and [r["name"] for r in json.loads(out)] == ["m"]
    # the command's own --store wins
    code, _, err = run(capsys, "--store", first, "log", "m", "--store", second)
    assert code == 6 and "no store there" in err


def _python(code: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_cli_loads_numpy_with_one_blas_thread_unless_told_otherwise():
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    probe = (
        "import sys, os, chunkstore; assert 'numpy' not in sys.modules; "
        "import chunkstore.client.cli; assert 'numpy' in sys.modules; "
        "print(os.environ['OPENBLAS_NUM_THREADS'], len(os.listdir('/proc/self/task')))"
    )
    assert _python(probe, env) == "1 1"  # no idle BLAS pool beside the main thread
    assert _python(probe, {**env, "OPENBLAS_NUM_THREADS": "2"}).split()[0] == "2"


def test_package_exports_load_on_first_use():
    assert (
        _python(
            "import chunkstore; print(chunkstore.Repository.__name__, chunkstore.Diff.__name__)",
            dict(os.environ),
        )
        == "Repository Diff"
    )


def test_push_warns_of_each_path_it_leaves_out_and_lists_it_in_json(env_store, tmp_path, capsys):
    src = write(tmp_path / "d1" / "a.txt", b"a").parent
    (src / "dangling").symlink_to(tmp_path / "nowhere")
    (src / "empty").mkdir()
    code, out, err = run(capsys, "push", str(src), "--repo", "d1", "-q", "--json")
    assert code == 0
    assert json.loads(out)["skipped"] == [
        {"path": str(src / "dangling"), "reason": "dangling symlink: its target does not exist"},
        {
            "path": str(src / "empty"),
            "reason": "empty directory: directories are not stored, only the files in them",
        },
    ]
    assert err.splitlines() == [
        f"chunkstore: warning: {src / 'dangling'} not pushed: dangling symlink: its target does "
        "not exist",
        f"chunkstore: warning: {src / 'empty'} not pushed: empty directory: directories are not "
        "stored, only the files in them",
    ]
    code, _, err = run(capsys, "status", str(src), "--repo", "d1")
    assert code == 0 and err.count("warning") == 2


def test_push_warns_of_a_file_still_open_for_writing_and_stores_it(env_store, tmp_path, capsys):
    src = tmp_path / "ckpt"
    data = random_bytes(2 * MB, seed=3)
    write(src / "model.bin", data)
    write(src / "config.json", b"{}")
    with open(src / "model.bin", "r+b"):  # a trainer still writing it
        code, _, err = run(capsys, "push", str(src), "--repo", "w", "-q")
    assert code == 0
    assert err == (
        f"chunkstore: warning: {src / 'model.bin'} is open for writing: it is pushed as it "
        "reads now, and the push fails if it changes meanwhile; push files once they are "
        "written\n"
    )
    code, _, err = run(capsys, "push", str(src), "--repo", "w", "-q")  # closed: no warning
    assert (code, err) == (0, "")
    assert run(capsys, "pull", "w", str(tmp_path / "out"), "-q")[0] == 0
    assert (tmp_path / "out" / "model.bin").read_bytes() == data


@pytest.mark.parametrize("argv", [["push", "", "--repo", "x"], ["pull", "llama-ft", "", "--force"]])
def test_an_empty_path_argument_is_bad_input(two_versions, tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    code, _, err = run(capsys, *argv)
    assert code == 2 and "may not be empty" in err
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to drop capabilities")
def test_an_unreadable_directory_fails_the_push_with_exit_7(env_store, tmp_path):
    src = write(tmp_path / "d1" / "a.txt", b"a").parent
    write(src / "locked" / "b.txt", b"b")
    (src / "locked").chmod(0)
    try:
        done = subprocess.run(
            [
                "setpriv",
                "--bounding-set=-dac_override,-dac_read_search",
                sys.executable,
                "-m",
                "chunkstore.client.cli",
                "push",
                str(src),
                "--repo",
                "d1",
            ],
            capture_output=True,
            text=True,
        )
    finally:
        (src / "locked").chmod(0o755)
    assert done.returncode == 7, done.stderr
    assert f"cannot read {src / 'locked'}: permission denied" in done.stderr
    assert cli("ls", "--json").stdout.strip() == "[]"


#: Runs ``python ARGS...`` in a process for which file modes hold: as root, without the
#: capabilities that let root read and write any file (dropped from the bounding set, then
#: exec, so the new process never has them).
AS_A_USER = """
import ctypes, os, sys
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP
            sys.exit(f"cannot drop capability {cap}: {os.strerror(ctypes.get_errno())}")
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_a_store_that_cannot_be_written_serves_reads_and_refuses_writes(
    two_versions, env_store, tmp_path
):
    ckpt, _ = two_versions
    files = [env_store / "data.mdb", env_store / "lock.mdb"]
    before = {f: f.read_bytes() for f in files[:1]}
    for path in [*files, env_store]:  # another user's store: it may be read, not written
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        probe = [sys.executable, "-c", AS_A_USER, "-c", f"open({str(files[0])!r}, 'r+b')"]
        assert "PermissionError" in subprocess.run(probe, capture_output=True, text=True).stderr

        def chunkstore(*argv: str) -> subprocess.CompletedProcess:
            command = [sys.executable, "-c", AS_A_USER, "-m", "chunkstore.client.cli", *argv]
            return subprocess.run(command, capture_output=True, text=True, timeout=120)

        reads = [
            ["log", "llama-ft"],
            ["ls"],
            ["show", "llama-ft@v1"],
            ["diff", "llama-ft@v1", "llama-ft@v2"],
            ["pull", "llama-ft@v1", str(tmp_path / "out")],
            ["cat", "llama-ft", "config.json"],
            ["verify"],
            ["stats"],
            ["status", str(ckpt), "--repo", "llama-ft"],
            ["prune", "llama-ft", "--keep-last", "1", "--dry-run"],
            ["copy", "llama-ft", "--to", str(tmp_path / "copy")],
        ]
        for argv in reads:
            done = chunkstore(*argv)
            assert (done.returncode, done.stderr) == (0, ""), argv
        assert tree_bytes(tmp_path / "out")["config.json"] == b"{}"
        writes = [
            ["push", str(ckpt), "--repo", "llama-ft"],
            ["tag", "llama-ft@v1", "best"],
            ["tag", "llama-ft@v1", "-d", "v1"],
            ["rm", "llama-ft@v1"],
            ["gc", "--grace", "0"],
            ["verify", "--repair"],
        ]
        refusal = f"chunkstore: error: store at {env_store} cannot be written: permission denied"
        for argv in writes:
            done = chunkstore(*argv)
            assert done.returncode == 7 and done.stdout == "", argv
            assert done.stderr == f"{refusal}; nothing was changed\n", argv
    finally:
        for path in [env_store, *files]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert {f: f.read_bytes() for f in files[:1]} == before
    assert sorted(p.name for p in env_store.iterdir()) == ["data.mdb", "lock.mdb"]
    done = cli("log", "llama-ft", "--json")
    assert [v["message"] for v in json.loads(done.stdout)] == ["step 2000", "step 1000"]
