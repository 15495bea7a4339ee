"""What a worker runs: ``execute_plan`` (one Dagster step), ``execute_job`` and ``resume_job``
(a whole run, launched by :class:`~dagster_taskiq.launcher.TaskiqRunLauncher`).

A step task loads the step's instance and job in the worker's long-lived process
(:func:`prepare_step`), then hands :meth:`PreparedStep.execute` to the worker's runner: a forked
child process on real workers (killable, crash-isolated, yet warm), inline in eager mode. Workers
keep instances and jobs between tasks, keyed by instance ref and code pointer, so no step
re-imports code. Runs go the same way, in a child of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import socket
import sqlite3
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from dagster import DagsterInstance
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.events import EngineEventData
from dagster._core.execution.api import execute_plan_iterator
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus, RunsFilter
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.system_config.objects import ResolvedRunConfig
from dagster._grpc.types import ExecuteRunArgs, ExecuteStepArgs, ResumeRunArgs
from dagster._serdes import deserialize_value, serialize_value
from dagster._utils.error import serializable_error_info_from_exc_info
from taskiq import AsyncBroker, Context, TaskiqDepends

from dagster_taskiq.broker import RUN, STEP
from dagster_taskiq.config import TASK_EXECUTE_JOB, TASK_EXECUTE_PLAN, TASK_RESUME_JOB
from dagster_taskiq.event_log import TASK_ID_METADATA

QUEUE_WAIT_MARKER = "taskiq_queue_wait"

logger = logging.getLogger("dagster_taskiq.tasks")

T = TypeVar("T")

StepOutcome = dict[str, Any]
"""``{"events": [serialized DagsterEvent, ...], "error": serialized SerializableErrorInfo | None,
"crashed": bool}``: ``error`` is an exception in the worker outside the step's own handling;
``crashed`` means the step's process died (signal, ``os._exit``) before it could answer;
``skipped`` (when present) why the step was not run at all (its run had already ended)."""

# A step of a run in one of these states is never started: its orchestrator is gone or
# stopping (a step left queued by an orchestrator that died must not run into a finished run).
ENDED_RUN_STATUSES = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE,
                      DagsterRunStatus.CANCELED, DagsterRunStatus.CANCELING)


class StepRunner(Protocol):
    """Loads what a task needs, then runs its body somewhere (inline, or in a child process)
    and returns its outcome. ``label`` says what it is (for the worker registry and logs)."""

    def prepare(self, load: Callable[[], T], task_id: str = "") -> Awaitable[T]: ...

    def run(
        self, task_id: str, body: Callable[[], StepOutcome], label: str, kind: str = STEP
    ) -> Awaitable[StepOutcome]: ...


class InlineStepRunner:
    """Eager mode: the step runs in this (the orchestrating) process, on a thread of its own
    because Dagster runs its own event loop inside step execution."""

    async def prepare(self, load: Callable[[], T], task_id: str = "") -> T:
        return load()

    async def run(self, task_id: str, body: Callable[[], StepOutcome], label: str,
                  kind: str = STEP) -> StepOutcome:
        return await asyncio.to_thread(body)


class _LoadedCode:
    """Instances and jobs kept between tasks (a few of each; the oldest is dropped)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.instances: OrderedDict[str, DagsterInstance] = OrderedDict()
        self.jobs: OrderedDict[str, ReconstructableJob] = OrderedDict()
        self.runs: OrderedDict[str, tuple[DagsterRun, ResolvedRunConfig]] = OrderedDict()

    def instance(self, ref: InstanceRef | None) -> DagsterInstance:
        if ref is None:
            raise ValueError("The task arrived without an instance ref.")
        key = serialize_value(ref)
        if key not in self.instances:
            instance = DagsterInstance.from_ref(ref)
            # Storages and the compute log manager are built lazily: build them here, once,
            # rather than in every forked step.
            _ = instance.run_storage, instance.event_log_storage, instance.compute_log_manager
            self.instances[key] = instance
            if len(self.instances) > self.size:
                self.instances.popitem(last=False)[1].dispose()
        self.instances.move_to_end(key)
        return self.instances[key]

    def run(self, instance: DagsterInstance, run_id: str,
            recon_job: ReconstructableJob) -> tuple[DagsterRun, ResolvedRunConfig]:
        """The run and its validated config, read once per worker, and its event log opened
        (see :func:`_open_event_log`). Resolving the config here also leaves the job's config
        schema built for every forked step."""
        if run_id not in self.runs:
            run = instance.get_run_by_id(run_id)
            if run is None:
                raise ValueError(f"Could not load run {run_id} from the instance.")
            _open_event_log(instance, run_id)
            config = ResolvedRunConfig.build(recon_job.get_definition(), run.run_config)
            self.runs[run_id] = (run, config)
            if len(self.runs) > 64 * self.size:
                self.runs.popitem(last=False)
        self.runs.move_to_end(run_id)
        return self.runs[run_id]

    def job(self, pointer: dict[str, Any]) -> ReconstructableJob:
        key = json.dumps(pointer, sort_keys=True)
        if key not in self.jobs:
            recon_job = ReconstructableJob.from_dict(pointer)
            recon_job.get_definition()  # import the user's code once, now
            self.jobs[key] = recon_job
            if len(self.jobs) > self.size:
                self.jobs.popitem(last=False)
        self.jobs.move_to_end(key)
        return self.jobs[key]


