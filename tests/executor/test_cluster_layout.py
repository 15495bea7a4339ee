"""The key layout works on Redis Cluster: every key we write shares the prefix's hash tag.

A workload goes through every broker script (kick, claim, heartbeat, ack, reap, release,
revoke), the result backend and the worker registry; every key it leaves in Redis, at each
step and at the end, must be under the prefix and hash to one Cluster slot. The same workload
then runs against a real three-primary Redis Cluster, where a script or transaction whose keys
spanned slots would fail (CROSSSLOT, or a key that is not local to the node).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, ResponseError
from taskiq import BrokerMessage
from taskiq.result import TaskiqResult

from dagster_taskiq import registry
from dagster_taskiq.broker import (
    LEASE_LABEL,
    PRIORITY_LABEL,
    QUEUE_LABEL,
    REPLY_LABEL,
    RUN,
    RedisLeaseBroker,
)
from dagster_taskiq.config import TASK_EXECUTE_JOB, BrokerSettings
from dagster_taskiq.results import RedisReplyBackend
from tests.conftest import RedisCluster as RedisClusterServers
from tests.conftest import sync_redis

# Every kind of key the workload must have made (so an assertion over "all keys" is not empty).
SEGMENTS = {"task", "queue", "runs", "wake", "wakeruns", "seq", "leases", "claim", "reply",
            "result", "workers", "worker"}
# The lease of the two tasks left to expire: long enough that no reap in the listeners can
# take them before the first heartbeat on a loaded machine (0.3 s did, once in CI).
SHORT_LEASE = 2.0

def message(task_id: str, queue: str, reply_to: str, lease: float = 30.0,
            task_name: str = "record") -> BrokerMessage:
    labels = {QUEUE_LABEL: queue, PRIORITY_LABEL: 0, LEASE_LABEL: lease, REPLY_LABEL: reply_to}
    return BrokerMessage(task_id=task_id, task_name=task_name, message=b"{}", labels=labels)


async def exercise(settings: BrokerSettings,
                   keys: Callable[[], Awaitable[list[bytes]]]) -> set[bytes]:
    """Run every script, the results and the registry once; returns every key seen in Redis
    after each step."""
    prefix = settings.key_prefix
    reply_to = f"{prefix}:reply:run-1:{uuid.uuid4().hex}"  # as the orchestrator names it
    client = RedisLeaseBroker(settings)
    steps = RedisLeaseBroker(settings, queues=["dagster", "other"], holder="steps@h:1",
                             block_seconds=0.1)
    runs = RedisLeaseBroker(settings, queues=["dagster"], holder="runs@h:1", block_seconds=0.1,
                            kind=RUN)
    backend = RedisReplyBackend(settings)
    parts = (client, steps, runs, backend)
    seen: set[bytes] = set()

    async def snapshot() -> None:
        seen.update(await keys())

    try:
        await client.kick(message("a", "dagster", reply_to))
        await client.kick(message("b", "other", reply_to))
        await client.kick(message("c", "dagster", reply_to, lease=SHORT_LEASE))
        await client.kick(message("r", "dagster", reply_to, lease=SHORT_LEASE,
                                  task_name=TASK_EXECUTE_JOB))
        await snapshot()

        step_messages, run_messages = steps.listen(), runs.listen()
        claimed = [await anext(step_messages) for _ in range(3)]
        await anext(run_messages)
        assert set(steps._held) == {"a", "b", "c"} and set(runs._held) == {"r"}
        await snapshot()
        assert await steps.heartbeat() == ([], [])
        renewed = time.monotonic()  # c's lease now ends SHORT_LEASE after this, r's earlier
        await snapshot()

        result = TaskiqResult(is_err=False, return_value="done", execution_time=0.1,
                              labels={REPLY_LABEL: reply_to})
        await backend.set_result("a", result)
        # A run's task has no waiter: its result is stored for the launcher's health check.
        await backend.set_result("run-a", result.model_copy(update={"labels": {}}))
        await claimed[0].ack()  # "a": the first by sequence on the preferred queue
        assert "a" not in steps._held
        await snapshot()

        await client.kick(message("d", "dagster", reply_to))
        assert await client.revoke(["d", "b"]) == {"d": "dropped", "b": "running:steps@h:1"}
        await snapshot()

        await asyncio.sleep(renewed + SHORT_LEASE + 0.3 - time.monotonic())  # c's and r's end
        assert sorted(await client.reap()) == ["c"]  # r, a run, is dropped
        await snapshot()
        assert await steps.release_held() == ["b"]  # c was requeued, so no longer ours
        await step_messages.aclose()
        await run_messages.aclose()
        await snapshot()

        worker = registry.WorkerInfo("w-1", "w", "h", 1, ["dagster"], 1, time.time())
        await registry.publish(steps.redis, prefix, worker)
        await registry.request_stop(steps.redis, prefix, worker.id)
        assert [w.id for w in await registry.live_workers(steps.redis, prefix)] == ["w-1"]
        await snapshot()

        replies = await backend.wait_replies(reply_to, 1.0)
        assert {(r.task_id, r.revoked_reason is None) for r in replies} == {
            ("a", True), ("d", False), ("r", False)}
        assert not await backend.is_result_ready("a")  # a step's result travels on its reply
        assert (await backend.get_result("run-a")).return_value == "done"
        await snapshot()
    finally:
        for part in parts:
            await part.shutdown()
    return seen


def assert_one_slot(seen: set[bytes], prefix: str, tag: str) -> None:
    names = sorted(k.decode() for k in seen)
    assert all(name.startswith(f"{prefix}:") for name in names), names
    assert {name.removeprefix(f"{prefix}:").split(":", 1)[0] for name in names} >= SEGMENTS
    assert {key_slot(k) for k in seen} == {key_slot(tag.encode())}, names


@pytest.mark.parametrize(("given", "prefix", "tag"), [
    (None, "{dagster-taskiq}", "dagster-taskiq"),
    ("team-a", "{team-a}", "team-a"),  # wrapped in braces
    ("{team}-a", "{team}-a", "team"),  # has a tag: kept as given
])
def test_every_key_of_a_workload_maps_to_one_slot(broker_url: str, given: str | None,
                                                  prefix: str, tag: str) -> None:
    options = {} if given is None else {"key_prefix": given}
    settings = BrokerSettings.from_config(broker_url, config_source=options)
    assert settings.key_prefix == prefix
    server = sync_redis(broker_url)

    async def keys() -> list[bytes]:
        return server.keys("*")  # the database was emptied for this test: all of it is ours

    seen = asyncio.run(exercise(settings, keys))
    assert_one_slot(seen, prefix, tag)
    assert set(server.keys("*")) <= seen


def test_a_reply_list_outside_the_prefix_is_refused(broker_url: str) -> None:
    settings = BrokerSettings.from_config(broker_url)

    async def kick() -> None:
        broker = RedisLeaseBroker(settings)
        try:
            await broker.kick(message("x", "dagster", "elsewhere:replies"))
        finally:
            await broker.shutdown()

    with pytest.raises(ValueError, match="not under the key prefix"):
        asyncio.run(kick())


# -- a real Redis Cluster -----------------------------------------------------------------


@pytest.fixture
def cluster_ports(redis_cluster: RedisClusterServers) -> list[int]:
    redis_cluster.flushall()
    return redis_cluster.ports


def cluster_url(ports: list[int]) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)


def test_every_script_runs_on_a_real_cluster(cluster_ports: list[int]) -> None:
    """The broker, results and registry on a cluster URL (``redis_client`` makes their
    RedisCluster clients); each part's own client runs its commands."""
    settings = BrokerSettings.from_config(cluster_url(cluster_ports))
    seen: set[bytes] = set()

    async def main() -> None:
        cluster = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in cluster_ports])
        try:
            await cluster.flushall(target_nodes=RedisCluster.PRIMARIES)

            async def keys() -> list[bytes]:
                return await cluster.keys("*", target_nodes=RedisCluster.PRIMARIES)

            seen.update(await exercise(settings, keys))
        finally:
            await cluster.aclose()

    asyncio.run(main())
    assert_one_slot(seen, settings.key_prefix, "dagster-taskiq")


def test_a_prefix_without_a_hash_tag_would_fail_on_a_cluster(cluster_ports: list[int]) -> None:
    """The control: the same submit with a tagless prefix (forced past the settings, which
    would wrap it) spans slots, and the cluster refuses it."""
    settings = BrokerSettings.from_config(cluster_url(cluster_ports))
    object.__setattr__(settings, "key_prefix", "dagster-taskiq")

    async def main() -> None:
        broker = RedisLeaseBroker(settings)
        try:
            with pytest.raises((RedisClusterException, ResponseError)):
                await broker.kick(message("x", "dagster", "dagster-taskiq:replies"))
        finally:
            await broker.shutdown()

    asyncio.run(main())
