"""Calling several nodes at once, and judging their answers against the write quorum.

Calls to several nodes run in parallel (:func:`call_each`); once enough nodes answered for the
operation to succeed, a slower node gets a short grace period, then counts as failed, so one
hung node slows an operation down by about its own duration, not by a whole deadline.

Three patterns cover every replicated record (manifest, version, tag):

- :func:`write_all`: the write goes to every owner; it succeeds once ``quorum`` of them answered
  (:func:`write_many`: the same for many records at once, one call per node).
- :func:`remove_all`: the same for a removal, where an owner that lacks the record (NOT_FOUND)
  counts as done; NotFound only when no owner had it.
- :func:`first_answer`: a read tries the owners one by one until one answers; NOT_FOUND from one
  owner sends it to the next, and so does an owner slow to answer (the next one is asked too).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Generic, TypeVar

import grpc

from chunkstore import errors

from .rpc import NodeCallError, NodeClient, to_error

T = TypeVar("T")
K = TypeVar("K")


@dataclass
class Replies(Generic[T]):
    """What a set of nodes answered: results by node id, and the nodes that failed."""

    ok: dict[str, T] = field(default_factory=dict)
    failed: list[NodeCallError] = field(default_factory=list)


def settle(
    futures: Iterable[Future],
    absorb: Callable[[Future], None],
    enough: Callable[[], bool],
    grace: float,
    expendable: Collection[Future] = (),
) -> set[Future]:
    """Wait for ``futures``, passing each to ``absorb`` as it completes. Once ``enough()`` holds,
    the rest get ``grace`` seconds more, or as long as it took so far if that is longer; none,
    if all of them are ``expendable``.

    Returns the futures still running then: the stragglers.
    """
    start = time.monotonic()
    pending = set(futures)
    cutoff: float | None = None
    while pending:
        if cutoff is None and enough():
            now = time.monotonic()
            cutoff = now if pending <= set(expendable) else now + max(grace, now - start)
        timeout = None if cutoff is None else cutoff - time.monotonic()
        if timeout is not None and timeout <= 0:
            break
        done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
        for future in done:
            absorb(future)
    return pending


def call_each(
    pool: Executor,
    calls: Mapping[NodeClient, Callable[[], T]],
    enough: Callable[[Replies[T]], bool] = lambda replies: False,
) -> Replies[T]:
    """Run ``node.run(call)`` for every pair, the nodes in parallel; collect answers and failures.

    Once ``enough(replies so far)`` holds, slower nodes get a grace period (see :func:`settle`),
    unless they all were failing already before this call (then they get none); those that
    miss it are marked slow and count as failed (their calls finish in the background, within
    their deadlines). Errors other than NodeCallError propagate.
    """
    replies: Replies[T] = Replies()
    if len(calls) == 1:  # no thread hop for a single node
        ((node, call),) = calls.items()
        try:
            replies.ok[node.id] = node.run(call)
        except NodeCallError as failure:
            replies.failed.append(failure)
        return replies
    was_failing = {node for node in calls if not node.healthy}
    futures = {pool.submit(node.run, call): node for node, call in calls.items()}
    failing = {future for future, node in futures.items() if node in was_failing}

    def absorb(future: Future) -> None:
        try:
            replies.ok[futures[future].id] = future.result()
        except NodeCallError as failure:
            replies.failed.append(failure)

    start = time.monotonic()
    grace = next(iter(calls)).policy.straggler_grace
    for late in settle(futures, absorb, lambda: enough(replies), grace, failing):
        replies.failed.append(futures[late].mark_slow(time.monotonic() - start))
    return replies


def _short_of_quorum(
    what: str, answered: int, replies: Replies, owners: int, quorum: int
) -> errors.ChunkstoreError:
    return to_error(
        f"{what}: {answered} of {owners} owners answered, write quorum is {quorum}",
        replies.failed,
    )


def write_all(
    pool: Executor,
    owners: Sequence[NodeClient],
    call: Callable[[NodeClient], object],
    quorum: int,
    what: str,
) -> None:
    """Run ``call(node)`` on every owner; raise unless at least ``quorum`` of them answered.

    The error (see :func:`~chunkstore.client.rpc.to_error`) names ``what`` and every failed node.
    """
    replies = call_each(
        pool, {node: partial(call, node) for node in owners}, lambda r: len(r.ok) >= quorum
    )
    if len(replies.ok) < quorum:
        raise _short_of_quorum(what, len(replies.ok), replies, len(owners), quorum)


def write_many(
    pool: Executor,
    owners: Mapping[K, Sequence[NodeClient]],
    call: Callable[[NodeClient, list[K]], object],
    quorum: int,
    what: Callable[[K], str],
) -> None:
    """Write many records at once: ``call(node, keys)`` once per node, with the keys it owns
    (``owners``: key -> its owners), all nodes in parallel. Raises unless every key's write
    reached ``quorum`` of its owners; the error names the first key short of it (``what``)
    and every failed node."""
    keys_of: dict[NodeClient, list[K]] = {}
    for key, nodes in owners.items():
        for node in nodes:
            keys_of.setdefault(node, []).append(key)
    replies = call_each(pool, {node: partial(call, node, keys) for node, keys in keys_of.items()})
    for key, nodes in owners.items():
        answered = sum(node.id in replies.ok for node in nodes)
        if answered < quorum:
            raise _short_of_quorum(what(key), answered, replies, len(nodes), quorum)


def remove_all(
    pool: Executor,
    owners: Sequence[NodeClient],
    call: Callable[[NodeClient], object],
    quorum: int,
    what: str,
) -> None:
    """Run the removal ``call(node)`` on every owner, where NOT_FOUND means already gone there.

    Raises NotFound (the node's message) if the record was on no owner that answered, or an
    error naming the failed nodes if fewer than ``quorum`` owners answered at all.
    """
    replies = call_each(
        pool, {node: partial(call, node) for node in owners}, lambda r: _done(r) >= quorum
    )
    absent = [f for f in replies.failed if f.code == grpc.StatusCode.NOT_FOUND]
    if _done(replies) < quorum:
        raise _short_of_quorum(what, _done(replies), replies, len(owners), quorum)
    if not replies.ok:
        raise to_error(what, absent)


def first_answer(
    pool: Executor,
    owners: Sequence[NodeClient],
    call: Callable[[NodeClient], T],
    what: str,
    hedge: float,
) -> T:
    """``call(node)`` of the first owner that answers, healthy owners first.

    NOT_FOUND or a failure moves on to the next owner at once; an owner that has not answered
    within ``hedge`` seconds gets company: the next owner is asked too, and the first answer
    wins; the slow owner is marked slow (its call finishes in the background, within its
    deadline). So a hung owner costs about ``hedge``, not a deadline. When none answers, the
    error names each: NotFound if every owner lacks the record, else StoreUnavailable.
    """
    waiting = iter(sorted(owners, key=lambda n: not n.healthy))
    running: dict[Future, NodeClient] = {}
    failures: list[NodeCallError] = []

    def ask_next() -> None:
        node = next(waiting, None)
        if node is not None:
            running[pool.submit(node.run, partial(call, node))] = node

    start = time.monotonic()
    ask_next()
    while running:
        done, _ = wait(running, timeout=hedge, return_when=FIRST_COMPLETED)
        if not done:
            ask_next()
        for future in done:
            del running[future]
            try:
                answer = future.result()
            except NodeCallError as failure:
                failures.append(failure)
                ask_next()
                continue
            for slow in running.values():  # later calls try the one that answered first
                slow.mark_slow(time.monotonic() - start)
            return answer
    raise to_error(what, failures)


def _done(replies: Replies) -> int:
    """How many owners answered a removal: done, or NOT_FOUND (nothing to remove there)."""
    return len(replies.ok) + sum(f.code == grpc.StatusCode.NOT_FOUND for f in replies.failed)
