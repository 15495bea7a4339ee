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

Run monitoring fails a run that stays STARTING longer than its ``start_timeout``, counted from
the run's last RUN_STARTING event. A run waiting in a taskiq run queue that live workers serve is
not stuck, only behind others: the launcher stamps it again while it waits, so it keeps its
place. A run on a queue that no live worker serves is left to time out, with the reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Self

from dagster import Field, Noneable, Permissive, StringSource
from dagster import _check as check
from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData
from dagster._core.launcher import (
    CheckRunHealthResult,
    LaunchRunContext,
    ResumeRunContext,
    RunLauncher,
    WorkerStatus,
)
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus, RunsFilter
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
from dagster_taskiq.event_log import run_events, task_of_step
from dagster_taskiq.tags import (
    TASKIQ_QUEUE_TAG,
    TASKIQ_RUN_PRIORITY_TAG,
    TASKIQ_TASK_ID_TAG,
    priority_from_tags,
    tag_value,
)

logger = logging.getLogger("dagster_taskiq.launcher")

# The daemon and the webserver call the launcher: a Redis outage must fail a launch with its
# reason within seconds, never block them for the client's usual five minutes.
LAUNCHER_PATIENCE_SECONDS = 15.0


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
        self._keeper: threading.Thread | None = None
        self._stop = threading.Event()
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
                client = TaskiqClient(self.settings, patience=LAUNCHER_PATIENCE_SECONDS)
                client.start()
                self._client = client
            return self._client

    def dispose(self) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(LAUNCHER_PATIENCE_SECONDS + 5)
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
        task_id = _task_id(context.dagster_run)
        if task_id is not None and self.client.task_state(task_id):
            # Its task is still queued or running: a second one would stack up behind it.
            self._instance.report_engine_event(
                f"Not sending another taskiq task: task {task_id} of this run is still queued "
                "or running.", context.dagster_run, cls=self.__class__,
            )
            return
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
        queue = self._queue_of(run)
        priority = priority_from_tags(run.tags, TASKIQ_RUN_PRIORITY_TAG, 0, f"Run {run.run_id}")
        self._instance.report_engine_event(
            f"Creating taskiq {task_name} task for the run on queue \"{queue}\".", run,
            cls=self.__class__,
        )
        labels = {QUEUE_LABEL: queue, PRIORITY_LABEL: priority,
                  LEASE_LABEL: self.worker_heartbeat_timeout, "run_id": run.run_id,
                  "job": run.job_name}  # the job label of the worker's run metrics
        task_id = self.client.send(task_name, [run_args], labels)
        self._instance.add_run_tags(run.run_id, {TASKIQ_TASK_ID_TAG: task_id})
        self._keep_queued_runs_starting()
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
        # The run's steps too, as the event log names them: an orchestrator that died leaves
        # its queued steps behind, and nobody else would drop them.
        steps = list(task_of_step(run_events(self._instance, run_id,
                                             DagsterEventType.ENGINE_EVENT)).values())
        states = self.client.revoke([task_id, *steps])
        state = states.get(task_id, "gone")
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
        self._keep_queued_runs_starting()
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
            holder = self._running_on(task_id)
            if holder is not None:  # its lease lapsed in an outage, its worker runs it still
                return CheckRunHealthResult(WorkerStatus.RUNNING, f"Running on {holder}.")
            return CheckRunHealthResult(
                WorkerStatus.FAILED,
                "The run's taskiq task is gone without a result: the worker running it shut "
                "down before the run finished, or stopped heartbeating (killed, out of memory, "
                "or its machine went away).",
            )
        if "holder" in state:
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"Running on {state['holder']}.")
        # Queued (a resume waiting for a slot): healthy, nothing is lost, and saying otherwise
        # would make run monitoring stack more resume tasks behind this one.
        return CheckRunHealthResult(
            WorkerStatus.RUNNING, f'Queued on taskiq queue "{self._queue_of(run)}", waiting for a '
            "free worker slot.")

    def get_run_worker_debug_info(
        self, run: DagsterRun, include_container_logs: bool | None = True
    ) -> str | None:
        task_id = _task_id(run)
        if task_id is None:
            return None
        state = self.client.task_state(task_id)
        if not state:
            where = "its taskiq task is finished or lost"
        elif "holder" in state:
            where = f"its taskiq task is running on {state['holder']}"
        else:
            queue = self._queue_of(run)
            served = self._served(queue)
            where = (f'its taskiq task waits in queue "{queue}"'
                     + ("" if served else "; no live worker serves that queue"))
        return f"Run {run.run_id}: {where} (task {task_id})."

    # -- runs waiting in the broker -----------------------------------------------------------
    def _queue_of(self, run: DagsterRun) -> str:
        found = tag_value(run.tags, TASKIQ_QUEUE_TAG)
        return found[1] if found else self.default_queue

    def _running_on(self, task_id: str) -> str | None:
        """The live worker whose registry entry lists ``task_id`` among its running tasks.
        Live here means heard from within the run's lease, not the registry's 10 s: a killed
        worker's run must be found lost as soon as its lease says so."""
        for worker in self.client.workers() or []:
            if worker.age < self.worker_heartbeat_timeout and any(
                    task.get("task_id") == task_id for task in worker.tasks):
                return worker.id
        return None

    def _served(self, queue: str) -> bool:
        return any(queue in worker.queues for worker in self.client.workers() or [])

    def _keep_queued_runs_starting(self) -> None:
        """Start, once per process that launches or monitors runs, the thread that keeps runs
        waiting in a served run queue from timing out (see the module's docstring)."""
        instance = self._instance
        if (self._keeper is not None or not instance.run_monitoring_enabled
                or instance.run_monitoring_start_timeout_seconds <= 0):
            return
        with self._lock:
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keeper_loop, daemon=True,
                                                name="dagster-taskiq-run-queue-keeper")
                self._keeper.start()

    def _keeper_loop(self) -> None:
        timeout = self._instance.run_monitoring_start_timeout_seconds
        while not self._stop.wait(min(30.0, max(1.0, timeout / 4))):
            try:
                self._stamp_waiting_runs(timeout)
            except Exception:  # a Redis or database blip: the next round tries again
                logger.warning("Could not check runs waiting in taskiq run queues.",
                               exc_info=True)

    def _stamp_waiting_runs(self, timeout: float) -> None:
        instance = self._instance
        for run in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTING])):
            task_id = _task_id(run)
            state = self.client.task_state(task_id) if task_id else None
            if not state:
                continue  # not ours, or finished, or lost: run monitoring decides
            stats = instance.get_run_stats(run.run_id)
            if "holder" in state:
                if stats.start_time and _last_starting_is_ours(instance, run.run_id):
                    # A worker took the run just as we stamped it, and its RUN_START came
                    # before our stamp: the run is running, give it its status back.
                    instance.run_storage.handle_run_event(run.run_id, DagsterEvent(
                        event_type_value=DagsterEventType.RUN_START.value,
                        job_name=run.job_name))
                continue
            queue = self._queue_of(run)
            if time.time() - (stats.launch_time or 0.0) < timeout / 2 or not self._served(queue):
                continue
            instance.report_dagster_event(
                DagsterEvent(
                    event_type_value=DagsterEventType.RUN_STARTING.value,
                    job_name=run.job_name,
                    message=f'{_STILL_WAITING} "{queue}" for a free worker slot; run '
                            "monitoring's start timeout counts from now.",
                ),
                run_id=run.run_id,
            )


_STILL_WAITING = "Still waiting in taskiq run queue"


def _last_starting_is_ours(instance: Any, run_id: str) -> bool:
    records = instance.get_records_for_run(
        run_id, of_type=DagsterEventType.RUN_STARTING, ascending=False, limit=1).records
    event = records[0].event_log_entry.dagster_event if records else None
    return bool(event and (event.message or "").startswith(_STILL_WAITING))


def _task_id(run: DagsterRun) -> str | None:
    found = tag_value(run.tags, TASKIQ_TASK_ID_TAG)
    return found[1] if found else None
