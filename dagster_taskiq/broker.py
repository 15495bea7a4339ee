"""Our Redis broker for taskiq: named queues, exact priority, leases kept alive by heartbeats.

Stock taskiq-redis brokers lose tasks (list/pubsub), re-run long tasks while they still run
(streams), hoard messages and have no priority, so the executor brings its own. Layout in Redis,
under ``<prefix>:`` (``{dagster-taskiq}`` by default; always a Redis Cluster hash tag, see
``BrokerSettings``, so every key below lands in one Cluster slot and each script's keys on one
node):

- ``task:<id>``   hash: the message ``body``, ``zset``/``member``/``score`` (its place in its
  queue), ``lease`` seconds, ``reply_to``, ``redeliver`` (how many deliveries it may get), and
  while leased the ``holder`` and delivery ``token``.
- ``queue:<q>``  sorted set of waiting steps. Score ``-priority`` (higher priority pops first);
  members ``<15-digit sequence>|<id>`` so equal scores pop in submission order (FIFO).
  ``runs:<q>`` is the same for whole runs (``execute_job``/``resume_job``): a worker serves
  runs from a separate pool of slots, so a run never starves its own steps.
- ``leases``     sorted set of leased task ids scored by deadline (ms). Workers push deadlines
  forward with heartbeats. An expired lease (its worker died) puts a step back in its queue, up
  to ``MAX_DELIVERIES``; a run, or a step out of deliveries, is dropped and its waiter told why.
- ``wake:<q>``, ``wakeruns:<q>``  lists used only to wake blocked consumers (BLPOP).
- ``seq``        the submission counter; ``claim:<claim id>`` what one claim got, for a minute.
- ``reply:<run>:<uuid>`` a run's reply list, ``result:<id>`` a result (``results.py``);
  ``workers`` and ``worker:<id>`` the worker registry (``registry.py``).

Every state change is one Lua script, so a task is always in exactly one place: queued, leased
or gone (acknowledged). The scripts are ``lua/<name>.lua``, each with a header naming its KEYS
and ARGV. Messages are taskiq's JSON; nothing is pickled.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from functools import partial
from importlib import resources
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from taskiq import AckableMessage, AsyncBroker, BrokerMessage

from dagster_taskiq.config import (
    BROKER_URL_ENV,
    DEFAULT_QUEUE,
    TASK_EXECUTE_JOB,
    TASK_RESUME_JOB,
    BrokerSettings,
    mask_url,
    parse_redis_url,
)
from dagster_taskiq.replication import ReplicaConfirmation

logger = logging.getLogger("dagster_taskiq.broker")

# Labels the executor puts on messages; the broker reads them.
QUEUE_LABEL = "queue_name"  # the name taskiq-redis uses too
PRIORITY_LABEL = "priority"
LEASE_LABEL = "lease_seconds"
REPLY_LABEL = "reply_to"



class LeaseMetrics(Protocol):
    """What a consumer tells its worker's metrics (see ``metrics.py``); unset, it tells
    nothing and pays nothing."""

    def claimed(self, task_id: str, queue: str, kind: str, redelivered: bool,
                waited: float) -> None: ...

    def renewed(self, task_id: str) -> None: ...

    def expired(self, task_id: str) -> None: ...

    def forgotten(self, task_id: str) -> None: ...


class RedisBusyError(ResponseError):
    """BUSY: the server is running someone's long script; it answers again once that ends."""


class RedisNoReplicasError(ResponseError):
    """NOREPLICAS: a primary with ``min-replicas-to-write`` set has too few replicas in sync
    (one cut off by a failover, or a replica catching up); it accepts writes again once they
    are back, and a demoted one sends us to the new primary."""


class RedisUnblockedError(ResponseError):
    """UNBLOCKED: a blocking read was ended by the server changing role (a primary demoted to
    replica in a failover); the same read succeeds against the new primary."""


