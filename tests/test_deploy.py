"""deploy/: the image, the compose file, the Kubernetes manifests and the Prometheus config agree
with each other and with the code they run.

Nothing here needs Docker or a Kubernetes cluster: every file is parsed, every node command is
parsed by the real CLI parser, every cluster file is loaded by the real loader, and the names,
ports and paths one file refers to are checked against the file that defines them. The health
check script runs against a real node. Where ``promtool`` or ``kubectl`` is installed, tests
that run them are generated too (and none is skipped where they are not).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import grpc
import pytest
import yaml
from cluster_fixtures import LocalCluster, free_port
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chunkstore.client.cli import build_parser
from chunkstore.cluster_map import ClusterMap, load_cluster_file
from chunkstore.server.metrics import REJECT_REASONS, NodeMetrics
from chunkstore.server.node import DEFAULT_GRACE
from chunkstore.stores.lmdb_store import LmdbStore
from chunkstore.v1 import store_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
HEALTHCHECK = DEPLOY / "healthcheck.py"
PROMETHEUS_DIR = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"

GRPC_PORT = 7400
METRICS_PORT = 9400
NAMESPACE = "chunkstore"
SCRAPE_JOB = "chunkstore"
SEVERITIES = {"critical", "warning"}
#: Metrics the alert rules may use before any node exports them (none at present: the
#: scrubber's and the reconciler's are exported now).
FUTURE_METRICS: set[str] = set()
#: The files under deploy/k8s/ that `kubectl apply -k` applies (monitoring/ needs the
#: Prometheus Operator's CRDs and is applied on its own).
K8S_RESOURCES = {
    "namespace.yaml",
    "configmap.yaml",
    "service.yaml",
    "statefulset.yaml",
    "poddisruptionbudget.yaml",
}


# ---------------------------------------------------------------------------------------------
# reading the files


@dataclass
class Dockerfile:
    """A Dockerfile as (INSTRUCTION, arguments) pairs per stage, continuation lines joined."""

    stages: list[list[tuple[str, str]]]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        stages: list[list[tuple[str, str]]] = []
        pending = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue  # also inside a continued instruction, as Docker reads it
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            name, _, rest = (pending + line).partition(" ")
            pending = ""
            if name.upper() == "FROM":
                stages.append([])
            stages[-1].append((name.upper(), rest.strip()))
        assert not pending, f"{path}: the last instruction ends in a continuation"
        return cls(stages)

    def all(self, name: str, stage: int = -1) -> list[str]:
        return [rest for ins, rest in self.stages[stage] if ins == name]

    def one(self, name: str, stage: int = -1) -> str:
        found = self.all(name, stage)
        assert len(found) == 1, f"want exactly one {name} in stage {stage}, got {found}"
        return found[0]

    def exec_form(self, name: str) -> list[str]:
        value = json.loads(self.one(name))
        assert isinstance(value, list), f"{name} must be in exec (JSON) form"
        return value

    def copies(self, stage: int) -> list[tuple[list[str], str, list[str]]]:
        """(sources, destination, flags) of each COPY of a stage."""
        result = []
        for rest in self.all("COPY", stage):
            words = shlex.split(rest)
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            result.append((paths[:-1], paths[-1], flags))
        return result

    def env(self) -> dict[str, str]:
        result = {}
        for rest in self.all("ENV"):
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                result[key] = value
        return result

    def healthcheck(self) -> list[str]:
        """The exec-form command of the final stage's HEALTHCHECK."""
        options, sep, command = self.one("HEALTHCHECK").partition("CMD ")
        assert sep, "HEALTHCHECK must run a command"
        assert all(o.startswith("--") for o in options.split())
        return json.loads(command)

    def copied_to(self, source: str) -> str:
        """Where the final stage copies ``source`` of the build context."""
        for sources, dest, flags in self.copies(-1):
            if source in sources and not any(f.startswith("--from") for f in flags):
                return dest
        raise AssertionError(f"the final stage copies no {source}")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cluster_from_text(text: str, tmp_path: Path, name: str = "cluster.toml") -> ClusterMap:
    """A cluster file's text loaded by the real loader (so it must be a valid cluster file)."""
    path = tmp_path / name
    path.write_text(text)
    return load_cluster_file(path)


