"""The code location loads, and every job runs on the taskiq executor with S3 storage."""

import dagster as dg
from dagster_aws.s3 import S3PickleIOManager

from my_dagster_project.definitions import defs
from my_dagster_project.queues import ALL_QUEUES, DEFAULT_QUEUE


def test_definitions_load(s3_endpoint: str) -> None:
    loaded = defs()
    dg.Definitions.validate_loadable(loaded)
    assert isinstance(loaded.resources["io_manager"], S3PickleIOManager)


def test_every_job_uses_the_taskiq_executor(s3_endpoint: str) -> None:
    jobs = [job for job in defs().resolve_all_job_defs() if not job.name.startswith("__")]
    assert jobs, "the examples define jobs"
    for job in jobs:
        assert job.executor_def.name == "taskiq", job.name
        assert isinstance(job.resource_defs["io_manager"], dg.ResourceDefinition)


def test_queues_are_unique_and_include_the_default() -> None:
    assert ALL_QUEUES[0] == DEFAULT_QUEUE == "dagster"
    assert len(set(ALL_QUEUES)) == len(ALL_QUEUES)
