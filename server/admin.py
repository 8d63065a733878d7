"""Membership and repair, as operators run them: ``chunkstore cluster add-node``,
``remove-node`` and ``repair``. Each takes ``--store grpc://HOST:PORT,...`` (or
``$CHUNKSTORE_STORE``) and ``--token`` like every other command.

``add-node`` and ``remove-node`` build the next map (epoch + 1) from the newest one the nodes
serve and publish it to every node of the old and the new map (``PublishMap``); a node that
misses it learns it from its peers within seconds. The data then moves in the background
(:mod:`.reconciler`); ``chunkstore cluster status`` shows when it is done.

``repair`` makes every node run a reconciler pass now and waits for all of them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chunkstore.client.cluster_store import TLS_SCHEME, parse_url
from chunkstore.client.help_format import HelpFormatter
from chunkstore.client.rpc import (
    REFUSED,
    Credentials,
    NodeCallError,
    NodeClient,
    RpcPolicy,
    at_address,
    connect_hint,
    to_error,
)
from chunkstore.cluster_map import (
    ClusterMap,
    ClusterMapError,
    NodeSpec,
    map_from_proto,
    map_to_proto,
    newer,
)
from chunkstore.connect import ENV_STORE, normal_scheme
from chunkstore.errors import ChunkstoreError, InvalidInput, StoreUnavailable
from chunkstore.jsonout import emit_json
from chunkstore.progress import human_bytes
from chunkstore.v1 import store_pb2 as pb

DEFAULT_REPAIR_TIMEOUT = 3600.0


def seconds(text: str) -> float:
    """A timeout in seconds, for argparse: a number > 0 (with 0 every call would time out)."""
    value = _number(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"want a number of seconds > 0, got {text!r}")
    return value


def seconds_or_0(text: str) -> float:
    """A wait in seconds, for argparse: a number >= 0 (0: do not wait)."""
    value = _number(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"want a number of seconds >= 0, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _connection_args(p: argparse.ArgumentParser, timeout: float, what: str) -> None:
    p.add_argument(
        "--store",
        metavar="URL",
        help="grpc://HOST:PORT,... of any nodes (default: $CHUNKSTORE_STORE)",
    )
    p.add_argument("--token", help="an admin token, if the nodes require tokens")
    p.add_argument(
        "--timeout",
        type=seconds,
        default=timeout,
        metavar="SECONDS",
        help=f"{what} (default {timeout:g})",
    )


def add_admin_parsers(sub: Any) -> None:
    """Add ``add-node``, ``remove-node`` and ``repair`` to the ``cluster`` subparsers."""
    add = sub.add_parser(
        "add-node",
        help="add a node to a cluster's map; data moves to it in the background",
        description=(
            "Publish a map with node ID at ADDRESS added (epoch + 1) to every node. "
            "Start the node first (chunkstore node --id ID --listen ADDRESS --data DIR --join "
            "grpc://SEED); it owns nothing until this publishes the map. A node that does not "
            "answer the health check at ADDRESS is refused unless --force. Needs an admin token "
            "if the nodes require tokens."
        ),
        epilog="example:\n  chunkstore cluster add-node n4 10.0.0.4:7400 --store grpc://10.0.0.1:7400",
        formatter_class=HelpFormatter,
    )
    add.add_argument("node_id", metavar="ID", help="the new node's id (its --id)")
    add.add_argument("address", metavar="ADDRESS", help="HOST:PORT the node serves on")
    add.add_argument(
        "--weight",
        type=float,
        default=1.0,
        metavar="W",
        help="relative share of the data (default 1)",
    )
    add.add_argument(
        "--force",
        action="store_true",
        help="add the node even if nothing answers at ADDRESS (by default it must serve)",
    )
    _connection_args(add, 10.0, "per-node timeout")
    add.add_argument("--json", action="store_true", help="print machine-readable JSON")

    remove = sub.add_parser(
        "remove-node",
        help="remove a node from a cluster's map; its data moves to the others",
        description=(
            "Publish a map without node ID (epoch + 1) to every node, the removed one "
            "included. Keep the node running while it hands its data over, until "
            "'chunkstore cluster status' lists it as 'drained: may stop'; then stop it."
        ),
        epilog="example:\n  chunkstore cluster remove-node n2 --store grpc://10.0.0.1:7400",
        formatter_class=HelpFormatter,
    )
    remove.add_argument("node_id", metavar="ID", help="the id of the node to take out")
    _connection_args(remove, 10.0, "per-node timeout")
    remove.add_argument("--json", action="store_true", help="print machine-readable JSON")

    repair = sub.add_parser(
        "repair",
        help="run a repair pass on every node now and wait for them",
        description=(
            "Every node copies the chunks, manifests, version records, tags and "
            "stages it is responsible for to the owners that lack them, and drops what it no "
            "longer owns once the owners hold it. Exit code 1 if a node did not answer, keys "
            "remain below their replica count, or peers refused a node's calls (give every node "
            "an admin token to call its peers with: chunkstore node --peer-token-file); 6 if no "
            "node can be reached at all."
        ),
        epilog="example:\n  chunkstore cluster repair --store grpc://10.0.0.1:7400",
        formatter_class=HelpFormatter,
    )
    _connection_args(repair, DEFAULT_REPAIR_TIMEOUT, "how long to wait for the passes")
    repair.add_argument("--json", action="store_true", help="print machine-readable JSON")


def cluster_url(store: str | None, local: bool = False) -> str:
    """The URL of the cluster a command works on: ``store`` (its ``--store``), else
    ``$CHUNKSTORE_STORE``. InvalidInput, saying how to name one, if neither is a ``grpc://``
    or ``grpcs://`` URL; ``local``: the command also takes ``--dir DIR``."""
    how = "--store grpc://HOST:PORT[,...]" + (" or --dir DIR" if local else "")
    url = store or os.environ.get(ENV_STORE)
    if not url:
        pass_one = f"pass {how}," if local else f"pass {how}"
        raise InvalidInput(f"no cluster given: {pass_one} or set ${ENV_STORE}")
    url = normal_scheme(url)
    if not url.startswith(("grpc://", "grpcs://")):
        source = repr(url) if store else f"${ENV_STORE} ({url!r})"
        raise InvalidInput(f"{source} is not a cluster: give {how}")
    return url


