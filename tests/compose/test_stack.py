"""The generated stack, for real: `docker compose up` of a rendered project on a Docker engine.

One module-scoped stack per S3 backend that can run here (``seaweedfs`` in the stack, and
``external`` pointed at an S3 endpoint outside it); MinIO has no obtainable binary, so it is
checked statically (tests/template) and differs from these only in the ``s3`` service. The tests
of a stack are the steps of its life, in order: up and healthy, every example job through the
webserver's GraphQL API (as the UI's Launch button), scaling one queue, ``down`` then ``up``,
a broken definitions module, ``down -v``. Timings go to the test output (``-s``/``-rA``), never
into assertions.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.demo import GraphQL, report_run, wait_for_runs
from scripts.render_example import render
from tests.compose.conftest import (
    Stack,
    docker,
    note,
    project_resources,
    services_of,
    set_env,
)
from tests.conftest import free_port, wait_for

pytestmark = [pytest.mark.timeout(1500), pytest.mark.usefixtures("standin_images")]

ANSWERS = {
    "seaweedfs": {"project_name": "Stack Check", "queues": ["etl"], "s3_backend": "seaweedfs",
                  "s3_bucket": "stack-check-artifacts"},
    "external": {"project_name": "Outside S3", "queues": ["dagster", "io"],
                 "s3_backend": "external", "s3_bucket": "outside-artifacts"},
}
UP = ("up", "-d", "--build", "--wait", "--wait-timeout", "600")
# Lists the bucket from inside the stack, with the stack's own settings and secrets.
LIST_BUCKET = (
    "import json, os, boto3; "
    "c = boto3.client('s3', endpoint_url=os.environ.get('S3_ENDPOINT_URL') or None); "
    "p = c.get_paginator('list_objects_v2').paginate(Bucket=os.environ['S3_BUCKET']); "
    "print(json.dumps([o['Key'] for page in p for o in page.get('Contents', [])]))"
)


def docker_bridge_ip() -> str:
    """The host's address on Docker's default bridge (the gateway of its containers)."""
    result = docker("network", "inspect", "bridge", "--format",
                    '{{index .Options "com.docker.network.bridge.name"}}')
    assert result.returncode == 0, result.stderr
    device = result.stdout.strip() or "docker0"
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", device],
                           capture_output=True, text=True, timeout=30)
    match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", shown.stdout)
    assert match, f"no IPv4 address on {device}: {shown.stdout} {shown.stderr}"
    return match.group(1)


@pytest.fixture(scope="module")
def outside_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3 endpoint outside the stack (moto's server), on the host's address on Docker's
    default bridge, where containers can reach it and nothing outside this machine can."""
    host, port = docker_bridge_ip(), free_port()
    log = tmp_path_factory.mktemp("outside-s3") / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H",
                                    host, "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://{host}:{port}"

    def answers() -> bool:
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex((host, port)) == 0

    try:
        wait_for(answers, 60, f"moto server on {url}", interval=0.2)
        yield url
    finally:
        process.terminate()
        process.wait(20)


