"""The orchestrator's loop: order steps by priority, submit them, and react to their results.

It mirrors dagster-celery's loop (markers, revoke on interrupt, retries, the storage invariant,
``DagsterSubprocessError`` for worker errors) without its 1 s polling tick: results are pushed
to one reply list per run and the loop wakes on a single blocking read the moment any arrives.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

from dagster import DagsterInvariantViolationError
from dagster import _check as check
from dagster._core.errors import DagsterSubprocessError
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.execution.context.system import PlanOrchestrationContext
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.plan.step import ExecutionStep
from dagster._serdes import deserialize_value
from dagster._utils import get_run_crash_explanation
from dagster._utils.error import SerializableErrorInfo, serializable_error_info_from_exc_info

from dagster_taskiq.app import make_app
from dagster_taskiq.broker import BrokerUnavailable, RedisLeaseBroker
from dagster_taskiq.config import mask_url
from dagster_taskiq.executor import TaskiqExecutor, submit_step
from dagster_taskiq.results import Reply
from dagster_taskiq.tags import (
    DEFAULT_STEP_PRIORITY,
    TASKIQ_PRIORITY_TAG,
    TASKIQ_QUEUE_TAG,
    TASKIQ_RUN_PRIORITY_TAG,
    priority_from_tags,
    tag_value,
)
from dagster_taskiq.tasks import QUEUE_WAIT_MARKER

T = TypeVar("T")

# How long one wait for results may block before the loop looks at interrupts and concurrency
# slots again. Results themselves wake the loop at once.
WAIT_SECONDS = 0.5


class _LoopThread:
    """A private asyncio loop on its own thread, so the synchronous executor can await taskiq
    calls whether or not the calling thread already runs a loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, daemon=True, name="dagster-taskiq-orchestrator"
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result()

    def close(self) -> None:
        self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


def _step_queue(step: ExecutionStep, default_queue: str) -> str:
    found = tag_value(step.tags, TASKIQ_QUEUE_TAG)
    queue = found[1].strip() if found else default_queue
    if not queue or any(c.isspace() for c in queue):
        raise DagsterInvariantViolationError(
            f'Step "{step.key}" has tag {found[0] if found else TASKIQ_QUEUE_TAG}="{queue}", '
            "which is not a valid queue name (non-empty, no spaces)."
        )
    return queue


def _warn_on_priority_misuse(context: PlanOrchestrationContext, plan: ExecutionPlan) -> None:
    misused = [
        step.key
        for step in plan.get_steps_to_execute_in_topo_order()
        if "dagster/priority" in step.tags and tag_value(step.tags, TASKIQ_PRIORITY_TAG) is None
    ]
    if misused:
        context.log.warning(
            f'The following steps do not have "{TASKIQ_PRIORITY_TAG}" set but do have '
            '"dagster/priority" set which is not applicable for the taskiq engine: '
            f"{misused}. Consider using a function to set both keys."
        )


