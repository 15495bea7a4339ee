"""TaskiqRunLauncher on real workers (dagster-celery's test_launcher, and more)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance, DagsterRunStatus
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.launcher import WorkerStatus
from dagster._daemon.monitoring.run_monitoring import monitor_started_run

from dagster_taskiq.launcher import TaskiqRunLauncher
from dagster_taskiq.tags import TASKIQ_TASK_ID_TAG
from tests.conftest import wait_for

RUNNER_FILE = str(Path(__file__).with_name("repo_runner.py"))
QUEUE = "custom-queue"
# As dagster-celery's launcher tests: the default executor, run in the run worker's process.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}


def _write_instance_yaml(home: Path, broker_url: str, resume_attempts: int = 0) -> None:
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "telemetry": {"enabled": False},
        "run_launcher": {
            "module": "dagster_taskiq.launcher",
            "class": "TaskiqRunLauncher",
            "config": {"broker": broker_url, "default_queue": QUEUE,
                       "worker_heartbeat_timeout": 3.0},
        },
        "run_monitoring": {"enabled": True, "start_timeout_seconds": 30,
                           "cancel_timeout_seconds": 30, "poll_interval_seconds": 4,
                           "max_resume_run_attempts": resume_attempts},
    }))


@pytest.fixture
def launcher_instance(dagster_home, broker_url):
    _write_instance_yaml(dagster_home, broker_url)
    with DagsterInstance.get() as instance:
        assert isinstance(instance.run_launcher, TaskiqRunLauncher)
        yield instance


def _launch(instance: DagsterInstance, job_name: str, tags=None):
    recon = ReconstructableJob.for_file(RUNNER_FILE, job_name)
    run_config = {} if job_name.startswith("taskiq_") else IN_PROCESS
    run = instance.create_run_for_job(
        job_def=recon.get_definition(), run_config=run_config, tags=tags,
        job_code_origin=recon.get_python_origin(),
    )
    instance.launch_run(run.run_id, workspace=None)  # our launcher needs no workspace
    return run


def _finished(instance: DagsterInstance, run_id: str, timeout: float = 60):
    def done():
        run = instance.get_run_by_id(run_id)
        return run if run.status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE,
                                     DagsterRunStatus.CANCELED) else None

    return wait_for(done, timeout, f"run {run_id} to finish")


def _logs(instance: DagsterInstance, run_id: str) -> str:
    return "\n".join((r.dagster_event.message if r.dagster_event else r.user_message) or ""
                     for r in instance.all_logs(run_id))


def _step_started(instance: DagsterInstance, run_id: str, timeout: float = 60):
    def started():
        return any(r.dagster_event and r.dagster_event.event_type_value == "STEP_START"
                   for r in instance.all_logs(run_id))

    wait_for(started, timeout, "the step to start")


def _monitor(instance: DagsterInstance, run_id: str) -> None:
    record = instance.get_run_record_by_id(run_id)
    assert record.dagster_run.status == DagsterRunStatus.STARTED, record.dagster_run.status
    monitor_started_run(instance, None, record, logging.getLogger("test"))


def test_successful_run(start_worker, launcher_instance):
    start_worker(queues=[QUEUE])
    run = _launch(launcher_instance, "noop_job")
    finished = _finished(launcher_instance, run.run_id)
    assert finished.status == DagsterRunStatus.SUCCESS
    assert finished.tags[TASKIQ_TASK_ID_TAG]
    assert "Taskiq task has been forwarded to the broker." in _logs(launcher_instance, run.run_id)
    # The run's task ends (and stores its result) just after the run itself.
    launcher = launcher_instance.run_launcher
    wait_for(lambda: launcher.check_run_worker_health(finished).status == WorkerStatus.SUCCESS,
             15, "the run's task to report success")


def test_crashy_run(start_worker, launcher_instance):
    """The run's process dies (os._exit): the health check says FAILED, monitoring fails it."""
    start_worker(queues=[QUEUE])
    run = _launch(launcher_instance, "crashy_job")
    _step_started(launcher_instance, run.run_id)

    def reported_failed():
        current = launcher_instance.get_run_by_id(run.run_id)
        health = launcher_instance.run_launcher.check_run_worker_health(current)
        return health if health.status == WorkerStatus.FAILED else None

    health = wait_for(reported_failed, 15, "the health check to report the crash")
    assert "exit code 1" in health.msg
    _monitor(launcher_instance, run.run_id)
    assert launcher_instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE


