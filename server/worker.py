"""The skeleton of a node's background loops (repair and rebalancing, scrub)."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

from chunkstore.stores.lmdb_store import LmdbStore

from .background import StateFile, TokenBucket
from .membership import MapHolder, Peers
from .metrics import NodeMetrics


class NodeWorker(ABC):
    """One background loop of node ``node_id`` over its ``store``: it sees the node's map and
    peers, counts in its metrics, moves at most ``rate`` bytes per second, keeps its place in
    ``state``, and runs on a daemon thread from :meth:`start` to :meth:`stop`."""

    thread_name = "node-worker"

    def __init__(
        self,
        node_id: str,
        store: LmdbStore,
        holder: MapHolder,
        peers: Peers,
        metrics: NodeMetrics,
        *,
        interval: float,
        rate: float,
        state: StateFile | None = None,
    ) -> None:
        self.node_id = node_id
        self._store = store
        self._holder = holder
        self._peers = peers
        self._metrics = metrics
        self.interval = interval
        self._state = state or StateFile(None)
        self._stop = threading.Event()
        self._bucket = TokenBucket(rate, self._stop)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the loop to end and wait for it (at most 10 s)."""
        self._stop.set()
        self._interrupt()
        if self._thread is not None:
            self._thread.join(10)

    def _interrupt(self) -> None:  # noqa: B027 - only loops that wait on more than _stop need it
        """Wake the loop if it waits on something other than the stop event."""

    @abstractmethod
    def _loop(self) -> None:
        """The loop; it returns soon after the stop event is set."""
