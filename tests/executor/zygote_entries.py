"""Task entries for the process-model tests: each prepares (in the zygote) and returns the body
its forked child runs, as ``dagster_taskiq.worker.steps`` does for real steps."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path


def _outcome(**extra: object) -> dict:
    return {"events": [], "error": None, "crashed": False, **extra}


def sleeper(seconds: float = 0.0, prepare_seconds: float = 0.0, marker: str = ""):
    time.sleep(prepare_seconds)

    def body() -> dict:
        time.sleep(seconds)
        if marker:
            Path(marker).write_text(str(os.getpid()))
        return _outcome(pid=os.getpid())

    return body


def stubborn(count: str, ready: str):
    def count_it(*_: object) -> None:
        with Path(count).open("a") as counted:
            counted.write("x")

    def body() -> dict:
        signal.signal(signal.SIGINT, count_it)
        Path(ready).write_text("1")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.05)
        return _outcome()

    return body


def process_group(path: str):
    def body() -> dict:
        Path(path).write_text(str(os.getpgid(0)))
        return _outcome()

    return body


def _fds() -> dict[str, str]:
    """This process's descriptors above stderr: number -> what it is (``socket:[...]``...)."""
    targets = {}
    for fd in os.listdir("/proc/self/fd"):
        if int(fd) > 2:
            try:
                targets[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue  # the one listdir itself used
    return targets


def inheritance(path: str):
    """What a task's child starts with: its threads, its descriptors, whether an event loop
    runs, and whether ``get_event_loop().run_until_complete`` works (it fails in a child of a
    process whose loop is running)."""

    def body() -> dict:
        threads = sorted(t.name for t in threading.enumerate())
        fds = _fds()  # before this body makes a loop of its own
        try:
            asyncio.get_running_loop()
            running = True
        except RuntimeError:
            running = False
        try:
            value = asyncio.get_event_loop().run_until_complete(asyncio.sleep(0, result=42))
        except RuntimeError as error:
            value = str(error)
        Path(path).write_text(json.dumps({"threads": threads, "fds": fds,
                                          "loop_running": running, "run_until_complete": value}))
        return _outcome()

    return body


def user_code(path: str):
    """A task of user code that started a busy thread and opened a connection at import."""
    import tests.executor.user_code_at_import as user

    def body() -> dict:
        for _ in range(100):  # the logging locks the thread keeps taking
            user.logger.info("a step logs")
        import email.mime.text  # noqa: F401 - the import lock, too
        value = asyncio.get_event_loop().run_until_complete(asyncio.sleep(0, result=7))
        Path(path).write_text(json.dumps({"value": value, "peer": user.peer_alive()}))
        return _outcome()

    return body


def crasher(code: int = 3):
    """A task whose body ends its process before it replies (a segfault, ``os._exit``)."""

    def body() -> dict:
        os._exit(code)

    return body


def descriptors(path: str):
    """Writes what descriptors the child running it holds (see :func:`_fds`)."""

    def body() -> dict:
        Path(path).write_text(json.dumps(_fds()))
        return _outcome(pid=os.getpid())

    return body


def raiser():
    """A task whose body raises (its step failed): its child is still fine to reuse."""

    def body() -> dict:
        raise ValueError(f"raised in {os.getpid()}")

    return body
