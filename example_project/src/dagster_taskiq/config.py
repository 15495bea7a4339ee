"""Defaults, task names and the broker settings shared by orchestrator, workers and CLI."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def _invalid_config(message: str, errors: list[Any], value: object) -> Exception:
    """Dagster's config error, imported only when there is one (commands that just talk to
    Redis never import Dagster)."""
    from dagster import DagsterInvalidConfigError

    return DagsterInvalidConfigError(message, errors, value)


BROKER_URL_ENV = "DAGSTER_TASKIQ_BROKER_URL"
DEFAULT_BROKER_URL = "redis://localhost:6379/0"
DEFAULT_QUEUE = "dagster"
DEFAULT_HEARTBEAT_TIMEOUT = 30.0
# Braces make it a Redis Cluster hash tag: every key under the prefix hashes to one slot, so
# each script's keys live on one node (multi-key scripts and transactions need that).
DEFAULT_KEY_PREFIX = "{dagster-taskiq}"

TASK_EXECUTE_PLAN = "execute_plan"
TASK_EXECUTE_JOB = "execute_job"
TASK_RESUME_JOB = "resume_job"

_REDIS_SCHEMES = ("redis", "rediss", "unix")


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: safe for logs, events and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def same_redis_database(first: str, second: str) -> bool:
    """Whether two Redis URLs name the same server and database (credentials aside)."""

    def where(url: str) -> tuple[str, str | None, int | None, str]:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return ("unix", None, None, parts.path)
        db = parts.path.strip("/") or "0"
        return (parts.scheme, parts.hostname, parts.port or 6379, db)

    return where(first) == where(second)


def validate_redis_url(url: str, what: str) -> str:
    """Raise a clear error unless ``url`` is a Redis URL we can connect to."""
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme not in _REDIS_SCHEMES:
        raise _invalid_config(
            f"Unsupported {what} URL {mask_url(url)!r}: dagster-taskiq needs a Redis URL "
            "(redis://[:password@]host[:port][/db], rediss:// for TLS, or unix:///path).",
            [],
            url,
        )
    return url


def has_hash_tag(prefix: str) -> bool:
    """Whether Redis Cluster hashes every key starting with ``prefix`` by a tag inside it: the
    text between the first ``{`` and the next ``}``, when not empty (Redis's own rule)."""
    start = prefix.find("{")
    end = prefix.find("}", start + 1) if start >= 0 else -1
    return end > start + 1


def cluster_key_prefix(prefix: str) -> str:
    """``prefix`` as a hash tag (``team-a`` -> ``{team-a}``) unless it already holds one."""
    return prefix if has_hash_tag(prefix) else "{" + prefix + "}"


def default_broker_url() -> str:
    return os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER_URL


@dataclass(frozen=True)
class BrokerSettings:
    """Where the queues and results live and how to talk to them.

    Built from the executor's (or launcher's, or worker YAML's) ``broker``, ``backend`` and
    ``config_source``; the fields below other than the URLs are the ``config_source`` keys.

    ``key_prefix`` starts every Redis key we use. It always carries a hash tag (``{...}``), so
    all of them map to one Redis Cluster slot: a prefix given without one is wrapped in braces
    (``team-a`` becomes ``{team-a}``); one that has one (``{team}-a``) is used as it is.
    """

    broker_url: str
    backend_url: str
    task_always_eager: bool = False
    key_prefix: str = DEFAULT_KEY_PREFIX
    # Well below a lease (30 s by default): a dead server is noticed while leases still hold.
    socket_timeout: float = 10.0
    socket_connect_timeout: float = 5.0
    connect_timeout: float = 5.0
    result_ttl_seconds: int = 7 * 24 * 3600
    max_connections: int = 64

    def __post_init__(self) -> None:
        # Frozen: set through object.__setattr__, once, before anyone reads it.
        object.__setattr__(self, "key_prefix", cluster_key_prefix(str(self.key_prefix)))

    @classmethod
    def from_config(
        cls,
        broker: str | None = None,
        backend: str | None = None,
        config_source: Mapping[str, Any] | None = None,
    ) -> BrokerSettings:
        broker_url = validate_redis_url(broker or default_broker_url(), "broker")
        backend_url = validate_redis_url(backend or broker_url, "backend")
        if not same_redis_database(broker_url, backend_url):
            # One reply path: a lost or revoked task's reply is written by the broker's own
            # scripts, atomically with the task's state, so results live beside the queues.
            raise _invalid_config(
                f"backend {mask_url(backend_url)!r} is not the broker's Redis database "
                f"({mask_url(broker_url)!r}): dagster-taskiq keeps results beside the queues, in "
                "the broker's database, so that a lost worker's reply is written together with "
                "its task's state. Drop `backend` (or set it to the broker's URL).",
                [],
                backend_url,
            )
        options = dict(config_source or {})
        known = {f.name for f in fields(cls)} - {"broker_url", "backend_url"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise _invalid_config(
                f"Unknown config_source key(s) {unknown} for the taskiq executor. "
                f"Supported keys: {sorted(known)}.",
                [],
                options,
            )
        if not str(options.get("key_prefix", DEFAULT_KEY_PREFIX)):
            raise _invalid_config("config_source.key_prefix must not be empty.", [], options)
        settings = cls(broker_url=broker_url, backend_url=backend_url, **options)
        for name in ("socket_timeout", "socket_connect_timeout", "connect_timeout"):
            if not float(getattr(settings, name)) > 0:
                raise _invalid_config(
                    f"config_source.{name} must be a positive number of seconds.", [], options
                )
        return settings
