"""A bare consumer of our broker, for broker tests: ``python consumer.py URL NAME QUEUES CONC``.

Its ``record`` task appends ``start|end:<tag>:<name>`` to the Redis list ``trace`` (so tests see
who ran what, in which order) and sleeps in between if asked.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from taskiq.receiver import Receiver

from dagster_taskiq.broker import RedisLeaseBroker, redis_client
from dagster_taskiq.config import BrokerSettings
from dagster_taskiq.results import RedisReplyBackend

TRACE = "trace"


def make_broker(url: str, queues: list[str], holder: str) -> RedisLeaseBroker:
    settings = BrokerSettings.from_config(url)
    broker = RedisLeaseBroker(settings, queues=queues, holder=holder, heartbeat_seconds=0.2)
    broker = broker.with_result_backend(RedisReplyBackend(settings))
    trace = redis_client(url, settings)  # a cluster URL too

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
