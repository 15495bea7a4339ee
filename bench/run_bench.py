"""Executor benchmark: the taskiq executor beside in_process (and multiprocess), on the bench's
plain-module jobs and on a project that defines them the way the template does.

Wall time of ``execute_job`` for trivial-op jobs (``fanout_N``: a root, N leaves and a
collector; ``chain_N``: N steps in a line), 1 warm-up, then the median of ``--reps``. Every
run's result value is checked. Loopback Redis and (when a project needs one) a local S3 server
are started by the script; console log level WARNING. Also measures the dispatch hop of the
broker alone (submit -> worker starts the task -> result seen by the sender).

Projects (``--projects``):
  plain     bench_jobs.make_job, FilesystemIOManager on a shared temp dir (the original bench)
  plain-s3  the same module, the S3 pickle IO manager
  defs      defs_project/: ``@dg.definitions`` + ``load_from_defs_folder``, the benchmark jobs
            beside unrelated assets, checks, jobs and schedules; taskiq as the default executor,
            the S3 pickle IO manager (its in_process twins: ``<job>_in_process``)
Storages (``--storages``): ``sqlite`` (a fresh DAGSTER_HOME), ``postgres`` (a fresh database on
``--pg-url``'s server, dropped afterwards).

Per-step overhead = (median wall on the executor - median wall of in_process, same job, project
and storage) / steps, in ms. For the defs project the report also counts loads of the folder
(calls of its ``defs()``, logged by the project when ``$BENCH_DEFS_LOAD_LOG`` is set) by the
orchestrator and by the workers (worker processes and everything they fork), per run.

Scale cases: a big job by ``--jobs`` (``--jobs fanout_50,fanout_1000 --workers 4``: per-step
wall of each), ``--concurrent N`` (N runs of ``--concurrent-job`` at once, each orchestrated by
a process of its own) and ``--rss 100,1000`` (the workers' resident memory, with their
descendants, after that many steps of ``--rss-job``).

    uv run --frozen python bench/run_bench.py                     # the original bench (~5 min)
    uv run --frozen python bench/run_bench.py -e taskiq --jobs chain_10 --workers 1
    uv run --frozen python bench/run_bench.py -e taskiq -e in_process --projects plain-s3,defs \\
        --storages postgres --jobs fanout_10,chain_10 --workers 1 --reps 1 --no-hop

dagster-celery numbers come from the shared harness (see bench/README.md); this script does not
need celery installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEFS_SRC = BENCH / "defs_project" / "src"
sys.path[:0] = [str(BENCH), str(ROOT), str(DEFS_SRC)]

from _harness import (  # noqa: E402
    NOOP_COMPUTE_LOGS_YAML,
    bench_env,
    cpu_probe_ms,
    make_dagster_home,
    postgres_database,
    postgres_storage_yaml,
    start_worker,
    stop,
    tree_cpu,
    tree_rss,
)
from bench_jobs import expected  # noqa: E402

from tests.conftest import S3_KINDS, start_redis, start_s3, wait_for  # noqa: E402

PROJECTS = ("plain", "plain-s3", "defs")
STORAGES = ("sqlite", "postgres")
EXECUTORS = ("taskiq", "in_process", "multiprocess")
STANDARD_JOBS = "fanout_1,fanout_10,fanout_50,chain_10"
S3_BUCKET = "bench-artifacts"
READY, RESULT = "BENCH-READY", "BENCH-RESULT "


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def steps_of(job: str) -> int:
    shape, n = job.rsplit("_", 1)
    return expected(shape, int(n))[2]


# --- one run ----------------------------------------------------------------------------------


def job_pointer(project: str, job: str, executor: str):
    """The reconstructable job the orchestrator and the workers load: a ``make_job`` call for
    the plain module, the code location's ``defs`` (module + attribute, as a code server has it)
    for the defs-folder project."""
    from dagster import build_reconstructable_job
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    if project == "defs":
        if executor == "multiprocess":
            raise ValueError("the defs project has no multiprocess jobs")
        repo = ReconstructableRepository.for_module("bench_defs_project.definitions", "defs")
        return repo.get_reconstructable_job(job if executor == "taskiq" else f"{job}_in_process")
    shape, n = job.rsplit("_", 1)
    io = "s3" if project == "plain-s3" else "fs"
    return build_reconstructable_job("bench_jobs", "make_job", (shape, int(n), executor, io))


def run_config(project: str, executor: str, broker: str | None, io_dir: str) -> dict:
    execution: dict = {"config": {}}
    if executor == "taskiq":
        execution["config"]["broker"] = broker
    elif executor == "multiprocess":
        execution["config"]["max_concurrent"] = 2
    config: dict = {"execution": execution,
                    "loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    if project == "plain":
        config["resources"] = {"io_manager": {"config": {"base_dir": io_dir}}}
    return config


def time_job(spec: dict, instance) -> tuple[float, float]:
    """Seconds of one ``execute_job`` of ``spec`` (project, job, executor, broker, io_dir) and
    ``time.monotonic()`` when it returned; raises unless the run succeeded with the right
    result."""
    from dagster import execute_job

    shape, n = spec["job"].rsplit("_", 1)
    node, value, _ = expected(shape, int(n))
    recon = job_pointer(spec["project"], spec["job"], spec["executor"])
    config = run_config(spec["project"], spec["executor"], spec["broker"], spec["io_dir"])
    started = time.monotonic()
    with execute_job(recon, instance=instance, run_config=config) as result:
        ended = time.monotonic()
        if not result.success or result.output_for_node(node) != value:
            raise RuntimeError(f"{spec['job']} ({spec['project']}, {spec['executor']}): "
                               "wrong or failed result")
    return ended - started, ended


def orchestrate(spec: dict) -> int:
    """A concurrent case's orchestrator (``run_bench.py --orchestrate SPEC``): load the code,
    say ready, run once on ``go``, print the seconds and when the run ended (monotonic clock,
    one for the whole machine: the parent times the batch from its ``go`` to the last end)."""
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        job_pointer(spec["project"], spec["job"], spec["executor"]).get_definition()
        print(READY, flush=True)
        if sys.stdin.readline().strip() != "go":
            return 1
        elapsed, ended = time_job(spec, instance)
        print(RESULT + json.dumps({"seconds": elapsed, "ended": ended}), flush=True)
    return 0


# --- the harness --------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, broker: str) -> None:
        self.args, self.work, self.broker = args, work, broker
        self.logs = work / "logs"
        self.logs.mkdir()
        self.io_dir = str(work / "io")
        self.load_log = Path(os.environ["BENCH_DEFS_LOAD_LOG"])
        self.env: dict[str, str] = {}  # the workers'
        self.orchestrator_env: dict[str, str] = {}
        self.worker_args = ["-c", "1", *shlex.split(args.worker_args)]
        self.names = itertools.count()
        self.cases: list[dict] = []
        self.concurrent: list[dict] = []
        self.rss: list[dict] = []
        self.probes: list[dict] = []

    def load_mark(self) -> int:
        return self.load_log.stat().st_size if self.load_log.exists() else 0

    def loads_since(self, mark: int, runs: int, steps: float) -> dict:
        """Loads of the defs folder (``defs()`` calls) since ``mark``, by orchestrators and by
        workers (a worker process or anything it forked), per run and (workers) per step
        (``steps``: of one run, on average)."""
        roles = []
        if self.load_log.exists():
            with open(self.load_log, "rb") as log:
                log.seek(mark)
                roles = [line.split()[0].decode() for line in log.read().splitlines()]
        workers, orchestrators = roles.count("worker"), roles.count("orchestrator")
        return {"orchestrator_per_run": round(orchestrators / runs, 2),
                "worker_per_run": round(workers / runs, 2),
                "worker_per_step": round(workers / (runs * steps), 3)}

    def spec(self, project: str, job: str, executor: str) -> dict:
        return {"project": project, "job": job, "executor": executor, "broker": self.broker,
                "io_dir": self.io_dir}

    @contextlib.contextmanager
    def workers(self, count: int, tag: str) -> Iterator[list[subprocess.Popen]]:
        """``count`` workers of concurrency 1 (plus ``--worker-args``), stopped by pid after."""
        started: list[subprocess.Popen] = []
        try:
            for i in range(count):
                name = f"bench-{tag}-{next(self.names)}-{i}"
                started.append(start_worker(name, self.env, self.logs, self.worker_args))
            yield started
        finally:
            for process in started:
                stop(process)

    def measure(self, where: dict, job: str, executor: str, workers: int, instance,
                worker_processes: Sequence[subprocess.Popen] = ()) -> None:
        spec = self.spec(where["project"], job, executor)
        for _ in range(self.args.warmup):
            time_job(spec, instance)
        mark = self.load_mark()
        cpu_before = self.cpu(worker_processes)
        times = [time_job(spec, instance)[0] for _ in range(self.args.reps)]
        cpu_after = self.cpu(worker_processes)
        median = statistics.median(times)
        case = {**where, "executor": executor, "workers": workers, "job": job,
                "steps": steps_of(job), "runs": [round(t, 3) for t in times],
                "median_s": round(median, 3),
                "per_step_ms": round(median / steps_of(job) * 1000, 1),
                # CPU per step by role, summed over the reps (steady on a noisy machine, where
                # wall times are not): this process orchestrates (or runs in_process).
                "cpu_ms_per_step": {
                    role: round((cpu_after[role] - cpu_before[role]) * 1000
                                / (self.args.reps * steps_of(job)), 1)
                    for role in cpu_after}}
        loads = ""
        if where["project"] == "defs":
            case["defs_loads"] = self.loads_since(mark, self.args.reps, steps_of(job))
            loads = (f"  defs loads/run: orchestrator {case['defs_loads']['orchestrator_per_run']}"
                     f", workers {case['defs_loads']['worker_per_run']}")
        self.cases.append(case)
        cpu = " ".join(f"{role} {ms:g}" for role, ms in case["cpu_ms_per_step"].items())
        print(f"{label(case):36} {job:12} median {median:7.2f} s  "
              f"runs {[round(t, 2) for t in times]}{loads}  cpu ms/step: {cpu}", flush=True)

    @staticmethod
    def cpu(worker_processes: Sequence[subprocess.Popen]) -> dict[str, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        trees = [tree_cpu(p.pid) for p in worker_processes]
        return {"orchestrator": usage.ru_utime + usage.ru_stime,
                "workers": sum(t["worker"] for t in trees),
                "zygotes": sum(t["zygotes"] for t in trees),
                "tasks": sum(t["tasks"] for t in trees)}

    def concurrent_batch(self, project: str, executor: str, runs: int) -> tuple[float, list]:
        """Seconds from ``go`` until the last of ``runs`` orchestrators (started and loaded
        first) had its run back (each checks its result), and each one's own seconds."""
        jobs = split_list(self.args.concurrent_job)
        processes = []
        try:
            for i in range(runs):
                spec = json.dumps(self.spec(project, jobs[i % len(jobs)], executor))
                with open(self.logs / f"orchestrator-{next(self.names)}-{i}.log", "wb") as log:
                    processes.append(subprocess.Popen(
                        [sys.executable, __file__, "--orchestrate", spec],
                        env=self.orchestrator_env,
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                        start_new_session=True))
            for process in processes:
                wait_line(process, READY)
            started = time.monotonic()
            for process in processes:
                process.stdin.write("go\n")
                process.stdin.flush()
            results = [json.loads(wait_line(process, RESULT)) for process in processes]
            for process in processes:
                if process.wait(60) != 0:
                    raise RuntimeError(f"an orchestrator exited {process.returncode}")
            return (max(r["ended"] for r in results) - started,
                    [round(r["seconds"], 3) for r in results])
        finally:
            for process in processes:
                stop(process, signal.SIGKILL)
                process.stdin.close()
                process.stdout.close()

    def measure_concurrent(self, where: dict, executor: str, workers: int) -> None:
        args = self.args
        for _ in range(args.warmup):
            self.concurrent_batch(where["project"], executor, args.concurrent)
        mark = self.load_mark()
        batches = [self.concurrent_batch(where["project"], executor, args.concurrent)
                   for _ in range(args.reps)]
        times = [total for total, _ in batches]
        median = statistics.median(times)
        jobs = split_list(args.concurrent_job)
        steps = sum(steps_of(jobs[i % len(jobs)]) for i in range(args.concurrent))
        case = {**where, "executor": executor, "workers": workers, "job": args.concurrent_job,
                "concurrent_runs": args.concurrent, "steps": steps,
                "runs": [round(t, 3) for t in times], "median_s": round(median, 3),
                "per_step_ms": round(median / steps * 1000, 1),
                "run_seconds": [each for _, each in batches]}
        if where["project"] == "defs":
            case["defs_loads"] = self.loads_since(mark, args.reps * args.concurrent,
                                                  steps / args.concurrent)
        self.concurrent.append(case)
        print(f"{label(case):36} {args.concurrent} x {args.concurrent_job} at once: median "
              f"{median:.2f} s  runs {[round(t, 2) for t in times]}", flush=True)

    def measure_rss(self, where: dict, instance) -> None:
        """Run ``--rss-job`` on fresh workers until each mark of ``--rss`` (steps in all) is
        passed; after each (and once before the first run), the workers' tree RSS."""
        args, job = self.args, self.args.rss_job
        spec, steps = self.spec(where["project"], job, "taskiq"), steps_of(job)
        samples, done, runs, mark = [], 0, 0, self.load_mark()
        with self.workers(args.rss_workers, f"{where['storage']}-{where['project']}-rss") as ws:

            def sample() -> None:
                time.sleep(1.0)  # the last step's process exits after its result is sent
                trees = [tree_rss(w.pid) for w in ws]
                samples.append({"steps": done, "runs": runs,
                                "total_kb": sum(t["total_kb"] for t in trees),
                                "anon_kb": sum(t["anon_kb"] for t in trees), "workers": trees})
                print(f"{label({**where, 'executor': 'taskiq', 'workers': len(ws)}):36} "
                      f"RSS after {done:5} steps ({runs} runs of {job}): "
                      f"{samples[-1]['total_kb'] / 1024:.1f} MiB in "
                      f"{sum(len(t['processes']) for t in trees)} processes", flush=True)

            sample()
            for mark in sorted(int(m) for m in split_list(args.rss)):
                while done < mark:
                    time_job(spec, instance)
                    done, runs = done + steps, runs + 1
                sample()
        entry = {**where, "job": job, "workers": args.rss_workers, "samples": samples}
        if where["project"] == "defs" and runs:
            entry["defs_loads"] = self.loads_since(mark, runs, steps)
        self.rss.append(entry)

    def run_storage(self, storage: str) -> None:
        from dagster import DagsterInstance

        args = self.args
        extra = NOOP_COMPUTE_LOGS_YAML if args.noop_compute_logs else ""
        with contextlib.ExitStack() as stack:
            if storage == "postgres":
                url = stack.enter_context(postgres_database(args.pg_url))
                extra = postgres_storage_yaml(url) + extra
            make_dagster_home(self.work, extra, name=f"home-{storage}")
            self.orchestrator_env = bench_env(self.broker, BENCH, DEFS_SRC)
            self.env = {**self.orchestrator_env, "BENCH_ROLE": "worker"}
            # The schema exists before any worker starts (dagster creates it on first use).
            instance = stack.enter_context(DagsterInstance.get())
            for project in split_list(args.projects):
                where = {"storage": storage, "project": project}
                self.probes.append({**where, "cpu_probe_ms": cpu_probe_ms()})
                self.run_project(where, instance)

    def run_project(self, where: dict, instance) -> None:
        args = self.args
        jobs = split_list(args.jobs)
        tag = f"{where['storage']}-{where['project']}"
        for executor in args.executor:
            if executor == "multiprocess" and where["project"] == "defs":
                print("(the defs project has no multiprocess jobs: skipped)", flush=True)
                continue
            if executor != "taskiq":
                for job in jobs:
                    self.measure(where, job, executor, 0, instance)
                if args.concurrent and executor == "in_process":
                    self.measure_concurrent(where, executor, 0)
                continue
            for count in (int(w) for w in split_list(args.workers)):
                if jobs:
                    with self.workers(count, tag) as started:
                        for job in jobs:
                            self.measure(where, job, executor, count, instance, started)
            if args.concurrent:
                with self.workers(args.concurrent_workers, f"{tag}-concurrent"):
                    self.measure_concurrent(where, executor, args.concurrent_workers)
        if args.rss and "taskiq" in args.executor:
            self.measure_rss(where, instance)


