"""Running a function over items on a few threads: order, errors, and where calls run."""

from __future__ import annotations

import threading
import time

import pytest

from chunkstore.parallel import for_each, imap


def test_imap_gives_results_in_the_items_order():
    def slow_square(x: int) -> int:
        time.sleep(0.001 * (x % 3))
        return x * x

    assert list(imap(slow_square, range(50), 3, "t")) == [x * x for x in range(50)]


def test_several_items_run_on_worker_threads():
    threads = list(imap(lambda _: threading.current_thread().name, range(8), 2, "square"))
    assert all(name.startswith("square") for name in threads)


@pytest.mark.parametrize(("items", "workers"), [([1], 4), ([1, 2, 3], 1), ([], 2)])
def test_one_item_or_one_worker_runs_on_the_calling_thread(items, workers):
    caller = threading.current_thread()
    ran = list(imap(lambda _: threading.current_thread(), items, workers, "t"))
    assert ran == [caller] * len(items)


def test_for_each_raises_the_first_error_and_drops_items_not_started():
    started = []

    def fail_on_three(x: int) -> None:
        started.append(x)
        if x == 3:
            raise ValueError("three")

    with pytest.raises(ValueError, match="three"):
        for_each(fail_on_three, iter(range(1000)), 2, "t", queued=1)
    assert len(started) < 1000