def _policy(args: argparse.Namespace) -> tuple[str, RpcPolicy]:
    url = cluster_url(args.store)
    credentials = Credentials.from_env(tls=url.startswith(TLS_SCHEME), token=args.token)
    return url, RpcPolicy(credentials=credentials, timeout=args.timeout, attempts=2)


def _ask(client: NodeClient, call: Callable[[NodeClient], Any]) -> Any:
    return client.run(lambda: call(client))


def newest_map(url: str, policy: RpcPolicy, follow: bool = True) -> ClusterMap:
    """The newest map served by the seeds of ``url`` or (with ``follow``) by the nodes of the
    newest of those. StoreUnavailable naming each seed and why if none serves one
    (PermissionDenied if they refuse the caller)."""
    failures: list[NodeCallError] = []
    invalid: list[str] = []
    asked: set[str] = set()

    def ask(address: str) -> ClusterMap | NodeCallError | str:
        """The map served at ``address``, or why there is none."""
        client = NodeClient(NodeSpec("seed", address), replace(policy, attempts=1))
        try:
            timeout = policy.timeout
            reply = _ask(client, lambda c: c.cluster.GetClusterMap(pb.Empty(), timeout=timeout))
            return map_from_proto(reply)
        except NodeCallError as e:
            return e
        except ClusterMapError as e:
            return f"{address}: serves an invalid cluster map: {e}"
        finally:
            client.close()

    best: ClusterMap | None = None
    addresses = parse_url(url)
    for _ in range(2 if follow else 1):  # the seeds, then the nodes of the newest map they serve
        addresses = [a for a in dict.fromkeys(addresses) if a not in asked]
        if not addresses:
            break
        asked.update(addresses)
        with ThreadPoolExecutor(min(32, len(addresses))) as pool:
            for theirs in pool.map(ask, addresses):  # in the order given, whoever answers first
                if isinstance(theirs, NodeCallError):
                    failures.append(theirs)
                elif isinstance(theirs, str):
                    invalid.append(theirs)
                elif newer(theirs, best):
                    best = theirs
        if best is None:
            break
        addresses = [n.address for n in best.nodes]
    if best is None:
        # the kind of error the failures make (PermissionDenied for a refused token...)
        kind = type(to_error("", failures)) if failures else StoreUnavailable
        reasons = "; ".join([*map(at_address, failures), *invalid])
        hint = connect_hint(policy.credentials, failures)
        raise kind(f"no node of {url} serves a cluster map: {reasons}{hint}")
    return best


