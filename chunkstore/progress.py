"""Progress reporting for long work (push, pull, verify): a tiny interface, two implementations."""

from __future__ import annotations

import sys
from typing import Protocol


class Progress(Protocol):
    """Receives byte counts as work advances. Implementations must be thread-safe enough for
    one reporting thread."""

    def start(self, total: int, label: str) -> None:
        """A unit of work of ``total`` bytes begins."""

    def advance(self, done: int, new: int = 0) -> None:
        """``done`` more bytes were handled, ``new`` of which were not stored before."""

    def finish(self) -> None:
        """The unit of work ended (also on error)."""


class NoProgress:
    """Reports nothing: for scripts, pipes, ``--quiet`` and library calls."""

    def start(self, total: int, label: str) -> None:
        pass

    def advance(self, done: int, new: int = 0) -> None:
        pass

    def finish(self) -> None:
        pass


class BarProgress:
    """A progress bar on stderr: bytes done, new bytes, speed and time left."""

    def __init__(self) -> None:
        self._bar = None
        self._new = 0

    def start(self, total: int, label: str) -> None:
        from tqdm import tqdm

        self.finish()
        self._new = 0
        self._bar = tqdm(
            total=total,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        )

    def advance(self, done: int, new: int = 0) -> None:
        if self._bar is None:
            return
        self._new += new
        self._bar.update(done)
        if new:
            self._bar.set_postfix_str(f"new {human_bytes(self._new)}", refresh=False)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def for_terminal(quiet: bool = False) -> Progress:
    """A bar when stderr is a terminal and not ``quiet``, else nothing."""
    return BarProgress() if (not quiet and sys.stderr.isatty()) else NoProgress()


def human_bytes(n: float) -> str:
    """Bytes in decimal units, as users read them: 312 MB, 4.1 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")

