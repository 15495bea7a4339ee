"""A Sentinel-managed broker: killing the primary mid-run loses nothing and runs nothing twice.

The executor, the orchestrator and two workers all use a ``redis+sentinel://`` URL. Mid-run the
primary is SIGKILLed; the Sentinels promote the replica; every client finds the new primary on
reconnect (redis-py's Sentinel pool asks the Sentinels on each new connection) and the run
finishes. The failover's timings are written to test-artifacts/ha-failover.json.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterEventType, DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableJob
from taskiq import BrokerMessage

from dagster_taskiq.broker import (
    LEASE_LABEL,
    PRIMARY_CHECK_SECONDS,
    REDIS_ERRORS,
    RedisLeaseBroker,
    RedisNoReplicasError,
    redis_client,
)
from dagster_taskiq.config import DEFAULT_KEY_PREFIX as P
from dagster_taskiq.config import BrokerSettings
from tests.conftest import ARTIFACTS, start_redis, stop_processes, wait_for
from tests.executor.conftest import CLI, worker_env
from tests.ha.conftest import DOWN_AFTER_MS, SERVICE, SentinelSetup
from tests.ha.ha_repo import STEPS

REPO_FILE = str(Path(__file__).with_name("ha_repo.py"))


def test_noreplicas_is_a_transient_reply(tmp_path: Path) -> None:
    """A primary with min-replicas-to-write and too few replicas refuses writes with
    NOREPLICAS until they are back: the broker's loops retry it like READONLY."""
    server = start_redis(tmp_path, None, "--min-replicas-to-write", "1")
    try:
        settings = BrokerSettings.from_config(server.url())

        async def write() -> None:
            client = redis_client(settings.broker_url, settings)
            try:
                await client.set("k", "v")
            finally:
                await client.aclose()

        with pytest.raises(RedisNoReplicasError):  # one of REDIS_ERRORS
            asyncio.run(write())
    finally:
        stop_processes([server.process])


def test_a_client_follows_the_primary_through_a_failover(sentinel_setup: SentinelSetup) -> None:
    settings = BrokerSettings.from_config(sentinel_setup.url(db=2))
    old = sentinel_setup.primary_port()
    assert old == sentinel_setup.servers[0].port

    async def main() -> int:
        client = redis_client(settings.broker_url, settings)
        try:
            await client.set("before", "1")
            # Replication is asynchronous: without this, a loaded machine may kill the primary
            # before the replica has the write, and the new primary rightly lacks it.
            assert await client.execute_command("WAIT", 1, 10_000) == 1
            sentinel_setup.servers[0].process.kill()  # SIGKILL: no goodbye to anyone
            deadline = time.monotonic() + 60
            while True:  # as the broker's loops do: retry what REDIS_ERRORS says will pass
                try:
                    await client.set("after", "1")
                    break
                except REDIS_ERRORS:
                    assert time.monotonic() < deadline, "no new primary within 60 s"
                    await asyncio.sleep(0.2)
            assert await client.get("before") == b"1"  # replicated before the kill
            return int(client.connection_pool.master_address[1])
        finally:
            await client.aclose()

    assert asyncio.run(main()) == sentinel_setup.servers[1].port
    with sentinel_setup.servers[1].client(db=2) as new_primary:
        assert new_primary.get("after") == b"1"  # database 2 of the URL, on the new primary


def test_a_client_leaves_a_demoted_primary_that_still_answers(
        sentinel_setup: SentinelSetup) -> None:
    """After a failover that leaves the old primary up (and, for a few seconds, still a
    primary), the client's open connections move to the new one: a write lands there, not on
    the old primary, where the Sentinels' reconfiguration would later erase it."""
    settings = BrokerSettings.from_config(sentinel_setup.url())
    new = sentinel_setup.servers[1]

    async def main() -> None:
        client = redis_client(settings.broker_url, settings)
        try:
            await client.set("before", "1")  # a pooled connection to the old primary
            with sentinel_setup.sentinel(sentinel_setup.sentinel_ports[0]) as sentinel:
                sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)
            wait_for(lambda: sentinel_setup.primary_port() == new.port, 60,
                     "the Sentinels to promote the replica", interval=0.05)
            await asyncio.sleep(PRIMARY_CHECK_SECONDS)  # the pool asks again by now
            deadline = time.monotonic() + 60
            while True:
                try:
                    await client.set("after", "1")
                    break
                except REDIS_ERRORS:
                    assert time.monotonic() < deadline, "no write within 60 s"
                    await asyncio.sleep(0.2)
        finally:
            await client.aclose()

    asyncio.run(main())
    with new.client() as new_primary:
        assert new_primary.get("after") == b"1"


