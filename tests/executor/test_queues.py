"""Queues: a step runs only on a worker listening on its queue; celery tags still route."""

from __future__ import annotations

import threading
import time

from dagster import DagsterInstance

from tests.executor.conftest import execute_test_job, run_config


def _start_job(job_name: str, io_dir: str, broker_url: str, done: threading.Event, out: list):
    def target():
        with DagsterInstance.get() as instance, execute_test_job(
            job_name, instance, run_config(io_dir, broker_url)
        ) as result:
            out.append(result)
        done.set()

    thread = threading.Thread(target=target)
    thread.start()
    return thread


def _multiqueue(job_name: str, start_worker, io_dir: str, broker_url: str, instance) -> None:
    start_worker(name="default")
    done, out = threading.Event(), []
    thread = _start_job(job_name, io_dir, broker_url, done, out)
    time.sleep(3)
    assert not done.is_set(), "the step must wait for a worker on its queue"
    fooworker = start_worker(queues=["fooqueue"], name="foo")
    thread.join(60)
    assert done.is_set()
    result = out[0]
    assert result.success
    step_key = result.all_node_events[0].step_key
    started = [
        r for r in instance.all_logs(result.run_id)
        if r.dagster_event and "in taskiq worker" in (r.dagster_event.message or "")
        and r.step_key == step_key
    ]
    metadata = started[0].dagster_event.engine_event_data.metadata
    assert metadata["taskiq worker"].value == fooworker.name


def test_multiqueue(start_worker, io_dir, broker_url, instance):
    _multiqueue("multiqueue_job", start_worker, io_dir, broker_url, instance)


def test_celery_queue_tag_is_honoured(start_worker, io_dir, broker_url, instance):
    _multiqueue("celery_tag_job", start_worker, io_dir, broker_url, instance)
