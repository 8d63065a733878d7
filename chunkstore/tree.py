"""Which local files a push or a stage upload stores, and under which paths."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from chunkstore.errors import InvalidInput, NotFound
from chunkstore.model import normalise_path

#: Suffix of the hidden file a pull writes until it is complete, kept if the pull is
#: interrupted; with EARLIER after it, such a file set aside while another is written.
PARTIAL = ".chunkstore-partial"
EARLIER = "-earlier"


def is_partial(name: str) -> bool:
    """Whether a file of this name is a pull's partial file, not a file of the user's."""
    return name.startswith(".") and name.endswith((PARTIAL, PARTIAL + EARLIER))


def list_tree(path: Path) -> list[tuple[str, Path]]:
    """The files a push of ``path`` stores, as (stored path, local path), sorted.

    A directory's regular files (recursively, following no directory symlinks) are stored under
    their paths relative to it, leaving out the partial files of interrupted pulls; a single
    file is stored under its base name.
    """
    if not path.exists():
        raise NotFound(f"no such file or directory: {path}")
    if path.is_file():
        return [(_stored_path(path.name, path), path)]
    if not path.is_dir():
        raise InvalidInput(f"not a regular file or directory: {path}")
    found: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if is_partial(name):
                continue
            local = Path(root, name)
            if stat.S_ISREG(local.stat().st_mode):
                found.append((_stored_path(local.relative_to(path).as_posix(), local), local))
    found.sort()
    return found


def _stored_path(relative: str, local: Path) -> str:
    """``relative`` as a stored path; a clear error for the one thing a local name may hold
    that a stored path may not (paths are stored '/'-separated, never with a backslash)."""
    if "\\" in relative:
        raise InvalidInput(f"cannot push {local}: a path with a backslash cannot be stored")
    return normalise_path(relative)