def test_what_no_replica_confirms_never_runs_and_never_renews(
        sentinel_setup: SentinelSetup) -> None:
    """A claim or a lease renewal that no replica confirmed could be lost in a failover (the
    replica promoted without it), and then a second worker runs the same step. With the
    replica frozen (the primary still counts it as connected, so it cannot confirm anything),
    a claim is handed back and not run, and renewals stop counting: the step already running
    is stopped at its fence. Once the replica answers again, the waiting task is taken."""
    settings = BrokerSettings.from_config(sentinel_setup.url())
    replica = sentinel_setup.servers[1]

    def message(task_id: str, lease: float) -> BrokerMessage:
        return BrokerMessage(task_id=task_id, task_name="t", message=b"{}",
                             labels={LEASE_LABEL: lease})

    async def main() -> None:
        client = RedisLeaseBroker(settings)
        consumer = RedisLeaseBroker(settings, holder="w@h:1", block_seconds=0.1)
        lost: list[str] = []
        consumer.on_lost = lost.append
        messages = consumer.listen()
        taken = asyncio.create_task(asyncio.sleep(0))
        with replica.client() as replica_view, sentinel_setup.servers[0].client() as primary:
            try:
                await client.kick(message("running", 3.0))
                await asyncio.wait_for(anext(messages), 10)
                wait_for(lambda: replica_view.hget(f"{P}:task:running", "holder") == b"w@h:1",
                         10, "the replica to have the claim")
                os.kill(replica.process.pid, signal.SIGSTOP)
                try:
                    await client.kick(message("waiting", 30.0))
                    taken = asyncio.create_task(anext(messages))
                    deadline = time.monotonic() + 2.5
                    while time.monotonic() < deadline and not lost:
                        assert await consumer.heartbeat() == ([], [])  # renewed on the primary
                        consumer._fence()
                        await asyncio.sleep(0.25)
                    # Not confirmed, so not counted: stopped before the lease could run out.
                    assert lost == ["running#1"]
                    assert not taken.done(), "a claim no replica confirmed was handed out"
                    # Claimed and handed back, again and again (a claim may be in flight).
                    assert int(primary.hget(f"{P}:task:waiting", "released") or 0) >= 1
                finally:
                    os.kill(replica.process.pid, signal.SIGCONT)
                await asyncio.wait_for(taken, 20)
                assert consumer.delivery("waiting").startswith("waiting#")
                assert primary.hget(f"{P}:task:waiting", "holder") == b"w@h:1"
            finally:
                if not taken.done():
                    taken.cancel()
                await asyncio.gather(taken, return_exceptions=True)
                await consumer.shutdown()
                await client.shutdown()

    asyncio.run(main())


def _run(instance: DagsterInstance, url: str, record: Path, out: list[Any],
         seconds: float = 3.0) -> None:
    config = {
        "execution": {"config": {"broker": url}},
        "ops": {step: {"config": {"record": str(record), "seconds": seconds}} for step in STEPS},
    }
    started = time.monotonic()
    with execute_job(ReconstructableJob.for_file(REPO_FILE, "ha_job"), instance=instance,
                     run_config=config) as result:
        # The instance's event log: the durable record of what each step did.
        successes = instance.all_logs(result.run_id, of_type=DagsterEventType.STEP_SUCCESS)
        out.append((result.success, time.monotonic() - started,
                    [record.step_key for record in successes]))


