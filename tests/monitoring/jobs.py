"""A job that gives every dashboard panel something to show: two queues, several priorities,
a slow step, a step that fails once then succeeds on retry, and a step whose process dies.

Workers rebuild it from its file (``ReconstructableJob.for_file``): no side effects at import.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from dagster import FilesystemIOManager, RetryPolicy, in_process_executor, job, op

from dagster_taskiq import taskiq_executor
from dagster_taskiq.tags import TASKIQ_PRIORITY_TAG, TASKIQ_QUEUE_TAG


def _prioritized(priority: int):
    @op(name=f"priority_{priority}", tags={TASKIQ_PRIORITY_TAG: str(priority)})
    def _op() -> int:
        time.sleep(0.5)  # keeps the others waiting on the queue, where the exporter sees them
        return priority

    return _op


@op
def slow() -> None:
    time.sleep(3)


@op(retry_policy=RetryPolicy(max_retries=1))
def flaky(context) -> None:
    marker = Path(context.instance.root_directory) / f"{context.run_id}-flaky"
    if not marker.exists():
        marker.write_text("failed once")
        raise RuntimeError("fails on its first attempt")


@op
def crashes() -> None:
    os._exit(1)  # the step's process dies: a lost step


@op(tags={TASKIQ_QUEUE_TAG: "side"})
def on_side_queue() -> None:
    time.sleep(1)


@op(tags={TASKIQ_QUEUE_TAG: "side"})
def waits_on_side_queue() -> None:
    pass


@job(executor_def=taskiq_executor, resource_defs={"io_manager": FilesystemIOManager()})
def monitored_job():
    for priority in (1, 5, 9):
        _prioritized(priority)()
    slow()
    flaky()
    crashes()
    on_side_queue()


@job(executor_def=taskiq_executor, resource_defs={"io_manager": FilesystemIOManager()})
def side_queue_job():
    waits_on_side_queue()


@op
def nothing() -> None:
    pass


@job(executor_def=in_process_executor)
def quick_job():
    """Runs twice: Prometheus sees a histogram series grow only from its second sample on."""
    nothing()
