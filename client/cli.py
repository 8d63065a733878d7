"""The ``chunkstore`` command line: git-like version management of model files."""

from __future__ import annotations

import argparse
import difflib
import math
import os
import signal
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Sequence

import chunkstore.client.process_setup  # noqa: F401  (before anything loads gRPC or numpy)
from chunkstore import ids
from chunkstore.allocator import keep_freed_memory
from chunkstore.client.help_format import HelpFormatter
from chunkstore.connect import ENV_STORE, connect, store_directory
from chunkstore.errors import (
    ChunkstoreError,
    ChunkstoreWarning,
    InvalidInput,
    NotFound,
    StoreMissing,
    UnreadableVersion,
)
from chunkstore.jsonout import emit_json
from chunkstore.model import Version
from chunkstore.progress import Tally, for_terminal, human_bytes
from chunkstore.refs import Ref
from chunkstore.repository import DEFAULT_GC_GRACE, Diff, Repository, select_files
from chunkstore.retention import KeepPolicy, parse_best, parse_duration
from chunkstore.tensor_diff import TensorDiff, undefined_l2_reason
from chunkstore.transfer import CopyResult
from chunkstore.tree import Skipped

PROG = "chunkstore"
REF_HELP = "NAME, NAME@TAG or NAME@ID-PREFIX, each with an optional ~N"


