"""Prometheus metrics: a worker's own (``worker start --metrics-port``) and the cluster's
(``dagster-taskiq exporter``, read from Redis on each scrape). The names and labels are a
contract with the shipped dashboard, alerts and KEDA queries (README, Metrics): labels are
queue, kind, priority, job, worker and outcome, never a run id, task id or step key.

A worker without ``--metrics-port`` creates none of this: its brokers' ``metrics`` hook stays
unset and no middleware is added, so tasks pay nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from taskiq import TaskiqMessage, TaskiqMiddleware, TaskiqResult
from taskiq.exceptions import NoResultError

from dagster_taskiq.broker import QUEUE_LABEL, REDIS_ERRORS, RUN, STEP, redis_client
from dagster_taskiq.config import DEFAULT_QUEUE, BrokerSettings, mask_url

if TYPE_CHECKING:
    from dagster_taskiq.queue_state import ClusterState

logger = logging.getLogger("dagster_taskiq.metrics")

PREFIX = "dagster_taskiq"
OUTCOMES = ("success", "failure", "crashed", "interrupted", "skipped", "released")
JOB_LABEL = "job"  # set by the run launcher on run tasks; steps carry their job pointer
UNKNOWN_JOB = "unknown"
DEFAULT_EXPORTER_PORT = 9808

# Steps and runs last from well under a second to hours; queue waits from milliseconds.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
                    7200, 21600, float("inf"))
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900,
                3600, float("inf"))

# How a serialized DagsterEvent names a step failure (serdes writes sorted keys with ": ").
_STEP_FAILURE = '"event_type_value": "STEP_FAILURE"'


def serve(registry: CollectorRegistry, host: str, port: int) -> Any:
    """Serve ``/metrics`` from a daemon thread; returns the server (``.shutdown()``)."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server


# -- per worker -------------------------------------------------------------------------------

class WorkerMetrics:
    """The metrics of one worker process (its step and run consumers share them)."""

    def __init__(self, worker: str, queues: Sequence[str], concurrency: int) -> None:
        self.worker = worker
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_* (RSS, CPU, open fds)
        r = self.registry

        def name(suffix: str) -> str:
            return f"{PREFIX}_{suffix}"

        self.up = Gauge(name("worker_up"), "1 while the worker runs.", ["worker"], registry=r)
        self.concurrency = Gauge(name("worker_concurrency"), "The worker's step slots.",
                                 ["worker"], registry=r)
        self.busy = Gauge(name("worker_busy"), "Tasks the worker is running now.",
                          ["worker", "kind"], registry=r)
        self.received = Counter(name("tasks_received"), "Tasks claimed.", ["queue", "kind"],
                                registry=r)
        self.renewals = Counter(name("lease_renewals"), "Heartbeats that pushed a lease "
                                "forward.", ["queue"], registry=r)
        self.expiries = Counter(name("lease_expiries"), "Leases this worker lost (fenced "
                                "itself, or found its task taken).", ["queue"], registry=r)
        self.redeliveries = Counter(name("redeliveries"), "Tasks received again after an "
                                    "earlier delivery was lost (not handed back).", ["queue"],
                                    registry=r)
        self.lost_steps = Counter(name("lost_steps"), "Steps whose process died before "
                                  "reporting (reported crashed).", ["queue"], registry=r)
        self.step_duration = Histogram(name("step_duration_seconds"), "A step task's run time "
                                       "on the worker.", ["queue", "dagster_job"],
                                       buckets=DURATION_BUCKETS, registry=r)
        self.run_duration = Histogram(name("run_duration_seconds"), "A run task's "
                                      "(orchestrator's) run time on the worker.",
                                      ["queue", "dagster_job"], buckets=DURATION_BUCKETS,
                                      registry=r)
        self.queue_wait = Histogram(name("queue_wait_seconds"), "From a task's submission to "
                                    "its claim by this worker.", ["queue", "dagster_job"],
                                    buckets=WAIT_BUCKETS, registry=r)
        self.outcomes = Counter(name("task_outcomes"), "Tasks ended, by outcome.",
                                ["queue", "kind", "outcome"], registry=r)
        self.up.labels(worker).set(1)
        self.concurrency.labels(worker).set(concurrency)
        # Every series of the queues served exists from the start (at 0), so rates and sums
        # over them have data before the first task.
        for kind in (STEP, RUN):
            self.busy.labels(worker, kind)
        for queue in queues:
            for counter in (self.renewals, self.expiries, self.redeliveries, self.lost_steps):
                counter.labels(queue)
            for kind in (STEP, RUN):
                self.received.labels(queue, kind)
                for outcome in OUTCOMES:
                    self.outcomes.labels(queue, kind, outcome)
        # task id -> (queue, seconds it waited): from its claim until its lease is let go.
        self.claims: dict[str, tuple[str, float]] = {}
        self.started: dict[str, float] = {}  # task id -> monotonic start on this worker

    # The broker's hooks (:class:`~dagster_taskiq.broker.LeaseMetrics`).
    def claimed(self, task_id: str, queue: str, kind: str, redelivered: bool,
                waited: float) -> None:
        self.claims[task_id] = (queue, waited)
        self.received.labels(queue, kind).inc()
        if redelivered:
            self.redeliveries.labels(queue).inc()

    def renewed(self, task_id: str) -> None:
        self.renewals.labels(self.queue_of(task_id, None)).inc()

    def expired(self, task_id: str) -> None:
        self.expiries.labels(self.queue_of(task_id, None)).inc()

    def forgotten(self, task_id: str) -> None:
        self.claims.pop(task_id, None)

    def queue_of(self, task_id: str, message: TaskiqMessage | None) -> str:
        claim = self.claims.get(task_id)
        if claim is not None:
            return claim[0]
        if message is not None:
            return str(message.labels.get(QUEUE_LABEL) or DEFAULT_QUEUE)
        return DEFAULT_QUEUE

    def middleware(self, kind: str) -> TaskiqMiddleware:
        return _TaskMetrics(self, kind)

    def stopped(self) -> None:
        self.up.labels(self.worker).set(0)


