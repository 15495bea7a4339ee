"""How many Redis keys the broker leaves behind: N runs through real workers, keys counted.

Every key under the broker's prefix must be deleted when its work is done or carry a TTL, so
the key count stays flat however many runs go through. Runs ``--runs`` jobs one after another
(chain_2 and fanout_3, and every tenth one interrupted mid-run, so revoke paths are taken too)
on two workers against a private redis-server, and counts the keys under the prefix, by kind,
every ``--every`` runs; at the end it lists any key without a TTL that is not one of the
broker's fixed structures.

    uv run python bench/key_count.py --runs 1000 --out bench/results/<date>-keys.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT)]

from _harness import start_worker, stop  # noqa: E402

from tests.conftest import start_redis  # noqa: E402

# Structures that exist once per broker (or per queue / worker), not per task or run.
FIXED = {"seq", "leases", "workers", "queue", "runs", "wake", "wakeruns"}


def count_keys(url: str, prefix: str) -> tuple[Counter[str], list[str]]:
    """Keys under ``prefix`` by kind (the segment after the prefix), and those of a per-task or
    per-run kind that have no TTL (a leak: nothing would ever delete them)."""
    import redis

    server = redis.Redis.from_url(url)
    kinds: Counter[str] = Counter()
    immortal = []
    for key in server.scan_iter(match=f"{prefix}:*", count=1000):
        kind = key.decode()[len(prefix) + 1:].split(":", 1)[0]
        kinds[kind] += 1
        if kind not in FIXED and server.ttl(key) == -1:
            immortal.append(key.decode())
    return kinds, immortal


def run_one(index: int, instance, io_dir: str, broker: str) -> str:
    from dagster import build_reconstructable_job, execute_job

    shape, n = ("chain", 2) if index % 2 else ("fanout", 3)
    recon = build_reconstructable_job("bench_jobs", "make_job", (shape, n, "taskiq"))
    config = {
        "execution": {"config": {"broker": broker}},
        "resources": {"io_manager": {"config": {"base_dir": io_dir}}},
        "loggers": {"console": {"config": {"log_level": "ERROR"}}},
    }
    if index % 10 == 9:  # interrupted: the run's queued steps are revoked
        timer = threading.Timer(0.05, lambda: os.kill(os.getpid(), 2))
        timer.start()
        try:
            with execute_job(recon, instance=instance, run_config=config,
                             raise_on_error=False) as result:
                return "interrupted" if not result.success else "success"
        except KeyboardInterrupt:
            return "interrupted"
        finally:
            timer.cancel()
    with execute_job(recon, instance=instance, run_config=config) as result:
        return "success" if result.success else "failure"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from dagster import DagsterInstance

    from dagster_taskiq.config import BrokerSettings

    work = Path(tempfile.mkdtemp(prefix="dagster-taskiq-keys-"))
    (work / "home").mkdir()
    (work / "home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    server = start_redis(work)
    prefix = BrokerSettings.from_config(server.url(), None, None).key_prefix
    env = {**os.environ, "DAGSTER_HOME": str(work / "home"),
           "DAGSTER_TASKIQ_BROKER_URL": server.url(),
           "PYTHONPATH": os.pathsep.join([str(BENCH), str(ROOT)])}
    os.environ.update({k: env[k] for k in ("DAGSTER_HOME", "DAGSTER_TASKIQ_BROKER_URL")})
    workers = [start_worker(f"keys{i}", env, work, ["-c", "1"]) for i in range(2)]
    samples, outcomes = [], Counter()
    started = time.monotonic()
    try:
        with DagsterInstance.get() as instance:
            for i in range(args.runs):
                outcomes[run_one(i, instance, str(work / "io"), server.url())] += 1
                if (i + 1) % args.every == 0:
                    time.sleep(1.0)  # let the last acknowledgements land
                    kinds, immortal = count_keys(server.url(), prefix)
                    samples.append({"runs": i + 1, "keys": sum(kinds.values()),
                                    "by_kind": dict(kinds), "without_ttl": len(immortal)})
                    print(f"after {i + 1:5d} runs: {sum(kinds.values()):4d} keys "
                          f"{dict(sorted(kinds.items()))}, {len(immortal)} per-run keys "
                          f"without a TTL ({time.monotonic() - started:.0f} s)", flush=True)
        _, immortal = count_keys(server.url(), prefix)
    finally:
        for worker in workers:
            stop(worker)
        server.process.terminate()
        server.process.wait(10)
    result = {"runs": args.runs, "outcomes": dict(outcomes), "samples": samples,
              "keys_without_ttl": immortal[:50], "seconds": round(time.monotonic() - started)}
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not immortal else 1


if __name__ == "__main__":
    sys.exit(main())
