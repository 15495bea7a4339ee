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
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableJob

from dagster_taskiq.broker import REDIS_ERRORS, redis_client
from dagster_taskiq.config import BrokerSettings
from tests.conftest import ARTIFACTS, wait_for
from tests.executor.conftest import CLI, worker_env
from tests.ha.conftest import SentinelSetup
from tests.ha.ha_repo import STEPS

REPO_FILE = str(Path(__file__).with_name("ha_repo.py"))


def test_a_client_follows_the_primary_through_a_failover(sentinel_setup: SentinelSetup) -> None:
    settings = BrokerSettings.from_config(sentinel_setup.url(db=2))
    old = sentinel_setup.primary_port()
    assert old == sentinel_setup.servers[0].port

    async def main() -> int:
        client = redis_client(settings.broker_url, settings)
        try:
            await client.set("before", "1")
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


def _run(instance: DagsterInstance, url: str, record: Path, out: list[Any],
         seconds: float = 3.0) -> None:
    config = {
        "execution": {"config": {"broker": url}},
        "ops": {step: {"config": {"record": str(record), "seconds": seconds}} for step in STEPS},
    }
    started = time.monotonic()
    with execute_job(ReconstructableJob.for_file(REPO_FILE, "ha_job"), instance=instance,
                     run_config=config) as result:
        out.append((result.success, time.monotonic() - started,
                    [e.step_key for e in result.all_events if e.event_type_value ==
                     "STEP_SUCCESS"]))


def _records(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def _assert_never_twice_at_once(records: list[dict[str, Any]]) -> None:
    """Per step, the [start, end] spans of its copies (by pid) do not overlap, and no copy
    found another holding the step's lock."""
    assert not [r for r in records if r.get("overlap")], records
    for step in STEPS:
        spans: dict[int, list[float]] = {}
        for r in records:
            if r["step"] == step:
                spans.setdefault(r["pid"], []).append(r["at"])
        ordered = sorted(spans.values())
        for first, second in itertools.pairwise(ordered):
            assert len(first) == 2 and first[1] <= second[0], (step, ordered)


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

    record, out = tmp_path / "failover.jsonl", []
    thread = threading.Thread(target=_run, args=(instance, url, record, out), daemon=True)
    thread.start()
    wait_for(lambda: any(r["event"] == "start" for r in _records(record)), 60,
             "the first step to start")
    # Late in the first wave's 3 s: its steps end while there is no primary, so their
    # results and the next steps' claims wait for the new one.
    time.sleep(2.5)
    old = sentinel_setup.primary_port()
    killed_at = time.time()
    sentinel_setup.servers[0].process.kill()
    wait_for(lambda: sentinel_setup.primary_port() not in (None, old), 60,
             "the Sentinels to promote the replica", interval=0.05)
    promoted_at = time.time()
    thread.join(240)
    assert out, "the run did not finish within 240 s"
    success, duration, succeeded = out[0]
    records = _records(record)
    assert success, records
    assert sorted(succeeded) == sorted(STEPS)  # each step succeeded once
    _assert_never_twice_at_once(records)
    starts = [r for r in records if r["event"] == "start"]
    assert sorted(r["step"] for r in starts) == sorted(STEPS), "a step ran more than once"

    # The workers' registry followed too, and the CLI reads it through the Sentinels.
    listed = subprocess.run([CLI, "worker", "list", "--json"], env=worker_env(url),
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert sorted(w["name"] for w in json.loads(listed.stdout)) == ["ha0", "ha1"]

    # A slot freed after the kill waits for the new primary to get its next step.
    after = sorted(r["at"] for r in starts if r["at"] > killed_at)
    freed = sorted(r["at"] for r in records if r["event"] == "end" and r["at"] > killed_at)
    measured = {
        "kill_to_promotion_s": round(promoted_at - killed_at, 2),
        "kill_to_first_step_started_after_s": round(after[0] - killed_at, 2) if after else None,
        "first_slot_freed_to_next_step_s": round(after[0] - freed[0], 2)
        if after and freed else None,
        "run_duration_s": round(duration, 2),
        "baseline_run_duration_s": round(baseline[0][1], 2),
        "down_after_milliseconds": 1000,
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "ha-failover.json").write_text(json.dumps(measured, indent=2) + "\n")
    print(measured)
