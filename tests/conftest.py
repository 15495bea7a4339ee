"""Shared fixtures: a private redis-server, a real S3 endpoint, and Dagster instances on disk.

Nothing here touches the machine's shared services: Redis runs on a free port of our own,
the S3 endpoint is MinIO if its binary is on PATH, else SeaweedFS (``weed``), else moto's server.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"Timed out after {timeout} s waiting for {what}.")
        time.sleep(interval)


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen
    directory: Path
    password: str | None = None

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db))


def start_redis(directory: Path, password: str | None = None, *extra: str) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server).")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(directory), *extra]
    if password:
        args += ["--requirepass", password]
    log = open(directory / "redis.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    server = RedisServer(port, process, directory, password)

    def answers() -> bool:
        try:
            return bool(server.client().ping())
        except redis.RedisError:
            return False

    wait_for(answers, 10, f"redis-server on port {port}")
    return server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.process.terminate()
    server.process.wait(10)


# Set to "cluster" to run the tests that take `broker_url` against a local 3-primary Redis
# Cluster (a redis+cluster:// URL) instead of one server (CI runs tests/executor so, on the
# lowest Dagster).
TEST_BROKER_ENV = "DAGSTER_TASKIQ_TEST_BROKER"


def stop_processes(processes: list[subprocess.Popen]) -> None:
    """Terminate each process by its own handle, then kill any that does not exit in 10 s."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _answers(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_timeout=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _cluster_ok(port: int) -> bool:
    with redis.Redis(port=port, socket_timeout=1) as client:
        return client.cluster("info").get("cluster_state") == "ok"


@dataclass
class RedisCluster:
    ports: list[int]
    processes: list[subprocess.Popen]

    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def flushall(self) -> None:
        for port in self.ports:
            with redis.Redis(port=port) as client:
                client.flushall()


