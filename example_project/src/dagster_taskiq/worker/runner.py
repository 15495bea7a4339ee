"""The worker's side of its zygote: send each task there, follow its child, stop it on demand.

The worker (an asyncio process with broker connections, heartbeats and threads) never forks.
It hands each task to its zygote (:mod:`~dagster_taskiq.worker.zygote`), which forks it from a
clean, warm process, and it keeps, per task, a control page shared with the task's child: the
lease-fence deadline (renewed with the lease; the child stops itself when it passes) and a stop
flag, so a task released or cancelled before its fork never forks, and one stopped between its
fork and its first instruction never runs. Tasks are known by their delivery key (the broker's
``<task id>#<token>``): a worker frozen past a lease may take the same task again, and notices
about the earlier delivery must not touch the later one.

The zygote is replaced when its code is stale: a tracked file changed (checked before every
task, and every few seconds while idle, so the next run starts warm), or a task was planned
from other code (another job snapshot, another code version). Each such reason is tried once:
if a new zygote still differs, the task runs with what this machine has, and the run says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dagster._serdes import deserialize_value, serialize_value
from dagster._utils.error import SerializableErrorInfo
from taskiq.exceptions import NoResultError

from dagster_taskiq.broker import RUN, STEP
from dagster_taskiq.worker.outcome import StepOutcome
from dagster_taskiq.worker.zygote import (
    CANCELLED,
    PAGE_SIZE,
    RELEASED,
    STOP_OFFSET,
    read_deadline,
    read_stop,
    write_deadline,
)

logger = logging.getLogger("dagster_taskiq.worker")

# On cancel: SIGINT first (Dagster records the interruption), SIGKILL after the grace. A run's
# orchestrator gets longer than its steps: it waits for their replies before it records
# RUN_CANCELED, and killing it first would leave the run CANCELING.
KILL_GRACE_SECONDS = 5.0
RUN_KILL_GRACE_SECONDS = 30.0
RELOADS_PER_TASK = 3  # a file saved again and again must not keep a task from ever running
WATCH_SECONDS = 2.0  # how often an idle worker looks for edited source files
# Steps of one run a forked child may serve, one after another (1: a fresh fork for each).
DEFAULT_MAX_STEPS_PER_CHILD = 50


class ZygoteFailed(Exception):
    """A zygote could not load the code (its traceback is the message) or died."""


@dataclass
class _Child:
    pid: int
    label: str
    grace: float
    kind: str = STEP
    started: float = field(default_factory=time.time)
    released: bool = False
    cancelling: bool = False
    signalled: bool = False  # sent SIGINT or SIGKILL: never given another step


class _Generation:
    """One zygote process, and the replies and exits it reports."""

    def __init__(self, includes: Sequence[str], warm: Sequence[str], loglevel: str,
                 max_steps_per_child: int = 1) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        config = {"fd": theirs.fileno(), "worker": os.getpid(), "sys_path": sys.path,
                  "includes": list(includes), "warm": list(warm), "loglevel": loglevel,
                  "max_steps_per_child": max_steps_per_child}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dagster_taskiq.worker.zygote", json.dumps(config)],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self.loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.exits: dict[int, asyncio.Future[int | None]] = {}
        self.sending = asyncio.Lock()
        self.dead = False
        self.followed: set[int] = set()  # pids of children whose exit someone may await
        self._notes: set[asyncio.Task[None]] = set()
        self._tail = b""  # what a notice left unsent (see notify)
        self._buffer = b""
        self.loop.add_reader(ours.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._died()
            return
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self._dispatch(json.loads(line))

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "exit" in message:
            if message["exit"] in self.followed:
                self.exit_of(message["exit"]).set_result(message["status"])
        elif "id" in message:
            future = self.replies.pop(message["id"], None)
            if future is not None and not future.done():
                if "pid" in message:
                    # Followed from now: its exit may be in this very read (a child that
                    # took a step and died at once), before the requester resumes.
                    self.followed.add(message["pid"])
                future.set_result(message)
        elif "ready" in message:
            if message["threads"]:
                logger.warning("The user's code started threads at import (%s): tasks fork "
                               "from the process that runs them.", ", ".join(message["threads"]))
            self.ready.set_result(message)
        elif "failed" in message and not self.ready.done():
            self.ready.set_exception(ZygoteFailed(message["failed"]))

    def exit_of(self, pid: int) -> asyncio.Future[int | None]:
        """The wait status of child ``pid`` (``None``: it died with its zygote)."""
        if pid not in self.exits:
            self.exits[pid] = self.loop.create_future()
        return self.exits[pid]

    def _died(self) -> None:
        self.dead = True
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        failure = ZygoteFailed(f"The worker's zygote (pid {self.process.pid}) ended.")
        if not self.ready.done():
            self.ready.set_exception(failure)
        for reply in self.replies.values():
            if not reply.done():
                reply.set_exception(failure)
        self.replies.clear()
        for pid in self.followed:
            exit_ = self.exit_of(pid)
            if not exit_.done():
                exit_.set_result(None)  # its children died with it (their parent-death signal)
        with contextlib.suppress(ChildProcessError, OSError):
            self.process.poll()

    async def request(self, message: dict[str, Any], fds: Sequence[int] = ()) -> dict[str, Any]:
        future = self.replies[message["id"]] = self.loop.create_future()
        data = json.dumps(message).encode() + b"\n"
        async with self.sending:
            await self._send(data, fds)
        return await future

    def notify(self, message: dict[str, Any]) -> None:
        """Send ``message``, which has no reply: now, ahead of any request made after this
        call, when nothing is being sent; what the socket does not take at once is sent before
        anything else."""
        if self.dead:
            return
        data = json.dumps(message).encode() + b"\n"
        if not self.sending.locked() and not self._tail:
            try:
                data = data[self.sock.send(data):]
            except BlockingIOError:
                pass
            except OSError:
                return
            if not data:
                return
        self._tail += data
        note = self.loop.create_task(self._flush())
        self._notes.add(note)
        note.add_done_callback(self._notes.discard)

    async def _flush(self) -> None:
        async with self.sending:
            with contextlib.suppress(ZygoteFailed):
                await self._send(b"", ())

    async def _send(self, data: bytes, fds: Sequence[int]) -> None:
        if self.dead:
            raise ZygoteFailed(f"The worker's zygote (pid {self.process.pid}) ended.")
        if self._tail:  # the rest of a notice, first (this runs under the sending lock)
            tail, self._tail = self._tail, b""
            await self._send(tail, ())
        if not data:
            return
        view = memoryview(data)
        first = True
        while view:
            try:
                if first:
                    sent = socket.send_fds(self.sock, [view], list(fds)) if fds \
                        else self.sock.send(view)
                    first = False
                else:
                    sent = self.sock.send(view)
                view = view[sent:]
            except BlockingIOError:
                writable = self.loop.create_future()
                self.loop.add_writer(self.sock.fileno(), writable.set_result, None)
                try:
                    await writable
                finally:
                    self.loop.remove_writer(self.sock.fileno())
            except OSError as exc:
                raise ZygoteFailed(f"The worker's zygote is gone ({exc}).") from exc

    def drain(self) -> None:
        """Send it nothing more: it ends once its last child has exited."""
        if not self.dead:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    async def wait_ended(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class ZygoteRunner:
    """Runs each task in a child forked by the worker's zygote (see the module docstring)."""

    def __init__(self, includes: Sequence[str] = (), loglevel: str = "INFO",
                 max_steps_per_child: int = DEFAULT_MAX_STEPS_PER_CHILD) -> None:
        self.includes = list(includes)
        self.loglevel = loglevel
        self.max_steps_per_child = max(1, max_steps_per_child)
        self._current: _Generation | None = None
        self._starting: asyncio.Task[_Generation] | None = None
        self._old: list[_Generation] = []
        # Keyed by delivery key (see the module docstring).
        self._children: dict[str, _Child] = {}  # its forked child
        self._pages: dict[str, mmap.mmap] = {}  # its control page (while it lives)
        # Stopped before they reached the zygote (remembered a while; ids are unique).
        self._stop_before_fork: dict[str, str] = {}
        self._deadlines: dict[str, float] = {}  # fences renewed before the task started
        self._tried: set[str] = set()  # stale reasons a new zygote did not cure
        self._checks = 0
        self._watching: asyncio.Task[None] | None = None
        self.on_fenced: Any = None  # told (delivery key) when a step stopped itself at its fence
        self.loaded_in = 0.0  # seconds the last zygote took to load the code

    # -- zygotes ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the first zygote and wait until it has loaded the code (raises
        :class:`ZygoteFailed` with its traceback if it cannot)."""
        await self._generation()
        self._watching = asyncio.create_task(self._watch())

    async def _generation(self) -> _Generation:
        current = self._current
        if current is not None and not current.dead:
            return current
        return await self._replace([])

    async def _replace(self, warm: Sequence[str]) -> _Generation:
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._start_generation(warm))
        return await asyncio.shield(self._starting)

    async def _start_generation(self, warm: Sequence[str]) -> _Generation:
        began = time.monotonic()
        generation = _Generation(self.includes, warm, self.loglevel, self.max_steps_per_child)
        try:
            ready = await generation.ready
        except ZygoteFailed:
            await generation.wait_ended(5)
            raise
        except asyncio.CancelledError:  # the worker stops before it was ready
            generation.process.kill()
            generation.process.wait()
            raise
        old, self._current = self._current, generation
        if old is not None:
            old.drain()
            self._old.append(old)
        self._old = [g for g in self._old if g.process.poll() is None]
        # The first is told in the worker's "consuming" line.
        logger.log(logging.INFO if old is not None else logging.DEBUG,
                   "Zygote %d ready in %.2f s (%d source files tracked).",
                   generation.process.pid, time.monotonic() - began, ready["files"])
        self.loaded_in = time.monotonic() - began
        return generation

    async def _watch(self) -> None:
        """While idle, look for edited source files and reload ahead of the next task."""
        pause = WATCH_SECONDS
        while True:
            await asyncio.sleep(pause)
            generation = self._current
            if generation is None or generation.dead or self._pages:
                continue
            self._checks += 1
            try:
                reply = await asyncio.wait_for(
                    generation.request({"op": "check", "id": f"check-{self._checks}"}), 30)
            except (ZygoteFailed, TimeoutError):
                continue
            if reply["changed"] and generation is self._current:
                logger.info("%s changed: loading the code again.", reply["changed"])
                try:
                    await self._replace(reply["warm"])
                    pause = WATCH_SECONDS
                except ZygoteFailed as failed:
                    # Kept until it loads: the next task reports the error; look less often.
                    logger.error("The changed code does not load:\n%s", failed)
                    pause = min(pause * 2, 60.0)

    async def close(self) -> None:
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
        generations = [g for g in [self._current, *self._old] if g is not None]
        for generation in generations:
            generation.drain()
        for generation in generations:
            await generation.wait_ended(KILL_GRACE_SECONDS)

    # -- tasks ------------------------------------------------------------------------------

    def set_fence(self, delivery: str, deadline: float) -> None:
        """The lease of ``delivery`` was renewed: its process must be gone by ``deadline``
        (monotonic) unless renewed again. The child watches this itself, so it stops in time
        even when this process is frozen or stalled and cannot stop it."""
        page = self._pages.get(delivery)
        if page is not None:
            write_deadline(page, deadline)
            return
        self._deadlines[delivery] = deadline  # not started yet (or just ended: bounded below)
        _bound(self._deadlines)

    async def run(self, delivery: str, entry: str, kwargs: dict[str, Any], label: str,
                  kind: str = STEP, reuse: str | None = None) -> StepOutcome:
        """Prepare ``entry(**kwargs)`` in the zygote and run what it returns in a child. Steps
        with the same ``reuse`` key (one run's, with the same code) may run one after another
        in one child (see :mod:`~dagster_taskiq.worker.zygote`)."""
        stopped = self._stop_before_fork.pop(delivery, None)
        deadline = self._deadlines.pop(delivery, None)
        if stopped is not None:
            return _stopped_early(delivery, label, stopped)
        fd = os.memfd_create(f"dagster-taskiq-{delivery}", os.MFD_CLOEXEC)
        os.ftruncate(fd, PAGE_SIZE)
        page = self._pages[delivery] = mmap.mmap(fd, PAGE_SIZE)
        write_deadline(page, deadline if kind == STEP and deadline is not None else float("inf"))
        try:
            started = await self._fork(delivery, entry, dict(kwargs), label, kind, fd, page,
                                       reuse)
            if isinstance(started, dict):
                return started
            generation, read_fd, pid, reply = started
            return await self._follow(delivery, label, kind, generation, read_fd, pid, page,
                                      reply)
        finally:
            os.close(fd)
            self._pages.pop(delivery, None)
            page.close()

    async def _fork(self, delivery: str, entry: str, kwargs: dict[str, Any], label: str,
                    kind: str, page_fd: int, page: mmap.mmap, reuse: str | None
                    ) -> StepOutcome | tuple[_Generation, int, int, dict[str, Any]]:
        stale_ok = False
        for attempt in range(RELOADS_PER_TASK + 2):
            try:
                generation = await self._generation()
            except ZygoteFailed as failed:
                return _failure_outcome("The worker could not load the code", str(failed))
            read_fd, write_fd = os.pipe()
            try:
                reply = await generation.request(
                    {"op": "task", "id": delivery, "entry": entry, "kwargs": kwargs,
                     "kind": kind, "stale_ok": stale_ok, "reuse": reuse}, [write_fd, page_fd])
            except ZygoteFailed as failed:
                os.close(read_fd)
                return _failure_outcome("The worker's zygote ended", str(failed))
            finally:
                os.close(write_fd)  # the child's now (the zygote passed it on)
            if "pid" in reply:
                generation.followed.add(reply["pid"])
                return generation, read_fd, reply["pid"], reply
            os.close(read_fd)
            if "stopped" in reply:
                return _stopped_early(delivery, label, "released" if reply["stopped"] == "r"
                                      else "cancelled")
            if "outcome" in reply:
                # Said here too: the orchestrator records it as the step's failure, but
                # whoever looks at this worker (its code or environment is what is wrong)
                # sees it first.
                outcome = reply["outcome"]
                error = deserialize_value(outcome["error"], SerializableErrorInfo)
                logger.error("Task %s: could not prepare its %s (%s):\n%s", delivery, kind,
                             label, error.to_string().strip())
                return outcome
            # Stale: planned from other code, or a source file changed since it was loaded.
            if generation is not self._current:
                continue  # replaced meanwhile: try the new one
            key = reply["stale"]
            if key in self._tried or attempt >= RELOADS_PER_TASK:
                stale_ok = True  # a new zygote did not cure it: run what this machine has
                continue
            self._tried.add(key)
            _bound_set(self._tried)
            logger.warning("Task %s: %s; loading the code again.", delivery, reply["reason"])
            try:
                await self._replace([])
            except ZygoteFailed as failed:
                return _failure_outcome("The worker could not load the changed code",
                                        str(failed))
        return _failure_outcome("The worker could not settle on one version of the code",
                                "its zygote kept reporting it stale")

    async def _follow(self, delivery: str, label: str, kind: str, generation: _Generation,
                      read_fd: int, pid: int, page: mmap.mmap, reply: dict[str, Any]
                      ) -> StepOutcome:
        grace = RUN_KILL_GRACE_SECONDS if kind == RUN else KILL_GRACE_SECONDS
        child = self._children[delivery] = _Child(pid, label, grace, kind)
        if reply.get("reused"):
            logger.info("Task %s: %s (child %d, its step %d).", delivery, label, pid,
                        reply["reused"])
        else:
            logger.info("Task %s: %s (child %d).", delivery, label, pid)
        answered = False
        # Stopped between the zygote's last look and now: deliver it.
        stop = read_stop(page)
        if stop == RELEASED:
            self.release(delivery)
        elif stop == CANCELLED:
            self.kill(delivery)
        try:
            data = await _read_all(read_fd)
            outcome = _parse(data)
            if outcome is not None and not child.released:
                if outcome.get("skipped"):
                    logger.warning("Task %s: not running %s: its run is %s.", delivery, label,
                                   outcome["skipped"])
                else:
                    logger.info("Task %s finished in %.3f s (child %d).",
                                delivery, time.time() - child.started, pid)
                answered = True
                return outcome
            status = await generation.exit_of(pid)
            exit_code = -signal.SIGKILL if status is None else os.waitstatus_to_exitcode(status)
            fenced = (kind == STEP and exit_code == -signal.SIGKILL
                      and time.monotonic() > read_deadline(page))
        finally:
            self._children.pop(delivery, None)
            generation.followed.discard(pid)
            generation.exits.pop(pid, None)
            if reply.get("reusable"):
                # The zygote may give it another step of its run: only if it answered and was
                # never signalled (a late SIGINT or SIGKILL must not reach the next step).
                generation.notify({"op": "done", "pid": pid,
                                   "reuse": answered and not child.signalled})
        logger.info("Task %s ended in %.3f s (child %d, exit %d).",
                    delivery, time.time() - child.started, pid, exit_code)
        if fenced and not child.released:
            # It stopped itself: its lease was not renewed in time (this process was frozen
            # or cut off). Not a crash: the task is another worker's now, or will be.
            logger.error("Task %s stopped itself: its lease was not renewed in time; it goes "
                         "back to its queue.", delivery)
            if self.on_fenced is not None:
                self.on_fenced(delivery)
            child.released = True
        if child.released:
            raise NoResultError  # handed back to the queue: another worker will answer
        return _crash_outcome(pid, exit_code)

    def _stop_early(self, delivery: str, flag: bytes, how: str) -> None:
        page = self._pages.get(delivery)
        if page is not None:  # with the zygote, not forked yet: it never will
            if read_stop(page) != RELEASED:  # a hand-back wins over a cancel
                page[STOP_OFFSET:STOP_OFFSET + 1] = flag
            return
        if self._stop_before_fork.get(delivery) != "released":
            self._stop_before_fork[delivery] = how
        _bound(self._stop_before_fork)

    def kill(self, delivery: str, grace: float | None = None) -> None:
        """Stop a task: SIGINT its process group once (a second SIGINT means "force quit" to
        tools such as dbt), SIGKILL after its grace; ``grace=0`` kills at once."""
        child = self._children.get(delivery)
        if child is None:
            self._stop_early(delivery, CANCELLED, "cancelled")
            return
        if grace is None and child.cancelling:
            return  # the heartbeat repeats the request every second: it was delivered
        logger.warning("Stopping task %s (%s, child %d).", delivery, child.label, child.pid)
        grace = child.grace if grace is None else grace
        child.signalled = True
        if grace <= 0:
            _signal(child.pid, signal.SIGKILL)
            return
        child.cancelling = True
        _signal(child.pid, signal.SIGINT)
        asyncio.get_running_loop().call_later(grace, self._force_kill, delivery, child.pid)

    def release(self, delivery: str) -> None:
        """Kill the task at once and give no result (its message goes back to the queue); one
        not forked yet never forks."""
        child = self._children.get(delivery)
        if child is None:
            self._stop_early(delivery, RELEASED, "released")
            return
        child.released = True
        self.kill(delivery, grace=0)

    def _force_kill(self, delivery: str, pid: int) -> None:
        child = self._children.get(delivery)
        if child is not None and child.pid == pid:
            _signal(pid, signal.SIGKILL)

    @property
    def zygote_pid(self) -> int | None:
        return self._current.process.pid if self._current is not None else None

    @property
    def task_ids(self) -> list[str]:
        return [delivery.partition("#")[0] for delivery in self._children]

    def describe(self) -> list[dict[str, object]]:
        return [
            {"task_id": delivery.partition("#")[0], "what": child.label, "kind": child.kind,
             "pid": child.pid, "started": child.started}
            for delivery, child in self._children.items()
        ]


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _bound(recent: dict[str, Any], size: int = 10_000) -> None:
    """Forget the oldest entries of a per-task dict that tasks may leave behind."""
    while len(recent) > size:
        del recent[next(iter(recent))]


def _bound_set(seen: set[str], size: int = 10_000) -> None:
    if len(seen) > size:
        seen.clear()


def _stopped_early(delivery: str, label: str, how: str) -> StepOutcome:
    if how == "released":
        logger.info("Task %s: handed back before it started (%s).", delivery, label)
        raise NoResultError
    logger.info("Task %s: cancelled before it started (%s).", delivery, label)
    return {"events": [], "error": None, "crashed": False, "skipped": "canceling"}


async def _read_all(fd: int) -> bytes:
    """Read a pipe to EOF without blocking the loop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        return await reader.read()
    finally:
        transport.close()


def _parse(data: bytes) -> StepOutcome | None:
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def _failure_outcome(what: str, detail: str) -> StepOutcome:
    error = SerializableErrorInfo(message=f"{what}: {detail}", stack=[], cls_name="ZygoteFailed")
    return {"events": [], "error": serialize_value(error), "crashed": False}


def _crash_outcome(pid: int, exit_code: int) -> StepOutcome:
    how = (f"was killed by signal {-exit_code} ({signal.Signals(-exit_code).name})"
           if exit_code < 0 else f"exited with code {exit_code}")
    error = SerializableErrorInfo(
        message=f"The task's process (pid {pid}) {how} before reporting a result.",
        stack=[],
        cls_name="TaskProcessCrashed",
    )
    return {"events": [], "error": serialize_value(error), "crashed": True,
            "exit_code": exit_code}

