"""Running one function over many items on a few threads, with little queued at once."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain, islice
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def for_each(
    fn: Callable[[T], object], items: Iterable[T], workers: int, name: str, queued: int = 4
) -> None:
    """Call ``fn(item)`` for every item on ``workers`` threads named ``name``-N, with at most
    ``queued`` items per thread waiting. The first exception is raised once the calls already
    running end; the items not started are dropped."""
    for _ in imap(fn, items, workers, name, queued):
        pass


def imap(
    fn: Callable[[T], R], items: Iterable[T], workers: int, name: str, queued: int = 4
) -> Iterator[R]:
    """``fn(item)`` of every item, in the items' order, computed as :func:`for_each` calls
    them (on the calling thread for one worker or a single item: starting threads would cost
    more than a small call); at most ``queued`` results per thread wait to be taken.
    Abandoning the iterator drops the items not started."""
    items = iter(items)
    first = list(islice(items, 2))
    if workers <= 1 or len(first) < 2:
        yield from map(fn, chain(first, items))
        return
    items = chain(first, items)
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                while len(pending) > queued * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
