"""What a run's event log says about its taskiq tasks: the durable record of which task
carries which step. The orchestrator's submit event and the worker's start event each name the
task (``TASK_ID_METADATA``), so a resumed orchestrator, a terminate or a lost reply can find a
step's task without trusting anything Redis may have lost."""

from __future__ import annotations

from collections.abc import Iterable

from dagster import DagsterEventType, DagsterInstance
from dagster._core.events import DagsterEvent

TASK_ID_METADATA = "taskiq task id"
QUEUE_WAIT_MARKER = "taskiq_queue_wait"  # from a step's submit event to its worker's first


def metadata_text(event: DagsterEvent, label: str) -> str | None:
    data = event.engine_event_data
    value = data.metadata.get(label) if data is not None else None
    return getattr(value, "text", None) if value is not None else None


def task_of_step(events: Iterable[DagsterEvent]) -> dict[str, str]:
    """Each step's latest task, from the engine events that name one."""
    latest: dict[str, str] = {}
    for event in events:
        task_id = metadata_text(event, TASK_ID_METADATA) if event.is_engine_event else None
        if task_id and event.step_key:
            latest[event.step_key] = task_id
    return latest


def run_events(instance: DagsterInstance, run_id: str,
               of_type: DagsterEventType | set[DagsterEventType] | None = None
               ) -> list[DagsterEvent]:
    records = instance.get_records_for_run(
        run_id, of_type=of_type or set(DagsterEventType)).records
    return [r.event_log_entry.dagster_event for r in records
            if r.event_log_entry.dagster_event is not None]
