"""The worker process: consume queues, run each step in a forked child, keep leases alive.

One worker process holds the broker connection, the heartbeat and the loaded code (instances and
jobs per code pointer). Each step runs in a child forked from that warm process: it starts in
milliseconds with user code already imported, a crash (``os._exit``, a signal, the OOM killer)
only ends the child, and a cancelled step is stopped by killing it. ``concurrency`` is how many
children may run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dagster._serdes import serialize_value
from dagster._utils.error import SerializableErrorInfo
from taskiq.acks import AcknowledgeType
from taskiq.receiver import Receiver

from dagster_taskiq.app import make_app
from dagster_taskiq.broker import RedisLeaseBroker
from dagster_taskiq.config import DEFAULT_QUEUE, BrokerSettings, mask_url
from dagster_taskiq.tasks import StepOutcome, error_outcome

logger = logging.getLogger("dagster_taskiq.worker")

KILL_GRACE_SECONDS = 5.0


class ForkStepRunner:
    """Runs each step in a child process forked from this (warm) worker process."""

    def __init__(self) -> None:
        self._children: dict[str, int] = {}  # task id -> child pid

    async def run(self, task_id: str, step: Callable[[], StepOutcome]) -> StepOutcome:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: run the step, write its outcome, leave without cleanup
            os.close(read_fd)
            _child_main(step, write_fd)
        os.close(write_fd)
        self._children[task_id] = pid
        started = time.monotonic()
        try:
            data = await _read_all(read_fd)
            status = await _wait_exit(pid)
        finally:
            self._children.pop(task_id, None)
        exit_code = os.waitstatus_to_exitcode(status)
        logger.info("Task %s finished in %.3f s (child %d, exit %d).",
                    task_id, time.monotonic() - started, pid, exit_code)
        if data:
            with contextlib.suppress(ValueError):
                return json.loads(data)
        return _crash_outcome(pid, exit_code)

    def kill(self, task_id: str) -> None:
        """Stop a running step: SIGTERM its process group, SIGKILL after a grace period."""
        pid = self._children.get(task_id)
        if pid is None:
            return
        logger.warning("Stopping task %s (child %d).", task_id, pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        asyncio.get_running_loop().call_later(KILL_GRACE_SECONDS, self._force_kill, task_id, pid)

    def _force_kill(self, task_id: str, pid: int) -> None:
        if self._children.get(task_id) == pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    def kill_all(self) -> None:
        for task_id in list(self._children):
            self.kill(task_id)

    @property
    def running(self) -> int:
        return len(self._children)


def _child_main(step: Callable[[], StepOutcome], write_fd: int) -> None:
    # Undo what the parent's event loop installed: signals must not reach the parent's loop.
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    os.setpgid(0, 0)  # own process group, so a kill also reaches what the step started
    code = 0
    try:
        try:
            outcome = step()
        except BaseException:
            outcome = error_outcome()
        payload = json.dumps(outcome).encode()
        view = memoryview(payload)
        while view:
            view = view[os.write(write_fd, view):]
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
        message=f"The step's process (pid {pid}) {how} before reporting a result.",
        stack=[],
        cls_name="StepProcessCrashed",
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


async def run_worker(options: WorkerOptions, ready: Callable[[], None] | None = None) -> None:
    """Serve ``options.queues`` until SIGTERM/SIGINT; then finish running steps and stop.
    A second signal stops the running steps too (their leases return them to the queue)."""
    for module in options.includes:
        importlib.import_module(module)
    holder = f"{options.name}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    broker = make_app(options.settings, queues=options.queues, holder=holder)
    assert isinstance(broker, RedisLeaseBroker), "workers need a Redis broker, not eager mode"
    runner = ForkStepRunner()
    broker.is_worker_process = True
    broker.state.step_runner = runner
    broker.state.worker_name = options.name
    broker.on_cancel = runner.kill
    broker.on_lost = runner.kill  # another worker has it now: never run a step twice
    await broker.startup()

    finish = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if finish.is_set():
            logger.warning("Second %s: stopping %d running step(s).", sig.name, runner.running)
            runner.kill_all()
            return
        logger.info("%s received: finishing %d running step(s), taking no new ones.",
                    sig.name, runner.running)
        finish.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    receiver = Receiver(
        broker,
        max_async_tasks=options.concurrency,
        max_prefetch=0,
        run_startup=False,
        ack_type=AcknowledgeType.WHEN_SAVED,
    )
    logger.info("Worker %s (pid %d) consuming %s with concurrency %d from %s.",
                options.name, os.getpid(), list(options.queues), options.concurrency,
                mask_url(options.settings.broker_url))
    if ready is not None:
        ready()
    try:
        await receiver.listen(finish)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await broker.shutdown()
        logger.info("Worker %s stopped.", options.name)
