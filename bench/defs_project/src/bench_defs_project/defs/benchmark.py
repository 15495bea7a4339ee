"""The benchmark's jobs: the shapes of bench/bench_jobs.py, with the same node names and results.

``fanout_N``: a root step, N leaves and a collector (N + 2 steps; the collector returns 2N).
``chain_N``: N steps in a line (``add_0`` .. ``add_{N-1}``; the last returns N).

Each job exists twice: ``<name>`` runs on the project's default executor (taskiq, set in
resources.py) and ``<name>_in_process`` on Dagster's in_process executor, the floor the harness
compares against; both use the project's S3 IO manager. Which jobs exist: ``$BENCH_DEFS_JOBS``
(comma-separated names, set by the harness for the orchestrator and the workers alike), else
``DEFAULT_JOBS``.
"""

from __future__ import annotations

import os
from functools import cache

import dagster as dg

DEFAULT_JOBS = "fanout_1,fanout_10,fanout_50,chain_10"
IN_PROCESS_SUFFIX = "_in_process"


@dg.op
def root() -> int:
    return 1


@dg.op
def leaf(x: int) -> int:
    return x + 1


@dg.op(ins={"xs": dg.In(list)})
def collect(xs: list) -> int:
    return sum(xs)


@dg.op
def first() -> int:
    return 1


@dg.op
def add_one(x: int) -> int:
    return x + 1


@cache
def bench_job(name: str) -> dg.JobDefinition:
    """``fanout_N`` / ``chain_N``, or either with the in_process suffix (built once a process)."""
    in_process = name.endswith(IN_PROCESS_SUFFIX)
    shape, n = name.removesuffix(IN_PROCESS_SUFFIX).rsplit("_", 1)
    size = int(n)
    executor = dg.in_process_executor if in_process else None  # None: the project's default

    if shape == "fanout":

        @dg.job(name=name, executor_def=executor, tags={"bench/shape": shape})
        def fanout() -> None:
            value = root()
            collect([leaf.alias(f"leaf_{i}")(value) for i in range(size)])

        return fanout
    if shape == "chain":

        @dg.job(name=name, executor_def=executor, tags={"bench/shape": shape})
        def chain() -> None:
            value = first.alias("add_0")()
            for i in range(1, size):
                value = add_one.alias(f"add_{i}")(value)

        return chain
    raise ValueError(f"unknown benchmark job {name!r}: use fanout_N or chain_N")


def job_names() -> list[str]:
    names = os.environ.get("BENCH_DEFS_JOBS") or DEFAULT_JOBS
    return [n.strip() for n in names.split(",") if n.strip()]


@dg.definitions
def benchmark_jobs() -> dg.Definitions:
    jobs = [bench_job(name + suffix) for name in job_names() for suffix in ("", IN_PROCESS_SUFFIX)]
    return dg.Definitions(jobs=jobs)
