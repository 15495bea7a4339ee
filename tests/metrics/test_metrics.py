"""Prometheus metrics against a real redis-server, real workers and real jobs: a worker's own
(``worker start --metrics-port``), the cluster's (``dagster-taskiq exporter``), and the live
terminal view (``status --watch``) under a real pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import struct
import subprocess
import termios
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from prometheus_client.parser import text_string_to_metric_families

from dagster_taskiq.client import TaskiqClient
from dagster_taskiq.config import DEFAULT_KEY_PREFIX as P
from dagster_taskiq.config import BrokerSettings
from tests.conftest import free_port, sync_redis, wait_for
from tests.e2e.conftest import alive
from tests.executor.conftest import CLI, execute_test_job, run_config, worker_env

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of http://127.0.0.1:PORT/metrics, parsed by prometheus_client."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """One series' value; fails if it does not exist."""
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no {name}{labels}; have " + str(
        sorted((n, dict(ls)) for n, ls in samples if n == name))
    return samples[key]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` that has these labels (any others)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@contextmanager
def exporter(broker_url: str) -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen([CLI, "exporter", "--port", str(port), "--host", "127.0.0.1"],
                               env=worker_env(broker_url), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"exporter exited: {process.stdout.read().decode()}")  # type: ignore[union-attr]
        try:
            scrape(port)
            return True
        except OSError:
            return False

    try:
        wait_for(answers, 30, "the exporter", interval=0.1)
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(15) == 0
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


def send(client: TaskiqClient, task: str, queue: str, priority: int, **labels: Any) -> None:
    # Dummy arguments: whoever takes it fails to prepare it, quickly.
    client.send(task, ["dummy"], labels={"queue_name": queue, "priority": priority, **labels})


def test_exporter_reports_waiting_tasks_by_queue_kind_and_priority(broker_url: str) -> None:
    client = TaskiqClient(BrokerSettings.from_config(broker_url))
    client.start()
    try:
        for priority in (10, 5, 5, -2):
            send(client, "execute_plan", "alpha", priority)
        send(client, "execute_job", "alpha", 3)
        send(client, "execute_plan", "beta", 0)
    finally:
        client.close()

    with exporter(broker_url) as port:
        samples = scrape(port)
    waiting = "dagster_taskiq_queue_waiting_tasks"
    assert value(samples, waiting, queue="alpha", kind="step", priority="10") == 1
    assert value(samples, waiting, queue="alpha", kind="step", priority="5") == 2
    assert value(samples, waiting, queue="alpha", kind="step", priority="-2") == 1
    assert value(samples, waiting, queue="alpha", kind="run", priority="3") == 1
    assert value(samples, waiting, queue="beta", kind="step", priority="0") == 1
    # A queue with nothing of a kind still has a series, at 0.
    assert value(samples, waiting, queue="beta", kind="run", priority="0") == 0
    assert total(samples, waiting) == 6
    assert value(samples, "dagster_taskiq_queue_oldest_waiting_seconds", queue="alpha",
                 kind="run") > 0
    for queue in ("alpha", "beta"):
        assert value(samples, "dagster_taskiq_queue_oldest_waiting_seconds", queue=queue,
                     kind="step") > 0
        for kind in ("step", "run"):
            assert value(samples, "dagster_taskiq_queue_inflight_tasks", queue=queue,
                         kind=kind) == 0
        assert value(samples, "dagster_taskiq_workers_live", queue=queue) == 0
        assert value(samples, "dagster_taskiq_worker_slots", queue=queue) == 0
        assert value(samples, "dagster_taskiq_worker_busy_slots", queue=queue) == 0
    assert value(samples, "dagster_taskiq_queue_oldest_waiting_seconds", queue="beta",
                 kind="run") == 0
    assert value(samples, "dagster_taskiq_redis_up") == 1
    assert value(samples, "dagster_taskiq_exporter_scrape_errors_total") == 0


def test_exporter_without_redis_says_so() -> None:
    # Nothing listens there: each scrape fails its read, and says so instead of erroring.
    with exporter(f"redis://127.0.0.1:{free_port()}/0") as port:
        samples = scrape(port)
    assert value(samples, "dagster_taskiq_redis_up") == 0
    assert value(samples, "dagster_taskiq_exporter_scrape_errors_total") >= 1
    assert not any(name.startswith("dagster_taskiq_queue_") for name, _ in samples)


class Terminal:
    """A command on a real pseudo-terminal (200x50), its output collected by a thread."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave,
                                        env={**env, "TERM": "xterm-256color"},
                                        start_new_session=True)
        os.close(slave)
        self.master = master
        self.output = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO once the command has exited
                return
            if not data:
                return
            self.output += data

    def text(self) -> str:
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.output.decode(errors="replace"))

    def stop(self) -> int:
        """Ctrl-C (SIGINT, as the terminal sends it); its exit code."""
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(15)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
            self.reader.join(5)
            os.close(self.master)


def test_worker_metrics_exporter_and_watch_during_real_jobs(
        start_worker: Any, broker_url: str, instance: Any, io_dir: str) -> None:
    port = free_port()
    start_worker(name="metered", concurrency=2, args=["--metrics-port", str(port),
                                                      "--metrics-host", "127.0.0.1"])
    samples = scrape(port)
    assert value(samples, "dagster_taskiq_worker_up", worker="metered") == 1
    assert value(samples, "dagster_taskiq_worker_concurrency", worker="metered") == 2
    assert value(samples, "dagster_taskiq_tasks_received_total", queue="dagster",
                 kind="step") == 0

    client = TaskiqClient(BrokerSettings.from_config(broker_url))
    client.start()
    try:
        send(client, "execute_plan", "parked", 7)  # a queue nobody serves
    finally:
        client.close()
    watch = Terminal([CLI, "status", "--watch", "--interval", "0.2"], worker_env(broker_url))
    try:
        with exporter(broker_url) as exporter_port:
            # One step longer than a few heartbeats (1 s), seen while it runs.
            config = run_config(io_dir, broker_url)
            config["ops"] = {"low_0": {"config": {"seconds": 3.0}}}
            outcome: list[bool] = []

            def slow() -> None:
                with execute_test_job("low_job", instance, config, subset=["low_0"]) as result:
                    outcome.append(result.success)

            job = threading.Thread(target=slow)
            job.start()
            try:
                def running() -> Samples | None:
                    cluster = scrape(exporter_port)
                    inflight = cluster.get(("dagster_taskiq_queue_inflight_tasks", frozenset(
                        {("queue", "dagster"), ("kind", "step")})))
                    # The registry lists the step once forked (its heartbeat is every 1 s).
                    busy = cluster.get(("dagster_taskiq_worker_busy_slots",
                                        frozenset({("queue", "dagster")})))
                    return cluster if inflight == 1 and busy == 1 else None

                cluster = wait_for(running, 30, "the step in flight", interval=0.1)
                assert value(cluster, "dagster_taskiq_workers_live", queue="dagster") == 1
                assert value(cluster, "dagster_taskiq_worker_slots", queue="dagster") == 2
                assert value(cluster, "dagster_taskiq_queue_waiting_tasks", queue="dagster",
                             kind="step", priority="0") == 0
                assert value(scrape(port), "dagster_taskiq_worker_busy", worker="metered",
                             kind="step") == 1
                # The live view shows the queue, the worker and the step it runs.
                wait_for(lambda: re.search(r"metered\s.*step low_0 of run", watch.text()),
                         30, "the running step in the watch view", interval=0.1)
                text = watch.text()
                assert re.search(r"dagster\s.*metered", text), text[-3000:]
                assert re.search(r"parked\s.*1 \[p7:1\].*no live worker", text), text[-3000:]
                assert watch.process.poll() is None
            finally:
                job.join(60)
            assert outcome == [True]
    finally:
        assert watch.stop() == 0, watch.text()[-3000:]

    # Two steps that succeed, one that fails, and a run task that cannot even be prepared.
    for name in ("test_serial_job", "test_fails"):
        with execute_test_job(name, instance, run_config(io_dir, broker_url)) as result:
            assert result.success == (name == "test_serial_job")
    client = TaskiqClient(BrokerSettings.from_config(broker_url))
    client.start()
    try:
        send(client, "execute_job", "dagster", 0, job="broken_job")
    finally:
        client.close()
    wait_for(lambda: total(scrape(port), "dagster_taskiq_task_outcomes_total", kind="run"),
             30, "the run task to end", interval=0.1)

    samples = scrape(port)
    steps = 4  # low_0, simple and add_one, fails (should_never_execute is never sent)
    assert value(samples, "dagster_taskiq_tasks_received_total", queue="dagster",
                 kind="step") == steps
    assert value(samples, "dagster_taskiq_tasks_received_total", queue="dagster",
                 kind="run") == 1
    count = "dagster_taskiq_step_duration_seconds_count"
    assert total(samples, count) == steps
    assert value(samples, count, queue="dagster", dagster_job="low_job") == 1
    assert value(samples, count, queue="dagster", dagster_job="test_serial_job") == 2
    assert value(samples, count, queue="dagster", dagster_job="test_fails") == 1
    assert value(samples, "dagster_taskiq_step_duration_seconds_sum", queue="dagster",
                 dagster_job="low_job") >= 3.0  # it slept 3 s
    assert value(samples, "dagster_taskiq_run_duration_seconds_count", queue="dagster",
                 dagster_job="broken_job") == 1
    assert total(samples, "dagster_taskiq_queue_wait_seconds_count") == steps + 1
    assert value(samples, "dagster_taskiq_queue_wait_seconds_count", queue="dagster",
                 dagster_job="broken_job") == 1
    outcomes = "dagster_taskiq_task_outcomes_total"
    assert value(samples, outcomes, queue="dagster", kind="step", outcome="success") == 3
    assert value(samples, outcomes, queue="dagster", kind="step", outcome="failure") == 1
    assert value(samples, outcomes, queue="dagster", kind="run", outcome="failure") == 1
    assert total(samples, outcomes) == steps + 1
    assert value(samples, "dagster_taskiq_lease_renewals_total", queue="dagster") > 0
    for name in ("lease_expiries", "redeliveries", "lost_steps"):
        assert value(samples, f"dagster_taskiq_{name}_total", queue="dagster") == 0
    for kind in ("step", "run"):
        assert value(samples, "dagster_taskiq_worker_busy", worker="metered", kind=kind) == 0
    # Never a run id, task id or step key as a label.
    labels = {label for _, ls in samples for label, _ in ls}
    assert labels <= {"queue", "kind", "priority", "dagster_job", "worker", "outcome", "le"}, labels


def _running_child(server: redis.Redis) -> int | None:
    """The pid of the one task a worker's registry entry lists, if any."""
    for key in server.keys(f"{P}:worker:*"):
        tasks = json.loads(server.hget(key, "tasks") or "[]")
        if tasks:
            return int(tasks[0]["pid"])
    return None


def test_worker_counts_a_lost_lease_its_redelivery_and_a_crashed_step(
        start_worker: Any, broker_url: str, instance: Any, io_dir: str) -> None:
    port = free_port()
    worker = start_worker(name="metered", args=["--metrics-port", str(port),
                                                "--metrics-host", "127.0.0.1"])
    server = sync_redis(broker_url)
    config = run_config(io_dir, broker_url, worker_heartbeat_timeout=2.0)
    config["ops"] = {"slow_0": {"config": {"seconds": 4.0}},
                     **{f"slow_{i}": {"config": {"seconds": 0.1}} for i in (1, 2)}}
    outcome: list[bool] = []

    def chain() -> None:
        with execute_test_job("slow_chain_job", instance, config) as result:
            outcome.append(result.success)

    job = threading.Thread(target=chain)
    job.start()
    try:
        child = wait_for(lambda: _running_child(server), 60, "slow_0 to run")
        # Frozen past its lease: the step stops itself at its fence, and the orchestrator
        # (which reaps expired leases while it waits) puts it back in the queue.
        os.kill(worker.process.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: not alive(child), 30, "the step to stop itself", interval=0.1)
            wait_for(lambda: any(server.hexists(key, "lost_holder")
                                 for key in server.keys(f"{P}:task:*")),
                     30, "the lease to be reaped", interval=0.1)
        finally:
            os.kill(worker.process.pid, signal.SIGCONT)
    finally:
        job.join(90)
    assert outcome == [True]  # slow_0 ran again, on the same worker
    with execute_test_job("crash_step_job", instance, run_config(io_dir, broker_url)) as result:
        assert not result.success

    samples = scrape(port)
    # One expiry per freeze is the rule (a delivery taken again is its own, and a claim answered
    # after the pause is renewed before it runs: see test_guarantees); under heavy load a
    # renewal can still come too late, so each count must agree with the expiries instead.
    expiries = value(samples, "dagster_taskiq_lease_expiries_total", queue="dagster")
    assert expiries >= 1
    assert value(samples, "dagster_taskiq_redeliveries_total", queue="dagster") == expiries
    assert value(samples, "dagster_taskiq_lost_steps_total", queue="dagster") == 1
    # slow_0 once plus once per expiry, slow_1, slow_2, crash_step
    assert value(samples, "dagster_taskiq_tasks_received_total", queue="dagster",
                 kind="step") == 4 + expiries
    outcomes = "dagster_taskiq_task_outcomes_total"
    for name, count in (("success", 3), ("released", expiries), ("crashed", 1),
                        ("failure", 0)):
        assert value(samples, outcomes, queue="dagster", kind="step", outcome=name) == count
    # A released attempt has no duration: it did not end.
    assert total(samples, "dagster_taskiq_step_duration_seconds_count") == 4


def test_a_taken_metrics_port_is_a_clear_error(broker_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args, code in ((["worker", "start", "-n", "clash", "--metrics-port", port,
                             "--metrics-host", "127.0.0.1"], 1),
                           (["exporter", "--port", port, "--host", "127.0.0.1"], 2)):
            result = subprocess.run([CLI, *args], env=worker_env(broker_url),
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == code, result.stderr
            assert f"metrics on 127.0.0.1:{port}" in result.stderr, result.stderr
            assert "Traceback" not in result.stderr
