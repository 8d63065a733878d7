"""Batches by size: never over the limit but for a single larger item, never over the count."""

from chunkstore.batching import by_size


def test_batches_keep_under_the_limit_and_the_count():
    sizes = [3, 4, 2, 9, 1, 1, 1, 1, 5]
    batches = list(by_size(sizes, lambda n: n, limit=8))
    assert batches == [[3, 4], [2], [9], [1, 1, 1, 1], [5]]
    assert [n for batch in batches for n in batch] == sizes
    assert list(by_size(sizes, lambda n: n, limit=100, max_items=4)) == [
        [3, 4, 2, 9],
        [1, 1, 1, 1],
        [5],
    ]
    assert list(by_size([], len, limit=1)) == []
