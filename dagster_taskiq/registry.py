"""The worker registry: who is alive, where, on which queues, doing what (taskiq has no
control plane, so workers publish themselves in Redis every second).

- ``<prefix>:workers``          sorted set: worker id -> last heartbeat (ms, the Redis server's
  clock, so a worker whose host clock is off is neither dead early nor alive forever); entries
  older than ``FORGET_AFTER_SECONDS`` are pruned by every heartbeat
- ``<prefix>:worker:<id>``      hash: name, host, pid, queues, concurrency, started, heartbeat,
  tasks (JSON), and ``stop`` once someone asked the worker to shut down gracefully; it expires
  once its worker stops heartbeating.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis

STALE_AFTER_SECONDS = 10.0  # no heartbeat for this long: the worker counts as gone
FORGET_AFTER_SECONDS = 3600.0  # and its id leaves the registry's sorted set after this long


async def server_time(redis: aioredis.Redis) -> float:
    """The Redis server's clock, in seconds: the one clock every worker and client shares."""
    seconds, microseconds = await redis.time()
    return seconds + microseconds / 1_000_000


@dataclass
class WorkerInfo:
    id: str
    name: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    started: float
    heartbeat: float = 0.0
    tasks: list[dict[str, Any]] = field(default_factory=list)
    stop_requested: bool = False

    @property
    def age(self) -> float:
        """Seconds since its last heartbeat (``live_workers`` puts ``heartbeat`` on this host's
        clock)."""
        return max(0.0, time.time() - self.heartbeat)

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> WorkerInfo:
        data = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            id=data["id"],
            name=data["name"],
            host=data["host"],
            pid=int(data["pid"]),
            queues=json.loads(data["queues"]),
            concurrency=int(data["concurrency"]),
            started=float(data["started"]),
            heartbeat=float(data["heartbeat"]),
            tasks=json.loads(data.get("tasks") or "[]"),
            stop_requested="stop" in data,
        )


def _workers_key(prefix: str) -> str:
    return f"{prefix}:workers"


def _worker_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}:worker:{worker_id}"


async def publish(redis: aioredis.Redis, prefix: str, info: WorkerInfo) -> bool:
    """Record a heartbeat. Returns True if someone asked this worker to stop."""
    info.heartbeat = await server_time(redis)
    fields = asdict(info)
    fields.pop("stop_requested")
    fields["queues"] = json.dumps(info.queues)
    fields["tasks"] = json.dumps(info.tasks)
    key = _worker_key(prefix, info.id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
        pipe.expire(key, int(STALE_AFTER_SECONDS * 6))
        pipe.zadd(_workers_key(prefix), {info.id: int(info.heartbeat * 1000)})
        forget_before = int((info.heartbeat - FORGET_AFTER_SECONDS) * 1000)
        pipe.zremrangebyscore(_workers_key(prefix), "-inf", forget_before)
        # HGET, not HEXISTS: redis-py's cluster transactions fail on HEXISTS's reply parsing.
        pipe.hget(key, "stop")
        *_, stop = await pipe.execute()
    return stop is not None


async def remove(redis: aioredis.Redis, prefix: str, worker_id: str) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(_worker_key(prefix, worker_id))
        pipe.zrem(_workers_key(prefix), worker_id)
        await pipe.execute()


async def live_workers(
    redis: aioredis.Redis, prefix: str, stale_after: float = STALE_AFTER_SECONDS
) -> list[WorkerInfo]:
    """Workers that heartbeated within ``stale_after`` seconds (server time), by name."""
    now = await server_time(redis)
    cutoff = int((now - stale_after) * 1000)
    ids = await redis.zrangebyscore(_workers_key(prefix), cutoff, "+inf")
    async with redis.pipeline(transaction=False) as pipe:
        for worker_id in ids:
            pipe.hgetall(_worker_key(prefix, worker_id.decode()))
        hashes = await pipe.execute()
    workers = [WorkerInfo.from_hash(raw) for raw in hashes if raw]
    skew = time.time() - now  # heartbeats on this host's clock, for ages and display
    for worker in workers:
        worker.heartbeat += skew
    return sorted(workers, key=lambda w: (w.name, w.id))


async def request_stop(redis: aioredis.Redis, prefix: str, worker_id: str) -> None:
    await redis.hset(_worker_key(prefix, worker_id), "stop", "1")


def serves(workers: list[WorkerInfo], queue: str) -> list[WorkerInfo]:
    return [w for w in workers if queue in w.queues and not w.stop_requested]
