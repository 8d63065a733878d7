"""Which local files a push or a stage upload stores, and under which paths."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from chunkstore.errors import ChunkstoreError, InvalidInput, NotFound, PermissionDenied
from chunkstore.model import normalise_path

#: Suffix of the hidden file a pull writes until it is complete, kept if the pull is
#: interrupted; with EARLIER after it, such a file set aside while another is written.
PARTIAL = ".chunkstore-partial"
EARLIER = "-earlier"


def is_partial(name: str) -> bool:
    """Whether a file of this name is a pull's partial file, not a file of the user's."""
    return name.startswith(".") and name.endswith((PARTIAL, PARTIAL + EARLIER))


def local_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path; InvalidInput if it is empty (``Path("")`` would quietly be the
    current directory)."""
    if os.fspath(path) in ("", b""):
        raise InvalidInput("a local path may not be empty (use . for the current directory)")
    return Path(path)


def printable(path: str | os.PathLike) -> str:
    """``path`` as it can be printed: bytes that are not UTF-8 as ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Skipped:
    """A local path a push leaves out, and why."""

    path: str  # printable (see :func:`printable`)
    reason: str

    def to_json(self) -> dict:
        return {"path": self.path, "reason": self.reason}


@dataclass
class LocalTree:
    """What a push of a local path stores: ``files`` as (stored path, local path), sorted; and
    the paths under it that it leaves out, each with its reason."""

    files: list[tuple[str, Path]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


DANGLING = "dangling symlink: its target does not exist"
DIRECTORY_LINK = "symlink to a directory: not followed"
EMPTY_DIRECTORY = "empty directory: directories are not stored, only the files in them"
NOT_REGULAR = "not a regular file"
STORE_DIRECTORY = "the store's own directory"


def list_tree(path: Path, leave_out: Path | None = None) -> LocalTree:
    """The files a push of ``path`` stores, and what it leaves out.

    A directory's regular files (recursively) are stored under their paths relative to it,
    leaving out the partial files of interrupted pulls; a single file is stored under its base
    name. A symlink to a file is stored as the file's bytes. Dangling symlinks, symlinks to
    directories, empty directories, other kinds of file and the directory ``leave_out`` (the
    store's own) are left out and listed in :attr:`LocalTree.skipped`.

    Raises PermissionDenied naming a directory that cannot be read, and InvalidInput for a
    name that cannot be stored: nothing is left out without being listed.
    """
    if not os.path.lexists(path):
        raise NotFound(f"no such file or directory: {printable(path)}")
    if path.is_file():
        return LocalTree([(_stored_path(path.name, path), path)])
    if not path.is_dir():
        raise InvalidInput(f"not a regular file or directory: {printable(path)}")
    left_out = _identity(leave_out) if leave_out is not None else None
    if left_out is not None and _identity(path) == left_out:
        raise InvalidInput(f"cannot push {printable(path)}: it is the store's own directory")
    tree = LocalTree()
    for root, dirs, files in os.walk(path, onerror=_refuse):
        if not dirs and not files and root != os.fspath(path):
            tree.skipped.append(Skipped(printable(root), EMPTY_DIRECTORY))
        for name in sorted(dirs):
            local = Path(root, name)
            reason = DIRECTORY_LINK if local.is_symlink() else None
            if reason is None and left_out is not None and _identity(local) == left_out:
                reason = STORE_DIRECTORY
            if reason is not None:
                dirs.remove(name)
                tree.skipped.append(Skipped(printable(local), reason))
        dirs.sort()
        for name in sorted(files):
            if is_partial(name):
                continue
            local = Path(root, name)
            reason = _why_not_stored(local)
            if reason is None:
                tree.files.append((_stored_path(local.relative_to(path).as_posix(), local), local))
            else:
                tree.skipped.append(Skipped(printable(local), reason))
    tree.files.sort()
    return tree


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _why_not_stored(local: Path) -> str | None:
    """Why the non-directory ``local`` is left out of a push, or None if it is stored."""
    try:
        mode = local.stat().st_mode
    except FileNotFoundError:
        if local.is_symlink():
            return DANGLING
        raise
    except OSError as exc:
        if local.is_symlink():
            return f"unusable symlink: {exc.strerror}"
        raise _unreadable(exc) from None
    return None if stat.S_ISREG(mode) else NOT_REGULAR


def _refuse(error: OSError) -> NoReturn:
    raise _unreadable(error)


def _unreadable(error: OSError) -> ChunkstoreError:
    """The error for a path under a pushed directory that cannot be read: raised, not skipped,
    so a push never stores a tree with part of it silently missing."""
    where = printable(error.filename) if error.filename is not None else "a directory"
    if isinstance(error, PermissionError):
        return PermissionDenied(f"cannot read {where}: permission denied; nothing was stored")
    return ChunkstoreError(f"cannot read {where}: {error.strerror or error}; nothing was stored")


def _stored_path(relative: str, local: Path) -> str:
    """``relative`` as a stored path; a clear error for what a local name may hold that a
    stored path may not: a backslash (paths are stored '/'-separated), or bytes that are not
    UTF-8 (stored paths are UTF-8 text)."""
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(
            f"cannot store {printable(local)}: its name is not valid UTF-8 (rename it)"
        ) from None
    if "\\" in relative:
        raise InvalidInput(f"cannot push {local}: a path with a backslash cannot be stored")
    return normalise_path(relative)
