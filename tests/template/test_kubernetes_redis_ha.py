"""deploy/kubernetes/ with `redis_ha: true`: Redis as 3 data pods with a Sentinel beside each.

Offline, as test_kubernetes.py: `kubectl kustomize` builds it, every object validates strictly
against the Kubernetes schemas (and the ScaledObjects against KEDA's), every broker URL is the
Sentinel form naming the three Sentinels, and no manifest holds a secret.

For real (no containers): the rendered start script, redis.conf and sentinel.conf run 3
`redis-server` and 3 `redis-server --sentinel` processes on free local ports, named
`localhost` (so the Sentinels' hostname settings are exercised). The Sentinels elect pod 0,
fail over when it is killed, and a restarted pod 0 joins the new primary as a replica, through
the Sentinels, or by asking the data nodes when no Sentinel answers. What differs from a
cluster: host names and ports (the pods' DNS names become `localhost:<port>`), the data
directory, and no kubelet (probes, restarts and the PodDisruptionBudget are not exercised).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from copier import run_copy, run_update
from redis.sentinel import Sentinel

from dagster_taskiq.config import parse_redis_url
from scripts.render_example import render
from tests.template.test_kubernetes import (
    build,
    by_kind,
    containers,
    kubernetes_errors,
    schema_errors,
)

pytestmark = pytest.mark.filterwarnings("ignore::copier.errors.DirtyLocalWarning")

SERVICE = "dagster-taskiq"  # the name in `sentinel monitor` and in the broker URL
PODS = [f"redis-{i}.redis-headless" for i in range(3)]
SENTINEL_URL = (
    "redis+sentinel://:$(REDIS_PASSWORD)@" + ",".join(f"{pod}:26379" for pod in PODS)
    + f"/{SERVICE}/0?sentinel_password=$(REDIS_PASSWORD)"
)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(tmp_path_factory.mktemp("render") / "ha", {"redis_ha": True})


@pytest.fixture(scope="module")
def objects(project: Path) -> list[dict[str, Any]]:
    return build(project)


def kube(project: Path) -> Path:
    return project / "deploy" / "kubernetes"


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {env["name"]: env for env in container.get("env", [])}


def test_ha_manifests_build_and_validate(project: Path, objects: list[dict[str, Any]]) -> None:
    name = "my-dagster-project"
    found = {(o["kind"], re.sub(r"-[a-z0-9]{10}$", "-<hash>", o["metadata"]["name"]))
             for o in objects}
    workers = {f"worker-{q}" for q in ("dagster", "short", "long")}
    # No plain "redis" Service: only the Sentinels know which pod is the primary.
    assert found == {
        ("Namespace", name), ("ConfigMap", "redis-config-<hash>"),
        ("Secret", "dagster-taskiq-secrets"),
        ("Service", "redis-headless"), ("StatefulSet", "redis"), ("PodDisruptionBudget", "redis"),
        ("Service", "postgres"), ("StatefulSet", "postgres"),
        ("Deployment", "exporter"), ("Service", "exporter"), ("Job", "s3-init"),
        *(("Deployment", w) for w in workers), *(("ScaledObject", w) for w in workers),
    }
    for obj in objects:
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"].get("namespace", name) == name, what
        if obj["apiVersion"] == "keda.sh/v1alpha1":
            assert not schema_errors(obj, "keda-scaledobject-v1alpha1.json"), what
            # KEDA reads the exporter through Prometheus, never Redis: nothing to point at
            # the Sentinels there.
            assert [t["type"] for t in obj["spec"]["triggers"]] == ["prometheus"], what
        else:
            assert not kubernetes_errors(obj), (what, kubernetes_errors(obj))

    sts = by_kind(objects, "StatefulSet")["redis"]
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    assert spec["replicas"] == 3 and spec["serviceName"] == "redis-headless"
    assert spec["podManagementPolicy"] == "Parallel"
    labels = spec["selector"]["matchLabels"]
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == labels
    pdb = by_kind(objects, "PodDisruptionBudget")["redis"]
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": labels}}
    headless = by_kind(objects, "Service")["redis-headless"]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert {p["port"] for p in headless["ports"]} == {6379, 26379}
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "data"

    by_name = {c["name"]: c for c in containers(sts)}
    assert set(by_name) == {"redis", "sentinel"}
    for role, port in (("redis", 6379), ("sentinel", 26379)):
        container = by_name[role]
        assert container["command"] == ["sh", "/usr/local/etc/redis/redis-ha.sh", role]
        assert container["readinessProbe"] and container["livenessProbe"], role
        env = env_of(container)
        assert env["NODES"]["value"].split() == [f"{p}:6379" for p in PODS]
        assert env["SENTINELS"]["value"].split() == [f"{p}:26379" for p in PODS]
        assert env["SELF_NODE"]["value"] == "$(POD_NAME).redis-headless:6379"
        assert env["SELF_SENTINEL"]["value"] == "$(POD_NAME).redis-headless:26379"
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert [p["containerPort"] for p in container["ports"]] == [port]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["config"]["readOnly"] is True and "readOnly" not in mounts["run"]
    assert {m["name"] for m in by_name["redis"]["volumeMounts"]} == {"data", "config", "run"}
    run_volume = {v["name"]: v for v in pod["volumes"]}["run"]
    assert run_volume["emptyDir"]["medium"] == "Memory"

    config = next(o for o in objects if o["kind"] == "ConfigMap")
    assert set(config["data"]) == {"redis.conf", "sentinel.conf", "redis-ha.sh"}
    assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} == {
        config["metadata"]["name"]}
    sentinel = config["data"]["sentinel.conf"].splitlines()
    assert "sentinel resolve-hostnames yes" in sentinel
    assert "sentinel announce-hostnames yes" in sentinel
    assert f"sentinel monitor {SERVICE} redis-0.redis-headless 6379 2" in sentinel
    assert f"sentinel down-after-milliseconds {SERVICE} 5000" in sentinel
    assert "appendonly yes" in config["data"]["redis.conf"].splitlines()


def test_every_broker_url_is_the_sentinel_form(project: Path,
                                               objects: list[dict[str, Any]]) -> None:
    """Workers, exporter and every Dagster service (the run launcher reads the same variable)
    reach the primary through the three Sentinels, with the password from the Secret."""
    urls = []
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            for container in containers(obj):
                env = env_of(container)
                if "DAGSTER_TASKIQ_BROKER_URL" in env:
                    # $(REDIS_PASSWORD) is expanded only from a variable defined before it.
                    names = list(env)
                    assert names.index("REDIS_PASSWORD") < names.index("DAGSTER_TASKIQ_BROKER_URL")
                    urls.append((obj["metadata"]["name"], env["DAGSTER_TASKIQ_BROKER_URL"]))
    assert {name for name, _ in urls} == {
        "worker-dagster", "worker-short", "worker-long", "exporter"}
    values = yaml.safe_load((kube(project) / "helm-values.yaml").read_text())
    assert not schema_errors(values, "dagster-helm-values-subset.json")
    roles = [values["dagster-user-deployments"]["deployments"][0], values["dagsterWebserver"],
             values["dagsterDaemon"]]
    for role in roles:
        env = env_of(role)
        urls.append(("helm", env["DAGSTER_TASKIQ_BROKER_URL"]))
    assert values["runLauncher"]["config"]["customRunLauncher"]["config"]["broker"] == {
        "env": "DAGSTER_TASKIQ_BROKER_URL"}
    for _, env in urls:
        assert env == {"name": "DAGSTER_TASKIQ_BROKER_URL", "value": SENTINEL_URL}

    # The package reads it as the Sentinel form naming the StatefulSet's Sentinels.
    target = parse_redis_url(SENTINEL_URL.replace("$(REDIS_PASSWORD)", "s3cret"))
    assert target.kind == "sentinel" and target.service == SERVICE and target.db == 0
    assert target.nodes == tuple((pod, 26379) for pod in PODS)
    assert target.password == target.sentinel_password == "s3cret"
    # Nothing still names the single-instance Service.
    for path in kube(project).iterdir():
        if path.suffix in (".yaml", ".sh", ".conf"):
            assert "@redis:" not in path.read_text(), path


def test_no_secret_in_the_manifests(project: Path, objects: list[dict[str, Any]]) -> None:
    """Every password comes from the Secret (made from the git-ignored secrets.env)."""
    secret = by_kind(objects, "Secret")["dagster-taskiq-secrets"]
    placeholders = {base64.b64decode(v).decode() for v in secret["data"].values()}
    assert "change-me" in placeholders
    for path in kube(project).iterdir():
        if path.name.startswith("secrets."):
            continue
        text = path.read_text()
        assert "change-me" not in text, path
        # Password settings are written only from $REDIS_PASSWORD (printf's %s), never with
        # a literal value.
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue
            values = re.findall(r"(?:requirepass|masterauth|sentinel-pass|auth-pass \S+)"
                                r"\s+(\"?[^\s\\]*)", line)
            assert all(value == '"%s"' for value in values), (path, line)
    for obj in objects:
        if obj["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        for container in containers(obj):
            for env in container.get("env", []):
                if re.search(r"PASSWORD|AUTH|SECRET|KEY", env["name"]):
                    assert env["valueFrom"]["secretKeyRef"]["name"] == "dagster-taskiq-secrets"


def test_without_ha_nothing_changes_but_the_answer(tmp_path: Path) -> None:
    """redis_ha is asked only with Kubernetes, and false renders the single Redis."""
    plain = render(tmp_path / "plain")
    kube_dir = kube(plain)
    assert not (kube_dir / "sentinel.conf").exists() and not (kube_dir / "redis-ha.sh").exists()
    assert "redis://:$(REDIS_PASSWORD)@redis:6379/0" in (kube_dir / "helm-values.yaml").read_text()
    compose_only = render(tmp_path / "compose", {"deploy_targets": "compose"})
    answers = yaml.safe_load((compose_only / ".copier-answers.yml").read_text())
    assert "redis_ha" not in answers


# --- The rendered script and configs against real redis-server processes ---------------------

PASSWORD = "local-test-password"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (redis.RedisError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@dataclass
class Pod:
    """One StatefulSet pod: a data node and its Sentinel, with the pod's ConfigMap copy and
    emptyDir. Every process started is tracked by pid and killed at the end."""

    index: int
    root: Path
    node: str
    sentinel: str
    nodes: str
    sentinels: str
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, role: str) -> None:
        run_dir = self.root / "run"
        shutil.rmtree(run_dir, ignore_errors=True)  # an emptyDir: new with each pod
        run_dir.mkdir(parents=True)
        env = {
            "PATH": os.environ["PATH"], "REDIS_PASSWORD": PASSWORD, "NODES": self.nodes,
            "SENTINELS": self.sentinels, "SELF_NODE": self.node, "SELF_SENTINEL": self.sentinel,
            "CONFIG_DIR": str(self.root / "config"), "RUN_DIR": str(run_dir),
        }
        log = (self.root / f"{role}.log").open("ab")
        self.processes[role] = subprocess.Popen(
            ["sh", str(self.root / "config" / "redis-ha.sh"), role], cwd=self.root, env=env,
            stdout=log, stderr=subprocess.STDOUT)

    def kill(self, role: str) -> None:
        process = self.processes.pop(role)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def log(self, role: str) -> str:
        return (self.root / f"{role}.log").read_text(errors="replace")

    def config(self, role: str) -> str:
        return (self.root / "run" / ("redis.conf" if role == "redis" else "sentinel.conf")
                ).read_text()


def client(address: str) -> redis.Redis:
    host, port = address.rsplit(":", 1)
    return redis.Redis(host=host, port=int(port), password=PASSWORD, socket_timeout=2,
                       socket_connect_timeout=2, decode_responses=True)


def primary_named_by(sentinel: str) -> str | None:
    reply = client(sentinel).sentinel_get_master_addr_by_name(SERVICE)
    return f"{reply[0]}:{reply[1]}" if reply else None


def replica_of(node: str) -> str | None:
    """host:port of the primary this node replicates with the link up, else None."""
    info = client(node).info("replication")
    if info["role"] == "slave" and info["master_link_status"] == "up":
        return f"{info['master_host']}:{info['master_port']}"
    return None


@pytest.fixture
def pods(project: Path, tmp_path: Path) -> Iterator[list[Pod]]:
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.skip("redis-server and redis-cli are needed on PATH")
    ports = free_ports(6)
    nodes = [f"localhost:{port}" for port in ports[:3]]
    sentinels = [f"localhost:{port}" for port in ports[3:]]
    result = []
    for i in range(3):
        root = tmp_path / f"redis-{i}"
        (root / "data").mkdir(parents=True)
        shutil.copytree(kube(project), root / "config",
                        ignore=shutil.ignore_patterns("*.yaml", "*.md", "*.env", ".gitignore"))
        # The one change from the ConfigMap: this pod's data directory instead of /data.
        conf = root / "config" / "redis.conf"
        assert "\ndir /data\n" in conf.read_text()
        conf.write_text(conf.read_text().replace("\ndir /data\n", f"\ndir {root / 'data'}\n"))
        result.append(Pod(i, root, nodes[i], sentinels[i], " ".join(nodes), " ".join(sentinels)))
    try:
        yield result
    finally:
        for pod in result:
            for role in list(pod.processes):
                pod.kill(role)


def test_sentinels_elect_pod_0_and_a_restarted_pod_0_follows_the_failover(
        pods: list[Pod]) -> None:
    nodes = [pod.node for pod in pods]
    # A new set: every member starts at once (podManagementPolicy: Parallel).
    for pod in pods:
        pod.start("redis")
        pod.start("sentinel")
    for pod in pods:
        # Each Sentinel names pod 0 and has found both replicas and both other Sentinels.
        wait_for(f"sentinel {pod.index} to see the set", lambda pod=pod: (
            primary_named_by(pod.sentinel) == nodes[0]
            and len(client(pod.sentinel).sentinel_slaves(SERVICE)) == 2
            and len(client(pod.sentinel).sentinel_sentinels(SERVICE)) == 2))
    for pod in pods[1:]:
        assert wait_for(f"node {pod.index} to replicate", lambda pod=pod: replica_of(
            pod.node)) == nodes[0]
        assert f"replicaof localhost {nodes[0].split(':')[1]}" in pod.config("redis")
    assert "replicaof" not in pods[0].config("redis")
    assert client(nodes[0]).role()[0] == "master"
    for pod in pods:
        assert "requirepass" in pod.config("sentinel")
        assert PASSWORD not in pod.log("redis") + pod.log("sentinel")

    # A client as the package makes one from the Sentinel URL (localhost for the pod names).
    url = (f"redis+sentinel://:{PASSWORD}@{','.join(p.sentinel for p in pods)}/{SERVICE}/0"
           f"?sentinel_password={PASSWORD}")
    target = parse_redis_url(url)
    sentinel = Sentinel(list(target.nodes), socket_timeout=2,
                        sentinel_kwargs={"password": target.sentinel_password,
                                         "socket_timeout": 2})
    primary = sentinel.master_for(target.service, password=target.password, db=target.db,
                                  socket_timeout=2, decode_responses=True)
    primary.set("queued-step", "kept")
    assert primary.execute_command("WAIT", 2, 5000) == 2  # on both replicas

    # Pod 0 is lost (its Redis and its Sentinel): the two other Sentinels promote a replica.
    pods[0].kill("sentinel")
    pods[0].kill("redis")
    new = wait_for("a failover", lambda: primary_named_by(pods[1].sentinel) in nodes[1:]
                   and primary_named_by(pods[1].sentinel), timeout=60)
    wait_for("both Sentinels to agree", lambda: primary_named_by(pods[2].sentinel) == new)
    wait_for("the new primary", lambda: client(new).role()[0] == "master")
    assert wait_for("the client to follow", lambda: primary.get("queued-step")) == "kept"

    # Pod 0 restarts: it asks the Sentinels and comes back as a replica of the new primary,
    # never as a second primary; its own Sentinel monitors the new primary.
    pods[0].start("redis")
    pods[0].start("sentinel")
    assert wait_for("pod 0 to replicate", lambda: replica_of(nodes[0])) == new
    assert f"replicaof localhost {new.split(':')[1]}" in pods[0].config("redis")
    assert f"starts with primary {new}" in pods[0].log("redis")
    wait_for("pod 0's Sentinel", lambda: primary_named_by(pods[0].sentinel) == new)
    assert f"starts monitoring primary {new}" in pods[0].log("sentinel")
    assert client(nodes[0]).get("queued-step") == "kept"

    # No Sentinel answers (all of them down or restarting): a restarted pod 0 asks the data
    # nodes which one is the primary, rather than taking the role itself.
    for pod in pods:
        pod.kill("sentinel")
    pods[0].kill("redis")
    pods[0].start("redis")
    assert wait_for("pod 0 to replicate again", lambda: replica_of(nodes[0])) == new
    assert f"replicaof localhost {new.split(':')[1]}" in pods[0].config("redis")


def test_update_turns_ha_on_and_keeps_user_edits(template_clone: Path, tmp_path: Path) -> None:
    """`copier update --data redis_ha=true` on a project with the single Redis: the HA
    manifests arrive, the user's edits to other Kubernetes files stay, nothing conflicts."""
    subprocess.run(["git", "tag", "v1"], cwd=template_clone, check=True)
    project = tmp_path / "project"
    run_copy(str(template_clone), str(project), defaults=True, vcs_ref="v1", quiet=True)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "generated"]):
        subprocess.run(["git", *args], cwd=project, check=True)
    values = kube(project) / "helm-values.yaml"
    values.write_text(values.read_text().replace("maxConcurrentRuns: 10", "maxConcurrentRuns: 25"))
    subprocess.run(["git", "commit", "-q", "-am", "ours"], cwd=project, check=True)

    run_update(str(project), data={"redis_ha": True}, defaults=True, overwrite=True,
               vcs_ref="v1", quiet=True)

    assert "maxConcurrentRuns: 25" in values.read_text()
    assert SENTINEL_URL in values.read_text()
    assert (kube(project) / "sentinel.conf").is_file() and (kube(project) / "redis-ha.sh").is_file()
    for path in project.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert not path.name.endswith(".rej"), path
            assert "<<<<<<<" not in path.read_text(errors="replace"), path
    assert yaml.safe_load((project / ".copier-answers.yml").read_text())["redis_ha"] is True
    sts = by_kind(build(project), "StatefulSet")["redis"]
    assert sts["spec"]["replicas"] == 3
