"""Pruning a repo by keep rules: what each rule keeps, what is always kept, that pruned
versions' chunks go at gc while kept versions (delta-coded ones included) still pull whole,
and that bad rules are refused with nothing removed."""

from __future__ import annotations

import json

import pytest
from conftest import random_bytes, write
from test_cli import run
from test_delta import assert_pulls, model, save, stepped

from chunkstore import ids, refs
from chunkstore.errors import InvalidInput, NotFound
from chunkstore.model import Version, VersionLink
from chunkstore.repository import Repository
from chunkstore.retention import KeepPolicy, parse_best, parse_duration, plan

HOUR_NS = 3600 * 10**9


def version(n: int, hours_ago: float = 0, repo: str = "m", **kw) -> Version:
    """Version number ``n`` of ``repo``, made ``hours_ago`` before a fixed time."""
    return Version(
        repo=repo,
        id=ids.chunk_id(f"{repo}/{n}".encode()),
        parents=[],
        created_ns=10**18 - int(hours_ago * HOUR_NS),
        author="a",
        message=f"step {n}",
        files=[],
        params={},
        metrics=kw.pop("metrics", {}),
        inputs=kw.pop("inputs", []),
        new_bytes=0,
        tags=kw.pop("tags", []),
    )


def series(count: int, **per_version) -> list[Version]:
    """``count`` versions an hour apart, newest first; ``per_version[key][n]`` sets a field of
    version n (numbered from 1, the oldest)."""
    out = []
    for n in range(count, 0, -1):
        fields = {key: values[n] for key, values in per_version.items() if n in values}
        out.append(version(n, hours_ago=count - n, **fields))
    return out


def kept(decided: list[tuple[Version, list[str]]]) -> dict[str, list[str]]:
    return {v.message: why for v, why in decided if why}


def test_keep_last_keeps_the_newest_n():
    decided = plan(series(5), KeepPolicy(last=2))
    assert kept(decided) == {"step 5": ["newest", "last 2"], "step 4": ["last 2"]}


def test_keep_within_counts_from_the_newest_version():
    decided = plan(series(5), KeepPolicy(within=parse_duration("2h")))
    assert set(kept(decided)) == {"step 5", "step 4", "step 3"}
    assert kept(decided)["step 3"] == ["within 2h"]


def test_keep_lowest_and_highest_rank_by_metric_and_skip_versions_without_it():
    loss = {1: {"loss": 3.0}, 2: {"loss": 1.0}, 3: {"loss": 2.0}, 4: {"acc": 0.9}}
    versions = series(5, metrics=loss | {5: {"acc": 0.5}})
    decided = plan(versions, KeepPolicy(lowest={"loss": 2}, highest={"acc": 1}))
    assert kept(decided) == {
        "step 5": ["newest"],
        "step 4": ["highest acc"],
        "step 3": ["lowest loss"],
        "step 2": ["lowest loss"],
    }
    assert "step 1" not in kept(plan(versions, KeepPolicy(lowest={"loss": 2})))


def test_a_metric_no_version_records_is_refused():
    versions = series(3, metrics={1: {"loss": 1.0}, 2: {"loss": 2.0}})
    with pytest.raises(InvalidInput, match=r"metric 'Loss' \(metrics recorded: loss\)"):
        plan(versions, KeepPolicy(lowest={"Loss": 1}))
    with pytest.raises(InvalidInput, match="'acc'.*recorded: none"):
        plan(series(2), KeepPolicy(last=1, highest={"acc": 1}))


def test_newest_tagged_and_inputs_are_always_kept():
    versions = series(4, tags={2: ["release"]})
    # a version of another repo was made from version 1
    user = version(1, repo="ft", inputs=[VersionLink("m", versions[3].id)])
    decided = plan(versions, KeepPolicy(last=1), others=[user])
    assert kept(decided) == {
        "step 4": ["newest", "last 1"],
        "step 2": ["tagged release"],
        "step 1": ["input of ft@" + user.short_id],
    }


def test_inputs_of_removed_versions_are_not_kept():
    versions = series(3)
    chained = series(3, inputs={2: [VersionLink("m", versions[2].id)]})  # 2 was made from 1
    assert set(kept(plan(chained, KeepPolicy(last=1)))) == {"step 3"}


@pytest.mark.parametrize("text", ["", "7", "d", "1x", "-1d", "1.d", "2 w"])
def test_bad_durations_are_refused(text):
    with pytest.raises(InvalidInput, match="invalid duration"):
        parse_duration(text)


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("1.5h") == 5400
    assert parse_duration("2W") == 14 * 86400


@pytest.mark.parametrize("text", ["", "=2", "loss=0", "loss=x", "loss=-1", "loss=1.5"])
def test_bad_best_rules_are_refused(text):
    with pytest.raises(InvalidInput, match="--keep-lowest"):
        parse_best(text, "keep-lowest")


def test_best_rules():
    assert parse_best("eval_loss", "keep-lowest") == ("eval_loss", 1)
    assert parse_best("acc=3", "keep-highest") == ("acc", 3)


def test_negative_keep_last_is_refused():
    with pytest.raises(InvalidInput, match="--keep-last"):
        KeepPolicy(last=-1)


# -- through the repository ---------------------------------------------------------------------


def push_series(repo: Repository, tmp_path, count: int) -> list[Version]:
    ckpt = tmp_path / "ckpt"
    out = []
    for n in range(1, count + 1):
        write(ckpt / "model.bin", random_bytes(256 * 1024, seed=n))
        out.append(repo.push(ckpt, "m", message=f"step {n}", metrics={"loss": 10.0 / n}).version)
    return out


