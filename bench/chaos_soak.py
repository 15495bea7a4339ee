"""Chaos soak: N runs of a mixed job on real workers while a driver injects faults at random.

Runs ``chaos_job`` (bench/bench_jobs.py: a head, 4 parallel steps, a gather, a chain of 3; each
step sleeps a duration drawn per run, some longer than the lease) through the taskiq executor:
each run's orchestrator is ``execute_job`` in a subprocess of its own, against an on-disk sqlite
Dagster instance and a private ``redis-server`` (append-only file on), started here in a temp
dir. ``--workers`` ``dagster-taskiq worker start`` processes serve the queue, one of them under
``faketime -m --exclude-monotonic -f +1h`` (its wall clock an hour ahead) for the whole soak.
Meanwhile the driver injects, one at a time, with a random pause between them:

- ``sigkill``: SIGKILL a worker (one running a step, if any; its steps die with it) and start a
  replacement;
- ``sigstop``: SIGSTOP a worker's process for longer than the lease, then SIGCONT it (its step
  processes, in their own process groups, are not stopped: a hung worker process);
- ``redis_restart_aof``: stop redis-server (SIGTERM), start it again on its append-only file;
- ``redis_restart_noaof``: SIGKILL redis-server and start it empty (the data lost, as without
  persistence);
- ``readonly``: Redis answers READONLY for a few seconds (``REPLICAOF`` an unused port, then
  ``REPLICAOF NO ONE``).

Every execution of a step appends start, tick (every 0.25 s) and end lines, with its pid, its
worker's pid, monotonic time and a unique attempt id, to a record file (one O_APPEND write per
line). Afterwards the driver checks: every run ended within ``--run-timeout`` (else hung, and
killed); no two executions of one (run, step) overlap in time (an execution lasts from its start
to its last line); no step silently lost (a successful run with a step that has no
STEP_SUCCESS, or a failed run with neither a STEP_FAILURE nor an engine error naming a step);
and the recovery after each fault (worker faults: until the affected steps start again, or with
none affected, until the next step end; Redis faults: until the first step end after Redis is
back). Exit status 1 if any run hung, overlapped or was silently lost.

    uv run --frozen python bench/chaos_soak.py --runs 30 --workers 4 --seed 1 \\
        --out bench/results/<date>-chaos.json
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import BENCH, bench_env, make_dagster_home, start_worker, stop
from bench_jobs import TICK_SECONDS, chaos_step_keys

from tests.conftest import free_port, wait_for

JOB_FILE = str(BENCH / "bench_jobs.py")
KINDS = ("sigkill", "sigstop", "redis_restart_aof", "redis_restart_noaof", "readonly")
WORKER_KINDS = ("sigkill", "sigstop")
SOAK_TAG = "chaos-soak/id"
INDEX_TAG = "chaos-soak/run"
MARK_ENV = "CHAOS_SOAK_MARK"  # set in every process we start, to find leftovers by pid
FAKETIME = ("faketime", "-m", "--exclude-monotonic", "-f", "+1h")

ORCHESTRATOR = """\
import json, sys
from dagster import DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableJob
spec = json.loads(sys.argv[1])
with DagsterInstance.get() as instance, execute_job(
        ReconstructableJob.for_file(spec["file"], "chaos_job"), instance=instance,
        run_config=spec["config"], tags=spec["tags"]) as result:
    print(json.dumps({"run_id": result.run_id, "success": result.success}), flush=True)