def wait_line(process: subprocess.Popen, prefix: str) -> str:
    """The next line of ``process``'s stdout that starts with ``prefix`` (others are skipped)."""
    while True:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"an orchestrator exited before {prefix.strip()!r}; see the logs")
        if line.startswith(prefix):
            return line[len(prefix):]


def label(case: dict) -> str:
    executor = case["executor"]
    if executor == "taskiq":
        executor = f"taskiq w{case['workers']}"
    return f"{case['storage']}/{case['project']} {executor}"


# --- derived figures and the summary ------------------------------------------------------------


def add_overheads(cases: list[dict]) -> None:
    """``overhead_ms_per_step`` = (median - in_process median of the same job, project and
    storage) / steps, for every case that has an in_process counterpart."""
    def key(c: dict) -> tuple:
        return c["storage"], c["project"], c["job"], c.get("concurrent_runs")

    floors = {key(c): c["median_s"] for c in cases if c["executor"] == "in_process"}
    for case in cases:
        floor = floors.get(key(case))
        if floor is not None and case["executor"] != "in_process":
            case["in_process_median_s"] = floor
            case["overhead_ms_per_step"] = round((case["median_s"] - floor) / case["steps"]
                                                 * 1000, 1)


def columns(cases: list[dict]) -> list[str]:
    order = {"in_process": (0, 0), "multiprocess": (1, 0)}
    names = {(label(c).split(" ", 1)[1], order.get(c["executor"], (2, c["workers"])))
             for c in cases}
    return [name for name, _ in sorted(names, key=lambda n: n[1])]


