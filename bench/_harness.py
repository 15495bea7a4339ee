"""Helpers the fault benchmarks share: a throwaway Dagster home, the environment workers and
orchestrators run in, and ``dagster-taskiq worker start`` processes started and stopped by pid.

Every process is started in a session of its own (``start_new_session``), so its process group
id is its pid and a stop reaches whatever it started in that group (a ``faketime`` wrapper and
the worker under it). Step processes put themselves in groups of their own and die with their
worker (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CLI = str(Path(sys.executable).parent / "dagster-taskiq")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import wait_for  # noqa: E402


def make_dagster_home(work: Path) -> Path:
    """A fresh ``DAGSTER_HOME`` under ``work`` (sqlite storage, no telemetry), set in
    ``os.environ`` for this process and the ones it starts."""
    home = work / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def bench_env(broker_url: str, *pythonpath: Path) -> dict[str, str]:
    """This process's environment with the broker URL and ``pythonpath`` (then the repository)
    on ``PYTHONPATH``, for workers and orchestrators."""
    paths = [*(str(p) for p in pythonpath), str(ROOT)]
    return {**os.environ, "DAGSTER_TASKIQ_BROKER_URL": broker_url,
            "PYTHONPATH": os.pathsep.join(paths)}


def start_worker(name: str, env: dict[str, str], logs: Path, args: Sequence[str] = (),
                 prefix: Sequence[str] = (), wait: bool = True,
                 timeout: float = 60.0) -> subprocess.Popen:
    """``dagster-taskiq worker start -n NAME ARGS`` (after ``prefix``, e.g. a ``faketime``
    command line), output to ``logs/NAME.log``; with ``wait``, returns once it listens."""
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen([*prefix, CLI, "worker", "start", "-n", name, *args],
                                   stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    if wait:
        def listening() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"worker {name} exited ({process.returncode}): see {log}")
            return "Listening started" in log.read_text(errors="replace")

        try:
            wait_for(listening, timeout, f"worker {name}")
        except BaseException:
            stop(process, signal.SIGKILL)
            raise
    return process


def stop(process: subprocess.Popen, sig: signal.Signals = signal.SIGTERM,
         timeout: float = 20.0) -> None:
    """Send ``sig`` to ``process``'s group (continued first, in case it was stopped); SIGKILL
    the group if it has not exited after ``timeout`` seconds. Reaps the process."""
    if process.poll() is None:
        for each in (signal.SIGCONT, sig):
            try:
                os.killpg(process.pid, each)
            except ProcessLookupError:
                break
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    else:
        process.wait()
