"""Benchmark jobs, rebuilt by workers from a code pointer: ``make_job(shape, n, executor)``.

Shapes match the shared baseline harness so numbers compare: ``fanout_N`` is a root op, N
leaves and a collector (N + 2 steps; result 2N); ``chain_N`` is N ops in a line (result N).
"""

from __future__ import annotations

from functools import cache

from dagster import FilesystemIOManager, In, JobDefinition, graph, op


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


@cache
def make_job(shape: str, n: int, executor: str) -> JobDefinition:
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
                       resource_defs={"io_manager": FilesystemIOManager()})


def expected(shape: str, n: int) -> tuple[str, int, int]:
    """(node to check, its value, number of steps)."""
    return ("collect", 2 * n, n + 2) if shape == "fanout" else (f"add_{n - 1}", n, n)