"""


def now() -> float:
    return time.monotonic()


# --- processes ----------------------------------------------------------------------------


class RedisServer:
    """redis-server on a fixed port (so it can restart there), append-only file on."""

    def __init__(self, base: Path, env: dict[str, str]) -> None:
        self.base, self.env, self.port = base, env, free_port()
        self.generation = 0
        self.directory = self._new_directory()
        self.process: subprocess.Popen | None = None

    def _new_directory(self) -> Path:
        self.generation += 1
        directory = self.base / f"redis-{self.generation}"
        directory.mkdir()
        return directory

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self, fresh: bool = False) -> None:
        if fresh:
            self.directory = self._new_directory()
        with open(self.base / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "yes", "--dir", str(self.directory)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

        def answers() -> bool:
            import redis

            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: see {self.base / 'redis.log'}")
            try:
                return bool(self.client().ping())
            except redis.RedisError:
                return False

        wait_for(answers, 30, f"redis-server on port {self.port}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.process is not None:
            stop(self.process, sig, timeout=10)


@dataclass
class Worker:
    name: str
    process: subprocess.Popen
    skewed: bool
    log: Path
    pid: int = 0  # the worker's own process (under faketime, the wrapper's child)
    retired: bool = False

    def resolve_pid(self) -> int:
        if not self.pid:
            if not self.skewed:
                self.pid = self.process.pid
            else:
                children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
                found = children.read_text().split() if children.exists() else []
                self.pid = int(found[0]) if found else 0
        return self.pid


class Cluster:
    """The workers: ``count`` of them, the first under faketime; replacements for the lost."""

    def __init__(self, work: Path, env: dict[str, str], count: int, concurrency: int) -> None:
        self.work, self.env, self.count, self.concurrency = work, env, count, concurrency
        self.logs = work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.workers: list[Worker] = []
        self.exits: list[dict[str, Any]] = []
        self.zombies: list[dict[str, Any]] = []
        self._started = 0
        self._last_restart = 0.0

    def live(self) -> list[Worker]:
        return [w for w in self.workers if not w.retired]

    def start(self, skewed: bool, wait: bool) -> Worker:
        self._started += 1
        name = f"{'skewed' if skewed else 'w'}{self._started}"
        process = start_worker(name, self.env, self.logs,
                               ["-c", str(self.concurrency), "--shutdown-timeout", "2"],
                               prefix=FAKETIME if skewed else (), wait=wait)
        worker = Worker(name, process, skewed, self.logs / f"{name}.log")
        self.workers.append(worker)
        if wait:
            worker.resolve_pid()
        return worker

    def start_all(self) -> None:
        for i in range(self.count):
            self.start(skewed=i == 0, wait=True)

    def retire(self, worker: Worker, why: str) -> Worker:
        """``worker`` is gone (killed, or exited): start one like it, without waiting."""
        worker.retired = True
        self._last_restart = now()
        replacement = self.start(worker.skewed, wait=False)
        print(f"  {worker.name} {why}; replacement {replacement.name}", flush=True)
        return replacement

    def check(self) -> None:
        """Workers that exited on their own: record why, and replace them (at most one
        replacement every 2 s, so a worker that cannot start does not spin)."""
        for worker in self.live():
            worker.resolve_pid()
            code = worker.process.poll()
            if code is None and _stopped_consuming(worker.log):
                # Alive and registered, but its receivers are gone: it takes no task again. A
                # supervisor checking health would replace it; so do we, and count it.
                tail = worker.log.read_text(errors="replace").splitlines()[-12:]
                self.zombies.append({"worker": worker.name, "at": now(), "log_tail": tail})
                stop(worker.process, signal.SIGTERM, timeout=10)
                self.retire(worker, "stopped consuming (receiver died) while alive")
                continue
            if code is None or now() - self._last_restart < 2.0:
                continue
            tail = worker.log.read_text(errors="replace").splitlines()[-8:]
            self.exits.append({"worker": worker.name, "exit_code": code, "at": now(),
                               "log_tail": tail})
            self.retire(worker, f"exited on its own ({code})")

    def busy(self, records: Records) -> dict[int, list[Execution]]:
        """Worker pid -> the executions it runs now (a line in the last second)."""
        running: dict[int, list[Execution]] = defaultdict(list)
        for execution in records.executions.values():
            if execution.end is None and execution.last > now() - 4 * TICK_SECONDS:
                running[execution.ppid].append(execution)
        return running

    def names_by_pid(self) -> dict[int, str]:
        return {w.pid: w.name for w in self.workers if w.pid}

    def stop_all(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(OSError):
                stop(worker.process, signal.SIGTERM, timeout=15)


def _listening(log: Path) -> bool:
    return "Listening started" in log.read_text(errors="replace")


def _stopped_consuming(log: Path) -> bool:
    """taskiq's receiver logs this when its listen loop ends; we never asked it to."""
    text = log.read_text(errors="replace")
    return "The runner is stopped" in text and "received: finishing" not in text


