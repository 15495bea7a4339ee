"""The job of the failover test: four slow steps in parallel, then one after them. Each step
records its start and end (with its pid) in a JSON-lines file and holds a lock on its (run,
step) while it runs: a second copy running at the same time finds it taken and says so."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from dagster import Field, In, Nothing, Out, job, op

from dagster_taskiq import taskiq_executor

FANOUT = 4


def _slow(name: str):
    @op(name=name, ins={"after": In(Nothing)}, out=Out(Nothing),
        config_schema={"record": str, "seconds": Field(float, default_value=3.0)})
    def _op(context) -> None:
        record_file = Path(context.op_config["record"])
        lock = open(record_file.parent / f"{context.run_id}-{name}.lock", "w")  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            overlap = False
        except BlockingIOError:
            overlap = True

        def record(**what: object) -> None:
            with open(record_file, "a") as out:
                out.write(json.dumps({"step": name, "pid": os.getpid(), "at": time.time(),
                                      **what}) + "\n")

        record(event="start", overlap=overlap)
        time.sleep(context.op_config["seconds"])
        record(event="end")

    return _op


@job(executor_def=taskiq_executor)
def ha_job():
    _slow("join")(after=[_slow(f"fan_{i}")() for i in range(FANOUT)])


STEPS = [*(f"fan_{i}" for i in range(FANOUT)), "join"]
