"""TaskiqRunLauncher on real workers (dagster-celery's test_launcher, and more)."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.launcher import WorkerStatus
from dagster._daemon.monitoring.run_monitoring import monitor_started_run, monitor_starting_run

from dagster_taskiq.broker import BrokerUnavailable
from dagster_taskiq.config import DEFAULT_KEY_PREFIX as P
from dagster_taskiq.launcher import TaskiqRunLauncher
from dagster_taskiq.tags import TASKIQ_TASK_ID_TAG
from tests.conftest import start_redis, sync_redis, wait_for
from tests.executor.repo_runner import HOLD_FILE

RUNNER_FILE = str(Path(__file__).with_name("repo_runner.py"))
QUEUE = "custom-queue"
# As dagster-celery's launcher tests: the default executor, run in the run worker's process.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}


def _write_instance_yaml(home: Path, broker_url: str, resume_attempts: int = 0,
                        start_timeout: float = 30) -> None:
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "telemetry": {"enabled": False},
        "run_launcher": {
            "module": "dagster_taskiq.launcher",
            "class": "TaskiqRunLauncher",
            "config": {"broker": broker_url, "default_queue": QUEUE,
                       "worker_heartbeat_timeout": 3.0},
        },
        "run_monitoring": {"enabled": True, "start_timeout_seconds": start_timeout,
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


def _monitor_starting(instance: DagsterInstance, run_id: str) -> DagsterRunStatus:
    """One pass of Dagster's own start-timeout check, as the daemon makes it."""
    record = instance.get_run_record_by_id(run_id)
    if record.dagster_run.status == DagsterRunStatus.STARTING:
        monitor_starting_run(instance, record, logging.getLogger("test"))
    return instance.get_run_by_id(run_id).status


def test_a_run_queued_behind_busy_workers_outlives_the_start_timeout(start_worker, dagster_home,
                                                                      broker_url):
    """The only worker is busy; a second run waits in the broker's run queue for three start
    timeouts. Run monitoring does not fail it (before, it did after 180 s in the template), and
    it runs once the worker is free."""
    _write_instance_yaml(dagster_home, broker_url, start_timeout=4)
    with DagsterInstance.get() as instance:
        start_worker(queues=[QUEUE])
        busy = _launch(instance, "sleepy_job")
        _step_started(instance, busy.run_id)
        waiting = _launch(instance, "noop_job")
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            assert _monitor_starting(instance, waiting.run_id) == DagsterRunStatus.STARTING, \
                _logs(instance, waiting.run_id)
            time.sleep(0.5)
        assert "Still waiting in taskiq run queue" in _logs(instance, waiting.run_id)
        instance.run_launcher.terminate(busy.run_id)
        assert _finished(instance, waiting.run_id).status == DagsterRunStatus.SUCCESS


def test_a_run_on_a_queue_no_worker_serves_times_out_with_the_reason(dagster_home, broker_url):
    _write_instance_yaml(dagster_home, broker_url, start_timeout=2)
    with DagsterInstance.get() as instance:
        run = _launch(instance, "noop_job")
        wait_for(lambda: _monitor_starting(instance, run.run_id) == DagsterRunStatus.FAILURE,
                 15, "the start timeout")
        logs = _logs(instance, run.run_id)
        assert f'waits in queue "{QUEUE}"; no live worker serves that queue' in logs, logs


