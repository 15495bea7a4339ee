"""Cheaper event writes for the zygote and the tasks forked from it.

Dagster's storages open a connection for every event a step writes (a trivial step writes about
a dozen). Its sqlite storages also build a new SQLAlchemy engine for each one, compiling the
INSERT again (~4 of the ~5 ms an event costs); its PostgreSQL storage makes a new server
connection each time. Here:

- each sqlite database gets one engine, made in the zygote, with ``NullPool`` as Dagster's: no
  connection is kept, so none crosses a fork, while the engine's compiled statements reach
  every child warm;
- a forked task holds one connection per database (sqlite file, or the PostgreSQL event log)
  from its first event until its reply is sent (:func:`release_connections`), or, in a child
  that serves several steps of one run, until that child ends; opening one, and
  for sqlite closing the last one of a WAL database (a checkpoint), cost more than the write.
  One left idle for ``IDLE_SECONDS`` (a long step) is replaced before its next use;
- a run's orchestrator does the same while it orchestrates (:func:`orchestrating`): it writes
  an event before it submits each step, on the critical path of every chain of steps.

Connections are held only by the thread that writes a task's or an orchestrator's events (the
main thread of a forked task, the orchestrating thread); any other thread connects as Dagster
does. Each event is still its own committed write, so the UI sees a step's events as they
happen, and the zygote itself never holds a connection. Only Dagster's own sqlite and
PostgreSQL storages are touched, when they have the attributes used here; any other storage is
left as it is.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy
from dagster import DagsterInstance
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

MAX_ENGINES = 256  # one per run's event-log database; the oldest go
BUSY_TIMEOUT_SECONDS = 30  # Dagster's own wait on a locked sqlite database
IDLE_SECONDS = 10.0  # a held connection unused for longer is replaced before its next use

# Statuses after which Dagster's own step entry point no longer runs a step of the run.
ENDED_RUN_STATUSES = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE,
                      DagsterRunStatus.CANCELED, DagsterRunStatus.CANCELING)
# The same question as ``get_run_ids(RunsFilter(run_ids=..., statuses=...))``, without building
# Dagster's general runs query each time (several ms); Dagster's sqlite runs table.
_ENDED_SQL = sqlalchemy.text(
    "SELECT 1 FROM runs WHERE run_id = :run_id AND status IN ("
    + ", ".join(f"'{status.value}'" for status in ENDED_RUN_STATUSES) + ") LIMIT 1")


class _Connections:
    """sqlite engines by URL, and the connections each holding thread holds."""

    def __init__(self) -> None:
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._zygote = os.getpid()  # this module is imported by the zygote
        self._engines_lock = threading.Lock()
        self._local = threading.local()

    def engine(self, url: str) -> Engine:
        with self._engines_lock:
            engine = self._engines.get(url)
            if engine is None:
                engine = sqlalchemy.create_engine(
                    url, poolclass=NullPool, connect_args={"timeout": BUSY_TIMEOUT_SECONDS})
                self._engines[url] = engine
                if len(self._engines) > MAX_ENGINES:
                    self._engines.popitem(last=False)[1].dispose()
            self._engines.move_to_end(url)
            return engine

    def _state(self) -> Any:
        """This thread's held connections (new in a new thread, and after a fork)."""
        state = self._local
        if getattr(state, "pid", None) != os.getpid():
            state.pid, state.orchestrating = os.getpid(), 0
            state.held, state.busy, state.used = {}, set(), {}
        return state

    @property
    def may_hold(self) -> bool:
        """Only the main thread of a forked task, or an orchestrating thread: nothing open may
        cross a fork (the zygote), nor be shared between threads."""
        if self._state().orchestrating:
            return True
        return os.getpid() != self._zygote and threading.current_thread() is threading.main_thread()

    @contextmanager
    def orchestrating(self) -> Iterator[None]:
        state = self._state()
        state.orchestrating += 1
        try:
            yield
        finally:
            state.orchestrating -= 1
            if not state.orchestrating:
                self.release()

    @contextmanager
    def held(self, key: str, connect: Callable[[], Connection]) -> Iterator[Connection]:
        """This thread's connection for ``key`` (made by ``connect`` the first time); one that
        failed mid-use is closed, and the next use makes another. A use nested in another
        (Dagster's PostgreSQL storage opens its index connection while the run's is open) gets
        a connection of its own, as Dagster would give it."""
        state = self._state()
        if key in state.busy:
            with connect() as conn:
                yield conn
            return
        conn = state.held.get(key)
        now = time.monotonic()
        if conn is not None and now - state.used.get(key, now) > IDLE_SECONDS:
            # Idle for long (a long step between its events): servers and proxies drop idle
            # connections, so take a fresh one as Dagster would.
            state.held.pop(key, None)
            with contextlib.suppress(Exception):
                conn.close()
            conn = None
        if conn is None or conn.closed or conn.invalidated:
            conn = state.held[key] = connect()
        state.busy.add(key)
        try:
            yield conn
        except BaseException:
            state.held.pop(key, None)
            with contextlib.suppress(Exception):
                conn.close()
            raise
        finally:
            state.busy.discard(key)
            state.used[key] = time.monotonic()

    def release(self) -> None:
        state = self._state()
        held, state.held = state.held, {}
        for conn in held.values():
            with contextlib.suppress(Exception):
                conn.close()


