"""Refs name versions: ``NAME`` (latest), ``NAME@TAG``, ``NAME@ID-PREFIX`` (>= 6 hex digits),
any of them followed by ``~N``: the version N pushes before it (its first parent, N times;
``~`` alone is ``~1``)."""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from chunkstore import ids
from chunkstore.errors import (
    AmbiguousRef,
    ChunkstoreError,
    ChunkstoreWarning,
    CorruptRecord,
    InvalidInput,
    NotFound,
    UnreadableVersion,
)
from chunkstore.model import Version, check_repo_name, decode_version, parse_version
from chunkstore.stores.base import MetaStore

MIN_PREFIX = 6
_HEX = re.compile(r"[0-9a-f]+")
_BACK = re.compile(r"~(\d*)$")


@dataclass(frozen=True)
class Ref:
    repo: str
    selector: str | None  # tag or id prefix; None means the latest version
    back: int = 0  # how many versions before the one the selector names

    @classmethod
    def parse(cls, text: str) -> Ref:
        back = _BACK.search(text)
        name = text[: back.start()] if back else text
        if "~" in name:
            raise InvalidInput(f"invalid ref {text!r}: '~' is followed by a number of versions")
        repo, sep, selector = name.partition("@")
        if sep and not selector:
            raise InvalidInput(f"invalid ref {text!r}: nothing after '@'")
        steps = int(back.group(1) or 1) if back else 0
        return cls(check_repo_name(repo), selector or None, steps)

    def __str__(self) -> str:
        name = f"{self.repo}@{self.selector}" if self.selector else self.repo
        return f"{name}~{self.back}" if self.back else name


def reads_as_id_prefix(text: str) -> bool:
    """Whether ``text`` (a tag, say) would be taken for an id prefix if no tag had its name."""
    return len(text) >= MIN_PREFIX and _HEX.fullmatch(text.lower()) is not None


#: What a reader does with a version record it cannot read and leaves out (see
#: :func:`load_versions`).
OnUnreadable = Callable[[UnreadableVersion], None]


def left_out(error: UnreadableVersion) -> None:
    """The :data:`OnUnreadable` of listings that go on past a record they cannot read: a
    :class:`~chunkstore.errors.ChunkstoreWarning` naming it."""
    warnings.warn(f"{error}; left out", ChunkstoreWarning, stacklevel=2)


def _report(error: UnreadableVersion, on_unreadable: OnUnreadable | None) -> None:
    if on_unreadable is None:
        raise error
    on_unreadable(error)


def load_versions(
    meta: MetaStore, repo: str, limit: int | None = None, on_unreadable: OnUnreadable | None = None
) -> list[Version]:
    """Every version of ``repo`` with its tags, newest first (the newest ``limit``).

    A record that cannot be read (see :func:`~chunkstore.model.decode_version`) raises
    UnreadableVersion; with ``on_unreadable`` it is passed there instead and left out, so that
    a listing goes on. Those that do not parse at all are passed first: their time is unknown.
    """
    listing = _listing(meta, repo)
    listing.report_unparsed(on_unreadable)
    out: list[Version] = []
    for head in listing.heads:
        if limit is not None and len(out) >= limit:
            break
        try:
            out.append(head.version())
        except UnreadableVersion as error:
            _report(error, on_unreadable)
    return out


def users_of(
    meta: MetaStore,
    repo: str,
    on_unreadable: Callable[[UnreadableVersion, bytes], None] | None = None,
) -> list[Version]:
    """The versions of other repos that name a version of ``repo`` as an input. The others are
    only parsed, not decoded: this reads every version record in the store. A record that
    cannot be read (it does not parse, is a version of another repo, or names a version of
    ``repo`` and does not match its id) might name one: UnreadableVersion, or with
    ``on_unreadable`` it is passed there with its bytes and left out."""
    out = []
    for name in meta.list_repos():
        if name == repo:
            continue
        for vid, data in meta.list_versions(name):
            try:
                if any(link.repo == repo for link in parse_version(name, vid, data).inputs):
                    out.append(decode_version(name, vid, data))
            except UnreadableVersion as error:
                if on_unreadable is None:
                    raise
                on_unreadable(error, data)
    return out


def latest(meta: MetaStore, repo: str, on_unreadable: OnUnreadable | None = None) -> Version | None:
    """The newest version of ``repo``, or None if it has none; as :func:`resolve` of the
    repo's plain name otherwise."""
    listing = _listing(meta, repo)
    return None if listing.empty else _resolve(Ref(repo, None), listing, on_unreadable)


def newest_and_count(
    meta: MetaStore, repo: str, on_unreadable: OnUnreadable | None = None
) -> tuple[Version | None, int]:
    """The newest version of ``repo`` that can be read (None if it has none) and how many
    versions it has, not counting the records found unreadable: those that do not parse, and
    any newer than it that do not match their ids (see :func:`load_versions` for
    ``on_unreadable``)."""
    listing = _listing(meta, repo)
    listing.report_unparsed(on_unreadable)
    count = len(listing.heads)
    for head in listing.heads:
        try:
            return head.version(), count
        except UnreadableVersion as error:
            _report(error, on_unreadable)
            count -= 1
    return None, count


