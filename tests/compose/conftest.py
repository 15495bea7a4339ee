"""The real compose stack: a Docker engine, the Compose v2 binary, and the images it pins.

Containers run on these machines (Debian's docker.io engine; ``.ci/run`` installs and starts it).
Where no engine answers, the tests skip saying why, unless ``DAGSTER_TASKIQ_REQUIRE_DOCKER=1``
(set by ``.ci/run``), which turns the skip into a failure so CI can never go green without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.template.conftest import compose_binary, project_env

REQUIRE_ENV = "DAGSTER_TASKIQ_REQUIRE_DOCKER"
# What the stacks did and how long it took: printed at the end of the run (CI's output too).
NOTES: list[str] = []


def note(message: str) -> None:
    NOTES.append(message)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if NOTES:
        terminalreporter.section("compose stack")
        for line in NOTES:
            terminalreporter.write_line(line)


def _engine_problem() -> str | None:
    docker = shutil.which("docker")
    if not docker:
        return "no docker client on PATH (install Debian's docker.io and start dockerd)"
    try:
        info = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if info.returncode != 0:
        return f"no Docker engine answers: {info.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """The docker client's path, once an engine answers; skip (or fail in CI) otherwise."""
    problem = _engine_problem()
    if problem:
        message = f"containers cannot run here: {problem}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message} ({REQUIRE_ENV}=1)")
        pytest.skip(message)
    return str(shutil.which("docker"))


@dataclass
class Stack:
    """A rendered project and its compose stack, driven with the Compose v2 binary."""

    project: Path
    name: str  # compose project name
    backend: str  # the s3_backend answer
    package: str  # the package_name answer: also the code location's name
    queues: list[str]  # every queue, "dagster" first
    log: list[str] = field(default_factory=list)

    def compose(self, *args: str, timeout: float = 300, check: bool = True,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        result = subprocess.run([compose_binary(), "-p", self.name, *args], cwd=self.project,
                                env=project_env(env), capture_output=True, text=True,
                                timeout=timeout)
        self.log.append(f"compose {' '.join(args)}: exit {result.returncode} in "
                        f"{time.monotonic() - started:.1f} s")
        if check and result.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} failed "
                                 f"(exit {result.returncode}):\n{result.stdout[-4000:]}\n"
                                 f"{result.stderr[-6000:]}\n{self.diagnostics()}")
        return result

    def containers(self, *, all_states: bool = True) -> list[dict[str, Any]]:
        args = ["ps", "--format", "json", *(["-a"] if all_states else [])]
        out = self.compose(*args, timeout=60).stdout.strip()
        if not out:
            return []
        # Compose prints one JSON object per line (older versions: one array).
        if out.startswith("["):
            return list(json.loads(out))
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def exec(self, service: str, *command: str, timeout: float = 120) -> str:
        return self.compose("exec", "-T", service, "with-secrets", *command,
                            timeout=timeout).stdout

    def diagnostics(self) -> str:
        """States and the last log lines of every container, for failure messages."""
        try:
            ps = subprocess.run([compose_binary(), "-p", self.name, "ps", "-a"],
                                cwd=self.project, env=project_env(), capture_output=True,
                                text=True, timeout=60).stdout
            logs = subprocess.run([compose_binary(), "-p", self.name, "logs", "--tail", "30",
                                   "--no-color"], cwd=self.project, env=project_env(),
                                  capture_output=True, text=True, timeout=60).stdout
        except subprocess.TimeoutExpired:
            return "(diagnostics timed out)"
        return f"--- ps ---\n{ps}\n--- logs ---\n{logs[-12000:]}"

    def down(self, *extra: str) -> None:
        self.compose("down", "--timeout", "30", "--remove-orphans", *extra, timeout=300)


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def project_resources(name: str) -> dict[str, list[str]]:
    """Everything the engine holds that belongs to compose project ``name``."""
    label = f"label=com.docker.compose.project={name}"
    found = {}
    for kind, args in {
        "containers": ["ps", "-a", "-q", "--filter", label],
        "volumes": ["volume", "ls", "-q", "--filter", label],
        "networks": ["network", "ls", "-q", "--filter", label],
    }.items():
        result = docker(*args)
        assert result.returncode == 0, result.stderr
        found[kind] = result.stdout.split()
    return found


def set_env(project: Path, values: dict[str, str]) -> None:
    """Set variables in the project's .env (replacing existing lines)."""
    path = project / ".env"
    lines = [line for line in path.read_text().splitlines()
             if line.split("=", 1)[0] not in values]
    lines += [f"{key}={value}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def standin_images(docker_engine: str) -> Iterator[dict[str, str]]:
    """Every third-party image the stacks pin, pulled or built as a local stand-in."""
    from tests.compose.standins import ensure_images

    started = time.monotonic()
    images = ensure_images("3.12", log=lambda line: None)
    note(f"images in {time.monotonic() - started:.0f} s: "
         + ", ".join(f"{name} {how}" for name, how in images.items()))
    yield images


def services_of(containers: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_service: dict[str, list[dict[str, Any]]] = {}
    for container in containers:
        by_service.setdefault(container["Service"], []).append(container)
    return by_service