def test_a_queued_resume_is_healthy_and_never_stacked(start_worker, dagster_home, broker_url):
    """The run's worker dies; run monitoring resumes the run, but no worker is free yet: the
    queued resume counts as healthy, so further monitoring passes send no second resume."""
    _write_instance_yaml(dagster_home, broker_url, resume_attempts=3)
    with DagsterInstance.get() as instance:
        worker = start_worker(queues=[QUEUE])
        run = _launch(instance, "crash_once_job")
        launcher = instance.run_launcher

        def failed():
            current = instance.get_run_by_id(run.run_id)
            return launcher.check_run_worker_health(current).status == WorkerStatus.FAILED

        wait_for(failed, 30, "the run's process to crash")
        worker.stop()  # no worker to take the resume yet
        for _ in range(3):
            _monitor(instance, run.run_id)
        logs = _logs(instance, run.run_id)
        assert logs.count("Resuming run") == 1, logs
        server = sync_redis(broker_url)
        assert server.zcard(f"{P}:runs:{QUEUE}") == 1
        health = launcher.check_run_worker_health(instance.get_run_by_id(run.run_id))
        assert health.status == WorkerStatus.RUNNING and "waiting for a free worker" in health.msg
        start_worker(queues=[QUEUE])
        assert _finished(instance, run.run_id).status == DagsterRunStatus.SUCCESS, \
            _logs(instance, run.run_id)


def test_launch_gives_up_within_seconds_when_redis_is_down(dagster_home, tmp_path):
    """The daemon and the webserver launch runs: a dead broker fails the launch with a clear
    error in seconds instead of blocking them for the client's five-minute outage patience."""
    server = start_redis(tmp_path)
    try:
        _write_instance_yaml(dagster_home, server.url())
        with DagsterInstance.get() as instance:
            instance.run_launcher.client  # connected while Redis was up  # noqa: B018
            server.process.kill()
            server.process.wait(10)
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1"):
                _launch(instance, "noop_job")
            assert time.monotonic() - started < 30
    finally:
        server.process.kill()
        server.process.wait(10)


def test_a_rolling_restart_of_every_worker_loses_no_run(start_worker, dagster_home, broker_url):
    """Three runs of a chain of 3 s steps on two workers; each worker in turn is stopped
    gracefully (a replacement first) with a shutdown timeout too short to finish: its steps go
    back to their queue, its run orchestrators to run monitoring, which resumes them. Every run
    succeeds and no step ever runs twice at once. Steps are held in flight until every old
    worker is stopped, so the restart always finds work to hand back, however slow the
    replacements are to start."""
    _write_instance_yaml(dagster_home, broker_url, resume_attempts=3)
    queues = [QUEUE, "dagster"]
    graceful = ["--shutdown-timeout", "1"]
    with DagsterInstance.get() as instance:
        workers = [start_worker(queues=queues, concurrency=2, args=graceful) for _ in range(2)]
        hold = Path(instance.root_directory) / HOLD_FILE
        hold.touch()
        runs = [_launch(instance, "taskiq_recorded_chain") for _ in range(3)]
        attempts = Path(instance.root_directory) / "attempts.jsonl"
        wait_for(lambda: attempts.exists() and len(attempts.read_text().splitlines()) >= 2,
                 60, "steps of the runs to start")
        done = threading.Event()

        def daemon() -> None:  # run monitoring, as the daemon does it (every half second here)
            while not done.wait(0.5):
                for run in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED])):
                    record = instance.get_run_record_by_id(run.run_id)
                    if record.dagster_run.status == DagsterRunStatus.STARTED:  # not ended since
                        monitor_started_run(instance, None, record, logging.getLogger("test"))

        monitoring = threading.Thread(target=daemon, daemon=True)
        monitoring.start()
        try:
            for old in list(workers):
                workers.append(start_worker(queues=queues, concurrency=2, args=graceful))
                assert old.stop() == 0
                time.sleep(2)
            hold.unlink()
            wait_for(lambda: all(instance.get_run_by_id(r.run_id).is_finished for r in runs),
                     240, "every run to end", interval=1.0)
        finally:
            done.set()
            monitoring.join(30)
        for run in runs:
            assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.SUCCESS, \
                _logs(instance, run.run_id)
        lines = [json.loads(line) for line in attempts.read_text().splitlines()]
        assert not [line for line in lines if line.get("overlap")], lines
        finished: dict[tuple[str, str], float] = {}
        for line in sorted(lines, key=lambda line: line["at"]):
            step = (line["run_id"], line["step"])
            assert not (line["event"] == "start" and step in finished), \
                f"{step} ran again after it had finished: {lines}"
            if line["event"] == "end":
                finished[step] = line["at"]
        assert "Resuming run" in "".join(_logs(instance, r.run_id) for r in runs), \
            "no run was handed back: the restart came too late to test anything"


