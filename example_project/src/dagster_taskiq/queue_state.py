"""One read of the queues and the worker registry in Redis: what waits (by queue, kind and
priority), what is leased, who serves which queue. ``dagster-taskiq status`` (and ``--watch``)
print it, ``dagster-taskiq exporter`` turns it into Prometheus metrics; the key layout is
documented in ``broker.py`` and ``registry.py``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from dagster_taskiq.broker import RUN, STEP
from dagster_taskiq.registry import WorkerInfo, live_workers, server_time, serves

# Key segment under the prefix -> the kind of task waiting there.
SEGMENTS = {"queue": STEP, "runs": RUN}
KINDS = (STEP, RUN)


@dataclass
class QueueState:
    name: str
    # kind -> priority -> tasks waiting
    waiting: dict[str, Counter[int]] = field(
        default_factory=lambda: {kind: Counter() for kind in KINDS})
    # kind -> seconds the oldest waiting task has waited (0 when none)
    oldest_waiting: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    in_flight: Counter[str] = field(default_factory=Counter)  # kind -> leased tasks
    workers: list[WorkerInfo] = field(default_factory=list)  # live, not stopping

    @property
    def slots(self) -> int:
        return sum(w.concurrency for w in self.workers)

    @property
    def busy(self) -> int:
        """Steps running on the workers serving this queue (a worker on several queues counts
        in each)."""
        return sum(running_steps(w) for w in self.workers)


@dataclass
class ClusterState:
    queues: list[QueueState]  # by name
    workers: list[WorkerInfo]  # every live worker, stopping ones too


def running_steps(worker: WorkerInfo) -> int:
    # Entries from workers that predate "kind" count as steps.
    return sum(1 for task in worker.tasks if task.get("kind", STEP) == STEP)


async def read_state(redis: aioredis.Redis, prefix: str) -> ClusterState:
    """Every queue with waiting or leased tasks or a live worker. Waiting sets are read whole:
    this is for inspection and scrapes, not a hot path."""
    workers = await live_workers(redis, prefix)
    now_ms = await server_time(redis) * 1000
    queues: dict[str, QueueState] = {}

    def entry(queue: str) -> QueueState:
        if queue not in queues:
            queues[queue] = QueueState(queue)
        return queues[queue]

    # (queue, kind, id of its oldest waiting task): members start with the submission
    # sequence, so the smallest member of a set is its oldest task whatever its priority.
    oldest: list[tuple[QueueState, str, str]] = []
    escaped = re.sub(r"([*?\[\]\\])", r"\\\1", prefix)
    for segment, kind in SEGMENTS.items():
        async for key in redis.scan_iter(match=f"{escaped}:{segment}:*", _type="zset"):
            state = entry(key.decode()[len(f"{prefix}:{segment}:"):])
            members = await redis.zrange(key, 0, -1, withscores=True)
            for _, score in members:
                state.waiting[kind][int(-score)] += 1
            if members:
                first = min(member for member, _ in members).decode()
                oldest.append((state, kind, first.split("|", 1)[1]))
    for w in workers:
        for queue in w.queues:
            entry(queue)

    leased = [m.decode() for m in await redis.zrange(f"{prefix}:leases", 0, -1)]
    async with redis.pipeline(transaction=False) as pipe:
        for task_id in leased:
            pipe.hget(f"{prefix}:task:{task_id}", "zset")
        for _, _, task_id in oldest:
            pipe.hget(f"{prefix}:task:{task_id}", "enqueued_ms")
        replies = await pipe.execute()
    for zset in replies[:len(leased)]:
        if zset is None:
            continue  # acknowledged between the two reads
        # "<prefix>:queue:<q>" (a step) or "<prefix>:runs:<q>" (a run)
        segment, _, queue = zset.decode().removeprefix(f"{prefix}:").partition(":")
        entry(queue).in_flight[SEGMENTS.get(segment, STEP)] += 1
    for (state, kind, _), enqueued in zip(oldest, replies[len(leased):], strict=True):
        if enqueued is not None:  # claimed or dropped meanwhile: not waiting any more
            state.oldest_waiting[kind] = max(0.0, (now_ms - float(enqueued)) / 1000)
    for state in queues.values():
        state.workers = serves(workers, state.name)
    return ClusterState([queues[name] for name in sorted(queues)], workers)


def waiting_text(by_priority: Mapping[int, int]) -> str:
    """``4 [p10:1 p5:2 p-2:1]``: the total, then the count per priority, highest first."""
    total = sum(by_priority.values())
    if not total:
        return "0"
    levels = " ".join(f"p{p}:{n}" for p, n in sorted(by_priority.items(), reverse=True))
    return f"{total} [{levels}]"


def status_report(state: ClusterState) -> dict[str, Any]:
    """``dagster-taskiq status --json``'s shape (kinds named steps/runs, priorities highest
    first)."""
    plural = {STEP: "steps", RUN: "runs"}
    return {
        "queues": [
            {
                "queue": q.name,
                "waiting": {
                    plural[kind]: {
                        "total": sum(counts.values()),
                        "by_priority": {str(p): n for p, n in sorted(counts.items(),
                                                                      reverse=True)},
                    }
                    for kind, counts in q.waiting.items()
                },
                "in_flight": {plural[kind]: q.in_flight[kind] for kind in KINDS},
                "workers": [{"name": w.name, "id": w.id, "heartbeat_age": round(w.age, 3)}
                            for w in q.workers],
            }
            for q in state.queues
        ],
        "workers": len(state.workers),
    }