def cell(case: dict | None) -> str:
    if case is None:
        return ""
    text = f"{case['median_s']:.2f}"
    if "overhead_ms_per_step" in case:
        text += f" (+{case['overhead_ms_per_step']:.0f})"
    return text


def summary(report: dict) -> str:
    """Markdown: medians in seconds, (+overhead ms per step against in_process)."""
    lines = [f"cpu_probe_ms {report['machine']['cpu_probe_ms']} at start, "
             f"{report['machine']['cpu_probe_ms_end']} at end; S3: {report.get('s3') or '-'}; "
             f"median of {report['args']['reps']} after {report['args']['warmup']} warm-up",
             ""]
    for title, cases, first in (("jobs", report["cases"], "job (steps)"),
                                ("concurrent runs", report["concurrent"], "runs x job (steps)")):
        if not cases:
            continue
        names = columns(cases)
        lines += [f"### {title}: median s (+ms per step over in_process)", "",
                  "| storage | project | " + first + " | " + " | ".join(names) + " |",
                  "|---" * (3 + len(names)) + "|"]
        rows: dict[tuple, dict[str, dict]] = {}
        for case in cases:
            job = case["job"]
            if "concurrent_runs" in case:
                job = f"{case['concurrent_runs']} x {job}"
            row = rows.setdefault((case["storage"], case["project"], job, case["steps"]), {})
            row[label(case).split(" ", 1)[1]] = case
        for (storage, project, job, steps), row in rows.items():
            lines.append(f"| {storage} | {project} | {job} ({steps}) | "
                         + " | ".join(cell(row.get(n)) for n in names) + " |")
        lines.append("")
    timed = [c for c in report["cases"] if "cpu_ms_per_step" in c]
    if timed:
        lines += ["### CPU per step (ms): orchestrator (or in_process), workers, zygotes, tasks",
                  "", "| storage | project | job | executor | orchestrator | workers | zygotes "
                  "| tasks | total |", "|---" * 9 + "|"]
        for case in timed:
            cpu = case["cpu_ms_per_step"]
            lines.append(f"| {case['storage']} | {case['project']} | {case['job']} | "
                         f"{label(case).split(' ', 1)[1]} | {cpu['orchestrator']} | "
                         f"{cpu['workers']} | {cpu['zygotes']} | {cpu['tasks']} | "
                         f"{round(sum(cpu.values()), 1)} |")
        lines.append("")
    big = [c for c in report["cases"] if c["job"].startswith("fanout_")]
    if len({c["job"] for c in big}) > 1:
        lines += ["### per-step wall (ms) by fanout size", "",
                  "| storage | project | executor | " + " | ".join(
                      sorted({c["job"] for c in big}, key=steps_of)) + " |"]
        sizes = sorted({c["job"] for c in big}, key=steps_of)
        lines.append("|---" * (3 + len(sizes)) + "|")
        rows = {}
        for case in big:
            rows.setdefault((case["storage"], case["project"], label(case).split(" ", 1)[1]),
                            {})[case["job"]] = case["per_step_ms"]
        for (storage, project, executor), row in rows.items():
            lines.append(f"| {storage} | {project} | {executor} | "
                         + " | ".join(str(row.get(s, "")) for s in sizes) + " |")
        lines.append("")
    loaded = [c for c in report["cases"] + report["concurrent"] if "defs_loads" in c]
    if loaded:
        lines += ["### defs-folder loads (`defs()` calls) per run: orchestrator / workers "
                  "(workers per step)", ""]
        for case in loaded:
            job = case["job"]
            if "concurrent_runs" in case:
                job = f"{case['concurrent_runs']} x {job}"
            loads = case["defs_loads"]
            lines.append(f"- {label(case)} {job}: {loads['orchestrator_per_run']} / "
                         f"{loads['worker_per_run']} ({loads['worker_per_step']})")
        lines.append("")
    for entry in report["rss"]:
        marks = ", ".join(f"{s['steps']} steps: {s['total_kb'] / 1024:.1f} MiB"
                          for s in entry["samples"])
        lines.append(f"RSS {entry['storage']}/{entry['project']} {entry['workers']} worker(s), "
                     f"{entry['job']}: {marks}")
    if "hop" in report:
        lines.append(f"dispatch hop p50 {report['hop']['p50_ms']:.2f} ms, "
                     f"p95 {report['hop']['p95_ms']:.2f} ms")
    return "\n".join(lines) + "\n"