def parse_node_command(argv: list[str]) -> argparse.Namespace:
    """``chunkstore ARGV`` as the real CLI parses it; it must be the node command."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"`chunkstore {shlex.join(argv)}` does not parse (see stderr)") from e
    assert args.command == "node", argv
    return args


def check_node_command(
    args: argparse.Namespace,
    cluster: ClusterMap,
    *,
    node_id: str,
    cluster_path: str,
    data_mount: str,
) -> None:
    """A node command that fits where it runs: its id in the map, its files where they are
    mounted, its ports those the container exposes."""
    assert args.node_id == node_id
    assert node_id in {n.id for n in cluster.nodes}, (node_id, cluster.nodes)
    assert args.cluster == cluster_path
    data = PurePosixPath(args.data)
    # A store below the volume's root: a fresh filesystem's lost+found would make the root a
    # non-empty directory without a store, which the node refuses to open.
    assert data.is_relative_to(data_mount) and data != PurePosixPath(data_mount), args.data
    host, _, port = args.listen.rpartition(":")
    assert host == "0.0.0.0", "listen on every interface, or probes and peers cannot reach it"
    assert int(port) == GRPC_PORT
    assert args.metrics_port == METRICS_PORT
    assert int(cluster.node(node_id).address.rpartition(":")[2]) == GRPC_PORT


def seconds(duration: str | int) -> float:
    """A compose duration such as ``30s``, ``1m30s`` or ``500ms``, in seconds."""
    if isinstance(duration, int):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.read(DOCKERFILE)


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    return load_module(HEALTHCHECK, "deploy_healthcheck")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def compose_nodes(compose) -> dict[str, argparse.Namespace]:
    """The compose services that run a node, with their parsed commands."""
    nodes = {
        name: parse_node_command([str(word) for word in service["command"]])
        for name, service in compose["services"].items()
        if service.get("command", [None])[0] == "node"
    }
    assert nodes, "compose.yaml runs no node"
    return nodes


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    return load_yaml(PROMETHEUS_DIR / "prometheus.yml")


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


@dataclass
class K8s:
    """The objects of deploy/k8s/, by kind (one of each, but for the ones asked by name)."""

    objects: list[tuple[Path, dict[str, Any]]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for _, obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"want one {kind} in deploy/k8s/, got {len(found)}"
        return found[0]

    @property
    def statefulset(self) -> dict[str, Any]:
        return self.one("StatefulSet")

    @property
    def pod(self) -> dict[str, Any]:
        return self.statefulset["spec"]["template"]

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod["spec"]["containers"]
        assert len(containers) == 1
        return containers[0]

    def container_port(self, name: str) -> int:
        ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        return ports[name]

    @property
    def service(self) -> dict[str, Any]:
        return self.one("Service")


@pytest.fixture(scope="module")
def k8s() -> K8s:
    paths = sorted(K8S.glob("*.yaml")) + sorted((K8S / "monitoring").glob("*.yaml"))
    objects = [
        (path, obj)
        for path in paths
        if path.name != "kustomization.yaml"
        for obj in load_yaml_all(path)
    ]
    return K8s(objects)


@pytest.fixture(scope="module")
def k8s_cluster(k8s, tmp_path_factory) -> ClusterMap:
    """The cluster file in the ConfigMap that the StatefulSet mounts, loaded."""
    volume = next(v for v in k8s.pod["spec"]["volumes"] if "configMap" in v)
    configmap = next(
        c for c in k8s.of_kind("ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"]
    )
    (item,) = volume["configMap"]["items"]
    return cluster_from_text(configmap["data"][item["key"]], tmp_path_factory.mktemp("k8s"))


# ---------------------------------------------------------------------------------------------
# every file parses


def test_every_deploy_file_parses():
    yaml_files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(yaml_files) >= 10
    for path in yaml_files:
        assert load_yaml_all(path), f"{path} is empty"
    toml_files = sorted(DEPLOY.rglob("*.toml"))
    assert {p.relative_to(DEPLOY).as_posix() for p in toml_files} == {
        "standalone.toml",
        "compose/cluster.toml",
    }
    for path in toml_files:  # every TOML file here is a cluster file
        tomllib.loads(path.read_text())
        load_cluster_file(path)
    compile(HEALTHCHECK.read_text(), str(HEALTHCHECK), "exec")


# ---------------------------------------------------------------------------------------------
# the image


def test_image_is_python_311_slim_and_runs_as_a_fixed_non_root_user(dockerfile, k8s):
    for stage in range(len(dockerfile.stages)):
        assert dockerfile.one("FROM", stage).split()[0] == "python:3.11-slim"
    user = dockerfile.one("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric uid lets Kubernetes check runAsNonRoot"
    run = " ".join(dockerfile.all("RUN"))
    assert re.search(rf"useradd .*--uid {uid}\b", run)
    assert re.search(rf"groupadd .*--gid {gid}\b", run)
    security = k8s.pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == int(uid)
    assert security["runAsGroup"] == security["fsGroup"] == int(gid)


def test_image_copies_exactly_what_pip_install_needs(dockerfile):
    build = 0
    copies = dockerfile.copies(build)
    sources = [source for srcs, _, _ in copies for source in srcs]
    assert sources == ["pyproject.toml", "README.md", "chunkstore/", "server/", "client/", "proto/"]
    for source in sources:
        assert (ROOT / source).exists(), source
    # Every package directory and the readme that pyproject.toml names is in the build.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = {
        d.split("/")[0] + "/" for d in project["tool"]["setuptools"]["package-dir"].values()
    }
    assert package_dirs <= set(sources)
    assert project["project"]["readme"] in sources
    assert any("pip install --no-cache-dir ." in run for run in dockerfile.all("RUN", build))
    # The final stage takes the installed environment and two files of deploy/, nothing else.
    for srcs, _, flags in dockerfile.copies(-1):
        if not any(f.startswith("--from") for f in flags):
            for source in srcs:
                assert source.startswith("deploy/") and (ROOT / source).is_file(), source


def test_image_entrypoint_ports_volume_and_default_command(dockerfile):
    assert dockerfile.exec_form("ENTRYPOINT") == ["chunkstore"]
    exposed = {int(p.split("/")[0]) for rest in dockerfile.all("EXPOSE") for p in rest.split()}
    assert exposed == {GRPC_PORT, METRICS_PORT}
    assert dockerfile.exec_form("VOLUME") == ["/data"]
    # The default command runs the one-node map the image carries.
    args = parse_node_command(dockerfile.exec_form("CMD"))
    cluster_path = dockerfile.copied_to("deploy/standalone.toml")
    standalone = load_cluster_file(DEPLOY / "standalone.toml")
    check_node_command(
        args, standalone, node_id=args.node_id, cluster_path=cluster_path, data_mount="/data"
    )
    assert [n.id for n in standalone.nodes] == [args.node_id]


def test_image_healthcheck_runs_the_probe_script_on_the_grpc_port(dockerfile, healthcheck):
    command = dockerfile.healthcheck()
    python = dockerfile.env()["PATH"].split(":")[0] + "/python"
    assert command == [python, dockerfile.copied_to("deploy/healthcheck.py")]
    assert healthcheck.DEFAULT_PORT == GRPC_PORT
    assert healthcheck.DEFAULT_HOST == "127.0.0.1"
    assert dockerfile.env()[healthcheck.PORT_ENV] == str(GRPC_PORT)


# ---------------------------------------------------------------------------------------------
# compose


def test_compose_builds_the_image_from_the_checkout(compose, compose_nodes):
    for name in [*compose_nodes, "cli"]:
        build = compose["services"][name]["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_nodes_match_the_cluster_file(compose, compose_nodes, dockerfile):
    services = compose["services"]
    cluster_path = None
    data_volumes = []
    for name, args in compose_nodes.items():
        service = services[name]
        volumes = [v.split(":") for v in service["volumes"]]
        binds = {target: (source, mode) for source, target, *mode in volumes if source[0] in "./"}
        named = {target: source for source, target, *_ in volumes if source[0] not in "./"}
        # the cluster file, mounted read-only where --cluster looks
        source, mode = binds[args.cluster]
        assert mode == ["ro"]
        cluster_file = (COMPOSE.parent / source).resolve()
        assert cluster_file == DEPLOY / "compose" / "cluster.toml"
        cluster = load_cluster_file(cluster_file)
        assert cluster_path in (None, args.cluster)
        cluster_path = args.cluster
        # a named volume of its own at the image's VOLUME
        (data_mount,) = dockerfile.exec_form("VOLUME")
        data_volumes.append(named[data_mount])
        check_node_command(
            args, cluster, node_id=name, cluster_path=args.cluster, data_mount=data_mount
        )
        # peers and clients dial the service name, on the compose network
        assert cluster.node(name).address == f"{name}:{GRPC_PORT}"
        assert {int(p) for p in service["expose"]} == {GRPC_PORT, METRICS_PORT}
        assert seconds(service["stop_grace_period"]) > DEFAULT_GRACE
    assert len(set(data_volumes)) == len(data_volumes) == len(compose_nodes)
    assert set(data_volumes) <= set(compose["volumes"])
    cluster = load_cluster_file(DEPLOY / "compose" / "cluster.toml")
    assert {n.id for n in cluster.nodes} == set(compose_nodes)
    assert (cluster.replicas, cluster.write_quorum) == (3, 2)


def test_compose_healthcheck_is_the_images(compose, compose_nodes, dockerfile):
    for name in compose_nodes:
        check = compose["services"][name]["healthcheck"]
        assert check["test"] == ["CMD", *dockerfile.healthcheck()]
        assert seconds(check["timeout"]) > 0 and check["retries"] >= 1


def test_compose_cli_reaches_every_node(compose, compose_nodes):
    cli = compose["services"]["cli"]
    url = cli["environment"]["CHUNKSTORE_STORE"]
    assert url.startswith("grpc://")
    cluster = load_cluster_file(DEPLOY / "compose" / "cluster.toml")
    assert url.removeprefix("grpc://").split(",") == [n.address for n in cluster.nodes]
    assert set(cli["depends_on"]) == set(compose_nodes)
    assert "cli" in cli["profiles"], "`up` must not start the cli service"


def test_compose_prometheus_scrapes_every_node_and_loads_the_rules(
    compose, compose_nodes, prometheus_config
):
    prometheus = compose["services"]["prometheus"]
    mounts = {}
    for volume in prometheus["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[PurePosixPath(target)] = (COMPOSE.parent / source).resolve()
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in prometheus["command"])
    config_target = PurePosixPath(flags["config.file"])
    assert mounts[config_target] == PROMETHEUS_DIR / "prometheus.yml"
    # rule files are relative to the config file, in the container as in the checkout
    assert prometheus_config["rule_files"] == ["alerts.yml"]
    for rule_file in prometheus_config["rule_files"]:
        assert mounts[config_target.parent / rule_file] == PROMETHEUS_DIR / rule_file
        assert (PROMETHEUS_DIR / rule_file).is_file()
    jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
    job = jobs[SCRAPE_JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert sorted(targets) == sorted(f"{name}:{METRICS_PORT}" for name in compose_nodes)
    for args in compose_nodes.values():
        assert args.metrics_port == METRICS_PORT


# ---------------------------------------------------------------------------------------------
# alert rules


def exported_metric_names(tmp_path: Path) -> set[str]:
    """The sample names a node exports (with _bucket, _total... suffixes), read from the real
    registry of a node's metrics over a real store."""
    with LmdbStore(tmp_path / "store") as store:
        metrics = NodeMetrics(store)
        metrics.observe_rpc("ChunkService", "Missing", "OK", 0.01)
        return {s.name for family in metrics.registry.collect() for s in family.samples}


