"""``dagster-taskiq status --watch``: a live terminal view of the queues, the workers and what
they run, redrawn from one :func:`~dagster_taskiq.queue_state.read_state` per interval (for
people without Grafana)."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dagster_taskiq.broker import REDIS_ERRORS, RUN, STEP
from dagster_taskiq.config import BrokerSettings, mask_url
from dagster_taskiq.queue_state import ClusterState, read_state, running_steps, waiting_text


def _seconds(value: float) -> str:
    return f"{value:.1f}s"


def _row(table: Table, *cells: str | Text) -> None:
    # Plain text, not markup: "[p5:2]" and user-chosen queue names must print as they are.
    table.add_row(*(cell if isinstance(cell, Text) else Text(cell) for cell in cells))


def render(state: ClusterState, broker: str, error: str | None = None) -> RenderableType:
    """The view: a header line, then queues, workers and running tasks as tables."""
    header = Text(f"Broker {broker}: {len(state.workers)} live worker(s). "
                  f"{time.strftime('%H:%M:%S')}  (Ctrl-C to quit)", style="bold")
    parts: list[RenderableType] = [header]
    if error:
        parts.append(Text(f"Cannot read the broker: {error}; retrying.", style="bold red"))

    queues = Table(title="Queues", title_justify="left", expand=False)
    for column in ("QUEUE", "STEPS WAITING", "RUNS WAITING", "OLDEST", "IN FLIGHT",
                   "BUSY/SLOTS", "WORKERS"):
        queues.add_column(column)
    for q in state.queues:
        oldest = max(q.oldest_waiting.values())
        _row(
            queues, q.name, waiting_text(q.waiting[STEP]), waiting_text(q.waiting[RUN]),
            _seconds(oldest) if oldest else "-",
            f"{q.in_flight[STEP]} steps, {q.in_flight[RUN]} runs",
            f"{q.busy}/{q.slots}",
            ", ".join(w.name for w in q.workers) or Text("no live worker", style="red"))
    parts.append(queues if state.queues else Text("No queues: nothing waiting and no live "
                                                  "workers."))

    workers = Table(title="Workers", title_justify="left")
    for column in ("NAME", "HOST", "PID", "QUEUES", "STEPS/SLOTS", "HEARTBEAT", "STATE"):
        workers.add_column(column)
    tasks = Table(title="Running", title_justify="left")
    for column in ("WORKER", "TASK", "PID", "FOR"):
        tasks.add_column(column)
    now = time.time()
    for w in state.workers:
        _row(workers, w.name, w.host, str(w.pid), ",".join(w.queues),
             f"{running_steps(w)}/{w.concurrency}", f"{_seconds(w.age)} ago",
             "stopping" if w.stop_requested else "live")
        for task in w.tasks:
            _row(tasks, w.name, str(task.get("what", "?")), str(task.get("pid", "?")),
                 _seconds(max(0.0, now - float(task.get("started", now)))))
    if state.workers:
        parts.append(workers)
    if tasks.row_count:
        parts.append(tasks)
    return Group(*parts)


async def watch_status(redis: aioredis.Redis, settings: BrokerSettings, interval: float) -> None:
    """Redraw every ``interval`` seconds until cancelled (Ctrl-C). A broker that stops
    answering is shown, and retried, rather than ending the view."""
    broker = mask_url(settings.broker_url)
    state = ClusterState([], [])
    with Live(render(state, broker), auto_refresh=False, redirect_stderr=False) as live:
        while True:
            error = None
            try:
                state = await asyncio.wait_for(read_state(redis, settings.key_prefix),
                                               max(5.0, interval))
            except REDIS_ERRORS as exc:
                error = f"{type(exc).__name__}: {exc}"
            live.update(render(state, broker, error), refresh=True)
            await asyncio.sleep(interval)
