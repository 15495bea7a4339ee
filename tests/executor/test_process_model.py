"""The worker's process model, on real processes: a real zygote forks every task; what a
task's child inherits, and when a task is stopped before, while and after it forks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from taskiq.exceptions import NoResultError

from dagster_taskiq.worker.runner import ZygoteRunner

ENTRIES = "tests.executor.zygote_entries"


def _with_runner(scenario: Callable[[ZygoteRunner], Awaitable[Any]],
                 includes: tuple[str, ...] = ()) -> Any:
    async def main() -> Any:
        runner = ZygoteRunner(includes)
        await runner.start()
        try:
            return await scenario(runner)
        finally:
            await runner.close()

    return asyncio.run(main())


def test_a_quick_task_never_waits_for_a_slow_siblings_child():
    """Before, a task's result pipe was made before the fork lock was taken, so a slow task
    forked meanwhile inherited its write end: the quick task's result waited for it."""

    async def scenario(runner: ZygoteRunner) -> tuple[float, float]:
        began = time.monotonic()
        slow = asyncio.create_task(
            runner.run("slow", f"{ENTRIES}:sleeper", {"seconds": 3}, "slow"))
        quick = asyncio.create_task(
            runner.run("quick", f"{ENTRIES}:sleeper", {"prepare_seconds": 0.3}, "quick"))
        await quick
        quick_took = time.monotonic() - began
        await slow
        return quick_took, time.monotonic() - began

    quick, slow = _with_runner(scenario)
    assert slow >= 3
    assert quick < 2, f"the quick task's result took {quick:.1f} s (the slow child held it)"


@pytest.mark.parametrize("how", ["release", "kill"])
def test_a_task_stopped_while_it_is_prepared_never_forks(tmp_path: Path, how: str):
    """A task handed back (its lease lost, the worker stopping) or cancelled while the zygote
    prepares it: before, it forked and ran anyway, beside the copy another worker had taken."""
    ran = tmp_path / "ran"

    async def scenario(runner: ZygoteRunner) -> dict:
        task = asyncio.create_task(runner.run(
            "t", f"{ENTRIES}:sleeper", {"prepare_seconds": 0.8, "marker": str(ran)}, "t"))
        await asyncio.sleep(0.3)  # the zygote is preparing it
        getattr(runner, how)("t")
        return await task

    if how == "release":
        with pytest.raises(NoResultError):
            _with_runner(scenario)
    else:
        assert _with_runner(scenario)["skipped"] == "canceling"
    time.sleep(0.2)
    assert not ran.exists()


@pytest.mark.parametrize("how", ["release", "kill"])
def test_a_task_stopped_before_it_reaches_the_zygote_never_forks(tmp_path: Path, how: str):
    ran = tmp_path / "ran"

    async def scenario(runner: ZygoteRunner) -> dict:
        getattr(runner, how)("t")  # e.g. its lease was lost while taskiq decoded it
        return await runner.run("t", f"{ENTRIES}:sleeper", {"marker": str(ran)}, "t")

    if how == "release":
        with pytest.raises(NoResultError):
            _with_runner(scenario)
    else:
        assert _with_runner(scenario)["skipped"] == "canceling"
    assert not ran.exists()


def test_two_deliveries_of_one_task_keep_their_own_fence_and_stop(tmp_path: Path):
    """A worker that took a task again (its first delivery's lease lapsed while it was
    frozen) runs both for a moment: the first one's end, and a late hand-back of it, must not
    take the second's control page (its fence would no longer be renewed) or stop it."""
    second = tmp_path / "second"

    async def scenario(runner: ZygoteRunner) -> dict:
        first = asyncio.create_task(
            runner.run("t#1", f"{ENTRIES}:sleeper", {"seconds": 0.5}, "first"))
        while not runner.task_ids:
            await asyncio.sleep(0.01)
        runner.set_fence("t#2", time.monotonic() + 1.0)
        running = asyncio.create_task(runner.run(
            "t#2", f"{ENTRIES}:sleeper", {"seconds": 2.5, "marker": str(second)}, "second"))
        await first
        runner.release("t#1")  # the late notice about the first delivery
        for _ in range(6):  # the second's lease is renewed past its first fence
            runner.set_fence("t#2", time.monotonic() + 1.0)
            await asyncio.sleep(0.5)
        return await running

    outcome = _with_runner(scenario)
    assert not outcome["crashed"] and second.read_text() == str(outcome["pid"])


