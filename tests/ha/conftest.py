"""Fixtures for the highly available broker tests: a Sentinel-managed primary and replica.

One primary, one replica and three Sentinels (quorum 2), each a process of ours on a free
port, with passwords on the data nodes and on the Sentinels (so the URL's credentials are
exercised too). Every process is stopped by its own handle at the end.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.conftest import RedisServer, free_port, start_redis, stop_processes, wait_for
from tests.executor.conftest import start_worker  # noqa: F401 - the executor tests' fixture

SERVICE = "mymaster"
PASSWORD = "data-secret"
SENTINEL_PASSWORD = "sentinel-secret"
DOWN_AFTER_MS = 1000  # a primary silent this long is down: failover within a few seconds


@dataclass
class SentinelSetup:
    servers: list[RedisServer]  # [first primary, its replica]
    sentinel_ports: list[int]
    sentinels: list[subprocess.Popen] = field(default_factory=list)

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return (f"redis+sentinel://:{PASSWORD}@{hosts}/{SERVICE}/{db}"
                f"?sentinel_password={SENTINEL_PASSWORD}")

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=SENTINEL_PASSWORD, socket_timeout=2)

    def primary_port(self) -> int | None:
        """The primary's port as the Sentinels' majority sees it (None while they disagree
        or cannot be asked)."""
        seen = []
        for port in self.sentinel_ports:
            try:
                with self.sentinel(port) as client:
                    host_port = client.execute_command("SENTINEL", "get-master-addr-by-name",
                                                       SERVICE)
                seen.append(int(host_port[1]))
            except redis.RedisError:
                continue
        top = max(set(seen), key=seen.count, default=None)
        return top if top is not None and seen.count(top) >= 2 else None

    def ready(self) -> bool:
        """Every Sentinel knows the replica and the two other Sentinels (needed to agree on
        a failover), and the replica is in sync."""
        for port in self.sentinel_ports:
            with self.sentinel(port) as client:
                if len(client.execute_command("SENTINEL", "replicas", SERVICE)) != 1:
                    return False
                if len(client.execute_command("SENTINEL", "sentinels", SERVICE)) != 2:
                    return False
        with self.servers[1].client() as replica:
            return replica.info("replication").get("master_link_status") == "up"


def _sentinel_command(conf: Path) -> list[str]:
    # Debian's redis-sentinel is the redis-server binary started in Sentinel mode.
    binary = shutil.which("redis-sentinel")
    return [binary, str(conf)] if binary else ["redis-server", str(conf), "--sentinel"]


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is needed")
    primary_dir, replica_dir = tmp_path / "primary", tmp_path / "replica"
    primary_dir.mkdir()
    replica_dir.mkdir()
    servers: list[RedisServer] = []
    setup = SentinelSetup(servers, [free_port() for _ in range(3)])
    try:
        # masterauth on both: the primary may come back as a replica of the other.
        servers.append(start_redis(primary_dir, PASSWORD, "--masterauth", PASSWORD))
        servers.append(start_redis(replica_dir, PASSWORD, "--masterauth", PASSWORD,
                                   "--replicaof", "127.0.0.1", str(servers[0].port)))
        for port in setup.sentinel_ports:
            directory = tmp_path / f"sentinel-{port}"
            directory.mkdir()
            conf = directory / "sentinel.conf"  # Sentinel rewrites it: one each, writable
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                f"requirepass {SENTINEL_PASSWORD}\nsentinel sentinel-pass {SENTINEL_PASSWORD}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {servers[0].port} 2\n"
                f"sentinel auth-pass {SERVICE} {PASSWORD}\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} 5000\n")
            with open(directory / "sentinel.log", "wb") as log:
                setup.sentinels.append(subprocess.Popen(
                    _sentinel_command(conf), stdout=log, stderr=subprocess.STDOUT))
        wait_for(setup.ready, 30, "the Sentinels to know the replica and each other",
                 interval=0.2)
        yield setup
    finally:
        stop_processes(setup.sentinels)
        stop_processes([server.process for server in servers])
