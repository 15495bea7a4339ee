"""What a worker runs: ``execute_plan`` (one Dagster step), ``execute_job`` and ``resume_job``
(a whole run, launched by :class:`~dagster_taskiq.launcher.TaskiqRunLauncher`).

Each task names what its zygote prepares and its child runs
(:mod:`dagster_taskiq.worker.steps`) and hands that to the worker's runner: a child forked by
the worker's zygote on real workers (killable, crash-isolated, yet warm), inline in eager mode.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable
from typing import Any, Protocol

from dagster._grpc.types import ExecuteRunArgs, ExecuteStepArgs, ResumeRunArgs
from dagster._serdes import deserialize_value
from taskiq import AsyncBroker, Context, TaskiqDepends

from dagster_taskiq.broker import RUN, STEP
from dagster_taskiq.config import TASK_EXECUTE_JOB, TASK_EXECUTE_PLAN, TASK_RESUME_JOB
from dagster_taskiq.worker.outcome import StepOutcome, error_outcome

STEP_ENTRY = "dagster_taskiq.worker.steps:prepare_step"
RUN_ENTRY = "dagster_taskiq.worker.steps:prepare_run"



class StepRunner(Protocol):
    """Runs a task: ``entry(**kwargs)`` (``"module:function"``) prepares it and returns its
    body, which runs somewhere (inline, or in a forked child) and returns its outcome.
    ``label`` says what it is (for the worker registry and logs)."""

    def run(self, delivery: str, entry: str, kwargs: dict[str, Any], label: str,
            kind: str = STEP, reuse: str | None = None) -> Awaitable[StepOutcome]: ...


class InlineStepRunner:
    """Eager mode: the task runs in this (the orchestrating) process, on a thread of its own
    because Dagster runs its own event loop inside step execution."""

    async def run(self, delivery: str, entry: str, kwargs: dict[str, Any], label: str,
                  kind: str = STEP, reuse: str | None = None) -> StepOutcome:
        from dagster_taskiq.worker.zygote import resolve

        try:
            body = resolve(entry)(**kwargs)
        except Exception:
            return error_outcome()
        return await asyncio.to_thread(body)


def _delivery(context: Context) -> str:
    """What the runner knows this task by: the broker's key for this delivery of it (a worker
    may get the same task again), or its id where the broker has none (eager mode)."""
    task_id = context.message.task_id
    delivery = getattr(context.broker, "delivery", None)
    return delivery(task_id) if delivery is not None else task_id


def _worker_name(context: Context) -> str:
    import socket

    return getattr(context.state, "worker_name", None) or socket.gethostname()


async def execute_plan(
    step_args: str,
    job_pointer: dict[str, Any],
    code_version: str = "",
    context: Context = TaskiqDepends(),
) -> StepOutcome:
    """The ``execute_plan`` task: one step. ``code_version`` is the orchestrator's (see
    :func:`dagster_taskiq.worker.code.code_version`), so a worker with other code reloads."""
    runner: StepRunner = context.state.step_runner
    task_id = context.message.task_id
    args = deserialize_value(step_args, ExecuteStepArgs)
    keys = ", ".join(args.step_keys_to_execute or [])
    kwargs = {"step_args": step_args, "job_pointer": job_pointer,
              "worker": _worker_name(context), "task_id": task_id,
              "code_version": code_version}
    # Steps of one run, planned from the same code, may share a child (see the zygote).
    reuse = f"{args.run_id}:" + hashlib.blake2b(
        json.dumps([job_pointer, code_version], sort_keys=True).encode(),
        digest_size=8).hexdigest()
    return await runner.run(_delivery(context), STEP_ENTRY, kwargs,
                            f"step {keys} of run {args.run_id}", STEP, reuse)


async def _run_task(run_args: str, resume: bool, context: Context) -> StepOutcome:
    runner: StepRunner = context.state.step_runner
    run_id = deserialize_value(run_args, (ExecuteRunArgs, ResumeRunArgs)).run_id
    verb = "resume" if resume else "run"
    return await runner.run(_delivery(context), RUN_ENTRY,
                            {"run_args": run_args, "resume": resume}, f"{verb} {run_id}", RUN)


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
