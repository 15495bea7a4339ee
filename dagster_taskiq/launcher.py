"""``TaskiqRunLauncher``: each launched run executes as an ``execute_job`` task on a worker.

Configure it in ``dagster.yaml``::

    run_launcher:
      module: dagster_taskiq.launcher
      class: TaskiqRunLauncher
      config:
        broker: {env: DAGSTER_TASKIQ_BROKER_URL}
        default_queue: dagster

A run goes to the queue in its ``dagster-taskiq/queue`` tag (else ``default_queue``) with the
priority in its ``dagster-taskiq/run_priority`` tag. Workers serve runs from their own pool of
slots, so a run whose steps also use the taskiq executor never starves them.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any, Self

from dagster import Field, Noneable, Permissive, StringSource
from dagster import _check as check
from dagster._core.events import EngineEventData
from dagster._core.launcher import (
    CheckRunHealthResult,
    LaunchRunContext,
    ResumeRunContext,
    RunLauncher,
    WorkerStatus,
)
from dagster._core.storage.dagster_run import DagsterRun
from dagster._grpc.types import ExecuteRunArgs, ResumeRunArgs
from dagster._serdes import ConfigurableClass, ConfigurableClassData, serialize_value

from dagster_taskiq.broker import LEASE_LABEL, PRIORITY_LABEL, QUEUE_LABEL
from dagster_taskiq.client import TaskiqClient
from dagster_taskiq.config import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_QUEUE,
    TASK_EXECUTE_JOB,
    TASK_RESUME_JOB,
    BrokerSettings,
)
from dagster_taskiq.tags import (
    TASKIQ_QUEUE_TAG,
    TASKIQ_RUN_PRIORITY_TAG,
    TASKIQ_TASK_ID_TAG,
    priority_from_tags,
    tag_value,
)


class TaskiqRunLauncher(RunLauncher, ConfigurableClass):
    def __init__(
        self,
        default_queue: str = DEFAULT_QUEUE,
        broker: str | None = None,
        backend: str | None = None,
        include: Sequence[str] | None = None,
        config_source: Mapping[str, Any] | None = None,
        worker_heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        inst_data: ConfigurableClassData | None = None,
    ) -> None:
        self._inst_data = inst_data
        self.default_queue = check.str_param(default_queue, "default_queue")
        self.settings = BrokerSettings.from_config(broker, backend, config_source)
        if self.settings.task_always_eager:
            raise check.CheckError("The run launcher needs a real broker, not task_always_eager.")
        self.include = list(include or [])
        self.worker_heartbeat_timeout = float(worker_heartbeat_timeout)
        self._client: TaskiqClient | None = None
        self._lock = threading.Lock()
        super().__init__()

    # -- configuration ----------------------------------------------------------------------
    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict[str, Field]:
        return {
            "broker": Field(Noneable(StringSource), is_required=False,
                            description="Redis URL (default: $DAGSTER_TASKIQ_BROKER_URL)."),
            "backend": Field(Noneable(StringSource), is_required=False,
                             description="Redis URL for results (default: the broker's)."),
            "include": Field([str], is_required=False),
            "default_queue": Field(StringSource, is_required=False,
                                   default_value=DEFAULT_QUEUE),
            "config_source": Field(Noneable(Permissive()), is_required=False),
            "worker_heartbeat_timeout": Field(float, is_required=False,
                                              default_value=DEFAULT_HEARTBEAT_TIMEOUT),
        }

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> Self:
        return cls(inst_data=inst_data, **config_value)

    @property
    def client(self) -> TaskiqClient:
        with self._lock:
            if self._client is None:
                client = TaskiqClient(self.settings)
                client.start()
                self._client = client
            return self._client

    def dispose(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- launching --------------------------------------------------------------------------
    def launch_run(self, context: LaunchRunContext) -> None:
        self._send(context, TASK_EXECUTE_JOB, ExecuteRunArgs)

    @property
    def supports_resume_run(self) -> bool:
        return True

    def resume_run(self, context: ResumeRunContext) -> None:
        self._send(context, TASK_RESUME_JOB, ResumeRunArgs)

    def _send(
        self,
        context: LaunchRunContext | ResumeRunContext,
        task_name: str,
        args_type: type[ExecuteRunArgs] | type[ResumeRunArgs],
    ) -> None:
        run = context.dagster_run
        run_args = serialize_value(args_type(
            job_origin=check.not_none(context.job_code_origin),
            run_id=run.run_id,
            instance_ref=self._instance.get_ref(),
            set_exit_code_on_failure=True,
        ))
        found = tag_value(run.tags, TASKIQ_QUEUE_TAG)
        queue = found[1] if found else self.default_queue
        priority = priority_from_tags(run.tags, TASKIQ_RUN_PRIORITY_TAG, 0, f"Run {run.run_id}")
        self._instance.report_engine_event(
            f"Creating taskiq {task_name} task for the run on queue \"{queue}\".", run,
            cls=self.__class__,
        )
        labels = {QUEUE_LABEL: queue, PRIORITY_LABEL: priority,
                  LEASE_LABEL: self.worker_heartbeat_timeout, "run_id": run.run_id}
        task_id = self.client.send(task_name, [run_args], labels)
        self._instance.add_run_tags(run.run_id, {TASKIQ_TASK_ID_TAG: task_id})
        self._instance.report_engine_event(
            "Taskiq task has been forwarded to the broker.",
            run,
            EngineEventData({"Run ID": run.run_id, "Taskiq Task ID": task_id,
                             "Taskiq Queue": queue, "Priority": str(priority)}),
            cls=self.__class__,
        )

    # -- termination ------------------------------------------------------------------------
    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        task_id = _task_id(run)
        if task_id is None:
            return False
        self._instance.report_run_canceling(run)
        state = self.client.revoke([task_id]).get(task_id, "gone")
        if state == "dropped":
            self._instance.report_run_canceled(
                run, message="Run canceled before any taskiq worker started it."
            )
        elif state.startswith("running:"):
            holder = state.split(":", 1)[1]
            self._instance.report_engine_event(
                f"Asked taskiq worker {holder} to stop the run (its running steps are stopped "
                "too).", run, cls=self.__class__,
            )
        return True

    # -- health -----------------------------------------------------------------------------
    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        task_id = _task_id(run)
        if task_id is None:
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, "The run has no taskiq task id.")
        self.client.reap()  # a dead worker's expired lease becomes a lost task now
        result = self.client.result(task_id)
        if result is not None:
            outcome = result.return_value if not result.is_err else None
            code = outcome.get("exit_code") if isinstance(outcome, dict) else None
            if code == 0:
                return CheckRunHealthResult(WorkerStatus.SUCCESS)
            return CheckRunHealthResult(
                WorkerStatus.FAILED, f"The run's taskiq task ended with exit code {code}."
            )
        state = self.client.task_state(task_id)
        if not state:
            return CheckRunHealthResult(
                WorkerStatus.FAILED,
                "The run's taskiq task is gone without a result: the worker running it stopped "
                "heartbeating (killed, out of memory, or its machine went away).",
            )
        if "holder" in state:
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"Running on {state['holder']}.")
        return CheckRunHealthResult(WorkerStatus.UNKNOWN, "Queued, waiting for a worker.")

    def get_run_worker_debug_info(
        self, run: DagsterRun, include_container_logs: bool | None = True
    ) -> str | None:
        task_id = _task_id(run)
        if task_id is None:
            return None
        state = self.client.task_state(task_id)
        return str({"run_id": run.run_id, "taskiq_task_id": task_id,
                    "broker_state": state or "finished or lost",
                    "worker": state.get("holder") if state else None})


def _task_id(run: DagsterRun) -> str | None:
    found = tag_value(run.tags, TASKIQ_TASK_ID_TAG)
    return found[1] if found else None