LOADED = _LoadedCode()


def _open_event_log(instance: DagsterInstance, run_id: str) -> None:
    """Open the run's event log in this process, so each forked step does not do it again.

    Dagster's sqlite storage keeps one database per run and, the first time a process opens
    one, checks its schema with alembic, which compiles ~90 migration scripts (~40 ms of CPU,
    per run per worker). The run's orchestrator has created and stamped that database before
    any step exists; so when it is there and stamped, take it as ready."""
    storage = instance.event_log_storage
    initialized = getattr(storage, "_initialized_dbs", None)
    if isinstance(storage, SqliteEventLogStorage) and isinstance(initialized, set):
        uri = Path(storage.path_for_shard(run_id)).absolute().as_uri() + "?mode=ro"
        try:
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
                stamped = db.execute("SELECT version_num FROM alembic_version").fetchone()
                tables = {name for (name,) in db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error:
            stamped, tables = None, set()
        if stamped and "event_logs" in tables:
            initialized.add(run_id)
            return
    storage.get_logs_for_run(run_id, limit=1)

# Modules Dagster imports lazily while executing a step: import them once in the worker so that
# forked steps do not each pay for it.
for _module in (
    "dagster._core.execution.plan.active",
    "dagster._core.execution.compute_logs",
    "dagster._core.system_config.composite_descent",
):
    importlib.import_module(_module)


def worker_label() -> str:
    return socket.gethostname()


@dataclass(frozen=True)
class PreparedStep:
    """A step whose instance and job are loaded (in the worker's warm process), ready to run."""

    args: ExecuteStepArgs
    run: DagsterRun
    run_config: ResolvedRunConfig
    instance: DagsterInstance
    recon_job: ReconstructableJob
    worker: str
    ended_status: str | None = None  # the run's status when it had ended: nothing to run
    task_id: str = ""

    def execute(self) -> StepOutcome:
        """Run the step; every event is written to the instance as it happens (the UI sees the
        step live) and also returned, serialized, for the orchestrator's bookkeeping."""
        events: list[str] = []
        try:
            args, instance, run = self.args, self.instance, self.run
            step_keys = list(args.step_keys_to_execute or [])
            started = instance.report_engine_event(
                f"Executing steps {', '.join(step_keys)} in taskiq worker",
                run,
                EngineEventData(
                    {
                        "step_keys": str(step_keys),
                        "taskiq worker": self.worker,
                        "pid": str(os.getpid()),
                        # Where this attempt starts in the event log, should its reply be lost.
                        TASK_ID_METADATA: self.task_id,
                    },
                    marker_end=QUEUE_WAIT_MARKER,
                ),
                step_key=step_keys[0] if len(step_keys) == 1 else None,
            )
            events.append(serialize_value(started))
            plan = ExecutionPlan.build(
                self.recon_job.get_definition(),
                self.run_config,
                step_keys_to_execute=step_keys,
                known_state=args.known_state,
            )
            for event in execute_plan_iterator(
                plan,
                self.recon_job,
                run,
                instance=instance,
                retry_mode=args.retry_mode,
                run_config=run.run_config,
            ):
                events.append(serialize_value(event))
        except KeyboardInterrupt:
            # Stopped by the worker (the run was cancelled): Dagster has already recorded the
            # step's failure, which is among the events.
            return {"events": events, "error": None, "crashed": False, "interrupted": True}
        except Exception:
            return error_outcome(events)
        return {"events": events, "error": None, "crashed": False}


def prepare_step(step_args: str, job_pointer: dict[str, Any], worker: str,
                 task_id: str = "") -> PreparedStep:
    args = deserialize_value(step_args, ExecuteStepArgs)
    instance = LOADED.instance(args.instance_ref)
    recon_job = LOADED.job(job_pointer)
    run, run_config = LOADED.run(instance, args.run_id, recon_job)
    # Fresh, not the cached run: one indexed query, so a step of an ended run never starts.
    ended = instance.get_run_ids(RunsFilter(run_ids=[args.run_id],
                                            statuses=list(ENDED_RUN_STATUSES)), limit=1)
    status = None
    if ended:
        current = instance.get_run_by_id(args.run_id)
        status = current.status.value if current else "gone"
    return PreparedStep(args, run, run_config, instance, recon_job, worker, status, task_id)


def error_outcome(events: list[str] | None = None) -> StepOutcome:
    """The outcome for an exception being handled now (call from an ``except`` block)."""
    error = serializable_error_info_from_exc_info(sys.exc_info())
    return {"events": events or [], "error": serialize_value(error), "crashed": False}


async def execute_plan(
    step_args: str,
    job_pointer: dict[str, Any],
    context: Context = TaskiqDepends(),
) -> StepOutcome:
    """The ``execute_plan`` task: one step, run by this worker's step runner."""
    runner: StepRunner = context.state.step_runner
    worker: str = getattr(context.state, "worker_name", None) or worker_label()
    try:
        step = await runner.prepare(
            lambda: prepare_step(step_args, job_pointer, worker, context.message.task_id),
            context.message.task_id)
    except Exception:
        # Said here too: the orchestrator records it as the step's failure, but whoever
        # looks at this worker (its code or environment is what is wrong) sees it first.
        logger.exception("Task %s: could not prepare its step.", context.message.task_id)
        return error_outcome()
    keys = ", ".join(step.args.step_keys_to_execute or [])
    if step.ended_status is not None:
        logger.warning("Task %s: not running step %s: its run %s is %s.",
                       context.message.task_id, keys, step.args.run_id, step.ended_status)
        return {"events": [], "error": None, "crashed": False, "skipped": step.ended_status}
    return await runner.run(context.message.task_id, step.execute, f"step {keys} of run "
                            f"{step.args.run_id}")


@dataclass(frozen=True)
class PreparedRun:
    """A whole run (``dagster api execute_run``'s body), for the run launcher's tasks."""

    run_id: str
    instance: DagsterInstance
    resume: bool

    def execute(self) -> StepOutcome:
        # Imported here: Dagster's CLI package is large and private, and the webserver and the
        # daemon import this module (through the run launcher) without ever running a run.
        from dagster._cli.api import _execute_run_command_body, _resume_run_command_body

        body = _resume_run_command_body if self.resume else _execute_run_command_body
        try:
            exit_code = body(run_id=self.run_id, instance=self.instance,
                             write_stream_fn=lambda _event: None,
                             set_exit_code_on_failure=True)
        except BaseException:
            return error_outcome()
        return {"events": [], "error": None, "crashed": False, "exit_code": exit_code}


async def _run_task(run_args: str, resume: bool, context: Context) -> StepOutcome:
    runner: StepRunner = context.state.step_runner
    try:
        args = deserialize_value(run_args, (ExecuteRunArgs, ResumeRunArgs))
        instance = await runner.prepare(
            lambda: LOADED.instance(args.instance_ref) if args.instance_ref
            else DagsterInstance.get(),
            context.message.task_id,
        )
        run = PreparedRun(args.run_id, instance, resume)
    except Exception:
        return error_outcome()
    verb = "resume" if resume else "run"
    return await runner.run(context.message.task_id, run.execute, f"{verb} {args.run_id}",
                            kind=RUN)


async def execute_job(run_args: str, context: Context = TaskiqDepends()) -> StepOutcome:
    """The ``execute_job`` task: a whole run, launched by the run launcher."""
    return await _run_task(run_args, False, context)


async def resume_job(run_args: str, context: Context = TaskiqDepends()) -> StepOutcome:
    """The ``resume_job`` task: resume a run whose run worker died."""
    return await _run_task(run_args, True, context)


def register_tasks(broker: AsyncBroker) -> None:
    broker.register_task(execute_plan, task_name=TASK_EXECUTE_PLAN)
    broker.register_task(execute_job, task_name=TASK_EXECUTE_JOB)
    broker.register_task(resume_job, task_name=TASK_RESUME_JOB)