def job_of(message: TaskiqMessage) -> str:
    """The job's name from what the task carries (never a lookup): the launcher's ``job``
    label on runs, the job pointer (a packed ReconstructableJob) on steps."""
    job = message.labels.get(JOB_LABEL)
    if job:
        return str(job)
    if len(message.args) > 1 and isinstance(message.args[1], dict):
        pointer = message.args[1]  # serdes stores a job's name under its legacy field name
        return str(pointer.get("pipeline_name") or pointer.get("job_name") or UNKNOWN_JOB)
    return UNKNOWN_JOB


def outcome_of(kind: str, result: TaskiqResult[Any]) -> str:
    if result.is_err:
        return "released" if isinstance(result.error, NoResultError) else "failure"
    outcome = result.return_value
    if not isinstance(outcome, dict):
        return "failure"
    if outcome.get("skipped"):
        return "skipped"
    if outcome.get("interrupted"):
        return "interrupted"
    if outcome.get("crashed"):
        return "crashed"
    if outcome.get("error"):
        return "failure"
    if kind == RUN:
        return "failure" if outcome.get("exit_code") else "success"
    events = outcome.get("events") or ()
    return "failure" if any(_STEP_FAILURE in event for event in events) else "success"


class _TaskMetrics(TaskiqMiddleware):
    """Times each task of one consumer (steps or runs) and counts how it ended."""

    def __init__(self, metrics: WorkerMetrics, kind: str) -> None:
        super().__init__()
        self.metrics = metrics
        self.kind = kind
        self.busy = metrics.busy.labels(metrics.worker, kind)
        self.duration = metrics.step_duration if kind == STEP else metrics.run_duration

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        metrics = self.metrics
        metrics.started[message.task_id] = time.monotonic()
        self.busy.inc()
        claim = metrics.claims.get(message.task_id)
        if claim is not None:
            metrics.queue_wait.labels(claim[0], job_of(message)).observe(claim[1])
        return message

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        metrics = self.metrics
        started = metrics.started.pop(message.task_id, None)
        self.busy.dec()
        queue = metrics.queue_of(message.task_id, message)
        outcome = outcome_of(self.kind, result)
        metrics.outcomes.labels(queue, self.kind, outcome).inc()
        if outcome == "crashed" and self.kind == STEP:
            metrics.lost_steps.labels(queue).inc()
        if started is not None and outcome != "released":
            self.duration.labels(queue, job_of(message)).observe(time.monotonic() - started)


