"""The worker process: consume queues, keep leases alive, run each task in a forked child.

One worker process holds the broker connections and the heartbeats; its zygote (a clean
process with the user's code loaded, see :mod:`~dagster_taskiq.worker.zygote`) forks each step
and each run: it starts in milliseconds with the code already built, a crash (``os._exit``, a
signal, the OOM killer) only ends the child, and a cancelled task is stopped by killing it.

Steps and runs have separate pools of ``concurrency`` slots each, so a run launched onto a worker
never starves the steps it submits (no deadlock even with a single worker of concurrency 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from taskiq.acks import AcknowledgeType
from taskiq.receiver import Receiver

from dagster_taskiq.app import make_app
from dagster_taskiq.broker import (
    REDIS_ERRORS,
    RUN,
    STEP,
    Backoff,
    RedisLeaseBroker,
    stop_loop,
    supervise,
)
from dagster_taskiq.config import DEFAULT_QUEUE, BrokerSettings, mask_url
from dagster_taskiq.registry import WorkerInfo, publish, remove
from dagster_taskiq.worker.runner import (
    DEFAULT_MAX_STEPS_PER_CHILD,
    KILL_GRACE_SECONDS,
    ZygoteFailed,
    ZygoteRunner,
)

if TYPE_CHECKING:
    from dagster_taskiq.metrics import WorkerMetrics

logger = logging.getLogger("dagster_taskiq.worker")


@dataclass
class WorkerOptions:
    settings: BrokerSettings
    queues: Sequence[str] = (DEFAULT_QUEUE,)
    concurrency: int = 1
    name: str = field(default_factory=lambda: f"dagster-{uuid.uuid4().hex[:6]}")
    includes: Sequence[str] = ()
    shutdown_timeout: float = 30.0
    loglevel: str = "INFO"
    metrics_port: int | None = None  # serve Prometheus metrics there (off by default)
    metrics_host: str = "0.0.0.0"
    max_steps_per_child: int = DEFAULT_MAX_STEPS_PER_CHILD  # steps of one run a child may run


def _consumer(options: WorkerOptions, worker_id: str, kind: str, runner: ZygoteRunner,
              metrics: WorkerMetrics | None) -> RedisLeaseBroker:
    broker = make_app(options.settings, queues=options.queues, holder=worker_id, kind=kind)
    assert isinstance(broker, RedisLeaseBroker), "workers need a Redis broker, not eager mode"
    broker.is_worker_process = True
    broker.state.step_runner = runner
    broker.state.worker_name = options.name
    broker.on_cancel = runner.kill
    if kind == STEP:
        broker.on_lost = runner.release  # another worker has it now: never run a task twice
        broker.on_renewed = runner.set_fence
        runner.on_fenced = broker.give_up_lease
    else:
        broker.on_lost = _run_goes_on
    if metrics is not None:
        broker.metrics = metrics
        broker.add_middlewares(metrics.middleware(kind))
    return broker


def _run_goes_on(task_id: str) -> None:
    # A run is never handed out twice (an expired run lease drops the task), so a lost lease
    # (a Redis outage longer than it) means nobody else runs it: the orchestrator goes on,
    # and the launcher's health check finds it in this worker's registry entry.
    logger.warning("The lease on run task %s lapsed (a Redis outage?); the run goes on here.",
                   task_id)


async def run_worker(options: WorkerOptions) -> None:
    """Serve ``options.queues`` until SIGTERM/SIGINT or ``worker terminate``; then take no new
    tasks, let running ones finish for up to ``shutdown_timeout`` seconds, and hand whatever
    still runs back to its queue. A second signal does that at once."""
    host = socket.gethostname()
    worker_id = f"{options.name}@{host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    finish = asyncio.Event()
    hurry = asyncio.Event()
    crashed: list[str] = []

    def on_crash(what: str, error: BaseException) -> None:
        # A dead heartbeat or registry loop must not leave a worker that looks alive: stop at
        # once (tasks still running are handed back) and exit non-zero for the supervisor.
        logger.critical("%s died (%r): the worker stops so that its supervisor restarts it.",
                        what, error)
        crashed.append(what)
        finish.set()
        hurry.set()

    metrics, metrics_server = _serve_metrics(options)
    # The code is loaded in the zygote (before anything is consumed: the first task is warm
    # too), meanwhile the broker is reached; this process never imports the user's code.
    runner = ZygoteRunner(options.includes, options.loglevel, options.max_steps_per_child)
    loading = asyncio.create_task(runner.start())
    consumers = [_consumer(options, worker_id, kind, runner, metrics) for kind in (STEP, RUN)]
    try:
        for consumer in consumers:
            consumer.on_crash = on_crash
            await consumer.startup()
        await loading
    except ZygoteFailed as failed:
        await runner.close()
        _stop_metrics(metrics, metrics_server)
        raise WorkerCrashed(f"Worker {options.name} could not load its code:\n{failed}") from None
    except BaseException:
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        await runner.close()
        _stop_metrics(metrics, metrics_server)
        raise
    info = WorkerInfo(worker_id, options.name, host, os.getpid(), list(options.queues),
                      options.concurrency, time.time())
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if finish.is_set():
            logger.warning("Second %s: handing %d running task(s) back to their queues.",
                           sig.name, len(runner.task_ids))
            hurry.set()
            return
        logger.info("%s received: finishing %d running task(s), taking no new ones.",
                    sig.name, len(runner.task_ids))
        finish.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    # Registered before listening, so whoever sees it listening also finds it in the registry;
    # a failover in progress (READONLY) or a restart is waited out, as everywhere else.
    backoff = Backoff()
    while True:
        try:
            await publish(consumers[0].redis, options.settings.key_prefix, info)
            break
        except REDIS_ERRORS as exc:
            if finish.is_set():
                raise
            logger.warning("Cannot register in the worker registry yet (%s); retrying.", exc)
            await backoff.wait()
    closing = asyncio.Event()
    registry = asyncio.create_task(_registry_loop(consumers[0], info, runner, finish, closing))
    supervise(registry, f"The registry heartbeat of worker {options.name}", on_crash)
    receivers = [
        Receiver(consumer, max_async_tasks=options.concurrency, max_prefetch=0,
                 run_startup=False, ack_type=AcknowledgeType.WHEN_SAVED)
        for consumer in consumers
    ]
    logger.info("Worker %s (pid %d) consuming %s with concurrency %d from %s; code loaded "
                "in %.2f s by zygote %s.", options.name, os.getpid(), list(options.queues),
                options.concurrency, mask_url(options.settings.broker_url), runner.loaded_in,
                runner.zygote_pid)
    listening = [asyncio.create_task(receiver.listen(finish)) for receiver in receivers]
    for kind, task in zip((STEP, RUN), listening, strict=True):
        # A receiver that stops on an error would leave a worker that heartbeats and takes
        # nothing: make it a crash (exit 1, its supervisor restarts it).
        supervise(task, f"The {kind} receiver of worker {options.name}", on_crash)
    try:
        await finish.wait()
        deadline = asyncio.create_task(asyncio.sleep(options.shutdown_timeout))
        hurried = asyncio.create_task(hurry.wait())
        await asyncio.wait([asyncio.gather(*listening), deadline, hurried],
                           return_when=asyncio.FIRST_COMPLETED)
        deadline.cancel()
        hurried.cancel()
        if runner.task_ids:
            logger.warning("Handing %d unfinished task(s) back to their queues.",
                           len(runner.task_ids))
            for consumer in consumers:
                deliveries = consumer.deliveries()
                for task_id in await consumer.release_held():
                    runner.release(deliveries[task_id])
        # Released tasks end within moments; anything still listening is told to stop.
        _, pending = await asyncio.wait(listening, timeout=KILL_GRACE_SECONDS)
        for task in pending:
            task.cancel()
        await asyncio.gather(*listening, return_exceptions=True)
    finally:
        closing.set()
        await stop_loop(registry)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(*REDIS_ERRORS):
            await remove(consumers[0].redis, options.settings.key_prefix, worker_id)
        for consumer in consumers:
            await consumer.shutdown()
        await runner.close()
        _stop_metrics(metrics, metrics_server)
        logger.info("Worker %s stopped.", options.name)
    if crashed:
        raise WorkerCrashed(f"Worker {options.name} stopped because {crashed[0].lower()} died.")


def _serve_metrics(options: WorkerOptions) -> tuple[WorkerMetrics | None, Any]:
    if options.metrics_port is None:
        return None, None
    from dagster_taskiq.metrics import WorkerMetrics, serve

    metrics = WorkerMetrics(options.name, options.queues, options.concurrency)
    try:
        server = serve(metrics.registry, options.metrics_host, options.metrics_port)
    except OSError as exc:  # the port is taken: say so before loading anything
        raise WorkerCrashed(f"Worker {options.name} cannot serve metrics on "
                            f"{options.metrics_host}:{options.metrics_port}: {exc}") from None
    logger.info("Serving metrics on http://%s:%d/metrics.", options.metrics_host,
                options.metrics_port)
    return metrics, server


def _stop_metrics(metrics: WorkerMetrics | None, server: Any) -> None:
    if metrics is not None:
        metrics.stopped()
        server.shutdown()
        server.server_close()


class WorkerCrashed(Exception):
    """A background loop of the worker died: it stopped, and must exit non-zero."""


async def _registry_loop(broker: RedisLeaseBroker, info: WorkerInfo,
                         runner: ZygoteRunner, finish: asyncio.Event,
                         closing: asyncio.Event) -> None:
    """Publish this worker in the registry every second; obey ``worker terminate``."""
    backoff = Backoff()
    while not closing.is_set():
        info.tasks = runner.describe()
        try:
            if await publish(broker.redis, broker.settings.key_prefix, info) \
                    and not finish.is_set():
                logger.info("Asked to stop (worker terminate).")
                finish.set()
            backoff.reset()
        except REDIS_ERRORS as exc:
            logger.warning("Registry heartbeat failed (%s); retrying.", exc)
            await backoff.wait()
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), 1.0)
