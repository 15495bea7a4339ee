"""Each example job runs through the taskiq executor (eager mode) against a real S3 endpoint."""

import dagster as dg
from dagster_taskiq.tags import TASKIQ_PRIORITY_TAG, TASKIQ_QUEUE_TAG, TASKIQ_RUN_PRIORITY_TAG

from my_dagster_project.defs.examples.fan_out import BRANCHES
from my_dagster_project.queues import ALL_QUEUES
from my_dagster_project.storage import S3_PREFIX, s3_client

from .jobs import job_named, run_job


def _keys(bucket: str, prefix: str) -> set[str]:
    listed = s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for item in listed.get("Contents", [])}


def _step_events(result: dg.JobExecutionResult, event_type: dg.DagsterEventType) -> list[str]:
    return [e.step_key for e in result.all_events if e.event_type == event_type and e.step_key]


def test_hello(instance: dg.DagsterInstance, bucket: str) -> None:
    with run_job("hello", instance) as result:
        assert result.success
        assert result.output_for_node("say_hello").startswith("Hello from a taskiq worker")
    # The output went through S3, where any worker can read it.
    assert _keys(bucket, f"{S3_PREFIX}/storage/{result.run_id}/say_hello/")


def test_fan_out_covers_every_queue(instance: dg.DagsterInstance, bucket: str) -> None:
    numbers = list(range(1, 101))
    per_queue = sum(n * n for n in numbers[9::10]) + sum(n * n for n in numbers[1::10])
    with run_job("fan_out", instance) as result:
        assert result.success
        assert result.output_for_node("total") == per_queue * len(ALL_QUEUES)
    job = job_named("fan_out")
    queues = {node.tags.get(TASKIQ_QUEUE_TAG) for node in job.nodes}
    assert queues - {None} == set(ALL_QUEUES)
    priorities = {node.tags.get(TASKIQ_PRIORITY_TAG) for node in job.nodes} - {None}
    assert priorities == {"9", "1"}
    assert len(_step_events(result, dg.DagsterEventType.STEP_SUCCESS)) == len(BRANCHES) + 2


def test_run_priority_pair(instance: dg.DagsterInstance, bucket: str) -> None:
    with run_job("urgent_report", instance) as urgent:
        assert urgent.output_for_node("build_report") == {"run_priority": "10"}
    with run_job("backfill_report", instance) as backfill:
        assert backfill.output_for_node("build_report") == {"run_priority": "-10"}
    assert int(job_named("urgent_report").tags[TASKIQ_RUN_PRIORITY_TAG]) > int(
        job_named("backfill_report").tags[TASKIQ_RUN_PRIORITY_TAG]
    )


def test_assets_are_persisted_to_s3(instance: dg.DagsterInstance, bucket: str) -> None:
    with run_job("asset_pipeline", instance) as result:
        assert result.success
    assert _keys(bucket, f"{S3_PREFIX}/") >= {
        f"{S3_PREFIX}/raw_numbers",
        f"{S3_PREFIX}/number_stats",
    }
    stats = instance.get_latest_materialization_event(dg.AssetKey("number_stats"))
    assert stats is not None


def test_retry_once_succeeds_on_the_second_attempt(
    instance: dg.DagsterInstance, bucket: str
) -> None:
    with run_job("retry_once", instance) as result:
        assert result.success
        assert _step_events(result, dg.DagsterEventType.STEP_UP_FOR_RETRY) == ["flaky_step"]
        assert result.output_for_node("flaky_step") == "Succeeded on attempt 2."
