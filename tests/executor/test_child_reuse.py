"""A worker's child serving several steps of one run (``--max-steps-per-child``), on real
workers and a real Redis: steps of one run share a child, steps of two runs never do, a crash
or a cancel ends a child that is never used again, and the lease fence still stops it."""

from __future__ import annotations

import os
import re
import signal
import time

from dagster import DagsterInstance, DagsterRunStatus

from tests.conftest import wait_for
from tests.e2e.conftest import alive
from tests.executor.conftest import execute_test_job, run_config
from tests.executor.test_faults import _run_in_thread, _starts
from tests.executor.test_launcher import (  # noqa: F401 (fixture)
    QUEUE,
    _finished,
    _launch,
    _logs,
    _step_started,
    launcher_instance,
)


def _step_pids(instance: DagsterInstance, run_id: str) -> dict[str, list[int]]:
    """Per step, the pids of the processes that started it (the worker's "Executing steps")."""
    pids: dict[str, list[int]] = {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event and "in taskiq worker" in (event.message or ""):
            pids.setdefault(record.step_key, []).append(
                int(event.engine_event_data.metadata["pid"].value))
    return pids


def test_two_steps_of_a_run_run_in_one_child_and_two_runs_never_share_one(
        start_worker, instance, io_dir, broker_url):
    worker = start_worker()
    runs = []
    for _ in range(2):  # back to back: the first run's child is still idle
        with execute_test_job("pid_pair_job", instance, run_config(io_dir, broker_url)) as result:
            assert result.success
            runs.append(result.output_for_node("second_pid"))
    for first, second in runs:
        assert first == second, "the second step ran in the first one's child"
        assert first not in (os.getpid(), worker.process.pid)
    assert runs[0][0] != runs[1][0], "two runs shared a child"
    assert re.search(r"\(child \d+, its step 2\)", worker.output())


def test_max_steps_per_child_one_forks_every_step(start_worker, instance, io_dir, broker_url):
    start_worker(args=["--max-steps-per-child", "1"])
    with execute_test_job("pid_pair_job", instance, run_config(io_dir, broker_url)) as result:
        assert result.success
        first, second = result.output_for_node("second_pid")
    assert first != second


def test_a_step_that_ends_a_reused_child_fails_alone_and_its_retry_forks_afresh(
        start_worker, instance, io_dir, broker_url):
    start_worker()
    with execute_test_job("crash_then_retry_job", instance,
                          run_config(io_dir, broker_url)) as result:
        assert result.success
        first, crashed, retried = result.output_for_node("crash_first_attempt")
    assert crashed == first, "the crashing attempt ran in the first step's child"
    assert retried != crashed


def test_terminating_a_run_whose_step_runs_in_a_reused_child_ends_it_canceled(
        start_worker, launcher_instance):  # noqa: F811
    worker = start_worker(queues=[QUEUE, "dagster"], concurrency=1)
    run = _launch(launcher_instance, "taskiq_one_then_sleepy")

    def both_started():
        pids = _step_pids(launcher_instance, run.run_id)
        return pids if len(pids) == 2 else None

    pids = wait_for(both_started, 60, "both steps to start")
    assert pids["return_one"] == pids["sleep_after"], pids
    _step_started(launcher_instance, run.run_id)
    assert launcher_instance.run_launcher.terminate(run.run_id)
    finished = _finished(launcher_instance, run.run_id, timeout=30)
    assert finished.status == DagsterRunStatus.CANCELED, _logs(launcher_instance, run.run_id)
    wait_for(lambda: not alive(pids["sleep_after"][0]), 10, "the child to end")
    assert worker.process.poll() is None
    follow_up = _launch(launcher_instance, "taskiq_math_diamond")
    assert _finished(launcher_instance, follow_up.run_id).status == DagsterRunStatus.SUCCESS


def test_a_frozen_workers_reused_child_stops_itself_at_its_fence(
        start_worker, instance, io_dir, broker_url):
    """The worker is frozen past the lease of a step running in a reused child: the child
    stops itself (its fence watches that step's page); thawed, the worker hands the step back,
    runs it again in a fresh child, and the run succeeds."""
    worker = start_worker()
    config = run_config(io_dir, broker_url, worker_heartbeat_timeout=3.0)
    config["ops"] = {"slow_0": {"config": {"seconds": 8.0}}}
    out: list = []
    thread = _run_in_thread("warm_then_slow_job", config, out)
    wait_for(lambda: _starts(instance, "slow_0"), 60, "slow_0 to start")
    run_id = instance.get_runs()[0].run_id
    pids = _step_pids(instance, run_id)
    child = pids["slow_0"][0]
    assert pids["first_pid"] == [child], pids
    os.kill(worker.process.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: not alive(child), 4.0, "the reused child to stop itself")
        stopped = time.time()
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)
    thread.join(120)
    assert out and out[0].success
    starts = _starts(instance, "slow_0")
    assert len(starts) == 2 and starts[1] > stopped
    assert _step_pids(instance, run_id)["slow_0"][1] != child
    assert "before reporting a result" not in worker.output()
