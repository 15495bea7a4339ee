"""Our Redis broker on a real redis-server: priority, queues, leases, no loss, no duplicates."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from dagster_taskiq.broker import LEASE_LABEL, PRIORITY_LABEL, QUEUE_LABEL, REPLY_LABEL
from dagster_taskiq.config import DEFAULT_KEY_PREFIX
from tests.conftest import sync_redis, wait_for
from tests.executor.conftest import CLI, execute_test_job, run_config, worker_env
from tests.executor.consumer import TRACE, make_broker

CONSUMER = str(Path(__file__).with_name("consumer.py"))


class Consumer:
    def __init__(self, url: str, name: str, queues: str, concurrency: int, log_dir: Path,
                 env: dict[str, str] | None = None):
        self.name = name
        self.log = log_dir / f"{name}.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, CONSUMER, url, name, queues, str(concurrency)],
                stdout=out, stderr=subprocess.STDOUT, env={**worker_env(url), **(env or {})},
            )
        wait_for(lambda: "consuming" in self.log.read_text() or self.process.poll() is not None,
                 30, f"consumer {name}")
        assert self.process.poll() is None, self.log.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def consumers(broker_url, tmp_path):
    started: list[Consumer] = []

    def _start(name: str, queues: str = "dagster", concurrency: int = 1,
               env: dict[str, str] | None = None) -> Consumer:
        consumer = Consumer(broker_url, name, queues, concurrency, tmp_path, env)
        started.append(consumer)
        return consumer

    yield _start
    for consumer in started:
        consumer.stop()


class Client:
    """Sends ``record`` tasks and collects their replies, as the orchestrator does."""

    def __init__(self, url: str):
        self.broker = make_broker(url, ["dagster"], "client")
        self.reply_to = f"{self.broker.settings.key_prefix}:replies"  # as the orchestrator's
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.broker.startup())

    def send(self, tag: str, queue: str = "dagster", priority: int = 0, seconds: float = 0.0,
             lease: float = 30.0) -> str:
        labels = {QUEUE_LABEL: queue, PRIORITY_LABEL: priority, LEASE_LABEL: lease,
                  REPLY_LABEL: self.reply_to}
        task = self.broker.find_task("record")
        sent = self.loop.run_until_complete(
            task.kicker().with_labels(**labels).kiq(tag, seconds)
        )
        return sent.task_id

    def replies(self, count: int, timeout: float) -> list:
        got: list = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            got += self.loop.run_until_complete(
                self.broker.result_backend.wait_replies(self.reply_to, 0.5)
            )
        return got

    def close(self) -> None:
        self.loop.run_until_complete(self.broker.shutdown())
        self.loop.close()


@pytest.fixture
def client(broker_url):
    client = Client(broker_url)
    yield client
    client.close()


def trace(url: str) -> list[str]:
    return [item.decode() for item in sync_redis(url).lrange(TRACE, 0, -1)]


def test_exact_priority_order(client, consumers, broker_url):
    """Tasks of random priority, queued while no consumer runs, are drained highest first and
    in submission order among equals, by one consumer of concurrency 1."""
    rng = random.Random(7)
    sent = []
    for i in range(120):
        priority = rng.randint(-20, 20)
        client.send(f"{priority}/{i}", priority=priority)
        sent.append((priority, i))
    consumers("c1", concurrency=1)
    replies = client.replies(120, timeout=60)
    assert len(replies) == 120
    started = [item.split(":")[1] for item in trace(broker_url) if item.startswith("start:")]
    order = [(int(tag.split("/")[0]), int(tag.split("/")[1])) for tag in started]
    assert order == sorted(sent, key=lambda pair: (-pair[0], pair[1]))


def test_consumer_listens_on_several_queues_and_only_those(client, consumers, broker_url):
    client.send("on-a", queue="a")
    client.send("on-b", queue="b")
    client.send("on-c", queue="c")
    consumers("ab", queues="a,b")
    replies = client.replies(2, timeout=30)
    assert sorted(r.result.return_value for r in replies) == ["on-a", "on-b"]
    assert client.replies(1, timeout=1.5) == []
    assert asyncio.run(_queued(broker_url, "c")) == 1


async def _queued(url: str, queue: str) -> int:
    broker = make_broker(url, [queue], "probe")
    try:
        return len(await broker.queued_task_ids(queue))
    finally:
        await broker.shutdown()


def test_killed_consumer_task_goes_to_another_after_lease_expiry(client, consumers, broker_url):
    victim = consumers("victim")
    client.send("long", seconds=60, lease=2.0)
    wait_for(lambda: "start:long:victim" in trace(broker_url), 20, "the victim to start")
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    killed_at = time.monotonic()
    consumers("rescuer")
    # Shorten the rerun: the rescuer runs the same message, which sleeps 60 s, so only check
    # that it started there, within the lease plus a reap interval.
    wait_for(lambda: "start:long:rescuer" in trace(broker_url), 20, "redelivery")
    assert time.monotonic() - killed_at < 2.0 + 5.0


def test_live_long_task_is_never_handed_out_twice(client, consumers, broker_url):
    consumers("first")
    client.send("slow", seconds=4, lease=1.0)
    wait_for(lambda: "start:slow:first" in trace(broker_url), 20, "the first consumer")
    consumers("second")
    replies = client.replies(1, timeout=20)
    assert [r.result.return_value for r in replies] == ["slow"]
    time.sleep(1.5)  # any duplicate would have started by now
    assert trace(broker_url) == ["start:slow:first", "end:slow:first"]
    assert client.replies(1, timeout=0.5) == []


def test_thousand_tasks_none_lost_none_duplicated(client, consumers, broker_url):
    consumers("x", concurrency=20)
    consumers("y", concurrency=20)
    ids = [client.send(f"t{i}") for i in range(1000)]
    replies = client.replies(1000, timeout=120)
    assert len(replies) == 1000
    assert sorted(r.task_id for r in replies) == sorted(ids)
    starts = Counter(item.split(":")[1] for item in trace(broker_url) if item.startswith("start"))
    assert len(starts) == 1000 and set(starts.values()) == {1}
    # Acknowledged messages are deleted: nothing is left in Redis but results and the trace.
    leftovers = sync_redis(broker_url).keys(f"{DEFAULT_KEY_PREFIX}:task:*")
    assert leftovers == []


def test_idle_worker_survives_redis_py_socket_timeout(start_worker, instance, io_dir, broker_url):
    """redis-py 8 times out reads after 5 s by default; an idle worker must stay up and serve."""
    worker = start_worker()
    time.sleep(32)
    assert worker.process.poll() is None, worker.output()
    with execute_test_job("test_job", instance, run_config(io_dir, broker_url)) as result:
        assert result.success
    assert "Traceback" not in worker.output()
    started = time.monotonic()
    assert worker.stop() == 0
    assert time.monotonic() - started < 5, "an idle worker stops promptly on SIGTERM"


def test_worker_sigint_when_idle_is_prompt(broker_url, tmp_path, dagster_home):
    log = tmp_path / "w.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([CLI, "worker", "start", "-n", "quick"], stdout=out,
                                   stderr=subprocess.STDOUT, env=worker_env(broker_url))
    wait_for(lambda: "Listening started" in log.read_text(), 60, "worker start")
    started = time.monotonic()
    os.kill(process.pid, signal.SIGINT)
    assert process.wait(10) == 0
    assert time.monotonic() - started < 5
