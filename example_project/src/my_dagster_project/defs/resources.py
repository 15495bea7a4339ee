"""Resources and the default executor of every job in this code location."""

import dagster as dg
from dagster_taskiq import taskiq_executor

from my_dagster_project.storage import s3_io_manager, s3_resource


@dg.definitions
def resources() -> dg.Definitions:
    # Each step runs as a taskiq task on a worker; outputs go through S3 so any worker can
    # read what another wrote. Override per run in the launchpad's `execution:` block.
    return dg.Definitions(
        resources={"s3": s3_resource(), "io_manager": s3_io_manager()},
        executor=taskiq_executor,
    )
