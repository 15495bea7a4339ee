"""Jobs for the run launcher tests (the shapes of dagster-celery's repo_runner, written anew)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path

from dagster import FilesystemIOManager, job, op

from dagster_taskiq import taskiq_executor


@op
def noop_op():
    pass


@op
def crashy_op():
    os._exit(1)


@op
def exity_op():
    sys.exit(1)


@op
def sleepy_op():
    while True:
        time.sleep(0.1)


@op
def return_one() -> int:
    return 1


@op
def multiply_by_2(value: int) -> int:
    return value * 2


@op
def multiply_by_3(value: int) -> int:
    return value * 3


@op
def add(left: int, right: int) -> int:
    return left + right


@op
def crash_once(context, value: int) -> int:
    """Kills its whole process the first time (a run worker lost mid-run), then succeeds."""
    marker = Path(context.instance.root_directory) / "crashed-once"
    if not marker.exists():
        marker.write_text("1")
        os._exit(9)
    return value + 1


@job
def noop_job():
    noop_op()


@job
def crashy_job():
    crashy_op()


@job
def exity_job():
    exity_op()


@job
def sleepy_job():
    sleepy_op()


@job
def math_diamond():
    one = return_one()
    add(multiply_by_2(one), multiply_by_3(one))


@job
def crash_once_job():
    crash_once(return_one())


@job(executor_def=taskiq_executor, resource_defs={"io_manager": FilesystemIOManager()})
def taskiq_math_diamond():
    one = return_one()
    add(multiply_by_2(one), multiply_by_3(one))


@job(executor_def=taskiq_executor, resource_defs={"io_manager": FilesystemIOManager()})
def taskiq_sleepy_job():
    sleepy_op()


# While this file exists in the instance's root directory, recorded ops stay in flight.
HOLD_FILE = "hold"


def _recorded_op(name: str):
    @op(name=name)
    def _op(context, value: int) -> int:
        """Sleeps a few seconds holding a lock on its (run, step): a second copy running at the
        same time finds it taken (the lock dies with its process) and records the overlap."""
        root = Path(context.instance.root_directory)
        lock = open(root / f"{context.run_id}-{name}.lock", "w")  # noqa: SIM115 - held to the end
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            overlap = False
        except BlockingIOError:
            overlap = True
        def record(**what: object) -> None:
            with open(root / "attempts.jsonl", "a") as out:
                out.write(json.dumps({"run_id": context.run_id, "step": name,
                                      "pid": os.getpid(), "at": time.time(), **what}) + "\n")

        record(event="start", overlap=overlap)
        time.sleep(3)
        held_until = time.monotonic() + 120
        while (root / HOLD_FILE).exists() and time.monotonic() < held_until:
            time.sleep(0.1)
        record(event="end")
        return value + 1

    return _op


@job(executor_def=taskiq_executor, resource_defs={"io_manager": FilesystemIOManager()})
def taskiq_recorded_chain():
    value = return_one()
    for i in range(3):
        value = _recorded_op(f"recorded_{i}")(value)


@op
def stubborn_op():
    """Ignores SIGINT (as a tool busy cleaning up does): only SIGKILL stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.1)


@job(executor_def=taskiq_executor, resource_defs={"io_manager": FilesystemIOManager()})
def taskiq_stubborn_job():
    stubborn_op()


@op
def sleep_after(value: int) -> int:
    while True:
        time.sleep(0.1)


@job(executor_def=taskiq_executor, resource_defs={"io_manager": FilesystemIOManager()})
def taskiq_one_then_sleepy():
    sleep_after(return_one())
