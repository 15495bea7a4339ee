"""A bare consumer of our broker, for broker tests: ``python consumer.py URL NAME QUEUES CONC``.

Its ``record`` task appends ``start|end:<tag>:<name>`` to the Redis list ``trace`` (so tests see
who ran what, in which order) and sleeps in between if asked.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from redis.asyncio import Redis
from taskiq.receiver import Receiver

from dagster_taskiq.broker import RedisLeaseBroker, redis_client
from dagster_taskiq.config import BrokerSettings, parse_redis_url
from dagster_taskiq.results import RedisReplyBackend

TRACE = "trace"


def _trace_client(url: str, settings: BrokerSettings) -> Any:
    """The trace's writer. On a cluster, a plain client of the node that serves the trace key:
    redis-py's cluster client retries a write whose answer it lost (and, with 40 coroutines on
    a loaded machine, once failed a write with an AttributeError), which would put duplicate
    or missing entries in the very record the tests judge the broker by."""
    target = parse_redis_url(url)
    if target.kind != "cluster":
        return redis_client(url, settings)
    from redis.cluster import RedisCluster

    host, port = target.nodes[0]
    with RedisCluster(host=host, port=port) as cluster:
        node = cluster.get_node_from_key(TRACE)
    return Redis(host=node.host, port=node.port)


def make_broker(url: str, queues: list[str], holder: str) -> RedisLeaseBroker:
    settings = BrokerSettings.from_config(url)
    broker = RedisLeaseBroker(settings, queues=queues, holder=holder, heartbeat_seconds=0.2)
    broker = broker.with_result_backend(RedisReplyBackend(settings))
    trace = _trace_client(url, settings)

    @broker.task(task_name="record")
    async def record(tag: str, seconds: float = 0.0) -> str:
        await trace.rpush(TRACE, f"start:{tag}:{holder}")
        if seconds:
            await asyncio.sleep(seconds)
        await trace.rpush(TRACE, f"end:{tag}:{holder}")
        return tag

    return broker


async def main(url: str, name: str, queues: str, concurrency: int) -> None:
    broker = make_broker(url, queues.split(","), name)
    broker.is_worker_process = True
    await broker.startup()
    finish = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, finish.set)
    print("consuming", flush=True)
    await Receiver(broker, max_async_tasks=concurrency, run_startup=False).listen(finish)
    await broker.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
