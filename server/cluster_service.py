"""ClusterService: this node's cluster map (the newest it has seen), its status, map changes
published by operators, and reconciler passes on request."""

from __future__ import annotations

import grpc

from chunkstore import errors
from chunkstore.cluster_map import ClusterMap, map_from_proto, map_to_proto
from chunkstore.stores.lmdb_store import LmdbStore
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc

from .membership import MapHolder
from .reconciler import Reconciler


class ClusterServicer(pb_grpc.ClusterServiceServicer):
    """Answers for node ``node_id``, whose map is ``cluster`` (fixed) or held by a MapHolder,
    and whose shard is ``store``. Without a ``reconciler``, Reconcile is refused."""

    def __init__(
        self,
        node_id: str,
        cluster: ClusterMap | MapHolder,
        store: LmdbStore,
        reconciler: Reconciler | None = None,
    ) -> None:
        self._node_id = node_id
        self._holder = cluster if isinstance(cluster, MapHolder) else MapHolder(node_id, cluster)
        self._store = store
        self._reconciler = reconciler
        self._served: tuple[ClusterMap, pb.ClusterMap] | None = None

    def GetClusterMap(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.ClusterMap:
        cluster = self._holder.map
        served = self._served
        if served is None or served[0] is not cluster:
            served = self._served = (cluster, map_to_proto(cluster))
        return served[1]

    def GetNodeStatus(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.NodeStatus:
        totals = self._store.totals()
        used, size = self._store.map_usage()
        status = pb.NodeStatus(
            id=self._node_id,
            epoch=self._holder.epoch,
            chunks=totals.chunks,
            stored_bytes=totals.stored_bytes,
            map_used_bytes=used,
            map_size_bytes=size,
            data_dir=str(self._store.path),
            in_map=self._holder.in_map(),
            departed=[
                pb.NodeInfo(id=n.id, address=n.address, weight=n.weight)
                for n in self._holder.departed
            ],
        )
        if self._reconciler is not None:
            for name, value in self._reconciler.status().items():
                if isinstance(value, list):
                    getattr(status, name).extend(value)
                elif isinstance(value, dict):
                    getattr(status, name).update(value)
                else:
                    setattr(status, name, value)
        return status

    def PublishMap(
        self, request: pb.ClusterMap, context: grpc.ServicerContext
    ) -> pb.PublishMapReply:
        cluster = map_from_proto(request)  # ClusterMapError is InvalidInput
        peer = context.peer() if context is not None else ""
        accepted = self._holder.offer(cluster, f"PublishMap ({peer})")
        return pb.PublishMapReply(epoch=self._holder.epoch, accepted=accepted)

    def Reconcile(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.ReconcileReport:
        if self._reconciler is None:
            raise errors.StoreUnavailable(f"node {self._node_id} runs no reconciler")
        remaining = context.time_remaining() if context is not None else None
        timeout = None if remaining is None or remaining > 1e6 else max(0.0, remaining - 0.5)
        return self._reconciler.run_now(timeout).to_proto()
