"""Tag names users put on ops and runs, and how their values are read.

The ``dagster-celery/*`` tags are honoured as fallbacks so that a project migrating from
dagster-celery works unchanged; when both are set, ours win.
"""

from __future__ import annotations

from collections.abc import Mapping

from dagster import DagsterInvariantViolationError

TASKIQ_QUEUE_TAG = "dagster-taskiq/queue"
TASKIQ_PRIORITY_TAG = "dagster-taskiq/priority"
TASKIQ_RUN_PRIORITY_TAG = "dagster-taskiq/run_priority"
TASKIQ_TASK_ID_TAG = "dagster-taskiq/task_id"

_CELERY_FALLBACKS = {
    TASKIQ_QUEUE_TAG: "dagster-celery/queue",
    TASKIQ_PRIORITY_TAG: "dagster-celery/priority",
    TASKIQ_RUN_PRIORITY_TAG: "dagster-celery/run_priority",
    TASKIQ_TASK_ID_TAG: "dagster-celery/task_id",
}

DEFAULT_STEP_PRIORITY = 5


def tag_value(tags: Mapping[str, str], tag: str) -> tuple[str, str] | None:
    """The (tag name, value) that applies for ``tag``: ours first, then the celery fallback."""
    for name in (tag, _CELERY_FALLBACKS[tag]):
        if name in tags:
            return name, str(tags[name])
    return None


def priority_from_tags(tags: Mapping[str, str], tag: str, default: int, owner: str) -> int:
    """An integer priority from ``tags``; ``owner`` names the step or run in the error."""
    found = tag_value(tags, tag)
    if found is None:
        return default
    name, raw = found
    try:
        return int(raw.strip())
    except ValueError:
        raise DagsterInvariantViolationError(
            f'{owner} has tag {name}="{raw}", which is not an integer priority. '
            "Use a whole number such as 0, 5 or -3 (higher runs first)."
        ) from None
