"""Running one function over many items on a few threads, with little queued at once."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def for_each(
    fn: Callable[[T], object], items: Iterable[T], workers: int, name: str, queued: int = 4
) -> None:
    """Call ``fn(item)`` for every item on ``workers`` threads named ``name``-N, with at most
    ``queued`` items per thread waiting. The first exception is raised once the calls already
    running end; the items not started are dropped."""
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix=name) as pool:
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                while len(pending) > queued * workers:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
