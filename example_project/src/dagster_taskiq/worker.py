"""The worker process: consume queues, run each task in a forked child, keep leases alive.

One worker process holds the broker connections, the heartbeats and the loaded code (instances
and jobs per code pointer). Each step and each run executes in a child forked from that warm
process: it starts in milliseconds with user code already imported, a crash (``os._exit``, a
signal, the OOM killer) only ends the child, and a cancelled task is stopped by killing it.

Steps and runs have separate pools of ``concurrency`` slots each, so a run launched onto a worker
never starves the steps it submits (no deadlock even with a single worker of concurrency 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import json
import logging
import mmap
import os
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dagster._serdes import serialize_value
from dagster._utils.error import SerializableErrorInfo
from taskiq.acks import AcknowledgeType
from taskiq.exceptions import NoResultError
from taskiq.receiver import Receiver

from dagster_taskiq import log_mirror
from dagster_taskiq.app import make_app
from dagster_taskiq.broker import (
    REDIS_ERRORS,
    RUN,
    STEP,
    Backoff,
    RedisLeaseBroker,
    stop_loop,
    supervise,
)
from dagster_taskiq.config import DEFAULT_QUEUE, BrokerSettings, mask_url
from dagster_taskiq.registry import WorkerInfo, publish, remove
from dagster_taskiq.tasks import StepOutcome, error_outcome

logger = logging.getLogger("dagster_taskiq.worker")

T = TypeVar("T")

# On cancel: SIGINT first (Dagster records the interruption), SIGKILL after the grace. A run's
# orchestrator gets longer than its steps: it waits for their replies before it records
# RUN_CANCELED, and killing it first would leave the run CANCELING.
KILL_GRACE_SECONDS = 5.0
RUN_KILL_GRACE_SECONDS = 30.0


@dataclass
class _Child:
    pid: int
    label: str
    grace: float
    started: float = field(default_factory=time.time)
    released: bool = False
    cancelling: bool = False


class ChildProcessRunner:
    """Runs each task body in a child process forked from this (warm) worker process."""

    def __init__(self) -> None:
        self._children: dict[str, _Child] = {}  # task id -> child
        # Tasks released or cancelled before they forked (while being prepared): they never
        # fork. Ids are unique, so remembering a few thousand recent ones is enough.
        self._stop_before_fork: dict[str, str] = {}
        self._reaping: set[asyncio.Task[int]] = set()
        self._forking = asyncio.Lock()
        # Each step's fence deadline (see set_fence), and the page its child reads it from.
        self._deadlines: dict[str, float] = {}
        self._fences: dict[str, mmap.mmap] = {}
        # Told when a step stopped itself at its fence: its lease must be let go.
        self.on_fenced: Callable[[str], None] | None = None

    def set_fence(self, task_id: str, deadline: float) -> None:
        """The lease of ``task_id`` was renewed: its process must be gone by ``deadline``
        (monotonic) unless renewed again. The child watches this itself, so it stops in time
        even when this process is frozen or stalled and cannot stop it."""
        fence = self._fences.get(task_id)
        if fence is not None:
            fence[:8] = struct.pack("d", deadline)
            return
        self._deadlines[task_id] = deadline  # not forked yet (or just ended: bounded below)
        _bound(self._deadlines)

    async def prepare(self, load: Callable[[], T], task_id: str = "") -> T:
        """Load what a task needs (user code on first use, the instance, the run) on a thread,
        so heartbeats go on meanwhile; never while a fork happens (the child would inherit
        half-taken locks)."""
        # A new delivery of a task this worker stopped before (its lease was lost, it came
        # back from the queue) starts afresh.
        self._stop_before_fork.pop(task_id, None)
        try:
            async with self._forking:
                return await asyncio.to_thread(load)
        except BaseException:
            self._stop_before_fork.pop(task_id, None)
            self._deadlines.pop(task_id, None)
            raise

    def _stop_early(self, task_id: str, how: str) -> None:
        if self._stop_before_fork.get(task_id) != "released":  # a hand-back wins over a cancel
            self._stop_before_fork[task_id] = how
        _bound(self._stop_before_fork)

    async def run(self, task_id: str, body: Callable[[], StepOutcome], label: str,
                  kind: str = STEP) -> StepOutcome:
        grace = RUN_KILL_GRACE_SECONDS if kind == RUN else KILL_GRACE_SECONDS
        parent = os.getpid()
        async with self._forking:
            stopped = self._stop_before_fork.pop(task_id, None)
            deadline = self._deadlines.pop(task_id, None)
            if stopped is None:
                # A shared page the parent writes the fence deadline to (steps only: a run
                # is never handed out twice, so its orchestrator rides outages out).
                fence = None
                if kind == STEP and deadline is not None:
                    fence = self._fences[task_id] = mmap.mmap(-1, 8)
                    fence[:8] = struct.pack("d", deadline)
                # The pipe is made under the lock and its write end closed before the lock is
                # let go: no other task's child can inherit it (and hold its EOF back).
                read_fd, write_fd = os.pipe()
                pid = os.fork()
                if pid == 0:  # the child: run the body, write its outcome, leave without cleanup
                    os.close(read_fd)
                    _child_main(body, write_fd, parent, fence)
                os.close(write_fd)
                # Also set here, so its process group exists before anyone may signal it.
                with contextlib.suppress(OSError):
                    os.setpgid(pid, pid)
        if stopped == "released":
            logger.info("Task %s: handed back before it started (%s).", task_id, label)
            raise NoResultError
        if stopped == "cancelled":
            logger.info("Task %s: cancelled before it started (%s).", task_id, label)
            return {"events": [], "error": None, "crashed": False, "skipped": "canceling"}
        child = self._children[task_id] = _Child(pid, label, grace)
        logger.info("Task %s: %s (child %d).", task_id, label, pid)
        try:
            data = await _read_all(read_fd)
            outcome = _parse(data)
            if outcome is not None and not child.released:
                # The child closed its pipe after writing: answer now, reap it in the
                # background (its exit, unmapping a large process, takes milliseconds).
                self._reaping.add(asyncio.create_task(_wait_exit(pid)))
                self._reaping = {t for t in self._reaping if not t.done()}
                logger.info("Task %s finished in %.3f s (child %d).",
                            task_id, time.time() - child.started, pid)
                return outcome
            exit_code = os.waitstatus_to_exitcode(await _wait_exit(pid))
            fence = self._fences.get(task_id)
            fenced = (fence is not None and exit_code == -signal.SIGKILL
                      and time.monotonic() > struct.unpack("d", fence[:8])[0])
        finally:
            self._children.pop(task_id, None)
            fence = self._fences.pop(task_id, None)
            if fence is not None:
                fence.close()
        logger.info("Task %s ended in %.3f s (child %d, exit %d).",
                    task_id, time.time() - child.started, pid, exit_code)
        if fenced and not child.released:
            # It stopped itself: its lease was not renewed in time (this process was frozen
            # or cut off). Not a crash: the task is another worker's now, or will be.
            logger.error("Task %s stopped itself: its lease was not renewed in time; it goes "
                         "back to its queue.", task_id)
            if self.on_fenced is not None:
                self.on_fenced(task_id)
            child.released = True
        if child.released:
            raise NoResultError  # handed back to the queue: another worker will answer
        return _crash_outcome(pid, exit_code)

    def kill(self, task_id: str, grace: float | None = None) -> None:
        """Stop a task: SIGINT its process group once (a second SIGINT means "force quit" to
        tools such as dbt), SIGKILL after its grace; ``grace=0`` kills at once."""
        child = self._children.get(task_id)
        if child is None:
            self._stop_early(task_id, "cancelled")
            return
        if grace is None and child.cancelling:
            return  # the heartbeat repeats the request every second: it was delivered
        logger.warning("Stopping task %s (%s, child %d).", task_id, child.label, child.pid)
        grace = child.grace if grace is None else grace
        if grace <= 0:
            self._signal(child.pid, signal.SIGKILL)
            return
        child.cancelling = True
        self._signal(child.pid, signal.SIGINT)
        asyncio.get_running_loop().call_later(grace, self._force_kill, task_id, child.pid)

    def release(self, task_id: str) -> None:
        """Kill the task at once and give no result (its message goes back to the queue); one
        still being prepared never starts."""
        child = self._children.get(task_id)
        if child is None:
            self._stop_early(task_id, "released")
            return
        child.released = True
        self.kill(task_id, grace=0)

    def _force_kill(self, task_id: str, pid: int) -> None:
        child = self._children.get(task_id)
        if child is not None and child.pid == pid:
            self._signal(pid, signal.SIGKILL)

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

    @property
    def task_ids(self) -> list[str]:
        return list(self._children)

    def describe(self) -> list[dict[str, object]]:
        return [
            {"task_id": task_id, "what": child.label, "pid": child.pid, "started": child.started}
            for task_id, child in self._children.items()
        ]


def _bound(recent: dict[str, Any], size: int = 10_000) -> None:
    """Forget the oldest entries of a per-task dict that tasks may leave behind."""
    while len(recent) > size:
        del recent[next(iter(recent))]


def _die_with_parent(parent: int) -> None:
    """If the worker dies (SIGKILL, OOM), its tasks must die too: their leases will expire and
    the tasks run elsewhere, so an orphan would mean the same step running twice."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the worker died before prctl took effect
        os._exit(1)


