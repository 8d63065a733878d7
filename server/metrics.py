"""A storage node's Prometheus metrics, in a registry of their own.

Names start with ``chunkstore_``, use base units (bytes, seconds) and end in ``_total`` for
counters. No label ever holds a chunk id: label values come from small fixed sets (RPC names,
status codes, rejection reasons).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chunkstore.stores.lmdb_store import LmdbStore

# Unary calls take milliseconds; a stream of chunk batches may take a minute.
_RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

#: Why PutChunks refused chunks (values of the ``reason`` label).
REJECT_REASONS = ("bad_id", "too_large", "corrupt", "store_full")
#: Kinds of metadata records the reconciler copies and drops (values of the ``kind`` label).
RECORD_KINDS = ("manifest", "version", "tag", "stage", "stage_file")


class _StoreCollector(Collector):
    """Reads the store's totals and LMDB map usage at each scrape."""

    def __init__(self, store: LmdbStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        totals = self._store.totals()
        used, size = self._store.map_usage()
        yield GaugeMetricFamily("chunkstore_stored_chunks", "Chunks stored", totals.chunks)
        yield GaugeMetricFamily(
            "chunkstore_stored_bytes", "Encoded bytes of the chunks stored", totals.stored_bytes
        )
        yield GaugeMetricFamily("chunkstore_lmdb_map_used_bytes", "LMDB map bytes in use", used)
        yield GaugeMetricFamily("chunkstore_lmdb_map_size_bytes", "LMDB map size in bytes", size)


class NodeMetrics:
    """Counters and histograms the node's services update, plus gauges read from the store."""

    def __init__(self, store: LmdbStore) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.chunks_received = Counter(
            "chunkstore_chunks_received_total",
            "Chunks received by PutChunks that passed verification",
            registry=r,
        )
        self.received_bytes = Counter(
            "chunkstore_received_bytes_total",
            "Blob bytes of the chunks received by PutChunks that passed verification",
            registry=r,
        )
        self.added_bytes = Counter(
            "chunkstore_added_bytes_total",
            "Blob bytes newly stored (received minus those of chunks already stored)",
            registry=r,
        )
        self.chunks_deduplicated = Counter(
            "chunkstore_chunks_deduplicated_total",
            "Chunk ids a push found already stored (Missing, MarkWanted), so it need not send them",
            registry=r,
        )
        self.chunks_rejected = Counter(
            "chunkstore_chunks_rejected_total",
            "Chunks PutChunks refused: each chunk that failed verification (bad_id, too_large, "
            "corrupt), or every chunk of a batch the full store could not take (store_full)",
            ["reason"],
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.chunks_rejected.labels(reason)
        self.chunks_served = Counter(
            "chunkstore_chunks_served_total", "Chunks sent by GetChunks", registry=r
        )
        self.served_bytes = Counter(
            "chunkstore_served_bytes_total", "Blob bytes sent by GetChunks", registry=r
        )
        self.chunks_deleted = Counter(
            "chunkstore_chunks_deleted_total", "Chunks removed by DeleteChunks", registry=r
        )
        self._rpc_seconds = Histogram(
            "chunkstore_rpc_duration_seconds",
            "Time from the start of an RPC to its end (the whole stream for streaming RPCs)",
            ["service", "method"],
            buckets=_RPC_BUCKETS,
            registry=r,
        )
        self._rpcs = Counter(
            "chunkstore_rpcs_total",
            "RPCs finished, by status code",
            ["service", "method", "code"],
            registry=r,
        )
        self._reconciler_metrics(r)
        self._scrub_metrics(r)
        r.register(_StoreCollector(store))

    def _reconciler_metrics(self, r: CollectorRegistry) -> None:
        """What the reconciler (repair and rebalancing) does: see :mod:`.reconciler`."""
        self.cluster_epoch = Gauge(
            "chunkstore_cluster_epoch", "Epoch of the cluster map this node uses", registry=r
        )
        self.reconcile_chunks_copied = Counter(
            "chunkstore_reconcile_chunks_copied_total",
            "Chunks the reconciler sent to owners that lacked them (repair and rebalancing)",
            registry=r,
        )
        self.reconcile_bytes_copied = Counter(
            "chunkstore_reconcile_bytes_copied_total",
            "Blob bytes of the chunks the reconciler sent",
            registry=r,
        )
        self.reconcile_chunks_dropped = Counter(
            "chunkstore_reconcile_chunks_dropped_total",
            "Chunks removed from this node, which no longer owns them, once every owner held them",
            registry=r,
        )
        self.reconcile_records_copied = Counter(
            "chunkstore_reconcile_records_copied_total",
            "Metadata records the reconciler sent to owners that lacked them",
            ["kind"],
            registry=r,
        )
        self.reconcile_records_dropped = Counter(
            "chunkstore_reconcile_records_dropped_total",
            "Metadata records removed from this node once every owner held them",
            ["kind"],
            registry=r,
        )
        for kind in RECORD_KINDS:
            self.reconcile_records_copied.labels(kind)
            self.reconcile_records_dropped.labels(kind)
        self.reconcile_under_replicated_found = Counter(
            "chunkstore_reconcile_under_replicated_found_total",
            "Keys (chunks and records) a pass found below their replica count, before repairing",
            registry=r,
        )
        self.reconcile_ranges_skipped = Counter(
            "chunkstore_reconcile_ranges_skipped_total",
            "Key ranges a digest showed in sync with a peer, so their ids were not compared",
            registry=r,
        )
        self.reconcile_passes = Counter(
            "chunkstore_reconcile_passes_total",
            "Reconciler passes ended: complete, or aborted (the map changed, or the node stopped)",
            ["result"],
            registry=r,
        )
        for result in ("complete", "aborted"):
            self.reconcile_passes.labels(result)
        self.chunks_under_replicated = Gauge(
            "chunkstore_chunks_under_replicated",
            "Chunks this node is responsible for that the last pass left below their replica "
            "count (an owner down or failing)",
            registry=r,
        )
        self.records_under_replicated = Gauge(
            "chunkstore_records_under_replicated",
            "Metadata records the last pass left below their replica count",
            registry=r,
        )
        self.keys_misplaced = Gauge(
            "chunkstore_keys_misplaced",
            "Chunks and records the last pass left on this node though it does not own them",
            registry=r,
        )
        self.reconcile_progress = Gauge(
            "chunkstore_reconcile_pass_progress",
            "Fraction of the key space the running pass has covered (1 when idle)",
            registry=r,
        )
        self.reconcile_last_pass = Gauge(
            "chunkstore_reconcile_last_pass_timestamp_seconds",
            "Unix time the last complete pass ended",
            registry=r,
        )

    def _scrub_metrics(self, r: CollectorRegistry) -> None:
        """What the scrubber does: see :mod:`.scrubber`."""
        self.scrub_chunks = Counter(
            "chunkstore_scrub_chunks_total", "Stored chunks re-verified by the scrubber", registry=r
        )
        self.scrub_bytes = Counter(
            "chunkstore_scrub_bytes_total", "Blob bytes re-verified by the scrubber", registry=r
        )
        self.scrub_errors = Counter(
            "chunkstore_scrub_errors_total",
            "Stored chunks the scrubber found corrupt (undecodable, or not matching their id)",
            registry=r,
        )
        self.scrub_repaired = Counter(
            "chunkstore_scrub_repaired_total",
            "Corrupt chunks the scrubber replaced with a verified copy from another node",
            registry=r,
        )
        self.scrub_records = Counter(
            "chunkstore_scrub_records_total",
            "Stored records (kind: manifest, version) re-verified by the scrubber",
            ["kind"],
            registry=r,
        )
        self.scrub_record_errors = Counter(
            "chunkstore_scrub_record_errors_total",
            "Stored records the scrubber found damaged (not matching their id)",
            ["kind"],
            registry=r,
        )
        self.scrub_records_repaired = Counter(
            "chunkstore_scrub_records_repaired_total",
            "Damaged records the scrubber replaced with an intact copy from another node",
            ["kind"],
            registry=r,
        )
        for kind in ("manifest", "version"):  # series from the start: increase() sees a rise
            for counter in (
                self.scrub_records,
                self.scrub_record_errors,
                self.scrub_records_repaired,
            ):
                counter.labels(kind)
        self.scrub_last_sweep = Gauge(
            "chunkstore_scrub_last_sweep_timestamp_seconds",
            "Unix time the scrubber last finished verifying every stored chunk",
            registry=r,
        )

    def observe_rpc(self, service: str, method: str, code: str, seconds: float) -> None:
        """Record one finished RPC (``code`` is a gRPC status code name, e.g. ``"OK"``)."""
        self._rpc_seconds.labels(service, method).observe(seconds)
        self._rpcs.labels(service, method, code).inc()

    def serve(self, port: int, host: str = "0.0.0.0") -> MetricsServer:
        """Serve ``/metrics`` over HTTP on ``host:port`` (port 0: any free port) in a thread.

        Raises OSError if the port cannot be bound.
        """
        return MetricsServer(*start_http_server(port, addr=host, registry=self.registry))


class MetricsServer:
    """A running metrics HTTP server."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return self._server.server_port

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
