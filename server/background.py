"""What a node's background work shares: a byte-rate limit, and a small state file in the data
directory that lets work resume where it stopped after a restart."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from chunkstore.errors import InvalidInput

log = logging.getLogger("chunkstore.background")

STATE_FILE = "background-state.json"
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_RATE_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?)\s*([kmg]?)(?:i?b)?(?:/s)?", re.IGNORECASE)


def parse_rate(text: str) -> float:
    """Bytes per second from ``"64M"``, ``"512k"``, ``"1.5G"``, ``"1000"`` (binary units;
    ``0`` means unlimited). Raises InvalidInput."""
    match = _RATE_RE.fullmatch(text.strip())
    if not match:
        raise InvalidInput(f"bad rate {text!r}: want bytes per second, e.g. 64M, 512k or 0")
    return float(match[1]) * _UNITS[match[2].lower()]


class TokenBucket:
    """At most ``rate`` bytes per second on average (0: unlimited), in bursts of up to one
    second's worth. :meth:`take` sleeps until the bytes may go, or until ``stop`` is set."""

    def __init__(self, rate: float, stop: threading.Event | None = None) -> None:
        self.rate = rate
        self._stop = stop or threading.Event()
        self._lock = threading.Lock()
        self._tokens = rate
        self._last = time.monotonic()

    def take(self, nbytes: int) -> bool:
        """Wait until ``nbytes`` may go; False if stopped meanwhile."""
        if self.rate <= 0:
            return not self._stop.is_set()
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes
            debt = -self._tokens
        if debt > 0:
            return not self._stop.wait(debt / self.rate)
        return not self._stop.is_set()


class StateFile:
    """A JSON object in ``DATA_DIR/background-state.json``, one section per user.

    Written by replacing the file (not synced: losing the latest state only repeats work)."""

    def __init__(self, data_dir: str | Path | None) -> None:
        self._path = Path(data_dir) / STATE_FILE if data_dir is not None else None
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {}
        if self._path is not None and self._path.exists():
            try:
                loaded = json.loads(self._path.read_text())
                if isinstance(loaded, dict):
                    self._data = loaded
            except (OSError, ValueError) as e:
                log.warning("ignoring unreadable %s: %s", self._path, e)

    def get(self, section: str) -> dict[str, Any]:
        with self._lock:
            value = self._data.get(section)
            return dict(value) if isinstance(value, dict) else {}

    def put(self, section: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._data[section] = value
            if self._path is None or not self._path.parent.is_dir():
                return
            tmp = self._path.with_name(self._path.name + ".tmp")
            try:
                tmp.write_text(json.dumps(self._data))
                os.replace(tmp, self._path)
            except OSError as e:
                log.warning("cannot write %s: %s", self._path, e)
