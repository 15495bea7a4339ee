"""Bad input gets a clear error, fast, and nothing is submitted."""

from __future__ import annotations

import time

import pytest
from dagster import DagsterEventType, DagsterInvalidConfigError, job, mem_io_manager, op

from dagster_taskiq import taskiq_executor
from dagster_taskiq.config import mask_url
from tests.conftest import free_port
from tests.executor.conftest import execute_test_job, run_config


def _failure_text(instance, run_id: str) -> str:
    texts = []
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None:
            continue
        texts.append(event.message or "")
        data = event.event_specific_data
        error = getattr(data, "error", None)
        if error is not None:
            texts.append(error.to_string())
    return "\n".join(texts)


def _submitted(instance, run_id: str) -> int:
    return sum(
        "Submitting taskiq task" in (r.dagster_event.message or "")
        for r in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT)
    )


def test_unreachable_broker_fails_fast_with_masked_url(instance, io_dir):
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    with execute_test_job("test_job", instance, run_config(io_dir, url)) as result:
        assert not result.success
        text = _failure_text(instance, result.run_id)
    assert time.monotonic() - started < 15
    assert "Cannot reach the taskiq broker at redis://:***@127.0.0.1" in text
    assert "s3cret-pw" not in text
    assert _submitted(instance, result.run_id) == 0


def _refused(instance, config, error=Exception, match: str = "") -> None:
    with (
        pytest.raises(error, match=match),
        execute_test_job("test_job", instance, config, raise_on_error=True),
    ):
        pass


def test_unsupported_broker_scheme(instance, io_dir):
    config = run_config(io_dir, "amqp://guest:pw@localhost:5672//")
    _refused(instance, config, match=r"Unsupported broker URL 'amqp://guest:\*\*\*@localhost")


def test_non_integer_priority_tag_names_step_and_tag(instance, io_dir, broker_url):
    with execute_test_job("bad_priority_job", instance, run_config(io_dir, broker_url)) as result:
        assert not result.success
        text = _failure_text(instance, result.run_id)
    assert 'Step "bad_priority_op" has tag dagster-taskiq/priority="high"' in text
    assert _submitted(instance, result.run_id) == 0


def test_non_integer_run_priority(instance, io_dir, broker_url):
    tags = {"dagster-celery/run_priority": "urgent"}
    with execute_test_job("test_job", instance, run_config(io_dir, broker_url), tags=tags) as r:
        assert not r.success
        assert 'has tag dagster-celery/run_priority="urgent"' in _failure_text(instance, r.run_id)


@op
def _value() -> int:
    return 1


@op
def _consume(value: int) -> int:
    return value


@job(executor_def=taskiq_executor, resource_defs={"io_manager": mem_io_manager})
def in_memory_job():
    _consume(_value())


def test_in_memory_io_manager_is_refused(instance, broker_url):
    from dagster import execute_job, reconstructable

    with pytest.raises(Exception) as raised, execute_job(
        reconstructable(in_memory_job), instance=instance,
        run_config={"execution": {"config": {"broker": broker_url}}}, raise_on_error=True,
    ):
        pass
    message = str(raised.value)
    assert ("Cannot use in-memory storage with taskiq" in message
            or "persistent" in message.lower()), message
    for run in instance.get_runs():
        assert _submitted(instance, run.run_id) == 0


def test_unknown_executor_config_key(instance, io_dir, broker_url):
    config = run_config(io_dir, broker_url)
    config["execution"]["config"]["brokr"] = broker_url
    _refused(instance, config, DagsterInvalidConfigError, "brokr")


def test_unknown_config_source_key(instance, io_dir, broker_url):
    config = run_config(io_dir, broker_url, config_source={"no_such_option": 1})
    _refused(instance, config, match=r"Unknown config_source key\(s\) \['no_such_option'\]")


def test_celery_config_source_key_is_explained(instance, io_dir, broker_url):
    # A dagster-celery setting: explained (see test_config.py for every key), not just unknown.
    config = run_config(io_dir, broker_url, config_source={"visibility_timeout": 18000})
    _refused(instance, config, match=r"visibility_timeout: drop it: leases replace it")


def test_mask_url():
    assert mask_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert mask_url("rediss://user:pw@h/0") == "rediss://user:***@h/0"
    assert mask_url("redis://h:6379/0") == "redis://h:6379/0"
