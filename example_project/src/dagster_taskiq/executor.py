"""The ``taskiq`` executor: its config schema and how one step is sent to the broker."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dagster import (
    Field,
    Noneable,
    Permissive,
    StringSource,
    executor,
    multiple_process_executor_requirements,
)
from dagster import _check as check
from dagster._core.events import DagsterEvent
from dagster._core.execution.context.system import PlanOrchestrationContext
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.retries import RetryMode, get_retries_config
from dagster._core.execution.tags import get_tag_concurrency_limits_config
from dagster._core.executor.base import Executor

from dagster_taskiq.config import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_QUEUE,
    BrokerSettings,
)
from dagster_taskiq.core_execution_loop import core_taskiq_execution_loop

TASKIQ_CONFIG: dict[str, Field] = {
    "broker": Field(
        Noneable(StringSource),
        is_required=False,
        description="Redis URL of the broker: redis://, rediss:// (TLS), unix://, "
        "redis+sentinel://[:password@]host[:port][,host[:port]...]/<service>[/db] (Sentinel) or "
        "redis+cluster://[:password@]host[:port][,host[:port]...] (Redis Cluster). Default: "
        "$DAGSTER_TASKIQ_BROKER_URL, else redis://localhost:6379/0.",
    ),
    "backend": Field(
        Noneable(StringSource),
        is_required=False,
        description="Redis URL where results are stored. Default: the broker's URL.",
    ),
    "include": Field(
        [str],
        is_required=False,
        description="Modules to import before running (workers import them with -i).",
    ),
    "config_source": Field(
        Noneable(Permissive()),
        is_required=False,
        description="Broker options: task_always_eager, key_prefix, socket_timeout, "
        "socket_connect_timeout, connect_timeout, result_ttl_seconds, max_connections.",
    ),
    "retries": get_retries_config(),
    "default_queue": Field(
        StringSource,
        is_required=False,
        default_value=DEFAULT_QUEUE,
        description="Queue for steps without a dagster-taskiq/queue tag.",
    ),
    "max_concurrent": Field(
        Noneable(int),
        is_required=False,
        default_value=None,
        description="Most steps of one run in flight at once. Default: unlimited (every ready "
        "step is submitted and the queues throttle).",
    ),
    "tag_concurrency_limits": get_tag_concurrency_limits_config(),
    "worker_heartbeat_timeout": Field(
        float,
        is_required=False,
        default_value=DEFAULT_HEARTBEAT_TIMEOUT,
        description="Seconds without a heartbeat after which a step's worker counts as lost.",
    ),
    "queue_wait_timeout": Field(
        Noneable(float),
        is_required=False,
        default_value=None,
        description="Fail a step that waited this many seconds on a queue no live worker "
        "listens on. Default: wait (pools that scale from zero still work).",
    ),
}


@executor(
    name="taskiq",
    config_schema=TASKIQ_CONFIG,
    requirements=multiple_process_executor_requirements(),
)
def taskiq_executor(init_context) -> TaskiqExecutor:
    """Run each step as a taskiq task on workers listening to Redis queues.

    Steps go to the queue in their ``dagster-taskiq/queue`` tag (else ``default_queue``) with
    priority ``dagster-taskiq/run_priority`` + ``dagster-taskiq/priority`` (default 5; higher
    runs first). Start workers with ``dagster-taskiq worker start -q QUEUE``. Outputs must be
    persisted where every worker can read them (S3, a shared filesystem...).
    """
    config = init_context.executor_config
    return TaskiqExecutor(
        retries=RetryMode.from_config(config["retries"]),  # type: ignore[arg-type]
        broker=config.get("broker"),
        backend=config.get("backend"),
        include=config.get("include"),
        config_source=config.get("config_source"),
        default_queue=config.get("default_queue", DEFAULT_QUEUE),
        max_concurrent=config.get("max_concurrent"),
        tag_concurrency_limits=config.get("tag_concurrency_limits"),
        worker_heartbeat_timeout=config.get("worker_heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT),
        queue_wait_timeout=config.get("queue_wait_timeout"),
    )


class TaskiqExecutor(Executor):
    def __init__(
        self,
        retries: RetryMode,
        broker: str | None = None,
        backend: str | None = None,
        include: Sequence[str] | None = None,
        config_source: Mapping[str, Any] | None = None,
        default_queue: str = DEFAULT_QUEUE,
        max_concurrent: int | None = None,
        tag_concurrency_limits: list[dict[str, Any]] | None = None,
        worker_heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        queue_wait_timeout: float | None = None,
    ) -> None:
        self._retries = check.inst_param(retries, "retries", RetryMode)
        self.settings = BrokerSettings.from_config(broker, backend, config_source)
        self.include = list(include or [])
        self.default_queue = check.str_param(default_queue, "default_queue")
        if max_concurrent is not None and max_concurrent < 1:
            raise check.CheckError("max_concurrent must be at least 1 (or unset: unlimited).")
        self.max_concurrent = max_concurrent
        self.tag_concurrency_limits = tag_concurrency_limits
        if not worker_heartbeat_timeout > 0:
            raise check.CheckError("worker_heartbeat_timeout must be a positive number.")
        self.worker_heartbeat_timeout = float(worker_heartbeat_timeout)
        self.queue_wait_timeout = queue_wait_timeout

    @property
    def retries(self) -> RetryMode:
        return self._retries

    def execute(
        self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan
    ) -> Iterator[DagsterEvent]:
        for module in self.include:
            importlib.import_module(module)
        return core_taskiq_execution_loop(plan_context, execution_plan, self)
