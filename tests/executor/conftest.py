"""Fixtures for executor tests: real ``dagster-taskiq`` worker processes and job runners."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableJob

from tests.conftest import wait_for

HERE = Path(__file__).resolve().parent
REPO_FILE = str(HERE / "repo.py")
CLI = str(Path(sys.executable).parent / "dagster-taskiq")


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the worker and the steps it runs (its whole session)."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(5)


def worker_env(broker_url: str, pythonpath: Sequence[str] = ()) -> dict[str, str]:
    pythonpath = os.pathsep.join(
        p for p in (*pythonpath, str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "DAGSTER_TASKIQ_BROKER_URL": broker_url, "PYTHONPATH": pythonpath}


@pytest.fixture
def start_worker(broker_url: str, dagster_home: Path, tmp_path: Path) -> Iterator[Any]:
    """Start ``dagster-taskiq worker start`` processes; each is stopped at the end of the test."""
    started: list[WorkerProcess] = []

    def _start(
        queues: Sequence[str] = ("dagster",),
        concurrency: int = 1,
        name: str | None = None,
        args: Sequence[str] = (),
        broker: str | None = None,
        pythonpath: Sequence[str] = (),
    ) -> WorkerProcess:
        name = name or f"worker{len(started)}"
        log = tmp_path / f"{name}.log"
        cmd = [CLI, "worker", "start", "-n", name, "-c", str(concurrency), *args]
        for queue in queues:
            cmd += ["-q", queue]
        with open(log, "wb") as out:
            process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT,
                env=worker_env(broker or broker_url, pythonpath), start_new_session=True,
            )
        worker = WorkerProcess(name, process, log)
        started.append(worker)

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"worker {name} exited:\n{worker.output()}")
            return "Listening started" in worker.output()

        wait_for(ready, 60, f"worker {name}")
        return worker

    yield _start
    for worker in started:
        worker.stop()


def run_config(io_dir: str, broker_url: str | None = None, **executor: Any) -> dict[str, Any]:
    config: dict[str, Any] = dict(executor)
    if broker_url is not None:
        config["broker"] = broker_url
    return {
        "resources": {"io_manager": {"config": {"base_dir": io_dir}}},
        "execution": {"config": config},
    }


def eager_config(io_dir: str) -> dict[str, Any]:
    return run_config(io_dir, config_source={"task_always_eager": True})


@contextmanager
def execute_test_job(
    job_name: str,
    instance: DagsterInstance,
    config: dict[str, Any],
    tags: dict[str, str] | None = None,
    subset: Sequence[str] | None = None,
    raise_on_error: bool = False,
):
    recon_job = ReconstructableJob.for_file(REPO_FILE, job_name)
    if subset:
        recon_job = recon_job.get_subset(op_selection=subset)
    with execute_job(
        recon_job, instance=instance, run_config=config, tags=tags, raise_on_error=raise_on_error
    ) as result:
        yield result


def events_of_type(result, event_type: str) -> list:
    return [e for e in result.all_events if e.event_type_value == event_type]
