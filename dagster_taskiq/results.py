"""Result backends that push each result to the process waiting for it.

taskiq's own backends are polled (one EXISTS per task per tick) and pickle by default. Ours
append a step's result (JSON) to its ``reply_to`` list, so the orchestrator wakes on a single
BLPOP per run the moment any step finishes; nothing else is kept of it. A task without a waiter
(a run, launched by the run launcher) has its result stored under ``<prefix>:result:<id>`` with
a TTL instead, where the launcher's health check reads the run's exit code.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

from taskiq.abc.result_backend import AsyncResultBackend
from taskiq.brokers.inmemory_broker import InmemoryResultBackend
from taskiq.result import TaskiqResult

from dagster_taskiq.broker import REDIS_ERRORS, REPLY_LABEL, Backoff, redis_client
from dagster_taskiq.config import BrokerSettings, mask_url

logger = logging.getLogger("dagster_taskiq.results")


@dataclass(frozen=True)
class Reply:
    """What the orchestrator receives for one task: its result, or why it will never have one."""

    task_id: str
    result: TaskiqResult[Any] | None
    revoked_reason: str | None = None
    lost: bool = False  # its worker died or left (not revoked by the orchestrator)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Reply:
        data = json.loads(raw)
        if data.get("revoked"):
            reason = str(data.get("reason") or "revoked")
            return cls(data["task_id"], None, reason, bool(data.get("lost")))
        return cls(data["task_id"], TaskiqResult.model_validate(data["result"]))


class RedisReplyBackend(AsyncResultBackend[Any]):
    """Results pushed to the waiter's reply list, or stored (JSON, with a TTL) without one."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self._redis = redis_client(settings.backend_url, settings)
        self._closing = False

    def _result_key(self, task_id: str) -> str:
        return f"{self.settings.key_prefix}:result:{task_id}"

    async def shutdown(self) -> None:
        self._closing = True
        await self._redis.aclose()

    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        # taskiq acknowledges the message even when saving fails, which would lose the result
        # for good: so keep trying through a Redis outage.
        body = result.model_dump(mode="json")
        ttl = self.settings.result_ttl_seconds
        reply_to = str(result.labels.get(REPLY_LABEL) or "")
        backoff = Backoff()
        while True:
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    if reply_to:
                        pipe.rpush(reply_to, json.dumps({"task_id": task_id, "result": body}))
                        pipe.expire(reply_to, ttl)
                    else:
                        pipe.set(self._result_key(task_id), json.dumps(body), ex=ttl)
                    await pipe.execute()
                return
            except REDIS_ERRORS as exc:
                if self._closing:
                    raise
                logger.warning(
                    "Cannot store the result of %s in %s (%s); retrying.",
                    task_id,
                    mask_url(self.settings.backend_url),
                    exc,
                )
                await backoff.wait()

    async def is_result_ready(self, task_id: str) -> bool:
        return bool(await self._redis.exists(self._result_key(task_id)))

    async def get_result(self, task_id: str, with_logs: bool = False) -> TaskiqResult[Any]:
        raw = await self._redis.get(self._result_key(task_id))
        if raw is None:
            raise KeyError(f"No result stored for task {task_id}.")
        return TaskiqResult.model_validate_json(raw)

    async def wait_replies(self, reply_to: str, timeout: float) -> list[Reply]:
        """Block up to ``timeout`` seconds for the next reply, then take all that are waiting."""
        first = await self._redis.blpop([reply_to], timeout=timeout)
        if first is None:
            return []
        rest = await self._redis.lpop(reply_to, 1000) or []
        return [Reply.from_json(raw) for raw in [first[1], *rest]]

    async def discard_replies(self, reply_to: str) -> None:
        await self._redis.delete(reply_to)


class EagerReplyBackend(InmemoryResultBackend[Any]):
    """The in-process twin for ``task_always_eager``: results are ready when ``kiq`` returns."""

    def __init__(self) -> None:
        super().__init__(max_stored_results=1000)
        self._replies: defaultdict[str, deque[Reply]] = defaultdict(deque)

    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        await super().set_result(task_id, result)
        reply_to = str(result.labels.get(REPLY_LABEL) or "")
        if reply_to:
            self._replies[reply_to].append(Reply(task_id, result))

    async def wait_replies(self, reply_to: str, timeout: float) -> list[Reply]:
        waiting = self._replies.pop(reply_to, deque())
        return list(waiting)

    async def discard_replies(self, reply_to: str) -> None:
        self._replies.pop(reply_to, None)
