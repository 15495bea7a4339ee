"""The broker factory (celery's ``make_app``), and the bridge synchronous callers use.

Real mode: :class:`RedisLeaseBroker` with :class:`RedisReplyBackend`. Eager mode
(``config_source: {task_always_eager: true}``): taskiq's in-memory broker, which runs every task
in this process as it is sent, through the same message format and task code.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from taskiq import AsyncBroker, InMemoryBroker

from dagster_taskiq.broker import STEP, RedisLeaseBroker
from dagster_taskiq.config import DEFAULT_QUEUE, BrokerSettings
from dagster_taskiq.results import EagerReplyBackend, RedisReplyBackend
from dagster_taskiq.tasks import InlineStepRunner, register_tasks

T = TypeVar("T")


def make_app(
    settings: BrokerSettings,
    queues: Sequence[str] = (DEFAULT_QUEUE,),
    holder: str = "client",
    kind: str = STEP,
) -> AsyncBroker:
    broker: AsyncBroker
    if settings.task_always_eager:
        broker = InMemoryBroker(await_inplace=True, max_stored_results=1000)
        broker.result_backend = EagerReplyBackend()
        broker.state.step_runner = InlineStepRunner()
    else:
        broker = RedisLeaseBroker(settings, queues=queues, holder=holder, kind=kind)
        broker = broker.with_result_backend(RedisReplyBackend(settings))
    register_tasks(broker)
    return broker


class SyncBridge:
    """A private asyncio loop on its own thread, so synchronous code (the executor, the run
    launcher, the CLI) can await taskiq calls whether or not its thread already runs a loop."""

    def __init__(self, name: str = "dagster-taskiq") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result()

    def close(self) -> None:
        self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()