def start_cluster(directory: Path, primaries: int = 3) -> RedisCluster:
    """``primaries`` cluster-enabled redis-servers on free ports, joined with ``redis-cli
    --cluster create`` (no replicas). Stop it with ``stop_processes(cluster.processes)``."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are needed for a cluster")
    ports = [free_port() for _ in range(primaries)]
    # The bus port defaults to port + 10000, which a high free port would push past 65535.
    bus_ports = [free_port() for _ in range(primaries)]
    cluster = RedisCluster(ports, [])
    try:
        for port, bus_port in zip(ports, bus_ports, strict=True):
            node_dir = directory / f"node-{port}"
            node_dir.mkdir()
            with open(node_dir / "redis.log", "wb") as log:
                cluster.processes.append(subprocess.Popen(
                    ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                     "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
                     "--cluster-config-file", "nodes.conf",
                     "--dir", str(node_dir), "--save", "", "--appendonly", "no"],
                    stdout=log, stderr=subprocess.STDOUT))
        for port in ports:
            wait_for(lambda port=port: _answers(port), 10, f"cluster node on {port}")
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        for port in ports:
            wait_for(lambda port=port: _cluster_ok(port), 30, f"cluster state ok on {port}",
                     interval=0.2)
    except BaseException:
        stop_processes(cluster.processes)
        raise
    return cluster


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[RedisCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield cluster
    stop_processes(cluster.processes)


class _WholeCluster(redis.RedisCluster):
    """A cluster client whose KEYS and FLUSHDB cover every primary, as on one server (redis-py
    sends them to one node by default), so tests read a cluster as they read a server."""

    def keys(self, pattern: str = "*", **kwargs: Any) -> Any:
        return super().keys(pattern, target_nodes=self.PRIMARIES, **kwargs)

    def flushdb(self, asynchronous: bool = False, **kwargs: Any) -> Any:
        return super().flushdb(asynchronous, target_nodes=self.PRIMARIES, **kwargs)


def sync_redis(url: str) -> redis.Redis:
    """A synchronous client for a test's broker URL: a RedisCluster for a cluster URL."""
    from dagster_taskiq.config import parse_redis_url

    target = parse_redis_url(url)
    if target.kind == "cluster":
        from redis.cluster import ClusterNode

        return _WholeCluster(  # type: ignore[return-value]
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes])
    return redis.Redis.from_url(url)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # xdist sets COLUMNS=80/LINES=24 in its workers: the commands the tests start would
        # inherit them and wrap their output at 80 columns whatever terminal they are given.
        os.environ.pop("COLUMNS", None)
        os.environ.pop("LINES", None)
    config.addinivalue_line("markers", "single_server: needs one redis-server's admin commands "
                            "(REPLICAOF, DEBUG, ...): skipped when the broker is a cluster")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a cluster broker, skip the tests that need one server's admin commands; every other
    test runs (those with servers of their own, or none, run as they do without a cluster)."""
    if os.environ.get(TEST_BROKER_ENV) != "cluster":
        return
    for item in items:
        if item.get_closest_marker("single_server"):
            item.add_marker(pytest.mark.skip(reason="needs a single redis-server"))


@pytest.fixture
def broker_url(request: pytest.FixtureRequest) -> str:
    """The test's broker: database 0 of our private server (or, with
    DAGSTER_TASKIQ_TEST_BROKER=cluster, a local Redis Cluster), emptied first."""
    if os.environ.get(TEST_BROKER_ENV) == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        return cluster.url()
    redis_server: RedisServer = request.getfixturevalue("redis_server")
    redis_server.client().flushall()
    return redis_server.url()


@dataclass
class S3Endpoint:
    url: str
    access_key: str
    secret_key: str
    kind: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "S3_ENDPOINT_URL": self.url,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )


S3_KINDS = ("minio", "seaweedfs", "moto")
_S3_BINARIES = {"minio": "minio", "seaweedfs": "weed", "moto": "moto_server"}


def start_s3(directory: Path, kind: str | None = None) -> tuple[S3Endpoint, subprocess.Popen]:
    """Start an S3 server of ``kind`` (one of ``S3_KINDS``), by default the first on PATH."""
    if kind is None:
        kind = next((k for k in S3_KINDS if shutil.which(_S3_BINARIES[k])), "moto")
    elif kind not in S3_KINDS:
        raise ValueError(f"unknown S3 server {kind!r}: use one of {S3_KINDS}")
    if not shutil.which(_S3_BINARIES[kind]):
        raise RuntimeError(f"{_S3_BINARIES[kind]} ({kind}) is not on PATH.")
    port = free_port()
    key, secret = "testaccess", "testsecret-0123456789"
    url = f"http://127.0.0.1:{port}"
    log = open(directory / "s3.log", "wb")  # noqa: SIM115 - lives as long as the server
    if kind == "minio":
        env = {**os.environ, "MINIO_ROOT_USER": key, "MINIO_ROOT_PASSWORD": secret}
        args = ["minio", "server", str(directory / "data"), "--address", f"127.0.0.1:{port}",
                "--console-address", f"127.0.0.1:{free_port()}"]
    elif kind == "seaweedfs":
        config = directory / "s3.json"
        identity = {"name": "test", "credentials": [{"accessKey": key, "secretKey": secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        config.write_text(json.dumps({"identities": [identity]}))
        env = dict(os.environ)
        args = ["weed", "mini", f"-dir={directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.port={port}", f"-master.port={free_port()}",
                f"-volume.port={free_port()}", f"-filer.port={free_port()}",
                f"-s3.config={config}", "-admin.ui=false", "-webdav=false"]
    else:
        env = dict(os.environ)
        args = ["moto_server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    endpoint = S3Endpoint(url, key, secret, kind)

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{kind} exited; see {directory / 's3.log'}")
        try:
            endpoint.client().list_buckets()
            return True
        except Exception:
            return False

    wait_for(answers, 30, f"{kind} S3 endpoint on port {port}", interval=0.2)
    return endpoint, process


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[S3Endpoint]:
    endpoint, process = start_s3(tmp_path_factory.mktemp("s3"))
    yield endpoint
    process.terminate()
    process.wait(10)


@pytest.fixture
def dagster_home(tmp_path, monkeypatch) -> Path:
    """A fresh on-disk DAGSTER_HOME (sqlite storage) that worker subprocesses inherit."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.fixture
def instance(dagster_home):
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        yield instance


@pytest.fixture
def io_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as directory:
        yield directory
