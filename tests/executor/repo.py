"""Jobs for the executor tests (the shapes dagster-celery's suite uses, written anew).

Workers rebuild these jobs from their code pointer (``ReconstructableJob.for_file``), so this
file must import without side effects.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from dagster import (
    EnvVar,
    Field,
    In,
    Int,
    Nothing,
    Out,
    Output,
    RetryPolicy,
    RetryRequested,
    graph,
    job,
    op,
)

from dagster_taskiq import taskiq_executor
from dagster_taskiq.tags import TASKIQ_PRIORITY_TAG, TASKIQ_QUEUE_TAG


@op
def simple() -> int:
    return 1


@op
def add_one(num: int) -> int:
    return num + 1


@op(out={"value_one": Out(int), "value_two": Out(int)})
def emit_values():
    yield Output(1, "value_one")
    yield Output(2, "value_two")


@op
def subtract(num_one: int, num_two: int) -> int:
    return num_one - num_two


@op(out={f"out_{i}": Out(Int, is_required=False) for i in (1, 2, 3)})
def maybe_outputs():
    yield Output(1, "out_1")


@op
def passthrough(value: int) -> int:
    return value


@op
def fails():
    raise Exception("argjhgjh")


@op
def should_never_execute(_value):
    raise AssertionError("this op runs only after a failed one")


@op
def retry_request():
    raise RetryRequested()


@op(config_schema=str)
def destroy(context, num: int) -> int:
    raise ValueError(f"destroyed {num} at {context.op_config}")


@op(tags={"dagster-k8s/resource_requirements": {"requests": {"cpu": "250m"}}})
def resource_req_op(context):
    context.log.info("running")


@op(config_schema={"seconds": Field(float, default_value=0.5)},
    ins={"start_after": In(Nothing)})
def sleep_op(context) -> bool:
    time.sleep(context.op_config["seconds"])
    return True


@op(tags={TASKIQ_QUEUE_TAG: "fooqueue"})
def fooqueue(context) -> bool:
    assert context.op.tags[TASKIQ_QUEUE_TAG] == "fooqueue"
    context.log.info("Executing on queue fooqueue")
    return True


@op(tags={"dagster-celery/queue": "fooqueue"})
def celery_tagged(context) -> bool:
    return True


@op
def report_pid() -> int:
    return os.getpid()


def _priority_op(name: str, priority: int):
    @op(name=name, tags={TASKIQ_PRIORITY_TAG: str(priority)})
    def _op(context) -> bool:
        assert context.op.tags[TASKIQ_PRIORITY_TAG] == str(priority)
        context.log.info(f"Executing with priority {priority}")
        return True

    return _op


PRIORITY_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven_", "eight",
                  "nine", "ten"]
priority_ops = [_priority_op(name, i) for i, name in enumerate(PRIORITY_NAMES)]


@op(tags={TASKIQ_PRIORITY_TAG: "high"})
def bad_priority_op() -> int:
    return 1


@job(executor_def=taskiq_executor)
def test_job():
    simple()


@job(executor_def=taskiq_executor)
def test_serial_job():
    add_one(simple())


@job(executor_def=taskiq_executor)
def test_diamond_job():
    value_one, value_two = emit_values()
    subtract(num_one=add_one(num=value_one), num_two=add_one.alias("renamed")(num=value_two))


@job(executor_def=taskiq_executor)
def test_parallel_job():
    value = simple()
    for i in range(10):
        add_one.alias(f"add_one_{i}")(value)


def _nesting_graph(depth: int, num_children: int, name: str = "start"):
    """A graph of ``num_children ** depth`` leaf ops, nested ``depth`` levels deep."""
    if depth == 0:
        return simple.alias(name)

    children = [_nesting_graph(depth - 1, num_children, f"{name}_{i}") for i in range(num_children)]

    @graph(name=name)
    def _nested():
        for child in children:
            child()

    return _nested


composite_job = _nesting_graph(2, 2).to_job(name="composite_job", executor_def=taskiq_executor)


@job(executor_def=taskiq_executor)
def test_optional_outputs():
    out_1, out_2, out_3 = maybe_outputs()
    passthrough.alias("first_consumer")(out_1)
    passthrough.alias("second_consumer")(out_2)
    passthrough.alias("third_consumer")(out_3)


@job(executor_def=taskiq_executor)
def test_fails():
    should_never_execute(fails())


@job(executor_def=taskiq_executor)
def test_retries():
    retry_request()


@job(executor_def=taskiq_executor)
def engine_error():
    a = simple()
    subtract(a, destroy(a))


@job(executor_def=taskiq_executor)
def test_resources_limit():
    resource_req_op()


@job(executor_def=taskiq_executor)
def simple_priority_job():
    for priority_op in priority_ops:
        priority_op()


@job(executor_def=taskiq_executor)
def low_job():
    for i in range(5):
        sleep_op.alias(f"low_{i}")()


@job(executor_def=taskiq_executor)
def hi_job():
    for i in range(5):
        sleep_op.alias(f"hi_{i}")()


@job(executor_def=taskiq_executor)
def interrupt_job():
    for i in range(20):
        sleep_op.alias(f"sleep_{i}")()


@job(executor_def=taskiq_executor)
def multiqueue_job():
    fooqueue()


@job(executor_def=taskiq_executor)
def celery_tag_job():
    celery_tagged()


@job(executor_def=taskiq_executor)
def bad_priority_job():
    bad_priority_op()


@job(executor_def=taskiq_executor)
def pid_job():
    add_one(simple())
    report_pid()


@job(executor_def=taskiq_executor)
def chain_job():
    value = simple()
    for i in range(5):
        value = add_one.alias(f"chain_{i}")(value)


def _s3_io_manager(s3_resource=None):
    from dagster_aws.s3 import S3PickleIOManager, S3Resource

    return S3PickleIOManager(
        s3_resource=s3_resource or S3Resource(endpoint_url=EnvVar("S3_ENDPOINT_URL")),
        s3_bucket=EnvVar("S3_BUCKET"),
        s3_prefix="taskiq-tests",
    )


@job(executor_def=taskiq_executor, resource_defs={"io_manager": _s3_io_manager()})
def s3_job():
    value_one, value_two = emit_values()
    subtract(add_one(value_one), add_one.alias("renamed")(value_two))


def _prebuilt_s3_resource():
    """dagster_taskiq.s3's resource, its client built once per zygote (see test_s3.py)."""
    from dagster_taskiq.s3 import S3Resource, prebuild

    resource = S3Resource(endpoint_url=EnvVar("S3_ENDPOINT_URL"), region_name="us-east-1")
    prebuild(resource)
    return resource


