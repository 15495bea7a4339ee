"""Benchmark jobs, rebuilt by workers from a code pointer: ``make_job(shape, n, executor, io)``.

Shapes match the shared baseline harness so numbers compare: ``fanout_N`` is a root op, N
leaves and a collector (N + 2 steps; result 2N); ``chain_N`` is N ops in a line (result N).
``io`` is ``fs`` (a ``FilesystemIOManager``; its ``base_dir`` comes from run config) or ``s3``
(the S3 pickle IO manager of the defs-folder project in ``defs_project/``, configured by
environment). The same shapes defined the way the template defines code: ``defs_project/``.
``chaos_job`` is the chaos soak's mixed job (see below).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from functools import cache

from dagster import FilesystemIOManager, In, JobDefinition, RetryPolicy, graph, op, resource


@op
def root() -> int:
    return 1


@op
def leaf(x: int) -> int:
    return x + 1


@op(ins={"xs": In(list)})
def collect(xs: list) -> int:
    return sum(xs)


@op
def first() -> int:
    return 1


@op
def add_one(x: int) -> int:
    return x + 1


def _executor(name: str):
    if name == "taskiq":
        from dagster_taskiq import taskiq_executor

        return taskiq_executor
    from dagster import in_process_executor, multiprocess_executor

    return {"in_process": in_process_executor, "multiprocess": multiprocess_executor}[name]


def _io_manager(io: str):
    if io == "fs":
        return FilesystemIOManager()
    if io == "s3":
        from bench_defs_project.storage import s3_io_manager

        return s3_io_manager()
    raise ValueError(f"unknown io {io!r}: use fs or s3")


@cache
def make_job(shape: str, n: int, executor: str, io: str = "fs") -> JobDefinition:
    n = int(n)
    if shape == "fanout":

        @graph(name=f"fanout_{n}")
        def body():
            value = root()
            collect([leaf.alias(f"leaf_{i}")(value) for i in range(n)])

    elif shape == "chain":

        @graph(name=f"chain_{n}")
        def body():
            value = first.alias("add_0")()
            for i in range(1, n):
                value = add_one.alias(f"add_{i}")(value)

    else:
        raise ValueError(f"unknown shape {shape!r}: use fanout or chain")
    return body.to_job(executor_def=_executor(executor),
                       resource_defs={"io_manager": _io_manager(io)})


def expected(shape: str, n: int) -> tuple[str, int, int]:
    """(node to check, its value, number of steps)."""
    return ("collect", 2 * n, n + 2) if shape == "fanout" else (f"add_{n - 1}", n, n)


# The chaos soak's job (bench/chaos_soak.py): a head, CHAOS_FAN parallel steps, a gather, then
# a chain of CHAOS_TAIL steps; each sleeps its configured seconds and appends start, tick (every
# 0.25 s) and end lines to the soak's record file, so the driver sees every execution with its
# pid and a unique attempt id even when the step's process is killed mid-way.
CHAOS_FAN = 4
CHAOS_TAIL = 3
TICK_SECONDS = 0.25


@resource(config_schema={"path": str})
def soak_records(init_context) -> str:
    return init_context.resource_config["path"]


def _record(path: str, event: str, context, attempt: str) -> None:
    line = json.dumps({
        "event": event, "run_id": context.run_id, "step_key": str(context.op_handle),
        "attempt": attempt, "retry": context.retry_number, "pid": os.getpid(),
        "ppid": os.getppid(), "mono": time.monotonic(), "wall": time.time(),
    }) + "\n"
    # One write on an O_APPEND descriptor: lines from concurrent processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _timed_body(context, inputs: list[int]) -> int:
    path, attempt = context.resources.soak_records, uuid.uuid4().hex
    _record(path, "start", context, attempt)
    deadline = time.monotonic() + context.op_config["seconds"]
    pause = threading.Event()  # not time.sleep: it fails with EINVAL under faketime
    while (left := deadline - time.monotonic()) > 0:
        pause.wait(min(TICK_SECONDS, left))
        _record(path, "tick", context, attempt)
    _record(path, "end", context, attempt)
    return 1 + sum(inputs)


_TIMED = {"config_schema": {"seconds": float}, "required_resource_keys": {"soak_records"}}


@op(**_TIMED)
def timed_source(context) -> int:
    return _timed_body(context, [])


@op(**_TIMED)
def timed_step(context, x: int) -> int:
    return _timed_body(context, [x])


@op(ins={"xs": In(list)}, **_TIMED)
def timed_gather(context, xs: list) -> int:
    return _timed_body(context, xs)


def chaos_step_keys() -> list[str]:
    return ["head", *(f"fan_{i}" for i in range(CHAOS_FAN)), "gather",
            *(f"tail_{i}" for i in range(CHAOS_TAIL))]


@graph
def chaos():
    head = timed_source.alias("head")()
    value = timed_gather.alias("gather")(
        [timed_step.alias(f"fan_{i}")(head) for i in range(CHAOS_FAN)])
    for i in range(CHAOS_TAIL):
        value = timed_step.alias(f"tail_{i}")(value)


def _chaos_job() -> JobDefinition:
    from dagster_taskiq import taskiq_executor

    return chaos.to_job(
        name="chaos_job", executor_def=taskiq_executor,
        resource_defs={"io_manager": FilesystemIOManager(), "soak_records": soak_records},
        op_retry_policy=RetryPolicy(max_retries=2))


chaos_job = _chaos_job()
