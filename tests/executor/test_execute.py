"""dagster-celery's test_execute behaviours, on real workers and eagerly."""

from __future__ import annotations

import threading
from unittest import mock

import pytest
from dagster import DagsterEventType
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.errors import DagsterSubprocessError
from dagster._core.execution.api import execute_run_iterator
from dagster._utils import send_interrupt

from tests.executor.conftest import (
    REPO_FILE,
    eager_config,
    events_of_type,
    execute_test_job,
    run_config,
)

SERIAL_COUNTS = {
    "STEP_START": 2,
    "STEP_INPUT": 1,
    "STEP_OUTPUT": 2,
    "HANDLED_OUTPUT": 2,
    "LOADED_INPUT": 1,
    "STEP_SUCCESS": 2,
}


def _assert_simple(result) -> None:
    assert result.success
    assert result.output_for_node("simple") == 1
    assert len(result.all_node_events) == 4
    for event_type in ("STEP_START", "STEP_OUTPUT", "HANDLED_OUTPUT", "STEP_SUCCESS"):
        assert len(events_of_type(result, event_type)) == 1, event_type


def _assert_serial(result) -> None:
    assert result.success
    assert result.output_for_node("simple") == 1
    assert result.output_for_node("add_one") == 2
    assert len(result.all_node_events) == 10
    for event_type, count in SERIAL_COUNTS.items():
        assert len(events_of_type(result, event_type)) == count, event_type


def _assert_diamond(result) -> None:
    assert result.success
    assert result.output_for_node("emit_values", "value_one") == 1
    assert result.output_for_node("emit_values", "value_two") == 2
    assert result.output_for_node("add_one") == 2
    assert result.output_for_node("renamed") == 3
    assert result.output_for_node("subtract") == -1


def _assert_fails(result) -> None:
    assert not result.success
    assert len(events_of_type(result, "STEP_FAILURE")) == 1
    assert result.is_node_failed("fails")
    assert "Exception: argjhgjh\n" in result.failure_data_for_node("fails").error.cause.message
    assert result.is_node_untouched("should_never_execute")


def _assert_optional(result) -> None:
    assert result.success
    assert len(events_of_type(result, "STEP_SUCCESS")) == 2
    assert len(events_of_type(result, "STEP_SKIPPED")) == 2


# ---- on real workers ---------------------------------------------------------------------------


@pytest.fixture
def worker(start_worker):
    return start_worker()


def test_execute_on_taskiq_default(worker, instance, io_dir, broker_url):
    with execute_test_job("test_job", instance, run_config(io_dir, broker_url)) as result:
        _assert_simple(result)


def test_execute_serial_on_taskiq(worker, instance, io_dir, broker_url):
    with execute_test_job("test_serial_job", instance, run_config(io_dir, broker_url)) as result:
        _assert_serial(result)


def test_execute_diamond_job_on_taskiq(worker, instance, io_dir, broker_url):
    with execute_test_job("test_diamond_job", instance, run_config(io_dir, broker_url)) as result:
        _assert_diamond(result)


def test_execute_parallel_job_on_taskiq(start_worker, instance, io_dir, broker_url):
    start_worker(concurrency=2)
    with execute_test_job("test_parallel_job", instance, run_config(io_dir, broker_url)) as result:
        assert result.success
        assert len(events_of_type(result, "STEP_SUCCESS")) == 11


def test_execute_composite_job_on_taskiq(worker, instance, io_dir, broker_url):
    with execute_test_job("composite_job", instance, run_config(io_dir, broker_url)) as result:
        assert result.success
        assert len(events_of_type(result, "STEP_SUCCESS")) == 4


def test_execute_optional_outputs_job_on_taskiq(worker, instance, io_dir, broker_url):
    config = run_config(io_dir, broker_url)
    with execute_test_job("test_optional_outputs", instance, config) as result:
        _assert_optional(result)


def test_execute_fails_job_on_taskiq(worker, instance, io_dir, broker_url):
    with execute_test_job("test_fails", instance, run_config(io_dir, broker_url)) as result:
        _assert_fails(result)


def test_execute_retries_job_on_taskiq(worker, instance, io_dir, broker_url):
    with execute_test_job("test_retries", instance, run_config(io_dir, broker_url)) as result:
        assert not result.success
        assert len(events_of_type(result, "STEP_START")) == 1
        assert len(events_of_type(result, "STEP_UP_FOR_RETRY")) == 1
        assert len(events_of_type(result, "STEP_RESTARTED")) == 1
        assert len(events_of_type(result, "STEP_FAILURE")) == 1


def test_steps_run_in_worker_child_processes(worker, instance, io_dir, broker_url):
    """Each step runs in its own process forked by the worker, never in the orchestrator."""
    import os

    with execute_test_job("pid_job", instance, run_config(io_dir, broker_url)) as result:
        assert result.success
        step_pid = result.output_for_node("report_pid")
    assert step_pid not in (os.getpid(), worker.process.pid)
    starts = [e for e in instance.all_logs(result.run_id)
              if e.dagster_event and e.dagster_event.event_type_value == "ENGINE_EVENT"
              and "in taskiq worker" in (e.dagster_event.message or "")]
    assert len(starts) == 3
    assert all(e.dagster_event.engine_event_data.metadata["taskiq worker"].value == worker.name
               for e in starts)


