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
    # Held, the quick result would come when the slow child exits, with the slow one's.
    assert slow - quick > 1, f"the quick task's result took {quick:.1f} s, the slow {slow:.1f} s"


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


# ---- a child that serves several steps of one run ---------------------------------------------


def test_steps_with_one_reuse_key_run_in_one_child_and_never_in_anothers(tmp_path: Path):
    """Steps of one run (one reuse key) run one after another in one child; a step of another
    run, or one without a key (a run's orchestrator), gets a child of its own."""

    async def scenario(runner: ZygoteRunner) -> dict[str, list[int]]:
        pids: dict[str, list[int]] = {"R": [], "S": [], "none": []}
        for index in range(4):
            for key in ("R", "S", None):
                outcome = await runner.run(f"{key}{index}", f"{ENTRIES}:sleeper", {}, "t",
                                           reuse=key)
                pids[str(key) if key else "none"].append(outcome["pid"])
        return pids

    pids = _with_runner(scenario)
    assert len(set(pids["R"])) == 1 and len(set(pids["S"])) == 1, pids
    assert pids["R"][0] != pids["S"][0]
    assert len(set(pids["none"])) == 4 and not set(pids["none"]) & {pids["R"][0], pids["S"][0]}


def test_a_reused_child_holds_only_the_descriptors_of_its_current_step(tmp_path: Path):
    """Its own result pipe and control page (those of earlier steps are closed), and its
    socket to the zygote; nothing of another run's child."""

    async def scenario(runner: ZygoteRunner) -> list[dict]:
        seen = []
        await runner.run("other", f"{ENTRIES}:sleeper", {}, "t", reuse="S")  # idle beside
        for index in range(3):
            path = tmp_path / f"{index}.json"
            outcome = await runner.run(f"t{index}", f"{ENTRIES}:descriptors",
                                       {"path": str(path)}, "t", reuse="R")
            seen.append({"pid": outcome["pid"], "fds": json.loads(path.read_text())})
        return seen

    seen = _with_runner(scenario)
    assert len({entry["pid"] for entry in seen}) == 1
    for entry in seen:
        kinds = sorted(target.split(":")[0] for target in entry["fds"].values())
        assert kinds == ["/memfd", "pipe", "socket"], entry["fds"]


@pytest.mark.parametrize("limit", [1, 2])
def test_max_steps_per_child_bounds_a_childs_steps(limit: int):
    async def main() -> list[int]:
        runner = ZygoteRunner(max_steps_per_child=limit)
        await runner.start()
        try:
            return [(await runner.run(f"t{i}", f"{ENTRIES}:sleeper", {}, "t", reuse="R"))["pid"]
                    for i in range(4)]
        finally:
            await runner.close()

    pids = asyncio.run(main())
    assert len(set(pids)) == 4 // limit, pids
    if limit == 2:
        assert pids[0] == pids[1] != pids[2] == pids[3]


def test_an_idle_child_ends_after_its_idle_time(monkeypatch):
    async def scenario(runner: ZygoteRunner) -> tuple[int, int, bool]:
        first = (await runner.run("a", f"{ENTRIES}:sleeper", {}, "t", reuse="R"))["pid"]
        await asyncio.sleep(zygote.CHILD_IDLE_SECONDS + 1.0)
        gone = not _alive(first)
        second = (await runner.run("b", f"{ENTRIES}:sleeper", {}, "t", reuse="R"))["pid"]
        return first, second, gone

    from dagster_taskiq.worker import zygote

    first, second, gone = _with_runner(scenario)
    assert gone and first != second


def test_a_step_that_ends_its_reused_child_fails_alone_and_the_next_forks_afresh():
    async def scenario(runner: ZygoteRunner) -> tuple[int, dict, int]:
        first = (await runner.run("a", f"{ENTRIES}:sleeper", {}, "t", reuse="R"))["pid"]
        crashed = await runner.run("b", f"{ENTRIES}:crasher", {"code": 3}, "t", reuse="R")
        after = (await runner.run("c", f"{ENTRIES}:sleeper", {}, "t", reuse="R"))["pid"]
        return first, crashed, after

    first, crashed, after = _with_runner(scenario)
    assert crashed["crashed"] and crashed["exit_code"] == 3
    assert f"pid {first}" in crashed["error"]  # it ran in the reused child
    assert after != first