def test_alert_rules_are_complete(alert_rules):
    names = [rule["alert"] for rule in alert_rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    assert {
        "ChunkstoreNodeDown",
        "ChunkstoreVolumeNearlyFull",
        "ChunkstoreStoreFull",
        "ChunkstoreChunksUnderReplicated",
        "ChunkstoreScrubErrors",
        "ChunkstoreChunksRejected",
    } <= set(names)
    for rule in alert_rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["expr"].strip(), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        if "for" in rule:
            seconds(rule["for"])


def test_alert_rules_use_metrics_and_labels_that_exist(alert_rules, tmp_path, k8s):
    exported = exported_metric_names(tmp_path)
    streaming = {
        m.name
        for s in pb.DESCRIPTOR.services_by_name.values()
        for m in s.methods
        if m.client_streaming or m.server_streaming
    }
    for rule in alert_rules:
        expr = rule["expr"]
        for metric in re.findall(r"\bchunkstore_[a-z0-9_]+", expr):
            assert metric in exported | FUTURE_METRICS, f"{rule['alert']}: no metric {metric}"
        # every chunkstore series is selected by the scrape job that collects it
        for job in re.findall(r'\bjob\s*(?:=~|!~|!=|=)\s*"([^"]*)"', expr):
            assert job == SCRAPE_JOB, rule["alert"]
        for selector in re.findall(r"\b(?:up|chunkstore_[a-z0-9_]+)\{([^}]*)\}", expr):
            assert f'job="{SCRAPE_JOB}"' in selector, rule["alert"]
        for value in re.findall(r'\breason\s*(?:=~|!~|!=|=)\s*"([^"]*)"', expr):
            assert set(value.split("|")) <= set(REJECT_REASONS), rule["alert"]
        for value in re.findall(r'\bcode\s*(?:=~|!~|!=|=)\s*"([^"]*)"', expr):
            assert set(value.split("|")) <= set(grpc.StatusCode.__members__), rule["alert"]
        for op, value in re.findall(r'\bmethod\s*(=~|!~|!=|=)\s*"([^"]*)"', expr):
            if op == "!~":  # the streaming calls, whose duration is that of their data
                assert set(value.split("|")) == streaming, rule["alert"]
        # the PVC names the StatefulSet makes
        for claims in re.findall(r'persistentvolumeclaim\s*=~\s*"([^"]*)"', expr):
            sts = k8s.statefulset
            (template,) = sts["spec"]["volumeClaimTemplates"]
            for i in range(sts["spec"]["replicas"]):
                pvc = f"{template['metadata']['name']}-{sts['metadata']['name']}-{i}"
                assert re.fullmatch(claims, pvc), (rule["alert"], pvc)
            assert not re.fullmatch(claims, "data-postgres-0")


# ---------------------------------------------------------------------------------------------
# Kubernetes


def test_k8s_objects_live_in_the_namespace(k8s):
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["namespace"] == NAMESPACE
    assert set(kustomization["resources"]) == K8S_RESOURCES
    assert {p.name for p in K8S.glob("*.yaml")} == K8S_RESOURCES | {"kustomization.yaml"}
    assert k8s.one("Namespace")["metadata"]["name"] == NAMESPACE
    for path, obj in k8s.objects:
        assert {"apiVersion", "kind", "metadata"} <= set(obj), path
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE, path


def test_k8s_statefulset_service_and_selectors(k8s):
    sts, service = k8s.statefulset, k8s.service
    pod_labels = k8s.pod["metadata"]["labels"]
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None", "the Service must be headless"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    pdb = k8s.one("PodDisruptionBudget")
    assert pdb["spec"]["selector"] == sts["spec"]["selector"]
    # service ports lead to the container's ports, by name and by number
    for port in service["spec"]["ports"]:
        assert port["port"] == k8s.container_port(port["targetPort"])
    assert {p["name"]: p["containerPort"] for p in k8s.container["ports"]} == {
        "grpc": GRPC_PORT,
        "metrics": METRICS_PORT,
    }


def test_k8s_probes_use_grpc_health_on_the_grpc_port(k8s):
    container = k8s.container
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == k8s.container_port("grpc"), probe
        assert container[probe]["grpc"].get("service", "") == ""  # the node's overall health


def test_k8s_node_command_fits_each_pod(k8s, k8s_cluster, dockerfile):
    sts, container = k8s.statefulset, k8s.container
    assert "command" not in container, "keep the image's entrypoint, `chunkstore`"
    env = {e["name"]: e for e in container["env"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in k8s.pod["spec"]["volumes"]}
    # the cluster file: the ConfigMap's key, mounted where --cluster looks
    (config_volume,) = [v for v in volumes.values() if "configMap" in v]
    (item,) = config_volume["configMap"]["items"]
    config_mount = mounts[config_volume["name"]]
    assert config_mount.get("readOnly") is True
    cluster_path = f"{config_mount['mountPath']}/{item['path']}"
    configmap_names = [c["metadata"]["name"] for c in k8s.of_kind("ConfigMap")]
    assert config_volume["configMap"]["name"] in configmap_names
    # the data volume: one PVC per pod, mounted at the image's VOLUME
    (template,) = sts["spec"]["volumeClaimTemplates"]
    data_mount = mounts[template["metadata"]["name"]]["mountPath"]
    assert [data_mount] == dockerfile.exec_form("VOLUME")
    assert template["metadata"]["name"] not in volumes
    # each pod, by the name the downward API gives it
    pod_env = {"POD_NAME": "metadata.name"}
    for var, field in pod_env.items():
        assert env[var]["valueFrom"]["fieldRef"]["fieldPath"] == field
    referenced = {v for arg in container["args"] for v in re.findall(r"\$\((\w+)\)", arg)}
    assert referenced <= set(pod_env)
    for i in range(sts["spec"]["replicas"]):
        pod_name = f"{sts['metadata']['name']}-{i}"
        argv = [str(arg).replace("$(POD_NAME)", pod_name) for arg in container["args"]]
        check_node_command(
            parse_node_command(argv),
            k8s_cluster,
            node_id=pod_name,
            cluster_path=cluster_path,
            data_mount=data_mount,
        )


def test_k8s_cluster_file_names_every_pod_by_its_stable_dns_name(k8s, k8s_cluster):
    sts = k8s.statefulset
    name, service = sts["metadata"]["name"], sts["spec"]["serviceName"]
    replicas = sts["spec"]["replicas"]
    assert [(n.id, n.address) for n in k8s_cluster.nodes] == [
        (f"{name}-{i}", f"{name}-{i}.{service}.{NAMESPACE}.svc.cluster.local:{GRPC_PORT}")
        for i in range(replicas)
    ]
    assert (k8s_cluster.replicas, k8s_cluster.write_quorum) == (3, 2)
    # a drain may take down only as many nodes as leave every chunk a write quorum
    pdb = k8s.one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["maxUnavailable"] <= k8s_cluster.replicas - k8s_cluster.write_quorum


def test_k8s_pod_is_locked_down_and_sized(k8s):
    pod_spec, container = k8s.pod["spec"], k8s.container
    assert pod_spec["terminationGracePeriodSeconds"] > DEFAULT_GRACE
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind


def test_k8s_metrics_are_scraped_as_the_rules_expect(k8s):
    annotations = k8s.pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(k8s.container_port("metrics"))
    assert annotations["prometheus.io/path"] == "/metrics"
    monitor = k8s.one("PodMonitor")
    pod_labels = k8s.pod["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels[monitor["spec"]["jobLabel"]] == SCRAPE_JOB
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    k8s.container_port(endpoint["port"])
    assert endpoint["path"] == "/metrics"


# ---------------------------------------------------------------------------------------------
# the tools, where installed: generated only then, so nothing is skipped without them

PROMTOOL = shutil.which("promtool")
KUBECTL = shutil.which("kubectl")


def run_tool(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, f"{shlex.join(argv)}:\n{result.stdout}\n{result.stderr}"


if PROMTOOL:

    @pytest.mark.parametrize(
        "argv",
        [
            ["check", "config", "deploy/prometheus/prometheus.yml"],
            ["check", "rules", "deploy/prometheus/alerts.yml"],
            ["test", "rules", "deploy/prometheus/alerts_test.yml"],
        ],
        ids=lambda argv: " ".join(argv[:2]),
    )
    def test_promtool(argv):
        run_tool([PROMTOOL, *argv])


if KUBECTL:

    def test_kubectl_kustomize_renders_every_resource(k8s):
        result = subprocess.run(
            [KUBECTL, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        expected = [
            (obj["kind"], obj["metadata"]["name"])
            for path, obj in k8s.objects
            if path.name in K8S_RESOURCES
        ]
        assert sorted((o["kind"], o["metadata"]["name"]) for o in rendered) == sorted(expected)


# ---------------------------------------------------------------------------------------------
# the health check script


def run_healthcheck(*args: str) -> subprocess.CompletedProcess:
    """Run deploy/healthcheck.py as Docker would, in this environment (monkeypatch's too)."""
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=60
    )


def test_healthcheck_passes_against_a_serving_node(tmp_path, monkeypatch):
    with LocalCluster(tmp_path, nodes=1) as cluster:
        port = cluster.address("n1").rpartition(":")[2]
        by_flag = run_healthcheck("--port", port)
        assert by_flag.returncode == 0, by_flag.stderr
        monkeypatch.setenv("CHUNKSTORE_GRPC_PORT", port)
        by_env = run_healthcheck()
        assert by_env.returncode == 0, by_env.stderr
        assert by_env.stdout == by_env.stderr == ""


def test_healthcheck_fails_against_a_closed_port():
    result = run_healthcheck("--port", str(free_port()), "--timeout", "5")
    assert result.returncode == 1
    assert "not serving" in result.stderr and "UNAVAILABLE" in result.stderr


def test_healthcheck_fails_against_a_node_that_is_not_serving():
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = run_healthcheck("--port", str(port))
    finally:
        server.stop(None)
    assert result.returncode == 1
    assert "NOT_SERVING" in result.stderr


def test_healthcheck_bad_usage_is_unhealthy_not_docker_reserved_2(monkeypatch):
    assert run_healthcheck("--port", "x").returncode == 1
    monkeypatch.setenv("CHUNKSTORE_GRPC_PORT", "70000")
    result = run_healthcheck()
    assert result.returncode == 1 and "CHUNKSTORE_GRPC_PORT" in result.stderr
