"""Which local files a push or a stage upload stores, and under which paths."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from chunkstore.errors import InvalidInput, NotFound
from chunkstore.model import normalise_path


def list_tree(path: Path) -> list[tuple[str, Path]]:
    """The files a push of ``path`` stores, as (stored path, local path), sorted.

    A directory's regular files (recursively, following no directory symlinks) are stored under
    their paths relative to it; a single file is stored under its base name.
    """
    if not path.exists():
        raise NotFound(f"no such file or directory: {path}")
    if path.is_file():
        return [(normalise_path(path.name), path)]
    if not path.is_dir():
        raise InvalidInput(f"not a regular file or directory: {path}")
    found: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            local = Path(root, name)
            if stat.S_ISREG(local.stat().st_mode):
                found.append((normalise_path(local.relative_to(path).as_posix()), local))
    found.sort()
    return found
