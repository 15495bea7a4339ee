"""Guarantees under faults, each injected against real processes and a real redis-server:
skewed clocks (Debian's ``faketime``), a primary demoted to a read-only replica (``REPLICAOF``),
and a worker whose background loop dies. The invariant is always the same: a task runs once at
a time, and nothing is left running that no longer heartbeats."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from dagster_taskiq.broker import LEASE_LABEL, PRIORITY_LABEL, QUEUE_LABEL, REPLY_LABEL
from dagster_taskiq.config import DEFAULT_KEY_PREFIX as P
from tests.conftest import start_redis, sync_redis, wait_for
from tests.e2e.conftest import alive
from tests.executor.conftest import REPO_FILE, run_config, worker_env
from tests.executor.consumer import make_broker
from tests.executor.test_broker import client, consumers, trace  # noqa: F401 (fixtures)
from tests.executor.test_faults import _run_in_thread, _starts, _worker_running

# Debian's libfaketime, preloaded directly: the `faketime` command forks, so a signal meant
# for the skewed process would stop only the wrapper and leave the process running.
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
needs_faketime = pytest.mark.skipif(
    not LIBFAKETIME.exists(), reason="Debian's faketime is not installed (.ci/run installs it)")


def skewed(offset: str) -> dict[str, str]:
    """Environment that moves a process's wall clock by ``offset`` (``+1h``, ``-1h``). Monotonic
    time stays real (faketime 0.9.10 otherwise hangs Python's timed waits)."""
    return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": offset,
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def run_skewed(offset: str, broker_url: str, code: str) -> str:
    """Run ``code`` (asyncio, with ``broker`` a client of ours) in a process whose clock is
    ``offset`` away; returns what it printed."""
    script = (
        "import asyncio\n"
        "from dagster_taskiq.broker import RedisLeaseBroker\n"
        "from dagster_taskiq.config import BrokerSettings\n"
        "async def main():\n"
        f"    broker = RedisLeaseBroker(BrokerSettings.from_config({broker_url!r}))\n"
        "    try:\n"
        + "".join(f"        {line}\n" for line in code.strip().splitlines())
        + "    finally:\n"
        "        await broker.shutdown()\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run([sys.executable, "-c", script],
                            env={**worker_env(broker_url), **skewed(offset)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@needs_faketime
def test_a_client_whose_clock_runs_ahead_expires_no_lease(client, consumers, broker_url):  # noqa: F811
    """Lease deadlines are the server's: a reaper an hour ahead finds nothing expired while the
    holder heartbeats (with client clocks it requeued the task, and a second consumer ran it)."""
    consumers("holder")
    client.send("slow", seconds=12, lease=2.0)  # still running when the skewed reaper comes
    wait_for(lambda: "start:slow:holder" in trace(broker_url), 20, "the holder to start")
    consumers("other")
    assert trace(broker_url) == ["start:slow:holder"]
    reaped = run_skewed("+1h", broker_url, """
requeued = []
for _ in range(10):
    requeued += await broker.reap()
    await asyncio.sleep(0.1)
print(requeued)
""")
    assert trace(broker_url) == ["start:slow:holder"], "ran twice, or ended before the reaper"
    assert reaped.strip() == "[]"
    assert [r.result.return_value for r in client.replies(1, timeout=30)] == ["slow"]
    time.sleep(1.0)  # a duplicate would have started by now
    assert trace(broker_url) == ["start:slow:holder", "end:slow:holder"]


@needs_faketime
def test_a_consumer_whose_clock_runs_behind_keeps_its_lease(client, consumers, broker_url):  # noqa: F811
    """A consumer an hour behind claims and heartbeats with deadlines on the server's clock
    (with its own clock, every deadline it set was an hour in the past: the task was requeued
    at once and ran twice)."""
    consumers("behind", env=skewed("-1h"))
    client.send("slow", seconds=3, lease=2.0)
    wait_for(lambda: "start:slow:behind" in trace(broker_url), 20, "the skewed consumer")
    consumers("other")
    server = sync_redis(broker_url)
    now_ms = server.time()[0] * 1000
    deadlines = [score for _, score in server.zrange(f"{P}:leases", 0, -1,
                                                     withscores=True)]
    assert deadlines and all(now_ms < d <= now_ms + 3000 for d in deadlines), deadlines
    assert [r.result.return_value for r in client.replies(1, timeout=20)] == ["slow"]
    time.sleep(1.0)
    assert trace(broker_url) == ["start:slow:behind", "end:slow:behind"]


@needs_faketime
def test_a_worker_whose_clock_runs_behind_is_live_in_the_registry(broker_url):
    run_skewed("-1h", broker_url, """
from dagster_taskiq.registry import WorkerInfo, publish
info = WorkerInfo("w@h:1", "behind", "h", 1, ["q"], 1, 0.0)
await publish(broker.redis, broker.settings.key_prefix, info)
""")
    listed = run_skewed("+0", broker_url, """
from dagster_taskiq.registry import live_workers
print([w.name for w in await live_workers(broker.redis, broker.settings.key_prefix)])
""")
    assert listed.strip() == "['behind']"


@pytest.mark.single_server
def test_a_read_only_window_shorter_than_the_lease_runs_nothing_twice(client, consumers,  # noqa: F811
                                                                       broker_url):
    """Redis demoted to a replica (as in a failover) answers READONLY to every write for a
    while. Heartbeats, claims and replies retry through it: the holder keeps its lease, the
    other consumer does not die, and the task runs once (before, the heartbeat loop died on the
    first READONLY, the lease ran out and the task ran a second time)."""
    holder = consumers("holder")
    client.send("slow", seconds=5, lease=4.0)
    wait_for(lambda: "start:slow:holder" in trace(broker_url), 20, "the holder to start")
    other = consumers("other")
    server = sync_redis(broker_url)
    server.execute_command("REPLICAOF", "127.0.0.1", "1")  # a primary that never answers
    try:
        time.sleep(1.5)
        with pytest.raises(redis.exceptions.ReadOnlyError):
            server.set("probe", "1")
    finally:
        server.execute_command("REPLICAOF", "NO", "ONE")
    assert [r.result.return_value for r in client.replies(1, timeout=20)] == ["slow"]
    time.sleep(4.5)  # past the lease: a duplicate would have started by now
    assert trace(broker_url) == ["start:slow:holder", "end:slow:holder"]
    assert holder.process.poll() is None and other.process.poll() is None
    # Both still take work.
    client.send("after")
    assert [r.result.return_value for r in client.replies(1, timeout=20)] == ["after"]


def test_a_worker_whose_registry_loop_dies_exits_non_zero(start_worker, broker_url):
    """A background loop that dies of an unexpected error stops the worker (exit 1, saying
    which loop) instead of leaving a process that looks alive and is gone from the registry."""
    worker = start_worker(name="doomed")
    server = sync_redis(broker_url)
    server.delete(f"{P}:workers")
    server.set(f"{P}:workers", "not a sorted set")  # WRONGTYPE for the next ZADD
    try:
        worker.process.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker lives on without its registry loop:\n{worker.output()[-3000:]}")
    finally:
        server.delete(f"{P}:workers")
    assert worker.process.returncode == 1
    assert "registry heartbeat of worker doomed" in worker.output()



def _slow_step_on_one_of_two(start_worker, instance, io_dir: str, url: str):
    """Two workers, a run whose first step takes 8 s on a 3 s lease: returns the workers, the
    one running the step, the step's pid, and the run's thread and result list."""
    workers = [start_worker(name=name, broker=url) for name in ("one", "two")]
    config = run_config(io_dir, url, worker_heartbeat_timeout=3.0)
    config["ops"] = {"slow_0": {"config": {"seconds": 8.0}}}
    out: list = []
    thread = _run_in_thread("slow_chain_job", config, out)
    wait_for(lambda: _starts(instance, "slow_0"), 60, "slow_0 to start")
    holder = next(w for w in workers if w.name == _worker_running(instance, "slow_0"))
    child = int(re.findall(r"\(child (\d+)\)", holder.output())[-1])
    return workers, holder, child, thread, out


def test_a_worker_cut_off_from_redis_stops_its_step_before_the_lease_runs_out(
        start_worker, instance, io_dir, tmp_path):
    """Redis stalls (SIGSTOP) for longer than the lease: the worker holding a step cannot renew
    it, so it kills the step's process before the lease can run out (another worker may take
    the step then). Once Redis answers again the step runs again, once, and the run succeeds.
    Before, the worker's heartbeat hung on the stalled socket and its step ran on."""
    server = start_redis(tmp_path)
    try:
        workers, holder, child, thread, out = _slow_step_on_one_of_two(
            start_worker, instance, io_dir, server.url())
        assert alive(child)
        server.process.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            # The lease (3 s) ran from at most 1 s before the stall; the fence acts 1 s early.
            wait_for(lambda: not alive(child), 3.0, "the worker to stop its step")
            fenced_after = time.monotonic() - stopped
            time.sleep(2.0)  # Redis stays away past the lease
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert fenced_after < 3.0
        thread.join(120)
        assert out and out[0].success
        assert len(_starts(instance, "slow_0")) == 2, "the step ran again, once, after the stall"
        assert "Could not renew the lease on task" in holder.output()
        assert all(w.process.poll() is None for w in workers), "the workers live on"
    finally:
        server.process.send_signal(signal.SIGCONT)
        server.process.terminate()
        server.process.wait(10)



JOB_ONLY_HERE = '''
from dagster import job, op
from dagster_taskiq import taskiq_executor


@op
def here() -> int:
    return 1


@op
def also_here() -> int:
    return 2


@job(executor_def=taskiq_executor)
def only_here_job():
    here()
    also_here()
'''


def test_a_worker_that_cannot_import_the_job_fails_its_steps_visibly(
        start_worker, instance, io_dir, broker_url, tmp_path, monkeypatch):
    """The orchestrator can import the job; the worker cannot. Each step fails (a failure that
    retry policies see, with the ModuleNotFoundError in the event log and in the worker's log)
    and the run ends. Before, the first error stopped all submission while the loop spun on,
    and the run died with "unknown state", the ModuleNotFoundError shown nowhere."""
    from dagster import DagsterEventType, execute_job
    from dagster._core.definitions.reconstruct import ReconstructableJob

    package = tmp_path / "orchestrator_only"
    package.mkdir()
    (package / "only_here_jobs.py").write_text(JOB_ONLY_HERE)
    # Appended (Dagster drops sys.path[0] while importing); the worker's PYTHONPATH lacks it.
    monkeypatch.setattr(sys, "path", [*sys.path, str(package)])
    worker = start_worker()
    started = time.monotonic()
    with execute_job(ReconstructableJob.for_module("only_here_jobs", "only_here_job"),
                     instance=instance, run_config=run_config(io_dir, broker_url)) as result:
        assert not result.success
        run_id = result.run_id
    assert time.monotonic() - started < 60
    failures = instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE)
    assert sorted(r.step_key for r in failures) == ["also_here", "here"], "both steps ran"
    for record in failures:
        error = record.dagster_event.step_failure_data.error
        assert "ModuleNotFoundError" in error.to_string() and "only_here_jobs" in error.to_string()
    assert "ModuleNotFoundError: No module named 'only_here_jobs'" in worker.output()


def test_submitting_the_same_task_twice_queues_it_once(client, consumers, broker_url):  # noqa: F811
    """A submit retried after its reply was lost sends the same task id: the broker keeps one
    copy (before, each retry queued another, and two consumers could run both)."""
    task = client.broker.find_task("record")
    labels = {QUEUE_LABEL: "dagster", PRIORITY_LABEL: 0, LEASE_LABEL: 30.0,
              REPLY_LABEL: client.reply_to}
    for _ in range(3):
        client.loop.run_until_complete(
            task.kicker().with_labels(**labels).with_task_id("fixed-id").kiq("once", 0.5))
    server = sync_redis(broker_url)
    assert server.zcard(f"{P}:queue:dagster") == 1
    consumers("a", concurrency=2)
    consumers("b", concurrency=2)
    assert [r.task_id for r in client.replies(1, timeout=20)] == ["fixed-id"]
    time.sleep(1.0)
    starts = [e for e in trace(broker_url) if e.startswith("start:")]
    assert starts in (["start:once:a"], ["start:once:b"]), starts


def test_a_claim_whose_reply_was_lost_gets_the_same_task_back(client, broker_url):  # noqa: F811
    """A consumer retries a claim (same claim key) after losing its reply: it gets the task it
    had already been given, same delivery, instead of leaving it to expire (which cost a step
    a delivery and dropped a run)."""
    sent = client.send("claimed")
    broker = client.broker
    claim = [f"{P}:leases", f"{P}:queue:dagster",
             f"{P}:wake:dagster", f"{P}:claim:attempt-1"]
    args = ["consumer-x", P, 1]
    first = client.loop.run_until_complete(broker._run("claim", claim, args))
    again = client.loop.run_until_complete(broker._run("claim", claim, args))
    assert first[0].decode() == sent and again[0].decode() == sent
    assert first[2] == again[2] == 1, "the same delivery, not a second one"
    other = [*claim[:-1], f"{P}:claim:attempt-2"]
    assert client.loop.run_until_complete(broker._run("claim", other, args)) is None


def test_a_task_taken_again_after_a_freeze_is_not_stopped_by_news_of_its_first_delivery(
        client, broker_url):  # noqa: F811
    """A worker frozen past a lease may, once it resumes, take the same task again before it
    has heard that its first delivery was lost. The runner knows each delivery by its own key
    (``<id>#<token>``): before, it knew both by the task id, so the late notice of the first
    (lost lease, a step stopped at its fence) handed the second back too, which then lost its
    lease as well (found by the metrics test counting two expiries for one freeze)."""
    sent = client.send("twice", lease=0.5)
    consumer = make_broker(broker_url, ["dagster"], "frozen@h:1")
    lost: list[str] = []
    consumer.on_lost = lost.append
    loop = client.loop
    messages = consumer.listen()
    try:
        loop.run_until_complete(anext(messages))
        assert consumer.delivery(sent) == f"{sent}#1"
        time.sleep(0.8)  # "frozen": no heartbeat, the lease runs out
        assert loop.run_until_complete(client.broker.reap()) == [sent]
        loop.run_until_complete(anext(messages))  # resumed: it takes the task again
        assert consumer.delivery(sent) == f"{sent}#2"
        assert lost == [f"{sent}#1"], "the first delivery is over, and only that one"
        # The first delivery's step reports it stopped itself at its fence: too late to touch
        # the second, which keeps being renewed.
        consumer.give_up_lease(f"{sent}#1")
        assert loop.run_until_complete(consumer.heartbeat()) == ([], [])
        consumer._fence()
        assert lost == [f"{sent}#1"] and consumer.delivery(sent) == f"{sent}#2"
        assert sync_redis(broker_url).hget(f"{P}:task:{sent}", "holder") == b"frozen@h:1"
        consumer.give_up_lease(f"{sent}#2")  # its own notice does end it
        assert consumer.delivery(sent) == sent and not consumer._held
    finally:
        loop.run_until_complete(messages.aclose())
        loop.run_until_complete(consumer.shutdown())


def test_only_a_lost_delivery_counts_as_a_redelivery(client, broker_url):  # noqa: F811
    """The redeliveries metric tells of faults: a task handed back (a worker shutting down, a
    claim no replica confirmed) and taken again is not a redelivery; one whose lease ran out
    is (before, both counted, so every deploy looked like lost leases)."""
    sent = client.send("handed", lease=0.5)
    seen: list[tuple[str, bool]] = []

    class Recorder:
        def claimed(self, task_id, queue, kind, redelivered, waited):
            seen.append((task_id, redelivered))

        def renewed(self, task_id): ...

        def expired(self, task_id): ...

        def forgotten(self, task_id): ...

    loop = client.loop
    for holder, fault in (("first@h:1", "hand back"), ("second@h:1", "freeze"),
                          ("third@h:1", None)):
        consumer = make_broker(broker_url, ["dagster"], holder)
        consumer.metrics = Recorder()
        messages = consumer.listen()
        try:
            loop.run_until_complete(anext(messages))
            token = consumer._held[sent]
            if fault == "hand back":
                loop.run_until_complete(consumer._hand_back(sent, token))
            elif fault == "freeze":
                consumer._held.clear()  # it heartbeats nothing more: the lease runs out
                time.sleep(0.8)
                assert loop.run_until_complete(client.broker.reap()) == [sent]
        finally:
            loop.run_until_complete(messages.aclose())
            loop.run_until_complete(consumer.shutdown())
    assert seen == [(sent, False), (sent, False), (sent, True)]


def test_a_heartbeat_crossing_an_ack_does_not_call_the_task_lost(client, broker_url):  # noqa: F811
    """A heartbeat that reaches Redis just after the task's ack, but is answered before it,
    finds the task gone: it is finished, not lost (before, a worker logged "Lost the lease",
    counted a lease expiry and told the runner, for a task it had completed: seen in the
    thousand-task test). An ack that finds the task taken by another worker does report it."""
    loop = client.loop
    for taken_meanwhile in (False, True):
        sent = client.send(f"acked-{taken_meanwhile}")
        consumer = make_broker(broker_url, ["dagster"], "acker@h:1")
        lost: list[str] = []
        consumer.on_lost = lost.append
        run = consumer._run
        heartbeats: list = []

        async def ack_then_heartbeat(script, keys, args, run=run, consumer=consumer,
                                     taken_meanwhile=taken_meanwhile, heartbeats=heartbeats):
            if script == "ack" and taken_meanwhile:
                sync_redis(broker_url).hset(keys[1], "holder", "other@h:2")
            answer = await run(script, keys, args)
            if script == "ack":  # the heartbeat is answered before the ack is
                heartbeats.append(await consumer.heartbeat())
            return answer

        consumer._run = ack_then_heartbeat
        messages = consumer.listen()
        try:
            message = loop.run_until_complete(anext(messages))
            loop.run_until_complete(message.ack())
            assert heartbeats == [([], [])], "the heartbeat reported nothing lost"
            assert not consumer._held and not consumer._acking
            assert lost == ([f"{sent}#1"] if taken_meanwhile else [])
        finally:
            loop.run_until_complete(messages.aclose())
            loop.run_until_complete(consumer.shutdown())


def test_a_claim_answered_after_a_pause_is_renewed_before_it_runs(
        client, broker_url, monkeypatch):  # noqa: F811
    """A worker paused between asking for a task and reading the answer cannot vouch for the
    lease it got (for all it knows the lease began before the pause and is nearly out), so its
    fence would drop the task at once: it cost a delivery, and counted a second lease expiry
    for one freeze (seen in CI under load). Now it renews such a claim before running it."""
    import types

    from dagster_taskiq import broker as broker_module

    sent = client.send("paused", lease=2.0)
    consumer = make_broker(broker_url, ["dagster"], "paused@h:1")
    lost: list[str] = []
    consumer.on_lost = lost.append
    pause = [0.0]
    clock = types.SimpleNamespace(monotonic=lambda: time.monotonic() + pause[0], time=time.time)
    monkeypatch.setattr(broker_module, "time", clock)
    claim = consumer._run_confirmed

    async def paused_claim(script, keys, args):
        answer = await claim(script, keys, args)
        if script == "claim" and answer[0] is not None:
            pause[0] = 5.0  # the answer is read 5 s (more than the lease) after it was asked
        return answer

    consumer._run_confirmed = paused_claim
    messages = consumer.listen()
    try:
        client.loop.run_until_complete(anext(messages))
        consumer._fence()
        assert lost == [] and consumer.delivery(sent) == f"{sent}#1"
        assert sync_redis(broker_url).hget(f"{P}:task:{sent}", "holder") == b"paused@h:1"
    finally:
        client.loop.run_until_complete(messages.aclose())
        client.loop.run_until_complete(consumer.shutdown())


def test_a_reply_list_recreated_after_its_run_expires(client, broker_url):  # noqa: F811
    """A late revoke (or a lost worker) re-creates a run's reply list after its orchestrator
    deleted it: the list expires instead of staying forever."""
    client.send("never-run")
    server = sync_redis(broker_url)
    server.delete(client.reply_to)  # the orchestrator is done and cleaned up
    task_ids = [m.decode().split("|", 1)[1]
                for m in server.zrange(f"{P}:queue:dagster", 0, -1)]
    states = client.loop.run_until_complete(client.broker.revoke(task_ids))
    assert list(states.values()) == ["dropped"]
    assert server.llen(client.reply_to) == 1
    assert 0 < server.ttl(client.reply_to) <= 24 * 3600


def test_a_step_left_queued_by_a_dead_orchestrator_never_runs_into_its_ended_run(
        start_worker, instance, io_dir, broker_url):
    """The orchestrator dies with a step queued (no worker yet); run monitoring fails the run.
    A worker that starts later takes the step and does not run it (before, it ran into the
    failed run, however late)."""
    from dagster import DagsterEventType

    script = (
        "import json, sys\n"
        "from dagster import DagsterInstance, execute_job\n"
        "from dagster._core.definitions.reconstruct import ReconstructableJob\n"
        "with DagsterInstance.get() as instance:\n"
        "    execute_job(ReconstructableJob.for_file(sys.argv[1], 'slow_chain_job'),\n"
        "                instance=instance, run_config=json.loads(sys.argv[2]))\n"
    )
    config = run_config(io_dir, broker_url)
    orchestrator = subprocess.Popen(
        [sys.executable, "-c", script, REPO_FILE, json.dumps(config)],
        env=worker_env(broker_url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = sync_redis(broker_url)
    try:
        # The task in the broker, not the submit event: the event is written just before the
        # send, and a kill between the two (seen under CI load) leaves nothing queued.
        wait_for(lambda: server.zcard(f"{P}:queue:dagster"), 60,
                 "the orchestrator to queue slow_0")
    finally:
        orchestrator.kill()
        orchestrator.wait(10)
    run = instance.get_runs()[0]
    instance.report_run_failed(run)  # what run monitoring does for a dead orchestrator
    worker = start_worker()
    wait_for(lambda: "not running step slow_0" in worker.output(), 30, "the worker to skip it")
    assert not instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START)
    wait_for(lambda: not server.keys(f"{P}:task:*"), 10, "the task to be acknowledged")


ORCHESTRATOR = (
    "import json, sys\n"
    "from dagster import DagsterInstance, execute_job\n"
    "from dagster._core.definitions.reconstruct import ReconstructableJob\n"
    "with DagsterInstance.get() as instance:\n"
    "    execute_job(ReconstructableJob.for_file(sys.argv[1], sys.argv[2]),\n"
    "                instance=instance, run_config=json.loads(sys.argv[3]))\n"
)


def _orchestrate(job: str, config: dict, broker_url: str) -> subprocess.Popen:
    """The run's orchestrator in a process of its own (so a test can stop or kill it)."""
    return subprocess.Popen(
        [sys.executable, "-c", ORCHESTRATOR, REPO_FILE, job, json.dumps(config)],
        env=worker_env(broker_url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _run_status(instance) -> str:
    runs = instance.get_runs()
    return runs[0].status.value if runs else "none"


def test_a_lost_reply_is_settled_from_the_event_log(start_worker, instance, io_dir,
                                                    broker_url):
    """A step's reply is pushed but never reaches the orchestrator (here another reader takes
    it while the orchestrator is stopped). The task is gone from the broker, the step's success
    is in the event log: the orchestrator takes it from there and the run succeeds. Before, the
    run waited forever."""
    from dagster import DagsterEventType

    start_worker()
    config = run_config(io_dir, broker_url)
    config["ops"] = {"slow_0": {"config": {"seconds": 3.0}}}
    orchestrator = _orchestrate("slow_chain_job", config, broker_url)
    server = sync_redis(broker_url)
    try:
        wait_for(lambda: _starts(instance, "slow_0"), 60, "slow_0 to start")
        orchestrator.send_signal(signal.SIGSTOP)
        (task,) = server.keys(f"{P}:task:*")
        reply_to = server.hget(task, "reply_to")
        stolen = server.blpop([reply_to], timeout=20)
        orchestrator.send_signal(signal.SIGCONT)
        assert stolen is not None, "slow_0's reply never came"
        wait_for(lambda: _run_status(instance) in ("SUCCESS", "FAILURE"), 60, "the run to end")
    finally:
        orchestrator.send_signal(signal.SIGCONT)
        orchestrator.kill()
        orchestrator.wait(10)
    assert _run_status(instance) == "SUCCESS"
    run_id = instance.get_runs()[0].run_id
    messages = [r.dagster_event.message or "" for r in
                instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT)]
    assert any('Step "slow_0": its taskiq reply was lost' in m for m in messages)


def test_a_task_lost_with_redis_data_fails_its_step_instead_of_hanging(instance, io_dir,
                                                                      broker_url):
    """Redis loses its data (a restart without persistence) while a step is queued: the task is
    gone, nothing will ever reply. The step fails as lost (retry policies apply) and the run
    ends. Before, the orchestrator waited forever."""
    from dagster import DagsterEventType

    config = run_config(io_dir, broker_url)
    orchestrator = _orchestrate("slow_chain_job", config, broker_url)
    server = sync_redis(broker_url)
    try:
        wait_for(lambda: server.keys(f"{P}:task:*"), 60, "slow_0 to be queued")
        server.flushdb()
        wait_for(lambda: _run_status(instance) in ("SUCCESS", "FAILURE"), 60, "the run to end")
    finally:
        orchestrator.kill()
        orchestrator.wait(10)
    assert _run_status(instance) == "FAILURE"
    run_id = instance.get_runs()[0].run_id
    failures = instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE)
    assert [r.step_key for r in failures] == ["slow_0"]
    assert "vanished from the broker without a result" in \
        failures[0].dagster_event.step_failure_data.error.message


def test_a_submit_during_a_redis_restart_waits_for_it(tmp_path):
    """taskiq wraps a broker's error in SendTaskError: the client unwraps it, so a submit
    rides out a restart like every other call (before, it failed the run at once)."""
    from dagster_taskiq.client import TaskiqClient
    from dagster_taskiq.config import TASK_EXECUTE_PLAN, BrokerSettings

    server = start_redis(tmp_path)
    sender = TaskiqClient(BrokerSettings.from_config(server.url(), None, None), patience=30)
    try:
        sender.start()
        server.process.kill()
        server.process.wait(10)
        restarted = subprocess.Popen(
            ["bash", "-c", f"sleep 2; exec redis-server --port {server.port} --bind 127.0.0.1 "
                           f"--save '' --appendonly no --dir {tmp_path}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server.process = restarted
        started = time.monotonic()
        task_id = sender.send(TASK_EXECUTE_PLAN, ["{}", {}],
                              {QUEUE_LABEL: "dagster", PRIORITY_LABEL: 5, LEASE_LABEL: 5,
                               REPLY_LABEL: ""})
        assert time.monotonic() - started >= 1.5, "it was sent while Redis was down"
        assert sender.task_state(task_id), "the task is in the restarted broker"
    finally:
        sender.close()
        server.process.kill()
        server.process.wait(10)


def test_a_finished_run_leaves_only_fixed_structures_in_redis(start_worker, instance, io_dir,
                                                              broker_url):
    """No per-task or per-run key outlives a finished run: tasks are deleted when acknowledged,
    step results travel on the run's reply list only (before, each was also kept 7 days and
    never read), and the reply list is deleted when the run ends."""
    start_worker()
    out: list = []
    _run_in_thread("test_diamond_job", run_config(io_dir, broker_url), out).join(120)
    assert out and out[0].success
    server = sync_redis(broker_url)

    def kind(key: bytes) -> str:
        return key.decode()[len(P) + 1:].split(":", 1)[0]

    def per_run_keys() -> list[str]:
        return [key.decode() for key in server.scan_iter(f"{P}:*")
                if kind(key) in ("task", "result", "reply")]

    wait_for(lambda: not per_run_keys(), 10, "the run's keys to go")
    # A claim record outlives its claim by design (a retried claim finds it), but not long.
    claims = [key for key in server.scan_iter(f"{P}:*") if kind(key) == "claim"]
    assert all(0 < server.ttl(key) <= 60 for key in claims), claims


def test_a_busy_server_is_waited_out(tmp_path):
    """Someone's long Lua script makes Redis answer BUSY to everyone else: a transient reply
    like LOADING, retried with backoff (before, a bare ResponseError that failed the call)."""
    import threading

    from dagster_taskiq.client import TaskiqClient
    from dagster_taskiq.config import TASK_EXECUTE_PLAN, BrokerSettings

    server = start_redis(tmp_path, None, "--busy-reply-threshold", "100")
    sender = TaskiqClient(BrokerSettings.from_config(server.url(), None, None), patience=30)
    try:
        sender.start()
        busy_loop = ("local s = tonumber(redis.call('TIME')[1]) "
                     "while tonumber(redis.call('TIME')[1]) - s < 3 do end return 1")
        blocker = threading.Thread(target=lambda: server.client().eval(busy_loop, 0))
        blocker.start()

        def busy() -> bool:
            try:
                server.client().ping()
            except redis.ResponseError as exc:
                return "busy" in str(exc).lower()
            return False

        wait_for(busy, 5, "Redis to answer BUSY")
        started = time.monotonic()
        task_id = sender.send(TASK_EXECUTE_PLAN, ["{}", {}],
                              {QUEUE_LABEL: "dagster", PRIORITY_LABEL: 5, LEASE_LABEL: 5,
                               REPLY_LABEL: ""})
        assert time.monotonic() - started >= 0.5, "it was sent while Redis was busy"
        assert sender.task_state(task_id)
        blocker.join(10)
    finally:
        sender.close()
        server.process.kill()
        server.process.wait(10)


def test_a_frozen_workers_step_stops_itself_before_its_lease_runs_out(
        start_worker, instance, io_dir, broker_url):
    """The worker process (not its step's) is frozen past the lease: it can neither renew the
    lease nor stop its step, so the step's process watches the lease itself and stops before
    another worker may take the step (before, both copies ran, found by the chaos soak). Once
    thawed, the worker does not report it as a crash; the run succeeds."""
    _, holder, child, thread, out = _slow_step_on_one_of_two(
        start_worker, instance, io_dir, broker_url)
    os.kill(holder.process.pid, signal.SIGSTOP)  # the worker only: its step runs on
    try:
        wait_for(lambda: not alive(child), 4.0, "the step to stop itself")
        stopped = time.time()
        wait_for(lambda: len(_starts(instance, "slow_0")) == 2, 30, "the step to run again")
        assert _starts(instance, "slow_0")[1] > stopped, "the copies overlapped"
    finally:
        os.kill(holder.process.pid, signal.SIGCONT)
    thread.join(120)
    assert out and out[0].success
    assert len(_starts(instance, "slow_0")) == 2
    # Thawed, the worker hands the task back (whichever of its checks notices first), and
    # never reports the stopped copy as a crash of the step.
    wait_for(lambda: re.search("stopped itself|Lost the lease|Could not renew", holder.output()),
             10, "the thawed worker to say why")
    assert "before reporting a result" not in holder.output()
    assert holder.process.poll() is None


def test_a_read_only_window_mid_run_fails_nothing_and_silences_no_worker(
        start_worker, instance, io_dir, tmp_path):
    """Redis is demoted to a replica for 3 s mid-run (as in a failover) and promoted back. On
    demotion Redis ends every blocking read with UNBLOCKED: the orchestrator's wait for replies
    and the worker's wait for work retry it like READONLY (before, the run failed and every
    worker stayed alive taking nothing, found by the chaos soak)."""
    from tests.conftest import free_port

    server = start_redis(tmp_path)
    try:
        url = server.url()
        worker = start_worker(broker=url)
        config = run_config(io_dir, url, worker_heartbeat_timeout=10.0)
        config["ops"] = {f"slow_{i}": {"config": {"seconds": 1.0}} for i in range(3)}
        out: list = []
        thread = _run_in_thread("slow_chain_job", config, out)
        wait_for(lambda: _starts(instance, "slow_0"), 60, "the first step")
        admin = server.client()
        admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        time.sleep(3.0)
        admin.execute_command("REPLICAOF", "NO", "ONE")
        thread.join(120)
        assert out, "the run did not finish"
        assert out[0].success
        assert all(len(_starts(instance, f"slow_{i}")) == 1 for i in range(3))
        assert worker.process.poll() is None
    finally:
        server.process.terminate()
        server.process.wait(10)
