"""Defaults, task names and the broker settings shared by orchestrator, workers and CLI."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit


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
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
_SENTINEL_PORT, _REDIS_PORT = 26379, 6379
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
URL_FORMS = ("redis://[[user]:password@]host[:port][/db], rediss:// for TLS, unix:///path, "
             "redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]"
             "[?sentinel_password=...] (Sentinel; default port 26379) or "
             "redis+cluster://[[user]:password@]host[:port][,host[:port]...] (Redis Cluster); "
             "rediss+sentinel:// and rediss+cluster:// for TLS")


@dataclass(frozen=True)
class RedisTarget:
    """What a broker URL names: one server (``url`` as redis-py reads it), the primary a set of
    Sentinels elects for ``service``, or a Redis Cluster reached through any of ``nodes``."""

    kind: str  # "server", "sentinel" or "cluster"
    url: str = field(repr=False)  # kept out of reprs (and so tracebacks): it may hold passwords
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    def where(self) -> tuple[Any, ...]:
        """Which data it names, credentials aside (see ``same_redis_database``)."""
        if self.kind == "server":
            parts = urlsplit(self.url)
            if parts.scheme == "unix":
                return ("unix", parts.path)
            db = parts.path.strip("/") or "0"
            return (parts.scheme, parts.hostname, parts.port or _REDIS_PORT, db)
        return (self.kind, frozenset(self.nodes), self.service, self.db)


def _split_url(url: str) -> tuple[str, str, str, str]:
    """(scheme, netloc, path, query) without urlsplit's port parsing, which a comma-separated
    host list would break."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", url, ""
    rest, _, query = rest.partition("?")
    rest = rest.partition("#")[0]
    netloc, slash, path = rest.partition("/")
    return scheme.lower(), netloc, slash + path, query


def _nodes(hosts: str, default_port: int) -> tuple[tuple[str, int], ...]:
    nodes = []
    for item in hosts.split(","):
        match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(?::(\d+))?", item.strip())
        if match is None:
            raise ValueError(f"bad host {item!r} (expected host[:port])")
        port = int(match.group(2) or default_port)
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        nodes.append((match.group(1).strip("[]"), port))
    return tuple(nodes)


def parse_redis_url(url: str) -> RedisTarget:
    """Read a broker URL (any of ``URL_FORMS``); ``ValueError`` saying what is wrong (never
    quoting the URL, which may hold a password) if it is not one."""
    scheme, netloc, path, query = _split_url(url)
    if scheme in _REDIS_SCHEMES:
        return RedisTarget("server", url)
    if scheme not in SENTINEL_SCHEMES + CLUSTER_SCHEMES:
        raise ValueError("not a Redis URL")
    sentinel = scheme in SENTINEL_SCHEMES
    userinfo, _, hosts = netloc.rpartition("@")
    username, has_password, password = userinfo.partition(":")
    if not hosts:
        raise ValueError("no host")
    nodes = _nodes(hosts, _SENTINEL_PORT if sentinel else _REDIS_PORT)
    segments = [unquote(s) for s in path.strip("/").split("/") if s]
    options = dict(parse_qsl(query, keep_blank_values=True))
    allowed = _SENTINEL_OPTIONS if sentinel else ()
    if unknown := sorted(set(options) - set(allowed)):
        raise ValueError(f"unknown option(s) {unknown}"
                         + (f" (allowed: {list(allowed)})" if allowed else ""))
    if sentinel:
        if not segments or len(segments) > 2:
            raise ValueError("a Sentinel URL must end with /<service name>[/<db>], the "
                             "name the Sentinels monitor the primary by (e.g. mymaster)")
        service, db = segments[0], segments[1] if len(segments) == 2 else "0"
    else:
        service, db = "", segments[0] if len(segments) == 1 else "0"
        if len(segments) > 1 or db != "0":
            raise ValueError("Redis Cluster has only database 0")
    if not db.isdigit():
        raise ValueError(f"bad database number {db!r}")
    return RedisTarget(
        "sentinel" if sentinel else "cluster", url, nodes, service, int(db),
        unquote(username) or None, unquote(password) if has_password else None,
        scheme.startswith("rediss"),
        options.get("sentinel_username") or None, options.get("sentinel_password") or None,
    )