def core_taskiq_execution_loop(
    plan_context: PlanOrchestrationContext,
    execution_plan: ExecutionPlan,
    executor: TaskiqExecutor,
) -> Iterator[DagsterEvent]:
    check.inst_param(plan_context, "plan_context", PlanOrchestrationContext)
    check.inst_param(execution_plan, "execution_plan", ExecutionPlan)

    if execution_plan.step_keys_to_execute:
        check.invariant(
            execution_plan.artifacts_persisted,
            "Cannot use in-memory storage with taskiq, use filesystem (on top of NFS or similar "
            "system that allows files to be available to all nodes), S3, or GCS",
        )

    # Bad tags fail the run here, before anything is submitted.
    run = plan_context.dagster_run
    run_priority = priority_from_tags(run.tags, TASKIQ_RUN_PRIORITY_TAG, 0, f"Run {run.run_id}")
    steps = execution_plan.get_steps_to_execute_in_topo_order()
    priority = {
        step.key: run_priority
        + priority_from_tags(
            step.tags, TASKIQ_PRIORITY_TAG, DEFAULT_STEP_PRIORITY, f'Step "{step.key}"'
        )
        for step in steps
    }
    queue_of = {step.key: _step_queue(step, executor.default_queue) for step in steps}
    _warn_on_priority_misuse(plan_context, execution_plan)

    settings = executor.settings
    runner = _LoopThread()
    broker = make_app(settings)
    reply_to = f"{settings.key_prefix}:reply:{run.run_id}:{uuid.uuid4().hex}"
    in_flight: dict[str, str] = {}  # task id -> step key
    step_errors: dict[str, SerializableErrorInfo] = {}
    stopping = False
    try:
        try:
            runner.run(broker.startup())
        except BrokerUnavailable as exc:
            raise DagsterInvariantViolationError(str(exc)) from None

        with (
            InstanceConcurrencyContext(plan_context.instance, run) as concurrency,
            execution_plan.start(
                retry_mode=executor.retries,
                sort_key_fn=lambda step: -priority[step.key],
                max_concurrent=executor.max_concurrent,
                tag_concurrency_limits=executor.tag_concurrency_limits,
                instance_concurrency_context=concurrency,
            ) as active_execution,
        ):
            while (not active_execution.is_complete and not stopping) or in_flight:
                if active_execution.check_for_interrupts():
                    yield DagsterEvent.engine_event(
                        plan_context,
                        "Taskiq executor: received termination signal - revoking active tasks "
                        "from workers",
                        EngineEventData.interrupted(list(in_flight.values())),
                    )
                    stopping = True
                    active_execution.mark_interrupted()
                    if isinstance(broker, RedisLeaseBroker):
                        runner.run(broker.revoke(list(in_flight)))

                if not stopping and not step_errors:
                    for step in active_execution.get_steps_to_execute():
                        key = step.key
                        yield DagsterEvent.engine_event(
                            plan_context.for_step(step),
                            f'Submitting taskiq task for step "{key}" to queue "{queue_of[key]}".',
                            EngineEventData(marker_start=QUEUE_WAIT_MARKER),
                        )
                        try:
                            task_id = runner.run(
                                submit_step(
                                    broker,
                                    plan_context,
                                    step,
                                    queue_of[key],
                                    priority[key],
                                    active_execution.get_known_state(),
                                    reply_to,
                                    executor.worker_heartbeat_timeout,
                                )
                            )
                        except Exception:
                            yield DagsterEvent.engine_event(
                                plan_context,
                                "Encountered error during taskiq task submission.",
                                event_specific_data=EngineEventData.engine_error(
                                    serializable_error_info_from_exc_info(sys.exc_info())
                                ),
                            )
                            raise
                        in_flight[task_id] = key
                    yield from active_execution.concurrency_event_iterator(plan_context)

                if in_flight:
                    replies = runner.run(_wait(broker, reply_to))
                else:
                    # Nothing could be submitted (steps wait for concurrency slots): look again
                    # shortly.
                    replies = []
                    if not active_execution.is_complete and not stopping:
                        time.sleep(0.05)
                for reply in replies:
                    key = in_flight.pop(reply.task_id, None)
                    if key is None:
                        continue  # a duplicate (redelivered task) or not ours
                    yield from _handle_reply(
                        plan_context, executor, active_execution, key, reply, step_errors
                    )
                    active_execution.verify_complete(plan_context, key)

                yield from active_execution.plan_events_iterator(plan_context)

    finally:
        if in_flight and isinstance(broker, RedisLeaseBroker):
            # Leaving early (an error here): do not leave orphaned work on the queues.
            try:
                runner.run(broker.revoke(list(in_flight)))
            except Exception:
                plan_context.log.warning(
                    f"Could not revoke {len(in_flight)} task(s) at {mask_url(settings.broker_url)}."
                )
        try:
            runner.run(_close(broker, reply_to))
        finally:
            runner.close()

    if step_errors:
        raise DagsterSubprocessError(
            "During taskiq execution errors occurred in workers:\n"
            + "\n".join(f"[{key}]: {err.to_string()}" for key, err in step_errors.items()),
            subprocess_error_infos=list(step_errors.values()),
        )


async def _wait(broker: Any, reply_to: str) -> list[Reply]:
    if isinstance(broker, RedisLeaseBroker):
        await broker.reap_if_due()
    return await broker.result_backend.wait_replies(reply_to, WAIT_SECONDS)


async def _close(broker: Any, reply_to: str) -> None:
    try:
        await broker.result_backend.discard_replies(reply_to)
    finally:
        await broker.shutdown()


def _handle_reply(
    plan_context: PlanOrchestrationContext,
    executor: TaskiqExecutor,
    active_execution: Any,
    key: str,
    reply: Reply,
    step_errors: dict[str, SerializableErrorInfo],
) -> Iterator[DagsterEvent]:
    step_context = plan_context.for_step(active_execution.get_step_by_key(key))
    if reply.result is None:
        yield DagsterEvent.engine_event(
            step_context,
            f'taskiq task for running step "{key}" was revoked.',
            EngineEventData(marker_end=QUEUE_WAIT_MARKER),
        )
        return
    if reply.result.is_err:
        error = reply.result.error
        step_errors[key] = SerializableErrorInfo(
            message=f"{type(error).__name__}: {error}", stack=[], cls_name=type(error).__name__
        )
        return
    outcome = reply.result.return_value
    for serialized in outcome["events"]:
        event = deserialize_value(serialized, DagsterEvent)
        yield event
        active_execution.handle_event(event)
    if outcome["error"] is None:
        return
    error = deserialize_value(outcome["error"], SerializableErrorInfo)
    if not outcome["crashed"]:
        step_errors[key] = error
        return
    # The step's process died: fail the step (retry policies apply), keep the run going.
    yield DagsterEvent.engine_event(
        step_context,
        get_run_crash_explanation(
            prefix=f'Taskiq worker process for step "{key}"', exit_code=outcome["exit_code"]
        ),
        EngineEventData.engine_error(error),
    )
    failure = executor.log_failure_or_retry_event_after_error(
        step_context, error, active_execution.get_known_state()
    )
    yield failure
    active_execution.handle_event(failure)