def test_exity_run(start_worker, launcher_instance):
    start_worker(queues=[QUEUE])
    run = _launch(launcher_instance, "exity_job")
    finished = _finished(launcher_instance, run.run_id)
    assert finished.status == DagsterRunStatus.FAILURE
    logs = _logs(launcher_instance, run.run_id)
    assert 'Execution of step "exity_op" failed.' in logs
    assert "Execution of run for \"exity_job\" failed. Steps failed: ['exity_op']" in logs


def test_terminated_run(start_worker, launcher_instance):
    start_worker(queues=[QUEUE])
    run = _launch(launcher_instance, "sleepy_job")
    _step_started(launcher_instance, run.run_id)
    started = time.monotonic()
    assert launcher_instance.run_launcher.terminate(run.run_id)
    finished = _finished(launcher_instance, run.run_id, timeout=30)
    assert finished.status == DagsterRunStatus.CANCELED
    assert time.monotonic() - started < 15
    assert not launcher_instance.run_launcher.terminate(run.run_id), "already finished"


def test_terminate_queued_run(launcher_instance):
    """No worker yet: terminating drops the task from its queue and cancels the run at once."""
    run = _launch(launcher_instance, "noop_job")
    assert launcher_instance.run_launcher.terminate(run.run_id)
    assert launcher_instance.get_run_by_id(run.run_id).status == DagsterRunStatus.CANCELED


def test_run_and_its_taskiq_steps_on_one_worker_of_concurrency_one(start_worker,
                                                                    launcher_instance):
    """Run tasks have their own slots: a run never starves the steps it submits."""
    start_worker(queues=[QUEUE, "dagster"], concurrency=1)
    run = _launch(launcher_instance, "taskiq_math_diamond")
    assert _finished(launcher_instance, run.run_id).status == DagsterRunStatus.SUCCESS
    logs = _logs(launcher_instance, run.run_id)
    assert logs.count("in taskiq worker") == 4


def test_terminate_stops_running_taskiq_step(start_worker, launcher_instance):
    """Cancelling a run stops its running step within seconds, and the worker goes on."""
    worker = start_worker(queues=[QUEUE, "dagster"], concurrency=1)
    run = _launch(launcher_instance, "taskiq_sleepy_job")
    _step_started(launcher_instance, run.run_id)
    step_pids = [
        int(r.dagster_event.engine_event_data.metadata["pid"].value)
        for r in launcher_instance.all_logs(run.run_id)
        if r.dagster_event and "in taskiq worker" in (r.dagster_event.message or "")
    ]
    assert len(step_pids) == 1
    started = time.monotonic()
    assert launcher_instance.run_launcher.terminate(run.run_id)
    finished = _finished(launcher_instance, run.run_id, timeout=30)
    assert finished.status in (DagsterRunStatus.CANCELED, DagsterRunStatus.FAILURE)
    wait_for(lambda: not _alive(step_pids[0]), 10, "the step's process to end")
    assert time.monotonic() - started < 12
    assert worker.process.poll() is None
    follow_up = _launch(launcher_instance, "noop_job")
    assert _finished(launcher_instance, follow_up.run_id).status == DagsterRunStatus.SUCCESS


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_worker_killed_mid_run_fails_the_run(start_worker, launcher_instance):
    worker = start_worker(queues=[QUEUE])
    run = _launch(launcher_instance, "sleepy_job")
    _step_started(launcher_instance, run.run_id)
    worker.kill()
    killed = time.monotonic()

    def reported_failed():
        current = launcher_instance.get_run_by_id(run.run_id)
        health = launcher_instance.run_launcher.check_run_worker_health(current)
        return health if health.status == WorkerStatus.FAILED else None

    health = wait_for(reported_failed, 20, "the lost run to be detected")
    assert time.monotonic() - killed < 2 * 3.0 + 2  # twice worker_heartbeat_timeout, plus a reap
    assert "stopped heartbeating" in health.msg
    _monitor(launcher_instance, run.run_id)
    assert launcher_instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE


def test_resume_after_the_run_worker_died(start_worker, dagster_home, broker_url):
    """Run monitoring resumes a run whose worker process died; the resumed run finishes."""
    _write_instance_yaml(dagster_home, broker_url, resume_attempts=1)
    with DagsterInstance.get() as instance:
        start_worker(queues=[QUEUE])
        run = _launch(instance, "crash_once_job")

        def failed():
            current = instance.get_run_by_id(run.run_id)
            status = instance.run_launcher.check_run_worker_health(current).status
            return status == WorkerStatus.FAILED

        wait_for(failed, 30, "the crash")
        _monitor(instance, run.run_id)  # resumes: a resume_job task
        finished = _finished(instance, run.run_id)
        assert finished.status == DagsterRunStatus.SUCCESS, _logs(instance, run.run_id)
        assert "Resuming run" in _logs(instance, run.run_id)