# --- records ----------------------------------------------------------------------------


@dataclass
class Execution:
    run_id: str
    step_key: str
    attempt: str
    pid: int
    ppid: int
    retry: int
    start: float
    last: float
    end: float | None = None


class Records:
    """The record file, read incrementally: one Execution per attempt id."""

    def __init__(self, path: Path) -> None:
        self.path, self._offset = path, 0
        self.executions: dict[str, Execution] = {}

    def refresh(self) -> Records:
        if not self.path.exists():
            return self
        with open(self.path, "rb") as source:
            source.seek(self._offset)
            data = source.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            row = json.loads(line)
            known = self.executions.get(row["attempt"])
            if known is None:
                known = self.executions[row["attempt"]] = Execution(
                    row["run_id"], row["step_key"], row["attempt"], row["pid"], row["ppid"],
                    row["retry"], row["mono"], row["mono"])
            known.last = max(known.last, row["mono"])
            if row["event"] == "end":
                known.end = row["mono"]
        return self

    def by_step(self) -> dict[tuple[str, str], list[Execution]]:
        grouped: dict[tuple[str, str], list[Execution]] = defaultdict(list)
        for execution in self.executions.values():
            grouped[(execution.run_id, execution.step_key)].append(execution)
        for executions in grouped.values():
            executions.sort(key=lambda e: e.start)
        return grouped


# --- faults -------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    at: float
    lifted: float = 0.0
    target: str | None = None
    target_pid: int | None = None
    busy_at_fault: int = 0
    details: dict[str, Any] = field(default_factory=dict)


class Injector:
    def __init__(self, cluster: Cluster, redis: RedisServer, rng: random.Random,
                 heartbeat: float) -> None:
        self.cluster, self.redis, self.rng, self.heartbeat = cluster, redis, rng, heartbeat
        self.stopped: Worker | None = None

    def victim(self, records: Records, any_ready: bool) -> tuple[Worker | None, int]:
        """A worker to hit (never the skewed one: it stays for the whole soak), one running a
        step; with ``any_ready``, else any that listens. Returns it and how many steps it
        runs."""
        busy = self.cluster.busy(records)
        candidates = [w for w in self.cluster.live() if not w.skewed and w.pid
                      and w.process.poll() is None and _listening(w.log)]
        running = [w for w in candidates if busy.get(w.pid)]
        if not running and not any_ready:
            return None, 0
        if not (running or candidates):
            return None, 0
        chosen = self.rng.choice(running or candidates)
        return chosen, len(busy.get(chosen.pid, []))

    def inject(self, kind: str, records: Records, any_ready: bool) -> Fault | None:
        """Inject one fault of ``kind``; None if a worker fault found no victim yet."""
        fault = Fault(kind, now())
        if kind in WORKER_KINDS:
            worker, busy = self.victim(records, any_ready)
            if worker is None:
                return None
            fault.target, fault.target_pid, fault.busy_at_fault = worker.name, worker.pid, busy
            fault.at = now()
            if kind == "sigkill":
                stop(worker.process, signal.SIGKILL, timeout=10)
                fault.lifted = now()
                fault.details["replacement"] = self.cluster.retire(worker, "SIGKILLed").name
            else:
                pause = self.heartbeat + self.rng.uniform(1.5, 3.5)
                os.kill(worker.pid, signal.SIGSTOP)
                self.stopped = worker
                try:
                    time.sleep(pause)
                finally:
                    os.kill(worker.pid, signal.SIGCONT)
                    self.stopped = None
                fault.lifted = now()
                fault.details["stopped_s"] = round(pause, 2)
            return fault
        fault.busy_at_fault = sum(len(v) for v in self.cluster.busy(records).values())
        if kind == "readonly":
            client = self.redis.client()
            window = self.rng.uniform(2.0, 6.0)
            unused = free_port()
            fault.at = now()
            client.execute_command("REPLICAOF", "127.0.0.1", str(unused))
            try:
                time.sleep(window)
                fault.details["refused_writes"] = _refuses_writes(client)
            finally:
                client.execute_command("REPLICAOF", "NO", "ONE")
            fault.lifted = now()
            fault.details["window_s"] = round(window, 2)
            return fault
        down = self.rng.uniform(1.0, 3.0)
        fault.at = now()
        self.redis.stop(signal.SIGTERM if kind == "redis_restart_aof" else signal.SIGKILL)
        time.sleep(down)
        self.redis.start(fresh=kind == "redis_restart_noaof")
        fault.lifted = now()
        fault.details["down_s"] = round(fault.lifted - fault.at, 2)
        return fault


