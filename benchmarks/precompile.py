"""Compiling chunkstore's bytecode before a benchmark times command starts.

An editable install compiles a module when it is first imported, and not at all where
``PYTHONDONTWRITEBYTECODE`` is set: every start of the command line would then compile the
modules changed since their bytecode was written (~40 ms here), which an installed package
never does.
"""

from __future__ import annotations

import compileall
from pathlib import Path

import chunkstore
import chunkstore.client
import chunkstore.server


def compile_package() -> None:
    """Write up-to-date bytecode for every module of the chunkstore package."""
    for package in (chunkstore, chunkstore.client, chunkstore.server):
        compileall.compile_dir(Path(package.__file__).parent, quiet=1, maxlevels=1)
