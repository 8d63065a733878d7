"""Reading the TOML files operators write (cluster files, tokens files) with one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from chunkstore.errors import InvalidInput


def load_toml(
    path: str | Path, what: str, error: type[InvalidInput] = InvalidInput
) -> dict[str, Any]:
    """The TOML document at ``path``; raises ``error`` with one line starting with ``path`` if
    the file cannot be read, is not UTF-8, or is not TOML (with tomllib's line and column)."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: invalid TOML: {e}") from None
