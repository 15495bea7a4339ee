"""End-to-end fixtures: Postgres databases of our own, process-tree helpers, a dev stack.

Postgres runs on 127.0.0.1:5432 on these machines (trust auth); every test database and role is
created here with a random name and dropped afterwards.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_HOST = os.environ.get("E2E_POSTGRES_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("E2E_POSTGRES_PORT", "5432"))
PG_ADMIN = os.environ.get("E2E_POSTGRES_USER", "postgres")


@dataclass
class Database:
    name: str
    user: str
    password: str

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{PG_HOST}:{PG_PORT}/{self.name}"


def _admin():
    import psycopg2

    connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_ADMIN, dbname="postgres",
                                  connect_timeout=5)
    connection.autocommit = True
    return connection


@pytest.fixture(scope="module")
def postgres_db() -> Iterator[Database]:
    """A fresh database owned by a fresh role (both dropped at the end)."""
    import psycopg2

    try:
        admin = _admin()
    except psycopg2.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT}: {exc}")
    suffix = secrets.token_hex(4)
    db = Database(f"dt_e2e_{suffix}", f"dt_e2e_{suffix}", secrets.token_hex(8))
    with admin.cursor() as cur:
        cur.execute(f"CREATE ROLE {db.user} LOGIN PASSWORD %s", (db.password,))
        cur.execute(f"CREATE DATABASE {db.name} OWNER {db.user}")
    try:
        yield db
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE)")
            cur.execute(f"DROP ROLE IF EXISTS {db.user}")
        admin.close()


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc: children of children...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
