"""A node's background work and how it starts: the map it starts with (``--cluster``,
``--join``, the map persisted in its data directory), and the threads that keep the cluster
whole: map refresh from peers, the reconciler (:mod:`.reconciler`) and the scrubber
(:mod:`.scrubber`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from chunkstore.client.rpc import RpcPolicy
from chunkstore.cluster_map import ClusterMap, load_cluster_file
from chunkstore.errors import InvalidInput
from chunkstore.stores.lmdb_store import LmdbStore

from . import reconciler, scrubber
from .background import StateFile, parse_rate
from .membership import (
    DEFAULT_MAP_REFRESH,
    MapHolder,
    Peers,
    load_persisted,
    own_address,
    startup_map,
)
from .metrics import NodeMetrics


@dataclass(frozen=True)
class MaintenanceOptions:
    """Options of a node's background work (``chunkstore node --help`` explains each)."""

    join: str | None = None
    reconcile_interval: float = reconciler.DEFAULT_INTERVAL
    repair_rate: float = reconciler.DEFAULT_RATE
    scrub_rate: float = scrubber.DEFAULT_RATE
    scrub_interval: float = scrubber.DEFAULT_INTERVAL
    map_refresh: float = DEFAULT_MAP_REFRESH


def _rate(text: str) -> float:
    try:
        return parse_rate(text)
    except InvalidInput as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _mib(rate: float) -> str:
    return f"{rate / (1 << 20):g}M"


def add_maintenance_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``chunkstore node`` for membership, repair and scrub."""
    d = MaintenanceOptions()
    parser.add_argument(
        "--join",
        metavar="grpc://SEED",
        help="start without a cluster file: fetch the map from these nodes; the node owns "
        "nothing until 'chunkstore cluster add-node' puts it in the map (needs --listen)",
    )
    parser.add_argument(
        "--reconcile-interval",
        type=float,
        default=d.reconcile_interval,
        metavar="SECONDS",
        help="run a repair/rebalance pass this often, besides at start and on map changes "
        f"(default {d.reconcile_interval:g})",
    )
    parser.add_argument(
        "--repair-rate",
        type=_rate,
        default=d.repair_rate,
        metavar="BYTES/S",
        help=f"most chunk bytes per second repair and rebalancing send, e.g. 64M; 0 for no "
        f"limit (default {_mib(d.repair_rate)})",
    )
    parser.add_argument(
        "--scrub-rate",
        type=_rate,
        default=d.scrub_rate,
        metavar="BYTES/S",
        help="most bytes per second the scrubber re-verifies; 0 turns scrubbing off "
        f"(default {_mib(d.scrub_rate)})",
    )
    parser.add_argument(
        "--scrub-interval",
        type=float,
        default=d.scrub_interval,
        metavar="SECONDS",
        help="pause between the end of one scrub of every chunk and the start of the next "
        f"(default {d.scrub_interval:g})",
    )
    parser.add_argument(
        "--map-refresh",
        type=float,
        default=d.map_refresh,
        metavar="SECONDS",
        help=f"ask peers for a newer cluster map this often (default {d.map_refresh:g})",
    )


def options_from_args(args: argparse.Namespace) -> MaintenanceOptions:
    for name in ("reconcile_interval", "scrub_interval", "map_refresh"):
        if getattr(args, name) <= 0:
            raise InvalidInput(f"--{name.replace('_', '-')} must be > 0")
    return MaintenanceOptions(
        join=args.join,
        reconcile_interval=args.reconcile_interval,
        repair_rate=args.repair_rate,
        scrub_rate=args.scrub_rate,
        scrub_interval=args.scrub_interval,
        map_refresh=args.map_refresh,
    )


def startup(
    node_id: str,
    cluster_file: str | Path | None,
    data_dir: str | Path,
    listen: str | None,
    options: MaintenanceOptions,
    policy: RpcPolicy,
) -> tuple[ClusterMap, str]:
    """The map node ``node_id`` starts with and the address it listens on.

    Raises InvalidInput when there is no map or no address (a node not in any map it has
    needs ``--listen``); see :func:`~.membership.startup_map`."""
    cluster = startup_map(node_id, data_dir, cluster_file, options.join, policy)
    if listen is not None:
        return cluster, listen
    file_map = load_cluster_file(cluster_file) if cluster_file is not None else None
    address = own_address(node_id, (cluster, load_persisted(data_dir), file_map))
    if address is None:
        raise InvalidInput(f"node {node_id!r} is not in the cluster map: give --listen HOST:PORT")
    return cluster, address


class Maintenance:
    """The background threads of node ``node_id``: map refresh, reconciler, scrubber."""

    def __init__(
        self,
        node_id: str,
        store: LmdbStore,
        holder: MapHolder,
        metrics: NodeMetrics,
        peer_policy: RpcPolicy,
        options: MaintenanceOptions,
    ) -> None:
        self.options = options
        self.holder = holder
        self.peers = Peers(node_id, peer_policy)  # the reconciler's and the scrubber's
        self.map_peers = Peers(node_id, peer_policy)  # the map refresh's, healthy on their own
        state = StateFile(store.path)
        self.reconciler = reconciler.Reconciler(
            node_id,
            store,
            holder,
            self.peers,
            metrics,
            interval=options.reconcile_interval,
            rate=options.repair_rate,
            state=state,
        )
        self.scrubber = (
            scrubber.Scrubber(
                node_id,
                store,
                holder,
                self.peers,
                metrics,
                rate=options.scrub_rate,
                interval=options.scrub_interval,
                state=state,
            )
            if options.scrub_rate > 0
            else None
        )

    def start(self) -> None:
        self.holder.start_refresh(self.map_peers, self.options.map_refresh)
        self.reconciler.start()
        if self.scrubber is not None:
            self.scrubber.start()

    def stop(self) -> None:
        self.holder.stop()
        self.reconciler.stop()
        if self.scrubber is not None:
            self.scrubber.stop()
        self.peers.close()
        self.map_peers.close()