@dataclass
class Published:
    """How each node took a published map."""

    cluster: ClusterMap
    accepted: list[str]
    refused: dict[str, int]  # node id -> its (newer) epoch
    failed: dict[str, NodeCallError]  # node id -> why


def publish(cluster: ClusterMap, targets: list[NodeSpec], policy: RpcPolicy) -> Published:
    """Offer ``cluster`` to every node of ``targets`` in parallel."""
    request = map_to_proto(cluster)
    result = Published(cluster, [], {}, {})

    def offer(spec: NodeSpec) -> None:
        client = NodeClient(spec, policy)
        try:
            reply = _ask(client, lambda c: c.cluster.PublishMap(request, timeout=policy.timeout))
        except NodeCallError as e:
            result.failed[spec.id] = e
            return
        finally:
            client.close()
        if reply.accepted:
            result.accepted.append(spec.id)
        else:
            result.refused[spec.id] = reply.epoch

    with ThreadPoolExecutor(max(1, min(32, len(targets)))) as pool:
        list(pool.map(offer, targets))
    return result


def change_membership(
    url: str,
    policy: RpcPolicy,
    change: Callable[[ClusterMap], ClusterMap],
    check: Callable[[ClusterMap], None] | None = None,
) -> Published:
    """Publish ``change(newest map)`` to the nodes of both maps; ``check``, if given, sees the
    new map first and may refuse it by raising."""
    current = newest_map(url, policy)
    following = change(current)
    if check is not None:
        check(following)
    targets = {n.id: n for n in current.nodes}
    targets.update((n.id, n) for n in following.nodes)
    return publish(following, list(targets.values()), policy)


def with_node(cluster: ClusterMap, node: NodeSpec) -> ClusterMap:
    """``cluster`` with one more node, one epoch later."""
    if any(n.id == node.id for n in cluster.nodes):
        raise InvalidInput(f"node {node.id!r} is already in the map (epoch {cluster.epoch})")
    try:
        return ClusterMap(
            cluster.epoch + 1, cluster.replicas, cluster.write_quorum, (*cluster.nodes, node)
        )
    except ClusterMapError as e:
        raise InvalidInput(f"cannot add node {node.id!r}: {e}") from None


def without_node(cluster: ClusterMap, node_id: str) -> ClusterMap:
    """``cluster`` without one node, one epoch later."""
    if not any(n.id == node_id for n in cluster.nodes):
        ids = ", ".join(n.id for n in cluster.nodes)
        raise InvalidInput(f"no node {node_id!r} in the map (nodes: {ids})")
    rest = tuple(n for n in cluster.nodes if n.id != node_id)
    if not rest:
        raise InvalidInput(f"cannot remove node {node_id!r}: it is the only node")
    if len(rest) < cluster.replicas:
        raise InvalidInput(
            f"cannot remove node {node_id!r}: a map needs at least as many nodes as replicas "
            f"({cluster.replicas}), and {len(rest)} would be left"
        )
    try:
        return ClusterMap(cluster.epoch + 1, cluster.replicas, cluster.write_quorum, rest)
    except ClusterMapError as e:
        raise InvalidInput(f"cannot remove node {node_id!r}: {e}") from None


