"""What a task runs, in two halves: ``prepare_*`` in the zygote (load the instance, the code and
the run once, warm for every later task), and the returned body in the task's own forked child
(run the step, or the whole run, the way Dagster's own entry points do).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sqlite3
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import DagsterInstance
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.events import EngineEventData
from dagster._core.execution.api import execute_plan_iterator
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.system_config.objects import ResolvedRunConfig
from dagster._grpc.types import ExecuteRunArgs, ExecuteStepArgs, ResumeRunArgs
from dagster._serdes import deserialize_value, serialize_value

from dagster_taskiq.connections import run_has_ended, share_connections
from dagster_taskiq.event_log import QUEUE_WAIT_MARKER, TASK_ID_METADATA
from dagster_taskiq.worker.code import StaleCode, code_version
from dagster_taskiq.worker.outcome import StepOutcome, error_outcome

# Modules Dagster imports lazily while executing a step or a run: imported once in the zygote,
# so that forked tasks do not each pay for it.
PRELOAD = (
    "dagster._cli.api",
    "dagster._core.execution.plan.active",
    "dagster._core.execution.compute_logs",
    "dagster._core.system_config.composite_descent",
)


class _Loaded:
    """Instances and runs (with their resolved config) kept between tasks; the oldest go."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.instances: OrderedDict[str, DagsterInstance] = OrderedDict()
        self.runs: OrderedDict[str, tuple[DagsterRun, ResolvedRunConfig]] = OrderedDict()
        self.checked: set[tuple[str, str]] = set()  # (run id, what) already compared

    def instance(self, ref: InstanceRef | None) -> DagsterInstance:
        if ref is None:
            return DagsterInstance.get()
        key = serialize_value(ref)
        if key not in self.instances:
            instance = DagsterInstance.from_ref(ref)
            # Storages and the compute log manager are built lazily: build them here, once,
            # rather than in every forked task.
            _ = instance.run_storage, instance.event_log_storage, instance.compute_log_manager
            share_connections(instance)
            self.instances[key] = instance
            if len(self.instances) > self.size:
                self.instances.popitem(last=False)[1].dispose()
        self.instances.move_to_end(key)
        return self.instances[key]

    def run(self, instance: DagsterInstance, run_id: str,
            recon_job: ReconstructableJob) -> tuple[DagsterRun, ResolvedRunConfig]:
        """The run and its validated config, read once per zygote, and its event log opened
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


LOADED = _Loaded()


def preload() -> None:
    for module in PRELOAD:
        importlib.import_module(module)


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


def _check_planned_code(run: DagsterRun, recon_job: ReconstructableJob, planned_version: str,
                        stale_ok: bool) -> str | None:
    """Raise :class:`StaleCode` when ``run`` was planned from other code than this process has
    loaded: another job snapshot (its ops, graph or config changed) or, for a step, another
    code version than its orchestrator's. With ``stale_ok`` (this process was just reloaded
    and still differs: the code here is what this machine has) return the difference, to be
    reported on the run."""
    ours = code_version(recon_job.repository.pointer)
    differences = []
    if planned_version and ours and planned_version != ours:
        differences.append((f"version:{planned_version}",
                            f"its orchestrator loaded code version {planned_version}, this "
                            f"worker has {ours}"))
    snapshot = recon_job.get_definition().get_job_snapshot_id()
    if run.job_snapshot_id and run.job_snapshot_id != snapshot:
        differences.append((f"snapshot:{run.job_snapshot_id}",
                            f"the run was planned from job snapshot {run.job_snapshot_id}, "
                            f"this worker's code gives {snapshot}"))
    if not differences:
        return None
    if not stale_ok:
        key, reason = differences[0]
        raise StaleCode(key, reason)
    return "; ".join(reason for _, reason in differences)


@dataclass(frozen=True)
class PreparedStep:
    """A step whose instance, job and run are loaded (in the zygote), ready to run."""

    args: ExecuteStepArgs
    run: DagsterRun
    run_config: ResolvedRunConfig
    instance: DagsterInstance
    recon_job: ReconstructableJob
    worker: str
    task_id: str = ""
    code_difference: str | None = None

    def execute(self) -> StepOutcome:
        """Run the step as Dagster's ``execute_step`` entry point does (its run was found not
        to have ended just before the fork; inject the run's env vars, verify it if asked);
        every event is written to the instance as it happens (the UI sees the step live) and
        also returned, serialized, for the orchestrator's bookkeeping."""
        from dagster._cli.api import verify_step  # preloaded by the zygote

        events: list[str] = []
        args, instance = self.args, self.instance
        step_keys = list(args.step_keys_to_execute or [])
        try:
            run = self.run
            location = run.remote_job_origin.location_name if run.remote_job_origin else None
            instance.inject_env_vars(location)
            if self.code_difference:
                instance.report_engine_event(
                    f"This taskiq worker runs other code than the run was planned from "
                    f"({self.code_difference}): deploy the same code to every worker.",
                    run, step_key=step_keys[0] if len(step_keys) == 1 else None)
            known = args.known_state or KnownExecutionState()
            if args.should_verify_step and not verify_step(
                    instance, run, known.get_retry_state(), step_keys):
                return {"events": [], "error": None, "crashed": False, "skipped": "verified"}
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


