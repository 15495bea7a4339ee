"""Helpers the benchmarks share: a throwaway Dagster home (sqlite, or a fresh PostgreSQL
database dropped afterwards), the environment workers and orchestrators run in,
``dagster-taskiq worker start`` processes started and stopped by pid, the resident memory of a
process and its descendants, and the CPU probe every report carries.

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
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CLI = str(Path(sys.executable).parent / "dagster-taskiq")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import wait_for  # noqa: E402


def make_dagster_home(work: Path, extra_yaml: str = "", name: str = "dagster_home") -> Path:
    """A fresh ``DAGSTER_HOME`` ``work/name`` (sqlite storage unless ``extra_yaml`` says
    otherwise, no telemetry), set in ``os.environ`` for this process and the ones it starts."""
    home = work / name
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n" + extra_yaml)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


NOOP_COMPUTE_LOGS_YAML = ("compute_logs:\n  module: dagster._core.storage.noop_compute_log_manager"
                          "\n  class: NoOpComputeLogManager\n")


@contextlib.contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A new, empty database on the server of ``admin_url`` (a libpq URL of a database to
    connect to for ``CREATE DATABASE``); yields its SQLAlchemy URL for dagster-postgres and
    drops it afterwards (``WITH (FORCE)``: a connection left behind does not keep it)."""
    import psycopg2

    name = f"dagster_taskiq_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        parts = urlsplit(admin_url)
        # psycopg2 (dagster-postgres installs it): SQLAlchemy 2.1 takes postgresql:// as psycopg 3.
        yield urlunsplit(("postgresql+psycopg2", parts.netloc, f"/{name}", parts.query, ""))
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def postgres_storage_yaml(url: str) -> str:
    """The ``storage:`` block of a dagster.yaml for runs, events and schedules in ``url``."""
    return f"storage:\n  postgres:\n    postgres_url: \"{url}\"\n"


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


def cpu_probe_ms() -> float:
    """Milliseconds for a fixed pure-Python loop (best of 3): this VM's speed drifts by tens of
    percent over minutes, so every report says how fast the machine was while it ran."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for i in range(2_000_000):
            total += i
        best = min(best, (time.perf_counter() - started) * 1000)
    return round(best, 1)


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0  # a zombie has no memory lines


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of ``pid`` (user + system), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return ((int(fields[11]) + int(fields[12])) / tick,
            (int(fields[13]) + int(fields[14])) / tick)


def tree_cpu(pid: int) -> dict:
    """CPU seconds of a worker's tree: ``worker`` (the process itself), ``zygotes`` (the live
    zygotes' own) and ``tasks`` (every task they forked, live or reaped)."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    own, reaped = _cpu_seconds(pid)
    zygotes = tasks = 0.0
    for zygote in children.get(pid, []):  # a worker's children are its zygotes
        try:
            mine, theirs = _cpu_seconds(zygote)
        except (OSError, IndexError):
            continue  # it exited meanwhile
        zygotes += mine
        tasks += theirs + sum(sum(_cpu_seconds(task)) for task in children.get(zygote, [])
                              if os.path.exists(f"/proc/{task}"))
    # A replaced zygote, reaped by the worker, counts with the tasks.
    return {"worker": own, "zygotes": zygotes, "tasks": tasks + reaped}


def tree_rss(pid: int) -> dict:
    """``VmRSS`` (and ``RssAnon``) from ``/proc/<pid>/status`` of ``pid`` and every live
    descendant, in kB: ``{"total_kb", "anon_kb", "processes": [{pid, ppid, name, rss_kb,
    anon_kb}]}``. Pages shared between them are counted in each (as RSS always is)."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    processes, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/comm") as comm:
                name = comm.read().strip()
            rss, anon = _status_kb(current, "VmRSS"), _status_kb(current, "RssAnon")
        except OSError:
            continue  # it exited meanwhile
        processes.append({"pid": current, "ppid": parents.get(current), "name": name,
                          "rss_kb": rss, "anon_kb": anon})
        todo.extend(children.get(current, []))
    return {"total_kb": sum(p["rss_kb"] for p in processes),
            "anon_kb": sum(p["anon_kb"] for p in processes), "processes": processes}
