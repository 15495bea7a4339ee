"""Resources and the default executor of every job in this code location (as in the template)."""

import dagster as dg

from bench_defs_project.storage import s3_io_manager, s3_resource
from dagster_taskiq import taskiq_executor


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={"s3": s3_resource(), "io_manager": s3_io_manager()},
        executor=taskiq_executor,
    )