# --- the broker's dispatch hop ------------------------------------------------------------------


async def _hop_samples(broker_url: str, count: int, logs: Path) -> list[float]:
    """Round trips in ms (submit -> a worker runs the task -> the sender sees its result) for
    ``count`` no-op tasks sent one after another, after 20 warm-up ones."""
    from tests.executor.consumer import TRACE, make_broker

    log = logs / "hop-consumer.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        consumer = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "executor" / "consumer.py"), broker_url,
             "hop", "dagster", "1"], stdout=out, stderr=subprocess.STDOUT, env=env)
    wait_for(lambda: "consuming" in log.read_text(), 30, "the hop consumer")
    client = make_broker(broker_url, ["dagster"], "client")
    await client.startup()
    task = client.find_task("record")
    # The reply list shares the prefix (a Redis Cluster hash tag) of the task's keys.
    replies_key = f"{client.settings.key_prefix}:bench:replies"
    labels = {"queue_name": "dagster", "reply_to": replies_key}
    samples = []
    try:
        for i in range(count + 20):
            await client.redis.delete(TRACE)
            t0 = time.time()
            await task.kicker().with_labels(**labels).kiq(f"n{i}")
            replies = await client.result_backend.wait_replies(replies_key, 5)
            samples.append((time.time() - t0) * 1000)
            assert replies, "no reply"
            started = await client.redis.lindex(TRACE, 0)
            assert started and started.startswith(b"start:"), "the task did not run"
    finally:
        await client.shutdown()
        consumer.terminate()
        consumer.wait(10)
    return samples[20:]