def prepare_step(step_args: str, job_pointer: dict[str, Any], worker: str, task_id: str = "",
                 code_version: str = "", stale_ok: bool = False) -> Callable[[], StepOutcome]:
    """Load what the step needs (once per zygote), check it is the code the run was planned
    from, and return the body its child runs."""
    args = deserialize_value(step_args, ExecuteStepArgs)
    instance = LOADED.instance(args.instance_ref)
    recon_job = ReconstructableJob.from_dict(job_pointer)
    run, run_config = LOADED.run(instance, args.run_id, recon_job)
    # Asked fresh for every task, not the zygote's copy of the run: a step left queued by an
    # orchestrator that died or was stopped must not run into an ended run. Asked here, warm,
    # just before the fork (one indexed query; in a freshly forked child it cost ~5 ms).
    if run_has_ended(instance, args.run_id):
        current = instance.get_run_by_id(args.run_id)
        skipped: StepOutcome = {"events": [], "error": None, "crashed": False,
                                "skipped": current.status.value if current else "gone"}
        return lambda: skipped
    difference = None
    check = (args.run_id, json.dumps(job_pointer, sort_keys=True) + code_version)
    if check not in LOADED.checked or stale_ok:
        difference = _check_planned_code(run, recon_job, code_version, stale_ok)
        if difference is None:
            LOADED.checked.add(check)
    step = PreparedStep(args, run, run_config, instance, recon_job, worker, task_id, difference)
    return step.execute


@dataclass(frozen=True)
class PreparedRun:
    """A whole run (``dagster api execute_run``'s body), for the run launcher's tasks."""

    run_id: str
    instance: DagsterInstance
    resume: bool

    def execute(self) -> StepOutcome:
        from dagster._cli.api import (  # preloaded by the zygote
            _execute_run_command_body,
            _resume_run_command_body,
        )

        body = _resume_run_command_body if self.resume else _execute_run_command_body
        try:
            exit_code = body(run_id=self.run_id, instance=self.instance,
                             write_stream_fn=lambda _event: None,
                             set_exit_code_on_failure=True)
        except BaseException:
            return error_outcome()
        return {"events": [], "error": None, "crashed": False, "exit_code": exit_code}


def prepare_run(run_args: str, resume: bool, stale_ok: bool = False) -> Callable[[], StepOutcome]:
    """Load the run's code in the zygote (its orchestrator and every step forked later find it
    built), check it is the code the run was planned from, and return the body."""
    from dagster._utils.hosted_user_process import recon_job_from_origin

    args = deserialize_value(run_args, (ExecuteRunArgs, ResumeRunArgs))
    instance = LOADED.instance(args.instance_ref)
    run = instance.get_run_by_id(args.run_id)
    difference = None
    if run is not None and run.job_code_origin is not None:
        try:
            recon_job = recon_job_from_origin(run.job_code_origin).get_subset(
                op_selection=run.resolved_op_selection, asset_selection=run.asset_selection,
                asset_check_selection=run.asset_check_selection)
            difference = _check_planned_code(run, recon_job, "", stale_ok)
        except StaleCode:
            raise
        except Exception:  # the run's own body loads it again, and reports why it cannot
            pass
        if difference:
            instance.report_engine_event(
                f"This taskiq worker runs other code than the run was planned from "
                f"({difference}): deploy the same code to every worker.", run)
    return PreparedRun(args.run_id, instance, resume).execute