def _refuses_writes(client: Any) -> bool:
    import redis

    try:
        client.set("chaos-soak:probe", "1")
    except redis.exceptions.ReadOnlyError:
        return True
    return False


def fault_plan(rng: random.Random) -> Iterator[str]:
    """Rounds of every kind once, each round shuffled."""
    while True:
        kinds = list(KINDS)
        rng.shuffle(kinds)
        yield from kinds


# --- runs -----------------------------------------------------------------------------------


def run_durations(rng: random.Random, heartbeat: float) -> dict[str, float]:
    """Seconds each step sleeps: short ones, and some longer than the lease (tail_1 always)."""
    def long() -> float:
        return round(rng.uniform(heartbeat + 0.5, heartbeat + 3.0), 2)

    durations = {"head": round(rng.uniform(0.2, 1.0), 2), "gather": round(rng.uniform(0.2, 0.6), 2)}
    for key in chaos_step_keys():
        if key.startswith("fan_"):
            durations[key] = long() if rng.random() < 0.3 else round(rng.uniform(0.1, 2.0), 2)
        elif key.startswith("tail_"):
            durations[key] = long() if key == "tail_1" else round(rng.uniform(0.2, 1.0), 2)
    return durations


@dataclass
class Run:
    index: int
    durations: dict[str, float]
    process: subprocess.Popen | None = None
    launched: float = 0.0
    ended: float | None = None
    exit_code: int | None = None
    hung: bool = False