_DONE = {"add": "added", "remove": "removed"}


def _report_published(done: Published, action: str, node_id: str, as_json: bool) -> int:
    """Print how the nodes took the map published to ``action`` (add, remove) ``node_id``,
    as JSON if ``as_json`` (warnings stay on stderr); raise if none took it: PermissionDenied
    if nodes refused the token."""
    cluster = done.cluster
    total = len(done.accepted) + len(done.refused) + len(done.failed)
    denied = [f for f in done.failed.values() if f.code in REFUSED]
    if denied and not done.accepted:
        raise to_error(f"cannot {action} {node_id}: membership changes need an admin token", denied)
    for failed_id, why in sorted(done.failed.items()):
        after = (
            "it refuses this token"
            if why.code in REFUSED
            else "it learns it from its peers once it is back"
        )
        print(
            f"chunkstore cluster {action}-node: warning: node {failed_id} did not take the map "
            f"({why.code.name.lower()}: {why.detail}); {after}",
            file=sys.stderr,
        )
    if done.refused:
        nodes = ", ".join(f"{n} (epoch {e})" for n, e in sorted(done.refused.items()))
        raise ChunkstoreError(
            f"cannot {action} {node_id}: nodes hold a newer map: {nodes}; the membership "
            "changed meanwhile, check 'chunkstore cluster status' and try again"
        )
    if not done.accepted:
        raise StoreUnavailable(f"cannot {action} {node_id}: no node took the map")
    if as_json:
        emit_json(
            {
                _DONE[action]: node_id,
                "epoch": cluster.epoch,
                "nodes": [n.id for n in cluster.nodes],
                "accepted": sorted(done.accepted),
                "failed": {
                    n: f"{why.code.name.lower()}: {why.detail}"
                    for n, why in sorted(done.failed.items())
                },
            },
            sys.stdout,
        )
        return 0
    print(
        f"{_DONE[action]} {node_id}: cluster map epoch "
        f"{cluster.epoch} ({', '.join(n.id for n in cluster.nodes)}) taken by "
        f"{len(done.accepted)} of {total} nodes; data moves in the background, see "
        "'chunkstore cluster status'"
    )
    return 0


def check_serving(node_id: str, address: str, policy: RpcPolicy, seed: str) -> None:
    """Raise StoreUnavailable unless the node at ``address`` answers SERVING on the gRPC
    health check (which needs no token), saying how to start it."""
    credentials = policy.credentials or Credentials()
    why = ""
    with credentials.channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=min(policy.timeout, 5.0)
            )
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            why = f"it answers {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        except grpc.RpcError as e:
            why = f"{e.code().name.lower()}: {e.details()}"
    raise StoreUnavailable(
        f"cannot add {node_id}: no node serves at {address} ({why}); start it first "
        f"(chunkstore node --id {node_id} --listen {address} --data DIR --join {seed}), "
        "or pass --force to add it anyway"
    )


def run_add_node(args: argparse.Namespace) -> int:
    try:  # bad input is refused before any node is asked
        node = NodeSpec(args.node_id, args.address, args.weight)
    except ClusterMapError as e:
        raise InvalidInput(f"cannot add a node: {e}") from None
    url, policy = _policy(args)

    def check(_: ClusterMap) -> None:
        if not args.force:
            check_serving(args.node_id, args.address, policy, url)

    done = change_membership(url, policy, lambda m: with_node(m, node), check)
    return _report_published(done, "add", args.node_id, args.json)


def run_remove_node(args: argparse.Namespace) -> int:
    url, policy = _policy(args)
    done = change_membership(url, policy, lambda m: without_node(m, args.node_id))
    return _report_published(done, "remove", args.node_id, args.json)


