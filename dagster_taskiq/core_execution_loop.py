"""The orchestrator's loop: order steps by priority, submit them, and react to their results.

It mirrors dagster-celery's loop (markers, revoke on interrupt, retries, the storage invariant,
``DagsterSubprocessError`` for worker errors) without its 1 s polling tick: results are pushed
to one reply list per run and the loop wakes on a single blocking read the moment any arrives.
Beyond celery, no lost task hangs a run: a step whose worker died comes back as a failure naming
the worker (so retry policies apply), and a step on a queue nobody serves is reported at once
and, with ``queue_wait_timeout``, failed.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

from dagster import DagsterEventType, DagsterInvariantViolationError
from dagster import _check as check
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.errors import DagsterSubprocessError
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.execution.context.system import PlanOrchestrationContext
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.plan.step import ExecutionStep
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import deserialize_value, serialize_value
from dagster._utils import get_run_crash_explanation
from dagster._utils.error import SerializableErrorInfo, serializable_error_info_from_exc_info

from dagster_taskiq.broker import (
    LEASE_LABEL,
    PRIORITY_LABEL,
    QUEUE_LABEL,
    REPLY_LABEL,
    BrokerUnavailable,
)
from dagster_taskiq.client import TaskiqClient
from dagster_taskiq.config import TASK_EXECUTE_PLAN
from dagster_taskiq.event_log import (
    QUEUE_WAIT_MARKER,
    TASK_ID_METADATA,
    metadata_text,
    run_events,
    task_of_step,
)
from dagster_taskiq.registry import serves
from dagster_taskiq.results import Reply
from dagster_taskiq.tags import (
    DEFAULT_STEP_PRIORITY,
    TASKIQ_PRIORITY_TAG,
    TASKIQ_QUEUE_TAG,
    TASKIQ_RUN_PRIORITY_TAG,
    priority_from_tags,
    tag_value,
)
from dagster_taskiq.worker.code import code_version

if TYPE_CHECKING:
    from dagster_taskiq.executor import TaskiqExecutor

# How long one wait for results may block before the loop looks at interrupts, concurrency
# slots and queue timeouts again. Results themselves wake the loop at once.
WAIT_SECONDS = 0.5
# How often the loop asks the registry which queues have live workers.
WORKERS_REFRESH_SECONDS = 2.0
# How often in-flight tasks are checked against the broker's records (see the loop).
RECONCILE_SECONDS = 5.0
# What a step's attempt ends with, in the event log.
_STEP_ENDS = (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE,
              DagsterEventType.STEP_UP_FOR_RETRY)


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


class _QueueWatch:
    """Which queues have live workers, and which steps waited too long on a queue."""

    def __init__(self, client: TaskiqClient, timeout: float | None) -> None:
        self.client, self.timeout = client, timeout
        self._workers: list | None = None
        self._fetched = 0.0
        self.warned: set[str] = set()
        self.submitted: dict[str, tuple[float, str]] = {}  # task id -> (time, queue)
        self.timed_out: dict[str, str] = {}  # task id -> queue
        self._checked = 0.0

    def served(self, queue: str) -> bool:
        if time.monotonic() - self._fetched > WORKERS_REFRESH_SECONDS:
            self._workers = self.client.workers()
            self._fetched = time.monotonic()
        return self._workers is None or bool(serves(self._workers, queue))

    def overdue(self) -> list[str]:
        """Tasks queued longer than the timeout on a queue no live worker serves, and still not
        taken: revoke these. (Busy workers are not a reason to fail anything.)"""
        now = time.monotonic()
        if self.timeout is None or now - self._checked < 1.0:
            return []
        self._checked = now
        old = [tid for tid, (at, queue) in self.submitted.items()
               if now - at > self.timeout and tid not in self.timed_out
               and not self.served(queue)]
        waiting = self.client.still_queued(old)
        for task_id in waiting:
            self.timed_out[task_id] = self.submitted[task_id][1]
        return waiting


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
    client = TaskiqClient(settings)
    # One reply list per run, not per orchestrator: a resumed run's orchestrator hears the
    # replies of the tasks its dead predecessor left running.
    reply_to = f"{settings.key_prefix}:reply:{run.run_id}"
    watch = _QueueWatch(client, executor.queue_wait_timeout)
    in_flight: dict[str, str] = {}  # task id -> step key
    reconciled = time.monotonic()
    step_errors: dict[str, SerializableErrorInfo] = {}
    stopping = False
    try:
        client.start()
    except BrokerUnavailable as exc:
        client.close()
        raise DagsterInvariantViolationError(str(exc)) from None
    from dagster_taskiq.connections import orchestrating

    try:

        with (
            # Its event writes (one before each submit) hold their connection meanwhile.
            orchestrating(plan_context.instance),
            InstanceConcurrencyContext(plan_context.instance, run) as concurrency,
            execution_plan.start(
                retry_mode=executor.retries,
                sort_key_fn=lambda step: -priority[step.key],
                max_concurrent=executor.max_concurrent,
                tag_concurrency_limits=executor.tag_concurrency_limits,
                instance_concurrency_context=concurrency,
            ) as active_execution,
        ):
            def handle(replies: list[Reply]) -> Iterator[DagsterEvent]:
                for reply in replies:
                    key = in_flight.pop(reply.task_id, None)
                    if key is None:
                        continue  # a duplicate (redelivered task) or not ours
                    watch.submitted.pop(reply.task_id, None)
                    timed_out_on = watch.timed_out.pop(reply.task_id, None)
                    yield from _handle_reply(
                        plan_context, executor, active_execution, key, reply, step_errors,
                        timed_out_on,
                    )
                    active_execution.verify_complete(plan_context, key)

            def submit(step: ExecutionStep) -> Iterator[DagsterEvent]:
                key, queue = step.key, queue_of[step.key]
                step_context = plan_context.for_step(step)
                # The id is chosen first and written in the event log with the submission, so
                # the log tells which task carries the step, whatever happens next.
                task_id = uuid.uuid4().hex
                yield DagsterEvent.engine_event(
                    step_context,
                    f'Submitting taskiq task for step "{key}" to queue "{queue}".',
                    EngineEventData({TASK_ID_METADATA: task_id}, marker_start=QUEUE_WAIT_MARKER),
                )
                if queue not in watch.warned and not watch.served(queue):
                    watch.warned.add(queue)
                    yield _no_worker_warning(step_context, key, queue,
                                             executor.queue_wait_timeout)
                try:
                    submit_step(client, plan_context, step, queue, priority[key],
                                active_execution.get_known_state(), reply_to,
                                executor.worker_heartbeat_timeout, task_id)
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
                watch.submitted[task_id] = (time.monotonic(), queue)

            if plan_context.resume_from_failure:
                yield from _resume(plan_context, client, active_execution, submit, in_flight,
                                   watch, queue_of)

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
                    client.revoke(list(in_flight))

                if not stopping:
                    for step in active_execution.get_steps_to_execute():
                        yield from submit(step)
                    yield from active_execution.concurrency_event_iterator(plan_context)

                if in_flight:
                    client.revoke(watch.overdue())
                    replies = client.wait(reply_to, WAIT_SECONDS)
                else:
                    # Nothing could be submitted (steps wait for concurrency slots): look again
                    # shortly.
                    replies = []
                    if not active_execution.is_complete and not stopping:
                        time.sleep(0.05)
                yield from handle(replies)

                # The pushed reply is the fast path; the broker's record and the event log are
                # the truth. A task the broker no longer holds whose reply never came (Redis
                # lost it, or the task) is settled from the event log, so no run waits forever.
                if in_flight and time.monotonic() - reconciled >= RECONCILE_SECONDS:
                    reconciled = time.monotonic()
                    vanished = client.vanished(list(in_flight))
                    if vanished:
                        yield from handle(client.wait(reply_to, 0.05))
                    for task_id in vanished:
                        key = in_flight.pop(task_id, None)
                        if key is None:
                            continue
                        watch.submitted.pop(task_id, None)
                        yield from _settle_from_event_log(
                            plan_context, executor, active_execution, key, task_id)
                        active_execution.verify_complete(plan_context, key)

                yield from active_execution.plan_events_iterator(plan_context)
    finally:
        try:
            if in_flight:
                # Leaving early (an error here): leave no orphaned work on the queues.
                client.revoke(list(in_flight), patience=5)
            client.discard(reply_to)
        except Exception:
            plan_context.log.warning(
                f"Could not clean up {len(in_flight)} task(s) at {client.describe()}."
            )
        finally:
            client.close()

    if step_errors:
        raise DagsterSubprocessError(
            "During taskiq execution errors occurred in workers:\n"
            + "\n".join(f"[{key}]: {err.to_string()}" for key, err in step_errors.items()),
            subprocess_error_infos=list(step_errors.values()),
        )


def _resume(
    plan_context: PlanOrchestrationContext,
    client: TaskiqClient,
    active_execution: Any,
    submit: Callable[[ExecutionStep], Iterator[DagsterEvent]],
    in_flight: dict[str, str],
    watch: _QueueWatch,
    queue_of: dict[str, str],
) -> Iterator[DagsterEvent]:
    """Resume a run whose orchestrator died (run monitoring sends ``resume_job``), as Dagster's
    step-delegating executor does: replay the event log, then take each step that may be in
    flight: a task the broker still holds for it (named in the log by its submit event) is
    waited for (its reply comes to this run's list), any other is submitted again. So steps that
    ran are not run again, and none runs twice at once."""
    events = run_events(plan_context.instance, plan_context.dagster_run.run_id)
    latest_task = task_of_step(events)
    possibly_in_flight = active_execution.rebuild_from_events(events)
    yield DagsterEvent.engine_event(
        plan_context,
        f"Resuming execution from failure: {len(possibly_in_flight)} step(s) were possibly in "
        "flight.", EngineEventData(),
    )
    for step in possibly_in_flight:
        task_id = latest_task.get(step.key)
        state = client.task_state(task_id) if task_id and client.redis_mode else {}
        if task_id and state:
            in_flight[task_id] = step.key
            watch.submitted[task_id] = (time.monotonic(), queue_of[step.key])
            where = f"running on {state['holder']}" if "holder" in state else "queued"
            yield DagsterEvent.engine_event(
                plan_context.for_step(step),
                f'Step "{step.key}": its taskiq task {task_id} from before the resume is still '
                f"{where}; waiting for it.", EngineEventData(),
            )
        else:
            yield DagsterEvent.engine_event(
                plan_context.for_step(step),
                f'Including step "{step.key}" in the resumed run: no taskiq task holds it.',
                EngineEventData(),
            )
            yield from submit(step)


def _no_worker_warning(step_context: Any, key: str, queue: str, timeout: float | None):
    then = (f"it fails if none takes it within {timeout:g} s (queue_wait_timeout)" if timeout
            else "it waits until one starts (set queue_wait_timeout to fail instead)")
    message = (f'No live taskiq worker listens on queue "{queue}": step "{key}" is queued and '
               f"{then}. Start one with: dagster-taskiq worker start -q {queue}")
    step_context.log.warning(message)
    return DagsterEvent.engine_event(step_context, message, EngineEventData())


def _handle_reply(
    plan_context: PlanOrchestrationContext,
    executor: TaskiqExecutor,
    active_execution: Any,
    key: str,
    reply: Reply,
    step_errors: dict[str, SerializableErrorInfo],
    timed_out_on: str | None = None,
) -> Iterator[DagsterEvent]:
    def step_context() -> Any:
        return plan_context.for_step(active_execution.get_step_by_key(key))

    if reply.result is None and timed_out_on is None and not reply.lost:
        yield DagsterEvent.engine_event(
            step_context(),
            f'taskiq task for running step "{key}" was revoked.',
            EngineEventData(marker_end=QUEUE_WAIT_MARKER),
        )
        return
    if reply.result is None:
        # The step will never report: its worker died, or no worker took it in time. Fail it
        # like a crash, so retry policies apply and the run goes on.
        if timed_out_on is not None:
            message = (f'Step "{key}" waited more than {executor.queue_wait_timeout:g} s on '
                       f'queue "{timed_out_on}" and no taskiq worker took it.')
        else:
            message = f'Step "{key}" was lost: {reply.revoked_reason}.'
        yield from _fail_step(executor, step_context(), active_execution, message, None)
        return
    if reply.result.is_err:
        error = reply.result.error
        info = SerializableErrorInfo(
            message=f"{type(error).__name__}: {error}", stack=[], cls_name=type(error).__name__
        )
        step_errors[key] = info
        yield from _fail_step(executor, step_context(), active_execution,
                              f'The taskiq worker could not run step "{key}": {info.message}',
                              info)
        return
    outcome = reply.result.return_value
    if outcome.get("skipped"):
        yield DagsterEvent.engine_event(
            step_context(),
            f'The taskiq worker did not run step "{key}": '
            + ("it had already started (see the event above)." if outcome["skipped"] == "verified"
               else f'its run is {outcome["skipped"]}.'),
            EngineEventData(marker_end=QUEUE_WAIT_MARKER),
        )
        return
    settled = False  # the step's own events already ended this attempt
    for serialized in outcome["events"]:
        event = deserialize_value(serialized, DagsterEvent)
        yield event
        active_execution.handle_event(event)
        if event.step_key == key and (event.is_step_success or event.is_step_failure
                                      or event.is_step_up_for_retry):
            settled = True
            if event.is_step_success:
                step_errors.pop(key, None)  # an earlier attempt's worker error is moot
    if outcome["error"] is None:
        return
    error = deserialize_value(outcome["error"], SerializableErrorInfo)
    if not outcome["crashed"]:
        # An error in the worker outside the step's own handling (its code not importable
        # there, the instance unreachable...): a step failure that retry policies see, with
        # the error in the event log, and DagsterSubprocessError at the end if it stays.
        step_errors[key] = error
        if not settled:
            yield from _fail_step(
                executor, step_context(), active_execution,
                f'The taskiq worker could not run step "{key}": {error.message.strip()}', error)
        return
    # The step's process died: fail the step (retry policies apply), keep the run going.
    message = get_run_crash_explanation(
        prefix=f'Taskiq worker process for step "{key}"', exit_code=outcome["exit_code"]
    )
    yield from _fail_step(executor, step_context(), active_execution, message, error)


def _settle_from_event_log(
    plan_context: PlanOrchestrationContext,
    executor: TaskiqExecutor,
    active_execution: Any,
    key: str,
    task_id: str,
) -> Iterator[DagsterEvent]:
    """A task vanished from the broker without a reply. If the event log shows how the step's
    attempt ended (the worker writes events as the step runs), take that, as the reply would
    have carried it; otherwise the step is lost: a failure that retry policies see."""
    records = plan_context.instance.all_logs(plan_context.dagster_run.run_id)
    # This attempt's events follow the events naming the task (its submission, the worker's
    # "Executing steps").
    start = next((i for i, r in enumerate(records) if r.dagster_event is not None
                  and r.dagster_event.is_engine_event and r.step_key == key
                  and metadata_text(r.dagster_event, TASK_ID_METADATA) == task_id), None)
    attempt = [] if start is None else [
        r.dagster_event for r in records[start + 1:]
        if r.dagster_event is not None and r.step_key == key]
    step_context = plan_context.for_step(active_execution.get_step_by_key(key))
    if any(event.event_type in _STEP_ENDS for event in attempt):
        yield DagsterEvent.engine_event(
            step_context,
            f'Step "{key}": its taskiq reply was lost; its outcome is taken from the event log.',
            EngineEventData(),
        )
        for event in attempt:  # already stored by the worker: only for our bookkeeping
            active_execution.handle_event(event)
        return
    yield from _fail_step(
        executor, step_context, active_execution,
        f'Step "{key}" was lost: its taskiq task vanished from the broker without a result '
        "(Redis lost it: restarted without its data, or a failover lost recent writes).",
        None,
    )


def _fail_step(
    executor: TaskiqExecutor,
    step_context: Any,
    active_execution: Any,
    message: str,
    error: SerializableErrorInfo | None,
) -> Iterator[DagsterEvent]:
    error = error or SerializableErrorInfo(message=message, stack=[], cls_name=None)
    yield DagsterEvent.engine_event(
        step_context, message, EngineEventData.engine_error(error)
    )
    failure = executor.log_failure_or_retry_event_after_error(
        step_context, error, active_execution.get_known_state()
    )
    yield failure
    active_execution.handle_event(failure)


_code_versions: dict[str, str] = {}  # run id -> the code version its steps are sent with


def _run_code_version(run_id: str, recon_job: ReconstructableJob) -> str:
    """The version of the code this orchestrator runs, taken once per run (see
    :func:`~dagster_taskiq.worker.code.code_version`)."""
    if run_id not in _code_versions:
        _code_versions[run_id] = code_version(recon_job.repository.pointer)
        while len(_code_versions) > 64:
            del _code_versions[next(iter(_code_versions))]
    return _code_versions[run_id]


def submit_step(
    client: TaskiqClient,
    plan_context: PlanOrchestrationContext,
    step: ExecutionStep,
    queue: str,
    priority: int,
    known_state: KnownExecutionState,
    reply_to: str,
    lease_seconds: float,
    task_id: str,
) -> str:
    """Send one step to ``queue`` as task ``task_id``; its reply arrives on ``reply_to``."""
    recon_job = plan_context.reconstructable_job
    check.inst(recon_job, ReconstructableJob)
    executor = cast("TaskiqExecutor", plan_context.executor)
    step_args = ExecuteStepArgs(
        job_origin=recon_job.get_python_origin(),
        run_id=plan_context.dagster_run.run_id,
        step_keys_to_execute=[step.key],
        instance_ref=plan_context.instance.get_ref(),
        retry_mode=executor.retries.for_inner_plan(),
        known_state=known_state,
        print_serialized_events=True,
    )
    labels = {
        QUEUE_LABEL: queue,
        PRIORITY_LABEL: priority,
        LEASE_LABEL: lease_seconds,
        REPLY_LABEL: reply_to,
        "step_key": step.key,
    }
    return client.send(
        TASK_EXECUTE_PLAN,
        # The code version lets a worker with other code notice, and reload, before it runs.
        [serialize_value(step_args), dict(recon_job.to_dict()),
         _run_code_version(plan_context.dagster_run.run_id, recon_job)],
        labels,
        task_id=task_id,
    )
