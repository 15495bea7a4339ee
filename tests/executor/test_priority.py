"""Priorities: orchestrator order (eager) and broker order across runs (real worker)."""

from __future__ import annotations

import threading
import time

from dagster import DagsterEventType, DagsterInstance

from tests.conftest import wait_for
from tests.executor.conftest import eager_config, execute_test_job, run_config
from tests.executor.repo import PRIORITY_NAMES


def test_eager_priority_job(instance, io_dir):
    with execute_test_job("simple_priority_job", instance, eager_config(io_dir)) as result:
        assert result.success
        order = []
        for event in result.all_events:
            if event.step_key and event.step_key not in order:
                order.append(event.step_key)
    assert order == list(reversed(PRIORITY_NAMES))


def _run_in_thread(job_name: str, io_dir: str, broker_url: str, tags: dict, done: list):
    def target():
        with DagsterInstance.get() as instance, execute_test_job(
            job_name, instance, run_config(io_dir, broker_url), tags=tags
        ) as result:
            done.append((job_name, result.success))

    thread = threading.Thread(target=target)
    thread.start()
    return thread


def _queued(instance: DagsterInstance) -> int:
    return sum(
        1
        for run in instance.get_runs()
        for record in instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT)
        if "Submitting taskiq task" in (record.dagster_event.message or "")
    )


def test_run_priority_job(start_worker, instance, io_dir, broker_url):
    """Both runs queue all their steps before any worker exists; the worker then takes every
    step of the high-priority run (submitted second) before any of the low one."""
    done: list = []
    low = _run_in_thread("low_job", io_dir, broker_url,
                         {"dagster-taskiq/run_priority": "-3"}, done)
    wait_for(lambda: _queued(instance) >= 5, 60, "the low run's steps to be queued")
    hi = _run_in_thread("hi_job", io_dir, broker_url,
                        {"dagster-taskiq/run_priority": "3"}, done)
    wait_for(lambda: _queued(instance) >= 10, 60, "the high run's steps to be queued")
    time.sleep(0.2)
    start_worker(concurrency=1)
    low.join(120)
    hi.join(120)
    assert sorted(done) == [("hi_job", True), ("low_job", True)]

    starts = []
    for run in instance.get_runs():
        for record in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START):
            starts.append((record.timestamp, record.step_key))
    order = [key for _, key in sorted(starts)]
    assert all(key.startswith("hi_") for key in order[:5]), order
    assert all(key.startswith("low_") for key in order[5:]), order
