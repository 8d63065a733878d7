"""JSON as the CLI prints it: strict (RFC 8259), so any parser reads it. A float that is NaN
or infinite, which JSON cannot spell, is written as null."""

from __future__ import annotations

import json
import math
from typing import TextIO


def finite(value: object) -> object:
    """``value`` with every NaN or infinite float inside it (in dicts, lists, tuples) made
    None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def emit_json(value: object, out: TextIO) -> None:
    """Write ``value`` to ``out`` as indented strict JSON and a newline."""
    json.dump(finite(value), out, indent=2, allow_nan=False)
    out.write("\n")
