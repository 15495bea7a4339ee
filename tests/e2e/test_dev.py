"""``dagster-taskiq dev`` on example_project with Postgres storage, driven as a user would.

One stack for the module (its start costs ~25 s): the contract lines, a refused second start,
every example job launched through the webserver's GraphQL API, the run-priority pair in
order, the objects in S3, the UI in a real browser, and finally Ctrl-C's twin, SIGTERM, stopping
every process the stack started. The tests run in file order; the last one stops the stack.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.demo import EXAMPLE, DevStack, GraphQL, report_run, s3_objects, start_dev
from scripts.demo import problems as run_problems
from tests.conftest import ARTIFACTS, free_port, wait_for
from tests.e2e.browser import launch_from_ui, require_chromium
from tests.e2e.conftest import Database, alive, cmdline, descendants

LOCATION = "my_dagster_project"
EXAMPLE_JOBS = {"hello", "fan_out", "asset_pipeline", "retry_once", "urgent_report",
                "backfill_report"}
CLI = str(Path(sys.executable).parent / "dagster-taskiq")

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def stack(postgres_db: Database, tmp_path_factory) -> Iterator[DevStack]:
    log = tmp_path_factory.mktemp("dev") / "dev.log"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "e2e", "AWS_SECRET_ACCESS_KEY": "e2e-secret-key1"}
    # One step and one run at a time per worker: the run-priority order is then exact.
    dev = start_dev(EXAMPLE, ["--port", str(free_port()), "--storage", postgres_db.url,
                              "--concurrency", "1"], log, env=env)
    yield dev
    dev.stop()


@pytest.fixture(scope="module")
def gql(stack: DevStack) -> GraphQL:
    return GraphQL(stack.url)


def jobs_by_name(gql: GraphQL) -> dict[str, dict]:
    return {job["name"]: job for job in gql.jobs()}


def expected_queue(step_key: str) -> str:
    match = re.fullmatch(r"square_on_(\w+)_p\d+", step_key)
    return match[1] if match else "dagster"


def test_prints_exactly_the_three_contract_lines(stack: DevStack) -> None:
    assert len(stack.lines) == 3, stack.lines
    redis_line, s3_line, ready_line = stack.lines
    # Our own Redis, with a password that is never shown.
    assert re.fullmatch(r"redis: redis://:\*\*\*@127\.0\.0\.1:\d+/0", redis_line)
    assert re.fullmatch(r"s3: http://127\.0\.0\.1:\d+ bucket=dagster-artifacts", s3_line)
    assert re.fullmatch(r"ready: http://127\.0\.0\.1:\d+", ready_line)
    assert stack.bucket in {b["Name"] for b in stack.s3_client().list_buckets()["Buckets"]}


def test_a_second_start_is_refused_clearly(stack: DevStack, tmp_path: Path) -> None:
    same = subprocess.run([CLI, "dev", "--port", str(free_port())], cwd=EXAMPLE,
                          capture_output=True, text=True, timeout=60)
    assert same.returncode == 1
    assert "already running" in same.stderr
    assert f"pid {stack.process.pid}" in same.stderr
    assert same.stdout == ""

    # Another project on the same UI port: refused before anything starts.
    other = tmp_path / "other"
    shutil.copytree(EXAMPLE, other, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
    port = stack.url.rsplit(":", 1)[1]
    busy = subprocess.run([CLI, "dev", "--port", port], cwd=other, capture_output=True,
                          text=True, timeout=60)
    assert busy.returncode == 1
    assert f"Port {port} is in use" in busy.stderr


def _worker_pid(stack: DevStack, name: str) -> int:
    for pid in descendants(stack.process.pid):
        if f"worker start -n {name} " in cmdline(pid):
            return pid
    raise AssertionError(f"no {name} process under dev")


def forwarded(gql: GraphQL, run_id: str) -> bool:
    """The launcher has put the run's task into the broker (its own engine event says so)."""
    return any("Taskiq task has been forwarded" in (e.get("message") or "")
               for e in gql.events(run_id))