def _classify_transient_replies() -> None:
    # redis-py maps each error reply's first word to an exception class in one table shared by
    # all its parsers; these are not in it (bare ResponseErrors, never retried).
    try:
        from redis._parsers.base import BaseParser
    except ImportError:  # a redis-py that moved it: these replies are then not retried
        logger.debug("Cannot classify Redis's BUSY and UNBLOCKED replies with this redis-py.")
        return
    BaseParser.EXCEPTION_CLASSES.setdefault("BUSY", RedisBusyError)
    BaseParser.EXCEPTION_CLASSES.setdefault("UNBLOCKED", RedisUnblockedError)
    BaseParser.EXCEPTION_CLASSES.setdefault("NOREPLICAS", RedisNoReplicasError)


_classify_transient_replies()

# Failures that pass: reconnect or retry with backoff. Besides lost connections, the replies a
# healthy deployment gives for a while: READONLY (a failover demoted our primary), LOADING (a
# restart reads its data), OOM (noeviction and full), MASTERDOWN (a replica lost its primary),
# BUSY (a long script), UNBLOCKED (a blocking read cut by a demotion), NOREPLICAS
# (min-replicas-to-write not met), NOSCRIPT (a restart forgot our scripts; redis-py reloads
# them), TRYAGAIN and CLUSTERDOWN.
REDIS_ERRORS = (
    RedisBusyError,
    RedisNoReplicasError,
    RedisUnblockedError,
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ReadOnlyError,
    BusyLoadingError,
    OutOfMemoryError,
    MasterDownError,
    NoScriptError,
    TryAgainError,
    ClusterDownError,
)

RUN_TASKS = frozenset({TASK_EXECUTE_JOB, TASK_RESUME_JOB})
STEP, RUN = "step", "run"
MAX_DELIVERIES = 3  # a step whose worker keeps dying is failed rather than retried forever
FENCE_CHECK_SECONDS = 0.25
DELIVERY_SEP = "#"  # in a delivery key: <task id>#<delivery token>

# A reply list outlives its run only by this much: its orchestrator deletes it when done, and a
# script may re-create it after that (a late revoke or lost worker), so it must expire.
REPLY_TTL_SECONDS = 24 * 3600

SCRIPT_NAMES = ("kick", "claim", "heartbeat", "ack", "reap", "release", "revoke")
_INCLUDE = re.compile(r"^-- include: (\S+)$", re.MULTILINE)


def script_source(name: str) -> str:
    """The Lua of ``lua/<name>.lua`` (each file's header names its KEYS and ARGV), with each
    ``-- include: <file>`` line replaced by that helper file's text (one level, no nesting)."""
    folder = resources.files("dagster_taskiq").joinpath("lua")

    def read(file: str) -> str:
        return folder.joinpath(file).read_text(encoding="utf-8")

    return _INCLUDE.sub(lambda match: read(match.group(1)).rstrip("\n"), read(f"{name}.lua"))


# Read once per process; redis-py loads each by its SHA (and again after a NOSCRIPT).
SCRIPTS: dict[str, str] = {name: script_source(name) for name in SCRIPT_NAMES}


PRIMARY_CHECK_SECONDS = 1.0


class _PrimaryFollowingPool(SentinelConnectionPool):
    """A Sentinel pool that drops connections to a demoted primary that still answers.

    redis-py's asyncio pool asks the Sentinels where the primary is only when it opens a
    connection. After a failover that leaves the old primary running (``SENTINEL FAILOVER``,
    a partition), the connections already open to it stay in use until the Sentinels
    reconfigure it as a replica, seconds later, and what they write there meanwhile is lost.
    This pool asks at most once per ``PRIMARY_CHECK_SECONDS`` and reconnects any connection
    it hands out that points elsewhere than the primary the Sentinels name."""

    _asked = 0.0

    async def get_connection(self, command_name: Any = None, *keys: Any,
                             **options: Any) -> Any:
        now = time.monotonic()
        if now - self._asked >= PRIMARY_CHECK_SECONDS:
            self._asked = now
            try:
                await self.get_master_address()  # also drops idle connections if it moved
            except REDIS_ERRORS as exc:  # the Sentinels' outage is not the primary's
                logger.debug("Could not ask the Sentinels for the primary: %r", exc)
        connection = await super().get_connection(command_name, *keys, **options)
        primary = self.master_address
        if primary is not None and (connection.host, connection.port) != tuple(primary):
            try:
                await connection.disconnect()
                await self.ensure_connection(connection)  # connects to the primary named now
            except BaseException:
                await self.release(connection)
                raise
        return connection


