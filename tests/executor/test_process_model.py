"""The worker's process model, on real forked processes: what a task's child inherits, and
when a task is stopped before, while and after it forks."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from taskiq.exceptions import NoResultError

from dagster_taskiq.worker import ChildProcessRunner


def _outcome(**extra: object) -> dict:
    return {"events": [], "error": None, "crashed": False, **extra}


def test_a_quick_task_never_waits_for_a_slow_siblings_child():
    """Two tasks queue for the fork lock while a third prepares. Before, each made its result
    pipe before taking the lock, so the first to fork (a 3 s task) inherited the write end of
    the second's (a quick task's) pipe, whose result then waited for the slow child to exit."""

    async def scenario() -> tuple[float, float]:
        runner = ChildProcessRunner()
        preparing = asyncio.create_task(runner.prepare(lambda: time.sleep(0.5)))
        await asyncio.sleep(0.1)  # the third task holds the lock
        began = time.monotonic()

        def slow():
            time.sleep(3)
            return _outcome()

        slow_run = asyncio.create_task(runner.run("slow", slow, "slow"))
        await asyncio.sleep(0.05)
        quick_run = asyncio.create_task(runner.run("quick", _outcome, "quick"))
        await preparing
        await quick_run
        quick = time.monotonic() - began
        await slow_run
        return quick, time.monotonic() - began

    quick, slow = asyncio.run(scenario())
    assert slow >= 3
    assert quick < 2, f"the quick task's result took {quick:.1f} s (the slow child held it)"


@pytest.mark.parametrize("how", ["release", "kill"])
def test_a_task_stopped_while_it_is_prepared_never_forks(tmp_path: Path, how: str):
    """A task handed back (its lease lost, the worker stopping) or cancelled while its code
    loads: before, it forked and ran anyway, beside the copy another worker had taken."""
    ran = tmp_path / "ran"

    def body():
        ran.write_text("1")
        return _outcome()

    async def scenario():
        runner = ChildProcessRunner()
        preparing = asyncio.create_task(runner.prepare(lambda: time.sleep(0.5), "t"))
        await asyncio.sleep(0.1)
        getattr(runner, how)("t")
        await preparing
        return await runner.run("t", body, "t")

    if how == "release":
        with pytest.raises(NoResultError):
            asyncio.run(scenario())
    else:
        assert asyncio.run(scenario())["skipped"] == "canceling"
    time.sleep(0.2)
    assert not ran.exists()


def test_a_cancel_repeated_by_every_heartbeat_reaches_the_task_once(tmp_path: Path):
    """The heartbeat reports a cancelled task every second until it ends; tools such as dbt
    take a second SIGINT as "force quit", so only the first is delivered, then SIGKILL after
    the grace."""
    count = tmp_path / "sigints"
    ready = tmp_path / "ready"

    def stubborn():
        signal.signal(signal.SIGINT, lambda *_: count.open("a").write("x"))
        ready.write_text("1")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.05)
        return _outcome()

    async def scenario():
        runner = ChildProcessRunner()
        running = asyncio.create_task(runner.run("t", stubborn, "t"))
        while not ready.exists():
            await asyncio.sleep(0.05)
        began = time.monotonic()
        for _ in range(4):  # four heartbeats, one second apart
            runner.kill("t")
            await asyncio.sleep(1.0)
        outcome = await running
        return outcome, time.monotonic() - began

    outcome, took = asyncio.run(scenario())
    assert count.read_text() == "x"
    assert outcome["crashed"] and outcome["exit_code"] == -signal.SIGKILL
    assert took < 10  # SIGKILL after the 5 s grace


def test_a_child_is_in_its_own_process_group_as_soon_as_the_parent_knows_its_pid(tmp_path):
    seen = tmp_path / "pgid"

    def body():
        seen.write_text(str(os.getpgid(0)))
        return _outcome()

    async def scenario() -> int:
        runner = ChildProcessRunner()
        task = asyncio.create_task(runner.run("t", body, "t"))
        while not runner.task_ids:
            await asyncio.sleep(0)
        pid = runner.describe()[0]["pid"]
        group = os.getpgid(pid)  # the parent set it right after the fork
        await task
        return pid if group == pid else -1

    pid = asyncio.run(scenario())
    assert pid > 0 and seen.read_text() == str(pid)