def _key_value(text: str, kind: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise InvalidInput(f"invalid --{kind} {text!r}: expected KEY=VALUE")
    return key.strip(), value


def _parse_params(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, value = _key_value(item, "param")
        _once(out, key, "param")
        out[key] = value
    return out


def _parse_metrics(items: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        key, value = _key_value(item, "metric")
        _once(out, key, "metric")
        try:
            out[key] = float(value)
        except ValueError:
            raise InvalidInput(f"invalid --metric {item!r}: {value!r} is not a number") from None
    return out


def _once(seen: dict, key: str, kind: str) -> None:
    if key in seen:
        raise InvalidInput(f"--{kind} {key} is given twice")


def _summary(version: Version) -> str:
    """A version's message on one line: its first line, with '...' if there is more."""
    first, _, rest = version.message.strip().partition("\n")
    return first + (" ..." if rest.strip() else "")


def _plural(count: int, noun: str) -> str:
    """``noun`` as ``count`` of it is written: "file" for 1, "files" otherwise."""
    return noun if count == 1 else noun + "s"


def _count(count: int, noun: str) -> str:
    """ "1 file", "3 files"."""
    return f"{count:,} {_plural(count, noun)}"


def _when(version: Version) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(version.created_ns / 1e9))


def _emit_json(value: object) -> None:
    emit_json(value, sys.stdout)


# -- commands -----------------------------------------------------------------------------------


def cmd_push(repo: Repository, args: argparse.Namespace) -> int:
    result = repo.push(
        args.path,
        repo=args.repo,
        message=args.message,
        tags=args.tag,
        params=_parse_params(args.param),
        metrics=_parse_metrics(args.metric),
        inputs=args.input,
        progress=for_terminal(args.quiet),
        delta_base=args.delta_base,
        delta=not args.no_delta,
    )
    v, s = result.version, result.stats
    _warn_skipped(result.skipped)
    if args.json:
        _emit_json(
            {
                **v.to_json(),
                "scanned_bytes": s.scanned_bytes,
                "new_raw_bytes": s.new_raw_bytes,
                "dedup_ratio": result.dedup_ratio,
                "delta_chunks": s.delta_chunks,
                "delta_raw_bytes": s.delta_raw_bytes,
                "skipped": [skipped.to_json() for skipped in result.skipped],
            }
        )
    elif not args.quiet:
        tags = f" [{', '.join(v.tags)}]" if v.tags else ""
        deltas = f" ({human_bytes(s.delta_raw_bytes)} as deltas)" if s.delta_chunks else ""
        dedup = f" ({result.dedup_ratio:.0%} deduplicated)" if s.scanned_bytes else ""
        print(
            f"pushed {v.ref}{tags}: {human_bytes(v.size)}, {human_bytes(s.new_raw_bytes)} new"
            f"{dedup}, {human_bytes(v.new_bytes)} stored{deltas}"
        )
    return 0


def _warn_skipped(skipped: Sequence[Skipped]) -> None:
    """One line on stderr per local path a push leaves out (with ``-q`` and ``--json`` too:
    nothing is left out silently)."""
    for item in skipped:
        print(f"{PROG}: warning: {item.path} not pushed: {item.reason}", file=sys.stderr)


def cmd_pull(repo: Repository, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    tally = Tally(for_terminal(args.quiet, new_label="fetched"))
    v = repo.pull(args.ref, args.dest, force=args.force, progress=tally, files=args.file or None)
    elapsed = time.perf_counter() - started
    pulled = select_files(v, args.file) if args.file else v.files
    size = sum(f.size for f in pulled)
    if args.json:
        _emit_json(
            {
                **v.to_json(),
                "dest": args.dest,
                "pulled": [f.path for f in pulled],
                "fetched_bytes": tally.new,
                "seconds": elapsed,
            }
        )
    elif not args.quiet:
        rate = human_bytes(size / elapsed) if elapsed > 0 else "-"
        of = f" of {len(v.files)}" if args.file else ""
        fetched = f", {human_bytes(tally.new)} fetched" if tally.new < tally.done else ""
        print(
            f"pulled {v.ref} to {args.dest}: {len(pulled)}{of} {_plural(len(v.files), 'file')}, "
            f"{human_bytes(size)} ({rate}/s{fetched}), verified"
        )
    return 0


def cmd_log(repo: Repository, args: argparse.Namespace) -> int:
    versions = repo.log(args.repo, args.limit)
    if args.json:
        _emit_json([v.to_json() for v in versions])
        return 0
    for v in versions:
        tags = f" [{', '.join(v.tags)}]" if v.tags else ""
        metrics = (
            "  " + " ".join(f"{k}={x:g}" for k, x in sorted(v.metrics.items())) if v.metrics else ""
        )
        print(
            f"{v.short_id}  {_when(v)}  {human_bytes(v.size):>9}  "
            f"{human_bytes(v.new_bytes):>9} stored  {_summary(v)}{tags}{metrics}"
        )
    return 0


def cmd_cat(repo: Repository, args: argparse.Namespace) -> int:
    keep_freed_memory()  # each window's chunks are freed before the next one's are decoded
    try:
        repo.write_file(args.ref, args.path, sys.stdout.buffer)
    except BrokenPipeError:
        raise
    except OSError as exc:  # only writing can fail so: say where to
        exc.filename = exc.filename or "standard output"
        raise
    return 0


def cmd_show(repo: Repository, args: argparse.Namespace) -> int:
    v = repo.resolve(args.ref)
    lineage = repo.lineage(args.ref)
    tensors = {f.path: repo.manifest(f).tensors for f in v.files} if args.tensors else {}
    if args.json:
        out = v.to_json()
        if args.tensors:
            out["tensors"] = {
                path: [
                    {
                        "name": t.name,
                        "dtype": t.dtype,
                        "shape": list(t.shape),
                        "begin": t.begin,
                        "end": t.end,
                    }
                    for t in index
                ]
                for path, index in tensors.items()
                if index
            }
        out["lineage"] = [
            {
                "depth": d,
                "repo": x.repo,
                "id": x.id.hex(),
                "found": isinstance(x, Version),
                "message": x.message if isinstance(x, Version) else None,
            }
            for d, x in lineage
        ]
        _emit_json(out)
        return 0
    print(f"version  {v.repo}@{v.id.hex()}")
    if v.tags:
        print(f"tags     {', '.join(v.tags)}")
    print(f"date     {_when(v)}")
    print(f"author   {v.author}")
    if v.parents:
        print(f"parent   {', '.join(p.hex()[:8] for p in v.parents)}")
    print(
        f"size     {human_bytes(v.size)} in {_count(len(v.files), 'file')}, "
        f"{human_bytes(v.new_bytes)} newly stored"
    )
    print("message  " + v.message.replace("\n", "\n         "))
    for k, x in sorted(v.params.items()):
        print(f"param    {k} = {x}")
    for k, x in sorted(v.metrics.items()):
        print(f"metric   {k} = {x:g}")
    for depth, x in lineage:
        label = f"{x.ref}  {_summary(x)}" if isinstance(x, Version) else f"{x} (not found)"
        print(f"input    {'  ' * (depth - 1)}{label}")
    print("files")
    for f in v.files:
        print(f"  {human_bytes(f.size):>9}  {f.digest.hex()[:12]}  {f.path}")
        for t in tensors.get(f.path, []):
            print(f"      {t.name}  {t.dtype}{list(t.shape)}  {human_bytes(t.end - t.begin)}")
    return 0


def _print_diff(d: Diff) -> None:
    for c in d.added:
        print(f"A  {c.path}  ({human_bytes(c.new_size or 0)})")
    for c in d.removed:
        print(f"D  {c.path}  ({human_bytes(c.old_size or 0)})")
    for c in d.modified:
        changed = f", {human_bytes(c.changed_bytes)} changed" if c.changed_bytes else ""
        print(
            f"M  {c.path}  ({human_bytes(c.old_size or 0)} -> "
            f"{human_bytes(c.new_size or 0)}{changed})"
        )
    for k, (a, b) in d.params.items():
        print(f"param   {k}: {a if a is not None else '-'} -> {b if b is not None else '-'}")
    for k, (a, b) in d.metrics.items():
        print(f"metric  {k}: {'-' if a is None else f'{a:g}'} -> {'-' if b is None else f'{b:g}'}")
    print(
        f"{len(d.added)} added, {len(d.removed)} removed, {len(d.modified)} modified, "
        f"{d.unchanged} unchanged"
    )


def cmd_diff(repo: Repository, args: argparse.Namespace) -> int:
    if args.file is not None and not (args.tensors or args.stats):
        raise InvalidInput("--file picks the file whose tensors to compare: add --tensors")
    if args.new is None:  # one ref: what that version changed
        version = repo.resolve(args.old)
        args.new = version.ref
        try:
            args.old = repo.resolve(f"{version.ref}~1").ref
        except NotFound:  # the repo's first version: everything in it is added
            args.old = None
    if args.tensors or args.stats:
        if args.old is None:
            raise InvalidInput(
                f"{args.new} is the first version of its repo: no version before it to "
                "compare its tensors with (show --tensors lists them)"
            )
        return _tensor_diff(repo, args)
    d = repo.diff(args.old, args.new)
    _emit_json(d.to_json()) if args.json else _print_diff(d)
    return 0


def _tensor_diff(repo: Repository, args: argparse.Namespace) -> int:
    diffs = repo.tensor_diff(
        args.old,
        args.new,
        file=args.file,
        stats=args.stats,
        progress=for_terminal(args.quiet, new_label=None),
    )
    return _report_tensor_diffs(diffs, args.json)


def _report_tensor_diffs(
    diffs: list[TensorDiff], as_json: bool, skipped: Sequence[Skipped] | None = None
) -> int:
    """Print tensor diffs; ``skipped``: local paths left out (``status``), listed in JSON."""
    if as_json:
        out = {
            "added": [n for d in diffs for n in d.added],
            "removed": [n for d in diffs for n in d.removed],
            "changed": [{"file": d.path, **c.to_json()} for d in diffs for c in d.changed],
            "unchanged": sum(d.unchanged for d in diffs),
            "files": [d.to_json() for d in diffs],
        }
        if skipped is not None:
            out["skipped"] = [item.to_json() for item in skipped]
        _emit_json(out)
        return 0
    for d in diffs:
        print(f"{d.path}:")
        for name in d.added:
            print(f"  A  {name}")
        for name in d.removed:
            print(f"  D  {name}")
        for c in d.changed:
            extra = f", was in {c.old_path}" if c.old_path is not None else ""
            if c.old.dtype != c.new.dtype or c.old.shape != c.new.shape:
                extra += f", {c.old.dtype}{list(c.old.shape)} -> {c.new.dtype}{list(c.new.shape)}"
            if c.differing_bytes is not None:
                plural = "s" if c.differing_bytes != 1 else ""
                extra += f", {c.differing_bytes:,} differing byte{plural}"
            if c.relative_l2 is not None:
                extra += f", relative L2 change {_relative_l2(c.relative_l2)}"
            print(f"  M  {c.name}  ({human_bytes(c.bytes_changed)} changed{extra})")
        print(f"  {_tensor_counts([d])}")
    if len(diffs) > 1:
        print(f"all files: {_tensor_counts(diffs)}")
    return 0


def _relative_l2(value: float) -> str:
    reason = undefined_l2_reason(value)
    if reason is None:
        return f"{value:.3g}"
    return f"{'inf' if math.isinf(value) else 'n/a'} ({reason})"


def _tensor_counts(diffs: list[TensorDiff]) -> str:
    added = sum(len(d.added) for d in diffs)
    removed = sum(len(d.removed) for d in diffs)
    changed = sum(len(d.changed) for d in diffs)
    unchanged = sum(d.unchanged for d in diffs)
    return f"{added} added, {removed} removed, {changed} changed, {unchanged} unchanged"


def cmd_status(repo: Repository, args: argparse.Namespace) -> int:
    if args.tensors or args.stats:
        tree = repo.local_tree(args.path)
        _warn_skipped(tree.skipped)
        diffs = repo.status_tensors(
            args.path,
            args.repo,
            args.stats,
            tree=tree,
            progress=for_terminal(args.quiet, new_label=None),
        )
        return _report_tensor_diffs(diffs, args.json, skipped=tree.skipped)
    d = repo.status(args.path, args.repo, progress=for_terminal(args.quiet, new_label=None))
    _warn_skipped(d.skipped)
    _emit_json(d.to_json()) if args.json else _print_diff(d)
    return 0


def cmd_tag(repo: Repository, args: argparse.Namespace) -> int:
    ref = Ref.parse(args.ref)
    before = repo.tagged(ref.repo, args.tag)
    if args.delete:
        if before is None:
            raise NotFound(f"tag {args.tag!r} is not in repo {ref.repo!r}")
        if ref.selector is not None or ref.back:  # a version was named: the tag must be on it
            named = repo.resolve(args.ref)
            if named.id != before:
                raise InvalidInput(
                    f"tag {args.tag} is on {ref.repo}@{ids.short(before)}, not on {named.ref}: "
                    "nothing was deleted"
                )
        repo.untag(ref.repo, args.tag)
        if args.json:
            _emit_json({"repo": ref.repo, "tag": args.tag, "id": before.hex(), "deleted": True})
        else:
            print(f"deleted tag {args.tag} (was on {ref.repo}@{ids.short(before)})")
        return 0
    v = repo.tag(args.ref, args.tag)
    moved = before is not None and before != v.id
    if args.json:
        _emit_json(
            {
                "repo": v.repo,
                "tag": args.tag,
                "id": v.id.hex(),
                "deleted": False,
                "moved_from": before.hex() if moved else None,
            }
        )
    elif moved:
        print(f"moved tag {v.repo}@{args.tag} from {ids.short(before)} to {v.ref}")
    else:
        print(f"tagged {v.ref} as {v.repo}@{args.tag}")
    return 0


def cmd_ls(repo: Repository, args: argparse.Namespace) -> int:
    repos = repo.repos()
    if args.json:
        _emit_json(
            [
                {
                    "name": r.name,
                    "versions": r.versions,
                    "latest": r.latest.id.hex(),
                    "latest_size": r.latest.size,
                    "updated": r.latest.created_ns / 1e9,
                }
                for r in repos
            ]
        )
        return 0
    for r in repos:
        print(
            f"{r.name}  {_count(r.versions, 'version')}  latest {r.latest.short_id} "
            f"({_when(r.latest)}, {human_bytes(r.latest.size)})"
        )
    return 0


def cmd_copy(repo: Repository, args: argparse.Namespace) -> int:
    repo.resolve(args.ref)  # a bad ref fails before the destination is opened (or made)
    if _same_store(repo, args.to):
        raise InvalidInput(f"--to names the store {args.ref} is already in")
    with connect(args.to, token=args.to_token or args.token) as dest:
        progress = for_terminal(args.quiet, new_label="copied")
        result = repo.copy(
            args.ref, dest, history=not args.only, progress=progress, inputs=args.inputs
        )
    if args.json:
        _emit_json({**result.to_json(), "to": args.to})
        return 0
    if not args.quiet:
        for one in (*result.inputs, result):  # in the order they were copied
            _print_copied(one, args.to)
        if result.missing_inputs:
            missing = ", ".join(str(link) for link in result.missing_inputs)
            print(f"inputs not in the source, so not copied: {missing}")
    return 0


def _same_store(repo: Repository, url: str) -> bool:
    """Whether ``url`` names the embedded store ``repo`` has open."""
    here, there = repo.store.directory, store_directory(url)
    return here is not None and there is not None and here.resolve() == there.resolve()


def _print_copied(result: CopyResult, to: str) -> None:
    copied = len(result.copied)
    line = (
        f"copied {_count(copied, 'version')} of {result.repo} to {to}: "
        f"{human_bytes(result.stored_bytes)} in {_count(result.chunks, 'chunk')}"
    )
    if result.present:
        line += f"; {result.present} already there"
    if result.tags:
        line += f"; tags {', '.join(result.tags)}"
    print(line)
    if result.kept_tags:
        kept = ", ".join(result.kept_tags)
        print(f"left as they were there: tags {kept} of {result.repo} (on other versions)")


def cmd_rm(repo: Repository, args: argparse.Namespace) -> int:
    v = repo.rm(args.ref)
    readable = isinstance(v, Version)  # else a record that could not be read: repo, id, tags
    if args.json:
        # "removed" is the id under its first name; "id" as every other command calls it
        _emit_json({"repo": v.repo, "id": v.id.hex(), "removed": v.id.hex(), "tags": v.tags})
    else:
        what = v.ref if readable else f"the unreadable version record {v.repo}@{v.id.hex()}"
        print(f"removed {what}; run 'chunkstore gc' to reclaim its space")
    return 0


def cmd_prune(repo: Repository, args: argparse.Namespace) -> int:
    policy = KeepPolicy(
        last=args.keep_last,
        within=parse_duration(args.keep_within) if args.keep_within else None,
        lowest=dict(parse_best(m, "keep-lowest") for m in args.keep_lowest),
        highest=dict(parse_best(m, "keep-highest") for m in args.keep_highest),
    )
    r = repo.prune(args.repo, policy, dry_run=args.dry_run)
    if args.json:
        _emit_json(
            {
                "repo": r.repo,
                "dry_run": r.dry_run,
                "kept": [{**_brief(v), "reasons": why} for v, why in r.kept],
                "removed": [_brief(v) for v in r.removed],
                "unreadable": [
                    {"repo": e.repo, "id": e.version_id.hex(), "reason": e.reason}
                    for e in r.unreadable
                ],
            }
        )
        return 0
    gone = {v.id for v in r.removed}
    for v, why in sorted([*r.kept, *((v, []) for v in r.removed)], key=_newest_first):
        action = "remove" if v.id in gone else "keep"
        reasons = f"  ({', '.join(why)})" if why else ""
        print(f"{action:6}  {v.short_id}  {_when(v)}  {_summary(v)}{reasons}")
    total = len(r.kept) + len(r.removed)
    if r.dry_run:
        print(
            f"{r.repo}: would remove {len(r.removed)} of {_count(total, 'version')} "
            "(dry run: nothing was)"
        )
    elif r.removed:
        print(
            f"{r.repo}: removed {len(r.removed)} of {_count(total, 'version')}; "
            "run 'chunkstore gc' to reclaim their space"
        )
    else:
        print(f"{r.repo}: every version is kept")
    return 0


def _brief(v: Version) -> dict:
    return {"id": v.id.hex(), "created": v.created_ns / 1e9, "message": v.message}


def _newest_first(item: tuple[Version, list[str]]) -> tuple[int, bytes]:
    return (-item[0].created_ns, item[0].id)


def cmd_gc(repo: Repository, args: argparse.Namespace) -> int:
    r = repo.gc(args.grace, dry_run=args.dry_run, progress=for_terminal(args.quiet, new_label=None))
    if args.json:
        _emit_json(r.__dict__)
    else:
        done = "would be deleted (dry run: nothing was)" if r.dry_run else "deleted"
        print(
            f"gc: {_count(r.deleted_chunks, 'chunk')} {done} ({human_bytes(r.deleted_bytes)}), "
            f"{r.reachable_chunks:,} reachable from {_count(r.versions, 'version')} kept, "
            f"{r.spared_young} spared within the grace period"
        )
    return 0


def cmd_verify(repo: Repository, args: argparse.Namespace) -> int:
    progress = for_terminal(args.quiet, new_label=None)  # verifying finds nothing new
    r = repo.verify(args.ref, progress=progress, repair=args.repair)
    if args.json:
        _emit_json(
            {
                "ok": r.ok,
                "chunks": r.chunks,
                "bytes": r.bytes,
                "deltas": r.deltas,
                "corrupt": [c.hex() for c in r.corrupt],
                "missing": [c.hex() for c in r.missing],
                "removed": r.removed,
                "unreadable": [
                    {"repo": e.repo, "id": e.version_id.hex(), "reason": e.reason}
                    for e in r.unreadable
                ],
            }
        )
    else:
        for cid in r.corrupt:
            print(f"corrupt chunk {cid.hex()}", file=sys.stderr)
        for cid in r.missing:
            print(f"missing chunk {cid.hex()}", file=sys.stderr)
        for error in r.unreadable:
            print(f"{error}{_hint(error)}", file=sys.stderr)  # with the rm that removes it
        if r.ok:
            rebuilt = f", {r.deltas} rebuilt from deltas" if r.deltas else ""
            verified = f"{_count(r.chunks, 'chunk')} ({human_bytes(r.bytes)})"
            print(f"verified {verified}{rebuilt}: all intact")
    if r.removed and not args.json:
        print(
            f"removed {_count(r.removed, 'corrupt chunk')}: push the files that held them again "
            "to store them anew (until then the versions that use them cannot be pulled)"
        )
    if not r.ok:
        unreadable = len(r.unreadable)
        records = f", {_count(unreadable, 'unreadable version record')}"
        print(
            f"{PROG}: error: {_count(len(r.corrupt), 'corrupt chunk')} and "
            f"{_count(len(r.missing), 'missing chunk')}{records if unreadable else ''}",
            file=sys.stderr,
        )
        return 4
    return 0


def cmd_stats(repo: Repository, args: argparse.Namespace) -> int:
    s = repo.stats()
    if args.json:
        _emit_json(s)
        return 0
    ratio = f"{s['dedup_ratio']:.2f}x" if s["dedup_ratio"] else "-"
    print(f"store      {s['location']}")
    print(f"repos      {s['repos']}")
    print(f"versions   {s['versions']}")
    print(f"logical    {human_bytes(s['logical_bytes'])}")
    print(f"stored     {human_bytes(s['stored_bytes'])} in {_count(s['chunks'], 'chunk')}")
    print(f"saving     {ratio} (logical / stored)")
    return 0


# -- parser -------------------------------------------------------------------------------------

Command = Callable[[Repository, argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse's parser, kinder to typos: an argument a command does not take is reported by
    that command (with its usage, not the top level's), and a mistyped option or command gets
    the nearest one suggested (Python 3.11's argparse does neither)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:  # the CLI takes no arguments it does not know
            options = [a.partition("=")[0] for a in extras if a.startswith("-")]
            hint = _nearest(options[0], list(self._option_string_actions)) if options else None
            self.error(
                f"unrecognized arguments: {' '.join(extras)}"
                + (f" (maybe you meant {hint}?)" if hint else "")
            )
        return namespace, extras

    def _check_value(self, action: argparse.Action, value: object) -> None:
        choices = list(action.choices or ())
        hint = _nearest(str(value), choices) if choices and value not in choices else None
        if hint is None:
            super()._check_value(action, value)
            return
        listed = ", ".join(map(repr, choices))
        raise argparse.ArgumentError(
            action, f"invalid choice: {value!r}, maybe you meant {hint!r}? (choose from {listed})"
        )


def _nearest(word: str, candidates: list[str]) -> str | None:
    """The candidate closest to a mistyped ``word``, if any is close."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def _add(sub, name: str, func: Command, help: str, example: str, json: bool = True):
    """A command's parser with the options every command takes (``--json`` where it prints
    results)."""
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog="example:\n" + textwrap.indent(example.strip(), "  "),
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--store",
        help=f"store path or URL (default: ${ENV_STORE} or the embedded "
        "store in ~/.local/share/chunkstore)",
    )
    p.add_argument(
        "--token",
        help="token for a cluster whose nodes require one (default: $CHUNKSTORE_TOKEN)",
    )
    if json:
        p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=func)
    return p


def _add_tensor_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tensors",
        action="store_true",
        help="compare the tensors of safetensors and torch.save files instead of whole files",
    )
    p.add_argument(
        "--stats",
        action="store_true",
        help="with --tensors: read the changed tensors, count differing bytes and the relative "
        "L2 norm of each change",
    )


def build_parser(server_commands: bool = True) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Deduplicating, versioned storage for model weight files.",
        epilog=textwrap.dedent("""\
            examples:
              chunkstore push ./ckpt-1000 --repo llama-ft -m "step 1000" --tag v1
              chunkstore log llama-ft
              chunkstore diff llama-ft@v1 llama-ft
              chunkstore pull llama-ft@v1 ./restored

            refs: NAME (the latest version), NAME@TAG, NAME@ID-PREFIX (6+ hex digits);
            any of them + ~N is the version N pushes before it (llama-ft~ : the one before)
            """),
        formatter_class=HelpFormatter,
    )
    # also before the command, as in `chunkstore --store grpc://HOST:PORT log llama-ft`
    parser.add_argument(
        "--store",
        dest="global_store",
        metavar="STORE",
        help="store path or URL for the command (its own --store wins)",
    )
    parser.add_argument(
        "--token",
        dest="global_token",
        metavar="TOKEN",
        help="token for a cluster's nodes (the command's own --token wins)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _add(
        sub,
        "push",
        cmd_push,
        "store a file or directory as a new version of a repo",
        'chunkstore push ./ckpt-2000 --repo llama-ft -m "step 2000" --tag v2 '
        "--param lr=3e-4 --metric loss=2.05 --input datasets/web@v3",
    )
    p.add_argument("path", help="file or directory to store")
    p.add_argument("--repo", required=True, help="repo name, e.g. llama-ft or team/llama-ft")
    p.add_argument("-m", "--message", default="", help="what this version is (default: empty)")
    p.add_argument("--tag", action="append", default=[], help="tag the version (repeatable)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="record a parameter (repeatable)",
    )
    p.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="K=NUM",
        help="record a metric (repeatable)",
    )
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="REF",
        help="a stored version this one was made from, e.g. its data set (repeatable)",
    )
    delta = p.add_mutually_exclusive_group()
    delta.add_argument(
        "--delta-base",
        metavar="REF",
        help="store tensors as deltas against this version's (default: the first --input "
        "that has the tensor, else the repo's latest version)",
    )
    delta.add_argument(
        "--no-delta", action="store_true", help="store every chunk on its own, no deltas"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")

    p = _add(
        sub,
        "pull",
        cmd_pull,
        "recreate a version's files under a directory",
        "chunkstore pull llama-ft@v1 ./restored\n"
        "chunkstore pull llama-ft ./serve --file '*.json' --file tokenizer   # just these",
    )
    p.add_argument("ref", help=REF_HELP)
    p.add_argument("dest", help="directory to write into (must be empty unless --force)")
    p.add_argument("--force", action="store_true", help="write into a non-empty directory")
    p.add_argument(
        "--file",
        action="append",
        metavar="PATTERN",
        help="only the files this glob over the path, or directory, names (repeatable; "
        "a pattern that names no file is an error; default: every file)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")

    p = _add(
        sub,
        "cat",
        cmd_cat,
        "write one file of a version to standard output, every chunk verified",
        "chunkstore cat llama-ft config.json | jq .num_hidden_layers",
        json=False,
    )
    p.add_argument("ref", help=REF_HELP)
    p.add_argument("path", help="the file's path in the version, as `show` lists it")

    p = _add(sub, "log", cmd_log, "list a repo's versions, newest first", "chunkstore log llama-ft")
    p.add_argument("repo", help="repo name")
    p.add_argument(
        "-n",
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="show at most N versions (N >= 1; default: all)",
    )

    p = _add(
        sub,
        "show",
        cmd_show,
        "show one version: files, params, metrics, lineage",
        "chunkstore show llama-ft@v2 --tensors",
    )
    p.add_argument("ref", help=REF_HELP)
    p.add_argument(
        "--tensors",
        action="store_true",
        help="list the tensor index of each safetensors or torch.save file",
    )

    p = _add(
        sub,
        "diff",
        cmd_diff,
        "compare two versions: files, params, metrics, tensors",
        "chunkstore diff llama-ft@v1 llama-ft@v2\n"
        "chunkstore diff llama-ft --tensors --stats   # what the last push changed",
    )
    p.add_argument("old", metavar="REF_A", help=REF_HELP)
    p.add_argument(
        "new", metavar="REF_B", nargs="?", help="default: REF_A, compared with the version before"
    )
    _add_tensor_flags(p)
    p.add_argument("--file", help="with --tensors: only this file of the versions")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar (--stats)")

    p = _add(
        sub,
        "status",
        cmd_status,
        "compare local files with a repo's latest version",
        "chunkstore status ./ckpt-3000 --repo llama-ft\n"
        "chunkstore status ./ckpt-3000 --repo llama-ft --tensors --stats  # what training changed",
    )
    p.add_argument("path", help="local file or directory, as it would be pushed")
    p.add_argument("--repo", required=True, help="repo whose latest version to compare with")
    _add_tensor_flags(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = _add(
        sub,
        "tag",
        cmd_tag,
        "point a tag at a version (moves it if it exists)",
        "chunkstore tag llama-ft@3f2a9c1e best",
    )
    p.add_argument("ref", help=REF_HELP)
    p.add_argument("tag", help="tag name: letters, digits, '.', '_' and '-'")
    p.add_argument("-d", "--delete", action="store_true", help="delete the tag instead")

    _add(sub, "ls", cmd_ls, "list repos", "chunkstore ls --json")

    p = _add(
        sub,
        "copy",
        cmd_copy,
        "copy a version and its history to another store (only what it lacks), with their tags",
        "chunkstore copy llama-ft@v3 --to grpc://cluster-1:7400    # share a local version\n"
        "chunkstore copy llama-ft --store grpc://cluster-1:7400 --to ./offline --only\n"
        "chunkstore copy llama-ft --to grpc://cluster-1:7400 --inputs   # with its base model",
    )
    p.add_argument("ref", help=REF_HELP)
    p.add_argument(
        "--to", required=True, metavar="STORE", help="the destination store: a path or a URL"
    )
    p.add_argument(
        "--to-token",
        metavar="TOKEN",
        help="token for the destination's nodes (default: as for the source)",
    )
    p.add_argument("--only", action="store_true", help="this version alone, not its ancestors")
    p.add_argument(
        "--inputs",
        action="store_true",
        help="also the versions it was made from (--input of its push: a base model, a data "
        "set), theirs, and so on; each with its ancestors unless --only",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")

    p = _add(
        sub,
        "rm",
        cmd_rm,
        "remove a version (space is reclaimed by gc)",
        "chunkstore rm llama-ft@3f2a9c1e",
    )
    p.add_argument("ref", help=REF_HELP)

    p = _add(
        sub,
        "prune",
        cmd_prune,
        "remove the versions of a repo that no keep rule keeps (space is reclaimed by gc)",
        "chunkstore prune llama-ft --keep-last 5 --keep-lowest eval_loss=2 --dry-run\n"
        "chunkstore prune llama-ft --keep-within 7d\n\n"
        "The newest version, tagged versions and versions a kept one names as --input are\n"
        "always kept; the chunks deltas of kept versions need stay through gc.",
    )
    p.add_argument("repo", help="repo name")
    p.add_argument("--keep-last", type=int, default=0, metavar="N", help="the N newest versions")
    p.add_argument(
        "--keep-within",
        metavar="DURATION",
        help="versions made within DURATION of the newest (e.g. 36h, 7d, 2w)",
    )
    p.add_argument(
        "--keep-lowest",
        action="append",
        default=[],
        metavar="METRIC[=N]",
        help="the N (default 1) versions with the lowest METRIC, e.g. eval_loss (repeatable)",
    )
    p.add_argument(
        "--keep-highest",
        action="append",
        default=[],
        metavar="METRIC[=N]",
        help="the N (default 1) versions with the highest METRIC, e.g. accuracy (repeatable)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be removed; remove nothing"
    )

    p = _add(
        sub,
        "gc",
        cmd_gc,
        "delete chunks no version references",
        "chunkstore gc --dry-run   # what would go, and how much space\nchunkstore gc --grace 3600",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GC_GRACE,
        metavar="SECONDS",
        help=f"spare chunks wanted within this many seconds (default {DEFAULT_GC_GRACE:.0f})",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = _add(
        sub,
        "verify",
        cmd_verify,
        "re-read and re-hash every chunk a version (or all) uses",
        "chunkstore verify llama-ft@v1",
    )
    p.add_argument("ref", nargs="?", help=f"{REF_HELP} (default: every version)")
    p.add_argument(
        "--repair",
        action="store_true",
        help="remove the corrupt chunks found, so that pushing their files again stores them "
        "anew (embedded store)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    _add(sub, "stats", cmd_stats, "sizes: logical, stored, saving", "chunkstore stats --json")
    if server_commands:
        from chunkstore.server.command import add_cluster_parser, add_node_parser

        add_node_parser(sub)
        add_cluster_parser(sub)
    else:  # listed in --help; their real parsers (and gRPC) load only when used
        sub.add_parser("node", help="run a storage node")
        sub.add_parser("cluster", help="start, stop, inspect and change a cluster")
    return parser


SERVER_COMMANDS = ("node", "cluster")


def _hint(exc: ChunkstoreError) -> str:
    """What a user of the CLI can do about ``exc``, where the library cannot say it."""
    if isinstance(exc, StoreMissing):
        return f" (a push makes one; for another store give --store PATH or set ${ENV_STORE})"
    if isinstance(exc, UnreadableVersion):
        return (
            f" (restore it from a copy of the store, or remove it: {PROG} rm "
            f"{exc.repo}@{exc.version_id.hex()})"
        )
    return ""


def _print_warnings() -> None:
    """Show each ChunkstoreWarning once, as a ``warning:`` line on stderr (others as Python
    does). Call inside ``warnings.catch_warnings()``, which puts things back."""
    shown: set[str] = set()
    python_shows = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not issubclass(category, ChunkstoreWarning):
            python_shows(message, category, filename, lineno, file, line)
        elif str(message) not in shown:
            shown.add(str(message))
            print(f"{PROG}: warning: {message}", file=sys.stderr)

    warnings.simplefilter("always", ChunkstoreWarning)
    warnings.showwarning = show


def _run_on_store(args: argparse.Namespace) -> int:
    """Run a command that works on a store: open it, run, close it."""
    # Only a push makes a new embedded store: reading a mistyped path must not create one.
    create = args.command == "push"
    with connect(args.store, token=args.token, create=create) as repo:
        return args.func(repo, args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(server_commands=any(a in SERVER_COMMANDS for a in argv))
    args = parser.parse_args(argv)
    args.quiet = getattr(args, "quiet", False)
    if getattr(args, "store", None) is None:
        args.store = args.global_store
    if getattr(args, "token", None) is None:
        args.token = args.global_token
    try:
        with warnings.catch_warnings():
            _print_warnings()
            # node and cluster commands manage their own resources
            code = args.run(args) if getattr(args, "run", None) else _run_on_store(args)
            sys.stdout.flush()  # a reader gone meanwhile shows here, not at exit
        return code
    except ChunkstoreError as exc:
        print(f"{PROG}: error: {exc}{_hint(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if args.command == "pull":
            print(f"{PROG}: interrupted; run it again with --force to resume", file=sys.stderr)
        elif args.command in SERVER_COMMANDS:
            print(f"{PROG}: interrupted", file=sys.stderr)
        else:
            print(f"{PROG}: interrupted; no partial version was made visible", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush
        return 128 + signal.SIGPIPE
    except OSError as exc:
        print(
            f"{PROG}: error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""),
            file=sys.stderr,
        )
        return 1
    except Exception as exc:  # never a traceback for users, unless asked for
        if os.environ.get("CHUNKSTORE_DEBUG"):
            raise
        print(
            f"{PROG}: internal error: {type(exc).__name__}: {exc} "
            "(set CHUNKSTORE_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 70


if __name__ == "__main__":
    sys.exit(main())