def mask_url(url: str) -> str:
    """``url`` with its passwords (in the user info, or a ``*password`` query option) replaced
    by ``***``: safe for logs, events and errors."""
    scheme, netloc, path, query = _split_url(url)
    if not scheme:
        return url
    userinfo, _, hosts = netloc.rpartition("@")
    username, has_password, _ = userinfo.partition(":")
    if has_password:
        netloc = f"{username}:***@{hosts}"
    options = parse_qsl(query, keep_blank_values=True)
    if any(k.endswith("password") for k, _ in options):
        query = urlencode([(k, "***" if k.endswith("password") else v) for k, v in options],
                          safe="*")
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")


def same_redis_database(first: str, second: str) -> bool:
    """Whether two Redis URLs name the same server (or Sentinel service, or Cluster) and
    database, credentials aside."""
    return parse_redis_url(first).where() == parse_redis_url(second).where()


def validate_redis_url(url: str, what: str) -> str:
    """Raise a clear error unless ``url`` is a Redis URL we can connect to."""
    try:
        parse_redis_url(url)
    except ValueError as exc:
        raise _invalid_config(
            f"Unsupported {what} URL {mask_url(url)!r}: {exc}. dagster-taskiq needs a Redis "
            f"URL: {URL_FORMS}.",
            [],
            url,
        ) from None
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


# Celery/kombu settings a dagster-celery project may carry over in ``config_source``, each with
# what to do instead. The one table: BrokerSettings.from_config reads it, so the executor, the
# launcher and the CLI give the same explanation (README's migration table mirrors it).
_LEASES = ("a step whose worker stops heartbeating for the executor's worker_heartbeat_timeout "
           "(default 30 s) goes back to its queue, however long it runs")
_RETRIES = "drop it: connections retry with backoff through Redis outages of up to 5 minutes"
_JSON = "drop it: messages are always JSON (Dagster serdes), never pickle"
_PRIORITY = "drop it: priorities are any integer (negative too), kept in order by the broker"
_QUEUES = ("drop it: route steps with the dagster-taskiq/queue op tag (dagster-celery/queue "
           "works too) and start workers with `worker start -q QUEUE`")
_NO_CHILD_LIMIT = ("drop it: each step runs in a forked child that serves only steps of its own "
                   "run and ends after 3 s idle; bound it with `worker start "
                   "--max-steps-per-child N` (1: a fresh fork for every step)")
_NO_TIME_LIMIT = ("drop it: there is no per-task time limit; bound runs with Dagster's "
                  "dagster/max_runtime run tag (run monitoring) or a timeout in the op")
_NO_EVENTS = ("drop it: there are no Celery events (Flower); use `dagster-taskiq status` and "
              "`worker list`")

CELERY_CONFIG_SOURCE_KEYS: dict[str, str] = {
    "broker_url": "set `broker` in the executor config (beside config_source, not in it)",
    "result_backend": "drop it: results live in the broker's Redis database (`backend`, "
                      "if set, must name that database)",
    "broker_transport_options": "kombu transport options do not apply: drop the block",
    "result_backend_transport_options": "drop it: results live in the broker's Redis database",
    "visibility_timeout": f"drop it: leases replace it; {_LEASES}",
    "task_acks_late": f"drop it: tasks are acknowledged when they finish; {_LEASES}",
    "task_reject_on_worker_lost": f"drop it: {_LEASES}",
    "worker_prefetch_multiplier": "drop it: workers never prefetch; a worker takes a task only "
                                  "when it has a free slot",
    "worker_concurrency": "drop it: set it per worker with `dagster-taskiq worker start -c N`",
    "task_default_queue": "set `default_queue` in the executor config (beside config_source); "
                          "workers pick their queues with `worker start -q`",
    "task_default_priority": "drop it: the default step priority is 5; set the "
                             "dagster-taskiq/priority tag (dagster-celery/priority works too)",
    "task_queue_max_priority": _PRIORITY,
    "task_routes": _QUEUES,
    "task_queues": _QUEUES,
    "result_expires": "use config_source's `result_ttl_seconds` (seconds; default 7 days)",
    "task_ignore_result": "drop it: the run's orchestrator needs every step's reply",
    "task_serializer": _JSON,
    "result_serializer": _JSON,
    "accept_content": _JSON,
    "event_serializer": _JSON,
    "task_compression": "drop it: messages are not compressed",
    "result_compression": "drop it: messages are not compressed",
    "broker_connection_retry_on_startup": "drop it: a worker that cannot reach Redis at start "
                                          "exits with code 3 (let its supervisor restart it); "
                                          "once running, it rides out outages of up to 5 min",
    "broker_connection_retry": _RETRIES,
    "broker_connection_max_retries": _RETRIES,
    "broker_connection_timeout": "use config_source's `connect_timeout` (seconds)",
    "broker_pool_limit": "use config_source's `max_connections`",
    "broker_heartbeat": "drop it: workers heartbeat to Redis by themselves (see the executor's "
                        "worker_heartbeat_timeout)",
    "broker_use_ssl": "drop it: use a rediss:// broker URL for TLS",
    "redis_backend_use_ssl": "drop it: use a rediss:// broker URL for TLS",
    "worker_max_tasks_per_child": _NO_CHILD_LIMIT,
    "worker_max_memory_per_child": _NO_CHILD_LIMIT,
    "task_time_limit": _NO_TIME_LIMIT,
    "task_soft_time_limit": _NO_TIME_LIMIT,
    "task_track_started": "drop it: step states are in Dagster's event log, and "
                          "`dagster-taskiq status` shows the tasks in flight",
    "worker_send_task_events": _NO_EVENTS,
    "task_send_sent_event": _NO_EVENTS,
    "imports": "use the executor's `include` (workers: `worker start -i MODULE`)",
}