class _SentinelRedis(aioredis.Redis):
    """The primary's client that a Sentinel URL gives: closing it closes the Sentinel clients
    that find the primary too (redis-py leaves those to the caller)."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        await self.connection_pool.sentinel_manager.aclose()


def redis_client(url: str, settings: BrokerSettings) -> aioredis.Redis:
    """The one place Redis clients are made: an asyncio client for any broker URL form (see
    ``config.URL_FORMS``) with explicit timeouts (redis-py 8's defaults break blocking reads)
    and keepalive, so a dead server is noticed instead of waited on forever.

    A Sentinel URL gives a client of the primary the Sentinels elect: each new connection asks
    them where it is, so after a failover the reconnects (our REDIS_ERRORS retries) reach the
    new primary, and a connection to a demoted one fails with READONLY and is dropped. A
    Cluster URL gives a ``RedisCluster`` (the same commands; every key of ours is in one slot).
    """
    target = parse_redis_url(url)
    options: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.socket_connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "max_connections": settings.max_connections,
    }
    if target.kind == "server":
        return aioredis.Redis.from_url(url, **options)
    credentials = {"username": target.username, "password": target.password, "ssl": target.tls}
    if target.kind == "cluster":
        cluster = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in
                                              target.nodes], **credentials, **options)
        return cluster  # type: ignore[return-value] # the commands we use are the same
    sentinel = Sentinel(
        target.nodes,
        sentinel_kwargs={"socket_timeout": settings.socket_timeout,
                         "socket_connect_timeout": settings.socket_connect_timeout,
                         "socket_keepalive": True, "ssl": target.tls,
                         "username": target.sentinel_username,
                         "password": target.sentinel_password},
    )
    return sentinel.master_for(target.service, redis_class=_SentinelRedis,
                               connection_pool_class=_PrimaryFollowingPool, db=target.db,
                               **credentials, **options)


async def stop_loop(task: asyncio.Task[Any], timeout: float = 5.0) -> None:
    """Stop a background loop that also watches a closing flag. Cancelling alone is not
    enough: redis-py can swallow a cancellation that lands in a read under its socket timeout,
    and the loop would carry on."""
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=timeout)
    if not done:
        logger.warning("A background task did not stop within %.0f s; leaving it.", timeout)


def supervise(task: asyncio.Task[Any], what: str,
              on_crash: Callable[[str, BaseException], None] | None) -> None:
    """Make a background loop's death loud: a loop that ends with an unexpected error calls
    ``on_crash`` (a worker then exits non-zero so its supervisor restarts it) instead of
    leaving a process that looks alive and no longer heartbeats."""

    def done(finished: asyncio.Task[Any]) -> None:
        if finished.cancelled() or finished.exception() is None:
            return
        error = finished.exception()
        assert error is not None
        logger.critical("%s stopped with an unexpected error: %r", what, error)
        if on_crash is not None:
            on_crash(what, error)

    task.add_done_callback(done)


def fence_margin(lease: float) -> float:
    """How long before its lease runs out a worker stops a task it could not renew: a fifth of
    the lease, at least 1 s, at most half of it."""
    return min(max(1.0, lease * 0.2), lease / 2)


class Backoff:
    """Exponential backoff for reconnect loops: 0.1 s doubling up to 5 s, reset on success."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self._first, self._cap, self._next = first, cap, first

    def reset(self) -> None:
        self._next = self._first

    async def wait(self) -> None:
        delay, self._next = self._next, min(self._next * 2, self._cap)
        await asyncio.sleep(delay)


class RedisLeaseBroker(AsyncBroker):
    """A taskiq broker over Redis with queues, exact priority and heartbeat-driven leases.

    ``queues`` are the queues this process consumes (in the order given: on equal priority the
    earlier queue wins) and ``kind`` whether it takes steps or runs; a client that only submits
    can leave the defaults. The worker's hooks are called with a delivery key (see
    :meth:`delivery`): ``on_cancel`` when the orchestrator asks to stop a task this process
    runs, ``on_lost`` when its lease was lost (to another worker, or to a newer delivery of
    the task to this one), ``on_renewed`` with a step's fence deadline (monotonic) each time
    its lease is renewed.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        queues: Sequence[str] = (DEFAULT_QUEUE,),
        holder: str = "client",
        block_seconds: float = 1.0,
        heartbeat_seconds: float | None = None,
        kind: str = STEP,
    ) -> None:
        super().__init__()
        if not queues:
            raise ValueError("A consumer needs at least one queue.")
        if kind not in (STEP, RUN):
            raise ValueError(f"kind must be {STEP!r} or {RUN!r}")
        self.settings = settings
        self.kind = kind
        self.queues = list(dict.fromkeys(queues))
        self.holder = holder
        self.block_seconds = block_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.on_cancel: Callable[[str], None] | None = None
        self.on_lost: Callable[[str], None] | None = None
        self.on_renewed: Callable[[str, float], None] | None = None
        self.on_crash: Callable[[str, BaseException], None] | None = None
        self.metrics: LeaseMetrics | None = None
        self._redis: aioredis.Redis | None = None
        self._confirmation: ReplicaConfirmation | None = None  # Sentinel URLs only
        self._held: dict[str, int] = {}  # task id -> delivery token, for leases we hold
        self._acking: dict[str, int] = {}  # task id -> delivery token, being acknowledged
        # task id -> (lease seconds, monotonic time before the last claim/heartbeat that
        # renewed it): the lease runs at least until then + lease, whatever Redis did since.
        self._renewed: dict[str, tuple[float, float]] = {}
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._fence_task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_reap = 0.0

    # -- keys -------------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return ":".join((self.settings.key_prefix, *parts))

    def task_key(self, task_id: str) -> str:
        return self._key("task", task_id)

    def queue_key(self, queue: str, kind: str = STEP) -> str:
        return self._key("queue" if kind == STEP else "runs", queue)

    def _wake_key(self, queue: str, kind: str) -> str:
        return self._key("wake" if kind == STEP else "wakeruns", queue)

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = redis_client(self.settings.broker_url, self.settings)
            if parse_redis_url(self.settings.broker_url).kind == "sentinel":
                self._confirmation = ReplicaConfirmation(self._redis)
            self._scripts = {
                name: self._redis.register_script(source) for name, source in SCRIPTS.items()
            }
        return self._redis

    async def _run(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        _ = self.redis
        return await self._scripts[script](keys=list(keys), args=list(args))

    async def _run_confirmed(self, script: str, keys: Sequence[str],
                             args: Sequence[Any]) -> tuple[Any, bool]:
        """Run a script that hands out work (a claim, a renewal); with a Sentinel URL, also
        ask a replica to confirm it on the same connection (see ``replication.py``). Returns
        its result and whether it counts."""
        _ = self.redis
        confirmation = self._confirmation
        if confirmation is None:
            return await self._run(script, keys, args), True
        await confirmation.refresh()
        if not confirmation.required():
            return await self._run(script, keys, args), True
        pipe = self.redis.pipeline(transaction=False)
        await self._scripts[script](keys=list(keys), args=list(args), client=pipe)
        pipe.execute_command(*confirmation.wait_command())
        result, replicas = await pipe.execute()
        return result, int(replicas) >= 1

    # -- lifecycle --------------------------------------------------------------------------
    async def startup(self) -> None:
        await super().startup()
        await self.ping()
        if self.is_worker_process:
            self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())
            self._fence_task = asyncio.create_task(self._fence_loop())
            for task, what in ((self._heartbeat_task, "lease heartbeat"),
                               (self._fence_task, "lease fence")):
                supervise(task, f"The {what} of {self.holder} ({self.kind}s)",
                          lambda what, error: self.on_crash and self.on_crash(what, error))

    async def shutdown(self) -> None:
        self._closing = True
        for task in (self._heartbeat_task, self._fence_task):
            if task is not None:
                await stop_loop(task)
        await super().shutdown()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def ping(self) -> None:
        """Fail fast and clearly when the broker is unreachable (the password stays masked)."""
        deadline = time.monotonic() + self.settings.connect_timeout
        while True:
            try:
                await self.redis.ping()
                return
            except REDIS_ERRORS as exc:
                if time.monotonic() >= deadline:
                    raise BrokerUnavailable(self.settings.broker_url, exc) from None
                await asyncio.sleep(0.2)

    # -- sending ----------------------------------------------------------------------------
    async def kick(self, message: BrokerMessage) -> None:
        labels = message.labels
        queue = str(labels.get(QUEUE_LABEL) or DEFAULT_QUEUE)
        priority = int(labels.get(PRIORITY_LABEL, 0))
        lease = float(labels.get(LEASE_LABEL, 30.0))
        kind = RUN if message.task_name in RUN_TASKS else STEP
        reply_to = str(labels.get(REPLY_LABEL) or "")
        if reply_to and not reply_to.startswith(f"{self.settings.key_prefix}:"):
            # The scripts push to it beside the task's keys: on Redis Cluster it must share
            # their hash tag (slot), so it must be under the prefix.
            raise ValueError(
                f"reply_to {reply_to!r} is not under the key prefix {self.settings.key_prefix!r}"
            )
        await self._run(
            "kick",
            [
                self.task_key(message.task_id),
                self.queue_key(queue, kind),
                self._wake_key(queue, kind),
                self._key("seq"),
            ],
            [
                message.task_id,
                message.message,
                -priority,
                lease,
                reply_to,
                MAX_DELIVERIES if kind == STEP else 1,
            ],
        )

    async def revoke(self, task_ids: Sequence[str]) -> dict[str, str]:
        """Drop queued tasks (their waiters get a 'revoked' reply) and flag running ones for
        cancellation (their worker stops them). Returns per id ``dropped``, ``gone`` or
        ``running:<holder>``."""
        if not task_ids:
            return {}
        states = await self._run(
            "revoke", [self.task_key(t) for t in task_ids], [REPLY_TTL_SECONDS, *task_ids]
        )
        return {tid: state.decode() for tid, state in zip(task_ids, states, strict=True)}

    async def reap(self, limit: int = 100) -> list[str]:
        """Handle tasks whose lease expired (their worker stopped heartbeating): requeue steps
        that have deliveries left, drop the rest. Returns the requeued ids."""
        self._last_reap = time.monotonic()
        requeued, dropped = await self._run(
            "reap", [self._key("leases")], [self.settings.key_prefix, limit, REPLY_TTL_SECONDS]
        )
        requeued = [i.decode() for i in requeued]
        if requeued:
            logger.warning("Requeued %d task(s) whose worker stopped heartbeating: %s",
                           len(requeued), requeued)
        if dropped:
            logger.warning("Dropped %d task(s) whose worker stopped heartbeating: %s",
                           len(dropped), [i.decode() for i in dropped])
        return requeued

    async def reap_if_due(self, every: float = 1.0) -> None:
        if time.monotonic() - self._last_reap >= every:
            await self.reap()

    # -- receiving --------------------------------------------------------------------------
    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        queue_keys = [self.queue_key(q, self.kind) for q in self.queues]
        wake_keys = [self._wake_key(q, self.kind) for q in self.queues]
        queue_names = dict(zip(queue_keys, self.queues, strict=True))
        backoff = Backoff()
        claim_id, asked = uuid.uuid4().hex, 0.0
        while not self._closing:
            # redis-py can swallow a cancellation that lands inside a blocking read under its
            # socket timeout; the request stays visible on the task driving us (the receiver
            # drives each step of this generator from a new task), so it can still stop us.
            driver = asyncio.current_task()
            if driver is not None and driver.cancelling():
                raise asyncio.CancelledError
            try:
                await self.reap_if_due()
                # From the first attempt of this claim: a retry may return what that one got.
                asked = asked or time.monotonic()
                claimed, confirmed = await self._run_confirmed(
                    "claim",
                    [self._key("leases"), *queue_keys, *wake_keys, self._key("claim", claim_id)],
                    [self.holder, self.settings.key_prefix, len(queue_keys)],
                )
                claim_id, claim_asked = uuid.uuid4().hex, asked  # a failed claim is retried as is
                asked = 0.0
                if claimed is None:
                    await self.redis.blpop(wake_keys, timeout=self.block_seconds)
                    backoff.reset()
                    continue
                if not confirmed:
                    # A failover may be losing it: never run it (see replication.py).
                    await self._hand_back(claimed[0].decode(), int(claimed[2]))
                    await backoff.wait()
                    continue
                lease = float(claimed[3])
                if time.monotonic() - claim_asked >= lease - fence_margin(lease):
                    # Asked before a pause (this process was frozen, or the reply slow): for
                    # all we know its lease began then and is nearly out, and the fence would
                    # drop it at once. Renew it now, or leave it.
                    renewed = await self._renew_claim(claimed[0].decode(), int(claimed[2]))
                    if renewed is None:
                        continue
                    claim_asked = renewed
                backoff.reset()
            except REDIS_ERRORS as exc:
                logger.warning(
                    "Broker %s unreachable (%s); retrying.", mask_url(self.settings.broker_url), exc
                )
                await backoff.wait()
                continue
            task_id, body, token = claimed[0].decode(), claimed[1], int(claimed[2])
            if self._held.get(task_id, token) != token:
                # Taken again while we still counted the earlier delivery ours (we were
                # frozen past its lease): that one is lost, whatever notice is still on its way.
                self._lose(task_id, "Lost the lease on task %s (this worker took it again).")
            self._held[task_id] = token
            self._renew(task_id, float(claimed[3]), claim_asked)
            if self.metrics is not None:
                zset = claimed[4].decode()
                # Redelivered: an earlier delivery was lost, not handed back (at shutdown, or
                # a claim no replica confirmed).
                self.metrics.claimed(task_id, queue_names.get(zset, zset), self.kind,
                                     token - int(claimed[6]) > 1, int(claimed[5]) / 1000)
            yield AckableMessage(data=body, ack=partial(self._ack, task_id, token))

    async def _renew_claim(self, task_id: str, token: int) -> float | None:
        """Renew a claim just made whose lease we cannot vouch for; returns when we asked, or
        None when it is not ours any more (or no replica confirmed it: handed back)."""
        sent = time.monotonic()
        (lost, _), confirmed = await self._run_confirmed(
            "heartbeat", [self._key("leases"), self.task_key(task_id)],
            [self.holder, task_id, token])
        if lost:
            logger.warning("Task %s: claimed, but taken back before this worker could renew "
                           "it (it was paused); leaving it.", task_id)
            return None
        if not confirmed:
            await self._hand_back(task_id, token)
            return None
        return sent

    def delivery(self, task_id: str) -> str:
        """The key of our current delivery of ``task_id`` (its id and delivery token): what
        the worker's hooks are called with, so a notice about one delivery never touches a
        later one of the same task (a worker frozen past a lease may take its task again)."""
        token = self._held.get(task_id)
        return task_id if token is None else f"{task_id}{DELIVERY_SEP}{token}"

    def deliveries(self) -> dict[str, str]:
        """Task id -> delivery key, for every task we hold."""
        return {task_id: self.delivery(task_id) for task_id in self._held}

    async def release_held(self) -> list[str]:
        """Hand every task we hold back (see ``lua/release.lua``); returns their ids."""
        held = dict(self._held)
        if not held:
            return []
        released = await self._release(held, keep_runs=False)
        for task_id in released:
            self._forget(task_id)
        return released

    async def _release(self, held: dict[str, int], keep_runs: bool) -> list[str]:
        keys = [self._key("leases"), *(self.task_key(t) for t in held)]
        args: list[Any] = [self.holder, REPLY_TTL_SECONDS, int(keep_runs)]
        for task_id, token in held.items():
            args += [task_id, token]
        return [i.decode() for i in await self._run("release", keys, args)]

    async def _hand_back(self, task_id: str, token: int) -> None:
        """Give back a claim no replica confirmed, run or step, as if never taken. If this
        write is lost too (the old primary's data), the new primary has the task queued."""
        if self._confirmation is not None:
            self._confirmation.unconfirmed("claim")
        try:
            await self._release({task_id: token}, keep_runs=True)
        except REDIS_ERRORS as exc:
            logger.debug("Could not hand back unconfirmed claim of %s: %r", task_id, exc)

    async def _ack(self, task_id: str, token: int) -> None:
        """Acknowledge (delete) a task this process still holds. One it no longer holds (lost
        to another worker, handed back, or fenced off during an outage) is not ours to delete:
        its lease runs out and it goes back to its queue."""
        backoff = Backoff()
        # A heartbeat that runs after the ack on the server, but is answered before it, must not
        # call the task lost: the ack's own answer says whether it was still ours.
        self._acking[task_id] = token
        try:
            while self._held.get(task_id) == token:
                try:
                    deleted = await self._run(
                        "ack",
                        [self._key("leases"), self.task_key(task_id)],
                        [task_id, self.holder, token],
                    )
                except REDIS_ERRORS as exc:
                    if self._closing:
                        logger.warning(
                            "Could not acknowledge %s (%s); its lease will expire.", task_id, exc
                        )
                        return
                    await backoff.wait()
                    continue
                if not deleted and self._held.get(task_id) == token:
                    self._lose(task_id, "Lost the lease on task %s before it was acknowledged "
                                        "(it was handed to another worker).")
                self._forget(task_id)
                return
        finally:
            if self._acking.get(task_id) == token:
                del self._acking[task_id]

    def _forget(self, task_id: str) -> None:
        self._held.pop(task_id, None)
        self._renewed.pop(task_id, None)
        if self.metrics is not None:
            self.metrics.forgotten(task_id)

    def _expired(self, task_id: str) -> None:
        """We lost the lease of a task we held (fenced, or found it taken)."""
        if self.metrics is not None and task_id in self._held:
            self.metrics.expired(task_id)
        self._forget(task_id)

    def give_up_lease(self, delivery: str) -> None:
        """Stop renewing a delivery's lease without acknowledging it (its process stopped
        itself at its fence): once the lease runs out the task goes back to its queue (if it
        is not another worker's already). A later delivery of the task is not touched."""
        task_id, _, token = delivery.partition(DELIVERY_SEP)
        if token and str(self._held.get(task_id)) == token:
            self._expired(task_id)

    def _lose(self, task_id: str, message: str) -> None:
        """Our delivery of ``task_id`` is no longer ours: say so (``message`` takes the id),
        count it, forget it, stop it."""
        delivery = self.delivery(task_id)
        logger.error(message, task_id)
        self._expired(task_id)
        if self.on_lost is not None:
            self.on_lost(delivery)

    # -- leases -----------------------------------------------------------------------------
    def _renew(self, task_id: str, lease: float, at: float) -> None:
        """Record a renewal we are sure of (``at``: when we asked, on this host's monotonic
        clock), and tell ``on_renewed`` the step's own fence deadline: half our margin later
        than ours, so it acts only when this process cannot (frozen, stalled)."""
        self._renewed[task_id] = (lease, at)
        if self.on_renewed is not None and self.kind == STEP:
            self.on_renewed(self.delivery(task_id), at + lease - fence_margin(lease) / 2)

    def _heartbeat_interval(self) -> float:
        if self.heartbeat_seconds is not None:
            return self.heartbeat_seconds
        return 1.0

    async def heartbeat(self) -> tuple[list[str], list[str]]:
        """Extend the leases we hold. Returns (lost, cancelled) task ids."""
        held = dict(self._held)
        if not held:
            return [], []
        sent = time.monotonic()
        keys = [self._key("leases"), *(self.task_key(t) for t in held)]
        args: list[Any] = [self.holder]
        for task_id, token in held.items():
            args += [task_id, token]
        (lost, cancelled), confirmed = await self._run_confirmed("heartbeat", keys, args)
        # Only the deliveries this heartbeat was about: one taken again meanwhile (a newer
        # token) is not lost.
        lost = [t for t in (i.decode() for i in lost)
                if self._held.get(t) == held.get(t) != self._acking.get(t)]
        if not confirmed and self._confirmation is not None:
            # Renewed where a failover may lose it: the fence keeps counting from the last
            # renewal a replica confirmed.
            self._confirmation.unconfirmed("lease renewal")
        for task_id in held.keys() - set(lost):
            if confirmed and task_id in self._renewed:
                self._renew(task_id, self._renewed[task_id][0], sent)
                if self.metrics is not None:
                    self.metrics.renewed(task_id)
        return lost, [i.decode() for i in cancelled]

    def _fence(self) -> None:
        """Stop the tasks whose lease may run out before we can renew it (Redis unreachable,
        read-only, stalled): past ``lease - margin`` since the last renewal we are sure of,
        another worker may soon take the task, so ours must stop first. At most one copy runs,
        however long the outage. Runs are never handed out twice (an expired run is dropped,
        not redelivered), so their orchestrators ride the outage out instead."""
        if self.kind != STEP:
            return
        now = time.monotonic()
        for task_id, (lease, renewed) in list(self._renewed.items()):
            if now - renewed < lease - fence_margin(lease):
                continue
            self._lose(task_id, f"Could not renew the lease on task %s for {now - renewed:.1f} s "
                                f"(lease {lease:.1f} s): stopping it; it goes back to its queue.")

    async def _fence_loop(self) -> None:
        """Checks the leases on its own clock: a heartbeat stuck on a stalled server must not
        delay the fence."""
        while not self._closing:
            await asyncio.sleep(FENCE_CHECK_SECONDS)
            self._fence()

    async def _heartbeat_loop(self) -> None:
        interval = self._heartbeat_interval()
        backoff = Backoff(cap=interval)
        while not self._closing:
            await asyncio.sleep(interval)
            try:
                # Bounded: a stalled server must not hold the fence check up.
                lost, cancelled = await asyncio.wait_for(self.heartbeat(), 2 * interval + 1)
                backoff.reset()
            except REDIS_ERRORS as exc:  # TimeoutError (wait_for) is an OSError
                logger.warning("Heartbeat failed (%r); retrying.", exc)
                await backoff.wait()
                continue
            for task_id in lost:
                self._lose(task_id,
                           "Lost the lease on task %s (it was handed to another worker).")
            for task_id in cancelled:
                if self.on_cancel is not None and task_id in self._held:
                    self.on_cancel(self.delivery(task_id))

    # -- inspection (CLI, tests) ------------------------------------------------------------
    async def queued_task_ids(self, queue: str, kind: str = STEP) -> list[str]:
        members = await self.redis.zrange(self.queue_key(queue, kind), 0, -1)
        return [m.decode().split("|", 1)[1] for m in members]

    async def task_state(self, task_id: str) -> dict[str, str]:
        """The task's broker record: empty once acknowledged or dropped; ``holder`` while
        leased; no ``holder`` while queued."""
        raw = await self.redis.hgetall(self.task_key(task_id))
        return {k.decode(): v.decode() for k, v in raw.items() if k != b"body"}



class BrokerUnavailable(Exception):
    """The broker could not be reached within ``connect_timeout``."""

    def __init__(self, url: str, cause: BaseException) -> None:
        super().__init__(
            f"Cannot reach the taskiq broker at {mask_url(url)}: {cause}. Is Redis running "
            f"there? Set the executor's `broker` config (or {BROKER_URL_ENV}) to its URL."
        )