def test_run_priority_pair_runs_urgent_first(stack: DevStack, gql: GraphQL) -> None:
    """Both runs wait in the broker while worker-dagster is paused, the low-priority one
    queued first; once it resumes, the worker (one run at a time) takes urgent_report first."""
    jobs = jobs_by_name(gql)
    worker = _worker_pid(stack, "worker-dagster")
    os.kill(worker, signal.SIGSTOP)
    try:
        backfill = gql.launch(jobs["backfill_report"])
        wait_for(lambda: forwarded(gql, backfill), 90,
                 "backfill_report's run task to reach the broker", interval=0.3)
        urgent = gql.launch(jobs["urgent_report"])
        wait_for(lambda: forwarded(gql, urgent), 90,
                 "urgent_report's run task to reach the broker", interval=0.3)
    finally:
        os.kill(worker, signal.SIGCONT)
    wait_for(lambda: {gql.status(backfill), gql.status(urgent)} <= {"SUCCESS", "FAILURE",
                                                                      "CANCELED"},
             180, "both report runs to finish")
    reports = {name: report_run(gql, name, run_id)
               for name, run_id in (("backfill_report", backfill), ("urgent_report", urgent))}
    client = stack.s3_client()
    for report in reports.values():
        uris = [u for s in report.steps.values() for u in s.outputs]
        assert run_problems(report, s3_objects(client, stack.bucket, uris)) == []
        assert [s.workers for s in report.steps.values()] == [["worker-dagster"]]
    def stamp(name: str, kind: str) -> float:
        return min(float(e["timestamp"]) for e in reports[name].of_type(kind))

    timeline = {(name, kind): stamp(name, kind) for name in reports
                for kind in ("RUN_START", "STEP_START", "RUN_SUCCESS")}
    # Launched second, yet started first: its run task and then its step overtook the
    # waiting low-priority ones in the broker's queues.
    assert timeline["urgent_report", "RUN_START"] < timeline["backfill_report", "RUN_START"], \
        timeline
    assert timeline["urgent_report", "STEP_START"] < timeline["backfill_report", "STEP_START"], \
        timeline


def test_every_example_job_runs_on_the_right_queue_and_worker(stack: DevStack,
                                                              gql: GraphQL) -> None:
    jobs = jobs_by_name(gql)
    assert set(jobs) == EXAMPLE_JOBS
    runs = {gql.launch(jobs[name]): name
            for name in sorted(EXAMPLE_JOBS - {"urgent_report", "backfill_report"})}
    wait_for(lambda: all(gql.status(r) in {"SUCCESS", "FAILURE", "CANCELED"} for r in runs),
             240, "the example runs to finish", interval=0.5)
    client = stack.s3_client()
    reports = {name: report_run(gql, name, run_id) for run_id, name in runs.items()}
    for name, report in reports.items():
        uris = [u for s in report.steps.values() for u in s.outputs]
        found = s3_objects(client, stack.bucket, uris)
        assert run_problems(report, found) == [], name
        for step in report.steps.values():
            assert step.queue == expected_queue(step.key), (name, step.key)
            assert set(step.workers) == {f"worker-{step.queue}"}, (name, step.key)
            assert step.outputs and all(found[u] for u in step.outputs), (name, step.key)

    fan_out = reports["fan_out"].steps
    assert {s.queue for s in fan_out.values()} == {"dagster", "short", "long"}
    assert len(fan_out) == 8

    # The retry example: attempt 1 fails, Dagster retries, attempt 2 succeeds (on a worker).
    retry = reports["retry_once"]
    kinds = [e["eventType"] for e in retry.events if e.get("stepKey") == "flaky_step"]
    assert "STEP_UP_FOR_RETRY" in kinds and kinds.index("STEP_UP_FOR_RETRY") < kinds.index(
        "STEP_SUCCESS")
    assert retry.steps["flaky_step"].workers == ["worker-dagster", "worker-dagster"]
    assert any("Simulated transient failure" in json.dumps(e.get("error"))
               for e in retry.events if e["eventType"] == "STEP_UP_FOR_RETRY")

    # The assets live under their keys; step logs went to S3 through the compute log manager.
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=stack.bucket)["Contents"]}
    assert {"dagster/raw_numbers", "dagster/number_stats"} <= keys
    assert any(k.startswith("compute-logs/") for k in keys)


def test_the_ui_in_a_real_browser(stack: DevStack, gql: GraphQL) -> None:
    require_chromium()
    run_id = launch_from_ui(stack.url, LOCATION, sorted(EXAMPLE_JOBS), "hello",
                            ARTIFACTS / "e2e-browser", gql.status)
    report = report_run(gql, "hello", run_id)
    assert report.steps["say_hello"].workers == ["worker-dagster"]
    assert (ARTIFACTS / "e2e-browser" / "3-run-succeeded.png").stat().st_size > 10_000


def test_sigterm_stops_everything_it_started(stack: DevStack) -> None:
    started = descendants(stack.process.pid)
    names = " ".join(cmdline(p) for p in started)
    for service in ("worker-dagster", "worker-short", "worker-long", "code-server",
                    "dagster-webserver", "dagster-daemon"):
        assert service in names
    assert "redis-server" in names or "valkey-server" in names
    port = int(stack.url.rsplit(":", 1)[1])
    assert stack.stop() == 0
    time.sleep(0.5)
    assert [cmdline(p) for p in started if alive(p)] == []
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
        sock.bind(("127.0.0.1", port))  # the UI port is free again