def test_terminate_job_on_taskiq(start_worker, instance, io_dir, broker_url):
    """An interrupt revokes the queued steps; the run fails without hanging."""
    start_worker(concurrency=2)
    recon_job = ReconstructableJob.for_file(REPO_FILE, "interrupt_job")
    config = run_config(io_dir, broker_url)
    run = instance.create_run_for_job(job_def=recon_job.get_definition(), run_config=config)
    interrupted = threading.Event()
    results = []
    for event in execute_run_iterator(recon_job, run, instance=instance):
        results.append(event)
        if event.event_type == DagsterEventType.STEP_START and not interrupted.is_set():
            interrupted.set()
            threading.Thread(target=send_interrupt).start()

    types = [event.event_type for event in results]
    assert DagsterEventType.STEP_SUCCESS in types
    assert DagsterEventType.RUN_FAILURE in types
    revoked = [e for e in results if e.event_type == DagsterEventType.ENGINE_EVENT
               and "was revoked." in (e.message or "")]
    assert revoked or DagsterEventType.STEP_FAILURE in types
    # Far fewer than all 20 sleeps ran: the queued ones were dropped from the broker.
    assert types.count(DagsterEventType.STEP_SUCCESS) < 20
    assert instance.get_run_by_id(run.run_id).is_failure


# ---- eagerly (no broker) -----------------------------------------------------------------------


def test_execute_eagerly_on_taskiq(instance, io_dir):
    with execute_test_job("test_job", instance, eager_config(io_dir)) as result:
        _assert_simple(result)
        run_id = result.run_id

    # The submit event and the worker's "Executing steps" event carry the same marker.
    starts, ends = {}, {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or event.event_type_value != "ENGINE_EVENT":
            continue
        data = event.engine_event_data
        if data.marker_start:
            starts[f"{event.step_key}.{data.marker_start}"] = record.timestamp
        if data.marker_end:
            ends[f"{event.step_key}.{data.marker_end}"] = record.timestamp
    assert starts and set(starts) == set(ends)
    for key, started in starts.items():
        assert ends[key] - started > 0


def test_execute_eagerly_serial_on_taskiq(instance, io_dir):
    with execute_test_job("test_serial_job", instance, eager_config(io_dir)) as result:
        _assert_serial(result)


def test_execute_eagerly_diamond_job_on_taskiq(instance, io_dir):
    with execute_test_job("test_diamond_job", instance, eager_config(io_dir)) as result:
        _assert_diamond(result)


def test_execute_eagerly_diamond_job_subset_on_taskiq(instance, io_dir):
    with execute_test_job(
        "test_diamond_job", instance, eager_config(io_dir), subset=["emit_values"]
    ) as result:
        assert result.success
        assert result.output_for_node("emit_values", "value_one") == 1
        assert result.output_for_node("emit_values", "value_two") == 2
        assert len(events_of_type(result, "STEP_SUCCESS")) == 1


def test_execute_eagerly_parallel_job_on_taskiq(instance, io_dir):
    with execute_test_job("test_parallel_job", instance, eager_config(io_dir)) as result:
        assert result.success
        assert len(events_of_type(result, "STEP_SUCCESS")) == 11


def test_execute_eagerly_composite_job_on_taskiq(instance, io_dir):
    with execute_test_job("composite_job", instance, eager_config(io_dir)) as result:
        assert result.success
        assert len(events_of_type(result, "STEP_SUCCESS")) == 4


def test_execute_eagerly_optional_outputs_job_on_taskiq(instance, io_dir):
    with execute_test_job("test_optional_outputs", instance, eager_config(io_dir)) as result:
        _assert_optional(result)


def test_execute_eagerly_resources_limit_job_on_taskiq(instance, io_dir):
    with execute_test_job("test_resources_limit", instance, eager_config(io_dir)) as result:
        assert result.success
        assert result.is_node_success("resource_req_op")


def test_execute_eagerly_fails_job_on_taskiq(instance, io_dir):
    with execute_test_job("test_fails", instance, eager_config(io_dir)) as result:
        _assert_fails(result)


def test_execute_eagerly_retries_job_on_taskiq(instance, io_dir):
    with execute_test_job("test_retries", instance, eager_config(io_dir)) as result:
        assert len(events_of_type(result, "STEP_START")) == 1
        assert len(events_of_type(result, "STEP_UP_FOR_RETRY")) == 1
        assert len(events_of_type(result, "STEP_RESTARTED")) == 1
        assert len(events_of_type(result, "STEP_FAILURE")) == 1


def test_engine_error(instance, io_dir):
    """An error outside the step's own handling surfaces as DagsterSubprocessError."""
    config = eager_config(io_dir)
    config["ops"] = {"destroy": {"config": "flakey"}}
    with (
        mock.patch(
            "dagster._core.execution.context.system.PlanData.raise_on_error",
            return_value=True,
        ),
        pytest.raises(DagsterSubprocessError, match="During taskiq execution errors occurred"),
        execute_test_job("engine_error", instance, config),
    ):
        pass
