"""A run-priority pair: the same work, tagged so that the urgent run goes first.

``dagster/priority`` orders runs waiting in Dagster's run queue; ``dagster-taskiq/run_priority``
is added to every step's priority in the taskiq queues. Launch both: urgent_report's steps
overtake backfill_report's on a busy worker.
"""

import dagster as dg
from dagster_taskiq.tags import TASKIQ_RUN_PRIORITY_TAG


@dg.op
def build_report(context: dg.OpExecutionContext) -> dict[str, str]:
    priority = context.run.tags.get(TASKIQ_RUN_PRIORITY_TAG, "0")
    context.log.info(f"Building the report with run priority {priority}")
    return {"run_priority": priority}


@dg.graph
def report() -> None:
    build_report()


urgent_report = report.to_job(
    name="urgent_report",
    description="High run priority: its steps overtake lower-priority runs' steps.",
    tags={TASKIQ_RUN_PRIORITY_TAG: "10", "dagster/priority": "10"},
)

backfill_report = report.to_job(
    name="backfill_report",
    description="Low run priority: its steps wait while urgent work is queued.",
    tags={TASKIQ_RUN_PRIORITY_TAG: "-10", "dagster/priority": "-10"},
)
