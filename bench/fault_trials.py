"""SIGKILL trials: kill the worker running a step, N times; count hung runs, time the recovery.

Each trial runs ``slow_chain_job`` (tests/executor/repo.py: three sleeping steps, the first of
15 s) through the taskiq executor; once the first step runs on the victim worker, a second worker
starts, the victim is SIGKILLed (its step process dies with it), and the trial records how long
until the lost step starts again on the second worker, and whether the run finished successfully
within ``--deadline`` seconds (otherwise it counts as hung).

    uv run python bench/fault_trials.py --trials 20 --heartbeat-timeout 5
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import ROOT, bench_env, make_dagster_home, start_worker, stop

from tests.conftest import start_redis, wait_for

REPO_FILE = str(ROOT / "tests" / "executor" / "repo.py")


def trial(index: int, broker: str, env: dict[str, str], work: Path, heartbeat: float,
          deadline: float) -> dict:
    from dagster import DagsterEventType, DagsterInstance, execute_job
    from dagster._core.definitions.reconstruct import ReconstructableJob

    victim = start_worker(f"victim{index}", env, work)
    config = {
        "execution": {"config": {"broker": broker, "worker_heartbeat_timeout": heartbeat}},
        "resources": {"io_manager": {"config": {"base_dir": str(work / "io")}}},
        "ops": {"slow_0": {"config": {"seconds": 15.0}}},
        "loggers": {"console": {"config": {"log_level": "ERROR"}}},
    }
    outcome: dict = {}

    def run() -> None:
        with DagsterInstance.get() as instance, execute_job(
            ReconstructableJob.for_file(REPO_FILE, "slow_chain_job"), instance=instance,
            run_config=config,
        ) as result:
            outcome["success"] = result.success
            outcome["run_id"] = result.run_id

    with DagsterInstance.get() as instance:
        earlier = {run.run_id for run in instance.get_runs()}
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        new_run = wait_for(lambda: [r for r in instance.get_runs(limit=1)
                                    if r.run_id not in earlier], 60, "the trial's run")[0]

        def starts() -> list[float]:
            return [r.timestamp for r in instance.all_logs(new_run.run_id,
                                                           of_type=DagsterEventType.STEP_START)
                    if r.step_key == "slow_0"]

        wait_for(starts, 60, "the first step")
        # The rescuer is up before the kill, so what is timed is detection and redelivery.
        rescuer = start_worker(f"rescuer{index}", env, work)
        stop(victim, signal.SIGKILL)
        killed = time.time()
        try:
            thread.join(deadline)
            again = starts()
            detect = (again[1] - killed) if len(again) > 1 else None
        finally:
            stop(rescuer)
    hung = thread.is_alive()
    return {"trial": index, "hung": hung, "success": outcome.get("success", False),
            "recovered_after_s": detect}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0)
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dagster-taskiq-faults-"))
    make_dagster_home(work)
    redis = start_redis(work)
    broker = redis.url()
    env = bench_env(broker, ROOT / "tests" / "executor")
    results = []
    try:
        for index in range(args.trials):
            results.append(trial(index, broker, env, work, args.heartbeat_timeout,
                                 args.deadline))
            print(json.dumps(results[-1]), flush=True)
    finally:
        redis.process.terminate()
        redis.process.wait(10)
    recovered = [r["recovered_after_s"] for r in results if r["recovered_after_s"] is not None]
    summary = {
        "trials": len(results),
        "hung_runs": sum(r["hung"] for r in results),
        "successful_runs": sum(r["success"] for r in results),
        "heartbeat_timeout_s": args.heartbeat_timeout,
        "recovery_s_median": statistics.median(recovered) if recovered else None,
        "recovery_s_max": max(recovered) if recovered else None,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "trials": results}, indent=2))
    return 1 if summary["hung_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
