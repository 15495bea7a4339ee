"""A step's process holds its database connections between events (connections.py), yet
each event is committed as it happens: another process sees it while the step still runs, and
asset records (Dagster's index, written in a transaction of their own on PostgreSQL) are kept.
On Dagster's sqlite storage (the default instance) and on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import AssetKey, DagsterEventType, DagsterInstance

from tests.conftest import wait_for
from tests.e2e.conftest import Database, postgres_db  # noqa: F401 (a fixture)
from tests.executor.conftest import execute_test_job, run_config


def _event_types(instance: DagsterInstance, run_id: str, step_key: str) -> list[str]:
    return [entry.dagster_event.event_type_value for entry in instance.all_logs(run_id)
            if entry.is_dagster_event and entry.step_key == step_key]


def _check_live_events(instance: DagsterInstance, start_worker, io_dir: str, tmp_path: Path,
                       broker_url: str) -> None:
    import threading

    marker = tmp_path / "waiting"
    start_worker()
    config = run_config(io_dir, broker_url)
    config["ops"] = {"materialize_then_wait": {"config": {"marker": str(marker)}}}
    seen: dict[str, list[str]] = {}

    def watch() -> None:
        # Another process's view (a fresh instance, as the UI has) while the step waits.
        try:
            wait_for(marker.exists, 60, "the step to start waiting")
            with DagsterInstance.get() as viewer:
                [run] = viewer.get_runs(limit=1)
                seen["while_running"] = _event_types(viewer, run.run_id,
                                                     "materialize_then_wait")
        finally:
            marker.unlink(missing_ok=True)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with execute_test_job("live_events_job", instance, config) as result:
        watcher.join(60)
        assert result.success
        run_id = result.run_id
    during = seen["while_running"]
    assert "STEP_START" in during and "ASSET_MATERIALIZATION" in during, during
    assert "STEP_SUCCESS" not in during, during
    # After the index transaction the same held connection still writes, and commits.
    after = _event_types(instance, run_id, "add_one")
    assert "STEP_START" in after and after[-1] == "STEP_SUCCESS", after
    latest = instance.get_latest_materialization_event(AssetKey("live_asset"))
    assert latest is not None and latest.run_id == run_id
    # Nothing stays half-written: the run's own record of the step is complete.
    assert _event_types(instance, run_id, "materialize_then_wait")[-1] == "STEP_SUCCESS"
    records = instance.get_records_for_run(
        run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION).records
    assert len(records) == 1


def test_events_of_a_running_step_are_committed_on_sqlite(instance, start_worker, io_dir,
                                                         tmp_path, broker_url):
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

    assert isinstance(instance.event_log_storage, SqliteEventLogStorage)
    _check_live_events(instance, start_worker, io_dir, tmp_path, broker_url)


@pytest.fixture
def postgres_instance(dagster_home: Path, postgres_db: Database):  # noqa: F811
    url = postgres_db.url.replace("postgresql://", "postgresql+psycopg2://", 1)
    (dagster_home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\n"
        f"storage:\n  postgres:\n    postgres_url: \"{url}\"\n")
    with DagsterInstance.get() as instance:
        yield instance


def test_events_of_a_running_step_are_committed_on_postgres(postgres_instance, start_worker,
                                                           io_dir, tmp_path, broker_url):
    from dagster_postgres import PostgresEventLogStorage

    assert isinstance(postgres_instance.event_log_storage, PostgresEventLogStorage)
    _check_live_events(postgres_instance, start_worker, io_dir, tmp_path, broker_url)


def test_a_held_connection_is_reused_replaced_when_idle_and_never_nested(tmp_path, monkeypatch):
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    from dagster_taskiq import connections as storage

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'held.db'}", poolclass=NullPool)
    connections = storage._Connections()
    with connections.held("db", engine.connect) as first:
        first.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        first.commit()
        with connections.held("db", engine.connect) as nested:  # Dagster nests some uses
            assert nested is not first
        assert nested.closed and not first.closed
    with connections.held("db", engine.connect) as again:
        assert again is first
    monkeypatch.setattr(storage, "IDLE_SECONDS", 0.0)
    with connections.held("db", engine.connect) as fresh:
        assert fresh is not first and first.closed
    connections.release()
    assert fresh.closed


def test_an_orchestrator_holds_its_connections_on_its_own_thread_while_it_orchestrates(
        tmp_path: Path):
    """The orchestrator writes an event before each submit: on its thread, while it
    orchestrates, the run's event log connection is kept from one event to the next (opening
    and, on sqlite, closing the last one of a WAL database cost more than the write); other
    threads of the process connect as Dagster does, and nothing stays open afterwards."""
    import threading

    from dagster._core.test_utils import instance_for_test

    from dagster_taskiq import connections

    with instance_for_test(temp_dir=str(tmp_path)) as instance:
        events = instance.event_log_storage
        with connections.orchestrating(instance):
            with events.run_connection("run-1") as first:
                pass
            with events.run_connection("run-1") as second:
                pass
            elsewhere: list[bool] = []
            thread = threading.Thread(
                target=lambda: elsewhere.append(connections._CONNECTIONS.may_hold))
            thread.start()
            thread.join(10)
            assert second is first and not first.closed
            assert elsewhere == [False]
        assert first.closed
        with events.run_connection("run-1") as after:  # as Dagster: its own, closed after
            pass
        assert after is not first and after.closed
