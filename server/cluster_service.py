"""ClusterService: the cluster map this node was started with, and this node's status."""

from __future__ import annotations

import grpc

from chunkstore.cluster_map import ClusterMap, map_to_proto
from chunkstore.stores.lmdb_store import LmdbStore
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc


class ClusterServicer(pb_grpc.ClusterServiceServicer):
    """Answers for node ``node_id`` of ``cluster``, whose shard is ``store``."""

    def __init__(self, node_id: str, cluster: ClusterMap, store: LmdbStore) -> None:
        self._node_id = node_id
        self._cluster = cluster
        self._map = map_to_proto(cluster)
        self._store = store

    def GetClusterMap(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.ClusterMap:
        return self._map

    def GetNodeStatus(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.NodeStatus:
        totals = self._store.totals()
        used, size = self._store.map_usage()
        return pb.NodeStatus(
            id=self._node_id,
            epoch=self._cluster.epoch,
            chunks=totals.chunks,
            stored_bytes=totals.stored_bytes,
            map_used_bytes=used,
            map_size_bytes=size,
            data_dir=str(self._store.path),
        )