@pytest.fixture(scope="module", params=sorted(ANSWERS))
def stack(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    backend: str = request.param
    project = render(tmp_path_factory.mktemp(f"compose-{backend}") / "project", ANSWERS[backend])
    settings = {"DAGSTER_WEBSERVER_PORT": str(free_port()), "WORKER_CONCURRENCY": "2"}
    if backend == "external":
        settings |= {"S3_ENDPOINT_URL": request.getfixturevalue("outside_s3"),
                     "S3_ACCESS_KEY_ID": "outside-key", "S3_SECRET_ACCESS_KEY": "outside-secret"}
    set_env(project, settings)
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    queues = ["dagster", *(q for q in answers["queues"] if q != "dagster")]
    running = Stack(project, f"{answers['package_name'].replace('_', '-')}-{uuid.uuid4().hex[:6]}",
                    backend, answers["package_name"], queues)
    try:
        yield running
    finally:
        running.compose("down", "-v", "--timeout", "20", "--remove-orphans", check=False,
                        timeout=300)
        note(f"{backend}: " + "; ".join(running.log))


def env_value(stack: Stack, name: str) -> str:
    for line in (stack.project / ".env").read_text().splitlines():
        if line.startswith(f"{name}="):
            return line.split("=", 1)[1]
    raise KeyError(name)


def gql(stack: Stack) -> GraphQL:
    return GraphQL(f"http://127.0.0.1:{env_value(stack, 'DAGSTER_WEBSERVER_PORT')}")


def ids_by_service(stack: Stack) -> dict[str, set[str]]:
    return {service: {c["ID"] for c in containers}
            for service, containers in services_of(stack.containers()).items()}


def bucket_keys(stack: Stack) -> set[str]:
    return set(json.loads(stack.exec("worker-dagster", "python", "-c", LIST_BUCKET)))


def live_workers(stack: Stack) -> list[dict[str, Any]]:
    return json.loads(stack.exec("worker-dagster", "dagster-taskiq", "worker", "list", "--json"))


def only_in_stack_s3(stack: Stack) -> None:
    """What does not depend on the S3 backend runs once, on the stack with S3 inside it."""
    if stack.backend != "seaweedfs":
        pytest.skip("backend-independent: checked on the seaweedfs stack")


def test_up_builds_one_image_and_every_service_turns_healthy(stack: Stack) -> None:
    started = time.monotonic()
    stack.compose(*UP, timeout=900)
    note(f"{stack.backend}: up --build --wait: healthy in {time.monotonic() - started:.0f} s")

    containers = services_of(stack.containers())
    expected = {"redis", "postgres", "s3-init", "code-server", "webserver", "daemon",
                *(f"worker-{q}" for q in stack.queues)}
    if stack.backend != "external":
        expected.add("s3")
    assert set(containers) == expected
    for service, found in containers.items():
        for container in found:
            if service == "s3-init":
                assert container["State"] == "exited" and container["ExitCode"] == 0, container
            else:
                assert container["State"] == "running", container
                assert container["Health"] == "healthy", container

    # One image for every Dagster role, built once (only s3-init has a build section).
    dagster_roles = expected - {"redis", "postgres", "s3"}
    images = {c["Image"] for s in dagster_roles for c in containers[s]}
    assert len(images) == 1, images
    ids = {docker("inspect", "--format", "{{.Image}}", c["ID"]).stdout.strip()
           for s in dagster_roles for c in containers[s]}
    assert len(ids) == 1, ids

    # The UI, and only the UI, is published, on loopback.
    published = [(s, p) for s, found in containers.items() for c in found
                 for p in c.get("Publishers") or [] if p.get("PublishedPort")]
    assert [(s, p["URL"], p["TargetPort"]) for s, p in published] == [
        ("webserver", "127.0.0.1", 3000)]


def test_secrets_stay_out_of_inspect_and_ps(stack: Stack) -> None:
    secrets = [env_value(stack, name) for name in
               ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "S3_SECRET_ACCESS_KEY")]
    assert all(len(secret) >= 8 for secret in secrets)
    for container in stack.containers():
        if container["Service"] == "s3":
            continue  # SeaweedFS reads its S3 identity from its environment only
        inspected = docker("inspect", container["ID"]).stdout
        for secret in secrets:
            assert secret not in inspected, f"a secret is in `docker inspect` of {container}"
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    for secret in secrets:
        assert secret not in processes, "a secret is on a command line"
    # And yet the services use them: the broker answers the workers (with the password).
    assert live_workers(stack)


def test_every_example_job_runs_on_the_workers_of_its_queues(stack: Stack) -> None:
    api = gql(stack)
    jobs = api.jobs()
    names = {job["name"] for job in jobs}
    assert {"hello", "fan_out", "urgent_report", "backfill_report", "asset_pipeline",
            "retry_once"} <= names
    started = time.monotonic()
    runs = {api.launch(job): job["name"] for job in jobs}
    statuses = wait_for_runs(api, runs, timeout=420)
    note(f"{stack.backend}: {len(runs)} runs done in {time.monotonic() - started:.0f} s")

    queue_of_worker = {w["name"]: w["queues"] for w in live_workers(stack)}
    keys = bucket_keys(stack)
    for run_id, job in sorted(runs.items(), key=lambda item: item[1]):
        report = report_run(api, job, run_id)
        lines = [f"{s.key} queue={s.queue} workers={s.workers} attempts={s.attempts}"
                 for s in report.steps.values()]
        note(f"{stack.backend}: {job} {statuses[run_id]}: " + "; ".join(lines))
        assert statuses[run_id] == "SUCCESS", (job, lines)
        for step in report.steps.values():
            assert step.queue, (job, step.key, "never submitted to a taskiq queue")
            assert step.workers, (job, step.key, "no worker ran it")
            assert all(step.queue in queue_of_worker.get(w, []) for w in step.workers), (
                job, step.key, step.workers, queue_of_worker)
            for uri in step.outputs:
                assert uri.split("/", 3)[3] in keys, (job, step.key, uri)
        if job == "retry_once":
            assert report.of_type("STEP_UP_FOR_RETRY") and report.of_type("STEP_SUCCESS")
        if job == "fan_out":
            assert {s.queue for s in report.steps.values()} == set(stack.queues)
    # Compute logs (what steps printed) are in S3 too, where the webserver reads them.
    logs = {key for key in keys if key.startswith("compute-logs/")}
    assert any(run_id in key for key in logs for run_id in runs), sorted(keys)[:20]


