"""Run example jobs on real taskiq workers over a private Redis and print what ran where.

Used by ``./quickstart.sh``. Everything it starts (redis-server, workers) lives in a temporary
directory and is stopped at the end; the exit code is 0 only if every job succeeded.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPO_FILE = ROOT / "tests" / "executor" / "repo.py"
JOBS = ["test_diamond_job", "simple_priority_job", "multiqueue_job", "test_parallel_job"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="dagster-taskiq-demo-"))
    home = work / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    env = {**os.environ, "DAGSTER_HOME": str(home), "DAGSTER_TASKIQ_BROKER_URL": broker,
           "PYTHONPATH": str(REPO_FILE.parent)}
    os.environ.update(env)
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(work)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        cli = shutil.which("dagster-taskiq") or str(Path(sys.executable).parent / "dagster-taskiq")
        logs = []
        for name, queue in (("worker-default", "dagster"), ("worker-foo", "fooqueue")):
            log = work / f"{name}.log"
            logs.append(log)
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(
                    [cli, "worker", "start", "-n", name, "-q", queue, "-c", "2"],
                    stdout=out, stderr=subprocess.STDOUT, env=env))
        for log in logs:
            wait_for(lambda log=log: "Listening started" in log.read_text(), 60, str(log))
        print(f"redis: {broker}\nworkers: worker-default (queue dagster), "
              f"worker-foo (queue fooqueue)\n")
        return run_jobs(work)
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def run_jobs(work: Path) -> int:
    from dagster import DagsterEventType, DagsterInstance, execute_job
    from dagster._core.definitions.reconstruct import ReconstructableJob

    failures = 0
    rows = [("job", "step", "queue", "worker", "seconds")]
    with DagsterInstance.get() as instance:
        for name in JOBS:
            config = {
                "loggers": {"console": {"config": {"log_level": "ERROR"}}},
                "resources": {"io_manager": {"config": {"base_dir": str(work / "io")}}},
            }
            recon = ReconstructableJob.for_file(str(REPO_FILE), name)
            started = time.monotonic()
            with execute_job(recon, instance=instance, run_config=config) as result:
                ok = result.success
                run_id = result.run_id
            print(f"{name}: {'SUCCESS' if ok else 'FAILURE'} in {time.monotonic() - started:.2f} s")
            failures += not ok
            queue, worker, start = {}, {}, {}
            for record in instance.all_logs(run_id):
                event = record.dagster_event
                if event is None or record.step_key is None:
                    continue
                message = event.message or ""
                if message.startswith("Submitting taskiq task"):
                    queue[record.step_key] = message.rsplit('"', 2)[-2]
                elif "in taskiq worker" in message:
                    metadata = event.engine_event_data.metadata
                    worker[record.step_key] = metadata["taskiq worker"].value
                elif event.event_type == DagsterEventType.STEP_START:
                    start[record.step_key] = record.timestamp
                elif event.event_type == DagsterEventType.STEP_SUCCESS:
                    rows.append((name, record.step_key, queue.get(record.step_key, "?"),
                                 worker.get(record.step_key, "?"),
                                 f"{record.timestamp - start.get(record.step_key, 0):.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(f"\n{len(JOBS) - failures}/{len(JOBS)} jobs succeeded.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