_PR_SET_PDEATHSIG = 1


def _watch_fence(fence: mmap.mmap) -> None:
    """Stop this task's whole process group once its fence deadline passes without renewal:
    the worker could not renew the lease (or is frozen), so another worker may take the task
    soon, and this copy must be gone first."""
    while True:
        deadline = struct.unpack("d", fence[:8])[0]
        if time.monotonic() > deadline:
            os.write(2, f"Task process {os.getpid()}: its lease was not renewed in time; "
                        "stopping (the task goes back to its queue).\n".encode())
            os.killpg(0, signal.SIGKILL)
        time.sleep(FENCE_WATCH_SECONDS)


FENCE_WATCH_SECONDS = 0.1


def _child_main(body: Callable[[], StepOutcome], write_fd: int, parent: int,
                fence: mmap.mmap | None = None) -> None:
    _die_with_parent(parent)
    # Undo what the parent's event loop installed: signals must not reach the parent's loop.
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setpgid(0, 0)  # own process group, so a kill also reaches what the task started
    if fence is not None:
        threading.Thread(target=_watch_fence, args=(fence,), daemon=True,
                         name="dagster-taskiq-fence").start()
    code = 0
    try:
        try:
            outcome = body()
        except BaseException:
            outcome = error_outcome()
        payload = json.dumps(outcome).encode()
        view = memoryview(payload)
        while view:
            view = view[os.write(write_fd, view):]
        os.close(write_fd)  # EOF for the parent now, not after this process is torn down
    except BaseException:
        code = 70
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


