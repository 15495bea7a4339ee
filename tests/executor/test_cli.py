"""The ``dagster-taskiq`` command against a real redis-server and real worker processes
(ported from dagster-celery's test_cli, plus what its CLI could not do: status, exit codes,
--wait, masked passwords)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from dagster_taskiq.cli import main
from dagster_taskiq.client import TaskiqClient
from dagster_taskiq.config import BROKER_URL_ENV, CELERY_CONFIG_SOURCE_KEYS, BrokerSettings
from tests.conftest import RedisServer, free_port, start_redis, wait_for
from tests.executor.conftest import CLI, execute_test_job, run_config, worker_env

STARTED = re.compile(r"Worker (\S+) started in the background: pid (\d+), log (.+)$", re.M)
PASSWORD = "cli-S3cret-pw"


def cli(*args: str, broker_url: str | None = None) -> Result:
    """Run the command in-process (click's runner); stdout and stderr are kept apart."""
    env = {BROKER_URL_ENV: broker_url} if broker_url else None
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def run(*args: str, broker_url: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed ``dagster-taskiq`` in its own process (exit codes as a shell sees)."""
    return subprocess.run([CLI, *args], env=worker_env(broker_url), capture_output=True,
                          text=True, timeout=timeout)


def pid_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (detached workers are not our children)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.fixture
def detached() -> Iterator[list[int]]:
    """Pids of background workers a test started; any still alive at the end are killed."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Foreground worker processes a test started; killed at the end if still running."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def started(output: str, detached: list[int]) -> tuple[str, int, Path]:
    match = STARTED.search(output)
    assert match, output
    pid = int(match.group(2))
    detached.append(pid)
    return match.group(1), pid, Path(match.group(3))


def listed(broker_url: str, *args: str) -> dict[str, dict[str, Any]]:
    result = cli("worker", "list", "--json", *args, broker_url=broker_url)
    return {w["name"]: w for w in json.loads(result.stdout)}


def test_help() -> None:
    result = cli("--help")
    assert result.exit_code == 0
    assert "worker" in result.output and "status" in result.output
    result = cli("worker", "--help")
    assert result.exit_code == 0
    for command in ("start", "list", "terminate"):
        assert re.search(rf"^\s+{command}\s", result.output, re.M), result.output
    assert "Start a dagster taskiq worker" in result.output
    assert "--name NAME" in cli("worker", "list", "--help").output  # the healthcheck form
    assert "--shutdown-timeout" in cli("worker", "start", "--help").output


def test_start_background_list_terminate(broker_url: str, dagster_home: Path, tmp_path: Path,
                                         detached: list[int]) -> None:
    log = tmp_path / "w.log"
    result = cli("worker", "start", "-d", "-n", "cli_w1", "-q", "alpha", "-c", "2",
                 "--shutdown-timeout", "5", "--logfile", str(log), broker_url=broker_url)
    assert result.exit_code == 0, result.output
    name, pid, logfile = started(result.stdout, detached)
    assert (name, logfile) == ("cli_w1", log)
    # It was started from this process, so this process can collect its exit status.
    status: list[int] = []
    waiter = threading.Thread(target=lambda: status.append(os.waitpid(pid, 0)[1]))
    waiter.start()

    result = cli("worker", "list", broker_url=broker_url)
    assert result.exit_code == 0
    header, *lines = result.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "HOST", "PID"]
    assert len(lines) == 1 and lines[0].split()[0] == "cli_w1"
    assert lines[0].split()[2:6] == [str(pid), "alpha", "2", "0"]
    assert cli("worker", "list", "--name", "cli_w1", broker_url=broker_url).exit_code == 0
    assert cli("worker", "list", "--name", "other", broker_url=broker_url).exit_code == 1
    info = listed(broker_url)["cli_w1"]
    assert (info["pid"], info["queues"], info["concurrency"], info["running"]) == \
        (pid, ["alpha"], 2, 0)
    assert info["heartbeat_age"] < 5 and not info["stop_requested"]

    result = cli("worker", "terminate", "cli_w1", "--wait", "30", broker_url=broker_url)
    assert result.exit_code == 0, result.output
    assert "Asked cli_w1" in result.stdout and "Stopped: 1 worker(s)." in result.stdout
    assert cli("worker", "list", broker_url=broker_url).exit_code == 1
    waiter.join(30)
    assert status and os.waitstatus_to_exitcode(status[0]) == 0
    assert "Worker cli_w1 stopped." in log.read_text()


def test_terminate_all(start_worker: Any, broker_url: str) -> None:
    workers = [start_worker(name="cli_a"), start_worker(name="cli_b", queues=("x", "y"))]
    wait_for(lambda: set(listed(broker_url)) == {"cli_a", "cli_b"}, 10, "both registered")
    result = cli("worker", "terminate", "--all", "--wait", "30", broker_url=broker_url)
    assert result.exit_code == 0, result.output
    assert "Stopped: 2 worker(s)." in result.stdout
    for worker in workers:
        assert worker.process.wait(10) == 0, worker.output()
        assert "Asked to stop (worker terminate)." in worker.output()
    assert listed(broker_url) == {}


def test_exit_codes_without_workers(broker_url: str) -> None:
    result = cli("worker", "list", broker_url=broker_url)
    assert result.exit_code == 1 and "No live workers" in result.stderr
    assert cli("worker", "list", "--json", broker_url=broker_url).stdout.strip() == "[]"
    result = cli("worker", "terminate", "nobody", broker_url=broker_url)
    assert result.exit_code == 1 and "No live worker named nobody" in result.stderr
    assert cli("worker", "terminate", "--all", broker_url=broker_url).exit_code == 1
    # Usage errors are click's exit code 2.
    assert cli("worker", "terminate", broker_url=broker_url).exit_code == 2
    assert cli("worker", "terminate", "x", "--all", broker_url=broker_url).exit_code == 2
    assert cli("worker", "start", "--logfile", "x.log", broker_url=broker_url).exit_code == 2
    result = cli("status", broker_url=broker_url)
    assert result.exit_code == 0 and "No queues" in result.stdout


def send(client: TaskiqClient, task: str, queue: str, priority: int) -> None:
    # Dummy arguments: no worker listens on these queues, so nothing will run them.
    client.send(task, ["dummy"], labels={"queue_name": queue, "priority": priority})


def test_status_shows_waiting_tasks_by_priority(broker_url: str) -> None:
    client = TaskiqClient(BrokerSettings.from_config(broker_url))
    client.start()
    try:
        for priority in (10, 5, 5, -2):
            send(client, "execute_plan", "alpha", priority)
        send(client, "execute_job", "alpha", 3)
        send(client, "execute_plan", "beta", 0)
    finally:
        client.close()

    report = json.loads(cli("status", "--json", broker_url=broker_url).stdout)
    queues = {q["queue"]: q for q in report["queues"]}
    assert set(queues) == {"alpha", "beta"}
    assert queues["alpha"]["waiting"]["steps"] == \
        {"total": 4, "by_priority": {"10": 1, "5": 2, "-2": 1}}
    assert queues["alpha"]["waiting"]["runs"] == {"total": 1, "by_priority": {"3": 1}}
    assert queues["alpha"]["in_flight"] == {"steps": 0, "runs": 0}
    assert queues["beta"]["waiting"]["steps"]["total"] == 1
    assert queues["alpha"]["workers"] == [] and report["workers"] == 0

    result = cli("status", broker_url=broker_url)
    assert result.exit_code == 0
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert rows["QUEUE"].split()[:3] == ["QUEUE", "STEPS", "WAITING"]
    assert "4 [p10:1 p5:2 p-2:1]" in rows["alpha"] and "1 [p3:1]" in rows["alpha"]
    assert "no live worker" in rows["beta"]


def test_status_and_list_while_a_worker_runs_a_step(start_worker: Any, broker_url: str,
                                                    instance: Any, io_dir: str) -> None:
    start_worker(name="cli_busy", queues=("dagster", "spare"))
    wait_for(lambda: "cli_busy" in listed(broker_url), 10, "the worker to register")
    config = run_config(io_dir, broker_url)
    config["ops"] = {f"low_{i}": {"config": {"seconds": 1.0}} for i in range(3)}
    outcome: list[bool] = []

    def execute() -> None:
        with execute_test_job("low_job", instance, config, subset=["low_0", "low_1", "low_2"]) \
                as result:
            outcome.append(result.success)

    job = threading.Thread(target=execute)
    job.start()
    try:
        def busy() -> dict[str, Any] | None:
            report = json.loads(cli("status", "--json", broker_url=broker_url).stdout)
            queue = {q["queue"]: q for q in report["queues"]}.get("dagster")
            # Concurrency 1: one step runs while the others wait.
            return queue if queue and queue["in_flight"]["steps"] == 1 \
                and queue["waiting"]["steps"]["total"] else None

        queue = wait_for(busy, 30, "a step in flight and others waiting", interval=0.1)
        assert [w["name"] for w in queue["workers"]] == ["cli_busy"]
        assert queue["workers"][0]["heartbeat_age"] < 5
        assert set(queue["waiting"]["steps"]["by_priority"]) == {"5"}
        rows = cli("status", broker_url=broker_url).stdout
        assert re.search(r"^dagster\s.*\s1\s+cli_busy \(\d+\.\ds ago\)$", rows, re.M), rows
        assert re.search(r"^spare\s+0\s+0\s+0\s+cli_busy", rows, re.M), rows
        running = wait_for(lambda: listed(broker_url)["cli_busy"]["tasks"], 10, "task listed")
        assert running[0]["what"] and running[0]["pid"]
    finally:
        job.join(60)
    assert outcome == [True]


def yaml_file(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_worker_config_yaml_shapes_and_five_queues(broker_url: str, dagster_home: Path,
                                                   tmp_path: Path, workers: list[Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each YAML shape starts a worker on the right broker (all at once, to keep it fast)."""
    monkeypatch.setenv("CLI_TEST_BROKER", broker_url)
    yamls = {
        "empty": yaml_file(tmp_path / "empty.yaml", ""),
        # partial and full: also dagster-celery's own (newer) worker YAML layout, read as it is.
        "partial": yaml_file(tmp_path / "partial.yaml",
                             "execution:\n  config:\n    broker: null\n    backend: null\n"
                             "    config_source: null\n"),
        "full": yaml_file(tmp_path / "full.yaml", f"""
execution:
  config:
    broker: {broker_url}
    backend: {broker_url}
    include: [json]
    default_queue: dagster
    config_source: {{key_prefix: cli-full, connect_timeout: 3}}
"""),
        "legacy": yaml_file(tmp_path / "legacy.yaml",
                            f"execution:\n  taskiq:\n    config:\n      broker: {broker_url}\n"),
        "env": yaml_file(tmp_path / "env.yaml",
                         "execution:\n  config:\n    broker: {env: CLI_TEST_BROKER}\n"),
    }
    five = ["-q", "q1", "-q", "q2", "-q", "q3", "-q", "q4", "-q", "q5"]
    # Only the empty and partial YAMLs may take the broker from the environment: the others
    # get a dead one there, so a worker that ignored its YAML would fail to start. Foreground
    # workers, all at once (`-d` is covered above; this is about the YAML).
    dead_env = {**worker_env(broker_url), BROKER_URL_ENV: "redis://127.0.0.1:1/0"}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    for shape, path in yamls.items():
        env = worker_env(broker_url) if shape in ("empty", "partial") else dead_env
        with open(tmp_path / f"{shape}.log", "wb") as log:
            processes[shape] = subprocess.Popen(
                [CLI, "worker", "start", "-n", f"cfg_{shape}", "-y", path,
                 *(five if shape == "env" else [])],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    workers.extend(processes.values())

    def registered() -> bool:
        for shape, process in processes.items():
            assert process.poll() is None, (tmp_path / f"{shape}.log").read_text()
        names = set(listed(broker_url)) | set(listed(broker_url, "-y", yamls["full"]))
        return len(names) == 5

    wait_for(registered, 60, "five workers to register", interval=0.2)
    default_prefix = listed(broker_url)
    assert set(default_prefix) == {"cfg_empty", "cfg_partial", "cfg_legacy", "cfg_env"}
    assert default_prefix["cfg_env"]["queues"] == ["q1", "q2", "q3", "q4", "q5"]
    report = json.loads(cli("status", "--json", broker_url=broker_url).stdout)
    served = {q["queue"]: [w["name"] for w in q["workers"]] for q in report["queues"]}
    assert all(served[f"q{i}"] == ["cfg_env"] for i in range(1, 6))
    # The full YAML's key_prefix puts its worker out of sight unless the CLI reads it too.
    full = cli("worker", "list", "-y", yamls["full"], broker_url="redis://127.0.0.1:1/0")
    assert full.exit_code == 0 and full.stdout.splitlines()[1].startswith("cfg_full ")

    result = cli("worker", "terminate", "--all", "--wait", "30", broker_url=broker_url)
    assert result.exit_code == 0 and "Stopped: 4 worker(s)." in result.stdout, result.output
    result = cli("worker", "terminate", "cfg_full", "-y", yamls["full"], "--wait", "30")
    assert result.exit_code == 0, result.output
    for shape, process in processes.items():
        code = process.wait(10)  # it leaves the registry first, then stops its zygote
        log = (tmp_path / f"{shape}.log").read_text()
        assert code == 0, log
        assert f"Worker cfg_{shape} stopped." in log and "Traceback" not in log, log


@pytest.mark.parametrize(("text", "expected"), [
    ("execution: [oops\n", "Cannot read"),
    ("execution:\n  config:\n    config_source: {bogus_key: 1}\n", "bogus_key"),
    ("execution:\n  config:\n    brokr: redis://localhost\n", "brokr"),
])
@pytest.mark.parametrize("command", [["worker", "start", "-d"], ["worker", "list"], ["status"]])
def test_bad_config_yaml_is_a_clear_error(tmp_path: Path, text: str, expected: str,
                                          command: list[str]) -> None:
    result = cli(*command, "-y", yaml_file(tmp_path / "bad.yaml", text))
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and "Traceback" not in result.output


@pytest.fixture
def listener() -> Iterator[tuple[str, socket.socket]]:
    """A TCP port that takes connections but never answers: the broker in a YAML that must be
    refused before any connection (anything that connects lands in the backlog)."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as server:
        server.setblocking(False)
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0", server


def assert_never_connected(server: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        server.accept()[0].close()


MIGRATION_COMMANDS = [["worker", "start", "-n", "never"], ["worker", "start", "-d"],
                      ["worker", "list"], ["worker", "terminate", "--all"], ["status"]]


def test_dagster_celery_legacy_yaml_exits_2_without_connecting(
        tmp_path: Path, listener: tuple[str, socket.socket]) -> None:
    url, server = listener
    # dagster-celery's worker YAML as its Helm chart writes it; the environment names the
    # same silent port, so a command that ignored the file and fell back would connect too.
    legacy = yaml_file(tmp_path / "celery.yaml", f"""
execution:
  celery:
    broker: {url}
    backend: {url}
    config_source:
      worker_prefetch_multiplier: 1
""")
    expected = ("this is dagster-celery's legacy layout (execution: celery: {broker, backend, "
                "config_source}). dagster-taskiq reads execution: config: ...; write execution: "
                "config: {broker, backend, config_source} with the same keys")
    shell = run("worker", "start", "-n", "never", "-y", legacy, broker_url=url, timeout=30)
    assert shell.returncode == 2, shell.stdout + shell.stderr
    assert expected in shell.stderr and shell.stdout == "" and "Traceback" not in shell.stderr
    assert len(shell.stderr.strip().splitlines()) == 1, shell.stderr
    for command in MIGRATION_COMMANDS:
        result = cli(*command, "-y", legacy, broker_url=url)
        assert result.exit_code == 2, (command, result.output)
        assert expected in result.stderr, (command, result.output)
    assert_never_connected(server)


def test_celery_config_source_key_is_explained_by_every_command(
        tmp_path: Path, listener: tuple[str, socket.socket]) -> None:
    """dagster-celery's newer layout is read as it is; its Celery-only settings are named,
    each with what to do instead, and nothing connects."""
    url, server = listener
    newer = yaml_file(tmp_path / "newer.yaml", f"""
execution:
  config:
    broker: {url}
    config_source:
      task_default_queue: short
      result_expires: 3600
""")
    shell = run("worker", "start", "-y", newer, broker_url=url, timeout=30)
    assert shell.returncode == 2, shell.stdout + shell.stderr
    for command in MIGRATION_COMMANDS:
        result = cli(*command, "-y", newer, broker_url=url)
        assert result.exit_code == 2, (command, result.output)
        for text in (shell.stderr, result.stderr):
            for key in ("task_default_queue", "result_expires"):
                assert f"  {key}: {CELERY_CONFIG_SOURCE_KEYS[key]}" in text, text
            assert "Traceback" not in text and "Unknown config_source key" not in text
    assert_never_connected(server)


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("secure-redis"), password=PASSWORD)
    yield server
    server.process.terminate()
    server.process.wait(10)


def test_password_url_end_to_end_and_never_shown(secure_redis: RedisServer, dagster_home: Path,
                                                 tmp_path: Path, detached: list[int]) -> None:
    url = secure_redis.url()
    secure_redis.client().flushall()
    log = tmp_path / "secure.log"
    # From a shell, as a user would; the rest in-process (faster, same output).
    shell = run("worker", "start", "-d", "-n", "cli_secure", "--logfile", str(log),
                broker_url=url)
    outputs = [shell.stdout + shell.stderr]
    assert shell.returncode == 0, outputs[0]
    started(shell.stdout, detached)

    def check(*args: str, code: int = 0, broker_url: str = url) -> str:
        result = cli(*args, broker_url=broker_url)
        outputs.append(result.output)
        assert result.exit_code == code, result.output
        return result.stdout

    assert check("worker", "list").splitlines()[1].startswith("cli_secure ")
    client = TaskiqClient(BrokerSettings.from_config(url))
    client.start()
    try:
        send(client, "execute_plan", "locked", 7)
    finally:
        client.close()
    status = check("status")
    assert "redis://:***@127.0.0.1" in status and "1 [p7:1]" in status
    assert "redis://:***@127.0.0.1" in check("status", "--json")
    check("worker", "terminate", "cli_secure", "--wait", "30")
    # A wrong password is a broker error, shown masked too.
    wrong = url.replace(PASSWORD, "not-the-password")
    check("worker", "list", code=3, broker_url=wrong)
    assert "redis://:***@" in outputs[-1]

    text = "\n".join([*outputs, log.read_text()])
    assert "Worker cli_secure stopped." in text
    assert PASSWORD not in text and "not-the-password" not in text


def test_unreachable_broker_exits_3_quickly_with_masked_url(tmp_path: Path) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"  # nothing listens there
    masked = f"redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}"
    fast = yaml_file(tmp_path / "fast.yaml",
                     "execution:\n  config:\n    config_source: {connect_timeout: 0.5}\n")
    began = time.monotonic()
    # Real processes (exit codes as a shell sees them) with the default connect timeout (5 s),
    # meanwhile the other commands in-process with a short one.
    commands = [["worker", "list"], ["worker", "start", "-n", "never"]]
    processes = [subprocess.Popen([CLI, *command], env=worker_env(url), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for command in commands]
    for command in (["status"], ["worker", "terminate", "--all"],
                    ["worker", "start", "-d", "-n", "never"], ["worker", "list", "--json"]):
        result = cli(*command, "-y", fast, broker_url=url)
        assert result.exit_code == 3, (command, result.output)
        assert result.stdout == "" and masked in result.stderr, (command, result.output)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert PASSWORD not in result.output
    for command, process in zip(commands, processes, strict=True):
        stdout, stderr = process.communicate(timeout=30)
        assert process.returncode == 3, (command, stdout, stderr)
        assert masked in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert PASSWORD not in stdout + stderr
    # Well inside the 5-minute outage patience of a run (only load makes it take longer).
    assert time.monotonic() - began < 45