def _records(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def _assert_never_twice_at_once(records: list[dict[str, Any]]) -> None:
    """No copy of a step found another holding the step's lock (so none ran while another
    did: the lock dies with its process), and per step the copies that ended did so before the
    next one started."""
    assert not [r for r in records if r.get("overlap")], records
    for step in STEPS:
        spans: dict[int, list[float]] = {}
        for r in records:
            if r["step"] == step:
                spans.setdefault(r["pid"], []).append(r["at"])
        ordered = sorted(spans.values())
        for first, second in itertools.pairwise(ordered):
            # A copy with no end was stopped (its lease lost); the lock shows it was gone.
            assert len(first) == 1 or first[1] <= second[0], (step, ordered)


def _run_through_a_failover(setup: SentinelSetup, instance: DagsterInstance, url: str,
                            record: Path, fail_over: Callable[[], None]) -> dict[str, Any]:
    """Run the job; late in its first wave's 3 s steps (which then end while there is no
    primary, so their results and the next steps' claims wait for the new one) call
    ``fail_over``. Checks the run succeeded with every step succeeding once and never two
    copies of a step at once; returns the timings."""
    out: list[Any] = []
    thread = threading.Thread(target=_run, args=(instance, url, record, out), daemon=True)
    thread.start()
    wait_for(lambda: any(r["event"] == "start" for r in _records(record)), 60,
             "the first step to start")
    time.sleep(2.5)
    old = setup.primary_port()
    failed_at = time.time()
    fail_over()
    wait_for(lambda: setup.primary_port() not in (None, old), 60,
             "the Sentinels to promote the replica", interval=0.05)
    promoted_at = time.time()
    thread.join(240)
    assert out, "the run did not finish within 240 s"
    success, duration, succeeded = out[0]
    records = _records(record)
    assert success, records
    assert sorted(succeeded) == sorted(STEPS)  # each step succeeded once
    starts = [r for r in records if r["event"] == "start"]
    assert {r["step"] for r in starts} == set(STEPS)
    overlapping = [r for r in records if r.get("overlap")]
    _assert_never_twice_at_once(records)

    # The workers' registry followed too, and the CLI reads it through the Sentinels.
    listed = subprocess.run([CLI, "worker", "list", "--json"], env=worker_env(url),
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert sorted(w["name"] for w in json.loads(listed.stdout)) == ["ha0", "ha1"]

    # A slot freed after the failover began waits for the new primary to get its next step.
    after = sorted(r["at"] for r in starts if r["at"] > failed_at)
    freed = sorted(r["at"] for r in records if r["event"] == "end" and r["at"] > failed_at)
    return {
        "failover_to_promotion_s": round(promoted_at - failed_at, 2),
        "failover_to_first_step_started_after_s":
            round(after[0] - failed_at, 2) if after else None,
        "first_slot_freed_to_next_step_s":
            round(after[0] - freed[0], 2) if after and freed else None,
        "run_duration_s": round(duration, 2),
        # Copies started beyond one per step: a write lost in the failover (a claim taken
        # by the old primary) makes a worker lose its lease; it stops the copy, which reruns.
        "extra_copies_started": len(starts) - len(STEPS),
        "copies_started_while_another_ran": len(overlapping),
    }


def _save(name: str, measured: dict[str, Any]) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"ha-{name}.json").write_text(json.dumps(measured, indent=2) + "\n")
    print(name, measured)


def test_killing_the_primary_mid_run_finishes_the_run_once(
        sentinel_setup: SentinelSetup, start_worker, instance: DagsterInstance,
        tmp_path: Path) -> None:
    url = sentinel_setup.url()
    for i in range(2):
        start_worker(broker=url, name=f"ha{i}")
    # A quick run warms the workers up (code loaded), then the same run with no failure,
    # for the comparison.
    warm_up: list[Any] = []
    _run(instance, url, tmp_path / "warm-up.jsonl", warm_up, seconds=0.0)
    baseline: list[Any] = []
    _run(instance, url, tmp_path / "baseline.jsonl", baseline)
    assert warm_up[0][0] and baseline[0][0]

    # SIGKILL: every connection to it drops at once; Sentinels notice after down-after.
    measured = _run_through_a_failover(sentinel_setup, instance, url, tmp_path / "run.jsonl",
                                       sentinel_setup.servers[0].process.kill)
    _save("failover-kill", {**measured, "baseline_run_duration_s": round(baseline[0][1], 2),
                            "down_after_milliseconds": DOWN_AFTER_MS})


def test_a_forced_failover_mid_run_finishes_the_run_once(
        sentinel_setup: SentinelSetup, start_worker, instance: DagsterInstance,
        tmp_path: Path) -> None:
    """SENTINEL FAILOVER: the old primary keeps answering, still a primary, until the Sentinels
    demote it, and clients with connections open to it write there until they ask the
    Sentinels again (at most a second later). Such writes are lost with the old primary's data.
    Before, a lost claim let a second worker take the step from the new primary while the
    first copy still ran (measured: two extra copies, one of them at once). Now a claim or a
    renewal counts only once a replica confirmed it (``WAIT``, see replication.py): a claim on
    the abandoned primary is handed back unrun, so no step runs twice at once."""
    url = sentinel_setup.url()
    for i in range(2):
        start_worker(broker=url, name=f"ha{i}")

    def fail_over() -> None:
        with sentinel_setup.sentinel(sentinel_setup.sentinel_ports[0]) as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)

    measured = _run_through_a_failover(sentinel_setup, instance, url, tmp_path / "run.jsonl",
                                       fail_over)
    _save("failover-forced", measured)