async def _read_all(fd: int) -> bytes:
    """Read a pipe to EOF without blocking the loop (and without threads: we fork)."""
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


async def _wait_exit(pid: int) -> int:
    delay = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


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


@dataclass
class WorkerOptions:
    settings: BrokerSettings
    queues: Sequence[str] = (DEFAULT_QUEUE,)
    concurrency: int = 1
    name: str = field(default_factory=lambda: f"dagster-{uuid.uuid4().hex[:6]}")
    includes: Sequence[str] = ()
    shutdown_timeout: float = 30.0


def _consumer(options: WorkerOptions, worker_id: str, kind: str,
              runner: ChildProcessRunner) -> RedisLeaseBroker:
    broker = make_app(options.settings, queues=options.queues, holder=worker_id, kind=kind)
    assert isinstance(broker, RedisLeaseBroker), "workers need a Redis broker, not eager mode"
    broker.is_worker_process = True
    broker.state.step_runner = runner
    broker.state.worker_name = options.name
    broker.on_cancel = runner.kill
    if kind == STEP:
        broker.on_lost = runner.release  # another worker has it now: never run a task twice
        broker.on_renewed = runner.set_fence
        runner.on_fenced = broker.give_up_lease
    else:
        broker.on_lost = _run_goes_on
    return broker


def _run_goes_on(task_id: str) -> None:
    # A run is never handed out twice (an expired run lease drops the task), so a lost lease
    # (a Redis outage longer than it) means nobody else runs it: the orchestrator goes on,
    # and the launcher's health check finds it in this worker's registry entry.
    logger.warning("The lease on run task %s lapsed (a Redis outage?); the run goes on here.",
                   task_id)