def test_a_cancel_repeated_by_every_heartbeat_reaches_the_task_once(tmp_path: Path):
    """The heartbeat reports a cancelled task every second until it ends; tools such as dbt
    take a second SIGINT as "force quit", so only the first is delivered, then SIGKILL after
    the grace."""
    count = tmp_path / "sigints"
    ready = tmp_path / "ready"

    async def scenario(runner: ZygoteRunner) -> tuple[dict, float]:
        running = asyncio.create_task(runner.run(
            "t", f"{ENTRIES}:stubborn", {"count": str(count), "ready": str(ready)}, "t"))
        while not ready.exists():
            await asyncio.sleep(0.05)
        began = time.monotonic()
        for _ in range(4):  # four heartbeats, one second apart
            runner.kill("t")
            await asyncio.sleep(1.0)
        outcome = await running
        return outcome, time.monotonic() - began

    outcome, took = _with_runner(scenario)
    assert count.read_text() == "x"
    assert outcome["crashed"] and outcome["exit_code"] == -signal.SIGKILL
    assert took < 10  # SIGKILL after the 5 s grace


def test_a_child_is_in_its_own_process_group_as_soon_as_the_worker_knows_its_pid(tmp_path):
    seen = tmp_path / "pgid"

    async def scenario(runner: ZygoteRunner) -> int:
        task = asyncio.create_task(
            runner.run("t", f"{ENTRIES}:process_group", {"path": str(seen)}, "t"))
        while not runner.task_ids:
            await asyncio.sleep(0.001)
        pid = runner.describe()[0]["pid"]
        group = os.getpgid(pid)  # the zygote set it before it told the worker the pid
        await task
        return pid if group == pid else -1

    pid = _with_runner(scenario)
    assert pid > 0 and seen.read_text() == str(pid)


def test_a_child_inherits_no_event_loop_no_sockets_and_no_threads_of_the_worker(tmp_path):
    """Before, each task forked from the asyncio worker: the child inherited its running loop
    (``get_event_loop().run_until_complete`` failed in an op), its Redis sockets and its
    threads. Here the worker holds a loop, a socket and a thread of its own, as a real one."""
    report = tmp_path / "report.json"

    async def scenario(runner: ZygoteRunner) -> dict:
        import socket
        import threading

        ours = socket.create_server(("127.0.0.1", 0))  # as the worker's Redis connections
        stop = threading.Event()
        busy = threading.Thread(target=stop.wait, name="worker-thread")
        busy.start()
        try:
            first = asyncio.create_task(runner.run(
                "a", f"{ENTRIES}:sleeper", {"seconds": 1.5}, "a"))  # a sibling alive meanwhile
            await asyncio.sleep(0.2)
            await runner.run("b", f"{ENTRIES}:inheritance", {"path": str(report)}, "b",
                             kind="step")
            await first
        finally:
            stop.set()
            busy.join()
            ours.close()
        return json.loads(report.read_text())

    seen = _with_runner(scenario)
    assert seen["threads"] == ["MainThread"]
    assert not seen["loop_running"] and seen["run_until_complete"] == 42
    kinds = sorted(target.split(":")[0] for target in seen["fds"].values())
    # Its own result pipe and its own control page; no socket, no other task's pipe.
    assert kinds == ["/memfd", "pipe"], seen["fds"]


def test_user_code_with_threads_and_connections_at_import_forks_safely(tmp_path):
    """User code that started a busy thread and opened a connection at import (an exporter, a
    client): 20 tasks forked from the zygote that imported it all finish, and each can use
    ``get_event_loop().run_until_complete`` and the connection."""

    async def scenario(runner: ZygoteRunner) -> list[dict]:
        results = []
        for index in range(20):
            path = tmp_path / f"{index}.json"
            outcome = await asyncio.wait_for(
                runner.run(f"t{index}", f"{ENTRIES}:user_code", {"path": str(path)}, "t"), 30)
            assert outcome["error"] is None, outcome
            results.append(json.loads(path.read_text()))
        return results

    results = _with_runner(scenario, includes=("tests.executor.user_code_at_import",))
    assert results == [{"value": 7, "peer": True}] * 20
