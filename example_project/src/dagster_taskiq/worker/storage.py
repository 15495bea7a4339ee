"""One SQLAlchemy engine per sqlite database for the zygote and every task forked from it.

Dagster's sqlite run and event-log storages create a new engine for every connection: each
event a step writes pays for building an engine and compiling its INSERT again (~4 of the ~5 ms
an event costs; a trivial step writes about a dozen). Here each database gets one engine, made in
the zygote, with ``NullPool`` as Dagster's: no connection is ever kept, so none crosses a fork,
while the engine's compiled-statement cache does, warm, into every child. Each event is still
its own committed transaction: the UI sees a step's events as they happen.

Only Dagster's own sqlite storages are touched, and only when they look as this was written
for; anything else (PostgreSQL, a custom storage, another Dagster) is left as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy
from dagster import DagsterInstance
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

logger = logging.getLogger("dagster_taskiq.worker")

MAX_ENGINES = 256  # one per run's event-log database; the oldest go
BUSY_TIMEOUT_SECONDS = 30  # Dagster's own wait on a locked sqlite database


class _Databases:
    """An engine per database URL, and in a forked task one connection per database, held
    between its transactions (opening one, and closing the last one of a WAL database, which
    checkpoints it, cost more than the write itself)."""

    def __init__(self) -> None:
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._zygote = os.getpid()
        self._held: dict[str, Connection] = {}
        self._held_by = self._zygote

    def _engine(self, url: str) -> Engine:
        engine = self._engines.get(url)
        if engine is None:
            engine = sqlalchemy.create_engine(
                url, poolclass=NullPool, connect_args={"timeout": BUSY_TIMEOUT_SECONDS})
            self._engines[url] = engine
            if len(self._engines) > MAX_ENGINES:
                self._engines.popitem(last=False)[1].dispose()
        self._engines.move_to_end(url)
        return engine

    @contextmanager
    def transaction(self, url: str, hold: bool = True) -> Iterator[Connection]:
        engine = self._engine(url)
        if not hold or os.getpid() == self._zygote:  # nothing open may cross a fork
            with engine.connect() as conn, conn.begin():
                yield conn
            return
        if self._held_by != os.getpid():  # a process forked by the task: its own connections
            self._held, self._held_by = {}, os.getpid()
        conn = self._held.get(url)
        if conn is None or conn.closed or conn.invalidated:
            conn = self._held[url] = engine.connect()
        try:
            with conn.begin():
                yield conn
        except BaseException:
            self._held.pop(url, None)
            with contextlib.suppress(Exception):
                conn.close()
            raise

    def release(self) -> None:
        """Close what this process holds (a task ends)."""
        held, self._held = self._held, {}
        if self._held_by == os.getpid():
            for conn in held.values():
                with contextlib.suppress(Exception):
                    conn.close()


_DATABASES = _Databases()


def release_connections() -> None:
    _DATABASES.release()


# Statuses after which Dagster's own step entry point no longer runs a step of the run.
ENDED_RUN_STATUSES = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE,
                      DagsterRunStatus.CANCELED, DagsterRunStatus.CANCELING)
# The same question as ``get_run_ids(RunsFilter(run_ids=..., statuses=...))``, without building
# Dagster's general runs query each time (several ms); Dagster's sqlite runs table.
_ENDED_SQL = sqlalchemy.text(
    "SELECT 1 FROM runs WHERE run_id = :run_id AND status IN ("
    + ", ".join(f"'{status.value}'" for status in ENDED_RUN_STATUSES) + ") LIMIT 1")


def _sqlite_storages(instance: DagsterInstance) -> tuple[Any, Any] | None:
    """The instance's event-log and run storages when both are Dagster's sqlite ones, with the
    attributes used here."""
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
    from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage

    events, runs = instance.event_log_storage, instance.run_storage
    if (type(events) is SqliteEventLogStorage and type(runs) is SqliteRunStorage
            and all(hasattr(events, name) for name in
                    ("_db_lock", "_initialized_dbs", "_initdb", "conn_string_for_shard"))
            and isinstance(getattr(runs, "_conn_string", None), str)):
        return events, runs
    return None


def run_has_ended(instance: DagsterInstance, run_id: str) -> bool:
    """Whether the run is finished or canceling (asked of the storage, now)."""
    storages = _sqlite_storages(instance)
    if storages is not None:
        with _DATABASES.transaction(storages[1]._conn_string, hold=False) as conn:
            return conn.execute(_ENDED_SQL, {"run_id": run_id}).first() is not None
    return bool(instance.get_run_ids(
        RunsFilter(run_ids=[run_id], statuses=list(ENDED_RUN_STATUSES)), limit=1))


def share_engines(instance: DagsterInstance) -> bool:
    """Give ``instance``'s sqlite run and event-log storages one engine per database; returns
    whether it did."""
    storages = _sqlite_storages(instance)
    if storages is None:
        return False
    events, runs = storages
    @contextmanager
    def event_connection(shard: str) -> Iterator[Connection]:
        # As Dagster's _connect, with the engine kept.
        with events._db_lock:
            url = events.conn_string_for_shard(shard)
            if shard not in events._initialized_dbs:
                events._initdb(_DATABASES._engine(url))
                events._initialized_dbs.add(shard)
            with _DATABASES.transaction(url) as conn:
                yield conn

    @contextmanager
    def run_connection() -> Iterator[Connection]:
        with _DATABASES.transaction(runs._conn_string, hold=False) as conn:
            yield conn

    events._connect = event_connection
    runs.connect = run_connection
    return True
