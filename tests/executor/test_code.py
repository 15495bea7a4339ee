"""The code a worker runs: loaded once per code version, never stale (real workers, real Redis).

The project here is a ``@dg.definitions`` function, as the template's ``load_from_defs_folder``
one is: Dagster rebuilds it every time a process needs a repository, which it counts."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository

from tests.executor.conftest import run_config

PROJECT = '''
import os
from pathlib import Path

import dagster as dg

from dagster_taskiq import taskiq_executor

VALUE = {value}


@dg.op
def one() -> int:
    return VALUE


@dg.op
def plus(x: int) -> int:
    return x + 1


@dg.job(executor_def=taskiq_executor)
def job_a():
    plus(one())


@dg.job(executor_def=taskiq_executor)
def job_b():
    plus(plus(one()))


@dg.asset
def first() -> int:
    return VALUE


@dg.asset
def second(first: int) -> int:
    return first + 1


@dg.op
def secret() -> str:
    return os.environ.get("DAGSTER_TASKIQ_TEST_SECRET", "not set")


@dg.job(executor_def=taskiq_executor)
def secret_job():
    secret()


assets_job = dg.define_asset_job("assets_job", executor_def=taskiq_executor)


@dg.definitions
def defs():
    with open(Path(__file__).with_suffix(".loads"), "a") as loads:
        loads.write(f"{{os.getpid()}}\\n")
    return dg.Definitions(jobs=[job_a, job_b, secret_job, assets_job], assets=[first, second],
                          resources={{"io_manager": dg.fs_io_manager}})
'''


def _write(path: Path, value: int) -> None:
    path.write_text(PROJECT.format(value=value))


def _loads_elsewhere(path: Path) -> list[str]:
    """The processes (other than this test's) that built the definitions, once per build."""
    loads = path.with_suffix(".loads")
    lines = loads.read_text().split() if loads.exists() else []
    return [pid for pid in lines if pid != str(os.getpid())]


def _run(recon_job: ReconstructableJob, instance: DagsterInstance, io_dir: Path,
         broker_url: str) -> int:
    """Run the job; its last op's output."""
    with execute_job(recon_job, instance=instance,
                     run_config=run_config(str(io_dir), broker_url)) as result:
        assert result.success
        return result.output_for_node("plus_2" if recon_job.job_name == "job_b" else "plus")


def test_definitions_are_built_once_per_worker_for_every_job_and_subset(
        tmp_path, instance, start_worker, broker_url):
    """Before, Dagster's one-entry caches rebuilt the project in most steps (alternating two
    jobs missed every time): here 4 runs of two jobs and a subset, 9 steps, build it once."""
    project = tmp_path / "project.py"
    _write(project, 1)
    start_worker()
    repository = ReconstructableRepository.for_file(str(project), "defs", str(tmp_path))
    job_a = ReconstructableJob(repository, "job_a")
    job_b = ReconstructableJob(repository, "job_b")
    for recon_job, expected in [(job_a, 2), (job_b, 3), (job_a, 2), (job_b, 3)]:
        assert _run(recon_job, instance, tmp_path / "io", broker_url) == expected
    with execute_job(job_b.get_subset(op_selection=["one"]), instance=instance,
                     run_config=run_config(str(tmp_path / "io"), broker_url)) as result:
        assert result.success and result.output_for_node("one") == 1
    assets_job = ReconstructableJob(repository, "assets_job")
    for selection in ({AssetKey("first")}, {AssetKey("first"), AssetKey("second")}):
        with execute_job(assets_job.get_subset(asset_selection=selection), instance=instance,
                         run_config=run_config(str(tmp_path / "io"), broker_url)) as result:
            assert result.success
            assert {e.asset_key for e in result.get_asset_materialization_events()} == selection
    assert len(_loads_elsewhere(project)) == 1, _loads_elsewhere(project)


def test_steps_get_the_env_vars_of_the_instances_secrets_loader(
        tmp_path, dagster_home, start_worker, broker_url, monkeypatch):
    """As Dagster's own step entry point does: the instance's secrets loader sets the step's
    env vars. Before, steps ran without them."""
    (dagster_home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nsecrets:\n  custom:\n"
        "    module: tests.executor.secrets_loader\n    class: StaticSecrets\n"
        "    config:\n      env:\n        DAGSTER_TASKIQ_TEST_SECRET: from-the-loader\n")
    monkeypatch.delenv("DAGSTER_TASKIQ_TEST_SECRET", raising=False)  # restored if set here
    project = tmp_path / "project.py"
    _write(project, 1)
    start_worker()
    recon_job = ReconstructableJob(
        ReconstructableRepository.for_file(str(project), "defs", str(tmp_path)), "secret_job")
    with DagsterInstance.get() as instance, execute_job(
            recon_job, instance=instance,
            run_config=run_config(str(tmp_path / "io"), broker_url)) as result:
        assert result.success
        assert result.output_for_node("secret") == "from-the-loader"


def test_an_edited_op_runs_its_new_code_at_the_next_launch(tmp_path, instance, start_worker,
                                                           broker_url):
    """Edit an op, launch: the new behaviour runs (before, the worker ran the old code until
    it was restarted)."""
    project = tmp_path / "project.py"
    _write(project, 1)
    worker = start_worker()
    recon_job = ReconstructableJob(
        ReconstructableRepository.for_file(str(project), "defs", str(tmp_path)), "job_a")
    assert _run(recon_job, instance, tmp_path / "io", broker_url) == 2
    time.sleep(0.05)  # a later mtime, whatever the file system's resolution
    _write(project, 41)
    assert _run(recon_job, instance, tmp_path / "io", broker_url) == 42
    assert "changed" in worker.output()
    assert len(_loads_elsewhere(project)) == 2  # the first zygote, then its replacement


def test_a_worker_with_other_code_reloads_once_then_says_so_on_the_run(
        tmp_path, instance, start_worker, broker_url, monkeypatch):
    """The orchestrator plans from one copy of the code, the worker has another (a deploy
    that reached one machine only): the worker reloads once, then runs what it has, and the
    run's event log says the code differs (before, it ran silently old)."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for folder, value in [(ours, 100), (theirs, 1)]:
        (folder / "skewed_project").mkdir(parents=True)
        (folder / "skewed_project" / "__init__.py").write_text("")
        _write(folder / "skewed_project" / "defs.py", value)
    worker = start_worker(pythonpath=[str(theirs)])
    # Not first: Dagster's module loader drops sys.path[0] (the script's folder).
    monkeypatch.setattr(sys, "path", [sys.path[0], str(ours), *sys.path[1:]])
    try:
        recon_job = ReconstructableJob(
            ReconstructableRepository.for_module("skewed_project.defs", "defs"), "job_a")
        assert _run(recon_job, instance, tmp_path / "io", broker_url) == 2  # theirs: 1 + 1
        assert _run(recon_job, instance, tmp_path / "io", broker_url) == 2
    finally:
        for name in [m for m in sys.modules if m.startswith("skewed_project")]:
            del sys.modules[name]
    log = worker.output()
    assert log.count("loading the code again") == 1, log
    warnings = [r.dagster_event.message for r in instance.all_logs(
        instance.get_runs(limit=1)[0].run_id) if r.dagster_event
        and "runs other code than the run was planned from" in (r.dagster_event.message or "")]
    assert warnings, "the run does not say its steps ran other code"


def test_botocore_answers_kept_by_the_zygote_are_the_same_answers():
    """What ``warm_libraries`` keeps across boto3 sessions are pure answers: event names
    translate as before (shared only between aliasers with the same table), and a handler
    without ``**kwargs`` is still refused, every time, while one whose code changes is asked
    again."""
    import boto3
    from botocore import hooks

    from dagster_taskiq.worker.code import warm_libraries

    warm_libraries()
    first, second = boto3.session.Session(), boto3.session.Session()
    assert first._session._events._alias_name_cache is second._session._events._alias_name_cache
    own = hooks.EventAliaser(hooks.HierarchicalEmitter(), {"api.sagemaker": "other"})
    assert own._alias_name_cache is not first._session._events._alias_name_cache
    assert own._alias_event_name("before-call.api.sagemaker.X") == "before-call.other.X"
    assert (first._session._events._alias_name_cache.get("before-call.api.sagemaker.X")
            != "before-call.other.X")
    seen = []
    session = first._session
    session.register("dt-check.api.sagemaker.Op", lambda **kwargs: seen.append(kwargs))
    session.emit("dt-check.sagemaker.Op", value=1)  # the alias reaches the same handler
    assert seen == [{"value": 1, "event_name": "dt-check.sagemaker.Op"}]

    def no_kwargs(value):
        return value

    for _ in range(2):
        with pytest.raises(ValueError, match="must accept keyword arguments"):
            session.register("before-call.s3", no_kwargs)
    no_kwargs.__code__ = (lambda value, **kwargs: value).__code__
    session.register("before-call.s3", no_kwargs)  # its new code takes **kwargs: accepted
