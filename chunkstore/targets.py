"""Where a pull writes: checked for every file before the first one is written."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from chunkstore.errors import InvalidInput


def check_targets(dest: Path, targets: Sequence[Path]) -> None:
    """Raise InvalidInput if a file of a pull into ``dest`` cannot be written at its target
    (a path under ``dest``): a directory is in its place, or in the place of one of its
    directories there is a file or a symlink. A pull never writes through a symlink inside
    ``dest``: the file would land outside it."""
    checked: set[Path] = set()
    for target in targets:
        folder = dest
        for part in target.relative_to(dest).parts[:-1]:
            folder = folder / part
            if folder in checked:
                continue
            checked.add(folder)
            if folder.is_symlink():
                raise InvalidInput(
                    f"cannot write {target}: {folder} is a symlink, and a pull does not write "
                    "through one (remove it)"
                )
            if os.path.lexists(folder) and not folder.is_dir():
                raise InvalidInput(f"cannot write {target}: a file is in the way of its directory")
        if target.is_dir():
            raise InvalidInput(f"cannot write {target}: a directory is in the way")