def bench_hop(broker_url: str, logs: Path, count: int = 300) -> dict[str, float]:
    round_trips = sorted(asyncio.run(_hop_samples(broker_url, count, logs)))
    return {
        "p50_ms": statistics.median(round_trips),
        "p95_ms": round_trips[int(len(round_trips) * 0.95)],
    }


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-e", "--executor", action="append", choices=EXECUTORS,
                        help="repeatable; default: all three")
    parser.add_argument("--projects", default="plain",
                        help=f"comma-separated, of {', '.join(PROJECTS)} (default: plain)")
    parser.add_argument("--storages", default="sqlite",
                        help=f"comma-separated, of {', '.join(STORAGES)} (default: sqlite)")
    parser.add_argument("--jobs", default=STANDARD_JOBS,
                        help="fanout_N / chain_N, comma-separated; empty: only the scale cases")
    parser.add_argument("--workers", default="1,2", help="taskiq worker counts (concurrency 1)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--concurrent", type=int, default=0, metavar="N",
                        help="also time N runs of --concurrent-job at once (taskiq on "
                             "--concurrent-workers workers, and in_process if selected)")
    parser.add_argument("--concurrent-job", default="fanout_50",
                        help="comma-separated: run i runs the (i mod k)-th (workers that serve "
                             "several jobs at once)")
    parser.add_argument("--concurrent-workers", type=int, default=4)
    parser.add_argument("--rss", default="", metavar="STEPS",
                        help="e.g. 100,1000: worker tree RSS after that many steps of --rss-job")
    parser.add_argument("--rss-job", default="fanout_50")
    parser.add_argument("--rss-workers", type=int, default=1)
    parser.add_argument("--worker-args", default="",
                        help="more `dagster-taskiq worker start` arguments, one string "
                             "(--worker-args='-i mod': with '=' when it starts with a dash)")
    parser.add_argument("--s3", choices=["auto", *S3_KINDS], default="auto",
                        help="S3 server for plain-s3 / defs (auto: minio, weed, else moto)")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="server (and database to connect to) for --storages postgres")
    parser.add_argument("--no-hop", action="store_true")
    parser.add_argument("--noop-compute-logs", action="store_true",
                        help="use Dagster's NoOpComputeLogManager (no per-step capture helpers)")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the temp dir (logs; kept anyway when a case fails)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--md", type=Path, help="write the summary tables (markdown) here")
    parser.add_argument("--orchestrate", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.executor = args.executor or list(EXECUTORS)
    for name, allowed in (("projects", PROJECTS), ("storages", STORAGES)):
        unknown = set(split_list(getattr(args, name))) - set(allowed)
        if unknown:
            parser.error(f"--{name}: unknown {sorted(unknown)}")
    return args


def main() -> int:
    args = parse_args()
    if args.orchestrate:
        return orchestrate(json.loads(args.orchestrate))
    projects = split_list(args.projects)
    # The defs project defines the standard jobs and every other one this invocation runs.
    defs_jobs = dict.fromkeys([*split_list(STANDARD_JOBS), *split_list(args.jobs),
                               *split_list(args.concurrent_job), args.rss_job])
    os.environ["BENCH_DEFS_JOBS"] = ",".join(defs_jobs)

    work = Path(tempfile.mkdtemp(prefix="dagster-taskiq-bench-"))
    os.environ.update(BENCH_DEFS_LOAD_LOG=str(work / "defs-loads.log"), BENCH_ROLE="orchestrator")
    processes: list[subprocess.Popen] = []
    failed = True  # until the last case is done: a failure keeps the work dir (its logs)
    report: dict = {"machine": {"cpus": os.cpu_count(), "load1": os.getloadavg()[0],
                                "cpu_probe_ms": cpu_probe_ms()},
                    "args": {k: str(v) if isinstance(v, Path) else v
                             for k, v in vars(args).items() if k != "orchestrate"},
                    "noop_compute_logs": args.noop_compute_logs}
    try:
        redis = start_redis(work)
        processes.append(redis.process)
        if {"plain-s3", "defs"} & set(projects):
            (work / "s3").mkdir()
            endpoint, s3_process = start_s3(work / "s3", None if args.s3 == "auto" else args.s3)
            processes.append(s3_process)
            endpoint.client().create_bucket(Bucket=S3_BUCKET)
            os.environ.update(endpoint.env(), S3_BUCKET=S3_BUCKET)
            report["s3"] = endpoint.kind
        bench = Bench(args, work, redis.url())
        if not args.no_hop:
            report["hop"] = bench_hop(redis.url(), work)
            print(f"dispatch hop: p50 {report['hop']['p50_ms']:.2f} ms, "
                  f"p95 {report['hop']['p95_ms']:.2f} ms", flush=True)
        try:
            for storage in split_list(args.storages):
                bench.run_storage(storage)
        finally:
            report.update(cases=bench.cases, concurrent=bench.concurrent, rss=bench.rss,
                          probes=bench.probes)
        failed = False
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)
        if args.keep_work or failed:
            print(f"work dir kept: {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    add_overheads(report["cases"])
    add_overheads(report["concurrent"])
    report["machine"]["load1_end"] = os.getloadavg()[0]
    report["machine"]["cpu_probe_ms_end"] = cpu_probe_ms()
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    text = summary(report)
    if args.md:
        args.md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
