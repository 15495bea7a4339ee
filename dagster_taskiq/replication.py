"""Writes that hand out work must survive a Sentinel failover: confirm them on a replica.

Redis replicates asynchronously. A claim that reaches the primary but not its replica is lost
when the Sentinels promote that replica (a crash, a ``SENTINEL FAILOVER``, a partition): the
step is back in its queue on the new primary, another worker takes it, and the first copy runs
on until its worker's next heartbeat finds the lease gone. So with a Sentinel URL a worker ends
each claim and each heartbeat with ``WAIT 1 <ms>`` on the same connection:

- a claim no replica confirmed is handed back at once, never run (the hand-back may be lost
  with the old primary too: then the new one has the task queued, which is the same);
- a renewal no replica confirmed does not count for the lease fence, so a worker cut off from
  every copy of its lease stops its step before the lease could be handed out again.

A primary with no replica cannot confirm anything. That is normal for one left alone after a
failover (the old primary is gone) and then its writes go through unconfirmed, as there is no
copy to lose them to. But a primary that had a replica moments ago and has none now is often
one the Sentinels are failing over away from (its replica was just promoted): for
``ALONE_GRACE_SECONDS`` after it last had a replica, unconfirmed claims are handed back. Which
primary had replicas is read with ``ROLE`` at most once a second, per primary address.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger("dagster_taskiq.broker")

WAIT_MS = 250  # a healthy replica confirms in about a millisecond
ALONE_GRACE_SECONDS = 10.0
ROLE_CHECK_SECONDS = 1.0


class ReplicaConfirmation:
    """Tracks, for a Sentinel client, whether the primary's writes must be confirmed."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._checked = -ROLE_CHECK_SECONDS
        self._had_replica: dict[str, float] = {}  # primary address -> last seen with a replica
        self._replicas = 0
        self._primary = ""
        self._warned = 0.0

    async def refresh(self) -> None:
        """Ask the primary (at most once a second) how many replicas it has."""
        now = time.monotonic()
        if now - self._checked < ROLE_CHECK_SECONDS:
            return
        self._checked = now
        role = await self._redis.execute_command("ROLE")
        address = self._redis.connection_pool.master_address
        self._primary = f"{address[0]}:{address[1]}" if address else ""
        self._replicas = len(role[2]) if role and role[0] in (b"master", "master") else 0
        if self._replicas:
            self._had_replica[self._primary] = now

    def required(self) -> bool:
        """Whether a write must be confirmed by a replica before it counts: the primary has a
        replica, or had one within the grace (see the module docstring)."""
        if self._replicas:
            return True
        seen = self._had_replica.get(self._primary)
        return seen is not None and time.monotonic() - seen < ALONE_GRACE_SECONDS

    def unconfirmed(self, what: str) -> None:
        """A write that needed a replica's confirmation did not get it in time."""
        self._checked = -ROLE_CHECK_SECONDS  # look again before the next write
        now = time.monotonic()
        if now - self._warned >= 10:
            self._warned = now
            logger.warning("No replica of the Redis primary %s confirmed a %s within %d ms "
                           "(a failover in progress, or a lagging replica): it does not count.",
                           self._primary or "?", what, WAIT_MS)

    @staticmethod
    def wait_command() -> tuple[Any, ...]:
        return ("WAIT", 1, WAIT_MS)
