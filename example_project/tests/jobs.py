"""Helpers to run this code location's jobs the way Dagster does, with the taskiq executor."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg

from my_dagster_project.definitions import defs

# No broker needed: every step runs in this process through taskiq's in-memory broker, with
# the same task code and events as on real workers.
EAGER_RUN_CONFIG: dict[str, Any] = {
    "execution": {"config": {"config_source": {"task_always_eager": True}}}
}


def job_named(name: str) -> dg.JobDefinition:
    """Module-level, so Dagster can rebuild the job by reference (as workers do)."""
    return defs().resolve_job_def(name)


@contextmanager
def run_job(
    name: str, instance: dg.DagsterInstance, raise_on_error: bool = True
) -> Iterator[dg.JobExecutionResult]:
    """Run job ``name``; its outputs can be read (from S3) inside the ``with`` block."""
    job = dg.build_reconstructable_job(__name__, job_named.__name__, (name,))
    with dg.execute_job(
        job, instance=instance, run_config=EAGER_RUN_CONFIG, raise_on_error=raise_on_error
    ) as result:
        yield result
