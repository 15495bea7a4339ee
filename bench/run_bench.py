"""Executor benchmark: the taskiq executor (1 and 2 workers) beside in_process and multiprocess.

Wall time of ``execute_job`` for trivial-op jobs, a persistent sqlite instance in a fresh
DAGSTER_HOME, a FilesystemIOManager on a shared temp dir, loopback Redis; 1 warm-up, then the
median of ``--reps``. Every run's result value is checked. Also measures the dispatch hop of
the broker alone (submit -> worker starts the task -> result seen by the sender).

    uv run python bench/run_bench.py                     # everything (~5 min on 2 cores)
    uv run python bench/run_bench.py -e taskiq --jobs chain_10 --workers 1

dagster-celery numbers come from the shared harness (see bench/README.md); this script does not
need celery installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT)]

from bench_jobs import expected  # noqa: E402

from tests.conftest import start_redis, wait_for  # noqa: E402


def start_workers(count: int, env: dict[str, str], logs: Path) -> list[subprocess.Popen]:
    cli = str(Path(sys.executable).parent / "dagster-taskiq")
    workers = []
    for i in range(count):
        log = logs / f"worker{i}.log"
        with open(log, "wb") as out:
            workers.append(subprocess.Popen([cli, "worker", "start", "-n", f"bench{i}", "-c", "1"],
                                            stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True))
        wait_for(lambda log=log: "Listening started" in log.read_text(), 60, f"worker {i}")
    return workers


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def time_job(name: str, executor: str, instance, io_dir: str, broker: str | None) -> float:
    from dagster import build_reconstructable_job, execute_job

    shape, n = name.rsplit("_", 1)
    node, value, _ = expected(shape, int(n))
    recon = build_reconstructable_job("bench_jobs", "make_job", (shape, int(n), executor))
    execution: dict = {"config": {}}
    if executor == "taskiq":
        execution["config"]["broker"] = broker
    elif executor == "multiprocess":
        execution["config"]["max_concurrent"] = 2
    config = {
        "execution": execution,
        "resources": {"io_manager": {"config": {"base_dir": io_dir}}},
        "loggers": {"console": {"config": {"log_level": "WARNING"}}},
    }
    started = time.perf_counter()
    with execute_job(recon, instance=instance, run_config=config) as result:
        elapsed = time.perf_counter() - started
        if not result.success or result.output_for_node(node) != value:
            raise RuntimeError(f"{name} on {executor}: wrong or failed result")
    return elapsed


def bench_jobs(args, executor: str, workers: int, broker: str | None, work: Path) -> dict:
    from dagster import DagsterInstance

    results = {}
    with DagsterInstance.get() as instance:
        for name in args.jobs.split(","):
            for _ in range(args.warmup):
                time_job(name, executor, instance, str(work / "io"), broker)
            times = [time_job(name, executor, instance, str(work / "io"), broker)
                     for _ in range(args.reps)]
            results[name] = statistics.median(times)
            label = f"{executor} w{workers}" if executor == "taskiq" else executor
            print(f"{label:14} {name:10} median {results[name]:.2f} s  "
                  f"runs {[round(t, 2) for t in times]}", flush=True)
    return results


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
    labels = {"queue_name": "dagster", "reply_to": "bench:replies"}
    samples = []
    try:
        for i in range(count + 20):
            await client.redis.delete(TRACE)
            t0 = time.time()
            await task.kicker().with_labels(**labels).kiq(f"n{i}")
            replies = await client.result_backend.wait_replies("bench:replies", 5)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-e", "--executor", action="append",
                        choices=["taskiq", "in_process", "multiprocess"])
    parser.add_argument("--jobs", default="fanout_1,fanout_10,fanout_50,chain_10")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-hop", action="store_true")
    parser.add_argument("--noop-compute-logs", action="store_true",
                        help="use Dagster's NoOpComputeLogManager (no per-step capture helpers)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    executors = args.executor or ["taskiq", "in_process", "multiprocess"]

    work = Path(tempfile.mkdtemp(prefix="dagster-taskiq-bench-"))
    home = work / "dagster_home"
    home.mkdir()
    instance_yaml = "telemetry:\n  enabled: false\n"
    if args.noop_compute_logs:
        instance_yaml += ("compute_logs:\n  module: dagster._core.storage.noop_compute_log_manager"
                          "\n  class: NoOpComputeLogManager\n")
    (home / "dagster.yaml").write_text(instance_yaml)
    os.environ["DAGSTER_HOME"] = str(home)
    redis = start_redis(work)
    broker = redis.url()
    env = {**os.environ, "DAGSTER_TASKIQ_BROKER_URL": broker,
           "PYTHONPATH": os.pathsep.join([str(BENCH), str(ROOT)])}
    report: dict = {"machine": {"cpus": os.cpu_count(), "load1": os.getloadavg()[0],
                                "cpu_probe_ms": cpu_probe_ms()},
                     "noop_compute_logs": args.noop_compute_logs}
    try:
        if not args.no_hop:
            report["hop"] = bench_hop(broker, work)
            print(f"dispatch hop: p50 {report['hop']['p50_ms']:.2f} ms, "
                  f"p95 {report['hop']['p95_ms']:.2f} ms", flush=True)
        for executor in executors:
            if executor != "taskiq":
                report[executor] = bench_jobs(args, executor, 0, None, work)
                continue
            for count in (int(w) for w in args.workers.split(",")):
                workers = start_workers(count, env, work)
                try:
                    report[f"taskiq w{count}"] = bench_jobs(args, executor, count, broker, work)
                finally:
                    stop(workers)
    finally:
        redis.process.terminate()
        redis.process.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load1_end"] = os.getloadavg()[0]
    report["machine"]["cpu_probe_ms_end"] = cpu_probe_ms()
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