# Inside broker_transport_options: what the keys a dagster-celery user sets there become.
CELERY_TRANSPORT_OPTIONS: dict[str, str] = {
    "visibility_timeout": f"leases replace it; {_LEASES}",
    "max_retries": _RETRIES.removeprefix("drop it: "),
    "interval_start": _RETRIES.removeprefix("drop it: "),
    "interval_step": _RETRIES.removeprefix("drop it: "),
    "interval_max": _RETRIES.removeprefix("drop it: "),
    "priority_steps": _PRIORITY.removeprefix("drop it: "),
    "queue_order_strategy": _PRIORITY.removeprefix("drop it: "),
    "sep": _PRIORITY.removeprefix("drop it: "),
    "global_keyprefix": "use config_source's `key_prefix`",
    "socket_timeout": "use config_source's `socket_timeout`",
    "socket_connect_timeout": "use config_source's `socket_connect_timeout`",
    "max_connections": "use config_source's `max_connections`",
}


def celery_key_advice(key: str, value: object = None) -> str | None:
    """What to do about Celery setting ``key`` (with ``value``) in ``config_source``, as one
    line naming the key, or None when it is not a Celery setting we know."""
    advice = CELERY_CONFIG_SOURCE_KEYS.get(key)
    if advice is None:
        return None
    if key == "broker_transport_options" and isinstance(value, Mapping):
        nested = [f"{name}: {CELERY_TRANSPORT_OPTIONS[name]}" for name in value
                  if name in CELERY_TRANSPORT_OPTIONS]
        if nested:
            advice += " (" + "; ".join(nested) + ")"
    return f"{key}: {advice}"


def default_broker_url() -> str:
    return os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER_URL


def unknown_keys_message(unknown: list[str], options: Mapping[str, Any],
                         known: set[str]) -> str:
    """The config_source error: Celery settings explained one a line, then any other unknown
    keys with the supported ones."""
    celery = [line for key in unknown if (line := celery_key_advice(key, options[key]))]
    other = [key for key in unknown if key not in CELERY_CONFIG_SOURCE_KEYS]
    parts = []
    if celery:
        lines = "\n".join(f"  {line}" for line in celery)
        parts.append("config_source holds Celery setting(s) that dagster-taskiq does not use "
                     f"(migrating from dagster-celery?):\n{lines}")
    if other:
        parts.append(f"Unknown config_source key(s) {other} for the taskiq executor.")
    parts.append(f"Supported config_source keys: {sorted(known)}.")
    return "\n".join(parts)


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
            raise _invalid_config(unknown_keys_message(unknown, options, known), [], options)
        if not str(options.get("key_prefix", DEFAULT_KEY_PREFIX)):
            raise _invalid_config("config_source.key_prefix must not be empty.", [], options)
        settings = cls(broker_url=broker_url, backend_url=backend_url, **options)
        for name in ("socket_timeout", "socket_connect_timeout", "connect_timeout"):
            if not float(getattr(settings, name)) > 0:
                raise _invalid_config(
                    f"config_source.{name} must be a positive number of seconds.", [], options
                )
        return settings
