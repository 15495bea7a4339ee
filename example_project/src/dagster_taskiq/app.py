"""The broker factory (celery's ``make_app``): a taskiq broker with our tasks registered.

Real mode: :class:`RedisLeaseBroker` with :class:`RedisReplyBackend`. Eager mode
(``config_source: {task_always_eager: true}``): taskiq's in-memory broker, which runs every task
in this process as it is sent, through the same message format and task code.
"""

from __future__ import annotations

from collections.abc import Sequence

from taskiq import AsyncBroker, InMemoryBroker

from dagster_taskiq.broker import RedisLeaseBroker
from dagster_taskiq.config import DEFAULT_QUEUE, BrokerSettings
from dagster_taskiq.results import EagerReplyBackend, RedisReplyBackend
from dagster_taskiq.tasks import InlineStepRunner, register_tasks


def make_app(
    settings: BrokerSettings,
    queues: Sequence[str] = (DEFAULT_QUEUE,),
    holder: str = "client",
) -> AsyncBroker:
    broker: AsyncBroker
    if settings.task_always_eager:
        broker = InMemoryBroker(await_inplace=True, max_stored_results=1000)
        broker.result_backend = EagerReplyBackend()
        broker.state.step_runner = InlineStepRunner()
    else:
        broker = RedisLeaseBroker(settings, queues=queues, holder=holder)
        broker = broker.with_result_backend(RedisReplyBackend(settings))
    register_tasks(broker)
    return broker