def unknown_repo(meta: MetaStore, name: str) -> NotFound:
    """The error for a repo ``meta`` lacks, naming the closest one it has (a typo)."""
    try:
        close = difflib.get_close_matches(name, meta.list_repos(), n=1, cutoff=0.6)
    except ChunkstoreError:  # the listing is a courtesy: the repo is unknown either way
        close = []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return NotFound(f"unknown repo {name!r}{hint}")


def resolve(meta: MetaStore, ref: Ref | str, on_unreadable: OnUnreadable | None = None) -> Version:
    """The version a ref names; NotFound or AmbiguousRef with a clear reason otherwise.

    Only the version named is decoded whole: choosing reads each record's time and parents. A
    ref that names a record that cannot be read raises UnreadableVersion for it. The other
    records of the repo that cannot be read go to ``on_unreadable`` (see
    :func:`load_versions`; without it they raise too): those that do not parse have no known
    time, so the latest version, or the one before another, is chosen without them.
    """
    if isinstance(ref, str):
        ref = Ref.parse(ref)
    listing = _listing(meta, ref.repo)
    if listing.empty:
        raise unknown_repo(meta, ref.repo)
    return _resolve(ref, listing, on_unreadable)


def _resolve(ref: Ref, listing: _Listing, on_unreadable: OnUnreadable | None) -> Version:
    head = _select(ref, listing)
    for _ in range(ref.back):
        head = _before(ref, head, listing.heads)
    listing.report_unparsed(on_unreadable)
    return head.version()


def _before(ref: Ref, head: _Head, heads: list[_Head]) -> _Head:
    """The version ``head`` was pushed on (its first parent); if that one was removed (rm,
    prune), the newest version made before ``head``."""
    if head.parents:
        for h in heads:
            if h.id == head.parents[0]:
                return h
        for h in heads:
            if (h.created_ns, h.id) < (head.created_ns, head.id):
                return h
    raise NotFound(f"{ref} does not exist: no version came before {ref.repo}@{head.short_id}")


@dataclass(frozen=True)
class _Head:
    """A version record read only as far as choosing among versions needs (decoding every
    file entry of every version cost 0.6 s for a repo of 10 000 versions of 20 files)."""

    repo: str
    id: bytes
    created_ns: int
    parents: list[bytes]
    tags: list[str]
    data: bytes

    @property
    def short_id(self) -> str:
        return ids.short(self.id)

    def version(self) -> Version:
        return decode_version(self.repo, self.id, self.data, self.tags)


@dataclass(frozen=True)
class _Listing:
    """The version records of a repo and its tags."""

    heads: list[_Head]  # the records that parse, newest first
    unreadable: dict[bytes, UnreadableVersion]  # those that do not, by id
    tags: dict[str, bytes]  # tag -> version id

    @property
    def empty(self) -> bool:
        return not self.heads and not self.unreadable

    def report_unparsed(self, on_unreadable: OnUnreadable | None) -> None:
        """Pass each record that does not parse to ``on_unreadable`` (raise the first
        without one)."""
        for error in self.unreadable.values():
            _report(error, on_unreadable)


def _listing(meta: MetaStore, repo: str) -> _Listing:
    tags = meta.tags(repo)
    by_version: dict[bytes, list[str]] = {}
    for tag, vid in tags.items():
        by_version.setdefault(vid, []).append(tag)
    heads, unreadable = [], {}
    for vid, data in meta.list_versions(repo):
        try:
            msg = parse_version(repo, vid, data)
        except UnreadableVersion as error:
            unreadable[vid] = error
            continue
        tagged = by_version.get(vid, [])
        heads.append(_Head(repo, vid, msg.created_ns, list(msg.parents), tagged, data))
    heads.sort(key=lambda h: (h.created_ns, h.id), reverse=True)
    return _Listing(heads, unreadable, tags)


def _select(ref: Ref, listing: _Listing) -> _Head:
    """The version ``ref`` names before its ``~N``; UnreadableVersion if it names a record
    that does not parse."""
    heads = listing.heads
    if ref.selector is None:
        if not heads:
            named = ", ".join(f"{ref.repo}@{ids.short(vid, 12)}" for vid in listing.unreadable)
            raise CorruptRecord(
                f"repo {ref.repo!r} has no version that can be read, only unreadable records "
                f"({named}): name one by its id"
            )
        return heads[0]
    by_id = {h.id: h for h in heads}
    tagged = listing.tags.get(ref.selector)
    if tagged in by_id:
        return by_id[tagged]
    if tagged in listing.unreadable:
        raise listing.unreadable[tagged]
    sel = ref.selector.lower()
    if not _HEX.fullmatch(sel):
        raise NotFound(f"{ref.repo} has no tag {ref.selector!r}")
    if len(sel) < MIN_PREFIX:
        raise InvalidInput(
            f"{ref.repo} has no tag {ref.selector!r}, and an id prefix needs at least "
            f"{MIN_PREFIX} hex digits"
        )
    matches = [vid for vid in [*by_id, *listing.unreadable] if vid.hex().startswith(sel)]
    if not matches:
        raise NotFound(f"{ref.repo} has no tag or version {ref.selector!r}")
    if len(matches) > 1:
        raise AmbiguousRef(
            f"{ref} is ambiguous: matches {', '.join(ids.short(vid) for vid in matches[:5])}"
        )
    if matches[0] in listing.unreadable:
        raise listing.unreadable[matches[0]]
    return by_id[matches[0]]