async def run_worker(options: WorkerOptions) -> None:
    """Serve ``options.queues`` until SIGTERM/SIGINT or ``worker terminate``; then take no new
    tasks, let running ones finish for up to ``shutdown_timeout`` seconds, and hand whatever
    still runs back to its queue. A second signal does that at once."""
    # Loaded here once, so every task's child inherits it: what runs need (Dagster's run
    # entry points), then the user's modules.
    importlib.import_module("dagster._cli.api")
    for module in options.includes:
        importlib.import_module(module)
    if not log_mirror.install():
        logger.warning("Compute logs are mirrored by Dagster's tail processes (unexpected "
                       "Dagster version): steps start more slowly.")
    host = socket.gethostname()
    worker_id = f"{options.name}@{host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    runner = ChildProcessRunner()
    finish = asyncio.Event()
    hurry = asyncio.Event()
    crashed: list[str] = []

    def on_crash(what: str, error: BaseException) -> None:
        # A dead heartbeat or registry loop must not leave a worker that looks alive: stop at
        # once (tasks still running are handed back) and exit non-zero for the supervisor.
        logger.critical("%s died (%r): the worker stops so that its supervisor restarts it.",
                        what, error)
        crashed.append(what)
        finish.set()
        hurry.set()

    consumers = [_consumer(options, worker_id, kind, runner) for kind in (STEP, RUN)]
    for consumer in consumers:
        consumer.on_crash = on_crash
        await consumer.startup()
    info = WorkerInfo(worker_id, options.name, host, os.getpid(), list(options.queues),
                      options.concurrency, time.time())
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if finish.is_set():
            logger.warning("Second %s: handing %d running task(s) back to their queues.",
                           sig.name, len(runner.task_ids))
            hurry.set()
            return
        logger.info("%s received: finishing %d running task(s), taking no new ones.",
                    sig.name, len(runner.task_ids))
        finish.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    # Registered before listening, so whoever sees it listening also finds it in the registry;
    # a failover in progress (READONLY) or a restart is waited out, as everywhere else.
    backoff = Backoff()
    while True:
        try:
            await publish(consumers[0].redis, options.settings.key_prefix, info)
            break
        except REDIS_ERRORS as exc:
            if finish.is_set():
                raise
            logger.warning("Cannot register in the worker registry yet (%s); retrying.", exc)
            await backoff.wait()
    closing = asyncio.Event()
    registry = asyncio.create_task(_registry_loop(consumers[0], info, runner, finish, closing))
    supervise(registry, f"The registry heartbeat of worker {options.name}", on_crash)
    receivers = [
        Receiver(consumer, max_async_tasks=options.concurrency, max_prefetch=0,
                 run_startup=False, ack_type=AcknowledgeType.WHEN_SAVED)
        for consumer in consumers
    ]
    logger.info("Worker %s (pid %d) consuming %s with concurrency %d from %s.",
                options.name, os.getpid(), list(options.queues), options.concurrency,
                mask_url(options.settings.broker_url))
    listening = [asyncio.create_task(receiver.listen(finish)) for receiver in receivers]
    for kind, task in zip((STEP, RUN), listening, strict=True):
        # A receiver that stops on an error would leave a worker that heartbeats and takes
        # nothing: make it a crash (exit 1, its supervisor restarts it).
        supervise(task, f"The {kind} receiver of worker {options.name}", on_crash)
    try:
        await finish.wait()
        deadline = asyncio.create_task(asyncio.sleep(options.shutdown_timeout))
        hurried = asyncio.create_task(hurry.wait())
        await asyncio.wait([asyncio.gather(*listening), deadline, hurried],
                           return_when=asyncio.FIRST_COMPLETED)
        deadline.cancel()
        hurried.cancel()
        if runner.task_ids:
            logger.warning("Handing %d unfinished task(s) back to their queues.",
                           len(runner.task_ids))
            for consumer in consumers:
                for task_id in await consumer.release_held():
                    runner.release(task_id)
        # Released tasks end within moments; anything still listening is told to stop.
        _, pending = await asyncio.wait(listening, timeout=KILL_GRACE_SECONDS)
        for task in pending:
            task.cancel()
        await asyncio.gather(*listening, return_exceptions=True)
    finally:
        closing.set()
        await stop_loop(registry)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(*REDIS_ERRORS):
            await remove(consumers[0].redis, options.settings.key_prefix, worker_id)
        for consumer in consumers:
            await consumer.shutdown()
        logger.info("Worker %s stopped.", options.name)
    if crashed:
        raise WorkerCrashed(f"Worker {options.name} stopped because {crashed[0].lower()} died.")


class WorkerCrashed(Exception):
    """A background loop of the worker died: it stopped, and must exit non-zero."""


async def _registry_loop(broker: RedisLeaseBroker, info: WorkerInfo,
                         runner: ChildProcessRunner, finish: asyncio.Event,
                         closing: asyncio.Event) -> None:
    """Publish this worker in the registry every second; obey ``worker terminate``."""
    backoff = Backoff()
    while not closing.is_set():
        info.tasks = runner.describe()
        try:
            if await publish(broker.redis, broker.settings.key_prefix, info) \
                    and not finish.is_set():
                logger.info("Asked to stop (worker terminate).")
                finish.set()
            backoff.reset()
        except REDIS_ERRORS as exc:
            logger.warning("Registry heartbeat failed (%s); retrying.", exc)
            await backoff.wait()
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), 1.0)