# -- cluster-wide (the exporter) --------------------------------------------------------------

class ClusterCollector(Collector):
    """Reads the queues and the worker registry from Redis on each scrape (through
    :func:`~dagster_taskiq.queue_state.read_state`, the same read as ``status``). Each scrape
    connects anew (in the scraping thread, on an event loop of its own): scrapes come every
    few seconds, and nothing is left half-open between them."""

    def __init__(self, settings: BrokerSettings, timeout: float = 10.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self.errors = 0
        self._lock = threading.Lock()

    async def _read(self) -> ClusterState:
        from dagster_taskiq.queue_state import read_state

        redis = redis_client(self.settings.broker_url, self.settings)
        try:
            return await asyncio.wait_for(read_state(redis, self.settings.key_prefix),
                                          self.timeout)
        finally:
            await redis.aclose()

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked collector: registering it does not read Redis

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}_redis_up",
                               "1 when the exporter's last read of Redis succeeded.")
        state: ClusterState | None
        try:
            state = asyncio.run(self._read())
        except (*REDIS_ERRORS, RedisError) as exc:  # TimeoutError too
            with self._lock:  # scrapes may overlap (one thread each)
                self.errors += 1
            logger.warning("Cannot read the broker at %s (%r).",
                           mask_url(self.settings.broker_url), exc)
            state = None
        up.add_metric([], 0 if state is None else 1)
        errors = CounterMetricFamily(f"{PREFIX}_exporter_scrape_errors",
                                     "Failed Redis reads by the exporter.")
        errors.add_metric([], self.errors)
        yield up
        yield errors
        if state is None:
            return

        def gauge(suffix: str, help_text: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{suffix}", help_text, labels=labels)

        waiting = gauge("queue_waiting_tasks", "Tasks waiting in a queue, by kind and priority.",
                        ["queue", "kind", "priority"])
        inflight = gauge("queue_inflight_tasks", "Leased (running) tasks that came from a "
                         "queue.", ["queue", "kind"])
        oldest = gauge("queue_oldest_waiting_seconds", "Age of a queue's oldest waiting task "
                       "(0 when none).", ["queue", "kind"])
        live = gauge("workers_live", "Live workers listening on a queue.", ["queue"])
        slots = gauge("worker_slots", "Step slots of the live workers listening on a queue.",
                      ["queue"])
        busy = gauge("worker_busy_slots", "Steps running on the live workers of a queue.",
                     ["queue"])
        for q in state.queues:
            for kind in (STEP, RUN):
                counts = q.waiting[kind] or {0: 0}  # a known queue always has a series
                for priority, count in sorted(counts.items()):
                    waiting.add_metric([q.name, kind, str(priority)], count)
                inflight.add_metric([q.name, kind], q.in_flight[kind])
                oldest.add_metric([q.name, kind], q.oldest_waiting[kind])
            live.add_metric([q.name], len(q.workers))
            slots.add_metric([q.name], q.slots)
            busy.add_metric([q.name], q.busy)
        yield from (waiting, inflight, oldest, live, slots, busy)


def run_exporter(settings: BrokerSettings, host: str, port: int) -> None:
    """Serve the cluster's metrics until SIGTERM or SIGINT."""
    import signal

    registry = CollectorRegistry()
    collector = ClusterCollector(settings)
    registry.register(collector)
    server = serve(registry, host, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logger.info("Serving the cluster's metrics on http://%s:%d/metrics.", host, port)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