def _client_report(client) -> dict:
    return {"zygote": bool(getattr(client, "_dagster_taskiq_zygote", False)),
            "endpoint": client.meta.endpoint_url, "region": client.meta.region_name}


@op(required_resource_keys={"s3"})
def s3_client_origin(context) -> dict:
    """The step's first client (made when its ``s3`` resource is set up), used for a request.
    (Its IO manager, with the same config, builds another: one copy per process.)"""
    client = context.resources.s3
    client.list_objects_v2(Bucket=os.environ["S3_BUCKET"], MaxKeys=1)
    return {"first": _client_report(client), "pid": os.getpid()}


@op(required_resource_keys={"io_manager"})
def s3_client_downstream(context, report: dict) -> dict:
    """Loaded by the IO manager: the first client of this step (which does not use ``s3``)
    is the IO manager's, and the read worked."""
    return {**report, "loader": _client_report(
        context.resources.io_manager.inner_io_manager().s3), "loader_pid": os.getpid()}


@job(executor_def=taskiq_executor, resource_defs={
    "s3": _prebuilt_s3_resource(),
    "io_manager": _s3_io_manager(_prebuilt_s3_resource()),
})
def s3_prebuilt_job():
    s3_client_downstream(s3_client_origin())


@op
def crash_step():
    os._exit(3)


@job(executor_def=taskiq_executor)
def crash_step_job():
    crash_step()


@op(tags={TASKIQ_QUEUE_TAG: "nobody"})
def unserved(context) -> int:
    return 1


@job(executor_def=taskiq_executor)
def unserved_queue_job():
    unserved()


@job(executor_def=taskiq_executor)
def slow_chain_job():
    value = sleep_op.alias("slow_0")()
    for i in range(1, 3):
        value = sleep_op.alias(f"slow_{i}")(start_after=value)


@op
def chatty() -> int:
    """Writes to stdout and stderr, from Python and from a subprocess (fd level), and returns
    how many processes this step's process has started besides that one (capture helpers)."""
    import subprocess
    import sys

    import psutil

    for i in range(3):
        print(f"chatty-out-{i}", flush=True)
    sys.stderr.write("chatty-err-0\n")
    sys.stderr.flush()
    subprocess.run(["echo", "chatty-subprocess"], check=True)
    print("x" * 200_000)  # more than one pipe buffer and one read chunk
    helpers = len(psutil.Process().children(recursive=True))
    print("chatty-last", flush=True)
    return helpers


@job(executor_def=taskiq_executor)
def chatty_job():
    chatty()


@op(config_schema={"marker": str})
def materialize_then_wait(context) -> int:
    """Records an asset (Dagster's asset index), then waits while its marker file exists."""
    from dagster import AssetMaterialization

    context.log_event(AssetMaterialization(asset_key="live_asset"))
    marker = context.op_config["marker"]
    open(marker, "w").close()
    deadline = time.monotonic() + 30
    while os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return 1


@job(executor_def=taskiq_executor)
def live_events_job():
    add_one(materialize_then_wait())


@op
def first_pid() -> int:
    return os.getpid()


@op
def second_pid(first: int) -> list:
    return [first, os.getpid()]


@job(executor_def=taskiq_executor)
def pid_pair_job():
    second_pid(first_pid())


@op(retry_policy=RetryPolicy(max_retries=1))
def crash_first_attempt(context, first: int) -> list:
    """Ends its process on its first attempt (its pid kept in a file), succeeds on the next:
    returns the pids of the step before, of the crashed attempt and of this one."""
    marker = Path(context.instance.root_directory) / f"crashed-{context.run_id}"
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(3)
    return [first, int(marker.read_text()), os.getpid()]


@job(executor_def=taskiq_executor)
def crash_then_retry_job():
    crash_first_attempt(first_pid())


@job(executor_def=taskiq_executor)
def warm_then_slow_job():
    sleep_op.alias("slow_0")(start_after=first_pid())