def launch(run: Run, soak_id: str, env: dict[str, str], work: Path, broker: str,
           heartbeat: float) -> None:
    spec = {
        "file": JOB_FILE,
        "tags": {SOAK_TAG: soak_id, INDEX_TAG: str(run.index)},
        "config": {
            "execution": {"config": {"broker": broker, "worker_heartbeat_timeout": heartbeat}},
            "resources": {"io_manager": {"config": {"base_dir": str(work / "io")}},
                          "soak_records": {"config": {"path": str(work / "records.jsonl")}}},
            "ops": {key: {"config": {"seconds": s}} for key, s in run.durations.items()},
            "loggers": {"console": {"config": {"log_level": "WARNING"}}},
        },
    }
    with open(work / "logs" / f"run{run.index}.log", "wb") as log:
        run.process = subprocess.Popen([sys.executable, "-c", ORCHESTRATOR, json.dumps(spec)],
                                       stdout=log, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
    run.launched = now()


# --- analysis ------------------------------------------------------------------------------


def overlaps(records: Records, names: dict[int, str], faults: list[Fault]) -> list[dict]:
    """Pairs of executions of one (run, step) alive at the same time."""
    found = []
    for (run_id, key), executions in records.by_step().items():
        for i, first in enumerate(executions):
            for second in executions[i + 1:]:
                if second.start < first.last:
                    before = [f for f in faults if f.at <= second.start]
                    found.append({
                        "run_id": run_id, "step_key": key,
                        "overlap_s": round(min(first.last, second.last) - second.start, 3),
                        "first": _describe(first, names), "second": _describe(second, names),
                        "last_fault_before": _fault_ref(before[-1]) if before else None,
                    })
    return found


def _describe(execution: Execution, names: dict[int, str]) -> dict[str, Any]:
    return {"attempt": execution.attempt, "pid": execution.pid,
            "worker": names.get(execution.ppid, str(execution.ppid)), "retry": execution.retry,
            "start": round(execution.start, 3), "last": round(execution.last, 3),
            "ended": execution.end is not None}


def _fault_ref(fault: Fault) -> dict[str, Any]:
    return {"kind": fault.kind, "at": round(fault.at, 3), "lifted": round(fault.lifted, 3),
            "target": fault.target}


def recovery(fault: Fault, records: Records) -> dict[str, Any]:
    """Worker faults: until every step the victim ran starts again elsewhere (else until the
    next step end). Redis faults: until the first step end after Redis is back."""
    executions = list(records.executions.values())
    ends = sorted(e.end for e in executions if e.end is not None)
    out: dict[str, Any] = {}
    if fault.kind in WORKER_KINDS:
        affected = [e for e in executions if e.ppid == fault.target_pid and e.start < fault.at
                    and (e.end is None or e.end > fault.at)
                    and e.last > fault.at - 4 * TICK_SECONDS]
        reruns = []
        grouped = records.by_step()
        for e in affected:
            later = [o.start for o in grouped[(e.run_id, e.step_key)]
                     if o.attempt != e.attempt and o.start > fault.at]
            reruns.append(min(later) if later else None)
        out["affected_steps"] = [f"{e.run_id[:8]}/{e.step_key}" for e in affected]
        out["affected_ended_on_their_own"] = sum(e.end is not None for e in affected)
        if affected and all(r is not None for r in reruns):
            out["recovery_s"] = round(max(r for r in reruns if r is not None) - fault.at, 3)
            out["recovery_by"] = "affected steps started again"
            return out
        if affected:
            out["not_rerun"] = sum(r is None for r in reruns)
        nxt = next((t for t in ends if t > fault.at), None)
        out["recovery_s"] = round(nxt - fault.at, 3) if nxt is not None else None
        out["recovery_by"] = "next step end"
        return out
    nxt = next((t for t in ends if t > fault.lifted), None)
    start = min((e.start for e in executions if e.start > fault.lifted), default=None)
    out["recovery_s"] = round(nxt - fault.at, 3) if nxt is not None else None
    out["recovery_by"] = "first step end after Redis was back"
    out["first_start_after_lift_s"] = round(start - fault.lifted, 3) if start else None
    return out


def check_runs(runs: list[Run], soak_id: str, records: Records) -> list[dict[str, Any]]:
    from dagster import DagsterEventType, DagsterInstance, RunsFilter

    keys = chaos_step_keys()
    ended_keys = {(e.run_id, e.step_key) for e in records.executions.values()
                  if e.end is not None}
    out = []
    with DagsterInstance.get() as instance:
        stored = {r.tags[INDEX_TAG]: r
                  for r in instance.get_runs(RunsFilter(tags={SOAK_TAG: soak_id}))}
        for run in runs:
            dagster_run = stored.get(str(run.index))
            row: dict[str, Any] = {
                "index": run.index, "hung": run.hung, "exit_code": run.exit_code,
                "duration_s": round(run.ended - run.launched, 2) if run.ended else None,
                "run_id": dagster_run.run_id if dagster_run else None,
                "status": dagster_run.status.value if dagster_run else "NOT_CREATED",
            }
            if dagster_run is not None:
                logs = instance.all_logs(dagster_run.run_id)
                events = [r.dagster_event for r in logs if r.dagster_event is not None]
                succeeded = {e.step_key for e in events
                             if e.event_type == DagsterEventType.STEP_SUCCESS}
                failed = sorted({e.step_key for e in events
                                 if e.event_type == DagsterEventType.STEP_FAILURE})
                retried = [e.step_key for e in events
                           if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
                engine_errors = [e.message or "" for e in events if e.is_engine_event
                                 and e.engine_event_data is not None
                                 and e.engine_event_data.error is not None]
                named = [m for m in engine_errors if any(f'"{k}"' in m for k in keys)]
                row.update(failed_steps=failed, retried_steps=retried,
                           engine_errors=[m[:300] for m in engine_errors])
                lost: list[str] = []
                if row["status"] == "SUCCESS":
                    lost = [k for k in keys if k not in succeeded]
                    row["success_without_execution"] = [
                        k for k in keys if (dagster_run.run_id, k) not in ended_keys]
                elif row["status"] == "FAILURE" and not failed:
                    errors = [e.event_specific_data.error for e in events
                              if e.event_type == DagsterEventType.RUN_FAILURE
                              and getattr(e.event_specific_data, "error", None) is not None]
                    if errors:
                        # Not silent (the run's failure carries the error), but a fault the
                        # orchestrator did not ride through.
                        row["orchestrator_error"] = [_last_cause(err) for err in errors]
                    elif not named:
                        lost = ["<run failed without a step failure or a lost-step error>"]
                row["silently_lost"] = lost
            out.append(row)
    return out


def _last_cause(error: Any) -> str:
    while error.cause is not None:
        error = error.cause
    return error.message.strip()[:300]


def leftovers(mark: str) -> list[int]:
    """Processes still running with our mark in their environment (none should be)."""
    found = []
    needle = f"{MARK_ENV}={mark}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def percentile_summary(values: list[float]) -> dict[str, float | None]:
    return {"median": round(statistics.median(values), 3) if values else None,
            "max": round(max(values), 3) if values else None}


# --- driver ---------------------------------------------------------------------------------


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    soak_id = uuid.uuid4().hex
    mark = uuid.uuid4().hex
    make_dagster_home(work)
    from dagster import DagsterInstance

    with DagsterInstance.get():  # create the sqlite storage once: concurrent first opens race
        pass
    base_env = {**os.environ, MARK_ENV: mark}
    redis = RedisServer(work, base_env)
    cluster: Cluster | None = None
    runs = [Run(i, run_durations(rng, args.heartbeat_timeout)) for i in range(args.runs)]
    faults: list[Fault] = []
    records = Records(work / "records.jsonl")
    injector: Injector | None = None

    def cleanup() -> None:
        if injector is not None and injector.stopped is not None:
            os.kill(injector.stopped.pid, signal.SIGCONT)
        for run in runs:
            if run.process is not None and run.process.poll() is None:
                stop(run.process, signal.SIGKILL, timeout=10)
        if cluster is not None:
            cluster.stop_all()
        redis.stop()

    atexit.register(cleanup)
    started = now()
    try:
        redis.start()
        env = bench_env(redis.url, BENCH)
        env[MARK_ENV] = mark
        cluster = Cluster(work, env, args.workers, args.concurrency)
        cluster.start_all()
        print(f"redis on {redis.port}, workers {[w.name for w in cluster.workers]}, "
              f"work dir {work}", flush=True)
        injector = Injector(cluster, redis, rng, args.heartbeat_timeout)
        plan = fault_plan(rng)
        pending = list(runs)
        active: list[Run] = []
        next_fault = due = now() + args.first_fault
        kind = next(plan)
        while pending or active:
            while pending and len(active) < args.concurrent_runs:
                run = pending.pop(0)
                launch(run, soak_id, env, work, redis.url, args.heartbeat_timeout)
                active.append(run)
            for run in list(active):
                assert run.process is not None
                code = run.process.poll()
                if code is not None:
                    run.ended, run.exit_code = now(), code
                    active.remove(run)
                    print(f"run {run.index} ended ({code}) after "
                          f"{run.ended - run.launched:.1f} s", flush=True)
                elif now() - run.launched > args.run_timeout:
                    run.hung = True
                    stop(run.process, signal.SIGKILL, timeout=10)
                    run.ended, run.exit_code = None, run.process.returncode
                    active.remove(run)
                    print(f"run {run.index} HUNG: killed after {args.run_timeout} s",
                          flush=True)
            cluster.check()
            if active and now() >= next_fault:
                records.refresh()
                # A worker fault waits up to --victim-wait s for a worker running a step.
                fault = injector.inject(kind, records, now() - due > args.victim_wait)
                if fault is None:
                    next_fault = now() + 0.5
                else:
                    faults.append(fault)
                    print(f"fault {len(faults)}: {kind} {fault.target or ''} "
                          f"(busy {fault.busy_at_fault}, {fault.lifted - fault.at:.1f} s)",
                          flush=True)
                    kind = next(plan)
                    next_fault = due = now() + rng.uniform(args.gap_min, args.gap_max)
            time.sleep(0.2)
        elapsed = now() - started
        time.sleep(2 * TICK_SECONDS)  # last lines of anything still alive
    finally:
        cleanup()
        atexit.unregister(cleanup)
    remaining = leftovers(mark)
    for pid in remaining:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    records.refresh()
    assert cluster is not None
    names = cluster.names_by_pid()
    run_rows = check_runs(runs, soak_id, records)
    overlapping = overlaps(records, names, faults)
    fault_rows = []
    for fault in faults:
        row = {**asdict(fault), **recovery(fault, records)}
        row["at"], row["lifted"] = round(fault.at - started, 3), round(fault.lifted - started, 3)
        fault_rows.append(row)
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        rows = [r for r in fault_rows if r["kind"] == kind]
        times = [r["recovery_s"] for r in rows if r.get("recovery_s") is not None]
        by_kind[kind] = {"injected": len(rows), "recovery_s": percentile_summary(times)}
        if kind not in WORKER_KINDS:
            starts = [r["first_start_after_lift_s"] for r in rows
                      if r.get("first_start_after_lift_s") is not None]
            by_kind[kind]["first_start_after_lift_s"] = percentile_summary(starts)
    skewed_pids = {w.pid for w in cluster.workers if w.skewed}
    executions = list(records.executions.values())
    grouped = records.by_step()
    summary = {
        "runs": len(runs),
        "workers": args.workers,
        "concurrency": args.concurrency,
        "seed": args.seed,
        "heartbeat_timeout_s": args.heartbeat_timeout,
        "elapsed_s": round(elapsed, 1),
        "successful_runs": sum(r["status"] == "SUCCESS" for r in run_rows),
        "failed_runs": sum(r["status"] == "FAILURE" for r in run_rows),
        "hung": sum(r["hung"] for r in run_rows),
        "overlapping": len(overlapping),
        "silently_lost": sum(bool(r.get("silently_lost")) for r in run_rows),
        "failed_by_orchestrator_error": sum(bool(r.get("orchestrator_error"))
                                            for r in run_rows),
        "success_without_execution": sum(bool(r.get("success_without_execution"))
                                         for r in run_rows),
        "faults_injected": len(faults),
        "faults_by_kind": {k: v["injected"] for k, v in by_kind.items()},
        "recovery_by_kind": by_kind,
        "step_executions": len(executions),
        "steps_executed_more_than_once": sum(len(v) > 1 for v in grouped.values()),
        "steps_completed_more_than_once": sum(
            sum(e.end is not None for e in v) > 1 for v in grouped.values()),
        "executions_on_skewed_worker": sum(e.ppid in skewed_pids for e in executions),
        "worker_exits_unplanned": len(cluster.exits),
        "workers_stopped_consuming": len(cluster.zombies),
        "leftover_processes": len(remaining),
    }
    return {"summary": summary, "runs": run_rows, "faults": fault_rows,
            "overlaps": overlapping, "worker_exits": cluster.exits,
            "workers_stopped_consuming": cluster.zombies, "work_dir": str(work)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=4,
                        help="worker processes, the first under faketime (at least 2)")
    parser.add_argument("--concurrency", type=int, default=2, help="steps per worker")
    parser.add_argument("--concurrent-runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0,
                        help="the executor's worker_heartbeat_timeout (the lease), seconds")
    parser.add_argument("--run-timeout", type=float, default=240.0,
                        help="a run not ended this long after its launch is hung (and killed)")
    parser.add_argument("--first-fault", type=float, default=8.0,
                        help="seconds before the first fault")
    parser.add_argument("--gap-min", type=float, default=5.0,
                        help="least seconds between one fault's end and the next")
    parser.add_argument("--gap-max", type=float, default=10.0)
    parser.add_argument("--victim-wait", type=float, default=15.0,
                        help="how long a worker fault waits for a worker running a step "
                        "before it hits an idle one")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (logs, records) even without violations")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.workers < 2:
        parser.error("--workers must be at least 2 (one of them runs under faketime)")

    work = Path(tempfile.mkdtemp(prefix="dagster-taskiq-chaos-"))
    # A plain SIGTERM/SIGHUP must still run the cleanup (finally blocks, atexit).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    result = soak(args, work)
    summary = result["summary"]
    print(json.dumps(summary, indent=2))
    violations = summary["hung"] + summary["overlapping"] + summary["silently_lost"]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if violations or args.keep:
        print(f"logs and records kept in {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