#: The fields of a node's repair report, as :func:`repair` gives them.
_REPORT_FIELDS = tuple(f.name for f in pb.ReconcileReport.DESCRIPTOR.fields)


def repair(url: str, policy: RpcPolicy, timeout: float) -> dict[str, Any]:
    """Run a reconciler pass on every node of the newest map: ``{"epoch", "nodes",
    "failed"}``, the reports by node and, as ``add-node`` gives them, the nodes that did not
    answer (``{node id: why}``).

    Every node has the same keys: ``id``, ``ok``, ``error`` and the fields of its report
    (None for a node that did not answer, ``peers_refused`` empty). ``under_replicated`` is
    None for a node whose peers refused its calls: what they hold is unknown."""
    cluster = newest_map(url, policy)
    one_try = replace(policy, attempts=1)

    def run(spec: NodeSpec) -> dict[str, Any]:
        client = NodeClient(spec, one_try)
        try:
            reply = _ask(client, lambda c: c.cluster.Reconcile(pb.Empty(), timeout=timeout))
        except NodeCallError as e:
            return {
                "id": spec.id,
                "ok": False,
                "error": f"{e.code.name.lower()}: {e.detail}",
                **dict.fromkeys(_REPORT_FIELDS),
                "peers_refused": [],
            }
        finally:
            client.close()
        report = {name: getattr(reply, name) for name in _REPORT_FIELDS}
        report["peers_refused"] = list(reply.peers_refused)
        if reply.peers_refused:
            report["under_replicated"] = None
        return {"id": spec.id, "ok": True, "error": None, **report}

    with ThreadPoolExecutor(max(1, min(32, len(cluster.nodes)))) as pool:
        nodes = list(pool.map(run, cluster.nodes))
    failed = {n["id"]: n["error"] for n in sorted(nodes, key=lambda n: n["id"]) if not n["ok"]}
    return {"epoch": cluster.epoch, "nodes": nodes, "failed": failed}


def run_repair(args: argparse.Namespace) -> int:
    url, policy = _policy(args)
    result = repair(url, replace(policy, timeout=min(args.timeout, 10.0)), args.timeout)
    nodes = result["nodes"]
    if args.json:
        emit_json(result, sys.stdout)
    else:
        for n in nodes:
            if not n["ok"]:
                print(f"{n['id']}: failed: {n['error']}")
                continue
            if n["peers_refused"]:
                print(
                    f"{n['id']}: peer authentication failed: {', '.join(n['peers_refused'])} "
                    "refused its calls, so what they hold is unknown (give every node an admin "
                    "token to call its peers with: chunkstore node --peer-token-file)"
                )
                continue
            print(
                f"{n['id']}: copied {n['chunks_copied']} chunks ({human_bytes(n['bytes_copied'])})"
                f" and {n['records_copied']} records, dropped {n['chunks_dropped']} chunks and "
                f"{n['records_dropped']} records, found {n['under_replicated_found']} keys below "
                f"replica count, {n['under_replicated']} left, {n['misplaced']} misplaced "
                f"({n['seconds']:.1f} s)"
            )
    failed = [n["id"] for n in nodes if not n["ok"]]
    refused = [n["id"] for n in nodes if n["ok"] and n["peers_refused"]]
    short = sum(n["under_replicated"] for n in nodes if n["ok"] and not n["peers_refused"])
    if failed or refused or short:
        why = []
        if failed:
            why.append(f"nodes {', '.join(failed)} did not finish a pass")
        if refused:
            why.append(f"peer authentication failed on {', '.join(refused)}")
        if short:
            why.append(f"{short} keys remain below their replica count")
        print(f"chunkstore cluster repair: {'; '.join(why)}", file=sys.stderr)
        return 1
    return 0


ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "add-node": run_add_node,
    "remove-node": run_remove_node,
    "repair": run_repair,
}
