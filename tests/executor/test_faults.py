"""Faults: workers killed mid-step, steps that kill their process, queues nobody serves,
Redis restarting mid-run, and password-protected Redis. No run may hang."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

from dagster import DagsterEventType, DagsterInstance

from tests.conftest import start_redis, wait_for
from tests.executor.conftest import execute_test_job, run_config


def _run_in_thread(job_name: str, config: dict, out: list) -> threading.Thread:
    def target():
        with DagsterInstance.get() as instance, execute_test_job(job_name, instance,
                                                                  config) as result:
            out.append(result)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def _starts(instance: DagsterInstance, step_key: str) -> list[float]:
    return [r.timestamp for run in instance.get_runs()
            for r in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START)
            if r.step_key == step_key]


def _worker_running(instance: DagsterInstance, step_key: str) -> str:
    """The name of the worker whose 'Executing steps ...' event is the step's latest."""
    events = [r for run in instance.get_runs()
              for r in instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT)
              if r.step_key == step_key
              and "taskiq worker" in r.dagster_event.engine_event_data.metadata]
    return events[-1].dagster_event.engine_event_data.metadata["taskiq worker"].value


def test_worker_sigkilled_mid_step_step_runs_again_elsewhere(start_worker, instance, io_dir,
                                                             broker_url):
    # Both workers are up before the kill: the bound is about redelivery, not a worker's start.
    workers = {name: start_worker(name=name) for name in ("one", "two")}
    config = run_config(io_dir, broker_url, worker_heartbeat_timeout=2.0)
    config["ops"] = {"slow_0": {"config": {"seconds": 3.0}}}
    out: list = []
    thread = _run_in_thread("slow_chain_job", config, out)
    wait_for(lambda: _starts(instance, "slow_0"), 60, "slow_0 to start")
    victim = _worker_running(instance, "slow_0")
    workers[victim].kill()
    killed = time.time()
    thread.join(90)
    assert out and out[0].success
    starts = _starts(instance, "slow_0")
    assert len(starts) == 2, "the lost step ran again, once"
    # The lease (2 s) plus a reap and a claim, with room for a loaded machine (9.6 s seen with
    # two test processes on two cores); nothing but the lease hands a step out again this soon.
    assert starts[1] - killed < 2.0 + 10, "redelivered once its lease ran out"
    assert _worker_running(instance, "slow_0") != victim


def test_step_that_kills_its_process_fails_cleanly(start_worker, instance, io_dir, broker_url):
    worker = start_worker()
    with execute_test_job("crash_step_job", instance, run_config(io_dir, broker_url)) as result:
        assert not result.success
        failure = result.failure_data_for_node("crash_step")
        assert "exited with code 3" in failure.error.message
    assert worker.process.poll() is None, "the worker lives on"
    with execute_test_job("test_job", instance, run_config(io_dir, broker_url)) as result:
        assert result.success


def test_queue_with_no_worker_warns_then_fails(start_worker, instance, io_dir, broker_url):
    start_worker()  # serves "dagster", not "nobody"
    config = run_config(io_dir, broker_url, queue_wait_timeout=3.0)
    started = time.monotonic()
    with execute_test_job("unserved_queue_job", instance, config) as result:
        assert not result.success
        run_id = result.run_id
    assert time.monotonic() - started < 20
    messages = [r.dagster_event.message for r in instance.all_logs(run_id) if r.dagster_event]
    assert any('No live taskiq worker listens on queue "nobody"' in (m or "") for m in messages)
    assert any('waited more than 3 s on queue "nobody"' in (m or "") for m in messages)


def test_queue_with_no_worker_waits_for_one_by_default(start_worker, instance, io_dir,
                                                       broker_url):
    start_worker()
    out: list = []
    thread = _run_in_thread("unserved_queue_job", run_config(io_dir, broker_url), out)
    time.sleep(4)
    assert not out, "without queue_wait_timeout the step waits (pools may scale from zero)"
    start_worker(queues=["nobody"], name="late")
    thread.join(60)
    assert out and out[0].success


def test_redis_restart_mid_run(start_worker, instance, io_dir, tmp_path):
    """Redis (append-only) restarts while steps run: workers and orchestrator reconnect and the
    run finishes."""
    server = start_redis(tmp_path, None, "--appendonly", "yes")
    try:
        url = server.url()
        start_worker(broker=url)
        config = run_config(io_dir, url)
        config["ops"] = {f"slow_{i}": {"config": {"seconds": 1.5}} for i in range(3)}
        out: list = []
        thread = _run_in_thread("slow_chain_job", config, out)
        wait_for(lambda: _starts(instance, "slow_0"), 60, "the first step")
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(10)
        time.sleep(1.0)
        server.process = subprocess.Popen(
            ["redis-server", "--port", str(server.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        thread.join(120)
        assert out, "the run did not finish"
        assert out[0].success
    finally:
        server.process.terminate()
        server.process.wait(10)


def test_password_protected_redis_never_shows_the_password(start_worker, instance, io_dir,
                                                           tmp_path):
    secret = "pa55-w0rd-xyz"
    server = start_redis(tmp_path, secret)
    try:
        url = server.url()
        worker = start_worker(broker=url)
        with execute_test_job("test_serial_job", instance, run_config(io_dir, url)) as result:
            assert result.success
            run_id = result.run_id
        text = "\n".join(str(r) for r in instance.all_logs(run_id))
        assert secret not in text
        assert secret not in worker.output()
        assert "redis://:***@127.0.0.1" in worker.output()
    finally:
        server.process.terminate()
        server.process.wait(10)


def test_graceful_stop_hands_a_long_step_back_at_once(start_worker, instance, io_dir,
                                                      broker_url):
    """SIGTERM: the worker waits up to --shutdown-timeout, then hands the running step back to
    its queue (no lease expiry needed) and exits; another worker runs it."""
    # Both workers are up first, so the stop lands early in the step (a worker's start takes
    # seconds under load); the one that took the step is stopped.
    workers = {name: start_worker(name=name, args=["--shutdown-timeout", "1"])
               for name in ("first", "second")}
    config = run_config(io_dir, broker_url)  # default 30 s heartbeat timeout: not the path here
    config["ops"] = {"slow_0": {"config": {"seconds": 6.0}}}
    out: list = []
    thread = _run_in_thread("slow_chain_job", config, out)
    wait_for(lambda: _starts(instance, "slow_0"), 60, "slow_0 to start")
    leaving = workers[_worker_running(instance, "slow_0")]
    stopped = time.monotonic()
    assert leaving.stop() == 0
    assert time.monotonic() - stopped < 10
    # Well under the 30 s lease: the hand-back, not a lease expiry, brought it back.
    wait_for(lambda: len(_starts(instance, "slow_0")) == 2, 25, "slow_0 to run again")
    thread.join(90)
    assert out and out[0].success
    assert "Handing 1 unfinished task(s) back" in leaving.output()
    assert _worker_running(instance, "slow_0") != leaving.name