def test_terminating_a_run_whose_orchestrator_died_drops_its_queued_steps(start_worker,
                                                                          launcher_instance,
                                                                          broker_url):
    """The run's worker dies with a step queued on a queue nobody serves yet: terminate drops
    that step too (the event log names its task), so it never waits in Redis for a worker."""
    worker = start_worker(queues=[QUEUE])  # runs only: the steps' queue has no worker
    run = _launch(launcher_instance, "taskiq_recorded_chain")
    server = sync_redis(broker_url)
    wait_for(lambda: server.zcard(f"{P}:queue:dagster"), 60, "the first step queued")
    worker.kill()
    assert launcher_instance.run_launcher.terminate(run.run_id)
    assert server.zcard(f"{P}:queue:dagster") == 0
    # Left: only the run's own task, leased by the dead worker, flagged to go when its lease
    # runs out.
    run_task = launcher_instance.get_run_by_id(run.run_id).tags[TASKIQ_TASK_ID_TAG]
    assert server.keys(f"{P}:task:*") == [f"{P}:task:{run_task}".encode()]
    assert server.hget(f"{P}:task:{run_task}", "cancel") == b"1"


def test_a_terminated_run_ends_canceled_even_when_its_step_ignores_sigint(start_worker,
                                                                         launcher_instance):
    """The step needs its SIGKILL (5 s after SIGINT); the run's orchestrator, given the same
    5 s before, was killed just as it was about to record RUN_CANCELED (the run stayed
    CANCELING). It now has longer than its steps."""
    start_worker(queues=[QUEUE, "dagster"], concurrency=2)
    run = _launch(launcher_instance, "taskiq_stubborn_job")
    _step_started(launcher_instance, run.run_id)
    assert launcher_instance.run_launcher.terminate(run.run_id)
    finished = _finished(launcher_instance, run.run_id, timeout=45)
    assert finished.status == DagsterRunStatus.CANCELED, _logs(launcher_instance, run.run_id)


def test_a_run_whose_lease_lapsed_goes_on(start_worker, launcher_instance, broker_url):
    """The worker running a run cannot renew its 3 s lease for 6 s (frozen here; a Redis
    outage does the same) and the lapsed lease is reaped. A run is never handed out twice, so
    that only drops its task: the worker lets the orchestrator go on (before, it killed it),
    the health check finds the run in the worker's registry entry, and the run succeeds
    without a resume."""
    worker = start_worker(queues=[QUEUE, "dagster"], concurrency=2)
    run = _launch(launcher_instance, "taskiq_recorded_chain")
    _step_started(launcher_instance, run.run_id)
    launcher = launcher_instance.run_launcher

    def health():
        return launcher.check_run_worker_health(launcher_instance.get_run_by_id(run.run_id))

    run_task = launcher_instance.get_run_by_id(run.run_id).tags[TASKIQ_TASK_ID_TAG]
    os.kill(worker.process.pid, signal.SIGSTOP)  # the worker only: the run's process goes on
    try:
        time.sleep(4.5)
        health()  # it reaps first: the lapsed lease is dropped
        assert not sync_redis(broker_url).exists(f"{P}:task:{run_task}")
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)
    time.sleep(3.0)  # the worker hears its run task is gone and its registry entry is fresh
    assert health().status == WorkerStatus.RUNNING, health().msg
    finished = _finished(launcher_instance, run.run_id)
    assert finished.status == DagsterRunStatus.SUCCESS, _logs(launcher_instance, run.run_id)
    assert "lapsed" in worker.output()
