"""The sending side, for synchronous callers (the executor's loop, the run launcher, the CLI):
submit tasks, wait for their replies, revoke them, and look at queues and workers.

Every call rides out a Redis outage (a restart, a failover) with backoff for up to
``OUTAGE_SECONDS`` before giving up with a clear error, so a blip never fails a run and a dead
broker never hangs one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from taskiq.exceptions import SendTaskError
from taskiq.result import TaskiqResult

from dagster_taskiq.app import SyncBridge, make_app
from dagster_taskiq.broker import REDIS_ERRORS, Backoff, BrokerUnavailable, RedisLeaseBroker
from dagster_taskiq.config import BrokerSettings, mask_url
from dagster_taskiq.registry import WorkerInfo, live_workers
from dagster_taskiq.results import Reply

T = TypeVar("T")

OUTAGE_SECONDS = 300.0


class TaskiqClient:
    def __init__(self, settings: BrokerSettings, patience: float = OUTAGE_SECONDS) -> None:
        """``patience``: how long each call rides out an outage before giving up."""
        self.settings = settings
        self.patience = patience
        self._bridge = SyncBridge()
        self.broker = make_app(settings)
        self.redis_mode = isinstance(self.broker, RedisLeaseBroker)

    def start(self) -> None:
        """Connect, or raise :class:`BrokerUnavailable` within ``connect_timeout``."""
        self._bridge.run(self.broker.startup())

    def close(self) -> None:
        try:
            self._bridge.run(self.broker.shutdown())
        finally:
            self._bridge.close()

    def _call(self, make: Callable[[], Awaitable[T]], patience: float | None = None) -> T:
        async def attempt() -> T:
            backoff = Backoff()
            deadline = time.monotonic() + (self.patience if patience is None else patience)
            while True:
                try:
                    return await make()
                except REDIS_ERRORS as exc:
                    if time.monotonic() > deadline:
                        raise BrokerUnavailable(self.settings.broker_url, exc) from None
                    await backoff.wait()

        return self._bridge.run(attempt())

    def send(self, task_name: str, args: list[Any], labels: dict[str, Any],
             task_id: str | None = None) -> str:
        task = self.broker.find_task(task_name)
        assert task is not None, f"{task_name} is registered by make_app"
        # The id is fixed before the first attempt: a retry after a lost reply sends the same
        # task again, which the broker ignores, instead of a second copy.
        kicker = task.kicker().with_labels(**labels).with_task_id(task_id or uuid.uuid4().hex)

        async def kick() -> str:
            try:
                return (await kicker.kiq(*args)).task_id
            except SendTaskError as exc:
                # taskiq wraps the broker's error: a Redis blip is retried like any other call.
                if isinstance(exc.__cause__, REDIS_ERRORS):
                    raise exc.__cause__ from None
                raise

        return self._call(kick)

    def wait(self, reply_to: str, timeout: float) -> list[Reply]:
        """Replies that arrived on ``reply_to``, waiting up to ``timeout`` for the first one.
        Also hands expired leases back to their queues, so no task depends on traffic to be
        recovered."""
        async def wait() -> list[Reply]:
            if isinstance(self.broker, RedisLeaseBroker):
                await self.broker.reap_if_due()
            return await self.broker.result_backend.wait_replies(reply_to, timeout)

        return self._call(wait)

    def discard(self, reply_to: str) -> None:
        """Drop a reply list nobody will read (cleanup: gives up quickly)."""
        self._call(lambda: self.broker.result_backend.discard_replies(reply_to), patience=5)

    def revoke(self, task_ids: list[str], patience: float | None = None) -> dict[str, str]:
        if not isinstance(self.broker, RedisLeaseBroker) or not task_ids:
            return {}
        broker = self.broker
        return self._call(lambda: broker.revoke(task_ids), patience)

    def reap(self) -> None:
        if isinstance(self.broker, RedisLeaseBroker):
            broker = self.broker
            self._call(broker.reap)

    def task_state(self, task_id: str) -> dict[str, str]:
        assert isinstance(self.broker, RedisLeaseBroker)
        broker = self.broker
        return self._call(lambda: broker.task_state(task_id))

    def result(self, task_id: str) -> TaskiqResult[Any] | None:
        backend = self.broker.result_backend

        async def get() -> TaskiqResult[Any] | None:
            if not await backend.is_result_ready(task_id):
                return None
            return await backend.get_result(task_id)

        return self._call(get)

    def workers(self) -> list[WorkerInfo] | None:
        """Live workers (None in eager mode, where there are none to ask)."""
        if not isinstance(self.broker, RedisLeaseBroker):
            return None
        broker = self.broker
        return self._call(lambda: live_workers(broker.redis, self.settings.key_prefix))

    def vanished(self, task_ids: list[str]) -> list[str]:
        """Those of ``task_ids`` the broker no longer holds: acknowledged, dropped, or lost with
        Redis's data. (A result is pushed before its task is acknowledged, so the reply of one
        that finished is on the reply list already, unless Redis lost it.)"""
        return [tid for tid, (zset, _) in self._queue_states(task_ids).items() if zset is None]

    def still_queued(self, task_ids: list[str]) -> list[str]:
        """Those of ``task_ids`` that wait in a queue (not taken by any worker yet)."""
        return [tid for tid, (zset, holder) in self._queue_states(task_ids).items()
                if zset is not None and holder is None]

    def _queue_states(self, task_ids: list[str]) -> dict[str, tuple[Any, Any]]:
        """Each task's queue and holder in the broker (``None`` for what it does not have; a
        task the broker does not hold at all has no queue)."""
        if not isinstance(self.broker, RedisLeaseBroker) or not task_ids:
            return {}
        broker = self.broker

        async def fetch() -> list[Any]:
            async with broker.redis.pipeline(transaction=False) as pipe:
                for task_id in task_ids:
                    pipe.hmget(f"{self.settings.key_prefix}:task:{task_id}", "zset", "holder")
                return await pipe.execute()

        return dict(zip(task_ids, map(tuple, self._call(fetch)), strict=True))

    def describe(self) -> str:
        return mask_url(self.settings.broker_url)