_CONNECTIONS = _Connections()


def release_connections() -> None:
    """Close what this thread holds (a task has sent its reply)."""
    _CONNECTIONS.release()


@contextmanager
def orchestrating(instance: DagsterInstance) -> Iterator[None]:
    """While a run is orchestrated on this thread: share ``instance``'s connections and hold
    them (see the module docstring); closed when it is done."""
    share_connections(instance)
    with _CONNECTIONS.orchestrating():
        yield


def _sqlite_storages(instance: DagsterInstance) -> tuple[Any, Any] | None:
    """The instance's event-log and run storages when both are Dagster's sqlite ones."""
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
    from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage

    events, runs = instance.event_log_storage, instance.run_storage
    if (type(events) is SqliteEventLogStorage and type(runs) is SqliteRunStorage
            and all(hasattr(events, name) for name in
                    ("_db_lock", "_initialized_dbs", "_initdb", "conn_string_for_shard"))
            and isinstance(getattr(runs, "_conn_string", None), str)):
        return events, runs
    return None


def _postgres_event_log(instance: DagsterInstance) -> Any | None:
    try:
        from dagster_postgres.event_log.event_log import PostgresEventLogStorage
    except ImportError:
        return None
    events = instance.event_log_storage
    if type(events) is PostgresEventLogStorage and isinstance(getattr(events, "_engine", None),
                                                               Engine):
        return events
    return None


def run_has_ended(instance: DagsterInstance, run_id: str) -> bool:
    """Whether the run is finished or canceling (asked of the storage, now)."""
    storages = _sqlite_storages(instance)
    if storages is not None:
        with _CONNECTIONS.engine(storages[1]._conn_string).connect() as conn:
            return conn.execute(_ENDED_SQL, {"run_id": run_id}).first() is not None
    return bool(instance.get_run_ids(
        RunsFilter(run_ids=[run_id], statuses=list(ENDED_RUN_STATUSES)), limit=1))


def share_connections(instance: DagsterInstance) -> str | None:
    """Make ``instance``'s event writes cheaper as described above; returns which storage it
    did that for (``"sqlite"``, ``"postgres"``), or None."""
    storages = _sqlite_storages(instance)
    if storages is not None:
        if not getattr(storages[0], _SHARED, False):
            _share_sqlite(*storages)
        return "sqlite"
    events = _postgres_event_log(instance)
    if events is not None:
        if not getattr(events, _SHARED, False):
            _share_postgres(events)
        return "postgres"
    return None


_SHARED = "_dagster_taskiq_shared"  # set on a storage whose connections are shared


@contextmanager
def _sqlite_transaction(url: str, engine: Engine) -> Iterator[Connection]:
    """A transaction on this thread's held connection to ``url`` where it may hold one, else
    on a connection of its own (as Dagster's sqlite storages do)."""
    if not _CONNECTIONS.may_hold:
        with engine.connect() as conn, conn.begin():
            yield conn
        return
    with _CONNECTIONS.held(url, engine.connect) as conn, conn.begin():
        yield conn


def _share_sqlite(events: Any, runs: Any) -> None:
    @contextmanager
    def event_connection(shard: str) -> Iterator[Connection]:
        # Dagster's _connect, with the engine kept (and, in a task, the connection).
        with events._db_lock:
            url = events.conn_string_for_shard(shard)
            engine = _CONNECTIONS.engine(url)
            if shard not in events._initialized_dbs:
                events._initdb(engine)
                events._initialized_dbs.add(shard)
            with _sqlite_transaction(url, engine) as conn:
                yield conn

    @contextmanager
    def run_connection() -> Iterator[Connection]:
        url = runs._conn_string
        with _sqlite_transaction(url, _CONNECTIONS.engine(url)) as conn:
            yield conn

    events._connect = event_connection
    runs.connect = run_connection
    setattr(events, _SHARED, True)


def _share_postgres(events: Any) -> None:
    from dagster_postgres.utils import retry_pg_connection_fn

    original = events._connect
    engine: Engine = events._engine
    key = f"postgres:{id(events)}"

    @contextmanager
    def event_connection() -> Iterator[Connection]:
        if not _CONNECTIONS.may_hold:
            with original() as conn:
                yield conn
            return
        with _CONNECTIONS.held(key, lambda: retry_pg_connection_fn(engine.connect)) as conn:
            yield conn
            # Leave it as Dagster's fresh connections are: autocommit, no transaction begun
            # (SQLAlchemy begins one on first use even in autocommit, and a later begin()
            # would refuse it). Rolling back is what closing it would do.
            if conn.in_transaction():
                conn.rollback()
            if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
                conn.execution_options(isolation_level="AUTOCOMMIT")

    events._connect = event_connection
    setattr(events, _SHARED, True)
