"""What a worker runs: the ``execute_plan`` task (one Dagster step).

The task body is :func:`run_step`, a plain function; *where* it runs is the worker's step runner
(a forked child process on real workers, inline in eager mode). Workers keep instances and
loaded jobs between tasks, keyed by instance ref and code pointer, so no step re-imports code.
"""

from __future__ import annotations

import json
import socket
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from dagster import DagsterInstance
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.events import EngineEventData
from dagster._core.execution.api import create_execution_plan, execute_plan_iterator
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import deserialize_value, serialize_value
from dagster._utils.error import SerializableErrorInfo, serializable_error_info_from_exc_info
from taskiq import AsyncBroker, Context, TaskiqDepends

from dagster_taskiq.config import TASK_EXECUTE_PLAN

QUEUE_WAIT_MARKER = "taskiq_queue_wait"

StepOutcome = dict[str, Any]
"""``{"events": [serialized DagsterEvent, ...], "error": serialized SerializableErrorInfo | None,
"crashed": bool}``: ``error`` is an exception in the worker outside the step's own handling;
``crashed`` means the step's process died (signal, ``os._exit``) before it could answer."""


class StepRunner(Protocol):
    """Runs a step function somewhere (inline, or in a child process) and returns its outcome."""

    def run(self, task_id: str, step: Callable[[], StepOutcome]) -> Awaitable[StepOutcome]: ...


class InlineStepRunner:
    """Eager mode: the step runs right here, in the orchestrating process."""

    async def run(self, task_id: str, step: Callable[[], StepOutcome]) -> StepOutcome:
        return step()


class _LoadedCode:
    """Instances and jobs kept between tasks (a few of each; the oldest is dropped)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.instances: OrderedDict[str, DagsterInstance] = OrderedDict()
        self.jobs: OrderedDict[str, ReconstructableJob] = OrderedDict()

    def instance(self, args: ExecuteStepArgs) -> DagsterInstance:
        if args.instance_ref is None:
            raise ValueError("The step arrived without an instance ref.")
        key = serialize_value(args.instance_ref)
        if key not in self.instances:
            self.instances[key] = DagsterInstance.from_ref(args.instance_ref)
            if len(self.instances) > self.size:
                self.instances.popitem(last=False)[1].dispose()
        self.instances.move_to_end(key)
        return self.instances[key]

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


def worker_label() -> str:
    return socket.gethostname()


def run_step(step_args: str, job_pointer: dict[str, Any], worker: str) -> StepOutcome:
    """Execute the steps in ``step_args`` and return their events, serialized.

    Every event is also written to the instance as it happens (the UI sees the step live); the
    returned copies are for the orchestrator's bookkeeping.
    """
    events: list[str] = []
    try:
        args = deserialize_value(step_args, ExecuteStepArgs)
        instance = LOADED.instance(args)
        recon_job = LOADED.job(job_pointer)
        run = instance.get_run_by_id(args.run_id)
        if run is None:
            raise ValueError(f"Could not load run {args.run_id} from the instance.")
        step_keys = list(args.step_keys_to_execute or [])
        started = instance.report_engine_event(
            f"Executing steps {', '.join(step_keys)} in taskiq worker",
            run,
            EngineEventData(
                {"step_keys": str(step_keys), "taskiq worker": worker},
                marker_end=QUEUE_WAIT_MARKER,
            ),
            step_key=step_keys[0] if len(step_keys) == 1 else None,
        )
        events.append(serialize_value(started))
        plan = create_execution_plan(
            recon_job,
            run.run_config,
            step_keys_to_execute=step_keys,
            known_state=args.known_state,
        )
        for event in execute_plan_iterator(
            plan,
            recon_job,
            run,
            instance=instance,
            retry_mode=args.retry_mode,
            run_config=run.run_config,
        ):
            events.append(serialize_value(event))
    except Exception:
        return {"events": events, "error": serialize_value(_error_info()), "crashed": False}
    return {"events": events, "error": None, "crashed": False}


def _error_info() -> SerializableErrorInfo:
    return serializable_error_info_from_exc_info(sys.exc_info())


async def execute_plan(
    step_args: str,
    job_pointer: dict[str, Any],
    context: Context = TaskiqDepends(),
) -> StepOutcome:
    """The ``execute_plan`` task: one step, run by this worker's step runner."""
    runner: StepRunner = context.state.step_runner
    worker: str = getattr(context.state, "worker_name", None) or worker_label()
    return await runner.run(
        context.message.task_id, lambda: run_step(step_args, job_pointer, worker)
    )


def register_tasks(broker: AsyncBroker) -> None:
    broker.register_task(execute_plan, task_name=TASK_EXECUTE_PLAN)