def test_scaling_one_queue_starts_workers_and_recreates_nothing(stack: Stack) -> None:
    only_in_stack_s3(stack)
    queue = stack.queues[-1]
    before = ids_by_service(stack)
    started = time.monotonic()
    stack.compose("up", "-d", "--wait", "--wait-timeout", "300", "--scale",
                  f"worker-{queue}=3", timeout=400)
    note(f"{stack.backend}: --scale worker-{queue}=3 healthy in "
         f"{time.monotonic() - started:.0f} s")
    after = ids_by_service(stack)
    assert len(after[f"worker-{queue}"]) == 3
    assert before[f"worker-{queue}"] < after[f"worker-{queue}"]
    for service, ids in before.items():
        if service != f"worker-{queue}":
            assert after[service] == ids, f"{service} was recreated"
    serving = [w for w in live_workers(stack) if queue in w["queues"]]
    assert len(serving) == 3, serving


def test_down_then_up_keeps_runs_schedules_and_objects(stack: Stack) -> None:
    only_in_stack_s3(stack)
    api = gql(stack)
    data = api("""{ schedulesOrError(repositorySelector: {repositoryLocationName: "%s",
        repositoryName: "__repository__"}) { ... on Schedules { results { name
        scheduleState { id status selectorId } } } } }""" % stack.package)  # noqa: UP031
    schedule = data["schedulesOrError"]["results"][0]
    started = api("""mutation($selector: ScheduleSelector!) { startSchedule(scheduleSelector:
        $selector) { __typename ... on ScheduleStateResult { scheduleState { status } } } }""",
                  {"selector": {"repositoryLocationName": stack.package,
                                "repositoryName": "__repository__",
                                "scheduleName": schedule["name"]}})
    assert started["startSchedule"]["scheduleState"]["status"] == "RUNNING"
    runs_before = {r["runId"] for r in api("{ runsOrError { ... on Runs { results { runId } } } }")
                   ["runsOrError"]["results"]}
    keys_before = bucket_keys(stack)

    stack.down()
    assert project_resources(stack.name)["containers"] == []
    started_at = time.monotonic()
    stack.compose(*UP, timeout=900)
    note(f"{stack.backend}: up again after down: healthy in {time.monotonic() - started_at:.0f} s")

    api = gql(stack)
    runs_after = {r["runId"] for r in api("{ runsOrError { ... on Runs { results { runId } } } }")
                  ["runsOrError"]["results"]}
    assert runs_before and runs_before <= runs_after
    assert keys_before <= bucket_keys(stack)
    data = api("""{ schedulesOrError(repositorySelector: {repositoryLocationName: "%s",
        repositoryName: "__repository__"}) { ... on Schedules { results { name
        scheduleState { status } } } } }""" % stack.package)  # noqa: UP031
    states = {s["name"]: s["scheduleState"]["status"]
              for s in data["schedulesOrError"]["results"]}
    assert states[schedule["name"]] == "RUNNING"


def test_a_broken_code_location_is_unhealthy(stack: Stack) -> None:
    only_in_stack_s3(stack)
    definitions = stack.project / "src" / stack.package / "definitions.py"
    original = definitions.read_text()
    definitions.write_text(original + "\nraise RuntimeError('definitions are broken')\n")
    try:
        started = time.monotonic()
        result = stack.compose("up", "-d", "--build", "--wait", "--wait-timeout", "150",
                               "code-server", check=False, timeout=600)
        assert result.returncode != 0, "up --wait succeeded with a broken code location"
        note(f"{stack.backend}: broken definitions: up --wait failed after "
             f"{time.monotonic() - started:.0f} s")
        code_server = services_of(stack.containers())["code-server"][0]
        assert code_server["Health"] == "unhealthy", code_server
        health = docker("inspect", "--format", "{{json .State.Health.Log}}", code_server["ID"])
        assert "definitions are broken" in health.stdout, health.stdout[-2000:]
    finally:
        definitions.write_text(original)


def test_down_v_removes_everything(stack: Stack) -> None:
    stack.compose("down", "-v", "--timeout", "30", "--remove-orphans", timeout=300)
    left = project_resources(stack.name)
    assert left == {"containers": [], "volumes": [], "networks": []}, left
