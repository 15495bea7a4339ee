"""What a worker keeps between tasks: runs, their resolved config, their opened event logs."""

from __future__ import annotations

from dagster import DagsterInstance
from dagster._core.definitions.reconstruct import ReconstructableJob

from dagster_taskiq.worker.steps import _Loaded as _LoadedCode
from tests.executor.conftest import REPO_FILE


def test_a_run_is_read_once_and_its_sqlite_log_is_taken_as_ready(instance, monkeypatch):
    recon_job = ReconstructableJob.for_file(REPO_FILE, "test_serial_job")
    run = instance.create_run_for_job(recon_job.get_definition(), run_config={})
    instance.report_engine_event("the orchestrator writes first", run)  # creates the shard

    worker_instance = DagsterInstance.from_ref(instance.get_ref())
    storage = worker_instance.event_log_storage

    def no_schema_check(*args, **kwargs):
        raise AssertionError("the run's database was checked again")

    monkeypatch.setattr(storage, "_initdb", no_schema_check)
    loaded = _LoadedCode()
    cached_run, config = loaded.run(worker_instance, run.run_id, recon_job)
    assert cached_run.run_id == run.run_id
    assert set(config.ops) == {"simple", "add_one"}
    assert loaded.run(worker_instance, run.run_id, recon_job)[0] is cached_run
    worker_instance.report_engine_event("a step writes next", run)
    assert [e.dagster_event.message for e in instance.all_logs(run.run_id)] == [
        "the orchestrator writes first", "a step writes next"]


def test_a_run_without_a_log_yet_is_opened_the_normal_way(instance):
    recon_job = ReconstructableJob.for_file(REPO_FILE, "test_serial_job")
    run = instance.create_run_for_job(recon_job.get_definition(), run_config={})
    worker_instance = DagsterInstance.from_ref(instance.get_ref())
    _LoadedCode().run(worker_instance, run.run_id, recon_job)  # creates and stamps the shard
    worker_instance.report_engine_event("first", run)
    assert [e.dagster_event.message for e in instance.all_logs(run.run_id)] == ["first"]