def test_a_child_whose_step_raised_serves_the_next_step():
    async def scenario(runner: ZygoteRunner) -> tuple[dict, int]:
        raised = await runner.run("a", f"{ENTRIES}:raiser", {}, "t", reuse="R")
        after = (await runner.run("b", f"{ENTRIES}:sleeper", {}, "t", reuse="R"))["pid"]
        return raised, after

    raised, after = _with_runner(scenario)
    assert not raised["crashed"] and f"raised in {after}" in raised["error"]


def test_a_child_that_was_signalled_is_never_reused(tmp_path: Path):
    """A cancelled step's child (SIGINT, even one that arrived after its reply) takes no other
    step: the signal must not reach the next one."""
    ready = tmp_path / "ready"

    async def scenario(runner: ZygoteRunner) -> tuple[int, dict, int]:
        first = (await runner.run("a", f"{ENTRIES}:sleeper", {}, "t", reuse="R"))["pid"]
        running = asyncio.create_task(runner.run(
            "b", f"{ENTRIES}:sleeper", {"seconds": 30, "marker": str(ready)}, "t", reuse="R"))
        while not runner.task_ids:
            await asyncio.sleep(0.01)
        runner.kill("b")
        cancelled = await running
        after = (await runner.run("c", f"{ENTRIES}:sleeper", {}, "t", reuse="R"))["pid"]
        return first, cancelled, after

    first, cancelled, after = _with_runner(scenario)
    assert cancelled["error"] is not None and not cancelled["crashed"]  # KeyboardInterrupt
    assert after != first and not ready.exists()


def test_the_fence_stops_a_reused_child_whose_lease_was_not_renewed(tmp_path: Path):
    marker = tmp_path / "ran"

    async def scenario(runner: ZygoteRunner) -> tuple[int, int, list[str], float]:
        fenced: list[str] = []
        runner.on_fenced = fenced.append
        runner.set_fence("a", time.monotonic() + 30)
        first = (await runner.run("a", f"{ENTRIES}:sleeper", {}, "t", reuse="R"))["pid"]
        await asyncio.sleep(1.5)  # idle past the first step's fence: nothing happens
        assert _alive(first)
        runner.set_fence("b", time.monotonic() + 1.0)  # never renewed
        began = time.monotonic()
        task = asyncio.create_task(runner.run(
            "b", f"{ENTRIES}:sleeper", {"seconds": 10, "marker": str(marker)}, "t",
            reuse="R"))
        while not runner.describe():
            await asyncio.sleep(0.01)
        pid = runner.describe()[0]["pid"]
        with pytest.raises(NoResultError):
            await task
        return first, pid, fenced, time.monotonic() - began

    first, pid, fenced, took = _with_runner(scenario)
    assert pid == first, "the second step ran in the first one's child"
    assert fenced == ["b"] and took < 5 and not marker.exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_step_after_a_code_edit_never_runs_in_a_child_of_the_old_code(tmp_path: Path,
                                                                        monkeypatch):
    """The zygote checks the source files before it hands a step to an idle child: an edit
    between two steps of one run means a new zygote, and the step runs the new code in one of
    its children."""
    module = tmp_path / "reuse_edited.py"
    source = '''import os


def entry():
    return lambda: {"events": [], "error": None, "crashed": False, "pid": os.getpid(),
                    "version": VERSION}


VERSION = "@"
'''
    module.write_text(source.replace("@", "old"))
    monkeypatch.syspath_prepend(str(tmp_path))

    async def scenario(runner: ZygoteRunner) -> tuple[dict, dict]:
        first = await runner.run("a", "reuse_edited:entry", {}, "t", reuse="R")
        module.write_text(source.replace("@", "newer"))
        second = await runner.run("b", "reuse_edited:entry", {}, "t", reuse="R")
        return first, second

    first, second = _with_runner(scenario)
    assert first["version"] == "old" and second["version"] == "newer"
    assert first["pid"] != second["pid"]
