"""Cutting a stream of items into batches by size: a batch is what one call or one task
takes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def by_size(
    items: Iterable[T], size: Callable[[T], int], limit: int, max_items: int | None = None
) -> Iterator[list[T]]:
    """Consecutive ``items`` in lists whose sizes add up to at most ``limit`` (an item larger
    than that alone) and of at most ``max_items`` items."""
    batch: list[T] = []
    total = 0
    for item in items:
        n = size(item)
        if batch and (total + n > limit or len(batch) == max_items):
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += n
    if batch:
        yield batch