def test_prune_removes_what_no_rule_keeps_and_gc_reclaims_it(repo: Repository, tmp_path):
    pushed = push_series(repo, tmp_path, 4)
    dry = repo.prune("m", KeepPolicy(last=2), dry_run=True)
    assert dry.dry_run and [v.id for v in dry.removed] == [pushed[1].id, pushed[0].id]
    assert len(repo.log("m")) == 4  # a dry run removes nothing
    result = repo.prune("m", KeepPolicy(last=2))
    assert [v.id for v, _ in result.kept] == [pushed[3].id, pushed[2].id]
    assert [v.id for v in repo.log("m")] == [pushed[3].id, pushed[2].id]
    gc = repo.gc(grace_seconds=0)
    assert gc.deleted_chunks > 0 and gc.versions == 2
    assert repo.verify().ok
    again = repo.prune("m", KeepPolicy(last=2))
    assert again.removed == [] and len(again.kept) == 2


def test_prune_without_a_rule_or_of_an_unknown_repo_changes_nothing(repo: Repository, tmp_path):
    push_series(repo, tmp_path, 2)
    with pytest.raises(InvalidInput, match="needs a keep rule"):
        repo.prune("m", KeepPolicy())
    with pytest.raises(NotFound, match="unknown repo"):
        repo.prune("nope", KeepPolicy(last=1))
    assert len(repo.log("m")) == 2


def test_a_pruned_delta_base_leaves_its_deltas_whole(repo: Repository, tmp_path):
    v1 = model(seed=7)
    p1, p2 = save(tmp_path, "v1", v1), save(tmp_path, "v2", stepped(v1, 8))
    first = repo.push(p1, "m").version
    assert repo.push(p2, "m").stats.delta_chunks > 0
    assert [v.id for v in repo.prune("m", KeepPolicy(last=1)).removed] == [first.id]
    repo.gc(grace_seconds=0)
    assert_pulls(repo, "m", p2, tmp_path / "out")
    assert repo.verify().ok


def test_prune_keeps_the_input_of_another_repos_version(repo: Repository, tmp_path, monkeypatch):
    base = push_series(repo, tmp_path, 3)
    write(tmp_path / "ft" / "model.bin", random_bytes(1024, seed=9))
    repo.push(tmp_path / "ft", "ft", inputs=[base[0].ref])
    for i in range(3):  # versions of a repo that names no version of m
        write(tmp_path / "other" / "x.bin", random_bytes(512, seed=20 + i))
        repo.push(tmp_path / "other", "other")
    decoded = []
    real = refs.decode_version
    monkeypatch.setattr(
        refs, "decode_version", lambda name, vid, *a: decoded.append(vid) or real(name, vid, *a)
    )
    result = repo.prune("m", KeepPolicy(last=1))
    assert [v.id for v in result.removed] == [base[1].id]
    assert dict((v.id, why) for v, why in result.kept)[base[0].id] == [
        f"input of {repo.log('ft')[0].ref}"
    ]
    # Of the other repos' versions only the one naming m as an input was decoded.
    assert not set(decoded) & {v.id for v in repo.log("other")}


# -- the command line ---------------------------------------------------------------------------


def test_prune_command(env_store, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    for n, loss in enumerate([3.0, 1.0, 2.0, 4.0], start=1):
        write(ckpt / "model.bin", random_bytes(64 * 1024, seed=n))
        args = ["push", str(ckpt), "--repo", "m", "-m", f"step {n}", "--metric", f"loss={loss}"]
        assert run(capsys, *args, *(["--tag", "first"] if n == 1 else []))[0] == 0

    code, out, _ = run(capsys, "prune", "m", "--keep-lowest", "loss", "--dry-run")
    lines = out.splitlines()
    assert code == 0 and [line.split()[0] for line in lines[:4]] == [
        "keep",
        "remove",
        "keep",
        "keep",
    ]
    assert "(newest)" in lines[0] and "(lowest loss)" in lines[2] and "(tagged first)" in lines[3]
    assert lines[-1] == "m: would remove 1 of 4 versions (dry run: nothing was)"

    code, out, _ = run(capsys, "prune", "m", "--keep-lowest", "loss", "--json")
    report = json.loads(out)
    assert code == 0 and not report["dry_run"]
    assert [v["message"] for v in report["removed"]] == ["step 3"]
    assert [v["reasons"] for v in report["kept"]] == [["newest"], ["lowest loss"], ["tagged first"]]
    code, out, _ = run(capsys, "log", "m", "--json")
    assert [v["message"] for v in json.loads(out)] == ["step 4", "step 2", "step 1"]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "prune needs a keep rule"),
        (["--keep-within", "1x"], "invalid duration '1x'"),
        (["--keep-lowest", "loss=0"], "invalid --keep-lowest 'loss=0'"),
        (["--keep-highest", "=2"], "invalid --keep-highest '=2'"),
        (["--keep-last", "-2"], "--keep-last must be >= 0"),
        (["--keep-lowest", "Loss"], "no version records the metric 'Loss'"),
        (["--keep-lowest", "loss", "--dry-run"], "no version records the metric 'loss'"),
    ],
)
def test_prune_command_refuses_bad_rules(env_store, tmp_path, capsys, args, message):
    write(tmp_path / "ckpt" / "a.bin", b"x")
    assert run(capsys, "push", str(tmp_path / "ckpt"), "--repo", "m")[0] == 0
    write(tmp_path / "ckpt" / "a.bin", b"y")
    assert run(capsys, "push", str(tmp_path / "ckpt"), "--repo", "m")[0] == 0
    code, out, err = run(capsys, "prune", "m", *args)
    assert code == 2 and out == ""
    assert err.startswith("chunkstore: error: ") and message in err
    code, out, _ = run(capsys, "log", "m", "--json")
    assert len(json.loads(out)) == 2  # nothing was removed
