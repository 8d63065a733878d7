"""Progress reporting for long work (push, pull, verify): a tiny interface, two implementations."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import Protocol, TextIO


class Progress(Protocol):
    """Receives byte counts as work advances; ``advance`` may be called from several threads."""

    def start(self, total: int, label: str) -> None:
        """A unit of work of ``total`` bytes begins."""

    def advance(self, done: int, new: int = 0) -> None:
        """``done`` more bytes were handled, ``new`` of which were not stored before (a push)
        or came from the store rather than a local copy (a pull)."""

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
    """A one-line progress bar on stderr: share done, bytes, new bytes, speed, time left.

    Redrawn at most ten times a second and erased when the work ends, so the command's own
    summary line is what stays on screen.
    """

    REDRAW_SECONDS = 0.1

    def __init__(self, stream: TextIO | None = None, new_label: str | None = "new") -> None:
        """``new_label`` names the new bytes (None: the work has none, and they are not shown)."""
        self._stream = stream or sys.stderr
        self._new_label = new_label
        self._total = self._done = self._new = 0
        self._label = ""
        self._started = self._drawn_at = 0.0
        self._active = False
        self._lock = threading.Lock()

    def start(self, total: int, label: str) -> None:
        self.finish()
        self._total, self._done, self._new, self._label = total, 0, 0, label
        self._started = time.monotonic()
        self._drawn_at = 0.0
        self._active = True
        self._draw()

    def advance(self, done: int, new: int = 0) -> None:
        if not self._active:
            return
        with self._lock:
            self._done += done
            self._new += new
            if time.monotonic() - self._drawn_at >= self.REDRAW_SECONDS:
                self._draw()

    def finish(self) -> None:
        if self._active:
            self._stream.write("\r\x1b[2K")
            self._stream.flush()
            self._active = False

    def _draw(self) -> None:
        now = time.monotonic()
        self._drawn_at = now
        elapsed = now - self._started
        # a total may be an estimate (a cluster's stored bytes): never past 100 %
        share = min(self._done / self._total, 1.0) if self._total else 1.0
        speed = self._done / elapsed if elapsed > 0 else 0.0
        left = max(self._total - self._done, 0) / speed if speed > 0 else None
        text = (
            f"{self._label} {share:4.0%} {human_bytes(self._done)}/{human_bytes(self._total)}"
            + (f", {human_bytes(self._new)} {self._new_label}" if self._new_label else "")
            + f", {human_bytes(speed)}/s"
            + (f", {left:.0f}s left" if left is not None else "")
        )
        width = shutil.get_terminal_size().columns
        bar_width = width - len(text) - 4
        if bar_width >= 10:
            filled = int(bar_width * share)
            text = f"{text} [{'#' * filled}{'.' * (bar_width - filled)}]"
        self._stream.write("\r\x1b[2K" + text[: width - 1])
        self._stream.flush()


def for_terminal(quiet: bool = False, new_label: str | None = "new") -> Progress:
    """A bar when stderr is a terminal and not ``quiet``, else nothing."""
    return BarProgress(new_label=new_label) if (not quiet and sys.stderr.isatty()) else NoProgress()


class Tally:
    """Counts the bytes done and new of every unit of work, and passes everything on to
    ``then``."""

    def __init__(self, then: Progress | None = None) -> None:
        self._then = then or NoProgress()
        self.done = self.new = 0
        self._lock = threading.Lock()

    def start(self, total: int, label: str) -> None:
        self._then.start(total, label)

    def advance(self, done: int, new: int = 0) -> None:
        with self._lock:
            self.done += done
            self.new += new
        self._then.advance(done, new)

    def finish(self) -> None:
        self._then.finish()


def human_bytes(n: float) -> str:
    """Bytes in decimal units, as users read them: 312 MB, 4.1 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
